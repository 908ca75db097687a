"""``lowmem-alignprop sample``: what did training do? Base model vs LoRA(s), same seeds, scored by a reward.

For the first ``--num-prompts`` prompts of the prompt set, ``--images-per-prompt`` images each, this generates
every image twice with the diffusers pipeline and the training sampler's settings (DDIM, ``sample_steps``,
``guidance_scale``, ``eta``, ``resolution`` of the profile/config): once from the base model and once with the
LoRA adapter(s). Image ``n`` of the run uses its own CPU generator seeded ``seed + n`` for its initial noise and
every DDIM noise draw, so base and LoRA images start from the same noise and an image does not depend on the
batch it was generated in. SD3/SD3.5 and FLUX.1 (flow-matching Euler, no eta) are loaded and placed as the
trainer does under the same profile (:mod:`lowmem_alignprop.commands.flow_sample`). Both sets are scored with
``--reward`` (any reward spec) and written as

    OUTPUT_DIR/sample_grid.png        columns = images, rows = base / lora, each labelled with its reward
    OUTPUT_DIR/sample_results.json    per-prompt rewards (base, lora), their means and lora - base

Without a LoRA (``sample --model M``: a merged model, a base model before training) each image is rendered once,
from the model alone: the grid has one row, and sample_results.json's LoRA keys are null (docs/outputs.md).

Mixing adapters (``--lora a:0.5 --lora b:0.5``), as AlignProp mixes LoRAs trained on different rewards:
every adapter is loaded with ``pipe.load_lora_weights(..., adapter_name=...)`` and combined with
``pipe.set_adapters(names, adapter_weights=weights)``. peft then computes, in every layer the adapters touch,
``W x + sum_i w_i * dW_i x`` with ``dW_i = (alpha_i / r_i) B_i A_i`` the update adapter ``i`` learned. So the
weights interpolate the adapters' *weight updates* linearly: ``a:1`` is adapter a as trained, ``a:0.5`` is
halfway between the base model and a, ``a:0.5 b:0.5`` is the midpoint of a and b in weight space (not the
average of their A and B matrices, which would not be linear), weights above 1 or below 0 extrapolate. The
images are not a linear mix of the two adapters' images: the network is nonlinear in its weights. A DoRA (peft's
magnitude vectors) is read at weight 1 only: peft scales its direction update by the weight, not its magnitudes.
"""

from __future__ import annotations

import atexit
import functools
import gc
import itertools
import json
import logging
import math
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lowmem_alignprop import rewards
from lowmem_alignprop.commands import flow_export, flow_sample, grid
from lowmem_alignprop.commands.flow_export import family_of_kohya_keys, family_of_weights, is_kohya_flow
from lowmem_alignprop.commands.lora_files import (check_recorded_base, is_peft_folder, lycoris_kind, merged_record,
                                                  nonfinite, not_a_lora, read_run, safetensors_copy, shared_name)
from lowmem_alignprop.commands.lora_formats import (attn_processor_as_diffusers, is_ldm_unet_lora, kohya_alphas_folded,
                                                   kohya_encoders_as_diffusers, ldm_unet_as_diffusers,
                                                   ldm_unet_refusal, peft_as_diffusers)
from lowmem_alignprop.commands.run_summary import judged_of
from lowmem_alignprop.measure.weight_bytes import check_host_memory
from lowmem_alignprop.memory import precision
from lowmem_alignprop.memory.placement import configure_cuda_allocator, unused_apple_gpu_note
from lowmem_alignprop.models import loading
from lowmem_alignprop.models.family import family_for
from lowmem_alignprop.models.flow import family_of
from lowmem_alignprop.models.sampler_check import ddim_settings
from lowmem_alignprop.models.sampling import negative_prompts
from lowmem_alignprop.run import atomic
from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.run import base_fingerprint
from lowmem_alignprop.run.filenames import (CONFIG_FILE, LORA_BASE_FILE, LORA_DIR, LORA_WEIGHT_NAME, SAMPLE_GRID,
                                            SAMPLE_RESULTS)
from lowmem_alignprop.run.runlock import hold_folder, holder
from lowmem_alignprop.run.tensor_files import (TensorFileError, is_safetensors, not_safetensors,
                                               read_safetensors_shapes, read_tensor_file)
from lowmem_alignprop.settings.config import image_settings, scoring_settings
from lowmem_alignprop.settings.errors import UserError, first_line, quote
from lowmem_alignprop.settings.model_kind import KIND_FAMILY, flow_width, model_kind_of, shipped_name
from lowmem_alignprop.step.inputs import prepare_inputs
from lowmem_alignprop.step.prompts import load_prompts
from lowmem_alignprop.toy.fidelity import applies, evaluate_batch, off_grammar_note

log = logging.getLogger("lowmem_alignprop")

# keys of a LoRA's down/A matrix in the formats diffusers reads: one per adapted layer
_DOWN_SUFFIXES = ("lora.down.weight", "lora_A.weight", "lora_down.weight", "lora_linear_layer.down.weight")
_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) "
                            r"from checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


@dataclass
class LoraSpec:
    """One ``--lora DIR[:weight]``: the weights file, its mixing weight, and the adapter name it loads as."""
    arg: str
    file: Path
    weight: float
    name: str
    source: Path | None = None  # what the user named (``file`` may be in it, or a converted copy: a checkpoint, peft)

    @functools.cached_property
    def family(self) -> str | None:
        """Which denoiser it adapts (:func:`lora_family`): its file's header read once."""
        return lora_family(self.file)

    @functools.cached_property
    def model(self) -> str | None:
        """Which model family it adapts: unet, sd3 or flux; ``transformer`` when the files do not tell SD3 from
        FLUX.1; None when they tell nothing (:func:`lora_model`). Told from what the user named: a converted copy
        (a kohya file's or a peft folder's, in a temporary folder) names SD3's and FLUX.1's double blocks alike and
        has no record beside it; the named file's keys and the record beside what was named tell them apart."""
        named = self.header_file
        return lora_model(named, lora_family(named), base_record_file(self))

    @property
    def named(self) -> Path:
        """The LoRA as the user gave it (the records name it: a converted copy is gone when the process ends)."""
        return self.source or self.file

    @property
    def header_file(self) -> Path:
        """The file whose header tells how its run sampled (the model, image settings, reward): the ``.safetensors``
        the user named, not the converted copy of an SD3/FLUX kohya file (written without that header)."""
        return self.named if self.named.is_file() and is_safetensors(self.named) else self.file

    @property
    def found_in(self) -> str | None:
        """Where below the folder the user named its weights were found (a run folder's lora/...), else None."""
        file = self.file.absolute()
        if self.source is None or file == self.source or file.parent == self.source or \
                not file.is_relative_to(self.source):  # (a file given itself: nothing below it)
            return None
        return self.file.absolute().relative_to(self.source).as_posix()


# ---------------------------------------------------------------------------------------------------------
# input checks (before any model loads or anything is written)
# ---------------------------------------------------------------------------------------------------------
def _lora_file(path: Path, arg: str) -> Path:
    """The weights file of a LoRA given as a file, a ``lora/`` folder, or a training run's output folder,
    checked to be a readable LoRA before any model loads."""
    file = _find_lora_file(path, arg)
    if file.stat().st_size == 0:
        raise UserError(f"--lora {arg}: {file} is empty (0 bytes): its copy or download did not finish; copy it again")
    try:
        tensors = _read_tensors(file, arg)
    except OSError as e:  # permissions, an I/O error
        raise UserError(f"--lora {arg}: {file} cannot be read ({e.strerror or type(e).__name__}): check its "
                        "permissions, or copy it again") from None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure means a damaged file (or one holding code)
        if isinstance(e, TensorFileError) and e.holds_code:
            raise UserError(f"--lora {arg}: {file} holds pickled code (it imports a Python object, not only tensors), "
                            "which is never loaded: use the .safetensors LoRA a training run wrote, or convert this "
                            "file where you trust it") from None
        run = file.parent.parent  # a run's own lora/ beside its checkpoints: export writes it again from the last one
        again = (f"`lowmem-alignprop export {file.parent}` writes it again from the run's last checkpoint"
                 if file.parent.name == LORA_DIR and ckpt.list_checkpoints(ckpt.root_of(run)) else
                 "copy it again from the run's lora/ folder" if file.parent.name == LORA_DIR else
                 "copy it again, or write it again with lowmem-alignprop export")  # (an export, a file from elsewhere)
        if isinstance(e, TensorFileError) and e.misnamed:
            raise UserError(f"--lora {arg}: {file} is {e.detail}") from None
        if is_safetensors(file):  # (tensor_files' one phrase for such a file)
            raise UserError(f"--lora {arg}: {not_safetensors(file, e)}; {again}") from None
        detail = e.detail if isinstance(e, TensorFileError) else first_line(e, 120)
        raise UserError(f"--lora {arg}: {file} cannot be read ({detail}): it is truncated or damaged; "
                        f"{again}") from None
    if (other := lycoris_kind(tensors)) is not None:  # (diffusers' loader dropped them, or blamed the model)
        raise UserError(f"--lora {arg} holds {other}, not a LoRA's lora_down / lora_up: sample reads plain LoRA "
                        "only; pass a LoRA")
    if (other := ldm_unet_refusal(tensors)) is not None:  # (ComfyUI's full differences, its text encoders' layers)
        raise UserError(f"--lora {arg} {other}")
    if (scale := next((k for k in sorted(tensors) if k.endswith(".dora_scale")), None)) is not None:  # (dropped by
        # every diffusers reader, with a warning: its images were the plain LoRA's)
        raise UserError(f"--lora {arg} is a DoRA in kohya's names (its magnitude vectors, e.g. {quote(scale)}), which "
                        "diffusers' reader drops: sample reads a DoRA's magnitudes from a peft adapter folder or a "
                        "diffusers file (lora_magnitude_vector); pass one of those, or a plain LoRA")
    if not any(k.endswith(_DOWN_SUFFIXES) for k in tensors):
        raise UserError(f"--lora {arg}: {file} holds no LoRA weights (no lora_A / lora.down keys): pass the "
                        "lora/ folder a training run wrote")
    if (bad := nonfinite(tensors)) is not None:  # its images would be NaN, and their rewards too
        raise UserError(f"--lora {arg}: {file} holds NaN or inf weights ({bad}): the run that wrote it diverged; "
                        "sample a checkpoint from before it, or train again with a lower learning rate")
    if flow_export.is_kohya_flow(tensors):  # SD3/FLUX kohya names: q/k/v split back (diffusers' SD3 loader reads none)
        if flow_export.untrained_flux_layer(named := flow_export.kohya_names(tensors)) is not None:
            return safetensors_copy(named)  # (a FLUX layer we do not train, its modulation: diffusers' reader maps it)
        return flow_export.kohya_as_diffusers(file, f"--lora {arg}")
    # (diffusers' layout before 0.21, which it reads no more; kohya's per-layer alphas, which it misreads; a torch
    # pickle as safetensors: the converters of other tools' names read those, as --init-lora's do)
    return attn_processor_as_diffusers(tensors) or kohya_alphas_folded(tensors) or (
        file if is_safetensors(file) else safetensors_copy(tensors))


def _read_tensors(file: Path, arg: str) -> dict[str, torch.Tensor]:
    """Every tensor of a LoRA file (a few MB), read as diffusers would (tensor_files' rule: safetensors, or a .bin
    through torch.load with weights_only). Raises TensorFileError, OSError, or ValueError for a file that holds no
    dictionary of tensors; UserError for a full model's or an embedding's (:func:`not_a_lora`; a .safetensors file
    told by its header's names first: a checkpoint's gigabytes are not read to refuse it)."""
    if is_safetensors(file) and (line := not_a_lora("--lora", arg, read_safetensors_shapes(file))) is not None:
        raise UserError(line)
    state = read_tensor_file(file)
    if isinstance(state, dict) and (line := not_a_lora("--lora", arg, state)) is not None:  # (a .bin's: an embedding
        raise UserError(line)  # holds a dict in it, told before the check below calls it no tensors)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("not a dictionary of tensors")
    return {str(k): v for k, v in state.items()}


def _find_lora_file(path: Path, arg: str) -> Path:
    checkpoint = ckpt.named_checkpoint(path)
    if checkpoint is not None:  # checkpoints/step-300: its LoRA, as the run would have written it at that step
        return _checkpoint_lora(checkpoint)
    if (line := not_a_lora("--lora", arg, folder=path)) is not None:  # (it was said as a run that stopped)
        raise UserError(line)
    for run in (path, path.parent) if path.name == LORA_DIR else (path,):  # a run folder without its lora/ yet
        if not (run / LORA_WEIGHT_NAME).is_file() and not (run / LORA_DIR / LORA_WEIGHT_NAME).is_file() and \
                (missing := _run_without_lora(run, arg)) is not None:
            raise missing
    if not path.exists():
        raise UserError(f"--lora {arg}: {path} does not exist; pass the lora/ folder a training run wrote "
                        f"(e.g. outputs/run/lora), optionally with a weight: DIR:0.5")
    if path.is_dir() and is_peft_folder(path):  # export --format peft: in diffusers' layout, as --init-lora reads it
        return peft_as_diffusers(path, f"--lora {arg}")
    if path.is_file():
        if path.suffix.lower() not in (".safetensors", ".bin"):
            raise UserError(f"--lora {arg}: {path} is not a LoRA weights file; pass a .safetensors file or its folder")
        if path.suffix not in (".safetensors", ".bin"):  # diffusers tells a weights file by the lower-case suffix
            raise UserError(f"--lora {arg}: diffusers reads {path.name} by its suffix in lower case only: rename it "
                            f"to {path.stem}{path.suffix.lower()}")
        return path
    for folder in (path, path / LORA_DIR):  # a run's output dir holds its LoRA in lora/
        if (folder / LORA_WEIGHT_NAME).is_file():
            return folder / LORA_WEIGHT_NAME
        found = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise UserError(f"--lora {arg}: {folder} holds several .safetensors files; pass the one you mean: "
                            f"--lora {found[0]}")
    if (pick := ckpt.pick_a_checkpoint(str(path), "--lora")) is not None:  # (which one is the user's call)
        raise UserError(pick)
    raise UserError(f"--lora {arg}: {path} holds no LoRA weights ({LORA_WEIGHT_NAME}); pass the lora/ folder a "
                    "training run wrote")


def _run_without_lora(run: Path, arg: str) -> UserError | None:
    """What to sample instead when ``run`` is a training run's folder without lora/ (still training, or lora/ lost):
    its newest checkpoint, or export to write lora/ again; None when it is no run folder or has no checkpoint."""
    saved = ckpt.list_checkpoints(run / ckpt.DIRNAME) if (run / ckpt.DIRNAME).is_dir() else []
    if not saved:
        return UserError(f"--lora {arg}: {said}") if (said := ckpt.without_checkpoint(run)) else None
    if (live := holder(run)) is not None:
        return UserError(f"--lora {arg}: {run} is still training (pid {live.get('pid')} on {live.get('host')}) and "
                         f"writes lora/ when it ends; sample a checkpoint meanwhile: --lora {saved[0]} (its newest)")
    return UserError(f"--lora {arg}: {run} has no lora/ (lost, or its run ended before writing it): sample its newest "
                     f"checkpoint (--lora {saved[0]}), or `lowmem-alignprop export {run}` writes lora/ again from it")


def _checkpoint_lora(checkpoint: Path) -> Path:
    """A training checkpoint's LoRA in a temporary lora/ folder (removed when the process ends)."""

    tmp = Path(tempfile.mkdtemp(prefix="lowmem-alignprop-checkpoint-lora-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return loading.write_checkpoint_lora(checkpoint, tmp / "lora")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_lora(arg: str, index: int) -> LoraSpec:
    """``DIR`` (weight 1.0) or ``DIR:WEIGHT``. Raises UserError for a missing path or a weight that is no number."""
    text = arg.strip()
    if not text:
        raise UserError("--lora needs a path: --lora DIR or --lora DIR:WEIGHT (e.g. outputs/run/lora:0.5)")
    where, weight = text, 1.0
    head, _, tail = text.rpartition(":")
    # DIR:WEIGHT where the text is no path: its last colon starts the weight when DIR exists or the rest is a number
    # (a Windows path that does not exist, C:\runs\lora, is then a missing path, not a weight "\runs\lora")
    if ":" in text and not Path(text).expanduser().exists() and (
            not head or Path(head).expanduser().exists() or _is_number(tail)):
        where = head
        try:
            weight = float(tail)
        except ValueError:
            raise UserError(f"--lora {arg}: weight {tail!r} is not a number; write --lora DIR:0.5 "
                            "(DIR alone means weight 1.0)") from None
        if not math.isfinite(weight):
            raise UserError(f"--lora {arg}: weight must be a finite number, e.g. --lora DIR:0.5")
        if not where:
            raise UserError(f"--lora {arg}: the path is missing; write --lora DIR:{tail}")
    given = Path(where).expanduser()
    file = _lora_file(given, arg)
    if weight != 1 and (magnitude := _dora_magnitude(file)) is not None:  # peft: m (W + w dW) / ||W + w dW||
        raise UserError(f"--lora {arg} is a DoRA (its magnitude vectors, e.g. {quote(magnitude)}): a weight scales its "
                        f"direction update but not its magnitudes, so at weight {weight:g} it is not {weight:g} x its "
                        "weight update (at 0 not the base model); give it weight 1 (alone or in a mix)")
    # the records name what the user gave (a folder, a file, a checkpoint), absolute, whatever was loaded from it
    return LoraSpec(arg=arg, file=file, weight=weight, name=f"lora{index}", source=given.absolute())


def _dora_magnitude(file: Path) -> str | None:
    """The first magnitude vector's key of a DoRA (a peft folder's or a diffusers file's lora_magnitude_vector), None
    for a plain LoRA."""
    with safe_open(str(file), framework="pt") as f:
        return next((k for k in sorted(f.keys()) if "lora_magnitude_vector" in k), None)


def base_record_file(spec: LoraSpec) -> Path | None:
    """The base_model.json our trainer wrote beside the LoRA (its file's folder, or the folder named: an export's),
    None for a LoRA from elsewhere or a file copied away alone."""
    named = spec.named if spec.named.is_dir() else spec.named.parent
    return next((f / LORA_BASE_FILE for f in (spec.file.parent, named) if (f / LORA_BASE_FILE).is_file()), None)


# what the run's images were made with, beside its model: `sample` of a run's LoRA on that model renders as it did
def recorded_base(spec: LoraSpec, *, model_given: bool = False) -> tuple[str, dict[str, Any]] | None:
    """(model, settings) a LoRA our trainer wrote was trained on: lora/base_model.json's model, and the
    :data:`~lowmem_alignprop.settings.config.RUN_IMAGE_SETTINGS` its run sampled with (a transformer file's
    model_components among them): from its run's config.yaml where the LoRA is in its run (a lora/ folder's, a
    checkpoint's), else as base_model.json records them (a LoRA or an export copied elsewhere); None for a LoRA
    from elsewhere. ``sample`` without --model loads it with those settings. A recorded path that is gone raises
    UserError naming --model, and a damaged record is warned of, unless ``model_given`` (--model names the model:
    the record only tells whether it is the LoRA's own, :func:`same_model`)."""
    named = spec.named if spec.named.is_dir() else spec.named.parent  # an export's folder (kohya, peft) has one too
    if (record := base_record_file(spec)) is None:  # a LoRA from elsewhere (or a file shared alone)
        return None
    try:
        base = base_fingerprint.load_base_record(record)
        model, recorded = base.get("model"), {**(base.get("image_settings") or {}), **(base.get("scoring") or {})}
    except (OSError, ValueError, TypeError) as e:  # damaged: the model it was trained on is unknown
        if not model_given:
            log.warning(
                "--lora %s: %s cannot be read (%s): the model the LoRA was trained on is unknown; pass it with "
                "--model", spec.arg, record, first_line(e, 80))
        return None
    if not isinstance(model, str) or not model:
        return None
    checkpoint = ckpt.named_checkpoint(named)
    if not model_given:  # (a checkpoint's record is its state.json, read into the LoRA folder made of it)
        check_recorded_base(model, f"--lora {spec.arg}", "its state.json" if checkpoint else LORA_BASE_FILE)
    # a checkpoint: the settings its steps were made with (a later --resume may have changed the run's); else the
    # run: the folder named (RUN), or one or two above it (RUN/lora, RUN/export/kohya)
    if checkpoint is not None:
        config = ckpt.read_state(checkpoint).get("config") or recorded
    else:
        run = next((f for f in (named, *list(named.absolute().parents)[:2]) if (f / CONFIG_FILE).is_file()), None)
        config = read_run(run)[0] if run else recorded
    return model, {**image_settings(config), **scoring_settings(config)}


def usable_scoring(taken: dict[str, Any]) -> dict[str, Any]:
    """``taken`` (the settings ``sample`` takes from a LoRA's run) without the run's reward or prompts where they are
    not at hand here (a reward file or weights, a prompt file left on the machine that trained): said, and the
    defaults score instead."""
    kept = dict(taken)
    checks = {"reward": lambda: rewards.check_reward_spec(taken["reward"], weights=taken.get("reward_weights", "")),
              "prompts": lambda: load_prompts(taken["prompts"])}
    for key, check in checks.items():
        if key not in taken:
            continue
        try:
            check()
        except UserError as e:
            drop = ("reward", "reward_weights") if key == "reward" else (key,)
            kept = {k: v for k, v in kept.items() if k not in drop}
            log.warning(
                "the LoRA's run was scored with %s=%s, not at hand here (%s): the default %s instead (--%s chooses)",
                key, taken[key], first_line(e).split("; ")[0], key, key)  # (what is missing, not our advice)
    return kept


def same_model(given: str, recorded: str, fingerprint: dict | None = None) -> bool:
    """--model names the model a LoRA's record names: the same folder or file (however the path is written; the toy
    model's folder is ``toy``), the same hub id, or an `export --merge` of it (its record's first ``into``): the
    LoRA's run's image settings then apply, as to the model itself. ``fingerprint``: the LoRA's record of its base
    (:func:`recorded_fingerprint`), which a merge's record of the model it went into must match too."""
    def same(a: str, b: str) -> bool:
        a, b = shipped_name(a.strip()), shipped_name(b.strip())
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        return pa.resolve() == pb.resolve() if pa.exists() and pb.exists() else a == b

    if same(given, recorded):
        return True
    first = next((r for r in merged_record(given)[:1] if isinstance(r.get("into"), str)), None)
    if first is None:
        return False
    into, held = first["into"], first.get("into_fingerprint")
    if isinstance(held, dict) and fingerprint:  # (two bases in folders of one name: their weights tell them apart)
        return base_fingerprint.fingerprint_difference(fingerprint, held) is None and (
            same(into, recorded) or shared_name(into) == shared_name(recorded))
    # (a merged single file's header names its model by name only, lora_merge.shared_record: the recorded one's)
    return same(into, recorded) or (into == shared_name(recorded) and not Path(into).expanduser().exists())


def recorded_fingerprint(spec: LoraSpec) -> dict | None:
    """The fingerprint of the model a LoRA was trained on (its base_model.json's denoiser config digest and first
    weights, :func:`~lowmem_alignprop.run.checkpoint.fingerprint`), None without a readable one."""
    base = read_base_record(spec)
    return base if base is not None and isinstance(base.get("unet_config_sha"), str) else None


def read_base_record(spec: LoraSpec) -> dict | None:
    """The base_model.json beside a LoRA (:func:`base_record_file`) as written, None without one or a readable one."""
    if (record := base_record_file(spec)) is None:
        return None
    try:
        return base_fingerprint.load_base_record(record)
    except (OSError, ValueError):
        return None


def image_seeds(seed: int, num_prompts: int, images_per_prompt: int) -> list[list[int]]:
    """Seed of image j of prompt i: ``seed + i * images_per_prompt + j`` (one generator per image)."""
    return [[seed + i * images_per_prompt + j for j in range(images_per_prompt)] for i in range(num_prompts)]


# ---------------------------------------------------------------------------------------------------------
# the pipeline and its adapters
# ---------------------------------------------------------------------------------------------------------
def build_pipeline(cfg, device: torch.device, weight_dtype: torch.dtype, prompts=()):
    """The diffusers pipeline over the components training loads: StableDiffusionPipeline or SDXL with the DDIM
    scheduler, or StableDiffusion3Pipeline / FluxPipeline with the model's flow-matching Euler scheduler, loaded as
    the trainer loads them (flow_sample.py: ``prompts`` encoded and the text encoders freed before the transformer
    is read; :func:`place_denoiser` then places it, once the adapters are loaded)."""
    comps = loading.load_components(cfg, weight_dtype, device, transformer_last=True)  # (UNets: loaded as before)
    family = family_for(comps)
    if family.flow:  # (the architectures on meta, sd35m|sd35l|flux, are flow models: drawn there)
        pipe = flow_sample.build_flow_pipeline(cfg, comps, family, device, weight_dtype, prompts)
        pipe._lowmem_revision = comps.revision  # a hub id's commit: sample_results.json's model_revision
        return pipe
    pipe = family.make_pipeline(comps)
    pipe._lowmem_revision = comps.revision
    pipe._lowmem_family = family  # generate() calls the flow pipelines with their own arguments
    pipe.set_progress_bar_config(disable=True)
    if cfg.sliced_decode:
        pipe.vae.enable_slicing()  # decode one image at a time: the decoder's activations exist for one image
    if cfg.tiled_decode:
        pipe.vae.enable_tiling()  # decode in tiles: activations of one tile, not the whole image
    if cfg.attention == "sliced" and not family.flow:
        pipe.unet.set_attention_slice("auto")  # one attention slice at a time: lowest memory, slowest
    if cfg.offload_frozen and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)  # only the running module (text encoder/UNet/VAE) on the GPU
    else:
        pipe.to(device)
    return pipe


def place_denoiser(pipe, cfg) -> None:
    """SD3/FLUX: with the adapters loaded, the transformer to the device (block swap's blocks hooked, their weights
    in host memory). A UNet pipeline is placed already."""
    if flow_sample.is_flow(pipe):
        flow_sample.place_transformer(pipe, cfg)


def adapted_layers(pipe, name: str) -> int:
    """How many layers of the pipeline's models carry adapter ``name``."""
    count = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            count += sum(1 for m in component.modules() if name in getattr(m, "lora_A", {}))
    return count


def layers_in_file(path: Path) -> int:
    """How many adapted layers a LoRA file holds (one down/A matrix each); 0 for a .bin."""
    if not is_safetensors(path):
        return 0  # .bin: no cheap header read; rely on diffusers' own checks
    with safe_open(str(path), framework="pt") as f:
        return sum(1 for k in f.keys() if k.endswith(_DOWN_SUFFIXES))


def misfit_detail(error: Exception) -> str:
    """A one-line reading of diffusers/peft's error for a LoRA that does not fit the model."""
    text = str(error)
    found = _SIZE_MISMATCH.findall(text)
    if found:
        key, theirs, ours = found[0]
        layer = re.sub(r"\.lora_[AB]\.[^.]+\.weight$", "", key)
        return (f"{len(found)} of its weights have other shapes than this model's layers "
                f"(e.g. {layer}: {theirs} in the LoRA, {ours} here)")
    if "not found in the base model" in text:
        return "none of its layers exist in this model"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # (an assert of a format converter says nothing: which loader failed, then)
    return (lines[0] if lines else f"diffusers' LoRA loader could not read its layers ({type(error).__name__})")[:200]


def lora_family(path: Path) -> str | None:
    """``unet`` or ``transformer`` (SD3/FLUX): which denoiser a LoRA file adapts, from its key names (diffusers'
    ``unet.`` / ``transformer.`` prefixes, kohya's ``lora_unet_`` / ``lora_transformer_``); None when unknown."""
    if not is_safetensors(path):
        return None
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if is_kohya_flow(keys):  # kohya's SD3/FLUX names: lora_unet_ + the original transformer's blocks
        return "transformer"
    if is_ldm_unet_lora(keys):  # ComfyUI's: diffusion_model. + the LDM UNet's blocks
        return "unet"
    for family, prefixes in (("unet", ("unet.", "lora_unet_")), ("transformer", ("transformer.", "lora_transformer_"))):
        if any(k.startswith(prefixes) for k in keys):
            return family
    return None


def lora_model(path: Path, family: str | None, record: Path | None = None) -> str | None:
    """sd3 or flux for a transformer LoRA (``family``: :func:`lora_family`), from the base model our trainer recorded
    (``record``: :func:`base_record_file`; None: lora/base_model.json beside it), else from its keys (FLUX.1's
    single-stream blocks, kohya's double/single or SD3's joint blocks), else ``transformer``; ``family`` itself for
    the others."""
    if family != "transformer":
        return family
    try:
        recorded = base_fingerprint.load_base_record(record or path.parent / LORA_BASE_FILE).get("model")
        kind = model_kind_of(recorded) if isinstance(recorded, str) and recorded else None
    except (OSError, ValueError):  # none (a LoRA from elsewhere), or damaged
        kind = None
    if (recorded_model := model_of_kind(kind)) in ("sd3", "flux"):
        return recorded_model
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    modules = [k.removeprefix("transformer.") for k in keys]
    return family_of_kohya_keys(keys) or ("flux" if family_of_weights(modules) == "flux" else "transformer")


MODEL_NAMES = {"unet": "a UNet model (SD 1.x/2.x/SDXL)", "transformer": "an SD3/SD3.5 or FLUX.1 transformer",
               "sd3": "an SD3/SD3.5 transformer", "flux": "a FLUX.1 transformer"}


def check_lora_family(ours: str | None, specs: list[LoraSpec], model: str, option: str = "--lora",
                      default: str = "") -> None:
    """A LoRA of an SD3/FLUX transformer given to a UNet model (``ours``: unet), or the reverse, or an SD3 LoRA to a
    FLUX.1 model (``ours``: sd3 or flux; transformer when unknown which): one line. Called before anything loads
    with what the model's files tell (settings/model_kind; None: they do not tell), and again with the loaded
    pipeline's. ``default``: why ``model`` is the default one (no --model given, none recorded), said in the line."""
    if ours is None:
        return
    for spec in specs:
        theirs = spec.model
        if theirs is None or same_family(theirs, ours):
            continue
        named = f"--model {model}" + (f" (the default: {default})" if default else "")
        raise UserError(f"{option} {spec.arg} adapts {MODEL_NAMES[theirs]}, but {named} is "
                        f"{MODEL_NAMES[ours]}: pass the model it was trained on with --model")


# the attention projections' down (A) matrices of a diffusers-named transformer LoRA: they read the model's width
_ATTENTION_DOWN = re.compile(r"\.(to_q|to_k|to_v)\.(lora_A|lora\.down|lora_down)\.weight$")
# the shipped flow models' widths, to name the model a LoRA of another width was likely trained on
FLOW_WIDTHS = {1536: "SD3/SD3.5 Medium", 2432: "SD3.5 Large", 3072: "FLUX.1"}


def check_lora_files(specs: list[LoraSpec], model: str, components: str = "", option: str = "--lora",
                     default: str = "") -> None:
    """What the model's files tell of the LoRAs before anything loads: their family (:func:`check_lora_family`)
    and, for an SD3/FLUX model, their attention layers' width against its transformer's: an SD3 LoRA whose files do
    not name SD3 (a peft or diffusers file copied away alone) on FLUX.1, or SD3.5 Medium's on Large, was refused
    only once the transformer was read (minutes). One line; what the files do not tell passes (loading checks)."""
    check_lora_family(model_of_kind(model_kind_of(model, components)), specs, model, option, default)
    if (width := flow_width(model, components)) is None:
        return
    for spec in specs:
        theirs = sorted({w for k, w in _layer_widths(spec.file).items() if _ATTENTION_DOWN.search(k)})
        if theirs and theirs != [width]:
            named = f"--model {model}" + (f" (the default: {default})" if default else "")
            other = next(w for w in theirs if w != width)  # (the width that does not fit, where they differ)
            likely = f" ({FLOW_WIDTHS[other]}'s?)" if len(theirs) == 1 and other in FLOW_WIDTHS else ""
            raise UserError(f"{option} {spec.arg} adapts attention layers of width {other}{likely}, but {named} "
                            f"is a transformer of width {width}: it was trained on another model; pass that model "
                            "with --model")


def same_family(a: str, b: str) -> bool:
    """Whether LoRAs of :attr:`LoraSpec.model` ``a`` and ``b`` can adapt one model (``transformer``: SD3 or FLUX.1)."""
    return a == b or "transformer" in (a, b) and "unet" not in (a, b)


def check_mixable(specs: list[LoraSpec]) -> None:
    """LoRAs mixed in one ``sample`` adapt models of one family (as far as their files tell): else one line, before
    any of their runs' settings are read (no --model can fit both)."""
    known = [spec for spec in specs if spec.model is not None]
    for a, b in itertools.combinations(known, 2):
        if not same_family(a.model, b.model):
            raise UserError(f"--lora {a.arg} adapts {MODEL_NAMES[a.model]} and --lora {b.arg} {MODEL_NAMES[b.model]}: "
                            "LoRAs of different models cannot be mixed; sample them one at a time")
    for a, b in itertools.combinations(specs, 2):  # one family, other layer widths (toy and tiny, SD1.5 and SD2.1)
        ours, theirs = _layer_widths(a.file), _layer_widths(b.file)
        if (key := next((k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k]), None)) is not None:
            raise UserError(f"--lora {a.arg} and --lora {b.arg} adapt layers of other widths ({key}: {ours[key]} in "
                            f"one, {theirs[key]} in the other): they were trained on different base models and "
                            "cannot be mixed; sample them one at a time")
    for a, b in itertools.combinations(specs, 2):  # (a typo in a mix, a:0.5 a:0.5 for a:0.5 b:0.5, was a:1 unsaid)
        if a.file.resolve() == b.file.resolve() or a.named.resolve() == b.named.resolve():
            log.warning(
                "--lora %s and --lora %s are the same LoRA: their weights add up (as --lora %s:%g)", a.arg, b.arg,
                a.named, a.weight + b.weight)


def _layer_widths(file: Path) -> dict[str, int]:
    """The adapted layers' widths a LoRA file tells from its headers alone: each down (A) matrix's input width and
    each up (B) matrix's output width, by key ({} when the file cannot be read: loading says why)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception:  # noqa: BLE001 (a damaged file or not safetensors: its loading says what is wrong)
        return {}
    down = (".lora_A.", ".lora_down.", ".lora.down.")
    return {k: (s[1] if any(d in k for d in down) else s[0]) for k, s in shapes.items() if len(s) == 2}


def pipeline_model(pipe) -> str:
    """What :func:`check_lora_family` compares of a loaded pipeline: unet, sd3 or flux."""
    if not hasattr(pipe, "transformer"):
        return "unet"
    return family_of(pipe.transformer)


def model_of_kind(kind: str | None) -> str | None:
    """What :func:`check_lora_family` compares of a settings/model_kind kind (sd, sdxl, sd35m, sd35l, flux)."""
    return KIND_FAMILY.get(kind)


def warn_other_base(unet, specs: list[LoraSpec], cfg) -> None:
    """A LoRA our trainer wrote names its base model (lora/base_model.json): applied to another model with the same
    layer shapes it loads fine but does not show what training did, so say so (a fine-tune of the base may be
    intended: a warning, not an error)."""
    ours = None
    for spec in specs:
        info = spec.file.parent / LORA_BASE_FILE
        if not info.is_file():
            continue  # a LoRA from elsewhere: nothing to compare
        try:
            saved = base_fingerprint.load_base_record(info)
            if not isinstance(saved.get("conv_in", []), list):
                raise ValueError("wrong shape")
        except (OSError, ValueError) as e:  # (a damaged one: read_lora refused it before)
            log.warning("--lora %s: %s is not the base-model record a training run writes (%s): which model the "
                        "LoRA belongs to is not checked", spec.arg, info, first_line(e, 80))
            continue
        ours = ours or base_fingerprint.fingerprint(cfg, unet)
        problem = base_fingerprint.fingerprint_difference(saved, ours)
        if problem:  # (a hub id's commit: the name alone loads the hub's main, --model as given here maybe)
            commit = base_fingerprint.trained_commit(saved)
            log.warning(
                "--lora %s was trained on base model %r%s, and %s from --model %r here: the images show it on another "
                "model; pass %s to see what training did", spec.arg, saved.get("model"),
                f" at commit {commit}" if commit else "", problem, cfg.model,
                base_fingerprint.model_at_commit(str(saved.get("model")), commit)[1])


def load_adapters(pipe, specs: list[LoraSpec], model: str, default: str = "") -> None:
    """Load every LoRA as a named adapter. A LoRA made for another base model raises UserError (``default``: why
    ``model`` is the default one, said in the line as :func:`check_lora_family` says it)."""
    now = f"now {model!r}" + (f", the default: {default}" if default else "")
    for spec in specs:
        load_adapter_file(pipe, spec.file, spec.name, f"--lora {spec.arg}",
                          f"it was trained for another base model: pass that model with --model ({now})")


# what diffusers' LoRA loading and its format converters raise for a file that does not fit the model (a converter's
# assert on another model's widths, an index past a layer list)
MISFIT_ERRORS = (RuntimeError, ValueError, KeyError, AssertionError, IndexError, TypeError)


def load_adapter_file(pipe, file: Path, name: str, flag: str, fix: str) -> None:
    """``pipe.load_lora_weights`` of ``file`` as adapter ``name``; a file that does not fit (an error from diffusers
    or its converters, or fewer of its layers found than it has) raises one UserError line: ``flag`` does not fit
    this model, why, ``fix``."""
    peft_log = logging.getLogger("diffusers.loaders.peft")
    level = peft_log.level
    peft_log.setLevel(logging.CRITICAL)  # diffusers logs the whole error before raising; we say it in one line
    try:
        with warnings.catch_warnings():
            # our LoRAs adapt only the denoiser; diffusers warns that the text encoder has none
            warnings.filterwarnings("ignore", message="No LoRA keys associated")
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters: wanted
            if getattr(pipe, "unet", None) is not None and is_safetensors(file):  # ComfyUI's LDM names: their
                file = ldm_unet_as_diffusers(file, pipe) or file  # blocks numbered by the UNet's config
                file = kohya_encoders_as_diffusers(file, pipe) or file  # (encoder layers without out_proj)
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    except MISFIT_ERRORS as e:
        raise UserError(f"{flag} does not fit this model: {misfit_detail(e)}; {fix}") from None
    finally:
        peft_log.setLevel(level)
    expected, got = layers_in_file(file), adapted_layers(pipe, name)
    if got == 0 or got < expected:
        raise UserError(f"{flag} does not fit this model: only {got} of its {expected} layers exist here; {fix}")


def mix_adapters(pipe, specs: list[LoraSpec]) -> None:
    """Activate the adapters with their weights: each layer computes W x + sum_i w_i dW_i x (see module doc)."""
    pipe.enable_lora()
    pipe.set_adapters([s.name for s in specs], adapter_weights=[s.weight for s in specs])


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], cfg, batch_size: int) -> torch.Tensor:
    """Images in [0, 1] (float32, CPU), ``[len(prompts), 3, H, W]``; image n uses a generator seeded seeds[n]."""
    if flow_sample.is_flow(pipe):  # SD3 (CFG on the negative prompt) / FLUX (guidance embedding): cached embeddings
        return flow_sample.generate_flow(pipe, prompts, seeds, cfg, batch_size)
    out = []
    for i in range(0, len(prompts), batch_size):  # batch_size images per pipeline call bounds the UNet's activations
        chunk = prompts[i:i + batch_size]
        # CPU generators: the same noise on every device, and the same draws as training's initial_latents
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds[i:i + batch_size]]
        # training's unconditional branch: the negative prompt, or the pipeline's own default for an empty one
        images = pipe(prompt=chunk, negative_prompt=negative_prompts(cfg.negative_prompt, len(chunk)),
                      num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, eta=cfg.eta,
                      guidance_rescale=cfg.guidance_rescale, height=cfg.resolution, width=cfg.resolution,
                      generator=gens, output_type="pt").images
        out.append(images.float().cpu())  # kept on the CPU: the GPU holds one batch at a time
    return torch.cat(out)


@torch.no_grad()
def score(reward, images: torch.Tensor, prompts: list[str], device: torch.device, batch_size: int) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch_size):
        out.append(reward(images[i:i + batch_size].to(device), prompts[i:i + batch_size]).float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------
def has_results(folder: Path) -> bool:
    return (folder / SAMPLE_RESULTS).exists()


def refuse_a_runs_folder(out: Path) -> None:
    """sample's --output-dir may not be a training run's folder or a LoRA folder: its grid and results would land
    among the run's files, or in what export and --push-to-hub copy as the LoRA."""
    # (a run's folder: what a new training start there is refused for, its checkpoints, lora/, metrics, summary)
    what = ("a LoRA folder" if (out / LORA_WEIGHT_NAME).is_file() else "a training run's folder"
            if ckpt.holds_a_run(out) else None)
    if what:
        raise UserError(f"--output-dir {out} is {what}: sample's grid and results would land among its files; give "
                        f"a folder of its own (e.g. --output-dir {out.parent / (out.name + '-sample')})")


def evaluate(cfg, specs: list[LoraSpec], *, num_prompts: int, images_per_prompt: int,
             profile_name: str = "custom", numbered_output_dir: bool = False, prompts: list[str] | None = None,
             default_model: str = "") -> dict:
    """Generate, score and write the grid and JSON into ``cfg.output_dir`` (held for this evaluation; a numbered
    default folder taken meanwhile gives way to the next). ``prompts``: the user's own (``--prompt``), else the first
    ``num_prompts`` of ``cfg.prompts``. ``default_model``: why cfg.model is the default (said where a LoRA does not
    fit it). Returns the JSON's content."""
    # a FLUX LoRA on SD1.5 (or the reverse) as the model's files tell: one line, before any note on the model
    flow_sample.check_transformer_only([s for s in specs if s.family == "transformer"])
    check_lora_files(specs, cfg.model, cfg.model_components, default=default_model)
    # prompts, reward spec, model path, output dir: checked first
    given = prepare_inputs(cfg, prompts, training=False)
    loading.check_before_load(cfg)  # a sampler or VAE loading would refuse (header reads): before any line on prompts
    chosen = given[:num_prompts]
    if len(given) > num_prompts:  # (a prompt file's other lines were left out without a word)
        log.info("sample: the first %d of the %d prompts of %s (--num-prompts %d "
                                                   "for all of them)", num_prompts, len(given), cfg.prompts, len(given))
    if (note := off_grammar_note(cfg.model, chosen)) is not None:  # as training says it (their rewards are averaged in)
        log.warning("%s", note)
    refuse_a_runs_folder(Path(cfg.output_dir))
    with hold_folder(Path(cfg.output_dir), has_results, numbered=numbered_output_dir) as lock:
        return _evaluate(cfg, specs, chosen, lock.out, num_prompts=num_prompts, images_per_prompt=images_per_prompt,
                         profile_name=profile_name, prompt_set=cfg.prompts if prompts is None else "--prompt",
                         default_model=default_model)


def _evaluate(cfg, specs: list[LoraSpec], prompts: list[str], out: Path, *, num_prompts: int,
              images_per_prompt: int, profile_name: str, prompt_set: str, default_model: str = "") -> dict:
    t0 = time.perf_counter()
    if len(prompts) < num_prompts:
        log.warning("--num-prompts %d: the prompt set %s has %d; using all of them", num_prompts, cfg.prompts,
                    len(prompts))
    device, weight_dtype, allocator, reward = _device_and_reward(cfg)
    seeds = image_seeds(cfg.seed, len(prompts), images_per_prompt)
    flat_prompts = [p for p in prompts for _ in range(images_per_prompt)]
    flat_seeds = [s for row in seeds for s in row]
    base_images, lora_images, sampler, revision = _render(cfg, specs, prompts, flat_prompts, flat_seeds, device,
                                                          weight_dtype, default_model)  # (lora_images None: no LoRA)
    base_r, lora_r = _scores(cfg, reward, base_images, lora_images, flat_prompts, device)
    base_mean, lora_mean = base_r.mean().item(), None if lora_r is None else lora_r.mean().item()
    results = {
        "model": cfg.model, **({"model_revision": revision} if revision else {}),
        "profile": profile_name, "reward": cfg.reward, "prompts": prompt_set,
        "loras": [{"path": str(s.named), "weight": s.weight, "adapter_name": s.name,
                   **({"weights": s.found_in} if s.found_in else {})} for s in specs],
        "lora_weights_mean": "each adapter adds weight * (its trained weight update) to every layer it adapts"
                             if specs else None,
        "sampler": sampler,
        "seed": cfg.seed, "num_prompts": len(prompts), "images_per_prompt": images_per_prompt,
        "per_prompt": _per_prompt(prompts, seeds, base_r, lora_r, images_per_prompt),
        "base_mean": base_mean, "lora_mean": lora_mean,
        "difference": None if lora_mean is None else lora_mean - base_mean,
        **toy_fidelity(cfg, flat_prompts, base_images, lora_images),
        "grid": SAMPLE_GRID, "device": str(device), "cuda_allocator": allocator,
        "seconds": round(time.perf_counter() - t0, 2),
        "output_dir": str(out.absolute()),
    }
    _write(out, results, prompts, images_per_prompt, (base_images, base_r), (lora_images, lora_r))
    return results


def _device_and_reward(cfg) -> tuple[torch.device, torch.dtype, str, Any]:
    """(device, the frozen weights' dtype, the CUDA allocator's setting, the reward built on the CPU), after the
    host-memory check."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if (mac := unused_apple_gpu_note()):
        log.warning(mac)
    check_host_memory(cfg)  # on a CPU, a model that cannot fit host memory: now, not killed while it loads
    allocator = configure_cuda_allocator(cfg.expandable_segments)  # less memory reserved but unused, as in training
    weight_dtype = precision.frozen_weight_dtype(cfg.mixed_precision, device.type)  # as in training: fp32 on a CPU
    # a reward whose weights are missing fails here, before any image is generated; it waits on the CPU until
    # scoring, so the reward model and the diffusion model are never on the GPU together
    reward = rewards.build_reward(cfg.reward, device="cpu", dtype=weight_dtype, checkpointing=False,
                                  weights=cfg.reward_weights)
    return device, weight_dtype, allocator, reward


def _adapted_pipeline(cfg, specs: list[LoraSpec], prompts: list[str], device: torch.device,
                      weight_dtype: torch.dtype, default_model: str):
    """The pipeline with the LoRAs loaded and the denoiser placed, each LoRA checked to fit the model first (its
    family as the files tell it: :func:`evaluate`, before the pipeline is built; a 24 GB transformer is not read for
    nothing)."""
    # SD3/FLUX: the prompts are encoded with the base text encoders, freed before any adapter loads
    pipe = build_pipeline(cfg, device, weight_dtype, prompts)
    check_lora_family(pipeline_model(pipe), specs, cfg.model, default=default_model)  # the files'
    # kind unknown before loading (a hub id out of the cache, an SD single file)
    if (cut := pipe._lowmem_family.cut_prompts_note(cfg, prompts)):  # (the trainer says it too)
        log.warning(cut)
    load_adapters(pipe, specs, cfg.model, default_model)  # a LoRA that does not fit: its one line, not a warning first
    warn_other_base(getattr(pipe, "transformer", None) or pipe.unet, specs, cfg)  # fits, but another base's
    place_denoiser(pipe, cfg)  # SD3/FLUX: block swap installed over the adapted transformer
    return pipe


def _render(cfg, specs: list[LoraSpec], prompts: list[str], flat_prompts: list[str], flat_seeds: list[int],
            device: torch.device, weight_dtype: torch.dtype, default_model: str) -> tuple[torch.Tensor, ...]:
    """(base images, LoRA images, the sampler's settings dict, a hub id's commit or None): the pipeline loaded and
    adapted, every image rendered without and with the adapters, then the denoiser freed (flow models) or moved off
    the GPU before scoring. No LoRA (``specs`` empty): the model's images once, and None for the LoRA's."""
    pipe = _adapted_pipeline(cfg, specs, prompts, device, weight_dtype, default_model)
    batch = cfg.batch_size  # the profile's training batch fits with gradients, so surely without
    if specs:  # (a pipeline without adapters has no peft layers to switch)
        pipe.disable_lora()
    base_images = generate(pipe, flat_prompts, flat_seeds, cfg, batch)
    lora_images = None
    if specs:
        mix_adapters(pipe, specs)
        lora_images = generate(pipe, flat_prompts, flat_seeds, cfg, batch)
    sampler, revision = _sampler(pipe, cfg), getattr(pipe, "_lowmem_revision", None)
    if flow_sample.is_flow(pipe):  # freed, not copied back: block swap's blocks are in host memory already
        del pipe
        gc.collect()  # (peft's and block swap's hooks hold reference cycles)
    elif device.type == "cuda" and not cfg.offload_frozen:  # (with offload, the hooks have moved it back)
        pipe.to("cpu")  # the diffusion model leaves the GPU before the reward model arrives
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return base_images, lora_images, sampler, revision


def _sampler(pipe, cfg) -> dict:
    """sample_results.json's ``sampler``: the scheduler and the settings the images were rendered with."""
    scheduler = type(pipe.scheduler).__name__.removesuffix("Scheduler")  # DDIM or FlowMatchEulerDiscrete
    return {"scheduler": scheduler,
            "sample_steps": cfg.sample_steps, "guidance_scale": cfg.guidance_scale,
            # (flow models' Euler steps and pipelines have no eta, rescale or prediction type)
            **(ddim_settings(cfg, pipe.scheduler.config) if scheduler == "DDIM" else {}),
            "resolution": cfg.resolution, "negative_prompt": cfg.negative_prompt}


def _scores(cfg, reward, base_images: torch.Tensor, lora_images: torch.Tensor | None, flat_prompts: list[str],
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reward of every base and LoRA image (None: no LoRA), on ``device``; a NaN or inf among them raises
    UserError."""
    reward.to(device)
    base_r = score(reward, base_images, flat_prompts, device, cfg.batch_size)
    lora_r = None if lora_images is None else score(reward, lora_images, flat_prompts, device, cfg.batch_size)
    for name, r in (("the base model's" if lora_r is not None else "the model's", base_r), ("the LoRA's", lora_r)):
        if r is not None and not torch.isfinite(r).all():  # JSON has no NaN: a result that holds one is a failure
            check = "the LoRA (a diverged run?)" if lora_r is not None else "the model"
            raise UserError(f"the reward {cfg.reward!r} scored {int((~torch.isfinite(r)).sum())} of {name} "
                            f"{r.numel()} images NaN or inf: nothing was written; check {check} and the reward")
    return base_r, lora_r


def _per_prompt(prompts: list[str], seeds: list[list[int]], base_r: torch.Tensor, lora_r: torch.Tensor | None,
                images_per_prompt: int) -> list[dict]:
    """sample_results.json's ``per_prompt``: each prompt's seeds, rewards, their means and lora - base (the LoRA's
    keys null without a LoRA: ``lora_r`` None)."""
    per_prompt = []
    for i, prompt in enumerate(prompts):
        b = base_r[i * images_per_prompt:(i + 1) * images_per_prompt].tolist()
        lo = None if lora_r is None else lora_r[i * images_per_prompt:(i + 1) * images_per_prompt].tolist()
        lora_mean = None if lo is None else sum(lo) / len(lo)
        per_prompt.append({"prompt": prompt, "seeds": seeds[i], "base": b, "lora": lo,
                           "base_mean": sum(b) / len(b), "lora_mean": lora_mean,
                           "difference": None if lo is None else lora_mean - sum(b) / len(b)})
    return per_prompt


def _write(out: Path, results: dict, prompts: list[str], images_per_prompt: int,
           base: tuple[torch.Tensor, torch.Tensor], lora: tuple[torch.Tensor | None, torch.Tensor | None]) -> None:
    """The grid (``base`` and ``lora``: images and rewards; the LoRA's None: one row, the model's) and the results
    into ``out``, an earlier evaluation's replaced (its results removed first)."""
    if has_results(out):  # (a folder the user named; a failure before here leaves no trace: the lock removes it)
        log.warning("%s held an earlier evaluation: replacing it", out)
        # its results go first, the new ones come last: a kill between the two writes left the new grid beside the
        # old results (another seed's scores under its images)
        (out / SAMPLE_RESULTS).unlink()
    out.mkdir(parents=True, exist_ok=True)
    labels = [p if images_per_prompt == 1 else f"#{j} {p}" for p in prompts for j in range(images_per_prompt)]
    alone = lora[0] is None  # no LoRA: the model's row only
    grid.save_sample_grid(out / SAMPLE_GRID, labels, base, None if alone else lora,
                          row_names=("model",) if alone else ("base", "lora"),
                          group=images_per_prompt)  # a prompt's images in one band
    atomic.write_text(out / SAMPLE_RESULTS, json.dumps(results, indent=2, allow_nan=False))  # (checked finite above)


def toy_fidelity(cfg, prompts: list[str], base_images: torch.Tensor, lora_images: torch.Tensor | None) -> dict:
    """In the toy world (docs/toy_world.md): the exact evaluators on both image sets, ``{"fidelity": {"base": ...,
    "lora": ...}}`` (fidelity_* rates over the prompts its grammar parses, jpeg_bytes; ``lora`` null without a
    LoRA); elsewhere nothing."""
    if not applies(cfg.model, prompts):
        return {}
    return {"fidelity": {"base": evaluate_batch(base_images, prompts),
                         "lora": None if lora_images is None else evaluate_batch(lora_images, prompts)}}


def print_summary(r: dict, out: Path) -> None:
    """The evaluation's lines on stdout: the means (base, lora, difference; without a LoRA the model's mean alone),
    the mix, the toy world's exact figures, and the files written."""
    made = len(r["per_prompt"]) * r["images_per_prompt"]
    head = (f"reward {r['reward']} over {r['num_prompts']} prompts x {r['images_per_prompt']} images "
            f"({r['sampler']['scheduler']} {r['sampler']['sample_steps']} steps, seed {r['seed']}):")
    fid = r.get("fidelity", {})
    if not r["loras"]:  # the model alone: its mean, no comparison
        lines = [head, f"  model {r['base_mean']:.4f}   ({r['model']}, no LoRA)"]
    else:
        mix = " + ".join(f"{d['weight']:g} x {d['path']}" + (f" ({d['weights']})" if "weights" in d else "")
                         for d in r["loras"])
        lines = [head, f"  base {r['base_mean']:.4f}   lora {r['lora_mean']:.4f}   difference {r['difference']:+.4f}",
                 f"  lora = {mix}"]
    if "fidelity_all_ok" in fid.get("base", {}):  # the toy world's exact figures: the model's, or base -> lora
        def rate(key: str, fmt: str) -> str:
            return " -> ".join(format(fid[w][key], fmt) for w in ("base", "lora") if fid.get(w))
        lines.append(f"  exact fidelity (toy world){judged_of(fid['base'], made)}: all right "
                     f"{rate('fidelity_all_ok', '.0%')}, score {rate('fidelity_score', '.3f')}")
    print("\n".join([*lines, f"wrote {out / SAMPLE_GRID} and {out / SAMPLE_RESULTS}"]), flush=True)

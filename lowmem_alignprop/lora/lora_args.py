"""``--lora DIR[:WEIGHT]`` (``sample``; ``export``, ``--init-lora`` and the merge checks use its :class:`LoraSpec`):
the argument parsed (:func:`parse_lora`), the LoRA's weights file found (a file, a ``lora/`` folder, a run folder, a
checkpoint, a peft folder) and checked to be a readable LoRA before any model loads, other tools' layouts written in
diffusers' into a temporary folder, and where the base-model record our trainer wrote beside it lies
(:func:`base_record_file`)."""

from __future__ import annotations

import atexit
import functools
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lowmem_alignprop.lora import flow_export
from lowmem_alignprop.lora.hub_lora import HubLora, hub_lora
from lowmem_alignprop.lora.lora_files import is_peft_folder, lycoris_kind, nonfinite, not_a_lora, safetensors_copy
from lowmem_alignprop.lora.lora_formats import (attn_processor_as_diffusers, bare_lora_as_diffusers,
                                                    kohya_alphas_folded, kohya_flow_for_diffusers, ldm_unet_refusal,
                                                    peft_as_diffusers)
from lowmem_alignprop.lora.lora_kinds import lora_family, lora_model
from lowmem_alignprop.models import loading
from lowmem_alignprop.models.lora_layers import LORA_DOWN_SUFFIXES
from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.run.filenames import LORA_BASE_FILE, LORA_DIR, LORA_WEIGHT_NAME
from lowmem_alignprop.run.runlock import holder
from lowmem_alignprop.run.tensor_files import (TensorFileError, is_safetensors, not_safetensors,
                                               read_safetensors_shapes, read_tensor_file)
from lowmem_alignprop.settings.errors import UserError, first_line, quote


@dataclass
class LoraSpec:
    """One ``--lora DIR[:weight]``: the weights file, its mixing weight, and the adapter name it loads as."""
    arg: str
    file: Path
    weight: float
    name: str
    source: Path | None = None  # what the user named (``file`` may be in it, or a converted copy: a checkpoint, peft)
    hub: HubLora | None = None  # a hub id's LoRA (``source``: its file in the hub cache), with the commit read

    def record(self) -> dict:
        """sample_results.json's entry: the LoRA as named, absolute (a hub id's: its repository, the file in it and the
        commit read)."""
        if self.hub is not None:
            return {"path": self.hub.repo, "weight": self.weight, "adapter_name": self.name, "weights": self.hub.file,
                    "revision": self.hub.commit}
        return {"path": str(self.named), "weight": self.weight, "adapter_name": self.name,
                **({"weights": self.found_in} if self.found_in else {})}

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
    def shown(self) -> str:
        """The LoRA as lines name it: a hub id's as the user gave it (owner/name, with @REV and the file where
        named), not its file in the hub cache; else the path named, absolute."""
        return (self.hub.shown or f"{self.hub.repo}/{self.hub.file}") if self.hub is not None else str(self.named)

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
    if not any(k.endswith(LORA_DOWN_SUFFIXES) for k in tensors):
        raise UserError(f"--lora {arg}: {file} holds no LoRA weights (no lora_A / lora.down keys): pass the "
                        "lora/ folder a training run wrote")
    if (bad := nonfinite(tensors)) is not None:  # its images would be NaN, and their rewards too
        raise UserError(f"--lora {arg}: {file} holds NaN or inf weights ({bad}): the run that wrote it diverged; "
                        "sample a checkpoint from before it, or train again with a lower learning rate")
    if flow_export.is_kohya_flow(tensors):  # SD3/FLUX kohya names: q/k/v split back (diffusers' SD3 loader reads none)
        return kohya_flow_for_diffusers(tensors, file, f"--lora {arg}")
    # (diffusers' layout before 0.21, which it reads no more; kohya's per-layer alphas, which it misreads; peft's
    # names without diffusers' unet. / transformer., which it leaves out; a torch pickle as safetensors: the
    # converters of other tools' names read those, as --init-lora's do)
    return attn_processor_as_diffusers(tensors) or kohya_alphas_folded(tensors) or bare_lora_as_diffusers(
        tensors, file, f"--lora {arg}") or (file if is_safetensors(file) else safetensors_copy(tensors))


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
    """``DIR`` (weight 1.0) or ``DIR:WEIGHT``; DIR may be a hub id where no such path exists (``owner/name``, or
    ``owner/name/file.safetensors``: lora/hub_lora.py). Raises UserError for a missing path or a weight that is no
    number."""
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
    hub = hub_lora(where, "--lora") if not given.exists() and ckpt.named_checkpoint(given) is None else None
    if hub is not None:  # owner/name[/file.safetensors]: its file in the hub cache, read as a local one
        given = hub.path.parent if hub.peft else hub.path  # (a peft adapter: its folder, with its config)
    file = _lora_file(given, arg)
    if weight != 1 and (magnitude := _dora_magnitude(file)) is not None:  # peft: m (W + w dW) / ||W + w dW||
        raise UserError(f"--lora {arg} is a DoRA (its magnitude vectors, e.g. {quote(magnitude)}): a weight scales its "
                        f"direction update but not its magnitudes, so at weight {weight:g} it is not {weight:g} x its "
                        "weight update (at 0 not the base model); give it weight 1 (alone or in a mix)")
    # the records name what the user gave (a folder, a file, a checkpoint), absolute, whatever was loaded from it
    return LoraSpec(arg=arg, file=file, weight=weight, name=f"lora{index}", source=given.absolute(), hub=hub)


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

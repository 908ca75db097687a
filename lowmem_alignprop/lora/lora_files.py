"""A LoRA folder a run wrote, read and checked (``export --lora``): the UNet's or transformer's weights in peft's
names, the adapter's config, the base model's fingerprint and the run's config and summary; a training checkpoint
(checkpoints/step-N) is read as the run would have written its LoRA at that step. A missing or damaged folder raises
UserError naming what is wrong. (The record of the LoRAs an `export --merge` model holds: run/merged_models.py.)
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowmem_alignprop.run.filenames import (BEST_DIR, BEST_FILE, CHECKPOINTS_DIR, CONFIG_FILE, FULL_DIR, LORA_BASE_FILE,
                                            LORA_DIR, LORA_WEIGHT_NAME, SUMMARY_FILE)
from lowmem_alignprop.run.tensor_files import (TensorFileError, is_safetensors, not_safetensors,
                                               read_safetensors_metadata, read_safetensors_shapes, read_tensor_file)
from lowmem_alignprop.settings.errors import UserError, first_line, quote
from lowmem_alignprop.settings.model_kind import denoiser_component, denoiser_label

log = logging.getLogger("lowmem_alignprop")

# kohya's ss_base_model_version values
SD_V1, SD_V2, SDXL = "sd_v1", "sd_v2", "sdxl_base_v1-0"


def check_recorded_base(model: str, lora: str, record: str = LORA_BASE_FILE) -> None:
    """A base model a LoRA's base_model.json (or a checkpoint's ``record``) records must still be there (a named model
    or a hub id always is): else one line naming --model, not the missing path's generic advice."""
    from lowmem_alignprop.settings.model_kind import NAMED_KINDS
    from lowmem_alignprop.settings.paths import looks_like_hub_id, windows_path
    from lowmem_alignprop.step.inputs import ANOTHER_MACHINES, OLD_RELATIVE as relative

    if model not in NAMED_KINDS and not looks_like_hub_id(model) and not Path(model).expanduser().exists():
        if windows_path(model):  # a run on Windows: no file here has that name (read as one, it was "a local model")
            where = ANOTHER_MACHINES
        elif Path(model).expanduser().is_absolute():
            where = "which is not there any more"
        elif len(Path(model).parts) == 1:  # a bare name: a folder pushed to the hub names a local base so
            where = f"not found here: a local model of that name (as a LoRA shared on the hub names it) or {relative}"
        else:
            where = f"{relative}, not found from here"
        raise UserError(f"{lora} was trained on {model} ({record}), {where}: pass the base model with --model")


@dataclass
class Lora:
    """A LoRA folder a run wrote, read and checked: peft-named weights of the UNet (or the SD3/FLUX transformer)
    and the adapter's config."""
    path: Path                      # the lora/ folder
    weights: dict[str, torch.Tensor]  # peft names without prefix: down_blocks.1...to_q.lora_A.weight
    config: dict[str, Any]          # the peft LoraConfig (r, lora_alpha, target_modules, ...)
    base: dict[str, Any] | None     # base_model.json: the fingerprint of the model it was trained on
    run: Path | None                # the run folder (config.yaml / summary.json), when there is one
    run_config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    step: int | None = None         # a training checkpoint's step (export of checkpoints/step-N), else None
    family: str = "unet"            # unet (SD 1.x/2.x/SDXL), sd3 (SD3/SD3.5) or flux (FLUX.1): which denoiser
    origin: Path | None = None      # what was named when it is not ``path``: a checkpoint, read into a temporary lora/
    starts: int | None = None       # a checkpoint's: how many of the run's starts (command.txt lines) it holds
    # the layers its run kept as its --init-lora had them (models/kept_lora.py), in diffusers' names with the
    # component's prefix (unet., text_encoder., text_encoder_2.), peft's lora_A/lora_B, scale 1; {} for most LoRAs
    kept: dict[str, torch.Tensor] = field(default_factory=dict)
    # export --lora OWNER/NAME: the hub LoRA it was read from (lora/hub_lora.HubLora: id, file, commit), else None
    hub: Any = None

    @property
    def flow(self) -> bool:
        return self.family != "unet"

    @property
    def component(self) -> str:
        """The pipeline component the LoRA adapts (its keys' prefix in diffusers' layout)."""
        return denoiser_component(self.flow)

    @property
    def modules(self) -> list[str]:
        """The adapted layers' module paths (``down_blocks.1.attentions.0...attn1.to_q``), sorted."""
        return sorted(k[: -len(".lora_A.weight")] for k in self.weights if k.endswith(".lora_A.weight"))

    @property
    def adapted_targets(self) -> list[str]:
        """The config's target names that name adapted layers (an SD3 LoRA of lora_layers=attention+ff: not FLUX's
        proj_mlp and block proj_out, which SD3 has none of), sorted: what the card and the kohya header list. The
        blocks' proj_out, which the header names by path (lora_metadata: not the top-level one), is proj_out."""
        from lowmem_alignprop.models.lora_layers import TOP_LEVEL_OUT

        targets = {TOP_LEVEL_OUT if t.endswith(f".{TOP_LEVEL_OUT}") else t
                   for t in self.config.get("target_modules") or []}
        return sorted(t for t in targets if any(m == t or m.endswith(f".{t}") for m in self.modules))

    @property
    def named(self) -> Path:
        """The folder the user named: the checkpoint for a checkpoint's LoRA, else ``path``."""
        return self.origin or self.path

    @property
    def base_model(self) -> str | None:
        return (self.base or {}).get("model") or self.run_config.get("model")

    @property
    def model_components(self) -> str:
        """The folder with the other parts of a transformer-file base model (its run's model_components), or ""."""
        return str(((self.base or {}).get("image_settings") or {}).get("model_components")
                   or self.run_config.get("model_components") or "")

    @property
    def components_revision(self) -> str:
        """The commit a hub id model_components' parts were read at, as base_model.json (or the checkpoint's
        fingerprint) records it (``components_revision``), or ""."""
        from lowmem_alignprop.run.base_fingerprint import recorded_commit

        return recorded_commit(self.base, "components_revision")

    def scale(self, module: str) -> float:
        """The factor peft applies to ``B @ A`` in ``module`` (what a trained LoRA means)."""
        from peft.utils.other import get_pattern_key

        rank = self.weights[f"{module}.lora_A.weight"].shape[0]
        alphas = self.config.get("alpha_pattern") or {}
        alpha = alphas.get(get_pattern_key(alphas.keys(), module), self.config.get("lora_alpha") or rank)
        return float(alpha) / (math.sqrt(rank) if self.config.get("use_rslora") else rank)


def _check_named_step(path: Path, spec: str) -> None:
    """A run's checkpoints/step-N that is no whole checkpoint: damaged (what is wrong with it), or not kept (which
    steps are), each with the checkpoints it can use instead."""
    from lowmem_alignprop.run import checkpoint as ckpt

    step = ckpt.step_of(path)
    if step is None or path.parent.name != ckpt.DIRNAME:
        return
    whole = [p.name for p in ckpt.list_checkpoints(path.parent) if ckpt.verify(p) is None]
    instead = (f"pass another step's checkpoint ({', '.join(whole)}) or the run's lora/ folder" if whole
               else "pass the run's lora/ folder")
    folder = ckpt.step_folder(path)
    if folder.is_dir() and (newer := ckpt.newer_version(folder, instead)) is not None:  # (laid out otherwise)
        raise newer
    if folder.is_dir():
        raise UserError(f"checkpoint {folder} is incomplete or corrupt: "
                        f"{ckpt.verify(folder) or 'its trainable.safetensors or state.json is missing'}; {instead}")
    raise UserError(f"--lora {spec}: the run kept no checkpoint of step {step} (keep_checkpoints keeps the newest); "
                    f"{instead}")


PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"  # peft.utils.CONFIG_NAME


def is_peft_folder(path: Path) -> bool:
    """A peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``: ``export --format peft``)."""
    return (path / PEFT_WEIGHT_NAME).is_file() and (path / PEFT_CONFIG_NAME).is_file()


# export of a LoRA that is an export already
ALREADY = ("export converts the LoRA a run wrote (its lora/ folder or a checkpoint); use this one as it is (sample and "
           "--init-lora read it), or export that run's lora/")
# export --merge of one
ALREADY_MERGE = ("--merge fuses the LoRA a run wrote (its lora/ folder or a checkpoint) into its base model: merge "
                 "that run's lora/ (export RUN/lora --merge); sample and --init-lora read this one as it is")


def export_weight_line(spec: str, where: str, weight: str) -> str:
    """export --lora ``spec``: the LoRA ``where`` with sample's ``:weight`` after it (a folder, a hub id)."""
    return (f"--lora {spec}: export takes no weight after the LoRA (sample's DIR:WEIGHT); for a model with the LoRA "
            f"merged at that weight: --lora {where} --merge --weight {weight}")


def lora_dir_of(spec: str, merge: bool = False) -> Path:
    """``--lora``: the lora/ folder a run wrote, or the run folder that holds it (``merge``: export --merge's)."""
    path = Path(spec).expanduser()
    if not path.exists():
        where, _, weight = spec.rpartition(":")  # sample's DIR:WEIGHT
        if where and Path(where).expanduser().exists() and re.fullmatch(r"[-+]?[0-9.]+(e[-+]?[0-9]+)?", weight):
            raise UserError(export_weight_line(spec, where, weight))
        raise UserError(f"--lora {spec}: no such folder: pass the lora/ folder a run wrote (e.g. outputs/run/lora) "
                        "or the run folder")
    if (line := not_a_lora("--lora", spec, folder=path, takes=EXPORT_TAKES)) is not None:  # (said: a run that stopped)
        raise UserError(line)
    if path.is_file():
        if path.name == LORA_WEIGHT_NAME:
            return path.parent
        if path.suffix.lower() == ".safetensors":  # a kohya or diffusers export: nothing to convert
            try:  # (a model's file or an embedding was "a LoRA file already")
                line = not_a_lora("--lora", spec, read_safetensors_shapes(path), takes=EXPORT_TAKES)
            except (TensorFileError, OSError):
                line = None
            if line is not None:
                raise UserError(line)
            raise UserError(f"--lora {spec} is a LoRA file already: {ALREADY_MERGE if merge else ALREADY}")
        raise UserError(f"--lora {spec} is a file: pass the lora/ folder a run wrote (it holds {LORA_WEIGHT_NAME})")
    if not (path / LORA_WEIGHT_NAME).is_file() and (path / LORA_DIR / LORA_WEIGHT_NAME).is_file():
        return path / LORA_DIR  # the run folder
    return path


def read_lora(spec: str, merge: bool = False) -> Lora:
    """Read and check a LoRA folder. A missing or damaged one raises UserError naming what is wrong (``merge``: for
    export --merge, whose line for a LoRA of another format differs)."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    from lowmem_alignprop.run.checkpoint import named_checkpoint

    checkpoint = named_checkpoint(Path(spec).expanduser())
    if checkpoint is not None:
        return _read_checkpoint(checkpoint, spec)
    _check_named_step(Path(spec).expanduser(), spec)
    path = lora_dir_of(spec, merge)
    file = path / LORA_WEIGHT_NAME
    if not file.is_file():
        if is_peft_folder(path):
            raise UserError(f"--lora {spec} is a peft adapter folder (export --format peft's): "
                            f"{ALREADY_MERGE if merge else ALREADY}")
        from lowmem_alignprop.run.checkpoint import without_checkpoint

        if (said := without_checkpoint(path)) is not None:  # a run killed before its first checkpoint
            raise UserError(f"--lora {spec}: {said}")
        raise UserError(f"--lora {spec} holds no {LORA_WEIGHT_NAME}: pass the lora/ folder a finished run wrote "
                        "(an interrupted run resumes with --resume latest and writes it at the end)")
    try:
        header, raw = read_safetensors_metadata(file), read_tensor_file(file)
    except (TensorFileError, OSError) as e:  # a truncated or foreign file
        raise UserError(f"--lora {spec}: {not_safetensors(file, e)}: export from a complete lora/ folder (train "
                        "again, or copy it again)") from None
    component = denoiser_component(any(k.startswith("transformer.") for k in raw))  # (beside kept encoder layers)
    from lowmem_alignprop.models.kept_lora import split_kept

    raw, kept = _kept_encoder_layers(raw, header, spec)
    others = sorted(k for k in raw if not k.startswith(component + "."))
    if others:
        raise UserError(f"--lora {spec} holds layers outside the UNet or transformer (e.g. {quote(others[0])}): only "
                        "LoRAs of the denoiser (what lowmem-alignprop trains) export")
    if not raw:
        raise UserError(f"--lora {spec}: {file.name} holds no LoRA weights: export from a complete lora/ folder")
    weights = {k[len(component) + 1:]: v for k, v in raw.items()}
    if component == "unet":  # a UNet LoRA is in diffusers' older lora.down/up names; a transformer's in peft's
        weights = convert_unet_state_dict_to_peft(weights)
    bad = sorted(k for k in weights if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if bad:
        raise UserError(f"--lora {spec}: {file.name} holds {quote(bad[0])}, which is not a LoRA A/B weight: only "
                        "plain LoRA adapters export")
    config = _adapter_config(header, spec, component)
    weights, config, kept_unet = split_kept(component, weights, config)  # the run's kept layers: as they came
    kept = {**kept_unet, **kept}
    if kept and not weights:
        raise UserError(f"--lora {spec}: {file.name} holds no trained layers, only kept ones: export from a "
                        "complete lora/ folder")
    for name in sorted(weights):
        a_key = name.replace(".lora_B.", ".lora_A.")
        b_key = name.replace(".lora_A.", ".lora_B.")
        if a_key not in weights or b_key not in weights:
            raise UserError(f"--lora {spec}: {file.name} is damaged: {quote(name)} has no "
                            f"{'lora_B' if name == a_key else 'lora_A'} partner")
        a, b = weights[a_key], weights[b_key]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise UserError(f"--lora {spec}: {file.name} is damaged: {quote(a_key)} {tuple(a.shape)} and its lora_B "
                            f"{tuple(b.shape)} do not multiply")
        if not torch.isfinite(weights[name]).all():
            raise UserError(f"--lora {spec}: {quote(name)} holds NaN or inf: the run diverged; export a checkpoint "
                            "from before (lowmem-alignprop --resume DIR) or train with a lower learning rate")
    base = None
    if (path / LORA_BASE_FILE).is_file():
        try:
            from lowmem_alignprop.run.base_fingerprint import load_base_record
            base = load_base_record(path / LORA_BASE_FILE)
        except (OSError, ValueError) as e:
            raise UserError(f"--lora {spec}: {LORA_BASE_FILE} is damaged ({first_line(e, 80)}): export from a complete "
                            "lora/ folder") from None
    run = path.parent if any((path.parent / n).is_file() for n in (CONFIG_FILE, SUMMARY_FILE)) else None
    lora = Lora(path=path, weights=weights, config=config, base=base, run=run, kept=kept)
    if run is not None:
        lora.run_config, lora.summary = read_run(run)
        if path.name == BEST_DIR and (path / BEST_FILE).is_file():
            _as_best(lora)
    if component == "transformer":
        from lowmem_alignprop.lora import flow_export
        lora.family = flow_export.family_of_model(lora.base_model) or flow_export.family_of_weights(lora.modules)
    return lora


def _as_best(lora: Lora) -> None:
    """A run's best/ (--eval-every): the LoRA of step N, whose card, file name and grid are step N's, as a checkpoint
    of that step's are (not the finished run's steps, rewards and before/after grid)."""
    from lowmem_alignprop.run.runfolder import METRICS, best_record, first_last_rewards, read_metrics

    if (record := best_record(lora.path)) is None:
        return  # a damaged best.json: the run's figures, as before
    step = record["step"]
    rows = [row for row in read_metrics(lora.run / METRICS, until=step) if "reward_mean" in row]
    lora.step = step
    chosen = {k: v for k, v in record.items() if k in ("eval_reward", "eval_fidelity_score")
              and isinstance(v, (int, float)) and not isinstance(v, bool)}  # the card's "chosen as" row
    lora.summary = {"steps": step, "steps_done": step, **(first_last_rewards(rows) if rows else {}),
                    "best_evaluation": {"step": step, **chosen}}


def _read_checkpoint(checkpoint: Path, spec: str) -> Lora:
    """A training checkpoint's LoRA (checkpoints/step-N), as the run would have written it at that step: its card
    tells the steps and rewards up to N, and its files are named after the run and the step."""
    from lowmem_alignprop.models.loading import write_checkpoint_lora
    from lowmem_alignprop.run.checkpoint import read_state

    folder = write_checkpoint_lora(checkpoint, temporary_folder() / "lora").parent
    lora = read_lora(str(folder))
    state = read_state(checkpoint)
    run = checkpoint.parent.parent  # RUN/checkpoints/step-N
    lora.run = run if checkpoint.parent.name == CHECKPOINTS_DIR else None
    if lora.run is not None:
        lora.run_config, _ = read_run(run)
    lora.run_config = {**lora.run_config, **state.get("config", {})}
    lora.step = int(state["step"])
    lora.origin = checkpoint
    lora.starts = state.get("starts")  # (none in checkpoints written before it was recorded)
    history = [h for h in state.get("history", []) if isinstance(h, dict) and "reward_mean" in h]
    lora.summary = {"steps": lora.step, "steps_done": lora.step,
                    **{k: state[k] for k in ("resume_changes", "t5_tokens", "software", "start_dirs", "reward_sha")
                       if state.get(k)}}
    if history:  # as the trainer's summary compares them
        from lowmem_alignprop.run.runfolder import first_last_rewards
        since = int(state.get("reward_since") or 1)  # a resume that changed the reward: the steps it scored
        lora.summary.update(first_last_rewards(history, since, int(state.get("prompts_since") or 1)),
                            **({"reward_since_step": since} if since > 1 else {}))
    return lora


def _kept_encoder_layers(raw: dict, header: dict[str, str], spec: str) -> tuple[dict, dict]:
    """``raw`` without the text-encoder layers its run kept as its --init-lora had them, and those (the header's
    config of each encoder marks them: models/kept_lora.py). Another tool's text-encoder layers (their scale in their
    own config) stay in ``raw``: refused as outside the UNet, not exported at a scale they were not saved with."""
    from lowmem_alignprop.models.kept_lora import ENCODERS, split_kept

    kept: dict = {}
    for encoder in ENCODERS:
        layers = {k[len(encoder) + 1:]: v for k, v in raw.items() if k.startswith(encoder + ".")}
        if layers and header.get("lora_adapter_metadata"):
            kept.update(split_kept(encoder, layers, _adapter_config(header, spec, encoder))[2])
    return {k: v for k, v in raw.items() if k not in kept}, kept


def _adapter_config(header: dict[str, str], spec: str, component: str = "unet") -> dict[str, Any]:
    """The peft config saved in the header (``unet.``- or ``transformer.``-prefixed keys), else rank = alpha as
    diffusers assumes."""
    text = header.get("lora_adapter_metadata")
    if not text:
        log.warning("--lora %s carries no adapter config (lora_alpha): exported with alpha = rank, as diffusers "
                    "loads it", spec)
        return {}
    try:
        meta = json.loads(text)
    except ValueError:
        raise UserError(f"--lora {spec}: the adapter config in {LORA_WEIGHT_NAME} is damaged (not JSON): export "
                        "from a complete lora/ folder") from None
    config = {k[len(component) + 1:]: v for k, v in meta.items() if k.startswith(component + ".")}
    if config.get("use_dora"):
        raise UserError(f"--lora {spec} is a DoRA adapter: only plain LoRA exports")
    return config


def read_run(run: Path) -> tuple[dict, dict]:
    """A run folder's config.yaml and summary.json ({} for one missing or damaged)."""
    import yaml

    config, summary = {}, {}
    try:
        config = yaml.safe_load((run / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        pass
    try:
        summary = json.loads((run / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    return (config if isinstance(config, dict) else {}), (summary if isinstance(summary, dict) else {})


def _base_folder(spec: str) -> Path | None:
    """The diffusers folder of a UNet base model, when its files are here: a shipped architecture, tiny, a folder."""
    if spec in ("sd15", "sd21", "sdxl"):
        from lowmem_alignprop.models.arch import arch_config_dir
        return arch_config_dir(spec)
    if spec == "tiny":
        from lowmem_alignprop.models.tiny import tiny_model_dir
        return tiny_model_dir()
    return Path(spec).expanduser() if spec and Path(spec).expanduser().is_dir() else None


def v_prediction(lora: Lora) -> bool:
    """Whether the base model's UNet predicts v (SD 2.x at 768 px): as its run sampled it (base_model.json's record),
    else from its scheduler config when it is here."""
    if (recorded := (lora.base or {}).get("prediction_type")) in ("epsilon", "v_prediction"):
        return recorded == "v_prediction"
    from lowmem_alignprop.settings.paths import scheduler_prediction

    folder = _base_folder(lora.base_model or "")
    return folder is not None and scheduler_prediction(folder) == "v_prediction"


def zero_terminal_snr(lora: Lora) -> bool:
    """Whether its run sampled the base at zero terminal SNR: base_model.json's record of the schedule it sampled
    (the flag's, a folder's own, a single file's ztsnr key), else the run's flag."""
    return bool((lora.base or {}).get("zero_terminal_snr") or (lora.run_config or {}).get("zero_terminal_snr"))


# a LoRA file's header keys that say how its run sampled (lora/lora_formats.kohya_metadata writes them; sd-scripts
# writes the ss_ and modelspec. ones too): what `sample` of the file alone, with no base_model.json, renders with
HEADER_PREDICTION = "alignprop_prediction_type"  # our run's --set prediction_type (the base's files say otherwise)
HEADER_ZERO_SNR = "alignprop_zero_terminal_snr"
# the run's other image settings (resolution, steps, guidance, eta, negative prompt...), as JSON: a file shared alone
# samples as its run did (base_model.json's image_settings; a local path among them left out: it is the trainer's)
HEADER_IMAGE_SETTINGS = "alignprop_image_settings"
HEADER_REWARD = "alignprop_reward"  # the reward its run was scored with (a file or weights not at hand: the default)
HEADER_BASE_MODEL = "alignprop_base_model"  # the model its run trained on, as :func:`shared_name` names it
HEADER_LORA_DIGEST = "alignprop_lora_digest"  # :func:`lora_digest` of the LoRA it was exported from
KOHYA_MODEL_NAME = "ss_sd_model_name"  # sd-scripts': the model as its trainer was given it (often a file's name)
SHARED_IMAGE_SETTINGS = ("resolution", "sample_steps", "guidance_scale", "guidance_rescale", "eta",
                         "max_sequence_length", "negative_prompt", "t5_encoder", "vae")
KOHYA_V_PREDICTION = "ss_v_parameterization"  # "True"/"False"
KOHYA_ZERO_SNR = "ss_zero_terminal_snr"
KOHYA_V2 = "ss_v2"
MODELSPEC_PREDICTION = "modelspec.prediction_type"  # "v"/"epsilon"
MODELSPEC_ARCHITECTURE = "modelspec.architecture"


def header_image_settings(file: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(settings, keys): the prediction_type and zero_terminal_snr a LoRA file's header says its run sampled with, its
    other image settings (:data:`HEADER_IMAGE_SETTINGS`: plain values of :data:`SHARED_IMAGE_SETTINGS`), the reward
    it was scored with (:data:`HEADER_REWARD`), and the header key each came from; ({}, {}) for none (a file with no
    such header, not safetensors, or unreadable).
    A value other than the key's own words ("True"/"False", "v"/"epsilon", the config's prediction types) is ignored.
    v-prediction is taken from any of them; epsilon only from our run's own key or for an SD 2.x file (ss_v2, its
    architecture), whose single files load as v-prediction: elsewhere it is every file's default, and would turn a
    v-prediction model's own schedule off. A zero-SNR schedule is taken unless its run predicted epsilon (the config
    refuses that pair); "False" is the config's own default (as the model says)."""
    try:
        meta = read_safetensors_metadata(file) if is_safetensors(file) else {}
    except (TensorFileError, OSError):
        return {}, {}
    words = {HEADER_PREDICTION: {"epsilon": "epsilon", "v_prediction": "v_prediction"},
             KOHYA_V_PREDICTION: {"True": "v_prediction", "False": "epsilon"},
             MODELSPEC_PREDICTION: {"v": "v_prediction", "epsilon": "epsilon"}}
    said = [(key, words[key][meta[key]]) for key in words if meta.get(key) in words[key]]
    settings, keys = {}, {}
    sd2 = meta.get(KOHYA_V2) == "True" or str(meta.get(MODELSPEC_ARCHITECTURE, "")).startswith("stable-diffusion-v2")
    if said and (said[0][1] == "v_prediction" or said[0][0] == HEADER_PREDICTION or sd2):
        settings["prediction_type"], keys["prediction_type"] = said[0][1], said[0][0]
    zero = next(((key, meta[key]) for key in (HEADER_ZERO_SNR, KOHYA_ZERO_SNR) if meta.get(key) in ("True", "False")),
                None)
    if zero is not None and zero[1] == "True" and not (said and said[0][1] == "epsilon"):
        settings["zero_terminal_snr"] = True
        keys["zero_terminal_snr"] = zero[0]
    for key, value in _json_object(meta.get(HEADER_IMAGE_SETTINGS)).items():
        if key in SHARED_IMAGE_SETTINGS and isinstance(value, (str, int, float, bool)):  # (the config checks them)
            settings[key], keys[key] = value, HEADER_IMAGE_SETTINGS
    if meta.get(HEADER_REWARD):
        settings["reward"], keys["reward"] = meta[HEADER_REWARD], HEADER_REWARD
    return settings, keys


def header_lora_digest(file: Path) -> str | None:
    """The digest of the LoRA a file was exported from (:data:`HEADER_LORA_DIGEST`), None where its header has none."""
    try:
        digest = read_safetensors_metadata(file).get(HEADER_LORA_DIGEST) if is_safetensors(file) else None
    except (TensorFileError, OSError):
        return None
    return digest if isinstance(digest, str) and digest else None


def header_base_model(file: Path) -> tuple[str | None, str]:
    """(model, said): the base model a LoRA file's header names, where ``sample`` of the file alone can take it: a
    shipped name or a hub id (:data:`HEADER_BASE_MODEL`; not a run's own folder, ``run/lora``, that
    :func:`shared_name` writes so), else None and what the header says for the line on the default model: a local
    folder's or file's last part (ours, or sd-scripts' ss_sd_model_name, which is never taken); "" for none."""
    from lowmem_alignprop.settings.model_kind import NAMED_KINDS, SINGLE_FILE_SUFFIXES
    from lowmem_alignprop.settings.paths import looks_like_hub_id

    try:
        meta = read_safetensors_metadata(file) if is_safetensors(file) else {}
    except (TensorFileError, OSError):
        return None, ""
    ours = str(meta.get(HEADER_BASE_MODEL) or "").strip()
    if ours in NAMED_KINDS or looks_like_hub_id(ours) and Path(ours).name not in (LORA_DIR, BEST_DIR):
        return ours, ""
    key, name = next(((k, str(meta[k]).strip()) for k in (HEADER_BASE_MODEL, KOHYA_MODEL_NAME)
                      if str(meta.get(k) or "").strip()), ("", ""))
    if not name:
        return None, ""
    what = "a file" if name.lower().endswith(SINGLE_FILE_SUFFIXES) else \
        "a hub id or a folder" if key == KOHYA_MODEL_NAME and looks_like_hub_id(name) else "a folder"
    return None, f"its header ({key}) says it was trained on {name} ({what} on the training machine): pass --model PATH"


def shared_image_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A run's image settings (base_model.json's image_settings) as a LoRA file's header shares them
    (:data:`HEADER_IMAGE_SETTINGS`): a path on the machine that trained (a VAE file or folder) left out, a hub id kept;
    the prediction type and zero SNR have their own keys (as the run resolved them)."""
    from lowmem_alignprop.settings.paths import looks_like_hub_id

    return {k: v for k, v in settings.items() if k in SHARED_IMAGE_SETTINGS and (
        k != "vae" or looks_like_hub_id(str(v)) and not Path(str(v)).expanduser().exists())}


def _json_object(text: str | None) -> dict[str, Any]:
    """A header value holding a JSON object, else {} (none, damaged, not an object)."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def base_family(lora: Lora) -> str:
    """kohya's ss_base_model_version: from the base model's UNet config when it is a local folder, else from the
    width of the cross-attention inputs (768 SD1.x, 1024 SD2.x, 2048 SDXL); SD3/FLUX as sd-scripts writes them."""
    if lora.flow:
        from lowmem_alignprop.lora import flow_export
        return flow_export.base_model_version(lora.family, lora.base_model, lora.modules, lora.model_components,
                                              lora.components_revision)
    spec = lora.base_model or ""
    known = {"sd15": SD_V1, "sd21": SD_V2, "sdxl": SDXL}
    if spec in known:
        return known[spec]
    folder = _base_folder(spec)
    if folder is not None and (folder / FULL_DIR / "config.json").is_file():
        try:
            conf = json.loads((folder / FULL_DIR / "config.json").read_text(encoding="utf-8"))
            if conf.get("addition_embed_type") == "text_time":
                return SDXL
            return SD_V2 if conf.get("cross_attention_dim") == 1024 else SD_V1
        except (OSError, ValueError):
            pass
    widths = {w.shape[1] for k, w in lora.weights.items() if ".attn2.to_k.lora_A" in k}
    return SDXL if 2048 in widths else SD_V2 if 1024 in widths else SD_V1


def denoiser_name(lora: Lora) -> str:
    """The LoRA's denoiser with its family: ``UNet``, ``SD3 transformer`` or ``FLUX transformer``."""
    return {"unet": "", "sd3": "SD3 ", "flux": "FLUX "}[lora.family] + denoiser_label(lora.flow)


def shared_name(model: str) -> str:
    """A model or file as a header shared with the LoRA names it: a local path by its last part (as sd-scripts
    writes it: a user's folders stay theirs; a run's own folder, lora/ or checkpoints/step-N, with its run's name),
    a hub id or a shipped name as it is; a local folder named like a shipped model, ``./sdxl``: not that model."""
    from lowmem_alignprop.settings.model_kind import NAMED_KINDS

    path = Path(model).expanduser()
    if not (model and (path.is_absolute() or path.exists())):
        return model
    if path.name in (LORA_DIR, BEST_DIR):  # (every run's LoRA folder is called so)
        return f"{path.parent.name}/{path.name}"
    from lowmem_alignprop.run.checkpoint import step_of

    if step_of(path) is not None and len(path.parents) > 1:
        return f"{path.parents[1].name}/{path.parent.name}/{path.name}"
    return f"./{path.name}" if path.name in NAMED_KINDS else path.name


def shared_names(spec: Any, seps: str = "") -> Any:
    """Each path in a list of them (``seps``: the separators, outermost first: "a,b" with ","; "aesthetic=A;clip=B,C"
    with ";=,") by :func:`shared_name`; anything not a string as it is."""
    if not isinstance(spec, str) or not seps:
        return shared_name(spec) if isinstance(spec, str) else spec
    return seps[0].join(shared_names(part, seps[1:]) for part in spec.split(seps[0]))


SHARED_SEPARATORS = {"reward": ",", "reward_weights": ";=,"}  # a setting of several paths: its terms', outermost first


def shared_setting(name: str, value: Any) -> Any:
    """A run setting's value as a file or card shared with others gives it: each local path in it by its name
    (:func:`shared_names`; a reward's and its weights' terms each), everything else as it is."""
    return shared_names(value, SHARED_SEPARATORS.get(name, ""))


def shared_reward(reward: Any) -> str:
    """A run's reward as a file shared with others names it (a header's HEADER_REWARD): a reward file's terms,
    ``DIR/file.py:fn[:weight]``, by their last part; the named rewards as they are."""
    return str(shared_setting("reward", str(reward or "")))


def shared_base_record(record: dict[str, Any]) -> dict[str, Any]:
    """base_model.json as a folder pushed to the hub shares it (run/hub.push_to_hub; the local file keeps its paths,
    ``sample`` here reads them): the base model and a transformer file's other parts by :func:`shared_name`, a local
    VAE left out as the header leaves it (:func:`shared_image_settings`), a reward file, the reward's weights and a
    prompt file by name; hub ids, shipped names and the fingerprint as recorded."""
    shared = {**record, **({"model": shared_names(record["model"])} if "model" in record else {})}
    if isinstance(settings := record.get("image_settings"), dict):
        shared["image_settings"] = {k: shared_names(v) if k == "model_components" else v for k, v in settings.items()
                                    if k != "vae" or shared_image_settings({k: v})}
    if isinstance(scoring := record.get("scoring"), dict):  # (a reward term 'DIR/file.py:fn[:weight]': its last part)
        shared["scoring"] = {**scoring, **{k: shared_setting(k, scoring[k]) for k in ("reward", "reward_weights",
                                                                                      "prompts") if k in scoring}}
    return shared


# LyCORIS's own weights (a1111's and ComfyUI's LyCORIS loaders read them; diffusers' LoRA reader reads none): kind, by
# the name after the layer's
_LYCORIS = (("LoHa", re.compile(r"\.hada_(w[12]_[ab]|t[12])$")), ("LoKr", re.compile(r"\.lokr_(w[12](_[ab])?|t[12])$")),
            ("OFT", re.compile(r"\.oft_(blocks|diag)$")))  # (.diff/.diff_b: kohya_layers.WEIGHT_DIFFERENCES)


def lycoris_kind(keys) -> str | None:
    """"LyCORIS LoHa weights (e.g. 'k')" for a file (its tensor names ``keys``) holding LyCORIS's weights of another
    kind than LoRA, in whole or in part; else None. diffusers' reader fails on them with a line that blames the base
    model."""
    for kind, pattern in _LYCORIS:
        if (key := next((k for k in sorted(keys) if pattern.search(k)), None)) is not None:
            return f"LyCORIS {kind} weights (e.g. {quote(key)})"
    return None


# a key of an adapter of any kind (LoRA, LyCORIS, ComfyUI's differences, a DoRA's magnitudes): a file with none is
# something else
_ADAPTER_KEY = re.compile(r"lora|hada_|lokr_|oft_|\.diff(_b)?$|dora_scale|magnitude|\.alpha$", re.IGNORECASE)
# a textual-inversion embedding's tensor names: A1111's .safetensors (emb_params), SDXL's (clip_l, clip_g), the .pt's
_EMBEDDING_KEYS = {"emb_params", "clip_l", "clip_g", "string_to_param", "string_to_token", "name", "step",
                   "sd_checksum", "sd_checksum_string"}


# diffusers' own textual-inversion file (its example's learned_embeds.safetensors / .bin, what load_textual_inversion
# reads): one tensor per placeholder token, named by it ("<cat-toy>"), of the text encoder's width: CLIP ViT-L's (SD
# 1.x, SDXL's first), OpenCLIP ViT-H's (SD 2.x), OpenCLIP ViT-bigG's (SDXL's second)
_TOKEN_KEY = re.compile(r"<[^<>\s]+>")
_TEXT_ENCODER_WIDTHS = (768, 1024, 1280)


def _token_embeddings(keys) -> bool:
    """Whether a file's tensors (``keys``: name -> shape or tensor) are all token embeddings in diffusers' layout:
    every name a placeholder token (<...>), every tensor 1-D or 2-D (one row per vector) of a text encoder's width.
    Names alone (no shapes) tell nothing."""
    if not isinstance(keys, dict) or not keys:
        return False
    shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else v for v in keys.values()]
    return all(isinstance(k, str) and _TOKEN_KEY.fullmatch(k) for k in keys) and all(
        isinstance(s, (tuple, list)) and len(s) in (1, 2) and s[-1] in _TEXT_ENCODER_WIDTHS and all(s)
        for s in shapes)


def not_an_adapter(keys) -> str | None:
    """What a file that is no adapter at all holds (its tensor names ``keys``; a dict of names -> shapes or tensors
    tells diffusers' own embeddings too): "a textual-inversion embedding (...)" or "a model's own weights (e.g.
    'k'), not a LoRA's"; None where it holds an adapter's keys, or none of those things (an empty file: the caller's
    "no LoRA weights"). A full checkpoint's names passed a LoRA check's look for feed-forward or transformer layers,
    and were refused with a fix for a LoRA of those."""
    token_embeddings = _token_embeddings(keys)
    keys = sorted(map(str, keys))  # (a torch file's dict may have other keys: {0: tensor})
    if not keys or any(_ADAPTER_KEY.search(k) for k in keys):
        return None
    if set(keys) <= _EMBEDDING_KEYS or token_embeddings:
        return f"a textual-inversion embedding ({', '.join(map(quote, keys))}), not a LoRA"
    weight = next((k for k in keys if k.endswith((".weight", ".bias"))), None)
    return None if weight is None else f"a model's own weights (e.g. {quote(weight)}), not a LoRA's lora_down / lora_A"


# the weight files of one model's folder, as diffusers (a UNet's, a transformer's, a VAE's: their fp16 variants and
# shards too) and transformers (a text encoder's) save them beside its config.json
_MODEL_WEIGHTS = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin", "model*.safetensors",
                  "pytorch_model*.bin")


def model_part_folder(folder: Path) -> str | None:
    """The first weight file of one model's folder (a pipeline's unet/ or transformer/, a text encoder's: its
    config.json beside diffusers' or transformers' weight files), else None. A LoRA folder holds neither (a peft
    folder's files are adapter_config.json and adapter_model.safetensors)."""
    if not (folder / "config.json").is_file() or (folder / LORA_WEIGHT_NAME).is_file():
        return None
    found = sorted((len(f.name), f.name) for pattern in _MODEL_WEIGHTS for f in folder.glob(pattern)
                   if f.is_file())
    return found[0][1] if found else None  # (the shortest: the weights, not their fp16 variant)


# what each option given no LoRA takes (the end of not_a_lora's line)
EXPORT_TAKES = "export --lora takes the LoRA a run wrote (its lora/ folder or a checkpoint)"


def not_a_lora(option: str, spec: str, keys=(), folder: Path | None = None, takes: str = "") -> str | None:
    """The one line for a LoRA option (``--init-lora``, ``sample --lora``, ``export --lora``: ``takes`` says what it
    takes, :data:`EXPORT_TAKES`) given no adapter at all: a diffusers model ``folder`` (its model_index.json) or one
    model's folder (:func:`model_part_folder`), or a file whose tensor names ``keys`` are a full model's or a
    textual-inversion embedding's (:func:`not_an_adapter`): what it is and where it goes. None for anything else (a
    LoRA, or a file the option's own checks describe)."""
    takes = takes or (f"{option} {'starts from' if option == '--init-lora' else 'takes'} a LoRA (a run's lora/ "
                      "folder, or a diffusers, kohya or peft LoRA file)")
    if folder is not None and (folder / "model_index.json").is_file():  # (its weights are in its subfolders)
        return (f"{option} {spec} is a diffusers model folder (its model_index.json), not a LoRA: a full (or merged) "
                f"model goes to --model; {takes}")
    if folder is not None and (weights := model_part_folder(folder)) is not None:  # (export: "an interrupted run")
        return (f"{option} {spec} is a model's own folder (its config.json beside {weights}), not a LoRA: a full (or "
                f"merged) model goes to --model; {takes}")
    if (what := not_an_adapter(keys)) is None:
        return None
    fix = ("a trained concept's embedding, which diffusers' load_textual_inversion reads" if "embedding" in what else
           "a full (or merged) model goes to --model")
    return f"{option} {spec} holds {what}: {fix}; {takes}"


def nonfinite(tensors) -> str | None:
    """The first of a LoRA's weights (name -> tensor) holding NaN or inf (a run that diverged), else None: its images
    would be NaN, and their rewards too."""
    return next((k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


def temporary_folder() -> Path:
    import atexit

    tmp = Path(tempfile.mkdtemp(prefix="lowmem-alignprop-lora-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return tmp


def safetensors_copy(tensors: dict) -> Path:
    """A LoRA's tensors (a torch pickle's, read with weights_only) as diffusers' one ``.safetensors`` file in a
    temporary folder (removed when the process ends): what every converter of another tool's names reads."""
    from safetensors.torch import save_file

    out = temporary_folder() / LORA_WEIGHT_NAME
    save_file({str(k): v.detach().clone().contiguous() for k, v in tensors.items()}, str(out))  # (no shared storage)
    return out


def lora_digest(lora: Lora) -> str:
    """What identifies a LoRA's weights whichever folder or format holds them: a hash of its tensors' names and
    values, the layers its run kept as its --init-lora had them too (after the trained ones: a LoRA without any
    has the digest it always had)."""
    import hashlib

    h = hashlib.sha256()
    for layers in (lora.weights, lora.kept):
        for name in sorted(layers):
            h.update(name.encode())
            h.update(layers[name].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

"""The LoRA where users go: a run's ``lora/`` folder exported for other tools, with a model card.

Formats (``lowmem-alignprop export --format ...``):

* ``diffusers`` -- what a run writes (``pytorch_lora_weights.safetensors``, ``unet.*`` keys, the peft config in
  the header): ``pipe.load_lora_weights(DIR)``.
* ``kohya`` -- one ``.safetensors`` with ``lora_unet_<module path, dots as underscores>`` keys and
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` per adapted layer: what ComfyUI (models/loras),
  AUTOMATIC1111/Forge (models/Lora), InvokeAI and ``pipe.load_lora_weights(FILE)`` read. Those loaders apply
  ``alpha / dim * up @ down`` with ``dim`` the rows of ``lora_down``; peft applies ``lora_alpha / r * B @ A``
  (``lora_alpha / sqrt(r)`` with rsLoRA; per layer through ``alpha_pattern``/``rank_pattern``). diffusers'
  own converter (``convert_state_dict_to_kohya``) writes ``alpha = dim`` -- right only when alpha equals the
  rank -- so each ``.alpha`` is set here to ``scale * dim``, the trained scale. The header carries kohya's
  ``ss_*`` fields and ours (``alignprop_*``).
* ``peft`` -- a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, keys
  ``base_model.model.<module>.lora_A.weight``): ``PeftModel.from_pretrained(unet, DIR)``.
* ``--merge`` -- the base model with ``W * scale * B @ A`` added to each adapted weight (diffusers'
  ``fuse_lora(lora_scale=W)`` then ``unload_lora_weights``), saved as a diffusers directory, or with
  ``--single-file`` as one ``.safetensors`` in the original LDM layout (models/ldm_layout.py) that AUTOMATIC1111
  (models/Stable-diffusion), ComfyUI (models/checkpoints) and ``from_single_file`` load.

Every export writes a ``README.md`` model card (the hub's format: YAML front matter, then the run's numbers).
Each export is written to a temporary folder beside ``--out`` and renamed into place when complete, so bad
input, or a failure half-way, leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowmem_alignprop.settings.config import EXPORT_FORMATS
from lowmem_alignprop.run.filenames import COMMAND_FILE, LORA_BASE_FILE, LORA_WEIGHT_NAME
from lowmem_alignprop.settings.errors import UserError, first_line, quote

log = logging.getLogger("lowmem_alignprop")

FORMATS = EXPORT_FORMATS  # the same list as the export_format config field's
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # what a merged model is saved in
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
CARD_NAME = "README.md"
GRID_NAME = "before_after.png"
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
# kohya's ss_base_model_version values
SD_V1, SD_V2, SDXL = "sd_v1", "sd_v2", "sdxl_base_v1-0"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass
class Lora:
    """A LoRA folder a run wrote, read and checked: peft-named UNet weights and the adapter's config."""
    path: Path                      # the lora/ folder
    weights: dict[str, torch.Tensor]  # peft names without prefix: down_blocks.1...to_q.lora_A.weight
    config: dict[str, Any]          # the peft LoraConfig (r, lora_alpha, target_modules, ...)
    base: dict[str, Any] | None     # base_model.json: the fingerprint of the model it was trained on
    run: Path | None                # the run folder (config.yaml / summary.json), when there is one
    run_config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    step: int | None = None         # a training checkpoint's step (export of checkpoints/step-N), else None
    family: str = "unet"            # unet (SD 1.x/2.x/SDXL), sd3 (SD3/SD3.5) or flux (FLUX.1): which denoiser

    @property
    def flow(self) -> bool:
        return self.family != "unet"

    @property
    def component(self) -> str:
        """The pipeline component the LoRA adapts (its keys' prefix in diffusers' layout)."""
        return "transformer" if self.flow else "unet"

    @property
    def modules(self) -> list[str]:
        """The adapted layers' module paths (``down_blocks.1.attentions.0...attn1.to_q``), sorted."""
        return sorted(k[: -len(".lora_A.weight")] for k in self.weights if k.endswith(".lora_A.weight"))

    @property
    def base_model(self) -> str | None:
        return (self.base or {}).get("model") or self.run_config.get("model")

    def scale(self, module: str) -> float:
        """The factor peft applies to ``B @ A`` in ``module`` (what a trained LoRA means)."""
        from peft.utils.other import get_pattern_key

        rank = self.weights[f"{module}.lora_A.weight"].shape[0]
        alphas = self.config.get("alpha_pattern") or {}
        alpha = alphas.get(get_pattern_key(alphas.keys(), module), self.config.get("lora_alpha") or rank)
        return float(alpha) / (math.sqrt(rank) if self.config.get("use_rslora") else rank)


# ---------------------------------------------------------------------------------------------------------
# reading and checking a LoRA folder
# ---------------------------------------------------------------------------------------------------------

def lora_dir_of(spec: str) -> Path:
    """``--lora``: the lora/ folder a run wrote, or the run folder that holds it."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"--lora {spec}: no such folder: pass the lora/ folder a run wrote (e.g. outputs/run/lora) "
                        "or the run folder")
    if path.is_file():
        if path.name == LORA_WEIGHT_NAME:
            return path.parent
        raise UserError(f"--lora {spec} is a file: pass the lora/ folder a run wrote (it holds {LORA_WEIGHT_NAME})")
    if not (path / LORA_WEIGHT_NAME).is_file() and (path / "lora" / LORA_WEIGHT_NAME).is_file():
        return path / "lora"  # the run folder
    return path


def read_lora(spec: str) -> Lora:
    """Read and check a LoRA folder. A missing or damaged one raises UserError naming what is wrong."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors import safe_open

    from lowmem_alignprop.run.checkpoint import named_checkpoint

    checkpoint = named_checkpoint(Path(spec).expanduser())
    if checkpoint is not None:
        return _read_checkpoint(checkpoint, spec)
    path = lora_dir_of(spec)
    file = path / LORA_WEIGHT_NAME
    if not file.is_file():
        raise UserError(f"--lora {spec} holds no {LORA_WEIGHT_NAME}: pass the lora/ folder a finished run wrote "
                        "(an interrupted run resumes with --resume latest and writes it at the end)")
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise UserError(f"--lora {spec}: {file.name} is damaged or not a safetensors file ({first_line(e, 120)}): "
                        "export from a complete lora/ folder (train again, or copy it again)") from None
    component = "transformer" if raw and all(k.startswith("transformer.") for k in raw) else "unet"
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
            base = json.loads((path / LORA_BASE_FILE).read_text())
            if not isinstance(base, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise UserError(f"--lora {spec}: {LORA_BASE_FILE} is damaged ({first_line(e, 80)}): export from a complete "
                            "lora/ folder") from None
    run = path.parent if any((path.parent / n).is_file() for n in ("config.yaml", "summary.json")) else None
    lora = Lora(path=path, weights=weights, config=config, base=base, run=run)
    if run is not None:
        lora.run_config, lora.summary = _read_run(run)
    if component == "transformer":
        from lowmem_alignprop.commands import flow_export
        lora.family = flow_export.family_of_model(lora.base_model) or flow_export.family_of_weights(lora.modules)
    return lora


def _read_checkpoint(checkpoint: Path, spec: str) -> Lora:
    """A training checkpoint's LoRA (checkpoints/step-N), as the run would have written it at that step: its card
    tells the steps and rewards up to N, and its files are named after the run and the step."""
    from lowmem_alignprop.models.loading import write_checkpoint_lora
    from lowmem_alignprop.run.checkpoint import read_state

    folder = write_checkpoint_lora(checkpoint, _temporary_folder() / "lora").parent
    lora = read_lora(str(folder))
    state = read_state(checkpoint)
    run = checkpoint.parent.parent  # RUN/checkpoints/step-N
    lora.run = run if checkpoint.parent.name == "checkpoints" else None
    if lora.run is not None:
        lora.run_config, _ = _read_run(run)
    lora.run_config = {**lora.run_config, **state.get("config", {})}
    lora.step = int(state["step"])
    history = [h for h in state.get("history", []) if isinstance(h, dict) and "reward_mean" in h]
    lora.summary = {"steps": lora.step, "steps_done": lora.step}
    if history:  # as the trainer's summary compares them
        from lowmem_alignprop.run.runfolder import first_last_rewards
        lora.summary.update(first_last_rewards(history))
    return lora


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


def _read_run(run: Path) -> tuple[dict, dict]:
    import yaml

    config, summary = {}, {}
    try:
        config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        pass
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        pass
    return (config if isinstance(config, dict) else {}), (summary if isinstance(summary, dict) else {})


def base_family(lora: Lora) -> str:
    """kohya's ss_base_model_version: from the base model's UNet config when it is a local folder, else from the
    width of the cross-attention inputs (768 SD1.x, 1024 SD2.x, 2048 SDXL); SD3/FLUX as sd-scripts writes them."""
    if lora.flow:
        from lowmem_alignprop.commands import flow_export
        return flow_export.base_model_version(lora.family, lora.base_model, lora.modules)
    spec = lora.base_model or ""
    known = {"sd15": SD_V1, "sd21": SD_V2, "sdxl": SDXL}
    if spec in known:
        return known[spec]
    folder = None
    if spec == "tiny":
        from lowmem_alignprop.models.tiny import tiny_model_dir
        folder = tiny_model_dir()
    elif spec and Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
    if folder is not None and (folder / "unet" / "config.json").is_file():
        try:
            conf = json.loads((folder / "unet" / "config.json").read_text())
            if conf.get("addition_embed_type") == "text_time":
                return SDXL
            return SD_V2 if conf.get("cross_attention_dim") == 1024 else SD_V1
        except (OSError, ValueError):
            pass
    widths = {w.shape[1] for k, w in lora.weights.items() if ".attn2.to_k.lora_A" in k}
    return SDXL if 2048 in widths else SD_V2 if 1024 in widths else SD_V1


# ---------------------------------------------------------------------------------------------------------
# the formats
# ---------------------------------------------------------------------------------------------------------

def kohya_state_dict(lora: Lora) -> dict[str, torch.Tensor]:
    """``lora_unet_*`` keys (diffusers' converter) with each ``.alpha`` set to the trained scale times the rank;
    SD3/FLUX in their original module names, q/k/v fused (commands/flow_export.py)."""
    from diffusers.utils import convert_state_dict_to_kohya

    if lora.flow:
        from lowmem_alignprop.commands import flow_export
        return flow_export.kohya_state_dict(lora.weights, lora.scale, lora.family)

    converted = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in lora.weights.items()})
    for module in lora.modules:
        name = kohya_name(module)
        rank = converted[f"{name}.lora_down.weight"].shape[0]
        converted[f"{name}.alpha"] = torch.tensor(lora.scale(module) * rank, dtype=torch.float32)
    return {k: v.contiguous() for k, v in converted.items()}


def kohya_name(module: str) -> str:
    """The kohya name of a UNet module path: ``lora_unet_`` and the path with dots as underscores."""
    return "lora_unet_" + module.replace(".", "_")


def kohya_metadata(lora: Lora) -> dict[str, str]:
    ranks = sorted({lora.weights[f"{m}.lora_A.weight"].shape[0] for m in lora.modules})
    alpha = lora.config.get("lora_alpha") or ranks[0]
    if lora.config.get("use_rslora"):
        alpha = lora.scale(lora.modules[0]) * ranks[0]
    info = run_info(lora)
    meta = {
        "ss_base_model_version": base_family(lora),
        # sd-scripts' module for the family (its SD3/FLUX LoRAs come from networks/lora_sd3.py and lora_flux.py)
        "ss_network_module": {"sd3": "networks.lora_sd3", "flux": "networks.lora_flux"}.get(lora.family,
                                                                                               "networks.lora"),
        "ss_network_dim": str(ranks[0] if len(ranks) == 1 else max(ranks)),
        "ss_network_alpha": _num(alpha),
        "ss_sd_model_name": str(lora.base_model or ""),
        "ss_training_comment": f"AlignProp reward fine-tuning with lowmem-alignprop ({_what(lora)} LoRA only)",
        "alignprop_base_model": str(lora.base_model or ""),
        "alignprop_reward": str(info.get("reward", "")),
        "alignprop_steps": str(info.get("steps", "")),
        "alignprop_target_modules": ",".join(sorted(lora.config.get("target_modules") or [])),
    }
    if info.get("reward_last") is not None:
        meta["alignprop_final_reward"] = _num(info["reward_last"])
    if lora.flow:  # what sd-scripts writes beside it for these families
        from lowmem_alignprop.commands import flow_export
        meta["modelspec.architecture"] = flow_export.architecture(lora.family, lora.base_model, lora.modules)
    return meta


def _what(lora: Lora) -> str:
    return {"unet": "UNet", "sd3": "SD3 transformer", "flux": "FLUX transformer"}[lora.family]


def write_kohya(lora: Lora, folder: Path, name: str) -> Path:
    from safetensors.torch import save_file

    path = folder / f"{name}.safetensors"
    save_file(kohya_state_dict(lora), str(path), metadata=kohya_metadata(lora))
    return path


def peft_config(lora: Lora):
    """The adapter's LoraConfig (peft's own class), naming the base model."""
    from peft import LoraConfig

    known = set(LoraConfig.__dataclass_fields__)
    values = {k: v for k, v in lora.config.items() if k in known and k not in ("peft_type", "peft_version")}
    if not values:  # no config saved: the layers and rank the file shows, alpha = rank
        rank = lora.weights[f"{lora.modules[0]}.lora_A.weight"].shape[0]
        values = {"r": rank, "lora_alpha": rank, "target_modules": sorted({m.split(".")[-1] if not m.endswith(
            ".0") else ".".join(m.split(".")[-2:]) for m in lora.modules})}
    values["base_model_name_or_path"] = lora.base_model if _is_hub_id(lora.base_model) else None
    values["inference_mode"] = True
    return LoraConfig(**values)


def write_peft(lora: Lora, folder: Path) -> list[Path]:
    from safetensors.torch import save_file

    peft_config(lora).save_pretrained(str(folder))
    save_file({PEFT_PREFIX + k: v.contiguous() for k, v in lora.weights.items()}, str(folder / PEFT_WEIGHT_NAME),
              metadata={"format": "pt"})
    return [folder / "adapter_config.json", folder / PEFT_WEIGHT_NAME]


def write_diffusers(lora: Lora, folder: Path) -> list[Path]:
    shutil.copy2(lora.path / LORA_WEIGHT_NAME, folder / LORA_WEIGHT_NAME)
    out = [folder / LORA_WEIGHT_NAME]
    if (lora.path / LORA_BASE_FILE).is_file():
        shutil.copy2(lora.path / LORA_BASE_FILE, folder / LORA_BASE_FILE)
        out.append(folder / LORA_BASE_FILE)
    return out


# ---------------------------------------------------------------------------------------------------------
# merging into the base model
# ---------------------------------------------------------------------------------------------------------

def merge_base(lora: Lora, model: str | None) -> str:
    """The base model to merge into: ``--model`` or the one the LoRA was trained on (base_model.json)."""
    spec = model or lora.base_model
    if not spec:
        raise UserError(f"--merge: {lora.path} does not say which base model it was trained on (no {LORA_BASE_FILE}): "
                        "pass it with --model")
    from lowmem_alignprop.models.loading import resolve_model

    kind, _ = resolve_model(spec)
    if kind in ("arch", "flow_arch"):
        raise UserError(f"--merge onto {spec}: that is an architecture with random weights, not a model: pass the "
                        "model the LoRA was trained on with --model")
    return spec


def load_base(spec: str, run_config: dict | None = None):
    """The base model's diffusers pipeline, loaded in full (every component: the merged model is complete). SD3/FLUX
    load as training loads them (a transformer file takes the run's model_components), in fp32."""
    from lowmem_alignprop.run import hub
    from lowmem_alignprop.models.loading import hub_message, resolve_model
    from lowmem_alignprop.models.pipeline_load import load_pipeline

    kind, where = resolve_model(spec)
    components = (run_config or {}).get("model_components") or ""
    if kind.startswith("flow") or (kind == "file" and components):
        from lowmem_alignprop.models.family import family_for
        from lowmem_alignprop.models.loading import load_components
        from lowmem_alignprop.settings.config import Config

        comps = load_components(Config(model=spec, model_components=components,
                                       t5_encoder=(run_config or {}).get("t5_encoder", True)))
        return family_for(comps).make_pipeline(comps)
    if kind == "tiny":
        from lowmem_alignprop.models.tiny import tiny_model_dir
        kind, where = "dir", str(tiny_model_dir())
    try:
        if kind == "file":
            from lowmem_alignprop.models.arch import load_single_file
            return load_single_file(where, torch_dtype=torch.float32)
        if kind == "hub":
            hub.offline()
        return load_pipeline(where, hub_id=kind == "hub")
    except UserError:
        raise
    except (OSError, ValueError) as e:
        if kind == "hub":
            raise UserError(hub_message("model", where, e, use="pass --model DIR")) from None
        raise UserError(f"--merge: could not load base model {spec!r}: {first_line(e)}") from None


def merged_pipeline(lora: Lora, model: str | None, weight: float):
    """The base pipeline with the LoRA fused at ``weight``; a LoRA of another base model raises UserError."""
    from lowmem_alignprop.run import checkpoint as ckpt
    from lowmem_alignprop.commands.evaluate import LoraSpec, load_adapters

    spec = merge_base(lora, model)
    pipe = load_base(spec, lora.run_config)
    unet = getattr(pipe, lora.component, None)
    if unet is None or not hasattr(pipe, "load_lora_weights"):
        theirs = "a UNet model (SD 1.x, 2.x or SDXL)" if not lora.flow else "an SD3/SD3.5 or FLUX.1 model"
        raise UserError(f"--merge onto {spec}: the LoRA adapts {theirs} and {spec} is not one: pass the model it was "
                        "trained on with --model")
    if lora.base:
        ours = ckpt.fingerprint(type("Cfg", (), {"model": spec}), unet)
        problem = ckpt.fingerprint_difference(lora.base, ours)
        if problem:
            raise UserError(f"--merge: {lora.path} was trained on base model {lora.base.get('model')!r}, and {problem} "
                            f"in {spec!r}: merge it into the model it was trained on (leave --model out, or pass "
                            f"--model {lora.base.get('model')})")
    load_adapters(pipe, [LoraSpec(arg=str(lora.path), file=lora.path / LORA_WEIGHT_NAME, weight=weight,
                                  name="alignprop")], spec)  # a LoRA of other layer shapes: one line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.fuse_lora(lora_scale=weight, components=[lora.component], adapter_names=["alignprop"])
        pipe.unload_lora_weights()
    return pipe


def write_single_file(lora: Lora, pipe, folder: Path, weight: float | None) -> Path:
    """The merged pipeline as one original-layout (LDM) checkpoint; its header names the base model, the LoRA's
    weight in it, the run's reward and steps. SD3/SD3.5 and FLUX.1: the merged transformer alone, in Stability's
    MMDiT or Black Forest Labs' layout (models/flow_layout.py; the text encoders and VAE are the base model's)."""
    from safetensors.torch import save_file

    from lowmem_alignprop.models.ldm_layout import pipeline_to_ldm

    info = run_info(lora)
    path = folder / f"{_file_stem(lora).removesuffix('_lora')}_merged.safetensors"
    if lora.family == "flux":
        from lowmem_alignprop.models.flow_layout import flux_to_original
        state = {k: v.contiguous() for k, v in flux_to_original(pipe.transformer.state_dict()).items()}
    elif lora.flow:
        from lowmem_alignprop.models.flow_layout import sd3_to_original
        state = sd3_to_original(pipe.transformer.state_dict(), pipe.transformer.config.num_layers)
    else:
        state = pipeline_to_ldm(pipe)
    save_file(state, str(path), metadata={
        "format": "pt", "alignprop_base_model": str(lora.base_model or ""),
        "alignprop_lora_weight": _num(1.0 if weight is None else weight),
        "alignprop_reward": str(info.get("reward", "")), "alignprop_steps": str(info.get("steps", ""))})
    return path


# ---------------------------------------------------------------------------------------------------------
# the model card
# ---------------------------------------------------------------------------------------------------------

def run_info(lora: Lora) -> dict[str, Any]:
    """What the card says about training: from config.yaml and summary.json when the run folder has them."""
    c, s = lora.run_config, lora.summary
    info: dict[str, Any] = {"base_model": lora.base_model}
    for key in ("reward", "profile", "sample_steps", "truncation", "k", "k_min", "k_max", "lr", "resolution",
                "prompts", "seed", "batch_size", "grad_accum", "lora_rank", "lora_alpha"):
        if key in c:
            info[key] = c[key]
    steps = s.get("steps_done", s.get("steps", c.get("steps")))
    if steps is not None:
        info["steps"] = steps
    for key in ("reward_first", "reward_last", "sample_reward_before", "sample_reward_after", "interrupted"):
        if s.get(key) is not None and not (isinstance(s[key], float) and math.isnan(s[key])):
            info[key] = s[key]
    return info


def training_command(lora: Lora) -> str | None:
    """The command that trained this run, as the run folder recorded it (command.txt: one line per start, a
    --resume included); for a run without that record, a command that trains it again: its profile, and --set for
    each field that differs from it."""

    recorded = lora.run / COMMAND_FILE if lora.run is not None else None
    if recorded is not None and recorded.is_file():
        try:
            return recorded.read_text(encoding="utf-8").strip() or None
        except (OSError, ValueError):
            pass
    c = lora.run_config
    if not c:
        return None
    from lowmem_alignprop.settings.config import FIELD_NAMES, build_config
    from lowmem_alignprop.settings.profiles import load_profile

    profile = str(c.get("profile", "cpu"))
    try:
        _, values = load_profile(profile)
        defaults = build_config(values, {}, {}).to_dict()
    except (UserError, OSError, ValueError):
        from lowmem_alignprop.settings.config import Config
        defaults = Config().to_dict()
    parts = ["lowmem-alignprop", "--profile", profile]
    flags = {"model": "--model", "reward": "--reward", "prompts": "--prompts", "steps": "--steps",
             "seed": "--seed", "output_dir": "--output-dir"}
    for key in FIELD_NAMES:
        if key not in c or c[key] == defaults.get(key):
            continue
        value = c[key]
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        parts += [flags[key], text] if key in flags else ["--set", f"{key}={text}"]
    import shlex
    return " ".join(shlex.quote(p) for p in parts)


def model_card(lora: Lora, fmt: str, files: list[str], export_command: str, merged_weight: float | None = None,
               grid: str | None = None) -> str:
    """README.md in the hub's model-card format (front matter: base_model, tags, library_name; license left
    to the user) with the run's numbers and the commands that made it."""
    from huggingface_hub import ModelCard, ModelCardData

    info = run_info(lora)
    family = base_family(lora)
    base = lora.base_model
    tags = ["lowmem-alignprop", "alignprop", "reward-finetuning", "text-to-image",
            {"flux": "flux", "sd3": "sd3"}.get(lora.family, "stable-diffusion-xl" if family == SDXL
                                               else "stable-diffusion")]
    if merged_weight is None:
        tags.insert(2, "lora")
    data = ModelCardData(base_model=base if _is_hub_id(base) else None, tags=tags,
                         library_name="peft" if fmt == "peft" else "diffusers")
    front = data.to_yaml() + "\n# license: set the license of the base model here (e.g. creativeml-openrail-m)"
    what = (f"the base model with the LoRA merged in at weight {_num(merged_weight)}" if merged_weight is not None
            else f"a {_what(lora)} LoRA, {fmt} format")
    rows = [("base model", f"`{base}`" if base else "unknown"), ("reward", info.get("reward")),
            ("steps", info.get("steps")), ("profile", info.get("profile"))]
    if "truncation" in info:
        k = (f"K = {info.get('k')}" if info["truncation"] == "fixed"
             else f"K uniform in [{info.get('k_min')}, {info.get('k_max')}]")
        rows.append(("K (denoising steps backpropagated)", f"{k} of {info.get('sample_steps')} "
                                                           f"{'Euler' if lora.flow else 'DDIM'} steps"))
    ranks = sorted({lora.weights[f"{m}.lora_A.weight"].shape[0] for m in lora.modules})
    rows.append(("LoRA rank / alpha", f"{'/'.join(map(str, ranks))} / {_num(lora.config.get('lora_alpha') or ranks[0])}"
                 f" ({len(lora.modules)} layers: {', '.join(sorted(lora.config.get('target_modules') or []))})"))
    if "reward_first" in info and "reward_last" in info:
        rows.append(("training reward, first -> final steps",
                     f"{info['reward_first']:.4f} -> {info['reward_last']:.4f}"))
    if "sample_reward_before" in info and "sample_reward_after" in info:
        rows.append(("sample reward, before -> after", f"{info['sample_reward_before']:.4f} -> "
                                                       f"{info['sample_reward_after']:.4f}"))
    if info.get("interrupted"):
        rows.append(("note", "the run was interrupted before its last step"))
    lines = [f"# {lora.run.name if lora.run else lora.path.name}: AlignProp fine-tune", "",
             f"This folder holds {what}, trained with lowmem-alignprop (AlignProp: reward "
             "gradients backpropagated through the last K denoising steps into LoRA adapters on the "
             f"{'transformer' if lora.flow else 'UNet'}).", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows if v is not None]
    lines += ["", "## Files", ""] + [f"- `{f}`" for f in files]
    if grid:
        what = ("before and after training" if lora.step is None else f"before training and at step {lora.step}")
        lines += ["", "## Before / after", "", f"![{what}, same seeds]({grid})"]
    lines += ["", "## Use", ""] + _usage(fmt, files, base, merged_weight, lora.family)
    train_cmd = training_command(lora)
    lines += ["", "## How it was made", "", "```bash"]
    if train_cmd:
        lines.append(train_cmd)
    lines += [export_command, "```", ""]
    text = f"---\n{front}\n---\n\n" + "\n".join(lines)
    ModelCard(text)  # the hub's own parser: the front matter must read back
    return text


def _usage(fmt: str, files: list[str], base: str | None, merged: float | None, family: str = "unet") -> list[str]:
    base = base or "BASE_MODEL"
    if family != "unet":
        from lowmem_alignprop.commands import flow_export
        return flow_export.usage(fmt, files, base, merged, family, base)
    if merged is not None and fmt == "single-file":
        return [f"- ComfyUI: copy `{files[0]}` to `ComfyUI/models/checkpoints/` and pick it in a *Load Checkpoint* "
                "node.",
                "- AUTOMATIC1111 / Forge: copy it to `stable-diffusion-webui/models/Stable-diffusion/` and choose it "
                "as the checkpoint.",
                f"- diffusers: `StableDiffusionPipeline.from_single_file(\"{files[0]}\")` "
                "(`StableDiffusionXLPipeline` for SDXL)."]
    if merged is not None:
        return ["```python", "from diffusers import DiffusionPipeline",
                "pipe = DiffusionPipeline.from_pretrained(\"THIS_FOLDER\")", "```"]
    if fmt == "kohya":
        return [f"- ComfyUI: copy `{files[0]}` to `ComfyUI/models/loras/` and pick it in a *Load LoRA* node.",
                f"- AUTOMATIC1111 / Forge: copy it to `stable-diffusion-webui/models/Lora/` and add "
                f"`<lora:{Path(files[0]).stem}:1>` to the prompt.",
                "- diffusers: `pipe.load_lora_weights(\"THIS_FOLDER\", weight_name=\"" + files[0] + "\")`."]
    if fmt == "peft":
        return ["```python", "from peft import PeftModel",
                f"unet = PeftModel.from_pretrained(unet, \"THIS_FOLDER\")  # unet: {base}'s UNet", "```"]
    return ["```python", f"pipe = DiffusionPipeline.from_pretrained(\"{base}\")",
            "pipe.load_lora_weights(\"THIS_FOLDER\")", "```"]


def _is_hub_id(spec: str | None) -> bool:
    return bool(spec) and bool(_HUB_ID.fullmatch(spec)) and not Path(spec).expanduser().exists()


def _num(x: float) -> str:
    return f"{float(x):g}"


# ---------------------------------------------------------------------------------------------------------
# the hub
# ---------------------------------------------------------------------------------------------------------

def check_push_to_hub(repo: str) -> None:
    """Can ``repo`` be pushed to from here? Offline, without a token or with a malformed id: one UserError.
    Cheap (no request but one TCP connect), so it runs before anything is exported (or trained)."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from lowmem_alignprop.run import hub

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise UserError(f"--push-to-hub {quote(repo)} is not a hub repository id: write owner/name, e.g. "
                        "you/my-alignprop-lora") from None
    if "/" not in repo:
        raise UserError(f"--push-to-hub {quote(repo)}: write the repository as owner/name (your user or "
                        "organisation name first)")
    if hub.offline_by_setting():
        raise UserError(f"--push-to-hub {repo}: the Hugging Face hub is switched off here (HF_HUB_OFFLINE or "
                        "TRANSFORMERS_OFFLINE is set): unset it, or export without --push-to-hub and upload the "
                        "folder later with `hf upload`")
    if not get_token():
        raise UserError(f"--push-to-hub {repo}: no Hugging Face token on this machine: run `hf auth login` (or set "
                        "HF_TOKEN) first, or export without --push-to-hub")
    reason = hub.unreachable()
    if reason:
        raise UserError(f"--push-to-hub {repo}: no network to the Hugging Face hub ({reason}): export without "
                        "--push-to-hub and upload the folder later with `hf upload`")


def push_to_hub(folder: Path, repo: str, private: bool = False) -> str:
    """Create ``repo`` (if new) and upload ``folder`` to it; returns the repository's URL."""
    from huggingface_hub import create_repo, upload_folder

    try:
        url = create_repo(repo, repo_type="model", private=private, exist_ok=True)
        upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                      commit_message="Upload AlignProp export (lowmem-alignprop)")
    except Exception as e:  # huggingface_hub's HTTP, auth and network errors
        raise UserError(f"--push-to-hub {repo} failed ({first_line(e, 160)}); the export is complete in {folder}: "
                        "upload it later with `hf upload`") from None
    return str(url)


# ---------------------------------------------------------------------------------------------------------
# one export
# ---------------------------------------------------------------------------------------------------------

def check_format(fmt: str, merge: bool, weight: float | None, dtype: str | None = None,
                 single_file: bool = False) -> None:
    if fmt not in FORMATS:
        import difflib
        near = difflib.get_close_matches(fmt.lower(), FORMATS, n=1)
        raise UserError(f"--format {quote(fmt)} is not one of {', '.join(FORMATS)}"
                        + (f": did you mean {near[0]}?" if near else ""))
    if merge and fmt != "diffusers":
        raise UserError(f"--merge writes the whole model as a diffusers folder, not a {fmt} LoRA: leave --format out, "
                        "or drop --merge")
    if single_file and not merge:
        raise UserError("--single-file writes a merged model as one checkpoint file: add --merge (a kohya LoRA is "
                        "already one file: --format kohya)")
    if weight is not None and not merge:
        raise UserError("--weight sets the LoRA's weight in a merged model: add --merge (ComfyUI and AUTOMATIC1111 set "
                        "a LoRA's strength when they load it)")
    if dtype is not None and not merge:
        raise UserError("--dtype sets the precision a merged model is saved in: add --merge (a LoRA keeps its own)")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {quote(dtype)} is not one of {', '.join(DTYPES)}")
    if weight is not None and not math.isfinite(weight):
        raise UserError(f"--weight {weight}: write a finite number (1 = as trained, 0 = the base model)")


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder for the export")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty: pass a new folder (nothing is overwritten)")


def default_out(lora: Lora, fmt: str, merge: bool) -> Path:
    from lowmem_alignprop.run.runlock import next_free_dir

    base = (lora.run or lora.path.parent) / "export" / (("merged" if merge else fmt)
                                                       + (f"-step-{lora.step}" if lora.step is not None else ""))
    return next_free_dir(base, lambda p: p.exists() and (not p.is_dir() or any(p.iterdir())))


def export(lora: Lora, fmt: str, out: Path, *, merge: bool = False, weight: float | None = None,
           model: str | None = None, dtype: str | None = None, command: str = "", single_file: bool = False
           ) -> list[Path]:
    """Write one export into ``out`` (a new folder), model card included; returns the files written. A merged
    model is fused in fp32 and saved in ``dtype`` (default fp32): a diffusers folder, or with ``single_file`` one
    ``.safetensors`` in the original LDM layout."""
    check_format(fmt, merge, weight, dtype, single_file)
    check_out(out)
    pipe = merged_pipeline(lora, model, 1.0 if weight is None else weight) if merge else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if pipe is not None and single_file:
            files = [write_single_file(lora, pipe.to(DTYPES[dtype or "fp32"]), tmp, weight).name]
        elif pipe is not None:
            pipe.to(DTYPES[dtype or "fp32"])
            # SD3/FLUX: the transformer in one file (diffusers shards over 10 GB), which ComfyUI's Load Diffusion
            # Model reads in the diffusers layout
            pipe.save_pretrained(str(tmp), **({"max_shard_size": "1000GB"} if lora.flow else {}))
            files = ["model_index.json"] + sorted(p.name + "/" for p in tmp.iterdir() if p.is_dir())
        elif fmt == "kohya":
            files = [write_kohya(lora, tmp, _file_stem(lora)).name]
        elif fmt == "peft":
            files = [p.name for p in write_peft(lora, tmp)]
        else:
            files = [p.name for p in write_diffusers(lora, tmp)]
        grid = None
        # the run's before/after grid; for a checkpoint's LoRA its step's --sample-every grid, if there is one
        source = (lora.run / "samples" / (GRID_NAME if lora.step is None else f"step-{lora.step:06d}.png")
                  if lora.run is not None else None)
        if source is not None and source.is_file():
            grid = GRID_NAME if lora.step is None else source.name
            shutil.copy2(source, tmp / grid)
        (tmp / CARD_NAME).write_text(model_card(lora, "single-file" if single_file else fmt, files, command, merged_weight=(
            (1.0 if weight is None else weight) if merge else None), grid=grid), encoding="utf-8")
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(out.rglob("*"))


def _file_stem(lora: Lora) -> str:
    """The kohya file's name: the run folder's (what users see in ComfyUI's and A1111's LoRA lists)."""
    name = (lora.run or lora.path.parent).resolve().name if lora.path.name == "lora" else lora.path.resolve().name
    name = re.sub(r"[^\w.-]+", "_", name).strip("._") or "alignprop"
    if lora.step is not None:  # a checkpoint's LoRA: the step in the name (ComfyUI and A1111 list them side by side)
        return f"{name}_step{lora.step}_alignprop_lora"
    return f"{name}_alignprop_lora"


# ---------------------------------------------------------------------------------------------------------
# a LoRA to start training from (--init-lora)
# ---------------------------------------------------------------------------------------------------------

INIT_ADAPTER = "init"  # the name the starting LoRA loads under, before it is copied into the trained adapter
_DOWN_KEYS = (".lora.down.weight", ".lora_A.weight", ".lora_down.weight", "_lora.down.weight")
_TEXT_ENCODER_KEYS = ("lora_te", "text_encoder", "te_", "te1_", "te2_")


def init_lora_file(spec: str) -> Path:
    """``--init-lora``: the one ``.safetensors`` file diffusers' ``load_lora_weights`` reads for a LoRA given as a
    run's ``lora/`` folder (or the run folder), a training checkpoint, a diffusers or kohya file, a folder holding
    one such file (an ``export`` folder), or a peft adapter folder. A checkpoint, a peft folder and an SD3/FLUX
    kohya file (fused q/k/v, which diffusers' SD3 loader does not read) are written in diffusers' layout into a
    temporary folder first (removed when the process ends). Raises UserError."""
    file = _init_lora_source(spec)
    if file.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        from lowmem_alignprop.commands import flow_export
        try:
            with safe_open(str(file), framework="pt") as f:
                kohya_flow = flow_export.is_kohya_flow(f.keys())
        except Exception:  # a damaged file: lora_file_ranks says so in one line
            return file
        if kohya_flow:
            return flow_export.kohya_as_diffusers(file, f"--init-lora {spec}")
    return file


def _init_lora_source(spec: str) -> Path:
    from lowmem_alignprop.run.checkpoint import named_checkpoint

    path = Path(spec).expanduser()
    checkpoint = named_checkpoint(path)
    if checkpoint is not None:
        from lowmem_alignprop.models.loading import write_checkpoint_lora
        return write_checkpoint_lora(checkpoint, _temporary_folder() / "lora")
    if not path.exists():
        raise UserError(f"--init-lora {spec}: no such file or folder: pass a LoRA (a run's lora/ folder, a "
                        "checkpoint, a .safetensors file or a peft adapter folder)")
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise UserError(f"--init-lora {spec} is not a .safetensors file: pass a LoRA in diffusers, kohya or peft "
                            "layout")
        return path
    if (path / PEFT_WEIGHT_NAME).is_file() and (path / "adapter_config.json").is_file():
        return _peft_as_diffusers(path, spec)
    folder = lora_dir_of(spec)
    if (folder / LORA_WEIGHT_NAME).is_file():
        return folder / LORA_WEIGHT_NAME
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise UserError(f"--init-lora {spec} holds {'no' if not found else 'several'} .safetensors files: pass the LoRA "
                    "file itself, a run's lora/ folder or a peft adapter folder")


def _temporary_folder() -> Path:
    import atexit

    tmp = Path(tempfile.mkdtemp(prefix="lowmem-alignprop-lora-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return tmp


def _peft_as_diffusers(folder: Path, spec: str) -> Path:
    """A peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) in diffusers' layout."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        weights = load_file(str(folder / PEFT_WEIGHT_NAME))
    except Exception as e:  # a damaged JSON or safetensors file: any reader error
        raise UserError(f"--init-lora {spec}: the peft adapter cannot be read ({first_line(e, 120)})") from None
    weights = {k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()}
    known = {k: v for k, v in config.items() if k not in ("base_model_name_or_path", "revision", "auto_mapping")}
    out = _temporary_folder() / "lora"
    if weights and all(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in weights):
        from diffusers import StableDiffusion3Pipeline  # an SD3/FLUX transformer's adapter: peft's keys as they are
        StableDiffusion3Pipeline.save_lora_weights(str(out), transformer_lora_layers=weights,
                                                   transformer_lora_adapter_metadata=known)
        return out / LORA_WEIGHT_NAME
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=convert_state_dict_to_diffusers(weights),
                                              unet_lora_adapter_metadata=known)
    return out / LORA_WEIGHT_NAME


def lora_file_ranks(file: Path, spec: str) -> set[int]:
    """The ranks of a LoRA file's layers, from its header alone. A file of no LoRA, or one that also adapts the text
    encoder (AlignProp trains the UNet's LoRA only), raises UserError."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as e:  # safetensors' own error types for a truncated or foreign file
        raise UserError(f"--init-lora {spec}: {file.name} is damaged or not a safetensors file "
                        f"({first_line(e, 120)})") from None
    text = sorted(k for k in shapes if k.startswith(_TEXT_ENCODER_KEYS))
    if text:
        raise UserError(f"--init-lora {spec} adapts the text encoder too (e.g. {quote(text[0])}): AlignProp trains a "
                        "UNet LoRA only; pass a UNet-only LoRA")
    ranks = {s[0] for k, s in shapes.items() if k.endswith(_DOWN_KEYS) and len(s) >= 2}
    if not ranks:
        raise UserError(f"--init-lora {spec}: {file.name} holds no LoRA weights (no lora_A / lora_down keys)")
    return ranks


def check_init_lora(spec: str, rank: int) -> Path:
    """Before any model loads: the LoRA file ``--init-lora`` names, of this run's rank. Raises UserError."""
    file = init_lora_file(spec)
    ranks = lora_file_ranks(file, spec)
    if ranks != {rank}:
        theirs = "/".join(map(str, sorted(ranks)))
        raise UserError(f"--init-lora {spec} has rank {theirs} and this run trains rank {rank}: "
                        + (f"add --set lora_rank={theirs}" if len(ranks) == 1 else "pass a LoRA of one rank"))
    return file


@torch.no_grad()
def start_from_lora(pipe, unet, file: Path, spec: str) -> int:
    """Make the adapter being trained ("default") compute what the LoRA in ``file`` does: diffusers loads it (its
    own converters read the diffusers and kohya layouts, its alphas included) as a second adapter, whose A is
    copied and whose B is copied times its scale over ours; then that adapter goes. Layers the LoRA leaves out
    keep B = 0 (no change). A LoRA of another model raises UserError. Returns the number of layers copied."""
    from lowmem_alignprop.commands.evaluate import _adapted_layers, _layers_in_file, _misfit_detail

    peft_log = logging.getLogger("diffusers.loaders.peft")
    level = peft_log.level
    peft_log.setLevel(logging.CRITICAL)  # diffusers logs the whole error before raising; we say it in one line
    fix = "it was made for another base model: pass that model with --model, or another --init-lora"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "No LoRA keys associated to CLIPTextModel": wanted
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=INIT_ADAPTER)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"--init-lora {spec} does not fit this model: {_misfit_detail(e)}; {fix}") from None
    finally:
        peft_log.setLevel(level)
    expected, got = _layers_in_file(file), _adapted_layers(pipe, INIT_ADAPTER)
    if got == 0 or got < expected:
        raise UserError(f"--init-lora {spec} does not fit this model: only {got} of its {expected} layers exist here; "
                        f"{fix}")
    copied = 0
    for name, module in unet.named_modules():
        if INIT_ADAPTER not in getattr(module, "lora_A", {}):
            continue
        if "default" not in module.lora_A:
            raise UserError(f"--init-lora {spec} adapts {name}, a layer this run does not train (its LoRA is on the "
                            "attention projections to_q, to_k, to_v, to_out.0): pass a LoRA of those layers")
        a, b = module.lora_A[INIT_ADAPTER].weight, module.lora_B[INIT_ADAPTER].weight
        ours_a, ours_b = module.lora_A["default"].weight, module.lora_B["default"].weight
        if a.shape != ours_a.shape or b.shape != ours_b.shape:
            raise UserError(f"--init-lora {spec}: layer {name} has rank {a.shape[0]}, this run's {ours_a.shape[0]}: "
                            f"add --set lora_rank={a.shape[0]}")
        ours_a.copy_(a)
        ours_b.copy_(b * (module.scaling[INIT_ADAPTER] / module.scaling["default"]))  # the same scale * B @ A
        copied += 1
    unet.set_adapter("default")  # the trained adapter active (and trainable) again, then the loaded one goes
    unet.delete_adapters(INIT_ADAPTER)
    return copied

"""Which model a LoRA adapts, and which model a model is, in the words the LoRA checks compare (:data:`MODEL_NAMES`):
``unet``, ``sd3`` or ``flux``, ``transformer`` where a LoRA's files do not tell SD3 from FLUX.1. Told from a LoRA
file's key names and the base model our trainer recorded beside it (:func:`lora_family`, :func:`lora_model`), from a
model's kind (:func:`model_of_kind`), or from a loaded pipeline (:func:`pipeline_model`)."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from lowmem_alignprop.lora.flow_export import family_of_kohya_keys, family_of_weights, is_kohya_flow
from lowmem_alignprop.lora.lora_formats import PEFT_PREFIX, bare_lora_part, is_ldm_unet_lora
from lowmem_alignprop.models.flow import family_of
from lowmem_alignprop.run import base_fingerprint
from lowmem_alignprop.run.filenames import LORA_BASE_FILE
from lowmem_alignprop.run.tensor_files import is_safetensors
from lowmem_alignprop.settings.model_kind import KIND_FAMILY, model_kind_of


def lora_family(path: Path) -> str | None:
    """``unet`` or ``transformer`` (SD3/FLUX): which denoiser a LoRA file adapts, from its key names (diffusers'
    ``unet.`` / ``transformer.`` prefixes, kohya's ``lora_unet_`` / ``lora_transformer_``, peft's names without a
    prefix: lora_formats.bare_lora_part); None when unknown."""
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
    return bare_lora_part(keys)  # (peft's names without diffusers' prefix: the first module tells)


def lora_model(path: Path, family: str | None, record: Path | None = None) -> str | None:
    """sd3 or flux for a transformer LoRA (``family``: :func:`lora_family`), from the base model our trainer recorded
    (``record``: :func:`.lora_args.base_record_file`; None: lora/base_model.json beside it), else from its keys
    (FLUX.1's single-stream blocks, kohya's double/single or SD3's joint blocks), else ``transformer``; ``family``
    itself for the others."""
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
    modules = [k.removeprefix("transformer.").removeprefix(PEFT_PREFIX) for k in keys]
    return family_of_kohya_keys(keys) or ("flux" if family_of_weights(modules) == "flux" else "transformer")


MODEL_NAMES = {"unet": "a UNet model (SD 1.x/2.x/SDXL)", "transformer": "an SD3/SD3.5 or FLUX.1 transformer",
               "sd3": "an SD3/SD3.5 transformer", "flux": "a FLUX.1 transformer"}


def same_family(a: str, b: str) -> bool:
    """Whether LoRAs of :attr:`LoraSpec.model` ``a`` and ``b`` can adapt one model (``transformer``: SD3 or FLUX.1)."""
    return a == b or "transformer" in (a, b) and "unet" not in (a, b)


def pipeline_model(pipe) -> str:
    """What :func:`.lora_checks.check_lora_family` compares of a loaded pipeline: unet, sd3 or flux."""
    if not hasattr(pipe, "transformer"):
        return "unet"
    return family_of(pipe.transformer)


def model_of_kind(kind: str | None) -> str | None:
    """What :func:`.lora_checks.check_lora_family` compares of a settings/model_kind kind (sd, sdxl, sd35m, sd35l,
    flux)."""
    return KIND_FAMILY.get(kind)

"""Load the base model's components, add LoRA, and choose attention and checkpointing.

Every source goes through diffusers: the built-in tiny model is a saved diffusers directory, a user's
directory or hub id goes through ``from_pretrained``, a single-file checkpoint through
``from_single_file`` with a config shipped in the package (no network), and ``sd15|sd21|sdxl`` builds
the architecture from that config with random weights (for planning and benchmarks).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

log = logging.getLogger(__name__)

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the UNet attention projections, as AlignProp does
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
ARCH_NAMES = ("sd15", "sd21", "sdxl")


@dataclass
class Components:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    is_sdxl: bool = False
    source: str = ""
    pipeline_class: Any = None

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        mods = {"vae": self.vae, "text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            mods["text_encoder_2"] = self.text_encoder_2
        return mods


def resolve_model(spec: str) -> tuple[str, str]:
    """Classify a --model value as (kind, location): tiny, arch, dir, file or hub. Raises UserError."""
    if spec in ("", "tiny"):
        return "tiny", "tiny"
    if spec in ARCH_NAMES:
        return "arch", spec
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        if not (path / "model_index.json").exists() and not (path / "unet").is_dir():
            raise UserError(f"{spec} is a directory but not a diffusers model (no model_index.json): pass the "
                            "folder that `save_pretrained` wrote, or a single .safetensors/.ckpt file")
        return "dir", str(path)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise UserError(f"{spec} is a file but not a checkpoint: pass a .safetensors or .ckpt file")
        return "file", str(path)
    looks_like_path = spec.startswith(("/", ".", "~")) or path.suffix.lower() in SINGLE_FILE_SUFFIXES \
        or spec.count("/") > 1 or "\\" in spec
    if looks_like_path or not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        raise UserError(f"model path {spec} does not exist: pass an existing diffusers directory, a "
                        ".safetensors/.ckpt file, a hub id (owner/name), or leave --model out for the built-in tiny model")
    return "hub", spec


def load_components(cfg, weight_dtype: torch.dtype = torch.float32) -> Components:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and the DDIM scheduler for ``cfg.model``."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    kind, where = resolve_model(cfg.model)
    if kind == "tiny":
        from .tiny import tiny_model_dir
        kind, where = "dir", str(tiny_model_dir())
    if kind == "arch":
        from .arch import build_random_components
        parts = build_random_components(where, device="cpu", dtype=weight_dtype)
        comps = Components(**{k: v for k, v in parts.items() if k in Components.__dataclass_fields__},
                           is_sdxl=where == "sdxl", source=f"{where} (random weights)")
    else:
        try:
            if kind == "file":
                from .arch import load_single_file
                pipe = load_single_file(where, arch=cfg.model_arch, torch_dtype=weight_dtype)
            else:
                pipe = DiffusionPipeline.from_pretrained(where, safety_checker=None, **dtype_kwarg(weight_dtype))
        except UserError:
            raise
        except (OSError, ValueError, EnvironmentError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"could not load model {cfg.model!r}: {first[:300]}. Check the path or hub id "
                            "(hub ids need network access; offline, pass a local directory or file)") from None
        comps = Components(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                           scheduler=pipe.scheduler, text_encoder_2=getattr(pipe, "text_encoder_2", None),
                           tokenizer_2=getattr(pipe, "tokenizer_2", None),
                           is_sdxl=getattr(pipe, "text_encoder_2", None) is not None, source=where,
                           pipeline_class=type(pipe))
    if comps.unet is None or comps.vae is None or comps.text_encoder is None:
        raise UserError(f"{cfg.model} is not a Stable Diffusion model (needs unet, vae and text_encoder): "
                        "supported are SD 1.x, SD 2.x and SDXL")
    # AlignProp samples with DDIM; keep the model's noise schedule and prediction type.
    comps.scheduler = DDIMScheduler.from_config(comps.scheduler.config)
    if comps.pipeline_class is None:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        comps.pipeline_class = StableDiffusionXLPipeline if comps.is_sdxl else StableDiffusionPipeline
    return comps


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """diffusers >= 0.42 takes ``dtype=`` (``torch_dtype=`` is deprecated there); older releases only ``torch_dtype=``."""
    from diffusers.pipelines import pipeline_utils

    return {"dtype": dtype} if hasattr(pipeline_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def set_attention(unet, vae, attention: str, device: torch.device) -> str:
    """Choose the attention kernel; returns what is actually used (xformers falls back to sdpa)."""
    if attention == "xformers":
        try:
            if device.type != "cuda":
                raise RuntimeError("xformers runs only on CUDA devices")
            import xformers  # noqa: F401
            unet.enable_xformers_memory_efficient_attention()
            vae.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as e:  # ImportError, or xformers' own CUDA checks
            log.warning("attention=xformers unavailable (%s): falling back to sdpa", str(e).splitlines()[0][:120])
            attention = "sdpa"
    if attention == "sliced":
        unet.set_attention_slice("auto")  # one attention head slice at a time: lowest memory, slowest
        return "sliced"
    from diffusers.models.attention_processor import AttnProcessor2_0
    unet.set_attn_processor(AttnProcessor2_0())  # fused scaled-dot-product attention: no n^2 score tensor kept
    return "sdpa"


def add_lora(unet, rank: int, alpha: float | None, seed: int) -> list[torch.nn.Parameter]:
    """Add peft LoRA adapters to the attention projections; only they train. Returns their parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA weights and their optimizer state stay fp32 for stable updates
    return params


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The LoRA weights in diffusers' key format."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def module_bytes(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))

"""What to change when a configuration does not fit: the memory features it does not use yet, cheapest in speed
first (:func:`candidate_changes`; the planner's search and ``plan --fastest`` try them)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lowmem_alignprop.memory import precision  # its rule called through the module: one rule, patchable
from lowmem_alignprop.measure.meta_models import meta_base
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.image_size import describe_sizes, lower_resolution


def decode_tiles(cfg: Config, target: str) -> bool:
    """Whether tiled_decode would cut this run's latents into tiles: only when a latent side exceeds ``tile_size``
    (SD's VAE: 512 px is 64 cells, one tile). Otherwise it decodes each image whole, one at a time: sliced decode's
    memory and time, so neither search offers it."""
    from lowmem_alignprop.memory.tiling import cuts_images
    from lowmem_alignprop.models.sampling import vae_scale_factor

    vae = meta_base(cfg, precision.frozen_weight_dtype(cfg.mixed_precision, target)).vae  # the estimates' own (cached)
    return any(cuts_images(size, cfg.tile_size, vae_scale_factor(vae)) for size in cfg.shapes)  # (any size's)


def has_model_reward(cfg: Config) -> bool:
    from lowmem_alignprop import rewards as R
    return any(kind == "user" or name in R.MODEL_REWARDS for kind, name, _ in R.reward_terms(cfg.reward))


def candidate_changes(cfg: Config, target: str = "cuda", start: Config | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Memory features this configuration does not use yet, cheapest in speed first (one step each). ``start``: the
    user's configuration when ``cfg`` is a search's step on the way (default ``cfg``): a smaller batch keeps its
    images per optimizer step through more accumulation, and a description's "was" is its value."""
    start = start or cfg
    out: list[tuple[str, dict[str, Any]]] = []
    if not cfg.expandable_segments and target == "cuda":
        out.append(("expandable allocator segments (less fragmentation)",
                    {"expandable_segments": True}))
    if not cfg.cache_prompt_embeddings:
        out.append(("cache prompt embeddings (no speed cost)", {"cache_prompt_embeddings": True}))
    if cfg.merge_lora_nograd:
        out.append(("run the no-grad calls through peft's LoRA layers (merge_lora_nograd=false: no merged copies of "
                    "the adapted weights while they run)", {"merge_lora_nograd": False}))
    if cfg.window_keep:
        out.append(("checkpoint every grad-window call (window_keep=0: backward recomputes the kept calls)",
                    {"window_keep": 0}))
    if not cfg.reward_checkpointing and has_model_reward(cfg):
        out.append(("checkpoint the reward model (recomputes its forward)", {"reward_checkpointing": True}))
    if cfg.vae_checkpointing == "none":
        out.append(("checkpoint the VAE decoder per up-block", {"vae_checkpointing": "blocks"}))
    if cfg.unet_checkpointing == "call":
        out.append(("checkpoint the UNet per block (~30% slower backward)", {"unet_checkpointing": "blocks"}))
    if not cfg.sliced_decode and not cfg.tiled_decode and cfg.batch_size > 1:
        out.append(("decode one image at a time", {"sliced_decode": True}))
    if not cfg.offload_frozen and target == "cuda":
        out.append(("offload frozen modules to the CPU while idle (PCIe transfers)", {"offload_frozen": True}))
    if not cfg.encode_on_cpu and target == "cuda" and _is_flow(cfg):
        out.append(("encode the prompt set on the CPU (T5-XXL never on the card; CPU seconds once, at load)",
                    {"encode_on_cpu": True}))
    if cfg.vae_checkpointing != "resnets":
        out.append(("checkpoint the VAE decoder per resnet (most recomputation)", {"vae_checkpointing": "resnets"}))
    if not cfg.activation_offload and target == "cuda":  # (it moves checkpointed tensors: the VAE's at least)
        out.append(("move the tensors saved for backward to host memory (activation offload: PCIe copies both ways)",
                    {"activation_offload": True, **({"vae_checkpointing": "blocks"} if cfg.vae_checkpointing == "none"
                                                    else {})}))
    if cfg.train_unet == "full" and cfg.optimizer == "adamw":
        out.append(("8-bit AdamW state", {"optimizer": "adamw8bit"}))
    if cfg.base_quant == "none" and cfg.can_quantize_base() and target == "cuda":  # for the card, wherever planned
        out.append(("quantize the frozen UNet or transformer to nf4 (its Linear weights at 4 bits; needs "
                    "bitsandbytes on the GPU machine)", {"base_quant": "nf4"}))
    if not cfg.block_swap and cfg.can_swap_blocks() and target == "cuda":
        n = swappable_count(cfg) // 2  # with a quantized base (above, or already set) the blocks swap as stored
        if n:
            out.append((f"block swap: {n} frozen blocks wait in pinned CPU memory and are copied in around each use "
                        "(PCIe copies per call, overlapping compute)",  # (it needs per-block checkpointing)
                        {"block_swap": n, **({"unet_checkpointing": "blocks"} if cfg.unet_checkpointing != "blocks"
                                             else {})}))
    elif cfg.block_swap and target == "cuda" and cfg.block_swap < (total := swappable_count(cfg)):
        n = cfg.block_swap + max(1, (total - cfg.block_swap) // 2)  # half the blocks still on the card
        was = f", was {start.block_swap}" if start.block_swap else ""
        out.append((f"block swap {n} of {total} blocks{was} (more pinned CPU memory and PCIe copies; the task "
                    "unchanged)", {"block_swap": n}))
    if not cfg.tiled_decode and decode_tiles(cfg, target):
        out.append(("decode in overlapping tiles (approximate: most at the seams)",
                    {"tiled_decode": True, "sliced_decode": False}))
    if cfg.batch_size > 1:
        b = cfg.batch_size // 2
        was = start.batch_size * start.grad_accum
        accum = math.ceil(was / b)  # never fewer images per optimizer step
        same = f"the same {was} images per step" if b * accum == was else f"{b * accum} images per step, was {was}"
        out.append((f"batch {b} per micro-step, grad_accum {accum} ({same})", {"batch_size": b, "grad_accum": accum}))
    if (r := lower_resolution(cfg.resolution)) is not None:  # (each side to 3/4, a multiple of 64, not under 256;
        out.append((f"lower resolution {describe_sizes(r)} px (changes the task)", {"resolution": r}))  # each size)
    return [unmerged(cfg, description, change) for description, change in out]


def unmerged_change(cfg: Config, change: dict[str, Any]) -> dict[str, Any]:
    """``change`` to ``cfg``, with merge_lora_nograd turned off too where the change cannot run with it
    (Config.merge_lora_clashes: a quantized base, block swap...)."""
    if not cfg.merge_lora_nograd or not dataclasses.replace(cfg, **change).merge_lora_clashes():
        return change
    return {**change, "merge_lora_nograd": False}


def unmerged(cfg: Config, description: str, change: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """:func:`unmerged_change`, its description saying so where it turns the merge off."""
    if (done := unmerged_change(cfg, change)) is change:
        return description, change
    return f"{description}; the no-grad calls through peft's layers again (merge_lora_nograd=false)", done


def _is_flow(cfg: Config) -> bool:
    """An SD3/FLUX model (from the cached meta model the plan's own estimate built); False if it cannot be built."""
    try:
        return meta_base(cfg, precision.frozen_weight_dtype(cfg.mixed_precision, "cuda")).family != "unet"
    except (UserError, TypeError):
        return False


def swappable_count(cfg: Config) -> int:
    """How many blocks block swap can take from ``cfg``'s denoiser (0 if its meta model cannot be built). Counted
    on the cached meta model the plan's own estimate built (in the card's dtype), read only: no copy of the model
    for each suggestion the search tries."""
    from lowmem_alignprop.memory.block_swap import swappable_blocks

    try:
        return len(swappable_blocks(meta_base(cfg, precision.frozen_weight_dtype(cfg.mixed_precision, "cuda")).unet))
    except (UserError, TypeError):
        return 0


def check_swap_count(cfg: Config) -> None:
    """block_swap within the blocks the denoiser has, counted on its meta model before any weight loads: a UNet's
    (and a transformer file's), which settings.model_kind.check_block_swap cannot tell from config files; block
    swap's install said it only once the model had loaded (minutes for SDXL). A model whose meta copy cannot be built
    (a hub id without its configs here) is left to the install's check."""
    from lowmem_alignprop.settings.model_kind import too_many_blocks

    try:
        total = swappable_count(cfg) if cfg.block_swap else 0
    except Exception:  # noqa: BLE001 - loading the model names whatever is wrong with it
        return
    if 0 < total < cfg.block_swap:
        raise UserError(too_many_blocks(cfg.block_swap, total))

"""Optimizers: AdamW, 8-bit AdamW and paged 8-bit AdamW (bitsandbytes)."""

from __future__ import annotations

import math

import torch

from lowmem_alignprop.settings.config import import_needed
from lowmem_alignprop.settings.errors import UserError


# the class each optimizer name builds (below; DeepSpeed's CPU Adam: run/distributed.py), by its module path as
# sd-scripts writes it in a LoRA's ss_optimizer header key
OPTIMIZER_CLASSES = {"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
                     "paged_adamw8bit": "bitsandbytes.optim.adamw.PagedAdamW8bit"}
DEEPSPEED_CPU_ADAM = "deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam"


def uses_cpu_adam(deepspeed_zero, offload) -> bool:
    """Whether a run steps with DeepSpeed's CPU Adam (ZeRO with its state offloaded) instead of its optimizer's."""
    return bool(deepspeed_zero) and offload not in (None, "none")


def optimizer_class(optimizer: str, deepspeed_zero=0, offload: str | None = "none") -> str:
    """The class path of the optimizer a run of these settings steps with (its config's names)."""
    return DEEPSPEED_CPU_ADAM if uses_cpu_adam(deepspeed_zero, offload) else OPTIMIZER_CLASSES.get(optimizer,
                                                                                                   optimizer)


def build_optimizer(cfg, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if not params:
        raise UserError("nothing to train: no parameter requires gradients (check train_unet and lora_rank)")
    if cfg.optimizer == "adamw":
        # fp32 Adam state: 8 bytes per trained weight (negligible for LoRA, 6.9 GB for a full SD1.5 UNet);
        # fused_adamw: one kernel for the whole update instead of a few per tensor (the same state, no memory saved)
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 fused=True if cfg.fused_adamw else None)
    bnb = import_needed("bitsandbytes", f"optimizer={cfg.optimizer}", "optimizer=adamw")
    if cfg.optimizer == "adamw8bit":
        # 8-bit Adam state: 2 bytes per trained weight instead of 8 (state quantized blockwise)
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # paged: the 8-bit state lives in unified memory and pages to the CPU when the GPU runs short
    return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def adam8bit_state_bytes(params) -> int:
    """bitsandbytes' 8-bit AdamW state: 2 bytes per weight and an fp32 absmax per 256 for each moment, in tensors of
    4096+ elements; smaller tensors keep fp32 moments (8 bytes per weight)."""
    return sum(2 * p.numel() + 2 * 4 * math.ceil(p.numel() / 256) if p.numel() >= 4096 else 8 * p.numel()
               for p in params)


def state_bytes(cfg, params) -> int:
    """The optimizer state a step keeps for ``params`` (and a checkpoint holds): AdamW's two fp32 moments, 8-bit
    AdamW's quantized ones, or under DeepSpeed ZeRO its fp32 master copy beside the two moments."""
    n = sum(p.numel() for p in params)
    if cfg.deepspeed_zero:
        return 12 * n
    return 8 * n if cfg.optimizer == "adamw" else adam8bit_state_bytes(params)

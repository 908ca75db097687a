"""Optimizers: AdamW, 8-bit AdamW and paged 8-bit AdamW (bitsandbytes)."""

from __future__ import annotations

import math

import torch

from lowmem_alignprop.settings.config import import_needed
from lowmem_alignprop.settings.errors import UserError


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

"""Optimizers: AdamW, 8-bit AdamW and paged 8-bit AdamW (bitsandbytes)."""

from __future__ import annotations

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

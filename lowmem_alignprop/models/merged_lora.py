"""``merge_lora_nograd``: the calls without gradients (the sampling steps before the gradient window, the sample
grids' and the evaluation's images) run on the base layers with the LoRA merged into a copy of their weights, instead
of through peft's LoRA layers.

peft's LoRA ``Linear`` launches its own ops at every call of every adapted layer after the base layer's: two matmuls,
the scaling and the sum (their transposes and views launch nothing), and under autocast its casts: 4 in fp32, about 9
under fp16 autocast with peft's input cast (which models/lora_layers.keep_input_dtype now leaves out: two fewer where
the input comes in fp16), some 1,200 of an SD1.5 UNet call's with LoRA on its attention projections. Where the host paces
the step (batch 1 on a fast card) those ops cost time; the merged copies cost one small matmul per adapted layer per
rollout and their memory while the no-grad calls run (SD1.5's attention projections: 178 MiB in fp16; FLUX's about
4.7 GiB in bf16, about 16 GiB with lora_layers=attention+ff), freed before the gradient window.

The base weights are never changed in place: each adapted layer's base weight tensor is pointed at its merged copy
and back, so the frozen model is bit for bit what it was (peft's own ``merge``/``unmerge`` adds and subtracts the
delta in the weight's dtype, which drifts in fp16 over thousands of steps). Images equal the unmerged ones up to
rounding (``W x + B (A x)`` against ``(W + B A) x``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from lowmem_alignprop.models.sampling import adapters_off, without_autocast


def lora_linears(model) -> list:
    """peft's LoRA ``Linear`` layers of ``model`` with a plain ``torch.nn.Linear`` base and an active adapter."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return [m for m in model.modules() if isinstance(m, LoraLinear) and isinstance(m.get_base_layer(), torch.nn.Linear)
            and any(a in m.lora_A for a in m.active_adapters)]


@contextlib.contextmanager
def lora_merged(model) -> Iterator[None]:
    """Inside (no gradients): ``model`` runs with its LoRA adapters off and each adapted base layer's weight replaced
    by ``W + delta`` (peft's ``get_delta_weight`` of each active adapter outside autocast, in the adapter's fp32,
    summed in fp32, stored in ``W``'s dtype); the original weight tensors come back at the end."""
    swapped = []
    layers = lora_linears(model)
    try:
        # outside autocast: the deltas in the adapters' own fp32, one rounding to the weight's dtype at the end
        with torch.no_grad(), without_autocast(layers[0].get_base_layer().weight.device.type if layers else "cpu"):
            for m in layers:
                weight = m.get_base_layer().weight
                delta = sum(m.get_delta_weight(a).float() for a in m.active_adapters if a in m.lora_A)
                merged = (weight.float() + delta).to(weight.dtype)  # fp32 sum, one rounding to the weight's dtype
                swapped.append((weight, weight.data))
                weight.data = merged
        with adapters_off(model):
            yield
    finally:
        for weight, original in swapped:
            weight.data = original

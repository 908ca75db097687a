"""The one rule for the dtype of the frozen weights (UNet, VAE, text encoders, reward model).

Training, the planner and ``sample`` all ask :func:`frozen_weight_dtype`: the mixed-precision type on a GPU (half the
memory of fp32), fp32 on a CPU, where half-precision kernels are slow or missing. LoRA weights and the optimizer
state stay fp32 everywhere.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def frozen_weight_dtype(mixed_precision: str, device_type: str) -> torch.dtype:
    """``mixed_precision`` is a config value (no|fp16|bf16); ``device_type`` where the run computes (cuda, cpu...)."""
    return DTYPES[mixed_precision] if device_type != "cpu" else torch.float32


def running_precision(mixed_precision: str, device_type: str) -> str:
    """The mixed precision a run has where it computes: fp16 needs CUDA (a CPU runs it in fp32: "no"); the trainer,
    the planner and its time estimate all ask this."""
    return "no" if device_type == "cpu" and mixed_precision == "fp16" else mixed_precision


def fp32_instead_note(mixed_precision: str, device_type: str, verb: str = "using") -> str | None:
    """What ``train`` and ``sample`` say when :func:`running_precision` is not the one asked for (fp16 on a CPU)."""
    if running_precision(mixed_precision, device_type) == mixed_precision:
        return None
    return f"mixed_precision={mixed_precision} needs a CUDA device: {verb} fp32 on this CPU"


def cpu_autocast(mixed_precision: str):
    """The autocast a CPU step runs in, as accelerate sets it on a CPU: bf16's, else none (a context factory)."""
    if running_precision(mixed_precision, "cpu") == "bf16":
        return functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def dtype_kwarg(dtype: torch.dtype | None) -> dict:
    """How this diffusers takes a load dtype (``from_pretrained``, ``from_single_file``): ``dtype=`` from 0.42 on
    (``torch_dtype=`` is deprecated there), ``torch_dtype=`` before."""
    from diffusers.pipelines import pipeline_utils

    return {"dtype": dtype} if hasattr(pipeline_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def compute_dtype(model) -> torch.dtype:
    """The dtype a model's inputs are cast to: diffusers' ``model.dtype`` (the compute dtype under layerwise
    casting), or a wrapper's (DDP, DeepSpeed) first parameter's. diffusers walks every submodule to answer (about
    8 ms for the toy UNet with LoRA, a tenth of its call on a CPU): ask once per rollout, not once per model call."""
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(model.parameters()).dtype


BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86's AVX-512 BF16 and AMX, Arm's BF16 extension


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this CPU has bf16 instructions (without them torch emulates bf16 matmuls, many times slower than
    fp32); None where the OS does not say (no /proc/cpuinfo: macOS, Windows)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags = {word for line in text.splitlines() if line.lower().startswith(("flags", "features"))
             for word in line.partition(":")[2].split()}
    return bool(flags & BF16_CPU_FLAGS)

"""The one rule for the frozen weights' dtype (lowmem_alignprop/memory/precision.py), used by train, plan and sample."""

import torch

from lowmem_alignprop.memory.precision import frozen_weight_dtype


def test_half_precision_on_a_gpu_fp32_on_a_cpu():
    assert frozen_weight_dtype("fp16", "cuda") == torch.float16
    assert frozen_weight_dtype("bf16", "cuda") == torch.bfloat16
    assert frozen_weight_dtype("no", "cuda") == torch.float32
    for mp in ("no", "fp16", "bf16"):  # half-precision kernels are slow or missing on a CPU
        assert frozen_weight_dtype(mp, "cpu") == torch.float32

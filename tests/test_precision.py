"""The one rule for the frozen weights' dtype (lowmem_alignprop/memory/precision.py), used by train, plan and sample."""

import torch

from lowmem_alignprop.memory.precision import frozen_weight_dtype


def test_half_precision_on_a_gpu_fp32_on_a_cpu():
    assert frozen_weight_dtype("fp16", "cuda") == torch.float16
    assert frozen_weight_dtype("bf16", "cuda") == torch.bfloat16
    assert frozen_weight_dtype("no", "cuda") == torch.float32
    for mp in ("no", "fp16", "bf16"):  # half-precision kernels are slow or missing on a CPU
        assert frozen_weight_dtype(mp, "cpu") == torch.float32


def test_a_cpu_step_autocasts_to_bf16_for_bf16_and_not_at_all_otherwise():
    from lowmem_alignprop.memory.precision import cpu_autocast

    a = torch.ones(2, 2)
    with cpu_autocast("bf16")():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (a @ a).dtype == torch.bfloat16
    for mp in ("no", "fp16"):  # fp16 runs in fp32 on a CPU
        with cpu_autocast(mp)():
            assert not torch.is_autocast_enabled("cpu") and (a @ a).dtype == torch.float32


def test_compute_dtype_is_the_models_own_dtype_else_its_first_parameters():
    """diffusers' ``model.dtype`` is the compute dtype under layerwise casting, whatever the weights are stored in;
    a wrapper without one (DDP) answers with its first parameter's dtype."""
    from lowmem_alignprop.memory.precision import compute_dtype

    class Cast(torch.nn.Linear):
        dtype = torch.bfloat16  # stored in fp32 (fp8 in a real run), computes in bf16

    assert compute_dtype(Cast(2, 2)) == torch.bfloat16
    assert compute_dtype(torch.nn.Linear(2, 2).to(torch.float64)) == torch.float64

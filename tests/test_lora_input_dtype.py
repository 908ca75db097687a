"""Under autocast the LoRA layers pass their input to the adapter as it comes (models/lora_layers.keep_input_dtype):
peft's cast of it to the adapter's fp32, which autocast's matmul casts straight back, is left out. The same values
(both casts are exact), fewer ops, and one input copy fewer kept for backward where the input was already in the
autocast dtype; the trainer and the planner both run it so.

On the CPU the GPU's layout is the frozen weights in bf16 under bf16 autocast (as tests/test_half_precision.py)."""

import torch
from loras import adapted_modules, tiny_unet_with_lora
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem_alignprop.models.lora_layers import keep_input_dtype
from lowmem_alignprop.settings.config import Config


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _step(tiny_dir, as_given: bool):
    """One UNet call with LoRA (bf16 base, fp32 adapters) under CPU bf16 autocast and its backward: the output, the
    LoRA gradients, the ops launched, and the bytes of the distinct tensors kept for backward."""
    m = tiny_unet_with_lora(tiny_dir)
    unet = m.comps.unet
    for p in unet.parameters():
        p.data = p.data.to(torch.bfloat16) if not p.requires_grad else p.data  # the frozen base as on a GPU
    set_count = keep_input_dtype(unet) if as_given else 0
    torch.manual_seed(3)
    x = torch.randn(2, unet.config.in_channels, 8, 8, dtype=torch.bfloat16)
    kept: dict[int, int] = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ops = _Ops()
    with torch.autocast("cpu", dtype=torch.bfloat16), ops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = unet(x, torch.tensor([10]), encoder_hidden_states=m.emb.cond.to(torch.bfloat16)).sample
    with ops:
        out.float().square().mean().backward()
    assert set_count in (0, len(adapted_modules(unet)))  # every adapted layer
    return out.detach(), [p.grad for p in m.params], ops.count, sum(kept.values()), set_count


def test_the_adapters_input_as_given_is_the_same_math_with_fewer_ops_and_fewer_kept_bytes(tiny_dir):
    cast_out, cast_grads, cast_ops, cast_kept, _ = _step(tiny_dir, as_given=False)
    out, grads, ops, kept, layers = _step(tiny_dir, as_given=True)
    assert layers > 0
    # bit for bit: bf16 -> fp32 -> bf16 is exact, and the matmuls then see the same operands
    assert torch.equal(out, cast_out)
    assert all(torch.equal(g, c) for g, c in zip(grads, cast_grads))
    # at least the two casts of each adapter whose input comes in bf16 (to_out after attention; the text embeddings
    # of the cross-attention's to_k/to_v), forward and backward
    assert cast_ops - ops >= 2 * 2 * layers // 4, (cast_ops, ops)
    # each of those adapters' bf16 input copy: the base layer's input is kept once, not a second time
    assert cast_kept - kept > 0, (cast_kept, kept)


def test_the_planner_counts_it_where_the_step_runs_under_autocast(monkeypatch):
    """plan (an rtx card, bf16): fewer ops and a lower peak than with peft's casts, as the trainer runs; without
    autocast (mixed_precision=no) nothing is set and nothing changes."""
    from lowmem_alignprop.measure import planner
    from lowmem_alignprop.step import rollout

    monkeypatch.setenv("LOWMEM_ALIGNPROP_PLAN_CACHE", "off")

    def estimate(mixed_precision: str, as_given: bool):
        cfg = Config(model="tiny", resolution=64, truncation="fixed", k=2, sample_steps=4, window_keep=2,
                     mixed_precision=mixed_precision).validate()
        calls = []
        with monkeypatch.context() as m:
            m.setattr(rollout, "keep_input_dtype", lambda model: calls.append(model) or
                      (keep_input_dtype(model) if as_given else 0))
            est = planner.estimate(cfg, target="cuda")
        return est, len(calls)

    (given, set_on), (cast, _) = estimate("bf16", True), estimate("bf16", False)
    assert set_on == 1
    assert sum(w["ops"] for w in given.work.values()) < sum(w["ops"] for w in cast.work.values())
    assert given.peak_allocated < cast.peak_allocated
    assert estimate("no", True)[1] == 0  # fp32 throughout: the casts are no-ops, nothing is set

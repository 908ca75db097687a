"""Tolerances that come from the math, not from one machine's rounding.

Two float32 computations of the same quantity that differ only in the order of their sums (another batch
split, another BLAS blocking, a recompute under a checkpoint, another CPU's vector width) agree to a few units
of float32's machine epsilon *relative to the size of the terms summed*, not relative to each entry of the
result: an entry that is a near-cancelling sum of large terms can differ in every digit. So a comparison that
holds on any CPU is normwise: ``||a - b|| <= rel * ||b||`` over the whole tensor (or list of tensors), with
``rel`` a small multiple of the epsilon times the depth of the computation, never an elementwise ``atol``.
"""

from __future__ import annotations

from typing import Sequence

import torch

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7

# the same operations, reordered sums only (a recompute, another thread split): a few hundred eps
SAME_OPS = 1e-5
# another decomposition of the same sums (micro-batches vs one batch, tiles vs the whole, sliced vs batched)
# through a deep network (tens of layers, each adding a few eps of relative error): about a thousand eps
REORDERED = 1e-4


def flat(x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().double().flatten()
    return torch.cat([t.detach().double().flatten() for t in x])


def relative_difference(actual, expected) -> float:
    """``||actual - expected|| / ||expected||`` over every entry (a tensor or a list of tensors)."""
    a, b = flat(actual), flat(expected)
    assert a.shape == b.shape, (a.shape, b.shape)
    norm = b.norm().item()
    assert norm > 0, "the reference is all zeros: the comparison would prove nothing"
    return (a - b).norm().item() / norm


def assert_rel_close(actual, expected, rel: float, what: str = "") -> None:
    """Normwise comparison: fails with the measured relative difference and the bound it broke."""
    diff = relative_difference(actual, expected)
    assert diff <= rel, f"{what}: relative difference {diff:.2e} > {rel:.0e}"

"""``torch.autocast("cuda")`` emulated on fake CPU tensors (the planner's CUDA targets): the CPU autocast plus CUDA's
different op lists (docs/design.md section 4)."""

from __future__ import annotations

import torch

from lowmem_alignprop.memory.recompute import recompute_inside


# ATen's CUDA autocast lists (aten/src/ATen/autocast_mode.h) where they differ from the CPU's, by Python name.
# The CPU autocast already casts convolutions, linear layers, matmuls and attention down (with the same weight
# cache); these few lower-precision ops are CUDA-only ...
_LOWER_CUDA_ONLY = frozenset({"addmv", "addr", "einsum", "mv", "chain_matmul", "linalg_multi_dot"})
# ... and these run in fp32 on CUDA but not on the CPU: norms, upsampling, pow/exp/log..., losses
_FP32 = frozenset({"acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
                   "rsqrt", "sinh", "tan", "pow", "softplus", "layer_norm", "group_norm", "cosine_similarity",
                   "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div", "nll_loss",
                   "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
                   "interpolate"})
# ... and these reductions return fp32 for fp16/bf16 inputs on CUDA
_FP32_OUT = frozenset({"softmax", "log_softmax", "cumsum", "cumprod", "prod", "sum", "norm", "vector_norm",
                       "matrix_norm"})


class CudaAutocast(torch.overrides.TorchFunctionMode):
    """``torch.autocast("cuda", dtype)`` on fake CPU tensors: the real CPU autocast in that dtype (it casts
    convolutions, linear layers, matmuls and attention down, with autocast's own weight cache) plus this
    mode, which adds CUDA's differences above autograd (so its casts are saved for backward as real
    autocast's are): norms, upsampling, pow/exp/log and losses in fp32, reductions with fp32 output, a few
    more ops cast down. It acts only while CPU autocast is on, so ``torch.autocast(enabled=False)``
    regions (decode of a VAE kept in its own dtype) are honoured.

    A mode is off inside its own handler, where ``loss.backward()`` runs, so the autograd engine would run a
    checkpoint's recompute without it (and fail checkpointing's dtype check): :meth:`replay_in_recompute` makes
    every checkpoint the package makes re-enter it for its recompute, through torch's public ``context_fn``
    (:mod:`lowmem_alignprop.memory.recompute`; the CPU autocast state is replayed by checkpointing itself)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def active(self):
        return torch.autocast("cpu", dtype=self.dtype)

    def replay_in_recompute(self):
        """While active, every checkpoint made by :func:`memory.recompute.checkpoint` re-enters this mode in its
        recompute."""
        dtype = self.dtype
        return recompute_inside(lambda: CudaAutocast(dtype))

    def _lower(self, t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype == torch.float32:
            return t.to(self.dtype)
        return t

    @staticmethod
    def _upper(t):
        if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16):
            return t.float()
        return t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not (name in _FP32 or name in _FP32_OUT or name in _LOWER_CUDA_ONLY) \
                or not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        from torch.utils._pytree import tree_map
        if name in _LOWER_CUDA_ONLY:
            return func(*tree_map(self._lower, args), **tree_map(self._lower, kwargs))
        if name in _FP32:
            if name == "interpolate" and (kwargs.get("mode") or (args[3] if len(args) > 3 else "nearest")) == "area":
                return func(*args, **kwargs)  # area interpolation is adaptive pooling: not on the fp32 list
            return func(*tree_map(self._upper, args), **tree_map(self._upper, kwargs))
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.dtype in (torch.float16, torch.bfloat16) \
                and kwargs.get("dtype") is None:
            try:
                return func(*args, **dict(kwargs, dtype=torch.float32))  # autocast's fp32 output for reductions
            except TypeError:
                return func(self._upper(first), *args[1:], **kwargs)
        return func(*args, **kwargs)

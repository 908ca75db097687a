"""The package's one gradient checkpoint: torch's non-reentrant ``torch.utils.checkpoint.checkpoint``, used by every
checkpoint a step makes (the rollout's one per model call, UNet/transformer blocks through diffusers'
``enable_gradient_checkpointing(module_checkpoint)``, VAE blocks and resnets, decode tiles, reward layers).

Why one place: the planner emulates ``torch.autocast("cuda")`` on fake CPU tensors with a ``TorchFunctionMode``
(``measure/cuda_autocast.CudaAutocast``). The autograd engine runs backward with the torch-function modes of the
``backward()`` call, and a mode is off inside its own handler, so a checkpoint's recompute would run without the
emulation (and fail checkpointing's dtype check). :func:`recompute_inside` names a context that every checkpoint
made while it is active enters for its recompute, through torch's public ``context_fn``. Training never sets one,
so its checkpoints are torch's plain ones.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager, Iterator

import torch.utils.checkpoint
from torch.utils._pytree import tree_flatten, tree_unflatten

_recompute_contexts: list[Callable[[], ContextManager]] = []


def checkpoint(fn, *args, context_fn: Callable[[], tuple[ContextManager, ContextManager]] | None = None, **kwargs):
    """``torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)`` keeps only ``args`` and recomputes
    ``fn`` in backward; ``context_fn`` as torch's. Its recompute also enters the :func:`recompute_inside` contexts
    active now (checkpoint() is looked up at call time: tests count the checkpoints a step opens).

    Tensors inside the containers of ``args`` (tuples, lists, dicts: torch's pytree) and in ``kwargs`` (FLUX blocks
    get their rotary embeddings as a ``(cos, sin)`` tuple) are handed to torch as tensors of their own: torch saves a
    checkpoint's tensor inputs through the saved-tensor hooks active around it, so an enclosing checkpoint (the
    rollout's one per model call) drops them until its recompute, but keeps any other argument as it is, alive with
    the graph: FLUX kept its rotary embeddings (4.5 MiB at 1024 px) once per step of the gradient window."""
    extra = tuple(_recompute_contexts)
    if extra:
        context_fn = _with_extra(context_fn or torch.utils.checkpoint.noop_context_fn, extra)
    options = {"use_reentrant": False} if context_fn is None else {"use_reentrant": False, "context_fn": context_fn}
    leaves, spec = tree_flatten((args, kwargs))
    at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    if not kwargs and len(at) == sum(isinstance(a, torch.Tensor) for a in args):  # all plain arguments
        return torch.utils.checkpoint.checkpoint(fn, *args, **options)
    tensors = [leaves[i] for i in at]
    for i in at:  # the recompute's closure holds no tensor: torch keeps them, the outer checkpoint drops them
        leaves[i] = None

    def call(*inputs):
        filled = list(leaves)
        for i, tensor in zip(at, inputs):
            filled[i] = tensor
        call_args, call_kwargs = tree_unflatten(filled, spec)
        return fn(*call_args, **call_kwargs)

    return torch.utils.checkpoint.checkpoint(call, *tensors, **options)


def checkpoint_modules(modules) -> int:
    """Wrap each module's forward in :func:`checkpoint` (active only when grad is on); returns how many were wrapped
    now (a module wrapped before is skipped)."""
    count = 0
    for m in modules:
        if getattr(m, "_lowmem_ckpt", False):
            continue
        plain = m.forward

        @functools.wraps(plain)
        def wrapped(*args, _plain=plain, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_plain, *args, **kwargs)
            return _plain(*args, **kwargs)

        m.forward = wrapped
        m._lowmem_ckpt = True
        count += 1
    return count


def module_checkpoint(module, *args, **kwargs):
    """diffusers' ``gradient_checkpointing_func``: checkpoint one block call (``module(*args)``)."""
    return checkpoint(module.__call__, *args, **kwargs)


@contextlib.contextmanager
def recompute_inside(make_context: Callable[[], ContextManager]) -> Iterator[None]:
    """Every checkpoint made while this is active recomputes inside a fresh ``make_context()`` too, whenever its
    backward runs."""
    _recompute_contexts.append(make_context)
    try:
        yield
    finally:
        _recompute_contexts.remove(make_context)


def _with_extra(context_fn, extra):
    """``context_fn`` whose recompute context also enters a fresh context of each of ``extra``."""
    def contexts():
        forward_ctx, recompute_ctx = context_fn()
        return forward_ctx, _entered([make() for make in extra] + [recompute_ctx])

    return contexts


@contextlib.contextmanager
def _entered(contexts: list[ContextManager]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for ctx in contexts:
            stack.enter_context(ctx)
        yield

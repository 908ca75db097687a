"""The one place this package reaches into a private torch function, and why.

The planner emulates ``torch.autocast("cuda")`` on a CPU-only build with a ``TorchFunctionMode``
(:class:`lowmem_alignprop.measure.planner.CudaAutocast`, docs/design.md section 4). The autograd engine does not carry
torch-function modes into backward, so the recompute of a non-reentrant checkpoint would run without the mode
(and fail checkpointing's dtype check). ``torch.utils.checkpoint.checkpoint`` takes a public ``context_fn`` for
that, but most checkpoints of a step are made inside diffusers and transformers (their gradient checkpointing),
which cannot be given one. So, while an estimate runs, :func:`recompute_inside` wraps the private
``torch.utils.checkpoint._checkpoint_without_reentrant_generator`` (looked up by ``checkpoint()`` at call time) so
that every recompute enters one more context. Training never uses it.

``tests/test_torch_private.py`` fails loudly when torch renames that function or changes its first parameters.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

import torch.utils.checkpoint as _checkpoint

NAME = "_checkpoint_without_reentrant_generator"
LEADING_PARAMETERS = ("fn", "preserve_rng_state", "context_fn")  # what the wrapper relies on


@contextlib.contextmanager
def recompute_inside(make_context: Callable[[], ContextManager]) -> Iterator[None]:
    """Every non-reentrant checkpoint's recompute (made while this is active) runs inside ``make_context()``, as
    well as inside the recompute context checkpointing itself provides (autocast state, RNG)."""
    plain = getattr(_checkpoint, NAME)

    def generator(fn, preserve_rng_state, context_fn, *rest, **kwargs):
        def contexts():
            forward_ctx, recompute_ctx = context_fn()
            stack = contextlib.ExitStack()

            class _Recompute:
                def __enter__(self):
                    stack.enter_context(make_context())
                    stack.enter_context(recompute_ctx)

                def __exit__(self, *exc):
                    return stack.__exit__(*exc)

            return forward_ctx, _Recompute()

        return plain(fn, preserve_rng_state, contexts, *rest, **kwargs)

    setattr(_checkpoint, NAME, generator)
    try:
        yield
    finally:
        setattr(_checkpoint, NAME, plain)

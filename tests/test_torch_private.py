"""The private torch function the planner's autocast emulation wraps (lowmem_alignprop/memory/torch_private.py): fails
loudly when torch renames it or changes the parameters the wrapper relies on."""

import contextlib
import inspect

import torch
import torch.utils.checkpoint

from lowmem_alignprop.memory import torch_private


def test_torch_still_has_the_private_checkpoint_generator_the_planner_wraps():
    fn = getattr(torch.utils.checkpoint, torch_private.NAME, None)
    assert fn is not None, (f"torch {torch.__version__} has no torch.utils.checkpoint.{torch_private.NAME}: the "
                            "planner's CUDA autocast emulation must find another way into a checkpoint's recompute")
    params = tuple(inspect.signature(fn).parameters)[:len(torch_private.LEADING_PARAMETERS)]
    assert params == torch_private.LEADING_PARAMETERS, f"its parameters changed in torch {torch.__version__}: {params}"
    assert torch_private.NAME in inspect.getsource(torch.utils.checkpoint.checkpoint)  # checkpoint() calls it


def test_a_recompute_enters_the_context_and_the_function_is_restored():
    entered = []

    @contextlib.contextmanager
    def marker():
        entered.append(torch.is_grad_enabled())
        yield

    plain = getattr(torch.utils.checkpoint, torch_private.NAME)
    x = torch.ones(3, requires_grad=True)
    with torch_private.recompute_inside(marker):
        y = torch.utils.checkpoint.checkpoint(lambda t: (t * 2).sin(), x, use_reentrant=False)
        assert entered == []  # not in the forward
        y.sum().backward()
    assert len(entered) == 1  # once, in the recompute
    assert getattr(torch.utils.checkpoint, torch_private.NAME) is plain
    assert torch.allclose(x.grad, 2 * (2 * x.detach()).cos())

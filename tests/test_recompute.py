"""The package's one gradient checkpoint (``memory/recompute.checkpoint``) keeps what torch keeps of a checkpoint's
inputs, whatever shape the arguments come in, and gives the gradient of plain autograd."""

from __future__ import annotations

import gc
import weakref

import torch

from numerics import SAME_OPS, assert_rel_close

from lowmem_alignprop.memory.recompute import checkpoint


def _model(nested: bool):
    """A call made of two blocks, as a FLUX transformer call: the call makes a fresh ``(cos, sin)`` tuple (FLUX's
    rotary embeddings) and a dict with a tensor and hands them to each block, both checkpointed when ``nested``."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8) / 3)
    made: list[weakref.ref] = []

    def block(x, rope, scale=None):
        cos, sin = rope
        return torch.tanh(x @ w) * cos + sin * scale["s"]

    def call(x):
        angles = torch.linspace(0, 3, 8).repeat(4, 1) * (1 + x.detach().mean())  # made inside the call
        rope = (torch.cos(angles), torch.sin(angles))
        made.extend(weakref.ref(t) for t in rope)
        scale = {"s": torch.full((4, 8), 0.5)}
        run = checkpoint if nested else (lambda f, *a, **k: f(*a, **k))
        h = run(block, x, rope, scale=scale)
        return run(block, h, rope, scale=scale)

    return w, made, call


def test_an_outer_checkpoint_drops_the_tensors_inside_a_nested_ones_tuple_and_dict_arguments():
    """The rollout checkpoints each model call and, with unet_checkpointing=blocks, each block inside it. torch keeps
    a non-tensor argument of the inner checkpoint as it is, alive with the graph, so the tensors in FLUX's rotary
    tuple outlived the call once per step of the gradient window. They must be freed when the call returns and made
    again by the recompute, and the gradient must be plain autograd's."""
    x = torch.randn(4, 8)
    w_ref, _, plain_call = _model(nested=False)
    plain_call(x).pow(2).sum().backward()

    w, made, call = _model(nested=True)
    out = checkpoint(call, x)
    gc.collect()
    alive = [ref() is not None for ref in made]
    assert len(alive) == 2 and not any(alive), alive  # the old checkpoint kept both: [True, True]
    out.pow(2).sum().backward()
    assert len(made) == 4  # the backward made them again, in the recompute
    assert_rel_close(w.grad, w_ref.grad, SAME_OPS)  # a recompute: the same operations


def test_checkpoint_modules_wraps_each_module_once_and_only_with_gradients_on(monkeypatch):
    """checkpoint_modules wraps each forward in one checkpoint, counts only the modules it wrapped now, and leaves a
    module wrapped before as it is (wrapped again, each call would nest a second checkpoint: a second recompute in
    backward); without gradients the forward runs plain."""
    from lowmem_alignprop.memory import recompute

    opened = []
    real = recompute.checkpoint
    monkeypatch.setattr(recompute, "checkpoint", lambda fn, *a, **k: opened.append(fn) or real(fn, *a, **k))
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 4) for _ in range(2)]
    x = torch.randn(3, 4)
    want = layers[1](layers[0](x))
    assert recompute.checkpoint_modules(layers) == 2
    assert recompute.checkpoint_modules([*layers, torch.nn.Linear(4, 4)]) == 1  # only the new one
    out = layers[1](layers[0](x))
    assert len(opened) == 2 and torch.equal(out, want)  # one checkpoint per module call
    with torch.no_grad():
        layers[0](x)
    assert len(opened) == 2

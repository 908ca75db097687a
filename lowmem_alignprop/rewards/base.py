"""The reward base class and the two composite rewards (weighted sum, user callable)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import weakref
from typing import Callable, Sequence

import torch

from lowmem_alignprop.settings.errors import UserError, error_words


# what a reward whose scores no image reaches did, and the fix (after its name; the start-up probe's words too)
NOT_FROM_IMAGES = ("returned scores that do not depend on the images (their gradient never reaches them: a constant, "
                   "or a tensor made with requires_grad=True, e.g. .detach().requires_grad_()?): compute the scores "
                   "from the images")


def scored_apart(reward, images: torch.Tensor, prompts: list[str], spec: str, when: str, fix: str) -> torch.Tensor:
    """``reward``'s scores (float) of images outside a training step (the run's samples and evaluation, ``sample``'s
    grid): any failure of the reward's code, sys.exit and a KeyboardInterrupt of its own included, becomes one line
    naming ``spec``, ``when`` and ``fix``; a UserError, running out of memory and the user's Ctrl-C pass (the command
    receives that as run.stop_request.CtrlC: telling_ctrl_c, a training run's stop request)."""
    from lowmem_alignprop.run.faults import OOM_ERRORS
    from lowmem_alignprop.run.stop_request import CtrlC

    try:
        return reward(images, prompts).float()
    except (UserError, CtrlC, *OOM_ERRORS):
        raise
    except BaseException as e:  # the user's code: any failure, sys.exit and KeyboardInterrupt included
        raise UserError(f"the reward {spec!r} raised {error_words(e, when=when)}; {fix}") from None


class ScoresNotFromImages(UserError):
    """A reward returned scores that are a leaf needing a gradient: no image is in their graph (the start-up probe
    says it after what it called)."""


class RewardModule(torch.nn.Module):
    """A frozen, differentiable reward: ``scores = reward(images, prompts)``.

    ``images`` is a float tensor ``[B, 3, H, W]`` in ``[0, 1]`` (any H, W), ``prompts`` a list of B strings;
    the result is a float32 tensor ``[B]`` that is differentiable w.r.t. ``images``.
    Subclasses implement :meth:`score`; :meth:`forward` checks the inputs and the result's shape.
    Every reward is frozen (no parameter requires grad) and stays in eval mode: ``train()`` is a no-op,
    so a trainer calling ``model.train()`` on a parent module never switches on the reward's dropouts.
    """

    name: str = "reward"

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"reward {self.name!r}: images must be a [B, 3, H, W] tensor, got {shape}")
        batch = images.shape[0]
        if prompts is None:
            prompts = [""] * batch
        elif isinstance(prompts, str):
            prompts = [prompts] * batch
        prompts = list(prompts)
        if len(prompts) != batch:
            raise ValueError(f"reward {self.name!r}: {batch} images but {len(prompts)} prompts")
        scores = self.score(images, prompts)
        return _check_scores(scores, batch, self.name, images.device, from_images=images.requires_grad)

    def freeze(self) -> "RewardModule":
        """requires_grad False on every parameter, eval mode; returns self."""
        for p in self.parameters():
            p.requires_grad_(False)
        torch.nn.Module.train(self, False)
        return self

    def train(self, mode: bool = True) -> "RewardModule":
        # Frozen reward: always eval (dropouts off), whatever the parent module asks for.
        return torch.nn.Module.train(self, False)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def _check_scores(scores, batch: int, name: str, device: torch.device | None = None, *,
                  from_images: bool = False) -> torch.Tensor:
    """``from_images``: the images need a gradient (training's batches, the start-up probe)."""
    if not torch.is_tensor(scores):
        raise UserError(f"reward {name!r} returned {type(scores).__name__}, expected a tensor of shape [{batch}]; "
                        "make the reward function return one differentiable score per image")
    if from_images and scores.requires_grad and scores.grad_fn is None:  # a leaf: no image is in its graph (the
        # backward reached no LoRA weight and the step counted as trained, in silence)
        raise ScoresNotFromImages(f"reward {name!r} {NOT_FROM_IMAGES}")
    if scores.is_meta:  # shapes without values: nothing to train on (it failed later in .item())
        raise UserError(f"reward {name!r} returned scores on the meta device, which hold no values; return them "
                        "on the images' device (images.device)")
    if scores.is_complex():  # .float() would drop the imaginary part without a word
        raise UserError(f"reward {name!r} returned complex scores ({scores.dtype}); return one real score per image")
    if not scores.is_floating_point() and torch.is_grad_enabled():  # the cast below would hide why it has no gradient
        raise UserError(f"reward {name!r} returned {scores.dtype} scores, which carry no gradient (AlignProp "
                        "backpropagates through the reward): return float scores computed from the images")
    if device is not None and scores.device != device:  # computed on the CPU from the card's images: brought back
        scores = scores.to(device)  # (differentiable: the gradient goes back the same way)
    if scores.dim() == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if scores.shape != (batch,):
        raise UserError(f"reward {name!r} returned shape {tuple(scores.shape)}, expected [{batch}]; "
                        "make the reward function return one score per image")
    return scores.float()


class WeightedSumReward(RewardModule):
    """``sum_i w_i * reward_i(images, prompts)``."""

    def __init__(self, terms: Sequence[tuple[RewardModule, float]]):
        super().__init__()
        self.rewards = torch.nn.ModuleList([r for r, _ in terms])
        self.weights = [float(w) for _, w in terms]
        self.name = ",".join(f"{r.name}:{w:g}" for r, w in terms)

    def score(self, images, prompts):
        total = None
        self.last_terms = {}  # each term's unweighted scores of this call, detached: the metrics show each one
        for reward, weight in zip(self.rewards, self.weights):
            scores = reward(images, prompts)
            self.last_terms[reward.name] = scores.detach()
            total = weight * scores if total is None else total + weight * scores
        return total


def callable_label(fn) -> str:
    """How a user callable is named in messages: ``redness``, ``partial(redness)``, ``Scorer.__call__``."""
    if isinstance(fn, functools.partial):
        return f"partial({callable_label(fn.func)})"
    if isinstance(fn, torch.nn.Module):
        return f"{type(fn).__qualname__}.forward"
    if hasattr(fn, "__qualname__") and (inspect.isroutine(fn) or inspect.isclass(fn)):
        return fn.__qualname__
    return f"{type(fn).__qualname__}.__call__"


def takes_prompts(fn, name: str, label: str) -> bool:
    """The reward contract, read from ``fn``'s signature without guessing what ``fn`` is: the first positional
    parameter takes the images; the prompts are passed as the second when ``fn`` accepts a second positional
    argument. True: ``fn(images, prompts)``; False: ``fn(images)``; UserError if it cannot take the images so."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # no signature to read (a builtin): the documented form
        return True
    for args, result in (((0, 1), True), ((0,), False)):
        try:
            sig.bind(*args)
            return result
        except TypeError:
            continue
    factory = f"; if {label} builds the reward (a factory), write it as '{name}()'" if _unmarked_term(name) else ""
    raise UserError(f"reward {name!r}: {label}{sig} cannot be called with the images as its first argument (tried "
                    f"{label}(images, prompts) and {label}(images)); a reward is f(images) or f(images, prompts) "
                    f"-> tensor[B]{factory}")


def _unmarked_term(name: str) -> bool:
    """True when ``name`` is a 'module:function' term that is not already marked as a factory."""
    return ":" in name and not name.rstrip().endswith(")")


_SAID_TORCH_STATE: weakref.WeakSet = weakref.WeakSet()  # user functions whose change of torch's settings was said


def _said_before(fn) -> bool:
    """Whether ``fn``'s change of torch's settings was said already; marks it said (an object that takes no weak
    reference is said each time)."""
    try:
        if fn in _SAID_TORCH_STATE:
            return True
        _SAID_TORCH_STATE.add(fn)
    except TypeError:
        pass
    return False


@contextlib.contextmanager
def torch_state_kept(name: str, what: str, said_once_for=None, after: str = "after each call"):
    """torch's global settings as the user's code ``what`` (a reward's call, its module's import, its factory) found
    them: one that switches gradients off or changes the default dtype (torch.set_grad_enabled,
    torch.set_default_dtype) would change the rest of the run without a word (an import that switched gradients
    off failed the start-up test as "no gradient to the images (a .detach() inside?)"); the working directory too,
    from which the command reads the relative paths it was given (an import that os.chdir()ed sent a relative
    --output-dir there, a call on sample's images its results). Said as a warning naming the reward ``name``, once
    per ``said_once_for`` (an object; None: each time)."""
    grad, dtype, cwd = torch.is_grad_enabled(), torch.get_default_dtype(), _working_directory()
    try:
        yield
    finally:
        now = _working_directory() if cwd is not None else None
        changed = [f"{setting} {a} -> {b}" for setting, a, b in (
            ("gradients enabled", grad, torch.is_grad_enabled()), ("default dtype", dtype, torch.get_default_dtype()),
            ("working directory", cwd, now)) if a != b]
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        if cwd is not None and now != cwd:
            with contextlib.suppress(OSError):  # (removed meanwhile: the command says so where it reads a path)
                os.chdir(cwd)
        if changed and (said_once_for is None or not _said_before(said_once_for)):
            logging.getLogger("lowmem_alignprop").warning(
                "reward %r: %s changed %s global settings (%s); set back %s: a reward must leave them as it "
                "found them", name, what, "the process's" if now != cwd else "torch's", ", ".join(changed), after)


def _working_directory() -> str | None:
    """os.getcwd(), or None where it was removed (the command says so where it reads a relative path)."""
    try:
        return os.getcwd()
    except OSError:
        return None


class CallableReward(RewardModule):
    """Wraps a user reward: a callable (function, ``functools.partial``, callable object or ``nn.Module``) whose
    first positional parameter takes the images; it is called ``fn(images, prompts)`` when it accepts a second
    positional argument, else ``fn(images)`` (see :func:`takes_prompts`). ``label`` names it in messages."""

    def __init__(self, fn: Callable, name: str, label: str | None = None):
        super().__init__()
        self.name = name
        self.label = label or callable_label(fn)
        self.takes_prompts = takes_prompts(fn, name, self.label)
        self.call = f"{self.label}(images, prompts)" if self.takes_prompts else f"{self.label}(images)"
        if isinstance(fn, torch.nn.Module):
            self.inner = fn  # registered, so .to(device) / offloading reaches its weights
            self._fn = None
        else:
            self._fn = fn

    def score(self, images, prompts):
        fn = self.inner if self._fn is None else self._fn
        version = images._version  # (bumped by an in-place change of the images or of a view of them)
        with torch_state_kept(self.name, self.call, fn):  # once per function, however often the reward is built
            scores = fn(images, prompts) if self.takes_prompts else fn(images)
        if images._version != version:  # the run keeps the images after the reward: grids, fidelity, JPEG sizes
            raise UserError(f"reward {self.name!r}: {self.call} changed its images in place (images.clamp_(), "
                            "images *= ..., images[...] = ...): the run keeps and judges them after the reward; "
                            "work on a copy (images = images.clamp(...), or images.clone())")
        if callable(scores) and not torch.is_tensor(scores):
            factory = (f"; if {self.label} builds the reward (a factory), write it as '{self.name}()'"
                       if _unmarked_term(self.name) else "")
            raise UserError(f"reward {self.name!r}: called {self.call} and it returned {callable_label(scores)} "
                            f"(a {type(scores).__name__}), not a tensor of scores{factory}")
        return scores

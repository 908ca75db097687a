"""The reward base class and the two composite rewards (weighted sum, user callable)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import UserError


class RewardModule(torch.nn.Module):
    """A frozen, differentiable reward: ``scores = reward(images, prompts)``.

    ``images`` is a float tensor ``[B, 3, H, W]`` in ``[0, 1]`` (any H, W), ``prompts`` a list of B strings;
    the result is a float32 tensor ``[B]`` that is differentiable w.r.t. ``images``.
    Subclasses implement :meth:`score`; :meth:`forward` checks the inputs and the result's shape.
    Every reward is frozen (no parameter requires grad) and stays in eval mode: ``train()`` is a no-op,
    so a trainer calling ``model.train()`` on a parent module never switches on the reward's dropouts.
    """

    name: str = "reward"
    higher_is_better: bool = True

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
        return _check_scores(scores, batch, self.name)

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


def _check_scores(scores, batch: int, name: str) -> torch.Tensor:
    if not torch.is_tensor(scores):
        raise UserError(f"reward {name!r} returned {type(scores).__name__}, expected a tensor of shape [{batch}]; "
                        "make the reward function return one differentiable score per image")
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
        for reward, weight in zip(self.rewards, self.weights):
            part = weight * reward(images, prompts)
            total = part if total is None else total + part
        return total

    def components(self, images, prompts) -> dict[str, torch.Tensor]:
        """Each term's unweighted score (for logging)."""
        return {r.name: r(images, prompts) for r in self.rewards}


class CallableReward(RewardModule):
    """Wraps a user function ``fn(images, prompts) -> tensor[B]`` (or any callable module)."""

    def __init__(self, fn: Callable, name: str):
        super().__init__()
        self.name = name
        if isinstance(fn, torch.nn.Module):
            self.inner = fn  # registered, so .to(device) / offloading reaches its weights
            self._fn = None
        else:
            self._fn = fn

    def score(self, images, prompts):
        fn = self.inner if self._fn is None else self._fn
        return fn(images, prompts)

"""The optimizer stage of a training step (clip, step, zero the gradients), shared by the trainer and the planner.

What differs between them is passed in: how the gradients are clipped (the accelerator's ``clip_grad_norm_``, which
unscales fp16 gradients and knows DeepSpeed, or torch's), whether the optimizer runs at all (the planner's stand-in
for 8-bit Adam does not), and whether a gradient norm that is not finite drops the update (the trainer without a
GradScaler or DeepSpeed engine, which skip such a step themselves; the planner's fake norm has no value to test).
See docs/design.md section 1 (the stages) and section 5 (NaN/inf).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch


def optimizer_update(optimizer, params: list, max_grad_norm: float, *,
                     clip: Callable = torch.nn.utils.clip_grad_norm_, step: bool = True, read_norm: bool = True,
                     drop_if_not_finite: bool = False,
                     on_drop: Callable[[], None] | None = None) -> tuple[float | None, bool]:
    """Clip the gradients of ``params`` to ``max_grad_norm`` (no clipping when it is 0), step ``optimizer`` and free
    the gradients. Returns (the gradient norm before clipping, as a number; None without clipping, unless
    ``drop_if_not_finite`` needs it, or without ``read_norm``; whether the update was dropped). With
    ``drop_if_not_finite`` a NaN/inf norm frees the gradients without a step (``on_drop`` is called first, the
    gradients still there), with or without clipping. The norm's tensor is gone before the step either way
    (``read_norm=False``: a fake tensor has no value to read)."""
    # no clipping: the norm alone (a clip to infinity scales by 1) when a NaN/inf gradient must not reach the weights
    limit = max_grad_norm if max_grad_norm > 0 else math.inf if drop_if_not_finite else None
    norm = clip(params, limit) if limit is not None else None
    norm = float(norm) if read_norm and norm is not None else None  # one device sync; the metrics need it anyway
    if drop_if_not_finite and norm is not None and not math.isfinite(norm):
        if on_drop is not None:
            on_drop()
        optimizer.zero_grad(set_to_none=True)  # gradients are all-reduced: every rank drops the same update
        return norm, True
    if step:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # free the gradients as soon as possible
    return norm, False


# lr_scheduler's names -> diffusers' get_scheduler's (each with lr_warmup_steps' linear warmup before it)
LR_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


class LearningRate:
    """lr_scheduler and lr_warmup_steps: each optimizer step's learning rate, lr times diffusers' schedule
    (``get_scheduler``: a linear warmup from 0, then constant, or linear or cosine toward 0, reached after step
    ``steps``). A function of the step number alone, set before the step: a resumed, retried or skipped step gets the
    rate it would have had. The default (constant, no warmup) touches nothing: the rate stays the optimizer's own."""

    def __init__(self, optimizer, cfg):
        self.optimizer, self.lr, self.schedule = optimizer, cfg.lr, None
        if cfg.lr_scheduler != "constant" or cfg.lr_warmup_steps:
            from diffusers.optimization import get_scheduler

            self.schedule = get_scheduler(LR_SCHEDULES[cfg.lr_scheduler], optimizer,
                                          num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps)

    def rate(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (1 = the first): diffusers' schedule after ``step - 1``
        updates, as its training scripts step it."""
        return self.lr if self.schedule is None else self.lr * self.schedule.lr_lambdas[0](step - 1)

    def at(self, step: int) -> None:
        """Give the optimizer the learning rate of step ``step``."""
        if self.schedule is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.rate(step)

    def current(self) -> float:
        """The rate the optimizer steps with now (the metrics' ``lr``)."""
        return self.optimizer.param_groups[0]["lr"]


def moved_schedule_note(saved: dict, cfg, step: int) -> str | None:
    """What a resume from ``step`` that moves the run's last step (``saved``: the checkpoint's config) does to a
    decaying schedule: the rates from the next step on are the new schedule's, which may rise where the old one had
    decayed; None where nothing moves (a constant rate, the same steps)."""
    from types import SimpleNamespace

    if cfg.lr_scheduler == "constant" or saved.get("steps", cfg.steps) == cfg.steps or step >= cfg.steps:
        return None
    old = SimpleNamespace(**{k: saved.get(k, getattr(cfg, k)) for k in ("lr", "lr_scheduler", "lr_warmup_steps",
                                                                         "steps")})

    def rate(c, n):  # (on a throwaway optimizer: the run's own is untouched)
        return LearningRate(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=c.lr), c).rate(n)

    then, now = rate(old, step), rate(cfg, step + 1)
    last = f", {rate(cfg, cfg.steps):.3g} at step {cfg.steps}" if cfg.steps > step + 1 else ""
    return (f"resume: steps was {old.steps} in the checkpoint, now {cfg.steps}: from step {step + 1} the learning "
            f"rate follows the {cfg.steps}-step {cfg.lr_scheduler} schedule: {now:.3g} there, "
            f"{'up' if now > then else 'down'} from {then:.3g} at step {step} (the checkpoint's {old.steps}-step "
            f"{old.lr_scheduler} schedule){last}")


@dataclass
class StepUpdate:
    """What the optimizer stage of one step did, for its metrics line and the trainer's checks."""
    grad_norm: float | None = None  # before clipping; None where it was not read
    dropped: bool = False  # a NaN/inf gradient norm dropped the update
    non_finite_grads: str | None = None  # with ``dropped``: which LoRA gradients were NaN/inf
    scaler_skipped: bool = False  # fp16: the GradScaler skipped an overflowed update (and lowered its scale)
    grad_zero: bool = False  # the LoRA's gradient was exactly zero (the zero-gradient streak counts it)
    at_cap: bool = False  # reward_cap: every image at the cap, so no update was made


@dataclass
class StepOutcome:
    """One training step's result: its metrics row, or what was NaN/inf (the step skipped)."""
    row: dict | None
    bad: str | None = None
    update: StepUpdate = field(default_factory=StepUpdate)

"""Surviving bad luck: out-of-memory per stage (with ``--auto-fit``), NaN/inf rewards and losses.

Out of memory: every stage of a step runs inside :meth:`StageGuard.stage`, so an OOM error carries the
name of the stage it happened in. Without ``auto_fit`` the run stops with one message naming the stage,
the peak so far, the budget and the change that should fit; with it, :func:`next_fit` picks that change
(from the planner when it has a suggestion, else from a fixed ladder ordered by the stage), the loop
applies it to the live run and repeats the step.

Test hook: ``LOWMEM_ALIGNPROP_INJECT_OOM="stage[@step][*count]"`` (comma-separated) raises
``torch.OutOfMemoryError`` when that stage starts (at that step; ``count`` times, default once), so the
handling is exercised on a CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from lowmem_alignprop.memory import stages
from lowmem_alignprop.settings.config import set_flags
from lowmem_alignprop.settings.errors import UserError

log = logging.getLogger("lowmem_alignprop")

OOM_ERRORS = (torch.OutOfMemoryError, MemoryError)  # CUDA (and other accelerators) / host memory
HOST_OOM_TEXT = ("can't allocate memory", "cannot allocate memory")  # torch's CPU allocator: a RuntimeError


def is_oom(error: BaseException) -> bool:
    """Out of memory, on the device or the host (torch's CPU allocator raises RuntimeError, not MemoryError)."""
    if isinstance(error, OOM_ERRORS):
        return True
    return isinstance(error, RuntimeError) and any(t in str(error).lower() for t in HOST_OOM_TEXT)
INJECT_ENV = "LOWMEM_ALIGNPROP_INJECT_OOM"


class OutOfMemory(UserError):
    """Out of memory in a named stage and no (further) automatic fit: the message says what to change."""


class TrainingDiverged(UserError):
    """Too many steps in a row had a NaN/inf reward or loss."""


class AnotherProcessFailed(UserError):
    """Under a launcher, another process's step failed (its own error is its message): this one stops with it."""


# -- stages with a name ------------------------------------------------------------------------------

@dataclass
class _Injection:
    stage: str
    step: int | None
    count: int


def parse_injection(spec: str | None) -> list[_Injection]:
    """The test hook's ``STAGE[@STEP][*COUNT],...``; one line (UserError) for a malformed one (it was a traceback)."""
    out = []
    for item in (spec or "").split(","):
        part = item.strip()
        if not part:
            continue
        part, _, count = part.partition("*")
        part, _, step = part.partition("@")
        if part not in stages.STAGES or not (count or "1").isdigit() or not (step or "0").isdigit():
            raise UserError(f"{INJECT_ENV}={spec}: {item.strip()!r} is not STAGE[@STEP][*COUNT] (stages: "
                            f"{', '.join(stages.STAGES)})")
        out.append(_Injection(part, int(step) if step else None, int(count or 1)))
    return out


class StageGuard:
    """Wraps a ``stage(name)`` context (the profiler's): remembers the running stage, tags OOM errors
    with it, and injects test faults."""

    def __init__(self, stage_fn: Callable[[str], contextlib.AbstractContextManager]):
        self._stage_fn = stage_fn
        self.current: str | None = None
        self.step = 0
        self._inject = parse_injection(os.environ.get(INJECT_ENV))

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        previous, self.current = self.current, name
        try:
            with self._stage_fn(name):
                self._maybe_inject(name)
                yield
        except BaseException as e:  # a user reward's SystemExit too: the trainer names the stage's owner
            if getattr(e, "lowmem_stage", None) is None:
                with contextlib.suppress(AttributeError):  # (an exception type without a __dict__)
                    e.lowmem_stage = name  # the innermost stage is where memory ran out (or the error happened)
            raise
        finally:
            self.current = previous

    def _maybe_inject(self, name: str) -> None:
        for inj in self._inject:
            if inj.stage == name and inj.count > 0 and (inj.step is None or inj.step == self.step):
                inj.count -= 1
                raise torch.OutOfMemoryError(f"injected out-of-memory in stage {name} (test hook {INJECT_ENV})")


def stage_of(error: BaseException, default: str | None = None) -> str:
    return getattr(error, "lowmem_stage", None) or default or "unknown"


# -- what would fit ------------------------------------------------------------------------------------

@dataclass
class Fit:
    description: str
    overrides: dict

    def as_flags(self) -> str:
        return set_flags(self.overrides)


def _smaller_batch(cfg) -> Fit | None:
    if cfg.batch_size <= 1 or cfg.deepspeed_zero:  # DeepSpeed fixes the micro-batch in its engine
        return None
    b = max(d for d in range(1, cfg.batch_size) if cfg.batch_size % d == 0)
    ga = cfg.grad_accum * (cfg.batch_size // b)
    return Fit(f"micro-batch {cfg.batch_size} -> {b} with grad_accum {cfg.grad_accum} -> {ga} (same images per "
               "optimizer step, fewer at once)", {"batch_size": b, "grad_accum": ga})


def _flag(field: str, value, when: Callable, why: str) -> Callable:
    def fix(cfg) -> Fit | None:
        if getattr(cfg, field) == value or not when(cfg):
            return None
        return Fit(why, {field: value})
    return fix


_cuda = (lambda cfg: torch.cuda.is_available())
_always = (lambda cfg: True)
LADDER: dict[str, Callable] = {
    "batch": _smaller_batch,
    "vae_blocks": _flag("vae_checkpointing", "blocks", lambda c: c.vae_checkpointing == "none",
                        "checkpoint the VAE decoder per up-block (its activations are recomputed in backward)"),
    "unet_blocks": _flag("unet_checkpointing", "blocks", _always,
                         "checkpoint each UNet block (backward recomputes one block at a time)"),
    "reward_ckpt": _flag("reward_checkpointing", True, _always, "checkpoint the reward model's layers"),
    "vae_resnets": _flag("vae_checkpointing", "resnets", lambda c: c.vae_checkpointing == "blocks",
                         "checkpoint the VAE decoder per resnet (least memory)"),
    "sliced_decode": _flag("sliced_decode", True, lambda c: c.batch_size > 1 and not c.tiled_decode,
                           "decode one image at a time"),
    "cache_prompts": _flag("cache_prompt_embeddings", True, _always,
                           "cache the prompt embeddings (the text encoder leaves the GPU)"),
    "offload_frozen": _flag("offload_frozen", True, _cuda, "keep idle frozen modules on the CPU"),
    "unmerge": _flag("merge_lora_nograd", False, _always,
                     "run the no-grad calls through peft's LoRA layers (no merged copies of the adapted weights)"),
    "attention_sliced": _flag("attention", "sliced", _always, "sliced attention (lowest memory, slowest)"),
    "activation_offload": _flag("activation_offload", True, lambda c: _cuda(c) and c.vae_checkpointing != "none",
                                "offload checkpointed activations to the CPU"),
}
# The fixes that target each stage's own memory first; the rest of the ladder follows in LADDER's order.
STAGE_FIRST: dict[str, tuple[str, ...]] = {
    stages.ENCODE_PROMPTS: ("cache_prompts", "offload_frozen"),
    stages.SAMPLE_NOGRAD: ("unmerge", "attention_sliced", "batch", "offload_frozen"),
    stages.SAMPLE_GRAD: ("unet_blocks", "batch", "attention_sliced"),
    stages.DECODE: ("sliced_decode", "vae_blocks", "vae_resnets", "batch"),
    stages.REWARD: ("reward_ckpt", "batch"),
    stages.BACKWARD: ("vae_blocks", "unet_blocks", "reward_ckpt", "vae_resnets", "batch"),
    stages.OPTIMIZER: ("offload_frozen",),
    stages.LOAD: ("offload_frozen",),
}
# stages where no other rung lowers the peak (the weights, the optimizer's state: no activation is held there); the
# give-up line names what does (a micro-batch of 1 was advised for both)
ONLY_THEIRS = {stages.LOAD: "quantize the frozen base (--set base_quant=nf4, on a CUDA card) or use a smaller model",
               stages.OPTIMIZER: "an 8-bit optimizer state (--set optimizer=adamw8bit, on a CUDA card) or a lower "
                                 "lora_rank"}


def _valid(cfg, overrides: dict) -> bool:
    try:
        changed = cfg.with_changes(**overrides)
    except (UserError, TypeError):
        return False
    return any(getattr(changed, k) != getattr(cfg, k) for k in overrides)


def planner_fit(cfg, stage: str, suggest: Callable | None) -> Fit | None:
    """The planner's next feature for ``cfg`` (``suggest`` is :func:`lowmem_alignprop.measure.planner.next_feature`, passed in
    by the trainer: this module sits below the planner), if it offers one (any failure: None)."""
    if suggest is None:
        return None
    try:
        # estimated for where this run is, for the stage that ran out
        got = suggest(cfg, target="cuda" if torch.cuda.is_available() else "cpu", stage=stage)
    except Exception as e:  # the planner is advice: never let it hide the real error
        log.debug("planner suggestion failed: %s", e)
        return None
    if isinstance(got, Fit):
        return got
    if isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict):
        return Fit(str(got[0]), dict(got[1]))
    if isinstance(got, dict) and got:
        return Fit("the planner's next feature", dict(got))
    overrides = getattr(got, "overrides", None)
    if isinstance(overrides, dict) and overrides:
        return Fit(str(getattr(got, "description", "the planner's next feature")), dict(overrides))
    return None


# settings that act only while the models load (SD3/FLUX encode their prompt set there): no help after a step's OOM
AT_LOAD_ONLY = frozenset({"encode_on_cpu"})


def next_fit(cfg, stage: str, *, suggest: Callable | None = None, skip: tuple[str, ...] = ()) -> Fit | None:
    """The next change that lowers memory for an OOM in ``stage``: the planner's (``suggest``), else the ladder's
    (less its rungs in ``skip``: reward_ckpt for a reward without weights, whose retry changed nothing)."""
    if suggest is not None:
        fit = planner_fit(cfg, stage, suggest)
        if fit is not None and _valid(cfg, fit.overrides) and (stage == stages.LOAD
                                                                or not set(fit.overrides) <= AT_LOAD_ONLY):
            return fit
    order = list(STAGE_FIRST.get(stage, ())) + ([] if stage in ONLY_THEIRS else
                                                [k for k in LADDER if k not in STAGE_FIRST.get(stage, ())])
    for key in (k for k in order if k not in skip):
        fit = LADDER[key](cfg)
        if fit is not None and _valid(cfg, fit.overrides):
            return fit
    return None


# -- messages ------------------------------------------------------------------------------------------

def peak_so_far(history_peaks: list[float | None]) -> float | None:
    """GiB: the largest step peak seen, and on CUDA the peak since the profiler's last reset."""
    peaks = [p for p in history_peaks if p is not None]
    if torch.cuda.is_available():
        peaks.append(torch.cuda.max_memory_allocated() / 2**30)
    return max(peaks) if peaks else None


def oom_message(stage: str, step: int, peak_gb: float | None, budget_gb: float, fit: Fit | None,
                auto_fit: bool, batch: int = 2, size: str | None = None) -> str:
    """The line of an out-of-memory error; ``size``: the step's image size where the run has several ("64x32 px of
    sizes 32, 64x32"), said after the step."""
    peak = "n/a on this device" if peak_gb is None else f"{peak_gb:.2f} GiB"
    budget = f"{budget_gb:g} GiB budget" if budget_gb else "no budget set"
    when = "while the models load" if stage == stages.LOAD else f"at step {step}" + (f", at {size}" if size else "")
    msg = f"out of memory in stage '{stage}' {when} (peak so far {peak}, {budget})"
    if fit is None:
        smaller = "lower resolution or batch_size" if batch > 1 else "lower resolution"  # (batch 1: the least)
        fixes = ONLY_THEIRS.get(stage) or f"{smaller}, use a smaller model"
        return msg + f"; no lighter setting is left to try: {fixes}, or a card with more memory"
    # --auto-fit steps down within a run's steps, not while its models load
    tail = "" if auto_fit or stage == stages.LOAD else ", or rerun with --auto-fit to step down automatically"
    return msg + f"; this should fit: {fit.as_flags()} ({fit.description}){tail}"


def free_memory() -> None:
    """After an OOM: collect what the failed step left and drop the accelerator's cached blocks (accelerate's
    clear_device_cache: CUDA, XPU, MPS...), so the retry starts from a clean allocator."""
    from accelerate.utils.memory import clear_device_cache
    clear_device_cache(garbage_collection=True)


# -- NaN / inf -----------------------------------------------------------------------------------------

def finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors if t is not None)


class NonFiniteStreak:
    """Counts steps skipped for a NaN/inf reward, loss or gradient norm; too many in a row stop the run."""

    def __init__(self, limit: int):
        self.limit = limit
        self.run: list[int] = []
        self.skipped: list[int] = []
        self.what: list[str] = []  # what was not finite in each step of the run ("the reward", "the loss", ...)

    def bad(self, step: int, what: str, say: bool = True) -> bool:
        """Record a skipped step (``say``: with a warning; under a launcher rank 0's); True when the run must stop."""
        self.run.append(step)
        self.skipped.append(step)
        self.what.append(what)
        if say:
            log.warning("step %d skipped: %s is NaN or infinite (%d in a row; the run stops after %d in a row)", step,
                        what, len(self.run), self.limit)
        return len(self.run) >= self.limit

    def good(self) -> None:
        self.run, self.what = [], []

    def message(self, checkpoint, mixed_precision: str = "no") -> str:
        """The stop's line, with the fixes that fit what was not finite: a reward NaN on the untrained LoRA's images is
        the reward's own (no learning rate or precision makes it), fp16's overflow only under fp16."""
        whats = sorted(set(self.what)) or ["the reward or loss"]
        untrained = self.run[0] == 1
        fixes = [] if untrained and whats == ["the reward"] else ["lower the learning rate (--set lr=...)"]
        fixes.append("check the reward function" + (" (it scored the untrained LoRA's images NaN/inf)"
                                                    if untrained and whats == ["the reward"] else ""))
        if mixed_precision == "fp16":
            fixes.append("use --set mixed_precision=bf16 instead of fp16")
        return (f"stopped: {' or '.join(whats)} was NaN/inf in {len(self.run)} steps in a row (steps {self.run[0]}-"
                f"{self.run[-1]}); the LoRA is unchanged since step {self.run[0] - 1} and saved in {checkpoint}. "
                f"{fixes[0][0].upper()}{', or '.join(fixes)[1:]}; then --resume latest")


def isfinite_number(x) -> bool:
    return x is not None and math.isfinite(float(x))


def finite_or_none(x) -> float | None:
    """A figure for a JSON file (metrics.jsonl, best.json, before_after.json, summary.json): None (null) when it is
    NaN or infinite (JSON has no NaN, and a bare NaN breaks strict readers); the one rule for those figures."""
    return float(x) if isfinite_number(x) else None


def json_ready(obj):
    """``obj`` with every NaN or infinite float in it as None (:func:`finite_or_none`; summary.json of a run whose
    every step was skipped has no reward to compare)."""
    if isinstance(obj, float):
        return finite_or_none(obj)
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def non_finite_grads(model: torch.nn.Module, params: list) -> str:
    """``"3 of 266 LoRA tensors, from transformer_blocks.0.attn.to_q.lora_A.default.weight to ..."``: which of
    ``params``' gradients hold a NaN/inf (named as in ``model``), for a step skipped on its gradient norm."""
    names = {id(p): n for n, p in model.named_parameters()}
    bad = [names.get(id(p), f"#{i}") for i, p in enumerate(params)
           if p.grad is not None and not bool(torch.isfinite(p.grad.detach()).all())]
    where = "" if not bad else f", {bad[0]}" if len(bad) == 1 else f", from {bad[0]} to {bad[-1]}"
    return f"{len(bad)} of {len(params)} LoRA tensors{where}"


def all_zero(grad_norm, params) -> bool:
    """The gradients of ``params`` are all exactly zero (or absent): from the clip's total norm when there is one,
    else from the largest gradient entry (one device sync either way)."""
    if grad_norm is not None:
        return float(grad_norm) == 0.0
    grads = [p.grad.detach() for p in params if p.grad is not None]
    return not grads or float(torch.stack([g.abs().amax().float() for g in grads]).amax()) == 0.0


class ZeroGradStreak:
    """Counts optimizer steps in a row whose LoRA gradient was exactly zero: the reward's gradient does not reach the
    trained weights (a reward that saturates, thresholds, or multiplies by 0 on the training batches), so the run
    would report success without learning. ``limit`` in a row stop the run (0: never)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.run: list[int] = []

    def step(self, step: int, zero: bool) -> bool:
        """Record a step; True when the run must stop."""
        self.run = self.run + [step] if zero else []
        return bool(self.limit) and len(self.run) >= self.limit

    def message(self, reward: str, checkpoint) -> str:
        return (f"stopped: the LoRA's gradient was exactly zero in {len(self.run)} steps in a row (steps "
                f"{self.run[0]}-{self.run[-1]}): the reward {reward!r} gives no gradient through the images to the "
                f"LoRA on these batches (a threshold, a saturated or constant score?), so training learns nothing; "
                f"the steps so far are saved in {checkpoint}. Fix the reward, then --resume latest "
                "(--set max_zero_grad_steps=0 trains on regardless)")

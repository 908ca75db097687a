"""``--max-minutes M`` (max_minutes): a run on rented time stops *before* its limit with its outputs written.

The clock starts when the command starts (loading the model is rented time too). Before each step the run asks
:func:`stops_before_next_step` whether the time used, one more step and the end's work would pass the limit; if so it
saves a checkpoint and ends as a finished run ends (lora/, the after samples, summary.json, exports), and
``--resume latest`` trains the remaining steps with a new clock. See README ("Scaling out, resuming, and what goes
wrong") and docs/outputs.md (summary.json's ``time_limit``).
"""

from __future__ import annotations

import time

from lowmem_alignprop.settings.config import TIME_LIMIT_MARGIN_S

clock = time.monotonic  # the deadline's clock (seconds); tests inject their own

END_MARGIN_S = TIME_LIMIT_MARGIN_S  # the end's work besides the last checkpoint: reports, summary, exports, the exit
# a disk's write speed assumed for the last checkpoint and the LoRA until a checkpoint of this start is timed (a slow
# cloud volume's; a local SSD writes 10x faster)
ASSUMED_WRITE_BYTES_S = 100e6


def stops_before_next_step(used_s: float, limit_s: float, slowest_step_s: float | None, renders_s: float,
                           writes_s: float, margin_s: float = END_MARGIN_S) -> bool:
    """Whether the run must stop now, before its next step, to end within ``limit_s`` seconds (0: no limit).

    ``used_s``: seconds since the command started. ``slowest_step_s``: the slowest step this run has timed so far
    (the first step counted; its wall time from the decision before it to the one after it, its evaluation, sample
    grid and judged images included), None before any is known: then only the end's work is counted. The end's work:
    ``renders_s`` (the after samples and the toy world's judged images, as long as the "before" ones took), ``writes_s``
    (the last checkpoint and the LoRA) and ``margin_s`` (the rest of the end: reports, summary, exports, the exit).

    >>> stops_before_next_step(used_s=1800, limit_s=3600, slowest_step_s=600, renders_s=120, writes_s=30)
    False
    >>> stops_before_next_step(used_s=2900, limit_s=3600, slowest_step_s=600, renders_s=120, writes_s=30)
    True
    """
    if limit_s <= 0:
        return False
    return used_s + (slowest_step_s or 0.0) + renders_s + writes_s + margin_s > limit_s


def next_step_s(steps: list[tuple[float, int | None]], next_pixels: int | None = None) -> float | None:
    """The next step's time as the timed ``steps`` tell it, ``(seconds, the pixels of its images)`` each: the slowest,
    a step at fewer pixels than the next one's (several sizes a run) scaled up by the pixel ratio, as the denoiser's
    and the decode's work grows with the pixels; None where none is timed. Pixels None (not known): taken as equal.

    >>> next_step_s([(300.0, 32 * 32), (1000.0, 64 * 64)], next_pixels=128 * 128)
    4800.0
    >>> next_step_s([(300.0, 64 * 64), (100.0, 32 * 32)], next_pixels=32 * 32)
    300.0
    """
    return max((s * max(1.0, next_pixels / p if next_pixels and p else 1.0) for s, p in steps), default=None)


def minutes(seconds: float) -> str:
    """'12.5 min'; under a minute '40 s', under 10 s '0.3 s'."""
    return f"{seconds / 60.0:.1f} min" if seconds >= 60 else f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


class TimeLimit:
    """A run's ``max_minutes``: what it has measured (its steps, its checkpoints, the before renders) and the rule.

    ``started``: :data:`clock`'s reading when the command started; ``steps_s``: the step seconds a resumed run's
    checkpoint recorded (its metrics rows' own times: the slowest stands for this start's steps until it has timed
    its first);
    ``end_bytes``: what the last checkpoint and the LoRA write (run/disk_space.run_bytes), timed at
    :data:`ASSUMED_WRITE_BYTES_S` until a checkpoint of this start is."""

    def __init__(self, max_minutes: float, started: float | None = None, steps_s: list[float] | None = None,
                 end_bytes: int = 0):
        self.limit_s = max(0.0, float(max_minutes or 0.0)) * 60.0
        self.started = clock() if started is None else started
        # the slowest step: a resume's recorded ones until this start has timed one of its own (they may be of another
        # card or configuration, and of no use once its own are known), then this start's (:meth:`step_done`)
        self.slowest_step_s = max(steps_s) if steps_s else None
        self.own_steps_s: list[float] = []
        self.own_pixels: list[int | None] = []  # the pixels of each own step's images (several sizes: its size's)
        self.renders_s = 0.0  # the before renders' seconds (the after ones take as long)
        self.slowest_checkpoint_s: float | None = None
        self.end_bytes = end_bytes
        self.lap_began = self.started
        self.stopped_at: int | None = None  # the step after which the limit stopped the run

    @property
    def on(self) -> bool:
        return self.limit_s > 0

    def used_s(self) -> float:
        return clock() - self.started

    def writes_s(self) -> float:
        """The last checkpoint and the LoRA: twice this start's slowest checkpoint, else the bytes at the assumed
        speed."""
        if self.slowest_checkpoint_s is not None:
            return 2 * self.slowest_checkpoint_s
        return self.end_bytes / ASSUMED_WRITE_BYTES_S

    def end_s(self) -> float:
        return self.renders_s + self.writes_s() + END_MARGIN_S

    def left_and_end(self) -> tuple[float, ...]:
        """The step line's (seconds this start has left, the end's work as :meth:`stops_now` counts it: the renders
        after the last step included), for TimeLeft.after_step's ``limit_s`` and ``end_s``; () without a limit."""
        return (self.limit_s - self.used_s(), self.end_s()) if self.on else ()

    def begin_lap(self) -> None:
        """The next step's time starts now (before the first step of a start)."""
        self.lap_began = clock()

    def step_done(self, less_s: float = 0.0, pixels: int | None = None, next_pixels: int | None = None) -> None:
        """The step since :meth:`begin_lap` ended (less ``less_s``: its checkpoint, which the end's work counts). The
        next step is predicted by this start's slowest step after its first, once there is one: the first carries
        the warm-up (torch.compile's compile, the allocator's and kernels' first calls, an evaluation owed from before
        the resume) that no later step repeats; by that first step alone until then. ``pixels``, ``next_pixels``:
        the pixels of this step's images and the next's (several sizes: a next step larger than those timed is
        scaled up, :func:`next_step_s`)."""
        now = clock()
        self.own_steps_s.append(now - self.lap_began - less_s)
        self.own_pixels.append(pixels)
        timed = list(zip(self.own_steps_s, self.own_pixels))
        self.slowest_step_s = next_step_s(timed[1:] or timed, next_pixels)
        self.lap_began = now

    def checkpoint_took(self, seconds: float) -> None:
        self.slowest_checkpoint_s = max(self.slowest_checkpoint_s or 0.0, seconds)

    def stops_now(self) -> bool:
        """Whether the next step and the end's work would pass the limit (:func:`stops_before_next_step`)."""
        return self.on and stops_before_next_step(self.used_s(), self.limit_s, self.slowest_step_s, self.renders_s,
                                                  self.writes_s())

    def record(self) -> dict:
        """summary.json's ``time_limit``: the limit, the minutes this start used, the step it stopped after."""
        return {"max_minutes": self.limit_s / 60.0, "minutes_used": round(self.used_s() / 60.0, 3),
                "stopped_at": self.stopped_at}

    def stopped_line(self, step: int, steps: int, checkpoint) -> str:
        """What the run says when the limit stops it after ``step`` of ``steps`` (``checkpoint``: its path)."""
        limit = f"{self.limit_s / 60.0:g}"
        return (f"time limit: stopped after step {step} of {steps}, {minutes(self.used_s())} of --max-minutes {limit} "
                f"used (the next step, up to {minutes(self.slowest_step_s or 0.0)}, and the end's work, about "
                f"{minutes(self.end_s())}, would pass it); saved checkpoint {checkpoint}, writing the LoRA, samples "
                f"and summary. --resume latest trains steps {step + 1}-{steps} under a new {limit}-minute clock (the "
                "run's limit; --max-minutes N gives another, 0 none)")

    def no_room_message(self) -> str:
        """Before this start's first step the limit already leaves no room for one step and the end."""
        step = f", a step up to {minutes(self.slowest_step_s)}" if self.slowest_step_s is not None else ""
        return (f"--max-minutes {self.limit_s / 60.0:g} leaves no time to train: {minutes(self.used_s())} went to "
                f"loading and the renders before the first step{step}, and the end's work takes about "
                f"{minutes(self.end_s())}: give a larger --max-minutes, or 0 for no limit")

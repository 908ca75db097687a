"""Memory and time of each stage of a training step (docs/design.md sections 1 and 6).

Usage, as the training loop does it::

    prof = StageProfiler(device, budget_gb=8.0, detail_steps={1}, snapshot_steps=None)
    with prof.stage("load"):
        ...                                  # build the models
    prof.record_modules({"unet": unet, "vae": vae, "lora": lora_params, "optimizer": opt})
    for step in range(1, n + 1):
        prof.begin_step(step)
        with prof.stage("encode_prompts"):
            ...
        summary = prof.end_step()
        print(prof.format_step(summary))
    prof.write(output_dir)                   # memory_report.json / .md / .png

How each number is measured:

* CUDA: reset-then-read. Each stage starts with ``torch.cuda.reset_peak_memory_stats()`` and ends by
  reading ``max_memory_allocated``, ``max_memory_reserved`` and the ``active_bytes.all.peak`` stat, so
  every stage of every step gets its own peak. Stages are timed between two synchronizations.
* CPU: torch has no CPU allocator statistics. For the steps in ``detail_steps`` a :class:`StorageCounter` (a
  ``TorchDispatchMode``, storage_counter.py) is active for the whole step: it adds the bytes of every new storage an
  op returns, takes them off when the storage is freed (a weak reference on it), counts views and shared storages
  once, and sees each stage start and end (``record_function`` ranges are ops too). A stage's peak is the highest
  level while it was open, plus the *baseline*: the bytes of the CPU tensors alive when the step began (see
  :func:`live_tensor_bytes`, resident_tensors.py). It keeps no log, only one entry per live storage, so the measured
  step costs no more memory than a plain one (a few MB; ``measurement_bytes`` in the report), and some per-op Python
  overhead in time. It cannot see what a kernel allocates and frees inside one op (a convolution's scratch): on the
  mid-size model's 256 px step it reads 2-3% below torch.profiler's allocator events in decode and backward and the
  same (within 0.01%) in the other stages (benchmarks/REPORT.md section 5), the planner's blind spot too.
  ``CpuAllocationTracker(method="events")`` measures with those events instead (exact, but it keeps every event:
  hundreds of MB for a 256 px step), for cross-checks. Other steps record time and RSS only (RSS cannot see stages:
  the C allocator keeps freed memory).
* RSS, told apart in the report (``rss``): after load, the largest over the steps not measured, the largest over
  the measured steps, the process's high-water mark, and what the measurement itself held.
* Other devices (mps, xpu, a CUDA device on a build without CUDA): time and RSS only.

Every ``torch.cuda`` memory call is gated on ``torch.cuda.is_available()`` *and* the device type: on a
CPU-only build ``max_memory_allocated()`` silently returns 0 while the reset and snapshot functions
raise AttributeError.

:class:`~lowmem_alignprop.measure.cpu_allocation.CpuAllocationTracker` and
:func:`~lowmem_alignprop.measure.cpu_allocation.measure_cpu_stages` expose the CPU measurement on its own, so
tests and benchmarks can compare the peak of one stage with a memory feature on and off.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import sys
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lowmem_alignprop.run import atomic
from lowmem_alignprop.measure.cpu_allocation import CpuAllocationTracker, tracker_active
from lowmem_alignprop.measure.provenance import cpu_name
from lowmem_alignprop.measure.reports import MEMORY_VIZ_URL, fmt_bytes, memory_report_markdown
from lowmem_alignprop.measure.resident_tensors import iter_tensors, live_tensor_bytes, resident_bytes
from lowmem_alignprop.memory.stages import LOAD, STAGES

logger = logging.getLogger(__name__)

GIB = 1024**3
SNAPSHOT_FILE = "memory_snapshot.pickle"
REPORT_FILES = ("memory_report.json", "memory_report.md", "memory_report.png")
# The three peak figures a stage can have; on CPU only peak_allocated is measured.
PEAK_KEYS = ("peak_allocated", "peak_reserved", "peak_active")
CPU_SOURCE = "cpu_counter"  # a CPU figure measured by counting live storages (StorageCounter)

# ---------------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------------


def gib(nbytes: int | float) -> float:
    """Bytes -> GiB (2**30 bytes)."""
    return float(nbytes) / GIB


def budget_verdict(peak_allocated: int | None, peak_reserved: int | None, budget: int | None,
                   cuda: bool) -> dict[str, Any]:
    """Did the run fit its budget? On CUDA the caching allocator's reserved bytes are what the card must hold (and
    what a per-process memory cap limits), so they decide, as in the planner; on the CPU the allocated bytes."""
    use_reserved = cuda and peak_reserved is not None
    basis = peak_reserved if use_reserved else peak_allocated
    return {"fits_budget": (basis <= budget) if (budget is not None and basis is not None) else None,
            "fits_basis": "peak_reserved" if use_reserved else "peak_allocated"}


def _describe_steps(steps: Iterable[int]) -> str:
    """[2, 3, 4, 7] -> '2-4, 7' (compact enough for a report even after thousands of steps)."""
    steps = sorted(set(steps))
    parts: list[str] = []
    i = 0
    while i < len(steps):
        j = i
        while j + 1 < len(steps) and steps[j + 1] == steps[j] + 1:
            j += 1
        parts.append(str(steps[i]) if i == j else f"{steps[i]}-{steps[j]}")
        i = j + 1
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------
# the profiler of the training loop
# ---------------------------------------------------------------------------------------------------


def _new_figures() -> dict[str, Any]:
    return {"peak_allocated": None, "peak_reserved": None, "peak_active": None, "seconds": 0.0, "calls": 0, "rss": None}


def _max_opt(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


class _CudaFrame:
    """Peaks folded in so far for one open stage (nested stages each get a frame)."""

    __slots__ = ("allocated", "reserved", "active")

    def __init__(self) -> None:
        self.allocated = self.reserved = self.active = 0


class StageProfiler:
    """Per-stage peak memory and time of a training step; writes memory_report.{json,md,png}.

    Args:
        device: the training device. CUDA gets reset-then-read peaks on every step; CPU gets real
            allocation peaks on ``detail_steps``; anything else time and RSS only.
        budget_gb: the memory budget (GiB) the report compares the peak with; None for no budget.
        detail_steps: CPU only: the steps whose allocation is measured (a count of live storages);
            ``"all"`` (or True) for every step. Ignored on CUDA, whose counters are cheap enough for every step.
        snapshot_steps: ``(first, last)``: CUDA only: record the allocator history from
            ``begin_step(first)`` (or the first step within the range, a resume's) and dump it at ``end_step(last)``
            to ``memory_snapshot.pickle``
            (opens at https://pytorch.org/memory_viz). On other devices one log line, nothing else.
        output_dir: where the snapshot goes as soon as it is taken; None keeps it in memory until
            :meth:`write`.
        detail_load: CPU only: also measure the ``load`` stage with the profiler (its peak is then
            max(measured, live tensors at its end), as memory-mapped weights are no allocations);
            otherwise load reports the resident bytes of :meth:`record_modules`.
        snapshot_max_entries: allocator events kept in the snapshot's ring buffer.
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        budget_gb: float | None = None,
        detail_steps: Iterable[int] | str | bool | None = None,
        snapshot_steps: tuple[int, int] | None = None,
        *,
        output_dir: str | os.PathLike | None = None,
        detail_load: bool = True,
        snapshot_max_entries: int = 100_000,
    ):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        # The one gate for every torch.cuda memory call (see the module docstring).
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._cpu = self.device.type == "cpu"
        if self.device.type == "cuda" and not self._cuda:
            logger.warning("profiler: device %s but CUDA is not available: recording time and RSS only", self.device)
        self.budget_gb = budget_gb
        if detail_steps is True or detail_steps == "all":
            self._detail_all, self._detail_steps = True, frozenset()
        elif detail_steps in (None, False):
            self._detail_all, self._detail_steps = False, frozenset()
        else:
            self._detail_all, self._detail_steps = False, frozenset(int(s) for s in detail_steps)
        if snapshot_steps is not None:
            first, last = (int(s) for s in snapshot_steps)
            if not 1 <= first <= last:
                raise ValueError(f"snapshot_steps must be (first, last) with 1 <= first <= last, got {snapshot_steps}")
            snapshot_steps = (first, last)
            if not self._cuda:
                logger.warning("profiler: memory snapshots need CUDA; --memory-snapshot %s ignored on %s",
                               f"{first}-{last}" if last > first else first, self.device)
        self.snapshot_steps = snapshot_steps
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.detail_load = detail_load
        self.snapshot_max_entries = snapshot_max_entries

        self._process = None
        try:
            import psutil

            self._process = psutil.Process()
        except Exception:  # pragma: no cover - psutil is a dependency, but RSS is optional
            pass

        self.steps: list[dict[str, Any]] = []  # end_step summaries, in order
        self.aborted: list[dict[str, Any]] = []  # attempts that did not train (out of memory, an error): apart
        self.outside: dict[str, dict[str, Any]] = {}  # stages run outside a step (load)
        self.modules: dict[str, dict[str, dict[str, Any]]] = {}  # label -> module -> residency
        self._module_refs: list[weakref.ref] = []  # registered modules, for the CPU baseline
        self._step: int | None = None
        self._last_step: int | None = None
        self._step_figures: dict[str, dict[str, Any]] = {}
        self._step_t0 = 0.0
        self._step_rss0: int | None = None
        self.rss_after_load: int | None = None  # RSS when the load stage ended
        self.host_allocator: str | None = None  # what the C allocator under CPU tensors runs with (the trainer's)
        self._tracker: CpuAllocationTracker | None = None  # the detail step's profiler session
        self._frames: list[_CudaFrame] = []
        self._snapshot_recording = False
        self._snapshot_data: Any = None
        self._snapshot_path: Path | None = None
        self._snapshot_window: tuple[int, int] | None = None

    # -- stages -------------------------------------------------------------------------------------

    def is_detail_step(self, step: int) -> bool:
        return self._cpu and (self._detail_all or step in self._detail_steps)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time and measure one stage; a stage entered several times in a step aggregates
        (max of peaks, sum of seconds). Outside a step (``load``) the figures go to ``outside``.
        Memory used only between stages belongs to no stage: keep all work of a step inside stages."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(STAGES)}")
        bucket = self._step_figures if self._step is not None else self.outside
        figures = bucket.setdefault(name, _new_figures())
        load_tracker = None
        if name == LOAD and self._step is None and self._cpu and self.detail_load and not tracker_active():
            load_tracker = CpuAllocationTracker(names={name}, extra=self._live_module_objects())
            load_tracker.__enter__()
        frame = None
        if self._cuda:
            torch.cuda.synchronize(self.device)
            self._cuda_fold()  # the enclosing stage keeps what it saw so far
            frame = _CudaFrame()
            self._frames.append(frame)
        record = torch.profiler.record_function(name)  # ~1 us without a profiler; marks the range
        record.__enter__()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._cuda:
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
            record.__exit__(None, None, None)
            if frame is not None:
                self._cuda_fold()
                self._frames.remove(frame)
                figures["peak_allocated"] = _max_opt(figures["peak_allocated"], frame.allocated)
                figures["peak_reserved"] = _max_opt(figures["peak_reserved"], frame.reserved)
                figures["peak_active"] = _max_opt(figures["peak_active"], frame.active)
            figures["seconds"] += seconds
            figures["calls"] += 1
            figures["rss"] = _max_opt(figures["rss"], self._rss())
            if load_tracker is not None:
                load_tracker.__exit__(None, None, None)
                # Memory-mapped weights are made by no op the counter sees; what is alive at the end was live.
                live_end = live_tensor_bytes("cpu", self._live_module_objects())
                peak = max(load_tracker.peak_allocated(), live_end)
                figures["peak_allocated"] = _max_opt(figures["peak_allocated"], peak)
                figures["source"] = CPU_SOURCE
                figures["measurement_bytes"] = load_tracker.measurement_bytes
            if name == LOAD and self._step is None:
                self.rss_after_load = self._rss()  # what the process holds before any step (measurement done)

    def _cuda_fold(self) -> None:
        """Fold the peaks since the last reset into every open stage, then reset (CUDA only)."""
        if self._frames:
            allocated = torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.max_memory_reserved(self.device)
            active = torch.cuda.memory_stats(self.device).get("active_bytes.all.peak")
            for f in self._frames:
                f.allocated = max(f.allocated, allocated)
                f.reserved = max(f.reserved, reserved)
                if active is not None:
                    f.active = max(f.active, active)
        torch.cuda.reset_peak_memory_stats(self.device)

    def _rss(self) -> int | None:
        """The process's resident memory now (psutil)."""
        if self._process is None:
            return None
        try:
            return int(self._process.memory_info().rss)
        except Exception:  # pragma: no cover
            return None

    # -- steps --------------------------------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        if self._step is not None:
            logger.warning("profiler: begin_step(%d) while step %d is open; closing it", step, self._step)
            self.end_step()
        self._step = int(step)
        self._step_figures = {}
        # from the range's first step, or the first step within it a resume runs
        if self._cuda and self.snapshot_steps and self.snapshot_steps[0] <= step <= self.snapshot_steps[1] \
                and not self._snapshot_recording:
            torch.cuda.memory._record_memory_history(max_entries=self.snapshot_max_entries)
            self._snapshot_recording = True
            self._snapshot_window = (step, step)
        if self.is_detail_step(step):
            if tracker_active():
                logger.info("profiler: another CPU allocation tracker is running; step %d records time only", step)
            else:
                self._tracker = CpuAllocationTracker(names=set(STAGES), extra=self._live_module_objects())
                self._tracker.__enter__()
        self._step_rss0 = self._rss()
        self._step_t0 = time.perf_counter()

    def set_aside(self, seconds: float) -> None:
        """``seconds`` of the open step's bracket went to something else (the held-out evaluation between the step
        and its metrics line): not the step's time. Outside a step (eval_on_start's step 0) there is nothing to do."""
        if self._step is not None:
            self._step_t0 += seconds

    def end_step(self, aborted: str | None = None) -> dict[str, Any]:
        """Close the step and return its summary (see the module docstring for the keys). ``aborted``: why the
        attempt did not train (--auto-fit repeats it lighter): kept apart, out of the stage table and the peak."""
        if self._step is None:
            raise RuntimeError("end_step() without begin_step()")
        step, figures = self._step, self._step_figures
        seconds = time.perf_counter() - self._step_t0
        summary: dict[str, Any] = {"step": step, "seconds": seconds, "source": "time_rss", "rss_start": self._step_rss0}
        if self._cuda:
            summary["source"] = "cuda"
        if self._tracker is not None:
            tracker, self._tracker = self._tracker, None
            tracker.__exit__(None, None, None)
            for name, fig in figures.items():
                if name in tracker.peaks:
                    fig["peak_allocated"] = tracker.baseline + tracker.peaks[name]
            summary.update(source=CPU_SOURCE, baseline=tracker.baseline, retained=tracker.retained,
                           analysis_seconds=tracker.analysis_seconds, measurement_bytes=tracker.measurement_bytes)
        summary["stages"] = {name: figures[name] for name in STAGES if name in figures}
        peak_stage, peak = None, None
        for name, fig in summary["stages"].items():
            if fig["peak_allocated"] is not None and (peak is None or fig["peak_allocated"] > peak):
                peak_stage, peak = name, fig["peak_allocated"]
        summary["peak_allocated"], summary["peak_stage"] = peak, peak_stage
        if self._cuda:
            summary["peak_reserved"] = max((f["peak_reserved"] or 0 for f in figures.values()), default=None)
        rss = [f["rss"] for f in figures.values() if f["rss"] is not None]
        summary["rss"] = max(rss) if rss else None
        # the process's high-water mark so far, this step included (the kernel's counters and psutil's RSS can
        # differ by a few pages: never below an RSS seen)
        summary["rss_hwm"] = _max_opt(_process_peak_rss(), summary["rss"])
        if self._snapshot_recording and self.snapshot_steps and step >= self.snapshot_steps[1]:
            self._snapshot_window = (self._snapshot_window or (step, step))[0], step
            self._take_snapshot()
        if aborted:
            self.aborted.append({**summary, "aborted": aborted})
        else:
            self.steps.append(summary)
        self._last_step, self._step, self._step_figures = step, None, {}
        return summary

    def counted_steps(self) -> set[int]:
        """The steps whose allocation was counted (a CPU's detail steps: ~1.5x slower than the others)."""
        return {s["step"] for s in self.steps if s.get("source") == CPU_SOURCE}

    def timed_steps(self) -> set[int]:
        """The steps whose seconds say this start's speed: all but the first (warm-up: kernels chosen, the allocator
        filled) and the counted ones, as the stage table times them; fewer steps than that: what there is."""
        steps = [s["step"] for s in self.steps]
        kept, counted = steps[1:] or steps, self.counted_steps()
        return set([st for st in kept if st not in counted] or kept)

    def format_step(self, summary: dict[str, Any]) -> str:
        """One short log line, e.g. 'mem step 3: peak 1.23 GiB in backward (reserved 1.50 GiB) | 0.41 s'."""
        parts = [f"mem step {summary['step']}:"]
        if summary.get("peak_allocated") is not None:
            parts.append(f"peak {fmt_bytes(summary['peak_allocated'])} in {summary['peak_stage']}")
            if summary.get("peak_reserved") is not None:
                parts.append(f"(reserved {fmt_bytes(summary['peak_reserved'])})")
            if self.budget_gb:
                share = 100 * gib(summary["peak_allocated"]) / self.budget_gb
                parts.append(f"= {share:.0f}% of {self.budget_gb:g} GiB")
        measured = len(parts) > 1
        if summary.get("rss") is not None and not self._cuda:
            parts.append(f"{'| ' if measured else ''}rss {fmt_bytes(summary['rss'])}")
            if summary.get("measurement_bytes") is not None:  # the part of that RSS the measurement itself held
                parts.append(f"(measuring held {fmt_bytes(summary['measurement_bytes'])})")
        parts.append(f"| {summary['seconds']:.2f} s")
        return " ".join(parts)

    # -- modules ------------------------------------------------------------------------------------

    def record_modules(self, modules: Mapping[str, Any], label: str | None = None) -> dict[str, dict[str, Any]]:
        """Record resident bytes per module: params + buffers of modules, the tensors of a list (LoRA),
        an optimizer's state tensors; an int is taken as bytes. Storages counted under ``"lora"`` are
        left out of every other entry (the UNet's figure is then its frozen weights). Each storage is
        counted once, under the first entry holding it. ``label`` defaults to 'after_load' before the
        first step and 'after_step_N' after. Returns {name: {"bytes": total, "by_device": {...}}}."""
        if label is None:
            step = self._step if self._step is not None else self._last_step
            label = "after_load" if step is None else f"after_step_{step}"
        counted: set = set()
        split: dict[str, dict[str, Any]] = {}
        order = sorted(modules, key=lambda name: name != "lora")  # LoRA first, so others exclude it
        for name in order:
            obj = modules[name]
            if isinstance(obj, int):
                by_device = {str(self.device): obj}
            else:
                by_device = resident_bytes(obj, counted)
                self._remember(obj)
            split[name] = {"bytes": sum(by_device.values()), "by_device": by_device}
        split = {name: split[name] for name in modules}  # caller's order
        self.modules[label] = split
        load = self.outside.get(LOAD)
        if label == "after_load" and load is not None and load["peak_allocated"] is None:
            # No measured load peak (not CPU detail, not CUDA): report what load left resident.
            self.outside[LOAD]["peak_allocated"] = sum(s["bytes"] for s in split.values())
            self.outside[LOAD]["source"] = "resident"
        return split

    def _remember(self, obj: Any) -> None:
        try:
            self._module_refs.append(weakref.ref(obj))
        except TypeError:  # lists and dicts: remember their tensors instead
            for t in iter_tensors(obj):
                with contextlib.suppress(TypeError):
                    self._module_refs.append(weakref.ref(t))

    def _live_module_objects(self) -> list[Any]:
        objs = [r() for r in self._module_refs]
        return [o for o in objs if o is not None]

    # -- snapshots ----------------------------------------------------------------------------------

    def _take_snapshot(self) -> None:
        """Take the CUDA allocator history recorded so far and stop recording."""
        if not (self._cuda and self._snapshot_recording):
            return
        try:
            if self.output_dir is not None:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                path = self.output_dir / SNAPSHOT_FILE
                with atomic.replacing(path) as tmp:
                    torch.cuda.memory._dump_snapshot(str(tmp))
                self._snapshot_path = path
                logger.info("profiler: memory snapshot written to %s (open it at %s)", path, MEMORY_VIZ_URL)
            else:
                self._snapshot_data = torch.cuda.memory._snapshot()
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
            self._snapshot_recording = False

    def close(self) -> None:
        """Stop a profiler session or snapshot recording left open (for example after an exception)."""
        if self._tracker is not None:
            tracker, self._tracker = self._tracker, None
            with contextlib.suppress(Exception):
                tracker.__exit__(None, None, None)
        if self._snapshot_recording:
            self._take_snapshot()
        self._step = None

    # -- report -------------------------------------------------------------------------------------

    def device_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"type": self.device.type, "str": str(self.device)}
        if self._cuda:
            props = torch.cuda.get_device_properties(self.device)
            info.update(name=torch.cuda.get_device_name(self.device), total_memory=int(props.total_memory),
                        capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
        elif self._cpu:
            info.update(name=cpu_name(), logical_cores=os.cpu_count())
            with contextlib.suppress(Exception):
                import psutil

                info["total_memory"] = int(psutil.virtual_memory().total)
        return info

    def _stage_summary(self) -> tuple[dict[str, dict[str, Any]], int | None]:
        """Per stage: max of peaks and mean seconds over the steps after the first (warm-up) one
        when there are more; a stage measured only in the warm-up step falls back to it."""
        warmup = self.steps[0]["step"] if len(self.steps) > 1 else None
        measured = self.counted_steps()
        out: dict[str, dict[str, Any]] = {}
        for name in STAGES:
            rows = [(s["step"], s["stages"][name]) for s in self.steps if name in s["stages"]]
            if name in self.outside:
                fig = self.outside[name]
                out[name] = {k: fig[k] for k in PEAK_KEYS} | {
                    "seconds_mean": fig["seconds"], "rss_max": fig["rss"], "steps": "outside steps",
                    "source": fig.get("source", "cuda" if self._cuda else None)}
                continue
            if not rows:
                continue
            kept = [r for r in rows if r[0] != warmup] or rows
            entry: dict[str, Any] = {}
            for key in PEAK_KEYS:
                vals = [(st, f[key]) for st, f in kept if f[key] is not None]
                if not vals:  # e.g. a CPU stage measured only in the warm-up step
                    vals = [(st, f[key]) for st, f in rows if f[key] is not None]
                entry[key] = max(v for _, v in vals) if vals else None
                if key == "peak_allocated":
                    entry["peak_steps"] = _describe_steps(st for st, _ in vals) if vals else None
            timed = [r for r in kept if r[0] not in measured] or kept  # (counting storages slows a step ~1.5x)
            entry["seconds_mean"] = sum(f["seconds"] for _, f in timed) / len(timed)
            entry["calls_mean"] = sum(f["calls"] for _, f in kept) / len(kept)
            # RSS of the steps whose allocation was not measured: a measured step's RSS includes the measurement
            plain = [(st, f) for st, f in kept if st not in measured and f["rss"] is not None] or [
                (st, f) for st, f in kept if f["rss"] is not None]
            entry["rss_max"] = max(f["rss"] for _, f in plain) if plain else None
            entry["rss_steps"] = _describe_steps(st for st, _ in plain) if plain else None
            entry["steps"] = _describe_steps(st for st, _ in kept)
            out[name] = entry
        return out, warmup

    def report(self) -> dict[str, Any]:
        """The content of memory_report.json."""
        stages, warmup = self._stage_summary()
        # Overall peak over everything recorded, warm-up included: the card must hold that too.
        peak, peak_stage, peak_step = None, None, None
        for name, fig in self.outside.items():
            if fig["peak_allocated"] is not None and (peak is None or fig["peak_allocated"] > peak):
                peak, peak_stage, peak_step = fig["peak_allocated"], name, None
        for s in self.steps:
            if s["peak_allocated"] is not None and (peak is None or s["peak_allocated"] > peak):
                peak, peak_stage, peak_step = s["peak_allocated"], s["peak_stage"], s["step"]
        reserved = [f["peak_reserved"] for f in stages.values() if f.get("peak_reserved") is not None]
        reserved += [s["peak_reserved"] for s in self.steps if s.get("peak_reserved") is not None]
        budget = int(self.budget_gb * GIB) if self.budget_gb else None
        if self._cuda:
            method = "cuda: reset_peak_memory_stats at each stage start, max_memory_* at its end"
        elif self._cpu:
            method = ("cpu: on detail steps, the bytes of live tensor storages counted as ops create and free "
                      "them (a dispatch mode; max per stage) plus the baseline of live CPU tensors at the step start "
                      "(gc-reachable tensors, their grads, registered modules and optimizer state); other steps "
                      "time and RSS only")
        else:
            method = f"{self.device.type}: time and RSS only"
        steps_kept = [s["step"] for s in self.steps if s["step"] != warmup]
        counted = self.counted_steps()
        timed_apart = bool(counted) and any(st not in counted for st in steps_kept)  # (as _stage_summary times)
        measured = _describe_steps(s["step"] for s in self.steps if s["peak_allocated"] is not None)
        return {
            "device": self.device_info(),
            "torch": torch.__version__,
            "budget_gb": self.budget_gb,
            "method": method,
            "detail_steps": "all" if self._detail_all else sorted(self._detail_steps),
            "summary_steps": {
                "steps": _describe_steps(steps_kept),
                "seconds_steps": _describe_steps(self.timed_steps()) or None,  # (the counted ones left out)
                "warmup_excluded": warmup,
                "peak_measured_steps": measured or None,  # on CPU only the detail steps measure a peak
                "note": ("per-stage peaks are the max and seconds the mean over these steps"
                         + (f"; step {warmup} excluded as warm-up" if warmup is not None else "")
                         + ("; the seconds leave out the steps whose allocation was counted (slower)"
                            if timed_apart else "")
                         + f"; peaks were measured in steps {measured or 'none'}, and the overall peak is the "
                           "largest of them"),
            },
            "modules": self.modules,
            "stages": stages,
            "peak_allocated": peak,
            "peak_stage": peak_stage,
            "peak_step": peak_step,
            "peak_reserved": max(reserved) if reserved else None,
            "budget_bytes": budget,
            **budget_verdict(peak, max(reserved) if reserved else None, budget, self._cuda),
            "snapshot": self._snapshot_info(),
            "load": self.outside.get(LOAD),
            "rss": self._rss_summary(),
            "steps": [_compact(s) for s in self.steps],
            **({"aborted_steps": [{"step": s["step"], "aborted": s["aborted"], "peak_allocated": s["peak_allocated"],
                                   "peak_stage": s["peak_stage"]} for s in self.aborted]} if self.aborted else {}),
        }

    def _rss_summary(self) -> dict[str, Any] | None:
        """Resident memory of the process, told apart: after loading, in the steps, in the measured steps, the
        process's peak, and what the CPU measurement itself held."""
        if self._cuda or self._process is None:
            return None
        measured = [s for s in self.steps if s.get("source") == CPU_SOURCE]
        plain = [s for s in self.steps if s.get("source") != CPU_SOURCE and s.get("rss") is not None]
        hwm = [s["rss_hwm"] for s in self.steps if s.get("rss_hwm") is not None]
        cost = [s["measurement_bytes"] for s in measured if s.get("measurement_bytes") is not None]
        load = self.outside.get(LOAD) or {}
        return {
            "after_load": self.rss_after_load,
            # set-up between load and the first step (prompt cache, a reward check) is in this one
            "before_first_step": self.steps[0].get("rss_start") if self.steps else None,
            "steps_max": max((s["rss"] for s in plain), default=None),
            "steps": _describe_steps(s["step"] for s in plain) or None,
            "measured_steps_max": max((s["rss"] for s in measured if s.get("rss") is not None), default=None),
            "measured_steps": _describe_steps(s["step"] for s in measured) or None,
            "process_peak": max(hwm) if hwm else None,  # high-water mark at the end of the last step
            "measurement_bytes": max(cost) if cost else None,
            "load_measurement_bytes": load.get("measurement_bytes"),
            "host_allocator": self.host_allocator,
            "note": ("RSS sampled at each stage's end; process_peak is the process's high-water mark (getrusage) "
                     "at the end of the last step; measurement_bytes is what the CPU measurement itself held at most "
                     "in a measured step (a list of the process's objects scanned once at the step start, then one "
                     "table entry per live storage)"),
        }

    def _snapshot_info(self) -> dict[str, Any] | None:
        if self.snapshot_steps is None:
            return None
        if not self._cuda:
            return {"requested_steps": list(self.snapshot_steps), "path": None, "note": "snapshots need CUDA; skipped"}
        return {
            "requested_steps": list(self.snapshot_steps),
            "recorded_steps": list(self._snapshot_window) if self._snapshot_window else None,
            "path": str(self._snapshot_path) if self._snapshot_path else None,
            "viewer": f"open {MEMORY_VIZ_URL} and drag and drop the file onto it",
        }

    def write(self, output_dir: str | os.PathLike) -> dict[str, Path]:
        """Write memory_report.json, memory_report.md, memory_report.png (and memory_snapshot.pickle
        when one was taken and not yet written). Returns the paths by file name."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self._snapshot_recording:  # the run ended inside the snapshot window: keep what there is
            self._take_snapshot()
        if self._snapshot_data is not None:
            path = out / SNAPSHOT_FILE
            atomic.write_bytes(path, pickle.dumps(self._snapshot_data))
            self._snapshot_data, self._snapshot_path = None, path
        report = self.report()
        paths = {name: out / name for name in REPORT_FILES}  # each written atomically: never half a report
        atomic.write_text(paths[REPORT_FILES[0]], json.dumps(report, indent=1) + "\n")
        atomic.write_text(paths[REPORT_FILES[1]], memory_report_markdown(report))
        with atomic.replacing(paths[REPORT_FILES[2]]) as tmp:
            _plot(report, tmp)
        if self._snapshot_path is not None:
            paths[SNAPSHOT_FILE] = self._snapshot_path
        return paths


def _process_peak_rss() -> int | None:
    """The process's peak resident memory so far (its high-water mark; only rises), in bytes; None if unknown."""
    try:
        import resource
    except ImportError:  # Windows: the peak working set
        try:
            import psutil

            return int(psutil.Process().memory_info().peak_wset)
        except Exception:
            return None
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):  # pragma: no cover
        return None
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes; Linux, BSD: KiB


def _compact(summary: dict[str, Any]) -> dict[str, Any]:
    """A step summary for the JSON: no None values, seconds rounded."""

    def clean(d: dict[str, Any]) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items() if v is not None}

    out = clean({k: v for k, v in summary.items() if k != "stages"})
    out["stages"] = {name: clean(fig) for name, fig in summary["stages"].items()}
    return out


def _plot(report: dict[str, Any], path: Path) -> None:
    """Horizontal bars of the peak per stage (STAGES top to bottom) with the budget dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    cuda = report["device"]["type"] == "cuda"
    stages = list(STAGES)
    alloc = [gib(report["stages"].get(s, {}).get("peak_allocated") or 0) for s in stages]
    reserved = [gib(report["stages"].get(s, {}).get("peak_reserved") or 0) for s in stages]
    fig = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = list(range(len(stages)))
    if cuda and any(reserved):
        ax.barh(y, reserved, height=0.7, color="#c6dbef", label="peak reserved")
    ax.barh(y, alloc, height=0.45 if cuda else 0.7, color="#2171b5", label="peak allocated")
    top = max(alloc + reserved + [0.0])
    for yi, s, a, r in zip(y, stages, alloc, reserved):
        measured = report["stages"].get(s, {}).get("peak_allocated") is not None
        ax.text(max(a, r) + top * 0.01, yi, f"{a:.3f}" if measured else "n/a", va="center", fontsize=8)
    if report["budget_gb"]:
        ax.axvline(report["budget_gb"], color="#cb181d", linestyle="--", linewidth=1.5,
                   label=f"budget {report['budget_gb']:g} GiB")
        top = max(top, report["budget_gb"])
    ax.set_xlim(0, top * 1.15 if top > 0 else 1.0)
    ax.set_yticks(y)
    ax.set_yticklabels(stages)
    ax.invert_yaxis()  # load at the top, optimizer at the bottom: the order of a step
    ax.set_xlabel("peak memory (GiB)")
    ax.set_ylabel("stage")
    dev = report["device"]
    ax.set_title(f"Peak memory per stage - {dev.get('name', dev['str'])}", fontsize=10)
    if report["peak_allocated"] is None:
        ax.text(0.5, 0.5, "no allocation measured\n(CPU: set detail_steps)", transform=ax.transAxes,
                ha="center", va="center", color="gray")
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    # fixed margins that hold the longest stage name: tight_layout drew the whole figure once more to measure them
    # (40% of the plot's time, which every run and test pays)
    fig.subplots_adjust(left=0.2, right=0.97, top=0.92, bottom=0.12)
    fig.savefig(path, pil_kwargs={"compress_level": 1})  # a few KB larger, a third less time (every run writes it)

"""Real CPU allocation inside a block, per ``record_function`` range: :class:`CpuAllocationTracker` (by default a
count of live storages, a :class:`~lowmem_alignprop.measure.storage_counter.StorageCounter`; or torch.profiler's
memory events, the cross-check) and :func:`measure_cpu_stages`. They expose the CPU measurement of
:class:`~lowmem_alignprop.measure.profiler.StageProfiler` on its own, so tests and benchmarks can compare the peak of
one stage with a memory feature on and off. One tracker runs at a time (:func:`tracker_active`)."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lowmem_alignprop.measure.resident_tensors import live_storages, live_tensor_bytes
from lowmem_alignprop.measure.storage_counter import StorageCounter

_ACTIVE_TRACKER: list[Any] = []  # the CpuAllocationTracker running now (one at a time)


def tracker_active() -> bool:
    return bool(_ACTIVE_TRACKER)


@dataclass
class _EventAnalysis:
    peaks: dict[str, int] = field(default_factory=dict)  # name -> max running total inside its ranges
    seconds: dict[str, float] = field(default_factory=dict)  # name -> summed duration of its ranges
    calls: dict[str, int] = field(default_factory=dict)
    peak: int = 0  # max running total over the whole session (relative to its start)
    end: int = 0  # running total at the end: bytes allocated in the session and still alive


def _analyse_events(events: Iterable[Any], names: set[str] | None = None) -> _EventAnalysis:
    """Running total of CPU ``[memory]`` events, and its maximum inside each user-annotation range.

    ``names`` restricts the ranges analysed (default: every ``record_function`` name seen). The total
    starts at 0 when the profiler starts, so it can dip below 0 when older tensors are freed.
    """
    import numpy as np

    cpu = torch.autograd.DeviceType.CPU
    times: list[int] = []
    sizes: list[int] = []
    ranges: dict[str, list[tuple[int, int]]] = {}
    for e in events:
        name = e.name()
        if name == "[memory]":
            if e.device_type() == cpu:
                times.append(e.start_ns())
                sizes.append(e.nbytes())
        elif e.is_user_annotation() and (names is None or name in names):
            ranges.setdefault(name, []).append((e.start_ns(), e.end_ns()))

    out = _EventAnalysis()
    t = np.asarray(times, dtype=np.int64)
    order = np.argsort(t, kind="stable")  # events of one thread come in order; keep ties as recorded
    t = t[order]
    level = np.cumsum(np.asarray(sizes, dtype=np.int64)[order]) if len(times) else np.zeros(0, np.int64)
    if len(level):
        out.peak = max(0, int(level.max()))
        out.end = int(level[-1])
    for name, spans in ranges.items():
        best = None
        for start, end in spans:
            i0 = int(np.searchsorted(t, start, side="left"))
            i1 = int(np.searchsorted(t, end, side="right"))
            entry = int(level[i0 - 1]) if i0 > 0 else 0  # what was live when the range began
            inside = int(level[i0:i1].max()) if i1 > i0 else entry
            peak = max(entry, inside)
            best = peak if best is None else max(best, peak)
        out.peaks[name] = int(best)
        out.seconds[name] = sum(end - start for start, end in spans) / 1e9
        out.calls[name] = len(spans)
    return out


def _profiler_active() -> bool:
    try:
        return bool(torch.autograd._profiler_enabled())
    except Exception:  # pragma: no cover - private API moved
        return False


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Kineto writes 'USDT: ... profiler_start/stop' lines straight to file descriptor 2 (no setting turns them
    off in torch 2.13): point that descriptor at /dev/null while the profiler starts or stops."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(fd), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


class CpuAllocationTracker:
    """Measures real CPU allocation inside a block, per ``record_function`` range.

    ::

        with CpuAllocationTracker() as tracker:
            with torch.profiler.record_function("backward"):   # or prof.stage("backward")
                loss.backward()
        tracker.peaks["backward"]         # max bytes above the level at the tracker's start
        tracker.peak_allocated("backward")  # the same plus the baseline: an absolute peak

    ``baseline`` (bytes) is measured on entry by :func:`live_tensor_bytes` (``count_baseline=False``
    reports 0). ``names`` restricts the ranges measured. One tracker runs at a time: entering while
    another is active raises RuntimeError.

    ``method``: ``"counter"`` (default) counts live storages with a :class:`StorageCounter`: nothing is kept
    but one entry per live storage, so the measurement costs almost no memory (``bookkeeping_bytes``).
    ``"events"`` runs ``torch.profiler`` with ``profile_memory=True`` and sums its ``[memory]`` events
    afterwards; it also sees kernels' internal workspaces, but keeps every event of the block (hundreds of MB
    for a training step at 256 px, more while they are analysed): a cross-check for tests and benchmarks,
    refused while another torch profiler runs.
    """

    METHODS = ("counter", "events")

    def __init__(self, *, count_baseline: bool = True, extra: Iterable[Any] = (), names: Iterable[str] | None = None,
                 method: str = "counter"):
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {', '.join(self.METHODS)}, got {method!r}")
        self.method = method
        self.count_baseline = count_baseline
        self.extra = list(extra)
        self.names = set(names) if names is not None else None
        self.baseline = 0
        self.peaks: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.peak = 0  # whole block, above the start level
        self.retained = 0  # allocated inside the block and still alive at its end (can be < 0)
        self.analysis_seconds = 0.0  # events: summing the events afterwards; counter: the scan at the start
        self.bookkeeping_bytes = 0  # counter: what the measurement itself held at most (see measurement_bytes)
        self.scan_bytes = 0  # the list of the garbage collector's objects walked once at the start (freed at once)
        self._prof: Any = None
        self._counter: StorageCounter | None = None

    @property
    def measurement_bytes(self) -> int:
        """The measurement's own memory at its largest: the scan's object list or the counter's table (they are
        never alive together); for the events method not known (its event log is the large part)."""
        return max(self.scan_bytes, self.bookkeeping_bytes)

    def __enter__(self) -> CpuAllocationTracker:
        if _ACTIVE_TRACKER:
            raise RuntimeError("CpuAllocationTracker: another CPU allocation tracker is already running")
        if self.method == "events" and _profiler_active():
            raise RuntimeError("CpuAllocationTracker: another torch profiler is already running")
        # garbage from earlier work freed mid-block would read as negative allocation: collect it now
        # and keep the collector off inside the block (its timing would make peaks depend on history)
        gc.collect()
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        _ACTIVE_TRACKER.append(self)
        try:
            t0 = time.perf_counter()
            if self.method == "counter":
                baseline, storages, n_objects = live_storages("cpu", self.extra)
                self.scan_bytes = 8 * n_objects  # the scan's list: one pointer per object
                self.extra = []  # do not keep the models alive
                self._counter = StorageCounter("cpu", names=self.names)
                self._counter.watch(storages)  # older tensors freed in the block lower the level, as allocator events
                del storages
                self.baseline = baseline if self.count_baseline else 0
                self.analysis_seconds = time.perf_counter() - t0
                self._counter.__enter__()
                return self
            self.baseline = live_tensor_bytes("cpu", self.extra) if self.count_baseline else 0
            self.extra = []
            self._prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU],
                profile_memory=True,
                record_shapes=False,
                with_stack=False,
            )
            with warnings.catch_warnings(), _native_stderr_silenced():  # torch 2.11 warns that a profile without
                warnings.filterwarnings("ignore", message=".*Profiler clears events")  # cycles drops events
                self._prof.__enter__()
        except BaseException:
            self._finish_gc()
            raise
        return self

    def _finish_gc(self) -> None:
        with contextlib.suppress(ValueError):
            _ACTIVE_TRACKER.remove(self)
        if getattr(self, "_gc_was_enabled", False):
            gc.enable()
            self._gc_was_enabled = False

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._counter is not None:
            counter, self._counter = self._counter, None
            try:
                counter.__exit__(exc_type, exc, tb)
            finally:
                self._finish_gc()
            self.peaks, self.seconds, self.calls = dict(counter.peaks), dict(counter.seconds), dict(counter.calls)
            self.peak, self.retained = counter.peak, counter.level
            self.bookkeeping_bytes = counter.bookkeeping_bytes
            counter.release()
            return
        prof, self._prof = self._prof, None
        try:
            with _native_stderr_silenced():
                prof.__exit__(exc_type, exc, tb)
        finally:
            self._finish_gc()
        t0 = time.perf_counter()
        result = _analyse_events(prof.profiler.kineto_results.events(), self.names)
        del prof  # the retained events cost ~200 MB for a big step
        self.peaks, self.seconds, self.calls = result.peaks, result.seconds, result.calls
        self.peak, self.retained = result.peak, result.end
        self.analysis_seconds = time.perf_counter() - t0

    def peak_allocated(self, name: str | None = None) -> int:
        """Absolute peak (baseline included) of one range, or of the whole block when name is None."""
        return self.baseline + (self.peak if name is None else self.peaks[name])


def measure_cpu_stages(fn: Callable[..., Any], *args: Any, method: str = "counter", **kwargs: Any) -> dict[str, int]:
    """Run ``fn(*args, **kwargs)`` once and return, per ``record_function`` / ``prof.stage`` name, its
    peak CPU allocation in bytes *above the level when fn started* (weights and other resident tensors
    excluded, so two runs of the same models compare directly). The key ``"*"`` holds fn's overall peak.

    ``fn`` may use a :class:`StageProfiler` (no step begun, or ``detail_steps`` empty): its stages are
    record_function ranges on every device, and it never starts its own tracker while one runs. ``method``: see
    :class:`CpuAllocationTracker`. The default counts live storages, as the training loop and
    :func:`~lowmem_alignprop.measure.shared_step.measure_cpu_step` do: exact for every tensor an op returns, and it
    keeps no log. It cannot see the scratch a kernel allocates and frees inside one op (a convolution's
    workspace): to compare features that change that scratch (tiled decode), pass ``method="events"``.
    """
    with CpuAllocationTracker(count_baseline=False, method=method) as tracker:
        fn(*args, **kwargs)
    return {**tracker.peaks, "*": tracker.peak}

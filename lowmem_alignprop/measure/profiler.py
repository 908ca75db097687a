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
  ``TorchDispatchMode``) is active for the whole step: it adds the bytes of every new storage an op returns,
  takes them off when the storage is freed (a weak reference on it), counts views and shared storages once, and
  sees each stage start and end (``record_function`` ranges are ops too). A stage's peak is the highest level
  while it was open, plus the *baseline*: the bytes of the CPU tensors alive when the step began (see
  :func:`live_tensor_bytes`). It keeps no log, only one entry per live storage, so the measured step costs no
  more memory than a plain one (a few MB; ``measurement_bytes`` in the report), and some per-op Python overhead
  in time. It cannot see what a kernel allocates and frees inside one op (a convolution's scratch): on the
  mid-size model's 256 px step it reads 2-3% below torch.profiler's allocator events in decode and backward and
  the same (within 0.01%) in the other stages (benchmarks/REPORT.md section 5), the planner's blind spot too. ``CpuAllocationTracker(method="events")`` measures with those
  events instead (exact, but it keeps every event: hundreds of MB for a 256 px step), for cross-checks.
  Other steps record time and RSS only (RSS cannot see stages: the C allocator keeps freed memory).
* RSS, told apart in the report (``rss``): after load, the largest over the steps not measured, the largest over
  the measured steps, the process's high-water mark, and what the measurement itself held.
* Other devices (mps, xpu, a CUDA device on a build without CUDA): time and RSS only.

Every ``torch.cuda`` memory call is gated on ``torch.cuda.is_available()`` *and* the device type: on a
CPU-only build ``max_memory_allocated()`` silently returns 0 while the reset and snapshot functions
raise AttributeError.

:class:`CpuAllocationTracker` and :func:`measure_cpu_stages` expose the CPU measurement on its own, so
tests and benchmarks can compare the peak of one stage with a memory feature on and off.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import pickle
import platform
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem_alignprop.run import atomic
from lowmem_alignprop.measure.reports import MEMORY_VIZ_URL, fmt_bytes, memory_report_markdown
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
# counting resident tensors
# ---------------------------------------------------------------------------------------------------


def _is_fake(t: torch.Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover - very old torch
        return False
    return isinstance(t, FakeTensor)


def _storage_key(t: torch.Tensor) -> tuple[tuple[str, int], int] | None:
    """(device key, storage pointer) -> the storage's bytes; None for tensors without real memory."""
    if _is_fake(t):
        return None
    try:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
    except Exception:  # sparse, nested or wrapper subclasses without a plain storage
        return None
    dev = t.device
    if dev.type == "meta":  # no memory behind it; count the nominal size, keyed by identity
        return (("meta", id(t)), t.numel() * t.element_size())
    if ptr == 0:
        return None
    return ((str(dev), ptr), nbytes)


def _iter_tensors(obj: Any, _depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors held by a module (params + buffers), an optimizer (state), a tensor, or containers."""
    if _depth > 6 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif hasattr(obj, "state") and hasattr(obj, "param_groups"):  # torch / bitsandbytes optimizers
        state = obj.state
        yield from _iter_tensors(list(state.values()) if isinstance(state, Mapping) else state, _depth + 1)
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _iter_tensors(value, _depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)) or (
        isinstance(obj, Iterable) and not isinstance(obj, (str, bytes))
    ):
        for value in obj:
            yield from _iter_tensors(value, _depth + 1)


def resident_bytes(obj: Any, exclude: set | None = None) -> dict[str, int]:
    """Bytes of the distinct storages held by ``obj``, by device ('cpu', 'cuda:0', 'meta').

    ``exclude`` holds storage keys already counted elsewhere; the keys counted here are added to it.
    """
    seen = exclude if exclude is not None else set()
    out: dict[str, int] = {}
    for t in _iter_tensors(obj):
        key = _storage_key(t)
        if key is None or key[0] in seen:
            continue
        seen.add(key[0])
        dev = key[0][0]
        out[dev] = out.get(dev, 0) + key[1]
    return out


@contextlib.contextmanager
def run_objects_only() -> Iterator[None]:
    """Inside, every object that existed on entry (the modules, classes and functions torch, diffusers and
    transformers import: about 570,000 objects; in a longer-lived process its earlier objects too) is out of the
    garbage collector's reach (``gc.freeze``): the CPU measurement's full collections and tensor scans walk only
    what the run makes (each walk of the imports took 0.6 s on a 2-core AMD EPYC; a CPU run made three scans and two
    collections). On exit the objects are handed back (``gc.unfreeze``) and collected as usual."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _live_storages(device: str | torch.device = "cpu", extra: Iterable[Any] = ()) -> tuple[int, list[Any], int]:
    """(bytes, storages, objects walked) of the distinct tensor storages on ``device`` reachable now; see
    :func:`live_tensor_bytes`."""
    want = torch.device(device).type
    seen: set = set()
    storages: list[Any] = []
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if t.device.type != want:
            return
        key = _storage_key(t)
        if key is None or key[0] in seen:
            return
        seen.add(key[0])
        total += key[1]
        with contextlib.suppress(Exception):
            storages.append(t.untyped_storage())

    def add_with_grad(t: torch.Tensor) -> None:
        add(t)
        if t.is_leaf and t.requires_grad:  # .grad of a non-leaf warns; leaves are what carry grads
            g = t.grad
            if g is not None:
                add(g)

    tensor_type = torch.Tensor
    objects = gc.get_objects()
    n_objects = len(objects)
    try:
        for obj in objects:
            try:
                # type() rather than isinstance(): some module objects fake __class__ and warn when asked.
                if issubclass(type(obj), tensor_type):
                    add_with_grad(obj)
            except Exception:  # proxies and half-built objects can raise on isinstance or attribute access
                continue
    finally:
        del objects  # the list of every object in the process: gone before anything else runs
    for obj in extra:
        for t in _iter_tensors(obj):
            add_with_grad(t)
    return total, storages, n_objects


def live_tensor_bytes(device: str | torch.device = "cpu", extra: Iterable[Any] = ()) -> int:
    """Bytes of all distinct tensor storages on ``device`` that can be reached right now.

    The baseline of the CPU measurement. It counts the union of (a) every tensor the garbage collector
    tracks (all tensors that have a Python object: parameters, buffers, optimizer state, caches, ...)
    and the gradients of leaf tensors among them, and (b) the tensors of ``extra`` (modules, optimizers,
    tensor lists: their gradients too), each storage once. It misses tensors that live only in C++ (for
    example activations saved by autograd between steps, which a training loop should not hold).
    Costs one pass over ``gc.get_objects()`` (0.6 s over the objects of a process with diffusers loaded, a few
    ms for a run's own inside :func:`run_objects_only`; the list it walks is 8 bytes per object, freed at once).
    """
    return _live_storages(device, extra)[0]


# ---------------------------------------------------------------------------------------------------
# CPU: allocation peaks from a count of live storages (what the training loop uses)
# ---------------------------------------------------------------------------------------------------

_ENTER, _EXIT = "enter", "exit"
_RANGE_OPS = {"profiler::_record_function_enter_new": _ENTER, "profiler::_record_function_enter": _ENTER,
              "profiler::_record_function_exit": _EXIT}
_OP_KINDS: dict[Any, Any] = {}  # op -> _ENTER, _EXIT, or a tuple: per return, does it get a new storage


def _op_kind(func: Any) -> Any:
    """What an op's results are: a record_function range's start or end, or per return whether it is a new
    storage (no alias annotation) or an existing one (views ``Tensor(a)``, in-place and out= ``Tensor(a!)``)."""
    kind = _OP_KINDS.get(func)
    if kind is None:
        try:
            schema = func._schema
            kind = _RANGE_OPS.get(schema.name) or tuple(r.alias_info is None for r in schema.returns)
        except Exception:  # an op without a schema: take its results as new
            kind = ()
        _OP_KINDS[func] = kind
    return kind


# per counted storage: its Python object, a weak reference with its callback, a table entry (measured with tracemalloc
# on CPython 3.11: ~530 B, rounded up)
_BOOKKEEPING_BYTES = 600


class StorageCounter(TorchDispatchMode):
    """Counts the bytes of the tensor storages alive now, from the ops that create them, and keeps per-range peaks.

    Exact for what it counts, and it holds no log: one table entry per *live* counted storage, a few counters
    per range. How:

    * Every op's results pass through :meth:`__torch_dispatch__`. A result the op's schema marks as new (no
      alias annotation) whose storage is not counted yet is added; views and in-place/out= results share an
      existing storage and add nothing (an out= result that grew a counted storage adds the growth). Each
      storage is counted once however many tensors view it.
    * A weak reference on each counted storage takes its bytes off when it is freed. :meth:`watch` does the same
      for storages that existed before (their frees lower the level below 0, as an allocator's running total).
    * ``torch.profiler.record_function`` ranges (and so :meth:`StageProfiler.stage`) are ops too: the counter
      sees them start and end, and folds the level into every open range: ``peaks[name]`` is the highest level
      while a range of that name was open (including the level when it opened). ``names`` restricts the ranges.
      Ranges must nest (as ``with`` blocks do): an end closes the innermost open range.

    What it cannot see: memory a kernel allocates and frees inside one op (workspaces: 2-3% of the decode and
    backward peaks of the mid-size model's step), and tensors made without an op (``torch.from_numpy``). The
    planner's fake-tensor estimate counts the same way (``counters.LiveBytes``). Levels are relative to the start.
    The class is self-contained (torch only) so that the planner's counter can later be built on it.
    """

    def __init__(self, device: str | torch.device = "cpu", names: Iterable[str] | None = None):
        super().__init__()
        self.device_type = torch.device(device).type
        self.names = set(names) if names is not None else None
        self.level = 0  # bytes allocated since the start and still alive, minus watched storages freed
        self.peak = 0  # highest level (never below 0: the level at the start)
        self.peaks: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.max_entries = 0  # most storages in the table at once (the counter's own memory)
        self.ops = 0
        self._live: dict[int, list[Any]] = {}  # id(storage) -> [bytes, weakref]
        self._ranges: list[tuple[str | None, float]] = []  # open ranges, innermost last: (name, start time)
        self._open: tuple[str, ...] = ()

    # -- storages -----------------------------------------------------------------------------------

    def _freed(self, key: int, _ref: Any = None) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.level -= entry[0]

    def _add(self, storage: Any, nbytes: int) -> None:
        key = id(storage)
        self._live[key] = [nbytes, weakref.ref(storage, functools.partial(self._freed, key))]
        if len(self._live) > self.max_entries:
            self.max_entries = len(self._live)

    def watch(self, storages: Iterable[Any]) -> None:
        """Storages alive before counting began: their frees lower the level (their bytes are not added)."""
        for st in storages:
            with contextlib.suppress(TypeError, RuntimeError):
                if id(st) not in self._live and st.nbytes() > 0:
                    self._add(st, st.nbytes())

    def _bump(self) -> None:
        level = self.level
        if level > self.peak:
            self.peak = level
        for name in self._open:
            if level > self.peaks[name]:
                self.peaks[name] = level

    def _track(self, t: torch.Tensor, new: bool) -> None:
        if self.device_type == "cpu":
            if not t.is_cpu:
                return
        elif t.device.type != self.device_type:
            return
        try:
            st = t.untyped_storage()
        except Exception:  # sparse, nested, or a wrapper subclass without a plain storage
            return
        entry = self._live.get(id(st))
        if entry is not None:
            if not new:  # an out= or resize_ result can grow a storage already counted
                n = st.nbytes()
                if n != entry[0]:
                    self.level += n - entry[0]
                    entry[0] = n
                    self._bump()
            return
        if not new or (type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter and _is_fake(t)):
            return  # a view of a storage made outside the count (or before it): not an allocation here
        n = st.nbytes()  # 0 is kept too: an out= op may grow it later
        self._add(st, n)
        self.level += n
        self._bump()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        kind = _OP_KINDS.get(func)
        if kind is None:
            kind = _op_kind(func)
        if kind is _ENTER:
            self._range_start(args[0] if args else "?")
        elif kind is _EXIT:
            self._range_end()
        elif isinstance(out, torch.Tensor):
            self._track(out, kind[0] if kind else True)
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                new = kind[0] if len(kind) == 1 else (kind[i] if i < len(kind) else True)
                if isinstance(o, torch.Tensor):
                    self._track(o, new)
                elif isinstance(o, (tuple, list)):
                    for u in o:
                        if isinstance(u, torch.Tensor):
                            self._track(u, new)
        return out

    # -- ranges -------------------------------------------------------------------------------------

    def _range_start(self, name: Any) -> None:
        name = str(name)
        if self.names is not None and name not in self.names:
            self._ranges.append((None, 0.0))  # not measured, but its end must pair with it
            return
        self._ranges.append((name, time.perf_counter()))
        self._open = tuple(dict.fromkeys(r[0] for r in self._ranges if r[0] is not None))
        self.peaks[name] = max(self.peaks.get(name, self.level), self.level)
        self.calls[name] = self.calls.get(name, 0) + 1

    def _range_end(self) -> None:
        # The handle torch passes to the end op is a new Python object each time (and cannot be compared), so
        # ends pair with starts as ranges nest: the innermost open one ends. An end with none open belongs to
        # a range opened before counting began.
        if not self._ranges:
            return
        name, t0 = self._ranges.pop()
        if name is not None:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self._open = tuple(dict.fromkeys(r[0] for r in self._ranges if r[0] is not None))

    def release(self) -> None:
        """Drop the table (its weak references with it): nothing is counted or kept after this."""
        self._live.clear()
        self._ranges.clear()
        self._open = ()

    @property
    def bookkeeping_bytes(self) -> int:
        """About what the counter itself held at most: its table, at its largest."""
        return self.max_entries * _BOOKKEEPING_BYTES


_ACTIVE_TRACKER: list[Any] = []  # the CpuAllocationTracker running now (one at a time)


def _tracker_active() -> bool:
    return bool(_ACTIVE_TRACKER)


# ---------------------------------------------------------------------------------------------------
# CPU: allocation peaks from torch.profiler memory events (the cross-check: exact, but it keeps every event)
# ---------------------------------------------------------------------------------------------------


@dataclass
class _EventAnalysis:
    peaks: dict[str, int] = field(default_factory=dict)  # name -> max running total inside its ranges
    seconds: dict[str, float] = field(default_factory=dict)  # name -> summed duration of its ranges
    calls: dict[str, int] = field(default_factory=dict)
    peak: int = 0  # max running total over the whole session (relative to its start)
    end: int = 0  # running total at the end: bytes allocated in the session and still alive
    n_memory_events: int = 0


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

    out = _EventAnalysis(n_memory_events=len(times))
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
                baseline, storages, n_objects = _live_storages("cpu", self.extra)
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
            ``begin_step(first)`` and dump it at ``end_step(last)`` to ``memory_snapshot.pickle``
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
                logger.warning("profiler: memory snapshots need CUDA; snapshot_steps=%s ignored on %s",
                               snapshot_steps, self.device)
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
        if name == LOAD and self._step is None and self._cpu and self.detail_load and not _tracker_active():
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
        if self._cuda and self.snapshot_steps and step == self.snapshot_steps[0] and not self._snapshot_recording:
            torch.cuda.memory._record_memory_history(max_entries=self.snapshot_max_entries)
            self._snapshot_recording = True
            self._snapshot_window = (step, step)
        if self.is_detail_step(step):
            if _tracker_active():
                logger.info("profiler: another CPU allocation tracker is running; step %d records time only", step)
            else:
                self._tracker = CpuAllocationTracker(names=set(STAGES), extra=self._live_module_objects())
                self._tracker.__enter__()
        self._step_rss0 = self._rss()
        self._step_t0 = time.perf_counter()

    def end_step(self) -> dict[str, Any]:
        """Close the step and return its summary (see the module docstring for the keys)."""
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
        self.steps.append(summary)
        self._last_step, self._step, self._step_figures = step, None, {}
        return summary

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
            for t in _iter_tensors(obj):
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
        measured = {s["step"] for s in self.steps if s.get("source") == CPU_SOURCE}
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
            entry["seconds_mean"] = sum(f["seconds"] for _, f in kept) / len(kept)
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
        measured = _describe_steps(s["step"] for s in self.steps if s["peak_allocated"] is not None)
        return {
            "device": self.device_info(),
            "torch": torch.__version__,
            "budget_gb": self.budget_gb,
            "method": method,
            "detail_steps": "all" if self._detail_all else sorted(self._detail_steps),
            "summary_steps": {
                "steps": _describe_steps(steps_kept),
                "warmup_excluded": warmup,
                "peak_measured_steps": measured or None,  # on CPU only the detail steps measure a peak
                "note": ("per-stage peaks are the max and seconds the mean over these steps"
                         + (f"; step {warmup} excluded as warm-up" if warmup is not None else "")
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
            "fits_budget_basis": "peak_allocated",
            "snapshot": self._snapshot_info(),
            "load": self.outside.get(LOAD),
            "rss": self._rss_summary(),
            "steps": [_compact(s) for s in self.steps],
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


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo's, else the platform's), for reports and benchmark results."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


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
    fig.tight_layout()
    fig.savefig(path)


LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "xformers", "deepspeed")


def library_versions(packages: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Versions of Python and the libraries whose behaviour the figures depend on (None: not installed)."""
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def host_device() -> dict[str, Any]:
    """The machine a figure was measured or estimated on: the CPU's model, its logical cores, torch's threads and
    the first CUDA card (None without one)."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def provenance(command: str, packages: tuple[str, ...] = LIBRARIES, **device: Any) -> dict[str, Any]:
    """What a measured or estimated figure carries (benchmarks/ results, ``plan --json``): the command that produced
    it, the date, the machine (:func:`host_device`; ``device`` adds or overrides entries) and the versions of
    ``packages`` (:func:`library_versions`)."""
    return {"command": command, "date": time.strftime("%Y-%m-%d"), "device": {**host_device(), **device},
            "versions": library_versions(packages)}

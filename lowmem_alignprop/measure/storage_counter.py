""":class:`StorageCounter`: a ``TorchDispatchMode`` that counts the bytes of the live tensor storages as ops make them
and keeps the peak of each ``record_function`` range: the CPU allocation measurement of the training loop
(docs/design.md section 6)."""

from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem_alignprop.measure.resident_tensors import is_fake

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
        if not new or (type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter and is_fake(t)):
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

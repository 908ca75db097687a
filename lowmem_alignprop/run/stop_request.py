"""A training run's answer to Ctrl-C and to a scheduler's SIGTERM (docs/design.md section 5: faults and signals)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from typing import Callable

from lowmem_alignprop.run.runlock import global_rank, world_size

log = logging.getLogger("lowmem_alignprop")


class StopRequest:
    """SIGINT/SIGTERM during training: finish the step, save a checkpoint, exit 0. A second Ctrl-C aborts at once
    (``on_abort`` runs first: the run's lock is released). With ``raise_now`` set (the after samples, which only
    cost time), the first signal raises KeyboardInterrupt there so that the run goes straight to writing its LoRA."""

    def __init__(self, on_abort: Callable[[], None] | None = None):
        self.name: str | None = None
        self._first = 0.0
        self.on_abort = on_abort
        self.raise_now = False

    def _handle(self, signum, frame):
        # a launcher (torchrun, accelerate launch) forwards the terminal's Ctrl-C to its workers, which then see
        # two SIGINTs within milliseconds: only a second press a moment later aborts
        if self.name == "SIGINT" and signum == signal.SIGINT and time.monotonic() - self._first > 2.0:
            self._abort()
        if self.name is None:
            self._first = time.monotonic()
            self.name = signal.Signals(signum).name
            if self.raise_now:
                raise KeyboardInterrupt
            again = ("the launcher stops the processes if they take longer than 30 s" if world_size() > 1
                     else "Ctrl-C again to abort")
            if global_rank() == 0:  # once per run, not once per process
                log.warning("\n%s received: finishing this step, then saving a checkpoint (%s)", self.name, again)

    def _abort(self):
        """Out at once, without unwinding through whatever runs now (the profiler of a detail step would crash
        the interpreter): the steps since the last checkpoint are lost, the rest stays as it was."""
        log.warning("aborted by a second Ctrl-C: the steps since the last checkpoint are lost; --resume latest "
                    "continues from it")
        sys.stdout.flush()
        sys.stderr.flush()
        if self.on_abort is not None:
            self.on_abort()
        os._exit(130)

    @contextlib.contextmanager
    def installed(self):
        import threading
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def agreed(self, accelerator) -> bool:
        """True on every rank if any rank was asked to stop (they save the same step together)."""
        from lowmem_alignprop.run.distributed import any_rank
        return any_rank(accelerator, self.name is not None) and (self.name is not None or self._adopt())

    def _adopt(self) -> bool:
        self.name = "stop request from another process"
        return True

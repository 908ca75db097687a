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


ECHO_S = 2.0  # a second signal within this long of the first is the same request delivered twice (see _handle)
LAUNCHER_PID = os.getppid()  # under a launcher, the process that started this one (watch_launcher)


class CtrlC(KeyboardInterrupt):
    """The KeyboardInterrupt a real SIGINT raises while a command runs (:func:`telling_ctrl_c`; a stop request's
    ``raise_now``). A plain KeyboardInterrupt was raised by code -- a user's reward -- and is that code's failure."""


def _raise_ctrl_c(signum, frame):
    raise CtrlC(signum)


@contextlib.contextmanager
def telling_ctrl_c():
    """While in, Ctrl-C raises :class:`CtrlC` instead of Python's KeyboardInterrupt, so that a user's code that raises
    KeyboardInterrupt itself is told from the user's Ctrl-C; SIGTERM (``timeout``, a scheduler, ``kill``) raises it too,
    where it would end the process on the spot, so that what a command started is cleaned up as for Ctrl-C (a
    ``sample`` folder holding only its lock). Main thread only (signals reach no other); a handler someone else set
    (a training run's :class:`StopRequest`, a host program's) stays theirs."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ours = {s: signal.getsignal(s) for s, default in ((signal.SIGINT, signal.default_int_handler),
                                                      (signal.SIGTERM, signal.SIG_DFL))
            if signal.getsignal(s) is default}
    for s in ours:
        signal.signal(s, _raise_ctrl_c)
    try:
        yield
    finally:
        for s, old in ours.items():
            signal.signal(s, old)


class HeldCtrlC:
    """While in (main thread), Ctrl-C is held and raised as :class:`CtrlC` by :meth:`check`, which the caller calls
    between units of work: a KeyboardInterrupt raised inside one of torch's C++ callbacks (a fake-tensor estimate's
    dispatch) can end the process with "terminate called after throwing an instance of 'python_error'" instead. A
    second Ctrl-C raises at once."""

    def __init__(self):
        self.asked: int | None = None
        self.old = None

    def __enter__(self) -> HeldCtrlC:
        import threading
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame) -> None:
        if self.asked is not None:
            raise CtrlC(signum)
        self.asked = signum

    def check(self) -> None:
        if self.asked is not None:
            raise CtrlC(self.asked)

    def __exit__(self, *exc) -> None:
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """A command's exit status after an interrupt: 128 + the signal's number, as a shell reports a process the signal
    ended (130 for Ctrl-C, 143 for SIGTERM)."""
    signum = interrupt.args[0] if isinstance(interrupt, CtrlC) and interrupt.args else signal.SIGINT
    return 128 + int(signum)


class StopRequest:
    """SIGINT/SIGTERM during training: finish the step, save a checkpoint, exit 0. A second signal, Ctrl-C or SIGTERM,
    aborts at once (``on_abort`` runs first: the run's lock is released); under a launcher only a second Ctrl-C does
    (its SIGTERM is how it passes the first Ctrl-C on). ``saved()``: the step of the run's newest checkpoint, or None,
    for the abort's message. With ``raise_now`` set (the after samples, which only cost time), the first signal raises
    :class:`CtrlC` there so that the run goes straight to writing its LoRA; with ``raise_together`` (the same, where
    the processes render together: ZeRO-3) at the next point they all reach, :meth:`raise_if_agreed`."""

    def __init__(self, on_abort: Callable[[], None] | None = None, saved: Callable[[], int | None] | None = None):
        self.name: str | None = None  # what asked for the stop: this process's signal, or another process
        self._first: float | None = None  # when this process got its own first signal
        self.on_abort = on_abort
        self.saved = saved
        self.raise_now = False
        self.raise_together = False
        self.finishing: str | None = None  # what the run does once training is over (the first signal waits for it)
        self.writing: int | None = None  # the step of a checkpoint being written now (the abort cannot tell its fate)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self._first is not None:
            # a launcher (torchrun, accelerate launch) forwards the terminal's Ctrl-C to its workers, which then see
            # it twice within milliseconds (and its SIGTERM, its way of stopping them, after it): a second signal
            # aborts only a moment later, and under a launcher only a second Ctrl-C
            if time.monotonic() - self._first > ECHO_S and (world_size() == 1 or signum == signal.SIGINT):
                self._abort(name)
            return
        self._first = time.monotonic()
        self.name = self.name or name
        if self.raise_now:
            raise CtrlC
        # once training is over every trained step is in a checkpoint: an abort loses none (abort_message)
        lost = ("no trained step is lost, --resume latest writes the outputs again" if self.finishing
                else "the steps since the last checkpoint are lost")
        again = ("a second Ctrl-C does not abort under a launcher; it stops the processes if they take longer than "
                 "30 s" if world_size() > 1
                 else f"{'Ctrl-C' if name == 'SIGINT' else 'a second SIGTERM or a Ctrl-C'} aborts: {lost}")
        doing = f"{self.finishing}: a moment" if self.finishing else "finishing this step, then saving a checkpoint"
        if global_rank() == 0:  # once per run, not once per process
            log.warning("\n%s received: %s (%s)", name, doing, again)

    def abort_message(self, name: str) -> str:
        """What the abort by a second signal ``name`` loses and what is left: the one place this is said."""
        what = "Ctrl-C" if name == "SIGINT" else name
        step = self.saved() if self.saved is not None else None
        if self.writing is not None:  # cut short: a resume publishes it if its manifest shows it whole
            kept = f"else from step {step}'s" if step is not None else "else no step is kept"
            return (f"aborted by a second {what} while step {self.writing}'s checkpoint was written: --resume latest "
                    f"continues from it if it was written whole, {kept}")
        if step is None:
            return (f"aborted by a second {what} before the run's first checkpoint: no step is kept, so there is "
                    "nothing to resume; start the run again (in a new --output-dir, or delete this one first)")
        if self.finishing:  # training is over: no step is lost, only the outputs' writing cut short
            return (f"aborted by a second {what} after training ({self.finishing}): every trained step is in step "
                    f"{step}'s checkpoint; --resume latest writes the LoRA and summary again from it")
        return (f"aborted by a second {what}: the steps after step {step} are lost; --resume latest continues from "
                f"step {step}'s checkpoint")

    def _abort(self, name: str):
        """Out at once, without unwinding through whatever runs now (the profiler of a detail step would crash
        the interpreter): the steps since the last checkpoint are lost, the rest stays as it was."""
        if global_rank() == 0:  # (a scheduler's second signal reaches every rank: one says it)
            log.warning("%s", self.abort_message(name))
        sys.stdout.flush()
        sys.stderr.flush()
        if self.on_abort is not None:
            self.on_abort()
        os._exit(128 + int(signal.Signals[name]))  # 130 for Ctrl-C, 143 for SIGTERM, as a killed process

    @contextlib.contextmanager
    def installed(self):
        import threading
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        gone = threading.Event()
        if world_size() > 1:  # a launcher killed (kill -9) left its workers training on, orphaned, to the end
            threading.Thread(target=watch_launcher, args=(gone,), daemon=True, name="launcher-watch").start()
        try:
            yield self
        finally:
            gone.set()  # (the watch ends)
            for s, h in old.items():
                signal.signal(s, h)

    def raise_if_agreed(self, accelerator) -> None:
        """With ``raise_together``: :class:`CtrlC` on every process if any was asked to stop (one collective). Processes
        that render together (ZeRO-3's weight gathers) must stop together: one raising alone (``raise_now``) left the
        others in a gather it never joined (a gloo abort)."""
        if self.raise_together and self.agreed(accelerator):
            raise CtrlC

    def agreed(self, accelerator) -> bool:
        """True on every rank if any rank was asked to stop (they save the same step together); a rank that was not
        takes the name of the first one's signal and rank (a scheduler's SIGTERM to one rank: "SIGTERM on rank 1",
        which rank 0 then says)."""
        from lowmem_alignprop.run.distributed import first_rank_with

        mine = int(signal.Signals[self.name]) if self.name in signal.Signals.__members__ else (
            -1 if self.name is not None else 0)  # (-1: a stop asked for by no signal)
        first = first_rank_with(accelerator, mine)
        if first is not None and self.name is None:
            rank, code = first
            self.name = f"{signal.Signals(code).name} on rank {rank}" if code > 0 else "a stop on another process"
        return first is not None


def watch_launcher(done, poll_s: float = 2.0, parent=os.getppid, stop=lambda: os.kill(os.getpid(), signal.SIGTERM)):
    """Under a launcher, until ``done`` is set: when the launcher that started this process is gone (killed with
    ``kill -9``, which no worker hears of: they trained on, orphaned, to the end), ask this process to stop as a
    scheduler's SIGTERM does: the step finishes, every rank saves it together, the run ends."""
    while not done.wait(poll_s):
        if parent() != LAUNCHER_PID:
            if global_rank() == 0:
                log.warning("the launcher (pid %d) is gone: stopping as for a SIGTERM (this step, then a checkpoint)",
                            LAUNCHER_PID)
            stop()
            return

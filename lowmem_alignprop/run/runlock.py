"""One run at a time per output folder.

Two runs writing into the same folder would interleave their metrics, checkpoints and LoRA. A training run
holds ``OUTPUT_DIR/.run.lock`` from before it writes anything until it ends: an exclusive ``flock`` on the
file (the kernel releases it when the process dies, however it dies), with the holder's pid, host and start
time written into it for the messages. A second run into that folder, or a ``--resume`` of it while it is
live, stops with one line; the auto-numbered default folder of a run started at the same moment moves on to
the next free one (see :class:`lowmem_alignprop.run.runfolder.RunFolder`).

A lock file left by a killed run holds no lock any more and is simply taken. Under ``accelerate launch`` only
global rank 0 takes it (one lock per run, not per process); the other ranks recognise their launch in it.
Without ``fcntl`` (Windows) the file is created exclusively and a leftover is judged by its pid instead.

Why not ``filelock.FileLock``: the lock file here holds who holds it (pid, host, start, launch: what the refusal
says, and how the other ranks of a launch recognise theirs), and it is removed when the run ends, while still
locked, with an inode check for a run that opened it meanwhile; filelock leaves its lock file behind and holds no
content.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Callable

from lowmem_alignprop.settings.errors import UserError, quote

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger("lowmem_alignprop")

LOCK_NAME = ".run.lock"


class LockTaken(UserError):
    """Another live run holds the output folder."""


def _flock(fd: int, tries: int = 3) -> bool:
    """Take the exclusive lock without waiting; a few quick retries, since a run checking whether the folder is
    free (:func:`holder`) holds it for a moment."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if attempt + 1 < tries:
                time.sleep(0.05)
    return False


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine runs (another user's counts: it exists). psutil's test, not
    ``os.kill(pid, 0)``: on Windows that sends a Ctrl-C event to the process group and fails for a dead pid with an
    error that reads as "alive"."""
    import psutil

    if not 0 < pid < 2**31:  # (a damaged lock file or folder name: no process has it, and psutil overflows)
        return False
    return psutil.pid_exists(pid)


def _content(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):  # being written this instant, or damaged
        return {}


def holder(output_dir: str | os.PathLike) -> dict | None:
    """The live run holding ``output_dir`` (what its lock file says, plus ``path``), or None."""
    path = Path(output_dir) / LOCK_NAME
    if not path.exists():
        return None
    info = _content(path)
    if info.get("launch") and info.get("launch") == launch_id():
        return None  # taken by rank 0 of this same launch: the other ranks write there with it
    if fcntl is not None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            if _flock(fd):
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None  # a file left by a run that ended: nobody holds it
        finally:
            os.close(fd)
    elif info.get("host") == socket.gethostname() and str(info.get("pid", "")).isdigit() \
            and not pid_alive(int(info["pid"])):
        return None
    return {"pid": "?", "host": "?", "started": "?", **info, "path": str(path)}


def check_free(output_dir: str | os.PathLike, resuming: bool = False) -> None:
    """Stop with one line when a live run holds ``output_dir`` (``resuming``: the fix is to stop that run, which keeps
    its finished steps, not another folder, where no checkpoint of it is)."""
    live = holder(output_dir)
    if live is not None:
        fix = (f"wait for it to finish, or stop it (Ctrl-C, or kill {live.get('pid')}: it saves its finished steps) "
               "and resume then" if resuming else "wait for it to finish, or choose another --output-dir")
        raise LockTaken(f"another run is writing to {output_dir} (pid {live.get('pid')} on {live.get('host')}, "
                        f"started {live.get('started')}): {fix}")


class RunLock:
    """``with RunLock(out):`` (or ``acquire()`` ... ``release()``) holds ``out`` for this run. Creates ``out`` if
    needed; on release removes the lock file, and the folders it created when the run left nothing in them (bad
    input found after the lock: no trace). Raises :class:`LockTaken` when a live run holds ``out``."""

    def __init__(self, output_dir: str | os.PathLike, *, enabled: bool = True):
        self.out = Path(output_dir)
        self.path = self.out.absolute() / LOCK_NAME  # released where it was taken, whatever the working directory
        self.enabled = enabled
        self._created: list[Path] = []
        self._fd: int | None = None
        self._held = False

    def acquire(self) -> "RunLock":
        if not self.enabled or self._held:
            return self
        missing, p = [], self.out.absolute()
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        self.out.mkdir(parents=True, exist_ok=True)
        self._created = missing  # deepest first: removed in that order when left empty
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cwd": os.getcwd(), "launch": launch_id()})
        try:
            if fcntl is not None:
                self._acquire_flock(info)
            else:
                self._acquire_exclusive(info)
        except LockTaken:
            self._remove_created()
            raise
        self._held = True
        return self

    def _acquire_flock(self, info: str) -> None:
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _flock(fd):
                os.close(fd)
                check_free(self.out)  # names the holder (raises LockTaken)
                raise LockTaken(f"another run is writing to {self.out}: wait for it to finish, or choose another "
                                "--output-dir")
            try:  # the file may have been removed (by a run ending) between our open and our lock: then retry
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            if os.fstat(fd).st_size:
                log.warning("%s was left by a run that no longer runs: taking it over", self.path)
            os.ftruncate(fd, 0)
            os.write(fd, info.encode())
            self._fd = fd
            return
        raise LockTaken(f"could not take {self.path}: other runs keep replacing it; choose another --output-dir")

    def _acquire_exclusive(self, info: str) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                check_free(self.out)
                log.warning("%s was left by a run that no longer runs: taking it over", self.path)
                self.path.unlink(missing_ok=True)
                continue
            os.write(fd, info.encode())
            os.close(fd)
            return
        raise LockTaken(f"another run took {self.out} at the same moment: choose another --output-dir")

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        try:
            self.path.unlink(missing_ok=True)  # while still locked: a run that opened this file sees it is gone
        except OSError:  # a disk gone read-only: left, and taken over by the next run (the kernel frees the flock);
            pass  # raised here, it hid the error the run stopped with
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()  # only if the run wrote nothing there
            except OSError:
                break

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def hold_folder(out: Path, taken: Callable[[Path], object], *, numbered: bool, enabled: bool = True) -> RunLock:
    """The acquired lock of ``out``. A ``numbered`` folder (the default ``outputs/run-N``, not one the user named)
    that another run took a moment ago, or that ``taken`` finds filled meanwhile, gives way to the next free one
    (``lock.out`` says which); a folder the user named raises :class:`LockTaken`."""
    base = out.with_name(re.sub(r"-\d+$", "", out.name))
    while True:
        lock = RunLock(out, enabled=enabled)
        try:
            lock.acquire()
            if numbered and taken(out):  # a run started with this one got there first
                lock.release()
                raise LockTaken(f"{out} was taken meanwhile")
            return lock
        except LockTaken:
            if not numbered:
                raise
            out = next_free_dir(base, lambda d: holder(d) or taken(d))


def next_free_dir(base: Path, taken) -> Path:
    """``base``, or the first of ``base-2``, ``base-3``... for which ``taken(folder)`` is falsy."""
    out, n = base, 1
    while taken(out):
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def numbered_dirs(base: Path) -> list[Path]:
    """The ``base-2``, ``base-3``... folders that exist (:func:`next_free_dir`'s), in their numbers' order."""
    found = {int(n): p for p in (base.parent.glob(f"{base.name}-*") if base.parent.is_dir() else ())
             if (n := p.name[len(base.name) + 1:]).isdigit() and int(n) >= 2 and p.is_dir()}
    return [found[n] for n in sorted(found)]


def launch_id() -> str | None:
    """What the processes of one ``accelerate launch``/torchrun share (None for a single process)."""
    if world_size() <= 1:
        return None
    return "/".join(os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))


def _env_count(name: str, default: int) -> int:
    """A launcher's variable as a whole number; one that is not (``WORLD_SIZE=abc`` left in a shell) is a UserError."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise UserError(f"{name}={quote(text)} in the environment is not a count of processes: launchers (accelerate "
                        f"launch, torchrun) set it; unset {name} to run as one process")
    return value


def world_size() -> int:
    """How many processes ``accelerate launch``/torchrun started (1 when started plainly)."""
    return max(1, _env_count("WORLD_SIZE", 1))


def local_world_size() -> int:
    """How many processes of the launch run on this machine (torchrun's LOCAL_WORLD_SIZE; 1 when started plainly)."""
    return max(1, _env_count("LOCAL_WORLD_SIZE", 1))


def global_rank() -> int:
    """This process's rank under ``accelerate launch``/torchrun (0 when started plainly: a RANK left in the
    environment without a WORLD_SIZE above 1 is no launcher's)."""
    rank = _env_count("RANK", 0)
    return rank if world_size() > 1 else 0

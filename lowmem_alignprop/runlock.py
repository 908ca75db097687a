"""One run at a time per output folder.

Two runs writing into the same folder would interleave their metrics, checkpoints and LoRA. A training run
holds ``OUTPUT_DIR/.run.lock`` (its pid, host and start time) from before it writes anything until it ends;
a second run into that folder, a ``--resume`` of it while it is live, or the auto-numbered default folder
of a second run started at the same moment, sees the lock and goes elsewhere or stops with one line.

A lock left by a run that was killed (its pid no longer exists on this host) is taken over with a note.
Under ``accelerate launch`` only global rank 0 takes it: one lock per run, not per process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from .errors import UserError

log = logging.getLogger("lowmem_alignprop")

LOCK_NAME = ".run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def holder(output_dir: str | os.PathLike) -> dict | None:
    """The live run holding ``output_dir`` (its lock's content), or None when no live run holds it.
    A lock from another host cannot be checked, so it counts as live."""
    path = Path(output_dir) / LOCK_NAME
    try:
        info = json.loads(path.read_text())
        pid, host = int(info["pid"]), str(info["host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # being written this instant, or damaged: treat as held
        return {"pid": "?", "host": "?", "started": "?", "path": str(path)}
    if host == socket.gethostname() and not _alive(pid):
        return None
    if info.get("launch") and info.get("launch") == launch_id():
        return None  # taken by rank 0 of this same launch: the other ranks write there with it
    return {**info, "path": str(path)}


def check_free(output_dir: str | os.PathLike) -> None:
    """Stop with one line when a live run holds ``output_dir``."""
    live = holder(output_dir)
    if live is not None:
        raise UserError(f"another run is writing to {output_dir} (pid {live.get('pid')} on {live.get('host')}, "
                        f"started {live.get('started')}): wait for it to finish, or choose another --output-dir; "
                        f"if no run is active there, delete {live['path']}")


class RunLock:
    """``with RunLock(out):`` holds ``out`` for this run. Creates ``out`` if needed; on exit removes the lock,
    and the folders it created when the run left nothing in them (bad input found after the lock: no trace)."""

    def __init__(self, output_dir: str | os.PathLike, *, enabled: bool = True):
        self.out = Path(output_dir)
        self.path = self.out / LOCK_NAME
        self.enabled = enabled
        self._created: list[Path] = []

    def __enter__(self) -> "RunLock":
        if not self.enabled:
            return self
        missing, p = [], self.out.absolute()
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        self.out.mkdir(parents=True, exist_ok=True)
        self._created = missing  # deepest first: removed in that order when left empty
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cwd": os.getcwd(), "launch": launch_id()}
        for _ in range(2):
            tmp = self.out / f"{LOCK_NAME}.{os.getpid()}"
            tmp.write_text(json.dumps(info))
            try:
                os.link(tmp, self.path)  # atomic: fails if the lock exists, and never exposes a half-written one
                return self
            except FileExistsError:
                try:
                    check_free(self.out)
                except UserError:
                    self._cleanup()
                    raise
                log.warning("%s was left by a run that no longer exists: taking it over", self.path)
                self.path.unlink(missing_ok=True)
            finally:
                tmp.unlink(missing_ok=True)
        self._cleanup()
        raise UserError(f"another run took {self.out} at the same moment: choose another --output-dir")

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)
            self._cleanup()

    def _cleanup(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()  # only if the run wrote nothing there
            except OSError:
                break


def launch_id() -> str | None:
    """What the processes of one ``accelerate launch``/torchrun share (None for a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    return "/".join(os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))


def global_rank() -> int:
    """This process's rank under ``accelerate launch``/torchrun (0 when started plainly)."""
    return int(os.environ.get("RANK", "0") or 0)

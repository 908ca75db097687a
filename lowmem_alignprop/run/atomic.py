"""Every file a command leaves behind is written atomically: into a temporary name beside it, synced, then renamed
into place with ``os.replace``. A full disk or a kill during the write leaves the previous file (or none), never a
truncated one. A folder (the LoRA, an export) is written into a temporary folder that is renamed the same way.

    atomic.write_text(out / "summary.json", text)
    with atomic.replacing(out / "grid.png") as tmp:      # a library writes the file itself
        image.save(tmp)
    with atomic.replacing_dir(out / "lora") as tmp:      # a whole folder
        pipe.save_lora_weights(str(tmp), ...)

An error while writing carries the final path as ``error.lowmem_file``, so a one-line message can name the file.
What is renamed into place is as readable as the process's umask allows, whatever wrote it (safetensors writes its
files 0600; a temporary folder is made 0700): a ComfyUI server of another user reads the LoRA.

Test hook: ``LOWMEM_ALIGNPROP_INJECT_WRITE="NAME[:enospc|erofs|kill]"`` (comma-separated) fails the write of the file
or folder called NAME just before it is renamed into place: ``enospc`` (the default) raises a disk-full OSError,
``erofs`` a read-only file system's, ``kill`` kills the process with SIGKILL, as a crash would, leaving the temporary
file behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
from glob import escape as glob_escape
from pathlib import Path
from typing import Iterator

from lowmem_alignprop.run.runlock import pid_alive
from lowmem_alignprop.run.tensor_files import is_safetensors
from lowmem_alignprop.settings.errors import first_line

INJECT_ENV = "LOWMEM_ALIGNPROP_INJECT_WRITE"
PARTIAL = ".partial-"  # temporary names start with it; a reader never takes them for a finished file
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)  # a folder or a disk that takes no writes (now)
WINDOWS = os.name == "nt"
_UMASK = os.umask(0o022)  # the process's umask: os.umask reads it only by setting it, so it is set back at once
os.umask(_UMASK)


def partial_name(path: Path) -> Path:
    """The temporary name beside ``path``; it ends in the same suffix, so writers that pick the format by the name
    (PIL, matplotlib) write the same bytes."""
    return path.with_name(f"{PARTIAL}{os.getpid()}-{path.name}")


def inject(path: Path) -> None:
    """The test hook (see the module docstring): called with the final path just before the rename."""
    for part in os.environ.get(INJECT_ENV, "").split(","):
        name, _, action = part.strip().partition(":")
        if name and name == path.name:
            if action == "kill":
                os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))  # (Windows has no SIGKILL)
            code = errno.EROFS if action == "erofs" else errno.ENOSPC
            raise OSError(code, f"{os.strerror(code)} (test hook {INJECT_ENV})", str(path))


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def finish_file(path: Path) -> None:
    """Sync a written file and give it the permissions a plain ``open`` would have (the umask's); a .safetensors
    file's header metadata sorted (:func:`sort_safetensors_metadata`)."""
    if is_safetensors(path):
        sort_safetensors_metadata(path)
    try:  # Windows flushes a file only through a handle that may write (a read-only one fails with EBADF)
        with open(path, "r+b" if WINDOWS else "rb") as fh:
            os.fsync(fh.fileno())
    except PermissionError:  # Windows: a read-only file (a copy of one) cannot be opened to write: left to the OS
        if not WINDOWS:
            raise
    shareable(path)


def sort_safetensors_metadata(path: Path) -> None:
    """safetensors writes its header's ``__metadata__`` in the order of a Rust HashMap, which changes from process to
    process: the same tensors and metadata (a LoRA's peft config beside ``format``) gave other bytes, and a reproduced
    run's sha256 differed. The header is rewritten in place (a file not yet renamed into place) with the metadata's
    keys sorted, when that fits its length (the same keys and values in compact JSON: it does); else it is left."""
    with open(path, "rb") as fh:  # read first: a file already in order (or read-only, a copy) is left alone
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size <= 100_000_000:  # (safetensors' own header limit)
            return
        raw = fh.read(size)
    try:
        header = json.loads(raw)
    except ValueError:
        return
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or list(meta) == sorted(meta):
        return
    header["__metadata__"] = dict(sorted(meta.items()))
    ordered = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(ordered) > size:  # (an escaping other than safetensors' own)
        return
    with open(path, "r+b") as fh:
        fh.seek(8)
        fh.write(ordered + b" " * (size - len(ordered)))  # safetensors pads its header with spaces


def shareable(path: Path) -> None:
    """Add the permission bits the umask allows (files rw, folders rwx) to what ``path`` has."""
    allowed = (0o777 if path.is_dir() else 0o666) & ~_UMASK
    mode = path.stat().st_mode & 0o7777
    if mode | allowed != mode:
        os.chmod(path, mode | allowed)


def finish_tree(folder: Path) -> list[Path]:
    """:func:`finish_file` on every file under ``folder`` and :func:`shareable` on it and every folder in it; returns
    the files, sorted (what a folder written into place, or a checkpoint's manifest, is made of)."""
    files = []
    for f in [folder, *sorted(folder.rglob("*"))]:
        if f.is_file():
            finish_file(f)
            files.append(f)
        elif f.is_dir():
            shareable(f)
    return files


def _tag(error: BaseException, path: Path) -> None:
    if getattr(error, "lowmem_file", None) is None:
        try:
            error.lowmem_file = path
        except AttributeError:  # an exception type without a __dict__
            pass


def make_parent(path: Path) -> None:
    """The folder ``path`` is written into, made where missing; a failure carries ``path`` as a failed write does."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _tag(e, path)
        raise


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write it completely, and on leaving it is synced and renamed to
    ``path`` (replacing an older file). On any error it is removed and ``path`` is left as it was."""
    path = Path(path)
    make_parent(path)
    remove_dead_partials(path)  # a killed write of this file left its temporary file beside it
    tmp = partial_name(path)
    try:
        yield tmp
        finish_file(tmp)
        inject(path)
        os.replace(tmp, path)
    except BaseException as e:
        _tag(e, path)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return write_bytes(path, text.encode(encoding))


def append_line(path: Path, line: str) -> None:
    """Add a line to a small text file, atomically (the old content and the line in a temporary file, renamed)."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    write_text(path, old + line.rstrip("\n") + "\n")


@contextlib.contextmanager
def replacing_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty temporary folder beside ``path``; on leaving, its files are synced and it is renamed to
    ``path``. An older ``path`` is moved aside first and removed after (a crash in between leaves it beside, whole).
    On any error the temporary folder is removed and ``path`` is left as it was."""
    path = Path(path)
    make_parent(path)
    remove_dead_partials(path)  # a killed write of this folder (an export's merged model: gigabytes) is never finished
    tmp = partial_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        finish_tree(tmp)
        fsync_dir(tmp)
        inject(path)
        swap_in(tmp, path)
    except BaseException as e:
        _tag(e, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(tmp: Path, path: Path) -> None:
    """Rename the finished folder ``tmp`` to ``path``: an older ``path`` is moved aside first and removed after (a
    crash in between leaves it beside, whole); on an error it goes back, nothing lost. The one swap of every folder
    write (:func:`replacing_dir`, a checkpoint's publish)."""
    old = None
    try:
        if path.exists() or path.is_symlink():
            old = _set_aside(path)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            with contextlib.suppress(OSError):
                os.replace(old, path)  # the older folder goes back: nothing lost
        raise
    fsync_dir(path.parent)
    if old is not None:
        _remove(old)


def _set_aside(path: Path) -> Path:
    """Rename ``path`` to a temporary name beside it (``.partial-old-PID-NAME``, which a later start removes as a
    leftover of a kill) and return that name."""
    old = path.with_name(f"{PARTIAL}old-{os.getpid()}-{path.name}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    return old


def remove_dir(path: Path) -> None:
    """Remove a folder so that a kill midway leaves no half of it under its name (a checkpoint missing its weights,
    which --resume, export and rotation then took for a damaged one and kept for good): renamed first, then
    removed; a kill leaves the renamed rest, which the run's next start removes (``RunFolder.remove_leftovers``).
    Where it cannot be renamed it is removed in place."""
    try:
        path = _set_aside(path)
    except OSError:
        pass
    _remove(path)


def _remove(p: Path) -> None:
    """A folder with what it holds, or a file or link (never what a link points to)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def remove_dead_partials(path: Path) -> None:
    """Remove the temporary folders and files beside ``path`` of earlier writes of it by processes of this machine
    that are gone (killed: a kill leaves them, with that process's pid in their name)."""
    for p in path.parent.glob(f"{PARTIAL}*-{glob_escape(path.name)}"):
        pid = p.name[len(PARTIAL):-len(path.name) - 1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            _remove(p)


def leftovers(folder: str | os.PathLike) -> list[Path]:
    """Temporary files and folders of writes that did not finish (a kill), anywhere under ``folder``."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob(f"{PARTIAL}*")) if folder.is_dir() else []


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL


def unwritable(error: OSError) -> bool:
    """``error`` refused a write of this module's (an atomic write's, metrics.jsonl's append: tagged with the file):
    a permission or read-only error on a path in the folder it was writing into (a folder or a disk that turned
    read-only mid-run). Not a file read elsewhere (a copy's source), which the same errno refuses too."""
    final = getattr(error, "lowmem_file", None)
    if final is None or error.errno not in UNWRITABLE:
        return False
    if getattr(error, "filename", None) is None:
        return True
    name, folder = Path(error.filename).absolute(), Path(final).absolute().parent
    return name.is_relative_to(folder) or folder.is_relative_to(name)  # (the folder, or one made on the way to it)


def describe(error: OSError) -> str:
    """What went wrong, in words: 'the disk is full', 'Permission denied'..."""
    return "the disk is full" if is_disk_full(error) else (error.strerror or type(error).__name__)


def write_fix(error: OSError, where: str = "--output-dir") -> str:
    """What to do about a failed write into ``where``, by its cause: free space, the file-size limit, permissions."""
    if is_disk_full(error):
        return f"free space in {where}"
    if error.errno == errno.EFBIG:
        return f"raise the file-size limit (ulimit -f) or free space in {where}"
    if error.errno in UNWRITABLE:
        return f"make {where} writable"
    return f"fix that in {where}"


def file_of(error: BaseException) -> str:
    """The file an OSError happened on: the final name an atomic write was making, else the error's own."""
    tagged = getattr(error, "lowmem_file", None)
    if tagged is not None:
        return str(tagged)
    return str(getattr(error, "filename", None) or "a file")


# torch's zip writer (torch.save) turns a failed write into a RuntimeError without the OS's errno, the same text for a
# full disk (ENOSPC) and a file-size limit (EFBIG, ulimit -f): "[enforce fail at inline_container.cc:672] . unexpected
# pos 114496 vs 114388" (torch 2.13), "PytorchStreamWriter failed writing file data/0: file write failed"; safetensors
# (Rust) says "Error while serializing: I/O error: No space left on device (os error 28)" in a SafetensorError.
TORCH_WRITE_FAILED = ("unexpected pos ", "file write failed", "PytorchStreamWriter failed")
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def write_failure(e: BaseException, folder: Path) -> OSError | None:
    """The OS error behind a failed write into ``folder`` (an OSError as it is; torch's and safetensors' forms of it,
    above, as the OSError they stand for), or None when ``e`` is no failed write. Whether that is a full disk is then
    ``atomic.is_disk_full``'s to say."""
    if isinstance(e, OSError):
        return e
    found_error = _write_failure(e, folder)
    if found_error is not None and getattr(e, "lowmem_file", None) is not None:
        _tag(found_error, e.lowmem_file)  # the file an atomic write was making, for the message
    return found_error


def _write_failure(e: BaseException, folder: Path) -> OSError | None:
    text = str(e)
    if type(e).__name__ == "SafetensorError" and (found := _RUST_OS_ERROR.search(text)):
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    if not (isinstance(e, RuntimeError) and any(s in text for s in TORCH_WRITE_FAILED)):
        return None
    seen, cause = set(), e.__cause__ or e.__context__
    while cause is not None and id(cause) not in seen:  # torch.save into a file object: the file's own OSError
        if isinstance(cause, OSError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    code = _unreported_errno(folder)  # torch.save into a path (the EMA's file, DeepSpeed's): no errno anywhere
    return OSError(code, os.strerror(code) if code != errno.EIO else f"the write failed ({first_line(e, 100)})")


def _unreported_errno(folder: Path) -> int:
    """What a write that failed without an errno ran into: a full disk (next to nothing free where it wrote), else a
    file-size limit (ulimit -f) if one is set, else EIO."""
    try:
        st = os.statvfs(folder)
        free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize  # root writes into the reserve
    except (OSError, AttributeError):  # no statvfs (Windows)
        free = None
    if free is not None and free < 1 << 20:
        return errno.ENOSPC
    try:
        import resource
    except ImportError:
        return errno.EIO
    return errno.EFBIG if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY else errno.EIO

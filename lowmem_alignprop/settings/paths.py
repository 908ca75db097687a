"""What a path given by the user is, in words, for one-line errors: a file option given a directory, /dev/null, a
dangling symlink or a symlink loop is told so, not "does not exist"; and which pipeline a diffusers folder holds."""

from __future__ import annotations

import codecs
import errno
import json
import os
import re
import stat
from pathlib import Path


class NotText(ValueError):
    """A user's text file that is neither UTF-8 nor UTF-16 with a byte-order mark; str(): where, in words, after
    the file's name ("is not UTF-8 text: line 2, column 4 (byte 22 of the file) holds 0xE9 ...")."""


LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what an editor counts as a line's end (str.splitlines also splits at \f, \x85)


def read_user_text(path: Path) -> str:
    """A text file the user wrote (a profile, a prompt file): UTF-8, with or without a byte-order mark, or UTF-16
    with one (what Windows PowerShell 5.1's ``>`` writes: ``lowmem-alignprop profiles cpu > mine.yaml``). Raises
    NotText for anything else (saying the line and byte), OSError where it cannot be read."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:  # (its offsets count the byte-order mark)
            raise NotText(f"is not UTF-8 text, and not UTF-16 though it starts with UTF-16's byte-order mark: "
                          f"{_where(data, e.start, 'utf-16')} does not decode ({e.reason})") from None
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    few, many = sorted((data[1::2].count(0), data[0::2].count(0)))  # UTF-16 of Latin text: a NUL beside each letter
    if many >= 2 and many * 2 > len(data) // 2 and few < many // 4:  # (a file of zeros is no UTF-16)
        raise NotText("is not UTF-8 text: it looks like UTF-16 without a byte-order mark (a NUL byte beside each "
                      "letter)")
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        legacy = data[at:at + 1].decode("cp1252", errors="ignore")  # (0x81, 0x8D, 0x8F, 0x90, 0x9D: none)
        guess = f" (in Windows-1252: {legacy!r})" if legacy.isprintable() and legacy else ""
        raise NotText(f"is not UTF-8 text: {_where(data, at, 'utf-8-sig')} holds 0x{data[at]:02X}{guess}") from None


def _where(data: bytes, offset: int, codec: str) -> str:
    """'line L, column C (byte B of the file)' of byte ``offset`` of ``data`` (read as ``codec``), counted from 1 as
    an editor counts them (B from 0, as hex viewers do)."""
    lines = LINE_BREAK.split(data[:offset].decode(codec, errors="replace"))
    return f"line {len(lines)}, column {len(lines[-1]) + 1} (byte {offset} of the file)"


def absolute_path(path: str | os.PathLike) -> str:
    """``path`` absolute, its '..' parts taken out where that names the same file: 'link/../x' after a symlink is
    the link target's neighbour to the system, so it is kept whole there (os.path.abspath would name ./x)."""
    short = os.path.abspath(path)
    try:
        if os.path.samefile(short, path):
            return short
    except OSError:  # (one of them missing: nothing tells them apart, so the system's reading is kept)
        pass
    return os.path.join(os.getcwd(), os.fspath(path))


def kind_of(path: str | os.PathLike) -> str:
    """'missing', 'file', 'directory', 'dangling symlink', 'symlink loop', 'special file' (a device such as
    /dev/null, a pipe, a socket), or 'name too long' (a name past the file system's 255 bytes)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:  # (40 on Linux, 62 on macOS)
            return "symlink loop"
        if e.errno == errno.ENAMETOOLONG:
            return "name too long"
        if path.is_symlink():
            return "dangling symlink"
        try:  # a loop in a folder above it reads as ELOOP too
            os.stat(path.parent)
        except OSError as parent_error:
            if parent_error.errno == errno.ELOOP:
                return "symlink loop"
        return "missing"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    return "special file"


def describe(path: str | os.PathLike) -> str:
    """'does not exist', 'is a directory', 'is a symlink to X, which does not exist'... for a message."""
    kind = kind_of(path)
    if kind == "dangling symlink":
        return f"is a symlink to {os.readlink(path)}, which does not exist"
    if kind == "symlink loop":
        return "is a symlink loop (its links point at each other)"
    if kind == "special file":
        return "is not a regular file (a device such as /dev/null, a pipe or a socket)"
    if kind == "name too long":
        return "has a name longer than the file system takes (255 bytes a folder or file name)"
    return {"missing": "does not exist", "file": "is a file", "directory": "is a directory"}[kind]


def model_index(folder: str | os.PathLike) -> dict | None:
    """A diffusers folder's model_index.json (component -> [library, class], ``_class_name``...), or None: no
    folder, no index, not a JSON object. The one reader of it; model_check says what is wrong with a bad one."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) else None


def scheduler_config(folder: str | os.PathLike) -> dict | None:
    """A diffusers folder's scheduler/scheduler_config.json, read without loading; None where there is no such folder
    or config, or it is no JSON object. The one reader of it."""
    try:
        conf = json.loads((Path(folder).expanduser() / "scheduler" / "scheduler_config.json").read_text(
            encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return conf if isinstance(conf, dict) else None


def scheduler_prediction(folder: str | os.PathLike) -> str | None:
    """What a diffusers folder's scheduler config says its UNet predicts (epsilon, v_prediction); None where there
    is no such folder or config, or it does not say."""
    return (scheduler_config(folder) or {}).get("prediction_type")


def per_reward_weights(value: str) -> bool:
    """Whether a reward_weights value (or one of its ';'-separated entries) names weights per reward
    ('aesthetic=PATH;clip=PATH'), not one path: the rule rewards and run/input_files read it by."""
    return "=" in value and re.match(r"^\s*[A-Za-z_]\w*\s*=", value) is not None


def vae_subfolder(folder: str | os.PathLike) -> str | None:
    """``vae`` where a VAE folder given is a pipeline folder holding it (vae/config.json, no config.json of its own),
    else None: ``AutoencoderKL.from_pretrained(folder, subfolder=...)``."""
    folder = Path(folder).expanduser()
    return "vae" if not (folder / "config.json").exists() and (folder / "vae" / "config.json").exists() else None


# a component's weights file, plain or of a variant ("diffusion_pytorch_model.fp16.safetensors", a variant's shard
# "model.fp16-00001-of-00002.safetensors"): diffusers' and transformers' names
_WEIGHTS = re.compile(r"^(?:diffusion_pytorch_model|model|pytorch_model)(?:\.(\w+?))?(?:-\d{5}-of-\d{5})?"
                      r"\.(?:safetensors|bin)$")


def weights_variant(folder: str | os.PathLike) -> str | None:
    """The weights variant (``fp16``...) a diffusers folder must be loaded with (``from_pretrained(variant=...)``):
    the one of a component that has only a variant's files (saved or downloaded with ``variant="fp16"``, as diffusers'
    examples do); None where each component has plain weights."""
    folder = Path(folder)
    subfolders = sorted(e for e in folder.iterdir() if e.is_dir()) if folder.is_dir() else []
    return next((v for v in map(component_variant, subfolders) if v), None)


def component_variant(folder: str | os.PathLike) -> str | None:
    """The variant of a component folder that has only a variant's weights (fp16 first), else None."""
    found = [m.group(1) for f in Path(folder).iterdir() if (m := _WEIGHTS.match(f.name))] \
        if Path(folder).is_dir() else []
    if not found or None in found:
        return None
    return "fp16" if "fp16" in found else sorted(found)[0]


def weight_files(folder: str | os.PathLike, variant: str | None = None) -> list[Path]:
    """A component folder's weight files (.safetensors and .bin, shards included) of ``variant`` (None: the plain
    ones)."""
    folder = Path(folder)
    return sorted(f for f in folder.iterdir() if (m := _WEIGHTS.match(f.name)) and m.group(1) == variant) \
        if folder.is_dir() else []


def pipeline_class(folder: str | os.PathLike) -> str | None:
    """The pipeline class a diffusers folder's model_index.json names (``_class_name``), or None."""
    return (model_index(folder) or {}).get("_class_name")


def windows_path(spec: str) -> bool:
    """A Windows path (``C:\\models\\sd15``, ``\\\\server\\share\\x``, ``models\\sd15``) read on a machine whose paths
    are POSIX ones: a record written by a run on Windows, which names no file here (on Windows: False)."""
    from pathlib import PureWindowsPath

    return os.sep == "/" and (bool(PureWindowsPath(spec).drive) or "\\" in spec)


def looks_like_hub_id(spec: str) -> bool:
    """``owner/name`` as the hub names a repository, not a path (no leading /, . or ~, one slash, no backslash): how
    a value that names no existing file or folder is read (a hub id, or a path that does not exist)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None and not spec.startswith((".", "~"))

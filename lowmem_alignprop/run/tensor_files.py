"""Reading a tensor file: the one rule every reader of a checkpoint, a LoRA or reward weights follows.

* ``.safetensors`` (in any case) is read with safetensors; anything else with ``torch.load(weights_only=True,
  map_location="cpu")``, memory-mapped where the format allows (a zip file, what ``torch.save`` writes since
  PyTorch 1.6; a legacy non-zip file is read whole). No file is ever unpickled with code allowed.
* ``unwrap=True`` takes nested ``{"state_dict": {...}}`` wrappers off (Lightning / original SD checkpoints), as
  often as they nest.
* A file that is there but cannot be read as tensors raises :class:`TensorFileError`: ``holds_code`` tells a file
  that imports a Python object (a class or function: pickled code, refused unread by weights_only) from a damaged
  one (truncated, another format, not a checkpoint at all); ``detail`` is the reader's reason in a few words. An
  unreadable file's :class:`OSError` (missing, permissions, a directory, an I/O error) passes through as it is.
  Callers turn either into their own one-line UserError: which file, which flag, what to do.

Why not diffusers' ``diffusers.models.model_loading_utils.load_state_dict`` (0.42): it reads the same formats with
the same mmap rule (``zipfile.is_zipfile``, taken here), but it turns every failure into one ``OSError`` ("Unable
to load weights from checkpoint file") or ``ValueError``: a file holding code then reads like a damaged one (the
unpickler's "Unsupported global" survives only two exceptions deep in the chained context), and a damaged file
like an unreadable one -- the two distinctions this module exists for. On a failure it also re-opens the file in
text mode and ``read()``s it whole to look for a git-lfs pointer: gigabytes into memory for a damaged multi-GB
checkpoint. And it has no state-dict unwrapping. (It also reads GGUF, which nothing here needs.)
"""

from __future__ import annotations

import contextlib
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lowmem_alignprop.settings.errors import first_line


class TensorFileError(Exception):
    """A tensor file that is there but cannot be read as tensors: ``holds_code`` (it imports a Python object,
    refused unread) or damaged / not a checkpoint. ``detail``: the reader's reason, one short phrase."""

    def __init__(self, path: Path, detail: str, *, holds_code: bool, misnamed: bool = False):
        self.path, self.detail, self.holds_code = Path(path), detail, holds_code
        self.misnamed = misnamed  # a safetensors file under another suffix (a .bin read with torch.load)
        what = "holds pickled code" if holds_code else "is damaged or not a tensor file"
        super().__init__(f"{path} {what} ({detail})")


def is_safetensors(path) -> bool:
    """By its suffix, in any case (a LoRA's reader, which hands the file to diffusers, asks for the lower case)."""
    return Path(path).suffix.lower() == ".safetensors"


def safetensors_inside(path) -> bool:
    """Whether the file begins as a safetensors file does: an 8-byte little-endian header length that fits the file,
    then the JSON header's ``{``. (A renamed download: its suffix says another format.)"""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = Path(path).stat().st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


def unwrap_state_dict(obj: Any) -> Any:
    """``obj`` with its nested ``{"state_dict": {...}}`` wrappers taken off."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return obj


def read_tensor_file(path, *, unwrap: bool = False, mmap: bool = True) -> Any:
    """What a tensor file holds: a dict of tensors for safetensors; for a torch file whatever it pickled from
    tensors, numbers, strings and containers (an optimizer's state: nested dicts). ``unwrap``: nested
    ``state_dict`` wrappers taken off. ``mmap=False`` where the tensors are kept and their file may go (a resumed
    optimizer adopts its state, and pruning removes that checkpoint later). Raises :class:`TensorFileError` or
    ``OSError``."""
    path = Path(path)
    with open(path, "rb"):
        pass  # missing, a directory, permissions: the OSError itself, before any parser sees the file
    if not is_safetensors(path) and safetensors_inside(path):  # (torch.load's words for it: "invalid load key")
        raise TensorFileError(path, f"a safetensors file under the suffix {path.suffix or '(none)'}: rename it to "
                              f"{path.stem}.safetensors", holds_code=False, misnamed=True)
    with _typed_errors(path):
        if is_safetensors(path):
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            import torch

            mappable = mmap and zipfile.is_zipfile(path)  # a legacy (non-zip) file cannot be memory-mapped
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mappable)
    return unwrap_state_dict(obj) if unwrap else obj


def read_safetensors_shapes(path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a ``.safetensors`` file from its header alone (no tensor is read). Raises as
    :func:`read_tensor_file`."""
    path = Path(path)
    with open(path, "rb"):
        pass
    with _typed_errors(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


class TensorsOnDemand(Mapping):
    """A ``.safetensors`` file's tensors by name, each read from the file when asked (its header read once): a check
    of a few of a LoRA's layers does not read its hundreds of MB again. Raises as :func:`read_tensor_file`."""

    def __init__(self, path):
        self.path, self.shapes = Path(path), read_safetensors_shapes(path)

    def __getitem__(self, key: str):
        if key not in self.shapes:
            raise KeyError(key)
        with _typed_errors(self.path):
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as f:
                return f.get_tensor(key)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def tensors_on_demand(path) -> Mapping:
    """A tensor file's tensors by name: a ``.safetensors`` file's read one by one when asked (:class:`TensorsOnDemand`),
    a torch file's as :func:`read_tensor_file` reads it (memory-mapped where it can be)."""
    return TensorsOnDemand(path) if is_safetensors(path) else read_tensor_file(path)


def read_safetensors_metadata(path) -> dict[str, str]:
    """A ``.safetensors`` file's metadata (its header's ``__metadata__``; {} when it has none), no tensor read.
    Raises as :func:`read_tensor_file`."""
    path = Path(path)
    with open(path, "rb"):
        pass
    with _typed_errors(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}


def not_safetensors(path, error: Exception) -> str:
    """The one phrase for a ``.safetensors`` file a reader above could not read (``error``: its
    :class:`TensorFileError` or ``OSError``): ``NAME is damaged or not a safetensors file (the reader's words)``;
    callers put the flag before it and what to do after it."""
    reason = error.__cause__ if isinstance(error, TensorFileError) and error.__cause__ is not None else error
    return f"{Path(path).name} is damaged or not a safetensors file ({first_line(reason, 120)})"


@contextlib.contextmanager
def _typed_errors(path: Path):
    """Any reader failure as a TensorFileError; an OSError as it is."""
    try:
        yield
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - safetensors' and torch's errors are of many types
        code = isinstance(error, pickle.UnpicklingError) and "unsupported global" in str(error).lower()
        raise TensorFileError(path, _reason(error), holds_code=code) from error


def _reason(error: BaseException) -> str:
    """The reader's reason in a few words: torch's weights-only message opens with paragraphs of advice (the reason
    follows them); its zip reader's starts with the reason, then advice."""
    text = str(error)
    found = re.search(r"unsupported global:? (?:GLOBAL )?(\S+)", text, re.IGNORECASE)
    if found:  # "Unsupported global: GLOBAL m.f was not an allowed...", "unsupported GLOBAL posix.system whose..."
        return f"unsupported global {found.group(1)}"[:120]
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if found:  # "Unsupported operand 118"
        return found.group(1).strip()[:120]
    if isinstance(error, EOFError) and not text.strip():
        return "the file ends early"
    return first_line(error, 300).split(". ")[0][:120]

"""Estimates kept on disk, so that asking again costs nothing: a second ``plan`` of the same configuration, a
``plan --fastest`` for another budget (the estimates do not read it), ``--auto-fit`` of a run planned before.

An estimate is a function of the configuration (every field but the budget and the run's bookkeeping:
planner.NOT_ESTIMATED), the target, the prompts, the package's code and the libraries' versions, and the files a
model, VAE, component folder or reward weights path names. The key is a hash of all of them, so a changed file or an
upgraded library is a new key, never a stale answer: the package's files are hashed whole (about 7 MB,
milliseconds), a model's files by name, size and modification time (a hub id: its cached snapshot's commit, of
the pinned revision where --set revision, components_revision or vae_revision names one). Not
kept: a configuration with a reward of the user's own code (it may change between commands without any file we
could watch), or a model path that cannot be told apart (a hub id not in the local cache yet; the next plan finds
it there).

The files are small JSON (the Estimate's fields), written atomically under ``cache_root()/estimates`` (the tiny
model's cache folder: $LOWMEM_ALIGNPROP_CACHE, else $XDG_CACHE_HOME/lowmem_alignprop); the oldest go past
``MAX_FILES``. ``LOWMEM_ALIGNPROP_PLAN_CACHE=off`` (``plan --no-cache``) estimates afresh and writes nothing; the
test suite sets it, and the cache's own tests turn it on.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import time
from importlib import metadata
from pathlib import Path

from lowmem_alignprop.measure.figures import Estimate

CACHE_ENV = "LOWMEM_ALIGNPROP_PLAN_CACHE"  # off: neither read nor write
FORMAT = 1  # the file's layout; a new one makes the old files unreadable (estimated again)
MAX_FILES = 2000  # about 10 KB each
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "safetensors")
PATH_FIELDS = ("model", "model_components", "vae", "reward_weights")  # values the meta models may read files of
MAX_FOLDER_FILES = 500  # a folder with more (a hub cache root given by mistake) is not told apart: not cached

log = logging.getLogger("lowmem_alignprop")


def enabled() -> bool:
    return os.environ.get(CACHE_ENV, "").strip().lower() not in ("off", "0", "false", "no")


def folder() -> Path:
    from lowmem_alignprop.models.tiny import cache_root

    return cache_root() / "estimates"


@functools.lru_cache(maxsize=1)
def code_identity() -> str:
    """A hash of every file of the installed package (code, shipped configs and data) and the libraries'
    versions: what the estimate's method is."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]  # the package's folder
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    for name in LIBRARIES:
        try:
            digest.update(f"{name}={metadata.version(name)}\0".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name}=none\0".encode())
    return digest.hexdigest()


def _file_identity(path: Path) -> list:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _path_identity(value: str, revision: str = "") -> list | None:
    """What the files a path-valued field names are (each part of 'a=PATH;b=PATH' or 'HEAD,CLIP_DIR'): a file's size
    and modification time; a folder's files within two levels; a hub id's cached commit (at ``revision``, --model's
    --set revision: a branch or tag as it points now; "": main). None: cannot be told apart (a hub id not cached, a
    huge folder)."""
    from lowmem_alignprop.settings.hub_access import hub_file

    identity = []
    for part in filter(None, (p.strip() for p in re.split(r"[;,]", value))):
        part = part.split("=", 1)[1] if "=" in part else part
        path = Path(part).expanduser()
        if path.is_file():
            identity.append([part, *_file_identity(path)])
        elif path.is_dir():
            files = [p for p in sorted(path.glob("*")) + sorted(path.glob("*/*")) if p.is_file()]
            if len(files) > MAX_FOLDER_FILES:
                return None
            identity.append([part, [[p.relative_to(path).as_posix(), *_file_identity(p)] for p in files]])
        elif "/" in part:  # a hub id: its snapshot folder is named by the commit
            found = hub_file(part, "model_index.json", revision=revision) or \
                hub_file(part, "config.json", revision=revision)
            if found is None:
                return None
            identity.append([part, found.parent.name])
        else:
            identity.append([part])  # a named model (toy, tiny, sd15, flux...): the package's code says what it is
    return identity


def key(cfg, memo_key: tuple) -> str | None:
    """The file name (a hash) of an estimate of ``cfg``, or None: not to be cached (see the module docstring)."""
    from lowmem_alignprop.rewards import reward_terms
    from lowmem_alignprop.settings.config import HUB_PINS

    if not enabled() or any(kind == "user" for kind, _, _ in reward_terms(cfg.reward)):
        return None
    files = {}
    for name in PATH_FIELDS:
        value = getattr(cfg, name, "")
        if value:
            # a pinned hub id (revision, components_revision, vae_revision): that commit's snapshot, not main's
            files[name] = _path_identity(str(value), getattr(cfg, HUB_PINS[name], "") if name in HUB_PINS else "")
            if files[name] is None:
                return None
    text = json.dumps([FORMAT, code_identity(), repr(memo_key), files], default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def has(name: str | None) -> bool:
    """Whether an estimate is kept under ``name`` (read by :func:`load`)."""
    return name is not None and (folder() / f"{name}.json").is_file()


def load(name: str | None) -> Estimate | None:
    """The cached estimate named ``name``, marked with when it was made (``Estimate.cached``); None when there is
    none, or it cannot be read (then it is removed, and estimated again)."""
    if name is None:
        return None
    path = folder() / f"{name}.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("format") != FORMAT:
            raise ValueError(f"format {saved.get('format')}")
        est = Estimate(**saved["estimate"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.debug("estimate cache: %s unreadable (%s): estimating again", path, e)
        with contextlib.suppress(OSError):  # a read-only cache keeps it; the new estimate is then not written
            path.unlink(missing_ok=True)
        return None
    est.cached = saved.get("created", "")
    return est


def store(name: str | None, est: Estimate) -> None:
    """Keep ``est`` under ``name`` (atomically), unless its fields do not survive JSON as they are (then nothing is
    kept: a reader would get lists for tuples). A cache that cannot be written is only a slower next plan."""
    from lowmem_alignprop.run import atomic

    if name is None:
        return
    fields = est.to_dict()
    fields.pop("cached", None)
    text = json.dumps({"format": FORMAT, "created": time.strftime("%Y-%m-%d %H:%M"), "estimate": fields})
    if json.loads(text)["estimate"] != fields:
        return
    where = folder()
    try:
        where.mkdir(parents=True, exist_ok=True)
        atomic.write_text(where / f"{name}.json", text + "\n")
        _prune(where)
    except OSError as e:
        log.debug("estimate cache: not written (%s)", e)


def _prune(where: Path) -> None:
    """The oldest files beyond MAX_FILES go."""
    files = list(where.glob("*.json"))
    if len(files) <= MAX_FILES:
        return
    by_age = sorted(files, key=lambda p: p.stat().st_mtime_ns)
    for path in by_age[:len(files) - MAX_FILES]:
        path.unlink(missing_ok=True)

"""The local files a run's ``vae`` and ``reward_weights`` settings name, told by their content: kept in each checkpoint,
so that a resume tells a file replaced at the same path (another VAE decodes the images, other weights score them)
from the same file, as it tells an edited reward or prompt file. A hub id is left to its commit (base_fingerprint)."""

from __future__ import annotations

import hashlib
from pathlib import Path

FIELDS = ("vae", "reward_weights")


def _files(path: Path) -> list[Path]:
    """``path`` itself (a file), or the files under it (a folder), in a fixed order."""
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def identity(value: str, known: dict | None = None) -> dict | None:
    """What tells the local file or folder ``value`` names: each file's path (under the folder), size and modification
    time ("stat"), and a digest of their contents ("sha"), read again only where the stat is not ``known``'s (an
    earlier identity of it: a checkpoint's); None for an empty setting, a hub id or a path not there (the load says
    so)."""
    path = Path(value).expanduser() if value else None
    if path is None or not path.exists():
        return None
    files = _files(path)
    stat = [[str(f.relative_to(path)) if f != path else "", f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    if known and known.get("stat") == stat:
        return known
    digest = hashlib.sha256()
    for f, (name, _, _) in zip(files, stat):
        digest.update(name.encode() + b"\0")
        with open(f, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return {"stat": stat, "sha": digest.hexdigest()[:16]}


def identities(cfg, known: dict | None = None) -> dict[str, dict]:
    """:func:`identity` of each of :data:`FIELDS` that names a local file or folder (``known``: a checkpoint's record,
    reused for a file whose stat it matches)."""
    out = {}
    for field in FIELDS:
        value = getattr(cfg, field)
        earlier = (known or {}).get(field) if ((known or {}).get(field) or {}).get("value") == value else None
        if (found := identity(value, earlier)) is not None:
            out[field] = {**found, "value": value}
    return out


def contents(record: dict[str, dict]) -> dict[str, str]:
    """Each field's content digest alone (what images and rewards depend on: not a file's time)."""
    return {field: entry["sha"] for field, entry in record.items()}


def replaced(saved: dict[str, dict], now: dict[str, dict]) -> list[str]:
    """The fields whose setting names the same path as the checkpoint's record ``saved`` and whose content differs
    (a checkpoint from before the record: none)."""
    return [f for f in FIELDS if f in saved and f in now and saved[f].get("value") == now[f]["value"]
            and saved[f].get("sha") != now[f]["sha"]]

"""The local files a run's ``vae`` and ``reward_weights`` settings name, told by their content: kept in each checkpoint,
so that a resume tells a file replaced at the same path (another VAE decodes the images, other weights score them)
from the same file, as it tells an edited reward or prompt file. A hub id is left to its commit (base_fingerprint)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lowmem_alignprop.settings.paths import per_reward_weights, vae_subfolder

FIELDS = ("vae", "reward_weights")


def _files(path: Path) -> list[Path]:
    """``path`` itself (a file), or the files under it (a folder, its linked folders followed: a hub snapshot's, a
    shared models folder's), in a fixed order."""
    if path.is_file():
        return [path]
    found, seen = [], set()
    for root, dirs, names in os.walk(path, followlinks=True):
        if (real := os.path.realpath(root)) in seen:  # (a link back up the tree)
            dirs[:] = []
            continue
        seen.add(real)
        found += [f for f in (Path(root, n) for n in names) if f.is_file()]
    return sorted(found)


def _parts(field: str, value: str) -> list[tuple[str, Path, Path]]:
    """The local paths ``value`` names, each as (its name in the record, the path, the folder or file read): the vae's
    (a pipeline's folder: its vae/ alone, what load_vae reads), the reward_weights' (per reward, 'aesthetic=PATH;
    clip=PATH', and aesthetic's 'HEAD_FILE,CLIP_DIR': each path there, named by itself). One path's name is "", so a
    record of it keeps its form."""
    path = Path(value).expanduser()
    if path.exists():
        return [("", path, path / (vae_subfolder(path) or "") if field == "vae" and path.is_dir() else path)]
    parts = [item.partition("=")[2] if per_reward_weights(item) else item for item in value.split(";")] \
        if field == "reward_weights" else []
    return [(p.strip(), q, q) for part in parts for p in part.split(",")
            if p.strip() and (q := Path(p.strip()).expanduser()).exists()]


def identity(value: str, known: dict | None = None, field: str = "") -> dict | None:
    """What tells the local file or folder ``value`` names (``field``'s setting: :func:`_parts`): each file's path
    (under the folder), size and modification time ("stat"), and a digest of their contents ("sha"), read again only
    where the stat is not ``known``'s (an earlier identity of it: a checkpoint's); None for an empty setting, a hub id
    or a path not there (the load says so)."""
    parts = _parts(field, value) if value else []
    if not parts:
        return None
    files = [(f"{name}/" * bool(name) + str(f.relative_to(path)) if f != path else name, f)
             for name, path, read in parts for f in _files(read)]
    stat = [[name, f.stat().st_size, f.stat().st_mtime_ns] for name, f in files]
    if known and known.get("stat") == stat:
        return known
    digest = hashlib.sha256()
    for name, f in files:
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
        if (found := identity(value, earlier, field)) is not None:
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

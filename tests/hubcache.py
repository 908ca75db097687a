"""A folder as huggingface_hub caches a download of a repository, for offline tests of hub ids."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def cached_snapshot(cache: Path, repo: str, src: Path, change=None, ref: str = "main",
                    repo_type: str = "model") -> Path:
    """``src`` (a folder) as huggingface_hub caches a download of ``repo`` (a ``repo_type`` repository: model,
    dataset) in ``cache``: refs/``ref`` holding the commit (sha1 of the repo, of "repo@ref" for another ref than
    main), blobs/<sha256> and snapshots/<commit>/<file> symlinks to them; ``change(copy)`` edits a copy of the files
    first. Returns the snapshot folder."""
    staged = cache.parent / f"staged-{repo_type}-{repo.replace('/', '--')}{'' if ref == 'main' else '@' + ref}"
    shutil.copytree(src, staged)
    if change:
        change(staged)
    commit = hashlib.sha1((repo if ref == "main" else f"{repo}@{ref}").encode()).hexdigest()
    root = cache / f"{repo_type}s--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    for f in (f for f in sorted(staged.rglob("*")) if f.is_file()):
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        link = root / "snapshots" / commit / f.relative_to(staged)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return root / "snapshots" / commit

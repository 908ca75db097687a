"""Prompt sets on the Hugging Face hub, named as huggingface_hub (and pandas, duckdb) name a dataset's files:
``hf://datasets/OWNER/NAME`` (the dataset repository's one table file: a .csv, .tsv, .json, .jsonl or .parquet
anywhere in it), ``hf://datasets/OWNER/NAME/path/file.csv`` (that file), each at the hub's main or, with ``@REV``
after NAME, at the revision REV (a branch, tag or commit). huggingface_hub's ``parse_hf_uri`` reads the address; the
file comes through ``dataset_info`` (its files, their sizes: a file over :data:`MAX_BYTES` is refused before any
download) and ``hf_hub_download`` into the hub cache; without network (run/hub.offline) from the cache's snapshot, and
a dataset not there is one line with the ``hf download --repo-type dataset`` that brings it. The commit read goes with
it (:class:`HubTable`): prompts.json and each checkpoint record it, and a resume reads that commit again
(:func:`pinned_reads`), whatever the dataset's main holds by then. Its rules and lines are the hub LoRA's
(lora/hub_lora.py; the shared ones in run/hub.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lowmem_alignprop.run.filenames import PROMPTS_FILE
from lowmem_alignprop.run.hub import (PREFIX, PROMPT_FIELDS, address, cached_files, few, offline, refused_by_hub,
                                      snapshot_of)
from lowmem_alignprop.settings.errors import UserError, first_line
from lowmem_alignprop.step.prompt_tables import TABLE_KINDS, TableRead, is_table

log = logging.getLogger("lowmem_alignprop")

MAX_BYTES = 200 * 1000 ** 2  # a prompt file larger than this is no list of prompts (a captions table with images)


@dataclass(frozen=True)
class HubTable:
    """A hub dataset's file of prompts as read: ``repo`` (OWNER/NAME), ``file`` (its path there), ``commit`` (the
    commit it was read at), ``path`` (the file in the local hub cache) and ``spec`` (the address as given)."""
    repo: str
    file: str
    commit: str
    path: Path
    spec: str

    @property
    def address(self) -> str:
        """How lines name the file: ``hf://datasets/OWNER/NAME/FILE``."""
        return address(self.repo, "", self.file)

    def record(self) -> dict[str, str]:
        """What prompts.json and a checkpoint keep of it (``sources``): the address given, and what was read."""
        return {"spec": self.spec, "repo": self.repo, "file": self.file, "commit": self.commit}


def run_sources(run: Path) -> dict[str, dict]:
    """The records of the hub dataset files a run's prompts were read from (its prompts.json ``sources``), else
    none."""
    try:
        sources = json.loads((run / PROMPTS_FILE).read_text(encoding="utf-8")).get("sources")
    except (OSError, ValueError, TypeError, AttributeError):  # (no record, a damaged one)
        return {}
    return sources if isinstance(sources, dict) else {}


def dataset_file(spec: str, how: TableRead) -> tuple[str, str, str] | None:
    """(repo, file, revision) of an ``hf://`` address (file "": the repository's one table; revision "": main); None
    for a value that is no such address. An address of another kind (a model's, a space's) or a malformed one: one
    line."""
    if not spec.startswith(PREFIX):
        return None
    import huggingface_hub

    said = f"{how.option}{spec}"
    parse_hf_uri = getattr(huggingface_hub, "parse_hf_uri", None)
    if parse_hf_uri is None:  # (a huggingface_hub from before its hf:// reader)
        raise UserError(f"{said}: reading a hub address needs a newer huggingface_hub (its parse_hf_uri): pip install "
                        "-U huggingface_hub")
    try:
        uri = parse_hf_uri(spec)
    except ValueError as e:  # (HfUriError)
        raise UserError(f"{said} is not a hub address ({first_line(e, 160)}): a hub dataset's prompts are "
                        "hf://datasets/OWNER/NAME, with @REV after NAME and /FILE after it where wanted") from None
    if uri.type != "dataset":
        raise UserError(f"{said} names a hub {uri.type}, not a dataset: a hub dataset's prompts are "
                        f"hf://datasets/{uri.id}" + (f"/{uri.path_in_repo}" if uri.path_in_repo else ""))
    return uri.id, uri.path_in_repo, uri.revision or ""


_FETCHED: dict[tuple[str, str, str, str], HubTable] = {}  # one request a process for each file (online)
_PINS: dict[str, dict] = {}  # address given -> the record of the commit a resume reads it at (pinned_reads)


@contextlib.contextmanager
def pinned_reads(sources: dict[str, dict]) -> Iterator[None]:
    """While in it, each address of ``sources`` (a checkpoint's records: the address given -> ``repo``, ``file``,
    ``commit``) is read at that commit, that file: a resume reads what its run started on."""
    _PINS.clear()
    _PINS.update(sources)
    try:
        yield
    finally:
        _PINS.clear()


def hub_table(spec: str, how: TableRead) -> HubTable | None:
    """The hub dataset file ``spec`` names, in the local hub cache (fetched where the hub can be reached), or None
    where ``spec`` is no ``hf://`` address. Raises UserError, one line."""
    from huggingface_hub import constants

    spec = spec.strip()
    named = dataset_file(spec, how)
    if named is None:
        return None
    repo, file, revision = named
    pin = _PINS.get(spec)
    if pin and pin.get("repo") == repo and pin.get("commit") and pin.get("file"):
        file, revision = pin["file"], pin["commit"]
    if offline():  # (the cache's refs read each time: cheap, and a branch moved since is seen)
        return _from_cache(repo, file, revision, spec, how)
    key = (repo, file, revision, str(constants.HF_HUB_CACHE))
    if key not in _FETCHED or not _FETCHED[key].path.is_file():
        _FETCHED[key] = _download(repo, file, revision, spec, how)
    return dataclasses.replace(_FETCHED[key], spec=spec)


def choose_table(repo: str, revision: str, files: list[str], spec: str, how: TableRead) -> str:
    """The one table file (.csv, .tsv, .json, .jsonl, .parquet) of a dataset repository of ``files``; none or several:
    one line naming a few and how to name one."""
    tables = sorted(f for f in files if is_table(Path(f)))
    if len(tables) == 1:
        return tables[0]
    said = f"{how.option}{spec}: the hub dataset {repo}"
    if tables:
        raise UserError(f"{said} holds {len(tables)} table files ({few(tables)}): name the one you mean, e.g. "
                        f"{how.option}{address(repo, revision, tables[0])}")
    raise UserError(f"{said} holds no table file ({', '.join(TABLE_KINDS)}; its files: {few(files) or 'none'}): name "
                    f"a file of prompts, {how.option}{address(repo, revision, 'FILE')}")


def _download(repo: str, file: str, revision: str, spec: str, how: TableRead) -> HubTable:
    import huggingface_hub

    at = {"revision": revision} if revision else {}
    said = f"{how.option}{spec}"
    try:
        info = huggingface_hub.dataset_info(repo, files_metadata=True, **at)
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        chosen = file or choose_table(repo, revision, list(sizes), spec, how)
        if chosen not in sizes:
            tables = sorted(f for f in sizes if is_table(Path(f)))
            raise UserError(f"{said}: the hub dataset {repo} has no file {chosen}"
                            + (f"; its table files: {few(tables)}" if tables else ", nor any table file"))
        if (sizes[chosen] or 0) > MAX_BYTES:  # (before any of it downloads)
            raise UserError(f"{said}: {chosen} is {sizes[chosen] / 1000 ** 2:,.0f} MB, more than the "
                            f"{MAX_BYTES // 1000 ** 2} MB a prompt set may be (a table of images, or of much more "
                            "than prompts): name a smaller file of it, or save its prompt column to a local table")
        path = Path(huggingface_hub.hf_hub_download(repo, chosen, repo_type="dataset", **at))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - huggingface_hub's: a refusal, a failed request
        raise UserError(refused_by_hub(e, said, repo, revision, "dataset", "its file of prompts")
                        or f"{said}: could not read the hub dataset {repo} ({first_line(e, 200)}): check the "
                           "address, or pass a local copy of its file") from None
    return HubTable(repo, chosen, snapshot_of(path, chosen).name, path, spec)


def _from_cache(repo: str, file: str, revision: str, spec: str, how: TableRead) -> HubTable:
    """Without network: the file from the cache's snapshot of ``revision`` ("": main)."""
    cached = cached_files(repo, revision, "dataset")
    snapshot, files = cached if cached is not None else (None, [])
    if snapshot is not None:
        chosen = file or choose_table(repo, revision, files, spec, how)
        if (snapshot / chosen).is_file():
            return HubTable(repo, chosen, snapshot.name, snapshot / chosen, spec)
    command = " ".join(["hf download --repo-type dataset", repo, *([file] if file else []),
                        *(["--revision", revision] if revision else [])])
    hint = (f"on a machine with network run `{command}` (into the hub cache; copy that cache here), then run again")
    at, said = f" at revision {revision}" if revision else "", f"{how.option}{spec}"
    if snapshot is not None:  # the dataset is cached, without the file named (a typo, or a file never fetched)
        tables = [f for f in files if is_table(Path(f))]
        raise UserError(f"{said}: the local hub cache holds the dataset {repo}{at} without {file} ("
                        + (f"its table files: {few(tables)}" if tables else "no table file") + ") and the hub cannot "
                        f"be reached (no network, or HF_HUB_OFFLINE set): name one of those, or {hint}")
    raise UserError(f"{said}: the hub dataset {repo}{at} is not in the local hub cache and the hub cannot be reached "
                    f"(no network, or HF_HUB_OFFLINE set): {hint}")


def read_sources(cfg) -> dict[str, dict]:
    """What prompts.json and each checkpoint record of the hub dataset files ``cfg``'s prompts (and its held-out
    prompts, where it evaluates) were read from: ``{field: HubTable.record()}`` (a built-in set or a local file:
    none). Asked after they were read: the files are fetched already."""
    found = {field: read_source(getattr(cfg, field), field) for field in (
        PROMPT_FIELDS if cfg.eval_every else PROMPT_FIELDS[:1])}
    return {field: record for field, record in found.items() if record is not None}


def read_source(spec: str, field: str = "prompts") -> dict[str, str] | None:
    """:meth:`HubTable.record` of the hub dataset file ``spec`` (``field``'s value) names, None for another prompt
    set."""
    table = hub_table(spec, TableRead(prefix=field.removesuffix("prompts"))) if spec else None
    return None if table is None else table.record()


def resumed_pins(state: dict | None, cfg) -> dict[str, dict]:
    """The records (:func:`read_sources`) of a checkpoint's ``state`` whose address ``cfg`` gives again: a resume
    reads them at the commit its run read (:func:`pinned_reads`), said once; another address is another prompt
    set."""
    from lowmem_alignprop.run.runlock import global_rank

    recorded = (state or {}).get("prompt_sources")
    pins = {}
    for field, record in (recorded.items() if isinstance(recorded, dict) else ()):
        if isinstance(record, dict) and field in PROMPT_FIELDS and record.get("spec") == getattr(cfg, field, None):
            pins[record["spec"]] = record
            revision = (dataset_file(record["spec"], TableRead()) or ("", "", ""))[2]  # (a commit named: unsaid)
            if global_rank() == 0 and not (revision and str(record.get("commit", "")).startswith(revision)):
                log.info("resume: %s %s is read at commit %s, as the run read it (@REV after its name reads another "
                         "revision: a change of the prompts)", field, record["spec"], record.get("commit"))
    return pins

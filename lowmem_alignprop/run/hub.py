"""Hub ids without network: asked once, before the first download a hub id would need.

Without network huggingface_hub retries every file for about 25 s before giving up; a model plus a reward model
made a user wait close to a minute for a one-line error. settings/hub_access's probe (one TCP connection) decides
instead: when it fails, :func:`offline` switches huggingface_hub to offline mode, so diffusers and transformers
read the local cache only and their errors come at once.

``--push-to-hub`` (export and training): ``check_push_to_hub`` says before anything is exported (or trained) whether
a repository can be pushed to from here, ``push_to_hub`` uploads the export's folder (its base_model.json and
merged.json as lora_export.hub_copies shares them: local paths by name, as the model card names them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lowmem_alignprop.settings.errors import UserError, first_line, quote
from lowmem_alignprop.settings.hub_access import offline_by_setting, unreachable

log = logging.getLogger("lowmem_alignprop")

PREFIX = "hf://"  # a hub dataset's address: hf://datasets/OWNER/NAME[@REV][/FILE] (step/hub_prompts reads it)
PROMPT_FIELDS = ("prompts", "eval_prompts")  # the settings that name a prompt set


def address(repo: str, revision: str = "", file: str = "") -> str:
    return f"{PREFIX}datasets/{repo}" + (f"@{revision}" if revision else "") + (f"/{file}" if file else "")


def recorded_address(record: Any) -> str | None:
    """The address of the commit and file a record (step/hub_prompts' ``HubTable.record``) names,
    ``hf://datasets/OWNER/NAME@COMMIT/FILE`` (the address given reads the dataset's main now); None for a damaged
    record."""
    keys = ("spec", "repo", "file", "commit")
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) and record[k] for k in keys):
        return None
    return address(record["repo"], record["commit"], record["file"])


def with_pinned_prompts(config: dict, sources: Any) -> dict:
    """A run's ``config`` with each prompt set (prompts, eval_prompts) read from a hub dataset (``sources``: its
    records) named at the commit and file the run read: read again, it is what the run trained on."""
    pinned = {field: at for field, record in (sources.items() if isinstance(sources, dict) else ())
              if field in PROMPT_FIELDS and (at := recorded_address(record)) is not None
              and config.get(field) == record["spec"]}
    return {**config, **pinned}



def download_hint(repo: str, then: str) -> str:
    """How to get a hub id onto a machine without network (the end of every 'not in the cache' message)."""
    return f"on a machine with network run `hf download {repo} --local-dir DIR`, then {then}"


def hub_message(what: str, repo: str, error: Exception, use: str = "pass that DIR", revision: str = "") -> str:
    """One line for a hub id that did not load: offline (the usual case here) or not a repository; ``revision``: the
    one asked for (its download goes to the hub cache, where --set revision finds it)."""
    text = str(error)
    offline = any(s in text for s in ("outgoing traffic has been disabled", "not fully cached", "Name or service",
                                      "Connection", "does not appear to have a file named", "offline"))
    if offline and revision:
        return (f"{what} {repo!r} at revision {revision} could not be fetched (no network, or HF_HUB_OFFLINE set) "
                f"nor found in the local Hugging Face cache: on a machine with network run `hf download {repo} "
                f"--revision {revision}` (into the hub cache; copy that cache here), then run again")
    if offline:
        return (f"{what} {repo!r} is a Hugging Face hub id, and it could not be fetched (no network, or HF_HUB_OFFLINE "
                f"set) nor found in the local cache: {download_hint(repo, use)}")
    return (f"could not load {what} {repo!r} from the Hugging Face hub: {first_line(error, 200)}; check the hub id, "
            "or pass a local directory")


SHOWN = 4  # the files a line lists at most


def few(names: list[str], shown: int = SHOWN) -> str:
    """The first ``shown`` of ``names`` and how many more, for a line: 'a, b, c, d and 3 more'."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def hub_page(repo: str, repo_type: str = "model") -> str:
    """A hub repository's page: https://huggingface.co/OWNER/NAME (a dataset's: .../datasets/OWNER/NAME)."""
    return f"https://huggingface.co/{'' if repo_type == 'model' else repo_type + 's/'}{repo}"


def refused_by_hub(error: Exception, said: str, repo: str, revision: str = "", repo_type: str = "model",
                   copy: str = "the LoRA") -> str | None:
    """The line for the hub's refusal of a request about ``repo`` (``said``: how the line starts, the option and the
    value given): no such revision, a gated repository (``copy``: what a local copy would be of), no such repository
    (or a private one); None for another error. A model's id may be a local path mistyped: its line says both."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    noun, page = "repository" if repo_type == "model" else repo_type, hub_page(repo, repo_type)
    if isinstance(error, RevisionNotFoundError):
        return (f"{said}: the hub {noun} {repo} has no revision {revision} (no such branch, tag or commit): check it "
                f"on {page}/commits/main, or leave @{revision} out to read main")
    if isinstance(error, GatedRepoError):  # (a RepositoryNotFoundError too)
        return (f"{said}: the Hugging Face hub {noun} {repo} is gated: accept its conditions on {page}, then log in "
                f"here with that account (`hf auth login`, or set HF_TOKEN); or pass a local copy of {copy}")
    if isinstance(error, RepositoryNotFoundError):  # (the hub answers a private one so, without its owner's token)
        where = "no such file or folder here, nor a repository" if repo_type == "model" else f"no {noun}"
        return (f"{said}: {where} {repo} on the Hugging Face hub (or a private one this machine is not logged in to: "
                "`hf auth login`): " + ("check the path, or the hub id" if repo_type == "model" else
                                        f"check its name on {page}"))
    return None


def cached_files(repo: str, revision: str = "", repo_type: str = "model") -> tuple[Path, list[str]] | None:
    """The local hub cache's snapshot of ``repo`` at ``revision`` ("": main; a commit, or a branch or tag the cache
    recorded: what ``hf download [--revision REV]`` put there) and the paths of its files; None where it holds
    none."""
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(repo, repo_type=repo_type, revision=revision or None,
                                          local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError), or no valid id: either is not here
        return None
    return snapshot, sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def snapshot_of(path: Path, file: str) -> Path:
    """The hub cache's snapshot folder (named by its commit) that holds ``file`` (its path in the repository) at
    ``path``."""
    from pathlib import PurePosixPath

    return path.parents[len(PurePosixPath(file).parts) - 1]


def offline() -> bool:
    """True when hub ids can only come from the local cache: offline by setting, or the endpoint is unreachable
    (huggingface_hub is then put in offline mode for the rest of the process, and the reason logged once)."""
    if offline_by_setting():
        return True
    reason = unreachable()
    if reason is None:
        return False
    from huggingface_hub import constants

    from lowmem_alignprop.run.runlock import global_rank

    constants.HF_HUB_OFFLINE = True  # diffusers and transformers read it per call: cache only, no retries
    if global_rank() == 0:  # once per run, not once per process
        log.warning("no network to the Hugging Face hub: %s; hub ids load from the local cache only", reason)
    return True


def check_push_to_hub(repo: str) -> None:
    """Can ``repo`` be pushed to from here? Offline, without a token or with a malformed id: one UserError.
    Cheap (no request but one TCP connect), so it runs before anything is exported (or trained)."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise UserError(f"--push-to-hub {quote(repo)} is not a hub repository id: write owner/name, e.g. "
                        "you/my-alignprop-lora") from None
    if "/" not in repo:
        raise UserError(f"--push-to-hub {quote(repo)}: write the repository as owner/name (your user or "
                        "organisation name first)")
    if offline_by_setting():
        raise UserError(f"--push-to-hub {repo}: the Hugging Face hub is switched off here (HF_HUB_OFFLINE or "
                        "TRANSFORMERS_OFFLINE is set): unset it, or run without --push-to-hub and upload the "
                        "folder later with `hf upload`")
    if not get_token():
        raise UserError(f"--push-to-hub {repo}: no Hugging Face token on this machine: run `hf auth login` (or set "
                        "HF_TOKEN) first, or run without --push-to-hub")
    reason = unreachable()
    if reason:
        raise UserError(f"--push-to-hub {repo}: no network to the Hugging Face hub ({reason}): run without "
                        "--push-to-hub and upload the folder later with `hf upload`")


def upload_operations(folder: Path, rewritten: dict[str, bytes] | None = None) -> list:
    """The commit that uploads ``folder``: its files, those named in ``rewritten`` (a path in the folder) with that
    content instead (the copies shared on the hub: lora/lora_export.hub_copies)."""
    from huggingface_hub import CommitOperationAdd

    rewritten = rewritten or {}
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return [CommitOperationAdd(path_in_repo=f, path_or_fileobj=rewritten.get(f, folder / f)) for f in files]


def push_to_hub(folder: Path, repo: str, private: bool = False, rewritten: dict[str, bytes] | None = None) -> str:
    """Create ``repo`` (if new) and upload ``folder`` to it in one commit (:func:`upload_operations`: ``rewritten``'s
    files with their shared content); returns the repository's URL."""
    from huggingface_hub import create_commit, create_repo

    try:
        url = create_repo(repo, repo_type="model", private=private, exist_ok=True)
        create_commit(repo_id=repo, operations=upload_operations(folder, rewritten), repo_type="model",
                      commit_message="Upload AlignProp export (lowmem-alignprop)")
    except Exception as e:  # huggingface_hub's HTTP, auth and network errors
        raise UserError(f"--push-to-hub {repo} failed ({first_line(e, 160)}); the export is complete in {folder}: "
                        "upload it later with `hf upload`") from None
    return str(url)

"""A LoRA named by its Hugging Face hub id (``--init-lora`` and ``sample --lora``): ``owner/name`` (the repository's
one LoRA weights file: diffusers' ``pytorch_lora_weights.safetensors`` where it holds one, else its only
``.safetensors`` at the root) or ``owner/name/path/file.safetensors`` (that file), each at the hub's main or, as
``owner/name@REV`` / ``owner/name@REV/path/file.safetensors``, at the revision REV (a branch, tag or commit). A path
that exists wins, as for --model (settings/paths.looks_like_hub_id). The file comes through huggingface_hub into the
hub cache (``list_repo_files``, ``hf_hub_download``, at that revision); without network (run/hub.offline) from the
cache's snapshot of it (a commit, or a branch or tag the cache recorded), and a LoRA not there is one line with the
``hf download`` that brings it, before any model loads. The commit it resolved to goes with it (:class:`HubLora`):
the run's init_lora/source.json and sample_results.json record it. Our export's base_model.json and a peft adapter's
adapter_config.json beside the file come with it (the model check, the adapter's alpha).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lowmem_alignprop.lora.lora_files import PEFT_CONFIG_NAME, PEFT_WEIGHT_NAME, is_peft_folder, not_a_lora
from lowmem_alignprop.run.filenames import LORA_BASE_FILE, LORA_WEIGHT_NAME
from lowmem_alignprop.run.hub import few, snapshot_of
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.model_kind import SINGLE_FILE_SUFFIXES
from lowmem_alignprop.settings.paths import looks_like_hub_id, windows_path

# owner/name/path/in/it.safetensors: one file of a repository
_HUB_FILE = re.compile(r"([\w.-]+/[\w.-]+)/((?:[\w.-]+/)*[\w.-]+\.safetensors)")
# owner/name@REV[/path/file.safetensors]: at a revision (a branch, tag or commit), as other tools name one
_AT_REVISION = re.compile(r"([\w.-]+/[\w.-]+)@([\w.-]+)(?:/((?:[\w.-]+/)*[\w.-]+\.safetensors))?")
MODEL_INDEX = "model_index.json"  # (a diffusers pipeline's, at its repository's root)


@dataclass(frozen=True)
class HubLora:
    """A hub LoRA as fetched: ``repo`` (owner/name), ``file`` (its path in the repository), ``commit`` (the commit it
    was read at: the revision's when fetched, the cache's snapshot of it offline), ``path`` (the file in the local
    hub cache) and ``shown`` (the hub id as the user gave it: what lines name it by)."""
    repo: str
    file: str
    commit: str
    path: Path
    shown: str = ""

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}"

    @property
    def pinned(self) -> str:
        """The id that reads it again at the commit it was read at: ``owner/name@COMMIT/FILE``."""
        return f"{self.repo}@{self.commit}/{self.file}"

    @property
    def peft(self) -> bool:
        """Whether it is a peft adapter's weights with its adapter_config.json beside them (its alpha, DoRA...): read as
        that folder."""
        return self.path.name == PEFT_WEIGHT_NAME and is_peft_folder(self.path.parent)

    @property
    def snapshot(self) -> Path:
        """The cache's snapshot folder (named by the commit) that holds it."""
        return snapshot_of(self.path, self.file)


def hub_lora_id(spec: str) -> tuple[str, str, str] | None:
    """(repo, file, revision) where ``spec`` names a LoRA on the hub and no local path: ``owner/name`` (file "": the
    repository's one, :func:`choose_file`) or ``owner/name/path/file.safetensors``, each with ``@REV`` after the name
    or not (revision "": main); None for anything else."""
    spec = spec.strip()
    if not spec or spec.startswith((".", "~", "/")) or windows_path(spec) or Path(spec).expanduser().exists():
        return None
    return split_hub_id(spec)


def weighted_hub_id(spec: str) -> tuple[str, str] | None:
    """(id, weight) where ``spec`` is a hub LoRA id with sample's ``:WEIGHT`` after it (``owner/name:0.8``), given
    where no weight is taken (--init-lora, export); None for anything else, a path that exists included."""
    where, _, weight = spec.strip().rpartition(":")
    if where and re.fullmatch(r"[-+]?[0-9.]+(e[-+]?[0-9]+)?", weight) and hub_lora_id(where) is not None:
        return where, weight
    return None


def split_hub_id(spec: str) -> tuple[str, str, str] | None:
    """(repo, file, revision) of a hub LoRA id by its form alone (:func:`hub_lora_id` without the paths here: a
    record's), None for another form."""
    spec = spec.strip()
    if (pinned := _AT_REVISION.fullmatch(spec)) is not None:
        return pinned.group(1), pinned.group(3) or "", pinned.group(2)
    if looks_like_hub_id(spec):  # (owner/x.safetensors: a relative file mistyped, not a repository named so)
        return None if spec.lower().endswith(SINGLE_FILE_SUFFIXES) else (spec, "", "")
    found = _HUB_FILE.fullmatch(spec)
    return (found.group(1), found.group(2), "") if found else None


def at_commit(spec: str, commit: str) -> str | None:
    """Hub LoRA id ``spec`` at ``commit`` (``owner/name@COMMIT[/file.safetensors]``: what loads that commit again,
    the file chosen as from ``spec``), None where ``spec`` is no hub id's form."""
    named = split_hub_id(spec)
    return None if named is None else f"{named[0]}@{commit}" + (f"/{named[1]}" if named[1] else "")


def choose_file(repo: str, files: list[str], what: str, spec: str) -> str:
    """The LoRA file of a repository of ``files`` (paths in it): diffusers' pytorch_lora_weights.safetensors at its
    root, else its only .safetensors there. None or several (none of them diffusers' name): UserError naming a few
    and how to name one; a diffusers model's repository (its model_index.json): UserError saying so."""
    root = sorted(f for f in files if "/" not in f and f.endswith(".safetensors"))
    if LORA_WEIGHT_NAME not in root and MODEL_INDEX in files:  # (its weights, or a checkpoint at its root: gigabytes)
        raise UserError(f"{what} {spec}: the hub repository {repo} is a diffusers model (its {MODEL_INDEX}), not a "
                        f"LoRA: pass it with --model, and a LoRA (its repository, or OWNER/NAME/FILE.safetensors) "
                        f"with {what}")
    if LORA_WEIGHT_NAME in root or len(root) == 1:
        return LORA_WEIGHT_NAME if LORA_WEIGHT_NAME in root else root[0]
    if root:
        raise UserError(f"{what} {spec}: the hub repository {repo} holds {len(root)} .safetensors files at its root "
                        f"and none is diffusers' {LORA_WEIGHT_NAME} ({few(root)}): name the one you mean, e.g. "
                        f"{what} {repo}/{root[0]}")
    deeper = sorted(f for f in files if f.endswith(".safetensors"))
    if deeper:
        raise UserError(f"{what} {spec}: the hub repository {repo} holds no .safetensors file at its root, "
                        f"{len(deeper)} below it ({few(deeper)}): name the one you mean, e.g. {what} "
                        f"{repo}/{deeper[0]}")
    raise UserError(f"{what} {spec}: the hub repository {repo} holds no .safetensors file: pass a LoRA in "
                    "safetensors (diffusers, kohya or peft layout)")


_FETCHED: dict[tuple[str, str, str, str], HubLora] = {}  # one request a process for each LoRA (its checks read it
# often)


def fetch_hub_lora(repo: str, file: str, revision: str, what: str, spec: str, takes: str = "") -> HubLora:
    """The hub LoRA ``repo`` (``file``: the one named, "": :func:`choose_file`'s) at ``revision`` ("": main) in the
    local hub cache, fetched when the hub can be reached; ``what``/``spec``: the option and the value given, for
    messages (``takes``: what the option takes, for a header's refusal: lora_files.not_a_lora's). Raises UserError."""
    from huggingface_hub import constants

    from lowmem_alignprop.run.hub import offline

    key = (repo, file, revision, str(constants.HF_HUB_CACHE))
    if key in _FETCHED and _FETCHED[key].path.is_file():
        return _FETCHED[key]
    if offline():
        found = _from_cache(repo, file, revision, what, spec)
    else:
        found = _download(repo, file, revision, what, spec, takes)
    _FETCHED[key] = found
    return found


def _download(repo: str, file: str, revision: str, what: str, spec: str, takes: str = "") -> HubLora:
    import huggingface_hub

    from lowmem_alignprop.run.hub import hub_message, refused_by_hub

    at = {"revision": revision} if revision else {}
    try:
        files = huggingface_hub.list_repo_files(repo, **at)
        chosen = file or choose_file(repo, files, what, spec)
        if chosen not in files:
            listed = sorted(f for f in files if f.endswith(".safetensors"))
            raise UserError(f"{what} {spec}: the hub repository {repo} has no file {chosen}"
                            + (f"; its .safetensors files: {few(listed)}" if listed else ", nor any .safetensors "
                               "file"))
        # the file's header first: a full checkpoint named as a LoRA is refused before gigabytes download
        if refusal := _header_refusal(repo, chosen, at, what, spec, takes):
            raise UserError(refusal)
        path = Path(huggingface_hub.hf_hub_download(repo, chosen, **at))
        for record in (_beside(chosen, name) for name in (LORA_BASE_FILE, PEFT_CONFIG_NAME)):  # our export's
            if record in files:  # record of its base model (sample checks the model against it), a peft adapter's
                huggingface_hub.hf_hub_download(repo, record, **at)  # config (its alpha)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - huggingface_hub's: a refusal, a failed request
        raise UserError(refused_by_hub(e, f"{what} {spec}", repo, revision)
                        or hub_message(what, spec, e, use=f"pass that DIR to {what}")) from None
    return HubLora(repo, chosen, snapshot_of(path, chosen).name, path, spec.strip())


def _header_refusal(repo: str, file: str, at: dict, what: str, spec: str, takes: str = "") -> str | None:
    """lora_files.not_a_lora's line for a hub .safetensors file whose header (read alone: a few KB of what may be a
    checkpoint of many GB) names a full model's or an embedding's tensors; None for a LoRA's, another kind of file,
    or a header that cannot be read (the download and the local checks then decide)."""
    import huggingface_hub

    if not file.endswith(".safetensors"):
        return None
    try:
        header = huggingface_hub.parse_safetensors_file_metadata(repo, file, **at)
        shapes = {name: tuple(info.shape) for name, info in header.tensors.items()}
    except Exception:  # noqa: BLE001 - no header read here (an old hub, a failed request): not a verdict
        return None
    return not_a_lora(what, spec, keys=shapes, takes=takes)


def _from_cache(repo: str, file: str, revision: str, what: str, spec: str) -> HubLora:
    """Without network: the LoRA from the cache's snapshot of ``revision`` ("": main; a commit, or a branch or tag
    the cache recorded: what ``hf download [--revision REV]`` put there)."""
    from lowmem_alignprop.run.hub import cached_files, download_hint

    cached = cached_files(repo, revision)
    snapshot, files = cached if cached is not None else (None, [])
    if snapshot is not None:
        chosen = file or choose_file(repo, files, what, spec)
        if (snapshot / chosen).is_file():
            return HubLora(repo, chosen, snapshot.name, snapshot / chosen, spec.strip())
    hint = download_hint(" ".join([repo, *([file] if file else []), *(["--revision", revision] if revision else [])]),
                         f"pass DIR/{file}" if file else f"pass that DIR to {what}")
    at = f" at revision {revision}" if revision else ""
    if snapshot is not None:  # the repository is cached, without the file named (a typo, or a part never fetched)
        held = [f for f in files if f.endswith(".safetensors")]
        listed = f"its .safetensors files: {few(held)}" if held else "no .safetensors file"
        raise UserError(f"{what} {spec}: no such file or folder here, and the local hub cache holds {repo}{at} "
                        f"without {file} ({listed}) while the hub cannot be reached (no network, or HF_HUB_OFFLINE "
                        f"set): name one of those, or {hint}")
    raise UserError(f"{what} {spec}: no such file or folder here, and as a Hugging Face hub id{at} it is not in the "
                    f"local hub cache and the hub cannot be reached (no network, or HF_HUB_OFFLINE set): {hint}")


def _beside(file: str, name: str) -> str:
    parent = PurePosixPath(file).parent
    return name if str(parent) == "." else f"{parent}/{name}"


def hub_lora(spec: str, what: str, takes: str = "") -> HubLora | None:
    """``spec``'s hub LoRA (:func:`hub_lora_id`, :func:`fetch_hub_lora`), or None where it names no hub id."""
    named = hub_lora_id(spec)
    return None if named is None else fetch_hub_lora(*named, what, spec, takes)

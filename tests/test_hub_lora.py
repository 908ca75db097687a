"""--init-lora and sample --lora of a LoRA on the Hugging Face hub (``owner/name``, ``owner/name/file.safetensors``):
read from a hub cache built here (offline: conftest sets HF_HUB_OFFLINE), or fetched through fakes of
huggingface_hub's requests (no test touches the network)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import socket

import pytest
import torch
import yaml

from hubcache import cached_snapshot
from loras import cpu_cfg, export, sampled, trainer_at_step_0
from outputs_doc import DOC, documented_keys, undocumented
from refusals import assert_refused
from test_hub import _no_dns

from lowmem_alignprop.cli import main
from lowmem_alignprop.lora import hub_lora
from lowmem_alignprop.settings.errors import UserError

REPO = "someone/style-lora"
FAST = ["--profile", "cpu", "--set", "sample_prompts=0", "--set", "sample_steps=2", "--set", "k=1",
        "--set", "batch_size=1", "--set", "fidelity_images=0"]
FEW = ["--set", "sample_steps=4"]  # sample's denoising steps (the same for the LoRA and the file it is compared with)

pytestmark = pytest.mark.usefixtures("fresh_log_handlers", "no_header_request")


@pytest.fixture
def no_header_request(monkeypatch):
    """huggingface_hub's read of a hub file's safetensors header, which an online fetch asks before its download,
    answered as a failed request (no test touches the network); a test that reads headers sets its own."""
    import huggingface_hub

    def failed(*a, **k):
        raise OSError("no request leaves a test")
    monkeypatch.setattr(huggingface_hub, "parse_safetensors_file_metadata", failed)


def _commit(repo: str) -> str:
    return hashlib.sha1(repo.encode()).hexdigest()  # (hubcache.cached_snapshot's)


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_dir):
    """A LoRA of the tiny model (rank 4, alpha 8) saved as a run saves it: lora/ with its base_model.json."""
    from loras import make_sd_lora

    return make_sd_lora(tiny_dir, tmp_path_factory.mktemp("lora-run"), xl=False)


def _into_snapshot(cache, repo: str, commit: str, filename: str, source) -> str:
    """What a fake hf_hub_download returns: ``source`` copied to ``filename`` in ``repo``'s snapshot of ``commit`` in
    the hub ``cache``, as huggingface_hub lays a download out."""
    target = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    return str(target)


def _repo(cache, tmp_path, repo: str, names: list[str]):
    """``repo`` cached with files ``names`` (a few bytes each: the choice reads no file)."""
    src = tmp_path / f"src-{repo.replace('/', '--')}"
    for name in names:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(b"{}")
    return cached_snapshot(cache, repo, src)


def test_the_repositorys_lora_file_is_diffusers_name_else_its_only_one_else_the_one_named(hub_cache, tmp_path):
    snap = _repo(hub_cache, tmp_path, "o/diffusers", ["pytorch_lora_weights.safetensors", "a.safetensors", "README.md"])
    found = hub_lora.hub_lora("o/diffusers", "--init-lora")
    assert (found.file, found.commit, found.path) == ("pytorch_lora_weights.safetensors", _commit("o/diffusers"),
                                                      snap / "pytorch_lora_weights.safetensors")
    assert found.snapshot == snap and found.url == "https://huggingface.co/o/diffusers"
    _repo(hub_cache, tmp_path, "o/one", ["my_style.safetensors", "README.md", "sub/other.safetensors"])
    assert hub_lora.hub_lora("o/one", "--init-lora").file == "my_style.safetensors"
    _repo(hub_cache, tmp_path, "o/several", [f"{c}.safetensors" for c in "edcba"] + ["sub/deep.safetensors"])
    with pytest.raises(UserError) as e:
        hub_lora.hub_lora("o/several", "--init-lora")
    assert str(e.value) == ("--init-lora o/several: the hub repository o/several holds 5 .safetensors files at its "
                            "root and none is diffusers' pytorch_lora_weights.safetensors (a.safetensors, "
                            "b.safetensors, c.safetensors, d.safetensors and 1 more): name the one you mean, e.g. "
                            "--init-lora o/several/a.safetensors")
    for named in ("c.safetensors", "sub/deep.safetensors"):
        found = hub_lora.hub_lora(f"o/several/{named}", "--lora")
        assert found.file == named and found.path.read_bytes() == b"{}" and found.snapshot.name == _commit("o/several")
    _repo(hub_cache, tmp_path, "o/nested", ["loras/v1.safetensors", "loras/v2.safetensors"])
    with pytest.raises(UserError) as e:
        hub_lora.hub_lora("o/nested", "--lora")
    assert str(e.value) == ("--lora o/nested: the hub repository o/nested holds no .safetensors file at its root, 2 "
                            "below it (loras/v1.safetensors, loras/v2.safetensors): name the one you mean, e.g. --lora "
                            "o/nested/loras/v1.safetensors")


@pytest.mark.parametrize("root", [[], ["v1-5-pruned.safetensors"], ["a.safetensors", "b.safetensors"]])
def test_a_model_repository_named_as_a_lora_says_it_is_a_model(hub_cache, tmp_path, root):
    """owner/name of a diffusers model (model_index.json; its weights in unet/, vae/..., a single-file checkpoint or
    two at the root): one line saying it is a model for --model (it said to name one of its files, e.g. its
    text_encoder/model.safetensors, or chose its checkpoint, gigabytes, as the LoRA)."""
    _repo(hub_cache, tmp_path, "o/model", ["model_index.json", "unet/diffusion_pytorch_model.safetensors",
                                           "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                                           *root])
    with pytest.raises(UserError) as e:
        hub_lora.hub_lora("o/model", "--init-lora")
    assert str(e.value) == ("--init-lora o/model: the hub repository o/model is a diffusers model (its "
                            "model_index.json), not a LoRA: pass it with --model, and a LoRA (its repository, or "
                            "OWNER/NAME/FILE.safetensors) with --init-lora")
    assert hub_lora.hub_lora("o/model/unet/diffusion_pytorch_model.safetensors", "--lora").file == \
        "unet/diffusion_pytorch_model.safetensors"  # (a file named is read: its check says what it holds)


def test_what_is_read_as_a_hub_id_a_path_that_exists_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_lora.hub_lora_id("o/name") == ("o/name", "", "")
    assert hub_lora.hub_lora_id("o/name/sub/x.safetensors") == ("o/name", "sub/x.safetensors", "")
    (tmp_path / "o" / "name").mkdir(parents=True)
    for local in ("o/name", "./a/b", "/abs/x", "~/x/y", "o/name/lora", "o/name/x.bin", "C:\\x\\y.safetensors"):
        assert hub_lora.hub_lora_id(local) is None, local


@pytest.mark.parametrize("typo", ["runs/x.safetensors", "lora/pytorch_lora_weights.safetensors", "runs/lora.bin"])
def test_a_mistyped_relative_file_is_a_missing_path_not_a_hub_repository(tmp_path, monkeypatch, capsys, typo):
    """owner/file.safetensors (one slash, a weights file's suffix) is a relative file that is not there: a hub id of a
    repository is owner/name, and its file owner/name/file.safetensors; the line says the path does not exist (it
    named a repository 'runs/x.safetensors' and an `hf download` of it)."""
    monkeypatch.chdir(tmp_path)
    assert hub_lora.hub_lora_id(typo) is None
    out = tmp_path / "run"
    assert_refused(main, ["sample", "--lora", f"{typo}:0.5", "--output-dir", str(out)],
                   f"--lora {typo}:0.5: {typo} does not exist; pass the lora/ folder a training run wrote (e.g. "
                   "outputs/run/lora), optionally with a weight: DIR:0.5", out, capsys)
    assert_refused(main, [*FAST, "--steps", "1", "--init-lora", typo, "--output-dir", str(out)],
                   f"--init-lora {typo}: no such file or folder: pass a LoRA (a run's lora/ folder, a checkpoint, a "
                   ".safetensors file or a peft adapter folder)", out, capsys)


def test_a_weight_after_a_hub_id_is_said_where_no_weight_is_taken(tmp_path, monkeypatch, capsys):
    """sample's --lora owner/name:0.8 given to --init-lora or export: 'no such file or folder: pass a LoRA (a run's
    lora/ folder, ...)' (export: 'no such folder'), as if the id were a local path; a local folder with a weight
    already said export takes none. Both now say so of a hub id, before anything is fetched."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert_refused(main, [*FAST, "--steps", "1", "--init-lora", "someone/my-lora:0.5", "--output-dir", str(out)],
                   "--init-lora someone/my-lora:0.5: --init-lora takes no weight after the LoRA (sample's "
                   "--lora LORA:WEIGHT): it starts from the LoRA as it is; pass --init-lora someone/my-lora", out,
                   capsys)
    assert_refused(main, ["export", "--lora", "someone/my-lora@v2:0.5", "--out", str(out)],
                   "--lora someone/my-lora@v2:0.5: export takes no weight after the LoRA (sample's DIR:WEIGHT); for "
                   "a model with the LoRA merged at that weight: --lora someone/my-lora@v2 --merge --weight 0.5", out,
                   capsys)


def _at(cache, tmp_path, repo: str, ref: str, files: dict[str, bytes]):
    """``repo`` cached at ``ref`` (refs/REF; its snapshot named by the commit _commit(f"{repo}@{ref}")) with
    ``files``."""
    src = tmp_path / f"src-{repo.replace('/', '--')}@{ref}"
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    return cached_snapshot(cache, repo, src, ref=ref)


def test_a_hub_id_at_a_revision_reads_that_revisions_snapshot(hub_cache, tmp_path, monkeypatch):
    """owner/name@REV and owner/name@REV/path/file.safetensors (a tag, a branch or a commit; other tools' way to pin
    one): offline, the cache's snapshot of that revision, and the commit it resolved to (it was refused: a hub LoRA
    was read at main only)."""
    from lowmem_alignprop.lora.init_lora import init_lora_source

    monkeypatch.chdir(tmp_path)
    assert hub_lora.hub_lora_id("o/style@v2") == ("o/style", "", "v2")
    assert hub_lora.hub_lora_id("o/style@0123abc/sub/x.safetensors") == ("o/style", "sub/x.safetensors", "0123abc")
    assert hub_lora.hub_lora_id("o/style@v2/x.bin") is None
    _at(hub_cache, tmp_path, "o/style", "main", {"pytorch_lora_weights.safetensors": b"main"})
    v2 = _at(hub_cache, tmp_path, "o/style", "v2", {"pytorch_lora_weights.safetensors": b"v2",
                                                    "sub/x.safetensors": b"v2 x"})
    assert v2.name == _commit("o/style@v2") != _commit("o/style")
    main_lora, tagged = hub_lora.hub_lora("o/style", "--lora"), hub_lora.hub_lora("o/style@v2", "--lora")
    assert (main_lora.commit, main_lora.path.read_bytes()) == (_commit("o/style"), b"main")
    assert (tagged.repo, tagged.file, tagged.commit, tagged.path) == (
        "o/style", "pytorch_lora_weights.safetensors", v2.name, v2 / "pytorch_lora_weights.safetensors")
    by_commit = hub_lora.hub_lora(f"o/style@{v2.name}/sub/x.safetensors", "--init-lora")
    assert (by_commit.file, by_commit.commit, by_commit.path.read_bytes()) == ("sub/x.safetensors", v2.name, b"v2 x")
    assert init_lora_source("o/style@v2") == {"file": "pytorch_lora_weights.safetensors", "revision": v2.name,
                                              "sha256": hashlib.sha256(b"v2").hexdigest()}
    (tmp_path / "o" / "style@v2").mkdir(parents=True)  # (a path that exists wins)
    assert hub_lora.hub_lora_id("o/style@v2") is None


@pytest.mark.parametrize("spec, line", [
    ("o/style@v9", "{what} o/style@v9: no such file or folder here, and as a Hugging Face hub id at revision v9 it is "
     "not in the local hub cache and the hub cannot be reached (no network, or HF_HUB_OFFLINE set): on a machine with "
     "network run `hf download o/style --revision v9 --local-dir DIR`, then pass that DIR to {what}"),
    ("o/style@0123abc/sub/x.safetensors", "{what} o/style@0123abc/sub/x.safetensors: no such file or folder here, "
     "and as a Hugging Face hub id at revision 0123abc it is not in the local hub cache and the hub cannot be reached "
     "(no network, or HF_HUB_OFFLINE set): on a machine with network run `hf download o/style sub/x.safetensors "
     "--revision 0123abc --local-dir DIR`, then pass DIR/sub/x.safetensors")])
def test_a_revision_the_cache_does_not_hold_is_one_line_with_its_download(hub_cache, tmp_path, monkeypatch, capsys,
                                                                         spec, line):
    """Offline, a revision of a cached repository that the cache has no snapshot of (main is there): one line naming
    the revision and the download of it."""
    monkeypatch.chdir(tmp_path)
    _repo(hub_cache, tmp_path, "o/style", ["pytorch_lora_weights.safetensors", "sub/x.safetensors"])
    out = tmp_path / "run"
    assert_refused(main, ["sample", "--lora", f"{spec}:0.5", "--output-dir", str(out)],
                   line.format(what="--lora"), out, capsys)
    assert_refused(main, [*FAST, "--steps", "1", "--init-lora", spec, "--output-dir", str(out)],
                   line.format(what="--init-lora"), out, capsys)


def test_offline_a_file_the_cached_repository_lacks_is_one_line_listing_what_it_holds(hub_cache, tmp_path):
    """Offline, owner/name/FILE of a repository the cache holds without FILE (a typo): the line says the repository is
    cached and lists its files, not that it is not cached."""
    _repo(hub_cache, tmp_path, "o/style", ["pytorch_lora_weights.safetensors", "sub/x.safetensors", "README.md"])
    with pytest.raises(UserError) as e:
        hub_lora.hub_lora("o/style/nope.safetensors", "--lora")
    assert str(e.value) == (
        "--lora o/style/nope.safetensors: no such file or folder here, and the local hub cache holds o/style without "
        "nope.safetensors (its .safetensors files: pytorch_lora_weights.safetensors, sub/x.safetensors) while the hub "
        "cannot be reached (no network, or HF_HUB_OFFLINE set): name one of those, or on a machine with network run "
        "`hf download o/style nope.safetensors --local-dir DIR`, then pass DIR/nope.safetensors")


def test_several_lora_files_for_init_lora_is_one_line_before_any_model_loads(hub_cache, tmp_path, capsys,
                                                                           monkeypatch):
    from lowmem_alignprop.training import train_setup

    monkeypatch.setattr(train_setup, "load_components", lambda *a, **k: pytest.fail("the model was loaded"))
    _repo(hub_cache, tmp_path, "o/two", ["x.safetensors", "y.safetensors"])
    out = tmp_path / "run"
    assert_refused(main, [*FAST, "--steps", "1", "--init-lora", "o/two", "--output-dir", str(out)],
                   "--init-lora o/two: the hub repository o/two holds 2 .safetensors files at its root and none is "
                   "diffusers' pytorch_lora_weights.safetensors (x.safetensors, y.safetensors): name the one you "
                   "mean, e.g. --init-lora o/two/x.safetensors", out, capsys)


def test_a_hub_lora_not_cached_without_network_is_one_line_with_the_download_and_touches_nothing(
        online_by_setting, hub_cache, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import file_download

    from lowmem_alignprop.commands import sample_pipeline
    from lowmem_alignprop.training import train_setup

    monkeypatch.setattr(socket, "create_connection", _no_dns(online_by_setting))
    for module, name in ((huggingface_hub, "list_repo_files"), (huggingface_hub, "hf_hub_download"),
                         (file_download, "get_hf_file_metadata")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("a request went to the hub"))
    monkeypatch.setattr(train_setup, "load_components", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(sample_pipeline, "build_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "run"
    assert_refused(main, [*FAST, "--steps", "1", "--init-lora", "someone/not-here", "--output-dir", str(out)],
                   "--init-lora someone/not-here: no such file or folder here, and as a Hugging Face hub id it is not "
                   "in the local hub cache and the hub cannot be reached (no network, or HF_HUB_OFFLINE set): on a "
                   "machine with network run `hf download someone/not-here --local-dir DIR`, then pass that DIR to "
                   "--init-lora", out, capsys)
    assert_refused(main, ["sample", "--lora", "someone/not-here/v2/x.safetensors:0.5", "--output-dir", str(out)],
                   "--lora someone/not-here/v2/x.safetensors: no such file or folder here, and as a Hugging Face hub "
                   "id it is not in the local hub cache and the hub cannot be reached (no network, or HF_HUB_OFFLINE "
                   "set): on a machine with network run `hf download someone/not-here v2/x.safetensors --local-dir "
                   "DIR`, then pass DIR/v2/x.safetensors", out, capsys)
    assert len(online_by_setting) == 1  # one probe, no request


def test_online_the_file_is_downloaded_into_the_hub_cache_with_the_record_beside_it(online_by_setting, hub_cache,
                                                                                  made, monkeypatch):
    """With network: the repository listed, its LoRA file (and our export's base_model.json beside it) downloaded
    into the hub cache at main's commit, which the LoRA carries."""
    import huggingface_hub

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: contextlib.nullcontext())
    commit, asked = "c" * 40, []

    def download(repo, filename, **kw):
        asked.append((repo, filename))
        return _into_snapshot(hub_cache, repo, commit, filename, made["lora"] / filename)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, **kw: [
        ".gitattributes", "README.md", "base_model.json", "pytorch_lora_weights.safetensors", "x/other.safetensors"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    found = hub_lora.hub_lora("online/lora", "--init-lora")
    assert (found.file, found.commit) == ("pytorch_lora_weights.safetensors", commit)
    assert asked == [("online/lora", "pytorch_lora_weights.safetensors"), ("online/lora", "base_model.json")]
    assert found.path.read_bytes() == (made["lora"] / "pytorch_lora_weights.safetensors").read_bytes()
    assert hub_lora.hub_lora("online/lora", "--init-lora") == found and len(asked) == 2  # asked once a process
    with pytest.raises(UserError) as e:
        hub_lora.hub_lora("online/lora/x/missing.safetensors", "--lora")
    assert str(e.value) == ("--lora online/lora/x/missing.safetensors: the hub repository online/lora has no file "
                            "x/missing.safetensors; its .safetensors files: pytorch_lora_weights.safetensors, "
                            "x/other.safetensors")

    def not_there(repo, **kw):
        raise RuntimeError(f"404 Client Error. Repository Not Found for url: https://huggingface.co/api/models/{repo}")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", not_there)
    with pytest.raises(UserError) as e:
        hub_lora.hub_lora("online/typo", "--init-lora")
    assert str(e.value) == ("could not load --init-lora 'online/typo' from the Hugging Face hub: 404 Client Error. "
                            "Repository Not Found for url: https://huggingface.co/api/models/online/typo; check the "
                            "hub id, or pass a local directory")


def test_online_a_revision_is_listed_and_downloaded_at_it_and_one_the_hub_lacks_is_one_line(
        online_by_setting, hub_cache, made, monkeypatch):
    """With network, owner/name@REV: the repository listed and its files downloaded at REV (hf_hub_download puts them
    in the snapshot of the commit REV resolved to, which the LoRA carries); a revision the hub does not have is one
    line naming it (huggingface_hub's RevisionNotFoundError)."""
    import huggingface_hub

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: contextlib.nullcontext())
    commit, asked = "d" * 40, []

    def download(repo, filename, revision=None, **kw):
        asked.append((repo, filename, revision))
        return _into_snapshot(hub_cache, repo, commit, filename, made["lora"] / filename)

    def listed(repo, revision=None, **kw):
        asked.append((repo, "", revision))
        if revision == "v9":
            raise _hub_error("RevisionNotFoundError", repo)
        return ["base_model.json", "pytorch_lora_weights.safetensors"]
    monkeypatch.setattr(huggingface_hub, "list_repo_files", listed)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    found = hub_lora.hub_lora("online/pinned@v2", "--lora")
    assert (found.file, found.commit, found.shown) == ("pytorch_lora_weights.safetensors", commit, "online/pinned@v2")
    assert asked == [("online/pinned", "", "v2"), ("online/pinned", "pytorch_lora_weights.safetensors", "v2"),
                     ("online/pinned", "base_model.json", "v2")]
    with pytest.raises(UserError) as e:
        hub_lora.hub_lora("online/pinned@v9", "--init-lora")
    assert str(e.value) == ("--init-lora online/pinned@v9: the hub repository online/pinned has no revision v9 (no "
                            "such branch, tag or commit): check it on https://huggingface.co/online/pinned/commits/"
                            "main, or leave @v9 out to read main")


def test_online_a_full_models_file_is_refused_from_its_header_before_its_download(online_by_setting, hub_cache,
                                                                                  made, monkeypatch):
    """Online, the chosen file's safetensors header (a few KB) is read before the file: a checkpoint's weights (the
    only .safetensors at a repository's root: gigabytes) are refused with the local check's line, nothing downloaded;
    a LoRA's header, or one that cannot be read, downloads as before."""
    import huggingface_hub
    from safetensors import safe_open

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: contextlib.nullcontext())
    lora_file = made["lora"] / "pytorch_lora_weights.safetensors"
    with safe_open(str(lora_file), "pt") as f:
        lora_header = {k: f.get_slice(k).get_shape() for k in f.keys()}
    headers = {"full/model": {"conv_in.weight": [320, 4, 3, 3], "conv_in.bias": [320]}, "good/lora": lora_header}
    asked: list[str] = []

    def header(repo, filename, **kw):
        if repo not in headers:
            raise OSError("the request failed")
        return type("Header", (), {"tensors": {k: type("Info", (), {"shape": v}) for k, v in headers[repo].items()}})

    def download(repo, filename, **kw):
        asked.append(repo)
        return _into_snapshot(hub_cache, repo, ("e" * 40), filename, lora_file)
    monkeypatch.setattr(huggingface_hub, "parse_safetensors_file_metadata", header)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, **kw: ["model.safetensors"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(UserError) as e:
        hub_lora.hub_lora("full/model", "--init-lora")
    assert str(e.value) == ("--init-lora full/model holds a model's own weights (e.g. 'conv_in.bias'), not a LoRA's "
                            "lora_down / lora_A: a full (or merged) model goes to --model; --init-lora starts from a "
                            "LoRA (a run's lora/ folder, or a diffusers, kohya or peft LoRA file)")
    assert asked == []  # nothing downloaded
    assert hub_lora.hub_lora("good/lora", "--lora").file == "model.safetensors"
    assert hub_lora.hub_lora("no/header", "--lora").file == "model.safetensors"
    assert asked == ["good/lora", "no/header"]


def _hub_error(kind: str, repo: str):
    """huggingface_hub's error for a request about ``repo`` answered 401/404 (``kind``: RepositoryNotFoundError for a
    repository not there, or private and no token; GatedRepoError for a gated one; RevisionNotFoundError for a
    revision not there), as hf_raise_for_status makes it."""
    import httpx2
    from huggingface_hub import errors

    url = f"https://huggingface.co/api/models/{repo}/tree/main"
    response = httpx2.Response(401 if kind == "GatedRepoError" else 404, request=httpx2.Request("GET", url))
    text = {"GatedRepoError": "Cannot access gated repo for url",
            "RevisionNotFoundError": "Revision Not Found for url:"}.get(kind, "Repository Not Found for url:")
    return getattr(errors, kind)(f"{response.status_code} Client Error. (Request ID: Root=1-abc)\n\n{text} {url}.",
                                 response=response)


@pytest.mark.parametrize("kind, line", [
    ("RepositoryNotFoundError", "--lora runs/x: no such file or folder here, nor a repository runs/x on the Hugging "
     "Face hub (or a private one this machine is not logged in to: `hf auth login`): check the path, or the hub id"),
    ("GatedRepoError", "--lora runs/x: the Hugging Face hub repository runs/x is gated: accept its conditions on "
     "https://huggingface.co/runs/x, then log in here with that account (`hf auth login`, or set HF_TOKEN); or pass a "
     "local copy of the LoRA")])
def test_online_a_missing_path_that_is_no_repository_or_a_gated_one_is_one_line_that_says_so(
        online_by_setting, hub_cache, tmp_path, monkeypatch, capsys, kind, line):
    """Online, a relative path mistyped (runs/x: a hub id's form) that the hub has no repository of still says the
    path does not exist (it was huggingface_hub's first line: '404 Client Error. (Request ID: ...)'); a gated
    repository says how to get in."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: contextlib.nullcontext())

    def refused(repo, **kw):
        raise _hub_error(kind, repo)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", refused)
    out = tmp_path / "sampled"
    assert_refused(main, ["sample", "--lora", "runs/x:0.5", "--output-dir", str(out)], line, out, capsys)


def _file_deltas(file) -> dict[str, torch.Tensor]:
    """module path -> alpha / rank * B @ A of a diffusers LoRA file of the UNet (alpha 8, rank 4: made's)."""
    from safetensors.torch import load_file

    weights = load_file(str(file))  # (diffusers' names: ...to_q.lora.down.weight, ...to_q.lora.up.weight)
    return {k.removeprefix("unet.").removesuffix(".lora.down.weight"): 2.0 * weights[k.replace(".down.", ".up.")]
            @ weights[k] for k in weights if k.endswith(".lora.down.weight")}


def test_a_run_starts_from_a_hub_lora_records_its_commit_and_resumes_without_the_cache(made, hub_cache, tmp_path,
                                                                                       caplog):
    """--init-lora owner/name: step 0's LoRA is the file's (each layer's delta), the run keeps the file as read in
    init_lora/ and records the id's commit (source.json, the card's "started from" row, the start line); a resume with
    the hub cache gone (and no network) starts from that copy."""
    from lowmem_alignprop.run import checkpoint as ckpt

    snapshot = cached_snapshot(hub_cache, REPO, made["lora"])
    file = snapshot / "pytorch_lora_weights.safetensors"
    trainer = trainer_at_step_0(cpu_cfg(tmp_path / "unused", "--set", f"init_lora={REPO}", "--seed", "5"), ["a cat"])
    theirs = _file_deltas(file)
    ours = {n: m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
            for n, m in trainer.unet.named_modules() if "default" in getattr(m, "lora_A", {})}
    assert sorted(ours) == sorted(theirs) and len(ours) == len(made["modules"])
    assert max(((ours[n] - theirs[n]).abs().max() / theirs[n].abs().max()).item() for n in ours) < 1e-6
    del trainer

    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    assert main([*FAST, "--steps", "1", "--init-lora", REPO, "--output-dir", str(out)]) == 0
    assert f"starting from the LoRA {REPO} at commit {_commit(REPO)} (" in caplog.text
    assert (out / "init_lora" / "pytorch_lora_weights.safetensors").read_bytes() == file.read_bytes()
    source = json.loads((out / "init_lora" / "source.json").read_text())
    assert source == {"file": "pytorch_lora_weights.safetensors", "sha256": ckpt.file_sha256(file),
                      "revision": _commit(REPO)}
    assert undocumented(source, documented_keys(DOC.read_text(encoding="utf-8"))["init_lora/source.json"]) == []
    assert yaml.safe_load((out / "config.yaml").read_text())["init_lora"] == REPO  # (the id as given)
    shutil.rmtree(hub_cache)
    assert main(["--output-dir", str(out), "--steps", "2", "--resume", "latest"]) == 0
    assert json.loads((out / "init_lora" / "source.json").read_text()) == source
    assert main(["export", str(out / "lora"), "--format", "diffusers", "--out", str(tmp_path / "export")]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    row = next(line for line in card.splitlines() if "started from" in line)
    assert (f"the LoRA [`{REPO}`](https://huggingface.co/{REPO}) at commit {_commit(REPO)}, sha256 "
            f"{source['sha256']} (of its pytorch_lora_weights.safetensors)") in row, row
    # the training command as it reads again the LoRA the run started from (the id alone: main, which moves)
    [started] = [line for line in card.splitlines() if "--init-lora" in line]
    assert f" --init-lora {REPO}@{_commit(REPO)} " in f"{started} ", started


@pytest.mark.parametrize("line, pinned", [
    ("lowmem-alignprop --init-lora o/x --steps 5", "lowmem-alignprop --init-lora o/x@{c} --steps 5"),
    ("lowmem-alignprop --init-lora=o/x/sub/y.safetensors", "lowmem-alignprop --init-lora=o/x@{c}/sub/y.safetensors"),
    ("lowmem-alignprop --set init_lora=o/x@v2 --steps 5", "lowmem-alignprop --set init_lora=o/x@{c} --steps 5"),
    ("lowmem-alignprop --set=init_lora=o/x@main/y.safetensors",
     "lowmem-alignprop --set=init_lora=o/x@{c}/y.safetensors"),
    ("lowmem-alignprop --init-lora o/x@{c}", None), ("lowmem-alignprop --init-lora o/x@{short}", None),
    ("lowmem-alignprop --init-lora /abs/lora --set init_lora=./here", None),
    ("lowmem-alignprop --output-dir o/x --resume latest --init-lora o/x", None)])
def test_the_cards_command_names_the_commit_a_hub_init_lora_was_read_at(line, pinned):
    """The card's training command: a hub id --init-lora (or --set init_lora) without a commit (main, a branch or a
    tag: they move) names the commit init_lora/source.json recorded, as --set revision= pins --model; one that names
    it already, a path, a --resume line stay as recorded."""
    from lowmem_alignprop.lora.model_card import pinned_init_lora

    commit = _commit("o/x")
    line = line.format(c=commit, short=commit[:8])
    assert pinned_init_lora(line, commit) == (line if pinned is None else pinned.format(c=commit))
    assert pinned_init_lora(line, None) == line


def test_a_run_without_its_command_record_and_the_started_from_row_of_an_id_at_a_revision(tmp_path):
    """A run without command.txt: the command written from its config names the commit too; the "started from" row
    of --init-lora owner/name@REV links the repository's page (it linked https://huggingface.co/o/x@v2)."""
    from types import SimpleNamespace

    from lowmem_alignprop.lora.model_card import started_from, training_command

    commit, sha = _commit("o/x@v2"), "a" * 64
    (tmp_path / "init_lora").mkdir()
    (tmp_path / "init_lora" / "source.json").write_text(json.dumps({"file": "y.safetensors", "sha256": sha,
                                                                    "revision": commit}))
    lora = SimpleNamespace(run=tmp_path, starts=None, base=None, base_model="tiny", model_components="",
                           run_config={"profile": "cpu", "model": "tiny", "init_lora": "o/x@v2/y.safetensors"})
    assert f"--set init_lora=o/x@{commit}/y.safetensors" in training_command(lora)
    row = started_from({"init_lora": "o/x@v2", "init_lora_source": {"file": "y.safetensors", "sha256": sha,
                                                                    "revision": commit}})
    assert row.startswith(f"the LoRA [`o/x@v2`](https://huggingface.co/o/x) at commit {commit}, sha256 {sha} "), row


def test_sample_of_a_hub_lora_renders_what_its_file_renders_and_records_the_id(made, hub_cache, tmp_path,
                                                                               monkeypatch):
    snapshot = cached_snapshot(hub_cache, REPO, made["lora"])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    seed, base, by_id = sampled(tmp_path / "a", monkeypatch, REPO, *FEW)
    seed_2, base_2, by_path = sampled(tmp_path / "b", monkeypatch, snapshot / "pytorch_lora_weights.safetensors", *FEW)
    assert seed == seed_2 and torch.equal(base, base_2) and torch.equal(by_id, by_path)
    assert (by_id - base).abs().max() > 0.01  # (the LoRA shows)
    [lora] = json.loads((tmp_path / "a" / "sampled" / "sample_results.json").read_text())["loras"]
    assert lora == {"path": REPO, "weight": 1.0, "adapter_name": "lora0", "weights": "pytorch_lora_weights.safetensors",
                    "revision": _commit(REPO)}
    assert undocumented({"loras": [lora]}, documented_keys(DOC.read_text(encoding="utf-8"))["sample_results.json"]) \
        == []
    # a peft adapter (export --format peft) on the hub: read with its adapter_config.json (its alpha 8, not the
    # rank's 4: half the LoRA's update), as the folder is
    peft = export(tmp_path, made["lora"], "--format", "peft")
    cached_snapshot(hub_cache, "someone/style-peft", peft)
    (tmp_path / "c").mkdir()
    assert sampled(tmp_path / "c", monkeypatch, "someone/style-peft", *FEW)[2].sub(by_path).abs().max() < 1e-3


def test_sample_of_a_hub_lora_at_a_revision_with_a_weight_renders_that_revisions_file(made, hub_cache, tmp_path,
                                                                                       monkeypatch):
    """sample --lora owner/name@REV:0.5: the weight parsed, the LoRA of that revision's snapshot rendered (main's is
    another file), its commit recorded."""
    from safetensors.torch import load_file, save_file

    def halved(copy):
        file = copy / "pytorch_lora_weights.safetensors"
        save_file({k: v * 0.5 for k, v in load_file(str(file)).items()}, str(file))
    cached_snapshot(hub_cache, REPO, made["lora"], change=halved)
    v2 = cached_snapshot(hub_cache, REPO, made["lora"], ref="v2")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    seed, base, by_id = sampled(tmp_path / "a", monkeypatch, f"{REPO}@v2:0.5", *FEW)
    seed_2, base_2, by_path = sampled(tmp_path / "b", monkeypatch, f"{v2 / 'pytorch_lora_weights.safetensors'}:0.5",
                                         *FEW)
    assert seed == seed_2 and torch.equal(base, base_2) and torch.equal(by_id, by_path)
    assert (by_id - base).abs().max() > 0.005  # (the LoRA shows: main's, at half its update, renders otherwise)
    [lora] = json.loads((tmp_path / "a" / "sampled" / "sample_results.json").read_text())["loras"]
    assert lora == {"path": REPO, "weight": 0.5, "adapter_name": "lora0", "weights": "pytorch_lora_weights.safetensors",
                    "revision": _commit(f"{REPO}@v2")}


def test_sample_lines_name_a_hub_lora_by_its_id_not_its_hub_cache_path(made, hub_cache, tmp_path, caplog):
    """sample's lines on the model a LoRA was trained on, and on one LoRA given twice, name a hub LoRA as the user
    gave it (owner/name, @REV and a file where named), not as its file in the hub cache (they named
    .../hub/models--someone--style-lora/snapshots/<commit>)."""
    import argparse

    from lowmem_alignprop.commands.sample_cmd import take_run_settings

    cached_snapshot(hub_cache, REPO, made["lora"])
    cached_snapshot(hub_cache, REPO, made["lora"], ref="v2")
    model = json.loads((made["lora"] / "base_model.json").read_text())["model"]
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")

    def said(model_given: str | None, *loras: str) -> list[str]:
        caplog.clear()
        take_run_settings(argparse.Namespace(lora=list(loras), set=[], model=model_given, reward=None, prompts=None,
                                             recipe=None, output_dir="out"), [])
        lines = [r.getMessage() for r in caplog.records]
        assert not any(str(hub_cache) in line for line in lines), lines
        return lines
    assert said(None, f"{REPO}@v2")[0].startswith(f"--model not given: sampling {model}, the model {REPO}@v2 was "
                                                  "trained on (--model to choose another); as its run did: ")
    lines = said(str(tmp_path), REPO, f"{REPO}/pytorch_lora_weights.safetensors:0.5")
    assert lines[0] == (f"--lora {REPO} and --lora {REPO}/pytorch_lora_weights.safetensors:0.5 are the same LoRA: "
                        f"their weights add up (as --lora {REPO}:1.5)")
    assert lines[1].startswith(f"--model {tmp_path} is not the model {REPO} was trained on ({model}): "), lines


def test_a_flux_lora_from_the_hub_on_a_unet_model_is_refused_in_one_line(hub_cache, tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    from lowmem_alignprop.commands import sample_pipeline

    monkeypatch.setattr(sample_pipeline, "build_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    src = tmp_path / "flux-src"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({f"transformer.single_transformer_blocks.0.attn.to_{p}.lora_{ab}.weight":
               torch.randn(*((4, 32) if ab == "A" else (32, 4)), generator=g) for p in "qkv" for ab in "AB"},
              str(src / "flux_style.safetensors"))
    cached_snapshot(hub_cache, "o/flux-style", src)
    out = tmp_path / "sampled"
    assert_refused(main, ["sample", "--model", "tiny", "--lora", "o/flux-style:0.8", "--output-dir", str(out)],
                   "--lora o/flux-style:0.8 adapts a FLUX.1 transformer, but --model tiny is a UNet model (SD 1.x/2.x/"
                   "SDXL): pass the model it was trained on with --model", out, capsys)


@pytest.mark.parametrize("command, relative", [
    ("--init-lora owner/name", False), ("--set init_lora=owner/name/v2/x.safetensors", False),
    ("--init-lora here/lora", True), ("--set init_lora=owner/name/lora", True)])
def test_a_recorded_init_lora_hub_id_is_no_relative_path(tmp_path, command, relative):
    """The card's commands: a hub id --init-lora needs no folder to run from (a folder of that name in the start's
    folder, or a path that is no hub id's form, does)."""
    from lowmem_alignprop.lora.model_card import has_relative_path

    (tmp_path / "here" / "lora").mkdir(parents=True)
    assert has_relative_path(f"lowmem-alignprop {command}", tmp_path) is relative


def _cache_files(cache) -> dict[str, str]:
    """Every entry of the hub cache (links by their target, files by their bytes' digest): a write into it shows."""
    return {str(p.relative_to(cache)): (f"-> {p.readlink()}" if p.is_symlink() else
                                        hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(cache.rglob("*"))}


def test_export_of_a_hub_lora_is_the_export_of_its_file_naming_the_id_and_commit_and_leaves_the_cache_alone(
        made, hub_cache, tmp_path, monkeypatch, caplog):
    """export --lora owner/name --format kohya: the tensors of the export of its file by path; the file and card named
    by the repository, the card's row and command and base_model.json's hub_lora naming the id and the commit read;
    nothing written into the hub cache (without --out: export/NAME/kohya in the working folder)."""

    from safetensors.torch import load_file

    snapshot = cached_snapshot(hub_cache, REPO, made["lora"])
    before = _cache_files(hub_cache)
    commit = _commit(REPO)
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    assert main(["export", "--lora", REPO, "--format", "kohya", "--out", str(tmp_path / "a")]) == 0
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"exported {REPO} (kohya) to {tmp_path / 'a'}: README.md, base_model.json, "
                    "style-lora_alignprop_lora.safetensors"]
    assert main(["export", "--lora", str(snapshot / "pytorch_lora_weights.safetensors"), "--format", "kohya",
                 "--out", str(tmp_path / "b")]) == 0
    [by_id], [by_path] = (sorted((tmp_path / x).glob("*.safetensors")) for x in "ab")
    assert by_id.name == "style-lora_alignprop_lora.safetensors"
    ours, theirs = load_file(str(by_id)), load_file(str(by_path))
    assert sorted(ours) == sorted(theirs) and len(ours) > 10 and all(torch.equal(ours[k], theirs[k]) for k in ours)
    card = (tmp_path / "a" / "README.md").read_text(encoding="utf-8")
    assert "\n# style-lora: AlignProp fine-tune\n" in card
    assert (f"| exported from | the Hugging Face hub LoRA [`{REPO}`](https://huggingface.co/{REPO}) at commit {commit} "
            "(its pytorch_lora_weights.safetensors) |") in card
    assert f"\nlowmem-alignprop export --lora {REPO}@{commit} --format kohya --out {tmp_path / 'a'}\n" in card
    assert str(hub_cache) not in card
    record = json.loads((tmp_path / "a" / "base_model.json").read_text())
    assert record["hub_lora"] == {"repo": REPO, "file": "pytorch_lora_weights.safetensors", "revision": commit}
    assert undocumented(record, documented_keys(DOC.read_text(encoding="utf-8"))["lora/base_model.json"]) == []
    monkeypatch.chdir(tmp_path)
    assert main(["export", REPO, "--format", "kohya"]) == 0  # (the positional LoRA, no --out)
    assert sorted(p.name for p in (tmp_path / "export" / "style-lora" / "kohya").iterdir()) == [
        "README.md", "base_model.json", "style-lora_alignprop_lora.safetensors"]
    # --merge: merged_loras.json names the LoRA by its id at the commit read, not its file in the hub cache
    assert main(["export", "--lora", REPO, "--merge", "--out", str(tmp_path / "merged")]) == 0
    [merged] = json.loads((tmp_path / "merged" / "merged_loras.json").read_text())
    assert merged["lora"] == f"{REPO}@{commit}/pytorch_lora_weights.safetensors"
    assert _cache_files(hub_cache) == before


def test_export_of_a_hub_lora_refused_as_its_file_is_and_not_cached_offline_is_one_line_naming_the_id(
        made, hub_cache, tmp_path, capsys):
    """A hub LoRA export refuses as it refuses the file by path (a kohya file: "a LoRA file already"), its line naming
    the id, not its path in the hub cache; one not in the cache without network: the line with its hf download."""
    kohya = tmp_path / "kohya"
    kohya.mkdir()
    shutil.copy(made["lora"] / "pytorch_lora_weights.safetensors", kohya / "style.safetensors")
    cached_snapshot(hub_cache, "someone/kohya-style", kohya)
    out = tmp_path / "out"
    assert_refused(main, ["export", "--lora", "someone/kohya-style", "--format", "kohya", "--out", str(out)],
                   "error: --lora someone/kohya-style is a LoRA file already: export converts the LoRA a run wrote "
                   "(its lora/ folder or a checkpoint); use this one as it is", out, capsys)
    assert_refused(main, ["export", "--lora", "someone/not-here", "--format", "kohya", "--out", str(out)],
                   "error: --lora someone/not-here: no such file or folder here, and as a Hugging Face hub id it is "
                   "not in the local hub cache and the hub cannot be reached (no network, or HF_HUB_OFFLINE set): on a "
                   "machine with network run `hf download someone/not-here --local-dir DIR`, then pass that DIR to "
                   "--lora", out, capsys)


def test_online_export_of_a_hub_lora_reads_the_header_first_and_downloads_the_lora_with_its_record(
        online_by_setting, hub_cache, made, tmp_path, monkeypatch, capsys):
    """Online, export --lora owner/name: a full model's file refused from its header (nothing downloaded, nothing
    written); a LoRA's downloaded with its base_model.json at main's commit, which its export records."""
    import huggingface_hub
    from safetensors import safe_open

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: contextlib.nullcontext())
    with safe_open(str(made["lora"] / "pytorch_lora_weights.safetensors"), "pt") as f:
        headers = {"good/lora": {k: f.get_slice(k).get_shape() for k in f.keys()},
                   "full/model": {"conv_in.weight": [320, 4, 3, 3], "conv_in.bias": [320]}}
    asked: list[tuple[str, str]] = []

    def download(repo, filename, **kw):
        asked.append((repo, filename))
        return _into_snapshot(hub_cache, repo, ("e" * 40), filename, made["lora"] / filename)
    monkeypatch.setattr(huggingface_hub, "parse_safetensors_file_metadata", lambda repo, file, **kw: type(
        "Header", (), {"tensors": {k: type("Info", (), {"shape": v}) for k, v in headers[repo].items()}}))
    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo, **kw: ["pytorch_lora_weights.safetensors", "base_model.json", "README.md"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    out = tmp_path / "out"
    assert_refused(main, ["export", "--lora", "full/model", "--format", "kohya", "--out", str(out)],
                   "error: --lora full/model holds a model's own weights (e.g. 'conv_in.bias'), not a LoRA's "
                   "lora_down / lora_A: a full (or merged) model goes to --model; export --lora takes the LoRA a run "
                   "wrote (its lora/ folder or a checkpoint)", out, capsys)
    assert asked == []
    assert main(["export", "--lora", "good/lora", "--format", "kohya", "--out", str(out)]) == 0
    assert asked == [("good/lora", "pytorch_lora_weights.safetensors"), ("good/lora", "base_model.json")]
    assert json.loads((out / "base_model.json").read_text())["hub_lora"] == {
        "repo": "good/lora", "file": "pytorch_lora_weights.safetensors", "revision": "e" * 40}
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "base_model.json",
                                                     "lora_alignprop_lora.safetensors"]  # (the repository's name)

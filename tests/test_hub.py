"""Without network, a hub id fails at once from the local cache instead of after huggingface_hub's retries.

The probe (one TCP connection to the hub's endpoint) is replaced here by a fake: these tests never touch the
network, and each starts with huggingface_hub out of offline mode (conftest sets HF_HUB_OFFLINE for the rest).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import threading

import pytest
from huggingface_hub import constants

from hubcache import cached_snapshot

from lowmem_alignprop.run import hub
from lowmem_alignprop.settings import hub_access
from lowmem_alignprop.cli import main


def _no_dns(probes):
    def connect(address, timeout=None):
        probes.append((address, timeout))
        raise socket.gaierror(-2, "Name or service not known")
    return connect


def test_an_unresolvable_hub_switches_huggingface_hub_to_the_cache_once(online_by_setting, monkeypatch, caplog):
    monkeypatch.setattr(socket, "create_connection", _no_dns(online_by_setting))
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert hub.offline() is True and hub.offline() is True
    assert online_by_setting == [(("huggingface.co", 443), hub_access.TIMEOUT)]  # probed once
    assert constants.HF_HUB_OFFLINE is True  # diffusers and transformers now read the cache only
    said = [r.getMessage() for r in caplog.records if "no network" in r.getMessage()]
    assert said == ["no network to the Hugging Face hub: huggingface.co cannot be resolved (Name or service not "
                    "known); hub ids load from the local cache only"]


def test_a_reachable_hub_stays_online(online_by_setting, monkeypatch):
    def connect(address, timeout=None):
        online_by_setting.append(address)
        return contextlib.nullcontext()
    monkeypatch.setattr(socket, "create_connection", connect)
    assert hub.offline() is False and constants.HF_HUB_OFFLINE is False


def test_a_refused_connection_to_a_mirror_endpoint_is_offline(online_by_setting, monkeypatch):
    def refuse(address, timeout=None):
        online_by_setting.append(address)
        raise ConnectionRefusedError(111, "Connection refused")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(constants, "ENDPOINT", "http://mirror.example:8080")  # HF_ENDPOINT
    assert hub_access.unreachable() == "mirror.example:8080 cannot be reached (Connection refused)"
    assert online_by_setting == [("mirror.example", 8080)]


def test_a_name_lookup_that_does_not_answer_is_offline_after_the_probes_timeout(online_by_setting, monkeypatch):
    """A resolver that does not answer (a captive portal, a dead DNS server): create_connection's timeout covers the
    connect only, so the lookup held the start for the resolver's own retries; the probe answers at TIMEOUT."""
    answer = threading.Event()

    def hanging_lookup(address, timeout=None):
        answer.wait(5)  # the resolver's silence (released below, once the probe has answered)
        raise socket.gaierror(-3, "Temporary failure in name resolution")
    monkeypatch.setattr(socket, "create_connection", hanging_lookup)
    monkeypatch.setattr(hub_access, "TIMEOUT", 0.2)
    try:
        assert hub_access.unreachable() == ("huggingface.co gave no answer within 0.2 s (its name lookup and "
                                            "connection)")
    finally:
        answer.set()


def test_behind_a_proxy_no_probe_is_made(online_by_setting, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed past the proxy"))
    assert hub.offline() is False


def test_offline_by_setting_needs_no_probe(online_by_setting, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed although offline"))
    assert hub.offline() is True


def test_a_reward_from_the_hub_without_network_fails_at_once_in_one_clean_line(online_by_setting, monkeypatch,
                                                                             tmp_path, capsys):
    """Before: about 50 s of retries (the CLIP model, then its tokenizer), then an error that nested a second
    'cannot load ... fix the folder' message inside the first. The hub loaders must not be asked online."""
    monkeypatch.setattr(socket, "create_connection", _no_dns(online_by_setting))
    monkeypatch.setenv("LOWMEM_ALIGNPROP_CACHE", str(tmp_path / "cache"))
    from huggingface_hub import file_download

    def no_request(*a, **k):
        raise AssertionError("a request went to the hub although it is unreachable")
    monkeypatch.setattr(file_download, "get_hf_file_metadata", no_request)
    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--reward", "clip", "--steps", "1", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("error: clip reward: cannot load 'openai/clip-vit-large-patch14' (config.json / model.safetensors "
                   "missing: offline and not in the Hugging Face cache); on a machine with network run `hf download "
                   "openai/clip-vit-large-patch14 --local-dir DIR`, then pass that DIR with --set reward_weights=PATH")
    assert not out.exists() and len(online_by_setting) == 1


def test_a_model_hub_id_without_network_fails_at_once(online_by_setting, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(socket, "create_connection", _no_dns(online_by_setting))
    from huggingface_hub import file_download

    monkeypatch.setattr(file_download, "get_hf_file_metadata",
                        lambda *a, **k: pytest.fail("a request went to the hub although it is unreachable"))
    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--model", "someone/sd-model", "--steps", "1", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: model 'someone/sd-model' is a Hugging Face hub id, and it could not be fetched")
    assert "hf download someone/sd-model --local-dir DIR" in err and not out.exists()


def test_under_a_launcher_only_rank_0_says_so(online_by_setting, monkeypatch, caplog):
    monkeypatch.setattr(socket, "create_connection", _no_dns(online_by_setting))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")  # (a RANK without a launcher's WORLD_SIZE is no rank: runlock.global_rank)
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert hub.offline() is True
    assert "no network" not in caplog.text and constants.HF_HUB_OFFLINE is True  # offline all the same


def _fake_hub(monkeypatch, tmp_path, repos: dict, fetched: list):
    """huggingface_hub's downloads served from local folders (``repos``: hub id -> folder): what a download fetches
    is copied into a hub cache of huggingface_hub's layout, and every request is recorded in ``fetched``; lookups
    with local_files_only read that cache as the real functions do."""
    import fnmatch
    import shutil

    import huggingface_hub

    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    real_snapshot, real_file = huggingface_hub.snapshot_download, huggingface_hub.hf_hub_download

    def copy(repo, wanted):
        snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
        for f in repos[repo].rglob("*"):
            rel = f.relative_to(repos[repo]).as_posix()
            if f.is_file() and wanted(rel):
                (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, snapshot / rel)
        (snapshot.parent.parent / "refs").mkdir(exist_ok=True)
        (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)

    def snapshot_download(repo, *, local_files_only=False, allow_patterns=None, **kw):
        if not local_files_only:
            fetched.append((repo, tuple(allow_patterns or ())))
            copy(repo, lambda rel: any(fnmatch.fnmatch(rel, p) for p in allow_patterns or ["*"]))
        return real_snapshot(repo, local_files_only=True, allow_patterns=allow_patterns, **kw)

    def hf_hub_download(repo, filename, *, local_files_only=False, **kw):
        if not local_files_only:
            fetched.append((repo, filename))
            copy(repo, lambda rel: rel == filename)
        return real_file(repo, filename, local_files_only=True, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return cache


def test_plan_of_a_hub_id_not_downloaded_fetches_its_configs_and_never_weights(online_by_setting, monkeypatch,
                                                                                tmp_path, capsys):
    """A laptop asks whether a hub model fits a card before downloading it: plan fetches its configs and tokenizers
    (no weights) and plans it as it plans the folder; offline it says so in one line, naming what to do."""

    from flowmodels import build_tiny_flux_dir

    from lowmem_alignprop.measure.meta_models import CONFIG_FILES
    from lowmem_alignprop.models.tiny import tiny_model_dir

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: contextlib.nullcontext())  # the hub: reachable
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # as the command line sets it: DeepSpeed's detection prints to stdout
    folders = {"someone/new-sd": tiny_model_dir(), "someone/new-flux": build_tiny_flux_dir(tmp_path / "flux")}
    fetched: list = []
    cache = _fake_hub(monkeypatch, tmp_path, folders, fetched)
    plan = ["plan", "--profile", "cpu", "--set", "resolution=32", "--set", "k=1", "--json"]
    for repo, folder in folders.items():
        needed = []
        for model in (repo, str(folder)):
            assert main([*plan, "--model", model]) == 0
            needed.append(json.loads(capsys.readouterr().out)["peak_needed"])
        assert needed[0] == needed[1] > 0, repo
        assert (repo, tuple(CONFIG_FILES)) in fetched  # the configs, in one request
    assert fetched[0] == ("someone/new-sd", "model_index.json")  # is it SD3/FLUX? (a few hundred bytes)
    weights = [p.name for p in cache.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt")]
    assert weights == [] and any(cache.rglob("tokenizer_2/*"))  # FLUX's T5 tokenizer came, no weight did

    fetched.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main([*plan, "--model", "someone/not-here"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: plan needs the architecture of 'someone/not-here': it is not in the local Hugging "
                          "Face cache and the hub cannot be reached; on a machine with network run `hf download "
                          "someone/not-here --local-dir DIR`") and fetched == []


# -- a hub id downloaded earlier, read from huggingface_hub's cache layout without network ---------------------------

HUB_FAST = ["--profile", "cpu", "--set", "sample_prompts=0", "--set", "sample_steps=2", "--set", "k=1",
            "--steps", "1"]


@pytest.mark.parametrize("offline_by", ["HF_HUB_OFFLINE", "the probe"])
def test_a_cached_hub_id_trains_offline_without_huggingface_hubs_fallback_lines(offline_by, hub_cache, tiny_dir,
                                                                                 tmp_path, capsys, caplog, request):
    """Before: huggingface_hub logged 'Could not reach the Hub (... offline mode is enabled. To disable it, please
    unset the `HF_HUB_OFFLINE` environment variable.). Using cached commit hash' twice per load (train, sample,
    export --merge), advising to unset a variable the user never set where the probe found no network."""
    cached_snapshot(hub_cache, "org/tiny-sd", tiny_dir)
    if offline_by == "the probe":
        probes = request.getfixturevalue("online_by_setting")
        request.getfixturevalue("monkeypatch").setattr(socket, "create_connection", _no_dns(probes))
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="huggingface_hub"):
        assert main([*HUB_FAST, "--model", "org/tiny-sd", "--output-dir", str(out)]) == 0
    said = [r.getMessage() for r in caplog.records if r.name.startswith("huggingface_hub")]
    assert said == [] and "Could not reach the Hub" not in capsys.readouterr().err
    assert json.loads((out / "lora" / "base_model.json").read_text())["model"] == "org/tiny-sd"


def _lfs_pointer(f):
    import hashlib

    data = f.read_bytes()
    f.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
                 f"size {len(data)}\n")


def _cut_in_half(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.parametrize("change, line", [
    (lambda d: shutil.rmtree(d / "vae"),
     "org/m is incomplete: its model_index.json lists vae but the vae/ folder is missing; its download in the "
     "Hugging Face cache is incomplete: on a machine with network run `hf download org/m`, then run again"),
    (lambda d: (d / "vae" / "diffusion_pytorch_model.safetensors").unlink(),
     "org/m is incomplete: vae/ has no weights file (such as diffusion_pytorch_model.safetensors); its download in "
     "the Hugging Face cache is incomplete: on a machine with network run `hf download org/m`, then run again"),
    (lambda d: _lfs_pointer(d / "text_encoder" / "model.safetensors"),  # (a traceback)
     "org/m: text_encoder/model.safetensors is a Git LFS pointer (1xx bytes), not the weights; its download in the "
     "Hugging Face cache is damaged: on a machine with network run `hf download org/m --force-download`, then run "
     "again"),
    (lambda d: _cut_in_half(d / "unet" / "diffusion_pytorch_model.safetensors"),
     "org/m: unet/diffusion_pytorch_model.safetensors is damaged or not a safetensors file (Error while "
     "deserializing header: incomplete metadata, file not fully covered); its download in the Hugging Face cache "
     "is damaged: on a machine with network run `hf download org/m --force-download`, then run again"),
], ids=["no_vae", "vae_without_weights", "text_encoder_lfs_pointer", "unet_cut_short"])
def test_a_damaged_or_partial_cached_hub_id_is_one_line_naming_the_part_and_the_download(
        change, line, hub_cache, tiny_dir, tmp_path, capsys):
    """Before: 'could not load model ... Error no file named config.json found in directory <snapshot>; check the hub
    id' (no part named, a wrong fix), diffusers' stray 'An error occurred while trying to fetch' line, a message cut
    at 200 characters, or (a text encoder's file) a SafetensorError traceback."""
    import re

    cached_snapshot(hub_cache, "org/m", tiny_dir, change)
    out = tmp_path / "run"
    assert main([*HUB_FAST, "--model", "org/m", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "An error occurred" not in err
    said = err.strip().splitlines()
    assert len(said) == 1 and re.fullmatch(re.escape(f"error: {line}").replace("1xx", r"1\d\d"), said[0]), err
    assert not out.exists()


@pytest.mark.parametrize("part, change, line", [
    ("text_encoder/model.safetensors", _lfs_pointer,
     "text_encoder/model.safetensors is a Git LFS pointer (1xx bytes), not the weights; it was cloned without "
     "git-lfs: run `git lfs pull` in the model folder, or download the model with `hf download OWNER/NAME "
     "--local-dir DIR`"),
    ("text_encoder/model.safetensors", _cut_in_half,
     "text_encoder/model.safetensors is damaged or not a safetensors file (Error while deserializing header: "
     "incomplete metadata, file not fully covered); copy the whole model folder again (every subfolder, every file "
     "in full)")], ids=["lfs_pointer", "cut_short"])
def test_a_model_folder_with_a_pointer_or_cut_off_text_encoder_is_one_line(part, change, line, tiny_dir, tmp_path,
                                                                           capsys):
    """A git clone without git-lfs, or a copy cut off: the text encoder's file was a SafetensorError traceback."""
    import re

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    change(model / part)
    assert main([*HUB_FAST, "--model", str(model), "--output-dir", str(tmp_path / "run")]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and re.fullmatch(re.escape(f"error: {model}: {line}").replace("1xx", r"1\d\d"), said[0])


def test_a_cached_pipeline_hub_id_as_vae_loads_its_vae_folder(hub_cache, tiny_dir, tmp_path, caplog):
    """``--set vae=OWNER/NAME`` of a whole pipeline's repository reads its vae/, as a pipeline folder's does; it said
    'could not be fetched ... nor found in the local cache' of a hub id that was there."""
    cached_snapshot(hub_cache, "org/tiny-sd", tiny_dir)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main([*HUB_FAST, "--model", str(tiny_dir), "--set", "vae=org/tiny-sd", "--output-dir", str(out)]) == 0
    assert "VAE: org/tiny-sd instead of the model's own" in caplog.text

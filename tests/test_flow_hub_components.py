"""``--model TRANSFORMER.safetensors --set model_components=OWNER/NAME``: the usual FLUX/SD3.5 setup (the transformer
file from ComfyUI or civitai, the text encoders, VAE and scheduler from the model's hub repository, already in the
local Hugging Face cache). A hub id was refused as "not an SD3/SD3.5 or FLUX.1 diffusers folder".

Offline: a fake hub cache holds the tiny FLUX pipeline under one snapshot commit (refs/main), as huggingface_hub
resolves a real cache; the transformer file is the tiny pipeline's transformer (another seed) in diffusers' layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from flowmodels import FLOW_RESOLUTION, build_tiny_flux_dir, build_tiny_flux_pipeline

from lowmem_alignprop.cli import main

REPO, MAIN = "org/tiny-flux", "c" * 40
FLOW = ["--profile", "cpu", "--seed", "0", "--set", f"resolution={FLOW_RESOLUTION}", "--set", "sample_steps=2",
        "--set", "k=1", "--set", "batch_size=1", "--set", "sample_prompts=0", "--set", "guidance_scale=3.5"]

pytestmark = pytest.mark.usefixtures("fresh_log_handlers")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The hub cache (REPO at MAIN) and a FLUX transformer file of the same shape."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("hubparts")
    repo = root / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = build_tiny_flux_dir(repo / "snapshots" / MAIN)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    transformer = build_tiny_flux_pipeline(seed=3).transformer
    path = root / "flux1-dev-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, str(path))
    return {"cache": root / "hub", "snapshot": snapshot, "file": path}


@pytest.fixture
def cache(files, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(files["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return files


def _losses(out) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_hub_id_as_model_components_trains_as_its_snapshot_folder_does_and_its_lora_samples(cache, tmp_path):
    """One step with model_components=OWNER/NAME: the loss of the same step with the snapshot's folder given as a
    path, to the last bit; base_model.json and the model card keep the hub id (a shareable name, no local path);
    `sample` of the LoRA without --model loads the file and the hub id's parts again."""
    runs = {}
    for name, components in (("hub", REPO), ("folder", str(cache["snapshot"]))):
        runs[name] = tmp_path / name
        assert main([*FLOW, "--model", str(cache["file"]), "--set", f"model_components={components}", "--steps", "1",
                     "--output-dir", str(runs[name])]) == 0
    hub, folder = _losses(runs["hub"]), _losses(runs["folder"])
    assert len(hub) == 1 and hub == folder and hub[0] != 0.0
    record = json.loads((runs["hub"] / "lora" / "base_model.json").read_text())
    assert record["image_settings"]["model_components"] == REPO
    # the commit the parts came from: the hub id's main, and the snapshot folder's own (a local folder: none)
    assert record["components_revision"] == MAIN
    assert json.loads((runs["folder"] / "lora" / "base_model.json").read_text())["components_revision"] == MAIN
    out = tmp_path / "samples"
    assert main(["sample", *FLOW, "--lora", str(runs["hub"] / "lora"), "--num-prompts", "1",
                 "--output-dir", str(out)]) == 0
    result = json.loads((out / "sample_results.json").read_text())
    assert len(result["per_prompt"]) == 1


def test_resume_and_export_merge_of_a_run_with_a_hub_id_as_model_components(cache, tmp_path):
    """`--resume` loads the run's hub id again; `export --merge --single-file` loads the run's file and hub id's
    parts; its card's usage names the hub id as model_components (it loads so now) and the kohya metadata reads the
    hub id's config as a folder's."""
    from safetensors.torch import load_file

    from loras import export
    from lowmem_alignprop.lora import flow_export
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.settings.config import Config

    run = tmp_path / "run"
    assert main([*FLOW, "--model", str(cache["file"]), "--set", f"model_components={REPO}", "--steps", "1",
                 "--set", "lr=0.05", "--set", "checkpoint_every=1", "--output-dir", str(run)]) == 0
    assert main(["--resume", "latest", "--output-dir", str(run), "--steps", "2"]) == 0  # config.yaml's hub id
    assert len(_losses(run)) == 2
    out = export(tmp_path, run / "lora", "--merge", "--single-file")
    [merged] = out.glob("*.safetensors")
    # the merge started from the file's weights (another seed than the snapshot's transformer): x_embedder has no
    # LoRA; read back with the hub id's parts as any transformer file is
    merged_back = load_components(Config(model=str(merged), model_components=REPO)).unet.state_dict()
    own, snapshots = (load_file(str(f))["x_embedder.weight"] for f in
                      (cache["file"], cache["snapshot"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(merged_back["x_embedder.weight"], own) and not torch.equal(own, snapshots)
    card = (out / "README.md").read_text().splitlines()
    # the parts at the commit they came from (the name alone loads the hub's main): lowmem-alignprop and diffusers
    said = f"--set model_components={REPO} --set components_revision={MAIN}"
    assert f"- lowmem-alignprop: `--model {merged.name} {said}`." in card
    assert f"- diffusers: `FluxTransformer2DModel.from_single_file(\"{merged.name}\", config=\"{REPO}\", " \
           f"subfolder=\"transformer\", config_revision=\"{MAIN}\")`." in card
    started = [x for x in card if x.startswith("lowmem-alignprop --")]  # the start pinned; the resume: its config
    assert [x.count(f"--set components_revision={MAIN}") for x in started] == [1, 0] and "--resume" in started[1]
    assert flow_export.architecture("flux", str(cache["file"]), [], REPO) == \
        flow_export.architecture("flux", str(cache["file"]), [], str(cache["snapshot"]))


NEW = "d" * 40


def test_a_resume_after_the_components_hub_ids_main_moved_to_other_text_encoders_is_refused_naming_both_commits(
        files, tmp_path, monkeypatch, capsys):
    """The run's parts came from the hub id's main at MAIN; main moved to NEW, whose text encoder holds other
    weights: the resume loaded NEW's in silence (the prompts encoded otherwise than the run's so far). Refused with
    both commits and --set components_revision=MAIN (the pin of model_components' commit), which then resumes."""
    hub = _own_cache(files, tmp_path, monkeypatch)
    run = tmp_path / "run"
    assert main([*FLOW, "--model", str(files["file"]), "--set", f"model_components={REPO}", "--steps", "1",
                 "--set", "checkpoint_every=1", "--output-dir", str(run)]) == 0
    _move_main(hub, 0.01)
    capsys.readouterr()
    assert main(["--resume", "latest", "--output-dir", str(run), "--steps", "2"]) == 2
    said = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert said == [f"error: checkpoint {run / 'checkpoints' / 'step-00000001'} trained with model_components={REPO} "
                    f"at commit {MAIN}, and {REPO} resolves to commit {NEW} here (its text encoders' weights differ: "
                    f"text_encoder/model.safetensors): resume with --set components_revision={MAIN} to load the commit "
                    "it trained on"]
    assert len(_losses(run)) == 1
    assert main(["--resume", "latest", "--output-dir", str(run), "--steps", "2", "--set",
                 f"components_revision={MAIN}"]) == 0
    assert len(_losses(run)) == 2 and "resolves to commit" not in capsys.readouterr().err
    # the pin was taken: the step-2 checkpoint records MAIN, the commit its parts came from
    step2 = json.loads((run / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert step2["fingerprint"]["components_revision"] == MAIN


@pytest.mark.parametrize("case", ["same", "linked", "gone", "unrecorded", "rank1"])
def test_a_resume_after_the_components_hub_ids_main_moved_to_the_same_text_encoders_warns_once(
        case, tmp_path, monkeypatch, caplog):
    """main moved to a commit with the same text encoder weights (a README or VAE change; the cache's links to one
    blob are compared unread): one warning naming both commits and --set components_revision, training goes on; the
    trained commit gone from the cache: said (the pin fetches it where the hub is reachable); a record without the
    commit, or rank 1: nothing said."""
    import logging

    from lowmem_alignprop.run import base_fingerprint
    from lowmem_alignprop.settings.config import Config

    repo = tmp_path / f"models--{REPO.replace('/', '--')}"
    for commit in (MAIN, NEW):
        (repo / "snapshots" / commit / "text_encoder").mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "aaaa").write_bytes(b"weights")
    for commit in (MAIN, NEW):
        weights = repo / "snapshots" / commit / "text_encoder" / "model.safetensors"
        if case == "linked":
            weights.symlink_to(repo / "blobs" / "aaaa")
        else:
            weights.write_bytes(b"weights")
    if case == "gone":
        import shutil
        shutil.rmtree(repo / "snapshots" / MAIN)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(base_fingerprint, "global_rank", lambda: 1 if case == "rank1" else 0)
    fp = {"model": "flux.safetensors", "unet_config_sha": "x", "conv_in": [0.5, 0.1, 0.2]}
    saved = {"fingerprint": {**fp, **({} if case == "unrecorded" else {"components_revision": MAIN})},
             "config": {"model_components": REPO}}
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        base_fingerprint.check_fingerprint(saved, {**fp, "components_revision": NEW},
                                           Config(model="flux.safetensors", model_components=REPO), tmp_path / "step-1")
    lines = [r.getMessage() for r in caplog.records]
    note = "the same text encoder weights"
    if case == "gone":
        note = f"commit {MAIN} is not in the local Hugging Face cache: its text encoders could not be compared"
    assert lines == ([] if case in ("unrecorded", "rank1") else [
        f"resume: checkpoint {tmp_path / 'step-1'} trained with model_components={REPO} at commit {MAIN}, and {REPO} "
        f"resolves to commit {NEW} here ({note}): training goes on with its text encoders, VAE and scheduler; --set "
        f"components_revision={MAIN} loads the commit it trained on"])


def test_the_cache_links_of_two_commits_to_other_blobs_are_other_text_encoder_weights(tmp_path):
    """Two snapshots' files linked to other blobs (named by their content) differ, unread; a part one snapshot lacks
    (not fetched) is not compared, nor a file one of them lacks beside files they share (`hf download` of the trained
    commit, which the resume refusal names, brings the fp16 variant and .bin files the loader never fetched: the
    same weights were refused as other ones); parts sharing no file name (sharded otherwise) differ."""
    from lowmem_alignprop.run.base_fingerprint import text_encoders_differ

    a, b = tmp_path / "a", tmp_path / "b"
    for i, folder in enumerate((a, b)):
        (folder / "text_encoder_2").mkdir(parents=True)
        (tmp_path / f"blob{i}").write_bytes(b"same bytes, other blob")
        (folder / "text_encoder_2" / "model.safetensors").symlink_to(tmp_path / f"blob{i}")
    (a / "text_encoder").mkdir()
    (a / "text_encoder" / "model.safetensors").write_bytes(b"x")  # b has no text_encoder/: not compared
    assert text_encoders_differ(a, b) == "text_encoder_2/model.safetensors"
    (b / "text_encoder_2" / "model.safetensors").unlink()
    (b / "text_encoder_2" / "model.safetensors").symlink_to(tmp_path / "blob0")
    assert text_encoders_differ(a, b) == ""
    (a / "text_encoder_2" / "model.fp16.safetensors").write_bytes(b"y")
    (a / "text_encoder_2" / "pytorch_model.bin").write_bytes(b"z")
    assert text_encoders_differ(a, b) == ""
    (b / "text_encoder_2" / "model.safetensors").unlink()
    (b / "text_encoder_2" / "model-00001-of-00002.safetensors").write_bytes(b"w")
    assert text_encoders_differ(a, b) == "text_encoder_2/model-00001-of-00002.safetensors"
    assert text_encoders_differ(tmp_path / "gone", b) is None


def test_the_transformer_config_of_a_hub_id_components_is_read_at_the_commit_given(files, tmp_path, monkeypatch):
    """export's metadata reads a transformer file's config from its hub id model_components: at the commit the run's
    parts came from (components_revision), not the cache's main, which moved to a config of another model."""
    import shutil

    from lowmem_alignprop.lora import flow_export

    hub = _own_cache(files, tmp_path, monkeypatch)
    repo = hub / f"models--{REPO.replace('/', '--')}"
    conf = repo / "snapshots" / NEW / "transformer" / "config.json"
    shutil.copytree(repo / "snapshots" / MAIN, repo / "snapshots" / NEW)
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "num_layers": 7}))  # (another block count)
    (repo / "refs" / "main").write_text(NEW)
    trained = flow_export.transformer_config(str(files["file"]), REPO, MAIN)
    assert trained is not None and trained["num_layers"] == json.loads(
        (repo / "snapshots" / MAIN / "transformer" / "config.json").read_text())["num_layers"] != 7
    assert flow_export.transformer_config(str(files["file"]), REPO) is None  # main's: not the file's block count


def test_plan_of_a_transformer_file_with_a_hub_id_plans_as_with_its_snapshot_folder(cache, capsys):
    """`plan` reads the hub id's cached configs (never its weights): the same plan as the snapshot's folder gives."""
    said = []
    for components in (REPO, str(cache["snapshot"])):
        assert main(["plan", *FLOW, "--model", str(cache["file"]), "--set", f"model_components={components}"]) == 0
        said.append(re.sub(r"\b\d+(\.\d+)? s\b", "N s", capsys.readouterr().out.replace(components, "PARTS")))
    assert said[0] == said[1] and "GiB" in said[0]


def test_a_hub_id_as_model_components_not_in_the_cache_offline_is_one_line_naming_its_download(cache, tmp_path,
                                                                                               capsys):
    out = tmp_path / "run"
    gone = "org/not-cached"
    assert main([*FLOW, "--model", str(cache["file"]), "--set", f"model_components={gone}", "--steps", "1",
                 "--output-dir", str(out)]) == 2
    said = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert said == [f"error: model_components '{gone}' is a Hugging Face hub id, and it could not be fetched (no "
                    "network, or HF_HUB_OFFLINE set) nor found in the local cache: on a machine with network run "
                    f"`hf download {gone} --local-dir DIR`, then pass --set model_components=DIR"]
    assert not (out / "lora").exists()
    assert main(["plan", *FLOW, "--model", str(cache["file"]), "--set", f"model_components={gone}"]) == 2
    said = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert said == [f"error: plan needs the architecture of '{gone}': it is not in the local Hugging Face cache and "
                    f"the hub cannot be reached; on a machine with network run `hf download {gone} --local-dir DIR`, "
                    "then pass --set model_components=DIR, or use --model sd15|sd21|sdxl|sd35m|sd35l|flux for its "
                    "architecture, or a local diffusers directory"]


def test_a_hub_id_as_model_components_is_fetched_without_the_transformers_weights(cache, monkeypatch):
    """Online, the hub id's parts but its transformer's weights are fetched (FLUX.1-dev's are 23.8 GB, and the file
    stands in for them): the patterns snapshot_download is given."""
    import huggingface_hub

    from lowmem_alignprop.models import flow_loading
    from lowmem_alignprop.run import hub

    asked = []
    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: asked.append((repo, kw)) or str(cache["snapshot"]))
    assert flow_loading.components_folder(REPO) == cache["snapshot"]
    [(repo, kwargs)] = asked
    assert repo == REPO and kwargs["local_files_only"] is False
    assert sorted(kwargs["allow_patterns"]) == ["model_index.json", "scheduler/*", "text_encoder/*",
                                                "text_encoder_2/*", "tokenizer/*", "tokenizer_2/*",
                                                "transformer/config.json", "vae/*"]


def test_an_sd3_hub_id_as_model_components_with_t5_encoder_false_is_fetched_without_t5(tmp_path, monkeypatch):
    """t5_encoder=false leaves SD3's T5-XXL out of the pipeline: its text_encoder_3 (9.5 GB) and tokenizer_3 are not
    fetched either (they were, for a pipeline that then loads without them); with T5 on they are."""
    import huggingface_hub

    from lowmem_alignprop.models import flow_loading
    from lowmem_alignprop.run import hub

    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "X"],
                                 **{p: ["transformers", "X"] for p in ("text_encoder", "text_encoder_2",
                                                                      "text_encoder_3", "tokenizer", "tokenizer_2",
                                                                      "tokenizer_3")},
                                 "vae": ["diffusers", "X"], "scheduler": ["diffusers", "X"]}))
    asked = []
    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(flow_loading, "hub_file", lambda repo, name, **kw: index)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: asked.append(sorted(kw["allow_patterns"])) or str(tmp_path))
    for t5 in (True, False):
        flow_loading.components_folder("org/sd3", t5=t5)
    parts = ["model_index.json", "scheduler/*", "text_encoder/*", "text_encoder_2/*", "tokenizer/*", "tokenizer_2/*",
             "transformer/config.json", "vae/*"]
    assert asked == [sorted([*parts, "text_encoder_3/*", "tokenizer_3/*"]), parts]
    seen = []

    def stop(components, t5=True, revision=""):
        seen.append((components, t5))
        raise RuntimeError("stop")

    monkeypatch.setattr(flow_loading, "components_folder", stop)
    with pytest.raises(RuntimeError):  # the loader asks for the parts it loads
        flow_loading.load_flow_single_file("x.safetensors", "org/sd3", torch.bfloat16, place=None, t5=False)
    assert seen == [("org/sd3", False)]


def test_export_metadata_of_a_hub_id_as_model_components_fetches_its_two_config_files_only(cache, tmp_path,
                                                                                           monkeypatch):
    """export's kohya/modelspec metadata needs the transformer's config: online without the hub id in the cache, the
    index and that config are fetched, not the parts a pipeline loads (FLUX.1's T5 is 9.5 GB); the config read is
    the snapshot folder's (the file's variant)."""
    import fnmatch
    import shutil

    import huggingface_hub

    from lowmem_alignprop.lora import flow_export
    from lowmem_alignprop.run import hub

    from lowmem_alignprop.settings import hub_access

    asked, got = [], tmp_path / "fetched"

    def fetch(name: str) -> str:  # as the hub does: the file into the (here: one) snapshot folder
        asked.append(name)
        (got / name).parent.mkdir(parents=True, exist_ok=True)
        return shutil.copy(cache["snapshot"] / name, got / name)

    def snapshot_download(repo, allow_patterns=(), **kw):  # the files the patterns match
        for f in sorted(cache["snapshot"].rglob("*")):
            name = f.relative_to(cache["snapshot"]).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                fetch(name)
        return str(got)

    for var in hub_access.OFFLINE_VARS:  # a machine with network, the hub id not in its cache
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hub_access, "unreachable", lambda: None)
    monkeypatch.setattr(hub, "offline", lambda: False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **kw: fetch(name))
    conf = flow_export.transformer_config(str(cache["file"]), REPO)
    assert sorted(set(asked)) == ["model_index.json", "transformer/config.json"]
    assert conf == flow_export.transformer_config(str(cache["file"]), str(cache["snapshot"]))
    assert conf is not None and conf["guidance_embeds"] is True and conf["num_layers"] == 1


def test_export_merge_of_an_sd3_hub_id_saved_without_t5_loads_it_as_training_did(tmp_path, monkeypatch):
    """An SD3 hub id whose snapshot was saved without T5 (model_index.json's text_encoder_3 null) trains and samples;
    `export --merge` of its LoRA loaded it with diffusers' generic pipeline load, which refuses the null parts
    ("could not load model ... expected [..., 'text_encoder_3', ...]"): it loads it as training does."""
    from huggingface_hub import constants

    from flowmodels import build_tiny_sd3_dir

    repo, commit = "org/tiny-sd3", "e" * 40
    folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    build_tiny_sd3_dir(folder / "snapshots" / commit, with_t5=False)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    run, merged = tmp_path / "run", tmp_path / "merged"
    assert main([*FLOW, "--model", repo, "--steps", "1", "--set", "lr=0.05", "--output-dir", str(run)]) == 0
    assert main(["export", "--lora", str(run / "lora"), "--merge", "--out", str(merged)]) == 0
    index = json.loads((merged / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    from safetensors.torch import load_file

    ours, base = (load_file(str(f / "transformer" / "diffusion_pytorch_model.safetensors"))
                  for f in (merged, folder / "snapshots" / commit))
    changed = sorted(k for k in base if not torch.equal(ours[k].float(), base[k].float()))
    assert changed and all(".attn." in k for k in changed)  # the LoRA's layers merged in, nothing else


def test_sample_and_export_merge_of_a_lora_load_its_components_commit_after_main_moved(files, tmp_path, monkeypatch,
                                                                                       capsys, caplog):
    """The run's parts came from the hub id's main at MAIN; main moved to NEW (other text encoder weights): `sample`
    and `export --merge` of its LoRA loaded NEW's parts (the cache's main) in silence. They load MAIN's snapshot, and
    sample says the commit; with MAIN gone from the cache, offline: one line naming the commit and its download."""
    import logging
    import shutil

    import huggingface_hub
    from safetensors.torch import load_file

    hub = _own_cache(files, tmp_path, monkeypatch)
    run = tmp_path / "run"
    assert main([*FLOW, "--model", str(files["file"]), "--set", f"model_components={REPO}", "--steps", "1",
                 "--output-dir", str(run)]) == 0
    repo = _move_main(hub, 0.01).parent.parent
    from lowmem_alignprop.models.flow_loading import CONFIG_FILES

    read, download = [], huggingface_hub.snapshot_download

    configs = []  # the commits export's metadata read the two config files at

    def parts_read(*a, **k):  # the snapshots the parts load from (export's metadata reads the two configs alone)
        got = download(*a, **k)
        (read if k.get("allow_patterns") != CONFIG_FILES else configs).append(got)
        return got

    monkeypatch.setattr(huggingface_hub, "snapshot_download", parts_read)
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main(["sample", *FLOW, "--lora", str(run / "lora"), "--num-prompts", "1",
                     "--output-dir", str(tmp_path / "s")]) == 0
    assert {r.rsplit("/", 1)[-1] for r in read} == {MAIN}
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--model not given")]
    assert len(said) == 1 and f"model_components={REPO} components_revision={MAIN}" in said[0]
    read.clear()
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main(["export", "--lora", str(run / "lora"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert {r.rsplit("/", 1)[-1] for r in read} == {MAIN}
    assert f"--merge: the text encoders, VAE and scheduler of model_components={REPO} at commit {MAIN}, the one its " \
           "run trained with" in caplog.text
    merged = load_file(str(tmp_path / "merged" / "text_encoder" / "model.safetensors"))
    trained = load_file(str(repo / "snapshots" / MAIN / "text_encoder" / "model.safetensors"))
    assert all(torch.equal(merged[k], trained[k]) for k in trained)
    # merged_loras.json names the commit its parts were read at; `sample --model MERGED` alone takes the run's other
    # settings from it, not the parts' hub id nor its pin (the folder holds those parts: a pin alone is refused)
    entry = json.loads((tmp_path / "merged" / "merged_loras.json").read_text())[0]
    assert (entry["components_revision"], "vae_revision" in entry) == (MAIN, False)
    # the kohya export's metadata (modelspec.architecture, ss_base_model_version) reads the transformer config of the
    # commit the run's parts came from, not main's
    configs.clear()
    assert main(["export", "--lora", str(run / "lora"), "--format", "kohya", "--out", str(tmp_path / "kohya")]) == 0
    assert configs and {c.rsplit("/", 1)[-1] for c in configs} == {MAIN}
    # its card names the parts' commit and the flags that load it; its training command pins it (run again after
    # main moved, the name alone would train on NEW's text encoders)
    card = (tmp_path / "kohya" / "README.md").read_text()
    assert f"| text encoders, VAE and scheduler | `{REPO}` at commit `{MAIN}` (lowmem-alignprop: `--set " \
           f"model_components={REPO} --set components_revision={MAIN}`) |" in card.splitlines()
    [trained] = [x for x in card.splitlines() if x.startswith("lowmem-alignprop --profile")]
    assert trained.endswith(f"--output-dir {run} --set components_revision={MAIN}")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main(["sample", *FLOW, "--model", str(tmp_path / "merged"), "--num-prompts", "1",
                     "--output-dir", str(tmp_path / "s3")]) == 0
    said = [r.getMessage() for r in caplog.records if "is an export --merge" in r.getMessage()]
    assert len(said) == 1 and "did: reward=brightness" in said[0] and "model_components" not in said[0]
    assert "components_revision" not in said[0]
    shutil.rmtree(repo / "snapshots" / MAIN)
    capsys.readouterr()
    assert main(["sample", *FLOW, "--lora", str(run / "lora"), "--num-prompts", "1",
                 "--output-dir", str(tmp_path / "s2")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: model_components '{REPO}' at revision {MAIN} could not be fetched (no network, or HF_HUB_OFFLINE set) "
        f"nor found in the local Hugging Face cache: on a machine with network run `hf download {REPO} --revision "
        f"{MAIN}` (into the hub cache; copy that cache here), then run again")


def test_the_card_of_a_run_with_a_hub_id_as_model_components_loads_its_commit_and_renders_as_sample(
        files, tmp_path, monkeypatch):
    """A run on `--model FILE --set model_components=OWNER/NAME`, after the hub id's main moved to other text encoder
    weights: its diffusers export's card said `FluxPipeline.from_pretrained("FILE")`. Its code loads the file with
    the hub id's transformer config and the pipeline from the hub id, both at the commit the run's parts came from,
    and renders `sample`'s image of the same LoRA, prompt and seed (main's text encoder would render another)."""
    from loras import card_image, card_renders_as_sample, export, python_block, sampled

    hub = _own_cache(files, tmp_path, monkeypatch)
    run = tmp_path / "run"
    assert main([*FLOW, "--model", str(files["file"]), "--set", f"model_components={REPO}", "--steps", "1",
                 "--set", "lr=0.5", "--output-dir", str(run)]) == 0
    _move_main(hub, 0.05)
    out = export(tmp_path, run / "lora", "--format", "diffusers")
    block = python_block(out)
    assert block.splitlines()[1:3] == [
        f"transformer = FluxTransformer2DModel.from_single_file(\"{files['file']}\", config=\"{REPO}\", "
        f"subfolder=\"transformer\", config_revision=\"{MAIN}\")  # the transformer file it trained on",
        f"pipe = FluxPipeline.from_pretrained(\"{REPO}\", transformer=transformer, revision=\"{MAIN}\")"], block
    seed, base, with_lora = sampled(tmp_path, monkeypatch, out)
    card_renders_as_sample(block, seed, base, with_lora)
    unpinned = block.replace(f", config_revision=\"{MAIN}\"", "").replace(f", revision=\"{MAIN}\"", "")
    assert (card_image(unpinned, seed)[0] - (with_lora * 255).round()).abs().max() > 4  # main's parts: other images


def test_export_merge_into_a_transformer_file_of_a_lora_trained_on_a_hub_id_takes_the_parts_of_its_commit(
        files, tmp_path, monkeypatch, caplog):
    """A LoRA trained on `--model OWNER/NAME` (at MAIN), merged into a transformer file (`export --merge --model
    FILE`): the file's text encoders, VAE and scheduler come from the hub id it trained on, and were read from the
    hub's main (NEW: other text encoder weights) in silence. They are read at MAIN, said, and merged_loras.json
    records that commit, as the merged single file's card does. (FILE: the hub id's own transformer as one file.)"""
    import logging
    import shutil

    from safetensors.torch import load_file, save_file

    file = shutil.copy(files["snapshot"] / "transformer" / "diffusion_pytorch_model.safetensors",
                       tmp_path / "flux1-dev.safetensors")
    hub = _own_cache(files, tmp_path, monkeypatch)
    run = tmp_path / "run"
    assert main([*FLOW, "--model", REPO, "--steps", "1", "--output-dir", str(run)]) == 0
    assert json.loads((run / "lora" / "base_model.json").read_text())["revision"] == MAIN
    repo = hub / f"models--{REPO.replace('/', '--')}"
    encoder = shutil.copytree(repo / "snapshots" / MAIN, repo / "snapshots" / NEW) / "text_encoder" / \
        "model.safetensors"
    save_file({k: v + 0.05 if v.is_floating_point() else v for k, v in load_file(str(encoder)).items()}, str(encoder))
    (repo / "refs" / "main").write_text(NEW)
    out = tmp_path / "merged"
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main(["export", "--lora", str(run / "lora"), "--merge", "--model", str(file), "--out", str(out)]) == 0
    assert f"--merge: the text encoders, VAE and scheduler of model_components={REPO} at commit {MAIN}, the one its " \
           "run trained with" in caplog.text
    merged = load_file(str(out / "text_encoder" / "model.safetensors"))
    trained = load_file(str(repo / "snapshots" / MAIN / "text_encoder" / "model.safetensors"))
    assert merged.keys() == trained.keys() and all(torch.equal(merged[k], trained[k]) for k in trained)
    entry = json.loads((out / "merged_loras.json").read_text())[0]
    assert (entry["into"], entry["components_revision"], "into_revision" in entry) == (str(file), MAIN, False)
    # the merged single file's card: its parts are the hub id's at MAIN (the name alone loads NEW's)
    single = tmp_path / "single"
    assert main(["export", "--lora", str(run / "lora"), "--merge", "--single-file", "--model", str(file), "--out",
                 str(single)]) == 0
    [merged_file] = single.glob("*.safetensors")
    assert f"- lowmem-alignprop: `--model {merged_file.name} --set model_components={REPO} --set " \
           f"components_revision={MAIN}`." in (single / "README.md").read_text().splitlines()


def _own_cache(files, tmp_path, monkeypatch) -> Path:
    """A copy of the module's hub cache (which stays at MAIN) as the cache, offline."""
    import shutil

    hub = shutil.copytree(files["cache"], tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def _move_main(hub: Path, shift: float) -> Path:
    """The hub's main moved to commit NEW, a copy of MAIN whose text encoder's weights are ``shift`` higher."""
    import shutil

    from safetensors.torch import load_file, save_file

    repo = hub / f"models--{REPO.replace('/', '--')}"
    new = shutil.copytree(repo / "snapshots" / MAIN, repo / "snapshots" / NEW)
    encoder = new / "text_encoder" / "model.safetensors"
    save_file({k: v + shift if v.is_floating_point() else v for k, v in load_file(str(encoder)).items()}, str(encoder))
    (repo / "refs" / "main").write_text(NEW)
    return new

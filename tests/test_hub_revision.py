"""A hub id pinned to a revision (``--set revision=``), and the commit a hub id resolved to recorded with the run.

Offline: a fake Hugging Face cache holds the tiny pipeline under two snapshot commits (the second's UNet weights
scaled), refs/main pointing at the first; huggingface_hub resolves them as it resolves a real cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from lowmem_alignprop.cli import main

REPO = "org/tiny-sd"
MAIN, OTHER = "a" * 40, "b" * 40
FAST = ["--profile", "cpu", "--set", "sample_prompts=0", "--set", "sample_steps=2", "--set", "k=1", "--steps", "1"]
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def _scale_unet(snapshot, factor: float) -> None:
    from safetensors.torch import load_file, save_file

    f = snapshot / UNET_FILE
    weights = load_file(str(f))
    save_file({k: v * factor if k == "conv_in.weight" else v for k, v in weights.items()}, str(f))


@pytest.fixture
def two_commits(tiny_dir, tmp_path, monkeypatch):
    """REPO in a fresh hub cache at commits MAIN (refs/main) and OTHER (conv_in's weights doubled), offline."""
    repo = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}"
    for commit in (MAIN, OTHER):
        shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    _scale_unet(repo / "snapshots" / OTHER, 2.0)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def _conv_in(comps) -> float:
    return comps.unet.conv_in.weight.detach().double().abs().sum().item()


def test_a_hub_id_loads_mains_commit_or_the_pinned_one_and_says_which(two_commits):
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.settings.config import Config

    main_comps = load_components(Config(model=REPO))
    other = load_components(Config(model=REPO, revision=OTHER))
    assert (main_comps.revision, other.revision) == (MAIN, OTHER)
    assert _conv_in(other) == pytest.approx(2 * _conv_in(main_comps), rel=1e-6)


@pytest.fixture
def snapshots_read(monkeypatch):
    """The snapshot folder of every hub id the run reads (DiffusionPipeline.download's answers), by commit."""
    from diffusers import DiffusionPipeline

    read, download = [], DiffusionPipeline.download
    monkeypatch.setattr(DiffusionPipeline, "download", lambda *a, **k: read.append(download(*a, **k)) or read[-1])
    return read


def _record(out) -> dict:
    return json.loads((out / "lora" / "base_model.json").read_text())


def test_a_run_records_the_commit_and_its_lora_samples_that_commit_after_main_moved(two_commits, snapshots_read,
                                                                                    tmp_path, capsys, caplog):
    """Trained on main's commit (recorded in base_model.json and the checkpoint); refs/main then moves to OTHER:
    `sample` and `export --merge` of the LoRA without --model load MAIN's snapshot again, not OTHER's."""
    import logging

    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert main([*FAST, "--model", REPO, "--output-dir", str(out), "--set", "checkpoint_every=1"]) == 0
    assert _record(out)["revision"] == MAIN and _record(out)["model"] == REPO
    state = json.loads(next(out.glob("checkpoints/step-*/state.json")).read_text())
    assert state["fingerprint"]["revision"] == MAIN
    (two_commits / "refs" / "main").write_text(OTHER)  # the hub's main moved on
    snapshots_read.clear()
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main(["sample", *FAST, "--lora", str(out / "lora"), "--num-prompts", "1", "--output-dir",
                     str(tmp_path / "samples")]) == 0
    assert [Path(p).name for p in snapshots_read] == [MAIN]
    assert f"--model not given: sampling {REPO} at commit {MAIN}, the model" in caplog.text
    snapshots_read.clear()
    merged = tmp_path / "merged"
    assert main(["export", "--lora", str(out / "lora"), "--merge", "--out", str(merged)]) == 0
    assert {Path(p).name for p in snapshots_read} == {MAIN}
    base = load_file(str(two_commits / "snapshots" / MAIN / UNET_FILE))["conv_in.weight"]
    assert load_file(str(merged / UNET_FILE))["conv_in.weight"].allclose(base)  # (conv_in has no LoRA: MAIN's own)
    card = (merged / "README.md").read_text()
    assert f"| base model | `{REPO}` at commit `{MAIN}` (lowmem-alignprop: `--set revision={MAIN}`) |" in card
    assert main(["export", "--lora", str(out / "lora"), "--out", str(tmp_path / "lora-card")]) == 0
    card = (tmp_path / "lora-card" / "README.md").read_text()  # the code loads the commit it trained on
    assert f'pipe = DiffusionPipeline.from_pretrained("{REPO}", revision="{MAIN}")' in card.splitlines()
    # the training command, run again after main moved, trains on the same commit (the name alone: OTHER's)
    [trained] = [x for x in card.splitlines() if x.startswith("lowmem-alignprop --")]
    assert trained.endswith(f"--set checkpoint_every=1 --set revision={MAIN}")


def test_a_pinned_revision_is_trained_and_recorded(two_commits, snapshots_read, tmp_path, capsys):
    """--set revision=OTHER trains OTHER's snapshot (refs/main is MAIN), records it and says it in the end box."""
    out = tmp_path / "pinned"
    assert main([*FAST, "--model", REPO, "--set", f"revision={OTHER}", "--output-dir", str(out)]) == 0
    assert [Path(p).name for p in snapshots_read] == [OTHER]
    assert _record(out)["revision"] == OTHER
    assert json.loads((out / "summary.json").read_text())["model_revision"] == OTHER
    assert f"(profile cpu, model {REPO} at commit {OTHER})" in capsys.readouterr().out


def test_a_resume_whose_hub_id_now_resolves_to_other_weights_names_both_commits(two_commits, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FAST, "--model", REPO, "--output-dir", str(out), "--set", "checkpoint_every=1"]) == 0
    (two_commits / "refs" / "main").write_text(OTHER)
    capsys.readouterr()
    assert main([*FAST[:-1], "2", "--model", REPO, "--output-dir", str(out), "--resume", "latest"]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said[-1] == (f"error: checkpoint {next(out.glob('checkpoints/step-*'))} trained on {REPO} at commit {MAIN}, "
                        f"and {REPO} resolves to commit {OTHER} here (its UNet weights differ): resume with --set "
                        f"revision={MAIN} to load the commit it trained on")


def test_a_revision_not_in_the_cache_offline_is_one_line_naming_its_download(two_commits, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FAST, "--model", REPO, "--set", "revision=v2.0", "--output-dir", str(out)]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said == [f"error: model '{REPO}' at revision v2.0 could not be fetched (no network, or HF_HUB_OFFLINE set) "
                    "nor found in the local Hugging Face cache: on a machine with network run `hf download "
                    f"{REPO} --revision v2.0` (into the hub cache; copy that cache here), then run again"]
    assert not out.exists()


@pytest.mark.parametrize("model, what", [("toy", "a model built into the tool"),
                                         ("TINY_DIR", "a local path, not a hub id")])
def test_a_revision_with_a_local_or_shipped_model_is_refused(model, what, tiny_dir, capsys):
    model = str(tiny_dir) if model == "TINY_DIR" else model
    assert main(["plan", "--profile", "cpu", "--model", model, "--set", "revision=main"]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said == [f"error: revision=main pins a hub id's snapshot (OWNER/NAME at a branch, tag or commit), and "
                    f"--model {model} is {what}, which has no revisions: drop --set revision, or give --model as a "
                    "hub id"]


def test_a_damaged_pinned_snapshot_names_the_download_of_its_commit(two_commits, tmp_path, capsys):
    """A part of the pinned commit's snapshot cut short: the line named `hf download org/m --force-download`, which
    fetches main's commit and leaves the pinned one damaged. It names the commit; main's needs no --revision."""
    unet = two_commits / "snapshots" / OTHER / UNET_FILE
    unet.write_bytes(unet.read_bytes()[:4096])
    assert main([*FAST, "--model", REPO, "--set", f"revision={OTHER}", "--output-dir", str(tmp_path / "o")]) == 2
    assert f"run `hf download {REPO} --revision {OTHER} --force-download`, then run again" in capsys.readouterr().err
    unet = two_commits / "snapshots" / MAIN / UNET_FILE  # main's: the plain command fetches it
    unet.write_bytes(unet.read_bytes()[:4096])
    assert main([*FAST, "--model", REPO, "--output-dir", str(tmp_path / "m")]) == 2
    assert f"run `hf download {REPO} --force-download`, then run again" in capsys.readouterr().err


def test_plan_reads_the_pinned_commits_configs_not_mains(two_commits, monkeypatch, capsys):
    """plan's model on meta comes from the pinned snapshot (OTHER's UNet config says another sample_size); a pinned
    commit not in the cache offline names its `hf download --revision`, not a --local-dir folder (which a revision
    refuses)."""
    from lowmem_alignprop.measure import meta_models
    from lowmem_alignprop.settings.config import Config

    config = two_commits / "snapshots" / OTHER / "unet" / "config.json"
    unet = json.loads(config.read_text())
    config.write_text(json.dumps({**unet, "sample_size": 2 * unet["sample_size"]}))
    monkeypatch.setattr(meta_models, "_META_CACHE", {})
    sizes = [meta_models.meta_base(Config(model=REPO, revision=r), torch.float32).unet.config.sample_size
             for r in ("", OTHER, MAIN)]
    assert sizes == [unet["sample_size"], 2 * unet["sample_size"], unet["sample_size"]]
    assert main(["plan", "--profile", "cpu", "--model", REPO, "--set", "revision=v2.0"]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said == [f"error: plan needs the architecture of '{REPO}' at revision v2.0: it is not in the local Hugging "
                    f"Face cache and the hub cannot be reached; on a machine with network run `hf download {REPO} "
                    "--revision v2.0` (into the hub cache; copy that cache here), then run again, or use --model "
                    "sd15|sd21|sdxl|sd35m|sd35l|flux for its architecture, or a local diffusers directory"]


@pytest.mark.parametrize("rank, said", [(0, 1), (1, 0)])
def test_a_resume_whose_hub_id_moved_to_the_same_weights_trains_on_with_one_warning_from_rank_0(
        rank, said, monkeypatch, caplog, tmp_path):
    """Another commit with the same weights (a README change): no refusal; one warning line, said by rank 0 only (as
    every resume warning is: N processes said it N times)."""
    import logging

    from lowmem_alignprop.run import base_fingerprint
    from lowmem_alignprop.settings.config import Config

    fp = {"model": REPO, "unet_config_sha": "x", "conv_in": [0.5, 0.1, 0.2]}
    monkeypatch.setattr(base_fingerprint, "global_rank", lambda: rank)
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        base_fingerprint.check_fingerprint({"fingerprint": {**fp, "revision": MAIN}}, {**fp, "revision": OTHER},
                                           Config(model=REPO), tmp_path / "step-1")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == said
    assert all(x == f"resume: checkpoint {tmp_path / 'step-1'} trained on {REPO} at commit {MAIN}, and {REPO} resolves "
               f"to commit {OTHER} here (the same weights, as far as the fingerprint tells): training goes on; --set "
               f"revision={MAIN} pins the commit it trained on" for x in lines)


def test_profile_auto_tells_the_model_kind_from_the_pinned_commit(tmp_path, monkeypatch):
    """`--profile auto --set revision=SHA` asks the pinned commit what the model is: after `hf download REPO
    --revision SHA` the cache holds that snapshot and no refs/main, and main's files (asked before) told nothing, so
    a FLUX.1 hub id on an 8 GB card got the SD profile rtx3060, not rtx3060-flux."""
    from lowmem_alignprop.settings import profiles
    from lowmem_alignprop.settings.errors import UserError
    from lowmem_alignprop.settings.profiles import resolve_config

    repo = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}"
    (repo / "snapshots" / OTHER).mkdir(parents=True)  # (no refs/main: only the pinned commit was downloaded)
    (repo / "snapshots" / OTHER / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(profiles, "detect_card", lambda: ("NVIDIA GeForce RTX 3060 Laptop GPU", 8.0))
    name, cfg = resolve_config("auto", {"model": REPO}, [f"revision={OTHER}"])
    assert (name, cfg.revision) == ("rtx3060-flux", OTHER)
    assert resolve_config("auto", {"model": REPO}, [])[0] == "rtx3060"  # main: not in the cache, nothing told
    # an error under a profile made for other models is led by that line: of the pinned commit's model too
    error = UserError("block_swap=4 ...")
    assert str(profiles.under_profile("rtx3060", REPO, "", error, OTHER)) == (
        "profile rtx3060 is made for SD 1.x/2.x, not FLUX.1; for FLUX.1 on rtx3060-class cards: --profile rtx3060-flux "
        "(7.5 GiB budget) or --profile rtx3060-12gb-flux (11 GiB budget); under rtx3060: block_swap=4 ...")
    assert profiles.under_profile("rtx3060", REPO, "", error) is error


def test_a_plans_estimate_cache_keys_a_pinned_hub_id_by_its_commit(two_commits, tmp_path, monkeypatch):
    """The estimate cache tells a hub id apart by the commit its snapshot holds: with --set revision, the pinned
    one's, not main's. A branch (or tag) pinned was keyed by main's commit: after it moved to other weights a plan
    read the estimate of the commit it named before; a commit pinned and main not in the cache was not kept."""
    from lowmem_alignprop.measure import estimate_cache, planner
    from lowmem_alignprop.settings.config import Config

    monkeypatch.setenv("LOWMEM_ALIGNPROP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(estimate_cache.CACHE_ENV, "on")
    (two_commits / "refs" / "dev").write_text(MAIN)

    def key(revision):
        cfg = Config(model=REPO, revision=revision, resolution=64, sample_steps=2, k=1, budget_gb=8.0).validate()
        return estimate_cache.key(cfg, planner._memo_key(cfg, "cuda", ["a cat"])), cfg

    def plan(revision):
        return planner.estimate(key(revision)[1], target="cuda", prompts=["a cat"])

    dev_at_main = key("dev")[0]
    assert dev_at_main is not None and (bool(plan("dev").cached), bool(plan("dev").cached)) == (False, True)
    (two_commits / "refs" / "dev").write_text(OTHER)  # the branch moved to another commit
    assert key("dev")[0] not in (None, dev_at_main) and not plan("dev").cached  # (was: A's estimate read for B)
    (two_commits / "refs" / "main").unlink()  # a commit pinned, main not in the cache: kept by its commit
    assert key(OTHER)[0] is not None


def test_a_lora_of_a_pinned_commit_given_its_hub_id_by_name_is_told_the_commit_not_the_name(two_commits, tmp_path,
                                                                                           capsys, caplog):
    """Trained at OTHER (pinned), main at MAIN (other weights): `--model REPO` loads main's. The lines named
    `--model REPO` as the fix, the flag just given; they name the commit (sample: --set revision; export takes none:
    leave --model out). A merge records the commit it went into, which the refusal of its LoRA on it names."""
    import logging

    out, merged = tmp_path / "run", tmp_path / "merged"
    assert main([*FAST, "--model", REPO, "--set", f"revision={OTHER}", "--output-dir", str(out)]) == 0
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main(["sample", *FAST, "--lora", str(out / "lora"), "--model", REPO, "--num-prompts", "1",
                     "--output-dir", str(tmp_path / "s")]) == 0
    assert [r.getMessage() for r in caplog.records if "was trained on base model" in r.getMessage()] == [
        f"--lora {out / 'lora'} was trained on base model '{REPO}' at commit {OTHER}, and its UNet weights differ "
        f"from --model '{REPO}' here: the images show it on another model; pass --model {REPO} --set "
        f"revision={OTHER} to see what training did"]
    capsys.readouterr()
    assert main(["export", "--lora", str(out / "lora"), "--merge", "--model", REPO, "--out", str(merged)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --merge: {out / 'lora'} was trained on base model '{REPO}', and its UNet weights differ in "
        f"'{REPO}': merge it into the model it was trained on (leave --model out: it loads {REPO} at commit {OTHER})"]
    assert main(["export", "--lora", str(out / "lora"), "--merge", "--out", str(merged)]) == 0
    assert json.loads((merged / "merged_loras.json").read_text())[0]["into_revision"] == OTHER
    capsys.readouterr()
    assert main(["sample", *FAST, "--lora", str(out / "lora"), "--model", str(merged), "--num-prompts", "1",
                 "--output-dir", str(tmp_path / "s2")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"applies it twice; pass --model {REPO} --set revision={OTHER}, the model it was merged into")


def test_sampling_a_pinned_hub_id_alone_records_the_commit_it_scored(two_commits, tmp_path):
    """sample_results.json names the commit sampled (as summary.json's model_revision does for a run): the pinned
    one, not main's."""
    out = tmp_path / "s"
    assert main(["sample", *FAST, "--model", REPO, "--set", f"revision={OTHER}", "--num-prompts", "1",
                 "--output-dir", str(out)]) == 0
    results = json.loads((out / "sample_results.json").read_text())
    assert (results["model"], results["model_revision"], results["loras"]) == (REPO, OTHER, [])
    from outputs_doc import DOC, documented_keys, undocumented

    assert undocumented(results, documented_keys(DOC.read_text())["sample_results.json"]) == []


VAE_FILE = "vae/diffusion_pytorch_model.safetensors"


def _vae_weight(vae) -> float:
    return vae.decoder.conv_out.weight.detach().double().abs().sum().item()


def test_a_hub_vae_is_recorded_and_its_loras_sample_merge_and_resume_load_that_commit_after_main_moved(
        two_commits, tiny_dir, tmp_path, monkeypatch, capsys, caplog):
    """--set vae=OWNER/NAME (here a pipeline's repository: its vae/) trained on main's commit MAIN, recorded in
    base_model.json (vae_revision); main then moved to OTHER, whose VAE decodes otherwise. `sample` and `export
    --merge` of the LoRA loaded OTHER's VAE in silence, and a resume too: they load MAIN's (sample says it), a resume
    is refused naming both commits and --set vae_revision, which then resumes."""
    import logging

    from diffusers import AutoencoderKL
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    assert main([*FAST, "--model", str(tiny_dir), "--set", f"vae={REPO}", "--set", "checkpoint_every=1",
                 "--output-dir", str(out)]) == 0
    assert _record(out)["vae_revision"] == MAIN and "revision" not in _record(out)
    vae = two_commits / "snapshots" / OTHER / VAE_FILE
    save_file({k: 2 * v if k == "decoder.conv_out.weight" else v for k, v in load_file(str(vae)).items()}, str(vae))
    (two_commits / "refs" / "main").write_text(OTHER)
    loaded, from_pretrained = [], AutoencoderKL.from_pretrained
    monkeypatch.setattr(AutoencoderKL, "from_pretrained",
                        lambda *a, **k: loaded.append(from_pretrained(*a, **k)) or loaded[-1])
    main_vae = _vae_weight(from_pretrained(str(two_commits / "snapshots" / MAIN), subfolder="vae"))
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main(["sample", *FAST, "--lora", str(out / "lora"), "--num-prompts", "1", "--output-dir",
                     str(tmp_path / "s")]) == 0
    assert loaded and all(_vae_weight(v) == pytest.approx(main_vae, rel=1e-6) for v in loaded)  # (OTHER's: 2x)
    assert f"as its run did: vae={REPO} vae_revision={MAIN}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main(["export", "--lora", str(out / "lora"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert f"--merge: the merged model decodes with the VAE its run trained with, {REPO} at commit {MAIN}" \
        in caplog.text
    merged = load_file(str(tmp_path / "merged" / VAE_FILE))["decoder.conv_out.weight"]
    assert merged.allclose(load_file(str(two_commits / "snapshots" / MAIN / VAE_FILE))["decoder.conv_out.weight"])
    entry = json.loads((tmp_path / "merged" / "merged_loras.json").read_text())[0]
    assert (entry["vae_revision"], "components_revision" in entry) == (MAIN, False)  # (the commit its VAE came from)
    # the card: a row with the VAE's commit, the code loading that commit's VAE, the training command pinning it
    assert main(["export", "--lora", str(out / "lora"), "--out", str(tmp_path / "exported")]) == 0
    card = (tmp_path / "exported" / "README.md").read_text().splitlines()
    assert f"| VAE | `{REPO}` at commit `{MAIN}` (lowmem-alignprop: `--set vae={REPO} --set vae_revision={MAIN}`) |" \
        in card
    assert f"pipe.vae = AutoencoderKL.from_pretrained(\"{REPO}\", subfolder=\"vae\", revision=\"{MAIN}\")  # the VAE " \
           "it trained with" in card
    [trained] = [x for x in card if x.startswith("lowmem-alignprop --")]
    assert trained.endswith(f"--set vae_revision={MAIN}") and trained.count("vae_revision") == 1
    capsys.readouterr()
    assert main([*FAST[:-1], "2", "--output-dir", str(out), "--resume", "latest"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: checkpoint {next(out.glob('checkpoints/step-*'))} trained with vae={REPO} at commit {MAIN}, and "
        f"{REPO} resolves to commit {OTHER} here (its VAE weights differ: vae/diffusion_pytorch_model.safetensors): "
        f"resume with --set vae_revision={MAIN} to load the commit it trained on")
    assert main([*FAST[:-1], "2", "--output-dir", str(out), "--resume", "latest", "--set", f"vae_revision={MAIN}"]) == 0


@pytest.mark.parametrize("pin, given, said", [
    ("vae_revision", [], "vae is empty"),
    ("vae_revision", ["vae=TINY_DIR"], "vae=TINY_DIR is a local path, not a hub id"),
    ("components_revision", [], "model_components is empty")])
def test_a_components_or_vae_revision_without_a_hub_id_to_pin_is_refused(pin, given, said, tiny_dir, capsys):
    field = pin.replace("_revision", "") if pin == "vae_revision" else "model_components"
    flags = [x for g in given for x in ("--set", g.replace("TINY_DIR", f"{tiny_dir}/vae"))]
    assert main(["plan", "--profile", "cpu", "--model", "tiny", *flags, "--set", f"{pin}=main"]) == 2
    said = said.replace("TINY_DIR", f"{tiny_dir}/vae")
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {pin}=main pins a hub id {field}'s snapshot (OWNER/NAME at a branch, tag or commit), and {said}, "
        f"which has no revisions: drop --set {pin}, or give {field} as a hub id"]


def test_a_card_training_command_pins_the_commit_where_its_start_gave_a_branch():
    """A start typed with `--set revision=main` (a branch: it moves) trained on commit C: the card's command, run
    again after main moved, trained on main's new commit (the pin was said given and left as typed). Each branch
    or empty pin now names the recorded commit; a commit (or its short form, 7+ hex digits) is kept as typed."""
    from lowmem_alignprop.lora.model_card import pinned_command

    commit, vae = "a" * 39 + "1", "b" * 40
    pins = {"revision": commit, "vae_revision": vae}
    typed = "lowmem-alignprop --model o/n --set revision=main --set=vae_revision= --steps 2"
    assert pinned_command(typed, pins) == \
        f"lowmem-alignprop --model o/n --set revision={commit} --set=vae_revision={vae} --steps 2"
    kept = f"lowmem-alignprop --model o/n --set revision={commit[:7]} --set 'prompts=my prompts.txt'"
    assert pinned_command(kept, pins) == f"{kept} --set vae_revision={vae}"
    assert pinned_command("lowmem-alignprop --resume latest --set revision=main", pins) == \
        "lowmem-alignprop --resume latest --set revision=main"  # (a resume takes its run's config)


def test_a_resume_whose_hub_vae_moved_to_the_same_weights_or_gone_warns_naming_the_pin(tmp_path, monkeypatch,
                                                                                         caplog):
    """check_vae_revision's warnings (the refusal is tested above): a pipeline repository's vae/ linked to the same
    blob at both commits trains on with one line naming --set vae_revision=<trained commit>; the trained commit gone
    from the cache, the line says its VAE could not be compared."""
    import logging
    from types import SimpleNamespace

    from lowmem_alignprop.run.base_fingerprint import check_vae_revision

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    was, now = "a" * 40, "b" * 40
    snapshots = tmp_path / "models--o--v" / "snapshots"
    (tmp_path / "blob").write_bytes(b"weights")
    for commit in (was, now):
        (snapshots / commit / "vae").mkdir(parents=True)
        (snapshots / commit / "vae" / "diffusion_pytorch_model.safetensors").symlink_to(tmp_path / "blob")
    state, cfg = {"fingerprint": {"vae_revision": was}, "config": {"vae": "o/v"}}, SimpleNamespace(vae="o/v")
    said = f"resume: checkpoint ck trained with vae=o/v at commit {was}, and o/v resolves to commit {now} here"
    for note in ("the same VAE weights", f"commit {was} is not in the local Hugging Face cache: its VAE could not "
                 "be compared"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
            check_vae_revision(state, {"vae_revision": now}, cfg, Path("ck"))
        assert [r.getMessage() for r in caplog.records] == [
            f"{said} ({note}): training goes on with its VAE; --set vae_revision={was} loads the commit it trained on"]
        shutil.rmtree(snapshots / was, ignore_errors=True)  # (the second: gone)
    check_vae_revision(state, {"vae_revision": was}, cfg, Path("ck"))  # (the same commit: nothing to say)
    assert len(caplog.records) == 1

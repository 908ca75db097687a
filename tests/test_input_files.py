"""A vae or reward_weights file replaced at the same path between a run's start and its resume: the resume rules
compared the settings (the same path) and went on as if nothing changed - the summary compared rewards of another
VAE's images (or of other reward weights) with the first steps', best/ and the early stop compared them with the
earlier evaluations, and the images before training were read back as the old VAE decoded them. Each checkpoint now
keeps the files' content digests (run/input_files.py); a file touched or copied again with the same content is the
same file."""

import json
import logging
import os
import shutil
import sys

import torch

from lowmem_alignprop.cli import main
from lowmem_alignprop.run import input_files
from lowmem_alignprop.settings.config import Config

FAST = ["--profile", "cpu", "--seed", "3", "--set", "sample_prompts=1", "--set", "sample_steps=3", "--set", "k=1",
        "--set", "batch_size=1"]


def _save_vae(tiny_dir, folder, bias):
    """The tiny model's VAE with its last conv's bias set to ``bias`` (brighter or darker images), saved in
    ``folder``."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_dir / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(bias)
    shutil.rmtree(folder, ignore_errors=True)
    vae.save_pretrained(folder)


def test_a_vae_replaced_at_its_path_is_told_at_a_resume_and_the_same_one_touched_is_not(tmp_path, tiny_dir, caplog):
    vae, run, reward = tmp_path / "vae", tmp_path / "run", tmp_path / "bright.py"
    (tmp_path / "eval.txt").write_text("a night sky\na dark cave\n")
    reward.write_text("def score(images):\n    return images.mean(dim=(1, 2, 3))\n")
    _save_vae(tiny_dir, vae, -1.0)
    args = [*FAST, "--set", f"vae={vae}", "--output-dir", str(run), "--eval-every", "1", "--early-stop", "3",
            "--set", f"eval_prompts={tmp_path / 'eval.txt'}", "--reward", f"{reward}:score"]
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    assert main([*args, "--steps", "1"]) == 0
    for f in vae.rglob("*"):  # the same files touched (a copy again, a sync): the same VAE
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    caplog.clear()
    assert main([*args, "--steps", "2", "--resume", "latest"]) == 0
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "changed since the checkpoint" in m], said
    assert [m for m in said if m.startswith("the images before training: read back")]
    _save_vae(tiny_dir, vae, 1.0)  # another VAE at the same path, and the reward's source edited (the same scores)
    reward.write_text("def score(images):\n    return images.mean(dim=(1, 2, 3)) * 1.0\n")
    for name in [n for n in sys.modules if n.startswith("lowmem_alignprop_user_reward_bright_")]:
        del sys.modules[name]  # (a process loads a reward file once: the next command's process reads it again)
    caplog.clear()
    assert main([*args, "--steps", "3", "--resume", "latest"]) == 0
    said = [r.getMessage() for r in caplog.records]
    changed = [m for m in said if "changed since the checkpoint" in m]
    assert changed[1] == (f"resume: the file of vae={vae} changed since the checkpoint: the images decode otherwise "
                          "(the summary compares its steps from step 3 on)"), changed
    assert changed[0].startswith(f"resume: the source of --reward {reward}:score changed since the checkpoint")
    assert "evaluation's reward's source, vae file changed" in changed[2], changed
    assert "best/ and the early stop's patience start over" in changed[2], changed
    assert not [m for m in said if m.startswith("the images before training: read back")]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["reward_mean"] for r in rows[:2]) < min(r["reward_mean"] for r in rows[2:])  # (brighter: it told)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["reward_since_step"] == 3 and summary["best_step"] == 3
    was, now = summary["resume_changes"][0]["changes"]["vae_file"]  # (the touch was no change)
    assert [(c["step"], sorted(c["changes"])) for c in summary["resume_changes"]] == [
        (3, ["reward_source", "vae_file"])] and was != now
    assert main(["export", "--lora", str(run / "lora"), "--out", str(tmp_path / "card")]) == 0
    source_was, source_now = summary["resume_changes"][0]["changes"]["reward_source"]
    assert (f"| changed by a resume | from step 3: the reward's source, changed at the same path (digest {source_now}, "
            f"was {source_was}), the vae file, changed at the same path (digest {now}, was {was}) |") \
        in (tmp_path / "card" / "README.md").read_text()
    # the finished run's outputs written again (lora/ lost) after the VAE was replaced once more: said, yet no step
    # trains with it - it was recorded as a change from step 4 (a step never trained), the summary's reward figures
    # went empty (no step since 4) and best/ and the patience started over
    _save_vae(tiny_dir, vae, 0.5)
    shutil.rmtree(run / "lora")
    caplog.clear()
    assert main([*args, "--steps", "3", "--resume", "latest"]) == 0
    said = [r.getMessage() for r in caplog.records if "changed since the checkpoint" in r.getMessage()]
    assert said == [f"resume: the file of vae={vae} changed since the checkpoint: the images decode otherwise (no step "
                    "is left to train: the outputs written again are made with it, the run's records keep its trained "
                    "steps')"], said
    again = json.loads((run / "summary.json").read_text())
    assert again["resume_changes"] == summary["resume_changes"] and again["reward_since_step"] == 3
    assert again["best_step"] == 3 and again["reward_last"] == summary["reward_last"] is not None


def test_the_card_names_each_file_a_resume_found_changed():
    """The card's "changed by a resume" row says each kind of file changed at its path (the reward's source,
    tests/test_resume.py's edited reward file, among them) by its digests, not as a --set of a setting."""
    from lowmem_alignprop.lora.model_card import resume_change
    from lowmem_alignprop.run.resume_rules import REPLACED

    said = {name: resume_change(name, ["0123", "4567"], lambda n, v: v) for name in REPLACED}
    assert said == {"reward_source": "the reward's source, changed at the same path (digest 4567, was 0123)",
                    "vae_file": "the vae file, changed at the same path (digest 4567, was 0123)",
                    "reward_weights_file": "the reward_weights file, changed at the same path (digest 4567, was 0123)"}


def test_reward_weights_are_told_by_content_and_a_same_stat_file_is_not_read_again(tmp_path, monkeypatch):
    """A reward_weights folder: the same content under a new time is the same; another content at the same path is
    replaced; a hub id, an empty setting or a path not there has no record; a file whose stat the checkpoint's record
    matches is not read again."""
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "mlp.safetensors").write_bytes(b"a" * 100)
    cfg = Config(reward_weights=str(weights), vae="org/vae")
    first = input_files.identities(cfg)
    assert list(first) == ["reward_weights"] and first["reward_weights"]["value"] == str(weights)
    (weights / "mlp.safetensors").write_bytes(b"a" * 100)  # written again: a new time, the same content
    again = input_files.identities(cfg, first)
    assert again["reward_weights"]["stat"] != first["reward_weights"]["stat"]
    assert input_files.replaced(first, again) == []
    (weights / "mlp.safetensors").write_bytes(b"b" * 100)
    os.utime(weights / "mlp.safetensors", ns=(0, 10**9))
    other = input_files.identities(cfg, again)
    assert input_files.replaced(again, other) == ["reward_weights"]
    assert input_files.replaced(again, input_files.identities(Config(reward_weights=str(tmp_path)), again)) == []
    monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read again")))
    assert input_files.identities(cfg, other) == other  # (the stat matches: no read)
    assert input_files.identities(Config(reward_weights="", vae=str(tmp_path / "gone"))) == {}


def test_the_files_told_are_those_read_through_a_pipeline_folder_a_linked_folder_and_each_reward_weights_part(tmp_path):
    """vae= a pipeline's folder is read from its vae/ alone (load_vae): its unet/ was hashed too (gigabytes at each
    start, and a replaced unet told as "the vae file changed"); a folder linked into it (a hub snapshot's, a shared
    models folder's) was not followed, so its files went untold; and a reward_weights given per reward
    ('aesthetic=PATH;clip=PATH') or as aesthetic's 'HEAD_FILE,CLIP_DIR' named no path, so nothing was told."""
    pipe, shared, head = tmp_path / "pipe", tmp_path / "shared_vae", tmp_path / "head.pth"
    (pipe / "unet").mkdir(parents=True)
    shared.mkdir()
    (pipe / "unet" / "model.safetensors").write_bytes(b"u" * 10)
    (shared / "config.json").write_text("{}")
    (shared / "diffusion_pytorch_model.safetensors").write_bytes(b"v" * 10)
    (pipe / "vae").symlink_to(shared, target_is_directory=True)
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "model.safetensors").write_bytes(b"c" * 10)
    head.write_bytes(b"h" * 10)
    keyed = f"aesthetic={head},{tmp_path / 'clip'};clip={tmp_path / 'clip'}"
    cfg = Config(vae=str(pipe), reward_weights=keyed)
    first = input_files.identities(cfg)
    assert [s[0] for s in first["vae"]["stat"]] == ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert [s[0] for s in first["reward_weights"]["stat"]] == [
        str(head), f"{tmp_path / 'clip'}/model.safetensors", f"{tmp_path / 'clip'}/model.safetensors"]
    (pipe / "unet" / "model.safetensors").write_bytes(b"U" * 10)  # not the VAE's: no change of it
    (shared / "diffusion_pytorch_model.safetensors").write_bytes(b"V" * 10)
    head.write_bytes(b"H" * 10)
    assert input_files.replaced(first, input_files.identities(cfg, first)) == ["vae", "reward_weights"]
    single = tmp_path / "clip"  # one path: the record's form is as before (a checkpoint's record goes on matching)
    assert input_files.identities(Config(reward_weights=str(single)))["reward_weights"]["stat"] == [
        ["model.safetensors", 10, (single / "model.safetensors").stat().st_mtime_ns]]

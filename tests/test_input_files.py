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

import torch

from lowmem_alignprop.cli import main
from lowmem_alignprop.run import input_files
from lowmem_alignprop.settings.config import Config

FAST = ["--profile", "cpu", "--seed", "3", "--set", "sample_prompts=1", "--set", "sample_steps=3", "--set", "k=1",
        "--set", "batch_size=1", "--reward", "brightness"]


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
    vae, run = tmp_path / "vae", tmp_path / "run"
    (tmp_path / "eval.txt").write_text("a night sky\na dark cave\n")
    _save_vae(tiny_dir, vae, -1.0)
    args = [*FAST, "--set", f"vae={vae}", "--output-dir", str(run), "--eval-every", "1", "--early-stop", "3",
            "--set", f"eval_prompts={tmp_path / 'eval.txt'}"]
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    assert main([*args, "--steps", "1"]) == 0
    for f in vae.rglob("*"):  # the same files touched (a copy again, a sync): the same VAE
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    caplog.clear()
    assert main([*args, "--steps", "2", "--resume", "latest"]) == 0
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "changed since the checkpoint" in m], said
    assert [m for m in said if m.startswith("the images before training: read back")]
    _save_vae(tiny_dir, vae, 1.0)  # another VAE at the same path
    caplog.clear()
    assert main([*args, "--steps", "3", "--resume", "latest"]) == 0
    said = [r.getMessage() for r in caplog.records]
    changed = [m for m in said if "changed since the checkpoint" in m]
    assert changed[0] == (f"resume: the file of vae={vae} changed since the checkpoint: the images decode otherwise "
                          "(the summary compares its steps from step 3 on)"), changed
    assert "vae file" in changed[1] and "best/ and the early stop's patience start over" in changed[1], changed
    assert not [m for m in said if m.startswith("the images before training: read back")]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["reward_mean"] for r in rows[:2]) < min(r["reward_mean"] for r in rows[2:])  # (brighter: it told)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["reward_since_step"] == 3 and summary["best_step"] == 3


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

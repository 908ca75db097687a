"""The images before training are rendered once per run: a resume with the same settings reads them back from
samples/before.safetensors (a large model's sample grid costs minutes at every start), one that changed how they are
made renders them again, and a damaged file costs a render, not the run."""

import json
import logging

import pytest
from safetensors import safe_open

from lowmem_alignprop.cli import main
from lowmem_alignprop.training.train_samples import RunSamples
from lowmem_alignprop.run.filenames import BEFORE_FILE, GRID_RECORD, SAMPLES_DIR

# the toy world (the default model): two sample prompts and eight judged images, so both kinds are kept
FAST = ["--model", "toy", "--profile", "cpu", "--seed", "2", "--set", "sample_prompts=2", "--set", "sample_steps=3",
        "--set", "k=1", "--set", "batch_size=1", "--set", "fidelity_images=8", "--checkpoint-every", "1"]


def _before(run) -> list[float]:
    return [image["reward_before"] for image in json.loads((run / SAMPLES_DIR / GRID_RECORD).read_text())["images"]]


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """A run of one step, its images before training kept; its grid's "before" rewards and judged figures."""
    run = tmp_path_factory.mktemp("before") / "run"
    assert main([*FAST, "--steps", "1", "--output-dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    return run, _before(run), summary["toy_world"]["before"]


AFTER = ["render_samples", "judge"]  # the after samples and judged images: every start that ends the run renders them


def _renders(monkeypatch) -> list[str]:
    """Every render of fixed-seed images without gradient, by kind (before training and after)."""
    calls = []
    for name in ("render_samples", "judge"):
        original = getattr(RunSamples, name)
        monkeypatch.setattr(RunSamples, name, lambda self, _o=original, _n=name: calls.append(_n) or _o(self))
    return calls


def _resume(started, tmp_path, *extra):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(started[0], run)
    assert main(["--resume", "latest", "--output-dir", str(run), "--steps", "2", *extra]) == 0
    return run


def test_a_resume_reads_the_images_before_training_back(started, tmp_path, monkeypatch, caplog):
    _, before, judged = started
    with safe_open(str(started[0] / SAMPLES_DIR / BEFORE_FILE), "pt") as f:
        assert sorted(f.keys()) == ["images", "rewards"] and f.get_slice("images").get_shape()[0] == 2
        assert f.get_slice("images").get_dtype() == "U8"  # (the grid's pixels: 3 bytes a pixel, not 12)
    renders = _renders(monkeypatch)
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        run = _resume(started, tmp_path)
    assert renders == AFTER, renders  # before training: neither the grid's images nor the judged ones rendered again
    assert "the images before training: read back from samples/before.safetensors (the run's start rendered " \
           "them)" in caplog.messages
    assert _before(run) == before  # the after grid's "before" row: the same rewards (and pixels, 8-bit as the PNG)
    assert json.loads((run / "summary.json").read_text())["toy_world"]["before"] == judged


def test_a_resume_that_changes_how_the_images_are_made_renders_them_again(started, tmp_path, monkeypatch):
    renders = _renders(monkeypatch)
    run = _resume(started, tmp_path, "--set", "sample_steps=4")
    assert renders == ["render_samples", "judge", *AFTER], renders
    assert _before(run) != started[1]  # 4 steps: other images
    renders.clear()
    assert main(["--resume", "latest", "--output-dir", str(run), "--steps", "3"]) == 0
    assert renders == AFTER, renders  # the file kept now is of the 4-step images


def test_a_damaged_file_is_said_and_the_images_are_rendered_again(started, tmp_path, monkeypatch, caplog):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(started[0], run)
    kept = run / SAMPLES_DIR / BEFORE_FILE
    kept.write_bytes(kept.read_bytes()[:100])  # (cut short: a disk that lost its tail)
    renders = _renders(monkeypatch)
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main(["--resume", "latest", "--output-dir", str(run), "--steps", "2"]) == 0
    assert renders == ["render_samples", "judge", *AFTER], renders
    said = "): the images before training are rendered again"
    assert any(m.startswith(f"{kept} cannot be read (") and m.endswith(said) for m in caplog.messages), caplog.messages
    assert _before(run) == started[1]  # the same images, rendered


def test_a_full_disk_while_the_images_are_kept_is_said_and_costs_only_a_render(tmp_path, caplog):
    """safetensors says a failed write (a full disk, a file-size limit) in a SafetensorError of its own, not an
    OSError: the run's start died of it. It is said in one line; the earlier file and no temporary one stay."""
    import resource
    import signal

    import torch

    from lowmem_alignprop.run import atomic
    from lowmem_alignprop.run.before_images import read_before, write_before

    path = tmp_path / SAMPLES_DIR / BEFORE_FILE
    images = torch.rand(2, 3, 64, 64), torch.tensor([0.5, 0.25])
    write_before(path, "a", images, {"reward": 0.5}, {"samples": 1.0})
    limit, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))  # (a real limit: the write itself fails)
    try:
        with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
            write_before(path, "b", images, {"reward": 0.5}, {"samples": 1.0})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert caplog.messages == ["the images before training were not kept for a resume (File too large): it renders "
                               "them again"]
    assert read_before(path, "a")["judged"] == {"reward": 0.5} and atomic.leftovers(tmp_path) == []


def test_a_reward_file_edited_before_a_resume_scores_the_images_before_training_again(tmp_path, monkeypatch):
    """The same --reward whose file was edited since (a fix of a failure, as its line invites) is another reward, as
    the resume's own rule counts it (rewards.reward_source_digest): the kept "before" rewards were the old file's
    (x100), beside "after" rewards of the new one. The images are rendered and scored again."""
    import sys

    reward = tmp_path / "mine.py"
    reward.write_text("def score(images):\n    return images.mean(dim=(1, 2, 3)) * 100\n")
    run = tmp_path / "run"
    args = [*FAST, "--reward", f"{reward}:score", "--output-dir", str(run)]
    assert main([*args, "--steps", "1"]) == 0
    assert min(_before(run)) > 1
    reward.write_text("def score(images):\n    return images.mean(dim=(1, 2, 3))\n")
    for name in [n for n in sys.modules if n.startswith("lowmem_alignprop_user_reward_mine_")]:
        del sys.modules[name]  # (a process loads a reward file once: the next command's process reads it again)
    renders = _renders(monkeypatch)
    assert main([*args, "--steps", "2", "--resume", "latest"]) == 0
    assert renders == ["render_samples", "judge", *AFTER], renders
    assert max(_before(run)) < 1  # the new file's scores of the images before training


def test_a_resume_under_other_software_renders_the_images_before_training_again(started, tmp_path, monkeypatch):
    """Another diffusers (its schedulers' steps) or another device renders other images: the resume records the
    change (run/software.py), and its "before" row is what this software renders, not what the old one did."""
    from lowmem_alignprop.run import software

    real = software.library_versions
    monkeypatch.setattr(software, "library_versions", lambda *a: {**real(*a), "diffusers": "99.0"})
    renders = _renders(monkeypatch)
    _resume(started, tmp_path)
    assert renders == ["render_samples", "judge", *AFTER], renders


def test_a_resume_that_changes_only_how_training_goes_reads_the_images_back_as_rendered(started, tmp_path,
                                                                                        monkeypatch):
    """lr, K, --sample-every: what only training reads (settings.config.TRAINING_ONLY) leaves the untrained LoRA's
    images as they were, so they are read back (each such change cost a large model's render at every start); and
    the grids drawn from them (--sample-every's, before_after.png) are pixel for pixel a fresh render's."""
    import shutil

    from PIL import Image

    changes = ["--set", "lr=0.002", "--set", "k=2", "--sample-every", "1", "--set", "kl_coeff=0.1"]
    renders = _renders(monkeypatch)
    run = _resume(started, tmp_path, *changes)
    assert renders == AFTER, renders  # (step 2's grid is the after one: rendered once)
    fresh = tmp_path / "fresh"
    shutil.copytree(started[0], fresh)
    (fresh / SAMPLES_DIR / BEFORE_FILE).unlink()
    assert main(["--resume", "latest", "--output-dir", str(fresh), "--steps", "2", *changes]) == 0
    for name in ("step-000002.png", "before_after.png"):
        ours, theirs = (Image.open(r / SAMPLES_DIR / name) for r in (run, fresh))
        assert ours.tobytes() == theirs.tobytes(), name
    assert _before(run) == _before(fresh) == started[1]


def test_the_time_left_counts_the_renders_after_training_at_the_start_and_at_a_resume(started, tmp_path,
                                                                                        monkeypatch):
    """The time each render before training took is kept with the images (metadata ``seconds``); the time left the
    step lines say counts the renders after training as that long, at a resume that read the images back too."""
    from lowmem_alignprop.training.train import Trainer

    kept = started[0] / SAMPLES_DIR / BEFORE_FILE
    with safe_open(str(kept), "pt") as f:
        seconds = json.loads(f.metadata()["seconds"])
    assert sorted(seconds) == ["judged", "samples"] and all(s > 0 for s in seconds.values())
    closing = []
    original = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: closing.append(self.time_left.closing) or original(self))
    _resume(started, tmp_path)
    assert closing == [pytest.approx(seconds["samples"] + seconds["judged"], rel=1e-12)]

"""Metrics and the sample grid reach accelerate's trackers (--report-to tensorboard)."""

import json

import pytest

from lowmem_alignprop.cli import main


def test_tensorboard_gets_metrics_and_sample_grid(tmp_path, tiny_dir, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--output-dir", str(out), "--steps", "3", "--report-to", "tensorboard",
                 "--set", "sample_prompts=2", "--set", "sample_steps=3", "--set", "k=1", "--set", "batch_size=1",
                 "--checkpoint-every", "1", "--reward", "colorfulness:1,brightness:0.5"]) == 0
    printed = capsys.readouterr().out
    assert f"        logs/ (tensorboard --logdir {out}/logs)\n" in printed  # the box says where
    steps = [line for line in printed.splitlines() if line.startswith("step ")]
    assert len(steps) == 3 and all(line.endswith(" s left") for line in steps[:2])  # for a log file: time left
    assert not steps[2].endswith("left")
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events, list(out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "train/reward_mean" in tags["scalars"] and "train/loss" in tags["scalars"]
    assert [e.step for e in acc.Scalars("train/reward_mean")] == [1, 2, 3]
    assert "samples/before_after" in tags["images"]
    img = acc.Images("samples/before_after")[0]
    assert img.width > 100 and img.height > 100
    # each term of a combined reward is a curve (they were in metrics.jsonl only); the step is the x axis, no curve
    assert {"reward_terms/colorfulness", "reward_terms/brightness"} <= set(tags["scalars"])
    assert not [t for t in tags["scalars"] if t.endswith("step")]
    # a resume from step 2 (another branch, or a killed run's older checkpoint): its step 3 replaces the first one's,
    # as in metrics.jsonl (TensorBoard drew both, one curve that went back)
    assert main(["--resume", str(out / "checkpoints" / "step-00000002"), "--steps", "3", "--set", "lr=0.05"]) == 0
    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0})
    acc.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e.step, e.value) for e in acc.Scalars("train/reward_mean")] == [
        (r["step"], pytest.approx(r["reward_mean"], rel=1e-6)) for r in rows]


@pytest.mark.parametrize("tracker, package", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_tracker_whose_package_is_missing_is_refused_before_anything_loads(tracker, package, tmp_path, capsys,
                                                                              monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in (package, "tensorboardX") else real(name, *a))
    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--output-dir", str(out), "--report-to", tracker]) == 2
    err = capsys.readouterr().err
    assert f"--report-to {tracker} needs the {package} package, which is not installed" in err
    assert f'pip install -e ".[{tracker}]"' in err and err.count("\n") == 1
    assert not out.exists()


FAKE_WANDB = '''
import json, os
calls = []

class _Config:
    def update(self, values, allow_val_change=False):
        pass

config = _Config()

class Image:
    def __init__(self, data):
        self.shape = getattr(data, "shape", None)

class _Run:
    def log(self, values, step=None, **kwargs):
        calls.append(("log", sorted(values), step))
    def finish(self):
        calls.append(("finish",))

def init(project=None, **kwargs):
    calls.append(("init", project, kwargs))
    os.makedirs(os.path.join(kwargs.get("dir") or ".", "wandb"), exist_ok=True)
    return _Run()
'''


def test_wandb_writes_its_run_files_in_the_run_folder(tmp_path, tiny_dir, capsys, monkeypatch):
    """--report-to wandb wrote its files into the working directory's ./wandb, which the box did not name: wandb.init
    is given the run's logs/ (wandb adds wandb/), unless WANDB_DIR says where; the box names it. (A stand-in for
    the wandb package records the calls accelerate makes.)"""
    import sys

    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "wandb.py").write_text(FAKE_WANDB)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    from accelerate import tracking
    from accelerate.utils import LoggerType

    # accelerate lists the trackers whose packages it found installed when it was imported
    monkeypatch.setattr(tracking, "_available_trackers", [*tracking._available_trackers, LoggerType.WANDB])
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--output-dir", str(out), "--steps", "2", "--report-to", "wandb",
                 "--set", "sample_prompts=0", "--set", "sample_steps=3", "--set", "k=1", "--set", "batch_size=1"]) == 0
    import wandb

    [init] = [c for c in wandb.calls if c[0] == "init"]
    assert init[2]["dir"] == str(out / "logs") and (out / "logs" / "wandb").is_dir()
    assert not (tmp_path / "wandb").exists()
    assert [c[2] for c in wandb.calls if c[0] == "log" and "train/reward_mean" in c[1]] == [1, 2]
    assert f"        wandb's run files in {out}/logs/wandb (wandb sync {out}/logs/wandb/RUN when offline)\n" in \
        capsys.readouterr().out


OWED_REWARD = '''
import os
calls = [0]

def reward(images, prompts):
    if not images.requires_grad:  # the first is the start's test image; then the held-out evaluation's
        calls[0] += 1
        if calls[0] > 1 and os.path.exists({flag!r}):
            raise RuntimeError("the evaluation's reward failed")
    return images.mean(dim=(1, 2, 3))
'''


def test_an_evaluation_a_resume_owed_reaches_the_tracker(tmp_path, tiny_dir, capsys):
    """A held-out evaluation that failed (the reward's error) is run by the resume, into that step's metrics.jsonl line;
    TensorBoard never got its eval_* figures: the curve had no point at that step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flag = tmp_path / "failing"
    flag.touch()
    (reward := tmp_path / "owed_reward.py").write_text(OWED_REWARD.format(flag=str(flag)))
    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--output-dir", str(out), "--steps", "2", "--eval-every", "2",
                 "--report-to", "tensorboard", "--reward", f"{reward}:reward", "--set", "sample_prompts=0",
                 "--set", "sample_steps=3", "--set", "k=1", "--set", "batch_size=1", "--set", "eval_holdout=2"]) == 2
    assert "step 2: the reward" in capsys.readouterr().err
    flag.unlink()
    assert main(["--resume", "latest", "--output-dir", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "eval_reward" in rows[1]
    acc = EventAccumulator(str(out / "logs" / "lowmem_alignprop"), size_guidance={"scalars": 0})
    acc.Reload()
    for name in ("eval_reward", "eval_reward_std", "eval_best_step"):
        assert [(e.step, e.value) for e in acc.Scalars(f"eval/{name}")] == [(2, pytest.approx(rows[1][name], rel=1e-6))]
    assert [e.step for e in acc.Scalars("train/reward_mean")] == [1, 2]  # the step's own figures once, as before


def test_a_resume_that_writes_a_finished_runs_outputs_again_logs_no_step_twice(tmp_path, tiny_dir):
    """A finished run whose lora/ is gone: --resume writes its outputs again from the last checkpoint, and sent the
    before/after grid to TensorBoard a second time at the same step (two images at step 2)."""
    pytest.importorskip("tensorboard")
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--output-dir", str(out), "--steps", "2", "--report-to", "tensorboard",
                 "--sample-every", "2", "--set", "sample_prompts=1", "--set", "sample_steps=3", "--set", "k=1",
                 "--set", "batch_size=1"]) == 0
    shutil.rmtree(out / "lora")
    assert main(["--resume", "latest", "--output-dir", str(out)]) == 0
    assert (out / "lora").is_dir()
    acc = EventAccumulator(str(out / "logs" / "lowmem_alignprop"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("samples/before_after")] == [2]
    assert [e.step for e in acc.Images("samples/during_training")] == [2]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for name, tag in (("reward_mean", "train/reward_mean"), ("loss", "train/loss"),
                      ("sample_reward_mean", "samples/sample_reward_mean")):
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == [
            (r["step"], pytest.approx(r[name], rel=1e-6)) for r in rows if name in r]


def test_every_metrics_figure_reaches_tensorboard_in_its_documented_group(tmp_path, tiny_dir):
    """The scalars were sent under metrics.jsonl's bare keys: TensorBoard drew 25 ungrouped charts (eval_fidelity_*
    beside loss) and docs/outputs.md named none of them. Each number of each line is now GROUP/KEY at the line's step,
    every tag matches a row of the doc's `logs/` table, and the settings are recorded once across a resume (each start
    wrote another hparams folder, one more TensorBoard run per resume), in the run of the curves."""
    pytest.importorskip("tensorboard")
    import fnmatch

    import yaml
    from outputs_doc import DOC, documented_keys
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams.metadata import parse_session_start_info_plugin_data

    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--output-dir", str(out), "--steps", "2", "--report-to", "tensorboard",
                 "--eval-every", "2", "--sample-every", "1", "--set", "sample_prompts=2", "--set", "sample_steps=3",
                 "--set", "k=1", "--set", "eval_holdout=2", "--reward", "colorfulness:1,brightness:0.5"]) == 0
    assert main(["--resume", "latest", "--output-dir", str(out), "--steps", "3"]) == 0
    acc = EventAccumulator(str(out / "logs" / "lowmem_alignprop"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = {}
    for r in rows:
        for key, value in r.items():
            if isinstance(value, (int, float)) and value is not None and key != "step":
                group = ("eval" if key.startswith("eval_") else "samples" if key.startswith("sample_") else
                         "memory" if key == "peak_memory_gb" else "time" if key == "seconds" else "train")
                expected.setdefault(f"{group}/{key}", []).append((r["step"], pytest.approx(value, rel=1e-6)))
        for name, value in (r.get("reward_terms") or {}).items():
            expected.setdefault(f"reward_terms/{name}", []).append((r["step"], pytest.approx(value, rel=1e-6)))
    assert {"train/loss", "eval/eval_reward", "samples/sample_reward_mean", "time/seconds"} <= set(expected)
    assert {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags["scalars"]} == expected
    assert [e.step for e in acc.Images("samples/during_training")] == [1, 2, 3]
    assert [e.step for e in acc.Images("samples/before_after")] == [2, 3]  # each start's end
    documented = documented_keys(DOC.read_text(encoding="utf-8"))["logs/"]
    assert [t for t in tags["scalars"] + tags["images"] if not any(fnmatch.fnmatchcase(t, p) for p in documented)] == []
    # the settings: one session of the run whose scalars these are, from its first start, and no experiment summary,
    # so that TensorBoard's HPARAMS tab makes each scalar tag a metric column (accelerate's add_hparams wrote them to
    # a run of their own under an experiment of no metrics: settings with no figure beside them)
    run = out / "logs" / "lowmem_alignprop"
    assert [p.name for p in run.iterdir() if p.is_dir()] == []  # (no run beside it)
    hparams = [(v.tag, v.metadata.plugin_data.content) for f in sorted(run.glob("events.out.tfevents.*"))
               for e in EventFileLoader(str(f)).Load() for v in e.summary.value
               if v.metadata.plugin_data.plugin_name == "hparams"]
    assert [tag for tag, _ in hparams] == ["_hparams_/session_start_info"]
    session = parse_session_start_info_plugin_data(hparams[0][1]).hparams
    recorded = yaml.safe_load((run / "hparams.yml").read_text())
    assert recorded["k"] == session["k"].number_value == 1 and session["reward"].string_value == recorded["reward"] \
        == "colorfulness:1,brightness:0.5" and len(session) == len(recorded) > 40


def test_a_new_run_after_a_start_that_trained_no_step_shows_its_own_settings_in_tensorboard(tmp_path, tiny_dir,
                                                                                           monkeypatch):
    """A start that failed before its first step (out of memory, a reward's error) leaves the folder free for a new run
    (checkpoint.holds_a_run), and its TensorBoard files stayed: the new run found hparams.yml and recorded nothing, and
    the HPARAMS tab (a tag's first session is the one it shows) gave the failed start's lr=0.5 for the run trained with
    lr=0.001. A new run clears its TensorBoard folder of them."""
    pytest.importorskip("tensorboard")
    import yaml
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.metadata import parse_session_start_info_plugin_data

    from lowmem_alignprop.training import train
    from lowmem_alignprop.settings.errors import UserError

    out = tmp_path / "run"
    args = ["--profile", "cpu", "--output-dir", str(out), "--steps", "1", "--report-to", "tensorboard", "--set",
            "sample_prompts=1", "--set", "sample_steps=3", "--set", "k=1", "--set", "batch_size=1"]
    with monkeypatch.context() as m:
        m.setattr(train.Trainer, "fit", lambda self: (_ for _ in ()).throw(UserError("out of memory at step 1")))
        assert main([*args, "--set", "lr=0.5"]) == 2
    assert main([*args, "--set", "lr=0.001"]) == 0
    run = out / "logs" / "lowmem_alignprop"
    acc = EventAccumulator(str(run))
    acc.Reload()
    session = parse_session_start_info_plugin_data(
        acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content).hparams
    assert session["lr"].number_value == yaml.safe_load((run / "hparams.yml").read_text())["lr"] == 0.001
    assert len(list(run.glob("events.out.tfevents.*"))) == 1


def test_the_hparams_tab_compares_a_square_run_and_a_w_x_h_run_by_width_and_height_numbers(tmp_path, tiny_dir):
    """The settings went to the HPARAMS tab as config.yaml holds them: resolution 32 (a number) for a square run and
    "64x32" (text) for a WxH one. TensorBoard gives a column of mixed types the type string (its backend's
    _compute_hparam_infos, run here on the two runs' event files): the tab's resolution column was text, "32.0" and
    "64x32", unsortable by size. The tab now has width and height, numbers for both runs, and no resolution."""
    pytest.importorskip("tensorboard")
    import yaml
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import api_pb2, backend_context, metadata

    logdir = tmp_path / "runs"
    for name, size in (("square", "32"), ("wide", "64x32")):
        assert main(["--profile", "cpu", "--output-dir", str(logdir / name), "--steps", "1", "--report-to",
                     "tensorboard", "--set", f"resolution={size}", "--set", "sample_prompts=1", "--set",
                     "sample_steps=2", "--set", "k=1", "--set", "batch_size=1"]) == 0
    runs = {str(f.parent): {v.tag: v.metadata.plugin_data.content for e in EventFileLoader(str(f)).Load()
                            for v in e.summary.value if v.metadata.plugin_data.plugin_name == metadata.PLUGIN_NAME}
            for f in sorted(logdir.glob("*/logs/lowmem_alignprop/events.out.tfevents.*"))}
    assert len(runs) == 2
    columns = {i.name: i for i in backend_context.Context._compute_hparam_infos(object.__new__(
        backend_context.Context), runs)}
    assert "resolution" not in columns
    assert [(columns[n].type, columns[n].domain_interval.min_value, columns[n].domain_interval.max_value)
            for n in ("width", "height")] == [(api_pb2.DATA_TYPE_FLOAT64, 32, 64), (api_pb2.DATA_TYPE_FLOAT64, 32, 32)]
    assert columns["width"].differs and not columns["height"].differs
    # (every column one type across the two runs: no number beside text, no text column made of numbers)
    mixed = [n for n, i in columns.items() if i.type == api_pb2.DATA_TYPE_STRING and any(
        v.replace(".", "", 1).isdigit() for v in i.domain_discrete)]
    assert mixed == []
    for name, sides in (("square", (32, 32)), ("wide", (64, 32))):
        recorded = yaml.safe_load((logdir / name / "logs" / "lowmem_alignprop" / "hparams.yml").read_text())
        assert (recorded["width"], recorded["height"]) == sides and "resolution" not in recorded
        assert yaml.safe_load((logdir / name / "config.yaml").read_text())["resolution"] == (
            32 if name == "square" else "64x32")  # (config.yaml keeps the size as given)

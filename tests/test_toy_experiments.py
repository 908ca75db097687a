"""benchmarks/toy_experiments.py: the paper's experiments on the toy world (docs/toy_world.md).

The script's own logic (curves from a run folder, the hacking point, REPORT.md's section) on a hand-made run folder,
and its smallest mode end to end: one step of the compressibility experiment on the shipped toy model (marked slow:
about 20 s of CPU, most of it the training process's start-up; `pytest -m slow tests/test_toy_experiments.py`)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "toy_experiments.py"


@pytest.fixture(scope="module")
def toy():
    spec = importlib.util.spec_from_file_location("toy_experiments", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("toy_experiments", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _evals(scores):
    return [{"step": 5 * i, "fidelity_score": s} for i, s in enumerate(scores)]


def test_hack_point_is_the_first_step_from_which_fidelity_stays_below_its_start(toy):
    assert toy.hack_point(_evals([0.70, 0.72, 0.65, 0.69, 0.60])) == 10
    assert toy.hack_point(_evals([0.70, 0.65, 0.72, 0.69, 0.60])) == 15  # dipped at step 5, recovered at 10
    assert toy.hack_point(_evals([0.70, 0.65, 0.60, 0.71])) is None  # ends above its start: no hacking point
    assert toy.hack_point(_evals([0.70, 0.70, 0.70])) is None  # equal is not below


def _fake_run(folder: Path) -> None:
    """A finished run's files as the trainer writes them, with fidelity_every=2 over 4 steps."""
    folder.mkdir(parents=True)
    before = {"reward": -1.5, "jpeg_bytes": 1500.0, "fidelity_images": 8.0, "fidelity_score": 0.7,
              "fidelity_all_ok": 0.5, "fidelity_objects_ok": 0.5, "fidelity_shapes_ok": 0.5, "fidelity_colours_ok": 0.75,
              "fidelity_count_ok": 0.75, "fidelity_background_ok": 1.0, "fidelity_objects": 1.0}
    lines = []
    for step in range(1, 5):
        line = {"step": step, "reward_mean": -1.5 + 0.1 * step, "k": 2}
        if step % 2 == 0:
            line.update({f: v for f, v in before.items() if f != "reward"}, fidelity_reward=-1.5 + 0.2 * step,
                        fidelity_score=0.7 - 0.05 * step, jpeg_bytes=1500.0 - 50 * step)
        lines.append(json.dumps(line))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "summary.json").write_text(json.dumps({"toy_world": {"images": 8, "before": before, "after": {}}}))


def test_curves_findings_and_report_section(toy, tmp_path):
    _fake_run(tmp_path / "run")
    run = toy.Run("jpeg_compressibility (long)", "jpeg_compressibility", "toy-pairs", 4, {"fidelity_every": 2})
    stamp = {"command": "python -m lowmem_alignprop ...", "cpu_seconds": 12.0, "wall_seconds": 30.0}
    curve = toy.curves(tmp_path / "run", run, stamp)
    assert [e["step"] for e in curve["eval"]] == [0, 2, 4]  # step 0 is summary.json's "before"
    assert [e["reward"] for e in curve["eval"]] == pytest.approx([-1.5, -1.1, -0.7])
    assert [e["jpeg_bytes"] for e in curve["eval"]] == pytest.approx([1500.0, 1400.0, 1300.0])
    assert curve["train"]["step"] == [1, 2, 3, 4] and curve["train"]["k"] == [2, 2, 2, 2]

    result = {"runs": {run.name: curve}}
    (line,) = toy.findings("hack", result)
    assert "reward -1.50 -> -0.70" in line and "fidelity score 0.700 -> 0.500" in line
    assert line.endswith("fidelity below its start from step 2 on")

    result["findings"] = [line]
    doc = {"meta": {"date": "2026-12-01", "command": "python benchmarks/toy_experiments.py", "device": "cpu",
                    "versions": "torch 2", "toy_weights": "abc", "cpu_seconds": 60.0, "wall_seconds": 120.0,
                    "note": "idle"}, "experiments": {"hack": result}}
    report = tmp_path / "REPORT.md"
    report.write_text("# Report\n\n## 6. Speed\n\nsix\n\n" + toy.SECTION_TITLE + "\n\nold text\n\n## 8. Later\n\neight\n")
    toy.update_report(doc, report)
    text = report.read_text()
    assert "old text" not in text and "six" in text and "## 8. Later\n\neight" in text  # only its own section
    assert text.count(toy.SECTION_TITLE) == 1 and line in text and "results/toy/toy-hack.png" in text
    toy.update_report(doc, report)
    assert report.read_text() == text  # idempotent


def test_report_only_touches_report_md_only_for_the_default_folder_and_a_readable_json(toy, tmp_path, monkeypatch):
    """--report-only with --no-report, or with another --out, rewrote benchmarks/REPORT.md's section 7 (from that
    folder's JSON, or as "Not run yet" when it had none: the recorded figures wiped). Now: a JSON that cannot be read
    is one line; REPORT.md only for the default folder without --no-report."""
    written = []
    monkeypatch.setattr(toy, "update_report", lambda doc, *a: written.append(doc))
    with pytest.raises(SystemExit, match=r"--report-only: .*toy_experiments.json cannot be read: nothing to redraw"):
        toy.main(["--report-only", "--out", str(tmp_path / "none")])
    (tmp_path / "toy_experiments.json").write_text(json.dumps({"meta": {}, "experiments": {}}))
    assert toy.main(["--report-only", "--out", str(tmp_path), "--no-plots"]) == 0
    assert written == []


@pytest.mark.slow  # ~20 s of CPU (one training process start-up, one step, three judgements): run with -m slow
def test_smallest_mode_end_to_end(tmp_path):
    """One step of the compressibility experiment on the shipped toy model, judged on 2 images: the JSON's shape."""
    report = (ROOT / "benchmarks" / "REPORT.md").read_text()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(SCRIPT), "--only", "jpeg", "--steps", "1", "--fidelity-images", "2", "--out",
           str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--no-plots"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "out" / "toy_experiments-custom.json").read_text())
    assert doc["meta"]["mode"] == "custom" and doc["meta"]["cpu_seconds"] > 0
    (run,) = doc["experiments"]["jpeg"]["runs"].values()
    assert [e["step"] for e in run["eval"]] == [0, 1]
    assert run["judged_images"] == 2 and run["train"]["step"] == [1]
    for e in run["eval"]:
        assert 0 <= e["fidelity_score"] <= 1 and e["jpeg_bytes"] > 100 and e["reward"] < 0  # minus kilobytes
    assert len(doc["experiments"]["jpeg"]["findings"]) == 1
    assert (ROOT / "benchmarks" / "REPORT.md").read_text() == report  # a smoke run leaves the report alone


# ------------------------------------------------------------------------------------------------ experiment rl
# benchmarks/ddpo_toy.py's own logic (AlignProp against TRL's DDPOTrainer): no trl here, hand-made curves


@pytest.fixture(scope="module")
def ddpo(toy):
    return sys.modules["ddpo_toy"]  # toy_experiments imports it (standard library only at import)


def _rl_result(ddpo):
    """Two hand-made runs: AlignProp 4 steps of 4 images, DDPO 8 epochs of 4 images and 2 updates each."""
    metrics = [{"step": s, "images": 4, "reward_mean": 10.0 * s} for s in range(1, 5)]
    ap = ddpo.alignprop_curve(metrics, [2.0, 1.0, 1.0, 1.0], batch=4)
    epochs = [{"epoch": e, "rewards": [float(e), float(e), 0.0, 0.0], "optimizer_step": 2 * e, "cpu_seconds": 3.0}
              for e in range(1, 9)]
    dd = ddpo.ddpo_curve(epochs)
    row = {"fidelity_score": 0.5, "fidelity_all_ok": 0.25, "fidelity_objects": 1.0}

    def judged(*rewards):  # a judged row of 4 images with these per-image rewards
        return {**row, "reward": sum(rewards) / len(rewards), "rewards": list(rewards)}

    base = judged(40.0, 60.0, 40.0, 60.0)
    ap.update(cpu_seconds=20.0, wall_seconds=30.0, command="python -m lowmem_alignprop --steps 4",
              eval=ddpo.with_positions({0: base, 2: judged(50.0, 70.0, 50.0, 70.0),
                                        4: {**judged(60.0, 80.0, 62.0, 78.0), "fidelity_score": 0.75}}, ap))
    dd.update(cpu_seconds=40.0, wall_seconds=50.0,
              eval=ddpo.with_positions({0: base, 2: judged(41.0, 61.0, 41.0, 61.0), 4: judged(42.0, 62.0, 42.0, 62.0),
                                        8: judged(45.0, 65.0, 45.0, 65.0)}, dd))
    toy_settings = {"reward": "toy_clip", "prompts": "toy-pairs", "resolution": 64, "sample_steps": 20,
                    "guidance_scale": 3.0, "eta": 1.0, "batch_size": 4, "lora_rank": 4, "lr": 3e-3,
                    "truncation": "fixed", "k": 2, "seed": 0}
    settings = ddpo.DDPOSettings.for_toy(3e-3, 4)
    where = {"command": "python benchmarks/toy_experiments.py --only rl --trl-python /venv/bin/python",
             "device": {"cpu": "Some CPU", "cores": 2, "torch_threads": 1, "load_average_start": [5.1, 4.0, 3.2],
                        "load_average_end": [6.0, 5.5, 4.1]}, "versions": {"python": "3.11.7", "torch": "2.13.0"}}
    return {"runs": {"AlignProp": ap, "DDPO (TRL)": dd}, "trl": "0.23.1", "toy": toy_settings, "judged_images": 8,
            "provenance": where, "trl_venv": {"python": "3.11.7", "trl": "0.23.1", "torch": "2.13.0"},
            "ddpo": {"describe": settings.describe()}, "judge_cpu_seconds": 9.0, "judge_wall_seconds": 11.0}


def test_rl_curves_count_images_steps_and_cpu_per_method(ddpo):
    result = _rl_result(ddpo)
    ap, dd = result["runs"]["AlignProp"], result["runs"]["DDPO (TRL)"]
    assert ap["train"]["images"] == [4, 8, 12, 16] and ap["train"]["optimizer_step"] == [1, 2, 3, 4]
    assert ap["train"]["cpu_seconds"] == [2.0, 3.0, 4.0, 5.0]  # cumulative
    assert dd["train"]["images"] == [4 * e for e in range(1, 9)] and dd["train"]["optimizer_step"][-1] == 16
    assert dd["train"]["reward_mean"][:2] == [0.5, 1.0]  # each epoch's mean over its sampled images
    # a judged point sits where its method was then: epoch 4 of DDPO = 16 images, 8 updates, 12 s
    assert [(e["step"], e["images"], e["optimizer_step"], e["cpu_seconds"]) for e in dd["eval"]] == [
        (0, 0, 0, 0), (2, 8, 4, 6.0), (4, 16, 8, 12.0), (8, 32, 16, 24.0)]
    assert [e["images"] for e in ap["eval"]] == [0, 8, 16]


def test_rl_running_mean_and_first_reaching(ddpo):
    assert ddpo.running_mean([1.0, 3.0, 5.0, 7.0], 2) == [2.0, 4.0, 6.0]  # full windows only
    # differences 2, 4, 6: mean 4, sample variance 4, standard error sqrt(4 / 3)
    assert ddpo.paired({"rewards": [3.0, 5.0, 7.0]}, {"rewards": [1.0] * 3}) == pytest.approx((4.0, (4 / 3) ** 0.5))
    assert ddpo.paired({"rewards": [3.0, 5.0]}, {}) is None  # no per-image rewards: no paired difference
    assert ddpo.first_reaching([4, 8, 12], [1.0, 5.0, 9.0], 5.0) == 8  # at least the target
    assert ddpo.first_reaching([4, 8, 12], [1.0, 5.0, 9.0], 9.5) is None


def test_command_line_leaves_the_note_out(ddpo):
    argv = ["benchmarks/toy_experiments.py", "--only", "rl", "--note", "busy machine", "--quick", "--note=x"]
    assert ddpo.command_line(argv) == "python benchmarks/toy_experiments.py --only rl --quick"


def test_rl_ddpo_settings_scale_with_the_toy(ddpo):
    s = ddpo.DDPOSettings.for_toy(3e-3, 4)
    assert s.lr == pytest.approx(9e-4)  # DDPO's 3e-4 times the toy's AlignProp boost (3e-3 / 1e-3)
    assert s.images_per_epoch == 4 and s.train_batch == 2  # two updates an epoch, as DDPO's own setting
    sd = ddpo.DDPOSettings.for_toy(1e-3, 8)
    assert sd.lr == pytest.approx(3e-4) and sd.train_batch == 4
    assert ddpo.Plan(steps=30, every=10, epochs=120, epochs_every=30, images=32).save_points(30, 10) == [10, 20, 30]
    assert ddpo.Plan(1, 1, 5, 2, 4).save_points(5, 2) == [2, 4, 5]  # the end is always judged


def test_rl_findings_and_report(toy, ddpo, tmp_path):
    result = _rl_result(ddpo)
    lines = toy.findings("rl", result)
    assert lines[0].startswith("AlignProp: 4 optimizer steps on 16 sampled images, 5 s of CPU")
    # 70 - 50 per image is +20, +20, +22, +18: mean +20, standard error sqrt(8 / 3 / 4)
    assert "toy_clip 50.0 -> 70.0 (+20.0 ± 0.8), fidelity score 0.500 -> 0.750" in lines[0]
    # AlignProp's training batches: 20 images = 5 steps, more than its 4: one window over all, mean 25
    assert lines[0].endswith("over the first 20 sampled images 25.0, over the last 20 25.0")
    assert lines[1].startswith("DDPO (TRL): 16 optimizer steps on 32 sampled images, 24 s of CPU")
    assert "toy_clip 50.0 -> 55.0 (+5.0 ± 0.0)" in lines[1]
    assert lines[1].endswith("over the first 20 sampled images 1.5, over the last 20 3.0")  # epoch means e / 2
    assert lines[2] == ("at the same 16 sampled images: AlignProp 70.0 (fidelity 0.750, 5 s CPU), DDPO 52.0 "
                        "(fidelity 0.500, 12 s CPU): AlignProp - DDPO (+18.0 ± 0.8)")
    assert lines[3] == "at the same 4 optimizer steps: AlignProp 70.0, DDPO 51.0 (8 images) (+19.0 ± 0.8)"
    assert lines[4].startswith("DDPO's best judged point: 55.0 after 32 sampled images (24 s CPU")
    assert lines[5].endswith("never reached AlignProp's last 20-image mean 25.0 in their 32 images (best 3.0)")
    assert toy._experiment_cpu(result) == pytest.approx(20.0 + 40.0 + 9.0)  # both trainings and the judging

    result["findings"] = lines
    doc = {"meta": {"date": "2026-12-01", "command": "python benchmarks/toy_experiments.py --only rl", "device": "cpu",
                    "versions": "torch 2", "cpu_seconds": 69.0, "wall_seconds": 91.0, "note": "idle"},
           "experiments": {"rl": result}}
    report = tmp_path / "REPORT.md"
    toy.update_report(doc, report)
    text = report.read_text()
    assert "### 6. AlignProp against DDPO" in text and "results/toy/toy-rl.png" in text and "trl 0.23.1" in text
    assert "| DDPO (TRL) | epoch 4 | 16 | 8 | 12 | 52.0 | 0.500 | 25% | 1.00 |" in text
    assert "python -m lowmem_alignprop --steps 4" in text and "lr 0.0009" in text
    result["runs"]["DDPO (TRL)"].update(load_average_start=[1.0, 2.0, 3.0], load_average_end=[4.0, 5.0, 6.0])
    toy.update_report(doc, report)  # a training's own load, when it recorded one, replaces the invocation's
    assert "load average (1/5/15 min) DDPO (TRL)'s training 1.0/2.0/3.0 -> 4.0/5.0/6.0); here" in report.read_text()
    del result["runs"]["DDPO (TRL)"]["load_average_start"], result["runs"]["DDPO (TRL)"]["load_average_end"]
    toy.update_report(doc, report)
    # its own command, CPU, load and versions (the section's header names only the last invocation's)
    assert ("`python benchmarks/toy_experiments.py --only rl --trl-python /venv/bin/python` on Some CPU (2 logical "
            "cores, 1 thread a process; load average (1/5/15 min) this invocation 5.1/4.0/3.2 -> 6.0/5.5/4.1); "
            "here python 3.11.7, torch 2.13.0; trl's venv python 3.11.7, trl 0.23.1, torch 2.13.0") in text


def test_rl_is_skipped_with_a_line_without_trl(toy, tmp_path, capsys):
    """No --trl-python (or one without trl): one line, nothing written, exit 0; earlier experiments stay."""
    out = tmp_path / "out"
    assert toy.main(["--only", "rl", "--out", str(out), "--work", str(tmp_path / "work"), "--no-report"]) == 0
    assert "rl: skipped (pass --trl-python PATH" in capsys.readouterr().out
    assert not out.exists() and not (tmp_path / "work").exists()
    assert toy.main(["--only", "rl", "--out", str(out), "--trl-python", str(tmp_path / "no-python"),
                     "--no-report"]) == 0
    assert "rl: skipped: " in capsys.readouterr().out and not out.exists()

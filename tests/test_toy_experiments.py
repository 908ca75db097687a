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
            line.update({f: v for f, v in before.items() if f != "reward"}, eval_reward=-1.5 + 0.2 * step,
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

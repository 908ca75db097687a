"""The held-out evaluation (--eval-every) when the user's reward fails on it: an error keeps the trained steps and
names the evaluation; NaN/inf is said, written as null and counted for neither best/ nor the early stop."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from refusals import strict_rows

from lowmem_alignprop.cli import main
from lowmem_alignprop.training import evaluation as ev
from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.run import faults
from lowmem_alignprop.settings.config import Config

FAST = ["--profile", "cpu", "--seed", "2", "--set", "sample_prompts=0", "--set", "sample_steps=3", "--set", "k=1",
        "--set", "batch_size=2", "--eval-every", "1"]

# no-grad calls: the trainer's start-up check (one image), then one call per evaluation (2 held-out prompts,
# batch_size 2); MODE["bad"] holds the no-grad call numbers that fail, MODE["how"] how
REWARD = """
import torch
MODE = {"bad": set(), "how": "raise", "const": {}}
calls = {"n": 0}

def reward(images, prompts):
    r = images.mean(dim=(1, 2, 3))
    if torch.is_grad_enabled():
        return r
    calls["n"] += 1
    if calls["n"] in MODE["const"]:
        return torch.full_like(r, MODE["const"][calls["n"]])
    if calls["n"] in MODE["bad"]:
        if MODE["how"] == "raise":
            raise ValueError("boom")
        return r * float("nan")
    return r
"""


@pytest.fixture
def evalreward(tmp_path, monkeypatch, fresh_log_handlers):
    (tmp_path / "qa_evalfault.py").write_text(REWARD)
    (tmp_path / "eval.txt").write_text("a night sky\na dark cave\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys
    sys.modules.pop("qa_evalfault", None)
    module = importlib.import_module("qa_evalfault")
    yield module, [*FAST, "--reward", "qa_evalfault:reward", "--set", f"eval_prompts={tmp_path / 'eval.txt'}"]
    sys.modules.pop("qa_evalfault", None)


def test_a_reward_that_raises_in_the_evaluation_keeps_the_trained_steps_and_names_it(evalreward, tmp_path, capsys):
    """No-grad call 3 is step 2's evaluation: step 2 is trained, so steps 1-2 are saved (its metrics line too, without
    an evaluation); the message names the evaluation and its fix, not the sample grid; --resume latest goes on."""
    module, args = evalreward
    module.MODE["bad"] = {3}
    out = tmp_path / "run"
    assert main([*args, "--output-dir", str(out), "--steps", "3"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    saved = ckpt.step_dir(out / "checkpoints", 2)
    assert err == [f"error: step 2: the reward 'qa_evalfault:reward' raised ValueError while scoring the held-out "
                   f"evaluation's images (--eval-every): boom; fix the reward, or drop --eval-every; steps 1-2 are "
                   f"saved in {saved}: --resume latest continues once it is fixed"]
    assert ckpt.find_resume(out, "latest") == saved and ckpt.verify(saved) is None
    rows = strict_rows(out)
    assert [r["step"] for r in rows] == [1, 2] and "eval_reward" in rows[0] and "eval_reward" not in rows[1]
    module.MODE["bad"] = set()  # fixed
    assert main(["--output-dir", str(out), "--steps", "3", "--resume", "latest"]) == 0
    rows = strict_rows(out)
    # the resume evaluates step 2 first (it was owed: the checkpoint says so), into step 2's row
    assert [r["step"] for r in rows] == [1, 2, 3] and all("eval_reward" in r for r in rows)
    assert rows[2]["eval_best_step"] in (1, 2, 3) and rows[1]["eval_since_best"] in (0, 1)


def test_a_resume_without_evaluation_says_the_owed_one_is_not_run(evalreward, tmp_path, caplog):
    """Step 2's evaluation failed; a resume with --eval-every 0 evaluates nothing: said, not dropped in silence."""
    module, args = evalreward
    module.MODE["bad"] = {3}
    out = tmp_path / "run"
    assert main([*args, "--output-dir", str(out), "--steps", "3"]) == 2
    module.MODE["bad"] = set()
    caplog.set_level(logging.WARNING, logger="lowmem_alignprop")
    assert main(["--output-dir", str(out), "--steps", "3", "--resume", "latest", "--eval-every", "0"]) == 0
    assert ("resume: step 2's held-out evaluation failed before, and this resume evaluates nothing (eval_every 0): "
            "it is not run, and best/ (if any) stays as it was") in caplog.messages


def test_an_owed_evaluation_that_ends_the_patience_stops_the_resumed_run_there(evalreward, tmp_path, capsys):
    """Step 2's evaluation failed; at the resume it runs first, scores worse than step 1's and spends early_stop's
    patience of 1: the run stops at step 2 (said), as it would have without the failure, not a step later."""
    module, args = evalreward
    module.MODE.update(bad={3}, const={2: 1.0, 5: 0.0})  # no-grad calls: 1 start-up, 2 step 1's evaluation, 3 step
    out = tmp_path / "run"  # 2's (fails); the resume: 4 its start-up, 5 step 2's owed evaluation
    assert main([*args, "--output-dir", str(out), "--steps", "4", "--early-stop", "1"]) == 2
    module.MODE["bad"] = set()
    capsys.readouterr()
    assert main([*args, "--output-dir", str(out), "--steps", "4", "--early-stop", "1", "--resume", "latest"]) == 0
    rows = strict_rows(out)
    assert [r["step"] for r in rows] == [1, 2] and [r["eval_reward"] for r in rows] == [1.0, 0.0]
    assert "early stop at step 2:" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["early_stopped_at"] == 2 and summary["best_step"] == 1 and summary["steps_done"] == 2


def test_an_evaluation_that_failed_at_the_last_step_runs_at_the_resume_and_keeps_best(evalreward, tmp_path, capsys):
    """The last step's evaluation failed: the resume only wrote the outputs again and the box said 'none counted
    (each was skipped: see the warnings)' with no warning and no best/. Now it evaluates that step first."""
    module, args = evalreward
    module.MODE["bad"] = {2}  # step 1's evaluation, the last step's
    out = tmp_path / "run"
    assert main([*args, "--output-dir", str(out), "--steps", "1"]) == 2
    assert "eval_reward" not in strict_rows(out)[0] and not (out / "best").exists()
    module.MODE["bad"] = set()
    capsys.readouterr()
    assert main(["--output-dir", str(out), "--steps", "1", "--resume", "latest"]) == 0
    [row] = strict_rows(out)
    assert row["eval_best_step"] == 1 and row["eval_reward"] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_step"] == 1 and summary["best_kept"] and (out / "best" / "best.json").is_file()
    assert json.loads((out / "best" / "best.json").read_text())["eval_reward"] == row["eval_reward"]
    assert "none counted" not in capsys.readouterr().out


def test_out_of_memory_in_the_evaluation_keeps_the_trained_steps_and_says_what_to_change(evalreward, tmp_path, capsys,
                                                                                        monkeypatch):
    """Step 2's evaluation runs out of memory (its sampling, not the reward): step 2 is trained, so steps 1-2 are saved
    (its metrics line too), and the one line says what to change; the run resumes once the memory is there."""
    from lowmem_alignprop.training import train

    _, args = evalreward
    real, calls = train.Trainer.generate, {"eval": 0}

    def generate(self, prompts, seed, *, when="", fix=""):
        calls["eval"] += when == ev.EVAL_SCORING
        if calls["eval"] == 2 and when == ev.EVAL_SCORING:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, prompts, seed, when=when, fix=fix)

    monkeypatch.setattr(train.Trainer, "generate", generate)
    out = tmp_path / "run"
    assert main([*args, "--output-dir", str(out), "--steps", "3"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    saved = ckpt.step_dir(out / "checkpoints", 2)
    assert err == [f"error: step 2: out of memory in the held-out evaluation after it (CUDA out of memory. Tried to "
                   "allocate 2.00 GiB): evaluate on fewer images at a time (--set batch_size=1 --set grad_accum=2: "
                   "the same images per step) or less often (--eval-every N); steps 1-2 are saved in "
                   f"{saved}: --resume latest continues once it is fixed"]  # (a bare batch_size=N halved training's)
    assert ckpt.find_resume(out, "latest") == saved and ckpt.verify(saved) is None
    assert [r["step"] for r in strict_rows(out)] == [1, 2]
    monkeypatch.setattr(train.Trainer, "generate", real)
    assert main(["--output-dir", str(out), "--steps", "3", "--resume", "latest"]) == 0
    assert [r["step"] for r in strict_rows(out)] == [1, 2, 3]


def test_a_nan_evaluation_is_said_written_as_null_and_never_counted(evalreward, tmp_path, caplog):
    """Steps 2 and 3's evaluations are NaN (no-grad calls 3 and 4): with --early-stop 2 they once counted as two
    evaluations without improvement (an early stop naming 'the best step (None)'), and metrics.jsonl held a bare NaN.
    Now each is a warning and a null, step 1 stays the best, the patience is untouched and the run goes on."""
    module, args = evalreward
    module.MODE.update(bad={3, 4}, how="nan")
    out = tmp_path / "run"
    assert main([*args, "--output-dir", str(out), "--steps", "4", "--early-stop", "2"]) == 0
    rows = strict_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows[1:3]:
        assert r["eval_reward"] is None and r["eval_objective"] is None and r["eval_reward_std"] is None
        assert r["eval_skipped"] == "the reward is NaN or infinite on 2 of 2 held-out images"
        assert r["eval_best_step"] == 1 and r["eval_since_best"] == 0
    assert "eval_skipped" not in rows[0] and "eval_skipped" not in rows[3]
    assert rows[3]["eval_best_step"] in (1, 4) and rows[3]["eval_since_best"] in (0, 1)
    for step in (2, 3):
        assert (f"step {step}: evaluation skipped: the reward is NaN or infinite on 2 of 2 held-out images (not "
                "counted for best/ or the early stop); check the reward 'qa_evalfault:reward'") in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["early_stopped_at"] is None and summary["steps_done"] == 4
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] == summary["best_step"] and math.isfinite(best["eval_reward"])


def test_a_run_whose_every_evaluation_was_skipped_keeps_no_best_and_says_so(evalreward, tmp_path, capsys):
    """Every held-out evaluation NaN: no best/, and summary.json's best_kept false (it said true beside a null
    best_step); the box says no evaluation was counted (it said nothing of best/)."""
    module, args = evalreward
    module.MODE.update(bad={2}, how="nan")
    out = tmp_path / "run"
    assert main([*args, "--output-dir", str(out), "--steps", "1"]) == 0
    assert [r.get("eval_skipped") is not None for r in strict_rows(out)] == [True]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["best_step"], summary["best_kept"]) == (None, False) and not (out / "best").exists()
    assert " best held-out evaluation: none counted (each was skipped" in capsys.readouterr().out


def test_an_early_stop_the_run_cannot_make_is_said_once_at_the_start(evalreward, tmp_path, caplog):
    """A 1-step run with --early-stop 1 evaluates only at its end: the trainer says so before training (rank 0),
    and trains as asked."""
    _, args = evalreward
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    assert main([*args, "--output-dir", str(tmp_path / "run"), "--steps", "1", "--early-stop", "1"]) == 0
    said = [r.getMessage() for r in caplog.records if "cannot stop this run" in r.getMessage()]
    assert said == ["early_stop=1 cannot stop this run: it evaluates 0 time(s) before its last step (every 1 of 1 "
                    "steps), and a stop needs 2 (the best, then 1 without improving); use --steps 3 or more"]
    first_step = next(i for i, r in enumerate(caplog.records) if r.getMessage().startswith("step 1"))
    assert caplog.records.index(next(r for r in caplog.records if "cannot stop" in r.getMessage())) < first_step
    assert [r["step"] for r in strict_rows(tmp_path / "run")] == [1]


def test_held_out_nan_figures_are_null_and_not_counted():
    """HeldOut alone: a NaN image makes every figure None, eval_skipped says why, and neither best/ nor the patience
    moves; a finite evaluation after it is the best."""
    cfg = Config(batch_size=2, early_stop=1, eval_every=1)
    scores = {"now": torch.tensor([0.5, float("nan")])}
    written = []

    def sample(prompts, seed):
        return torch.zeros(len(prompts), 3, 8, 8), scores["now"][: len(prompts)]

    held = ev.HeldOut(cfg, ["a", "b"], None, sample=sample, write_lora=None)
    held.write_best = lambda step, metrics: written.append(step)
    metrics = held.evaluate()
    assert metrics == {"eval_reward": None, "eval_reward_std": None, "eval_objective": None,
                       "eval_skipped": "the reward is NaN or infinite on 1 of 2 held-out images"}
    held.after_evaluation(1, metrics, True)
    assert (held.best, held.since_best, held.exhausted, written) == (None, 0, False, [])
    assert metrics["eval_best_step"] is None and metrics["eval_since_best"] == 0
    scores["now"] = torch.tensor([0.25, 0.75])
    metrics = held.evaluate()
    held.after_evaluation(2, metrics, True)
    assert metrics["eval_reward"] == 0.5 and "eval_skipped" not in metrics and written == [2]
    assert faults.finite_or_none(float("inf")) is None and faults.finite_or_none(torch.tensor(0.5)) == 0.5


def test_a_run_whose_every_step_was_skipped_writes_a_strict_json_summary(tmp_path, monkeypatch, fresh_log_handlers,
                                                                         capsys):
    """Every training reward NaN (fewer steps than max_bad_steps): no reward to compare, so null, not a bare NaN;
    the box says which steps were skipped. A skipped step used its memory: the one a CPU measures (step 2) gives the
    run's peak (it said n/a)."""
    (tmp_path / "qa_allnan.py").write_text("calls = [0]\n"  # the start-up check (the first call) passes
                                           "def reward(images, prompts):\n"
                                           "    r = images.mean(dim=(1, 2, 3))\n"
                                           "    calls[0] += r.requires_grad\n"
                                           "    return r * float('nan') if calls[0] > 1 else r\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main([*FAST[:-2], "--reward", "qa_allnan:reward", "--steps", "2", "--set", "max_bad_steps=3",
                 "--output-dir", str(out)]) == 0

    def refuse(constant):
        raise ValueError(f"{constant} in summary.json")
    summary = json.loads((out / "summary.json").read_text(), parse_constant=refuse)
    assert summary["skipped_steps"] == [1, 2] and summary["reward_first"] is None and summary["reward_last"] is None
    peak = json.loads((out / "memory_report.json").read_text())["stages"]
    assert summary["peak_memory_gb"] == pytest.approx(max(s["peak_allocated"] for s in peak.values()) / 2**30)
    box = capsys.readouterr().out
    assert " AlignProp finished: 2 steps" in box and " 2 of them skipped, their loss NaN or infinite" in box, box
    assert f"peak memory {summary['peak_memory_gb']:.3f} GiB" in box, box

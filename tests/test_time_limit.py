"""--max-minutes (max_minutes): the rule that stops a run before its time limit, and a run on an injected clock that
stops after the right step with its outputs written, then resumes under a new clock. No sleeping: the clock moves
by what each patched step says it took."""

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lowmem_alignprop.cli import main
from lowmem_alignprop.run import time_limit
from lowmem_alignprop.run.time_limit import END_MARGIN_S, TimeLimit, stops_before_next_step
from lowmem_alignprop.training.train import Trainer
from outputs_doc import DOC, documented_keys, undocumented
from refusals import assert_refused, strict_rows

FAST = ["--profile", "cpu", "--seed", "2", "--set", "sample_steps=3", "--set", "k=1", "--set", "batch_size=1",
        "--set", "fidelity_images=0"]
STEP_S = 600.0  # each step takes 10 minutes on the injected clock

pytestmark = pytest.mark.usefixtures("fresh_log_handlers")


class Clock:
    """The deadline's clock, moved by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(time_limit, "clock", c)
    return c


def test_the_rule_stops_when_the_next_step_and_the_end_would_pass_the_limit():
    """used + the slowest step + the end's work (renders, writes, margin) against the limit, in seconds."""
    rule = stops_before_next_step
    # an hour's limit, 10-minute steps, 2 min of after renders, 30 s of writes, 60 s margin: 13.5 min in hand
    assert not rule(used_s=2790, limit_s=3600, slowest_step_s=600, renders_s=120, writes_s=30, margin_s=60)  # =3600
    assert rule(used_s=2791, limit_s=3600, slowest_step_s=600, renders_s=120, writes_s=30, margin_s=60)
    # the slowest step is the one counted: 20 minutes (a first step's warm-up) stops at 2300 s, where 10 would not
    assert rule(used_s=2300, limit_s=3600, slowest_step_s=1200, renders_s=120, writes_s=30, margin_s=60)
    assert not rule(used_s=2300, limit_s=3600, slowest_step_s=600, renders_s=120, writes_s=30, margin_s=60)
    # no step known yet (a new run's first): only the end's work is counted
    assert not rule(used_s=3300, limit_s=3600, slowest_step_s=None, renders_s=120, writes_s=30, margin_s=60)
    assert rule(used_s=3400, limit_s=3600, slowest_step_s=None, renders_s=120, writes_s=30, margin_s=60)
    assert not rule(used_s=10 ** 9, limit_s=0, slowest_step_s=600, renders_s=0, writes_s=0)  # 0: no limit
    assert END_MARGIN_S == 60.0


def test_the_time_limit_times_the_slowest_step_without_its_checkpoint_and_the_writes(clock):
    limit = TimeLimit(30, started=clock.now, end_bytes=500 * 10 ** 6)
    assert limit.limit_s == 1800 and limit.writes_s() == 5.0  # 500 MB at the assumed 100 MB/s, none timed yet
    limit.begin_lap()
    clock.now += 300
    limit.step_done()
    clock.now += 500  # a step of 200 s, then its checkpoint of 300 s
    limit.checkpoint_took(300)
    limit.step_done(less_s=300)
    # the next step: the second's 200 s (the first's 300 s carried the start's warm-up); the last checkpoint and the
    # LoRA: 2 x 300 s
    assert limit.slowest_step_s == 200 and limit.writes_s() == 600
    limit.renders_s = 30
    assert limit.end_s() == 30 + 600 + 60
    # 800 s used + 200 + 690 = 1690 <= 1800; 111 s later it is over
    clock.now += 110
    assert not limit.stops_now()
    clock.now += 1
    assert limit.stops_now()
    assert limit.record() == {"max_minutes": 30.0, "minutes_used": round(911 / 60, 3), "stopped_at": None}


def test_the_next_step_is_timed_by_the_slowest_after_a_starts_first(clock):
    """The first step of a start carries its warm-up (compile, first kernel calls): after it the slowest later step
    predicts the next; a resume's recorded steps stand until this start has timed one."""
    limit = TimeLimit(60, started=clock.now, steps_s=[400.0, 90.0])
    assert limit.slowest_step_s == 400  # (recorded: before this start's first step)
    for took in (300, 100, 120, 110):  # a 300 s first step (compile), then ~100 s ones
        limit.begin_lap()
        clock.now += took
        limit.step_done()
        assert limit.slowest_step_s == {300: 300, 100: 100, 120: 120, 110: 120}[took]


def test_a_run_stops_before_its_limit_with_its_outputs_and_a_resume_trains_the_rest(tmp_path, clock, monkeypatch,
                                                                                    capsys, caplog):
    """Steps of 10 minutes, a 30-minute limit, 1 minute kept for the end: after step 1 (10 + 10 + 1 <= 30) it goes
    on, after step 2 (20 + 10 + 1 > 30) it stops with a checkpoint, lora/, the after samples and summary.json, and
    says so. A resume counts from its own start (the 20 minutes before are not its) under the run's limit: steps 3
    and 4; one with --max-minutes 40 takes that one, with no warning about the changed limit, and trains step 5."""
    original = Trainer.train_step

    def ten_minutes(self, step):
        done = original(self, step)
        clock.now += STEP_S
        return done

    monkeypatch.setattr(Trainer, "train_step", ten_minutes)
    from lowmem_alignprop.lora import lora_export
    exporting = lora_export.export

    def half_a_minute(*a, **k):  # the export at the end: rented time too, which summary.json's minutes_used counts
        clock.now += 30
        return exporting(*a, **k)

    monkeypatch.setattr(lora_export, "export", half_a_minute)
    out = tmp_path / "run"
    args = [*FAST, "--output-dir", str(out), "--steps", "5", "--set", "sample_prompts=1", "--set",
            "export_format=kohya"]
    assert main([*args, "--max-minutes", "30"]) == 0
    said = capsys.readouterr()
    assert [r["step"] for r in strict_rows(out)] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "samples" / "before_after.png").is_file()  # the after samples, as at a finished run's end
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps_done"], summary["interrupted"], summary["early_stopped_at"]) == (2, True, None)
    assert summary["time_limit"] == {"max_minutes": 30.0, "minutes_used": 20.5, "stopped_at": 2}
    assert "samples_skipped" not in summary
    assert not undocumented(summary, documented_keys(DOC.read_text(encoding="utf-8"))["summary.json"])
    line = next(x for x in said.out.splitlines() + said.err.splitlines() if x.startswith("time limit:"))
    assert line == (f"time limit: stopped after step 2 of 5, 20.0 min of --max-minutes 30 used (the next step, up to "
                    f"10.0 min, and the end's work, about 1.0 min, would pass it); saved checkpoint "
                    f"{out / 'checkpoints' / 'step-00000002'}, writing the LoRA, samples and summary. --resume latest "
                    "trains steps 3-5 under a new 30-minute clock (the run's limit; --max-minutes N gives another, "
                    "0 none)")
    assert " AlignProp stopped at its time limit (--max-minutes 30) after step 2 of 5 on cpu: continue with --resume " \
           "latest" in said.out
    card = (out / "export" / "kohya" / "README.md").read_text()  # the export at the end: its card says why it ended
    assert ("| time limit | stopped at its time limit (--max-minutes 30) after step 2 of 5: `--resume latest` trains "
            "steps 3-5 |") in card and "| note |" not in card

    assert main([*args, "--resume", "latest"]) == 0  # the run's 30 minutes again, from this start
    assert [r["step"] for r in strict_rows(out)] == [1, 2, 3, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["time_limit"] == {"max_minutes": 30.0, "minutes_used": 20.5, "stopped_at": 4}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main([*args, "--resume", "latest", "--max-minutes", "40"]) == 0
    assert [r["step"] for r in strict_rows(out)] == [1, 2, 3, 4, 5]
    assert not [r.getMessage() for r in caplog.records if "max_minutes" in r.getMessage()]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps_done"], summary["interrupted"]) == (5, False)
    assert summary["time_limit"] == {"max_minutes": 40.0, "minutes_used": 10.5, "stopped_at": None}
    card = (Path(summary["exports"]["kohya"]) / "README.md").read_text()  # (beside the earlier LoRAs' exports)
    assert "| time limit |" not in card and "| steps | 5 |" in card  # trained to its end


def test_an_out_of_memory_attempt_is_not_counted_in_the_next_steps_time(tmp_path, clock, monkeypatch):
    """--auto-fit: step 1 runs out of memory after 20 minutes, steps down and is repeated in 10. The next step is
    like the repeat (the lighter configuration's), not the failed attempt and the repeat together (30 min): with
    --max-minutes 45 the run trains step 2 (30 + 10 + 1 <= 45 after step 1) and stops after it; counting the failed
    attempt in the step it stopped after step 1, 14 minutes of the 45 unused."""
    import torch

    original, failed = Trainer.train_step, []

    def out_of_memory_once(self, step):
        if not failed:
            failed.append(step)
            clock.now += 1200
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        done = original(self, step)
        clock.now += STEP_S
        return done

    monkeypatch.setattr(Trainer, "train_step", out_of_memory_once)
    monkeypatch.setattr(Trainer, "step_down", lambda self, step, stage, detail, rng_before: None)  # (auto-fit's)
    out = tmp_path / "run"
    assert main([*FAST, "--output-dir", str(out), "--steps", "5", "--set", "sample_prompts=0",
                 "--max-minutes", "45"]) == 0
    assert failed == [1] and [r["step"] for r in strict_rows(out)] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["time_limit"] == {"max_minutes": 45.0, "minutes_used": 40.0,
                                                                           "stopped_at": 2}


def test_a_resumes_recorded_steps_count_until_it_has_timed_its_own(tmp_path, clock, monkeypatch):
    """A run whose steps took 20 minutes (another card, a heavier configuration) resumed where they take 5: the
    recorded 20 stand for the first step (0 + 20 + 1 <= 30 of --max-minutes 30: it trains), then this start's own
    steps do: it trains steps 3-7 (after step 7: 25 + 5 + 1 > 30). With the recorded 20 kept for every step it
    stopped after step 4, 19 of its 30 minutes unused."""
    original, took = Trainer.train_step, [1200.0]

    def timed(self, step):
        done = original(self, step)
        clock.now += took[0]
        done.row["seconds"] = took[0]  # (the metrics row's own time, which the checkpoint records)
        return done

    monkeypatch.setattr(Trainer, "train_step", timed)
    out = tmp_path / "run"
    args = [*FAST, "--output-dir", str(out), "--steps", "8", "--set", "sample_prompts=0"]
    assert main([*args, "--max-minutes", "60"]) == 0  # after step 2: 40 + 20 + 1 > 60
    assert [r["step"] for r in strict_rows(out)] == [1, 2]
    took[0] = 300.0
    assert main([*args, "--resume", "latest", "--max-minutes", "30"]) == 0
    assert [r["step"] for r in strict_rows(out)] == [1, 2, 3, 4, 5, 6, 7]
    assert json.loads((out / "summary.json").read_text())["time_limit"] == {"max_minutes": 30.0, "minutes_used": 25.0,
                                                                           "stopped_at": 7}


def test_a_limit_spent_before_the_first_step_is_one_line_and_writes_nothing(tmp_path, clock, monkeypatch, capsys):
    """Loading took 95 of --max-minutes 90 (the clock starts with the command): one line, no run folder. Its sample
    image before training, rendered by then, is not kept (the folder was left with samples/before.safetensors, which
    only a resume reads)."""
    original = Trainer.load_models

    def slow_load(self):
        original(self)
        clock.now += 95 * 60

    monkeypatch.setattr(Trainer, "load_models", slow_load)
    out = tmp_path / "run"
    # (the end's work: the minute's margin and the after render, timed as long as the before one took: on a loaded
    # host 3 s or more of it, "about 1.1 min"; the rule's numbers are test_the_rule_stops_when_...'s)
    assert_refused(main, [*FAST, "--set", "sample_prompts=1", "--output-dir", str(out), "--max-minutes", "90"],
                   "--max-minutes 90 leaves no time to train: 95.0 min went to loading and the renders before the "
                   "first step, and the end's work takes about 1.", out, capsys)


def test_under_a_launcher_every_rank_takes_rank_0s_decision(clock, monkeypatch):
    """Each rank has its own clock: rank 0's decision is every rank's (one collective a step), so they stop at the
    same step; with one process no collective is made."""
    from lowmem_alignprop.run import distributed

    asked = []
    monkeypatch.setattr(distributed, "rank_0_says", lambda accelerator, flag: asked.append(flag) or True)
    me = SimpleNamespace(time_limit=TimeLimit(30, started=clock.now), cfg=SimpleNamespace(steps=5, resolution=64),
                         accelerator=SimpleNamespace(num_processes=2))
    me.time_limit.begin_lap()
    clock.now += 60
    assert Trainer.out_of_time(me, 1, 0.0) is True  # this rank: 1 + 1 + 1 of 30 minutes, go on; rank 0: stop
    assert asked == [False]
    me.accelerator.num_processes = 1
    assert Trainer.out_of_time(me, 2, 0.0) is False and asked == [False]
    assert Trainer.out_of_time(me, 5, 0.0) is False  # the last step: the run ends anyway, nothing asked


def test_under_a_launcher_a_limit_spent_before_the_first_step_is_rank_0s_line_alone(clock, monkeypatch, capsys):
    """Rank 0's verdict that no step fits is every rank's, and so is its line: rank 0 prints it, and rank 1 leaves
    it to rank 0 (each rank printed it, rank 1 as 'error: [rank 1] --max-minutes ...' in its own clock's numbers)."""
    from lowmem_alignprop import cli
    from lowmem_alignprop.run import disk_space, distributed
    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.settings.errors import UserError

    monkeypatch.setattr(distributed, "rank_0_says", lambda accelerator, flag: True)  # rank 0: no room
    monkeypatch.setattr(disk_space, "run_bytes", lambda cfg, params, start: SimpleNamespace(least=0))
    me = SimpleNamespace(time_limit=TimeLimit(30, started=clock.now), cfg=Config(steps=5), refinish=None, point=None,
                         params=[], start=0, accelerator=SimpleNamespace(num_processes=2), is_main=False)
    clock.now += 60  # this rank: 1 + 1 of 30 minutes, room for a step
    with pytest.raises(UserError) as refused:
        Trainer.start_the_time_limit(me)
    assert str(refused.value).startswith("--max-minutes 30 leaves no time to train: 1.0 min went to loading")
    waited = []
    monkeypatch.setattr(cli, "global_rank", lambda: 1)
    monkeypatch.setattr(time, "sleep", waited.append)
    assert cli._report(refused.value) == 2
    assert waited == [cli.REPORT_WAIT_S]  # rank 1 waits for rank 0's line (the launcher stops it meanwhile)


@pytest.mark.parametrize("seconds, said", [(0.14, "0.1 s"), (11.4, "11 s"), (59.9, "60 s"), (60, "1.0 min"),
                                           (5700, "95.0 min")])
def test_the_times_said_are_minutes_or_seconds(seconds, said):
    assert time_limit.minutes(seconds) == said

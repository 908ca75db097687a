"""training/run_summary.py: the step line's time left (TimeLeft), on a fake clock."""

from lowmem_alignprop.training import run_summary
from lowmem_alignprop.training.run_summary import TimeLeft


def test_time_left_is_the_mean_gap_between_the_last_steps_times_the_steps_to_run(monkeypatch):
    clock = iter([100.0, 130.0, 150.0, 170.0, 171.0, 172.0])  # step 1 ends at 100 s (its warm-up is not a gap)
    monkeypatch.setattr(run_summary.time, "perf_counter", lambda: next(clock))
    left = TimeLeft(recent=3)
    assert left.after_step(1, 200, seconds=95.0) == " | 5.3 h left"  # no gap yet: the step's own 95 s x 199 = 5.25 h
    assert left.after_step(2, 200, seconds=30.0) == " | 99 min left"  # 30 s x 198 = 5940 s
    assert left.after_step(3, 200, seconds=20.0) == " | 82 min left"  # (30 + 20) / 2 x 197 = 4925 s
    assert left.after_step(4, 200, seconds=20.0) == " | 76 min left"  # (30 + 20 + 20) / 3 x 196 = 4573 s
    assert left.after_step(5, 200, seconds=1.0) == " | 44 min left"  # the last 3 gaps only: 41 / 3 x 195 = 2665 s
    assert left.after_step(200, 200, seconds=1.0) == ""  # nothing left to run


def test_a_skipped_first_step_says_nothing_until_a_gap_is_seen(monkeypatch):
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(run_summary.time, "perf_counter", lambda: next(clock))
    left = TimeLeft()
    assert left.after_step(1, 5, seconds=None) == ""  # a NaN step: no row, no seconds
    assert left.after_step(2, 5, seconds=2.0) == " | 6 s left"


def test_time_left_counts_the_evaluations_to_come_apart_from_the_steps(monkeypatch):
    """--eval-every 4: an evaluation of 300 s after step 4 is not spread over the steps' gaps (it made the next
    estimates 4x too long) and the two evaluations still to come count 300 s each (before the first nothing is known:
    the helper saw '68 s left' for a run that took 25 min)."""
    clock = iter([10.0, 20.0, 30.0, 340.0, 350.0])
    monkeypatch.setattr(run_summary.time, "perf_counter", lambda: next(clock))
    left = TimeLeft(eval_every=4)
    assert left.after_step(1, 12, seconds=10.0) == " | 110 s left"  # 11 steps x 10 s; no evaluation seen yet
    assert left.after_step(2, 12, seconds=10.0) == " | 100 s left"
    assert left.after_step(3, 12, seconds=10.0) == " | 90 s left"
    left.evaluated(300.0)  # after step 4: its gap is 10 s of training and 300 s of evaluation
    assert left.after_step(4, 12, seconds=10.0) == " | 11 min left"  # 8 x 10 s + 2 evaluations x 300 s = 680 s
    assert left.after_step(5, 12, seconds=10.0) == " | 11 min left"  # 7 x 10 s + 600 s = 670 s


def test_time_left_counts_the_last_steps_evaluation_when_the_steps_are_not_a_multiple(monkeypatch):
    """--eval-every 4 of 10 steps evaluates at 4, 8 and the last step, 10 (HeldOut.due): after step 1 three are to
    come, after step 8 one (it counted two and none: steps // 4 - step // 4 left the last step's out)."""
    clock = iter([10.0, 20.0, 30.0])
    monkeypatch.setattr(run_summary.time, "perf_counter", lambda: next(clock))
    left = TimeLeft(eval_every=4)
    left.evaluated(100.0)  # (an evaluation seen: each still to come counts 100 s)
    said = run_summary.fmt_duration
    assert left.after_step(1, 10, seconds=10.0) == f" | {said(9 * 10 + 3 * 100)} left"
    assert left.after_step(8, 10, seconds=10.0) == f" | {said(2 * 10 + 1 * 100)} left"
    assert left.after_step(9, 10, seconds=10.0) == f" | {said(1 * 10 + 100)} left"  # the last step's evaluation


def test_time_left_counts_the_toy_worlds_judgings_apart(monkeypatch):
    """--set fidelity_every 10 of 30 steps: a judging of 200 s after step 10 is not spread over the steps' gaps (the
    estimate jumped after each judged step) and the judgings at 20 and 30 count 200 s each."""
    clock = iter([10.0, 20.0, 230.0])
    monkeypatch.setattr(run_summary.time, "perf_counter", lambda: next(clock))
    left = TimeLeft(judge_every=10)
    said = run_summary.fmt_duration
    assert left.after_step(9, 30, seconds=10.0) == f" | {said(21 * 10)} left"  # no judging seen yet
    assert left.after_step(10, 30, seconds=10.0) == f" | {said(20 * 10)} left"
    left.evaluated(200.0, judging=True)  # step 10's judging: in the gap before step 11's end
    assert left.after_step(11, 30, seconds=10.0) == f" | {said(19 * 10 + 2 * 200)} left"


def test_the_steps_that_evaluate_and_checkpoint_are_counted_as_they_are_done():
    """One rule (run/schedule.py) for which steps do the periodic work and how many are left: the count after each
    step equals the steps after it that ``due`` picks, for every interval and length."""
    from lowmem_alignprop.run import schedule

    for steps in range(1, 14):
        for every in range(0, 15):
            picked = [s for s in range(1, steps + 1) if schedule.due(every, steps, s)]
            assert (steps in picked) == bool(every)  # the last step does it whenever the work is on
            for step in range(0, steps + 1):
                assert schedule.due_after(every, steps, step) == len([s for s in picked if s > step]), (steps, every)


def test_the_box_says_the_reward_first_to_last_and_its_change(tmp_path, capsys):
    """The end-of-run box's reward line: first -> last and last - first, signed (a fall is '-', a rise '+')."""
    from lowmem_alignprop.training.run_summary import print_summary
    from lowmem_alignprop.settings.config import Config

    s = {"reward_first": 0.5, "reward_last": 0.625, "device": "cpu", "seconds_per_step": 1.0, "peak_memory_gb": 1.0,
         "attention": "sdpa", "output_dir": str(tmp_path)}
    print_summary(s, Config(reward="brightness"), "cpu")
    assert "\n reward (brightness): 0.5000 -> 0.6250  (+0.1250)\n" in capsys.readouterr().out
    print_summary(dict(s, reward_first=0.625, reward_last=0.5), Config(reward="brightness"), "cpu")
    assert "\n reward (brightness): 0.6250 -> 0.5000  (-0.1250)\n" in capsys.readouterr().out
    # every step skipped: no time per step to give (it said 0.00 s/step)
    print_summary(dict(s, reward_first=float("nan"), reward_last=float("nan"), seconds_per_step=0.0),
                  Config(reward="brightness"), "cpu")
    assert "\n s/step n/a (no step trained), peak memory 1.000 GiB" in capsys.readouterr().out


def test_the_toy_world_lines_put_each_rate_before_then_after():
    """The box's toy-world lines: each exact rate, the score, the reward, its median and the JPEG size, before ->
    after, each from its own side (an after read from before shows no change: a run that helped looks useless)."""
    from lowmem_alignprop.training.run_summary import toy_world_lines

    def side(base: float) -> dict:
        return {"reward": 10 * base, "reward_median": 20 * base, "fidelity_score": base, "jpeg_bytes": 1000 * base,
                **{f"fidelity_{k}": base / d for k, d in (("all_ok", 1), ("objects_ok", 2), ("colours_ok", 4),
                                                          ("shapes_ok", 5), ("count_ok", 10))}}

    lines = toy_world_lines({"images": 8, "prompts": 4, "held_out": 2, "before": side(0.2), "after": side(0.8)})
    assert lines == [
        " toy world, 8 fixed-seed images of 4 prompts (2 held out from the toy model's training): reward 2.0000 -> "
        "8.0000 (median 4.0000 -> 16.0000)",
        "   exact fidelity: score 0.200 -> 0.800  all right 20% -> 80%  objects 10% -> 40%  colours 5% -> 20%  "
        "shapes 4% -> 16%  count 2% -> 8%",
        "   JPEG size: 200 -> 800 bytes"]
    assert toy_world_lines({"images": 8, "prompts": 4, "held_out": 4, "before": {}, "after": {}}) == []
    # fewer images judged than made (prompts outside the grammar): the line says how many (it read as all 8)
    few = toy_world_lines({"images": 8, "prompts": 4, "held_out": 2, "before": {**side(0.2), "fidelity_images": 3.0},
                           "after": {**side(0.8), "fidelity_images": 3.0}})
    assert few[1].startswith("   exact fidelity (3 of 8 images judged: the others' prompts are outside the grammar): "
                             "score 0.200 -> 0.800")


def test_a_judged_step_better_than_the_end_is_shown():
    """--set fidelity_every judges steps during the run: one whose exact fidelity beats the end's by more than one
    image's share (the docs' over-optimization run: 0.800 at step 10, 0.687 at the end, while toy_clip rose to step
    50) is in summary.json and the box; it showed only in metrics.jsonl, the box's before -> after both "rose"."""
    from lowmem_alignprop.training.run_summary import fidelity_peak, toy_world_lines

    after = {"fidelity_score": 0.6875, "fidelity_all_ok": 0.5, "fidelity_images": 32.0}
    history = [{"step": 1, "reward_mean": 60.0}, *({"step": s, "fidelity_score": f, "fidelity_all_ok": a,
                                                    "fidelity_reward": r} for s, f, a, r in
                                                   ((10, 0.8, 0.59375, 70.68), (20, 0.7375, 0.5, 70.25)))]
    peak = fidelity_peak(history, after)
    assert peak == {"step": 10, "fidelity_score": 0.8, "fidelity_all_ok": 0.59375, "reward": 70.68}
    assert fidelity_peak(history[:1], after) is None  # nothing judged during the run
    assert fidelity_peak(history, {**after, "fidelity_score": 0.78}) is None  # within one image's share (1/32)
    side = {"reward": 61.3, "fidelity_score": 0.675, "jpeg_bytes": 1365.0,
            **{f"fidelity_{k}": 0.5 for k in ("all_ok", "objects_ok", "colours_ok", "shapes_ok", "count_ok")}}
    lines = toy_world_lines({"images": 32, "prompts": 4, "held_out": 4, "before": side, "after": {**side, **after},
                             "peak": peak})
    assert lines[2] == ("   best at step 10 (score 0.800, all right 59%, reward 70.6800): training on made the images "
                        "worse by the exact evaluators (over-optimization); --eval-every N --set best_by=fidelity "
                        "keeps the best step")


def test_the_box_names_the_best_step_and_its_own_eval_reward(tmp_path, capsys):
    """The box's best line: the best step, its held-out eval_reward (best_eval_reward, not the objective best/ was
    chosen by) and, with best_by=fidelity or a reward_cap/reward_target objective, that objective beside it; step 0
    is said to be the untrained LoRA."""
    from lowmem_alignprop.training.run_summary import print_summary
    from lowmem_alignprop.settings.config import Config

    s = {"reward_first": 0.5, "reward_last": 0.625, "device": "cpu", "seconds_per_step": 1.0, "peak_memory_gb": 1.0,
         "attention": "sdpa", "output_dir": str(tmp_path), "best_step": 4, "best_eval_reward": 0.7125,
         "best_measure": 0.375, "best_kept": True}
    print_summary(s, Config(reward="brightness"), "cpu")
    assert f"\n best held-out evaluation: step 4, eval_reward 0.7125 -> {tmp_path}/best\n" in capsys.readouterr().out
    print_summary(s, Config(reward="brightness", best_by="fidelity"), "cpu")
    assert (f"\n best held-out evaluation: step 4, eval_fidelity_score 0.375, eval_reward 0.7125 -> {tmp_path}/best\n"
            in capsys.readouterr().out)
    print_summary(s, Config(reward="brightness", reward_cap=0.5), "cpu")  # the capped objective chose it
    assert (f"\n best held-out evaluation: step 4, eval_objective 0.3750, eval_reward 0.7125 -> {tmp_path}/best\n"
            in capsys.readouterr().out)
    print_summary(dict(s, best_step=0, best_kept=False), Config(reward="brightness"), "cpu")
    assert ("\n best held-out evaluation: step 0, eval_reward 0.7125 (the untrained LoRA: no trained step beat it) "
            "(its LoRA is not kept: no best/ or checkpoint of that step was left)\n") in capsys.readouterr().out
    # a run started from a LoRA (--init-lora): step 0 is that LoRA, not an untrained one
    print_summary(dict(s, best_step=0), Config(reward="brightness", init_lora="mine"), "cpu")
    assert "eval_reward 0.7125 (the LoRA it started from (--init-lora): no trained step beat it)" in \
        capsys.readouterr().out


def test_the_box_says_which_controls_against_over_optimization_were_on(tmp_path, capsys):
    """KL, DRaFT-LV, the reward cap/target and EMA change what a run's reward means (its EMA weights are what lora/
    holds): the box said none of them, only config.yaml and the card did. A run with none has no such line."""
    from lowmem_alignprop.training.run_summary import print_summary
    from lowmem_alignprop.settings.config import Config

    s = {"reward_first": 0.5, "reward_last": 0.625, "device": "cpu", "seconds_per_step": 1.0, "peak_memory_gb": 1.0,
         "attention": "sdpa", "output_dir": str(tmp_path)}
    print_summary(s, Config(reward="brightness"), "cpu")
    assert "over-optimization" not in capsys.readouterr().out
    print_summary(s, Config(reward="brightness", kl_coeff=0.1, lv_draws=4, reward_cap=0.6, ema_decay=0.99), "cpu")
    assert ("\n against over-optimization: kl_coeff=0.1 (DRaFT+ penalty), lv_draws=4 (DRaFT-LV), reward_cap=0.6, "
            "ema_decay=0.99 (the outputs are the EMA weights)\n") in capsys.readouterr().out
    print_summary(s, Config(reward="brightness", reward_target=0.7, ema_decay=0.9, ema_outputs=False), "cpu")
    assert ("\n against over-optimization: reward_target=0.7, ema_decay=0.9 (kept in checkpoints; the outputs are the "
            "trained weights)\n") in capsys.readouterr().out


def test_the_box_counts_skipped_steps_in_the_singular_and_plural(tmp_path, capsys):
    """One NaN-skipped step was said 'their loss ...: steps 2'."""
    from lowmem_alignprop.training.run_summary import print_summary
    from lowmem_alignprop.settings.config import Config

    s = {"reward_first": 0.5, "reward_last": 0.625, "device": "cpu", "seconds_per_step": 1.0, "peak_memory_gb": 1.0,
         "attention": "sdpa", "output_dir": str(tmp_path), "steps_done": 3}
    print_summary({**s, "skipped_steps": [2]}, Config(reward="brightness"), "cpu")
    assert ("\n 1 of them skipped, its loss NaN or infinite (no update; metrics.jsonl says what): step 2\n"
            in capsys.readouterr().out)
    print_summary({**s, "skipped_steps": [2, 3]}, Config(reward="brightness"), "cpu")
    assert ("\n 2 of them skipped, their loss NaN or infinite (no update; metrics.jsonl says what): steps 2, 3\n"
            in capsys.readouterr().out)



def box_head(s: dict, cfg, capsys) -> str:
    """The end box's first line (' AlignProp finished: ...' or ' AlignProp interrupted ...') for summary ``s``."""
    from lowmem_alignprop.training.run_summary import print_summary

    print_summary(s, cfg, "cpu")
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith(" AlignProp"))


def multi_process_summary(tmp_path, **more) -> dict:
    """A 2-process run's summary.json as the box reads it (no training: the box alone is under test)."""
    return {"reward_first": 0.5, "reward_last": 0.625, "device": "cpu", "seconds_per_step": 1.0,
            "peak_memory_gb": 1.0, "attention": "sdpa", "output_dir": str(tmp_path), "processes": 2,
            "resume_changes": [], **more}


def test_the_box_names_the_processes_in_every_ending(tmp_path, capsys):
    """The box's first line names the processes after a multi-process run that finished, stopped early or was
    interrupted (the interrupted line named none, nor the images a step, though summary.json had them)."""
    from lowmem_alignprop.settings.config import Config

    cfg = Config(steps=6, reward="brightness", batch_size=2, grad_accum=2)
    s, tail = multi_process_summary(tmp_path), f" (profile cpu, model {cfg.model})"
    assert box_head({**s, "steps_done": 6}, cfg, capsys) == \
        " AlignProp finished: 6 steps on cpu x 2 processes, 8 images a step" + tail
    assert box_head({**s, "steps_done": 4, "early_stopped_at": 4}, cfg, capsys) == \
        " AlignProp finished: 4 steps on cpu x 2 processes, 8 images a step" + tail
    assert box_head({**s, "steps_done": 3, "interrupted": True}, cfg, capsys) == \
        " AlignProp interrupted after step 3 of 6 on cpu x 2 processes, 8 images a step: continue with --resume latest"
    assert box_head({**s, "steps_done": 3, "interrupted": True, "processes": 1}, cfg, capsys) == \
        " AlignProp interrupted after step 3 of 6 on cpu: continue with --resume latest"


def test_the_box_gives_each_stretch_of_steps_its_process_count_after_a_resume_changed_it(tmp_path, capsys):
    """After a resume under another number of processes (resume_changes' processes [2, 1] from step 5) the box said
    this start's count only ('6 steps on cpu'), though steps 1-4 averaged 2 processes' images: it gives each stretch
    its count and images a step, in every ending; a resume that also changed batch_size counts that too."""
    from lowmem_alignprop.settings.config import Config

    cfg = Config(steps=6, reward="brightness", batch_size=2, grad_accum=2)
    tail = f" (profile cpu, model {cfg.model})"
    moved = multi_process_summary(tmp_path, processes=1,
                                  resume_changes=[{"step": 5, "changes": {"processes": [2, 1]}}])
    assert box_head({**moved, "steps_done": 6}, cfg, capsys) == (
        " AlignProp finished: 6 steps on cpu, steps 1-4 x 2 processes, 8 images a step; 5-6 x 1 process, "
        "4 images a step" + tail)
    assert box_head({**moved, "steps_done": 5, "early_stopped_at": 5}, cfg, capsys) == (
        " AlignProp finished: 5 steps on cpu, steps 1-4 x 2 processes, 8 images a step; 5 x 1 process, "
        "4 images a step" + tail)
    assert box_head({**moved, "steps_done": 5, "interrupted": True}, cfg, capsys) == (
        " AlignProp interrupted after step 5 of 6 on cpu, steps 1-4 x 2 processes, 8 images a step; 5 x 1 process, "
        "4 images a step: continue with --resume latest")
    # stopped before the resume trained a step: every step was 2 processes' (not this start's 1)
    assert box_head({**moved, "steps_done": 4, "interrupted": True}, cfg, capsys) == \
        " AlignProp interrupted after step 4 of 6 on cpu x 2 processes, 8 images a step: continue with --resume latest"
    # 2 processes x batch 2 -> 1 process x batch 4 (the same 8 images a step), then 3 processes x batch 2 from step 6
    both = multi_process_summary(tmp_path, processes=3, steps_done=6, resume_changes=[
        {"step": 2, "changes": {"processes": [2, 1], "batch_size": [2, 4]}},
        {"step": 6, "changes": {"processes": [1, 3], "batch_size": [4, 2]}}])
    assert box_head(both, cfg, capsys) == (
        " AlignProp finished: 6 steps on cpu, step 1 x 2 processes, 8 images a step; 2-5 x 1 process, 8 images a "
        "step; 6 x 3 processes, 12 images a step" + tail)
    one = Config(steps=4, reward="brightness", batch_size=1)  # a one-rank fault walk's resume: "1 images a step"
    alone = multi_process_summary(tmp_path, processes=1, steps_done=4,
                                  resume_changes=[{"step": 2, "changes": {"processes": [2, 1]}}])
    assert box_head(alone, one, capsys) == (
        " AlignProp finished: 4 steps on cpu, step 1 x 2 processes, 2 images a step; 2-4 x 1 process, 1 image a step"
        f" (profile cpu, model {one.model})")


def test_the_cards_processes_row_gives_each_stretch_the_images_it_averaged():
    """The card's "processes" row multiplied every stretch by the last start's batch_size x grad_accum (a resume that
    changed them gave the earlier steps the wrong images per step) and listed a stretch a resume began but trained no
    step of; the end box's rule (images_per_step) is now the card's too."""
    from lowmem_alignprop.lora.model_card import processes_row

    changed = {"steps": 6, "processes": 1, "batch_size": 4, "grad_accum": 1, "resume_changes": [
        {"step": 5, "changes": {"processes": [2, 1], "batch_size": [2, 4]}}]}
    assert processes_row(changed) == ("2 from step 1 (4 images per optimizer step); 1 from step 5 (4 images per "
                                      "optimizer step) (more than 1: under `accelerate launch --multi_gpu "
                                      "--num_processes N`)")
    unbegun = {"steps": 4, "processes": 1, "batch_size": 2, "grad_accum": 2, "resume_changes": [
        {"step": 5, "changes": {"processes": [2, 1]}}]}  # stopped before the resume trained step 5
    assert processes_row(unbegun) == ("2 (`accelerate launch --multi_gpu --num_processes 2`): 8 images per optimizer "
                                      "step")
    assert processes_row({"steps": 3, "processes": 1, "batch_size": 2}) is None
    alone = {"steps": 4, "processes": 1, "batch_size": 1, "grad_accum": 1, "resume_changes": [
        {"step": 3, "changes": {"processes": [2, 1]}}]}  # on one process at batch 1 (it said "1 images")
    assert processes_row(alone) == ("2 from step 1 (2 images per optimizer step); 1 from step 3 (1 image per optimizer "
                                    "step) (more than 1: under `accelerate launch --multi_gpu --num_processes N`)")


def test_time_left_counts_the_renders_after_the_last_step(monkeypatch):
    """The sample grid's and the judged images after training take as long as those before it (``closing``): FLUX.1's
    grid is half an hour on an 8 GB card, after a step line that said '1 s left'. Counted until the last step."""
    clock = iter([10.0, 20.0, 30.0])
    monkeypatch.setattr(run_summary.time, "perf_counter", lambda: next(clock))
    left = TimeLeft()
    left.closing = 1800.0
    assert left.after_step(1, 3, seconds=10.0) == f" | {run_summary.fmt_duration(2 * 10 + 1800)} left"
    assert left.after_step(2, 3, seconds=10.0) == f" | {run_summary.fmt_duration(10 + 1800)} left"
    assert left.after_step(3, 3, seconds=10.0) == ""  # (the end box follows)


def test_time_left_says_when_max_minutes_stops_the_training_before_the_last_step(monkeypatch):
    """With --max-minutes the step line said the time to the run's last step alone: '35 s left' at step 120 of 500
    when the limit stopped the start 14 steps later (the README's 2000 SDXL steps under --max-minutes 110: hours
    left in a session ending at 110 min). ``limit_s``: seconds until the limit (None: no limit); said only when the
    steps and the end's work (``closing`` and ``end_s``) pass it, as when the training stops: ``end_s`` before it."""
    clock = iter([10.0, 20.0, 30.0])
    monkeypatch.setattr(run_summary.time, "perf_counter", lambda: next(clock))
    left = TimeLeft()
    assert left.after_step(1, 500, seconds=10.0, limit_s=3000.0, end_s=60.0) == \
        " | 83 min left, --max-minutes stops this start's training in about 49 min"
    assert left.after_step(2, 500, seconds=10.0, limit_s=6000.0, end_s=60.0) == " | 83 min left"  # all fit
    assert left.after_step(3, 500, seconds=10.0) == " | 83 min left"  # (no limit)


def test_the_time_max_minutes_stops_the_training_in_leaves_the_renders_after_it_before_the_limit(monkeypatch):
    """The training stops where the next step, the renders after the last step, the last writes and the margin would
    pass the limit (run/time_limit.stops_before_next_step): the step line's "stops in about X" is the limit less all
    of the end's work (it left out the renders: X was later than the stop by the renders' time)."""
    from lowmem_alignprop.run import time_limit

    clock = iter([10.0])
    monkeypatch.setattr(run_summary.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(time_limit, "clock", lambda: 0.0)
    limit = time_limit.TimeLimit(50.0, started=0.0)  # 3000 s, none used yet
    limit.renders_s = 600.0  # the before renders took 10 min: the after ones will
    left = TimeLeft()
    left.closing = 600.0
    assert limit.left_and_end() == (3000.0, 600.0 + limit.writes_s() + time_limit.END_MARGIN_S)
    stops = run_summary.fmt_duration(3000.0 - limit.end_s())  # 39 min (it said 49: the renders left out)
    assert left.after_step(1, 500, 10.0, *limit.left_and_end()) == \
        f" | 93 min left, --max-minutes stops this start's training in about {stops}"
    assert time_limit.TimeLimit(0.0).left_and_end() == ()  # no limit: nothing said
    # the stop rule's verdict at that time, one step before it and one after
    stop = 3000.0 - limit.end_s()
    assert not time_limit.stops_before_next_step(stop - 10.0 - 1.0, 3000.0, 10.0, 600.0, limit.writes_s())
    assert time_limit.stops_before_next_step(stop - 10.0 + 1.0, 3000.0, 10.0, 600.0, limit.writes_s())

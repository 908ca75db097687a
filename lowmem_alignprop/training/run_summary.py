"""The box printed at the end of a training run: the reward first -> last, the toy world's exact evaluation,
speed, memory against the budget, and what the run wrote."""

from __future__ import annotations

import math
import os
import time
from collections import deque
from pathlib import Path

from lowmem_alignprop.training.evaluation import BEST_DIR, improvement_measure, step_zero
from lowmem_alignprop.lora.model_card import images_per_step, trained_counts
from lowmem_alignprop.measure.reports import fmt_duration
from lowmem_alignprop.run import schedule
from lowmem_alignprop.run.filenames import INIT_LORA_DIR
from lowmem_alignprop.settings.config import Config


def toy_world_lines(t: dict | None) -> list[str]:
    """The summary's toy-world lines: the reward and the exact held-out fidelity, before -> after."""
    if not t or "fidelity_all_ok" not in t["before"]:
        return []
    b, a = t["before"], t["after"]
    rates = "  ".join(f"{name} {b[f'fidelity_{key}']:.0%} -> {a[f'fidelity_{key}']:.0%}" for key, name in
                      (("all_ok", "all right"), ("objects_ok", "objects"), ("colours_ok", "colours"),
                       ("shapes_ok", "shapes"), ("count_ok", "count")))
    held = "all held out" if t["held_out"] == t["prompts"] else f"{t['held_out']} held out"
    median = f" (median {b['reward_median']:.4f} -> {a['reward_median']:.4f})" if "reward_median" in b else ""
    judged = judged_of(b, t["images"])
    peak = t.get("peak")  # (--set fidelity_every: a step judged better than the end, where the reward rose on)
    return [f" toy world, {t['images']} fixed-seed images of {t['prompts']} prompts ({held} from the toy model's "
            f"training): reward {b['reward']:.4f} -> {a['reward']:.4f}{median}",
            f"   exact fidelity{judged}: score {b['fidelity_score']:.3f} -> {a['fidelity_score']:.3f}  {rates}",
            *([f"   best at step {peak['step']} (score {peak['fidelity_score']:.3f}, all right "
               f"{peak['fidelity_all_ok']:.0%}, reward {peak['reward']:.4f}): training on made the images worse by "
               "the exact evaluators (over-optimization); --eval-every N --set best_by=fidelity keeps the best step"]
              if peak else []),
            f"   JPEG size: {b['jpeg_bytes']:.0f} -> {a['jpeg_bytes']:.0f} bytes"
            + (f"  objects per image {b['fidelity_objects']:.2f} -> {a['fidelity_objects']:.2f}"  # toy_count's aim
               if "fidelity_objects" in b else "")]


def fidelity_peak(history: list[dict], after: dict) -> dict | None:
    """The judged step (--set fidelity_every) whose exact fidelity score beats the run's end by more than one image's
    share (the end's image count), or None: {"step", "fidelity_score", "fidelity_all_ok", "reward"}."""
    judged = [h for h in history if h.get("fidelity_score") is not None and h.get("fidelity_reward") is not None]
    if not judged:
        return None
    best = max(judged, key=lambda h: h["fidelity_score"])
    if best["fidelity_score"] <= after["fidelity_score"] + 1 / max(1, int(after.get("fidelity_images", 1))):
        return None
    return {"step": best["step"], "fidelity_score": best["fidelity_score"],
            "fidelity_all_ok": best["fidelity_all_ok"], "reward": best["fidelity_reward"]}


def judged_of(figures: dict, images: int) -> str:
    """' (N of M images judged)' where the exact evaluators judged fewer images than were made (the others' prompts
    are outside the toy world's grammar), else nothing."""
    n = int(figures.get("fidelity_images", images))
    return f" ({n} of {images} images judged: the others' prompts are outside the grammar)" if n < images else ""


class TimeLeft:
    """The step line's estimate of the time left, for a run read from a log file (a terminal also has the progress
    bar's): the mean wall time between this process's last steps (sampling and checkpoints included; its first step,
    which pays the warm-up, left out once there are others) times the steps still to run, plus the held-out
    evaluations still to come times the mean one (an evaluation can take many steps' time: it is counted apart), and
    the toy world's judgings (fidelity_every) likewise, and ``closing``: the renders after the last step (the sample
    grid's and the judged images after training, as long as those before it took: FLUX.1's grid, half an hour on an
    8 GB card)."""

    def __init__(self, recent: int = 10, eval_every: int = 0, judge_every: int = 0):
        self.ends: deque[tuple[float, float]] = deque(maxlen=recent + 1)  # (end time, evaluation seconds before it)
        self.eval_every, self.judge_every = eval_every, judge_every
        self.evals: list[float] = []  # each held-out evaluation's seconds
        self.judgings: list[float] = []  # each judging's seconds (it made the estimate jump after a judged step)
        self.pending = 0.0  # the evaluation after the step being recorded
        self.closing = 0.0  # the renders after the last step (RunSamples.render_before sets it)

    def evaluated(self, seconds: float, judging: bool = False) -> None:
        """The held-out evaluation (``judging``: the toy world's judged images) after the step just trained took
        ``seconds`` (told before the next :meth:`after_step`)."""
        (self.judgings if judging else self.evals).append(seconds)
        self.pending += seconds

    def after_step(self, step: int, steps: int, seconds: float | None, limit_s: float | None = None,
                   end_s: float = 0.0) -> str:
        """' | 12 min left' after step ``step`` of ``steps`` (``seconds``: that step's own time, used while no
        interval has been seen; None for a skipped step); '' after the last step. ``limit_s``: the seconds
        --max-minutes leaves this start (None: no limit): where the steps and the end's work (``end_s``: the renders
        after the last step, the last writes and the margin, as the limit's rule counts them) pass it, the limit stops
        the start's training before the last step, ``end_s`` before the limit (said)."""
        self.ends.append((time.perf_counter(), self.pending))
        self.pending = 0.0
        left = steps - step
        if left <= 0:
            return ""
        ends = self.ends  # the mean gap between them, less the evaluations in it, is their span over their count - 1
        per_step = ((ends[-1][0] - ends[0][0] - sum(e for _, e in list(ends)[1:])) / (len(ends) - 1) if len(ends) > 1
                    else seconds)
        if per_step is None:
            return ""
        evals_left = schedule.due_after(self.eval_every, steps, step)  # the last step's evaluation included
        mean_eval = sum(self.evals) / len(self.evals) if self.evals else 0.0  # none seen yet: not counted
        judged_left = steps // self.judge_every - step // self.judge_every if self.judge_every else 0
        mean_judging = sum(self.judgings) / len(self.judgings) if self.judgings else 0.0
        steps_s = left * per_step + evals_left * mean_eval + judged_left * mean_judging
        total = steps_s + self.closing
        if limit_s is not None and steps_s + end_s > limit_s:  # (end_s holds the renders after: closing's stand-in)
            stops = fmt_duration(max(0.0, limit_s - end_s))  # (the end's work after it: within the limit)
            return f" | {fmt_duration(total)} left, --max-minutes stops this start's training in about {stops}"
        return f" | {fmt_duration(total)} left"


def window_note(s: dict) -> str:
    """What the summary's first -> last reward compares (runfolder.first_last_rewards)."""
    n = s.get("reward_window")
    if not n:
        return ""
    steps = f"first and last {n} step{'s' if n > 1 else ''}"
    if s.get("reward_since_step"):  # a resume changed the reward: the steps before it scored another one
        steps += f" since step {s['reward_since_step']}, where a resume changed the reward or how its images are made"
    if s.get("reward_prompts") is None:
        why = f" (a resume at step {s['prompts_since_step']} changed them)" if s.get("prompts_since_step") else ""
        return f"  [{steps}, different prompts{why}: noisy]"
    return f"  [the same {s['reward_prompts']} prompt{'s' if s['reward_prompts'] > 1 else ''}, {steps}]"


def alignment_controls(cfg: Config) -> str:
    """The loss's and the weights' controls against reward over-optimization that the run had on, in words ("":
    none; held-out evaluation and early stop have lines of their own)."""
    on = [f"kl_coeff={cfg.kl_coeff:g} (DRaFT+ penalty)" if cfg.kl_coeff else "",
          f"lv_draws={cfg.lv_draws} (DRaFT-LV)" if cfg.lv_draws > 1 else "",
          f"reward_cap={cfg.reward_cap:g}" if cfg.reward_cap is not None else "",
          f"reward_target={cfg.reward_target:g}" if cfg.reward_target is not None else "",
          f"ema_decay={cfg.ema_decay:g} (" + ("the outputs are the EMA weights)" if cfg.ema_outputs else
                                           "kept in checkpoints; the outputs are the trained weights)")
          if cfg.ema_decay else ""]
    return ", ".join(filter(None, on))


def processes_note(s: dict, cfg: Config, done: int) -> str:
    """' x 2 processes, 8 images a step' for the run's steps (nothing for one process); where a resume changed the
    number of processes (model_card.process_counts' stretches), each stretch of steps with its count and images:
    ', steps 1-4 x 2 processes, 8 images a step; 5-6 x 1 process, 4 images a step' (batch_size is per process)."""
    counts = trained_counts(s, done)  # (a stretch a resume began but trained no step of: none)
    ends = [first - 1 for first, _ in counts[1:]] + [done]

    def images(first: int, n: int) -> str:
        count = images_per_step(s, first, n, {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum})
        return f"{count} image{'s' * (count != 1)} a step"  # (1: a resume on one process at batch 1)

    if len(counts) == 1:
        n = counts[0][1]
        return f" x {n} processes, {images(1, n)}" if n > 1 else ""
    return ", " + "; ".join(
        ("" if i else "steps " if end > first else "step ") + (f"{first}-{end}" if end > first else f"{first}")
        + f" x {n} process{'es' * (n != 1)}, {images(first, n)}"
        for i, ((first, n), end) in enumerate(zip(counts, ends)))


def print_summary(s: dict, cfg: Config, profile_name: str, exported=None) -> None:
    """The end-of-run box: what the run did and every output it wrote (``exported``: lora_export.Exported, what
    export_format and push_to_hub did)."""
    change = s["reward_last"] - s["reward_first"]
    done = s.get("steps_done") or cfg.steps
    skipped = len(s.get("skipped_steps") or [])
    lines = [
        "",
        "=" * 64,
        (f" AlignProp stopped at its time limit (--max-minutes {s['time_limit']['max_minutes']:g}) after step "
         f"{s.get('steps_done')} of {cfg.steps} on {s['device']}{processes_note(s, cfg, s.get('steps_done') or 0)}: "
         "continue with --resume latest" if (s.get("time_limit") or {}).get("stopped_at") is not None else
         f" AlignProp interrupted after step {s.get('steps_done')} of {cfg.steps} on {s['device']}"
         f"{processes_note(s, cfg, s.get('steps_done') or 0)}: continue with --resume latest"
         if s.get("interrupted") else
         f" AlignProp finished: {done} step{'s' if done != 1 else ''} on {s['device']}"
         + processes_note(s, cfg, done)  # (each step: all their images; batch_size is per process)
         + f" (profile {profile_name}, "
         f"model {cfg.model}{' at commit ' + s['model_revision'] if s.get('model_revision') else ''})"),
        *([f" {skipped} of them skipped, {'their loss' if skipped > 1 else 'its loss'} NaN or infinite (no update; "
           f"metrics.jsonl says what): step{'s' if skipped > 1 else ''} {', '.join(map(str, s['skipped_steps']))}"]
          if skipped else []),
        f" reward ({cfg.reward}): {s['reward_first']:.4f} in the only step "
        + (f"it scored (a resume at step {s['reward_since_step']} changed the reward or its images; "
           if s.get("reward_since_step") else "(") + "nothing to compare it with)"
        if math.isfinite(change) and s.get("reward_steps") == 1 else
        f" reward ({cfg.reward}): {s['reward_first']:.4f} -> {s['reward_last']:.4f}  ({change:+.4f}){window_note(s)}"
        if math.isfinite(change) else
        f" reward ({cfg.reward}): no step trained (skipped: {s.get('skipped_steps')}); see metrics.jsonl",
    ]
    if controls := alignment_controls(cfg):  # (config.yaml and the card say them too; the box is what one reads)
        lines.append(f" against over-optimization: {controls}")
    if s.get("early_stopped_at"):
        lines.append(f" early stop at step {s['early_stopped_at']} of {cfg.steps}: the held-out evaluation "
                     f"({improvement_measure(cfg)}) had not improved for {cfg.early_stop} evaluations")
    if s.get("best_step") is not None:
        measure = improvement_measure(cfg)  # what chose it, beside its eval_reward where that is another figure
        lines.append(f" best held-out evaluation: step {s['best_step']}, "
                     + (f"eval_fidelity_score {s['best_measure']:.3f}, " if cfg.best_by == "fidelity" else
                        f"eval_objective {s['best_measure']:.4f}, " if measure.startswith("eval_objective") else "")
                     + f"eval_reward {s['best_eval_reward']:.4f} "
                     + (f"({step_zero(cfg)}: no trained step beat it) " if s["best_step"] == 0 else "")
                     + (f"-> {s['output_dir']}/{BEST_DIR}" if s.get("best_kept", True) else
                        "(its LoRA is not kept: no best/ or checkpoint of that step was left)"))
    elif "best_step" in s:  # --eval-every, and no evaluation counted
        lines.append(" best held-out evaluation: none counted (each was skipped: see the warnings; or none was due "
                     "yet), so no best/")
    if "sample_reward_before" in s:
        lines.append(f" fixed-seed samples:  {s['sample_reward_before']:.4f} -> {s['sample_reward_after']:.4f}")
    if s.get("samples_skipped"):
        lines.append(f" after samples skipped ({s['samples_skipped']}): lowmem-alignprop sample "
                     f"{s['output_dir']}/lora renders the base and the LoRA side by side")
    lines += toy_world_lines(s.get("toy_world"))
    if s.get("at_cap_steps"):
        n = len(s["at_cap_steps"])
        lines.append(f" reward_cap={cfg.reward_cap:g}: {n} of {done} steps made no update (every image at the cap; "
                     "metrics.jsonl's at_cap)")
    if s.get("fp16_overflow_skips"):
        lines.append(f" fp16 loss scaling: {s['fp16_overflow_skips']} update(s) skipped on overflow while it found "
                     "its scale (normal in the first steps)")
    budget = {True: f" (budget {s.get('budget_gb')} GiB: fits)",
              False: f", OVER the {s.get('budget_gb')} GiB budget: see memory_report.md", None: ""}
    trained = (f"{s['output_dir']}/lora (pipe.load_lora_weights)" if s.get("trained", "lora") == "lora" else
               f"{s['output_dir']}/unet (UNet2DConditionModel.from_pretrained)")
    lines += [
        (f" {s['seconds_per_step']:.2f} s/step" if s["seconds_per_step"] > 0 else " s/step n/a (no step trained)")
        + ", peak memory "
        + ("n/a (no measured step trained)" if s["peak_memory_gb"] is None else f"{s['peak_memory_gb']:.3f} GiB")
        + budget[s.get("fits_budget")] + f", attention {s['attention']}"
        + ("" if s.get("cuda_allocator") in (None, "cpu") else f", allocator: {s['cuda_allocator']}"),
        f" wrote: {trained}, " + ("samples/, " if (Path(s["output_dir"]) / "samples").is_dir() else "")
        + ("best/, " if s.get("best_step") is not None and s.get("best_kept", True) else "")
        + "metrics.jsonl, summary.json,",
        "        memory_report.{json,md,png}, config.yaml, command.txt, prompts.json, "
        + (f"{INIT_LORA_DIR}/, " if (Path(s["output_dir"]) / INIT_LORA_DIR).is_dir() else "")
        + "checkpoints/ (--resume latest)",
    ]
    if exported is not None and exported.folders:  # export_format's folders, each loadable where its README.md says
        lines.append("        " + ", ".join(
            f"export --format {fmt} FAILED (its line above)" if p is None else
            f"{p.relative_to(s['output_dir'])}/" if p.is_relative_to(s["output_dir"]) else f"{p}/"
            for fmt, p in exported.folders.items()))
    if cfg.report_to == "tensorboard":
        lines.append(f"        logs/ (tensorboard --logdir {s['output_dir']}/logs)")
    if cfg.report_to == "wandb":  # (its files: logs/wandb/, or $WANDB_DIR; the run's page: its URL above)
        where = os.environ.get("WANDB_DIR") or f"{s['output_dir']}/logs"
        lines.append(f"        wandb's run files in {where}/wandb (wandb sync {where}/wandb/RUN when offline)")
    if exported is not None and exported.repo:
        lines.append(f" pushed to {exported.url}" if exported.url else
                     f" push to {exported.repo} FAILED ({exported.push_failed}; summary.json's pushed_to_hub)")
    lines += ["=" * 64]
    print("\n".join(lines), flush=True)

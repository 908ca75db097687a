"""What keeps a run from over-optimising its reward, around the training step (docs/design.md section 10):

- :class:`WeightEMA`: an exponential moving average of the trained weights (diffusers' ``EMAModel``), swapped in for
  the after samples, evaluation, ``best/`` and the exported LoRA when ``ema_outputs`` is on;
- :class:`HeldOut`: every ``eval_every`` steps the held-out prompts are sampled with fixed seeds and scored
  (``eval_reward``), the best evaluated step's LoRA is kept in ``best/``, and ``early_stop`` ends the run after that
  many evaluations without improvement. Its state (best so far, patience) travels in the checkpoints.

:meth:`HeldOut.evaluate` is the hook for further metrics: each function in ``HeldOut.evaluators`` gets the images
(``[N, 3, H, W]`` in [0, 1]) and their prompts and returns a dict of numbers, added to the ``eval_*`` metrics.
"""

from __future__ import annotations

import contextlib
import filecmp
import functools
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import torch

from lowmem_alignprop.run import atomic
from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.run import resume_rules
from lowmem_alignprop.run.faults import finite_or_none
from lowmem_alignprop.run import runfolder, schedule
from lowmem_alignprop.run.filenames import BEST_DIR, BEST_FILE
from lowmem_alignprop.run.runlock import next_free_dir
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.step.rollout import loss_from_reward

log = logging.getLogger("lowmem_alignprop")

EVAL_SEED_OFFSET = 54321  # held-out image n is sampled with seed + EVAL_SEED_OFFSET + n, at every evaluation and at
# any batch_size (`sample --seed` of that renders it again); the toy world's judged image n likewise
SAMPLE_SEED_OFFSET = 12345  # the sample grid (before, samples/step-N, after) is sampled with seed + SAMPLE_SEED_OFFSET
EMA_FILE = "ema.pt"  # in a checkpoint: the EMA's state_dict
EVAL_SCORING = "while scoring the held-out evaluation's images (--eval-every)"  # the reward's error, said as whose
EVAL_FIX = "fix the reward, or drop --eval-every"


def step_zero(cfg) -> str:
    """What step 0 is, in a line: the LoRA the run started from, untrained or --init-lora's."""
    return "the LoRA it started from (--init-lora)" if cfg.init_lora else "the untrained LoRA"


def measure_key(cfg) -> str:
    """The evaluation's figure best/ and the early stop go by (higher is better): best_by's."""
    return "eval_fidelity_score" if cfg.best_by == "fidelity" else "eval_objective"


def improvement_measure(cfg) -> str:
    """What "improved" means for best/ and early stop, in words: the reward, or with reward_cap/reward_target the
    objective they make (eval_reward may then rise while it does not), or best_by=fidelity's exact score."""
    if cfg.best_by == "fidelity":
        return "eval_fidelity_score, the toy world's exact fidelity of the held-out images"
    if cfg.reward_target is not None:
        return f"eval_objective, the held-out reward's distance to reward_target={cfg.reward_target:g}"
    if cfg.reward_cap is not None:
        return f"eval_objective, the held-out reward capped at reward_cap={cfg.reward_cap:g}"
    return "eval_reward"


def schedule_note(cfg: Config, resumed_at: int = 0, spent: int | None = None) -> str | None:
    """What --eval-every and --early-stop cannot do in a run of ``cfg.steps`` steps (None: nothing): the run
    evaluates every eval_every steps and at its last step (and at step 0 with eval_on_start, which counts for best/
    and the early stop), and an early stop needs early_stop evaluations after the best one, all before the last step
    (a stop there is the run's end). A resume from step ``resumed_at`` counts the evaluations after it, and ``spent``:
    those without improvement since its best so far (None: no best yet, the best and early_stop more needed)."""
    every, steps, patience = cfg.eval_every, cfg.steps, cfg.early_stop
    if not every or resumed_at >= steps:  # (a resume of a finished run trains and evaluates nothing)
        return None
    start = int(cfg.eval_on_start and not resumed_at)  # step 0's evaluation of the untrained LoRA
    before_last = schedule.due_after(every, steps, resumed_at) - 1 + start  # the evaluations before the last step's
    needed = patience + 1 if spent is None else patience - spent
    if patience and before_last < needed:
        return (f"early_stop={patience} cannot stop this run: it evaluates {before_last} time(s) before its last "
                f"step (every {every} of {steps} steps{', and step 0' if start else ''}"
                f"{f', from step {resumed_at + 1}' if resumed_at else ''}), and a stop needs {needed} "
                f"{'(the best, then ' if spent is None else '('}{patience if spent is None else needed} "
                f"without improving{f'; {spent} of {patience} spent before the resume' if spent is not None else ''}"
                f"); use {_stop_fixes(every, steps, patience, resumed_at, start, needed)}")
    if every >= steps and steps > 1 and not resumed_at:
        which = ("evaluates only the untrained LoRA (eval_on_start) and the last step: best/ is one of the two" if start
                 else "evaluates only at the last step: best/ is the last step's LoRA")
        return f"--eval-every {every} with {steps} steps {which}; use --eval-every {max(1, steps // 4)} to choose " \
               "among steps"
    return None


def _stop_fixes(every: int, steps: int, patience: int, resumed_at: int, start: int, needed: int) -> str:
    """The changes that let an early stop happen (:func:`schedule_note`): the fewest --steps that hold the
    evaluations it needs, and a smaller --early-stop or --eval-every only where there is one (1 is the least of
    both: early_stop=0 is no early stop)."""
    enough = steps + 1
    while schedule.due_after(every, enough, resumed_at) - 1 + start < needed:
        enough += 1
    smaller = [flag for flag, value in (("--early-stop", patience), ("--eval-every", every)) if value > 1]
    return f"--steps {enough} or more" + (f" (or a smaller {' or '.join(smaller)})" if smaller else "")


def patience_spent(state: dict, cfg: Config, held_out_sha: str | None) -> int | None:
    """A resumed checkpoint's evaluations without improvement since its best so far, which this run goes on counting
    (:func:`schedule_note`'s ``spent``); None where its best and patience start over: no best yet, or its evaluation
    measured otherwise (best_by, the reward, the held-out prompts...: :func:`resume_rules.eval_basis_changed`)."""
    evaluation = state.get("evaluation") or {}
    if evaluation.get("best_step") is None or resume_rules.eval_basis_changed(state, cfg, held_out_sha):
        return None
    return int(evaluation.get("since_best") or 0)


def renders_note(cfg: Config) -> str | None:
    """--sample-every / fidelity_every past the run's last step: nothing rendered during it (None: nothing to say)."""
    late = [f"{name}={getattr(cfg, name)}" for name in ("sample_every", "fidelity_every")
            if getattr(cfg, name) > cfg.steps]
    if not late:
        return None
    return (f"{' and '.join(late)} with {cfg.steps} steps: nothing is rendered during this run, only before and after "
            f"it; use a smaller interval (e.g. {max(1, cfg.steps // 4)})")


def nonfinite_note(rewards: torch.Tensor, what: str) -> str | None:
    """``"the reward is NaN or infinite on 2 of 4 <what>"``, or None when every reward is finite."""
    bad = int((~torch.isfinite(rewards)).sum())
    return f"the reward is NaN or infinite on {bad} of {rewards.numel()} {what}" if bad else None


def render_fixed_seed(sample: Callable, prompts: list[str], seed: int, chunk: int | None = None,
                      per_image: bool = False):
    """``prompts`` rendered and scored by ``sample(prompts, seed) -> (images, rewards)`` in chunks of ``chunk``
    prompts (all in one call when None), chunk i with ``seed + i``: the same images at every call; ``per_image``:
    image n with its own ``seed + n`` (``sample`` gets the chunk's list of seeds), so an image does not depend on
    the chunking. The one render loop of the held-out evaluation, of the sample grid (before, ``--sample-every``'s
    step N, after) and of the toy world's judged images."""
    size = chunk or max(len(prompts), 1)
    parts = [sample(prompts[i:i + size], [seed + n for n in range(i, min(i + size, len(prompts)))] if per_image
                    else seed + i // size) for i in range(0, len(prompts), size)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


class WeightEMA:
    """diffusers' ``EMAModel`` over the trained parameters. The first update copies the weights; the n-th averages with
    decay n / (9 + n) until that reaches ``ema_decay``. :meth:`swapped` puts the average into the model for a while."""

    def __init__(self, params: list, decay: float, names: list[str]):
        from diffusers.training_utils import EMAModel

        if len(names) != len(params):
            raise ValueError(f"WeightEMA: {len(names)} names for {len(params)} parameters")
        self.params, self.decay, self.names = params, decay, names
        self.model = EMAModel(params, decay=decay)  # fp32 copies of the trained weights: a few MB for a LoRA (the
        # whole UNet's size with train_unet=full; the planner counts it)

    def update(self) -> None:
        self.model.step(self.params)

    @contextlib.contextmanager
    def swapped(self, on: bool = True):
        """The average in the model's weights inside the block, the trained weights back afterwards."""
        if not on:
            yield
            return
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)

    def save(self, folder: Path) -> None:
        """Its state (ema.pt, to resume) and its weights by name (what export and sample read of the checkpoint)."""
        from safetensors.torch import save_file

        torch.save(self.model.state_dict(), folder / EMA_FILE)
        save_file(ckpt.cpu_copies(zip(self.names, self.model.shadow_params)), str(folder / ckpt.EMA_WEIGHTS))

    def load(self, folder: Path) -> bool:
        """The checkpoint's average (False when it holds none: the average starts from the weights now)."""
        path = folder / EMA_FILE
        if not path.is_file():
            return False
        self.model.load_state_dict(ckpt.load_tensors(path))  # (a damaged file or one holding code: one line)
        self.model.decay = self.decay  # this run's setting; the average and its update count are the checkpoint's
        self.model.to(self.params[0].device)
        return True


class HeldOut:
    """Held-out evaluation, best/ and early stop. ``sample(prompts, seed) -> (images, rewards)`` is the trainer's
    fixed-seed sampler (no gradient); ``write_lora(folder)`` writes the LoRA as it is now."""

    def __init__(self, cfg: Config, prompts: list[str], out: Path, *, sample: Callable, write_lora: Callable):
        self.cfg, self.prompts, self.out = cfg, prompts, out
        self.sample, self.write_lora = sample, write_lora
        self.evaluators: list[Callable[[torch.Tensor, list[str]], dict]] = []
        self.best: float | None = None  # the best objective so far (higher is better)
        self.best_step: int | None = None
        self.best_reward: float | None = None
        self.since_best = 0  # evaluations since the best one
        self.stopped_at: int | None = None
        self.best_kept = True  # best/ holds best_step's LoRA (a resume may find it gone: keep_best_of)
        self.set_aside: tuple[Path, int | None] | None = None  # keep_best_of's best-before-step-N/ and its step

    def due(self, step: int) -> bool:
        return schedule.due(self.cfg.eval_every, self.cfg.steps, step)

    def evaluate(self) -> dict:
        """Every held-out prompt, sampled with fixed seeds (image n: seed + EVAL_SEED_OFFSET + n, the same at every
        evaluation whatever the batch size) and scored: eval_reward,
        eval_reward_std, eval_objective (what best/ is chosen by: -loss, so nearest reward_target when it is set)
        and every evaluator's metrics, prefixed eval_. A figure that is NaN or inf is None (null); a reward that is
        NaN or inf on any image adds ``eval_skipped`` (why), and :meth:`after_evaluation` does not count it."""
        imgs_all, r_all = render_fixed_seed(self.sample, self.prompts, self.cfg.seed + EVAL_SEED_OFFSET,
                                            self.cfg.batch_size, per_image=True)  # (not the batch's: a resume's own)
        r_all = r_all.float()
        metrics = {"eval_reward": r_all.mean().item(), "eval_reward_std": r_all.std(unbiased=False).item(),
                   "eval_objective": -loss_from_reward(r_all, self.cfg).item()}
        for fn in self.evaluators:
            metrics.update({k if k.startswith("eval_") else f"eval_{k}": float(v)
                            for k, v in fn(imgs_all, list(self.prompts)).items()})
        metrics = {k: finite_or_none(v) for k, v in metrics.items()}
        skipped = nonfinite_note(r_all, "held-out images") or (
            None if metrics["eval_objective"] is not None else "the evaluation's objective is NaN or infinite")
        return {**metrics, "eval_skipped": skipped} if skipped else metrics

    def after_evaluation(self, step: int, metrics: dict, is_main: bool) -> None:
        """Keep the step in best/ when it improved on the best so far; count the evaluations since; decide the
        early stop. An evaluation whose reward is NaN or inf (``eval_skipped``) is said and counted for neither."""
        objective = metrics.get(measure_key(self.cfg))
        if objective is None and not metrics.get("eval_skipped"):  # best_by=fidelity: no prompt parsed, or NaN
            metrics["eval_skipped"] = f"no {measure_key(self.cfg)} (best_by={self.cfg.best_by})"
        if metrics.get("eval_skipped"):
            if is_main:
                log.warning("step %d: evaluation skipped: %s (not counted for best/ or the early stop); check %s",
                            step, metrics["eval_skipped"], "the held-out prompts (the toy world's grammar)"
                            if self.cfg.best_by == "fidelity" and metrics.get("eval_reward") is not None
                            else f"the reward {self.cfg.reward!r}")
        elif self.best is None or objective > self.best:
            self.best, self.best_step, self.best_reward, self.since_best = objective, step, metrics["eval_reward"], 0
            if is_main:
                self.write_best(step, metrics)
        else:
            self.since_best += 1
            if is_main:  # (said as an improvement is: the patience an early stop spends shows in the log)
                patience = f"; --early-stop stops the run at {self.cfg.early_stop}" if self.cfg.early_stop else ""
                log.info("%s, not above step %d's %.4f (%d evaluation%s without improvement%s)",
                         self.said(step, metrics), self.best_step, self.best, self.since_best,
                         "s" * (self.since_best != 1), patience)
        metrics.update(eval_best_step=self.best_step, eval_since_best=self.since_best)
        if self.cfg.early_stop and self.since_best >= self.cfg.early_stop:
            self.stopped_at = step

    def write_best(self, step: int, metrics: dict) -> None:
        """best/ replaced atomically: written into a temporary folder, synced, then renamed into place."""
        evaluated = {k: v for k, v in metrics.items() if k.startswith("eval_")}
        self._publish_best(self.write_lora, {"step": step, **evaluated, "eval_prompts": len(self.prompts),
                                             "seed": self.cfg.seed})
        self.best_kept = True
        log.info("%s, the best so far: its LoRA is in %s", self.said(step, metrics), self.out / BEST_DIR)

    def said(self, step: int, metrics: dict) -> str:
        """An evaluation's figures for its log line: eval_reward, and what best/ is chosen by where that differs (the
        objective of reward_target or reward_cap, the toy world's fidelity)."""
        key, reward = measure_key(self.cfg), metrics.get("eval_reward")
        return (f"step {step}{f' ({step_zero(self.cfg)})' if step == 0 else ''}: eval_reward "
                + ("n/a" if reward is None else f"{reward:.4f}")
                + (f", {key} {metrics[key]:.4f}" if metrics.get(key) not in (None, reward) else ""))

    def _publish_best(self, write: Callable[[Path], object], record: dict) -> None:
        """best/ written whole (``write(folder)`` the weights, best.json ``record``) into a temporary folder, synced,
        then renamed into place."""
        with atomic.replacing_dir(self.out / BEST_DIR) as tmp:
            write(tmp)
            (tmp / BEST_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
        self._drop_repeated_aside(record["step"])

    def _drop_repeated_aside(self, step: int) -> None:
        """The best/ this start set aside, when the step just written to best/ is its step with the same weights,
        bit for bit: a kill between step N's best/ and its checkpoint, whose resume trained step N again, left a
        best-before-step-N/ that repeated best/ (one more for each such kill)."""
        if self.set_aside is None or self.set_aside[1] != step:
            return
        aside, self.set_aside = self.set_aside[0], None
        names = [sorted(p.name for p in folder.glob("*.safetensors")) for folder in (aside, self.out / BEST_DIR)]
        if names[0] and names[0] == names[1] and all(filecmp.cmp(aside / n, self.out / BEST_DIR / n, shallow=False)
                                                     for n in names[0]):
            atomic.remove_dir(aside)
            log.info("resume: %s held step %d's LoRA, which this run trained again to the same weights: removed",
                     aside, step)

    @property
    def exhausted(self) -> bool:
        return self.stopped_at is not None

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "best_reward": self.best_reward,
                "since_best": self.since_best}

    def load_state(self, state: dict | None) -> None:
        if state:
            self.best, self.best_step = state.get("best"), state.get("best_step")
            self.best_reward, self.since_best = state.get("best_reward"), int(state.get("since_best", 0))

    def keep_best_of(self, start: int, origin: Path | None) -> None:
        """After a resume (rank 0): best/ holds the LoRA of the best step the evaluation state names, as the summary
        says. A best/ of another step (a branch set aside: a later step; an evaluation that measures otherwise now)
        moves to best-before-step-N/; the best step's LoRA comes from the resumed run's best/ (a resume into a new
        folder) or from its checkpoint of that step; when neither is kept, the summary says so."""
        final = self.out / BEST_DIR
        if final.exists() and self.best_step is not None and runfolder.best_step(final) == self.best_step:
            return
        if final.exists():
            aside = next_free_dir(self.out / f"{BEST_DIR}-before-step-{start + 1}", Path.exists)
            final.rename(aside)
            self.set_aside = (aside, runfolder.best_step(aside))
            log.warning("resume: %s held the LoRA of step %s, not of the best evaluation this run continues from "
                        "(%s): moved to %s", final, runfolder.best_step(aside),
                        "none yet" if self.best_step is None else self.best_step, aside)
        if self.best_step is None:
            return
        source = origin / BEST_DIR if origin is not None else None
        if source is not None and source.resolve() != final.resolve() and runfolder.best_step(source) == self.best_step:
            with atomic.replacing_dir(final) as tmp:
                shutil.copytree(source, tmp, dirs_exist_ok=True)
            log.info("resume: best/ (step %d) copied from %s", self.best_step, source)
            return
        for run in dict.fromkeys(r for r in (self.out, origin) if r is not None) if self.cfg.train_unet == "lora" \
                else ():  # (a full fine-tune's checkpoint holds no LoRA to write)
            checkpoint = ckpt.step_dir(run / ckpt.DIRNAME, self.best_step)
            if not checkpoint.is_dir():
                continue
            from lowmem_alignprop.models.loading import write_checkpoint_lora

            try:  # (write_checkpoint_lora verifies the checkpoint's checksums first)
                self._publish_best(functools.partial(write_checkpoint_lora, checkpoint),
                                   {"step": self.best_step, "eval_reward": self.best_reward,
                                    measure_key(self.cfg): self.best, "from": str(checkpoint)})  # (best_by's)
            except UserError:  # damaged: another run's, or none
                continue
            log.info("resume: best/ (step %d) written from %s", self.best_step, checkpoint)
            return
        self.best_kept = False
        log.warning("resume: the best held-out evaluation so far (step %d) has no LoRA kept (no best/ or checkpoint "
                    "of that step): the next better evaluation writes best/", self.best_step)

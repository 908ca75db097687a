"""A run's fixed-seed renders without gradient (:class:`RunSamples`, part of
:class:`~lowmem_alignprop.training.train.Trainer`): the sample grid before training, at --sample-every's steps and
after; the toy world's judged images (fidelity_*) before, at --set fidelity_every's steps and after.
"""

import contextlib
import functools
import logging
import time
from pathlib import Path

import torch

from lowmem_alignprop.memory import host_allocator
from lowmem_alignprop.run import faults, input_files
from lowmem_alignprop.run.before_images import before_key, read_before, write_before
from lowmem_alignprop.run.distributed import agreed_failure
from lowmem_alignprop.run.filenames import BEFORE_FILE, SAMPLES_DIR, step_grid_name
from lowmem_alignprop.run.trackers import log_images
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.image_size import resolution_of
from lowmem_alignprop.training.evaluation import EVAL_SEED_OFFSET, SAMPLE_SEED_OFFSET, nonfinite_note, render_fixed_seed

log = logging.getLogger("lowmem_alignprop")
JUDGE_PIXELS = 32 * 64 * 64  # pixels per no-grad chunk of the toy world's judged images


def judged_figures(judged: dict | None) -> dict:
    """The toy world's judged-image figures as a metrics line holds them: fidelity_reward* beside the fidelity_* rates
    (eval_reward is the held-out evaluation's), without the per-image lists (summary.json keeps those)."""
    return {(f"fidelity_{k}" if k.startswith("reward") else k): v for k, v in (judged or {}).items()
            if not k.startswith("image_")}


class RunSamples:
    """The Trainer's renders with no gradient, mixed into the Trainer (training/train.py); the held-out evaluation
    renders through :meth:`generate` too.

    Reads the Trainer's ``cfg``, ``accelerator``, ``out``, ``is_main``, ``device``, ``place``, ``family``,
    ``embed``, ``nograd_unet``, ``scheduler``, ``vae``, ``reward``, ``ema``, ``samples_here``, ``sample_prompts``,
    ``judge_prompts``, ``point``, ``render_together``, ``reward_sha``, ``input_files``, ``time_left``, ``time_limit``
    and ``before``, and its methods ``score``, ``render_or_skip``; sets ``before``, ``fidelity_before``,
    ``samples_skipped``, ``grid_of``, ``time_left.closing`` and ``time_limit.renders_s``."""

    def output_weights(self):
        """The weights the after samples, evaluation, best/ and lora/ use: the EMA's with ema_outputs, else the
        trained ones."""
        return self.ema.swapped(self.cfg.ema_outputs) if self.ema is not None else contextlib.nullcontext()

    def generate(self, batch_prompts: list[str], seed: int | list[int], *,
                 when: str = "while scoring the fixed-seed sample images",
                 fix: str = "fix it, or skip the samples with --set sample_prompts=0"):
        """Fixed-seed images and rewards with no gradient (the before/after grid): one generator for the batch, or with
        a list of seeds each image its own (its noise then does not depend on which images share its batch). A user
        reward's error names ``when`` and ``fix`` (the held-out evaluation's own). Under ZeRO-3 with several processes
        (``render_together``) every rank hears of one rank's failure in the decode or the reward before the next chunk's
        rollout, whose weight gathers the failed rank would not join: every rank raises it (the others as
        AnotherProcessFailed), so the callers skip the samples, or stop, together."""
        cfg, place = self.cfg, self.place
        # a render without gradients keeps its freed blocks in the heap (a third of its time was page faults)
        heap = host_allocator.wider_threshold(cfg.cpu_malloc_threshold_kib if self.device.type == "cpu" else 0)
        with torch.no_grad(), self.accelerator.autocast(), heap:
            emb = self.embed(batch_prompts)
            if isinstance(seed, list):  # diffusers' schedulers draw image i's step noise from g[i]
                g = [torch.Generator().manual_seed(s) for s in seed]
                lat = torch.cat([self.family.initial_latents(cfg, 1, one, self.device) for one in g])
            else:
                g = torch.Generator().manual_seed(seed)
                lat = self.family.initial_latents(cfg, len(batch_prompts), g, self.device)
            lat = self.family.rollout(cfg, self.nograd_unet, None, self.scheduler, lat, emb, k=0, generator=g)
            failed = None
            try:
                place.to_device("vae", self.vae)
                place.to_device("reward", self.reward)
                imgs = self.family.decode(self.vae, lat, cfg, sliced=True)
                r = self.score(imgs, batch_prompts, when, fix)
            except Exception as e:  # (a CtrlC is every rank's: the stop request's own agreement)
                failed = e
            if self.render_together:
                failed = agreed_failure(self.accelerator, failed, "scoring of the fixed-seed images")
            if failed is not None:
                raise failed
            if self.render_together:  # (the after samples: a stop request skips the rest, every process together)
                self.stop.raise_if_agreed(self.accelerator)
            place.park("vae", self.vae)
            place.park("reward", self.reward)
        return imgs.float().cpu(), r.cpu()

    @property
    def before_file(self) -> Path:
        """samples/before.safetensors: the images before training, kept for a resume (run/before_images.py)."""
        return self.out / SAMPLES_DIR / BEFORE_FILE

    def render_before(self) -> None:
        """The sample grid's images and the toy world's judged figures of the untrained LoRA (so before a checkpoint is
        restored). A resume reads back those its run's start rendered with the same settings (samples/
        before.safetensors: run/before_images.py) and renders the rest; under ZeRO-3 with several processes, which
        render together, every start renders them."""
        path = self.before_file
        key = before_key(self.cfg, self.sample_prompts, self.judge_prompts, self.reward_sha, self.device,
                         input_files.contents(self.input_files))
        kept = read_before(path, key) if self.point is not None and self.is_main and not self.render_together else {}
        if kept:
            log.info("the images before training: read back from samples/%s (the run's start rendered them)",
                     BEFORE_FILE)
        seconds, t0 = dict(kept.get("seconds", {})), time.perf_counter()
        if "samples" in kept:
            self.before = kept["samples"]
        else:
            self.sample_before()
            seconds["samples"], t0 = time.perf_counter() - t0, time.perf_counter()
        if "judged" in kept:
            self.fidelity_before = kept["judged"]
        else:
            self.fidelity_before = self.render_or_skip(self.judge, "judging the images before training",
                                                       "a smaller --set fidelity_images")
            seconds["judged"] = time.perf_counter() - t0
        after_grid = not (self.cfg.sample_every and self.cfg.steps % self.cfg.sample_every == 0)  # (else the last
        # step's grid is the after one, in that step's time)
        self.time_left.closing = seconds.get("samples", 0.0) * after_grid + seconds.get("judged", 0.0)
        # max_minutes: a stop at the limit renders both after its step (no step grid at every step)
        self.time_limit.renders_s = seconds.get("samples", 0.0) + seconds.get("judged", 0.0)
        rendered = ("samples" not in kept and self.before is not None) or \
            ("judged" not in kept and self.fidelity_before is not None)
        if self.is_main and rendered:  # (a resume's start renders them again only where they changed)
            write_before(path, key, self.before, self.fidelity_before, seconds)

    def sample_before(self) -> None:
        cfg = self.cfg
        if not (self.sample_prompts and self.samples_here):
            return
        if self.is_main:  # (under ZeRO-3 every rank renders them, together)
            log.info("sampling %d fixed-seed image%s before training (%s px, %d step%s; --set sample_prompts=0 skips "
                     "it)", len(self.sample_prompts), "s" * (len(self.sample_prompts) != 1),
                     resolution_of(cfg.width, cfg.height), cfg.sample_steps, "s" * (cfg.sample_steps != 1))
        self.before = self.render_or_skip(self.render_samples, "rendering the sample images before training",
                                          "a smaller --set sample_prompts")
        if self.before is None:  # no grid during or after training either: each compares with these
            self.samples_skipped = "out of memory while the before samples were rendered"

    def nograd_chunk(self) -> int:
        """Images per no-grad render (the sample grid, the judged images): a training micro-batch, which fits with
        gradients, so surely without; small images JUDGE_PIXELS at a time (the toy model's 32 images at 64 px in one:
        a few MiB, and ~40% less time per image on a CPU than chunks of 4)."""
        return max(self.cfg.batch_size, JUDGE_PIXELS // (self.cfg.width * self.cfg.height))

    def render_samples(self):
        """The sample grid's fixed-seed images and rewards: before training, at --sample-every's steps, after. Image n
        has its own seed (seed + SAMPLE_SEED_OFFSET + n), as `sample --seed` gives its images: each one can be
        rendered again alone, whatever sample_prompts is, and the same in chunks of any size."""
        return render_fixed_seed(self.generate, self.sample_prompts, self.cfg.seed + SAMPLE_SEED_OFFSET,
                                 self.nograd_chunk(), per_image=True)

    def judge(self) -> dict | None:
        """The toy world's exact evaluators (docs/toy_world.md) on fixed-seed images of the run's prompts: fidelity_*
        rates, jpeg_bytes and the reward's mean; None outside the toy world or with fidelity_images=0."""
        if not (self.judge_prompts and self.samples_here):
            return None
        from lowmem_alignprop.toy.fidelity import evaluate_batch

        render = functools.partial(self.generate, when="while scoring the toy world's judged images",
                                   fix="fix it, or leave them out with --set fidelity_images=0")
        # image n's own seed: the same images whatever the chunk
        images, scores = render_fixed_seed(render, self.judge_prompts, self.cfg.seed + EVAL_SEED_OFFSET,
                                           self.nograd_chunk(), per_image=True)
        # toy_clip is bimodal (a blank image scores far below a drawn one): the median beside the mean
        return {"reward": scores.mean().item(), "reward_median": scores.median().item(),
                **evaluate_batch(images, self.judge_prompts),
                # each image's figures (summary.json: which images moved; not in metrics.jsonl's rows)
                "image_rewards": scores.tolist(), "image_scores": self.image_scores(images)}

    def image_scores(self, images: torch.Tensor) -> list[float | None]:
        """Each judged image's exact fidelity score (None where the grammar does not parse its prompt)."""
        from lowmem_alignprop.toy.fidelity import fidelity, parses

        judged = [i for i, p in enumerate(self.judge_prompts) if parses(p)]
        scores: list[float | None] = [None] * len(self.judge_prompts)
        for i, r in zip(judged, fidelity(images[judged], [self.judge_prompts[i] for i in judged]) if judged else []):
            scores[i] = r.score
        return scores

    def judge_if_due(self, step: int) -> dict:
        """--set fidelity_every=N (toy world): the exact evaluators' figures for the step's metrics line
        (fidelity_reward* beside the fidelity_* rates: eval_reward is the held-out evaluation's), judged on the
        weights the summary's "after" uses (the EMA's with ema_outputs); out of memory or the reward's error skips
        them, as they do the sample grid."""
        cfg = self.cfg
        if not (cfg.fidelity_every and step % cfg.fidelity_every == 0):
            return {}
        try:
            with self.output_weights():
                judged = self.render_or_skip(self.judge, f"judging the images of step {step}",
                                             "a smaller --set fidelity_images")
        except UserError as e:  # the reward's error on the judged images: training goes on without the figures
            log.warning("%s (no fidelity figures at step %d)", e, step)
            return {}
        return judged_figures(judged) if judged else {}

    def sample_if_due(self, step: int) -> dict:
        """--sample-every N: the grid's prompts and seeds rendered at steps N, 2N, ...: samples/step-N.png (before
        vs step N), the image to the tracker; returns the rewards for the step's metrics line."""
        from lowmem_alignprop.training.grid import save_sample_grid

        cfg = self.cfg
        if not (cfg.sample_every and step % cfg.sample_every == 0 and self.before is not None):
            return {}
        try:
            with self.output_weights():  # with ema_outputs the EMA's images, as lora/ will render
                rendered = self.render_or_skip(self.render_samples, f"rendering the samples of step {step}",
                                               "a smaller --set sample_prompts")
        except UserError as e:  # the reward's error on the sample images: training goes on without them
            log.warning("%s (no samples at step %d)", e, step)
            return {}
        if rendered is None:
            return {}
        images, rewards = rendered
        self.grid_of = (step, rendered)  # the after samples, when no step changes the LoRA after it
        if self.is_main:
            grid = save_sample_grid(self.out / SAMPLES_DIR / step_grid_name(step), self.sample_prompts, self.before,
                                    (images, rewards), row_names=("before", f"step {step}"))
            log_images(self.accelerator, cfg.report_to, grid, "samples/during_training", step)
        if note := nonfinite_note(rewards, "sample images"):
            log.warning("step %d: %s (null in metrics.jsonl); check the reward %r", step, note, cfg.reward)
        return {"sample_reward_mean": faults.finite_or_none(rewards.mean()),
                "sample_rewards": [faults.finite_or_none(r) for r in rewards.tolist()]}

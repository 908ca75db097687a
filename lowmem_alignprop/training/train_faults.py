"""The training loop's fault handling (:class:`LoopFaults`, a phase of
:class:`~lowmem_alignprop.training.train.Trainer`): an out-of-memory error steps down (--auto-fit) or stops with the
change that fits; any other error, a failed held-out evaluation or an unwritable metrics.jsonl keeps the finished
steps in a checkpoint and raises one line; a render the run can go without is skipped. docs/design.md section 5.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from lowmem_alignprop.memory import stages
from lowmem_alignprop.memory.placement import configure_cuda_allocator
from lowmem_alignprop.run import atomic
from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.run import faults
from lowmem_alignprop.run.filenames import CONFIG_FILE
from lowmem_alignprop.run.stop_request import CtrlC
from lowmem_alignprop.settings.errors import UserError, error_words, first_line
from lowmem_alignprop.settings.config import flag_value
from lowmem_alignprop.settings.image_size import describe_sizes, lower_resolution, resolution_of, step_size
from lowmem_alignprop.models.sampling import enable_block_checkpointing, enable_vae_checkpointing
from lowmem_alignprop.measure import planner
from lowmem_alignprop.rewards import user_term_in_traceback

log = logging.getLogger("lowmem_alignprop")


class LoopFaults:
    """What the loop (Trainer.fit and the step's renders) does when something fails, mixed into the Trainer
    (training/train.py).

    Reads the Trainer's ``cfg``, ``accelerator``, ``out``, ``is_main``, ``device``, ``prof``, ``optimizer``,
    ``rng``, ``history``, ``fits``, ``last_saved``, ``all_failed``, ``render_together``, ``place``, ``vae``,
    ``embed``, ``bare_unet``, ``family`` and its methods ``save_checkpoint``, ``config_yaml``, ``build_reward``;
    sets (--auto-fit's step-down) ``reward``, ``allocator`` and the live objects each changed setting reaches."""

    def step_down(self, step: int, stage: str, detail: str, rng_before) -> None:
        """Out of memory in ``stage``: with --auto-fit apply the next lighter setting (the step is then repeated with
        the same prompts and K); else keep the finished steps in a checkpoint and stop with the change that fits."""
        cfg = self.cfg
        self.prof.end_step(aborted=f"out of memory in {stage}")  # its figures are not the configuration that trains
        self.optimizer.zero_grad(set_to_none=True)  # frees the half-built gradients before the retry
        faults.free_memory()  # and the failed step's cached blocks: the retry starts from a clean allocator
        weightless = not any(True for _ in self.reward.parameters())  # (brightness: nothing to checkpoint)
        fit = faults.next_fit(cfg, stage, suggest=planner.next_feature, skip=("reward_ckpt",) if weightless else ())
        peak = faults.peak_so_far([h.get("peak_memory_gb") for h in self.history])
        size = (f"{resolution_of(*step_size(cfg, step))} px of sizes {describe_sizes(cfg.resolution)}"
                if len(cfg.sizes) > 1 else None)  # (several sizes: the step's)
        message = faults.oom_message(stage, step, peak, cfg.budget_gb, fit, cfg.auto_fit, batch=cfg.batch_size,
                                     size=size)
        self.rng.setstate(rng_before)  # a repeat, or the checkpoint's resume, draws this step's prompts and K again
        if not cfg.auto_fit or fit is None or self.accelerator.num_processes > 1:
            # the steps done so far are kept: --resume latest continues (with the change the message names)
            _, kept = self.keep_steps(step - 1, fix_first=False)
            if self.fits and self.is_main:  # the step-downs made so far, which the checkpoint's config holds
                atomic.write_text(self.out / CONFIG_FILE, self.config_yaml())
            changes = " (with --auto-fit's changes so far: config.yaml lists them)" if self.fits and kept else ""
            raise faults.OutOfMemory(f"{message}{kept}{changes} [{detail}]") from None
        log.warning("auto-fit at step %d (%s): %s; applying it and repeating the step", step, stage, message)
        self.apply_fit(fit)
        self.fits.append({"step": step, "stage": stage, "change": fit.overrides, "why": fit.description})

    def apply_fit(self, fit: faults.Fit) -> None:
        """--auto-fit: switch the live run to a lighter configuration (the ladder's or the planner's step). Each
        setting reaches the object that acts on it: the tests/test_auto_fit.py rung tests check every one."""
        cfg, keys = self.cfg, set(fit.overrides)
        cfg.with_changes(**fit.overrides)  # a change that does not validate fails here, before any field moves
        for key, value in fit.overrides.items():
            setattr(cfg, key, value)  # batch_size, sliced_decode, tiled_decode, activation_offload: read per step
        if "cache_prompt_embeddings" in keys:  # the prompt encoder holds its own copy of the flag
            self.embed.caching = cfg.cache_prompt_embeddings
        if "grad_accum" in keys:
            self.accelerator.gradient_accumulation_steps = cfg.grad_accum
        if "vae_checkpointing" in keys:
            enable_vae_checkpointing(self.vae, cfg.vae_checkpointing)
        if cfg.unet_checkpointing == "blocks" and "unet_checkpointing" in keys:
            enable_block_checkpointing(self.bare_unet)  # keep one input per UNet block, recompute in backward
        if "reward_checkpointing" in keys:
            self.reward = self.build_reward()
            self.place.where.pop("reward", None)
            self.place.park("reward", self.reward)
        if "offload_frozen" in keys:
            self.place.offload_enabled = cfg.offload_frozen
        if "attention" in keys:
            self.family.set_attention(self.bare_unet, self.vae, cfg.attention, self.device)
        if "expandable_segments" in keys:  # segments made from now on (the OOM handler emptied the cache) grow in place
            self.allocator = configure_cuda_allocator(cfg.expandable_segments)

    def checkpoint_dir(self, step: int) -> Path:
        """Where the run's checkpoint of ``step`` is (or would be)."""
        return ckpt.step_dir(ckpt.root_of(self.out), step)

    def keep_steps(self, last: int, *, fix_first: bool = True) -> tuple[Path | None, str]:
        """An error stops the run: steps 1..``last`` into a checkpoint (one process only: a failure on one of several
        cannot save with the others). Returns it and the tail of the error's message that says so ("" when none),
        with what to do next once the error is fixed (``fix_first=False``: an error whose message names its fix)."""
        saved = None
        if (self.accelerator.num_processes == 1 or self.all_failed) and last >= 1:  # all_failed: every rank is here
            if last > (self.last_saved or 0):
                saved = self.save_checkpoint(last)
            elif last == self.last_saved and self.checkpoint_dir(last).is_dir():  # saved already
                saved = self.checkpoint_dir(last)
        then = " once it is fixed" if fix_first else ""
        if saved is None:  # step 1 failed: nothing to keep, and a rerun into the same folder starts afresh
            rerun = f": run the same command again{then}" if fix_first else ""
            return None, f"; no step had finished, so none is saved{rerun}" if last < 1 else ""
        done = "step 1 is" if last == 1 else f"steps 1-{last} are"
        return saved, f"; {done} saved in {saved}: --resume latest continues{then}"

    def eval_fewer_at_a_time(self) -> str:
        """The held-out evaluation renders batch_size images at a time: the fault ladder's smaller micro-batch, which
        keeps the images per step (a bare --set batch_size=N changed training's too)."""
        fit = faults.LADDER["batch"](self.cfg)
        if fit is None:  # (batch 1, or DeepSpeed's fixed micro-batch): the planner's lower resolution, every size of a
            lower = lower_resolution(self.cfg.resolution)  # list lowered (a bare N would replace the list)
            return f"evaluate at a lower resolution (--set resolution={flag_value(lower)})" if lower is not None else \
                "evaluate at a lower resolution"
        return f"evaluate on fewer images at a time ({fit.as_flags()}: the same images per step)"

    def evaluation_failed(self, step: int, e: BaseException) -> None:
        """The held-out evaluation after step ``step`` (trained and recorded) failed: steps 1..step go into a
        checkpoint and the error says so; raises."""
        saved, kept = self.keep_steps(step)
        if isinstance(e, UserError):  # the user's reward failed on the held-out images (named by score())
            raise UserError(f"step {step}: {e}{kept}") from None
        if faults.is_oom(e):
            raise UserError(f"step {step}: out of memory in the held-out evaluation after it ({first_line(e, 100)}): "
                            f"{self.eval_fewer_at_a_time()} or less often (--eval-every N){kept}") from None
        if saved:
            log.error("step %d's evaluation failed; steps 1-%d are saved in %s (--resume latest)", step, step, saved)
        raise e

    def keep_finished_steps(self, e: BaseException, step: int, rng_before) -> None:
        """An error in a step: the steps before it go into a checkpoint; a reward's error is named as the user's,
        whatever it is (SystemExit and KeyboardInterrupt from the reward's own code included: the stop requests of
        Ctrl-C and SIGTERM never raise in a step)."""
        cfg = self.cfg
        stage = faults.stage_of(e, "the loop")  # StageGuard tagged it with the stage it happened in
        self.prof.end_step(aborted=f"an error in {stage}")
        self.optimizer.zero_grad(set_to_none=True)  # the failed step's gradients freed before the checkpoint
        self.rng.setstate(rng_before)  # the checkpoint resumes at this step, with its prompts and K
        saved, kept = self.keep_steps(step - 1)
        if isinstance(e, UserError):
            raise UserError(f"step {step}: {e}{kept}") from None
        if stage == stages.REWARD:  # the reward is the user's code (or weights): their error, named
            raise UserError(f"step {step}: the reward {cfg.reward!r} raised {error_words(e)}{kept}") from None
        if not isinstance(e, CtrlC) and user_term_in_traceback(cfg.reward, e):  # the reward's own backward (a custom
            # autograd Function, a hook) raised in the backward stage: a traceback, exit 1 (and "interrupted")
            raise UserError(f"step {step}: the reward {cfg.reward!r} raised {error_words(e)} (its code, in stage "
                            f"{stage}){kept}") from None
        if not isinstance(e, (Exception, KeyboardInterrupt)):  # sys.exit deep in a library: never a silent exit
            raise UserError(f"step {step}: {error_words(e)} in stage {stage}{kept}") from None
        if isinstance(e, OSError) and atomic.is_disk_full(e):
            raise UserError(f"step {step}: {atomic.describe(e)} (writing {atomic.file_of(e)}){kept or ''}; free "
                            "space in --output-dir, then --resume latest") from None
        if (ended := self.another_process_ended(e, f"step {step}")) is not None:
            raise ended from None
        if saved:
            log.error("step %d failed in %s; the steps before it are saved in %s (--resume latest)", step, stage, saved)
        raise e

    def another_process_ended(self, e: BaseException, when: str) -> UserError | None:
        """The line for a collective that failed ``when`` because another process ended (kill -9, the host's OOM
        killer: a 40-line traceback of the backend's), naming what is kept; None for any other error."""
        from lowmem_alignprop.run.distributed import peer_lost

        if self.accelerator.num_processes == 1 or (lost := peer_lost(e)) is None:
            return None
        newest = self.last_saved  # without a checkpoint: what the same command again meets (RunFolder.check)
        return UserError(f"{when}: another process of the run ended (the launcher's report names it; {lost}): "
                         + (f"--resume latest continues from step {newest}'s checkpoint" if newest else
                            "no step had finished: run the same command again" if ckpt.holds_a_run(self.out) is None
                            else f"no checkpoint was written yet, so the finished steps are lost (--checkpoint-every N"
                            f" keeps them): delete {self.out} to start again there"))

    def write_step_metrics(self, step: int, row: dict) -> None:
        """Rank 0 appends step ``step``'s line to metrics.jsonl; a failed write (a disk gone read-only, full, a
        file-size limit: the step is trained all the same) stops every rank together (:meth:`metrics_unwritten`).
        Under a launcher the others went on into their next collective alone and died there in a gloo traceback."""
        from lowmem_alignprop.run.distributed import agreed_failure
        from lowmem_alignprop.training.grid import write_metrics_line

        failed = None
        if self.is_main:
            try:
                write_metrics_line(self.folder.metrics, row)
            except OSError as e:
                failed = e
        if (failed := agreed_failure(self.accelerator, failed, "write of metrics.jsonl")) is not None:
            self.all_failed = True  # (every rank saves the trained steps together)
            self.metrics_unwritten(step, failed)

    def metrics_unwritten(self, step: int, e: BaseException) -> None:
        """metrics.jsonl could not take trained step ``step``'s line (``e``: the OSError, or on the other ranks
        AnotherProcessFailed): the step goes into a checkpoint where the disk still takes one (a resume writes
        metrics.jsonl again from its history), else that checkpoint's line says which one is intact; raises one line."""
        written = isinstance(e, OSError)  # (rank 0's own)
        what = f"step {step}: " + (f"could not write {atomic.file_of(e)}: {atomic.describe(e)}" if written else str(e))
        try:
            _, kept = self.keep_steps(step, fix_first=False)
        except UserError as failed:  # the checkpoint failed too (a read-only disk): what is safe, and what to do
            raise UserError(f"{what}, and then {failed}") from None
        raise UserError(f"{what}{kept} once " + (f"you {atomic.write_fix(e)}" if written else "it is fixed")) from None

    def render_or_skip(self, render: Callable, what: str, smaller: str):
        """``render()``, or None when it runs out of memory on the device or the host: the sample grid and the judged
        images are not worth the run (:meth:`skip_out_of_memory` says so and frees the memory); under ZeRO-3 with
        several processes, which render together, the error stops the run as in a step."""
        try:
            return render()
        except Exception as e:
            if not faults.is_oom(e) or self.render_together:
                raise
            self.skip_out_of_memory(what, smaller)
            return None

    def skip_out_of_memory(self, what: str, smaller: str) -> None:
        """A rendering the run can go without (the sample grid, the toy world's evaluators) ran out of memory: the
        modules it brought are parked again and the memory freed; a warning, and the run goes on."""
        self.place.park("vae", self.vae)
        self.place.park("reward", self.reward)
        faults.free_memory()
        log.warning("out of memory while %s: skipped (%s needs less)", what, smaller)

"""The end of a training run (:class:`RunOutputs`, a phase of :class:`~lowmem_alignprop.training.train.Trainer`):
the LoRA (or full UNet), the after samples, before_after.json, config.yaml after an auto-fit, the reports,
summary.json and export_format's exports. Every file here is written atomically (docs/design.md section 6).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import torch

from lowmem_alignprop.run import atomic
from lowmem_alignprop.run import base_fingerprint
from lowmem_alignprop.run import faults
from lowmem_alignprop.run.distributed import agreed_failure
from lowmem_alignprop.run.filenames import (CONFIG_FILE, FULL_DIR, GRID_FILE, GRID_RECORD, LORA_BASE_FILE, LORA_DIR,
                                            SAMPLES_DIR, SUMMARY_FILE, trained_dir)
from lowmem_alignprop.run.runfolder import first_last_rewards
from lowmem_alignprop.run.stop_request import CtrlC
from lowmem_alignprop.run.trackers import log_images
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.paths import absolute_path
from lowmem_alignprop.training.evaluation import SAMPLE_SEED_OFFSET, nonfinite_note
from lowmem_alignprop.lora.lora_export import export_at_end
from lowmem_alignprop.training.run_summary import fidelity_peak, print_summary

log = logging.getLogger("lowmem_alignprop")


def earlier_grid(out: Path, step: int) -> int | str | None:
    """The step (or "": unknown) of samples/'s before/after grid when an earlier start rendered it of another
    step's LoRA; None when there is none, or it shows ``step``'s."""
    if not (out / SAMPLES_DIR / GRID_FILE).is_file():
        return None
    try:
        shown = json.loads((out / SAMPLES_DIR / GRID_RECORD).read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError):  # (a record from before it said its step)
        shown = None
    return None if shown == step else (shown or "")


def grid_record(cfg: Config, prompts: list[str], before: torch.Tensor, after: torch.Tensor, step: int) -> dict:
    """before_after.json: the grid's seeds and each image's prompt and rewards before and after (``step``'s LoRA)."""
    return {"seed": cfg.seed + SAMPLE_SEED_OFFSET, "sample_steps": cfg.sample_steps,
            "step": step,  # the LoRA the after images show (a later start may render none)
            # image n alone: `lowmem-alignprop sample RUN/lora --seed <its seed>` and its prompt
            "images": [{"prompt": p, "seed": cfg.seed + SAMPLE_SEED_OFFSET + n, "reward_before":
                        faults.finite_or_none(b), "reward_after": faults.finite_or_none(a)}
                       for n, (p, b, a) in enumerate(zip(prompts, before.tolist(), after.tolist()))]}


class RunOutputs:
    """:meth:`finish`, the last of a run's phases, mixed into the Trainer (training/train.py).

    Reads the Trainer's ``cfg``, ``accelerator``, ``out``, ``is_main``, ``device``, ``profile_name``, ``point``,
    ``start``, ``step``, ``refinish``, ``history``, ``skipped_peaks``, ``streak``, ``fits``, ``resumed_with``,
    ``software``, ``start_dirs``, ``reward_sha``, ``reward_since``, ``prompts_since``, ``held_out``, ``stop``,
    ``before``, ``grid_of``, ``last_update``, ``sample_prompts``, ``judge_prompts``, ``fidelity_before``,
    ``unet_train``, ``family``, ``comps``, ``fingerprint``, ``gather``, ``prof``, ``attention``, ``allocator``,
    ``host_allocator``, ``time_limit`` and its methods ``output_weights``, ``render_or_skip``, ``render_samples``,
    ``judge``, ``checkpoint_dir``, ``config_yaml``, ``t5_tokens``; sets ``samples_skipped``, ``fidelity_after`` and
    ``stop``'s ``raise_now`` and ``finishing``."""

    def finish(self) -> dict:
        """The LoRA (or full UNet), the after samples, config.yaml after an auto-fit, the reports and summary."""
        cfg, acc = self.cfg, self.accelerator
        acc.wait_for_everyone()
        # a stop breaks out at the step it saved; a finished loop: steps + 1; outputs written again: the checkpoint's
        done = self.start if self.refinish else min(self.step, cfg.steps)
        early = self.held_out.stopped_at if self.held_out is not None and done < cfg.steps else None
        summary = {"steps": cfg.steps, "steps_done": done, "early_stopped_at": early,
                   # when the run ended, in UTC (the kohya header's modelspec.date: the same in every export of it)
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                   "interrupted": done < cfg.steps and early is None,
                   "resumed_from": absolute_path(self.point.path) if self.point else None,
                   "skipped_steps": self.streak.skipped, "auto_fit": self.fits, "resume_changes": self.resumed_with,
                   "software": self.software,  # which steps trained under which versions and device
                   "start_dirs": self.start_dirs,  # the working folder of each start (command.txt's lines)
                   "reward_sha": self.reward_sha,  # your reward file's source, as trained with (null: built-in)
                   "fp16_overflow_skips": sum(1 for h in self.history if h.get("update_skipped")),
                   **({"at_cap_steps": [h["step"] for h in self.history if h.get("at_cap")]}
                      if cfg.reward_cap is not None else {}),  # steps with every image at the cap: no update
                   **self.kept_record()}
        if self.held_out is not None:
            summary.update(best_step=self.held_out.best_step, best_eval_reward=self.held_out.best_reward,
                           best_measure=self.held_out.best,
                           best_kept=self.held_out.best_kept and self.held_out.best_step is not None)  # none: no best/
        final, failed = acc.unwrap_model(self.unet_train), None
        try:
            with self.output_weights():  # with ema_outputs: lora/ and the after samples from the EMA weights
                lora = self.final_weights(final)
                after = self.sample_after()
            if self.is_main:
                self.write_outputs(summary, final, lora, after)
        except Exception as e:
            failed = e
        # rank 0 writes alone: the others hear of its failure (they died in the next barrier, in a gloo traceback)
        if (failed := agreed_failure(acc, failed, "write of the LoRA, samples and summary")) is not None:
            if (e := atomic.write_failure(failed, self.out)) is None:  # a full disk (in the OS's, torch's or
                raise failed  # safetensors' words): what is safe, and how to get the rest
            saved = self.checkpoint_dir(done)
            raise UserError(f"could not write {atomic.file_of(e)}: {atomic.describe(e)}; the trained weights are "
                            f"safe in checkpoint {saved} and no file was half-written: {atomic.write_fix(e)}, then "
                            "--resume latest writes the LoRA, samples, reports and summary again") from None
        if self.is_main:
            exported = None
            try:
                exported = export_at_end(cfg, self.out / LORA_DIR, keep_current=bool(self.refinish))
                if exported.folders:  # what they wrote and where the upload went (or why it failed)
                    summary.update(exported.record())
                    try:
                        self.write_summary(summary)
                    except OSError as e:  # (a full disk: the summary without them stays whole)
                        log.warning("summary.json does not record the exports: %s", atomic.describe(e))
            except Exception as e:
                failed = e
            finally:  # last, whatever the exports did: the box is what the user reads
                print_summary(summary, cfg, self.profile_name, exported)
        if (failed := agreed_failure(acc, failed, "export")) is not None:  # (the barrier the others wait at)
            raise failed
        acc.end_training()  # tears the process group down before interpreter exit: no gloo abort
        return summary

    def kept_record(self) -> dict:
        """summary.json's ``kept_layers``: the layers the run kept as its --init-lora had them (in init_lora/, so in
        every LoRA it writes), counted by kind; nothing where it kept none."""
        from lowmem_alignprop.models.kept_lora import kept_counts, read_kept

        kept = read_kept(self.out)
        return {"kept_layers": kept_counts(kept)} if kept else {}

    def final_weights(self, final) -> dict | None:
        """The LoRA's tensors on the CPU (ZeRO-3: gathered whole); a full fine-tune writes its UNet here."""
        if self.cfg.train_unet == "lora":
            with self.gather():
                return {k: v.detach().to("cpu", copy=True) for k, v in self.family.lora_state_dict(final).items()}
        with self.gather():  # ZeRO-3: the partitioned UNet is whole once, to be written
            if self.is_main:
                with atomic.replacing_dir(self.out / FULL_DIR) as tmp:
                    final.save_pretrained(tmp)
        return None

    def save_lora(self, folder: Path, lora: dict, final) -> None:
        """The LoRA in diffusers format, and which base model it belongs to (`sample` warns on another one)."""
        from lowmem_alignprop.models.kept_lora import read_kept

        self.family.save_lora(self.comps.pipeline_class, final, lora, folder, read_kept(self.out))  # the pipeline's
        # LoRA format, with the layers the run keeps as its --init-lora had them
        record = base_fingerprint.base_record(self.fingerprint, self.cfg.to_dict(), self.prompt_sources,
                                              self.reward_sha)
        (folder / LORA_BASE_FILE).write_text(record, encoding="utf-8")

    def write_lora(self, folder: Path) -> None:
        """The trained weights as they are now into ``folder`` (best/): the LoRA, or with train_unet=full the UNet."""
        final = self.accelerator.unwrap_model(self.unet_train)
        if self.cfg.train_unet != "lora":
            final.save_pretrained(folder / FULL_DIR)
            return
        self.save_lora(folder, {k: v.detach().to("cpu", copy=True)
                                for k, v in self.family.lora_state_dict(final).items()}, final)

    def sample_after(self):
        # a stop request: the LoRA at once (under ZeRO-3, whose processes render together, any process's: one skipping
        # the render alone left the others in its weight gathers)
        if (self.stop.agreed(self.accelerator) if self.render_together else self.stop.name is not None):
            ended = self.step >= self.cfg.steps or (self.held_out is not None and self.held_out.exhausted)
            if ended and self.before is not None and not self.samples_skipped:  # (else a resume renders them)
                self.samples_skipped = f"{self.stop.name} at the run's last step"  # `sample` renders them from lora/
            return None
        after = None
        # Ctrl-C now skips the samples: the LoRA and summary are still written (under ZeRO-3 at the end of the chunk
        # being rendered, on every process together: RunSamples.generate)
        self.stop.raise_now = not self.render_together
        self.stop.raise_together = self.render_together
        if self.render_together:
            self.stop.finishing = "the after samples stop at the end of the images being rendered"
        try:
            if self.before is not None and self.grid_of is not None and self.grid_of[0] == self.last_update:
                after = self.grid_of[1]  # --sample-every rendered these weights at the last step: the same images
            elif self.before is not None:
                after = self.render_or_skip(self.render_samples, "rendering the sample images after training",
                                            "a smaller --set sample_prompts")
                if after is None:  # `sample` renders them from lora/
                    self.samples_skipped = "out of memory while they were rendered"
            if self.fidelity_before is not None:
                self.judge_after()
        except UserError as e:  # the LoRA and summary are still written
            log.warning("%s (the before/after samples are left out)", e)
            self.samples_skipped = "the reward failed on them"
        except CtrlC:
            if self.is_main:  # (under ZeRO-3 every process rendered them)
                log.warning("%s received: the after samples are skipped; writing the LoRA and summary", self.stop.name)
            self.samples_skipped = f"{self.stop.name} while they were rendered"
        self.stop.raise_now = self.stop.raise_together = False  # from here a stop request changes nothing: the LoRA
        # is being written
        self.stop.finishing = "training is over, the LoRA and summary are being written"
        return after

    def judge_after(self) -> None:
        """The toy world's judged images after training. The reward's error on them leaves out their figures alone:
        the sample grid, rendered and scored before them, is still the run's (it was said to be left out)."""
        try:
            self.fidelity_after = self.render_or_skip(self.judge, "judging the images after training",
                                                      "a smaller --set fidelity_images")
        except UserError as e:
            log.warning("%s (the toy world's before/after figures are left out)", e)

    def write_outputs(self, summary: dict, final, lora: dict | None, after) -> None:
        from lowmem_alignprop.training.grid import save_sample_grid

        cfg, out, before, history = self.cfg, self.out, self.before, self.history
        if lora is not None:  # every file here is written atomically: a full disk or a kill leaves none half-written
            with atomic.replacing_dir(out / LORA_DIR) as tmp:
                self.save_lora(tmp, lora, final)
        if after is not None:
            grid = save_sample_grid(out / SAMPLES_DIR / GRID_FILE, self.sample_prompts, before, after)
            # the grid's labels are cut to their cell: every prompt in full, with its two rewards
            atomic.write_text(out / SAMPLES_DIR / GRID_RECORD, json.dumps(
                grid_record(cfg, self.sample_prompts, before[1], after[1], summary["steps_done"]),
                indent=1, ensure_ascii=False))
            log_images(self.accelerator, cfg.report_to, grid, "samples/before_after", summary["steps_done"])
            note = nonfinite_note(torch.cat([before[1], after[1]]), "before/after sample images")
            if note:  # summary.json and the summary's line leave them out (null in before_after.json)
                log.warning("%s: left out of summary.json; check the reward %r", note, cfg.reward)
            else:
                summary["sample_reward_before"] = before[1].mean().item()
                summary["sample_reward_after"] = after[1].mean().item()
        elif (shown := earlier_grid(out, summary["steps_done"])) is not None:  # of a LoRA this start trained on
            summary["samples_stale"] = shown or True  # (export leaves it out of the card: it was shown as this LoRA's)
            log.warning("samples/%s shows %s LoRA: this start rendered no after samples; `lowmem-alignprop sample %s` "
                        "renders this one's", GRID_FILE, f"step {shown}'s" if shown else "an earlier start's", out)
        if self.samples_skipped:  # `sample` renders them from lora/
            summary["samples_skipped"] = self.samples_skipped
        if self.fidelity_after is not None:  # the toy world: exact evaluators on held-out prompts, before -> after
            from lowmem_alignprop.toy.fidelity import parses
            from lowmem_alignprop.toy.scenes import split_of
            kinds = [split_of(p) if parses(p) else "other" for p in set(self.judge_prompts)]
            summary["toy_world"] = {"images": len(self.judge_prompts), "prompts": len(kinds),
                                    "held_out": kinds.count("heldout"),
                                    "before": self.fidelity_before, "after": self.fidelity_after}
            if (peak := fidelity_peak(history, self.fidelity_after)) is not None:  # judged better before the end
                summary["toy_world"]["peak"] = peak
        if self.fits:  # the configuration that finally fitted, for the next run
            atomic.write_text(out / CONFIG_FILE, self.config_yaml())
        self.prof.write(out)
        fits_budget = self.prof.report()["fits_budget"]  # the profiler's peak (load included) against budget_gb
        peak = max([h["peak_memory_gb"] for h in history if h.get("peak_memory_gb") is not None]
                   + self.skipped_peaks, default=None)
        summary.update({
            # the same prompts' rewards in the first and the last steps (since the reward changed at a resume)
            **first_last_rewards(history, self.reward_since, self.prompts_since),
            **({"reward_since_step": self.reward_since} if self.reward_since > 1 else {}),
            **({"prompts_since_step": self.prompts_since} if self.prompts_since > 1 else {}),
            # this start's steps (a resume on another machine says its own speed) but its warm-up and counted ones
            # (the profiler's timed_steps); a start that trained none: the run's
            "seconds_per_step": statistics.fmean(h["seconds"] for h in self.timed_rows(history)) if history else 0.0,
            "peak_memory_gb": peak,
            "budget_gb": cfg.budget_gb or None,
            "fits_budget": fits_budget if peak is not None else None,  # no step measured: the load alone says nothing
            "attention": self.attention, "cuda_allocator": self.allocator, "host_allocator": self.host_allocator,
            # ("cpu", not the "cpu:0" of several CPU processes); each process trains its batch_size images
            "device": "cpu" if self.device.type == "cpu" else str(self.device),
            **self.t5_tokens(),
            # a hub id's: the commit its snapshot held (the end box's model; --set revision=<it> loads it again)
            **({"model_revision": self.fingerprint["revision"]} if self.fingerprint.get("revision") else {}),
            "processes": self.accelerator.num_processes,
            "output_dir": str(out), "trained": trained_dir(cfg.train_unet),
        })
        self.write_summary(summary)  # last: with it, the run is whole

    def timed_rows(self, history: list[dict]) -> list[dict]:
        """The metrics rows whose seconds say this start's speed (StageProfiler.timed_steps among this start's)."""
        this_start = [h for h in history if h["step"] > self.start]
        timed = self.prof.timed_steps()
        return [h for h in this_start if h["step"] in timed] or this_start or history

    def write_summary(self, summary: dict) -> None:
        """summary.json: at the end of write_outputs, and again with what the exports at the end did."""
        if self.time_limit.on:  # max_minutes: the minutes used up to this write, the step it stopped after
            summary["time_limit"] = self.time_limit.record()
        atomic.write_text(self.out / SUMMARY_FILE, json.dumps(faults.json_ready(summary), indent=2))

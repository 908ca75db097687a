"""The AlignProp trainer: :class:`Trainer` with ``setup()``, ``train_step()``, ``fit()`` and ``finish()``.

    for each optimizer step (Trainer.train_step):
        encode_prompts -> sample_nograd (T-K DDIM steps) -> sample_grad (last K, checkpointed)
        -> decode (VAE, with grad) -> reward -> backward (into LoRA only) -> optimizer

See docs/design.md section 1 (the stages) and section 5 (faults: out of memory, NaN, signals).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from lowmem_alignprop import rewards
from lowmem_alignprop.settings.config import Config, set_flags
from lowmem_alignprop.settings.image_size import resolution_of, sizes_note, step_pixels, step_size
from lowmem_alignprop.settings.errors import UserError, error_words, first_line, same_on_every_rank
from lowmem_alignprop.memory import stages
from lowmem_alignprop.run import atomic
from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.run import resume_rules
from lowmem_alignprop.run import base_fingerprint
from lowmem_alignprop.run import disk_space, faults, input_files, schedule, time_limit
from lowmem_alignprop.run.before_images import forget_before
from lowmem_alignprop.run.filenames import (INIT_LORA_DIR, KEPT_LAYERS_NAME, LORA_WEIGHT_NAME, PROMPTS_FILE,
                                             SAMPLES_DIR, step_grid_name)
from lowmem_alignprop.run.rng_state import get_rng_state
from lowmem_alignprop.run.runfolder import ResumePoint, RunFolder, metrics_line, started_commands
from lowmem_alignprop.run.runlock import RunLock, global_rank, world_size
from lowmem_alignprop.run.stop_request import StopRequest
from lowmem_alignprop.run.trackers import log_images, tracker_figures
from lowmem_alignprop.models.sampling import draw_window
from lowmem_alignprop.toy.fidelity import judged_prompts
from lowmem_alignprop.step.inputs import (HELD_OUT_KEYS, check_judged, prepare_inputs, set_aside,
                                          split_eval_prompts, split_settings)
from lowmem_alignprop.step.micro import Rollout, micro_step
from lowmem_alignprop.step.hub_prompts import pinned_reads, read_sources, resumed_pins
from lowmem_alignprop.step.prompts import draw_prompts
from lowmem_alignprop.step.update import StepOutcome, StepUpdate, moved_schedule_note, optimizer_update
from lowmem_alignprop.measure import meta_models
from lowmem_alignprop.measure.reports import fmt_seconds
from lowmem_alignprop.measure.resident_tensors import run_objects_only
from lowmem_alignprop.training.evaluation import (BEST_DIR, HeldOut, WeightEMA, improvement_measure, patience_spent,
                                                  renders_note, schedule_note)
from lowmem_alignprop.rewards.base import scored_apart
from lowmem_alignprop.training.run_summary import TimeLeft
from lowmem_alignprop.training.train_faults import LoopFaults
from lowmem_alignprop.training.train_outputs import RunOutputs
from lowmem_alignprop.training.train_records import RunRecords
from lowmem_alignprop.training.train_samples import RunSamples, judged_figures
from lowmem_alignprop.training.train_setup import RunSetup

log = logging.getLogger("lowmem_alignprop")


def train(cfg: Config, *, profile_name: str = "custom", memory_snapshot: tuple[int, int] | None = None,
          folder: RunFolder | None = None, command: str | None = None, began: float | None = None) -> dict:
    """Train LoRA adapters with AlignProp. Returns the final summary (also written to the output dir).
    ``cfg``: a validated Config (``profiles.resolve_config`` validates; by hand: ``Config(...).validate()``).
    ``folder``: the run folder (the command line's choice, with its --resume); default: ``cfg.output_dir`` as named,
    a new run. ``command``: the command line that started it, recorded in the run folder (command.txt).
    ``began``: run/time_limit.clock's reading when the command started (max_minutes counts from it; default: now)."""
    began = time_limit.clock() if began is None else began
    folder = folder or RunFolder(cfg.output_dir)
    # a resume reads a hub dataset's prompts at the commit its run read (recorded in the checkpoint)
    with same_on_every_rank(), pinned_reads(resumed_pins(folder.resumed_state(), cfg)):
        from lowmem_alignprop.run.distributed import adopt_launcher_deepspeed
        cfg = dataclasses.replace(cfg)  # --auto-fit changes fields of this run's copy, never the caller's
        # accelerate launch --use_deepspeed --zero_stage N: before the package checks; the record says it as flags
        if (adopted := adopt_launcher_deepspeed(cfg)) and command:
            command = f"{command} {set_flags(adopted)}"
        try:
            given = prepare_inputs(cfg)
        except UserError as e:  # a resumed run's prompt file gone: its prompts.json lists them
            recorded = folder.path / PROMPTS_FILE
            if not (folder.resume and str(e).startswith("prompt file ") and recorded.is_file()):
                raise
            raise UserError(f"{e} (the run's prompts are listed in {recorded}, its 'train' and 'held_out' lists: "
                            f"write them back to {cfg.prompts} to resume on them)") from None
        from lowmem_alignprop.measure.weight_bytes import check_host_memory
        check_host_memory(cfg)  # on a CPU, a model that cannot fit host memory: now, not killed while it loads
        from lowmem_alignprop.measure.fit_changes import check_swap_count
        check_swap_count(cfg)  # more blocks to swap than the model has: now, not once it has loaded
        if cfg.push_to_hub:  # offline or without a token: now, not after the training
            from lowmem_alignprop.run.hub import check_push_to_hub
            check_push_to_hub(cfg.push_to_hub)
        point = folder.check()
        # held-out prompts never train; a resume keeps those its run set aside (another seed or an edited prompt file
        # would draw others), recorded in each checkpoint
        started = split_settings(point.state) if point else None
        prompts, eval_prompts = split_eval_prompts(cfg, given, started)
        aside = sorted(set_aside(cfg, given, started))
        sources = read_sources(cfg)  # the commits of the hub datasets read (prompts.json and each checkpoint)
        # a resume: its best so far and spent patience, unless its evaluation measured otherwise (then both restart)
        spent = patience_spent(point.state, cfg, prompt_digest(eval_prompts)) if point else None
        for note in (schedule_note(cfg, point.step if point else 0, spent), renders_note(cfg)):  # e.g. an early
            if note and global_rank() == 0:  # stop this many steps cannot make (before any model loads)
                log.warning("%s", note)
        if (turns := sizes_note(cfg.resolution)) and global_rank() == 0:  # several sizes: which step at which
            log.info("%s", turns)
        if cfg.best_by == "fidelity":  # the exact evaluators read only the toy world's grammar
            check_judged(eval_prompts)
        from lowmem_alignprop.toy.fidelity import off_grammar_note, unjudged_note
        for note in (off_grammar_note(cfg.model, given), off_grammar_note(cfg.model, eval_prompts, "held-out prompts"),
                     unjudged_note(cfg, given)):
            if note and global_rank() == 0:  # e.g. animals on the toy model
                log.warning("%s", note)
    lock = folder.hold()
    folder.anchor()  # its files stay there whatever the user's code does to the working directory
    cfg = folder.with_output_dir(cfg)  # (absolute: config.yaml names it for any folder) a numbered one: the next one
    with lock:
        searched = None
        if cfg.auto_fit and point is None:  # a new run: the fastest configuration that fits, before the first step
            cfg, searched = search_before_first_step(cfg, profile_name)
        return Trainer(cfg, folder, prompts, profile_name=profile_name, memory_snapshot=memory_snapshot, point=point,
                       lock=lock, command=command, eval_prompts=eval_prompts, aside=aside, searched=searched,
                       began=began, sources=sources).run()


def search_before_first_step(cfg: Config, profile_name: str) -> tuple[Config, dict]:
    """--auto-fit on a CUDA card: plan --fastest's choice for this run (fake tensors, no weights loaded), printed as
    --set flags; returns the configuration to train and the record config.yaml keeps (auto_fit_search)."""
    from lowmem_alignprop.measure.fastest import before_first_step
    from lowmem_alignprop.settings.profiles import detect_card

    if world_size() > 1:
        if global_rank() == 0:
            log.warning("auto-fit: the search before the first step runs in single-process runs: training as "
                        "configured (an out-of-memory error still stops with the change that fits)")
        return cfg, {"skipped": "several processes: the search runs in single-process runs"}
    detected = detect_card()
    if detected is not None:
        print(f"auto-fit: searching the memory features for the fastest configuration that fits {detected[0]} "
              f"({cfg.budget_gb:g} GiB budget); each estimate runs the step on fake tensors", flush=True)
    try:
        chosen, record = before_first_step(cfg, profile=profile_name, detected=detected,
                                           log=lambda line: log.info("auto-fit search:%s", line))
    except Exception as e:  # noqa: BLE001 - the planner failing on this model or reward must not stop the run
        chosen, record = cfg, {"skipped": f"the search failed: {error_words(e, 200)}"}
    if "skipped" in record:
        if detected is not None:
            log.warning("auto-fit: no search result (%s): training as configured%s", record["skipped"],
                        f"; the planner's cheapest change: {record['cheapest_change']}"
                        if record.get("cheapest_change") else "")
        else:  # (a CPU run over its budget said only that it was over)
            log.warning("auto-fit: %s; this run trains as configured", record["skipped"])
        return cfg, record
    print(f"auto-fit: {record['flags'] or '(no change: the configuration as given is the fastest that fits)'} -> "
          f"{fmt_seconds(record['seconds_per_step'])} s per optimizer step estimated on {record['timed_as']} (as "
          f"given: {fmt_seconds(record['given_seconds_per_step'])} s, "
          f"{'fits' if record['given_fits'] else 'does not fit'}), "
          f"{record['needed_gb']:.2f} GiB needed of {cfg.budget_gb:g}", flush=True)
    if chosen.tiled_decode and not cfg.tiled_decode:  # (the one approximate memory feature: said, as plan says it)
        from lowmem_alignprop.measure.reports import TILED_APPROXIMATE
        print(f"auto-fit: {TILED_APPROXIMATE}", flush=True)
    return chosen, record


def limit_reached(limit: time_limit.TimeLimit, accelerator) -> bool:
    """max_minutes' verdict now (TimeLimit.stops_now), rank 0's for every rank: each rank's clock is its own, and a
    rank that stopped alone would leave the others in the next collective."""
    stop = limit.stops_now()
    if accelerator.num_processes > 1:
        from lowmem_alignprop.run.distributed import rank_0_says
        stop = rank_0_says(accelerator, stop)
    return stop


def step_size_figures(cfg: Config, step: int) -> dict:
    """A step's metrics row's image size, ``width`` and ``height``, where the run trains at several sizes (one size:
    none, the row as it was)."""
    if len(cfg.sizes) == 1:
        return {}
    width, height = step_size(cfg, step)
    return {"width": width, "height": height}


def prompt_digest(prompts: list[str]) -> str:
    """The prompt list's fingerprint in a checkpoint: a resume whose prompt file was edited since is told so."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()[:16]


class Trainer(RunSetup, RunRecords, RunSamples, LoopFaults, RunOutputs):
    """One AlignProp run, in the shape of a recipe: :meth:`setup` (accelerator, models, reward check, samples before,
    resume), :meth:`fit` (the loop: faults, signals and checkpoints around :meth:`train_step`), :meth:`finish` (LoRA,
    samples after, reports, summary). :meth:`run` does the three, with Ctrl-C a stop request from the first step until
    the LoRA is written. The phases' pieces live beside this file, one mixin each: train_setup.py (what setup builds),
    train_records.py (resume restore, config.yaml and the run's records), train_samples.py (fixed-seed renders),
    train_faults.py (the loop's fault handling), train_outputs.py (finish)."""

    def __init__(self, cfg: Config, folder: RunFolder, prompts: list[str], *, profile_name: str = "custom",
                 memory_snapshot: tuple[int, int] | None = None, point: ResumePoint | None = None,
                 lock: RunLock | None = None, command: str | None = None, eval_prompts: list[str] | None = None,
                 aside: list[str] | None = None, searched: dict | None = None, began: float | None = None,
                 sources: dict[str, dict] | None = None):
        self.cfg, self.folder, self.prompts, self.command = cfg, folder, prompts, command
        self.time_limit = time_limit.TimeLimit(cfg.max_minutes, began)  # max_minutes: the clock since the command
        self.searched = searched  # --auto-fit's search before the first step: what it chose (config.yaml records it)
        self.prompt_id = {p: i for i, p in enumerate(prompts)}  # the metrics' per-image prompt_ids
        self.eval_prompts = list(eval_prompts or [])
        self.held_out_sha = prompt_digest(self.eval_prompts)  # kept in each checkpoint: best/ compares like with like
        self.aside = list(aside or [])  # the keys of the prompts set aside from training: kept in each checkpoint
        self.prompt_sources = dict(sources or {})  # the hub datasets' commits read: kept in each checkpoint
        self.profile_name, self.memory_snapshot, self.point = profile_name, memory_snapshot, point
        self.resumes_newest = False  # the run's newest checkpoint is resumed (restore: config.yaml's edits are said)
        self.profile_values: dict | None = None  # the user's profile file's values at the run's start (write_config)
        self.history: list[dict] = []  # one metrics row per trained step
        self.skipped_peaks: list[float] = []  # GiB: this start's measured steps skipped as NaN/inf (they used memory)
        self.reward_since = 1  # the first step scored by this run's reward (a resume may change the reward)
        self.prompts_since = 1  # the first step on this run's prompts (a resume may change the prompt file)
        self.prompts_sha = prompt_digest(prompts)  # kept in each checkpoint: a resume tells an edited prompt file
        self.reward_sha = rewards.reward_source_digest(cfg.reward)  # ... and an edited reward file
        # ... and a vae or reward_weights file replaced at its path (a checkpoint's record spares reading it again)
        self.input_files = input_files.identities(cfg, point.state.get("input_files") if point is not None else None)
        self.time_left = TimeLeft(eval_every=cfg.eval_every, judge_every=cfg.fidelity_every)
        self.fits: list[dict] = []  # the --auto-fit changes made
        self.resumed_with: list[dict] = []  # what each resume changed of what the LoRA trains with (resume_changes)
        self.software: list[dict] = []  # which steps trained under which versions and device (run/software.py)
        self.start_dirs: list[str | None] = []  # the working folder of each start, command.txt's lines' (write_config)
        self.streak = faults.NonFiniteStreak(cfg.max_bad_steps)
        self.start = point.step if point is not None else 0
        self.rollouts_before = 0  # this rank's rollouts before this start's first step (restore: the checkpoint's)
        self.last_saved = self.start if point is not None else None  # the newest checkpoint's step (save_checkpoint)
        self.stop = StopRequest(on_abort=lock.release if lock is not None else None, saved=lambda: self.last_saved)
        self.step = self.start + 1
        self.before = None
        self.init_file: Path | None = None  # --init-lora's file, checked in setup()
        self.init_sha: str | None = None  # its digest
        self.init_source: dict | None = None  # the file the user named and its digest (init_lora/source.json)
        self.init_kept = None  # its layers the run does not train, fused into the base (init_lora.InitLora)
        self.sample_prompts = prompts[: cfg.sample_prompts]
        # the toy world's exact evaluators judge these
        self.judge_prompts = judged_prompts(cfg.model, prompts, cfg.fidelity_images)
        self.embed = None  # the prompt encoder: SD3/FLUX's is made (and its set encoded) before the transformer loads
        self.ema: WeightEMA | None = None  # ema_decay: the average of the trained weights
        self.held_out: HeldOut | None = None  # eval_every: held-out evaluation, best/, early stop
        self.fidelity_before = self.fidelity_after = None
        self.samples_skipped: str | None = None  # why the after samples were not rendered (summary.json says it)
        self.last_update: int | None = None  # this start's last step that changed the LoRA
        self.grid_of: tuple[int, tuple] | None = None  # --sample-every's last render: (step, (images, rewards))
        self.refinish: str | None = None  # an ended run's outputs to write again (see missing_outputs)
        self.eval_owed: int | None = None  # a step whose held-out evaluation failed (its checkpoint says): run first
        self.zero_grads = faults.ZeroGradStreak(cfg.max_zero_grad_steps)
        self.all_failed = False  # under a launcher: every process stopped this step together (not_finite)
        self.render_together = False  # ZeRO-3 under a launcher: every rank renders the samples (setup_sampling)

    @property
    def out(self) -> Path:
        return self.folder.path

    @property
    def init_lora_copy(self) -> Path:
        """--init-lora's LoRA as the run read it at its start (a resume starts from it)."""
        return self.out / INIT_LORA_DIR / LORA_WEIGHT_NAME

    def find_init_lora(self) -> Path | None:
        """--init-lora's file: a resume's copy of it (init_lora/), whatever the path holds now; else the path, checked
        (a LoRA of another rank, or no LoRA, fails here). A resume whose copy is gone takes the path only when it
        holds the LoRA the run started from (the checkpoint's digest of it): another one would be its "before"."""
        if not self.cfg.init_lora:
            return None
        if self.point is not None and self.init_lora_copy.is_file():
            return self.init_lora_copy
        from lowmem_alignprop.lora.init_lora import check_init_lora

        copy, resume = self.init_lora_copy.parent, "resume with --set init_lora= (the trained LoRA is in the " \
            "checkpoint; the \"before\" samples are then the base model's)"
        with same_on_every_rank():
            try:
                file = check_init_lora(self.cfg.init_lora, self.cfg.lora_rank, self.cfg.model,
                                       self.cfg.model_components, self.cfg.lora_layers, self.cfg.base_quant)
            except UserError as e:
                if self.point is None:
                    raise
                raise UserError(f"the LoRA this run started from is gone: its copy {copy} is missing, and {e}. "
                                f"Restore either, or {resume}") from None
            recorded = self.point.state.get("init_lora_sha") if self.point is not None else None
            if recorded and ckpt.file_sha256(file) != recorded:
                raise UserError(f"--init-lora {self.cfg.init_lora} is not the LoRA this run started from (its "
                                f"checkpoint records another's digest), and the run's copy {copy} is missing: restore "
                                f"the copy or that file, or {resume}")
        return file

    def check_init_lora_fits(self) -> None:
        """--init-lora's LoRA fitted onto the model built on the meta device, as plan fits it: another model's LoRA
        (other layer shapes) is refused now with the line loading gives, not once the model has loaded (minutes for
        SDXL or FLUX). A model whose meta copy cannot be built here (a hub id without its configs) is left to it."""
        from lowmem_alignprop.lora.init_lora import check_fits_meta_model

        try:
            meta_models.meta_base(self.cfg, torch.float32)
        except Exception:  # noqa: BLE001 - loading the model names whatever is wrong with it
            return
        with same_on_every_rank():
            check_fits_meta_model(self.cfg, self.init_file)

    def run(self) -> dict:
        try:
            # the memory measurement's collections and scans walk the run's own objects, not the libraries'
            with run_objects_only():
                self.setup()
                with self.stop.installed():  # SIGINT/SIGTERM: stop requests from the first step to the LoRA written
                    try:
                        self.fit()
                        return self.finish()
                    except RuntimeError as e:  # rank 0 stopped alone (a sample grid it could not write, a kill):
                        if (ended := self.another_process_ended(e, f"step {self.step}")) is not None:  # the others
                            raise ended from None  # died in their next collective, in a gloo traceback
                        raise
        finally:  # a measured step left open by any exception (a reward's sys.exit included) would leave torch's
            if getattr(self, "prof", None) is not None:  # dispatch mode on and the collector off: a crash at exit
                self.prof.close()

    # ================================ setup ================================
    def setup(self) -> None:
        """Everything before the first step, in the order its failures are reported."""
        if self.point is not None:  # an incompatible checkpoint fails here, before any model loads
            with same_on_every_rank():
                self.refinish = self.missing_outputs()
                resume_rules.check_config(self.point.state, self.cfg, self.point.path,
                                          finished=self.refinish is not None)
                saved = self.point.state.get("config", {})
                if self.is_rank0() and (moved := moved_schedule_note(saved, self.cfg, self.point.step)):
                    log.warning("%s", moved)  # (a decaying schedule's end moved: the rates from here on)
                if saved.get("model", self.cfg.model) != self.cfg.model and meta_models.denoiser_differs(self.cfg,
                                                                                                      saved):
                    raise base_fingerprint.another_model(
                        self.point.state["fingerprint"], self.cfg.model,
                        f"its {self.point.state['fingerprint'].get('denoiser', 'denoiser')} architecture differs",
                        self.point.path)
            if self.refinish and self.is_rank0():
                log.warning("the run finished at step %d, but %s: writing its outputs again from checkpoint %s",
                            self.point.step, self.refinish, self.point.path)
        self.init_file = self.find_init_lora()
        self.init_sha = ckpt.file_sha256(self.init_file) if self.init_file else None  # (see find_init_lora)
        if self.init_file is not None and self.point is None:
            self.check_init_lora_fits()
        if self.init_file is not None and self.init_file != self.init_lora_copy:  # (a resume's copy: its record kept)
            from lowmem_alignprop.lora.init_lora import init_lora_source
            self.init_source = init_lora_source(self.cfg.init_lora) if self.is_rank0() else None
        self.setup_accelerator()
        self.load_models()
        if not self.refinish:  # room for the last checkpoint and LoRA, or the trained steps would be lost at the end
            with same_on_every_rank():
                crowded = disk_space.check(self.cfg, self.out, self.params, self.start)
            if crowded and self.is_main:
                log.warning(crowded)
        failed = None
        with torch.no_grad():  # a reward that fails on its device or in no-grad mode fails here, before any write
            where = self.device if self.place.where.get("reward") == "device" else "cpu"
            try:
                self.score(torch.full((1, 3, 64, 64), 0.5, device=where), self.prompts[:1],
                           "on a test image without gradient (as for the sample images)")
            except UserError as e:
                failed = e
        from lowmem_alignprop.run.distributed import agreed_failure
        if (failed := agreed_failure(self.accelerator, failed, "reward's start-up test")) is not None:
            raise failed  # under a launcher one rank's reward may fail alone: the others stop with it
        self.start_trackers()
        self.setup_sampling()
        self.render_before()  # the untrained LoRA's sample grid and judged images (a resume reads them back)
        # the ranks start their steps together: a Ctrl-C while rank 0 samples ends every rank as "interrupted" (the
        # others, already in a step, took it as a stop request and died in its collective with rank 0 gone)
        from lowmem_alignprop.run.distributed import wait_for_every_rank
        wait_for_every_rank(self.accelerator)
        self.start_the_time_limit()  # (a limit spent by now stops the run before anything is written)
        self.restore()
        self.write_config()

    @staticmethod
    def is_rank0() -> bool:
        return global_rank() == 0

    def score(self, images: torch.Tensor, batch_prompts: list[str], when: str, fix: str = "fix it") -> torch.Tensor:
        """The reward outside a training step; an error of the user's reward becomes one line naming ``when``."""
        return scored_apart(self.reward, images, batch_prompts, self.cfg.reward, when, fix)

    # ================================ the step ================================
    def train_step(self, step: int) -> StepOutcome:
        """One optimizer step over grad_accum micro-batches: its metrics row, or what was not finite (skipped)."""
        cfg, acc = self.cfg, self.accelerator
        rollout = self.rollout(cfg.at_step(step))  # several sizes: the step's, the same on every rank and micro-batch
        t0, rewards_all, ids_all, losses, ks, terms, lowest_all = time.perf_counter(), [], [], [], [], [], []
        update = StepUpdate()
        self.learning_rate.at(step)  # lr_scheduler's rate for this step (a retried or resumed step gets it again)
        acc.step = 0  # every step starts a fresh accumulation window (also after a skip or an OOM)
        for micro in range(cfg.grad_accum):
            with acc.accumulate(self.unet_train):  # DDP all-reduces the gradients on the last micro-step only
                first = self.rollouts_through(step - 1) + micro * cfg.batch_size  # this rank's rollouts so far
                batch_prompts = draw_prompts(self.prompts, cfg.prompt_order, self.rng, first, cfg.batch_size,
                                             self.rank_seed)
                window = draw_window(cfg, self.rng)  # fixed/uniform: the contiguous last K steps, K drawn once
                ks.append(window.calls)  # the calls with gradient (per_step: scattered over the window)
                # the micro-batch's noise: its own seed from (seed, step, micro-batch, rank), so a resume draws it
                # again (a tuple of ints hashes alike in every process and run of one Python version)
                g = torch.Generator().manual_seed(hash((cfg.seed, step, micro, self.rank)) % 2**63)
                # encode (cached), sample_nograd, sample_grad (one checkpoint per call), decode, reward, backward
                # into the LoRA only, then the VAE and reward parked; under a launcher a rollout's error reaches
                # not_finite, where every rank hears of it and they stop together
                mb = None  # the previous micro-batch's embeddings freed before this one's rollout
                mb = micro_step(rollout, batch_prompts, k=window.k, generator=g, check=self.not_finite,
                                catch=acc.num_processes > 1, detached=window.detached)
                terms.append(mb.terms)  # the loss's further terms (kl), for the metrics
                if mb.bad:  # every rank skips together (DDP needs all backwards)
                    return StepOutcome(None, mb.bad)
                rewards_all.append(acc.gather(mb.rewards))
                if "lowest_reward" in mb.terms:  # reward_cap: the lowest of every draw (lv_draws), for the at-cap skip
                    lowest_all.append(acc.gather(mb.terms["lowest_reward"].reshape(1)))
                ids_all.append(acc.gather(torch.tensor([self.prompt_id[p] for p in batch_prompts], device=self.device)))
                losses.append(mb.loss)
                if acc.sync_gradients:
                    with self.guard.stage(stages.OPTIMIZER):
                        update = self.optimizer_step(lowest_all)
                        if update.dropped:
                            return StepOutcome(None, "the gradient norm", update)
        return StepOutcome(self.metrics_row(step, t0, rewards_all, ids_all, losses, ks, terms, update), None, update)

    def rollout(self, cfg: Config) -> Rollout:
        """What a micro-batch of a step at ``cfg``'s image size runs through (training/train.py's models; step/micro.py
        runs it)."""
        return Rollout(cfg=cfg, family=self.family, sample_unet=self.nograd_unet, train_unet=self.unet_train,
                       scheduler=self.scheduler, vae=self.vae, reward=self.reward, place=self.place,
                       embed=self.family.sized_embed(self.embed, cfg),
                       stage=self.guard.stage, device=self.device, autocast=self.accelerator.autocast,
                       backward=self.accelerator.backward)

    def not_finite(self, loss: torch.Tensor | None, rewards_: torch.Tensor | None,
                   failed: BaseException | None = None) -> str | None:
        """What was NaN/inf on any rank (the gradients are then dropped), or None; a reward without a graph fails.
        ``failed``: this rank's rollout raised it (under a launcher): every rank stops, each ready to save the steps
        before this one together (:meth:`keep_steps`), the failed one with its own error."""
        from lowmem_alignprop.run.distributed import agreed_outcome

        bad = None
        if failed is None:
            bad = None if faults.finite(rewards_) else "the reward"
            bad = bad or (None if faults.finite(loss) else "the loss")
        failure, any_bad = agreed_outcome(self.accelerator, failed, bad is not None, "step")
        if failure is not None:
            self.all_failed = True
            raise failure
        if any_bad:
            self.optimizer.zero_grad(set_to_none=True)  # the skipped step's gradients freed, not kept to the next
            return bad or "the reward on another process"
        if not loss.requires_grad:  # a reward that lost its graph on this batch (.detach(), numpy, ...)
            raise UserError(f"the reward {self.cfg.reward!r} returned scores with no gradient to the images: "
                            "AlignProp needs a differentiable reward on every batch")
        return None

    def optimizer_step(self, lowest_all: list) -> StepUpdate:
        """Clip, step, zero the gradients (freed as soon as possible), as the planner does. A NaN/inf gradient norm
        that nothing else handles drops the update (``dropped``, with the LoRA gradients that were not finite). With
        reward_cap, a step whose every image is at the cap (``lowest_all``: each micro-batch's lowest reward over every
        draw, lv_draws' too, gathered) has no gradient and makes no update, unless a KL penalty still pulls."""
        if self.all_at_cap(lowest_all):
            # AdamW would still move the weights (momentum, weight decay) on a zero gradient: skip it
            self.optimizer.zero_grad(set_to_none=True)
            return StepUpdate(grad_norm=0.0, at_cap=True)
        drop = self.drops_non_finite()
        zero_before = self.grad_zero_before_update(drop)
        update = self.apply_update(drop)
        if update.dropped:
            return update
        self.read_grad_zero(update, zero_before)
        if self.ema is not None:
            self.ema.update()
        return update

    def all_at_cap(self, lowest_all: list) -> bool:
        """reward_cap: every image of the step (each micro-batch's lowest reward, gathered) at the cap, so the step
        has no gradient; not under DeepSpeed (its engine steps) nor with a KL penalty (which still pulls)."""
        cap = self.cfg.reward_cap
        return cap is not None and self.engine is None and not self.cfg.kl_coeff and \
            bool(torch.cat(lowest_all).min() >= cap)

    def drops_non_finite(self) -> bool:
        """Whether a NaN/inf gradient norm drops the update here: fp16's GradScaler skips an overflowed update itself
        (and lowers the scale); so does a DeepSpeed engine."""
        return self.accelerator.scaler is None and self.engine is None

    def apply_update(self, drop: bool) -> StepUpdate:
        """Clip and step (``drop``: a NaN/inf norm drops the update, naming the gradients that were not finite)."""
        acc = self.accelerator
        update = StepUpdate()

        def name_non_finite_grads():  # the skipped step's metrics line: read before the drop frees the gradients
            update.non_finite_grads = faults.non_finite_grads(self.unet, self.params)

        update.grad_norm, dropped = optimizer_update(self.optimizer, self.params, self.cfg.max_grad_norm,
                                                     clip=acc.clip_grad_norm_, drop_if_not_finite=drop,
                                                     on_drop=name_non_finite_grads)
        if dropped:
            update.dropped = True
            return update
        update.scaler_skipped = (acc.scaler is not None and update.grad_norm is not None
                                 and not math.isfinite(update.grad_norm))
        return update

    def grad_zero_before_update(self, drop: bool) -> bool | None:
        """The LoRA's gradient exactly zero, read before the update frees it where no norm will be read
        (max_grad_norm <= 0, nothing dropped: one sync); None where :meth:`read_grad_zero` reads it from the norm."""
        if self.engine is None and self.cfg.max_grad_norm <= 0 and not drop:
            return faults.all_zero(None, self.params)
        return None

    def read_grad_zero(self, update: StepUpdate, zero_before: bool | None) -> None:
        """``update.grad_zero`` (the zero-gradient streak counts it): the read before the update, else from its norm;
        not under DeepSpeed (its engine keeps the gradients) nor for an update the GradScaler skipped."""
        if self.engine is None and not update.scaler_skipped:
            update.grad_zero = zero_before if zero_before is not None else faults.all_zero(update.grad_norm,
                                                                                           self.params)

    def evaluate_into(self, step: int, row: dict) -> BaseException | None:
        """At its steps, the held-out evaluation's metrics into the step's ``row``. Returns what failed it (the user's
        reward, memory), or None; under a launcher every rank hears of one rank's failure (each evaluates alone):
        the others stop with it (AnotherProcessFailed), all ready to save the trained steps together."""
        from lowmem_alignprop.run.distributed import agreed_failure

        failed = None
        try:
            t0 = time.perf_counter()
            evaluated = self.evaluate_if_due(step)
            if evaluated:  # the step line's time left counts the evaluations to come apart; the step's time not them
                spent = time.perf_counter() - t0
                self.time_left.evaluated(spent)
                self.prof.set_aside(spent)
            row.update(evaluated)
        except BaseException as e:
            failed = e
        if self.accelerator.num_processes > 1 and self.held_out is not None and self.held_out.due(step):
            # (every rank evaluates at the same steps)
            if (failed := agreed_failure(self.accelerator, failed, "held-out evaluation")) is not None:
                self.all_failed = True
        return failed

    def evaluate_if_due(self, step: int) -> dict:
        """At its steps, the held-out evaluation's eval_* metrics (for the step's metrics row); best/ and the early
        stop are decided here."""
        if self.held_out is None or not self.held_out.due(step):
            return {}
        with self.output_weights():
            metrics = self.held_out.evaluate()
            self.held_out.after_evaluation(step, metrics, self.is_main)
        return metrics

    def metrics_row(self, step: int, t0: float, rewards_all: list, ids_all: list, losses: list, ks: list[int],
                    terms: list[dict], update: StepUpdate) -> dict:
        from lowmem_alignprop.run.distributed import by_micro_batch

        acc = self.accelerator
        r_all = torch.cat(rewards_all).float()
        loss_mean = acc.reduce(torch.stack(losses).mean(), reduction="mean").item()
        ks = by_micro_batch(acc.gather(torch.tensor(ks, device=self.device)), acc.num_processes)  # as the images are
        return {"step": step, "reward_mean": r_all.mean().item(), "reward_std": r_all.std(unbiased=False).item(),
                "loss": loss_mean, "images": r_all.numel(),  # over all processes and micro-batches
                **step_size_figures(self.cfg, step),  # several sizes: the step's width and height
                # each image's reward and prompt (its index in the run's prompts): the summary's same-prompt comparison
                "rewards": r_all.tolist(), "prompt_ids": torch.cat(ids_all).tolist(),
                "k": ks[0] if len(set(ks)) == 1 else sum(ks) / len(ks), "k_all": ks,
                "grad_norm": float(update.grad_norm) if update.grad_norm is not None else None,
                "lr": self.learning_rate.current(),
                **({"kl": acc.reduce(torch.stack([t["kl"] for t in terms]).mean(), reduction="mean").item()}
                   if terms and "kl" in terms[0] else {}),
                **({"reward_terms": {name: acc.reduce(torch.stack([t["reward_terms"][name] for t in terms]).mean(),
                                                      reduction="mean").item() for name in terms[0]["reward_terms"]}}
                   if terms and "reward_terms" in terms[0] else {}),  # a combined reward's terms, unweighted
                **({"grad_scale": acc.scaler.get_scale(), "update_skipped": update.scaler_skipped}
                   if acc.scaler is not None else {}),
                **({"at_cap": update.at_cap} if self.cfg.reward_cap is not None else {}),  # no update: all at the cap
                "seconds": time.perf_counter() - t0}

    # ================================ the loop ================================
    def fit(self) -> None:
        """Steps start+1..steps; an OOM steps down (--auto-fit) or stops with its message, any other error keeps the
        finished steps in a checkpoint, a stop request saves one and ends the loop."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.refinish:  # the run ended at its checkpoint: no step to train, its outputs are written again
            self.track_last_step_again()
        if self.eval_owed is not None and self.evaluate_owed():
            return  # the owed evaluation stopped the run early
        if self.refinish:
            return
        if cfg.eval_on_start and self.start == 0:
            self.evaluate_start()
        # disable=None: no bar where stderr is not a terminal (a log file, a job's output): its \r-redrawn frames
        # filled the log beside the step lines, which say the same; notebooks keep their widget
        bar = tqdm(range(self.start + 1, cfg.steps + 1), desc="AlignProp", disable=None if self.is_main else True,
                   dynamic_ncols=True, initial=self.start, total=cfg.steps)
        self.bar = bar
        with contextlib.closing(bar):  # the bar ends its line even when an error stops the run
            while self.step <= cfg.steps:
                step = self.step
                self.guard.step = step
                rng_before = self.rng.getstate()
                self.prof.begin_step(step)
                try:
                    done = self.train_step(step)
                except BaseException as e:  # out of memory (device or host), or any error (a reward's sys.exit too)
                    if not faults.is_oom(e):  # keep the finished steps, and name a reward's error as such; raises
                        self.keep_finished_steps(e, step, rng_before)
                    stage, detail = faults.stage_of(e, self.guard.current), first_line(e, 100)
                    del e  # its traceback's frames hold the failed step's activations: freed before the retry
                    self.step_down(step, stage, detail, rng_before)  # raises without --auto-fit
                    self.time_limit.begin_lap()  # max_minutes: the next steps are like the repeat, not the attempt
                    continue  # the same step again, lighter
                if done.row is not None and (failed := self.evaluate_into(step, done.row)) is not None:
                    self.record(step, done)  # step N is trained: its metrics line (without an evaluation), then
                    self.eval_owed = step  # (its checkpoint says so: a resume evaluates it first)
                    self.evaluation_failed(step, failed)  # its checkpoint, and the error (raises)
                self.record(step, done)
                bar.update(1)
                if self.save_if_due(step):
                    break
                self.step += 1

    def track_last_step_again(self) -> None:
        """A resume that writes the ended run's outputs again: the last step's figures and grid to the trackers once
        more, as start_trackers purged that step (its before/after grid, sent again at the end, would be doubled)."""
        if self.history and self.history[-1].get("step") == self.start:  # (a NaN-skipped step has no row)
            self.track(self.history[-1], self.start)
        if self.is_main and (grid := self.out / SAMPLES_DIR / step_grid_name(self.start)).is_file():
            log_images(self.accelerator, self.cfg.report_to, grid, "samples/during_training", self.start)

    def evaluate_owed(self) -> bool:
        """The held-out evaluation of the resumed checkpoint's step, which failed before it was written: run now, into
        that step's metrics row (metrics.jsonl written again), best/ and the early stop decided, the checkpoint saved
        again with it. True when it stops the run early (the run then ends at that step)."""
        step, row = self.start, self.history[-1]
        if self.is_main:
            log.info("resume: step %d's held-out evaluation failed before; evaluating it now", step)
        had = set(row)
        if (failed := self.evaluate_into(step, row)) is not None:
            self.evaluation_failed(step, failed)  # (raises; the checkpoint still owes it)
        self.eval_owed = None
        if self.is_main:
            atomic.write_text(self.folder.metrics, "".join(metrics_line(r) for r in self.history))
        self.track({k: v for k, v in row.items() if k not in had}, step)  # the tracker had the step's own figures
        path = self.save_checkpoint(step)  # with its evaluation, not owed any more
        if step >= self.cfg.steps:  # (the run ended here: its outputs are written next)
            return False
        if self.stops_early(step):
            self.say_early_stop(step)
        elif self.stop.agreed(self.accelerator):  # Ctrl-C during the evaluation: this checkpoint is the stop's
            self.say_stopped(path, ended=False)
        else:
            return False
        self.step = step
        return True

    def record(self, step: int, done: StepOutcome) -> None:
        """The step's metrics line, progress bar and tracker; a NaN/inf step is skipped (too many in a row stop)."""
        cfg, prof, row, bad = self.cfg, self.prof, done.row, done.bad
        mem = prof.end_step()
        limit = self.time_limit  # (--max-minutes: when it ends this start, where that comes before the last step)
        left = self.time_left.after_step(step, cfg.steps, row["seconds"] if row else None, *limit.left_and_end())
        if step == self.start + 1:
            prof.record_modules(self.modules())
        if bad is not None:
            if mem["peak_allocated"] is not None:  # its memory is the run's too (on a CPU, the one measured step)
                self.skipped_peaks.append(mem["peak_allocated"] / 2**30)
            detail = done.update.non_finite_grads  # which LoRA gradients were NaN/inf, when that was read
            self.write_step_metrics(step, {"step": step, "skipped": f"{bad} is NaN or infinite",
                                           **({"non_finite_grads": detail} if detail else {})})
            if self.streak.bad(step, bad, say=self.is_main):  # every rank skips it; rank 0 says so
                path = self.save_checkpoint(step)
                raise faults.TrainingDiverged(self.streak.message(path, self.accelerator.mixed_precision))
            return
        self.streak.good()
        self.last_update = step  # (the LoRA changed here: a grid of an earlier step is not of these weights)
        row.update(self.sample_if_due(step))  # after the profiler's end_step: sampling is not the step's memory
        row.update(peak_memory_gb=None if mem["peak_allocated"] is None else mem["peak_allocated"] / 2**30,
                   peak_stage=mem["peak_stage"])
        t0 = time.perf_counter()
        if judged := self.judge_if_due(step):
            self.time_left.evaluated(time.perf_counter() - t0, judging=True)  # counted apart, as the evaluations
        row.update(judged)
        self.history.append(row)
        self.write_step_metrics(step, row)
        if self.is_main:
            self.bar.set_postfix(reward=f"{row['reward_mean']:.4f}", K=row["k"], s_per_step=f"{row['seconds']:.2f}")
            if cfg.log_every and step % cfg.log_every == 0:
                size = f" ({resolution_of(row['width'], row['height'])} px)" if "width" in row else ""  # (several)
                self.bar.write(f"step {step}{size}: reward {row['reward_mean']:.4f} ± {row['reward_std']:.4f}  "
                               f"loss {row['loss']:.4f}  K={row['k']}  {prof.format_step(mem)}{left}")
        self.track(row, step)
        if self.zero_grads.step(step, done.update.grad_zero):  # the reward's gradient never reaches the LoRA
            raise UserError(self.zero_grads.message(cfg.reward, self.save_checkpoint(step)))

    def evaluate_start(self) -> None:
        """eval_on_start: the held-out evaluation of the untrained LoRA, as metrics.jsonl's line of step 0 (best/ and
        the early stop count it), with the judged images' "before" figures in the toy world: every curve's start.
        A failure stops the run before any step (nothing is trained yet)."""
        row = {"step": 0, **(judged_figures(self.fidelity_before) if self.cfg.fidelity_every else {})}
        if (failed := self.evaluate_into(0, row)) is not None:
            if faults.is_oom(failed):
                raise UserError(f"out of memory in the held-out evaluation before the first step (eval_on_start; "
                                f"{first_line(failed, 100)}): {self.eval_fewer_at_a_time()}, or leave eval_on_start "
                                "out") from None
            raise failed
        if self.is_main:
            from lowmem_alignprop.training.grid import write_metrics_line
            write_metrics_line(self.folder.metrics, row)  # (its figures said by the evaluation's line)
        self.track(row, 0)

    def track(self, row: dict, step: int) -> None:
        """A metrics line's figures to --report-to's tracker (none: nothing)."""
        if self.cfg.report_to != "none":  # (grouped: train/..., eval/..., memory/..., time/...)
            self.accelerator.log(tracker_figures(row), step=step)

    def save_if_due(self, step: int) -> bool:
        """A checkpoint at the last step, every checkpoint_every steps, on a stop request and when max_minutes leaves
        no time for the next step (then True: stop)."""
        cfg = self.cfg
        stopping = self.stop.agreed(self.accelerator)
        early = self.stops_early(step)
        path, took = None, 0.0
        if stopping or early or step == cfg.steps or schedule.due(cfg.checkpoint_every, cfg.steps, step):
            t0 = time_limit.clock()
            path = self.save_checkpoint(step)
            took = time_limit.clock() - t0
            # a request that came while it was written (a periodic checkpoint: seconds to minutes): this one is the
            # stop's
            stopping = stopping or self.stop.agreed(self.accelerator)
        out_of_time = self.out_of_time(step, took) and not (stopping or early)  # (every rank asks: one collective)
        self.time_limit.stopped_at = step if out_of_time else None
        if path is None and not out_of_time:
            return False
        path = path or self.save_checkpoint(step)
        early = early and step < cfg.steps  # (at the last step the run ends anyway)
        if early:  # also with a stop request at this step: the run ended here, said so
            self.say_early_stop(step)
        if stopping:
            self.say_stopped(path, ended=step == cfg.steps or early)
        if out_of_time and self.is_main:
            from tqdm.auto import tqdm
            tqdm.write(self.time_limit.stopped_line(step, cfg.steps, path))
        return stopping or early or out_of_time

    def start_the_time_limit(self) -> None:
        """max_minutes, before this start's first step (before its checkpoint is restored and config.yaml written):
        what the run knows of its steps (a resume's recorded ones) and of its end's writes; a limit that leaves no
        time for a step and the end stops here, nothing trained or written."""
        limit = self.time_limit
        if not limit.on or self.refinish:
            return
        recorded = self.point.state.get("history", []) if self.point is not None else []
        timed = [(h["seconds"], h.get("width", 0) * h.get("height", 0))  # (several sizes: each row's size)
                 for h in recorded if h.get("seconds") is not None]
        limit.slowest_step_s = time_limit.next_step_s(timed, step_pixels(self.cfg, self.start + 1))
        limit.end_bytes = disk_space.run_bytes(self.cfg, self.params, self.start).least
        if limit_reached(limit, self.accelerator):
            if self.point is None and self.is_main:  # a new run: nothing of it is kept (its lock removes the folder)
                forget_before(self.before_file)
            with same_on_every_rank():  # rank 0's verdict, in its numbers: it alone says it (each rank said it, rank
                raise UserError(limit.no_room_message())  # 1 as '[rank 1] ...' with its own clock's)
        limit.begin_lap()

    def out_of_time(self, step: int, checkpoint_s: float) -> bool:
        """After ``step`` (``checkpoint_s``: its checkpoint's seconds, counted in the end's work, not the step's):
        whether max_minutes leaves no time for the next step and the end's work; rank 0 decides for every rank."""
        limit = self.time_limit
        if not limit.on or step >= self.cfg.steps:
            return False
        if checkpoint_s:
            limit.checkpoint_took(checkpoint_s)
        limit.step_done(less_s=checkpoint_s, pixels=step_pixels(self.cfg, step),
                        next_pixels=step_pixels(self.cfg, step + 1))
        return limit_reached(limit, self.accelerator)

    def stops_early(self, step: int) -> bool:
        """Whether the held-out evaluation of ``step`` stopped the run (early_stop's patience spent)."""
        early = self.held_out is not None and self.held_out.exhausted
        if self.held_out is not None and self.accelerator.num_processes > 1 and self.held_out.due(step):
            from lowmem_alignprop.run.distributed import rank_0_says
            # each rank decided from its own evaluation (the same numbers on like cards): they follow rank 0, whose
            # count its checkpoint keeps (a rank that stopped alone would leave the others in the next collective)
            early = rank_0_says(self.accelerator, early)
            self.held_out.stopped_at = step if early else None
        return early

    # (tqdm's write: beside the progress bar, or before there is one: a stop at a resume's owed evaluation)
    def say_early_stop(self, step: int) -> None:
        from tqdm.auto import tqdm

        if self.is_main:
            where = f"is in {self.out / BEST_DIR}" if self.held_out.best_kept else "has no LoRA kept"
            tqdm.write(f"early stop at step {step}: the held-out evaluation ({improvement_measure(self.cfg)}) "
                       f"has not improved for {self.cfg.early_stop} evaluations; the best step "
                       f"({self.held_out.best_step}) {where}")

    def say_stopped(self, path: Path, ended: bool) -> None:
        """A stop request's checkpoint ``path``, saved by every rank together: rank 0 says so (``ended``: the run's
        last step, or an early stop's: the LoRA is written next)."""
        from tqdm.auto import tqdm

        if self.is_main:
            tqdm.write(f"{self.stop.name} received: saved checkpoint {path}; " + (
                "that was the run's last step: writing the LoRA (no after samples)" if ended
                else "continue with --resume latest"))

    def rollouts_through(self, step: int) -> int:
        """This rank's rollouts (images drawn) up to ``step``, counted from the checkpoint's: a resume that changes
        the batch size goes on where the shuffled pass stood (counting from the new sizes skipped and repeated
        prompts of it)."""
        return self.rollouts_before + (step - self.start) * self.cfg.grad_accum * self.cfg.batch_size

    def t5_tokens(self) -> dict[str, int]:
        """SD3/FLUX: the T5 tokens per prompt it encoded with (max_sequence_length 0 is the model's own: FLUX.1-dev
        512, schnell and SD3.5 256), for the model card's call (FluxPipeline takes 512 for schnell too)."""
        return {"t5_tokens": self.family.max_sequence_length(self.cfg)} if self.family.flow else {}

    def checkpoint_files(self, folder: Path) -> None:
        """A checkpoint's files beside the trainer's state: the EMA's, and a copy of init_lora/'s kept layers (a LoRA
        written from a checkpoint copied out of its run holds them too)."""
        if self.ema is not None:
            self.ema.save(folder)
        if (kept := self.out / INIT_LORA_DIR / KEPT_LAYERS_NAME).is_file():
            shutil.copyfile(kept, folder / KEPT_LAYERS_NAME)

    def save_checkpoint(self, step: int) -> Path:
        """The run at ``step`` into checkpoints/ (``last_saved``: what a stop or an abort says is kept)."""
        self.stop.writing = step  # (an abort meanwhile cannot tell whether it was written whole)
        try:
            path = self.write_checkpoint(step)
        except RuntimeError as e:  # the others wait in its collectives: one of them killed
            if (ended := self.another_process_ended(e, f"step {step}'s checkpoint")) is not None:
                raise ended from None
            raise
        self.last_saved, self.stop.writing = step, None
        return path

    def write_checkpoint(self, step: int) -> Path:
        """checkpoints/step-N, with what a resume needs beyond the weights (every process joins)."""
        return ckpt.save(self.accelerator, self.out, step, cfg=self.cfg, bare_unet=self.bare_unet,
                         optimizer=self.optimizer, engine=self.engine, rng_state=get_rng_state(self.rng),
                         history=self.history, fp=self.fingerprint, gather=self.gather,
                         extra={"auto_fit": self.fits, "resume_changes": self.resumed_with,
                                "software": [s for s in self.software if s["step"] <= step],
                                "skipped_steps": self.streak.skipped,
                                "rollouts": self.rollouts_through(step),
                                "reward_since": self.reward_since, "prompts_sha": self.prompts_sha,
                                "reward_sha": self.reward_sha, "input_files": self.input_files,
                                "eval_owed": self.eval_owed,
                                "init_lora_sha": self.init_sha,
                                "prompts_since": self.prompts_since, HELD_OUT_KEYS: self.aside,
                                "prompt_sources": self.prompt_sources,
                                "starts": len(started_commands(self.out)),  # its model card: the starts up to it
                                "start_dirs": self.start_dirs,  # ... and the folder each ran in
                                **self.t5_tokens(),
                                **({"evaluation": {**self.held_out.state(), "held_out_sha": self.held_out_sha}}
                                   if self.held_out is not None else {})},
                         write_extra=self.checkpoint_files)

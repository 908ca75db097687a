"""The pieces of a training run's setup (:class:`RunSetup`, part of
:class:`~lowmem_alignprop.training.train.Trainer`, whose ``setup()`` calls them in the order their failures are
reported): the accelerator and profiler, the models loaded and placed (LoRA, optimizer, block swap), the
trackers, the sampling state (RNG, prompt encoder, EMA, held-out evaluation); what an ended run's resume writes
again.
"""

import dataclasses
import functools
import logging
import os
import random
from pathlib import Path

import torch

from lowmem_alignprop import rewards
from lowmem_alignprop.settings.config import Config, flag_value
from lowmem_alignprop.settings.errors import UserError, first_line
from lowmem_alignprop.settings.image_size import first_step_at_largest, largest_size, resolution_of, step_size
from lowmem_alignprop.settings.model_kind import denoiser_component
from lowmem_alignprop.settings.profiles import profile_note, under_profile
from lowmem_alignprop.memory import host_allocator, precision, stages
from lowmem_alignprop.memory.allowances import fmt_bytes
from lowmem_alignprop.memory.block_swap import install as install_block_swap
from lowmem_alignprop.memory.optim import build_optimizer
from lowmem_alignprop.memory.placement import Placement, configure_cuda_allocator, unused_apple_gpu_note
from lowmem_alignprop.memory.tiling import untiled_note
from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.run import resume_rules
from lowmem_alignprop.run import base_fingerprint
from lowmem_alignprop.run import faults
from lowmem_alignprop.run.filenames import LORA_DIR, trained_dir
from lowmem_alignprop.run.trackers import TENSORBOARD_RUN, clear_earlier_start, hparams_recorded, record_hparams
from lowmem_alignprop.models.family import (check_supported, encode_then_read, family_for, model_defaults_note,
                                             model_kind)
from lowmem_alignprop.models.loading import apply_speed_features, load_components, nograd_unet
from lowmem_alignprop.models.sampling import vae_scale_factor
from lowmem_alignprop.toy.fidelity import applies
from lowmem_alignprop.step.rollout import apply_memory_features
from lowmem_alignprop.step.update import LearningRate
from lowmem_alignprop.measure import planner
from lowmem_alignprop.training.evaluation import BEST_DIR, EVAL_FIX, EVAL_SCORING, HeldOut, WeightEMA

log = logging.getLogger("lowmem_alignprop")


def make_accelerator(cfg: Config, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    kwargs = {}
    mp = precision.running_precision(cfg.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu")
    if (fp32 := precision.fp32_instead_note(cfg.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu")):
        log.warning("%s", fp32)
    if not torch.cuda.is_available() and mp == "bf16" and precision.cpu_has_bf16() is False:
        log.warning("mixed_precision=bf16 on a CPU without bf16 instructions (%s): torch emulates them, many times "
                    "slower than fp32; --set mixed_precision=no is faster here (the cpu profile's)",
                    ", ".join(sorted(precision.BF16_CPU_FLAGS)))
    if cfg.deepspeed_zero:
        from lowmem_alignprop.run.distributed import deepspeed_plugin
        kwargs["deepspeed_plugin"] = deepspeed_plugin(cfg, mp)  # Accelerator(cpu=True) would drop DeepSpeed
    elif not torch.cuda.is_available():
        kwargs["cpu"] = True  # several CPU processes then talk over gloo (docs/design.md section 8)
        if (mac := unused_apple_gpu_note()):
            log.warning(mac)
    accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.grad_accum,
                              log_with=None if cfg.report_to == "none" else cfg.report_to,
                              project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                                  logging_dir=str(output_dir / "logs")),
                              **kwargs)
    if cfg.deepspeed_zero and not torch.cuda.is_available():
        from lowmem_alignprop.run.distributed import repair_cpu_deepspeed_ranks
        repair_cpu_deepspeed_ranks(accelerator)
    return accelerator



class RunSetup:
    """Everything the Trainer builds before the first step, mixed into the Trainer (training/train.py).

    Reads the Trainer's ``cfg``, ``folder``, ``out``, ``point``, ``start``, ``refinish``, ``profile_name``,
    ``memory_snapshot``, ``prompts``, ``sample_prompts``, ``eval_prompts``, ``judge_prompts``, ``init_file``,
    ``init_lora_copy`` and its methods ``is_rank0``, ``generate``, ``write_lora``; sets ``allocator``,
    ``accelerator``, ``device``, ``host_allocator``, ``is_main``, ``weight_dtype``, ``prof``, ``place``, ``guard``,
    ``comps``, ``family``, ``embed``, ``unet``, ``vae``, ``fingerprint``, ``params``, ``attention``, ``swap``,
    ``reward``, ``unet_train``, ``optimizer``, ``learning_rate``, ``pipe``, ``rank``, ``rank_seed``, ``rng``,
    ``scheduler``, ``bare_unet``, ``nograd_unet``, ``engine``, ``gather``, ``samples_here``,
    ``render_together``, ``ema``, ``held_out``, ``init_encoder_layers`` and ``init_kept``."""

    def missing_outputs(self) -> str | None:
        """A --resume of a run that ended (its last step, or an early stop) whose LoRA, summary or export_format's
        exports are missing or damaged (a full disk or a kill while they were written): what is missing. The run then
        trains no step and writes them again from the checkpoint."""
        from lowmem_alignprop.lora.final_lora import outputs_problem
        from lowmem_alignprop.lora.lora_export import missing_exports

        if (not resume_rules.run_ended(self.point.state, self.cfg)
                or self.point.path.resolve().parent != ckpt.root_of(self.out).resolve()):
            return None
        problem = outputs_problem(self.out, trained_dir(self.cfg.train_unet), self.point.step)
        missing = [] if problem else missing_exports(self.cfg, self.out / LORA_DIR)
        return problem or (f"its {' and '.join(missing)} export{'s are' if len(missing) > 1 else ' is'} missing"
                           if missing else self.missing_best())

    def missing_best(self) -> str | None:
        """best/ gone from an ended run (--eval-every) whose best step's checkpoint is kept, which writes it again
        (HeldOut.keep_best_of); None where it is there, or nothing can write it."""
        best = (self.point.state.get("evaluation") or {}).get("best_step")
        if not self.cfg.eval_every or not isinstance(best, int) or (self.out / BEST_DIR).exists() or \
                self.cfg.train_unet != "lora" or not ckpt.step_dir(ckpt.root_of(self.out), best).is_dir():
            return None
        return f"its best/ (step {best}) is missing"

    def setup_accelerator(self) -> None:
        from lowmem_alignprop.measure.profiler import StageProfiler

        cfg = self.cfg
        self.allocator = configure_cuda_allocator(cfg.expandable_segments)  # less memory reserved but unused
        self.accelerator = make_accelerator(cfg, self.out)
        if self.accelerator.mixed_precision != cfg.mixed_precision:  # fp16 on a CPU runs in fp32: recorded as it ran
            self.cfg = cfg = dataclasses.replace(cfg, mixed_precision=self.accelerator.mixed_precision)
        self.device = self.accelerator.device
        # a CPU step's activations are host memory: freed ones go back to the system instead of glibc's heap
        cpu = self.device.type == "cpu"
        self.host_allocator = host_allocator.release_freed_tensors(cfg.cpu_malloc_threshold_kib) if cpu else None
        self.is_main = self.accelerator.is_main_process
        self.weight_dtype = precision.frozen_weight_dtype(self.accelerator.mixed_precision, self.device.type)
        measured = self.measured_step()  # a CPU counts the allocation of one step past this process's warm-up
        self.prof = StageProfiler(device=self.device, budget_gb=cfg.budget_gb, detail_steps={measured},
                                  snapshot_steps=self.memory_snapshot)
        self.prof.host_allocator = self.host_allocator
        self.place = Placement(self.device, offload=cfg.offload_frozen)
        self.guard = faults.StageGuard(self.prof.stage)  # names the stage an out-of-memory error happens in

    def measured_step(self) -> int:
        """The step whose allocation a CPU counts: this process's second (past its warm-up; a resume's own, not step
        2); of several sizes, the first from it at the largest size (the peak that must fit), said where none is."""
        cfg = self.cfg
        first = min(self.start + 2, cfg.steps)
        if (measured := first_step_at_largest(cfg.resolution, first, cfg.steps)) is not None:
            return measured
        if self.device.type == "cpu" and self.is_main:
            more = first_step_at_largest(cfg.resolution, first, first + len(cfg.sizes))
            warmup = f" (step {self.start + 1} is the warm-up)" if first > self.start + 1 else ""
            log.warning("memory: this CPU run measures the allocation of step %d, at %s px, not of the largest size, "
                        "%s px, which trains at no later step of this start%s: --steps %d or more measures it", first,
                        resolution_of(*step_size(cfg, first)), resolution_of(*largest_size(cfg.resolution)), warmup,
                        more)
        return first

    def load_models(self) -> None:
        from lowmem_alignprop.run.distributed import whole_models

        cfg = self.cfg
        try:
            with self.guard.stage(stages.LOAD), whole_models(self.accelerator):
                self._load()
        except UserError as e:  # a setting of a profile made for other models: that first (FLUX.1's block swap)
            raise under_profile(self.profile_name, cfg.model, cfg.model_components, e, cfg.revision) from None
        except (*faults.OOM_ERRORS, RuntimeError) as e:
            if not faults.is_oom(e):
                raise
            fit = faults.next_fit(cfg, stages.LOAD, suggest=planner.next_feature)
            raise faults.OutOfMemory(faults.oom_message(stages.LOAD, 0, faults.peak_so_far([]), cfg.budget_gb, fit,
                                                        False) + f" [{first_line(e, 100)}]") from None
        self.prof.record_modules(self.modules())
        for note in (self.family.resolution_note(cfg),  # e.g. SD1.5 under the cpu profile's 64 px
                     profile_note(self.profile_name, model_kind(self.comps)),  # e.g. FLUX.1 under rtx3060 (SD1.5)
                     model_defaults_note(self.comps, cfg), self.family.cut_prompts_note(cfg, self.prompts)):
            if note and self.is_main:
                log.warning(note)

    def _load(self) -> None:
        cfg, place = self.cfg, self.place
        # SD3/FLUX: the transformer stays empty until the prompt set is encoded (encode_then_read below)
        self.comps = comps = load_components(cfg, self.weight_dtype, self.device, transformer_last=True)
        self.family = family_for(comps)  # UNet (DDIM) or flow transformer (Euler): rollout, decode, LoRA format
        t5 = comps.text_encoder_3 is not None if comps.family == "sd3" else None  # (freed once the prompts are encoded)
        check_supported(comps, cfg)  # e.g. kl_coeff on a flow model: one line, nothing written yet
        self.init_encoder_layers = {}  # SD3/FLUX: --init-lora's text-encoder layers, kept before the prompts encode
        if self.family.flow:  # T5-XXL (9.5 GB) is freed before the transformer is read: never both in memory
            [self.embed] = encode_then_read(comps, place, self.device, cfg, self.prompt_set(), self.weight_dtype,
                                            prepare=[self.keep_init_encoder_layers if self.init_file else None])
            if self.is_rank0():  # what the prompt file costs: held for the whole run (plan counts it)
                where = "host memory" if self.embed.on_host else f"{self.device.type} memory"
                log.info("prompt set encoded once: %d distinct prompts hold %s of %s for the run",
                         len(self.embed.cache),
                         fmt_bytes(self.embed.nbytes()), where)
        self.unet, self.vae = comps.unet, comps.vae
        untiled = untiled_note(cfg.tiled_decode, cfg.shapes, cfg.tile_size, vae_scale_factor(self.vae),
                               cfg.tile_overlap)
        if untiled and self.is_rank0():
            log.warning("%s", untiled)
        # before DeepSpeed partitions the weights; with how the UNet is sampled (the exports read it)
        self.fingerprint = base_fingerprint.fingerprint(cfg, self.unet, dict(comps.scheduler.config), t5=t5,
                                                        revision=comps.revision,
                                                        components_revision=comps.components_revision,
                                                        vae_revision=comps.vae_revision)
        if self.point is not None:
            base_fingerprint.check_fingerprint(self.point.state, self.fingerprint, cfg, self.point.path)
        split = self.read_init_lora() if self.init_file is not None else None  # (kept layers: into the base)
        self.params, self.attention = apply_memory_features(comps, cfg, self.device, self.weight_dtype,
                                                            autocast=self.accelerator.native_amp)
        if split is not None:  # --init-lora: the adapter starts as that LoRA's trained layers
            self.start_from_init_lora(split)
        # block_swap: N frozen blocks wait in pinned CPU memory and come to the device only while they run
        self.swap = install_block_swap(self.unet, cfg.block_swap, self.device)
        (self.swap.model_to(self.unet, self.device) if self.swap else self.unet.to(self.device)).train()
        apply_speed_features(self.unet, self.vae, cfg, self.device)  # channels_last, tf32, regional compile
        if cfg.encode_on_cpu:  # SD3/FLUX: the text encoders (T5-XXL) encode on the CPU and never reach the device
            place.offload("text_encoder", *comps.text_encoders())
        else:
            place.park("text_encoder", *comps.text_encoders())  # to the device only to encode
        place.park("vae", self.vae)  # on the GPU only from decode to backward when offload_frozen is on
        self.reward = self.build_reward()
        place.park("reward", self.reward)
        if cfg.deepspeed_zero:
            from lowmem_alignprop.run.distributed import build_deepspeed_optimizer, size_buckets
            size_buckets(self.accelerator, self.params)
            optimizer = build_deepspeed_optimizer(cfg, self.params)
        else:
            optimizer = build_optimizer(cfg, self.params)
        # with block swap the model is placed already (accelerate's .to(device) would bring the swapped blocks back)
        self.unet_train, self.optimizer = self.accelerator.prepare(
            self.unet, optimizer, device_placement=[False, False] if self.swap else None)
        self.learning_rate = LearningRate(optimizer, cfg)  # (the bare optimizer: DeepSpeed steps its param groups)
        self.pipe = self.family.make_pipeline(comps)

    def read_init_lora(self):
        """--init-lora's LoRA read onto the loaded models before anything else reads them (after the base's
        fingerprint, which the exports read): the layers the run trains remembered, the others fused into the frozen
        base (``init_kept``: what init_lora/ keeps of them). A resume fuses them again from the run's copy."""
        from lowmem_alignprop.lora.init_lora import split_init_lora

        split = split_init_lora(self.family.make_pipeline(self.comps), self.init_file, self.cfg.init_lora,
                                self.cfg.lora_layers, self.cfg.model, encoders=self.init_encoder_layers)
        self.init_kept = split
        if split.kept and self.is_rank0():
            log.info("%s", split.kept_line(self.cfg.init_lora))
        return split

    def keep_init_encoder_layers(self, text_pipe) -> None:
        """SD3/FLUX: --init-lora's text-encoder layers, loaded into the encoders before the prompt set is encoded
        (``text_pipe``: the pipeline of the encoders, freed once it is), kept for read_init_lora."""
        from lowmem_alignprop.lora.init_lora import keep_encoder_layers

        self.init_encoder_layers = keep_encoder_layers(text_pipe, self.init_file, self.cfg.init_lora)

    def start_from_init_lora(self, split) -> None:
        """The trained adapter (just added) starts as --init-lora's trained layers (``split``: read_init_lora's);
        says so, with the sampler warning and kl_coeff's note at a fresh start."""
        from lowmem_alignprop.lora.init_lora import layers_taken, other_sampler, start_from_lora

        cfg = self.cfg
        copied, trained = start_from_lora(self.unet, split, cfg.init_lora, cfg.lora_layers)
        taken = layers_taken(copied, trained)
        if self.point is not None:  # a resume: the checkpoint's LoRA trains on (the one it started from is its
            log.info("the run started from the LoRA %s (%s): the checkpoint's LoRA trains on",  # "before")
                     cfg.init_lora if self.init_file != self.init_lora_copy else
                     f"{cfg.init_lora}, its copy {self.init_file.parent}", taken)
            return
        if (other := other_sampler(cfg.init_lora, self.init_file, dict(self.comps.scheduler.config), cfg.eta)) \
                and self.is_rank0():
            log.warning("%s", other)
        base = "the base model with the LoRA's kept layers (the trained LoRA off)" if split.kept else \
            "the base model (its LoRA off)"
        revision = (self.init_source or {}).get("revision")  # a hub id's: the commit read (main moves)
        named = f"{cfg.init_lora} at commit {revision}" if revision else cfg.init_lora
        log.info("starting from the LoRA %s (%s)%s", named, taken,
                 f"; kl_coeff keeps the run near {base}, not near this LoRA: the KL starts above 0"
                 if cfg.kl_coeff and any(b.any() for _, b in split.trained.values()) else "")  # (a LoRA at zero: 0)

    def prompt_set(self) -> set[str]:
        """Every prompt the run will use: the encoder's set never grows (SD3/FLUX free their text encoders once it
        is encoded)."""
        return set(self.prompts) | set(self.sample_prompts) | set(self.eval_prompts) | set(self.judge_prompts)

    def build_reward(self):
        return rewards.build_reward(self.cfg.reward, device="cpu", dtype=self.weight_dtype,
                                    checkpointing=self.cfg.reward_checkpointing, weights=self.cfg.reward_weights)

    def modules(self) -> dict:
        # SD3/FLUX: the text encoders are dropped once the prompt set is encoded (None from then on)
        return {denoiser_component(self.family.flow): self.unet, "vae": self.vae,
                "text_encoder": self.comps.text_encoder, "reward": self.reward, "lora": self.params,
                "optimizer": self.optimizer}

    def start_trackers(self) -> None:
        """The run folder, and the trackers (report_to) before the first image is logged to them (the before grid)."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.report_to != "none":
            # wandb's files in the run folder (logs/wandb/, as tensorboard's logs/), not the working directory's
            # ./wandb, unless WANDB_DIR says where
            kwargs = {"wandb": {"dir": str(self.wandb_dir())}} if cfg.report_to == "wandb" and \
                not os.environ.get("WANDB_DIR") else {}
            if cfg.report_to == "tensorboard" and self.start:  # a resume: the steps after its checkpoint that logs/
                # holds (a dead branch's, a killed run's) are hidden, as metrics.jsonl drops them; a run's outputs
                # written again: its last step too (its before/after grid is sent again), sent again by fit()
                kwargs = {"tensorboard": {"purge_step": self.start + (0 if self.refinish else 1)}}
            values = {k: flag_value(v) if isinstance(v, list) else v for k, v in cfg.to_dict().items()  # (several
                      if isinstance(v, (int, float, str, bool, list))}  # sizes: as --set gives them, "1024,1216x832")
            tensorboard = cfg.report_to == "tensorboard"  # (its settings: record_hparams, below)
            if tensorboard and self.point is None and self.is_main and (gone := clear_earlier_start(self.out / "logs")):
                log.info("logs/%s: removed an earlier start's TensorBoard files (it trained no step): %s",
                         TENSORBOARD_RUN, ", ".join(gone))
            self.accelerator.init_trackers(TENSORBOARD_RUN, init_kwargs=kwargs, config=None if tensorboard else values)
            # the settings once, from the first start (config.yaml is the latest start's, command.txt each start's)
            if tensorboard and self.is_main and not hparams_recorded(self.out / "logs"):
                record_hparams(self.accelerator, values, self.out / "logs")

    def wandb_dir(self) -> Path:
        """Where wandb writes its run files: logs/ of the run folder (it adds wandb/)."""
        (folder := self.out / "logs").mkdir(parents=True, exist_ok=True)
        return folder

    def setup_sampling(self) -> None:
        from lowmem_alignprop.run.distributed import deepspeed_engine, gatherer, is_zero3

        cfg, acc = self.cfg, self.accelerator
        self.rank = acc.process_index
        self.rank_seed = cfg.seed * 1000 + self.rank  # each rank its own stream of prompts and K
        self.rng = random.Random(self.rank_seed)  # prompt order and K draws
        if self.embed is None:  # (SD3/FLUX's was made before the transformer was read) cached once, or per step
            self.embed = self.family.prompt_encoder(self.pipe, self.comps, self.place, self.device, cfg,
                                                    prompts=self.prompt_set(), final=True)
        self.scheduler = self.comps.scheduler
        self.bare_unet = acc.unwrap_model(self.unet_train)
        self.nograd_unet = nograd_unet(self.bare_unet, cfg)  # compile=nograd: a compiled view for no-grad steps
        self.engine = deepspeed_engine(acc, self.unet_train)  # None unless DeepSpeed
        self.gather = gatherer(acc, self.params)  # ZeRO-3: the partitioned LoRA weights made whole for reading
        # ZeRO-3 gathers weights collectively inside every UNet call: sampling must then run on every rank
        self.samples_here = self.is_main or is_zero3(acc)
        # ... and together: one rank's out-of-memory skip would leave the others waiting in a gather, so it stops the
        # run as in a step (render_or_skip)
        self.render_together = is_zero3(acc) and acc.num_processes > 1
        if cfg.ema_decay:
            self.ema = WeightEMA(self.params, cfg.ema_decay,  # names: checkpoints keep the average by name
                                 [n for n, p in self.bare_unet.named_parameters() if p.requires_grad])
        if cfg.eval_every:  # every rank evaluates (same prompts, seeds, weights): they agree on the early stop
            self.held_out = HeldOut(cfg, self.eval_prompts, self.out, write_lora=self.write_lora,
                                    sample=functools.partial(self.generate, when=EVAL_SCORING, fix=EVAL_FIX))
            if applies(cfg.model, self.eval_prompts) or cfg.best_by == "fidelity":  # the toy world: its exact
                # evaluators judge the held-out images too (eval_fidelity_*; with fidelity_images=0 as well)
                from lowmem_alignprop.toy.fidelity import evaluate_batch
                self.held_out.evaluators.append(evaluate_batch)

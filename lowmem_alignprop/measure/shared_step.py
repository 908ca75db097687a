"""One training step, shared by the planner's estimate (fake tensors) and the CPU measurement (real tensors:
:func:`measure_cpu_step`, which tests and benchmarks check the estimate against)."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lowmem_alignprop.memory import precision, stages
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.step.micro import Rollout, micro_step
from lowmem_alignprop.step.rollout import apply_memory_features
from lowmem_alignprop.step.update import optimizer_update


@dataclass
class StepParts:
    cfg: Config
    comps: Any
    pipe: Any
    reward: Any
    params: list
    optimizer: Any
    prompts: list[str]
    place: Any
    stage: Callable
    autocast: Callable[[], Any] = contextlib.nullcontext
    run_optimizer: bool = True
    scheduler: Any = None  # None: the components' own
    saved_tensors: Callable[[], Any] | None = None  # activation_offload's hooks; None: torch's save_on_cpu
    encoder: Any = None  # SD3/FLUX: the prompt cache filled at load (encode_at_load); None: made in the step


def warm_up_optimizer(parts: StepParts) -> None:
    """One optimizer step on zero gradients: Adam's state exists, as it does from step 2 on. With
    gradient accumulation the gradients stay allocated (the last micro-step finds them there)."""
    for p in parts.params:
        p.grad = torch.zeros_like(p)
    if parts.run_optimizer:
        parts.optimizer.step()
    if parts.cfg.grad_accum == 1:
        parts.optimizer.zero_grad(set_to_none=True)


def encode_at_load(parts: StepParts, *, final: bool = False):
    """SD3/FLUX: the prompt set encoded as the trainer does it, while loading (training/train_setup.py): before the
    transformer is read, the LoRA, the optimizer state and the reward exist. ``final`` frees the text encoders after
    (the CPU measurement; the estimate's :class:`Residency` only stops counting them). Returns the filled cache."""
    from lowmem_alignprop.models.family import family_for

    encoder = family_for(parts.comps).prompt_encoder(parts.pipe, parts.comps, parts.place, torch.device("cpu"),
                                                     parts.cfg, prompts=parts.prompts, final=final)
    with parts.stage(stages.LOAD):
        encoder.encode_all()
    return encoder


def run_step(parts: StepParts, *, k: int, seed: int = 0):
    """One micro-step plus the optimizer step, as :meth:`~lowmem_alignprop.training.train.Trainer.train_step` runs
    them (the same :func:`~lowmem_alignprop.step.micro.micro_step` and optimizer_update, placement calls included).
    Returns what stays alive afterwards (the prompt cache and the batch's embeddings)."""
    from lowmem_alignprop.models.family import family_for

    cfg, comps = parts.cfg, parts.comps
    family = family_for(comps)  # UNet (DDIM) or flow transformer (Euler), as the trainer
    device = torch.device("cpu")
    rng = random.Random(seed)
    batch_prompts = [rng.choice(parts.prompts) for _ in range(cfg.batch_size)]
    # the first step's worst case with caching: every prompt encoded (16 at a time), then the encoder leaves;
    # SD3/FLUX's set was encoded at load (encode_at_load): their step only looks its batch up
    encoder = parts.encoder or family.prompt_encoder(parts.pipe, comps, parts.place, device, cfg,
                                                     prompts=parts.prompts)
    rollout = Rollout(cfg=cfg, family=family, sample_unet=comps.unet, train_unet=comps.unet,
                      scheduler=parts.scheduler or comps.scheduler, vae=comps.vae, reward=parts.reward,
                      place=parts.place, embed=encoder, stage=parts.stage, device=device, autocast=parts.autocast,
                      saved_tensors=parts.saved_tensors)
    micro = micro_step(rollout, batch_prompts, k=k, generator=torch.Generator().manual_seed(seed))
    with parts.stage(stages.OPTIMIZER):  # the trainer's own update: clip, step, free the gradients
        optimizer_update(parts.optimizer, parts.params, cfg.max_grad_norm, step=parts.run_optimizer,
                         read_norm=False)
    return encoder.cache, micro.embeddings


def measure_cpu_step(cfg: Config, *, prompts: list[str] | None = None, timed_steps: int = 0,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Run the step of :func:`run_step` for real on the CPU (weights as the trainer loads them, fp32) and measure
    each stage's peak allocation by counting live storages (:class:`~lowmem_alignprop.measure.cpu_allocation.
    CpuAllocationTracker`'s default, StageProfiler's method: every tensor an op returns, not the scratch inside one
    op, like the estimate) plus the resident bytes at the step's start. After one warm-up optimizer step, like the
    estimate. ``timed_steps`` more steps without the profiler give seconds per step and per stage, by ``clock``
    (``time.process_time``: the CPU seconds, which other jobs on the machine change less than the wall's)."""
    from lowmem_alignprop.measure.resident_tensors import run_objects_only

    with run_objects_only():  # the measurement walks the step's own objects only, as the trainer's does
        return _measure_cpu_step(cfg, prompts, timed_steps, clock)


def _measure_cpu_step(cfg: Config, prompts: list[str] | None, timed_steps: int, clock: Callable[[], float]) -> dict:
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.memory.optim import build_optimizer
    from lowmem_alignprop.memory.placement import Placement
    from lowmem_alignprop.measure.cpu_allocation import CpuAllocationTracker
    from lowmem_alignprop.measure.profiler import StageProfiler
    from lowmem_alignprop.measure.resident_tensors import resident_bytes
    from lowmem_alignprop.step.prompts import configured_prompts
    from lowmem_alignprop.memory.block_swap import install
    from lowmem_alignprop.models.family import family_for
    from lowmem_alignprop.rewards import build_reward

    prompts = prompts if prompts is not None else configured_prompts(cfg)
    cpu = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    comps = load_components(cfg, torch.float32)
    autocast = precision.cpu_autocast(cfg.mixed_precision)
    params, _ = apply_memory_features(comps, cfg, cpu, torch.float32, autocast=autocast is not contextlib.nullcontext)
    swap = install(comps.unet, cfg.block_swap, cpu)  # noqa: F841 - its hooks live as long as it does
    comps.unet.train()
    reward = build_reward(cfg.reward, device="cpu", dtype=torch.float32, checkpointing=cfg.reward_checkpointing,
                          weights=cfg.reward_weights)
    optimizer = build_optimizer(cfg, params)
    prof = StageProfiler("cpu")  # no step begun: its stages are record_function ranges the tracker reads
    family = family_for(comps)
    parts = StepParts(cfg, comps, family.make_pipeline(comps), reward, params, optimizer, prompts,
                      Placement(cpu, offload=cfg.offload_frozen), prof.stage, autocast)
    if family.flow:  # as the trainer: the prompt set encoded at load, the text encoders freed before the step
        parts.encoder = encode_at_load(parts, final=True)
    k = cfg.window_bounds()[1]
    warm_up_optimizer(parts)
    held = [comps.unet, comps.vae, *comps.text_encoders(), reward, optimizer,
            [p.grad for p in params if p.grad is not None],
            [vars(e) for e in parts.encoder.cache.values()] if parts.encoder else []]  # the prompt cache made at load
    baseline = sum(resident_bytes(held).values())
    with CpuAllocationTracker(count_baseline=False, names=set(stages.STAGES)) as tracker:
        keep = run_step(parts, k=k, seed=cfg.seed)
    del keep
    out = {"stages": {n: baseline + tracker.peaks[n] for n in stages.STEP_STAGES if n in tracker.peaks},
           "baseline": baseline, "k": k, "profiled_seconds": sum(tracker.seconds.values())}
    times, per_stage = [], dict.fromkeys(stages.STEP_STAGES, 0.0)

    @contextlib.contextmanager
    def timed(name: str):
        t0 = clock()
        try:
            yield
        finally:
            per_stage[name] += clock() - t0

    for i in range(timed_steps):
        t0 = clock()
        run_step(dataclasses.replace(parts, stage=timed), k=k, seed=cfg.seed + 1 + i)
        times.append(clock() - t0)
    if times:
        out["seconds_per_step"] = sum(times) / len(times)
        out["stage_seconds"] = {n: t / len(times) for n, t in per_stage.items()}
    out["peak_allocated"] = max(out["stages"].values())
    out["peak_stage"] = max(out["stages"], key=out["stages"].get)
    return out

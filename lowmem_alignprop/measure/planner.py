"""``lowmem-alignprop plan``: will this configuration fit the card? Answered without a GPU and without weights.

How (docs/design.md section 4):

1. The models are built from their architecture configs on the ``meta`` device in the target dtype
   (``--model sd15|sd21|sdxl``: the shipped configs; ``tiny``, a diffusers directory or a cached hub
   snapshot: its config files; a single-file checkpoint: the detected architecture). Model rewards
   (aesthetic, clip, pickscore, hpsv2) are CLIP architectures built from config the same way.
2. The trainer's own :func:`~lowmem_alignprop.step.rollout.apply_memory_features` casts, freezes, picks
   attention and checkpointing and adds LoRA, still on meta.
3. Inside ``FakeTensorMode(allow_non_fake_inputs=True)`` the modules get fake CPU storage
   (each meta tensor wrapped as a fake CPU tensor: no memory behind it, tied weights still tied), and one training
   step runs through the trainer's :func:`~lowmem_alignprop.step.rollout.rollout_loss`: encode_prompts,
   sample_nograd, sample_grad, decode, reward, backward, optimizer (after one warm-up optimizer step, so Adam's
   state exists as it does from step 2 on). A small ``TorchDispatchMode`` counts the bytes of every live storage
   (freed ones leave through weak-reference callbacks) and keeps the peak per stage. Module weights count only in
   the stages where they sit on the device (``offload_frozen``, ``cache_prompt_embeddings``).
4. On a CUDA target, ``torch.autocast("cuda")`` is emulated (its op lists: convolutions, matmuls and
   attention in fp16/bf16; norms, upsampling, softmax, pow, exp... in fp32), because the CPU autocast
   has different lists and a CUDA fake tensor cannot run on a CPU-only build.

What fake tensors cannot see is added as explicit, printed allowances
(:data:`~lowmem_alignprop.memory.allowances.ALLOWANCES`): the CUDA context, the caching allocator's rounding and
fragmentation, cuBLAS/cuDNN workspaces.

Cost control: the no-grad steps leave nothing behind, so one is simulated; the grad window is simulated
with ``min(K, 2)`` steps and the bytes each further step keeps (its checkpoint input and scheduler
graph, measured between the two) are added for the remaining ``K - 2`` steps. Randomized K is
planned at ``k_max``, its worst case.

The pieces, each in its own module: the counters (measure/counters.py), the CUDA autocast emulation
(measure/cuda_autocast.py), the models on meta (measure/meta_models.py), the step shared with the CPU measurement
(measure/shared_step.py), the weights' bytes (measure/weight_bytes.py), the figures (measure/figures.py), seconds per
step (measure/step_time.py) and the changes tried when it does not fit (measure/fit_changes.py). Here: the estimate,
the search for a change that fits, and the command.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import logging
import sys
import time
from typing import Any, Callable

import torch

from lowmem_alignprop.memory import stages
from lowmem_alignprop.settings.config import Config, describe_k, host_memory_note, set_flags
from lowmem_alignprop.settings.errors import UserError, first_line
from lowmem_alignprop.settings.profiles import profile_note, profile_of_card, under_profile
from lowmem_alignprop.settings.image_size import describe_sizes, largest_size
from lowmem_alignprop.memory import precision  # its rule called through the module: one rule, patchable
from lowmem_alignprop.measure.devices import device_for
from lowmem_alignprop.measure.provenance import provenance
from lowmem_alignprop.step.rollout import apply_memory_features
from lowmem_alignprop.memory.allowances import ALLOWANCES, CUDA_BLOCK, GIB, RESERVED_FACTOR, WORKSPACE_BYTES
from lowmem_alignprop.memory.quant import BNB_MODES
from lowmem_alignprop.memory.tiling import untiled_note
from lowmem_alignprop.models.loading import check_before_load
from lowmem_alignprop.models.sampler_check import ddim_settings
from lowmem_alignprop.models.sampling import HOST_CACHE_ABOVE, vae_scale_factor
from lowmem_alignprop.run.disk_space import run_bytes
from lowmem_alignprop.run.software import CORE_LIBRARIES
from lowmem_alignprop.measure.counters import (TEXT_ENCODER, Counters, EncodedOnce, HostSaveOnCpu, LiveBytes, Residency,
                                               StageWork)
from lowmem_alignprop.measure.cuda_autocast import CudaAutocast
from lowmem_alignprop.measure.meta_models import meta_components, meta_reward
from lowmem_alignprop.measure.shared_step import StepParts, encode_at_load, run_step, warm_up_optimizer
from lowmem_alignprop.measure import estimate_cache
from lowmem_alignprop.measure.figures import Estimate, figures, fragmentation_allowance, host_memory
from lowmem_alignprop.measure.weight_bytes import block_swap, dequant_hooks, fake_weights, fp8_load_bytes, optimizer_for
from lowmem_alignprop.measure.step_time import render_time, step_time, step_work
from lowmem_alignprop.measure.fit_changes import candidate_changes


PLAN_LIBRARIES = CORE_LIBRARIES  # in plan --json's "versions": those every run records (run/software.py)


# ---------------------------------------------------------------------------------------------------
# the estimate
# ---------------------------------------------------------------------------------------------------
class _RealTimesteps:
    """The components' scheduler for a step on fake tensors: its tables are real tensors made outside fake mode and
    its timesteps plain ints, so DDIM's step indexes them with an int (a fake index would be data-dependent). Every
    other attribute is the scheduler's own."""

    def __init__(self, scheduler):
        self._scheduler = scheduler

    def __getattr__(self, name):
        return getattr(self._scheduler, name)

    def set_timesteps(self, n, device=None, **kw):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            self._scheduler.set_timesteps(n, device="cpu", **kw)
            self._scheduler.timesteps = [int(t) for t in self._scheduler.timesteps]  # slicing them stays real

    def step(self, model_output, timestep, sample, *a, **kw):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        if isinstance(timestep, torch.Tensor):
            with unset_fake_temporarily():
                timestep = int(timestep)
        return self._scheduler.step(model_output, timestep, sample, *a, **kw)


_REUSED: list[dict] = []  # the open reuse_estimates scope's estimates (one scope: nested ones share it)


@contextlib.contextmanager
def reuse_estimates(memo: dict | None = None):
    """Within it, :func:`estimate` of a configuration it already estimated (the same Config, target, prompts and
    autocast emulation; the budget may differ) returns a copy of that estimate instead of running the step again:
    the estimate is a function of those alone (the meta models are cached per process already). ``plan``, its
    suggestions and ``plan --fastest`` open one, so the search's duplicates (the configuration as given met again as
    the all-features-on corner; the chosen configuration planned again at the end) cost nothing. Nested scopes share
    the outermost one; leaving it forgets everything, but for what it kept in ``memo`` (a dict the caller keeps,
    to reuse in a later scope)."""
    if _REUSED:
        yield
        return
    _REUSED.append({} if memo is None else memo)
    try:
        yield
    finally:
        _REUSED.pop()


# fields an estimate never reads: the budget (Estimate.fits is given it) and the run's bookkeeping; configurations
# that differ only in them share one estimate (a plan, then --auto-fit of a run in its own folder with its steps)
NOT_ESTIMATED = ("budget_gb", "output_dir", "steps", "eval_every", "eval_prompts", "eval_holdout", "early_stop",
                 "report_to", "sample_prompts", "sample_every", "export_format", "push_to_hub", "fidelity_images",
                 "fidelity_every", "checkpoint_every", "keep_checkpoints", "auto_fit", "max_bad_steps",
                 "max_zero_grad_steps", "log_every")


def _estimated_fields(cfg: Config) -> str:
    """What an estimate depends on of ``cfg``: every field but NOT_ESTIMATED."""
    return repr([(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in NOT_ESTIMATED])


def estimate(cfg: Config, *, target: str = "cuda", prompts: list[str] | None = None,
             emulate_autocast: bool = True) -> Estimate:
    """Per-stage peak memory of one training step of ``cfg`` on ``target`` ("cuda" or "cpu"), with fake tensors.

    ``emulate_autocast=False`` runs a CUDA target's step without autocast (frozen modules purely in their own
    dtype): not what the trainer does, but it shows what autocast's fp32 norms and upsampling cost.
    Inside :func:`reuse_estimates` a configuration estimated before is not estimated again (a copy is returned)."""
    from lowmem_alignprop.step.prompts import configured_prompts

    if target not in ("cuda", "cpu"):
        raise UserError(f"target device must be cuda or cpu, not {target!r}")
    prompts = prompts if prompts is not None else configured_prompts(cfg)
    key = _memo_key(cfg, target, prompts, emulate_autocast)
    if not _REUSED:
        return _estimate_or_cached(cfg, target, prompts, emulate_autocast, key)
    memo = _REUSED[0]
    if key not in memo:
        memo[key] = _estimate_or_cached(cfg, target, prompts, emulate_autocast, key)
    return copy.deepcopy(memo[key])  # callers may add notes to theirs


def _estimate_or_cached(cfg: Config, target: str, prompts: list[str], emulate_autocast: bool,
                        key: tuple) -> Estimate:
    """The estimate from the disk cache (measure/estimate_cache.py), else made and kept there."""
    name = estimate_cache.key(cfg, key)
    est = estimate_cache.load(name)
    if est is None:
        est = _estimate(cfg, target, prompts, emulate_autocast)
        # no name before: asked again, as an uncached hub id is in the hub cache once its estimate is made
        estimate_cache.store(name if name is not None else estimate_cache.key(cfg, key), est)
    return est


def _memo_key(cfg: Config, target: str, prompts: list[str], emulate_autocast: bool = True) -> tuple:
    return _estimated_fields(cfg), target, tuple(prompts), emulate_autocast


def is_known(cfg: Config, target: str, prompts: list[str]) -> bool:
    """Whether this configuration's estimate is at hand: in the open :func:`reuse_estimates` scope or on disk
    (measure/estimate_cache.py)."""
    key = _memo_key(cfg, target, prompts)
    return (bool(_REUSED) and key in _REUSED[0]) or estimate_cache.has(estimate_cache.key(cfg, key))


def remember(cfg: Config, target: str, prompts: list[str], est: Estimate) -> None:
    """Put an estimate made elsewhere (another process: plan --fastest's workers) into the open
    :func:`reuse_estimates` scope, so that :func:`estimate` of that configuration returns it."""
    if _REUSED:
        _REUSED[0][_memo_key(cfg, target, prompts)] = est


def _estimate(cfg: Config, target: str, prompts: list[str], emulate_autocast: bool) -> Estimate:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowmem_alignprop.models.family import family_for, model_kind

    t0 = time.perf_counter()
    notes: list[str] = []
    cuda = target == "cuda"
    full, cfg = cfg, at_largest(cfg, notes)  # several sizes: the step at the largest, the peak that must fit
    k_plan, k_sim, n_nograd, sim = _simulated(cfg, notes)
    dtype = precision.frozen_weight_dtype(cfg.mixed_precision, target)  # as the trainer: fp32 on a CPU

    autocast_mode, autocast = _autocast_for(cfg, cuda, dtype, emulate_autocast)
    # 1-2. meta models + the trainer's memory features (cast, checkpointing, attention, LoRA), all on meta
    comps, reward = _meta_models(full, sim, target, dtype, notes, autocast=autocast is not contextlib.nullcontext)
    if (cut := family_for(comps).cut_prompts_note(cfg, prompts)):  # as training says it: prompts the encoder cuts
        notes.append(cut)
    # 3. fake storage for everything
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    params, weights, largest = fake_weights(cfg, comps, reward, fake, cuda, notes)
    counter = LiveBytes(round_to=CUDA_BLOCK if cuda else 1)
    work = StageWork()  # the time estimate's counts, beside the memory counter
    counter.add_static(t for m in (comps.unet, comps.vae, *comps.text_encoders(), reward)
                       if m is not None for t in list(m.parameters()) + list(m.buffers()))
    host_pinned = block_swap(cfg, comps, weights, counter, work, cuda, notes)
    place = Residency(counter, weights, offload=cfg.offload_frozen, host=not cuda)
    if cuda and cfg.offload_frozen:  # after load the text encoder, VAE and reward model are parked on the CPU
        place.on_device -= {TEXT_ENCODER, "vae", "reward"}
    place.on_move = lambda n: work.add("pcie_bytes", n)
    if cuda and cfg.encode_on_cpu:  # SD3/FLUX: the text encoders never reach the device
        place.on_device -= {TEXT_ENCODER}
    optimizer, run_opt = optimizer_for(cfg, params, cuda, weights, place, notes)
    if cfg.ema_decay:  # the EMA's fp32 copy of the trained weights sits beside them on the device
        weights["ema"] = sum(p.numel() * 4 for p in params)
        place.on_device.add("ema")
    place.extra = largest
    place.refresh()

    # the level at each grad-window UNet call. The window clears autocast's cache where it starts (truncated_chain:
    # casts made without grad have no graph), so the cache of the LoRA weights' casts is made again inside its first
    # call: count it as there before that call (it is made once per window, not per step)
    grad_calls: list[int] = []

    def at_grad_call(module, args):
        work.unet_call()
        if counter.open and counter.open[-1] == stages.SAMPLE_NOGRAD and "nograd_call" not in work.marks:
            # the no-grad steps' setup (merge_lora_nograd's merge) happens once per rollout, not per call; the first
            # call's own input ops (CFG's cat, a cast: ~3 of a call's ~1,000+) fall in with it
            work.marks["nograd_call"] = dict(work.bucket())
        if len(grad_calls) == calls_per_step * k_sim and counter.open and counter.open[-1] == stages.SAMPLE_GRAD:
            work.marks["lv"] = dict(work.bucket())  # DRaFT-LV's call begins: its work is counted once (step_work)
        if torch.is_grad_enabled() and counter.open and counter.open[-1] == stages.SAMPLE_GRAD:
            cached = sum(counter._rounded(p.numel() * dtype.itemsize) for p in params) if autocast_mode else 0
            grad_calls.append(counter.current + (cached if len(grad_calls) == 0 else 0))

    calls_per_step = 2 if cfg.kl_coeff > 0 else 1  # the LoRA model's call, and the base model's with KL

    def after_grad_call(module, args, output):  # where backward reaches each window step (step_time._backward_work)
        if torch.is_grad_enabled() and counter.open and counter.open[-1] == stages.SAMPLE_GRAD:
            step = (len(grad_calls) - 1) // calls_per_step
            work.window_output(output[0] if isinstance(output, tuple) else getattr(output, "sample", output),
                               step if step < k_sim else "lv")

    hooks = [comps.unet.register_forward_pre_hook(at_grad_call), comps.unet.register_forward_hook(after_grad_call)]
    hooks += dequant_hooks(cfg, comps.unet, work)
    # what differs from the trainer's step is passed in: the scheduler keeps real timesteps, saved tensors of
    # activation_offload go to (uncounted) host memory, the stage is the counter's
    family = family_for(comps)
    parts = StepParts(sim, comps, EncodedOnce(family.make_pipeline(comps), prompts), reward, params, optimizer,
                      prompts, place, _both_stages(counter.stage, work.stage), autocast, run_optimizer=run_opt,
                      scheduler=None if family.flow else _RealTimesteps(comps.scheduler),
                      saved_tensors=(lambda: HostSaveOnCpu(counter, work)) if cuda and cfg.activation_offload else None)
    try:
        with fake, contextlib.ExitStack() as stack:
            if autocast_mode is not None:
                stack.enter_context(autocast_mode)
                stack.enter_context(autocast_mode.replay_in_recompute())
            counters = stack.enter_context(Counters(counter, work))  # the work: only in the step
            if family.flow:  # the prompt set is encoded at load, with only the text side in memory
                parts.encoder = _encode_at_load_counted(parts, place, cuda)
            warm_up_optimizer(parts)
            step_start = counter.current
            with counters.work_counted():
                keep = run_step(parts, k=k_sim, seed=cfg.seed)
            del keep
    except (Exception, SystemExit) as e:  # a user reward's sys.exit on fake tensors is its failure too
        _name_a_user_reward_that_needs_data(cfg.reward, e)
        raise
    finally:
        for hook in hooks:
            hook.remove()
    est = figures(cfg, target, counter, weights, largest, grad_calls, (k_plan, k_sim, sim.window_keep), step_start,
                   t0, notes, load_extra=fp8_load_bytes(cfg, comps, counter, cuda))
    work.accumulation.update(ops=len(params), other_bytes=3 * sum(  # two gradients read, their sum written
        p.numel() * (dtype.itemsize if autocast_mode else p.element_size()) for p in params))  # (autocast: its casts')
    est.work = step_work(cfg, work, k_sim, n_nograd, keep_sim=sim.window_keep)
    est.host_pinned = host_pinned
    est.trained = dict(collections.Counter(f"{p.numel()}:{str(p.dtype).removeprefix('torch.')}" for p in params))
    if cuda:
        on_host = place.host_held + (parts.encoder.nbytes() if parts.encoder and cfg.encode_on_cpu else 0)
        if place.host_held:  # as training says it (models/sampling.crowds_device)
            notes.append(f"{len(set(prompts))} prompts: their embeddings ({place.host_held / GIB:.2f} GiB) wait in "
                         "host memory, each batch's brought to the device (a cache over "
                         f"{HOST_CACHE_ABOVE // 2**20} MiB)")
        est.host = host_memory(cfg, weights, host_pinned, on_host, flow=family.flow)
    est.swap_windows = work.swap_windows.per_stage() if work.swap_windows else {}
    est.model_kind = model_kind(comps)
    est.seconds = time.perf_counter() - t0
    return est


def at_largest(cfg: Config, notes: list[str] | None = None) -> Config:
    """``cfg`` at its largest image size (the most pixels): a run of several sizes trains each in turn, and the
    step at the largest is the peak that must fit; its time stands for every step's (an upper bound: one estimate,
    not one per size), said in ``notes``. One size: ``cfg`` itself."""
    largest = cfg.at_size(largest_size(cfg.resolution))
    if largest is not cfg and notes is not None:
        notes.append(f"image sizes {describe_sizes(cfg.resolution)}, one a step in turn: memory and time are the "
                     f"step at the largest, {largest.resolution} px (the peak that must fit; the other sizes' "
                     "steps need less memory and time)")
    return largest


def _encode_at_load_counted(parts: StepParts, place: Residency, cuda: bool):
    """:func:`encode_at_load` on the fake models, counted in the load stage: a GPU's device holds nothing but the
    text encoders the encoder brings and their activations (nothing with ``encode_on_cpu``: the cache too is in
    host memory then); a CPU's memory holds the text encoders and the VAE (the transformer is not read yet). The
    text encoders are not counted after: the trainer frees them."""
    steady = set(place.on_device)
    place.on_device = set() if cuda else {TEXT_ENCODER, "vae"}
    place.refresh()
    on_host = cuda and parts.cfg.encode_on_cpu  # encoder, activations and cache in host memory: not counted
    try:
        with place.counter.host() if on_host else contextlib.nullcontext():
            return encode_at_load(dataclasses.replace(parts, stage=place.counter.stage))
    finally:
        place.on_device = steady - {TEXT_ENCODER}
        place.refresh()


def _both_stages(*stage_fns):
    """One stage context that opens the same stage in each counter."""
    @contextlib.contextmanager
    def stage(name: str):
        with contextlib.ExitStack() as stack:
            for fn in stage_fns:
                stack.enter_context(fn(name))
            yield
    return stage


def _simulated(cfg: Config, notes: list[str]) -> tuple[int, int, int, Config]:
    """(K planned, K simulated, no-grad steps simulated, the configuration simulated)."""
    k_plan = cfg.window_bounds()[1]
    if cfg.truncation != "fixed":  # per_step's worst case: every step of the last k_max with gradient
        notes.append(f"{describe_k(cfg)}: planned at k_max={cfg.k_max}, the worst case")
    kept = min(cfg.window_keep, k_plan)
    # window_keep: the simulated window is up to two checkpointed steps, then up to two kept ones (three when all
    # are kept): the window's first step and a further one of each kind are measured, in memory (figures.figures)
    # and work (step_time._backward_work), and K beyond them is extrapolated per kind
    ckpt_sim = min(k_plan - kept, 2)
    keep_sim = min(kept, 2) if ckpt_sim else min(k_plan, 3)
    k_sim = ckpt_sim + keep_sim
    # the no-grad steps leave nothing behind: one shows their peak (also when K = T, to fill the table's row)
    n_nograd = 1 if (cfg.sample_steps > k_plan or k_plan > k_sim) else 0
    sim = dataclasses.replace(cfg, sample_steps=k_sim + n_nograd, truncation="fixed", k=k_sim, window_keep=keep_sim)
    if cfg.attention == "xformers":
        sim = dataclasses.replace(sim, attention="sdpa")
        notes.append("attention=xformers estimated as sdpa (both keep no n^2 attention matrix)")
    if cfg.deepspeed_zero:
        notes.append(f"deepspeed_zero={cfg.deepspeed_zero} not modelled: estimated as plain torch (an upper bound "
                     "when DeepSpeed offloads to the CPU)")
    if cfg.optimizer == "paged_adamw8bit":
        notes.append("paged_adamw8bit: its state is counted as resident (it pages to the CPU only under pressure)")
    return k_plan, k_sim, n_nograd, sim


def _meta_models(cfg: Config, sim: Config, target: str, dtype: torch.dtype, notes: list[str], *, autocast: bool):
    """The components and reward model on meta, with the trainer's memory features applied (``autocast``: the step
    runs under autocast)."""
    from lowmem_alignprop.models.family import family_for, model_defaults_note

    comps = meta_components(cfg, dtype)
    reward = meta_reward(cfg, dtype, notes)
    models_log = logging.getLogger("lowmem_alignprop.models.loading")
    level = models_log.level
    models_log.setLevel(logging.ERROR)  # its device warnings are about this CPU, not the target GPU
    try:
        apply_memory_features(comps, sim, torch.device(target), dtype, autocast=autocast)
    finally:
        models_log.setLevel(level)
    if target == "cuda" and comps.is_sdxl and comps.vae.dtype == torch.float32 and dtype == torch.float16 \
            and comps.vae.config.get("force_upcast", False):
        comps.vae.to(torch.bfloat16)  # what models.choose_vae_dtype picks on a bf16 GPU: same bytes as fp16
        notes.append("SDXL's VAE decodes in bf16, as on a GPU with bf16 (Ampere or newer); on older cards it "
                     "decodes in fp32: about twice the decode memory")
    if (unread := model_defaults_note(comps, cfg)):  # e.g. DDIM's eta on a flow model
        notes.append(unread)
    if target == "cpu" and (host := host_memory_note(cfg, "this plan")):  # e.g. offload_frozen on the CPU
        notes.append(host)
    off_size = family_for(comps).resolution_note(cfg)  # e.g. SDXL planned at 512 px
    if off_size:
        notes.append(off_size)
    untiled = untiled_note(cfg.tiled_decode, cfg.shapes, cfg.tile_size, vae_scale_factor(comps.vae),
                           cfg.tile_overlap)
    if untiled:
        notes.append(untiled)
    return comps, reward


def _autocast_for(cfg: Config, cuda: bool, dtype: torch.dtype, emulate: bool):
    """(the CUDA autocast emulation or None, the autocast context the step runs in)."""
    if cuda and cfg.mixed_precision != "no" and emulate:
        mode = CudaAutocast(dtype)
        return mode, mode.active
    return None, precision.cpu_autocast(cfg.mixed_precision) if not cuda else contextlib.nullcontext


def _name_a_user_reward_that_needs_data(spec: str, error: Exception) -> None:
    """A user reward that failed on fake tensors (it reads values: .item(), float(t), a branch on a value): one
    line naming it, instead of the fake-tensor traceback. Other errors are left as they are."""
    from lowmem_alignprop.rewards import user_term_in_traceback

    if (term := user_term_in_traceback(spec, error)) is not None:  # (a file reward too: it was imported as a module)
        raise UserError(f"plan cannot follow the reward {term!r} with fake tensors: it failed there with "
                        f"{type(error).__name__} ({first_line(error, 120)}), usually because it reads tensor "
                        "values (.item(), float(t), an if on a value), which a plan has no data for. Plan with "
                        "--reward brightness and add your reward model's own memory, or keep the reward to "
                        "tensor operations") from None


# ---------------------------------------------------------------------------------------------------
# the search for a change that fits (the changes: measure/fit_changes.py)
# ---------------------------------------------------------------------------------------------------
def _apply(cfg: Config, change: dict[str, Any]) -> Config:
    return cfg.with_changes(**change)


STALLED = 0.03  # a step of a feature that lowers the needed peak by less than this share is its last


@reuse_estimates()
def suggest(cfg: Config, *, target: str = "cuda", prompts: list[str] | None = None, max_estimates: int = 12,
            log: Callable[[str], None] | None = None, interruptible: bool = False) -> dict[str, Any]:
    """The cheapest change that makes ``cfg`` fit its budget: first each single change in order of speed cost,
    then the changes accumulated in that order (batch halved, block swap grown and resolution lowered repeatedly; a
    feature whose step lowered the peak by under :data:`STALLED` is not taken further). Every candidate is
    re-estimated. Returns {"found": change or None, "tried": [...]}; ``interruptible`` (the plan command): a Ctrl-C
    stops the search there (``interrupted``: the plan is printed with what was tried so far, which took minutes)."""
    from lowmem_alignprop.run.stop_request import CtrlC, HeldCtrlC

    tried: list[dict[str, Any]] = []
    if not interruptible:  # (--auto-fit's search before a run: the Ctrl-C stops the run)
        return _suggest(cfg, target, prompts, max_estimates, log, tried)
    try:
        with HeldCtrlC() as held:  # a Ctrl-C is taken between two estimates, never inside one
            return _suggest(cfg, target, prompts, max_estimates, log, tried, between=held.check)
    except CtrlC:
        return {"found": None, "tried": tried, "interrupted": True}


def _suggest(cfg: Config, target: str, prompts: list[str] | None, max_estimates: int,
             log: Callable[[str], None] | None, tried: list[dict[str, Any]],
             between: Callable[[], None] = lambda: None) -> dict[str, Any]:
    seen: dict[tuple, bool] = {}  # the first accumulated change is often a single one already estimated
    needed: dict[tuple, int] = {}  # each estimated change's peak_needed

    def check(label: str, change: dict[str, Any]) -> bool:
        key = tuple(sorted(change.items()))
        if key in seen:
            return seen[key]
        new = _apply(cfg, change)
        between()  # (a held Ctrl-C stops the search here)
        est = estimate(new, target=target, prompts=prompts)
        fits = bool(est.fits(cfg.budget_gb))
        tried.append({"change": label, "set": change, "peak_allocated": est.peak_allocated,
                      "peak_needed": est.peak_needed, "peak_stage": est.peak_stage, "fits": fits})
        if log:
            log(f"  tried {set_flags(change)}: {est.peak_needed / GIB:.2f} GiB -> {'fits' if fits else 'no'}")
        seen[key], needed[key] = fits, est.peak_needed
        return fits

    singles = candidate_changes(cfg, target)
    for label, change in singles:
        if len(tried) >= max_estimates:
            return {"found": None, "tried": tried, "gave_up": True}
        if check(label, change):
            return {"found": tried[-1], "tried": tried}
    # nothing alone suffices: accumulate, shrinking batch and resolution as far as they go
    total: dict[str, Any] = {}
    steps: list[tuple[str, dict[str, Any]]] = []
    current = cfg

    def label_of(changes: dict[str, Any]) -> str:  # only the steps still in effect (a later one may replace one)
        return " + ".join(lab for lab, c in steps if all(changes.get(k) == v for k, v in c.items()))

    stalled: set[str] = set()  # features whose last step saved next to nothing (block swap of a UNet's last blocks)
    while len(tried) < max_estimates:
        options = [o for o in candidate_changes(current, target, start=cfg) if next(iter(o[1])) not in stalled]
        if not options:
            break
        label, change = options[0]
        before = needed.get(tuple(sorted(total.items())))
        total.update(change)
        steps.append((label, change))
        current = _apply(cfg, total)
        if check(label_of(total), dict(total)):
            return {"found": _pruned(tried[-1], steps, check, label_of, max_estimates, tried), "tried": tried}
        if before is not None and needed[tuple(sorted(total.items()))] > (1 - STALLED) * before:
            stalled.add(next(iter(change)))
    return {"found": None, "tried": tried, "gave_up": len(tried) >= max_estimates}


def _pruned(found: dict[str, Any], steps, check, label_of, max_estimates: int, tried: list) -> dict[str, Any]:
    """Drop the accumulated changes the fit does not need (e.g. sliced decode once the batch is 1), earliest first,
    with up to 4 estimates beyond the search's: the suggestion is then no more than what is needed."""
    total = dict(found["set"])
    for _, change in steps[:-1]:
        if len(tried) >= max_estimates + 4:
            break
        if not all(total.get(k) == v for k, v in change.items()):
            continue  # replaced by a later step
        without = {k: v for k, v in total.items() if k not in change}
        if check(label_of(without), without):
            total, found = without, tried[-1]
    return found


@reuse_estimates()
def next_feature(cfg: Config, *, target: str = "cuda", max_estimates: int = 6,
                 stage: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """For ``--auto-fit`` after an out-of-memory error (see :mod:`lowmem_alignprop.run.faults`): the cheapest change
    in speed that lowers the estimated peak by at least 3% (``stage``: the peak of the stage that ran out, which a
    change of another stage's memory would not help), or None. Resolution changes (they change the task), base_quant
    (it needs the model loaded again) and the optimizer (its state would start again) are never offered here. Costs
    up to ``max_estimates`` + 1 estimates."""
    def peak(est: Estimate) -> int:
        return est.stages[stage]["allocated"] if stage in est.stages else est.peak_needed

    base = peak(estimate(cfg, target=target))
    live = [c for c in candidate_changes(cfg, target)
            if not {"resolution", "base_quant", "optimizer"} & set(c[1])]  # the task, a reload, a new state: not mid-run
    for label, change in live[:max_estimates]:
        if peak(estimate(_apply(cfg, change), target=target)) < 0.97 * base:
            return label, change
    return None


# ---------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------
def default_target(profile_name: str, card: str = "") -> str:
    """cpu for the cpu profile and a profile whose card is the CPU (a copy of it); cuda for the GPU profiles and a
    user's own YAML. The cpu profile with a GPU's ``card`` (--set card=rtx4090) is refused: it was timed on the CPU,
    the card dropped in silence."""
    if profile_name == "cpu" and card not in ("", "cpu"):
        raise UserError(f"card={card} times the step on that card, and profile cpu plans for this machine's CPU "
                        f"(fp32, its RAM as the budget): for the card pass its profile ({profile_of_card(card)}; "
                        "`lowmem-alignprop profiles` lists them), or --device cuda for the cpu profile's settings "
                        "on it")
    return "cpu" if "cpu" in (profile_name, card) else "cuda"


@reuse_estimates()
def disk_needed(cfg: Config, est: Estimate) -> dict[str, int]:
    """What the run writes to --output-dir (bytes): one checkpoint, how many it holds at once, all of it; sized by the
    run's own rule (run/disk_space.run_bytes) from the estimate's trained weights (meta tensors of their sizes)."""
    params = []
    for key, count in est.trained.items():
        numel, dtype = key.split(":")
        params += [torch.empty(int(numel), dtype=getattr(torch, dtype), device="meta")] * count
    need = run_bytes(cfg, params)
    return {"checkpoint": need.checkpoint, "at_once": need.at_once, "peak": need.peak}


def check_budget(cfg: Config, target: str) -> None:
    """A CUDA budget that no tensor could fit in (CUDA's workspaces alone take more): one line at once, not "does not
    fit" after minutes of estimates."""
    if target == "cuda" and cfg.budget_gb and cfg.budget_gb * GIB <= WORKSPACE_BYTES:
        raise UserError(f"budget_gb={cfg.budget_gb:g} is below the {WORKSPACE_BYTES / GIB:.2f} GiB CUDA's workspaces "
                        "take before any tensor, so nothing can fit: give the card's memory less what else uses it "
                        "(e.g. --set budget_gb=7.5 for an 8 GB card)")


def plan(cfg: Config, *, profile: str = "custom", target: str | None = None, suggest_changes: bool = True,
         log: Callable[[str], None] | None = None, started: float | None = None,
         command: str | None = None, interruptible: bool = False) -> dict[str, Any]:
    """Estimate ``cfg`` and, when it does not fit its budget, find the cheapest change. JSON-ready dict.
    ``interruptible``: a Ctrl-C during that search returns what it tried so far (:func:`suggest`).
    ``started``: the ``time.perf_counter()`` the command started at (its "seconds" count from there). ``command``:
    the command line that asked (default: this Python program's), in the result's provenance (``command``, ``date``,
    ``device``: the machine that planned, ``versions``)."""
    from lowmem_alignprop.step.prompts import configured_prompts

    started = time.perf_counter() if started is None else started

    target = target or default_target(profile, cfg.card)
    check_budget(cfg, target)
    sampler = check_before_load(cfg)  # a sampler training would refuse (the model's own zero-SNR schedule at eta 1...)
    if target == "cpu" and cfg.base_quant in BNB_MODES:  # what train would refuse on this target
        raise UserError(f"base_quant={cfg.base_quant} needs a CUDA GPU (bitsandbytes' quantized kernels), so a CPU "
                        f"run cannot use it: plan it for a card (--device cuda or a GPU profile), or drop "
                        "--set base_quant")
    prompts = configured_prompts(cfg)
    try:
        est = estimate(cfg, target=target, prompts=prompts)
    except UserError as e:  # a setting of a profile made for other models: that first (FLUX.1's block swap on toy)
        raise under_profile(profile, cfg.model, cfg.model_components, e, cfg.revision) from None
    if target == "cuda" and cfg.expandable_segments and sys.platform == "win32":
        est.notes.append("planned with expandable allocator segments, which PyTorch has on Linux only: to train on "
                         "this Windows machine, plan with --set expandable_segments=false")
    fits = est.fits(cfg.budget_gb)
    mismatch = profile_note(profile, est.model_kind)  # e.g. the SD1.5 profile rtx3060 asked about FLUX.1
    if mismatch and log and fits is False and suggest_changes:
        log(mismatch)  # now, not after the search for a change (minutes for a 12B model)
    result: dict[str, Any] = {
        "kind": "plan", "profile": profile, "model": cfg.model, "reward": cfg.reward, "target": target,
        "method": "fake tensors (FakeTensorMode on CPU) + live-storage counting; no GPU, no weights",
        "autocast": (f"torch.autocast('cuda', {cfg.mixed_precision}) emulated" if target == "cuda" and
                     cfg.mixed_precision != "no" else "none" if cfg.mixed_precision == "no" or target == "cuda"
                     else "torch.autocast('cpu', bf16)" if cfg.mixed_precision == "bf16"
                     else "none: fp16 runs in fp32 on a CPU, as the trainer does"),
        "config": cfg.to_dict(), "estimate": est.to_dict(),
        # how it samples, resolved from the model's files (a single file's v_pred key...): None for a hub id, SD3/FLUX
        "sampler": None if sampler is None else {"scheduler": "DDIM", **ddim_settings(cfg, sampler)},
        "stages": est.stages, "peak_allocated": est.peak_allocated, "peak_stage": est.peak_stage,
        "host_pinned": est.host_pinned,  # block swap's frozen blocks in pinned host memory (bytes, as stored)
        "host_memory": est.host,  # a GPU target's host memory held by the models and tensors: load, steps (bytes)
        "disk": disk_needed(cfg, est),  # what the run writes to --output-dir: a checkpoint, how many at once, all
        "reserved_factor": RESERVED_FACTOR if target == "cuda" else 1.0,
        "fragmentation_allowance": fragmentation_allowance(cfg) if target == "cuda" else 0,
        "peak_needed": est.peak_needed,  # reserved + workspaces: what must fit the budget (a stage's
        # "reserved" has no workspaces)
        "budget_gb": cfg.budget_gb or None,
        "budget_bytes": int(cfg.budget_gb * GIB) if cfg.budget_gb else None, "fits": fits,
        "allowances": ALLOWANCES if target == "cuda" else {"none": "CPU target: exact bytes, nothing added"},
        "notes": est.notes, "profile_note": mismatch, "suggestion": None, "tried": [],
        "time": (t := step_time(cfg, est, device_for(cfg.card, profile, target))),
        "renders": render_time(cfg, t, prompts),  # the images rendered without gradient beside the steps
        **provenance(command or " ".join(["python", *sys.argv]), PLAN_LIBRARIES),
    }
    if fits is False and suggest_changes:
        found = suggest(cfg, target=target, prompts=prompts, log=log, interruptible=interruptible)
        result["suggestion"] = found["found"]
        result["tried"] = found["tried"]
        result["suggestion_gave_up"] = found.get("gave_up", False)
        if found.get("interrupted"):
            result["suggestion_interrupted"] = True
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result

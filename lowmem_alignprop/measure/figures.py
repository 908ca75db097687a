"""The estimate's figures (:class:`Estimate`): per-stage peaks from the counter with K beyond the simulated window
added, the load stage, what the CUDA caching allocator reserves, and a GPU target's host memory."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from lowmem_alignprop.memory import stages
from lowmem_alignprop.memory.allowances import FIXED_SEGMENTS_BYTES_PER_512PX, GIB, RESERVED_FACTOR, WORKSPACE_BYTES
from lowmem_alignprop.measure.counters import TEXT_ENCODER, LiveBytes
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.image_size import largest_size


@dataclass
class Estimate:
    target: str  # "cuda" or "cpu"
    stages: dict[str, dict]  # stage -> {"allocated", "weights", "reserved" (bytes), "on_device" (module names)}
    peak_allocated: int
    peak_stage: str
    peak_needed: int  # what must fit the budget: reserved estimate + workspaces on CUDA
    weights: dict[str, int]  # module -> bytes
    k_planned: int
    k_simulated: int
    per_k_bytes: int  # what each checkpointed grad step beyond the simulated ones keeps
    step_start: int  # bytes on the device when the step begins (weights there, optimizer state, kept gradients)
    seconds: float
    notes: list[str] = field(default_factory=list)
    # stage -> the work of one optimizer step's share of it (StageWork's keys; micro-step stages per micro-step),
    # scaled from the simulated step to all T steps and the mean K (step_work)
    work: dict[str, dict[str, float]] = field(default_factory=dict)
    host_pinned: int = 0  # block swap: the swapped blocks' frozen weights in pinned host memory, as stored
    host: dict[str, int] = field(default_factory=dict)  # a GPU target's host memory: {"load", "steps"} (host_memory)
    per_kept_bytes: int = 0  # what each kept grad step (window_keep) beyond the simulated ones keeps
    # block swap on a GPU: stage -> [[copy bytes, the work it overlaps] per group] of the simulated step (SwapWindows)
    swap_windows: dict[str, list] = field(default_factory=dict)
    model_kind: str = ""  # what the profiles are made for (models/family.model_kind): sd, sdxl, sd35m, sd35l, flux
    cached: str = ""  # read from the estimate cache (measure/estimate_cache.py): when it was made; "" = just made
    # the trained weights, "numel:dtype" -> how many tensors: what plan sizes the run's checkpoints from (the number
    # and frequency of checkpoints are not estimated: plan applies them, planner.disk_needed)
    trained: dict[str, int] = field(default_factory=dict)

    def fits(self, budget_gb: float) -> bool | None:
        return None if not budget_gb else self.peak_needed <= budget_gb * GIB

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def host_memory(cfg: Config, weights: dict[str, int], host_pinned: int, cache: int, *, flow: bool) -> dict[str, int]:
    """A GPU target's host memory held by the run's modules and tensors, as stored (bytes): ``load``, the most while
    loading; ``steps``, during the steps. Not in it: the process itself (Python, torch, the CUDA libraries), a
    checkpoint file's page cache (reclaimable), activation_offload's saved tensors. ``cache``: the bytes of the
    prompt cache held in host memory (with ``encode_on_cpu``, or a large prompt set's: sampling.crowds_device)."""
    def w(*names):
        return sum(weights.get(n, 0) for n in names)

    parked = w("vae", "reward") if cfg.offload_frozen else 0  # offload_frozen: they wait on the CPU between uses
    if flow:
        # the text side first: the encoders and the VAE while the prompts encode, the transformer not read yet (it is
        # read to the card block by block); then block swap's blocks, the VAE and the reward model before placement
        load = max(w(TEXT_ENCODER, "vae") + cache, host_pinned + w("vae", "reward") + cache)
        return {"load": load, "steps": host_pinned + parked + cache}
    # a UNet pipeline is loaded whole on the CPU before it is placed; its text encoder waits there once the prompts
    # are cached (or with offload_frozen)
    text = w(TEXT_ENCODER) if cfg.cache_prompt_embeddings or cfg.offload_frozen else 0
    return {"load": w("unet", TEXT_ENCODER, "vae", "reward") + host_pinned,
            "steps": host_pinned + parked + text + cache}  # (the prompts are encoded at the first step)


def figures(cfg: Config, target: str, counter: LiveBytes, weights: dict[str, int], largest: int,
             grad_calls: list[int], window: tuple[int, int, int], step_start: int, t0: float,
             notes: list[str], load_extra: int = 0) -> Estimate:
    """The per-stage figures: the counter's peaks, K beyond the simulated window, load (``load_extra``: what only
    loading holds, :func:`fp8_load_bytes`), the reserved estimate."""
    cuda = target == "cuda"
    # K beyond the simulated window: each further grad step keeps what the second one kept (with kl_coeff each
    # window step makes two UNet calls, the LoRA model's and the base model's: the step is every second call)
    k_plan, k_sim, keep_sim = window  # K planned, simulated, and the simulated steps kept without checkpoint
    calls = 2 if cfg.kl_coeff > 0 else 1

    def kept_by_step(i: int) -> int:  # what simulated window step i keeps until step i + 1 begins
        return max(0, grad_calls[calls * (i + 1)] - grad_calls[calls * i]) if len(grad_calls) > calls * (i + 1) else 0
    ckpt_sim, kept_plan = k_sim - keep_sim, min(cfg.window_keep, k_plan)
    per_k = kept_by_step(0) if ckpt_sim else 0
    per_kept = kept_by_step(max(ckpt_sim, 1)) if keep_sim else 0  # a kept step after the window's first
    more, more_kept = k_plan - kept_plan - ckpt_sim, kept_plan - keep_sim
    extra = per_k * more + per_kept * more_kept
    if extra:
        for name in (stages.SAMPLE_GRAD, stages.DECODE, stages.REWARD, stages.BACKWARD):
            if name in counter.peaks:
                counter.peaks[name] += extra
        if more:
            notes.append(f"K={k_plan}: {k_sim} grad steps simulated, {more} more at {per_k / 1024:.0f} KiB each "
                         "(their checkpoint inputs and scheduler graph)")
        if more_kept:
            notes.append(f"window_keep={cfg.window_keep}: {keep_sim} kept steps simulated, {more_kept} more at "
                         f"{per_kept / 2**20:.1f} MiB each (a call's activations kept for backward)")
    # load: what sits on the device once loading is done (the optimizer state comes with the first step)
    encoded = counter.peaks.get(stages.LOAD)  # SD3/FLUX: the prompt set encoded at load, its encoders freed after
    at_load = [n for n in ("unet", "lora", TEXT_ENCODER, "vae", "reward")
               if weights.get(n) and not (cuda and cfg.offload_frozen and n in (TEXT_ENCODER, "vae", "reward"))
               and not ((encoded is not None or (cuda and cfg.encode_on_cpu)) and n == TEXT_ENCODER)]
    load = sum(weights[n] for n in at_load) + largest + load_extra
    if load_extra:
        notes.append(f"base_quant=fp8: +{load_extra / GIB:.2f} GiB at load: the LoRA targets and embedders wait in the "
                     "compute dtype until LoRA is added (the rest is stored in fp8 block by block as it is read)")
    out: dict[str, dict] = {stages.LOAD: {"allocated": load, "weights": load, "on_device": at_load}}
    if encoded is not None and encoded > load:  # encoding was load's peak (e.g. T5 on the device, not yet freed)
        out[stages.LOAD] = {"allocated": encoded, "weights": counter.weights_at_peak[stages.LOAD],
                            "on_device": list(counter.where_at_peak[stages.LOAD])}
    for name in stages.STEP_STAGES:
        if name in counter.peaks:
            out[name] = {"allocated": counter.peaks[name], "weights": counter.weights_at_peak[name],
                         "on_device": list(counter.where_at_peak[name])}
    for fig in out.values():
        fig["reserved"] = reserved(cfg, fig["allocated"], cuda)
    peak_stage = max(out, key=lambda n: out[n]["allocated"])
    peak = out[peak_stage]["allocated"]
    return Estimate(target=target, stages=out, peak_allocated=peak, peak_stage=peak_stage,
                    peak_needed=reserved(cfg, peak, cuda) + (WORKSPACE_BYTES if cuda else 0), weights=weights,
                    k_planned=k_plan, k_simulated=k_sim, per_k_bytes=per_k, per_kept_bytes=per_kept,
                    step_start=step_start,
                    seconds=time.perf_counter() - t0, notes=notes)


def fragmentation_allowance(cfg: Config) -> int:
    """What fixed allocator segments reserve beyond ``RESERVED_FACTOR``: grows with the image area, width x height
    over 512 x 512's (several sizes: the largest's; 0 with expandable segments, the default)."""
    width, height = largest_size(cfg.resolution)
    return 0 if cfg.expandable_segments else int(FIXED_SEGMENTS_BYTES_PER_512PX * width * height / 512 ** 2)


def reserved(cfg: Config, allocated: int, cuda: bool) -> int:
    """What the CUDA caching allocator holds for ``allocated`` bytes in use; a CPU target: exact bytes."""
    return int(allocated * RESERVED_FACTOR) + fragmentation_allowance(cfg) if cuda else allocated

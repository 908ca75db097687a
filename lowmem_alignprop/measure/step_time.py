"""Seconds per step: the work counted in the simulated step scaled to the configuration's (:func:`step_work`), and
turned into seconds per stage for a device (:func:`step_time`; measure/devices.py has the device figures)."""

from __future__ import annotations

import math
from typing import Any

from lowmem_alignprop.memory import stages
from lowmem_alignprop.memory.precision import running_precision
from lowmem_alignprop.measure.counters import AFTER, WORK_KEYS, StageWork
from lowmem_alignprop.measure.figures import Estimate
from lowmem_alignprop.settings.config import Config


def _per_step_grad(cfg: Config) -> tuple[list[float], float]:
    """truncation=per_step: for d = 1..k_max, the chance that the step d from the end predicts with gradient (its own
    K ~ U{k_min..k_max} is at least d); and the chance that some step does (a draw with none is drawn again:
    sampling.draw_window), by which every expectation over the kept draws is divided."""
    lo, hi = cfg.window_bounds()
    p = [(hi - max(lo, d) + 1) / (hi - lo + 1) for d in range(1, hi + 1)]
    return p, 1 - math.prod(1 - q for q in p)


def mean_k(cfg: Config) -> float:
    """The denoiser calls with gradient a rollout makes on average: fixed K, the middle of [k_min, k_max], or
    (per_step) the sum of each step's chance, over the draws kept."""
    if cfg.truncation == "per_step":
        p, some = _per_step_grad(cfg)
        return sum(p) / some
    lo, hi = cfg.window_bounds()
    return (lo + hi) / 2


def _window_counts(cfg: Config) -> tuple[float, float, float, float]:
    """Over K's range (uniform, per_step), the mean number of: the window's first step checkpointed, the first step
    kept, further checkpointed steps, further kept steps (window_keep keeps the steps at most window_keep from the
    end)."""
    if cfg.truncation == "per_step":  # the window's first step: the farthest from the end with gradient
        p, some = _per_step_grad(cfg)
        first = [p[i] * math.prod(1 - q for q in p[i + 1:]) for i in range(len(p))]  # p[i]: the step i + 1 from the end
        wk = cfg.window_keep
        first_ckpt, first_kept = sum(first[wk:]), sum(first[:wk])
        return tuple(n / some for n in (first_ckpt, first_kept, sum(p[wk:]) - first_ckpt, sum(p[:wk]) - first_kept))
    lo, hi = cfg.window_bounds()
    totals = [0.0] * 4
    for k in range(lo, hi + 1):
        kept = min(k, cfg.window_keep)
        first_ckpt = 1 if k > kept else 0
        for i, n in enumerate((first_ckpt, 1 - first_ckpt if k else 0, k - kept - first_ckpt,
                               kept - (1 - first_ckpt if k else 0))):
            totals[i] += n
    return tuple(t / (hi - lo + 1) for t in totals)


def _backward_work(cfg: Config, work: StageWork, d: dict, k_sim: int, keep_sim: int) -> dict[str, float]:
    """Backward's work scaled to the configuration's K: what runs before backward reaches the window (reward,
    decode) and DRaFT-LV's call once; each simulated window step's backward (from where backward first reaches its
    outputs to the next step's: a checkpointed step's recompute and backward, a kept step's backward alone)
    counted per kind. The window's first step is its own kind (its input needs no gradient: less backward, and with
    KL no backward through the base model's call), the others are averaged per kind. The call backward reaches first
    (the window's last) sums no gradient into another's (``work.accumulation``): its segment is counted as the others
    are, and that work taken off once (else a window of checkpointed steps, measured from its last, lacked it K - 1
    times)."""
    marks = work.window_marks
    if not marks:  # backward never reached a window output (K = 0)
        return {key: float(d[key]) for key in WORK_KEYS}
    zero = dict.fromkeys(WORK_KEYS, 0)
    ends = [snap for _, snap in marks[1:]] + [d]
    seg = {label: {key: end[key] - snap[key] for key in WORK_KEYS} for (label, snap), end in zip(marks, ends)}
    acc = work.accumulation
    seg[marks[0][0]] = {key: seg[marks[0][0]][key] + acc[key] for key in WORK_KEYS}
    ckpt_sim = k_sim - keep_sim
    first = seg.get(0, zero)
    ckpt = [seg.get(s, zero) for s in range(1, ckpt_sim)]
    kept = [seg.get(s, zero) for s in range(max(ckpt_sim, 1), k_sim)]
    n_first_ckpt, n_first_kept, n_ckpt, n_kept = _window_counts(cfg)

    def mean(parts: list, key: str) -> float:
        return sum(p[key] for p in parts) / len(parts) if parts else 0.0
    out = {}
    for key in WORK_KEYS:
        c, k = mean(ckpt, key), mean(kept, key)
        # a first step of the kind the simulation did not begin with (uniform K, some K <= window_keep): the
        # simulated first step with a kept step's backward in place of a checkpointed one's
        first_ckpt = first[key]
        first_kept = first[key] + (k - c) if ckpt_sim and ckpt else (k if ckpt_sim else first[key])
        out[key] = (marks[0][1][key] + seg.get("lv", zero)[key] + n_first_ckpt * first_ckpt
                    + n_first_kept * first_kept + n_ckpt * c + n_kept * k - acc[key])
    return out


def _input_gradient_calls(cfg: Config) -> float:
    """The window's calls whose backward goes through the frozen layers' input gradients (one more dequantization
    each with an int8/nf4 base; the recomputes' are counted where they run), on average over K's range: the LoRA
    model's K calls; with KL the base model's calls but the window's first (its input needs no gradient);
    DRaFT-LV's one call."""
    base = mean_k(cfg) - sum(_window_counts(cfg)[:2]) if cfg.kl_coeff > 0 else 0.0  # every call but the first
    return mean_k(cfg) + base + (1 if cfg.lv_draws > 1 else 0)


def step_work(cfg: Config, work: StageWork, k_sim: int, n_nograd: int,
              keep_sim: int = 0) -> dict[str, dict[str, float]]:
    """The simulated step's counts scaled to the configuration's: the no-grad steps to ``sample_steps - K``, the grad
    window to the mean K and its backward by :func:`_backward_work` (``keep_sim``: the simulated window's kept
    steps); with cached prompt embeddings a step encodes nothing (the first step's encoding of every prompt is left
    out: it happens once); the backward's
    dequantization adds one more pass per grad-window call (the input gradient of each quantized layer)."""
    k = mean_k(cfg)
    zero = dict.fromkeys(WORK_KEYS, 0)

    def scaled(d: dict, f: float) -> dict:
        return {key: d.get(key, 0) * f for key in WORK_KEYS}

    out: dict[str, dict[str, float]] = {}
    for name in stages.STEP_STAGES:
        d = work.work.get(name)
        if d is None:
            continue
        if name == stages.ENCODE_PROMPTS and cfg.cache_prompt_embeddings:
            d = zero
        elif name == stages.SAMPLE_NOGRAD:  # the calls to sample_steps - K; what came before the first call once
            once = work.marks.get("nograd_call", zero) if n_nograd else zero
            calls = scaled({key: d[key] - once[key] for key in WORK_KEYS}, (cfg.sample_steps - k) / n_nograd
                           if n_nograd else 0)
            d = {key: once[key] + calls[key] for key in WORK_KEYS}
        elif name == stages.SAMPLE_GRAD:  # the window's calls to the mean K; DRaFT-LV's call (last step only) once
            lv = work.marks.get("lv")
            window = {key: lv[key] for key in WORK_KEYS} if lv else d
            d = {key: window[key] * k / k_sim + (d[key] - window[key]) for key in WORK_KEYS}
        elif name == stages.BACKWARD:
            d = _backward_work(cfg, work, d, k_sim, keep_sim)
            if cfg.base_quant != "none":
                grad_calls = work.unet_calls.get(stages.SAMPLE_GRAD, 0)
                per_call = work.work.get(stages.SAMPLE_GRAD, zero)["dequant_bytes"] / max(grad_calls, 1)
                d["dequant_bytes"] += per_call * _input_gradient_calls(cfg)
        between = work.work.get(name + AFTER, zero)
        out[name] = {key: float(v + between[key]) for key, v in d.items()}
    return out


def matmul_dtype(cfg: Config, target: str) -> str:
    """The dtype the step's matmuls run in: the mixed precision on a GPU (autocast), fp32 without it; on a CPU
    fp16 runs in fp32 as the trainer does."""
    running = running_precision(cfg.mixed_precision, target)
    return "fp32" if running == "no" else running


def step_time(cfg: Config, est: Estimate, device) -> dict[str, Any]:
    """Seconds per stage (micro-step stages per micro-step; the optimizer once), per micro-step and per optimizer
    step (grad_accum micro-steps + the optimizer), for ``device`` (a :class:`devices.Device`; None: no card named)."""
    from lowmem_alignprop.measure import devices

    totals = {key: sum(w[key] for w in est.work.values()) for key in WORK_KEYS}
    out: dict[str, Any] = {"k_mean": mean_k(cfg), "work_per_micro_step": totals}
    if device is None:
        out["device"] = None
        out["note"] = "no card named: --set card=rtx3060|rtx4090|a100-40gb|a100-80gb|h100|h200|laptop for seconds"
        return out
    dtype = matmul_dtype(cfg, est.target)
    tf32 = cfg.tf32 and est.target == "cuda"
    per_stage = {name: devices.seconds(w, device, dtype, tf32, est.swap_windows.get(name))
                 for name, w in est.work.items()}
    micro = sum(t for name, t in per_stage.items() if name != stages.OPTIMIZER)
    out.update(device=device.name, device_figures=device.to_dict(), matmul_dtype=dtype + (" (tf32)" if tf32 and
                                                                                          dtype == "fp32" else ""),
               stages=per_stage, micro_step=micro,
               optimizer_step=cfg.grad_accum * micro + per_stage.get(stages.OPTIMIZER, 0.0))
    if totals["swap_bytes"] and device.pcie_gbs:  # block swap: its copies' time, and what compute does not hide
        out["block_swap_copies"] = {
            "seconds": totals["swap_bytes"] / (device.pcie_gbs * 1e9),
            "beyond_compute": sum(devices.swap_seconds(w, device, dtype, tf32, est.swap_windows.get(name))
                                  for name, w in est.work.items() if name != stages.OPTIMIZER)}
    return out


def nograd_images(cfg: Config, prompts: list[str]) -> dict[str, int]:
    """The images a run renders without gradient beside its steps (``prompts``: its training prompts), by what they
    are for: the sample grid (before, at --sample-every's steps, after; a resume reads the before ones back), the
    held-out evaluation (eval_every's steps and the last, eval_on_start) and the toy world's judged images (before,
    at fidelity_every's steps, after)."""
    from lowmem_alignprop.run.schedule import due_after
    from lowmem_alignprop.step.prompts import configured_prompts
    from lowmem_alignprop.toy.fidelity import judged_prompts

    grids = 1 + (due_after(cfg.sample_every, cfg.steps, 0) if cfg.sample_every else 1)  # (the last step's: after)
    evaluations = due_after(cfg.eval_every, cfg.steps, 0) + bool(cfg.eval_on_start) if cfg.eval_every else 0
    held_out = (len(configured_prompts(cfg, "eval_prompts")) if cfg.eval_prompts else cfg.eval_holdout) \
        if evaluations else 0
    judged = len(judged_prompts(cfg.model, prompts, cfg.fidelity_images))
    return {"sample_grid": cfg.sample_prompts * grids, "evaluation": held_out * evaluations,
            "judged": judged * (2 + (cfg.steps // cfg.fidelity_every if cfg.fidelity_every else 0))}


def render_time(cfg: Config, t: dict[str, Any], prompts: list[str]) -> dict[str, Any] | None:
    """:func:`nograd_images` and their seconds on the card of ``t`` (:func:`step_time`'s; None without one): each
    image as a micro-step's forward stages (every sampler step, the decode, the reward) cost one of its batch_size
    images. An upper estimate: without gradient nothing is stored for a backward, and small images render in larger
    batches."""
    if t.get("stages") is None:
        return None
    per_image = sum(t["stages"].get(s, 0.0) for s in (stages.SAMPLE_NOGRAD, stages.SAMPLE_GRAD, stages.DECODE,
                                                      stages.REWARD)) / cfg.batch_size
    images = nograd_images(cfg, prompts)
    return {"images": images, "seconds_per_image": per_image, "seconds": per_image * sum(images.values())}

"""The AlignProp training loop: one readable function, stage by stage.

    for each optimizer step:
        encode_prompts -> sample_nograd (T-K DDIM steps) -> sample_grad (last K, checkpointed)
        -> decode (VAE, with grad) -> reward -> backward (into LoRA only) -> optimizer
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from . import checkpoint as ckpt
from . import faults, planner, precision, stages
from .config import Config
from .errors import UserError, first_line, same_on_every_rank
from .inputs import prepare_inputs
from .models import load_components, lora_metadata, lora_state_dict, set_attention
from .optim import build_optimizer
from .placement import Placement, configure_cuda_allocator
from .prompts import cut_prompts_note
from .runfolder import ResumePoint, RunFolder
from .runlock import RunLock, global_rank, world_size
from .sampling import (PromptEncoder, decode, draw_k, enable_vae_checkpointing, initial_latents,
                       make_pipeline, resolution_note, rollout)
from .step import apply_memory_features, rollout_loss

log = logging.getLogger("lowmem_alignprop")

def make_accelerator(cfg: Config, output_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    kwargs = {}
    mp = cfg.mixed_precision
    if not torch.cuda.is_available() and mp == "fp16":
        log.warning("mixed_precision=fp16 needs a CUDA device: using fp32 on this CPU")
        mp = "no"
    if cfg.deepspeed_zero:
        from .distributed import deepspeed_plugin
        kwargs["deepspeed_plugin"] = deepspeed_plugin(cfg, mp)  # Accelerator(cpu=True) would drop DeepSpeed
    elif not torch.cuda.is_available():
        kwargs["cpu"] = True  # several CPU processes then talk over gloo (DESIGN.md section 7)
    accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.grad_accum,
                              log_with=None if cfg.report_to == "none" else cfg.report_to,
                              project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                                  logging_dir=str(output_dir / "logs")),
                              **kwargs)
    if cfg.deepspeed_zero and not torch.cuda.is_available():
        from .distributed import repair_cpu_deepspeed_ranks
        repair_cpu_deepspeed_ranks(accelerator)
    return accelerator


def train(cfg: Config, *, profile_name: str = "custom", memory_snapshot: tuple[int, int] | None = None,
          folder: RunFolder | None = None) -> dict:
    """Train LoRA adapters with AlignProp. Returns the final summary (also written to the output dir).
    ``folder``: the run folder (the command line's choice, with its --resume); default: ``cfg.output_dir`` as named,
    a new run."""
    folder = folder or RunFolder(cfg.output_dir)
    with same_on_every_rank():
        prompts = prepare_inputs(cfg)
        cfg = dataclasses.replace(cfg)  # --auto-fit changes fields of this run's copy, never the caller's
        if cfg.deepspeed_zero == 0 and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            from .distributed import adopt_launcher_deepspeed
            adopt_launcher_deepspeed(cfg)  # accelerate launch --use_deepspeed --zero_stage N
        point = folder.check()
    lock = folder.hold()
    cfg = folder.with_output_dir(cfg)  # the numbered default folder taken a moment ago: the next one
    with lock:
        return _train(cfg, prompts, folder, profile_name=profile_name, memory_snapshot=memory_snapshot,
                      point=point, lock=lock)


def _train(cfg: Config, prompts: list[str], folder: RunFolder, *, profile_name: str,
           memory_snapshot: tuple[int, int] | None, point: ResumePoint | None, lock: RunLock) -> dict:
    from tqdm.auto import tqdm

    from .distributed import any_rank, deepspeed_engine, gatherer, is_zero3, whole_models
    from .export import save_sample_grid, write_metrics_line
    from .profiler import StageProfiler
    from .rewards import build_reward

    out = folder.path
    resume_path = point.path if point is not None else None
    if point is not None:  # an incompatible checkpoint fails here, before any model loads
        with same_on_every_rank():
            ckpt.check_config(point.state, cfg, point.path)
    allocator = configure_cuda_allocator(cfg.expandable_segments)  # less memory reserved but unused
    accelerator = make_accelerator(cfg, out)
    device = accelerator.device
    is_main = accelerator.is_main_process
    weight_dtype = precision.frozen_weight_dtype(accelerator.mixed_precision, device.type)
    prof = StageProfiler(device=device, budget_gb=cfg.budget_gb, detail_steps={min(2, cfg.steps)},
                         snapshot_steps=memory_snapshot)
    place = Placement(device, offload=cfg.offload_frozen)
    guard = faults.StageGuard(prof.stage)  # names the stage an out-of-memory error happens in

    # ================================ load ================================
    try:
        with guard.stage(stages.LOAD), whole_models(accelerator):
            comps = load_components(cfg, weight_dtype)
            unet, vae, text_encoder = comps.unet, comps.vae, comps.text_encoder
            fingerprint = ckpt.fingerprint(cfg, unet)  # before DeepSpeed partitions the weights
            if resume_path is not None:
                ckpt.check_fingerprint(point.state["fingerprint"], fingerprint, resume_path)
            params, attention = apply_memory_features(comps, cfg, device, weight_dtype)
            unet.to(device).train()
            place.park("text_encoder", text_encoder, comps.text_encoder_2)  # to the device only to encode
            place.park("vae", vae)  # on the GPU only from decode to backward when offload_frozen is on
            reward = build_reward(cfg.reward, device="cpu", dtype=weight_dtype,
                                  checkpointing=cfg.reward_checkpointing, weights=cfg.reward_weights)
            place.park("reward", reward)
            if cfg.deepspeed_zero:
                from .distributed import build_optimizer as build_ds_optimizer
                from .distributed import size_buckets
                size_buckets(accelerator, params)
                optimizer = build_ds_optimizer(cfg, params)
            else:
                optimizer = build_optimizer(cfg, params)
            unet_train, optimizer = accelerator.prepare(unet, optimizer)
            pipe = make_pipeline(comps)
    except faults.OOM_ERRORS as e:
        fit = faults.next_fit(cfg, stages.LOAD, suggest=planner.next_feature)
        raise faults.OutOfMemory(faults.oom_message(stages.LOAD, 0, faults.peak_so_far([]), cfg.budget_gb, fit,
                                                    False) + f" [{first_line(e, 100)}]") from None
    prof.record_modules({"unet": unet, "vae": vae, "text_encoder": text_encoder, "reward": reward,
                         "lora": params, "optimizer": optimizer})
    for note in (resolution_note(unet, vae, cfg.resolution),  # e.g. SD1.5 under the cpu profile's 64 px
                 cut_prompts_note(comps.tokenizer, prompts)):
        if note and is_main:
            log.warning(note)

    def score(images: torch.Tensor, batch_prompts: list[str], when: str, fix: str = "fix it") -> torch.Tensor:
        """The reward outside a training step; an error of the user's reward becomes one line naming ``when``."""
        try:
            return reward(images, batch_prompts).float()
        except (UserError, *faults.OOM_ERRORS):
            raise
        except Exception as e:
            raise UserError(f"the reward {cfg.reward!r} raised {type(e).__name__} {when}: {first_line(e)}; "
                            f"{fix}") from None

    with torch.no_grad():  # a reward that fails on its device or in no-grad mode fails here, before anything is written
        score(torch.full((1, 3, 64, 64), 0.5, device=device if place.where.get("reward") == "device" else "cpu"),
              prompts[:1], "on a test image without gradient (as for the sample images)")

    out.mkdir(parents=True, exist_ok=True)
    if is_main:
        (out / "config.yaml").write_text(yaml.safe_dump({"profile": profile_name, **cfg.to_dict()}, sort_keys=False))
    if cfg.report_to != "none":
        accelerator.init_trackers("lowmem_alignprop", config={k: v for k, v in cfg.to_dict().items()
                                                              if isinstance(v, (int, float, str, bool))})

    rank = accelerator.process_index
    rng = random.Random(cfg.seed * 1000 + rank)  # prompt order and K draws; each rank its own stream
    sample_prompts = prompts[: cfg.sample_prompts]
    # prompt embeddings: cached once (then the text encoder leaves the device), or encoded per step
    embed = PromptEncoder(pipe, comps, place, device, cfg.resolution, cache=cfg.cache_prompt_embeddings,
                          prompts=set(prompts) | set(sample_prompts))
    scheduler = comps.scheduler
    bare_unet = accelerator.unwrap_model(unet_train)
    engine = deepspeed_engine(accelerator, unet_train)  # None unless DeepSpeed
    gather = gatherer(accelerator, params)  # ZeRO-3: the partitioned LoRA weights made whole for reading
    # ZeRO-3 gathers weights collectively inside every UNet call: sampling must then run on every rank
    samples_here = is_main or is_zero3(accelerator)

    def generate(batch_prompts: list[str], seed: int):
        """Fixed-seed images and rewards with no gradient (the before/after grid)."""
        with torch.no_grad(), accelerator.autocast():
            g = torch.Generator().manual_seed(seed)
            emb = embed(batch_prompts)
            scheduler.set_timesteps(cfg.sample_steps, device=device)
            lat = initial_latents(len(batch_prompts), bare_unet, vae, cfg.resolution, g, device)
            lat = rollout(bare_unet, scheduler, lat, emb, k=0, guidance_scale=cfg.guidance_scale, eta=cfg.eta,
                          generator=g)
            place.to_device("vae", vae)
            place.to_device("reward", reward)
            imgs = decode(vae, lat, sliced=True)
            r = score(imgs, batch_prompts, "while scoring the fixed-seed sample images",
                      "fix it, or skip the samples with --set sample_prompts=0")
            place.park("vae", vae)
            place.park("reward", reward)
        return imgs.float().cpu(), r.cpu()

    # the before row comes from the untrained LoRA, so it is generated before a checkpoint is restored
    if sample_prompts and samples_here:
        log.info("sampling %d fixed-seed images before training (%d px, %d steps; --set sample_prompts=0 skips it)",
                 len(sample_prompts), cfg.resolution, cfg.sample_steps)
    before = generate(sample_prompts, cfg.seed + 12345) if sample_prompts and samples_here else None

    def apply_fit(fit: faults.Fit) -> None:
        """--auto-fit: switch the live run to a lighter configuration (the ladder's or the planner's step)."""
        nonlocal reward, allocator
        dataclasses.replace(cfg, **fit.overrides).validate()
        for key, value in fit.overrides.items():
            setattr(cfg, key, value)  # batch_size, sliced_decode, tiled_decode, activation_offload: read per step
        keys = set(fit.overrides)
        if "cache_prompt_embeddings" in keys:  # the prompt encoder holds its own copy of the flag
            embed.caching = cfg.cache_prompt_embeddings
        if "grad_accum" in keys:
            accelerator.gradient_accumulation_steps = cfg.grad_accum
        if "vae_checkpointing" in keys:
            enable_vae_checkpointing(vae, cfg.vae_checkpointing)
        if cfg.unet_checkpointing == "blocks" and "unet_checkpointing" in keys:
            bare_unet.enable_gradient_checkpointing()  # keep one input per UNet block, recompute in backward
        if "reward_checkpointing" in keys:
            reward = build_reward(cfg.reward, device="cpu", dtype=weight_dtype,
                                  checkpointing=cfg.reward_checkpointing, weights=cfg.reward_weights)
            place.where.pop("reward", None)
            place.park("reward", reward)
        if "offload_frozen" in keys:
            place.offload_enabled = cfg.offload_frozen
        if "attention" in keys:
            set_attention(bare_unet, vae, cfg.attention, device)
        if "expandable_segments" in keys:  # segments made from now on (the OOM handler emptied the cache) grow in place
            allocator = configure_cuda_allocator(cfg.expandable_segments)

    # ================================ train ================================
    history: list[dict] = []
    start = 0
    metrics_path = folder.metrics
    if resume_path is not None:
        state, rng_state = ckpt.restore(accelerator, resume_path, bare_unet=bare_unet, optimizer=optimizer,
                                        engine=engine, gather=gather, state=point.state)
        start, history = int(state["step"]), list(state.get("history", []))
        if rng_state is not None:
            set_rng_state(rng, rng_state)
        if is_main:
            folder.start_metrics(point, history)
        log.info("resumed from %s at step %d", resume_path, start)
    elif is_main:
        folder.start_metrics(None, history)

    def save_checkpoint(step: int, extra: dict | None = None) -> Path:
        return ckpt.save(accelerator, out, step, cfg=cfg, bare_unet=bare_unet, optimizer=optimizer, engine=engine,
                         rng_state=get_rng_state(rng), history=history, fp=fingerprint, gather=gather,
                         extra={"auto_fit": fits, "skipped_steps": streak.skipped, **(extra or {})})

    def run_step(step: int) -> tuple[dict | None, str | None]:
        """One optimizer step over grad_accum micro-batches: (metrics row, None), or (None, what was not finite)."""
        t0 = time.perf_counter()
        step_rewards, ks, losses = [], [], []
        grad_norm, scaler_skipped = None, False
        accelerator.step = 0  # every step starts a fresh accumulation window (also after a skip or an OOM)
        for micro in range(cfg.grad_accum):
            with accelerator.accumulate(unet_train):
                batch_prompts = [rng.choice(prompts) for _ in range(cfg.batch_size)]
                k = draw_k(cfg, rng)  # once per rollout: the window is the contiguous last K steps
                ks.append(k)
                with guard.stage(stages.ENCODE_PROMPTS):
                    emb = embed(batch_prompts)
                g = torch.Generator().manual_seed(hash((cfg.seed, step, micro, rank)) % 2**63)
                latents = initial_latents(cfg.batch_size, bare_unet, vae, cfg.resolution, g, device)
                with accelerator.autocast():
                    loss, rewards = rollout_loss(cfg, bare_unet, unet_train, scheduler, vae, reward, latents, emb,
                                                 batch_prompts, k=k, generator=g, stage=guard.stage, place=place)
                bad = None if faults.finite(rewards) else "the reward"
                bad = bad or (None if faults.finite(loss) else "the loss")
                if any_rank(accelerator, bad is not None):  # every rank skips together (DDP needs all backwards)
                    optimizer.zero_grad(set_to_none=True)
                    return None, bad or "the reward on another process"
                if not loss.requires_grad:  # a reward that lost its graph on this batch (.detach(), numpy, ...)
                    raise UserError(f"the reward {cfg.reward!r} returned scores with no gradient to the images: "
                                    "AlignProp needs a differentiable reward on every batch")
                with guard.stage(stages.BACKWARD):
                    accelerator.backward(loss)  # gradients reach only the LoRA weights
                del latents  # free the graph's inputs before the next rollout
                place.park("vae", vae)
                place.park("reward", reward)
                step_rewards.append(accelerator.gather(rewards.detach()))
                losses.append(loss.detach())
                if accelerator.sync_gradients:
                    with guard.stage(stages.OPTIMIZER):
                        if cfg.max_grad_norm > 0:
                            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                        overflow = grad_norm is not None and not faults.isfinite_number(grad_norm)
                        if overflow and accelerator.scaler is not None:
                            scaler_skipped = True  # fp16 loss-scale overflow: optimizer.step() skips, lowers the scale
                        elif engine is None and overflow:
                            optimizer.zero_grad(set_to_none=True)  # gradients are all-reduced: same on every rank
                            return None, "the gradient norm"
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)  # free the gradients as soon as possible
        r_all = torch.cat(step_rewards).float()
        loss_mean = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        return {"step": step, "reward_mean": r_all.mean().item(), "reward_std": r_all.std(unbiased=False).item(),
                "loss": loss_mean, "images": r_all.numel(),  # over all processes and micro-batches
                "k": ks[0] if len(ks) == 1 else sum(ks) / len(ks), "k_all": ks,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                **({"grad_scale": accelerator.scaler.get_scale(), "update_skipped": scaler_skipped}
                   if accelerator.scaler is not None else {}),
                "seconds": time.perf_counter() - t0}, None

    streak = faults.NonFiniteStreak(cfg.max_bad_steps)
    fits: list[dict] = []
    stop = StopRequest(on_abort=lock.release)
    bar = tqdm(range(start + 1, cfg.steps + 1), desc="AlignProp", disable=not is_main, dynamic_ncols=True,
               initial=start, total=cfg.steps)
    step, last_saved = start + 1, start if resume_path is not None else None
    with stop.installed():  # SIGINT/SIGTERM are stop requests from the first step until the LoRA is written
        with contextlib.closing(bar):  # the bar ends its line even when an error stops the run
            while step <= cfg.steps:
                guard.step = step
                rng_before = rng.getstate()
                prof.begin_step(step)
                try:
                    row, bad = run_step(step)
                except faults.OOM_ERRORS as e:
                    stage = faults.stage_of(e, guard.current)
                    detail = first_line(e, 100)
                    del e
                    prof.end_step()
                    optimizer.zero_grad(set_to_none=True)
                    faults.free_memory()
                    fit = faults.next_fit(cfg, stage, suggest=planner.next_feature)
                    peak = faults.peak_so_far([h.get("peak_memory_gb") for h in history])
                    message = faults.oom_message(stage, step, peak, cfg.budget_gb, fit, cfg.auto_fit)
                    if not cfg.auto_fit or fit is None or accelerator.num_processes > 1:
                        if accelerator.num_processes == 1 and step - 1 > (last_saved or 0):
                            save_checkpoint(step - 1)  # the steps done so far are kept: --resume latest continues
                        raise faults.OutOfMemory(f"{message} [{detail}]") from None
                    log.warning("auto-fit: %s; applying it and repeating step %d", message, step)
                    apply_fit(fit)
                    fits.append({"step": step, "stage": stage, "change": fit.overrides, "why": fit.description})
                    rng.setstate(rng_before)  # the repeated step draws the same prompts and K
                    bar.write(f"auto-fit at step {step} ({stage}): {fit.as_flags()}")
                    continue
                except Exception as e:  # any other error: keep the finished steps, and name a reward's error as such
                    stage = faults.stage_of(e, "the loop")  # StageGuard tagged it with the stage it happened in
                    prof.end_step()
                    optimizer.zero_grad(set_to_none=True)
                    rng.setstate(rng_before)  # the checkpoint resumes at this step, with its prompts and K
                    saved = (save_checkpoint(step - 1)
                             if accelerator.num_processes == 1 and step - 1 > (last_saved or 0) else None)
                    done = "step 1 is" if step - 1 == 1 else f"steps 1-{step - 1} are"
                    kept = f"; {done} saved in {saved}: --resume latest continues once it is fixed" if saved else ""
                    if isinstance(e, UserError):
                        raise UserError(f"step {step}: {e}{kept}") from None
                    if stage == stages.REWARD:  # the reward is the user's code (or weights): their error, named
                        raise UserError(f"step {step}: the reward {cfg.reward!r} raised {type(e).__name__}: "
                                        f"{first_line(e)}{kept}") from None
                    if saved:
                        log.error("step %d failed in %s; the steps before it are saved in %s (--resume latest)", step,
                                  stage, saved)
                    raise
                mem = prof.end_step()
                if step == start + 1:
                    prof.record_modules({"unet": unet, "vae": vae, "text_encoder": text_encoder, "reward": reward,
                                         "lora": params, "optimizer": optimizer})
                if bad is not None:
                    if is_main:
                        write_metrics_line(metrics_path, {"step": step, "skipped": f"{bad} is NaN or infinite"})
                    if streak.bad(step, bad):
                        path = save_checkpoint(step)
                        raise faults.TrainingDiverged(streak.message(path))
                else:
                    streak.good()
                    row.update(peak_memory_gb=None if mem["peak_allocated"] is None else mem["peak_allocated"] / 2**30,
                               peak_stage=mem["peak_stage"])
                    history.append(row)
                    if is_main:
                        write_metrics_line(metrics_path, row)
                        bar.set_postfix(reward=f"{row['reward_mean']:.4f}", K=row["k"],
                                        s_per_step=f"{row['seconds']:.2f}")
                        if cfg.log_every and step % cfg.log_every == 0:
                            bar.write(f"step {step}: reward {row['reward_mean']:.4f} ± {row['reward_std']:.4f}  "
                                      f"loss {row['loss']:.4f}  K={row['k']}  {prof.format_step(mem)}")
                    if cfg.report_to != "none":
                        accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)
                bar.update(1)
                stopping = stop.agreed(accelerator)
                if stopping or step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    path = save_checkpoint(step)
                    last_saved = step
                    if stopping:
                        bar.write(f"{stop.name} received: saved checkpoint {path}; " + (
                            "that was the last step: writing the LoRA (no after samples)" if step == cfg.steps
                            else "continue with --resume latest"))
                        break
                step += 1

        # ================================ save ================================
        accelerator.wait_for_everyone()
        done = min(step, cfg.steps)  # a stop breaks out at the step it saved; a finished loop leaves step = steps + 1
        summary = {"steps": cfg.steps, "steps_done": done,
                   "interrupted": done < cfg.steps, "resumed_from": str(resume_path or "")
                   or None, "skipped_steps": streak.skipped, "auto_fit": fits,
                   "fp16_overflow_skips": sum(1 for h in history if h.get("update_skipped"))}
        final = accelerator.unwrap_model(unet_train)
        lora = None
        if cfg.train_unet == "lora":
            with gather():
                lora = {k: v.detach().to("cpu", copy=True) for k, v in lora_state_dict(final).items()}
        else:
            with gather():  # ZeRO-3: the partitioned UNet is whole once, to be written
                if is_main:
                    final.save_pretrained(out / "unet")
        after = None
        if before is not None and stop.name is None:
            stop.raise_now = True  # Ctrl-C now skips the samples: the LoRA and summary are still written
            try:
                after = generate(sample_prompts, cfg.seed + 12345)
            except UserError as e:  # the LoRA and summary are still written
                log.warning("%s (the before/after samples are left out)", e)
            except KeyboardInterrupt:
                log.warning("%s received: the after samples are skipped; writing the LoRA and summary", stop.name)
            stop.raise_now = False  # from here a stop request changes nothing: the LoRA is being written
        if is_main:
            if lora is not None:
                comps.pipeline_class.save_lora_weights(str(out / "lora"), unet_lora_layers=lora,
                                                       unet_lora_adapter_metadata=lora_metadata(final))
                # which base model it belongs to: `sample` warns when it is applied to another one
                (out / "lora" / ckpt.LORA_BASE_FILE).write_text(json.dumps(fingerprint, indent=1))
            if after is not None:
                grid = save_sample_grid(out / "samples" / "before_after.png", sample_prompts, before, after)
                # the grid's labels are cut to their cell: every prompt in full, with its two rewards
                (out / "samples" / "before_after.json").write_text(json.dumps(
                    {"seed": cfg.seed + 12345, "sample_steps": cfg.sample_steps, "images": [
                        {"prompt": p, "reward_before": b, "reward_after": a}
                        for p, b, a in zip(sample_prompts, before[1].tolist(), after[1].tolist())]},
                    indent=1, ensure_ascii=False))
                log_images(accelerator, cfg, grid)
                summary["sample_reward_before"] = before[1].mean().item()
                summary["sample_reward_after"] = after[1].mean().item()
            if fits:  # the configuration that finally fitted, for the next run
                (out / "config.yaml").write_text(yaml.safe_dump({"profile": profile_name, **cfg.to_dict(),
                                                                 "auto_fit_changes": fits}, sort_keys=False))
            prof.write(out)
            fits_budget = prof.report()["fits_budget"]  # the profiler's peak (load included) against budget_gb
            n = max(1, min(3, len(history) // 2))
            summary.update({
                "reward_first": sum(h["reward_mean"] for h in history[:n]) / n if history else float("nan"),
                "reward_last": sum(h["reward_mean"] for h in history[-n:]) / n if history else float("nan"),
                "seconds_per_step": sum(h["seconds"] for h in history) / max(1, len(history)),
                "peak_memory_gb": max((h["peak_memory_gb"] for h in history if h.get("peak_memory_gb") is not None),
                                      default=None),
                "budget_gb": cfg.budget_gb or None, "fits_budget": fits_budget,
                "attention": attention, "cuda_allocator": allocator, "device": str(device), "output_dir": str(out),
                "trained": "lora" if cfg.train_unet == "lora" else "unet",
            })
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            print_summary(summary, cfg, profile_name)
        accelerator.wait_for_everyone()
        accelerator.end_training()  # tears the process group down before interpreter exit: no gloo abort
    return summary


class StopRequest:
    """SIGINT/SIGTERM during training: finish the step, save a checkpoint, exit 0. A second Ctrl-C aborts at once
    (``on_abort`` runs first: the run's lock is released). With ``raise_now`` set (the after samples, which only
    cost time), the first signal raises KeyboardInterrupt there so that the run goes straight to writing its LoRA."""

    def __init__(self, on_abort: Callable[[], None] | None = None):
        self.name: str | None = None
        self._first = 0.0
        self.on_abort = on_abort
        self.raise_now = False

    def _handle(self, signum, frame):
        # a launcher (torchrun, accelerate launch) forwards the terminal's Ctrl-C to its workers, which then see
        # two SIGINTs within milliseconds: only a second press a moment later aborts
        if self.name == "SIGINT" and signum == signal.SIGINT and time.monotonic() - self._first > 2.0:
            self._abort()
        if self.name is None:
            self._first = time.monotonic()
            self.name = signal.Signals(signum).name
            if self.raise_now:
                raise KeyboardInterrupt
            again = ("the launcher stops the processes if they take longer than 30 s" if world_size() > 1
                     else "Ctrl-C again to abort")
            if global_rank() == 0:  # once per run, not once per process
                log.warning("\n%s received: finishing this step, then saving a checkpoint (%s)", self.name, again)

    def _abort(self):
        """Out at once, without unwinding through whatever runs now (the profiler of a detail step would crash
        the interpreter): the steps since the last checkpoint are lost, the rest stays as it was."""
        log.warning("aborted by a second Ctrl-C: the steps since the last checkpoint are lost; --resume latest "
                    "continues from it")
        sys.stdout.flush()
        sys.stderr.flush()
        if self.on_abort is not None:
            self.on_abort()
        os._exit(130)

    @contextlib.contextmanager
    def installed(self):
        import threading
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def agreed(self, accelerator) -> bool:
        """True on every rank if any rank was asked to stop (they save the same step together)."""
        from .distributed import any_rank
        return any_rank(accelerator, self.name is not None) and (self.name is not None or self._adopt())

    def _adopt(self) -> bool:
        self.name = "stop request from another process"
        return True


def get_rng_state(rng: random.Random) -> dict:
    state = {"python": rng.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(rng: random.Random, state: dict) -> None:
    version, internal, gauss = state["python"]
    rng.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def log_images(accelerator, cfg: Config, grid_path: Path) -> None:
    """Send the before/after grid to the configured tracker (tensorboard or wandb)."""
    if cfg.report_to == "none":
        return
    import numpy as np
    from PIL import Image

    arr = np.asarray(Image.open(grid_path).convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples/before_after", arr, cfg.steps, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb
            tracker.log({"samples/before_after": wandb.Image(arr)}, step=cfg.steps)


def print_summary(s: dict, cfg: Config, profile_name: str) -> None:
    change = s["reward_last"] - s["reward_first"]
    lines = [
        "",
        "=" * 64,
        (f" AlignProp interrupted after step {s.get('steps_done')} of {cfg.steps}: continue with --resume latest"
         if s.get("interrupted") else
         f" AlignProp finished: {cfg.steps} steps on {s['device']} (profile {profile_name}, "
         f"model {cfg.model})"),
        f" reward ({cfg.reward}): {s['reward_first']:.4f} -> {s['reward_last']:.4f}  ({change:+.4f})"
        if math.isfinite(change) else
        f" reward ({cfg.reward}): no step trained (skipped: {s.get('skipped_steps')}); see metrics.jsonl",
    ]
    if "sample_reward_before" in s:
        lines.append(f" fixed-seed samples:  {s['sample_reward_before']:.4f} -> {s['sample_reward_after']:.4f}")
    if s.get("fp16_overflow_skips"):
        lines.append(f" fp16 loss scaling: {s['fp16_overflow_skips']} update(s) skipped on overflow while it found "
                     "its scale (normal in the first steps)")
    budget = {True: f" (budget {s.get('budget_gb')} GiB: fits)",
              False: f", OVER the {s.get('budget_gb')} GiB budget: see memory_report.md", None: ""}
    trained = (f"{s['output_dir']}/lora (pipe.load_lora_weights)" if s.get("trained", "lora") == "lora" else
               f"{s['output_dir']}/unet (UNet2DConditionModel.from_pretrained)")
    lines += [
        f" {s['seconds_per_step']:.2f} s/step, peak memory "
        + ("n/a" if s["peak_memory_gb"] is None else f"{s['peak_memory_gb']:.3f} GiB")
        + budget[s.get("fits_budget")] + f", attention {s['attention']}"
        + ("" if s.get("cuda_allocator") in (None, "cpu") else f", allocator: {s['cuda_allocator']}"),
        f" wrote: {trained}, " + ("samples/, " if (Path(s["output_dir"]) / "samples").is_dir() else "")
        + "metrics.jsonl, summary.json,",
        "        memory_report.{json,md,png}, config.yaml, checkpoints/ (--resume latest)",
        "=" * 64,
    ]
    print("\n".join(lines), flush=True)

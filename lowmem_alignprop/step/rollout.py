"""One AlignProp training step's pieces, shared by the trainer and the planner.

:func:`apply_memory_features` turns loaded (or meta) components into the configuration that trains;
:func:`rollout_loss` runs sample_nograd -> sample_grad -> decode -> reward of one micro-batch and returns the loss.
See docs/design.md section 1 (stages) and section 2 (truncated backprop).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from lowmem_alignprop.memory import stages
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.models.family import UNetFamily, family_for
from lowmem_alignprop.models.loading import choose_vae_dtype
from lowmem_alignprop.memory.placement import Placement
from lowmem_alignprop.memory.quant import store_fp8
from lowmem_alignprop.models.lora_layers import keep_input_dtype
from lowmem_alignprop.models.sampling import enable_block_checkpointing, enable_vae_checkpointing, without_autocast


def loss_from_reward(rewards: torch.Tensor, cfg: Config) -> torch.Tensor:
    """loss = -loss_scale * mean(reward); with reward_target: loss_scale * mean(|reward - target|); with reward_cap:
    -loss_scale * mean(min(reward, cap)) (images at or above the cap give no gradient)."""
    if cfg.reward_target is not None:
        return cfg.loss_scale * (rewards - cfg.reward_target).abs().mean()
    if cfg.reward_cap is not None:
        rewards = rewards.clamp(max=cfg.reward_cap)
    return -cfg.loss_scale * rewards.mean()


def apply_memory_features(comps, cfg: Config, device: torch.device, weight_dtype: torch.dtype, *,
                          autocast: bool = False):
    """Freeze, cast, pick attention and checkpointing, add LoRA. Returns (trainable params, attention used).

    The planner calls this too, so its estimate is of exactly the configuration that trains. ``comps.unet`` is the
    denoiser: a UNet, or an SD3/FLUX transformer (its family decides attention and LoRA targets). ``autocast``: every
    call of the denoiser runs under autocast (the trainer's accelerator, the planner's emulation).
    """
    family = family_for(comps)
    unet, vae = comps.unet, comps.vae
    for m in comps.frozen_modules().values():
        m.requires_grad_(False).eval()  # frozen: no gradients, no optimizer state
    # SDXL's stock VAE overflows in fp16: bf16 where the GPU has it (same memory), else fp32 (logged with its cost)
    choose_vae_dtype(vae, weight_dtype, device, comps.is_sdxl)
    attention = family.set_attention(unet, vae, cfg.attention, device)
    if cfg.unet_checkpointing == "blocks":
        enable_block_checkpointing(unet)  # keep one input per UNet/transformer block, recompute inside backward
    enable_vae_checkpointing(vae, cfg.vae_checkpointing)
    if cfg.train_unet == "lora":
        params = family.add_lora(unet, cfg)
        if autocast:  # -2 ops forward and backward per adapted layer and call, -1 fp16 input copy kept for backward
            keep_input_dtype(unet)
        if cfg.base_quant == "fp8" and not any(p.is_meta for p in unet.parameters()):
            # frozen Linear weights at 1 byte (half of bf16), each layer upcast while it runs; after LoRA, so the
            # adapters stay fp32 (a flow transformer read or drawn block by block has the rest in fp8 already: the
            # LoRA targets are what is left). The planner's meta model is counted analytically (fake modules cannot
            # be cast)
            store_fp8(unet, weight_dtype)
    else:
        unet.to(torch.float32).requires_grad_(True)  # full fine-tuning keeps fp32 master weights
        params = list(unet.parameters())
    return params, attention


def rollout_loss(cfg: Config, bare_unet, grad_unet, scheduler, vae, reward, latents, emb, prompts: list[str], *,
                 k: int, generator, stage, place: Placement | None = None,
                 saved_tensors: Callable[[], ContextManager] | None = None, terms: dict | None = None,
                 family=None, detached=frozenset()):
    """sample_nograd -> sample_grad -> decode -> reward for one micro-batch. Returns (loss, rewards): the rewards of
    the sampled images (with lv_draws > 1 the loss averages the extra draws' rewards too).

    loss = the reward term (:func:`loss_from_reward`) + kl_coeff * the KL term (the sum over the grad window of the
    distance to the base model's predictions, computed in ``sample_grad``: docs/design.md section 10). ``terms``:
    a dict that receives the loss's parts (``kl``), detached, for the metrics.

    What differs between a real step (the trainer) and an estimated one (the planner, on fake tensors) is passed in,
    never patched into torch or another module: ``scheduler`` (the planner's keeps its timesteps real), ``stage``
    (the profiler's or the planner's counter), ``place`` (where the frozen modules sit), ``saved_tensors`` (where
    activation_offload sends the tensors saved for backward; default torch's ``save_on_cpu``). Autocast is the
    caller's: the trainer's accelerator, or the planner's emulation of CUDA autocast. ``family``: the model family
    (:mod:`lowmem_alignprop.models.family`: schedule, rollout and decode of UNets or flow transformers; default UNet)."""
    family = family or UNetFamily(None)
    # activation_offload: every tensor saved for backward (checkpoint inputs included) waits in CPU memory
    if not cfg.activation_offload:
        offload = contextlib.nullcontext()
    elif saved_tensors is not None:
        offload = saved_tensors()
    else:
        offload = torch.autograd.graph.save_on_cpu(pin_memory=latents.is_cuda)
    kl: list | None = [] if cfg.kl_coeff > 0 else None
    with offload:
        latents = family.rollout(cfg, bare_unet, grad_unet, scheduler, latents, emb, k=k, generator=generator,
                                 stage=stage, kl=kl, detached=detached)  # per_step: window steps without a graph
        with stage(stages.DECODE):
            if place is not None:
                place.to_device("vae", vae)
            images = family.decode(vae, latents, cfg, sliced=cfg.sliced_decode, tiled=cfg.tiled_decode,
                                   tile_size=cfg.tile_size, tile_overlap=cfg.tile_overlap)
        with stage(stages.REWARD):
            if place is not None:
                place.to_device("reward", reward)
            with without_autocast(images.device.type):  # the frozen reward model in its own dtype, as the VAE
                rewards = reward(images, prompts * cfg.lv_draws).float()
    loss = loss_from_reward(rewards, cfg)
    if terms is not None and cfg.reward_cap is not None:  # every draw's, not only the sampled images' (lv_draws)
        terms["lowest_reward"] = rewards.min().detach()
    if terms is not None and getattr(reward, "last_terms", None):  # a combined reward: each term's mean, for metrics
        terms["reward_terms"] = {name: s[:len(prompts)].float().mean() for name, s in reward.last_terms.items()}
    if kl:
        kl_sum = torch.stack(kl).sum()
        loss = loss + cfg.kl_coeff * kl_sum
        if terms is not None:
            terms["kl"] = kl_sum.detach()
    return loss, rewards[:len(prompts)]

"""window_keep (issue 20): the last min(K, N) grad-window calls run without their per-call checkpoint.

A kept call's backward uses the activations its forward saved; a checkpointed one recomputes the same call first.
Both are the same operations, so the LoRA gradients agree to SAME_OPS; what changes is how many UNet/transformer
calls backward recomputes (K - min(K, N) steps' calls instead of K), the planner's peak (up by about one call's
activations per kept call) and its backward work (down by one call's recompute per kept call)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from numerics import SAME_OPS, assert_rel_close

from lowmem_alignprop.measure import planner
from lowmem_alignprop.memory import stages
from lowmem_alignprop.models.family import UNetFamily
from lowmem_alignprop.models.sampling import PromptEmbeds, enable_block_checkpointing
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.step.rollout import rollout_loss

NO_STAGE = lambda name: contextlib.nullcontext()  # noqa: E731
PROMPTS = ["a photo of a cat", "a red dog"]


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from lowmem_alignprop.models.loading import add_lora, load_components

    comps = load_components(Config(model=str(tiny_dir)))
    params = add_lora(comps.unet, rank=4, alpha=4, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:  # lora_B starts at zero; give it values so the LoRA path (and the KL term) matters
            p.add_(0.05 * torch.randn_like(p))
    comps.vae.requires_grad_(False)
    emb = PromptEmbeds(torch.randn(2, 16, 32), torch.randn(2, 16, 32))
    return SimpleNamespace(comps=comps, params=params, emb=emb)


def _unet_step(m, unet, params, cfg, seed=3):
    """rollout_loss (the trainer's) with the UNet family; returns (loss, LoRA grads, grad-mode of each forward UNet
    call, the number of UNet calls backward made)."""
    calls: list[bool] = []
    hook = unet.register_forward_pre_hook(lambda mod, a: calls.append(torch.is_grad_enabled()))
    try:
        g = torch.Generator().manual_seed(seed)
        lat = torch.randn(2, 4, 32, 32, generator=g)
        loss, _ = rollout_loss(cfg, unet, unet, m.comps.scheduler, m.comps.vae, brightness, lat, m.emb, PROMPTS,
                               k=cfg.k, generator=g, stage=NO_STAGE, family=UNetFamily(m.comps))
        forward = list(calls)
        calls.clear()
        grads = torch.autograd.grad(loss, params)
        return loss.detach(), grads, forward, len(calls)
    finally:
        hook.remove()


def _recomputed(cfg) -> int:
    """Calls backward recomputes: per checkpointed window step one (two with KL, but the first step's base call has
    no input that needs a gradient: no backward), and DRaFT-LV's batched call when the last step is checkpointed."""
    kept = min(cfg.k, cfg.window_keep)
    checkpointed = cfg.k - kept
    base_calls = max(checkpointed - 1, 0) if cfg.kl_coeff > 0 else 0
    return checkpointed + base_calls + (1 if cfg.lv_draws > 1 and kept == 0 else 0)


@pytest.mark.parametrize("keep", [1, 2, 9])
@pytest.mark.parametrize("variant", ["plain", "kl+lv", "blocks"])
def test_unet_gradients_equal_the_checkpointed_windows(tiny, keep, variant):
    """K=3 of 5 DDIM steps: window_keep=N gives the LoRA gradients of window_keep=0 (the same ops: SAME_OPS), K is
    still the contiguous last 3 calls of the rollout, and backward recomputes only the K - min(K, N) checkpointed
    steps' calls (with the KL term's base calls and DRaFT-LV's draws; with per-block checkpoints the kept call
    keeps its block checkpoints, which recompute blocks, not whole calls)."""
    cfg = Config(sample_steps=5, k=3, guidance_scale=4.0, eta=1.0, batch_size=2).validate()
    if variant == "kl+lv":
        cfg = dataclasses.replace(cfg, kl_coeff=0.5, lv_draws=2)
    unet, params = tiny.comps.unet, tiny.params
    if variant == "blocks":
        unet = copy.deepcopy(unet)
        params = [p for p in unet.parameters() if p.requires_grad]
        enable_block_checkpointing(unet)  # the trainer's unet_checkpointing=blocks
    ref_loss, ref, ref_calls, ref_back = _unet_step(tiny, unet, params, cfg)
    kept = dataclasses.replace(cfg, window_keep=keep)
    loss, grads, calls, back = _unet_step(tiny, unet, params, kept)
    assert_rel_close(loss, ref_loss, SAME_OPS, "loss")
    assert_rel_close(grads, ref, SAME_OPS, f"window_keep={keep} LoRA gradients")  # fails on a zero reference
    assert calls == ref_calls
    per_step = 2 if cfg.kl_coeff > 0 else 1
    assert calls[:2] == [False, False] and calls[2:2 + 3 * per_step] == [True] * (3 * per_step)
    assert (ref_back, back) == (_recomputed(cfg), _recomputed(kept)), (ref_back, back)
    assert back < ref_back


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_gradients_equal_the_checkpointed_windows(tmp_path, name):
    """The flow transformers share truncated_chain: window_keep=1 (KL and two DRaFT-LV draws) gives window_keep=0's
    gradients and recomputes one step's calls fewer."""
    from diffusers import DiffusionPipeline

    from flowmodels import FLOW_RESOLUTION, build_tiny_flux_dir, build_tiny_sd3_dir
    from lowmem_alignprop.models import flow
    from lowmem_alignprop.models.family import FlowFamily

    root = (build_tiny_sd3_dir if name == "sd3" else build_tiny_flux_dir)(tmp_path / name)
    pipe = DiffusionPipeline.from_pretrained(root)
    pipe.vae.requires_grad_(False)
    params = flow.add_flow_lora(pipe.transformer, rank=4, alpha=4, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    gs = {"sd3": 4.0, "flux": 3.5}[name]
    emb = flow.encode_prompts(pipe, PROMPTS, "cpu", guidance_scale=gs, max_sequence_length=16)
    family = FlowFamily(SimpleNamespace(unet=pipe.transformer, vae=pipe.vae, family=name))
    cfg = Config(model=str(root), sample_steps=4, k=2, guidance_scale=gs, resolution=FLOW_RESOLUTION, batch_size=2,
                 kl_coeff=0.5, lv_draws=2)
    out = {}
    for keep in (0, 1):
        c = dataclasses.replace(cfg, window_keep=keep)
        calls: list[bool] = []
        hook = pipe.transformer.register_forward_pre_hook(lambda mod, a: calls.append(torch.is_grad_enabled()))
        try:
            g = torch.Generator().manual_seed(5)
            lat = family.initial_latents(c, 2, g, "cpu")
            loss, _ = rollout_loss(c, pipe.transformer, pipe.transformer, pipe.scheduler, pipe.vae, brightness, lat,
                                   emb, PROMPTS, k=c.k, generator=g, stage=NO_STAGE, family=family)
            calls.clear()
            out[keep] = loss.detach(), torch.autograd.grad(loss, params), len(calls)
        finally:
            hook.remove()
    assert_rel_close(out[1][0], out[0][0], SAME_OPS, f"{name}: loss")
    assert_rel_close(out[1][1], out[0][1], SAME_OPS, f"{name}: window_keep=1 LoRA gradients")
    assert (out[0][2], out[1][2]) == (_recomputed(cfg), _recomputed(dataclasses.replace(cfg, window_keep=1)))

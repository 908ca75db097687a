"""Issue 18 for the alignment controls of issue 16 on the flow transformers (tiny SD3 and FLUX.1-dev): the KL term
to the base model (the transformer with its adapters off, per-call and per-block checkpoints) has autograd's
gradient; lv_draws=1 is the plain step bit for bit and more draws have the gradient of the written-out DRaFT-LV
(re-noised with diffusers' own ``scale_noise`` and stepped with its ``step``); the trainer runs both and logs KL."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from loras import nudge
from flowmodels import FLOW_RESOLUTION, build_tiny_flux_dir, build_tiny_sd3_dir
from numerics import SAME_OPS, assert_rel_close
from refusals import frozen_base_copy, strict_rows

from lowmem_alignprop.models import flow
from lowmem_alignprop.models.family import FlowFamily
from lowmem_alignprop.models.sampling import enable_block_checkpointing
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.step.rollout import loss_from_reward, rollout_loss

RES = FLOW_RESOLUTION
PROMPTS = ["a photo of a cat", "a red dog"]
GUIDANCE = {"sd3": 4.0, "flux": 3.5}
NO_STAGE = lambda name: contextlib.nullcontext()  # noqa: E731


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowctl")
    return {"sd3": build_tiny_sd3_dir(root / "sd3"), "flux": build_tiny_flux_dir(root / "flux")}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def model(request, dirs):
    """A loaded tiny pipeline with LoRA adapters that change its output (lora_B starts at zero), its embeddings,
    a Config and the family object the trainer would use."""
    from diffusers import DiffusionPipeline

    name = request.param
    pipe = DiffusionPipeline.from_pretrained(dirs[name])
    pipe.vae.requires_grad_(False)
    params = flow.add_flow_lora(pipe.transformer, rank=4, alpha=4, seed=0)
    nudge(params)  # lora_B starts at zero
    emb = flow.encode_prompts(pipe, PROMPTS, "cpu", guidance_scale=GUIDANCE[name], max_sequence_length=16)
    cfg = Config(model=str(dirs[name]), sample_steps=4, k=2, guidance_scale=GUIDANCE[name], resolution=RES,
                 batch_size=2)
    family = FlowFamily(SimpleNamespace(unet=pipe.transformer, vae=pipe.vae, family=name))
    return SimpleNamespace(name=name, pipe=pipe, params=params, emb=emb, cfg=cfg, family=family)


def _ids(m):
    lh, lw = flow.latent_size(m.pipe.vae, RES, RES, m.name)
    return (flow.latent_image_ids(lh, lw) if m.name == "flux" else None), lh, lw




# -- KL to the base -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("blocks", [False, True], ids=["per_call", "per_block"])
def test_kl_gradient_is_autograds(model, blocks):
    """The KL term through flow.rollout (two checkpoints per window step, the base call with the adapters off, also
    inside per-block checkpoints that recompute after the call returned) == plain autograd with a separate base
    model and no checkpoints, on both transformer families."""
    m = model
    transformer = copy.deepcopy(m.pipe.transformer) if blocks else m.pipe.transformer
    lora = [p for p in transformer.parameters() if p.requires_grad]
    if blocks:
        enable_block_checkpointing(transformer)  # the trainer's unet_checkpointing=blocks
    ids, lh, lw = _ids(m)
    sched, gs = m.pipe.scheduler, m.cfg.guidance_scale
    start, _ = flow.initial_latents(transformer, m.pipe.vae, 2, RES, RES, torch.Generator().manual_seed(3))
    flow.set_flow_timesteps(sched, transformer, 4, lh, lw)
    kl: list = []
    flow.rollout(transformer, sched, start, m.emb, k=2, guidance_scale=gs, img_ids=ids, kl=kl)
    assert len(kl) == 2
    ours = torch.autograd.grad(torch.stack(kl).sum(), lora)
    assert all(p.requires_grad for p in lora)  # the switch gave every adapter weight its flag back

    base = frozen_base_copy(m.pipe.transformer)
    ts = list(flow.set_flow_timesteps(sched, transformer, 4, lh, lw))
    lat = start
    with torch.no_grad():
        for t in ts[:2]:
            lat = sched.step(flow.guided_velocity(m.pipe.transformer, lat, t, m.emb, gs, ids), t, lat,
                             return_dict=False)[0]
    terms = []
    for t in ts[2:]:
        v = flow.guided_velocity(m.pipe.transformer, lat, t, m.emb, gs, ids)
        terms.append((v - flow.guided_velocity(base, lat, t, m.emb, gs, ids)).pow(2).mean())
        lat = sched.step(v, t, lat, return_dict=False)[0]
    reference = torch.autograd.grad(torch.stack(terms).sum(), m.params)
    assert_rel_close(ours, reference, SAME_OPS, f"{m.name}: KL gradient vs autograd")  # fails on a zero reference


def test_kl_term_enters_the_loss_and_its_metric(model):
    """rollout_loss with kl_coeff: loss = reward term + kl_coeff * KL, and ``terms['kl']`` is that KL (> 0 with
    adapters that change the output)."""
    m = model
    losses, terms = {}, {}
    for coeff in (0.0, 2.0):
        g = torch.Generator().manual_seed(5)
        lat = m.family.initial_latents(m.cfg, 2, g, "cpu")
        out: dict = {}
        with torch.no_grad():
            losses[coeff], _ = rollout_loss(dataclasses.replace(m.cfg, kl_coeff=coeff), m.pipe.transformer,
                                            m.pipe.transformer, m.pipe.scheduler, m.pipe.vae, brightness, lat,
                                            m.emb, PROMPTS, k=2, generator=g, stage=NO_STAGE, terms=out,
                                            family=m.family)
        terms[coeff] = out.get("kl")
    assert terms[0.0] is None and terms[2.0] > 0
    assert_rel_close(losses[2.0], losses[0.0] + 2.0 * terms[2.0], SAME_OPS, "loss = reward term + coeff * KL")


# -- DRaFT-LV -------------------------------------------------------------------------------------------------

def _step(m, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    lat = m.family.initial_latents(cfg, 2, g, "cpu")
    loss, rewards = rollout_loss(cfg, m.pipe.transformer, m.pipe.transformer, m.pipe.scheduler, m.pipe.vae,
                                 brightness, lat, m.emb, PROMPTS, k=cfg.k, generator=g, stage=NO_STAGE,
                                 family=m.family)
    return loss, rewards, torch.autograd.grad(loss, m.params)


def _written_out(m, cfg, seed, draws):
    """The step written out with diffusers' scheduler and no helper of ours but guided_velocity/decode: noise,
    T-K no-grad Euler steps, the K window with one checkpoint per call, and for draws > 1 the last step again from
    the result re-noised by a fresh scheduler set to the last step (``scale_noise``, then ``step``)."""
    ids, lh, lw = _ids(m)
    g = torch.Generator().manual_seed(seed)
    lat = m.family.initial_latents(cfg, 2, g, "cpu")
    sched, gs, tr = m.pipe.scheduler, cfg.guidance_scale, m.pipe.transformer
    ts = flow.set_flow_timesteps(sched, tr, cfg.sample_steps, lh, lw)
    split = cfg.sample_steps - cfg.k
    with torch.no_grad():
        for t in ts[:split]:
            lat = sched.step(flow.guided_velocity(tr, lat, t, m.emb, gs, ids), t, lat, return_dict=False)[0]
    lat = lat.detach()
    for t in ts[split:]:
        v = checkpoint(flow.guided_velocity, tr, lat, t, m.emb, gs, ids, use_reentrant=False)
        lat = sched.step(v, t, lat, return_dict=False)[0]
    if draws > 1:
        last = copy.deepcopy(sched)
        flow.set_flow_timesteps(last, tr, cfg.sample_steps, lh, lw)
        last.set_begin_index(cfg.sample_steps - 1)  # scale_noise and step both act at the last step's sigma
        more = draws - 1
        start = lat.detach().repeat(more, *([1] * (lat.dim() - 1)))
        noise = torch.randn(start.shape, generator=g)
        t = ts[-1]
        noisy = last.scale_noise(start, t.reshape(1), noise)
        v = checkpoint(flow.guided_velocity, tr, noisy, t, flow.FlowEmbeds.cat([m.emb] * more), gs, ids,
                       use_reentrant=False)
        lat = torch.cat([lat, last.step(v, t, noisy, return_dict=False)[0]])
    rewards = brightness(flow.decode(m.pipe.vae, lat, height=RES, width=RES), PROMPTS * draws).float()
    loss = loss_from_reward(rewards, cfg)
    return loss, rewards[:2], torch.autograd.grad(loss, m.params)


def test_one_lv_draw_is_the_plain_step_bit_for_bit(model):
    m = model
    loss, rewards, grads = _step(m, m.cfg, seed=7)
    ref_loss, ref_rewards, ref_grads = _written_out(m, m.cfg, seed=7, draws=1)
    assert torch.equal(loss, ref_loss) and torch.equal(rewards, ref_rewards)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_more_lv_draws_have_the_written_out_gradient(model):
    """lv_draws=3: the loss averages 3 x 2 images, the rewards returned are the sampled images' (the first 2), and
    loss and LoRA gradients equal the step written out with diffusers' scale_noise/step at the last sigma."""
    m = model
    cfg = dataclasses.replace(m.cfg, lv_draws=3)
    loss, rewards, grads = _step(m, cfg, seed=8)
    ref_loss, ref_rewards, ref_grads = _written_out(m, cfg, seed=8, draws=3)
    plain_loss, plain_rewards, _ = _step(m, m.cfg, seed=8)
    assert rewards.shape == (2,) and torch.equal(rewards, plain_rewards)  # draw 1 is the trajectory's own
    assert not torch.equal(loss, plain_loss)  # the extra draws are other images
    assert_rel_close(loss, ref_loss, SAME_OPS, f"{m.name}: lv_draws=3 loss")
    assert_rel_close(grads, ref_grads, SAME_OPS, f"{m.name}: lv_draws=3 LoRA gradients")


def test_the_extra_draws_joined_embeddings_are_made_again_not_kept(model):
    """The extra draws' call sees the prompt embeddings joined ``draws - 1`` times; made inside its checkpoint, they
    are freed after the call and made again by the recompute. Made outside, the checkpoint kept them alive with the
    graph until backward (4 MiB of T5 tokens per extra draw for FLUX in bf16)."""
    import gc

    m = model
    transformer, scheduler = m.pipe.transformer, copy.deepcopy(m.pipe.scheduler)
    x0, ids = flow.initial_latents(transformer, m.pipe.vae, 2, RES, RES, torch.Generator().manual_seed(0), "cpu")
    lh, lw = flow.latent_size(m.pipe.vae, RES, RES, m.name)
    flow.set_flow_timesteps(scheduler, transformer, 4, lh, lw, "cpu")
    joined_shape = (2 * m.emb.cond.shape[0], *m.emb.cond.shape[1:])  # 2 extra draws of the 2 prompts

    def joined_alive():
        gc.collect()
        return [o for o in gc.get_objects() if torch.is_tensor(o) and tuple(o.shape) == joined_shape]

    def draws(**call):
        return flow.last_step_draws(transformer, scheduler, x0, m.emb, 3, guidance_scale=GUIDANCE[m.name],
                                    img_ids=ids, generator=torch.Generator().manual_seed(1), **call)

    assert joined_alive() == []
    out = draws()
    assert out.shape[0] == 3 * 2 and out.requires_grad
    assert joined_alive() == []
    grads = torch.autograd.grad(out.float().square().mean(), m.params)  # the recompute joins them again
    plain = draws(call=lambda fn, *args: fn(*args))
    ref = torch.autograd.grad(plain.float().square().mean(), m.params)
    assert_rel_close(grads, ref, SAME_OPS, f"{m.name}: the extra draws' LoRA gradients")


# -- the trainer and the planner -------------------------------------------------------------------------------

def test_the_trainer_runs_kl_and_lv_draws_on_flux(dirs, tmp_path, fresh_log_handlers):
    """Two steps on tiny FLUX with kl_coeff and lv_draws (refused for flow models before): KL is 0 at step 1 (LoRA's
    B starts at zero) and above 0 once the first update moved it."""
    from lowmem_alignprop.cli import main

    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--seed", "0", "--model", str(dirs["flux"]), "--set", f"resolution={RES}",
                 "--set", "sample_steps=4", "--set", "k=2", "--set", "batch_size=1", "--set", "guidance_scale=3.5",
                 "--set", "sample_prompts=0", "--set", "lr=0.05", "--set", "kl_coeff=1", "--set", "lv_draws=2",
                 "--steps", "2", "--output-dir", str(out)]) == 0
    rows = strict_rows(out)
    assert rows[0]["kl"] == 0 and rows[1]["kl"] > 0


def test_the_planner_counts_kl_and_lv_draws_for_flux(dirs):
    """The planner runs the same rollout_loss: with kl_coeff each window step keeps a few more latent-sized tensors
    (the base model's velocity, the difference), and with lv_draws=3 the decode works on 3x the images."""
    from lowmem_alignprop.measure.planner import estimate

    cfg = Config(model=str(dirs["flux"]), sample_steps=6, truncation="fixed", k=4, resolution=RES, batch_size=1,
                 guidance_scale=3.5).validate()
    plain = estimate(cfg, target="cpu")
    kl = estimate(dataclasses.replace(cfg, kl_coeff=0.1), target="cpu")
    latent = 1 * 64 * 64 * 4  # one fp32 packed FLUX latent at 32 px: 64 tokens x 64 channels
    assert 0 < kl.per_k_bytes - plain.per_k_bytes <= 3 * latent, (plain.per_k_bytes, kl.per_k_bytes)
    lv = estimate(dataclasses.replace(cfg, lv_draws=3), target="cpu")
    assert lv.stages["decode"]["allocated"] > 1.5 * plain.stages["decode"]["allocated"]


def test_a_flux_window_step_keeps_one_latent_with_block_checkpoints_too(dirs):
    """What each further step of the gradient window keeps is its checkpoint's input latent (and a few scalars of
    the scheduler's step): the chain held the previous call's velocity while the next call ran (a latent more per
    step in the planner's K extrapolation). FLUX hands each block its rotary embeddings as a ``(cos, sin)`` tuple,
    made afresh in every transformer call; with unet_checkpointing=blocks the blocks' checkpoints sit inside the
    rollout's checkpoint of the call and kept that tuple, alive with the graph, once per window step (4.5 MiB per
    step at 1024 px)."""
    from lowmem_alignprop.measure.planner import estimate

    cfg = Config(model=str(dirs["flux"]), sample_steps=6, truncation="fixed", k=4, resolution=RES, batch_size=1,
                 guidance_scale=3.5).validate()
    per_k = {ckpt: estimate(dataclasses.replace(cfg, unet_checkpointing=ckpt), target="cpu").per_k_bytes
             for ckpt in ("call", "blocks")}
    latent = 1 * 64 * 64 * 4  # one fp32 packed FLUX latent at 32 px: 64 tokens x 64 channels
    assert latent <= per_k["call"] < latent + 64, per_k  # the old chain: 32772, two latents
    assert per_k["blocks"] == per_k["call"], per_k  # the old checkpoint: 10240 more (the tiny model's rotary tuple)

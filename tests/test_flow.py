"""The flow-matching rollout (lowmem_alignprop/models/flow.py) on tiny SD3-shaped and FLUX-shaped pipelines.

* our schedule, packing, guidance and decode give the pipeline's own images (diffusers' ``__call__``);
* the checkpointed gradient through the last K Euler steps equals plain autograd through the same window;
* the window is the last K steps, K is drawn once per rollout;
* a LoRA saved with ``save_lora_weights`` loads with ``load_lora_weights`` and reproduces our images;
* a tiny reward rises over a few optimizer steps;
* the shipped sd35m / sd35l / flux configs build (on the meta device) transformers of the published sizes.
"""

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loras import nudge
from flowmodels import FLOW_RESOLUTION, build_tiny_flux_dir, build_tiny_sd3_dir
from numerics import SAME_OPS, assert_rel_close, relative_difference

from lowmem_alignprop.models import flow
from lowmem_alignprop.models.sampling import enable_block_checkpointing

RES = FLOW_RESOLUTION
MSL = 16  # max_sequence_length: the tiny tokenizers' length
PROMPTS = ["a photo of a cat", "a red dog"]
# (builder, options, guidance scale, sampling steps)
VARIANTS = {
    "sd3": (build_tiny_sd3_dir, {}, 4.0, 4),
    "sd3_no_t5": (build_tiny_sd3_dir, {"with_t5": False}, 4.0, 4),
    "flux_dev": (build_tiny_flux_dir, {}, 3.5, 4),
    "flux_schnell": (build_tiny_flux_dir, {"schnell": True}, 0.0, 2),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowmodels")
    return {name: build(root / name, **opts) for name, (build, opts, _, _) in VARIANTS.items()}


def _load(model_dirs, name):
    from diffusers import DiffusionPipeline

    # a pipeline saved without T5 loads with it left out explicitly (SD3.5 without T5-XXL)
    missing = {"text_encoder_3": None, "tokenizer_3": None} if name == "sd3_no_t5" else {}
    pipe = DiffusionPipeline.from_pretrained(model_dirs[name], **missing)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.requires_grad_(False)
    return pipe


def _ours(pipe, emb, latents, ids, steps, gs, k):
    lh, lw = flow.latent_size(pipe.vae, RES, RES, flow.family_of(pipe.transformer))
    flow.set_flow_timesteps(pipe.scheduler, pipe.transformer, steps, lh, lw)
    lat = flow.rollout(pipe.transformer, pipe.scheduler, latents, emb, k=k, guidance_scale=gs, img_ids=ids)
    return flow.decode(pipe.vae, lat, height=RES, width=RES)


def _setup(pipe, name, seed=0):
    _, _, gs, steps = VARIANTS[name]
    emb = flow.encode_prompts(pipe, PROMPTS, "cpu", guidance_scale=gs, max_sequence_length=MSL)
    lat, ids = flow.initial_latents(pipe.transformer, pipe.vae, len(PROMPTS), RES, RES,
                                    torch.Generator().manual_seed(seed))
    return emb, lat, ids, gs, steps


def _pipeline_images(pipe, latents, gs, steps):
    return pipe(prompt=PROMPTS, latents=latents.clone(), num_inference_steps=steps, guidance_scale=gs, height=RES,
                width=RES, output_type="pt", max_sequence_length=MSL).images


@pytest.mark.parametrize("name", list(VARIANTS))
def test_rollout_gives_the_pipelines_own_images(model_dirs, name):
    """Same noise, steps and guidance: our schedule (shift / resolution-dependent shift), packing, guidance
    (CFG for SD3, the guidance embedding for FLUX-dev, none for schnell), Euler steps and decode are the
    pipeline's. The window's checkpoints (k=2) change nothing in the forward pass."""
    pipe = _load(model_dirs, name)
    emb, lat, ids, gs, steps = _setup(pipe, name)
    with torch.no_grad():
        theirs = _pipeline_images(pipe, lat, gs, steps)
    ours = _ours(pipe, emb, lat, ids, steps, gs, k=2)
    assert ours.shape == theirs.shape == (2, 3, RES, RES)
    assert_rel_close(ours, theirs, SAME_OPS, f"{name}: rollout vs pipeline")
    # the schedule is the model's: SD3.5 shifts by 3, FLUX-dev by its resolution's mu, schnell not at all
    from diffusers import FlowMatchEulerDiscreteScheduler

    unshifted = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0,
                                                            use_dynamic_shifting=False)
    lh, lw = flow.latent_size(pipe.vae, RES, RES, flow.family_of(pipe.transformer))
    flow.set_flow_timesteps(unshifted, pipe.transformer, steps, lh, lw)
    sig, plain = pipe.scheduler.sigmas[:-1].double(), unshifted.sigmas[:-1].double()
    if name == "flux_schnell":
        assert torch.allclose(sig, plain, rtol=1e-6)
    else:
        assert (sig[1:] > plain[1:] + 1e-3).all(), (sig, plain)


# -------------------------------------------------------------------------------------------------------------
# gradients
# -------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["sd3", "flux_dev"])
def lora_model(request, model_dirs):
    name = request.param
    pipe = _load(model_dirs, name)
    params = flow.add_flow_lora(pipe.transformer, rank=4, alpha=4, seed=0)
    nudge(params)  # lora_B starts at zero
    return name, pipe, params


def _loss_and_grads(pipe, params, emb, lat, ids, steps, gs, k, manual):
    lh, lw = flow.latent_size(pipe.vae, RES, RES, flow.family_of(pipe.transformer))
    sched = pipe.scheduler
    flow.set_flow_timesteps(sched, pipe.transformer, steps, lh, lw)
    if manual:  # plain autograd written out: no-grad steps, detach, then K steps with the whole graph kept
        ts = list(sched.timesteps)
        with torch.no_grad():
            for t in ts[:steps - k]:
                lat = sched.step(flow.guided_velocity(pipe.transformer, lat, t, emb, gs, ids), t, lat,
                                 return_dict=False)[0]
        lat = lat.detach()
        for t in ts[steps - k:]:
            lat = sched.step(flow.guided_velocity(pipe.transformer, lat, t, emb, gs, ids), t, lat,
                             return_dict=False)[0]
    else:
        lat = flow.rollout(pipe.transformer, sched, lat, emb, k=k, guidance_scale=gs, img_ids=ids)
    loss = -flow.decode(pipe.vae, lat, height=RES, width=RES).mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("k", [1, 3])
def test_checkpointed_window_matches_plain_autograd(lora_model, k):
    name, pipe, params = lora_model
    emb, lat, ids, gs, steps = _setup(pipe, name)
    loss, grads = _loss_and_grads(pipe, params, emb, lat, ids, steps, gs, k, manual=False)
    ref_loss, ref = _loss_and_grads(pipe, params, emb, lat, ids, steps, gs, k, manual=True)
    assert_rel_close(loss, ref_loss, SAME_OPS, "loss")
    assert_rel_close(grads, ref, SAME_OPS, "LoRA gradients")  # fails on an all-zero reference
    if k == 3:  # a longer window is another gradient (the K=1 one is not simply repeated)
        _, g1 = _loss_and_grads(pipe, params, emb, lat, ids, steps, gs, 1, manual=False)
        assert relative_difference(g1, grads) > 1e-3


def test_block_checkpointing_gives_the_same_gradient(model_dirs):
    pipe = _load(model_dirs, "flux_dev")
    params = flow.add_flow_lora(pipe.transformer, rank=4, seed=0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, dtype=p.dtype))
    emb, lat, ids, gs, steps = _setup(pipe, "flux_dev")
    _, ref = _loss_and_grads(pipe, params, emb, lat, ids, steps, gs, 2, manual=True)
    enable_block_checkpointing(pipe.transformer)
    assert pipe.transformer.gradient_checkpointing
    _, grads = _loss_and_grads(pipe, params, emb, lat, ids, steps, gs, 2, manual=False)
    assert_rel_close(grads, ref, SAME_OPS, "LoRA gradients with block checkpointing")


class _Perturbed(torch.nn.Module):
    """The transformer plus a zero tensor added to its output at each sampling step: the gradient to that tensor
    is the gradient to the step's velocity. Records whether autograd was on at each call."""

    def __init__(self, transformer, timesteps, scale):
        super().__init__()
        self.module = transformer
        self.index = {round(float(t) / scale, 3): i for i, t in enumerate(timesteps)}
        self.scale = scale
        self.deltas, self.calls = {}, []

    def forward(self, **kw):
        self.calls.append(torch.is_grad_enabled())  # before the call: a checkpoint's recompute stops early
        out = self.module(**kw)[0]
        i = self.index[round(float(kw["timestep"][0]), 3)]
        d = self.deltas.setdefault(i, torch.zeros_like(out, requires_grad=True))
        return (out + d,)


def test_the_window_is_the_last_k_steps(lora_model):
    """T-K no-grad calls then K with autograd, one recompute per window call in backward, and the gradient to
    a step's velocity is zero outside the window and non-zero inside it."""
    name, pipe, params = lora_model
    emb, lat, ids, gs, _ = _setup(pipe, name)
    steps, k = 6, 2
    lh, lw = flow.latent_size(pipe.vae, RES, RES, flow.family_of(pipe.transformer))
    ts = flow.set_flow_timesteps(pipe.scheduler, pipe.transformer, steps, lh, lw)
    wrapped = _Perturbed(pipe.transformer, ts, 1000.0 if name.startswith("flux") else 1.0)
    out = flow.rollout(wrapped, pipe.scheduler, lat, emb, k=k, guidance_scale=gs, img_ids=ids)
    assert wrapped.calls == [False] * (steps - k) + [True] * k
    loss = flow.decode(pipe.vae, out, height=RES, width=RES).mean()
    order = sorted(wrapped.deltas)
    grads = torch.autograd.grad(loss, [wrapped.deltas[i] for i in order] + params, allow_unused=True)[:steps]
    assert len(wrapped.calls) == steps + k  # the backward recomputed each window call once
    norms = [0.0 if g is None else g.norm().item() for g in grads]
    assert norms[:steps - k] == [0.0] * (steps - k), norms
    assert all(n > 0 for n in norms[steps - k:]), norms


@pytest.mark.parametrize("name", ["sd3", "flux_dev"])
def test_k_is_drawn_once_per_rollout(model_dirs, name, monkeypatch):
    pipe = _load(model_dirs, name)
    flow.add_flow_lora(pipe.transformer, rank=2, seed=0)
    emb, _, _, gs, _ = _setup(pipe, name)
    draws = []
    real = flow.draw_window
    monkeypatch.setattr(flow, "draw_window", lambda cfg, rng: draws.append(real(cfg, rng)) or draws[-1])
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    cfg = SimpleNamespace(truncation="uniform", k_min=1, k_max=4)
    rng = random.Random(0)
    try:
        for seed in range(3):
            calls.clear()
            images, k = flow.sample_images(pipe.transformer, pipe.scheduler, pipe.vae, emb, cfg=cfg, rng=rng,
                                           steps=5, height=RES, width=RES, guidance_scale=gs,
                                           generator=torch.Generator().manual_seed(seed))
            assert draws[-1].k == k and len(draws) == seed + 1  # one draw per rollout
            assert calls == [False] * (5 - k) + [True] * k  # and that one K is the window throughout
            assert images.shape == (2, 3, RES, RES) and images.requires_grad
    finally:
        hook.remove()


def test_prompt_set_is_encoded_once_and_encoders_leave(model_dirs, monkeypatch):
    pipe = _load(model_dirs, "sd3")
    calls = []
    hook = pipe.text_encoder_3.register_forward_pre_hook(lambda m, a: calls.append(1))
    moves = []
    place = SimpleNamespace(to_device=lambda name, *m: moves.append(("to", len(m))),
                            offload=lambda name, *m: moves.append(("off", len(m))))
    prompts = [f"a photo of {w}" for w in ("cat", "dog", "sky", "tree")]
    cache = flow.FlowPromptCache(pipe, prompts, "cpu", guidance_scale=4.0, max_sequence_length=MSL, place=place,
                                 chunk=3)
    try:
        a = cache(prompts[:2])
        b = cache(prompts[2:][::-1])
    finally:
        hook.remove()
    assert len(calls) == 2 * 2  # all four prompts in two chunks (+ the negative prompt each), once for all
    assert moves == [("to", 3), ("off", 3)]
    direct = flow.encode_prompts(pipe, prompts[2:][::-1], "cpu", guidance_scale=4.0, max_sequence_length=MSL)
    for field in ("cond", "pooled", "uncond", "uncond_pooled"):
        assert_rel_close(getattr(b, field), getattr(direct, field), SAME_OPS, field)
    assert a.cond.shape == (2, 2 * MSL, 32) and not cache.on_host
    # a set whose embeddings would crowd the device waits in host memory (FLUX's 512 T5 tokens: 4 MiB a prompt)
    from lowmem_alignprop.models import sampling
    monkeypatch.setattr(sampling, "HOST_CACHE_ABOVE", direct.nbytes() - 1)  # two prompts' worth, of four
    big = flow.FlowPromptCache(pipe, prompts, "cpu", guidance_scale=4.0, max_sequence_length=MSL, chunk=3)
    assert_rel_close(big(prompts[2:][::-1]).cond, direct.cond, SAME_OPS, "cond")
    assert big.on_host


@pytest.mark.parametrize("on_cpu", [False, True])
def test_the_trainers_prompt_encoder_drops_the_text_encoders_once_the_set_is_encoded(model_dirs, on_cpu):
    """FlowFamily.prompt_encoder, the trainer's (``final``): after the first batch every text encoder (CLIP-L,
    CLIP-G, T5) is freed, none referenced by the components, the pipeline or the cache (T5-XXL: 9.5 GB of host
    memory), and every prompt of the set still comes from the cache as it was encoded. Another (the planner's,
    which may step again) keeps them."""
    import gc
    import weakref

    from lowmem_alignprop.models.family import family_for
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.settings.config import Config

    cfg = Config(model=str(model_dirs["sd3"]), guidance_scale=4.0, max_sequence_length=MSL, encode_on_cpu=on_cpu)
    comps = load_components(cfg)
    family = family_for(comps)
    pipe = family.make_pipeline(comps)
    prompts = ["a photo of a cat", "a red dog", "the sky"]
    direct = flow.encode_prompts(pipe, prompts, "cpu", guidance_scale=4.0, max_sequence_length=MSL)
    encoders = [weakref.ref(m) for m in comps.text_encoders()]
    assert len(encoders) == 3
    place = SimpleNamespace(to_device=lambda name, *m: None, offload=lambda name, *m: None)
    kept = family.prompt_encoder(pipe, comps, place, torch.device("cpu"), cfg, prompts)  # the planner's
    kept(prompts[:1])
    assert all(r() is not None for r in encoders) and len(comps.text_encoders()) == 3
    embed = family.prompt_encoder(pipe, comps, place, torch.device("cpu"), cfg, prompts, final=True)
    first = embed(prompts[:1])
    gc.collect()
    assert [r() for r in encoders] == [None] * 3 and comps.text_encoders() == ()
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None and pipe.text_encoder_3 is None
    later = embed(prompts[1:])
    for field in ("cond", "pooled", "uncond", "uncond_pooled"):
        both = torch.cat([getattr(first, field), getattr(later, field)])
        assert_rel_close(both, getattr(direct, field), SAME_OPS, field)


# -------------------------------------------------------------------------------------------------------------
# LoRA export and a reward that rises
# -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sd3", "flux_dev"])
def test_lora_round_trip_through_the_diffusers_pipeline(model_dirs, name, tmp_path):
    pipe = _load(model_dirs, name)
    emb, lat, ids, gs, steps = _setup(pipe, name)
    with torch.no_grad():
        base = _ours(pipe, emb, lat, ids, steps, gs, k=0)
    params = flow.add_flow_lora(pipe.transformer, rank=4, alpha=8, seed=0)  # alpha != rank: the scale must travel
    torch.manual_seed(2)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn_like(p))
    with torch.no_grad():
        ours = _ours(pipe, emb, lat, ids, steps, gs, k=0)
    assert relative_difference(ours, base) > 1e-3  # the adapter changes the images
    flow.save_flow_lora(type(pipe), pipe.transformer, tmp_path)
    fresh = _load(model_dirs, name)
    fresh.load_lora_weights(tmp_path)
    with torch.no_grad():
        theirs = _pipeline_images(fresh, lat, gs, steps)
    assert_rel_close(theirs, ours, SAME_OPS, f"{name}: loaded LoRA vs trained")


@pytest.mark.parametrize("name", ["sd3", "flux_dev"])
def test_brightness_rises_over_a_few_steps(model_dirs, name):
    from lowmem_alignprop.rewards import build_reward

    pipe = _load(model_dirs, name)
    reward = build_reward("brightness")
    params = flow.add_flow_lora(pipe.transformer, rank=4, seed=0)
    opt = torch.optim.Adam(params, lr=0.1)
    emb, lat, ids, gs, steps = _setup(pipe, name)

    def score(k):
        return reward(_ours(pipe, emb, lat, ids, steps, gs, k=k), PROMPTS).mean()

    with torch.no_grad():
        before = score(0).item()
    for _ in range(4):
        loss = -score(2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = score(0).item()
    # measured on these tiny models: about +0.015 (SD3) and +0.02 (FLUX) after 4 steps; random weights, a small rise
    assert after > before + 0.005, (before, after)


# -------------------------------------------------------------------------------------------------------------
# shipped architectures
# -------------------------------------------------------------------------------------------------------------

ARCH_FLOW = Path(__file__).resolve().parents[1] / "lowmem_alignprop" / "arch_flow"
# transformer sizes as the models are published (FLUX.1 12B, SD3.5 Large 8.1B, SD3.5 Medium 2.5B); like the
# checkpoints, they count SD3's positional-embedding table (a buffer in diffusers: 226M entries in Medium)
PUBLISHED = {"sd35m": 2.5e9, "sd35l": 8.1e9, "flux": 11.9e9}
T5_XXL_ENCODER = 4.7e9


def _meta_components(root: Path) -> dict:
    """Every model the shipped model_index names, built from its config on the meta device (no memory)."""
    import diffusers
    import transformers

    index = json.loads((root / "model_index.json").read_text())
    built = {}
    for sub, (library, cls_name) in ((k, v) for k, v in index.items() if not k.startswith("_")):
        if library is None or sub.startswith("tokenizer"):
            continue
        assert (root / sub).is_dir(), sub  # every component the index names has its config folder
        if library == "diffusers":
            cls = getattr(diffusers, cls_name)
            config = cls.load_config(root / sub)
            if sub == "scheduler":
                built[sub] = cls.from_config(config)
                continue
            with torch.device("meta"):  # parameters and buffers (SD3's positional table) alike
                built[sub] = cls.from_config(config)
        else:
            config = transformers.AutoConfig.from_pretrained(root / sub)
            with torch.device("meta"):
                built[sub] = getattr(transformers, cls_name)._from_config(config)
            # the checkpoint's T5 has encoder.embed_tokens tied to `shared`: count it once (accelerate's
            # init_empty_weights leaves it untied, and the 4096 x 32128 embedding would count twice)
            built[sub].tie_weights()
    return built


def _size(model) -> int:
    return sum(t.numel() for t in list(model.parameters()) + list(model.buffers()))


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_shipped_architecture_builds_on_meta_with_the_published_sizes(name):
    from diffusers import FlowMatchEulerDiscreteScheduler

    comps = _meta_components(ARCH_FLOW / name)
    for sub, model in comps.items():
        if isinstance(model, torch.nn.Module):
            tensors = list(model.parameters()) + list(model.buffers())
            assert all(t.device.type == "meta" for t in tensors), sub  # nothing materialised
    n = _size(comps["transformer"])
    assert abs(n / PUBLISHED[name] - 1) < 0.03, f"{name}: {n / 1e9:.3f}B"
    t5 = comps["text_encoder_2" if name == "flux" else "text_encoder_3"]
    assert abs(_size(t5) / T5_XXL_ENCODER - 1) < 0.03, f"T5: {_size(t5) / 1e9:.3f}B"
    assert comps["vae"].config.latent_channels == 16
    assert flow.family_of(comps["transformer"]) == ("flux" if name == "flux" else "sd3")
    # the schedule at the native 1024 px: FLUX-dev's resolution-dependent shift reaches its max_shift (4096 image
    # tokens), SD3.5's fixed shift of 3 gives the same first-step sigma at any size
    sched = comps["scheduler"]
    assert isinstance(sched, FlowMatchEulerDiscreteScheduler)
    flow.set_flow_timesteps(sched, comps["transformer"], 28, 128, 128)
    s1 = float(sched.sigmas[1])
    if name == "flux":
        t = 1 - 1 / 28  # the second of linspace(1, 1/28, 28)
        expected = math.exp(1.15) / (math.exp(1.15) + (1 / t - 1))
    else:
        t = float(torch.linspace(1, 1 / 1000, 28, dtype=torch.float64)[1])  # the scheduler's own t grid
        expected = 3 * t / (1 + 2 * t)
    assert abs(s1 - expected) < 1e-4, (s1, expected)


@pytest.mark.parametrize("family, dev, limit, want", [("flux", True, 512, 512), ("flux", False, 512, 256),
                                                      ("sd3", False, 512, 256), ("flux", True, 77, 77)])
def test_t5_tokens_per_prompt_default_to_the_pipelines(family, dev, limit, want):
    """max_sequence_length=0: FLUX.1-dev's pipeline reads 512 T5 tokens, schnell's and SD3.5's 256, never more than
    the T5 tokenizer does (the tiny models' tokenizers read 16, which hides the defaults from the other tests); a
    value set is used as it is."""
    from lowmem_alignprop.models.family import FlowFamily

    t5 = SimpleNamespace(model_max_length=limit)
    comps = SimpleNamespace(family=family, unet=SimpleNamespace(config=SimpleNamespace(guidance_embeds=dev)),
                            tokenizer_2=t5 if family == "flux" else None, tokenizer_3=t5 if family == "sd3" else None)
    fam = FlowFamily(comps)
    assert fam.max_sequence_length(SimpleNamespace(max_sequence_length=0)) == want
    assert fam.max_sequence_length(SimpleNamespace(max_sequence_length=128)) == 128


# -------------------------------------------------------------------------------------------------------------
# the 16-channel VAE under VAE checkpointing and tiled decode
# -------------------------------------------------------------------------------------------------------------

def _decode_grad(vae, lat, **kw):
    lat = lat.detach().requires_grad_(True)
    images = flow.decode(vae, lat, height=RES, width=RES, **kw)
    ramp = torch.linspace(0, 1, images.shape[-1])  # a loss that weighs pixels differently, so seams matter
    (grad,) = torch.autograd.grad((images * ramp).square().mean(), lat)
    return images.detach(), grad


@pytest.mark.parametrize("name", ["sd3", "flux_dev"])
def test_the_16_channel_vae_decodes_with_gradients_under_vae_checkpointing_and_tiles(model_dirs, name):
    """Issue 18: the SD3/FLUX VAEs (16 latent channels, a scaling and a shift factor; FLUX's packed tokens) decode
    with gradients under vae_checkpointing=blocks|resnets and tiled_decode as the UNet models' do: checkpointing
    gives the same images and latent gradient as the plain decode, and recomputes (each resnet runs once more in
    backward); tiled decode runs the decoder on 8x8-cell tiles (9 per image of 16x16 cells at overlap 2), each tile
    recomputed once in backward, with the images and gradient of the same tiles decoded without checkpoints."""
    import copy

    from lowmem_alignprop.memory.tiling import tile_starts, tiled_decode
    from lowmem_alignprop.models.sampling import enable_vae_checkpointing

    pipe = _load(model_dirs, name)
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor
    lat, _ = flow.initial_latents(pipe.transformer, pipe.vae, 2, RES, RES, torch.Generator().manual_seed(3))
    ref_images, ref_grad = _decode_grad(pipe.vae, lat)
    assert ref_grad.abs().sum() > 0
    for granularity in ("blocks", "resnets"):
        vae = copy.deepcopy(pipe.vae)
        enable_vae_checkpointing(vae, granularity)
        calls = []
        # a layer inside the resnet: the resnets wrapper checkpoints the module's forward, below its own hooks
        vae.decoder.up_blocks[-1].resnets[0].conv1.register_forward_pre_hook(lambda m, a: calls.append(1))
        images, grad = _decode_grad(vae, lat)
        assert len(calls) == 2, (granularity, calls)  # the forward, then its recompute in backward
        assert_rel_close(images, ref_images, SAME_OPS, f"{name}: images, vae_checkpointing={granularity}")
        assert_rel_close(grad, ref_grad, SAME_OPS, f"{name}: latent gradient, vae_checkpointing={granularity}")
    tile, overlap = 8, 2
    side = RES // 2  # the tiny VAE halves: 16 latent cells a side
    n_tiles = len(tile_starts(side, tile, overlap)) ** 2
    assert n_tiles == 9
    shapes = []
    hook = pipe.vae.decoder.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
    try:
        images, grad = _decode_grad(pipe.vae, lat, tiled=True, tile_size=tile, tile_overlap=overlap)
    finally:
        hook.remove()
    assert shapes == [(1, 16, tile, tile)] * (2 * 2 * n_tiles), shapes  # 2 images x 9 tiles, and each recomputed
    assert images.shape == ref_images.shape and 0 <= images.min() and images.max() <= 1
    # the same tiles decoded without checkpoints (sampling.decode's scale and shift written out)
    plain_lat = lat.detach().requires_grad_(True)
    z = flow.unpack(plain_lat, RES, RES, pipe.vae) if plain_lat.dim() == 3 else plain_lat
    x = tiled_decode(pipe.vae, z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor, tile_size=tile,
                     overlap=overlap, checkpoint_tiles=False)
    plain = (x.float() / 2 + 0.5).clamp(0, 1)
    (plain_grad,) = torch.autograd.grad((plain * torch.linspace(0, 1, RES)).square().mean(), plain_lat)
    assert_rel_close(images, plain.detach(), SAME_OPS, f"{name}: tiled images")
    assert_rel_close(grad, plain_grad, SAME_OPS, f"{name}: tiled latent gradient")
    assert relative_difference(images, ref_images) > 1e-4  # the tiles are not the whole decode: the path ran

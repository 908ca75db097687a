"""Truncated backprop: the gradient window, K drawn once per rollout, and exactness against plain autograd."""

import logging
import random

import pytest
import torch

from loras import tiny_unet_with_lora
from numerics import REORDERED, SAME_OPS, assert_rel_close

from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.models.loading import load_components
from lowmem_alignprop.models.sampling import PromptEmbeds, decode, draw_k, guided_eps, rollout


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    m = tiny_unet_with_lora(tiny_dir)
    return m.comps, m.params, m.emb


def _grads(comps, params, emb, k, steps, checkpoint_calls, seed=3, rescale=0.0):
    sched = comps.scheduler
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(2, 4, 32, 32, generator=g)
    lat = rollout(comps.unet, sched, lat, emb, k=k, guidance_scale=4.0, eta=1.0, generator=g,
                  checkpoint_calls=checkpoint_calls, guidance_rescale=rescale)
    loss = -decode(comps.vae, lat).mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]


def _reference_grads(comps, params, emb, k, steps, seed=3, rescale=0.0):
    """Plain autograd, written out by hand: no-grad steps, detach, then K steps with the graph kept whole."""
    sched = comps.scheduler
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(2, 4, 32, 32, generator=g)
    ts = list(sched.timesteps)

    def eps(lat, t):
        return guided_eps(comps.unet, lat, t, emb, 4.0, guidance_rescale=rescale)

    with torch.no_grad():
        for t in ts[: steps - k]:
            lat = sched.step(eps(lat, t), t, lat, eta=1.0, generator=g).prev_sample
    lat = lat.detach()
    for t in ts[steps - k:]:
        lat = sched.step(eps(lat, t), t, lat, eta=1.0, generator=g).prev_sample
    loss = -decode(comps.vae, lat).mean()
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("k", [1, 3])
def test_checkpointed_window_matches_plain_autograd(tiny, k):
    comps, params, emb = tiny
    loss, grads = _grads(comps, params, emb, k=k, steps=5, checkpoint_calls=True)
    ref_loss, ref = _reference_grads(comps, params, emb, k=k, steps=5)
    assert_rel_close(loss, ref_loss, SAME_OPS, "loss")  # the same operations; a recompute is no approximation
    assert_rel_close(grads, ref, SAME_OPS, "LoRA gradients")  # (fails on a zero reference: it must be non-zero)


def test_guidance_rescale_trains_through_the_window_as_plain_autograd(tiny):
    """--set guidance_rescale: the rescaled prediction (a per-sample standard deviation of each call's output) inside
    the checkpointed window gives plain autograd's loss and gradients, and other ones than without it."""
    comps, params, emb = tiny
    loss, grads = _grads(comps, params, emb, k=2, steps=4, checkpoint_calls=True, rescale=0.7)
    ref_loss, ref = _reference_grads(comps, params, emb, k=2, steps=4, rescale=0.7)
    assert_rel_close(loss, ref_loss, SAME_OPS, "loss")
    assert_rel_close(grads, ref, SAME_OPS, "LoRA gradients")
    _, plain = _grads(comps, params, emb, k=2, steps=4, checkpoint_calls=True)
    diff = sum((a - b).abs().sum() for a, b in zip(grads, plain))
    assert diff > 1e-3 * sum(a.abs().sum() for a in plain)  # the rescale is in the gradient, not only the images


def test_k_changes_the_gradient_and_k0_gives_none(tiny):
    comps, params, emb = tiny
    _, g1 = _grads(comps, params, emb, k=1, steps=5, checkpoint_calls=True)
    _, g3 = _grads(comps, params, emb, k=3, steps=5, checkpoint_calls=True)
    diff = sum((a - b).abs().sum() for a, b in zip(g1, g3))
    assert diff > 1e-6 * sum(a.abs().sum() for a in g1)
    sched = comps.scheduler
    sched.set_timesteps(5)
    lat = rollout(comps.unet, sched, torch.randn(2, 4, 32, 32), emb, k=0, guidance_scale=4.0, eta=1.0, generator=None)
    assert not lat.requires_grad


def test_grad_window_is_the_contiguous_last_k_steps(tiny):
    """Record, per UNet forward during sampling, whether autograd was on: T-K off, then K on, in one block."""
    comps, params, emb = tiny
    calls = []
    hook = comps.unet.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    try:
        comps.scheduler.set_timesteps(8)
        lat = rollout(comps.unet, comps.scheduler, torch.randn(2, 4, 32, 32), emb, k=3, guidance_scale=4.0,
                      eta=1.0, generator=None)
        assert calls == [False] * 5 + [True] * 3
        calls.clear()
        lat.mean().backward()  # the backward recomputes each checkpointed call exactly once
        assert len(calls) == 3
    finally:
        hook.remove()
        for p in params:
            p.grad = None


@pytest.mark.parametrize("k", [1, 2])
def test_the_window_does_not_reuse_autocasts_made_without_grad(k, monkeypatch):
    """Under autocast (fp16/bf16 training) the no-grad steps cast the trainable weights first; torch up to 2.10 cached
    those casts and the window reused them without a graph (the loss had no gradient: pytorch issue 112583). The
    chain clears autocast's cache where the window starts: after every no-grad call, before every window call."""
    from lowmem_alignprop.models.sampling import truncated_chain

    events = []
    clear = torch.clear_autocast_cache
    monkeypatch.setattr(torch, "clear_autocast_cache", lambda: (events.append("clear"), clear())[1])
    layer = torch.nn.Linear(4, 4)  # trainable: autocast caches its bf16 cast

    def predict(model, x, t):
        events.append("grad" if torch.is_grad_enabled() else "nograd")
        return model(x)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = truncated_chain(list(range(4)), torch.randn(2, 4), k=k, model=layer, grad_model=layer, predict=predict,
                              base_predict=predict, step=lambda eps, t, x: x + 0.1 * eps.float())
        assert events == ["nograd"] * (4 - k) + ["clear"] + ["grad"] * k  # (leaving autocast clears it again)
    out.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.norm() > 0


def test_k_drawn_once_per_rollout_uniform_range():
    cfg = Config(truncation="uniform", k_min=2, k_max=5, sample_steps=10).validate()
    rng = random.Random(0)
    draws = [draw_k(cfg, rng) for _ in range(400)]
    assert set(draws) == {2, 3, 4, 5}
    fixed = Config(k=3, sample_steps=10).validate()
    assert {draw_k(fixed, rng) for _ in range(10)} == {3}


def test_k_larger_than_steps_is_a_clear_error(tiny):
    with pytest.raises(UserError, match="k=7 is larger than sample_steps=5"):
        Config(k=7, sample_steps=5).validate()
    with pytest.raises(UserError, match="k_max=9 is larger than sample_steps=5"):
        Config(truncation="uniform", k_min=1, k_max=9, sample_steps=5).validate()
    comps, _, emb = tiny
    comps.scheduler.set_timesteps(5)
    with pytest.raises(ValueError, match="K=6"):
        rollout(comps.unet, comps.scheduler, torch.randn(2, 4, 32, 32), emb, k=6, guidance_scale=1.0, eta=0.0,
                generator=None)


def test_fewer_than_50_sampler_steps_still_gives_gradient(tiny):
    """TRL's default truncation index silently gave no gradient below 50 steps; ours must not."""
    comps, params, emb = tiny
    _, grads = _grads(comps, params, emb, k=1, steps=2, checkpoint_calls=True)
    assert sum(g.abs().sum() for g in grads) > 0


# reference DDIM settings per family: the model's own schedule and prediction type, x0 never clamped in latent
# space, the last step to alphas_cumprod[0]
FAMILIES = {"sd15": "epsilon", "sd21": "v_prediction", "sdxl": "epsilon"}


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_ddim_scheduler_of_every_family_never_clamps_x0(arch):
    import diffusers

    from lowmem_alignprop.models.arch import _SHIPPED_DIR as ARCH_ROOT
    from lowmem_alignprop.models.sampling import ddim_scheduler

    root = ARCH_ROOT / arch
    cls = getattr(diffusers, diffusers.DiffusionPipeline.load_config(root)["scheduler"][1])
    shipped = cls.load_config(root, subfolder="scheduler")
    sched = ddim_scheduler(shipped)
    c = sched.config
    assert (c.clip_sample, c.set_alpha_to_one, c.prediction_type) == (False, False, FAMILIES[arch])
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "steps_offset", "timestep_spacing"):
        assert c[key] == shipped[key], key  # the model's own noise schedule
    assert sched.final_alpha_cumprod == sched.alphas_cumprod[0]
    # a latent entry of 3 (3 sigma of a unit-variance latent) survives a step; a clamp would pull x0 to 1
    sched.set_timesteps(10)
    t = sched.timesteps[-1]
    sample, model_out = torch.full((1, 4, 2, 2), 3.0), torch.zeros(1, 4, 2, 2)
    expected = sample if c.prediction_type == "epsilon" else None
    out = sched.step(model_out, t, sample, eta=0.0).pred_original_sample
    if expected is not None:  # eps = 0: x0 = x_t / sqrt(alpha_t), above 3
        assert out.min() > 3.0
    else:  # v = 0: x0 = sqrt(alpha_t) x_t
        assert torch.allclose(out, sched.alphas_cumprod[t].sqrt() * sample)


def test_a_model_whose_scheduler_config_omits_the_ddim_keys_samples_unclamped(tiny_dir, tmp_path):
    """SDXL's stock scheduler is Euler, whose config has no clip_sample: DDIM's default (True) must not leak in."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    cfg_file = model / "scheduler" / "scheduler_config.json"
    sched = json.loads(cfg_file.read_text())
    sched = {k: v for k, v in sched.items() if k not in ("clip_sample", "set_alpha_to_one")}
    sched["_class_name"] = "EulerDiscreteScheduler"
    cfg_file.write_text(json.dumps(sched))
    index = json.loads((model / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (model / "model_index.json").write_text(json.dumps(index))
    comps = load_components(Config(model=str(model)))
    assert type(comps.scheduler).__name__ == "DDIMScheduler"
    assert comps.scheduler.config.clip_sample is False and comps.scheduler.config.set_alpha_to_one is False


def test_zero_terminal_snr_on_a_noise_predicting_model_is_refused_at_load(tiny_dir):
    """A model whose files say epsilon with zero_terminal_snr (Config.validate cannot tell before loading): one line;
    with v-prediction the schedule is rescaled and sampled from its pure-noise timestep."""
    with pytest.raises(UserError, match="zero_terminal_snr: at zero SNR the last timestep's latent is all noise"):
        load_components(Config(model=str(tiny_dir), zero_terminal_snr=True, eta=0.0))  # (the flag's: said so)
    with pytest.raises(UserError, match="zero_terminal_snr: at zero SNR"):  # ... and before loading, as plan is
        Config(model=str(tiny_dir), zero_terminal_snr=True, eta=0.0).validate()
    sched = load_components(Config(model=str(tiny_dir), zero_terminal_snr=True, prediction_type="v_prediction",
                                   eta=0.0)).scheduler
    sched.set_timesteps(3)
    assert sched.config.rescale_betas_zero_snr and sched.alphas_cumprod[-1] == 0 and sched.timesteps[0] == 999


def test_a_folders_own_zero_snr_schedule_is_refused_with_eta_1_only_from_its_pure_noise_step(tiny_dir, tmp_path):
    """A folder whose scheduler says zero terminal SNR: kept as it says; DDIM's eta 1 is refused only where the
    sampling starts at the pure-noise timestep (trailing spacing; leading never reaches it, and is no NaN)."""
    import json
    import shutil

    for spacing, refused in (("leading", False), ("trailing", True)):
        model = tmp_path / spacing
        shutil.copytree(tiny_dir, model)
        file = model / "scheduler" / "scheduler_config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), "rescale_betas_zero_snr": True,
                                    "prediction_type": "v_prediction", "timestep_spacing": spacing}))
        if refused:
            with pytest.raises(UserError, match=f"{model}: zero terminal SNR with eta=1 \\(the default\\)"):
                load_components(Config(model=str(model)))
        else:
            sched = load_components(Config(model=str(model))).scheduler
            assert sched.config.rescale_betas_zero_snr and sched.config.timestep_spacing == "leading"


def test_plan_refuses_what_training_refuses_of_a_models_own_zero_snr_schedule(tiny_dir, tmp_path, capsys,
                                                                               monkeypatch):
    """A folder's own zero-terminal-SNR schedule at eta 1, or predicting epsilon, and the flag on a model whose files
    say epsilon where no folder tells it (the tiny model, an architecture's name): plan (and plan --fastest) said
    FITS and training refused. Both now refuse with the same line before any weight loads; a folder's own schedule
    is not called a flag to drop."""
    import json
    import shutil

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.measure import fastest
    from lowmem_alignprop.models.loading import check_before_load

    monkeypatch.setattr(fastest, "_Search", lambda *a, **k: pytest.fail("--fastest searched before refusing"))

    def refusals(*args: str) -> set[str]:
        lines = set()
        for command in (["plan"], ["plan", "--fastest", "--jobs", "1"], ["--output-dir", str(tmp_path / "run")]):
            assert main([*command, "--profile", "cpu", *args]) == 2
            lines |= {x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")}
        assert not (tmp_path / "run").exists()  # (train: refused before its folder was made)
        return lines

    for predicts in ("v_prediction", "epsilon"):
        model = tmp_path / predicts
        shutil.copytree(tiny_dir, model)
        file = model / "scheduler" / "scheduler_config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), "rescale_betas_zero_snr": True,
                                    "prediction_type": predicts, "timestep_spacing": "trailing"}))
    assert refusals("--model", str(tmp_path / "v_prediction"), "--set", "eta=1") == {
        f"error: {tmp_path / 'v_prediction'}: zero terminal SNR with eta=1 (the default): DDIM's step from the "
        "pure-noise timestep then has no deterministic part left, and diffusers' step turns it into NaN: use --set "
        "eta=0 (or any value below 1)"}
    assert refusals("--model", str(tmp_path / "epsilon"), "--set", "eta=0") == {
        f"error: {tmp_path / 'epsilon'}'s files give it a zero terminal SNR noise schedule, and it predicts noise "
        "(epsilon): at zero SNR the last timestep's latent is all noise, which a noise-predicting UNet cannot "
        "denoise: it is for v-prediction models; add --set prediction_type=v_prediction"}
    for model in ("tiny", "sd15"):  # (no folder tells Config.validate what these predict)
        assert refusals("--model", model, "--set", "zero_terminal_snr=true", "--set", "eta=0") == {
            "error: zero_terminal_snr: at zero SNR the last timestep's latent is all noise, which a noise-predicting "
            "(epsilon) UNet cannot denoise: it is for v-prediction models; add --set prediction_type=v_prediction or "
            "drop zero_terminal_snr"}
    check_before_load(Config(model=str(tmp_path / "v_prediction"), eta=0.0))  # what trains is not refused
    check_before_load(Config(model="sd15", zero_terminal_snr=True, prediction_type="v_prediction", eta=0.0))
    # what plan shows of it: the sampler as the files and flags resolve it (config.yaml keeps the flags as given)
    for args, line in (([], "  sampler: DDIM at eta 1, epsilon (noise) prediction"),
                       (["--model", str(tmp_path / "v_prediction"), "--set", "eta=0", "--set", "guidance_rescale=0.7"],
                        "  sampler: DDIM at eta 0, v-prediction, zero terminal SNR, guidance_rescale 0.7"),
                       (["--set", "prediction_type=v_prediction"],
                        "  sampler: DDIM at eta 1, v-prediction")):
        assert main(["plan", "--profile", "cpu", *args]) == 0
        assert line in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("sampler,said", [("LCMScheduler", True), ("TCDScheduler", True),
                                          ("EulerDiscreteScheduler", False), ("PNDMScheduler", False)])
def test_a_consistency_models_own_sampler_replaced_by_ddim_is_said(sampler, said, tiny_dir, tmp_path, caplog):
    """A model distilled for LCM or TCD sampling (LCM-LoRA fused, DMD2, Hyper-SD) renders blurred under DDIM at few
    steps: the load says that DDIM replaces its sampler. The usual samplers (whose images DDIM matches) say nothing."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    cfg_file = model / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "_class_name": sampler}))
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", sampler]}))
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        comps = load_components(Config(model=str(model)))
    assert type(comps.scheduler).__name__ == "DDIMScheduler"
    assert (f"ships {sampler}, a consistency model's few-step sampler: AlignProp samples and trains with DDIM"
            in caplog.text) == said, caplog.text


def test_a_few_step_models_trailing_timesteps_are_kept_and_one_step_is_its_x0(tiny_dir, tmp_path):
    """SD-Turbo and SDXL-Turbo ship an Euler ancestral scheduler with timestep_spacing "trailing": DDIM keeps it, so
    sample_steps=1 denoises from t=999 (pure noise; "leading", SD1.5's spacing, would start at t=1), and 4 steps are
    999, 749, 499, 249. One DDIM step with eta 0 is the model's x0 prediction at t=999, moved to the last step's noise
    level (alphas_cumprod[0], set_alpha_to_one=False): exactly, in the scheduler's own formula."""
    import json
    import shutil

    model = tmp_path / "turbo"
    shutil.copytree(tiny_dir, model)
    cfg_file = model / "scheduler" / "scheduler_config.json"
    sched = {k: v for k, v in json.loads(cfg_file.read_text()).items() if k not in ("clip_sample", "set_alpha_to_one")}
    cfg_file.write_text(json.dumps({**sched, "_class_name": "EulerAncestralDiscreteScheduler",
                                    "timestep_spacing": "trailing"}))
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers",
                                                                             "EulerAncestralDiscreteScheduler"]}))
    comps = load_components(Config(model=str(model)))
    s = comps.scheduler
    assert type(s).__name__ == "DDIMScheduler" and s.config.timestep_spacing == "trailing"
    s.set_timesteps(4)
    assert s.timesteps.tolist() == [999, 749, 499, 249]
    s.set_timesteps(1)
    assert s.timesteps.tolist() == [999]
    emb = PromptEmbeds(torch.randn(1, 16, 32), torch.randn(1, 16, 32))
    lat = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = rollout(comps.unet, s, lat, emb, k=0, guidance_scale=1.0, eta=0.0, generator=None)
        eps = comps.unet(lat, 999, encoder_hidden_states=emb.cond).sample
    a, a0 = s.alphas_cumprod[999], s.alphas_cumprod[0]
    x0 = (lat - (1 - a).sqrt() * eps) / a.sqrt()
    assert_rel_close(got, a0.sqrt() * x0 + (1 - a0).sqrt() * eps, REORDERED, "one trailing DDIM step")


# -- truncation=per_step: the official AlignProp code's (and TRL's) rule -------------------------------------------

def _per_step_window(steps: int, seed: int):
    """A per_step window of a 0..steps range with both kinds of step inside it (a detached one between grad ones)."""
    from lowmem_alignprop.models.sampling import draw_window

    cfg = Config(truncation="per_step", k_min=0, k_max=steps, sample_steps=steps).validate()
    rng = random.Random(seed)
    while True:
        state = rng.getstate()
        w = draw_window(cfg, rng)
        if w.detached and w.k >= 3:
            return cfg, w, state


def test_per_step_gradient_is_the_official_loops(tiny):
    """The official code's loop (config/align_prop.py's truncated_backprop_rand, TRL's AlignPropTrainer alike): every
    step draws r ~ U{0..T}, and its noise prediction is detached when the step's index is below r; the latent is never
    detached, so the gradient also runs along the latent's own path through the detached steps. Written out by hand
    with the same draws, it gives our loss and LoRA gradient: steps before the window under no_grad, a detached step
    predicted without a graph, each grad call one checkpoint."""
    from lowmem_alignprop.models.sampling import draw_window

    comps, params, emb = tiny
    steps = 6
    cfg, w, state = _per_step_window(steps, seed=1)
    rng = random.Random()
    rng.setstate(state)
    r = [steps - rng.randint(cfg.k_min, cfg.k_max) for _ in range(steps)]  # the same draws, as the official r
    rng.setstate(state)
    assert draw_window(cfg, rng) == w
    sched = comps.scheduler

    def start():
        sched.set_timesteps(steps)
        g = torch.Generator().manual_seed(3)
        return torch.randn(2, 4, 32, 32, generator=g), g

    lat, g = start()
    for i, t in enumerate(list(sched.timesteps)):  # the official loop, the graph kept whole
        eps = guided_eps(comps.unet, lat, t, emb, 4.0)
        if i < r[i]:
            eps = eps.detach()
        lat = sched.step(eps, t, lat, eta=1.0, generator=g).prev_sample
    ref_loss = -decode(comps.vae, lat).mean()
    ref = torch.autograd.grad(ref_loss, params)
    lat, g = start()
    lat = rollout(comps.unet, sched, lat, emb, k=w.k, guidance_scale=4.0, eta=1.0, generator=g, detached=w.detached)
    loss = -decode(comps.vae, lat).mean()
    grads = torch.autograd.grad(loss, params)
    assert_rel_close(loss.detach(), ref_loss.detach(), SAME_OPS, "loss")
    assert_rel_close(grads, ref, SAME_OPS, "LoRA gradients (per_step)")


def test_per_step_calls_with_gradient_are_the_windows_and_backward_recomputes_each_once(tiny):
    comps, params, emb = tiny
    steps = 8
    _, w, _ = _per_step_window(steps, seed=2)
    calls = []
    hook = comps.unet.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    try:
        comps.scheduler.set_timesteps(steps)
        lat = rollout(comps.unet, comps.scheduler, torch.randn(2, 4, 32, 32), emb, k=w.k, guidance_scale=4.0,
                      eta=1.0, generator=None, detached=w.detached)
        assert calls == [False] * (steps - w.k) + [i not in w.detached for i in range(w.k)], (w, calls)
        calls.clear()
        lat.mean().backward()
        assert len(calls) == w.calls
    finally:
        hook.remove()
        for p in params:
            p.grad = None


def test_per_step_draws_each_step_alone_and_the_planner_counts_their_mean():
    """Step d from the end predicts with gradient with chance P(K >= d), K ~ U{k_min..k_max}; the planner's time
    model (step_time.mean_k) counts their mean. 4000 seeded draws: each frequency within 5 standard errors."""
    from lowmem_alignprop.measure.step_time import mean_k
    from lowmem_alignprop.models.sampling import draw_window

    cfg = Config(truncation="per_step", k_min=1, k_max=6, sample_steps=8).validate()
    rng, n = random.Random(0), 4000
    hits = [0] * 8
    calls = 0
    for _ in range(n):
        w = draw_window(cfg, rng)
        calls += w.calls
        for i in range(w.k):
            if i not in w.detached:
                hits[w.k - i - 1] += 1  # the window's step i is w.k - i from the end
    expect = [(6 - max(1, d) + 1) / 6 if d <= 6 else 0.0 for d in range(1, 9)]
    for d, (h, p) in enumerate(zip(hits, expect), start=1):
        assert abs(h / n - p) <= 5 * (p * (1 - p) / n) ** 0.5 + 1e-12, (d, h / n, p)
    assert mean_k(cfg) == pytest.approx(sum(expect), rel=1e-12)
    assert abs(calls / n - mean_k(cfg)) <= 5 * (8 / 4 / n) ** 0.5  # a sum of 8 coin flips: variance <= 8/4
    # k_min=0: a draw with no step of gradient (at U{0..1} half of them: only the last step can, with chance 1/2)
    # trained nothing and stopped the run, the same again on resume: it is drawn again instead
    tight = Config(truncation="per_step", k_min=0, k_max=1, sample_steps=4).validate()
    windows = [draw_window(tight, rng) for _ in range(200)]
    assert {(w.k, w.calls) for w in windows} == {(1, 1)} and mean_k(tight) == 1.0


def test_per_step_allows_k_min_0_and_checks_its_range():
    assert Config(truncation="per_step", k_min=0, k_max=50).validate().window_bounds() == (0, 50)
    with pytest.raises(UserError, match="k_min must be at least 1"):
        Config(truncation="uniform", k_min=0, k_max=50).validate()
    with pytest.raises(UserError, match="k_min must be 0 or more"):
        Config(truncation="per_step", k_min=-1, k_max=50).validate()
    with pytest.raises(UserError, match="k_max=9 is larger than sample_steps=5"):
        Config(truncation="per_step", k_min=0, k_max=9, sample_steps=5).validate()


class _EchoUNet(torch.nn.Module):
    """A stand-in UNet whose output is its text conditioning's mean (plus 10x the pooled embedding's, SDXL)
    broadcast over the latent: each classifier-free-guidance branch's prediction is a number the test knows."""
    dtype = torch.float32

    def forward(self, x, t, encoder_hidden_states, added_cond_kwargs=None):
        out = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        if added_cond_kwargs is not None:
            out = out + 10 * added_cond_kwargs["text_embeds"].mean(dim=1).view(-1, 1, 1, 1)
        return type("Out", (), {"sample": x * 0 + out})()


@pytest.mark.parametrize("sdxl", [False, True])
def test_guidance_is_uncond_plus_scale_times_cond_minus_uncond(sdxl):
    """eps = eps_u + s (eps_c - eps_u): the branches in their order, the scale applied; SDXL's pooled embeddings
    follow their branch (a swap in any of them samples other images with no error)."""
    x = torch.zeros(2, 4, 3, 3)
    cond, uncond = torch.full((2, 5, 8), 2.0), torch.full((2, 5, 8), 0.5)
    pooled = dict(pooled=torch.full((2, 6), 0.3), uncond_pooled=torch.full((2, 6), 0.1),
                  time_ids=torch.zeros(2, 6)) if sdxl else {}
    emb = PromptEmbeds(cond, uncond, **pooled)
    eps_c, eps_u = (2.0 + 3.0, 0.5 + 1.0) if sdxl else (2.0, 0.5)
    out = guided_eps(_EchoUNet(), x, torch.tensor(10), emb, 3.0)
    assert torch.allclose(out, torch.full_like(x, eps_u + 3.0 * (eps_c - eps_u)))  # 6.5 (SD) / 12.0 (SDXL)
    no_cfg = guided_eps(_EchoUNet(), x, torch.tensor(10), emb, 1.0)
    assert torch.allclose(no_cfg, torch.full_like(x, eps_c))  # scale 1: the prompt's branch alone


class _ScalingUNet(torch.nn.Module):
    """A stand-in UNet whose output is its input latent times its text conditioning's mean: each branch's prediction
    is a known multiple of one latent, so their standard deviations are known multiples of the latent's."""
    dtype = torch.float32

    def forward(self, x, t, encoder_hidden_states, added_cond_kwargs=None):
        return type("Out", (), {"sample": x * encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)})()


@pytest.mark.parametrize(("rescale", "factor"), [(0.0, 5.0), (1.0, 2.0), (0.7, 2.9)])
def test_guidance_rescale_mixes_in_the_guided_prediction_at_the_conditional_ones_std(rescale, factor):
    """Lin et al. 2023 (diffusers' guidance_rescale): the guided prediction g = u + s (c - u) rescaled by
    std(c) / std(g) per sample, mixed in by the factor. Branches x*2 and x*0.5 at scale 3: g = 5x, rescaled 2x;
    0.7 of 2x and 0.3 of 5x is 2.9x."""
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    emb = PromptEmbeds(torch.full((2, 5, 8), 2.0), torch.full((2, 5, 8), 0.5))
    out = guided_eps(_ScalingUNet(), x, torch.tensor(10), emb, 3.0, guidance_rescale=rescale)
    assert_rel_close(out, factor * x, SAME_OPS, "guided prediction")


class _IdentityVAE:
    """decode(z) = z's first 3 channels: what decode() does around the VAE is read off the pixels."""
    dtype = torch.float32

    def __init__(self, scaling_factor, shift_factor=None):
        self.config = type("Config", (), {"scaling_factor": scaling_factor, "shift_factor": shift_factor})()
        self.calls = []

    def decode(self, z):
        self.calls.append(z.shape[0])
        return type("Out", (), {"sample": z[:, :3]})()


@pytest.mark.parametrize("shift", [None, 0.1])
def test_decode_unscales_and_shifts_the_latents_and_maps_to_0_1(shift):
    """x = VAE(latents / scaling_factor + shift_factor) / 2 + 0.5, clamped to [0, 1] (SD: no shift; SD3/FLUX'
    VAEs have one); sliced decode (one image at a time) gives the same pixels as the batch."""
    lat = torch.tensor([0.2, -0.3, 1.0, -1.0]).view(4, 1, 1, 1).expand(4, 4, 2, 2).clone()
    vae = _IdentityVAE(0.5, shift)
    z = lat / 0.5 + (shift or 0.0)
    want = (z[:, :3] / 2 + 0.5).clamp(0, 1)
    assert want[0, 0, 0, 0].item() == pytest.approx(0.7 + (shift or 0) / 2)  # (0.4 + shift) / 2 + 0.5
    assert want[2].max() == 1 and want[3].min() == 0  # the clamp bites: 2.x / 2 + 0.5 > 1
    assert torch.allclose(decode(vae, lat), want)
    sliced = _IdentityVAE(0.5, shift)
    assert torch.allclose(decode(sliced, lat, sliced=True), want) and sliced.calls == [1, 1, 1, 1]


def test_lv_draws_keep_the_trajectorys_own_last_step_and_its_gradient():
    """DRaFT-LV's first draw is the trajectory's own x0, unchanged and with its gradient (a detach there would
    train the extra draws only); the extra draws start from x0 without its gradient (re-noised from a constant:
    without the detach their loss flowed back into the trajectory's window too)."""
    from diffusers import DDIMScheduler

    from lowmem_alignprop.models.sampling import ddim_scheduler, last_step_draws

    sched = ddim_scheduler(DDIMScheduler().config)
    sched.set_timesteps(4)
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    emb = PromptEmbeds(torch.ones(2, 5, 8), torch.zeros(2, 5, 8))
    out = last_step_draws(_EchoUNet(), sched, x0, emb, 3, guidance_scale=1.0, eta=0.0,
                          generator=torch.Generator().manual_seed(1), call=lambda f, *a: f(*a))
    assert out.shape == (6, 4, 3, 3) and torch.equal(out[:2], x0)
    (grad,) = torch.autograd.grad(out[:2].sum(), x0, retain_graph=True)
    assert torch.equal(grad, torch.ones_like(x0))
    (extra,) = torch.autograd.grad(out[2:].sum(), x0)
    assert torch.equal(extra, torch.zeros_like(x0))


def test_lv_draws_sample_their_extra_last_steps_with_the_guidance_rescale():
    """DRaFT-LV's extra draws are the run's sampler too: with guidance_rescale=1 their prediction is the conditional
    branch's scale (2x the input with _ScalingUNet's branches, not the guided 5x). Trailing timesteps: the last step
    is t=249 (at t=0 DDIM's step returns its input whatever the prediction)."""
    from diffusers import DDIMScheduler

    from lowmem_alignprop.models.sampling import ddim_scheduler, last_step_draws

    sched = ddim_scheduler(DDIMScheduler(timestep_spacing="trailing").config)
    sched.set_timesteps(4)
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    emb = PromptEmbeds(torch.full((2, 5, 8), 2.0), torch.full((2, 5, 8), 0.5))

    def draws(rescale):
        return last_step_draws(_ScalingUNet(), sched, x0, emb, 2, guidance_scale=3.0, eta=0.0,
                               generator=torch.Generator().manual_seed(1), call=lambda f, *a: f(*a),
                               guidance_rescale=rescale)[2:]

    t = sched.timesteps[-1]
    noisy = sched.add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), t.reshape(1).long())
    assert_rel_close(draws(1.0), sched.step(2.0 * noisy, t, noisy, eta=0.0).prev_sample, SAME_OPS, "rescaled draw")
    assert_rel_close(draws(0.0), sched.step(5.0 * noisy, t, noisy, eta=0.0).prev_sample, SAME_OPS, "guided draw")


def test_cached_prompt_embeddings_are_each_prompts_own(tiny, monkeypatch, caplog):
    """cache_prompt_embeddings: each prompt's cached conditioning is its own encoding, as the uncached encoder gives
    it (16 prompts are encoded together: a wrong row would train every prompt of the chunk on another's text)."""
    from lowmem_alignprop.memory.placement import Placement
    from lowmem_alignprop.models.sampling import PromptEncoder, encode_prompts, make_pipeline

    def Place():
        return Placement(torch.device("cpu"), offload=False)

    comps = tiny[0]
    pipe = make_pipeline(comps)
    prompts = ["a cat", "a dog", "a red tree"]
    encoder = PromptEncoder(pipe, comps, Place(), "cpu", 64, cache=True, prompts=prompts)
    cached = encoder(["a red tree", "a cat"])
    direct = encode_prompts(pipe, ["a red tree", "a cat"], "cpu", 64)
    torch.testing.assert_close(cached.cond, direct.cond)
    torch.testing.assert_close(cached.uncond, direct.uncond)
    assert not torch.allclose(cached.cond[0], cached.cond[1])  # the two prompts' texts differ
    assert not encoder.on_host  # a few prompts' embeddings: on the device
    # a prompt set whose embeddings would crowd the device waits in host memory (100k prompts: 22 GiB of SD1.5's)
    import lowmem_alignprop.models.sampling as sampling
    per_prompt = direct.nbytes() // 2
    monkeypatch.setattr(sampling, "HOST_CACHE_ABOVE", 3 * per_prompt - 1)
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        encoder = PromptEncoder(pipe, comps, Place(), "cpu", 64, cache=True, prompts=prompts)
        torch.testing.assert_close(encoder(["a red tree", "a cat"]).cond, direct.cond)
    assert encoder.on_host and "3 prompts: their embeddings (0.00 GiB) wait in host memory" in caplog.text
    monkeypatch.setattr(sampling, "HOST_CACHE_ABOVE", 3 * per_prompt)
    encoder = PromptEncoder(pipe, comps, Place(), "cpu", 64, cache=True, prompts=prompts)
    encoder(["a cat"])
    assert not encoder.on_host

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

from loras import nudge, tiny_unet_with_lora
from numerics import SAME_OPS, assert_rel_close

from lowmem_alignprop.measure import devices, planner, shared_step
from lowmem_alignprop.measure.step_time import step_time
from lowmem_alignprop.memory import stages
from lowmem_alignprop.models.family import UNetFamily
from lowmem_alignprop.models.sampling import enable_block_checkpointing
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.step.rollout import rollout_loss

NO_STAGE = lambda name: contextlib.nullcontext()  # noqa: E731
PROMPTS = ["a photo of a cat", "a red dog"]


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return tiny_unet_with_lora(tiny_dir)


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


@pytest.mark.parametrize("variant,keep", [("plain", 1), ("plain", 9), ("kl+lv", 1), ("kl+lv", 2), ("blocks", 2)])
def test_unet_gradients_equal_the_checkpointed_windows(tiny, variant, keep):
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
    nudge(params)  # lora_B starts at zero
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


# -- the planner and plan --fastest -----------------------------------------------------------------------------

def _tiny(**kw) -> Config:
    base = dict(model="tiny", resolution=64, sample_steps=6, k=4, batch_size=2, prompts="simple_animals")
    return Config(**{**base, **kw}).validate()


def test_planner_counts_what_kept_calls_save_in_time_and_cost_in_memory(tiny_dir):
    """K=4 of 6 steps: each kept call (after the window's first) leaves backward one call's recompute less to do:
    the forward up to the last tensor it saved, so at most the call's forward (the sample_grad work per call) and
    nearly all of it; the same for every kept call. Memory: backward's peak rises by per_kept_bytes (one call's
    activations) per kept call from the second on; the first costs less, as without it backward's peak already
    held one call's activations (a recompute's)."""
    est = {n: planner.estimate(_tiny(window_keep=n), target="cpu") for n in (0, 1, 2)}  # two kept calls: enough to
    # tell the first (cheaper) from the next, and each call's saving from another's
    forward = est[0].work[stages.SAMPLE_GRAD]["matmul_flops"]
    assert all(e.work[stages.SAMPLE_GRAD]["matmul_flops"] == forward for e in est.values())  # forward unchanged
    per_call = forward / 4
    backward = [est[n].work[stages.BACKWARD]["matmul_flops"] for n in (0, 1, 2)]
    drops = [a - b for a, b in zip(backward, backward[1:])]
    assert all(0.95 * per_call <= d <= per_call for d in drops), (drops, per_call)
    assert drops[1] == pytest.approx(drops[0], rel=1e-9)
    peaks = [est[n].stages[stages.BACKWARD]["allocated"] for n in (0, 1, 2)]
    kept = est[2].per_kept_bytes
    assert kept > 20 * est[0].per_k_bytes  # a call's activations, not a latent
    rises = [b - a for a, b in zip(peaks, peaks[1:])]
    assert rises[1] == pytest.approx(kept, rel=0.02) and 0 < rises[0] < kept, (rises, kept)
    assert est[1].per_k_bytes == est[0].per_k_bytes  # the checkpointed steps keep what they kept
    t = {n: step_time(_tiny(window_keep=n), est[n], devices.cpu_device())
         for n in (0, 2)}
    assert t[2]["stages"][stages.BACKWARD] < t[0]["stages"][stages.BACKWARD]


@pytest.mark.slow  # an estimate and two real steps (20 s); the test above checks each kept call's bytes
def test_planner_peak_with_kept_calls_matches_the_cpu_measurement(tiny_dir):
    """The estimate (K=6, window_keep=3: two checkpointed and two kept steps simulated, one more of each kind
    extrapolated) against the same step run for real on the CPU: every stage within the planner's 5%, and the rise
    over window_keep=0 too."""
    base = _tiny(sample_steps=7, k=6)
    cfg = dataclasses.replace(base, window_keep=3)
    est, meas = planner.estimate(cfg, target="cpu"), shared_step.measure_cpu_step(cfg)
    est0, meas0 = planner.estimate(base, target="cpu"), shared_step.measure_cpu_step(base)
    for name in stages.STEP_STAGES:
        e, m = est.stages[name]["allocated"], meas["stages"][name]
        assert abs(e - m) <= 0.05 * m, (name, e, m)
    rise_est = est.stages[stages.BACKWARD]["allocated"] - est0.stages[stages.BACKWARD]["allocated"]
    rise_meas = meas["stages"][stages.BACKWARD] - meas0["stages"][stages.BACKWARD]
    assert rise_meas > 0 and abs(rise_est - rise_meas) <= 0.05 * rise_meas, (rise_est, rise_meas)
    assert est.k_simulated == 4 and any("1 more at" in note for note in est.notes)


@pytest.mark.slow  # 33 s of CPU: the room-filling unit test here and test_speed_plan's --fastest test cover its parts
def test_fastest_keeps_window_calls_only_when_the_budget_has_room(tiny_dir, monkeypatch):
    """A large budget: --fastest keeps every grad-window call (the fastest level) and its own estimate says that is
    faster than checkpointing them; a budget that only the all-checkpointed configuration fits: it keeps none (that
    half searches window_keep alone, to stay quick)."""
    from lowmem_alignprop.measure import fastest

    cfg = _tiny(sample_steps=3, k=2, batch_size=1, cache_prompt_embeddings=True, budget_gb=8.0,
                unet_checkpointing="blocks", vae_checkpointing="blocks")  # one image: no smaller micro-batch to try
    r = fastest.fastest(cfg, profile="custom", target="cpu", max_estimates=30)
    found = r["found"]
    assert found is not None and found["set"]["window_keep"] == 2, found["set"]
    chosen = dataclasses.replace(cfg, **found["set"]).validate()
    device = devices.cpu_device()
    none_kept = dataclasses.replace(chosen, window_keep=0)
    slower = step_time(none_kept, planner.estimate(none_kept, target="cpu"), device)["optimizer_step"]
    assert found["seconds"] < slower
    assert "window_keep: 2" in r["profile_yaml"]
    # a budget that only window_keep=0 fits (the other features as given) leaves every call checkpointed
    need = planner.estimate(none_kept, target="cpu").peak_needed
    small = dataclasses.replace(none_kept, budget_gb=need * 1.001 / 2**30)
    levels = fastest.dimensions(small, "cpu", 1)[0]
    assert levels == ("window_keep", [{"window_keep": 2}, {"window_keep": 1}, {"window_keep": 0}])
    monkeypatch.setattr(fastest, "dimensions", lambda *a: [levels])
    r = fastest.fastest(small, profile="custom", target="cpu", max_estimates=30)
    assert r["found"] is not None and dataclasses.replace(small, **r["found"]["set"]).window_keep == 0
    assert any(not row["fits"] and row["set"].get("window_keep") for row in r["tried"])  # keeping was tried


def _estimates_by(search, row) -> None:
    """The search's estimates replaced by ``row(window_keep)`` (a linear stand-in for the planner), each one counted."""
    def run(change):
        search.tried.append(change)
        return row(change["window_keep"])
    search.run = run


def test_fastest_fills_the_budgets_room_with_kept_calls():
    """Between the chosen window_keep level (4) and the next one up (K_max = 6), the search takes
    the most kept calls the room holds, predicted from per_kept_bytes and confirmed by an estimate (here a linear
    stand-in for the planner: 1 GiB and 0.1 s per kept call)."""
    from lowmem_alignprop.measure import fastest
    from lowmem_alignprop.memory.allowances import GIB

    cfg = Config(model="tiny", sample_steps=8, k=6, budget_gb=10.5).validate()
    search = fastest._Search(cfg, "cpu", devices.cpu_device(), [], max_estimates=10)

    def row(n: int) -> dict:
        needed = (4 + n) * GIB
        return {"set": {"window_keep": n}, "needed": needed, "allocated": needed, "per_kept_bytes": GIB,
                "seconds": 2.0 - 0.1 * n, "fits": needed <= cfg.budget_gb * GIB}

    _estimates_by(search, row)
    assert search.fill_window(row(4))["set"]["window_keep"] == 6  # 10 GiB needed of 10.5: K_max itself fits
    search.cfg = dataclasses.replace(cfg, budget_gb=9.5)
    search.tried.clear()
    assert search.fill_window(row(4))["set"]["window_keep"] == 5 and len(search.tried) == 1
    search.cfg = dataclasses.replace(cfg, budget_gb=8.5)
    assert search.fill_window(row(4))["set"]["window_keep"] == 4  # no room for one more: nothing estimated
    assert len(search.tried) == 1


def test_fastest_fills_the_room_on_a_card_whose_needed_holds_fixed_workspaces():
    """On a CUDA target "needed" is the allocator's x1.10 of the allocated bytes plus fixed workspaces: a kept call
    adds its bytes x1.10, not x(needed / allocated). The tiny model on rtx3060 with a 0.5 GiB budget chose
    window_keep=2 (0.35 GiB) and never estimated 3 (0.44 GiB, faster), as the workspaces doubled the step."""
    from lowmem_alignprop.measure import fastest
    from lowmem_alignprop.measure.figures import reserved
    from lowmem_alignprop.memory.allowances import GIB, WORKSPACE_BYTES

    cfg = Config(model="tiny", sample_steps=8, k=6, budget_gb=0.5).validate()
    search = fastest._Search(cfg, "cuda", devices.DEVICES["rtx3060"], [], max_estimates=10)
    per_kept = int(0.077 * GIB)

    def row(n: int) -> dict:
        allocated = int(0.04 * GIB) + n * per_kept
        needed = reserved(cfg, allocated, True) + WORKSPACE_BYTES
        return {"set": {"window_keep": n}, "needed": needed, "allocated": allocated, "per_kept_bytes": per_kept,
                "seconds": 0.6 - 0.01 * n, "fits": needed <= cfg.budget_gb * GIB}

    _estimates_by(search, row)
    assert row(2)["fits"] and row(3)["fits"] and not row(4)["fits"]
    assert search.fill_window(row(2))["set"]["window_keep"] == 3 and len(search.tried) == 1


def test_the_windows_backward_scaled_from_its_simulated_steps_counts_what_simulating_all_of_them_does(monkeypatch):
    """The planner simulates up to four grad-window steps and scales backward's work to K per kind of step. Each call
    but the one backward reaches first (the window's last) adds its LoRA gradients to another call's (an op per
    trained tensor): scaled from the last step, a window of checkpointed steps lacked that K - 1 times (a 50-step
    window's ~6,000 ops on SD1.5). K = 3 scaled from its two simulated steps equals all 3 simulated, op for op (with
    kept steps the simulation measures a middle and the last one already)."""
    monkeypatch.setenv("LOWMEM_ALIGNPROP_PLAN_CACHE", "off")
    cfg = Config(model="tiny", resolution=64, truncation="fixed", k=3, sample_steps=4, mixed_precision="fp16").validate()
    scaled = planner.estimate(cfg, target="cuda")
    real = planner._simulated

    def every_step(c, notes):
        k_plan, k_sim, n_nograd, sim = real(c, notes)
        return k_plan, k_plan, n_nograd, dataclasses.replace(sim, sample_steps=k_plan + n_nograd, k=k_plan,
                                                             window_keep=min(c.window_keep, k_plan))
    monkeypatch.setattr(planner, "_simulated", every_step)
    whole = planner.estimate(cfg, target="cuda")
    assert scaled.k_simulated < whole.k_simulated == 3
    for key in ("ops", "matmul_flops", "other_bytes"):
        assert scaled.work["backward"][key] == pytest.approx(whole.work["backward"][key], rel=1e-12), key

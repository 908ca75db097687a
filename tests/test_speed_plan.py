"""The planner's time estimate (counted work per stage) and ``plan --fastest``."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import time

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lowmem_alignprop.measure import counters, devices, fastest, fit_changes, planner
from lowmem_alignprop.measure.reports import format_fastest
from lowmem_alignprop.measure.step_time import step_time
from lowmem_alignprop.memory import stages
from lowmem_alignprop.memory.allowances import GIB
from lowmem_alignprop.settings.config import Config

WIDTHS = (8, 16, 32, 4)  # a stack of Linear layers: in 8 -> 16 -> 32 -> 4
BATCH = 3


def _linear_flops() -> list[int]:
    return [2 * BATCH * a * b for a, b in zip(WIDTHS, WIDTHS[1:])]  # 2*m*n*k per matmul, exact


def _counted_step(work: counters.StageWork):
    """A checkpointed forward in sample_grad and its backward in backward, on fake tensors, as the planner runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        layers = [torch.nn.Linear(a, b) for a, b in zip(WIDTHS, WIDTHS[1:])]
        model = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(), layers[2])
        x = torch.randn(BATCH, WIDTHS[0])  # the input needs no gradient: no input-gradient matmul for layer 1
        with work:
            with work.stage(stages.SAMPLE_GRAD):
                out = checkpoint(model, x, use_reentrant=False)
            with work.stage(stages.BACKWARD):
                out.sum().backward()
    return work


def test_flop_count_of_a_step_matches_the_hand_count():
    f = _linear_flops()
    work = _counted_step(counters.StageWork()).work
    forward = sum(f)
    assert work[stages.SAMPLE_GRAD]["matmul_flops"] == forward
    # backward: the checkpoint's recompute (the forward again, up to the last tensor saved for backward: the last
    # layer's output is not one, so torch's non-reentrant checkpoint stops before its matmul), every weight's
    # gradient (one matmul per layer) and the input gradient of layers 2 and 3 (layer 1's input needs none)
    assert work[stages.BACKWARD]["matmul_flops"] == (forward - f[-1]) + sum(f) + sum(f[1:])
    assert work[stages.SAMPLE_GRAD]["attention_flops"] == 0 and work[stages.BACKWARD]["ops"] > 0
    # the same formulas as torch's FlopCounterMode over the whole step
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        layers = [torch.nn.Linear(a, b) for a, b in zip(WIDTHS, WIDTHS[1:])]
        model = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(), layers[2])
        with counter:
            checkpoint(model, torch.randn(BATCH, WIDTHS[0]), use_reentrant=False).sum().backward()
    assert counter.get_total_flops() == forward + (forward - f[-1]) + sum(f) + sum(f[1:])


def test_sdpa_on_fake_cpu_tensors_counts_attention_flops():
    from torch._subclasses.fake_tensor import FakeTensorMode

    b, h, n, d = 2, 4, 16, 8
    work = counters.StageWork()
    with FakeTensorMode():
        q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
        with work, work.stage(stages.SAMPLE_GRAD):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        with work, work.stage(stages.BACKWARD):
            out.sum().backward()
    one = 2 * b * h * n * n * d  # one [n, d] x [d, n] (or [n, n] x [n, d]) matmul per head
    assert work.work[stages.SAMPLE_GRAD]["attention_flops"] == 2 * one  # q @ k^T and p @ v
    assert work.work[stages.BACKWARD]["attention_flops"] == 5 * one  # the scores again + 4 gradient matmuls


def _tiny(**kw) -> Config:
    base = dict(model="tiny", resolution=64, sample_steps=4, k=1, mixed_precision="fp16", budget_gb=1.0)
    return Config(**{**base, **kw}).validate()


_SHARED: dict = {}  # estimates the work-count tests share (planner.reuse_estimates): _tiny() at K=1 and K=3


def test_work_scales_with_steps_and_k_and_counts_transfers(tiny_dir):
    with planner.reuse_estimates(_SHARED):
        _work_scales_with_steps_and_k_and_counts_transfers()


def _work_scales_with_steps_and_k_and_counts_transfers():
    cfg = _tiny()
    est = planner.estimate(cfg, target="cuda")
    more = planner.estimate(dataclasses.replace(cfg, sample_steps=6), target="cuda")
    nograd = est.work[stages.SAMPLE_NOGRAD]["matmul_flops"]
    assert nograd > 0 and more.work[stages.SAMPLE_NOGRAD]["matmul_flops"] == pytest.approx(nograd * 5 / 3)
    k3 = planner.estimate(dataclasses.replace(cfg, k=3), target="cuda")  # 2 simulated, the third scaled
    grad_call = est.work[stages.SAMPLE_GRAD]["matmul_flops"]
    assert k3.work[stages.SAMPLE_GRAD]["matmul_flops"] == pytest.approx(3 * grad_call)
    # each further K adds one recompute of a UNet call (at most its forward) and its backward: the input gradient
    # of every frozen matmul and convolution (as many flops as the forward) and the small LoRA weight gradients
    per_k = (k3.work[stages.BACKWARD]["matmul_flops"] - est.work[stages.BACKWARD]["matmul_flops"]) / 2
    assert 1.5 * grad_call < per_k <= 2.5 * grad_call, (per_k, grad_call)
    assert est.work[stages.BACKWARD]["pcie_bytes"] == 0
    # one estimate with two features that count different work (neither moves or computes what the other does):
    # offloaded frozen modules cross PCIe: the VAE in (decode) and out again (after backward); the text encoder,
    # not cached, in and out in every step
    both = planner.estimate(dataclasses.replace(cfg, offload_frozen=True, unet_checkpointing="blocks"), target="cuda")
    moved = sum(w["pcie_bytes"] for w in both.work.values())
    assert moved == 2 * both.weights["vae"] + 2 * both.weights["text_encoder"] + 2 * both.weights["reward"]
    # block checkpointing recomputes the blocks once more in backward: more flops there, none elsewhere
    assert both.work[stages.BACKWARD]["matmul_flops"] > est.work[stages.BACKWARD]["matmul_flops"]
    assert both.work[stages.SAMPLE_GRAD]["matmul_flops"] == grad_call
    t = step_time(cfg, est, devices.DEVICES["rtx4090"])
    assert t["optimizer_step"] == pytest.approx(sum(t["stages"].values()))


@pytest.mark.slow  # two estimates (15 s); the quantized-base test counts DRaFT-LV's call per K as well
def test_draft_lv_work_is_counted_once_whatever_k(tiny_dir):
    """DRaFT-LV's extra draws are one batched call at the window's last step: what lv_draws=4 adds to a step (its
    forward in sample_grad, its backward, its decode and reward) is the same at K=1 and K=3 (the grad window
    simulated at 1 and 2 steps and scaled to K: the LV call must not be scaled with it)."""
    def added(k: int) -> dict[str, float]:
        lv, plain = (planner.estimate(_tiny(k=k, lv_draws=n), target="cuda") for n in (4, 1))
        return {name: lv.work[name]["matmul_flops"] - plain.work[name]["matmul_flops"]
                for name in (stages.SAMPLE_GRAD, stages.DECODE, stages.BACKWARD)}
    with planner.reuse_estimates(_SHARED):  # the plain ones are the work-scaling test's K=1 and K=3
        one, three = added(1), added(3)
    assert all(v > 0 for v in one.values())
    assert three == pytest.approx(one, rel=1e-12)  # same ops counted, same sums


def test_a_quantized_base_dequantizes_once_more_per_call_backward_goes_through(tiny_dir):
    """int8 base: every UNet call dequantizes each layer once (the per-call cost c, whatever the batch); backward
    recomputes a checkpointed call (c, counted where it runs) and takes its input gradients (c more). At K=3: the
    plain window's backward is 3 recomputes + 3 passes = 6c (sample_grad 3c); DRaFT-LV's call adds c forward and 2c
    backward; KL's base calls add 3c forward and, all but the window's first (its input needs no gradient), 2c of
    recompute and 2c of input gradients in backward."""
    def dequant(**kw) -> tuple[float, float]:
        est = planner.estimate(_tiny(k=3, base_quant="int8", **kw), target="cuda")
        return est.work[stages.SAMPLE_GRAD]["dequant_bytes"], est.work[stages.BACKWARD]["dequant_bytes"]
    grad, back = dequant()
    c = grad / 3
    assert c > 0 and back == pytest.approx(6 * c, rel=1e-12)
    assert dequant(lv_draws=4) == pytest.approx((4 * c, 8 * c), rel=1e-12)
    assert dequant(kl_coeff=0.1) == pytest.approx((6 * c, 10 * c), rel=1e-12)


def test_seconds_follow_the_device_figures():
    work = dict.fromkeys(counters.WORK_KEYS, 0)
    work.update(matmul_flops=2e12, other_bytes=1e9, ops=1000, pcie_bytes=2e9)
    dev = devices.DEVICES["rtx4090"]
    card = 2e12 / (165.2e12 * dev.matmul_eff) + 1e9 / (1008e9 * dev.memory_eff)
    assert card > 1000 * dev.launch_s  # card-bound: the host's per-op time hides behind the card's work
    assert devices.seconds(work, dev, "fp16") == pytest.approx(card + 2e9 / 25e9)
    # host-bound (a small batch): many cheap ops take the host's time per op, the card's work hides behind it
    small = dict(work, matmul_flops=1e9, other_bytes=1e6, ops=50_000, pcie_bytes=0)
    assert devices.seconds(small, dev, "fp16") == pytest.approx(50_000 * dev.launch_s)
    # the CPU dispatches and computes on the same cores: the sum
    cpu = devices.cpu_device(2)
    expected_cpu = (1e9 / (cpu.fp16_tflops * 1e12 * cpu.matmul_eff) + 1e6 / (cpu.memory_gbs * 1e9 * cpu.memory_eff)
                    + 50_000 * cpu.launch_s)
    assert devices.seconds(small, cpu, "fp16") == pytest.approx(expected_cpu)
    # fp32 matmuls: the plain rate, or the TF32 rate with tf32 on
    assert devices.seconds(work, dev, "fp32") > devices.seconds(work, dev, "fp32", tf32=False) * 0.99
    a100 = devices.DEVICES["a100-40gb"]
    assert devices.seconds(work, a100, "fp32", tf32=True) < devices.seconds(work, a100, "fp32")
    # the 8 GB profiles are timed with the 8 GB card's bandwidth (240 GB/s), the 12 GB ones with the 12 GB card's
    assert devices.device_for("", "rtx3060-sdxl", "cuda").memory_gbs == 240
    assert devices.device_for("", "rtx3060-12gb-flux", "cuda").memory_gbs == 360
    assert devices.device_for("", "my.yaml", "cuda") is None
    assert devices.device_for("h100", "my.yaml", "cuda").name == "h100"


def test_every_card_the_config_accepts_has_figures_and_every_card_row_is_accepted():
    """--set card= is checked by the settings layer, which cannot import the device table: the two lists agree (a
    card added to one only would be refused, or accepted without figures)."""
    card = next(f for f in dataclasses.fields(Config) if f.name == "card")
    assert set(card.metadata["choices"]) - {""} == set(devices.DEVICES)  # cpu included: the cpu profile's card


def test_block_swap_copies_cost_what_the_block_before_does_not_hide():
    """Each block swap copy runs on a side stream beside the compute of the block before it: it costs
    max(0, copy - that compute). At 25 GB/s a 2.5 GB copy takes 0.1 s: behind 0.3 s of compute it costs nothing,
    behind 0.04 s it costs 0.06 s; the simulated copies (5 GB) stand for the stage's 10 GB, so twice that: 0.12 s.
    Other copies (offload, 1 GB: 0.04 s) stay serial; without windows every swap copy is serial (0.4 s)."""
    dev = devices.DEVICES["rtx4090"]  # PCIe 25 GB/s
    flops_per_s = 165.2e12 * dev.matmul_eff  # fp16

    def work(**kw):
        return {**dict.fromkeys(counters.WORK_KEYS, 0), **kw}
    stage = work(matmul_flops=1.0 * flops_per_s, pcie_bytes=11e9, swap_bytes=10e9)
    windows = [[2.5e9, work(matmul_flops=0.3 * flops_per_s)], [2.5e9, work(matmul_flops=0.04 * flops_per_s)]]
    assert devices.swap_seconds(stage, dev, "fp16", windows=windows) == pytest.approx(0.12)
    assert devices.seconds(stage, dev, "fp16", swap_windows=windows) == pytest.approx(1.0 + 0.04 + 0.12)
    assert devices.seconds(stage, dev, "fp16") == pytest.approx(1.0 + 0.04 + 0.4)
    hidden = [[5e9, work(matmul_flops=0.5 * flops_per_s)]]  # a window that hides the copy entirely
    assert devices.seconds(stage, dev, "fp16", swap_windows=hidden) == pytest.approx(1.0 + 0.04)


def test_planned_block_swap_time_overlaps_copies_with_compute(tmp_path):
    """The planner on a tiny FLUX (1 double + 3 single blocks, all swapped): with a fast link (compute dominates)
    a prefetched copy costs nothing and only the copies nothing prefetched (the first block of a walk) add their
    copy time; with a slow link (PCIe dominates) the copies cost their copy time less at most the compute beside
    them. The old serial model's extra time, all the copies, is the upper bound of both."""
    from flowmodels import build_tiny_flux_dir

    flux = build_tiny_flux_dir(tmp_path / "flux", single_layers=3)
    cfg = Config(model=str(flux), resolution=64, sample_steps=4, k=2, guidance_scale=3.5, batch_size=1,
                 unet_checkpointing="blocks", mixed_precision="bf16", offload_frozen=False, block_swap=4,
                 prompts="simple_animals").validate()
    est = planner.estimate(cfg, target="cuda")
    rollout = (stages.SAMPLE_NOGRAD, stages.SAMPLE_GRAD, stages.BACKWARD)
    for name in rollout:
        w = est.work[name]
        assert w["swap_bytes"] == w["pcie_bytes"] > 0  # the rollout's only copies are block swap's

    def extra(gbs: float, windows: bool = True) -> tuple[float, float]:
        """(seconds block swap adds to the rollout, those copies' own time) on an RTX 3060 with a gbs GB/s link."""
        dev = dataclasses.replace(devices.DEVICES["rtx3060"], pcie_gbs=gbs)
        e = est if windows else dataclasses.replace(est, swap_windows={})
        t = step_time(cfg, e, dev)["stages"]
        bare = {name: devices.compute_seconds(est.work[name], dev, "bf16") for name in rollout}
        return (sum(t[name] - bare[name] for name in rollout),
                sum(est.work[name]["swap_bytes"] for name in rollout) / (gbs * 1e9))
    compute = sum(devices.compute_seconds(est.work[name], devices.DEVICES["rtx3060"], "bf16") for name in rollout)

    # compute dominates: what is left is exactly the copies nothing prefetched (scaled like their stage)
    fast, fast_copies = extra(1e4)
    unhidden = sum(est.work[name]["swap_bytes"] / sum(b for b, _ in est.swap_windows[name])
                   * sum(b for b, w in est.swap_windows[name] if not any(w.values())) for name in rollout) / 1e13
    assert fast == pytest.approx(unhidden, rel=1e-9) and 0 < fast < 0.6 * fast_copies
    assert extra(1e4, windows=False)[0] == pytest.approx(fast_copies, rel=1e-9)  # serial: every copy in full
    # PCIe dominates: each copy in full but for the compute beside it
    slow, slow_copies = extra(1e-6)
    assert compute < 1e-3 * slow_copies and slow_copies - compute <= slow <= slow_copies


def _time(cfg: Config, target: str, device) -> tuple[float, bool]:
    est = planner.estimate(cfg, target=target)
    return step_time(cfg, est, device)["optimizer_step"], bool(est.fits(cfg.budget_gb))


@pytest.mark.xdist_group("plan_workers")  # one worker: the second test finds the fork server running
@pytest.mark.parametrize("jobs", [1, pytest.param(2, marks=pytest.mark.slow)])  # workers: +20 s of imports on 2 cores
def test_fastest_fits_and_is_no_slower_than_any_single_change(tiny_dir, jobs, tmp_path):
    """(The budget's two ends are the search's own all-on and all-off corners: estimated once, in one
    reuse_estimates scope; the chosen configuration is estimated again outside it.) With two worker processes
    (--jobs 2, in -m slow: the default suite starts workers in the test below) they compute the estimates the search
    asks for next: the chosen configuration's fresh estimate here equals the worker's, and the search replayed in
    this process on the same estimates takes the same path."""
    given = _tiny(batch_size=2, sample_steps=3, unet_checkpointing="blocks", vae_checkpointing="resnets",
                  sliced_decode=True, cache_prompt_embeddings=True)
    memo: dict = {}
    with planner.reuse_estimates(memo):
        top = planner.estimate(given, target="cpu").peak_needed  # every feature on
        bottom = planner.estimate(dataclasses.replace(given, unet_checkpointing="call", vae_checkpointing="none",
                                                      sliced_decode=False), target="cpu").peak_needed
        assert top < bottom
        cfg = dataclasses.replace(given, budget_gb=(top + bottom) / 2 / GIB)  # something fits, not everything
        r = fastest.fastest(cfg, profile="custom", target="cpu", max_estimates=30, jobs=jobs)
    if jobs > 1:
        assert r["jobs"] == 2 and r["workers_started"] and r["from_workers"] >= len(r["tried"]) // 2, \
            (r["from_workers"], len(r["tried"]))
        assert " (2 worker processes)" in format_fastest(r)
        with planner.reuse_estimates(memo):  # every estimate known: the search alone, in this process
            alone = fastest.fastest(cfg, profile="custom", target="cpu", max_estimates=30, jobs=1)
        assert alone["from_workers"] == 0 and alone["tried"] == r["tried"] and alone["found"] == r["found"]
    found = r["found"]
    assert found is not None and r["plan"]["fits"] and r["plan"]["peak_needed"] <= cfg.budget_gb * GIB
    chosen = dataclasses.replace(cfg, **found["set"]).validate()
    device = devices.cpu_device()
    seconds, fits = _time(chosen, "cpu", device)  # a fresh estimate (no scope open): the search's figure is its own
    assert fits and seconds == pytest.approx(found["seconds"])
    assert seconds <= r["given"]["seconds"]
    search = fastest._Search(cfg, "cpu", device, [], 0)
    changes = search.neighbours(found["set"])  # one feature a level lower, a larger micro-batch
    for name, levels in fastest.dimensions(cfg, "cpu", chosen.batch_size):  # ... and a level higher
        now = next(i for i, lv in enumerate(levels) if all(getattr(chosen, k) == v for k, v in lv.items()))
        if now + 1 < len(levels):
            changes.append({**found["set"], **levels[now + 1]})
    if chosen.batch_size > 1:
        changes.append({**found["set"], "batch_size": chosen.batch_size // 2, "grad_accum": chosen.grad_accum * 2})
    assert len(changes) >= 3
    done = {tuple(sorted(row["set"].items())): (row["seconds"], row["fits"]) for row in r["tried"]}
    for change in changes:  # the search's own estimates where it made them, else a new one
        other, other_fits = done.get(tuple(sorted(change.items()))) or \
            _time(dataclasses.replace(cfg, **change).validate(), "cpu", device)
        assert not other_fits or other >= seconds * (1 - 1e-9), (change, other, seconds)
    assert "budget_gb:" in r["profile_yaml"] and "vae_checkpointing:" in r["profile_yaml"]
    # a CPU plan's profile names the CPU as its card: planned again from the file, it targets the CPU (it needed
    # --device cpu, and planned for CUDA with no seconds without it)
    assert "\ncard: cpu\n" in r["profile_yaml"] and "--device cpu" not in format_fastest(r)
    from lowmem_alignprop.settings.profiles import FLAG_FIELDS, resolve_config
    saved = tmp_path / "fastest.yaml"
    saved.write_text(r["profile_yaml"])
    _, again = resolve_config(str(saved), {**dict.fromkeys(FLAG_FIELDS), "model": cfg.model}, [])
    assert again.card == "cpu" and planner.default_target(str(saved), again.card) == "cpu"
    assert planner.default_target("cpu") == "cpu" and planner.default_target(str(saved)) == "cuda"


@pytest.mark.xdist_group("plan_workers")  # one worker: the second test finds the fork server running
def test_the_workers_stop_an_estimate_the_search_no_longer_needs():
    """An estimate computed ahead that is still running when the search ends is stopped, not waited for: here a
    task of a minute ends, at the shutdown, with the pool's "process stopped" error instead of its result. (In the test
    above's group: the workers' fork server is running already.)"""
    pool = fastest._Workers(1)
    assert pool.submit(os.getpid).result() != os.getpid()  # a worker is up (and has told its process id)
    ahead = pool.submit(time.sleep, 60)
    while not ahead.running():
        time.sleep(0.01)
    pool.shutdown()
    assert isinstance(ahead.exception(timeout=0), concurrent.futures.process.BrokenProcessPool)


class _OverlappingSavings(fastest._Search):
    """A search over made-up features whose estimates are a formula: ``keep`` (2 > 1 > 0 kept window calls) and
    ``ckpt`` (call < blocks) cut the same backward activations (their savings overlap, as window_keep's and UNet
    block checkpointing's do), three ``quiet_N`` features move no peak and cost a millisecond each."""

    DIMS = [("keep", [{"keep": 2}, {"keep": 1}, {"keep": 0}]), ("ckpt", [{"ckpt": "call"}, {"ckpt": "blocks"}])] + \
        [(f"quiet_{i}", [{f"quiet_{i}": False}, {f"quiet_{i}": True}]) for i in range(3)]

    def searched(self, fixed):
        return self.DIMS

    def config(self, change):
        return self.cfg  # every combination is valid

    def run(self, change):
        key = tuple(sorted(change.items()))
        if key in self.cache:
            return self.cache[key]
        keep, blocks = change.get("keep", 2), change.get("ckpt") == "blocks"
        backward = {(2, False): 10.0, (1, False): 6.0, (0, False): 2.0, (2, True): 7.0, (1, True): 5.5,
                    (0, True): 1.5}[keep, blocks] * GIB  # blocks saves 3 GiB alone, 0.5 beside keep=1
        quiet = sum(bool(change.get(f"quiet_{i}")) for i in range(3))
        stages = {"backward": backward, "sample": 1.0 * GIB + quiet * 0.01 * GIB}
        row = {"set": dict(change), "needed": max(stages.values()), "stages": stages,
               "fits": max(stages.values()) <= self.cfg.budget_gb * GIB,
               "seconds": 1.0 + {2: 0.0, 1: 0.1, 0: 0.3}[keep] + 0.05 * blocks + 0.001 * quiet}
        self.tried.append(row)
        self.cache[key] = row
        return row


def test_an_estimated_miss_stops_its_siblings_from_being_estimated():
    """Summed from the all-off corner, keep=1 with block checkpointing is predicted at 10 - 4 - 3 = 3 GiB (fits 3.5);
    estimated, it needs 5.5. The seven combinations that add only quiet features are predicted from that miss (5.5
    GiB and a few hundredths: no fit) and not estimated; the search goes on to keep=0, which fits (helper's walk:
    33 of 40 estimates spent on such siblings, each 7.6x over the budget, on the tiny model at 0.62 GiB)."""
    search = _OverlappingSavings(Config(budget_gb=3.5), "cpu", None, [], 40)
    found = search.at_batch({"batch_size": 1, "grad_accum": 1}, float("inf"))
    assert found["set"]["keep"] == 0 and found["needed"] == 2.0 * GIB and found["fits"]
    estimated = [row["set"] for row in search.tried]
    missed = [s for s in estimated if s["keep"] == 1 and s["ckpt"] == "blocks"]
    assert missed == [{"batch_size": 1, "grad_accum": 1, "keep": 1, "ckpt": "blocks", "quiet_0": False,
                       "quiet_1": False, "quiet_2": False}], estimated
    # all-off, all-on, each level alone (5), the miss, the answer
    assert len(estimated) == 9, estimated


def test_fastest_when_nothing_fits_gives_the_plans_answer_and_cheapest_change(tiny_dir):
    # every searched feature already on, batch 1: only quantizing the base (a change of what is trained) can help
    cfg = _tiny(unet_checkpointing="blocks", vae_checkpointing="resnets", cache_prompt_embeddings=True,
                offload_frozen=True, activation_offload=True, card="rtx3060")
    with planner.reuse_estimates():  # the search and the plan meet both configurations again: estimated once
        top = planner.estimate(cfg, target="cuda").peak_needed
        quant = planner.estimate(dataclasses.replace(cfg, base_quant="nf4"), target="cuda").peak_needed
        assert quant < top
        cfg = dataclasses.replace(cfg, budget_gb=(quant + top) / 2 / GIB)
        r = fastest.fastest(cfg, profile="custom", target="cuda", max_estimates=10)
    assert r["found"] is None and r["plan"]["fits"] is False
    assert r["plan"]["suggestion"]["set"] == {"base_quant": "nf4"}
    text = format_fastest(r)
    assert "DOES NOT FIT" in text and "--set base_quant=nf4" in text


def test_fastest_refuses_without_budget_or_card(tiny_dir):
    from lowmem_alignprop.settings.errors import UserError

    with pytest.raises(UserError, match="needs a budget"):
        fastest.fastest(_tiny(budget_gb=0.0), profile="rtx3060")
    with pytest.raises(UserError, match="--set card="):
        fastest.fastest(_tiny(), profile="mine.yaml", target="cuda")
    with pytest.raises(UserError, match="--jobs 0: give at least 1"):
        fastest.fastest(_tiny(), profile="rtx3060", jobs=0)


@pytest.mark.parametrize("args, env, line", [
    (["--jobs", "2"], "", "error: --jobs sets how plan --fastest searches: add --fastest, or leave it out"),
    (["--max-estimates", "5", "--allow-task-changes"], "",
     "error: --allow-task-changes and --max-estimates set how plan --fastest searches: add --fastest, or leave them out"),
    (["--fastest", "--max-estimates", "0"], "", "error: --max-estimates 0: give at least 1 (default 40)"),
    (["--auto-fit"], "", "error: --auto-fit is train's (the fastest configuration that fits its card, searched before "
                         "the first step): plan --fastest prints the configuration it would train"),
    (["--fastest"], "two", "error: LOWMEM_ALIGNPROP_PLAN_JOBS='two': set it to the number of worker processes plan "
                           "--fastest may use (1: none), or unset it"),
])
def test_search_options_without_fastest_or_out_of_range_are_one_line(args, env, line, monkeypatch, capsys):
    """The search's options are read by plan --fastest alone: without it (or out of range) they are one line, exit 2,
    before anything is planned (otherwise plan would run and drop them without a word)."""
    from lowmem_alignprop.cli import main

    if env:
        monkeypatch.setenv(fastest.JOBS_ENV, env)
    assert main(["plan", "--profile", "rtx3060", "--model", "tiny", *args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]


def test_plan_of_an_auto_fit_configuration_says_it_plans_it_as_given(caplog, capsys):
    """`plan --set auto_fit=true` (or a run's config.yaml that has it) planned the configuration as given, not the
    one --auto-fit would train, without a word. (auto_fit is no estimated field: the two plans share one estimate.)"""
    from lowmem_alignprop.cli import main

    args = ["plan", "--profile", "rtx3060", "--model", "tiny", "--set", "resolution=64", "--no-suggest"]
    with planner.reuse_estimates():
        with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
            assert main([*args, "--set", "auto_fit=true"]) == 0
        said = "auto_fit=true searches before train's first step: this plan is of the configuration as given; plan " \
               "--fastest prints the configuration the search would train"
        assert said in caplog.messages
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
            assert main(args) == 0
    assert said not in caplog.messages


def test_plan_refuses_a_tracker_whose_package_is_missing_as_train_does(monkeypatch, capsys):
    """plan is train's check before renting a card: --report-to wandb without wandb installed is train's one line
    there too (it was dropped without a word)."""
    import importlib.util

    from lowmem_alignprop.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["plan", "--profile", "rtx3060", "--model", "tiny", "--report-to", "wandb"]) == 2
    assert "error: --report-to wandb needs the wandb package, which is not installed" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# speed features: the same results up to rounding
# ---------------------------------------------------------------------------------------------------
def test_fused_adamw_makes_the_same_update():
    from numerics import SAME_OPS, assert_rel_close

    from lowmem_alignprop.memory.optim import build_optimizer

    torch.manual_seed(0)
    start = [torch.randn(64, 8), torch.randn(300)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    out = {}
    for fused in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = build_optimizer(Config(fused_adamw=fused).validate(), params)
        assert opt.defaults["fused"] is (True if fused else None)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        out[fused] = [p.detach() for p in params]
    moved = [a - b for a, b in zip(out[False], start)]
    # Adam's update is elementwise: the fused kernel computes the same formula per weight (rounding only); the
    # comparison is on the update (a few lr-sized steps), not on the weights it is added to
    assert_rel_close([a - b for a, b in zip(out[True], start)], moved, SAME_OPS, "fused vs foreach AdamW update")


def _unet_and_input(tiny_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet").eval()
    g = torch.Generator().manual_seed(0)
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    emb = torch.randn(2, 8, c.cross_attention_dim, generator=g)
    return unet, (x, torch.tensor([500, 20]), emb)


def test_channels_last_gives_the_same_unet_output(tiny_dir):
    from numerics import REORDERED, assert_rel_close

    from lowmem_alignprop.models.loading import apply_speed_features

    unet, args = _unet_and_input(tiny_dir)
    with torch.no_grad():
        ref = unet(*args).sample
        vae = torch.nn.Conv2d(4, 4, 3)
        apply_speed_features(unet, vae, Config(channels_last=True).validate(), torch.device("cpu"))
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        out = unet(*args).sample
    # another convolution algorithm for the other layout: the same sums in another order
    assert_rel_close(out, ref, REORDERED, "channels_last vs contiguous")


def test_tf32_off_a_gpu_is_said_and_changes_nothing(tiny_dir, caplog):
    """tf32 acts on NVIDIA tensor cores only: on the CPU a warning says it is off (it was accepted in silence, unlike
    fp16 and xformers), and torch's TF32 switches stay as they were."""
    import logging

    from lowmem_alignprop.models.loading import apply_speed_features

    before = torch.backends.cuda.matmul.allow_tf32
    caplog.set_level(logging.WARNING, logger="lowmem_alignprop")
    apply_speed_features(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), Config(tf32=True).validate(),
                         torch.device("cpu"))
    assert "tf32 uses NVIDIA tensor cores: off on cpu" in caplog.text
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_compile_nograd_is_a_compiled_view_of_the_same_weights(tiny_dir):
    from lowmem_alignprop.models.loading import nograd_unet

    unet, _ = _unet_and_input(tiny_dir)
    assert nograd_unet(unet, Config().validate()) is unet
    compiled = nograd_unet(unet, Config(compile="nograd").validate())
    assert compiled is not unet and compiled._orig_mod is unet  # torch.compile compiles lazily, at the first call
    assert list(compiled.parameters())[0] is list(unet.parameters())[0]



@pytest.mark.parametrize("name, blocks", [("sd3", ["JointTransformerBlock"] * 2),
                                          ("flux", ["FluxTransformerBlock", "FluxSingleTransformerBlock"])])
def test_compile_regional_compiles_each_repeated_block_of_the_flow_transformers(name, blocks, monkeypatch):
    """SD3's transformer lists no repeated blocks in diffusers (compile_repeated_blocks raised after the model had
    loaded): its joint blocks are compiled, as FLUX's listed ones; nothing else (torch's compile is recorded, not
    run: inductor takes about a minute here, test_compiled_unet_gives_the_same_output runs it)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from lowmem_alignprop.models.loading import apply_speed_features

    small = dict(in_channels=4, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                 pooled_projection_dim=16)
    transformer = (SD3Transformer2DModel(**small, num_layers=2, caption_projection_dim=16, sample_size=8,
                                         pos_embed_max_size=8) if name == "sd3" else
                   FluxTransformer2DModel(**small, num_layers=1, num_single_layers=1, axes_dims_rope=(2, 2, 4)))
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    apply_speed_features(transformer, torch.nn.Identity(), Config(compile="regional").validate(), torch.device("cpu"))
    assert compiled == blocks

def _have_compiler() -> bool:
    import shutil
    return shutil.which("g++") is not None or shutil.which("c++") is not None


@pytest.mark.slow  # inductor compiles C++ for the CPU: about a minute for the tiny UNet's blocks
@pytest.mark.skipif(not _have_compiler(), reason="torch.compile's inductor backend on the CPU needs a C++ compiler")
@pytest.mark.parametrize("mode", ["nograd", "regional"])
def test_compiled_unet_gives_the_same_output(tiny_dir, mode):
    from numerics import REORDERED, assert_rel_close

    from lowmem_alignprop.models.loading import apply_speed_features, nograd_unet

    unet, args = _unet_and_input(tiny_dir)
    cfg = Config(compile=mode).validate()
    with torch.no_grad():
        ref = unet(*args).sample
        apply_speed_features(unet, torch.nn.Identity(), cfg, torch.device("cpu"))
        out = nograd_unet(unet, cfg)(*args).sample
    # inductor fuses and reorders the same sums
    assert_rel_close(out, ref, REORDERED, f"compile={mode} vs eager")


def test_device_queries_count_no_work():
    """Under autocast each cast asks the tensors' device (prim.device, ~1,000 times per UNet call, about half of its
    counted elementwise bytes before they were left out): no kernel, no bytes. What a Linear layer under autocast
    does: three casts to half precision (input, weight, bias: each read in fp32 and written in half) and one addmm."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    work = counters.StageWork()
    with FakeTensorMode():
        layer = torch.nn.Linear(4, 4)
        x = torch.randn(2, 4)
        with work, torch.autocast("cpu", dtype=torch.bfloat16):
            with work.stage(stages.DECODE):
                layer(x)
    w = work.work[stages.DECODE]
    casts = sum(n * (4 + 2) for n in (2 * 4, 4 * 4, 4))  # elements of x, weight, bias: 4 bytes read, 2 written
    assert w["ops"] == 4 and w["other_bytes"] == casts and w["matmul_flops"] == 2 * 2 * 4 * 4


def test_tiled_decode_is_searched_only_where_it_cuts_tiles():
    """SD's VAE turns 512 px into 64 latent cells: one 64-cell tile, decoded whole, one image at a time, i.e. what
    sliced decode does. --fastest and the cheapest-change search skip it there (the rtx4090 SD1.5 search spent 8 of
    its 30 estimates on such no-op variants); at 768 px (96 cells) it tiles and is offered."""

    def tiled_level(cfg) -> bool:
        levels = dict(fastest.dimensions(cfg, "cuda", 2)).get("decode", [])
        return {"sliced_decode": False, "tiled_decode": True} in levels

    def tiled_candidate(cfg) -> bool:
        return any(c.get("tiled_decode") for _, c in fit_changes.candidate_changes(cfg, "cuda"))

    at_512 = Config(model="sd15", resolution=512, batch_size=2).validate()
    at_768 = dataclasses.replace(at_512, resolution=768).validate()
    assert not fit_changes.decode_tiles(at_512, "cuda") and fit_changes.decode_tiles(at_768, "cuda")
    assert not tiled_level(at_512) and not tiled_candidate(at_512)
    assert tiled_level(at_768) and tiled_candidate(at_768)
    # a smaller tile makes 512 px tile too
    assert fit_changes.decode_tiles(dataclasses.replace(at_512, tile_size=32, tile_overlap=8).validate(), "cuda")
    # --allow-task-changes' lower resolution: the search offers tiles only where the task's images are cut (it asked
    # the user's 768 px, and estimated tiled decodes of 512 px images: sliced decode again)
    search = fastest._Search(at_768, "cuda", None, [], 40)
    fixed = {"cache_prompt_embeddings": True, "batch_size": 2, "grad_accum": 1}
    assert {"sliced_decode": False, "tiled_decode": True} in dict(search.searched(fixed))["decode"]
    assert {"sliced_decode": False, "tiled_decode": True} not in dict(search.searched({**fixed, "resolution": 512}))[
        "decode"]


def test_the_speed_benchmark_summarises_interleaved_repeats_by_median_against_the_profiles():
    """benchmarks/speed_bench.py --repeats: one slow run (a busy minute of a shared machine) moves the range, not the
    median; each variant is set against the profile's own median of the same job; a failed run counts nowhere."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "speed_bench.py"
    spec = importlib.util.spec_from_file_location("speed_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runs = [{"job": "tiny", "variant": "as the profile", "seconds_per_step": s} for s in (1.0, 1.2, 3.0)]
    runs += [{"job": "tiny", "variant": "channels_last", "seconds_per_step": s} for s in (0.9, 0.8, 0.95)]
    runs += [{"job": "tiny", "variant": "compile=nograd", "seconds_per_step": None, "returncode": 1}]
    rows = {r["variant"]: r for r in bench.summary(runs)}
    assert set(rows) == {"as the profile", "channels_last"}
    assert rows["as the profile"] == {"job": "tiny", "variant": "as the profile", "runs": 3, "median": 1.2,
                                      "low": 1.0, "high": 3.0}
    assert rows["channels_last"]["median"] == 0.9 and rows["channels_last"]["vs_profile"] == pytest.approx(0.75)



@pytest.mark.parametrize("fastest_flag", [[], ["--fastest"]])
def test_a_cuda_budget_below_the_workspaces_is_refused_before_any_estimate(fastest_flag, capsys, monkeypatch):
    """budget_gb under CUDA's 0.16 GiB of workspaces cannot fit anything: plan and plan --fastest say so in one
    line at once (a user's 0.1 GiB had --fastest search for three minutes before "nothing fits")."""
    from lowmem_alignprop.cli import main

    def no_estimate(*a, **k):
        raise AssertionError("estimated a configuration nothing could fit")

    monkeypatch.setattr(planner, "estimate", no_estimate)
    assert main(["plan", *fastest_flag, "--profile", "rtx3060", "--model", "tiny", "--set", "budget_gb=0.1"]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "budget_gb=0.1 is below the 0.16 GiB CUDA's workspaces take" in lines[0], err


def test_fastest_answers_the_configuration_as_given_when_it_fits_and_nothing_quicker_was_found(tiny_dir):
    """A configuration that fits is the time to beat: with one estimate (the search cut short) it is the answer, "no
    change", never "nothing fits" above a plan that says it fits; the cut is said with the flag that searches on."""
    cfg = _tiny(budget_gb=8.0, unet_checkpointing="blocks", vae_checkpointing="blocks", cache_prompt_embeddings=True)
    with planner.reuse_estimates():
        r = fastest.fastest(cfg, profile="custom", target="cpu", max_estimates=1, jobs=1)
    assert len(r["tried"]) == 1 and r["given"]["fits"]
    assert r["found"] == r["given"] and r["set"] == {} and r["plan"]["fits"]
    text = format_fastest(r)
    assert "nothing in the searched features fits" not in text
    assert "(no change: the configuration as given)" in text
    assert "the search stopped at its 1 estimates: --max-estimates N" in text


def test_plan_workers_are_spawned_on_macos(monkeypatch):
    """macOS offers a fork server, but a fork after torch's and the system frameworks' imports can hang there (Python's
    own default on macOS is spawn); Linux keeps the fork server (workers start in a moment)."""
    import multiprocessing
    import sys

    monkeypatch.setattr(sys, "platform", "darwin")
    assert fastest._worker_context().get_start_method() == "spawn"
    monkeypatch.setattr(sys, "platform", "linux")
    if "forkserver" in multiprocessing.get_all_start_methods():
        assert fastest._worker_context().get_start_method() == "forkserver"


# ---------------------------------------------------------------------------------------------------
# step_time and devices on hand-made work (no estimate): each figure's arithmetic, unit by unit
# ---------------------------------------------------------------------------------------------------
def _work(**kw) -> dict:
    return {**dict.fromkeys(counters.WORK_KEYS, 0), **kw}


def _estimate_of(work: dict, target: str = "cuda"):
    from lowmem_alignprop.measure.figures import Estimate

    return Estimate(target, {}, 0, stages.BACKWARD, 0, {}, 1, 1, 0, 0, 0.0, work=work)


def test_step_time_counts_every_micro_step_the_optimizer_once_and_tf32_only_on_a_card():
    """An A100 (fp32 19.5 TFLOPS, TF32 156, 1555 GB/s, PCIe 25 GB/s), fp32 matmuls: 1.56 TFLOP in sample_grad is
    1.56e12 / (156e12 * 0.18) s with tf32 on a CUDA target, at the plain fp32 rate on a CPU target; the optimizer's
    1.244 GB once per optimizer step, the micro-step grad_accum (3) times; block swap's 5 GB of copies 0.2 s."""
    a100 = devices.DEVICES["a100-40gb"]
    cfg = Config(model="tiny", resolution=64, sample_steps=4, k=1, mixed_precision="no", grad_accum=3,
                 tf32=True).validate()
    work = {stages.SAMPLE_GRAD: _work(matmul_flops=1.56e12, pcie_bytes=5e9, swap_bytes=5e9),
            stages.OPTIMIZER: _work(other_bytes=1.244e9)}
    t = step_time(cfg, _estimate_of(work), a100)
    grad = 1.56e12 / (156e12 * a100.matmul_eff) + 5e9 / 25e9  # no windows known: the copies serial
    opt = 1.244e9 / (1555e9 * a100.memory_eff)
    assert t["matmul_dtype"] == "fp32 (tf32)"
    assert t["stages"] == pytest.approx({stages.SAMPLE_GRAD: grad, stages.OPTIMIZER: opt}, rel=1e-12)
    assert t["micro_step"] == pytest.approx(grad, rel=1e-12)
    assert t["optimizer_step"] == pytest.approx(3 * grad + opt, rel=1e-12)
    assert t["block_swap_copies"]["seconds"] == pytest.approx(0.2, rel=1e-12)  # 5e9 B at 25e9 B/s
    assert t["block_swap_copies"]["beyond_compute"] == pytest.approx(0.2, rel=1e-12)
    on_cpu = step_time(cfg, _estimate_of(work, target="cpu"), a100)  # tf32 is a CUDA setting
    assert on_cpu["matmul_dtype"] == "fp32"
    assert on_cpu["stages"][stages.SAMPLE_GRAD] == pytest.approx(1.56e12 / (19.5e12 * a100.matmul_eff) + 0.2,
                                                                rel=1e-12)


def test_step_work_scales_the_calls_to_the_mean_k_and_drops_cached_encodings():
    """truncation=uniform over K in 2..6 (mean 4) of 8 steps: the window's calls, simulated 2, scale by 4 / 2, the
    no-grad ones, simulated 2, by (8 - 4) / 2; with cached prompt embeddings a step encodes nothing, but what runs
    after encode_prompts (its + AFTER bucket) still counts."""
    from lowmem_alignprop.measure.step_time import mean_k, step_work

    work = counters.StageWork()
    work.work = {stages.ENCODE_PROMPTS: _work(matmul_flops=70), stages.ENCODE_PROMPTS + counters.AFTER: _work(ops=5),
                 stages.SAMPLE_NOGRAD: _work(matmul_flops=100, ops=10), stages.SAMPLE_GRAD: _work(matmul_flops=200)}
    cfg = Config(model="tiny", resolution=64, sample_steps=8, truncation="uniform", k_min=2, k_max=6).validate()
    assert mean_k(cfg) == 4
    out = step_work(cfg, work, k_sim=2, n_nograd=2)
    assert out[stages.SAMPLE_GRAD]["matmul_flops"] == 400
    assert out[stages.SAMPLE_NOGRAD]["matmul_flops"] == 200 and out[stages.SAMPLE_NOGRAD]["ops"] == 20
    assert out[stages.ENCODE_PROMPTS]["matmul_flops"] == 70 and out[stages.ENCODE_PROMPTS]["ops"] == 5
    cached = step_work(dataclasses.replace(cfg, cache_prompt_embeddings=True), work, k_sim=2, n_nograd=2)
    assert cached[stages.ENCODE_PROMPTS]["matmul_flops"] == 0 and cached[stages.ENCODE_PROMPTS]["ops"] == 5


def test_a_cpu_plan_is_timed_on_all_of_torchs_threads():
    """cpu_device scales every rate of the one-core row, memory bandwidth included, by the threads; a CPU target's
    plan uses torch's thread count."""
    one, four = devices.DEVICES["cpu"], devices.cpu_device(4)
    for field in ("fp16_tflops", "bf16_tflops", "tf32_tflops", "fp32_tflops", "memory_gbs"):
        assert getattr(four, field) == pytest.approx(4 * getattr(one, field), rel=1e-12), field
    assert (four.launch_s, four.matmul_eff, four.overlaps_launch) == (one.launch_s, one.matmul_eff, False)
    planned = devices.device_for("", "cpu", "cpu")
    n = torch.get_num_threads()
    assert planned.name == f"cpu ({n} thread{'' if n == 1 else 's'})" and devices.cpu_device(1).name == "cpu (1 thread)"
    assert planned.memory_gbs == pytest.approx(torch.get_num_threads() * one.memory_gbs, rel=1e-12)


def test_quantized_layers_dequantize_at_their_stored_size_per_call():
    """Each call of a quantized Linear layer reads its packed weight (int8: 1 byte, nf4: half a byte a weight) and
    writes it in fp16 (2 bytes); LoRA's own layers are not quantized. The largest dequantized layer, which every
    stage holds, is one fp16 copy of the largest frozen Linear weight."""
    from lowmem_alignprop.measure import weight_bytes
    from lowmem_alignprop.memory import quant

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 32))
    model.add_module("lora_A", torch.nn.Linear(32, 4, bias=False))
    weights = 8 * 16 + 16 * 32  # the frozen Linears' weights (LoRA's layer is not dequantized)
    for mode, per_weight in (("int8", 1 + 2), ("nf4", 0.5 + 2)):
        work = counters.StageWork()
        hooks = weight_bytes.dequant_hooks(Config(base_quant=mode), model, work)
        with torch.no_grad(), work, work.stage(stages.SAMPLE_GRAD):
            model(torch.zeros(2, 8))
            model(torch.zeros(2, 8))
        for h in hooks:
            h.remove()
        assert work.work[stages.SAMPLE_GRAD]["dequant_bytes"] == 2 * weights * per_weight, mode
        saved, largest = weight_bytes._quantized_unet_bytes(model, mode)
        assert largest == 16 * 32 * 2  # fp16
        assert saved == quant.quantized_weight_bytes(model, "none") - quant.quantized_weight_bytes(model, mode) > 0
    assert weight_bytes.dequant_hooks(Config(base_quant="none"), model, counters.StageWork()) == []


def test_adamw_on_a_card_takes_the_foreach_path_the_planner_counts():
    """On CUDA torch's AdamW runs foreach (full-size temporaries in the optimizer stage): the estimate's optimizer
    must too; on the CPU it keeps torch's default; an 8-bit state is counted analytically and marked on the device."""
    from lowmem_alignprop.measure import weight_bytes

    params = [torch.nn.Parameter(torch.zeros(64, 64))]
    cfg = Config(model="tiny").validate()
    place = counters.Residency(counters.LiveBytes(), {}, offload=False)
    opt, steps = weight_bytes.optimizer_for(cfg, params, True, {}, place, [])
    assert steps and all(g["foreach"] is True for g in opt.param_groups)
    opt, _ = weight_bytes.optimizer_for(cfg, params, False, {}, place, [])
    assert not any(g.get("foreach") for g in opt.param_groups)


def test_the_planners_flop_count_of_a_tiny_flux_step_matches_the_real_step_and_a_hand_count(tmp_path):
    """Issue 20 on a tiny model (FLUX, 1 double + 1 single block, 32 px, 4 steps, K=1): the fake-tensor count of
    every matmul and convolution per stage equals torch's FlopCounterMode over the same step run for real (T-K
    no-grad calls and the window's call, the 16-channel decode, then backward with the window call's recompute);
    attention (which the CPU's fused kernels do not report to the counter) matches a hand count: per joint attention
    over n = 64 image + 16 text tokens of width D, one = 2 n^2 D; forward 2 one, backward 5 one; the VAE's mid-block
    attention over its 16x16 latent (width 32) the same."""
    from diffusers import DiffusionPipeline
    from flowmodels import FLOW_RESOLUTION as RES, build_tiny_flux_dir
    from torch.utils.flop_counter import FlopCounterMode

    from lowmem_alignprop.models import flow

    model = build_tiny_flux_dir(tmp_path / "flux")
    steps, msl = 4, 16
    cfg = Config(model=str(model), resolution=RES, sample_steps=steps, k=1, batch_size=1, guidance_scale=3.5,
                 prompts="simple_animals", mixed_precision="no", max_sequence_length=msl).validate()
    work = planner.estimate(cfg, target="cpu").work
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.vae.requires_grad_(False)
    flow.add_flow_lora(pipe.transformer, rank=cfg.lora_rank, seed=0)
    emb = flow.encode_prompts(pipe, ["a cat"], "cpu", guidance_scale=3.5, max_sequence_length=msl)
    lat, ids = flow.initial_latents(pipe.transformer, pipe.vae, 1, RES, RES, torch.Generator().manual_seed(0))
    flow.set_flow_timesteps(pipe.scheduler, pipe.transformer, steps, *flow.latent_size(pipe.vae, RES, RES, "flux"))

    def counted(fn):
        with FlopCounterMode(display=False) as c:
            out = fn()
        ops = c.get_flop_counts().get("Global", {})
        return out, sum(v for op, v in ops.items() if "attention" not in str(op))

    out, rollout = counted(lambda: flow.rollout(pipe.transformer, pipe.scheduler, lat, emb, k=1, guidance_scale=3.5,
                                                img_ids=ids))
    images, decode = counted(lambda: flow.decode(pipe.vae, out, height=RES, width=RES))
    _, backward = counted(lambda: images.mean().backward())
    assert rollout > 0 and decode > 0 and backward > decode
    assert work[stages.SAMPLE_NOGRAD]["matmul_flops"] == rollout * (steps - 1) / steps
    assert work[stages.SAMPLE_GRAD]["matmul_flops"] == rollout / steps
    assert work[stages.DECODE]["matmul_flops"] == decode
    assert work[stages.BACKWARD]["matmul_flops"] == backward
    n, width = (RES // 4) ** 2 + msl, pipe.transformer.inner_dim  # 2x2-packed tokens of the halved latent, + text
    joint = 2 * n * n * width  # one [n, D] x [D, n] matmul; 2 attentions a call (the double and the single block)
    vae = 2 * (RES // 2) ** 4 * pipe.vae.config.block_out_channels[-1]  # 256 latent cells, width 32, one head
    assert work[stages.SAMPLE_NOGRAD]["attention_flops"] == (steps - 1) * 2 * 2 * joint
    assert work[stages.SAMPLE_GRAD]["attention_flops"] == 2 * 2 * joint
    assert work[stages.DECODE]["attention_flops"] == 2 * vae
    # backward: the window call's recompute (2 one) and its 5 gradient matmuls per attention; the VAE's 5 (no
    # recompute: vae_checkpointing off)
    assert work[stages.BACKWARD]["attention_flops"] == 2 * (2 + 5) * joint + 5 * vae


@pytest.mark.parametrize("settings, images", [
    ({}, {"sample_grid": 8, "evaluation": 0, "judged": 0}),  # 4 prompts before and after
    ({"sample_every": 5}, {"sample_grid": 20, "evaluation": 0, "judged": 0}),  # + steps 5, 10, 15, 20 (the after)
    ({"steps": 22, "sample_every": 5}, {"sample_grid": 24, "evaluation": 0, "judged": 0}),  # + 5..20, after at 22
    ({"eval_every": 10, "eval_on_start": True, "sample_prompts": 0}, {"sample_grid": 0, "evaluation": 12,
                                                                      "judged": 0}),  # 4 held out at 0, 10, 20
    ({"eval_every": 8}, {"sample_grid": 8, "evaluation": 12, "judged": 0}),  # at 8, 16 and the last, 20
    ({"model": "toy", "fidelity_images": 6, "fidelity_every": 10}, {"sample_grid": 8, "evaluation": 0,
                                                                    "judged": 24}),  # before, 10, 20, after
])
def test_the_plan_counts_the_images_rendered_without_gradient_beside_the_steps(settings, images):
    """plan's "beside the steps" line: each image the run renders without gradient as a micro-step's forward stages
    (every sampler step, decode, reward) cost one of its batch_size images; how many, by what they are for."""
    from lowmem_alignprop.measure.reports import format_time
    from lowmem_alignprop.measure.step_time import render_time

    cfg = Config(**{"model": "tiny", "resolution": 64, "steps": 20, "batch_size": 2, **settings}).validate()
    t = {"stages": {stages.SAMPLE_NOGRAD: 3.0, stages.SAMPLE_GRAD: 1.0, stages.DECODE: 0.5, stages.REWARD: 0.5,
                    stages.BACKWARD: 9.0, stages.OPTIMIZER: 9.0}}
    toy = ["a red triangle", "two blue squares", "a green circle", "a yellow diamond"]  # (the toy world's grammar)
    renders = render_time(cfg, t, toy if cfg.model == "toy" else ["a cat", "a dog", "a horse", "a fox"])
    assert renders["images"] == images
    assert renders["seconds_per_image"] == 2.5  # (3 + 1 + 0.5 + 0.5) / 2: not the backward's, not the optimizer's
    assert renders["seconds"] == 2.5 * sum(images.values())
    line = format_time({**t, "k_mean": 1, "work_per_micro_step": dict.fromkeys(counters.WORK_KEYS, 0),
                        "device": "cpu", "device_figures": devices.DEVICES["cpu"].to_dict(), "matmul_dtype": "fp32",
                        "micro_step": 14.0, "optimizer_step": 23.0}, cfg.to_dict(), renders)[-1]
    assert line.startswith("    beside the steps, ") and f"at most {sum(images.values()) * 2.5:.0f} s more" in line


def test_a_plan_without_a_card_times_no_renders():
    cfg = Config(model="tiny", resolution=64).validate()
    from lowmem_alignprop.measure.step_time import render_time
    assert render_time(cfg, {"device": None}, []) is None

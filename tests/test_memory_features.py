"""Every memory feature saves memory in the stage it targets, and none changes the gradient.

Measured on CPU with the project's profiler (``measure_cpu_stages``, per stage, above the level at the step's
start: the live tensor storages for a training step, which are the same on every CPU; torch.profiler's memory
events, which also see the scratch inside kernels, for attention and no-grad decoding) on a mid-size SD-shaped model
(tests/midsize.py: UNet (64, 128, 256), VAE (32, 64, 128, 128), 128 px, batch 2, CFG), going through
the training code path: ``step.apply_memory_features`` -> ``step.rollout_loss`` -> ``loss.backward()``.

Each comparison turns one feature on against a baseline with the others fixed; the baseline is the
setting where the feature matters (the way the profiles combine them): UNet block checkpointing and
reward checkpointing are measured with the VAE checkpointed, because otherwise the VAE's saved
activations set the peak and hide them, as on SD1.5 (docs/design.md section 3).
Run with ``-s`` to see the table; the module prints it at the end.
"""

from __future__ import annotations

import gc
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from numerics import REORDERED, assert_rel_close

sys.path.insert(0, str(Path(__file__).resolve().parent))
from midsize import MIDSIZE_RESOLUTION, build_clip_reward_dir, build_midsize_dir  # noqa: E402

from lowmem_alignprop.memory import stages  # noqa: E402
from lowmem_alignprop.settings.config import Config  # noqa: E402
from lowmem_alignprop.models.loading import load_components  # noqa: E402
from lowmem_alignprop.measure.cpu_allocation import measure_cpu_stages  # noqa: E402
from lowmem_alignprop.measure.profiler import StageProfiler  # noqa: E402
from lowmem_alignprop.measure.resident_tensors import run_objects_only  # noqa: E402
from lowmem_alignprop.rewards import build_reward  # noqa: E402
from lowmem_alignprop.models.sampling import decode, encode_prompts, initial_latents, make_pipeline  # noqa: E402
from lowmem_alignprop.step.rollout import apply_memory_features, rollout_loss  # noqa: E402

CPU = torch.device("cpu")
BATCH = 2
PROMPTS = ["a cat", "the dog", "a horse", "the cat"]
MIB = 2**20
MIN_SAVING = 0.10  # every feature must cut its stage's peak by at least 10% here
# Gradient tolerance, as ||g_feature - g_plain|| / ||g_plain|| over all LoRA weights: recomputation and
# per-image decoding only reorder float32 sums (measured: checkpointing 0, sliced decode 2e-4).
GRAD_RTOL = 1e-3

SAVINGS: list[tuple[str, str, int, int]] = []  # (feature, stage, off bytes, on bytes) for the table
# one worker: the tests share their measured steps (the baseline alone is read by eight), made once per process
pytestmark = pytest.mark.xdist_group("memory_features")


@dataclass
class Run:
    peaks: dict[str, int]
    grads: list[torch.Tensor]
    loss: float
    attention: str


@pytest.fixture(scope="module", autouse=True)
def _run_objects_only():
    """The module's measurements walk only the objects made here: every object that exists when the module starts
    (the imports, earlier modules' leftovers) is out of the garbage collector's reach (run_objects_only, as a
    training run's measurement does). Each full collection and live-storage scan of a measurement otherwise walked
    the whole process (about 1 s each here)."""
    with run_objects_only():
        yield


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("midsize")
    return {"mid": build_midsize_dir(root / "mid"), "clip": build_clip_reward_dir(root / "clip", layers=6)}


@pytest.fixture(scope="module", autouse=True)
def savings_table(request):
    yield
    if not SAVINGS:
        return
    lines = ["", "memory features on the mid-size model (CPU allocation above the step's start, MiB):",
             f"{'feature':52s} {'stage':13s} {'off':>8s} {'on':>8s} {'saving':>7s}"]
    for feature, stage, off, on in SAVINGS:
        lines.append(f"{feature:52s} {stage:13s} {off / MIB:8.2f} {on / MIB:8.2f} {100 * (1 - on / off):6.1f}%")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    for line in lines:
        reporter.write_line(line) if reporter else print(line)


def _perturb(params, seed=5):
    """peft starts lora_B at zero; give it values so every LoRA matrix gets a gradient to compare."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            if not p.abs().any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def _prepared(cfg, after_apply=None):
    """The model as training prepares it (features applied, LoRA perturbed so it matters)."""
    comps = load_components(cfg)
    params, attention = apply_memory_features(comps, cfg, CPU, torch.float32)
    if after_apply is not None:
        after_apply(comps)
    comps.unet.train()
    _perturb(params)
    return comps, params, attention


def _step_setup(dirs, *, reward="brightness", batch=BATCH, resolution=MIDSIZE_RESOLUTION, after_apply=None,
                **features):
    cfg = Config(model=str(dirs["mid"]), resolution=resolution, sample_steps=3, k=1, batch_size=batch,
                 guidance_scale=4.0, eta=1.0, seed=0, reward=reward,
                 reward_weights=str(dirs["clip"]) if reward == "clip" else "", **features).validate()
    comps, params, attention = _prepared(cfg, after_apply)
    reward_model = build_reward(cfg.reward, checkpointing=cfg.reward_checkpointing, weights=cfg.reward_weights)
    prompts = PROMPTS[:batch]
    emb = encode_prompts(make_pipeline(comps), prompts, CPU, resolution)
    latents = initial_latents(batch, comps.unet, comps.vae, resolution, torch.Generator().manual_seed(1), CPU)
    return cfg, comps, params, attention, reward_model, prompts, emb, latents


def run_step(dirs, **kwargs) -> Run:
    """One training micro-step (sample_nograd, sample_grad, decode, reward, backward) measured per stage."""
    cfg, comps, params, attention, reward_model, prompts, emb, latents = _step_setup(dirs, **kwargs)
    result = {}

    def step():
        prof = StageProfiler("cpu")  # no step begun: its stages are plain record_function ranges
        g = torch.Generator().manual_seed(2)
        loss, _ = rollout_loss(cfg, comps.unet, comps.unet, comps.scheduler, comps.vae, reward_model, latents, emb,
                               prompts, k=cfg.k, generator=g, stage=prof.stage)
        with prof.stage(stages.BACKWARD):
            loss.backward()
        result["loss"] = loss.item()

    # live storages (what the step keeps for backward and what its ops return), not the profiler's events: a
    # convolution's workspace depends on the CPU's kernels (oneDNN without AVX2 falls back to im2col GEMMs whose
    # 45 MiB scratch in the VAE's backward set the peak whatever the UNet kept), and these features change what is kept
    peaks = _measure(step, method="counter")
    grads = [p.grad.detach().clone() for p in params]
    return Run(peaks, grads, result["loss"], attention)


def _measure(fn, *args, method: str = "events") -> dict[str, int]:
    """measure_cpu_stages with the garbage of earlier runs collected first and none collected during the run:
    the running total counts frees too, so old tensors freed mid-step would lower the measured peaks. ``events``
    (the default) counts the scratch inside ops too: attention and decoding compare what their kernels allocate."""
    gc.collect()
    gc.disable()
    try:
        return measure_cpu_stages(fn, *args, method=method)
    finally:
        gc.enable()


_CACHE: dict[tuple, Run] = {}


@pytest.fixture(scope="module")
def measure(dirs):
    def get(**kwargs) -> Run:
        key = tuple(sorted(kwargs.items()))
        if key not in _CACHE:
            _CACHE[key] = run_step(dirs, **kwargs)
        return _CACHE[key]
    return get


def _saving(feature: str, stage: str, off: Run, on: Run) -> float:
    a, b = off.peaks[stage], on.peaks[stage]
    SAVINGS.append((feature, stage, a, b))
    print(f"{feature}: {stage} peak {a / MIB:.2f} -> {b / MIB:.2f} MiB ({100 * (1 - b / a):.1f}% less)")
    return 1 - b / a


def _assert_same_grads(ref: Run, other: Run) -> float:
    """The LoRA gradients agree: relative L2 difference of all of them together under GRAD_RTOL.
    Returns that relative difference."""
    assert all(bool(g.abs().any()) for g in ref.grads)  # every LoRA matrix has a gradient to compare
    a = torch.cat([g.flatten() for g in ref.grads]).double()
    b = torch.cat([g.flatten() for g in other.grads]).double()
    rel = ((a - b).norm() / a.norm()).item()
    assert rel <= GRAD_RTOL, rel
    assert abs(ref.loss - other.loss) <= 1e-5 * max(1.0, abs(ref.loss))
    return rel


# ------------------------------------------------------------------------------------------------------
# memory: each feature lowers the peak of the stage it targets
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["blocks", "resnets"])
def test_vae_checkpointing_lowers_backward_peak(measure, granularity):
    off, on = measure(), measure(vae_checkpointing=granularity)
    assert _saving(f"vae_checkpointing={granularity}", stages.BACKWARD, off, on) >= MIN_SAVING
    # the decoder's activations are no longer kept between decode and backward either
    assert _saving(f"vae_checkpointing={granularity}", stages.DECODE, off, on) >= MIN_SAVING


def test_unet_block_checkpointing_lowers_backward_peak(measure):
    base = dict(vae_checkpointing="resnets", sliced_decode=True)
    off, on = measure(**base), measure(**base, unet_checkpointing="blocks")
    assert _saving("unet_checkpointing=blocks (VAE ckpt on)", stages.BACKWARD, off, on) >= MIN_SAVING


def test_reward_checkpointing_lowers_reward_peak(measure):
    base = dict(reward="clip", vae_checkpointing="resnets")
    off, on = measure(**base), measure(**base, reward_checkpointing=True)
    assert _saving("reward_checkpointing (CLIP reward, VAE ckpt on)", stages.REWARD, off, on) >= MIN_SAVING
    assert on.peaks[stages.BACKWARD] <= off.peaks[stages.BACKWARD]


def test_sliced_decode_lowers_backward_peak_with_vae_checkpointing(measure):
    """With a checkpointed decoder, backward recomputes it one image at a time instead of the whole batch."""
    base = dict(vae_checkpointing="blocks", unet_checkpointing="blocks")
    off, on = measure(**base), measure(**base, sliced_decode=True)
    assert _saving("sliced_decode (batch 2, VAE+UNet ckpt blocks)", stages.BACKWARD, off, on) >= MIN_SAVING


def test_sliced_decode_without_checkpointing_saves_nothing_in_training(measure):
    """What slicing cannot do: activations saved for backward exist for every image however they are made."""
    off, on = measure(), measure(sliced_decode=True)
    for stage in (stages.DECODE, stages.BACKWARD):
        assert abs(on.peaks[stage] - off.peaks[stage]) < 0.05 * off.peaks[stage]


def test_sliced_decode_lowers_nograd_decode_peak(dirs):
    """The sample grid decodes without gradient: there slicing cuts the decode peak itself."""
    comps = load_components(Config(model=str(dirs["mid"])))
    side = MIDSIZE_RESOLUTION // 8
    latents = torch.randn(4, 4, side, side, generator=torch.Generator().manual_seed(0))
    out = {}

    def run(sliced):
        prof = StageProfiler("cpu")
        with torch.no_grad(), prof.stage(stages.DECODE):
            out[sliced] = decode(comps.vae, latents, sliced=sliced)

    off, on = _measure(run, False), _measure(run, True)
    a, b = off[stages.DECODE], on[stages.DECODE]
    SAVINGS.append(("sliced_decode (no grad, batch 4)", stages.DECODE, a, b))
    print(f"sliced_decode no-grad: decode peak {a / MIB:.2f} -> {b / MIB:.2f} MiB")
    assert b <= (1 - MIN_SAVING) * a
    assert_rel_close(out[True], out[False], REORDERED, "sliced decode")  # one image at a time: other conv blocking


def _unet_rollout(dirs, attention: str, side: int = 32, after_apply=None) -> Run:
    """The sampling stages alone (2 DDIM steps, the last with grad, then backward from the latents; one image
    with CFG), so the UNet's attention is measured at 32x32 latents (256 px) without a 256 px VAE decode."""
    from lowmem_alignprop.models.sampling import rollout

    cfg = Config(model=str(dirs["mid"]), attention=attention, resolution=8 * side, sample_steps=2, k=1).validate()
    comps, params, used = _prepared(cfg, after_apply)
    emb = encode_prompts(make_pipeline(comps), PROMPTS[:1], CPU, cfg.resolution)
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1))
    result = {}

    def step():
        prof = StageProfiler("cpu")
        comps.scheduler.set_timesteps(cfg.sample_steps)
        out = rollout(comps.unet, comps.scheduler, latents, emb, k=1, guidance_scale=4.0, eta=0.0, generator=None,
                      stage=prof.stage)
        with prof.stage(stages.BACKWARD):
            loss = out.square().mean()
            loss.backward()
        result["loss"] = loss.item()

    peaks = _measure(step)
    return Run(peaks, [p.grad.detach().clone() for p in params], result["loss"], used)


def test_attention_sliced_vs_sdpa(dirs):
    """On CPU, PyTorch's SDPA never materialises the attention scores; diffusers' sliced attention keeps one
    slice of scores at a time without grad, and all of them for backward. So sliced only beats the
    unfused attention (AttnProcessor), and sdpa is the lowest-memory choice wherever its fused kernel runs."""
    from diffusers.models.attention_processor import AttnProcessor

    def unfused(comps):
        comps.unet.set_attn_processor(AttnProcessor())

    side = 24  # 192 px: 576 tokens at the first attention (its scores are what differs)
    sdpa, sliced = _unet_rollout(dirs, "sdpa", side), _unet_rollout(dirs, "sliced", side)
    plain = _unet_rollout(dirs, "sdpa", side, after_apply=unfused)
    assert (sdpa.attention, sliced.attention) == ("sdpa", "sliced")
    ng, bw = stages.SAMPLE_NOGRAD, stages.BACKWARD
    SAVINGS.append(("attention=sliced vs unfused (24x24 latents)", ng, plain.peaks[ng], sliced.peaks[ng]))
    SAVINGS.append(("attention=sdpa vs sliced (24x24 latents)", ng, sliced.peaks[ng], sdpa.peaks[ng]))
    SAVINGS.append(("attention=sdpa vs sliced (24x24 latents)", bw, sliced.peaks[bw], sdpa.peaks[bw]))
    print({name: {s: round(r.peaks[s] / MIB, 2) for s in (ng, bw)}
           for name, r in (("sdpa", sdpa), ("sliced", sliced), ("unfused", plain))})
    assert sliced.peaks[ng] <= (1 - MIN_SAVING) * plain.peaks[ng]
    assert sdpa.peaks[ng] <= (1 - MIN_SAVING) * sliced.peaks[ng]
    assert sdpa.peaks[bw] <= (1 - MIN_SAVING) * sliced.peaks[bw]
    _assert_same_grads(sdpa, sliced)
    _assert_same_grads(sdpa, plain)


# ------------------------------------------------------------------------------------------------------
# gradients: checkpointing and slicing change memory, not the result
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("features", [
    dict(vae_checkpointing="blocks"),
    dict(vae_checkpointing="resnets"),
    dict(unet_checkpointing="blocks"),
    dict(sliced_decode=True),
    dict(vae_checkpointing="blocks", sliced_decode=True),
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_features_do_not_change_the_lora_gradient(measure, features):
    rel = _assert_same_grads(measure(), measure(**features))
    print(f"{features}: relative gradient difference {rel:.1e}")


def test_reward_checkpointing_does_not_change_the_lora_gradient(measure):
    base = dict(reward="clip", vae_checkpointing="resnets")
    _assert_same_grads(measure(**base), measure(**base, reward_checkpointing=True))


# every feature that acts on a CPU and promises the same result, at once (a defect in one fails the whole)
TOGETHER = dict(unet_checkpointing="blocks", window_keep=1, vae_checkpointing="resnets", sliced_decode=True,
                activation_offload=True, offload_frozen=True, merge_lora_nograd=True, channels_last=True)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from flowmodels import FLOW_RESOLUTION, build_tiny_flux_dir, build_tiny_sd3_dir

    from midsize import build_tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("families")
    build_tiny_sdxl_pipeline().save_pretrained(root / "sdxl")
    return {"sdxl": (root / "sdxl", 64), "sd3": (build_tiny_sd3_dir(root / "sd3"), FLOW_RESOLUTION),
            "flux": (build_tiny_flux_dir(root / "flux"), FLOW_RESOLUTION)}


def _family_step(model, resolution, **features):
    """One micro-step of the trainer's pieces on another family (the features applied as training applies them):
    the loss and every LoRA gradient."""
    from lowmem_alignprop.models import flow
    from lowmem_alignprop.models.family import family_for
    from lowmem_alignprop.models.loading import apply_speed_features

    cfg = Config(model=str(model), resolution=resolution, sample_steps=4, k=2, batch_size=BATCH, guidance_scale=4.0,
                 seed=0, **features).validate()
    comps, params, _ = _prepared(cfg, lambda c: apply_speed_features(c.unet, c.vae, cfg, CPU))
    family = family_for(comps)
    pipe = family.make_pipeline(comps)
    emb = (flow.encode_prompts(pipe, PROMPTS[:BATCH], CPU, guidance_scale=family.guidance(cfg),
                               max_sequence_length=family.max_sequence_length(cfg)) if family.flow else
           encode_prompts(pipe, PROMPTS[:BATCH], CPU, resolution))
    g = torch.Generator().manual_seed(1)
    latents = family.initial_latents(cfg, BATCH, g, CPU)
    loss, _ = rollout_loss(cfg, comps.unet, comps.unet, comps.scheduler, comps.vae, build_reward("brightness"),
                           latents, emb, PROMPTS[:BATCH], k=cfg.k, generator=g, stage=lambda name: nullcontext(),
                           family=family)
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_the_exact_features_together_change_nothing_on_the_other_families(family_dirs, family):
    """SDXL's UNet and the SD3/FLUX transformers: the loss and LoRA gradients with every exact feature on are the
    plain step's to a reordering of float32 sums (sliced decode, channels-last convolutions, merged no-grad calls;
    checkpointing and offload alone: 0). Measured together: 0.9e-6 (SDXL), 1.4e-6 (SD3), 0.4e-6 (FLUX); tiled decode
    in their place: 0.17-0.85, so the comparison can fail."""
    model, resolution = family_dirs[family]
    ref_loss, ref = _family_step(model, resolution)
    loss, grads = _family_step(model, resolution, **TOGETHER)
    # every LoRA matrix has a gradient to compare, but SD3's last block's text query (its text output is dropped)
    assert sum(not g.abs().any() for g in ref) == (2 if family == "sd3" else 0)
    assert_rel_close(loss, ref_loss, REORDERED, f"{family}: loss")
    assert_rel_close(grads, ref, REORDERED, f"{family}: LoRA gradients")

# ------------------------------------------------------------------------------------------------------
# activation offload: on CPU we can check what the hooks do, not the GPU memory they free
# ------------------------------------------------------------------------------------------------------


def test_activation_offload_packs_every_saved_tensor_to_cpu_and_keeps_the_gradient(dirs, measure, monkeypatch):
    """With activation_offload every tensor autograd saves outside a checkpoint goes through torch's
    save_on_cpu hooks and is stored on the CPU; the bytes they hold equal the bytes saved without offload."""
    packed: list[torch.Tensor] = []
    real = torch.autograd.graph.save_on_cpu

    class RecordingSaveOnCpu(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pack = self.pack_hook

            def recording_pack(t):
                out = pack(t)
                packed.append(out[1])
                return out

            self.pack_hook = recording_pack

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", RecordingSaveOnCpu)
    on = run_step(dirs, vae_checkpointing="blocks", activation_offload=True)
    assert packed and all(t.device.type == "cpu" for t in packed)
    offloaded = sum(t.numel() * t.element_size() for t in packed)

    # the same step without offload, counting what autograd saves (outermost hooks see the same tensors)
    saved = []
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu",
                        lambda *a, **k: torch.autograd.graph.saved_tensors_hooks(
                            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t))
    off = run_step(dirs, vae_checkpointing="blocks", activation_offload=True)
    assert len(saved) == len(packed) and sum(saved) == offloaded
    print(f"activation_offload: {len(packed)} saved tensors, {offloaded / MIB:.2f} MiB stored on the CPU")
    _assert_same_grads(off, on)
    _assert_same_grads(measure(vae_checkpointing="blocks"), on)  # the same step without the hooks


# ------------------------------------------------------------------------------------------------------
# offload_frozen: which module sits where in which stage (the GPU saving itself is the benchmark's job)
# ------------------------------------------------------------------------------------------------------


def _placement_run(cfg: Config) -> list[tuple[str, str | None, dict[str, str]]]:
    """Run train(cfg) with every stage, every Placement move and every use of a frozen module recorded,
    together with where Placement says each module is at that moment: [(what, stage, where)]."""
    import contextlib

    import lowmem_alignprop.rewards as rewards_pkg
    import lowmem_alignprop.training.train as train_mod
    import lowmem_alignprop.training.train_setup as train_setup
    from lowmem_alignprop.memory.placement import Placement

    current: list[str] = []
    log: list[tuple[str, str | None, dict[str, str]]] = []
    places: list[Placement] = []

    def note(what: str) -> None:
        log.append((what, current[-1] if current else None, dict(places[0].where) if places else {}))

    real_stage = StageProfiler.stage

    @contextlib.contextmanager
    def stage(self, name):
        current.append(name)
        note(f"enter {name}")
        try:
            with real_stage(self, name):
                yield
        finally:
            current.pop()

    class RecordingPlacement(Placement):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            places.append(self)

        def _move(self, name, target, modules):
            before = self.where.get(name)
            super()._move(name, target, modules)
            if self.where.get(name) != before:  # a real move, not a request to stay
                note(f"move {name} {target}")

    real_load = train_setup.load_components

    def load_components(*args, **kwargs):  # every forward of a frozen module (recomputations too) is a use
        comps = real_load(*args, **kwargs)
        hooked = [("unet", comps.unet), ("text_encoder", comps.text_encoder), ("vae", comps.vae.decoder),
                  *(("vae", block) for block in comps.vae.decoder.up_blocks)]
        for what, module in hooked:
            module.register_forward_pre_hook(lambda m, a, what=what: note(f"use {what}"))
        return comps

    real_build_reward = rewards_pkg.build_reward

    def build_reward(*args, **kwargs):
        module = real_build_reward(*args, **kwargs)
        module.register_forward_pre_hook(lambda m, a: note("use reward"))
        return module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StageProfiler, "stage", stage)
        mp.setattr(train_setup, "Placement", RecordingPlacement)
        mp.setattr(train_setup, "load_components", load_components)
        mp.setattr(rewards_pkg, "build_reward", build_reward)
        train_mod.train(cfg)
    return log


@pytest.fixture(scope="module")
def placement_log(tiny_dir, tmp_path_factory):
    """offload_frozen=True on the tiny model: 2 steps, VAE checkpointed, a 1-image sample grid before and after."""
    runs = {}

    def get(cache: bool):
        if cache not in runs:
            cfg = Config(model=str(tiny_dir), resolution=64, sample_steps=3, k=1, batch_size=1, steps=2,
                         sample_prompts=1, offload_frozen=True, cache_prompt_embeddings=cache,
                         vae_checkpointing="blocks", output_dir=str(tmp_path_factory.mktemp("placement") / "run"))
            runs[cache] = _placement_run(cfg.validate())
            print("\n".join(f"{stage or '-':15s} {what:26s} {where}" for what, stage, where in runs[cache]))
        return runs[cache]
    return get


def _uses(log):
    return [(what.split()[1], stage, where) for what, stage, where in log if what.startswith("use")]


def _moves(log):
    return [(what.split()[1], what.split()[2], stage) for what, stage, _ in log if what.startswith("move")]


@pytest.mark.parametrize("cache", [True, False], ids=["cached_prompts", "encoded_per_step"])
def test_offload_frozen_parks_vae_and_reward_while_sampling(placement_log, cache):
    log = placement_log(cache)
    uses = _uses(log)
    assert {u[0] for u in uses} == {"text_encoder", "unet", "vae", "reward"}
    for module, stage, where in uses:
        # on the device whenever a stage runs it (outside the stages, a reward may be probed where it is parked)
        if module == "vae" or (module == "reward" and stage is not None):
            assert where[module] == "device", (module, stage, where)
        if module == "unet" and stage != stages.BACKWARD:  # sampling: the VAE and the reward model wait on the CPU
            assert where["vae"] == "cpu" and where["reward"] == "cpu", (stage, where)
    assert sum(what == f"enter {stages.BACKWARD}" for what, _, _ in log) == 2
    # backward recomputes the checkpointed UNet call and the decoder's up-blocks: both are uses, on the device
    assert {m for m, stage, _ in uses if stage == stages.BACKWARD} == {"unet", "vae"}
    for what, stage, where in log:
        if stage == stages.BACKWARD:
            assert where["vae"] == "device" and where["reward"] == "device", (what, where)
    # they come to the device only to decode and score (None: the sample grid, outside the steps' stages)
    for module in ("vae", "reward"):
        to_device = [stage for name, target, stage in _moves(log) if name == module and target == "device"]
        assert len(to_device) == 4 and set(to_device) <= {stages.DECODE, stages.REWARD, None}


@pytest.mark.parametrize("cache", [True, False], ids=["cached_prompts", "encoded_per_step"])
def test_offload_frozen_text_encoder_on_device_only_to_encode(placement_log, cache):
    log = placement_log(cache)
    uses = _uses(log)
    for module, stage, where in uses:
        if module == "text_encoder":
            assert where["text_encoder"] == "device", (stage, where)
    text = [(target, stage) for name, target, stage in _moves(log) if name == "text_encoder"]
    if cache:  # parked at load, on the device once to fill the cache, then it leaves the device for good
        assert [t for t, _ in text] == ["cpu", "device", "cpu"], text
        last_cpu = max(i for i, (what, _, _) in enumerate(log) if what == "move text_encoder cpu")
        assert all(where["text_encoder"] == "cpu" for _, _, where in log[last_cpu:])
    else:  # on the device only while encoding: never while the UNet samples
        assert all(where["text_encoder"] == "cpu" for module, _, where in uses if module == "unet")


# ---- the CUDA allocator's expandable segments (CUDA only: the calls into PyTorch are recorded here) ----------

@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda made to look available; what is asked of the allocator is recorded, not done."""
    from lowmem_alignprop.memory import placement

    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    for var in placement.ALLOC_CONF_VARS:
        monkeypatch.delenv(var, raising=False)
    return calls


def test_expandable_segments_are_switched_on_by_default(fake_cuda):
    from lowmem_alignprop.memory.placement import configure_cuda_allocator

    assert Config().expandable_segments is True
    assert configure_cuda_allocator(Config().expandable_segments) == "expandable segments"
    assert fake_cuda == ["expandable_segments:True"]


def test_expandable_segments_off_leaves_the_allocator_alone(fake_cuda):
    from lowmem_alignprop.memory.placement import configure_cuda_allocator

    assert configure_cuda_allocator(False) == "fixed segments"
    assert fake_cuda == []


@pytest.mark.parametrize("var", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_a_users_own_allocator_setting_wins(fake_cuda, monkeypatch, var):
    from lowmem_alignprop.memory.placement import configure_cuda_allocator

    monkeypatch.setenv(var, "max_split_size_mb:128")
    assert configure_cuda_allocator(True) == f"{var}=max_split_size_mb:128 (yours)"
    assert fake_cuda == []


def test_a_driver_without_expandable_segments_falls_back_with_the_reason(fake_cuda, monkeypatch):
    from lowmem_alignprop.memory.placement import configure_cuda_allocator

    def refuse(setting):
        raise RuntimeError("expandable_segments not supported on this platform")

    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", refuse)
    said = configure_cuda_allocator(True)
    assert said.startswith("fixed segments (expandable segments unavailable: expandable_segments not supported")


def test_no_allocator_setting_without_cuda(monkeypatch):
    from lowmem_alignprop.memory.placement import configure_cuda_allocator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings",
                        lambda s: pytest.fail("the allocator was configured without CUDA"))
    assert configure_cuda_allocator(True) == "cpu"


def test_on_windows_the_allocator_keeps_fixed_segments_and_says_so(fake_cuda, monkeypatch):
    """PyTorch builds expandable segments on Linux only; on Windows the setting would only warn."""
    import sys

    from lowmem_alignprop.memory.placement import configure_cuda_allocator

    monkeypatch.setattr(sys, "platform", "win32")
    assert configure_cuda_allocator(True) == "fixed segments (PyTorch has no expandable segments on Windows)"
    assert fake_cuda == []


def test_placement_moves_the_modules_themselves_not_only_its_record():
    """Placement's events are what the trainer's tests read; here the modules' own .to() calls: to_device sends them
    to the compute device, park to the CPU with offload_frozen (else they stay), offload to the CPU always, and a
    None module is skipped. (meta stands in for the compute device on a CPU build.)"""
    from lowmem_alignprop.memory.placement import Placement

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sent = []

        def to(self, device):
            self.sent.append(torch.device(device).type)
            return self

    for offload, parked in ((True, "cpu"), (False, "meta")):
        place, vae, reward, text = Placement(torch.device("meta"), offload), Spy(), Spy(), Spy()
        place.to_device("vae", vae, None)
        place.park("reward", reward)
        place.offload("text_encoder", text)
        place.park("vae", vae)
        assert (vae.sent, reward.sent, text.sent) == (["meta", parked], [parked], ["cpu"]), offload
        assert place.events == [("vae", "device"), ("reward", "cpu" if offload else "device"),
                                ("text_encoder", "cpu")] + ([("vae", "cpu")] if offload else [])

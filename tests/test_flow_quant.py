"""Quantized frozen base for the flow transformers and fp8 storage for every denoiser (issue 18).

* int8/nf4 (bitsandbytes, on this CPU as tests/test_quant.py runs it): the tiny SD3/FLUX transformers load with
  every Linear quantized, the analytic size is the measured one, LoRA trains on top through the flow rollout and
  the base does not move; a meta (random-weight) transformer is drawn and quantized block by block.
* fp8 (float8_e4m3fn storage, diffusers' layerwise casting): each stored weight is within e4m3's rounding bound of
  the original, a layer's output within ``||dW||_F ||x||`` of the full-precision layer's, the gradient is exactly
  that of the fp8-rounded weights in full precision, the stored bytes of the cast layers halve against bf16, and the
  planner's analytic count equals the measured one.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from flowmodels import FLOW_RESOLUTION, build_tiny_flux_dir, build_tiny_flux_pipeline, build_tiny_sd3_dir
from numerics import SAME_OPS, assert_rel_close

from lowmem_alignprop.memory import quant
from lowmem_alignprop.models import flow
from lowmem_alignprop.settings.config import Config

RES = FLOW_RESOLUTION
PROMPTS = ["a photo of a cat", "a red dog"]
GUIDANCE = {"sd3": 4.0, "flux": 3.5}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowquant")
    return {"sd3": build_tiny_sd3_dir(root / "sd3"), "flux": build_tiny_flux_dir(root / "flux")}


def _linears(model) -> int:
    return sum(1 for n, m in model.named_modules() if type(m) is nn.Linear and "lora_" not in n)


def _window_loss(pipe, name, seed=0):
    """-brightness of the images through a K=2 window of 4 Euler steps (the LoRA's gradient flows)."""
    emb = flow.encode_prompts(pipe, PROMPTS, "cpu", guidance_scale=GUIDANCE[name], max_sequence_length=16)
    lat, ids = flow.initial_latents(pipe.transformer, pipe.vae, 2, RES, RES, torch.Generator().manual_seed(seed))
    lh, lw = flow.latent_size(pipe.vae, RES, RES, name)
    flow.set_flow_timesteps(pipe.scheduler, pipe.transformer, 4, lh, lw)
    out = flow.rollout(pipe.transformer, pipe.scheduler, lat, emb, k=2, guidance_scale=GUIDANCE[name], img_ids=ids)
    return -flow.decode(pipe.vae, out, height=RES, width=RES).mean()


# -- int8 / nf4 ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, mode", [("sd3", "int8"), ("flux", "nf4")])
def test_the_transformer_loads_quantized_and_its_lora_trains(dirs, cpu_quant, name, mode):
    """load_components with base_quant: every Linear of the transformer is a bitsandbytes layer (the text encoders
    and VAE untouched), its bytes are the analytic ones, and two Adam steps of a LoRA through the checkpointed
    flow window lower the loss while the quantized base stays as it was."""
    from diffusers import DiffusionPipeline

    from lowmem_alignprop.models.loading import load_components

    plain = DiffusionPipeline.from_pretrained(dirs[name]).transformer
    n = _linears(plain)
    comps = load_components(Config(model=str(dirs[name]), base_quant=mode))
    tr = comps.unet
    assert quant.count_quantized(tr) == {"int8": n if mode == "int8" else 0, "nf4": n if mode == "nf4" else 0,
                                         "linear": 0}
    assert quant.count_quantized(comps.text_encoder)[mode] == 0 and comps.vae.dtype == torch.float32
    assert quant.measured_weight_bytes(tr) == quant.quantized_weight_bytes(plain, mode) < \
        quant.quantized_weight_bytes(plain, "none")
    params = flow.add_flow_lora(tr, rank=4, seed=0)
    tr.train()  # bitsandbytes' nf4 on the CPU runs in train mode (tests/test_quant.py)
    assert params and all(p.dtype == torch.float32 for p in params)
    base = {k: v.detach().clone() for k, v in tr.named_parameters() if not v.requires_grad}
    comps.vae.requires_grad_(False)
    pipe = _pipeline(comps)
    opt = torch.optim.Adam(params, lr=0.05)
    losses = []
    for _ in range(2):
        loss = _window_loss(pipe, name)
        opt.zero_grad()
        loss.backward()
        assert sum(p.grad.abs().sum().item() for p in params) > 0
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(_window_loss(pipe, name).item())  # after the two updates
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(v.detach(), base[k]) for k, v in tr.named_parameters() if k in base)


def _pipeline(comps):
    """A pipeline object over the loaded components (the prompt encoders of the model's own pipeline)."""
    from lowmem_alignprop.models.family import family_for

    pipe = family_for(comps).make_pipeline(comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_a_meta_transformer_is_drawn_and_quantized_block_by_block(cpu_quant, mode):
    """The random-weight path (sd35m/sd35l/flux): a meta FLUX transformer becomes real and quantized one block at a
    time; the result is the same kind of model as an in-place quantized one, at the analytic size."""
    from diffusers import FluxTransformer2DModel

    from lowmem_alignprop.models.block_loading import materialize_quantized

    config = build_tiny_flux_pipeline().transformer.config
    with torch.device("meta"):
        tr = FluxTransformer2DModel.from_config(config)
    n = _linears(tr)
    analytic = quant.quantized_weight_bytes(tr.to(torch.float32), mode)
    assert materialize_quantized(tr, "cpu", mode, torch.float32, seed=0) == n
    assert not any(t.is_meta for t in list(tr.parameters()) + list(tr.buffers()))
    assert quant.count_quantized(tr)[mode] == n and quant.measured_weight_bytes(tr) == analytic
    assert getattr(tr, "is_loaded_in_8bit" if mode == "int8" else "is_loaded_in_4bit")
    tr.train()
    out = tr(hidden_states=torch.randn(1, 64, 64), timestep=torch.ones(1), guidance=torch.full((1,), 3.5),
             pooled_projections=torch.randn(1, 32), encoder_hidden_states=torch.randn(1, 16, 32),
             txt_ids=torch.zeros(16, 3), img_ids=torch.zeros(64, 3), return_dict=False)[0]
    assert out.shape == (1, 64, 64) and torch.isfinite(out).all()


# -- fp8 storage -----------------------------------------------------------------------------------------------

E4M3_UNIT = 2.0 ** -4  # half the spacing of e4m3's 3-bit mantissa, relative: |fl(w) - w| <= 2^-4 |w| when normal
E4M3_MIN_NORMAL = 2.0 ** -6
E4M3_SUBNORMAL_HALF_STEP = 2.0 ** -10  # subnormal spacing 2^-9: absolute rounding error <= 2^-10


def _models():
    """{name: (a plain denoiser, fixed inputs of its forward)} for the tiny FLUX transformer and the tiny UNet."""
    from diffusers import UNet2DConditionModel

    from lowmem_alignprop.models.tiny import tiny_model_dir

    g = torch.Generator().manual_seed(0)
    flux = build_tiny_flux_pipeline().transformer
    flux_in = dict(hidden_states=torch.randn(1, 64, 64, generator=g), timestep=torch.ones(1) * 0.5,
                   guidance=torch.full((1,), 3.5), pooled_projections=torch.randn(1, 32, generator=g),
                   encoder_hidden_states=torch.randn(1, 16, 32, generator=g), txt_ids=torch.zeros(16, 3),
                   img_ids=torch.zeros(64, 3), return_dict=False)
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir(), subfolder="unet")
    unet_in = dict(sample=torch.randn(1, 4, 32, 32, generator=g), timestep=500,
                   encoder_hidden_states=torch.randn(1, 16, 32, generator=g), return_dict=False)
    return {"flux": (flux, flux_in), "unet": (unet, unet_in)}


@pytest.fixture(scope="module")
def models():
    return _models()


def _with_lora_and_fp8(model, dtype=torch.float32):
    """A copy with LoRA (values that matter) and fp8 storage, as step.apply_memory_features does it."""
    from lowmem_alignprop.models.loading import add_lora

    m = copy.deepcopy(model).requires_grad_(False)
    params = flow.add_flow_lora(m, 4, seed=0) if hasattr(m, "transformer_blocks") else add_lora(m, 4, 4, 0)
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return m, params


@pytest.mark.parametrize("which", ["flux", "unet"])
def test_fp8_weights_are_within_e4m3_rounding_and_their_gradient_is_the_rounded_models(models, which):
    """Every cast weight is its e4m3 rounding (relative 2^-4 in the normal range, absolute 2^-10 below it); a cast
    layer's output is within ||dW||_F ||x|| + ||db|| of the full-precision layer's; LoRA weights stay fp32; and
    the LoRA gradient through the fp8 model is exactly (SAME_OPS) that of the same model with its weights replaced
    by their fp8 rounding in fp32: storage and upcast lose nothing beyond the rounding."""
    model, inputs = models[which]
    ours, params = _with_lora_and_fp8(model)
    reference = copy.deepcopy(ours)
    names = [n for n, _ in quant.fp8_linears(ours)]
    assert names and quant.store_fp8(ours, torch.float32) == len(names)
    assert all(p.dtype == torch.float32 for p in params) and all(p.requires_grad for p in params)
    layers = dict(ours.named_modules())
    ref_layers = dict(reference.named_modules())
    x = torch.randn(3, layers[names[0]].in_features, generator=torch.Generator().manual_seed(1))
    for name in names:
        w, w8 = ref_layers[name].weight.detach(), layers[name].weight.detach().float()
        assert layers[name].weight.dtype == quant.FP8
        bound = torch.where(w.abs() >= E4M3_MIN_NORMAL, E4M3_UNIT * w.abs(),
                            torch.full_like(w, E4M3_SUBNORMAL_HALF_STEP))
        assert ((w8 - w).abs() <= bound).all(), name
    first, ref_first = layers[names[0]], ref_layers[names[0]]
    with torch.no_grad():
        err = (first(x) - ref_first(x)).norm()
        dw = (first.weight.float() - ref_first.weight).norm()
        db = (first.bias.float() - ref_first.bias).norm() * 3 ** 0.5 if first.bias is not None else 0.0
    assert 0 < err <= dw * x.norm() + db + SAME_OPS * ref_first(x).norm()
    with torch.no_grad():  # the reference: the fp8 rounding written into full-precision weights
        for name in names:
            for attr in ("weight", "bias"):
                t = getattr(ref_layers[name], attr)
                if t is not None:
                    t.copy_(t.to(quant.FP8).float())
    ref_params = [p for p in reference.parameters() if p.requires_grad]
    out, ref_out = ours(**inputs)[0], reference(**inputs)[0]
    assert_rel_close(out, ref_out, SAME_OPS, f"{which}: fp8 storage vs rounded weights in fp32")
    grads = torch.autograd.grad(out.square().mean(), params)
    ref_grads = torch.autograd.grad(ref_out.square().mean(), ref_params)
    assert_rel_close(grads, ref_grads, SAME_OPS, f"{which}: LoRA gradient through fp8 storage")
    plain = model(**inputs)[0]
    assert 0 < (out - plain).norm() / plain.norm() < 0.25  # quantized, still the same network (sanity, as nf4)


@pytest.mark.parametrize("which", ["flux", "unet"])
def test_fp8_halves_the_stored_bytes_of_the_cast_layers_and_the_planner_counts_them(models, which):
    """In bf16, the cast layers' bytes halve: the model's measured bytes drop by exactly one byte per cast weight
    and bias element, and quant.quantized_weight_bytes (the planner's analytic figure, on the plain model) is the
    measured size."""
    model, _ = models[which]
    bf16, _ = _with_lora_and_fp8(model.to(torch.bfloat16))
    model.to(torch.float32)
    cast = quant.fp8_linears(bf16)
    elements = sum(t.numel() for _, m in cast for t in (m.weight, m.bias) if t is not None)
    before = quant.measured_weight_bytes(bf16)
    analytic = quant.quantized_weight_bytes(bf16, "fp8")
    quant.store_fp8(bf16, torch.bfloat16)
    cast_bytes = sum(t.untyped_storage().nbytes() for _, m in cast for t in (m.weight, m.bias) if t is not None)
    assert cast_bytes == elements  # 1 byte each, half of bf16's 2
    assert quant.measured_weight_bytes(bf16) == before - elements == analytic


def test_fp8_int8_nf4_sizes_of_the_shipped_transformers_on_meta():
    """The planner's figures for the full-size transformers in bf16 (built on meta, nothing allocated), GB. fp8
    keeps what diffusers' layerwise casting leaves alone (the norms' modulation layers: 3.2B of FLUX's 11.9B) in
    bf16, so it stores FLUX in 15.2 GB where int8 (every Linear) takes 11.9."""
    import diffusers

    from test_flow import ARCH_FLOW

    sizes = {}
    for name, cls in (("flux", "FluxTransformer2DModel"), ("sd35m", "SD3Transformer2DModel")):
        model_cls = getattr(diffusers, cls)
        with torch.device("meta"):
            tr = model_cls.from_config(model_cls.load_config(ARCH_FLOW / name / "transformer")).to(torch.bfloat16)
        sizes[name] = {m: quant.quantized_weight_bytes(tr, m) / 1e9 for m in ("none", "int8", "nf4", "fp8")}
    print(sizes)
    assert sizes["flux"] == pytest.approx({"none": 23.80, "int8": 11.92, "nf4": 6.14, "fp8": 15.15}, abs=0.01)
    assert sizes["sd35m"] == pytest.approx({"none": 4.94, "int8": 2.70, "nf4": 1.61, "fp8": 3.46}, abs=0.01)


def test_fp8_trains_end_to_end_on_tiny_flux(dirs, tmp_path, fresh_log_handlers, caplog):
    """Two trainer steps with base_quant=fp8 on the CPU (no bitsandbytes): the run's LoRA moved. The log counts the
    fp8 layers once, the whole count (the model read block by block stored some before LoRA: it said a part)."""
    import logging
    import re

    from safetensors.torch import load_file

    from lowmem_alignprop.cli import main

    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    assert main(["--profile", "cpu", "--seed", "0", "--model", str(dirs["flux"]), "--set", f"resolution={RES}",
                 "--set", "sample_steps=4", "--set", "k=2", "--set", "batch_size=1", "--set", "guidance_scale=3.5",
                 "--set", "sample_prompts=0", "--set", "lr=0.05", "--set", "base_quant=fp8", "--set",
                 "unet_checkpointing=blocks", "--steps", "2", "--output-dir", str(out)]) == 0
    lora = load_file(str(next((out / "lora").glob("*.safetensors"))))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    counts = [m for r in caplog.records if re.search(r"\d+ (Linear )?layers", m := r.getMessage())]
    assert len(counts) == 1 and "fp8" in counts[0], counts


def test_the_planner_counts_fp8_storage(dirs):
    """plan with base_quant=fp8 (CPU target: no bitsandbytes needed): the transformer's weights drop by the analytic
    saving, one block's upcast copies are added, and the note says so."""
    from lowmem_alignprop.measure import planner

    cfg = Config(model=str(dirs["flux"]), resolution=RES, sample_steps=4, k=2, guidance_scale=3.5,
                 unet_checkpointing="blocks").validate()
    plain = planner.estimate(cfg, target="cpu")
    fp8 = planner.estimate(dataclasses.replace(cfg, base_quant="fp8"), target="cpu")
    tr = build_tiny_flux_pipeline().transformer
    flow.add_flow_lora(tr, cfg.lora_rank, seed=0)
    saved = quant.quantized_weight_bytes(tr, "none") - quant.quantized_weight_bytes(tr, "fp8")
    assert saved > 0
    assert plain.weights["unet"] - fp8.weights["unet"] == pytest.approx(saved, rel=0.01)
    assert any("base_quant=fp8" in n and "upcast" in n for n in fp8.notes)


# -- which model a quantized FLUX.1 base is -------------------------------------------------------------------------

_FP8_SETS = {"fp8": ["--set", "unet_checkpointing=blocks"]}  # (base_quant=fp8 trains with per-block checkpointing)


def _fast(model, run) -> list[str]:
    return ["--profile", "cpu", "--model", str(model), "--output-dir", str(run), "--set", "sample_prompts=0",
            "--set", "sample_steps=2", "--set", "batch_size=1", "--set", "k=1", "--set", f"resolution={RES}"]


def _codes(model, mode: str) -> list[float]:
    """The fingerprint's statistics of FLUX.1's first weight (its timestep embedder's Linear) as the bitsandbytes
    codes ``mode`` stores it in (none: the weight as read): what records of int8/nf4 runs held before the
    fingerprint took the weight as read (a run of the plain model: what its records hold, before and now)."""
    from lowmem_alignprop.models.loading import load_components

    w = next(load_components(Config(model=str(model), base_quant=mode)).unet.parameters()).detach().float().flatten()
    return [w.mean().item(), w.std().item()] + w[:8].tolist()


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_a_flux_resume_may_change_base_quant(dirs, cpu_quant, tmp_path, fresh_log_handlers, caplog, mode):
    """A FLUX.1 resume none -> int8 -> none (and none -> fp8 -> none) trains on, the change said and recorded (the
    fingerprint held statistics of the first weight, a Linear that int8/nf4 turn into codes: "belongs to another base
    model ... its transformer weights differ"). A checkpoint of an int8 run recorded before (the codes' statistics)
    resumes with int8."""
    import json
    import logging

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.run import checkpoint as ckpt

    run = tmp_path / "run"
    fast = [*_fast(dirs["flux"], run), *_FP8_SETS.get(mode, [])]
    assert main([*fast, "--steps", "1"]) == 0
    plain = _codes(dirs["flux"], "none")
    assert json.loads((run / "lora" / "base_model.json").read_text())["conv_in"] == plain  # (as before the fix)
    for step, (was, now) in ((2, ("none", mode)), (3, (mode, "none"))):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
            assert main([*fast, "--resume", "latest", "--steps", str(step), "--set", f"base_quant={now}"]) == 0, \
                caplog.text
        assert f"resume: base_quant was {was!r} in the checkpoint, now {now!r}" in caplog.text
    changes = json.loads((run / "summary.json").read_text())["resume_changes"]
    assert changes[-2:] == [{"step": 2, "changes": {"base_quant": ["none", mode]}},
                            {"step": 3, "changes": {"base_quant": [mode, "none"]}}], changes
    if mode == "fp8":  # (fp8 keeps the first weight, an embedder, as read: no record of codes before)
        return
    step2 = ckpt.step_dir(ckpt.root_of(run), 2)  # trained on int8: its record as written before the fix
    state = json.loads((step2 / "state.json").read_text())
    codes = _codes(dirs["flux"], "int8")
    assert abs(codes[1] - state["fingerprint"]["conv_in"][1]) > 1  # (codes' std ~70, the weights' ~0.04)
    state["fingerprint"]["conv_in"] = codes
    state["fingerprint"].pop("quantized_conv_in", None)
    (step2 / "state.json").write_text(json.dumps(state))
    (step2 / "manifest.json").unlink()
    ckpt.write_manifest(step2)
    assert main([*_fast(dirs["flux"], run), "--resume", str(step2), "--steps", "3", "--set", "base_quant=int8"]) == 0


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp8"])
def test_a_quantized_flux_lora_belongs_to_the_plain_model(dirs, cpu_quant, tmp_path, fresh_log_handlers, caplog,
                                                          mode):
    """`sample` and `export --merge` of a LoRA trained on an int8/nf4 (or fp8) FLUX.1 base load the plain model: its
    record names it as the LoRA's base (its statistics of the first weight were the codes': "its transformer weights
    differ", a warning from sample, a refusal from the merge)."""
    import json

    from loras import assert_samples_and_merges_on_its_base

    from lowmem_alignprop.cli import main

    run = tmp_path / mode
    assert main([*_fast(dirs["flux"], run), *_FP8_SETS.get(mode, []), "--steps", "1",
                 "--set", f"base_quant={mode}"]) == 0
    record = json.loads((run / "lora" / "base_model.json").read_text())
    assert record["conv_in"] == _codes(dirs["flux"], "none")  # the weight as read, the plain model's record
    # (fp8 stores the first weight, an embedder outside the blocks, as read: no codes to record)
    assert record.get("quantized_conv_in") == (None if mode == "fp8" else _codes(dirs["flux"], mode))
    assert_samples_and_merges_on_its_base(run / "lora", tmp_path, caplog)

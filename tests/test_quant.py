"""Quantized frozen base UNet (bitsandbytes int8/nf4 under fp32 LoRA): which layers, sizes, gradients, errors.

bitsandbytes runs on this CPU once diffusers' "No GPU found" check is bypassed (here, by monkeypatch) and
our own CUDA check is lifted with LOWMEM_ALIGNPROP_QUANT_ON_CPU=1 (docs/design.md section 8). The GPU side
(weight bytes and peak memory against fp16) is ``gpu_verify_quant`` in benchmarks/verify_quant.py, run by benchmarks/gpu_check.py.
"""

import sys

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from lowmem_alignprop.memory import quant  # noqa: E402
from lowmem_alignprop.settings.config import Config  # noqa: E402
from lowmem_alignprop.settings.errors import UserError  # noqa: E402
from lowmem_alignprop.models.loading import add_lora, load_components, module_bytes  # noqa: E402


@pytest.fixture
def cpu_quant(monkeypatch):
    """Let bitsandbytes quantize on the CPU: bypass diffusers' GPU check and ours (tests only)."""
    from diffusers.quantizers.bitsandbytes import bnb_quantizer as bq

    monkeypatch.setattr(bq.BnB4BitDiffusersQuantizer, "validate_environment", lambda self, *a, **k: None)
    monkeypatch.setattr(bq.BnB8BitDiffusersQuantizer, "validate_environment", lambda self, *a, **k: None)
    monkeypatch.setenv(quant.CPU_OVERRIDE_ENV, "1")


def _plain_unet(tiny_dir):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet").requires_grad_(False)


def _layer_census(model):
    kinds = {}
    for name, m in model.named_modules():
        if "lora_" in name:
            continue
        kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
    return kinds


def _inputs(seed=0, batch=2, side=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, side, side, generator=g), torch.randn(batch, 16, 32, generator=g)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_only_linear_layers_are_quantized(tiny_dir, cpu_quant, mode):
    plain = _plain_unet(tiny_dir)
    before = _layer_census(plain)
    n_linear = before["Linear"]
    assert n_linear == 50  # attention projections, feed-forwards, proj_in/out, time embedding of the tiny UNet
    for unet in (quant.load_quantized_unet(str(tiny_dir), mode, torch.float32), _plain_unet(tiny_dir)):
        if quant.count_quantized(unet)[mode] == 0:
            assert quant.quantize_in_place(unet, mode, torch.float32) == n_linear
        counts = quant.count_quantized(unet)
        assert counts == {"int8": n_linear if mode == "int8" else 0, "nf4": n_linear if mode == "nf4" else 0,
                          "linear": 0}
        after = _layer_census(unet)
        for kind in ("Conv2d", "GroupNorm", "LayerNorm"):  # everything that is not Linear stays as it was
            assert after.get(kind, 0) == before.get(kind, 0) > 0
        for name, m in unet.named_modules():
            if isinstance(m, (nn.Conv2d, nn.GroupNorm, nn.LayerNorm)):
                assert m.weight.dtype == torch.float32, name


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_in_place_and_diffusers_paths_agree(tiny_dir, cpu_quant, mode):
    a = quant.load_quantized_unet(str(tiny_dir), mode, torch.float32).train()  # nf4 on CPU needs train mode
    b = _plain_unet(tiny_dir)
    quant.quantize_in_place(b, mode, torch.float32)
    b.train()
    x, enc = _inputs()
    with torch.no_grad():
        ya = a(x, 10, encoder_hidden_states=enc).sample
        yb = b(x, 10, encoder_hidden_states=enc).sample
        yp = _plain_unet(tiny_dir)(x, 10, encoder_hidden_states=enc).sample
    assert torch.equal(ya, yb)  # same quantized weights, bit for bit
    err = ((ya - yp).norm() / yp.norm()).item()
    assert 0 < err < (0.05 if mode == "int8" else 0.25), err  # quantized, but still the same network
    assert quant.measured_weight_bytes(a) == quant.measured_weight_bytes(b)


@pytest.mark.parametrize("mode,double_quant", [("int8", True), ("nf4", True), ("nf4", False)])
def test_analytic_bytes_equal_measured(tiny_dir, cpu_quant, mode, double_quant):
    unet = _plain_unet(tiny_dir)
    plain = module_bytes(unet)
    assert quant.quantized_weight_bytes(unet, "none") == plain
    analytic = quant.quantized_weight_bytes(unet, mode, double_quant=double_quant)
    quant.quantize_in_place(unet, mode, torch.float32, double_quant=double_quant)
    assert quant.measured_weight_bytes(unet) == analytic  # exact, scales included
    # the analytic figure also reads right off the quantized model itself (planner may get either)
    assert quant.quantized_weight_bytes(unet, mode, double_quant=double_quant) == analytic
    linear_w = sum(m.in_features * m.out_features for m in _plain_unet(tiny_dir).modules() if type(m) is nn.Linear)
    saved = plain - analytic
    per_weight = {"int8": 3, "nf4": 3.5}[mode]  # fp32 -> 1 byte or 0.5 byte, less the scales
    assert 0.85 * per_weight * linear_w < saved < per_weight * linear_w


def test_sd15_and_sdxl_savings_on_meta():
    """The planner's numbers for the shipped architectures in fp16 (built on meta: nothing allocated)."""
    from diffusers import UNet2DConditionModel

    from lowmem_alignprop.models.arch import arch_config_dir, default_dtype

    gib = {}
    for name in ("sd15", "sdxl"):
        config = UNet2DConditionModel.load_config(arch_config_dir(name), subfolder="unet")
        with torch.device("meta"), default_dtype(torch.float16):
            unet = UNet2DConditionModel.from_config(config)
        assert quant.quantized_weight_bytes(unet, "none") == module_bytes(unet)
        gib[name] = {m: quant.quantized_weight_bytes(unet, m) / 2**30 for m in ("none", "int8", "nf4")}
    # SD1.5's UNet is mostly convolutions: nf4 saves ~0.37 GiB of 1.60; SDXL's is mostly Linear: ~3.1 of 4.78
    assert gib["sd15"]["none"] == pytest.approx(1.601, abs=0.01)
    assert gib["sd15"]["none"] - gib["sd15"]["nf4"] == pytest.approx(0.373, abs=0.01)
    assert gib["sd15"]["none"] - gib["sd15"]["int8"] == pytest.approx(0.251, abs=0.01)
    assert gib["sdxl"]["none"] - gib["sdxl"]["nf4"] == pytest.approx(3.086, abs=0.02)
    assert gib["sdxl"]["none"] - gib["sdxl"]["int8"] == pytest.approx(2.074, abs=0.02)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_lora_trains_on_the_quantized_base(tiny_dir, cpu_quant, mode):
    unet = quant.load_quantized_unet(str(tiny_dir), mode, torch.float32)
    params = add_lora(unet, rank=4, alpha=4, seed=0)
    unet.train()
    lora_names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert lora_names and all("lora_" in n for n in lora_names)
    assert all(p.dtype == torch.float32 for p in params)  # LoRA weights stay full precision
    # peft wrapped the bitsandbytes layers with its bnb LoRA layers (not plain Linear LoRA)
    wrapped = [m for n, m in unet.named_modules() if n.endswith("attn1.to_q")]
    assert wrapped and type(wrapped[0]).__module__.startswith("peft.tuners.lora.bnb")
    frozen_before = quant.measured_weight_bytes(unet) - sum(p.numel() * 4 for p in params)
    base_snapshot = {n: p.detach().clone() for n, p in unet.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, enc = _inputs()
    losses = []
    for _ in range(3):
        out = unet(x, 10, encoder_hidden_states=enc).sample
        loss = out.square().mean()
        loss.backward()
        grads = [p.grad for p in params]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0
        assert all(p.grad is None for n, p in unet.named_parameters() if not p.requires_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the LoRA on top of the quantized base learns
    for n, p in unet.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), base_snapshot[n]), n  # the quantized base did not move
    assert quant.measured_weight_bytes(unet) - sum(p.numel() * 4 for p in params) == frozen_before



@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_layers_store_no_more_for_backward_than_linear(tiny_dir, cpu_quant, mode):
    """What a quantized UNet keeps alive for backward equals the unquantized UNet's, with and without
    activation checkpointing. Without quant.prepare_quantized_layers: bitsandbytes' layers return their
    input's dtype, so float32 inputs (autocast keeps LayerNorm outputs and the timestep embedding in
    float32) made every activation downstream float32 (and on CPU a GroupNorm dtype error); and its 8-bit
    matmul kept each layer's input on its autograd node, out of checkpointing's reach."""
    from torch.utils.checkpoint import checkpoint

    from lowmem_alignprop.measure.cpu_allocation import CpuAllocationTracker
    from lowmem_alignprop.measure.resident_tensors import run_objects_only

    dtype = torch.bfloat16  # CPU autocast's half type; on CUDA the same code runs in float16
    x, enc = _inputs(batch=1, side=8)  # 0.46 MB kept for backward; 12% more when int8 layers keep their inputs

    def measure(unet):
        params = add_lora(unet, rank=4, alpha=4, seed=0)
        unet.train()
        retained = {}
        for how in ("plain", "checkpointed"):
            def call(latents):
                return unet(latents, 10, encoder_hidden_states=enc).sample
            with CpuAllocationTracker(count_baseline=False) as tracker, torch.autocast("cpu", dtype=dtype):
                out = checkpoint(call, x, use_reentrant=False) if how == "checkpointed" else call(x)
            assert out.dtype == dtype
            retained[how] = tracker.retained - out.numel() * out.element_size()
            for p in params:
                p.grad = None
            out.float().square().mean().backward()
        grads = torch.cat([p.grad.flatten() for p in params])
        return retained, out.detach().float(), grads

    # the trackers' collections and scans walk only the objects made here (each walk of the whole process: ~1 s)
    with run_objects_only():
        plain, plain_out, _ = measure(_plain_unet(tiny_dir).to(dtype))
        unet = _plain_unet(tiny_dir).to(dtype)
        n = quant.quantize_in_place(unet, mode, dtype)
        assert quant.prepare_quantized_layers(unet) == n  # every quantized layer, once (a second call adds nothing)
        retained, out, grads = measure(unet)
    assert (out - plain_out).norm() / plain_out.norm() < 0.2  # the same model, quantized
    assert plain["plain"] > 100_000 and plain["checkpointed"] < 10_000
    assert retained["plain"] == pytest.approx(plain["plain"], rel=0.02)
    assert retained["checkpointed"] == pytest.approx(plain["checkpointed"], abs=10_000)
    # the gradient does not need what was dropped: the same as with bitsandbytes left alone
    raw = _plain_unet(tiny_dir).to(dtype)
    quant.quantize_in_place(raw, mode, dtype)
    for m in raw.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    raw_params = add_lora(raw, rank=4, alpha=4, seed=0)
    raw.train()
    for m in raw.modules():  # add_lora prepared the wrappers: undo it
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    with torch.autocast("cpu", dtype=dtype):
        raw_out = checkpoint(lambda latents: raw(latents, 10, encoder_hidden_states=enc).sample, x.to(dtype),
                             use_reentrant=False)
    raw_out.float().square().mean().backward()  # the same input and loss as measure()'s last call
    raw_grads = torch.cat([p.grad.flatten() for p in raw_params])
    assert torch.allclose(grads, raw_grads, rtol=1e-2, atol=1e-6)
    # one layer: a float32 input under autocast gives the autocast dtype, as nn.Linear does
    layer = next(m for m in unet.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
    with torch.autocast("cpu", dtype=dtype):
        assert layer(torch.randn(3, layer.in_features)).dtype == dtype
    assert layer(torch.randn(3, layer.in_features, dtype=dtype)).dtype == dtype  # no autocast: left alone


def test_load_components_quantizes_the_unet(tiny_dir, cpu_quant):
    comps = load_components(Config(model=str(tiny_dir), base_quant="nf4"))
    assert quant.count_quantized(comps.unet)["nf4"] == 50
    assert quant.count_quantized(comps.text_encoder)["nf4"] == 0  # only the UNet
    assert comps.vae.dtype == torch.float32


def test_missing_bitsandbytes_is_a_user_error(tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        quant.require_bitsandbytes("nf4")
    with pytest.raises(UserError, match="base_quant=nf4 needs bitsandbytes"):
        Config(base_quant="nf4").validate().check_installed()  # train checks it; a plan needs no bitsandbytes
    with pytest.raises(UserError, match="needs bitsandbytes"):
        load_components(Config(model=str(tiny_dir), base_quant="int8"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_no_cuda_is_a_user_error(tiny_dir, monkeypatch):
    monkeypatch.delenv(quant.CPU_OVERRIDE_ENV, raising=False)
    with pytest.raises(UserError, match="needs a CUDA GPU.*base_quant=none"):
        load_components(Config(model=str(tiny_dir), base_quant="nf4"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the query without a GPU")
def test_bnb_mode_is_a_query_the_check_is_apart(monkeypatch):
    """Which bitsandbytes mode a config loads with is answered without checking bitsandbytes or the device (no GPU
    here, no CPU override: the check alone raises)."""
    from lowmem_alignprop.models.loading import _bnb_mode, _check_quant

    monkeypatch.delenv(quant.CPU_OVERRIDE_ENV, raising=False)
    assert [_bnb_mode(Config(base_quant=m)) for m in ("none", "int8", "nf4", "fp8")] == ["none", "int8", "nf4", "none"]
    _check_quant(Config(base_quant="fp8"))  # fp8 needs neither bitsandbytes nor CUDA
    with pytest.raises(UserError, match="base_quant=int8 needs a CUDA GPU"):
        _check_quant(Config(base_quant="int8"))


def test_train_end_to_end_with_int8_base(tiny_dir, cpu_quant, tmp_path):
    from lowmem_alignprop.training.train import train

    cfg = Config(model=str(tiny_dir), base_quant="int8", output_dir=str(tmp_path / "run"), steps=2, resolution=64,
                 sample_steps=3, k=1, batch_size=1, sample_prompts=0, lr=0.01).validate()
    summary = train(cfg, profile_name="test")
    assert summary["steps"] == 2
    assert (tmp_path / "run" / "lora").is_dir()
    from safetensors.torch import load_file
    lora = load_file(next((tmp_path / "run" / "lora").glob("*.safetensors")))
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k)


def _verify_quant():
    """benchmarks/verify_quant.py (a benchmark script, not part of the package), imported by path."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "verify_quant.py"
    spec = importlib.util.spec_from_file_location("verify_quant", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU answer of the GPU check")
def test_gpu_verify_reports_without_cuda(tmp_path):
    result = _verify_quant().gpu_verify_quant(tmp_path)
    assert result["ok"] is False and result["error"] == "no CUDA device"


def test_gpu_verify_flow_runs_on_cpu_with_a_small_unet(tiny_dir, cpu_quant, tmp_path):
    """The GPU check's own logic (build, quantize both ways, LoRA fwd+bwd, report), on CPU with the tiny UNet."""
    import json

    result = _verify_quant().gpu_verify_quant(tmp_path, device="cpu", arch=str(tiny_dir), latent=16, tokens=8)
    modes = result["modes"]
    assert list(modes) == ["fp32", "int8", "nf4", "nf4_diffusers_from_pretrained"], modes
    assert result["ok"], {k: v.get("error") for k, v in modes.items()}
    for label in ("int8", "nf4", "nf4_diffusers_from_pretrained"):
        e = modes[label]
        assert e["measured_weight_bytes"] == e["analytic_weight_bytes"] < modes["fp32"]["measured_weight_bytes"]
        assert e["weight_saving_bytes"] > 0 and e["lora_grads_present"] == e["lora_tensors"] == 64
        assert 0 < e["output_rel_error_vs_fp16"] < 0.3
    assert modes["nf4"]["measured_weight_bytes"] == modes["nf4_diffusers_from_pretrained"]["measured_weight_bytes"]
    assert result["analytic_gib"]["sdxl"]["nf4"] == pytest.approx(1.696, abs=0.01)
    assert json.loads((tmp_path / "quant_gpu.json").read_text())["ok"] is True


def test_a_unet_of_fp16_variant_files_loads_quantized(tiny_dir, cpu_quant, tmp_path):
    """A model folder of only fp16-variant files (diffusers' variant="fp16") with base_quant: the quantized UNet is
    read from those files (diffusers' loader was asked for the plain ones and failed), the same layers quantized as
    from the plain folder."""
    import shutil

    from diffusers import StableDiffusionPipeline

    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.settings.config import Config

    folder = tmp_path / "fp16"
    StableDiffusionPipeline.from_pretrained(tiny_dir).save_pretrained(folder, variant="fp16")
    shutil.copytree(tiny_dir, tmp_path / "plain")
    ours, plain = (load_components(Config(model=str(f), base_quant="int8")).unet for f in (folder, tmp_path / "plain"))
    assert quant.count_quantized(ours) == quant.count_quantized(plain) and quant.count_quantized(ours)["int8"] == 50
    theirs = plain.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())



_FP8_SETS = {"fp8": ["--set", "unet_checkpointing=blocks"]}  # (base_quant=fp8 trains with per-block checkpointing)


def _fast(tiny_dir, run):
    return ["--profile", "cpu", "--model", str(tiny_dir), "--output-dir", str(run), "--set", "sample_prompts=0",
            "--set", "sample_steps=2", "--set", "batch_size=1", "--set", "k=1", "--set", "resolution=32"]


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_a_resume_may_change_base_quant(tiny_dir, cpu_quant, tmp_path, caplog, mode):
    """base_quant is how the frozen base is stored, not which model it is: a resume none -> int8 -> none (and
    none -> fp8 -> none, with the per-block checkpointing fp8 needs) trains on, the change said and recorded as other
    changes of what the LoRA trained with are (bitsandbytes adds quantization_config to the UNet's config, which the
    fingerprint's digest took in: "belongs to another base model"). A checkpoint of an int8 start recorded before
    the digest left it out resumes with int8 as it did."""
    import json
    import logging

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.run import checkpoint as ckpt

    run = tmp_path / "run"
    fast = [*_fast(tiny_dir, run), *_FP8_SETS.get(mode, [])]
    assert main([*fast, "--steps", "1"]) == 0
    for step, (was, now) in ((2, ("none", mode)), (3, (mode, "none"))):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
            assert main([*fast, "--resume", "latest", "--steps", str(step), "--set", f"base_quant={now}"]) == 0
        assert f"resume: base_quant was {was!r} in the checkpoint, now {now!r}" in caplog.text
    changes = json.loads((run / "summary.json").read_text())["resume_changes"]
    assert changes[-2:] == [{"step": 2, "changes": {"base_quant": ["none", mode]}},
                            {"step": 3, "changes": {"base_quant": [mode, "none"]}}], changes
    if mode == "fp8":  # (layerwise casting after the load: no other config, nothing recorded before to resume)
        return
    # step 2 trained on int8: its record as written before the fix (the digest with quantization_config)
    step2 = ckpt.step_dir(ckpt.root_of(run), 2)
    state = json.loads((step2 / "state.json").read_text())
    fp = state["fingerprint"]
    assert fp["quantized_config_sha"] != fp["unet_config_sha"]  # (the two digests of the int8-loaded UNet)
    fp["unet_config_sha"] = fp.pop("quantized_config_sha")
    (step2 / "state.json").write_text(json.dumps(state))
    (step2 / "manifest.json").unlink()
    ckpt.write_manifest(step2)
    assert main([*_fast(tiny_dir, run), "--resume", str(step2), "--steps", "3", "--set", "base_quant=int8"]) == 0


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_a_quantized_lora_belongs_to_the_plain_model(tiny_dir, cpu_quant, tmp_path, caplog, mode):
    """`sample` and `export --merge` of a LoRA trained on an int8 (or fp8) base load the plain model: its record
    names it as the LoRA's base (it said "its UNet architecture differs": a warning from sample, a refusal from the
    merge)."""
    from loras import assert_samples_and_merges_on_its_base

    from lowmem_alignprop.cli import main

    run = tmp_path / mode
    assert main([*_fast(tiny_dir, run), *_FP8_SETS.get(mode, []), "--steps", "1", "--set", f"base_quant={mode}"]) == 0
    assert_samples_and_merges_on_its_base(run / "lora", tmp_path, caplog)

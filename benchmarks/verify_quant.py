"""The quantized-base check on a GPU (run by benchmarks/gpu_check.py; needs CUDA): an SD1.5-shaped UNet in fp16,
int8 and nf4, each one forward+backward into LoRA, its weight bytes, peak memory, time and output error."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from lowmem_alignprop.models.arch import ARCHS, arch_config_dir, default_dtype
from lowmem_alignprop.models.loading import add_lora
from lowmem_alignprop.memory.quant import (count_quantized, load_quantized_unet, measured_weight_bytes, quantize_in_place,
                                    quantized_weight_bytes)

log = logging.getLogger("lowmem_alignprop.memory.quant")


def _arch_unet(config_dir, device, dtype, seed: int = 0):
    """A UNet from a diffusers config folder (``config_dir/unet``), random weights, created in place on ``device``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = UNet2DConditionModel.load_config(config_dir, subfolder="unet")
    with torch.device(device), default_dtype(dtype):  # created directly in the target dtype on the device
        unet = UNet2DConditionModel.from_config(config)
    return unet.requires_grad_(False)


def _allocated(dev: torch.device) -> int:
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0


def _fwd_bwd(unet, inputs, dtype, dev: torch.device) -> dict:
    """LoRA on, one forward + backward into LoRA; returns peak memory above the start, grad facts, output."""
    params = add_lora(unet, rank=4, alpha=4, seed=0)
    unet.train()  # the trainer's mode (nf4 needs it on CPU; harmless on CUDA)
    x, t, enc = inputs
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    start = _allocated(dev)
    t0 = time.perf_counter()
    with torch.autocast(dev.type, dtype=dtype, enabled=cuda and dtype != torch.float32):
        out = unet(x, t, encoder_hidden_states=enc).sample
    loss = out.float().square().mean()
    loss.backward()
    if cuda:
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) - start if cuda else None
    grads = [p.grad for p in params]
    present = [g for g in grads if g is not None]
    base_grads = sum(1 for n, p in unet.named_parameters() if p.grad is not None and "lora_" not in n)
    return {
        "fwd_bwd_seconds": round(seconds, 4),
        "fwd_bwd_peak_bytes": None if peak is None else int(peak),
        "lora_params": sum(p.numel() for p in params),
        "lora_tensors": len(params),
        "lora_grads_present": len(present),
        "lora_grad_norm": float(torch.stack([g.float().norm() for g in present]).norm()) if present else 0.0,
        "lora_grads_finite": all(bool(torch.isfinite(g).all()) for g in present),
        "base_params_with_grad": base_grads,
        "output": out.detach().float(),
    }


def gpu_verify_quant(out_dir: str | os.PathLike | None = None, *, device: str | torch.device | None = None,
                     arch: str = "sd15", batch: int = 2, latent: int = 64, tokens: int = 77,
                     diffusers_path: bool = True) -> dict:
    """On CUDA: an SD1.5-shaped UNet (random weights) in fp16, then quantized int8 and nf4 (in place, and nf4
    also through diffusers' ``from_pretrained(quantization_config=...)`` on a saved copy); for each, the weight
    bytes (allocated on the GPU, measured on the model, and analytic), one forward+backward into LoRA (batch 2 =
    one CFG pair, 64x64 latents, 77 tokens) with its peak memory and time, and the output's relative error
    against fp16. Errors are caught per mode and reported in the dict; ``ok`` is True only when every mode
    ran, gradients reached every LoRA tensor (finite) and none reached the base. Writes ``quant_gpu.json``
    under ``out_dir`` when given. About 30-60 s on an H100.

    ``device="cpu"`` (tests, with the CPU override) runs the same flow in fp32 without memory figures;
    ``arch`` may be a shipped name or a diffusers config folder.
    """
    result: dict = {"ok": False, "modes": {}}
    t_all = time.perf_counter()
    dev = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None)
    if dev is None:
        result["error"] = "no CUDA device"
        return result
    try:
        import bitsandbytes
        result["bitsandbytes"] = bitsandbytes.__version__
    except ImportError as e:
        result["error"] = f"bitsandbytes not importable: {e}"
        return result
    import diffusers

    cuda = dev.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    config_dir = arch_config_dir(arch) if arch in ARCHS else Path(arch)
    result.update(device=torch.cuda.get_device_name(dev) if cuda else str(dev), torch=torch.__version__,
                  diffusers=diffusers.__version__, arch=str(arch), dtype=str(dtype).replace("torch.", ""))
    try:
        probe = _arch_unet(config_dir, "meta", dtype)
        channels, ctx = probe.config.in_channels, probe.config.cross_attention_dim
        del probe
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"[:300]
        return result
    g = torch.Generator(device="cpu").manual_seed(1)
    inputs = (torch.randn(batch, channels, latent, latent, generator=g).to(dev, dtype),
              torch.full((batch,), 500, device=dev),
              torch.randn(batch, tokens, ctx, generator=g).to(dev, dtype))
    reference = None
    tmp_dir = None

    def run_mode(label: str, build) -> None:
        nonlocal reference
        entry: dict = {}
        t0 = time.perf_counter()
        try:
            if cuda:
                torch.cuda.empty_cache()
            before = _allocated(dev)
            unet, mode = build()
            if cuda:
                torch.cuda.synchronize(dev)
            entry["build_seconds"] = round(time.perf_counter() - t0, 2)
            entry["allocated_weight_bytes"] = int(_allocated(dev) - before) if cuda else None
            entry["measured_weight_bytes"] = measured_weight_bytes(unet)
            entry["analytic_weight_bytes"] = quantized_weight_bytes(unet, mode)
            entry["quantized_layers"] = count_quantized(unet)
            res = _fwd_bwd(unet, inputs, dtype, dev)
            out = res.pop("output")
            if reference is None:
                reference = out
            entry["output_rel_error_vs_fp16"] = float((out - reference).norm() / reference.norm())
            entry.update(res)
            entry["ok"] = (res["lora_grads_present"] == res["lora_tensors"] > 0 and res["lora_grads_finite"]
                           and res["base_params_with_grad"] == 0)
            del unet
        except Exception as e:  # report and go on with the next mode
            entry["ok"] = False
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            entry["error"] = f"{type(e).__name__}: {first}"
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        result["modes"][label] = entry
        if cuda:
            torch.cuda.empty_cache()

    def build_inplace(mode):
        def build():
            unet = _arch_unet(config_dir, dev, dtype)
            if mode != "none":
                quantize_in_place(unet, mode, dtype, device=dev)
            return unet, mode
        return build

    def build_diffusers_nf4():
        nonlocal tmp_dir
        import tempfile
        tmp_dir = tempfile.mkdtemp(prefix="lac_quant_")
        _arch_unet(config_dir, dev, dtype).save_pretrained(Path(tmp_dir) / "unet")
        unet = load_quantized_unet(tmp_dir, "nf4", dtype)
        return unet, "nf4"

    run_mode("fp16" if cuda else "fp32", build_inplace("none"))
    run_mode("int8", build_inplace("int8"))
    run_mode("nf4", build_inplace("nf4"))
    if diffusers_path and time.perf_counter() - t_all < 40:  # the diffusers load path too, if time allows
        run_mode("nf4_diffusers_from_pretrained", build_diffusers_nf4)
    if tmp_dir:
        import shutil
        shutil.rmtree(tmp_dir, ignore_errors=True)

    base = next(iter(result["modes"].values()))
    for label, entry in list(result["modes"].items())[1:]:
        if "measured_weight_bytes" in entry and "measured_weight_bytes" in base:
            entry["weight_saving_bytes"] = base["measured_weight_bytes"] - entry["measured_weight_bytes"]
        if entry.get("fwd_bwd_peak_bytes") is not None and base.get("fwd_bwd_peak_bytes") is not None:
            entry["fwd_bwd_peak_change_bytes"] = entry["fwd_bwd_peak_bytes"] - base["fwd_bwd_peak_bytes"]
    result["analytic_gib"] = _analytic_table()
    result["ok"] = len(result["modes"]) >= 3 and all(e.get("ok") for e in result["modes"].values())
    result["seconds"] = round(time.perf_counter() - t_all, 2)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quant_gpu.json").write_text(json.dumps(result, indent=2))
    return result


def _analytic_table() -> dict:
    """quantized_weight_bytes of the shipped SD1.5 and SDXL UNets in fp16 (built on meta: no memory), in GiB."""

    table = {}
    for name in ("sd15", "sdxl"):
        try:
            unet = _arch_unet(arch_config_dir(name), "meta", torch.float16)
            table[name] = {m: round(quantized_weight_bytes(unet, m) / 2**30, 3) for m in ("none", "int8", "nf4")}
        except Exception as e:
            table[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
    return table

"""Training with the frozen weights in half precision, as on a GPU, and SDXL-shaped models, end to end on the CPU.

On a GPU the frozen UNet, VAE, text encoders and reward model are fp16/bf16 while the LoRA weights stay fp32 under
autocast, and the VAE and reward run in their own dtype outside autocast: every dtype boundary of the loop. On a
CPU the trainer keeps fp32 (``precision.frozen_weight_dtype``), so these tests switch it to bf16 with CPU bf16 autocast,
which crosses the same boundaries (fp16 and bf16 differ in range, not in where casts happen).
"""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lowmem_alignprop.memory import precision
from lowmem_alignprop.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from midsize import build_clip_reward_dir, build_tiny_sdxl_pipeline  # noqa: E402

FAST = ["--profile", "cpu", "--seed", "3", "--steps", "2", "--set", "sample_prompts=0", "--set", "sample_steps=3",
        "--set", "k=2", "--set", "batch_size=1"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_clip_reward_dir(tmp_path_factory.mktemp("clip"), width=32, layers=2, image_size=64)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl")
    build_tiny_sdxl_pipeline().save_pretrained(path)
    return path


@pytest.fixture
def half_weights(monkeypatch, fresh_accelerate_state):
    """The GPU's layout on the CPU: frozen weights in bf16, bf16 autocast."""
    monkeypatch.setattr(precision, "frozen_weight_dtype", lambda mixed_precision, device_type: torch.bfloat16)
    return ["--set", "mixed_precision=bf16"]


@pytest.fixture
def cpu_quant(monkeypatch):
    from diffusers.quantizers.bitsandbytes import bnb_quantizer as bq

    from lowmem_alignprop.memory import quant

    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(bq.BnB4BitDiffusersQuantizer, "validate_environment", lambda self, *a, **k: None)
    monkeypatch.setenv(quant.CPU_OVERRIDE_ENV, "1")


def fp32_bytes(model_dir: Path, sub: str) -> int:
    from diffusers import UNet2DConditionModel

    m = UNet2DConditionModel.from_pretrained(model_dir, subfolder=sub)
    return sum(p.numel() * 4 for p in m.parameters())


def trained(out: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "memory_report.json").read_text())


def assert_trained(rows):
    assert [r["step"] for r in rows] == [1, 2] and all("skipped" not in r for r in rows)
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)  # gradient reached the LoRA


# bf16 on a CPU without bf16 instructions is emulated (a run 4x the fp32 one): the checkpointing of UNet blocks, VAE
# and reward and the tiled decode cross their dtype boundaries in one run
@pytest.mark.parametrize("case", ["checkpointed_tiled", "nf4_base"])
def test_half_precision_frozen_weights_train(case, tiny_dir, clip_dir, half_weights, tmp_path, request, monkeypatch):
    sets = {"checkpointed_tiled": ["--set", "unet_checkpointing=blocks", "--set", "vae_checkpointing=resnets",
                                   "--set", "reward_checkpointing=true", "--set", "tiled_decode=true",
                                   "--set", "tile_size=6", "--set", "tile_overlap=1"],
            "nf4_base": ["--set", "base_quant=nf4"]}[case]
    if case == "nf4_base":
        request.getfixturevalue("cpu_quant")
    out = tmp_path / "run"
    from lowmem_alignprop.step import rollout
    as_given = []  # the adapters' inputs as given under the accelerator's autocast (tests/test_lora_input_dtype.py)
    real = rollout.keep_input_dtype
    monkeypatch.setattr(rollout, "keep_input_dtype", lambda model: as_given.append(real(model)) or as_given[-1])
    # one no-grad and one grad step (K=1): each dtype boundary is crossed the same way as with more of either
    assert main([*FAST, *half_weights, *sets, "--set", "sample_steps=2", "--set", "k=1", "--model", str(tiny_dir),
                 "--reward", "clip", "--set", f"reward_weights={clip_dir}", "--output-dir", str(out)]) == 0
    rows, report = trained(out)
    assert_trained(rows)
    assert len(as_given) == 1 and as_given[0] > 0  # set on the adapted layers, and so through checkpoints and tiles
    unet_bytes = report["modules"]["after_load"]["unet"]["bytes"]
    full = fp32_bytes(tiny_dir, "unet")
    # the frozen UNet is stored in half precision (nf4: its Linear layers in 4 bits, the rest bf16)
    assert unet_bytes < (0.45 if case == "nf4_base" else 0.55) * full
    assert report["modules"]["after_load"]["lora"]["bytes"] > 0
    from safetensors.torch import load_file
    lora = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert lora and all(v.dtype == torch.float32 for v in lora.values())  # LoRA trained and saved in fp32


# bf16 (emulated on most CPUs: 18 s) in -m slow: the tiny model's runs above cross the same dtype boundaries
@pytest.mark.parametrize("half", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["fp32", "bf16"])
def test_sdxl_shaped_model_trains_and_its_lora_loads_in_diffusers(half, sdxl_dir, tmp_path, request):
    """SDXL's extra conditioning (two text encoders, pooled embeddings, size/crop time ids) through the loop, and the
    LoRA it writes loads into diffusers' StableDiffusionXLPipeline and changes its images."""
    flags = request.getfixturevalue("half_weights") if half else []
    out = tmp_path / "run"
    assert main([*FAST, *flags, "--model", str(sdxl_dir), "--reward", "brightness", "--set", "resolution=64",
                 "--set", "lr=0.05", "--output-dir", str(out)]) == 0
    rows, _ = trained(out)
    assert_trained(rows)
    if half:
        return
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    kw = dict(prompt="a cat", num_inference_steps=3, height=64, width=64, output_type="pt")
    base = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(out / "lora"))
    tuned = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert (tuned - base).abs().max() > 1e-3


@pytest.mark.parametrize("cpuinfo, has", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n", False),  # an AVX-512 CPU without BF16 (Skylake, Zen 3)
    ("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n", True),  # Cooper Lake, Zen 4
    ("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n", True),  # Sapphire Rapids
    ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n", True),  # Arm (Graviton 3, Apple under Linux)
    (None, None),  # no /proc/cpuinfo: the OS does not say
])
def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about(cpuinfo, has, tmp_path, monkeypatch, caplog,
                                                                  fresh_accelerate_state):
    """mixed_precision=bf16 on a CPU that lacks bf16 instructions runs emulated bf16 matmuls, many times slower than
    fp32 (14x for a 512x512 matmul on the 2-core Zen 3 this was written on): the run says so, once, at start."""
    import logging

    from lowmem_alignprop.training import train_setup
    from lowmem_alignprop.settings.config import Config

    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    assert precision.cpu_has_bf16(path) is has
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has)
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    train_setup.make_accelerator(Config(mixed_precision="bf16").validate(), tmp_path)
    warned = [r.getMessage() for r in caplog.records if "without bf16 instructions" in r.getMessage()]
    assert len(warned) == (1 if has is False else 0), warned
    if warned:
        assert "--set mixed_precision=no" in warned[0]

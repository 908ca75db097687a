"""VAE decoder memory features, measured on CPU: per-resnet checkpointing and tiled decode with gradients.

Memory: the mid-size VAE of tests/midsize.py (channels 32-64-128-128) decoding a 192 px image (24x24 latents),
backward peak measured by the profiler's CPU allocation tracker. Gradients: checkpointing must not change
them at all; tiling changes the decoder's function a little, so it is checked three ways:

* a decoder that acts pixel by pixel: tiled == whole, exactly (the seam weights sum to one);
* a purely local decoder (a VAE decoder without GroupNorm and mid-block attention): exact wherever every
  tile covering a pixel contains its receptive field ("away from seams"), and within 5% of the output's
  range at the seams (measured 2.9%); gradient relative L2 error measured 1.6%, bound 5%;
* the stock random-weight VAE: a random network's GroupNorm statistics differ from tile to tile, so tiles
  differ everywhere (measured 36% output, ~100% gradient relative error); a trained VAE is close to local.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from numerics import SAME_OPS, assert_rel_close, relative_difference
from torch import nn
from torch.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from midsize import build_midsize_pipeline  # noqa: E402

from lowmem_alignprop.measure.cpu_allocation import measure_cpu_stages  # noqa: E402
from lowmem_alignprop.measure.resident_tensors import run_objects_only  # noqa: E402
from lowmem_alignprop.models.sampling import decode, enable_vae_checkpointing  # noqa: E402
from lowmem_alignprop.memory.tiling import ramp_weights, tile_starts, tiled_decode  # noqa: E402

# one worker runs this file: its module fixture (seven decodes + backward of the mid-size VAE, ~27 s) is made once,
# not once on each worker that draws one of its tests
pytestmark = pytest.mark.xdist_group("tiling")

LATENT = 24  # 192 px images from the mid-size VAE
TILE, OVERLAP = 12, 4


@pytest.fixture(scope="module", autouse=True)
def _run_objects_only():
    """The module's measurements walk only the objects made here (run_objects_only, as a training run's measurement
    does): each full collection and live-storage scan otherwise walked every object of the process."""
    with run_objects_only():
        yield


@pytest.fixture(scope="module")
def vae():
    return build_midsize_pipeline().vae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def latents():
    return torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))


def _loss(x):
    ramp = torch.linspace(0, 1, x.shape[-1])  # a loss that weighs pixels differently, so seams matter
    return (x * ramp).square().mean()


def _decode_and_backward(vae, z0, how, method="events"):
    """(peaks per stage, gradient w.r.t. the latents, image) for one decode + backward. ``events`` (the default)
    counts the scratch inside the ops too, which tiling changes; ``counter``: the live tensor storages alone."""
    z = z0.clone().requires_grad_(True)
    out = {}

    def step():
        with record_function("decode"):
            if how == "tiled":
                x = tiled_decode(vae, z, tile_size=TILE, overlap=OVERLAP)
            elif how == "tiled_no_ckpt":
                x = tiled_decode(vae, z, tile_size=TILE, overlap=OVERLAP, checkpoint_tiles=False)
            elif how == "diffusers_tiled":
                x = vae.tiled_decode(z).sample
            else:
                x = vae.decode(z).sample
            loss = _loss(x)
        with record_function("backward"):
            loss.backward()
        out["x"] = x.detach()

    peaks = measure_cpu_stages(step, method=method)
    return peaks, z.grad, out["x"]


def _with(vae, granularity):
    v = copy.deepcopy(vae)
    enable_vae_checkpointing(v, granularity)
    return v


def test_tile_starts_cover_with_full_tiles():
    for size in (16, 17, 32, 40, 64, 100, 128):
        for tile, overlap in ((16, 4), (64, 16), (72, 16), (40, 8)):
            starts = tile_starts(size, tile, overlap)
            side = min(size, tile)
            assert starts[0] == 0 and starts[-1] + side == size  # covered, no tile cut short
            for a, b in zip(starts, starts[1:]):
                assert b - a <= tile - overlap  # at least the requested overlap
    assert tile_starts(128, 72, 16) == [0, 56]  # SDXL 1024 px with the rtx3060-sdxl profile: 2x2 tiles
    assert tile_starts(64, 64, 16) == [0]  # SD1.5 512 px fits one tile: no seams at all


def test_ramp_weights():
    w = ramp_weights(10, 4, True, True, "cpu", torch.float32)
    assert torch.allclose(w, torch.tensor([0.125, 0.375, 0.625, 0.875, 1, 1, 0.875, 0.625, 0.375, 0.125]))
    assert torch.equal(ramp_weights(6, 4, False, False, "cpu", torch.float32), torch.ones(6))
    # two tiles meeting with an overlap of exactly the ramp: weights sum to one across the seam
    left = ramp_weights(8, 4, False, True, "cpu", torch.float32)
    right = ramp_weights(8, 4, True, False, "cpu", torch.float32)
    assert torch.allclose(left[-4:] + right[:4], torch.ones(4))


class _PixelwiseVAE(nn.Module):
    """decode = nearest upsampling x8 then a 1x1 conv and tanh: every pixel depends on its own latent only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 3, 1)

    def decode(self, z):
        return SimpleNamespace(sample=torch.tanh(self.conv(nn.functional.interpolate(z, scale_factor=8))))


def test_seams_blend_exactly_for_a_pixelwise_decoder(latents):
    vae = _PixelwiseVAE()
    z1 = latents.clone().requires_grad_(True)
    z2 = latents[:, :, :, :20].clone().requires_grad_(True)  # 24x20: a last column of tiles moved back
    for z in (z1, z2):
        whole = vae.decode(z).sample
        tiled = tiled_decode(vae, z, tile_size=TILE, overlap=OVERLAP)
        assert tiled.shape == whole.shape
        assert torch.allclose(tiled, whole, atol=1e-6)
        g_whole = torch.autograd.grad(_loss(whole), z)[0]
        g_tiled = torch.autograd.grad(_loss(tiled), z)[0]
        assert_rel_close(g_tiled, g_whole, SAME_OPS, "gradient")  # blend weights sum to 1: the same sums


def _local_vae():
    """A two-level VAE decoder (x2 upsampling) without GroupNorm and mid-block attention: purely convolutional,
    so each output pixel depends only on latents within a fixed radius (small enough for a fast test)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, mid_block_add_attention=False)

    def strip(m):
        for name, child in m.named_children():
            if isinstance(child, nn.GroupNorm):
                setattr(m, name, nn.Identity())
            else:
                strip(child)

    strip(vae.decoder)
    return vae.eval().requires_grad_(False)


def _exact_mask(size, starts, tile, radius, scale):
    """1-D: output pixels for which every tile covering them also holds their whole receptive field."""
    ok = torch.ones(size * scale, dtype=torch.bool)
    for p in range(size * scale):
        u = p // scale
        for s in starts:
            if s <= u < s + tile:
                inside_lo = s == 0 or u - radius >= s
                inside_hi = s + tile == size or u + radius <= s + tile - 1
                ok[p] &= inside_lo and inside_hi
    return ok


@pytest.mark.parametrize("height, width", [(64, 64), (40, 64), (64, 40)], ids=["square", "wide", "tall"])
def test_tiled_decode_is_exact_away_from_seams_on_a_local_decoder(height, width):
    """Square: two tiles per side, starting at 0 and 24. A non-square latent (--set resolution=WxH) within the same
    tolerances: 40x64 (height x width) is one row of tiles, at columns 0 and 24; 64x40 one column, at rows 0 and 24."""
    tile, overlap = 40, 8
    vae = _local_vae()
    z = torch.randn(1, 4, height, width, generator=torch.Generator().manual_seed(0), requires_grad=True)
    whole = vae.decode(z).sample
    scale = whole.shape[-1] // width
    assert whole.shape[-2:] == (height * scale, width * scale)
    # receptive field radius, in latent cells, from the gradient of the centre pixel (+1 for the upsampling)
    cy, cx = height * scale // 2, width * scale // 2
    g = torch.autograd.grad(whole[0, 0, cy, cx], z, retain_graph=True)[0].abs().sum(dim=(0, 1))
    rows = g.sum(dim=1).nonzero().flatten()
    radius = int(max(cy // scale - rows.min().item(), rows.max().item() - cy // scale)) + 1
    assert 4 <= radius < 16

    tiled = tiled_decode(vae, z, tile_size=tile, overlap=overlap)
    assert tiled.shape == whole.shape
    diff = (tiled - whole).abs().amax(dim=(0, 1))
    top = whole.abs().max()
    m_y = _exact_mask(height, tile_starts(height, tile, overlap), tile, radius, scale)
    m_x = _exact_mask(width, tile_starts(width, tile, overlap), tile, radius, scale)
    exact = m_y[:, None] & m_x[None, :]
    assert exact.float().mean() > 0.5  # most of the image is "away from the seams"
    assert diff[exact].max() <= 1e-5 * top  # exact there
    assert diff.max() <= 0.05 * top  # stated tolerance at the seams: 5% of the output's range (measured 2.9%)
    assert diff[~exact].max() > 1e-4 * top  # and the seams really differ (the check can fail)

    weights = torch.randn(whole.shape, generator=torch.Generator().manual_seed(1))
    g_whole = torch.autograd.grad((whole * weights).sum(), z)[0]
    g_tiled = torch.autograd.grad((tiled * weights).sum(), z)[0]
    rel = ((g_tiled - g_whole).norm() / g_whole.norm()).item()
    assert rel < 0.05, rel  # gradient into the latents (hence into LoRA): relative L2 error, measured 0.016


@pytest.fixture(scope="module")
def runs(vae, latents):
    """(peaks, gradient, image) per VAE feature: one decode + backward each on the mid-size VAE at 192 px. Tiling
    also cuts the scratch inside the convolutions: measured with the profiler's events. Checkpointing changes what
    is kept for backward ("kept": live storages), which is the same on every CPU; the scratch is not (oneDNN without
    AVX2 falls back to im2col GEMMs: +70-100 MiB here, in every run alike, which hid the checkpointing savings)."""
    out = {}
    for label, granularity, how in [("none", "none", "whole"), ("tiled", "none", "tiled"),
                                    ("tiled_no_ckpt", "none", "tiled_no_ckpt")]:
        out[label] = _decode_and_backward(_with(vae, granularity), latents, how)
    for label, granularity, how in [("none", "none", "whole"), ("blocks", "blocks", "whole"),
                                    ("resnets", "resnets", "whole"), ("tiled", "none", "tiled"),
                                    ("tiled+resnets", "resnets", "tiled")]:
        out[label + " kept"] = _decode_and_backward(_with(vae, granularity), latents, how, method="counter")
    return out


def test_checkpointing_and_tiling_lower_the_backward_peak(runs, capsys):
    """The proof on CPU: backward peaks per VAE feature, gradients unchanged by checkpointing."""
    mib = {k: v[0]["backward"] / 2**20 for k, v in runs.items()}
    with capsys.disabled():
        print(f"\nbackward peak MiB ({LATENT * 8} px, mid-size VAE): " + ", ".join(f"{k} {v:.1f}" for k, v in mib.items()))
    # measured at 192 px (3x3 tiles of 12 latents): none 161, tiled 41, tiled without per-tile checkpoints 343; kept:
    # none 156, blocks 83, resnets 73, tiled 40, tiled+resnets 19 (at 256 px in 2x2 tiles of 16, 2026-12-03 and
    # before: none 286, tiled 73, no per-tile checkpoints 610; with oneDNN limited to SSE4.1 357, 91, 628)
    assert mib["blocks kept"] < 0.7 * mib["none kept"]
    assert mib["resnets kept"] < 0.95 * mib["blocks kept"]
    assert mib["tiled"] < 0.4 * mib["none"]
    assert mib["tiled_no_ckpt"] > mib["none"]  # tiles without their checkpoint keep everything (and the overlaps)
    assert mib["tiled+resnets kept"] < 0.7 * mib["tiled kept"]
    assert mib["tiled+resnets kept"] < 0.4 * mib["resnets kept"]
    # checkpointing never changes the gradient; the per-tile checkpoint neither
    g_none = runs["none"][1]
    for label in ("blocks kept", "resnets kept", "none kept"):
        assert_rel_close(runs[label][1], g_none, SAME_OPS, label)
    for label in ("tiled", "tiled+resnets kept"):
        assert_rel_close(runs[label][1], runs["tiled_no_ckpt"][1], SAME_OPS, label)
        assert_rel_close(runs[label][2], runs["tiled_no_ckpt"][2], SAME_OPS, label + " image")


def test_tiled_decode_is_the_approximate_vae_feature_and_its_help_says_so(runs):
    """Checkpointing gives the whole decode's gradient to float rounding (above); tiles do not: the random VAE's
    GroupNorm statistics and mid-block attention differ from tile to tile (measured 0.96 relative L2 here). The
    setting's help, which --help and the plan print, says so; the exact features' help does not claim it."""
    from dataclasses import fields

    from lowmem_alignprop.settings.config import Config

    assert relative_difference(runs["tiled"][1], runs["none"][1]) > 0.1
    helps = {f.name: f.metadata["help"] for f in fields(Config)}
    assert "Approximate" in helps["tiled_decode"]
    for exact in ("vae_checkpointing", "sliced_decode", "unet_checkpointing", "window_keep", "reward_checkpointing",
                  "activation_offload", "offload_frozen", "block_swap"):
        assert "pproximate" not in helps[exact], exact


def test_resnet_granularity_wraps_every_decoder_resnet_attention_and_upsampler(vae):
    v = _with(vae, "resnets")
    dec = v.decoder
    expected = list(dec.mid_block.resnets) + list(dec.mid_block.attentions)
    for block in dec.up_blocks:
        expected += list(block.resnets) + list(block.upsamplers or [])
    wrapped = [m for m in dec.modules() if getattr(m, "_lowmem_ckpt", False)]
    assert len(wrapped) == len(expected) == 14 and set(map(id, wrapped)) == set(map(id, expected))
    assert not any(getattr(m, "_lowmem_ckpt", False) for m in v.encoder.modules())


def test_diffusers_tiled_decode_is_differentiable_but_saves_nothing_in_backward(vae, latents, runs):
    """Why tiling.py has its own loop: diffusers' keeps every tile's activations until backward."""
    v = copy.deepcopy(vae)
    v.enable_tiling()
    v.tile_latent_min_size, v.tile_sample_min_size, v.tile_overlap_factor = TILE, TILE * 8, OVERLAP / TILE
    peaks, grad, x = _decode_and_backward(v, latents, "diffusers_tiled")
    assert x.shape == (1, 3, LATENT * 8, LATENT * 8)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0  # gradients flow through its in-place seam blends
    whole, ours = runs["none"][0]["backward"], runs["tiled"][0]["backward"]
    assert peaks["backward"] > whole > 2 * ours  # measured at 256 px: 424 vs 286 vs 73 MiB


def test_batch_is_decoded_image_by_image():
    vae = _PixelwiseVAE()
    calls = []
    plain = vae.decode
    vae.decode = lambda z: calls.append(z.shape[0]) or plain(z)
    z = torch.randn(3, 4, 24, 24, generator=torch.Generator().manual_seed(2))
    x = tiled_decode(vae, z, tile_size=TILE, overlap=OVERLAP)
    assert calls == [1] * 27  # 3 images x 3x3 tiles (24 latents, tiles of 12 overlapping by 4), one image each
    assert torch.allclose(x, plain(z).sample, atol=1e-6)


def test_a_batch_of_two_and_a_latent_longer_than_a_tile_on_one_side_only_are_cut_in_tiles():
    """Two images are decoded one at a time too (not as one batch of 2), and a 24x12 latent (12-cell tiles: taller
    than a tile, as wide as one) is cut in 3 tiles down its height, not decoded whole."""
    from lowmem_alignprop.memory.tiling import cuts_tiles

    assert cuts_tiles(24, 12, 12) and cuts_tiles(12, 24, 12) and not cuts_tiles(12, 12, 12)
    vae = _PixelwiseVAE()
    calls = []
    plain = vae.decode
    vae.decode = lambda z: calls.append(tuple(z.shape)) or plain(z)
    z = torch.randn(2, 4, 24, 12, generator=torch.Generator().manual_seed(3))
    x = tiled_decode(vae, z, tile_size=TILE, overlap=OVERLAP)
    assert calls == [(1, 4, 12, 12)] * 6  # 2 images x 3 tiles (rows start at 0, 8, 12), one image each
    assert torch.allclose(x, plain(z).sample, atol=1e-6)


def test_decode_routes_tiled_and_matches_tiling(vae, latents):
    z = latents * vae.config.scaling_factor
    images = decode(vae, z, tiled=True, tile_size=TILE, tile_overlap=OVERLAP)
    raw = tiled_decode(vae, latents, tile_size=TILE, overlap=OVERLAP)
    assert torch.allclose(images, (raw / 2 + 0.5).clamp(0, 1), atol=1e-5)  # z * s / s is not bit-exact
    assert images.shape == (1, 3, LATENT * 8, LATENT * 8) and 0 <= images.min() and images.max() <= 1


def test_decode_keeps_a_vae_in_its_own_dtype_under_autocast(latents):
    """SDXL's VAE is kept out of fp16; autocast (accelerate's mixed precision) must not cast it back."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    small = AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=32,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    small.eval().requires_grad_(False)
    z = latents[:, :, :8, :8]
    plain = decode(small, z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = decode(small, z)
    assert torch.equal(kept, plain)  # fp32 VAE under bf16 autocast: computed in fp32, bit for bit
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = small.decode(z / small.config.scaling_factor).sample  # without decode()'s guard: bf16 math
    assert cast.dtype == torch.bfloat16


def test_sdxl_vae_dtype_choice(monkeypatch, caplog):
    from diffusers import AutoencoderKL

    from lowmem_alignprop.models.loading import choose_vae_dtype

    def make(force_upcast):
        return AutoencoderKL(block_out_channels=(32,), layers_per_block=1, norm_num_groups=32,
                             force_upcast=force_upcast).to(torch.float16)

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop.models.loading"):
        v = make(True)
        assert choose_vae_dtype(v, torch.float16, cpu, is_sdxl=True) == torch.float32 == v.dtype
    assert "decoding in fp32" in caplog.text and "sdxl-vae-fp16-fix" in caplog.text
    v = make(False)  # the fp16-fix VAE says force_upcast: false
    assert choose_vae_dtype(v, torch.float16, cpu, is_sdxl=True) == torch.float16 == v.dtype
    v = make(True)  # SD1.5's VAE in fp16 is fine
    assert choose_vae_dtype(v, torch.float16, cpu, is_sdxl=False) == torch.float16 == v.dtype
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the planner, for a CUDA target: assumes bf16
    v = make(True)
    assert choose_vae_dtype(v, torch.float16, cuda, is_sdxl=True) == torch.bfloat16 == v.dtype
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for has_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):  # Ampere+ / Turing
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, _b=has_bf16, **k: _b)
        v = make(True)
        assert choose_vae_dtype(v, torch.float16, cuda, is_sdxl=True) == expected == v.dtype


@pytest.mark.parametrize("name,resolution", [("rtx3060-sdxl", 1024), ("laptop-6gb", 512)])
def test_low_memory_profiles_tile_their_latent_in_2x2(name, resolution):
    from lowmem_alignprop.settings.config import build_config
    from lowmem_alignprop.settings.profiles import load_profile

    _, values = load_profile(name)
    cfg = build_config(values, {}, {})
    assert cfg.resolution == resolution and cfg.tiled_decode and not cfg.sliced_decode
    assert cfg.base_quant == "nf4" and cfg.vae_checkpointing == "resnets" and cfg.unet_checkpointing == "blocks"
    starts = tile_starts(resolution // 8, cfg.tile_size, cfg.tile_overlap)
    assert len(starts) == 2 and starts[-1] + cfg.tile_size == resolution // 8
    assert starts[1] - starts[0] <= cfg.tile_size - cfg.tile_overlap


def test_vae_field_replaces_the_models_vae(tiny_dir, tmp_path):
    """`--set vae=...` (e.g. madebyollin/sdxl-vae-fp16-fix): a folder, a pipeline folder, or a single file."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from ldm_format import vae_to_ldm
    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.settings.errors import UserError
    from lowmem_alignprop.models.loading import load_components

    own = AutoencoderKL.from_pretrained(tiny_dir, subfolder="vae")
    other = copy.deepcopy(own)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    other.register_to_config(force_upcast=False)
    other.save_pretrained(tmp_path / "vae_dir")
    save_file({k: v.contiguous() for k, v in vae_to_ldm(other.state_dict(), other.config).items()},
              tmp_path / "vae.safetensors")

    base = load_components(Config(model=str(tiny_dir)))
    for spec in (tmp_path / "vae_dir", tmp_path / "vae.safetensors"):
        comps = load_components(Config(model=str(tiny_dir), vae=str(spec)))
        for (name, a), b in zip(comps.vae.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), (spec, name)
        assert not torch.equal(comps.vae.decoder.conv_out.weight, base.vae.decoder.conv_out.weight)
        assert comps.unet is not None and comps.vae.config.latent_channels == 4
    assert load_components(Config(model=str(tiny_dir), vae=str(tmp_path / "vae_dir"))).vae.config.force_upcast is False
    with pytest.raises(UserError, match="does not exist"):
        load_components(Config(model=str(tiny_dir), vae=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="without config.json"):
        load_components(Config(model=str(tiny_dir), vae=str(tmp_path / "empty")))

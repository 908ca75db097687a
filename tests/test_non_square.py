"""Non-square images: ``--set resolution=WxH`` (width x height, as A1111, kohya and the model spec write it) trains,
samples, plans and exports at that size; N and "NxN" stay the square N; a malformed size is one line.

* the config: "1216x832" is width 1216, height 832; "512x512" is 512 (an int: a square run's files as before);
* the trainer's rollout (UNet: SD and SDXL, whose size conditioning is (height, width); flow: FLUX.1 and SD3) renders
  the diffusers pipeline's images at height x width from the same seeds;
* a short run writes grids of WxH tiles, `sample` of its LoRA renders at its size, its kohya export says "WxH";
* the planner scales with the pixel count, lowers each side, and tiled decode cuts a long side.
"""

from __future__ import annotations

import json

import pytest
import torch
from loras import cpu_cfg, trainer_at_step_0
from numerics import SAME_OPS, assert_rel_close
from refusals import assert_refused

from lowmem_alignprop.cli import main
from lowmem_alignprop.settings.config import Config, coerce, parse_set
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.image_size import lower_resolution

W, H = 64, 32  # the tiny models' test size: landscape, 2:1
PROMPTS = ["a cat", "a red dog"]
SEEDS = [5, 6]
FAST = ["--profile", "cpu", "--steps", "1", "--set", "sample_steps=3", "--set", "k=1", "--set", "batch_size=1",
        "--set", "sample_prompts=1"]


# ---------------------------------------------------------------------------------------------------------------
# the setting
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, kept, sides", [
    ("1216x832", "1216x832", (1216, 832)), (" 832 X 1216 ", "832x1216", (832, 1216)),
    ("512x512", 512, (512, 512)), ("768", 768, (768, 768)), (1024, 1024, (1024, 1024))])
def test_resolution_is_one_side_or_width_x_height(given, kept, sides):
    """--set and a profile's YAML (a number, or text) give the same value; a square WxH is the int, so a square
    run's config.yaml, resume rules and before-image keys are as they were."""
    cfg = Config(**parse_set([f"resolution={given}"])).validate()
    assert cfg.resolution == kept and type(cfg.resolution) is type(kept)
    assert (cfg.width, cfg.height) == sides
    assert coerce("resolution", given) == kept  # (a profile's value, as YAML reads it)
    assert Config(resolution=f"{sides[0]}x{sides[1]}").resolution == kept  # (a run file's, given to Config)
    assert cfg.with_changes(resolution="64x64").resolution == 64


@pytest.mark.parametrize("value, line", [
    ("1216*832", "resolution='1216*832' is not an image size: give its side in pixels (--set resolution=1024) or its "
                 "width x height (--set resolution=1216x832)"),
    ("x832", "resolution='x832' is not an image size: give its side in pixels (--set resolution=1024) or its width x "
             "height (--set resolution=1216x832)"),
    ("1216x", "resolution='1216x' is not an image size: give its side in pixels (--set resolution=1024) or its width "
              "x height (--set resolution=1216x832)"),
    ("big", "resolution='big' is not an image size: give its side in pixels (--set resolution=1024) or its width x "
            "height (--set resolution=1216x832)"),
    ("0x512", "resolution=0x512 is too small: each side 8 px or more, e.g. --set resolution=1216x832"),
    ("1220x830", "resolution=1220x830 must be a multiple of 8 on each side: use --set resolution=1216x824"),
    ("8192x512", "resolution=8192x512 is larger than 4096 on a side, the most this tool takes (4x the largest native "
                 "size, SDXL's 1024 px): use --set resolution=4096x512 or less"),
])
def test_bad_input_a_malformed_or_impossible_size_is_one_line(value, line, tmp_path, capsys):
    """Refused where the config is built: exit 2, one line naming the fix, nothing written, no model loaded."""
    out = tmp_path / "run"
    assert_refused(main, [*FAST, "--set", f"resolution={value}", "--output-dir", str(out)], f"error: {line}", out,
                   capsys)


@pytest.mark.parametrize("model, value, line", [
    ("flux", "1000x1024", "resolution=1000x1024 is not a multiple of 16 on each side: a token of this FLUX.1 model's "
                          "transformer covers 16x16 pixels: use --set resolution=992x1024 or 1008x1024"),
    ("sd35l", "4000x1024", "resolution=4000x1024 is larger than this SD3/SD3.5 model's position embeddings reach "
                           "(3072 px a side): use --set resolution=3072x1024 or less"),
])
def test_bad_input_a_side_the_flow_model_cannot_make_is_one_line_before_it_loads(model, value, line, tmp_path,
                                                                                capsys):
    """Each side is checked as a square's was: a multiple of the transformer token's pixels, within SD3's position
    embeddings (SD3.5 Large's 3072 px a side); `plan` refuses it as train does."""
    out = tmp_path / "run"
    assert_refused(main, ["plan", "--profile", "cpu", "--model", model, "--set", f"resolution={value}"],
                   f"error: {line}", out, capsys)
    with pytest.raises(UserError, match="^" + line.replace("(", r"\(").replace(")", r"\)") + "$"):
        Config(model=model, resolution=value).validate()


@pytest.mark.parametrize("argv, name", [
    (["--model", "toy", "--set", "resolution=96x64"], "toy_clip"),
    (["--reward", "brightness:1,toy_count=3:0.5", "--set", "resolution=64x96"], "toy_count=3"),
    (["sample", "--model", "toy", "--set", "resolution=96x64"], "toy_clip"),
    (["plan", "--profile", "cpu", "--model", "toy", "--set", "resolution=96x64"], "toy_clip")])
def test_bad_input_a_toy_reward_of_a_non_square_image_is_one_line(argv, name, tmp_path, capsys):
    """toy_clip and toy_count read 64x64 images (ConvTower resizes to a square): a 96x64 image was squeezed into it,
    its circles scored as ellipses. Refused before any model loads, in train, sample and plan alike."""
    out = tmp_path / "run"
    size = next(a for a in argv if a.startswith("resolution=")).partition("=")[2]
    line = (f"error: reward {name} reads square images (the toy world's scenes are 64x64): a {size} image would be "
            "squeezed into a square, its shapes distorted; use a square size (--set resolution=64) or another reward")
    argv = argv if argv[0] in ("sample", "plan") else [*FAST, *argv]
    assert_refused(main, [*argv, "--output-dir", str(out)] if argv[0] != "plan" else argv, line, out, capsys)


@pytest.mark.parametrize("spec, size, said", [
    ("clip:1,brightness:0.5", (832, 1216), "reward clip scores the centre 832x832 px of each 1216x832 image (its "
     "preprocessing: shortest side resized, then a centre crop, as CLIP's image processor does): the 192 px at the "
     "left and right are not scored, so the reward does not train them"),
    ("aesthetic:1,pickscore:1", (1216, 832), "rewards aesthetic, pickscore score the centre 832x832 px of each "
     "832x1216 image (their preprocessing: shortest side resized, then a centre crop, as CLIP's image processor "
     "does): the 192 px at the top and bottom are not scored, so the rewards do not train them"),
    ("hpsv2", (512, 512), None), ("brightness", (832, 1216), None)])
def test_a_clip_reward_of_a_non_square_image_says_it_scores_the_centre_square(spec, size, said, caplog):
    """CLIP-family rewards resize the shortest side and crop the centre square (ClipPreprocess, as transformers'
    CLIPImageProcessor): a 1216x832 image's 192 px either side are not scored. Said once at start-up (train, sample,
    plan), before any model loads; a square image or a weight-free reward says nothing."""
    import logging

    from lowmem_alignprop.rewards import check_reward_spec

    with caplog.at_level(logging.WARNING):
        check_reward_spec(spec, resolution=size)
    assert [r.getMessage() for r in caplog.records] == ([said] if said else [])


def test_clip_preprocessing_of_a_wide_image_drops_its_sides():
    """What the warning says, on ClipPreprocess: a 32x64 (height x width) image at size 16 is its centre 32x32
    square; pixels in the outer 12 columns either side change nothing, a change in the centre does."""
    from lowmem_alignprop.rewards.clip_rewards import ClipPreprocess

    pre = ClipPreprocess(16, 16)
    image = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    sides, centre = image.clone(), image.clone()
    sides[..., :12], sides[..., -12:] = 1 - image[..., :12], 1 - image[..., -12:]
    centre[..., 30:34] = 1 - image[..., 30:34]
    assert pre(image).shape == (1, 3, 16, 16)
    assert torch.equal(pre(sides), pre(image))
    assert (pre(centre) - pre(image)).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------------------------
# the rollout renders the pipeline's images at height x width
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_pipe():
    from midsize import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory, _isolated_cache):
    from midsize import build_tiny_sdxl_pipeline

    path = tmp_path_factory.mktemp("sdxl")
    build_tiny_sdxl_pipeline().save_pretrained(path)
    return path


_FAR = "such a side makes its images, and so the reward's signal, poor, whatever the pixel count"


@pytest.mark.parametrize("size, line", [
    ("256x16", "the model was made for 64 px images and this run uses 256x16 px, a side under half its size (32 px) "
               f"and a side over twice it (128 px): {_FAR}; --set resolution=128x32 "
               "keeps each side 32 to 128 px (check the fit with `lowmem-alignprop plan`)"),
    ("16x128", "the model was made for 64 px images and this run uses 16x128 px, a side under half its size (32 px): "
               f"{_FAR}; --set resolution=32x128 keeps each side 32 to 128 px "
               "(check the fit with `lowmem-alignprop plan`)"),
    ("160x48", "the model was made for 64 px images and this run uses 160x48 px, a side over twice its size (128 px): "
               f"{_FAR}; --set resolution=128x48 keeps each side 32 to 128 px "
               "(check the fit with `lowmem-alignprop plan`)"),
    ("16", "the model was made for 64 px images and this run uses 16 px: that far from its size its images, and so the "
           "reward's signal, are poor; --set resolution=64 (check the fit with `lowmem-alignprop plan`)"),
    ("128x32", None), ("32x128", None), (f"{W}x{H}", None), ("64", None)])
def test_an_extreme_aspect_is_warned_whatever_its_pixel_count(size, line, sdxl_pipe):
    """The off-size warning compared pixel counts alone: SDXL (1024 px) at 2048x256 has half its pixels and got no
    word. A side under half the model's size or over twice it is warned too (the tiny SDXL: 64 px, sides 32 to 128);
    the suggested size keeps the run's other side, each side moved into the range (its pixel count then within the
    pixel rule's). Said by train and plan (family.resolution_note)."""
    from lowmem_alignprop.models.family import family_for

    cfg = Config(resolution=size)
    assert family_for(sdxl_pipe).resolution_note(cfg) == line


def test_sdxls_own_buckets_are_not_warned_and_2048x256_is():
    """At SDXL's numbers (sample_size 128 cells of 8 px: 1024 px) its training buckets 1536x640 and 1728x576 say
    nothing; 2048x256 (half its pixels) is told its 256 px side, and 2048x512."""
    from types import SimpleNamespace

    from lowmem_alignprop.models.sampling import resolution_note

    vae = SimpleNamespace(config={"block_out_channels": [1, 2, 3, 4]})  # 3 downsamplings: 8 px a cell
    sdxl = SimpleNamespace(config=SimpleNamespace(sample_size=128))
    assert [resolution_note(sdxl, vae, (h, w)) for w, h in ((1536, 640), (576, 1728), (2048, 512))] == [None] * 3
    assert resolution_note(sdxl, vae, (256, 2048)).startswith(
        "the model was made for 1024 px images and this run uses 2048x256 px, a side under half its size (512 px): "
        "such a side")
    assert "--set resolution=2048x512 keeps each side 512 to 2048 px" in resolution_note(sdxl, vae, (256, 2048))


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_the_trainers_unet_images_at_w_x_h_are_the_pipelines(xl, tiny_dir, sdxl_dir, tmp_path):
    """The fixed-seed images the trainer renders (its own DDIM rollout) at 64x32 are those diffusers' pipeline
    renders with height=32, width=64 from the same seeds; on SDXL that holds only with the pipeline's size
    conditioning: add_time_ids (original_size, crop, target_size) = (32, 64, 0, 0, 32, 64)."""
    from lowmem_alignprop.commands.evaluate import generate
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.models.sampling import make_pipeline

    model = str(sdxl_dir if xl else tiny_dir)
    cfg = cpu_cfg(tmp_path / "run", "--model", model, "--set", f"resolution={W}x{H}")
    ours = trainer_at_step_0(cfg, PROMPTS).generate(PROMPTS, SEEDS)[0]
    pipe = make_pipeline(load_components(Config(model=model)))
    pipe.set_progress_bar_config(disable=True)
    theirs = generate(pipe, PROMPTS, SEEDS, cfg, batch_size=2)
    assert ours.shape == theirs.shape == (2, 3, H, W)
    assert_rel_close(ours, theirs, SAME_OPS, "the trainer's images at 64x32 vs the pipeline's")
    if xl:
        from lowmem_alignprop.models.sampling import encode_prompts

        time_ids = encode_prompts(pipe, PROMPTS, "cpu", (H, W)).time_ids
        assert time_ids.tolist() == [[H, W, 0, 0, H, W]] * 2


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory):
    from flowmodels import build_tiny_flux_dir, build_tiny_sd3_dir

    root = tmp_path_factory.mktemp("flow_non_square")
    return {"flux": build_tiny_flux_dir(root / "flux"), "sd3": build_tiny_sd3_dir(root / "sd3")}


@pytest.mark.parametrize("name, width, height", [("flux", 64, 32), ("sd3", 32, 48)])
def test_the_trainers_flow_images_at_w_x_h_are_the_pipelines(name, width, height, flow_dirs, tmp_path):
    """FLUX.1 (its packed latents and position ids) and SD3 at a landscape and a portrait size: the trainer's
    latents have the image's height x width in cells and its images are those FluxPipeline / StableDiffusion3Pipeline
    render with that height and width from the same seeds."""
    from diffusers import DiffusionPipeline

    from lowmem_alignprop.models import flow

    guidance = 3.5 if name == "flux" else 4.0
    cfg = cpu_cfg(tmp_path / "run", "--model", str(flow_dirs[name]), "--set", f"resolution={width}x{height}",
                  "--set", f"guidance_scale={guidance}", "--set", "max_sequence_length=16")
    trainer = trainer_at_step_0(cfg, PROMPTS)
    latents = trainer.family.initial_latents(cfg, 1, torch.Generator().manual_seed(0), "cpu")
    cells = (height // 2, width // 2)  # (the tiny VAE halves a side)
    if name == "flux":  # 2x2 cells a token
        assert latents.shape[1] == cells[0] * cells[1] // 4
        assert flow.unpack(latents, height, width, trainer.vae).shape[-2:] == cells
    else:
        assert latents.shape[-2:] == cells
    ours = trainer.generate(PROMPTS, SEEDS)[0]
    pipe = DiffusionPipeline.from_pretrained(flow_dirs[name])
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(prompt=PROMPTS, num_inference_steps=cfg.sample_steps, guidance_scale=guidance, height=height,
                      width=width, generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="pt",
                      max_sequence_length=16).images
    assert ours.shape == theirs.shape == (2, 3, height, width)
    assert_rel_close(ours, theirs, 1e-4, f"{name}: the trainer's images at {width}x{height} vs the pipeline's")


# ---------------------------------------------------------------------------------------------------------------
# a run at W x H: its grid, `sample` of its LoRA, its kohya export
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_run(tmp_path_factory, _isolated_cache):
    out = tmp_path_factory.mktemp("wide") / "run"
    assert main([*FAST, "--model", "tiny", "--set", f"resolution={W}x{H}", "--set", "export_format=kohya,diffusers",
                 "--output-dir", str(out)]) == 0
    return out


def test_a_run_at_w_x_h_writes_grids_of_w_x_h_tiles_and_its_config_says_the_size(wide_run):
    """before_after.png: one prompt's images, each 192 px wide and 96 high (the longer side the grid's 192 px cell),
    under a 64 px margin of row names; config.yaml keeps the size as given; the grid shows the images scored."""
    import yaml
    from PIL import Image

    grid = Image.open(wide_run / "samples" / "before_after.png")
    label_h = 28
    assert grid.size == (64 + 192, 20 + 2 * (96 + label_h))
    assert yaml.safe_load((wide_run / "config.yaml").read_text())["resolution"] == f"{W}x{H}"
    # brightness: the mean of a tile's pixels, to the 8-bit rounding (the grid shows the images that were scored)
    import numpy as np

    luma = np.asarray(grid.convert("RGB"), dtype=np.float64).mean(axis=2) / 255  # (brightness: the channels' mean)
    [image] = json.loads((wide_run / "samples" / "before_after.json").read_text())["images"]
    for row, key in enumerate(("reward_before", "reward_after")):
        top = 20 + row * (96 + label_h)
        assert luma[top:top + 96, 64:64 + 192].mean() == pytest.approx(image[key], abs=2.5e-3), key


def test_sample_of_the_runs_lora_renders_at_its_w_x_h(wide_run, tmp_path, monkeypatch):
    """`sample RUN/lora` takes the run's size: images of height 32 and width 64, as sample_results.json says."""
    from lowmem_alignprop.training import grid

    shapes, save = [], grid.save_sample_grid
    monkeypatch.setattr(grid, "save_sample_grid", lambda path, labels, base, lora, **kw: (
        shapes.append((base[0].shape, lora[0].shape)), save(path, labels, base, lora, **kw))[-1])
    out = tmp_path / "sample"
    assert main(["sample", str(wide_run / "lora"), "--num-prompts", "1", "--output-dir", str(out)]) == 0
    assert shapes == [((1, 3, H, W), (1, 3, H, W))]
    assert json.loads((out / "sample_results.json").read_text())["sampler"]["resolution"] == f"{W}x{H}"


def test_the_exports_of_a_w_x_h_run_say_width_x_height(wide_run):
    """kohya: sd-scripts' keys, modelspec.resolution "WxH" and ss_resolution "(W, H)", width first; the cards' size
    row; the diffusers card's pipeline call with the run's height and width."""
    from safetensors import safe_open

    [file] = (wide_run / "export" / "kohya").glob("*.safetensors")
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    assert (meta["modelspec.resolution"], meta["ss_resolution"]) == (f"{W}x{H}", f"({W}, {H})")
    assert "| resolution | 64x32 px |" in (wide_run / "export" / "kohya" / "README.md").read_text()
    # the diffusers card's code renders as the run did: height 32, width 64
    assert "eta=1, height=32, width=64).images[0]" in (wide_run / "export" / "diffusers" / "README.md").read_text()


def test_a_w_x_h_lora_away_from_its_run_exports_its_size_too(wide_run, tmp_path):
    """A lora/ folder copied away from its run (or a hub LoRA: the same files) exported to kohya: its size is in its
    base_model.json's image settings, which the header's alignprop_image_settings read, but modelspec.resolution and
    ss_resolution were left out (only the run's config.yaml was read for them)."""
    import shutil

    from safetensors import safe_open

    away = tmp_path / "away"
    shutil.copytree(wide_run / "lora", away)
    assert main(["export", "--lora", str(away), "--format", "kohya", "--out", str(tmp_path / "k")]) == 0
    [file] = (tmp_path / "k").glob("*.safetensors")
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    assert (meta["modelspec.resolution"], meta["ss_resolution"]) == (f"{W}x{H}", f"({W}, {H})")


# ---------------------------------------------------------------------------------------------------------------
# the planner and tiled decode
# ---------------------------------------------------------------------------------------------------------------

def test_the_plan_at_w_x_h_lies_between_its_short_and_long_sides_squares(tiny_dir):
    """The planner's decode peak at 64x32 is between 32x32's and 64x64's (it runs the step at that size), and the
    allocator allowance scales with the pixel count."""
    from lowmem_alignprop.measure import figures, planner

    def plan(resolution):
        cfg = Config(model="tiny", resolution=resolution, sample_steps=3, k=1, batch_size=1, prompts="simple_animals",
                     expandable_segments=False).validate()
        return planner.estimate(cfg, target="cpu"), cfg

    (small, _), (wide, cfg), (large, _) = plan(H), plan(f"{W}x{H}"), plan(W)
    for stage in ("decode", "backward"):
        assert small.stages[stage]["allocated"] < wide.stages[stage]["allocated"] < large.stages[stage]["allocated"]
    assert figures.fragmentation_allowance(cfg) == int(figures.FIXED_SEGMENTS_BYTES_PER_512PX * W * H / 512 ** 2)


def test_lower_resolution_shrinks_each_side_and_squares_as_before():
    """The plan's "lower resolution" change: each side over 256 px to 3/4, a multiple of 64; a square as before."""
    from lowmem_alignprop.measure import fit_changes

    assert [lower_resolution(r) for r in (1024, 768, 300, 256)] == [768, 576, 256, None]
    assert lower_resolution("1216x832") == "896x576"
    assert lower_resolution("1024x128") == "768x128" and lower_resolution("256x128") is None
    cfg = Config(model="tiny", resolution="1216x832", batch_size=1).validate()
    changes = [c for _, c in fit_changes.candidate_changes(cfg, "cpu") if "resolution" in c]
    assert changes == [{"resolution": "896x576"}]


def test_tiled_decode_cuts_a_long_side_and_says_a_short_image_in_cells():
    """A latent of 4 x 32 cells is cut by tiles of 16 (its width); 8 x 4 is not, said as width x height in cells."""
    from lowmem_alignprop.memory.tiling import cuts_images, tiled_decode, untiled_note

    assert cuts_images((32, 256), 16, 8) and not cuts_images((32, 64), 16, 8) and cuts_images((256, 32), 16, 8)
    assert untiled_note(True, (32, 64), 16, 8, 4) == (
        "tiled_decode cuts no tile: the latents are 8x4 cells (width x height) and tile_size=16 counts latent cells "
        "(128 px), so each image decodes whole, as sliced_decode does; --set tile_size=4 --set tile_overlap=1 cuts it "
        "in tiles")

    class Vae:  # each tile's pixels: its latent's mean cell value, 8x8 px a cell
        def decode(self, z):
            return type("Out", (), {"sample": z.repeat_interleave(8, -1).repeat_interleave(8, -2)[:, :3]})

    z = torch.arange(4 * 32, dtype=torch.float32).view(1, 1, 4, 32).repeat(1, 3, 1, 1)
    out = tiled_decode(Vae(), z, tile_size=16, overlap=4, checkpoint_tiles=False)
    assert out.shape == (1, 3, 32, 256)
    assert torch.allclose(out, Vae().decode(z).sample)  # (a decode that is the same per cell blends to itself)

"""Several image sizes in one run (aspect-ratio buckets): ``--set resolution=64,64x32,32x64`` or a profile's
``resolution: [64, 64x32, 32x64]``. Step s trains at sizes[(s - 1) % n] (every micro-batch and process, a resume
too); the fixed-seed renders stay at the first size.

* the setting: a list or comma text; one size is kept as it was; an empty item, a size twice, more than 16 sizes
  are one line each; each size is checked as a single one is;
* a 3-size run: each step's images at its size (the decode's shapes), the metrics rows' width/height, the renders at
  the first size; a resume at step 2 goes on with the cycle, bit-equal to the run never stopped; a resume that
  changes the sizes is told as one that changes the resolution; the records (config.yaml, card, kohya header);
* SDXL's add_time_ids and a flow model's shift follow each step's size, as the diffusers pipelines at that size;
* the planner plans the step at the largest size and lowers every size;
* what a run of several sizes reports: a CPU measures a step at the largest size, --max-minutes scales a larger
  next step by its pixels, the summary compares a prompt at the same size, an out-of-memory line and each step line
  name the step's size; --set's YAML list and a --set the shell cut at a space.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import yaml
from loras import cpu_cfg, trainer_at_step_0
from numerics import SAME_OPS, assert_rel_close
from refusals import assert_refused, strict_rows
from safetensors.torch import load_file

from lowmem_alignprop.cli import main
from lowmem_alignprop.settings.config import Config, coerce, flag_value, parse_set
from lowmem_alignprop.settings.image_size import lower_resolution, step_size

SIZES = "64,64x32,32x64"  # width x height: a square, a landscape and a portrait of the tiny model
SHAPES = [(64, 64), (32, 64), (64, 32)]  # (height, width) of each, in turn
PROMPTS = ["a cat", "a red dog"]
SEEDS = [5, 6]
BASE = ["--profile", "cpu", "--seed", "3", "--set", "sample_steps=3", "--set", "k=1", "--set", "batch_size=1",
        "--set", "sample_prompts=1", "--set", "lr=0.01"]  # (the tiny model: conftest's default)
FAST = [*BASE, "--set", f"resolution={SIZES}"]

pytestmark = pytest.mark.xdist_group("multi_size")  # (one worker makes the module's runs once)


# ---------------------------------------------------------------------------------------------------------------
# the setting
# ---------------------------------------------------------------------------------------------------------------

def test_resolution_takes_several_sizes_as_a_list_or_comma_separated(tmp_path):
    """--set's comma text, a profile's YAML list and a run file's list give the same sizes, in order, each as a single
    size is kept (NxN is N); width and height are the first size's (the renders'); --set gives it back as written."""
    from lowmem_alignprop.settings.profiles import resolve_config

    cfg = Config(**parse_set(["resolution= 64, 64x32,32X64"])).validate()
    assert cfg.resolution == [64, "64x32", "32x64"]
    assert cfg.sizes == [(64, 64), (64, 32), (32, 64)] and cfg.shapes == SHAPES
    assert (cfg.width, cfg.height) == (64, 64)
    assert coerce("resolution", [64, "64x32", "32x64"]) == cfg.resolution  # (a profile's or config.yaml's list)
    assert coerce("resolution", ["64x64", "64x32"]) == [64, "64x32"]
    assert flag_value(cfg.resolution) == "64,64x32,32x64"
    profile = tmp_path / "mine.yaml"
    profile.write_text("resolution: [64, 64x32, 32x64]\n")
    assert resolve_config(str(profile), {"model": "tiny"}, [])[1].resolution == cfg.resolution


def test_set_takes_the_sizes_as_a_yaml_list_too():
    """--set resolution=[64, 64x32] (a profile's YAML list written on the command line) is the comma list; [64] is
    64; it was refused naming '[64' as not an image size."""
    from lowmem_alignprop.settings.errors import UserError

    assert Config(**parse_set(["resolution=[64, 64x32,32x64]"])).validate().resolution == [64, "64x32", "32x64"]
    assert Config(**parse_set(["resolution=[64]"])).validate().resolution == 64
    assert Config(**parse_set(["resolution= [ 64x32 ] "])).validate().resolution == "64x32"
    # its items quoted, as YAML and JSON write strings (a list copied from Python, --set 'resolution=[64, "64x32"]'):
    # the same list; it was refused naming ' "64x32"' as not an image size
    assert Config(**parse_set(['resolution=[64, "64x32"]'])).validate().resolution == [64, "64x32"]
    assert Config(**parse_set(["resolution=['64', '32x64']"])).validate().resolution == [64, "32x64"]
    assert Config(**parse_set(['resolution=["64x32"]'])).validate().resolution == "64x32"
    with pytest.raises(UserError, match=r"""^resolution=' "64x32' is not an image size"""):  # (unbalanced: as given)
        parse_set(['resolution=[64, "64x32]'])


def test_one_size_is_kept_as_one_size_and_each_step_is_at_it():
    """A list of one size is that size (config.yaml, resume and the before-image key as a single size's); at_step
    is the config itself, and the metrics row has no size: a one-size run is as it was."""
    from lowmem_alignprop.lora.lora_formats import bucket_metadata
    from lowmem_alignprop.training.train import step_size_figures

    for given in ([64], ["64x64"], "64", 64):
        assert coerce("resolution", given) == 64 and Config(resolution=given).resolution == 64
    cfg = Config(resolution="64x32").validate()
    assert all(cfg.at_step(s) is cfg for s in (1, 2, 7))
    assert step_size_figures(cfg, 3) == {} and bucket_metadata({"resolution": "64x32", "steps": 3}) == {}


def test_the_steps_take_the_sizes_in_turn_over_the_run():
    """Step s (1-based, over the whole run: a resume and every process agree without state) at sizes[(s-1) % n]."""
    cfg = Config(resolution=SIZES).validate()
    assert [step_size(cfg, s) for s in range(1, 8)] == [(64, 64), (64, 32), (32, 64)] * 2 + [(64, 64)]
    assert [cfg.at_step(s).resolution for s in (1, 2, 3, 4)] == [64, "64x32", "32x64", 64]
    assert cfg.at_step(2).sizes == [(64, 32)] and cfg.resolution == [64, "64x32", "32x64"]  # (a copy: cfg unchanged)


MANY = ",".join(f"{8 * i}" for i in range(1, 18))


@pytest.mark.parametrize("value, line", [
    ("64,,32x64", "resolution=64,,32x64 has an empty item: give each size once, separated by commas (--set "
                  "resolution=1024,1216x832,832x1216)"),
    ("64,64x32,", "resolution=64,64x32, has an empty item: give each size once, separated by commas (--set "
                  "resolution=1024,1216x832,832x1216)"),
    ("64,64x32,64x64", "resolution=64,64x32,64x64 gives the size 64 twice: give each size once (--set "
                       "resolution=64,64x32)"),
    (MANY, f"resolution={MANY} gives 17 sizes, more than 16, the most one run cycles through (one size a step, in "
           "turn): give 16 or fewer"),
    ("64,1220x830", "resolution=1220x830 must be a multiple of 8 on each side: use --set resolution=1216x824"),
    ("64,8192x512", "resolution=8192x512 is larger than 4096 on a side, the most this tool takes (4x the largest "
                    "native size, SDXL's 1024 px): use --set resolution=4096x512 or less"),
])
def test_bad_input_a_size_list_that_cannot_be_trained_is_one_line(value, line, tmp_path, capsys):
    """Refused where the config is built: exit 2, one line, nothing written, no model loaded; a size of the list
    is checked as a single size is, its line naming it."""
    out = tmp_path / "run"
    assert_refused(main, [*BASE, "--steps", "1", "--set", f"resolution={value}", "--output-dir", str(out)],
                   f"error: {line}", out, capsys)


def test_bad_input_a_set_cut_at_a_space_after_a_comma_says_to_quote_it(tmp_path, capsys):
    """--set resolution=64, 64x32 unquoted: the shell gives --set "resolution=64," and a word "64x32", which argparse
    called an unrecognized argument; the line names the quoted --set (or the list without the space)."""
    out = tmp_path / "run"
    assert_refused(main, [*BASE, "--steps", "1", "--set", "resolution=64,", "64x32", "--output-dir", str(out)],
                   "error: unrecognized arguments: 64x32: the shell cut --set resolution=64, 64x32 at its space: "
                   "quote it, --set 'resolution=64, 64x32', or leave the space out, --set resolution=64,64x32",
                   out, capsys)


def test_bad_input_a_profiles_list_with_an_empty_item_is_one_line(tmp_path, capsys):
    """A profile's YAML list alike: an empty item (null), and 0x40 read as written (YAML 1.1's hex 64)."""
    out = tmp_path / "run"
    for text, line in (("resolution:\n- 64\n-\n- 64x32\n", "resolution=64,,64x32 has an empty item"),
                       ("resolution: [64, 0x40]\n", "resolution=0x40 is too small: each side 8 px or more")):
        (tmp_path / "mine.yaml").write_text(text)
        assert_refused(main, ["--profile", str(tmp_path / "mine.yaml"), "--output-dir", str(out)],
                       line, out, capsys)


def test_bad_input_a_toy_reward_refuses_any_non_square_size_of_the_list(tmp_path, capsys):
    """toy_clip reads 64x64 images: a list with one non-square size is refused as that size alone is."""
    out = tmp_path / "run"
    assert_refused(main, [*BASE, "--model", "toy", "--set", "resolution=64,96x64", "--output-dir", str(out)],
                   "error: reward toy_clip reads square images (the toy world's scenes are 64x64): a 96x64 image "
                   "would be squeezed into a square", out, capsys)


def test_bad_input_a_flow_models_sizes_are_each_checked_before_it_loads():
    """SD3/FLUX: each size a multiple of the token's pixels, the line naming the size that is not."""
    from lowmem_alignprop.settings.errors import UserError

    with pytest.raises(UserError, match=r"^resolution=1000x1024 is not a multiple of 16 on each side"):
        Config(model="flux", resolution=[1024, "1000x1024"]).validate()


def test_the_notes_are_said_per_size(caplog):
    """The CLIP-family centre-crop note for each non-square size (a square one says nothing)."""
    import logging

    from lowmem_alignprop.rewards import check_reward_spec

    with caplog.at_level(logging.WARNING):
        check_reward_spec("clip", resolution=[(64, 64), (32, 64), (64, 32)])
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "of each 64x32 image" in said[0] and "of each 32x64 image" in said[1]


def test_the_off_size_warning_is_said_for_each_size_far_from_the_models(sdxl_pipe):
    """family.resolution_note: the sizes far from the model's (the tiny SDXL: 64 px, sides 32 to 128) each said."""
    from lowmem_alignprop.models.family import family_for

    family = family_for(sdxl_pipe)
    notes = [family.resolution_note(Config(resolution=size)) for size in ("256x16", "16")]
    assert family.resolution_note(Config(resolution="64,256x16,64x32,16")) == "; ".join(notes)
    assert family.resolution_note(Config(resolution="64,64x32")) is None


# ---------------------------------------------------------------------------------------------------------------
# a run of three sizes, and a resume at step 2 of it
# ---------------------------------------------------------------------------------------------------------------

def _decoded(monkeypatch, shapes: list) -> None:
    """Record the (height, width) of every image the UNet family decodes (the steps' and the renders')."""
    from lowmem_alignprop.models.family import UNetFamily

    decode = UNetFamily.decode
    monkeypatch.setattr(UNetFamily, "decode", lambda self, vae, latents, cfg, **kw: (
        out := decode(self, vae, latents, cfg, **kw), shapes.append(tuple(out.shape[-2:])))[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, _isolated_cache):
    """Three steps at three sizes (kohya export), and the same run stopped after step 2 and resumed to 3; the
    (height, width) of each decode of each start."""
    base = tmp_path_factory.mktemp("multi")
    full, split = base / "full", base / "split"
    shapes: dict[str, list] = {"full": [], "split": [], "resumed": []}
    with pytest.MonkeyPatch.context() as mp:
        _decoded(mp, shapes["full"])
        assert main([*FAST, "--steps", "3", "--set", "export_format=kohya", "--output-dir", str(full)]) == 0
    with pytest.MonkeyPatch.context() as mp:
        _decoded(mp, shapes["split"])
        assert main([*FAST, "--steps", "2", "--checkpoint-every", "1", "--output-dir", str(split)]) == 0
    first = strict_rows(split)
    with pytest.MonkeyPatch.context() as mp:
        _decoded(mp, shapes["resumed"])
        assert main(["--output-dir", str(split), "--steps", "3", "--resume", "latest"]) == 0
    return full, split, first, shapes


def test_each_step_trains_at_its_size_and_the_renders_at_the_first(runs):
    """The decode before training and after it (the sample grid) is at the first size; step s's at sizes[(s-1) % 3];
    the metrics rows say each step's width and height (docs/outputs.md's keys)."""
    from outputs_doc import DOC, documented_keys, undocumented

    full, _, _, shapes = runs
    assert shapes["full"] == [SHAPES[0], *SHAPES, SHAPES[0]]
    rows = strict_rows(full)
    assert [(r["width"], r["height"]) for r in rows] == [(64, 64), (64, 32), (32, 64)]
    assert undocumented(rows[1], documented_keys(DOC.read_text(encoding="utf-8"))["metrics.jsonl"]) == []
    assert yaml.safe_load((full / "config.yaml").read_text())["resolution"] == [64, "64x32", "32x64"]


def test_a_resume_at_step_2_goes_on_with_the_cycle_bit_equal(runs):
    """Stopped after step 2 and resumed: step 3 is at the third size, and every step's reward, loss and the final
    LoRA are those of the run never stopped, bit for bit."""
    full, split, first, shapes = runs
    assert shapes["split"] == [SHAPES[0], *SHAPES[:2], SHAPES[0]]
    assert shapes["resumed"] == [SHAPES[2], SHAPES[0]]  # (the before images are read back, not rendered again)
    a, b = strict_rows(full), strict_rows(split)
    assert b[:2] == first
    for key in ("step", "width", "height", "reward_mean", "loss", "grad_norm", "prompt_ids"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    la, lb = (load_file(str(run / "lora" / "pytorch_lora_weights.safetensors")) for run in (full, split))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    w2, w3 = (load_file(str(split / "checkpoints" / f"step-0000000{s}" / "trainable.safetensors")) for s in (2, 3))
    assert max((w3[k] - w2[k]).abs().max().item() for k in w2) > 0  # (step 3 trained: the comparison means something)


def test_a_resume_that_changes_the_sizes_is_told_as_a_changed_resolution(runs, tmp_path, caplog):
    """Another size list changes how the images are made: the summary's reward counts from the resume's first
    step, as for another resolution."""
    import logging

    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    with caplog.at_level(logging.WARNING):
        assert main(["--output-dir", str(run), "--steps", "4", "--resume", "latest", "--set",
                     "resolution=64x32,64"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["reward_since_step"] == 4 and summary["reward_steps"] == 1
    assert [(r["width"], r["height"]) for r in strict_rows(run)][3:] == [(64, 64)]  # step 4: sizes[(4 - 1) % 2]
    assert "resume: resolution was '64,64x32,32x64' in the checkpoint, now '64x32,64'" in caplog.messages


def test_a_resume_that_adds_a_size_reads_the_before_images_back(runs, tmp_path, monkeypatch):
    """The renders are at the first size only: a resume that appends a size (the first kept) reads the before images
    back, as one that changes nothing of them does; its step 4 is at the new size, 32 px."""
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    shapes: list = []
    _decoded(monkeypatch, shapes)
    assert main(["--output-dir", str(run), "--steps", "4", "--resume", "latest", "--set",
                 f"resolution={SIZES},32"]) == 0
    assert shapes == [(32, 32), SHAPES[0]]  # (step 4, then the after images; no before images rendered again)


def test_the_records_of_a_run_of_several_sizes(runs, tmp_path, caplog):
    """The kohya header as sd-scripts writes a bucketed run's (ss_resolution and modelspec.resolution the first size,
    ss_enable_bucket, ss_bucket_info's images per size as the metrics rows count them); the card lists the sizes;
    `sample` of the LoRA renders at the first size, and says so (it did in silence); TensorBoard's width and height
    are the first size's numbers."""
    from safetensors import safe_open

    from lowmem_alignprop.run.trackers import hparam_columns
    from lowmem_alignprop.training import grid

    full = runs[0]
    [file] = (full / "export" / "kohya").glob("*.safetensors")
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    assert (meta["modelspec.resolution"], meta["ss_resolution"], meta["ss_enable_bucket"]) == ("64x64", "(64, 64)",
                                                                                              "True")
    rows = strict_rows(full)
    counted = [sum(r["images"] for r in rows if (r["width"], r["height"]) == (w, h)) for h, w in SHAPES]
    assert json.loads(meta["ss_bucket_info"])["buckets"] == {
        str(i): {"resolution": [w, h], "count": n} for i, ((h, w), n) in enumerate(zip(SHAPES, counted))}
    assert "| resolution | 64, 64x32, 32x64 px, one a step in turn (the sample images at 64) |" in (
        full / "export" / "kohya" / "README.md").read_text()
    assert hparam_columns({"resolution": "64,64x32,32x64", "k": 1}) == {"width": 64, "height": 64, "k": 1}
    shapes, save = [], grid.save_sample_grid
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(grid, "save_sample_grid", lambda path, labels, base, lora, **kw: (
            shapes.append((base[0].shape, lora[0].shape)), save(path, labels, base, lora, **kw))[-1])
        with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
            assert main(["sample", str(full / "lora"), "--num-prompts", "1", "--output-dir", str(tmp_path / "s")]) == 0
    assert shapes == [((1, 3, 64, 64), (1, 3, 64, 64))]
    assert "resolution=64,64x32,32x64 gives 3 sizes: sample renders at the first, 64 px, as a run's sample grids do " \
           "(--set resolution=64x32 renders at another)" in caplog.text
    assert json.loads((tmp_path / "s" / "sample_results.json").read_text())["sampler"]["resolution"] == 64


# ---------------------------------------------------------------------------------------------------------------
# SDXL's size conditioning and a flow model's shift follow the step's size
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_pipe():
    from midsize import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory, sdxl_pipe, _isolated_cache):
    path = tmp_path_factory.mktemp("sdxl")
    sdxl_pipe.save_pretrained(path)
    return path


def _at_step(trainer, cfg, step: int):
    """The trainer rendering as step ``step``'s rollout runs: its config and prompt embeddings at the step's size
    (Trainer.rollout's)."""
    rollout = trainer.rollout(cfg.at_step(step))
    trainer.cfg, trainer.embed = rollout.cfg, rollout.embed
    return rollout


def test_sdxls_add_time_ids_follow_each_steps_size_as_its_pipelines(sdxl_dir, tmp_path):
    """The prompt cache is made at the first size; step 2's embeddings carry the 64x32 size conditioning
    (32, 64, 0, 0, 32, 64), and the images of step 2's rollout are those StableDiffusionXLPipeline renders at
    height=32, width=64 from the same seeds (with step 1's ids they are not)."""
    from lowmem_alignprop.commands.evaluate import generate
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.models.sampling import make_pipeline
    from numerics import relative_difference

    cfg = cpu_cfg(tmp_path / "run", "--model", str(sdxl_dir), "--set", "resolution=64,64x32")
    trainer = trainer_at_step_0(cfg, PROMPTS)
    encoder = trainer.embed
    ids = [trainer.rollout(cfg.at_step(s)).embed(PROMPTS).time_ids.tolist() for s in (1, 2, 3)]
    assert ids == [[[64, 64, 0, 0, 64, 64]] * 2, [[32, 64, 0, 0, 32, 64]] * 2, [[64, 64, 0, 0, 64, 64]] * 2]
    pipe = make_pipeline(load_components(Config(model=str(sdxl_dir))))
    pipe.set_progress_bar_config(disable=True)
    theirs = generate(pipe, PROMPTS, SEEDS, cfg.at_step(2), batch_size=2)
    _at_step(trainer, cfg, 2)
    ours = trainer.generate(PROMPTS, SEEDS)[0]
    assert ours.shape == theirs.shape == (2, 3, 32, 64)
    assert_rel_close(ours, theirs, SAME_OPS, "step 2's images at 64x32 vs the pipeline's")
    trainer.embed = encoder  # the first size's ids at step 2's size: other images (the test can fail)
    assert relative_difference(trainer.generate(PROMPTS, SEEDS)[0], theirs) > 100 * SAME_OPS


def test_a_flow_models_shift_follows_each_steps_size_as_its_pipelines(tmp_path_factory, tmp_path, monkeypatch):
    """FLUX.1-dev shifts its sigmas by the image's token count: step 1 (64x32, 128 tokens) and step 2 (64x64, 256)
    set other sigmas, each FluxPipeline's at that size, and step 2's images are the pipeline's at 64x64."""
    from diffusers import DiffusionPipeline
    from flowmodels import build_tiny_flux_dir

    from lowmem_alignprop.models import flow

    model = build_tiny_flux_dir(tmp_path_factory.mktemp("flux") / "flux")
    cfg = cpu_cfg(tmp_path / "run", "--model", str(model), "--set", "resolution=64x32,64", "--set",
                  "guidance_scale=3.5", "--set", "max_sequence_length=16")
    trainer = trainer_at_step_0(cfg, PROMPTS)
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    ours_sigmas, set_timesteps = [], flow.set_flow_timesteps
    monkeypatch.setattr(flow, "set_flow_timesteps", lambda scheduler, *a, **kw: (
        set_timesteps(scheduler, *a, **kw), ours_sigmas.append(scheduler.sigmas.clone()))[0])
    for step, (width, height) in ((1, (64, 32)), (2, (64, 64))):
        _at_step(trainer, cfg, step)
        ours = trainer.generate(PROMPTS, SEEDS)[0]
        theirs_sigmas = []
        with torch.no_grad():
            theirs = pipe(prompt=PROMPTS, num_inference_steps=cfg.sample_steps, guidance_scale=3.5, height=height,
                          width=width, generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="pt",
                          max_sequence_length=16, callback_on_step_end=lambda p, i, t, kw: (
                              theirs_sigmas.append(p.scheduler.sigmas.clone()), kw)[1]).images
        assert torch.equal(ours_sigmas[-1], theirs_sigmas[0]), step
        assert ours.shape == theirs.shape == (2, 3, height, width)
        assert_rel_close(ours, theirs, 1e-4, f"step {step}'s images at {width}x{height} vs the pipeline's")
    assert not torch.equal(ours_sigmas[0], ours_sigmas[-1])  # (the sizes' shifts differ: the test can fail)


# ---------------------------------------------------------------------------------------------------------------
# the planner
# ---------------------------------------------------------------------------------------------------------------

def test_the_plan_is_the_step_at_the_largest_size_and_names_the_sizes(tiny_dir):
    """The estimate of a run of sizes 32, 64x32 and 64 is the 64 px step's (the peak that must fit), its time too;
    the plan names the sizes and says so; the fixed-segment allowance is the largest size's."""
    from lowmem_alignprop.measure import figures, planner
    from lowmem_alignprop.measure.reports import sizes_line

    def estimate(resolution):
        cfg = Config(model="tiny", resolution=resolution, sample_steps=3, k=1, batch_size=1, prompts="simple_animals",
                     expandable_segments=False).validate()
        return planner.estimate(cfg, target="cpu"), cfg

    (many, cfg), (largest, one) = estimate("32,64x32,64"), estimate(64)
    assert {n: s["allocated"] for n, s in many.stages.items()} == {n: s["allocated"] for n, s in largest.stages.items()}
    assert many.work == largest.work
    assert any(n.startswith("image sizes 32, 64x32, 64, one a step in turn: memory and time are the step at the "
                            "largest, 64 px") for n in many.notes)
    assert figures.fragmentation_allowance(cfg) == figures.fragmentation_allowance(one) > 0
    assert sizes_line(cfg.resolution) == ("32, 64x32, 64 px (a step at each in turn; the table and the time are the "
                                          "step at the largest, 64)")


def test_lower_resolution_lowers_every_size():
    """The plan's (and --auto-fit's) "lower resolution" change: each size over 256 px to 3/4 a side, a size at the
    floor kept, two that become one kept once; None once all are at the floor."""
    from lowmem_alignprop.measure import fit_changes

    assert lower_resolution([1024, "1216x832", "832x1216"]) == [768, "896x576", "576x896"]
    assert lower_resolution([512, 256]) == [384, 256] and lower_resolution(["256x320", "256x288"]) == 256
    assert lower_resolution([256, "128x256"]) is None
    cfg = Config(model="tiny", resolution="1024,1216x832", batch_size=1).validate()
    assert [c for _, c in fit_changes.candidate_changes(cfg, "cpu") if "resolution" in c] == [
        {"resolution": [768, "896x576"]}]


# ---------------------------------------------------------------------------------------------------------------
# the figures a run of several sizes reports
# ---------------------------------------------------------------------------------------------------------------

def test_a_cpu_runs_measured_step_is_one_at_the_largest_size(tmp_path, caplog, capsys):
    """A CPU counts the allocation of one step past the warm-up: with sizes 64, 32 the second step is at 32 px, so
    the measured step is step 3, at 64 (the peak the budget is told of is the largest size's); where no step past
    the warm-up is at the largest, one line says which size was measured and how to measure the largest."""
    import logging

    out = tmp_path / "run"
    assert main([*BASE, "--set", "resolution=64,32", "--steps", "3", "--output-dir", str(out)]) == 0
    said = [x.split(":")[0] for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert said == ["step 1 (64 px)", "step 2 (32 px)", "step 3 (64 px)"]  # (each step line names its size)
    rows = strict_rows(out)
    assert [(r["width"], r["peak_memory_gb"] is not None) for r in rows] == [(64, False), (32, False), (64, True)]
    report = json.loads((out / "memory_report.json").read_text())
    assert report["peak_step"] == 3 and report["summary_steps"]["peak_measured_steps"] == "3"
    short = tmp_path / "short"
    with caplog.at_level(logging.WARNING):
        assert main([*BASE, "--set", "resolution=64,32", "--steps", "2", "--output-dir", str(short)]) == 0
    assert ("memory: this CPU run measures the allocation of step 2, at 32 px, not of the largest size, 64 px, which "
            "trains at no later step of this start (step 1 is the warm-up): --steps 3 or more measures "
            "it") in caplog.messages


def test_max_minutes_counts_a_next_step_at_a_larger_size_than_those_timed(tmp_path, monkeypatch, capsys):
    """Sizes 32, 64 with a step's time its pixels' (5 min at 32 px, 20 at 64) and --max-minutes 20: after step 1 (5
    min used) the next step is at 64 px, 4x the pixels of the one timed, so 20 min: 5 + 20 + the end's minute pass 20
    and the run stops after step 1 (timed by step 1 alone it trained step 2 and ended past 25 min). A resume times
    its first step by the recorded ones alike: step 2 at 64 px after a recorded 32 px step of 5 min leaves no room."""
    from lowmem_alignprop.run import time_limit
    from lowmem_alignprop.training.train import Trainer

    now = [1000.0]
    monkeypatch.setattr(time_limit, "clock", lambda: now[0])
    original = Trainer.train_step

    def timed(self, step):
        done = original(self, step)
        width, height = step_size(self.cfg, step)
        done.row["seconds"] = 300.0 * width * height / 32 ** 2  # (the checkpoint records the row's time)
        now[0] += done.row["seconds"]
        return done

    monkeypatch.setattr(Trainer, "train_step", timed)
    out = tmp_path / "run"
    args = [*BASE, "--set", "sample_prompts=0", "--set", "resolution=32,64", "--steps", "3", "--output-dir", str(out)]
    assert main([*args, "--max-minutes", "20"]) == 0
    assert [r["step"] for r in strict_rows(out)] == [1]
    assert json.loads((out / "summary.json").read_text())["time_limit"]["stopped_at"] == 1
    capsys.readouterr()
    assert main([*args, "--resume", "latest", "--max-minutes", "20"]) == 2
    assert "leaves no time to train: 0.0 s went to loading and the renders before the first step, a step up to " \
           "20.0 min, and the end's work" in capsys.readouterr().err
    assert [r["step"] for r in strict_rows(out)] == [1]


def test_an_out_of_memory_step_names_its_size(tmp_path, capsys, monkeypatch):
    """Out of memory at step 2 of sizes 32, 64x32: the line names the step's size (the steps before it were at
    another, so "at step 2" alone left which size ran out unsaid)."""
    from lowmem_alignprop.run import faults

    monkeypatch.setenv(faults.INJECT_ENV, "decode@2")
    out = tmp_path / "run"
    assert main([*BASE, "--set", "resolution=32,64x32", "--steps", "2", "--output-dir", str(out)]) == 2
    [err] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert "error: out of memory in stage 'decode' at step 2, at 64x32 px of sizes 32, 64x32 (peak so far" in err


def test_the_summarys_first_and_last_reward_pair_each_prompt_at_the_same_size():
    """Sizes 64, 32 in turn, a reward of 1 at 64 px and 0 at 32 that never changes: the first three steps (64, 32,
    64) and the last three (32, 64, 32) held other mixes of the sizes, so the summary said the reward fell by 1/3.
    Each prompt is compared at each size in both windows: no change, one prompt."""
    from lowmem_alignprop.run.runfolder import first_last_rewards

    history = [{"step": s, "width": w, "height": w, "prompt_ids": [0], "rewards": [float(w == 64)],
                "reward_mean": float(w == 64)} for s, w in zip(range(1, 7), [64, 32] * 3)]
    said = first_last_rewards(history)
    assert (said["reward_first"], said["reward_last"], said["reward_prompts"], said["reward_window"]) == (
        0.5, 0.5, 1, 3)


@pytest.mark.parametrize("resolution, said", [
    ("1024,1216x832", "evaluate at a lower resolution (--set resolution=768,896x576)"),  # every size lowered: a bare N
    (1024, "evaluate at a lower resolution (--set resolution=768)"),  # would have replaced the list
    (256, "evaluate at a lower resolution")])  # at the planner's floor: no size to give
def test_the_evaluations_out_of_memory_advice_at_batch_1_lowers_every_size(resolution, said):
    from types import SimpleNamespace

    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.training.train_faults import LoopFaults

    stand_in = SimpleNamespace(cfg=Config(batch_size=1, resolution=resolution))
    assert LoopFaults.eval_fewer_at_a_time(stand_in) == said

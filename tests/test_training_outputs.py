"""What a run gives users besides the LoRA: the negative prompt, images while training, the export at the end,
a LoRA to start from, and any checkpoint looked at with ``sample``."""

from __future__ import annotations

import pytest
import torch
from numerics import SAME_OPS, assert_rel_close, relative_difference

from lowmem_alignprop.models.sampling import encode_prompts

NEGATIVE = "a dark blurry photo"


# ---------------------------------------------------------------------------------------------------------
# negative_prompt
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pipe(tiny_dir):
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.models.sampling import make_pipeline
    from lowmem_alignprop.settings.config import Config

    comps = load_components(Config(model=str(tiny_dir)))
    return comps, make_pipeline(comps)


def test_negative_prompt_is_the_unconditional_embedding(tiny_pipe):
    _, pipe = tiny_pipe
    plain = encode_prompts(pipe, ["a cat", "a dog"], "cpu", 64)
    neg = encode_prompts(pipe, ["a cat", "a dog"], "cpu", 64, negative_prompt=NEGATIVE)
    assert torch.equal(plain.cond, neg.cond)  # the prompts' own embeddings do not move
    assert relative_difference(neg.uncond, plain.uncond) > 0.01
    # the unconditional branch is the negative prompt encoded as a prompt (and "" when it is empty)
    as_prompt = encode_prompts(pipe, [NEGATIVE, ""], "cpu", 64)
    assert torch.equal(neg.uncond[0], as_prompt.cond[0]) and torch.equal(neg.uncond[1], as_prompt.cond[0])
    assert torch.equal(plain.uncond[0], as_prompt.cond[1])


def test_sdxl_keeps_zero_embeddings_for_an_empty_negative_prompt(_isolated_cache):
    from midsize import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline()
    assert pipe.config.force_zeros_for_empty_prompt  # as SDXL base's model_index.json
    plain = encode_prompts(pipe, ["a cat"], "cpu", 64)
    assert not plain.uncond.any() and not plain.uncond_pooled.any()  # what StableDiffusionXLPipeline feeds the UNet
    neg = encode_prompts(pipe, ["a cat"], "cpu", 64, negative_prompt=NEGATIVE)
    as_prompt = encode_prompts(pipe, [NEGATIVE], "cpu", 64)
    assert torch.equal(neg.uncond, as_prompt.cond) and torch.equal(neg.uncond_pooled, as_prompt.pooled)
    pipe.register_to_config(force_zeros_for_empty_prompt=False)  # a model that says otherwise (SDXL refiner)
    empty = encode_prompts(pipe, [""], "cpu", 64)
    assert torch.equal(encode_prompts(pipe, ["a cat"], "cpu", 64).uncond, empty.cond)


def test_negative_prompt_changes_the_images_and_sample_uses_what_training_uses(tiny_pipe):
    """``sample``'s pipeline images with a negative prompt are training's own rollout with that negative prompt."""
    from lowmem_alignprop.commands.evaluate import generate
    from lowmem_alignprop.models.sampling import decode, initial_latents, rollout
    from lowmem_alignprop.settings.config import Config

    comps, pipe = tiny_pipe
    pipe.set_progress_bar_config(disable=True)
    cfg = Config(sample_steps=3, resolution=64, negative_prompt=NEGATIVE)
    with_neg = generate(pipe, ["a cat"], [7], cfg, batch_size=1)
    without = generate(pipe, ["a cat"], [7], Config(sample_steps=3, resolution=64), batch_size=1)
    assert relative_difference(with_neg, without) > 0.01
    g = torch.Generator().manual_seed(7)
    emb = encode_prompts(pipe, ["a cat"], "cpu", 64, negative_prompt=NEGATIVE)
    comps.scheduler.set_timesteps(3)
    with torch.no_grad():
        lat = initial_latents(1, comps.unet, comps.vae, 64, g, "cpu")
        lat = rollout(comps.unet, comps.scheduler, lat, emb, k=0, guidance_scale=cfg.guidance_scale, eta=cfg.eta,
                      generator=g)
        ours = decode(comps.vae, lat)
    assert_rel_close(with_neg, ours, SAME_OPS, "sample's images = training's rollout, same negative prompt")


# ---------------------------------------------------------------------------------------------------------
# --init-lora: step 0 renders what the LoRA renders, in every layout users have
# ---------------------------------------------------------------------------------------------------------

PROMPTS = ["a cat", "a red dog"]
SEED = 31


def _cfg(out, *extra):
    from lowmem_alignprop.cli import common_parser, config_from_args

    args = common_parser("t", "t").parse_args(["--profile", "cpu", "--output-dir", str(out), "--set", "sample_steps=3",
                                               "--set", "k=1", "--set", "sample_prompts=2", *extra])
    return config_from_args(args)[1]


def _images_at_step_0(cfg):
    """The fixed-seed images the trainer renders before its first step (its `generate`, as for the grid)."""
    from lowmem_alignprop.commands.lora_export import check_init_lora
    from lowmem_alignprop.commands.train import Trainer
    from lowmem_alignprop.run.runfolder import RunFolder

    trainer = Trainer(cfg, RunFolder(cfg.output_dir), PROMPTS)
    trainer.init_file = check_init_lora(cfg.init_lora, cfg.lora_rank) if cfg.init_lora else None
    trainer.setup_accelerator()
    trainer.load_models()
    trainer.setup_sampling()
    return trainer.generate(PROMPTS, SEED)[0]


@pytest.fixture(scope="module")
def made_lora(tmp_path_factory, tiny_dir):
    """A LoRA with alpha = 2 * rank (test_lora_export's), its kohya and peft exports, and the images base + LoRA
    render through diffusers' own loader (the reference)."""
    from test_lora_export import _make_lora

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.models.sampling import decode, initial_latents, make_pipeline, rollout

    made = _make_lora(tiny_dir, tmp_path_factory.mktemp("lora-run"), xl=False)
    for fmt in ("kohya", "peft"):
        assert main(["export", "--lora", str(made["lora"]), "--format", fmt, "--out", str(made["run"] / fmt)]) == 0
    cfg = _cfg(tmp_path_factory.mktemp("unused"))
    comps = load_components(cfg)
    pipe = make_pipeline(comps)
    pipe.load_lora_weights(str(made["lora"]))
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        emb = encode_prompts(pipe, PROMPTS, "cpu", cfg.resolution)
        comps.scheduler.set_timesteps(cfg.sample_steps)
        lat = initial_latents(len(PROMPTS), comps.unet, comps.vae, cfg.resolution, g, "cpu")
        lat = rollout(comps.unet, comps.scheduler, lat, emb, k=0, guidance_scale=cfg.guidance_scale, eta=cfg.eta,
                      generator=g)
        made["images"] = decode(comps.vae, lat)
    return made


@pytest.mark.parametrize("layout", ["diffusers", "run_folder", "kohya", "peft"])
def test_init_lora_step_0_renders_base_plus_that_lora(layout, made_lora, tmp_path):
    spec = {"diffusers": made_lora["lora"], "run_folder": made_lora["run"],
            "kohya": next((made_lora["run"] / "kohya").glob("*.safetensors")), "peft": made_lora["run"] / "peft"}[layout]
    images = _images_at_step_0(_cfg(tmp_path / "run", "--set", f"init_lora={spec}"))
    # alpha 8 over rank 4 in the LoRA, alpha = rank in the run: B is rescaled; the images are the LoRA's own
    assert_rel_close(images, made_lora["images"], SAME_OPS, f"step 0 from a {layout} LoRA")


def test_without_init_lora_step_0_is_the_base_model(made_lora, tmp_path):
    """The reference above is not the base model's image (else the test above would prove nothing)."""
    base = _images_at_step_0(_cfg(tmp_path / "run"))
    assert relative_difference(base, made_lora["images"]) > 0.01


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory, _isolated_cache):
    from midsize import build_tiny_sdxl_pipeline
    from test_lora_export import _make_lora

    base = tmp_path_factory.mktemp("sdxl-base")
    build_tiny_sdxl_pipeline().save_pretrained(base)
    return _make_lora(base, tmp_path_factory.mktemp("sdxl-run"), xl=True)


def test_init_lora_of_another_rank_or_architecture_is_one_line_and_writes_nothing(made_lora, sdxl_lora, tmp_path,
                                                                                  capsys, fresh_log_handlers):
    from lowmem_alignprop.cli import main

    fast = ["--profile", "cpu", "--steps", "1", "--set", "sample_prompts=0", "--set", "sample_steps=3"]
    cases = [(["--init-lora", str(made_lora["lora"]), "--set", "lora_rank=8"],
              f"--init-lora {made_lora['lora']} has rank 4 and this run trains rank 8: add --set lora_rank=4"),
             (["--init-lora", str(sdxl_lora["lora"])], f"--init-lora {sdxl_lora['lora']} does not fit this model"),
             (["--init-lora", str(tmp_path / "nope")], "no such file or folder")]
    for i, (args, needle) in enumerate(cases):
        out = tmp_path / f"run{i}"
        assert main([*fast, *args, "--output-dir", str(out)]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
        assert len(err) == 1 and needle in err[0], err
        assert not out.exists()

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

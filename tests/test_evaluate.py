"""`lowmem-alignprop sample` on the tiny model: base vs LoRA images from the same seeds, rewards, adapter mixing.

The LoRAs are built directly (random A and B matrices, saved with ``save_lora_weights`` exactly as training saves
them) so the file stays fast; a slow test trains a real brightness LoRA. ``sample_steps=3`` keeps each image cheap.
"""

import dataclasses
import json
import shutil
import os
import logging

import pytest
import yaml
import torch

from lowmem_alignprop.cli import main
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.lora.adapters import load_adapters, mix_adapters
from lowmem_alignprop.commands.evaluate import generate
from lowmem_alignprop.lora.lora_args import parse_lora
from lowmem_alignprop.run.filenames import SAMPLE_GRID, SAMPLE_RESULTS

STEPS = "3"
COMMON = ["--profile", "cpu", "--set", f"sample_steps={STEPS}"]


def _save_lora(path, unet, tensors):
    from diffusers import StableDiffusionPipeline
    StableDiffusionPipeline.save_lora_weights(str(path), unet_lora_layers=tensors)
    return path


def _random_lora(template: dict, seed: int, up_std: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in template.items():
        std = up_std if ".up." in k else 0.5  # down ~ N(0, 1/r) as peft's gaussian init (r=4); up: the update
        out[k] = torch.randn(v.shape, generator=g) * std
    return out


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_dir):
    """a: a random LoRA for the tiny UNet that visibly changes its images; neg_a: a with its up matrices negated
    (update -dW_a); small_a, small_b: two weak ones (the images stay close to linear in their weights);
    other: a LoRA for a UNet with cross_attention_dim 48 (another base model)."""
    from diffusers import UNet2DConditionModel

    from lowmem_alignprop.models.loading import add_lora, lora_state_dict

    root = tmp_path_factory.mktemp("loras")
    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    add_lora(unet, 4, None, 0)
    template = lora_state_dict(unet)
    a = _random_lora(template, 1, 0.1)
    neg_a = {k: -v if ".up." in k else v.clone() for k, v in a.items()}
    other = UNet2DConditionModel.from_config({**unet.config, "cross_attention_dim": 48})
    add_lora(other, 4, None, 0)
    return {"a": _save_lora(root / "a", unet, a), "neg_a": _save_lora(root / "neg_a", unet, neg_a),
            "small_a": _save_lora(root / "small_a", unet, _random_lora(template, 2, 0.02)),
            "small_b": _save_lora(root / "small_b", unet, _random_lora(template, 3, 0.02)),
            "other": _save_lora(root / "other", other, lora_state_dict(other))}


@pytest.fixture(scope="module")
def run(tmp_path_factory, loras):
    out = tmp_path_factory.mktemp("sample") / "eval"
    rc = main(["sample", *COMMON, "--lora", str(loras["a"]), "--num-prompts", "2", "--images-per-prompt", "2",
               "--seed", "5", "--output-dir", str(out)])
    assert rc == 0
    return out, json.loads((out / SAMPLE_RESULTS).read_text())


def _tiny_pipe(tiny_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _direct(pipe, prompt, seed):
    """One image the plain diffusers way, with the cpu profile's sampler settings."""
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=int(STEPS), guidance_scale=7.5, eta=1.0, height=64, width=64,
                generator=g, output_type="pt").images


def _brightness(images):
    from lowmem_alignprop.rewards import build_reward
    return build_reward("brightness")(images, [""] * len(images))


def test_results_json_matches_a_direct_computation(run, tiny_dir, loras):
    out, r = run
    assert r["sampler"] == {"scheduler": "DDIM", "sample_steps": 3, "guidance_scale": 7.5, "eta": 1.0,
                            "guidance_rescale": 0.0, "prediction_type": "epsilon", "zero_terminal_snr": False,
                            "resolution": 64, "negative_prompt": ""}
    assert [p["prompt"] for p in r["per_prompt"]] == ["cat", "dog"]  # the first two of simple_animals
    assert [p["seeds"] for p in r["per_prompt"]] == [[5, 6], [7, 8]]
    assert r["device"] == "cpu" and r["cuda_allocator"] == "cpu"  # (expandable segments: CUDA only)
    pipe = _tiny_pipe(tiny_dir)
    for p in r["per_prompt"]:
        direct = [_brightness(_direct(pipe, p["prompt"], s)).item() for s in p["seeds"]]
        assert p["base"] == pytest.approx(direct, abs=1e-5)
    pipe.load_lora_weights(str(loras["a"]))
    for p in r["per_prompt"]:
        direct = [_brightness(_direct(pipe, p["prompt"], s)).item() for s in p["seeds"]]
        assert p["lora"] == pytest.approx(direct, abs=1e-5)
        assert p["base_mean"] == pytest.approx(sum(p["base"]) / 2)
        assert p["difference"] == pytest.approx(p["lora_mean"] - p["base_mean"])
    all_base = [x for p in r["per_prompt"] for x in p["base"]]
    all_lora = [x for p in r["per_prompt"] for x in p["lora"]]
    assert r["base_mean"] == pytest.approx(sum(all_base) / 4) and r["lora_mean"] == pytest.approx(sum(all_lora) / 4)
    assert r["difference"] == pytest.approx(r["lora_mean"] - r["base_mean"])
    assert abs(r["difference"]) > 1e-3, r["difference"]  # the LoRA changes the images' mean brightness


def test_sampler_is_the_training_rollout(run, tiny_dir):
    """The pipeline's image equals training's own DDIM rollout (sampling.rollout, k=0) from the same generator."""
    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.models.sampling import decode, encode_prompts, initial_latents, make_pipeline, rollout

    _, r = run
    comps = load_components(Config(model=str(tiny_dir)))
    pipe = make_pipeline(comps)
    g = torch.Generator().manual_seed(r["per_prompt"][1]["seeds"][0])
    emb = encode_prompts(pipe, ["dog"], "cpu", 64)
    comps.scheduler.set_timesteps(3)
    with torch.no_grad():
        lat = initial_latents(1, comps.unet, comps.vae, 64, g, "cpu")
        lat = rollout(comps.unet, comps.scheduler, lat, emb, k=0, guidance_scale=7.5, eta=1.0, generator=g)
        reward = _brightness(decode(comps.vae, lat)).item()
    assert reward == pytest.approx(r["per_prompt"][1]["base"][0], abs=1e-5)


def test_grid_png_has_one_column_per_image_and_two_rows(run):
    from PIL import Image

    out, _ = run
    grid = Image.open(out / SAMPLE_GRID)
    # export.save_sample_grid: 64 px row labels + 192 px per image; 20 px title + 2 rows of (192 + 28 label)
    assert grid.size == (64 + 4 * 192, 20 + 2 * (192 + 28))
    import numpy as np
    assert np.asarray(grid.convert("L"), dtype=np.float32).std() > 20  # images were pasted, not a blank canvas


def test_the_grid_shows_the_base_images_in_its_first_row_and_the_lora_images_in_its_second(run):
    """Each image's mean luma in the grid (64 px pasted at 3x, nearest; BT.601 as the brightness reward) is its reward
    to within the 8-bit rounding: row 0 column j is per_prompt's base image j, row 1 its lora image j (with the rows
    swapped, the LoRA's images were labelled base; only the flow-model tests saw it)."""
    import numpy as np
    from PIL import Image

    out, r = run
    grid = np.asarray(Image.open(out / SAMPLE_GRID).convert("L"), dtype=np.float64)
    cell, label_h, left = 192, 28, 64
    base = [x for p in r["per_prompt"] for x in p["base"]]
    lora = [x for p in r["per_prompt"] for x in p["lora"]]
    # the rows can be told apart: swapped, an image whose two rewards differ by more than twice the tolerance below
    # misses it (4x here; the tiny model's random text encoder is another with transformers < 5.13: 0.0021 there)
    assert max(abs(b - a) for b, a in zip(base, lora)) > 4 * 2.5e-4
    for j in range(4):
        for row, want in enumerate((base[j], lora[j])):
            top = 20 + row * (cell + label_h)
            shown = grid[top:top + cell, left + j * cell:left + (j + 1) * cell].mean() / 255
            assert shown == pytest.approx(want, abs=2.5e-4), (row, j, shown, base[j], lora[j])


# ------------------------------------------------------------------------------------------------------------
# no LoRA: the model alone (a base model before training, an `export --merge`)
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def alone(tmp_path_factory, tiny_dir):
    """`sample --model DIR` without a LoRA: 2 prompts x 2 images, seeds 5..8, and what it printed."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("alone") / "eval"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["sample", *COMMON, "--model", str(tiny_dir), "--reward", "brightness", "--num-prompts", "2",
                   "--images-per-prompt", "2", "--seed", "5", "--output-dir", str(out)])
    assert rc == 0
    return out, json.loads((out / SAMPLE_RESULTS).read_text()), printed.getvalue()


def test_a_model_alone_is_scored_as_the_diffusers_pipeline_renders_it_from_the_same_seeds(alone, tiny_dir):
    """Its scores are the reward of the images the diffusers pipeline renders from the same seeds; the keys that
    need a LoRA are there, null (a script reading today's files reads these); the summary has no LoRA line."""
    out, r, printed = alone
    assert r["model"] == str(tiny_dir) and r["loras"] == [] and r["lora_weights_mean"] is None
    assert "model_revision" not in r  # (a local folder has no commit: a hub id's is recorded)
    assert [p["prompt"] for p in r["per_prompt"]] == ["cat", "dog"]
    assert [p["seeds"] for p in r["per_prompt"]] == [[5, 6], [7, 8]]
    pipe = _tiny_pipe(tiny_dir)
    for p in r["per_prompt"]:
        direct = [_brightness(_direct(pipe, p["prompt"], s)).item() for s in p["seeds"]]
        assert p["base"] == pytest.approx(direct, abs=1e-5)
        assert p["base_mean"] == pytest.approx(sum(direct) / 2, abs=1e-5)
        assert (p["lora"], p["lora_mean"], p["difference"]) == (None, None, None)
    assert r["base_mean"] == pytest.approx(sum(x for p in r["per_prompt"] for x in p["base"]) / 4, abs=1e-7)
    assert (r["lora_mean"], r["difference"]) == (None, None)
    assert printed.splitlines() == ["reward brightness over 2 prompts x 2 images (DDIM 3 steps, seed 5):",
                                    f"  model {r['base_mean']:.4f}   ({tiny_dir}, no LoRA)",
                                    f"wrote {out / SAMPLE_GRID} and {out / SAMPLE_RESULTS}"]


def test_a_model_alones_grid_is_one_row_of_its_images(alone):
    """One row of the four images (64 px pasted at 3x), each cell's mean luma its brightness reward to within the
    8-bit rounding: the grid holds the images that were scored, in order."""
    import numpy as np
    from PIL import Image

    out, r, _ = alone
    grid = np.asarray(Image.open(out / SAMPLE_GRID).convert("L"), dtype=np.float64)
    cell, label_h, left = 192, 28, 64
    assert grid.shape == (20 + cell + label_h, left + 4 * cell)
    rewards = [x for p in r["per_prompt"] for x in p["base"]]
    assert max(rewards) - min(rewards) > 4 * 2.5e-4  # (the images can be told apart by it)
    for j, want in enumerate(rewards):
        shown = grid[20:20 + cell, left + j * cell:left + (j + 1) * cell].mean() / 255
        assert shown == pytest.approx(want, abs=2.5e-4), (j, shown, want)


def test_without_model_or_lora_the_default_model_is_sampled_and_named(tmp_path, caplog):
    """No --model and no LoRA (it was refused: "give the LoRA to evaluate"): the default model, named in one line."""
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    out = tmp_path / "out"
    assert main(["sample", *COMMON, "--prompt", "a cat", "--output-dir", str(out)]) == 0
    said = [r.getMessage() for r in caplog.records if "the default model" in r.getMessage()]
    assert said == ["no LoRA and no --model: sampling tiny, the default model ($LOWMEM_ALIGNPROP_MODEL) (--model M "
                    "samples another; --lora DIR compares a LoRA with it)"], said
    r = json.loads((out / SAMPLE_RESULTS).read_text())
    assert r["model"] == "tiny" and r["loras"] == [] and len(r["per_prompt"][0]["base"]) == 1


# ------------------------------------------------------------------------------------------------------------
# mixing adapters: weights interpolate the adapters' weight updates
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixer(tiny_dir, loras):
    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.commands.sample_pipeline import build_pipeline

    cfg = Config(model=str(tiny_dir), sample_steps=int(STEPS), resolution=64, k=1)
    pipe = build_pipeline(cfg, torch.device("cpu"), torch.float32)
    specs = {name: parse_lora(str(loras[name]), i) for i, name in enumerate(("a", "neg_a", "small_a", "small_b"))}
    load_adapters(pipe, list(specs.values()), cfg.model)
    prompts, seeds = ["cat", "dog"], [11, 12]
    cache = {}

    def images(**weights):
        """Images with the given adapter weights ({} = base model); each mix generated once."""
        key = tuple(sorted(weights.items()))
        if key in cache:
            return cache[key]
        if not weights:
            pipe.disable_lora()
        else:
            chosen = []
            for name, w in weights.items():
                specs[name].weight = w
                chosen.append(specs[name])
            mix_adapters(pipe, chosen)
        cache[key] = generate(pipe, prompts, seeds, cfg, batch_size=2)
        return cache[key]

    return pipe, specs, images


def test_weights_one_and_zero_equal_the_first_adapter_alone(mixer):
    _, _, images = mixer
    a = images(a=1.0)
    assert torch.allclose(images(a=1.0, small_b=0.0), a, atol=1e-5)
    assert (a - images()).abs().max() > 1e-2  # and a really changes the images
    assert (images(small_b=1.0) - a).abs().max() > 1e-2  # small_b is another adapter


def test_opposite_updates_cancel_and_halves_add_up(mixer):
    """0.5 * dW_a + 0.5 * (-dW_a) = 0 gives the base model's images; a at 0.5 twice equals a at 1.0."""
    _, _, images = mixer
    assert torch.allclose(images(a=0.5, neg_a=0.5), images(), atol=1e-5)
    # 1.5 dW_a + 0.5 (-dW_a) = dW_a
    assert torch.allclose(images(a=1.5, neg_a=0.5), images(a=1.0), atol=1e-5)
    assert (images(a=0.5) - images(a=1.0)).abs().max() > 1e-3  # the weight scales, it is not ignored


def test_every_adapted_layer_computes_the_weighted_sum_of_updates(mixer):
    """In each LoRA layer: out(0.3 a + 0.7 b) - base = 0.3 (out(a) - base) + 0.7 (out(b) - base), exactly."""
    pipe, specs, _ = mixer
    name_a, name_b = specs["a"].name, specs["small_b"].name
    layers = [(n, m) for n, m in pipe.unet.named_modules() if name_a in getattr(m, "lora_A", {})]
    assert len(layers) == 32  # 8 attention blocks x (to_q, to_k, to_v, to_out.0)
    g = torch.Generator().manual_seed(0)
    xs = {n: torch.randn(3, m.in_features, generator=g) for n, m in layers}

    def outputs(**weights):
        if weights:
            from lowmem_alignprop.lora.lora_args import LoraSpec
            mix_adapters(pipe, [LoraSpec("", None, w, {"a": name_a, "b": name_b}[k]) for k, w in weights.items()])
        else:
            pipe.disable_lora()
        with torch.no_grad():
            return {n: m(xs[n]) for n, m in layers}

    base, out_a, out_b, mix = outputs(), outputs(a=1.0), outputs(b=1.0), outputs(a=0.3, b=0.7)
    worst = max(((mix[n] - base[n]) - 0.3 * (out_a[n] - base[n]) - 0.7 * (out_b[n] - base[n])).abs().max().item()
                for n, _ in layers)
    smallest_update = min(min((out_a[n] - base[n]).abs().max().item(), (out_b[n] - base[n]).abs().max().item())
                          for n, _ in layers)
    assert worst < 1e-5 and smallest_update > 1e-3, (worst, smallest_update)


def test_half_half_mix_lies_between_the_two_adapters(mixer):
    """Images of 0.5 a + 0.5 b (weak adapters): closer to each adapter's images than those are to each other, and
    near their mean (the images are nonlinear in the weights, so 'near' is within 25% of the a-b distance; measured
    0.09 here, and it grows with the adapters' size: 0.22 with updates 2.5x as large)."""
    _, _, images = mixer
    ia, ib, im = images(small_a=1.0), images(small_b=1.0), images(small_a=0.5, small_b=0.5)
    d_ab = (ia - ib).norm().item()
    assert (im - ia).norm().item() < d_ab and (im - ib).norm().item() < d_ab
    ratio = (im - (ia + ib) / 2).norm().item() / d_ab
    print(f"distance of the 0.5/0.5 mix from the mean image: {ratio:.3f} of the a-b distance")
    assert ratio < 0.25, ratio


def test_cli_weights_reach_the_adapters(tmp_path, loras, tiny_dir, caplog):
    """a:0.5 --lora neg_a:0.5 through the CLI (a LoRA may be given without --lora): the LoRA row has the base
    row's rewards. Their runs sampled with other negative prompts (base_model.json's records): the first LoRA's is
    used, sample_results.json says which, and the other's is warned of (it was dropped without a word)."""
    import logging
    import shutil

    mixed = {}
    for name, settings in (("a", {}), ("neg_a", {"negative_prompt": "blurry"})):  # (--lora's come first)
        mixed[name] = shutil.copytree(loras[name], tmp_path / name)
        (mixed[name] / "base_model.json").write_text(json.dumps({"model": str(tiny_dir), "image_settings": settings}))
    out = tmp_path / "mix"
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        rc = main(["sample", *COMMON, f"{mixed['a']}:0.5", "--lora", f"{mixed['neg_a']}:0.5",
                   "--num-prompts", "2", "--output-dir", str(out)])
    assert rc == 0
    assert (f"--lora {mixed['a']}:0.5's run sampled with negative_prompt=(default): the images use the first "
            "LoRA's settings (negative_prompt=blurry); --set KEY=VALUE chooses") in caplog.text
    r = json.loads((out / SAMPLE_RESULTS).read_text())
    assert r["sampler"]["negative_prompt"] == "blurry"
    assert [d["weight"] for d in r["loras"]] == [0.5, 0.5]
    # each as given (the folder, not the weights file in it), absolute: kohya files and folders alike
    assert {d["path"] for d in r["loras"]} == {str(mixed["a"].absolute()), str(mixed["neg_a"].absolute())}
    for p in r["per_prompt"]:
        assert p["lora"] == pytest.approx(p["base"], abs=1e-5)


# ------------------------------------------------------------------------------------------------------------
# bad input: one line naming the fix, exit 2, nothing written
# ------------------------------------------------------------------------------------------------------------
def test_parse_lora_forms(tmp_path, loras):
    spec = parse_lora(f"{loras['a']}:0.25", 3)
    assert spec.weight == 0.25 and spec.name == "lora3" and spec.file.name == "pytorch_lora_weights.safetensors"
    assert parse_lora(str(loras["a"]), 0).weight == 1.0
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "lora").symlink_to(loras["a"], target_is_directory=True)
    assert parse_lora(f"{run_dir}:-0.5", 0).file.parent == run_dir / "lora"  # a run's output dir works too
    # a Windows path that does not exist is a missing path: its drive letter's colon starts no weight
    for missing in (r"C:\runs\nope\lora", r"D:\Downloads\my_lora.safetensors"):
        with pytest.raises(UserError) as e:
            parse_lora(missing, 0)
        assert "not a number" not in str(e.value) and missing in str(e.value), str(e.value)


def test_a_prompt_longer_than_the_text_encoder_reads_is_said(tmp_path, tiny_dir, loras, caplog):
    """sample cut a long --prompt to the text encoder's tokens in silence (training says so)."""
    import logging

    caplog.set_level(logging.WARNING, logger="lowmem_alignprop")
    long = "a very detailed photograph of a small grey cat on a red sofa " * 8
    assert main(["sample", *COMMON, str(loras["a"]), "--prompt", long, "--prompt", "a dog", "--output-dir",
                 str(tmp_path / "long")]) == 0
    assert "1 of 2 prompts are longer than the" in caplog.text and "tokens the text encoder reads" in caplog.text


def test_fp16_on_a_cpu_is_said_by_sample_as_by_train(tmp_path, tiny_dir, loras, caplog):
    """`sample --set mixed_precision=fp16` (or a GPU profile's) on a machine without CUDA rendered in fp32 in silence;
    train says it. The images are fp32's: the same scores as without the setting."""
    import logging

    caplog.set_level(logging.WARNING, logger="lowmem_alignprop")
    args = ["sample", *COMMON, str(loras["a"]), "--prompt", "a dog"]
    assert main([*args, "--set", "mixed_precision=fp16", "--output-dir", str(tmp_path / "fp16")]) == 0
    assert "mixed_precision=fp16 needs a CUDA device: rendering in fp32 on this CPU" in caplog.messages
    caplog.clear()
    assert main([*args, "--output-dir", str(tmp_path / "fp32")]) == 0
    assert not [m for m in caplog.messages if "needs a CUDA device" in m]
    scores = [json.loads((tmp_path / name / SAMPLE_RESULTS).read_text())["per_prompt"] for name in ("fp16", "fp32")]
    assert scores[0] == scores[1]


def test_prompts_of_your_own_are_rendered_as_given(tmp_path, tiny_dir, loras):
    """`sample --prompt TEXT` (repeatable): exactly those prompts, in that order (surrounding spaces dropped), each
    image the one diffusers renders for that prompt and seed; the results name them as given with --prompt."""
    out = tmp_path / "own"
    assert main(["sample", *COMMON, str(loras["a"]), "--prompt", " a red fox in the snow ", "--prompt", "a dog",
                 "--seed", "3", "--output-dir", str(out)]) == 0
    r = json.loads((out / SAMPLE_RESULTS).read_text())
    assert [p["prompt"] for p in r["per_prompt"]] == ["a red fox in the snow", "a dog"]
    assert r["prompts"] == "--prompt" and r["num_prompts"] == 2 and [p["seeds"] for p in r["per_prompt"]] == [[3], [4]]
    direct = _brightness(_direct(_tiny_pipe(tiny_dir), "a red fox in the snow", 3)).item()
    assert r["per_prompt"][0]["base"] == pytest.approx([direct], abs=1e-5)


@pytest.mark.parametrize("case", ["missing", "empty_dir", "bad_weight", "no_weight", "other_model",
                                  "zero_prompts", "checkpoint", "prompt_and_prompts", "empty_prompt", "upper_suffix",
                                  "many_images", "prompt_and_num_prompts"])
def test_bad_input_exits_2_and_writes_nothing(case, tmp_path, loras, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    step = tmp_path / "run" / "checkpoints" / "step-00000002"  # what a training checkpoint holds
    step.mkdir(parents=True)
    (step / "trainable.safetensors").write_bytes(b"")
    (step / "state.json").write_text("{}")
    import pathlib
    import shutil
    upper = tmp_path / "my.SAFETENSORS"  # a valid LoRA file, read by diffusers only by its lower-case suffix
    shutil.copy(next(pathlib.Path(loras["a"]).glob("*.safetensors")), upper)
    args = {"upper_suffix": ["--lora", str(upper)],
            "missing": ["--lora", str(tmp_path / "nope")],
            "empty_dir": ["--lora", str(empty)],
            "bad_weight": ["--lora", f"{loras['a']}:half"],
            "no_weight": ["--lora", f"{loras['a']}:"],
            "other_model": ["--lora", str(loras["a"]), "--lora", f"{loras['other']}:0.5"],
            "zero_prompts": ["--lora", str(loras["a"]), "--num-prompts", "0"],
            "checkpoint": ["--lora", str(step)],
            "prompt_and_prompts": ["--lora", str(loras["a"]), "--prompt", "a cat", "--prompts", "simple_animals"],
            "empty_prompt": ["--lora", str(loras["a"]), "--prompt", " "],
            "many_images": ["--lora", str(loras["a"]), "--images-per-prompt", "1025"],
            "prompt_and_num_prompts": ["--lora", str(loras["a"]), "--prompt", "a cat", "--num-prompts", "1"]}[case]
    out = tmp_path / "out"
    rc = main(["sample", *COMMON, *args, "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not out.exists()
    expected = {"missing": "does not exist", "empty_dir": "holds no LoRA weights", "bad_weight": "is not a number",
                "no_weight": "is not a number", "other_model": "adapt layers of other widths",
                "zero_prompts": "at least 1",
                "checkpoint": "is incomplete or corrupt: no manifest.json",
                "prompt_and_prompts": "give your prompts with --prompt TEXT or a prompt set with --prompts, not both",
                "empty_prompt": "--prompt '': give the prompt's text",
                "upper_suffix": "diffusers reads my.SAFETENSORS by its suffix in lower case only: rename it to "
                                "my.safetensors",
                "many_images": "--images-per-prompt 1025 is more than 1024, the most this tool takes: give 1024 or "
                               "fewer",
                "prompt_and_num_prompts": "--num-prompts 1 counts a prompt set's first prompts: with --prompt TEXT "
                                          "each of yours is rendered (1 given); leave --num-prompts out"}[case]
    assert expected in err[0], err[0]


@pytest.mark.parametrize("failure", ["raise ValueError('no face found')", "sys.exit(3)", "raise KeyboardInterrupt"])
def test_a_reward_that_fails_while_scoring_the_images_is_one_line(failure, tmp_path, loras, capsys):
    """Your reward's code fails on sample's images (not on the start-up probe's two random ones: here on the LoRA
    row's, the base row scored): one line naming the reward and which images, exit 2, nothing
    written. It was a traceback (exit 1), sys.exit(3) a silent exit 3, and the reward's own KeyboardInterrupt read as
    the user's Ctrl-C (a Ctrl-C arrives as run.stop_request.CtrlC)."""
    reward = tmp_path / "picky.py"
    reward.write_text(f"import sys\n\nseen = []\n\ndef score(images, prompts):\n    seen.extend(prompts)\n"
                      f"    if len(seen) > 2 + 3:  # the probe's 2, the base row's 3\n        {failure}\n"
                      "    return images.mean(dim=(1, 2, 3))\n")
    out = tmp_path / "out"
    rc = main(["sample", *COMMON, "--lora", str(loras["a"]), "--reward", f"{reward}:score", "--prompt", "a cat",
               "--prompt", "a dog", "--prompt", "a cow", "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    said = {"raise ValueError('no face found')": "ValueError while scoring the LoRA's images: no face found",
            "sys.exit(3)": "SystemExit while scoring the LoRA's images: 3",
            "raise KeyboardInterrupt": "KeyboardInterrupt while scoring the LoRA's images"}[failure]
    assert (rc, err) == (2, [f"error: the reward '{reward}:score' raised {said}; fix it and run sample again "
                             "(nothing was written)"])
    assert not out.exists()


def test_a_reward_that_changes_the_working_directory_moves_no_file_of_sample(tmp_path, tiny_dir, monkeypatch, caplog):
    """A relative --output-dir, and a reward that os.chdir()s away while it scores sample's images (not at the
    start-up test): the grid and results went into the reward's folder (elsewhere/out), and the user's out/ stayed
    empty. The working directory is set back after each call (said once): they are where the command was given."""
    import logging

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    reward = tmp_path / "wanders.py"
    reward.write_text(f"import os\n\ndef score(images, prompts):\n    if not images.requires_grad:  # (not the test)\n"
                      f"        os.chdir({str(elsewhere)!r})\n    return images.mean(dim=(1, 2, 3))\n")
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    assert main(["sample", *COMMON, "--model", str(tiny_dir), "--reward", f"{reward}:score", "--prompt", "a cat",
                 "--output-dir", "out"]) == 0
    assert json.loads((tmp_path / "out" / SAMPLE_RESULTS).read_text())["output_dir"] == str(tmp_path / "out")
    assert list(elsewhere.iterdir()) == [] and os.getcwd() == str(tmp_path)
    said = [r.getMessage() for r in caplog.records if "working directory" in r.getMessage()]
    assert said == [f"reward '{reward}:score': score(images, prompts) changed the process's global settings (working "
                    f"directory {tmp_path} -> {elsewhere}); set back after each call: a reward must leave them as it "
                    "found them"], said


def test_a_sampler_the_model_cannot_run_is_refused_before_any_other_line(tmp_path, loras, tiny_dir, capsys, caplog):
    """A folder's own zero-terminal-SNR schedule at eta 1: sample refused it as training does, but only once the
    model loaded, after its line on the prompt file it renders: now its one line comes first, and nothing is
    written."""
    import json
    import logging
    import shutil

    from lowmem_alignprop.cli import main

    model = tmp_path / "zero-snr"
    shutil.copytree(tiny_dir, model)
    file = model / "scheduler" / "scheduler_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "rescale_betas_zero_snr": True,
                                "prediction_type": "v_prediction", "timestep_spacing": "trailing"}))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\n")
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    assert main(["sample", str(loras["a"]), "--model", str(model), "--prompts", str(prompts), "--num-prompts", "1",
                 "--set", "eta=1", "--profile", "cpu", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [x for x in err if x.startswith("error: ")] == [
        f"error: {model}: zero terminal SNR with eta=1 (the default): DDIM's step from the pure-noise timestep then "
        "has no deterministic part left, and diffusers' step turns it into NaN: use --set eta=0 (or any value below "
        "1)"]
    assert "prompts of" not in caplog.text + "\n".join(err) and not (tmp_path / "out").exists()


def test_a_lora_of_another_shape_is_its_one_error_without_the_other_base_warning_before_it(tmp_path, loras, capsys,
                                                                                          caplog):
    """A LoRA whose base_model.json names another model, of other layer shapes: the line that it does not fit, not
    first a warning that the images show it on another model (two lines that contradict each other)."""
    import shutil

    lora = tmp_path / "other"
    shutil.copytree(loras["other"], lora)
    (lora / "base_model.json").write_text(json.dumps({"model": "elsewhere", "unet_config_sha": "0" * 16,
                                                      "denoiser": "UNet", "conv_in": [0.0, 1.0]}))
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main(["sample", *COMMON, "--model", "tiny", "--lora", str(lora), "--output-dir",
                     str(tmp_path / "out")]) == 2
    assert "[4, 48] in the LoRA, [4, 32] here" in capsys.readouterr().err
    assert "the images show it on another model" not in caplog.text and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_trained_brightness_lora_raises_brightness_on_new_seeds(tmp_path):
    """Train 4 steps on brightness, then evaluate on seeds training never used: brightness goes up."""
    run_dir = tmp_path / "train"
    assert main(["--profile", "cpu", "--steps", "4", "--output-dir", str(run_dir), "--set", "sample_prompts=0",
                 "--set", f"sample_steps={STEPS}", "--set", "lr=0.03"]) == 0
    out = tmp_path / "eval"
    assert main(["sample", *COMMON, "--lora", str(run_dir), "--num-prompts", "4", "--seed", "1000",
                 "--output-dir", str(out)]) == 0
    r = json.loads((out / SAMPLE_RESULTS).read_text())
    assert r["difference"] > 0.002, r["difference"]


def test_the_same_lora_given_twice_is_said(loras, caplog, tmp_path):
    """Two --lora of one LoRA add up (a:0.5 a:0.5 is a:1): said, since it is mostly a typo in a mix (it was silent).
    A run folder's LoRA is recorded with where in it its weights were (lora/, not a checkpoint or best/)."""
    from lowmem_alignprop.lora.lora_checks import check_mixable

    shutil.copytree(loras["a"], tmp_path / "run" / "lora")
    assert parse_lora(str(tmp_path / "run"), 0).found_in == "lora/pytorch_lora_weights.safetensors"
    assert parse_lora(str(loras["a"]), 0).found_in is None  # (a LoRA folder: its file, nothing to add)

    specs = [parse_lora(f"{loras['a']}:0.5", 0), parse_lora(f"{loras['a']}/pytorch_lora_weights.safetensors:0.25", 1),
             parse_lora(str(loras["small_a"]), 2)]
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        check_mixable(specs)
    assert [r.getMessage() for r in caplog.records] == [
        f"--lora {loras['a']}:0.5 and --lora {loras['a']}/pytorch_lora_weights.safetensors:0.25 are the same LoRA: "
        f"their weights add up (as --lora {loras['a']}:0.75)"]


def test_sample_scores_with_the_runs_reward_and_prompts_where_they_are_at_hand(tmp_path, caplog):
    """A run's LoRA is scored with the reward it was trained on, on its prompts (it was scored with brightness on
    simple_animals, whatever the run trained); the flags win; a LoRA copied where its prompt file is not is said
    and scored on the default prompts."""
    import shutil

    prompts = tmp_path / "mine.txt"
    prompts.write_text("a red cube\na blue ball\n")
    run_dir = tmp_path / "train"
    assert main(["--profile", "cpu", "--steps", "1", "--output-dir", str(run_dir), "--set", "sample_prompts=0",
                 "--set", f"sample_steps={STEPS}", "--reward", "colorfulness", "--prompts", str(prompts), "--model",
                 "toy", "--set", "fidelity_images=0"]) == 0

    def sampled(lora, *flags):
        out = tmp_path / f"eval-{len(list(tmp_path.glob('eval-*')))}"
        assert main(["sample", *COMMON, str(lora), "--num-prompts", "1", "--output-dir", str(out), *flags]) == 0
        r = json.loads((out / SAMPLE_RESULTS).read_text())
        return r["reward"], r["prompts"], [p["prompt"] for p in r["per_prompt"]]

    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):  # the toy model on prompts outside its grammar:
        assert sampled(run_dir / "lora") == ("colorfulness", str(prompts), ["a red cube"])  # said, as training does
    assert "1 of the 1 prompts are outside the toy world's grammar (e.g. 'a red cube')" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):  # (a training setting given to sample is said)
        assert sampled(run_dir / "lora", "--reward", "brightness", "--prompts", "simple_animals", "--set", "steps=9",
                       "--set", "lr=0.5", "--set", "guidance_scale=4")[:2] == ("brightness", "simple_animals")
    said = [r.getMessage() for r in caplog.records if "training settings" in r.getMessage()]
    assert said == ["--set lr, steps: training settings; sample trains nothing, so they change nothing here"]
    # the model it was trained on, named by its folder, or an `export --merge` of it (the LoRA taken out again at
    # weight -1): the run's settings too (both fell back to the profile's defaults, brightness on simple_animals)
    from lowmem_alignprop.settings.model_kind import TOY_MODEL_DIR

    assert sampled(run_dir / "lora", "--model", str(TOY_MODEL_DIR)) == ("colorfulness", str(prompts), ["a red cube"])
    assert main(["export", str(run_dir / "lora"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert sampled(f"{run_dir / 'lora'}:-1", "--model", str(tmp_path / "merged"))[:2] == ("colorfulness",
                                                                                               str(prompts))
    assert f"is an `export --merge` of the model {run_dir / 'lora'} was trained on; as its run did" in caplog.text
    caplog.clear()
    away = tmp_path / "away" / "lora"
    shutil.copytree(run_dir / "lora", away)
    prompts.unlink()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        reward, spec, _ = sampled(away)
    assert reward == "colorfulness" and spec != str(prompts)
    assert (f"the LoRA's run was scored with prompts={prompts}, not at hand here (prompt file {prompts} does not "
            "exist): the default prompts instead (--prompts chooses)") in caplog.text  # (was cut at 100 characters)


def test_a_second_evaluation_without_output_dir_keeps_the_first(tmp_path, loras, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    one = ["sample", *COMMON, "--lora", str(loras["a"]), "--num-prompts", "1"]
    assert main([*one, "--seed", "1"]) == 0
    first = (tmp_path / "outputs" / "sample" / SAMPLE_RESULTS).read_text()
    assert main([*one, "--seed", "2"]) == 0
    assert (tmp_path / "outputs" / "sample" / SAMPLE_RESULTS).read_text() == first  # left as it was
    second = json.loads((tmp_path / "outputs" / "sample-2" / SAMPLE_RESULTS).read_text())
    assert second["seed"] == 2 and json.loads(first)["seed"] == 1
    assert second["output_dir"] == str(tmp_path / "outputs" / "sample-2")  # absolute, as the LoRAs' paths beside it
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):  # a folder the user names is reused, saying so
        assert main([*one, "--seed", "3", "--output-dir", "outputs/sample"]) == 0
    assert "outputs/sample held an earlier evaluation: replacing it" in caplog.text
    assert json.loads((tmp_path / "outputs" / "sample" / SAMPLE_RESULTS).read_text())["seed"] == 3
    # the results' write fails (a kill, a full disk) after the new grid's: no results of seed 3 stay beside the grid
    # of seed 4 (nothing says the pair disagrees); the folder holds no evaluation, only the grid
    from lowmem_alignprop.run import atomic
    monkeypatch.setenv(atomic.INJECT_ENV, f"{SAMPLE_RESULTS}:fail")
    grid = (tmp_path / "outputs" / "sample" / SAMPLE_GRID).read_bytes()
    assert main([*one, "--seed", "4", "--output-dir", "outputs/sample"]) == 2
    assert (tmp_path / "outputs" / "sample" / SAMPLE_GRID).read_bytes() != grid
    assert not (tmp_path / "outputs" / "sample" / SAMPLE_RESULTS).exists()


def test_prompts_in_other_scripts_are_drawn_as_text_not_boxes(tmp_path, caplog, monkeypatch):
    """Pillow's built-in font draws every non-Latin character as the same box: two Cyrillic prompts gave identical
    labels. The grid's font now has their glyphs; a prompt wider than its cell is cut to it with '...'."""
    import numpy as np
    from PIL import Image

    from lowmem_alignprop.training.grid import save_sample_grid

    imgs = (torch.zeros(2, 3, 8, 8), torch.zeros(2))
    grid = Image.open(save_sample_grid(tmp_path / "g.png", ["Жук", "Щит"], imgs, imgs))
    title = np.asarray(grid.convert("L"))[:18]
    first, second = title[:, 64:64 + 60], title[:, 64 + 192:64 + 192 + 60]
    assert (first < 128).any() and (second < 128).any()  # something is drawn
    assert not np.array_equal(first, second)  # and not the same box twice

    long = "an oil painting of a very small red fox sleeping under a tree in autumn"
    grid = Image.open(save_sample_grid(tmp_path / "h.png", [long, "cat"], imgs, imgs))
    title = np.asarray(grid.convert("L"))[:18]
    assert (title[:, 64:64 + 192 - 4] < 128).any() and not (title[:, 64 + 192 - 4:64 + 196] < 128).any()


def test_many_prompts_wrap_into_bands_of_the_grid_each_image_under_its_prompt(tmp_path):
    """40 prompts made one row 7,744 px wide: past GRID_COLUMNS the columns go on in bands below, image j (before
    and after) in band j // 8, column j % 8, and every band has its row names."""
    import numpy as np
    from PIL import Image

    from lowmem_alignprop.training.grid import GRID_COLUMNS, save_sample_grid

    n, cell, label_h, left = 11, 192, 28, 64
    shade = torch.linspace(0.1, 0.9, n)
    before = (shade[:, None, None, None].expand(n, 3, 8, 8).clone(), torch.zeros(n))
    after = (1 - before[0], torch.zeros(n))
    grid = np.asarray(Image.open(save_sample_grid(tmp_path / "g.png", [f"p{j}" for j in range(n)], before, after,
                                                  cell=cell)).convert("L")).astype(int)
    band = 20 + 2 * (cell + label_h)
    assert grid.shape == (2 * band, left + GRID_COLUMNS * cell)  # 8 columns, two bands
    for j in range(n):
        x, top = left + (j % GRID_COLUMNS) * cell + cell // 2, (j // GRID_COLUMNS) * band
        assert abs(grid[top + 20 + cell // 2, x] - round(255 * shade[j].item())) <= 1, j
        assert abs(grid[top + 20 + cell + label_h + cell // 2, x] - round(255 * (1 - shade[j].item()))) <= 1, j
    assert (grid[band:, :left] < 128).any()  # the second band's row names
    assert (grid[band + 20:, left + 3 * cell:] == 255).all()  # nothing past the 11th image
    # sample --images-per-prompt 3: a prompt's three images stay in one band (6 columns a band, not 8)
    shaded = np.asarray(Image.open(save_sample_grid(tmp_path / "h.png", [f"p{j}" for j in range(n)], before, after,
                                                    cell=cell, group=3)).convert("L")).astype(int)
    assert shaded.shape == (2 * band, left + 6 * cell)
    for j in range(n):
        x, top = left + (j % 6) * cell + cell // 2, (j // 6) * band
        assert abs(shaded[top + 20 + cell // 2, x] - round(255 * shade[j].item())) <= 1, j


def test_a_character_no_font_has_leaves_labels_and_numbers_readable(tmp_path, caplog, monkeypatch):
    """Fonts are picked per glyph: a CJK character or a NUL in one prompt (with no CJK font installed) is one box
    in that prompt; every other label, the row names and the reward numbers are drawn exactly as without it, and
    the missing character is named once. matplotlib's 'Last Resort' font, which claims every code point and draws
    boxes, is never chosen (it was, and the whole grid became boxes)."""
    import numpy as np
    from matplotlib import font_manager
    from PIL import Image

    from lowmem_alignprop.training.grid import save_sample_grid

    fonts = [f for f in font_manager.fontManager.ttflist if f.name in ("DejaVu Sans", "Last Resort High-Efficiency")]
    assert any(f.name == "DejaVu Sans" for f in fonts)
    monkeypatch.setattr(font_manager.fontManager, "ttflist", fonts)  # the machine of the report: no CJK font
    monkeypatch.setattr("lowmem_alignprop.training.grid.MISSING_SAID", set())  # (none said yet in this process)
    imgs = (torch.zeros(2, 3, 8, 8), torch.tensor([0.1234, 0.5678]))
    with caplog.at_level("WARNING", logger="lowmem_alignprop"):
        odd = np.asarray(Image.open(save_sample_grid(tmp_path / "odd.png", ["a cat", "猫 and\x00 dog"], imgs, imgs)))
        save_sample_grid(tmp_path / "again.png", ["猫 and dog"], imgs, imgs)  # a run's next grid: said once
    plain = np.asarray(Image.open(save_sample_grid(tmp_path / "plain.png", ["a cat", "x and dog"], imgs, imgs)))
    assert np.array_equal(odd[20:], plain[20:])  # row names, images and the reward numbers: the same pixels
    assert np.array_equal(odd[:18, :64 + 192], plain[:18, :64 + 192])  # the other prompt's label too
    assert not np.array_equal(odd[:18, 64 + 192:], plain[:18, 64 + 192:])  # the odd prompt differs, but is drawn
    assert (odd[:18, 64 + 192 + 40:] < 128).any()  # its Latin part after the box is text ('and dog')
    warnings = [r for r in caplog.records if "no installed font has the characters" in r.getMessage()]
    assert len(warnings) == 1 and "猫" in warnings[0].getMessage() and "fonts-noto-cjk" in warnings[0].getMessage()


def test_a_label_of_a_million_characters_is_cut_at_once():
    """A prompt line of a million characters: the grid label is the longest prefix that fits with '...' (it cut one
    character at a time, a minute of PIL calls, then PIL refused the string: the run's outputs never got written)."""
    from PIL import Image, ImageDraw

    from lowmem_alignprop.training.grid import GlyphText

    text, draw = GlyphText(), ImageDraw.Draw(Image.new("RGB", (200, 20)))
    label = text.fit(draw, "a" * 1_000_000, 150)
    assert label.endswith("...") and text.width(draw, label) <= 150
    assert text.width(draw, "a" * (len(label) - 2) + "...") > 150  # one more character would not fit
    assert text.fit(draw, "a cat", 150) == "a cat"


def test_sample_says_how_many_of_a_prompt_files_prompts_it_renders(tmp_path, caplog, monkeypatch):
    """`sample --prompts FILE` renders the first --num-prompts (4) of them: the file's other lines were left out
    without a word."""
    import logging

    from lowmem_alignprop.commands import evaluate as ev
    from lowmem_alignprop.settings.config import Config

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a cat number {i}\n" for i in range(9)))
    chosen = []
    monkeypatch.setattr(ev, "_evaluate", lambda cfg, specs, given, out, **kw: chosen.extend(given) or {})
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    cfg = Config(prompts=str(prompts), output_dir=str(tmp_path / "out")).validate()
    ev.evaluate(cfg, [], num_prompts=4, images_per_prompt=1)
    assert chosen == [f"a cat number {i}" for i in range(4)]
    assert f"sample: the first 4 of the 9 prompts of {prompts} (--num-prompts 9 for all of them)" in caplog.text
    caplog.clear()
    ev.evaluate(cfg, [], num_prompts=9, images_per_prompt=1)
    assert "sample: the first" not in caplog.text


def test_each_image_is_labelled_with_its_own_reward(tmp_path):
    """The number under image j of each row is reward j of that row: the label under column 1 of a grid with rewards
    (0.1234, 0.9876) is, pixel for pixel, the label under column 0 of a grid whose first reward is 0.9876 (a label
    taken from another column or row showed a wrong number under a right image, in silence)."""
    import numpy as np
    from PIL import Image

    from lowmem_alignprop.training.grid import save_sample_grid

    cell, label_h, left = 192, 28, 64  # (the default cell: the whole label fits)
    imgs = torch.full((2, 3, 8, 8), 0.5)

    def labels(before: list[float], after: list[float]) -> list[list[np.ndarray]]:
        """[row][column]: the label strip under each image."""
        grid = np.asarray(Image.open(save_sample_grid(
            tmp_path / "g.png", ["p", "p"], (imgs, torch.tensor(before)), (imgs, torch.tensor(after)))))
        return [[grid[20 + i * (cell + label_h) + cell:20 + (i + 1) * (cell + label_h),
                      left + j * cell:left + (j + 1) * cell] for j in range(2)] for i in range(2)]

    mixed = labels([0.1234, 0.9876], [0.5555, 0.3333])
    for i, (before, after) in enumerate((([0.9876, 0.1234], [0.3333, 0.5555]), ([0.1234, 0.0], [0.5555, 0.0]))):
        other = labels(before, after)
        for row in range(2):
            assert np.array_equal(mixed[row][1 - i], other[row][0]), (i, row)
    assert not np.array_equal(mixed[0][0], mixed[0][1]) and not np.array_equal(mixed[0][0], mixed[1][0])


def test_the_toy_worlds_exact_figures_judge_each_row_on_its_own_images():
    """sample's toy-world fidelity: "base" is the exact evaluators on the base images, "lora" on the LoRA's (judging
    the base images twice showed a LoRA that changed nothing)."""
    from lowmem_alignprop.commands.evaluate import toy_fidelity
    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.toy.fidelity import evaluate_batch

    prompts = ["a red circle", "a blue square"]
    base = torch.zeros(2, 3, 64, 64)
    lora = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    judged = toy_fidelity(Config(model="toy"), prompts, base, lora)["fidelity"]
    assert judged["base"] == evaluate_batch(base, prompts) and judged["lora"] == evaluate_batch(lora, prompts)
    assert judged["base"]["jpeg_bytes"] != judged["lora"]["jpeg_bytes"]  # the two can be told apart


def test_the_toy_worlds_figures_of_a_model_alone_are_its_images_and_its_line_compares_nothing(tmp_path, capsys):
    """Without a LoRA the exact evaluators judge the model's images ("lora": null) and the summary prints their
    figures once, with no "->" to a LoRA."""
    from lowmem_alignprop.commands.evaluate import print_summary, toy_fidelity
    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.toy.fidelity import evaluate_batch

    prompts = ["a red circle", "a blue square", "a cat"]  # (the last outside the grammar: 2 of 3 judged)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fidelity = toy_fidelity(Config(model="toy"), prompts, images, None)["fidelity"]
    assert fidelity == {"base": evaluate_batch(images, prompts), "lora": None}
    base = fidelity["base"]
    r = {"reward": "toy_clip", "num_prompts": 3, "images_per_prompt": 1, "seed": 0, "model": "toy", "loras": [],
         "sampler": {"scheduler": "DDIM", "sample_steps": 3}, "per_prompt": [{}] * 3, "base_mean": 1.23456,
         "fidelity": fidelity}
    print_summary(r, tmp_path)
    assert capsys.readouterr().out.splitlines() == [
        "reward toy_clip over 3 prompts x 1 image (DDIM 3 steps, seed 0):", "  model 1.2346   (toy, no LoRA)",
        "  exact fidelity (toy world) (2 of 3 images judged: the others' prompts are outside the grammar): all right "
        f"{base['fidelity_all_ok']:.0%}, score {base['fidelity_score']:.3f}",
        f"wrote {tmp_path / SAMPLE_GRID} and {tmp_path / SAMPLE_RESULTS}"]
    lora = {**base, "fidelity_all_ok": 1.0, "fidelity_score": 0.875}  # with a LoRA: base -> lora
    print_summary({**r, "loras": [{"weight": 1.0, "path": "run/lora"}], "lora_mean": 2.0, "difference": 0.76544,
                   "fidelity": {"base": base, "lora": lora}}, tmp_path)
    assert capsys.readouterr().out.splitlines()[1:4] == [
        "  base 1.2346   lora 2.0000   difference +0.7654", "  lora = 1 x run/lora",
        "  exact fidelity (toy world) (2 of 3 images judged: the others' prompts are outside the grammar): all right "
        f"{base['fidelity_all_ok']:.0%} -> 100%, score {base['fidelity_score']:.3f} -> 0.875"]


def test_a_loras_recorded_image_settings_apply_unless_the_command_line_sets_them(tmp_path, loras, tiny_dir,
                                                                                 monkeypatch, caplog):
    """sample renders as the LoRA's run did (base_model.json's image_settings) without --model and with --model naming
    that same model; a --set of the command line wins over the record (the record won over it in silence). --model
    naming another model: the profile's settings, said (its exported file alone takes its header's, so the same
    LoRA rendered differently by how it was passed, without a word)."""
    import shutil

    from lowmem_alignprop.commands import sample_cmd as ev

    lora = shutil.copytree(loras["a"], tmp_path / "a")
    (lora / "base_model.json").write_text(json.dumps({"model": str(tiny_dir),
                                                      "image_settings": {"negative_prompt": "blurry"}}))
    used = []
    monkeypatch.setattr(ev, "evaluate", lambda cfg, specs, **kw: used.append(cfg) or {"output_dir": str(tmp_path)})
    monkeypatch.setattr(ev, "print_summary", lambda results, out: None)
    for extra, negative in (([], "blurry"), (["--model", str(tiny_dir)], "blurry"),
                            (["--set", "negative_prompt=sharp"], "sharp"),
                            (["--model", str(tiny_dir), "--set", "negative_prompt=sharp"], "sharp")):
        assert main(["sample", *COMMON, str(lora), *extra, "--output-dir", str(tmp_path / "out")]) == 0
        assert (used[-1].model, used[-1].negative_prompt) == (str(tiny_dir), negative), extra
    other = shutil.copytree(tiny_dir, tmp_path / "other")
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    assert main(["sample", *COMMON, str(lora), "--model", str(other), "--output-dir", str(tmp_path / "out")]) == 0
    assert used[-1].negative_prompt == "" and (
        f"--model {other} is not the model {lora} was trained on ({tiny_dir}): sampled with the profile's image "
        f"settings, not its run's (--model {tiny_dir} renders as its run did; --set KEY=VALUE chooses)") in caplog.text


def test_a_vae_an_older_loras_run_recorded_relative_is_one_line_from_another_folder(tmp_path, loras, tiny_dir,
                                                                                      monkeypatch, capsys):
    """A run before 2026-12-05 recorded its VAE (or model_components) as typed, relative to the folder it started in:
    sample of its LoRA from another folder said 'vae=vaedir does not exist: pass a diffusers VAE folder ...', for a
    VAE the command did not name; so it did of a VAE recorded absolute and moved since. It names the LoRA's record
    and the fix; the VAE given from here renders."""
    import shutil

    from lowmem_alignprop.commands import sample_cmd as ev

    lora = shutil.copytree(loras["a"], tmp_path / "a")
    used = []
    monkeypatch.setattr(ev, "evaluate", lambda cfg, specs, **kw: used.append(cfg) or {"output_dir": str(tmp_path)})
    monkeypatch.setattr(ev, "print_summary", lambda results, out: None)
    monkeypatch.chdir(tmp_path)
    gone = tmp_path / "moved-away" / "vae"  # recorded absolute, moved or deleted since
    for key, value, why in (
            ("vae", "vaedir", "a path relative to the folder its run started in (a run before 2026-12-05), not found "
                              "from here: sample in that folder, or give it from here with --set vae=PATH"),
            ("model_components", "parts", "a path relative to the folder its run started in (a run before "
                                          "2026-12-05), not found from here: sample in that folder, or give it from "
                                          "here with --set model_components=PATH"),
            ("vae", str(gone), "which is not there any more (moved or deleted): give it with --set vae=PATH")):
        (lora / "base_model.json").write_text(json.dumps({"model": str(tiny_dir), "image_settings": {key: value}}))
        assert main(["sample", *COMMON, str(lora), "--output-dir", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: --lora {lora} was trained with {key}={value} (its run's record), {why}")
    (lora / "base_model.json").write_text(json.dumps({"model": str(tiny_dir), "image_settings": {"vae": "vaedir"}}))
    vae = os.path.join(tiny_dir, "vae")
    assert main(["sample", *COMMON, str(lora), "--set", f"vae={vae}", "--output-dir", str(tmp_path / "out")]) == 0
    assert used[-1].vae == vae


def test_a_run_without_its_lora_yet_names_the_checkpoint_to_sample_or_export(tmp_path, capsys, caplog):
    """`sample RUN` (or RUN/lora) of a run still training, or whose lora/ is lost: the line names its newest checkpoint
    (and, lost, export that writes lora/ again); it said "holds no LoRA weights; pass the lora/ folder", which does
    not exist yet. `export RUN` of a run still training names its checkpoints (it said "choose another --output-dir",
    an option export has not)."""
    import shutil

    from lowmem_alignprop.run.runlock import RunLock

    run = tmp_path / "run"
    assert main([*COMMON, "--steps", "2", "--set", "k=1", "--set", "sample_prompts=0", "--set", "checkpoint_every=1",
                 "--output-dir", str(run)]) == 0
    shutil.rmtree(run / "lora")
    newest = run / "checkpoints" / "step-00000002"

    def said(*argv):
        assert main(list(argv)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err
    for arg in (run, run / "lora"):
        err = said("sample", *COMMON, str(arg), "--num-prompts", "1", "--output-dir", str(tmp_path / "s"))
        assert f"{run} has no lora/" in err and f"--lora {newest}" in err and f"lowmem-alignprop export {run}" in err
    with RunLock(run):  # as a live run holds its folder
        err = said("sample", *COMMON, str(run), "--num-prompts", "1", "--output-dir", str(tmp_path / "s"))
        assert f"{run} is still training (pid {os.getpid()}" in err and f"--lora {newest} (its newest)" in err
        err = said("export", str(run))
        assert f"{run} is still training" in err and f"lowmem-alignprop export {newest}" in err
        assert "--output-dir" not in err
    assert not (tmp_path / "s").exists() and not (run / "lora").exists()
    # a checkpoint renders with the settings its steps were made with, not the run's later ones (a resume that
    # changed the resolution: config.yaml holds the new one)
    config = run / "config.yaml"
    trained = yaml.safe_load(config.read_text())["resolution"]
    config.write_text(config.read_text().replace(f"resolution: {trained}", f"resolution: {trained + 32}"))
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main(["sample", *COMMON, str(newest), "--num-prompts", "1", "--output-dir", str(tmp_path / "c")]) == 0
    assert f"as its run did: resolution={trained} " in caplog.text


def test_sample_takes_the_seeds_a_run_records_past_a_training_seeds_range(tmp_path, loras):
    """A run seeded near 2**32 - 1 records its images' seeds as seed + 12345 + n (before_after.json): `sample --seed`
    takes them (torch's generators take 64 bits; it refused anything over 2**32 - 1), training still refuses them
    (its seed also seeds numpy's generator, 32 bits)."""
    from lowmem_alignprop.settings.config import MAX_SAMPLE_SEED, MAX_SEED, Config

    seed = MAX_SEED + 12345
    out = tmp_path / "s"
    assert main(["sample", *COMMON, "--lora", str(loras["a"]), "--num-prompts", "2", "--seed", str(seed),
                 "--output-dir", str(out)]) == 0
    assert [p["seeds"] for p in json.loads((out / SAMPLE_RESULTS).read_text())["per_prompt"]] == [[seed], [seed + 1]]
    with pytest.raises(UserError, match=f"seed={seed} is out of range: give a whole number from 0 to {MAX_SEED}"):
        Config(seed=seed).validate()
    for training, most in ((True, MAX_SEED), (False, MAX_SAMPLE_SEED)):  # below the range: it crashed (the bound
        with pytest.raises(UserError, match=f"seed=-1 is out of range: give a whole number from 0 to {most}, "):
            Config(seed=-1).validate(training=training)  # was computed only after the lower one passed)


def test_loras_of_two_base_models_of_one_family_are_refused_before_loading(loras, tmp_path, capsys, monkeypatch):
    """Two UNet LoRAs whose layers have other widths (trained on other base models: the toy model and the tiny one)
    cannot be mixed: one line from their files' headers, before any model loads (it loaded the first LoRA's model,
    then said to pass the model it was trained on with --model, which cannot fit both)."""
    import lowmem_alignprop.models.loading as loading

    monkeypatch.setattr(loading, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["sample", *COMMON, "--lora", str(loras["a"]), "--lora", str(loras["other"]), "--num-prompts", "1",
                 "--output-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "adapt layers of other widths (" in err and ": 32 in one, 48 in the other)" in err
    assert "they were trained on different base models and cannot be mixed" in err and not (tmp_path / "s").exists()


def test_sample_into_a_lora_or_run_folder_is_refused(tmp_path, loras, capsys):
    """`sample --output-dir` naming a LoRA folder (or a run's) wrote its grid and results into what export and
    --push-to-hub copy: one line, nothing written there."""
    import shutil

    lora = tmp_path / "lora"
    shutil.copytree(loras["a"], lora)
    before = sorted(p.name for p in lora.iterdir())
    assert main(["sample", *COMMON, "--lora", str(loras["a"]), "--num-prompts", "1", "--output-dir", str(lora)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--output-dir {lora} is a LoRA folder" in err and "lora-sample" in err
    assert sorted(p.name for p in lora.iterdir()) == before
    run = tmp_path / "run"  # stopped before its first checkpoint: its metrics only (a new start there is refused too)
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n', encoding="utf-8")
    assert main(["sample", *COMMON, "--lora", str(loras["a"]), "--num-prompts", "1", "--output-dir", str(run)]) == 2
    assert "is a training run's folder" in capsys.readouterr().err and sorted(run.iterdir()) == [run / "metrics.jsonl"]


def test_a_loras_text_encoder_layers_of_another_width_are_named_with_their_widths(tmp_path, capsys):
    """A kohya LoRA whose text-encoder layers are another CLIP's (32 wide, the tiny model's) sampled on the toy model
    (64 wide): the line names the layer and both widths. transformers 5 logs the shapes in a report (quieted here)
    and raises "You set `ignore_mismatched_sizes` to `False` ... look at the above report!", which the line said."""
    from safetensors.torch import save_file

    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{te}.lora_down.weight": torch.randn(2, 32), f"{te}.lora_up.weight": torch.randn(32, 2),
               f"{te}.alpha": torch.tensor(2.0)}, str(tmp_path / "te.safetensors"))
    out = tmp_path / "out"
    assert main(["sample", *COMMON, "--model", "toy", "--lora", str(tmp_path / "te.safetensors"), "--num-prompts", "1",
                 "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not out.exists(), err
    assert ("does not fit this model: its text_encoder layers take other widths than this model's text_encoder (e.g. "
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj: 32 inputs in the LoRA, 64 or 128 here); it was "
            "trained for another base model") in err[0], err[0]


@pytest.mark.parametrize("error", [AssertionError(), IndexError("list index out of range")])
def test_a_lora_a_format_converter_chokes_on_is_one_line(error, tmp_path):
    """diffusers' LoRA converters assert on widths other than the real model's (a ComfyUI-saved FLUX LoRA on another
    FLUX-shaped model) or index past a layer list: sample and --init-lora (one helper) said it in a 25-line
    traceback; now the one line every LoRA that does not fit gets."""
    from types import SimpleNamespace

    from lowmem_alignprop.lora.adapters import load_adapter_file

    def load_lora_weights(*args, **kwargs):
        raise error

    with pytest.raises(UserError) as caught:
        load_adapter_file(SimpleNamespace(load_lora_weights=load_lora_weights), tmp_path / "x.safetensors", "a",
                          "--lora x.safetensors", "it was trained for another base model")
    line = str(caught.value)
    assert "\n" not in line and line.startswith("--lora x.safetensors does not fit this model: ")
    assert line.endswith("; it was trained for another base model")
    said = "diffusers' LoRA loader could not read its layers (AssertionError)" in line
    assert said == (type(error) is AssertionError)


def test_a_run_killed_before_its_first_checkpoint_is_said_by_sample_and_export(tmp_path, capsys):
    """A run stopped (kill -9, an error) before its first checkpoint keeps its metrics and nothing to load: export
    advised `--resume latest` (which refuses that folder) and sample took it for a plain folder without weights."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n', encoding="utf-8")
    (run / "config.yaml").write_text("model: tiny\n", encoding="utf-8")
    for argv in (["export", str(run)], ["sample", *COMMON, str(run), "--num-prompts", "1"]):
        assert main(argv) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
        assert err == [f"error: --lora {run}: {run} is a training run that stopped (an error, or killed) before its "
                       "first checkpoint, after 2 steps: it kept no LoRA to sample or export, and nothing to resume "
                       "(--checkpoint-every N saves checkpoints as a run goes)"], err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "metrics.jsonl"]


def test_sample_of_a_runs_checkpoints_folder_names_its_newest(tmp_path, capsys):
    """`sample --lora RUN/checkpoints` said the folder holds no LoRA; it names a checkpoint to sample, as --init-lora
    does of the same folder."""
    kept = tmp_path / "older" / "checkpoints"
    for step in (100, 300):
        (kept / f"step-{step:08d}").mkdir(parents=True)
    assert main(["sample", *COMMON, "--lora", str(kept), "--prompt", "dog"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert err == [f"error: --lora {kept} is a run's checkpoints folder: name one of its checkpoints, e.g. --lora "
                   f"{kept / 'step-00000300'} (the newest), or the run's lora/"], err


def test_a_run_stopped_while_publishing_its_first_checkpoint_names_the_resume(tmp_path, capsys):
    """Killed after its first checkpoint was written whole but before it was renamed: sample and export said the run
    kept nothing to resume, and --resume latest then renamed it and went on (a user told so might delete the run)."""
    run = tmp_path / "run"
    assert main([*COMMON, "--output-dir", str(run), "--steps", "1", "--set", "sample_prompts=0"]) == 0
    shutil.rmtree(run / "lora")
    (run / "summary.json").unlink()
    (run / "checkpoints" / "step-00000001").rename(run / "checkpoints" / ".tmp-step-00000001")
    capsys.readouterr()
    for argv in (["export", str(run)], ["sample", *COMMON, str(run), "--num-prompts", "1"]):
        assert main(argv) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
        assert err == [f"error: --lora {run}: {run} is a training run whose checkpoint step-00000001 was written "
                       "whole but not renamed (it stopped while publishing it): `lowmem-alignprop --resume latest "
                       f"--output-dir {run}` renames it and goes on"], err


def test_sample_of_a_run_trained_with_another_vae_decodes_with_it(tmp_path, tiny_dir):
    """`--set vae=PATH` trained and rendered the grid with that VAE; `sample` of the LoRA used the model's own, so
    the README's "renders that image again" gave other images (0.5046 for 0.4758). The VAE is one of the settings
    its run made images with (base_model.json's image_settings): sample takes it."""
    from diffusers import AutoencoderKL

    other = AutoencoderKL.from_pretrained(tiny_dir / "vae")
    torch.manual_seed(5)
    for p in other.decoder.parameters():
        p.data += 0.05 * torch.randn_like(p)
    other.save_pretrained(tmp_path / "other_vae")
    _sampled_again_as_its_run(tmp_path, tiny_dir, f"vae={tmp_path / 'other_vae'}")


def _sampled_again_as_its_run(tmp_path, tiny_dir, *settings: str):
    """One step on the tiny model with ``settings`` (--set KEY=VALUE), then `sample` of its LoRA without them at the
    grid's first image's seed and prompt: the grid's own before/after rewards. Returns the run folder."""
    run = tmp_path / "run"
    sets = [arg for s in settings for arg in ("--set", s)]
    assert main(["--profile", "cpu", "--model", str(tiny_dir), "--steps", "1", "--set", "sample_steps=3",
                 "--set", "sample_prompts=1", *sets, "--reward", "brightness", "--output-dir", str(run)]) == 0
    grid = json.loads((run / "samples" / "before_after.json").read_text())["images"][0]
    again = tmp_path / "again"
    assert main(["sample", str(run / "lora"), "--seed", str(grid["seed"]), "--prompt", grid["prompt"],
                 "--output-dir", str(again)]) == 0
    got = json.loads((again / SAMPLE_RESULTS).read_text())["per_prompt"][0]
    assert (got["base"][0], got["lora"][0]) == pytest.approx((grid["reward_before"], grid["reward_after"]), abs=1e-6)
    return run


def test_prediction_type_samples_as_diffusers_does_and_the_runs_lora_keeps_it(tmp_path, tiny_dir, loras):
    """`--set prediction_type`: what the UNet predicts where its files say otherwise (an SD 2.x 512-px base single
    file loads as v-prediction; a v-prediction fine-tune's folder may say epsilon). The images are diffusers' own
    pipeline with that DDIM scheduler; a run's LoRA samples with it again without being told, and its kohya label
    and model card say it."""
    from diffusers import DDIMScheduler

    from loras import export as export_lora

    from lowmem_alignprop.lora import lora_files
    from lowmem_alignprop.lora.lora_formats import kohya_metadata

    out = tmp_path / "v"
    assert main(["sample", *COMMON, "--lora", str(loras["a"]), "--model", str(tiny_dir), "--prompt", "dog",
                 "--seed", "5", "--set", "prediction_type=v_prediction", "--output-dir", str(out)]) == 0
    got = json.loads((out / SAMPLE_RESULTS).read_text())["per_prompt"][0]["base"][0]
    pipe = _tiny_pipe(tiny_dir)
    eps = _brightness(_direct(pipe, "dog", 5)).item()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    assert got == pytest.approx(_brightness(_direct(pipe, "dog", 5)).item(), abs=1e-5)
    assert abs(got - eps) > 1e-3  # 100x the tolerance above: the tiny model's files say epsilon, the setting took
    # zero terminal SNR (a v-prediction model trained so): diffusers' rescaled schedule, sampled from its last step
    out = tmp_path / "zsnr"
    assert main(["sample", *COMMON, "--lora", str(loras["a"]), "--model", str(tiny_dir), "--prompt", "dog",
                 "--seed", "5", "--set", "prediction_type=v_prediction", "--set", "zero_terminal_snr=true",
                 "--set", "eta=0.5", "--output-dir", str(out)]) == 0
    written = json.loads((out / SAMPLE_RESULTS).read_text())
    zsnr = written["per_prompt"][0]["base"][0]
    assert (written["sampler"]["prediction_type"], written["sampler"]["zero_terminal_snr"]) == ("v_prediction", True)
    def at_eta_half():
        return _brightness(pipe("dog", num_inference_steps=int(STEPS), guidance_scale=7.5, eta=0.5, height=64,
                                width=64, generator=torch.Generator().manual_seed(5), output_type="pt").images).item()

    plain = at_eta_half()  # (v-prediction on the model's own schedule)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=True,
                                               timestep_spacing="trailing")
    # (the tiny model's images are near grey: 6e-5 apart, above the 1e-5 that tells the two samplers apart)
    assert zsnr == pytest.approx(at_eta_half(), abs=1e-5) and abs(zsnr - plain) > 3e-5

    run = _sampled_again_as_its_run(tmp_path, tiny_dir, "prediction_type=v_prediction")
    lora = lora_files.read_lora(str(run / "lora"))
    assert lora.base["prediction_type"] == "v_prediction" and lora_files.v_prediction(lora)
    lora.base = {**lora.base, "model": "sd21"}  # (an SD 2.x base: the label A1111 and SD.Next read)
    assert kohya_metadata(lora)["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert kohya_metadata(lora)["alignprop_prediction_type"] == "v_prediction"  # (SD 1.x/SDXL labels have no v)
    assert kohya_metadata(lora)["ss_v_parameterization"] == "True"  # (sd-scripts' own key for it)
    assert kohya_metadata(lora)["modelspec.prediction_type"] == "v"  # (the model spec's)
    assert kohya_metadata(lora)["ss_zero_terminal_snr"] == "False"
    # a run at zero terminal SNR: by the flag (config.yaml), or by the schedule it sampled (base_model.json: a
    # folder's own schedule, which config.yaml leaves out)
    for record in ({"run_config": {**lora.run_config, "zero_terminal_snr": True}},
                   {"base": {**lora.base, "zero_terminal_snr": True}}):
        header = kohya_metadata(dataclasses.replace(lora, **record))
        assert (header["ss_zero_terminal_snr"], header["alignprop_zero_terminal_snr"]) == ("True", "True")
    lora.base = {**lora.base, "prediction_type": "epsilon"}  # the shipped sd21 folder says v; the run said epsilon
    assert kohya_metadata(lora)["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    card = (export_lora(tmp_path / "k", run / "lora", "--format", "kohya") / "README.md").read_text()
    assert "| prediction type | v_prediction (as the run sampled it, which the base model's files do not say" in card


def _shared_alone(folder, lora, header: dict):
    """``lora``'s weights as one .safetensors file with ``header`` (a kohya export copied away, or a file downloaded
    from Civitai): no base_model.json beside it."""
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True)
    file = folder / "shared_lora.safetensors"
    save_file(load_file(str(lora / "pytorch_lora_weights.safetensors")), str(file), metadata=header)
    return file


def _sampler_of(tmp_path, name, file, tiny_dir, *extra):
    out = tmp_path / name
    assert main(["sample", *COMMON, str(file), "--model", str(tiny_dir), "--prompt", "dog", "--seed", "5",
                 *extra, "--output-dir", str(out)]) == 0
    return json.loads((out / SAMPLE_RESULTS).read_text())["sampler"]


def test_a_lora_file_alone_samples_as_its_header_says_its_run_did(tmp_path, tiny_dir, loras, caplog):
    """A kohya export copied away from its base_model.json (what ComfyUI users share): `sample FILE --model M` reads
    from its header how its run sampled (a v-prediction run at zero terminal SNR on a base whose files say epsilon)
    and says so in one line; a --set of the same setting wins; a header value in no known words is ignored."""
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    header = {"alignprop_prediction_type": "v_prediction", "alignprop_zero_terminal_snr": "True",
              "ss_v_parameterization": "True", "ss_zero_terminal_snr": "True", "modelspec.prediction_type": "v"}
    file = _shared_alone(tmp_path / "shared", loras["a"], header)
    sampler = _sampler_of(tmp_path, "header", file, tiny_dir)
    assert (sampler["prediction_type"], sampler["zero_terminal_snr"]) == ("v_prediction", True)
    said = [r.getMessage() for r in caplog.records if "its header" in r.getMessage()]
    assert said == [f"--lora {file} has no base_model.json beside it: its header (alignprop_prediction_type, "
                    "alignprop_zero_terminal_snr) says its run sampled with prediction_type=v_prediction "
                    "zero_terminal_snr=True, so this does, at eta=0 (the header does not say the run's; zero SNR "
                    "needs one below 1) (--set KEY=VALUE chooses)"]
    assert sampler["eta"] == 0
    caplog.clear()  # the command line's own setting wins; the header's other one is still taken
    sampler = _sampler_of(tmp_path, "flag", file, tiny_dir, "--set", "zero_terminal_snr=false")
    assert (sampler["prediction_type"], sampler["zero_terminal_snr"]) == ("v_prediction", False)
    assert "its header (alignprop_prediction_type) says its run sampled with prediction_type=v_prediction," \
        in caplog.text
    caplog.clear()  # sd-scripts' words alone (a kohya v-prediction LoRA of another trainer)
    file = _shared_alone(tmp_path / "kohya", loras["a"], {"ss_v_parameterization": "True", "ss_v2": "True"})
    assert _sampler_of(tmp_path, "kohya", file, tiny_dir)["prediction_type"] == "v_prediction"
    assert "its header (ss_v_parameterization) says" in caplog.text
    caplog.clear()
    file = _shared_alone(tmp_path / "garbage", loras["a"], {"ss_v_parameterization": "yes", "ss_zero_terminal_snr":
                                                            "1", "alignprop_prediction_type": "v"})
    sampler = _sampler_of(tmp_path, "garbage", file, tiny_dir)
    assert (sampler["prediction_type"], sampler["zero_terminal_snr"]) == ("epsilon", False)
    assert "its header" not in caplog.text


def test_a_lora_file_alone_sampled_unguided_leaves_its_runs_unconditional_settings_out(tmp_path, tiny_dir, loras,
                                                                                        caplog):
    """A header whose run used guidance_rescale and a negative prompt, sampled with --set guidance_scale=1: both are
    left out and said, as for a run's base_model.json (the config refused them, naming flags the user never gave)."""
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    header = {"alignprop_image_settings": json.dumps({"guidance_rescale": 0.7, "negative_prompt": "dark"})}
    file = _shared_alone(tmp_path / "rescaled", loras["a"], header)
    sampler = _sampler_of(tmp_path, "unguided", file, tiny_dir, "--set", "guidance_scale=1")
    assert (sampler["guidance_scale"], sampler["guidance_rescale"], sampler["negative_prompt"]) == (1, 0, "")
    assert "the run's guidance_rescale and negative_prompt, which act on its unconditional branch, left out" \
        in caplog.text
    assert _sampler_of(tmp_path, "guided", file, tiny_dir)["guidance_rescale"] == 0.7  # (guided: taken)


def test_a_lora_file_alones_zero_snr_keeps_the_users_eta(tmp_path, tiny_dir, loras, caplog):
    """A header's zero-SNR schedule with --set eta given: the user's eta is sampled with (eta=0 is added only where
    none is given) and the line does not say eta=0."""
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    file = _shared_alone(tmp_path / "shared", loras["a"], {"alignprop_prediction_type": "v_prediction",
                                                           "alignprop_zero_terminal_snr": "True"})
    sampler = _sampler_of(tmp_path, "eta", file, tiny_dir, "--set", "eta=0.5")
    assert (sampler["zero_terminal_snr"], sampler["eta"]) == (True, 0.5)
    said = [r.getMessage() for r in caplog.records if "its header" in r.getMessage()]
    assert said == [f"--lora {file} has no base_model.json beside it: its header (alignprop_prediction_type, "
                    "alignprop_zero_terminal_snr) says its run sampled with prediction_type=v_prediction "
                    "zero_terminal_snr=True, so this does (--set KEY=VALUE chooses)"], said


def test_which_header_words_a_lora_file_alone_is_sampled_with(tmp_path, loras, caplog):
    """v-prediction from any key; epsilon only from our run's own key or an SD 2.x file's (whose single files load
    as v): sd-scripts writes ss_v_parameterization False into every other file, and a v-prediction model's own
    schedule stays. No zero SNR with epsilon (the config refuses the pair). A mix of two files whose headers
    differ renders as the first one's, and says the other's."""
    import argparse

    from lowmem_alignprop.lora.lora_files import header_image_settings
    from lowmem_alignprop.commands.sample_cmd import take_run_settings

    def read(**header):  # the settings taken, each as {setting: (value, the header key it came from)}
        file = _shared_alone(tmp_path / str(len(list(tmp_path.iterdir()))), loras["a"], header)
        settings, keys = header_image_settings(file)
        return {k: (v, keys[k]) for k, v in settings.items()}

    eps = v = "prediction_type"
    assert read(ss_v_parameterization="False", ss_v2="False") == {}
    assert read(ss_v_parameterization="False", ss_zero_terminal_snr="True") == {}
    assert read(ss_v_parameterization="False", ss_v2="True") == {eps: ("epsilon", "ss_v_parameterization")}
    assert read(**{"modelspec.prediction_type": "epsilon", "modelspec.architecture": "stable-diffusion-v2-512/lora"}
                ) == {eps: ("epsilon", "modelspec.prediction_type")}
    assert read(alignprop_prediction_type="epsilon", ss_v_parameterization="False") == {
        eps: ("epsilon", "alignprop_prediction_type")}
    assert read(ss_zero_terminal_snr="True") == {"zero_terminal_snr": (True, "ss_zero_terminal_snr")}
    assert read(ss_zero_terminal_snr="False", ss_v_parameterization="True") == {
        v: ("v_prediction", "ss_v_parameterization")}
    first = _shared_alone(tmp_path / "first", loras["a"], {"ss_v_parameterization": "True"})
    second = _shared_alone(tmp_path / "second", loras["neg_a"], {"alignprop_prediction_type": "epsilon"})
    args = argparse.Namespace(lora=[str(first), str(second)], set=[], model="m", reward=None, prompts=None,
                              recipe=None, output_dir="out")
    take_run_settings(args, [])
    assert args.set == ["prediction_type=v_prediction"]
    assert f"--lora {second}'s run sampled with prediction_type=epsilon: the images use the first LoRA's settings " \
        "(prediction_type=v_prediction)" in caplog.text
    # the run's other image settings (alignprop_image_settings, JSON): the shared ones of plain values; damaged: none
    shared = {"resolution": 64, "negative_prompt": "dark", "eta": 0.0, "vae": "madebyollin/sdxl-vae-fp16-fix",
              "t5_encoder": False}
    assert read(alignprop_image_settings=json.dumps({**shared, "guidance_scale": [3], "model_components": "/x",
                                                     "resolution_x": 5})) == {
        k: (v, "alignprop_image_settings") for k, v in shared.items()}
    assert read(alignprop_image_settings="{resolution: 64") == {} and read(alignprop_image_settings="[64]") == {}
    from lowmem_alignprop.lora.lora_files import shared_image_settings
    assert shared_image_settings({**shared, "vae": str(tmp_path), "model_components": "/m", "prediction_type": "v"}) \
        == {k: v for k, v in shared.items() if k != "vae"}  # (a local path is the trainer's; its own keys say those)


def test_a_lora_file_alone_is_sampled_on_the_model_its_header_names(tmp_path, tiny_dir, loras, caplog, capsys,
                                                                    monkeypatch):
    """`sample FILE` of a kohya export copied away alone, without --model: a shipped model its header names
    (alignprop_base_model) is sampled, said in one line; a local folder's name is not taken, and the line on the
    default model it does not fit names it; on a default model it fits (sampled: the images are not its model's),
    a warning names it.""" 
    from lowmem_alignprop.settings.config import MODEL_ENV

    monkeypatch.setenv(MODEL_ENV, "toy")  # (the default model a user has: the tests' is tiny)
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    file = _shared_alone(tmp_path / "shipped", loras["a"], {"alignprop_base_model": "tiny"})
    out = tmp_path / "out"
    assert main(["sample", *COMMON, str(file), "--prompt", "dog", "--output-dir", str(out)]) == 0
    assert json.loads((out / SAMPLE_RESULTS).read_text())["model"] == "tiny"
    assert f"--model not given: sampling tiny, the model the header (alignprop_base_model) of --lora {file} says " \
        "it was trained on (--model to choose another)" in caplog.text
    file = _shared_alone(tmp_path / "local", loras["other"], {"alignprop_base_model": "my-model",
                                                          "ss_sd_model_name": "my-model"})
    capsys.readouterr()
    assert main(["sample", *COMMON, str(file), "--prompt", "dog", "--output-dir", str(tmp_path / "o")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(err) == 1 and (f"(now 'toy', the default: --lora {file} records no model it was trained on; its "
                              "header (alignprop_base_model) says it was trained on my-model (a folder on the "
                              "training machine): pass --model PATH)") in err[0], err
    assert "was sampled instead" not in caplog.text  # (the line says it: no warning beside it)
    monkeypatch.setenv(MODEL_ENV, "tiny")  # a default model the file fits: sampled, and the header's model said
    file = _shared_alone(tmp_path / "fits", loras["a"], {"alignprop_base_model": "my-model"})
    assert main(["sample", *COMMON, str(file), "--prompt", "dog", "--output-dir", str(tmp_path / "f")]) == 0
    assert f"--lora {file}: its header (alignprop_base_model) says it was trained on my-model (a folder on the " \
        "training machine): pass --model PATH (--model tiny, the default, was sampled instead)" in caplog.text


def test_which_model_a_lora_files_header_names_is_taken(tmp_path, loras):
    """A header's hub id is taken as --model (nothing loads here); a run's own folder (shared_name's run/lora) or a
    local folder's name is not, nor sd-scripts' ss_sd_model_name (a name on the machine that trained), which the
    line on the default model names; --model given: the header's is not taken."""
    import argparse

    from lowmem_alignprop.commands.sample_cmd import take_run_settings

    def taken(header, model=None):
        file = _shared_alone(tmp_path / str(len(list(tmp_path.iterdir()))), loras["a"], header)
        args = argparse.Namespace(lora=[str(file)], set=[], model=model, reward=None, prompts=None, recipe=None,
                                  output_dir="out")
        request = take_run_settings(args, [])
        return args.model, request.default_model.removeprefix(f"--lora {file} records no model it was trained on")

    assert taken({"alignprop_base_model": "org/name", "ss_sd_model_name": "org/name"}) == ("org/name", "")
    assert taken({"alignprop_base_model": "sdxl"}) == ("sdxl", "")
    assert taken({"alignprop_base_model": "org/name"}, model="tiny") == ("tiny", "")
    assert taken({"alignprop_base_model": "run/lora"}) == (None, "; its header (alignprop_base_model) says it was "
                                                           "trained on run/lora (a folder on the training machine): "
                                                           "pass --model PATH")
    assert taken({"ss_sd_model_name": "sd_xl_base_1.0.safetensors"}) == (
        None, "; its header (ss_sd_model_name) says it was trained on sd_xl_base_1.0.safetensors (a file on the "
              "training machine): pass --model PATH")
    assert taken({"ss_sd_model_name": "SD_XL.SAFETENSORS"})[1].endswith("(a file on the training machine): pass "
                                                                         "--model PATH")  # (a suffix in capitals)
    assert taken({"ss_sd_model_name": "org/name"})[1].endswith("org/name (a hub id or a folder on the training "
                                                               "machine): pass --model PATH")
    assert taken({}) == (None, "")
    assert taken({"alignprop_base_model": "run/best"}) == (None, "; its header (alignprop_base_model) says it was "
                                                           "trained on run/best (a folder on the training machine): "
                                                           "pass --model PATH")  # (a run's best/: no hub id)
    from lowmem_alignprop.lora.lora_files import header_base_model
    damaged = tmp_path / "damaged.safetensors"  # (a download cut short: loading it says what is wrong)
    damaged.write_bytes(b"\xff" * 16)
    assert header_base_model(damaged) == (None, "")
    # a local folder named like a shipped model: the header says it is a folder (./sdxl), not the shipped sdxl
    from lowmem_alignprop.lora.lora_files import shared_name
    (tmp_path / "models" / "sdxl").mkdir(parents=True)
    assert shared_name(str(tmp_path / "models" / "sdxl")) == "./sdxl" and shared_name("sdxl") == "sdxl"
    assert taken({"alignprop_base_model": "./sdxl"}) == (None, "; its header (alignprop_base_model) says it was "
                                                         "trained on ./sdxl (a folder on the training machine): "
                                                         "pass --model PATH")


def test_a_malformed_set_is_refused_before_a_lora_files_header_is_said(tmp_path, tiny_dir, loras, caplog, capsys):
    """`sample FILE --set eta` (no '='): config's line, before anything is taken from the LoRA's header."""
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    file = _shared_alone(tmp_path / "shared", loras["a"], {"ss_v_parameterization": "True"})
    assert main(["sample", *COMMON, str(file), "--model", str(tiny_dir), "--prompt", "dog", "--set", "eta",
                 "--output-dir", str(tmp_path / "out")]) == 2
    assert "error: malformed --set 'eta'" in capsys.readouterr().err and "its header" not in caplog.text, caplog.text


def test_a_mix_with_a_file_whose_header_says_nothing_warns_of_nothing(tmp_path, loras, caplog):
    """A mix whose second file's header says no setting (a LoRA from elsewhere): nothing is said to differ (a header
    compares only the settings it says)."""
    import argparse

    from lowmem_alignprop.commands.sample_cmd import take_run_settings

    first = _shared_alone(tmp_path / "first", loras["a"], {"ss_v_parameterization": "True"})
    second = _shared_alone(tmp_path / "second", loras["neg_a"], {})
    args = argparse.Namespace(lora=[str(first), str(second)], set=[], model="m", reward=None, prompts=None,
                              recipe=None, output_dir="out")
    take_run_settings(args, [])
    assert args.set == ["prediction_type=v_prediction"] and "run sampled with" not in caplog.text, caplog.text


def test_guidance_rescale_samples_as_diffusers_does_and_the_runs_lora_keeps_it(tmp_path, tiny_dir, loras):
    """`--set guidance_rescale=0.7` (Lin et al. 2023's fix for overexposure at high guidance): `sample`'s image is
    diffusers' own pipeline called with it, training's grid samples so too (its LoRA's `sample` without the flag
    gives the grid's rewards), and the card's code passes it."""
    from loras import export as export_lora

    out = tmp_path / "rescaled"
    assert main(["sample", *COMMON, "--lora", str(loras["a"]), "--model", str(tiny_dir), "--prompt", "dog",
                 "--seed", "5", "--set", "guidance_rescale=0.7", "--output-dir", str(out)]) == 0
    written = json.loads((out / SAMPLE_RESULTS).read_text())
    got = written["per_prompt"][0]["base"][0]
    assert written["sampler"]["guidance_rescale"] == 0.7
    pipe = _tiny_pipe(tiny_dir)
    rescaled = pipe("dog", num_inference_steps=int(STEPS), guidance_scale=7.5, eta=1.0, guidance_rescale=0.7,
                    height=64, width=64, generator=torch.Generator().manual_seed(5), output_type="pt").images
    # the same operations: a few float32 roundings of a mean near 0.5 apart (1e-6 is 17 eps of it); the tiny
    # model's grey images keep the rescale's own effect on their mean small: 3e-5, 30x that
    assert got == pytest.approx(_brightness(rescaled).item(), abs=1e-6)
    assert abs(got - _brightness(_direct(pipe, "dog", 5)).item()) > 1e-5, "the rescale did not take"

    run = _sampled_again_as_its_run(tmp_path, tiny_dir, "guidance_rescale=0.7")
    card = (export_lora(tmp_path / "k", run / "lora") / "README.md").read_text()
    call = next(line for line in card.splitlines() if line.startswith("image = pipe("))  # (not the command line's)
    assert "guidance_rescale=0.7" in call, call
    # guidance off where its run rescaled: no unconditional branch to rescale, so the run's rescale is left out (it
    # was refused, told to drop a --set guidance_rescale the user never gave)
    unguided = tmp_path / "unguided"
    assert main(["sample", str(run / "lora"), "--prompt", "dog", "--set", "guidance_scale=1",
                 "--output-dir", str(unguided)]) == 0
    assert json.loads((unguided / SAMPLE_RESULTS).read_text())["sampler"]["guidance_rescale"] == 0.0


def test_a_lora_in_diffusers_old_attention_processor_layout_samples_as_itself(tmp_path, loras, tiny_dir):
    """unet.save_attn_procs's layout (diffusers before 0.21: attn1.processor.to_q_lora.down.weight) loaded 0 layers
    and was said to be "made for another base model": it is converted, and renders as the LoRA it is."""
    import re

    from safetensors.torch import load_file, save_file

    weights = load_file(str(loras["a"] / "pytorch_lora_weights.safetensors"))
    old = {re.sub(r"\.(to_[qkv]|to_out)(\.0)?\.lora\.", r".processor.\1_lora.", k.removeprefix("unet.")): v
           for k, v in weights.items()}
    assert all(".processor." in k for k in old)
    save_file(old, str(tmp_path / "old.safetensors"))
    got = {}
    for name, lora in (("new", loras["a"]), ("old", tmp_path / "old.safetensors")):
        out = tmp_path / name
        assert main(["sample", *COMMON, "--model", str(tiny_dir), "--lora", str(lora), "--prompt", "dog", "--seed", "5",
                     "--output-dir", str(out)]) == 0
        got[name] = json.loads((out / SAMPLE_RESULTS).read_text())["per_prompt"][0]
    assert got["old"]["lora"] == got["new"]["lora"] and got["old"]["lora"] != got["old"]["base"]


def test_sample_takes_training_only_settings_with_a_line_and_set_output_dir_as_its_folder(tmp_path, loras, tiny_dir,
                                                                                         caplog):
    """sample trains and tracks nothing: --set report_to=wandb was refused for a package it never uses (now said to
    change nothing, with optimizer and prompt_order); --set output_dir was said to lose against an --output-dir that
    was never given (sample's default), and is where the files go."""
    out = tmp_path / "here"
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main(["sample", *COMMON, "--model", str(tiny_dir), "--lora", str(loras["a"]), "--prompt", "dog",
                     "--set", "report_to=wandb", "--set", "optimizer=adamw8bit", "--set", f"output_dir={out}"]) == 0
    assert (out / SAMPLE_RESULTS).is_file() and "both given" not in caplog.text
    assert "--set optimizer, report_to: training settings; sample trains nothing" in caplog.text


def test_sample_says_what_it_does_not_read_and_refuses_nothing_for_it(tmp_path, tiny_dir, caplog):
    """sample renders through diffusers' pipeline: training's speed settings (compile, merge_lora_nograd...) were taken
    in silence, and an SD UNet's block swap and fp8 storage too (flow_sample's alone); each is said, and the images
    are those without them. A training setting said to change nothing refused nothing either: activation_offload
    without VAE checkpointing, merge_lora_nograd beside base_quant=fp8 stopped the command."""
    def scores(*sets) -> list[float]:
        out = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        assert main(["sample", *COMMON, "--model", str(tiny_dir), "--prompt", "dog", "--images-per-prompt", "2",
                     "--output-dir", str(out), *sets]) == 0
        return json.loads((out / SAMPLE_RESULTS).read_text())["per_prompt"][0]["base"]

    plain = scores()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        said = scores("--set", "activation_offload=true", "--set", "compile=regional", "--set",
                      "merge_lora_nograd=true", "--set", "base_quant=fp8", "--set", "block_swap=1")
    assert said == plain  # (the same pipeline, seeds and weights: the same numbers)
    lines = [r.getMessage() for r in caplog.records]
    assert "--set activation_offload: training settings; sample trains nothing, so they change nothing here" in lines
    assert ("--set compile, merge_lora_nograd: speed settings of training's steps; sample renders through diffusers' "
            "pipeline without them, so they change nothing here") in lines
    assert ("block_swap=1 and base_quant=fp8: sample streams and stores only an SD3/FLUX transformer so; it holds an "
            "SD UNet model's UNet whole and unquantized (nothing saved here, its images of the full-precision base); "
            "turn them off: --set block_swap=0 --set base_quant=none") in lines


def test_a_reward_that_scores_images_nan_is_one_line_naming_what_to_check():
    """sample's scores hold a NaN (JSON has none): one line, nothing written; it names the LoRA with one, the model
    alone without (sample --model M: no LoRA to blame)."""
    import torch

    from lowmem_alignprop.commands.evaluate import _scores
    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.settings.errors import UserError

    class Bright(torch.nn.Module):  # the mean pixel, NaN where it is above 0.5
        def forward(self, images, prompts):
            r = images.mean(dim=(1, 2, 3))
            return torch.where(r > 0.5, torch.nan, r)

    dark, light = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    cfg, prompts, cpu = Config(reward="bright", batch_size=2), ["a", "b"], torch.device("cpu")
    base, lora = _scores(cfg, Bright(), dark, dark, prompts, cpu)
    assert base.tolist() == lora.tolist() == [0.0, 0.0]
    for images, lora_images, said in ((dark, light, "of the LoRA's 2 images NaN or inf: nothing was written; check "
                                                    "the LoRA (a diverged run?) and the reward"),
                                      (light, None, "of the model's 2 images NaN or inf: nothing was written; check "
                                                    "the model and the reward")):
        with pytest.raises(UserError) as e:
            _scores(cfg, Bright(), images, lora_images, prompts, cpu)
        assert str(e.value) == f"the reward 'bright' scored 2 {said}"

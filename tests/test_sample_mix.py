"""`sample --lora A:w --lora B:v ...`: mixing LoRAs in weight space (lora/adapters.py's module doc), checked against
a model whose weights are W + sum_i w_i * scale_i * B_i A_i built here with peft and diffusers directly.

The LoRAs differ in rank, alpha and adapted layers, and come in every form a user has: a run's lora/, a kohya export,
a peft export and a training checkpoint. A DoRA's magnitudes do not scale with its weight: refused at any weight but 1.
"""

from __future__ import annotations

import pytest
import torch
from refusals import assert_refused

from lowmem_alignprop.cli import main
from lowmem_alignprop.lora.lora_args import parse_lora
from lowmem_alignprop.settings.errors import UserError, quote

MAGNITUDE = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora_magnitude_vector"  # the dora's first


@pytest.fixture(scope="module")
def dora(tmp_path_factory, tiny_dir):
    """A peft DoRA adapter folder (use_dora) for the tiny UNet, with trained (not the base's) magnitudes."""
    from loras import save_peft_dora

    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.settings.config import Config

    folder = tmp_path_factory.mktemp("dora") / "dora"
    save_peft_dora(load_components(Config(model=str(tiny_dir))).unet, folder)
    return folder


@pytest.mark.parametrize("weight", ["0.5", "0", "-1"])
def test_a_dora_at_a_weight_other_than_1_is_one_line(dora, weight, tmp_path, capsys):
    """peft scales a DoRA's low-rank direction update by the adapter weight but divides by the norm of the scaled
    weight and keeps its trained magnitudes: at weight 0 a layer computed (m / ||W||) W x, 16% off the base layer's
    W x here, so `dora:0.5` was not halfway to the DoRA and `dora:0` not the base model, unsaid (sample_results.json
    says each adapter adds weight x its update). One line before any model loads; weight 1 is the DoRA as trained."""
    assert_refused(main, ["sample", "--profile", "cpu", "--lora", f"{dora}:{weight}", "--output-dir",
                          str(tmp_path / "s")],
                   f"--lora {dora}:{weight} is a DoRA (its magnitude vectors, e.g. {quote(MAGNITUDE)}): a weight "
                   "scales its direction update but "
                   f"not its magnitudes, so at weight {float(weight):g} it is not {float(weight):g} x its weight "
                   "update "
                   "(at 0 not the base model); give it weight 1 (alone or in a mix)", tmp_path / "s", capsys)
    assert parse_lora(str(dora), 0).weight == 1.0 and parse_lora(f"{dora}:1", 0).weight == 1.0  # as trained: read
    with pytest.raises(UserError, match="is a DoRA"):
        parse_lora(f"{dora}:0.5", 1)


@pytest.fixture(scope="module")
def three(tmp_path_factory, tiny_dir):
    """Three LoRAs of the tiny SD model as a user has them: a run's lora/ (attention), a kohya export of a run of
    the attention and feed-forward layers, a peft export of a third run."""
    from loras import export, make_sd_lora

    root = tmp_path_factory.mktemp("three")
    runs = [make_sd_lora(tiny_dir, root / f"r{i}", xl=False, seed=i, layers=layers)
            for i, layers in enumerate(("attention", "attention+ff", "attention"))]
    kohya = export(root / "k", runs[1]["lora"], "--format", "kohya")
    peft = export(root / "p", runs[2]["lora"], "--format", "peft")
    return [runs[0]["lora"], next(kohya.glob("*.safetensors")), peft]


def test_a_mix_of_loras_all_at_weight_0_renders_the_base_once_and_says_so(three, tmp_path, monkeypatch, caplog):
    """`sample --lora A:0 --lora B:0`: the LoRA row is the base model's images, rendered once (it rendered them twice,
    unsaid), and the results say a difference of 0."""
    import json
    import logging

    import lowmem_alignprop.commands.evaluate as ev

    made, generate = [], ev.generate
    monkeypatch.setattr(ev, "generate", lambda *a, **k: made.append(generate(*a, **k)) or made[-1])
    out = tmp_path / "s"
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main(["sample", "--profile", "cpu", "--reward", "brightness", "--prompt", "cat", "--output-dir",
                     str(out), "--lora", f"{three[0]}:0", "--lora", f"{three[1]}:0"]) == 0
    assert len(made) == 1
    assert "every --lora is at weight 0, which adds nothing: the LoRA images are the base model's (rendered once)" \
        in caplog.text
    r = json.loads((out / "sample_results.json").read_text())
    assert r["difference"] == 0 and r["lora_mean"] == r["base_mean"]


def _deltas(tiny_dir, lora) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight update scale * B A as the consumers read the LoRA: diffusers' load_lora_weights
    (a lora/ folder, a kohya file), peft's PeftModel.from_pretrained (a peft folder); peft's get_delta_weight."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if lora.is_dir() and (lora / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet"), lora)
        return {n.removeprefix("base_model.model."): m.get_delta_weight("default") for n, m in model.named_modules()
                if isinstance(m, LoraLayer)}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    pipe.load_lora_weights(str(lora.parent if lora.is_file() else lora),
                           **({"weight_name": lora.name} if lora.is_file() else {}), adapter_name="x")
    return {n: m.get_delta_weight("x") for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)}


def test_a_mix_of_a_runs_lora_a_kohya_and_a_peft_export_renders_the_weighted_sum_of_their_updates(
        three, tiny_dir, tmp_path, monkeypatch):
    """`sample --lora lora/:0.5 --lora kohya.safetensors:-0.7 --lora peft/:1.3 --images-per-prompt 2`: its LoRA images
    equal those of a plain diffusers pipeline whose UNet weights are W + sum_i w_i dW_i (normwise within REORDERED:
    the same sums, the updates added to the weights instead of beside them), far from the base images; and
    sample_results.json records every LoRA with its weight, in order."""
    import json

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from numerics import REORDERED, assert_rel_close, relative_difference

    import lowmem_alignprop.commands.evaluate as ev

    made, generate = [], ev.generate
    monkeypatch.setattr(ev, "generate", lambda *a, **k: made.append(generate(*a, **k)) or made[-1])
    weights = (0.5, -0.7, 1.3)
    out = tmp_path / "s"
    assert main(["sample", "--profile", "cpu", "--reward", "brightness", "--prompt", "cat", "--prompt", "dog",
                 "--images-per-prompt", "2", "--output-dir", str(out),
                 *[a for lora, w in zip(three, weights) for a in ("--lora", f"{lora}:{w}")]]) == 0
    r = json.loads((out / "sample_results.json").read_text())
    assert [(d["path"], d["weight"]) for d in r["loras"]] == [(str(p.absolute()), w) for p, w in zip(three, weights)]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    layers = dict(pipe.unet.named_modules())
    with torch.no_grad():
        for lora, w in zip(three, weights):
            for name, delta in _deltas(tiny_dir, lora).items():
                layers[name].weight += w * delta
    s = r["sampler"]
    reference = torch.cat([pipe(prompt=[p["prompt"]], num_inference_steps=s["sample_steps"],
                                guidance_scale=s["guidance_scale"], eta=s["eta"], height=s["resolution"],
                                width=s["resolution"], generator=[torch.Generator().manual_seed(seed)],
                                output_type="pt").images for p in r["per_prompt"] for seed in p["seeds"]])
    base, mixed = made
    assert_rel_close(mixed, reference, REORDERED, "the mix's images vs W + sum w_i dW_i")
    assert relative_difference(base, reference) > 100 * REORDERED  # (the mix changes the images: the check bites)

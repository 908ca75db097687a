"""A user's walk of `sample --lora A:w --lora B:v ...` with LoRAs of different kinds (a run's lora/, a file from
elsewhere with no record, another model's): what the mix's lines say of its LoRAs' runs, and a LoRA of another UNet
model refused before the model loads."""

from __future__ import annotations

import argparse
import logging

import pytest


@pytest.fixture(scope="module")
def mix(tmp_path_factory, tiny_dir):
    """A run's lora/ (its record: 64 px, 3 steps, guidance 7.5, eta 1, reward colorfulness, simple_animals) and a
    LoRA file from elsewhere: the same layers saved alone, no base_model.json beside it and no header settings."""
    from loras import make_sd_lora
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("mix")
    run = make_sd_lora(tiny_dir, root / "run", xl=False)
    alone = root / "elsewhere" / "style.safetensors"
    alone.parent.mkdir()
    save_file(load_file(str(run["lora"] / "pytorch_lora_weights.safetensors")), str(alone))
    return {"run": run["lora"], "alone": alone}


def test_a_mix_whose_first_lora_records_nothing_says_only_the_settings_the_profile_renders_otherwise(mix, caplog):
    """A LoRA from elsewhere first, a run's LoRA second, on the cpu profile (64 px, 10 steps, guidance 7.5, eta 1,
    brightness, simple_animals): the images render at the profile's settings, so the second run's differ in its
    reward and steps alone. The line named its eta, guidance, resolution and prompts too (each 'the first LoRA's:
    (default)', the very value the profile renders at)."""
    from lowmem_alignprop.commands.sample_cmd import take_run_settings

    args = argparse.Namespace(lora=[str(mix["alone"]), f"{mix['run']}:0.5"], set=[], model=None, reward=None,
                              prompts=None, recipe=None, output_dir="out", profile="cpu")
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        take_run_settings(args, [])
    said = [r.getMessage() for r in caplog.records if "'s run sampled with" in r.getMessage()]
    assert said == [f"--lora {mix['run']}:0.5's run sampled with reward=colorfulness sample_steps=3: the images use "
                    "the first LoRA's settings (reward=(default) sample_steps=(default)); --set KEY=VALUE chooses"]
    caplog.clear()
    args = argparse.Namespace(lora=[str(mix["alone"]), str(mix["run"])], set=["sample_steps=3"], model=None,
                              reward="colorfulness", prompts=None, recipe=None, output_dir="out", profile="cpu")
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        take_run_settings(args, [])
    assert "run sampled with" not in caplog.text, caplog.text  # (the command line renders as that run did)


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory, _isolated_cache):
    """A LoRA of the tiny SDXL-shaped model (its cross-attention 80 wide; the tiny SD model's is 32)."""
    from loras import make_sd_lora
    from midsize import build_tiny_sdxl_pipeline

    base = tmp_path_factory.mktemp("sdxl-base")
    build_tiny_sdxl_pipeline().save_pretrained(base)
    return make_sd_lora(base, tmp_path_factory.mktemp("sdxl-run"), xl=True)["lora"]


def test_a_lora_of_another_unet_model_is_refused_before_the_model_loads(sdxl_lora, tiny_dir, tmp_path, capsys,
                                                                         monkeypatch):
    """An SDXL LoRA on the tiny SD model: loading's one line (exit 2, nothing written), now from the model built on
    meta (as plan fits --init-lora's), before the model loads; it came once the model had loaded (minutes for SD1.5
    on a slow disk). (With a LoRA that fits beside it, check_mixable's line on their widths comes first.)"""
    from refusals import assert_refused

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.commands import sample_pipeline

    monkeypatch.setattr(sample_pipeline, "build_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "s"
    assert_refused(main, ["sample", "--profile", "cpu", "--model", str(tiny_dir), "--lora", str(sdxl_lora),
                          "--output-dir", str(out)],
                   f"--lora {sdxl_lora} does not fit this model: 8 of its weights have other shapes than this model's "
                   "layers (e.g. down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k: [4, 80] in the LoRA, "
                   "[4, 32] here); it was trained for another base model: pass that model with --model (now "
                   f"'{tiny_dir}')", out, capsys)

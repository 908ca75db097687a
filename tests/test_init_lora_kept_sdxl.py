"""``--init-lora`` of an SDXL kohya LoRA that adapts both text encoders (``lora_te1_``, ``lora_te2_``), a linear
``proj_in`` (a UNet linear this trainer does not train) and attention layers, end to end on the tiny SDXL pipeline:
a run that learns nothing (lr 1e-30) writes a lora/ and a kohya export that diffusers loads and that render what
diffusers' load of the whole file renders; the kept text-encoder layers are named with CLIP's ``text_model.``
whatever transformers built the model (transformers 5's CLIPTextModel has no such level)."""

from __future__ import annotations

import pytest
import torch
from midsize import build_tiny_sdxl_pipeline
from numerics import REORDERED, assert_rel_close

ATTENTION = [f"down_blocks.1.attentions.0.transformer_blocks.0.attn{i}.{p}" for i in (1, 2)
             for p in ("to_q", "to_k", "to_v", "to_out.0")]
PROJ_IN = "down_blocks.1.attentions.0.proj_in"  # (use_linear_projection: a Linear, kept)
TEXT = {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
ENCODER_LAYERS = ("self_attn.q_proj", "self_attn.out_proj")
RANK = 4


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """The tiny SDXL model's folder, a kohya LoRA of it (rank 4 attention, rank 2 proj_in and encoder layers: any
    rank is kept; no alphas: scale 1 everywhere, which every reader applies alike) and diffusers' images of the base
    with the whole file loaded (the reference)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("sdxl")
    pipe = build_tiny_sdxl_pipeline()
    pipe.save_pretrained(folder / "model")
    g = torch.Generator().manual_seed(11)
    layers = {"lora_unet_" + p.replace(".", "_"): (pipe.unet.get_submodule(p), RANK) for p in ATTENTION}
    layers["lora_unet_" + PROJ_IN.replace(".", "_")] = (pipe.unet.get_submodule(PROJ_IN), 2)
    for prefix, part in TEXT.items():
        encoder = getattr(pipe, part)
        for layer in ENCODER_LAYERS:
            path = next(n for n, _ in encoder.named_modules() if n.endswith(f"layers.0.{layer}"))
            layers[f"{prefix}text_model_encoder_layers_0_{layer.replace('.', '_')}"] = (encoder.get_submodule(path), 2)
    weights = {}
    for name, (module, rank) in layers.items():
        weights[f"{name}.lora_down.weight"] = 0.3 * torch.randn(rank, module.weight.shape[1], generator=g)
        weights[f"{name}.lora_up.weight"] = 0.3 * torch.randn(module.weight.shape[0], rank, generator=g)
    file = folder / "sdxl_lora.safetensors"
    save_file(weights, str(file))
    base = _images(pipe)
    pipe.load_lora_weights(str(folder), weight_name=file.name)
    return {"model": folder / "model", "file": file, "base": base, "images": _images(pipe)}


def _images(pipe):
    return pipe(prompt=["a cat", "a red dog"], num_inference_steps=3, height=64, width=64, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def _loaded(model, folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model))
    pipe.load_lora_weights(str(folder))
    return pipe


def test_an_sdxl_run_that_learns_nothing_writes_back_the_whole_lora_with_both_encoders(sdxl, tmp_path):
    """The run's lora/ and its kohya export, each loaded by diffusers' load_lora_weights, and its merged single file
    (diffusers' from_single_file), render the starting LoRA's images (both sides load unfused layers, only each
    scale's place differs: REORDERED); without the kept layers (the base + the attention layers) they are far off.
    lora/ names the kept encoder layers ``text_encoder.text_model.encoder...`` (what transformers 4 and ComfyUI's
    diffusers-LoRA reader name) and ``text_encoder_2.text_model.encoder...``, and export reads them back as the
    run's kept layers."""
    from safetensors import safe_open

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.lora.lora_files import read_lora
    from lowmem_alignprop.run.filenames import LORA_WEIGHT_NAME

    run = tmp_path / "run"
    assert main(["--profile", "cpu", "--model", str(sdxl["model"]), "--reward", "brightness", "--set",
                 "resolution=64", "--set", "sample_steps=3", "--set", "k=1", "--set", "sample_prompts=0", "--set",
                 "lr=1e-30", "--steps", "1", "--init-lora", str(sdxl["file"]), "--output-dir", str(run)]) == 0
    with safe_open(str(run / "lora" / LORA_WEIGHT_NAME), framework="pt") as f:
        encoder_keys = sorted(k for k in f.keys() if k.startswith("text_encoder"))
    assert encoder_keys == sorted(f"{part}.text_model.encoder.layers.0.{layer}.lora_{ab}.weight"
                                  for part in TEXT.values() for layer in ENCODER_LAYERS for ab in "AB")
    lora = read_lora(str(run / "lora"))
    assert sorted(k for k in lora.kept if k.startswith("unet.")) == [f"unet.{PROJ_IN}.lora_{ab}.weight" for ab in "AB"]
    assert len(lora.kept) == 2 * 5 and not [k for k in lora.weights if "proj_in" in k]  # (4 encoder layers, proj_in)
    rendered = _images(_loaded(sdxl["model"], run / "lora"))
    assert_rel_close(rendered, sdxl["images"], REORDERED, "the run's lora/ in diffusers")
    assert (rendered - sdxl["base"]).abs().max() > 1e-2  # (the LoRA changes the images: the check can fail)
    assert main(["export", "--lora", str(run / "lora"), "--format", "kohya", "--out", str(tmp_path / "kohya")]) == 0
    exported = next((tmp_path / "kohya").glob("*.safetensors"))
    with safe_open(str(exported), framework="pt") as f:
        assert {k.split("text_model")[0] for k in f.keys() if k.startswith("lora_te")} == set(TEXT)
    assert_rel_close(_images(_loaded(sdxl["model"], exported.parent)), sdxl["images"], REORDERED,
                     "the run's kohya export in diffusers")
    # its merged single file (the LDM layout: both encoders' kept layers fused into conditioner.embedders.0 / .1),
    # read back by diffusers' from_single_file with the model's folder: fused in fp32 (REORDERED, as the merge tests)
    from lowmem_alignprop.models.arch import load_single_file

    assert main(["export", "--lora", str(run / "lora"), "--merge", "--single-file", "--out", str(tmp_path / "s")]) == 0
    merged = load_single_file(next((tmp_path / "s").glob("*.safetensors")), config_dir=sdxl["model"])
    assert_rel_close(_images(merged), sdxl["images"], REORDERED, "the run's merged single file")


@pytest.mark.parametrize("path", ["encoder.layers.0.self_attn.v_proj", "text_model.encoder.layers.0.self_attn.v_proj"],
                         ids=["transformers 5 CLIPTextModel", "transformers 4, or CLIPTextModelWithProjection"])
def test_a_kept_encoder_layers_config_names_the_module_under_either_transformers(path):
    """A text encoder's kept layers in a run's LoRA header: peft finds each layer's own rank and alpha (rank 3 here,
    the config's r 2) and targets it whether the module is named with ``text_model.`` or not (diffusers rewrites
    the tensors' keys for transformers 5, not the config); read back, the layer is kept."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    from lowmem_alignprop.models.kept_lora import marked_kept, with_kept_layers

    layers = {f"text_model.encoder.layers.0.self_attn.{p}.lora_A.weight": torch.zeros(r, 8)
              for p, r in (("q_proj", 2), ("out_proj", 2), ("v_proj", 3))}
    config = with_kept_layers(None, layers)
    assert (config["r"], config["lora_alpha"]) == (2, 2)
    key = get_pattern_key(config["rank_pattern"].keys(), path)
    assert (config["rank_pattern"].get(key), config["alpha_pattern"].get(key)) == (3, 3)
    assert check_target_module_exists(type("C", (), config), path)
    assert marked_kept(config) == {f"encoder.layers.0.self_attn.{p}" for p in ("q_proj", "out_proj", "v_proj")}


def test_kept_layers_are_counted_by_kind_as_summary_json_and_the_card_say_them():
    """summary.json's kept_layers and the card's words of one SDXL set: both encoders, a convolution, a linear."""
    from lowmem_alignprop.models.kept_lora import kept_counts, kept_kinds

    a2, a4 = torch.zeros(2, 8), torch.zeros(2, 8, 3, 3)
    kept = {f"{k}.lora_{ab}.weight": a for k, a in (("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", a2),
                                                    ("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", a2),
                                                    ("text_encoder_2.text_model.encoder.layers.1.mlp.fc1", a2),
                                                    ("unet.down_blocks.0.resnets.0.conv1", a4),
                                                    ("unet.down_blocks.0.resnets.0.time_emb_proj", a2)) for ab in "AB"}
    assert kept_counts(kept) == {"text_encoder": 1, "text_encoder_2": 2, "convolutions": 1, "other_linears": 1}
    assert kept_kinds(kept) == ["3 text-encoder layers (2 of text_encoder_2)", "1 convolution", "1 other UNet linear"]
    assert kept_counts({}) == dict.fromkeys(("text_encoder", "text_encoder_2", "convolutions", "other_linears"), 0)

"""What a run gives users besides the LoRA: the negative prompt, images while training, the export at the end,
a LoRA to start from, and any checkpoint looked at with ``sample``."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from loras import cpu_cfg, rendered, trainer_at_step_0
from refusals import assert_refused, strict_rows
from numerics import SAME_OPS, assert_rel_close, relative_difference

from lowmem_alignprop.measure.resident_tensors import run_objects_only
from lowmem_alignprop.models.sampling import encode_prompts
from lowmem_alignprop.run.filenames import LORA_WEIGHT_NAME

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
    return cpu_cfg(out, *extra)


def _images_at_step_0(cfg):
    """The fixed-seed images the trainer renders before its first step (its `generate`, as for the grid)."""
    return trainer_at_step_0(cfg, PROMPTS).generate(PROMPTS, SEED)[0]


def _made_with_reference(tmp_path_factory, tiny_dir, layers: str):
    """A LoRA of ``layers`` with alpha = 2 * rank (test_lora_export's), its kohya and peft exports, and the images
    base + LoRA render through diffusers' own loader (the reference)."""
    from loras import make_sd_lora

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.models.sampling import make_pipeline

    made = make_sd_lora(tiny_dir, tmp_path_factory.mktemp("lora-run"), xl=False, layers=layers)
    for fmt in ("kohya", "peft"):
        assert main(["export", "--lora", str(made["lora"]), "--format", fmt, "--out", str(made["run"] / fmt)]) == 0
    cfg = _cfg(tmp_path_factory.mktemp("unused"))
    comps = load_components(cfg)
    pipe = make_pipeline(comps)
    pipe.load_lora_weights(str(made["lora"]))
    made["images"] = rendered(comps, pipe, cfg, PROMPTS, SEED)
    return made


@pytest.fixture(scope="module")
def made_lora(tmp_path_factory, tiny_dir):
    return _made_with_reference(tmp_path_factory, tiny_dir, "attention")


@pytest.fixture(scope="module")
def made_ff_lora(tmp_path_factory, tiny_dir):
    """A LoRA of the attention and feed-forward layers (lora_layers=attention+ff)."""
    return _made_with_reference(tmp_path_factory, tiny_dir, "attention+ff")


def _attn_processor_layout(weights: dict) -> dict:
    """diffusers' layout before 0.21 (unet.save_attn_procs): attn1.processor.to_q_lora.down.weight, alpha = rank."""
    import re

    return {re.sub(r"\.(to_[qkv]|to_out)(\.0)?\.lora\.", r".processor.\1_lora.", k.removeprefix("unet.")): v
            for k, v in weights.items()}


def _kohya_per_layer_alphas(made_lora, tmp_path):
    """made_lora's kohya export as sd-scripts' resize_lora or a merge writes such a file, each layer its own alpha: a
    third of the layers at alpha 2 (their lora_up 4x), a third with no alpha (alpha = rank: lora_up 2x), the rest at
    alpha 8: the same LoRA. diffusers' reader applied the most common alpha (8) to every layer."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(next((made_lora["run"] / "kohya").glob("*.safetensors"))))
    layers = sorted(k.removesuffix(".alpha") for k in weights if k.endswith(".alpha"))
    assert {float(weights[f"{m}.alpha"]) for m in layers} == {8.0} and len(layers) > 6
    for m in layers[0::3]:
        weights[f"{m}.alpha"], weights[f"{m}.lora_up.weight"] = torch.tensor(2.0), weights[f"{m}.lora_up.weight"] * 4
    for m in layers[1::3]:
        del weights[f"{m}.alpha"]
        weights[f"{m}.lora_up.weight"] = weights[f"{m}.lora_up.weight"] * 2
    save_file(weights, str(tmp_path / "per_layer_alphas.safetensors"))
    return tmp_path / "per_layer_alphas.safetensors"


def _comfy_layout(made_lora, tmp_path):
    """made_lora's kohya export as ComfyUI's LoRA save node writes a UNet LoRA: ``diffusion_model.`` + the original
    LDM module path (input_blocks.N.1...), every other layer without alpha (alpha = rank: its lora_up 2x)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.lora.lora_formats import kohya_name
    from lowmem_alignprop.models.ldm_layout import unet_to_ldm

    weights = load_file(str(next((made_lora["run"] / "kohya").glob("*.safetensors"))))
    config = UNet2DConditionModel.load_config(str(made_lora["base"] / "unet"))
    out = {}
    for i, module in enumerate(made_lora["modules"]):
        ldm = next(iter(unet_to_ldm({f"{module}.weight": None}, config, "diffusion_model."))).removesuffix(".weight")
        name = kohya_name(module)
        out[f"{ldm}.lora_down.weight"] = weights[f"{name}.lora_down.weight"]
        out[f"{ldm}.lora_up.weight"] = weights[f"{name}.lora_up.weight"] * (2 if i % 2 else 1)
        if not i % 2:
            out[f"{ldm}.alpha"] = weights[f"{name}.alpha"]
    assert float(weights[f"{kohya_name(made_lora['modules'][0])}.alpha"]) == 8.0 and len(out) > 12
    assert all(k.startswith("diffusion_model.input_blocks.") or k.startswith(("diffusion_model.middle_block.1.",
                                                                             "diffusion_model.output_blocks."))
               for k in out)
    save_file(out, str(tmp_path / "comfyui_lora.safetensors"))
    return tmp_path / "comfyui_lora.safetensors"


@pytest.mark.parametrize("layout", ["diffusers", "run_folder", "kohya", "kohya_alphas", "peft", "bin",
                                    "attn_processors", "comfyui"])
def test_init_lora_step_0_renders_base_plus_that_lora(layout, made_lora, tmp_path):
    from safetensors.torch import load_file, save_file

    bin_file = tmp_path / "pytorch_lora_weights.bin"  # torch.save's (older diffusers and peft; sample read it), with
    # no header for its alpha (8 over rank 4): folded into B, as diffusers reads such a file with alpha = rank
    weights = load_file(str(made_lora["lora"] / "pytorch_lora_weights.safetensors"))
    folded = {k: v * 2 if k.endswith((".lora.up.weight", ".lora_B.weight")) else v for k, v in weights.items()}
    torch.save(folded, bin_file)
    old = tmp_path / "attn_procs.safetensors"  # diffusers' layout before 0.21 (which diffusers reads no more)
    save_file(_attn_processor_layout(folded), str(old))
    assert all(".processor.to_" in k and "_lora." in k for k in load_file(str(old)))
    kohya = next((made_lora["run"] / "kohya").glob("*.safetensors"))
    spec = {"diffusers": made_lora["lora"], "run_folder": made_lora["run"], "kohya": kohya,
            "kohya_alphas": _kohya_per_layer_alphas(made_lora, tmp_path), "peft": made_lora["run"] / "peft",
            "bin": bin_file, "attn_processors": old,
            "comfyui": _comfy_layout(made_lora, tmp_path) if layout == "comfyui" else None}[layout]
    # --seed 5: the run's own A starts other than the LoRA's (make_sd_lora's add_lora seed 0), so A must be copied
    images = _images_at_step_0(_cfg(tmp_path / "run", "--set", f"init_lora={spec}", "--seed", "5"))
    # alpha 8 over rank 4 in the LoRA, alpha = rank in the run: B is rescaled; the images are the LoRA's own
    assert_rel_close(images, made_lora["images"], SAME_OPS, f"step 0 from a {layout} LoRA")


def test_sample_applies_each_layers_own_alpha_of_a_kohya_file(made_lora, tmp_path):
    """sample --lora of a kohya file whose layers have their own alphas (and some none) adds, at weight 0.5, half
    of each layer's alpha / rank * up @ down: the LoRA it holds, as its plain export loads (the layers at alpha 2
    were applied at 8, 4x, and those without alpha at 8 / 4, 2x)."""
    from lowmem_alignprop.lora.adapters import load_adapters, mix_adapters
    from lowmem_alignprop.lora.lora_args import parse_lora
    from lowmem_alignprop.commands.sample_pipeline import build_pipeline

    cfg = _cfg(tmp_path / "unused")
    pipe = build_pipeline(cfg, torch.device("cpu"), torch.float32)
    plain = parse_lora(str(next((made_lora["run"] / "kohya").glob("*.safetensors"))), 0)
    own = parse_lora(f"{_kohya_per_layer_alphas(made_lora, tmp_path)}:0.5", 1)
    load_adapters(pipe, [plain, own], cfg.model)
    plain.weight = 0.5
    mix_adapters(pipe, [plain, own])  # (the weights are folded into each adapter's scaling)
    layers = [m for m in pipe.unet.modules() if "lora0" in getattr(m, "lora_A", {})]
    assert len(layers) == len(made_lora["modules"])

    def delta(m, name):
        return m.scaling[name] * m.lora_B[name].weight @ m.lora_A[name].weight

    worst = max(relative_difference(delta(m, "lora1"), delta(m, "lora0")) for m in layers)
    assert worst < 1e-6, worst


def _comfy_extract(pipe, file, peft_names=False, encoders=False):
    """A UNet LoRA of every weight of two or more dimensions (the linear and conv layers), as ComfyUI's LoRA extract
    node writes it (``diffusion_model.`` + the LDM module path; rank 2, random), a third of the layers at alpha 1, a
    third at alpha 3, the rest without (alpha = rank): saved as ``file``. ``peft_names``: its layers' pairs named
    ``.lora_A.weight`` / ``.lora_B.weight`` (ComfyUI's trainer and others), not ``.lora_down`` / ``.lora_up``.
    ``encoders``: the text encoders' weights too, as the node's text_encoder_diff writes them (``text_encoders.`` +
    ComfyUI's CLIP names: ``clip_l.transformer.text_model.encoder...``, SDXL's second ``clip_g``, its
    ``text_projection``), the embeddings and clip_l's projection unchanged (their pairs zero, as the node extracts
    an unchanged weight). Returns each (component, diffusers module)'s alpha / rank * up @ down (flattened) of the
    changed layers."""
    from safetensors.torch import save_file

    from lowmem_alignprop.models.ldm_layout import unet_to_ldm

    g = torch.Generator().manual_seed(4)
    weights = {k: v for k, v in pipe.unet.state_dict().items() if k.endswith(".weight") and v.ndim >= 2}
    layers = {("unet", name): key.removesuffix(".weight") for name, key in  # (unet_to_ldm keeps the order)
              zip(weights, unet_to_ldm(weights, pipe.unet.config, "diffusion_model."))}
    for part, clip in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")) if encoders else ():
        if getattr(pipe, part, None) is None:
            continue
        encoder = {k: v for k, v in getattr(pipe, part).state_dict().items() if k.endswith(".weight") and v.ndim >= 2}
        weights.update({f"{part}.{k}": v for k, v in encoder.items()})
        layers.update({(part, k): f"text_encoders.{clip}.transformer." + (k if k.startswith(("text_model.", "text_"
                       "projection")) else f"text_model.{k}").removesuffix(".weight") for k in encoder})
        if part == "text_encoder":  # ComfyUI's clip_l has a projection, SD's and SDXL's first encoder none: unchanged
            weights["text_encoder.text_projection.weight"] = torch.zeros(encoder[next(iter(encoder))].shape[1], 2)
            layers[part, "text_projection.weight"] = f"text_encoders.{clip}.transformer.text_projection"
    down_name, up_name = (".lora_A.weight", ".lora_B.weight") if peft_names else (".lora_down.weight",
                                                                                   ".lora_up.weight")
    tensors, want = {}, {}
    for i, ((part, name), layer) in enumerate(layers.items()):
        w = weights[name if part == "unet" else f"{part}.{name}"]
        down = torch.randn(2, *w.shape[1:], generator=g)
        up = torch.randn(w.shape[0], 2, *((1, 1) if w.ndim == 4 else ()), generator=g)
        if part != "unet" and "embeddings." in name or (part, name) == ("text_encoder", "text_projection.weight"):
            up = torch.zeros_like(up)  # (an unchanged weight: what no encoder applies, and needs no layer)
        tensors[f"{layer}{down_name}"], tensors[f"{layer}{up_name}"] = down, up
        alpha = (1.0, 3.0, None)[i % 3]
        if alpha is not None:
            tensors[f"{layer}.alpha"] = torch.tensor(alpha)
        if up.any():
            want[part, name.removesuffix(".weight")] = (alpha or 2) / 2 * up.flatten(1) @ down.flatten(1)
    save_file(tensors, str(file))
    return want


@pytest.mark.parametrize("model, peft_names, encoders", [
    ("sd", False, False), ("sd_plain_first_up_block", False, False), ("sdxl", False, False), ("sd", True, False),
    ("sdxl", True, False), ("sd", False, True), ("sdxl", False, True), ("sdxl", True, True)])
def test_sample_applies_every_layer_of_a_comfyui_unet_lora(model, peft_names, encoders, tmp_path, _isolated_cache):
    """sample --lora of a UNet LoRA as ComfyUI saves it (LDM names under diffusion_model.: attention, feed-forward,
    resnet convs, up/down samplers, time and SDXL's label embeddings, conv_in/out) applies each layer's
    alpha / rank * up @ down, on the SD model, one whose first up block has no attention (SD 1.x's: its upsampler is
    output_blocks.2.1.conv, which diffusers' reader takes for an attention) and SDXL. It was refused as another base
    model's ("Invalid LoRA checkpoint ...: pass that model with --model"). Its pairs in peft's names (lora_A /
    lora_B: diffusers' raw error) and its text encoders' layers (text_encoders.clip_l / clip_g: refused) too, on
    every encoder the pipeline has: attention, MLP and SDXL's text_projection; unchanged (zero) embeddings need none."""
    from diffusers import UNet2DConditionModel
    from midsize import build_tiny_sdxl_pipeline

    from lowmem_alignprop.lora.adapters import load_adapters
    from lowmem_alignprop.lora.lora_args import parse_lora
    from lowmem_alignprop.lora.lora_kinds import lora_family
    from lowmem_alignprop.commands.sample_pipeline import build_pipeline

    if model == "sdxl":
        pipe = build_tiny_sdxl_pipeline()
    else:
        pipe = build_pipeline(_cfg(tmp_path / "unused"), torch.device("cpu"), torch.float32)
    if model == "sd_plain_first_up_block":  # SD 1.x's block order: no attention in the last down / first up block
        torch.manual_seed(0)
        pipe.register_modules(unet=UNet2DConditionModel(
            sample_size=16, layers_per_block=2, block_out_channels=(32, 64), cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=2, norm_num_groups=16,
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    want = _comfy_extract(pipe, tmp_path / "comfy.safetensors", peft_names, encoders)
    assert any(".upsamplers." in n for _, n in want) and any("conv_in" in n for _, n in want)
    assert (model == "sdxl") == any("add_embedding" in n for _, n in want)
    assert {p for p, _ in want} == {"unet", *(("text_encoder", "text_encoder_2")[:1 + (model == "sdxl")] if encoders
                                                else ())}
    assert (model == "sdxl" and encoders) == (("text_encoder_2", "text_projection") in want)
    assert lora_family(tmp_path / "comfy.safetensors") == "unet"  # (on an SD3/FLUX model: refused by its family)
    load_adapters(pipe, [parse_lora(str(tmp_path / "comfy.safetensors"), 0)], "tiny")
    loaded = {(part, n): m for part in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, part, None)
              for n, m in getattr(pipe, part).named_modules() if "lora0" in getattr(m, "lora_A", {})}
    assert sorted(loaded) == sorted(want)
    for name, m in loaded.items():
        got = m.scaling["lora0"] * m.lora_B["lora0"].weight.flatten(1) @ m.lora_A["lora0"].weight.flatten(1)
        assert relative_difference(got, want[name]) < 1e-6, name


# which encoder linears a file adapts: every one (as sd-scripts saves them), or some without out_proj (a pruned file,
# another tool's), by which diffusers' kohya reader told no layout: te1 q/v + fc1 lost q/v ("only 48 of its 52 layers
# exist here"), te2 q/k/v alone raised "Could not automatically infer state dict type", each said as another model's
_ENCODER_LINEARS = {"every": {"text_encoder": ("_proj", "fc1", "fc2"), "text_encoder_2": ("_proj", "fc1", "fc2")},
                    "no_out_proj": {"text_encoder": ("q_proj", "v_proj", "fc1"),
                                    "text_encoder_2": ("q_proj", "k_proj", "v_proj")}}


@pytest.mark.parametrize("layout, linears", [("kohya", "every"), ("diffusers", "every"), ("kohya", "no_out_proj"),
                                             ("kohya_one_alpha", "no_out_proj"),
                                             ("kohya_one_alpha_bin", "no_out_proj")])
def test_sample_applies_an_sdxl_loras_text_encoder_layers_to_both_encoders(layout, linears, _isolated_cache,
                                                                           tmp_path):
    """sample --lora FILE:0.5 of an SDXL LoRA with both text encoders' layers, named as files carry them (kohya's
    lora_te1_text_model_..., lora_te2_; diffusers' text_encoder.text_model. / text_encoder_2.: transformers 5 has no
    text_model in CLIPTextModel, which diffusers' reader strips), kohya's with per-layer alphas (or one alpha): every
    layer of the UNet and of each encoder holds half its alpha / rank * up @ down, with every encoder linear (as
    sd-scripts adapts them) or some without out_proj (:data:`_ENCODER_LINEARS`); the last as a torch pickle (.bin,
    torch.save's), which was not converted (its q/v dropped: "only 48 of its 52 layers exist here")."""
    from midsize import build_tiny_sdxl_pipeline
    from safetensors.torch import save_file

    from lowmem_alignprop.lora.adapters import load_adapters, mix_adapters
    from lowmem_alignprop.lora.lora_args import parse_lora

    pipe = build_tiny_sdxl_pipeline()
    g = torch.Generator().manual_seed(5)
    tensors, want = {}, {}
    for part, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        for i, (name, m) in enumerate((n, m) for n, m in getattr(pipe, part).named_modules() if isinstance(
                m, torch.nn.Linear) and not n.endswith(("proj_in", "proj_out", "projection", "linear_1", "linear_2"))
                and (".attn" in n if part == "unet" else n.endswith(_ENCODER_LINEARS[linears][part]))):
            down, up, alpha = torch.randn(2, m.in_features, generator=g), torch.randn(m.out_features, 2, generator=g), \
                (1.0, 4.0)[i % 2] if not layout.startswith("kohya_one_alpha") else 4.0
            real = name if part == "unet" or name.startswith("text_model.") else f"text_model.{name}"
            if layout.startswith("kohya"):
                layer = prefix + real.replace(".", "_")
                tensors.update({f"{layer}.lora_down.weight": down, f"{layer}.lora_up.weight": up,
                                f"{layer}.alpha": torch.tensor(alpha)})
            else:
                tensors.update({f"{part}.{real}.lora_A.weight": down, f"{part}.{real}.lora_B.weight": up * alpha / 2})
            want[part, name] = alpha / 2 * up @ down
    file = tmp_path / ("sdxl.bin" if layout.endswith("_bin") else "sdxl.safetensors")
    save_file(tensors, str(file)) if file.suffix == ".safetensors" else torch.save(tensors, file)
    spec = parse_lora(f"{file}:0.5", 0)
    load_adapters(pipe, [spec], "tiny-sdxl")
    mix_adapters(pipe, [spec])  # (the weight is folded into the scaling)
    got = {(part, n): m.scaling["lora0"] * m.lora_B["lora0"].weight @ m.lora_A["lora0"].weight
           for part in ("unet", "text_encoder", "text_encoder_2")
           for n, m in getattr(pipe, part).named_modules() if "lora0" in getattr(m, "lora_A", {})}
    assert sorted(got) == sorted(want)
    assert sum(p != "unet" for p, _ in want) == {"every": 24, "no_out_proj": 12}[linears]
    assert max(relative_difference(got[k], 0.5 * want[k]) for k in want) < 1e-6


@pytest.mark.parametrize("extra", ["diff", "text_encoder"])
def test_a_comfyui_lora_with_weight_differences_or_text_encoder_layers_is_one_line(extra, made_lora, tmp_path, capsys,
                                                                                  fresh_log_handlers):
    """A ComfyUI UNet LoRA that also holds its extract node's full weight / bias differences (lora_type full_diff,
    bias_diff: no LoRA layer applies them) or a changed text-encoder layer diffusers has none for (the token
    embedding): one line naming them and how to save it again, for sample and --init-lora (it said "Invalid LoRA
    checkpoint": pass the model it was made for)."""
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.settings.errors import quote

    tensors = load_file(str(_comfy_layout(made_lora, tmp_path)))
    key = {"diff": "diffusion_model.out.0.diff_b", "text_encoder":
           "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.lora_down.weight"}[extra]
    tensors[key] = torch.ones(4, 32)
    if extra == "text_encoder":  # a changed token embedding (its up not zero): diffusers' readers apply none
        tensors[key.replace(".lora_down.", ".lora_up.")] = torch.ones(1000, 4)
    save_file(tensors, str(tmp_path / "with_extra.safetensors"))
    file = tmp_path / "with_extra.safetensors"
    said = {"diff": f"holds ComfyUI's full weight or bias differences (e.g. {quote(key)}), not a LoRA's lora_down / "
                    "lora_up: extract it again with lora_type standard and bias_diff off",
            "text_encoder": f"changes a text-encoder layer that diffusers' LoRA loader has no layer for (e.g. "
                            f"{quote(key)}): only the encoders' attention and MLP layers and CLIP-G's text_projection "
                            "(SDXL's and SD3's second encoder) are read; save it again without text_encoder_diff, or "
                            "from a fine-tune that left that layer as it was"}[extra]
    assert_refused(main, ["sample", "--profile", "cpu", "--lora", str(file), "--output-dir", str(tmp_path / "sample")],
                   f"--lora {file} {said}", tmp_path / "sample", capsys)
    if extra == "diff":  # (--init-lora refuses a text encoder's layers as it does in every layout: a UNet LoRA only)
        assert_refused(main, ["--profile", "cpu", "--steps", "1", "--output-dir", str(tmp_path / "run"),
                              "--init-lora", str(file)], f"--init-lora {file} {said}", tmp_path / "run", capsys)


def test_a_peft_adapter_of_attention_and_conv_layers_samples_every_layer(tmp_path):
    """A peft adapter folder whose target_modules take the resnets' convs too (LoCon, as peft saves it): sample
    applies each layer's alpha / rank * B @ A (with rank_pattern / alpha_pattern), attention and conv; it was refused,
    "only 16 of its 48 layers exist here ... trained for another base model", its attention layers dropped."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from peft.utils.other import get_pattern_key
    from safetensors.torch import save_file

    from lowmem_alignprop.lora.adapters import load_adapters
    from lowmem_alignprop.lora.lora_args import parse_lora
    from lowmem_alignprop.commands.sample_pipeline import build_pipeline
    from lowmem_alignprop.models.loading import load_components

    cfg = _cfg(tmp_path / "unused")
    unet = load_components(cfg).unet
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "conv1", "conv2"],
                        rank_pattern={"conv2": 2}, alpha_pattern={"attn2.to_v": 1})
    inject_adapter_in_model(config, unet)
    g = torch.Generator().manual_seed(3)
    weights = {k: torch.randn(v.shape, generator=g) for k, v in get_peft_model_state_dict(unet).items()}
    config.save_pretrained(str(tmp_path / "peft"))
    save_file({f"base_model.model.{k}": v for k, v in weights.items()},
              str(tmp_path / "peft" / "adapter_model.safetensors"))
    pipe = build_pipeline(cfg, torch.device("cpu"), torch.float32)
    load_adapters(pipe, [parse_lora(str(tmp_path / "peft"), 0)], cfg.model)
    loaded = {n: m for n, m in pipe.unet.named_modules() if "lora0" in getattr(m, "lora_A", {})}
    layers = sorted(k.removesuffix(".lora_A.weight") for k in weights if k.endswith(".lora_A.weight"))
    assert sorted(loaded) == layers and sum(".resnets." in n for n in layers) == 16 and len(layers) == 32
    for name in layers:
        a, b = weights[f"{name}.lora_A.weight"], weights[f"{name}.lora_B.weight"]
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern, name), 8)
        want = (b.flatten(1) @ a.flatten(1)) * alpha / a.shape[0]
        m = loaded[name]
        got = m.scaling["lora0"] * m.lora_B["lora0"].weight.flatten(1) @ m.lora_A["lora0"].weight.flatten(1)
        assert relative_difference(got, want) < 1e-6, name


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_a_lycoris_loha_or_lokr_file_is_one_line_naming_it_for_init_lora_and_sample(kind, made_lora, tmp_path,
                                                                                  capsys, fresh_log_handlers):
    """A LyCORIS file (kohya names, hada_ / lokr_ weights) whole, or beside plain LoRA layers: one line naming what
    it holds. Whole, it said "holds no LoRA weights" (sample: pass the lora/ folder a run wrote); mixed, diffusers'
    converter failed and the line blamed the base model (pass that model with --model)."""
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.settings.errors import quote

    weights = load_file(str(next((made_lora["run"] / "kohya").glob("*.safetensors"))))
    layer = sorted(k for k in weights if k.endswith(".lora_down.weight"))[0].removesuffix(".lora_down.weight")
    down, up = weights.pop(f"{layer}.lora_down.weight"), weights.pop(f"{layer}.lora_up.weight")
    lycoris = {"loha": {f"{layer}.hada_w1_a": up, f"{layer}.hada_w1_b": down, f"{layer}.hada_w2_a": up.clone(),
                        f"{layer}.hada_w2_b": down.clone()},
               "lokr": {f"{layer}.lokr_w1": torch.ones(1, 1), f"{layer}.lokr_w2": up @ down}}[kind]
    whole = {**lycoris, f"{layer}.alpha": weights[f"{layer}.alpha"]}
    name = {"loha": "LoHa", "lokr": "LoKr"}[kind]
    for what, tensors in (("whole", whole), ("mixed", {**weights, **lycoris})):
        file = tmp_path / f"{what}.safetensors"
        save_file(tensors, str(file))
        key = f"LyCORIS {name} weights (e.g. {quote(sorted(lycoris)[0])}), not a LoRA's lora_down / lora_up"
        assert_refused(main, ["--profile", "cpu", "--steps", "1", "--output-dir", str(tmp_path / "run"),
                              "--init-lora", str(file)],
                       f"--init-lora {file} holds {key}: this trainer trains plain LoRA and cannot start from it; "
                       "pass a LoRA", tmp_path / "run", capsys)
        assert_refused(main, ["sample", "--profile", "cpu", "--lora", str(file), "--output-dir",
                              str(tmp_path / "sample")],
                       f"--lora {file} holds {key}: sample reads plain LoRA only; pass a LoRA", tmp_path / "sample",
                       capsys)


def test_sample_of_a_dora_applies_its_magnitudes_or_is_one_line(made_lora, tmp_path, capsys, fresh_log_handlers):
    """sample --lora of a peft DoRA adapter folder (use_dora, trained magnitudes) computes what peft's own merged DoRA
    weight does, not the plain LoRA's; a kohya-named DoRA (LyCORIS' .dora_scale), whose magnitudes diffusers' reader
    drops (a warning), is one line: it rendered as the plain LoRA in silence."""
    from loras import save_peft_dora
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.lora.adapters import load_adapters
    from lowmem_alignprop.lora.lora_args import parse_lora
    from lowmem_alignprop.commands.sample_pipeline import build_pipeline
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.settings.errors import quote

    cfg = _cfg(tmp_path / "unused")
    unet = load_components(cfg).unet
    save_peft_dora(unet, tmp_path / "dora")  # (unet keeps the adapter: peft's own DoRA weight, the reference)
    g = torch.Generator().manual_seed(4)
    pipe = build_pipeline(cfg, torch.device("cpu"), torch.float32)
    load_adapters(pipe, [parse_lora(str(tmp_path / "dora"), 0)], cfg.model)
    pipe.set_adapters(["lora0"])
    layers = [n for n, m in unet.named_modules() if "default" in getattr(m, "lora_A", {})]
    x = torch.randn(3, 64, generator=g)  # (the widest layer's inputs; a narrower one takes the first)
    assert len(layers) == 16
    for name in layers:
        theirs, ours = unet.get_submodule(name), pipe.unet.get_submodule(name)
        plain = theirs.base_layer.weight + theirs.get_delta_weight("default")
        theirs.merge(adapter_names=["default"])  # peft's DoRA weight: magnitude * (W + dW) / ||W + dW||
        with torch.no_grad():
            got, want = ours(x[:, :ours.in_features]), x[:, :ours.in_features] @ theirs.base_layer.weight.T
        assert relative_difference(got, want) < 1e-5, name
        assert relative_difference(x[:, :ours.in_features] @ plain.T, want) > 0.01  # (the magnitudes matter)
    weights = load_file(str(next((made_lora["run"] / "kohya").glob("*.safetensors"))))
    layer = sorted(k for k in weights if k.endswith(".lora_down.weight"))[0].removesuffix(".lora_down.weight")
    save_file({**weights, f"{layer}.dora_scale": torch.full((weights[f"{layer}.lora_up.weight"].shape[0], 1), 2.0)},
              str(tmp_path / "kohya_dora.safetensors"))
    file = tmp_path / "kohya_dora.safetensors"
    assert_refused(main, ["sample", "--profile", "cpu", "--lora", str(file), "--output-dir", str(tmp_path / "sample")],
                   f"--lora {file} is a DoRA in kohya's names (its magnitude vectors, e.g. "
                   f"{quote(f'{layer}.dora_scale')}), which diffusers' reader drops: sample reads a DoRA's magnitudes "
                   "from a peft adapter folder or a diffusers file (lora_magnitude_vector); pass one of those, or a "
                   "plain LoRA", tmp_path / "sample", capsys)


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_init_lora_of_feed_forward_layers_renders_them_under_attention_ff(layout, made_ff_lora, tmp_path):
    """A LoRA of the attention and feed-forward layers starts a lora_layers=attention+ff run where it renders (every
    layer copied: leaving out the feed-forward ones would change the images far above the tolerance)."""
    spec = {"diffusers": made_ff_lora["lora"], "kohya": next((made_ff_lora["run"] / "kohya").glob("*.safetensors"))}
    images = _images_at_step_0(_cfg(tmp_path / "run", "--set", f"init_lora={spec[layout]}",
                                    "--set", "lora_layers=attention+ff", "--seed", "5"))
    assert_rel_close(images, made_ff_lora["images"], SAME_OPS, f"step 0 from a {layout} attention+ff LoRA")


def test_a_resume_starts_from_the_lora_the_run_started_from_even_when_its_path_is_gone(made_lora, tmp_path, capsys,
                                                                                    caplog, fresh_log_handlers):
    """The run keeps the LoRA --init-lora named, as it read it (init_lora/): a resume renders its before samples from
    that copy, with the path moved away (it was refused) or holding another LoRA (the before figures changed)."""
    import json
    import logging
    import shutil

    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.cli import main

    src = tmp_path / "src"
    shutil.copytree(made_lora["lora"], src)
    out = tmp_path / "run"
    args = ["--profile", "cpu", "--set", "sample_steps=3", "--set", "k=1", "--set", "sample_prompts=1",
            "--set", "batch_size=1", "--output-dir", str(out)]
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main([*args, "--steps", "1", "--init-lora", str(src)]) == 0
    assert f"starting from the LoRA {src} (" in caplog.text
    caplog.clear()
    before = json.loads((out / "summary.json").read_text())["sample_reward_before"]
    assert (out / "init_lora" / "pytorch_lora_weights.safetensors").read_bytes() == \
        (src / "pytorch_lora_weights.safetensors").read_bytes()
    shutil.rmtree(src)
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main(["--output-dir", str(out), "--steps", "2", "--resume", "latest"]) == 0
    said = caplog.text  # the checkpoint's LoRA trains on: not "starting from" the one it started from
    assert "starting from the LoRA" not in said and f"the run started from the LoRA {src}, its copy " \
        f"{out / 'init_lora'} (" in said and "): the checkpoint's LoRA trains on" in said, said
    assert json.loads((out / "summary.json").read_text())["sample_reward_before"] == before
    # the copy gone too (a pruned or moved run folder): the path is taken only when it holds that LoRA; another one
    # was taken in silence (its images the run's "before", and written over the record of what the run started from)
    shutil.rmtree(out / "init_lora")
    shutil.copytree(made_lora["lora"], src)
    assert main(["--output-dir", str(out), "--steps", "3", "--resume", "latest"]) == 0  # the same LoRA: on it goes
    shutil.rmtree(out / "init_lora")
    weights = src / "pytorch_lora_weights.safetensors"
    changed = load_file(str(weights))
    next(iter(changed.values())).mul_(2)
    save_file(changed, str(weights))
    assert_refused(main, ["--output-dir", str(out), "--steps", "4", "--resume", "latest"],
                   f"--init-lora {src} is not the LoRA this run started from (its checkpoint records another's digest), "
                   f"and the run's copy {out / 'init_lora'} is missing: restore the copy or that file, or resume with "
                   "--set init_lora=", out / "init_lora", capsys)
    shutil.rmtree(src)
    assert_refused(main, ["--output-dir", str(out), "--steps", "4", "--resume", "latest"],
                   f"the LoRA this run started from is gone: its copy {out / 'init_lora'} is missing, and --init-lora "
                   f"{src}: no such file or folder", out / "init_lora", capsys)
    assert main(["--output-dir", str(out), "--steps", "4", "--resume", "latest", "--set", "init_lora="]) == 0


def test_the_card_gives_the_digest_of_the_file_init_lora_named_not_of_its_converted_copy(made_lora, tmp_path):
    """The card's "started from" digest was the SHA-256 of the run's init_lora/ copy, which is converted (a peft
    folder's, a .bin's, per-layer alphas folded...): sha256sum of the user's own file never matched it. The run now
    records the file it was named and that file's digest (init_lora/source.json), a resume keeps it, and the card
    gives it, naming the file."""
    import hashlib

    from outputs_doc import DOC, documented_keys, undocumented

    from lowmem_alignprop.cli import main
    from safetensors import safe_open

    from lowmem_alignprop.lora.init_lora import init_lora_source

    def sha(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    peft, out = made_lora["run"] / "peft", tmp_path / "run"
    args = ["--profile", "cpu", "--set", "sample_steps=3", "--set", "k=1", "--set", "sample_prompts=1",
            "--set", "batch_size=1", "--output-dir", str(out)]
    assert main([*args, "--steps", "1", "--init-lora", str(peft)]) == 0
    theirs = sha(peft / "adapter_model.safetensors")
    assert theirs != sha(out / "init_lora" / "pytorch_lora_weights.safetensors")  # (converted: peft's names)
    record = json.loads((out / "init_lora" / "source.json").read_text())
    assert record == {"file": "adapter_model.safetensors", "sha256": theirs}
    assert undocumented(record, documented_keys(DOC.read_text(encoding="utf-8"))["init_lora/source.json"]) == []
    assert main(["--output-dir", str(out), "--steps", "2", "--resume", "latest"]) == 0
    assert json.loads((out / "init_lora" / "source.json").read_text()) == record  # a resume keeps it
    assert main(["export", "--lora", str(out / "lora"), "--out", str(tmp_path / "e")]) == 0
    card = (tmp_path / "e" / "README.md").read_text()
    assert f"sha256 {theirs} (of its adapter_model.safetensors) (its own training" in card, card
    assert main(["export", "--lora", str(out / "lora"), "--format", "kohya", "--out", str(tmp_path / "k")]) == 0
    with safe_open(str(next((tmp_path / "k").glob("*.safetensors"))), framework="pt") as f:
        header = f.metadata()  # the kohya header: the user's digest too, beside the copy's (an older reader's key)
    assert (header["alignprop_init_lora_source_sha256"], header["alignprop_init_lora_sha256"]) == (
        theirs, sha(out / "init_lora" / "pytorch_lora_weights.safetensors"))
    # the other forms: the file itself, a run folder's LoRA, a checkpoint's weights
    kohya = next((made_lora["run"] / "kohya").glob("*.safetensors"))
    assert init_lora_source(str(kohya)) == {"file": "", "sha256": sha(kohya)}
    assert init_lora_source(str(made_lora["run"])) == {"file": "lora/pytorch_lora_weights.safetensors",
                                                       "sha256": sha(made_lora["lora"] / LORA_WEIGHT_NAME)}
    step = out / "checkpoints" / "step-00000002"
    assert init_lora_source(str(out / "checkpoints" / "step-2")) == {"file": "trainable.safetensors",
                                                                     "sha256": sha(step / "trainable.safetensors")}
    (out / "init_lora" / "source.json").unlink()  # a run from before the record: the copy's digest, as before
    assert main(["export", "--lora", str(out / "lora"), "--out", str(tmp_path / "e2")]) == 0
    copy = sha(out / "init_lora" / "pytorch_lora_weights.safetensors")
    assert f", sha256 {copy[:16]} (its own training" in (tmp_path / "e2" / "README.md").read_text()


def test_an_init_lora_of_fewer_layers_says_the_rest_start_at_zero_and_plan_names_what_it_checked(
        made_lora, tmp_path, capsys, caplog, fresh_log_handlers):
    """An attention LoRA in a run of lora_layers=attention+ff: the starting line says the feed-forward layers start at
    zero; plan --init-lora says on stderr the LoRA it checked (rank, layers), its table and --json as they were."""
    import json
    import logging
    import re

    from safetensors import safe_open

    from lowmem_alignprop.cli import main

    lora = made_lora["lora"]
    with safe_open(str(lora / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        layers = sum(k.endswith(("lora_A.weight", "lora.down.weight")) for k in f.keys())
    args = ["--profile", "cpu", "--set", "sample_steps=3", "--set", "k=1", "--set", "lora_layers=attention+ff"]
    assert main(["plan", *args, "--init-lora", str(lora)]) == 0
    said = capsys.readouterr()
    line = re.fullmatch(rf"--init-lora {re.escape(str(lora))}: rank 4, {layers} of the run's (\d+) layers; the "
                        r"other (\d+) \(not in it\) start at zero, as a fresh LoRA's; training starts from it\n",
                        said.err)
    assert line and int(line[1]) - layers == int(line[2]) > 0, said.err
    assert said.out.startswith("lowmem-alignprop plan: ") and "--init-lora" not in said.out  # the table as it was
    assert main(["plan", *args, "--json", "--init-lora", str(lora)]) == 0
    said = capsys.readouterr()  # --json: the JSON alone (plan's notes are not said)
    assert said.err == "" and isinstance(json.loads(said.out), dict)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main([*args, "--set", "sample_prompts=0", "--set", "batch_size=1", "--steps", "1", "--output-dir",
                     str(out), "--init-lora", str(lora)]) == 0
    assert f"starting from the LoRA {lora} ({layers} of the run's {line[1]} layers; the other {line[2]} (not in it) " \
        "start at zero, as a fresh LoRA's)" in caplog.text


def test_without_init_lora_step_0_is_the_base_model(made_lora, tmp_path):
    """The reference above is not the base model's image (else the test above would prove nothing)."""
    base = _images_at_step_0(_cfg(tmp_path / "run"))
    assert relative_difference(base, made_lora["images"]) > 0.01


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory, _isolated_cache):
    from midsize import build_tiny_sdxl_pipeline
    from loras import make_sd_lora

    base = tmp_path_factory.mktemp("sdxl-base")
    build_tiny_sdxl_pipeline().save_pretrained(base)
    return make_sd_lora(base, tmp_path_factory.mktemp("sdxl-run"), xl=True)


def _sd_scripts_sdxl_names(made, kohya, out):
    """Our kohya file of an SDXL LoRA as sd-scripts names SDXL's layers: ``lora_unet_`` + the original LDM module
    path (input_blocks_4_1_transformer_blocks_0_attn1_to_k), alphas kept."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.lora.lora_formats import kohya_name
    from lowmem_alignprop.models.ldm_layout import unet_to_ldm

    weights = load_file(str(kohya))
    config = UNet2DConditionModel.load_config(str(made["base"] / "unet"))
    renamed = {}
    for module in made["modules"]:
        ldm = next(iter(unet_to_ldm({f"{module}.weight": None}, config, ""))).removesuffix(".weight")
        for part in ("lora_down.weight", "lora_up.weight", "alpha"):
            renamed[f"lora_unet_{ldm.replace('.', '_')}.{part}"] = weights[f"{kohya_name(module)}.{part}"]
    assert len(renamed) == len(weights) and any("_input_blocks_" in k for k in renamed)
    save_file(renamed, str(out))
    return out


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "kohya_sd_scripts"])
def test_init_lora_of_an_sdxl_lora_starts_where_diffusers_own_loader_puts_it(layout, sdxl_lora, tmp_path):
    """An SDXL LoRA (a diffusers lora/ folder, or a UNet-only kohya file, alpha 8 over rank 4: our export's, in
    diffusers' module names, or as sd-scripts writes SDXL's, in the original input_blocks / middle_block /
    output_blocks names) starts the run's UNet exactly where diffusers' load_lora_weights puts the base UNet: the
    same ops (B @ A times a scale, B rescaled for this run's alpha = rank), so SAME_OPS."""
    from loras import unet_out
    from safetensors.torch import load_file

    from lowmem_alignprop.lora.init_lora import check_init_lora
    from lowmem_alignprop.training.train import Trainer
    from lowmem_alignprop.run.runfolder import RunFolder

    from lowmem_alignprop.cli import main

    spec = sdxl_lora["lora"]
    if layout != "diffusers":
        assert main(["export", "--lora", str(spec), "--format", "kohya", "--out", str(tmp_path / "kohya")]) == 0
        spec = next((tmp_path / "kohya").glob("*.safetensors"))
        assert all(k.startswith("lora_unet_") for k in load_file(str(spec)))  # (UNet-only)
    if layout == "kohya_sd_scripts":
        spec = _sd_scripts_sdxl_names(sdxl_lora, spec, tmp_path / "sd_scripts.safetensors")
    cfg = _cfg(tmp_path / "run", "--model", str(sdxl_lora["base"]), "--set", f"init_lora={spec}", "--seed", "5")
    trainer = Trainer(cfg, RunFolder(cfg.output_dir), PROMPTS)
    trainer.init_file = check_init_lora(cfg.init_lora, cfg.lora_rank, cfg.model, cfg.model_components, cfg.lora_layers)
    trainer.setup_accelerator()
    with run_objects_only():  # as a run loads (the load's measurement walks the run's objects, not the suite's)
        trainer.load_models()
    ours = unet_out(trainer.unet, xl=True)
    pipe = sdxl_lora["cls"].from_pretrained(str(sdxl_lora["base"]))
    pipe.load_lora_weights(str(spec))  # diffusers' own reader of either layout
    theirs = unet_out(pipe.unet, xl=True)
    assert relative_difference(theirs, sdxl_lora["base_out"]) > 0.01  # the LoRA changes the outputs
    assert_rel_close(ours, theirs, SAME_OPS, f"step 0 from an SDXL {layout} LoRA")


def test_init_lora_of_another_model_is_refused_before_the_model_loads(sdxl_lora, tmp_path, capsys, monkeypatch,
                                                                      fresh_log_handlers):
    """An SDXL LoRA given to a run of the tiny SD model: its layer shapes are fitted onto the meta model first, as plan
    fits them, so the line comes before any weight is read (it came once the model had loaded: minutes for SDXL or
    FLUX), and nothing is written."""
    from lowmem_alignprop.cli import main
    from lowmem_alignprop.training import train_setup

    def loaded(*args, **kwargs):
        raise AssertionError("the model loaded before the refusal")
    monkeypatch.setattr(train_setup, "load_components", loaded)
    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--steps", "1", "--set", "sample_prompts=0", "--set", "sample_steps=3",
                 "--output-dir", str(out), "--init-lora", str(sdxl_lora["lora"])]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: --init-lora {sdxl_lora['lora']} does not fit this "
                                                     "model: ") and not out.exists()


def test_init_lora_of_another_rank_or_architecture_is_one_line_and_writes_nothing(made_lora, sdxl_lora, made_ff_lora,
                                                                                  tmp_path, capsys, fresh_log_handlers):
    from lowmem_alignprop.cli import main

    fast = ["--profile", "cpu", "--steps", "1", "--set", "sample_prompts=0", "--set", "sample_steps=3"]
    half = tmp_path / "half.safetensors"  # a file cut short (a copy that stopped): it crashed in a traceback, exit 1
    whole = (made_lora["lora"] / "pytorch_lora_weights.safetensors").read_bytes()
    half.write_bytes(whole[: len(whole) // 2])
    from safetensors.torch import load_file, save_file

    more = load_file(str(made_lora["lora"] / "pytorch_lora_weights.safetensors"))  # + a layer this UNet lacks: diffusers
    layers = sum(k.endswith((".lora.down.weight", ".lora_A.weight")) for k in more)  # loads the rest, warns; a start
    extra = {k.replace("down_blocks.1.", "down_blocks.7."): v.clone() for k, v in more.items()  # from part of a
             if k.startswith("unet.down_blocks.1.") and ".attn1.to_q.lora" in k}  # LoRA is no start: refused
    assert len(extra) == 2
    more.update(extra)
    (tmp_path / "more").mkdir()
    save_file(more, str(tmp_path / "more" / "pytorch_lora_weights.safetensors"))
    import json
    import shutil
    theirs = tmp_path / "theirs"  # a LoRA whose run trained another model: its shape's fix says so
    shutil.copytree(made_lora["lora"], theirs)
    (theirs / "base_model.json").write_text(json.dumps({"model": "someone/other-model"}))
    kept = tmp_path / "older" / "checkpoints"  # a run's checkpoints folder, not one of them
    for step in (100, 300):
        (kept / f"step-{step:08d}").mkdir(parents=True)
    cases = [(["--init-lora", str(theirs), "--set", "lora_rank=8"],
              f"--init-lora {theirs} has rank 4 and this run trains rank 8: add --set lora_rank=4 (it was trained on "
              "someone/other-model, not --model "),(["--init-lora", str(tmp_path / "more")], f"--init-lora {tmp_path / 'more'} does not fit this model: "
              f"only {layers} of its {layers + 1} layers exist here"),
             (["--init-lora", str(half)], f"--init-lora {half}: half.safetensors is damaged or not a safetensors "
              "file ("),
             (["--init-lora", str(made_lora["lora"]), "--set", "lora_rank=8"],
              f"--init-lora {made_lora['lora']} has rank 4 and this run trains rank 8: add --set lora_rank=4"),
             (["--init-lora", str(sdxl_lora["lora"])], f"--init-lora {sdxl_lora['lora']} does not fit this model"),
             # ... and names the model its run recorded (the fix said "pass that model" without naming it)
             (["--init-lora", str(sdxl_lora["lora"])], "or another --init-lora (it was trained on "
                                                       f"{sdxl_lora['base']}, not --model "),
             (["--init-lora", str(tmp_path / "nope")], "no such file or folder"),
             (["--init-lora", str(kept)], f"--init-lora {kept} is a run's checkpoints folder: name one of its "
              f"checkpoints, e.g. --init-lora {kept / 'step-00000300'} (the newest), or the run's lora/"),
             # before the model loads, from the file's names
             (["--init-lora", str(made_ff_lora["lora"])], f"--init-lora {made_ff_lora['lora']} adapts feed-forward "
              "layers too (e.g. 'unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.lora_A.weight') "
              "and this run's LoRA is on the attention projections: add --set lora_layers=attention+ff")]
    # a DoRA (its magnitudes were dropped in silence: the run started from another LoRA), a peft adapter of another
    # type (a traceback), a LoRA of a diverged run (the run stopped blaming its reward)
    plain = load_file(str(made_lora["lora"] / "pytorch_lora_weights.safetensors"))  # (one that fits: only the change
    first = next(k for k in plain if k.endswith(".lora.down.weight"))  # below is wrong with it)
    magnitude = first.replace(".lora.down.weight", ".lora_magnitude_vector")
    weird = {"dora": {**plain, magnitude: torch.ones(8)}, "nan": {k: v.clone() for k, v in plain.items()}}
    weird["nan"][first].view(-1)[3] = float("nan")
    weird["empty"] = {}  # (a header, no tensor: an interrupted save) it named no fix
    for name, weights in weird.items():
        (tmp_path / name).mkdir()
        save_file(weights, str(tmp_path / name / "pytorch_lora_weights.safetensors"))
    kohya = tmp_path / "kohya_dora.safetensors"
    theirs_kohya = load_file(str(next((made_lora["run"] / "kohya").glob("*.safetensors"))))
    scale = next(k for k in theirs_kohya if k.endswith(".alpha")).replace(".alpha", ".dora_scale")
    save_file({**theirs_kohya, scale: torch.ones(1, 8)}, str(kohya))
    for name, change in (("peft_dora", {"use_dora": True}), ("peft_loha", {"peft_type": "LOHA"})):
        shutil.copytree(made_lora["run"] / "peft", tmp_path / name)
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**config, **change}))
    cases += [(["--init-lora", str(tmp_path / "dora")], "lora_magnitude_vector'): this trainer trains plain LoRA and "
               "cannot start from one"),
              (["--init-lora", str(kohya)], f"--init-lora {kohya} is a DoRA (its magnitude vectors, e.g. '"),
              (["--init-lora", str(tmp_path / "peft_dora")], "is a DoRA (its adapter_config.json: use_dora)"),
              (["--init-lora", str(tmp_path / "peft_loha")], f"--init-lora {tmp_path / 'peft_loha'} is a peft LOHA "
               "adapter, not a LoRA: only LoRA adapters (peft_type LORA) are read"),
              (["--init-lora", str(tmp_path / "empty")], "pytorch_lora_weights.safetensors holds no LoRA weights (no "
               "lora_A / lora_down keys): pass a LoRA of this base model (a run's lora/ folder, or a diffusers, kohya "
               "or peft LoRA file)"),
              (["--init-lora", str(tmp_path / "nan")], f"--init-lora {tmp_path / 'nan'}: 1 of its weights is NaN or "
               "infinite (e.g. in '"), (["--init-lora", str(tmp_path / "nan")], "lora.down.weight'; the run that made "
                                        "it diverged): pass another LoRA")]
    for i, (args, needle) in enumerate(cases):
        out = tmp_path / f"run{i}"
        assert_refused(main, [*fast, *args, "--output-dir", str(out)], needle, out, capsys)


@pytest.mark.parametrize("kind", ["sd_checkpoint", "flux_comfyui_checkpoint", "flux_transformer_file", "unet_folder",
                                  "unet_variant_folder", "pipeline_folder", "embedding", "embedding_sdxl",
                                  "embedding_pt", "embedding_diffusers", "embedding_diffusers_bin"])
def test_init_lora_of_a_model_or_an_embedding_says_what_it_is_before_the_model_loads(kind, tiny_dir, tmp_path, capsys,
                                                                                      monkeypatch, fresh_log_handlers):
    """A full model (a checkpoint, a transformer or UNet file, a diffusers folder) or a textual-inversion embedding
    for --init-lora: one line saying what it is and where it goes, before any model loads. An SD checkpoint's
    feed-forward names asked for lora_layers=attention+ff (then: "holds no LoRA weights"), a FLUX checkpoint under
    ComfyUI's names said "adapts 'model', a layer lowmem-alignprop does not train", a pipeline folder "holds no
    .safetensors files", a .pt embedding "holds no dictionary of tensors", a UNet folder with its fp16 variant (a hub
    SDXL's unet/; a sharded transformer/ alike) "holds several .safetensors files"; diffusers' own embedding
    (learned_embeds.safetensors / .bin: {"<cat-toy>": its vectors}) "holds no LoRA weights"."""
    import shutil

    from safetensors.torch import save_file

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.training import train_setup

    monkeypatch.setattr(train_setup, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))

    def zeros(*names):
        return {name: torch.zeros(2, 2) for name in names}

    files = {"sd_checkpoint": zeros("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
                                    "first_stage_model.decoder.conv_in.weight"),
             "flux_comfyui_checkpoint": zeros("model.diffusion_model.double_blocks.0.img_attn.qkv.weight"),
             "flux_transformer_file": zeros("transformer_blocks.0.ff.net.0.proj.weight",
                                            "single_transformer_blocks.0.proj_out.bias"),
             "embedding": zeros("emb_params"), "embedding_sdxl": zeros("clip_l", "clip_g"),
             "embedding_diffusers": {"<cat-toy>": torch.zeros(768)}}
    spec = tmp_path / f"{kind}.safetensors"
    if kind in files:
        save_file(files[kind], str(spec))
    elif kind == "embedding_diffusers_bin":  # (diffusers' example without --save_as_full_pipeline: torch.save's)
        spec = tmp_path / "learned_embeds.bin"
        torch.save({"<cat-toy>": torch.zeros(2, 1024)}, spec)
    elif kind == "embedding_pt":  # A1111's .pt embedding
        spec = tmp_path / "concept.pt"
        torch.save({"string_to_param": {"*": torch.zeros(2, 2)}, "name": "concept", "step": 100}, spec)
    elif kind == "unet_variant_folder":
        spec = shutil.copytree(tiny_dir / "unet", tmp_path / "unet")
        shutil.copy(spec / "diffusion_pytorch_model.safetensors", spec / "diffusion_pytorch_model.fp16.safetensors")
    else:
        spec = tiny_dir / "unet" if kind == "unet_folder" else tiny_dir
    model = "a full (or merged) model goes to --model; --init-lora starts from a LoRA"
    said = {"sd_checkpoint": f"--init-lora {spec} holds a model's own weights (e.g. 'first_stage_model.decoder."
                             "conv_in.weight'), not a LoRA's lora_down / lora_A: " + model,
            "flux_comfyui_checkpoint": "holds a model's own weights (e.g. 'model.diffusion_model.double_blocks.0."
                                       "img_attn.qkv.weight'), not a LoRA's lora_down / lora_A: " + model,
            "flux_transformer_file": "holds a model's own weights (e.g. 'single_transformer_blocks.0.proj_out.bias'), "
                                     "not a LoRA's lora_down / lora_A: " + model,
            "unet_folder": f"--init-lora {spec} is a model's own folder (its config.json beside "
                           "diffusion_pytorch_model.safetensors), not a LoRA: " + model,
            "unet_variant_folder": f"--init-lora {spec} is a model's own folder (its config.json beside "
                                   "diffusion_pytorch_model.safetensors), not a LoRA: " + model,
            "pipeline_folder": f"--init-lora {spec} is a diffusers model folder (its model_index.json), not a LoRA: "
                               + model,
            "embedding": f"--init-lora {spec} holds a textual-inversion embedding ('emb_params'), not a LoRA: a "
                         "trained concept's embedding, which diffusers' load_textual_inversion reads; --init-lora "
                         "starts from a LoRA (a run's lora/ folder, or a diffusers, kohya or peft LoRA file)",
            "embedding_sdxl": "holds a textual-inversion embedding ('clip_g', 'clip_l'), not a LoRA",
            "embedding_pt": "holds a textual-inversion embedding ('name', 'step', 'string_to_param'), not a LoRA",
            "embedding_diffusers": f"--init-lora {spec} holds a textual-inversion embedding ('<cat-toy>'), not a "
                                   "LoRA: a trained concept's embedding, which diffusers' load_textual_inversion reads",
            "embedding_diffusers_bin": f"--init-lora {spec} holds a textual-inversion embedding ('<cat-toy>'), not a "
                                       "LoRA"}[kind]
    out = tmp_path / "run"
    for layers in ("attention", "attention+ff"):  # (the fix it named for an SD checkpoint led to another refusal)
        assert_refused(main, ["--profile", "cpu", "--model", "tiny", "--steps", "1", "--set", "sample_prompts=0",
                              "--set", f"lora_layers={layers}", "--init-lora", str(spec), "--output-dir", str(out)],
                       said, out, capsys)


@pytest.mark.parametrize("kind", ["sd_checkpoint", "unet_folder", "unet_variant_folder", "pipeline_folder",
                                  "embedding", "embedding_bin", "embedding_diffusers", "embedding_diffusers_bin"])
def test_sample_and_export_of_a_model_or_an_embedding_say_what_it_is_as_init_lora_does(kind, tiny_dir, tmp_path,
                                                                                       capsys, monkeypatch):
    """`sample --lora` of a full model or an embedding said "holds no LoRA weights", of a diffusers pipeline folder
    "a training run that stopped before its first checkpoint", of an embedding .bin "truncated or damaged"; `export
    --lora` of a model's file "is a LoRA file already", of a pipeline folder a run that stopped, of a UNet folder
    "an interrupted run resumes with --resume latest"; sample of a UNet folder with its fp16 variant "pass the one
    you mean: --lora .../diffusion_pytorch_model.fp16.safetensors" (a model's weights too); diffusers' own
    embedding ({"<cat-toy>": its vectors}) "holds no LoRA weights" and "is a LoRA file already". Now --init-lora's
    one rule (lora_files.not_a_lora): what it is and where it goes, before the model loads."""
    import shutil

    from safetensors.torch import save_file

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.commands import sample_pipeline
    from lowmem_alignprop.lora import lora_args

    monkeypatch.setattr(sample_pipeline, "build_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    if kind in ("sd_checkpoint", "embedding", "embedding_diffusers"):  # a .safetensors file: told by its header
        monkeypatch.setattr(lora_args, "read_tensor_file", lambda *a, **k: pytest.fail("the tensors were read"))
    spec = {"unet_folder": tiny_dir / "unet", "pipeline_folder": tiny_dir}.get(kind, tmp_path / f"{kind}.safetensors")
    if kind == "sd_checkpoint":
        save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(2, 2)}, str(spec))
    elif kind == "embedding":
        save_file({"emb_params": torch.zeros(2, 2)}, str(spec))
    elif kind == "embedding_diffusers":  # (diffusers' textual_inversion example: learned_embeds.safetensors)
        save_file({"<cat-toy>": torch.zeros(768)}, str(spec))
    elif kind == "embedding_diffusers_bin":
        spec = tmp_path / "learned_embeds.bin"
        torch.save({"<cat-toy>": torch.zeros(2, 768)}, spec)
    elif kind == "embedding_bin":  # (a .bin sample reads: torch.save's)
        spec = tmp_path / "concept.bin"
        torch.save({"string_to_param": {"*": torch.zeros(2, 2)}, "name": "concept", "step": 100}, spec)
    elif kind == "unet_variant_folder":
        spec = shutil.copytree(tiny_dir / "unet", tmp_path / "unet")
        shutil.copy(spec / "diffusion_pytorch_model.safetensors", spec / "diffusion_pytorch_model.fp16.safetensors")
    folder = ("is a model's own folder (its config.json beside diffusion_pytorch_model.safetensors), not a LoRA: a "
              "full (or merged) model goes to --model; ")
    what = {"sd_checkpoint": "holds a model's own weights (e.g. 'first_stage_model.decoder.conv_in.weight'), not a "
                             "LoRA's lora_down / lora_A: a full (or merged) model goes to --model; ",
            "unet_folder": folder, "unet_variant_folder": folder,
            "pipeline_folder": "is a diffusers model folder (its model_index.json), not a LoRA: a full (or merged) "
                               "model goes to --model; ",
            "embedding": "holds a textual-inversion embedding ('emb_params'), not a LoRA: a trained concept's "
                         "embedding, which diffusers' load_textual_inversion reads; ",
            "embedding_bin": "holds a textual-inversion embedding ('name', 'step', 'string_to_param'), not a LoRA: a "
                             "trained concept's embedding, which diffusers' load_textual_inversion reads; "}.get(
        kind, "holds a textual-inversion embedding ('<cat-toy>'), not a LoRA: a trained concept's embedding, which "
              "diffusers' load_textual_inversion reads; ")
    out = tmp_path / "out"
    assert_refused(main, ["sample", "--profile", "cpu", "--lora", str(spec), "--prompt", "a cat", "--output-dir",
                          str(out)], f"error: --lora {spec} {what}--lora takes a LoRA (a run's lora/ folder, or a "
                                     "diffusers, kohya or peft LoRA file)", out, capsys)
    if not kind.endswith("_bin"):  # (export reads a run's LoRA: a .safetensors file
        for merge in ([], ["--merge"]):  # or a folder of one is "a LoRA file already", or a folder without its file)
            assert_refused(main, ["export", "--lora", str(spec), *merge, "--out", str(out)],
                           f"error: --lora {spec} {what}export --lora takes the LoRA a run wrote (its lora/ folder or "
                           "a checkpoint)", out, capsys)


def test_a_file_of_tokens_is_called_an_embedding_only_where_every_name_and_shape_says_so():
    """diffusers' own textual-inversion file is told by its names and shapes together ({"<cat-toy>": 768 wide or
    rows of 768, 1024, 1280}): a name alone, another width, a 3-D tensor or a LoRA key beside it are not one."""
    from lowmem_alignprop.lora.lora_files import not_an_adapter

    embedding = "a textual-inversion embedding ('<cat-toy>'), not a LoRA"
    assert not_an_adapter({"<cat-toy>": (768,)}) == embedding
    assert not_an_adapter({"<cat-toy>": torch.zeros(4, 1280)}) == embedding
    two = "a textual-inversion embedding ('<a>', '<b>'), not a LoRA"
    assert not_an_adapter({"<a>": (1, 1024), "<b>": (768,)}) == two
    assert not_an_adapter(["<cat-toy>"]) is None  # (names alone: no shapes)
    for other in ({"<cat-toy>": (2, 2)}, {"<cat-toy>": (1, 2, 768)}, {"<cat-toy>": (0, 768)}, {"cat-toy": (768,)},
                  {"<cat-toy>": (768,), "unet.x.lora_A.weight": (4, 768)}):
        assert not_an_adapter(other) is None, other


def test_a_torch_file_of_a_dict_with_other_keys_than_names_is_one_line_not_a_traceback(tiny_dir, tmp_path, capsys,
                                                                                        fresh_log_handlers):
    """A .bin holding a dict keyed by numbers (torch.save({0: tensor})): --init-lora raised a TypeError traceback
    (not_an_adapter searched each key as a name), and sample said "truncated or damaged". Both now say it holds no
    LoRA weights, as before not_a_lora."""
    from lowmem_alignprop.cli import main

    spec = tmp_path / "numbered.bin"
    torch.save({0: torch.zeros(2, 2)}, spec)
    out = tmp_path / "run"
    assert_refused(main, ["--profile", "cpu", "--model", "tiny", "--steps", "1", "--set", "sample_prompts=0",
                          "--init-lora", str(spec), "--output-dir", str(out)],
                   f"error: --init-lora {spec}: pytorch_lora_weights.safetensors holds no LoRA weights (no lora_A / "
                   "lora_down keys)", out, capsys)
    assert_refused(main, ["sample", "--profile", "cpu", "--lora", str(spec), "--prompt", "a cat", "--output-dir",
                          str(out)], f"error: --lora {spec}: {spec} holds no LoRA weights (no lora_A / lora.down keys)",
                   out, capsys)


@pytest.mark.parametrize("conv", ["down_blocks_0_resnets_0_conv1", "down_blocks_1_attentions_0_proj_in"])
def test_init_lora_with_convolution_layers_of_any_rank_passes_the_check_before_the_model_loads(conv, made_lora,
                                                                                                tmp_path):
    """A LoCon (3x3 convolutions) or an SD 1.x kohya LoRA of sd-scripts' default layers (the 1x1 proj_in / proj_out)
    was refused ("adapts 2 convolution layers"): a UNet run now keeps those layers as they came (fused into the
    frozen base: tests/test_init_lora_kept.py), and their rank (8 here) is not the run's to match: the check says the
    rank of the attention layers it trains (4)."""
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.lora.init_lora import check_init_lora, lora_file_ranks

    weights = load_file(str(next((made_lora["run"] / "kohya").glob("*.safetensors"))))
    kernel = 3 if "conv" in conv else 1
    for i in range(2):  # (two blocks' layers)
        name = f"lora_unet_{conv.replace('_0_', f'_{i}_', 1)}"
        weights[f"{name}.lora_down.weight"] = torch.randn(8, 32, kernel, kernel)
        weights[f"{name}.lora_up.weight"] = torch.randn(32, 8, 1, 1)
        weights[f"{name}.alpha"] = torch.tensor(4.0)
    spec = tmp_path / "locon.safetensors"
    save_file(weights, str(spec))
    file = check_init_lora(str(spec), 4, "tiny")
    assert lora_file_ranks(file, str(spec)) == {4}


def test_plan_takes_init_lora_and_checks_it_as_training_does(made_lora, made_ff_lora, tmp_path, capsys):
    """A training command with --init-lora pasted into plan was refused ("unrecognized arguments"), and a LoRA of
    another rank or layers planned FITS where training stops: plan takes it and says what training says. So does a
    LoRA of another model of the family (other widths: found only on the model, which plan builds on meta)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lowmem_alignprop.cli import main

    other = tmp_path / "other_widths" / "pytorch_lora_weights.safetensors"  # cross-attention of 48 wide text states
    other.parent.mkdir()
    with safe_open(str(made_lora["lora"] / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        widened = {k: torch.zeros(f.get_tensor(k).shape[0], 48) if ".attn2.to_k." in k and k.endswith(
            ("lora.down.weight", "lora_A.weight")) else f.get_tensor(k) for k in f.keys()}
        save_file(widened, str(other), metadata=f.metadata())
    for args, needle in ((["--set", "lora_rank=8"], "has rank 4 and this run trains rank 8: add --set lora_rank=4"),
                         (["--init-lora", str(made_ff_lora["lora"])], "adapts feed-forward layers too"),
                         (["--init-lora", str(other)], "does not fit this model: 4 of its weights have other shapes "
                          "than this model's layers (e.g. down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k: "
                          "[4, 48] in the LoRA, [4, 32] here)")):
        said = []
        for command in (["plan"], ["--steps", "1", "--output-dir", str(made_lora["run"] / "never")]):
            assert main([*command, "--profile", "cpu", "--model", "tiny", "--init-lora", str(made_lora["lora"]),
                         *args]) == 2
            said.append([x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")])
        assert said[0] == said[1] and len(said[0]) == 1 and needle in said[0][0], said
    assert main(["plan", "--profile", "cpu", "--model", "tiny", "--init-lora", str(made_lora["lora"])]) == 0


def test_plan_names_the_model_an_ill_fitting_init_lora_was_trained_on_as_training_does(made_lora, tmp_path, capsys):
    """A LoRA of other widths whose base_model.json records another model: plan's line (the LoRA fitted onto the
    model built on meta) names that model as training's does."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lowmem_alignprop.cli import main

    other = tmp_path / "other_model" / "pytorch_lora_weights.safetensors"
    other.parent.mkdir()
    with safe_open(str(made_lora["lora"] / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        save_file({k: torch.zeros(f.get_tensor(k).shape[0], 48) if ".attn2.to_k." in k and k.endswith(
            ("lora.down.weight", "lora_A.weight")) else f.get_tensor(k) for k in f.keys()}, str(other),
            metadata=f.metadata())
    (other.parent / "base_model.json").write_text(json.dumps({"model": "someone/other-model"}))
    said = []
    for command in (["plan"], ["--steps", "1", "--output-dir", str(tmp_path / "never")]):
        assert main([*command, "--profile", "cpu", "--model", "tiny", "--init-lora", str(other)]) == 2
        said.append([x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")])
    assert said[0] == said[1] and len(said[0]) == 1, said
    assert " (it was trained on someone/other-model, not --model tiny: if that is another model, pass a LoRA of " \
        "this one)" in said[0][0], said


def test_an_init_lora_of_another_sampler_is_warned_of_by_plan_and_training(made_lora, tmp_path, caplog):
    """--init-lora of a LoRA whose run sampled as v-prediction at zero terminal SNR (its base_model.json, or its
    file's header alone), in a run of an epsilon model: one warning naming both and the --set that trains as it did,
    from plan and from training before it trains; a LoRA of the same sampler: none."""
    import logging
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from lowmem_alignprop.cli import main

    def lora_of(name, **record):
        lora = tmp_path / name
        shutil.copytree(made_lora["lora"], lora)
        base = json.loads((lora / "base_model.json").read_text())
        (lora / "base_model.json").write_text(json.dumps({**base, **record}))
        return lora

    other = lora_of("vpred", prediction_type="v_prediction", zero_terminal_snr=True)
    same = lora_of("eps", prediction_type="epsilon")
    alone = tmp_path / "alone" / "shared.safetensors"  # a kohya-style file copied away: its header says it
    alone.parent.mkdir()
    with safe_open(str(made_lora["lora"] / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(alone),  # noqa: SIM118 (safe_open is no dict)
                  metadata={**f.metadata(), "alignprop_prediction_type": "v_prediction"})
    args = ["--profile", "cpu", "--model", "tiny", "--set", "sample_steps=3", "--set", "k=1"]
    warned = "was trained with"
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    for lora, said in ((other, f"--init-lora {other} was trained with prediction_type=v_prediction "
                               "zero_terminal_snr=True (its base_model.json), and this run samples with "
                               "prediction_type=epsilon zero_terminal_snr=False: it starts from a LoRA of another "
                               "sampler; --set prediction_type=v_prediction --set zero_terminal_snr=true --set eta=0 "
                               "trains as its run did"),
                       (alone, f"--init-lora {alone} was trained with prediction_type=v_prediction (its header "
                               "(alignprop_prediction_type)), and this run samples with prediction_type=epsilon"),
                       (same, None)):
        caplog.clear()
        assert main(["plan", *args, "--init-lora", str(lora)]) == 0
        lines = [r.getMessage() for r in caplog.records if warned in r.getMessage()]
        assert (lines == [said]) if said and lora == other else (said in lines[0] if said else lines == []), lines
    caplog.clear()  # the advice taken: planned without a word (zero SNR at the profile's eta 1 would be refused)
    assert main(["plan", *args, "--init-lora", str(other), "--set", "prediction_type=v_prediction", "--set",
                 "zero_terminal_snr=true", "--set", "eta=0"]) == 0
    assert warned not in caplog.text
    caplog.clear()  # training: before its first step
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")  # (plan leaves the logger at WARNING)
    assert main([*args, "--set", "sample_prompts=0", "--set", "batch_size=1", "--steps", "1", "--output-dir",
                 str(tmp_path / "run"), "--init-lora", str(other)]) == 0
    lines = [r.getMessage() for r in caplog.records if warned in r.getMessage()]
    assert len(lines) == 1 and "--set prediction_type=v_prediction --set zero_terminal_snr=true --set eta=0" in \
        lines[0], lines
    assert caplog.text.index(warned) < caplog.text.index("starting from the LoRA")


def test_which_sampler_an_init_lora_is_warned_of_and_the_set_that_trains_as_its_run_did(tmp_path):
    """other_sampler alone: a run at zero terminal SNR is told as such (the run's rescale_betas_zero_snr); an epsilon
    LoRA's fix in a zero-SNR run turns zero SNR off too (the config refuses epsilon at zero SNR), where only its
    prediction type differs (a header that says epsilon alone); a base_model.json without a prediction type (a record
    before the schedule was recorded) or one not readable tells nothing, whatever its header says."""
    from safetensors.torch import save_file

    from lowmem_alignprop.lora.base_records import read_base_record, recorded_fingerprint
    from lowmem_alignprop.lora.lora_args import LoraSpec
    from lowmem_alignprop.lora.init_lora import other_sampler

    zero_v = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    lora = tmp_path / "lora"
    lora.mkdir()
    file = lora / "pytorch_lora_weights.safetensors"
    save_file({"x": torch.zeros(1)}, str(file), metadata={"alignprop_prediction_type": "epsilon"})
    start = f"--init-lora {lora} was trained with"
    assert other_sampler(str(lora), file, zero_v, 0.0) == (
        f"{start} prediction_type=epsilon (its header (alignprop_prediction_type)), and this run samples with "
        "prediction_type=v_prediction: it starts from a LoRA of another sampler; --set prediction_type=epsilon "
        "--set zero_terminal_snr=false trains as its run did")
    record = lora / "base_model.json"
    record.write_text(json.dumps({"model": "tiny", "prediction_type": "v_prediction", "zero_terminal_snr": False}))
    assert other_sampler(str(lora), file, zero_v, 0.0) == (
        f"{start} zero_terminal_snr=False (its base_model.json), and this run samples with zero_terminal_snr=True: it "
        "starts from a LoRA of another sampler; --set zero_terminal_snr=false trains as its run did")
    assert other_sampler(str(lora), file, {"prediction_type": "v_prediction"}, 1.0) is None
    # an SD3/FLUX run (its flow-matching scheduler has no prediction type): nothing to compare, whatever the LoRA says
    assert other_sampler(str(lora), file, {"num_train_timesteps": 1000, "shift": 3.0}, 0.0) is None
    zero = tmp_path / "zero" / "pytorch_lora_weights.safetensors"  # a header that says zero SNR (sd-scripts' key)
    zero.parent.mkdir()
    save_file({"x": torch.zeros(1)}, str(zero), metadata={"ss_zero_terminal_snr": "True"})
    assert other_sampler(str(zero.parent), zero, {"prediction_type": "v_prediction"}, 1.0) == (
        f"--init-lora {zero.parent} was trained with zero_terminal_snr=True (its header (ss_zero_terminal_snr)), and "
        "this run samples with zero_terminal_snr=False: it starts from a LoRA of another sampler; --set "
        "zero_terminal_snr=true --set eta=0 trains as its run did")
    spec = LoraSpec(arg=str(lora), file=file, weight=1.0, name="a")
    for text in ('{"model": "tiny"}', "{damaged", "[]"):
        record.write_text(text)
        assert other_sampler(str(lora), file, zero_v, 0.0) is None, text
        assert recorded_fingerprint(spec) is None and (read_base_record(spec) is None) == (text != '{"model": "tiny"}')
    record.write_text(json.dumps({"model": "tiny", "prediction_type": None}))  # (no prediction type either)
    assert other_sampler(str(lora), file, zero_v, 0.0) is None


# ---------------------------------------------------------------------------------------------------------
# one run with everything on: --sample-every, tensorboard, export_format, the recorded command, checkpoints
# ---------------------------------------------------------------------------------------------------------

RUN_ARGS = ["--profile", "cpu", "--steps", "4", "--sample-every", "2", "--report-to", "tensorboard",
            "--checkpoint-every", "2", "--set", "sample_prompts=2", "--set", "sample_steps=3", "--set", "k=1",
            "--set", "batch_size=1", "--set", "keep_checkpoints=0", "--set", "export_format=kohya,peft",
            "--set", "lr=0.01", "--set", f"negative_prompt={NEGATIVE}", "--push-to-hub", "you/alignprop",
            "--reward", "brightness:1,colorfulness:0.01"]  # (a combined reward: its terms in the metrics)
HUB_CALLS: list = []  # what the run asked of the (mocked) hub
RENDERS: list = []  # the steps the run rendered the sample grid's images at (the trainer's render_samples)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_dir):
    import huggingface_hub

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.training.train import Trainer
    from lowmem_alignprop.run import hub

    out = tmp_path_factory.mktemp("full") / "run"
    render = Trainer.render_samples
    with pytest.MonkeyPatch.context() as mp:  # the hub's part is the mock's (no network here)
        mp.setattr(Trainer, "render_samples", lambda self: RENDERS.append(self.step) or render(self))
        mp.setattr(hub, "check_push_to_hub", lambda repo: HUB_CALLS.append(("check", repo)))
        mp.setattr(huggingface_hub, "create_repo", lambda repo, **kw: HUB_CALLS.append(("create", repo))
                   or f"https://huggingface.co/{repo}")
        mp.setattr(huggingface_hub, "create_commit", lambda **kw: HUB_CALLS.append(("upload", kw["repo_id"], {
            op.path_in_repo: op.path_or_fileobj for op in kw["operations"]})))  # (one commit: the folder's files)
        assert main([*RUN_ARGS, "--output-dir", str(out)]) == 0
    return out


def test_a_combined_rewards_terms_are_in_each_steps_metrics(full_run):
    """reward_mean of brightness:1,colorfulness:0.01 is their weighted sum; each term's own mean is in the row (no
    file showed which term moved)."""
    rows = strict_rows(full_run)
    assert len(rows) == 4
    for r in rows:
        terms = r["reward_terms"]
        assert sorted(terms) == ["brightness", "colorfulness"] and 0 < terms["brightness"] < 1 < terms["colorfulness"]
        assert r["reward_mean"] == pytest.approx(terms["brightness"] + 0.01 * terms["colorfulness"], rel=1e-5)


def test_sample_every_writes_a_png_and_rewards_per_sampled_step(full_run):
    import json

    from PIL import Image

    assert sorted(p.name for p in (full_run / "samples").glob("step-*.png")) == ["step-000002.png", "step-000004.png"]
    grid = Image.open(full_run / "samples" / "step-000002.png")
    assert grid.size == Image.open(full_run / "samples" / "before_after.png").size  # 2 prompts, before / step 2
    rows = {r["step"]: r for r in strict_rows(full_run)}
    assert sorted(rows) == [1, 2, 3, 4]
    sampled = sorted(s for s, r in rows.items() if "sample_rewards" in r)
    assert sampled == [2, 4]
    for s in sampled:
        assert len(rows[s]["sample_rewards"]) == 2
        assert rows[s]["sample_reward_mean"] == pytest.approx(sum(rows[s]["sample_rewards"]) / 2, rel=1e-6)
    # the same prompts and seeds as the grid: step 4's images are the "after" images of the final LoRA
    after = [i["reward_after"] for i in json.loads((full_run / "samples" / "before_after.json").read_text())["images"]]
    assert rows[4]["sample_rewards"] == pytest.approx(after, rel=1e-6)
    assert rows[2]["sample_rewards"] != pytest.approx(after, rel=1e-4)  # step 2's LoRA renders otherwise
    # rendered before training and at steps 2 and 4: the last step's are the after images (rendered twice before)
    assert RENDERS == [1, 2, 4]


def test_tensorboard_event_file_holds_the_sampled_steps_images(full_run):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # the run's event file (init_trackers writes the hyperparameters into a subfolder of their own)
    folder = full_run / "logs" / "lowmem_alignprop"
    assert list(folder.glob("events.out.tfevents.*")), list((full_run / "logs").rglob("*"))
    acc = EventAccumulator(str(folder), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("samples/during_training")
    assert [i.step for i in images] == [2, 4]
    size = Image.open(full_run / "samples" / "step-000002.png").size
    assert all((i.width, i.height) == size for i in images)
    assert [i.step for i in acc.Images("samples/before_after")] == [4]


def test_the_run_records_its_command_and_exports_at_the_end(full_run, tmp_path):
    import json
    import shlex

    from safetensors.torch import load_file

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.lora.lora_files import shared_base_record
    from lowmem_alignprop.lora.model_card import shared_command
    from lowmem_alignprop.run.filenames import LORA_BASE_FILE

    recorded = (full_run / "command.txt").read_text().splitlines()
    assert recorded == ["LOWMEM_ALIGNPROP_MODEL=tiny lowmem-alignprop " + shlex.join(  # (the suite's model)
        [*RUN_ARGS, "--output-dir", str(full_run)])]
    kohya = list((full_run / "export" / "kohya").glob("*.safetensors"))
    assert len(kohya) == 1 and (full_run / "export" / "peft" / "adapter_model.safetensors").is_file()
    card = (full_run / "export" / "kohya" / "README.md").read_text()
    local = (full_run / "export" / "peft" / "README.md").read_text()
    assert recorded[0] in local  # the model card's command is the real one
    assert shared_command(recorded[0]) in card and str(full_run) not in card  # pushed: its paths by name
    assert '"you/alignprop"' in card and "THIS_FOLDER" not in card  # pushed: its code loads from the repository
    assert "THIS_FOLDER" in local  # not pushed: the reader's copy
    # the same files as the export command writes from lora/
    assert main(["export", "--lora", str(full_run / "lora"), "--format", "kohya", "--out", str(tmp_path / "k")]) == 0
    again = load_file(str(next((tmp_path / "k").glob("*.safetensors"))))
    ours = load_file(str(kohya[0]))
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)
    assert not list(full_run.rglob(".*.tmp")) and not list((full_run / "export").glob(".*"))  # no temporary leftovers
    # --push-to-hub: checked before training, the first export (its model card with it) uploaded at the end
    kohya_dir = full_run / "export" / "kohya"
    assert HUB_CALLS[:2] == [("check", "you/alignprop"), ("create", "you/alignprop")] and len(HUB_CALLS) == 3
    (what, repo, files), local_base = HUB_CALLS[2], (kohya_dir / LORA_BASE_FILE).read_text()
    assert (what, repo, sorted(files)) == ("upload", "you/alignprop", sorted(p.name for p in kohya_dir.iterdir()))
    assert all(files[n] == str(kohya_dir / n) for n in files if n != LORA_BASE_FILE)
    # base_model.json uploaded with its local paths by name (test_lora_export tests which), the local one as written
    assert json.loads(files[LORA_BASE_FILE]) == shared_base_record(json.loads(local_base))
    summary = json.loads((full_run / "summary.json").read_text())  # what a script reads: exports and the upload
    assert summary["exports"] == {"kohya": str(full_run / "export" / "kohya"), "peft": str(full_run / "export" / "peft")}
    assert summary["pushed_to_hub"] == {"repo": "you/alignprop", "url": "https://huggingface.co/you/alignprop",
                                        "failed": None}
    from lowmem_alignprop.run.tensor_files import read_safetensors_metadata
    header = read_safetensors_metadata(kohya[0])  # the final reward: the mean of the run's last reward_window steps
    assert summary["reward_window"] < summary["reward_steps"] == 4, summary
    assert (float(header["alignprop_final_reward"]), header["alignprop_final_reward_steps"]) == (
        pytest.approx(summary["reward_last"], rel=1e-5), str(summary["reward_window"]))  # (6 digits written)


def test_training_on_says_the_exports_are_of_the_earlier_lora(full_run, tmp_path, caplog, capsys):
    """--resume of the finished run with more steps: lora/ is the new LoRA, the exports of the old one stay (nothing
    is overwritten) and the run names them as older; this LoRA's exports go beside them, and the end-of-run box,
    printed after them, names them."""
    import logging
    import shutil

    from lowmem_alignprop.cli import main

    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    before = {p.name: p.read_bytes() for p in (run / "export" / "kohya").iterdir()}
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main(["--resume", "latest", "--output-dir", str(run), "--steps", "5", "--set", "push_to_hub=",
                     "--report-to", "none", "--sample-every", "0"]) == 0
    said = [r.getMessage() for r in caplog.records if "earlier LoRA" in r.getMessage()]
    assert said == [f"{run / 'export' / 'kohya'}, {run / 'export' / 'peft'}: exported from this run's earlier LoRA "
                    "(their README.md says at which step); this LoRA's exports are written beside them"], said
    assert {p.name: p.read_bytes() for p in (run / "export" / "kohya").iterdir()} == before
    assert "| steps | 5 |" in (run / "export" / "kohya-2" / "README.md").read_text()
    box = capsys.readouterr().out.rstrip().splitlines()
    assert box[-1] == "=" * 64 and box[-2] == "        export/kohya-2/, export/peft-2/", box[-4:]
    # a checkpoint's model card quotes the starts that trained it: step 2's the first command only, step 5's the
    # --resume too
    first, resumed = (run / "command.txt").read_text().splitlines()
    for step, commands in ((2, [first]), (5, [first, resumed])):
        out = tmp_path / f"card{step}"
        assert main(["export", "--lora", str(run / "checkpoints" / f"step-{step}"), "--format", "kohya", "--out",
                     str(out)]) == 0
        card = (out / "README.md").read_text()
        assert [c for c in (first, resumed) if c in card] == commands, (step, card)


def test_an_export_of_the_same_lora_is_told_by_its_weights_not_its_time(full_run, tmp_path, caplog):
    """The ended run's lora/ and one export lost, resumed: lora/ is written again (new times, the same weights) and
    only the lost export with it; the kept one is of this LoRA (its base_model.json records the LoRA's digest, a
    merged model's record its own). By the files' times they were "exported from this run's earlier LoRA", and the
    kohya one written again beside itself (kohya-2)."""
    import json
    import logging
    import shutil

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.lora.lora_files import lora_digest, read_lora
    from lowmem_alignprop.lora.lora_formats import EXPORTED_FROM

    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    lora = (run / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    recorded = json.loads((run / "export" / "kohya" / "base_model.json").read_text())[EXPORTED_FROM]
    assert recorded == lora_digest(read_lora(str(run / "lora")))
    assert main(["export", "--lora", str(run / "lora"), "--merge"]) == 0  # into RUN/export/merged
    shutil.rmtree(run / "lora")
    shutil.rmtree(run / "export" / "peft")
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main(["--resume", "latest", "--output-dir", str(run), "--set", "push_to_hub=", "--report-to",
                     "none"]) == 0
    assert (run / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == lora
    assert sorted(p.name for p in (run / "export").iterdir()) == ["kohya", "merged", "peft"]
    assert "earlier LoRA" not in caplog.text
    # again, now uploading: the upload's export is written anew (its model card names the repository), the other kept
    import os

    import huggingface_hub

    from lowmem_alignprop.run import hub

    shutil.rmtree(run / "lora")
    uploaded = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hub, "check_push_to_hub", lambda repo: None)
        mp.setattr(huggingface_hub, "create_repo", lambda repo, **kw: f"https://huggingface.co/{repo}")
        mp.setattr(huggingface_hub, "create_commit", lambda **kw: uploaded.append(
            {os.path.dirname(op.path_or_fileobj) for op in kw["operations"] if isinstance(op.path_or_fileobj, str)}))
        assert main(["--resume", "latest", "--output-dir", str(run), "--set", "push_to_hub=you/again", "--report-to",
                     "none"]) == 0
    assert sorted(p.name for p in (run / "export").iterdir()) == ["kohya", "kohya-2", "merged", "peft"]
    assert uploaded == [{str(run / "export" / "kohya-2")}]
    assert '"you/again"' in (run / "export" / "kohya-2" / "README.md").read_text()


def test_sample_accepts_a_training_checkpoint(full_run, tmp_path):
    import json

    from lowmem_alignprop.cli import main

    common = ["sample", "--profile", "cpu", "--set", "sample_steps=3", "--num-prompts", "1"]

    def lora_rewards(spec, name):
        out = tmp_path / name
        assert main([*common, "--lora", str(spec), "--output-dir", str(out)]) == 0
        return [r for p in json.loads((out / "sample_results.json").read_text())["per_prompt"] for r in p["lora"]]

    final = lora_rewards(full_run / "lora", "final")
    # the last checkpoint holds the final LoRA; written by its step number or as the folder is named
    assert lora_rewards(full_run / "checkpoints" / "step-4", "ckpt4") == final
    assert lora_rewards(full_run / "checkpoints" / "step-00000002", "ckpt2") != pytest.approx(final, rel=1e-4)


def test_a_kohya_file_shared_alone_samples_as_its_run_did(full_run, tmp_path, caplog):
    """The run's kohya export copied away alone (no base_model.json; what ComfyUI users share): `sample FILE --model
    M` renders with the image settings its header records (the run's sample_steps 3 and negative prompt, not the
    profile's): the same sampler settings and rewards as the run's lora/."""
    import json
    import logging
    import shutil

    from lowmem_alignprop.cli import main

    alone = tmp_path / "shared" / "mine.safetensors"
    alone.parent.mkdir()
    shutil.copy2(next((full_run / "export" / "kohya").glob("*.safetensors")), alone)
    results = {}
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    for name, spec in (("run", full_run / "lora"), ("alone", alone)):
        out = tmp_path / name
        assert main(["sample", "--profile", "cpu", "--model", "tiny", "--num-prompts", "1", "--lora", str(spec),
                     "--output-dir", str(out)]) == 0
        results[name] = json.loads((out / "sample_results.json").read_text())
    assert results["alone"]["sampler"] == results["run"]["sampler"]
    sampler = results["alone"]["sampler"]
    assert (sampler["sample_steps"], sampler["negative_prompt"]) == (3, NEGATIVE)
    assert results["alone"]["lora_mean"] == results["run"]["lora_mean"]
    assert results["alone"]["reward"] == results["run"]["reward"] == "brightness:1,colorfulness:0.01"  # (its run's)
    assert f"--lora {alone} has no base_model.json beside it: its header (alignprop_image_settings, " \
           "alignprop_reward) says its run sampled with " in caplog.text


@pytest.mark.parametrize("sets, needle", [
    (["export_format=kohya,kohyaa"], "export_format: 'kohyaa' is not one of diffusers, kohya, peft: use --set "
                                     "export_format=kohya"),
    (["export_format=peft", "train_unet=full"], "export_format exports a LoRA and train_unet=full"),
    # (the fix as --set: the sample_every of a resumed run's checkpoint was never typed as --sample-every)
    (["sample_every=5", "sample_prompts=0"], "sample_every=5 renders the sample prompts, and sample_prompts=0: use "
                                             "--set sample_prompts=4, or --set sample_every=0"),
    (["init_lora=x", "train_unet=full"], "init_lora starts LoRA training from a LoRA"),
    (["push_to_hub=you/lora"], "--push-to-hub you/lora: the Hugging Face hub is switched off here"),
    (["push_to_hub=you/lora", "train_unet=full"], "push_to_hub exports a LoRA and train_unet=full"),
])
def test_training_output_settings_that_cannot_work_are_one_line(sets, needle, tmp_path, capsys, fresh_log_handlers):
    from lowmem_alignprop.cli import main

    out = tmp_path / "run"
    args = ["--profile", "cpu", "--output-dir", str(out)] + [a for s in sets for a in ("--set", s)]
    assert_refused(main, args, needle, out, capsys)


def test_the_trainer_renders_with_the_negative_prompt(tiny_pipe, tmp_path):
    """The trainer's prompt encoder (training steps and sample images alike) carries negative_prompt."""
    from lowmem_alignprop.models.sampling import decode, initial_latents, rollout

    cfg = _cfg(tmp_path / "run", "--set", f"negative_prompt={NEGATIVE}")
    images = _images_at_step_0(cfg)
    comps, pipe = tiny_pipe
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        comps.scheduler.set_timesteps(cfg.sample_steps)
        lat = initial_latents(len(PROMPTS), comps.unet, comps.vae, cfg.resolution, g, "cpu")
        emb = encode_prompts(pipe, PROMPTS, "cpu", cfg.resolution, negative_prompt=NEGATIVE)
        ref = decode(comps.vae, rollout(comps.unet, comps.scheduler, lat, emb, k=0, guidance_scale=cfg.guidance_scale,
                                        eta=cfg.eta, generator=g))
    assert_rel_close(images, ref, SAME_OPS, "trainer's images with the negative prompt")


def test_export_of_a_checkpoint_is_that_steps_lora(full_run, tmp_path):
    """export --lora checkpoints/step-N: the LoRA of step N, named after it; the last checkpoint's is the run's."""
    from safetensors.torch import load_file

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.lora import lora_export as lx
    from lowmem_alignprop.lora.lora_files import read_lora

    lora = read_lora(str(full_run / "checkpoints" / "step-2"))
    assert lora.step == 2 and lora.run == full_run
    assert lx.default_out(lora, "kohya", False) == full_run / "export" / "kohya-step-2"

    def kohya(step):
        out = tmp_path / f"k{step}"
        assert main(["export", "--lora", str(full_run / "checkpoints" / f"step-{step}"), "--format", "kohya",
                     "--out", str(out)]) == 0
        return out, load_file(str(out / f"{full_run.name}_step{step}_alignprop_lora.safetensors"))

    out2, step2 = kohya(2)
    _, step4 = kohya(4)
    final = load_file(str(next((full_run / "export" / "kohya").glob("*.safetensors"))))
    assert step4.keys() == final.keys() and all(torch.equal(step4[k], final[k]) for k in final)
    assert any(not torch.equal(step2[k], final[k]) for k in final if k.endswith(".lora_up.weight"))
    card = (out2 / "README.md").read_text()
    assert "| steps | 2 |" in card and "![before training and at step 2, same seeds](step-000002.png)" in card
    assert (out2 / "step-000002.png").read_bytes() == (full_run / "samples" / "step-000002.png").read_bytes()


@pytest.mark.parametrize("error", ["oom", "reward"])
def test_samples_that_fail_mid_run_are_skipped_and_training_goes_on(error, tmp_path):
    """Out of memory, or the reward's error, while rendering step N's samples: no samples that step, no crash."""
    from lowmem_alignprop.training.train import Trainer
    from lowmem_alignprop.memory.placement import Placement
    from lowmem_alignprop.run.runfolder import RunFolder
    from lowmem_alignprop.settings.errors import UserError

    cfg = _cfg(tmp_path / "run", "--set", "sample_every=2")
    trainer = Trainer(cfg, RunFolder(cfg.output_dir), PROMPTS)
    trainer.before, trainer.sample_prompts = (torch.zeros(2, 3, 8, 8), torch.zeros(2)), PROMPTS
    trainer.place, trainer.vae, trainer.reward = Placement(torch.device("cpu"), offload=False), None, None
    calls = []

    def fail(prompts, seed):
        calls.append(seed)
        raise torch.OutOfMemoryError("CUDA out of memory") if error == "oom" else UserError("the reward raised")

    trainer.generate = fail
    assert trainer.sample_if_due(1) == {} and calls == []  # not a sampled step
    assert trainer.sample_if_due(2) == {} and len(calls) == 1
    assert not (tmp_path / "run" / "samples").exists()


def test_held_out_evaluation_and_sample_grid_render_through_one_fixed_seed_loop(tmp_path):
    """evaluation.render_fixed_seed: chunk i of the prompts is sampled with seed + i and the images and rewards come
    back in prompt order; the held-out evaluation renders in batch_size chunks, image n with seed + EVAL_SEED_OFFSET + n
    (its chunks' seeds made its figures depend on batch_size: 67.83 at 4, 69.56 at 2 for one LoRA), the
    sample grid (before, step N, after) in chunks of a micro-batch (of JUDGE_PIXELS at small resolutions), image n with
    seed + SAMPLE_SEED_OFFSET + n. Out of memory skips the grid, but not under ZeRO-3 with several processes, where
    every rank renders together (one rank's skip would leave the others waiting in a collective)."""
    from lowmem_alignprop.training import evaluation as ev
    from lowmem_alignprop.training.train import Trainer
    from lowmem_alignprop.run.runfolder import RunFolder

    calls = []

    def sample(prompts, seed):
        calls.append((list(prompts), seed))
        return torch.full((len(prompts), 3, 2, 2), float(seed)), torch.full((len(prompts),), float(seed))

    images, rewards = ev.render_fixed_seed(sample, list("abcde"), 100, 2)
    assert calls == [(["a", "b"], 100), (["c", "d"], 101), (["e"], 102)]
    assert rewards.tolist() == [100, 100, 101, 101, 102] and images[:, 0, 0, 0].tolist() == rewards.tolist()
    calls.clear()  # per_image (the toy world's judged images): image n's own seed + n, whatever the chunks
    def sample_each(prompts, seeds):
        calls.append((list(prompts), seeds))
        return torch.tensor(seeds, dtype=torch.float32).reshape(-1, 1, 1, 1), torch.tensor(seeds, dtype=torch.float32)

    for chunk in (2, 3):
        assert ev.render_fixed_seed(sample_each, list("abcde"), 100, chunk, per_image=True)[1].tolist() == \
            [100, 101, 102, 103, 104]
    assert calls == [(["a", "b"], [100, 101]), (["c", "d"], [102, 103]), (["e"], [104]),
                     (["a", "b", "c"], [100, 101, 102]), (["d", "e"], [103, 104])]
    cfg = _cfg(tmp_path / "run", "--set", "batch_size=2", "--seed", "7")
    calls.clear()
    metrics = ev.HeldOut(cfg, list("abc"), tmp_path, sample=sample_each, write_lora=None).evaluate()
    first = 7 + ev.EVAL_SEED_OFFSET
    assert calls == [(["a", "b"], [first, first + 1]), (["c"], [first + 2])]
    assert metrics["eval_reward"] == pytest.approx(first + 1, rel=1e-9)
    calls.clear()  # another batch size: the same images
    assert ev.HeldOut(dataclasses.replace(cfg, batch_size=3), list("abc"), tmp_path, sample=sample_each,
                      write_lora=None).evaluate() == metrics
    assert calls == [(["a", "b", "c"], [first, first + 1, first + 2])]
    trainer = Trainer(cfg, RunFolder(cfg.output_dir), PROMPTS)
    trainer.generate, trainer.sample_prompts = sample_each, PROMPTS
    calls.clear()
    first = 7 + ev.SAMPLE_SEED_OFFSET
    assert trainer.render_samples()[1].tolist() == [first, first + 1]
    assert calls == [(PROMPTS, [first, first + 1])]  # 64 px: JUDGE_PIXELS' 32 images at a time
    trainer.cfg = dataclasses.replace(cfg, resolution=512, batch_size=1)  # a micro-batch at a time
    trainer.sample_prompts = list("abc")
    calls.clear()
    assert trainer.render_samples()[1].tolist() == [first, first + 1, first + 2]
    assert calls == [(["a"], [first]), (["b"], [first + 1]), (["c"], [first + 2])]

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory")
    trainer.place = trainer.vae = trainer.reward = None
    trainer.skip_out_of_memory = lambda what, smaller: calls.append(("skipped", what))
    trainer.render_together = False
    assert trainer.render_or_skip(out_of_memory, "rendering", "less") is None and calls[-1] == ("skipped", "rendering")
    trainer.render_together = True  # ZeRO-3, several processes
    with pytest.raises(torch.OutOfMemoryError):
        trainer.render_or_skip(out_of_memory, "rendering", "less")


def test_the_judged_images_are_image_n_with_seed_plus_eval_offset_plus_n(tmp_path, monkeypatch):
    """docs/toy_world.md: judged image n is prompt n with seed + EVAL_SEED_OFFSET + n (not the sample grid's seeds),
    in chunks of nograd_chunk; its reward is image n's."""
    from lowmem_alignprop.training import evaluation as ev
    from lowmem_alignprop.training.train import Trainer
    from lowmem_alignprop.run.runfolder import RunFolder
    from lowmem_alignprop.toy import fidelity

    calls = []

    def sample_each(prompts, seeds, **_):
        calls.append((list(prompts), seeds))
        return torch.tensor(seeds, dtype=torch.float32).reshape(-1, 1, 1, 1), torch.tensor(seeds, dtype=torch.float32)

    monkeypatch.setattr(fidelity, "evaluate_batch", lambda images, prompts: {"fidelity_all_ok": 0.25})
    cfg = _cfg(tmp_path / "run", "--set", "batch_size=2", "--seed", "7", "--set", "resolution=512")
    trainer = Trainer(cfg, RunFolder(cfg.output_dir), PROMPTS)
    trainer.generate, trainer.samples_here, trainer.judge_prompts = sample_each, True, list("abc")
    judged = trainer.judge()
    first = 7 + ev.EVAL_SEED_OFFSET
    assert calls == [(["a", "b"], [first, first + 1]), (["c"], [first + 2])]  # 512 px: a micro-batch at a time
    assert judged["image_rewards"] == [first, first + 1, first + 2]
    assert judged["reward"] == pytest.approx(first + 1) and judged["fidelity_all_ok"] == 0.25


def test_a_resumed_run_samples_and_saves_at_the_steps_counted_from_step_0(tmp_path):
    """--sample-every 2 and --checkpoint-every 2 in a 7-step run fall on steps 2, 4, 6 (and the checkpoint also on
    the last, 7), in a run resumed at step 3 too (counted from the resume, they fell on 5 and 7: the grids and
    checkpoints of a resumed run were not those of the run it continues)."""
    from types import SimpleNamespace

    from lowmem_alignprop.training.train import Trainer
    from lowmem_alignprop.run.runfolder import RunFolder

    cfg = _cfg(tmp_path / "run", "--set", "sample_every=2", "--set", "checkpoint_every=2", "--steps", "7")
    for start in (0, 3):
        trainer = Trainer(cfg, RunFolder(cfg.output_dir), PROMPTS,
                          point=SimpleNamespace(step=start, state={}) if start else None)
        trainer.before, trainer.is_main = (torch.zeros(2, 3, 8, 8), torch.zeros(2)), False
        trainer.generate = lambda prompts, seeds: (torch.zeros(len(prompts), 3, 8, 8), torch.tensor(seeds, dtype=torch.float32))
        trainer.accelerator = SimpleNamespace(num_processes=1)
        saved = []
        trainer.save_checkpoint = lambda step: saved.append(step) or tmp_path
        steps = range(start + 1, cfg.steps + 1)
        assert [s for s in steps if trainer.sample_if_due(s)] == [s for s in (2, 4, 6) if s > start], start
        assert [s for s in steps if trainer.save_if_due(s)] == [] and saved == [s for s in (2, 4, 6, 7) if s > start]


def test_each_micro_batch_draws_the_next_rollouts_of_a_shuffled_pass(tmp_path, monkeypatch):
    """prompt_order=shuffled with batch_size 2 and grad_accum 2: step 1's two micro-batches and step 2's hold the 8
    prompts of one pass, each once (rollout n is place n of the pass: with the micro-batch left out of n, a step's
    second micro-batch trained the first's next prompts again and a pass's prompts were skipped)."""
    import random
    from contextlib import nullcontext
    from types import SimpleNamespace

    from lowmem_alignprop.training import train as train_mod
    from lowmem_alignprop.run.runfolder import RunFolder

    prompts = [f"prompt {i}" for i in range(8)]
    cfg = _cfg(tmp_path / "run", "--set", "batch_size=2", "--set", "grad_accum=2", "--set", "prompt_order=shuffled")
    trainer = train_mod.Trainer(cfg, RunFolder(cfg.output_dir), prompts)
    trainer.accelerator = SimpleNamespace(step=0, accumulate=lambda model: nullcontext(), num_processes=1,
                                          gather=lambda t: t, sync_gradients=False)
    trainer.unet_train, trainer.device, trainer.rank, trainer.rank_seed = None, "cpu", 0, 7
    trainer.rng, trainer.rollout = random.Random(0), lambda cfg: None
    trainer.metrics_row = lambda *args: {}
    trainer.learning_rate = SimpleNamespace(at=lambda step: None)
    drawn = []

    def micro_step(rollout, batch_prompts, **kw):
        drawn.append(list(batch_prompts))
        return SimpleNamespace(bad=None, rewards=torch.zeros(len(batch_prompts)), loss=torch.zeros(()), terms={})

    monkeypatch.setattr(train_mod, "micro_step", micro_step)
    for step in (1, 2):
        trainer.train_step(step)
    assert len(drawn) == 4 and all(len(d) == 2 for d in drawn)
    assert sorted(sum(drawn, [])) == prompts  # one pass: every prompt once
    assert sum(drawn, []) == train_mod.draw_prompts(prompts, "shuffled", random.Random(0), 0, 8, 7)


def test_each_before_after_image_is_rendered_again_alone_by_sample_with_its_seed(tmp_path, tiny_dir, capsys):
    """before_after.json gives each image its own seed: `sample RUN/lora --seed S --prompt P` renders that image
    again (the same reward), alone (the grid drew its batch from one generator, which nothing could reproduce). The
    held-out evaluation's images likewise: `sample RUN/best --prompts FILE --seed <seed + 54321>` scores them as the
    evaluation did (its chunks' seeds made that impossible, and its figure depend on batch_size)."""
    import json

    from lowmem_alignprop.cli import main

    run, held = tmp_path / "run", tmp_path / "held.txt"
    held.write_text("a red house\na blue boat\na green tree\n")
    assert main(["--profile", "cpu", "--model", str(tiny_dir), "--steps", "1", "--output-dir", str(run), "--reward",
                 "brightness", "--set", "sample_prompts=3", "--set", "sample_steps=3", "--set", "k=1", "--seed", "3",
                 "--eval-every", "1", "--set", f"eval_prompts={held}", "--set", "batch_size=2"]) == 0
    images = json.loads((run / "samples" / "before_after.json").read_text())["images"]
    assert [i["seed"] for i in images] == [images[0]["seed"] + n for n in range(3)]
    second = images[1]
    out = tmp_path / "again"
    assert main(["sample", str(run / "lora"), "--reward", "brightness", "--seed", str(second["seed"]), "--prompt",
                 second["prompt"], "--output-dir", str(out)]) == 0, capsys.readouterr().err[-2000:]
    again = json.loads((out / "sample_results.json").read_text())["per_prompt"][0]["lora"]
    assert again == pytest.approx([second["reward_after"]], rel=1e-5)
    evaluated = json.loads((run / "best" / "best.json").read_text())
    assert main(["sample", str(run / "best"), "--reward", "brightness", "--prompts", str(held), "--num-prompts", "3",
                 "--seed", str(3 + 54321), "--output-dir", str(tmp_path / "held")]) == 0
    rows = json.loads((tmp_path / "held" / "sample_results.json").read_text())["per_prompt"]
    assert [r["prompt"] for r in rows] == held.read_text().split("\n")[:3]
    assert sum(r["lora"][0] for r in rows) / 3 == pytest.approx(evaluated["eval_reward"], rel=1e-5)


def test_the_end_box_names_every_file_and_folder_the_run_wrote(full_run, capsys):
    """The box's 'wrote:' lines name each entry of the run folder (command.txt and prompts.json were left out);
    memory_report.{json,md,png} names the three."""
    import re

    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.lora.lora_export import Exported
    from lowmem_alignprop.training.run_summary import print_summary

    summary = json.loads((full_run / "summary.json").read_text())
    folders = {fmt: full_run / "export" / fmt for fmt in ("kohya", "peft")}
    print_summary(summary, Config(report_to="tensorboard"), "cpu", Exported(folders=folders))
    box = capsys.readouterr().out.split(" wrote: ", 1)[1].replace("memory_report.{json,md,png}", "memory_report")
    said = {name.strip().rstrip("/") for name in re.split(r"[,\n]| \(", box)}
    for entry in (e for e in full_run.iterdir() if not e.name.startswith(".")):
        name = "memory_report" if entry.name.startswith("memory_report.") else entry.name
        assert name in said or f"{full_run}/{name}" in said or f"{name}/kohya" in said, (entry.name, box)


def test_the_run_writes_only_keys_docs_outputs_md_names(full_run):
    """A key added to summary.json, a metrics.jsonl line, memory_report.json, prompts.json, before_after.json or a
    base_model.json without its row in docs/outputs.md fails here (scripts read these files as a contract)."""
    import re

    from outputs_doc import DOC, problems

    text = DOC.read_text(encoding="utf-8")
    assert problems(full_run, text) == {}, "keys the run wrote that docs/outputs.md does not name"
    # the check bites: the doc without one row of each file's table
    for name, row in (("summary.json", "reward_window"), ("metrics.jsonl", "k_all"),
                      ("memory_report.json", "fits_basis"), ("samples/before_after.json", "images[].reward_after"),
                      ("prompts.json", "held_out")):
        cut = re.sub(rf"^\| `{re.escape(row)}` \|.*\n", "", text, count=1, flags=re.M)
        assert cut != text, row
        assert problems(full_run, cut) == {name: [row]}

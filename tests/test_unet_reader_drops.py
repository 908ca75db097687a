"""Layers of an SD 1.x/2.x/SDXL (UNet) LoRA file that diffusers' reader leaves out without a word: sgm block names
(``lora_unet_input_blocks_``) beside diffusers' (``lora_unet_down_blocks_``: the sgm ones popped), a key of another
prefix beside kohya's names (the kohya conversion skipped: every layer left out), kohya names beside diffusers'
``unet.`` ones, ``unet.`` names beside another prefix; kohya encoder layers diffusers has no name for (the embeddings,
the first CLIP's text_projection); a key of no LoRA (ComfyUI's ``.diff``, a norm's weight). sample and --init-lora
refused them with "does not fit this model ... it was trained for another base model" (the file's layer count caught
the drop, naming the wrong cause) or "Could not automatically infer state dict type", and a kohya file whose CLIP
layers lack out_proj (converted by diffusers' reader first) loaded without its sgm layers. Now one line names the
layer; such a layer that changes nothing (all zeros) is left out and the rest loads."""

import functools

import pytest
import torch
from loras import lora_layer
from midsize import build_tiny_sdxl_pipeline
from safetensors.torch import save_file

from lowmem_alignprop.lora.adapters import adapted_layers, load_adapters
from lowmem_alignprop.lora.init_lora import init_lora_file, split_init_lora
from lowmem_alignprop.lora.kohya_layers import comfy_encoder_refusal, weight_difference_refusal
from lowmem_alignprop.lora.lora_args import parse_lora
from lowmem_alignprop.lora.lora_formats import unet_left_out_refusal
from lowmem_alignprop.models.tiny import build_tiny_pipeline
from lowmem_alignprop.settings.errors import UserError

W = 64  # the width of both tiny UNets' attention block (down_blocks.1), where every layer below is
ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA = "lora_unet_" + ATTN.replace(".", "_")
SGM = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_k"  # down_blocks.1's attention in sgm's numbering
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # (no out_proj: diffusers' reader converts it first)
TE1_OUT = "lora_te1_text_model_encoder_layers_0_self_attn_out_proj"
DOWN = ".lora_down.weight"


_layer = functools.partial(lora_layer, alpha=4.0)


# case: (model, the file's tensors with the left-out layer's up filled with ``fill``, the key the line names, kind)
CASES = {
    "sgm beside diffusers blocks, CLIP without out_proj": (
        "sd", lambda f: _layer(KOHYA, W, W) | _layer(SGM, W, W, f) | _layer(TE_Q, 32, 32), SGM + DOWN, "left out"),
    "sgm beside diffusers blocks (SDXL)": ("sdxl", lambda f: _layer(KOHYA, W, W) | _layer(SGM, W, W, f),
                                           SGM + DOWN, "left out"),
    "another prefix in a kohya file": ("sd", lambda f: _layer(KOHYA, W, W) | _layer("lora_foo_bar", W, W, f),
                                       "lora_foo_bar" + DOWN, "left out"),
    "kohya beside unet.": ("sd", lambda f: _layer("unet." + ATTN, W, W, kohya=False) | _layer(
        SGM.replace("input_blocks_3_1", "down_blocks_1_attentions_0"), W, W, f),
        SGM.replace("input_blocks_3_1", "down_blocks_1_attentions_0") + DOWN, "left out"),
    "another prefix beside unet.": ("sd", lambda f: _layer("unet." + ATTN, W, W, kohya=False) | _layer(
        "foo." + ATTN, W, W, f, kohya=False), f"foo.{ATTN}.lora_A.weight", "left out"),
    "kohya CLIP position_embedding": ("sd", lambda f: _layer(KOHYA, W, W) | _layer(
        "lora_te_text_model_embeddings_position_embedding", 16, 32, f),
        "lora_te_text_model_embeddings_position_embedding" + DOWN, "encoder"),
    "kohya CLIP-L text_projection (SDXL)": ("sdxl", lambda f: _layer(KOHYA, W, W) | _layer(TE1_OUT, 32, 32) | _layer(
        "lora_te1_text_projection", 32, 32, f), "lora_te1_text_projection" + DOWN, "encoder"),
}
MODELS = {"sd": build_tiny_pipeline, "sdxl": build_tiny_sdxl_pipeline}


def _file(tmp_path, tensors):
    file = tmp_path / "lora.safetensors"
    save_file(tensors, str(file))
    return file


def _refused(model, file):
    """The line of sample's load and of --init-lora's, each."""
    loads = {f"--lora {file}": lambda: load_adapters(MODELS[model](), [parse_lora(str(file), 0)], "t"),
             f"--init-lora {file}": lambda: split_init_lora(MODELS[model](), init_lora_file(str(file)), str(file),
                                                            "attention+ff")}
    lines = {}
    for label, load in loads.items():
        with pytest.raises(UserError) as refused:
            load()
        lines[label] = str(refused.value)
    return lines


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_a_layer_diffusers_unet_reader_leaves_out_is_one_line(case, tmp_path):
    model, tensors, key, kind = CASES[case]
    for label, line in _refused(model, _file(tmp_path, tensors(None))).items():
        assert line == (f"{label} {comfy_encoder_refusal(key)}" if kind == "encoder" else
                        unet_left_out_refusal(label, key)), label


@pytest.mark.parametrize("key, line", [
    ("lora_unet_conv_in.diff", lambda label: f"{label} {weight_difference_refusal('lora_unet_conv_in.diff')}"),
    ("lora_unet_down_blocks_1_attentions_0_norm.w_norm", lambda label: (
        f"{label} holds 'lora_unet_down_blocks_1_attentions_0_norm.w_norm', not a LoRA's lora_down / lora_up / "
        "alpha: pass a plain LoRA"))])
def test_bad_input_a_key_of_no_lora_in_a_kohya_unet_file_is_one_line(key, line, tmp_path):
    """diffusers' kohya reader raised "The following keys have not been correctly renamed", which sample and
    --init-lora said as "does not fit this model ... it was trained for another base model"."""
    file = _file(tmp_path, _layer(KOHYA, W, W) | {key: torch.ones(4)})
    for label, said in _refused("sd", file).items():
        assert said == line(label)


@pytest.mark.parametrize("case", ["sgm beside diffusers blocks, CLIP without out_proj",
                                  "another prefix in a kohya file", "another prefix beside unet.",
                                  "kohya CLIP position_embedding"])
def test_an_all_zero_layer_diffusers_leaves_out_is_left_out_and_the_rest_loads(case, tmp_path):
    """The other layers load, each as alpha / rank * up @ down (the first: alpha 4, rank 2; a diffusers file's:
    alpha = rank)."""
    model, tensors, _, _ = CASES[case]
    made = tensors(0.0)
    pipe = MODELS[model]()
    load_adapters(pipe, [parse_lora(str(_file(tmp_path, made)), 0)], "t")
    kohya = KOHYA + DOWN in made
    assert adapted_layers(pipe, "lora0") == (2 if TE_Q + DOWN in made else 1)
    down, up = (made[KOHYA + DOWN], made[KOHYA + ".lora_up.weight"]) if kohya else (
        made[f"unet.{ATTN}.lora_A.weight"], made[f"unet.{ATTN}.lora_B.weight"])
    delta = pipe.unet.get_submodule(ATTN).get_delta_weight("lora0")
    torch.testing.assert_close(delta, (2.0 if kohya else 1.0) * up @ down, rtol=1e-5, atol=1e-6)


def _diffusers_loads(model, tensors, tmp_path) -> tuple[set, list] | None:
    """The layers of ``tensors`` (a LoRA file's) and those diffusers' own pipeline loader (load_lora_weights) gave an
    adapter, each told by its lora_down / lora_A (alpha / rank scales lora_up alone); None where it raised."""
    from lowmem_alignprop.lora.kohya_layers import lora_suffix

    pipe = MODELS[model]()
    try:
        pipe.load_lora_weights(str(_file(tmp_path, tensors)), adapter_name="x")
    except ValueError:  # ("Could not automatically infer state dict type": not a silent drop)
        return None
    layers = {k.removesuffix(lora_suffix(k)) for k in tensors}
    downs = {n: tensors.get(n + DOWN, tensors.get(n + ".lora_A.weight")) for n in layers}
    kept = [n for part in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if part is not None
            for module in part.modules() if "x" in getattr(module, "lora_A", {})
            for n in layers if torch.equal(downs[n], module.lora_A["x"].weight)]
    return layers, kept


GUARD_CASES = {**{c: CASES[c][:2] for c in CASES if c != "sgm beside diffusers blocks, CLIP without out_proj"},
               "kohya alone": ("sd", lambda f: _layer(KOHYA, W, W) | _layer(TE1_OUT.replace("te1", "te"), 32, 32)),
               "unet. alone": ("sdxl", lambda f: _layer("unet." + ATTN, W, W, kohya=False))}


@pytest.mark.parametrize("case", sorted(GUARD_CASES))
def test_the_unet_reader_drops_are_those_diffusers_own_loader_drops(case, tmp_path):
    """A guard against a diffusers upgrade changing what its SD/SDXL loader leaves out: the layers lora_formats.
    unet_reader_drops and kohya_layers.kohya_encoder_unread predict as dropped are not loaded by diffusers' own
    load_lora_weights (or it raises), and the file without them loads every other layer, each once: the copy
    unet_layers_read hands on is read whole. (The sgm case with CLIP's q_proj alone is left out here: diffusers' own
    loader raises on such CLIP layers, which ours converts first.)"""
    from lowmem_alignprop.lora.kohya_layers import kohya_encoder_unread, lora_suffix
    from lowmem_alignprop.lora.lora_formats import unet_reader_drops

    model, tensors = GUARD_CASES[case]
    raw = tensors(None)
    drops = set(unet_reader_drops(sorted(raw)))
    predicted = {k.removesuffix(lora_suffix(k)) for k in raw if k in drops or kohya_encoder_unread(k)}
    assert bool(predicted) == (case not in ("kohya alone", "unet. alone"))
    if (whole := _diffusers_loads(model, raw, tmp_path)) is not None:
        assert not predicted & set(whole[1]), (predicted, whole[1])
    layers, kept = _diffusers_loads(model, {k: v for k, v in raw.items()
                                            if k.removesuffix(lora_suffix(k)) not in predicted}, tmp_path)
    assert sorted(kept) == sorted(layers) and layers

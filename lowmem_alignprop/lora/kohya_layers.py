"""kohya LoRA layers read the way sd-scripts and ComfyUI apply them: each layer's alpha / rank folded into its
``lora_up`` (what diffusers' kohya readers then read at scale 1), and kohya's text-encoder layers (``lora_te1_``,
``lora_te2_``: CLIP-L and CLIP-G, in an SD1.x/SDXL file or an SD3/FLUX one) in diffusers' layout; ComfyUI's names of
those text-encoder layers as kohya's (one rule for a UNet LoRA and an SD3/FLUX one)."""

from __future__ import annotations

import re

import torch

from lowmem_alignprop.models.lora_layers import KOHYA_ENCODERS, LORA_DOWN_SUFFIXES
from lowmem_alignprop.settings.errors import quote

# a LoRA layer's tensors as ComfyUI names them: kohya's (lora_down, lora_up, alpha; no alpha: alpha = rank) or peft's
# (lora_A down, lora_B up: comfy/weight_adapter/lora.py reads both), and peft's as kohya's
KOHYA_LAYER_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")  # (what diffusers' kohya readers read)
LORA_SUFFIXES = (*KOHYA_LAYER_SUFFIXES, ".lora_A.weight", ".lora_B.weight")
KOHYA_SUFFIX = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}
# a ComfyUI LoRA's text-encoder layers (its save node's text_encoder_diff, and SD3/FLUX LoRAs it saves or reads):
# ``text_encoders.`` + ComfyUI's CLIP model's path (comfy/lora.py model_lora_keys_clip's generic names): SD 1.x's
# clip_l, SD 2.x's clip_h, SDXL's and SD3's clip_l and clip_g, FLUX.1's clip_l (T5's, text_encoders.t5xxl., no
# diffusers loader reads). The layers diffusers' kohya readers apply, by kohya's encoder prefix (lora_te1_: the first
# encoder, lora_te2_: the second): each encoder layer's attention and MLP linears, and clip_g's text_projection
COMFY_ENCODER_PREFIX = "text_encoders."
_COMFY_ENCODERS = {"clip_l": "lora_te1_", "clip_h": "lora_te1_", "clip_g": "lora_te2_"}
_COMFY_ENCODER_LAYER = re.compile(r"text_encoders\.(clip_[lhg])\.transformer\.(text_model\.encoder\.layers\.\d+\."
                                  r"(?:self_attn\.(?:[qkv]|out)_proj|mlp\.fc[12])|text_projection)")


def lora_suffix(key: str) -> str | None:
    """``key``'s LoRA suffix (:data:`LORA_SUFFIXES`), None for another name."""
    return next((s for s in LORA_SUFFIXES if key.endswith(s)), None)


def comfy_encoder_name(key: str) -> str | None:
    """A ComfyUI text-encoder LoRA name (:data:`COMFY_ENCODER_PREFIX`) as kohya's for the same layer
    (``lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight``), which diffusers' readers apply;
    None for a layer they have no name for (the embeddings, clip_l's projection, which SD's encoders lack), T5's, or
    another name."""
    suffix = lora_suffix(key)
    found = _COMFY_ENCODER_LAYER.fullmatch(key.removesuffix(suffix)) if suffix else None
    if found is None or found[2] == "text_projection" and found[1] != "clip_g":
        return None
    return _COMFY_ENCODERS[found[1]] + found[2].replace(".", "_") + KOHYA_SUFFIX.get(suffix, suffix)


# the same layers in kohya's names (lora_te_ / lora_te1_: the first CLIP, lora_te2_: the second): what diffusers'
# kohya readers map; another (the embeddings, the first CLIP's text_projection) they drop, FLUX.1's with a log line
_KOHYA_ENCODER_LAYER = re.compile(r"lora_te[12]?_text_model_encoder_layers_\d+_(?:self_attn_(?:[qkv]|out)_proj|"
                                  r"mlp_fc[12])|lora_te2_text_projection")


def kohya_encoder_unread(key: str) -> bool:
    """Whether ``key`` is a kohya text-encoder layer's (``lora_te_``, ``lora_te1_``, ``lora_te2_``) that diffusers'
    kohya readers have no name for (its embeddings' position_embedding or token_embedding, the first CLIP's
    text_projection)."""
    suffix = lora_suffix(key)
    return bool(suffix) and key.startswith(tuple(KOHYA_ENCODERS)) and \
        _KOHYA_ENCODER_LAYER.fullmatch(key.removesuffix(suffix)) is None


def unchanged_layer(tensors, key: str) -> bool:
    """Whether ``key``'s layer in a ComfyUI LoRA (``tensors``: name -> tensor) adds nothing: its up or down all zeros,
    as the extract node writes a weight the fine-tune left as it was. False where ``tensors`` holds no values (a
    header's shapes)."""
    layer = key.removesuffix(lora_suffix(key) or "")
    pairs = [tensors.get(layer + s) for s in (".lora_up.weight", ".lora_B.weight", ".lora_down.weight",
                                              ".lora_A.weight")]
    return any(isinstance(t, torch.Tensor) and not t.any() for t in pairs)


def first_changed(dropped) -> str | None:
    """Of ``dropped`` ((tensors, key) pairs: a LoRA file's layers a loader would leave out, ``tensors`` name -> tensor),
    the key a refusal names: of the layers that change the model (not :func:`unchanged_layer`), a layer's down weight
    first, then by name; None where none does (all zeros: left out, as diffusers leaves out zeros). The one rule of
    the UNet and SD3/FLUX checks (lora_formats.unet_layers_read, adapters.left_out_layer)."""
    changed = [k for tensors, k in dropped if not unchanged_layer(tensors, k)]
    return min(changed, key=lambda k: (not k.endswith(LORA_DOWN_SUFFIXES), k)) if changed else None


def left_out_refusal(label: str, key: str, layouts: str) -> str:
    """The line for a LoRA holding ``key``, a layer :func:`first_changed` named (``label``: the option and its value;
    ``layouts``: what the reader reads, and so why it leaves that layer out)."""
    return (f"{label} holds {quote(key)}, which diffusers' LoRA loader leaves out without a word ({layouts}): the "
            "images would be the LoRA's without it; save the LoRA again in one layout, without that layer")


# ComfyUI's extract node's full weight and bias differences (lora_type full_diff, bias_diff): no LoRA loader applies
# them (diffusers' SD3 and UNet readers refuse the file, its FLUX reader drops the changing ones with a log line)
WEIGHT_DIFFERENCES = (".diff", ".diff_b")


def weight_difference_refusal(key: str) -> str:
    """Why a LoRA file holding ComfyUI's full weight or bias difference ``key`` that changes the model is refused,
    and what to do: to follow the option and its value (a UNet LoRA's and an SD3/FLUX one's alike)."""
    return (f"holds ComfyUI's full weight or bias differences (e.g. {quote(key)}), not a LoRA's lora_down / lora_up: "
            "extract it again with lora_type standard and bias_diff off")


def comfy_encoder_refusal(key: str) -> str:
    """Why a ComfyUI LoRA's text-encoder layer ``key`` that :func:`comfy_encoder_name` has no name for, and that
    changes the model (not :func:`unchanged_layer`), is refused, and what to do: to follow the option and its value
    (a UNet LoRA's and an SD3/FLUX one's alike)."""
    return (f"changes a text-encoder layer that diffusers' LoRA loader has no layer for (e.g. {quote(key)}): only the "
            "encoders' attention and MLP layers and CLIP-G's text_projection (SDXL's and SD3's second encoder) are "
            "read; save it again without text_encoder_diff, or from a fine-tune that left that layer as it was")


def alphas_folded(tensors: dict, alphas: dict) -> dict:
    """``tensors`` with each layer's alpha / rank (``alphas``: layer -> alpha) folded into its ``lora_up``, as
    sd-scripts and ComfyUI apply it (alpha / rank * up @ down), and those alphas left out."""
    folded = {}
    for key, value in tensors.items():
        layer = key.removesuffix(".lora_up.weight")
        if key.endswith(".alpha") and key.removesuffix(".alpha") in alphas:
            continue
        if key.endswith(".lora_up.weight") and layer in alphas and f"{layer}.lora_down.weight" in tensors:
            rank = tensors[f"{layer}.lora_down.weight"].shape[0]
            value = value.float() * (float(alphas[layer]) / rank)  # alpha / rank * up @ down, as sd-scripts applies it
        folded[key] = value.contiguous()
    return folded


def every_alpha_folded(tensors: dict) -> dict:
    """:func:`alphas_folded` of every layer of ``tensors`` (kohya-named), alpha = rank where a layer has none (as
    sd-scripts and ComfyUI apply such a layer): what diffusers' kohya reader then reads at scale 1."""
    layers = {k.removesuffix(".lora_down.weight") for k in tensors if k.endswith(".lora_down.weight")}
    return alphas_folded(tensors, {m: tensors.get(f"{m}.alpha", tensors[f"{m}.lora_down.weight"].shape[0])
                                    for m in layers})


def kohya_encoder_layers(tensors: dict) -> dict[str, dict]:
    """kohya's text-encoder layers (``tensors``: ``lora_te1_*``, ``lora_te2_*``: an SD3/FLUX file's CLIP-L and CLIP-G,
    the same CLIP models as SDXL's two) read by diffusers' SDXL kohya reader, each alpha / rank folded (scale 1): per
    encoder (``text_encoder``, ``text_encoder_2``), its layers in peft's names (``<path>.lora_A.weight``)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_peft

    state, _ = StableDiffusionXLPipeline.lora_state_dict(every_alpha_folded(tensors))
    return {part: convert_state_dict_to_peft(named) for part, named in diffusers_parts(state).items()}


def diffusers_parts(state: dict) -> dict[str, dict]:
    """A diffusers reader's state dict by component; the text encoders' named in diffusers' layout (the UNet's as
    read)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from diffusers.utils.state_dict_utils import StateDictType

    parts: dict[str, dict] = {}
    for key, value in state.items():
        part, _, name = key.partition(".")
        parts.setdefault(part, {})[name] = value
    return {part: named if part == "unet" else
            convert_state_dict_to_diffusers(named, original_type=StateDictType.DIFFUSERS_OLD)
            for part, named in parts.items()}

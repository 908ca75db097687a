"""kohya LoRA layers read the way sd-scripts and ComfyUI apply them: each layer's alpha / rank folded into its
``lora_up`` (what diffusers' kohya readers then read at scale 1), and kohya's text-encoder layers (``lora_te1_``,
``lora_te2_``: CLIP-L and CLIP-G, in an SD1.x/SDXL file or an SD3/FLUX one) in diffusers' layout."""

from __future__ import annotations


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

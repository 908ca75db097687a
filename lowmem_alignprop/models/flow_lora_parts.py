"""An SD3/FLUX LoRA read in its parts, each loaded when its model is in memory: the text encoders' layers before the
prompt set is encoded, the transformer's once it is read. The trainer and ``sample`` encode every prompt, free the
encoders, and only then read the transformer (T5-XXL and a 12B transformer are never in memory together), so a
pipeline's ``load_lora_weights``, which loads every part at once, cannot take a LoRA that adapts both.

diffusers reads the file (``lora_state_dict``: its converters for kohya, ai-toolkit and diffusers layouts, alphas and
the adapter metadata) and loads each part with the pipeline class's own ``load_lora_into_text_encoder`` /
``load_lora_into_transformer``, as its ``load_lora_weights`` does. Which encoders take a LoRA is diffusers' choice:
CLIP-L for FLUX.1 (``text_encoder``), CLIP-L and CLIP-G for SD3 (``text_encoder``, ``text_encoder_2``); no loader
reads T5's layers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem_alignprop.models.lora_layers import KOHYA_ENCODERS, LORA_DOWN_SUFFIXES, adapter_layers
from lowmem_alignprop.settings.errors import quote

# the encoders each pipeline's LoRA loader reads (diffusers' names, also the keys' prefixes)
LOADED_ENCODERS = {"FluxPipeline": ("text_encoder",), "StableDiffusion3Pipeline": ("text_encoder", "text_encoder_2")}
ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoder_3.")
# a CLIP encoder's layers in the other names diffusers' SD3/FLUX readers map to text_encoder(_2). (sd-scripts'
# lora_te1_ / lora_te2_ and lora_te_, ComfyUI's text_encoders.clip_l.): a file sample copies as it came (a FLUX.1 kohya
# file with modulation layers, which diffusers' own reader maps) still holds them under these
OTHER_CLIP_PREFIXES = (*KOHYA_ENCODERS, "text_encoders.clip_l.", "text_encoders.clip_g.")


def is_down_key(key: str) -> bool:
    """A LoRA layer's down (A) weight, in peft's, diffusers' older (and oldest) or kohya's names
    (:data:`~lowmem_alignprop.models.lora_layers.LORA_DOWN_SUFFIXES`; diffusers' FLUX kohya reader names CLIP's layers
    as its older layouts did: ``self_attn.to_q_lora.down.weight``, ``mlp.fc1.lora_linear_layer.down.weight``)."""
    return key.endswith(LORA_DOWN_SUFFIXES)


@dataclass
class FlowLora:
    """A LoRA file as diffusers reads it for a pipeline class: keys ``transformer.<path>...`` and
    ``text_encoder(_2).<path>...``, kohya's and ai-toolkit's converted."""
    state_dict: dict[str, torch.Tensor]
    alphas: dict | None
    metadata: dict | None

    def layers(self, prefix: str) -> list[str]:
        """The layers of one part (``prefix``: ``transformer.``, ``text_encoder.`` ...), by their down weights."""
        return [k for k in self.state_dict if k.startswith(prefix) and is_down_key(k)]

    def encoder_layers(self) -> list[str]:
        return [k for k in self.state_dict if k.startswith(ENCODER_PREFIXES) and is_down_key(k)]

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict.items() if k.startswith(prefix)}


def read_flow_lora(pipeline_class, file: Path) -> FlowLora:
    """``file`` read by ``pipeline_class``'s LoRA reader (FluxPipeline's also returns alphas, SD3's does not)."""
    kwargs = {"return_alphas": True} if pipeline_class.__name__ == "FluxPipeline" else {}
    read = pipeline_class.lora_state_dict(str(Path(file).parent), weight_name=Path(file).name,
                                          return_lora_metadata=True, **kwargs)
    state_dict, alphas, metadata = read if len(read) == 3 else (read[0], None, read[1])
    return FlowLora(state_dict, alphas or None, metadata)


def unloaded_encoder_layers(pipeline_class, lora: FlowLora) -> list[str]:
    """Text-encoder layers no loader of ``pipeline_class`` reads (SD3's T5 ``text_encoder_3``, FLUX's
    ``text_encoder_2``): loading the file would drop them in silence."""
    loaded = tuple(f"{name}." for name in LOADED_ENCODERS.get(pipeline_class.__name__, ()))
    return [k for k in lora.encoder_layers() if not k.startswith(loaded)]


def t5_refusal(label: str, key: str) -> str:
    """An SD3/FLUX LoRA that adapts T5 (``key``: one of its layers; ``label``: the option and its value): no LoRA
    loader of diffusers reads T5's layers (SD3's ``text_encoder_3``, FLUX's ``text_encoder_2``, kohya's
    ``lora_te3_``), so they would be dropped in silence."""
    return (f"{label} adapts the T5 text encoder too (e.g. {quote(key)}), which no LoRA loader of diffusers reads "
            "(they would be dropped without a word): pass a LoRA without T5 layers (CLIP's and the transformer's "
            "apply)")


def _onto(model: torch.nn.Module, part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``part`` as the LoRA's weights for ``model``: on the meta device where the model was built there (plan's
    model: its shapes only), where copying real weights into its meta adapter is a no-op torch warns of per weight."""
    if not next(model.parameters()).is_meta:
        return part
    return {k: v.to("meta") for k, v in part.items()}


def load_encoder_layers(pipe, lora: FlowLora, name: str) -> int:
    """The LoRA's text-encoder layers loaded into the pipeline's encoders as adapter ``name`` (diffusers' loader);
    returns how many layers of the encoders now carry it."""
    cls, count = type(pipe), 0
    for encoder_name in LOADED_ENCODERS.get(cls.__name__, ()):
        encoder = getattr(pipe, encoder_name, None)
        if encoder is None or not lora.layers(f"{encoder_name}."):
            continue
        cls.load_lora_into_text_encoder(_onto(encoder, lora.part(f"{encoder_name}.")), network_alphas=lora.alphas,
                                        text_encoder=encoder, prefix=encoder_name, adapter_name=name,
                                        metadata=lora.metadata, _pipeline=pipe)
        count += sum(1 for _ in adapter_layers(encoder, name))
    return count


def load_transformer_layers(pipe, lora: FlowLora, name: str) -> None:
    """The LoRA's transformer layers loaded into ``pipe.transformer`` as adapter ``name`` (the text encoders' were
    loaded before the prompts were encoded, or are not wanted)."""
    cls = type(pipe)
    kwargs = {"network_alphas": lora.alphas} if cls.__name__ == "FluxPipeline" else {}
    cls.load_lora_into_transformer(_onto(pipe.transformer, lora.part("transformer.")), transformer=pipe.transformer,
                                   adapter_name=name, metadata=lora.metadata, _pipeline=pipe, **kwargs)


def set_encoder_adapters(pipe, names: list[str], weights: list[float]) -> None:
    """The encoders' adapters ``names`` active with ``weights`` (sample's LoRA mix, as ``set_adapters`` mixes the
    transformer's), on every encoder that carries one of them."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    for encoder_name in LOADED_ENCODERS.get(type(pipe).__name__, ()):
        encoder = getattr(pipe, encoder_name, None)
        present = {n for m in (encoder.modules() if encoder is not None else ()) for n in getattr(m, "lora_A", {})}
        mine = [(n, w) for n, w in zip(names, weights) if n in present]
        if mine:
            set_weights_and_activate_adapters(encoder, [n for n, _ in mine], [w for _, w in mine])


__all__ = ["ENCODER_PREFIXES", "FlowLora", "LOADED_ENCODERS", "OTHER_CLIP_PREFIXES", "is_down_key",
           "load_encoder_layers", "load_transformer_layers", "read_flow_lora", "set_encoder_adapters", "t5_refusal",
           "unloaded_encoder_layers"]

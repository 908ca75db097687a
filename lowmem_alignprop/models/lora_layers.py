"""Which layers carry the trained LoRA (config ``lora_layers``): the one place that names peft's
``target_modules`` for every model family.

* ``attention`` (AlignProp's choice): the attention projections -- a UNet's ``to_q/to_k/to_v/to_out.0``; an
  SD3/FLUX transformer's image stream (the same four) and, in its joint blocks, the text stream
  (``add_q/k/v_proj``, ``to_add_out``). FLUX's single blocks have ``to_q/k/v`` only.
* ``attention+ff``: also the transformer blocks' feed-forward layers -- a UNet's ``ff.net.0.proj`` (GEGLU's input)
  and ``ff.net.2``; SD3/FLUX's ``ff``/``ff_context``, and FLUX's single blocks' MLP input ``proj_mlp`` and their
  output ``proj_out`` (attention and MLP joined). What kohya sd-scripts and ai-toolkit train for FLUX by default.

:func:`trains_layer` asks the same list of a LoRA file's layer name or a module path (what ``--init-lora`` starts
training from, and what it keeps as it came). The names a LoRA file's keys take are listed here once too: a text
encoder's (:data:`TEXT_ENCODER_KEYS`), T5's (:data:`T5_KEYS`), kohya's CLIP prefixes (:data:`KOHYA_CLIP`,
:data:`KOHYA_ENCODERS`) and a layer's down-key endings (:data:`LORA_DOWN_SUFFIXES`).

Names are peft suffixes (``ff.net.2`` matches ``...transformer_blocks.0.ff.net.2``). The transformers' top-level
``proj_out`` (the last layer, to patches) is no block's and stays without LoRA.
"""

from __future__ import annotations

LORA_LAYERS = ("attention", "attention+ff")
UNET_ATTENTION = ["to_k", "to_q", "to_v", "to_out.0"]
FLOW_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
UNET_FF = ["ff.net.0.proj", "ff.net.2"]
FLOW_BLOCK_FF = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]  # joint/double blocks
FLUX_SINGLE_FF = ["proj_mlp", "proj_out"]  # FLUX's single blocks: the MLP input, and the output of attention and MLP
FLOW_FF = FLOW_BLOCK_FF + FLUX_SINGLE_FF
TOP_LEVEL_OUT = "proj_out"  # peft's exclude_modules as a string is a regex on the whole name: the top-level only
# a text encoder's layer in a LoRA file (kohya's lora_te/te1/te2, diffusers' text_encoder(_2), peft's te_): not trained
TEXT_ENCODER_KEYS = ("lora_te", "text_encoder", "te_", "te1_", "te2_")
# T5's layers in an SD3/FLUX LoRA (diffusers' SD3 text_encoder_3, kohya's lora_te3_, ComfyUI's t5xxl): no diffusers
# loader reads them (FLUX's T5, diffusers' text_encoder_2, is told apart once the model is known)
T5_KEYS = ("text_encoder_3.", "lora_te3_", "text_encoders.t5xxl.")
# kohya's (sd-scripts') CLIP layers: lora_te1_ / lora_te2_ the first and second CLIP (SDXL's and SD3's CLIP-L and
# CLIP-G, FLUX.1's CLIP-L), and SD 1.x/2.x's one encoder lora_te_; by the diffusers encoder each adapts
KOHYA_CLIP = ("lora_te1_", "lora_te2_")
KOHYA_ENCODERS = {"lora_te_": "text_encoder", **dict(zip(KOHYA_CLIP, ("text_encoder", "text_encoder_2")))}
# how the key of a LoRA's down (A) matrix ends in the layouts diffusers reads (peft's lora_A, kohya's lora_down,
# diffusers' older lora.down / lora_linear_layer.down: also what its FLUX kohya reader names CLIP's layers), one such
# key per adapted layer: sample counts the layers by it (adapters.layers_in_file, flow_lora_parts.is_down_key),
# --init-lora names them (init_lora._layer_name)
LORA_DOWN_SUFFIXES = ("lora.down.weight", "lora_A.weight", "lora_down.weight", "lora_linear_layer.down.weight")


def lora_targets(layers: str, flow: bool) -> list[str]:
    """peft's ``target_modules`` for ``layers`` (one of :data:`LORA_LAYERS`) of a UNet or an SD3/FLUX transformer."""
    if layers not in LORA_LAYERS:
        raise ValueError(f"lora_layers={layers!r}: one of {', '.join(LORA_LAYERS)}")
    attention = FLOW_ATTENTION if flow else UNET_ATTENTION
    return list(attention) + (list(FLOW_FF if flow else UNET_FF) if layers == "attention+ff" else [])


def trains_layer(path: str, layers: str, flow: bool) -> bool:
    """Whether a run of ``layers`` (config lora_layers) trains the layer at ``path``: a module path of the denoiser
    (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``) or a LoRA file's layer name in diffusers' or
    kohya's names (``lora_unet_..._attn1_to_q``), by peft's suffix rule on :func:`lora_targets` (the one rule: what
    ``--init-lora`` starts training from, and what it keeps as it came). A text encoder's layer is never trained."""
    if path.startswith(TEXT_ENCODER_KEYS):
        return False
    targets = lora_targets(layers, flow)
    name = path.replace(".", "_")
    return name != peft_exclude(targets) and any(name == t or name.endswith("_" + t)
                                                 for t in (t.replace(".", "_") for t in targets))


def lora_config(rank: int, alpha: float | None, layers: str, flow: bool):
    """The peft ``LoraConfig`` of a fresh adapter: gaussian A, zero B (the base model's images at step 0)."""
    from peft import LoraConfig

    targets = lora_targets(layers, flow)
    return LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets,
                      exclude_modules=peft_exclude(targets))


def add_adapter(model, rank: int, alpha: float | None, seed: int, layers: str, flow: bool) -> list:
    """A fresh peft adapter (:func:`lora_config`) on ``model``'s ``layers``, drawn from ``seed`` without touching the
    global RNG; only it trains. Returns its parameters, in fp32 whatever the model's dtype (the LoRA weights and
    their optimizer state stay fp32 for stable updates)."""
    import torch

    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(lora_config(rank, alpha, layers, flow=flow))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def adapter_layers(model, name: str):
    """(module path, module) of every layer of ``model`` that carries the peft adapter ``name``."""
    return ((path, m) for path, m in model.named_modules() if name in getattr(m, "lora_A", {}))


def peft_exclude(targets) -> str | None:
    """peft's ``exclude_modules`` for ``targets``: the top-level ``proj_out`` when a block's ``proj_out`` is one."""
    return TOP_LEVEL_OUT if TOP_LEVEL_OUT in targets else None


def keep_input_dtype(model) -> int:
    """For a model that runs under autocast: its LoRA layers pass their input to the adapter as it comes. peft casts it
    to the adapter's dtype first (fp32) and autocast's matmul casts it back to fp16/bf16: the same values, and where
    the input comes in fp16/bf16 (an attention output before ``to_out``, the text embeddings) two more ops forward and
    two backward per adapted layer and call, and a second fp16 copy that backward keeps beside the base layer's
    (about 0.6 GiB less at ``plan --fastest``'s rtx4090 SD1.5 choice, six calls kept). peft's own switch
    (``cast_input_dtype_enabled``, which ``peft.helpers.disable_input_dtype_casting`` sets for a while), set for
    good: a checkpoint's recompute in backward must run as its forward did. Returns how many layers it set."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.cast_input_dtype_enabled = False
    return len(layers)

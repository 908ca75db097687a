"""Convert an open_clip CLIP state dict (e.g. HPS v2's ViT-H-14) to a transformers ``CLIPModel`` and back.

open_clip itself needs torchvision, which this project cannot install, so HPS v2 checkpoints are loaded by
renaming their tensors into the transformers layout. Only the standard open_clip ``CLIP`` class is
handled (a ViT image tower and the text transformer at the top level), which is what ViT-H-14 uses.

open_clip layout (per tower; ``visual.`` prefix for the image tower)::

    conv1.weight                       -> vision_model.embeddings.patch_embedding.weight
    class_embedding                    -> vision_model.embeddings.class_embedding
    positional_embedding               -> {vision,text}_model.embeddings.position_embedding.weight
    ln_pre / ln_post                   -> vision_model.pre_layrnorm / vision_model.post_layernorm
    transformer.resblocks.N.ln_1/ln_2  -> ...encoder.layers.N.layer_norm1/layer_norm2
    transformer.resblocks.N.attn.in_proj_{weight,bias} -> ...self_attn.{q,k,v}_proj (split in 3)
    transformer.resblocks.N.attn.out_proj              -> ...self_attn.out_proj
    transformer.resblocks.N.mlp.c_fc / mlp.c_proj      -> ...mlp.fc1 / mlp.fc2
    visual.proj [D, P] / text_projection [D, P]         -> visual_projection / text_projection .weight [P, D]
    token_embedding, ln_final, logit_scale              -> text_model.embeddings.token_embedding,
                                                           text_model.final_layer_norm, logit_scale

The numbers of attention heads cannot be read from tensor shapes: open_clip's ViT configs use 64-wide
heads, so ``heads = width // 64`` unless a ``CLIPConfig`` is given.
"""

from __future__ import annotations

import re

import torch

from lowmem_alignprop.run.tensor_files import unwrap_state_dict

_LAYER_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$")  # also in_proj_weight


def unwrap_checkpoint(obj) -> dict[str, torch.Tensor]:
    """The state dict inside an open_clip / HPS checkpoint (``{'state_dict': ...}``, ``{'model': ...}`` or plain),
    ``module.`` stripped. ``state_dict`` wrappers come off by tensor_files' rule (as often as they nest)."""
    obj = unwrap_state_dict(obj)
    if isinstance(obj, dict):
        for key in ("model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
        raise ValueError("not a state dict")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items() if torch.is_tensor(v)}


def is_open_clip_state_dict(sd: dict) -> bool:
    return "visual.conv1.weight" in sd and "token_embedding.weight" in sd and "text_projection" in sd


def open_clip_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename/split an open_clip state dict into transformers ``CLIPModel`` keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in _TOP:
            out[_TOP[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif key == "attn_mask" or key.endswith(".attn_mask"):
            continue  # open_clip's causal-mask buffer; transformers builds its own
        else:
            m = _BLOCK.match(key)
            if not m:
                raise KeyError(f"unexpected open_clip key {key!r} (only the standard ViT CLIP layout is supported)")
            visual, idx, part, kind = m.groups()
            prefix = f"{'vision' if visual else 'text'}_model.encoder.layers.{idx}."
            if part == "attn.in_proj":
                q, k, v = value.chunk(3, dim=0)
                out[prefix + f"self_attn.q_proj.{kind}"] = q
                out[prefix + f"self_attn.k_proj.{kind}"] = k
                out[prefix + f"self_attn.v_proj.{kind}"] = v
            elif part in _LAYER_PARTS:
                out[prefix + f"{_LAYER_PARTS[part]}.{kind}"] = value
            else:
                raise KeyError(f"unexpected open_clip key {key!r}")
    return out


def hf_to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`open_clip_to_hf` (used to write open_clip-format test checkpoints)."""
    top_inv = {v: k for k, v in _TOP.items()}
    tr_inv = {v: k for k, v in _TRANSPOSED.items()}
    part_inv = {v: k for k, v in _LAYER_PARTS.items()}
    layer = re.compile(r"^(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in top_inv:
            out[top_inv[key]] = value
        elif key in tr_inv:
            out[tr_inv[key]] = value.t().contiguous()
        elif key.endswith("position_ids"):
            continue
        else:
            m = layer.match(key)
            if not m:
                raise KeyError(f"unexpected transformers CLIP key {key!r}")
            tower, idx, part, kind = m.groups()
            prefix = f"{'visual.' if tower == 'vision' else ''}transformer.resblocks.{idx}."
            if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                pending.setdefault((prefix, kind), {})[part[-6]] = value
            else:
                out[prefix + f"{part_inv[part]}.{kind}"] = value
    for (prefix, kind), qkv in pending.items():
        out[prefix + f"attn.in_proj_{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out


def config_from_open_clip(sd: dict[str, torch.Tensor], head_width: int = 64, hidden_act: str = "gelu"):
    """A ``CLIPConfig`` matching the tensor shapes of an open_clip state dict."""
    from transformers import CLIPConfig

    def n_layers(prefix):
        idx = {int(m.group(1)) for k in sd for m in [re.match(prefix + r"transformer\.resblocks\.(\d+)\.", k)] if m}
        return max(idx) + 1

    conv = sd["visual.conv1.weight"]
    v_width, patch = conv.shape[0], conv.shape[-1]
    n_pos = sd["visual.positional_embedding"].shape[0]
    grid = int(round((n_pos - 1) ** 0.5))
    t_width = sd["token_embedding.weight"].shape[1]
    vocab = sd["token_embedding.weight"].shape[0]
    proj = sd["text_projection"].shape[1]
    vision = dict(
        hidden_size=v_width, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=n_layers(r"visual\."), num_attention_heads=max(1, v_width // head_width),
        image_size=grid * patch, patch_size=patch, projection_dim=proj, hidden_act=hidden_act, layer_norm_eps=1e-5,
    )
    text = dict(
        hidden_size=t_width, intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=n_layers(""), num_attention_heads=max(1, t_width // head_width), vocab_size=vocab,
        max_position_embeddings=sd["positional_embedding"].shape[0], projection_dim=proj, hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        # open_clip pools the text at argmax(token id) = the first end-of-text token (the largest id)
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)


def load_open_clip_as_hf(sd: dict[str, torch.Tensor], config=None):
    """A transformers ``CLIPModel`` holding the weights of an open_clip state dict."""
    from transformers import CLIPModel

    if config is None:
        config = config_from_open_clip(sd)
    hf_sd = open_clip_to_hf(sd)
    with torch.device("meta"):
        model = CLIPModel(config)
    model.load_state_dict(hf_sd, strict=False, assign=True)
    # anything left on meta must be a buffer transformers computes itself (position_ids)
    for mod_name, module in model.named_modules():
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                if buf_name == "position_ids":
                    module.register_buffer(buf_name, torch.arange(buf.shape[-1]).expand(buf.shape),
                                           persistent=False)
                else:
                    raise KeyError(f"open_clip checkpoint lacks {mod_name}.{buf_name}")
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise KeyError(f"open_clip checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return model

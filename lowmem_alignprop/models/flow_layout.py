"""SD3/SD3.5 and FLUX.1 transformers' diffusers weights in their original layouts, what ComfyUI's *Load Diffusion
Model*, sd-scripts and ``from_single_file`` read: Stability's MMDiT (``joint_blocks.N.x_block.attn.qkv``, ...) and
Black Forest Labs' FLUX (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``, ...). diffusers converts
only original -> diffusers (``convert_sd3_transformer_checkpoint_to_diffusers`` / ``convert_flux_...``), so this is
the small inverse: names, q/k/v (and FLUX's single-block MLP input) concatenated back, and the shift/scale halves of
the pre-only adaLN layers (SD3's last context block, the final layer) swapped back. ``export --merge --single-file``
writes them; tests/test_flow_export.py reads them back bit for bit with diffusers' own converters (FLUX's splits
``linear1`` at FLUX.1's own widths, 3072 / 12288, only: that test runs at that width on one block of each kind,
with row-numbered int16 views instead of weights).
"""

from __future__ import annotations

import re

import torch

_TOP = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
        "norm_out.linear": "final_layer.adaLN_modulation.1"}
_IN_BLOCK = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
             "attn2.to_out.0": "x_block.attn2.proj",
             "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
             "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
             "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
             "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
             "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
             "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
_FUSED = {"attn": ("to_q", "to_k", "to_v", "x_block.attn.qkv"),
          "attn_context": ("add_q_proj", "add_k_proj", "add_v_proj", "context_block.attn.qkv"),
          "attn2": ("to_q", "to_k", "to_v", "x_block.attn2.qkv")}
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous is (scale, shift), the original (shift, scale): the swap is its own inverse."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sd3_to_original(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """A diffusers ``SD3Transformer2DModel`` state dict -> the original MMDiT's (no ``model.diffusion_model.``
    prefix, as transformer-only files are). Raises KeyError for a weight it has no name for."""
    out, fused = {}, {}
    last = num_layers - 1
    for key, value in sd.items():
        module, leaf = key.rsplit(".", 1) if key != "pos_embed.pos_embed" else (key, "")
        if module in _TOP:
            name = _TOP[module] + (f".{leaf}" if leaf else "")
            out[name] = _swap_halves(value) if module == "norm_out.linear" else value
            continue
        m = _BLOCK.match(key)
        if m is None:
            raise KeyError(f"no original MMDiT name for SD3 weight {key}")
        i, rest, leaf = int(m.group(1)), m.group(2), m.group(3)
        prefix = f"joint_blocks.{i}."
        if rest in _IN_BLOCK:
            swap = rest == "norm1_context.linear" and i == last  # the pre-only last context block's adaLN
            out[prefix + _IN_BLOCK[rest] + "." + leaf] = _swap_halves(value) if swap else value
            continue
        group, part = rest.split(".", 1)
        kind = "attn_context" if group == "attn" and part.startswith("add_") else group
        if kind not in _FUSED or part not in _FUSED[kind][:3]:
            raise KeyError(f"no original MMDiT name for SD3 weight {key}")
        fused.setdefault((prefix + _FUSED[kind][3] + "." + leaf), {})[_FUSED[kind].index(part)] = value
    for name, parts in fused.items():
        if sorted(parts) != [0, 1, 2]:
            raise KeyError(f"{name}: q, k and v are not all there")
        out[name] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------
# FLUX.1: Black Forest Labs' layout (double_blocks / single_blocks), as in flux1-dev.safetensors
# ---------------------------------------------------------------------------------------------------------

_FLUX_TOP = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
             "norm_out.linear": "final_layer.adaLN_modulation.1"}
_FLUX_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
                "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
                "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2",
                "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
# the fused Linears: their parts in row order
_FLUX_FUSED = {"double": {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                          "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")},
               "single": {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}}
_FLUX_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.(weight|bias)$")


def flux_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``FluxTransformer2DModel`` state dict -> BFL's (no prefix, as flux1-dev.safetensors): q/k/v (and
    the single blocks' MLP input) concatenated back, RMSNorm weights named ``scale``, the final adaLN's halves
    swapped back. Tensors may be views; the caller makes them contiguous to save. Raises KeyError."""
    out, parts = {}, {}
    fused_of = {(kind, p): (name, i) for kind, table in _FLUX_FUSED.items() for name, members in table.items()
                for i, p in enumerate(members)}
    for key, value in sd.items():
        module, leaf = key.rsplit(".", 1)
        if module in _FLUX_TOP:
            out[f"{_FLUX_TOP[module]}.{leaf}"] = _swap_halves(value) if module == "norm_out.linear" else value
            continue
        m = _FLUX_BLOCK.match(key)
        if m is None:
            raise KeyError(f"no BFL name for FLUX weight {key}")
        kind = "double" if m.group(1) == "transformer_blocks" else "single"
        prefix = f"{kind}_blocks.{m.group(2)}."
        rest = m.group(3)
        names = _FLUX_DOUBLE if kind == "double" else _FLUX_SINGLE
        if rest in names:
            norm = "_norm" in names[rest] and leaf == "weight"  # BFL's RMSNorm keeps its weight as "scale"
            out[prefix + names[rest] + "." + ("scale" if norm else leaf)] = value
        elif (kind, rest) in fused_of:
            name, i = fused_of[(kind, rest)]
            parts.setdefault(f"{prefix}{name}.{leaf}", {})[i] = value
        else:
            raise KeyError(f"no BFL name for FLUX weight {key}")
    for name, found in parts.items():
        out[name] = torch.cat([found[i] for i in sorted(found)], dim=0)
    return out

"""An SD3/SD3.5 transformer's diffusers weights in Stability's original MMDiT layout (``joint_blocks.N.x_block.
attn.qkv``, ...: what ComfyUI's *Load Diffusion Model*, sd-scripts and ``SD3Transformer2DModel.from_single_file``
read). diffusers converts only original -> diffusers (``convert_sd3_transformer_checkpoint_to_diffusers``), so this
is the small inverse: names, q/k/v concatenated back, and the shift/scale halves of the pre-only adaLN layers (the
last context block and the final layer) swapped back, as the original orders them. ``export --merge
--single-file`` writes it for SD3; tests/test_flow_export.py reads it back with diffusers' own converter.

FLUX.1 is not written this way: diffusers' FLUX reader splits the single blocks' fused ``linear1`` at FLUX.1's own
widths (3072 / 12288) only, so such a file could not be checked against diffusers on a small model.
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

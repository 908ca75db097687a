"""Diffusers weights written in the original LDM single-file layout (what AUTOMATIC1111, ComfyUI's checkpoint
loader and ``from_single_file`` read): ``model.diffusion_model.*`` (the UNet: SD1/SD2/SDXL layouts),
``first_stage_model.*`` (the AutoencoderKL), ``cond_stage_model.transformer.*`` (CLIP-L, SD 1.x),
``cond_stage_model.model.*`` (OpenCLIP, SD 2.x) and ``conditioner.embedders.{0,1}.*`` (SDXL's two encoders).

diffusers converts only LDM -> diffusers (``diffusers.loaders.single_file_utils``) and ships the inverse as
scripts outside the package, so this is the small inverse, checked in the tests by mapping back with diffusers'
own converters (tests/test_arch.py, tests/test_lora_export.py). ``export --merge --single-file`` uses it; the
tests build their single-file checkpoints with it.
"""

from __future__ import annotations

import torch

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _sub(rest: str, pairs) -> str:
    for new, old in pairs:
        rest = rest.replace(new, old)
    return rest


def unet_to_ldm(sd: dict, config, prefix: str = "model.diffusion_model.") -> dict:
    n = config["layers_per_block"]
    out = {}
    for key, value in sd.items():
        p = key.split(".")
        mod, leaf = ".".join(p[:-1]), p[-1]
        if mod in _UNET_TOP:
            new = f"{_UNET_TOP[mod]}.{leaf}"
        elif p[0] == "down_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "downsamplers":
                new = f"input_blocks.{1 + b * (n + 1) + n}.0.op.{leaf}"
            else:
                i, rest = 1 + b * (n + 1) + int(p[3]), ".".join(p[4:])
                new = f"input_blocks.{i}.0.{_sub(rest, _RESNET)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
        elif p[0] == "mid_block":
            rest = ".".join(p[3:])
            new = (f"middle_block.{2 * int(p[2])}.{_sub(rest, _RESNET)}" if p[1] == "resnets"
                   else f"middle_block.1.{rest}")
        elif p[0] == "up_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "upsamplers":
                has_attn = "CrossAttn" in config["up_block_types"][b]
                new = f"output_blocks.{b * (n + 1) + n}.{2 if has_attn else 1}.conv.{leaf}"
            else:
                i, rest = b * (n + 1) + int(p[3]), ".".join(p[4:])
                new = f"output_blocks.{i}.0.{_sub(rest, _RESNET)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out[prefix + new] = value
    return out


_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


VAE_PREFIX = "first_stage_model."  # the VAE's keys in a single file


def vae_to_ldm(sd: dict, config, prefix: str = VAE_PREFIX) -> dict:
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in sd.items():
        p = key.split(".")
        if len(p) > 2 and p[1] == "down_blocks":
            new = f"{p[0]}.down.{p[2]}." + (f"block.{p[4]}." if p[3] == "resnets" else "downsample.") + ".".join(p[5:])
        elif len(p) > 2 and p[1] == "up_blocks":
            new = f"{p[0]}.up.{n_up - 1 - int(p[2])}." + (f"block.{p[4]}." if p[3] == "resnets" else "upsample.")
            new += ".".join(p[5:])
        elif len(p) > 2 and p[1] == "mid_block":
            rest = ".".join(p[4:])
            if p[2] == "resnets":
                new = f"{p[0]}.mid.block_{int(p[3]) + 1}.{rest}"
            else:
                new = f"{p[0]}.mid.attn_1.{_sub(rest, _VAE_ATTN)}"
                if value.ndim == 2:  # LDM stores the attention projections as 1x1 convolutions
                    value = value[:, :, None, None]
        else:
            new = key.replace("conv_norm_out", "norm_out")
        out[prefix + new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def clip_to_ldm(sd: dict, prefix: str = "cond_stage_model.transformer.") -> dict:
    """transformers' CLIPTextModel layout (flattened in transformers 5 or not) -> LDM's HF-CLIP keys."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def open_clip_to_ldm(sd: dict, prefix: str = "cond_stage_model.model.") -> dict:
    """transformers' CLIPTextModel(WithProjection) -> OpenCLIP keys (fused qkv, c_fc/c_proj, ln_final)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out, top = {}, {"embeddings.token_embedding.weight": "token_embedding.weight",
                    "embeddings.position_embedding.weight": "positional_embedding",
                    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    for key, value in sd.items():
        if key in top:
            out[prefix + top[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key.startswith("encoder.layers.") and ".self_attn.q_proj." not in key and ".k_proj." not in key \
                and ".v_proj." not in key:
            rest = _sub(key.replace("encoder.layers.", "resblocks."),
                        (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), (".fc1.", ".c_fc."), (".fc2.", ".c_proj."),
                         (".self_attn", ".attn")))
            out[prefix + "transformer." + rest] = value
    for key in sd:
        if ".self_attn.q_proj." in key:
            layer, leaf = key.split(".")[2], key.split(".")[-1]
            qkv = [sd[key.replace("q_proj", x)] for x in ("q_proj", "k_proj", "v_proj")]
            out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat(qkv, 0)
    return out


def pipeline_to_ldm(pipe) -> dict:
    """One LDM-layout state dict for a StableDiffusion(XL)Pipeline (SD1 CLIP-L, SD2 OpenCLIP or SDXL both): the
    text encoder in SD 2.x's OpenCLIP layout when the UNet's cross-attention is 1024 wide (SD 2.x) and the model is
    no SDXL."""
    sd = {}
    sd.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    sd.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    if getattr(pipe, "text_encoder_2", None) is not None:
        sd.update(clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        sd.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    elif pipe.unet.config.cross_attention_dim == 1024:
        sd.update(open_clip_to_ldm(pipe.text_encoder.state_dict()))
    else:
        sd.update(clip_to_ldm(pipe.text_encoder.state_dict()))
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}

"""The diffusers pipeline ``sample`` renders with: built over the components training loads (:func:`build_pipeline`),
its denoiser placed once the adapters are loaded (:func:`place_denoiser`)."""

from __future__ import annotations

import logging

import torch

from lowmem_alignprop.commands import flow_sample
from lowmem_alignprop.models import loading
from lowmem_alignprop.models.family import family_for
from lowmem_alignprop.settings.config import set_flags


def build_pipeline(cfg, device: torch.device, weight_dtype: torch.dtype, prompts=(), specs=()):
    """The diffusers pipeline over the components training loads: StableDiffusionPipeline or SDXL with the DDIM
    scheduler, or StableDiffusion3Pipeline / FluxPipeline with the model's flow-matching Euler scheduler, loaded as
    the trainer loads them (flow_sample.py: ``prompts`` encoded and the text encoders freed before the transformer
    is read, with the CLIP layers of the LoRAs ``specs`` where they have any; :func:`place_denoiser` then places it,
    once the adapters are loaded)."""
    comps = loading.load_components(cfg, weight_dtype, device, transformer_last=True)  # (UNets: loaded as before)
    family = family_for(comps)
    if family.flow:  # (the architectures on meta, sd35m|sd35l|flux, are flow models: drawn there)
        pipe = flow_sample.build_flow_pipeline(cfg, comps, family, device, weight_dtype, prompts, specs)
        pipe._lowmem_revision = comps.revision  # a hub id's commit: sample_results.json's model_revision
        return pipe
    # a UNet's int8/nf4 load quantized (loading.load_components); block swap and fp8 storage are flow_sample's alone
    on = {**({"block_swap": 0} if cfg.block_swap else {}),
          **({"base_quant": "none"} if cfg.base_quant == "fp8" else {})}
    if on:
        logging.getLogger("lowmem_alignprop").warning(  # (they were taken in silence)
            "%s: sample streams and stores only an SD3/FLUX transformer so; it holds an SD UNet model's UNet whole and "
            "unquantized (nothing saved here%s); turn %s off: %s", " and ".join(f"{k}={getattr(cfg, k)}" for k in on),
            ", its images of the full-precision base" if "base_quant" in on else "", "it" if len(on) == 1 else "them",
            set_flags(on))
    pipe = family.make_pipeline(comps)
    pipe._lowmem_revision = comps.revision
    pipe._lowmem_family = family  # generate() calls the flow pipelines with their own arguments
    flow_sample.set_decode(pipe, cfg)
    if cfg.attention == "sliced":
        pipe.unet.set_attention_slice("auto")  # one attention slice at a time: lowest memory, slowest
    if cfg.offload_frozen and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)  # only the running module (text encoder/UNet/VAE) on the GPU
    else:
        pipe.to(device)
    return pipe


def place_denoiser(pipe, cfg) -> None:
    """SD3/FLUX: with the adapters loaded, the transformer to the device (block swap's blocks hooked, their weights
    in host memory). A UNet pipeline is placed already."""
    if flow_sample.is_flow(pipe):
        flow_sample.place_transformer(pipe, cfg)

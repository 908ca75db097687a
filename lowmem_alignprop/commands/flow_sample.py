"""``sample`` for SD3/SD3.5 and FLUX.1, loaded and placed as the trainer does (commands/train_setup.py ``_load``), so it
runs wherever training runs under the same profile:

1. the prompt set (every prompt of the evaluation: base and LoRA images use the same embeddings) is encoded with
   the family's prompt encoder, on the CPU with ``encode_on_cpu``, and the text encoders are freed; only then is
   the transformer read (``transformer_last``) or drawn (an architecture on meta): T5-XXL and the transformer are
   never in host memory together;
2. the LoRA adapters are loaded into the pipeline (``adapters.load_adapters``), then ``block_swap``'s blocks are
   hooked (memory/block_swap.py) and the rest of the transformer goes to the device (``model_to``);
3. each batch: the diffusers pipeline with the cached embeddings (``prompt_embeds``, ``pooled_prompt_embeds``,
   SD3's negative ones) returns latents; the VAE comes to the device for the decode (``offload_frozen``) and
   decodes as the pipeline would (its own slicing/tiling switches), so the images are the pipeline's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowmem_alignprop.run.tensor_files import is_safetensors
from lowmem_alignprop.settings.errors import UserError

# diffusers' key prefixes of text-encoder layers in a LoRA file (CLIP-L, CLIP-G / T5, SD3's T5)
_TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "text_encoder_3.")


@dataclass
class FlowSampling:
    """What ``generate`` needs beside the pipeline: the prompt cache, the placement of the frozen modules, and the
    block swap (installed once the adapters are loaded)."""
    family: Any
    comps: Any
    embed: Any
    place: Any
    device: torch.device
    swap: Any = None
    dtype: torch.dtype = torch.float32  # the frozen weights' (fp8 storage upcasts each layer to it)


def build_flow_pipeline(cfg, comps, family, device: torch.device, weight_dtype: torch.dtype, prompts):
    """The pipeline of components loaded with ``transformer_last``: ``prompts`` encoded and the text encoders
    freed first, then the transformer read (or drawn) to ``device`` (block swap's blocks to host memory)."""
    from lowmem_alignprop.memory.placement import Placement
    from lowmem_alignprop.models.family import encode_then_read

    place = Placement(device, offload=cfg.offload_frozen)
    embed = encode_then_read(comps, place, device, cfg, prompts, weight_dtype)  # the trainer's order
    pipe = family.make_pipeline(comps)  # no text encoder: it is called with the cached embeddings
    pipe._lowmem_family = family
    pipe._lowmem_flow = FlowSampling(family, comps, embed, place, device, dtype=weight_dtype)
    pipe.set_progress_bar_config(disable=True)
    if cfg.sliced_decode:
        pipe.vae.enable_slicing()  # decode one image at a time: the decoder's activations exist for one image
    if cfg.tiled_decode:
        pipe.vae.enable_tiling()  # decode in tiles: activations of one tile, not the whole image
    place.park("vae", pipe.vae)  # offload_frozen: on the CPU until the decode
    return pipe


def check_transformer_only(specs) -> None:
    """A LoRA with text-encoder layers cannot apply here: the prompts are encoded (by the base encoders, as in
    training) and the encoders freed before any adapter loads. One line, before any model loads."""
    from safetensors import safe_open

    for spec in specs:
        if not is_safetensors(spec.file):
            continue
        with safe_open(str(spec.file), framework="pt") as f:
            text = sum(1 for k in f.keys() if k.startswith(_TEXT_ENCODER_PREFIXES) and "lora" in k)
        if text:
            raise UserError(f"--lora {spec.arg} also adapts the text encoders ({text} weights): sample encodes the "
                            "prompts with the base text encoders and frees them before the transformer loads, as "
                            "training does; pass a LoRA of the transformer only (what training writes)")


def place_transformer(pipe, cfg) -> None:
    """With its adapters loaded, the transformer goes to the device, but for ``block_swap``'s first N blocks, whose
    weights wait in (pinned) host memory and come to the device one block at a time while it runs. ``base_quant=fp8``:
    the layers the read left in full precision (the adapters' base layers, the embedders) are stored in fp8 now, as
    the trainer stores them after LoRA: the base is the trained one, and takes the card memory it took there."""
    from lowmem_alignprop.memory.block_swap import install
    from lowmem_alignprop.memory.quant import store_fp8

    s = pipe._lowmem_flow
    pipe.transformer.requires_grad_(False)  # sampling trains nothing: a swapped block's LoRA weights swap with it
    if cfg.base_quant == "fp8":
        store_fp8(pipe.transformer, s.dtype)  # 1 byte per frozen Linear weight; before block swap pins the blocks
    s.swap = install(pipe.transformer, cfg.block_swap, s.device)
    (s.swap.model_to(pipe.transformer, s.device) if s.swap else pipe.transformer.to(s.device)).eval()


@torch.no_grad()
def generate_flow(pipe, prompts: list[str], seeds: list[int], cfg, batch_size: int) -> torch.Tensor:
    """Images in [0, 1] (float32, CPU), ``[len(prompts), 3, H, W]``: the pipeline (SD3: CFG on the negative prompt,
    FLUX: the guidance embedding; Euler, no eta) from the cached embeddings, image n from a CPU generator seeded
    ``seeds[n]``, decoded as the pipeline decodes."""
    s = pipe._lowmem_flow
    out = []
    for i in range(0, len(prompts), batch_size):
        emb = s.embed(prompts[i:i + batch_size])
        gens = [torch.Generator(device="cpu").manual_seed(n) for n in seeds[i:i + batch_size]]
        embeds = {"prompt_embeds": emb.cond, "pooled_prompt_embeds": emb.pooled}
        if emb.uncond is not None:  # SD3 with CFG: the negative prompt as training encoded it
            embeds.update(negative_prompt_embeds=emb.uncond, negative_pooled_prompt_embeds=emb.uncond_pooled)
        latents = pipe(**embeds, num_inference_steps=cfg.sample_steps, guidance_scale=s.family.guidance(cfg),
                       height=cfg.resolution, width=cfg.resolution, generator=gens, output_type="latent",
                       max_sequence_length=s.family.max_sequence_length(cfg)).images
        s.place.to_device("vae", pipe.vae)  # offload_frozen: on the device from the decode to its end only
        images = s.family.decode(pipe.vae, latents, cfg)
        s.place.park("vae", pipe.vae)
        out.append(images.float().cpu())  # kept on the CPU: the device holds one batch at a time
    return torch.cat(out)


def is_flow(pipe) -> bool:
    return getattr(pipe, "_lowmem_flow", None) is not None


__all__ = ["FlowSampling", "build_flow_pipeline", "check_transformer_only", "generate_flow", "is_flow",
           "place_transformer"]

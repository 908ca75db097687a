"""``sample`` for SD3/SD3.5 and FLUX.1, loaded and placed as the trainer does (training/train_setup.py ``_load``), so it
runs wherever training runs under the same profile:

1. the prompt set (every prompt of the evaluation: base and LoRA images alike) is encoded with
   the family's prompt encoder, on the CPU with ``encode_on_cpu``, and the text encoders are freed; only then is
   the transformer read (``transformer_last``) or drawn (an architecture on meta): T5-XXL and the transformer are
   never in host memory together;
   A LoRA with CLIP text-encoder layers (FLUX.1's CLIP-L, SD3's CLIP-L and CLIP-G) has them loaded into the encoders
   first, mixed at the LoRAs' weights, and the set is encoded twice: by the base encoders (the base images) and by
   the adapted ones (the LoRA images), as a diffusers pipeline with the LoRAs loaded would encode it; T5, which no
   LoRA adapts, runs in the first only (models/flow.T5Outputs);
2. the LoRA adapters are loaded into the transformer (``adapters.load_adapters``), then ``block_swap``'s blocks are
   hooked (memory/block_swap.py) and the rest of the transformer goes to the device (``model_to``);
3. each batch: the diffusers pipeline with the cached embeddings (``prompt_embeds``, ``pooled_prompt_embeds``,
   SD3's negative ones) returns latents; the VAE comes to the device for the decode (``offload_frozen``) and
   decodes as the pipeline would (its own slicing/tiling switches), so the images are the pipeline's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowmem_alignprop.run.tensor_files import is_safetensors, read_safetensors_shapes
from lowmem_alignprop.settings.errors import UserError


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
    adapted: Any = None  # the prompt cache of the encoders with the LoRAs' layers (None: the LoRAs have none)


def build_flow_pipeline(cfg, comps, family, device: torch.device, weight_dtype: torch.dtype, prompts, specs=()):
    """The pipeline of components loaded with ``transformer_last``: ``prompts`` encoded and the text encoders
    freed first, then the transformer read (or drawn) to ``device`` (block swap's blocks to host memory).
    ``specs`` (the LoRAs, lora_args.LoraSpec) with CLIP layers: the set encoded by the base encoders, then by the
    encoders with their layers mixed (:func:`_load_encoder_adapters`)."""
    from lowmem_alignprop.memory.placement import Placement
    from lowmem_alignprop.models.family import encode_then_read

    place = Placement(device, offload=cfg.offload_frozen)
    adapted = [s for s in specs if encoder_layers_in(s.file)]
    prepare = [None] + ([lambda text_pipe: _load_encoder_adapters(text_pipe, adapted)] if adapted else [])
    embeds = encode_then_read(comps, place, device, cfg, prompts, weight_dtype, prepare=prepare)  # the trainer's order
    pipe = family.make_pipeline(comps)  # no text encoder: it is called with the cached embeddings
    pipe._lowmem_family = family
    pipe._lowmem_flow = FlowSampling(family, comps, embeds[0], place, device, dtype=weight_dtype,
                                     adapted=embeds[1] if adapted else None)
    set_decode(pipe, cfg)
    place.park("vae", pipe.vae)  # offload_frozen: on the CPU until the decode
    return pipe


def set_decode(pipe, cfg) -> None:
    """``sample``'s pipeline, UNet or flow model (sample_pipeline.build_pipeline): no progress bar, and the VAE
    decoding as ``sliced_decode`` and ``tiled_decode`` ask."""
    pipe.set_progress_bar_config(disable=True)
    if cfg.sliced_decode:
        pipe.vae.enable_slicing()  # decode one image at a time: the decoder's activations exist for one image
    if cfg.tiled_decode:
        pipe.vae.enable_tiling()  # decode in tiles: activations of one tile, not the whole image


def encoder_layers_in(file) -> int:
    """How many text-encoder layers (their down weights) an SD3/FLUX LoRA file holds: in diffusers' names, or in
    kohya's or ComfyUI's (a FLUX.1 kohya file with modulation layers, which lora_args passes on in its own names for
    diffusers' reader to map); 0 for a .bin."""
    from lowmem_alignprop.models.flow_lora_parts import ENCODER_PREFIXES, OTHER_CLIP_PREFIXES, is_down_key

    if not is_safetensors(file):
        return 0
    return sum(1 for k in read_safetensors_shapes(file)
               if k.startswith(ENCODER_PREFIXES + OTHER_CLIP_PREFIXES) and is_down_key(k))


def check_no_t5_layers(specs) -> None:
    """A LoRA that adapts T5 (no diffusers loader reads its layers): one line, before any model loads."""
    from lowmem_alignprop.models.flow_lora_parts import t5_refusal
    from lowmem_alignprop.models.lora_layers import T5_KEYS

    for spec in specs:
        if is_safetensors(spec.file) and (t5 := sorted(k for k in read_safetensors_shapes(spec.file)
                                                        if k.startswith(T5_KEYS))):
            raise UserError(t5_refusal(f"--lora {spec.arg}", t5[0]))


def _load_encoder_adapters(text_pipe, specs) -> None:
    """Each LoRA's CLIP layers loaded into the encoders as its adapter, active at its weight (the set's second
    encoding, sample's LoRA images)."""
    from lowmem_alignprop.lora.adapters import load_encoder_part
    from lowmem_alignprop.models.flow_lora_parts import set_encoder_adapters

    for spec in specs:
        load_encoder_part(text_pipe, spec.file, spec.name, f"--lora {spec.arg}",
                          "it was trained for another base model: pass that model with --model")
    set_encoder_adapters(text_pipe, [s.name for s in specs], [s.weight for s in specs])


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
def generate_flow(pipe, prompts: list[str], seeds: list[int], cfg, batch_size: int,
                  adapted: bool = False) -> torch.Tensor:
    """Images in [0, 1] (float32, CPU), ``[len(prompts), 3, H, W]``: the pipeline (SD3: CFG on the negative prompt,
    FLUX: the guidance embedding; Euler, no eta) from the cached embeddings (``adapted``: the LoRA images, those of
    the encoders with the LoRAs' CLIP layers where they have any), image n from a CPU generator seeded
    ``seeds[n]``, decoded as the pipeline decodes."""
    s = pipe._lowmem_flow
    embed = s.adapted if adapted and s.adapted is not None else s.embed
    out = []
    for i in range(0, len(prompts), batch_size):
        emb = embed(prompts[i:i + batch_size])
        gens = [torch.Generator(device="cpu").manual_seed(n) for n in seeds[i:i + batch_size]]
        embeds = {"prompt_embeds": emb.cond, "pooled_prompt_embeds": emb.pooled}
        if emb.uncond is not None:  # SD3 with CFG: the negative prompt as training encoded it
            embeds.update(negative_prompt_embeds=emb.uncond, negative_pooled_prompt_embeds=emb.uncond_pooled)
        latents = pipe(**embeds, num_inference_steps=cfg.sample_steps, guidance_scale=s.family.guidance(cfg),
                       height=cfg.height, width=cfg.width, generator=gens, output_type="latent",
                       max_sequence_length=s.family.max_sequence_length(cfg)).images
        s.place.to_device("vae", pipe.vae)  # offload_frozen: on the device from the decode to its end only
        images = s.family.decode(pipe.vae, latents, cfg)
        s.place.park("vae", pipe.vae)
        out.append(images.float().cpu())  # kept on the CPU: the device holds one batch at a time
    return torch.cat(out)


def is_flow(pipe) -> bool:
    return getattr(pipe, "_lowmem_flow", None) is not None


__all__ = ["FlowSampling", "build_flow_pipeline", "check_no_t5_layers", "encoder_layers_in", "generate_flow",
           "is_flow",
           "place_transformer"]

"""The model family: one object per kind of denoiser that the trainer, the step and ``sample`` call, so that the
difference between UNets (SD 1.x/2.x/SDXL, DDIM) and flow-matching transformers (SD3/SD3.5, FLUX.1, Euler) lives
here and nowhere else.

    family = family_for(comps)
    embed = family.prompt_encoder(pipe, comps, place, device, cfg, prompts)   # text embeddings per batch
    latents = family.initial_latents(cfg, batch, generator, device)           # the starting noise
    latents = family.rollout(cfg, model, grad_model, scheduler, latents, emb, k=k, generator=g, stage=stage)
    images = family.decode(vae, latents, cfg)                                 # [B, 3, H, W] in [0, 1]
    params = family.add_lora(model, cfg); family.save_lora(pipeline_class, model, layers, out_dir)
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

from lowmem_alignprop.models import flow, sampling
from lowmem_alignprop.models.merged_lora import lora_merged

log = logging.getLogger(__name__)


def nograd_context(cfg, model):
    """What a rollout's steps before the gradient window run inside: with merge_lora_nograd, ``model``'s LoRA merged
    into copies of its adapted layers' weights (fewer ops per call; models/merged_lora.py), else nothing."""
    return functools.partial(lora_merged, model) if cfg.merge_lora_nograd else None


class UNetFamily:
    """SD 1.x / 2.x / SDXL: DDIM with classifier-free guidance, LoRA in diffusers' UNet key format."""
    name = "unet"
    flow = False

    def __init__(self, comps):
        self.comps = comps

    def make_pipeline(self, comps):
        return sampling.make_pipeline(comps)

    def prompt_encoder(self, pipe, comps, place, device, cfg, prompts, *, final: bool = False):
        """Text embeddings per batch of prompts. ``final``: the run's one encoder (the trainer's), whose prompt set
        never grows: a flow family then frees the text encoders once the set is encoded."""
        return sampling.PromptEncoder(pipe, comps, place, device, (cfg.height, cfg.width),
                                      cache=cfg.cache_prompt_embeddings, negative_prompt=cfg.negative_prompt,
                                      prompts=prompts)

    def sized_embed(self, embed, cfg):
        """The prompt embeddings a step at ``cfg``'s image size reads (several sizes a run): SDXL's size
        conditioning (add_time_ids) is that size's, whatever size the encoder was made for."""
        return functools.partial(embed, size=(cfg.height, cfg.width))

    def initial_latents(self, cfg, batch: int, generator, device):
        return sampling.initial_latents(batch, self.comps.unet, self.comps.vae, (cfg.height, cfg.width), generator,
                                        device)

    def rollout(self, cfg, model, grad_model, scheduler, latents, emb, *, k: int, generator, stage=None, kl=None,
                detached=frozenset()):
        scheduler.set_timesteps(cfg.sample_steps, device=latents.device)
        return sampling.rollout(model, scheduler, latents, emb, k=k, guidance_scale=cfg.guidance_scale, eta=cfg.eta,
                                generator=generator, guidance_rescale=cfg.guidance_rescale, stage=stage,
                                grad_unet=grad_model, kl=kl,
                                lv_draws=cfg.lv_draws if k else 1,  # the no-grad samples: one draw
                                window_keep=cfg.window_keep, detached=detached,
                                nograd_context=nograd_context(cfg, model))

    def decode(self, vae, latents, cfg, **options):
        return sampling.decode(vae, latents, **options)

    def set_attention(self, model, vae, attention: str, device) -> str:
        from lowmem_alignprop.models.loading import set_attention
        return set_attention(model, vae, attention, device)

    def add_lora(self, model, cfg):
        from lowmem_alignprop.models.loading import add_lora
        return add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.seed, cfg.lora_layers)

    def lora_state_dict(self, model) -> dict:
        from lowmem_alignprop.models.loading import lora_state_dict
        return lora_state_dict(model)

    def save_lora(self, pipeline_class, model, layers: dict, out_dir, kept: dict | None = None) -> None:
        """``layers`` (the trained LoRA) and ``kept`` (the layers the run keeps as its --init-lora had them:
        models/kept_lora.py) in one file, as diffusers loads it."""
        from lowmem_alignprop.models.kept_lora import save_with_kept
        from lowmem_alignprop.models.lora_metadata import lora_metadata
        save_with_kept(pipeline_class, out_dir, layers, lora_metadata(model.peft_config["default"]), kept or {})

    native_cells = None  # the model's size in latent cells where its config has no sample_size

    def resolution_note(self, cfg) -> str | None:
        """A warning for each image size far from the model's own (several sizes: each said)."""
        notes = (sampling.resolution_note(self.comps.unet, self.comps.vae, size, default_size=self.native_cells)
                 for size in cfg.shapes)
        return "; ".join(dict.fromkeys(note for note in notes if note)) or None

    def cut_prompts_note(self, cfg, prompts: list[str]) -> str | None:
        """Prompts longer than the text encoder reads (CLIP's 77 tokens), which the encoding cuts: said once."""
        from lowmem_alignprop.models.prompt_length import cut_prompts_note
        return cut_prompts_note(self.comps.tokenizer, prompts)


class FlowFamily(UNetFamily):
    """SD3/SD3.5 (``sd3``) and FLUX.1 (``flux``): the schedule, guidance and Euler steps of the model's own
    pipeline (:mod:`lowmem_alignprop.models.flow`), the prompt set encoded once (T5-XXL leaves the device after),
    LoRA (models/lora_layers.py) saved in the pipeline's peft key format."""
    flow = True

    def __init__(self, comps):
        super().__init__(comps)
        self.name = comps.family

    # -- defaults the model's pipeline uses ----------------------------------------------------------
    def max_sequence_length(self, cfg) -> int:
        """T5 tokens per prompt: the config's, else 512 for FLUX.1-dev and 256 for SD3.5 and schnell, never more
        than the T5 tokenizer reads."""
        if cfg.max_sequence_length:
            return cfg.max_sequence_length
        dev = self.name == flow.FLUX and self.comps.unet.config.guidance_embeds
        t5_tok = self.comps.tokenizer_2 if self.name == flow.FLUX else self.comps.tokenizer_3
        limit = getattr(t5_tok, "model_max_length", 512) if t5_tok is not None else 512
        return min(512 if dev else 256, limit)

    def cut_prompts_note(self, cfg, prompts: list[str]) -> str | None:
        """T5 carries the prompt's tokens (CLIP's 77 only its pooled summary, and SD3's first tokens): prompts longer
        than max_sequence_length T5 tokens are cut; SD3 without T5 reads CLIP's 77."""
        from lowmem_alignprop.models.prompt_length import cut_prompts_note

        t5_tok = self.comps.tokenizer_2 if self.name == flow.FLUX else self.comps.tokenizer_3
        if t5_tok is None:  # SD3 with t5_encoder=false
            return super().cut_prompts_note(cfg, prompts)
        if getattr(t5_tok, "stand_in", False):  # an architecture's random-weight model: no T5 vocabulary to count
            return None
        limit = self.max_sequence_length(cfg)
        most = min(512, getattr(t5_tok, "model_max_length", 512))
        return cut_prompts_note(t5_tok, prompts, limit, f"T5 (max_sequence_length={limit})",
                                f"raise --set max_sequence_length (up to {most}) or shorten them" if limit < most
                                else "shorten them to keep every word")

    def guidance(self, cfg) -> float:
        """SD3: the CFG scale; FLUX.1-dev: the guidance embedding's value; schnell: none (ignored)."""
        return cfg.guidance_scale

    def make_pipeline(self, comps):
        parts = dict(transformer=comps.unet, vae=comps.vae, scheduler=comps.scheduler,
                     text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                     text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2)
        if self.name == flow.SD3:
            parts.update(text_encoder_3=comps.text_encoder_3, tokenizer_3=comps.tokenizer_3)
        return comps.pipeline_class(**parts)

    def prompt_encoder(self, pipe, comps, place, device, cfg, prompts, *, final: bool = False):
        # always cached: T5-XXL (4.7B parameters) is on the device for one encoding pass, then leaves it; the run's
        # final encoder then drops the encoders: 9.5 GB of host memory back for the steps
        release = (lambda: self._drop_text_encoders(pipe, comps)) if final else None
        if not cfg.encode_on_cpu:
            return flow.FlowPromptCache(pipe, prompts, device, guidance_scale=self.guidance(cfg),
                                        max_sequence_length=self.max_sequence_length(cfg), place=place,
                                        negative_prompt=cfg.negative_prompt, release=release)
        place.offload("text_encoder", *comps.text_encoders())  # encode_on_cpu: the encoders never reach the device
        cache = flow.FlowPromptCache(pipe, prompts, "cpu", guidance_scale=self.guidance(cfg),
                                     max_sequence_length=self.max_sequence_length(cfg),
                                     negative_prompt=cfg.negative_prompt, release=release)
        return _OnDevice(cache, device)

    @staticmethod
    def _drop_text_encoders(pipe, comps) -> None:
        """The run's prompt set is encoded and never grows: no reference to the text encoders is left (the
        components' and the pipeline's), so their memory is freed."""
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(comps, name, None) is not None:
                setattr(comps, name, None)
            if getattr(pipe, name, None) is not None:
                setattr(pipe, name, None)  # diffusers records the component as (None, None) in the pipeline config

    def sized_embed(self, embed, cfg):
        return embed  # (a flow model's text conditioning does not depend on the image size)

    def _latent_size(self, cfg):
        return flow.latent_size(self.comps.vae, cfg.height, cfg.width, self.name)

    def initial_latents(self, cfg, batch: int, generator, device):
        latents, _ = flow.initial_latents(self.comps.unet, self.comps.vae, batch, cfg.height, cfg.width, generator,
                                          device)
        return latents

    def rollout(self, cfg, model, grad_model, scheduler, latents, emb, *, k: int, generator=None, stage=None,
                kl=None, detached=frozenset()):
        lh, lw = self._latent_size(cfg)
        flow.set_flow_timesteps(scheduler, self.comps.unet, cfg.sample_steps, lh, lw, latents.device)
        ids = flow.latent_image_ids(lh, lw, latents.device) if self.name == flow.FLUX else None
        return flow.rollout(model, scheduler, latents, emb, k=k, guidance_scale=self.guidance(cfg), img_ids=ids,
                            stage=stage, grad_transformer=grad_model, kl=kl, generator=generator,
                            lv_draws=cfg.lv_draws if k else 1,  # the no-grad samples: one draw
                            window_keep=cfg.window_keep, detached=detached,
                            nograd_context=nograd_context(cfg, model))

    def decode(self, vae, latents, cfg, **options):
        return flow.decode(vae, latents, height=cfg.height, width=cfg.width, **options)

    def set_attention(self, model, vae, attention: str, device) -> str:
        # the transformers' own processors already call PyTorch's fused scaled-dot-product attention
        if attention != "sdpa":
            log.warning("attention=%s applies to UNets: SD3/FLUX use their own sdpa attention processors", attention)
        return "sdpa"

    def add_lora(self, model, cfg):
        return flow.add_flow_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.seed, cfg.lora_layers)

    def lora_state_dict(self, model) -> dict:
        from peft.utils import get_peft_model_state_dict
        # peft's keys as they are: diffusers' UNet conversion (lora.down/up) is what SD3's loader drops
        return get_peft_model_state_dict(flow._bare(model))

    def save_lora(self, pipeline_class, model, layers: dict, out_dir, kept: dict | None = None) -> None:
        """As a UNet's (:meth:`UNetFamily.save_lora`): the transformer's kept --init-lora linears beside the trained
        layers, peft's names."""
        from lowmem_alignprop.models.kept_lora import save_with_kept
        from lowmem_alignprop.models.lora_metadata import lora_metadata
        bare = flow._bare(model)
        save_with_kept(pipeline_class, out_dir, layers, lora_metadata(bare.peft_config["default"], layers=layers),
                       kept or {}, denoiser="transformer")

    native_cells = 128  # FLUX.1's config has no sample_size: it was trained at 1024 px (128 latent cells)


class _OnDevice:
    """A prompt cache filled on the CPU whose batches go to the device (``encode_on_cpu``)."""

    def __init__(self, cache, device):
        self.inner, self.device = cache, device

    @property
    def cache(self):
        return self.inner.cache

    on_host = True  # (its cache is filled on the CPU)

    def encode_all(self) -> None:
        self.inner.encode_all()

    def nbytes(self) -> int:
        return self.inner.nbytes()

    def __call__(self, batch_prompts):
        return self.inner(batch_prompts).to(self.device)


def check_supported(comps, cfg) -> None:
    """What a model family does not do (one line before anything is written). Every option of the UNet step now
    works for SD3/FLUX too (kl_coeff and lv_draws since issue 18); FLUX.1 has no negative branch; a flow model's
    resolution is a multiple of its token's pixels."""
    from lowmem_alignprop.settings.config import FLUX_NEGATIVE, no_t5_to_leave_out
    from lowmem_alignprop.settings.errors import UserError
    from lowmem_alignprop.settings.image_size import size_values
    from lowmem_alignprop.settings.model_kind import check_flow_resolution, flow_geometry_of

    family = getattr(comps, "family", "unet")
    if family == flow.FLUX and cfg.negative_prompt:
        raise UserError(FLUX_NEGATIVE)  # (a hub id or a transformer file: Config.validate could not tell)
    if family != flow.SD3 and not cfg.t5_encoder:
        raise UserError(no_t5_to_leave_out(family == flow.FLUX))
    if family != "unet":  # (Config.validate checked it already where the model's files told)
        geometry = flow_geometry_of(family == flow.FLUX, dict(comps.unet.config), dict(comps.vae.config))
        for value in size_values(cfg.resolution):  # (each side of a "WxH", each size of a list)
            check_flow_resolution(value, (family, *geometry))


def model_kind(comps) -> str:
    """What the profiles are made for (settings/profiles.MODEL_KINDS) of loaded components: sd, sdxl, sd35m, sd35l
    or flux (settings/model_kind.model_kind_of tells it from a --model value before loading, where it can)."""
    from lowmem_alignprop.settings.model_kind import sd3_kind

    family = getattr(comps, "family", "unet")
    if family == "unet":
        return "sdxl" if comps.is_sdxl else "sd"
    if family == "flux":
        return "flux"
    return sd3_kind(comps.unet.config.get("num_layers", 0))


def family_for(comps) -> UNetFamily:
    """The family object of loaded components (``comps.family``: unet, sd3 or flux)."""
    return FlowFamily(comps) if getattr(comps, "family", "unet") != "unet" else UNetFamily(comps)


def materialize_meta(comps, device, seed: int = 0, *, base_quant: str = "none", dtype=None,
                     host_blocks: int = 0, text_only: bool = False, lora_layers: str = "attention") -> None:
    """An architecture-only model built on meta gets random weights on ``device`` (drawn there: a 12B transformer
    is initialised on the GPU in seconds, never on the CPU). With ``base_quant`` int8/nf4/fp8 the transformer is
    drawn and quantized (fp8: stored in fp8, the LoRA targets after LoRA) one block at a time
    (``block_loading.materialize_quantized``): FLUX's 23.8 GB of bf16 never exist at once.
    ``host_blocks`` (block_swap): the first N blocks end up in CPU memory, drawn on the device one at a time.
    ``text_only``: the text encoders only (the trainer encodes its prompts before the transformer exists); a
    second call makes the rest, with the same weights as one call. ``lora_layers``: which layers fp8 keeps."""
    from lowmem_alignprop.memory.quant import BNB_MODES
    from lowmem_alignprop.models.lora_layers import lora_targets
    from lowmem_alignprop.models.block_loading import materialize, materialize_quantized

    for i, module in enumerate((comps.unet, comps.vae, *comps.text_encoders())):
        if (text_only and i < 2) or not any(t.is_meta for t in module.parameters()):
            continue
        if module is comps.unet and (base_quant in BNB_MODES or base_quant == "fp8" or host_blocks):
            # fp8: each block stored in fp8 as it is drawn, but the LoRA targets (after LoRA: apply_memory_features)
            materialize_quantized(module, device, base_quant, dtype or torch.bfloat16, seed=seed + i,
                                  host_blocks=host_blocks, keep=tuple(lora_targets(lora_layers, flow=True)) if base_quant == "fp8" else ())
            continue
        # the text encoders are made on the CPU, where the placement keeps them (T5-XXL: 9.5 GB in bf16)
        on = device if module in (comps.unet, comps.vae) else "cpu"
        materialize(module, on, seed=seed + i)
    comps.meta = text_only


def encode_then_read(comps, place, device, cfg, prompts, dtype, prepare=(None,)) -> list:
    """SD3/FLUX loaded with ``transformer_last`` (the trainer's and ``sample``'s order): the text encoders made (an
    architecture's drawn first, the same weights as in one call), every prompt in ``prompts`` encoded and the
    encoders freed, and only then the transformer read block by block to where it runs (or drawn there, block
    swap's blocks to host memory). T5-XXL (9.5 GB) and the transformer are never in memory together.
    ``prepare``: one encoding of the set per item, each called first with the text pipeline unless None (a LoRA's
    text-encoder layers loaded: models/flow_lora_parts.py). Returns the filled prompt encoders, one per item."""
    from lowmem_alignprop.models.loading import read_transformer

    family = family_for(comps)
    if comps.meta:
        materialize_meta(comps, device, cfg.seed, text_only=True)
    pipe, embeds = family.make_pipeline(comps), []
    t5 = flow.T5Outputs(pipe)  # a second encoding of the set reads T5's first outputs: no LoRA adapts T5
    for i, step in enumerate(prepare):
        if step is not None:
            step(pipe)
        embeds.append(family.prompt_encoder(pipe, comps, place, device, cfg, prompts, final=i == len(prepare) - 1))
        with t5.kept() if i == 0 and len(prepare) > 1 else t5.reused() if i else contextlib.nullcontext():
            embeds[-1].encode_all()  # (the last frees the encoders)
    del t5  # (T5-XXL is freed before the transformer is read)
    read_transformer(comps)  # a checkpoint's, block by block to the device (block swap's blocks to the CPU)
    if comps.meta:  # random weights drawn on the device, never initialised on the CPU
        materialize_meta(comps, device, cfg.seed, base_quant=cfg.base_quant, dtype=dtype, host_blocks=cfg.block_swap,
                         lora_layers=cfg.lora_layers)
    return embeds


def model_defaults_note(comps, cfg) -> str | None:
    """Settings far from what the model's own pipeline uses (e.g. FLUX.1-schnell with 50 steps), or that it does
    not read (DDIM's eta on a flow model)."""
    from lowmem_alignprop.settings.config import Config

    family, notes = getattr(comps, "family", "unet"), []
    schnell = family == flow.FLUX and not comps.unet.config.guidance_embeds
    if schnell and cfg.sample_steps > 8:
        notes.append(f"FLUX.1-schnell samples in 1-4 steps; sample_steps={cfg.sample_steps} costs time for nothing: "
                     "--set sample_steps=4")
    if schnell and cfg.guidance_scale != Config.guidance_scale:
        notes.append(f"guidance_scale={cfg.guidance_scale:g}: FLUX.1-schnell has no guidance embedding and no "
                     "classifier-free pass: it changes nothing here")
    if family == flow.FLUX and not schnell and cfg.guidance_scale > 5:  # e.g. an SD1.5 profile's 7.5 (cpu's)
        notes.append(f"guidance_scale={cfg.guidance_scale:g}: FLUX.1-dev's guidance embedding was distilled near 3.5 "
                     "(FluxPipeline's default); larger burns colours and contrast: --set guidance_scale=3.5")
    if family != "unet" and not schnell and cfg.sample_steps < 20:  # e.g. the cpu profile's 10 DDIM steps
        notes.append(f"sample_steps={cfg.sample_steps}: SD3.5 and FLUX.1-dev's pipelines sample in 28 Euler steps "
                     "(fewer leave the images blurred; the window's K steps are among the last): --set sample_steps=28")
    if family != "unet" and cfg.eta != Config.eta:
        notes.append(f"eta={cfg.eta:g} is DDIM's (UNet models); SD3/FLUX step with Euler, which draws no noise: it "
                     "changes nothing here")
    return "; ".join(notes) or None


__all__ = ["FlowFamily", "UNetFamily", "check_supported", "encode_then_read", "family_for", "materialize_meta",
           "model_defaults_note"]

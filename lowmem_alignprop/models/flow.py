"""The differentiable rollout for flow-matching transformers (SD3 / SD3.5 and FLUX.1): prompt encoding once,
Euler steps of the rectified-flow ODE, AlignProp's truncated backprop, decode of the 16-channel latents.

Everything the model's own pipeline decides is taken from diffusers, not rewritten: the sigma schedule
(``retrieve_timesteps`` and ``calculate_shift`` from the pipeline modules, on the model's
``FlowMatchEulerDiscreteScheduler``, which applies its ``shift`` or, with ``use_dynamic_shifting``, the
resolution-dependent shift ``mu``), the Euler step (``scheduler.step``), FLUX's 2x2 latent packing and its
position ids (``FluxPipeline._pack_latents`` / ``_unpack_latents`` / ``_prepare_latent_image_ids``) and the
prompt encoders (the pipelines' ``encode_prompt``). So with the same latents, steps and guidance, our images are
the pipeline's (tests/test_flow.py checks it for both families).

Guidance: SD3/SD3.5 use classifier-free guidance (the negative prompt, empty by default, and the prompt batched in
one transformer call, as the pipeline does, when ``guidance_scale > 1``); FLUX.1-dev takes the guidance scale as an
input of the transformer (its guidance embedding; one call, no negative prompt); FLUX.1-schnell has no guidance
input at all and samples in a few steps (its scheduler has a fixed shift of 1).

Truncation is the UNet rollout's own code (:func:`lowmem_alignprop.models.sampling.truncated_chain`): the window
is drawn per rollout (:func:`~lowmem_alignprop.models.sampling.draw_window`: K once, or with truncation=per_step a K
per step), the steps before it run without autograd, the latent entering it is detached, and each transformer call
with gradient in it is one gradient checkpoint. Block checkpointing is the UNet's too
(:func:`lowmem_alignprop.models.sampling.enable_block_checkpointing`: a recompute of the base model's call for the
KL term runs with the adapters off).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from lowmem_alignprop.memory.precision import compute_dtype
from lowmem_alignprop.memory.recompute import checkpoint
from lowmem_alignprop.models.sampling import decode as _decode_latents
from lowmem_alignprop.models.sampling import (ENCODE_CHUNK, BatchedTensors, adapters_off, cached_batch, draw_window,
                                             encode_in_chunks, truncated_chain, vae_scale_factor, with_repeated_embeds)

__all__ = ["FlowEmbeds", "FlowPromptCache", "add_flow_lora", "base_velocity", "decode",
           "draw_window", "encode_prompts", "family_of", "guided_velocity",
           "image_seq_len", "initial_latents", "last_step_draws", "latent_image_ids", "latent_size", "pack",
           "rollout", "sample_images", "save_flow_lora", "set_flow_timesteps", "unpack"]

SD3, FLUX = "sd3", "flux"


def _bare(module):
    """The model under a DDP/DeepSpeed/compile wrapper."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def family_of(transformer) -> str:
    """``"sd3"`` (SD3Transformer2DModel: SD3 / SD3.5) or ``"flux"`` (FluxTransformer2DModel: FLUX.1)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    model = _bare(transformer)
    if isinstance(model, FluxTransformer2DModel):
        return FLUX
    if isinstance(model, SD3Transformer2DModel):
        return SD3
    raise TypeError(f"not a flow-matching transformer this module knows: {type(model).__name__}")


# --------------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------------

@dataclass
class FlowEmbeds(BatchedTensors):
    """Text conditioning for a batch.

    ``cond``: the token embeddings the transformer attends to ([B, S, D]: SD3's CLIP-L+G and T5 tokens joined,
    FLUX's T5 tokens); ``pooled``: the pooled vector ([B, P]: SD3's CLIP-L and G pooled side by side, FLUX's
    CLIP-L pooled). ``uncond``/``uncond_pooled``: the empty prompt's, for SD3's classifier-free guidance (None for
    FLUX). ``text_ids``: FLUX's text position ids ([S, 3], the same for every prompt; None for SD3).
    """
    cond: torch.Tensor
    pooled: torch.Tensor
    uncond: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None

    SHARED = ("text_ids",)  # the same position ids for every prompt


def _text_encoders(pipe) -> tuple:
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return tuple(m for m in (getattr(pipe, n, None) for n in names) if m is not None)


class T5Outputs:
    """T5's outputs of one encoding of a prompt set, kept in host memory by their token ids, for a second encoding of
    the same set by the same pipeline (``sample`` of a LoRA with CLIP layers encodes it with the base encoders, then
    with the adapted ones): no loader puts a LoRA on T5 (a LoRA with T5 layers is refused:
    flow_lora_parts.t5_refusal), so its outputs are the same, and T5-XXL (4.7B parameters; minutes on a CPU with
    ``encode_on_cpu``) runs once. :meth:`kept` records them (a forward hook: the pipeline calls its T5 with the token
    ids first), :meth:`reused` returns them in place of T5's forward; token ids not kept run T5."""

    def __init__(self, pipe):
        self.t5 = next((m for m in _text_encoders(pipe) if type(m).__name__.startswith("T5")), None)
        self.outputs: dict[bytes, torch.Tensor] = {}

    @staticmethod
    def _key(ids) -> bytes | None:
        return repr(tuple(ids.shape)).encode() + ids.cpu().numpy().tobytes() if isinstance(ids, torch.Tensor) else None

    @contextlib.contextmanager
    def kept(self):
        def keep(module, args, output):
            if args and (key := self._key(args[0])) is not None:
                self.outputs[key] = output[0].detach().to("cpu", copy=True)  # (host memory: the device is freed)

        handle = self.t5.register_forward_hook(keep) if self.t5 is not None else None
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    @contextlib.contextmanager
    def reused(self):
        t5, forward = self.t5, getattr(self.t5, "forward", None)
        own = vars(t5).get("forward") if t5 is not None else None  # (a forward set on the instance: kept)

        def kept_output(input_ids=None, *args, **kwargs):
            if (out := self.outputs.get(self._key(input_ids))) is None:
                return forward(input_ids, *args, **kwargs)
            return (out.to(input_ids.device),)  # (the pipelines read [0]: the last hidden state)

        if t5 is not None:
            t5.forward = kept_output
        try:
            yield
        finally:
            if t5 is not None:
                if own is None:
                    del t5.forward  # (the class's forward again)
                else:
                    t5.forward = own
            self.t5, forward = None, None  # (no reference left: the set is encoded, T5 may be freed)
            self.outputs.clear()


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device, *, guidance_scale: float,
                   max_sequence_length: int, negative_prompt: str = "") -> FlowEmbeds:
    """Prompts -> text embeddings with the pipeline's own ``encode_prompt`` (frozen encoders, no gradient).

    SD3: CLIP-L + CLIP-G (+ T5 when the pipeline has ``text_encoder_3``; without it the pipeline puts zeros in
    the T5 tokens' place, as SD3 was trained to accept); ``negative_prompt`` (empty: the empty prompt, as the
    pipeline's default) is encoded too when ``guidance_scale > 1``. FLUX: CLIP-L pooled + T5 tokens and the text
    position ids (no negative branch).
    """
    prompts = list(prompts)
    if family_of(pipe.transformer) == FLUX:
        cond, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                    num_images_per_prompt=1, max_sequence_length=max_sequence_length)
        return FlowEmbeds(cond, pooled, text_ids=text_ids)
    cfg = guidance_scale > 1.0
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
        do_classifier_free_guidance=cfg, negative_prompt=[negative_prompt] * len(prompts) if cfg else None,
        max_sequence_length=max_sequence_length)
    return FlowEmbeds(cond, pooled, uncond, uncond_pooled)


class FlowPromptCache:
    """The whole prompt set encoded once (:data:`~lowmem_alignprop.models.sampling.ENCODE_CHUNK` prompts at a time);
    then the text encoders leave the device.

    T5-XXL alone is 4.7B parameters (9.5 GB in bf16): it is on the device only for this one pass. ``place`` is
    the trainer's placement (``to_device(name, *modules)`` / ``offload(name, *modules)``); without one the
    encoders stay where they are. A prompt outside the set is a KeyError: the set is fixed before training.
    ``release`` is called once the set is encoded (the trainer's drops the encoders; the cache then holds no
    reference to them either).
    """

    def __init__(self, pipe, prompts, device, *, guidance_scale: float, max_sequence_length: int, place=None,
                 chunk: int = ENCODE_CHUNK, negative_prompt: str = "", release=None):
        self.pipe, self.device, self.place, self.chunk, self.release = pipe, device, place, chunk, release
        self.negative_prompt = negative_prompt
        self.guidance_scale, self.max_sequence_length = guidance_scale, max_sequence_length
        self.prompts = sorted(set(prompts))
        self.cache: dict[str, FlowEmbeds] = {}
        self.on_host = False  # a large prompt set's embeddings wait in host memory (sampling.crowds_device)

    def _fill(self) -> None:
        encoders = _text_encoders(self.pipe)
        if self.place is not None:
            self.place.to_device("text_encoder", *encoders)
        self.cache, self.on_host = encode_in_chunks(self.prompts, lambda part: encode_prompts(
            self.pipe, part, self.device, guidance_scale=self.guidance_scale,
            max_sequence_length=self.max_sequence_length, negative_prompt=self.negative_prompt), self.place, self.chunk)
        if self.place is not None:
            self.place.offload("text_encoder", *encoders)
        del encoders
        if self.release is not None:
            self.release()
            self.pipe = None  # the encoding is done: nothing here keeps the encoders alive

    def encode_all(self) -> None:
        """Encode the whole set now, not at the first batch (the trainer: before the transformer is read)."""
        if not self.cache:
            self._fill()

    def nbytes(self) -> int:
        """The memory the encoded set holds: its distinct storages (each chunk of 16 prompts encoded together)."""
        seen = {}
        for embeds in self.cache.values():
            for t in vars(embeds).values():
                if isinstance(t, torch.Tensor):
                    seen[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return sum(seen.values())

    def __call__(self, batch_prompts: list[str]) -> FlowEmbeds:
        self.encode_all()
        return cached_batch(self.cache, batch_prompts, self.on_host, self.place, self.device)


# --------------------------------------------------------------------------------------------------
# schedule and latents, as the pipelines prepare them
# --------------------------------------------------------------------------------------------------

def latent_size(vae, height: int, width: int, family: str) -> tuple[int, int]:
    """The latent grid of an image; FLUX rounds it to even sizes (2x2 patches are packed into tokens)."""
    s = vae_scale_factor(vae)
    if family == FLUX:
        return 2 * (int(height) // (s * 2)), 2 * (int(width) // (s * 2))
    return int(height) // s, int(width) // s


def image_seq_len(transformer, latent_h: int, latent_w: int) -> int:
    """The number of image tokens the transformer sees (what the resolution-dependent shift depends on)."""
    if family_of(transformer) == FLUX:
        return (latent_h // 2) * (latent_w // 2)
    patch = _bare(transformer).config.patch_size
    return (latent_h // patch) * (latent_w // patch)


def set_flow_timesteps(scheduler, transformer, steps: int, latent_h: int, latent_w: int, device=None) -> torch.Tensor:
    """Set the scheduler's sigmas for ``steps`` Euler steps exactly as the model's pipeline does; returns them.

    SD3: the scheduler's own schedule (``shift``; ``mu`` from ``calculate_shift`` only when the scheduler config
    asks for dynamic shifting). FLUX: sigmas ``linspace(1, 1/steps, steps)`` (unless ``use_flow_sigmas``) and
    ``mu`` from the image's token count (the scheduler uses it only with ``use_dynamic_shifting``: dev shifts with
    the resolution, schnell does not).
    """
    seq = image_seq_len(transformer, latent_h, latent_w)
    conf = scheduler.config
    if family_of(transformer) == FLUX:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        sigmas = None if conf.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(seq, conf.get("base_image_seq_len", 256), conf.get("max_image_seq_len", 4096),
                             conf.get("base_shift", 0.5), conf.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
    else:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (calculate_shift,
                                                                                        retrieve_timesteps)

        kwargs = {}
        if conf.get("use_dynamic_shifting", None):
            kwargs["mu"] = calculate_shift(seq, conf.get("base_image_seq_len", 256),
                                           conf.get("max_image_seq_len", 4096), conf.get("base_shift", 0.5),
                                           conf.get("max_shift", 1.16))
        timesteps, _ = retrieve_timesteps(scheduler, steps, device, **kwargs)
    scheduler.set_begin_index(0)  # each rollout walks the schedule from its first sigma
    return timesteps


def latent_image_ids(latent_h: int, latent_w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """FLUX's image-token position ids for a latent grid (one row per packed 2x2 patch)."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, latent_h // 2, latent_w // 2, device, dtype)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> FLUX's tokens [B, H/2 * W/2, 4C]."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(latents: torch.Tensor, height: int, width: int, vae) -> torch.Tensor:
    """FLUX's tokens -> [B, C, H, W] latents of a ``height`` x ``width`` image."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(latents, height, width, vae_scale_factor(vae))


def initial_latents(transformer, vae, batch: int, height: int, width: int, generator: torch.Generator,
                    device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Starting noise (drawn on the CPU for reproducibility) and, for FLUX, the image position ids.

    SD3: [B, C, h, w]; FLUX: the same noise packed into [B, h/2 * w/2, 4C] tokens, as FluxPipeline draws it.
    """
    family = family_of(transformer)
    lh, lw = latent_size(vae, height, width, family)
    config = _bare(transformer).config
    channels = config.in_channels // 4 if family == FLUX else config.in_channels
    noise = torch.randn((batch, channels, lh, lw), generator=generator, device="cpu")
    if family == FLUX:
        return pack(noise).to(device), latent_image_ids(lh, lw, device)
    return noise.to(device), None


# --------------------------------------------------------------------------------------------------
# the velocity and the rollout
# --------------------------------------------------------------------------------------------------

def guided_velocity(transformer, latents, t, emb: FlowEmbeds, guidance_scale: float, img_ids=None,
                    dtype: torch.dtype | None = None):
    """One transformer call -> the guided velocity (float32), as the model's pipeline computes it.

    SD3: classifier-free guidance with both branches in one batch when ``guidance_scale > 1``; timesteps in
    [0, 1000]. FLUX: timesteps / 1000, the guidance scale into the guidance embedding when the model has one
    (dev), nothing for schnell; ``img_ids`` from :func:`initial_latents`. Inputs are cast to ``dtype`` (default:
    the transformer's :func:`compute_dtype`).
    """
    bare = _bare(transformer)
    dtype = dtype or compute_dtype(bare)
    if family_of(bare) == FLUX:
        if img_ids is None:
            raise ValueError("FLUX needs the image position ids (initial_latents returns them)")
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
        guidance = None
        if bare.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=latents.device, dtype=torch.float32)
            guidance = guidance.expand(latents.shape[0])
        return transformer(hidden_states=latents.to(dtype), timestep=timestep, guidance=guidance,
                           pooled_projections=emb.pooled.to(dtype), encoder_hidden_states=emb.cond.to(dtype),
                           txt_ids=emb.text_ids, img_ids=img_ids, return_dict=False)[0].float()
    use_cfg = guidance_scale > 1.0
    if use_cfg and emb.uncond is None:
        raise ValueError("classifier-free guidance needs the empty prompt's embeddings (encode with "
                         "guidance_scale > 1)")
    x = torch.cat([latents, latents]) if use_cfg else latents
    hidden = torch.cat([emb.uncond, emb.cond]) if use_cfg else emb.cond
    pooled = torch.cat([emb.uncond_pooled, emb.pooled]) if use_cfg else emb.pooled
    out = transformer(hidden_states=x.to(dtype), timestep=t.expand(x.shape[0]), encoder_hidden_states=hidden.to(dtype),
                      pooled_projections=pooled.to(dtype), return_dict=False)[0].float()
    if not use_cfg:
        return out
    uncond, cond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def base_velocity(transformer, latents, t, emb: FlowEmbeds, guidance_scale: float, img_ids=None,
                  dtype: torch.dtype | None = None):
    """:func:`guided_velocity` of the frozen base model: the transformer with its LoRA adapters off (also while
    a per-block checkpoint recomputes it in backward: ``sampling.adapters_off``)."""
    with adapters_off(_bare(transformer)):
        return guided_velocity(transformer, latents, t, emb, guidance_scale, img_ids, dtype)


def rollout(transformer, scheduler, latents: torch.Tensor, emb: FlowEmbeds, *, k: int, guidance_scale: float,
            img_ids: torch.Tensor | None = None, stage=None, grad_transformer=None,
            checkpoint_calls: bool = True, kl: list | None = None, lv_draws: int = 1,
            generator: torch.Generator | None = None, window_keep: int = 0, detached=frozenset(),
            nograd_context=None) -> torch.Tensor:
    """Euler steps of the flow ODE from noise; the last ``k`` steps carry gradients (k=0: none do; ``detached``:
    but these of them, truncation=per_step).

    :func:`set_flow_timesteps` must have been called for this rollout (the scheduler counts its steps).
    ``grad_transformer`` is the module used inside the window (a DDP/DeepSpeed wrapper, so gradients are
    synchronised); the no-grad steps may use the bare transformer. Same contract as ``sampling.rollout``:
    ``kl`` receives, per window step, ``mean((v - v_base)^2)`` against the transformer with its adapters off;
    ``lv_draws`` > 1 returns that many batches of last steps (:func:`last_step_draws`; ``generator`` draws their
    noise). ``window_keep``: the last ``min(k, window_keep)`` calls run without their checkpoint; ``nograd_context``:
    what the steps before the window run inside.
    """
    grad_transformer = grad_transformer if grad_transformer is not None else transformer
    dtype = compute_dtype(_bare(transformer))  # once: diffusers walks the whole transformer to tell it

    def draws(latents, call):
        return last_step_draws(grad_transformer, scheduler, latents, emb, lv_draws, guidance_scale=guidance_scale,
                               img_ids=img_ids, generator=generator, call=call)

    return truncated_chain(
        scheduler.timesteps, latents, k=k, model=transformer, grad_model=grad_transformer,
        predict=lambda model, x, t: guided_velocity(model, x, t, emb, guidance_scale, img_ids, dtype),
        base_predict=lambda model, x, t: base_velocity(model, x, t, emb, guidance_scale, img_ids, dtype),
        step=lambda v, t, x: scheduler.step(v, t, x, return_dict=False)[0],
        stage=stage, checkpoint_calls=checkpoint_calls, kl=kl, last=draws if lv_draws > 1 else None,
        window_keep=window_keep, detached=detached, nograd_context=nograd_context)


def last_step_draws(transformer, scheduler, x0: torch.Tensor, emb: FlowEmbeds, draws: int, *,
                    guidance_scale: float, img_ids=None, generator=None, call=None) -> torch.Tensor:
    """DRaFT-LV on the flow ODE: ``x0`` (the trajectory's own last step, draw 1) and ``draws - 1`` more last steps,
    each from ``x0`` without its gradient put back on the straight path to fresh noise at the last step's noise
    level (``sigma * noise + (1 - sigma) * x0``, the flow-matching forward process) and taken again with
    gradients, as one batched transformer call: ``[draws * B, ...]``, draw-major.

    The scheduler has walked past its last step by now (its step index is at the end), so its sigmas are read and
    the Euler step ``x + (sigma_next - sigma) * v`` (``FlowMatchEulerDiscreteScheduler.step``'s, in float32) is
    written out."""
    call = call or checkpoint
    t = scheduler.timesteps[-1]
    sigma, sigma_next = scheduler.sigmas[-2], scheduler.sigmas[-1]  # 0-dim tensors (fake ones under the planner)
    more = draws - 1
    start = x0.detach().repeat(more, *([1] * (x0.dim() - 1)))
    noise = torch.randn(start.shape, generator=generator, device="cpu", dtype=start.dtype).to(start.device)
    noisy = sigma * noise + (1.0 - sigma) * start
    v = call(with_repeated_embeds, guided_velocity, transformer, noisy, t, emb, more, guidance_scale, img_ids)
    return torch.cat([x0, (noisy.float() + (sigma_next - sigma) * v).to(x0.dtype)])


def decode(vae, latents: torch.Tensor, *, height: int | None = None, width: int | None = None,
           **kwargs) -> torch.Tensor:
    """16-channel latents -> images in [0, 1], differentiable. FLUX's packed tokens ([B, N, 4C]) are unpacked
    first (``height``/``width``: the image size); then ``latents / scaling_factor + shift_factor`` and the VAE,
    as ``sampling.decode`` does (its ``sliced``/``tiled`` options pass through)."""
    if latents.dim() == 3:
        if height is None or width is None:
            raise ValueError("packed FLUX latents need the image height and width to unpack")
        latents = unpack(latents, height, width, vae)
    return _decode_latents(vae, latents, **kwargs)


def sample_images(transformer, scheduler, vae, emb: FlowEmbeds, *, cfg, rng: random.Random, steps: int,
                  height: int, width: int, guidance_scale: float, generator: torch.Generator, device=None,
                  stage=None, grad_transformer=None, checkpoint_calls: bool = True) -> tuple[torch.Tensor, int]:
    """One AlignProp rollout for a batch: its gradient window drawn (``draw_window(cfg, rng)``), noise, the schedule,
    the truncated rollout and the decode. Returns the images ([B, 3, H, W] in [0, 1]) and the calls with gradient."""
    window = draw_window(cfg, rng)
    latents, ids = initial_latents(transformer, vae, emb.cond.shape[0], height, width, generator, device)
    lh, lw = latent_size(vae, height, width, family_of(transformer))
    set_flow_timesteps(scheduler, transformer, steps, lh, lw, device)
    latents = rollout(transformer, scheduler, latents, emb, k=window.k, guidance_scale=guidance_scale, img_ids=ids,
                      stage=stage, grad_transformer=grad_transformer, checkpoint_calls=checkpoint_calls,
                      detached=window.detached)
    return decode(vae, latents, height=height, width=width), window.calls


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------

def add_flow_lora(transformer, rank: int, alpha: float | None = None, seed: int = 0,
                  layers: str = "attention") -> list[torch.nn.Parameter]:
    """peft LoRA adapters on the transformer's ``layers`` (models/lora_layers.py); only they train. Returns their
    parameters (fp32, whatever the transformer's dtype)."""
    from lowmem_alignprop.models.lora_layers import add_adapter

    return add_adapter(transformer, rank, alpha, seed, layers, flow=True)


def save_flow_lora(pipeline_class, transformer, out_dir) -> None:
    """Write the adapter so that ``pipeline_class.load_lora_weights(out_dir)`` (StableDiffusion3Pipeline or
    FluxPipeline) loads it: peft's keys as they are (``...to_q.lora_A.weight``; diffusers' older
    ``lora.down``/``lora.up`` conversion, right for UNets, is what SD3's loader drops), and the peft config
    (rank, alpha, targets) as metadata so a ``lora_alpha`` other than the rank loads with the trained scale."""
    from peft.utils import get_peft_model_state_dict

    from lowmem_alignprop.models.lora_metadata import lora_metadata

    bare = _bare(transformer)
    layers = get_peft_model_state_dict(bare)
    pipeline_class.save_lora_weights(str(out_dir), transformer_lora_layers=layers,
                                     transformer_lora_adapter_metadata=lora_metadata(bare.peft_config["default"],
                                                                                     layers=layers))

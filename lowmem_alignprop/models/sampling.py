"""The differentiable rollout: prompt encoding, DDIM with classifier-free guidance, truncated backprop, decode.

Truncation (docs/design.md section 2): K is drawn once per rollout, the gradient flows through the contiguous
last K steps, and the latent entering that window is detached. Each UNet call in the window is one
gradient checkpoint, so only its input latent is kept and memory is almost flat in K.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import random
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from lowmem_alignprop.memory import stages
from lowmem_alignprop.memory.precision import compute_dtype
from lowmem_alignprop.memory.recompute import checkpoint, checkpoint_modules, module_checkpoint
from lowmem_alignprop.settings.image_size import height_width, resolution_of
from lowmem_alignprop.settings.model_kind import vae_scale


# What DDIM sampling uses for every model family, whatever the model's own scheduler config says or omits.
# clip_sample=False: DDIMScheduler's default (True) clamps the predicted x0 to [-1, 1], meant for pixel-space
# models; in latent space it cuts ~31% of a unit-variance latent's entries (SDXL's and SD 1.5's stock configs
# leave the key out, and only StableDiffusionPipeline's constructor used to reset it). set_alpha_to_one=False:
# the last step uses alphas_cumprod[0], as the SD/SDXL reference configs do (True would step to alpha 1).
DDIM_SETTINGS = {"clip_sample": False, "set_alpha_to_one": False}


def ddim_scheduler(config, prediction_type: str | None = None, *, zero_snr: bool = False):
    """The DDIM scheduler AlignProp samples with: the model's noise schedule and prediction type from
    ``config`` (any diffusers scheduler's config; ``prediction_type`` overrides its; ``zero_snr`` rescales it to zero
    terminal SNR, :data:`ZERO_SNR`), with :data:`DDIM_SETTINGS` set explicitly."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config, **DDIM_SETTINGS, **(ZERO_SNR if zero_snr else {}),
                                     **({"prediction_type": prediction_type} if prediction_type else {}))


# zero terminal SNR (Lin et al. 2024): the schedule rescaled so its last timestep is pure noise, sampled from it
ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def with_schedule(scheduler, prediction_type: str | None = None, *, zero_snr: bool = False):
    """``scheduler`` (a pipeline's own, of any class) predicting ``prediction_type`` and, with ``zero_snr``, on the
    zero-terminal-SNR schedule (:data:`ZERO_SNR`): what a single file's keys or a run's settings say that its files
    do not; the scheduler itself where nothing changes."""
    changes = {**({"prediction_type": prediction_type}
                  if prediction_type and scheduler.config.get("prediction_type") != prediction_type else {}),
               **(ZERO_SNR if zero_snr else {})}
    return type(scheduler).from_config(scheduler.config, **changes) if changes else scheduler


class BatchedTensors:
    """For a dataclass of per-prompt tensors (None allowed): pick prompts, move, join. Fields named in ``SHARED``
    are the same for every prompt and are carried along, not indexed or joined."""
    SHARED: ClassVar[tuple[str, ...]] = ()

    def _map(self, fn, shared_too: bool = False):
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if shared_too or f.name not in self.SHARED}
        return dataclasses.replace(self, **{k: None if v is None else fn(v) for k, v in values.items()})

    def index(self, idx):
        return self._map(lambda t: t[idx])

    def to(self, device):
        return self._map(lambda t: t.to(device), shared_too=True)

    def nbytes(self) -> int:
        return sum(t.nbytes for f in dataclasses.fields(self) if (t := getattr(self, f.name)) is not None)

    @classmethod
    def cat(cls, parts: list):
        first = parts[0]
        return dataclasses.replace(first, **{f.name: None if getattr(first, f.name) is None else
                                             torch.cat([getattr(p, f.name) for p in parts])
                                             for f in dataclasses.fields(first) if f.name not in cls.SHARED})


def with_repeated_embeds(fn, model, x, t, emb: BatchedTensors, times: int, *args):
    """``fn(model, x, t, emb joined with itself times times, *args)``. Under a checkpoint the joined embeddings are
    made inside it, so its recompute makes them again instead of the graph keeping them until backward (what each
    of DRaFT-LV's extra draws would hold: in bf16, 4 MiB of FLUX's 512 T5 tokens, 5 MiB of SD3's)."""
    return fn(model, x, t, type(emb).cat([emb] * times), *args)


@dataclass
class PromptEmbeds(BatchedTensors):
    """Conditional and unconditional text conditioning for a batch (SDXL adds pooled embeds and time ids)."""
    cond: torch.Tensor
    uncond: torch.Tensor
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None


def draw_k(cfg, rng: random.Random) -> int:
    """K for one rollout: fixed, or uniform in [k_min, k_max] (AlignProp's randomized truncation)."""
    if cfg.truncation == "fixed":
        return cfg.k
    return rng.randint(cfg.k_min, cfg.k_max)


@dataclass(frozen=True)
class Window:
    """One rollout's gradient window: its last ``k`` steps (the latent entering them detached); ``detached``: the
    window's steps (0 = its first) whose prediction carries no gradient, the latent's path through them kept
    (truncation=per_step)."""
    k: int
    detached: frozenset = frozenset()

    @property
    def calls(self) -> int:
        """The denoiser calls with gradient: what backward recomputes and goes through."""
        return self.k - len(self.detached)


def draw_window(cfg, rng: random.Random) -> Window:
    """The gradient window of one rollout. fixed / uniform: the contiguous last K steps, K drawn once. per_step
    (the official AlignProp code's and TRL's rule): every step draws its own K ~ U{k_min..k_max} and predicts with
    gradient when it is among the last K steps; the window runs from the first such step to the end. A draw with no
    such step (k_min=0 only: 1e-21 at U{0..50}, 4% at U{0..4}) is drawn again: a rollout without a graph would train
    nothing (the official loop's backward fails on it), and under a launcher the other processes would wait in
    backward for this one."""
    if cfg.truncation != "per_step":
        return Window(draw_k(cfg, rng))
    steps = cfg.sample_steps
    while True:
        grad = [steps - i <= rng.randint(cfg.k_min, cfg.k_max) for i in range(steps)]  # step i: steps - i from the end
        if any(grad):
            first = grad.index(True)
            return Window(steps - first, frozenset(i - first for i in range(first, steps) if not grad[i]))


def make_pipeline(comps):
    """A diffusers pipeline object over our components, used only for its prompt-encoding helpers."""
    if comps.is_sdxl:
        return comps.pipeline_class(vae=comps.vae, text_encoder=comps.text_encoder,
                                    text_encoder_2=comps.text_encoder_2, tokenizer=comps.tokenizer,
                                    tokenizer_2=comps.tokenizer_2, unet=comps.unet, scheduler=comps.scheduler,
                                    force_zeros_for_empty_prompt=comps.force_zeros_for_empty_prompt)
    return comps.pipeline_class(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                unet=comps.unet, scheduler=comps.scheduler, safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False)


def negative_prompts(negative_prompt: str, n: int) -> list[str] | None:
    """What the pipelines' ``negative_prompt`` gets: None for an empty one, so that each pipeline does what it does
    by default (SD 1.x/2.x encode the empty prompt; SDXL uses zero embeddings when its force_zeros_for_empty_prompt
    is set, as in SDXL base's model_index.json), else the negative prompt for each of the ``n`` prompts."""
    return [negative_prompt] * n if negative_prompt else None


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device, resolution: int | tuple[int, int],
                   negative_prompt: str = "") -> PromptEmbeds:
    """Prompts and the negative prompt -> text embeddings (no gradient: the text encoder is frozen). ``resolution``:
    the images' side, or their (height, width): SDXL's size conditioning, as its pipeline's original_size and
    target_size."""
    negative = negative_prompts(negative_prompt, len(prompts))
    if hasattr(pipe, "text_encoder_2") and pipe.text_encoder_2 is not None:
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative)
        time_ids = size_time_ids(pipe, resolution, cond.dtype, pipe.text_encoder_2.config.projection_dim)
        return PromptEmbeds(cond, uncond, pooled, uncond_pooled, time_ids.to(device).repeat(len(prompts), 1))
    cond, uncond = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=True, negative_prompt=negative)
    return PromptEmbeds(cond, uncond)


def size_time_ids(pipe, resolution: int | tuple[int, int], dtype: torch.dtype, projection_dim: int) -> torch.Tensor:
    """SDXL's size conditioning (add_time_ids) of images of ``resolution`` (a side, or (height, width)): its
    pipeline's own, original_size = target_size = the size, no crop. [1, 6]."""
    size = height_width(resolution)
    return pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection_dim)


HOST_CACHE_ABOVE = 256 * 2**20  # bytes of cached embeddings above which they wait in host memory
ENCODE_CHUNK = 16  # prompts a prompt cache encodes at a time (the text encoder's activations: for 16, not the set)


def encode_in_chunks(prompts: list[str], encode: Callable[[list[str]], BatchedTensors], place,
                     chunk: int = ENCODE_CHUNK) -> tuple[dict[str, BatchedTensors], bool]:
    """A prompt cache, UNet's and SD3/FLUX's: every prompt's embeddings by ``encode`` (``chunk`` prompts at a time),
    in host memory (by ``place``: the trainer's Placement, the planner's Residency, which counts them there; else
    ``.to("cpu")``) when the set would crowd the device (:func:`crowds_device`). Returns (cache, in host memory)."""
    cache: dict[str, BatchedTensors] = {}
    on_host = False
    for i in range(0, len(prompts), chunk):
        part = prompts[i:i + chunk]
        e = encode(part)
        on_host = on_host or i == 0 and crowds_device(e, len(part), len(prompts))
        if on_host:
            e = place.to_host(e) if place is not None else e.to("cpu")
        for j, p in enumerate(part):
            cache[p] = e.index(slice(j, j + 1))
    return cache, on_host


def cached_batch(cache: dict[str, BatchedTensors], batch_prompts: list[str], on_host: bool, place, device):
    """A batch's embeddings from an :func:`encode_in_chunks` cache, brought to ``device`` where the cache is in host
    memory."""
    batch = type(cache[batch_prompts[0]]).cat([cache[p] for p in batch_prompts])
    if not on_host:
        return batch
    return place.from_host(batch) if place is not None else batch.to(device)


def crowds_device(first: BatchedTensors, encoded: int, prompts: int) -> bool:
    """Would a prompt set's cached embeddings take more than :data:`HOST_CACHE_ABOVE` of the device, by its first
    chunk's (``encoded`` prompts of ``prompts``)? Said when they would: they then wait in host memory."""
    total = first.nbytes() / encoded * prompts  # 100k prompts of SD1.5 would be 22 GiB of the card's memory
    if total <= HOST_CACHE_ABOVE:
        return False
    logging.getLogger("lowmem_alignprop").info("%d prompts: their embeddings (%.2f GiB) wait in host memory, each "
                                               "batch's brought to the device", prompts, total / 2**30)
    return True


class PromptEncoder:
    """Text embeddings for a batch of prompts; the text encoder is on the device only while it encodes.

    With ``cache=True`` every prompt is encoded at the first call (:data:`ENCODE_CHUNK` at a time) and the text
    encoder then leaves the device for good; otherwise each call encodes its batch and parks the encoder again. A
    prompt set whose embeddings would take more than :data:`HOST_CACHE_ABOVE` of the device waits in host memory
    instead (``place.to_host``), each batch's brought to the device when asked for.
    The training loop and the planner both call this, so the planner estimates what training does.
    """

    def __init__(self, pipe, comps, place, device, resolution: int | tuple[int, int], *, cache: bool, prompts,
                 negative_prompt: str = ""):
        self.pipe, self.place, self.device, self.resolution = pipe, place, device, resolution
        self.negative_prompt = negative_prompt
        self.encoders = (comps.text_encoder, comps.text_encoder_2)
        # SDXL: the second text encoder's projection width, which its size conditioning's ids are checked against
        # (kept: the encoder itself may be freed or offloaded when a step asks for another size's ids)
        self.projection_dim = getattr(getattr(comps.text_encoder_2, "config", None), "projection_dim", None)
        self.caching = cache
        self.prompts = sorted(set(prompts))
        self.cache: dict[str, PromptEmbeds] = {}
        self.on_host = False  # the cache in host memory (a large prompt set)

    def __call__(self, batch_prompts: list[str], size: tuple[int, int] | None = None) -> PromptEmbeds:
        """The batch's embeddings; ``size`` (height, width): a step's image size other than the encoder's (several
        sizes a run): SDXL's size conditioning is then that size's, the text embeddings the same."""
        emb = self._embeddings(batch_prompts)
        if size is None or emb.time_ids is None or height_width(size) == height_width(self.resolution):
            return emb
        ids = size_time_ids(self.pipe, size, emb.time_ids.dtype, self.projection_dim)
        return dataclasses.replace(emb, time_ids=ids.to(emb.time_ids.device).repeat(emb.time_ids.shape[0], 1))

    def _embeddings(self, batch_prompts: list[str]) -> PromptEmbeds:
        if self.caching and not self.cache:
            self.place.to_device("text_encoder", *self.encoders)
            self.cache, self.on_host = encode_in_chunks(self.prompts, lambda part: encode_prompts(
                self.pipe, part, self.device, self.resolution, self.negative_prompt), self.place)
            self.place.offload("text_encoder", *self.encoders)  # cached: its weights can leave the device
        if not self.caching:
            self.place.to_device("text_encoder", *self.encoders)
            emb = encode_prompts(self.pipe, batch_prompts, self.device, self.resolution, self.negative_prompt)
            self.place.park("text_encoder", *self.encoders)  # to the CPU until the next step
            return emb
        return cached_batch(self.cache, batch_prompts, self.on_host, self.place, self.device)


def guided_eps(unet, latents, t, emb: PromptEmbeds, guidance_scale: float, dtype: torch.dtype | None = None, *,
               guidance_rescale: float = 0.0):
    """One UNet call with classifier-free guidance (both branches batched together); inputs cast to ``dtype``
    (default: the UNet's :func:`compute_dtype`). ``guidance_rescale`` > 0: the guided prediction rescaled as
    diffusers' SD/SDXL pipelines do (their ``rescale_noise_cfg``), so training samples what they sample."""
    use_cfg = guidance_scale > 1.0
    x = torch.cat([latents, latents]) if use_cfg else latents
    hidden = torch.cat([emb.uncond, emb.cond]) if use_cfg else emb.cond
    kwargs = {}
    if emb.pooled is not None:
        pooled = torch.cat([emb.uncond_pooled, emb.pooled]) if use_cfg else emb.pooled
        time_ids = torch.cat([emb.time_ids, emb.time_ids]) if use_cfg else emb.time_ids
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    dtype = dtype or compute_dtype(unet)
    out = unet(x.to(dtype), t, encoder_hidden_states=hidden.to(dtype), **kwargs).sample.float()
    if not use_cfg:
        return out
    uncond, cond = out.chunk(2)
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale <= 0:
        return guided
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg  # (the pipelines')
    return rescale_noise_cfg(guided, cond, guidance_rescale)


@contextlib.contextmanager
def adapters_off(unet):
    """The frozen base model: the UNet with its LoRA adapters switched off (diffusers' ``disable_adapters``).
    peft's switch also clears the adapters' ``requires_grad`` and sets it again when they come back on: every
    parameter's flag is restored as it was, so a frozen adapter stays frozen. While it is off, the UNet's block
    checkpoints (:func:`enable_block_checkpointing`) are made to recompute with the adapters off too."""
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    unet.disable_adapters()
    unet._lowmem_base_call = True
    try:
        yield unet
    finally:
        unet._lowmem_base_call = False
        unet.enable_adapters()
        for p, flag in flags:
            p.requires_grad_(flag)


def _block_checkpoint(unet, block, *args):
    """diffusers' per-block checkpoint (non-reentrant). A block of the base model's call (inside
    :func:`adapters_off`) is recomputed in backward, long after that call returned: its recompute switches the
    adapters off again, else it would recompute the LoRA model's block."""
    if getattr(unet, "_lowmem_base_call", False):
        context_fn = lambda: (contextlib.nullcontext(), adapters_off(unet))  # noqa: E731
        return module_checkpoint(block, *args, context_fn=context_fn)
    return module_checkpoint(block, *args)


def enable_block_checkpointing(unet) -> None:
    """unet_checkpointing=blocks: keep one input per UNet block, recompute the block in backward."""
    unet.enable_gradient_checkpointing(functools.partial(_block_checkpoint, unet))


def base_eps(unet, latents, t, emb: PromptEmbeds, guidance_scale: float, dtype: torch.dtype | None = None, *,
             guidance_rescale: float = 0.0):
    """:func:`guided_eps` of the frozen base model (the adapters off, also when a checkpoint recomputes it)."""
    with adapters_off(unet):
        return guided_eps(unet, latents, t, emb, guidance_scale, dtype, guidance_rescale=guidance_rescale)


def window_start(timesteps, k: int) -> int:
    """Index of the first of the last ``k`` steps (the gradient window) in ``timesteps``; 0 <= k <= their number."""
    if not 0 <= k <= len(timesteps):
        raise ValueError(f"K={k} must be between 0 and the number of sampling steps ({len(timesteps)})")
    return len(timesteps) - k


def rollout(unet, scheduler, latents: torch.Tensor, emb: PromptEmbeds, *, k: int, guidance_scale: float,
            eta: float, generator: torch.Generator | None, guidance_rescale: float = 0.0, stage=None, grad_unet=None,
            checkpoint_calls: bool = True, kl: list | None = None, lv_draws: int = 1,
            window_keep: int = 0, detached=frozenset(), nograd_context: Callable | None = None) -> torch.Tensor:
    """Run the DDIM chain from noise; the last ``k`` steps carry gradients (k=0: none do).

    ``scheduler.set_timesteps`` must have been called. ``grad_unet`` is the module used inside the grad
    window (the DDP/DeepSpeed wrapper, so gradients are synchronised); no-grad steps may use the bare UNet.
    ``kl``: a list that receives, for each grad-window step, the distance ``mean((eps - eps_base)^2)`` between
    the LoRA model's and the base model's predictions (``unet`` with its adapters off). ``lv_draws`` > 1
    (DRaFT-LV): the result holds ``lv_draws`` batches, the trajectory's own last step first (see
    :func:`last_step_draws`). ``window_keep``: the last ``min(k, window_keep)`` calls run without their checkpoint;
    ``detached``: the window's steps predicted without gradient, ``nograd_context`` what the steps before the window
    run inside (:func:`truncated_chain`).
    """
    grad_unet = grad_unet if grad_unet is not None else unet
    dtype = compute_dtype(unet)  # once: diffusers walks the whole UNet to tell it
    rescale = {"guidance_rescale": guidance_rescale}

    def draws(latents, call):
        return last_step_draws(grad_unet, scheduler, latents, emb, lv_draws, guidance_scale=guidance_scale, eta=eta,
                               generator=generator, call=call, **rescale)

    return truncated_chain(
        scheduler.timesteps, latents, k=k, model=unet, grad_model=grad_unet,
        predict=lambda model, x, t: guided_eps(model, x, t, emb, guidance_scale, dtype, **rescale),
        base_predict=lambda model, x, t: base_eps(model, x, t, emb, guidance_scale, dtype, **rescale),
        step=lambda eps, t, x: scheduler.step(eps, t, x, eta=eta, generator=generator).prev_sample,
        stage=stage, checkpoint_calls=checkpoint_calls, kl=kl, last=draws if lv_draws > 1 else None,
        window_keep=window_keep, detached=detached, nograd_context=nograd_context)


def truncated_chain(timesteps, latents: torch.Tensor, *, k: int, model, grad_model, predict: Callable,
                    base_predict: Callable, step: Callable, stage=None, checkpoint_calls: bool = True,
                    kl: list | None = None, last: Callable | None = None, window_keep: int = 0,
                    detached=frozenset(), nograd_context: Callable[[], contextlib.AbstractContextManager] | None = None
                    ) -> torch.Tensor:
    """The chain every family samples (docs/design.md section 2): ``step(predict(model, x, t), t, x)`` over
    ``timesteps``; the steps before the last ``k`` without autograd (``model``), the latent detached where the
    window starts, and each window step's ``predict(grad_model, x, t)`` one checkpoint, except the last
    ``min(k, window_keep)`` steps' calls, which keep their activations (backward recomputes none of them). ``kl``
    receives, per window step, ``mean((out - base_predict(model, x, t))^2)`` (the base call checkpointed or kept as
    its step's); ``last(latents, call)`` (DRaFT-LV's extra draws) runs at the window's end with the last step's
    ``call``. ``detached`` (:class:`Window`, truncation=per_step): the window's steps (0 = its first) whose
    prediction runs without autograd; the latent's own path through their step keeps its gradient.
    ``nograd_context()`` (merge_lora_nograd: ``merged_lora.lora_merged``) is entered around the steps before the
    window."""
    stage = stage or (lambda name: contextlib.nullcontext())
    split = window_start(timesteps, k)
    # (no step before the window, K = T: nothing to merge for)
    nograd_context = nograd_context if nograd_context is not None and split else contextlib.nullcontext
    with stage(stages.SAMPLE_NOGRAD), torch.no_grad(), nograd_context():  # no activations kept: time, not memory
        for t in timesteps[:split]:
            latents = step(predict(model, latents, t), t, latents)
    latents = latents.detach()  # the gradient window starts here
    if k == 0:
        return latents
    # autocast caches its casts of trainable weights: torch up to 2.10 at least (pytorch issue 112583) kept the LoRA
    # casts made without grad above, and the window then ran on them without a graph. The window makes its own
    torch.clear_autocast_cache()
    plain = lambda f, *a: f(*a)  # noqa: E731
    checkpointed = checkpoint if checkpoint_calls else plain
    with stage(stages.SAMPLE_GRAD):
        for i, t in enumerate(timesteps[split:]):
            # one checkpoint per model call: keep only its input latent, recompute the call in backward; the last
            # window_keep calls keep their activations instead: backward skips their recompute, memory grows by
            # one call's activations each
            call = plain if k - i <= window_keep else checkpointed
            if i in detached:  # per_step: this prediction without a graph (no call to recompute); x's path stays
                with torch.no_grad():
                    out = predict(model, latents, t)
                latents = step(out, t, latents)
                continue
            out = call(predict, grad_model, latents, t)
            if kl is not None:  # the base model's call is its own checkpoint: in backward one call is recomputed
                kl.append((out - call(base_predict, model, latents, t)).pow(2).mean())  # at a time, as without KL
            latents = step(out, t, latents)
            del out  # the call's output is in the new latent's graph: the next call runs without it alive
        if last is not None:
            latents = last(latents, call)
    return latents


def last_step_draws(unet, scheduler, x0: torch.Tensor, emb: PromptEmbeds, draws: int, *, guidance_scale: float,
                    eta: float, generator, call, guidance_rescale: float = 0.0) -> torch.Tensor:
    """DRaFT-LV (Clark et al. 2023): ``x0`` (the trajectory's own last step, draw 1) and ``draws - 1`` more last
    steps, each from ``x0`` without its gradient re-noised to the last step's noise level (the scheduler's
    ``add_noise``) and denoised again with gradients: ``[draws * B, ...]``, draw-major. The extra draws run as one
    batched, checkpointed UNet call."""
    t = scheduler.timesteps[-1]
    more = draws - 1
    start = x0.detach().repeat(more, *([1] * (x0.dim() - 1)))
    noise = torch.randn(start.shape, generator=generator, device="cpu", dtype=start.dtype).to(start.device)
    t_batch = torch.as_tensor(t, device=start.device).reshape(1).long()
    noisy = scheduler.add_noise(start, noise, t_batch)
    eps = call(with_repeated_embeds, functools.partial(guided_eps, guidance_rescale=guidance_rescale), unet, noisy, t,
               emb, more, guidance_scale)
    return torch.cat([x0, scheduler.step(eps, t, noisy, eta=eta, generator=generator).prev_sample])


def decode(vae, latents: torch.Tensor, *, sliced: bool = False, tiled: bool = False, tile_size: int = 64,
           tile_overlap: int = 16) -> torch.Tensor:
    """Latents -> images in [0, 1], differentiable."""
    dtype = vae.dtype
    z = latents / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        z = z + vae.config.shift_factor
    # the frozen VAE runs in its own dtype, outside autocast: autocast would keep its norms and upsampling in
    # fp32, and those saved activations are most of the backward peak (-0.6 GiB at 512 px); an fp16 autocast
    # would also overflow a VAE that was kept in bf16/fp32 for that reason (SDXL's)
    with without_autocast(z.device.type):
        if tiled:
            from lowmem_alignprop.memory.tiling import tiled_decode
            x = tiled_decode(vae, z.to(dtype), tile_size=tile_size, overlap=tile_overlap)
        elif sliced and z.shape[0] > 1:
            # one image at a time: the decoder's activations exist for one image, not the batch
            x = torch.cat([vae.decode(z[i:i + 1].to(dtype)).sample for i in range(z.shape[0])])
        else:
            x = vae.decode(z.to(dtype)).sample
    return (x.float() / 2 + 0.5).clamp(0, 1)


def without_autocast(device_type: str):
    """Run frozen low-precision modules in their own dtype (a no-op when autocast is off)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def vae_scale_factor(vae) -> int:
    return vae_scale(vae.config)


def resolution_note(unet, vae, size: int | tuple[int, int], default_size: int | None = None) -> str | None:
    """A warning when the images (``size``: a side, or (height, width)) have a quarter of the model's native pixel
    count or fewer, or four times it or more (half or twice its side for a square), or else a side under half its
    native side or over twice it (SDXL at 2048x256: half its pixels, but a side no image it learnt from had); native:
    the denoiser's sample_size in latent cells, ``default_size`` for a model whose config has none."""
    height, width = height_width(size)
    sample = getattr(unet.config, "sample_size", None) or default_size
    native = (sample if isinstance(sample, int) else max(sample)) * vae_scale_factor(vae)
    made = f"the model was made for {native} px images and this run uses {resolution_of(width, height)} px"
    check = "(check the fit with `lowmem-alignprop plan`)"
    if not (native // 2) ** 2 < height * width < (native * 2) ** 2:
        return (f"{made}: that far from its size its images, and so the reward's signal, are poor; --set "
                f"resolution={native} {check}")
    low, high = native // 2, native * 2
    sides = [f"a side under half its size ({low} px)" if min(width, height) < low else "",
             f"a side over twice {'it' if min(width, height) < low else 'its size'} ({high} px)"
             if max(width, height) > high else ""]
    if not any(sides):
        return None
    inside = resolution_of(*(min(max(side, low), high) for side in (width, height)))  # (its pixels then in range)
    return (f"{made}, {' and '.join(s for s in sides if s)}: such a side makes its images, and so the reward's "
            f"signal, poor, whatever the pixel count; --set resolution={inside} keeps each side {low} to {high} px "
            f"{check}")


def initial_latents(batch: int, unet, vae, size: int | tuple[int, int], generator: torch.Generator,
                    device) -> torch.Tensor:
    """The first noise of ``batch`` images of ``size`` (a side, or (height, width)) pixels, drawn on the CPU."""
    height, width = height_width(size)
    scale = vae_scale_factor(vae)
    shape = (batch, unet.config.in_channels, height // scale, width // scale)
    return torch.randn(shape, generator=generator, device="cpu").to(device)


def enable_vae_checkpointing(vae, granularity: str) -> None:
    """none | blocks (each decoder up-block, diffusers' own) | resnets (each resnet and attention: least memory)."""
    if granularity == "blocks":
        vae.enable_gradient_checkpointing(module_checkpoint)  # keep one input per up-block, recompute it in backward
    elif granularity == "resnets":
        dec = vae.decoder
        mods = list(dec.mid_block.resnets) + list(dec.mid_block.attentions or [])
        for block in dec.up_blocks:
            mods += list(block.resnets) + list(getattr(block, "upsamplers", None) or [])
        checkpoint_modules(mods)  # keep one input per resnet: the full-resolution block's peak shrinks most

"""One micro-batch of a training step — encode, draw the starting noise, roll out to the loss, backward, park — shared
by the trainer (:meth:`~lowmem_alignprop.training.train.Trainer.train_step`) and the planner's estimate and CPU
measurement (:mod:`lowmem_alignprop.measure.shared_step`), so what is estimated is the step that trains.

What differs between them is passed in (:class:`Rollout`): the accelerator's autocast and backward or plain torch's,
the profiler's or the planner's stage counter, a DDP-wrapped denoiser or the bare one, where activation_offload's
saved tensors go. See docs/design.md section 1 (the stages).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch

from lowmem_alignprop.memory import stages
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.step.rollout import rollout_loss


@dataclass(kw_only=True)
class Rollout:
    """The modules and hooks one micro-batch runs through."""
    cfg: Config
    family: Any  # UNet (DDIM) or flow transformer (Euler): latents, rollout, decode
    sample_unet: Any  # the denoiser of the no-grad steps (a compiled view with compile=nograd)
    train_unet: Any  # the denoiser whose LoRA trains (DDP-wrapped under a launcher)
    scheduler: Any
    vae: Any
    reward: Any
    place: Any  # where the frozen modules wait (offload_frozen parks the VAE and reward between uses)
    embed: Callable[[list[str]], Any]  # prompts -> embeddings: the prompt cache
    stage: Callable[[str], ContextManager]  # the profiler's or the planner's stage counter
    device: torch.device
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
    saved_tensors: Callable[[], ContextManager] | None = None  # activation_offload's hooks; None: torch's save_on_cpu


@dataclass
class MicroBatch:
    """What one micro-batch leaves: its loss and rewards (detached), the loss's further terms, or what went wrong."""
    loss: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    terms: dict = field(default_factory=dict)  # the loss's further terms (kl), detached, for the metrics
    # the batch's prompt embeddings: alive while the caller holds this (its last micro-batch's through the optimizer
    # step: a few hundred KB a prompt, which the planner counts as the trainer keeps it)
    embeddings: Any = None
    bad: str | None = None  # what was NaN/inf (``check``'s answer): no backward was run


def micro_step(r: Rollout, prompts: list[str], *, k: int, generator: torch.Generator,
               check: Callable[[Any, Any, BaseException | None], str | None] | None = None,
               catch: bool = False, detached=frozenset()) -> MicroBatch:
    """Roll ``prompts`` out with the last ``k`` steps differentiable (but ``detached``'s: truncation=per_step), then
    backward into the LoRA. ``check(loss,
    rewards, failed)`` runs between the rollout and the backward (the trainer's NaN/inf test, agreed across ranks) and
    may answer what was not finite (no backward then) or raise. ``catch``: a rollout's exception goes to ``check`` as
    ``failed`` instead of up (under a launcher every rank must hear of it before it stops)."""
    cfg = r.cfg
    with r.stage(stages.ENCODE_PROMPTS):
        emb = r.embed(prompts)  # cached: no text encoder on the device after the first step
    latents = r.family.initial_latents(cfg, len(prompts), generator, r.device)
    loss = rewards = failed = None
    terms: dict = {}
    try:
        with r.autocast():  # sample_nograd, sample_grad (one checkpoint per denoiser call), decode, reward
            loss, rewards = rollout_loss(cfg, r.sample_unet, r.train_unet, r.scheduler, r.vae, r.reward, latents, emb,
                                         prompts, k=k, generator=generator, stage=r.stage, place=r.place,
                                         saved_tensors=r.saved_tensors, terms=terms, family=r.family,
                                         detached=detached)
    except BaseException as e:
        if not catch:
            raise
        failed, terms = e, {}
    if check is not None and (bad := check(loss, rewards, failed)):
        park(r)  # (a skipped micro-batch's too: the next rollout starts as planned)
        return MicroBatch(terms=terms, bad=bad)
    with r.stage(stages.BACKWARD):
        r.backward(loss)  # gradients reach only the LoRA weights (checkpoints replay the forward's autocast)
    park(r)
    return MicroBatch(loss.detach(), rewards.detach(), terms, emb)


def park(r: Rollout) -> None:
    r.place.park("vae", r.vae)  # offload_frozen: the VAE and reward model wait on the CPU again
    r.place.park("reward", r.reward)

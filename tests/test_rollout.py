"""step/rollout.py: the training step's pieces that the trainer and the planner share (apply_memory_features,
rollout_loss, loss_from_reward), on the tiny model."""

import contextlib

import pytest
import torch

from lowmem_alignprop.memory import stages
from lowmem_alignprop.memory.placement import Placement
from lowmem_alignprop.models.loading import load_components
from lowmem_alignprop.models.sampling import encode_prompts, initial_latents, make_pipeline
from lowmem_alignprop.rewards import build_reward
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.step.rollout import apply_memory_features, loss_from_reward, rollout_loss
from numerics import SAME_OPS, assert_rel_close

CPU = torch.device("cpu")
PROMPTS = ["a red circle", "two blue squares"]


def test_the_loss_is_minus_the_scaled_mean_reward_or_the_scaled_distance_to_a_target():
    rewards = torch.tensor([1.0, 3.0])
    assert loss_from_reward(rewards, Config(loss_scale=2.0)).item() == -4.0  # -2 * mean(1, 3)
    # 2 * mean(|1 - 2.5|, |3 - 2.5|) = 2 * (1.5 + 0.5) / 2
    assert loss_from_reward(rewards, Config(loss_scale=2.0, reward_target=2.5)).item() == 2.0
    # reward_cap: -2 * mean(min(1, 2), min(3, 2)) = -3, and the capped image gets no gradient, the other its share
    r = rewards.clone().requires_grad_(True)
    loss = loss_from_reward(r, Config(loss_scale=2.0, reward_cap=2.0))
    loss.backward()
    assert loss.item() == -3.0 and r.grad.tolist() == [-1.0, 0.0]


def _lora_names(unet) -> set[str]:
    return {n for n, _ in unet.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("checkpointing", ["call", "blocks"])
def test_apply_memory_features_trains_the_lora_weights_only(tiny_dir, checkpointing):
    cfg = Config(model=str(tiny_dir), lora_rank=4, unet_checkpointing=checkpointing).validate()
    comps = load_components(cfg)
    params, _ = apply_memory_features(comps, cfg, CPU, torch.float32)
    unet = comps.unet
    lora = _lora_names(unet)
    by_id = {id(p): n for n, p in unet.named_parameters()}
    assert lora and {by_id[id(p)] for p in params} == lora  # exactly the adapters: nothing more, nothing less
    adapted = {n.rsplit(".lora_", 1)[0] for n in lora}
    assert len(params) == 2 * len(adapted)  # one A and one B matrix per adapted layer
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params)
    for name, module in comps.frozen_modules().items():
        trainable = [n for n, p in module.named_parameters() if p.requires_grad and "lora_" not in n]
        assert trainable == [], f"{name} has trainable weights besides LoRA: {trainable[:3]}"
    # block checkpointing is on only when asked for (the per-call checkpoint is rollout's, not the UNet's)
    assert unet.is_gradient_checkpointing == (checkpointing == "blocks")


def test_full_fine_tuning_trains_every_unet_weight_in_fp32(tiny_dir):
    cfg = Config(model=str(tiny_dir), train_unet="full").validate()
    comps = load_components(cfg, torch.bfloat16)
    params, _ = apply_memory_features(comps, cfg, CPU, torch.bfloat16)
    assert [id(p) for p in params] == [id(p) for p in comps.unet.parameters()]
    assert all(p.requires_grad and p.dtype == torch.float32 for p in params)  # fp32 master weights
    assert not _lora_names(comps.unet)
    assert not any(p.requires_grad for p in comps.vae.parameters())


class _Stages:
    """A stage context that records the order of the stages and which one is open."""

    def __init__(self):
        self.order: list[str] = []
        self.open: str | None = None

    @contextlib.contextmanager
    def __call__(self, name):
        if not self.order or self.order[-1] != name:
            self.order.append(name)
        outer, self.open = self.open, name
        try:
            yield
        finally:
            self.open = outer


class _Window(torch.nn.Module):
    """Stands for the DDP wrapper: the module rollout_loss must call inside the gradient window."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, 0

    @property
    def dtype(self):
        return self.unet.dtype

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.unet(*args, **kwargs)


def _setup(tiny_dir, **features):
    cfg = Config(model=str(tiny_dir), resolution=32, sample_steps=4, k=2, truncation="fixed", batch_size=2,
                 guidance_scale=4.0, eta=1.0, seed=0, reward="brightness", **features).validate()
    comps = load_components(cfg)
    params, _ = apply_memory_features(comps, cfg, CPU, torch.float32)
    comps.unet.train()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params:  # lora_B starts at zero: give every adapter a gradient
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    emb = encode_prompts(make_pipeline(comps), PROMPTS, CPU, cfg.resolution)
    latents = initial_latents(2, comps.unet, comps.vae, cfg.resolution, torch.Generator().manual_seed(1), CPU)
    return cfg, comps, params, build_reward(cfg.reward), emb, latents


def _step(cfg, comps, params, reward, emb, latents, **kwargs):
    for p in params:
        p.grad = None
    loss, rewards = rollout_loss(cfg, comps.unet, kwargs.pop("grad_unet", comps.unet), comps.scheduler, comps.vae,
                                 reward, latents, emb, PROMPTS, k=cfg.k, generator=torch.Generator().manual_seed(2),
                                 **kwargs)
    loss.backward()
    return loss, rewards, [p.grad.clone() for p in params]


def test_rollout_loss_runs_the_stages_in_order_and_calls_the_window_module_k_times(tiny_dir):
    cfg, comps, params, reward, emb, latents = _setup(tiny_dir)
    stage, moves = _Stages(), []

    class Recorded(Placement):
        def to_device(self, name, *modules):
            moves.append((name, stage.open))
            super().to_device(name, *modules)

    bare_calls = []
    hook = comps.unet.register_forward_pre_hook(lambda m, a: bare_calls.append(torch.is_grad_enabled()))
    window = _Window(comps.unet)
    try:
        loss, rewards, grads = _step(cfg, comps, params, reward, emb, latents, grad_unet=window, stage=stage,
                                     place=Recorded(CPU, offload=True))
    finally:
        hook.remove()
    assert stage.order == [stages.SAMPLE_NOGRAD, stages.SAMPLE_GRAD, stages.DECODE, stages.REWARD]
    assert moves == [("vae", stages.DECODE), ("reward", stages.REWARD)]  # each frozen module only when needed
    # T - K no-grad calls on the bare UNet; K window calls through the wrapper, each recomputed once in backward
    assert bare_calls.count(False) == cfg.sample_steps - cfg.k
    assert window.calls == 2 * cfg.k
    assert bare_calls.count(True) == 2 * cfg.k
    assert rewards.shape == (2,) and rewards.dtype == torch.float32
    assert loss.item() == loss_from_reward(rewards, cfg).item()
    assert all(g.norm() > 0 for g in grads)  # every LoRA matrix gets a gradient
    frozen = [p for p in comps.unet.parameters() if not p.requires_grad] + list(comps.vae.parameters())
    assert all(p.grad is None for p in frozen)


def test_activation_offload_sends_the_saved_tensors_through_the_hooks_passed_in(tiny_dir):
    cfg, comps, params, reward, emb, latents = _setup(tiny_dir, vae_checkpointing="blocks")
    loss, rewards, grads = _step(cfg, comps, params, reward, emb, latents, stage=_Stages())
    packed = []

    def saved_tensors():
        return torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.numel()) or t, lambda t: t)

    offload = Config(**{**cfg.to_dict(), "activation_offload": True}).validate()
    loss_o, rewards_o, grads_o = _step(offload, comps, params, reward, emb, latents, stage=_Stages(),
                                       saved_tensors=saved_tensors)
    assert len(packed) > 0 and sum(packed) > 0
    assert loss_o.item() == loss.item()  # where the saved tensors wait does not change the forward
    assert_rel_close(grads_o, grads, SAME_OPS, "gradients with activation_offload")
    packed.clear()
    _step(cfg, comps, params, reward, emb, latents, stage=_Stages(), saved_tensors=saved_tensors)
    assert packed == []  # without activation_offload the hooks are never entered


def test_micro_step_rolls_out_with_its_own_k_and_generator_then_backward_and_parks():
    """step/micro.micro_step with a stub family (a one-weight "denoiser"): the K and the generator it is given reach
    the family (K drawn per rollout is not cfg.k; the generator draws the starting noise), the backward reaches the
    trained weight with the number -loss_scale * mean(d reward/d w), the VAE and reward model are parked on the CPU
    after the backward (offload_frozen), and the loss and rewards come back detached."""
    from lowmem_alignprop.step.micro import Rollout, micro_step

    w = torch.nn.Parameter(torch.tensor(2.0))
    seen = {}

    class Family:
        def initial_latents(self, cfg, batch, generator, device):
            seen["generator"] = generator
            return torch.randn(batch, 3, generator=generator)

        def rollout(self, cfg, model, grad_model, scheduler, latents, emb, *, k, generator, stage, kl, detached):
            seen["k"] = k
            return latents * w

        def decode(self, vae, latents, cfg, **options):
            return latents

    cfg = Config(loss_scale=2.0, k=1, sample_steps=3).validate()
    place = Placement(CPU, offload=True)
    vae = torch.nn.Linear(1, 1)

    class Reward(torch.nn.Module):
        def forward(self, images, prompts):
            return images.sum(dim=1)

    r = Rollout(cfg=cfg, family=Family(), sample_unet=None, train_unet=None, scheduler=None, vae=vae,
                reward=Reward(), place=place, embed=lambda prompts: None, stage=lambda name: contextlib.nullcontext(),
                device=CPU)
    generator = torch.Generator().manual_seed(7)
    out = micro_step(r, PROMPTS, k=2, generator=generator)
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(7))
    assert seen == {"generator": generator, "k": 2}
    assert_rel_close(out.rewards, 2.0 * noise.sum(dim=1), SAME_OPS, "rewards")
    assert_rel_close(out.loss, -2.0 * (2.0 * noise.sum(dim=1)).mean(), SAME_OPS, "loss")
    assert_rel_close(w.grad, -2.0 * noise.sum(dim=1).mean(), SAME_OPS, "gradient of the weight")
    assert not out.loss.requires_grad and not out.rewards.requires_grad
    assert place.events[-2:] == [("vae", "cpu"), ("reward", "cpu")] and place.where == {"vae": "cpu", "reward": "cpu"}

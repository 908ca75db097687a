"""Optimizers and what they train, through the real CLI/train path on the tiny model (CPU):
8-bit AdamW and paged 8-bit AdamW (bitsandbytes), full-UNet fine-tuning, and micro-batches with
gradient accumulation giving the same update as one big batch.

Runs are short (8 steps at 32 px, 3 DDIM steps) with a higher learning rate so the brightness reward
moves clearly; rank 64 makes some LoRA matrices 64x64 = 4096 elements, the size from which
bitsandbytes keeps 8-bit state (smaller tensors keep fp32 state).
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from numerics import EPS32, REORDERED, flat, relative_difference

import lowmem_alignprop.training.train_setup as train_setup
from lowmem_alignprop.cli import main
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.models.loading import load_components
from lowmem_alignprop.rewards import build_reward
from lowmem_alignprop.models.sampling import encode_prompts, make_pipeline
from lowmem_alignprop.step.rollout import apply_memory_features, rollout_loss
from lowmem_alignprop.training.train_setup import make_accelerator

FAST = ["--steps", "8", "--set", "resolution=32", "--set", "sample_steps=3", "--set", "k=2",
        "--set", "batch_size=2", "--set", "sample_prompts=0"]
MIN_8BIT = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep 32-bit state
MIN_RISE = 0.02  # brightness (0..1) after 8 steps vs the first steps


@pytest.fixture
def captured(monkeypatch):
    """The optimizer train() builds, and a copy of the weights it will train, taken before any step."""
    seen: dict = {}
    real = train_setup.build_optimizer

    def build_optimizer(cfg, params):
        seen["initial"] = [p.detach().clone() for p in params]
        seen["optimizer"] = opt = real(cfg, params)
        seen["params"] = params
        return opt

    monkeypatch.setattr(train_setup, "build_optimizer", build_optimizer)
    return seen


def _rewards(out) -> list[float]:
    return [json.loads(line)["reward_mean"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _rise(rewards: list[float]) -> float:
    return sum(rewards[-3:]) / 3 - sum(rewards[:3]) / 3


@pytest.mark.parametrize("name", ["adamw8bit", "paged_adamw8bit"])
def test_8bit_adamw_trains_lora_with_8bit_state(tiny_dir, tmp_path, captured, name):
    import bitsandbytes as bnb

    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--output-dir", str(out), *FAST, "--set", f"optimizer={name}",
                 "--set", "lora_rank=64", "--set", "lr=0.01"]) == 0
    opt, params = captured["optimizer"], captured["params"]
    expected = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    assert type(opt) is expected and opt.is_paged == (name == "paged_adamw8bit")

    # the state really is 8-bit for big tensors: 2 bytes per weight instead of AdamW's 8
    big = [p for p in params if p.numel() >= MIN_8BIT]
    small = [p for p in params if p.numel() < MIN_8BIT]
    assert big and small
    for p in big:
        s = opt.state[p]
        assert s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8
        assert s["state1"].shape == p.shape and "absmax1" in s
    for p in small:
        assert opt.state[p]["state1"].dtype == torch.float32
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()  # the code maps are shared
                for p in big for t in opt.state[p].values() if torch.is_tensor(t)}
    state_bytes, adamw_bytes = sum(storages.values()), sum(8 * p.numel() for p in big)
    print(f"{name}: state of the {len(big)} big LoRA matrices {state_bytes} B vs {adamw_bytes} B with fp32 AdamW")
    assert state_bytes < 0.26 * adamw_bytes  # 2 bytes/weight + one absmax per 256 weights + two code maps
    # ... and what the planner and the disk check count for it (memory.optim.adam8bit_state_bytes) is that state to
    # the byte, the small tensors' fp32 moments included (the code maps are shared: not a LoRA's)
    from lowmem_alignprop.memory.optim import adam8bit_state_bytes
    held = sum(t.nbytes for p in params for key, t in opt.state[p].items()
               if torch.is_tensor(t) and not key.startswith("qmap"))
    assert adam8bit_state_bytes(params) == held

    # every LoRA matrix moved, and the reward rose
    changed = [not torch.equal(a, p.detach()) for a, p in zip(captured["initial"], params)]
    assert all(changed), f"{changed.count(False)} of {len(changed)} LoRA matrices did not change"
    rewards = _rewards(out)
    print(f"{name}: brightness per step {[round(r, 3) for r in rewards]}")
    assert len(rewards) == 8 and _rise(rewards) > MIN_RISE


def test_full_unet_fine_tuning_trains_every_weight(tiny_dir, tmp_path, captured):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--output-dir", str(out), *FAST, "--set", "train_unet=full",
                 "--set", "lr=0.001"]) == 0
    params = captured["params"]
    base = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
    assert len(params) == len(list(base.parameters()))  # the whole UNet trains, no adapter
    assert all(p.dtype == torch.float32 for p in params)  # fp32 master weights
    changed = sum(not torch.equal(a, p.detach()) for a, p in zip(captured["initial"], params))
    assert changed >= 0.95 * len(params), (changed, len(params))
    # the saved UNet is the trained one
    saved = UNet2DConditionModel.from_pretrained(out / "unet")
    diff = max((a - b).abs().max().item() for a, b in zip(saved.parameters(), base.parameters()))
    assert diff > 1e-4
    rewards = _rewards(out)
    print(f"full UNet: brightness per step {[round(r, 3) for r in rewards]}")
    assert _rise(rewards) > MIN_RISE


# ------------------------------------------------------------------------------------------------------
# micro-batches + gradient accumulation == one big batch
# ------------------------------------------------------------------------------------------------------


def _accumulated_update(tiny_dir, tmp_path, batch: int, accum: int, total: int = 4):
    """One optimizer step over ``total`` images as ``accum`` micro-batches of ``batch``, through accelerate's
    accumulate/backward and step.rollout_loss. Deterministic sampling (eta=0) so the images are the same.

    The step is plain SGD: its update is linear in the gradient, so the weights after it differ from the big
    batch's by exactly lr times the gradients' difference. (Adam's first update is lr * g / (|g| + eps), about
    lr * sign(g): for an entry whose gradient is near zero, float rounding noise in g flips the sign and moves
    that weight by up to 2 lr, on some CPUs and not on others.)"""
    cfg = Config(model=str(tiny_dir), resolution=32, sample_steps=3, k=2, batch_size=batch, grad_accum=accum,
                 eta=0.0, guidance_scale=4.0, lr=0.01, output_dir=str(tmp_path)).validate()
    comps = load_components(cfg)
    params, _ = apply_memory_features(comps, cfg, torch.device("cpu"), torch.float32)
    comps.unet.train()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in params:  # lora_B starts at zero: give every matrix a gradient
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    reward = build_reward("brightness")
    prompts = ["a cat", "the dog", "a horse", "a bird"][:total]
    emb = encode_prompts(make_pipeline(comps), prompts, torch.device("cpu"), cfg.resolution)
    latents = torch.randn(total, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    accelerator = make_accelerator(cfg, tmp_path)
    accelerator.step = 0
    unet_train, optimizer = accelerator.prepare(comps.unet, torch.optim.SGD(params, lr=cfg.lr))
    grads, steps = None, 0
    for micro in range(accum):
        part = slice(micro * batch, (micro + 1) * batch)
        with accelerator.accumulate(unet_train):
            loss, _ = rollout_loss(cfg, comps.unet, unet_train, comps.scheduler, comps.vae, reward, latents[part],
                                   emb.index(part), prompts[part], k=cfg.k, generator=None,
                                   stage=lambda name: contextlib.nullcontext())
            accelerator.backward(loss)  # divides the loss by grad_accum: the sum of micro-steps is the batch mean
            if accelerator.sync_gradients:
                grads = [p.grad.detach().clone() for p in params]
                steps += 1
            optimizer.step()  # accelerate skips it until the last micro-step
            optimizer.zero_grad()
    assert steps == 1
    return grads, [p.detach().clone() for p in params]


def test_grad_accumulation_matches_one_big_batch(tiny_dir, tmp_path):
    ref_grads, ref_weights = _accumulated_update(tiny_dir, tmp_path, batch=4, accum=1)
    lr = 0.01
    for batch, accum in ((2, 2), (1, 4)):
        grads, weights = _accumulated_update(tiny_dir, tmp_path, batch=batch, accum=accum)
        rel = relative_difference(grads, ref_grads)
        print(f"batch {batch} x accum {accum} vs batch 4: relative gradient difference {rel:.1e}")
        assert rel < REORDERED  # the same sums split into micro-batches: float32 reordering only
        # exactly one SGD step with the accumulated gradient: ||dW|| = lr ||dg|| (+ rounding of W - lr g)
        dw = (flat(weights) - flat(ref_weights)).norm().item()
        dg = (flat(grads) - flat(ref_grads)).norm().item()
        assert dw <= lr * dg + 4 * EPS32 * flat(ref_weights).norm().item(), (dw, dg)
        # a step per micro-batch (or none) would move the weights by about lr ||g|| instead
        assert dw < 0.01 * lr * flat(ref_grads).norm().item()

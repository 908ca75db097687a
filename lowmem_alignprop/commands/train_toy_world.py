"""Train the toy world's models on the renderer's data: an SD-shaped text-to-image model and two rewards.

    python -m lowmem_alignprop.commands.train_toy_world --out DIR [--seed 0] [--scale 1.0] [--max-minutes N]
    python -m lowmem_alignprop.commands.train_toy_world --out DIR --rewards-only --gen-samples 2048 [--from SRC]
    python -m lowmem_alignprop.commands.train_toy_world --out DIR --rewards-only --from SRC --adversarial RUN [RUN ...]

Phases, in order (docs/toy_world.md has the reasons):

1. VAE (AutoencoderKL, 64x64x3 -> 16x16x4) on freshly rendered training-split scenes; then the latent
   scaling factor (1 / std of the latents) and the latents of a fixed pool of training scenes.
2. Text encoder (CLIPTextModel) and UNet (UNet2DConditionModel) together, epsilon-prediction on the pool,
   captions dropped to "" 10% of the time (classifier-free guidance); the UNet's EMA is what is saved.
3. toy_clip (contrastive, with hard-negative captions) and 4. toy_count (cross-entropy over 0..4 objects),
   on rendered scenes of the whole caption space (or the training split, --reward-split train), half of
   each batch passed through the trained VAE so that they know its artefacts.
5. (off unless --gen-samples N) The model's own DDIM samples (eta 1, as the trainer samples) of captions of the whole space, each labelled with
   what the exact evaluator reads in it (its objects; "" when it reads none), and 6. both rewards fine-tuned on
   them (half of each batch, colour-jittered, noised, blurred) with the rendered + reconstructed mix: trained on
   renders alone, toy_clip's gradient had found directions that raise its score and not the fidelity, where
   AlignProp starts (docs/toy_world.md). ``--rewards-only --gen-samples N --from SRC`` runs these two phases alone
   on SRC's model and phase 3-4 rewards (the same files a full run's phase 4 saved: the same weights). Measured
   with N = 2048: about 8 minutes of CPU (one thread), and the rewards it gives move a short AlignProp run less,
   not better (docs/toy_world.md), so they are off by default (the shipped toy_count is phase 4's, the
   shipped toy_clip phase 3's after the adversarial round below).
(off unless --adversarial RUN ...) An adversarial round: the images AlignProp runs on SRC's model drove it to (each
   run's prompts sampled with its LoRA, and with none), labelled as in phase 5, and toy_clip fine-tuned on them as
   in phase 6 (toy_count is left as it is), with a margin that keeps images the evaluator reads no object in under
   every right image and an anchor that keeps the right images' scores (``blank_margin_terms``). The shipped toy_clip
   (train_version 2) is one such round on the first full run's weights; docs/toy_world.md ("A blank margin") has
   the command, its four source runs and what it does to the README's run.
7. Report: exact fidelity of DDIM samples on training and held-out prompts, reward accuracies, sha256 of
   every file written, versions, the seed and the wall time of each phase -> DIR/report.json.

Output: DIR/model (a diffusers StableDiffusionPipeline directory, fp16 safetensors), DIR/rewards/toy_clip,
DIR/rewards/toy_count, DIR/report.json.

Fixed step counts make a run reproducible on the same software and CPU (float sums are reordered
elsewhere). ``--scale`` multiplies every step count (the tests use a tiny one); ``--max-minutes`` cuts each
phase at its share of the budget, and the report then says the run was truncated.

Time: the full run of the shipped weights (scale 1, one thread, at nice 19 on a 2-core machine four other jobs kept
busy) took 4,954 s: VAE 2,296 s, UNet 1,718 s, toy_clip 311 s, toy_count 469 s, the pool's latents 80 s and the
report 78 s (its report.json, wall_seconds); an idle 2-core CPU takes well under an hour. report.json records the
wall time of each phase of every run.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lowmem_alignprop.run import atomic
from lowmem_alignprop.run.filenames import COMMAND_FILE, CONFIG_FILE, LORA_DIR
from lowmem_alignprop.toy import fidelity as fid
from lowmem_alignprop.toy.scenes import (
    ALL_PAIRS, BACKGROUNDS, COLOURS, MAX_OBJECTS, P_MENTION_BACKGROUND, SHAPES, WORLD_VERSION, Content, Scene,
    caption, content, heldout_prompts, make_content, parse_caption, render, sample_scenes,
)

# bump with any change to the architectures, the default schedule or the data this script draws (phases 5-6 are off
# in the default schedule: with them on, the report's schedule says so). 2: an adversarial round's toy_clip with the
# blank margin and the anchor (blank_margin_terms; the shipped toy_clip); phases 1-4 are train_version 1's.
TRAIN_VERSION = "2"
RESOLUTION = 64
OBJECT_WEIGHT = 5.0  # the VAE's reconstruction loss on object pixels, relative to background pixels


@dataclass
class Schedule:
    vae_steps: int = 1500
    vae_batch: int = 16
    pool: int = 20000          # training scenes whose latents the UNet learns from
    unet_steps: int = 6000
    unet_batch: int = 32
    clip_steps: int = 1500
    count_steps: int = 1000
    reward_batch: int = 64
    recon_pool: int = 4000     # scenes passed through the VAE for the rewards
    eval_samples: int = 256    # per prompt set, in the report
    gen_samples: int = 0       # phase 5: the model's own DDIM samples labelled by the exact evaluator (0: phases
                               # 5-6 off; 2,048 measured: docs/toy_world.md, not yet better for AlignProp)
    robust_clip_steps: int = 400   # phase 6: the rewards fine-tuned on generated + rendered + reconstructed images
    robust_count_steps: int = 300
    adv_samples: int = 128     # --adversarial: samples of the run's prompts per AlignProp run's LoRA (and the base)
    adv_margin: float = 1.0    # --adversarial: how far (in cosine) a no-object image stays under the right images
    adv_margin_weight: float = 1.0  # ... that hinge's weight (blank_margin_terms; 0 with the anchor's 0: the plain
                                    # round of train_version 1's docs)
    adv_anchor_weight: float = 10.0  # --adversarial: the right images' cosines held at the toy_clip fine-tuned from
    sample_steps: int = 20
    guidance: float = 3.0

    def scaled(self, scale: float) -> "Schedule":
        s = Schedule(**asdict(self))
        if scale == 1:
            return s
        for k in ("vae_steps", "pool", "unet_steps", "clip_steps", "count_steps", "recon_pool", "eval_samples",
                  "gen_samples", "robust_clip_steps", "robust_count_steps", "adv_samples"):
            if getattr(s, k):  # (0 is off: gen_samples=0 leaves phases 5-6 out, scaled or not)
                setattr(s, k, max(1, int(round(getattr(s, k) * scale))))
        s.pool = max(s.pool, s.unet_batch)
        s.recon_pool = max(s.recon_pool, s.reward_batch)
        s.eval_samples = max(s.eval_samples, 4)
        s.gen_samples = max(s.gen_samples, s.reward_batch) if s.gen_samples else 0
        return s


# planned share of the wall time per phase (for --max-minutes)
SHARES = {"vae": 0.18, "unet": 0.55, "toy_clip": 0.1, "toy_count": 0.07, "robust_clip": 0.04, "robust_count": 0.02,
          "adversarial_clip": 0.04}


# ------------------------------------------------------------------------------------------ models

def build_models(seed: int):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lowmem_alignprop.toy.tokenizer import BOS, EOS, MAX_LENGTH, build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8, sample_size=RESOLUTION,
    )
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS], pad_token_id=vocab[EOS], projection_dim=64,
    ))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    return tokenizer, vae, unet, text_encoder, scheduler


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


def render_scenes(scenes) -> np.ndarray:
    return np.stack([render(s, RESOLUTION) for s in scenes])


def cosine_lr(opt, step: int, total: int, base: float, warmup: int = 0) -> None:
    if step < warmup:
        lr = base * (step + 1) / warmup
    else:
        lr = base * 0.5 * (1 + math.cos(math.pi * min(step - warmup, total) / max(total - warmup, 1)))
    for g in opt.param_groups:
        g["lr"] = lr


class Clock:
    def __init__(self, max_minutes: float | None):
        self.max_s = None if max_minutes is None else 60.0 * max_minutes
        self.times: dict[str, float] = {}
        self.truncated: dict[str, int] = {}

    def budget(self, phase: str) -> float | None:
        return None if self.max_s is None else self.max_s * SHARES[phase]

    def run(self, phase: str, steps: int, step_fn, log_every: int, log) -> None:
        t0, budget = time.time(), self.budget(phase)
        for i in range(steps):
            loss = step_fn(i)
            if i % log_every == 0 or i == steps - 1:
                log(f"{phase} {i + 1}/{steps} loss {loss:.4f} ({time.time() - t0:.0f} s)")
            if budget is not None and time.time() - t0 > budget and i < steps - 1:
                self.truncated[phase] = i + 1
                log(f"{phase}: stopped at step {i + 1} of {steps} (--max-minutes)")
                break
        self.times[phase] = round(time.time() - t0, 1)


# ------------------------------------------------------------------------------------------ phases

def train_vae(vae, sched: Schedule, seed: int, clock: Clock, log) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)

    def step(i):
        scenes = sample_scenes(sched.vae_batch, seed + 1, "train", start=i * sched.vae_batch)
        x = to_tensor(render_scenes(scenes))
        # objects cover ~10% of the pixels but carry all the caption: their pixels (and edges) weigh
        # OBJECT_WEIGHT times a background pixel's
        bg = torch.tensor([BACKGROUNDS[s.background] for s in scenes], dtype=torch.float32).div(255).view(-1, 3, 1, 1)
        weight = 1 + (OBJECT_WEIGHT - 1) * ((x - bg).abs().amax(1, keepdim=True) > 0.5 / 255).float()
        cosine_lr(opt, i, sched.vae_steps, 1e-3, warmup=min(50, sched.vae_steps // 10))
        post = vae.encode(x * 2 - 1).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = (vae.decode(z).sample + 1) / 2
        err = rec - x
        loss = ((err.abs() + 0.1 * err ** 2) * weight).mean() / weight.mean() + 1e-6 * post.kl().mean()
        return descend(opt, loss)

    vae.train()
    clock.run("vae", sched.vae_steps, step, max(sched.vae_steps // 20, 1), log)
    vae.eval()


def descend(opt, loss: torch.Tensor) -> float:
    """One optimizer update on ``loss``; the loss as a number for the log."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


@torch.no_grad()
def encode_pool(vae, scenes, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(scenes), batch):
        post = vae.encode(to_tensor(render_scenes(scenes[i:i + batch])) * 2 - 1).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(unet, text_encoder, tokenizer, scheduler, latents, stds, captions, sched: Schedule, seed: int,
               clock: Clock, log) -> None:
    from diffusers.training_utils import EMAModel

    ids = tokenize(tokenizer, captions)
    empty = tokenize(tokenizer, [""])[0]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    # the UNet's average, decay min(0.999, (1 + i) / (10 + i)) at step i (its warm-up), copied in at the end
    ema = EMAModel(unet.parameters(), decay=0.999, foreach=True)
    gen = torch.Generator().manual_seed(seed + 2)
    rng = np.random.default_rng(seed + 2)

    def step(i):
        idx = torch.from_numpy(rng.integers(0, len(latents), sched.unet_batch))
        z0 = latents[idx] + stds[idx] * torch.randn(latents[idx].shape, generator=gen)
        tok = ids[idx].clone()
        drop = torch.from_numpy(rng.random(sched.unet_batch) < 0.1)
        tok[drop] = empty
        t = torch.randint(0, scheduler.config.num_train_timesteps, (sched.unet_batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        zt = scheduler.add_noise(z0, noise, t)
        cosine_lr(opt, i, sched.unet_steps, 5e-4, warmup=min(200, sched.unet_steps // 10))
        pred = unet(zt, t, encoder_hidden_states=text_encoder(tok)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(unet.parameters())
        return loss.item()

    unet.train()
    text_encoder.train()
    clock.run("unet", sched.unet_steps, step, max(sched.unet_steps // 40, 1), log)
    ema.copy_to(unet.parameters())
    unet.eval()
    text_encoder.eval()


def perturb(c, rng: np.random.Generator):
    """A caption content one edit away: one object's colour or shape changed, an object added or removed, or
    the background named differently."""
    objs = list(c.objects)
    if not objs:  # a generated image the evaluator reads nothing in: the one edit is an object
        return make_content([ALL_PAIRS[int(rng.integers(0, len(ALL_PAIRS)))]], c.background)
    kind = int(rng.integers(0, 4))
    if kind == 3 and c.background is None:
        kind = int(rng.integers(0, 3))
    if kind == 0:
        i = int(rng.integers(0, len(objs)))
        others = [k for k in COLOURS if k != objs[i][0]]
        objs[i] = (others[int(rng.integers(0, len(others)))], objs[i][1])
    elif kind == 1:
        i = int(rng.integers(0, len(objs)))
        others = [s for s in SHAPES if s != objs[i][1]]
        objs[i] = (objs[i][0], others[int(rng.integers(0, len(others)))])
    elif kind == 2:
        if len(objs) > 1 and (len(objs) == MAX_OBJECTS or rng.random() < 0.5):
            objs.pop(int(rng.integers(0, len(objs))))
        else:
            objs.append(ALL_PAIRS[int(rng.integers(0, len(ALL_PAIRS)))])
    else:
        others = [b for b in BACKGROUNDS if b != c.background]
        return make_content(objs, others[int(rng.integers(0, len(others)))])
    return make_content(objs, c.background)


def augment(x: torch.Tensor, gen: torch.Generator, max_sd: float = 0.05, jitter: float = 0.0) -> torch.Tensor:
    """Gaussian noise of sd uniform in [0, max_sd] and, for half the images, a 3x3 binomial blur; with jitter > 0
    first a colour jitter: each channel's gain in 1 +- jitter and offset in +- jitter (0.04 moves a colour by at
    most ~20 RGB units, a quarter of the closest two palette colours' distance: the caption stays true)."""
    b = x.shape[0]
    if jitter > 0:
        gain = 1 + jitter * (2 * torch.rand(b, 3, 1, 1, generator=gen) - 1)
        x = (x * gain + jitter * (2 * torch.rand(b, 3, 1, 1, generator=gen) - 1)).clamp(0, 1)
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3).contiguous()
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    pick = (torch.rand(b, 1, 1, 1, generator=gen) < 0.5).float()
    x = pick * blurred + (1 - pick) * x
    sd = max_sd * torch.rand(b, 1, 1, 1, generator=gen)
    return (x + sd * torch.randn(x.shape, generator=gen)).clamp(0, 1)


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        post = vae.encode(images[i:i + batch] * 2 - 1).latent_dist
        out.append(((vae.decode(post.mean).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def reward_batches(vae, sched: Schedule, seed: int, split: str, with_empty: bool):
    """An endless stream of (images, scenes): half rendered and augmented, half VAE reconstructions of a
    fixed pool; with_empty adds scenes of 0 objects (for the counter)."""
    pool = sample_scenes(sched.recon_pool, seed + 3, split)
    recon = reconstruct(vae, to_tensor(render_scenes(pool)))
    rng = np.random.default_rng(seed + 4)
    gen = torch.Generator().manual_seed(seed + 4)
    half = sched.reward_batch // 2
    i = 0
    while True:
        fresh = sample_scenes(sched.reward_batch - half, seed + 5, split, start=i * sched.reward_batch)
        if with_empty:
            fresh = [Scene((), s.background) if rng.random() < 1 / (MAX_OBJECTS + 1) else s for s in fresh]
        pick = rng.integers(0, len(pool), half)
        images = torch.cat([augment(to_tensor(render_scenes(fresh)), gen), recon[torch.from_numpy(pick)]])
        yield images, fresh + [pool[j] for j in pick]
        i += 1


def text_of(c) -> str:
    """A scene's or content's caption; "" (the empty prompt) for no objects."""
    return caption(c) if c.objects else ""


def train_toy_clip(model, tokenizer, batches, sched: Schedule, seed: int, clock: Clock, log, steps: int | None = None,
                   lr: float = 1e-3, phase: str = "toy_clip", reference=None) -> None:
    """toy_clip's contrastive training (InfoNCE with hard negatives). With ``reference`` (a frozen copy of the model
    being fine-tuned) and ``sched.adv_margin_weight`` / ``sched.adv_anchor_weight`` > 0, also the blank margin and
    the anchor of ``blank_margin_terms``."""
    steps = sched.clip_steps if steps is None else steps
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    rng = np.random.default_rng(seed + 6)

    def step(i):
        images, scenes = next(batches)
        contents = [s.label if isinstance(s, Generated) else content(s) for s in scenes]
        texts = [text_of(c) for c in contents]
        negatives = [caption(perturb(c, rng)) for c in contents for _ in range(4)]
        for j, s in enumerate(scenes):  # a generated image's prompt, when it drew something else, is its first negative
            if isinstance(s, Generated) and s.wrong is not None:
                negatives[4 * j] = s.wrong
        cosine_lr(opt, i, steps, lr, warmup=min(100, steps // 10))
        img = model.embed_images(images)
        txt = model.embed_text(tokenize(tokenizer, texts + negatives))
        b = len(texts)
        pos, neg = txt[:b], txt[b:].view(b, 4, -1)
        scale = model.logit_scale.clamp(max=math.log(100)).exp()
        logits = scale * img @ pos.T  # [B, B]
        hard = scale * torch.einsum("bd,bkd->bk", img, neg)  # [B, 4]
        target = torch.arange(b)
        # two captions can be the same text: every matching caption counts as right
        same = torch.tensor([[ti == tj for tj in texts] for ti in texts])
        loss_i = -(torch.logsumexp(logits.masked_fill(~same, -1e4), 1)
                   - torch.logsumexp(torch.cat([logits, hard], 1), 1)).mean()
        loss_t = F.cross_entropy(logits.T.masked_fill(same & ~torch.eye(b, dtype=torch.bool), -1e4), target)
        loss = (loss_i + loss_t) / 2
        if reference is not None:
            loss = loss + blank_margin_terms(model, reference, img, pos, images, scenes, texts, tokenizer, sched)
        return descend(opt, loss)

    model.train()
    clock.run(phase, steps, step, max(steps // 20, 1), log)
    model.eval()


def blank_margin_terms(model, reference, img: torch.Tensor, pos: torch.Tensor, images: torch.Tensor, scenes,
                       texts: list[str], tokenizer, sched: Schedule) -> torch.Tensor:
    """The two terms that put an image with no object under every right image (docs/toy_world.md, "A blank
    margin"). InfoNCE only orders the captions of one image, so a blank could still score 60 for "a blue diamond"
    while the diamonds drawn right score 90 or less; here:

    - margin: for each image the exact evaluator reads no object in (a blank or a noisy frame), its cosine with every
      caption of the batch's right images (rendered, reconstructed, or generated and read right) and with the prompt
      it was drawn for stays ``sched.adv_margin`` under that caption's right image's cosine (the prompt: under the mean
      right cosine of the batch); hinge, weight ``sched.adv_margin_weight``;
    - anchor: on the right images, each cosine with every caption of the batch stays where ``reference`` (toy_clip
      before this fine-tuning) puts it: squared error, weight ``sched.adv_anchor_weight`` (so the fine-tuning cannot
      flatten the right images' scores, as the plain round did)."""
    blank = [j for j, s in enumerate(scenes) if isinstance(s, Generated) and not s.label.objects]
    right = [i for i, s in enumerate(scenes) if texts[i] and not (isinstance(s, Generated) and s.wrong is not None)]
    loss = img.sum() * 0  # zero, on the graph
    if not right:
        return loss
    r = torch.tensor(right)
    right_cos = (img[r] * pos[r]).sum(-1)  # [R] each right image with its own caption
    if blank and sched.adv_margin_weight > 0:
        b = torch.tensor(blank)
        over = img[b] @ pos[r].T - right_cos.detach()[None, :] + sched.adv_margin  # [NB, R]
        drawn_for = [scenes[j].wrong or "" for j in blank]
        prompt = model.embed_text(tokenize(tokenizer, drawn_for))
        over_prompt = (img[b] * prompt).sum(-1) - right_cos.detach().mean() + sched.adv_margin
        over_prompt = over_prompt[torch.tensor([bool(t) for t in drawn_for])]
        loss = loss + sched.adv_margin_weight * (F.relu(over).mean() + F.relu(over_prompt).sum() / len(blank))
    if sched.adv_anchor_weight > 0:
        with torch.no_grad():
            ref_text = reference.embed_text(tokenize(tokenizer, [texts[i] for i in right]))
            ref = reference.embed_images(images[r]) @ ref_text.T
        loss = loss + sched.adv_anchor_weight * F.mse_loss(img[r] @ pos[r].T, ref)
    return loss


def train_toy_count(model, batches, sched: Schedule, clock: Clock, log, steps: int | None = None,
                    lr: float = 1e-3, phase: str = "toy_count") -> None:
    steps = sched.count_steps if steps is None else steps
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)

    def step(i):
        images, scenes = next(batches)
        target = torch.tensor([len(s.objects) for s in scenes])
        cosine_lr(opt, i, steps, lr, warmup=min(100, steps // 10))
        loss = F.cross_entropy(model(images), target)
        return descend(opt, loss)

    model.train()
    clock.run(phase, steps, step, max(steps // 20, 1), log)
    model.eval()


# ------------------------------------------------------------------------------------------ phases 5-6: robustness

ROBUST_LR = 3e-4  # phase 6 fine-tunes the trained rewards: a third of their first learning rate
ROBUST_JITTER = 0.04
ROBUST_MAX_SD = 0.1


@dataclass(frozen=True)
class Generated:
    """A generated image's label: what the exact evaluator read (``label``), and its prompt when that differs from the
    reading (``wrong``: toy_clip's hard negative for the image, where a reward trained on renders was fooled)."""
    label: Content
    wrong: str | None

    @property
    def objects(self):  # (the counter's target, as a Scene's)
        return self.label.objects


def detected_label(d: fid.Detection, rng: np.random.Generator) -> Content | None:
    """What the exact evaluator reads in a generated image, as a caption content: its objects, and its background
    named half the time (as the sampler names it) when the frame is a background colour. None when it reads more
    objects than the world holds (no caption says that)."""
    if len(d.objects) > MAX_OBJECTS:
        return None
    named = d.background if d.background in BACKGROUNDS and rng.random() < P_MENTION_BACKGROUND else None
    return make_content(((o.colour, o.shape) for o in d.objects), named)


@torch.no_grad()
def generated_pool(pipe, sched: Schedule, seed: int, split: str, log) -> tuple[torch.Tensor, list[Generated], dict]:
    """Phase 5: the model's own DDIM samples (eta 1, as the trainer samples) of captions of ``split``, each labelled
    with what the exact evaluator reads in it (``detected_label``) and, when that is not what the prompt asked, the
    prompt as a wrong caption: the images AlignProp starts from, which the rewards never saw rendered. Returns the
    images, their labels and the pool's statistics for the report."""
    prompts = [caption(s) for s in sample_scenes(sched.gen_samples, seed + 12, split)]
    images = sample_images(pipe, prompts, sched, seed + 13, eta=1.0)
    rng = np.random.default_rng(seed + 14)
    detections = fid.detect(images)
    checks = [fid.compare(parse_caption(p), d.content) for p, d in zip(prompts, detections)]
    labels = [detected_label(d, rng) for d in detections]
    keep = [i for i, c in enumerate(labels) if c is not None]
    stats = {"images": len(prompts), "kept": len(keep),
             "no_object_read": sum(not d.objects for d in detections) / len(prompts),
             "objects_read_mean": float(np.mean([len(d.objects) for d in detections])),
             "prompt_all_ok": fid.summarize(checks)["all_ok"]}
    log(f"generated pool: {stats}")
    items = [Generated(labels[i], None if checks[i].all_ok else prompts[i]) for i in keep]
    return images[torch.tensor(keep, dtype=torch.long)], items, {k: round(v, 4) for k, v in stats.items()}


def robust_batches(vae, images: torch.Tensor, labels: list[Generated], sched: Schedule, seed: int, split: str,
                   with_empty: bool):
    """Phase 6's stream: half of each batch generated images (colour-jittered, noised, blurred), half the
    rendered + reconstructed mix of ``reward_batches``; (images, scenes or contents)."""
    half = sched.reward_batch // 2
    rest = reward_batches(vae, Schedule(**{**asdict(sched), "reward_batch": sched.reward_batch - half}), seed, split,
                          with_empty)
    rng = np.random.default_rng(seed + 15)
    gen = torch.Generator().manual_seed(seed + 15)
    while True:
        pick = rng.integers(0, len(labels), half)
        x = augment(images[torch.from_numpy(pick)], gen, max_sd=ROBUST_MAX_SD, jitter=ROBUST_JITTER)
        other, scenes = next(rest)
        yield torch.cat([x, other]), [labels[j] for j in pick] + scenes


def robust_phases(pipe, clip, counter, tokenizer, sched: Schedule, seed: int, split: str, clock: Clock, log) -> dict:
    """Phases 5-6: the rewards fine-tuned where AlignProp uses them, on the generator's own images labelled by the
    exact evaluator (docs/toy_world.md: trained on renders alone, their gradients had found directions that
    raise the score and not the fidelity). Returns the generated pool's statistics."""
    t0 = time.time()
    images, labels, stats = generated_pool(pipe, sched, seed + 200, split, log)
    clock.times["generated_pool"] = round(time.time() - t0, 1)
    if not labels:  # (an untrained model's noise can read as more objects than any caption holds)
        log("generated pool: no image the world's captions describe; phase 6 skipped")
        return stats
    train_toy_clip(clip, tokenizer, robust_batches(pipe.vae, images, labels, sched, seed + 300, split, False), sched,
                   seed + 300, clock, log, steps=sched.robust_clip_steps, lr=ROBUST_LR, phase="robust_clip")
    train_toy_count(counter, robust_batches(pipe.vae, images, labels, sched, seed + 400, split, True), sched, clock,
                    log, steps=sched.robust_count_steps, lr=ROBUST_LR, phase="robust_count")
    return stats


# ------------------------------------------------------------------------------------------ an adversarial round

def _run_prompts(run: Path) -> list[str]:
    """The prompts an AlignProp run trained on (its config.yaml's ``prompts``: a built-in set or a file)."""
    import yaml

    from lowmem_alignprop.step.prompts import configured_prompts

    return configured_prompts(yaml.safe_load((run / CONFIG_FILE).read_text(encoding="utf-8")))


@torch.no_grad()
def adversarial_pool(pipe, runs: list[Path], sched: Schedule, seed: int, log) -> tuple[torch.Tensor, list[Generated],
                                                                                         dict]:
    """The images AlignProp runs drove the model to: ``sched.adv_samples`` DDIM samples (eta 1, as the trainer
    samples) of each run's prompts with its LoRA loaded, and as many of the base model's, each labelled as phase 5
    labels (what the exact evaluator reads; "" for no object, the prompt then a hard negative). Returns the images,
    their labels and per-source statistics."""
    rng = np.random.default_rng(seed + 16)
    images, items, stats = [], [], {}
    for k, run in enumerate([None, *runs]):
        prompts = _run_prompts(runs[0] if run is None else run)
        prompts = [prompts[i % len(prompts)] for i in range(sched.adv_samples)]
        if run is not None:
            pipe.load_lora_weights(str(run / LORA_DIR), adapter_name=f"run{k}")
        x = sample_images(pipe, prompts, sched, seed + 17 + 1000 * k, eta=1.0)
        if run is not None:
            pipe.delete_adapters(f"run{k}")
        detections = fid.detect(x)
        checks = [fid.compare(parse_caption(p), d.content) for p, d in zip(prompts, detections)]
        labels = [detected_label(d, rng) for d in detections]
        keep = [i for i, c in enumerate(labels) if c is not None]
        images.append(x[torch.tensor(keep, dtype=torch.long)])
        items += [Generated(labels[i], None if checks[i].all_ok else prompts[i]) for i in keep]
        name = "base" if run is None else run.name
        stats[name] = {"images": len(prompts), "kept": len(keep),
                       "no_object_read": round(sum(not d.objects for d in detections) / len(prompts), 4),
                       "prompt_all_ok": round(fid.summarize(checks)["all_ok"], 4)}
        log(f"adversarial pool, {name}: {stats[name]}")
    return torch.cat(images), items, stats


def _run_record(run: Path) -> dict:
    """What the report keeps of an adversarial round's AlignProp run: its command and its LoRA's checksums."""
    command = run / COMMAND_FILE
    return {"command": command.read_text(encoding="utf-8").strip() if command.exists() else None,
            "lora_sha256": sha256s(run / LORA_DIR)}


def adversarial_round(pipe, clip, tokenizer, runs: list[Path], sched: Schedule, seed: int, split: str, clock: Clock,
                      log) -> dict:
    """toy_clip fine-tuned (as phase 6) on the images of ``adversarial_pool`` with the rendered + reconstructed
    mix: the noisy frames and blanks short AlignProp runs made, which the rewards trained on renders scored above
    blank images (docs/toy_world.md). Returns the pool's statistics."""
    t0 = time.time()
    images, labels, stats = adversarial_pool(pipe, runs, sched, seed + 500, log)
    clock.times["adversarial_pool"] = round(time.time() - t0, 1)
    reference = None
    if sched.adv_margin_weight > 0 or sched.adv_anchor_weight > 0:  # a frozen copy: what the anchor holds to
        reference = copy.deepcopy(clip).eval().requires_grad_(False)
    train_toy_clip(clip, tokenizer, robust_batches(pipe.vae, images, labels, sched, seed + 600, split, False), sched,
                   seed + 600, clock, log, steps=sched.robust_clip_steps, lr=ROBUST_LR, phase="adversarial_clip",
                   reference=reference)
    return stats


# ------------------------------------------------------------------------------------------ report

@torch.no_grad()
def sample_images(pipe, prompts: list[str], sched: Schedule, seed: int, batch: int = 32,
                  eta: float = 0.0) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        res = pipe(prompts[i:i + batch], height=RESOLUTION, width=RESOLUTION, num_inference_steps=sched.sample_steps,
                   guidance_scale=sched.guidance, generator=g, output_type="pt", eta=eta)
        out.append(res.images.float().clamp(0, 1))
    return torch.cat(out)


def sha256s(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "report.json":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@torch.no_grad()
def evaluate(out: Path, sched: Schedule, seed: int, log) -> dict:
    from diffusers import StableDiffusionPipeline

    from lowmem_alignprop.models.loading import dtype_kwarg
    from lowmem_alignprop.rewards.toy import load_toy_clip, load_toy_count

    pipe = StableDiffusionPipeline.from_pretrained(out / "model", **dtype_kwarg(torch.float32))
    pipe.set_progress_bar_config(disable=True)
    clip_r, count_r = load_toy_clip(out / "rewards" / "toy_clip"), load_toy_count(out / "rewards" / "toy_count")
    report = {}
    sets = {"train": [caption(s) for s in sample_scenes(sched.eval_samples, seed + 7, "train")],
            "heldout": heldout_prompts(sched.eval_samples, seed + 7)}
    for name, prompts in sets.items():
        images = sample_images(pipe, prompts, sched, seed + 8)
        res = fid.summarize(fid.fidelity(images, prompts))
        res["toy_clip"] = float(clip_r(images, prompts).mean())
        res["jpeg_bytes"] = float(np.mean(fid.jpeg_sizes(images)))
        report[f"samples_{name}"] = {k: round(v, 4) for k, v in res.items()}
        log(f"samples on {name} prompts: {report[f'samples_{name}']}")
    # the rewards on rendered scenes of the whole space: do they rank the right caption first, count right?
    scenes = sample_scenes(sched.eval_samples, seed + 9, "all")
    images = to_tensor(render_scenes(scenes))
    texts = [caption(s) for s in scenes]
    rng = np.random.default_rng(seed + 9)
    right = clip_r(images, texts)
    wrong = clip_r(images, [caption(perturb(content(s), rng)) for s in scenes])
    counts = count_r.model.expected_count(images).round()
    report["rewards_on_renders"] = {
        "toy_clip_prefers_true_caption_over_one_edit": round(float((right > wrong).float().mean()), 4),
        "toy_count_accuracy": round(float((counts == torch.tensor([len(s.objects) for s in scenes])).float().mean()), 4),
    }
    log(f"rewards on renders: {report['rewards_on_renders']}")
    return report


# ------------------------------------------------------------------------------------------ main

def train_world(out: str | Path, seed: int = 0, scale: float = 1.0, max_minutes: float | None = None,
                reward_split: str = "all", threads: int | None = None, evaluate_samples: bool = True,
                schedule: Schedule | None = None, log=print, rewards_from: str | Path | None = None,
                adversarial: list[str | Path] = ()) -> dict:
    """Train everything into ``out`` (see the module doc); returns the report. ``schedule`` replaces the
    default schedule (then ``scale`` multiplies it). ``threads`` sets torch's CPU threads for the run (on a
    shared or busy machine 1 is often faster than oversubscribed cores). ``rewards_from``: a directory this
    script wrote; its model and phase 3-4 rewards are taken as they are and only phases 5-6 run (what a full run
    does after phase 4, which saved those same fp16 files). ``adversarial``: AlignProp run directories on this
    model; toy_clip is then fine-tuned on what their LoRAs draw (``adversarial_round``), after phases 5-6 if on."""
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train_world(Path(out), seed, scale, max_minutes, reward_split, evaluate_samples, schedule, log,
                            None if rewards_from is None else Path(rewards_from), [Path(r) for r in adversarial])
    finally:
        torch.set_num_threads(previous_threads)


def _train_model_and_rewards(out: Path, sched: Schedule, seed: int, reward_split: str, clock: Clock, log) -> dict:
    """Phases 1-4 into ``out``/model and ``out``/rewards (fp16); returns the VAE's part of the report."""
    from diffusers import StableDiffusionPipeline

    from lowmem_alignprop.rewards.toy import ToyClipModel, ToyCountModel, save_model
    from lowmem_alignprop.toy.tokenizer import BOS, EOS

    tokenizer, vae, unet, text_encoder, scheduler = build_models(seed)
    train_vae(vae, sched, seed, clock, log)
    t0 = time.time()
    pool = sample_scenes(sched.pool, seed, "train")
    means, stds = encode_pool(vae, pool)
    sf = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=sf)
    check = pool[:min(len(pool), sched.eval_samples)]
    recon = reconstruct(vae, to_tensor(render_scenes(check)))
    vae_fid = fid.summarize(fid.fidelity(recon, [caption(s) for s in check]))
    clock.times["latents"] = round(time.time() - t0, 1)
    log(f"vae: scaling factor {sf:.4f}; reconstructions' exact fidelity {vae_fid['all_ok']:.3f}")

    train_unet(unet, text_encoder, tokenizer, scheduler, means * sf, stds * sf, [caption(s) for s in pool],
               sched, seed, clock, log)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with atomic.replacing_dir(out / "model") as tmp:  # (a killed build leaves no half model for --rewards-only)
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)  # half the bytes
        _text_encoder_in_hub_layout(tmp / "text_encoder" / "model.safetensors")
    pipe.to(torch.float32)  # (the rewards' VAE reconstructions below: the fp16 weights, computed in fp32)

    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed + 10)
    clip = ToyClipModel(len(tokenizer), vocab[BOS], vocab[EOS], max_length=tokenizer.model_max_length)
    train_toy_clip(clip, tokenizer, reward_batches(vae, sched, seed, reward_split, False), sched, seed, clock, log)
    save_model(clip, out / "rewards" / "toy_clip", "toy_clip")
    torch.manual_seed(seed + 11)
    counter = ToyCountModel()
    train_toy_count(counter, reward_batches(vae, sched, seed + 100, reward_split, True), sched, clock, log)
    save_model(counter, out / "rewards" / "toy_count", "toy_count")
    return {"vae_scaling_factor": sf, "vae_reconstruction_fidelity": round(vae_fid["all_ok"], 4)}


def _text_encoder_in_hub_layout(path: Path) -> None:
    """Rename the saved text encoder's weights to the hub's layout (``text_model.``), which every transformers 5
    release loads; newer ones save it without."""
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.rewards.toy import text_tower_names

    state = text_tower_names(load_file(str(path)), "", nested=True)
    with atomic.replacing(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def _taken_from(source: Path, out: Path) -> dict:
    """--rewards-only: ``source``'s model (copied into ``out`` unless it is ``out``) and phase 3-4 rewards; returns
    what the report keeps of ``source``'s: its VAE figures and, under ``phases_1_4_from``, its version, seed,
    schedule, wall times and checksums (of the rewards phases 5-6 start from too)."""
    import shutil

    prior = json.loads((source / "report.json").read_text(encoding="utf-8"))
    if source.resolve() != out.resolve():
        with atomic.replacing_dir(out / "model") as tmp:  # (replaced whole: no older model's files merged in)
            shutil.copytree(source / "model", tmp, dirs_exist_ok=True)
    keep = ("train_version", "seed", "scale", "schedule", "reward_split", "reproducible", "wall_seconds", "sha256")
    return {"vae_scaling_factor": prior["vae_scaling_factor"],
            "vae_reconstruction_fidelity": prior["vae_reconstruction_fidelity"],
            "phases_1_4_from": {k: prior.get(k) for k in keep}}


def _train_world(out: Path, seed: int, scale: float, max_minutes: float | None, reward_split: str,
                 evaluate_samples: bool, schedule: Schedule | None, log, rewards_from: Path | None = None,
                 adversarial: list[Path] = ()) -> dict:
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline

    from lowmem_alignprop.models.loading import dtype_kwarg
    from lowmem_alignprop.rewards.toy import load_model, save_model

    out.mkdir(parents=True, exist_ok=True)
    sched = (schedule or Schedule()).scaled(scale)
    random.seed(seed)
    np.random.seed(seed)
    clock = Clock(max_minutes)
    t_start, cpu_start = time.time(), time.process_time()
    if rewards_from is None:
        report = _train_model_and_rewards(out, sched, seed, reward_split, clock, log)
        rewards = out / "rewards"
    else:
        report = _taken_from(rewards_from, out)
        rewards = rewards_from / "rewards"
    # phases 5-6 start from the saved fp16 files, with or without --rewards-only: both paths give the same weights
    if sched.gen_samples > 0 or adversarial:  # (neither: phases 1-4 alone, as train_version 1 ran)
        pipe = StableDiffusionPipeline.from_pretrained(out / "model", **dtype_kwarg(torch.float32))
        pipe.set_progress_bar_config(disable=True)
        clip, counter = load_model(rewards / "toy_clip").train(), load_model(rewards / "toy_count").train()
        if sched.gen_samples > 0:
            report["generated_pool"] = robust_phases(pipe, clip, counter, pipe.tokenizer, sched, seed, reward_split,
                                                     clock, log)
        if adversarial:
            report["adversarial_runs"] = {r.name: _run_record(r) for r in adversarial}
            report["adversarial_pool"] = adversarial_round(pipe, clip, pipe.tokenizer, list(adversarial), sched, seed,
                                                           reward_split, clock, log)
        save_model(clip, out / "rewards" / "toy_clip", "toy_clip")
        save_model(counter, out / "rewards" / "toy_count", "toy_count")

    report.update({
        "world_version": WORLD_VERSION, "train_version": TRAIN_VERSION, "seed": seed, "scale": scale,
        "schedule": asdict(sched), "reward_split": reward_split, "max_minutes": max_minutes,
        "truncated": clock.truncated, "reproducible": not clock.truncated,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
    })
    if evaluate_samples:
        t0 = time.time()
        report.update(evaluate(out, sched, seed, log))
        clock.times["report"] = round(time.time() - t0, 1)
    report["wall_seconds"] = {**clock.times, "total": round(time.time() - t_start, 1)}
    report["cpu_seconds"] = round(time.process_time() - cpu_start, 1)  # this process's user + system time
    report["sha256"] = sha256s(out)
    atomic.write_text(out / "report.json", json.dumps(report, indent=1, sort_keys=True) + "\n")
    log(f"wrote {out} in {report['wall_seconds']['total']:.0f} s")
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lowmem_alignprop.commands.train_toy_world", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply every step count (1: the shipped schedule, 4,954 s on a busy 2-core machine)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="cut each phase at its share of this budget (the run is then not reproducible)")
    ap.add_argument("--reward-split", choices=("all", "train"), default="all")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-eval", action="store_true", help="skip sampling and the report's fidelity numbers")
    ap.add_argument("--gen-samples", type=int, default=0,
                    help="phases 5-6: fine-tune the rewards on N of the model's own samples (0: off; 2048 measured)")
    ap.add_argument("--rewards-only", action="store_true",
                    help="run only phases 5-6 (the rewards on the model's own samples) from --from's model and rewards")
    ap.add_argument("--from", dest="source", default=None,
                    help="with --rewards-only: a directory this script wrote (default: --out itself)")
    ap.add_argument("--adversarial", nargs="+", default=[], metavar="RUN",
                    help="with --rewards-only: AlignProp run directories on --from's model; toy_clip is fine-tuned on "
                         "what their LoRAs draw, labelled by the exact evaluator (an adversarial round)")
    ap.add_argument("--adv-samples", type=int, default=Schedule.adv_samples,
                    help="--adversarial: samples per run (and of the base model)")
    ap.add_argument("--adv-margin-weight", type=float, default=Schedule.adv_margin_weight,
                    help="--adversarial: weight of the hinge that keeps images with no object under every right image "
                         "by --adv-margin (0: off)")
    ap.add_argument("--adv-margin", type=float, default=Schedule.adv_margin,
                    help="--adversarial: that margin, in cosine (100 x it in toy_clip's reward)")
    ap.add_argument("--adv-anchor-weight", type=float, default=Schedule.adv_anchor_weight,
                    help="--adversarial: weight of the squared error holding the right images' cosines at --from's "
                         "toy_clip (0: off)")
    args = ap.parse_args(argv)
    if args.adversarial and not args.rewards_only:
        ap.error("--adversarial needs --rewards-only")
    if args.source and not args.rewards_only:
        ap.error("--from needs --rewards-only")
    source = (args.source or args.out) if args.rewards_only else None
    if args.rewards_only and not (args.gen_samples or args.adversarial):
        ap.error("--rewards-only runs phases 5-6 or an adversarial round: give --gen-samples N or --adversarial RUN")
    train_world(args.out, seed=args.seed, scale=args.scale, max_minutes=args.max_minutes,
                reward_split=args.reward_split, threads=args.threads, evaluate_samples=not args.no_eval,
                schedule=Schedule(gen_samples=args.gen_samples, adv_samples=args.adv_samples,
                                  adv_margin=args.adv_margin, adv_margin_weight=args.adv_margin_weight,
                                  adv_anchor_weight=args.adv_anchor_weight), rewards_from=source,
                adversarial=args.adversarial)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

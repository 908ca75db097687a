"""``--model tiny``: a tiny SD-shaped pipeline with random weights, built in code, offline, with a fixed seed (the
test suite's default model and the planner's smallest; a run's default is the shipped toy world, toy/).

It is saved with ``save_pretrained`` into a cache directory and loaded back through exactly the same
code path as a real Stable Diffusion directory, so a run on it exercises the real loader.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_VERSION = "v2"
TINY_RESOLUTION = 64  # pixels; the tiny VAE downsamples by 2, so latents are 32x32


def cache_root() -> Path:
    """Where built-in artefacts go: $LOWMEM_ALIGNPROP_CACHE, else $XDG_CACHE_HOME/lowmem_alignprop."""
    env = os.environ.get("LOWMEM_ALIGNPROP_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()  # empty or relative: unset, by the XDG spec
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "lowmem_alignprop"


def byte_level_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small CLIP-style BPE vocabulary: every byte symbol, alone and word-final, plus a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = [("a", "t</w>"), ("o", "g</w>"), ("c", "at</w>"), ("d", "og</w>"), ("t", "h"), ("th", "e</w>")]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tiny_pipeline(seed: int = 0):
    """Build the tiny SD-shaped pipeline in memory (random weights, fixed seed)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        # attention only at the 16x16 level, 2 heads of 32: 7x faster training steps on a CPU than at 32x32
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=2,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=TINY_RESOLUTION,
    )
    vocab, merges = byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], projection_dim=32,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def tiny_model_dir() -> Path:
    """Return a diffusers directory holding the tiny pipeline, building it once (atomically) if needed."""
    target = cache_root() / f"tiny-sd-{TINY_VERSION}"
    if (target / "model_index.json").exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    except OSError as e:  # a read-only HOME with no cache yet
        from lowmem_alignprop.settings.errors import UserError
        raise UserError(f"the built-in tiny model is built once into {target.parent}, which cannot be written "
                        f"({e.strerror or type(e).__name__}): set LOWMEM_ALIGNPROP_CACHE (or XDG_CACHE_HOME) to a "
                        "folder you can write to") from None
    try:
        build_tiny_pipeline().save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: a half-written model is never seen under the final name
        except OSError:
            pass  # another process won the race; its copy is identical
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

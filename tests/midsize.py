"""A mid-size SD-shaped model for memory tests: big enough that activations dominate, small enough for a CPU.

``build_midsize_dir(path)`` writes a diffusers directory (``save_pretrained``) that loads through the real
loader (``--model PATH`` / ``load_components``), like a downloaded Stable Diffusion model:

* UNet: channels (64, 128, 256), cross-attention in the two upper levels (SD1.5's layout, scaled down);
* VAE: channels (32, 64, 128, 128), four levels, so it downsamples by 8 like SD's (128 px -> 16x16 latents);
* CLIP text encoder: 2 layers, width 64; the byte-level tokenizer of the tiny model.

``build_clip_reward_dir(path)`` writes a small CLIP (ViT, 224 px, 4 layers, width 128) that
``build_reward("clip", weights=path)`` loads like openai/clip-vit-large-patch14: its activations are
large enough that reward checkpointing shows.

Both are deterministic (fixed seed) and cached per path: a second call returns at once.
"""

from __future__ import annotations

from pathlib import Path

import torch

MIDSIZE_RESOLUTION = 128  # pixels; latents are 16x16 (the VAE downsamples by 8)
CROSS_DIM = 64


def build_midsize_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lowmem_alignprop.models.tiny import byte_level_vocab

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=MIDSIZE_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(64, 128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 128, 128), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, sample_size=MIDSIZE_RESOLUTION,
    )
    vocab, merges = byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CROSS_DIM, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], projection_dim=CROSS_DIM,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_midsize_dir(path) -> Path:
    """Write the mid-size pipeline to ``path`` (a diffusers directory) unless it is already there."""
    path = Path(path)
    if not (path / "model_index.json").exists():
        build_midsize_pipeline().save_pretrained(path)
    return path


def build_clip_reward_dir(path, *, width: int = 128, layers: int = 4, image_size: int = 224, seed: int = 0) -> Path:
    """Write a small CLIP model + tokenizer to ``path`` for ``build_reward('clip', weights=path)``."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from lowmem_alignprop.models.tiny import byte_level_vocab

    path = Path(path)
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    vocab, merges = byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=32)
    common = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=4,
                  hidden_act="gelu", projection_dim=64)
    config = CLIPConfig(
        text_config=dict(common, vocab_size=len(vocab), max_position_embeddings=32,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(common, image_size=image_size, patch_size=16),
        projection_dim=64,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_sdxl_pipeline():
    """A tiny SDXL-shaped pipeline (two text encoders of different widths, text_time conditioning), fp32."""
    from diffusers import (EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lowmem_alignprop.models.tiny import build_tiny_pipeline

    base = build_tiny_pipeline()
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=32, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 48,
        cross_attention_dim=32 + 48,
    )
    vocab = len(base.tokenizer)
    kw = dict(vocab_size=vocab, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=16, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    # the widths must differ: diffusers tells SDXL's two text encoders apart by their hidden size only
    te1 = CLIPTextModel(CLIPTextConfig(**kw, hidden_size=32, hidden_act="quick_gelu", projection_dim=32))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**kw, hidden_size=48, hidden_act="gelu", projection_dim=48))
    return StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=base.tokenizer, tokenizer_2=base.tokenizer,
        unet=unet, scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                                    beta_schedule="scaled_linear", timestep_spacing="leading"),
        add_watermarker=False,
    ).to(torch.float32)

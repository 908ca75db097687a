"""Tiny SD3-shaped and FLUX-shaped pipelines for the flow-matching tests, built in code (random weights, offline).

Both are built from the diffusers classes the real models use (SD3Transformer2DModel / FluxTransformer2DModel,
AutoencoderKL with 16 latent channels and a scaling and shift factor, FlowMatchEulerDiscreteScheduler) with
CLIP text encoders on the byte-level CLIP tokenizer of :mod:`lowmem_alignprop.models.tiny` and a small T5 encoder on a
T5 tokenizer made from a word-level unigram vocabulary (no sentencepiece file, no hub). ``build_*_dir(path)``
saves the pipeline with ``save_pretrained`` so the tests load it by path, as a downloaded model would be.

* SD3: CLIP-L (width 16) + CLIP-G (width 16) + T5 (width 32), joint width 32, patch 2, scheduler ``shift=3.0``
  (SD3.5's published schedule); ``with_t5=False`` leaves the third encoder out (the pipeline's zeros instead).
* FLUX: CLIP-L pooled (width 32) + T5 (width 32), one double and one single block, 2x2 packed latents,
  ``guidance_embeds=True`` (dev) with FLUX.1-dev's resolution-dependent shift, or ``schnell=True``:
  no guidance embedding and a fixed ``shift=1.0``, as FLUX.1-schnell is published. ``single_layers=0`` leaves the
  single-stream blocks out (diffusers' kohya FLUX reader splits their fused linear1 at FLUX.1's own widths only).

Images are 32 px: the VAE downsamples by 2, so latents are 16 channels x 16 x 16 (64 tokens in both models).
"""

from __future__ import annotations

from pathlib import Path

import torch

FLOW_RESOLUTION = 32
LATENT_CHANNELS = 16
_WORDS = ["a", "cat", "dog", "photo", "of", "the", "red", "blue", "bright", "dark", "sky", "tree", "on", "in"]


def tiny_t5_tokenizer(max_length: int = 16):
    """A T5 tokenizer (unigram over a few words and the letters), built without a sentencepiece file."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in _WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)


def tiny_t5_encoder(vocab_size: int, width: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=64, num_layers=1,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                   eos_token_id=1, decoder_start_token_id=0))


def _clip_tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer

    from lowmem_alignprop.models.tiny import byte_level_vocab

    vocab, merges = byte_level_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length), vocab


def _clip_encoder(cls, vocab, width: int, projection_dim: int, max_length: int = 16):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], projection_dim=projection_dim,
        hidden_act="gelu"))


def _vae(scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    # the real SD3/FLUX VAEs have no quant convs; their latents are 16 channels, scaled and shifted
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=FLOW_RESOLUTION, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=scaling_factor, shift_factor=shift_factor)


def build_tiny_sd3_pipeline(seed: int = 0, *, with_t5: bool = True, layers: int = 2):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=FLOW_RESOLUTION // 2, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=layers, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16)
    vae = _vae(scaling_factor=1.5305, shift_factor=0.0609)  # SD3.5's published factors
    tok, vocab = _clip_tokenizer()
    te1 = _clip_encoder(CLIPTextModelWithProjection, vocab, width=16, projection_dim=16)
    te2 = _clip_encoder(CLIPTextModelWithProjection, vocab, width=16, projection_dim=16)
    tok3 = tiny_t5_tokenizer() if with_t5 else None
    te3 = tiny_t5_encoder(len(tok3)) if with_t5 else None
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=te1,
                                    tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok, text_encoder_3=te3,
                                    tokenizer_3=tok3)


def build_tiny_flux_pipeline(seed: int = 0, *, schnell: bool = False, single_layers: int = 1):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=single_layers,
        attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=not schnell,
        axes_dims_rope=(4, 6, 6))
    vae = _vae(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's published factors
    tok, vocab = _clip_tokenizer()
    te1 = _clip_encoder(CLIPTextModel, vocab, width=32, projection_dim=32)
    tok2 = tiny_t5_tokenizer()
    te2 = tiny_t5_encoder(len(tok2))
    if schnell:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=te1, tokenizer=tok, text_encoder_2=te2,
                        tokenizer_2=tok2, transformer=transformer)


def _save(pipe, path) -> Path:
    path = Path(path)
    if not (path / "model_index.json").exists():
        pipe.save_pretrained(path)
    return path


def build_tiny_sd3_dir(path, *, with_t5: bool = True) -> Path:
    return _save(build_tiny_sd3_pipeline(with_t5=with_t5), path)


def build_tiny_flux_dir(path, *, schnell: bool = False, single_layers: int = 1) -> Path:
    return _save(build_tiny_flux_pipeline(schnell=schnell, single_layers=single_layers), path)


def build_host_flux_dir(path, *, width: int = 1024, double: int = 4, single: int = 8, t5_layers: int = 16) -> Path:
    """A FLUX-shaped pipeline whose T5 encoder and transformer are both about 1 GB in fp32 (benchmarks/rss_bench.py
    ``--flux-host``): host memory's shape of FLUX.1 on an 8 GB card, T5-XXL's 9.5 GB beside block swap's 8.9 GiB of
    pinned blocks, at a size a CPU trains in a minute. The rest as the tiny pipeline's (32 px, 16-channel VAE).
    Saved in fp16, so a CPU run (fp32) holds converted copies (process memory), not the files' mapped pages."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    path = Path(path)
    if (path / "model_index.json").exists():
        return path
    torch.manual_seed(0)
    heads = width // 128
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=double, num_single_layers=single,
        attention_head_dim=128, num_attention_heads=heads, joint_attention_dim=width, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    tok, vocab = _clip_tokenizer()
    tok2 = tiny_t5_tokenizer()
    te2 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=width, d_kv=64, d_ff=4 * width, num_layers=t5_layers,
                                  num_heads=width // 64, feed_forward_proj="gated-gelu", pad_token_id=0,
                                  eos_token_id=1, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=_vae(scaling_factor=0.3611, shift_factor=0.1159),
                        text_encoder=_clip_encoder(CLIPTextModel, vocab, width=32, projection_dim=32), tokenizer=tok,
                        text_encoder_2=te2, tokenizer_2=tok2, transformer=transformer)
    return _save(pipe.to(torch.float16), path)

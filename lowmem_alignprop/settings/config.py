"""The run configuration: one typed dataclass, every field with help, validated before any model loads.

Layering (later wins): dataclass defaults < hardware profile YAML < explicit CLI flags < ``--set key=value``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

from lowmem_alignprop.settings.errors import UserError, did_you_mean, nearest, quote
from lowmem_alignprop.settings.image_size import (EXAMPLE, nearest_multiples, parse_sizes, resolution_of,
                                                  sizes_of, step_size)
from lowmem_alignprop.settings.model_kind import FLOW_KINDS, SD3_KINDS, SINGLE_FILE_SUFFIXES, model_kind_of
from lowmem_alignprop.settings.paths import describe as describe_path
from lowmem_alignprop.settings.paths import kind_of, looks_like_hub_id, scheduler_prediction, vae_subfolder

MIN_SEED, MAX_SEED = 0, 2**32 - 1  # (torch's generators take 64 bits; the trainer derives seeds from this one)
# sample's --seed: a torch generator's (one per image), so the seeds a run records for its images (its seed + 12345
# + n, + 54321 + n) are taken too
MAX_SAMPLE_SEED = 2**63 - 1

MODEL_ENV = "LOWMEM_ALIGNPROP_MODEL"  # the model when none is named (default toy)

# max_minutes: what a run's end writes besides its last checkpoint (the LoRA, reports, summary, exports) and its exit,
# measured nowhere before it happens: a stated margin the time limit keeps (run/time_limit.py)
TIME_LIMIT_MARGIN_S = 60.0


EXPORT_FORMATS = ("diffusers", "kohya", "peft")  # what `export --format` writes (lora/lora_export.py)


def _f(default: Any, help: str, choices: tuple | None = None):
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_ACT_ON_EVALUATION = {  # the settings that act on the held-out evaluation (eval_every): what each does with it
    "eval_on_start": "evaluates the held-out prompts before the first step",
    "best_by": "chooses best/ by the held-out evaluation",
    "early_stop": "stops when evaluation stops improving",
}


@dataclass
class Config:
    # ---- what to train -------------------------------------------------------------------------
    model: str = field(default_factory=lambda: os.environ.get(MODEL_ENV, "toy").strip(), metadata={"help": (
        "Base model: 'toy' (the toy world's pretrained model, shipped; docs/toy_world.md), 'tiny' (random weights, "
        "built in code: tests and planning), sd15|sd21|sdxl|sd35m|sd35l|flux (architecture only, random weights, for "
        "planning), a hub id, a diffusers directory (SD 1.x/2.x/SDXL, SD3/SD3.5, FLUX.1), or a single-file "
        ".safetensors/.ckpt (an SD3/FLUX transformer file needs model_components). Default: toy, or "
        "$LOWMEM_ALIGNPROP_MODEL (the test suite sets tiny).")})
    model_components: str = _f("", "SD3/SD3.5/FLUX.1 single-file transformer checkpoints: the model's diffusers folder "
                               "(or hub id) that supplies the text encoders, tokenizers, VAE and scheduler.")
    revision: str = _f("", "A hub id --model's snapshot: a branch, tag or commit sha (empty: the hub's main, or "
                       "offline the local cache's main). The commit a hub id resolved to is recorded in "
                       "base_model.json (revision) either way; --set revision=<sha> loads that one again.")
    components_revision: str = _f("", "A hub id model_components' snapshot: a branch, tag or commit sha (empty: the "
                                  "hub's main; --set revision pins --model only). The commit is recorded in "
                                  "base_model.json (components_revision); sample and export --merge of the LoRA "
                                  "load it again.")
    t5_encoder: bool = _f(True, "SD3/SD3.5: load the T5-XXL text encoder (false: leave it out, as the model allows; "
                          "zeros take its tokens' place). FLUX always needs its T5.")
    encode_on_cpu: bool = _f(False, "SD3/FLUX: run the text encoders (T5-XXL is 9.5 GB in bf16) on the CPU for the one "
                             "pass that encodes the prompt set; they never reach the GPU (slower start-up).")
    max_sequence_length: int = _f(0, "SD3/FLUX: T5 tokens per prompt (0 = the model's default: 256 for SD3.5 and "
                                  "FLUX.1-schnell, 512 for FLUX.1-dev).")
    model_arch: str = _f("auto", "Architecture of a single-file checkpoint (its config ships with the package).",
                         ("auto", "sd15", "sd21", "sdxl"))
    prediction_type: str = _f("auto", "What the UNet predicts (SD 1.x/2.x/SDXL): auto = as the model's scheduler "
                              "config says (a single file: SD 2.x loads as v-prediction, SD 1.x and SDXL as epsilon). "
                              "epsilon for an SD 2.x 512-px base single file or its fine-tunes; v_prediction for a "
                              "v-prediction fine-tune (e.g. an SDXL one) whose files say epsilon. Sampling and "
                              "training both use it.", ("auto", "epsilon", "v_prediction"))
    zero_terminal_snr: bool = _f(False, "Rescale the UNet's noise schedule to zero terminal SNR and sample from its "
                                 "last timestep (diffusers' rescale_betas_zero_snr, trailing timesteps), for a "
                                 "v-prediction model trained so whose files do not say it. false = as the model says "
                                 "(its scheduler config, or a single file's ztsnr key).")
    vae: str = _f("", "VAE to decode with instead of the model's own: a diffusers folder, a .safetensors file or a hub "
                  "id. madebyollin/sdxl-vae-fp16-fix keeps SDXL's decode in fp16 (SDXL's stock VAE overflows in fp16, so "
                  "it runs in bf16, or in fp32 on GPUs without bf16). Empty = the model's own.")
    vae_revision: str = _f("", "A hub id vae's snapshot: a branch, tag or commit sha (empty: the hub's main). The "
                           "commit is recorded in base_model.json (vae_revision); sample and export --merge of the "
                           "LoRA load it again.")
    reward: str = _f("brightness", "Reward: a built-in name, 'name:weight,name:weight' to combine, or your own "
                     "differentiable reward: 'package.module:fn' (importable, or in the working directory) or "
                     "'path/to/file.py:fn', fn(images) or fn(images, prompts) -> one score per "
                     "image (images [B, 3, H, W] in [0, 1]; any callable: a function, functools.partial, an object; "
                     "prompts passed when it takes a second argument), or a RewardModule class (constructed), or "
                     "'package.module:factory()' (parentheses: called to build the reward, with those of device, "
                     "dtype, checkpointing, weights it names).")
    reward_weights: str = _f("", "Where the reward model's weights are (hub id, directory or file); empty = its default. "
                                 "With several model rewards, one per reward: 'aesthetic=PATH;clip=PATH' (aesthetic: "
                                 "a folder with the head and clip/, or 'HEAD_FILE,CLIP_DIR').")
    prompts: str = _f("simple_animals", "Prompt set: a built-in name, a UTF-8 text file with one prompt per line, a "
                      "table (.csv, .tsv, .json, .jsonl; .parquet with pyarrow) or a hub dataset's file "
                      "(hf://datasets/OWNER/NAME[@REV][/FILE]).")
    prompt_column: str = _f("", "The column of the prompts in a table --prompts names; empty = its one column named "
                            "prompt, prompts, caption or text (any case).")
    prompt_filter: str = _f("", "COLUMN=VALUE: train on the rows of a table --prompts names whose COLUMN holds VALUE "
                            "(e.g. Category=Animals); empty = every row.")
    prompt_order: str = _f("random", "How each rollout's prompt is drawn from the set: random (with replacement) or "
                           "shuffled (every prompt once per pass through the set, each pass in a fresh seeded order: "
                           "a batch as large as the set holds each prompt once).", ("random", "shuffled"))
    output_dir: str = _f("outputs/run", "Where the LoRA, metrics, samples, reports and config.yaml are written.")
    seed: int = _f(0, "Random seed for prompts, noise and LoRA init.")
    steps: int = _f(20, "Number of optimizer steps to train.")
    max_minutes: float = _f(0.0, "Time limit for the run in minutes, counted from the command's start (loading the "
                            "model included): before each step the run stops when that step (the slowest one timed "
                            "so far after the start's first, whose warm-up no later step repeats) and its end's work "
                            "(checkpoint, LoRA, after samples, exports) would pass it, and ends with its outputs "
                            "written; --resume latest trains the rest under a new clock (--max-minutes). 0 = no "
                            "limit.")

    # ---- sampler -------------------------------------------------------------------------------
    sample_steps: int = _f(50, "Denoising steps per rollout (T): DDIM steps for UNet models, Euler steps for SD3/FLUX.")
    guidance_scale: float = _f(7.5, "Classifier-free guidance scale (1.0 disables the unconditional branch).")
    guidance_rescale: float = _f(0.0, "SD 1.x/2.x/SDXL: rescale the guided prediction toward the conditional one's "
                                 "standard deviation, mixed in by this factor (0 = off, 1 = fully rescaled): "
                                 "diffusers' guidance_rescale, from Lin et al. 2023, who use 0.7 with "
                                 "zero_terminal_snr to stop high guidance from overexposing. Sampling and training "
                                 "both use it.")
    eta: float = _f(1.0, "DDIM eta: 0 is deterministic, 1 is as stochastic as DDPM. 1.0 as AlignProp's v2 code "
                        "and TRL's AlignPropTrainer sample (the paper's v1 code stepped with eta 0): each step "
                        "then draws fresh noise, so rollouts of one prompt differ.")
    resolution: int | str | list = _f(512, "Image size in pixels: one side N for N x N images, or width x height "
                                             "(1216x832, 832x1216: as A1111 and kohya write it). Each side a multiple "
                                             "of 8 (SD3/SD3.5 and FLUX.1: of 16, the pixels a transformer token "
                                             "covers; SD3.5 Large: at most 3072). Several sizes, comma-separated "
                                             "(1024,1216x832,832x1216; at most 16): each step trains at the next in "
                                             "turn; the sample grids, evaluation and best/ render at the first.")
    negative_prompt: str = _f("", "Negative prompt: the unconditional branch of classifier-free guidance in training, "
                              "the sample images, `sample` and `plan`. Empty: the empty prompt, and on SDXL zero "
                              "embeddings, as its pipeline does (force_zeros_for_empty_prompt in model_index.json).")

    # ---- truncated backprop (docs/design.md section 2) -------------------------------------------
    truncation: str = _f("fixed", "How K is chosen: fixed K; uniform: K ~ U{k_min..k_max} once per rollout, the "
                         "gradient through the contiguous last K steps; per_step: each step draws its own K ~ "
                         "U{k_min..k_max} and predicts with gradient when it is among the last K steps (the official "
                         "AlignProp code's and TRL's rule: scattered gradient steps; k_min may be 0).",
                         ("fixed", "uniform", "per_step"))
    k: int = _f(1, "Fixed K: gradients flow through the last K denoising steps.")
    k_min: int = _f(1, "Smallest K when truncation=uniform or per_step (per_step: 0 allowed).")
    k_max: int = _f(50, "Largest K when truncation=uniform or per_step (at most sample_steps).")

    # ---- optimisation ----------------------------------------------------------------------------
    batch_size: int = _f(1, "Images per micro-step (per process).")
    grad_accum: int = _f(1, "Micro-steps accumulated per optimizer step (batch_size x grad_accum images). Each "
                             "micro-step draws its own noise (and with a random K its own prompts), so another split "
                             "of the same images per step samples others: the same expectation, not the same images.")
    lr: float = _f(1e-3, "Learning rate (AlignProp uses 1e-3 for LoRA).")
    lr_scheduler: str = _f("constant", "How the learning rate goes over the run's steps after its warmup: constant "
                           "(AlignProp's), linear or cosine (toward 0, reached one step after the last), as "
                           "diffusers' get_scheduler makes them.", ("constant", "linear", "cosine"))
    lr_warmup_steps: int = _f(0, "Steps over which the learning rate rises linearly from 0 to lr before the schedule "
                              "(the first step at 0, as diffusers' schedules start; 0 = none).")
    weight_decay: float = _f(1e-4, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables clipping).")
    loss_scale: float = _f(1.0, "loss = -loss_scale * mean(reward) (or loss_scale * mean(|reward - target|)).")
    reward_target: float | None = _f(None, "If set, minimise the distance to this reward value instead "
                                     "(e.g. 10 for the aesthetic score, as in AlignProp).")
    reward_cap: float | None = _f(None, "If set, the loss sees min(reward, reward_cap): an image already scoring "
                                  "reward_cap or more gives no gradient, so the step goes to the images below it and "
                                  "no image is pushed past the cap (a one-sided control against over-optimisation; "
                                  "reward_target is two-sided). Logged rewards stay uncapped.")
    train_unet: str = _f("lora", "Train LoRA adapters (default) or the full UNet.", ("lora", "full"))
    lora_rank: int = _f(4, "LoRA rank of every adapted layer (lora_layers).")
    lora_layers: str = _f("attention", "Which layers get LoRA adapters: attention (the attention projections q, k, v "
                          "and out, as AlignProp trains) or attention+ff (also the transformer blocks' feed-forward "
                          "layers, FLUX's single-block MLP and output included: 2-2.5x the adapter's parameters and "
                          "optimizer state; the kohya/ComfyUI exports name them too).", ("attention", "attention+ff"))
    lora_alpha: float | None = _f(None, "LoRA alpha (default: equal to the rank).")
    init_lora: str = _f("", "Start from an existing LoRA instead of a fresh one (--init-lora): a run's lora/ folder, a "
                        "checkpoint (checkpoints/step-N), a diffusers or kohya .safetensors file, a peft adapter "
                        "folder, or a Hugging Face hub id (owner/name: its pytorch_lora_weights.safetensors or only "
                        ".safetensors; owner/name/file.safetensors; the hub's main, or a branch, tag or commit as "
                        "owner/name@REV[/file.safetensors]; its commit recorded in init_lora/source.json), of this "
                        "model, the layers the run trains from it of rank lora_rank. Its layers "
                        "the run does not train (SD 1.x/2.x/SDXL: text encoders, convolutions, other linears; "
                        "SD3/FLUX: CLIP text encoders, other transformer linears) are kept as they came, fused into "
                        "the frozen base and written into every LoRA the run writes. Step 0 then renders what that "
                        "LoRA renders. Empty: a fresh LoRA.")
    optimizer: str = _f("adamw", "adamw (fp32 state, 8 bytes/param), adamw8bit (bitsandbytes, 2 bytes/param), "
                        "paged_adamw8bit (8-bit, state pages to CPU under pressure).",
                        ("adamw", "adamw8bit", "paged_adamw8bit"))

    # ---- aligning without over-optimising (docs/design.md section 10) ---------------------------------
    recipe: str = _f("", "The named recipe applied (--recipe NAME: the paper's settings, lowmem_alignprop/recipes/; "
                     "order profile < recipe < flags < --set). Its values are already in the other fields.")
    kl_coeff: float = _f(0.0, "Weight of a penalty on the distance between the LoRA model's and the frozen base "
                         "model's noise predictions along the grad window (DRaFT+): loss += kl_coeff * sum over the "
                         "window's steps of mean((eps_lora - eps_base)^2). The base is the same UNet with its adapter "
                         "switched off, one more checkpointed UNet call per window step: it costs time, not memory. "
                         "0 = off.")
    lv_draws: int = _f(1, "DRaFT-LV (Clark et al. 2023): the last step is taken this many times, the first from the "
                       "sampled trajectory and the others from its image re-noised to the last step's noise level, "
                       "and the reward is averaged over all (lower-variance gradients). Decode and reward then "
                       "work on lv_draws x batch_size images. 1 = plain AlignProp.")
    ema_decay: float = _f(0.0, "Keep an exponential moving average of the trained weights with this decay (e.g. "
                          "0.99; diffusers' EMAModel), held in checkpoints. 0 = off.")
    ema_outputs: bool = _f(True, "With ema_decay: the sample grids (after, and --sample-every's), evaluation, best/ "
                           "and the exported lora/ use the EMA weights (false: the trained weights; the EMA is "
                           "still kept in checkpoints, whose trainable weights are the trained ones).")
    eval_every: int = _f(0, "Score the held-out prompts with fixed seeds every N optimizer steps (eval_reward in "
                         "metrics.jsonl and the trackers) and keep the LoRA of the best evaluated step in best/. "
                         "0 = off.")
    eval_prompts: str = _f("", "Held-out prompts: a built-in set, a UTF-8 file, a table or a hub dataset's file, as "
                           "--prompts takes them; empty = eval_holdout prompts of the training set, set aside with the "
                           "seed and never trained on.")
    eval_prompt_column: str = _f("", "The column of the prompts in a table eval_prompts names (as prompt_column for "
                                 "--prompts; empty = its one column named prompt, prompts, caption or text).")
    eval_prompt_filter: str = _f("", "COLUMN=VALUE: hold out the rows of a table eval_prompts names whose COLUMN "
                                 "holds VALUE (as prompt_filter for --prompts); empty = every row.")
    eval_holdout: int = _f(4, "With eval_every and no eval_prompts: how many training prompts are held out.")
    early_stop: int = _f(0, "End the run when evaluation has not improved for this many evaluations in a row "
                         "(needs eval_every; 0 = never).")
    eval_on_start: bool = _f(False, "With eval_every: evaluate the held-out prompts once before the first step too "
                             "(metrics.jsonl's line of step 0, with the judged images' figures in the toy world: "
                             "the untrained LoRA's baseline, which best/ and early_stop count).")
    best_by: str = _f("reward", "What best/ and early_stop go by: reward (eval_objective: the held-out reward, or its "
                      "distance to reward_target, or capped at reward_cap) or fidelity (the toy world: the exact "
                      "evaluators' score of the held-out images, eval_fidelity_score; the reward may rise while it "
                      "falls). Needs eval_every.", ("reward", "fidelity"))

    # ---- memory features (set by the hardware profile) ---------------------------------------------
    budget_gb: float = _f(0.0, "The card's memory budget in GiB that this configuration must fit (0 = no check).")
    mixed_precision: str = _f("no", "Precision of the frozen modules (UNet, VAE, text encoder, reward); LoRA and "
                              "optimizer stay fp32. fp16/bf16 halve the frozen weights.", ("no", "fp16", "bf16"))
    attention: str = _f("sdpa", "Attention kernel: sdpa (PyTorch fused, default: no score matrix kept), xformers "
                        "(CUDA only), sliced (one head slice at a time: below unfused attention but above sdpa, "
                        "slowest; for old GPUs without fused kernels).", ("sdpa", "xformers", "sliced"))
    unet_checkpointing: str = _f("call", "Gradient checkpointing of the UNet in the grad window: one checkpoint per "
                                 "UNet call (always), or also per UNet block (less memory in backward, ~30% slower).",
                                 ("call", "blocks"))
    window_keep: int = _f(0, "Grad-window calls nearest the image (the last min(K, N)) that run without their per-call "
                          "checkpoint: their activations stay for backward, which then recomputes K - N calls instead "
                          "of K (faster; memory grows by one UNet call's activations per kept call, not with K "
                          "beyond N). Per-block checkpoints (unet_checkpointing=blocks) stay in a kept call. "
                          "0 = every call one checkpoint.")
    vae_checkpointing: str = _f("none", "VAE decoder checkpointing: none, per up-block, or per resnet (least memory).",
                                ("none", "blocks", "resnets"))
    reward_checkpointing: bool = _f(False, "Checkpoint the reward model's layers (saves its activations in backward).")
    sliced_decode: bool = _f(False, "Decode one image at a time instead of the whole batch: lowers the decode and "
                             "backward peaks when the VAE is checkpointed (batch_size > 1; without VAE checkpointing "
                             "every image's decoder activations are kept for backward either way).")
    tiled_decode: bool = _f(False, "Decode latents in overlapping tiles with blended seams (for large images). "
                            "Approximate, unlike the other memory features: the VAE's GroupNorm and mid-block "
                            "attention see one tile, not the image, so images and LoRA gradients differ a little "
                            "everywhere and most at the seams (docs/design.md section 3).")
    tile_size: int = _f(64, "Latent tile side for tiled_decode.")
    tile_overlap: int = _f(16, "Latent tile overlap for tiled_decode.")
    cache_prompt_embeddings: bool = _f(False, "Encode every prompt once at start-up; the text encoder then leaves the GPU.")
    offload_frozen: bool = _f(False, "Keep frozen modules on the CPU while not in use (VAE and reward model during "
                              "sampling, text encoder after encoding). Saves their weights' memory, costs transfers.")
    activation_offload: bool = _f(False, "Move tensors saved for backward to CPU (saved-tensor hooks). Needs "
                                  "checkpointing; costs PCIe transfers.")
    expandable_segments: bool = _f(True, "CUDA only: the caching allocator grows its memory segments in place, so "
                                   "memory freed between stages is reused instead of staying reserved (SDXL "
                                   "1024 px on rtx3060-sdxl: 5.77 -> 4.43 GiB reserved, measured). Linux only "
                                   "(PyTorch has none on Windows). A PYTORCH_CUDA_ALLOC_CONF you set yourself "
                                   "takes precedence.")
    cpu_malloc_threshold_kib: int = _f(1024, "CPU runs, Linux/glibc: tensors above this many KiB get their own "
                                       "memory mapping, returned to the system when freed (resident memory "
                                       "follows the tensors); smaller ones reuse the heap. Lower follows the "
                                       "tensors closer, higher is faster (fewer page faults). Mid-size model, CPU "
                                       "s/step and peak RSS: 128 -> 1.93 s, 813 MiB; 1024 -> 1.39-1.54 s, 865 MiB "
                                       "(TRL's AlignPropTrainer: 1.56-1.61 s, 845-854 MiB; benchmarks/REPORT.md "
                                       "section 6). 0 = glibc's own moving thresholds (freed activations stay in "
                                       "the heap). Your MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ win.")
    block_swap: int = _f(0, "Keep N of the frozen transformer (or UNet) blocks in pinned CPU memory and copy each "
                         "to the GPU just before it runs (forward, checkpoint recompute, backward), on a side stream "
                         "that overlaps compute; LoRA weights stay on the GPU. Saves N blocks' weights, costs PCIe "
                         "time per step (docs/design.md).")
    base_quant: str = _f("none", "Store the frozen denoiser's (UNet's or SD3/FLUX transformer's) Linear layers in "
                         "fewer bits under fp32 LoRA: int8 or nf4 with bitsandbytes (QLoRA style, CUDA), or fp8 "
                         "(experimental: float8_e4m3fn storage upcast one layer at a time as it runs, diffusers' "
                         "layerwise casting; no bitsandbytes, any device; not yet measured against int8 on a GPU).",
                         ("none", "int8", "nf4", "fp8"))
    deepspeed_zero: int = _f(0, "DeepSpeed ZeRO stage through accelerate (0 = off).", (0, 2, 3))
    offload: str = _f("none", "DeepSpeed offload: none, optimizer state to CPU (ZeRO-2/3), or params too (ZeRO-3).",
                      ("none", "optimizer", "params"))

    # ---- speed (README "Speed"; their measured effect on a GPU is pending) ---------------------------
    card: str = _f("", "The card plan times the step for (its figures in measure/devices.py): empty = the profile's "
                   "card (rtx3060-8gb for the 8 GB rtx3060 profiles, rtx3060 for the 12 GB ones, rtx4090, a100-40gb, "
                   "a100-80gb, laptop for laptop-6gb); cpu: this machine's CPU, which plan then targets (the cpu "
                   "profile's, and a copy of it).",
                   ("", "rtx3060", "rtx3060-8gb", "rtx4090", "a100-40gb", "a100-80gb", "h100", "h200", "laptop",
                    "cpu"))
    compile: str = _f("none", "torch.compile the UNet: nograd (a compiled copy runs the no-grad sampling steps; "
                      "the grad window stays eager), regional (its repeated transformer blocks compiled in place, "
                      "for every call: small compile time), or none. The first steps pay the compile time.",
                      ("none", "nograd", "regional"))
    channels_last: bool = _f(False, "UNet and VAE weights in channels-last memory format (faster convolutions on "
                             "tensor-core GPUs; same results up to rounding).")
    tf32: bool = _f(False, "CUDA only: fp32 matmuls and convolutions on TF32 tensor cores (Ampere or newer). Pays "
                    "with mixed_precision=no; fp16/bf16 runs barely have fp32 matmuls.")
    fused_adamw: bool = _f(False, "AdamW as one fused kernel (torch.optim.AdamW(fused=True)): fewer launches per "
                           "optimizer step; the same update up to rounding.")
    merge_lora_nograd: bool = _f(False, "The model calls without gradients (the sampling steps before the gradient "
                                 "window, the sample and evaluation images) run with the LoRA merged into copies of "
                                 "its layers' weights instead of through peft's LoRA layers: as many ops as the base "
                                 "model (peft launches 4 more per adapted layer and call, up to 9 under autocast: "
                                 "up to ~1,200 fewer per SD1.5 UNet call), faster where the host paces the step "
                                 "(batch 1 on a fast card); the copies live while those calls run (SD1.5's attention "
                                 "layers: 178 MiB in fp16; FLUX's: ~4.7 GiB in bf16, ~16 GiB with attention+ff). Same "
                                 "images up to rounding. plan counts it; plan --fastest chooses it when it fits. Needs "
                                 "train_unet=lora, base_quant=none, block_swap=0, compile=none, deepspeed_zero=0.")

    # ---- logging and outputs ---------------------------------------------------------------------
    report_to: str = _f("none", "accelerate tracker for metrics and sample images.", ("none", "tensorboard", "wandb"))
    sample_prompts: int = _f(4, "Fixed-seed prompts in the before/after sample grid (0 disables the grid).")
    sample_every: int = _f(0, "Render the sample grid's fixed-seed prompts (same seeds) every N steps (--sample-every): "
                           "samples/step-NNNNNN.png (before vs step N), their rewards in that step's metrics.jsonl line, "
                           "the grid to the --report-to tracker. 0 = only before and after training.")
    export_format: str = _f("", "Export the LoRA at the end of the run, as `lowmem-alignprop export --format F` does, "
                            "into export/F/ (model card included): a comma-separated list of "
                            f"{', '.join(EXPORT_FORMATS)}, e.g. kohya,peft. Empty: only lora/.")
    push_to_hub: str = _f("", "Upload the LoRA's export (the first of export_format, else diffusers) with its model card "
                          "to this Hugging Face hub repository (owner/name) at the end (--push-to-hub). Checked "
                          "before training starts: offline or without a token the run does not start.")
    fidelity_images: int = _f(32, "Toy world only (--model toy, or prompts in its grammar): fixed-seed images of the "
                              "run's own prompts (round again) that the exact evaluators judge before and after "
                              "training (fidelity_* rates and jpeg_bytes in summary.json; docs/toy_world.md; the "
                              "held-out prompts are eval_prompts'). 0 turns it off.")
    fidelity_every: int = _f(0, "Toy world only: every N optimizer steps judge those images too and add fidelity_* and "
                             "jpeg_bytes to that step's line of metrics.jsonl (0 = before and after training only).")
    checkpoint_every: int = _f(0, "Save a resumable checkpoint every N optimizer steps (0 = only at the end/on Ctrl-C).")
    keep_checkpoints: int = _f(2, "Keep the newest N intact checkpoints (older ones are deleted; 0 keeps all).")

    # ---- faults ------------------------------------------------------------------------------------
    auto_fit: bool = _f(False, "On a CUDA card, before the first step: train plan --fastest's choice of memory features "
                        "for that card and budget (printed as --set flags, recorded in config.yaml). On out-of-memory, "
                        "step down automatically (smaller micro-batch with more accumulation, more checkpointing, "
                        "offload) and repeat the step, instead of stopping with advice.")
    max_bad_steps: int = _f(3, "Steps in a row with a NaN/inf reward or loss (each skipped) before the run stops "
                            "with a checkpoint.")
    max_zero_grad_steps: int = _f(5, "Steps in a row whose LoRA gradient is exactly zero (the reward's gradient "
                                  "does not reach the weights) before the run stops with a checkpoint (0 = never).")
    log_every: int = _f(1, "Print a per-step summary line every N steps (0: none; metrics.jsonl has every step).")

    # ------------------------------------------------------------------------------------------------
    def check_installed(self) -> "Config":
        """The packages this configuration runs with are installed (train and sample; a plan needs none of them)."""
        for name, off, module in NEEDS_PACKAGE:
            value, offs = getattr(self, name), off if isinstance(off, tuple) else (off,)
            if value not in offs and not _has(module):
                raise missing_package(f"{name}={value}", module, f"{name}={offs[0]}")
        if self.compile != "none" and (lacking := _compiler_missing()):  # (else torch fails at the first step)
            raise UserError(f"compile={self.compile} needs {lacking}, which this machine lacks: install it, or use "
                            "--set compile=none")
        return self

    def __post_init__(self) -> None:
        if isinstance(self.resolution, (str, list, tuple)):  # Config(resolution="512x512"), as --set and a profile
            try:  # give it: 512; "1024,1216x832" or a list: each size's value
                self.resolution = parse_sizes(self.resolution)
            except UserError:
                pass  # (validate says what is wrong with it)

    @property
    def width(self) -> int:
        """The images' width in pixels (``resolution``: N, or W of "WxH"; several sizes: the first's)."""
        return self.sizes[0][0]

    @property
    def height(self) -> int:
        """The images' height in pixels (``resolution``: N, or H of "WxH"; several sizes: the first's)."""
        return self.sizes[0][1]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """(width, height) of each size the run trains at, in turn (settings/image_size.py): one for most runs."""
        return sizes_of(self.resolution)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(height, width) of each size, as the models, rewards and decode take an image size."""
        return [(height, width) for width, height in self.sizes]

    def at_size(self, size: tuple[int, int]) -> "Config":
        """This config with the one image size ``size`` (width, height): a step's (:meth:`at_step`), the planner's
        largest. Itself where that is already its only size."""
        value = resolution_of(*size)
        return self if value == self.resolution else dataclasses.replace(self, resolution=value)

    def at_step(self, step: int) -> "Config":
        """This config at optimizer step ``step``'s image size (image_size.step_size): what the step's latents,
        decode, reward and SDXL's size conditioning read."""
        return self.at_size(step_size(self, step))

    def _validate_resolution(self) -> None:
        """Each side at least 8 px, a multiple of 8 and within UPPER_BOUNDS' (an SD3/FLUX model's files may ask more:
        checked after), each size of a list alike."""
        most, why = next((most, why) for name, most, why in UPPER_BOUNDS if name == "resolution")
        for width, height in self.sizes:  # (a malformed value: its one line)
            value = resolution_of(width, height)
            if max(width, height) > most:  # absurd sizes: a plan or a start-up check would run for hours
                side, fix = ("", most) if width == height else (" on a side", resolution_of(min(width, most),
                                                                                           min(height, most)))
                raise UserError(f"resolution={value} is larger than {most}{side}, the most this tool takes ({why}): "
                                f"use --set resolution={fix} or less")
            if min(width, height) < 8:
                raise UserError(f"resolution={value} is too small: use the model's size, e.g. --set "
                                "resolution=512 (SD1.5), 768 (SD2.1) or 1024 (SDXL)" if width == height else
                                f"resolution={value} is too small: each side 8 px or more, e.g. {EXAMPLE}")
            if width % 8 or height % 8:
                each = "" if width == height else " on each side"
                raise UserError(f"resolution={value} must be a multiple of 8{each}: use --set resolution="
                                f"{nearest_multiples(value, 8)[0]}")
        _check_flow_resolution(self)

    def _validate_prompt_filters(self) -> None:
        """prompt_filter and eval_prompt_filter are COLUMN=VALUE (the table itself is read with the prompts)."""
        for name in ("prompt_filter", "eval_prompt_filter"):
            column, eq, _ = getattr(self, name).partition("=")
            if getattr(self, name) and not (eq and column.strip()):
                raise UserError(f"{name}={quote(getattr(self, name))} is not COLUMN=VALUE: give the column and the "
                                f"value of the rows to keep, e.g. --set {name}=Category=Animals")
        for name in ("eval_prompt_column", "eval_prompt_filter"):  # (they read eval_prompts' table: none, unread)
            if getattr(self, name) and not self.eval_prompts:
                raise UserError(f"{name}={getattr(self, name)} reads the table eval_prompts names, and eval_prompts is "
                                "empty (the held-out prompts are then eval_holdout of the training prompts): give the "
                                f"table with --set eval_prompts=FILE, or drop --set {name}")

    def _validate_decode(self) -> None:
        """The VAE decode's piece-by-piece settings."""
        if self.tiled_decode and self.sliced_decode:
            raise UserError("tiled_decode already decodes piece by piece: turn off sliced_decode")
        if not tile_overlap_fits(self.tile_size, self.tile_overlap):
            larger = self.tile_overlap * 2 + 1  # (a tile_size past its bound was advised: a second error)
            fix = (f"set tile_size to {larger} or more (the default: 64), or a smaller tile_overlap"
                   if larger <= dict((n, m) for n, m, _ in UPPER_BOUNDS)["tile_size"] else
                   f"give a tile_overlap under {self.tile_size // 2} (the default: 16)")
            raise UserError(f"tile_overlap={self.tile_overlap} must be under half of tile_size={self.tile_size}: {fix}")

    def validate(self, training: bool = True) -> "Config":
        """Check types and impossible combinations. Raises UserError naming the fix. ``training=False`` (``sample``:
        no gradient window, no backward) leaves out the rules of what training alone does: K within the sampling
        steps, the per-block checkpointing that fp8 storage and block swap need in backward."""
        hints = field_types()
        for f in fields(self):
            v = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices and v not in choices:
                named = [str(c) for c in choices if c != ""]  # card's "" (the profile's) is said by leaving it out
                if f.name == "card" and (unknown := _unknown_card(str(v), named)):
                    raise UserError(unknown)
                meant = _closest_choice(v, choices, f.default)
                raise UserError(f"{f.name}={quote(v)} is not one of {', '.join(named)}: " + (
                    f"use --set {f.name}={meant}" if meant is not None else "choose one of them"))
            t = hints[f.name]
            if t in (int, float) and not isinstance(v, (int, float)) or t is bool and not isinstance(v, bool):
                raise UserError(f"{f.name} must be {t.__name__}, got {quote(v)}")
        for f in fields(self):  # nan/inf pass every comparison below: refuse them first
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                example = ("--max-minutes 120 (0: no limit)" if f.name == "max_minutes" else
                           f"--set {f.name}={f.default if f.default is not None else 1.0}")
                raise UserError(f"{f.name}={v} is not a finite number: give a number such as {example}")
        for f in fields(self):  # a path or a name cannot hold NUL (the OS refuses it with a ValueError, not an OSError)
            v = getattr(self, f.name)
            if isinstance(v, str) and "\0" in v and f.name not in TEXT_FIELDS:
                raise UserError(f"{f.name}={quote(v)} holds a NUL character: no path or name can")
        parse_sizes(self.resolution)  # a malformed size, e.g. "1216*832": its one line before any other
        self._validate_names()
        self._validate_prompt_filters()
        most = MAX_SEED if training else MAX_SAMPLE_SEED
        if not MIN_SEED <= self.seed <= most:
            raise UserError(f"seed={quote(self.seed)} is out of range: give a whole number from {MIN_SEED} to "
                            f"{most}, e.g. --seed 42")
        pos = ["steps", "sample_steps", "batch_size", "grad_accum", "lora_rank", "k", "k_max", "max_bad_steps",
               "tile_size"] + ([] if self.truncation == "per_step" else ["k_min"])  # per_step: a step's K may be 0
        for name in ("checkpoint_every", "keep_checkpoints", "sample_prompts", "sample_every", "log_every",
                     "tile_overlap", "fidelity_images", "fidelity_every", "max_zero_grad_steps",
                     "weight_decay", "max_grad_norm", "budget_gb", "block_swap", "max_sequence_length",
                     "window_keep", "lr_warmup_steps", "max_minutes"):
            if getattr(self, name) < 0:
                fix = ("give your card's memory in GiB (--set budget_gb=7.5), or 0 for no check"
                       if name == "budget_gb" else "give the run's time limit in minutes (--max-minutes 120), or 0 for "
                       "none" if name == "max_minutes" else f"use --set {name}=0")
                raise UserError(f"{name} must be 0 or more (got {getattr(self, name)}): {fix}")
        for name in pos:
            if getattr(self, name) < 1:
                fix = "--steps 1" if name == "steps" else f"--set {name}=1"  # (steps: its own flag, as given)
                raise UserError(f"{name} must be at least 1 (got {getattr(self, name)}): use {fix}")
        for name, most, why in UPPER_BOUNDS:  # absurd sizes fail here: a plan or a start-up check would run for
            if name != "resolution" and getattr(self, name) > most:  # hours or take all memory on them (resolution:
                raise UserError(f"{name}={getattr(self, name)} is larger than {most}, the most this tool takes "
                                f"({why}): use --set {name}={most} or less")  # each size's, _validate_resolution)
        lo, hi = GLIBC_MMAP_KIB
        if self.cpu_malloc_threshold_kib and not lo <= self.cpu_malloc_threshold_kib <= hi:
            raise UserError(f"cpu_malloc_threshold_kib={self.cpu_malloc_threshold_kib} is outside glibc's range: use "
                            f"--set cpu_malloc_threshold_kib=1024 ({lo} to {hi}, or 0 for glibc's own)")
        self._validate_resolution()
        if training:
            self._validate_window()
        self._validate_time_limit()
        if self.lr <= 0:
            raise UserError(f"lr must be positive (got {self.lr}): e.g. --set lr={Config.lr}")
        if self.lr_warmup_steps >= self.steps > 0:  # (the warmup's last step is at lr (w-1)/w: never lr itself)
            raise UserError(f"lr_warmup_steps={self.lr_warmup_steps} is not below steps={self.steps}: the run would "
                            f"end before its learning rate reaches lr={self.lr:g}: lower lr_warmup_steps (e.g. --set "
                            f"lr_warmup_steps={max(self.steps // 10, 0)})")
        if self.loss_scale <= 0:
            raise UserError(f"loss_scale must be positive (got {self.loss_scale}): to minimise a reward, give it "
                            "a negative weight in --reward instead")
        if self.reward_cap is not None and self.reward_target is not None:
            raise UserError("reward_cap and reward_target both shape the loss (min(reward, cap) or |reward - target|): "
                            "keep one, e.g. --set reward_target=null")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise UserError(f"lora_alpha must be positive (got {self.lora_alpha}): leave it unset for alpha = rank")
        if not 0.0 <= self.eta <= 1.0:
            raise UserError(f"eta={self.eta} must be between 0 (deterministic DDIM) and 1 (DDPM-like noise)")
        for fmt in self.export_formats():
            if fmt not in EXPORT_FORMATS:
                raise UserError(f"export_format: {quote(fmt)} is not one of {', '.join(EXPORT_FORMATS)}: use --set "
                                f"export_format={nearest(fmt, EXPORT_FORMATS) or 'kohya'}")
        if (self.export_format or self.push_to_hub) and self.train_unet != "lora":
            what = "export_format" if self.export_format else "push_to_hub"
            raise UserError(f"{what} exports a LoRA and train_unet=full trains the whole UNet (written to "
                            f"unet/): drop {what}, or train with --set train_unet=lora")
        if self.sample_every and not self.sample_prompts:
            raise UserError(f"sample_every={self.sample_every} renders the sample prompts, and sample_prompts=0: "
                            "use --set sample_prompts=4, or --set sample_every=0")
        self._validate_model_settings()
        if self.init_lora and self.train_unet != "lora":
            raise UserError("init_lora starts LoRA training from a LoRA: drop it, or train with --set train_unet=lora")
        if self.offload != "none" and not self.deepspeed_zero:
            raise UserError(f"offload={self.offload} is a DeepSpeed ZeRO feature: add --set deepspeed_zero=2 "
                            "(optimizer) or 3 (params), or use --set offload=none")
        if self.offload == "params" and self.deepspeed_zero != 3:
            raise UserError("offload=params needs deepspeed_zero=3: use --set deepspeed_zero=3")
        if self.deepspeed_zero and self.optimizer != "adamw":
            raise UserError("DeepSpeed brings its own optimizer: use --set optimizer=adamw with deepspeed_zero")
        if self.activation_offload and self.vae_checkpointing == "none":
            raise UserError("activation_offload moves checkpointed tensors to the CPU; without VAE checkpointing it "
                            "would ship every decoder activation over PCIe: add --set vae_checkpointing=blocks")
        self._validate_decode()
        self._validate_alignment()
        if self.fused_adamw and self.optimizer != "adamw":
            raise UserError(f"fused_adamw fuses torch's AdamW; optimizer={self.optimizer} is bitsandbytes': use "
                            "--set fused_adamw=false")
        if self.fused_adamw and self.offload != "none":  # (memory/optim.uses_cpu_adam: DeepSpeed's own steps then)
            raise UserError(f"fused_adamw fuses torch's AdamW, and offload={self.offload} steps with DeepSpeed's CPU "
                            "Adam instead: use --set fused_adamw=false")
        if self.merge_lora_nograd and (clashes := self.merge_lora_clashes()):
            raise UserError(f"merge_lora_nograd runs the no-grad calls eagerly on merged copies of the LoRA's "
                            f"plain base weights: not with {' and '.join(clashes)}: use --set merge_lora_nograd=false")
        self._validate_base_and_swap(training)
        if self.guidance_scale < 1.0:
            raise UserError(f"guidance_scale={self.guidance_scale} must be >= 1.0 (1.0 turns guidance off)")
        if not 0 <= self.guidance_rescale <= 1:
            raise UserError(f"guidance_rescale={self.guidance_rescale:g} mixes the rescaled guided prediction in by "
                            "that factor: use a value from 0 (off) to 1 (e.g. 0.7)")
        return self

    def _validate_model_settings(self) -> None:
        """The settings that belong to one kind of model (a transformer file's parts, FLUX's missing negative branch,
        SD3's optional T5, a UNet's prediction type), where the model's files tell its kind before loading."""
        for problem in (revision_problem(self.model, self.revision),
                        pin_problem("components_revision", self.components_revision, "model_components",
                                    self.model_components),
                        pin_problem("vae_revision", self.vae_revision, "vae", self.vae)):
            if problem:
                raise UserError(problem)
        if self.model_components and _is_whole_model(self.model):
            raise UserError(f"model_components={self.model_components} names the folder with the other parts of a "
                            f"single transformer file, and --model {self.model} is a whole model with its own: drop "
                            "model_components (a resumed run's, of its transformer file: --set model_components=)")
        if self.negative_prompt and _is_flux(self.model, self.model_components):
            raise UserError(FLUX_NEGATIVE)
        for name in ("negative_prompt", "guidance_rescale"):  # (no unconditional pass is run: unused, unsaid)
            if getattr(self, name) and self.guidance_scale <= 1:
                raise UserError(f"{name} {UNCONDITIONAL_USES[name]} classifier-free guidance, which "
                                f"guidance_scale={self.guidance_scale:g} turns off (1 or less): drop --set "
                                f"{name}, or raise guidance_scale (e.g. --set guidance_scale=5)")
        kind = _kind(self.model, self.model_components, self.revision) if not self.t5_encoder or \
            unet_sampler_settings(self) else None  # (read only where a setting asks)
        if not self.t5_encoder and kind not in (None, *SD3_KINDS):
            raise UserError(no_t5_to_leave_out(kind == "flux"))
        if unet_sampler_settings(self) and kind in FLOW_KINDS:
            raise UserError(flow_prediction(self))
        if self.zero_terminal_snr and (self.prediction_type == "epsilon" or (
                self.prediction_type == "auto" and scheduler_prediction(self.model) == "epsilon")):
            raise UserError(ZERO_SNR_EPSILON)  # (a folder's own says it before loading: plan and train alike)
        if self.zero_terminal_snr and self.eta >= 1:
            raise UserError(zero_snr_eta(self.eta))
        if self.vae and (problem := vae_path_problem(self.vae)):  # (plan read it as a hub id: the model's own VAE)
            raise UserError(problem)

    def _validate_names(self) -> None:
        """The model and the output folder: named, and the folder one a run can write."""
        if not self.output_dir.strip():
            raise UserError("output_dir is empty: name a folder, e.g. --output-dir outputs/run")
        if not self.model.strip():  # an unset $MODEL in a script: never the random-weight tiny model in silence
            raise UserError("model is empty: name one, e.g. --model toy (the shipped toy world), sd15 or a folder")
        if self.model_arch != "auto" and Path(self.model).suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise UserError(f"model_arch={self.model_arch} names the architecture of a single-file checkpoint "
                            f"({', '.join(SINGLE_FILE_SUFFIXES)}), and --model {self.model} is not one (a folder, a "
                            "name or a hub id brings its own): drop --set model_arch")
        if any(0xD800 <= ord(c) <= 0xDFFF for c in self.output_dir):  # bytes the locale's encoding cannot read
            raise UserError(f"--output-dir {self.output_dir!a} has bytes this locale cannot read (a non-UTF-8 "
                            "locale such as LC_ALL=C with PYTHONUTF8=0, or a name not in UTF-8): run in a UTF-8 "
                            "locale (LC_ALL=C.UTF-8), or name the folder in ASCII")
        kind = kind_of(Path(self.output_dir).expanduser())
        if kind in ("dangling symlink", "symlink loop", "special file", "name too long"):
            raise UserError(f"--output-dir {self.output_dir} {describe_path(Path(self.output_dir).expanduser())}: "
                            + ("choose a shorter name" if kind == "name too long" else "choose a folder (or fix the link)"))
        if Path(self.output_dir).expanduser().resolve() == Path(Path.cwd().anchor):
            raise UserError(f"output_dir={self.output_dir} is the file system's root: name a folder for this run, "
                            "e.g. --output-dir outputs/run")

    def _validate_time_limit(self) -> None:
        """max_minutes: a limit within the margin the run keeps for its end leaves no step (0: no limit)."""
        if 0 < self.max_minutes * 60 <= TIME_LIMIT_MARGIN_S:
            raise UserError(f"max_minutes={self.max_minutes:g} leaves no time to train: a run keeps "
                            f"{TIME_LIMIT_MARGIN_S / 60:g} min in hand for its end (the LoRA, summary, exports): give "
                            "more, e.g. --max-minutes 30, or 0 for no limit")

    def _validate_window(self) -> None:
        """The gradient window (training's): K within the sampling steps."""
        if self.truncation == "fixed" and self.k > self.sample_steps:
            raise UserError(f"k={self.k} is larger than sample_steps={self.sample_steps}: use --set k="
                            f"{self.sample_steps} or raise sample_steps")
        if self.truncation != "fixed":
            if self.k_min < 0:
                raise UserError(f"k_min must be 0 or more (got {self.k_min}): use --set k_min=0")
            if self.k_min > self.k_max:
                raise UserError(f"k_min={self.k_min} is larger than k_max={self.k_max}: swap them")
            if self.k_max > self.sample_steps:
                raise UserError(f"k_max={self.k_max} is larger than sample_steps={self.sample_steps}: use --set "
                                f"k_max={self.sample_steps}")

    def merge_lora_clashes(self) -> list[str]:
        """The settings merge_lora_nograd cannot run with (a merged copy needs the LoRA on plain base weights that
        this process holds whole, called eagerly), as ``name=value``; [] when it can run."""
        return [name for name, on in (("train_unet=full", self.train_unet == "full"),
                                      (f"base_quant={self.base_quant}", self.base_quant != "none"),
                                      (f"block_swap={self.block_swap}", bool(self.block_swap)),
                                      (f"compile={self.compile}", self.compile != "none"),
                                      (f"deepspeed_zero={self.deepspeed_zero}", bool(self.deepspeed_zero))) if on]

    def can_quantize_base(self) -> bool:
        """Whether the frozen base may be stored quantized (base_quant) with the other settings: only under LoRA.
        The one rule for validation and the planner's suggestions."""
        return self.train_unet == "lora"

    def can_swap_blocks(self) -> bool:
        """Whether frozen blocks may wait in CPU memory (block_swap) with the other settings: LoRA, no DeepSpeed
        (the per-block checkpointing it also needs, the planner adds with it). The one rule for validation and the
        planner's suggestions."""
        return self.train_unet == "lora" and not self.deepspeed_zero

    def _validate_base_and_swap(self, training: bool) -> None:
        """The frozen base's storage (base_quant) and block swap: what each needs of the other settings."""
        if self.base_quant != "none" and not self.can_quantize_base():
            raise UserError("base_quant needs train_unet=lora (a quantized base cannot be fully fine-tuned)")
        if self.base_quant == "fp8" and self.deepspeed_zero == 3:  # (ZeRO-2 leaves the frozen weights whole: trains)
            raise UserError("base_quant=fp8 with deepspeed_zero=3: ZeRO-3 partitions the frozen fp8 weights too, and "
                            "what it gathers for a checkpoint's recompute differs from the forward's (the step stopped "
                            "in backward): use --set deepspeed_zero=2, or --set base_quant=none")
        # (before what block swap needs of the checkpointing: a fix of that first would be wasted)
        if self.block_swap and not self.can_swap_blocks():
            raise UserError("block_swap keeps frozen blocks in CPU memory: it needs train_unet=lora and "
                            "deepspeed_zero=0 (use --set block_swap=0 otherwise)")
        if training and self.block_swap and self.unet_checkpointing != "blocks":
            raise UserError("block_swap streams one block at a time, also in backward, only with per-block "
                            "checkpointing (a whole-call recompute would hold every block): add --set "
                            "unet_checkpointing=blocks")
        if training and self.base_quant == "fp8" and self.unet_checkpointing != "blocks":
            raise UserError("base_quant=fp8 upcasts each layer's weights while it runs, and backward keeps the upcast "
                            "copies of what it recomputes: add --set unet_checkpointing=blocks (one block's copies "
                            "at a time), or on a CUDA GPU use --set base_quant=int8")
        if self.base_quant == "fp8" and self.lora_layers != "attention":
            if _kind(self.model, self.model_components, self.revision) in FLOW_KINDS:
                # an SD3/FLUX transformer is read with its LoRA's layers in bf16 until the adapter is on them
                raise UserError(f"base_quant=fp8 reads the transformer with the LoRA's layers in bf16 until the "
                                f"adapter is added; with lora_layers={self.lora_layers} that is most of the model: use "
                                "--set base_quant=int8 (or nf4), or --set lora_layers=attention")
        if self.block_swap:
            from lowmem_alignprop.settings.model_kind import check_block_swap
            check_block_swap(self.block_swap, self.model)

    def _validate_alignment(self) -> None:
        """KL, EMA, evaluation and early stop: ranges and the combinations that cannot work."""
        for name in ("kl_coeff", "eval_every", "early_stop"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be 0 or more (got {getattr(self, name)}): use --set {name}=0")
        if self.lv_draws < 1:
            raise UserError(f"lv_draws must be at least 1 (got {self.lv_draws}): use --set lv_draws=1")
        if self.eval_prompts and self.eval_holdout < 0:  # (with eval_prompts none is held out: 0 says so)
            raise UserError(f"eval_holdout must be 0 or more (got {self.eval_holdout}): with eval_prompts none is held "
                            "out; use --set eval_holdout=0")
        if not self.eval_prompts and self.eval_holdout < 1:
            raise UserError(f"eval_holdout must be at least 1 (got {self.eval_holdout}): use --set eval_holdout=1; "
                            "to hold no training prompt out, evaluate on prompts of their own: --set eval_prompts=FILE")
        if self.lv_draws * self.batch_size > BATCH_MOST:  # decode and reward take them at once, as a batch
            raise UserError(f"lv_draws={self.lv_draws} x batch_size={self.batch_size} images decoded and scored at "
                            f"once is more than {BATCH_MOST}, the most batch_size itself may be: use --set lv_draws="
                            f"{max(1, BATCH_MOST // self.batch_size)} or less")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"ema_decay={self.ema_decay} must be in [0, 1), e.g. --set ema_decay=0.99 (0 = off)")
        if not self.ema_outputs and not self.ema_decay:  # (as eval_on_start without eval_every)
            raise UserError("ema_outputs=false chooses the trained weights over an EMA's average, and ema_decay is 0 "
                            "(no average kept): add --set ema_decay=0.99, or leave ema_outputs out")
        for name in ("lora_layers", "lora_rank", "lora_alpha"):  # a LoRA's shape: meaningless without a LoRA
            value = getattr(self, name)
            if value != getattr(Config, name) and self.train_unet != "lora":
                raise UserError(f"{name}={value} shapes the LoRA, and train_unet=full trains every weight of the "
                                f"UNet, with no LoRA: leave {name} out, or use --set train_unet=lora")
        if self.kl_coeff > 0 and self.train_unet != "lora":
            raise UserError("kl_coeff needs train_unet=lora: the base model is the UNet with its LoRA switched off "
                            "(use --set kl_coeff=0 to fine-tune the full UNet)")
        if self.ema_decay > 0 and self.deepspeed_zero == 3:
            raise UserError("ema_decay with deepspeed_zero=3: the EMA would average partitioned weights; use "
                            "--set deepspeed_zero=2 or --set ema_decay=0")
        if self.eval_every and self.deepspeed_zero == 3:
            raise UserError("eval_every with deepspeed_zero=3: best/ would need the partitioned LoRA gathered on "
                            "every process; use --set deepspeed_zero=2, or evaluate the exported LoRA with `sample`")
        for name, what in _ACT_ON_EVALUATION.items():
            value = getattr(self, name)
            if value != getattr(Config, name) and not self.eval_every:
                shown = name if isinstance(value, bool) else f"{name}={value}"
                raise UserError(f"{shown} {what}, and evaluation is off: add --eval-every N")
        if self.recipe:
            recipe_file(self.recipe)

    # ------------------------------------------------------------------------------------------------
    def with_changes(self, **changes: Any) -> "Config":
        """A validated copy with ``changes`` (an auto-fit step, a search's candidate); this one is left as it is."""
        return dataclasses.replace(self, **changes).validate()

    def window_bounds(self) -> tuple[int, int]:
        """The range of K this config can draw."""
        if self.truncation == "fixed":
            return self.k, self.k
        return self.k_min, self.k_max

    def export_formats(self) -> list[str]:
        """export_format as a list: 'kohya, peft' -> ['kohya', 'peft'] (each once, in the order given)."""
        return format_list(self.export_format)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def format_list(text: str) -> list[str]:
    """Export formats as written (export_format, `export --format`): 'kohya, peft' -> ['kohya', 'peft'], each once,
    in the order given."""
    return list(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))


FIELD_NAMES = tuple(f.name for f in fields(Config))


@functools.cache
def field_types() -> dict[str, Any]:
    """Each field's type, resolved once (typing.get_type_hints evaluates every annotation's text again on each call:
    0.15 s a command line of --set values)."""
    return get_type_hints(Config)
# fields an earlier version had, with what each did: unset (None) in an older checkpoint or config.yaml, left out; set,
# a resume says it trains on without it and a profile or --set is refused
RETIRED_FIELDS = {"reward_floor": "the loss saw max(reward, reward_floor), so images below it gave no gradient"}

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes"  # the paper's settings, one YAML file per recipe


def recipe_file(name: str) -> Path:
    """The shipped recipe ``name``'s file; an unknown name is one line naming the recipes there are."""
    recipes = shipped_recipes()
    if name not in recipes:
        raise UserError(f"unknown recipe {name!r}: use one of {', '.join(recipes)}")
    return recipes[name]


def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.yaml"))}


# (field, largest value, why): beyond these no model, card or schedule makes sense
BATCH_MOST = 1024  # images at once (a micro-step's, its DRaFT-LV draws', sample's per prompt)
UPPER_BOUNDS = (
    ("resolution", 4096, "4x the largest native size, SDXL's 1024 px"),
    ("batch_size", BATCH_MOST, "images per micro-step; more images per optimizer step come from grad_accum"),
    ("grad_accum", 65536, "micro-steps per optimizer step"),
    ("sample_steps", 1000, "the DDIM schedule's training timesteps"),
    ("steps", 10_000_000, "optimizer steps"),
    ("lora_rank", 1024, "larger than the attention layers it adapts"),
    ("tile_size", 4096, "the largest resolution"),
    ("max_sequence_length", 512, "SD3's and FLUX.1's pipelines take no more T5 tokens"),
    ("fidelity_images", 4096, "the toy world's judged images, rendered before and after training"),
)


def _compiler_missing() -> str | None:
    """What torch.compile needs here and does not find: triton on a CUDA machine (Linux wheels of torch bring it;
    Windows needs triton-windows), a C++ compiler for the CPU on Windows (MSVC's cl.exe); None when nothing is
    missing that can be told before compiling."""
    import shutil
    import sys

    import torch

    if torch.cuda.is_available():
        if not _has("triton"):
            return "triton (torch.compile's GPU kernels): pip install " + (
                "triton-windows" if sys.platform == "win32" else "triton")
        return None
    if sys.platform == "win32" and shutil.which("cl") is None:
        return "a C++ compiler for the CPU kernels (MSVC's cl.exe on PATH: a Developer Command Prompt)"
    return None


def tile_overlap_fits(tile_size: int, overlap: int) -> bool:
    """The tiled decode's bound (memory/tiling.py): neighbouring tiles share under half a tile."""
    return overlap * 2 < tile_size


def describe_k(settings) -> str:
    """How a run's K is drawn, for a plan, a model card or a note: ``K = 3``, ``K ~ U{1..50}`` (once per rollout) or
    ``K ~ U{0..50} per step``. ``settings``: a Config's or a saved config's fields (a dict)."""
    get = settings.get if isinstance(settings, dict) else lambda name: getattr(settings, name)
    if get("truncation") == "fixed":
        return f"K = {get('k')}"
    return f"K ~ U{{{get('k_min')}..{get('k_max')}}}" + (" per step" if get("truncation") == "per_step" else "")


# (field, the value (or values) that need nothing, the package any other value needs)
NEEDS_PACKAGE = (("optimizer", "adamw", "bitsandbytes"), ("base_quant", ("none", "fp8"), "bitsandbytes"),
                 ("deepspeed_zero", 0, "deepspeed"))
_PACKAGE_NAMES = {"deepspeed": "DeepSpeed"}


def missing_package(setting: str, module: str, fallback: str) -> UserError:
    """The one message for a setting whose package is not installed, e.g. ``optimizer=adamw8bit needs bitsandbytes``."""
    return UserError(f"{setting} needs {_PACKAGE_NAMES.get(module, module)}: pip install {module}, "
                     f"or use --set {fallback}")


def import_needed(module: str, setting: str, fallback: str):
    """Import the package ``setting`` needs, or raise :func:`missing_package`'s message."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing_package(setting, module, fallback) from None


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def coerce(name: str, value: Any) -> Any:
    """Convert a YAML or --set value to the field's type. Raises UserError for unknown keys or bad values."""
    if name in RETIRED_FIELDS:
        raise UserError(f"{name} was removed (an earlier version's experimental setting: {RETIRED_FIELDS[name]}): "
                        "leave it out")
    if name not in FIELD_NAMES:
        hint = did_you_mean(name, FIELD_NAMES)  # (STEPS: as steps)
        raise UserError(f"unknown config key {name!r}{hint}: see `lowmem-alignprop --help` for the field list")
    t = field_types()[name]
    if name == "resolution" and value is not None:  # N or "WxH", or several: a list or "1024,1216x832"
        return parse_sizes(value)
    if isinstance(value, str):
        s = value.strip()
        if t is bool:
            if _truth(s) is None:
                raise UserError(f"{name} must be true or false, got {quote(value)}")
            return _truth(s)
        if name == "vae_checkpointing" and _truth(s) is not None:  # as in a profile (below): on is per up-block
            return "blocks" if _truth(s) else "none"
        if t is int or (name == "deepspeed_zero"):
            try:
                return int(s)
            except ValueError:
                raise UserError(f"{name} must be a whole number, got {quote(value)}") from None
        if t is float or t == (float | None):
            if t == (float | None) and s.lower() in ("", "none", "null"):
                return None
            try:
                return float(s)
            except ValueError:
                raise UserError(f"{name} must be a number, got {quote(value)}") from None
        return s
    # values coming from YAML already have a type: check it
    if value is None and type(None) not in get_args(t):  # `budget_gb:` with nothing after it
        raise UserError(f"{name} has no value: give one (its default: {name}: {_default_text(name)}) or leave the "
                        "line out")
    if name == "vae_checkpointing" and isinstance(value, bool):
        return "blocks" if value else "none"  # yes/no in a profile means per up-block
    if t is bool and not isinstance(value, bool) and value in (0, 1):  # as --set takes 1 and 0 (YAML: numbers)
        return bool(value)
    if t is bool and not isinstance(value, bool):
        raise UserError(f"{name} must be true or false, got {quote(value)}")
    if t is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"{name} must be a whole number, got {quote(value)}")
    if t in (float, float | None) and value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{name} must be a number, got {quote(value)}")
        return float(value)
    if t is str and isinstance(value, bool):  # YAML 1.1 reads a bare no/yes/off/on as false/true
        raise UserError(f"{name} must be text, got {quote(value)} (YAML reads a bare no, yes, off or on as "
                        f"false/true): quote the value, e.g. {name}: \"no\"")
    if t is str and not isinstance(value, str):
        raise UserError(f"{name} must be text, got {quote(value)}")
    return value


def _default_text(name: str) -> str:
    default = getattr(Config, name)
    return quote(default) if isinstance(default, str) else flag_value(default)


# glibc's mmap threshold: its own initial one, and its largest on 64-bit (HEAP_MAX_SIZE / 2; mallopt refuses more)
GLIBC_MMAP_KIB = (128, 32 * 1024)

TEXT_FIELDS = ("negative_prompt",)  # free text, as a prompt file's lines may be (every other str is a path or a name)

# a negative prompt on FLUX.1: Config.validate says it when the files tell, the loader (family.check_supported) else
FLUX_NEGATIVE = ("negative_prompt: FLUX.1 is guidance-distilled (its guidance embedding, no classifier-free guidance "
                 "pass), so it has no negative branch: drop --set negative_prompt, or use an SD3/SD3.5 model")


# what the unconditional branch of classifier-free guidance is to each setting that needs it (Config.validate)
UNCONDITIONAL_USES = {"negative_prompt": "is the unconditional branch of",
                      "guidance_rescale": "rescales the guided prediction of"}


def unet_sampler_settings(cfg) -> list[str]:
    """The settings of how a UNet model samples (diffusers' SD/SDXL pipelines) that ``cfg`` sets away from their
    defaults; SD3/FLUX take none of them."""
    return [f for f in ("prediction_type", "zero_terminal_snr", "guidance_rescale")
            if getattr(cfg, f, getattr(Config, f)) != getattr(Config, f)]


def flow_prediction(cfg) -> str:
    """A UNet's sampler settings (:func:`unet_sampler_settings`) on an SD3/FLUX model: the line, naming what was set
    (Config.validate says it when the files tell, the loader, load_flow_components, else)."""
    given = unet_sampler_settings(cfg)
    return (f"{' and '.join(given)} set{'s' if len(given) == 1 else ''} how a UNet samples (its prediction, noise "
            "schedule, guidance rescale); SD3/SD3.5 and FLUX.1 predict a flow (their own scheduler's) and take none "
            "of these: drop " + " and ".join(f"--set {f}" for f in given))


def vae_path_problem(spec: str) -> str | None:
    """What is wrong with ``vae`` as its path shows it, before any weight is read (None: nothing, or a hub id):
    nothing there, a folder of no VAE (no config.json, or another model's), a file of no checkpoint type.
    Config.validate says it, so plan refuses it as training does; the loader asks again (a path gone since)."""
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        folder = path / (vae_subfolder(path) or "")  # (a pipeline's folder: its vae/)
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return (f"vae={spec} is a folder without config.json (or vae/config.json): pass the folder that "
                    "AutoencoderKL.save_pretrained wrote, a hub id, or a .safetensors file")
        kind = config.get("_class_name", "") if isinstance(config, dict) else ""
        if kind and "Autoencoder" not in kind:  # (a pipeline's unet/ or text_encoder/ given for its vae/)
            return f"vae={spec} holds a {kind}, not a VAE: pass a VAE's folder (a pipeline's vae/), file or hub id"
        return None
    if path.is_file():
        return None if path.suffix.lower() in SINGLE_FILE_SUFFIXES else (
            f"vae={spec} is not a VAE checkpoint: pass a .safetensors file, a folder or a hub id")
    if looks_like_hub_id(spec):
        return None
    return (f"vae={spec} does not exist: pass a diffusers VAE folder, a .safetensors file or a hub id (e.g. "
            "madebyollin/sdxl-vae-fp16-fix), or leave vae empty for the model's own")


def revision_problem(model: str, revision: str) -> str | None:
    """What is wrong with ``revision`` for ``model`` (None: nothing, or none given): it pins a hub id's snapshot, so
    with a local folder or file, or a shipped or architecture-only name, it would pin nothing; a value with spaces
    is no git ref."""
    if not revision:
        return None
    if revision != revision.strip() or any(c.isspace() for c in revision):
        return (f"revision={revision!r} is not a branch, tag or commit of a hub repository (it has spaces): give one, "
                "e.g. --set revision=main or a commit sha")
    from lowmem_alignprop.settings.model_kind import NAMED_KINDS

    if model in NAMED_KINDS or not model:
        what = "a model built into the tool"
    elif kind_of(Path(model).expanduser()) != "missing" or not looks_like_hub_id(model):
        what = "a local path, not a hub id"
    else:
        return None
    return (f"revision={revision} pins a hub id's snapshot (OWNER/NAME at a branch, tag or commit), and --model "
            f"{model or 'tiny'} is {what}, which has no revisions: drop --set revision, or give --model as a hub id")


# the fields a hub id may fill, each with the field that pins it to a branch, tag or commit (its snapshot)
HUB_PINS = {"model": "revision", "model_components": "components_revision", "vae": "vae_revision"}


def pin_problem(name: str, revision: str, field_name: str, value: str) -> str | None:
    """What is wrong with pin ``name`` (components_revision, vae_revision) of field ``field_name``'s ``value`` (None:
    nothing, or none given): it pins a hub id's snapshot, so with an empty field, a local folder or file it would pin
    nothing; a value with spaces is no git ref."""
    if not revision:
        return None
    if revision != revision.strip() or any(c.isspace() for c in revision):
        return (f"{name}={revision!r} is not a branch, tag or commit of a hub repository (it has spaces): give one, "
                f"e.g. --set {name}=main or a commit sha")
    if value and kind_of(Path(value).expanduser()) == "missing" and looks_like_hub_id(value):
        return None
    what = f"{field_name} is empty" if not value else f"{field_name}={value} is a local path, not a hub id"
    return (f"{name}={revision} pins a hub id {field_name}'s snapshot (OWNER/NAME at a branch, tag or commit), and "
            f"{what}, which has no revisions: drop --set {name}, or give {field_name} as a hub id")


def zero_snr_eta(eta: float) -> str:
    """DDIM's eta 1 at zero terminal SNR (Config.validate says it when set, the loader when the model says it)."""
    default = " (the default)" if eta == Config.eta else ""
    return (f"zero terminal SNR with eta={eta:g}{default}: DDIM's step from the pure-noise timestep then has no "
            "deterministic part left, and diffusers' step turns it into NaN: use --set eta=0 (or any value below 1)")


# zero terminal SNR with a noise-predicting UNet: Config.validate says it when set, the loader when the model says it
ZERO_SNR_EPSILON = ("zero_terminal_snr: at zero SNR the last timestep's latent is all noise, which a noise-predicting "
                    "(epsilon) UNet cannot denoise: it is for v-prediction models; add --set "
                    "prediction_type=v_prediction or drop zero_terminal_snr")


def _kind(model: str, components: str, revision: str = "") -> str | None:
    """The model's kind as its files tell, without loading it (settings/model_kind: a shipped name, a folder or a
    transformer file's model_components, a hub id in the local hub cache at ``revision``); None when only loading
    tells (the loader then checks: models/family.check_supported)."""
    return model_kind_of(model, components, revision=revision)


def _is_flux(model: str, components: str) -> bool:
    return _kind(model, components) == "flux"


def no_t5_to_leave_out(flux: bool) -> str:
    """t5_encoder=false on a model that is not SD3/SD3.5 (a silently ignored flag would promise memory not saved)."""
    what = ("FLUX.1 always needs its T5-XXL (its prompt embedding is T5's)" if flux else
            "the model has no T5 text encoder to leave out (only SD3/SD3.5 do)")
    return f"t5_encoder=false leaves out SD3/SD3.5's T5-XXL, and {what}: drop --set t5_encoder=false"


def _is_whole_model(model: str) -> bool:
    """A --model value with every part of its own: a shipped or architecture-only name, or a folder."""
    from lowmem_alignprop.settings.model_kind import NAMED_KINDS

    return model in NAMED_KINDS or (bool(model) and Path(model).expanduser().is_dir())  # ("": no folder, as tiny)


def _check_flow_resolution(cfg: Config) -> None:
    """An SD3/FLUX model's resolution (a multiple of its token's pixels; SD3: within its position embeddings), where
    its files tell before loading (settings/model_kind.flow_geometry); the loader checks the rest."""
    from lowmem_alignprop.settings.model_kind import check_flow_resolution, flow_geometry

    if (geometry := flow_geometry(cfg.model, cfg.model_components)) is not None:
        for size in cfg.sizes:
            check_flow_resolution(resolution_of(*size), geometry)


def _truth(text: str) -> bool | None:
    """A yes/no word of the command line (true, on, 1; false, off, 0...), else None."""
    low = text.strip().lower()
    return True if low in ("1", "true", "yes", "on") else False if low in ("0", "false", "no", "off") else None


def _unknown_card(value: str, cards: list[str]) -> str | None:
    """The line for a card that is not one of ``cards``, told by its model number: the cards of that number (a100:
    both A100s; rtx409, RTX4090: rtx4090), or, for another card (rtx5090, h800), that plan has no figures for it --
    not the nearest spelling, which times another card in silence. None: no model number (the usual nearest name)."""
    import re

    def model(name: str) -> tuple[str, str]:  # (its letters, its number): rtx-4090 -> (rtx, 4090); 4090 -> ("", 4090)
        m = re.match(r"([a-z]*)[^a-z0-9]*([0-9]{3,})", name.strip().lower())
        return (m[1], m[2]) if m else ("", "")

    letters, digits = model(value)
    if not digits:
        return None
    same = [c for c in cards if model(c)[1].startswith(digits) and letters in ("", model(c)[0])]
    if same:
        return (f"card={quote(value)} is not one of {', '.join(cards)}: use "
                + " or ".join(f"--set card={c}" for c in same))
    return (f"card={quote(value)}: plan has no figures for that card (it has {', '.join(cards)}): use the one nearest "
            "yours in speed and memory, or leave card out (the profile's card)")


def _closest_choice(value, choices, default) -> str | None:
    """The choice a mistyped value meant (same letters in another case, the off or the first on choice for a yes/no
    word, the nearest number, or the nearest spelling), else the field's default where that is a choice other than
    off (None: the choices are listed)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and all(
            isinstance(c, int) for c in choices):  # a number: the nearest, the higher of two (ZeRO-1: 2, not off)
        return str(min(choices, key=lambda c: (abs(c - value), -c)))
    choices = [str(c) for c in choices if c != ""]
    text = str(value).strip().lower()
    for c in choices:
        if c.lower() == text:
            return c
    off = [c for c in choices if c in ("none", "no")]
    if _truth(text) is not None and (off or _truth(text)):
        return off[0] if not _truth(text) else next(c for c in choices if c not in off)
    close = nearest(text, choices)
    if close:
        return close
    # else the default, unless it is off: report_to=all was told none, the opposite of what it asked
    return str(default) if str(default) in choices and str(default) not in off else None


def split_set(item: str) -> tuple[str, str]:
    """One ``--set key=value`` string as (key, value text)."""
    if "=" not in item or not item.split("=", 1)[0].strip():
        raise UserError(f"malformed --set {item!r}: write it as --set key=value, e.g. --set k=2")
    key, value = item.split("=", 1)
    return key.strip(), value


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse repeated ``--set key=value`` strings into typed values."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, value = split_set(item)
        value = coerce(key, value)
        if key in out and out[key] != value:  # (a script's appended overrides contradicting themselves: unsaid)
            logging.getLogger("lowmem_alignprop").warning("--set %s given twice (%s, then %s): the last wins", key,
                                                          flag_value(out[key]), flag_value(value))
        out[key] = value
    return out


def flag_value(value: Any) -> str:
    """A field's value as ``--set key=value`` and a profile file write it (true/false for a bool)."""
    if isinstance(value, list):  # several sizes: as --set takes them
        return ",".join(flag_value(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


HOST_MEMORY_FEATURES = {"offload_frozen": False, "activation_offload": False, "block_swap": 0}  # (their off values)


def host_memory_note(cfg: Config, what: str) -> str | None:
    """A GPU's host-memory features set for ``what`` (a run, a plan) on the CPU, where the tensors already are:
    nothing saved, copies made; None when none is set."""
    on = {k: off for k, off in HOST_MEMORY_FEATURES.items() if getattr(cfg, k) != off}
    if not on:
        return None
    return (f"{' and '.join(on)} keep{'s' if len(on) == 1 else ''} a GPU's tensors in host memory, and {what} is on "
            f"the CPU, where they already are: nothing saved here, copies made; turn {'it' if len(on) == 1 else 'them'}"
            f" off: {set_flags(on)}")


def set_flags(overrides: dict[str, Any]) -> str:
    """The ``--set key=value`` flags that give ``overrides`` (the inverse of :func:`parse_set`), for messages."""
    return " ".join(f"--set {k}={flag_value(v)}" for k, v in overrides.items())


# the settings an image depends on besides the weights: `sample` of a LoRA without --model takes its run's
RUN_IMAGE_SETTINGS = ("model_components", "prediction_type", "zero_terminal_snr", "vae", "t5_encoder", "resolution",
                      "sample_steps", "guidance_scale", "guidance_rescale", "eta", "max_sequence_length",
                      "negative_prompt")


# what only training reads (the gradient window, the optimiser, over-optimisation controls, checkpoints, the
# backward's memory features): `sample` says a --set of one changes nothing there
TRAINING_ONLY = frozenset((
    "steps", "max_minutes", "truncation", "k", "k_min", "k_max", "grad_accum", "lr", "lr_scheduler", "lr_warmup_steps",
    "weight_decay", "max_grad_norm", "loss_scale",
    "reward_target", "reward_cap", "train_unet", "lora_rank", "lora_layers", "lora_alpha", "init_lora", "kl_coeff",
    "lv_draws", "ema_decay", "ema_outputs", "eval_every", "eval_prompts", "eval_prompt_column", "eval_prompt_filter",
    "eval_holdout", "early_stop", "eval_on_start",
    "best_by", "unet_checkpointing", "window_keep", "vae_checkpointing", "reward_checkpointing", "activation_offload",
    "deepspeed_zero", "offload", "fused_adamw", "sample_prompts", "sample_every", "export_format", "push_to_hub",
    "fidelity_every", "checkpoint_every", "keep_checkpoints", "auto_fit", "max_bad_steps", "max_zero_grad_steps",
    "log_every", "optimizer", "prompt_order", "report_to", "fidelity_images"))

# the speed settings of training's own steps (models/loading.apply_speed_features and nograd_unet, merged_lora, the
# prompt encoder's cache): `sample` renders through diffusers' pipelines without them, and says a --set of one
SPEED_IN_TRAINING_ONLY = frozenset(("compile", "channels_last", "tf32", "merge_lora_nograd", "cache_prompt_embeddings"))

# what the run's images were scored with and on: `sample` of its LoRA takes them too, where they are at hand
RUN_SCORING_SETTINGS = ("reward", "reward_weights", "prompts", "prompt_column", "prompt_filter")
PROMPT_READING = ("prompt_column", "prompt_filter")  # how a table of --prompts is read: they go with it


def scoring_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The :data:`RUN_SCORING_SETTINGS` a run's config (a dict) set (an empty reward_weights left out)."""
    return {k: values[k] for k in RUN_SCORING_SETTINGS if values.get(k) not in (None, "")}


def image_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The :data:`RUN_IMAGE_SETTINGS` a run's config (a dict: config.yaml, a checkpoint's) set, leaving out those
    that say nothing (empty; SD3/FLUX's text-encoder settings at their defaults, which mean "as the model comes";
    eta for SD3/FLUX, whose Euler sampler has none)."""
    unset = {k: getattr(Config, k) for k in ("t5_encoder", "max_sequence_length", "prediction_type",
                                             "zero_terminal_snr", "guidance_rescale")}
    flow = model_kind_of(str(values.get("model", "")), str(values.get("model_components") or "")) in FLOW_KINDS
    return {k: values[k] for k in RUN_IMAGE_SETTINGS if values.get(k) not in (None, "", unset.get(k))
            and not (flow and k == "eta")}


def end_k_range_at(values: dict[str, Any], steps: int, asked: Any = ()) -> dict[str, tuple[int, int]]:
    """Bring the K settings (k, k_min, k_max) of ``values`` that exceed ``steps`` sampling steps down to it, in place,
    leaving those in ``asked`` (the user's own: still checked by validate). Returns {field: (was, now)}."""
    lowered = {}
    for key in ("k", "k_min", "k_max"):
        if key not in asked and (was := values.get(key, getattr(Config, key))) > steps:
            values[key] = steps
            lowered[key] = (was, steps)
    return lowered


def end_k_range_said(values: dict[str, Any], asked: Any, training: bool) -> None:
    """:func:`end_k_range_at` at ``values``' own sample_steps, saying what it lowered that the run reads (a training
    run's: sample has no gradient window)."""
    lowered = end_k_range_at(values, values["sample_steps"], asked=asked)
    uniform = values.get("truncation", Config.truncation) != "fixed"  # (a fixed K reads only k)
    said = [f"{k} {old} -> {new}" for k, (old, new) in lowered.items() if uniform != (k == "k")]
    if said and training:
        logging.getLogger("lowmem_alignprop").info("sample_steps=%d: the K range ends at the last step (%s)",
                                                   values["sample_steps"], ", ".join(said))


def build_config(profile_values: dict[str, Any], explicit: dict[str, Any], overrides: dict[str, Any],
                 training: bool = True) -> Config:
    """Merge profile < explicit CLI flags < --set overrides into a validated Config (``training``: Config.validate's)."""
    values: dict[str, Any] = {}
    for source in (profile_values, explicit, overrides):
        for k, v in source.items():
            values[k] = coerce(k, v)
    user = {**explicit, **overrides}
    if "sample_steps" in user:  # fewer DDIM steps asked for: the profile's K range ends at the last step
        end_k_range_said(values, asked=user, training=training)  # (one the user asked for: checked)
    if isinstance(values.get("output_dir"), str):  # '~/x' is the home folder's x, as every other path option
        values["output_dir"] = os.path.expanduser(values["output_dir"])
    cfg = Config(**values).validate(training)
    _refuse_unread(cfg, user, training)
    return cfg


def _refuse_unread(cfg: Config, user: dict[str, Any], training: bool) -> None:
    """Settings the user gave that this run would not read, so would not get what they asked for: a K the profile's
    truncation does not read (k under uniform/per_step, k_min/k_max under fixed), an eval_holdout beside the
    eval_prompts that replace it, and SD3/FLUX's text-encoding settings for an SD UNet model (the text encoder kept off
    the card, promised). A profile's are left alone: a profile made for FLUX is said as such where it matters
    (settings/profiles.under_profile)."""
    if training and "k" in user and cfg.truncation != "fixed":
        raise UserError(f"k={cfg.k} is the K of truncation=fixed, and truncation={cfg.truncation} draws K from k_min="
                        f"{cfg.k_min} to k_max={cfg.k_max}: add --set truncation=fixed for K={cfg.k}, or set k_min "
                        "and k_max instead")
    if training and "eval_holdout" in user and cfg.eval_prompts and cfg.eval_holdout:  # (0 says "none", as it is)
        raise UserError(f"eval_holdout={cfg.eval_holdout} holds out training prompts where eval_prompts is empty, and "
                        f"eval_prompts={cfg.eval_prompts} gives the held-out prompts: drop --set eval_holdout, or "
                        "--set eval_prompts= to hold out training prompts instead")
    held = [name for name in ("eval_prompts", "eval_prompt_column", "eval_prompt_filter", "eval_holdout")
            if name in user]
    if training and held and not cfg.eval_every:  # (said, not refused: a script may keep them for its eval runs)
        logging.getLogger("lowmem_alignprop").warning(
            "%s choose%s the held-out evaluation's prompts, and it is off (eval_every=0): nothing is held out or "
            "evaluated; add --eval-every N (e.g. 10) to evaluate", " and ".join(held), "s" if len(held) == 1 else "")
    bounds = [name for name in ("k_min", "k_max") if name in user]
    if training and bounds and cfg.truncation == "fixed":
        raise UserError(f"{' and '.join(bounds)} {'bounds' if len(bounds) == 1 else 'bound'} the K that "
                        f"truncation=uniform or per_step draws, and truncation=fixed trains K=k={cfg.k}: add --set "
                        "truncation=uniform, or set k instead")
    unread = [name for name in ("encode_on_cpu", "max_sequence_length") if name in user and getattr(cfg, name)]
    if unread and _kind(cfg.model, cfg.model_components) not in (None, *FLOW_KINDS):
        verb, they = ("sets", "it changes") if len(unread) == 1 else ("set", "they change")
        raise UserError(f"{' and '.join(unread)} {verb} how SD3/SD3.5 and FLUX.1 encode prompts (with T5), and "
                        f"--model {cfg.model} is an SD UNet model: {they} nothing there; drop "
                        + " and ".join(f"--set {name}" for name in unread))


def unread_in_training(cfg: Config, sets: list[str]) -> list[str]:
    """What a training run does not read of the ``--set`` fields the user gave (plan and its search read them): said,
    not refused (--auto-fit may turn tiled decode on, and reads the card). They were taken in silence."""
    given = {split_set(item)[0] for item in sets}
    tiles = [name for name in ("tile_size", "tile_overlap") if name in given]
    notes = []
    if tiles and not cfg.tiled_decode and not cfg.auto_fit:
        notes.append(f"{' and '.join(tiles)} shape{'s' if len(tiles) == 1 else ''} tiled decode, and it is off: not "
                     "used; add --set tiled_decode=true")
    if "card" in given and cfg.card and not cfg.auto_fit:
        notes.append(f"card={cfg.card} is the card plan times the step for (and --auto-fit searches for): a run "
                     "measures its own, so it is not used here")
    return notes


def field_help(leave_out=frozenset()) -> str:
    """Every field (but ``leave_out``) with its default and help text, for --help."""
    lines = []
    for f in (f for f in fields(Config) if f.name not in leave_out):
        choices = f.metadata.get("choices")
        ch = f" [{'|'.join(map(str, choices))}]" if choices else ""
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {f.name}{ch} (default {default!r})\n      {f.metadata['help']}")
    return "\n".join(lines)

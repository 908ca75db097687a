"""``lowmem-alignprop sample``: what did training do? Base model vs LoRA(s), same seeds, scored by a reward.

For the first ``--num-prompts`` prompts of the prompt set, ``--images-per-prompt`` images each, this generates
every image twice with the diffusers pipeline and the training sampler's settings (DDIM, ``sample_steps``,
``guidance_scale``, ``eta``, ``resolution`` of the profile/config): once from the base model and once with the
LoRA adapter(s). Image ``n`` of the run uses its own CPU generator seeded ``seed + n`` for its initial noise and
every DDIM noise draw, so base and LoRA images start from the same noise and an image does not depend on the
batch it was generated in. SD3/SD3.5 and FLUX.1 (flow-matching Euler, no eta) are loaded and placed as the
trainer does under the same profile (:mod:`lowmem_alignprop.commands.flow_sample`). Both sets are scored with
``--reward`` (any reward spec) and written as

    OUTPUT_DIR/sample_grid.png        columns = images, rows = base / lora, each labelled with its reward
    OUTPUT_DIR/sample_results.json    per-prompt rewards (base, lora), their means and lora - base

Without a LoRA (``sample --model M``: a merged model, a base model before training) each image is rendered once,
from the model alone: the grid has one row, and sample_results.json's LoRA keys are null (docs/outputs.md).

Mixing adapters (``--lora a:0.5 --lora b:0.5``) adds each adapter's weight update times its weight to every layer
it adapts: :mod:`lowmem_alignprop.lora.adapters` says how.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from lowmem_alignprop import rewards
from lowmem_alignprop.commands import flow_sample, sample_pipeline
from lowmem_alignprop.training import grid
from lowmem_alignprop.rewards.base import scored_apart
from lowmem_alignprop.lora.adapters import check_adapters_fit_meta_model, load_adapters, mix_adapters
from lowmem_alignprop.lora.lora_args import LoraSpec
from lowmem_alignprop.lora.lora_checks import check_lora_family, check_lora_files, warn_other_base
from lowmem_alignprop.lora.lora_kinds import pipeline_model
from lowmem_alignprop.training.run_summary import judged_of
from lowmem_alignprop.measure.weight_bytes import check_host_memory
from lowmem_alignprop.memory import precision
from lowmem_alignprop.memory.placement import configure_cuda_allocator, unused_apple_gpu_note
from lowmem_alignprop.models import loading
from lowmem_alignprop.models.sampler_check import ddim_settings
from lowmem_alignprop.models.sampling import negative_prompts
from lowmem_alignprop.run import atomic
from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.run.filenames import LORA_WEIGHT_NAME, SAMPLE_GRID, SAMPLE_RESULTS
from lowmem_alignprop.run.runlock import hold_folder
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.image_size import resolution_of
from lowmem_alignprop.step.hub_prompts import read_source
from lowmem_alignprop.step.prompts import described, read_with
from lowmem_alignprop.step.inputs import prepare_inputs
from lowmem_alignprop.toy.fidelity import applies, evaluate_batch, off_grammar_note

log = logging.getLogger("lowmem_alignprop")


def image_seeds(seed: int, num_prompts: int, images_per_prompt: int) -> list[list[int]]:
    """Seed of image j of prompt i: ``seed + i * images_per_prompt + j`` (one generator per image)."""
    return [[seed + i * images_per_prompt + j for j in range(images_per_prompt)] for i in range(num_prompts)]


# ---------------------------------------------------------------------------------------------------------
# the images and their rewards
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], cfg, batch_size: int, adapted: bool = False) -> torch.Tensor:
    """Images in [0, 1] (float32, CPU), ``[len(prompts), 3, H, W]``; image n uses a generator seeded seeds[n].
    ``adapted``: the LoRA images (SD3/FLUX: their prompts encoded by the encoders with the LoRAs' CLIP layers)."""
    if flow_sample.is_flow(pipe):  # SD3 (CFG on the negative prompt) / FLUX (guidance embedding): cached embeddings
        return flow_sample.generate_flow(pipe, prompts, seeds, cfg, batch_size, adapted)
    out = []
    for i in range(0, len(prompts), batch_size):  # batch_size images per pipeline call bounds the UNet's activations
        chunk = prompts[i:i + batch_size]
        # CPU generators: the same noise on every device, and the same draws as training's initial_latents
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds[i:i + batch_size]]
        # training's unconditional branch: the negative prompt, or the pipeline's own default for an empty one
        images = pipe(prompt=chunk, negative_prompt=negative_prompts(cfg.negative_prompt, len(chunk)),
                      num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale, eta=cfg.eta,
                      guidance_rescale=cfg.guidance_rescale, height=cfg.height, width=cfg.width,
                      generator=gens, output_type="pt").images
        out.append(images.float().cpu())  # kept on the CPU: the GPU holds one batch at a time
    return torch.cat(out)


@torch.no_grad()
def score(reward, images: torch.Tensor, prompts: list[str], device: torch.device, batch_size: int, spec: str,
          whose: str) -> torch.Tensor:
    """The reward ``spec`` of every image, ``batch_size`` at a time; a failure of the user's reward's code, sys.exit
    included, is one line naming ``whose`` images it was scoring (nothing is written then)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        out.append(scored_apart(reward, images[i:i + batch_size].to(device), prompts[i:i + batch_size], spec,
                                f"while scoring {whose} images", "fix it and run sample again (nothing was written)"
                                ).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------
def has_results(folder: Path) -> bool:
    return (folder / SAMPLE_RESULTS).exists()


def refuse_a_runs_folder(out: Path) -> None:
    """sample's --output-dir may not be a training run's folder or a LoRA folder: its grid and results would land
    among the run's files, or in what export and --push-to-hub copy as the LoRA."""
    # (a run's folder: what a new training start there is refused for, its checkpoints, lora/, metrics, summary)
    what = ("a LoRA folder" if (out / LORA_WEIGHT_NAME).is_file() else "a training run's folder"
            if ckpt.holds_a_run(out) else None)
    if what:
        raise UserError(f"--output-dir {out} is {what}: sample's grid and results would land among its files; give "
                        f"a folder of its own (e.g. --output-dir {out.parent / (out.name + '-sample')})")


def evaluate(cfg, specs: list[LoraSpec], *, num_prompts: int, images_per_prompt: int,
             profile_name: str = "custom", numbered_output_dir: bool = False, prompts: list[str] | None = None,
             default_model: str = "") -> dict:
    """Generate, score and write the grid and JSON into ``cfg.output_dir`` (held for this evaluation; a numbered
    default folder taken meanwhile gives way to the next). ``prompts``: the user's own (``--prompt``), else the first
    ``num_prompts`` of ``cfg.prompts``. ``default_model``: why cfg.model is the default (said where a LoRA does not
    fit it). Returns the JSON's content."""
    # a FLUX LoRA on SD1.5 (or the reverse) as the model's files tell: one line, before any note on the model
    flow_sample.check_no_t5_layers([s for s in specs if s.family == "transformer"])
    check_lora_files(specs, cfg.model, cfg.model_components, default=default_model)
    if specs:  # another model's layer widths (an SDXL LoRA on SD1.5): its line before the model loads
        check_adapters_fit_meta_model(cfg, specs, default_model)
    # prompts, reward spec, model path, output dir: checked first
    given = prepare_inputs(cfg, prompts, training=False)
    loading.check_before_load(cfg)  # a sampler or VAE loading would refuse (header reads): before any line on prompts
    chosen = given[:num_prompts]
    if len(given) > num_prompts:  # (a prompt file's other lines were left out without a word)
        log.info("sample: the first %d of the %d prompts of %s (--num-prompts %d for all of them)", num_prompts,
                 len(given), described(cfg), len(given))
    if (note := off_grammar_note(cfg.model, chosen)) is not None:  # as training says it (their rewards are averaged in)
        log.warning("%s", note)
    refuse_a_runs_folder(Path(cfg.output_dir))
    with hold_folder(Path(cfg.output_dir), has_results, numbered=numbered_output_dir) as lock:
        return _evaluate(cfg, specs, chosen, lock.out, num_prompts=num_prompts, images_per_prompt=images_per_prompt,
                         profile_name=profile_name, prompt_set=cfg.prompts if prompts is None else "--prompt",
                         default_model=default_model)


def _evaluate(cfg, specs: list[LoraSpec], prompts: list[str], out: Path, *, num_prompts: int,
              images_per_prompt: int, profile_name: str, prompt_set: str, default_model: str = "") -> dict:
    t0 = time.perf_counter()
    if len(prompts) < num_prompts:
        log.warning("--num-prompts %d: the prompt set %s has %d; using all of them", num_prompts, described(cfg),
                    len(prompts))
    device, weight_dtype, allocator, reward = _device_and_reward(cfg)
    seeds = image_seeds(cfg.seed, len(prompts), images_per_prompt)
    flat_prompts = [p for p in prompts for _ in range(images_per_prompt)]
    flat_seeds = [s for row in seeds for s in row]
    base_images, lora_images, sampler, revision = _render(cfg, specs, prompts, flat_prompts, flat_seeds, device,
                                                          weight_dtype, default_model)  # (lora_images None: no LoRA)
    base_r, lora_r = _scores(cfg, reward, base_images, lora_images, flat_prompts, device)
    base_mean, lora_mean = base_r.mean().item(), None if lora_r is None else lora_r.mean().item()
    results = {
        "model": cfg.model, **({"model_revision": revision} if revision else {}),
        "profile": profile_name, "reward": cfg.reward, "prompts": prompt_set,
        **(read_with(cfg) if prompt_set == cfg.prompts else {}),  # (a table's column and filter: which rows)
        **({"prompts_source": source} if prompt_set == cfg.prompts and (source := read_source(cfg.prompts)) else {}),
        "loras": [s.record() for s in specs],
        "lora_weights_mean": "each adapter adds weight * (its trained weight update) to every layer it adapts"
                             if specs else None,
        "sampler": sampler,
        "seed": cfg.seed, "num_prompts": len(prompts), "images_per_prompt": images_per_prompt,
        "per_prompt": _per_prompt(prompts, seeds, base_r, lora_r, images_per_prompt),
        "base_mean": base_mean, "lora_mean": lora_mean,
        "difference": None if lora_mean is None else lora_mean - base_mean,
        **toy_fidelity(cfg, flat_prompts, base_images, lora_images),
        "grid": SAMPLE_GRID, "device": str(device), "cuda_allocator": allocator,
        "seconds": round(time.perf_counter() - t0, 2),
        "output_dir": str(out.absolute()),
    }
    _write(out, results, prompts, images_per_prompt, (base_images, base_r), (lora_images, lora_r))
    return results


def _device_and_reward(cfg) -> tuple[torch.device, torch.dtype, str, Any]:
    """(device, the frozen weights' dtype, the CUDA allocator's setting, the reward built on the CPU), after the
    host-memory check."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if (mac := unused_apple_gpu_note()):
        log.warning(mac)
    check_host_memory(cfg)  # on a CPU, a model that cannot fit host memory: now, not killed while it loads
    allocator = configure_cuda_allocator(cfg.expandable_segments)  # less memory reserved but unused, as in training
    weight_dtype = precision.frozen_weight_dtype(cfg.mixed_precision, device.type)  # as in training: fp32 on a CPU
    if (fp32 := precision.fp32_instead_note(cfg.mixed_precision, device.type, "rendering in")):  # (as train says it)
        log.warning("%s", fp32)
    # a reward whose weights are missing fails here, before any image is generated; it waits on the CPU until
    # scoring, so the reward model and the diffusion model are never on the GPU together
    reward = rewards.build_reward(cfg.reward, device="cpu", dtype=weight_dtype, checkpointing=False,
                                  weights=cfg.reward_weights)
    return device, weight_dtype, allocator, reward


def _adapted_pipeline(cfg, specs: list[LoraSpec], prompts: list[str], device: torch.device,
                      weight_dtype: torch.dtype, default_model: str):
    """The pipeline with the LoRAs loaded and the denoiser placed, each LoRA checked to fit the model first (its
    family as the files tell it: :func:`evaluate`, before the pipeline is built; a 24 GB transformer is not read for
    nothing)."""
    # SD3/FLUX: the prompts are encoded (by the base text encoders, and by those with the LoRAs' CLIP layers) and
    # the encoders freed before the transformer is read
    pipe = sample_pipeline.build_pipeline(cfg, device, weight_dtype, prompts, specs)
    check_lora_family(pipeline_model(pipe), specs, cfg.model, default=default_model)  # the files'
    # kind unknown before loading (a hub id out of the cache, an SD single file)
    if (cut := pipe._lowmem_family.cut_prompts_note(cfg, prompts)):  # (the trainer says it too)
        log.warning(cut)
    load_adapters(pipe, specs, cfg.model, default_model)  # a LoRA that does not fit: its one line, not a warning first
    warn_other_base(getattr(pipe, "transformer", None) or pipe.unet, specs, cfg)  # fits, but another base's
    sample_pipeline.place_denoiser(pipe, cfg)  # SD3/FLUX: block swap installed over the adapted transformer
    return pipe


def _render(cfg, specs: list[LoraSpec], prompts: list[str], flat_prompts: list[str], flat_seeds: list[int],
            device: torch.device, weight_dtype: torch.dtype, default_model: str) -> tuple[torch.Tensor, ...]:
    """(base images, LoRA images, the sampler's settings dict, a hub id's commit or None): the pipeline loaded and
    adapted, every image rendered without and with the adapters, then the denoiser freed (flow models) or moved off
    the GPU before scoring. No LoRA (``specs`` empty): the model's images once, and None for the LoRA's."""
    pipe = _adapted_pipeline(cfg, specs, prompts, device, weight_dtype, default_model)
    batch = cfg.batch_size  # the profile's training batch fits with gradients, so surely without
    if specs:  # (a pipeline without adapters has no peft layers to switch)
        pipe.disable_lora()
    base_images = generate(pipe, flat_prompts, flat_seeds, cfg, batch)
    lora_images = None
    if specs and not any(s.weight for s in specs):  # (a DoRA, whose weight 0 is not the base, is refused before)
        log.info("every --lora is at weight 0, which adds nothing: the LoRA images are the base model's (rendered "
                 "once)")
        lora_images = base_images
    elif specs:
        mix_adapters(pipe, specs)
        lora_images = generate(pipe, flat_prompts, flat_seeds, cfg, batch, adapted=True)
    sampler, revision = _sampler(pipe, cfg), getattr(pipe, "_lowmem_revision", None)
    if flow_sample.is_flow(pipe):  # freed, not copied back: block swap's blocks are in host memory already
        del pipe
        gc.collect()  # (peft's and block swap's hooks hold reference cycles)
    elif device.type == "cuda" and not cfg.offload_frozen:  # (with offload, the hooks have moved it back)
        pipe.to("cpu")  # the diffusion model leaves the GPU before the reward model arrives
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return base_images, lora_images, sampler, revision


def _sampler(pipe, cfg) -> dict:
    """sample_results.json's ``sampler``: the scheduler and the settings the images were rendered with."""
    scheduler = type(pipe.scheduler).__name__.removesuffix("Scheduler")  # DDIM or FlowMatchEulerDiscrete
    return {"scheduler": scheduler,
            "sample_steps": cfg.sample_steps, "guidance_scale": cfg.guidance_scale,
            # (flow models' Euler steps and pipelines have no eta, rescale or prediction type)
            **(ddim_settings(cfg, pipe.scheduler.config) if scheduler == "DDIM" else {}),
            "resolution": resolution_of(cfg.width, cfg.height),  # (a run of several sizes: its first, rendered)
            "negative_prompt": cfg.negative_prompt}


def _scores(cfg, reward, base_images: torch.Tensor, lora_images: torch.Tensor | None, flat_prompts: list[str],
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reward of every base and LoRA image (None: no LoRA), on ``device``; a NaN or inf among them raises
    UserError."""
    reward.to(device)
    base = "the base model's" if lora_images is not None else "the model's"
    base_r = score(reward, base_images, flat_prompts, device, cfg.batch_size, cfg.reward, base)
    lora_r = None if lora_images is None else score(reward, lora_images, flat_prompts, device, cfg.batch_size,
                                                     cfg.reward, "the LoRA's")
    for name, r in ((base, base_r), ("the LoRA's", lora_r)):
        if r is not None and not torch.isfinite(r).all():  # JSON has no NaN: a result that holds one is a failure
            check = "the LoRA (a diverged run?)" if lora_r is not None else "the model"
            raise UserError(f"the reward {cfg.reward!r} scored {int((~torch.isfinite(r)).sum())} of {name} "
                            f"{r.numel()} images NaN or inf: nothing was written; check {check} and the reward")
    return base_r, lora_r


def _per_prompt(prompts: list[str], seeds: list[list[int]], base_r: torch.Tensor, lora_r: torch.Tensor | None,
                images_per_prompt: int) -> list[dict]:
    """sample_results.json's ``per_prompt``: each prompt's seeds, rewards, their means and lora - base (the LoRA's
    keys null without a LoRA: ``lora_r`` None)."""
    per_prompt = []
    for i, prompt in enumerate(prompts):
        b = base_r[i * images_per_prompt:(i + 1) * images_per_prompt].tolist()
        lo = None if lora_r is None else lora_r[i * images_per_prompt:(i + 1) * images_per_prompt].tolist()
        lora_mean = None if lo is None else sum(lo) / len(lo)
        per_prompt.append({"prompt": prompt, "seeds": seeds[i], "base": b, "lora": lo,
                           "base_mean": sum(b) / len(b), "lora_mean": lora_mean,
                           "difference": None if lo is None else lora_mean - sum(b) / len(b)})
    return per_prompt


def _write(out: Path, results: dict, prompts: list[str], images_per_prompt: int,
           base: tuple[torch.Tensor, torch.Tensor], lora: tuple[torch.Tensor | None, torch.Tensor | None]) -> None:
    """The grid (``base`` and ``lora``: images and rewards; the LoRA's None: one row, the model's) and the results
    into ``out``, an earlier evaluation's replaced (its results removed first)."""
    if has_results(out):  # (a folder the user named; a failure before here leaves no trace: the lock removes it)
        log.warning("%s held an earlier evaluation: replacing it", out)
        # its results go first, the new ones come last: a kill between the two writes left the new grid beside the
        # old results (another seed's scores under its images)
        (out / SAMPLE_RESULTS).unlink()
    out.mkdir(parents=True, exist_ok=True)
    labels = [p if images_per_prompt == 1 else f"#{j} {p}" for p in prompts for j in range(images_per_prompt)]
    alone = lora[0] is None  # no LoRA: the model's row only
    grid.save_sample_grid(out / SAMPLE_GRID, labels, base, None if alone else lora,
                          row_names=("model",) if alone else ("base", "lora"),
                          group=images_per_prompt)  # a prompt's images in one band
    atomic.write_text(out / SAMPLE_RESULTS, json.dumps(results, indent=2, allow_nan=False))  # (checked finite above)


def toy_fidelity(cfg, prompts: list[str], base_images: torch.Tensor, lora_images: torch.Tensor | None) -> dict:
    """In the toy world (docs/toy_world.md): the exact evaluators on both image sets, ``{"fidelity": {"base": ...,
    "lora": ...}}`` (fidelity_* rates over the prompts its grammar parses, jpeg_bytes; ``lora`` null without a
    LoRA); elsewhere nothing."""
    if not applies(cfg.model, prompts):
        return {}
    return {"fidelity": {"base": evaluate_batch(base_images, prompts),
                         "lora": None if lora_images is None else evaluate_batch(lora_images, prompts)}}


def print_summary(r: dict, out: Path) -> None:
    """The evaluation's lines on stdout: the means (base, lora, difference; without a LoRA the model's mean alone),
    the mix, the toy world's exact figures, and the files written."""
    made = len(r["per_prompt"]) * r["images_per_prompt"]
    n, each = r["num_prompts"], r["images_per_prompt"]
    head = (f"reward {r['reward']} over {n} prompt{'s' * (n != 1)} x {each} image{'s' * (each != 1)} "
            f"({r['sampler']['scheduler']} {r['sampler']['sample_steps']} steps, seed {r['seed']}):")
    fid = r.get("fidelity", {})
    if not r["loras"]:  # the model alone: its mean, no comparison
        lines = [head, f"  model {r['base_mean']:.4f}   ({r['model']}, no LoRA)"]
    else:
        mix = " + ".join(f"{d['weight']:g} x {d['path']}" + (f" ({d['weights']})" if "weights" in d else "")
                         for d in r["loras"])
        lines = [head, f"  base {r['base_mean']:.4f}   lora {r['lora_mean']:.4f}   difference {r['difference']:+.4f}",
                 f"  lora = {mix}"]
    if "fidelity_all_ok" in fid.get("base", {}):  # the toy world's exact figures: the model's, or base -> lora
        def rate(key: str, fmt: str) -> str:
            return " -> ".join(format(fid[w][key], fmt) for w in ("base", "lora") if fid.get(w))
        lines.append(f"  exact fidelity (toy world){judged_of(fid['base'], made)}: all right "
                     f"{rate('fidelity_all_ok', '.0%')}, score {rate('fidelity_score', '.3f')}")
    print("\n".join([*lines, f"wrote {out / SAMPLE_GRID} and {out / SAMPLE_RESULTS}"]), flush=True)

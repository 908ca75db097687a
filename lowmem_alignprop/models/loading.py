"""Load the base model's components, add LoRA, and choose attention and checkpointing.

Every source goes through diffusers: the built-in tiny model is a saved diffusers directory, a user's
directory or hub id goes through ``from_pretrained``, a single-file checkpoint through
``from_single_file`` with a config shipped in the package (no network), and ``sd15|sd21|sdxl`` builds
the architecture from that config with random weights (for planning and benchmarks).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowmem_alignprop.memory import quant as q
from lowmem_alignprop.memory.precision import dtype_kwarg
from lowmem_alignprop.models.block_loading import Placement
from lowmem_alignprop.models.pipeline_load import load_pipeline, pipeline_root, snapshot_commit
from lowmem_alignprop.run import hub
from lowmem_alignprop.run.hub import hub_message
from lowmem_alignprop.run.filenames import LORA_BASE_FILE, LORA_WEIGHT_NAME
from lowmem_alignprop.run.tensor_files import is_safetensors
from lowmem_alignprop.settings.errors import UserError, did_you_mean, first_line
from lowmem_alignprop.settings.hub_access import hub_file
from lowmem_alignprop.settings.model_kind import SINGLE_FILE_SUFFIXES, TOY_MODEL_DIR
from lowmem_alignprop.settings.paths import describe as describe_path
from lowmem_alignprop.settings.paths import vae_subfolder
from lowmem_alignprop.settings.paths import kind_of, looks_like_hub_id

log = logging.getLogger(__name__)

ARCH_NAMES = ("sd15", "sd21", "sdxl")


@dataclass
class Components:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    is_sdxl: bool = False
    source: str = ""
    pipeline_class: Any = None
    # SDXL: zero embeddings for an empty negative prompt (the model's model_index.json; SDXL base: true)
    force_zeros_for_empty_prompt: bool = True
    text_encoder_3: Any = None  # SD3's T5 (FLUX's T5 is text_encoder_2)
    tokenizer_3: Any = None
    family: str = "unet"  # "unet" (SD 1.x/2.x/SDXL), "sd3" or "flux": for flow models ``unet`` holds the transformer
    meta: bool = False  # an architecture-only model still on the meta device (the trainer materialises it)
    # SD3/FLUX loaded with transformer_last: reads the checkpoint's transformer (``unet`` is empty on meta until
    # read_transformer calls it)
    pending: Any = None
    revision: str | None = None  # a hub id's: the commit its snapshot holds (pinned by cfg.revision, or main's)
    # a transformer file's model_components given as a hub id: the commit of the snapshot its parts came from
    components_revision: str | None = None
    vae_revision: str | None = None  # a hub id vae's: the commit its snapshot holds (cfg.vae_revision's, or main's)

    @property
    def transformer(self):
        return self.unet

    def text_encoders(self) -> tuple:
        return tuple(m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None)

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """The VAE and the text encoders still loaded (SD3/FLUX free theirs once the prompt set is encoded)."""
        mods = {"vae": self.vae, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                "text_encoder_3": self.text_encoder_3}
        return {name: m for name, m in mods.items() if m is not None}


_PASS_A_MODEL = ("pass an existing diffusers directory, a .safetensors/.ckpt file, a hub id (owner/name), or leave "
                 "--model out for the shipped toy world")


def resolve_model(spec: str) -> tuple[str, str]:
    """Classify a --model value as (kind, location): tiny, arch, dir, file or hub (``toy``: the shipped directory).
    Raises UserError."""
    if spec in ("", "tiny"):
        return "tiny", "tiny"
    if spec == "toy":
        return "dir", str(TOY_MODEL_DIR)
    if spec in ARCH_NAMES:
        return "arch", spec
    from lowmem_alignprop.models import flow_loading

    if spec in flow_loading.FLOW_ARCHS:
        return "flow_arch", spec
    path = Path(os.path.expanduser(spec))
    if path.is_dir() and flow_loading.is_flow_dir(path):
        flow_loading.check_flow_dir(path, spec)  # SD3/SD3.5 or FLUX.1: every listed component has its folder
        return "flow_dir", str(path)
    if path.is_dir():
        from lowmem_alignprop.models.model_check import check_model_dir
        check_model_dir(path, spec)  # a complete SD text-to-image model, from its JSON files alone
        return "dir", str(path)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise UserError(f"{spec} is a file but not a checkpoint: pass a .safetensors or .ckpt file")
        return "file", str(path)
    if kind_of(path) not in ("missing",):  # /dev/null, a dangling symlink, a loop: said as what it is
        raise UserError(f"model path {spec} {describe_path(path)}: {_pass_a_model(spec)}")
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES or not looks_like_hub_id(spec):
        from lowmem_alignprop.settings.model_kind import NAMED_KINDS
        near = did_you_mean(spec, NAMED_KINDS) if "/" not in spec else ""  # (a shipped name mistyped: tinyy)
        raise UserError(f"model path {spec} does not exist{near}: {_pass_a_model(spec)}")
    return "hub", spec


def _pass_a_model(spec: str) -> str:
    """The fix for a model path that is none; for one the environment names (no --model given, an exported variable
    forgotten in a shell), that variable (the line said to leave out the --model the user never gave)."""
    from lowmem_alignprop.settings.config import MODEL_ENV

    if os.environ.get(MODEL_ENV, "").strip() != spec:
        return _PASS_A_MODEL
    return f"it is ${MODEL_ENV}'s model: set that to one that is, or unset it for the shipped toy world"


def _load_error(cfg, kind: str, where: str, e: BaseException) -> UserError:
    """The one line for a model that does not load: the hub's own message for a hub id, else the path's."""
    if kind == "hub":
        return UserError(hub_message("model", where, e, revision=getattr(cfg, "revision", "")))
    return UserError(f"could not load model {cfg.model!r}: {first_line(e)}. Check the path")


def _no_vae_weights(spec: str) -> str:
    return (f"vae={spec} holds no VAE weights (a UNet's, a LoRA's or another part's file?): pass a VAE file, a VAE "
            "folder or a hub id, or leave vae empty for the model's own")


def check_vae_file(spec: str) -> None:
    """A ``.safetensors`` file given as ``vae``, from its header: readable, with a VAE decoder's weights (diffusers'
    ``decoder.*`` or a whole checkpoint's ``first_stage_model.decoder.*``)."""
    from lowmem_alignprop.run.tensor_files import TensorFileError, is_safetensors, not_safetensors, \
        read_safetensors_shapes

    path = Path(os.path.expanduser(spec))
    if not (path.is_file() and is_safetensors(path)):
        return
    try:
        keys = read_safetensors_shapes(path)
    except (TensorFileError, OSError) as e:
        raise UserError(f"vae={spec}: {not_safetensors(path, e)}: pass a VAE file, a VAE folder or a hub id") from None
    if not any("decoder.conv_in." in key for key in keys):
        raise UserError(_no_vae_weights(spec))


def check_before_load(cfg) -> dict | None:
    """What loading would refuse for ``cfg``, told from the files before any weight loads (`plan` and training
    alike): a ``vae`` file of no VAE; of a UNet model, a single file without a VAE when none is named, a sampler
    ``sampler_check.run_scheduler`` refuses. Returns the DDIM sampler's config the run will sample with (`plan`
    shows it); None where only loading tells (a hub id) and for SD3/FLUX (Euler steps)."""
    from lowmem_alignprop.models.arch import lacks_vae
    from lowmem_alignprop.models.sampler_check import files_scheduler_config, run_scheduler

    if getattr(cfg, "vae", ""):
        check_vae_file(cfg.vae)  # (plan planned the model's own VAE for any file)
    kind, where = resolve_model(cfg.model)
    if is_flow_source(cfg, kind, where):
        return None
    config = files_scheduler_config(cfg, kind, where)  # (a single file's architecture told first: a LoRA file...)
    if kind == "file" and not getattr(cfg, "vae", "") and lacks_vae(where):  # (plan planned the file's arch's VAE)
        raise UserError(f"{cfg.model} holds no VAE weights (a \"no-vae\" checkpoint): name a VAE to decode with, "
                        "--set vae=DIR|FILE|HUB_ID (e.g. the model family's own VAE), or use a full checkpoint")
    return None if config is None else dict(run_scheduler(cfg, config, kind, where).config)


def load_components(cfg, weight_dtype: torch.dtype = torch.float32, device: torch.device | None = None, *,
                    transformer_last: bool = False) -> Components:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and the DDIM scheduler for ``cfg.model``. ``device``: where the
    trainer runs; an SD3/FLUX transformer from a real checkpoint is then read to it block by block
    (:func:`_placement`), after the rest, or only when :func:`read_transformer` is called (``transformer_last``)."""
    kind, where = resolve_model(cfg.model)
    check_before_load(cfg)  # what the model's files and a VAE file's header tell, refused before weights are read
    if is_flow_source(cfg, kind, where):
        return with_vae_commit(load_flow_components(cfg, kind, where, weight_dtype, device,
                                                    transformer_last=transformer_last), cfg)
    if kind == "tiny":
        from lowmem_alignprop.models.tiny import tiny_model_dir
        kind, where = "dir", str(tiny_model_dir())
    _check_quant(cfg)  # before anything loads
    revision = getattr(cfg, "revision", "") if kind == "hub" else ""
    predicts = getattr(cfg, "prediction_type", "auto")  # (auto: as the model's scheduler config says)
    quant = _bnb_mode(cfg)  # int8/nf4 load quantized; fp8 is applied after LoRA (step.apply_memory_features)
    if kind == "arch":
        from lowmem_alignprop.models.arch import build_random_components
        parts = build_random_components(where, device="cpu", dtype=weight_dtype)
        comps = Components(**{k: v for k, v in parts.items() if k in Components.__dataclass_fields__},
                           is_sdxl=where == "sdxl", source=f"{where} (random weights)")
    else:
        if kind == "hub":
            hub.offline()  # no network: diffusers reads the local cache only and fails at once, not after retries
        try:
            if kind == "file":
                pipe = load_single_file_with_vae(where, cfg.model_arch, weight_dtype, getattr(cfg, "vae", ""),
                                                 getattr(cfg, "vae_revision", ""))
                from lowmem_alignprop.run.runlock import global_rank
                from lowmem_alignprop.models.arch import marked_v_prediction
                if pipe.scheduler.config.get("prediction_type") == "v_prediction" and predicts == "auto" and \
                        global_rank() == 0 and not marked_v_prediction(where):
                    logging.getLogger("lowmem_alignprop").warning(  # (the file's keys cannot tell the two apart)
                        "%s loads as SD 2.x 768 px, which predicts v: an SD 2.x 512-px base checkpoint (or its "
                        "fine-tune) predicts noise (epsilon) and would be sampled wrongly; for one, add --set "
                        "prediction_type=epsilon", where)
            elif quant != "none":
                # the frozen UNet's Linear layers load quantized (diffusers' BitsAndBytesConfig); the rest as usual
                from lowmem_alignprop.settings.paths import component_variant
                root = pipeline_root(where, kind == "hub", revision)  # (a hub id: its snapshot at revision)
                variant = component_variant(root / "unet")  # (only fp16 files: theirs)
                unet = q.load_quantized_unet(str(root), quant, weight_dtype, variant=variant)
                pipe = load_pipeline(str(root), weight_dtype, named=where, unet=unet, safety_checker=None)
            else:
                pipe = load_pipeline(where, weight_dtype, hub_id=kind == "hub", revision=revision, safety_checker=None)
        except UserError:
            raise
        except (OSError, ValueError, EnvironmentError) as e:
            raise _load_error(cfg, kind, where, e) from None
        if type(pipe).__name__ in ("StableDiffusion3Pipeline", "FluxPipeline"):  # a hub id of a flow model
            flow = flow_components(pipe, cfg, where, weight_dtype)
            flow.revision = snapshot_commit(pipe.config.get("_name_or_path"))
            return with_vae_commit(flow, cfg)
        if kind == "dir":
            from lowmem_alignprop.models.arch import _check_loaded
            _check_loaded(pipe, where, Path(where))  # e.g. a tokenizer that loaded with 2 tokens
        comps = Components(unet=getattr(pipe, "unet", None), vae=getattr(pipe, "vae", None),
                           text_encoder=getattr(pipe, "text_encoder", None), tokenizer=getattr(pipe, "tokenizer", None),
                           scheduler=pipe.scheduler, text_encoder_2=getattr(pipe, "text_encoder_2", None),
                           tokenizer_2=getattr(pipe, "tokenizer_2", None),
                           is_sdxl=getattr(pipe, "text_encoder_2", None) is not None, source=where,
                           pipeline_class=type(pipe),
                           force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
                           revision=snapshot_commit(pipe.config.get("_name_or_path")) if kind == "hub" else None)
    if comps.unet is None or comps.vae is None or comps.text_encoder is None:
        raise UserError(f"{cfg.model} is not a Stable Diffusion model (needs unet, vae and text_encoder): "
                        "supported are SD 1.x, SD 2.x and SDXL")
    from lowmem_alignprop.models.model_check import check_loaded
    check_loaded(comps, cfg.model)  # an inpainting UNet, or a text encoder of another model
    if quant != "none":
        q.quantize_unet(comps, quant, weight_dtype)  # in-memory models (sd15|sd21|sdxl, single files): swap in place
    if getattr(cfg, "vae", "") and kind != "file":  # (a single file's was read with it)
        comps.vae = load_vae(cfg.vae, weight_dtype, comps.vae, getattr(cfg, "vae_revision", ""))
    _say_consistency_sampler(comps.scheduler, cfg.model)
    # DDIM with the model's schedule (and prediction type, unless --set prediction_type says it), x0 never clamped
    from lowmem_alignprop.models.sampler_check import run_scheduler
    comps.scheduler = run_scheduler(cfg, comps.scheduler.config, kind, where)
    if comps.pipeline_class is None:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        comps.pipeline_class = StableDiffusionXLPipeline if comps.is_sdxl else StableDiffusionPipeline
    return with_vae_commit(comps, cfg)


def with_vae_commit(comps: Components, cfg) -> Components:
    """``comps`` with ``vae_revision`` set: the commit of a hub id vae's snapshot the VAE was read from (pinned by
    cfg.vae_revision, or main's), as the local cache holds it after loading; None for none, a file or a folder."""
    comps.vae_revision = hub_vae_commit(getattr(cfg, "vae", ""), getattr(cfg, "vae_revision", ""))
    return comps


def hub_vae_commit(spec: str, revision: str = "") -> str | None:
    """The commit of hub id ``spec``'s snapshot at ``revision`` ("": main) in the local cache (a VAE's repository,
    or a pipeline's whose vae/ it is), else None (no hub id, or not cached)."""
    if not spec or kind_of(Path(spec).expanduser()) != "missing" or not looks_like_hub_id(spec):
        return None
    found = hub_file(spec, "model_index.json", revision=revision) or hub_file(spec, "config.json", revision=revision)
    return snapshot_commit(found.parent) if found is not None else None


# the samplers of consistency-distilled models (LCM-LoRA fused, DMD2, Hyper-SD, TCD), which DDIM does not stand in for
CONSISTENCY_SAMPLERS = ("LCMScheduler", "TCDScheduler")


def _say_consistency_sampler(scheduler, model: str) -> None:
    """AlignProp samples (and differentiates) with DDIM on the model's noise schedule, whatever sampler its folder
    names: the same images for the usual ones (PNDM, Euler, DPM++ at enough steps), not for a model distilled for a
    consistency sampler, whose few-step images DDIM blurs. Said once, by the first process."""
    from lowmem_alignprop.run.runlock import global_rank

    name = type(scheduler).__name__
    if name in CONSISTENCY_SAMPLERS and global_rank() == 0:
        logging.getLogger("lowmem_alignprop").warning(
            "%s ships %s, a consistency model's few-step sampler: AlignProp samples and trains with DDIM on its "
            "noise schedule instead, which may render such a model (LCM-LoRA fused, DMD2, Hyper-SD) blurred at "
            "few steps; check the \"before\" samples, or raise sample_steps", model, name)


def is_flow_source(cfg, kind: str, where: str) -> bool:
    """An SD3/FLUX model (resolve_model's ``kind`` and ``where``): a shipped architecture or folder, a file or hub id
    with model_components, a transformer file alone (the flow loader then asks for model_components), a hub id whose
    model_index.json says so. The one rule for the loader and the planner's meta model."""
    return kind.startswith("flow") or (kind in ("file", "hub") and bool(getattr(cfg, "model_components", ""))) \
        or (kind == "file" and is_flow_transformer_file(where)) \
        or (kind == "hub" and is_flow_hub_id(where, getattr(cfg, "revision", "")))


def is_flow_transformer_file(path: str) -> bool:
    """A .safetensors file holding an SD3/FLUX transformer alone (it then needs model_components)."""
    from lowmem_alignprop.models import flow_loading as fl

    if not is_safetensors(path):
        return False
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
        fl.transformer_layout(keys)
    except Exception:  # noqa: BLE001 - not a flow transformer: the SD single-file path reports what it is
        return False
    return not any(k.startswith(("model.diffusion_model.input_blocks", "conditioner.", "cond_stage_model."))
                   for k in keys)


def is_flow_hub_id(repo: str, revision: str = "") -> bool:
    """A hub id whose model_index.json (from the cache, or downloaded when the hub can be reached: a few hundred
    bytes) names an SD3/FLUX pipeline. Told before loading (and planning), so a quantized base loads the
    transformer's way, not the UNet's."""
    from lowmem_alignprop.models import flow_loading as fl

    # None: the usual load says what it is
    index = hub_file(repo, "model_index.json", download=not hub.offline(), revision=revision)
    return index is not None and fl.is_flow_dir(index.parent)


def _placement(cfg, quant: str, dtype: torch.dtype, device) -> Placement:
    """Where a real SD3/FLUX checkpoint's transformer is read to, one block at a time (block_swap's blocks to the
    CPU): an int8/nf4 base to its CUDA device, quantized as it is read; a full-precision one to the ``device`` of
    the trainer or ``sample``, else the CPU (``export``; under DeepSpeed, which places the model itself). An fp8
    base (``base_quant=fp8`` and a ``device``) is stored in fp8 block by block as it is read, but the LoRA targets
    (bf16 until LoRA is added; step.apply_memory_features stores them): never the whole bf16 model on the card."""
    host = getattr(cfg, "block_swap", 0)
    if quant != "none":
        return Placement(quant, dtype, q.target_device(), host)
    to = device if device is not None and not getattr(cfg, "deepspeed_zero", 0) else "cpu"
    if getattr(cfg, "base_quant", "none") == "fp8" and device is not None:
        from lowmem_alignprop.models.lora_layers import lora_targets
        return Placement("fp8", dtype, torch.device(to), host,
                         tuple(lora_targets(getattr(cfg, "lora_layers", "attention"), flow=True)))
    return Placement("none", dtype, torch.device(to), host)


def load_flow_components(cfg, kind: str, where: str, weight_dtype: torch.dtype, device=None, *,
                         transformer_last: bool = False) -> Components:
    """SD3/SD3.5 or FLUX.1: a diffusers folder or hub id, a single-file transformer with the rest from
    ``model_components``, or a shipped architecture on the meta device (docs/flow_models.md). ``device``: the
    trainer's (:func:`_placement`). ``transformer_last``: a checkpoint's transformer is left empty (on meta) with
    its reader in ``comps.pending`` (:func:`read_transformer`), for the trainer to encode its prompts first."""
    from lowmem_alignprop.models import flow_loading as fl

    t5 = getattr(cfg, "t5_encoder", True)
    from lowmem_alignprop.settings.config import flow_prediction, unet_sampler_settings

    if unet_sampler_settings(cfg):  # (Config.validate said it where the files told)
        raise UserError(flow_prediction(cfg))
    _check_quant(cfg)  # before anything loads
    quant = _bnb_mode(cfg)
    read = None
    if kind == "flow_arch":
        # random weights for planning and benchmarks: built on meta (nothing allocated); the trainer materialises
        # them on its device, so a 12B model is never initialised on the CPU
        pipe = fl.build_flow_components(where, device="meta", dtype=weight_dtype, t5=t5)
        source = f"{where} (random weights)"
    else:
        if kind == "hub":
            hub.offline()
        # read block by block to where it runs: FLUX's 23.8 GB of bf16 never sit in host memory at once; block
        # swap's host blocks go to the CPU (an int8/nf4 base quantized there), where they stay
        place = _placement(cfg, quant, weight_dtype, device)
        try:
            if kind == "file":
                pipe, read = fl.load_flow_single_file(where, cfg.model_components, weight_dtype, t5=t5, place=place,
                                                      revision=getattr(cfg, "components_revision", ""))
            else:
                pipe, read = fl.load_flow_pipeline(where, weight_dtype, t5=t5, place=place,
                                                   revision=getattr(cfg, "revision", "") if kind == "hub" else "")
        except UserError:
            raise
        except (OSError, ValueError, EnvironmentError) as e:
            raise _load_error(cfg, kind, where, e) from None
        source = where
    comps = flow_components(pipe, cfg, source, weight_dtype, meta=kind == "flow_arch")
    if kind == "hub":
        comps.revision = snapshot_commit(pipe.config.get("_name_or_path"))
    elif kind == "file":  # its parts' folder: a hub id's (or a path to a cache snapshot's) commit
        comps.components_revision = snapshot_commit(pipe.config.get("_name_or_path"))
    if read is not None:
        comps.pending = lambda: _quantize_whole(read(), cfg, quant, weight_dtype)
        if not transformer_last:
            read_transformer(comps)
    elif not comps.meta:
        _quantize_whole(comps.unet, cfg, quant, weight_dtype)
    return comps


def read_transformer(comps: Components) -> None:
    """A checkpoint's transformer left for later (``transformer_last``) is read now, to where it runs."""
    if comps.pending is not None:
        comps.unet, comps.pending = comps.pending(), None


def _quantize_whole(transformer, cfg, quant: str, weight_dtype: torch.dtype):
    """int8/nf4 for a transformer diffusers loaded whole (a .bin folder, a layout block_loading does not read): a
    meta model is quantized as it is materialised (family.materialize_meta), a block-by-block read as it is read."""
    if quant == "none" or q.count_quantized(transformer)[quant]:
        return transformer
    from lowmem_alignprop.memory.block_swap import swappable_blocks
    # block_swap's host blocks are quantized on the CPU, where they stay: never all on the device at once
    host = swappable_blocks(transformer)[:cfg.block_swap] if getattr(cfg, "block_swap", 0) else []
    for block in host:
        q.quantize_in_place(block, quant, weight_dtype, device="cpu", quiet=True)
    q.quantize_in_place(transformer, quant, weight_dtype, stay=host)  # the other Linear layers, one at a time
    return transformer


def _check_quant(cfg) -> None:
    """Any base_quant can be used here (bitsandbytes importable and a CUDA device present for int8/nf4), or a
    UserError naming the fix: the loaders call it before anything loads."""
    mode = getattr(cfg, "base_quant", "none")
    if mode != "none":
        q.check_mode(mode)


def _bnb_mode(cfg) -> str:
    """The bitsandbytes mode the denoiser loads with (int8/nf4), else "none" (fp8 storage comes after LoRA).
    A query: it checks nothing (:func:`_check_quant` does)."""
    mode = getattr(cfg, "base_quant", "none")
    return mode if mode in q.BNB_MODES else "none"


def flow_components(pipe, cfg, source: str, weight_dtype: torch.dtype, *, meta: bool = False) -> Components:
    """The Components record of a loaded SD3/SD3.5 or FLUX.1 pipeline."""
    from lowmem_alignprop.models import flow_loading as fl

    family = fl.FLOW_PIPELINES.get(type(pipe).__name__)
    if family is None:
        raise UserError(f"{cfg.model} is a {type(pipe).__name__}, not an SD3/SD3.5 or FLUX.1 pipeline")
    comps = Components(unet=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder,
                       tokenizer=pipe.tokenizer, scheduler=pipe.scheduler,
                       text_encoder_2=getattr(pipe, "text_encoder_2", None),
                       tokenizer_2=getattr(pipe, "tokenizer_2", None),
                       text_encoder_3=getattr(pipe, "text_encoder_3", None),
                       tokenizer_3=getattr(pipe, "tokenizer_3", None), source=source,
                       pipeline_class=type(pipe), family=family, meta=meta)
    if getattr(cfg, "vae", ""):
        comps.vae = load_vae(cfg.vae, weight_dtype, comps.vae, getattr(cfg, "vae_revision", ""))
    return comps


def load_single_file_with_vae(where: str, arch: str, dtype: torch.dtype, vae: str = "", vae_revision: str = ""):
    """A single-file model's pipeline (models/arch.load_single_file), with ``--set vae``'s VAE (``vae``, a hub id's
    at ``vae_revision``) read first: it takes the file's VAE's place (a "no-vae" file has none), checked against the
    architecture's VAE config."""
    from lowmem_alignprop.models.arch import load_single_file, single_file_config, vae_of_config

    own = load_vae(vae, dtype, vae_of_config(single_file_config(where, arch)[1]), vae_revision) if vae else None
    return load_single_file(where, arch=arch, torch_dtype=dtype, vae=own)


def load_vae(spec: str, dtype: torch.dtype, own_vae, revision: str = "") -> Any:
    """A replacement VAE (config field ``vae``): a diffusers folder (or a pipeline folder with ``vae/``), a hub
    id such as madebyollin/sdxl-vae-fp16-fix (SDXL's VAE retrained not to overflow in fp16; its snapshot at
    ``revision``, vae_revision: "" main), or a single .safetensors file (read with the model's own VAE config).
    Raises UserError."""
    import tempfile

    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    from lowmem_alignprop.settings.config import vae_path_problem

    if problem := vae_path_problem(spec):  # (Config.validate said it; a path may have gone since)
        raise UserError(problem)
    path = Path(os.path.expanduser(spec))
    try:
        if path.is_dir():
            vae = AutoencoderKL.from_pretrained(path, subfolder=vae_subfolder(path), **dtype_kwarg(dtype))
        elif path.is_file():
            with tempfile.TemporaryDirectory() as tmp:
                own_vae.save_config(Path(tmp) / "vae")  # the file holds weights only: use the model's VAE config
                vae = AutoencoderKL.from_single_file(str(path), config=tmp, subfolder="vae", local_files_only=True,
                                                     **dtype_kwarg(dtype))
        else:  # a hub id (vae_path_problem: no path)
            offline = hub.offline()  # no network: the local cache only, at once
            # a whole pipeline's repository (its VAE in vae/, as a folder's): it said 'not in the local cache'
            pipeline = hub_file(spec, "model_index.json", download=not offline, revision=revision) is not None
            vae = AutoencoderKL.from_pretrained(spec, subfolder="vae" if pipeline else None, local_files_only=offline,
                                                revision=revision or None, **dtype_kwarg(dtype))
    except UserError:
        raise
    except SingleFileComponentError:  # (a UNet's, a LoRA's or a text encoder's file)
        raise UserError(_no_vae_weights(spec)) from None
    except (OSError, ValueError, RuntimeError) as e:
        if not path.exists():
            raise UserError(hub_message("vae", spec, e, use="--set vae=DIR", revision=revision)) from None
        if any(s in str(e) for s in ("meta tensor", "size mismatch", "Missing key", "expected shape")):
            raise UserError(f"vae={spec}: its weights do not fit the model's VAE architecture (other layer sizes): "
                            "use a VAE made for this model, or leave vae empty for the model's own") from None
        raise UserError(f"could not load vae={spec!r}: {first_line(e)}. It must be a VAE for this model "
                        "(same latent channels and layer sizes)") from None
    if vae.config.latent_channels != own_vae.config.latent_channels:
        raise UserError(f"vae={spec} has {vae.config.latent_channels} latent channels, the model's VAE "
                        f"{own_vae.config.latent_channels}: use a VAE made for this model")
    from lowmem_alignprop.models.sampling import vae_scale_factor
    theirs, ours = vae_scale_factor(vae), vae_scale_factor(own_vae)
    if theirs != ours:  # the UNet would run on latents of another size than it was trained on
        raise UserError(f"vae={spec} downsamples images {theirs}x, the model's VAE {ours}x: use a VAE made for "
                        "this model")
    log.info("VAE: %s%s instead of the model's own", spec, f" at revision {revision}" if revision else "")
    return vae


def choose_vae_dtype(vae, weight_dtype: torch.dtype, device: torch.device, is_sdxl: bool) -> torch.dtype:
    """SDXL's stock VAE overflows in fp16 (its config says force_upcast). Decode in bf16 where the GPU has it
    (same memory as fp16, fp32's range), else in fp32, and say what that costs. Casts ``vae``; returns its dtype.
    The fp16-fix VAE (``--set vae=madebyollin/sdxl-vae-fp16-fix``, force_upcast false) stays in fp16."""
    if not (is_sdxl and weight_dtype == torch.float16 and vae.config.get("force_upcast", False)):
        return vae.dtype
    # planning for a CUDA target on a machine without one (the planner): assume a card with bf16 (Ampere or newer)
    has_bf16 = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else device.type == "cuda"
    if device.type == "cuda" and has_bf16:
        vae.to(torch.bfloat16)  # same bytes as fp16, no overflow
        log.warning("SDXL's VAE overflows in fp16: decoding in bf16 instead (same memory as fp16)")
        return torch.bfloat16
    vae.to(torch.float32)  # no bf16 on this device: fp32 doubles the VAE's weights and its decode activations
    extra = module_bytes(vae) / 2 / 2**20
    log.warning("SDXL's VAE overflows in fp16 and this device has no bf16: decoding in fp32 (+%.0f MiB weights, "
                "about twice the decode/backward activation memory); --set vae=madebyollin/sdxl-vae-fp16-fix "
                "keeps it in fp16", extra)
    return torch.float32


def set_attention(unet, vae, attention: str, device: torch.device) -> str:
    """Choose the attention kernel; returns what is actually used (xformers falls back to sdpa)."""
    if attention == "xformers":
        try:
            if device.type != "cuda":
                raise RuntimeError("xformers runs only on CUDA devices")
            import xformers  # noqa: F401
            unet.enable_xformers_memory_efficient_attention()
            vae.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as e:  # ImportError, or xformers' own CUDA checks
            log.warning("attention=xformers unavailable (%s): falling back to sdpa", first_line(e, 120))
            attention = "sdpa"
    if attention == "sliced":
        unet.set_attention_slice("auto")  # one attention head slice at a time: lowest memory, slowest
        return "sliced"
    from diffusers.models.attention_processor import AttnProcessor2_0
    unet.set_attn_processor(AttnProcessor2_0())  # fused scaled-dot-product attention: no n^2 score tensor kept
    return "sdpa"


def add_lora(unet, rank: int, alpha: float | None, seed: int, layers: str = "attention") -> list[torch.nn.Parameter]:
    """Add peft LoRA adapters to the UNet's ``layers`` (models/lora_layers.py); only they train. Returns their
    parameters."""
    from lowmem_alignprop.models.lora_layers import add_adapter

    params = add_adapter(unet, rank, alpha, seed, layers, flow=False)
    if getattr(unet, "is_loaded_in_4bit", False) or getattr(unet, "is_loaded_in_8bit", False):
        q.prepare_quantized_layers(unet)  # a quantized layer and its adapter share one fp16 input under autocast
    return params


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The LoRA weights in diffusers' key format."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def write_checkpoint_lora(checkpoint: Path, folder: Path) -> Path:
    """A training checkpoint's LoRA written as the run writes ``lora/`` at its end (the weights in diffusers'
    layout with the adapter config, base_model.json; the EMA's weights where the run's outputs are the EMA's), so
    that anything that reads a run's LoRA reads any step.
    Returns the weights file. A damaged checkpoint or a full fine-tune's raises UserError."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import load_file

    from lowmem_alignprop.models.lora_layers import lora_config
    from lowmem_alignprop.models.lora_metadata import lora_metadata
    from lowmem_alignprop.run import checkpoint as ckpt
    from lowmem_alignprop.run import base_fingerprint

    instead = "pass another step's checkpoint or the run's lora/ folder"
    if (newer := ckpt.newer_version(checkpoint, instead)) is not None:
        raise newer
    problem = ckpt.verify(checkpoint)
    if problem:
        raise UserError(f"checkpoint {checkpoint} is incomplete or corrupt: {problem}; {instead}")
    state = ckpt.read_state(checkpoint)
    run_cfg = state.get("config", {})
    if run_cfg.get("train_unet", "lora") != "lora":
        raise UserError(f"checkpoint {checkpoint} is of a full UNet fine-tune (train_unet=full), not a LoRA: resume "
                        f"it with --resume {checkpoint} and use the unet/ folder it writes")
    saved = load_file(str(ckpt.output_weights_file(checkpoint, run_cfg)))  # with ema_outputs the EMA's, as lora/
    # peft's parameter names carry the adapter's name ("lora_A.default.weight"); its state dicts do not
    weights = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
               for k, v in saved.items()}
    if not weights or any(not k.endswith((".lora_A.weight", ".lora_B.weight")) for k in weights):
        raise UserError(f"checkpoint {checkpoint} holds weights other than LoRA adapters: it is not a LoRA run's")
    rank = run_cfg.get("lora_rank") or 4
    # an SD3/FLUX transformer's blocks: saved as its pipeline saves them (peft's keys under transformer.)
    flow = all(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in weights)
    # a checkpoint from before lora_layers existed trained the attention projections
    config = lora_config(rank, run_cfg.get("lora_alpha"), run_cfg.get("lora_layers") or "attention", flow)
    folder.mkdir(parents=True, exist_ok=True)
    # with the layers the run keeps as its --init-lora had them (the checkpoint holds their copy)
    from lowmem_alignprop.models.kept_lora import read_kept, save_with_kept
    kept = read_kept(None, folder=checkpoint)
    if flow:
        from diffusers import StableDiffusion3Pipeline  # FluxPipeline writes the same keys and header
        save_with_kept(StableDiffusion3Pipeline, folder, weights, lora_metadata(config, layers=weights), kept,
                       denoiser="transformer")
    else:
        from diffusers import StableDiffusionXLPipeline  # (the one with SDXL's second text encoder's argument)
        writer = StableDiffusionXLPipeline if any(k.startswith("text_encoder_2.") for k in kept) else \
            StableDiffusionPipeline
        save_with_kept(writer, folder, convert_state_dict_to_diffusers(weights), lora_metadata(config), kept)
    record = base_fingerprint.base_record(state.get("fingerprint", {}), run_cfg, state.get("prompt_sources"),
                                          state.get("reward_sha"))
    (folder / LORA_BASE_FILE).write_text(record, encoding="utf-8")
    return folder / LORA_WEIGHT_NAME


def module_bytes(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def apply_speed_features(unet, vae, cfg, device: torch.device) -> None:
    """The speed fields that act on the loaded modules (after LoRA is added); none changes results beyond
    rounding, none saves memory. ``compile=nograd`` is :func:`nograd_unet`'s."""
    if cfg.channels_last:
        # NHWC weights: tensor-core convolutions without layout transposes (same values, other strides)
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if cfg.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on TF32 tensor cores (10-bit mantissa inputs)
        torch.backends.cudnn.allow_tf32 = True
    elif cfg.tf32:  # as fp16 and xformers off a GPU: said, not silently dropped
        log.warning("tf32 uses NVIDIA tensor cores: off on %s (the run computes in full fp32)", device.type)
    if cfg.compile == "regional":
        # regional compilation: each repeated transformer block compiled in place (diffusers' _repeated_blocks),
        # one compile reused by every block of the same shape, for no-grad, grad and recompute calls alike.
        # diffusers lists none for SD3 (compile_repeated_blocks raised 'attribute is empty' after the model loaded):
        # its joint blocks are the ones it repeats
        if not getattr(unet, "_repeated_blocks", None) and hasattr(unet, "transformer_blocks"):
            unet._repeated_blocks = sorted({type(b).__name__ for b in unet.transformer_blocks})
        unet.compile_repeated_blocks()


def nograd_unet(unet, cfg):
    """The UNet the no-grad sampling steps call: with ``compile=nograd`` a torch.compile'd view of the same module
    (same weights: the LoRA updates are seen), else the module itself."""
    if cfg.compile != "nograd":
        return unet
    return torch.compile(unet)

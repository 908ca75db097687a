"""Shipped Stable Diffusion architectures and offline single-file checkpoint loading.

The package ships diffusers-layout config directories for SD 1.5, SD 2.1 (768-v) and SDXL base 1.0
in ``lowmem_alignprop/arch/<name>`` (config files only, no weights, no tokenizer vocabulary). The
CLIP BPE vocabulary ships once, as ``lowmem_alignprop/data/bpe_simple_vocab_16e6.txt.gz``; on first
use :func:`arch_config_dir` assembles a complete config directory (configs + ``vocab.json`` +
``merges.txt`` for every tokenizer) under ``cache_root()/arch/<name>``.

Such a directory is what diffusers' ``from_single_file(path, config=dir)`` needs to load an original
LDM-layout ``.safetensors``/``.ckpt`` checkpoint without touching the network, and what
:func:`build_random_components` builds random-weight (or meta) models from for the memory planner
and GPU benchmarks.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType

import torch

from lowmem_alignprop.memory.precision import dtype_kwarg
from lowmem_alignprop.run.tensor_files import TensorFileError, is_safetensors, read_safetensors_shapes, read_tensor_file
from lowmem_alignprop.settings.errors import UserError, first_line
from lowmem_alignprop.settings.paths import model_index, scheduler_config
from lowmem_alignprop.settings.paths import pipeline_class as indexed_pipeline_class

ARCHS = ("sd15", "sd21", "sdxl")

ARCH_DESCRIPTIONS = {
    "sd15": "Stable Diffusion 1.x (CLIP ViT-L/14 text encoder, 512 px)",
    "sd21": "Stable Diffusion 2.x (OpenCLIP ViT-H/14 text encoder, 768 px v-prediction)",
    "sdxl": "Stable Diffusion XL base 1.0 (CLIP-L + OpenCLIP bigG text encoders, 1024 px)",
}
CLIP_VOCAB_SIZE = 49408

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the package root: arch/ and data/ ship there
_SHIPPED_DIR = _PACKAGE_DIR / "arch"
_BPE_FILE = _PACKAGE_DIR / "data" / "bpe_simple_vocab_16e6.txt.gz"
_FORMAT_VERSION = "1"  # bump when the way the cache directory is assembled changes

_SUPPORTED = "; ".join(f"{k}: {v}" for k, v in ARCH_DESCRIPTIONS.items())


def _check_name(name: str) -> str:
    if name not in ARCHS:
        raise UserError(f"unknown architecture {name!r}: choose one of {', '.join(ARCHS)} ({_SUPPORTED})")
    return name


def _tokenizer_folders(name: str) -> tuple[str, ...]:
    return ("tokenizer", "tokenizer_2") if name == "sdxl" else ("tokenizer",)


# --------------------------------------------------------------------------------------------------
# CLIP BPE vocabulary
# --------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """The OpenAI CLIP tokenizer vocabulary, derived from the shipped BPE merges file.

    Returns ``(vocab, merges)``: ``vocab`` maps the 49408 tokens to ids (256 byte symbols, the same
    symbols word-final with ``</w>``, the first 48894 merges joined, then ``<|startoftext|>`` and
    ``<|endoftext|>``); ``merges`` are the 48894 merge lines ``"a b"`` in rank order.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with gzip.open(_BPE_FILE, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    n_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2  # 48894: the vocabulary is bytes, bytes + "</w>", merges, 2 specials
    merges = lines[1:1 + n_merges]  # line 0 is the "#version" header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocabulary from {_BPE_FILE} has {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


# --------------------------------------------------------------------------------------------------
# Config directories
# --------------------------------------------------------------------------------------------------

def _shipped_files(name: str) -> list[Path]:
    root = _SHIPPED_DIR / name
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _stamp(name: str) -> str:
    h = hashlib.sha256(_FORMAT_VERSION.encode())
    root = _SHIPPED_DIR / name
    for p in _shipped_files(name):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(hashlib.sha256(_BPE_FILE.read_bytes()).digest())
    return h.hexdigest()


def _assemble(name: str, dest: Path) -> None:
    root = _SHIPPED_DIR / name
    for p in _shipped_files(name):
        target = dest / p.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)
    vocab, merges = clip_bpe()
    vocab_json = json.dumps(vocab, ensure_ascii=False)
    merges_txt = "#version: 0.2\n" + "\n".join(merges) + "\n"
    for folder in _tokenizer_folders(name):
        (dest / folder).mkdir(parents=True, exist_ok=True)
        (dest / folder / "vocab.json").write_text(vocab_json, encoding="utf-8")
        (dest / folder / "merges.txt").write_text(merges_txt, encoding="utf-8")


def arch_config_dir(name: str) -> Path:
    """A local diffusers-layout directory for architecture ``name`` holding only config files.

    Usable as ``config=`` for ``from_single_file`` and with ``from_pretrained(dir, subfolder=...)`` /
    ``from_config`` for every component, tokenizers included. Built once (atomically) into
    ``cache_root()/arch/<name>`` and rebuilt when the shipped files change. No network.
    """
    from lowmem_alignprop.models.tiny import cache_root

    _check_name(name)
    stamp = _stamp(name)
    target = cache_root() / "arch" / name
    stamp_file = target / ".stamp"
    if stamp_file.is_file() and stamp_file.read_text(encoding="utf-8") == stamp:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _assemble(name, tmp)
        (tmp / ".stamp").write_text(stamp, encoding="utf-8")
        if target.exists():  # stale: move it aside first (a rename is atomic; another process may win)
            trash = target.parent / f".old-{name}-{uuid.uuid4().hex}"
            with contextlib.suppress(OSError):
                os.rename(target, trash)
                shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            pass  # another process installed it first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (stamp_file.is_file() and stamp_file.read_text(encoding="utf-8") == stamp):
        raise RuntimeError(f"could not build the {name} config directory in {target}")
    return target


# --------------------------------------------------------------------------------------------------
# Checkpoint inspection
# --------------------------------------------------------------------------------------------------

_UNET = "model.diffusion_model."
_CROSS_ATTN_DIM = {768: "sd15", 1024: "sd21", 2048: "sdxl"}


def _read_shapes(path: Path) -> Mapping[str, tuple[int, ...]]:
    """Key -> shape of a single-file checkpoint, reading only the header where the format allows; read once per
    version of the file (its architecture, its marker keys and the loader all ask: a .ckpt's pickle is parsed once)."""
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}; pass the path of an existing .safetensors or .ckpt file")
    if path.is_dir():
        raise UserError(f"{path} is a directory; a single-file checkpoint (.safetensors or .ckpt) is expected here "
                        "(a diffusers model directory is loaded as a model directory, not as a single file)")
    stat = path.stat()
    if stat.st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes): its download or copy did not finish; fetch it again")
    return _header_shapes(path, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _header_shapes(path: Path, size: int, mtime_ns: int) -> Mapping[str, tuple[int, ...]]:
    """:func:`_read_shapes`' reading, kept per (path, size, mtime) (a file written again is read again)."""
    try:
        if is_safetensors(path):
            return MappingProxyType(read_safetensors_shapes(path))
        sd = read_tensor_file(path, unwrap=True)  # memory-mapped: only the shapes are looked at
    except TensorFileError as e:
        if e.holds_code:  # a disallowed class or function (code), not a damaged file
            raise UserError(f"{path} holds pickled Python objects besides tensors, which are not loaded for safety. "
                            "Convert it to .safetensors (or re-save only its 'state_dict') and pass that file") from e
        if e.misnamed:
            raise UserError(f"{path} is {e.detail}") from None
        kind, fix = ("safetensors", "re-download it") if is_safetensors(path) else \
            ("PyTorch", "re-download it, or pass a .safetensors file")
        raise UserError(f"cannot read checkpoint {path} ({e.detail}): it is not a {kind} checkpoint (damaged, "
                        f"truncated, or another format); {fix}") from None
    except Exception as e:  # noqa: BLE001 - an unreadable file (OSError)
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}. Check that the file is a complete "
                        ".safetensors or .ckpt download (re-download it if it was truncated)") from e
    if not isinstance(sd, dict):
        raise UserError(f"{path} does not hold a state dict (found {type(sd).__name__})")
    return MappingProxyType({k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)})


def _detect_from_shapes(shapes: Mapping[str, tuple[int, ...]], where: str) -> str:
    not_sd = (f"{where} is not a Stable Diffusion checkpoint in the original single-file layout. Supported: "
              f"{_SUPPORTED}; and SD3/SD3.5 or FLUX.1 transformer files (joint_blocks.* / double_blocks.* keys, or "
              "diffusers' transformer_blocks.*) with their model's parts: --set model_components=DIR or OWNER/NAME "
              "(a hub id)")
    conv_in = shapes.get(_UNET + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise UserError(f"{where} is an inpainting/instruct-pix2pix style UNet ({conv_in[1]} input channels); only "
                        f"text-to-image checkpoints with 4 latent input channels are supported ({_SUPPORTED})")
    if any(k.startswith("conditioner.embedders.0.model.") for k in shapes) and not any(
            k.startswith("conditioner.embedders.1.") for k in shapes):
        raise UserError(f"{where} looks like the SDXL refiner, which cannot be trained here; use an SDXL base "
                        f"checkpoint. Supported: {_SUPPORTED}")
    # 1) the UNet's cross-attention width is the most reliable signal
    for width in _cross_attention_widths(shapes)[:1]:
        arch = _CROSS_ATTN_DIM.get(width)
        if arch is None:
            raise UserError(f"{where}: UNet cross-attention width {width} matches no supported model. "
                            f"Supported: {_SUPPORTED}")
        return arch
    # 2) otherwise the text encoder's layout
    if any(k.startswith("conditioner.embedders.1.") for k in shapes):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        return "sd21"
    if any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        return "sd15"
    if any(k.startswith(("lora_", "lora.")) or ".lora_" in k or ".lora." in k for k in shapes):
        raise UserError(f"{where} is a LoRA file, not a base model: pass the base model it was trained on as "
                        f"--model; to see what the LoRA does, run `lowmem-alignprop sample --lora {where}`")
    if any(re.match(r"(down_blocks|up_blocks|mid_block)\.", k) for k in shapes):
        raise UserError(f"{where} holds diffusers-layout weights (a single component?), not an original single-file "
                        "checkpoint; pass the diffusers model directory instead of this file")
    raise UserError(not_sd)


def _cross_attention_widths(shapes: Mapping[str, tuple[int, ...]]) -> list[int]:
    """The widths of the text states the UNet's cross-attention layers take (its attn2.to_k inputs), in key order."""
    return [s[-1] for k, s in shapes.items() if k.startswith(_UNET) and k.endswith("attn2.to_k.weight") and len(s) == 2]


def detect_arch(path) -> str:
    """Return "sd15", "sd21" or "sdxl" for a single-file ``.safetensors``/``.ckpt`` checkpoint.

    Reads only key names and shapes (the safetensors header; ``torch.load(weights_only=True,
    mmap=True)`` for ``.ckpt``). Raises :class:`UserError` for files that are not a supported Stable
    Diffusion checkpoint. SD 2.0/2.1 512-px "base" (epsilon) checkpoints also detect as "sd21".
    """
    path = Path(path)
    return _detect_from_shapes(_read_shapes(path), str(path))


def detect_arch_from_state_dict(state_dict: dict) -> str:
    """Like :func:`detect_arch` for an in-memory state dict (tensors or anything with ``.shape``)."""
    return _detect_from_shapes({k: tuple(v.shape) for k, v in state_dict.items()}, "the state dict")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

def pipeline_class(name: str):
    import diffusers

    _check_name(name)
    return diffusers.StableDiffusionXLPipeline if name == "sdxl" else diffusers.StableDiffusionPipeline


def _check_loaded(pipe, where: str, config_dir: Path) -> None:
    for tok_attr, te_attr in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tok, te = getattr(pipe, tok_attr, None), getattr(pipe, te_attr, None)
        if tok is not None and te is not None and len(tok) != te.config.vocab_size:
            # e.g. a config directory without tokenizer files silently gives a 2-token tokenizer
            raise UserError(f"the {tok_attr} loaded from {config_dir} has {len(tok)} tokens but the text encoder "
                            f"expects {te.config.vocab_size}: put the tokenizer files (vocab.json, merges.txt, "
                            f"tokenizer_config.json) into {config_dir / tok_attr}")
    for attr in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, attr, None)
        if module is None:
            continue
        missing = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if missing:
            raise UserError(f"{where} is incomplete: {len(missing)} {attr} tensors are missing (e.g. {missing[0]}). "
                            "Use a full checkpoint, or check that the architecture matches the file")


def single_file_config(path, arch: str = "auto", config_dir=None) -> tuple[type, Path, str]:
    """(pipeline class, config directory, how the model is named in messages) of a single-file checkpoint: the
    shipped configs of ``arch`` ("auto": :func:`detect_arch`), or ``config_dir``'s (see :func:`load_single_file`).
    Reads only the file's header."""
    path = Path(path)
    if config_dir is None:
        if arch != "auto":
            _check_name(arch)
        shapes = _read_shapes(path)  # clear errors for a missing / unreadable file before diffusers sees it
        if arch == "auto":
            arch = _detect_from_shapes(shapes, str(path))
        else:
            _check_forced_arch(arch, shapes, str(path))
        return pipeline_class(arch), arch_config_dir(arch), f"{arch} ({ARCH_DESCRIPTIONS[arch]})"
    config_dir = Path(config_dir)
    cls = _pipeline_class_of(config_dir)
    _read_shapes(path)
    return cls, config_dir, f"a {cls.__name__} configured by {config_dir}"


def _check_forced_arch(arch: str, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """``--set model_arch`` names the architecture of a file whose layout tells another one: refused (its weights
    would not fit the named architecture's shapes, found only when the whole file is read). A layout detection does
    not know is the user's to name."""
    try:
        found = _detect_from_shapes(shapes, where)
    except UserError:
        widths = set(_cross_attention_widths(shapes))
        named = next(w for w, a in _CROSS_ATTN_DIM.items() if a == arch)
        if widths and named not in widths:  # (a width no shipped architecture has: the named one's cannot fit it)
            raise UserError(f"{where}: its UNet's cross-attention width is {'/'.join(map(str, sorted(widths)))}, and "
                            f"model_arch={arch}'s is {named}: it is no {arch} checkpoint: drop --set model_arch, or "
                            f"pass an {arch} checkpoint") from None
        return
    if found != arch:
        raise UserError(f"{where} is a {found} checkpoint ({ARCH_DESCRIPTIONS[found]}), not model_arch={arch}: drop "
                        f"--set model_arch (a single file's architecture is told from its layout)")


V_PRED_KEY = "v_pred"  # an empty tensor by which a single file says it predicts v (ComfyUI reads it; NoobAI-XL V-Pred)


ZERO_SNR_KEY = "ztsnr"  # beside v_pred: trained with zero terminal SNR (ComfyUI reads it too)


def marked_v_prediction(path) -> bool:
    """Whether a single file carries the ``v_pred`` marker key (its weights cannot say what they predict)."""
    return V_PRED_KEY in _read_shapes(Path(path))


def marked_zero_snr(path) -> bool:
    """Whether a v-prediction single file carries the ``ztsnr`` marker key (trained with zero terminal SNR)."""
    keys = _read_shapes(Path(path))
    return V_PRED_KEY in keys and ZERO_SNR_KEY in keys


def file_scheduler_config(path, arch: str = "auto") -> dict | None:
    """The scheduler config a single file loads with (:func:`load_single_file`), from its header and the shipped
    configs alone: its architecture's, v-prediction where its ``v_pred`` key says (its ``ztsnr`` key is the
    sampler's to apply: ``sampler_check.run_scheduler``)."""
    config = scheduler_config(single_file_config(path, arch)[1])
    if config is None or not marked_v_prediction(path):
        return config
    return {**config, "prediction_type": "v_prediction"}


def lacks_vae(path) -> bool:
    """Whether a single file holds no VAE weights (a "no-vae" checkpoint), from its header."""
    from lowmem_alignprop.models.ldm_layout import VAE_PREFIX

    return not any(key.startswith(VAE_PREFIX) for key in _read_shapes(Path(path)))


def vae_of_config(config_dir: Path):
    """The VAE a config directory describes, on the meta device (its config and shapes, no weights)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL.from_config(AutoencoderKL.load_config(str(config_dir), subfolder="vae"))


def load_single_file(path, arch: str = "auto", torch_dtype=None, *, config_dir=None,
                     prediction_type: str | None = None, vae=None):
    """Load an original-layout single-file checkpoint into a diffusers pipeline, fully offline.

    ``arch`` is "auto" (see :func:`detect_arch`) or one of :data:`ARCHS`. The pipeline is a
    ``StableDiffusionPipeline`` (sd15/sd21) or ``StableDiffusionXLPipeline`` (sdxl, invisible
    watermark off) with the architecture's stock scheduler; ``prediction_type`` overrides the
    scheduler's (e.g. "epsilon" for an SD 2.x 512-px base checkpoint, which detects as "sd21"); without it, a file
    marked ``v_pred`` (:data:`V_PRED_KEY`) loads as v-prediction, and one also marked ``ztsnr`` with its schedule
    rescaled to zero terminal SNR.
    ``config_dir`` replaces the shipped config directory (any diffusers-layout directory holding the
    configs and tokenizer files of a compatible model; its model_index.json picks the pipeline class). ``vae``: a
    loaded VAE that takes the place of the file's own (a "no-vae" checkpoint has none).
    """
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    path = Path(path)
    cls, config_dir, what = single_file_config(path, arch, config_dir)
    if prediction_type is None and marked_v_prediction(path):  # (an SDXL or SD 1.x v-prediction fine-tune)
        prediction_type = "v_prediction"
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise UserError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
    kwargs = {"add_watermarker": False} if cls.__name__ == "StableDiffusionXLPipeline" else {}
    if vae is not None:
        kwargs["vae"] = vae
    try:
        # config must be a str: a Path passes the pipeline-level isdir() check, but the per-model
        # from_single_file then rejects it ("Invalid `config` argument").
        pipe = cls.from_single_file(str(path), config=str(config_dir), **dtype_kwarg(torch_dtype),
                                    local_files_only=True, **kwargs)
    except SingleFileComponentError as e:
        fix = (" (a \"no-vae\" checkpoint: name a VAE for it with --set vae=DIR|FILE|HUB_ID)"
               if "AutoencoderKL" in str(e) else "")
        raise UserError(f"{path} lacks the weights of a pipeline component for {what} "
                        f"({first_line(e, 1000)}). Use a full checkpoint that includes the UNet, VAE and text "
                        f"encoder(s){fix}") from e
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        if "meta tensor" in str(e):  # diffusers left a tensor the checkpoint lacks on meta, then moved it
            raise UserError(f"{path} is incomplete: some tensors of {what} are missing from it. Use a full "
                            "checkpoint, or check that the architecture matches the file") from e
        raise UserError(f"cannot load {path} as {what}: {type(e).__name__}: {str(e)[:500]}. Check that the file "
                        "is a complete Stable Diffusion checkpoint and that the architecture matches it (or let it "
                        "be detected automatically)") from e
    _check_loaded(pipe, str(path), config_dir)
    from lowmem_alignprop.models.sampling import with_schedule

    # (a file trained with zero terminal SNR: its schedule rescaled so, where its scheduler's class takes it)
    pipe.scheduler = with_schedule(pipe.scheduler, prediction_type, zero_snr=marked_zero_snr(path))
    return pipe


def _pipeline_class_of(config_dir: Path):
    import diffusers

    name = indexed_pipeline_class(config_dir)
    if name is None:
        raise UserError(f"{config_dir} is not a diffusers config directory (no readable model_index.json); "
                        "pass a directory written by save_pretrained or one of the shipped architectures")
    if name not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise UserError(f"{config_dir} describes a {name}; only StableDiffusionPipeline and "
                        "StableDiffusionXLPipeline models are supported")
    return getattr(diffusers, name)


# --------------------------------------------------------------------------------------------------
# Random / empty components
# --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """``dtype`` as torch's default dtype inside the block (modules made there get it), the previous one after."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def modules_from_configs(root: Path, index: dict, *, device="meta", dtype=torch.float16) -> dict:
    """``unet``, ``vae`` and the text encoder(s) a diffusers folder's configs describe (``root``; ``index`` its
    model_index.json), made directly on ``device`` in ``dtype`` (on meta: no memory, seconds even for SDXL), frozen
    and in eval mode, as the trainer uses its base models."""
    import diffusers
    import transformers

    out: dict = {}
    with torch.device(device), default_dtype(dtype):
        out["unet"] = diffusers.UNet2DConditionModel.from_config(
            diffusers.UNet2DConditionModel.load_config(root, subfolder="unet"))
        out["vae"] = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(root, subfolder="vae"))
        for te in ("text_encoder", "text_encoder_2"):
            if index.get(te) and index[te][1]:
                config = transformers.CLIPTextConfig.from_pretrained(root / te)
                out[te] = getattr(transformers, index[te][1])._from_config(config, dtype=dtype)
    for module in out.values():
        module.requires_grad_(False).eval()
        if any(p.dtype != dtype for p in module.parameters()):  # e.g. libraries that force fp32 parts
            module.to(dtype)
    return out


def build_random_components(name: str, *, device="meta", dtype=torch.float16) -> dict:
    """Models of architecture ``name`` from the shipped configs with random weights (or none, on meta).

    Returns a dict with ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` (and
    ``text_encoder_2``, ``tokenizer_2`` for sdxl). The modules are created directly on ``device`` in
    ``dtype`` (:func:`modules_from_configs`); on a real device the weights get the libraries' usual random
    initialisation. Nothing is downloaded.
    """
    import diffusers
    from transformers import CLIPTokenizer

    _check_name(name)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UserError(f"dtype must be a floating torch.dtype, not {dtype!r}")
    root = arch_config_dir(name)
    index = model_index(root)
    out = modules_from_configs(root, index, device=device, dtype=dtype)
    for tok in _tokenizer_folders(name):
        out[tok] = CLIPTokenizer.from_pretrained(root, subfolder=tok)
    sched_config = getattr(diffusers, index["scheduler"][1]).load_config(root, subfolder="scheduler")
    out["scheduler"] = getattr(diffusers, index["scheduler"][1]).from_config(sched_config)
    return out

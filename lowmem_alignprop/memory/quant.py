"""Quantized frozen base (QLoRA style): bitsandbytes int8 or nf4 Linear layers, or fp8 storage, under fp32 LoRA.

``base_quant`` (none|int8|nf4) replaces every ``nn.Linear`` of the frozen denoiser (a UNet's attention projections,
feed-forwards, time/text embeddings; an SD3/FLUX transformer's attention, feed-forward and modulation layers) with
a bitsandbytes layer; convolutions, norms and the LoRA adapters stay as they are, and the LoRA weights and their
gradients stay fp32. Two ways in, same result:

* a diffusers directory or hub id loads the UNet with diffusers' own quantization support
  (``UNet2DConditionModel.from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``);
* models built in memory (``--model sd15|sd21|sdxl`` random weights, single-file checkpoints) are
  quantized in place: each Linear is swapped for ``bnb.nn.Linear8bitLt`` / ``bnb.nn.Linear4bit`` and
  bitsandbytes quantizes the weight when the module moves to the device.

bitsandbytes' kernels need CUDA here: diffusers refuses to quantize without a GPU ("No GPU found"),
and so do we (a UserError) unless the environment variable ``LOWMEM_ALIGNPROP_QUANT_ON_CPU=1`` is
set, which the tests use together with a monkeypatched diffusers environment check (docs/design.md
section 8: int8 and nf4 then run on CPU; nf4 on CPU needs the UNet in ``train()`` mode).

``base_quant=fp8`` (experimental) stores the frozen Linear weights in ``torch.float8_e4m3fn`` (1 byte, 3 mantissa
bits: a relative rounding error of at most 2^-4 per weight in its normal range) and upcasts each layer to the
compute dtype just while it runs: diffusers' layerwise casting (``ModelMixin.enable_layerwise_casting``), with its
own choice of the precision-critical layers it leaves alone (norms and their modulation, positional and patch
embeddings, proj_in/out) and the LoRA adapters skipped (:func:`store_fp8`). No bitsandbytes, any device (the float8
dtypes exist on the CPU). Applied after LoRA is added (peft would otherwise give the adapters the fp8 dtype).

For the planner (which cannot run bitsandbytes, nor layerwise casting's in-place ``.to(dtype)``, under fake
tensors) :func:`quantized_weight_bytes` gives the analytic size of the quantized model.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from torch import nn

from lowmem_alignprop.memory.precision import dtype_kwarg
from lowmem_alignprop.settings.config import import_needed
from lowmem_alignprop.settings.errors import UserError

log = logging.getLogger(__name__)

MODES = ("int8", "nf4", "fp8")
BNB_MODES = ("int8", "nf4")  # the bitsandbytes ones
FP8 = torch.float8_e4m3fn  # fp8 storage: 4 exponent bits, 3 mantissa bits, no infinities (max 448)
# what fp8 storage casts: Linear layers only, as int8/nf4 (a UNet's convolutions stay in their dtype)
_FP8_SKIP_CLASSES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CPU_OVERRIDE_ENV = "LOWMEM_ALIGNPROP_QUANT_ON_CPU"  # tests only: let bitsandbytes run on the CPU
NF4_BLOCKSIZE = 64  # bitsandbytes' default: one absmax scale per 64 weights
DOUBLE_QUANT = True  # QLoRA's double quantization: the absmax scales are themselves 8-bit (-0.37 bits/weight)
_DQ_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax scales in blocks of 256


# ----------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------

def require_bitsandbytes(mode: str):
    """Import bitsandbytes or raise a UserError naming the fix."""
    return import_needed("bitsandbytes", f"base_quant={mode}", "base_quant=none")


def cpu_override() -> bool:
    return os.environ.get(CPU_OVERRIDE_ENV, "") not in ("", "0")


def check_device(mode: str) -> None:
    """Quantized kernels need a CUDA GPU (unless the tests' CPU override is set)."""
    if torch.cuda.is_available() or cpu_override():
        return
    raise UserError(f"base_quant={mode} needs a CUDA GPU: bitsandbytes' quantized kernels run on CUDA and none "
                    "was found; use --set base_quant=none on this machine")


def check_mode(mode: str) -> None:
    """Everything that can fail before loading: the mode, bitsandbytes, a CUDA device (fp8 needs neither).
    A check only: it raises a UserError naming the fix, or returns having changed nothing."""
    if mode not in MODES:
        raise UserError(f"base_quant={mode!r} is not one of none, {', '.join(MODES)}")
    if mode == "fp8":
        return
    require_bitsandbytes(mode)
    check_device(mode)


def target_device() -> torch.device:
    """Where the quantized UNet lives: the current CUDA device (accelerate sets it per process), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------
# quantizing
# ----------------------------------------------------------------------------------------------------

def bnb_config(mode: str, compute_dtype: torch.dtype, double_quant: bool = DOUBLE_QUANT):
    """diffusers' ``BitsAndBytesConfig`` for ``mode``."""
    from diffusers import BitsAndBytesConfig

    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)  # LLM.int8(): 1 byte per weight, outliers in fp16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",  # 0.5 byte per weight + scales
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)


def _autocast_input(module: nn.Module, args: tuple):
    """Forward pre-hook: under autocast, hand the layer its input in the autocast dtype.

    bitsandbytes' layers return their *input's* dtype, so a float32 input (a LayerNorm's output, the
    timestep embedding: autocast keeps both in float32) gave a float32 output where ``nn.Linear`` under
    autocast gives float16, and every activation downstream (residuals, GELU, norms) was then stored in
    float32: about twice the activation memory of the unquantized UNet. Casting here saves that.
    """
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        return None
    dtype = torch.get_autocast_dtype(kind)
    return None if x.dtype == dtype else (x.to(dtype), *args[1:])


def _drop_unused_saved_input(module: nn.Module, args: tuple, out):
    """Forward hook of an int8 layer: forget the input its autograd node kept for a weight gradient.

    bitsandbytes' 8-bit matmul keeps its input on the node (``ctx.tensors`` on CUDA, ``ctx.A`` on CPU)
    whether or not the weight needs a gradient, and outside ``save_for_backward``, so activation
    checkpointing cannot drop it: every int8 layer's input stayed alive for the whole gradient window.
    The frozen base never needs that gradient (its input gradient uses only the int8 weight), so the
    reference is dropped: that saves one fp16 copy of every Linear input per UNet call kept for backward.
    """
    node = getattr(out, "grad_fn", None)
    needs = getattr(node, "needs_input_grad", None)
    if node is None or needs is None or len(needs) < 2 or needs[1]:
        return  # no graph, or not bitsandbytes' node, or a weight that trains: leave it
    if isinstance(getattr(node, "tensors", None), (tuple, list)) and len(node.tensors) == 3:  # MatMul8bitLt
        node.tensors = (None, None, None)  # (int8 input for the weight grad, outlier columns, input)
    if isinstance(getattr(node, "A", None), torch.Tensor):  # MatMul8bitFp (CPU)
        node.A = None


def prepare_quantized_layers(model: nn.Module) -> int:
    """Make the bitsandbytes layers of ``model`` cost no more activation memory than ``nn.Linear``: every
    quantized layer (and the LoRA layer wrapping it, if any) takes and returns the autocast dtype
    (:func:`_autocast_input`), and int8 layers keep no input for backward (:func:`_drop_unused_saved_input`).
    Idempotent; returns how many quantized layers it prepared."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    quantized = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    count = 0
    for m in model.modules():
        base = m.get_base_layer() if hasattr(m, "get_base_layer") else m
        if not isinstance(base, quantized) or getattr(m, "_lowmem_prepared", False):
            count += isinstance(m, quantized)
            continue
        # a LoRA wrapper (peft) gets the cast too: its adapter and its base layer then share one fp16 input
        m.register_forward_pre_hook(_autocast_input)
        if m is base and isinstance(m, bnb.nn.Linear8bitLt):
            m.register_forward_hook(_drop_unused_saved_input)
        m._lowmem_prepared = True
        count += m is base
    return count


def load_quantized_unet(where: str, mode: str, dtype: torch.dtype, *, subfolder: str = "unet",
                        variant: str | None = None):
    """The UNet of a diffusers directory or hub id, loaded quantized through diffusers' bitsandbytes support (of the
    weights ``variant``, e.g. fp16, where the folder has only those).

    The non-Linear layers are loaded in ``dtype``; the model lands on :func:`target_device`.
    """
    from diffusers import UNet2DConditionModel

    check_mode(mode)
    device = target_device()
    unet = UNet2DConditionModel.from_pretrained(where, subfolder=subfolder, **dtype_kwarg(dtype),
                                                quantization_config=bnb_config(mode, dtype),
                                                device_map={"": str(device)},
                                                **({"variant": variant} if variant else {}))
    prepare_quantized_layers(unet)  # activations as small as nn.Linear's: fp16, no kept int8 inputs
    log.info("UNet loaded with %s Linear layers (diffusers BitsAndBytesConfig): %d layers quantized",
             mode, count_quantized(unet)[mode])
    return unet


def _is_lora(name: str) -> bool:
    return "lora_" in name


def _plain_linears(model: nn.Module):
    """(parent, attribute, qualified name, layer) for every plain nn.Linear outside LoRA adapters."""
    for parent_name, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            name = f"{parent_name}.{attr}" if parent_name else attr
            if type(child) is nn.Linear and not _is_lora(name):
                yield parent, attr, name, child


# the statistics of a model's first weight as read (:func:`weight_stats`), kept on the bitsandbytes layer that took it
# over: its weight now holds codes (int8 std ~70, nf4 packed bytes), and the fingerprint
# (run/base_fingerprint.fingerprint: FLUX.1's first weight is its timestep embedder's Linear) names the model by its
# weights, not how they are stored
AS_READ = "weight_stats_as_read"


def weight_stats(w: torch.Tensor) -> list[float]:
    """Mean, std and first 8 values of a weight in float32: what a fingerprint records of a denoiser's first weight
    (run/base_fingerprint.fingerprint; close, not equal, for fp16/bf16/fp32 loads of one model)."""
    w = w.detach().float().flatten()
    return [w.mean().item(), w.std().item()] + w[:8].tolist()


def quantize_in_place(unet: nn.Module, mode: str, dtype: torch.dtype, *, double_quant: bool = DOUBLE_QUANT,
                      device: torch.device | str | None = None, quiet: bool = False, stay=()) -> int:
    """Swap every nn.Linear of ``unet`` for a bitsandbytes layer and move the model to ``device``
    (default :func:`target_device`); bitsandbytes quantizes each weight as it moves. Returns the count. The
    submodules in ``stay`` (block swap's host blocks, quantized on the CPU already) are left where they are.

    For models built in memory (random-weight architectures, single-file checkpoints); directories and hub
    ids go through :func:`load_quantized_unet` instead. Call before adding LoRA.
    """
    check_mode(mode)
    bnb = require_bitsandbytes(mode)
    device = torch.device(device) if device is not None else target_device()
    # a whole model (diffusers' have a config), not one of its blocks (block_loading quantizes each as it is read:
    # a float32 copy of a block's first weight, 226 MB for FLUX.1's, is not taken for nothing)
    count, first = 0, next(unet.parameters(), None) if hasattr(unet, "config") else None
    for parent, attr, _, lin in _plain_linears(unet):
        has_bias = lin.bias is not None
        if mode == "int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
            # int8 weights are built from fp16 (bitsandbytes' int8 path); the fp copy is freed once quantized.
            # Int8Params quantizes only when it moves off the CPU (or stays there), so it starts on the CPU
            q.weight = bnb.nn.Int8Params(lin.weight.data.to("cpu", torch.float16), requires_grad=False,
                                         has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=dtype,
                                  compress_statistics=double_quant, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                         compress_statistics=double_quant, quant_type="nf4", module=q)
        if has_bias:
            q.bias = nn.Parameter(lin.bias.data.to(dtype), requires_grad=False)
        if lin.weight is first:  # the fingerprint's weight, before it is codes
            setattr(q, AS_READ, weight_stats(first))
        setattr(parent, attr, q)
        count += 1
    _move_except(unet, device, stay)  # quantization happens here, one weight at a time: the fp16 copy of each is freed
    unet.requires_grad_(False)
    prepare_quantized_layers(unet)  # activations as small as nn.Linear's: fp16, no kept int8 inputs
    # the attributes diffusers sets on a quantized model: peft then wraps these layers with its bnb LoRA layers
    if mode == "int8":
        unet.is_loaded_in_8bit = True
    else:
        unet.is_loaded_in_4bit = True
    if not quiet:
        log.info("%s quantized in place to %s: %d Linear layers", type(unet).__name__, mode, count)
    return count


def _move_except(model: nn.Module, device, stay) -> None:
    """``model.to(device)`` but for the submodules in ``stay`` (and what is under them)."""
    stay = {id(m) for m in stay}
    if not stay:
        model.to(device)
        return
    if id(model) in stay:
        return
    if not any(id(m) in stay for m in model.modules()):
        model.to(device)
        return
    for name, t in list(model.named_parameters(recurse=False)) + list(model.named_buffers(recurse=False)):
        if t is not None:
            t.data = t.data.to(device)
    for child in model.children():
        _move_except(child, device, [m for m in child.modules() if id(m) in stay])


def quantize_unet(comps, mode: str, dtype: torch.dtype) -> int:
    """Quantize ``comps.unet`` in place unless it was loaded quantized. Returns the number of quantized layers."""
    counts = count_quantized(comps.unet)
    if counts["int8"] or counts["nf4"]:
        return counts[mode]
    return quantize_in_place(comps.unet, mode, dtype)


def count_quantized(model: nn.Module) -> dict[str, int]:
    """How many layers are int8, nf4 (or other 4-bit), and how many plain nn.Linear are left (LoRA excluded)."""
    out = {"int8": 0, "nf4": 0, "linear": 0}
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    for name, m in model.named_modules():
        if _is_lora(name):
            continue
        if bnb is not None and isinstance(m, bnb.nn.Linear8bitLt):
            out["int8"] += 1
        elif bnb is not None and isinstance(m, bnb.nn.Linear4bit):
            out["nf4"] += 1
        elif type(m) is nn.Linear:
            out["linear"] += 1
    return out


# ----------------------------------------------------------------------------------------------------
# fp8 storage
# ----------------------------------------------------------------------------------------------------

def _fp8_skip_patterns(model: nn.Module) -> tuple[str, ...]:
    """The module-name patterns diffusers' ``enable_layerwise_casting`` leaves in full precision for ``model``:
    its defaults, the model's own ``_skip_layerwise_casting_patterns`` and ``_keep_in_fp32_modules``, peft's
    adapter layers."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
    from peft.tuners.lora.layer import LoraLayer

    patterns = list(DEFAULT_SKIP_MODULES_PATTERN)
    patterns += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    patterns += list(getattr(model, "_skip_layerwise_casting_patterns", None) or [])
    return tuple(patterns) + tuple(LoraLayer.adapter_layer_names)


def fp8_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of every Linear that :func:`store_fp8` stores in fp8: diffusers' layerwise casting walks the
    module tree and skips a module (and all below it) whose qualified name matches one of its patterns; LoRA
    adapters never. For the planner's analytic count, on a meta model as on a real one."""
    import re

    patterns = _fp8_skip_patterns(model)
    out = []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear or _is_lora(name):
            continue
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if not any(re.search(p, prefix) for p in patterns for prefix in prefixes):
            out.append((name, m))
    return out


def lora_target(name: str, targets) -> bool:
    """Whether peft's ``LoraConfig(target_modules=targets)`` wraps the module named ``name`` (peft's own matching)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(targets) and bool(check_target_module_exists(LoraConfig(target_modules=list(targets)), name))


def _store_fp8_layers(model: nn.Module, layers, compute_dtype: torch.dtype) -> None:
    """Layerwise casting (diffusers' ``apply_layerwise_casting``) on each of ``layers`` ((name, nn.Linear) of
    ``model``): stored in fp8 at once, upcast to ``compute_dtype`` while it runs. The base layer of a peft LoRA layer
    is cast through its wrapper, so that diffusers skips the adapters and turns peft's input cast off there, as
    ``enable_layerwise_casting`` on the whole model does."""
    from diffusers.hooks import apply_layerwise_casting
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in layers:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if attr == "base_layer" and isinstance(parent, BaseTunerLayer):
            apply_layerwise_casting(parent, FP8, compute_dtype, skip_modules_pattern=tuple(parent.adapter_layer_names),
                                    skip_modules_classes=_FP8_SKIP_CLASSES)
        else:
            apply_layerwise_casting(layer, FP8, compute_dtype, skip_modules_pattern=None, skip_modules_classes=None)


def _unstored(model: nn.Module, part: nn.Module | None = None, keep=()) -> list[tuple[str, nn.Linear]]:
    """The layers of :func:`fp8_linears` (under ``part``, if given) not stored in fp8 yet, but the LoRA targets
    ``keep`` (and what is under them); unfilled (meta) ones wait too."""
    under = {id(m) for m in part.modules()} if part is not None else None
    return [(n, m) for n, m in fp8_linears(model) if m.weight.dtype != FP8 and not m.weight.is_meta
            and (under is None or id(m) in under) and not lora_target(n.removesuffix(".base_layer"), keep)]


def store_fp8_part(model: nn.Module, part: nn.Module, compute_dtype: torch.dtype, keep=()) -> int:
    """fp8 storage while ``model`` is being filled (models/block_loading.py): the :func:`fp8_linears` layers of
    ``part`` (a block just read) stored in fp8 now, but the LoRA targets ``keep``: peft gives a new adapter its base
    layer's dtype, so those wait for :func:`store_fp8` after LoRA. Returns the count."""
    layers = _unstored(model, part, keep)
    _store_fp8_layers(model, layers, compute_dtype)
    return len(layers)


def store_fp8(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """base_quant=fp8: the frozen Linear weights (and biases) of ``model`` stored in float8_e4m3fn, each layer
    upcast to ``compute_dtype`` just before it runs and cast back after (diffusers' layerwise casting hooks; halves
    bf16 weights). Call after LoRA is added: the adapters are skipped by name and stay fp32. Layers stored while the
    model was read (:func:`store_fp8_part`) are left as they are. Returns the count of fp8 layers."""
    expected = len(fp8_linears(model))
    _store_fp8_layers(model, _unstored(model), compute_dtype)
    count = sum(1 for n, m in model.named_modules() if type(m) is nn.Linear and m.weight.dtype == FP8)
    if count != expected:  # the planner counts fp8_linears(): every one of them, and nothing else, is in fp8
        raise RuntimeError(f"fp8 storage cast {count} Linear layers where fp8_linears() names {expected}")
    log.info("frozen Linear weights stored in fp8 (float8_e4m3fn), upcast to %s per layer: %d layers",
             compute_dtype, count)
    return count


def is_fp8(model: nn.Module) -> bool:
    return any(t.dtype == FP8 for t in model.parameters())


# ----------------------------------------------------------------------------------------------------
# sizes
# ----------------------------------------------------------------------------------------------------

def quantized_linear_weight_bytes(numel: int, out_features: int, mode: str, *, double_quant: bool = DOUBLE_QUANT,
                                  blocksize: int = NF4_BLOCKSIZE) -> int:
    """Bytes bitsandbytes keeps for one Linear weight of ``numel`` elements (``out_features`` rows)."""
    if mode == "int8":
        return numel + 4 * out_features  # int8 weight + one fp32 scale per output row (SCB)
    if mode == "fp8":
        return numel  # one byte per weight, no scale (a plain cast)
    if mode != "nf4":
        raise ValueError(f"unknown quantization mode {mode!r}")
    blocks = math.ceil(numel / blocksize)
    packed = (numel + 1) // 2  # two 4-bit codes per byte
    if not double_quant:
        return packed + 4 * blocks  # one fp32 absmax per block
    # 8-bit absmax per block, one fp32 scale per 256 absmax values, and one fp32 offset per layer
    return packed + blocks + 4 * math.ceil(blocks / _DQ_BLOCKSIZE) + 4


def quantized_weight_bytes(unet: nn.Module, mode: str, *, double_quant: bool = DOUBLE_QUANT,
                           blocksize: int = NF4_BLOCKSIZE) -> int:
    """Analytic bytes of ``unet``'s parameters and buffers once its Linear layers are quantized with ``mode``.

    For the planner, which cannot run bitsandbytes under fake tensors. Works on any UNet: real, ``meta`` or
    fake, plain or already quantized, with or without LoRA. Counted:

    * every Linear weight outside LoRA adapters (``in_features * out_features`` elements), as bitsandbytes
      stores it: ``int8`` 1 byte per weight + a 4-byte fp32 scale per output row; ``nf4`` 0.5 byte per
      weight + one absmax per ``blocksize`` (64) weights, either fp32 (4 bytes) or, with double
      quantization (``double_quant=True``, our default, as QLoRA), 1 byte, plus 4 bytes per 256 blocks
      and a 4-byte offset per layer. bitsandbytes' shared code tables (1 KiB per device) are not counted;
    * ``fp8``: the layers :func:`fp8_linears` names at 1 byte per weight and bias element, the rest unchanged;
    * everything else unchanged, at its current element size: Linear biases, convolutions, norms,
      embeddings, and LoRA adapters if present.

    ``mode="none"`` returns the plain size. So with ``plain = quantized_weight_bytes(unet, "none")``
    (= ``models.module_bytes(unet)`` for an unquantized UNet) the planner subtracts
    ``plain - quantized_weight_bytes(unet, mode)`` from the resident weights. The real footprint on a
    GPU matches within the allocator's rounding (``gpu_verify_quant`` measures it).
    """
    return sum(n for _, _, n in _stored_bytes(unet, mode, double_quant, blocksize))


def _stored_bytes(model: nn.Module, mode: str, double_quant: bool = DOUBLE_QUANT, blocksize: int = NF4_BLOCKSIZE):
    """(qualified name of its module, tensor, bytes once stored with ``mode``) for every parameter and buffer of
    ``model``, module by module (:func:`quantized_weight_bytes`'s count); a quantized Linear weight's bytes include
    its scales."""
    fp8 = {id(m) for _, m in fp8_linears(model)} if mode == "fp8" else set()
    for name, m in model.named_modules():
        own = [(n, t) for n, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
               if t is not None]
        for n, t in own:
            size = t.numel() * t.element_size()
            if mode == "fp8" and id(m) in fp8:  # weight and bias stored in 1 byte each (layerwise casting)
                size = t.numel()
            elif n == "weight" and mode not in ("none", "fp8") and isinstance(m, nn.Linear) and not _is_lora(name):
                size = quantized_linear_weight_bytes(m.in_features * m.out_features, m.out_features, mode,
                                                     double_quant=double_quant, blocksize=blocksize)
            elif n == "weight" and mode == "none" and isinstance(m, nn.Linear) and not _is_lora(name) and \
                    _bnb_weight(m):
                size = m.in_features * m.out_features * 2  # an already-quantized layer counted at fp16
            yield name, t, size


def stored_tensor_bytes(model: nn.Module, mode: str) -> dict[int, int]:
    """id(tensor) -> its bytes once stored with ``mode``, for every parameter and buffer of ``model`` (the planner's
    block swap copies each swapped weight at this size)."""
    return {id(t): n for _, t, n in _stored_bytes(model, mode)}


def frozen_block_bytes(model: nn.Module, blocks: list[nn.Module], mode: str) -> list[int]:
    """Analytic bytes of each block's frozen parameters stored with ``mode`` (none: as they are now), LoRA adapters
    left out: what block swap keeps in host memory per block and copies to the device per load. Counted in
    ``model``'s context (fp8's skipped layers are chosen by qualified name). Real, meta or fake models."""
    sizes = stored_tensor_bytes(model, mode)
    return [sum(sizes[id(p)] for p in _unique(block.parameters()) if not p.requires_grad) for block in blocks]


def _unique(tensors):
    seen = set()
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def _bnb_weight(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return w is not None and type(w).__name__ in ("Params4bit", "Int8Params")


def measured_weight_bytes(model: nn.Module) -> int:
    """Bytes really held by ``model``: parameters and buffers, plus bitsandbytes' scales that live outside
    them (nf4 absmax/offset/nested scales in ``quant_state``, int8 row scales ``SCB``). Shared storages are
    counted once; bitsandbytes' shared code tables are not counted (as in :func:`quantized_weight_bytes`)."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key in seen:
            return
        seen.add(key)
        total += t.untyped_storage().nbytes()

    for m in model.modules():
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            add(t)
            qs = getattr(t, "quant_state", None)
            if qs is not None:
                add(qs.absmax)
                add(getattr(qs, "offset", None))
                if getattr(qs, "state2", None) is not None:
                    add(qs.state2.absmax)
            add(getattr(t, "SCB", None))
        state = getattr(m, "state", None)  # Linear8bitLt moves the int8 weight's row scales here on first use
        add(getattr(state, "CB", None))
        add(getattr(state, "SCB", None))
    return total

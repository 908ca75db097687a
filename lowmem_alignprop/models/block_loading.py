"""A transformer made real one block at a time, each block placed (and quantized, int8/nf4) before the next is made:
the host and the card never hold more than the model as it will run and one block in full precision.

Two sources fill the blocks, in the same order and with the same placement (:func:`fill_by_block`):

* **random weights** for the shipped architectures (``sd35m``, ``sd35l``, ``flux``), drawn on the device
  (:func:`materialize_quantized`);
* **a real checkpoint**: a single ``.safetensors`` transformer (Black Forest Labs' / Stability's original layout, or
  diffusers'), or the ``transformer/`` folder of a diffusers pipeline (:func:`load_by_block`), read to the device it
  runs on. ``safe_open`` reads one tensor at a time from the memory-mapped file, so FLUX.1's 23.8 GB of bf16 are
  never in host memory at once (diffusers' ``from_single_file`` and ``from_pretrained`` read the whole transformer
  into host memory first, 1.3x its size at the peak).

diffusers converts the original layouts as one whole state dict; a block's share of it comes from the inverse that
``export --single-file`` already uses (:mod:`lowmem_alignprop.models.flow_layout`), run once on row numbers: each
original tensor's rows are named by the diffusers tensor and row they fill. One place for the layout's rules, and
any layout the inverse cannot name falls back to diffusers' whole-model load with a warning.

fp8 files (the ComfyUI world's ``flux1-dev-fp8``, ``sd3.5_large_fp8_scaled``) are read the same way: each tensor is
cast up to the load dtype as it is copied. A *scaled* fp8 file also holds, per quantized layer, ``<layer>.scale_weight``
(ComfyUI's legacy name; its current format names it ``weight_scale``): a scalar, or one value per output row, and
the real weight is ``stored.float() * scale``, applied here to each run of rows with the rows' own scales. Its
``scale_input`` / ``input_scale`` (fp8 matmul inputs), ``comfy_quant`` and the ``scaled_fp8`` marker say nothing
about the weights and are skipped. A scaled file this cannot read raises a UserError instead of falling back:
diffusers' loaders know no scales and would load the unscaled fp8 values, silently wrong.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem_alignprop.settings.errors import UserError, first_line

log = logging.getLogger(__name__)

# original-layout key prefixes that wrap a transformer inside a full checkpoint (ComfyUI / Stability files)
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
_ROW_BITS = 32  # a row number's bits in the row-id tensors: the diffusers tensor's index sits above them
# scaled fp8 (ComfyUI): "<layer>.scale_weight" (legacy) / "<layer>.weight_scale" scale "<layer>.weight"
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
# scaled fp8's other entries: input scales for fp8 matmuls, the per-layer format record, the file's marker
SKIPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
SCALED_MARKER = "scaled_fp8"


@dataclass(frozen=True)
class Placement:
    """Where the filled blocks go: ``mode`` int8/nf4 quantizes each, fp8 stores each block's Linear layers in fp8
    but the LoRA targets ``keep`` (those, and the small rest outside the blocks, after LoRA: memory/quant.store_fp8),
    none fills only; on ``device`` in ``dtype``; the first ``host_blocks`` (block swap's) go to the CPU instead."""
    mode: str
    dtype: torch.dtype
    device: torch.device | str
    host_blocks: int = 0
    keep: tuple[str, ...] = ()  # fp8: peft's target_modules, left in dtype (a new adapter takes its base's dtype)


def strip_prefix(key: str) -> str:
    return next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)


def fill_by_block(model, place: Placement, fill) -> int:
    """Make every part of an empty (meta) transformer real with ``fill(module, index, on)`` (it leaves ``module``
    real on ``on``): its blocks first, in execution order, each quantized (or stored in fp8) before the next is
    filled, then the small rest (embedders, output layers). Returns the number of quantized (fp8) Linear layers."""
    from lowmem_alignprop.memory import quant
    from lowmem_alignprop.memory.block_swap import swappable_blocks

    blocks = swappable_blocks(model)
    lists = {id(m) for m in (getattr(model, "transformer_blocks", None),
                             getattr(model, "single_transformer_blocks", None)) if m is not None}
    quantized, count = place.mode in quant.BNB_MODES, 0
    for j, block in enumerate(blocks):  # the bulk of the weights: one block in full precision at a time
        on = "cpu" if j < place.host_blocks else place.device  # block swap's host copy never visits the device
        fill(block, j, on)
        if quantized:
            count += quant.quantize_in_place(block, place.mode, place.dtype, device=on, quiet=True)
        elif place.mode == "fp8":  # this block at 1 byte per weight before the next is read: not all in bf16 at once
            count += quant.store_fp8_part(model, block, place.dtype, keep=place.keep)
    for j, child in enumerate(model.children()):
        if id(child) not in lists:
            fill(child, len(blocks) + j, place.device)
    if quantized:  # the rest's Linear layers too; the host blocks stay where they are
        count += quant.quantize_in_place(model, place.mode, place.dtype, device=place.device, quiet=True,
                                         stay=blocks[:place.host_blocks])
    # fp8: the rest (embedders; FLUX.1: 45M weights) waits for store_fp8 with the LoRA targets, so that the run's
    # fingerprint (base_fingerprint.fingerprint: FLUX's first weight is its timestep embedder's) is of the weights as
    # read
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__}: {len(left)} tensors were not filled, e.g. {left[0]}")
    return count


# The adaptive norms' projections (SD3/FLUX: a block's shift, scale and gate from the timestep; names .norm1.linear,
# .norm1_context.linear, single blocks' .norm.linear, .norm_out.linear) drawn this much smaller: each block starts near
# the identity, as DiT's adaLN-zero initialisation has it. At std 0.02 FLUX's full-width blocks multiplied a gradient
# by 1.1-2.5 each (thousands of times per call of 57 blocks), and the H200 check's FLUX rows skipped every step on an
# infinite gradient norm through K calls; at std/10, about 1.02 (tests/test_flow_train.py measures it at FLUX's width).
MODULATION_SCALE = 0.1
MODULATION_NORMS = ("norm1", "norm1_context", "norm", "norm_out")


def is_modulation(name: str) -> bool:
    """A parameter of an adaptive norm's projection (``...norm1.linear.weight``), by its name within any module."""
    parts = name.split(".")
    return len(parts) >= 3 and parts[-2] == "linear" and parts[-3] in MODULATION_NORMS


def materialize(module: torch.nn.Module, device, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """A meta module made real on ``device`` with random weights (normal(0, std), the adaptive norms' projections
    :data:`MODULATION_SCALE` of it; norms' weights 1), drawn on that device: a 12B model is initialised on the GPU in
    seconds, not on the CPU in minutes."""
    module.to_empty(device=device)
    if hasattr(module, "tie_weights"):  # to_empty gives tied tensors a storage each (T5's embeddings): one again
        module.tie_weights()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():  # to_empty leaves whatever the memory held: CLIP's positions are a constant
                if name.rsplit(".", 1)[-1] != "position_ids":
                    raise RuntimeError(f"{type(module).__name__}: no rule to fill the integer buffer {name}")
                t.copy_(torch.arange(t.shape[-1], device=t.device).expand_as(t))
                continue
            if t.dim() == 1:  # norms' weights 1, biases 0
                t.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
            else:
                scale = std * MODULATION_SCALE if is_modulation(name) else std
                t.copy_(torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32).mul_(scale))
    return module


def materialize_quantized(model, device, mode: str, dtype, seed: int = 0, host_blocks: int = 0, keep=()) -> int:
    """A meta transformer made real with random weights, drawn on ``device`` block by block and quantized (fp8:
    stored in fp8 but the LoRA targets ``keep``) as it goes (:func:`fill_by_block`): the peak is the quantized model
    plus one block in full precision (fp8: and the LoRA targets and embedders until LoRA is added). Block swap's
    ``host_blocks`` are drawn on the device (the same weights as without block swap) and moved to the CPU, where
    they are quantized (bitsandbytes' CPU ops; the same int8 / nf4 layout as on CUDA), before the next is drawn: an
    8 GB card could not hold FLUX's 11.9 GB of int8."""
    def draw(module, index, on):
        if not any(t.is_meta for t in list(module.parameters()) + list(module.buffers())):
            return
        materialize(module.to(dtype), device, seed=seed * 1000 + index)
        if str(on) != str(device):
            module.to(on)

    count = fill_by_block(model, Placement(mode, dtype, device, host_blocks, tuple(keep)), draw)
    if count:  # fp8: the LoRA targets and embedders follow after LoRA, and store_fp8 logs the whole count
        log.info("random-weight transformer drawn and quantized to %s block by block%s", mode,
                 "" if mode == "fp8" else f": {count} Linear layers")
    return count


# --------------------------------------------------------------------------------------------------
# real checkpoints
# --------------------------------------------------------------------------------------------------

def folder_files(transformer_dir: Path) -> list[Path] | None:
    """The .safetensors files of a diffusers ``transformer/`` folder (one file, or the shards its index names; a
    variant's where it has only those: settings/paths.component_variant); None when it has none (a .bin model:
    diffusers loads it whole)."""
    from lowmem_alignprop.settings.paths import component_variant

    tag = f".{variant}" if (variant := component_variant(transformer_dir)) else ""
    index = transformer_dir / f"diffusion_pytorch_model.safetensors.index{tag}.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [transformer_dir / f for f in sorted(set(weight_map.values()))]
    one = transformer_dir / f"diffusion_pytorch_model{tag}.safetensors"
    return [one] if one.is_file() else None


def check_readable(files: list[Path]) -> list[Path]:
    """``files`` when each opens as safetensors (its header read: a file cut short fails here); else one line before
    anything loads (a 24 GB download that stopped partway is the usual damage)."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - any reader error (SafetensorError is none of the builtin ones)
            raise UserError(f"{f} cannot be read ({first_line(e, 100)}): it is damaged or incomplete (a download "
                            f"that stopped partway?): download the model's {f.parent.name}/ again") from None
    return files


def _row_segments(shapes: dict[str, tuple], family: str, layout: str,
                  num_layers: int) -> dict[str, list[tuple[str, int, int, int]]]:
    """For every tensor name of the checkpoint's layout: the (diffusers name, first row there, first row here,
    rows) runs it fills, from the diffusers model's tensor ``shapes``. Raises KeyError for a weight the layout has
    no name for."""
    from lowmem_alignprop.models import flow_layout

    names = list(shapes)
    if layout == "diffusers":
        return {k: [(k, 0, 0, s[0] if s else 1)] for k, s in shapes.items()}
    ids = {k: torch.arange(s[0] if s else 1, dtype=torch.int64) + (i << _ROW_BITS) for i, (k, s) in
           enumerate(shapes.items())}
    rows = flow_layout.flux_to_original(ids) if family == "flux" else \
        flow_layout.sd3_to_original(ids, num_layers)
    out = {}
    for key, t in rows.items():
        which, row = t >> _ROW_BITS, t & ((1 << _ROW_BITS) - 1)
        cut = torch.ones(len(t), dtype=torch.bool)
        cut[1:] = (which[1:] != which[:-1]) | (row[1:] != row[:-1] + 1)
        starts = cut.nonzero().flatten().tolist() + [len(t)]
        out[key] = [(names[int(which[a])], int(row[a]), a, b - a) for a, b in zip(starts, starts[1:])]
    return out


class Checkpoint:
    """Open safetensors files read one tensor at a time into the blocks of an empty transformer."""

    def __init__(self, files, model, family: str, layout: str, stack: contextlib.ExitStack):
        from safetensors import safe_open

        self.handles = {}  # the checkpoint's name (prefix stripped) -> (open file, its own name)
        for f in files:
            handle = stack.enter_context(safe_open(str(f), framework="pt"))
            keys = list(handle.keys())
            # a whole checkpoint (Stability's sd3.5_large.safetensors: the MMDiT beside first_stage_model.*): its
            # transformer is what carries the prefix
            wrapped = [k for k in keys if k.startswith(PREFIXES)]
            self.handles.update({strip_prefix(k): (handle, k) for k in wrapped or keys})
        self.scales = {}  # scaled fp8: a weight's checkpoint name -> (open file, its scale's own name)
        for key in [k for k in self.handles if k.endswith(SCALE_SUFFIXES + SKIPPED_SUFFIXES) or k == SCALED_MARKER]:
            entry = self.handles.pop(key)
            if key.endswith(SCALE_SUFFIXES):
                self.scales[key.rsplit(".", 1)[0] + ".weight"] = entry
        self.scaled = bool(self.scales)  # a scaled fp8 file: only a reader that applies the scales may load it
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        try:
            self.segments = _row_segments(self.shapes, family, layout, getattr(model.config, "num_layers", 0))
            self.unnamed = None
        except KeyError as e:  # the model has a weight the original layout's inverse has no name for
            self.segments, self.unnamed = {}, f"no {layout}-layout name for {e}"
        self.sources: dict[str, list[str]] = {}  # diffusers name -> the checkpoint names that fill it
        for key, runs in self.segments.items():
            for name, *_ in runs:
                self.sources.setdefault(name, []).append(key)

    def mismatch(self) -> str | None:
        """Why these files are not this model's weights in this layout (other names or shapes, a scale of no weight
        or of another shape than a scalar or one per row), else None."""
        if self.unnamed:
            return self.unnamed
        missing = sorted(set(self.segments) - set(self.handles))
        extra = sorted(set(self.handles) - set(self.segments))
        if missing or extra:
            return f"{len(missing)} tensors missing (e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]})"
        shapes = {}
        for key, runs in self.segments.items():
            handle, own = self.handles[key]
            shape = shapes[key] = tuple(handle.get_slice(own).get_shape())
            want = (sum(n for *_, n in runs), *self.shapes[runs[0][0]][1:]) if self.shapes[runs[0][0]] else ()
            if shape != want and not (shape in ((), (1,)) and want in ((), (1,))):
                return f"{key} has shape {list(shape)}, the model's {list(want)}"
        for key, (handle, own) in self.scales.items():
            scale = tuple(handle.get_slice(own).get_shape())
            if not shapes.get(key):
                return f"{own} scales no weight of this model"
            if math.prod(scale) not in (1, shapes[key][0]) or len(scale) > 2 or scale[1:] not in ((), (1,)):
                return f"{own} (shape {list(scale)}) is not a scale of a weight's rows: a scalar or one per row"
        return None

    def _scale(self, key: str, rows: int) -> torch.Tensor | None:
        """The scale of checkpoint tensor ``key`` in float32, shaped to multiply its ``rows`` x ...: a scalar, or
        [rows, 1] (one per output row); None when it has none."""
        if key not in self.scales:
            return None
        handle, own = self.scales[key]
        scale = handle.get_tensor(own).float()
        return scale.reshape(()) if scale.numel() == 1 else scale.reshape(rows, 1)

    def fill(self, module, prefix: str, on, dtype: torch.dtype) -> None:
        """Read ``module``'s tensors (its name in the model: ``prefix``) in ``dtype`` on the CPU, each checkpoint
        tensor once, and move the module to ``on``."""
        mine = [k for k in self.shapes if k.startswith(prefix)]
        local = {k: torch.empty(self.shapes[k], dtype=dtype) for k in mine}
        for key in dict.fromkeys(src for k in mine for src in self.sources[k]):
            handle, own = self.handles[key]
            tensor = handle.get_tensor(own)  # this one tensor, read from the memory-mapped file
            scale = self._scale(key, len(tensor)) if tensor.dim() else None
            for name, at, start, n in self.segments[key]:
                dest = local[name]
                if not dest.dim():
                    dest.copy_(tensor.reshape(()))
                    continue
                rows = tensor[start:start + n]
                if scale is not None:  # scaled fp8: the real weight, in float32 for these rows only
                    rows = rows.float() * (scale if not scale.dim() else scale[start:start + n])
                dest[at:at + n].copy_(rows)  # the cast to dtype happens here (fp8 upcast included)
        module.load_state_dict({k[len(prefix):]: v for k, v in local.items()}, strict=True, assign=True)
        module.to(on)


def load_by_block(cls, config: dict, files, family: str, layout: str, place: Placement, *, whole: bool = True):
    """``cls`` (FluxTransformer2DModel / SD3Transformer2DModel) with ``config``, its weights read from ``files``
    block by block and placed by ``place`` (:func:`fill_by_block`), frozen. None, with a warning, when the files are
    not in a layout this reads (the caller then loads the whole transformer with diffusers); a UserError when such
    files are scaled fp8 (diffusers would drop the scales) or, with ``whole`` off, when no other reader would take
    them (a diffusers-layout file of another model than ``config``'s)."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta; buffers (SD3's positional table) real, as diffusers builds them
        model = cls.from_config(config)
    names = {id(m): n for n, m in model.named_modules()}
    with contextlib.ExitStack() as stack:
        checkpoint = Checkpoint(files, model, family, layout, stack)
        why = checkpoint.mismatch()
        if why is not None and checkpoint.scaled:
            raise UserError(f"{', '.join(str(f) for f in files)} is a scaled fp8 checkpoint (per-layer scale_weight "
                            f"tensors) that does not fit this model ({why}); no other loader applies its scales: pass "
                            "the model folder it belongs to as model_components, or its bf16 or plain fp8 file")
        if why is not None and not whole:
            raise UserError(f"{', '.join(str(f) for f in files)} does not fit the transformer its model_components "
                            f"folder describes ({why}): pass the model folder this transformer belongs to")
        if why is not None:
            log.warning("%s is not read block by block (%s): diffusers loads the whole transformer into host memory "
                        "first", ", ".join(str(f) for f in files), why)
            return None
        count = fill_by_block(model, place, lambda module, _, on: checkpoint.fill(
            module, names[id(module)] + ".", on, place.dtype))
    model.requires_grad_(False).eval()
    log.info("%s read block by block to %s%s%s", type(model).__name__, place.device,
             f" ({place.host_blocks} blocks kept in host memory)" if place.host_blocks else "",
             "" if not count else ", the blocks stored in fp8" if place.mode == "fp8" else  # (store_fp8: the count)
             f": {count} Linear layers quantized to {place.mode}")
    return model


__all__ = ["Checkpoint", "Placement", "check_readable", "fill_by_block", "folder_files", "load_by_block", "materialize",
           "materialize_quantized", "strip_prefix"]

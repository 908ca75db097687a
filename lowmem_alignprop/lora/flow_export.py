"""The flow families' LoRA (SD3/SD3.5 and FLUX.1) in the layout ComfyUI and kohya sd-scripts read.

Those tools run the transformers under their original module names -- Stability's MMDiT
(``joint_blocks.N.x_block.attn.qkv``) and Black Forest Labs' FLUX (``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1``) -- where one Linear computes q, k and v together (FLUX's single blocks also the MLP's
input: ``linear1`` rows are ``[q; k; v; mlp]``, the MLP 4x the width). diffusers splits them (``attn.to_q``, ...),
and so does our peft LoRA. A kohya file names the original module (``lora_unet_`` + its path, dots as
underscores: what ComfyUI's generic key map builds from the model's ``diffusion_model.*`` weights, and what
sd-scripts' ``networks/lora_sd3.py`` / ``lora_flux.py`` write), so the LoRAs of a fused module's parts are fused
exactly: ``lora_down`` is their A matrices stacked (rank = the sum of theirs), ``lora_up`` block-diagonal (each
part's B in its own rows and its own columns, zeros elsewhere: a part we do not train, FLUX's MLP rows, stays
zero), and one ``alpha`` = scale x fused rank, so that the loaders' ``alpha / rank x up @ down`` is the sum of the
parts' ``scale x B @ A`` in their rows. Parts trained with another scale (peft's ``alpha_pattern``) get their
ratio folded into their B block. ``kohya_to_peft`` is the exact inverse (``--init-lora`` of such a file): a
block-diagonal fused LoRA splits back into the parts' own ranks; a dense one (another trainer's) gives every part
the whole ``lora_down``.

kohya's ``ss_base_model_version`` is what sd-scripts writes: ``flux1`` for FLUX.1; for SD3 the MMDiT's type,
``5-large`` (qk-norm), ``5-medium`` (qk-norm and dual attention, MMDiT-X) or ``medium`` (SD3 Medium).
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import torch

from lowmem_alignprop.lora.kohya_layers import (COMFY_ENCODER_PREFIX, KOHYA_SUFFIX, WEIGHT_DIFFERENCES,
                                                    comfy_encoder_name, comfy_encoder_refusal, first_changed,
                                                    kohya_encoder_unread, lora_suffix, weight_difference_refusal)
from lowmem_alignprop.models.lora_layers import FLOW_BLOCK_FF, FLUX_SINGLE_FF, KOHYA_ENCODERS, T5_KEYS
from lowmem_alignprop.run.filenames import LORA_WEIGHT_NAME
from lowmem_alignprop.settings.errors import UserError, quote
from lowmem_alignprop.settings.model_kind import SINGLE_FILE_SUFFIXES

SD3, FLUX = "sd3", "flux"
QKV = {"to_q": 0, "to_k": 1, "to_v": 2}
ADD_QKV = {"add_q_proj": 0, "add_k_proj": 1, "add_v_proj": 2}
FLUX_MLP_RATIO = 4  # FLUX.1's single blocks: linear1 rows are q, k, v (the width each) and the MLP (4x the width)
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
# FLUX.1's layers outside its blocks (diffusers' path -> BFL's), which a LoRA adapts beside the blocks' (kept as an
# --init-lora had them): as diffusers' kohya FLUX reader maps them back
_FLUX_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
             "norm_out.linear": "final_layer.adaLN_modulation.1",
             **{f"time_text_embed.{ours}.linear_{i}": f"{theirs}.{io}_layer" for ours, theirs in (
                 ("timestep_embedder", "time_in"), ("text_embedder", "vector_in"), ("guidance_embedder", "guidance_in"))
                for i, io in ((1, "in"), (2, "out"))}}
SWAPPED = "norm_out.linear"  # its rows: BFL's final modulation is (shift, scale), diffusers' (scale, shift)


def family_of_weights(modules) -> str:
    """FLUX.1 has single-stream blocks, SD3 none (used when the base model does not tell)."""
    return FLUX if any(m.startswith("single_transformer_blocks.") for m in modules) else SD3


def _table(family: str, kind: str) -> tuple[str, dict[str, tuple[str, int, int]]]:
    """The original block name and {diffusers path in the block: (original path, slot, slots)}."""
    if family == FLUX and kind == "single_transformer_blocks":
        return "single_blocks", {**{f"attn.{k}": ("linear1", i, 4) for k, i in QKV.items()},
                                 "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", 0, 1),
                                 "norm.linear": ("modulation.lin", 0, 1)}
    if family == FLUX:
        return "double_blocks", {**{f"attn.{k}": ("img_attn.qkv", i, 3) for k, i in QKV.items()},
                                 **{f"attn.{k}": ("txt_attn.qkv", i, 3) for k, i in ADD_QKV.items()},
                                 "attn.to_out.0": ("img_attn.proj", 0, 1), "attn.to_add_out": ("txt_attn.proj", 0, 1),
                                 "ff.net.0.proj": ("img_mlp.0", 0, 1), "ff.net.2": ("img_mlp.2", 0, 1),
                                 "ff_context.net.0.proj": ("txt_mlp.0", 0, 1), "ff_context.net.2": ("txt_mlp.2", 0, 1),
                                 "norm1.linear": ("img_mod.lin", 0, 1), "norm1_context.linear": ("txt_mod.lin", 0, 1)}
    if kind == "transformer_blocks":
        return "joint_blocks", {**{f"attn.{k}": ("x_block.attn.qkv", i, 3) for k, i in QKV.items()},
                                **{f"attn.{k}": ("context_block.attn.qkv", i, 3) for k, i in ADD_QKV.items()},
                                **{f"attn2.{k}": ("x_block.attn2.qkv", i, 3) for k, i in QKV.items()},
                                "attn.to_out.0": ("x_block.attn.proj", 0, 1),
                                "attn.to_add_out": ("context_block.attn.proj", 0, 1),
                                "attn2.to_out.0": ("x_block.attn2.proj", 0, 1),
                                "ff.net.0.proj": ("x_block.mlp.fc1", 0, 1), "ff.net.2": ("x_block.mlp.fc2", 0, 1),
                                "ff_context.net.0.proj": ("context_block.mlp.fc1", 0, 1),
                                "ff_context.net.2": ("context_block.mlp.fc2", 0, 1)}
    return "", {}  # SD3 has no single-stream blocks


def original_slot(module: str, family: str) -> tuple[str, int, int]:
    """(original module path, slot, slots) of a diffusers transformer module: ``slot`` is its part of a fused
    module (q=0, k=1, v=2; FLUX's linear1 has a 4th, the MLP), ``slots`` their number (1: not fused)."""
    m = _BLOCK.match(module)
    if m is not None:
        kind, n, rest = m.groups()
        block, names = _table(family, kind)
        if rest in names:
            path, slot, slots = names[rest]
            return f"{block}.{n}.{path}", slot, slots
    if family == FLUX and module in _FLUX_TOP:
        return _FLUX_TOP[module], 0, 1
    raise UserError(f"the LoRA adapts {quote(module)}, which has no name in the original "
                    f"{'FLUX' if family == FLUX else 'MMDiT'} layout: export it with --format diffusers or peft")


def kohya_name(original: str) -> str:
    return "lora_unet_" + original.replace(".", "_")


def _slot_rows(slots: int, width: int) -> list[int]:
    """Row counts of a fused module's parts: three equal q/k/v, and FLUX's MLP part 4x as wide."""
    return [width] * 3 + ([FLUX_MLP_RATIO * width] if slots == 4 else []) if slots > 1 else [width]


def kohya_state_dict(weights: dict[str, torch.Tensor], scale, family: str) -> dict[str, torch.Tensor]:
    """``weights``: peft names (``transformer_blocks.0.attn.to_q.lora_A.weight``); ``scale(module)``: the factor
    peft applies to its ``B @ A``. Returns the kohya state dict (fused modules fused exactly, module doc)."""
    groups: dict[str, dict[int, str]] = {}
    slots_of: dict[str, int] = {}
    for module in sorted({k[: -len(".lora_A.weight")] for k in weights if k.endswith(".lora_A.weight")}):
        original, slot, slots = original_slot(module, family)
        groups.setdefault(original, {})[slot] = module
        slots_of[original] = slots
    out = {}
    for original, parts in groups.items():
        order = sorted(parts)
        a = [weights[f"{parts[s]}.lora_A.weight"].float() for s in order]
        b = [weights[f"{parts[s]}.lora_B.weight"].float() for s in order]
        ref = scale(parts[order[0]])
        rows = _slot_rows(slots_of[original], b[0].shape[0])
        starts = [sum(rows[:s]) for s in range(len(rows))]
        down = torch.cat(a)
        up = torch.zeros(sum(rows), down.shape[0])
        col = 0
        for s, a_s, b_s in zip(order, a, b):
            ratio = scale(parts[s]) / ref  # a part trained with another scale: the ratio goes into its B block
            up[starts[s]:starts[s] + rows[s], col:col + a_s.shape[0]] = b_s if ratio == 1.0 else b_s * ratio
            col += a_s.shape[0]
        name = kohya_name(original)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(ref * down.shape[0], dtype=torch.float32)
    return out


def kohya_holds(kept: dict[str, torch.Tensor], family: str) -> bool:
    """Whether :func:`kohya_kept` writes these kept transformer layers (``Lora.kept``'s, without ``transformer.``)
    rather than refusing them: FLUX.1's inside its blocks only (the export advice of another refusal names kohya
    where it does)."""
    return family == FLUX and not _outside_blocks(kept)


def _outside_blocks(kept: dict[str, torch.Tensor]) -> list[str]:
    """The FLUX.1 layers of ``kept`` outside its blocks (diffusers' paths), sorted."""
    return sorted({k.rsplit(".lora_", 1)[0] for k in kept} & set(_FLUX_TOP))


def kohya_kept(kept: dict[str, torch.Tensor], family: str, label: str, peft_holds: bool = True
               ) -> dict[str, torch.Tensor]:
    """A FLUX.1 run's kept transformer linears (peft names, scale folded into B: ``Lora.kept`` without its
    ``transformer.``) in kohya's names (the blocks' modulation: ``img_mod_lin``, ``txt_mod_lin``,
    ``modulation_lin``), alpha = rank, as diffusers' kohya FLUX reader reads them back. Raises UserError naming
    --format diffusers (``label``: the LoRA, for the line) for SD3's, transformer's or text encoders' (no kohya
    reader in diffusers to check them against) and for FLUX.1's layers outside the blocks (``img_in``,
    ``final_layer``...: diffusers 0.42's reader names them without ``transformer.``, and its loader then drops them
    without a word); and --format peft too where ``peft_holds`` (no kept text-encoder layer, which a peft adapter of
    the transformer cannot hold: named, that export refused in its turn)."""
    from lowmem_alignprop.models.kept_lora import layer_count, them

    instead = "export --format diffusers" + (" or --format peft" if peft_holds else "")
    if family != FLUX:
        n = layer_count(kept)
        raise UserError(f"--format kohya: {label} also holds {n} SD3 layer{'s' if n != 1 else ''} its run "
                        f"kept as its --init-lora had {them(n)}, whose kohya names no reader we can check reads back "
                        f"(diffusers' SD3 loader reads no kohya names): {instead}")
    top = _outside_blocks(kept)
    if top:
        raise UserError(f"--format kohya: {label} also holds {len(top)} FLUX.1 layer{'s' if len(top) > 1 else ''} "
                        f"outside its blocks that its run kept as its --init-lora had {them(len(top))} (e.g. "
                        f"{quote(top[0])}: {_FLUX_TOP[top[0]]} in kohya's names), which diffusers' kohya FLUX reader "
                        f"drops without a word: {instead}")
    out = {}
    for key in sorted(k for k in kept if k.endswith(".lora_A.weight")):
        module = key[: -len(".lora_A.weight")]
        original, _, slots = original_slot(module, family)
        if slots > 1:  # (a part of a fused module is a layer the run trains: never kept)
            raise UserError(f"--format kohya: {label} keeps {quote(module)}, a part of the fused {original}: "
                            f"{instead}")
        up = kept[f"{module}.lora_B.weight"].float()
        name = kohya_name(original)
        out[f"{name}.lora_down.weight"] = kept[key].float().contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(kept[key].shape[0]), dtype=torch.float32)
    return out


# ---------------------------------------------------------------------------------------------------------
# the inverse: a kohya SD3/FLUX file -> peft weights (--init-lora)
# ---------------------------------------------------------------------------------------------------------

# kohya's names (lora_unet_ + the original transformer's path, dots as underscores), and the original paths themselves
# under diffusion_model. with diffusers' lora_A/lora_B or kohya's lora_down/lora_up (what ComfyUI reads and saves)
_KOHYA_FLOW = re.compile(r"^(?:lora_unet_|(?:model\.)?diffusion_model\.)(double_blocks|single_blocks|joint_blocks)[._]")
_ORIGINAL_KEY = re.compile(r"^(?:model\.)?diffusion_model\.(.+)(\.lora_A\.weight|\.lora_B\.weight|\.lora_down\.weight|"
                           r"\.lora_up\.weight|\.alpha)$")


def is_kohya_flow(keys) -> bool:
    return any(_KOHYA_FLOW.match(k) for k in keys)


def kohya_key_of(module: str, keys) -> str | None:
    """The down (A) key of an SD3/FLUX LoRA in kohya's or the original transformer's names (``keys``: its file's) that
    holds the transformer layer ``module`` (diffusers' path, ``single_transformer_blocks.0.proj_mlp``; a fused
    module's part: ``lora_unet_single_blocks_0_linear1.lora_down.weight``), as :func:`kohya_names` reads it; None
    where it holds none."""
    try:
        name = kohya_name(original_slot(module, family_of_kohya_keys(keys) or SD3)[0])
    except UserError:  # (no name in the original layout: no such key)
        return None
    return next((k for k in sorted(keys) if k.endswith(("lora_down.weight", "lora_A.weight")) and (
        kohya_name(m.group(1)) if (m := _ORIGINAL_KEY.match(k)) else k.split(".")[0]) == name), None)


def kohya_names(state: dict[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    """``state`` with the original transformer's paths (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``)
    under kohya's names (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``), and ComfyUI's CLIP layers
    (``text_encoders.clip_l.transformer.text_model.encoder.layers.0...``, SD3's ``clip_g``) under kohya's
    (``lora_te1_``, ``lora_te2_``: kohya_layers.comfy_encoder_name, the rule a ComfyUI UNet LoRA's are read by); a
    CLIP layer diffusers has no name for (its embeddings, CLIP-L's text_projection) left out where it changes nothing
    (all zeros, as ComfyUI's extract node writes a layer the fine-tune left as it was), else refused as a ComfyUI UNet
    LoRA's (UserError: ``label``, the option and path, and kohya_layers.comfy_encoder_refusal of the key
    kohya_layers.first_changed names, as the UNet and SD3/FLUX reader checks name theirs), and so is such a layer
    in kohya's names (kohya_layers.kohya_encoder_unread: sd-scripts' lora_te1_ embeddings); ComfyUI's full weight
    or bias differences (``.diff``, ``.diff_b``) left out where all zero (as diffusers' FLUX reader does), else refused
    (diffusers' FLUX reader dropped them with a log line: the images were the LoRA's without them); other keys (T5's
    ``text_encoders.t5xxl.``) as they are."""
    out, unnamed = {}, []
    if changed := sorted(k for k, v in state.items() if k.endswith(WEIGHT_DIFFERENCES) and v.any()):
        raise UserError(f"{label} {weight_difference_refusal(changed[0])}")
    for key, value in state.items():
        if key.endswith(WEIGHT_DIFFERENCES):  # (all zeros: they change nothing)
            continue
        m = _ORIGINAL_KEY.match(key)
        name = kohya_name(m.group(1)) + KOHYA_SUFFIX.get(m.group(2), m.group(2)) if m else comfy_encoder_name(key)
        if name is None and key.startswith(COMFY_ENCODER_PREFIX) and not key.startswith(T5_KEYS) and lora_suffix(key) \
                or kohya_encoder_unread(key):  # (sd-scripts' lora_te1_ embeddings: diffusers drops them too)
            unnamed.append(key)
            continue
        out[name or key] = value
    if first := first_changed((state, k) for k in unnamed):  # (all-zero ones left out: they change nothing)
        raise UserError(f"{label} {comfy_encoder_refusal(first)}")
    return out


def family_of_kohya_keys(keys) -> str | None:
    """flux (kohya's double/single blocks) or sd3 (its joint blocks) for kohya's SD3/FLUX names; None for others."""
    for k in keys:
        if m := _KOHYA_FLOW.match(k):
            return SD3 if m.group(1) == "joint_blocks" else FLUX
    return None


def _inverse_map(family: str, names: set[str]) -> dict[str, dict[int, str]]:
    """kohya module name -> {slot: diffusers module} for the blocks the file names."""
    out: dict[str, dict[int, str]] = {}
    blocks = {int(m.group(2)) for k in names if (m := re.match(r"lora_unet_(\w+?_blocks)_(\d+)_", k))}
    candidates = []
    for n in blocks:  # the layers of either lora_layers (models/lora_layers.py)
        candidates += [f"transformer_blocks.{n}.attn.{k}" for k in (*QKV, *ADD_QKV, "to_out.0", "to_add_out")]
        candidates += [f"transformer_blocks.{n}.{k}" for k in FLOW_BLOCK_FF]
        if family == FLUX:  # (and the modulation layers, kept as they came)
            candidates += [f"transformer_blocks.{n}.{k}" for k in ("norm1.linear", "norm1_context.linear")]
            candidates += [f"single_transformer_blocks.{n}.attn.{k}" for k in QKV]
            candidates += [f"single_transformer_blocks.{n}.{k}" for k in (*FLUX_SINGLE_FF, "norm.linear")]
        else:
            candidates += [f"transformer_blocks.{n}.attn2.{k}" for k in (*QKV, "to_out.0")]
    for module in candidates + (list(_FLUX_TOP) if family == FLUX else []):
        original, slot, _ = original_slot(module, family)
        out.setdefault(kohya_name(original), {})[slot] = module
    return out


def _zero_outside(block: torch.Tensor, lo: int, hi: int) -> bool:
    """Every column of ``block`` outside ``lo:hi`` is exactly zero (a block-diagonal fused lora_up)."""
    return not block[:, :lo].any() and not block[:, hi:].any()


def second_clip_refusal(keys, label: str) -> str | None:
    """The line for a FLUX.1 LoRA in kohya's names that adapts a second CLIP (``lora_te2_``: SD3's CLIP-G; FLUX.1 has
    CLIP-L alone, sd-scripts' lora_te1_), whose layers diffusers' FLUX reader drops with a log line; None without
    any. ``label``: the option and path."""
    if second := sorted((k for k in keys if k.startswith("lora_te2_")), key=lambda k: not k.endswith("_down.weight")):
        return (f"{label} adapts a second CLIP text encoder (e.g. {quote(second[0])}), which FLUX.1 has not (its one "
                "CLIP is lora_te1_): pass a LoRA of this model")
    return None


def untrained_flux_layer(state: dict[str, torch.Tensor]) -> str | None:
    """The first layer of a FLUX.1 LoRA in kohya's names (:func:`kohya_names`) that :func:`kohya_to_peft` does not
    split (a layer lowmem-alignprop does not train: the blocks' modulation, img_in, final_layer...), None where it
    holds only those it trains (its CLIP layers, lora_te1_, are split as diffusers' SDXL reader names them:
    :func:`kohya_as_diffusers`), or for an SD3 file. diffusers' FLUX kohya reader maps every such layer."""
    names = {k.split(".")[0] for k in state if not k.startswith(tuple(KOHYA_ENCODERS))}
    if not any(n.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for n in names):
        return None
    known = _inverse_map(FLUX, names)
    return next((n for n in sorted(names) if n not in known), None)


def kohya_to_peft(state: dict[str, torch.Tensor], label: str) -> tuple[dict[str, torch.Tensor], str]:
    """A kohya SD3/FLUX LoRA -> (peft weights with each layer's scale folded into B so that peft's scale is 1,
    family). Raises UserError (``label``: the option and path, e.g. ``--init-lora x``) for a module this trainer does
    not adapt (the modulation layers, ...). FLUX's MLP rows of ``linear1`` become ``proj_mlp`` (lora_layers
    attention+ff) when they are not zero."""
    names = {k.split(".")[0] for k in state}
    family = FLUX if any(n.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for n in names) else SD3
    known = _inverse_map(family, names)
    out = {}
    for name in sorted(names):
        if name not in known or f"{name}.lora_down.weight" not in state:
            raise UserError(f"{label} adapts {quote(name)}, a layer lowmem-alignprop does not train (its LoRA is on "
                            "the attention projections and, with lora_layers=attention+ff, the feed-forward layers): "
                            "pass a LoRA of those layers")
        down, up = state[f"{name}.lora_down.weight"].float(), state[f"{name}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else float(rank)
        parts = known[name]
        slots = max(parts) + 1 if len(parts) > 1 else 1
        rows = _slot_rows(slots, up.shape[0] // (3 + FLUX_MLP_RATIO) if slots == 4 else up.shape[0] // slots)
        starts = [sum(rows[:s]) for s in range(len(rows))]
        mlp = slots == 4 and bool(up[starts[3]:].abs().max() > 0)  # FLUX's MLP input rows trained (proj_mlp)
        trained = [s for s in sorted(parts) if s < 3 or mlp] if slots > 1 else [0]
        r = rank // len(trained) if rank % len(trained) == 0 else 0
        diagonal = r > 0 and all(_zero_outside(up[starts[s]:starts[s] + rows[s]], c * r, (c + 1) * r)
                                 for c, s in enumerate(trained))
        for c, s in enumerate(trained):
            block = up[starts[s]:starts[s] + rows[s]]
            a, b = (down[c * r:(c + 1) * r], block[:, c * r:(c + 1) * r]) if diagonal else (down, block)
            out[f"{parts[s]}.lora_A.weight"] = a.clone()  # its own copy: a dense lora_down is every part's A
            b = torch.cat(b.chunk(2)[::-1]) if parts[s] == SWAPPED else b  # (BFL's rows: shift, scale)
            out[f"{parts[s]}.lora_B.weight"] = (b * (alpha / rank)).contiguous()  # the loaders' alpha / rank
    return out, family


def kohya_as_diffusers(file: Path, label: str, named: dict[str, torch.Tensor] | None = None) -> Path:
    """An SD3/FLUX kohya file split back into the transformer's own layers (:func:`kohya_to_peft`), written in
    diffusers' layout into a temporary folder (removed when the process ends): what ``--init-lora`` and
    ``sample --lora`` load; its CLIP text-encoder layers (``lora_te1_``, SD3's ``lora_te2_``) beside them, as
    diffusers' SDXL kohya reader names them (T5's, ``lora_te3_``, raise UserError: no diffusers loader reads them).
    ``label``: the option and path, for the messages; ``named``: the file's weights under kohya's names
    (:func:`kohya_names`) where they were read already."""
    import atexit
    import shutil
    import tempfile

    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from peft import LoraConfig
    from safetensors.torch import load_file

    from lowmem_alignprop.lora.kohya_layers import kohya_encoder_layers
    from lowmem_alignprop.models.flow_lora_parts import t5_refusal
    from lowmem_alignprop.models.kept_lora import EITHER_TEXT_MODEL, TEXT_MODEL, layer_ranks
    from lowmem_alignprop.models.lora_metadata import lora_metadata

    state = named if named is not None else kohya_names(load_file(str(file)), label)
    encoders = {k: v for k, v in state.items() if k.startswith(tuple(KOHYA_ENCODERS))}  # (SD's lora_te_: CLIP-L)
    if t5 := sorted(k for k in state if k.startswith(T5_KEYS)):
        raise UserError(t5_refusal(label, t5[0]))
    weights, family = kohya_to_peft({k: v for k, v in state.items() if k not in encoders}, label)
    if family == FLUX and (refusal := second_clip_refusal(encoders, label)):
        raise UserError(refusal)
    out = Path(tempfile.mkdtemp(prefix="lowmem-alignprop-lora-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    parts = {"transformer": weights, **(kohya_encoder_layers(encoders) if encoders else {})}
    layers = {}
    for part, named in parts.items():  # (each part its adapter config: diffusers' reader of a file with one for
        ranks = layer_ranks(named)  # any part reads none for a part without)
        common = collections.Counter(ranks.values()).most_common(1)[0][0]
        # (the run says whether it trains them: their rank, or kept as they came); an encoder's path under
        # transformers 4 or 5 (CLIP's text_model. level or none)
        other = {f"^{EITHER_TEXT_MODEL if part != 'transformer' else ''}{m.removeprefix(TEXT_MODEL)}": r
                 for m, r in ranks.items() if r != common}
        # the file's own layers by path: a suffix (to_q) would name every block's, which peft (reading the state
        # dict) leaves out but warns of ("The PEFT config contained these additional target modules")
        targets = sorted({k.removesuffix(".lora_A.weight").removeprefix(TEXT_MODEL) for k in named if ".lora_A." in k})
        # the loaders' alpha / rank is folded into each lora_B: saved with alpha = rank (peft's scale 1)
        layers[f"{part}_lora_layers"] = named
        layers[f"{part}_lora_adapter_metadata"] = lora_metadata(LoraConfig(
            r=common, lora_alpha=common, target_modules=targets, rank_pattern=other, alpha_pattern=other))
    (FluxPipeline if family == FLUX else StableDiffusion3Pipeline).save_lora_weights(str(out), **layers)
    return out / LORA_WEIGHT_NAME


# ---------------------------------------------------------------------------------------------------------
# which model: kohya's ss_base_model_version, sai's modelspec.architecture
# ---------------------------------------------------------------------------------------------------------

def transformer_config(base_model: str | None, components: str = "", revision: str = "") -> dict | None:
    """The base model's transformer config, when the base model is a shipped architecture or a local folder, or a
    transformer file with its model_components folder (that folder's config, FLUX's variant as the file's keys say:
    as loading reads it; a hub id's model_index.json and transformer config fetched if need be, not its parts, at
    ``revision``: the commit its run's parts came from, components_revision; "": main)."""
    if not base_model:
        return None
    from lowmem_alignprop.models.flow_loading import ARCH_FLOW_DIR, FLOW_ARCHS, single_file_transformer

    if components and Path(base_model).expanduser().is_file():
        try:
            return single_file_transformer(base_model, components, configs_only=True,  # (a hub id: 2 files)
                                           revision=revision)[1]
        except (UserError, OSError):  # gone or changed since: the metadata falls back to the modules' shapes
            return None
    folder = ARCH_FLOW_DIR / base_model if base_model in FLOW_ARCHS else Path(base_model).expanduser()
    try:
        return json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def family_of_model(base_model: str | None) -> str | None:
    """sd3 or flux from the base model's folder (model_index.json) or shipped name; None when it does not tell."""
    if not base_model:
        return None
    from lowmem_alignprop.models.flow_loading import FLOW_ARCHS, FLOW_PIPELINES
    from lowmem_alignprop.settings.model_kind import KIND_FAMILY
    from lowmem_alignprop.settings.paths import pipeline_class

    if base_model in FLOW_ARCHS:
        return KIND_FAMILY[base_model]
    return FLOW_PIPELINES.get(pipeline_class(Path(base_model).expanduser()))


def base_model_version(family: str, base_model: str | None, modules, components: str = "",
                       revision: str = "") -> str:
    """kohya's ss_base_model_version of an SD3/FLUX LoRA (SD3 from its transformer config: qk-norm, dual attention;
    ``revision``: a hub id model_components' commit, :func:`transformer_config`)."""
    if family == FLUX:
        return "flux1"
    conf = transformer_config(base_model, components, revision)
    dual = any(".attn2." in m for m in modules) or bool((conf or {}).get("dual_attention_layers"))
    if conf is not None and not conf.get("qk_norm"):
        return "medium"  # SD3 Medium: no qk-norm
    return "5-medium" if dual else "5-large"


def architecture(family: str, base_model: str | None, modules, components: str = "", revision: str = "") -> str:
    """sai modelspec.architecture (what sd-scripts writes beside ss_base_model_version)."""
    if family == FLUX:
        conf = transformer_config(base_model, components, revision)
        return f"flux-1-{'schnell' if conf is not None and not conf.get('guidance_embeds') else 'dev'}/lora"
    return f"stable-diffusion-3-{base_model_version(family, base_model, modules, components, revision)}/lora"


# the model a LoRA's ss_base_model_version names (base_model_version: the header's rule), as the card says it
MODEL_NAMES = {"flux1": "FLUX.1", "medium": "SD3 Medium", "5-medium": "SD3.5 Medium", "5-large": "SD3.5 Large"}


def usage(fmt: str, files: list[str], base: str, merged: float | None, family: str, components: str,
          version: str = "", components_revision: str = "") -> list[str]:
    """The model card's "Use" lines for an SD3/FLUX export (``version``: :func:`base_model_version`'s;
    ``components_revision``: the commit of a hub id ``components`` the run's parts came from)."""
    pipeline = "FluxPipeline" if family == FLUX else "StableDiffusion3Pipeline"
    cls = transformer_class(family)
    dev = other_variant(base, family, components, components_revision)  # a schnell file with dev's folder, or back
    if merged is not None and fmt == "single-file":  # the merged transformer in the original layout
        pin = f" --set components_revision={components_revision}" if components_revision else ""
        at = f", config_revision=\"{components_revision}\"" if components_revision else ""
        at += f", guidance_embeds={dev}" if dev is not None else ""
        return [f"- ComfyUI: copy `{files[0]}` to `ComfyUI/models/diffusion_models/` and pick it in a *Load "
                "Diffusion Model* node (the text encoders and VAE: the base model's"
                + (f", `{components}` at commit `{components_revision}`" if components_revision else "") + ").",
                f"- lowmem-alignprop: `--model {files[0]} --set model_components={components}{pin}`.",
                f"- diffusers: `{cls}.from_single_file(\"{files[0]}\", config=\"{components}\", "
                f"subfolder=\"transformer\"{at})`" + (f" ({variant_said(dev)}: in `{pipeline}.from_pretrained"
                                                     f"(\"{components}\", transformer=transformer)` set its "
                                                     f"scheduler as the run's, `{schedule_line(dev)}`)" if dev is
                                                     not None else "") + "."]
    if merged is not None:
        return ["```python", f"from diffusers import {pipeline}",
                f"pipe = {pipeline}.from_pretrained(\"THIS_FOLDER\")", "```",
                "- ComfyUI: the merged transformer is `transformer/` (diffusers layout); its *Load Diffusion Model* "
                "node reads a diffusers-layout transformer file in `ComfyUI/models/diffusion_models/`."]
    transformer = file_transformer(base, family, components, components_revision, dev)
    at = f", revision=\"{components_revision}\"" if components_revision else ""
    if fmt == "kohya":
        model = MODEL_NAMES.get(version, 'FLUX.1' if family == FLUX else 'SD3')
        trained_on = (f" it trained on: `{base}` in a *Load Diffusion Model* node, with the text encoders and VAE "
                      f"of `{components}`" + (f" at commit `{components_revision}`" if components_revision else "")
                      if transformer else "")
        return [f"- ComfyUI: copy `{files[0]}` to `ComfyUI/models/loras/` and pick it in a *LoraLoaderModelOnly* "
                f"(or *Load LoRA*) node after the {model} model{trained_on}.",
                # (Forge loads FLUX.1 LoRAs; SD3's, as far as we know, not: sd-scripts' lora_sd3 reads them)
                f"- kohya sd-scripts{' / Forge' if family == FLUX else ''}: the same file (`lora_unet_` + the original "
                "module names).",
                *(["- diffusers:", "```python", *_pipeline_lines(pipeline, cls, transformer, base, components, at,
                                                                 dev),
                   f"pipe.load_lora_weights(\"THIS_FOLDER\", weight_name=\"{files[0]}\")", "```"]
                  if family == FLUX else
                  ["- diffusers: use the diffusers export (`--format diffusers`): diffusers' SD3 loader reads no "
                   "kohya names."])]
    if fmt == "peft":
        return ["```python", *([f"from diffusers import {cls}", transformer] if transformer else []),
                "from peft import PeftModel", "transformer = PeftModel.from_pretrained(transformer, \"THIS_FOLDER\")"
                + ("" if transformer else f"  # {base}'s transformer"), "```"]
    return ["```python", *_pipeline_lines(pipeline, cls, transformer, base, components, at, dev),
            "pipe.load_lora_weights(\"THIS_FOLDER\")", "```"]


def _pipeline_lines(pipeline: str, cls: str, transformer: str, base: str, components: str, at: str,
                    dev: bool | None = None) -> list[str]:
    """The card's code that loads the pipeline a LoRA goes on: the base's, or (``transformer``: the line loading the
    run's transformer file) that file with model_components' other parts (``at``: their commit's revision=); ``dev``
    (:func:`other_variant`): the folder is the other FLUX.1 variant's, its scheduler set as the file's variant's."""
    if not transformer:
        return [f"from diffusers import {pipeline}", f"pipe = {pipeline}.from_pretrained(\"{base}\")"]
    lines = [f"from diffusers import {pipeline}, {cls}", transformer,
             f"pipe = {pipeline}.from_pretrained(\"{components}\", transformer=transformer{at})"]
    if dev is not None:
        lines[0] = f"from diffusers import FlowMatchEulerDiscreteScheduler, {pipeline}, {cls}"
        lines.append(f"{schedule_line(dev)}  # {variant_said(dev)}: as the run sampled")
    return lines


def transformer_class(family: str) -> str:
    """The diffusers class of an SD3/FLUX family's transformer, as the card's code names it."""
    return "FluxTransformer2DModel" if family == FLUX else "SD3Transformer2DModel"


def file_transformer(base: str, family: str, components: str, components_revision: str = "",
                     dev: bool | None = None) -> str:
    """The line that loads a run's transformer file (``--model FILE --set model_components=...``) as training read it:
    diffusers' ``from_single_file`` with the transformer config of ``components`` (a hub id's at
    ``components_revision``, the commit its run's parts came from; ``dev``, :func:`other_variant`: the folder is the
    other FLUX.1 variant's, its guidance embedding as the file has it); "" for a base that is no such file."""
    if components == base or Path(base).suffix.lower() not in SINGLE_FILE_SUFFIXES:
        return ""
    cls = transformer_class(family)
    at = f", config_revision=\"{components_revision}\"" if components_revision else ""
    at += f", guidance_embeds={dev}" if dev is not None else ""
    return (f"transformer = {cls}.from_single_file(\"{base}\", config=\"{components}\", subfolder=\"transformer\""
            f"{at})  # the transformer file it trained on")


def other_variant(base: str, family: str, components: str, revision: str = "") -> bool | None:
    """Whether a FLUX.1 transformer file (``base``) is dev (True: its guidance embedding) or schnell (False), where
    model_components' folder (a hub id's at ``revision``) is the other variant's: its config's guidance_embeds then
    fails diffusers' from_single_file (an IndexError for a schnell file with dev's) and its scheduler samples
    otherwise than training did (models/flow_loading.flux_variant_scheduler). None where they agree, or either is
    not at hand (the card as for the folder's own variant)."""
    if family != FLUX or not components or components == base or not Path(base).expanduser().is_file():
        return None
    from lowmem_alignprop.models.flow_loading import components_folder

    file = transformer_config(base, components, revision)  # the folder's config, guidance as the file's keys say
    try:
        folder = json.loads((components_folder(components, configs_only=True, revision=revision) / "transformer"
                             / "config.json").read_text(encoding="utf-8"))
    except (UserError, OSError, ValueError):
        return None
    if file is None or bool(file.get("guidance_embeds")) == bool(folder.get("guidance_embeds")):
        return None
    return bool(file["guidance_embeds"])


def variant_said(dev: bool) -> str:
    """How the card names a transformer file of the other FLUX.1 variant than model_components' folder."""
    return ("FLUX.1-dev's transformer with FLUX.1-schnell's folder" if dev else
            "FLUX.1-schnell's transformer with FLUX.1-dev's folder")


def schedule_line(dev: bool) -> str:
    """The card's code that sets a pipeline's scheduler as the FLUX.1 variant ``dev`` samples (its shift)."""
    from lowmem_alignprop.models.flow_loading import variant_schedule

    told = ", ".join(f"{k}={v!r}" for k, v in variant_schedule(dev).items())
    return f"pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, {told})"

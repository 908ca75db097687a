"""``--init-lora``: a LoRA to start training from (a run's lora/ folder, a checkpoint, a diffusers or kohya file, a
peft adapter folder), found and checked before any model loads, then copied into the adapter being trained.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from lowmem_alignprop.lora.hub_lora import hub_lora, weighted_hub_id
from lowmem_alignprop.lora.lora_files import lora_dir_of, nonfinite, safetensors_copy, temporary_folder
from lowmem_alignprop.lora.lora_files import is_peft_folder, lycoris_kind, not_a_lora
from lowmem_alignprop.lora.lora_formats import (attn_processor_as_diffusers, bare_lora_as_diffusers, bare_part,
                                                   kohya_alphas_folded, kohya_flow_for_diffusers, ldm_unet_refusal,
                                                   peft_as_diffusers)
from lowmem_alignprop.memory.quant import BNB_MODES
from lowmem_alignprop.models.flow_lora_parts import t5_refusal
from lowmem_alignprop.models.lora_layers import (LORA_DOWN_SUFFIXES, T5_KEYS, TEXT_ENCODER_KEYS, adapter_layers,
                                                trains_layer)
from lowmem_alignprop.run.filenames import LORA_WEIGHT_NAME
from lowmem_alignprop.run.tensor_files import (TensorFileError, is_safetensors, not_safetensors,
                                               read_safetensors_shapes)
from lowmem_alignprop.settings.errors import UserError, first_line, quote, quote_name

INIT_ADAPTER = "init"  # the name the starting LoRA loads under, before it is copied into the trained adapter
# a feed-forward layer's key in diffusers', peft's or kohya's names (lora_layers=attention+ff trains them)
_FF_KEY = re.compile(r"(^|[._])ff(_context)?[._]net[._]|[._]proj_mlp[._]|single_transformer_blocks\.\d+\.proj_out\.")


def init_lora_file(spec: str) -> Path:
    """``--init-lora``: the one ``.safetensors`` file diffusers' ``load_lora_weights`` reads for a LoRA given as a
    run's ``lora/`` folder (or the run folder), a training checkpoint, a diffusers or kohya file, a folder holding
    one such file (an ``export`` folder), or a peft adapter folder. A checkpoint, a peft folder and an SD3/FLUX
    kohya file (fused q/k/v, which diffusers' SD3 loader does not read) are written in diffusers' layout into a
    temporary folder first (removed when the process ends). Raises UserError."""
    file = _init_lora_source(spec)
    if is_safetensors(file):
        from safetensors.torch import load_file

        from lowmem_alignprop.lora import flow_export
        try:
            shapes = read_safetensors_shapes(file)
        except (TensorFileError, OSError) as e:  # a truncated or foreign file
            raise _damaged(spec, file, e) from None
        _check_an_adapter(spec, shapes)  # (the shapes tell diffusers' own embeddings: "<token>" -> its vectors)
        keys = list(shapes)
        if flow_export.is_kohya_flow(keys):  # (a FLUX.1 file's modulation layers: kept, as diffusers reads them)
            return kohya_flow_for_diffusers(load_file(str(file)), file, f"--init-lora {spec}")
        if any(".processor." in k for k in keys):  # (diffusers' layout before 0.21: converted)
            return attn_processor_as_diffusers(load_file(str(file))) or file
        if any(bare_part(k) for k in keys):  # (peft's names without diffusers' unet. / transformer.: prefixed)
            return bare_lora_as_diffusers(load_file(str(file)), file, f"--init-lora {spec}") or file
        if any(k.endswith(".alpha") for k in keys):  # (kohya's per-layer alphas, which diffusers misreads: folded)
            return kohya_alphas_folded(load_file(str(file))) or file
    return file


def _init_lora_source(spec: str) -> Path:
    named, kind, file = named_lora(spec)
    if kind == "checkpoint":
        from lowmem_alignprop.models.loading import write_checkpoint_lora
        return write_checkpoint_lora(named, temporary_folder() / "lora")
    if kind == "file":
        return file if is_safetensors(file) else _as_safetensors(file, spec)
    if kind == "peft":
        import json

        from lowmem_alignprop.lora.lora_files import PEFT_CONFIG_NAME
        try:
            dora = json.loads((named / PEFT_CONFIG_NAME).read_text(encoding="utf-8")).get("use_dora")
        except (OSError, ValueError, AttributeError):  # (peft_as_diffusers says what is wrong with it)
            dora = False
        if dora:
            raise UserError(f"--init-lora {spec} is a DoRA (its adapter_config.json: use_dora): this trainer trains "
                            "plain LoRA and cannot start from one; pass a plain LoRA")
        return peft_as_diffusers(named, f"--init-lora {spec}")
    return file


def named_lora(spec: str) -> tuple[Path, str, Path | None]:
    """(named, kind, file): what ``--init-lora spec`` names, the one rule :func:`init_lora_file` (the LoRA the run
    reads) and :func:`init_lora_source` (the user's own file, for its digest) both follow. ``kind``: "checkpoint"
    (``named`` its folder; ``file`` None: which of its weights files is the run's config's, said once where it is
    read), "file" (``named`` = ``file``: the path), "peft" (a peft adapter folder and its weights file) or "folder"
    (a run's lora/ folder, the run folder, a folder of one .safetensors file: ``file`` that file; a hub id's LoRA,
    lora/hub_lora.py: its snapshot folder in the hub cache and the file). A path that names none raises UserError."""
    from lowmem_alignprop.run.checkpoint import named_checkpoint

    path = Path(spec).expanduser()
    checkpoint = named_checkpoint(path)
    if checkpoint is not None:
        return checkpoint, "checkpoint", None
    if not path.exists() and (hub := hub_lora(spec, "--init-lora")) is not None:  # owner/name[/file.safetensors]
        return (hub.path.parent, "peft", hub.path) if hub.peft else (hub.snapshot, "folder", hub.path)
    if not path.exists() and (weighted := weighted_hub_id(spec)) is not None:  # sample's owner/name:0.8
        raise UserError(f"--init-lora {spec}: --init-lora takes no weight after the LoRA (sample's --lora "
                        f"LORA:WEIGHT): it starts from the LoRA as it is; pass --init-lora {weighted[0]}")
    if not path.exists():
        raise UserError(f"--init-lora {spec}: no such file or folder: pass a LoRA (a run's lora/ folder, a "
                        "checkpoint, a .safetensors file or a peft adapter folder)")
    if path.is_file():
        return path, "file", path
    if is_peft_folder(path):
        from lowmem_alignprop.lora.lora_files import PEFT_WEIGHT_NAME
        return path, "peft", path / PEFT_WEIGHT_NAME
    if (line := not_a_lora("--init-lora", spec, folder=path)) is not None:  # (it said "holds no .safetensors
        raise UserError(line)  # files": they are in its subfolders)
    folder = lora_dir_of(spec)
    if (folder / LORA_WEIGHT_NAME).is_file():
        return path, "folder", folder / LORA_WEIGHT_NAME
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return path, "folder", found[0]
    from lowmem_alignprop.run.checkpoint import pick_a_checkpoint
    if not found and (pick := pick_a_checkpoint(spec, "--init-lora")) is not None:  # (which one is the user's call)
        raise UserError(pick)
    raise UserError(f"--init-lora {spec} holds {'no' if not found else 'several'} .safetensors files: pass the LoRA "
                    "file itself, a run's lora/ folder or a peft adapter folder")


def init_lora_source(spec: str) -> dict[str, str] | None:
    """``init_lora/source.json``: the file of ``--init-lora``'s LoRA that the user holds, with its SHA-256, for a
    card whose digest ``sha256sum`` of their own file matches (the run's copy is converted: a peft folder's, a
    .bin's, a kohya file's per-layer alphas folded...): ``file`` is that file's path from ``spec`` ("" where ``spec``
    is the file; a folder's weights file: a peft folder's adapter_model.safetensors, a run's lora/, a checkpoint's
    trainable weights; a hub id's: its file in the repository), found as :func:`named_lora` finds it; a hub id's
    ``revision``: the commit it was read at. None where ``spec`` names none (it was checked before: not expected)."""
    from lowmem_alignprop.run import checkpoint as ckpt

    try:
        named, kind, file = named_lora(spec)
        if kind == "checkpoint":  # (an old EMA checkpoint's warning was said where its LoRA was read)
            file = ckpt.output_weights_file(named, ckpt.read_state(named).get("config", {}), say=False)
        hub = hub_lora(spec, "--init-lora") if kind in ("folder", "peft") and not Path(spec).expanduser().exists() \
            else None
    except (UserError, OSError, ValueError):
        return None
    own = hub.file if hub is not None else "" if file == named else file.relative_to(named).as_posix()
    return {"file": own, "sha256": ckpt.file_sha256(file), **({"revision": hub.commit} if hub is not None else {})}


def _as_safetensors(path: Path, spec: str) -> Path:
    """A LoRA saved with torch.save (.bin: older diffusers and peft), its tensors only (pickled code is refused), as a
    .safetensors file in a temporary folder: what the loaders below read."""
    from lowmem_alignprop.run.tensor_files import TensorFileError, read_tensor_file
    try:
        state = read_tensor_file(path)
    except (TensorFileError, OSError) as e:
        if isinstance(e, TensorFileError) and e.misnamed:
            raise UserError(f"--init-lora {spec}: {path} is {e.detail}") from None
        raise UserError(f"--init-lora {spec} is neither a .safetensors file nor a readable torch file of tensors "
                        f"({first_line(e, 120)}): pass a LoRA in diffusers, kohya or peft layout") from None
    if isinstance(state, dict):  # (a textual-inversion .pt: string_to_param holds a dict)
        _check_an_adapter(spec, state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--init-lora {spec} holds no dictionary of tensors: pass a LoRA in diffusers, kohya or peft "
                        "layout")
    return safetensors_copy(state)


def _check_an_adapter(spec: str, keys) -> None:
    """A full model's file (a checkpoint, a merged model, a diffusers model folder's weights) or a textual-inversion
    embedding: one line saying what it is, before its names are read as a LoRA's (a checkpoint's ff layers asked for
    lora_layers=attention+ff, a FLUX checkpoint's ComfyUI names for "a layer this run does not train")."""
    if (line := not_a_lora("--init-lora", spec, keys)) is not None:
        raise UserError(line)


def _damaged(spec: str, file: Path, e: Exception) -> UserError:
    return UserError(f"--init-lora {spec}: {not_safetensors(file, e)}: copy it again, or pass a run's lora/ folder or "
                     "checkpoint")


def _layer_name(key: str) -> str:
    """The layer a down (A) matrix's key names: the key less its :data:`LORA_DOWN_SUFFIXES` ending and the ``.`` or
    ``_`` before it (``...attn1.to_q.lora_A.weight``, ``..._attn1_to_q.lora_down.weight``, ``...to_q_lora.down.weight``:
    ``...to_q``)."""
    return next(key.removesuffix(s)[:-1] for s in LORA_DOWN_SUFFIXES if key.endswith(s))


def lora_file_ranks(file: Path, spec: str, layers: str = "attention", flow: bool = False,
                    quant: str = "none") -> set[int]:
    """The ranks of the layers of a LoRA file that a run of ``layers`` trains (lora_layers.trains_layer), from its
    header alone. A file of no LoRA, or of feed-forward layers a run of ``layers`` does not train, raises UserError. Its
    other layers (a text encoder's, convolutions, other linears: a civitai SD1.5/SDXL LoRA's; an SD3/FLUX
    transformer's modulation, embedders, proj_out, SD3's patch embedding pos_embed.proj, its CLIP encoders') are kept
    as they came, fused into the frozen base; an SD3/FLUX run (``flow``) refuses T5's and other convolution layers.
    ``quant``: the base's storage (base_quant): an int8/nf4 model's Linear layers cannot take a kept layer's delta
    (refused)."""
    try:
        shapes = read_safetensors_shapes(file)
    except (TensorFileError, OSError) as e:  # a truncated or foreign file
        raise _damaged(spec, file, e) from None
    if (other := lycoris_kind(shapes)) is not None:  # (diffusers' loader dropped them, or blamed the model)
        raise UserError(f"--init-lora {spec} holds {other}, not a LoRA's lora_down / lora_up: this trainer trains "
                        "plain LoRA and cannot start from it; pass a LoRA")
    dora = sorted(k for k in shapes if "lora_magnitude_vector" in k or k.endswith(".dora_scale"))
    if dora:  # its magnitudes would be dropped in silence: the run would start from another LoRA
        raise UserError(f"--init-lora {spec} is a DoRA (its magnitude vectors, e.g. {quote(dora[0])}): this trainer "
                        "trains plain LoRA and cannot start from one; pass a plain LoRA")
    text = sorted(k for k in shapes if k.startswith(TEXT_ENCODER_KEYS))
    t5 = [k for k in text if k.startswith(T5_KEYS)]
    if t5 and flow:
        raise UserError(t5_refusal(f"--init-lora {spec}", t5[0]))
    if (other := ldm_unet_refusal(shapes)) is not None:  # (ComfyUI's full weight or bias differences)
        raise UserError(f"--init-lora {spec} {other}")
    conv = sorted(k for k, s in shapes.items() if k.endswith(LORA_DOWN_SUFFIXES) and len(s) == 4
                  and not (flow and _layer_name(k).endswith("pos_embed.proj")))  # (SD3's patch embedding: kept)
    if conv and flow:  # (SD3/FLUX: no other convolution in the transformer, a UNet's LoCon layers)
        raise UserError(f"--init-lora {spec} adapts {len(conv)} convolution layer{'s' if len(conv) > 1 else ''} (e.g. "
                        f"{quote(conv[0])}: a LoCon's): an SD3/FLUX run trains and keeps transformer linear layers "
                        "only, and SD3's patch embedding pos_embed.proj (a UNet run keeps convolutions as they came); "
                        "pass a LoRA without other convolution layers")
    ff = sorted(k for k in shapes if _FF_KEY.search(k))
    if ff and layers == "attention":
        raise UserError(f"--init-lora {spec} adapts feed-forward layers too (e.g. {_own_example(spec, file, ff)}) and "
                        "this run's LoRA is on the attention projections: add --set lora_layers=attention+ff")
    downs = {k: s for k, s in shapes.items() if k.endswith(LORA_DOWN_SUFFIXES) and len(s) >= 2}
    if not downs:
        raise UserError(f"--init-lora {spec}: {file.name} holds no LoRA weights (no lora_A / lora_down keys): pass a "
                        "LoRA of this base model (a run's lora/ folder, or a diffusers, kohya or peft LoRA file)")
    # (a transformer's top-level proj_out is no single block's: its path without the component's prefix tells)
    trained = {k: s for k, s in downs.items()
               if trains_layer(_layer_name(k).removeprefix("transformer."), layers, flow)}
    linear = sorted(k for k, s in downs.items() if k not in trained and len(s) == 2 and k not in text)
    if linear and quant in BNB_MODES:
        raise UserError(quantized_refusal(spec, linear, quant, flow))
    _check_finite(file, spec)
    return {s[0] for s in trained.values()}


def _own_example(spec: str, file: Path, keys: list[str]) -> str:
    """The first of ``keys`` (of the file read, ``file``) as the user's own file that ``spec`` names holds it, in full:
    the key itself where that file holds it; an SD3/FLUX file in kohya's or the original transformer's names (read
    in diffusers' names: :func:`init_lora_file`) by its own key of such a layer, with the transformer's layer it
    holds (a fused linear1's MLP rows: proj_mlp); else (a peft folder's, a checkpoint's) the layer's path."""
    from lowmem_alignprop.lora import flow_export

    try:
        own = named_lora(spec)[2]
        theirs = set(read_safetensors_shapes(own)) if own is not None and is_safetensors(own) else set()
    except (UserError, TensorFileError, OSError):  # (read before: not expected)
        theirs = set()
    if keys[0] in theirs:
        return quote_name(keys[0])
    layers = [_layer_name(k) for k in keys if k.endswith(LORA_DOWN_SUFFIXES)]
    if flow_export.is_kohya_flow(theirs):
        found = sorted((key, layer) for layer in layers if (key := flow_export.kohya_key_of(
            layer.removeprefix("transformer."), theirs)) is not None)
        if found:
            return f"{quote_name(found[0][0])}, the transformer's {found[0][1].removeprefix('transformer.')}"
    return f"layer {layers[0]}" if layers else quote_name(keys[0])


def quantized_refusal(spec: str, linear: list[str], quant: str, flow: bool) -> str:
    """An ``--init-lora`` that adapts ``linear`` layers of the denoiser the run does not train (keys or module paths)
    when the base's linears are bitsandbytes' (``quant``: int8 or nf4): a kept layer's delta added to their codes
    would be on the codes' scale, not the weights', and mostly rounded away. fp8 storage comes after the kept layers
    are added (step/rollout.apply_memory_features), one byte per weight as int8's: the fix that still fits the card."""
    return (f"--init-lora {spec} adapts {len(linear)} linear layer{'s' if len(linear) > 1 else ''} of the "
            f"{'transformer' if flow else 'UNet'} this run does not train (e.g. {quote(linear[0])}), kept as they "
            f"came by adding them into the frozen base, which base_quant={quant} stores quantized: add --set "
            "base_quant=fp8 (stored after they are added, one byte per weight as int8) or --set base_quant=none")


def _check_finite(file: Path, spec: str) -> None:
    """A LoRA with NaN or inf weights (a run that diverged) renders NaN: the run would stop blaming its reward."""
    from safetensors.torch import load_file

    tensors = load_file(str(file))
    if (key := nonfinite(tensors)) is not None:
        bad = int((~torch.isfinite(tensors[key])).sum())
        raise UserError(f"--init-lora {spec}: {bad} of its weights {'is' if bad == 1 else 'are'} NaN or infinite "
                        f"(e.g. in {quote(key)}; the run that made it diverged): pass another LoRA")


def check_init_lora(spec: str, rank: int, model: str, components: str = "", layers: str = "attention",
                    quant: str = "none") -> Path:
    """Before any model loads: the LoRA file ``--init-lora`` names, of this run's rank and ``layers`` (the layers it
    trains: the others are kept, :func:`lora_file_ranks`) and of ``model``'s family as far as its files tell (a
    FLUX.1 LoRA for SD3, a UNet's for FLUX.1); ``quant``: the run's base_quant. Raises UserError."""
    from lowmem_alignprop.lora.lora_args import LoraSpec
    from lowmem_alignprop.lora.lora_checks import check_lora_files
    from lowmem_alignprop.settings.model_kind import FLOW_KINDS, model_kind_of

    file = init_lora_file(spec)
    lora = LoraSpec(arg=spec, file=file, weight=1.0, name="init", source=Path(spec).expanduser().absolute())
    check_lora_files([lora], model, components, "--init-lora")
    other = trained_on(spec, file, model)
    try:
        flow = model_kind_of(model, components) in FLOW_KINDS or lora.model in ("sd3", "flux", "transformer")
        ranks = lora_file_ranks(file, spec, layers, flow, quant)
        if ranks and ranks != {rank}:
            theirs = "/".join(map(str, sorted(ranks)))
            raise UserError(f"--init-lora {spec} has rank {theirs} and this run trains rank {rank}: "
                            + (f"add --set lora_rank={theirs}" if len(ranks) == 1 else "pass a LoRA of one rank"))
    except UserError as e:  # a fix for this LoRA's shape, when the LoRA may be another model's: that said too
        raise UserError(f"{e}{other}") from None
    return file


def check_fits_meta_model(cfg, file: Path) -> str:
    """``plan --init-lora``: the LoRA ``file`` (:func:`check_init_lora`'s) loaded onto ``cfg.model`` built on the meta
    device (its shapes, no weights), as training loads it onto the real one (:func:`split_init_lora`,
    :func:`start_from_lora`): a LoRA of another model of the same family (other widths) is refused with training's
    line, not planned as FITS. Returns the line plan says of it (its rank, the layers taken and those kept: fused
    into the base, they cost no memory). The rank is the run's (lora_rank), which a LoRA with a layer the run trains
    has (check_init_lora); one with none (its kept layers alone, of any rank) says so: "the run's rank"."""
    from lowmem_alignprop.measure.meta_models import meta_components
    from lowmem_alignprop.models.family import family_for

    comps = meta_components(cfg, torch.float32)  # (copies of the planner's cached meta model: ~0.2 s for SD1.5)
    family = family_for(comps)
    split = split_init_lora(family.make_pipeline(comps), file, cfg.init_lora, cfg.lora_layers, cfg.model)
    family.add_lora(comps.unet, cfg)
    copied, trained = start_from_lora(comps.unet, split, cfg.init_lora, cfg.lora_layers)
    kept = split.kept_layers
    rank = "rank" if copied else "the run's rank"  # (the file's kept layers may have another)
    return (f"--init-lora {cfg.init_lora}: {rank} {cfg.lora_rank}, {layers_taken(copied, trained)}"
            + (f"; {kept} more kept as they came, fused into the frozen base (no memory)" if kept else "")
            + ("; training starts from it" if copied else "; training starts from the base with those layers"))


def layers_taken(copied: int, trained: int) -> str:
    """The layers a run takes from --init-lora's LoRA (``copied`` of the ``trained`` ones its adapter has), and that
    the others start at zero (a LoRA of the attention layers, in a run of lora_layers=attention+ff)."""
    if copied >= trained:
        return f"{copied} layers"
    if not copied:  # (a LoRA of kept layers alone: a LoCon's convolutions, a text encoder's)
        return (f"none of the run's {trained} layers (it adapts none of them): the run's LoRA starts at zero, as a "
                "fresh one")
    return (f"{copied} of the run's {trained} layers; the other {trained - copied} (not in it) start at zero, as a "
            "fresh LoRA's")


def trained_on(spec: str, file: Path, model: str) -> str:
    """" (it was trained on X, not --model Y: ...)" where the LoRA's run recorded another base model than ``model``
    (lora/base_model.json), for a message that the LoRA does not fit; else ""."""
    from lowmem_alignprop.lora.base_records import recorded_base, recorded_fingerprint, same_model
    from lowmem_alignprop.lora.lora_args import LoraSpec

    lora = LoraSpec(arg=spec, file=file, weight=1.0, name="init", source=Path(spec).expanduser().absolute())
    base = recorded_base(lora, model_given=True)  # its run's record: the model it was trained on
    return f" (it was trained on {base[0]}, not --model {model}: if that is another model, pass a LoRA of this one)" \
        if base is not None and not same_model(model, base[0], recorded_fingerprint(lora)) else ""


def lora_sampler(spec: str, file: Path) -> tuple[dict, str]:
    """(settings, where): the prediction_type and zero_terminal_snr ``--init-lora``'s LoRA was trained with, and
    where that is said: its run's base_model.json (the schedule the run resolved: both, where it records the
    prediction type), else its file's header (:func:`~lowmem_alignprop.lora.lora_files.header_image_settings`:
    what it says); ({}, "") where neither tells."""
    from lowmem_alignprop.lora.base_records import read_base_record
    from lowmem_alignprop.lora.lora_args import LoraSpec, base_record_file
    from lowmem_alignprop.lora.lora_files import header_image_settings

    lora = LoraSpec(arg=spec, file=file, weight=1.0, name="init", source=Path(spec).expanduser().absolute())
    if (record := base_record_file(lora)) is not None:
        base = read_base_record(lora) or {}
        if base.get("prediction_type") not in ("epsilon", "v_prediction"):
            return {}, ""  # (damaged, a record before the schedule was recorded, or a transformer's: no DDIM)
        return {"prediction_type": base["prediction_type"],
                "zero_terminal_snr": bool(base.get("zero_terminal_snr"))}, f"its {record.name}"
    settings, keys = header_image_settings(file)
    said = {k: settings[k] for k in ("prediction_type", "zero_terminal_snr") if k in settings}
    return said, f"its header ({', '.join(keys[k] for k in said)})" if said else ""


def other_sampler(spec: str, file: Path, run: dict, eta: float) -> str | None:
    """The warning where ``--init-lora``'s LoRA was trained with another prediction type or zero-SNR schedule than
    this run samples with (``run``: the scheduler config it resolved; ``eta``: its DDIM eta), naming both and the
    --set that trains as the LoRA's run did; None where they agree or either does not tell. A warning: a user may
    mean it."""
    if run.get("prediction_type") not in ("epsilon", "v_prediction"):
        return None  # (an SD3/FLUX run: no DDIM; the LoRA's files are not read)
    theirs, where = lora_sampler(spec, file)
    ours = {"prediction_type": run["prediction_type"], "zero_terminal_snr": bool(run.get("rescale_betas_zero_snr"))}
    differ = [k for k in theirs if theirs[k] != ours[k]]
    if not differ:
        return None
    fix = {k: theirs[k] for k in differ}
    if fix.get("prediction_type") == "epsilon" and ours["zero_terminal_snr"]:  # (the config refuses that pair)
        fix["zero_terminal_snr"] = False
    if fix.get("zero_terminal_snr") and eta >= 1:  # (zero SNR at eta 1 is refused: DDIM's deterministic 0 with it)
        fix["eta"] = 0
    return (f"--init-lora {spec} was trained with {' '.join(f'{k}={theirs[k]}' for k in differ)} ({where}), and this "
            f"run samples with {' '.join(f'{k}={ours[k]}' for k in differ)}: it starts from a LoRA of another "
            f"sampler; {' '.join(f'--set {k}={str(v).lower() if isinstance(v, bool) else v}' for k, v in fix.items())}"
            " trains as its run did")


@dataclasses.dataclass
class InitLora:
    """``--init-lora``'s LoRA split by the layers the run trains (lora_layers.trains_layer): ``trained``, module path of
    the denoiser -> (A, B * its scale), copied into the trained adapter by :func:`start_from_lora`; ``kept``, the
    other layers fused into the frozen base (:func:`split_init_lora`), in diffusers' layout with each scale folded
    into B (:func:`~lowmem_alignprop.models.kept_lora.write_kept`)."""
    trained: dict[str, tuple[torch.Tensor, torch.Tensor]]
    kept: dict[str, torch.Tensor]

    @property
    def kept_layers(self) -> int:
        from lowmem_alignprop.models.kept_lora import layer_count
        return layer_count(self.kept)

    def kept_line(self, spec: str) -> str:
        """The log line of a LoRA with kept layers ("" with none), their kinds counted as the card counts them."""
        from lowmem_alignprop.models.kept_lora import kept_kinds, kept_total

        if not self.kept:
            return ""
        they = "they" if self.kept_layers != 1 else "it"
        return (f"--init-lora {spec}: {len(self.trained)} layers train from it; {kept_total(self.kept)} kept as {they} "
                f"came ({', '.join(kept_kinds(self.kept))}), fused into the frozen base")


@torch.no_grad()
def split_init_lora(pipe, file: Path, spec: str, layers: str = "attention", model: str = "",
                    encoders: dict | None = None) -> InitLora:
    """Before the run's LoRA is added (and before anything reads the base: prompts, fp8 storage, block swap):
    diffusers loads ``file`` onto the pipeline as adapter "init" (its own converters read the diffusers and kohya
    layouts, alphas, text encoders and convolutions included); the layers the run trains are remembered (A, B times
    its scale), every other layer's delta (peft's get_delta_weight) is added into its frozen base weight (in fp32,
    rounded once to the base's dtype); then every layer of the "init" adapter goes. An SD3/FLUX transformer's
    untrained linears are kept as a UNet's are; its text encoders' layers were kept before the prompts were encoded
    (:func:`keep_encoder_layers`, ``encoders``: what it kept, the encoders freed since). A kept linear of an int8/nf4
    base (quantized as it loaded: :func:`quantized_refusal`) and a LoRA of another model raise UserError."""
    from lowmem_alignprop.lora.adapters import load_adapter_file, pipeline_adapter_layers

    denoiser = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    flow, fix = denoiser == "transformer", ("it was made for another base model: pass that model with --model, or "
                                            "another --init-lora" + (trained_on(spec, file, model) if model else ""))
    # (SD3/FLUX part by part: FluxPipeline.load_lora_weights, which widens a bare layer to a Control LoRA's wider
    # x_embedder in silence, is not called; another width is one "does not fit" line)
    load_adapter_file(pipe, file, INIT_ADAPTER, f"--init-lora {spec}", fix)
    split, quantized = InitLora({}, dict(encoders or {})), {}
    for part, name, module in pipeline_adapter_layers(pipe, INIT_ADAPTER):
        a, scaled = _a_and_scaled_b(module)
        if part == denoiser and trains_layer(name, layers, flow):
            split.trained[name] = (a.clone(), scaled.clone())
            continue
        base = module.get_base_layer().weight
        if not base.dtype.is_floating_point:  # (bitsandbytes' int8 / nf4 codes: a resume's base_quant, which
            quantized[name] = base.dtype  # lora_file_ranks did not see: the run's init_lora/ copy is unchecked)
            continue
        base.copy_((base.float() + module.get_delta_weight(INIT_ADAPTER).float()).to(base.dtype))
        _keep(split.kept, part, name, a, scaled)
    if quantized:
        raise UserError(quantized_refusal(spec, list(quantized), "int8" if torch.int8 in quantized.values() else "nf4",
                                          flow))
    pipe.unload_lora_weights()  # every layer of the "init" adapter, kept ones included: their base layers stay
    return split


def _a_and_scaled_b(module) -> tuple[torch.Tensor, torch.Tensor]:
    """The "init" adapter's A and B times its scale, at the layer."""
    a, b = module.lora_A[INIT_ADAPTER].weight, module.lora_B[INIT_ADAPTER].weight
    return a.detach(), (b * module.scaling[INIT_ADAPTER]).detach()


def _keep(kept: dict, part: str, name: str, a: torch.Tensor, scaled: torch.Tensor) -> None:
    """A kept layer in the kept file's layout (fp32, each scale folded into B)."""
    from lowmem_alignprop.models.kept_lora import canonical_key

    key = canonical_key(f"{part}.{name}")  # (a text encoder's with text_model. whatever transformers)
    kept[f"{key}.lora_A.weight"] = a.float().contiguous()
    kept[f"{key}.lora_B.weight"] = scaled.float().contiguous()


@torch.no_grad()
def keep_encoder_layers(pipe, file: Path, spec: str) -> dict[str, torch.Tensor]:
    """SD3/FLUX, before the prompt set is encoded: --init-lora's text-encoder layers (CLIP-L's, SD3's CLIP-G's) are
    loaded into the encoders as adapter "init" by diffusers' loader, so the prompts are encoded as diffusers'
    ``load_lora_weights`` of the whole file would encode them (the encoders are freed after). Returns them as kept
    layers (:func:`split_init_lora` adds the transformer's); {} for a LoRA without any. A T5 layer, or one that does
    not fit the encoders, raises UserError."""
    from lowmem_alignprop.lora.adapters import load_encoder_part, pipeline_adapter_layers

    load_encoder_part(pipe, file, INIT_ADAPTER, f"--init-lora {spec}",
                      "it was made for another base model: pass that model with --model")
    kept: dict[str, torch.Tensor] = {}
    for part, name, module in pipeline_adapter_layers(pipe, INIT_ADAPTER):
        if part != "transformer":  # (the transformer is not read yet)
            _keep(kept, part, name, *_a_and_scaled_b(module))
    return kept


@torch.no_grad()
def start_from_lora(unet, split: InitLora, spec: str, layers: str = "attention") -> tuple[int, int]:
    """Make the adapter being trained ("default") compute what the layers of ``split`` the run trains did: A is
    copied and B times its scale over ours. Layers the LoRA leaves out keep B = 0 (no change). Returns the number of
    layers copied and of the layers the adapter trains (:func:`layers_taken`)."""
    from lowmem_alignprop.models.lora_layers import lora_targets

    flow = not hasattr(unet, "down_blocks")  # a UNet has down blocks, SD3/FLUX transformers none
    for name, (a, scaled) in split.trained.items():
        module = unet.get_submodule(name)
        if "default" not in getattr(module, "lora_A", {}):
            raise UserError(f"--init-lora {spec} adapts {name}, a layer this run does not train (its lora_layers: "
                            f"{', '.join(lora_targets(layers, flow))}): pass a LoRA of those layers")
        ours_a, ours_b = module.lora_A["default"].weight, module.lora_B["default"].weight
        if a.shape != ours_a.shape or scaled.shape != ours_b.shape:
            raise UserError(f"--init-lora {spec}: layer {name} has rank {a.shape[0]}, this run's {ours_a.shape[0]}: "
                            f"add --set lora_rank={a.shape[0]}")
        ours_a.copy_(a)
        ours_b.copy_(scaled / module.scaling["default"])  # the same scale * B @ A
    trained = sum(1 for _ in adapter_layers(unet, "default"))
    return len(split.trained), trained


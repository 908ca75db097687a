"""Loading LoRAs into a diffusers pipeline as named adapters (:func:`load_adapters`, :func:`load_adapter_file`:
a LoRA that does not fit the model refused in one line), and mixing them (:func:`mix_adapters`).

Mixing adapters (``--lora a:0.5 --lora b:0.5``), as AlignProp mixes LoRAs trained on different rewards:
every adapter is loaded with ``pipe.load_lora_weights(..., adapter_name=...)`` and combined with
``pipe.set_adapters(names, adapter_weights=weights)``. peft then computes, in every layer the adapters touch,
``W x + sum_i w_i * dW_i x`` with ``dW_i = (alpha_i / r_i) B_i A_i`` the update adapter ``i`` learned. So the
weights interpolate the adapters' *weight updates* linearly: ``a:1`` is adapter a as trained, ``a:0.5`` is
halfway between the base model and a, ``a:0.5 b:0.5`` is the midpoint of a and b in weight space (not the
average of their A and B matrices, which would not be linear), weights above 1 or below 0 extrapolate. The
images are not a linear mix of the two adapters' images: the network is nonlinear in its weights. A DoRA (peft's
magnitude vectors) is read at weight 1 only: peft scales its direction update by the weight, not its magnitudes.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from lowmem_alignprop.lora.lora_args import LoraSpec
from lowmem_alignprop.lora.lora_formats import (kohya_encoders_as_diffusers, ldm_unet_as_diffusers,
                                                    unet_layers_read)
from lowmem_alignprop.models.flow_lora_parts import load_transformer_layers
from lowmem_alignprop.models.lora_layers import LORA_DOWN_SUFFIXES, adapter_layers
from lowmem_alignprop.run.tensor_files import is_safetensors
from lowmem_alignprop.settings.errors import UserError, quote


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) "
                            r"from checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


def pipeline_adapter_layers(pipe, name: str):
    """(component name, module path, module) of every layer of the pipeline's models that carries adapter
    ``name``."""
    for part, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            yield from ((part, path, m) for path, m in adapter_layers(component, name))


def adapted_layers(pipe, name: str) -> int:
    """How many layers of the pipeline's models carry adapter ``name``."""
    return sum(1 for _ in pipeline_adapter_layers(pipe, name))


def layers_in_file(path: Path) -> int:
    """How many adapted layers a LoRA file holds (one down/A matrix each); 0 for a .bin."""
    if not is_safetensors(path):
        return 0  # .bin: no cheap header read; rely on diffusers' own checks
    with safe_open(str(path), framework="pt") as f:
        return sum(1 for k in f.keys() if k.endswith(LORA_DOWN_SUFFIXES))


def misfit_detail(error: Exception, pipe=None, read: Callable[[], dict] | None = None) -> str:
    """A one-line reading of diffusers/peft's error for a LoRA that does not fit the model (``pipe`` and ``read``,
    the LoRA's state dict as diffusers reads it: for transformers' error of a text encoder's layers, which names
    none, :func:`_encoder_misfit`)."""
    text = str(error)
    if "ignore_mismatched_sizes" in text and pipe is not None and read is not None:
        text = _encoder_misfit(pipe, read) or text  # (transformers 5 logs its report of the shapes, then raises)
    found = _SIZE_MISMATCH.findall(text)
    if found:
        key, theirs, ours = found[0]
        layer = re.sub(r"\.lora_[AB]\.[^.]+\.weight$", "", key)
        return (f"{len(found)} of its weights have other shapes than this model's layers "
                f"(e.g. {layer}: {theirs} in the LoRA, {ours} here)")
    if "not found in the base model" in text:
        return "none of its layers exist in this model"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # (an assert of a format converter says nothing: which loader failed, then)
    return (lines[0] if lines else f"diffusers' LoRA loader could not read its layers ({type(error).__name__})")[:200]


def _encoder_misfit(pipe, read: Callable[[], dict]) -> str | None:
    """Which text-encoder layer of a LoRA (``read``: its state dict as diffusers' reader names it) no layer of the
    pipeline's encoder takes (its input width neither the encoder's hidden nor its MLP width: CLIP's layers take one
    or the other); None where each fits (or it cannot be read: the caller's error stands)."""
    try:
        state = read()
    except Exception:  # noqa: BLE001 (the reader's own failure: the error already caught says it)
        return None
    for key, weight in state.items():
        part, suffix = key.split(".", 1)[0], next((s for s in LORA_DOWN_SUFFIXES if key.endswith(s)), None)
        encoder = getattr(pipe, part, None) if part.startswith("text_encoder") else None
        config = getattr(encoder, "config", None)
        if suffix is None or config is None or weight.ndim != 2:
            continue
        widths = sorted({getattr(config, "hidden_size", 0), getattr(config, "intermediate_size", 0)} - {0})
        if widths and weight.shape[1] not in widths:
            layer = key.removesuffix(suffix).rstrip("._")
            return (f"its {part} layers take other widths than this model's {part} (e.g. {layer}: "
                    f"{weight.shape[1]} inputs in the LoRA, {' or '.join(map(str, widths))} here)")
    return None


def load_adapters(pipe, specs: list[LoraSpec], model: str, default: str = "") -> None:
    """Load every LoRA as a named adapter. A LoRA made for another base model raises UserError (``default``: why
    ``model`` is the default one, said in the line as :func:`.lora_checks.check_lora_family` says it)."""
    now = f"now {model!r}" + (f", the default: {default}" if default else "")
    for spec in specs:
        load_adapter_file(pipe, spec.file, spec.name, f"--lora {spec.arg}",
                          f"it was trained for another base model: pass that model with --model ({now})")


def check_adapters_fit_meta_model(cfg, specs: list[LoraSpec], default: str = "") -> None:
    """The LoRAs loaded onto ``cfg.model`` built on the meta device (its shapes, no weights) as :func:`load_adapters`
    loads them onto the real one, as plan fits --init-lora's: a LoRA of another UNet model (other layer widths: an
    SDXL LoRA on SD1.5) is refused with loading's line before the model loads (it came once the model had loaded:
    minutes for SDXL). An SD3/FLUX transformer's width is told from its files before (lora_checks.check_lora_files);
    a model whose meta copy cannot be built here (a hub id without its configs) is left to loading."""
    from lowmem_alignprop.measure.meta_models import meta_components
    from lowmem_alignprop.models.family import family_for

    if all(s.family == "transformer" for s in specs):  # (a flow model's, which check_lora_files matched already:
        return  # its meta copy, 12B for FLUX.1, is not built for nothing)
    try:
        comps = meta_components(cfg, torch.float32)
    except Exception:  # noqa: BLE001 - loading the model names whatever is wrong with it
        return
    if not (family := family_for(comps)).flow:
        load_adapters(family.make_pipeline(comps), specs, cfg.model, default)


# what diffusers' LoRA loading and its format converters raise for a file that does not fit the model (a converter's
# assert on another model's widths, an index past a layer list)
MISFIT_ERRORS = (RuntimeError, ValueError, KeyError, AssertionError, IndexError, TypeError)


def load_adapter_file(pipe, file: Path, name: str, flag: str, fix: str) -> None:
    """``pipe.load_lora_weights`` of ``file`` as adapter ``name`` (an SD3/FLUX pipeline: each part by diffusers' own
    loader of that part, the transformer's and the CLIP encoders' unless they were freed once the prompts were
    encoded (:func:`load_encoder_part` loaded them before), the file read once: one path for sample, --init-lora, plan
    and --merge); a file that does not fit (an error from diffusers or its converters, or fewer of its layers found than
    it has) raises one UserError line: ``flag`` does not fit this model, why, ``fix``."""
    peft_log = logging.getLogger("diffusers.loaders.peft")
    level = peft_log.level
    peft_log.setLevel(logging.CRITICAL)  # diffusers logs the whole error before raising; we say it in one line
    try:
        with warnings.catch_warnings():
            # our LoRAs adapt only the denoiser; diffusers warns that the text encoder has none
            warnings.filterwarnings("ignore", message="No LoRA keys associated")
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters: wanted
            if getattr(pipe, "unet", None) is not None and is_safetensors(file):
                file = unet_layers_read(file, flag)  # (what diffusers' reader leaves out: one line, zeros left out)
                file = ldm_unet_as_diffusers(file, pipe) or file  # ComfyUI's LDM names: their blocks numbered by the
                # UNet's config
                file = kohya_encoders_as_diffusers(file, pipe) or file  # (encoder layers without out_proj)
            if getattr(pipe, "transformer", None) is not None:  # SD3/FLUX: part by part, where each part is
                lora = _read_flow_lora(pipe, file, flag)  # (read once for both parts)
                load_transformer_layers(pipe, lora, name)
                expected = len(lora.layers("transformer."))
                if not encoders_freed(pipe):  # (else its CLIP layers were loaded before the prompts were encoded)
                    expected += _load_encoder_layers(pipe, lora, name, flag, fix)
                if not expected:  # (a LoRA of the CLIP encoders alone, loaded before the prompts were encoded)
                    return
            else:
                pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
                expected = layers_in_file(file)
    except MISFIT_ERRORS as e:
        read = (lambda: type(pipe).lora_state_dict(str(file))[0])  # (the file as diffusers read it)
        raise UserError(f"{flag} does not fit this model: {misfit_detail(e, pipe, read)}; {fix}") from None
    finally:
        peft_log.setLevel(level)
    got = adapted_layers(pipe, name)
    if got == 0 or got < expected:
        raise UserError(f"{flag} does not fit this model: only {got} of its {expected} layers exist here; {fix}")


def load_encoder_part(pipe, file: Path, name: str, flag: str, fix: str) -> int:
    """SD3/FLUX, before the prompt set is encoded: the CLIP text-encoder layers of ``file`` loaded into the
    pipeline's encoders as adapter ``name`` (models/flow_lora_parts.py; its transformer's load once the transformer is
    read: :func:`load_adapter_file`); returns how many. T5 layers (no diffusers loader reads them) and layers that do
    not fit the encoders raise one UserError line (``flag``, ``fix`` as :func:`load_adapter_file`'s)."""
    try:
        lora = _read_flow_lora(pipe, file, flag)
    except MISFIT_ERRORS as e:
        raise UserError(f"{flag} does not fit this model's text encoders: {misfit_detail(e)}; {fix}") from None
    return _load_encoder_layers(pipe, lora, name, flag, fix)


def _load_encoder_layers(pipe, lora, name: str, flag: str, fix: str) -> int:
    """The CLIP layers of ``lora`` (:func:`_read_flow_lora`'s) loaded into the pipeline's encoders as adapter
    ``name``; returns how many. Layers that do not fit raise one UserError line."""
    from lowmem_alignprop.models.flow_lora_parts import load_encoder_layers

    expected = len(lora.encoder_layers())
    try:
        got = load_encoder_layers(pipe, lora, name) if expected else 0
    except MISFIT_ERRORS as e:
        raise UserError(f"{flag} does not fit this model's text encoders: "
                        f"{misfit_detail(e, pipe, lambda: lora.state_dict)}; {fix}") from None
    if got < expected:
        raise UserError(f"{flag} does not fit this model: only {got} of its {expected} text-encoder layers exist "
                        f"here; {fix}")
    return got


def _kohya_clip_read(lora):
    """``lora`` (flow_lora_parts.FlowLora) with kohya's CLIP layers (``lora_te1_``, ``lora_te2_``, SD's ``lora_te_``:
    the first CLIP) in diffusers' names, each alpha / rank folded (kohya_layers): SD3's reader reads no kohya names
    and leaves them as they are (a kohya file of CLIP layers alone: no lora_unet_ key, so lora_args did not convert
    it); FLUX's converts them."""
    from lowmem_alignprop.lora.kohya_layers import kohya_encoder_layers, kohya_encoder_unread
    from lowmem_alignprop.models.lora_layers import KOHYA_ENCODERS

    kohya = {k: v for k, v in lora.state_dict.items() if k.startswith(tuple(KOHYA_ENCODERS))}
    if kohya:
        lora.state_dict = {k: v for k, v in lora.state_dict.items() if k not in kohya}
        read = {k: v for k, v in kohya.items() if not kohya_encoder_unread(k)}  # (the embeddings: all zero, checked)
        for part, named in kohya_encoder_layers(read).items():
            lora.state_dict.update({f"{part}.{k}": v for k, v in named.items()})
    return lora


def encoders_freed(pipe) -> bool:
    """An SD3/FLUX pipeline whose text encoders were freed once the prompt set was encoded (the trainer's and
    ``sample``'s: models/family.encode_then_read)."""
    return getattr(pipe, "transformer", None) is not None and all(
        getattr(pipe, n, None) is None for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))


# diffusers' FLUX.1 reader (lora_conversion_utils._convert_kohya_flux_lora_to_diffusers), for a file with any
# kohya key (``.lora_down.weight``): beside diffusers' ``transformer.`` names it keeps those alone; beside the
# "mixture" layout's ``lora_transformer_`` names it pops every ``lora_unet_`` key; else (sd-scripts', ComfyUI's) it
# keeps only ``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` names (ComfyUI's ``diffusion_model.`` and
# ``text_encoders.clip_l.transformer.`` read as those): each without a word
_FLUX_KOHYA_READ = ("lora_unet_", "lora_te_", "lora_te1_", "diffusion_model.", "text_encoders.clip_l.transformer.")


def _flux_reader_drops(raw: dict) -> list[str]:
    """The keys of ``raw`` (a file handed to diffusers' FLUX.1 reader) that the reader leaves out (above)."""
    if not any(".lora_down.weight" in k for k in raw):
        return []
    if any(k.startswith("transformer.") for k in raw):
        return [k for k in raw if not k.startswith("transformer.")]
    if any(k.startswith("lora_transformer_") and ("lora_down" in k or "lora_up" in k or "alpha" in k) for k in raw):
        return [k for k in raw if k.startswith("lora_unet_")]
    return [k for k in raw if not k.startswith(_FLUX_KOHYA_READ)]


def left_out_layer(pipeline_class, raw: dict, lora) -> str | None:
    """The first layer of a LoRA file (``raw``: its tensors) that changes the model and that would be left out without
    a word: by diffusers' FLUX.1 reader (:func:`_flux_reader_drops`), or, once read (``lora``: a
    flow_lora_parts.FlowLora), a layer of no part loaded (not ``transformer.`` nor a text encoder: diffusers'
    ``load_lora_weights`` leaves it out too). A layer whose lora_up or lora_down is all zeros changes nothing: None
    for it (kohya_layers.first_changed). A transformer weight that is no LoRA's: :func:`own_weight`."""
    from lowmem_alignprop.lora.kohya_layers import first_changed
    from lowmem_alignprop.models.flow_lora_parts import ENCODER_PREFIXES

    dropped = [(raw, k) for k in (_flux_reader_drops(raw) if pipeline_class.__name__ == "FluxPipeline" else [])]
    read = lora.state_dict
    dropped += [(read, k) for k in read if not k.startswith(("transformer.", *ENCODER_PREFIXES))]
    return first_changed(dropped)


def own_weight(lora) -> str | None:
    """The first transformer weight of ``lora`` (a flow_lora_parts.FlowLora) that is no LoRA's: a FLUX.1 Control
    LoRA's norm scales, which only FluxPipeline.load_lora_weights writes into the model (the part-by-part load leaves
    them out); None for a LoRA of LoRA layers alone."""
    return next((k for k in sorted(lora.state_dict) if k.startswith("transformer.") and "lora" not in k
                 and not k.endswith(".alpha")), None)


def own_weight_refusal(label: str, key: str) -> str:
    """The line for a LoRA with a weight :func:`own_weight` found (``label``: the option and its value)."""
    return (f"{label} holds {quote(key)}, a layer's own weight, not a LoRA's: a FLUX.1 Control LoRA's norm scale "
            "(Canny, Depth: they condition on an image, through FluxControlPipeline, which lowmem-alignprop does not "
            "run); pass a plain LoRA")


def flow_left_out_refusal(label: str, key: str) -> str:
    """The line for an SD3/FLUX LoRA with a layer :func:`left_out_layer` found (``label``: the option and its value;
    lora_formats.unet_left_out_refusal is the UNet's)."""
    from lowmem_alignprop.lora.kohya_layers import left_out_refusal

    return left_out_refusal(label, key, "no layer of this model by that name, or a second layout beside diffusers' "
                                        "transformer. / kohya's lora_unet_ names, of which it reads one")


def _read_flow_lora(pipe, file: Path, flag: str):
    """``file`` read by the SD3/FLUX pipeline's own LoRA reader (models/flow_lora_parts.read_flow_lora), kohya's CLIP
    names as diffusers' (:func:`_kohya_clip_read`); T5 layers (no diffusers loader reads them), kohya CLIP layers
    diffusers has no name for (kohya_layers.kohya_encoder_unread: FLUX.1's reader drops them with a log line, SD3's
    finds no such layer) and the layers :func:`left_out_layer` finds raise UserError, each where it changes the model
    (all zeros: left out). A file in kohya's transformer names was split before (lora_formats.kohya_flow_for_diffusers,
    whose kohya_names says the same line of such CLIP layers); one of CLIP layers alone is checked here."""
    from lowmem_alignprop.lora.kohya_layers import comfy_encoder_refusal, first_changed, kohya_encoder_unread
    from lowmem_alignprop.models.flow_lora_parts import read_flow_lora, t5_refusal, unloaded_encoder_layers
    from lowmem_alignprop.run.tensor_files import tensors_on_demand

    raw = tensors_on_demand(file)  # (the file's names, and the few tensors checked for zeros: not the file again)
    if (key := first_changed((raw, k) for k in raw if kohya_encoder_unread(k))) is not None:
        raise UserError(f"{flag} {comfy_encoder_refusal(key)}")
    lora = _kohya_clip_read(read_flow_lora(type(pipe), file))
    if t5 := unloaded_encoder_layers(type(pipe), lora):
        raise UserError(t5_refusal(flag, t5[0]))
    if (key := own_weight(lora)) is not None:  # (a Control LoRA: its norm scales first, its x_embedder is wider)
        raise UserError(own_weight_refusal(flag, key))
    if (key := left_out_layer(type(pipe), raw, lora)) is not None:  # (diffusers: a log line, or none)
        raise UserError(flow_left_out_refusal(flag, key))
    return lora


def mix_adapters(pipe, specs: list[LoraSpec]) -> None:
    """Activate the adapters with their weights: each layer computes W x + sum_i w_i dW_i x (see module doc). An
    SD3/FLUX LoRA of CLIP layers only has no layer in the pipeline (its layers adapted the prompts' encoding,
    mixed there at its weight: flow_sample), and is left out here."""
    pipe.enable_lora()
    loaded = [s for s in specs if not encoders_freed(pipe) or adapted_layers(pipe, s.name)]
    if loaded:
        pipe.set_adapters([s.name for s in loaded], adapter_weights=[s.weight for s in loaded])

"""Whether LoRAs fit a model, and each other: their family (:func:`check_lora_family`) and attention width
(:func:`check_lora_files`) against the model's files before anything loads, two LoRAs mixed in one ``sample``
(:func:`check_mixable`), each refused in one line; and a LoRA of another base model with the same layer shapes,
warned of once the model is loaded (:func:`warn_other_base`)."""

from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path

from safetensors import safe_open

from lowmem_alignprop.lora.lora_args import LoraSpec
from lowmem_alignprop.lora.lora_kinds import MODEL_NAMES, model_of_kind, same_family
from lowmem_alignprop.run import base_fingerprint
from lowmem_alignprop.run.filenames import LORA_BASE_FILE
from lowmem_alignprop.settings.errors import UserError, first_line
from lowmem_alignprop.settings.model_kind import flow_width, model_kind_of

log = logging.getLogger("lowmem_alignprop")


def check_lora_family(ours: str | None, specs: list[LoraSpec], model: str, option: str = "--lora",
                      default: str = "") -> None:
    """A LoRA of an SD3/FLUX transformer given to a UNet model (``ours``: unet), or the reverse, or an SD3 LoRA to a
    FLUX.1 model (``ours``: sd3 or flux; transformer when unknown which): one line. Called before anything loads
    with what the model's files tell (settings/model_kind; None: they do not tell), and again with the loaded
    pipeline's. ``default``: why ``model`` is the default one (no --model given, none recorded), said in the line."""
    if ours is None:
        return
    for spec in specs:
        theirs = spec.model
        if theirs is None or same_family(theirs, ours):
            continue
        named = f"--model {model}" + (f" (the default: {default})" if default else "")
        raise UserError(f"{option} {spec.arg} adapts {MODEL_NAMES[theirs]}, but {named} is "
                        f"{MODEL_NAMES[ours]}: pass the model it was trained on with --model")


# the attention projections' down (A) matrices of a diffusers-named transformer LoRA: they read the model's width
_ATTENTION_DOWN = re.compile(r"\.(to_q|to_k|to_v)\.(lora_A|lora\.down|lora_down)\.weight$")


# the shipped flow models' widths, to name the model a LoRA of another width was likely trained on
FLOW_WIDTHS = {1536: "SD3/SD3.5 Medium", 2432: "SD3.5 Large", 3072: "FLUX.1"}


def check_lora_files(specs: list[LoraSpec], model: str, components: str = "", option: str = "--lora",
                     default: str = "") -> None:
    """What the model's files tell of the LoRAs before anything loads: their family (:func:`check_lora_family`)
    and, for an SD3/FLUX model, their attention layers' width against its transformer's: an SD3 LoRA whose files do
    not name SD3 (a peft or diffusers file copied away alone) on FLUX.1, or SD3.5 Medium's on Large, was refused
    only once the transformer was read (minutes). One line; what the files do not tell passes (loading checks)."""
    check_lora_family(model_of_kind(model_kind_of(model, components)), specs, model, option, default)
    if (width := flow_width(model, components)) is None:
        return
    for spec in specs:
        theirs = sorted({w for k, w in _layer_widths(spec.file).items() if _ATTENTION_DOWN.search(k)})
        if theirs and theirs != [width]:
            named = f"--model {model}" + (f" (the default: {default})" if default else "")
            other = next(w for w in theirs if w != width)  # (the width that does not fit, where they differ)
            likely = f" ({FLOW_WIDTHS[other]}'s?)" if len(theirs) == 1 and other in FLOW_WIDTHS else ""
            raise UserError(f"{option} {spec.arg} adapts attention layers of width {other}{likely}, but {named} "
                            f"is a transformer of width {width}: it was trained on another model; pass that model "
                            "with --model")


def check_mixable(specs: list[LoraSpec]) -> None:
    """LoRAs mixed in one ``sample`` adapt models of one family (as far as their files tell): else one line, before
    any of their runs' settings are read (no --model can fit both)."""
    known = [spec for spec in specs if spec.model is not None]
    for a, b in itertools.combinations(known, 2):
        if not same_family(a.model, b.model):
            raise UserError(f"--lora {a.arg} adapts {MODEL_NAMES[a.model]} and --lora {b.arg} {MODEL_NAMES[b.model]}: "
                            "LoRAs of different models cannot be mixed; sample them one at a time")
    for a, b in itertools.combinations(specs, 2):  # one family, other layer widths (toy and tiny, SD1.5 and SD2.1)
        ours, theirs = _layer_widths(a.file), _layer_widths(b.file)
        if (key := next((k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k]), None)) is not None:
            raise UserError(f"--lora {a.arg} and --lora {b.arg} adapt layers of other widths ({key}: {ours[key]} in "
                            f"one, {theirs[key]} in the other): they were trained on different base models and "
                            "cannot be mixed; sample them one at a time")
    for a, b in itertools.combinations(specs, 2):  # (a typo in a mix, a:0.5 a:0.5 for a:0.5 b:0.5, was a:1 unsaid)
        if a.file.resolve() == b.file.resolve() or a.named.resolve() == b.named.resolve():
            log.warning(
                "--lora %s and --lora %s are the same LoRA: their weights add up (as --lora %s:%g)", a.arg, b.arg,
                a.shown, a.weight + b.weight)


def _layer_widths(file: Path) -> dict[str, int]:
    """The adapted layers' widths a LoRA file tells from its headers alone: each down (A) matrix's input width and
    each up (B) matrix's output width, by key ({} when the file cannot be read: loading says why)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception:  # noqa: BLE001 (a damaged file or not safetensors: its loading says what is wrong)
        return {}
    down = (".lora_A.", ".lora_down.", ".lora.down.")
    return {k: (s[1] if any(d in k for d in down) else s[0]) for k, s in shapes.items() if len(s) == 2}


def warn_other_base(unet, specs: list[LoraSpec], cfg) -> None:
    """A LoRA our trainer wrote names its base model (lora/base_model.json): applied to another model with the same
    layer shapes it loads fine but does not show what training did, so say so (a fine-tune of the base may be
    intended: a warning, not an error)."""
    ours = None
    for spec in specs:
        info = spec.file.parent / LORA_BASE_FILE
        if not info.is_file():
            continue  # a LoRA from elsewhere: nothing to compare
        try:
            saved = base_fingerprint.load_base_record(info)
            if not isinstance(saved.get("conv_in", []), list):
                raise ValueError("wrong shape")
        except (OSError, ValueError) as e:  # (a damaged one: read_lora refused it before)
            log.warning("--lora %s: %s is not the base-model record a training run writes (%s): which model the "
                        "LoRA belongs to is not checked", spec.arg, info, first_line(e, 80))
            continue
        ours = ours or base_fingerprint.fingerprint(cfg, unet)
        problem = base_fingerprint.fingerprint_difference(saved, ours)
        if problem:  # (a hub id's commit: the name alone loads the hub's main, --model as given here maybe)
            commit = base_fingerprint.trained_commit(saved)
            log.warning(
                "--lora %s was trained on base model %r%s, and %s from --model %r here: the images show it on another "
                "model; pass %s to see what training did", spec.arg, saved.get("model"),
                f" at commit {commit}" if commit else "", problem, cfg.model,
                base_fingerprint.model_at_commit(str(saved.get("model")), commit)[1])

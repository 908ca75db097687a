"""``lowmem-alignprop sample``'s command: the settings the LoRAs' runs recorded taken into the command line's (before
the config is built), then the evaluation (:func:`lowmem_alignprop.commands.evaluate.evaluate`) and its summary. The
command line (:func:`lowmem_alignprop.cli.cmd_sample`) parses the options and builds the config between the two."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lowmem_alignprop.lora.base_records import (recorded_base, recorded_fingerprint, recorded_reward_sha, same_model,
                                                say_reward_file_changed, usable_scoring)
from lowmem_alignprop.commands.evaluate import evaluate, print_summary
from lowmem_alignprop.lora.lora_args import LoraSpec, base_record_file, parse_lora
from lowmem_alignprop.lora.lora_checks import check_mixable
from lowmem_alignprop.lora.lora_files import HEADER_BASE_MODEL, header_base_model, header_image_settings
from lowmem_alignprop.lora.lora_merge import held_in, merged_into, refuse_held_loras
from lowmem_alignprop.run.base_fingerprint import REWARD_SHA, recorded_pins, trained_commit
from lowmem_alignprop.run.filenames import SAMPLE_DIR
from lowmem_alignprop.run.merged_models import merged_record
from lowmem_alignprop.settings.config import (HUB_PINS, MODEL_ENV, PROMPT_READING, SPEED_IN_TRAINING_ONLY,
                                              TRAINING_ONLY, UNCONDITIONAL_USES, coerce, flag_value, split_set)
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.image_size import resolution_of
from lowmem_alignprop.step.inputs import missing_recorded, recorded_path_line

logger = logging.getLogger("lowmem_alignprop")


@dataclass
class SampleRequest:
    """What :func:`take_run_settings` found for :func:`sample_main`: the LoRAs (none: the model alone), the user's
    own prompts (``--prompt``, none: a prompt set's), whether the default output folder is numbered, and why the model
    is the default one."""
    specs: list[LoraSpec]
    prompts: list[str]
    numbered: bool
    default_model: str
    header_model: str = ""  # what a lone file's header says of a model not at hand (sampled on the default instead)
    model_named: bool = True  # no LoRA: whether --model (or --set model=) named the model; else the default is said
    merged_run: bool = False  # no LoRA: an `export --merge` model whose LoRA's run's settings were taken (said)


def take_run_settings(args: argparse.Namespace, own: list[str]) -> SampleRequest:
    """The LoRAs of ``args`` (``--lora`` and the bare ones) read, and the model, image settings, reward and prompts
    their (first) run recorded added to ``args`` (``args.model``, ``args.set``) where the command line does not set
    them; ``args.output_dir`` the numbered default folder without one. ``own``: the ``--prompt`` texts."""
    specs = [parse_lora(a, i) for i, a in enumerate(args.lora)]
    check_mixable(specs)  # (before the first LoRA's run settings are taken or another's are said to differ)
    given = {split_set(s)[0] for s in args.set}  # (a malformed one: config's line, before any LoRA's settings)
    if given & TRAINING_ONLY:
        logger.warning(
            "--set %s: training settings; sample trains nothing, so they change nothing here",
            ", ".join(sorted(given & TRAINING_ONLY)))
    if given & SPEED_IN_TRAINING_ONLY:  # (they were taken in silence)
        logger.warning("--set %s: speed settings of training's steps; sample renders through diffusers' pipeline "
                       "without them, so they change nothing here", ", ".join(sorted(given & SPEED_IN_TRAINING_ONLY)))
    # said to change nothing, so they refuse nothing either (activation_offload's rule of the VAE checkpointing)
    args.set = [s for s in args.set if split_set(s)[0] not in TRAINING_ONLY | SPEED_IN_TRAINING_ONLY]
    given |= {k for k in ("reward", "prompts") if getattr(args, k) is not None}  # (their flags: the user's choice)
    given |= {"reward", "reward_weights"} if args.recipe else set()  # (a recipe names its reward)
    given |= {"prompts"} if own else set()  # (--prompt TEXT: no prompt set read)
    given |= set(PROMPT_READING) if "prompts" in given else set()  # (the run's column or filter: of its own table)
    if not specs:  # the model alone: the profile's settings (the command line's win); a merged one: its LoRA's run's
        named, merged = args.model is not None or "model" in given, _take_merged(args, given)
        return SampleRequest([], own, _numbered(args, given), "", model_named=named, merged_run=merged)
    base, default_model, header = None, "", ""
    if "model" not in given:  # the model the (first) LoRA was trained on, as lora/base_model.json records it
        base = recorded_base(specs[0], model_given=args.model is not None)
        header = _header_model(args, specs[0]) if base is None and base_record_file(specs[0]) is None else ""
        if args.model is None and base is None:  # (said where the LoRA does not fit the default model)
            default_model = f"--lora {specs[0].arg} records no model it was trained on" + (
                f"; {header}" if header else "") + next(
                (f"; --lora {s.arg} records {r[0]}" for s in specs[1:] if (r := recorded_base(s, model_given=True))),
                "")  # (a mix's other LoRA that names its model: the --model to pass, likely)
    if base is not None and (args.model is None or same_model(args.model, base[0], recorded_fingerprint(specs[0]))):
        _take_base(args, specs, base, given)
    elif base is not None:  # (the LoRA's own model sampled as its run did; another one as the profile samples)
        logger.info("--model %s is not the model %s was trained on (%s): sampled with the profile's image settings, "
                    "not its run's (--model %s renders as its run did; --set KEY=VALUE chooses)", args.model,
                    specs[0].shown, base[0], base[0])
    elif base_record_file(specs[0]) is None:  # a LoRA file shared alone: how its run sampled, from its header
        _take_header(args, specs, given)
    return SampleRequest(specs, own, _numbered(args, given), default_model, header if default_model else "")


def _numbered(args: argparse.Namespace, given: set[str]) -> bool:
    """Whether the output folder is the numbered default (``args.output_dir`` set to it): an earlier evaluation there
    is kept, this one goes to outputs/sample-2... (--set output_dir is --output-dir's other spelling)."""
    numbered = args.output_dir is None and "output_dir" not in given
    if numbered:
        args.output_dir = SAMPLE_DIR  # (evaluate's hold_folder moves on to the next free one)
    return numbered


def _header_model(args: argparse.Namespace, spec: LoraSpec) -> str:
    """A LoRA file shared alone (no base_model.json) whose header names a shipped model or a hub id
    (:func:`~lowmem_alignprop.lora.lora_files.header_base_model`): taken as ``args.model`` where --model is not
    given, said in one line; else what its header says of its model, for the line on the default model ("": nothing)."""
    model, said = header_base_model(spec.header_file)
    if model is None or args.model is not None:
        return said
    args.model = model
    logger.info("--model not given: sampling %s, the model the header (%s) of --lora %s says it was trained on "
                "(--model to choose another)", model, HEADER_BASE_MODEL, spec.arg)
    return ""


def _as_sets(taken: dict) -> list[str]:
    """Recorded settings as ``--set`` items (several sizes as --set writes them: 64,64x32)."""
    return [f"{k}={flag_value(v) if isinstance(v, list) else v}" for k, v in taken.items()]


def _take_base(args: argparse.Namespace, specs: list[LoraSpec], base: tuple[str, dict], given: set[str]) -> None:
    """The first LoRA's recorded model (where ``--model`` is not given) and its run's image settings, reward and
    prompts (those at hand here) not in ``given`` into ``args``, a hub id model_components or vae taken at the commit
    its run's parts came from (components_revision, vae_revision); another LoRA's run's other settings said."""
    taken = _with_pins(_usable(args, base[1], given), recorded_fingerprint(specs[0]), given)
    say_reward_file_changed(f"--lora {specs[0].arg}", recorded_reward_sha(specs[0]), taken)  # (an edited file
    # scores otherwise than the run's)
    if (found := missing_recorded(taken, ("vae", "model_components"))) is not None:  # (read to render: not dropped)
        raise UserError(recorded_path_line(f"--lora {specs[0].arg}", taken, found, "its run's record", "sample"))
    args.set += _as_sets(taken)
    settings = "; as its run did: " + " ".join(_as_sets(taken)) if taken else ""
    if args.model is None:
        args.model = base[0]
        commit = trained_commit(recorded_fingerprint(specs[0]))  # a hub id's: the commit it trained on
        if commit and "revision" not in given:
            args.set.append(f"revision={commit}")
        logger.info(
            "--model not given: sampling %s%s, the model %s was trained on (--model to choose another)%s", base[0],
            f" at commit {commit}" if commit and "revision" not in given else "", specs[0].shown, settings)
    elif taken:  # the model it was trained on, named: rendered as its run rendered (before_after.json's images)
        what = "an `export --merge` of the model" if merged_record(args.model) else "the model"
        logger.info("--model %s is %s %s was trained on%s", args.model, what, specs[0].shown, settings)
    say_other_runs(specs, base[1], given, args)


def _with_pins(taken: dict, record: dict | None, given: set[str]) -> dict:
    """``taken`` with, after a hub id model_components or vae, the pin (components_revision, vae_revision) of the
    commit ``record`` (the LoRA's base_model.json) says its run's parts came from, unless given."""
    pins = {k: v for k, v in recorded_pins(record, taken).items() if k not in given}
    out = {}
    for key, value in taken.items():
        out[key] = value
        pin = HUB_PINS.get(key, "")
        if pin in pins:
            out[pin] = pins[pin]
    return out


def _take_header(args: argparse.Namespace, specs: list[LoraSpec], given: set[str]) -> None:
    """The image settings (prediction type, zero-SNR schedule, resolution, steps, guidance...) the first LoRA's file
    header says its run sampled with (:func:`~lowmem_alignprop.lora.lora_files.header_image_settings`; no
    base_model.json beside it) not in ``given`` into ``args.set``, said in one line; another LoRA's run's other
    settings said."""
    settings, keys = header_image_settings(specs[0].header_file)
    if taken := _usable(args, settings, given):
        # (a zero-SNR schedule is sampled with eta below 1; a header of an older export does not record the run's:
        # DDIM's deterministic 0)
        eta = taken.get("zero_terminal_snr") and "eta" not in given and "eta" not in taken and not args.recipe
        args.set += _as_sets(taken) + (["eta=0"] if eta else [])
        logger.info(
            "--lora %s has no base_model.json beside it: its header (%s) says its run sampled with %s, so this "
            "does%s (--set KEY=VALUE chooses)", specs[0].arg, ", ".join(dict.fromkeys(keys[k] for k in taken)),
            " ".join(_as_sets(taken)),
            ", at eta=0 (the header does not say the run's; zero SNR needs one below 1)" if eta else "")
    say_other_runs(specs, settings, given, args)


MERGED_HOLDS = ("model_components", "vae")  # a merged model's own parts (its VAE is its LoRA's run's): not taken


def held_run_settings(model: str) -> list[tuple[str, dict]]:
    """For each LoRA the `export --merge` model ``model`` holds (:func:`merged_record`), in merge order: (the LoRA as
    the record names it, the settings its run sampled with: the record's own, which export --merge writes, else, for
    a model merged before it did, the LoRA's base_model.json or run where that LoRA is still there), less what the
    model holds itself (:data:`MERGED_HOLDS`). A LoRA merged out again (weights summing to 0), or one whose run's
    settings are nowhere recorded, is left out; [] for another model."""
    held, runs = merged_record(model), []
    for r in held:
        if "digest" in r and held_in(held, r["digest"]) is None:
            continue
        settings = {**_dict(r.get("image_settings")), **_dict(r.get("scoring"))} or _lora_run_settings(r.get("lora"))
        if settings := {k: v for k, v in settings.items() if k not in MERGED_HOLDS}:
            runs.append((str(r.get("lora")), settings))
    return runs


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _lora_run_settings(lora) -> dict:
    """The settings a merged LoRA's run sampled with, read beside the LoRA (base_records.recorded_base) where it is
    still there; {} where it is gone, is no LoRA now, or records none."""
    if not isinstance(lora, str) or not lora or not Path(lora).expanduser().exists():
        return {}
    try:
        base = recorded_base(parse_lora(lora, 0), model_given=True)
    except (UserError, OSError, ValueError):  # (no LoRA there now: the model renders with the command's settings)
        return {}
    return base[1] if base is not None else {}


def _take_merged(args: argparse.Namespace, given: set[str]) -> bool:
    """An `export --merge` model sampled alone: the settings its (last merged) LoRA's run sampled with
    (:func:`held_run_settings`) not in ``given`` into ``args.set``, said in one line, as ``sample LORA`` takes them;
    another LoRA's run's that differ said in one more. False (nothing taken or said) for another model, or a merged
    one whose LoRAs' runs' settings are nowhere recorded."""
    model = next((v for k, v in reversed([split_set(s) for s in args.set]) if k == "model"), args.model)
    if not model or not (runs := held_run_settings(model)):
        return False
    (lora, settings), held = runs[-1], merged_record(model)
    taken = _usable(args, settings, given)
    said_lora = next((r for r in reversed(held) if str(r.get("lora")) == lora), {})  # (the record of the LoRA taken)
    say_reward_file_changed(f"--model {model}'s LoRA {lora}", said_lora.get(REWARD_SHA), taken)
    args.set += _as_sets(taken)
    whose = "its LoRA's run" if len(held) == 1 else f"the run of {lora}, the last LoRA merged into it" + (
        "," if lora == str(held[-1].get("lora")) else " whose run's settings are recorded,")
    what = " ".join(_as_sets(taken)) if taken else "(the command line sets each of its settings)"
    logger.info("--model %s is an export --merge (%s into %s): sampled as %s did: %s (--set KEY=VALUE chooses)", model,
                fused_loras(held), _into(held), whose, what)

    def said(run: dict, keys: list[str]) -> str:
        return " ".join(f"{k}={run.get(k, '(default)')}" for k in keys)

    differ = {other: keys for other, theirs in runs[:-1]
              if (keys := sorted(k for k in (set(settings) | set(theirs)) - given if settings.get(k) != theirs.get(k)))}
    if differ:  # (a mix sampled with its LoRAs takes the first's settings: a merge's last is the one fused on top)
        logger.warning("--model %s holds LoRAs whose runs sampled otherwise: %s; the images use the last one's, %s's "
                       "(%s); --set KEY=VALUE chooses", model,
                       "; ".join(f"{other}'s with {said(theirs, differ[other])}" for other, theirs in runs[:-1]
                                 if other in differ),
                       lora, said(settings, sorted({k for keys in differ.values() for k in keys})))
    return True


def fused_loras(held: list[dict]) -> str:
    """A merged model's LoRAs as one line names them: 'LORA at weight W, ...'."""
    return ", ".join(f"{r.get('lora')} at weight {float(r.get('weight', 1.0)):g}" for r in held)


def _usable(args: argparse.Namespace, settings: dict, given: set[str]) -> dict:
    """The settings of a LoRA's run (its record's or its header's) this command takes: those not in ``given``, less
    a reward or prompts not at hand here (said: usable_scoring), and less what acts on the unconditional branch when
    the command line's guidance_scale turns it off (said: the user set neither, and the config would refuse them)."""
    taken = usable_scoring({k: v for k, v in settings.items() if k not in given})
    if unguided(args.set) and (left := sorted(set(taken) & set(UNCONDITIONAL_USES))):
        taken = {k: v for k, v in taken.items() if k not in left}
        logger.info("--set guidance_scale turns classifier-free guidance off: the run's %s, which act on its "
                    "unconditional branch, left out", " and ".join(left))
    return taken


def say_other_runs(specs: list[LoraSpec], first: dict, given: set[str], args: argparse.Namespace | None = None) -> None:
    """A mix renders as the first LoRA's run did (``first``: the settings taken from its record or header): another
    LoRA's run's other settings (its base_model.json's, else what its header says) are said. A setting the first does
    not record renders at the profile's value (``args``: the command line, the first's settings in it): one the other
    run's equals is no difference (a LoRA from elsewhere first said a run's eta=1.0 differed from the profile's 1.0)."""
    rendered: dict | None = None
    for spec in specs[1:]:
        if base_record_file(spec) is not None:
            if (record := recorded_base(spec, model_given=True)) is None:
                continue
            other, keys = record[1], set(first) | set(record[1])
        else:  # (a header says only some settings: those it does not say are not compared)
            other = header_image_settings(spec.header_file)[0]
            keys = set(other)
        differ = sorted(k for k in keys - given if first.get(k) != other.get(k))
        if args is not None and any(k not in first for k in differ):
            rendered = _rendered_with(args) if rendered is None else rendered
            differ = [k for k in differ if k in first or k not in rendered or rendered[k] != other.get(k)]
        if differ:
            logger.warning(
                "--lora %s's run sampled with %s: the images use the first LoRA's settings (%s); --set KEY=VALUE "
                "chooses", spec.arg, " ".join(f"{k}={other.get(k, '(default)')}" for k in differ),
                " ".join(f"{k}={first.get(k, '(default)')}" for k in differ))


def _rendered_with(args: argparse.Namespace) -> dict:
    """The settings the command's config holds (built as the command builds it, its lines said then, not here); {}
    where it cannot be built (its one line comes when the command builds it)."""
    from lowmem_alignprop.settings.profiles import FLAG_FIELDS, resolve_config

    was, logger.disabled = logger.disabled, True
    try:
        flags = {f: getattr(args, f, None) for f in FLAG_FIELDS}
        return resolve_config(getattr(args, "profile", "auto"), flags, args.set, training=False)[1].to_dict()
    except (UserError, ValueError, OSError):
        return {}
    finally:
        logger.disabled = was


def unguided(sets: list[str]) -> bool:
    """Whether the command line's ``--set guidance_scale=`` (the last one) turns guidance off (1 or less)."""
    scales = [coerce(key, value) for key, value in map(split_set, sets) if key == "guidance_scale"]
    return bool(scales) and scales[-1] <= 1


def _into(held: list[dict]) -> str:
    """The model a merged model's first LoRA went into, in words (a hub id at its commit: lora_merge.merged_into)."""
    return merged_into(held[0])[0] if held[0].get("into") else "its base"


def sample_main(cfg, request: SampleRequest, *, num_prompts: int, images_per_prompt: int, profile_name: str) -> int:
    """Render, score and write the evaluation of ``request``'s LoRAs on ``cfg`` (none: the model alone), and print its
    summary."""
    refuse_held_loras(request.specs, cfg.model)  # a model `export --merge` fused one of them into: it would apply twice
    if not request.specs and not request.model_named:  # which model, in one line (the default may be $MODEL_ENV's)
        env = f" (${MODEL_ENV})" if os.environ.get(MODEL_ENV, "").strip() == cfg.model else ""
        logger.info("no LoRA and no --model: sampling %s, the default model%s (--model M samples another; "
                    "--lora DIR compares a LoRA with it)", cfg.model, env)
    elif not request.specs and not request.merged_run and (held := merged_record(cfg.model)):  # (none recorded)
        logger.info("--model %s is an export --merge (%s into %s): its LoRA's run's settings are not recorded, so it "
                    "renders with this command's (%s px, %d steps, guidance %g); sample LORA --model BASE renders as "
                    "that run did", cfg.model, fused_loras(held), _into(held), resolution_of(cfg.width, cfg.height),
                    cfg.sample_steps, cfg.guidance_scale)
    if len(cfg.sizes) > 1:  # (a run's list of sizes, or one given: it rendered at the first in silence)
        logger.info("resolution=%s gives %d sizes: sample renders at the first, %s px, as a run's sample grids do "
                    "(--set resolution=%s renders at another)", flag_value(cfg.resolution), len(cfg.sizes),
                    resolution_of(cfg.width, cfg.height), resolution_of(*cfg.sizes[1]))
    results = evaluate(cfg, request.specs, num_prompts=num_prompts, images_per_prompt=images_per_prompt,
                       profile_name=profile_name, numbered_output_dir=request.numbered,
                       prompts=request.prompts or None, default_model=request.default_model)
    if request.header_model:  # a file shared alone whose header names a local model, sampled on the default one it
        # fits (where it does not fit, evaluate's one line names the header's model)
        logger.warning("--lora %s: %s (--model %s, the default, was sampled instead)", request.specs[0].arg,
                       request.header_model, cfg.model)
    print_summary(results, Path(results["output_dir"]))
    return 0

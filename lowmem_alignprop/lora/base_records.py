"""What a LoRA our trainer wrote records of its base model (lora/base_model.json beside it, its run's config.yaml):
the model and the settings its run sampled with (:func:`recorded_base`, :func:`usable_scoring`), the model's
fingerprint (:func:`recorded_fingerprint`), and whether ``--model`` names that model (:func:`same_model`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lowmem_alignprop import rewards
from lowmem_alignprop.lora.lora_args import LoraSpec, base_record_file
from lowmem_alignprop.lora.lora_files import check_recorded_base, read_run, shared_name
from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.run import base_fingerprint
from lowmem_alignprop.run.filenames import CONFIG_FILE, LORA_BASE_FILE
from lowmem_alignprop.run.hub import with_pinned_prompts
from lowmem_alignprop.run.merged_models import merged_record
from lowmem_alignprop.settings.config import PROMPT_READING, image_settings, scoring_settings
from lowmem_alignprop.settings.errors import UserError, first_line
from lowmem_alignprop.settings.model_kind import shipped_name
from lowmem_alignprop.step.hub_prompts import run_sources
from lowmem_alignprop.step.prompts import configured_prompts

log = logging.getLogger("lowmem_alignprop")


# what the run's images were made with, beside its model: `sample` of a run's LoRA on that model renders as it did
def recorded_base(spec: LoraSpec, *, model_given: bool = False) -> tuple[str, dict[str, Any]] | None:
    """(model, settings) a LoRA our trainer wrote was trained on: lora/base_model.json's model, and the
    :data:`~lowmem_alignprop.settings.config.RUN_IMAGE_SETTINGS` its run sampled with (a transformer file's
    model_components among them): from its run's config.yaml where the LoRA is in its run (a lora/ folder's, a
    checkpoint's), else as base_model.json records them (a LoRA or an export copied elsewhere); None for a LoRA
    from elsewhere. ``sample`` without --model loads it with those settings. A recorded path that is gone raises
    UserError naming --model, and a damaged record is warned of, unless ``model_given`` (--model names the model:
    the record only tells whether it is the LoRA's own, :func:`same_model`)."""
    named = spec.named if spec.named.is_dir() else spec.named.parent  # an export's folder (kohya, peft) has one too
    if (record := base_record_file(spec)) is None:  # a LoRA from elsewhere (or a file shared alone)
        return None
    try:
        base = base_fingerprint.load_base_record(record)
        model, recorded = base.get("model"), {**(base.get("image_settings") or {}), **(base.get("scoring") or {})}
    except (OSError, ValueError, TypeError) as e:  # damaged: the model it was trained on is unknown
        if not model_given:
            log.warning(
                "--lora %s: %s cannot be read (%s): the model the LoRA was trained on is unknown; pass it with "
                "--model", spec.arg, record, first_line(e, 80))
        return None
    if not isinstance(model, str) or not model:
        return None
    checkpoint = ckpt.named_checkpoint(named)
    if not model_given:  # (a checkpoint's record is its state.json, read into the LoRA folder made of it)
        check_recorded_base(model, f"--lora {spec.arg}", "its state.json" if checkpoint else LORA_BASE_FILE)
    # a checkpoint: the settings its steps were made with (a later --resume may have changed the run's); else the
    # run: the folder named (RUN), or one or two above it (RUN/lora, RUN/export/kohya)
    # a hub dataset's prompts at the commit its run read (the address alone reads the dataset's main now)
    if checkpoint is not None:
        state = ckpt.read_state(checkpoint)
        config = with_pinned_prompts(state.get("config") or recorded, state.get("prompt_sources"))
    else:
        run = next((f for f in (named, *list(named.absolute().parents)[:2]) if (f / CONFIG_FILE).is_file()), None)
        config = with_pinned_prompts(read_run(run)[0], run_sources(run)) if run else recorded
    return model, {**image_settings(config), **scoring_settings(config)}


def usable_scoring(taken: dict[str, Any]) -> dict[str, Any]:
    """``taken`` (the settings ``sample`` takes from a LoRA's run) without the run's reward or prompts where they are
    not at hand here (a reward file or weights, a prompt file left on the machine that trained): said, and the
    defaults score instead."""
    kept = dict(taken)
    checks = {"reward": lambda: rewards.check_reward_spec(taken["reward"], weights=taken.get("reward_weights", "")),
              "prompts": lambda: configured_prompts(taken)}
    for key, check in checks.items():
        if key not in taken:
            continue
        try:
            check()
        except UserError as e:
            drop = ("reward", "reward_weights") if key == "reward" else (key, *PROMPT_READING)
            kept = {k: v for k, v in kept.items() if k not in drop}
            log.warning(
                "the LoRA's run was scored with %s=%s, not at hand here (%s): the default %s instead (--%s chooses)",
                key, taken[key], first_line(e).split("; ")[0], key, key)  # (what is missing, not our advice)
    return kept


def recorded_reward_sha(spec: LoraSpec) -> str | None:
    """The digest of the reward file's source a LoRA last trained with (rewards.reward_source_digest), as its
    base_model.json (a checkpoint: its state.json) records it; None for a built-in reward or a record without it."""
    checkpoint = ckpt.named_checkpoint(spec.named if spec.named.is_dir() else spec.named.parent)
    record = ckpt.read_state(checkpoint) if checkpoint is not None else read_base_record(spec) or {}
    return sha if isinstance(sha := record.get(base_fingerprint.REWARD_SHA), str) else None


def say_reward_file_changed(who: str, was: Any, taken: dict[str, Any]) -> None:
    """Warned where ``sample`` scores with the reward the run of ``who`` (a LoRA) trained with (``taken``: the run's
    settings taken) and that reward's file holds another source now than ``was`` (:func:`recorded_reward_sha`): the
    scores are the edited file's, not comparable with the run's."""
    if "reward" not in taken or not isinstance(was, str):
        return
    if (now := rewards.reward_source_digest(taken["reward"])) is not None and now != was:
        log.warning("%s trained with --reward %s at source sha256 %s...; that file holds another now (%s...): the "
                    "scores are this version's, not its run's", who, taken["reward"], was, now)


def same_model(given: str, recorded: str, fingerprint: dict | None = None) -> bool:
    """--model names the model a LoRA's record names: the same folder or file (however the path is written; the toy
    model's folder is ``toy``), the same hub id, or an `export --merge` of it (its record's first ``into``): the
    LoRA's run's image settings then apply, as to the model itself. ``fingerprint``: the LoRA's record of its base
    (:func:`recorded_fingerprint`), which a merge's record of the model it went into must match too."""
    def same(a: str, b: str) -> bool:
        a, b = shipped_name(a.strip()), shipped_name(b.strip())
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        return pa.resolve() == pb.resolve() if pa.exists() and pb.exists() else a == b

    if same(given, recorded):
        return True
    first = next((r for r in merged_record(given)[:1] if isinstance(r.get("into"), str)), None)
    if first is None:
        return False
    into, held = first["into"], first.get("into_fingerprint")
    if isinstance(held, dict) and fingerprint:  # (two bases in folders of one name: their weights tell them apart)
        return base_fingerprint.fingerprint_difference(fingerprint, held) is None and (
            same(into, recorded) or shared_name(into) == shared_name(recorded))
    # (a merged single file's header names its model by name only, lora_merge.shared_record: the recorded one's)
    return same(into, recorded) or (into == shared_name(recorded) and not Path(into).expanduser().exists())


def recorded_fingerprint(spec: LoraSpec) -> dict | None:
    """The fingerprint of the model a LoRA was trained on (its base_model.json's denoiser config digest and first
    weights, :func:`~lowmem_alignprop.run.base_fingerprint.fingerprint`), None without a readable one."""
    base = read_base_record(spec)
    return base if base is not None and isinstance(base.get("unet_config_sha"), str) else None


def read_base_record(spec: LoraSpec) -> dict | None:
    """The base_model.json beside a LoRA (:func:`base_record_file`) as written, None without one or a readable one."""
    if (record := base_record_file(spec)) is None:
        return None
    try:
        return base_fingerprint.load_base_record(record)
    except (OSError, ValueError):
        return None

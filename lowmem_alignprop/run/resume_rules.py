"""Whether a resume may go on with the config it is given: which fields must match the checkpoint's
(:data:`STRICT_FIELDS`), which change freely (:data:`FREE_FIELDS`) and which with a warning, recorded where the LoRA
was trained with them (:data:`TRAINED_WITH`); whether the checkpoint is where its run ended (its last step, an early
stop); whether its held-out evaluation measured as this run's does; a config.yaml edited by hand since. Reads a
checkpoint's state.json (run/checkpoint.py's); whether its base model is this run's is run/base_fingerprint.py's."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lowmem_alignprop.memory.optim import optimizer_class
from lowmem_alignprop.run.checkpoint import outputs_are_ema
from lowmem_alignprop.run.runlock import global_rank, world_size
from lowmem_alignprop.settings.config import RUN_IMAGE_SETTINGS, flag_value
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.paths import read_user_text

log = logging.getLogger("lowmem_alignprop")

# Config fields that must match to resume: they change what the saved tensors mean or their shapes.
STRICT_FIELDS = ("train_unet", "lora_rank", "lora_alpha", "lora_layers", "optimizer", "deepspeed_zero")
# Fields a resumed run may change silently (the rest change with a warning).
FREE_FIELDS = ("steps", "max_minutes", "output_dir", "checkpoint_every", "log_every", "report_to", "sample_prompts",
               "keep_checkpoints", "auto_fit", "max_bad_steps", "max_zero_grad_steps", "budget_gb", "eval_every",
               "early_stop", "best_by", "eval_on_start")


# what the trained LoRA depends on (its records say it was trained with them): how its images were made (the run's
# image settings but where the model's parts lie) and how it learned from them; a resume that only writes a finished
# run's outputs again takes no change of them (an output's, such as export_format or push_to_hub, it does)
TRAINED_WITH = frozenset(RUN_IMAGE_SETTINGS).difference({"model_components"}) | frozenset((
    "reward", "reward_weights", "prompts", "prompt_column", "prompt_filter", "prompt_order", "seed", "lr",
    "lr_scheduler", "lr_warmup_steps", "weight_decay", "max_grad_norm", "optimizer",
    "batch_size", "grad_accum", "truncation", "k", "k_min", "k_max", "loss_scale", "reward_target", "reward_cap",
    "kl_coeff", "lv_draws", "ema_decay", "ema_outputs", "mixed_precision", "base_quant", "recipe"))


# what a warned change does at a resume, where it is not what one would guess
CHANGE_NOTES = {"seed": " (the images' noise follows it; with prompt_order=random the prompt and K draws go on "
                        "from the checkpoint's random state, and the held-out prompts stay those the run set aside)"}


# what the held-out evaluation's objective (what best/ and the early stop compare) depends on, beside its prompts and
# how its images are made (:func:`images_changed`)
EVAL_BASIS_FIELDS = ("reward", "reward_weights", "reward_target", "reward_cap", "loss_scale", "seed", "best_by")


def images_changed(saved: dict[str, Any], cfg) -> list[str]:
    """The settings an image depends on besides the weights (RUN_IMAGE_SETTINGS: resolution, sample_steps, guidance,
    eta...) that a resume changed from the checkpoint's ``saved`` config: its rewards are then of other images, no
    measure for this run's (a field the checkpoint predates: not said to differ)."""
    return [f for f in RUN_IMAGE_SETTINGS if f in saved and saved[f] != getattr(cfg, f)]


def eval_basis_changed(state: dict[str, Any], cfg, held_out_sha: str | None = None) -> list[str]:
    """What the checkpoint's run's held-out evaluation measured otherwise than this run's: the fields of
    :data:`EVAL_BASIS_FIELDS` and :func:`images_changed` that differ from ``cfg``, and "held-out prompts" when
    ``held_out_sha`` (this run's held-out set's digest, once the prompts are split) differs from the one the
    checkpoint kept. Its evaluations are then no measure for this run's: best/ and the early stop's patience start
    over."""
    saved = state.get("config") or {}
    kept = (state.get("evaluation") or {}).get("held_out_sha")
    # a field the checkpoint's config predates had its default there (best_by: reward)
    return [f for f in EVAL_BASIS_FIELDS if saved and saved.get(f, getattr(type(cfg), f)) != getattr(cfg, f)] + (
        images_changed(saved, cfg)) + (
        ["held-out prompts"] if held_out_sha is not None and kept not in (None, held_out_sha) else [])


def evaluations_since_best(state: dict[str, Any]) -> int:
    """How many evaluations the checkpoint's run had gone without improving on its best."""
    return int((state.get("evaluation") or {}).get("since_best") or 0)


def stopped_early(state: dict[str, Any], cfg) -> int:
    """How many evaluations the checkpoint's run had gone without improving when it stopped early (its own patience
    spent before its last step) and this run's early_stop would stop it again; else 0 (it did not stop early, this
    run's patience is longer, or its evaluation measures otherwise)."""
    saved, since = state.get("config") or {}, evaluations_since_best(state)
    stopped = bool(saved.get("early_stop")) and since >= saved["early_stop"] and int(state["step"]) < saved["steps"]
    return since if stopped and cfg.early_stop and since >= cfg.early_stop and not eval_basis_changed(state, cfg) else 0


def run_ended(state: dict[str, Any], cfg) -> bool:
    """The checkpoint is where its run ended: its last step, or an early stop this run's settings keep."""
    return int(state["step"]) == cfg.steps or bool(stopped_early(state, cfg))


def check_config(state: dict[str, Any], cfg, path: Path, *, finished: bool = False) -> None:
    """Before any model loads: the checkpoint must come from a compatible configuration. ``finished``: the run ended
    at this checkpoint and its outputs are to be written again (no step left to train is then no error)."""
    saved = state.get("config", {})
    for name in STRICT_FIELDS:
        ours, theirs = getattr(cfg, name), saved.get(name)
        if name == "lora_alpha":  # None means "equal to the rank"
            ours, theirs = ours or cfg.lora_rank, theirs or saved.get("lora_rank")
        if name == "lora_layers":  # a checkpoint from before lora_layers existed trained the attention projections
            theirs = theirs or "attention"
        if ours != theirs:  # (another optimizer or ZeRO stage: the LoRA goes on, its optimizer's state starts afresh)
            carry = (f" (--init-lora {path} starts it from this LoRA)" if name in ("optimizer", "deepspeed_zero")
                     and cfg.train_unet == "lora" else "")
            raise UserError(f"checkpoint {path} was trained with {name}={theirs!r}, this run has {name}={ours!r}: "
                            f"resume with --set {name}={theirs}, or start a new run in another --output-dir{carry}")
    check_optimizer_state(saved, cfg, path)
    theirs, ours = int(state.get("world_size", 1)), world_size()
    if saved.get("deepspeed_zero") and theirs != ours:  # each process holds its own partition of the state
        how = ("without a launcher (python -m lowmem_alignprop ...)" if theirs == 1 else
               f"under accelerate launch --multi_gpu --num_processes {theirs} -m lowmem_alignprop ... (--multi_gpu "
               "on a CPU too: without it accelerate starts one process)")
        raise UserError(f"checkpoint {path} holds DeepSpeed partitions of {theirs} process{'es' * (theirs > 1)}; this "
                        f"run has {ours}: resume {how}")
    if int(state["step"]) >= cfg.steps and not (finished and int(state["step"]) == cfg.steps):
        done = "the run's last step: it is done" if int(state["step"]) == cfg.steps else "past them"
        raise UserError(f"checkpoint {path} is at step {state['step']} and --steps is {cfg.steps} ({done}): nothing "
                        f"left to train; raise --steps above {state['step']} to continue")
    since = evaluations_since_best(state)
    if stopped_early(state, cfg) and not finished:  # each resume would train one step and stop again
        raise UserError(f"checkpoint {path} is where the run stopped early (its held-out evaluation had not improved "
                        f"for {since} evaluations; the best step, {state['evaluation'].get('best_step')}, is in "
                        f"best/): nothing left to train; to train on, resume with --early-stop above {since}, or "
                        "--set early_stop=0")
    if (not finished and cfg.early_stop and since >= cfg.early_stop and not eval_basis_changed(state, cfg)
            and global_rank() == 0):  # a run that ended at its last step, now with less patience than it has spent
        log.warning("resume: the held-out evaluation has not improved for %d evaluations (since step %s), already "
                    "the --early-stop %d asked for now: the first evaluation that does not improve stops the run",
                    since, state["evaluation"].get("best_step"), cfg.early_stop)
    ours = cfg.to_dict()
    if saved.get("eval_every") and cfg.eval_every and outputs_are_ema(saved) != outputs_are_ema(ours):
        # best/ would compare two kinds of weights: the EMA's (ema_decay with ema_outputs) and the trained ones
        fix = next(f"--set {n}={str(saved.get(n, True)).lower()}" for n in ("ema_decay", "ema_outputs")
                   if bool(saved.get(n, True)) != bool(ours[n]))
        kind = {True: "EMA", False: "trained"}
        raise UserError(f"checkpoint {path} evaluated the {kind[outputs_are_ema(saved)]} weights and this run would "
                        f"evaluate the {kind[outputs_are_ema(ours)]} ones: best/ so far was chosen on the former; "
                        f"resume with {fix}, or start a new run")
    if cfg.init_lora and cfg.init_lora != saved.get("init_lora"):  # (loaded, then replaced by the checkpoint's)
        raise UserError(f"--init-lora {cfg.init_lora}: a resume continues the checkpoint's LoRA (step {state['step']}),"
                        " which would replace it: drop --init-lora, or start a new run with it in another --output-dir")
    if cfg.eval_holdout != saved.get("eval_holdout", cfg.eval_holdout):  # (recorded, not applied)
        raise UserError(f"eval_holdout={cfg.eval_holdout}: the run set aside its held-out prompts at its start "
                        f"({saved['eval_holdout']}), and a resume keeps them: leave --set eval_holdout out, or start a "
                        "new run")
    changed = changed_fields(saved, cfg)
    unused = [n for n in changed if n in TRAINED_WITH]
    if finished and int(state["step"]) == cfg.steps and unused:  # only its outputs are written: no step uses them
        raise UserError(f"the run finished at step {state['step']}, so this resume trains nothing (it writes the "
                        f"missing outputs again): {', '.join(unused)} would apply to no step, yet be recorded as "
                        f"trained with; leave {'it' if len(unused) == 1 else 'them'} out, or give --steps above "
                        f"{state['step']} to train on with {'it' if len(unused) == 1 else 'them'}")
    for n in changed if global_rank() == 0 else ():  # every rank checks alike: rank 0 says it
        was, now = (flag_value(v) if isinstance(v, list) else v for v in (saved[n], getattr(cfg, n)))  # (sizes)
        log.warning("resume: %s was %r in the checkpoint, now %r%s", n, was, now, CHANGE_NOTES.get(n, ""))


def check_optimizer_state(saved: dict[str, Any], cfg, path: Path) -> None:
    """Under DeepSpeed, ``offload`` decides the optimizer class beside ``optimizer`` (DeepSpeed's CPU Adam with the
    state offloaded): a resume must step with the class whose state the checkpoint holds (torch's AdamW state in CPU
    Adam stopped the first step in a KeyError, 'bias_correction')."""
    offload = saved.get("offload", "none")
    was = optimizer_class(saved.get("optimizer", cfg.optimizer), saved.get("deepspeed_zero", 0), offload)
    now = optimizer_class(cfg.optimizer, cfg.deepspeed_zero, cfg.offload)
    if was != now:
        carry = f" (--init-lora {path} starts it from this LoRA)" if cfg.train_unet == "lora" else ""
        raise UserError(f"checkpoint {path} was trained with offload={offload!r}, this run has offload={cfg.offload!r}:"
                        f" its optimizer state is {was.rsplit('.', 1)[-1]}'s, this run would step with "
                        f"{now.rsplit('.', 1)[-1]}: resume with --set offload={offload}, or start a new run in another "
                        f"--output-dir{carry}")


def changed_fields(saved: dict[str, Any], cfg) -> list[str]:
    """The fields of a checkpoint's config ``saved`` a resume with ``cfg`` changes, with a warning (the model is not
    one: the loaded weights' fingerprint judges another model; nor is a K that ``cfg``'s truncation does not read,
    k_min / k_max under fixed, k under uniform or per_step: fewer sample_steps lower it with no effect on a step)."""
    unread = {"k_min", "k_max"} if getattr(cfg, "truncation", "fixed") == "fixed" else {"k"}
    return [n for n in saved if n not in FREE_FIELDS and n not in STRICT_FIELDS and n != "model"
            and n not in unread and hasattr(cfg, n) and saved[n] != getattr(cfg, n)]


# what a resume tells of files changed at the same path (the trainer's replaced_inputs: ``name: [was, now]`` of
# their digests), as the card and the held-out evaluation's line name them
REPLACED = {"reward_source": "reward's source", "vae_file": "vae file", "reward_weights_file": "reward_weights file"}


def resume_changes(state: dict[str, Any], cfg, step: int, processes: int = 1,
                   software: dict[str, list] | None = None,
                   replaced: dict[str, list] | None = None, trains: bool = True) -> list[dict[str, Any]]:
    """The changes of what the LoRA is trained with (:data:`TRAINED_WITH`) at each resume so far, the checkpoint's
    and this one's (from ``step``): ``[{"step": N, "changes": {name: [was, now]}}]``; a model card lists them. A resume
    under another number of ``processes`` is one too (``processes``: the images an optimizer step averages), one
    under other ``software`` (run/software.py's software_changes: library versions, the device), and one whose
    files changed at the same paths (``replaced``: :data:`REPLACED`'s names, their digests). A start that ``trains``
    no step (an ended run's outputs written again) changes no process count."""
    saved = state.get("config", {})
    now = {n: [saved[n], getattr(cfg, n)] for n in changed_fields(saved, cfg) if n in TRAINED_WITH}
    if int(state.get("world_size", 1)) != processes and trains:
        now["processes"] = [int(state.get("world_size", 1)), processes]
    now.update(software or {})  # (none for a finished run's outputs written again)
    now.update(replaced or {})
    return list(state.get("resume_changes") or []) + ([{"step": step, "changes": now}] if now else [])


def edited_config_note(path: Path, saved: dict[str, Any], fits: list[dict]) -> str | None:
    """What to say of a run's config.yaml edited by hand since its checkpoint (None: not edited): a resume trains with
    the checkpoint's settings and the flags given now, and writes config.yaml again, so the edit would be lost
    without a word. ``fits``: --auto-fit's changes, which the checkpoint holds and config.yaml may not yet."""
    import yaml

    try:  # (re-saved by Notepad or PowerShell: UTF-16 too; its edit was lost without a word)
        written = yaml.safe_load(read_user_text(path))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    stepped = {k for f in fits for k in (f.get("change") or {})}
    edits = [(k, saved[k], v) for k, v in (written if isinstance(written, dict) else {}).items()
             if k in saved and k not in stepped and k != "output_dir" and v != saved[k]]
    if not edits:
        return None
    said = ", ".join(f"{name} {a!r} -> {b!r}" for name, a, b in edits)
    k, _, v = edits[0]
    return (f"resume: config.yaml was edited since the checkpoint ({said}): a resume trains with the checkpoint's "
            f"settings and the flags given now, and writes config.yaml again; give a change as a flag, e.g. "
            f"--set {k}={v}")


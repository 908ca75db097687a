"""Bad input, found before any model loads or anything is written: one line naming the fix (a UserError).

Training and ``sample`` call :func:`prepare_inputs` first; the planner checks the reward spec the same way.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import logging
import os
import sys
import tempfile
from pathlib import Path

from lowmem_alignprop.run.runlock import global_rank
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.paths import absolute_path


def prepare_inputs(cfg: Config, prompts: list[str] | None = None, *, training: bool = True) -> list[str]:
    """Everything that can fail on bad input, before any model is loaded or anything is written. ``cfg`` is
    validated where it was built (profiles.resolve_config, or ``Config(...).validate()``): not again here. Returns
    the prompts: ``prompts`` when given (``sample --prompt``), else ``cfg.prompts``'s. ``training=False``
    (``sample``): its tracker is not checked (it tracks nothing)."""
    from lowmem_alignprop.models.loading import resolve_model
    from lowmem_alignprop.step.prompts import configured_prompts
    from lowmem_alignprop.rewards import check_reward_spec

    cfg.check_installed()
    prompts = list(prompts) if prompts else configured_prompts(cfg)
    # unknown, unimportable or broken; a model reward's weight file missing (not after minutes of model loading)
    check_reward_spec(cfg.reward, resolution=cfg.shapes, prompts=prompts, weights=cfg.reward_weights)
    if resolve_model(cfg.model)[0] in ("arch", "flow_arch"):  # (missing paths fail here)
        logging.getLogger("lowmem_alignprop").warning(
            "--model %s is the architecture with random weights (for planning and memory benchmarks): its images are "
            "noise, whatever the reward does; pass a hub id, a folder or a file for trained weights", cfg.model)
    if training:
        check_tracker(cfg.report_to)
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file: choose a directory")
    check_writable(out)
    return prompts


def with_absolute_paths(cfg: Config) -> Config:
    """``cfg`` with every path it names that exists on this disk made absolute (relative to the folder the command
    runs in, ``~`` expanded): config.yaml, the checkpoints and lora/base_model.json then name a model, prompt file,
    VAE, reward file or starting LoRA that a ``sample``, ``export`` or ``--resume`` run from another folder finds.
    A name comes first, as where it is read (a built-in model or prompt set: ``toy`` is the shipped model even beside
    a folder of that name); a hub id and a path that does not exist (a dangling link too) stay as given, for their
    own errors later."""
    from lowmem_alignprop.rewards import parse_reward_spec
    from lowmem_alignprop.settings.model_kind import NAMED_KINDS
    from lowmem_alignprop.step.prompts import PROMPT_SETS

    def local(value: str, names=(), option: str = "") -> str:
        name = value.strip()
        path = os.path.expanduser(name)
        if not name or not os.path.exists(path):
            return value
        if name in names:  # (a run on the wrong model costs minutes: said)
            logging.getLogger("lowmem_alignprop").warning("%s %s is the built-in one, not ./%s here: write ./%s for "
                                                          "that", option, name, name, name)
            return value
        return absolute_path(path)

    def reward_file(part: str) -> str:  # one term of the spec, its weight kept as written
        [(term, _)] = parse_reward_spec(part)
        module, sep, fn = term.partition(":")
        if sep and module.endswith(".py"):  # 'path/to/file.py:fn'
            return local(module) + sep + fn + part.strip()[len(term):]
        if sep and module.isidentifier():  # 'my_reward:fn', a module of the working folder: named by its file
            found = importlib.machinery.PathFinder.find_spec(module, [*sys.path, os.getcwd()])  # (where it imports)
            if found is not None and found.origin == os.path.abspath(f"{module}.py"):
                return found.origin + sep + fn + part.strip()[len(term):]
        return part

    def weight_paths(spec: str) -> str:  # 'PATH', 'HEAD_FILE,CLIP_DIR', 'aesthetic=PATH;clip=PATH'
        return ";".join(name + eq + ",".join(local(p) for p in paths.split(","))
                        for name, eq, paths in (item.rpartition("=") for item in spec.split(";")))

    changed = {"model": local(cfg.model, NAMED_KINDS, "--model"), "model_components": local(cfg.model_components),
               "vae": local(cfg.vae), "prompts": local(cfg.prompts, PROMPT_SETS, "--prompts"),
               "eval_prompts": local(cfg.eval_prompts, PROMPT_SETS, "eval_prompts"), "init_lora": local(cfg.init_lora),
               "reward": ",".join(reward_file(term) for term in cfg.reward.split(",")),
               "reward_weights": weight_paths(cfg.reward_weights)}
    return dataclasses.replace(cfg, **{k: v for k, v in changed.items() if v != getattr(cfg, k)})


OLD_RELATIVE = "a path relative to the folder its run started in (a run before 2026-12-05)"
ANOTHER_MACHINES = "a Windows path (of the machine it trained on), not one on this machine"
RECORDED_PATHS = ("prompts", "eval_prompts", "vae", "model_components", "reward", "reward_weights")  # (and model)


def missing_recorded(values: dict, keys: tuple[str, ...] = RECORDED_PATHS) -> tuple[str, str] | None:
    """The first (field, path) of ``keys`` in ``values`` (a run's recorded settings) whose path is not found from the
    working folder, or None: moved or deleted since (a prompt file only when relative), or relative (a run before
    2026-12-05 recorded its paths as typed, relative to the folder it started in; :func:`with_absolute_paths` records
    them absolute since). Names are no paths: a built-in prompt set, a hub dataset's file, a reward that is no .py
    file, a hub id where one is read (a VAE, the model's components, reward weights)."""
    from lowmem_alignprop.rewards import parse_reward_spec
    from lowmem_alignprop.run.hub import PREFIX
    from lowmem_alignprop.settings.paths import looks_like_hub_id
    from lowmem_alignprop.step.prompts import PROMPT_SETS

    def paths(key: str, value: str) -> list[str]:
        if key in ("prompts", "eval_prompts"):  # (one gone since: the prompt reader names the run's prompts.json)
            return [] if value in PROMPT_SETS or value.startswith(PREFIX) or os.path.isabs(os.path.expanduser(value)) \
                else [value]
        if key == "reward":  # 'path/to/file.py:fn', alone or in a sum
            return [m for m in (term.partition(":")[0] for term, _ in parse_reward_spec(value)) if m.endswith(".py")]
        items = [p for item in value.split(";") for p in item.rpartition("=")[2].split(",")] \
            if key == "reward_weights" else [value]  # ('aesthetic=HEAD,CLIP;clip=DIR')
        return [p for p in items if not looks_like_hub_id(p.strip())]

    for key in keys:
        value = values.get(key)
        for path in paths(key, value.strip()) if isinstance(value, str) and value.strip() else []:
            if path.strip() and not os.path.exists(os.path.expanduser(path.strip())):
                return key, path.strip()
    return None


def recorded_path_line(label: str, values: dict, found: tuple[str, str], record: str, where: str,
                       flag: bool = True) -> str:
    """The one line for :func:`missing_recorded`'s ``found`` in ``values``: ``label`` (the run, the LoRA) was trained
    with it (``record``: where it is recorded), a path gone since, or an older run's relative path or another
    machine's Windows path; the fix: the path from here by the field's flag (``flag``: the command takes it), or for
    a relative one the command (``where``: its verb) in the folder its run started in."""
    from lowmem_alignprop.settings.paths import windows_path

    key, path = found
    value = str(values[key]).strip()
    whose = f"whose {path} is " if path != value else ""
    fix = {"prompts": "--prompts ", "reward": "--reward "}.get(key, f"--set {key}=") + value.replace(path, "PATH", 1)
    if windows_path(path):
        why, tail = f"{whose}{ANOTHER_MACHINES}", ""
    elif os.path.isabs(os.path.expanduser(path)):
        why, tail = f"{whose or 'which is '}not there any more (moved or deleted)", ": put it back there"
    else:
        return (f"{label} was trained with {key}={value} ({record}), {whose}{OLD_RELATIVE}, not found from here: "
                f"{where} in that folder" + (f", or give it from here with {fix}" if flag else ""))
    return f"{label} was trained with {key}={value} ({record}), {why}" + (f": give it with {fix}" if flag else tail)


def check_tracker(report_to: str) -> None:
    """--report-to needs its package: without it accelerate would drop the tracker with a warning only."""
    import importlib.util

    needs = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(report_to, ())
    if needs and not any(importlib.util.find_spec(n) for n in needs):
        raise UserError(f"--report-to {report_to} needs the {needs[0]} package, which is not installed: "
                        f"pip install -e \".[{report_to}]\" (or pip install {needs[0]}), or leave --report-to out")


def check_writable(out: Path, flag: str = "--output-dir", *, parent: bool = False) -> None:
    """The output folder given by ``flag`` (or the nearest folder that exists above it; with ``parent`` the folder
    above it, where a folder written whole is made and renamed) must accept files; nothing is left behind."""
    probe = out.expanduser().absolute()
    probe = probe.parent if parent else probe
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{flag} {out} cannot be created: {probe} is a file, not a folder; choose another {flag}")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UserError(f"{flag} {out} is not writable ({e.strerror or e}): choose a folder you can write to with "
                        f"{flag}") from None


def prompt_key(prompt: str) -> str:
    """What makes two prompts the same prompt for holding out: case and runs of white space aside (CLIP's tokenizer
    reads "A red  circle" as "a red circle")."""
    return " ".join(prompt.split()).casefold()


HELD_OUT_KEYS = "held_out_keys"  # a checkpoint's record of the prompts its run set aside (their keys)


def split_settings(state: dict) -> dict:
    """A checkpoint's state.json -> the settings its run split its prompts by: its config, with the keys of the
    prompts it set aside where the checkpoint recorded them (older ones did not: drawn again from the config)."""
    recorded = {HELD_OUT_KEYS: state[HELD_OUT_KEYS]} if isinstance(state.get(HELD_OUT_KEYS), list) else {}
    return {**(state.get("config") or {}), **recorded}


def held_out_of_training(settings: dict, prompts: list[str]) -> set[str]:
    """The keys (:func:`prompt_key`) of the training prompts a run with these settings (a Config's or a checkpoint's
    config) sets aside: eval_holdout of them chosen with its seed when it evaluates without eval_prompts, else none.
    A resumed run's settings carry the keys its checkpoint recorded (``HELD_OUT_KEYS``): those, whatever the prompt
    file holds now (drawn again from an edited file, prompts it had trained on were held out, and held-out ones
    trained)."""
    import random

    if settings.get(HELD_OUT_KEYS) is not None:
        return set(settings[HELD_OUT_KEYS])
    if not settings.get("eval_every") or settings.get("eval_prompts"):
        return set()
    distinct = sorted({prompt_key(p) for p in prompts})
    holdout = int(settings.get("eval_holdout", Config.eval_holdout))
    if len(distinct) <= holdout:
        return set()
    return set(random.Random(settings.get("seed", Config.seed)).sample(distinct, holdout))


def held_out_by(cfg: Config, started: dict | None = None) -> dict:
    """The settings that chose this run's held-out prompts: those it started with (``started``, a resumed run's
    config at its checkpoint), else ``cfg``'s."""
    return cfg.to_dict() if started is None else started


def set_aside(cfg: Config, prompts: list[str], started: dict | None = None) -> set[str]:
    """The keys of the training prompts this run holds out (:func:`held_out_by`'s choice)."""
    return held_out_of_training(held_out_by(cfg, started), prompts)


def split_eval_prompts(cfg: Config, prompts: list[str], started: dict | None = None) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts). With eval_every: the eval_prompts set or file (less any that trains), or
    else eval_holdout of the training prompts, chosen with the seed and removed from training (never trained on).
    Without: (prompts, []). Prompts that differ in case or spacing only are one prompt. ``started``: a resumed run's
    config at its checkpoint: the prompts it set aside stay out of training and are its held-out ones, whatever seed
    or evaluation settings the resume gives (another seed drew others, which it had trained on)."""
    from lowmem_alignprop.step.prompts import configured_prompts, described

    def unique(keyed: list[str]) -> list[str]:  # one prompt per key, in order
        return list({prompt_key(p): p for p in reversed(keyed)}.values())[::-1]

    distinct = len({prompt_key(p) for p in prompts})
    if started is None and cfg.eval_every and not cfg.eval_prompts and distinct <= cfg.eval_holdout:
        raise UserError(f"eval_every holds out eval_holdout={cfg.eval_holdout} of the {distinct} distinct training "
                        "prompts, which leaves none to train on: give held-out prompts with --set eval_prompts=FILE, "
                        "or lower --set eval_holdout")
    held_by = held_out_by(cfg, started)
    aside = held_out_of_training(held_by, prompts)
    train = [p for p in prompts if prompt_key(p) not in aside]
    if not cfg.eval_every:
        return train, []
    if cfg.eval_prompts:  # a prompt that also trains is not held out: left out of the evaluation
        trained = {prompt_key(p) for p in train}
        given = configured_prompts(cfg, "eval_prompts")
        held = unique([p for p in given if prompt_key(p) not in trained])
        if not held:
            raise UserError(f"eval_prompts={described(cfg, 'eval_prompts')}: every one of its {len(given)} prompts "
                            "is also a training prompt, so none is held out: give prompts the run does not train on"
                            + (" (rows of the training table: another eval_prompt_filter or prompt_filter)"
                               if cfg.eval_prompts == cfg.prompts and cfg.eval_prompt_filter + cfg.prompt_filter
                               else ""))
        if len(held) < len(given) and global_rank() == 0:  # every rank splits alike: rank 0 says it
            logging.getLogger("lowmem_alignprop").info(
                "eval_prompts=%s: %d of its %d prompts also train (or repeat) and are left out of the evaluation",
                described(cfg, "eval_prompts"), len(given) - len(held), len(given))
        return train, held
    if not aside and held_by.get("eval_every") and not held_by.get("eval_prompts"):  # too few prompts to hold out
        holdout = int(held_by.get("eval_holdout", Config.eval_holdout))
        raise UserError(f"the prompts ({cfg.prompts}) have {distinct} distinct, and the run holds out eval_holdout="
                        f"{holdout} of them for its evaluation (eval_every={cfg.eval_every}), which leaves none to "
                        "train on: give more prompts, held-out prompts with --set eval_prompts=FILE, or --eval-every 0")
    if not aside:  # a resume adding --eval-every: every prompt has trained
        raise UserError("--eval-every on a resume of a run that trained on every one of its prompts: held out of "
                        "them, the evaluation would score prompts it trained on; give prompts it never trained on "
                        "with --set eval_prompts=FILE")
    held = sorted(unique([p for p in prompts if prompt_key(p) in aside]), key=prompt_key)
    if not held:  # an edit of the prompt file since took every one of them out
        raise UserError(f"the {len(aside)} prompts the run held out for its evaluation (e.g. {min(aside)!r}) are no "
                        f"longer in {cfg.prompts}, and the others have trained: put them back, or give held-out "
                        "prompts with --set eval_prompts=FILE")
    return train, held


def check_judged(eval_prompts: list[str]) -> None:
    """best_by=fidelity: every held-out prompt is in the toy world's grammar, or its images have no exact score."""
    from lowmem_alignprop.toy.fidelity import parses

    if stray := [p for p in eval_prompts if not parses(p)]:
        raise UserError(f"best_by=fidelity scores the held-out images with the toy world's exact evaluators, and "
                        f"{len(stray)} of the {len(eval_prompts)} held-out prompts are not in its grammar (e.g. "
                        f"{stray[0]!r}): hold out toy-world prompts (--set eval_prompts=toy-heldout), or use "
                        "--set best_by=reward")

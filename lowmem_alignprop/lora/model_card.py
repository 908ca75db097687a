"""The model card every export writes (``README.md`` in the hub's format: YAML front matter, then the run's
numbers, the files, how to use them and the commands that made them), and the run's facts it tells.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from lowmem_alignprop.lora.hub_lora import at_commit, split_hub_id
from lowmem_alignprop.lora.lora_files import (SD_V1, SD_V2, SDXL, Lora, base_family, denoiser_name, shared_name,
                                                  shared_setting, v_prediction, zero_terminal_snr)
from lowmem_alignprop.run.checkpoint import file_sha256, outputs_are_ema
from lowmem_alignprop.run.base_fingerprint import recorded_pins, trained_commit
from lowmem_alignprop.run.filenames import INIT_LORA_DIR, INIT_SOURCE_FILE, LORA_WEIGHT_NAME
from lowmem_alignprop.run.runfolder import recorded_dirs, started_commands, working_folder
from lowmem_alignprop.run.resume_rules import REPLACED
from lowmem_alignprop.run.software import SOFTWARE_NAMES
from lowmem_alignprop.settings.config import HUB_PINS, MODEL_ENV, describe_k, flag_value, set_flags
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.image_size import describe_sizes, resolution_of, sizes_of
from lowmem_alignprop.settings.model_kind import SINGLE_FILE_SUFFIXES, denoiser_label, sampler_name

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def run_info(lora: Lora) -> dict[str, Any]:
    """What the card says about training: from config.yaml and summary.json when the run folder has them; a LoRA
    away from its run (a copy, a hub LoRA) from what its base_model.json records of its run's images and scoring."""
    recorded = lora.base if isinstance(lora.base, dict) else {}
    c = lora.run_config or {k: v for part in ("image_settings", "scoring") if isinstance(recorded.get(part), dict)
                            for k, v in recorded[part].items()}
    s = lora.summary
    info: dict[str, Any] = {"base_model": lora.base_model}
    for key in ("reward", "profile", "sample_steps", "truncation", "k", "k_min", "k_max", "lr", "lr_scheduler",
                "lr_warmup_steps", "optimizer", "max_grad_norm", "mixed_precision", "resolution",
                "prompts", "seed", "batch_size", "grad_accum", "lora_rank", "lora_alpha", "ema_decay", "ema_outputs",
                "init_lora", "guidance_scale", "guidance_rescale", "eta", "negative_prompt", "t5_encoder", "vae",
                "prediction_type", "zero_terminal_snr", "deepspeed_zero", "offload", *OBJECTIVE_FIELDS):
        if key in c:
            info[key] = c[key]
    steps = s.get("steps_done", s.get("steps"))
    if steps is None and lora.run is not None and lora.step is None and (kept := newest_step(lora.run)) is not None:
        steps = kept  # no summary: it stopped (an error, a kill) before its end, or its summary is lost
        if isinstance(c.get("steps"), int) and kept < c["steps"]:
            info["unfinished_of"] = c["steps"]
    steps = c.get("steps") if steps is None else steps
    if steps is not None:
        info["steps"] = steps
    for key in ("reward_first", "reward_last", "sample_reward_before", "sample_reward_after", "interrupted",
                "reward_since_step", "reward_steps", "reward_window", "early_stopped_at", "best_step", "processes",
                "auto_fit", "resume_changes", "t5_tokens", "best_evaluation", "software", "reward_sha"):
        if s.get(key) is not None and not (isinstance(s[key], float) and math.isnan(s[key])):
            info[key] = s[key]
    if "reward_sha" not in info and isinstance(recorded.get("reward_sha"), str):  # a copy: as its record keeps it
        info["reward_sha"] = recorded["reward_sha"]
    limit = s.get("time_limit")  # --max-minutes stopped it: the limit, the step, of how many
    if isinstance(limit, dict) and isinstance(limit.get("stopped_at"), int) and isinstance(s.get("steps"), int) \
            and isinstance(limit.get("max_minutes"), int | float):
        info["time_limit"] = {"max_minutes": limit.get("max_minutes"), "stopped_at": limit["stopped_at"],
                              "of": s["steps"]}
    if c.get("init_lora") and lora.run is not None and (copy := lora.run / INIT_LORA_DIR / LORA_WEIGHT_NAME).is_file():
        info["init_lora_sha"] = file_sha256(copy)  # the LoRA it started from, as the run read it
        if (source := recorded_init_source(copy.parent)) is not None:  # the user's own file (a run before it: none)
            info["init_lora_source"] = source
    sampled = lora.base or {}  # a single file's marker keys (v_pred, ztsnr), which diffusers' loader does not read
    if sampled.get("t5") is False:  # an SD3 folder without text_encoder_3: its prompts were encoded without T5
        info["t5_encoder"] = False
    if Path(str(lora.base_model or "")).suffix.lower() in SINGLE_FILE_SUFFIXES:
        if info.get("prediction_type", "auto") == "auto" and sampled.get("prediction_type") == "v_prediction":
            info["prediction_type"] = "v_prediction"
        if sampled.get("zero_terminal_snr"):
            info["zero_terminal_snr"] = True
    toy = s.get("toy_world") or {}
    if all("fidelity_score" in (toy.get(w) or {}) for w in ("before", "after")):  # the exact evaluators' truth
        info["fidelity"] = {w: {k: toy[w][k] for k in ("fidelity_score", "fidelity_all_ok")}
                            for w in ("before", "after")}
    return info


FILE = "file"  # init_lora/source.json's key: the file hashed, from the path --init-lora named ("": that path)


def recorded_init_source(folder: Path) -> dict[str, str] | None:
    """A run's ``init_lora/source.json`` (``folder``: its init_lora/): the file --init-lora named and its SHA-256;
    None where the run wrote none (a run before the record) or it is damaged (the card gives the copy's digest)."""
    try:
        record = json.loads((folder / INIT_SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get(FILE), str) and isinstance(record.get("sha256"), str) \
        and re.fullmatch(r"[0-9a-f]{64}", record["sha256"])
    commit = record.get("revision") if ok else None  # (a hub id's: the commit it was read at)
    return {FILE: record[FILE], "sha256": record["sha256"],
            **({"revision": commit} if isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{40}", commit) else {})} \
        if ok else None


def started_from(info: dict[str, Any]) -> str:
    """The card's row for a run started from another LoRA (--init-lora): its name and digest, that of the file the
    user named where the run recorded it (init_lora/source.json: what sha256sum of their file says), else that of
    the run's converted copy (a run before the record)."""
    digest = f", sha256 {info['init_lora_sha'][:16]}" if info.get("init_lora_sha") else ""
    name = f"`{shared_name(str(info['init_lora']))}`"
    if source := info.get("init_lora_source"):
        digest = f", sha256 {source['sha256']} (of {f'its {source[FILE]}' if source[FILE] else 'the file'})"
        if source.get("revision"):  # a hub id's LoRA: its page, and the commit the run read it at
            repo = (split_hub_id(str(info["init_lora"])) or ("/".join(str(info["init_lora"]).split("/")[:2]),))[0]
            name = f"[`{info['init_lora']}`](https://huggingface.co/{repo}) at commit {source['revision']}"
    return (f"the LoRA {name}{digest} (its own training is not in the steps above; the samples' \"before\" are its "
            "images)")


def chosen_as(best: dict[str, Any], run_config: dict[str, Any]) -> str:
    """The card's row for an export of a run's best/: the best held-out evaluation, its figures (with
    best_by=fidelity the exact score it went by), and for step 0 (eval_on_start) that it is the LoRA before
    training."""
    text = f"the run's best held-out evaluation (--eval-every): step {best['step']}"
    if isinstance(best.get("eval_reward"), float | int):
        text += f", eval_reward {best['eval_reward']:.4f}"
    if run_config.get("best_by") == "fidelity" and isinstance(best.get("eval_fidelity_score"), float | int):
        text += f", eval_fidelity_score {best['eval_fidelity_score']:.3f} (best_by=fidelity)"
    if best["step"] == 0:
        text += ("; step 0 is the LoRA it started from (--init-lora): no trained step beat it"
                 if run_config.get("init_lora") else
                 "; step 0 is the untrained LoRA: no trained step beat it (this LoRA changes nothing)")
    return text


# what the loss was, beside the reward: a card without them reads a reward_target run's falling reward as a failure
OBJECTIVE_FIELDS = ("reward_target", "reward_cap", "loss_scale", "kl_coeff", "lv_draws", "recipe")


def objective(info: dict[str, Any]) -> str | None:
    """The card's row of what the loss did beside raising the reward (None: the plain AlignProp loss)."""
    parts = []
    if info.get("reward_target") is not None:
        parts.append(f"toward reward_target {num(info['reward_target'])} (the reward falls where it started above)")
    if info.get("reward_cap") is not None:
        parts.append(f"capped at reward_cap {num(info['reward_cap'])} (images above it get no gradient)")
    if info.get("loss_scale", 1.0) != 1.0:
        parts.append(f"loss_scale {num(info['loss_scale'])}")
    if info.get("kl_coeff"):
        parts.append(f"KL penalty to the base model, kl_coeff {num(info['kl_coeff'])}")
    if (info.get("lv_draws") or 1) > 1:
        parts.append(f"DRaFT-LV, {info['lv_draws']} draws of the last step")
    if info.get("recipe"):
        parts.append(f"recipe {info['recipe']}")
    return "; ".join(parts) or None


def process_counts(info: dict[str, Any]) -> list[tuple[int, int]]:
    """(first step, processes) of each stretch of the run's steps: one, unless a resume ran under another number of
    processes (resume_changes' ``processes``)."""
    moves = [r for r in info.get("resume_changes") or []
             if isinstance(r, dict) and isinstance((r.get("changes") or {}).get("processes"), list)]
    if not moves:
        return [(1, int(info.get("processes", 1)))]
    return [(1, int(moves[0]["changes"]["processes"][0]))] + [(int(r["step"]), int(r["changes"]["processes"][1]))
                                                              for r in moves]


def setting_at(info: dict[str, Any], name: str, step: int, now: Any) -> Any:
    """The value of config field ``name`` that step ``step`` trained with: ``now`` (the last start's), unless a later
    resume changed it (resume_changes' ``name: [was, now]``: the first such change after ``step`` gives what it
    was)."""
    later = [r["changes"][name] for r in info.get("resume_changes") or [] if isinstance(r, dict)
             and int(r.get("step", 0)) > step and isinstance((r.get("changes") or {}).get(name), list)]
    return later[0][0] if later else now


def images_per_step(info: dict[str, Any], step: int, processes: int, now: dict[str, Any]) -> int:
    """The images an optimizer step at ``step`` averaged: batch_size x grad_accum as they were then (``now``: the last
    start's values, :func:`setting_at`) x ``processes`` (batch_size is per process)."""
    return (setting_at(info, "batch_size", step, now.get("batch_size", 1))
            * setting_at(info, "grad_accum", step, now.get("grad_accum", 1)) * processes)


def trained_counts(info: dict[str, Any], steps: Any) -> list[tuple[int, int]]:
    """:func:`process_counts` less a stretch a resume began but trained no step of (``steps``: the run's steps done;
    not a number: unknown, all kept)."""
    return [(first, n) for first, n in process_counts(info) if not isinstance(steps, int) or first <= max(steps, 1)]


def processes_row(info: dict[str, Any]) -> str | None:
    """The card's "processes" row where more than one process trained: each stretch of steps that trained
    (:func:`trained_counts`) with its images per optimizer step as they were then."""
    counts = trained_counts(info, info.get("steps"))
    if not any(n > 1 for _, n in counts):
        return None

    def images(step: int, n: int) -> str:
        count = images_per_step(info, step, n, info)
        return f"{count} image{'s' * (count != 1)} per optimizer step"  # (1: a resume on one process at batch 1)

    if len(counts) == 1:
        return (f"{counts[0][1]} (`accelerate launch --multi_gpu --num_processes {counts[0][1]}`): "
                f"{images(1, counts[0][1])}")
    return ("; ".join(f"{n} from step {step} ({images(step, n)})" for step, n in counts)
            + " (more than 1: under `accelerate launch --multi_gpu --num_processes N`)")


def launcher_line(counts: list[tuple[int, int]]) -> str | None:
    """The comment over the training command of a run that several processes trained (:func:`process_counts`)."""
    if len(counts) == 1:
        return (f"# under accelerate launch --multi_gpu --num_processes {counts[0][1]} -m lowmem_alignprop with these "
                "arguments") if counts[0][1] > 1 else None
    # a resume under another number of processes: which steps had how many
    return ("# " + ", ".join(f"{n} process{'es' * (n != 1)} from step {step}" for step, n in counts)
            + " (more than 1: under accelerate launch --multi_gpu --num_processes N -m lowmem_alignprop with these "
            "arguments)")


def newest_step(run: Path) -> int | None:
    """The step of a run folder's newest checkpoint (what its lora/ holds when the run did not end), or None."""
    from lowmem_alignprop.run import checkpoint as ckpt

    found = ckpt.list_checkpoints(ckpt.root_of(run))
    return ckpt.step_of(found[0]) if found else None


def in_folders(commands: list[tuple[str | None, str]], above: list[str] = ()) -> list[str]:
    """The card's command lines: each (folder it ran in or None, command) with a ``# in DIR`` line over it where it
    names a relative path and DIR is not the one the nearest ``# in`` line above says (``above``: the card's lines
    over these, its code block from its last ```bash); a ``# in`` holds until the next, as a shell's cd does."""
    block = "\n".join(above).splitlines()
    block = block[len(block) - block[::-1].index("```bash"):] if "```bash" in block else block
    out, here = [], next((line[5:] for line in reversed(block) if line.startswith("# in ")), None)
    for folder, line in commands:
        if folder and folder != here and has_relative_path(line, Path(folder)):
            out.append(f"# in {folder}")
            here = folder
        out.append(line)
    return out


def training_command(lora: Lora, folders: bool = False) -> str | None:
    """The command that trained this run, as the run folder recorded it (command.txt: one line per start, a
    --resume included; ``folders``: a ``# in DIR`` line over each that names a relative path, the folder it ran in);
    for a run without that record, a command that trains it again: its profile, and --set for each field that
    differs from it."""

    lines = started_commands(lora.run) if lora.run is not None else []
    if isinstance(lora.starts, int) and lora.starts > 0:
        lines = lines[:lora.starts]  # a checkpoint: the starts that trained it, not a later --resume
    pins, commit, sources = hub_pins(lora), init_lora_commit(lora), prompt_sources(lora)
    lines = [pinned_prompts(pinned_init_lora(pinned_command(line, pins), commit), sources) for line in lines]
    if lines and folders:
        lines = in_folders(list(zip(start_folders(lora, len(lines)), lines)))
    if lines:
        return "\n".join(lines)
    c = lora.run_config
    if not c:
        return None
    from lowmem_alignprop.settings.config import FIELD_NAMES, build_config
    from lowmem_alignprop.settings.profiles import load_profile

    profile = str(c.get("profile", "cpu"))
    try:
        _, values = load_profile(profile)
        defaults = build_config(values, {}, {}).to_dict()
    except (UserError, OSError, ValueError):
        from lowmem_alignprop.settings.config import Config
        defaults = Config().to_dict()
    c = {**c, **pins}  # (the commits its hub parts came from, which the names alone may no longer load)
    if commit and (pinned := at_commit(str(c.get("init_lora") or ""), commit)) is not None:
        c["init_lora"] = pinned  # (a hub id --init-lora: the commit it was read at)
    c.update({field: at for field, (spec, at) in _pinned_sources(sources).items() if c.get(field) == spec})
    parts = ["lowmem-alignprop", "--profile", profile]
    flags = {"model": "--model", "reward": "--reward", "prompts": "--prompts", "steps": "--steps",
             "seed": "--seed", "output_dir": "--output-dir"}
    for key in FIELD_NAMES:
        if key not in c or c[key] == defaults.get(key):
            continue
        value = c[key]
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        parts += [flags[key], text] if key in flags else ["--set", f"{key}={text}"]
    import shlex
    return " ".join(shlex.quote(p) for p in parts)


def hub_pins(lora: Lora) -> dict[str, str]:
    """``--set`` pins that load the commits the run's hub id parts came from, as its base_model.json (or checkpoint)
    records them (``revision`` of --model, ``components_revision`` of model_components, ``vae_revision`` of vae):
    the names alone load the hub's main, which may have moved since. None for a local path or a record without."""
    return recorded_pins(lora.base, hub_parts(lora), tuple(HUB_PINS))


def hub_parts(lora: Lora) -> dict[str, str]:
    """The run's fields that a hub id pin (settings.config.HUB_PINS) pins: --model, model_components, vae ("":
    none)."""
    vae = lora.run_config.get("vae") or ((lora.base or {}).get("image_settings") or {}).get("vae")
    return {"model": str(lora.base_model or ""), "model_components": lora.model_components, "vae": str(vae or "")}


def pinned_command(line: str, pins: dict[str, str]) -> str:
    """A recorded command line that started a run (not a --resume, which takes its run's config) with ``--set`` each
    of ``pins`` (:func:`hub_pins`) it does not set itself, and each it set to a branch or tag (which moves: main) or
    to nothing given the commit instead: run again, it loads the commits the run trained on."""
    import shlex

    if (words := _start_words(line)) is None:
        return line
    given, moved = set(), False
    for i, (before, word) in enumerate(zip(["", *words], words)):
        if before == "--set" or word.startswith("--set="):
            key, _, value = word.removeprefix("--set=").partition("=")
            given.add(key.strip())
            if key.strip() in pins and not _names_commit(value.strip(), pins[key.strip()]):
                words[i], moved = word[:len(word) - len(value)] + pins[key.strip()], True
    extra = [f"--set {pin}={commit}" for pin, commit in pins.items() if pin not in given]
    return " ".join([shlex.join(words) if moved else line, *extra])


def init_lora_commit(lora: Lora) -> str | None:
    """The commit a hub id --init-lora was read at (the run's init_lora/source.json ``revision``), else None."""
    source = recorded_init_source(lora.run / INIT_LORA_DIR) if lora.run is not None else None
    return (source or {}).get("revision")


def pinned_init_lora(line: str, commit: str | None) -> str:
    """A recorded command line that started a run (not a --resume) with its hub id --init-lora (or ``--set
    init_lora=``) at ``commit``, the one it was read at (``owner/name@COMMIT[/file]``), unless it names that commit
    already: the hub id alone, or at a branch or tag, loads what the repository holds now."""
    def pinned(value: str) -> str | None:
        named = split_hub_id(value)
        return None if named is None or _names_commit(named[2], commit) else str(at_commit(value, commit))
    return _with_values(line, "--init-lora", "init_lora", pinned) if commit else line


def prompt_sources(lora: Lora) -> dict[str, dict]:
    """The hub dataset files the run's prompts were read from (its prompts.json ``sources``: step/hub_prompts.py's
    records), else none."""
    from lowmem_alignprop.step.hub_prompts import run_sources

    return run_sources(lora.run) if isinstance(lora.run, Path) else {}


def pinned_prompts(line: str, sources: dict[str, dict]) -> str:
    """A recorded command line that started a run (not a --resume) with each hub dataset address of its --prompts
    (``--set prompts=``, ``--set eval_prompts=``) the run read (``sources``: :func:`prompt_sources`) at the commit
    and file it read: ``hf://datasets/OWNER/NAME@COMMIT/FILE`` (the address alone reads the dataset's main now)."""
    for field, (spec, at) in _pinned_sources(sources).items():
        line = _with_values(line, "--prompts" if field == "prompts" else "", field,
                            lambda value, s=spec, a=at: a if value == s else None)
    return line


def _pinned_sources(sources: dict[str, dict]) -> dict[str, tuple[str, str]]:
    """{field: (the address given, the address of the commit and file read)} of :func:`prompt_sources`' records."""
    from lowmem_alignprop.run.hub import recorded_address

    return {field: (r["spec"], at) for field, r in sources.items() if (at := recorded_address(r)) is not None}


def _with_values(line: str, option: str, field: str, change) -> str:
    """A recorded command line that started a run (not a --resume) with each value of ``option`` (``--opt V``,
    ``--opt=V``; "": none) and of ``--set field=V`` that ``change(V)`` gives another for (None: kept) replaced."""
    import shlex

    if (words := _start_words(line)) is None:
        return line
    moved = False
    for i, (before, word) in enumerate(zip(["", *words], words)):
        value = word if option and before == option else word.removeprefix(f"{option}=") \
            if option and word.startswith(f"{option}=") else ""
        key, eq, setting = word.removeprefix("--set=").partition("=")
        if (before == "--set" or word.startswith("--set=")) and key.strip() == field and eq:
            value = setting
        head = word[:len(word) - len(value)]  # (--opt=, --set field=: kept)
        if value and (changed := change(value)) is not None:
            words[i], moved = head + changed, True
    return shlex.join(words) if moved else line


def _start_words(line: str) -> list[str] | None:
    """The words of a recorded command line that started a run; None for a --resume's (it takes its run's config) and
    for one with unbalanced quotes (kept as recorded)."""
    import shlex

    try:
        words = shlex.split(line)
    except ValueError:
        return None
    return None if any(w == "--resume" or w.startswith("--resume=") for w in words) else words


def _names_commit(value: str, commit: str) -> bool:
    """Whether pin ``value`` as typed names ``commit`` itself: the sha, or its short form (7 or more hex digits), not
    a branch or tag (main moves) or nothing (the hub's main)."""
    return len(value) >= 7 and commit.lower().startswith(value.lower()) and all(c in "0123456789abcdefABCDEF"
                                                                                 for c in value)


def start_folders(lora: Lora, count: int) -> list[str | None]:
    """The working folder of each of the run's first ``count`` starts (``start_dirs``: of the checkpoint exported,
    else summary.json's, else the newest checkpoint's for a run that wrote no summary); None where not recorded."""
    records = [lora.summary]
    if lora.run is not None and lora.starts is None:  # lora/ or best/: the run's own records
        from lowmem_alignprop.lora.lora_files import read_run
        from lowmem_alignprop.run import checkpoint as ckpt

        records.append(read_run(lora.run)[1])
        for found in ckpt.list_checkpoints(ckpt.root_of(lora.run))[:1]:
            try:
                records.append(ckpt.read_state(found))
            except (OSError, ValueError):
                pass
    record = next((r for r in records if isinstance(r, dict) and isinstance(r.get("start_dirs"), list)), {})
    return recorded_dirs(record, count)


# the options (and --set fields) whose value is always a path: relative, it names nothing without its folder
_PATH_OPTIONS = {"--output-dir", "--init-lora", "--resume", "--prompts", "output_dir", "init_lora", "prompts",
                 "eval_prompts"}


def has_relative_path(command: str, folder: Path) -> bool:
    """Whether a recorded command line names a path relative to the folder it ran in: an option's (or ``--set``
    field's) value that starts with ./ or ../, that is a path option's (--output-dir, --prompts other than a built-in
    set, --resume other than latest...), or that names something in ``folder`` (a model folder, a reward's .py file:
    each term of a list of them); absolute paths, hub ids and names do not."""
    import shlex

    from lowmem_alignprop.lora.hub_lora import hub_lora_id
    from lowmem_alignprop.run.hub import PREFIX as HUB_PREFIX
    from lowmem_alignprop.step.prompts import PROMPT_SETS

    try:
        words = shlex.split(command)
    except ValueError:  # (unbalanced quotes: nothing is told)
        return False
    env, _, model = words[0].partition("=") if words else ("", "", "")
    words = ["--model", model, *words[2:]] if env == MODEL_ENV else words[1:]  # (the environment's model: cli's)
    for before, word in zip(["", *words], words):
        option, eq, value = word.partition("=") if word.startswith("--") else (before, "", word)
        if word.startswith("-") and not eq:
            continue
        if option == "--set":
            option, _, value = value.partition("=")
        if value.startswith(("/", "~", "-")) or not value:
            continue
        named = (value in PROMPT_SETS or value.startswith(HUB_PREFIX)) if option.lstrip("-") in (
            "prompts", "eval_prompts") else (
            option == "--resume" and value == "latest") or (  # a LoRA's hub id (lora/hub_lora.py)
            option in ("--init-lora", "init_lora") and not (folder / value).exists() and hub_lora_id(value) is not None)
        if option in _PATH_OPTIONS and not named:
            return True
        parts = [p.partition(":")[0] if ".py:" in p else p for p in re.split(r"[,;=]", value)]
        if any(p in (".", "..") or p.startswith(("./", "../")) or p and not p.startswith(("/", "~"))
               and (folder / p).exists() for p in parts):
            return True
    return False


def model_card(lora: Lora, fmt: str, files: list[str], export_command: str, merged_weight: float | None = None,
               grid: str | None = None, merged_into: str | None = None, home: str | None = None,
               grid_step: int | None = None) -> str:
    """README.md in the hub's model-card format (front matter: :func:`front_matter`) with the run's numbers and the
    commands that made it. ``merged_into``: a merge's model (the LoRA's base, or the --model given); ``home``: the
    hub repository the folder is pushed to, which its code loads from (else THIS_FOLDER, the reader's copy)."""
    from huggingface_hub import ModelCard

    info = run_info(lora)
    family = base_family(lora)
    base = lora.base_model
    what = (f"the base model with the LoRA merged in at weight {num(merged_weight)}" if merged_weight is not None
            else f"a {denoiser_name(lora)} LoRA{kept_note(lora.kept)}, {fmt} format")
    into = merged_into if merged_into not in (None, base) else None  # merged into another model than its base
    step = grid_step if grid_step is not None else lora.step  # (a step's --sample-every grid)
    shown = "before and after training" if step is None else f"before training and at step {step}"
    front = front_matter(lora, fmt, merged_weight, into, grid, f"{shown}, same seeds")
    names = local_names(lora, info, into) if home else {}  # pushed: the card is others', its local paths by name
    since = info.get("reward_since_step")  # a resume changed the reward at this step
    said = shared_setting if home else lambda _, value: value  # pushed: a reward file, a prompt file... by its name
    reward = (f"{said('reward', info.get('reward'))} (from step {since}: a resume changed it or how the images are "
              "made)" if since else said("reward", info.get("reward")))
    if isinstance(info.get("reward_sha"), str):  # which version of a reward file: `sha256sum` of it begins so
        reward = f"{reward}, source sha256 {info['reward_sha']}..."
    pins = hub_pins(lora)  # the commits the run's hub parts came from: the rows and the code load them
    rows = [("base model", base_row(lora, into, names)), *part_rows(lora, pins, names),
            ("reward", reward),
            ("steps", info.get("steps")), ("profile", said("profile", info.get("profile"))),
            ("resolution", resolution_row(info)),
            ("objective", objective(info))]
    if (processes := processes_row(info)) is not None:  # (the command below is each process's)
        rows.append(("processes", processes))
    if info.get("prediction_type", "auto") != "auto" or info.get("zero_terminal_snr"):  # every format's card: a
        # sampler of the other kind renders noise
        zero = ", at zero terminal SNR (trailing timesteps)" if info.get("zero_terminal_snr") else ""
        rows.append(("prediction type", f"{info.get('prediction_type', 'auto')}{zero} (as the run sampled it, which "
                                        "the base model's files do not say to every loader; sample it so)"))
    if lora.hub is not None:  # export --lora OWNER/NAME: the hub LoRA and the commit it was read at
        rows.append(("exported from", f"the Hugging Face hub LoRA [`{lora.hub.shown}`]({lora.hub.url}) at commit "
                                      f"{lora.hub.commit} (its {lora.hub.file})"))
    if info.get("init_lora"):  # trained on from another LoRA: its steps are not in the count, "before" is its images
        rows.append(("started from", started_from(info)))
    if lora.kept:  # the layers its run kept as its --init-lora had them: in the file, loaded with it
        rows.append(("kept from --init-lora", kept_row(lora.kept, merged_weight)))
    if "truncation" in info:
        k = describe_k(info)
        rows.append(("K (denoising steps backpropagated)", f"{k} of {info.get('sample_steps')} "
                                                           f"{sampler_name(lora.flow)} steps"))
    ranks = sorted({lora.weights[f"{m}.lora_A.weight"].shape[0] for m in lora.modules})
    rows.append(("LoRA rank / alpha", f"{'/'.join(map(str, ranks))} / {num(lora.config.get('lora_alpha') or ranks[0])}"
                 f" ({layer_kinds(len(lora.modules), lora.adapted_targets)})"))
    if outputs_are_ema(info):  # which weights: the average's, as lora/ holds
        rows.append(("weights", f"the exponential moving average of the trained LoRA (decay {num(info['ema_decay'])})"))
    if "reward_first" in info and "reward_last" in info and info.get("reward_steps", 2) > 1:  # one step: no change
        rows.append(("training reward, first -> final steps" + (f" (since step {since})" if since else ""),
                     f"{info['reward_first']:.4f} -> {info['reward_last']:.4f}"))
    if "fidelity" in info:  # (the toy world: where a reward rising while the images go wrong shows)
        before, after = info["fidelity"]["before"], info["fidelity"]["after"]
        rows.append(("exact fidelity (toy world), before -> after", f"score {before['fidelity_score']:.3f} -> "
                     f"{after['fidelity_score']:.3f}, all right {before['fidelity_all_ok']:.0%} -> "
                     f"{after['fidelity_all_ok']:.0%}"))
    if "sample_reward_before" in info and "sample_reward_after" in info:
        as_trained = into or merged_weight not in (None, 1.0)  # the run's figures: the LoRA at 1 on its base
        rows.append(("sample reward, before -> after" + (" (the LoRA as trained: weight 1, on its base model)"
                                                         if as_trained else ""),
                     f"{info['sample_reward_before']:.4f} -> {info['sample_reward_after']:.4f}"))
    if info.get("auto_fit"):  # (the command below is the one typed: these changes came after it)
        rows.append(("--auto-fit's changes", "; ".join(f"step {c.get('step')}: `{set_flags(c.get('change') or {})}`"
                                                       for c in info["auto_fit"] if isinstance(c, dict))))
    if info.get("resume_changes"):  # (the rows above give the last start's settings: the earlier steps trained with
        rows.append(("changed by a resume", "; ".join(  # what these changes replaced)
            f"from step {r.get('step')}: " + ", ".join(resume_change(n, v, said)
                                                        for n, v in (r.get("changes") or {}).items())
            for r in info["resume_changes"] if isinstance(r, dict))))
    if limit := info.get("time_limit"):  # (a resume trains the rest under a new clock)
        at, of = limit["stopped_at"], limit["of"]
        rows.append(("time limit", f"stopped at its time limit (--max-minutes {num(limit['max_minutes'])}) after step "
                                   f"{at} of {of}: `--resume latest` trains steps {at + 1}-{of}"))
    elif info.get("interrupted"):
        rows.append(("note", "the run was interrupted before its last step"))
    if info.get("unfinished_of"):
        rows.append(("note", f"the run stopped at step {info['steps']} of {info['unfinished_of']} (an error or a kill) "
                             "and wrote no summary: this LoRA is that step's"))
    if info.get("best_evaluation"):  # an export of best/: why this step
        rows.append(("chosen as", chosen_as(info["best_evaluation"], lora.run_config)))
    if info.get("early_stopped_at"):  # (best/ holds the best evaluated step's LoRA)
        rows.append(("early stop", f"at step {info['early_stopped_at']}: the held-out evaluation stopped improving "
                                   f"(its best: step {info.get('best_step')}, the run's best/)"))
    title = lora.run.name if lora.run else lora.hub.repo.split("/")[-1] if lora.hub is not None else lora.path.name
    lines = [f"# {title}: AlignProp fine-tune", "",
             f"This folder holds {what}, trained with lowmem-alignprop (AlignProp: reward "
             "gradients backpropagated through the last K denoising steps into LoRA adapters on the "
             f"{denoiser_label(lora.flow)}).", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows if v is not None]
    lines += ["", "## Files", ""] + [f"- `{f}`" for f in files]
    if grid:
        lines += ["", "## Before / after", "", f"![{shown}, same seeds]({grid})"]
    usage = with_run_call(_usage(fmt, files, base, merged_weight, lora.family, lora.model_components,
                                 sdxl=family == SDXL, version=family, pins=pins), info, lora.flow,
                          pins.get("vae_revision", ""))
    if (commit := trained_commit(lora.base)) and base:  # a hub id's: the code loads the commit it trained on
        usage = [u.replace(f"from_pretrained({json.dumps(base)}", f"from_pretrained({json.dumps(base)}, "
                                                                  f"revision=\"{commit}\"") for u in usage]
    if fmt in ("kohya", "single-file") and not lora.flow:  # (the diffusers code sets them; these tools do not)
        usage += webui_sampling(lora, info, fmt)
    lines += ["", "## Use", ""] + (hub_usage(usage, home, names) if home else usage)
    train_cmd, export_command = (training_command(lora, folders=True), export_command) if not home else (
        shared_command(training_command(lora)), shared_command(export_command))
    lines += ["", "## How it was made", "", "```bash"]
    if train_cmd and (launched := launcher_line(trained_counts(info, info.get("steps")))):
        lines.append(launched)
    if train_cmd:
        lines.append(train_cmd)
    # (the export's own folder: it may not be where the run started)
    lines += in_folders([(None if home else working_folder(), export_command)], lines) + ["```", ""] + \
        software_lines(info)
    text = f"---\n{front}\n---\n\n" + "\n".join(lines)
    ModelCard(text)  # the hub's own parser: the front matter must read back
    return text


def front_matter(lora: Lora, fmt: str, merged_weight: float | None, into: str | None, grid: str | None,
                 shown: str) -> str:
    """The card's YAML front matter as the hub reads it: ``base_model`` (the model the weights are of: the LoRA's
    base, or the model it was merged into; a hub id only: a local path names nothing there) with
    ``base_model_relation`` (``adapter`` for a LoRA, ``merge`` for a merged model: the hub's model tree), the
    library whose loader reads the folder, ``pipeline_tag: text-to-image``, the tags, the grid as the widget's
    example image (``shown``: what it shows; the file is in the folder) and the base model's license where its own
    card gives one (else a comment with its family's, for the user to fill in)."""
    from huggingface_hub import ModelCardData

    family = base_family(lora)
    tags = ["lowmem-alignprop", "alignprop", "reward-finetuning", "text-to-image",
            {"flux": "flux", "sd3": "sd3"}.get(lora.family, "stable-diffusion-xl" if family == SDXL
                                               else "stable-diffusion")]
    if merged_weight is None:
        tags.insert(2, "lora")
    model = into or lora.base_model
    hub_base = model if is_hub_id(model) else None
    licensed = base_license(model, trained_commit(lora.base) if model == lora.base_model else None)
    data = ModelCardData(base_model=hub_base, base_model_relation=(
                             ("adapter" if merged_weight is None else "merge") if hub_base else None),
                         library_name=_library(fmt, lora), pipeline_tag="text-to-image", tags=tags,
                         widget=[{"text": shown, "output": {"url": grid}}] if grid else None, **licensed)
    return data.to_yaml() + ("" if licensed else f"\n# license: set the license of the base model here "
                                                 f"({license_example(lora, family)})")


def base_license(model: str | None, revision: str | None = None) -> dict[str, str]:
    """The license a base model's own card gives (``license``, and for ``other`` its ``license_name`` and
    ``license_link``): a local model folder's README.md, a hub id's from the local hub cache or, when the hub can be
    reached, fetched (at ``revision``, the commit its LoRA trained on); {} where none is found (a single file, no
    card, a card without a license). A link to a file of the base (FLUX.1-dev's ``LICENSE.md``) would be broken in
    the export's folder: a hub id's points into its repository, a local folder's is left out."""
    from huggingface_hub import ModelCard

    from lowmem_alignprop.settings.hub_access import hub_file

    if not model:
        return {}
    path = Path(model).expanduser()
    card = path / "README.md" if path.is_dir() else (
        hub_file(model, "README.md", download=True, revision=revision or "") if is_hub_id(model) else None)
    try:
        data = ModelCard.load(card, ignore_metadata_errors=True).data if card is not None and card.is_file() else None
    except Exception:  # noqa: BLE001 - a damaged card of another model: its license is unknown here
        return {}
    found = {k: getattr(data, k, None) for k in ("license", "license_name", "license_link")} if data else {}
    found = {k: str(v) for k, v in found.items() if isinstance(v, str) and v} if found.get("license") else {}
    if (link := found.get("license_link")) and not re.match(r"[a-z][a-z0-9+.-]*://", link):  # a file of the base's
        if is_hub_id(model):  # (FLUX.1-dev's LICENSE.md): in its repository, which this folder does not hold
            found["license_link"] = f"https://huggingface.co/{model}/blob/{revision or 'main'}/{link.lstrip('./')}"
        else:
            del found["license_link"]
    return found


def resume_change(name: str, change: list, said) -> str:
    """One change of the card's "changed by a resume" row (resume_changes' ``name: [was, now]``): a number of
    processes, a library's version or the device (run/software.py), a file changed at the same path (the reward's
    source, a vae or reward_weights file: resume_rules.REPLACED, their digests), or a setting as its --set flag."""
    was, now = change
    if name == "processes":
        return f"{now} process{'es' * (now != 1)} (was {was})"
    if name in SOFTWARE_NAMES:
        return f"{_software_name(name)} {now} (was {was})"
    if name in REPLACED:
        return f"the {REPLACED[name]}, changed at the same path (digest {now}, was {was})"
    return f"`{set_flags({name: said(name, now)})}` (was {_was(said(name, was))})"


def software_lines(info: dict[str, Any]) -> list[str]:
    """The card's "How it was made" lines on the software that trained it (summary.json's ``software``: versions and
    device from each stretch's first step on; steps before the first stretch, trained before it was recorded, are
    said to be unrecorded); none for a run from before it was recorded."""
    stretches = [s for s in info.get("software") or [] if isinstance(s, dict) and isinstance(s.get("versions"), dict)
                 and isinstance(s.get("step"), int)]
    if not stretches:
        return []

    def said(s: dict) -> str:
        names = ", ".join(f"{_software_name(n)} {v}" for n, v in s["versions"].items() if v)
        n = s.get("threads")
        threads = f" ({n} thread{'s' * (n != 1)})" if isinstance(n, int) else ""
        return f"{names}, on {s.get('device') or 'an unrecorded device'}{threads}"

    if len(stretches) == 1 and stretches[0]["step"] <= 1:
        return [f"Trained with {said(stretches[0])}.", ""]
    lines = [f"- {_steps(1, stretches[0]['step'] - 1)}: not recorded"] if stretches[0]["step"] > 1 else []
    ends = [s["step"] - 1 for s in stretches[1:]] + [info.get("steps")]
    return ["Trained with:", ""] + lines + [f"- {_steps(s['step'], end)}: {said(s)}"
                                            for s, end in zip(stretches, ends)] + [""]


def _software_name(name: str) -> str:
    return "Python" if name == "python" else name


def _steps(first: int, last: int | None) -> str:
    return f"step {first}" if first == last else f"steps {first}-{last}" if last is not None else \
        f"from step {first}"


def base_row(lora: Lora, into: str | None, names: dict[str, str]) -> str:
    """The card's base model: the one the LoRA was trained on (a hub id's at the commit it trained on, with the
    --set revision that loads it again), or the model it was merged into and that one."""
    base = lora.base_model
    if not base:
        return "unknown"
    commit = trained_commit(lora.base)
    at = f" at commit `{commit}` (lowmem-alignprop: `--set revision={commit}`)" if commit else ""
    return _named((f"`{into}` (the LoRA was trained on `{base}`{at})" if into else f"`{base}`{at}"), names) + (
        " (a local model of that name)" if names.get(into or base) else "")


def part_rows(lora: Lora, pins: dict[str, str], names: dict[str, str]) -> list[tuple[str, str]]:
    """The card's rows of the run's hub id parts other than --model, at the commits they came from (:func:`hub_pins`)
    with the flags that load them again: a transformer file's text encoders, VAE and scheduler (model_components),
    and --set vae's VAE."""
    rows, parts = [], hub_parts(lora)
    for field, what in (("model_components", "text encoders, VAE and scheduler"), ("vae", "VAE")):
        if (pin := HUB_PINS[field]) in pins:
            spec = parts[field]
            rows.append((what, _named(f"`{spec}` at commit `{pins[pin]}` (lowmem-alignprop: `--set {field}={spec} "
                                      f"--set {pin}={pins[pin]}`)", names)))
    return rows


def local_names(lora: Lora, info: dict[str, Any], into: str | None) -> dict[str, str]:
    """The local paths a card names (the base model, the model merged into, the VAE, a transformer file's other
    parts), each to its name as a card pushed to the hub gives it (lora_files.shared_name: a user's folders stay
    theirs); a hub id or shipped name is not among them."""
    paths = (lora.base_model, into, info.get("vae"), lora.model_components)
    return {p: shared_name(p) for p in paths if isinstance(p, str) and p and shared_name(p) != p}


def _named(text: str, names: dict[str, str]) -> str:
    """``text`` with each of :func:`local_names`' paths by its name (the longest first: a path inside another)."""
    for path in sorted(names, key=len, reverse=True):
        text = text.replace(path, names[path])
    return text


def hub_usage(usage: list[str], home: str, names: dict[str, str]) -> list[str]:
    """The card's "Use" lines for the hub repository ``home``: its code loads from there (not THIS_FOLDER, the
    reader's copy), and a local model by its name, with a note that it is a local model of that name (as the code
    of a LoRA of an unknown base says BASE_MODEL: the reader puts their copy there)."""
    usage = [_named(line.replace('"THIS_FOLDER"', f'"{home}"'), names) for line in usage]
    local = sorted({n for n in names.values() if any(f'"{n}"' in line for line in usage)})
    if not local:
        return usage
    said, what = ", ".join(f'"{n}"' for n in local), "a local model" if len(local) == 1 else "local models"
    note = f"{said}: {what} of that name: put your copy's path there"
    if "```python" in usage:  # (a comment in the code; a line below the list)
        at = usage.index("```python") + 1
        return usage[:at] + [f"# {note}"] + usage[at:]
    return usage + [f"- {note}."]


def shared_command(command: str | None) -> str | None:
    """A command (a line per start) as a card pushed to the hub gives it: each argument that is a local path
    (absolute, or relative and here; a ``--set`` value too) by its lora_files.shared_name."""
    import shlex

    def word(w: str) -> str:
        key, eq, value = w.partition("=")
        if eq and not w.startswith("/") and (named := shared_name(value)) != value:  # vae=/x/vae, --model=/x
            return f"{key}={named or value}"
        return shared_name(w) or w  # ("." names nothing)

    lines = []
    for line in (command or "").splitlines():
        try:
            lines.append(shlex.join(word(w) for w in shlex.split(line)))
        except ValueError:  # (unbalanced quotes: as recorded)
            lines.append(line)
    return "\n".join(lines) if command else command


# the base model's licence as its hub page gives it (the card's front matter leaves it to the user: its example), by
# kohya's ss_base_model_version (every SD3/SD3.5 alike), FLUX.1 by its variant (modelspec.architecture's)
BASE_LICENSES = {SD_V1: ("SD 1.x", "creativeml-openrail-m"), SD_V2: ("SD 2.x", "openrail++"),
                 SDXL: ("SDXL", "openrail++"), "sd3": ("SD3/SD3.5", "stabilityai-ai-community"),
                 "flux-1-dev": ("FLUX.1-dev", "flux-1-dev-non-commercial-license"),
                 "flux-1-schnell": ("FLUX.1-schnell", "apache-2.0")}
HUB_LICENSES = {"creativeml-openrail-m", "openrail++", "apache-2.0"}  # the hub's own ids; others: license: other


def license_example(lora: Lora, version: str) -> str:
    """The front matter's licence hint: the base model's family's licence, in the hub's words (``version``: its
    :func:`base_family`, which the card has read)."""
    if lora.family == "flux":
        from lowmem_alignprop.lora import flow_export
        key = flow_export.architecture(lora.family, lora.base_model, lora.modules, lora.model_components,
                                       lora.components_revision).removesuffix("/lora")
    else:
        key = "sd3" if lora.family == "sd3" else version
    model, name = BASE_LICENSES[key]
    return f"{model}'s: license: {name}" if name in HUB_LICENSES else \
        f"{model}'s: license: other, license_name: {name}"


def kept_row(kept: dict, merged_weight: float | None) -> str:
    """The card's row for a LoRA's kept --init-lora layers (Lora.kept): how many of each kind, and where they are."""
    from lowmem_alignprop.models.kept_lora import kept_kinds, kept_total, layer_count
    from lowmem_alignprop.models.kept_lora import them as pronoun

    them = pronoun(layer_count(kept))
    where = (f"the merged model holds {them}, fused with the trained layers at weight {num(merged_weight)}"
             if merged_weight is not None else f"loading this LoRA loads {them} with its trained layers, at the "
                                               "LoRA's weight")
    return f"{kept_total(kept)} as the --init-lora had {them}, not trained: {', '.join(kept_kinds(kept))}; {where}"


def kept_note(kept: dict) -> str:
    """The card's first sentence's words for a LoRA with kept --init-lora layers (Lora.kept; "" without): the file
    is more than a UNet's (or transformer's) LoRA where it holds a text encoder's layers, which the kept row counts."""
    from lowmem_alignprop.models.kept_lora import kept_counts, kept_total

    if not kept:
        return ""
    count = kept_counts(kept)
    encoders = "the text encoders'" if count["text_encoder"] and count["text_encoder_2"] else \
        "the text encoder's" if count["text_encoder"] + count["text_encoder_2"] else ""
    return (f" (with {kept_total(kept)} kept from its --init-lora"
            f"{', ' + encoders + ' included' if encoders else ''})")


def layer_kinds(layers: int, targets: list[str]) -> str:
    """"11 layers of 8 kinds: add_k_proj, ...": the count is of layers, the names of their kinds."""
    return f"{layers} layers of {len(targets)} kind{'s' if len(targets) != 1 else ''}: {', '.join(targets)}"


def trained_size(info: dict) -> tuple[int, int] | None:
    """(width, height) in pixels of the run's ``resolution`` (config.yaml's: N or "WxH"; several sizes: the first,
    which its sample images have); None where it has none."""
    try:
        return sizes_of(info["resolution"])[0] if info.get("resolution") is not None else None
    except UserError:  # (a hand-edited config.yaml: the metadata leaves it out)
        return None


def resolution_row(info: dict) -> str | None:
    """The card's resolution row: the size, or each size of a run of several, the one its sample images have."""
    if not info.get("resolution"):
        return None
    try:
        sizes = sizes_of(info["resolution"])
    except UserError:  # (a hand-edited config.yaml: as written)
        return f"{info['resolution']} px"
    if len(sizes) == 1:
        return f"{info['resolution']} px"
    return (f"{describe_sizes(info['resolution'])} px, one a step in turn (the sample images at "
            f"{resolution_of(*sizes[0])})")


def images_per_size(info: dict) -> dict[tuple[int, int], int]:
    """The images each size of a run of several trained on (width, height) -> count, over its steps (each stretch's
    images per optimizer step, :func:`images_per_step`; the sizes of its last start)."""
    steps, sizes = int(info.get("steps") or 0), sizes_of(info["resolution"])
    starts = sorted({1, *(int(r["step"]) for r in info.get("resume_changes") or [] if isinstance(r, dict)
                          and 1 < int(r.get("step", 0)) <= steps)})
    processes = process_counts(info)
    counts = dict.fromkeys(sizes, 0)
    for first, end in zip(starts, [*starts[1:], steps + 1]):
        n = next((count for step, count in reversed(processes) if step <= first), 1)
        each = images_per_step(info, first, n, info)
        for index, size in enumerate(sizes):  # the steps s of [first, end) with (s - 1) % len(sizes) == index
            counts[size] += each * (_steps_at(end - 1, index, len(sizes)) - _steps_at(first - 1, index, len(sizes)))
    return counts


def _steps_at(last: int, index: int, n: int) -> int:
    """How many of steps 1..``last`` train at the ``index``-th of ``n`` sizes (image_size.step_size's turn)."""
    return (last - 1 - index) // n + 1 if last - 1 >= index else 0


def with_run_call(usage: list[str], info: dict[str, Any], flow: bool, vae_revision: str = "") -> list[str]:
    """The "Use" code that loads a diffusers pipeline, with a call that samples as the run did (its steps, guidance,
    size; DDIM for a UNet, as it trained; FLUX.1/SD3's T5 length): without them the pipeline's defaults sample
    otherwise (FluxPipeline's 512 T5 tokens where a schnell run encoded 256, SD's PNDM sampler). A hub id VAE loads
    at ``vae_revision``, the commit the run's came from."""
    at = next((i for i, line in enumerate(usage) if line.startswith("pipe = ")), None)
    if at is None or "sample_steps" not in info:
        return usage
    size = trained_size(info)  # (width, height)
    args = [f"num_inference_steps={info['sample_steps']}",
            *([f"guidance_scale={num(info['guidance_scale'])}"] if info.get("guidance_scale") is not None else []),
            *([f"negative_prompt={json.dumps(info['negative_prompt'])}"] if info.get("negative_prompt") else []),
            *([f"eta={num(info['eta'])}"] if not flow and info.get("eta") is not None else []),
            *([f"guidance_rescale={num(info['guidance_rescale'])}"] if not flow and info.get("guidance_rescale")
              else []),
            *([f"height={size[1]}", f"width={size[0]}"] if size else []),
            *([f"max_sequence_length={info['t5_tokens']}"] if flow and info.get("t5_tokens") else [])]
    call = [f"image = pipe(\"a prompt\", {', '.join(args)}).images[0]  # the run's sampling settings"]
    usage = list(usage)
    imports = next((i for i in range(at) if usage[i].startswith("from diffusers import ")), None)
    if not flow and imports is not None:  # (the run's DDIM: the model's noise schedule, with these two set)
        usage[imports] = usage[imports].replace("import ", "import DDIMScheduler, ", 1)
        predicts = info.get("prediction_type", "auto")  # (--set prediction_type: what its UNet was taken to predict)
        told = ("" if predicts == "auto" else f", prediction_type=\"{predicts}\"") + (
            ", rescale_betas_zero_snr=True, timestep_spacing=\"trailing\"" if info.get("zero_terminal_snr") else "")
        call[:0] = [f"pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, "
                    f"set_alpha_to_one=False{told})"]
    elif flow and info.get("t5_encoder") is False:
        call[:0] = ["# trained without T5: load the pipeline with text_encoder_3=None, tokenizer_3=None"]
    if info.get("vae") and imports is not None:  # the VAE it decoded with (--set vae), not the model's own
        usage[imports] = usage[imports].replace("import ", "import AutoencoderKL, ", 1)
        vae = _vae_load(str(info["vae"]), vae_revision)
        if "from_single_file(" in usage[at]:  # (passed in: a "no-vae" file has none of its own to replace)
            usage[at] = usage[at][:-1] + ", vae=vae)"
            usage[at:at] = [f"vae = {vae}  # the VAE it trained with"]
        else:
            call[:0] = [f"pipe.vae = {vae}  # the VAE it trained with"]
    end = next((i for i in range(at, len(usage)) if usage[i] == "```"), len(usage))
    return usage[:end] + call + usage[end:]


# ComfyUI's KSampler samplers of DDIM's eta: `ddim` steps deterministically (eta 0), `ddpm` draws each step's noise
# from the posterior (DDIM's eta 1)
COMFY_DDIM_SAMPLERS = {0: "ddim", 1: "ddpm"}
A1111_ZERO_SNR = "*Settings > Sampler parameters > Noise schedule for sampling: Zero Terminal SNR*"


def webui_sampling(lora: Lora, info: dict[str, Any], fmt: str = "kohya") -> list[str]:
    """The card's lines for ComfyUI and A1111 users of a kohya file or a merged single file (``fmt``): the sampler its
    run rendered and trained through (DDIM: its steps, eta and guidance, which the LoRA was tuned for; neither tool
    samples so by default), and where its run sampled its base as v-prediction, at zero terminal SNR or with
    guidance_rescale (lora_files.v_prediction / zero_terminal_snr, as the header's ss_v_parameterization /
    ss_zero_terminal_snr say), the settings for those: a LoRA file cannot set them, a base checkpoint without its
    ``v_pred`` / ``ztsnr`` keys (a diffusers folder converted, a model's .yaml left behind) samples as epsilon
    without them, and the images come out noise or washed out. A merged single file carries those keys (ComfyUI
    reads both, A1111 ``v_pred`` only): the zero-SNR setting and the guidance's rescale, which no file carries."""
    v, zero = v_prediction(lora), zero_terminal_snr(lora)
    rescale = info.get("guidance_rescale") or 0
    lines = [line] if (line := _ddim_line(info, zero)) else []
    if (v or zero) and fmt == "kohya":
        told = " and ".join(x for x, on in (("v-prediction", v), ("zero terminal SNR", zero)) if on)
        lines += [f"- Its run sampled the base as {told}: ComfyUI: a *ModelSamplingDiscrete* node after the "
                  f"checkpoint, sampling `{'v_prediction' if v else 'eps'}`, `zsnr` {'on' if zero else 'off'}; "
                  "AUTOMATIC1111 / Forge: a base checkpoint that says "
                  + ("v-prediction (its `v_pred` key, or a `.yaml` beside it with `parameterization: \"v\"`)"
                     if v else "epsilon") + (f", and {A1111_ZERO_SNR}" if zero else "") + "."]
    elif zero:  # (the merged file's ztsnr key: ComfyUI and Forge read it, A1111 only its own setting)
        lines.append(f"- Its run sampled at zero terminal SNR (the file's `ztsnr` key, which ComfyUI reads): "
                     f"AUTOMATIC1111: {A1111_ZERO_SNR}.")
    if rescale:
        lines.append(f"- The run rescaled the guidance (guidance_rescale {num(rescale)}): ComfyUI: a *RescaleCFG* node "
                     f"after the checkpoint, multiplier {num(rescale)}; AUTOMATIC1111 / Forge: a CFG-rescale extension "
                     "at the same value.")
    return lines


def _ddim_line(info: dict[str, Any], zero: bool) -> str | None:
    """The card's line on the DDIM sampling the run rendered and trained through (steps, eta, guidance, negative
    prompt, as config.yaml records them), in ComfyUI's and A1111's terms; None without its steps and eta. ``zero``:
    at zero terminal SNR the run's steps are trailing (from the last timestep: ComfyUI's `sgm_uniform`), else SD's
    leading ones (`ddim_uniform`)."""
    steps, eta, cfg = info.get("sample_steps"), info.get("eta"), info.get("guidance_scale")
    if not isinstance(steps, int) or not isinstance(eta, (int, float)):
        return None
    comfy = (f"sampler `{COMFY_DDIM_SAMPLERS[eta]}`" if eta in COMFY_DDIM_SAMPLERS else
             f"sampler `ddim` (eta 0) or `ddpm` (eta 1), the nearest (none has eta {num(eta)})")
    scale = f" {num(cfg)}" if isinstance(cfg, (int, float)) else " as the run's"
    negative = f", negative prompt `{info['negative_prompt']}`" if info.get("negative_prompt") else ""
    return (f"- Its run rendered (and trained through) DDIM: {steps} steps at eta {num(eta)}, guidance{scale}"
            f"{negative}. The LoRA is tuned for that sampler: ComfyUI: a *KSampler* with {comfy}, scheduler "
            f"`{'sgm_uniform' if zero else 'ddim_uniform'}`, {steps} steps, cfg{scale}; AUTOMATIC1111 / Forge: "
            f"sampler *DDIM*, {steps} steps, CFG scale{scale}, and *Settings > Sampler parameters > Eta for DDIM* "
            f"{num(eta)}.")


def _vae_load(spec: str, revision: str = "") -> str:
    """The code that loads ``--set vae``'s VAE: a file, a VAE folder, a pipeline folder's vae/, a hub id (at
    ``revision``: the commit its run's came from; a pipeline's repository, as the local cache tells: its vae/)."""
    from lowmem_alignprop.settings.hub_access import hub_file
    from lowmem_alignprop.settings.paths import vae_subfolder

    if Path(spec).suffix.lower() in SINGLE_FILE_SUFFIXES:  # (as models/loading.load_vae tells the forms apart)
        return f"AutoencoderKL.from_single_file({json.dumps(spec)})"
    sub = vae_subfolder(spec) or ("vae" if is_hub_id(spec) and hub_file(spec, "model_index.json", revision=revision)
                                  else None)
    return (f"AutoencoderKL.from_pretrained({json.dumps(spec)}" + (f", subfolder=\"{sub}\"" if sub else "")
            + (f", revision=\"{revision}\"" if revision else "") + ")")


def _library(fmt: str, lora: Lora) -> str | None:
    """The library whose loader reads the folder (the hub's "Use this model" button), none where no library does:
    diffusers reads no SD3 kohya names (its SD3 loader takes its own layout only)."""
    if fmt == "peft":
        return "peft"
    return None if fmt == "kohya" and lora.family == "sd3" else "diffusers"


# the package's own models by name: the card's code loads them from the package (from_pretrained("toy") fails)
_PACKAGE_MODELS = {"toy": ("from lowmem_alignprop.models.loading import TOY_MODEL_DIR", "TOY_MODEL_DIR"),
                   "tiny": ("from lowmem_alignprop.models.tiny import tiny_model_dir", "tiny_model_dir()")}


def _usage(fmt: str, files: list[str], base: str | None, merged: float | None, family: str = "unet",
           components: str = "", sdxl: bool = False, version: str = "", pins: dict | None = None) -> list[str]:
    base = base or "BASE_MODEL"
    if family != "unet":  # (a transformer-file base: its parts are in its model_components folder)
        from lowmem_alignprop.lora import flow_export
        # the parts' commit: model_components', else (a hub id's own parts) the one it trained on
        commit = (pins or {}).get("components_revision" if components else "revision", "")
        return flow_export.usage(fmt, files, base, merged, family, components or base, version, commit)
    imported, loaded = _PACKAGE_MODELS.get(base, (None, f'"{base}"'))
    if merged is not None and fmt == "single-file":
        pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
        return [f"- ComfyUI: copy `{files[0]}` to `ComfyUI/models/checkpoints/` and pick it in a *Load Checkpoint* "
                "node.",
                "- AUTOMATIC1111 / Forge: copy it to `stable-diffusion-webui/models/Stable-diffusion/` and choose it "
                "as the checkpoint.",
                f"- diffusers: `{pipeline}.from_single_file(\"{files[0]}\", config={loaded})` (`config`: the base "
                "model's folder or hub id, whose component configs it reads instead of guessing them from the "
                "weights' shapes" + (f"; `{imported}`" if imported else "") + ")."]
    if merged is not None:
        return ["```python", "from diffusers import DiffusionPipeline",
                "pipe = DiffusionPipeline.from_pretrained(\"THIS_FOLDER\")", "```"]
    if fmt == "kohya":
        return [f"- ComfyUI: copy `{files[0]}` to `ComfyUI/models/loras/` and pick it in a *Load LoRA* node.",
                f"- AUTOMATIC1111 / Forge: copy it to `stable-diffusion-webui/models/Lora/` and add "
                f"`<lora:{Path(files[0]).stem}:1>` to the prompt.",
                "- diffusers: `pipe.load_lora_weights(\"THIS_FOLDER\", weight_name=\"" + files[0] + "\")`."]
    if fmt == "peft":
        return ["```python", "from peft import PeftModel",
                f"unet = PeftModel.from_pretrained(unet, \"THIS_FOLDER\")  # unet: {base}'s UNet", "```"]
    return ["```python", *_base_pipeline_lines(base, imported, loaded, sdxl), "pipe.load_lora_weights(\"THIS_FOLDER\")",
            "```"]


def _base_pipeline_lines(base: str, imported: str | None, loaded: str, sdxl: bool) -> list[str]:
    """The code that loads the base model as diffusers reads it: a single file with from_single_file, a folder of
    only one variant's weights (fp16) with that variant."""
    from lowmem_alignprop.settings.paths import weights_variant

    if Path(base).suffix.lower() in SINGLE_FILE_SUFFIXES:
        pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
        return [f"from diffusers import {pipeline}", f"pipe = {pipeline}.from_single_file({loaded})"]
    variant = weights_variant(Path(base).expanduser()) if not imported else None
    return ["from diffusers import DiffusionPipeline", *([imported] if imported else []),
            f"pipe = DiffusionPipeline.from_pretrained({loaded}" + (f", variant=\"{variant}\")" if variant else ")")]


def _was(value: Any) -> str:
    """A setting's earlier value as the card says it (an empty text as such, not as nothing)."""
    return "empty" if value in ("", None) else flag_value(value)


def is_hub_id(spec: str | None) -> bool:
    return bool(spec) and bool(_HUB_ID.fullmatch(spec)) and not Path(spec).expanduser().exists()


def num(x: float) -> str:
    return f"{float(x):g}"

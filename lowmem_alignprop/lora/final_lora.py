"""The LoRA a run ends with (``RUN/lora/``): written atomically, and written again from the run's last checkpoint when
it is missing or damaged (a full disk or a kill while it was written), by ``--resume`` of the finished run or by
``export``. The trained weights are never only in the LoRA folder: the last checkpoint holds them too."""

from __future__ import annotations

import logging
from pathlib import Path

from lowmem_alignprop.run import atomic
from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.run import base_fingerprint
from lowmem_alignprop.run.filenames import FULL_DIR, LORA_BASE_FILE, LORA_DIR, LORA_WEIGHT_NAME, SUMMARY_FILE
from lowmem_alignprop.settings.errors import UserError

log = logging.getLogger("lowmem_alignprop")


def lora_problem(run: Path) -> str | None:
    """What is wrong with the LoRA a finished run wrote (None: it is whole)."""
    from safetensors import safe_open

    file = run / LORA_DIR / LORA_WEIGHT_NAME
    if not file.is_file():
        return f"{file.parent} is missing" if not file.parent.is_dir() else f"{file} is missing"
    try:
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is no dict)
                f.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types for a truncated file
        return f"{file} is damaged ({type(e).__name__})"
    try:
        base_fingerprint.load_base_record(run / LORA_DIR / LORA_BASE_FILE)
    except (OSError, ValueError):
        return f"{run / LORA_DIR / LORA_BASE_FILE} is missing or damaged"
    return None


def outputs_problem(run: Path, trained: str = "lora", step: int | None = None) -> str | None:
    """What a finished run's folder lacks (None: the final weights and summary.json are whole). summary.json is
    written last, so with it everything before it was written; with ``step`` (the run's last checkpoint), a summary of
    an earlier step says the outputs are an earlier start's (this start's end failed to write them)."""
    if trained == "lora":
        problem = lora_problem(run)
    else:
        problem = None if (run / FULL_DIR / "config.json").is_file() else f"{run / FULL_DIR} is missing"
    if problem:
        return problem
    from lowmem_alignprop.lora.lora_files import read_run

    summary = read_run(run)[1]
    if not summary:
        return f"{run / SUMMARY_FILE} is missing or damaged"
    if step is not None and summary.get("steps_done", step) != step:
        return f"its outputs are step {summary['steps_done']}'s ({SUMMARY_FILE}; this start's end did not write them)"
    return None


def run_steps(run: Path) -> tuple[list[Path], int | None]:
    """The run's checkpoint folders (newest first, damaged ones too) and the step its summary.json says it ended at
    (None without one)."""
    from lowmem_alignprop.lora.lora_files import read_run

    done = read_run(run)[1].get("steps_done")
    return ckpt.list_checkpoints(ckpt.root_of(run)), done if isinstance(done, int) else None


def rewrite_from_checkpoint(run: Path) -> Path | None:
    """``export``: a run whose LoRA is missing or damaged gets it written again, atomically, from its newest intact
    checkpoint (``models.loading.write_checkpoint_lora``: as the run writes ``lora/``). Returns the checkpoint used, or
    None when the LoRA is whole, there is no intact checkpoint, or the checkpoint cannot give the run's lora/ (a full
    fine-tune; an EMA's average in an older checkpoint without it by name: then ``--resume latest`` writes it
    again)."""
    from lowmem_alignprop.models.loading import write_checkpoint_lora

    problem = lora_problem(run)
    if problem is None:
        return None
    checkpoints, done = run_steps(run)
    last = max([ckpt.step_of(p) for p in checkpoints] + ([done] if done is not None else []), default=0)
    for path in checkpoints:
        if (newer := ckpt.newer_version(path, f"export an earlier step's checkpoint this version wrote ({run}/"
                                               f"{ckpt.DIRNAME}/{ckpt.PREFIX}N)")) is not None:
            raise newer
        if ckpt.verify(path) is not None:
            continue
        if ckpt.step_of(path) < last:  # lora/ is the last step's: an earlier one's under its name would be mislabelled
            raise UserError(f"{problem}, and the run's last step ({last}) has no intact checkpoint to write it again "
                            f"from: export {path} for step {ckpt.step_of(path)}'s LoRA")
        config = ckpt.read_state(path).get("config") or {}
        ema_only_by_state = ckpt.outputs_are_ema(config) and \
            not (path / ckpt.EMA_WEIGHTS).is_file()  # an older checkpoint: the average not kept by name
        if config.get("train_unet", "lora") != "lora" or ema_only_by_state:
            return None
        again = " again" if (run / LORA_DIR).exists() else ""  # (a run that stopped before writing it: the first)
        with atomic.replacing_dir(run / LORA_DIR) as tmp:
            write_checkpoint_lora(path, tmp)
        log.warning("%s: wrote %s%s from checkpoint %s", problem, run / LORA_DIR, again, path)
        return path
    return None

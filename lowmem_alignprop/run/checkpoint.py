"""Resumable checkpoints: the trained weights, optimizer state, RNG states, step and metrics history.

Layout (``OUTPUT_DIR/checkpoints/step-00000012/``)::

    trainable.safetensors   every parameter that trains (the LoRA adapters, or the whole UNet with
                            train_unet=full), keyed by its name in the bare UNet
    optimizer.pt            the optimizer's state_dict (plain torch / bitsandbytes optimizers)
    deepspeed/              DeepSpeed runs: engine.save_checkpoint(..., exclude_frozen_parameters=True),
                            which holds the partitioned optimizer state of every rank
    rng.pt                  per rank: the prompt/K random.Random state and torch's RNG states
    ema.pt                  with ema_decay: diffusers' EMAModel state (the averaged trained weights)
    ema_weights.safetensors with ema_decay: the same average keyed as trainable.safetensors (what export,
                            sample and evaluate read of a checkpoint whose run's outputs are the EMA's)
    state.json              step, config, model fingerprint, metrics history, world size; with eval_every the
                            held-out evaluation's best so far and patience ("evaluation")
    manifest.json           size and sha256 of every file above; written last

Why not ``accelerator.save_state``: it saves ``model.state_dict()``, i.e. the whole frozen UNet
(1.6 GiB for SD1.5 in fp16) at every checkpoint; ours holds only what trains (a few MB for LoRA).

Writes are atomic: everything goes into ``checkpoints/.tmp-step-N`` and the directory is renamed to
``step-N`` only after the manifest is written and synced. A checkpoint whose manifest is missing or
whose files do not match it is reported and skipped by ``--resume latest`` (the previous good one is used).

Whether a resume may go on with the config it is given: run/resume_rules.py. What state.json's ``fingerprint``
says of the base model, and a resume's check of it: run/base_fingerprint.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lowmem_alignprop.run.atomic import fsync_dir
from lowmem_alignprop.run import atomic
from lowmem_alignprop.run.runlock import global_rank, holder, next_free_dir
from lowmem_alignprop.run.tensor_files import TensorFileError, read_tensor_file
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.run.filenames import CHECKPOINTS_DIR, FULL_DIR, LORA_DIR, METRICS_FILE, SUMMARY_FILE

log = logging.getLogger("lowmem_alignprop")

FORMAT = 1
DIRNAME = CHECKPOINTS_DIR
PREFIX = "step-"
TMP_PREFIX = ".tmp-"


def root_of(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / DIRNAME


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


RUN_MARKS = (LORA_DIR, FULL_DIR, METRICS_FILE, SUMMARY_FILE)  # what a run writes besides its checkpoints


@dataclass(frozen=True)
class RunEvidence:
    """What shows that a folder already holds a run: its checkpoints, or a file or folder a run writes."""
    name: str  # DIRNAME or one of RUN_MARKS
    is_dir: bool

    def __str__(self) -> str:  # as messages name it: "checkpoints/", "lora/", "metrics.jsonl"
        return f"{self.name}/" if self.is_dir else self.name

    @property
    def checkpoints(self) -> bool:
        """It has checkpoints: --resume latest continues it."""
        return self.is_dir and self.name == DIRNAME

    @property
    def started_only(self) -> bool:
        """Only the metrics of a run that stopped before its first checkpoint."""
        return not self.is_dir and self.name == METRICS_FILE


def holds_a_run(output_dir: str | os.PathLike) -> RunEvidence | None:
    """What shows that ``output_dir`` already holds a run (its checkpoints, or the files a run writes), or None."""
    out = Path(output_dir)
    if list_checkpoints(root_of(out)):
        return RunEvidence(DIRNAME, True)
    for mark in RUN_MARKS:
        p = out / mark
        if p.is_dir():
            return RunEvidence(mark, True)
        if p.is_file() and p.stat().st_size > 0:  # a run that failed before its first step leaves an empty one
            return RunEvidence(mark, False)
    return None


def without_checkpoint(folder: Path) -> str | None:
    """How to say that ``folder`` is a training run with neither a checkpoint nor lora/ (it stopped, or was killed,
    before its first checkpoint, or is still before it): what ``sample`` and ``export`` of it answer; None otherwise."""
    root = root_of(folder)
    if list_checkpoints(root) or (folder / LORA_DIR).exists() or holds_a_run(folder) is None:
        return None
    for tmp in sorted(root.glob(f"{TMP_PREFIX}{PREFIX}*")) if root.is_dir() else []:  # stopped while publishing one
        if (final := unrenamed(tmp)) is not None:
            return (f"{folder} is a training run whose checkpoint {final.name} was written whole but not renamed (it "
                    f"stopped while publishing it): `lowmem-alignprop --resume latest --output-dir {folder}` renames "
                    "it and goes on")
    try:
        steps = sum(1 for line in (folder / METRICS_FILE).read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError):
        steps = 0
    if holder(folder) is not None:
        return (f"{folder} is a training run still before its first checkpoint ({steps} steps so far): it writes "
                "lora/ when it ends (--checkpoint-every N saves checkpoints as a run goes)")
    return (f"{folder} is a training run that stopped (an error, or killed) before its first checkpoint, after {steps} "
            "steps: it kept no LoRA to sample or export, and nothing to resume (--checkpoint-every N saves "
            "checkpoints as a run goes)")


def step_of(path: Path) -> int | None:
    """The step of a ``step-N`` checkpoint directory (None for any other name)."""
    digits = path.name[len(PREFIX):]
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def branch_point(resume_path: Path, root: Path) -> int | None:
    """The step after which ``root``'s checkpoints belong to another branch than ``resume_path``: its own step for
    one of ``root``'s checkpoints, N for one in ``root/superseded-after-step-N[-k]/``; None for another run's."""
    parent = resume_path.resolve().parent
    if parent == root.resolve():
        return step_of(resume_path)
    found = re.fullmatch(r"superseded-after-step-(\d+)(-\d+)?", parent.name)
    return int(found.group(1)) if found and parent.parent == root.resolve() else None


def set_aside_newer(root: Path, step: int, metrics: Path | None = None) -> Path | None:
    """Resuming from an older checkpoint of a run (or from a branch set aside earlier) starts a new branch: the
    run's checkpoints after ``step`` move into ``checkpoints/superseded-after-step-N/`` (kept, but no longer what
    ``--resume latest`` or rotation sees), with a copy of the run's ``metrics`` as they were. Returns that folder,
    or None when there was nothing newer."""
    newer = [p for p in list_checkpoints(root) if step_of(p) > step]
    if not newer:
        return None
    aside = next_free_dir(root / f"superseded-after-step-{step}", Path.exists)  # an earlier branch keeps its own
    aside.mkdir()
    for p in newer:
        p.rename(aside / p.name)
    if metrics is not None and metrics.is_file():
        with atomic.replacing(aside / metrics.name) as tmp:  # that branch's rows, before this one rewrites them
            shutil.copy2(metrics, tmp)
    log.warning("a new branch after step %d: the run's checkpoints after it (%s) moved to %s, so --resume latest "
                "continues this branch", step, ", ".join(p.name for p in reversed(newer)), aside)
    return aside


def list_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint directories, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and step_of(p) is not None:
            found.append((step_of(p), p))
    return [p for _, p in sorted(found, reverse=True)]


def file_sha256(path: Path) -> str:
    """A file's SHA-256, hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify(path: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it (a manifest or state.json of valid
    JSON but the wrong shape included: the checkpoint is then skipped like a corrupt one)."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json (its write did not finish, or a run is deleting it: keep_checkpoints)"
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        return f"manifest.json is unreadable ({type(e).__name__})"
    if (newer := newer_format(path)) is not None:  # (its files may be laid out otherwise: said before they are read)
        return f"format {newer}, written by a newer lowmem-alignprop (this version reads format {FORMAT})"
    entries = data.get("files") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not all(
            isinstance(rel, str) and isinstance(meta, dict) and isinstance(meta.get("bytes"), int)
            and isinstance(meta.get("sha256"), str) for rel, meta in entries.items()):
        return "manifest.json is not a checkpoint manifest (wrong shape)"
    for rel, meta in entries.items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if file_sha256(f) != meta["sha256"]:
            return f"{rel} does not match its checksum"
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return "state.json is unreadable"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(
            state.get("config", {}), dict):
        return "state.json is not a checkpoint's state (wrong shape)"
    if state.get("format") != FORMAT:
        return f"format {state.get('format')!r}, this version reads format {FORMAT}"
    return None


def newer_format(path: Path) -> int | None:
    """The checkpoint format of ``path`` where a newer version wrote it (its manifest's or state.json's ``format`` above
    :data:`FORMAT`), else None: no checkpoint this version can read, yet no damaged one either."""
    for name in ("manifest.json", "state.json"):
        try:
            found = json.loads((path / name).read_text(encoding="utf-8")).get("format")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(found, int) and not isinstance(found, bool) and found > FORMAT:
            return found
    return None


def newer_version(path: Path, fix: str) -> UserError | None:
    """The one line for a checkpoint a newer version wrote (:func:`newer_format`), ``fix`` saying what else to do;
    None for any other. Not skipped as a damaged one: --resume latest would go back to an older step and set the newer
    version's steps aside, and export would call it corrupt."""
    found = newer_format(path)
    if found is None:
        return None
    return UserError(f"checkpoint {path} was written by a newer lowmem-alignprop (checkpoint format {found}; this "
                     f"version reads format {FORMAT}): use the version that wrote it (pip install -U "
                     f"lowmem-alignprop), or {fix}")


RESUME_ELSEWHERE = "start a new run in another --output-dir"


def find_resume(output_dir: str | os.PathLike, spec: str) -> Path:
    """The checkpoint to resume from: ``latest`` (newest intact one in the run's output dir) or a directory.

    Broken checkpoints met on the way are reported with a warning and skipped; an explicitly named
    broken checkpoint is an error. Raises UserError when there is nothing to resume from.
    """
    if spec != "latest":
        path = step_folder(Path(spec).expanduser())  # (step-3 too, as sample, export and --init-lora take it)
        if not path.is_dir():
            raise UserError(f"--resume {spec}: no such checkpoint directory; use --resume latest, or a "
                            f"{DIRNAME}/{PREFIX}N directory of an earlier run")
        if not (path / "manifest.json").exists() and not (path / "state.json").exists():
            if (path / DIRNAME).is_dir():
                return find_resume(path, "latest")  # a run's output dir: its newest good checkpoint
            raise UserError(f"--resume {spec} is not a checkpoint (no manifest.json): point to a "
                            f"{DIRNAME}/{PREFIX}N directory or use --resume latest")
        if (newer := newer_version(path, RESUME_ELSEWHERE)) is not None:
            raise newer
        problem = verify(path)
        if problem:
            raise UserError(f"checkpoint {path} is incomplete or corrupt: {problem}; use --resume latest to "
                            "take the newest intact one")
        return path
    root = root_of(output_dir)
    for tmp in sorted(root.glob(TMP_PREFIX + "*")) if root.is_dir() else []:
        if not _published_now(tmp, output_dir) and global_rank() == 0:  # (every rank finds it: rank 0 says it)
            log.warning("checkpoint: ignoring %s, a checkpoint write that did not finish", tmp)
    for path in list_checkpoints(root):
        if (newer := newer_version(path, RESUME_ELSEWHERE)) is not None:  # (not an older step: that would branch)
            raise newer
        problem = verify(path)
        if problem is None:
            return path
        log.warning("checkpoint: %s is incomplete or corrupt (%s): using the previous one", path, problem)
    if holds_a_run(output_dir):  # e.g. killed before its first checkpoint: a plain start would be refused too
        raise UserError(f"--resume latest: no intact checkpoint in {root}, so the run in {output_dir} cannot be "
                        "continued (--checkpoint-every N saves them): delete the folder to start again there, or "
                        "start a new run in another --output-dir")
    raise UserError(f"--resume latest: no intact checkpoint in {root}; start the run without --resume "
                    "(or check --output-dir)")


def unrenamed(tmp: Path) -> Path | None:
    """The name a temporary checkpoint folder ``tmp`` would be published under, when it is a whole checkpoint (its
    manifest verifies) a stop left unrenamed and no checkpoint of its step exists; else None."""
    final = tmp.with_name(tmp.name[len(TMP_PREFIX):])
    return final if step_of(final) is not None and not final.exists() and verify(tmp) is None else None


def _published_now(tmp: Path, output_dir: str | os.PathLike) -> bool:
    """Publish ``tmp`` if it is a whole checkpoint a stop left unrenamed (killed between its manifest and its rename:
    the manifest verifies), where no checkpoint of its step exists and no live run holds the folder (one might be
    renaming it now). True if it was."""
    final = unrenamed(tmp)
    if final is None or holder(output_dir) is not None:
        return False
    try:
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError:  # (a read-only copy of a run: it stays as it is)
        return False
    log.warning("checkpoint: %s was written whole but not renamed when the run stopped: renamed to %s", tmp.name,
                final)
    return True


def step_folder(path: Path) -> Path:
    """The folder ``path`` names: itself where it exists, else the checkpoint folder of the step a ``step-300``
    name gives (``step-00000300``) where that exists, else ``path``."""
    step = step_of(path)
    if step is not None and not path.exists() and step_dir(path.parent, step).is_dir():
        return step_dir(path.parent, step)
    return path


def named_checkpoint(path: Path) -> Path | None:
    """The checkpoint folder ``path`` names, as written (``step-00000300``) or by its step (``step-300``); None
    when it names none."""
    folder = step_folder(path)
    return folder if (folder / "trainable.safetensors").is_file() and (folder / "state.json").is_file() else None


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


def pick_a_checkpoint(spec: str, flag: str) -> str | None:
    """A run's checkpoints/ folder given to ``flag`` where one checkpoint or a LoRA is meant: the line that names its
    newest; None where ``spec`` is no such folder."""
    path = Path(spec).expanduser()
    kept = list_checkpoints(path) if path.is_dir() else []
    if not kept:
        return None
    return (f"{flag} {spec} is a run's checkpoints folder: name one of its checkpoints, e.g. {flag} {kept[0]} (the "
            "newest), or the run's lora/")


# -- trained weights ---------------------------------------------------------------------------------

def cpu_copies(named) -> dict[str, torch.Tensor]:
    """(name, tensor) pairs as a dict of contiguous CPU copies, as safetensors writes them (never a view of a
    parameter that trains on)."""
    return {n: t.detach().to("cpu", copy=True).contiguous() for n, t in named}


def trainable_state(unet) -> dict[str, torch.Tensor]:
    """Every trainable parameter of the bare UNet, on the CPU (call inside a ZeRO-3 gather)."""
    return cpu_copies((n, p) for n, p in unet.named_parameters() if p.requires_grad)


EMA_WEIGHTS = "ema_weights.safetensors"


def outputs_are_ema(config: dict[str, Any]) -> bool:
    """Whether a run of this config (config.yaml's, a checkpoint's) writes the EMA's weights as its outputs (lora/,
    best/, the samples): ema_decay with ema_outputs, which is on unless set off."""
    return bool(config.get("ema_decay")) and bool(config.get("ema_outputs", True))


def output_weights_file(path: Path, config: dict[str, Any], say: bool = True) -> Path:
    """The checkpoint's file of the weights its run's outputs hold at that step: the EMA's where
    :func:`outputs_are_ema`, else the trained ones. A checkpoint written before the EMA's weights were kept by name
    has only the trained ones: said (unless not ``say``: where it was said already), and those."""
    if outputs_are_ema(config):
        if (path / EMA_WEIGHTS).is_file():
            return path / EMA_WEIGHTS
        if say:
            log.warning("checkpoint %s holds the trained weights but not their average by name (written by an older "
                        "version): its LoRA is the trained weights, not the EMA its run's lora/ holds", path)
    return path / "trainable.safetensors"


def load_trainable(unet, path: Path) -> None:
    """Copy the saved trainable weights into ``unet`` (inside a ZeRO-3 gather); shape mismatch -> UserError."""
    from safetensors.torch import load_file

    saved = load_file(str(path / "trainable.safetensors"))
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(saved))
    extra = sorted(set(saved) - set(params))
    if missing or extra:
        raise UserError(f"checkpoint {path} does not fit this model: {len(missing)} trainable weights missing, "
                        f"{len(extra)} unknown (e.g. {(missing or extra)[0]}); it was trained on another model "
                        "or LoRA layout")
    for n, p in params.items():
        if saved[n].shape != p.shape:
            raise UserError(f"checkpoint {path} does not fit this model: {n} has shape {tuple(saved[n].shape)}, "
                            f"the model's is {tuple(p.shape)}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n].to(p.device, p.dtype))


# -- writing -----------------------------------------------------------------------------------------

def write_manifest(tmp: Path) -> None:
    """Sizes and checksums of every file in ``tmp``; then fsync, so a rename publishes a complete checkpoint."""
    files = {str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
             for f in atomic.finish_tree(tmp)}  # synced, and readable as the umask allows (safetensors writes 0600)
    with open(tmp / "manifest.json", "w", encoding="utf-8") as fh:
        json.dump({"format": FORMAT, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(tmp)


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished temp dir to its final name (replacing an older copy of the same step)."""
    atomic.swap_in(tmp, final)


def prune(root: Path, keep: int, protect: Path) -> None:
    """Keep the newest ``keep`` intact checkpoints (always ``protect``), remove older ones."""
    if keep <= 0:
        return
    good = [p for p in list_checkpoints(root) if p == protect or verify(p) is None]
    for p in good[keep:]:
        if p != protect:
            atomic.remove_dir(p)  # (renamed first: a kill midway left half a checkpoint, kept for good as damaged)


def _torch_save(obj, path: Path) -> None:
    """``torch.save`` through a Python file: a failed write then carries the OS's errno (``atomic.write_failure``)."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)


def disk_error(e: OSError, where: Path, previous: Path | None, step: int | None = None) -> UserError:
    """The one-line error for a failed checkpoint write (disk full, file-size limit, permissions, ...): what is safe
    and what to do. Without an earlier checkpoint nothing is resumable, and the line says so."""
    what = atomic.describe(e)
    fix = atomic.write_fix(e) + ("" if e.errno == errno.EFBIG else " (or choose another one)")
    if previous:
        return UserError(f"could not write checkpoint {where}: {what}; nothing was half-written (the previous "
                         f"checkpoint {previous} is intact). {fix[0].upper()}{fix[1:]} and rerun with --resume latest")
    span = f" (steps 1-{step})" if step and step > 1 else " (step 1)" if step == 1 else ""
    return UserError(f"could not write checkpoint {where}: {what}; nothing was half-written, but this run has no "
                     f"earlier checkpoint, so what it trained{span} is not saved and cannot be resumed. "
                     f"{fix[0].upper()}{fix[1:]} and run the command again (into another --output-dir, or delete "
                     f"{where.parent.parent} first)")


# -- save and restore a run ----------------------------------------------------------------------------

def save(accelerator, output_dir, step: int, *, cfg, bare_unet, optimizer, engine, rng_state: dict,
         history: list[dict], fp: dict, extra: dict | None = None, gather=None,
         write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint of step ``step`` atomically; every rank must call this (it gathers the RNG states).
    ``extra``: more entries of state.json; ``write_extra(folder)``: writes more files (the EMA's) on rank 0.

    Returns the checkpoint directory. A failed write (disk full, ...) leaves no partial checkpoint and
    raises UserError on every rank, the previous checkpoint untouched.
    """
    import contextlib

    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    from lowmem_alignprop.run.distributed import all_ranks_ok

    root = root_of(output_dir)
    final = step_dir(root, step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    previous = next(iter(list_checkpoints(root)), None)
    is_main = accelerator.is_main_process
    with (gather() if gather is not None else contextlib.nullcontext()):
        weights = trainable_state(bare_unet)  # LoRA only: a few MB, not the frozen UNet
    # each rank's RNG state, and a checksum of its weights: data-parallel ranks must hold the same LoRA
    mine = {"rng": rng_state, "sum": [float(sum(t.double().sum() for t in weights.values())),
                                      float(sum(t.double().abs().sum() for t in weights.values()))]}
    ranks = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    rngs, rank_sums = [r["rng"] for r in ranks], [r["sum"] for r in ranks]
    if any(s != rank_sums[0] for s in rank_sums):
        log.warning("checkpoint: the processes hold different weights (sums %s): data parallelism is broken",
                    rank_sums)
    error: OSError | None = None
    if is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            error = e
    if not all_ranks_ok(accelerator, error is None):
        _cleanup(tmp, is_main)
        raise disk_error(error or OSError(errno.EIO, "another process could not write"), final, previous, step)
    if engine is not None:
        try:  # DeepSpeed: each rank writes its optimizer partition; frozen weights are left out
            engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False,
                                   exclude_frozen_parameters=True)
        except Exception as e:
            error = atomic.write_failure(e, tmp)
            if error is None:
                raise
            if accelerator.num_processes > 1:  # DeepSpeed's save ends in a barrier (in C++) that this rank skipped:
                # the others wait there, where no agreement of ours reaches them (both hung, to the backend's
                # timeout); they stop once this process ends and its connections close (the next start removes tmp)
                raise disk_error(error, final, previous, step) from None
    if is_main and error is None:
        state = {"format": FORMAT, "step": step, "world_size": accelerator.num_processes, "config": cfg.to_dict(),
                 "fingerprint": fp, "history": history, "rank_weight_sums": rank_sums, **(extra or {})}
        try:
            save_file(weights, str(tmp / "trainable.safetensors"))
            if engine is None:
                _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
            _torch_save(rngs, tmp / "rng.pt")
            if write_extra is not None:
                write_extra(tmp)
            (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
            write_manifest(tmp)
            publish(tmp, final)
        except Exception as e:  # a full disk: an OSError, or torch's / safetensors' words (atomic.write_failure)
            error = atomic.write_failure(e, tmp)
            if error is None:
                _cleanup(tmp, is_main)
                raise
    ok = all_ranks_ok(accelerator, error is None)
    if not ok:
        _cleanup(tmp, is_main)
        raise disk_error(error or OSError(errno.EIO, "another process could not write"), final, previous, step)
    if is_main:
        prune(root, cfg.keep_checkpoints, protect=final)
        for dead in root.glob(f"{TMP_PREFIX}{PREFIX}*"):  # an earlier start's write that did not finish (the run holds
            if (s := step_of(dead.with_name(dead.name[len(TMP_PREFIX):]))) is not None and s < step:  # the lock):
                shutil.rmtree(dead, ignore_errors=True)  # said at each resume, and never of use now
        for aside in root.glob(f"{TMP_PREFIX}old-*"):  # (a publish killed mid-swap by a release before 2026-12-06)
            shutil.rmtree(aside, ignore_errors=True)
    return final


def _cleanup(tmp: Path, is_main: bool) -> None:
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tensors(file: Path):
    """A checkpoint file (optimizer or RNG state: nested dicts of tensors) by tensor_files' rule: a file that imports
    code (a blocked global) is refused as such, not read and not called damaged. Read whole, not memory-mapped: the
    optimizer keeps the tensors for the run, and a mapping would hold the checkpoint file open (pruning removes it)."""
    try:
        return read_tensor_file(file, mmap=False)
    except TensorFileError as e:
        if e.holds_code:
            raise UserError(f"checkpoint file {file} holds pickled code (it imports a Python object, not only "
                            "tensors), which is never loaded: this checkpoint was not written by lowmem-alignprop; "
                            "resume from one of your own runs") from None
        raise UserError(f"checkpoint file {file} cannot be read ({e.detail[:100]}): it is damaged; use "
                        "--resume latest to take the newest intact checkpoint") from None


def restore(accelerator, path: Path, *, bare_unet, optimizer, engine, gather=None,
            state: dict[str, Any] | None = None) -> tuple[dict, dict | None]:
    """Load weights, optimizer and this rank's RNG state from ``path`` (``state``: its state.json when already
    read). Returns (state.json, rng state or None)."""
    import contextlib

    state = read_state(path) if state is None else state
    if engine is not None:  # its number of processes is this run's (check_config)
        engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=False)
    with (gather(modify=True) if gather is not None else contextlib.nullcontext()):
        load_trainable(bare_unet, path)
    if engine is None:
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]  # this run's settings
        try:
            optimizer.load_state_dict(load_tensors(path / "optimizer.pt"))
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"checkpoint {path}: its optimizer state does not fit this run ({str(e)[:120]}); "
                            "resume with the optimizer it was trained with") from None
        for group, settings in zip(optimizer.param_groups, hyper):
            group.update(settings)  # the moments come from the checkpoint; lr, weight decay... from this run
    rngs = load_tensors(path / "rng.pt")
    rank, world = accelerator.process_index, accelerator.num_processes
    if len(rngs) != world and rank == 0:  # (said once, not by every process)
        log.warning("resume: the checkpoint was written by %d process%s, this run has %d: an optimizer step now "
                    "averages the images of %s (batch_size x grad_accum each; the learning rate is unchanged), "
                    "and prompt order and noise differ from an uninterrupted run", len(rngs),
                    "" if len(rngs) == 1 else "es", world, "one process" if world == 1 else f"{world} processes")
    return state, (rngs[rank] if rank < len(rngs) else None)

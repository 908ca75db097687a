"""Room on the output folder's disk, checked before the first step. A run that cannot write its last checkpoint
loses every step it trained (with checkpoint_every 0, the default, that checkpoint is the first), so a disk without
room for it and the LoRA stops the run before it starts; one that may fill up before the run ends is warned of."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from lowmem_alignprop.memory.allowances import MIB, fmt_bytes
from lowmem_alignprop.memory.optim import state_bytes
from lowmem_alignprop.run import schedule
from lowmem_alignprop.settings.errors import UserError

SMALL_FILES = 32 * MIB  # samples, reports, metrics.jsonl, config and state files: a few MB; the rest is slack


@dataclass(frozen=True)
class RunBytes:
    """What a run writes, in bytes: ``checkpoint`` (one), ``at_once`` (how many it holds while writing the next),
    ``outputs`` (lora/, best/ and the exports) and ``peak`` (all of them together, with the small files)."""
    weights: int
    optimizer: int
    history: int
    checkpoint: int
    at_once: int
    outputs: int

    @property
    def peak(self) -> int:
        return self.checkpoint * self.at_once + self.outputs + SMALL_FILES

    @property
    def least(self) -> int:
        """The last checkpoint and the LoRA: without room for these the run's steps are lost."""
        return self.checkpoint + self.weights + SMALL_FILES


def run_bytes(cfg, params, start: int = 0) -> RunBytes:
    """The files of a run training ``params`` from step ``start`` to ``cfg.steps``: each checkpoint holds the trained
    weights as they are, the optimizer state, the EMA's fp32 copy (twice: its state and by name) and the metrics of
    every step so far; ``keep_checkpoints`` of them stay while the next is written (0: every one the run writes)."""
    weights = sum(p.numel() * p.element_size() for p in params)
    optimizer = state_bytes(cfg, params)
    ema = 2 * 4 * sum(p.numel() for p in params) if cfg.ema_decay else 0  # its state and its weights by name: fp32
    # state.json's metrics rows, indented: up to 1 KiB a step (more with evaluations) and each image's reward and prompt
    history = cfg.steps * (1024 + 64 * cfg.batch_size * cfg.grad_accum)
    checkpoint = weights + optimizer + ema + history + MIB  # + the RNG states, manifest and slack
    written = schedule.due_after(cfg.checkpoint_every, cfg.steps, start) or 1  # the last step's always
    at_once = min(cfg.keep_checkpoints + 1, written) if cfg.keep_checkpoints else written
    # lora/; best/ is written beside the one it replaces; one copy per export format; init_lora/ (--init-lora's copy)
    outputs = weights * (1 + (2 if cfg.eval_every else 0) + len(cfg.export_formats()) + (1 if cfg.init_lora else 0))
    return RunBytes(weights, optimizer, history, checkpoint, at_once, outputs)


def free_bytes(folder: Path) -> int | None:
    """Free space on the disk that holds ``folder`` (or its nearest existing parent: a new run's folder is made
    later); None where the file system does not say (the run then goes on unchecked)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def file_size_limit() -> int | None:
    """The largest file this process may write (``ulimit -f``), in bytes; None without a limit (or on Windows)."""
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def check(cfg, out: Path, params, start: int = 0) -> str | None:
    """Stop with one line when ``out``'s disk cannot hold the run's last checkpoint and LoRA, or its largest file is
    over the file-size limit; when it may fill up before the run ends, the warning to give (every process finds it:
    the caller says it once), else None."""
    need, free = run_bytes(cfg, params, start), free_bytes(out)
    largest = max(need.weights, need.optimizer, need.history) + MIB  # one file each (+ slack: a sample grid)
    if (limit := file_size_limit()) is not None and limit < largest:  # the first checkpoint would fail, steps lost
        raise UserError(f"the file-size limit here (ulimit -f) is {fmt_bytes(limit)}, and this run writes files of "
                        f"up to about {fmt_bytes(largest)} (its checkpoints' optimizer state and weights): raise it "
                        "(ulimit -f unlimited) and start the run again")
    if free is None or free >= need.peak:
        return None
    if free < need.least:
        raise UserError(f"--output-dir {out}: its disk has {fmt_bytes(free)} free, and this run's last checkpoint "
                        f"and LoRA alone take about {fmt_bytes(need.least)} (the trained weights "
                        f"{fmt_bytes(need.weights)}, the optimizer's state {fmt_bytes(need.optimizer)}, "
                        f"{fmt_bytes(SMALL_FILES)} kept for samples, reports and logs): free space there, or choose "
                        "another --output-dir")
    fewer = " or keep fewer checkpoints (--set keep_checkpoints=1)" if need.at_once > 2 else ""
    return (f"--output-dir {out}: its disk has {fmt_bytes(free)} free, and this run may hold up to "
            f"{fmt_bytes(need.peak)} at once ({need.at_once} checkpoints of {fmt_bytes(need.checkpoint)}, the LoRA, "
            f"best/ and exports): it may fill the disk before it ends; free space there{fewer}")

"""The run folder: which output folder a training run writes to, what it already holds, the one lookup of the
checkpoint to resume, the lock that keeps a second run out, and setting a superseded branch aside.

    folder = RunFolder.for_command(cfg.output_dir, chosen=..., resume=args.resume)
    folder.resumed_settings()      # the checkpoint's own settings (read once), for the config
    folder.move_past_an_earlier_run()   # the default folder only: outputs/run -> outputs/run-2 ...
    point = folder.check()         # a live run, a run there already, a missing or broken checkpoint: one line each
    with folder.hold():            # the lock (see runlock.py); a numbered default folder taken meanwhile moves on
        folder.start_metrics(point, history)   # a new metrics.jsonl, or the resumed branch's, newer ones set aside

See docs/design.md section 7 (resume and the run folder).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from lowmem_alignprop.run import atomic
from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.run.faults import json_ready
from lowmem_alignprop.run.filenames import (BEST_FILE, CONFIG_FILE, GRID_FILE, GRID_RECORD, LORA_DIR, METRICS_FILE,
                                            SAMPLES_DIR, SUMMARY_FILE, grid_step)
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.paths import absolute_path, read_user_text
from lowmem_alignprop.run.runlock import (RunLock, check_free, global_rank, hold_folder, holder, next_free_dir,
                                          numbered_dirs, world_size)

log = logging.getLogger("lowmem_alignprop")

METRICS = METRICS_FILE


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from, with its state.json (read once, after its checksums were verified)."""
    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


class _Captured(logging.Handler):
    """The warnings of a lookup (broken checkpoints skipped), held back until the run reaches the point where it
    reports them: after the input checks and the live-run check, as a run that looked once would."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class RunFolder:
    """One training run's output folder. ``numbered``: the default folder (not one the user named), which moves on
    to ``<dir>-2``, ``-3``... when it holds an earlier run or another run takes it a moment before this one.
    ``resume``: the --resume value (``latest`` or a checkpoint / run folder), or None. ``default``: the folder is the
    default one, not named by the user (numbered or, with --resume, not)."""

    def __init__(self, path: str | os.PathLike, *, numbered: bool = False, resume: str | None = None,
                 default: bool = False):
        self.path = Path(path)
        self.numbered = numbered
        self.resume = resume
        self.default = default or numbered
        self.moved_past: tuple[Path, str] | None = None  # (the default folder, why it was passed): said at hold()
        self._found: tuple[ResumePoint | None, UserError | None, list[logging.LogRecord]] | None = None
        self._seen: set[str] = set()  # the checkpoints there when it was looked up (--resume latest)

    @classmethod
    def for_command(cls, output_dir: str | os.PathLike, *, chosen: bool, resume: str | None) -> "RunFolder":
        """``chosen``: the user named the folder (--output-dir or --set output_dir)."""
        return cls(output_dir, numbered=not chosen and not resume, resume=resume, default=not chosen)

    @staticmethod
    def of_checkpoint(resume: str) -> str | None:
        """The run folder of a ``--resume`` value: a run folder itself, ``RUN/checkpoints/step-N``, or a checkpoint of
        a branch set aside, ``RUN/checkpoints/superseded-after-step-N/step-M``. None for ``latest`` or anything
        else."""
        if resume == "latest":
            return None
        path = Path(resume).expanduser()
        for run in (path, path.parent.parent, path.parent.parent.parent):
            if (run / ckpt.DIRNAME).is_dir() and (run == path or ckpt.DIRNAME in path.relative_to(run).parts[:1]):
                return str(run)
        return None

    # ---- the checkpoint to resume: looked up once -------------------------------------------------------------
    def _lookup(self) -> tuple[ResumePoint | None, UserError | None, list[logging.LogRecord]]:
        if self._found is None:
            point, error, logger, captured = None, None, logging.getLogger("lowmem_alignprop"), _Captured()
            propagate, handlers = logger.propagate, logger.handlers
            logger.propagate, logger.handlers = False, [captured]
            try:
                self._seen = {p.name for p in ckpt.list_checkpoints(ckpt.root_of(self.path))}
                path = ckpt.find_resume(self.path, self.resume)  # verifies the checksums
                point = ResumePoint(path, ckpt.read_state(path))
            except UserError as e:
                error = e
            except (OSError, ValueError) as e:
                error = UserError(f"checkpoint {self.resume}: state.json is unreadable ({type(e).__name__})")
            finally:
                logger.propagate, logger.handlers = propagate, handlers
            self._found = (point, error, captured.records)
        return self._found

    def resumed_step(self) -> int | None:
        """The step the checkpoint a --resume continues from holds (its run goes on from the next), or None."""
        point = self._lookup()[0] if self.resume else None
        return int(point.state.get("step", 0)) if point is not None else None

    def resumed_state(self) -> dict | None:
        """The state.json of the checkpoint a --resume continues from, or None (no --resume, or :meth:`check` will
        say what is wrong)."""
        point = self._lookup()[0] if self.resume else None
        return point.state if point is not None else None

    def resumed_settings(self) -> tuple[str, dict] | None:
        """(profile name, config) the checkpoint was trained with, or None (no --resume, or :meth:`check` will say
        what is wrong: a live run in the folder first, then a missing or broken checkpoint)."""
        from lowmem_alignprop.settings.config import FIELD_NAMES, RETIRED_FIELDS, Config

        if not self.resume:
            return None
        point, _, _ = self._lookup()
        if point is None:
            return None
        config = point.state.get("config") or {}
        choices = {f: m.metadata.get("choices") for f, m in Config.__dataclass_fields__.items()}
        newer = sorted([k for k in config if k not in FIELD_NAMES and k not in RETIRED_FIELDS]
                       + [f"{k}={config[k]}" for k, c in choices.items() if c and k in config and config[k] not in c])
        if newer:  # dropped, the run would go on without them (best_by falls back to reward: another best/); a
            # value this version lacks would be refused naming one of its own, which trains otherwise
            raise UserError(f"checkpoint {point.path} was written by a newer lowmem-alignprop: its settings "
                            f"{', '.join(newer)} are unknown to this version, which would train on without them; "
                            "resume with the version that wrote it (pip install -U lowmem-alignprop), or start a new "
                            "run")
        for k in (k for k in RETIRED_FIELDS if config.get(k) is not None and global_rank() == 0):
            log.warning("resume: the checkpoint was trained with %s=%s, a setting this version no longer has (%s): "
                        "this run trains on without it", k, config[k], RETIRED_FIELDS[k])
        values = {k: v for k, v in config.items() if k in FIELD_NAMES and k != "output_dir"}
        name = self.recorded_profile()[0] or "resumed"
        return (str(name), values) if values else None

    def recorded_profile(self, point: ResumePoint | None = None) -> tuple[str | None, dict | None]:
        """The resumed run's config.yaml's ``profile`` (its name) and ``profile_values`` (a user's profile file's
        values when the run started with it; None for a shipped profile, or a run from before the record): this
        folder's, or, for a checkpoint resumed into a new folder, its run's. ``point``: the checkpoint resumed (the
        --resume's by default). (None, None) without a checkpoint."""
        point = point or (self._lookup()[0] if self.resume else None)
        if point is None:
            return None, None
        origin = self.of_checkpoint(str(point.path))  # a checkpoint resumed into a new folder: its run's profile
        for run in [self.path] + ([Path(origin)] if origin else []):
            try:
                written = yaml.safe_load(read_user_text(run / CONFIG_FILE))  # (a user's editor's: UTF-16 too)
                name, values = written.get("profile"), written.get("profile_values")
            except (OSError, ValueError, AttributeError, yaml.YAMLError):
                continue
            return (None if name is None else str(name)), (values if isinstance(values, dict) else None)
        return None, None

    def later_default_runs(self) -> str | None:
        """--resume latest without --output-dir continues the default folder, whatever came after it: where runs of
        the same command went on to ``<dir>-2``, ``-3``... (:meth:`move_past_an_earlier_run`) and hold checkpoints,
        the words that name them and how to continue the newest; else None."""
        if self.resume != "latest" or not self.default:
            return None
        later = [p for p in numbered_dirs(self.path) if ckpt.list_checkpoints(ckpt.root_of(p))]
        if not later:
            return None
        named = ", ".join(str(p) for p in later[-3:]) + (f" (and {len(later) - 3} more)" if len(later) > 3 else "")
        one = len(later) == 1
        return (f"{named} {'holds a later run' if one else 'hold later runs'} of the same command without "
                f"--output-dir (the default folder's next ones): to continue {'it' if one else 'the newest'}, add "
                f"--output-dir {later[-1]}")

    # ---- choosing the folder ------------------------------------------------------------------------------------
    def move_past_an_earlier_run(self) -> None:
        """Running the same command twice must not fail: the default folder (not one the user named) that holds an
        earlier run is left alone and the next free ``<dir>-2``, ``-3``... is used. :meth:`hold` says so, once the
        run's inputs have passed their checks (a run that stops at a bad input writes nowhere)."""
        if not self.numbered:
            return

        def taken(folder: Path) -> ckpt.RunEvidence | str | None:
            return ("a run still going" if holder(folder) else None) or ckpt.holds_a_run(folder)

        base = self.path
        mark = taken(base)
        if not mark:
            return
        self.path = next_free_dir(base, taken)
        self.moved_past = (base, "--resume latest continues it" if isinstance(mark, ckpt.RunEvidence)
                           and mark.checkpoints else mark if mark == "a run still going" else "left as it is")

    def anchor(self) -> None:
        """From here on the folder goes by its absolute path: a user's reward that changes the working directory
        moves no file of the run (the messages before, which choose the folder, name it as the user did)."""
        self.path = Path(absolute_path(self.path.expanduser()))  # ('elsewhere/../run' as the run folder itself)

    def with_output_dir(self, cfg):
        """``cfg`` writing to this folder."""
        return cfg if cfg.output_dir == str(self.path) else dataclasses.replace(cfg, output_dir=str(self.path))

    # ---- before the lock ----------------------------------------------------------------------------------------
    def check(self) -> ResumePoint | None:
        """A live run there, a run there already (without --resume), another run's checkpoint, a missing or broken
        checkpoint: one line each. Returns the checkpoint to resume (None for a new run)."""
        out = self.path
        if not self.numbered:  # (a numbered default folder taken meanwhile: the next one, in hold())
            check_free(out, bool(self.resume))  # a live run there (or a --resume of a run still going): untouched
        mark = ckpt.holds_a_run(out)
        point = None
        if self.resume:
            point, error, records = self._lookup()
            for record in records:  # the broken checkpoints skipped, said once
                log.handle(record)
            later = self.later_default_runs()
            if error is not None:
                raise UserError(f"{error}; {later}") if later else error
            if later and global_rank() == 0:
                log.warning("--resume latest continues %s; %s", out, later)
        if mark and point is None:
            cont = ("continue it with --resume latest, or" if mark.checkpoints else
                    "it stopped before its first checkpoint, so nothing there can be continued: delete the folder "
                    "to start again there, or" if mark.started_only else
                    "it has no checkpoint to continue from:")
            raise UserError(f"--output-dir {out} already holds a run ({mark}): {cont} choose another --output-dir "
                            "(nothing was overwritten)")
        if mark and ckpt.branch_point(point.path, ckpt.root_of(out)) is None:  # another run's checkpoint
            raise UserError(f"--output-dir {out} holds another run ({mark}): resuming {point.path} there would mix "
                            "the two runs' files; leave --output-dir out to continue in that checkpoint's own run "
                            "folder, or pass a new --output-dir (nothing was overwritten)")
        return point

    def hold(self) -> RunLock:
        """The acquired lock: no second run (or a --resume of this one) writes here meanwhile; under a launcher,
        rank 0 holds it for all. A numbered default folder taken a moment ago by a run started with this one gives
        way to the next (``self.path`` follows)."""
        lock = hold_folder(self.path, ckpt.holds_a_run, enabled=global_rank() == 0,
                           numbered=self.numbered and world_size() == 1)
        self.path = lock.out
        point = self._found[0] if self._found is not None and self.resume == "latest" else None
        newer = sorted(p.name for p in ckpt.list_checkpoints(ckpt.root_of(self.path)) if p.name not in self._seen and
                       ckpt.step_of(p) > point.step) if point is not None else []
        if newer:  # another start of the run wrote them while this one started: its "latest" is no longer that
            lock.release()
            raise UserError(f"{self.path} went on to {newer[-1]} while this command started (another start of the "
                            "run wrote it meanwhile): nothing was changed; --resume latest again continues from it")
        if self.moved_past and global_rank() == 0:  # once per run, not once per process
            log.warning("%s holds an earlier run (%s): this run writes to %s", *self.moved_past, self.path)
        return lock

    # ---- metrics of the run (rank 0) ----------------------------------------------------------------------------
    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    def remove_leftovers(self) -> None:
        """Remove the temporary files and folders of writes a kill cut short (``.partial-*``: never a finished
        file); call with the lock held."""
        for path in atomic.leftovers(self.path):
            log.warning("removing %s, a write or removal that did not finish (the run was killed meanwhile)", path)
            _remove(path)

    def start_metrics(self, point: ResumePoint | None, history: list[dict]) -> None:
        """A new run starts an empty metrics.jsonl. A resumed one keeps its rows up to the checkpoint; resuming an
        older step sets the newer checkpoints (and their metrics) aside as another branch."""
        if point is None:
            atomic.write_text(self.metrics, "")
            return
        root = ckpt.root_of(self.path)
        branch = ckpt.branch_point(point.path, root)
        aside = ckpt.set_aside_newer(root, branch, self.metrics) if branch is not None else None
        if aside is not None:
            # newer checkpoints (and their metrics) are another branch: set aside, kept; its final LoRA and summary go
            # with them (they stayed as the run's: a stop before this branch's first step left sample and export on
            # them), and its grids (before/after, --sample-every's after the branch: this one's would replace them)
            samples = self.path / SAMPLES_DIR
            grids = [Path(SAMPLES_DIR) / p.name for p in (samples.iterdir() if samples.is_dir() else ())
                     if p.name in (GRID_FILE, GRID_RECORD) or (grid_step(p.name) or 0) > branch]
            for name in [Path(LORA_DIR), Path(SUMMARY_FILE), *grids]:
                if (self.path / name).exists():
                    (aside / name).parent.mkdir(exist_ok=True)
                    os.replace(self.path / name, aside / name)
        if point.path.resolve().parent == root.resolve():
            keep_metrics_until(self.metrics, point.step, history)  # rows written after the checkpoint (a crash) go
        else:  # a set-aside branch, or another run's checkpoint: that branch's rows, from the checkpoint
            atomic.write_text(self.metrics, "".join(metrics_line(r) for r in history))


def started_commands(run: Path) -> list[str]:
    """The command line of each start of the run (command.txt), oldest first; [] without a readable record."""
    from lowmem_alignprop.run.filenames import COMMAND_FILE

    try:
        return [line for line in (run / COMMAND_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def recorded_dirs(state: dict, count: int) -> list[str | None]:
    """The working folder of each of a run's first ``count`` starts as a checkpoint's state (or summary.json)
    recorded them (``start_dirs``, aligned with command.txt's lines); None for a start it does not name (one from
    before the record, or one that wrote no checkpoint)."""
    kept = state.get("start_dirs")
    kept = [d if isinstance(d, str) and d else None for d in kept] if isinstance(kept, list) else []
    return (kept + [None] * count)[:count]


def working_folder() -> str | None:
    """The folder this command runs in, absolute (None when it was removed meanwhile: os.getcwd fails)."""
    try:
        return os.getcwd()
    except OSError:
        return None


def metrics_line(row: dict) -> str:
    """One line of metrics.jsonl: strict JSON, a NaN or infinite figure (an fp16 step's overflowed grad_norm) as null
    (faults.json_ready)."""
    return json.dumps(json_ready(row), allow_nan=False) + "\n"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def read_metrics(path: Path, until: int | None = None) -> list[dict]:
    """The rows of a metrics.jsonl (up to step ``until``), oldest first; [] without the file. A line a crash cut
    off (or any line that is not a JSON object) is left out."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and (until is None or row.get("step", 0) <= until):
            rows.append(row)
    return rows


def keep_metrics_until(path: Path, step: int, history: Sequence[dict] = ()) -> None:
    """Drop metrics rows after ``step`` (written after the checkpoint, before an interruption); atomic rewrite. The
    checkpoint's ``history`` puts back a trained step's row the file lacks (its append failed: a disk gone read-only
    or full at that step, whose checkpoint was written)."""
    rows = read_metrics(path, until=step)
    have = {r.get("step") for r in rows}
    missing = [r for r in history if r.get("step") not in have and r.get("step", 0) <= step]
    if missing:
        rows = sorted(rows + missing, key=lambda r: r.get("step", 0))  # (stable: a step's own rows keep their order)
    atomic.write_text(path, "".join(metrics_line(r) for r in rows))


def best_record(folder: Path) -> dict[str, Any] | None:
    """A best/ folder's best.json, its ``step`` an int (None: no readable one)."""
    try:
        record = json.loads((folder / BEST_FILE).read_text(encoding="utf-8"))
        return {**record, "step": int(record["step"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def best_step(folder: Path) -> int | None:
    """The step a best/ folder's best.json names (None: no readable one)."""
    record = best_record(folder)
    return None if record is None else record["step"]


def first_last_rewards(history: list[dict], since: int = 1, prompts_since: int = 1) -> dict[str, Any]:
    """The run's reward at its start and at its end, on the same prompts: each prompt's mean reward over its images in
    the first n and in the last n steps (n = 3, at most half the run, widened up to half the run until a prompt is in
    both; several sizes: a prompt at a size), averaged over the prompts in both. ``reward_prompts``: how many;
    ``reward_window``: n. Rows without per-image prompts (runs before they were recorded) give the mean of every image
    in the windows instead (``reward_prompts`` None: different prompts at the start and at the end). ``since``: the
    first step the run's reward scored (a resume that changed the reward; rows without a step, of older runs, count).
    ``prompts_since``: the first step of the run's prompts (a resume whose prompt file changed): the rows before it
    index other prompts, so their ids match nothing (the means of every image, ``reward_prompts`` None)."""
    history = [h for h in history if h.get("step", since) >= since]
    history = [h if h.get("step", prompts_since) >= prompts_since else {k: v for k, v in h.items() if k != "prompt_ids"}
               for h in history]
    return {**_first_last(history), "reward_steps": len(history)}  # reward_steps 1: nothing to compare


def _first_last(history: list[dict]) -> dict[str, Any]:
    nan = float("nan")
    if not history:
        return {"reward_first": nan, "reward_last": nan, "reward_prompts": None, "reward_window": 0}
    half = max(1, len(history) // 2)
    n = start = max(1, min(3, half))
    if len(history) > 1 and all("prompt_ids" in h and "rewards" in h for h in history):  # (one step: its own mean)
        first, last = _per_prompt(history[:n]), _per_prompt(history[-n:])
        while not set(first) & set(last) and n < half:
            n += 1
            first, last = _per_prompt(history[:n]), _per_prompt(history[-n:])
        common = sorted(set(first) & set(last), key=str)
        if common:
            return {"reward_first": sum(first[p] for p in common) / len(common),
                    "reward_last": sum(last[p] for p in common) / len(common),
                    "reward_prompts": len({p for p, _ in common}), "reward_window": n}
    n = start
    return {"reward_first": sum(h["reward_mean"] for h in history[:n]) / n,
            "reward_last": sum(h["reward_mean"] for h in history[-n:]) / n, "reward_prompts": None, "reward_window": n}


def _per_prompt(rows: list[dict]) -> dict[tuple[int, Any], float]:
    """Each prompt's (index into the run's prompts) mean reward over its images in ``rows``, at each image size
    (several sizes a run: a step's ``width`` and ``height``; a reward differs by size, so the first and last steps'
    are compared size by size): keyed (prompt, size)."""
    seen: dict[tuple[int, Any], list[float]] = {}
    for row in rows:
        size = (row.get("width"), row.get("height"))
        for p, r in zip(row["prompt_ids"], row["rewards"]):
            seen.setdefault((int(p), size), []).append(float(r))
    return {p: sum(v) / len(v) for p, v in seen.items()}

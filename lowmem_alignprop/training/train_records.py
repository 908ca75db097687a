"""A run's records across its starts (:class:`RunRecords`, a phase of
:class:`~lowmem_alignprop.training.train.Trainer`): a resume's checkpoint restored (weights, optimizer, RNG,
history, what the resume changed), the software each stretch of steps trained under, and the run folder's
config.yaml, command.txt and prompts.json, written once the checkpoint is restored.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml

from lowmem_alignprop.run import atomic
from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.run import resume_rules
from lowmem_alignprop.run import faults, input_files, software
from lowmem_alignprop.run.filenames import COMMAND_FILE, CONFIG_FILE, INIT_SOURCE_FILE, PROMPTS_FILE
from lowmem_alignprop.run.rng_state import set_rng_state
from lowmem_alignprop.run.runfolder import RunFolder, recorded_dirs, started_commands, working_folder
from lowmem_alignprop.run.runlock import world_size
from lowmem_alignprop.settings.config import PROMPT_READING
from lowmem_alignprop.settings.profiles import as_read

log = logging.getLogger("lowmem_alignprop")


def prompt_lists_before(path: Path, prompts: list[str], start: int) -> dict[str, list]:
    """prompts.json's ``earlier``: the training prompt lists that metrics.jsonl's earlier rows index, each with the
    last step that used it (``until_step``), when a resume trains from step ``start`` + 1 on other ``prompts``.
    ``path``: the prompts.json of the run resumed (its lists past ``start`` belong to a branch this one replaces)."""
    try:
        old = json.loads(path.read_text(encoding="utf-8")) if start else {}
    except (OSError, ValueError):
        old = {}
    old = old if isinstance(old, dict) else {}
    lists = [e for e in old.get("earlier") or [] if isinstance(e, dict) and isinstance(e.get("until_step"), int)]
    earlier = [e for e in lists if e["until_step"] < start]
    at_start = next((e.get("train") for e in lists if e["until_step"] >= start), old.get("train"))  # step start's
    if isinstance(at_start, list) and at_start != prompts:
        earlier.append({"until_step": start, "train": at_start})
    return {"earlier": earlier} if earlier else {}



class RunRecords:
    """:meth:`restore` and :meth:`write_config`, the end of the Trainer's setup (training/train.py), and
    :meth:`config_yaml`, which the end of a run and an out-of-memory stop write again.

    Reads the Trainer's ``cfg``, ``folder``, ``out``, ``is_main``, ``accelerator``, ``device``, ``point``,
    ``start``, ``step``, ``refinish``, ``command``, ``profile_name``, ``prompts``, ``eval_prompts``, ``searched``,
    ``init_file``, ``init_lora_copy``, ``init_source``, ``init_kept``, ``prompt_sources``, ``bare_unet``,
    ``optimizer``, ``engine``, ``gather``, ``rng``, ``ema``, ``held_out``, ``held_out_sha``, ``prompts_sha``,
    ``reward_sha``, ``input_files`` and ``fits``; sets ``history``, ``rollouts_before``, ``resumed_with``, ``fits``,
    ``reward_since``, ``prompts_since``, ``eval_owed``, ``resumes_newest``, ``software``, ``profile_values`` and
    ``start_dirs``."""

    def restore(self) -> None:
        """A resumed run loads its checkpoint (weights, optimizer, RNG, history); rank 0 starts metrics.jsonl."""
        point = self.point
        if point is not None:
            state, rng_state = ckpt.restore(self.accelerator, point.path, bare_unet=self.bare_unet,
                                            optimizer=self.optimizer, engine=self.engine, gather=self.gather,
                                            state=point.state)
            self.history = list(state.get("history", []))
            saved = state.get("config", {})  # (a checkpoint from before it counted them: its own sizes throughout)
            self.rollouts_before = int(state.get("rollouts", self.start * saved.get("grad_accum", self.cfg.grad_accum)
                                                 * saved.get("batch_size", self.cfg.batch_size)))
            replaced = self.replaced_inputs(state)  # (said, one line each)
            # e.g. K or lr: the card says them (processes: as check_config counts them)
            self.resumed_with = resume_rules.resume_changes(state, self.cfg, self.start + 1, world_size(),
                                                            self.software_since(state.get("software")), replaced,
                                                            trains=not self.refinish)
            self.fits = list(state.get("auto_fit") or [])  # --auto-fit's changes so far: the checkpoint's config
            if self.fits and self.is_main:  # holds them, and config.yaml and the summary go on listing them
                log.info("resume: --auto-fit's changes carry on: %s", "; ".join(
                    f"step {f['step']} ({f['stage']}): {faults.Fit(f['why'], f['change']).as_flags()}"
                    for f in self.fits))
            before = state.get("config", {})
            changed = bool(replaced) or any(before.get(f) != getattr(self.cfg, f) for f in (
                "reward", "reward_weights")) or bool(resume_rules.images_changed(before, self.cfg))  # (64 vs 32 px...)
            # the first step scored by this reward: the summary's first -> last compares those steps only
            self.reward_since = self.start + 1 if changed else int(state.get("reward_since") or 1)
            other = state.get("prompts_sha") not in (None, self.prompts_sha)  # the rows before index other prompts
            self.prompts_since = self.start + 1 if other else int(state.get("prompts_since") or 1)
            # the same file read the same way, edited since (another file, column or filter is warned of)
            edited = other and all(before.get(f, "") == getattr(self.cfg, f) for f in ("prompts", *PROMPT_READING))
            if edited and self.is_main:
                log.warning("resume: %s changed since the checkpoint: the rows before step %d of metrics.jsonl index "
                            "its earlier prompts (prompt_ids)", self.cfg.prompts, self.step)
            if rng_state is not None:
                set_rng_state(self.rng, rng_state)
            if self.ema is not None and not self.ema.load(point.path):
                log.warning("resume: %s holds no EMA of the weights: the average starts from step %d's weights",
                            point.path, self.start)
            if self.held_out is None and state.get("eval_owed") == self.start and self.is_main:  # (--eval-every 0)
                log.warning("resume: step %d's held-out evaluation failed before, and this resume evaluates nothing "
                            "(eval_every 0): it is not run, and best/ (if any) stays as it was", self.start)
            if self.held_out is not None:
                evaluation = state.get("evaluation") or {}
                # what its objective reads
                changed = resume_rules.eval_basis_changed(state, self.cfg, self.held_out_sha)
                changed += [resume_rules.REPLACED[name] for name in replaced
                            if name != "reward_source" or self.cfg.best_by == "reward"]
                if changed and evaluation and self.is_main:
                    log.warning("resume: the held-out evaluation's %s changed since the checkpoint: best/ and the "
                                "early stop's patience start over", ", ".join(changed))
                self.held_out.load_state(None if changed else evaluation)  # else best so far and patience go on
                # the checkpoint's own step's evaluation failed (the reward's error, memory): owed, run first (fit)
                owed = state.get("eval_owed") == self.start and self.held_out.due(self.start)
                self.eval_owed = self.start if owed else None
                if self.refinish and self.start < self.cfg.steps:  # the run stopped early here
                    self.held_out.stopped_at = self.start
                if self.is_main:  # best/ holds the best step's LoRA (a branch set aside, a new folder)
                    origin = RunFolder.of_checkpoint(str(point.path))
                    self.held_out.keep_best_of(self.start, Path(origin) if origin else None)
        else:
            self.software_since(None)
        if self.is_main:
            newest = next(iter(ckpt.list_checkpoints(ckpt.root_of(self.out))), None)  # (before a branch is set aside)
            self.resumes_newest = point is not None and newest is not None and newest.resolve() == point.path.resolve()
            self.folder.start_metrics(point, self.history)
            self.folder.remove_leftovers()  # temporary files of a write a kill cut short (the lock is ours)
        if point is not None and self.is_main:
            log.info("resumed from %s at step %d", point.path, self.start)

    def replaced_inputs(self, state: dict) -> dict[str, list]:
        """What the checkpoint's run read from files that changed since at the same path, each said in one line:
        the source of the same --reward (a fix of a failure, as its message invites: another reward), a vae or
        reward_weights file's contents (other images, or another reward): ``{name: [was, now]}`` of their digests
        (resume_rules.REPLACED's names), which the card lists; the summary compares the steps from this resume on. A
        start that trains no step (a finished run's outputs written again) says them and counts none: no step was
        trained with them (as check_config refuses a changed setting there, and software_since records none)."""
        replaced, said = {}, []
        if state.get("config", {}).get("reward") == self.cfg.reward and state.get("reward_sha") not in (
                None, self.reward_sha):
            replaced["reward_source"] = [state["reward_sha"], self.reward_sha]
            said.append(f"the source of --reward {self.cfg.reward} changed since the checkpoint: it counts as another "
                        "reward")
        saved = state.get("input_files") or {}
        for field in input_files.replaced(saved, self.input_files):
            replaced[f"{field}_file"] = [saved[field]["sha"], self.input_files[field]["sha"]]
            said.append(f"the file of {field}={getattr(self.cfg, field)} changed since the checkpoint: "
                        + ("the images decode otherwise" if field == "vae" else "it counts as another reward"))
        trains = not self.refinish  # (the last step's, or where it stopped early)
        for line in said if self.is_main else ():
            log.warning("resume: %s (%s)", line, f"the summary compares its steps from step {self.start + 1} on"
                        if trains else "no step is left to train: the outputs written again are made with it, the "
                        "run's records keep its trained steps'")
        return replaced if trains else {}

    def software_since(self, stretches: list[dict] | None) -> dict[str, list]:
        """The software stretches (``stretches``: the checkpoint's, None for a new run) once this start trains under
        this machine's versions and device; returns what a resume changes of them (said in one line: run/software.py;
        a checkpoint without the record or a start that trains no step: nothing)."""
        now = software.software(self.cfg, self.device)
        trains = not self.refinish  # (an ended run's outputs written again, its last step's or an early stop's: none)
        changes = software.software_changes(stretches, now) if trains else {}
        if changes and self.is_main:
            log.warning("%s", software.software_line(changes, self.step))
        self.software = software.stretches_at(stretches, now if trains else None, self.step)
        return changes

    def write_config(self) -> None:
        """config.yaml, command.txt and prompts.json, once the checkpoint is restored: a resume that fails leaves them
        as they were."""
        out = self.out
        if self.is_main:
            # a hand edit of config.yaml would be written over without a word (of the newest checkpoint only: an
            # older one's or a set-aside branch's differs from what the live branch's later starts wrote, unedited)
            if self.resumes_newest:
                note = resume_rules.edited_config_note(out / CONFIG_FILE, self.point.state.get("config", {}), self.fits)
                if note:
                    log.warning("%s", note)
            self.profile_values = self.profile_record()
            atomic.write_text(out / CONFIG_FILE, self.config_yaml())
            # --init-lora's LoRA kept as read: a resume needs neither its path nor its file
            if self.init_file is not None and self.init_file != self.init_lora_copy:
                with atomic.replacing_dir(self.init_lora_copy.parent) as tmp:
                    shutil.copyfile(self.init_file, tmp / self.init_lora_copy.name)
                    if self.init_kept is not None:  # the layers kept as they came (fused into the frozen base)
                        from lowmem_alignprop.models.kept_lora import write_kept
                        write_kept(self.init_kept.kept, tmp)
                    if self.init_source is not None:  # the user's own file and its digest: the card's
                        (tmp / INIT_SOURCE_FILE).write_text(json.dumps(self.init_source, indent=1) + "\n",
                                                            encoding="utf-8")
            elif self.init_kept is not None and self.init_kept.kept:
                self.rewrite_kept()
            # what prompt_ids index, and what the evaluation holds out (a user can check it never trains); a resume
            # on other prompts keeps the lists the earlier steps' prompt_ids index
            resumed = out / PROMPTS_FILE  # (another run's checkpoint resumed here: that run's lists)
            if self.point is not None and not resumed.is_file() and (origin := RunFolder.of_checkpoint(
                    str(self.point.path))):
                resumed = Path(origin) / PROMPTS_FILE
            atomic.write_text(out / PROMPTS_FILE, json.dumps(
                {"train": self.prompts, "held_out": self.eval_prompts,
                 **({"sources": self.prompt_sources} if self.prompt_sources else {}),
                 **prompt_lists_before(resumed, self.prompts, self.start)}, indent=1, ensure_ascii=False) + "\n")
            if self.command and self.point is None:  # a new run: no line of a start that trained nothing here
                atomic.write_text(out / COMMAND_FILE, self.command + "\n")
            elif self.command:  # the exact command, one line per start (a --resume adds its own): the model card's
                if not (out / COMMAND_FILE).exists():  # another run's checkpoint resumed here: that run's starts first
                    origin = RunFolder.of_checkpoint(str(self.point.path))
                    earlier = started_commands(Path(origin))[:self.point.state.get("starts")] if origin else []
                    if earlier:
                        atomic.write_text(out / COMMAND_FILE, "\n".join(earlier) + "\n")
                atomic.append_line(out / COMMAND_FILE, self.command)
            # where each start ran, aligned with command.txt's lines (a relative path in one names nothing without it)
            count = len(started_commands(out)) - bool(self.command)  # the starts before this one
            self.start_dirs = recorded_dirs(self.point.state if self.point is not None else {}, count) + (
                [working_folder()] if self.command else [])

    def rewrite_kept(self) -> None:
        """A resume from init_lora/'s copy whose kept layers' file is gone (a tidy-up, a partial copy of the run
        folder): the layers it just fused again from that copy are written back, as the first start wrote them, so
        that lora/, best/, the checkpoints and every export hold them (read from that file) as training saw them."""
        from lowmem_alignprop.models.kept_lora import kept_total, layer_count, them, write_kept
        from lowmem_alignprop.run.filenames import KEPT_LAYERS_NAME

        folder = self.init_lora_copy.parent
        if (file := folder / KEPT_LAYERS_NAME).is_file():
            return
        with atomic.replacing_dir(folder) as tmp:  # (init_lora/ as it was, and the file)
            for kept in folder.iterdir():
                if kept.is_file():
                    shutil.copy2(kept, tmp / kept.name)
            write_kept(self.init_kept.kept, tmp)
        layers = self.init_kept.kept
        log.warning("%s was gone: written again from %s (the %s this run keeps as its --init-lora had %s, which its "
                    "LoRA files carry)", file, self.init_lora_copy, kept_total(layers), them(layer_count(layers)))

    def profile_record(self) -> dict | None:
        """config.yaml's ``profile_values``: the user's profile file's values when the run started with it (a resume
        of the run's own file tells an edit of it from the run's --set values). A resume keeps the start's record (a
        run from before it: None); one that applies another file on top records that file as this start read it."""
        if self.point is not None:
            name, values = self.folder.recorded_profile(self.point)
            if name == self.profile_name:
                return values
        return as_read(self.profile_name)

    def config_yaml(self) -> str:
        """config.yaml: the profile's name, the resolved configuration, the user's profile file's values at the start
        (:meth:`profile_record`), and where --auto-fit's changes came from (its search before the first step; its
        step-downs after an out-of-memory error)."""
        doc = {"profile": self.profile_name, **self.cfg.to_dict()}
        if self.profile_values is not None:
            doc["profile_values"] = self.profile_values
        if self.searched is not None:
            doc["auto_fit_search"] = self.searched
        if self.fits:
            doc["auto_fit_changes"] = self.fits
        # a path's é as é, not "\xE9" (the file is UTF-8), and a long path on its line, not folded onto the next
        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=2**16)

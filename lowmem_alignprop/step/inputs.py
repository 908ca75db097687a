"""Bad input, found before any model loads or anything is written: one line naming the fix (a UserError).

Training and ``sample`` call :func:`prepare_inputs` first; the planner checks the reward spec the same way.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError


def prepare_inputs(cfg: Config, prompts: list[str] | None = None) -> list[str]:
    """Everything that can fail on bad input, before any model is loaded or anything is written. ``cfg`` is
    validated where it was built (profiles.resolve_config, or ``Config(...).validate()``): not again here. Returns
    the prompts: ``prompts`` when given (``sample --prompt``), else ``cfg.prompts``'s."""
    from lowmem_alignprop.models.loading import resolve_model
    from lowmem_alignprop.step.prompts import load_prompts
    from lowmem_alignprop.rewards import check_reward_spec

    cfg.check_installed()
    prompts = list(prompts) if prompts else load_prompts(cfg.prompts)
    # unknown, unimportable or broken; a model reward's weight file missing (not after minutes of model loading)
    check_reward_spec(cfg.reward, resolution=cfg.resolution, prompts=prompts, weights=cfg.reward_weights)
    resolve_model(cfg.model)  # missing paths fail here
    check_tracker(cfg.report_to)
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file: choose a directory")
    check_writable(out)
    return prompts


def check_tracker(report_to: str) -> None:
    """--report-to needs its package: without it accelerate would drop the tracker with a warning only."""
    import importlib.util

    needs = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(report_to, ())
    if needs and not any(importlib.util.find_spec(n) for n in needs):
        raise UserError(f"--report-to {report_to} needs the {needs[0]} package, which is not installed: "
                        f"pip install -e \".[{report_to}]\" (or pip install {needs[0]}), or leave --report-to out")


def check_writable(out: Path) -> None:
    """The output dir (or the nearest folder that exists above it) must accept files; nothing is left behind."""
    probe = out.expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"--output-dir {out} cannot be created: {probe} is a file, not a folder; choose another "
                        "--output-dir")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UserError(f"--output-dir {out} is not writable ({e.strerror or e}): choose a folder you can write "
                        "to with --output-dir") from None


def split_eval_prompts(cfg: Config, prompts: list[str]) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts). With eval_every: the eval_prompts set or file, or else eval_holdout of
    the training prompts, chosen with the seed and removed from training (never trained on). Without: (prompts, [])."""
    import random

    from lowmem_alignprop.step.prompts import load_prompts

    if not cfg.eval_every:
        return prompts, []
    if cfg.eval_prompts:  # a prompt that also trains is not held out: left out of the evaluation
        trained = set(prompts)
        given = load_prompts(cfg.eval_prompts)
        held = [p for p in given if p not in trained]
        if not held:
            raise UserError(f"eval_prompts={cfg.eval_prompts}: every one of its {len(given)} prompts is also a "
                            "training prompt, so none is held out: give prompts the run does not train on")
        if len(held) < len(given):
            logging.getLogger("lowmem_alignprop").info(
                "eval_prompts=%s: %d of its %d prompts also train and are left out of the evaluation",
                cfg.eval_prompts, len(given) - len(held), len(given))
        return prompts, held
    distinct = sorted(set(prompts))
    if len(distinct) <= cfg.eval_holdout:
        raise UserError(f"eval_every holds out eval_holdout={cfg.eval_holdout} of the {len(distinct)} distinct "
                        "training prompts, which leaves none to train on: give held-out prompts with --set "
                        "eval_prompts=FILE, or lower --set eval_holdout")
    held = set(random.Random(cfg.seed).sample(distinct, cfg.eval_holdout))
    return [p for p in prompts if p not in held], sorted(held)

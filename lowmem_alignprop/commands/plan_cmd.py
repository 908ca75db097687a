"""``lowmem-alignprop plan``: the checks training would make, then the planner's table (or ``--fastest``'s search),
printed as text or JSON. The command line (:func:`lowmem_alignprop.cli.cmd_plan`) parses and builds the config."""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import sys
import warnings

from lowmem_alignprop.measure.planner import PLAN_LIBRARIES, plan
from lowmem_alignprop.measure.provenance import provenance
from lowmem_alignprop.measure.reports import format_fastest, format_plan
from lowmem_alignprop.rewards import check_reward_spec
from lowmem_alignprop.step.inputs import check_judged, check_tracker, split_eval_prompts
from lowmem_alignprop.step.prompts import configured_prompts

logger = logging.getLogger("lowmem_alignprop")


def plan_main(cfg, profile: str, argv: list[str], *, as_json: bool = False, **options) -> int:
    """Plan ``cfg`` (profile ``profile``; ``argv``: plan's arguments as typed, for the JSON's provenance) and print
    it (``options``: :func:`_plan_main`'s); returns the exit status (130: a Ctrl-C ended the search for a change
    after the plan so far was printed). With ``as_json`` the JSON is alone on stdout: what user code prints (a
    reward's import or calls: the start-up test, the plan's step) goes to stderr; it made the JSON unreadable."""
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        return _plan_main(cfg, profile, argv, as_json=as_json, out=out, **options)


def _plan_main(cfg, profile: str, argv: list[str], *, started: float, as_json: bool, out, target: str | None = None,
               suggest_changes: bool = True, fastest: bool = False, allow_task_changes: bool = False,
               max_estimates: int | None = None, jobs: int | None = None, auto_found_no_gpu: bool = False) -> int:
    """:func:`plan_main`, printing to ``out`` (``auto_found_no_gpu``: --profile auto picked cpu, said on the plan's
    last line)."""
    typed = " ".join(["lowmem-alignprop", "plan", *map(shlex.quote, argv)])  # (in the JSON's provenance)
    check_tracker(cfg.report_to)  # what train would refuse, plan refuses too (a tracker without its package)
    prompts = configured_prompts(cfg)
    # a user reward that fails, returns NaN or loses the gradient is named here, as train would
    check_reward_spec(cfg.reward, resolution=cfg.shapes, prompts=prompts)
    held = split_eval_prompts(cfg, prompts)[1]  # the held-out prompts train refuses (none left to train on, ...)
    if cfg.best_by == "fidelity":
        check_judged(held)  # (train's check: plan said FITS for a run train refuses)
    if cfg.init_lora:  # its rank, layers and model, as train checks it (its adapter costs what a fresh one does)
        from lowmem_alignprop.lora.init_lora import (check_fits_meta_model, check_init_lora,  # (2 s of imports)
                                                         other_sampler)
        from lowmem_alignprop.models.loading import check_before_load
        file = check_init_lora(cfg.init_lora, cfg.lora_rank, cfg.model, cfg.model_components, cfg.lora_layers,
                               cfg.base_quant)
        sampler = check_before_load(cfg)  # (the model's files first: what the LoRA is fitted onto is what plan plans)
        taken = check_fits_meta_model(cfg, file)  # its shapes onto the model's, as training fits it after loading
        if sampler is not None and (other := other_sampler(cfg.init_lora, file, sampler, cfg.eta)):
            logger.warning("%s", other)  # (training's warning; a hub id's sampler is told only as it loads)
    if cfg.auto_fit and not fastest:  # (--set auto_fit=true, or a run's config.yaml: planned as given, unsaid)
        logger.warning("auto_fit=true searches before train's first step: this plan is of the configuration as "
                       "given; plan --fastest prints the configuration the search would train")
    logger.setLevel(logging.WARNING)
    log = None if as_json else (lambda line: print(line, file=sys.stderr, flush=True))
    if cfg.init_lora and log is not None:  # what was checked (rank, layers), as training says it starts
        log(taken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter from the libraries' config loaders
        if fastest:
            from lowmem_alignprop.measure.fastest import fastest as search  # (plan without --fastest need not load it)
            result = search(cfg, profile=profile, target=target, allow_task_changes=allow_task_changes, log=log,
                            jobs=jobs, **({"max_estimates": max_estimates} if max_estimates else {}))
            # nested: the search's own "device" is the card it timed for, this one the machine that searched
            result["provenance"] = provenance(typed, PLAN_LIBRARIES)
            result["plan"]["auto_found_no_gpu"] = auto_found_no_gpu
            print(json.dumps(result, indent=1, default=str) if as_json else format_fastest(result), file=out)
            return 0
        result = plan(cfg, profile=profile, target=target, suggest_changes=suggest_changes, log=log,
                      started=started, command=typed, interruptible=True)
    result["auto_found_no_gpu"] = auto_found_no_gpu
    print(json.dumps(result, indent=1, default=str) if as_json else format_plan(result), file=out)
    return 130 if result.get("suggestion_interrupted") else 0  # (the plan so far printed, then as a Ctrl-C ends)

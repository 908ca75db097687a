"""Memory benchmark: planner estimates for SD1.5 / SD2.1 / SDXL, and measured CPU figures on a mid-size model.

    python benchmarks/memory_bench.py                # everything (the SDXL estimates make it ~15-25 min on 2 cores)
    python benchmarks/memory_bench.py --quick --out /tmp/mb   # smoke test: a few rows of each section (~2 min)
    python benchmarks/memory_bench.py --report-only  # rebuild REPORT.md from results/*.json (e.g. after gpu_check)
    python benchmarks/memory_bench.py --only ladder,cpu   # some sections (the others come from the latest results)

Writes ``<out>/results/<device>-<date>.json`` (``-quick`` added for --quick) and regenerates ``<out>/REPORT.md``
(``<out>`` defaults to ``benchmarks/``) with:

1. SD1.5 at 512 px, "each option added in turn": the planner's per-stage estimates (labelled as estimates)
   from no optimization to the full ``rtx3060`` profile, with the measured GPU figures beside them where a
   ``results/gpu-*.json`` has the same row;
2. "what fits" per GPU profile for sd15, sd21 and sdxl: the resolution, the largest batch per micro-step and
   the K range that fit the profile's budget (planner estimates);
3. measured CPU figures on a mid-size SD-shaped model (UNet channels 64/128/256): peak allocation and
   seconds per step with each memory feature off and on, the planner's estimate beside each.

Measured GPU figures are read from ``results/gpu-*.json``, which ``benchmarks/gpu_check.sh`` writes. The shape
read (extra keys are ignored; see :func:`gpu_runs`)::

    {"kind": "gpu_check", "date": "YYYY-MM-DD", "command": "...",
     "device": {"name": "NVIDIA H100 80GB HBM3", "total_gb": 79.2},
     "versions": {"torch": "...", ...},
     "ladder":   [RUN, ...],      # rows named "ladder <label>" with the labels of LADDER below
     "profiles": [RUN, ...]}
    RUN = {"name": str, "command": str, "status": "ok" | "oom" | "error" | "skipped ...",
           "budget_gb": float,                      # the cap (set_per_process_memory_fraction); 0 = none
           "profile": str, "model": str,            # optional
           # per-stage measured peaks, bytes, either flat ...
           "stages": {stage: {"peak_allocated": int, "peak_reserved": int}}, "seconds_per_step": float,
           # ... or as the trainer writes them (memory_report.json and summary.json of the run):
           "memory_report": {"stages": {stage: {"peak_allocated": int, "peak_reserved": int, ...}},
                             "peak_allocated": int, "peak_reserved": int, "peak_stage": str},
           "summary": {"seconds_per_step": float},
           "planner": {...}}                        # optional: `plan --json` for the same arguments

A run with status "oom" did not fit its cap. Ratios in the report are measured / estimated.

Prose written by hand into REPORT.md (section 6's notes, the CPU time calibration, the TRL comparison) sits between
``<!-- hand-written: NAME ... -->`` and ``<!-- end hand-written: NAME -->``: a rebuild copies each such block from
the report it replaces (:func:`kept_blocks`), so edit those in REPORT.md and the rest here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the mid-size model builder lives with the tests

GIB = 2**30
MIB = 2**20

# Section 1, the rows of gpu_check.py's ladder (same labels, so measured rows line up): SD1.5 512 px, batch 1,
# aesthetic reward (CLIP ViT-L/14), K = 1 of 10 steps (memory is flat in K), features switched on in turn.
LADDER_BASE = {"profile": "rtx3060", "model": "sd15", "reward": "aesthetic",
               "set": {"truncation": "fixed", "k": 1, "sample_steps": 10, "grad_accum": 1}}
LADDER = [
    ("fp32 frozen weights, per-call checkpoint only (no optimization)",
     {"mixed_precision": "no", "unet_checkpointing": "call", "vae_checkpointing": "none", "reward_checkpointing": False,
      "cache_prompt_embeddings": False, "offload_frozen": False, "sliced_decode": False,
      "expandable_segments": False}),
    ("fp16, per-call checkpoint only", {"mixed_precision": "fp16"}),
    ("+ VAE checkpointing (up-blocks)", {"vae_checkpointing": "blocks"}),
    ("+ UNet block checkpointing", {"unet_checkpointing": "blocks"}),
    ("+ reward checkpointing, cached prompts", {"reward_checkpointing": True, "cache_prompt_embeddings": True}),
    ("+ offload frozen modules", {"offload_frozen": True, "sliced_decode": True}),
    ("+ VAE checkpointing per resnet", {"vae_checkpointing": "resnets"}),
    ("+ expandable allocator segments (= rtx3060)", {"expandable_segments": True}),
]

# Section 2
FIT_PROFILES = ("rtx3060", "rtx4090", "a100-40gb", "a100-80gb")
FIT_MODELS = {"sd15": (512,), "sd21": (768, 512), "sdxl": (1024, 768, 512)}
MAX_BATCH = 64

# Section 3: the mid-size model on the CPU; each feature switched on alone from the baseline.
CPU_BASE = {"resolution": 128, "batch_size": 2, "sample_steps": 4, "truncation": "fixed", "k": 2,
            "mixed_precision": "no", "prompts": "simple_animals", "guidance_scale": 7.5}
CPU_FEATURES = [
    ("vae_checkpointing", "blocks", {}),
    ("vae_checkpointing", "resnets", {}),
    ("unet_checkpointing", "blocks", {}),
    ("reward_checkpointing", True, {}),
    ("sliced_decode", True, {}),
    ("cache_prompt_embeddings", True, {}),
    ("attention", "sliced", {}),
    ("activation_offload", True, {"vae_checkpointing": "blocks"}),  # needs checkpointing; CPU: nowhere to go
    ("offload_frozen", True, {}),  # CPU: host memory is all there is
]


def device_info() -> dict:
    import torch

    from lowmem_alignprop.measure.provenance import cpu_name

    return {"type": "cpu", "name": cpu_name(), "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available()}


def _cfg(profile: str, model: str, reward: str, changes: dict):
    from lowmem_alignprop.settings.config import build_config
    from lowmem_alignprop.settings.profiles import load_profile

    _, values = load_profile(profile)
    return build_config(values, {"model": model, "reward": reward}, changes)


def _est_row(est, cfg) -> dict:
    return {"stages": est.stages, "peak_allocated": est.peak_allocated, "peak_stage": est.peak_stage,
            "peak_reserved": est.peak_needed, "fits": est.fits(cfg.budget_gb), "budget_gb": cfg.budget_gb,
            "seconds": round(est.seconds, 1), "notes": est.notes}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# the three sections
# ---------------------------------------------------------------------------------------------------
def run_ladder(quick: bool) -> dict:
    from lowmem_alignprop.measure import planner

    rows, changes = [], dict(LADDER_BASE["set"])
    ladder = LADDER[:2] if quick else LADDER
    for label, change in ladder:
        changes.update(change)
        cfg = _cfg(LADDER_BASE["profile"], LADDER_BASE["model"], LADDER_BASE["reward"], changes)
        est = planner.estimate(cfg, target="cuda")
        rows.append({"label": label, "set": dict(changes), **_est_row(est, cfg)})
        _log(f"ladder {label}: {est.peak_allocated / GIB:.2f} GiB in {est.peak_stage} ({est.seconds:.0f} s)")
    # what CUDA autocast's fp32 norms/upsampling cost: the same steps with the frozen modules purely in fp16
    autocast_cost = []
    for r in rows[1:] if not quick else rows[1:2]:
        cfg = _cfg(LADDER_BASE["profile"], LADDER_BASE["model"], LADDER_BASE["reward"], r["set"])
        est = planner.estimate(cfg, target="cuda", emulate_autocast=False)
        autocast_cost.append({"label": r["label"], "with_autocast": r["peak_allocated"],
                              "without_autocast": est.peak_allocated, "stage_without": est.peak_stage,
                              "stages_without": {k: v["allocated"] for k, v in est.stages.items()}})
        _log(f"  without autocast: {est.peak_allocated / GIB:.2f} GiB in {est.peak_stage}")
    return {"setup": LADDER_BASE, "command": _command(LADDER_BASE, changes), "rows": rows,
            "autocast_cost": autocast_cost}


def _command(base: dict, changes: dict) -> str:
    sets = " ".join(f"--set {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items())
    return f"lowmem-alignprop plan --profile {base['profile']} --model {base['model']} --reward {base['reward']} {sets}"


def what_fits(profile: str, model: str, resolutions: tuple[int, ...], reward: str, max_estimates: int) -> dict:
    """The largest resolution (of ``resolutions``) where batch 1 fits, then the largest batch there: the needed
    memory is nearly linear in the batch, so batch 2 gives the slope, and the predicted largest batch is checked
    (and stepped down while it does not fit)."""
    from lowmem_alignprop.measure import planner

    tried = []

    def need(res: int, batch: int):
        cfg = _cfg(profile, model, reward, {"resolution": res, "batch_size": batch})
        est = planner.estimate(cfg, target="cuda")
        tried.append({"resolution": res, "batch_size": batch, "peak_reserved": est.peak_needed,
                      "peak_allocated": est.peak_allocated, "peak_stage": est.peak_stage,
                      "fits": bool(est.fits(cfg.budget_gb)), "seconds": round(est.seconds, 1)})
        _log(f"  {profile} {model} {res}px batch {batch}: {est.peak_needed / GIB:.2f} GiB needed "
             f"({'fits' if tried[-1]['fits'] else 'no'}, {est.seconds:.0f} s)")
        return cfg, est

    out = {"profile": profile, "model": model, "reward": reward, "resolution": None, "batch_size": 0}
    for res in resolutions:
        cfg, est1 = need(res, 1)
        out["budget_gb"] = cfg.budget_gb
        out["k_range"] = list(cfg.window_bounds())
        if not est1.fits(cfg.budget_gb):
            continue
        budget = cfg.budget_gb * GIB
        best, best_est = 1, est1
        _, est2 = need(res, 2)
        if est2.fits(cfg.budget_gb):
            best, best_est = 2, est2
            slope = max(est2.peak_needed - est1.peak_needed, 1)
            guess = min(MAX_BATCH, 1 + int((budget - est1.peak_needed) // slope))
            while guess > best and len(tried) < max_estimates:
                _, est = need(res, guess)
                if est.fits(cfg.budget_gb):
                    best, best_est = guess, est
                    guess = guess + 1 if guess < MAX_BATCH else guess  # the next batch up must not fit
                    continue
                slope = max((est.peak_needed - est1.peak_needed) / (guess - 1), 1)
                guess = max(best, min(guess - 1, 1 + int((budget - est1.peak_needed) // slope)))
        out.update(resolution=res, batch_size=best, peak_reserved=best_est.peak_needed,
                   peak_stage=best_est.peak_stage, batch1_reserved=est1.peak_needed,
                   per_image=(est2.peak_needed - est1.peak_needed), per_k_bytes=est1.per_k_bytes,
                   capped=best == MAX_BATCH)
        break
    out["tried"] = tried
    return out


def run_what_fits(quick: bool) -> dict:
    cells = []
    profiles = FIT_PROFILES[:1] if quick else FIT_PROFILES
    models = {"sd15": FIT_MODELS["sd15"]} if quick else FIT_MODELS
    for profile in profiles:
        for model, resolutions in models.items():
            cells.append(what_fits(profile, model, resolutions, "aesthetic", max_estimates=3 if quick else 6))
    return {"reward": "aesthetic", "note": "each profile's own settings (features, K range, sample steps); "
                                           "resolution tried from the model's native size down", "cells": cells}


def run_cpu_measured(quick: bool, workdir: Path) -> dict:
    from midsize import build_clip_reward_dir, build_midsize_dir

    from lowmem_alignprop.measure import planner, shared_step
    from lowmem_alignprop.settings.config import Config

    model = build_midsize_dir(workdir / "midsize")
    clip = build_clip_reward_dir(workdir / "clip")
    base = Config(model=str(model), reward="clip", reward_weights=str(clip), **CPU_BASE).validate()
    features = CPU_FEATURES[:2] if quick else CPU_FEATURES
    timed = 1 if quick else 2

    def one(cfg) -> dict:
        m = shared_step.measure_cpu_step(cfg, timed_steps=timed)
        e = planner.estimate(cfg, target="cpu")
        return {"measured": {"stages": m["stages"], "peak_allocated": m["peak_allocated"],
                             "peak_stage": m["peak_stage"], "seconds_per_step": m.get("seconds_per_step"),
                             "step_start": m["baseline"]},
                "estimate": {"stages": {k: v["allocated"] for k, v in e.stages.items()},
                             "peak_allocated": e.peak_allocated, "peak_stage": e.peak_stage}}

    rows = [{"feature": "baseline (all off)", "value": None, **one(base)}]
    _log(f"cpu baseline: {rows[0]['measured']['peak_allocated'] / MIB:.1f} MiB, "
         f"{rows[0]['measured']['seconds_per_step']:.2f} s/step")
    for name, value, extra in features:
        cfg = dataclasses.replace(base, **{name: value, **extra}).validate()
        row = {"feature": name, "value": value, "with": extra, **one(cfg)}
        if extra:  # its reference is the baseline with the prerequisite on
            row["reference"] = one(dataclasses.replace(base, **extra).validate())["measured"]
        rows.append(row)
        _log(f"cpu {name}={value}: {row['measured']['peak_allocated'] / MIB:.1f} MiB, "
             f"{row['measured']['seconds_per_step']:.2f} s/step")
    return {"model": "mid-size SD-shaped (tests/midsize.py): UNet (64, 128, 256), VAE (32, 64, 128, 128), "
                     "CLIP text width 64; reward: a 4-layer CLIP ViT (width 128, 224 px)",
            "config": {k: v for k, v in base.to_dict().items() if k in CPU_BASE or k in ("reward",)},
            "timed_steps": timed, "rows": rows}


# ---------------------------------------------------------------------------------------------------
# GPU results (gpu_check.sh)
# ---------------------------------------------------------------------------------------------------
def gpu_runs(doc: dict) -> list[dict]:
    """Normalise one gpu-*.json into runs: name, section, status, stages {stage: (allocated, reserved)},
    peak_allocated, peak_reserved, peak_stage, seconds_per_step, budget_gb, planner (or None)."""
    out = []
    for section in ("ladder", "profiles"):
        for r in doc.get(section) or []:
            rep = r.get("memory_report") or {}
            raw = r.get("stages") or rep.get("stages") or {}
            st = {k: (v.get("peak_allocated"), v.get("peak_reserved")) for k, v in raw.items() if isinstance(v, dict)}
            alloc = r.get("peak_allocated", rep.get("peak_allocated"))
            if alloc is None and st:
                alloc = max((a for a, _ in st.values() if a is not None), default=None)
            reserved = r.get("peak_reserved", rep.get("peak_reserved"))
            if reserved is None and st:
                reserved = max((b for _, b in st.values() if b is not None), default=None)
            summary = r.get("summary") or {}
            sps = r.get("seconds_per_step") or summary.get("seconds_per_step")
            if summary.get("steps_done") and len(summary.get("skipped_steps") or ()) >= summary["steps_done"]:
                sps = None  # every step skipped (a non-finite gradient): no step was timed
            allocator = summary.get("cuda_allocator") or ("fixed segments" if summary else None)  # (before the field)
            status = r.get("status") or ("oom" if r.get("oom") else "ok" if r.get("fits", True) else "oom")
            out.append({"name": r.get("name", "?"), "section": section, "status": status, "stages": st,
                        "peak_allocated": alloc, "peak_reserved": reserved,
                        "peak_stage": r.get("peak_stage", rep.get("peak_stage")), "seconds_per_step": sps,
                        "budget_gb": r.get("budget_gb"), "command": r.get("command", ""),
                        "allocator": allocator, "k": [m.get("k") for m in r.get("metrics") or []],
                        "concurrent_runs": r.get("concurrent_runs"),
                        "planner": r.get("planner") if isinstance(r.get("planner"), dict)
                        and "stages" in r.get("planner") else None})
    return out


def carry_sections(doc: dict, previous: dict | None) -> None:
    """The sections ``doc`` did not rerun, from the latest file, each with the provenance of the run that measured it
    (that file may be the one ``doc`` is written over: same device and date)."""
    for key in ("ladder", "what_fits", "cpu_measured"):
        if key not in doc and previous and key in previous:
            doc[key] = previous[key]
            doc.setdefault("carried", {})[key] = (previous.get("carried") or {}).get(key) or {
                k: previous.get(k) for k in ("file", "date", "command", "device", "versions")}


def load_results(results: Path) -> tuple[dict | None, list[tuple[Path, dict]]]:
    # this benchmark's own files are cpu-DATE[-quick].json (cpu-time-calibration.json is calibrate_cpu.py's)
    ours = sorted(p for p in results.glob("cpu-*.json") if re.fullmatch(r"cpu-\d{4}-\d{2}-\d{2}(-quick)?", p.stem))
    cpu = [p for p in ours if not p.stem.endswith("-quick")]
    quick = [p for p in ours if p.stem.endswith("-quick")]
    latest = cpu[-1] if cpu else (quick[-1] if quick else None)
    gpu = []
    for p in sorted(results.glob("gpu-*.json")):
        if p.stem.startswith("gpu-cpu-smoke"):  # gpu_check.py --cpu-smoke: the plumbing on a CPU, no GPU figure
            continue
        try:
            gpu.append((p, json.loads(p.read_text())))
        except (OSError, ValueError) as e:
            _log(f"skipping {p}: {e}")
    return (json.loads(latest.read_text()) if latest else None), gpu


# ---------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------
def _g(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _m(n) -> str:
    return "-" if n is None else f"{n / MIB:.1f}"


def _s(seconds) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def _ratio(a, b) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


# Hand-written blocks of REPORT.md sit between these markers; a rebuild carries each over from the report it replaces
KEPT_START = "<!-- hand-written: {} (memory_bench.py --report-only keeps it; edit it in REPORT.md) -->"
KEPT_END = "<!-- end hand-written: {} -->"


def kept_blocks(text: str) -> dict[str, list[str]]:
    """The hand-written blocks of a report, by name: the lines between each block's two markers."""
    blocks, name, lines = {}, None, []
    for line in text.splitlines():
        if name is None:
            m = re.fullmatch(re.escape(KEPT_START).replace(r"\{\}", "(.+?)"), line)
            if m:
                name, lines = m.group(1), []
        elif line == KEPT_END.format(name):
            blocks[name], name = lines, None
        else:
            lines.append(line)
    return blocks


def _kept(name: str, kept: dict[str, list[str]], default: list[str]) -> list[str]:
    """The block ``name`` between its markers: as the previous report held it, else ``default``."""
    return [KEPT_START.format(name), *kept.get(name, default), KEPT_END.format(name)]


def report(doc: dict | None, gpu: list[tuple[Path, dict]], results_dir: Path, previous: str = "") -> str:
    """REPORT.md from the results files; ``previous`` (the report it replaces) gives the hand-written blocks."""
    from lowmem_alignprop.memory import allowances
    from lowmem_alignprop.memory.stages import STAGES

    L = ["# Memory benchmark report", "",
         "Generated by `benchmarks/memory_bench.py` (rebuild with `python benchmarks/memory_bench.py --report-only`; "
         "the blocks between `hand-written` markers are edited here and kept by a rebuild).",
         "**Estimates** come from the planner (`lowmem-alignprop plan`: fake tensors, no GPU, no weights). "
         "**Measured** figures are real runs: CPU allocation from torch.profiler memory events in section 3 (the trainer's "
         "own CPU measurement now counts live storages instead: section 5), "
         "CUDA `max_memory_allocated/reserved` from `benchmarks/gpu_check.sh` where a GPU was available.", ""]
    if doc is None:
        L += ["No CPU/planner results yet: run `python benchmarks/memory_bench.py`.", ""]
    else:
        dev, ver = doc["device"], doc["versions"]
        L += [f"- planner/CPU results: `{results_dir.name}/{doc['file']}` ({doc['date']}"
              + (", QUICK smoke run" if doc.get("quick") else "") + f"), command `{doc['command']}`"
              + (" (the sections it did not rerun come from the previous full run)" if doc.get("carried_from") else "")
              + "".join(f"; {key} from the run of {c.get('date')}, command `{c.get('command')}`"
                        for key, c in (doc.get("carried") or {}).items()),
              f"- device: {dev['name']} ({dev['logical_cores']} logical cores, torch threads {dev['torch_threads']}); "
              + ", ".join(f"{k} {v}" for k, v in ver.items() if v), ""]
        L += _summary(doc, gpu)
        L += ["Allowances the planner adds for a CUDA target (what fake tensors cannot see):", ""]
        L += [f"- {k}: {v}" for k, v in allowances.ALLOWANCES.items()]
        L += ["- **needed** = allocated x reserved factor + workspaces: what must fit the profile's budget", ""]
        L += _section_ladder(doc.get("ladder"), gpu, STAGES)
        L += _section_fits(doc.get("what_fits"))
        L += _section_cpu(doc.get("cpu_measured"), STAGES)
    L += _section_gpu(gpu, STAGES)
    L += _section_rss(results_dir)
    L += _section_speed(results_dir, kept_blocks(previous))
    L += _section_toy(results_dir)
    flow = section_flow_plans(results_dir)
    # each section opens with its own blank line; the toy section (as toy_experiments.py splices it) ends with one
    L += flow[1:] if flow and L and not L[-1] and not flow[0] else flow
    return "\n".join(L) + "\n"


def _section_toy(results_dir: Path) -> list[str]:
    """Section 7: the paper's experiments on the toy world, as benchmarks/toy_experiments.py renders them from
    results/toy/toy_experiments.json (that script writes the section itself when it runs; this keeps it on a rebuild)."""
    import importlib.util

    path = Path(__file__).resolve().parent / "toy_experiments.py"
    spec = importlib.util.spec_from_file_location("toy_experiments", path)
    toy = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("toy_experiments", toy)  # its dataclasses look their module up there
    spec.loader.exec_module(toy)
    return toy.report_section(toy.load_doc(results_dir / "toy" / "toy_experiments.json"))


def section_flow_plans(results_dir: Path) -> list[str]:
    """Section 8: SD3.5 and FLUX.1 at full size under their profiles (issue 18), planner estimates from
    results/plan-*.json (the `plan --json` output plus the command, date, CPU time and the issue's target)."""
    # flow_plans.py's rows (they name the target); other plans kept in results/ (plan --fastest's choice) are not
    files = [p for p in sorted(results_dir.glob("plan-*.json")) if "issue_target" in json.loads(p.read_text())]
    if not files:
        return []
    L = ["", "## 8. SD3.5 and FLUX.1 at 1024 px under their profiles (planner ESTIMATES, issue 18)", "",
         "Each row is `lowmem-alignprop plan --profile P --model M --reward aesthetic --json` (random-weight "
         "architectures built on meta from the shipped configs; CLIP ViT-L/14 aesthetic reward; batch 1, K planned at "
         "k_max=5 of 28 Euler steps; text encoders on the CPU) on a CPU, `results/plan-*.json`. Seconds per step are "
         "the planner's time model on the profile's card (measure/devices.py: the 8 GB profiles, rtx3060-flux and "
         "rtx3060-sd35m, on the 8 GB card's 240 GB/s, `rtx3060-8gb`; the 12 GB ones on its 360 GB/s, `rtx3060`), at "
         "the mean K=3; an optimizer step is `grad_accum` (4) micro-steps. Measured on an H200 under the profiles' "
         "caps where section 4 has a row; `benchmarks/gpu_check.sh` has a row for each. Host GiB is what the models and "
         "the prompt cache hold in CPU memory (`plan`'s `host_memory`: the most while loading, and during the steps), "
         "not the process itself (Python, torch, the CUDA libraries).", "",
         "| profile | model | base_quant | block_swap | budget GiB | issue's target | allocated GiB (stage) | needed GiB "
         "| fits | pinned host GiB | host GiB: load / steps | s / micro-step | s / optimizer step | plan CPU s |",
         "|---|---|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    notes = []
    for path in files:
        r = json.loads(path.read_text())
        c, t = r["config"], r.get("time") or {}
        target = r["issue_target"]
        over = r["peak_needed"] - r["budget_bytes"]
        over_text = f"{over / GIB:.2f} GiB" if over >= 0.01 * GIB else f"{over / MIB:.1f} MiB"
        fits = "yes" if r["fits"] else f"**no, by {over_text}**"
        secs = [f"{t[key]:.0f}" if t.get(key) else "-" for key in ("micro_step", "optimizer_step")]
        host = r.get("host_memory") or {}  # what the models hold in host memory (plan's host_memory; not the process)
        host = f"{host['load'] / GIB:.2f} / {host['steps'] / GIB:.2f}" if host else "-"
        L.append(f"| {r['profile']} | {r['model']} | {c['base_quant']} | {c['block_swap']} | {r['budget_gb']} | "
                 f"{target} | {r['peak_allocated'] / GIB:.2f} ({r['peak_stage']}) | {r['peak_needed'] / GIB:.2f} | "
                 f"{fits} | {r.get('host_pinned', 0) / GIB:.2f} | {host} | {secs[0]} | {secs[1]} | "
                 f"{r.get('cpu_user_seconds', 0):.0f} |")
        if not r["fits"] and r.get("suggestion"):
            sug = r["suggestion"]
            swapped = f", block_swap={c['block_swap']}" if c["block_swap"] else ""
            notes.append(f"- {r['profile']} with {c['base_quant']}{swapped}: the planner's cheapest change that fits is "
                         f"{sug['change']} (`" + " ".join(f"--set {k}={v}" for k, v in sug["set"].items())
                         + f"`): {sug['peak_needed'] / GIB:.2f} GiB needed.")
    plans = [json.loads(p.read_text()) for p in files]
    by = {(r["profile"], r["config"]["base_quant"], r["config"]["block_swap"]): r for r in plans}
    for (profile, mode, swap), r in by.items():
        int8 = by.get((profile, "int8", swap))  # fp8 against int8 with the same blocks swapped
        if mode == "fp8" and int8:
            notes.append(f"- {profile}: fp8 storage needs {(r['peak_needed'] - int8['peak_needed']) / GIB:+.2f} GiB "
                         f"against int8 ({r['peak_needed'] / GIB:.2f} vs {int8['peak_needed'] / GIB:.2f}): diffusers' "
                         "layerwise casting keeps the norms' modulation layers in bf16, and the planner adds one "
                         "block's upcast layers. The time model counts fp8's upcast as int8's dequantization (the "
                         "same bytes), so their seconds differ by little here; the GPU rows decide.")
    for r in plans:  # block swap: its host memory and PCIe traffic (a quantized base swaps at its stored size)
        c, t = r["config"], r.get("time") or {}
        pcie = (t.get("work_per_micro_step") or {}).get("pcie_bytes", 0)
        gbs = (t.get("device_figures") or {}).get("pcie_gbs")
        if c["block_swap"] and r.get("host_pinned") and gbs:
            notes.append(f"- {r['profile']} with base_quant={c['base_quant']}, block_swap={c['block_swap']}: "
                         f"{r['host_pinned'] / GIB:.1f} GiB of frozen blocks in pinned host memory (as stored), "
                         f"{pcie / 1e9:.0f} GB over PCIe per micro-step: {pcie / 1e9 / gbs:.0f} s at {gbs} GB/s, "
                         + _swap_time_words(t))
    L += [""] + notes + ([""] if notes else [])
    # rows rerun later carry their own date, machine and versions: each distinct one is named
    dates = " and ".join(sorted({r.get("date", "?") for r in plans}))
    hosts = " / ".join(sorted({r.get("host", "a CPU") for r in plans}))
    versions = " / ".join(sorted({", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items()) for r in plans}))
    L += [f"Planned {dates} on {hosts} (the CPU seconds are user time; each command says how it ran); {versions}. "
          "Commands: " + "; ".join(f"`{r.get('command', '?')}`" for r in plans) + "."]
    return L


def _swap_time_words(t: dict) -> str:
    """What a plan's seconds count of block swap's copies (older plans counted them all, serially)."""
    copies = t.get("block_swap_copies")
    if copies is None:
        return "counted in full in the seconds (the time model did not yet overlap the copies with compute)."
    return (f"of which {copies['beyond_compute']:.1f} s are beyond the compute they overlap (each copy runs beside "
            "the compute of the block before it): that is what the seconds count.")


def _section_speed(results_dir: Path, kept: dict[str, list[str]]) -> list[str]:
    """Section 6: the planner's seconds per step against measured steps (time-calibration.json), the CPU speed
    benchmark (speed-cpu.json), and the hand-written notes, the CPU time calibration and the TRL comparison (``kept``:
    the previous report's blocks)."""
    cal_path, bench_path = results_dir / "time-calibration.json", results_dir / "speed-cpu.json"
    cpu_cal = results_dir / "cpu-time-calibration.json"
    trl = sorted(results_dir.glob("trl-compare-cpu*.json"))
    if not (cal_path.exists() or bench_path.exists() or cpu_cal.exists() or trl):
        return []
    L = ["", "## 6. Seconds per step: the planner's estimate against measured steps", ""]
    if cal_path.exists():
        cal = json.loads(cal_path.read_text())
        L += [f"`results/{cal_path.name}`, command `{cal['command']}` ({cal['date']}): every completed GPU run of "
              "section 4 planned again with the K its measured step drew; its counted work (`counters.StageWork`) "
              "turned into seconds with the card's figures (`lowmem_alignprop/measure/devices.py`). Measured: the "
              "step-2 seconds of the stages below (the profiler synchronizes the GPU at each stage's edges). The "
              "factors were fitted to the runs alone on the GPU (in-sample); runs that shared the GPU are "
              "slower than one alone by up to their number, so they can only show that the estimate is not above them.",
              "", f"**Runs alone: measured / predicted {cal['alone']['min']:.2f} to {cal['alone']['max']:.2f} "
              f"({cal['alone']['n']} runs, fitted to them). Runs sharing the GPU: {cal['shared']['min']:.2f} to "
              f"{cal['shared']['max']:.2f} ({cal['shared']['n']} runs).**", ""]
        L += _kept("time-calibration-note", kept, []) + ["",
              "| card | run | runs at once | measured s | predicted s | measured / predicted | per stage, measured / predicted s |",
              "|---|---|---:|---:|---:|---:|---|"]
        for r in cal["runs"]:
            per = ", ".join(f"{n} {r['measured'].get(n, 0):.2f} / {t:.2f}" for n, t in r["predicted"].items())
            L.append(f"| {r['card']} | {r['name']} | {r['concurrent_runs'] or 1} | {r['measured_stages_sum']:.2f} | "
                     f"{r['predicted_step']:.2f} | {r['measured_over_predicted']:.2f} | {per} |")
        L += ["", "What this does not show: cards other than the H100/H200 (their figures are the calibration "
              "carried over by datasheet peaks), the host time per op of another machine (it paces small batches: "
              "one batch-1 run alone measured it, on the H200 machine's CPU), models other than SD1.5 alone on a "
              "GPU, and the speed features (not modelled; `gpu_check.py --only speed` measures them)."]
    if bench_path.exists():
        b = json.loads(bench_path.read_text())
        dev = b["device"]
        idle = dev["load_average_at_start"][0] < 0.5 * dev["cores"]
        L += ["", f"### CPU: seconds per training step (`results/{bench_path.name}`)", "",
              f"Command `{b['command']}` ({b['date']}); {dev['cpu']}, {dev['cores']} cores, torch threads "
              f"{dev['torch_threads']}; " + ", ".join(f"{k} {v}" for k, v in b["versions"].items())
              + f"; load average {dev['load_average_at_start'][0]:.1f} at the start and "
              f"{dev['load_average_at_end'][0]:.1f} at the end "
              + ("(no other job on the machine at the start; the end's is the benchmark's own runs). " if idle else
                 "(other jobs shared the cores: the seconds are an upper bound and not comparable between rows). ")
              + "Each run: the mean of its steps after the first two."]
        plans = {r["job"]: r["planner_seconds_per_step"] for r in b["runs"]
                 if r.get("planner_seconds_per_step") is not None}
        L += ["", "| job | variant | runs | median s/step | range | median / the profile's | planner s/step |",
              "|---|---|---:|---:|---|---:|---:|"]
        for r in b["summary"]:  # speed_bench.summary: per job and variant
            vs = f"{r['vs_profile']:.2f}" if r.get("vs_profile") else ""
            plan = f"{plans[r['job']]:.3f}" if not vs and r["job"] in plans else ""
            L.append(f"| {r['job']} | {r['variant']} | {r['runs']} | {r['median']:.3f} | "
                     f"{r['low']:.3f}-{r['high']:.3f} | {vs} | {plan} |")
        L += [""] + _kept("speed-cpu-note", kept, [
            "The planner's `cpu` row (measure/devices.py) is not calibrated by this: with the cores shared (load "
            "average above 2 per core), wall seconds say little about the step's own cost."])
    if cpu_cal.exists() or "cpu-time-calibration" in kept:
        L += ["", f"### CPU: the planner's `cpu` row fitted to CPU seconds (`results/{cpu_cal.name}`)", ""]
        L += _kept("cpu-time-calibration", kept, [f"`benchmarks/calibrate_cpu.py` wrote `results/{cpu_cal.name}`; "
                                                  "its summary is to be written here."])
    if trl or "trl-compare" in kept:
        L += ["", "### CPU: TRL's AlignPropTrainer against this trainer (`results/trl-compare-cpu*.json`)", ""]
        L += _kept("trl-compare", kept, [f"`results/{p.name}`: command `{d.get('command', '?')}` ({d.get('date', '?')})"
                                         + ("" if d.get("skipped") is None else f", skipped: {d['skipped']}") + ";"
                                         for p, d in ((p, json.loads(p.read_text())) for p in trl)]
                    + ["its summary is to be written here."])
    return L


def _device_words(dev) -> str:
    """A result's machine in words: the provenance block's device (provenance.provenance), or the string older
    results files wrote."""
    if isinstance(dev, dict):
        return f"{dev.get('cpu', '?')} ({dev.get('cores', '?')} logical cores)" + (
            f", {dev['cuda']}" if dev.get("cuda") else "")
    return dev or "?"


def _section_rss(results_dir: Path) -> list[str]:
    """Resident memory of whole CPU training runs, from outside the process (results/rss-*.json written by
    benchmarks/rss_bench.py): the run's peak against its steady steps and its RSS after load (issue 22)."""
    files = sorted(results_dir.glob("rss-*.json"), key=lambda p: (p.stem.removesuffix("-after").removesuffix("-before"),
                                                                  p.stem.endswith("-after")))  # before, then after
    if not files:
        return []
    L = ["", "## 5. Resident memory of a CPU training run (from `results/rss-*.json`)", "",
         "Measured from outside by `benchmarks/rss_bench.py` (the child's `ru_maxrss`, as `/usr/bin/time -v` prints "
         "it) with the RSS the run prints per step (sampled at each stage's end) and its `memory_report.json`. Step 2 "
         "is the step whose allocation the profiler measures. *before*: torch.profiler memory events kept for that "
         "step and summed afterwards; *after*: a count of live storages, no event log; *after + release*: the same, and "
         "the trainer fixes glibc's mmap and trim thresholds on a CPU run (`memory/host_allocator.py`: freed tensors "
         "above the threshold go back to the system instead of staying in glibc's heap; 128 KiB in these rows, "
         "`cpu_malloc_threshold_kib` since, default 1024 KiB; the *threshold-N* rows compare N). **steady** = steps 4 and "
         "later. **load** = RSS when the load stage ended (when step 1 began). **peak allocated** = the measured "
         "step's peak tensor bytes (above its start: without the weights and state already there). "
         "**load + peak** = RSS when step 1 began (else after load) + peak allocated (+ the part above the start). "
         "MiB throughout; **seconds**: the whole run's wall seconds (its user + system CPU seconds), comparable only "
         "between rows a note says ran on an otherwise idle machine.", "",
         "| run | code | peak RSS (outside) | seconds (user + system CPU) | step 1 | step 2 (measured) | step 3 | steady | peak - steady | "
         "load (step 1 began) | peak allocated (above start) | load + peak (above start) | steady - (load + peak) | "
         "measurement held | command |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    notes, devs, growth = [], set(), []
    for path in files:
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            _log(f"skipping {path}: {e}")
            continue
        steps = {int(k): v for k, v in r.get("steps", {}).items()}
        rss = {k: v.get("rss") for k, v in steps.items()}
        steady = [v for k, v in rss.items() if k >= 4 and v]
        rep = r.get("report") or {}
        rrss = rep.get("rss") or {}
        after_load = rrss.get("after_load") or rep.get("load_rss")
        first = rrss.get("before_first_step") or rep.get("first_step_rss_start")
        start = first or after_load
        peak, base = rep.get("peak_allocated"), rep.get("baseline")
        above = peak - base if peak is not None and base is not None else None
        both = gap = "-"
        if start is not None and peak is not None and above is not None:
            both = f"{_m(start + peak)} ({_m(start + above)})"
            if steady:
                gap = f"{_m(min(steady) - start - peak)} to {_m(max(steady) - start - peak)}"
        over = (f"{_m(r['peak_rss_outside'] - max(steady))} to {_m(r['peak_rss_outside'] - min(steady))}"
                if steady and r.get("peak_rss_outside") else "-")
        cpu = [r.get("cpu_user_seconds"), r.get("cpu_system_seconds")]
        secs = (f"{r['seconds']:.1f} ({cpu[0]:.1f} + {cpu[1]:.1f})" if r.get("seconds") and None not in cpu
                else f"{r['seconds']:.1f}" if r.get("seconds") else "-")
        L.append(f"| {path.stem.removeprefix('rss-')} | {r.get('label', '?')} | {_m(r.get('peak_rss_outside'))} | "
                 f"{secs} | {_m(rss.get(1))} | {_m(rss.get(2))} | {_m(rss.get(3))} | "
                 + (f"{_m(min(steady))}-{_m(max(steady))}" if steady else "-")
                 + f" | {over} | {_m(after_load)} ({_m(first)}) | {_m(peak)} ({_m(above)}) | {both} | {gap} | "
                 f"{_m(rrss.get('measurement_bytes'))} | `{r.get('command', '?')}` |")
        if r.get("note") and r["note"] not in notes:
            notes.append(r["note"])
        if first is not None and rss.get(1) and above is not None:
            growth.append(f"{path.stem.removeprefix('rss-')}: {_m(first)} -> {_m(rss[1])} MiB, for {_m(above)} MiB of "
                          "tensors above its start")
        devs.add(_device_words(r.get("device")))
    L += ["", f"Device: {', '.join(sorted(devs))}; torch threads: default unless a note says otherwise. Notes: "
          + " ".join(notes)]
    if growth:
        L += ["", "What is left between the steady RSS and load + peak is not the measurement's: step 1 measures "
              "nothing, and already grows the RSS it began with by more than its tensors ("
              + "; ".join(growth) + "). Without *release* most of it was memory glibc kept after frees: it raises its "
              "mmap threshold (up to 32 MiB) each time a large block is freed, so from the first step on the "
              "activations came from the heap, which keeps what is freed (`MALLOC_MMAP_THRESHOLD_=131072` in the "
              "environment, which fixes the threshold the same way, held 39 MiB less at 128 px). With *release* "
              "(midsize-release, 256 px) the steady RSS is 13 MiB above load + peak and the run's peak 15 MiB above "
              "the steady RSS (before: 177-197 and 12-33 MiB); what step 1 still adds beyond its tensors is no "
              "longer freed heap and was not broken down further (code and kernels loaded on first use, thread "
              "pools and the Python objects of a step are the likely parts)."]
    # the same measured step, both methods (same seed): what the counter cannot see is scratch inside single ops
    runs = {}
    for path in files:
        with contextlib.suppress(OSError, ValueError):
            r = json.loads(path.read_text())
            if (r.get("report") or {}).get("stages"):
                runs.setdefault(path.stem.removeprefix("rss-").removesuffix("-after").removesuffix("-before"), {})[r.get("label")] = r
    for name, pair in runs.items():
        if not {"before", "after"} <= set(pair):
            continue
        b, a = pair["before"]["report"], pair["after"]["report"]
        L += ["", f"Peak allocated per stage of the measured step of `{name}` (the same step, same seed), MiB: "
              "*before* from torch.profiler's allocator events, *after* from the count of live storages. The events "
              "also see what a kernel allocates and frees inside one op (the VAE decoder's convolutions and "
              "upsampling), which the count of storages (like the planner) does not.", "",
              "| stage | events (before) | storages (after) | after / before |", "|---|---:|---:|---:|"]
        for stage, fig in a["stages"].items():
            x, y = fig.get("peak_allocated"), (b["stages"].get(stage) or {}).get("peak_allocated")
            L.append(f"| {stage} | {_m(y)} | {_m(x)} | " + (f"{x / y:.4f}" if x and y else "-") + " |")
    for path in sorted(results_dir.glob("counter-vs-events-*.json")):  # benchmarks/counter_vs_events.py
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            r = json.loads(path.read_text())
            c, e, cfg = r["counter"], r["events"], r["config"]
            L += ["", f"`shared_step.measure_cpu_step` both ways on the mid-size model (brightness reward) at {cfg['resolution']} px (batch "
                  f"{cfg['batch_size']}, {cfg['sample_steps']} DDIM steps, K = {cfg['k']}), each in its own process "
                  f"(`{path.name}`, command `{r['command']}`), MiB:", "",
                  "| stage | events | storages | storages / events |", "|---|---:|---:|---:|"]
            for stage, x in c["stages"].items():
                y = e["stages"][stage]
                L.append(f"| {stage} | {_m(y)} | {_m(x)} | {x / y:.4f} |")
            L.append(f"| process max RSS | {_m(e['maxrss'])} | {_m(c['maxrss'])} | |")
            if r.get("note"):
                L += ["", f"({r['note']}.)"]
    return L


def _summary(doc: dict, gpu) -> list[str]:
    """A few headline numbers, computed from the results (so they never go stale)."""
    L = ["### Summary", ""]
    lad = doc.get("ladder") or {}
    rows = lad.get("rows") or []
    full = next((r for r in rows if "= rtx3060" in r["label"]), None)  # (--quick runs no profile row)
    if len(rows) >= 2:
        L.append(f"- SD1.5 512 px with the aesthetic reward (estimates): {_g(rows[0]['peak_allocated'])} GiB peak with no "
                 f"optimization, {_g(rows[1]['peak_allocated'])} GiB with fp16 frozen weights"
                 + (f", {_g(full['peak_allocated'])} GiB with the full rtx3060 profile "
                    f"({_g(full['peak_reserved'])} GiB needed of its {full['budget_gb']:g}); the peak is in "
                    f"`{full['peak_stage']}`." if full else "."))
    cost = lad.get("autocast_cost") or []
    if cost:
        d = [(c["with_autocast"] - c["without_autocast"]) / GIB for c in cost]
        L.append(f"- CUDA autocast now costs {min(d):.2f}-{max(d):.2f} GiB of that peak (section 1): the frozen VAE "
                 "and reward model run in their own fp16 outside autocast; only the UNet calls use it.")
    ratios = [r["peak_allocated"] / r["planner"]["peak_allocated"] for _, d in gpu for r in gpu_runs(d)
              if r["status"] == "ok" and r["peak_allocated"] and r["planner"] and r["planner"].get("peak_allocated")]
    if ratios:
        L.append(f"- Planner vs real GPU runs: measured / estimated peak allocated {min(ratios):.3f}-{max(ratios):.3f} "
                 f"over {len(ratios)} runs (section 4).")
    cpu = (doc.get("cpu_measured") or {}).get("rows") or []
    if cpu:
        r = [row["estimate"]["peak_allocated"] / row["measured"]["peak_allocated"] for row in cpu]
        L.append(f"- Planner vs real CPU allocation on the mid-size model: estimated / measured peak "
                 f"{min(r):.3f}-{max(r):.3f} over {len(r)} configurations (section 3).")
    return L + [""]


def _gpu_ladder_rows(gpu) -> dict[str, tuple[str, dict]]:
    rows = {}
    for path, d in gpu:
        for r in gpu_runs(d):
            key = _ladder_key(r["name"].removeprefix("ladder "))
            if r["section"] == "ladder" and (key not in rows or _skipped(rows[key][1]) or not _skipped(r)):
                rows[key] = ((d.get("device") or {}).get("name", path.stem), r)  # a measured row beats a skipped one
    return rows


def _display_name(run: dict) -> str:
    """A ladder run under the current LADDER's label (an earlier LADDER put "(= rtx3060)" on another row)."""
    if run["section"] != "ladder":
        return run["name"]
    key = _ladder_key(run["name"].removeprefix("ladder "))
    return "ladder " + next((label for label, _ in LADDER if _ladder_key(label) == key), key)


def _skipped(run: dict) -> bool:
    return run["status"].startswith("skipped") or run["status"].startswith("not run")


def _ladder_key(label: str) -> str:
    """A ladder row's label without the "(= rtx3060)" marker, which earlier LADDERs put on another row: the rows
    (the same changes in the same order) still line up with measurements taken under those labels."""
    return label.replace(" (= rtx3060)", "")


def _section_ladder(lad: dict | None, gpu, STAGES) -> list[str]:
    L = ["## 1. SD1.5 at 512 px: each option added in turn (planner ESTIMATES)", ""]
    if not lad:
        return L + ["Not run in this results file.", ""]
    s = lad["setup"]
    L += [f"Profile `{s['profile']}` (budget {lad['rows'][0]['budget_gb']:g} GiB), model `{s['model']}` (architecture "
          f"only), reward `{s['reward']}` (CLIP ViT-L/14), batch 1, K = 1 of 10 steps (memory is flat in K: "
          f"each further grad step keeps ~66 KiB, so rtx3060's K ~ U{{1..50}} adds ~3 MiB). Target CUDA, "
          "autocast emulated. Last row's command:", "", f"    {lad['command']}", "",
          "Peak allocated per stage, GiB (estimates):", ""]
    short = {"encode_prompts": "encode", "sample_nograd": "nograd", "sample_grad": "grad", "optimizer": "optim"}
    head = ["configuration"] + [short.get(n, n) for n in STAGES] + ["peak", "needed", "fits 7.5"]
    L += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in lad["rows"]:
        cells = [r["label"]] + [_g(r["stages"].get(n, {}).get("allocated")) for n in STAGES]
        cells += [f"**{_g(r['peak_allocated'])}** ({short.get(r['peak_stage'], r['peak_stage'])})",
                  _g(r["peak_reserved"]), "yes" if r["fits"] else "NO"]
        L.append("| " + " | ".join(cells) + " |")
    if lad.get("autocast_cost"):
        L += ["", "### What CUDA autocast costs (estimates)", "",
              "The trainer runs the UNet calls under `accelerator.autocast()`, and the frozen VAE and reward model "
              "in their own fp16 outside it (autocast would keep their GroupNorm/LayerNorm, upsampling and softmax "
              "outputs in fp32: 0.6-1.9 GiB more at 512 px, as the H200 runs of section 4 measured before that "
              "change). The same steps estimated with no autocast at all; they reproduce docs/design.md section 3's "
              "fake-tensor figures (5.51 / 4.54 / 4.08 / 3.85 / 3.39 GiB):", "",
              "| configuration | with autocast | without | autocast costs |", "|---|---:|---:|---:|"]
        for c in lad["autocast_cost"]:
            L.append(f"| {c['label']} | {_g(c['with_autocast'])} | {_g(c['without_autocast'])} | "
                     f"{(c['with_autocast'] - c['without_autocast']) / GIB:+.2f} GiB |")
    measured = _gpu_ladder_rows(gpu)
    L += ["", "### Measured on a GPU next to the estimate", ""]
    if not measured:
        L += ["_No `results/gpu-*.json` yet. When `benchmarks/gpu_check.sh` has run, rebuild this report: each "
              "ladder row gets its measured peak (allocated / reserved, the stage) and seconds per step here._", ""]
        return L
    L += ["| configuration | GPU | status | measured allocated (stage) | measured reserved | estimated allocated | "
          "measured/estimated | s/step |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in lad["rows"]:
        if _ladder_key(r["label"]) not in measured:
            continue
        name, m = measured[_ladder_key(r["label"])]
        L.append(f"| {r['label']} | {name} | {m['status']} | {_g(m['peak_allocated'])} ({m['peak_stage'] or '-'}) | "
                 f"{_g(m['peak_reserved'])} | {_g(r['peak_allocated'])} | {_ratio(m['peak_allocated'], r['peak_allocated'])}"
                 f" | {_s(m['seconds_per_step'])} |")
    shared = max((m.get("concurrent_runs") or 1 for _, m in measured.values()), default=1)
    if shared > 1:
        L += ["", f"Up to {shared} runs shared the GPU (section 4): the seconds per step are not a speed comparison "
              "between rows."]
    return L + [""]


def _section_fits(fits: dict | None) -> list[str]:
    L = ["## 2. What fits each GPU profile (planner ESTIMATES)", ""]
    if not fits:
        return L + ["Not run in this results file.", ""]
    L += [f"Reward `{fits['reward']}`; {fits['note']}. The largest batch per micro-step at the largest resolution "
          "where batch 1 fits; K is drawn in the profile's range and memory is flat in K (each further grad "
          "step keeps only its input latent), so the whole range fits whenever K = k_max does (that is what is "
          "estimated).", "",
          "| profile | budget GiB | model | resolution | largest batch | K range | needed at that batch GiB "
          "(peak stage) | batch 1 needs GiB | + per image GiB |", "|---|---:|---|---:|---:|---|---:|---:|---:|"]
    for c in fits["cells"]:
        if c.get("resolution") is None:
            L.append(f"| {c['profile']} | {c.get('budget_gb', 0):g} | {c['model']} | does not fit even at "
                     f"{min(t['resolution'] for t in c['tried'])} px, batch 1 | - | - | - | "
                     f"{_g(min(t['peak_reserved'] for t in c['tried']))} | - |")
            continue
        k = c["k_range"]
        batch = f"{c['batch_size']}" + ("+" if c.get("capped") else "")
        L.append(f"| {c['profile']} | {c['budget_gb']:g} | {c['model']} | {c['resolution']} | {batch} | "
                 f"{k[0]}..{k[1]} | {_g(c['peak_reserved'])} ({c['peak_stage']}) | {_g(c['batch1_reserved'])} | "
                 f"{_g(c['per_image'])} |")
    return L + ["", f"(`+`: capped at {MAX_BATCH}.)", ""]


def _section_cpu(cpu: dict | None, STAGES) -> list[str]:
    L = ["## 3. Measured on the CPU: each memory feature off and on (mid-size model)", ""]
    if not cpu:
        return L + ["Not run in this results file.", ""]
    c = cpu["config"]
    L += [f"{cpu['model']}. {c['resolution']} px, batch {c['batch_size']}, K = {c['k']} of {c['sample_steps']} "
          f"steps, fp32, reward `{c['reward']}`. **Measured**: peak CPU allocation per stage from torch.profiler "
          "memory events (weights included), seconds per step as the mean of "
          f"{cpu['timed_steps']} steps after the profiled one. The planner's CPU estimate for the same step beside it. "
          "Each feature is switched on alone from the baseline (activation offload together with VAE "
          "checkpointing, which it needs).", "",
          "| feature | peak MiB (stage) | change vs off | decode MiB | reward MiB | backward MiB | s/step | "
          "slower by | planner MiB | planner/measured |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = cpu["rows"][0]["measured"]
    alone = {(r["feature"], str(r["value"])): r["measured"] for r in cpu["rows"] if not r.get("with")}
    for r in cpu["rows"]:
        m, e = r["measured"], r["estimate"]
        # a feature measured with a prerequisite compares with that prerequisite's own row (same run, same noise)
        pre = [alone.get((k, str(v))) for k, v in (r.get("with") or {}).items()]
        ref = (pre[0] if len(pre) == 1 and pre[0] else None) or r.get("reference") or base
        name = r["feature"] if r["value"] is None else f"{r['feature']}={str(r['value']).lower()}"
        if r.get("with"):
            name += " (with " + ", ".join(f"{k}={v}" for k, v in r["with"].items()) + ")"
        delta = "" if r["value"] is None else f"{(m['peak_allocated'] - ref['peak_allocated']) / MIB:+.1f}"
        slower = "" if r["value"] is None or not ref.get("seconds_per_step") else \
            f"{100 * (m['seconds_per_step'] / ref['seconds_per_step'] - 1):+.0f}%"
        L.append(f"| {name} | {_m(m['peak_allocated'])} ({m['peak_stage']}) | {delta} | "
                 f"{_m(m['stages'].get('decode'))} | {_m(m['stages'].get('reward'))} | {_m(m['stages'].get('backward'))} | "
                 f"{m['seconds_per_step']:.2f} | {slower} | {_m(e['peak_allocated'])} | "
                 f"{_ratio(e['peak_allocated'], m['peak_allocated'])} |")
    L += ["", "On a CPU, `offload_frozen` and `activation_offload` have nowhere to move tensors to (host memory is "
          "the only memory), so they show no saving here; on a GPU they move weights and saved activations off "
          "the card (section 1 and the GPU table). Timing on a shared 2-core machine is noisy (a few %).", ""]
    return L


def _section_gpu(gpu: list[tuple[Path, dict]], STAGES) -> list[str]:
    L = ["## 4. Measured on a GPU (from `results/gpu-*.json`)", "",
         "<!-- GPU-MEASURED: filled from benchmarks/results/gpu-*.json written by benchmarks/gpu_check.sh -->", ""]
    if not gpu:
        return L + ["_No GPU results yet. Run `bash benchmarks/gpu_check.sh` on a machine with an NVIDIA GPU, then "
                    "`python benchmarks/memory_bench.py --report-only`: every run's measured per-stage peaks "
                    "(allocated/reserved), seconds per step and fit/OOM under the profile's cap appear here, with the "
                    "planner's estimate for the same arguments beside them._", ""]
    for path, d in gpu:
        dev = d.get("device") or {}
        runs = gpu_runs(d)
        ratios = [r["peak_allocated"] / r["planner"]["peak_allocated"] for r in runs
                  if r["status"] == "ok" and r["peak_allocated"] and r["planner"] and r["planner"].get("peak_allocated")]
        calls = [c.get("command") for c in d.get("calls") or []] or [d.get("command", "bash benchmarks/gpu_check.sh")]
        L += [f"### {dev.get('name', '?')} ({dev.get('total_gb', '?')} GiB), {d.get('date', '?')}: `{path.name}`", "",
              "Command" + ("s" if len(calls) > 1 else "") + ": " + "; ".join(f"`{c}`" for c in calls)
              + (f"; code {d['code']}" if d.get("code") else "") + "; versions: "
              + ", ".join(f"{k} {v}" for k, v in (d.get("versions") or {}).items() if v), ""]
        together = max((r.get("concurrent_runs") or 1 for s in ("ladder", "profiles") for r in d.get(s) or []), default=1)
        if together > 1:
            L += [f"Up to {together} runs shared the GPU at once: memory figures are per run (CUDA's counters are per "
                  "process); seconds per step include the contention.", ""]
        if ratios:
            L += [f"**Measured / estimated peak allocated over the {len(ratios)} completed runs with an estimate: "
                  f"{min(ratios):.3f} to {max(ratios):.3f}.**", ""]
        L += ["| run | cap GiB | status | allocator segments | measured allocated (stage) | measured reserved | "
              "estimated allocated | estimated needed | measured/estimated allocated | K per step | runs at once | "
              "s/step |", "|---|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in runs:
            p = r["planner"] or {}
            seg = (r["allocator"] or "-").replace(" segments", "")
            L.append(f"| {_display_name(r)} | {r['budget_gb'] or '-'} | {r['status']} | {seg} | {_g(r['peak_allocated'])} "
                     f"({r['peak_stage'] or '-'}) | {_g(r['peak_reserved'])} | {_g(p.get('peak_allocated'))} | "
                     f"{_g(p.get('peak_needed', p.get('peak_reserved')))} | "  # (peak_reserved: plans before the rename)
                     f"{_ratio(r['peak_allocated'], p.get('peak_allocated'))} | "
                     f"{', '.join(str(k) for k in r['k']) or '-'} | {r['concurrent_runs'] or '-'} | "
                     f"{_s(r['seconds_per_step'])} |")
        L += ["", "The estimates were computed with expandable allocator segments in mind (x1.10 + workspaces); a run "
              "with fixed segments is planned with a fragmentation allowance on top (`figures.fragmentation_allowance`). "
              "Seconds per step follow the K drawn (each grad step is a UNet forward and backward) and the runs "
              "sharing the GPU; they are not a speed comparison between rows."]
        staged = [r for r in runs if r["stages"] and r["planner"]]
        if staged:
            L += ["", "Per stage, measured / estimated allocated (GiB):", "",
                  "| run | " + " | ".join(STAGES) + " |", "|---|" + "---:|" * len(STAGES)]
            for r in staged:
                cells = []
                for n in STAGES:
                    meas = (r["stages"].get(n) or (None, None))[0]
                    est = ((r["planner"].get("stages") or {}).get(n) or {}).get("allocated")
                    cells.append(f"{_g(meas)} / {_g(est)}")
                L.append(f"| {_display_name(r)} | " + " | ".join(cells) + " |")
            L += ["", "(The estimate's `encode_prompts` is the first step's, when every prompt is encoded for the cache; "
                  "the measured per-stage figures leave the first step out as warm-up.)"]
        L += _quant_table(d.get("quant"))
        L.append("")
    return L


def _quant_table(q: dict | None) -> list[str]:
    """The quantized-base check (benchmarks/verify_quant.py): one UNet forward+backward into LoRA per mode."""
    if not q or not q.get("modes"):
        return [] if not q else ["", f"Quantized base check: {q.get('error', 'no modes ran')}"]
    base = next(iter(q["modes"].values()))
    L = ["", f"Quantized frozen UNet ({q.get('arch', 'sd15')}, random weights, batch 2 = one CFG pair, 64x64 latents, "
         f"77 tokens; one forward+backward into LoRA; bitsandbytes {q.get('bitsandbytes', '?')}; all modes "
         f"{'passed' if q.get('ok') else 'did NOT all pass'}):", "",
         "| mode | weights GiB | fwd+bwd peak GiB | vs first row | LoRA grads (finite) | output error vs fp16 | "
         "fwd+bwd s |", "|---|---:|---:|---:|---|---:|---:|"]
    for label, m in q["modes"].items():
        if "error" in m:
            L.append(f"| {label} | - | - | - | {m['error']} | - | - |")
            continue
        change = m.get("fwd_bwd_peak_change_bytes")
        L.append(f"| {label} | {_g(m.get('measured_weight_bytes'))} | {_g(m.get('fwd_bwd_peak_bytes'))} | "
                 f"{'-' if change is None else f'{change / GIB:+.3f}'} | {m.get('lora_grads_present')}/"
                 f"{m.get('lora_tensors')} ({'yes' if m.get('lora_grads_finite') else 'NO'}) | "
                 f"{100 * m.get('output_rel_error_vs_fp16', 0):.1f}% | {_s(m.get('fwd_bwd_seconds'))} |")
    if base.get("fwd_bwd_seconds") and len(q["modes"]) > 1:
        L += ["", "(The first row's seconds include CUDA's first-use start-up: cuBLAS handles, kernel loading.)"]
    return L


# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: a few rows of each section")
    ap.add_argument("--out", default=str(ROOT / "benchmarks"),
                    help="folder for results/ and REPORT.md (default: benchmarks/)")
    ap.add_argument("--only", default="", help="comma-separated sections: ladder,fits,cpu (others: from the latest "
                                               "results file)")
    ap.add_argument("--report-only", action="store_true", help="rebuild REPORT.md from the results files only")
    a = ap.parse_args(argv)
    out = Path(a.out)
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging
    import warnings

    from lowmem_alignprop.settings.quiet import quiet_libraries
    from lowmem_alignprop.run import atomic

    quiet_libraries()
    logging.getLogger("lowmem_alignprop").setLevel(logging.WARNING)
    warnings.simplefilter("ignore")
    if not a.report_only:
        t0 = time.time()
        only = set(filter(None, a.only.split(","))) or {"ladder", "fits", "cpu"}
        if unknown := sorted(only - {"ladder", "fits", "cpu"}):  # (a typo wrote an empty, dated results file)
            raise SystemExit(f"--only: unknown section(s) {', '.join(unknown)}; choose from ladder, fits, cpu")
        previous, _ = load_results(results)
        date = dt.date.today().isoformat()
        from lowmem_alignprop.measure.provenance import provenance

        command = shlex.join(["python", "benchmarks/memory_bench.py", *sys.argv[1:]])  # as run, --out included
        # its device block keeps the shape the report reads from earlier results (type, name, logical_cores)
        doc = {"kind": "memory_bench", "quick": a.quick, **provenance(command), "date": date, "device": device_info()}
        if "ladder" in only:
            doc["ladder"] = run_ladder(a.quick)
        if "fits" in only:
            doc["what_fits"] = run_what_fits(a.quick)
        if "cpu" in only:
            import tempfile
            with tempfile.TemporaryDirectory() as tmp:
                doc["cpu_measured"] = run_cpu_measured(a.quick, Path(tmp))
        carry_sections(doc, previous)
        doc["wall_seconds"] = round(time.time() - t0, 1)
        name = f"{doc['device']['type']}-{date}{'-quick' if a.quick else ''}.json"
        doc["file"] = name
        atomic.write_text(results / name, json.dumps(doc, indent=1, default=str) + "\n")
        _log(f"wrote {results / name} ({doc['wall_seconds']:.0f} s)")
    doc, gpu = load_results(results)
    path = out / "REPORT.md"
    previous = path.read_text() if path.exists() else ""  # its hand-written blocks are kept
    atomic.write_text(path, report(doc, gpu, results, previous))
    _log(f"wrote {out / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The planner's CPU step time (measure/devices.py's ``cpu`` row) against CPU seconds measured on this machine.

For each configuration below (the built-in tiny model, the shipped toy world, tests/midsize.py's mid-size SD-shaped
model at 128 px; a few memory features and batch sizes) the step is planned on fake tensors (``planner.estimate``,
target cpu: its counted work per stage) and run for real on one thread (``shared_step.measure_cpu_step`` with
``time.process_time``: CPU seconds, which other jobs on a shared machine disturb less than wall seconds). The
``cpu`` row's factors (matmul and attention efficiency, seconds per op; the memory efficiency fixed, see
:func:`fit`) are then fitted by non-negative least squares on the step seconds of the configurations marked ``fit``, relative to each step's time, and checked
on those marked ``held-out``.

    OMP_NUM_THREADS=1 python benchmarks/calibrate_cpu.py                 # writes results/cpu-time-calibration.json
    python benchmarks/calibrate_cpu.py --reuse                           # fit again from the stored measurements

One thread: the row is per core; ``cpu_device(n)`` multiplies peak and bandwidth by n (ideal scaling, unchecked).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one core's figures

import argparse  # noqa: E402
import atexit  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from lowmem_alignprop.run import atomic  # noqa: E402

OUT = HERE / "results" / "cpu-time-calibration.json"
STAGES = ("sample_nograd", "sample_grad", "decode", "reward", "backward", "optimizer")
FAST = ["sample_prompts=0"]
CONFIGS = [  # (name, model, --set items, split)
    ("tiny T10 K2 b2 (cpu profile)", "tiny", [], "fit"),
    ("tiny + unet_checkpointing=blocks", "tiny", ["unet_checkpointing=blocks"], "fit"),
    ("tiny + vae_checkpointing=blocks", "tiny", ["vae_checkpointing=blocks"], "fit"),
    ("tiny T20 K5 b4", "tiny", ["sample_steps=20", "k=5", "batch_size=4"], "fit"),
    ("toy world (64 px, T20 K2 b4, toy_clip)", "toy", [], "fit"),
    ("midsize 128 px T4 K2 b2", "midsize", ["resolution=128", "sample_steps=4", "k=2", "batch_size=2"], "fit"),
    ("midsize 128 px T4 K2 b1 + vae_checkpointing=blocks", "midsize",
     ["resolution=128", "sample_steps=4", "k=2", "batch_size=1", "vae_checkpointing=blocks"], "fit"),
    ("tiny b1 + unet blocks + vae resnets", "tiny",
     ["batch_size=1", "unet_checkpointing=blocks", "vae_checkpointing=resnets"], "held-out"),
    ("tiny 128 px T10 K3 b2", "tiny", ["resolution=128", "k=3"], "held-out"),
    ("toy world b2 K5", "toy", ["batch_size=2", "k=5"], "held-out"),
    ("midsize 128 px T6 K2 b2 + unet_checkpointing=blocks", "midsize",
     ["resolution=128", "sample_steps=6", "k=2", "batch_size=2", "unet_checkpointing=blocks"], "held-out"),
]
MEMORY_EFF = 2.0  # fixed: 16 GB/s a core (the small models' tensors stay in cache); see fit()
WORK_KEYS = ("matmul_flops", "attention_flops", "other_bytes", "dequant_bytes", "ops", "pcie_bytes")


def config_of(model: str, sets: list[str], midsize: Path):
    from lowmem_alignprop.settings.profiles import resolve_config

    model_arg = str(midsize) if model == "midsize" else model
    _, cfg = resolve_config("cpu", {"model": model_arg}, [*FAST, *sets])
    return dataclasses.replace(cfg, truncation="fixed").validate()


def work_of(cfg) -> dict:
    from lowmem_alignprop.measure import planner

    est = planner.estimate(cfg, target="cpu")
    return {n: {k: float(w.get(k, 0)) for k in WORK_KEYS} for n, w in est.work.items()}


def measure(name: str, model: str, sets: list[str], steps: int, midsize: Path) -> dict:
    import torch

    from lowmem_alignprop.measure import shared_step

    torch.set_num_threads(1)
    cfg = config_of(model, sets, midsize)
    work = work_of(cfg)
    t0 = time.process_time()
    meas = shared_step.measure_cpu_step(cfg, timed_steps=steps, clock=time.process_time)
    return {"name": name, "model": model, "set": sets, "k": meas["k"], "timed_steps": steps, "work": work,
            "measured_stage_seconds": {n: meas["stage_seconds"].get(n, 0.0) for n in STAGES},
            "measured_step_seconds": meas["seconds_per_step"],
            "cpu_seconds_spent": round(time.process_time() - t0, 1)}


def columns(work: dict, device) -> list[float]:
    peak = device.fp32_tflops * 1e12
    bandwidth = device.memory_gbs * 1e9
    return [work["matmul_flops"] / peak, work["attention_flops"] / peak,
            (work["other_bytes"] + work["dequant_bytes"]) / bandwidth, work["ops"]]


def fit(runs: list[dict], memory_eff: float = MEMORY_EFF) -> dict:
    """Non-negative least squares for (1/matmul_eff, 1/attention_eff, launch_s) on the fit runs' step seconds, each
    weighted by 1/its seconds (relative error), the memory factor fixed at ``memory_eff``: over these models the
    elementwise bytes grow with the matmul FLOPs (their ratio stays within 0.5-1.1), so the two cannot be told apart
    (fitted free, the memory factor went to infinity, i.e. no memory time at all). Whole steps, not stages: a stage's
    own seconds carry the clock's edges and the work split between neighbours (fitted per stage, the held-out steps
    came out worse)."""
    import numpy as np
    from scipy.optimize import nnls

    from lowmem_alignprop.measure.devices import DEVICES

    device = DEVICES["cpu"]
    rows, target = [], []
    for run in runs:
        if run["split"] != "fit":
            continue
        total = np.sum([columns(run["work"][n], device) for n in STAGES if n in run["work"]], axis=0)
        rows.append(total[[0, 1, 3]] / run["measured_step_seconds"])
        target.append(1.0 - total[2] / memory_eff / run["measured_step_seconds"])
    coef, _ = nnls(np.array(rows), np.array(target))
    inv = lambda c: round(float(1.0 / c), 3) if c > 0 else None  # noqa: E731 - a factor never used: no work of that class
    return {"matmul_eff": inv(coef[0]), "attention_eff": inv(coef[1]), "memory_eff": memory_eff,
            "launch_s": float(f"{coef[2]:.3g}")}


def predict(run: dict, device) -> dict:
    from lowmem_alignprop.measure.devices import seconds

    per = {n: seconds(run["work"][n], device, "fp32") for n in STAGES if n in run["work"]}
    return {"stage_seconds": per, "step_seconds": sum(per.values())}


def report(doc: dict) -> dict:
    from lowmem_alignprop.measure.devices import DEVICES

    base = DEVICES["cpu"]
    factors = fit(doc["runs"])
    fitted = dataclasses.replace(base, **{k: v for k, v in factors.items() if v is not None})
    summary = {"fitted_row": factors, "shipped_row": {k: getattr(base, k) for k in factors}}
    for label, device in (("shipped", base), ("fitted", fitted)):
        ratios = {"fit": [], "held-out": []}
        for run in doc["runs"]:
            p = predict(run, device)
            run.setdefault("predicted", {})[label] = p
            ratio = float(run["measured_step_seconds"] / p["step_seconds"])
            run.setdefault("measured_over_predicted", {})[label] = round(ratio, 3)
            ratios[run["split"]].append(ratio)
        summary[label] = {split: {"min": round(min(r), 3), "max": round(max(r), 3), "n": len(r)}
                          for split, r in ratios.items() if r}
    doc["summary"] = summary
    return doc


def scratch() -> Path:
    """A temporary folder for the model the runs share, removed when the script ends."""
    work = Path(tempfile.mkdtemp(prefix="calibrate_cpu-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT, help=f"the measurements and the fit, JSON (default {OUT})")
    ap.add_argument("--steps", type=int, default=2,
                    help="timed steps per configuration (after the profiled one; default 2)")
    ap.add_argument("--reuse", action="store_true", help="fit again from the measurements stored in --out")
    ap.add_argument("--replan", action="store_true", help="with --reuse: count each stored step's work again (the "
                    "planner changed), keeping its measured seconds")
    ap.add_argument("--only", default="", help="comma-separated indices into CONFIGS (default: all)")
    args = ap.parse_args()
    given = [i.strip() for i in args.only.split(",") if i.strip()]
    if not all(i.isdigit() and int(i) < len(CONFIGS) for i in given):
        ap.error(f"--only {args.only}: give indices into CONFIGS, 0-{len(CONFIGS) - 1}")
    wanted = {int(i) for i in given}
    if args.reuse:
        if not args.out.is_file():  # (a traceback)
            raise SystemExit(f"--reuse: {args.out} does not exist: run without --reuse first (it stores the runs)")
        doc = json.loads(args.out.read_text())
        if args.replan:
            from midsize import build_midsize_dir

            midsize = build_midsize_dir(scratch() / "midsize")
            for run in doc["runs"]:
                run["work"] = work_of(config_of(run["model"], run["set"], midsize))
            doc["replanned"] = time.strftime("%Y-%m-%d") + ": work counted again (--replan), seconds as measured"
    else:
        from midsize import build_midsize_dir

        from lowmem_alignprop.measure.provenance import provenance

        midsize = build_midsize_dir(scratch() / "midsize")
        doc = {"kind": "cpu_time_calibration",  # the measured runs are subprocesses with one torch thread
               **provenance(" ".join(["OMP_NUM_THREADS=1", "python"] + sys.argv), ("torch",), torch_threads=1,
                            load_average_at_start=os.getloadavg()), "runs": []}
        for i, (name, model, sets, split) in enumerate(CONFIGS):
            if wanted and i not in wanted:
                continue
            run = measure(name, model, sets, args.steps, midsize)
            run["split"] = split
            doc["runs"].append(run)
            print(f"{name:55} {run['measured_step_seconds']:8.3f} CPU s/step ({split})", flush=True)
            atomic.write_text(args.out, json.dumps(doc, indent=1))  # what is measured so far survives a kill
        doc["device"]["load_average_at_end"] = os.getloadavg()
    doc = report(doc)
    atomic.write_text(args.out, json.dumps(doc, indent=1))
    s = doc["summary"]
    print("fitted cpu row:", s["fitted_row"], "(shipped:", s["shipped_row"], ")")
    for label in ("shipped", "fitted"):
        print(f"measured / predicted with the {label} row:", s[label])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

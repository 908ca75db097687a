"""The planner's time estimate against the GPU steps measured in benchmarks/results/gpu-*.json.

For every completed run there (a profile or a ladder row of benchmarks/gpu_check.py) the run's own configuration is
planned again (``planner.estimate``, fake tensors; K fixed at the K the measured step drew) and its counted work is
turned into seconds with the card's figures (``measure/devices.py``: the h100 or h200 row for the card that ran it).
Measured: the per-stage seconds of the run's step 2 (the profiler synchronizes the GPU at each stage's edges).
Runs that shared the GPU with others (``concurrent_runs`` > 1) are listed apart: their seconds include the others'.

    python benchmarks/calibrate_time.py                    # writes benchmarks/results/time-calibration.json
    python benchmarks/calibrate_time.py --reuse            # recompute the seconds from the stored work counts
    python benchmarks/calibrate_time.py --match sd15 --out F  # only the runs whose name holds one of the words

The speed rows (``gpu_check.py --only speed``, one run alone on the card at batch 1) are included: the only
launch-bound steps measured, where the per-op time shows.

The work counts are stored, so changing a device figure needs no new estimate (``--reuse``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lowmem_alignprop.measure import devices  # noqa: E402
from lowmem_alignprop.memory import stages  # noqa: E402
from lowmem_alignprop.run import atomic  # noqa: E402
from gpu_check import matches  # noqa: E402  (its neighbour in benchmarks/, this script's folder on sys.path)

OUT = HERE / "results" / "time-calibration.json"
TIMED = (stages.SAMPLE_NOGRAD, stages.SAMPLE_GRAD, stages.DECODE, stages.REWARD, stages.BACKWARD, stages.OPTIMIZER)


def card_of(device_name: str) -> str:
    return "h200" if "H200" in device_name else "h100" if "H100" in device_name else ""


def runs(match: str = ""):
    for path in sorted((HERE / "results").glob("gpu-*.json")):
        data = json.loads(path.read_text())
        card = card_of(data["device"]["name"])
        for row in data.get("ladder", []) + data.get("profiles", []) + data.get("speed", []):
            if not matches(row.get("name", ""), match):
                continue
            report = row.get("memory_report") or {}
            plan = row.get("planner") or {}
            metrics = row.get("metrics") or []
            if row.get("status") != "ok" or not report.get("stages") or not plan.get("config") or len(metrics) < 2:
                continue
            measured = {n: report["stages"][n]["seconds_mean"] for n in TIMED if n in report["stages"]}
            yield {"file": path.name, "card": card, "name": row["name"], "concurrent_runs": row.get("concurrent_runs"),
                   "config": plan["config"], "k": metrics[1].get("k"), "measured": measured,
                   "measured_step": metrics[1].get("seconds")}


def work_of(run: dict) -> dict:
    from lowmem_alignprop.measure.planner import estimate
    from lowmem_alignprop.settings.config import Config

    values = dict(run["config"], reward_weights="", truncation="fixed", k=run["k"], output_dir=tempfile.gettempdir())
    values = {k: v for k, v in values.items() if k in Config.__dataclass_fields__}
    cfg = Config(**values).validate()
    return estimate(cfg, target="cuda").work


def predicted(run: dict) -> dict:
    from lowmem_alignprop.measure.step_time import matmul_dtype
    from lowmem_alignprop.settings.config import Config

    dev = devices.DEVICES[run["card"]]
    cfg = dataclasses.replace(Config(), mixed_precision=run["config"]["mixed_precision"])
    dtype = matmul_dtype(cfg, "cuda")
    return {n: devices.seconds(w, dev, dtype) for n, w in run["work"].items() if n in TIMED}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reuse", action="store_true", help="use the work counts stored in the output file")
    ap.add_argument("--out", default=str(OUT), help=f"the runs and the fit, JSON (default {OUT.name} in results/)")
    ap.add_argument("--match", default="", help="comma-separated words: only the runs whose name holds one")
    args = ap.parse_args()
    t0 = time.time()
    if args.reuse:
        if not Path(args.out).is_file():  # (a traceback)
            raise SystemExit(f"--reuse: {args.out} does not exist: run without --reuse first (it stores the counts)")
        rows = json.loads(Path(args.out).read_text())["runs"]
    else:
        rows = []
        for run in runs(args.match):
            run["work"] = work_of(run)
            rows.append(run)
            print(f"estimated {run['name']} ({run['file']})", file=sys.stderr, flush=True)
    ratios_alone, ratios_shared = [], []
    for run in rows:
        run["predicted"] = predicted(run)
        run["predicted_step"] = sum(run["predicted"].values())
        measured = sum(run["measured"].get(n, 0) for n in run["predicted"])
        run["measured_stages_sum"] = measured
        run["measured_over_predicted"] = measured / run["predicted_step"]
        (ratios_alone if (run["concurrent_runs"] or 1) == 1 else ratios_shared).append(run["measured_over_predicted"])
        print(f"{run['card']:5} {run['name'][:48]:48} x{run['concurrent_runs'] or 1} measured {measured:7.2f} s "
              f"predicted {run['predicted_step']:7.2f} s  ratio {run['measured_over_predicted']:.2f}  "
              + " ".join(f"{n}={run['measured'].get(n, 0):.2f}/{t:.2f}" for n, t in run["predicted"].items()))
    from lowmem_alignprop.measure.planner import PLAN_LIBRARIES
    from lowmem_alignprop.measure.provenance import provenance

    # the provenance block every result carries (command, date, device, versions: the planner's libraries)
    out = {"kind": "time-calibration", **provenance(" ".join(["python"] + sys.argv), PLAN_LIBRARIES),
           "host": platform.node(), "devices": {k: v.to_dict() for k, v in devices.DEVICES.items()},
           "alone": {"n": len(ratios_alone), "min": min(ratios_alone, default=None),
                     "max": max(ratios_alone, default=None)},
           "shared": {"n": len(ratios_shared), "min": min(ratios_shared, default=None),
                      "max": max(ratios_shared, default=None)},
           "runs": rows, "wall_seconds": round(time.time() - t0, 1)}
    atomic.write_text(args.out, json.dumps(out, indent=1))
    print(f"measured / predicted, runs alone on the GPU: {out['alone']}; sharing it: {out['shared']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

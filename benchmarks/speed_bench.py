"""Seconds per training step on this CPU, with and without the speed features, and the planner's prediction beside.

Two jobs: the README's main job (``python -m lowmem_alignprop``: the shipped toy world, cpu profile) and
tests/midsize.py's mid-size SD-shaped model (128 px, K = 2 of 4 steps, batch 2). Each variant trains in its own
process for ``--steps`` steps; its seconds per step are the mean of the steps after the first two (step 1 warms up
and compiles, step 2 is the step whose memory the profiler measures). ``--repeats N`` runs every variant N times,
interleaved (all variants once, then again), so that a slow minute of a shared machine falls on all of them; the
summary gives each variant's median, its range, and its median against the profile's. The planner's estimate of
the same step on this CPU (``plan --device cpu``: counted work, measure/devices.py's cpu row at torch's thread
count) is printed beside it.

    python benchmarks/speed_bench.py --out benchmarks/results/speed-cpu.json [--steps 8] [--repeats 3] [--only toy,midsize]

TRL's AlignPropTrainer on the same models and settings: benchmarks/trl_compare.py (CPU seconds, interleaved runs).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from lowmem_alignprop.run import atomic  # noqa: E402

VARIANTS = [  # (label, --set overrides)
    ("as the profile", {}),
    ("fused_adamw", {"fused_adamw": True}),
    ("channels_last", {"channels_last": True}),
    ("compile=nograd", {"compile": "nograd"}),
    ("merge_lora_nograd", {"merge_lora_nograd": True}),
]


def jobs(midsize: Path) -> dict[str, list[str]]:
    return {
        "toy": ["--profile", "cpu"],  # the README's first command: the shipped toy world
        "midsize": ["--profile", "cpu", "--model", str(midsize), "--set", "resolution=128", "--set", "sample_steps=4",
                    "--set", "k=2", "--set", "batch_size=2"],
    }


def train(args: list[str], steps: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "lowmem_alignprop", *args, "--steps", str(steps), "--output-dir", str(out),
           "--set", "sample_prompts=0"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    row = {"command": " ".join(["python", "-m", "lowmem_alignprop", *cmd[3:]]), "returncode": proc.returncode,
           "wall_seconds": round(time.time() - t0, 1)}
    if proc.returncode:
        row["log_tail"] = (proc.stdout + proc.stderr)[-2000:]
        return row
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seconds = [m["seconds"] for m in metrics if "seconds" in m]
    row["seconds"] = seconds
    steady = seconds[2:] or seconds  # the first two warm up (main asks for 3 steps or more)
    row["seconds_per_step"] = sum(steady) / len(steady)
    return row


def predicted(args: list[str]) -> float | None:
    from lowmem_alignprop.cli import config_from_args, common_parser
    from lowmem_alignprop.measure.planner import estimate
    from lowmem_alignprop.measure.step_time import step_time
    from lowmem_alignprop.measure.devices import cpu_device

    ns = common_parser("plan", "").parse_args(args)
    _, cfg = config_from_args(ns)
    est = estimate(cfg, target="cpu")
    return step_time(cfg, est, cpu_device())["optimizer_step"]


def summary(runs: list[dict]) -> list[dict]:
    """Per (job, variant): the median seconds per step of its runs, their range, and the median over the profile's
    own (``as the profile``) median of the same job."""
    import statistics

    groups: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        if r.get("seconds_per_step") is not None:
            groups.setdefault((r["job"], r["variant"]), []).append(r["seconds_per_step"])
    out = []
    for (job, variant), values in groups.items():
        row = {"job": job, "variant": variant, "runs": len(values), "median": statistics.median(values),
               "low": min(values), "high": max(values)}
        base = groups.get((job, VARIANTS[0][0]))
        if base and variant != VARIANTS[0][0]:
            row["vs_profile"] = row["median"] / statistics.median(base)
        out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "speed-cpu.json",
                    help="the runs and their summary, JSON (default results/speed-cpu.json)")
    ap.add_argument("--steps", type=int, default=8, help="steps per run; the first two warm up and are not averaged "
                    "(default 8, at least 3)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of every variant, interleaved (default 1)")
    ap.add_argument("--only", default="toy,midsize", help="comma-separated jobs (default toy,midsize)")
    ap.add_argument("--variants", default="", help="comma-separated labels (default: all)")
    args = ap.parse_args()
    if args.steps < 3:  # the mean would be of warm-up steps only
        ap.error(f"--steps {args.steps}: the first two steps warm up and are not averaged; give 3 or more")
    from midsize import build_midsize_dir

    from lowmem_alignprop.measure.provenance import provenance

    if unknown := sorted(set(filter(None, args.only.split(","))) - set(jobs(Path("-")))):  # (before the model: it
        raise SystemExit(f"--only: unknown job(s) {', '.join(unknown)}; choose from {', '.join(jobs(Path('-')))}")
    work = Path(tempfile.mkdtemp(prefix="speed_bench-"))  # built the model, then wrote no runs)
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # the model and the runs: ~84 MB per call
    midsize = build_midsize_dir(work / "midsize")
    t_start = time.time()
    doc = {"kind": "speed_bench", **provenance(" ".join(["python"] + sys.argv), ("torch",),
                                               load_average_at_start=os.getloadavg()), "runs": []}
    wanted = set(filter(None, args.variants.split(",")))
    chosen = [(job, base) for job, base in jobs(midsize).items() if job in args.only.split(",")]
    plans = {job: predicted(base) for job, base in chosen}
    for repeat in range(args.repeats):  # interleaved: a slow spell of the machine lands on every variant
        for job, base in chosen:
            for label, change in VARIANTS:
                if wanted and label not in wanted:
                    continue
                sets = [x for k, v in change.items() for x in ("--set", f"{k}={str(v).lower()}")]
                tag = f"{job}-{label.replace(' ', '_').replace('=', '-')}-{repeat}"
                row = train(base + sets, args.steps, work / tag)
                row.update(job=job, variant=label, repeat=repeat,
                           planner_seconds_per_step=plans[job] if not change else None)
                doc["runs"].append(row)
                print(f"{job:8} {label:16} {row.get('seconds_per_step', float('nan')):7.3f} s/step"
                      + (f"   planner {plans[job]:.3f}" if not change else ""), flush=True)
    doc["summary"] = summary(doc["runs"])
    for r in doc["summary"]:
        print(f"{r['job']:8} {r['variant']:16} median {r['median']:.3f} s/step ({r['low']:.3f}-{r['high']:.3f}, "
              f"{r['runs']} runs)" + (f", x{r['vs_profile']:.2f} the profile's" if r.get("vs_profile") else ""))
    doc["device"]["load_average_at_end"] = os.getloadavg()
    doc["wall_seconds"] = round(time.time() - t_start, 1)
    atomic.write_text(args.out, json.dumps(doc, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

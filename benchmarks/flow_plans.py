"""Issue 18's full-size plans: ``results/plan-*.json``, one ``lowmem-alignprop plan --json`` per SD3.5 / FLUX.1
profile and variant, with what produced it (the command, the CPU, its CPU seconds, wall seconds and peak RSS) and the
issue's target for that row. REPORT.md section 8 (``memory_bench.py``'s ``section_flow_plans``) is built from them.

    python benchmarks/flow_plans.py                         # every row: about 9 min of CPU, one thread each
    python benchmarks/flow_plans.py --only rtx3060-sd35m-bf16,rtx3060-flux
    python benchmarks/memory_bench.py --report-only          # then rebuild REPORT.md

Random-weight architectures on the meta device (no weights, no GPU); each plan is its own process, run with
``OMP_NUM_THREADS=1`` under ``nice -n 10``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
VARIANT = "variant of the profile"

# file name -> (profile, model, extra flags, the target for the row)
ROWS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "rtx3060-sd35m": ("rtx3060-sd35m", "sd35m", (), "SD3.5 Medium, 8 GB: <= 7.0 GiB needed"),
    "rtx3060-sd35m-bf16": ("rtx3060-sd35m", "sd35m", ("--set", "base_quant=none"), VARIANT),
    "rtx3060-sd35m-fp8": ("rtx3060-sd35m", "sd35m", ("--set", "base_quant=fp8"), VARIANT),
    "rtx3060-12gb-sd35l": ("rtx3060-12gb-sd35l", "sd35l", (), "SD3.5 Large, 12 GB: <= 11 GiB needed"),
    "rtx3060-12gb-flux": ("rtx3060-12gb-flux", "flux", (), "FLUX.1-dev, 12 GB: <= 11 GiB needed"),
    "rtx3060-flux": ("rtx3060-flux", "flux", (), "FLUX.1-dev, 8 GB with block swap: <= 7.5 GiB needed"),
    "rtx3060-flux-bf16": ("rtx3060-flux", "flux", ("--set", "base_quant=none", "--set", "block_swap=49"), VARIANT),
    "rtx3060-flux-fp8": ("rtx3060-flux", "flux", ("--set", "base_quant=fp8", "--set", "block_swap=45"), VARIANT),
    "rtx3060-flux-int8-35": ("rtx3060-flux", "flux", ("--set", "base_quant=int8", "--set", "block_swap=35"), VARIANT),
    "rtx3060-flux-int8-27": ("rtx3060-flux", "flux", ("--set", "base_quant=int8", "--set", "block_swap=27"), VARIANT),
    "rtx3060-flux-fp8-38": ("rtx3060-flux", "flux", ("--set", "base_quant=fp8", "--set", "block_swap=38"), VARIANT),
    "rtx4090-flux": ("rtx4090-flux", "flux", (), "FLUX.1-dev, 24 GB without block swap"),
    "rtx4090-flux-fp8": ("rtx4090-flux", "flux", ("--set", "base_quant=fp8"), VARIANT),
}


def command(name: str) -> list[str]:
    profile, model, extra, _ = ROWS[name]
    return ["lowmem-alignprop", "plan", "--profile", profile, "--model", model, "--reward", "aesthetic", *extra,
            "--json"]


def plan_row(name: str) -> dict:
    """Run one row's plan in its own process; its JSON with the provenance section 8 reads."""
    argv = command(name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    load = os.getloadavg()
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "lowmem_alignprop", *argv[1:]], env=env,
                          cwd=ROOT, capture_output=True, text=True, check=False)
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{name}: plan failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return row_doc(name, json.loads(proc.stdout), load, cpu_user_seconds=after.ru_utime - before.ru_utime,
                   wall_seconds=wall, max_rss_kb=after.ru_maxrss)


def row_doc(name: str, plan: dict, load_at_start: tuple, *, cpu_user_seconds: float, wall_seconds: float,
            max_rss_kb: int) -> dict:
    """One row's results file: the plan's JSON under the provenance block ``plan --json`` carries
    (``provenance.provenance``: command, date, device, versions), for this script's command line (the plan ran with
    one torch thread), the CPU's load beside it; ``host`` is that device in words, as section 8 prints it."""
    sys.path.insert(0, str(ROOT))
    from lowmem_alignprop.measure.planner import PLAN_LIBRARIES
    from lowmem_alignprop.measure.provenance import provenance

    where = provenance("OMP_NUM_THREADS=1 nice -n 10 " + " ".join(map(shlex.quote, command(name))), PLAN_LIBRARIES,
                       torch_threads=1, load_average_at_start=list(load_at_start),
                       load_average_at_end=list(os.getloadavg()))
    dev = where["device"]
    shared = max(dev["load_average_at_start"][0], dev["load_average_at_end"][0]) > 1.5
    return {**where, "host": f"{dev['cpu']}, {dev['cores']} cores" + (", shared with other jobs" if shared else ""),
            "cpu_user_seconds": round(cpu_user_seconds, 2), "wall_seconds": round(wall_seconds, 2),
            "max_rss_kb": max_rss_kb, "issue_target": ROWS[name][3],
            **{k: v for k, v in plan.items() if k not in where}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated rows (file names without plan- and .json): "
                    + ", ".join(ROWS))
    ap.add_argument("--out", type=Path, default=RESULTS, help="the folder the plan-*.json files go to (default "
                    "benchmarks/results, which REPORT.md section 8 reads)")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(ROWS)
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}: choose from {', '.join(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from lowmem_alignprop.run import atomic  # a killed run leaves the previous file

    for name in names:
        doc = plan_row(name)
        atomic.write_text(args.out / f"plan-{name}.json", json.dumps(doc, indent=1, default=str) + "\n")
        print(f"plan-{name}.json: {doc['peak_needed'] / 2**30:.2f} GiB needed, fits {doc['fits']}, "
              f"{doc['cpu_user_seconds']:.0f} s of CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())

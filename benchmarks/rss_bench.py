"""Resident memory of a whole training run, measured from outside the process (issue 22).

Runs a training command as a child process and records:

* the child's peak resident memory as the kernel accounts it (``ru_maxrss`` from ``wait4``, what
  ``/usr/bin/time -v`` prints as "Maximum resident set size");
* the RSS the run prints per step (``mem step N: ... rss X``) and, from its ``memory_report.json``, the RSS after
  load, the step's peak tensor bytes and what the allocation measurement itself held;
* the child's user and system CPU seconds (from ``wait4`` too) beside its wall seconds, and the load average at the
  start and the end (in ``device``: another job on the cores shows there).

Usage (the mid-size run of benchmarks/REPORT.md; ``--midsize DIR`` builds tests/midsize.py's model there first)::

    python benchmarks/rss_bench.py --midsize /tmp/midsize --label after --json benchmarks/results/rss-midsize-after.json \\
        -- python -m lowmem_alignprop --profile cpu --model /tmp/midsize --steps 8 --output-dir /tmp/rss-run \\
           --set resolution=256 --set k=1 --set sample_steps=20 --set batch_size=1 --set sample_prompts=0 --set log_every=1

To measure another version of the package ("before"), put its source first on PYTHONPATH, e.g.
``git archive 9a978a0 lowmem_alignprop | tar -x -C /tmp/before`` and ``PYTHONPATH=/tmp/before``, and run from
outside the repository: ``python -m`` puts the current folder first on sys.path, ahead of PYTHONPATH (refused).

SD3/FLUX host memory (``--flux-host DIR`` builds tests/flowmodels.py's FLUX-shaped model with a T5 encoder and a
transformer of about 1 GB each in fp32; the result files rss-flux-host-*.json)::

    cd /tmp && python /path/to/benchmarks/rss_bench.py --flux-host /tmp/fluxhost --label after --json ... -- \
        python -m lowmem_alignprop --profile cpu --seed 0 --model /tmp/fluxhost --steps 2 --set resolution=32 \
        --set sample_steps=4 --set k=1 --set batch_size=1 --set sample_prompts=0 --set log_every=1 \
        --set guidance_scale=3.5 --set max_sequence_length=16 --output-dir /tmp/rss-fh
Linux or macOS (``os.wait4``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_STEP = re.compile(r"mem step (\d+):(.*?)\| [\d.]+ s")
_SIZE = re.compile(r"([\d.]+) (B|KiB|MiB|GiB)")


def _bytes(text: str) -> int:
    m = _SIZE.search(text)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else -1


def parse_steps(output: str) -> dict[int, dict]:
    """The per-step figures the run printed: {step: {"rss": bytes, "peak": bytes or None}}."""
    steps: dict[int, dict] = {}
    for m in _STEP.finditer(output):
        body = m.group(2)
        rss = body.split("rss ", 1)[1] if "rss " in body else ""
        peak = body.split("peak ", 1)[1].split(" in ", 1)[0] if "peak " in body else None
        steps[int(m.group(1))] = {"rss": _bytes(rss) if rss else None, "peak": _bytes(peak) if peak else None}
    return steps


def _output_dir(cmd: list[str]) -> Path | None:
    for i, a in enumerate(cmd[:-1]):
        if a == "--output-dir":
            return Path(cmd[i + 1])
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="run", help="the run's name in the figures (default run)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--midsize", type=Path, help="build tests/midsize.py's model in this folder first")
    ap.add_argument("--flux-host", type=Path, help="build tests/flowmodels.py's host-memory FLUX model (T5 and the "
                    "transformer about 1 GB each) in this folder first")
    ap.add_argument("--log", type=Path, help="keep the run's output here")
    ap.add_argument("--note", default="", help="what REPORT.md section 5 should say about this run (its environment, "
                    "what it stands for)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the training command")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("give the training command after --")
    first = Path(os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or ".").resolve()
    if first != Path.cwd().resolve() and "-m" in cmd and (Path.cwd() / "lowmem_alignprop").is_dir():
        ap.error("PYTHONPATH is set but `python -m` would import ./lowmem_alignprop first: run from another folder")
    if args.midsize is not None:
        sys.path.insert(0, str(ROOT / "tests"))
        from midsize import build_midsize_dir

        build_midsize_dir(args.midsize)
    if args.flux_host is not None:
        sys.path.insert(0, str(ROOT / "tests"))
        from flowmodels import build_host_flux_dir

        build_host_flux_dir(args.flux_host)

    t0, load_start = time.time(), os.getloadavg()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    maxrss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if args.log:
        args.log.write_text(out)
    steps = parse_steps(out)
    result: dict = {"label": args.label, "command": " ".join(cmd), "returncode": proc.returncode,
                    "seconds": round(time.time() - t0, 1), "peak_rss_outside": maxrss, "steps": steps,
                    # the child's CPU time (wait4's rusage): what a shared machine's load stretches far less than wall seconds
                    "cpu_user_seconds": round(usage.ru_utime, 2), "cpu_system_seconds": round(usage.ru_stime, 2),
                    "pythonpath": os.environ.get("PYTHONPATH")}
    if args.note:
        result["note"] = args.note
    run_dir = _output_dir(cmd)
    report_path = run_dir / "memory_report.json" if run_dir else None
    if report_path and report_path.is_file():
        rep = json.loads(report_path.read_text())
        peak_step = rep.get("peak_step")
        step = next((s for s in rep.get("steps", []) if s.get("step") == peak_step), {})
        result["report"] = {"rss": rep.get("rss"), "peak_allocated": rep.get("peak_allocated"),
                            "baseline": step.get("baseline"), "method": rep.get("method"),
                            "load_rss": (rep.get("load") or {}).get("rss"),
                            "first_step_rss_start": (rep.get("steps") or [{}])[0].get("rss_start")}
    summary_path = run_dir / "summary.json" if run_dir else None
    if summary_path and summary_path.is_file():  # what the C allocator ran with (None before it was recorded)
        result["host_allocator"] = json.loads(summary_path.read_text()).get("host_allocator")
    sys.path.insert(0, str(ROOT))
    from lowmem_alignprop.measure.provenance import provenance

    # the provenance block every result carries (command, date, device, versions); "command" stays the measured
    # training command, "bench_command" is this script's command line
    where = provenance(" ".join(cmd), load_average_at_start=list(load_start), load_average_at_end=list(os.getloadavg()))
    result = {**where, **result, "bench_command": " ".join([sys.executable, *sys.argv])}
    tail = sorted(s for s in steps if s >= 4)
    steady = [steps[s]["rss"] for s in tail if steps[s]["rss"]]
    print(f"{args.label}: exit {proc.returncode}, peak RSS (outside) {maxrss / MIB:.0f} MiB, "
          f"{usage.ru_utime:.1f} s user + {usage.ru_stime:.1f} s system CPU; steps' RSS "
          + ", ".join(f"{s}: {v['rss'] / MIB:.0f}" for s, v in sorted(steps.items()) if v["rss"])
          + (f" MiB; steady (steps 4+) {min(steady) / MIB:.0f}-{max(steady) / MIB:.0f} MiB" if steady else ""))
    if args.json:
        from lowmem_alignprop.run import atomic

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(args.json, json.dumps(result, indent=1) + "\n")  # whole or not at all
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())

"""The CPU allocation measurement two ways on the same real step (issue 22): the live-storage counter that the
training loop uses (``CpuAllocationTracker(method="counter")``) against torch.profiler's allocator events
(``method="events"``, the method before), per stage, with the process's RSS growth each one caused.

    python benchmarks/counter_vs_events.py --midsize /tmp/midsize [--resolution 128] [--json OUT]

Runs ``shared_step.measure_cpu_step`` (the step the planner tests compare with) on tests/midsize.py's model, once
per method, each in a fresh subprocess so that one's memory does not count in the other's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20

_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {tests!r})
from midsize import build_midsize_dir
import lowmem_alignprop.measure.cpu_allocation as cpu_allocation
from lowmem_alignprop.measure import shared_step
from lowmem_alignprop.settings.config import Config

method = {method!r}
base = cpu_allocation.CpuAllocationTracker

class Tracker(base):
    def __init__(self, **kw):
        kw["method"] = method
        super().__init__(**kw)

cpu_allocation.CpuAllocationTracker = Tracker
cfg = Config(model=str(build_midsize_dir({model!r})), reward="brightness", batch_size={batch}, resolution={res},
             sample_steps={steps}, truncation="fixed", k={k}, prompts="simple_animals").validate()
t0 = time.perf_counter()
m = shared_step.measure_cpu_step(cfg)
print(json.dumps({{"stages": m["stages"], "baseline": m["baseline"], "seconds": time.perf_counter() - t0,
                  "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--midsize", type=Path, required=True, help="folder for tests/midsize.py's model (built if absent)")
    ap.add_argument("--resolution", type=int, default=128, help="image side in pixels")
    ap.add_argument("--sample-steps", type=int, default=6, help="denoising steps per rollout")
    ap.add_argument("--k", type=int, default=2, help="steps the gradient goes through (AlignProp's K)")
    ap.add_argument("--batch", type=int, default=2, help="images per step")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from lowmem_alignprop.measure.provenance import provenance

    # the provenance block every result carries: command, date, device, versions
    out: dict = {**provenance(" ".join([sys.executable, *sys.argv])), "config": {
        "resolution": args.resolution, "sample_steps": args.sample_steps, "k": args.k, "batch_size": args.batch}}
    for method in ("counter", "events"):
        code = _CHILD.format(tests=str(ROOT / "tests"), method=method, model=str(args.midsize), batch=args.batch,
                             res=args.resolution, steps=args.sample_steps, k=args.k)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        out[method] = json.loads(done.stdout.strip().splitlines()[-1])
    c, e = out["counter"], out["events"]
    print(f"{'stage':16} {'counter MiB':>12} {'events MiB':>11} {'counter/events':>15}")
    for name in c["stages"]:
        a, b = c["stages"][name], e["stages"][name]
        print(f"{name:16} {a / MIB:12.2f} {b / MIB:11.2f} {a / b:15.4f}")
    print(f"{'process max RSS':16} {c['maxrss'] / MIB:12.0f} {e['maxrss'] / MIB:11.0f}")
    print(f"{'seconds':16} {c['seconds']:12.1f} {e['seconds']:11.1f}")
    if args.json:
        from lowmem_alignprop.run import atomic

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(args.json, json.dumps(out, indent=1) + "\n")  # whole or not at all
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""TRL's AlignPropTrainer (trl 0.23.1, its last release with it) against this trainer on the CPU: CPU seconds per
step and peak resident memory, same model, K, steps, batch, resolution, guidance, eta, LoRA and reward.

Models: the shipped toy world (lowmem_alignprop/toy/weights/model, 64 px, 20 DDIM steps, guidance 3, batch 4) and
tests/midsize.py's mid-size SD-shaped model (128 px, 4 DDIM steps, batch 2; as benchmarks/speed_bench.py). Both
trainers: fp32, one thread (OMP_NUM_THREADS=1), LoRA rank 4 on the UNet's to_q/to_k/to_v/to_out.0 (TRL's fixed
choice, and ours), lr 1e-3, gradient clipping at norm 1, DDIM eta 1, gradients through the last K steps (TRL:
``truncated_backprop_rand=False, truncated_backprop_timestep=T-K``), the brightness reward (mean BT.601 luma of the
image in [0, 1]; TRL's loss is ``10 - mean(reward)``, ours ``-mean(reward)``: the same gradient), the same prompts.

Each run is its own process (TRL's in the venv that has trl, ours in this environment), and the runs alternate
(ours, TRL, ours, TRL, ...) so that other jobs on the machine weigh on both alike. Per step: CPU seconds of the
training step (``time.process_time`` around TRL's ``AlignPropTrainer.step`` and our ``Trainer.train_step``); the
first two steps are left out (warm-up; our step 2 is the step the profiler measures). Peak RSS: the process's
``ru_maxrss`` at the end (model loading included; our run's before/after samples are off).

    python benchmarks/trl_compare.py --trl-python /work/trlvenv/bin/python [--steps 6] [--repeats 2]

The venv: ``python -m venv /work/trlvenv && /work/trlvenv/bin/pip install torch==2.13.0 &&
/work/trlvenv/bin/pip install trl==0.23.1 diffusers==0.42.1 peft accelerate``. Not a test dependency.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "trl-compare-cpu.json"
WARMUP = 2  # steps left out of the mean


def luma_mean(images):
    """Brightness: mean BT.601 luma of [B, 3, H, W] images in [0, 1] (lowmem_alignprop.rewards.simple's formula)."""
    return (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).mean(dim=(1, 2))


# ----------------------------------------------------------------------------------------------------------------
# the two drivers (each runs in its own process)
# ----------------------------------------------------------------------------------------------------------------
def drive_trl(job: dict) -> dict:
    import random

    import torch

    torch.set_num_threads(1)
    import trl
    from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline

    work = Path(tempfile.mkdtemp(prefix="trl_compare-"))
    config = AlignPropConfig(
        num_epochs=job["steps"], sample_num_steps=job["sample_steps"], sample_guidance_scale=job["guidance"],
        sample_eta=1.0, train_batch_size=job["batch"], train_learning_rate=1e-3, train_max_grad_norm=1.0,
        train_gradient_accumulation_steps=1, truncated_backprop_rand=False,
        truncated_backprop_timestep=job["sample_steps"] - job["k"], mixed_precision="no", log_with=None,
        save_freq=10**9, seed=job["seed"], project_kwargs={"project_dir": str(work), "logging_dir": str(work / "logs"),
                                                           "automatic_checkpoint_naming": True, "total_limit": 1})
    from accelerate import PartialState

    PartialState()  # TRL warns (no LoRA file to load from a plain model) through accelerate's logger, which needs it
    pipeline = DefaultDDPOStableDiffusionPipeline(job["model"], use_lora=True)
    rng = random.Random(job["seed"])
    prompts = job["prompts"]

    def reward_fn(images, prompts_, metadata):
        return luma_mean(images.float()), {}

    trainer = AlignPropTrainer(config, reward_fn, lambda: (rng.choice(prompts), {}), pipeline)
    seconds, step = [], 0
    for epoch in range(job["steps"]):
        t0 = time.process_time()
        step = trainer.step(epoch, step)
        seconds.append(time.process_time() - t0)
    return {"trainer": "trl", "versions": {"trl": trl.__version__, **_versions()}, "step_cpu_seconds": seconds}


def time_train_steps() -> list[float]:
    """From now on in this process, every ``Trainer.train_step`` appends its CPU seconds to the list returned."""
    sys.path.insert(0, str(ROOT))
    import lowmem_alignprop.training.train as train_mod

    seconds: list[float] = []
    plain = train_mod.Trainer.train_step

    def timed(self, *args, **kwargs):
        t0 = time.process_time()
        try:
            return plain(self, *args, **kwargs)
        finally:
            seconds.append(time.process_time() - t0)

    train_mod.Trainer.train_step = timed
    return seconds


def drive_ours(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    seconds = time_train_steps()
    from lowmem_alignprop.cli import main

    work = Path(tempfile.mkdtemp(prefix="trl_compare-"))
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("\n".join(job["prompts"]) + "\n")
    sets = {"resolution": job["resolution"], "sample_steps": job["sample_steps"], "k": job["k"],
            "truncation": "fixed", "batch_size": job["batch"], "guidance_scale": job["guidance"], "eta": 1.0,
            "lr": 1e-3, "max_grad_norm": 1.0, "lora_rank": 4, "grad_accum": 1, "sample_prompts": 0,
            "fidelity_images": 0, "mixed_precision": "no"}
    argv = ["--profile", "cpu", "--model", job["model"], "--reward", "brightness", "--prompts", str(prompt_file),
            "--steps", str(job["steps"]), "--seed", str(job["seed"]), "--output-dir", str(work / "run")]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    if main(argv) != 0:
        raise SystemExit("our run failed")
    import lowmem_alignprop
    report = json.loads((work / "run" / "memory_report.json").read_text())  # issue 22: RSS against load + peak
    summary = json.loads((work / "run" / "summary.json").read_text())
    memory = {k: report.get(k) for k in ("rss", "peak_allocated", "baseline", "first_step_rss_start")}
    return {"trainer": "ours", "versions": {"lowmem_alignprop": getattr(lowmem_alignprop, "__version__", "main"),
                                            **_versions()}, "step_cpu_seconds": seconds, "memory_report": memory,
            "host_allocator": summary.get("host_allocator")}


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def driver(argv: list[str]) -> int:
    job = json.loads(argv[1])
    result = (drive_trl if argv[0] == "trl" else drive_ours)(job)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# the comparison
# ----------------------------------------------------------------------------------------------------------------
def jobs(midsize: Path, steps: int) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from lowmem_alignprop.step.prompts import load_prompts

    toy = ROOT / "lowmem_alignprop" / "toy" / "weights" / "model"
    return [
        {"name": "toy world", "model": str(toy), "resolution": 64, "sample_steps": 20, "k": 2, "batch": 4,
         "guidance": 3.0, "prompts": load_prompts("toy-pairs"), "steps": steps, "seed": 0},
        {"name": "midsize", "model": str(midsize), "resolution": 128, "sample_steps": 4, "k": 2, "batch": 2,
         "guidance": 7.5, "prompts": load_prompts("simple_animals"), "steps": steps, "seed": 0},
    ]


def run_one(python: str, which: str, job: dict, extra_env: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="" if which == "trl" else str(ROOT),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(extra_env or {}))
    t0 = time.time()
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--driver", which, json.dumps(job)], env=env,
                          capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        return {"trainer": which, "error": (proc.stdout + proc.stderr)[-3000:], "returncode": proc.returncode}
    result = json.loads(line[len("RESULT "):])
    steady = result["step_cpu_seconds"][WARMUP:] or result["step_cpu_seconds"]
    result.update(cpu_seconds_per_step=sum(steady) / len(steady), wall_seconds=round(time.time() - t0, 1))
    return result


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--driver":
        return driver(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trl-python", default="/work/trlvenv/bin/python", help="a Python with trl==0.23.1")
    ap.add_argument("--steps", type=int, default=6, help="training steps per run (default 6)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each trainer, interleaved (default 2)")
    ap.add_argument("--only", default="toy world,midsize", help="comma-separated jobs (default 'toy world,midsize')")
    ap.add_argument("--out", type=Path, default=OUT, help=f"the runs and their summary, JSON (default {OUT.name} in "
                    "results/)")
    ap.add_argument("--ours-env", action="append", default=[], metavar="'VAR=VALUE ...'",
                    help="one more run of ours per repeat with these environment variables (e.g. "
                         "'MALLOC_MMAP_THRESHOLD_=1048576 MALLOC_TRIM_THRESHOLD_=2097152'); repeatable")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from midsize import build_midsize_dir

    from lowmem_alignprop.measure.provenance import provenance
    from lowmem_alignprop.run import atomic

    try:
        probe = subprocess.run([args.trl_python, "-c", "import trl; print(trl.__version__)"], capture_output=True,
                               text=True)
    except OSError as e:  # (no such Python: a traceback)
        raise SystemExit(f"--trl-python {args.trl_python}: {e.strerror or type(e).__name__}; make a virtual "
                         "environment with trl 0.23.1 and pass its python") from None
    trl_version = probe.stdout.strip() if probe.returncode == 0 else None
    doc = {"kind": "trl_compare",  # each run is a subprocess with one torch thread
           **provenance(" ".join(["python"] + sys.argv), ("torch",), threads=1, torch_threads=1,
                        load_average_at_start=os.getloadavg()),
           "trl_python": args.trl_python, "trl_version": trl_version, "warmup_steps_left_out": WARMUP, "runs": []}
    if trl_version != "0.23.1":
        doc["skipped"] = f"trl 0.23.1 is not importable by {args.trl_python} ({trl_version or probe.stderr[-300:]})"
        atomic.write_text(args.out, json.dumps(doc, indent=1))
        print(doc["skipped"])
        return 1
    midsize = build_midsize_dir(Path(tempfile.mkdtemp(prefix="trl_compare-")) / "midsize")
    for job in jobs(midsize, args.steps):
        if job["name"] not in args.only.split(","):
            continue
        for rep in range(args.repeats):
            variants = [("ours", sys.executable, {}), ("trl", args.trl_python, {})] + [
                ("ours", sys.executable, dict(x.split("=", 1) for x in spec.split())) for spec in args.ours_env]
            for which, python, extra in variants:  # A B A B (A B C A B C with --ours-env)
                row = {"job": job["name"], "repeat": rep, **{k: v for k, v in job.items() if k not in ("prompts",)},
                       **({"env": extra} if extra else {}), **run_one(python, which, job, extra)}
                doc["runs"].append(row)
                label = which + "".join(f" {k}={v}" for k, v in extra.items())
                print(f"{job['name']:10} {label:5} rep {rep}: " + (
                    f"{row['cpu_seconds_per_step']:.3f} CPU s/step, peak RSS {row['peak_rss_mib']:.0f} MiB"
                    if "error" not in row else "FAILED " + row["error"][-400:]), flush=True)
                atomic.write_text(args.out, json.dumps(doc, indent=1))
    doc["device"]["load_average_at_end"] = os.getloadavg()
    atomic.write_text(args.out, json.dumps(doc, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The AlignProp paper's experiments, rerun on the toy world (docs/toy_world.md) on a CPU.

Every training run is ``python -m lowmem_alignprop --model toy --profile cpu ...`` in its own process (the package's
own trainer, no copy of its loop), with ``--set fidelity_every=N``, so the exact evaluators judge the same
fixed-seed images every N steps (the toy world's ``metrics.jsonl`` figures; step 0 is ``summary.json``'s
``toy_world.before``). The experiments:

1. ``truncation``: toy_clip on the four held-out pairs (``toy-pairs``) with K = 1, K ~ U{1..T} (the paper's
   randomized K) and K = T (the full chain, T = 20 DDIM steps): same prompts, seeds and learning rate;
2. ``count``: ``toy_count=N`` for two targets on ``toy-train`` prompts: the exact detected count against steps;
3. ``jpeg``: the ``jpeg_compressibility`` reward on ``toy-pairs``: the real JPEG size against steps;
4. ``mix``: the LoRAs of (1)'s randomized-K run (toy_clip) and (3) (compressibility), mixed with
   ``lora/adapters.py``'s adapter mixing (what ``sample --lora A:w --lora B:w`` does) at weights
   ``A: 1 - a, B: a``; toy_clip, jpeg_compressibility and the exact fidelity against ``a``;
5. ``hack``: a long compressibility run: the reward keeps rising while the exact prompt fidelity falls; the
   plot marks the first evaluated step from which the fidelity stays below its start;
6. ``rl``: the paper's headline comparison, AlignProp (the toy defaults) against DDPO (TRL's ``DDPOTrainer``, a
   likelihood-ratio RL baseline, run in the Python given by ``--trl-python``; skipped with a line without it):
   reward per sampled image, per optimizer step and per CPU second, both judged on the same fixed-seed images
   (``benchmarks/ddpo_toy.py``).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/toy_experiments.py            # 1-5 (6: --trl-python): ~30 min CPU
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/toy_experiments.py --quick    # the same, small: a few minutes
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/toy_experiments.py --only rl --trl-python /work/trlvenv/bin/python
    python benchmarks/toy_experiments.py --only jpeg --steps 2 --fidelity-images 4 --out /tmp/x --no-plots  # smoke
    python benchmarks/toy_experiments.py --report-only   # redraw the plots, rebuild REPORT.md's section from the JSON

Writes ``OUT/toy_experiments.json`` (``-quick`` for --quick; every file atomically), one PNG per experiment
(``OUT/toy-<experiment>.png``, matplotlib), and (default mode, default OUT) section 7 of benchmarks/REPORT.md.
The training runs' folders go to ``outputs/toy_experiments/<mode>/<run>`` (not in git); a run whose folder already
holds a finished run of the same settings and the same toy weights is reused (``--fresh`` retrains). The CPU
time of every run (user + system of its process) is in the JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import ddpo_toy  # noqa: E402  (experiment rl; imports only the standard library here)

from lowmem_alignprop.run import atomic  # noqa: E402

DEFAULT_OUT = HERE / "results" / "toy"
EXPERIMENTS = ("truncation", "count", "jpeg", "mix", "hack", "rl")
SECTION_TITLE = "## 7. The paper's experiments on the toy world"
T = 20  # the toy model's DDIM steps (settings.profiles.MODEL_DEFAULTS["toy"])
COUNT_TARGETS = (1, 4)
JPEG = "jpeg_compressibility"
DEFAULT_NOTE = "one thread per run; the machine was shared with other jobs"


@dataclass
class Mode:
    """Steps and sizes of one mode of the script."""
    name: str
    steps: int  # experiments 1-3
    hack_steps: int  # experiment 5
    every: int  # fidelity_every for 1-3
    hack_every: int
    fidelity_images: int
    mix_weights: tuple[float, ...]
    mix_images: int
    rl_every: int = 10  # experiment 6: AlignProp's LoRA judged every this many steps (of ``steps``)
    rl_epochs: int = 120  # experiment 6: DDPO's epochs (each samples as many images as an AlignProp step)

    def rl_plan(self) -> ddpo_toy.Plan:
        """DDPO is first judged when it has sampled as many images as AlignProp's whole run (epoch = ``steps``)."""
        return ddpo_toy.Plan(steps=self.steps, every=self.rl_every, epochs=self.rl_epochs, epochs_every=self.steps,
                             images=self.fidelity_images)


MODES = {
    "default": Mode("default", steps=30, hack_steps=100, every=5, hack_every=10, fidelity_images=32,
                    mix_weights=(0.0, 0.25, 0.5, 0.75, 1.0), mix_images=32),
    "quick": Mode("quick", steps=6, hack_steps=12, every=3, hack_every=4, fidelity_images=8,
                  mix_weights=(0.0, 0.5, 1.0), mix_images=8, rl_every=3, rl_epochs=12),
}


@dataclass
class Run:
    """One training run: the CLI's arguments and --set items."""
    name: str
    reward: str
    prompts: str
    steps: int
    sets: dict = field(default_factory=dict)

    def argv(self, out: Path) -> list[str]:
        argv = ["--model", "toy", "--profile", "cpu", "--seed", "0", "--output-dir", str(out), "--reward", self.reward,
                "--prompts", self.prompts, "--steps", str(self.steps)]
        for key, value in self.sets.items():
            argv += ["--set", f"{key}={value}"]
        return argv


def runs_of(experiment: str, mode: Mode) -> list[Run]:
    """The training runs an experiment needs (``mix`` needs (1)'s randomized-K run and (3)'s run)."""
    judged = {"fidelity_every": mode.every, "fidelity_images": mode.fidelity_images, "sample_prompts": 0}
    clip = {"toy_clip K=1": {"truncation": "fixed", "k": 1},
            "toy_clip K~U{1..20}": {"truncation": "uniform", "k_min": 1, "k_max": T},
            f"toy_clip K={T} (full chain)": {"truncation": "fixed", "k": T}}
    if experiment == "truncation":
        return [Run(name, "toy_clip", "toy-pairs", mode.steps, {**judged, **sets}) for name, sets in clip.items()]
    if experiment == "count":
        return [Run(f"toy_count={n}", f"toy_count={n}", "toy-train", mode.steps, dict(judged)) for n in COUNT_TARGETS]
    if experiment == "jpeg":
        return [Run(JPEG, JPEG, "toy-pairs", mode.steps, dict(judged))]
    if experiment == "mix":
        return [runs_of("truncation", mode)[1], runs_of("jpeg", mode)[0]]
    if experiment == "hack":
        sets = {**judged, "fidelity_every": mode.hack_every}
        return [Run(f"{JPEG} (long)", JPEG, "toy-pairs", mode.hack_steps, sets)]
    if experiment == "rl":
        return []  # both trainings are ddpo_toy.run_rl's (AlignProp with the toy defaults, DDPO in trl's Python)
    raise ValueError(experiment)


# ------------------------------------------------------------------------------------------------ running
def toy_weights_digest(rewards: str) -> str:
    """sha256 over the shipped toy model's weights and those of the toy rewards named in ``rewards`` (reward specs):
    a run trained on other weights is not reused, and a run whose rewards need no weights survives a retraining of
    the toy rewards."""
    from lowmem_alignprop.models.loading import TOY_MODEL_DIR

    weights = Path(TOY_MODEL_DIR).parent
    folders = [weights / "model"] + [weights / "rewards" / n for n in ("toy_clip", "toy_count") if n in rewards]
    h = hashlib.sha256()
    for path in sorted(f for folder in folders for f in folder.rglob("*.safetensors")):
        h.update(str(path.relative_to(weights)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(run: Run, work: Path, threads: int, fresh: bool) -> dict:
    """Train ``run`` in its own process (or reuse a finished run of the same settings and weights) and return its
    curves: the per-step training batch's reward and K, and the fixed-seed evaluations (step 0 = before)."""
    out = work / run.name.replace(" ", "_").replace("/", "-")
    stamp = {"run": asdict(run), "toy_weights": toy_weights_digest(run.reward)}
    done = out / "summary.json"
    if fresh or not done.is_file() or _load(out / "benchmark_run.json") != stamp:
        if out.exists():
            import shutil
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "lowmem_alignprop", *run.argv(out)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT) + os.pathsep
                   + os.environ.get("PYTHONPATH", ""), LOWMEM_ALIGNPROP_MODEL="toy")
        cpu0, t0 = _children_cpu(), time.time()
        print(f"[toy_experiments] training {run.name}: {run.steps} steps", flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"run {run.name} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
        stamp.update(cpu_seconds=round(_children_cpu() - cpu0, 1), wall_seconds=round(time.time() - t0, 1),
                     command="python -m lowmem_alignprop " + " ".join(run.argv(Path("OUT"))))
        atomic.write_text(out / "benchmark_run.json", json.dumps(stamp, indent=1))
    else:
        stamp = json.loads((out / "benchmark_run.json").read_text())
        print(f"[toy_experiments] reusing {out}", flush=True)
    return curves(out, run, stamp)


def _shown(path: Path) -> str:
    """A path relative to the repository when it is inside it (the JSON is committed), else absolute."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _load(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {k: data.get(k) for k in ("run", "toy_weights")}


EVAL_KEYS = ("reward", "fidelity_score", "fidelity_all_ok", "fidelity_objects_ok", "fidelity_shapes_ok",
             "fidelity_colours_ok", "fidelity_count_ok", "fidelity_objects", "jpeg_bytes")


def curves(out: Path, run: Run, stamp: dict) -> dict:
    metrics = _read_jsonl(out / "metrics.jsonl")
    toy = json.loads((out / "summary.json").read_text())["toy_world"]
    evals = [{"step": 0, **{k: toy["before"][k] for k in EVAL_KEYS}}]
    for m in metrics:
        if "fidelity_score" in m:
            evals.append({"step": m["step"], "reward": m["fidelity_reward"], **{k: m[k] for k in EVAL_KEYS[1:]}})
    return {"reward": run.reward, "prompts": run.prompts, "steps": run.steps, "sets": run.sets,
            "command": stamp["command"], "cpu_seconds": stamp["cpu_seconds"], "wall_seconds": stamp["wall_seconds"],
            "judged_images": toy["images"], "lora": _shown(out / "lora"),
            "train": {"step": [m["step"] for m in metrics], "reward_mean": [m["reward_mean"] for m in metrics],
                      "k": [m["k"] for m in metrics]},
            "eval": evals}


# ------------------------------------------------------------------------------------------------ mixing
def mix(a: dict, b: dict, mode: Mode, threads: int) -> dict:
    """Adapters A and B loaded into one pipeline with the package's ``sample`` code and mixed at ``A: 1 - w, B: w``
    for each w; every mix (and the base model) renders the same prompts and seeds, scored by both rewards and the
    exact evaluators."""
    import torch

    from lowmem_alignprop.cli import common_parser, config_from_args
    from lowmem_alignprop.settings.quiet import quiet_libraries
    from lowmem_alignprop.commands import evaluate as ev
    from lowmem_alignprop.commands.sample_pipeline import build_pipeline
    from lowmem_alignprop.lora.adapters import load_adapters, mix_adapters
    from lowmem_alignprop.lora.lora_args import parse_lora
    from lowmem_alignprop.rewards import build_reward
    from lowmem_alignprop.step.prompts import load_prompts
    from lowmem_alignprop.toy.fidelity import evaluate_batch

    quiet_libraries()  # the sample command's console: no library chatter
    torch.set_num_threads(threads)
    cpu0, t0 = _self_cpu(), time.time()
    args = common_parser("toy_experiments", "").parse_args(["--model", "toy", "--profile", "cpu", "--seed", "0"])
    _, cfg = config_from_args(args)
    prompt_set = load_prompts(a["prompts"])
    per_prompt = max(1, mode.mix_images // len(prompt_set))
    prompts = [p for p in prompt_set for _ in range(per_prompt)]
    seeds = [s for row in ev.image_seeds(cfg.seed, len(prompt_set), per_prompt) for s in row]
    rewards = {name: build_reward(name, device="cpu") for name in (a["reward"], b["reward"])}
    pipe = build_pipeline(cfg, torch.device("cpu"), torch.float32)
    specs = [parse_lora(str(ROOT / a["lora"]), 0), parse_lora(str(ROOT / b["lora"]), 1)]
    load_adapters(pipe, specs, cfg.model)

    def judge(images) -> dict:
        row = {name: float(ev.score(r, images, prompts, torch.device("cpu"), cfg.batch_size).mean())
               for name, r in rewards.items()}
        return {**row, **{k: v for k, v in evaluate_batch(images, prompts).items() if k in EVAL_KEYS}}

    pipe.disable_lora()
    base = judge(ev.generate(pipe, prompts, seeds, cfg, cfg.batch_size))
    rows = []
    for w in mode.mix_weights:
        specs[0].weight, specs[1].weight = 1.0 - w, w
        mix_adapters(pipe, specs)
        rows.append({"weight_b": w, **judge(ev.generate(pipe, prompts, seeds, cfg, cfg.batch_size))})
        print(f"[toy_experiments] mixed A:{1 - w:g} B:{w:g}", flush=True)
    return {"a": a["reward"], "b": b["reward"], "lora_a": a["command"], "lora_b": b["command"], "prompts": a["prompts"],
            "images": len(prompts), "base": base, "mixes": rows, "cpu_seconds": round(_self_cpu() - cpu0, 1),
            "wall_seconds": round(time.time() - t0, 1)}


# ------------------------------------------------------------------------------------------------ findings
def _at(evals: list[dict], key: str) -> tuple[float, float]:
    return evals[0][key], evals[-1][key]


def hack_point(evals: list[dict]) -> int | None:
    """The first evaluated step from which the exact fidelity score stays below its start (None: it never does)."""
    start = evals[0]["fidelity_score"]
    for i in range(1, len(evals)):
        if all(e["fidelity_score"] < start for e in evals[i:]):
            return evals[i]["step"]
    return None


def findings(name: str, result: dict) -> list[str]:
    """One line per run (or mix): the numbers the report quotes."""
    if name == "rl":
        return ddpo_toy.findings(result)
    if name == "mix":
        lines = [f"base model: {result['a']} {result['base'][result['a']]:.1f}, {result['b']} "
                 f"{result['base'][result['b']]:.3f}, fidelity score {result['base']['fidelity_score']:.3f}"]
        for r in result["mixes"]:
            lines.append(f"A:{1 - r['weight_b']:g} B:{r['weight_b']:g}: {result['a']} {r[result['a']]:.1f}, "
                         f"{result['b']} {r[result['b']]:.3f}, JPEG {r['jpeg_bytes']:.0f} bytes, fidelity score "
                         f"{r['fidelity_score']:.3f}, all right {r['fidelity_all_ok']:.0%}")
        return lines
    lines = []
    for label, run in result["runs"].items():
        e = run["eval"]
        (r0, r1), (f0, f1), (a0, a1) = _at(e, "reward"), _at(e, "fidelity_score"), _at(e, "fidelity_all_ok")
        (n0, n1), (j0, j1) = _at(e, "fidelity_objects"), _at(e, "jpeg_bytes")
        line = (f"{label}: reward {r0:.2f} -> {r1:.2f}, fidelity score {f0:.3f} -> {f1:.3f}, all right {a0:.0%} -> "
                f"{a1:.0%}, objects detected {n0:.2f} -> {n1:.2f}, JPEG {j0:.0f} -> {j1:.0f} bytes "
                f"({run['steps']} steps, {run['cpu_seconds']:.0f} s CPU)")
        if name == "hack":
            step = hack_point(e)
            line += (f"; fidelity below its start from step {step} on" if step is not None
                     else "; fidelity never stays below its start")
        lines.append(line)
    return lines


# ------------------------------------------------------------------------------------------------ plots
def plot(name: str, result: dict, path: Path) -> None:
    """One PNG per experiment (matplotlib; nothing when it is not installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[toy_experiments] matplotlib is not installed: no plots", flush=True)
        return
    if name == "mix":
        fig, axes = _plot_mix(plt, result)
    elif name == "rl":
        fig, axes = ddpo_toy.plot(plt, result)
        fig.suptitle(TITLES[name], fontsize=10)
    else:
        fig, axes = _plot_curves(plt, name, result)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic.replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _plot_curves(plt, name: str, result: dict):
    panels = {"truncation": ("reward", "fidelity_score"), "count": ("reward", "fidelity_objects"),
              "jpeg": ("reward", "jpeg_bytes"), "hack": ("reward", "fidelity_score", "fidelity_all_ok")}[name]
    labels = {"reward": "reward on the fixed-seed images", "fidelity_score": "exact fidelity score",
              "fidelity_objects": "objects detected (exact)", "jpeg_bytes": "real JPEG size (bytes)",
              "fidelity_all_ok": "exact: images all right (rate)"}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8))
    for label, run in result["runs"].items():
        steps = [e["step"] for e in run["eval"]]
        for ax, key in zip(axes, panels):
            ax.plot(steps, [e[key] for e in run["eval"]], marker="o", label=f"{label} ({run['cpu_seconds']:.0f} s CPU)")
        if name == "truncation":  # the training batches' reward (other noise each step), a 5-step running mean
            r = run["train"]["reward_mean"]
            smooth = [sum(r[max(0, i - 4):i + 1]) / len(r[max(0, i - 4):i + 1]) for i in range(len(r))]
            axes[0].plot(run["train"]["step"], smooth, alpha=0.35, linestyle="--",
                         color=axes[0].lines[-1].get_color(), label="  its training batches (5-step mean)")
        if name == "hack":
            step = hack_point(run["eval"])
            if step is not None:
                for ax in axes:
                    ax.axvline(step, color="red", linestyle="--", label=f"fidelity below its start from step {step}")
            for ax, key in zip(axes[1:], panels[1:]):
                ax.axhline(run["eval"][0][key], color="gray", linestyle=":", label="start")
        if name == "count":  # the run's target count, in its colour
            axes[1].axhline(float(run["reward"].split("=")[1]), color=axes[1].lines[-1].get_color(), linestyle=":")
    for ax, key in zip(axes, panels):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(labels[key])
        ax.legend(fontsize=7)
    fig.suptitle(TITLES[name], fontsize=10)
    return fig, axes


def _plot_mix(plt, result: dict):
    w = [r["weight_b"] for r in result["mixes"]]
    panels = ((result["a"], f"A: {result['a']}"), (result["b"], f"B: {result['b']}"),
              ("fidelity_score", "exact fidelity score"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, (key, label) in zip(axes, panels):
        ax.plot(w, [r[key] for r in result["mixes"]], marker="o", label="A: 1 - w, B: w")
        ax.axhline(result["base"][key], color="gray", linestyle=":", label="base model")
        ax.set_xlabel("mixing weight w of B")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(TITLES["mix"], fontsize=10)
    return fig, axes


TITLES = {
    "truncation": "1. toy_clip against steps: K = 1, K ~ U{1..20}, full chain (K = 20)",
    "count": "2. object-count control: toy_count=N, exact detected count",
    "jpeg": "3. compressibility: jpeg_compressibility reward and the real JPEG size",
    "mix": "4. mixing the toy_clip LoRA (A) and the compressibility LoRA (B)",
    "hack": "5. reward hacking: a long compressibility run and the exact prompt fidelity",
    "rl": "6. AlignProp against DDPO (TRL's DDPOTrainer): reward per sampled image, optimizer step and CPU second",
}


# ------------------------------------------------------------------------------------------------ report
def report_section(doc: dict | None) -> list[str]:
    """REPORT.md's section on the toy experiments, from the default run's JSON (memory_bench.py calls it too)."""
    L = ["", SECTION_TITLE, ""]
    if not doc:
        return L + ["Not run yet: `OMP_NUM_THREADS=1 nice -n 10 python benchmarks/toy_experiments.py`.", ""]
    meta = doc["meta"]
    L += ["`OMP_NUM_THREADS=1 nice -n 10 python benchmarks/toy_experiments.py` (each experiment's date and toy "
          f"weights are in its section; last invocation `{meta['command']}`, {meta['date']}): {meta['device']}; "
          f"{meta['versions']}. Total CPU time of the runs "
          f"{meta['cpu_seconds']:.0f} s ({meta['cpu_seconds'] / 60:.1f} min), wall {meta['wall_seconds'] / 60:.0f} min "
          "summed over the runs "
          f"({meta['note']}). Results `results/toy/toy_experiments.json`, plots `results/toy/toy-*.png`.", "",
          "Every run: the shipped toy model, `--profile cpu` (LoRA rank 4, lr 3e-3, batch 4, DDIM 20 steps, guidance "
          "3), seed 0; the exact evaluators judge the same fixed-seed images every few steps (step 0: before "
          "training). The rewards on those images, not the training batches' (other prompts each step), are "
          "what the figures quote. \"Toy weights\": 16 hex digits of a sha256 over the toy model's weight files and "
          "those of the toy rewards the experiment trains on (`toy_weights_digest`).", ""]
    for name in EXPERIMENTS:
        if name not in doc["experiments"]:
            continue
        result = doc["experiments"][name]
        L += [f"### {TITLES[name]}", "", f"{HOW[name]} Run {result.get('date', '?')}, toy weights "
              f"{result.get('toy_weights', '?')}, {_settings(name, result)}.", "",
              f"![{name}](results/toy/toy-{name}.png)", ""]
        L += [f"- {line}" for line in result["findings"]]
        if name == "rl":
            L += [""] + ddpo_toy.report_table(result)
        if result.get("note"):
            L += ["", result["note"]]
        L.append("")
    return L


HOW = {
    "truncation": "toy_clip on `toy-pairs`; K fixed at 1, K drawn uniformly in 1..20 per rollout (`--set "
                  "truncation=uniform --set k_min=1 --set k_max=20`), K = 20 (the whole chain).",
    "count": "`--reward toy_count=N` on `toy-train` (1-4 objects a prompt); the exact evaluator's mean number of "
             "objects detected against the target (dotted).",
    "jpeg": "`--reward jpeg_compressibility` (minus the differentiable estimate of the JPEG size, in kB) on "
            "`toy-pairs`; the real JPEG size of the same images from PIL.",
    "mix": "LoRA A (experiment 1's K ~ U{1..20} run, toy_clip) and LoRA B (experiment 3's run, compressibility) "
           "loaded as two adapters of one pipeline (`lora/adapters.py`, as `sample --lora A:1-w --lora B:w`); "
           "every weight renders the same prompts and seeds, scored by both rewards and the exact evaluators.",
    "hack": "`jpeg_compressibility` on `toy-pairs`, trained long; the dashed line marks the first judged step "
            "from which the exact fidelity score stays below its start.",
    "rl": "AlignProp: the toy world's defaults (`python -m lowmem_alignprop`: its reward, prompts, K, lr and batch, "
          "read from the package when the experiment runs). DDPO: TRL's `DDPOTrainer` "
          "(`DefaultDDPOStableDiffusionPipeline` over the same toy model; the same reward imported from this "
          "repository, prompts, LoRA rank, resolution, DDIM steps, eta and guidance) in the venv given by "
          "`--trl-python`, with DDPO's hyper-parameters scaled to the toy (below). Each method trains in its own "
          "process, one thread; CPU seconds are `time.process_time` around each training step (model loading left "
          "out). Both LoRAs, saved at a few points, are judged afterwards by one judge: the same fixed-seed images "
          "(one generator per image) rendered by the `sample` pipeline, the reward's mean and the exact evaluators; "
          "point 0 is the base model for both; \"(+d ± s)\": the mean per-image difference of the reward over those "
          "images (paired: same prompts and seeds) and its standard error. Dashed: the training batches' reward.",
}


def _settings(name: str, result: dict) -> str:
    if name == "rl":
        toy, ap = result["toy"], result["runs"]["AlignProp"]
        return (f"{ddpo_toy.provenance_line(result)}; {result['judged_images']} judged images; AlignProp: "
                f"`{ap['command']}` "
                f"({toy['reward']} on `{toy['prompts']}`, {toy['resolution']} px, DDIM {toy['sample_steps']} steps, "
                f"eta {toy['eta']:g}, guidance {toy['guidance_scale']:g}, batch {toy['batch_size']}, LoRA rank "
                f"{toy['lora_rank']}, lr {toy['lr']:g}, K {toy['k']} ({toy['truncation']})); DDPO: "
                f"{result['ddpo']['describe']}")
    if name == "mix":
        return f"{result['images']} images ({result['prompts']}), weights w = " + ", ".join(
            f"{r['weight_b']:g}" for r in result["mixes"])
    run = next(iter(result["runs"].values()))
    return (f"{run['steps']} steps, {run['judged_images']} judged images every {run['sets']['fidelity_every']} "
            f"steps; {'the first run' if len(result['runs']) > 1 else 'the run'}: `{run['command']}`")


def update_report(doc: dict, report: Path = HERE / "REPORT.md") -> None:
    """Replace (or append) the section in REPORT.md, leaving the rest as memory_bench.py wrote it."""
    text = report.read_text() if report.is_file() else ""
    head, sep, tail = text.partition("\n" + SECTION_TITLE + "\n")
    rest = ""
    if sep:
        nxt = tail.find("\n## ")
        rest = tail[nxt:] if nxt >= 0 else ""
    atomic.write_text(report, head.rstrip("\n") + "\n" + "\n".join(report_section(doc)).rstrip("\n") + "\n" + rest)


def load_doc(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ main
def run_experiment(name: str, mode: Mode, work: Path, args) -> dict | None:
    """The experiment's result with its findings; None when it was skipped (rl without a Python that has trl)."""
    if name == "rl":
        weights = toy_weights_digest(ddpo_toy.toy_config().reward)
        result = ddpo_toy.run_rl(mode.rl_plan(), work, args.trl_python, args.threads, weights, args.fresh)
        if result is not None:
            result["findings"] = findings(name, result)
        return result
    trained = {run.name: train(run, work, args.threads, args.fresh) for run in runs_of(name, mode)}
    if name == "mix":
        a, b = runs_of("mix", mode)
        result = mix(trained[a.name], trained[b.name], mode, args.threads)
    else:
        result = {"runs": trained}
    result["findings"] = findings(name, result)
    return result


def meta(args, mode: Mode, cpu: float, wall: float) -> dict:
    import diffusers
    import peft
    import torch

    from lowmem_alignprop.measure.provenance import cpu_name

    return {"mode": mode.name, "date": time.strftime("%Y-%m-%d"), "command": ddpo_toy.command_line(sys.argv),
            "device": f"{cpu_name()}, {os.cpu_count()} logical cores, "
                      f"{args.threads} torch thread(s) per run",
            "versions": f"python {platform.python_version()}, torch {torch.__version__}, diffusers "
                        f"{diffusers.__version__}, peft {peft.__version__}",
            "cpu_seconds": round(cpu, 1), "wall_seconds": round(wall, 1),
            "note": args.note or DEFAULT_NOTE, "mode_settings": asdict(mode)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small steps and image counts: a few minutes of CPU")
    ap.add_argument("--only", default=",".join(EXPERIMENTS), help=f"comma-separated subset of {','.join(EXPERIMENTS)}")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON and the PNGs")
    ap.add_argument("--work", type=Path, default=None, help="folder for the training runs "
                    "(default outputs/toy_experiments/<mode>)")
    ap.add_argument("--steps", type=int, default=None, help="override the steps of every run (smoke tests)")
    ap.add_argument("--fidelity-images", type=int, default=None, help="override the judged images (smoke tests)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    ap.add_argument("--fresh", action="store_true", help="retrain runs whose folders could be reused")
    ap.add_argument("--trl-python", default=None, metavar="PATH", help="a Python with trl 0.23.1 (its DDPOTrainer): "
                    "enables experiment rl, AlignProp against DDPO (skipped without it; trl is not a dependency)")
    ap.add_argument("--no-plots", action="store_true",
                    help="write no PNG plots (the JSON and REPORT.md are still written)")
    ap.add_argument("--no-report", action="store_true", help="leave benchmarks/REPORT.md alone")
    ap.add_argument("--report-only", action="store_true", help="redraw the plots and rebuild REPORT.md's section "
                    "from the JSON")
    ap.add_argument("--note", default=None, help="how the machine was loaded and which weights, for the report "
                    "(default: one thread per run on a machine shared with other jobs); with --report-only it "
                    "replaces the stored note")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = MODES["quick" if args.quick else "default"]
    if args.steps is not None or args.fidelity_images is not None:
        steps = args.steps or mode.steps
        images = args.fidelity_images or mode.fidelity_images
        mode = Mode("custom", steps=steps, hack_steps=steps, every=max(1, steps // 2), hack_every=max(1, steps // 2),
                    fidelity_images=images, mix_weights=(0.0, 1.0), mix_images=images, rl_every=max(1, steps // 2),
                    rl_epochs=2 * steps)
    suffix = "" if mode.name == "default" else f"-{mode.name}"
    json_path = args.out / f"toy_experiments{suffix}.json"
    write_report = not args.no_report and mode.name == "default" and args.out.resolve() == DEFAULT_OUT.resolve()
    if args.report_only:  # the plots and REPORT.md's section again, from the JSON alone
        doc = load_doc(json_path)
        if doc is None:  # (it rewrote REPORT.md's section as "Not run yet", wiping the recorded figures)
            raise SystemExit(f"--report-only: {json_path} cannot be read: nothing to redraw (a run writes it)")
        if doc and args.note:
            doc["meta"]["note"] = args.note
            atomic.write_text(json_path, json.dumps(doc, indent=1))
        for name, result in (doc or {}).get("experiments", {}).items():
            if not args.no_plots:
                plot(name, result, args.out / f"toy-{name}{suffix}.png")
        if write_report:  # (--no-report and another --out rewrote benchmarks/REPORT.md from that folder's JSON)
            update_report(doc)
        return 0
    only = [e.strip() for e in args.only.split(",") if e.strip()]
    unknown = sorted(set(only) - set(EXPERIMENTS))
    if unknown:
        raise SystemExit(f"--only: unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    work = args.work or ROOT / "outputs" / "toy_experiments" / mode.name
    doc = load_doc(json_path) or {"experiments": {}}
    cpu0, t0 = _children_cpu() + _self_cpu(), time.time()
    for name in (e for e in EXPERIMENTS if e in only):  # in order: mix reuses (1)'s and (3)'s runs
        t1 = time.time()
        result = run_experiment(name, mode, work, args)
        if result is None:  # skipped: an earlier result in the JSON stays
            continue
        rewards = result["toy"]["reward"] if name == "rl" else " ".join(run.reward for run in runs_of(name, mode))
        digest = toy_weights_digest(rewards)
        doc["experiments"][name] = result
        doc["experiments"][name].update(toy_weights=digest, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                        experiment_wall_seconds=round(time.time() - t1, 1))
        for line in doc["experiments"][name]["findings"]:
            print(f"[toy_experiments] {name}: {line}", flush=True)
        if not args.no_plots:
            plot(name, doc["experiments"][name], args.out / f"toy-{name}{suffix}.png")
        doc["meta"] = meta(args, mode, _children_cpu() + _self_cpu() - cpu0, time.time() - t0)
        atomic.write_text(json_path, json.dumps(doc, indent=1))
    if "meta" not in doc:  # every experiment asked for was skipped, and the file held none: nothing to write
        return 0
    # over every experiment in the file (some may come from an earlier invocation with --only)
    doc["meta"]["cpu_seconds"] = round(sum(_experiment_cpu(r) for r in doc["experiments"].values()), 1)
    doc["meta"]["wall_seconds"] = round(sum(_experiment_cpu(r, "wall_seconds") for r in doc["experiments"].values()), 1)
    atomic.write_text(json_path, json.dumps(doc, indent=1))
    print(f"[toy_experiments] wrote {json_path} (CPU of every run in it: {doc['meta']['cpu_seconds']:.0f} s)")
    if write_report:
        update_report(doc)
    return 0


def _experiment_cpu(result: dict, key: str = "cpu_seconds") -> float:
    """CPU (or wall) seconds an experiment's own runs took (mix: the mixing alone; it reuses runs of 1 and 3)."""
    if "runs" in result:  # rl: its judging too (the others judge inside their runs)
        judging = result.get("judge_" + key, 0.0)
        return sum(run[key] for run in result["runs"].values()) + judging
    return result.get(key, 0.0)


if __name__ == "__main__":
    sys.exit(main())

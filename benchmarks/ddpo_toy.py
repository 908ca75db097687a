"""AlignProp against DDPO on the toy world: the AlignProp paper's headline comparison (reward per optimizer step and
per sampled image), run by ``benchmarks/toy_experiments.py``'s experiment ``rl`` (docs/toy_world.md).

DDPO is TRL 0.23.1's ``DDPOTrainer`` (likelihood-ratio policy gradient over the DDIM eta = 1 chain, PPO-clipped
ratio, per-prompt advantage normalisation; ``trl.DefaultDDPOStableDiffusionPipeline`` over the shipped toy model),
run in the Python that has trl (``--trl-python``; trl is not a dependency of this package). Its reward is this
package's ``toy_clip``, imported from the repository in that process. AlignProp is this package's trainer with the
toy world's defaults (read from the package when the experiment runs). Each method trains in its own process with
one thread; ``time.process_time`` around each training step (TRL's ``DDPOTrainer.step``: one epoch of sampling and
its updates; our ``Trainer.train_step``) gives CPU seconds per step, model loading left out.

Both methods' LoRAs (rank, alpha, targets and gaussian init are the same: TRL's fixed LoRA and ours) are saved at a
few points and judged afterwards by one judge: the same fixed-seed images of the run's prompts (one generator per
image) rendered by the package's ``sample`` pipeline (``commands/evaluate.py``), scored by the reward and the toy
world's exact evaluators (``toy/fidelity.evaluate_batch``). The base model (point 0) is judged once, for both.

The driver side (``python ddpo_toy.py --driver ddpo|alignprop JOB_JSON``) runs in the training process; everything
else runs in the caller's process. Only the standard library is imported at module level: the test suite imports
this file without trl.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
JUDGE_SEED = 54321  # added to the run's seed: image n of the judged set uses seed + JUDGE_SEED + n


@dataclass(frozen=True)
class DDPOSettings:
    """DDPO's hyper-parameters (ddpo-pytorch's and TRL's defaults for Stable Diffusion), scaled to the toy world.

    What is scaled, and why: images per epoch = AlignProp's images per step (the toy's batch), so that both sample
    the same number of images per iteration; two optimizer steps per epoch, as DDPO's own configuration (half the
    epoch's images per update); the learning rate = DDPO's 3e-4 times the factor by which the toy's AlignProp
    learning rate exceeds AlignProp's on Stable Diffusion (1e-3), so both methods get the same boost. Kept as DDPO
    has them: PPO clip range 1e-4, advantages clipped at 5, one inner epoch, every denoising step trained
    (timestep fraction 1), classifier-free guidance in training, per-prompt advantage statistics over the last 16
    rewards of each prompt once it has 16 (the batch's before), AdamW (0.9, 0.999, weight decay 1e-4, eps 1e-8),
    gradient norm clipped at 1."""

    lr: float
    images_per_epoch: int
    updates_per_epoch: int = 2
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    inner_epochs: int = 1
    timestep_fraction: float = 1.0
    train_cfg: bool = True
    stat_buffer: int = 16
    stat_min_count: int = 16
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0

    DDPO_SD_LR = 3e-4  # DDPO's LoRA learning rate on Stable Diffusion (ddpo-pytorch, TRL's DDPOConfig default)
    ALIGNPROP_SD_LR = 1e-3  # AlignProp's LoRA learning rate on Stable Diffusion

    @classmethod
    def for_toy(cls, alignprop_lr: float, batch: int) -> DDPOSettings:
        return cls(lr=cls.DDPO_SD_LR * alignprop_lr / cls.ALIGNPROP_SD_LR, images_per_epoch=batch)

    @property
    def train_batch(self) -> int:
        return max(1, self.images_per_epoch // self.updates_per_epoch)

    def describe(self) -> str:
        return (f"{self.images_per_epoch} images an epoch, {self.images_per_epoch // self.train_batch} updates an "
                f"epoch ({self.train_batch} images each, every one of the chain's steps), lr {self.lr:.2g}, PPO clip "
                f"range {self.clip_range:g}, advantages clipped at {self.adv_clip_max:g}, {self.inner_epochs} inner "
                f"epoch, CFG in training, per-prompt advantage statistics over the last {self.stat_buffer} rewards "
                f"(from {self.stat_min_count} on), AdamW weight decay {self.weight_decay:g}, gradient norm clipped "
                f"at {self.max_grad_norm:g}")


# ================================================================================================ the drivers
def _save_trl_lora(unet, folder: Path) -> None:
    """TRL's LoRA in diffusers' layout (what DefaultDDPOStableDiffusionPipeline.save_checkpoint writes)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    tmp = folder.with_name(folder.name + ".tmp")
    StableDiffusionPipeline.save_lora_weights(save_directory=str(tmp), unet_lora_layers=state)
    os.replace(tmp, folder)  # a folder appears whole or not at all


def drive_ddpo(job: dict) -> dict:
    """TRL's DDPOTrainer on the toy model for job["epochs"] epochs (runs in the trl venv)."""
    import random

    import torch

    torch.set_num_threads(job["threads"])
    sys.path.insert(0, str(ROOT))
    import trl
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from lowmem_alignprop.rewards import build_reward

    s = DDPOSettings(**job["ddpo"])
    out = Path(job["out"])
    config = DDPOConfig(
        num_epochs=job["epochs"], sample_num_steps=job["sample_steps"], sample_eta=job["eta"],
        sample_guidance_scale=job["guidance"], sample_batch_size=s.images_per_epoch, sample_num_batches_per_epoch=1,
        train_batch_size=s.train_batch, train_gradient_accumulation_steps=1, train_learning_rate=s.lr,
        train_adam_weight_decay=s.weight_decay, train_max_grad_norm=s.max_grad_norm,
        train_num_inner_epochs=s.inner_epochs, train_cfg=s.train_cfg, train_adv_clip_max=s.adv_clip_max,
        train_clip_range=s.clip_range, train_timestep_fraction=s.timestep_fraction, per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=s.stat_buffer, per_prompt_stat_tracking_min_count=s.stat_min_count,
        negative_prompts=job["negative_prompt"], mixed_precision="no", log_with=None, save_freq=10**9,
        seed=job["seed"], project_kwargs={"project_dir": str(out / "trl"), "logging_dir": str(out / "trl" / "logs")})
    PartialState()  # TRL warns through accelerate's logger, which needs it
    pipeline = DefaultDDPOStableDiffusionPipeline(job["model"], use_lora=True)
    reward = build_reward(job["reward"], device="cpu")
    rng, epochs = random.Random(job["seed"]), []

    def reward_fn(images, prompts, metadata):
        with torch.no_grad():
            r = reward(images.float(), list(prompts)).float()
        epochs[-1].update(rewards=r.tolist(), prompts=list(prompts))
        return r, {}

    trainer = DDPOTrainer(config, reward_fn, lambda: (rng.choice(job["prompts"]), {}), pipeline)
    unet = pipeline.unet
    if 0 in job["save_at"]:
        _save_trl_lora(unet, out / "lora-0")
    step = 0
    for epoch in range(job["epochs"]):
        epochs.append({"epoch": epoch + 1})
        t0 = time.process_time()
        step = trainer.step(epoch, step)
        epochs[-1].update(optimizer_step=step, cpu_seconds=time.process_time() - t0)
        if epoch + 1 in job["save_at"]:
            _save_trl_lora(unet, out / f"lora-{epoch + 1}")
    return {"method": "ddpo", "trl": trl.__version__, "epochs": epochs}


def drive_alignprop(job: dict) -> dict:
    """This package's trainer with the toy defaults, CPU seconds around each train_step (our environment)."""
    import torch

    torch.set_num_threads(job["threads"])
    from trl_compare import time_train_steps  # its neighbour in benchmarks/ (this script's folder is on sys.path)

    seconds = time_train_steps()
    from lowmem_alignprop.cli import main

    if main(job["argv"]) != 0:
        raise SystemExit("the AlignProp run failed")
    return {"method": "alignprop", "step_cpu_seconds": seconds}


def driver(argv: list[str]) -> int:
    job = json.loads(argv[1])
    result = (drive_ddpo if argv[0] == "ddpo" else drive_alignprop)(job)
    path = Path(job["out"]) / "driver.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    return 0



# ================================================================================================ running both
TRL_VENV_PACKAGES = ("trl", "torch", "diffusers", "peft", "transformers", "accelerate")
_PROBE = ("import importlib.metadata as md, json, platform; from trl import DDPOTrainer; "
          f"print(json.dumps({{'python': platform.python_version(), "
          f"**{{p: md.version(p) for p in {TRL_VENV_PACKAGES!r}}}}}))")


def command_line(argv: list[str]) -> str:
    """``python`` and the script's arguments without ``--note``'s: the note describes the machine, not the run."""
    kept = [a for i, a in enumerate(argv) if a != "--note" and not a.startswith("--note=")
            and (i == 0 or argv[i - 1] != "--note")]
    return " ".join(["python", *kept])


def trl_versions(python: str) -> tuple[dict | None, str]:
    """(the versions of Python, trl and the libraries it runs on, '') when ``python`` imports trl's DDPOTrainer,
    else (None, why not)."""
    try:
        probe = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    except OSError as e:
        return None, f"{python} cannot run ({e.strerror or e})"
    if probe.returncode:
        return None, f"{python} cannot import trl's DDPOTrainer ({(probe.stderr.strip().splitlines() or ['?'])[-1]})"
    return json.loads(probe.stdout.strip().splitlines()[-1]), ""


def toy_config(seed: int = 0):
    """The toy world's defaults as the CLI resolves them now (``--model toy --profile cpu``): another helper's change
    of the defaults is what both methods get."""
    from lowmem_alignprop.cli import common_parser, config_from_args

    args = common_parser("ddpo_toy", "").parse_args(["--model", "toy", "--profile", "cpu", "--seed", str(seed)])
    return config_from_args(args)[1]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _load() -> list[float]:
    """The load average (1, 5, 15 min): how busy the shared machine was."""
    return [round(x, 1) for x in os.getloadavg()]


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, data) -> None:
    from lowmem_alignprop.run import atomic

    atomic.write_text(path, json.dumps(data, indent=1))


def run_driver(python: str, which: str, job: dict, threads: int, stamp: dict, fresh: bool = False) -> dict:
    """One training process (``--driver which``); its result, with the process's CPU and wall seconds. A folder
    that holds a finished run of the same job and ``stamp`` (weights, versions) is reused unless ``fresh``."""
    out = Path(job["out"])
    stamp = {"job": job, **stamp}
    done = _read(out / "process.json")
    if not fresh and done is not None and _read(out / "stamp.json") == stamp and (out / "driver.json").is_file():
        print(f"[toy_experiments] rl: reusing {out}", flush=True)
        return {**json.loads((out / "driver.json").read_text()), **done}
    if out.exists():
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cpu0, t0, load0 = _children_cpu(), time.time(), _load()
    print(f"[toy_experiments] rl: training {which}", flush=True)
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--driver", which, json.dumps(job)], env=env,
                          capture_output=True, text=True)
    if proc.returncode or not (out / "driver.json").is_file():
        raise SystemExit(f"rl: the {which} run failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    process = {"cpu_seconds": round(_children_cpu() - cpu0, 1), "wall_seconds": round(time.time() - t0, 1),
               "load_average_start": load0, "load_average_end": _load()}
    _write(out / "stamp.json", stamp)
    _write(out / "process.json", process)  # last: its presence marks the run finished
    return {**json.loads((out / "driver.json").read_text()), **process}


@dataclass
class Plan:
    """Sizes of the rl experiment: AlignProp's steps, DDPO's epochs, how often each is judged, and on how many
    images."""
    steps: int
    every: int
    epochs: int
    epochs_every: int
    images: int

    def save_points(self, total: int, every: int) -> list[int]:
        return sorted({*range(every, total + 1, every), total})


def run_rl(plan: Plan, work: Path, trl_python: str | None, threads: int, weights: str = "", fresh: bool = False
           ) -> dict | None:
    """Both trainings (or their finished folders, with the same settings and ``weights``, a digest of the toy
    weights, unless ``fresh``), then the judge; None (with a line saying why) when no Python with trl is given."""
    if not trl_python:
        print("[toy_experiments] rl: skipped (pass --trl-python PATH, a Python with trl 0.23.1: trl is not a "
              "dependency)", flush=True)
        return None
    versions, why = trl_versions(trl_python)
    if versions is None:
        print(f"[toy_experiments] rl: skipped: {why}", flush=True)
        return None
    load_start = _load()
    cfg = toy_config()
    ddpo = DDPOSettings.for_toy(cfg.lr, cfg.batch_size)
    from lowmem_alignprop.step.prompts import configured_prompts

    prompts = configured_prompts(cfg)
    ap_points, dd_points = plan.save_points(plan.steps, plan.every), plan.save_points(plan.epochs, plan.epochs_every)
    same_steps = plan.steps // (ddpo.images_per_epoch // ddpo.train_batch)  # DDPO's epoch with AlignProp's updates
    dd_points = sorted({*dd_points, *([same_steps] if 0 < same_steps <= plan.epochs else [])})
    ap_out, dd_out = work / "rl" / "alignprop", work / "rl" / "ddpo"
    ap_argv = ["--model", "toy", "--profile", "cpu", "--seed", str(cfg.seed), "--steps", str(plan.steps),
               "--set", f"checkpoint_every={plan.every}", "--set", "keep_checkpoints=0", "--set", "sample_prompts=0",
               "--set", "fidelity_images=0"]
    import diffusers
    import torch

    ours = {"weights": weights, "torch": torch.__version__, "diffusers": diffusers.__version__}
    ap = run_driver(sys.executable, "alignprop", {"out": str(ap_out), "threads": threads, "argv": ap_argv + [
        "--output-dir", str(ap_out / "run")]}, threads, ours, fresh)
    from lowmem_alignprop.models.loading import TOY_MODEL_DIR

    dd = run_driver(trl_python, "ddpo", {
        "out": str(dd_out), "threads": threads, "ddpo": {k: v for k, v in asdict(ddpo).items()},
        "epochs": plan.epochs, "save_at": dd_points, "sample_steps": cfg.sample_steps, "eta": cfg.eta,
        "guidance": cfg.guidance_scale, "negative_prompt": cfg.negative_prompt, "seed": cfg.seed,
        "model": str(TOY_MODEL_DIR), "reward": cfg.reward, "prompts": prompts}, threads,
        {"weights": weights, "python": trl_python, "trl": versions["trl"]}, fresh)
    metrics = [json.loads(x) for x in (ap_out / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    runs = {"AlignProp": alignprop_curve(metrics, ap["step_cpu_seconds"], cfg.batch_size),
            "DDPO (TRL)": ddpo_curve(dd["epochs"])}
    loras = {"AlignProp": {s: ap_out / "run" / "checkpoints" / f"step-{s:08d}" for s in ap_points},
             "DDPO (TRL)": {e: dd_out / f"lora-{e}" for e in dd_points}}
    t0 = time.time()
    judged, judge_cpu = judge(cfg, prompts, loras, plan.images, threads)
    judge_wall = round(time.time() - t0, 1)
    for name, proc in (("AlignProp", ap), ("DDPO (TRL)", dd)):
        runs[name].update({k: proc[k] for k in ("load_average_start", "load_average_end") if k in proc})
        runs[name].update(cpu_seconds=proc["cpu_seconds"], wall_seconds=proc["wall_seconds"],
                          eval=with_positions(judged[name], runs[name]))
    runs["AlignProp"]["command"] = "python -m lowmem_alignprop " + " ".join(ap_argv)
    from lowmem_alignprop.measure.provenance import provenance

    where = provenance(command_line(sys.argv), ("torch", "diffusers", "peft"), torch_threads=threads,
                       load_average_start=load_start, load_average_end=_load())
    return {"runs": runs, "trl": versions["trl"], "trl_venv": versions, "provenance": where,
            "ddpo": {**asdict(ddpo), "describe": ddpo.describe()},
            "toy": {k: getattr(cfg, k) for k in ("reward", "prompts", "resolution", "sample_steps", "guidance_scale",
                                                 "eta", "batch_size", "lora_rank", "lr", "truncation", "k", "seed")},
            "judged_images": plan.images, "judge_cpu_seconds": judge_cpu, "judge_wall_seconds": judge_wall,
            "plan": asdict(plan)}


def judge(cfg, prompts: list[str], loras: dict[str, dict[int, Path]], images: int, threads: int):
    """Every saved LoRA (and the base model, as point 0 of each method) on the same fixed-seed images: the
    reward's mean and the exact evaluators' figures. Returns ({method: {point: row}}, CPU seconds it took)."""
    import resource as _r

    import torch

    from lowmem_alignprop.settings.quiet import quiet_libraries
    from lowmem_alignprop.commands import evaluate as ev
    from lowmem_alignprop.commands.sample_pipeline import build_pipeline
    from lowmem_alignprop.lora.adapters import load_adapters, mix_adapters
    from lowmem_alignprop.lora.lora_args import parse_lora
    from lowmem_alignprop.rewards import build_reward
    from lowmem_alignprop.toy.fidelity import evaluate_batch

    quiet_libraries()
    torch.set_num_threads(threads)
    cpu0 = _r.getrusage(_r.RUSAGE_SELF).ru_utime + _r.getrusage(_r.RUSAGE_SELF).ru_stime
    shown = (prompts * -(-images // len(prompts)))[:images]  # the run's prompts in order, round again
    seeds = [cfg.seed + JUDGE_SEED + n for n in range(len(shown))]
    reward = build_reward(cfg.reward, device="cpu")
    pipe = build_pipeline(cfg, torch.device("cpu"), torch.float32)

    def row() -> dict:
        imgs = ev.generate(pipe, shown, seeds, cfg, cfg.batch_size)
        scores = ev.score(reward, imgs, shown, torch.device("cpu"), cfg.batch_size)
        return {"reward": float(scores.mean()), "rewards": [round(float(x), 3) for x in scores],
                **evaluate_batch(imgs, shown)}

    base = row()
    out = {}
    for method, points in loras.items():
        out[method] = {0: base}
        for point, path in points.items():
            spec = parse_lora(str(path), 0)
            load_adapters(pipe, [spec], cfg.model)
            mix_adapters(pipe, [spec])
            out[method][point] = row()
            pipe.delete_adapters(spec.name)
            print(f"[toy_experiments] rl: judged {method} at {point}", flush=True)
    cpu = _r.getrusage(_r.RUSAGE_SELF).ru_utime + _r.getrusage(_r.RUSAGE_SELF).ru_stime - cpu0
    return out, round(cpu, 1)



# ================================================================================================ curves (pure)
def alignprop_curve(metrics: list[dict], step_cpu: list[float], batch: int) -> dict:
    """AlignProp's training curve from metrics.jsonl and the CPU seconds of each train_step: per optimizer step the
    cumulative sampled images, optimizer steps and CPU seconds, and the training batch's mean reward."""
    images, cpu, train = 0, 0.0, {k: [] for k in ("step", "images", "optimizer_step", "cpu_seconds", "reward_mean")}
    for m, seconds in zip(metrics, step_cpu):
        images, cpu = images + int(m.get("images", batch)), cpu + seconds
        for key, value in (("step", m["step"]), ("images", images), ("optimizer_step", m["step"]),
                           ("cpu_seconds", round(cpu, 2)), ("reward_mean", m["reward_mean"])):
            train[key].append(value)
    return {"method": "alignprop", "train": train}


def ddpo_curve(epochs: list[dict]) -> dict:
    """DDPO's training curve from the driver's epochs: per epoch (one sampling round and its updates) the same
    cumulative figures as :func:`alignprop_curve`, and the mean reward of the epoch's sampled images."""
    images, cpu, train = 0, 0.0, {k: [] for k in ("step", "images", "optimizer_step", "cpu_seconds", "reward_mean")}
    for e in epochs:
        images, cpu = images + len(e["rewards"]), cpu + e["cpu_seconds"]
        for key, value in (("step", e["epoch"]), ("images", images), ("optimizer_step", e["optimizer_step"]),
                           ("cpu_seconds", round(cpu, 2)), ("reward_mean", sum(e["rewards"]) / len(e["rewards"]))):
            train[key].append(value)
    return {"method": "ddpo", "train": train}


POSITIONS = ("images", "optimizer_step", "cpu_seconds")


def with_positions(judged: dict[int, dict], curve: dict) -> list[dict]:
    """The judged rows in order of their point (a step or an epoch; 0 = the base model), each with the sampled
    images, optimizer steps and training CPU seconds the method had spent by then."""
    train, rows = curve["train"], []
    for point in sorted(judged):
        at = {k: 0 for k in POSITIONS} if point == 0 else {k: train[k][train["step"].index(point)] for k in POSITIONS}
        rows.append({"step": point, **at, **judged[point]})
    return rows


def running_mean(values: list[float], window: int) -> list[float]:
    """The mean of every full window of ``window`` consecutive values (``len(values) - window + 1`` of them)."""
    return [sum(values[i - window + 1:i + 1]) / window for i in range(window - 1, len(values))]


def first_reaching(xs: list[float], ys: list[float], target: float) -> float | None:
    """The first x whose y is at least ``target`` (None: never)."""
    return next((x for x, y in zip(xs, ys) if y >= target), None)


def eval_at(evals: list[dict], key: str, value: float) -> dict | None:
    """The judged row at exactly ``key == value`` (e.g. the same number of sampled images), or None."""
    return next((e for e in evals if e[key] == value), None)


SMOOTH_IMAGES = 20  # the training curves' running mean spans this many sampled images


def smoothed(curve: dict) -> tuple[list[int], list[float]]:
    """The training batches' reward as a running mean over SMOOTH_IMAGES sampled images: (images at each window's
    end, the window's mean)."""
    train = curve["train"]
    window = min(len(train["images"]), max(1, SMOOTH_IMAGES // max(1, train["images"][0])))
    return train["images"][window - 1:], running_mean(train["reward_mean"], window)


def paired(a: dict, b: dict) -> tuple[float, float] | None:
    """Two judged rows of the same images (same prompts and seeds): the mean of the per-image reward differences
    a - b and its standard error; None without per-image rewards."""
    if not a.get("rewards") or len(a["rewards"]) != len(b.get("rewards") or ()) or len(a["rewards"]) < 2:
        return None
    d = [x - y for x, y in zip(a["rewards"], b["rewards"])]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, (var / len(d)) ** 0.5


def _pm(a: dict, b: dict) -> str:
    """" (+d ± se)" for a - b over the same images, or nothing."""
    diff = paired(a, b)
    return f" ({diff[0]:+.1f} ± {diff[1]:.1f})" if diff else ""


def findings(result: dict) -> list[str]:
    """The numbers the report quotes: each method's run, then the two at equal sampled images and equal steps.
    "± x": the standard error of a mean difference over the same judged images (paired: same prompts and seeds)."""
    runs = result["runs"]
    ap, dd = runs["AlignProp"], runs["DDPO (TRL)"]
    lines = []
    for name, run in runs.items():
        e, t = run["eval"], run["train"]
        _, smooth = smoothed(run)
        lines.append(
            f"{name}: {t['optimizer_step'][-1]} optimizer steps on {t['images'][-1]} sampled images, "
            f"{t['cpu_seconds'][-1]:.0f} s of CPU in its training steps ({t['cpu_seconds'][-1] / t['images'][-1]:.2f} "
            f"s an image, {t['cpu_seconds'][-1] / t['optimizer_step'][-1]:.2f} s an optimizer step); on the "
            f"{result['judged_images']} fixed-seed images {result['toy']['reward']} {e[0]['reward']:.1f} -> "
            f"{e[-1]['reward']:.1f}{_pm(e[-1], e[0])}, fidelity score {e[0]['fidelity_score']:.3f} -> "
            f"{e[-1]['fidelity_score']:.3f}, all right {e[0]['fidelity_all_ok']:.0%} -> "
            f"{e[-1]['fidelity_all_ok']:.0%}; "
            f"its training batches' reward over the first {SMOOTH_IMAGES} sampled images {smooth[0]:.1f}, over the "
            f"last {SMOOTH_IMAGES} {smooth[-1]:.1f}")
    a = ap["eval"][-1]
    n = ap["train"]["images"][-1]
    same = eval_at(dd["eval"], "images", n)
    if same is not None:
        lines.append(f"at the same {n} sampled images: AlignProp {a['reward']:.1f} "
                     f"(fidelity {a['fidelity_score']:.3f}, "
                     f"{ap['train']['cpu_seconds'][-1]:.0f} s CPU), DDPO {same['reward']:.1f} (fidelity "
                     f"{same['fidelity_score']:.3f}, {same['cpu_seconds']:.0f} s CPU): AlignProp - DDPO"
                     f"{_pm(a, same) or ' ' + format(a['reward'] - same['reward'], '+.1f')}")
    k = ap["train"]["optimizer_step"][-1]
    same_steps = eval_at(dd["eval"], "optimizer_step", k)
    if same_steps is not None:
        lines.append(f"at the same {k} optimizer steps: AlignProp {a['reward']:.1f}, DDPO {same_steps['reward']:.1f} "
                     f"({same_steps['images']} images){_pm(a, same_steps)}")
    best = max(dd["eval"][1:] or dd["eval"], key=lambda e: e["reward"])
    lines.append(f"DDPO's best judged point: {best['reward']:.1f} after {best['images']} sampled images "
                 f"({best['cpu_seconds']:.0f} s CPU, fidelity {best['fidelity_score']:.3f}); AlignProp's final "
                 f"{a['reward']:.1f}{_pm(a, best)}")
    target = smoothed(ap)[1][-1]
    reached = first_reaching(*smoothed(dd), target)
    lines.append(f"DDPO's training batches ({SMOOTH_IMAGES}-image running mean) "
                 + (f"first reached AlignProp's last {SMOOTH_IMAGES}-image mean {target:.1f} after {reached} sampled "
                    "images" if reached is not None else
                    f"never reached AlignProp's last {SMOOTH_IMAGES}-image mean {target:.1f} in their "
                    f"{dd['train']['images'][-1]} images (best {max(smoothed(dd)[1]):.1f})"))
    return lines


def provenance_line(result: dict) -> str:
    """The experiment's command, CPU and versions (this environment's and trl's venv), for REPORT.md."""
    where = result.get("provenance")
    if not where:
        return f"trl {result['trl']}"
    dev, ours, venv = where["device"], where["versions"], result.get("trl_venv", {})

    def load(d: dict) -> str:
        return "/".join(map(str, d.get("load_average_start", []))) + " -> " + "/".join(
            map(str, d.get("load_average_end", [])))

    loads = "; ".join(f"{name}'s training {load(run)}" for name, run in result["runs"].items()
                      if "load_average_start" in run) or f"this invocation {load(dev)}"
    return (f"`{where['command']}` on {dev['cpu']} ({dev['cores']} logical cores, {dev['torch_threads']} thread a "
            f"process; load average (1/5/15 min) {loads}); here "
            + ", ".join(f"{k} {v}" for k, v in ours.items()) + "; trl's venv "
            + ", ".join(f"{k} {v}" for k, v in venv.items()))


def report_table(result: dict) -> list[str]:
    """REPORT.md's table: every judged point of both methods."""
    L = [("| method | point | sampled images | optimizer steps | training CPU s | reward | fidelity score | "
          "all right | objects detected |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in result["runs"].items():
        point = "step" if run["method"] == "alignprop" else "epoch"
        for e in run["eval"]:
            L.append(f"| {name} | {point} {e['step']} | {e['images']} | {e['optimizer_step']} | {e['cpu_seconds']:.0f} "
                     f"| {e['reward']:.1f} | {e['fidelity_score']:.3f} | {e['fidelity_all_ok']:.0%} | "
                     f"{e['fidelity_objects']:.2f} |")
    return L


def plot(plt, result: dict):
    """Reward against sampled images (training batches' running mean, dashed; the judged fixed-seed images,
    markers), against optimizer steps and against CPU seconds, and the exact fidelity against sampled images; both
    methods."""
    fig, axes = plt.subplots(1, 4, figsize=(20, 3.8))
    for name, run in result["runs"].items():
        e, t = run["eval"], run["train"]
        label = f"{name} ({t['cpu_seconds'][-1]:.0f} s CPU)"
        line = axes[0].plot([x["images"] for x in e], [x["reward"] for x in e], marker="o", label=label)[0]
        axes[0].plot(*smoothed(run), linestyle="--", alpha=0.4, color=line.get_color(),
                     label=f"  its training batches ({SMOOTH_IMAGES}-image mean)")
        axes[1].plot([x["optimizer_step"] for x in e], [x["reward"] for x in e], marker="o", label=name)
        axes[2].plot([x["cpu_seconds"] for x in e], [x["reward"] for x in e], marker="o", label=name)
        axes[3].plot([x["images"] for x in e], [x["fidelity_score"] for x in e], marker="o", label=name)
    reward = result["toy"]["reward"]
    for ax, (xlabel, ylabel) in zip(axes, (("sampled images", reward), ("optimizer steps", reward),
                                           ("CPU seconds in training steps", reward),
                                           ("sampled images", "exact fidelity score"))):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel + (" (fixed-seed images)" if ylabel == reward else ""))
        ax.legend(fontsize=7)
    return fig, axes


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--driver":
        sys.exit(driver(sys.argv[2:]))
    print("ddpo_toy.py is the driver of benchmarks/toy_experiments.py's RL rows: run them with "
          "`python benchmarks/toy_experiments.py --only rl --trl-python PATH`", file=sys.stderr)
    sys.exit(0 if {"-h", "--help"} & set(sys.argv[1:]) else 2)

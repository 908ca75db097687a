"""Real training steps on one NVIDIA GPU, capped at each profile's budget; writes benchmarks/results/gpu-*.json.

Run through ``benchmarks/gpu_check.sh`` (which installs the wheels it brings). Models are built from the
shipped SD1.5 / SDXL architecture configs with random weights (memory and speed do not depend on weight
values); the aesthetic reward is a CLIP ViT-L/14 built from config with a random head. Each run is its
own process with ``torch.cuda.set_per_process_memory_fraction(budget / total)``, so "fits in 8 GB" is a
real run that either passes or raises out-of-memory.

    python benchmarks/gpu_check.py --out DIR [--jobs N] [--match WORDS] [--deadline SECONDS]
    python benchmarks/gpu_check.py --cpu-smoke --out DIR   # the same plumbing on the tiny model, on CPU

``--only loading`` (in the default set; not in the CPU smoke) reads a FLUX.1-shaped transformer file (3 double + 8
single blocks at FLUX.1's widths) to the card with ``benchmarks/load_rss.py --device cuda``: host memory, card
memory and seconds of diffusers' whole load against ``block_loading``'s, int8 and bf16.

``--only sample`` (in the default set, with ``profiles``) runs ``lowmem-alignprop sample`` as soon as its training
row of the same call is done, with the LoRA that row wrote, under that row's profile and cap (the 8 GB FLUX profile: block
swap, int8, T5 on the CPU): whether it runs, its CUDA peaks (``cuda_peak``) and ``sample_results.json``.

``--jobs N`` runs N trainings at once on the GPU: each is its own process with its own cap, and CUDA's peak
counters are per process, so the memory figures are those of a run alone; the seconds per step are not
(each result records ``concurrent_runs``). A second call on the same day and device merges into the same
results file: runs with the same name are replaced, the others kept. The file is saved after every run, so a
call stopped at a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Features switched on one after another (SD1.5, 512 px, batch 1, fp16): the measured "each option added in turn".
LADDER = [
    ("fp16, per-call checkpoint only", {"unet_checkpointing": "call", "vae_checkpointing": "none",
                                        "reward_checkpointing": False, "cache_prompt_embeddings": False,
                                        "offload_frozen": False, "sliced_decode": False,
                                        "expandable_segments": False}),
    ("+ VAE checkpointing (up-blocks)", {"vae_checkpointing": "blocks"}),
    ("+ UNet block checkpointing", {"unet_checkpointing": "blocks"}),
    ("+ reward checkpointing, cached prompts", {"reward_checkpointing": True, "cache_prompt_embeddings": True}),
    ("+ offload frozen modules", {"offload_frozen": True}),
    ("+ VAE checkpointing per resnet", {"vae_checkpointing": "resnets"}),
    ("+ expandable allocator segments (= rtx3060)", {"expandable_segments": True}),
]

# (name, profile, model, overrides, budget GiB for the cap); the small cards' claims first (a call may be cut off)
PROFILE_RUNS = [
    ("rtx3060 sd15 512 K~U[1,50]", "rtx3060", "sd15", {"grad_accum": 1}, 7.5),
    ("rtx3060-sdxl sdxl 1024 nf4", "rtx3060-sdxl", "sdxl", {"grad_accum": 1}, 7.0),
    ("laptop-6gb sd15 512 nf4", "laptop-6gb", "sd15", {"grad_accum": 1}, 3.5),
    ("rtx4090 sdxl 1024 batch 1", "rtx4090", "sdxl", {"batch_size": 1, "resolution": 1024, "truncation": "fixed",
                                                       "k": 1, "sample_steps": 20}, 16.0),
    ("rtx4090 sd15 512 batch 8", "rtx4090", "sd15", {"truncation": "fixed", "k": 1}, 20.0),
    ("a100-40gb sd15 512 batch 8", "a100-40gb", "sd15", {"truncation": "fixed", "k": 1}, 38.0),
    # UNet block swap on a real card (session 53 fixed its units: only what diffusers checkpoints one by one, 37 in
    # SD1.5; a sampler's backward had read its weight's CPU copy, a device mismatch on a GPU): runs, and its memory
    ("rtx3060 block swap 20 sd15 512", "rtx3060", "sd15", {"grad_accum": 1, "unet_checkpointing": "blocks",
                                                          "block_swap": 20}, 7.5),
    # SD3.5 / FLUX.1 (issue 18): built on the meta device, the transformer and VAE materialised on the GPU (with an
    # int8/nf4 base: drawn and quantized one block at a time), the text encoders on the CPU (encode_on_cpu; a
    # 2-prompt set keeps T5-XXL's CPU pass short); not measured yet. Planner figures: README / REPORT.md section 8
    ("rtx3060-sd35m sd35m 1024 int8", "rtx3060-sd35m", "sd35m", {"grad_accum": 1, "prompts": "FLOW_PROMPTS"}, 7.0),
    # block swap with a quantized base: 41 int8 blocks from pinned memory (swapped blocks drawn, moved to the host and
    # quantized there one at a time: the card never holds more than the resident blocks and one being drawn)
    ("rtx3060-flux flux 1024 int8 block swap 41", "rtx3060-flux", "flux",
     {"grad_accum": 1, "prompts": "FLOW_PROMPTS"}, 7.5),
    ("rtx3060-12gb-flux flux 1024 nf4", "rtx3060-12gb-flux", "flux", {"grad_accum": 1, "prompts": "FLOW_PROMPTS"},
     11.0),
    ("rtx3060-12gb-sd35l sd35l 1024 nf4", "rtx3060-12gb-sd35l", "sd35l",
     {"grad_accum": 1, "prompts": "FLOW_PROMPTS"}, 11.0),
    ("rtx4090-flux flux 1024 int8", "rtx4090-flux", "flux", {"grad_accum": 1, "prompts": "FLOW_PROMPTS"}, 22.0),
    # base_quant=fp8 (experimental) against int8 under the same profile and cap: memory and seconds per step decide
    # whether fp8 ships as more than an option (issue 18); then bf16 with block swap instead of a quantized base
    ("rtx4090-flux flux 1024 fp8", "rtx4090-flux", "flux",
     {"grad_accum": 1, "prompts": "FLOW_PROMPTS", "base_quant": "fp8"}, 22.0),
    ("rtx3060-sd35m sd35m 1024 fp8", "rtx3060-sd35m", "sd35m",
     {"grad_accum": 1, "prompts": "FLOW_PROMPTS", "base_quant": "fp8"}, 7.0),
    ("rtx4090-flux flux 1024 bf16 block swap 19", "rtx4090-flux", "flux",
     {"grad_accum": 1, "prompts": "FLOW_PROMPTS", "base_quant": "none", "block_swap": 19}, 22.0),
    # the 8 GB FLUX profile's alternatives under the same cap: bf16 blocks (the profile before int8: 2.2x the pinned
    # host memory and PCIe bytes) and fp8 blocks (issue 18's fp8-against-int8 question, with block swap)
    ("rtx3060-flux flux 1024 bf16 block swap 49", "rtx3060-flux", "flux",
     {"grad_accum": 1, "prompts": "FLOW_PROMPTS", "base_quant": "none", "block_swap": 49}, 7.5),
    ("rtx3060-flux flux 1024 fp8 block swap 45", "rtx3060-flux", "flux",
     {"grad_accum": 1, "prompts": "FLOW_PROMPTS", "base_quant": "fp8", "block_swap": 45}, 7.5),
]

# `sample` under a profile (issue 18), after the trainings: (name, the training row whose LoRA it samples with that
# row's profile, model and overrides, budget GiB for the cap). The 8 GB FLUX profile: block swap of int8 blocks, T5 on
# the CPU, the prompts encoded and the encoders freed before the transformer is read; 8 Euler steps, one image each
# of the base model and the LoRA
SAMPLE_RUNS = [
    ("sample rtx3060-flux flux 1024 int8 block swap 41", "rtx3060-flux flux 1024 int8 block swap 41", 7.5),
]
SAMPLE_ARGS = ["--num-prompts", "1", "--images-per-prompt", "1", "--set", "sample_steps=8"]

# Speed features one at a time on one configuration (README "Speed"): SD1.5 512 px batch 1 under the rtx4090
# profile, K = 1 of 20 steps. Compare the second step's seconds (the first pays any compile time); JOBS=1.
SPEED_BASE = ["--profile", "rtx4090", "--model", "sd15", "--set", "batch_size=1", "--set", "grad_accum=1",
              "--set", "truncation=fixed", "--set", "k=1", "--set", "sample_steps=20"]
SPEED_RUNS = [
    ("speed: the rtx4090 profile as it is", {}),
    ("speed: + compile=nograd", {"compile": "nograd"}),
    ("speed: + compile=regional", {"compile": "regional"}),
    ("speed: + channels_last", {"channels_last": True}),
    ("speed: + fused_adamw", {"fused_adamw": True}),
    ("speed: + merge_lora_nograd", {"merge_lora_nograd": True}),
    ("speed: mixed_precision=no", {"mixed_precision": "no"}),
    ("speed: mixed_precision=no + tf32", {"mixed_precision": "no", "tf32": True}),
    # plan --fastest's choice for this configuration on the rtx4090 (computed on a CPU, benchmarks/REPORT.md
    # section 6): nothing checkpointed or offloaded fits 22 GiB at batch 1, and since issue 20 the one grad-window
    # call (K = 1) kept without its checkpoint (window_keep=1, ~2.4 GiB more) fits too, and since 2026-12-05 the
    # no-grad calls merged (merge_lora_nograd): 1.56 s planned against the profile's 1.90 s, the search's second estimate
    ("speed: plan --fastest's choice", {"unet_checkpointing": "call", "vae_checkpointing": "none",
                                        "reward_checkpointing": False, "sliced_decode": False, "window_keep": 1,
                                        "merge_lora_nograd": True}),
]

CHILD = """
import json, sys, torch
from pathlib import Path
frac = float(sys.argv[1])
if frac > 0:
    torch.cuda.set_per_process_memory_fraction(frac)
from lowmem_alignprop.cli import main
rc = main(sys.argv[2:])
if torch.cuda.is_available():  # the process's own peaks (sample writes no memory report)
    out = Path(sys.argv[sys.argv.index("--output-dir") + 1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_peak.json").write_text(json.dumps({"max_allocated": torch.cuda.max_memory_allocated(),
                                                     "max_reserved": torch.cuda.max_memory_reserved()}))
sys.exit(rc)
"""


def make_aesthetic_weights(path: Path, tiny: bool) -> Path:
    """A CLIP ViT-L/14-shaped model and aesthetic head with random weights, saved where the reward loader looks."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from lowmem_alignprop.rewards.clip_rewards import AESTHETIC_HEAD_FILE, AestheticHead

    if (path / AESTHETIC_HEAD_FILE).exists():
        return path
    if tiny:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=32, patch_size=8)
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        proj = 32
    else:  # openai/clip-vit-large-patch14
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=14)
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        proj = 768
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=proj))
    model.to(torch.float16).save_pretrained(path / "clip")
    torch.save(AestheticHead(proj).state_dict(), path / AESTHETIC_HEAD_FILE)
    return path


def slug_of(name: str) -> str:
    """A run's folder name under the scratch folder's runs/."""
    return name.replace(" ", "_").replace("/", "-").replace("+", "").replace(",", "")


def run_one(name: str, args: list[str], budget_gb: float, out: Path, timeout: float, cpu: bool) -> dict:
    frac = 0.0
    total = None
    if not cpu:
        import torch
        total = torch.cuda.get_device_properties(0).total_memory
        frac = min(1.0, budget_gb * 2**30 / total) if budget_gb else 0.0
    run_dir = out / "runs" / slug_of(name)
    cmd = [sys.executable, "-c", CHILD, str(frac), *args, "--output-dir", str(run_dir)]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        rc, log = p.returncode, (p.stdout[-3000:] + "\n" + p.stderr[-3000:])
    except subprocess.TimeoutExpired as e:
        rc, log = "timeout", str(e)[-2000:]
    result = {"name": name, "command": "lowmem-alignprop " + " ".join(args), "budget_gb": budget_gb,
              "memory_fraction": frac, "returncode": rc, "wall_seconds": round(time.time() - t0, 1)}
    oom = "out of memory" in log.lower() or "OutOfMemory" in log
    result["status"] = "ok" if rc == 0 else ("oom" if oom else "error")
    if rc != 0:
        result["log_tail"] = log[-2500:]
    rep = run_dir / "memory_report.json"
    if rep.exists():
        result["memory_report"] = json.loads(rep.read_text())
    summ = run_dir / "summary.json"
    if summ.exists():
        result["summary"] = json.loads(summ.read_text())
    met = run_dir / "metrics.jsonl"
    if met.exists():
        result["metrics"] = [json.loads(x) for x in met.read_text().splitlines() if x.strip()]
    for key, file in (("cuda_peak", "cuda_peak.json"), ("sample_results", "sample_results.json")):
        if (run_dir / file).exists():
            result[key] = json.loads((run_dir / file).read_text())
    print(f"[{result['status']:>5}] {name}: {result['wall_seconds']} s", flush=True)
    return result


class PlannerPool:
    """Planner estimates for the same configurations, computed on the CPU cores while the GPU trains."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.procs: dict[str, subprocess.Popen] = {}

    def submit(self, name: str, args: list[str]) -> None:
        if not self.enabled:
            return
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "lowmem_alignprop", "plan", "--json", *args],
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                            env=env)

    def cancel(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is not None and p.poll() is None:
            p.kill()

    def collect(self, name: str, timeout: float) -> dict:
        p = self.procs.get(name)
        if p is None:
            return {"skipped": "not planned in this call"}
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            return {"error": "planner timed out"}
        if p.returncode != 0:
            return {"error": err[-800:]}
        start = out.find("{\n")  # anything a library printed before the JSON is skipped
        try:
            return json.JSONDecoder().raw_decode(out[max(start, 0):])[0]
        except json.JSONDecodeError as e:
            return {"error": f"planner output is not JSON: {e}", "stdout_head": out[:600], "stderr": err[-600:]}


def matches(name: str, match: str) -> bool:
    """``--match``: True when ``match`` (comma-separated words; empty words ignored) is empty or a word is in ``name``."""
    words = [w for w in match.split(",") if w]
    return not words or any(w in name for w in words)


def code_version() -> str | None:
    """The commit of the checkout: GPU_CHECK_CODE when set (a lent device's copy may carry the git metadata of an
    earlier commit than its files: the command then names the commit), else git's; None without either."""
    if os.environ.get("GPU_CHECK_CODE"):
        return os.environ["GPU_CHECK_CODE"]
    try:
        p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                           timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() or None if p.returncode == 0 else None


PENDING = "not run (the call ended first)"  # a placeholder until its run ends: the file is saved after each run


def _measured(r: dict) -> bool:
    return not (r.get("status", "").startswith("skipped") or r.get("status") == PENDING)


def load_previous(path: Path, committed: Path | None = None) -> dict | None:
    """The results file this call adds to: ``path`` when it exists (same device and day), else ``committed`` (the
    file of that name in the checkout's benchmarks/results, for a call whose output folder starts empty)."""
    for p in (path, committed):
        if p is not None and p.exists():
            try:
                return json.loads(p.read_text())
            except (OSError, ValueError):
                return None  # unreadable: this call's results replace it
    return None


def merge_docs(old: dict | None, doc: dict) -> dict:
    """``doc`` merged into ``old``: runs with the same name are replaced by the new ones that were measured, the
    others kept in their order; ``quant`` and ``loading`` are replaced only when this call measured them. Lets a check
    be split over several calls. Neither argument is changed."""
    call = {"command": doc["command"], "wall_seconds": doc.get("wall_seconds")}
    if old is None:
        return dict(doc, calls=[call])
    merged = json.loads(json.dumps(old))
    for section in ("ladder", "profiles", "sample", "speed"):
        ran = {r["name"]: r for r in doc.get(section, []) if _measured(r)}
        before = merged.get(section, [])
        names = {r["name"] for r in before}
        merged[section] = [ran.get(r["name"], r) for r in before] + [r for r in doc.get(section, [])
                                                                     if r["name"] not in names]
    for item in ("quant", "loading"):  # measured by this call: replaces the earlier figures
        if item in doc:
            merged[item] = doc[item]
    merged["versions"] = doc["versions"]
    merged["calls"] = merged.get("calls", []) + [call]
    return merged


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="where the results JSON goes")
    ap.add_argument("--work", default="", help="scratch folder for the runs (default: a temporary folder)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: checks the plumbing only")
    ap.add_argument("--deadline", type=float, default=420, help="skip runs that would start after this many seconds")
    ap.add_argument("--match", default="", help="only runs whose name contains one of these comma-separated words")
    ap.add_argument("--only", default="", help="comma-separated: ladder,profiles,quant,loading,sample,speed")
    ap.add_argument("--run-timeout", type=float, default=240,
                    help="seconds a profile row may run (SD3.5/FLUX rows beside five others took 160-240 s; "
                         "an int8 FLUX row needs more, or fewer rows at once)")
    ap.add_argument("--jobs", type=int, default=1, help="trainings run at once (memory figures stay per run; "
                                                        "seconds per step then include the contention)")
    a = ap.parse_args()
    results_dir = Path(a.out)
    results_dir.mkdir(parents=True, exist_ok=True)
    out = Path(a.work or tempfile.mkdtemp(prefix="gpu_check-"))  # runs, models, logs: scratch
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    os.environ.setdefault("LOWMEM_ALIGNPROP_CACHE", str(out / "cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.path.insert(0, str(ROOT))
    import torch

    cpu = a.cpu_smoke
    if not cpu and not torch.cuda.is_available():
        print("no CUDA device: use --cpu-smoke to check the plumbing on CPU", file=sys.stderr)
        return 2
    sections = {"ladder", "profiles", "quant", "loading", "sample", "speed"}
    only = set(filter(None, a.only.split(","))) or sections
    if unknown := sorted(only - sections):  # (a typo ran nothing and wrote an empty results file)
        print(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(sorted(sections))}",
              file=sys.stderr)
        return 2
    aes = make_aesthetic_weights(Path(os.environ["LOWMEM_ALIGNPROP_CACHE"]) / "aesthetic-random", tiny=cpu)
    device = {"name": "cpu", "total_gb": None} if cpu else {
        "name": torch.cuda.get_device_name(0),
        "total_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)}
    from lowmem_alignprop.measure.provenance import provenance

    # the provenance block every result carries (command, date, device, versions); the device is this machine
    # (CPU, cores, torch threads) with the card's name and memory
    doc = {"kind": "gpu_check", **provenance("python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]), **device),
           "code": code_version(),
           "ladder": [], "profiles": [], "sample": [], "speed": []}
    common = ["--reward", "aesthetic", "--set", f"reward_weights={aes}", "--steps", "2", "--set", "sample_prompts=0"]
    if cpu:
        common += ["--set", "mixed_precision=no"]

    def time_left() -> bool:
        return time.time() - t_start < a.deadline

    try:
        import lowmem_alignprop.measure.planner  # noqa: F401
        have_planner = True
    except ImportError:
        have_planner = False
    pool = PlannerPool(have_planner)
    jobs: list[tuple[str, str, list[str], float]] = []  # (section, name, args, budget)
    if "profiles" in only:  # the profiles first: they are the claims the README makes
        flow_prompts = out / "flow_prompts.txt"
        flow_prompts.write_text("a photo of a cat\na red bicycle\n")
        for name, profile, model, over, budget in PROFILE_RUNS:
            if cpu:
                profile, model, over = "cpu", "tiny", {}
            over = {k: (str(flow_prompts) if v == "FLOW_PROMPTS" else v) for k, v in over.items()}
            sets = [x for k, v in over.items() for x in ("--set", f"{k}={v}")]
            jobs.append(("profiles", name, ["--profile", profile, "--model", model, *common, *sets], budget))
    if "ladder" in only:
        cfg = {}
        for label, change in LADDER:
            cfg.update(change)
            sets = [x for k, v in cfg.items() for x in ("--set", f"{k}={str(v).lower()}")]
            base = (["--profile", "cpu", "--model", "tiny"] if cpu else
                    ["--profile", "rtx3060", "--model", "sd15", "--set", "truncation=fixed", "--set", "k=1",
                     "--set", "sample_steps=10", "--set", "grad_accum=1"])
            jobs.append(("ladder", "ladder " + label, base + common + sets, 0))
    if "speed" in only:
        for label, change in SPEED_RUNS:
            sets = [x for k, v in change.items() for x in ("--set", f"{k}={str(v).lower()}")]
            base = ["--profile", "cpu", "--model", "tiny"] if cpu else SPEED_BASE
            jobs.append(("speed", label, base + common + sets, 0))
    samples: list[tuple[str, str, list[str], float]] = []  # (name, its training row, args without --lora, budget)
    if "sample" in only and "profiles" in only:  # they sample the LoRA a training row of this call wrote
        rows = {name: (profile, model, over) for name, profile, model, over, _ in PROFILE_RUNS}
        for name, source, budget in SAMPLE_RUNS:
            if cpu:
                source = PROFILE_RUNS[0][0]  # the tiny model's LoRA from the first row
            profile, model, over = ("cpu", "tiny", {}) if cpu else rows[source]
            over = {k: (str(flow_prompts) if v == "FLOW_PROMPTS" else v) for k, v in over.items()}
            sets = [x for k, v in over.items() for x in ("--set", f"{k}={v}")]
            samples.append((name, source, ["sample", "--profile", profile, "--model", model, *common, *sets,
                                           *SAMPLE_ARGS], budget))
    if a.match:  # rerun a subset: jobs whose name contains one of the comma-separated words
        jobs = [j for j in jobs if matches(j[1], a.match)]
        samples = [j for j in samples if matches(j[0], a.match)]
    # the CPU smoke plans its first run only: the plumbing is the same for every run, and each planner process is
    # ~20 s of a 2-core machine's CPU
    for _, name, args, _ in jobs[:1] if cpu else jobs:
        pool.submit(name, args)
    slug = "cpu-smoke" if cpu else device["name"].lower().replace("nvidia ", "").replace(" ", "-")
    path = results_dir / f"gpu-{slug}-{doc['date']}.json"
    previous = load_previous(path, ROOT / "benchmarks" / "results" / path.name)
    lock = threading.Lock()

    def save() -> None:  # after every run: a call stopped at the device's time limit keeps what it measured
        with lock:
            doc["wall_seconds"] = round(time.time() - t_start, 1)
            from lowmem_alignprop.run import atomic  # whole files only: a kill mid-write leaves the previous save

            atomic.write_text(path, json.dumps(merge_docs(previous, doc), indent=1, default=str))

    for section, name, _, _ in jobs:
        doc[section].append({"name": name, "status": PENDING})
    for name, *_ in samples:
        doc["sample"].append({"name": name, "status": PENDING})
    save()
    def quant_check() -> None:  # about a minute: nf4/int8 base UNet forward+backward into LoRA, in this process
        try:
            from verify_quant import gpu_verify_quant  # benchmarks/verify_quant.py, beside this script
            doc["quant"] = gpu_verify_quant(out / "quant")
        except Exception as e:
            doc["quant"] = {"error": f"{type(e).__name__}: {e}"[:1000]}
        save()

    def loading_check() -> None:  # about a minute: a FLUX.1-shaped file read to the card, whole and block by block
        try:
            result = out / "load-rss.json"
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_rss.py"), "--device", "cuda",
                            "--double", "3", "--single", "8", "--dir", str(out / "loadrss"), "--json", str(result)],
                           check=True, timeout=300, capture_output=True, text=True)
            doc["loading"] = json.loads(result.read_text())
        except subprocess.CalledProcessError as e:
            doc["loading"] = {"error": (e.stderr or "")[-1000:]}
        except Exception as e:
            doc["loading"] = {"error": f"{type(e).__name__}: {e}"[:1000]}
        save()

    def run_job(job):
        section, name, args, budget = job
        if not time_left():
            r = {"name": name, "status": "skipped (deadline)"}
            pool.cancel(name)
        else:
            r = run_one(name, args, budget, out, a.run_timeout if section == "profiles" else 150, cpu)
            r["concurrent_runs"] = a.jobs
            r["planner"] = pool.collect(name, timeout=max(10, a.deadline + 120 - (time.time() - t_start)))
        slot = next(i for i, x in enumerate(doc[section]) if x["name"] == name)
        doc[section][slot] = r
        save()
        for sample in samples:  # at once, in this worker: before the call's deadline stops new runs
            if sample[1] == name:
                run_sample(*sample)

    def run_sample(name, source, args, budget):  # `sample` with the LoRA its training row wrote in this call
        lora = out / "runs" / slug_of(source) / "lora"
        if not time_left():
            r = {"name": name, "status": "skipped (deadline)"}
        elif not lora.is_dir():
            r = {"name": name, "status": f"skipped (no LoRA: the row {source!r} did not finish in this call)"}
        else:
            r = run_one(name, [*args, "--lora", str(lora)], budget, out, 240, cpu)
        doc["sample"][next(i for i, x in enumerate(doc["sample"]) if x["name"] == name)] = r
        save()

    quant = "quant" in only and not cpu
    if quant and a.jobs <= 1:  # alone, before the trainings: its seconds are then its own
        quant_check()
    if "loading" in only and not cpu:  # alone too: its host memory and seconds are its own
        loading_check()
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as ex:  # each job is a subprocess: threads suffice
        runs = ex.map(run_job, jobs)
        if quant and a.jobs > 1:  # beside the first trainings (its peak counters are this process's own)
            quant_check()
            doc["quant"]["concurrent_runs"] = a.jobs
        list(runs)
    ran = {j[1] for j in jobs}
    for sample in samples:  # those whose training row was not among this call's runs: said so
        if sample[1] not in ran:
            run_sample(*sample)
    doc = merge_docs(previous, doc)
    print(f"wrote {path}")
    gib = (lambda b: "    -" if b is None else f"{b / 2**30:5.2f}")
    print(f"  {'run':<48} {'status':>8} {'peak GiB':>8} {'reserved':>8} {'stage':>10} {'s/step':>7}")
    for r in doc["ladder"] + doc["profiles"] + doc.get("speed", []):
        rep = r.get("memory_report") or {}
        sps = (r.get("summary") or {}).get("seconds_per_step")
        print(f"  {r['name']:<48} {r.get('status'):>8} {gib(rep.get('peak_allocated')):>8} "
              f"{gib(rep.get('peak_reserved')):>8} {str(rep.get('peak_stage')):>10} "
              f"{'-' if sps is None else round(sps, 2):>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

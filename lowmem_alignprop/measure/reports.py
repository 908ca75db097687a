"""Reports, formatted next to each other: the plan's table (``lowmem-alignprop plan``) and the memory report
(memory_report.md). The modules that compute the numbers (planner.py, profiler.py) hand over plain dicts."""

from __future__ import annotations

from typing import Any

from lowmem_alignprop.memory.allowances import GIB, MIB, RESERVED_FACTOR, WORKSPACE_BYTES, fmt_bytes
from lowmem_alignprop.settings.config import TIME_LIMIT_MARGIN_S, Config, describe_k, flag_value, set_flags
from lowmem_alignprop.settings.image_size import describe_sizes, largest_size, resolution_of, sizes_of
from lowmem_alignprop.memory.stages import STAGES

MEMORY_VIZ_URL = "https://pytorch.org/memory_viz"


def _steps(described: str | None) -> str:
    """'steps 2-4, 7', 'step 3' or 'steps none' for a _describe_steps text."""
    return f"step {described}" if described and described.isdigit() else f"steps {described or 'none'}"


def _gib_or_dash(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.3f}"


def _layers(cfg: dict[str, Any]) -> str:
    """The plan's LoRA line names lora_layers when it is not the default attention projections."""
    layers = cfg.get("lora_layers", "attention")
    return "" if layers == "attention" else f", {layers}"


SHOWN_IF_SET = ("window_keep", "tile_size", "block_swap", "encode_on_cpu", "deepspeed_zero", "offload", "compile",
                "channels_last", "fused_adamw", "merge_lora_nograd", "tf32")


def plan_features(cfg: dict[str, Any]) -> list[str]:
    """The plan's features line: precision, attention and checkpointing always; the other memory and speed fields
    where they are on or differ from their default (a --fastest choice such as window_keep among them)."""
    feats = [f"mixed_precision={cfg['mixed_precision']}", f"attention={cfg['attention']}",
             f"unet_checkpointing={cfg['unet_checkpointing']}", f"vae_checkpointing={cfg['vae_checkpointing']}"]
    feats += [name for name in ("reward_checkpointing", "sliced_decode", "tiled_decode", "cache_prompt_embeddings",
                                "offload_frozen", "activation_offload") if cfg[name]]
    if cfg["base_quant"] != "none":
        feats.append(f"base_quant={cfg['base_quant']}")
    if not cfg.get("expandable_segments", True):
        feats.append("expandable_segments=false")
    # the other memory and speed fields a profile or a search may set, where they differ from the default
    feats += [f"{name}={flag_value(cfg[name])}" for name in SHOWN_IF_SET
              if name in cfg and cfg[name] != getattr(Config, name) and (name != "tile_size" or cfg["tiled_decode"])]
    return feats


def describe_sampler(s: dict[str, Any]) -> str:
    """plan's sampler line (planner.plan's ``sampler``): what the UNet predicts as the model's files and the run's
    settings resolve it (a single file's v_pred key, a folder's scheduler, --set prediction_type), the schedule's zero
    terminal SNR, DDIM's eta and the guidance rescale."""
    predicts = {"v_prediction": "v-prediction", "epsilon": "epsilon (noise) prediction"}.get(s["prediction_type"],
                                                                                          str(s["prediction_type"]))
    return ", ".join([f"{s['scheduler']} at eta {s['eta']:g}", predicts]
                     + (["zero terminal SNR"] if s["zero_terminal_snr"] else [])
                     + ([f"guidance_rescale {s['guidance_rescale']:g}"] if s["guidance_rescale"] else []))


def _least_needed(tried: list[dict], config: dict) -> list[str]:
    """The line after "no change made it fit": the least any tried change needed, and what to change instead."""
    rows = [t for t in tried if t.get("peak_needed") is not None]
    if not rows:
        return []
    least = min(rows, key=lambda t: t["peak_needed"])
    k = "k" if config.get("truncation") == "fixed" else "k_max"
    return [f"  the least needed: {_gib_or_dash(least['peak_needed'])} GiB, with {set_flags(least['set'])}: give a "
            f"budget_gb of at least that, or lower what is trained (--set resolution, batch_size, {k})"]


def sizes_line(resolution: Any) -> str:
    """The plan's image size: ``1024 px``; several: each, and that the table is the largest's step."""
    if len(sizes_of(resolution)) == 1:
        return f"{resolution} px"
    return (f"{describe_sizes(resolution)} px (a step at each in turn; the table and the time are the step at the "
            f"largest, {resolution_of(*largest_size(resolution))})")


def format_plan(r: dict[str, Any]) -> str:
    """The plan's table (planner.plan's result) as the command prints it."""
    from lowmem_alignprop.settings.model_kind import FLOW_KINDS, denoiser_component

    cfg, est = r["config"], r["estimate"]
    k = describe_k(cfg)
    feats = plan_features(cfg)
    denoiser = denoiser_component(est.get("model_kind") in FLOW_KINDS)
    lines = [
        f"lowmem-alignprop plan: profile {r['profile']}, model {r['model']}, reward {r['reward']}, "
        f"target {r['target']} ({'no autocast: fp32' if r['autocast'] == 'none' else r['autocast']})",
        f"  {sizes_line(cfg['resolution'])}, batch {cfg['batch_size']} x grad_accum {cfg['grad_accum']}, {k} of "
        f"{cfg['sample_steps']} steps, "
        + (f"lora (r={cfg['lora_rank']}{_layers(cfg)})" if cfg["train_unet"] == "lora" else "the full UNet trains")
        + f", {cfg['optimizer']}",
        f"  features: {', '.join(feats)}",
        *([f"  sampler: {describe_sampler(r['sampler'])}"] if r.get("sampler") else []),
        "",
        f"  {'stage':<15} {'allocated':>10} {'weights':>9} {'other':>9} {'reserved':>9}  on the device (GiB)",
    ]
    for name in STAGES:
        f = r["stages"].get(name)
        if f is None:
            lines.append(f"  {name:<15} {'-':>10}")
            continue
        mark = "  <- peak" if name == r["peak_stage"] else ""
        # train_unet=full: the trained weights are the whole UNet (the estimate counts them as "lora")
        where = [("unet (trained)" if m == "lora" else m) for m in f["on_device"] if m != "unet"] \
            if cfg["train_unet"] == "full" else f["on_device"]
        where = [denoiser if m == "unet" else m for m in where]  # (SD3/FLUX: the estimate's "unet" is a transformer)
        lines.append(f"  {name:<15} {_gib_or_dash(f['allocated']):>10} {_gib_or_dash(f['weights']):>9} "
                     f"{_gib_or_dash(f['allocated'] - f['weights']):>9} {_gib_or_dash(f['reserved']):>9}  "
                     f"{', '.join(where)}{mark}")
    cuda = r["target"] == "cuda"
    lines.append("")
    if cuda:
        frag = r.get("fragmentation_allowance", 0)
        lines.append(f"  peak: {_gib_or_dash(r['peak_allocated'])} GiB allocated in {r['peak_stage']} -> "
                     f"{_gib_or_dash(r['stages'][r['peak_stage']]['reserved'])} reserved (x{RESERVED_FACTOR:.2f}"
                     + (f" + {_gib_or_dash(frag)} fixed-segment fragmentation" if frag else "")
                     + f") + {WORKSPACE_BYTES / MIB:.0f} MiB "
                     f"workspaces = {_gib_or_dash(r['peak_needed'])} GiB needed")
    else:
        lines.append(f"  peak: {_gib_or_dash(r['peak_allocated'])} GiB allocated in {r['peak_stage']} (CPU: exact bytes)")
    if r["budget_bytes"]:
        share = 100 * r["peak_needed"] / r["budget_bytes"]
        verdict = "FITS" if r["fits"] else "DOES NOT FIT"
        spare = (r["budget_bytes"] - r["peak_needed"]) / GIB
        digits = 1 if 99 <= share <= 101 else 0  # at the edge, "100%" could be either side of the verdict
        lines.append(f"  budget: {r['budget_gb']:g} GiB (profile {r['profile']}): {verdict} "
                     f"({share:.{digits}f}% of the budget, {spare:+.2f} GiB spare)")
    else:
        lines.append("  budget: none given (set budget_gb in the profile or --set budget_gb=8)")
    if r.get("profile_note"):
        lines.append(f"  {r['profile_note']}")
    host = r.get("host_memory")
    if cuda and host:
        pinned = f", {_gib_or_dash(r['host_pinned'])} of it block swap's pinned blocks" if r.get("host_pinned") else ""
        lines.append(f"  host memory (CPU RAM) the models hold: {_gib_or_dash(host['load'])} GiB at most while loading, "
                     f"{_gib_or_dash(host['steps'])} GiB during the steps{pinned}; plus the process itself")
    disk = r.get("disk")
    if disk:
        lines.append(f"  disk (--output-dir): {fmt_bytes(disk['checkpoint'])} per checkpoint, up to {fmt_bytes(disk['peak'])} "
                     f"for the run ({disk['at_once']} checkpoint{'s' if disk['at_once'] > 1 else ''} at once, the "
                     "outputs and logs)")
    if r["fits"] is False:
        s = r.get("suggestion")
        if s:
            lines.append(f"  cheapest change that fits: {s['change']}")
            lines.append(f"      {set_flags(s['set'])}   -> {_gib_or_dash(s['peak_needed'])} GiB needed, peak in "
                         f"{s['peak_stage']}")
        elif r.get("suggestion_interrupted"):
            lines.append("  the search for a change that fits was interrupted (Ctrl-C) after "
                         f"{len(r.get('tried', []))} estimates; none of them fit")
        elif r.get("tried"):
            lines.append(f"  no change from the feature list made it fit ({len(r['tried'])} tried"
                         + ("; gave up after that many estimates" if r.get("suggestion_gave_up") else "") + ")")
            lines += _least_needed(r["tried"], r["config"])
    lines += format_time(r.get("time"), r["config"], r.get("renders"))
    lines.append("")
    lines.append("  allowances for what fake tensors cannot see:")
    lines += [f"    - {k}: {v}" for k, v in r["allowances"].items()]
    if r["notes"]:
        lines.append("  notes:")
        lines += [f"    - {n}" for n in r["notes"]]
    made = f"estimated in {est['seconds']:.0f} s with fake tensors (no GPU, no weights loaded)"
    if est.get("cached"):
        made = f"read from the estimate cache ({made}, {est['cached']}; --no-cache estimates again)"
    lines.append(f"  {made}; plan total {r['seconds']:.0f} s")
    if not cuda:
        from lowmem_alignprop.settings.profiles import GPU_PROFILES
        lines.append(f"  (planned for a CPU run; the budget is the {r['profile']} card's, a CPU run uses RAM; drop "
                     "--device cpu to plan for the card)" if r["profile"] in GPU_PROFILES else
                     "  (planned for this CPU" + ("; --profile auto, the default, found no CUDA GPU here"
                                                 if r.get("auto_found_no_gpu") else "")
                     + "; for a card pass its profile, e.g. --profile rtx3060, or --device cuda)")
    return "\n".join(lines)


def format_time(t: dict[str, Any] | None, cfg: dict[str, Any], renders: dict[str, Any] | None = None) -> list[str]:
    """The plan's time lines: seconds per stage on the card, per micro-step and per optimizer step, and the images
    rendered without gradient beside the steps (``renders``: step_time.render_time's)."""
    if not t:
        return []
    k = f"K = {t['k_mean']:g}" if cfg["truncation"] == "fixed" else f"mean K = {t['k_mean']:g}"
    w = t["work_per_micro_step"]
    work = (f"{(w['matmul_flops'] + w['attention_flops']) / 1e12:.2f} TFLOP, {w['other_bytes'] / 1e9:.1f} GB "
            f"elementwise, {w['ops'] / 1e3:.0f}k ops, {w['pcie_bytes'] / 1e9:.2f} GB over PCIe per micro-step")
    lines = ["", f"  time per step ({k}, {cfg['sample_steps']} steps): {work}"]
    if t.get("device") is None:
        return lines + [f"    {t['note']}"]
    d = t["device_figures"]
    peak = {"fp16": d["fp16_tflops"], "bf16": d["bf16_tflops"]}.get(t["matmul_dtype"].split()[0],
                                                                     d["tf32_tflops"] if "tf32" in t["matmul_dtype"]
                                                                     else d["fp32_tflops"])
    lines.append(f"    on {t['device']} ({peak:g} TFLOPS {t['matmul_dtype']}, {d['memory_gbs']:g} GB/s"
                 + (f", PCIe {d['pcie_gbs']:g} GB/s" if d["pcie_gbs"] else "") + "), seconds:")
    lines.append("    " + "  ".join(f"{name} {fmt_seconds(sec)}" for name, sec in t["stages"].items()))
    lines.append(f"    per micro-step {fmt_seconds(t['micro_step'])} s; per optimizer step "
                 f"{fmt_seconds(t['optimizer_step'])} s ({cfg['grad_accum']} micro-step"
                 f"{'s' if cfg['grad_accum'] > 1 else ''} + optimizer); the run's {cfg['steps']} steps: "
                 f"{fmt_duration(cfg['steps'] * t['optimizer_step'])} of training; an estimate (calibration and its "
                 "error: benchmarks/REPORT.md section 6)")
    if line := steps_in_time_limit(cfg, t["optimizer_step"], t["device"]):
        lines.append(line)
    kinds = (("sample_grid", "sample-grid"), ("evaluation", "held-out evaluation"), ("judged", "toy-world judged"))
    if renders and (parts := [f"{renders['images'][key]} {name}" for key, name in kinds if renders["images"][key]]):
        each = fmt_seconds(renders["seconds_per_image"])
        lines.append(f"    beside the steps, {', '.join(parts)} images without gradient: at most "
                     f"{fmt_duration(renders['seconds'])} more ({each} s an image; sample_prompts, sample_every, "
                     "eval_every set how many)")
    return lines


def steps_in_time_limit(cfg: dict[str, Any], step_s: float, device: str) -> str | None:
    """plan --max-minutes M: how many of the run's steps fit in M minutes at the plan's ``step_s`` seconds a step
    on ``device`` (the run keeps TIME_LIMIT_MARGIN_S for its end); None without a limit."""
    limit = cfg.get("max_minutes") or 0
    if limit <= 0 or step_s <= 0:
        return None
    head, at = f"    --max-minutes {limit:g} on {device}:", f"at {fmt_seconds(step_s)} s a step"
    if cfg["steps"] * step_s <= limit * 60 - TIME_LIMIT_MARGIN_S:
        return f"{head} the run's {cfg['steps']} steps fit ({at}, {fmt_duration(cfg['steps'] * step_s)} of training)"
    fit = max(0, int((limit * 60 - TIME_LIMIT_MARGIN_S) // step_s))
    return (f"{head} about {fit} of the run's {cfg['steps']} steps fit ({at}, less the {TIME_LIMIT_MARGIN_S / 60:g} "
            "min the run keeps for its end; the model's loading and the sample renders not counted); --resume latest "
            "trains the rest")


def fmt_seconds(sec: float) -> str:
    """Seconds for a table: three significant digits, whole seconds from 100 on, never an exponent."""
    if sec >= 100:
        return f"{sec:.0f}"
    if sec >= 0.01:
        return f"{sec:.3g}"
    return "<0.01" if sec > 0 else "0"


def fmt_duration(sec: float) -> str:
    """A span a person reads: '0.2 s', '45 s', '37 min', '5.2 h', '3.1 days'."""
    if sec < 0.95:  # (a tenth: under a second was '0 s')
        return f"{sec:.1f} s"
    if sec < 120:
        return f"{sec:.0f} s"
    if sec < 2 * 3600:
        return f"{sec / 60:.0f} min"
    if sec < 48 * 3600:
        return f"{sec / 3600:.1f} h"
    return f"{sec / 86400:.1f} days"


# what plan --fastest and --auto-fit say when their search turns tiled_decode on
TILED_APPROXIMATE = ("tiled_decode is approximate: the VAE's GroupNorm and mid-block attention see one tile, so the "
                     "images and LoRA gradients differ a little, most at the seams (docs/design.md section 3)")


def format_fastest(r: dict[str, Any]) -> str:
    """plan --fastest's answer: the quickest configuration that fits, as flags and a profile, then its plan."""
    given, found = r["given"], r["found"]
    lines = [f"lowmem-alignprop plan --fastest: profile {r['profile']}, card {r['device']}, "
             f"{r['images_per_step']} image{'s' if r['images_per_step'] > 1 else ''} per optimizer step, "
             + (f"{len(r['tried'])} configurations estimated in {r['seconds']:.0f} s" if not r.get("from_cache") else
                f"{len(r['tried'])} configurations in {r['seconds']:.0f} s ({len(r['tried']) - r['from_cache']} "
                f"estimated, {r['from_cache']} read from the estimate cache)")
             + (f" ({r['jobs']} worker processes)" if r.get("workers_started") else "")]
    if r.get("estimates_ran_out"):
        lines.append(f"  the search stopped at its {r['max_estimates']} estimates: --max-estimates N with a larger N "
                     "may find a quicker configuration")
    if found is None:
        lines.append("  nothing in the searched features fits the budget; the configuration as given:")
        return "\n".join(lines + ["", format_plan(r["plan"])])
    budget = r["plan"]["budget_bytes"]
    lines.append(f"  fastest that fits: {fmt_seconds(found['seconds'])} s per optimizer step (estimated), "
                 f"{found['needed'] / GIB:.2f} GiB needed ({100 * found['needed'] / budget:.0f}% of the budget)")
    if given is not None:
        verdict = "fits" if given["fits"] else "does not fit"
        speed = (f"; {given['seconds'] / found['seconds']:.2f}x the fastest's time" if found["seconds"] else "")
        lines.append(f"  as given: {fmt_seconds(given['seconds'])} s per optimizer step, "
                     f"{given['needed'] / GIB:.2f} GiB needed "
                     f"({verdict}){speed}")
    lines.append("  as flags: " + (set_flags(r["set"]) if r["set"] else "(no change: the configuration as given)"))
    if r["set"].get("tiled_decode") is True:  # (the one approximate memory feature the search may choose)
        lines.append(f"  {TILED_APPROXIMATE}")
    lines.append("  as a profile (save it as a .yaml file and pass --profile FILE):")  # its card: what it targets
    lines += ["    " + line for line in r["profile_yaml"].splitlines()]
    lines += ["", format_plan(r["plan"])]
    return "\n".join(lines)


def _gib_or_na(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / GIB:.3f}"


def memory_report_markdown(report: dict[str, Any]) -> str:
    """memory_report.md: the profiler's report (profiler.StageProfiler.report) as Markdown."""
    dev = report["device"]
    cuda = dev["type"] == "cuda"
    budget = report["budget_bytes"]
    name = dev.get("name", dev["str"])
    if dev.get("total_memory"):
        name += f", {dev['total_memory'] / GIB:.1f} GiB"
    lines = ["# Memory report", "", f"- device: {dev['str']} ({name}); torch {report['torch']}"]
    if report["peak_allocated"] is not None:
        where = f"in {report['peak_stage']}" + (f" (step {report['peak_step']})" if report["peak_step"] else "")
        fits = {True: "fits", False: "does NOT fit", None: "no budget given"}[report["fits_budget"]]
        basis = (f" (judged on the {_gib_or_na(report['peak_reserved'])} GiB reserved)"
                 if report.get("fits_basis") == "peak_reserved" else
                 "" if cuda else " (judged on the tensors' bytes; the process's resident memory, RSS, is below)")
        lines.append(f"- peak allocated: {_gib_or_na(report['peak_allocated'])} GiB {where}"
                     + (f"; budget {report['budget_gb']:g} GiB: {fits}{basis}" if budget else ""))
    else:
        lines.append("- peak allocated: not measured (CPU without detail steps records time and RSS only)")
    summ = report["summary_steps"]
    measured = summ.get("peak_measured_steps")
    excluded = f" (step {summ['warmup_excluded']} excluded as warm-up)" if summ["warmup_excluded"] else ""
    if measured and measured != summ["steps"]:  # CPU: peaks only on the detail steps
        timed = summ.get("seconds_steps") or summ["steps"]
        counted = "" if timed == summ["steps"] else "the measured ones left out: slower"
        why = "; ".join(x for x in (excluded.strip(" ()"), counted) if x)
        lines.append(f"- per-stage figures: mean seconds over {_steps(timed)}" + (f" ({why})" if why else ""))
        lines[-1] += f"; peaks measured in {_steps(measured)} only (the overall peak is the largest of them)"
    else:
        lines.append(f"- per-stage figures: max peak and mean seconds over {_steps(summ['steps'])}{excluded}"
                     "; the overall peak includes every step")
    lines.append(f"- method: {report['method']}")
    rss = report.get("rss")
    if rss:
        lines.append(_rss_line(rss))
    snap = report["snapshot"]
    if snap:
        if snap.get("path"):
            lines.append(f"- memory snapshot of steps {snap['recorded_steps']}: `{snap['path']}`; "
                         f"open {MEMORY_VIZ_URL} and drag and drop the file onto it")
        else:
            lines.append(f"- memory snapshot: {snap.get('note', 'not taken')}")
    lines += ["", "## Peak per stage", ""]
    head = ["stage", "peak allocated (GiB)"]
    if cuda:
        head += ["peak reserved (GiB)", "peak active (GiB)"]
    else:
        rss_steps = sorted({f.get("rss_steps") for f in report["stages"].values() if f.get("rss_steps")})
        head += [f"max RSS (GiB{', ' + _steps(rss_steps[0]) if len(rss_steps) == 1 else ''})"]
    head += ["seconds (mean)", "share of budget"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for stage in STAGES:
        fig = report["stages"].get(stage)
        if fig is None:
            lines.append("| " + " | ".join([stage] + ["-"] * (len(head) - 1)) + " |")
            continue
        row = [stage, _gib_or_na(fig["peak_allocated"])]
        row += [_gib_or_na(fig["peak_reserved"]), _gib_or_na(fig["peak_active"])] if cuda else [_gib_or_na(fig.get("rss_max"))]
        row.append(f"{fig['seconds_mean']:.3f}")
        peak = fig["peak_allocated"]
        row.append("n/a" if (not budget or peak is None) else f"{100 * peak / budget:.1f}%")
        lines.append("| " + " | ".join(row) + " |")
    if report["modules"]:
        labels = list(report["modules"])
        names: list[str] = []
        for split in report["modules"].values():
            names += [n for n in split if n not in names]
        lines += ["", "## Resident bytes by module (params + buffers; optimizer: state; LoRA counted once)", "",
                  "| module | " + " | ".join(f"{lab.replace('_', ' ')} (GiB)" for lab in labels) + " |",
                  "|---|" + "---:|" * len(labels)]
        for n in names + ["total"]:
            cells = []
            for lab in labels:
                split = report["modules"][lab]
                b = sum(s["bytes"] for s in split.values()) if n == "total" else split.get(n, {}).get("bytes")
                cells.append(_gib_or_na(b))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _rss_line(rss: dict[str, Any]) -> str:
    """The report's line on resident memory: the training's and the measurement's apart."""
    parts = []
    if rss.get("after_load") is not None:
        parts.append(f"{_gib_or_na(rss['after_load'])} GiB after load")
    if rss.get("before_first_step") is not None:
        parts.append(f"{_gib_or_na(rss['before_first_step'])} GiB when the first step began")
    if rss.get("steps_max") is not None:
        parts.append(f"up to {_gib_or_na(rss['steps_max'])} GiB in {_steps(rss['steps'])} (allocation not measured)")
    if rss.get("measured_steps_max") is not None:
        parts.append(f"{_gib_or_na(rss['measured_steps_max'])} GiB in measured {_steps(rss['measured_steps'])}")
    if rss.get("process_peak") is not None:
        parts.append(f"process peak {_gib_or_na(rss['process_peak'])} GiB by the last step")
    line = "- resident memory (RSS, GiB): " + ("; ".join(parts) if parts else "not measured")
    if rss.get("measurement_bytes") is not None:
        line += (f". The allocation measurement itself held at most {fmt_bytes(rss['measurement_bytes'])} "
                 "(one scan of the process's objects at the step start, then a table of the live storages)")
    if rss.get("host_allocator"):  # glibc keeps freed memory unless told otherwise: RSS is read knowing which
        line += f". C allocator: {rss['host_allocator']}"
    return line

"""``lowmem-alignprop plan --fastest``: the memory features with the lowest estimated step time that fit the budget.

Every memory feature trades time for bytes (a recompute, a PCIe copy, more micro-steps). The search keeps what is
trained (images per optimizer step, resolution, K range, base weights) and picks, for each micro-batch that divides
the images per optimizer step, the levels of:

    window_keep K_max > 16 > 8 > 4 > 2 > 1 > 0      unet_checkpointing call < blocks      reward_checkpointing
    vae_checkpointing none < blocks < resnets     decode plain < sliced < tiled   offload_frozen   activation_offload
    merge_lora_nograd on < off

(window_keep N: the last min(K, N) grad-window calls keep their activations and are not recomputed in backward.)

(cache_prompt_embeddings and expandable segments are always on: they cost no time.) ``--allow-task-changes`` adds
block swap (half, then seven eighths of the blocks from pinned CPU memory), a quantized base (int8, nf4), both
together, and lower resolutions, used only when nothing else fits.

It stays cheap by reusing estimates stage-wise: per micro-batch, every feature is estimated alone on top of the
all-off configuration (its time and per-stage memory deltas); combinations are ranked by the sum of their time deltas
and their peak is predicted from the summed per-stage deltas; only the quickest predicted to fit are estimated for
real, in that order, and the first that fits is taken; a combination that an estimated miss shows cannot fit (the
miss's own figures less only what its levels save beyond the miss's) is passed over. A micro-batch whose all-off
time is already slower than the best found (at first the configuration as given, when it fits) is not searched.
Finally each single step back (one feature a level lower, a larger micro-batch) is estimated, and taken when it fits
and is faster, until none is; then window_keep grows from the chosen level to what the budget's room holds (each
kept call adds about per_kept_bytes).
Every estimate is cached (planner.reuse_estimates: a configuration reached by two changes, such as the one given met
again as the all-on corner, and the chosen one planned at the end, is estimated once; each still counts as one of
max_estimates, as before).

With ``jobs`` > 1 the estimates the search will ask for next (the micro-batches' all-off corners, the features alone,
the first combinations predicted to fit, a polish round's neighbours) are computed ahead in that many worker
processes and handed to the search through planner.remember; the search itself stays sequential, so it takes the same
path, counts the same estimates and picks the same configuration as with one process, in less wall time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from lowmem_alignprop.memory.allowances import GIB, WORKSPACE_BYTES
from lowmem_alignprop.measure import planner
from lowmem_alignprop.measure.devices import DEVICES, device_for
from lowmem_alignprop.measure.figures import reserved
from lowmem_alignprop.measure.reports import fmt_seconds
from lowmem_alignprop.measure.fit_changes import decode_tiles, has_model_reward, swappable_count, unmerged_change
from lowmem_alignprop.measure.step_time import step_time
from lowmem_alignprop.models.loading import check_before_load
from lowmem_alignprop.settings.config import Config, set_flags
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.image_size import lower_resolution

DECODE_LEVELS = ({"sliced_decode": False, "tiled_decode": False}, {"sliced_decode": True, "tiled_decode": False},
                 {"sliced_decode": False, "tiled_decode": True})
# the fields a profile YAML from --fastest holds
PROFILE_FIELDS = ("budget_gb", "card", "mixed_precision", "attention", "optimizer", "window_keep",
                  "unet_checkpointing", "vae_checkpointing", "reward_checkpointing", "sliced_decode", "tiled_decode",
                  "cache_prompt_embeddings", "offload_frozen", "activation_offload", "expandable_segments",
                  "base_quant", "block_swap", "merge_lora_nograd", "resolution", "sample_steps", "guidance_scale",
                  "eta", "truncation", "k", "k_min", "k_max", "batch_size", "grad_accum", "lr", "lora_rank",
                  "lora_layers")


def dimensions(cfg: Config, target: str, batch: int) -> list[tuple[str, list[dict[str, Any]]]]:
    """The searched features at micro-batch ``batch``: (name, levels from fastest to least memory)."""
    dims: list[tuple[str, list[dict[str, Any]]]] = [
        ("window_keep", [{"window_keep": n} for n in window_keep_levels(cfg)]),
        ("unet_checkpointing", [{"unet_checkpointing": "call"}, {"unet_checkpointing": "blocks"}]),
        ("vae_checkpointing", [{"vae_checkpointing": v} for v in ("none", "blocks", "resnets")]),
    ]
    if has_model_reward(cfg):
        dims.append(("reward_checkpointing", [{"reward_checkpointing": False}, {"reward_checkpointing": True}]))
    decode = [DECODE_LEVELS[0]] + ([DECODE_LEVELS[1]] if batch > 1 else []) \
        + ([DECODE_LEVELS[2]] if decode_tiles(cfg, target) else [])
    if len(decode) > 1:
        dims.append(("decode", decode))
    if not cfg.merge_lora_clashes():  # the no-grad calls on merged copies: fewer ops, the copies' bytes while they run
        dims.append(("merge_lora_nograd", [{"merge_lora_nograd": True}, {"merge_lora_nograd": False}]))
    if target == "cuda":
        dims.append(("offload_frozen", [{"offload_frozen": False}, {"offload_frozen": True}]))
        dims.append(("activation_offload", [{"activation_offload": False}, {"activation_offload": True}]))
    return dims


def window_keep_levels(cfg: Config) -> list[int]:
    """window_keep's levels, fastest first: every grad-window call kept (K_max), 16, 8, 4, 2, 1, none (a kept SD1.5
    call at 512 px holds about 2.2 GiB: the budget's room is a few calls; fill_window takes what lies between)."""
    k_max = cfg.window_bounds()[1]
    return sorted({n for n in (k_max, 16, 8, 4, 2, 1) if n <= k_max}, reverse=True) + [0]


JOBS_ENV = "LOWMEM_ALIGNPROP_PLAN_JOBS"  # the worker count when --jobs is not given (a shared machine; the tests: 1)


def default_jobs() -> int:
    """Worker processes for the search's estimates: $LOWMEM_ALIGNPROP_PLAN_JOBS when set; else one per core up to 8
    and one per 2 GiB of available memory (an estimate's process holds 0.6 GiB for FLUX.1, about 1 for SD1.5: fake
    tensors have no storage); none on one core. (On 2 cores, 2 workers: the tiny model's 40-estimate search for the
    rtx3060 in 167 s instead of 251 s, the same answer; README, "How fast is a step".)"""
    import psutil

    if (text := os.environ.get(JOBS_ENV, "").strip()):
        if not text.isdigit() or int(text) < 1:
            raise UserError(f"{JOBS_ENV}={text!r}: set it to the number of worker processes plan --fastest may use "
                            "(1: none), or unset it")
        return int(text)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores, int(psutil.virtual_memory().available / (2 * GIB))))


def _worker_context():
    """How the workers start: forked from a fresh server process that imported the planner and diffusers' SD pipeline
    once (each worker then starts in a moment instead of ~15 s of imports), never from this process (safe beside CUDA
    and torch's threads); spawned where there is no fork server (Windows) and on macOS (a fork after torch's and the
    system frameworks' imports can hang there: Python's own default is spawn)."""
    if "forkserver" not in multiprocessing.get_all_start_methods() or sys.platform == "darwin":
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["lowmem_alignprop.measure.estimate_worker"])
    return ctx


def _quiet_worker(pids: Any) -> None:
    """A worker's start: its process id told to ``pids`` (_Workers.shutdown), the libraries quieted
    (measure/estimate_worker; a spawned worker imports it here), and our own log lines too: they would repeat the
    search's (which reads the workers' results). What user code prints in a worker (a reward's import or calls) goes
    to stderr: plan --json's stdout holds the JSON alone (the results come back through the pool)."""
    import lowmem_alignprop.measure.estimate_worker  # noqa: F401

    sys.stdout = sys.stderr
    pids.put(os.getpid())
    logging.getLogger("lowmem_alignprop").setLevel(logging.ERROR)


class _Workers:
    """plan --fastest's worker processes, started at the first estimate the search will need that is neither in
    this process nor in the estimate cache (a search planned before starts none), shut down by fastest()."""

    def __init__(self, jobs: int):
        self.jobs, self.executor, self.broken = jobs, None, False
        self.futures: list[concurrent.futures.Future] = []
        self.pids: Any = None  # each worker puts its process id here as it starts (shutdown stops those running)

    def submit(self, *args, **kwargs) -> concurrent.futures.Future | None:
        if self.broken:
            return None
        if self.executor is None:
            context = _worker_context()
            self.pids = context.SimpleQueue()
            self.executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.jobs, mp_context=context, initializer=_quiet_worker, initargs=(self.pids,))
        self.futures.append(future := self.executor.submit(*args, **kwargs))
        return future

    def shutdown(self) -> None:
        """Stop the workers. An estimate still running is one the search did not ask for (computed ahead): its
        worker is stopped rather than waited for (up to one estimate's time, 40 s for FLUX.1 on 2 cores)."""
        if self.executor is None:
            return
        if any(f.running() for f in self.futures):
            while not self.pids.empty():
                with contextlib.suppress(OSError):  # a worker gone already (Windows: access denied, not found)
                    os.kill(self.pids.get(), signal.SIGTERM)
        self.executor.shutdown(wait=True, cancel_futures=True)  # (the executor reaps a stopped worker)


def batch_options(images: int, limit: int = 6) -> list[int]:
    """Micro-batches that divide ``images`` exactly, largest first."""
    return [b for b in range(images, 0, -1) if images % b == 0][:limit]


@dataclass
class _Search:
    cfg: Config
    target: str
    device: Any
    prompts: list[str]
    max_estimates: int
    log: Callable[[str], None] | None = None
    cache: dict = dataclasses.field(default_factory=dict)
    tried: list = dataclasses.field(default_factory=list)
    pool: _Workers | None = None  # jobs > 1: estimates computed ahead (prefetch)
    pending: dict = dataclasses.field(default_factory=dict)  # change key -> the worker's future Estimate
    from_workers: int = 0  # estimates the search took from the workers
    from_cache: int = 0  # estimates read from the disk cache (measure/estimate_cache.py), not made

    def prefetch(self, changes: list[dict[str, Any]]) -> None:
        """Start the estimates of ``changes`` in the workers (those not estimated, valid, not started yet); what the
        search then asks for is waiting; no more than the estimates left to the search. Without workers: nothing."""
        if self.pool is None or self.pool.broken:
            return
        left = self.max_estimates - len(self.tried)  # what the search can still ask for
        for change in changes:
            key, cfg = tuple(sorted(change.items())), self.config(change)
            if cfg is None or key in self.cache:
                continue
            if left <= 0:
                return
            left -= 1  # one of the search's estimates: started already, read, or to start now
            if key in self.pending or planner.is_known(cfg, self.target, self.prompts):
                continue
            if (future := self.pool.submit(planner.estimate, cfg, target=self.target, prompts=self.prompts)):
                self.pending[key] = future

    def config(self, change: dict[str, Any]) -> Config | None:
        try:
            return self.cfg.with_changes(**change)
        except UserError:
            return None  # an impossible combination (activation offload without VAE checkpointing)

    def run(self, change: dict[str, Any]) -> dict[str, Any] | None:
        """Estimate ``cfg`` + ``change`` (cached): {"set", "needed", "fits", "seconds", "stages"}; None when the
        combination is invalid or the estimate budget is spent."""
        key = tuple(sorted(change.items()))
        if key in self.cache:
            return self.cache[key]
        cfg = self.config(change)
        if cfg is None:
            return None
        if len(self.tried) >= self.max_estimates:
            return None
        if (future := self.pending.pop(key, None)) is not None:
            try:  # a worker's estimate (its failure, a UserError say, is raised here as the search's own would be)
                planner.remember(cfg, self.target, self.prompts, future.result())
                self.from_workers += 1
            except concurrent.futures.process.BrokenProcessPool:  # a worker killed (out of memory?): go on here
                self.pool.broken = True  # (fastest() shuts the broken pool down)
        est = planner.estimate(cfg, target=self.target, prompts=self.prompts)
        self.from_cache += bool(est.cached)
        t = step_time(cfg, est, self.device)
        row = {"set": dict(change), "needed": est.peak_needed, "peak_stage": est.peak_stage,
               "allocated": est.peak_allocated, "per_kept_bytes": est.per_kept_bytes,
               "fits": bool(est.fits(cfg.budget_gb)), "seconds": t["optimizer_step"],
               "stages": {n: f["allocated"] for n, f in est.stages.items()}}
        self.tried.append(row)
        self.cache[key] = row
        if self.log:
            shown = set_flags({k: v for k, v in change.items() if getattr(self.cfg, k) != v})
            self.log(f"  {len(self.tried):>2}. {shown or '(as given)'}: {est.peak_needed / GIB:.2f} GiB, "
                     f"{fmt_seconds(t['optimizer_step'])} s/step -> {'fits' if row['fits'] else 'no'}")
        return row

    def needed(self, stage_bytes: dict[str, float]) -> float:
        peak = max(stage_bytes.values())
        return reserved(self.cfg, int(peak), self.target == "cuda") + \
            (WORKSPACE_BYTES if self.target == "cuda" else 0)

    def searched(self, fixed: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
        """The dimensions searched at this micro-batch (``fixed``: batch, the always-on fields and the task): those
        of the task's configuration that ``fixed`` does not set (block swap fixes its checkpointing)."""
        return [(name, levels) for name, levels in self.dimensions(fixed)
                if not any(key in fixed for level in levels for key in level)]

    def dimensions(self, change: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
        """:func:`dimensions` of the configuration with ``change`` (a task's resolution decides whether tiles cut the
        decode; block swap or a quantized base, whether the no-grad calls can run merged)."""
        return dimensions(dataclasses.replace(self.cfg, **change), self.target, change["batch_size"])

    def all_off(self, fixed: dict[str, Any]) -> dict[str, Any]:
        """``fixed`` with every searched feature at its fastest level (the all-off corner)."""
        change = dict(fixed)
        for _, levels in self.searched(fixed):
            change.update(levels[0])
        return change

    def at_batch(self, fixed: dict[str, Any], best: float) -> dict[str, Any] | None:
        """The quickest fitting combination at this micro-batch (``fixed``: batch and the always-on fields), or None."""
        dims = self.searched(fixed)
        base_change = self.all_off(fixed)
        base = self.run(base_change)
        if base is None or base["seconds"] >= best:
            return None  # the features only add time: this micro-batch cannot win
        if base["fits"]:
            return base
        most = dict(fixed)
        for _, levels in dims:
            most.update(levels[-1])
        corner = most if self.config(most) is not None else {**most, "activation_offload": False}
        self.prefetch([corner] + [{**base_change, **level} for _, levels in dims for level in levels[1:]])
        top = self.run(most) or self.run({**most, "activation_offload": False})
        if top is None or not top["fits"]:
            return None
        # each feature alone on the all-off configuration: its time and per-stage memory deltas
        deltas: list[list[tuple[dict, float, dict]]] = []
        for _, levels in dims:
            options = [({}, 0.0, {})]
            for level in levels[1:]:
                row = self.run({**base_change, **level})
                if row is None:
                    continue
                options.append((level, row["seconds"] - base["seconds"],
                                {n: row["stages"][n] - base["stages"].get(n, 0) for n in row["stages"]}))
            deltas.append(options)
        ranked = []
        for combo in itertools.product(*deltas):
            seconds = base["seconds"] + sum(c[1] for c in combo)
            stage_bytes = {n: b + sum(c[2].get(n, 0) for c in combo) for n, b in base["stages"].items()}
            change = dict(base_change)
            for level, _, _ in combo:
                change.update(level)
            ranked.append((seconds, self.needed(stage_bytes), change, combo))
        ranked.sort(key=lambda r: r[0])
        budget = self.cfg.budget_gb * GIB
        self.prefetch([change for seconds, needed, change, _ in ranked
                       if seconds < best and needed <= budget * 1.05][:self.jobs()])
        misses: list[tuple[tuple, dict[str, float]]] = []  # (combination, its estimated stages) that did not fit
        for seconds, needed, change, combo in ranked:
            if seconds >= best:
                break
            # predicted not to fit: from the all-off corner (with the deltas' 5% slack), or by an estimated miss
            if needed > budget * 1.05 or self.missed_near(combo, misses) > budget:
                continue
            row = self.run(change)
            if row is None:
                if len(self.tried) >= self.max_estimates:
                    break
                continue
            if row["fits"]:
                return row
            misses.append((combo, row["stages"]))
        return top

    def missed_near(self, combo: tuple, misses: list[tuple[tuple, dict[str, float]]]) -> float:
        """The least "needed" that ``combo`` can have by an estimated miss (0 with none): the miss's own stages less
        what ``combo``'s levels save beyond the miss's (from the all-off corner's deltas), nothing added back for a
        level that saves less (at the miss it saved no more than at the corner). Savings that overlap (window_keep
        and UNet block checkpointing cut the same activations) sum past the truth from the all-off corner; from a
        miss, a combination that differs in features leaving its peak alone is known to miss too, not estimated."""
        worst = 0.0
        for other, stages in misses:
            shifted = {n: b + sum(min(0.0, mine[2].get(n, 0) - theirs[2].get(n, 0))
                                  for mine, theirs in zip(combo, other)) for n, b in stages.items()}
            worst = max(worst, self.needed(shifted))
        return worst

    def polish(self, row: dict[str, Any]) -> dict[str, Any]:
        """One step back at a time (a feature a level lower, or twice the micro-batch with half the accumulation):
        taken while it fits and is faster."""
        improved = True
        while improved and len(self.tried) < self.max_estimates:
            improved = False
            change = row["set"]
            self.prefetch(self.neighbours(change))
            for neighbour in self.neighbours(change):
                other = self.run(neighbour)
                if other is not None and other["fits"] and other["seconds"] < row["seconds"]:
                    row, improved = other, True
                    break
        return row

    def fill_window(self, row: dict[str, Any]) -> dict[str, Any]:
        """More kept grad-window calls than the chosen window_keep level, up to what the budget's room holds: the
        number predicted from what each kept call adds to the peak (its activations, in "needed" terms), then
        estimated, one fewer at a time until one fits (taken when faster)."""
        n, k_max = row["set"].get("window_keep", 0), self.cfg.window_bounds()[1]
        cuda = self.target == "cuda"  # a kept call's bytes in "needed" terms: the allocator's factor, no workspaces
        per_call = reserved(self.cfg, row.get("per_kept_bytes", 0), cuda) - reserved(self.cfg, 0, cuda)
        if not n or n >= k_max or not per_call:
            return row
        room = self.cfg.budget_gb * GIB - row["needed"]
        mores = range(min(int(room // per_call), k_max - n), 0, -1)
        self.prefetch([{**row["set"], "window_keep": n + more} for more in mores][:self.jobs()])
        for more in mores:
            if len(self.tried) >= self.max_estimates:
                break
            other = self.run({**row["set"], "window_keep": n + more})
            if other is not None and other["fits"]:
                return other if other["seconds"] < row["seconds"] else row
        return row

    def jobs(self) -> int:
        return self.pool.jobs if self.pool is not None and not self.pool.broken else 1

    def neighbours(self, change: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        b = change["batch_size"]
        for name, levels in self.dimensions(change):
            now = next((i for i, lv in enumerate(levels) if all(change.get(k) == v for k, v in lv.items())), 0)
            if now > 0:
                out.append({**change, **levels[now - 1]})
        images = b * change["grad_accum"]
        bigger = [x for x in batch_options(images) if x > b]
        if bigger:
            nb = min(bigger)
            out.append({**change, "batch_size": nb, "grad_accum": images // nb})
        return out


@planner.reuse_estimates()
def fastest(cfg: Config, *, profile: str = "custom", target: str | None = None, allow_task_changes: bool = False,
            max_estimates: int = 40, log: Callable[[str], None] | None = None, jobs: int | None = None) -> dict[str, Any]:
    """The quickest configuration (estimated seconds per optimizer step) whose "needed" fits ``cfg.budget_gb``,
    keeping the images per optimizer step. Returns {"found": the chosen plan (planner.plan's dict) or None, "set":
    the changes to ``cfg``, "profile_yaml", "given": the configuration as given, "tried": every estimate}. When
    nothing fits, "plan" is planner.plan's answer for ``cfg`` as given (DOES NOT FIT and the cheapest change).
    ``jobs``: worker processes that compute estimates ahead (default: default_jobs(); 1: none)."""
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: give at least 1 (1: every estimate in this process)")
    pool = _Workers(jobs) if jobs > 1 else None
    try:
        result = _fastest(cfg, profile, target, allow_task_changes, max_estimates, log, pool)
    finally:
        if pool is not None:
            pool.shutdown()
    result["jobs"] = jobs  # asked for; the workers start only for estimates neither here nor in the cache
    result["workers_started"] = pool is not None and pool.executor is not None
    return result


def _fastest(cfg: Config, profile: str, target: str | None, allow_task_changes: bool, max_estimates: int,
             log: Callable[[str], None] | None, pool: _Workers | None) -> dict[str, Any]:
    from lowmem_alignprop.step.prompts import configured_prompts

    started = time.perf_counter()
    target = target or planner.default_target(profile, cfg.card)
    if not cfg.budget_gb:
        raise UserError("--fastest needs a budget to fit: set budget_gb in the profile or --set budget_gb=8")
    planner.check_budget(cfg, target)
    check_before_load(cfg)  # a sampler training would refuse (the model's own zero-SNR schedule at eta 1...)
    device = device_for(cfg.card, profile, target)
    if device is None:
        raise UserError("--fastest needs the card's speed figures: --set card="
                        + "|".join(name for name in DEVICES if name != "cpu"))
    prompts = configured_prompts(cfg)
    search = _Search(cfg, target, device, prompts, max_estimates, log, pool=pool)
    images = cfg.batch_size * cfg.grad_accum
    always = {"cache_prompt_embeddings": True} | ({"expandable_segments": True} if target == "cuda" else {})
    if cfg.attention == "sliced":
        always["attention"] = "sdpa"  # sliced attention is the slowest kernel and keeps more than sdpa
    ladders: list[dict[str, Any]] = [{}]
    if allow_task_changes:  # only when nothing that keeps the task fits
        # block swap first (the same math, PCIe copies per call), then a quantized base, then both (the blocks then
        # swap at their quantized size)
        swaps = swap_ladder(cfg, target)
        quants = [{"base_quant": q} for q in ("int8", "nf4") if target == "cuda" and cfg.can_quantize_base()]
        ladders += swaps + quants + [{**q, **s} for q in quants for s in swaps]
        r = cfg.resolution
        while (r := lower_resolution(r)) is not None:  # each side to 3/4 (a multiple of 64) down to 256 px
            ladders.append({"resolution": r, **({"base_quant": "nf4"} if target == "cuda" and
                                                 cfg.can_quantize_base() else {})})
        # a task that cannot run merged (Config.merge_lora_clashes: a quantized base, block swap) runs unmerged
        ladders = [unmerged_change(cfg, task) for task in ladders]

    def corners(task: dict[str, Any]) -> list[dict[str, Any]]:  # each micro-batch's all-off configuration
        return [search.all_off({**always, **task, "batch_size": b, "grad_accum": images // b})
                for b in batch_options(images)]

    search.prefetch([{}] + corners(ladders[0]))  # with workers: the configuration as given and the corners at once
    given = search.run({})
    # the configuration as given, when it fits, is the time to beat: the search looks only for quicker ones (a
    # micro-batch whose fastest corner is slower is not searched) and answers "no change" when it finds none
    best: dict[str, Any] | None = given if given is not None and given["fits"] else None
    for task in ladders:
        search.prefetch(corners(task))
        for b in batch_options(images):
            fixed = {**always, **task, "batch_size": b, "grad_accum": images // b}
            row = search.at_batch(fixed, best["seconds"] if best else float("inf"))
            if row is not None and row["fits"] and (best is None or row["seconds"] < best["seconds"]):
                best = row
        if best is not None:
            break
    result: dict[str, Any] = {"kind": "fastest", "profile": profile, "target": target, "device": device.name,
                              "images_per_step": images, "given": given, "tried": search.tried,
                              "from_workers": search.from_workers, "from_cache": search.from_cache,
                              "max_estimates": max_estimates,
                              "estimates_ran_out": len(search.tried) >= max_estimates}  # the search was cut short
    if best is None:
        result.update(found=None, set=None, profile_yaml=None,
                       plan=planner.plan(cfg, profile=profile, target=target, log=log, started=started))
        result["seconds"] = round(time.perf_counter() - started, 1)
        return result
    if best["set"]:  # (the configuration as given is no searched corner: nothing to step back from)
        best = search.fill_window(search.polish(best))
    chosen = cfg.with_changes(**best["set"])
    changes = {k: v for k, v in best["set"].items() if getattr(cfg, k) != v}
    named = chosen if chosen.card else dataclasses.replace(chosen, card=device.name if target == "cuda" else "cpu")
    result.update(found=best, set=changes, profile_yaml=profile_yaml(named, profile, best, target),
                  plan=planner.plan(chosen, profile=profile, target=target, suggest_changes=False, started=started))
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def swap_ladder(cfg: Config, target: str) -> list[dict[str, Any]]:
    """Block swap levels to try when nothing fits without: half, then seven eighths of the denoiser's blocks (with
    the per-block checkpointing it needs). None off a GPU, for full fine-tuning or DeepSpeed, or once set."""
    if target != "cuda" or cfg.block_swap or not cfg.can_swap_blocks():
        return []
    n = swappable_count(cfg)
    levels = sorted({n // 2, n * 7 // 8} - {0})
    return [{"block_swap": k, "unet_checkpointing": "blocks"} for k in levels]


def profile_yaml(cfg: Config, profile: str, row: dict[str, Any], target: str = "cuda") -> str:
    """The chosen configuration as a profile the user can save and pass with --profile FILE (its card names the
    card, or the CPU, it was planned for, which plan then targets again)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"' if v in ("", "no", "yes", "on", "off") else v
        return v
    lines = [f"# plan --fastest for profile {profile}: {fmt_seconds(row['seconds'])} s per optimizer step (estimated), "
             f"{row['needed'] / GIB:.2f} GiB needed of {cfg.budget_gb:g}"]
    lines += [f"{name}: {value(getattr(cfg, name))}" for name in PROFILE_FIELDS]
    return "\n".join(lines) + "\n"


def before_first_step(cfg: Config, *, profile: str, detected: tuple[str, float] | None, max_estimates: int = 40,
                      log: Callable[[str], None] | None = None) -> tuple[Config, dict[str, Any]]:
    """``--auto-fit`` before the first step: :func:`fastest` for the run's configuration on the card it trains on
    (``detected``: the CUDA card's (product name, total GiB), settings.profiles.detect_card's answer), its choice
    applied. Returns (the configuration to train, what happened: the record config.yaml keeps as
    ``auto_fit_search``). Nothing fits, no card, no budget or no speed figures: ``cfg`` unchanged and the reason
    (the run then trains as configured, and an out-of-memory error steps down as before)."""
    from lowmem_alignprop.measure.devices import card_row, gpu_card

    if detected is None:
        return cfg, {"skipped": "no CUDA card: the search plans for the card a run trains on"}
    product, total = detected
    record: dict[str, Any] = {"source": "plan --fastest before the first step (--auto-fit)", "card": product,
                              "card_memory_gib": round(total, 2), "budget_gb": cfg.budget_gb}
    if not cfg.budget_gb:
        return cfg, {**record, "skipped": "no budget: set budget_gb in the profile or with --set"}
    row = gpu_card(cfg.card) or card_row(product, total)  # the card it trains on
    searched = dataclasses.replace(cfg, card=row) if row else cfg
    try:
        result = fastest(searched, profile=profile, target="cuda", max_estimates=max_estimates, log=log)
    except UserError as e:  # a card without figures (the profile's own card is used when it names one)
        return cfg, {**record, "skipped": str(e)}
    given, found = result["given"], result["found"]
    record.update(timed_as=result["device"], estimates=len(result["tried"]), search_seconds=result["seconds"],
                  estimates_from_cache=result["from_cache"])  # planned before on this machine (estimate_cache)
    if found is None:
        suggestion = (result["plan"] or {}).get("suggestion") or {}
        return cfg, {**record, "skipped": "nothing in the searched features fits the budget",
                     "cheapest_change": set_flags(suggestion.get("set") or {}) or None}
    chosen = searched.with_changes(**result["set"])
    record.update(set=result["set"], flags=set_flags(result["set"]), needed_gb=round(found["needed"] / GIB, 3),
                  seconds_per_step=found["seconds"], given_seconds_per_step=given["seconds"] if given else None,
                  given_fits=given["fits"] if given else None)
    return chosen, record

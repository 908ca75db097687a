"""The no-GPU planner: fake-tensor estimates against real CPU allocation, features, CLI, suggestions.

Accuracy: the planner's estimate for the CPU (target ``cpu``: fp32, everything resident, exact bytes) is
compared stage by stage with the same step run for real and measured with torch.profiler memory events
(``shared_step.measure_cpu_step``, StageProfiler's method), on the tiny model and on a mid-size SD-shaped model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lowmem_alignprop.measure import counters, cuda_autocast, figures, fit_changes, planner, reports, shared_step
from lowmem_alignprop.memory import allowances, stages
from lowmem_alignprop.cli import main
from lowmem_alignprop.settings.config import Config

MIB = 2**20
GIB = 2**30
STEP_STAGES = stages.STEP_STAGES


def _compare(cfg: Config) -> tuple[figures.Estimate, dict]:
    est = planner.estimate(cfg, target="cpu")
    meas = shared_step.measure_cpu_step(cfg)
    assert set(meas["stages"]) == set(STEP_STAGES)
    for name in STEP_STAGES:
        e, m = est.stages[name]["allocated"], meas["stages"][name]
        assert abs(e - m) <= 0.05 * m, f"{name}: estimate {e / MIB:.2f} MiB vs measured {m / MIB:.2f} MiB"
    return est, meas


def _activations(est, meas, name) -> tuple[float, float]:
    """What the step adds on top of what was there when it began (the part that is not weights/state)."""
    return (est.stages[name]["allocated"] - est.step_start) / MIB, (meas["stages"][name] - meas["baseline"]) / MIB


def test_tiny_model_within_5_percent_per_stage(tiny_dir):
    cfg = Config(model="tiny", resolution=64, sample_steps=6, k=2, batch_size=2, prompts="simple_animals").validate()
    est, meas = _compare(cfg)
    assert est.peak_stage == meas["peak_stage"] == stages.BACKWARD
    # the step's own allocations (no weights) agree too: within 5% or 64 KiB
    for name in STEP_STAGES:
        e, m = _activations(est, meas, name)
        assert abs(e - m) <= max(0.05 * m, 1 / 16), (name, e, m)
    assert est.stages[stages.BACKWARD]["allocated"] > 3 * est.stages[stages.LOAD]["allocated"]  # activations matter


@pytest.fixture(scope="module")
def midsize(tmp_path_factory):
    from midsize import build_clip_reward_dir, build_midsize_dir

    root = tmp_path_factory.mktemp("midsize")
    return build_midsize_dir(root / "model"), build_clip_reward_dir(root / "clip")


@pytest.mark.parametrize("variant", [
    pytest.param("256px-clip-vae-blocks", marks=pytest.mark.slow),  # 30 s; the 128 px run covers the same path
    "128px-everything-on-K-uniform-to-4"])
def test_midsize_model_within_5_percent_per_stage(midsize, variant):
    model, clip = midsize
    common = dict(model=str(model), reward="clip", reward_weights=str(clip), batch_size=2, prompts="simple_animals")
    if variant.startswith("256"):  # activations dominate: the decoder at 256 px holds ~3x the weights
        cfg = Config(**common, resolution=256, sample_steps=4, k=2, vae_checkpointing="blocks")
    else:  # every checkpointing feature, sliced decode, cached prompts, and K extrapolated beyond 2
        cfg = Config(**common, resolution=128, sample_steps=6, truncation="uniform", k_min=1, k_max=4,
                     unet_checkpointing="blocks", vae_checkpointing="resnets", reward_checkpointing=True,
                     sliced_decode=True, cache_prompt_embeddings=True)
    est, meas = _compare(cfg.validate())
    assert est.k_planned == meas["k"] and est.k_simulated == min(meas["k"], 2)
    # the step's own allocations alone: within 10%. Fake tensors cannot see scratch buffers inside one op
    # (the CPU convolution's, for one), which weigh most when checkpointing leaves little else alive.
    for name in (stages.DECODE, stages.BACKWARD):
        e, m = _activations(est, meas, name)
        assert abs(e - m) <= 0.10 * m, (name, e, m)
    if variant.startswith("256"):
        assert est.stages[stages.BACKWARD]["allocated"] > 3 * est.stages[stages.LOAD]["allocated"]


# three mid-size estimates (30 s): the measured drop (test_memory_features: VAE checkpointing lowers the backward
# peak) and the estimate within 5% of the measurement with every checkpointing on (the 128 px case above) cover it
@pytest.mark.slow
def test_checkpointing_lowers_the_backward_estimate(midsize):
    model, _ = midsize
    base = Config(model=str(model), resolution=128, sample_steps=3, k=1, batch_size=2).validate()
    backward = {}
    for vae in ("none", "blocks", "resnets"):
        est = planner.estimate(dataclasses.replace(base, vae_checkpointing=vae), target="cpu")
        backward[vae] = est.stages[stages.BACKWARD]["allocated"] - est.step_start
    # per up-block keeps one input per block instead of every activation of the decoder (here 139 -> 74 MiB);
    # per resnet never more (the peak then sits in one block's recompute)
    assert backward["blocks"] < 0.6 * backward["none"], backward
    assert backward["resnets"] <= backward["blocks"], backward


def test_autocasts_cache_is_counted_once_per_window_not_per_further_k(tiny_dir):
    """Under fp16 autocast the window's first call casts the LoRA weights and autocast caches the casts; every later
    call reuses them (the gradient window clears the cache where it starts, so this holds whether or not no-grad
    steps came first). What each further grad step keeps, the figure K is extrapolated by, is then the same with
    and without no-grad steps before the window: its checkpoint input and the scheduler's graph. (Counting the cache
    per step, the planner put +0.07 GiB on SD1.5's rtx3060 plan at K=50, where an H100 measured the same peak at
    K=49 as at K=1.)"""
    base = Config(model="tiny", resolution=64, k=2, batch_size=1, mixed_precision="fp16").validate()
    per_k = {steps: planner.estimate(dataclasses.replace(base, sample_steps=steps), target="cuda").per_k_bytes
             for steps in (2, 6)}
    assert per_k[6] == per_k[2] > 0, per_k  # the old count: 67584 against 34816


def test_offload_and_cached_prompts_decide_what_is_on_the_device(tiny_dir):
    cfg = Config(model="tiny", resolution=64, sample_steps=4, k=1, mixed_precision="fp16",
                 cache_prompt_embeddings=True, offload_frozen=True).validate()
    est = planner.estimate(cfg, target="cuda")
    on = {name: set(fig["on_device"]) for name, fig in est.stages.items()}
    assert not {"vae", "text_encoder"} & on[stages.LOAD]  # parked on the CPU at load
    assert "text_encoder" in on[stages.ENCODE_PROMPTS] and "text_encoder" not in on[stages.SAMPLE_GRAD]
    assert "vae" not in on[stages.SAMPLE_NOGRAD] and "vae" in on[stages.DECODE] and "vae" in on[stages.BACKWARD]
    kept = planner.estimate(dataclasses.replace(cfg, offload_frozen=False, cache_prompt_embeddings=False),
                            target="cuda")
    assert {"vae", "text_encoder"} <= set(kept.stages[stages.SAMPLE_GRAD]["on_device"])
    saved = kept.stages[stages.SAMPLE_GRAD]["weights"] - est.stages[stages.SAMPLE_GRAD]["weights"]
    assert saved == est.weights["vae"] + est.weights["text_encoder"]
    # a CUDA target gets the allocator's 512-byte rounding and the documented reserved factor and workspaces
    assert all(fig["allocated"] % allowances.CUDA_BLOCK == 0 for fig in est.stages.values())
    assert est.peak_needed == int(est.peak_allocated * allowances.RESERVED_FACTOR) + allowances.WORKSPACE_BYTES


def test_sd15_rtx3060_plan_runs_here_and_is_sane(capsys):
    """`plan --profile rtx3060 --model sd15` on this CPU-only machine. docs/design.md section 3 gives 3.39 GiB for
    these features (VAE checkpointed per resnet, frozen modules in fp16) with the aesthetic reward; the default
    brightness reward drops the CLIP (-0.6 GiB), so about 2.8 GiB is expected, and the decode and reward
    stages run outside autocast as the trainer does. Tolerance 0.85x to 1.25x of 2.8 GiB. It must take at
    most about a minute."""
    assert not torch.cuda.is_available()
    assert main(["plan", "--profile", "rtx3060", "--model", "sd15", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["target"] == "cuda" and r["fits"] is True and r["budget_gb"] == 7.5
    assert r["peak_stage"] == stages.BACKWARD
    assert 0.85 * 2.8 * GIB <= r["peak_allocated"] <= 1.25 * 2.8 * GIB, r["peak_allocated"] / GIB
    fig = r["stages"]
    assert fig[stages.LOAD]["weights"] == pytest.approx(1.60 * GIB, rel=0.02)  # fp16 UNet; the rest parked
    assert fig[stages.ENCODE_PROMPTS]["weights"] == pytest.approx(1.83 * GIB, rel=0.02)  # + CLIP-L 0.23 GiB
    assert "text_encoder" not in fig[stages.BACKWARD]["on_device"] and "vae" in fig[stages.BACKWARD]["on_device"]
    assert set(r["allowances"]) == {"allocator_rounding", "reserved_factor", "workspaces", "cuda_context"}
    assert any("k_max=50" in n for n in r["notes"])
    assert not any("the model was made for" in n for n in r["notes"])  # 512 px is SD1.5's own size
    assert r["estimate"]["model_kind"] == "sd" and r["profile_note"] is None  # the profile made for SD1.5
    assert r["estimate"]["seconds"] > 0  # (how long planning takes is a benchmark figure, not a test's)


_PLANS: dict = {}  # estimates the plan tests below share: several plan the same configuration of the tiny model


@pytest.fixture
def shared_plans():
    """The tests that plan the same configurations share their estimates (planner.reuse_estimates; a plan's own scope
    nests in it)."""
    with planner.reuse_estimates(_PLANS):
        yield


def test_a_resolution_far_from_the_models_is_noted(shared_plans, tiny_dir, capsys):
    assert main(["plan", "--profile", "cpu", "--set", "resolution=16", "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any("the model was made for 64 px images and this run uses 16 px" in n for n in notes), notes


def test_tiled_decode_that_cuts_no_tile_is_noted_with_the_tile_size_that_would(shared_plans, tiny_dir, capsys):
    """tile_size counts latent cells (64 by default: SD's 512 px): on smaller latents tiled_decode decoded each image
    whole and nothing said so (the trainer warns with the same line)."""
    from lowmem_alignprop.memory.tiling import untiled_note

    assert main(["plan", "--profile", "cpu", "--set", "tiled_decode=true", "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    note = untiled_note(True, 64, 64, 2, 16)
    assert note in notes  # the tiny VAE halves: 32 cells a side
    # tile_size=16 alone is refused beside the default tile_overlap=16 (under half a tile): the note names both
    assert note.endswith("--set tile_size=16 --set tile_overlap=4 cuts it in tiles"), note
    assert untiled_note(True, 64, 64, 2, 2).endswith("--set tile_size=16 cuts it in tiles")  # an overlap that fits
    assert untiled_note(True, 64, 16, 2, 4) is None and untiled_note(False, 64, 64, 2, 16) is None
    fix = note.split("; ")[-1].removesuffix(" cuts it in tiles").split()[1::2]
    assert main(["plan", "--profile", "cpu", "--set", "tiled_decode=true", *[x for f in fix for x in ("--set", f)],
                 "--json"]) == 0  # the fix it names is taken, and then cuts tiles
    assert not any("tiled_decode cuts no tile" in n for n in json.loads(capsys.readouterr().out)["notes"])


def test_too_small_budget_does_not_fit_and_the_suggestion_fits(shared_plans, tiny_dir, capsys):
    with planner.reuse_estimates():  # the re-plan with the flags of the suggestion meets its configuration again
        args = ["plan", "--profile", "cpu", "--set", "budget_gb=0.05", "--set", "vae_checkpointing=none"]
        assert main(args + ["--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["fits"] is False and r["peak_allocated"] > 0.05 * GIB
        s = r["suggestion"]
        assert s is not None and s["fits"] and s["peak_needed"] <= 0.05 * GIB
        text = reports.format_plan(r)
        assert "DOES NOT FIT" in text and "cheapest change that fits" in text
        sets = [x for k, v in s["set"].items() for x in ("--set", f"{k}={str(v).lower()}")]
        assert main(args + sets + ["--json"]) == 0  # re-planned with the suggestion: it fits
        again = json.loads(capsys.readouterr().out)
        assert again["fits"] is True and again["peak_needed"] == s["peak_needed"]


def test_next_feature_for_auto_fit_lowers_the_peak(tiny_dir):
    with planner.reuse_estimates():  # the peaks below are what next_feature estimated
        cfg = Config(model="tiny", resolution=64, sample_steps=3, k=1, batch_size=2).validate()
        label, change = planner.next_feature(cfg, target="cpu")
        # the tiny model's peak is the UNet's backward (its VAE is smaller): the cheaper candidates before it
        # (cache prompts, VAE per up-block) do not lower it by 3%, UNet block checkpointing does
        assert change == {"unet_checkpointing": "blocks"} and "UNet" in label
        peak = {k: planner.estimate(dataclasses.replace(cfg, **c), target="cpu").peak_needed
                for k, c in {"before": {}, "vae": {"vae_checkpointing": "blocks"}, "unet": change}.items()}
        assert peak["vae"] >= 0.97 * peak["before"] > peak["unet"], peak
        # an OOM in decode: UNet checkpointing leaves decode's peak as it is (it lowered only backward's, and was the
        # advice for every stage); the change offered lowers decode's own peak
        decode = planner.next_feature(cfg, target="cpu", stage="decode")
        assert decode is not None and decode[1] != change
        at = {k: planner.estimate(dataclasses.replace(cfg, **c), target="cpu").stages["decode"]["allocated"]
              for k, c in {"before": {}, "unet": change, "offered": decode[1]}.items()}
        assert at["unet"] >= 0.97 * at["before"] > at["offered"], (decode, at)


# ---------------------------------------------------------------------------------------------------
# the CUDA autocast emulation
# ---------------------------------------------------------------------------------------------------
def test_cuda_autocast_emulation_dtypes_and_checkpoint_recompute():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowmem_alignprop.memory.recompute import checkpoint  # every checkpoint of the package

    conv = torch.nn.Conv2d(4, 4, 3, padding=1).half().requires_grad_(False)
    norm = torch.nn.GroupNorm(2, 4).half().requires_grad_(False)
    lora = torch.nn.Parameter(torch.ones(4, 1, 1))  # fp32 trainable, as LoRA weights are

    def block(x):
        y = norm(conv(x) * lora.half())
        return F.interpolate(F.silu(y), scale_factor=2.0, mode="nearest")

    mode = cuda_autocast.CudaAutocast(torch.float16)
    with FakeTensorMode(allow_non_fake_inputs=True), mode, mode.replay_in_recompute():
        x = torch.randn(1, 4, 8, 8)
        with mode.active():
            assert conv(x).dtype == torch.float16  # convolutions cast down (CPU autocast does this part)
            assert norm(conv(x)).dtype == torch.float32  # CUDA runs group_norm in fp32; the CPU would not
            assert F.interpolate(conv(x), scale_factor=2.0).dtype == torch.float32  # upsampling too
            assert torch.softmax(conv(x), -1).dtype == torch.float32
            with torch.autocast("cpu", enabled=False):  # decode of a VAE in its own dtype: autocast off
                assert norm(conv(x.half())).dtype == torch.float16
            out = checkpoint(block, x)
        out.float().sum().backward()  # the recompute replays the emulation, else checkpointing's check fails
    assert lora.grad is not None and lora.grad.shape == (4, 1, 1)
    assert not torch.is_autocast_enabled("cpu")


def test_live_bytes_counts_storages_once_and_frees_them():
    counter = counters.LiveBytes(round_to=512)
    with counter, counter.stage(stages.DECODE):
        a = torch.empty(1000, dtype=torch.uint8)  # rounded to 1024
        view = a[10:]  # a view: same storage, not counted again
        b = torch.empty(100)  # 400 bytes -> 512
        assert counter.dynamic == 1024 + 512
        del a, view, b
        assert counter.dynamic == 0
    assert counter.peaks[stages.DECODE] == 1536
    with contextlib.suppress(ValueError), counter.stage("sampling"):
        raise AssertionError("unknown stage names are refused")


def test_stage_counters_open_stages_one_way():
    """LiveBytes and StageWork share StageCounter.stage: both refuse unknown names; StageWork files the work done
    between two stages under the last closed stage + AFTER, LiveBytes folds the level at a stage's start into it."""
    work = counters.StageWork()
    with work:
        with work.stage(stages.BACKWARD):
            torch.ones(4)
        torch.ones(8)  # after backward, before the next stage
    assert work.work[stages.BACKWARD]["other_bytes"] == 16 and work.work[stages.BACKWARD]["ops"] == 1
    assert work.work[stages.BACKWARD + counters.AFTER]["other_bytes"] == 32
    counter = counters.LiveBytes()
    with counter:
        kept = torch.empty(100, dtype=torch.uint8)
        with counter.stage(stages.OPTIMIZER):
            pass
    assert counter.peaks[stages.OPTIMIZER] == 100 and counter.open == [] and kept.numel() == 100
    for c in (counters.StageWork(), counters.LiveBytes()):
        with pytest.raises(ValueError, match="unknown stage"), c.stage("sampling"):
            pass


def _memory_bench():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "memory_bench.py"
    spec = importlib.util.spec_from_file_location("memory_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_report_rebuild_keeps_the_hand_written_blocks(tmp_path):
    """memory_bench.py --report-only rebuilds REPORT.md from results/*.json and carries each hand-written block
    (between its markers) over from the report it replaces: section 6 (the TRL comparison, the CPU time calibration,
    their notes) rebuilds word for word. Without a previous report the TRL block names its results files."""
    import logging
    import shutil

    bench = _memory_bench()
    shipped = Path(bench.__file__).parent
    shutil.copytree(shipped / "results", tmp_path / "results")
    before = (shipped / "REPORT.md").read_text()
    (tmp_path / "REPORT.md").write_text(before)
    kept = bench.kept_blocks(before)
    assert "| TRL 0.23.1 |" in "\n".join(kept["trl-compare"])  # the premise: the shipped report holds the block
    level = logging.getLogger("lowmem_alignprop").level
    try:
        assert bench.main(["--report-only", "--out", str(tmp_path)]) == 0
        after = (tmp_path / "REPORT.md").read_text()
        (tmp_path / "REPORT.md").unlink()
        assert bench.main(["--report-only", "--out", str(tmp_path)]) == 0
        fresh = bench.kept_blocks((tmp_path / "REPORT.md").read_text())
    finally:
        logging.getLogger("lowmem_alignprop").setLevel(level)
    assert bench.kept_blocks(after) == kept
    section_6 = lambda text: text[text.index("## 6. "):text.index("## 7. ")]  # noqa: E731
    assert section_6(after) == section_6(before)
    trl = sorted((tmp_path / "results").glob("trl-compare-cpu*.json"))
    assert len(trl) == 4 and len(fresh["trl-compare"]) == len(trl) + 1
    for path, line in zip(trl, fresh["trl-compare"]):
        assert line.startswith(f"`results/{path.name}`: command `{json.loads(path.read_text())['command']}`")


def test_the_reports_summary_names_the_full_profile_only_when_it_ran():
    """memory_bench --quick runs no rtx3060 row: its summary called the fp16 row "the full rtx3060 profile"."""
    bench = _memory_bench()
    row = {"peak_allocated": 5 * GIB, "peak_reserved": 6 * GIB, "budget_gb": 7.5, "peak_stage": "reward"}
    rows = [{**row, "label": "none"}, {**row, "label": "fp16", "peak_allocated": 4 * GIB}]
    quick = bench._summary({"ladder": {"rows": rows}}, [])[2]
    assert quick.endswith("GiB with fp16 frozen weights.") and "rtx3060" not in quick, quick
    full = {**row, "label": "+ everything = rtx3060", "peak_allocated": 3 * GIB, "peak_stage": "backward"}
    assert "the full rtx3060 profile" in bench._summary({"ladder": {"rows": [*rows, full]}}, [])[2]


def test_a_benchmark_section_carried_over_keeps_where_it_was_measured():
    """memory_bench --only ladder carries the other sections from the latest file, which it may then write over (the
    same device and date): each carried section keeps the command, date, device and versions of the run that
    measured it, also when carried twice (it named the file it overwrote, itself)."""
    bench = _memory_bench()
    full = {"file": "cpu-2026-01-01.json", "date": "2026-01-01", "command": "python benchmarks/memory_bench.py",
            "device": {"name": "cpu A"}, "versions": {"torch": "2"}, "ladder": [1], "what_fits": [2], "cpu_measured": [3]}
    once = {"file": "cpu-2026-01-02.json", "date": "2026-01-02", "command": "... --only ladder", "ladder": [4]}
    bench.carry_sections(once, full)
    assert once["what_fits"] == [2] and once["carried"]["what_fits"] == {
        "file": "cpu-2026-01-01.json", "date": "2026-01-01", "command": "python benchmarks/memory_bench.py",
        "device": {"name": "cpu A"}, "versions": {"torch": "2"}}
    twice = {"file": "cpu-2026-01-02.json", "date": "2026-01-02", "command": "... --only ladder", "ladder": [5]}
    bench.carry_sections(twice, once)
    assert twice["carried"]["cpu_measured"]["command"] == "python benchmarks/memory_bench.py"
    assert "ladder" not in twice["carried"]


def test_benchmark_report_shows_gpu_measurements_next_to_estimates(tmp_path):
    """benchmarks/memory_bench.py reads results/gpu-*.json (gpu_check.sh's shape, or the flat one) into REPORT.md."""
    bench = _memory_bench()
    label = bench.LADDER[1][0]
    cpu = {"kind": "memory_bench", "date": "2026-01-01", "file": "cpu-2026-01-01.json", "command": "x",
           "device": {"name": "cpu", "logical_cores": 2, "torch_threads": 1}, "versions": {"torch": "2"},
           "ladder": {"setup": bench.LADDER_BASE, "command": "plan ...", "rows": [
               {"label": label, "stages": {"backward": {"allocated": 4 * GIB}}, "peak_allocated": 4 * GIB,
                "peak_stage": "backward", "peak_reserved": 5 * GIB, "fits": True, "budget_gb": 7.5},
               {"label": bench.LADDER[-1][0], "stages": {}, "peak_allocated": 3 * GIB, "peak_stage": "backward",
                "peak_reserved": 4 * GIB, "fits": True, "budget_gb": 7.5}]}}
    assert "(= rtx3060)" in bench.LADDER[-1][0]
    results = tmp_path / "results"
    results.mkdir()
    (results / "cpu-2026-01-01.json").write_text(json.dumps(cpu))
    nested = {"name": "ladder " + label, "status": "ok", "budget_gb": 0,
              "memory_report": {"stages": {"backward": {"peak_allocated": 5 * GIB, "peak_reserved": 6 * GIB}},
                                "peak_allocated": 5 * GIB, "peak_reserved": 6 * GIB, "peak_stage": "backward"},
              "summary": {"seconds_per_step": 3.25},
              "planner": {"stages": {"backward": {"allocated": 4 * GIB}}, "peak_allocated": 4 * GIB,
                          "peak_reserved": 5 * GIB}}
    flat = {"name": "rtx3060 sd15", "status": "oom", "budget_gb": 7.5, "seconds_per_step": None,
            "stages": {"decode": {"peak_allocated": 7 * GIB, "peak_reserved": 7.4 * GIB}}}
    (results / "gpu-h100-2026-01-02.json").write_text(json.dumps({
        "kind": "gpu_check", "date": "2026-01-02", "device": {"name": "NVIDIA H100", "total_gb": 79.2},
        "calls": [{"command": "python benchmarks/gpu_check.py --jobs 3"}, {"command": "python benchmarks/gpu_check.py "
                                                                                   "--match rtx3060"}],
        "code": "abc1234", "profiles": [flat],
        "quant": {"ok": True, "bitsandbytes": "0.50.2", "modes": {
            "fp16": {"measured_weight_bytes": 2 * GIB, "fwd_bwd_peak_bytes": 3 * GIB, "lora_grads_present": 8,
                     "lora_tensors": 8, "lora_grads_finite": True, "output_rel_error_vs_fp16": 0.0,
                     "fwd_bwd_seconds": 9.0},
            "nf4": {"measured_weight_bytes": int(1.5 * GIB), "fwd_bwd_peak_bytes": int(2.75 * GIB),
                    "fwd_bwd_peak_change_bytes": -GIB // 4, "lora_grads_present": 8, "lora_tensors": 8,
                    "lora_grads_finite": True, "output_rel_error_vs_fp16": 0.055, "fwd_bwd_seconds": 0.2}}},
        "ladder": [
            dict(nested, concurrent_runs=3, metrics=[{"k": 1}, {"k": 1}],
                 summary={"seconds_per_step": 3.25, "cuda_allocator": "expandable segments"}),
            # measured under an earlier LADDER that put the "(= rtx3060)" marker on another row: still lines up
            dict(nested, name="ladder " + bench.LADDER[-1][0].replace(" (= rtx3060)", ""),
                 memory_report={"stages": {}, "peak_allocated": int(3.3 * GIB), "peak_reserved": 4 * GIB,
                                "peak_stage": "backward"})]}))
    # a later file (sorted after) whose call was cut off before that row: the measured row still shows
    (results / "gpu-h200-2026-01-03.json").write_text(json.dumps({
        "kind": "gpu_check", "date": "2026-01-03", "device": {"name": "NVIDIA H200", "total_gb": 139.8},
        "ladder": [{"name": "ladder " + label, "status": "skipped (deadline)"}], "profiles": []}))
    # gpu_check.py --cpu-smoke's file (the plumbing, on a CPU): never read as a GPU's measurements
    (results / "gpu-cpu-smoke-2026-01-04.json").write_text(json.dumps({
        "kind": "gpu_check", "date": "2026-01-04", "device": {"name": "cpu"},
        "ladder": [dict(nested, name="ladder " + label)], "profiles": []}))
    runs = bench.gpu_runs(json.loads((results / "gpu-h100-2026-01-02.json").read_text()))
    assert [(r["status"], r["peak_allocated"], r["peak_stage"]) for r in runs] == [
        ("ok", 5 * GIB, "backward"), ("ok", int(3.3 * GIB), "backward"), ("oom", 7 * GIB, None)]
    doc, gpu = bench.load_results(results)
    assert [p.name for p, _ in gpu] == ["gpu-h100-2026-01-02.json", "gpu-h200-2026-01-03.json"]
    text = bench.report(doc, gpu, results)
    assert "### cpu" not in text
    assert "| 5.00 (backward) | 6.00 | 4.00 | 1.25 | 3.25 |" in text  # measured, estimated, ratio, s/step (ladder)
    assert f"| {bench.LADDER[-1][0]} | NVIDIA H100 | ok | 3.30 (backward) | 4.00 | 3.00 | 1.10 |" in text
    assert f"| {label} | NVIDIA H100 | ok | 5.00 (backward) |" in text  # not the H200's skipped row
    assert "| rtx3060 sd15 | 7.5 | oom | - | 7.00 (-) |" in text
    # the allocator the run used (runs before the field: fixed segments), the K drawn, the runs sharing the GPU
    assert f"| ladder {label} | - | ok | expandable | 5.00 (backward) | 6.00 | 4.00 | 5.00 | 1.25 | 1, 1 | 3 | 3.25 |" in text
    assert f"| ladder {bench.LADDER[-1][0]} | - | ok | fixed | 3.30 (backward) |" in text  # under today's label
    assert "| nf4 | 1.50 | 2.75 | -0.250 | 8/8 (yes) | 5.5% | 0.20 |" in text  # the quantized-base check
    assert "5.00 / 4.00" in text  # per stage, measured / estimated
    assert ("Commands: `python benchmarks/gpu_check.py --jobs 3`; `python benchmarks/gpu_check.py --match rtx3060`; "
            "code abc1234;") in text  # a check split over two calls, and the code it measured
    assert "Up to 3 runs shared the GPU at once" in text


def test_candidates_include_the_issue_7_features_before_task_changes():
    """SDXL on an 8 GB card fits with an nf4 base (not with a lower resolution): the planner must offer it."""
    cfg = Config(model="sdxl", resolution=1024, sample_steps=10, k=1, vae_checkpointing="resnets",
                 unet_checkpointing="blocks", cache_prompt_embeddings=True, offload_frozen=True).validate()
    labels = [change for _, change in fit_changes.candidate_changes(cfg, target="cuda")]
    assert {"base_quant": "nf4"} in labels and {"tiled_decode": True, "sliced_decode": False} in labels
    task = next(i for i, c in enumerate(labels) if "resolution" in c)
    assert labels.index({"base_quant": "nf4"}) < task
    assert labels.index({"activation_offload": True}) < task  # a memory flag before a change of the task (plan
    # advised resolution 384 where activation offload alone fitted)
    done = dataclasses.replace(cfg, base_quant="nf4", tiled_decode=True).validate()
    assert not any("base_quant" in c or "tiled_decode" in c for _, c in fit_changes.candidate_changes(done, "cuda"))
    assert not any("base_quant" in c for _, c in fit_changes.candidate_changes(cfg, target="cpu"))
    # block swap needs per-block checkpointing: added where it is not set, not repeated where it is (the suggestion
    # listed --set unet_checkpointing=blocks as a change of a profile that sets it)
    swap = [c for _, c in fit_changes.candidate_changes(cfg, "cuda") if "block_swap" in c]
    assert len(swap) == 1 and "unet_checkpointing" not in swap[0]
    called = dataclasses.replace(cfg, unet_checkpointing="call")
    assert [c for _, c in fit_changes.candidate_changes(called, "cuda") if "block_swap" in c][0]["unet_checkpointing"] \
        == "blocks"


def test_reuse_estimates_runs_each_configuration_once_and_only_inside_its_scope(monkeypatch):
    """plan, its suggestions and plan --fastest estimate inside planner.reuse_estimates: a configuration met again
    (the budget aside, which an estimate does not read) is a copy of the first estimate; outside, every call runs."""
    calls = []

    def fake(cfg, target, prompts, emulate_autocast):
        calls.append((cfg.k, target, tuple(prompts)))
        return figures.Estimate(target, {}, len(calls), "backward", len(calls), {}, cfg.k, cfg.k, 0, 0, 0.0)

    monkeypatch.setattr(planner, "_estimate", fake)
    cfg = Config(model="tiny", k=1, budget_gb=1.0).validate()
    assert planner.estimate(cfg, prompts=["a"]).peak_needed == 1
    assert planner.estimate(cfg, prompts=["a"]).peak_needed == 2  # no scope: estimated again
    memo: dict = {}
    with planner.reuse_estimates(memo):
        first = planner.estimate(cfg, prompts=["a"])
        again = planner.estimate(dataclasses.replace(cfg, budget_gb=2.0), prompts=["a"])
        first.notes.append("the caller's own")
        with planner.reuse_estimates():  # nested: the same scope
            assert planner.estimate(cfg, prompts=["a"]).notes == []  # a copy each time
        assert first.peak_needed == again.peak_needed == 3 and len(calls) == 3
        for other in (dict(cfg=dataclasses.replace(cfg, k=2), prompts=["a"]), dict(cfg=cfg, prompts=["b"]),
                      dict(cfg=cfg, prompts=["a"], target="cpu")):
            assert planner.estimate(**other).peak_needed == len(calls)  # anything else: a new estimate
        assert len(calls) == 6
    assert planner.estimate(cfg, prompts=["a"]).peak_needed == 7  # the scope closed
    with planner.reuse_estimates(memo):  # the caller's memo kept them
        assert planner.estimate(cfg, prompts=["a"]).peak_needed == 3 and len(calls) == 7


def test_suggest_never_estimates_the_same_change_twice(monkeypatch):
    """The accumulated search starts with the first single change: it must not be estimated (and listed) again."""
    calls = []

    class Est:
        peak_allocated = peak_needed = 10 * GIB
        peak_stage = "encode_prompts"

        def fits(self, budget):
            return False

    def fake_estimate(cfg, **kw):
        calls.append(cfg.resolution)
        return Est()

    def fake_candidates(cfg, target, start=None):
        return {512: [("lower resolution 384 px", {"resolution": 384})],
                384: [("lower resolution 256 px", {"resolution": 256})]}.get(cfg.resolution, [])

    monkeypatch.setattr(planner, "estimate", fake_estimate)
    monkeypatch.setattr(planner, "candidate_changes", fake_candidates)
    out = planner.suggest(Config(resolution=512, budget_gb=1.0).validate(), target="cuda")
    assert out["found"] is None
    assert calls == [384, 256]
    assert [t["set"] for t in out["tried"]] == [{"resolution": 384}, {"resolution": 256}]


def test_a_ctrl_c_during_the_plans_search_keeps_what_it_tried_and_stops_anything_else(monkeypatch):
    """`plan` with a budget nothing fits spends minutes of estimates; a Ctrl-C lost the table. The plan command's
    search returns what it tried so far (printed, exit 130); --auto-fit's search before a run lets it stop the run."""
    from lowmem_alignprop.run.stop_request import CtrlC

    class Est:
        peak_allocated = peak_needed = 10 * GIB
        peak_stage = "backward"

        def fits(self, budget):
            return False

    calls = []

    def fake_estimate(cfg, **kw):
        calls.append(cfg.resolution)
        if len(calls) == 3:
            raise CtrlC(2)
        return Est()

    def fake_candidates(cfg, target, start=None):
        return [(f"lower resolution {r} px", {"resolution": r}) for r in (384, 256, 128)]

    monkeypatch.setattr(planner, "estimate", fake_estimate)
    monkeypatch.setattr(planner, "candidate_changes", fake_candidates)
    cfg = Config(resolution=512, budget_gb=1.0).validate()
    out = planner.suggest(cfg, target="cuda", interruptible=True)
    assert out["interrupted"] and out["found"] is None
    assert [t["set"] for t in out["tried"]] == [{"resolution": 384}, {"resolution": 256}]
    calls.clear()
    with pytest.raises(CtrlC):
        planner.suggest(cfg, target="cuda")
    # a real Ctrl-C during an estimate is held until it ends (raised inside torch's C++ dispatch, it once aborted the
    # process, exit 134): that estimate is kept, the next is not begun, and the handler is the old one again
    import os
    import signal

    def interrupted_estimate(cfg, **kw):
        calls.append(cfg.resolution)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # (delivered at once to this, the main thread: held)
        return Est()

    calls.clear()
    monkeypatch.setattr(planner, "estimate", interrupted_estimate)
    heard = []
    before = signal.signal(signal.SIGINT, lambda *a: heard.append(a))  # (without the hold: heard, not pytest's)
    try:
        out = planner.suggest(cfg, target="cuda", interruptible=True)
        assert not heard  # the search's hold took it
    finally:
        signal.signal(signal.SIGINT, before)
    assert out["interrupted"] and calls == [384, 256]
    assert [t["set"] for t in out["tried"]] == [{"resolution": 384}, {"resolution": 256}]


def _estimating(monkeypatch, needed, candidates) -> None:
    """The planner's estimate of a configuration is ``needed(cfg)`` bytes (allocated as much, its peak in backward)
    and its candidate changes are ``candidates``: the search's rules on figures written by hand."""
    class Est:
        def __init__(self, cfg):
            self.peak_allocated = self.peak_needed = needed(cfg)
            self.peak_stage = "backward"

        def fits(self, budget):
            return self.peak_needed <= budget * GIB

    monkeypatch.setattr(planner, "estimate", lambda cfg, **kw: Est(cfg))
    monkeypatch.setattr(planner, "candidate_changes", candidates)


def test_the_search_stops_growing_a_feature_that_saves_next_to_nothing(monkeypatch):
    """Accumulating changes, a feature whose step lowered the peak by under 3% is not taken further (block swap of an
    SD1.5 UNet at batch 16 went 22 -> 33 -> 38 -> 41 -> 42 -> 43 -> 44 blocks, 12.98 to 12.96 GiB, before the batch was
    halved: five minutes of estimates): the next feature comes at once."""
    def needed(cfg):  # 1 GiB an image plus 2 GiB; block swap saves 0.5 GiB for its first 10 blocks, 0.05 after
        return (cfg.batch_size + 2 - 0.05 * min(cfg.block_swap, 10) - 0.005 * max(cfg.block_swap - 10, 0)) * GIB

    def fake_candidates(cfg, target, start=None):
        out = [("block swap", {"block_swap": cfg.block_swap + 10})] if cfg.block_swap < 40 else []
        return out + ([("batch", {"batch_size": cfg.batch_size // 2})] if cfg.batch_size > 1 else [])

    _estimating(monkeypatch, needed, fake_candidates)
    out = planner.suggest(Config(batch_size=8, budget_gb=5.9, unet_checkpointing="blocks").validate(), target="cuda")
    assert [t["set"] for t in out["tried"]] == [
        {"block_swap": 10}, {"batch_size": 4},  # each alone: 9.5 and 6.0 GiB
        {"block_swap": 20},  # 9.45 GiB: 0.5% below 10 blocks' 9.5, so block swap goes no further
        {"block_swap": 20, "batch_size": 4}]  # 5.45 GiB: fits
    assert out["found"]["set"] == {"block_swap": 20, "batch_size": 4}


def test_the_suggestion_drops_an_accumulated_change_the_fit_does_not_need(monkeypatch):
    """Nothing alone fits: the search accumulates sliced decode (0.1 GiB) and halves the batch twice; the fit at
    batch 2 needs no sliced decode, so the suggestion is the batch alone (the slow
    test_the_suggestion_keeps_the_images_per_step_and_holds_only_what_the_fit_needs checks it on a real plan)."""
    def needed(cfg):  # 1 GiB an image plus 1 GiB, sliced decode 0.1 GiB less
        return (cfg.batch_size + 1 - 0.1 * cfg.sliced_decode) * GIB

    def fake_candidates(cfg, target, start=None):
        out = [] if cfg.sliced_decode else [("sliced decode", {"sliced_decode": True})]
        return out + ([("batch", {"batch_size": cfg.batch_size // 2})] if cfg.batch_size > 1 else [])

    _estimating(monkeypatch, needed, fake_candidates)
    out = planner.suggest(Config(batch_size=8, budget_gb=3.5).validate(), target="cuda")
    assert [t["set"] for t in out["tried"]] == [
        {"sliced_decode": True}, {"batch_size": 4},  # each alone: 8.9 and 5 GiB
        {"sliced_decode": True, "batch_size": 4}, {"sliced_decode": True, "batch_size": 2},  # 4.9, then 2.9: fits
        {"batch_size": 2}]  # 3 GiB: fits without sliced decode
    assert out["found"]["set"] == {"batch_size": 2} and out["found"]["peak_needed"] == 3 * GIB


@pytest.mark.parametrize("stage", [None, "decode"])
def test_next_feature_offers_the_first_change_that_lowers_the_peak_by_3_percent(monkeypatch, stage):
    """--auto-fit's next change: the cheapest that lowers the peak (``stage``: that stage's) by at least 3%; one that
    lowers it by 2% is passed over, and so is a change of the other peak."""
    peaks = {(): (100, 100), ("sliced_decode",): (98, 98), ("tiled_decode",): (100, 90),
             ("unet_checkpointing",): (90, 100)}  # (peak_needed, decode's peak) in MiB, per change

    class Est:
        def __init__(self, cfg):
            changed = tuple(k for k in ("sliced_decode", "tiled_decode") if getattr(cfg, k))
            changed += ("unet_checkpointing",) * (cfg.unet_checkpointing == "blocks")
            self.peak_needed, decode = (v * 2 ** 20 for v in peaks[changed])
            self.stages = {"decode": {"allocated": decode}}

    def fake_candidates(cfg, target, start=None):
        return [("sliced decode", {"sliced_decode": True}), ("tiled decode", {"tiled_decode": True}),
                ("UNet blocks", {"unet_checkpointing": "blocks"})]

    monkeypatch.setattr(planner, "estimate", lambda cfg, **kw: Est(cfg))
    monkeypatch.setattr(planner, "candidate_changes", fake_candidates)
    label, change = planner.next_feature(Config(unet_checkpointing="call").validate(), target="cuda", stage=stage)
    assert (label, change) == (("UNet blocks", {"unet_checkpointing": "blocks"}) if stage is None else
                               ("tiled decode", {"tiled_decode": True}))


def test_user_rewards_that_fail_or_read_values_are_named_in_one_line(tmp_path, monkeypatch, capsys, tiny_dir):
    (tmp_path / "plan_rewards_mod.py").write_text(
        "def reads_values(images, prompts):\n"
        "    s = images.mean(dim=(1, 2, 3))\n"
        "    return s / max(float(s.detach().max().item()), 1e-3)\n\n"
        "def raises(images, prompts):\n"
        "    raise RuntimeError('boom')\n\n"
        "def compares(images, prompts):\n"  # torch.equal on images (the prompts' token ids are answered: equal)
        "    return images.mean(dim=(1, 2, 3)) * (2.0 if torch.equal(images, images.flip(0)) else 1.0)\n")
    (tmp_path / "plan_rewards_mod.py").write_text("import torch\n" + (tmp_path / "plan_rewards_mod.py").read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    file = tmp_path / "plan_rewards_mod.py"  # given as a file: it was a traceback (ModuleNotFoundError: No module
    # named '/.../plan_rewards_mod', from importing the path as a module to find its frames)
    for term, needle in [("plan_rewards_mod:reads_values", "plan cannot follow the reward 'plan_rewards_mod:"
                          "reads_values' with fake tensors: it failed there with DataDependentOutputException"),
                         ("plan_rewards_mod:compares", "plan cannot follow the reward 'plan_rewards_mod:compares' "
                          "with fake tensors"),
                         ("plan_rewards_mod:raises", "raised RuntimeError: boom; fix the function"),
                         (f"{file}:reads_values", f"plan cannot follow the reward '{file}:reads_values' with fake "
                          "tensors: it failed there with DataDependentOutputException")]:
        assert main(["plan", "--profile", "cpu", "--reward", term]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err[-2000:]


def test_plan_json_is_alone_on_stdout_whatever_the_reward_prints(tmp_path, tiny_dir, capsys, monkeypatch):
    """A reward that prints (at its import, at each call: a debugging print, a library's banner) printed into plan
    --json's stdout, ahead of the JSON: json.loads of it failed. Now its lines go to stderr, in plan --fastest's
    worker processes too (their stdout is the same file)."""
    import logging
    import queue
    import sys

    from lowmem_alignprop.measure.fastest import _quiet_worker

    reward = tmp_path / "chatty.py"
    reward.write_text("print('chatty: loading my reward')\n\n\ndef score(images, prompts):\n"
                      "    print('chatty: scoring', images.shape[0])\n    return images.mean(dim=(1, 2, 3))\n")
    assert main(["plan", "--profile", "cpu", "--json", "--no-suggest", "--set", "resolution=16", "--reward",
                 f"{reward}:score"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["reward"] == f"{reward}:score"
    assert "chatty: loading my reward" in err and "chatty: scoring 2" in err  # said, where a log line goes
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # (restored after: the worker's start sets it for its process)
    ours = logging.getLogger("lowmem_alignprop")
    level = ours.level
    try:
        _quiet_worker(queue.SimpleQueue())
        assert sys.stdout is sys.stderr
    finally:
        ours.setLevel(level)  # (the worker's start quiets our log for its process)


@pytest.mark.slow  # 70 s of CPU; test_too_small_budget_does_not_fit_and_the_suggestion_fits covers the suggestion's fit
def test_the_suggestion_keeps_the_images_per_step_and_holds_only_what_the_fit_needs(tiny_dir, capsys):
    args = ["plan", "--profile", "cpu", "--set", "batch_size=5", "--set", "budget_gb=0.02", "--json"]
    assert main(args) == 0
    s = json.loads(capsys.readouterr().out)["suggestion"]
    assert s is not None and s["fits"]
    change = s["set"]
    assert change.get("batch_size", 5) * change.get("grad_accum", 1) == 5  # 5 images per step, as asked
    assert "up-block" not in s["change"] and "decode one image" not in s["change"]  # replaced or not needed
    for key in [k for k in change if k not in ("batch_size", "grad_accum")]:  # each remaining change is needed
        rest = {k: v for k, v in change.items() if k != key}
        sets = [x for k, v in rest.items() for x in ("--set", f"{k}={str(v).lower()}")]
        assert main([*args, "--no-suggest", *sets]) == 0
        assert json.loads(capsys.readouterr().out)["fits"] is False, key


def test_at_the_edge_of_the_budget_the_share_has_a_decimal(shared_plans, tiny_dir, capsys):
    assert main(["plan", "--profile", "cpu", "--json", "--no-suggest"]) == 0
    r = json.loads(capsys.readouterr().out)
    r.update(budget_bytes=int(r["peak_needed"] / 1.0013), fits=False)
    r["budget_gb"] = r["budget_bytes"] / GIB
    assert "DOES NOT FIT (100.1% of the budget" in reports.format_plan(r)
    r.update(budget_bytes=r["peak_needed"] * 2, fits=True)
    assert "FITS (50% of the budget" in reports.format_plan(r)


def test_a_prompt_longer_than_the_text_encoder_takes_plans_as_a_short_one(tiny_dir, tmp_path, capsys):
    """diffusers' encode_prompt compares a prompt's ids cut at the encoder's length with the uncut ones (torch.equal,
    for its "truncated" warning): on fake tensors that has no answer, and plan stopped with a traceback on any prompt
    file holding a prompt of 77 tokens or more. Every prompt is padded to that length: the same estimate as two short
    prompts. The plan says, as training does, that the encoder cuts the long one."""
    long, short = tmp_path / "long.txt", tmp_path / "short.txt"
    long.write_text(" ".join(["a red circle and a blue square"] * 20) + "\nshort\n")
    short.write_text("a cat\na dog\n")
    peaks, notes = [], []
    for prompts in (long, short):
        assert main(["plan", "--profile", "cpu", "--model", "tiny", "--json", "--no-suggest", "--no-cache", "--set",
                     "resolution=16", "--prompts", str(prompts)]) == 0
        plan = json.loads(capsys.readouterr().out)
        peaks.append(plan["peak_needed"])
        notes.append(" ".join(plan["estimate"]["notes"]))
    assert peaks[0] == peaks[1] > 0
    assert "1 of 2 prompts are longer than the 16 tokens the text encoder reads" in notes[0]
    assert "longer than" not in notes[1]


def test_plan_json_carries_its_provenance(shared_plans, tiny_dir, capsys):
    """plan --json says what produced it, as benchmarks/ results do (provenance.provenance): the command line as typed,
    the date, the machine that planned and the library versions; the estimate's own keys stay."""
    import importlib.metadata
    import os
    import time

    from lowmem_alignprop.measure.provenance import cpu_name

    args = ["plan", "--profile", "cpu", "--json", "--no-suggest", "--set", "resolution=16"]
    before = time.strftime("%Y-%m-%d")
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["command"] == "lowmem-alignprop " + " ".join(args)
    assert r["date"] in {before, time.strftime("%Y-%m-%d")}
    assert r["device"]["cpu"] == cpu_name() and r["device"]["cores"] == os.cpu_count()
    assert set(r["versions"]) == {"python", *planner.PLAN_LIBRARIES}
    assert r["versions"]["torch"] == importlib.metadata.version("torch")
    assert r["kind"] == "plan" and r["target"] == "cpu" and r["peak_needed"] > 0 and r["time"]["k_mean"] >= 1
    # a training command's own flags plan as they are (--sample-every was "unrecognized arguments"): the same estimate
    assert main([*args, "--sample-every", "2", "--checkpoint-every", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_needed"] == r["peak_needed"]


def test_a_full_unet_plan_is_labelled_as_such(tiny_dir, capsys):
    assert main(["plan", "--profile", "cpu", "--set", "train_unet=full", "--no-suggest"]) == 0
    text = capsys.readouterr().out
    assert "the full UNet trains" in text and "(r=" not in text
    assert "unet (trained)" in text and ", lora" not in text


def test_a_cpu_plan_refuses_what_a_cpu_run_cannot_do_and_says_what_it_plans(tiny_dir, capsys):
    assert main(["plan", "--profile", "cpu", "--set", "base_quant=nf4"]) == 2
    err = capsys.readouterr().err
    assert "base_quant=nf4 needs a CUDA GPU" in err and err.count("\n") == 1
    assert main(["plan", "--profile", "rtx3060", "--device", "cpu", "--no-suggest"]) == 0
    text = capsys.readouterr().out
    assert "target cpu (none: fp16 runs in fp32 on a CPU, as the trainer does)" in text
    assert "the budget is the rtx3060 card's" in text and "e.g. --profile rtx3060" not in text


def test_a_laptop_without_bitsandbytes_plans_and_suggests_nf4_for_a_card(tiny_dir, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "bitsandbytes"
                        else real(name, *a, **k))
    assert main(["plan", "--profile", "rtx3060", "--set", "base_quant=nf4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert any("base_quant=nf4" in n for n in r["notes"])
    cfg = Config(model="tiny", budget_gb=0.001).validate()
    assert {"base_quant": "nf4"} in [c for _, c in fit_changes.candidate_changes(cfg, target="cuda")]


def test_a_missing_reward_weights_path_fails_the_plan_as_it_fails_training(tiny_dir, tmp_path, capsys):
    assert main(["plan", "--profile", "cpu", "--reward", "clip", "--set", f"reward_weights={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err
    assert f"clip reward: {tmp_path / 'nope'} does not exist" in err and err.count("\n") == 1


def test_fixed_allocator_segments_plan_more_reserved_and_expandable_is_the_first_fix(shared_plans, tiny_dir, capsys):
    """With expandable segments (the default) the H100 runs reserved at most 1.09x their allocated peak; with
    fixed segments the large decode tensors fragment it, by more as the image grows (SDXL 1024 px: 1.4-1.8 GiB
    beyond x1.10): the planner's 'needed' follows the allocator mode, and a plan with fixed segments that does
    not fit is offered expandable segments first."""
    with planner.reuse_estimates():  # the plans below meet both configurations again
        from lowmem_alignprop.settings.profiles import resolve_config

        _, cfg = resolve_config("cpu", {}, [])  # what `plan --profile cpu` below plans: the tiny model at 64 px
        fixed = dataclasses.replace(cfg, expandable_segments=False)
        on, off = planner.estimate(cfg, target="cuda"), planner.estimate(fixed, target="cuda")
        assert off.peak_allocated == on.peak_allocated  # the allocator mode changes what is reserved, not allocated
        assert on.peak_needed == int(on.peak_allocated * 1.10) + allowances.WORKSPACE_BYTES
        assert off.peak_needed - on.peak_needed == 512 * MIB // 64  # 64 px: 1/64 of a 512x512 image's area
        for name, fig in off.stages.items():
            assert fig["reserved"] - on.stages[name]["reserved"] == 8 * MIB, name
        assert figures.fragmentation_allowance(dataclasses.replace(fixed, resolution=1024)) == 2 * GIB
        for c in (cfg, fixed):  # a CPU target's figures are its bytes, whatever the allocator setting
            assert figures.reserved(c, on.peak_allocated, cuda=False) == on.peak_allocated
        assert fit_changes.candidate_changes(fixed, "cuda")[0][1] == {"expandable_segments": True}
        assert not any("expandable_segments" in c for _, c in fit_changes.candidate_changes(cfg, "cuda"))
        assert not any("expandable_segments" in c for _, c in fit_changes.candidate_changes(fixed, "cpu"))
        # a budget between the two: fits with expandable segments, not without; the suggestion switches them on
        args = ["plan", "--profile", "cpu", "--device", "cuda", "--json"]
        budget = (on.peak_needed + off.peak_needed) / 2 / GIB
        assert main(args + ["--set", f"budget_gb={budget}", "--set", "expandable_segments=false"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["peak_needed"] == off.peak_needed  # the same configuration as `fixed`
        assert r["fits"] is False and r["fragmentation_allowance"] == 8 * MIB
        assert r["suggestion"]["set"] == {"expandable_segments": True} and r["suggestion"]["fits"]
        text = reports.format_plan(r)
        assert "(x1.10 + 0.008 fixed-segment fragmentation)" in text and "expandable_segments=false" in text


def test_a_plan_made_on_windows_says_expandable_segments_are_linux_only(shared_plans, tiny_dir, capsys, monkeypatch):
    import copy
    import sys

    args = ["plan", "--profile", "cpu", "--device", "cuda", "--json", "--no-suggest"]
    monkeypatch.setattr(sys, "platform", "win32")
    real, made = planner.estimate, []

    def estimate_once(cfg, **kw):  # the note is the plan's, not the estimate's: one estimate serves the three plans
        if not made:
            made.append(real(cfg, **kw))
        return copy.deepcopy(made[0])
    monkeypatch.setattr(planner, "estimate", estimate_once)
    assert main(args) == 0
    assert any("PyTorch has on Linux only" in n and "--set expandable_segments=false" in n
               for n in json.loads(capsys.readouterr().out)["notes"])
    assert main(args + ["--set", "expandable_segments=false"]) == 0  # already planned as it will run: no note
    assert not any("Linux only" in n for n in json.loads(capsys.readouterr().out)["notes"])
    monkeypatch.setattr(sys, "platform", "linux")
    assert main(args) == 0
    assert not any("Linux only" in n for n in json.loads(capsys.readouterr().out)["notes"])


def test_the_plan_names_every_memory_and_speed_field_it_plans_with():
    """The features line shows what --fastest or a profile set beyond the usual ones (window_keep was left out, so
    a --fastest plan's line read as the profile's), and nothing that is at its default."""
    from lowmem_alignprop.measure.reports import plan_features

    base = Config().to_dict()
    assert plan_features(base) == [f"mixed_precision={base['mixed_precision']}", f"attention={base['attention']}",
                                   f"unet_checkpointing={base['unet_checkpointing']}",
                                   f"vae_checkpointing={base['vae_checkpointing']}",
                                   *(["cache_prompt_embeddings"] if base["cache_prompt_embeddings"] else [])]
    chosen = {**base, "window_keep": 2, "block_swap": 3, "fused_adamw": True, "tile_size": 48}
    assert plan_features(chosen)[-3:] == ["window_keep=2", "block_swap=3", "fused_adamw=true"]  # tile_size: untiled
    assert plan_features({**chosen, "tiled_decode": True})[-4:] == ["window_keep=2", "tile_size=48", "block_swap=3",
                                                                    "fused_adamw=true"]


# ---------------------------------------------------------------------------------------------------
# the estimate's bookkeeping, unit by unit (no estimate run)
# ---------------------------------------------------------------------------------------------------
def test_residency_counts_the_weights_on_the_device_the_extra_and_each_move_once():
    """Residency: the device holds the modules there plus ``extra`` (a dequantized layer) in every stage; each move
    of a module, either way, is its bytes over PCIe; parking without offload moves nothing; on a CPU target nothing
    moves at all."""
    counter = counters.LiveBytes()
    place = counters.Residency(counter, {"unet": 1000, "vae": 200, "reward": 0}, offload=True)
    moves: list[int] = []
    place.on_move = moves.append
    place.extra = 64
    place.refresh()
    assert counter.resident == 1264 and counter.where == ("unet", "vae")
    place.offload("vae")
    assert counter.resident == 1064 and counter.where == ("unet",)
    place.to_device("vae")
    place.park("vae")  # offload on: parking leaves the card
    assert moves == [200, 200, 200] and counter.resident == 1064
    kept = counters.Residency(counters.LiveBytes(), {"vae": 200}, offload=False)
    kept.on_move = moves.append
    kept.park("vae")
    assert kept.counter.resident == 200 and moves == [200, 200, 200]
    host = counters.Residency(counters.LiveBytes(), {"vae": 200}, offload=True, host=True)
    host.on_move = moves.append
    host.offload("vae")
    assert host.counter.resident == 200 and moves == [200, 200, 200]


def test_activation_offload_counts_each_saved_tensor_over_pcie_both_ways():
    """HostSaveOnCpu (activation_offload on a CUDA target): a saved tensor crosses PCIe when packed (forward) and
    again when unpacked (backward); its host copy is not device memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    counter, work = counters.LiveBytes(), counters.StageWork()
    with FakeTensorMode():
        x = torch.randn(4, 8, requires_grad=True)  # 128 bytes
        w = torch.randn(8, 16, requires_grad=True)  # 512 bytes
        with counter, work, work.stage(stages.SAMPLE_GRAD), counter.stage(stages.SAMPLE_GRAD), \
                counters.HostSaveOnCpu(counter, work):
            y = x @ w  # saves x and w for backward
        with work, work.stage(stages.BACKWARD):
            y.sum().backward()
    assert work.work[stages.SAMPLE_GRAD]["pcie_bytes"] == 128 + 512
    assert work.work[stages.BACKWARD]["pcie_bytes"] == 128 + 512
    assert counter.peaks[stages.SAMPLE_GRAD] == 4 * 16 * 4  # y alone: the packed copies live in host memory


def test_figures_add_the_further_k_to_the_stages_after_the_window_and_find_the_peak_stage():
    """figures(): K=4 with 2 steps simulated, each checkpointed step keeping 10 bytes (the level's rise between two
    grad calls): 20 more in sample_grad, decode, reward and backward, not before; load holds its modules' weights
    and the largest dequantized layer; the peak stage is the one with the most allocated, not the most weights; a
    CUDA target needs x1.10 and the workspaces."""
    import time

    cfg = Config(model="tiny", resolution=64, sample_steps=6, k=4).validate()

    def run(target):
        counter = counters.LiveBytes()
        peaks = {stages.ENCODE_PROMPTS: 50, stages.SAMPLE_NOGRAD: 60, stages.SAMPLE_GRAD: 300, stages.DECODE: 200,
                 stages.REWARD: 250, stages.BACKWARD: 400, stages.OPTIMIZER: 45}
        counter.peaks = dict(peaks)
        counter.weights_at_peak = {name: 40 if name != stages.OPTIMIZER else 45 for name in peaks}
        counter.where_at_peak = {name: ("unet",) for name in peaks}
        return figures.figures(cfg, target, counter, {"unet": 40, "lora": 0, "vae": 0}, 7, [100, 110, 120],
                               (4, 2, 0), 40, time.perf_counter(), [])
    est = run("cpu")
    allocated = {name: fig["allocated"] for name, fig in est.stages.items()}
    assert allocated == {stages.LOAD: 47, stages.ENCODE_PROMPTS: 50, stages.SAMPLE_NOGRAD: 60, stages.SAMPLE_GRAD: 320,
                         stages.DECODE: 220, stages.REWARD: 270, stages.BACKWARD: 420, stages.OPTIMIZER: 45}
    assert est.per_k_bytes == 10 and est.peak_stage == stages.BACKWARD and est.peak_needed == 420
    cuda = run("cuda")
    assert cuda.peak_needed == int(420 * allowances.RESERVED_FACTOR) + allowances.WORKSPACE_BYTES


def test_the_budget_is_in_gib_and_none_without_one():
    est = figures.Estimate("cuda", {}, 0, stages.BACKWARD, int(1.05e9), {}, 1, 1, 0, 0, 0.0)
    assert est.fits(1.0) is True  # 1.05e9 bytes < 1 GiB (1.074e9)
    assert est.fits(0.97) is False and est.fits(0) is None


def test_a_gpu_runs_host_memory_holds_what_waits_on_the_cpu():
    """A UNet pipeline loads whole on the CPU (load: every module plus block swap's pinned blocks); during the steps
    the host keeps the pinned blocks, the text encoder once the prompts are cached or with offload_frozen, and the
    VAE and reward model with offload_frozen."""
    weights = {"unet": 1000, "text_encoder": 100, "vae": 10, "reward": 1}
    cfg = Config(model="tiny").validate()

    def host(**kw):
        return figures.host_memory(dataclasses.replace(cfg, **kw), weights, 5000, 0, flow=False)
    assert host() == {"load": 6111, "steps": 5000}
    assert host(cache_prompt_embeddings=True) == {"load": 6111, "steps": 5100}
    assert host(offload_frozen=True) == {"load": 6111, "steps": 5111}


def test_a_smaller_batch_keeps_at_least_the_images_per_step_and_cpu_targets_get_no_card_changes(tiny_dir):
    """Batch 5 halves to 2 with grad_accum 3 (6 images per step: never fewer than the 5 asked); a CPU target is not
    offered offloading (nothing to offload to) or expandable segments (a CUDA allocator setting)."""
    cfg = Config(model="tiny", resolution=64, sample_steps=4, k=1, batch_size=5, expandable_segments=False).validate()
    cpu = dict((tuple(sorted(c)), (label, c)) for label, c in fit_changes.candidate_changes(cfg, target="cpu"))
    label, change = cpu[("batch_size", "grad_accum")]
    assert change == {"batch_size": 2, "grad_accum": 3} and "6 images per step, was 5" in label
    assert ("offload_frozen",) not in cpu and ("expandable_segments",) not in cpu
    cuda = [c for _, c in fit_changes.candidate_changes(cfg, target="cuda")]
    assert {"offload_frozen": True} in cuda and {"expandable_segments": True} in cuda


def test_cuda_autocast_emulation_runs_cudas_fp32_ops_in_fp32():
    """Where CUDA's autocast lists differ from the CPU's: layer_norm (CLIP's and the transformers' norms), exp and the
    losses run in fp32 on CUDA, in half precision under the CPU autocast alone; einsum is cast down on CUDA only."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    norm = torch.nn.LayerNorm(8).half().requires_grad_(False)
    mode = cuda_autocast.CudaAutocast(torch.float16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(2, 8).half()
        with torch.autocast("cpu", dtype=torch.float16):
            assert norm(x).dtype == torch.exp(x).dtype == torch.float16  # what the emulation adds to
        with mode, mode.active():
            assert norm(x).dtype == F.layer_norm(x, (8,)).dtype == torch.exp(x).dtype == torch.float32
            assert F.mse_loss(x, x).dtype == torch.float32
            assert torch.einsum("ij,kj->ik", x.float(), x.float()).dtype == torch.float16


@pytest.mark.parametrize("model", ["tiny", "flow"])
def test_a_large_prompt_set_plans_as_every_chunk_encoded_and_waits_where_training_keeps_it(model, tiny_dir, tmp_path,
                                                                                           monkeypatch):
    """The plan encodes the first and last chunk of each size and makes tensors of their shapes for those between
    (measure/counters.EncodedOnce: a plan of 100k SD1.5 prompts encoded 6,250 chunks, half an hour): its figures are
    the same as encoding every chunk. A set whose cache is over sampling.HOST_CACHE_ABOVE waits in host memory, as the
    trainer keeps it (the plan counted it on the card and not in host memory): the card holds the batch's, the host
    figure the cache."""
    from lowmem_alignprop.models import sampling

    from flowmodels import FLOW_RESOLUTION, build_tiny_flux_dir

    flux = model == "flow"
    cfg = Config(model=str(build_tiny_flux_dir(tmp_path / "flux")) if flux else model,
                 resolution=FLOW_RESOLUTION if flux else 64, sample_steps=4, k=1,
                 mixed_precision="bf16" if flux else "fp16", cache_prompt_embeddings=True).validate()
    prompts = [f"a photo of thing {i}" for i in range(70)]  # chunks of 16, 16, 16, 16 and 6
    calls, real = [], planner.EncodedOnce

    def counted(pipe, prompts):
        encode = pipe.encode_prompt
        pipe.encode_prompt = lambda *a, **k: calls.append(1) or encode(*a, **k)
        return real(pipe, prompts)

    def figures_of(est):
        return {name: (fig["allocated"], fig["weights"]) for name, fig in est.stages.items()}, est.host
    with monkeypatch.context() as m:
        m.setattr(planner, "EncodedOnce", counted)
        near = planner.estimate(cfg, target="cuda", prompts=prompts)
    assert len(calls) == 3  # the first and the last 16, and the 6
    with monkeypatch.context() as m:
        m.setattr(planner, "EncodedOnce", lambda pipe, prompts: pipe)  # every chunk encoded
        assert figures_of(planner.estimate(cfg, target="cuda", prompts=prompts)) == figures_of(near)
    monkeypatch.setattr(sampling, "HOST_CACHE_ABOVE", 0)  # the same set, held in host memory
    far = planner.estimate(cfg, target="cuda", prompts=prompts)
    cache = far.host["steps"] - near.host["steps"]
    assert cache > 0 and far.host["load"] - near.host["load"] == (cache if flux else 0)
    # from the first stage after encoding on, the card held the cache: 5 chunks of at most 3 tensors each (embeddings,
    # pooled or negative ones), each storage rounded up to the allocator's 512 bytes; the batch's copy is on the card
    # either way
    on_card = {n: near.stages[n]["allocated"] - far.stages[n]["allocated"]
               for n in STEP_STAGES if n != stages.ENCODE_PROMPTS}
    assert all(cache <= d < cache + 5 * 3 * allowances.CUDA_BLOCK for d in on_card.values()), (cache, on_card)
    assert any("70 prompts: their embeddings" in n and "wait in host memory" in n for n in far.notes)
    assert not any("wait in host memory" in n for n in near.notes)

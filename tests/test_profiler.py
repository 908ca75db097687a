"""StageProfiler on CPU: real allocation peaks per stage, aggregation, reports, and CUDA gating."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from lowmem_alignprop.measure import profiler as profiler_mod
from lowmem_alignprop.measure.cpu_allocation import CpuAllocationTracker, measure_cpu_stages, tracker_active
from lowmem_alignprop.measure.profiler import StageProfiler, gib
from lowmem_alignprop.measure.reports import fmt_bytes
from lowmem_alignprop.measure.resident_tensors import live_tensor_bytes, resident_bytes, run_objects_only
from lowmem_alignprop.memory.stages import STAGES

MiB = 1024**2


@pytest.fixture(scope="module", autouse=True)
def _run_objects_only():
    """The module's trackers walk only the objects made here (run_objects_only, as a training run's measurement
    does): each tracker's full collection and live-storage scan otherwise walked every object of the process."""
    with run_objects_only():
        yield


def _alloc(nbytes: int) -> torch.Tensor:
    return torch.ones(nbytes // 4, dtype=torch.float32)  # ones, not empty: the pages are touched


def _fake_step(prof: StageProfiler, kept: list) -> None:
    """decode: 64 MiB, freed; backward: 128 MiB freed + a 16 MiB result kept."""
    with prof.stage("encode_prompts"):
        pass
    with prof.stage("decode"):
        x = _alloc(64 * MiB)
        del x
    with prof.stage("backward"):
        big = _alloc(128 * MiB)
        kept.append(_alloc(16 * MiB))
        del big


def _close(measured: int, expected: int, rel: float = 0.05) -> bool:
    return abs(measured - expected) <= rel * expected


@pytest.fixture(scope="module")
def two_steps():
    """One profiler, load + two detail steps + one plain step; shared by several tests (fast)."""
    kept: list = []
    prof = StageProfiler("cpu", budget_gb=1.0, detail_steps={1, 2}, snapshot_steps=(1, 2))
    with prof.stage("load"):
        model = torch.nn.Linear(256, 256)
        weights = _alloc(32 * MiB)  # stays resident, like model weights
    lora = [model.bias]
    prof.record_modules({"unet": model, "vae": weights, "lora": lora})
    summaries = []
    for step in (1, 2, 3):
        prof.begin_step(step)
        _fake_step(prof, kept)
        summaries.append(prof.end_step())
    return prof, summaries, kept, (model, weights)


def test_known_peaks_within_5_percent(two_steps):
    prof, summaries, _, _ = two_steps
    for s in summaries[:2]:
        assert s["source"] == "cpu_counter"
        base = s["baseline"]
        st = s["stages"]
        assert _close(st["decode"]["peak_allocated"] - base, 64 * MiB)
        assert _close(st["backward"]["peak_allocated"] - base, 144 * MiB)  # 128 + 16 live together
        assert abs(st["encode_prompts"]["peak_allocated"] - base) < 0.05 * MiB
        assert _close(s["retained"], 16 * MiB)
        assert s["peak_stage"] == "backward"
        assert s["peak_allocated"] == st["backward"]["peak_allocated"]


def test_baseline_counts_live_tensors(two_steps):
    _, summaries, _, (model, weights) = two_steps
    b1, b2 = summaries[0]["baseline"], summaries[1]["baseline"]
    assert b1 >= 32 * MiB + model.weight.nbytes
    assert _close(b2 - b1, 16 * MiB, rel=0.01)  # the result step 1 kept


def test_load_peak_and_module_split(two_steps):
    prof, _, _, (model, weights) = two_steps
    load = prof.outside["load"]
    assert load["source"] == "cpu_counter"
    assert load["peak_allocated"] >= 32 * MiB
    split = prof.modules["after_load"]
    assert split["lora"]["bytes"] == model.bias.nbytes
    assert split["unet"]["bytes"] == model.weight.nbytes  # LoRA left out of the UNet
    assert split["vae"]["bytes"] == 32 * MiB
    assert split["unet"]["by_device"] == {"cpu": model.weight.nbytes}


def test_stage_seconds_leave_out_the_counted_steps_and_aborted_attempts_stay_apart(two_steps):
    """A CPU step whose allocation is counted runs ~1.5x slower: the stage means take the plain steps where there are
    any (step 3 here; step 1 is the warm-up), and the note says so. An attempt that did not train (--auto-fit's
    out-of-memory retry) is listed apart, out of the steps and the stage table."""
    prof, summaries, _, _ = two_steps
    report = prof.report()
    assert report["stages"]["backward"]["seconds_mean"] == summaries[2]["stages"]["backward"]["seconds"]
    assert "the seconds leave out the steps whose allocation was counted" in report["summary_steps"]["note"]
    assert "aborted_steps" not in report
    alone = StageProfiler("cpu", detail_steps={1})
    alone.begin_step(1)
    with alone.stage("backward"):
        _alloc(MiB)
    alone.end_step(aborted="out of memory in backward")
    assert alone.steps == [] and [(s["step"], s["aborted"]) for s in alone.report()["aborted_steps"]] == \
        [(1, "out of memory in backward")]


def test_plain_steps_record_time_and_rss_only(two_steps):
    _, summaries, _, _ = two_steps
    s = summaries[2]
    assert s["source"] == "time_rss"
    assert s["peak_allocated"] is None and s["peak_stage"] is None
    assert s["stages"]["backward"]["seconds"] > 0
    assert s["stages"]["backward"]["rss"] > 0
    assert "mem step 3" in StageProfiler("cpu").format_step(s)


def test_format_step(two_steps):
    prof, summaries, _, _ = two_steps
    line = prof.format_step(summaries[1])
    assert line.startswith("mem step 2: peak ") and "in backward" in line and line.endswith(" s")
    assert "(measuring held " in line  # the measured step's RSS names the measurement's own share
    assert "\n" not in line and len(line) < 120
    assert "measuring" not in prof.format_step(summaries[2])


def test_time_set_aside_in_a_step_is_not_the_steps(monkeypatch):
    """The held-out evaluation runs between a step and its metrics line, inside the profiler's bracket: the step's
    seconds (the step line's, memory_report.json's) leave it out, as metrics.jsonl's do (they were 25.5 s beside
    1.5 s at each evaluation step of a 300-step run)."""
    import types

    from lowmem_alignprop.measure import profiler

    now = [100.0]
    monkeypatch.setattr(profiler, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    prof = StageProfiler("cpu")
    prof.begin_step(1)
    now[0] += 1.5  # the step
    prof.set_aside(24.0)  # the evaluation
    now[0] += 24.0
    assert prof.end_step()["seconds"] == pytest.approx(1.5)


def test_stage_entered_twice_aggregates():
    prof = StageProfiler("cpu", detail_steps="all")
    kept = []
    prof.begin_step(1)
    for _ in range(2):  # grad accumulation: backward twice, the second on top of the first's result
        with prof.stage("backward"):
            big = _alloc(32 * MiB)
            kept.append(_alloc(8 * MiB))
            del big
    with prof.stage("optimizer"):
        pass
    s = prof.end_step()
    fig = s["stages"]["backward"]
    assert fig["calls"] == 2
    assert _close(fig["peak_allocated"] - s["baseline"], 48 * MiB)  # max of 40 and 8 + 40
    assert list(s["stages"]) == ["backward", "optimizer"]  # STAGES order
    assert s["peak_stage"] == "backward"


def test_unknown_stage_rejected():
    with pytest.raises(ValueError, match="unknown stage"):
        with StageProfiler("cpu").stage("sampling"):
            pass


def test_write_produces_three_valid_files(two_steps, tmp_path):
    from PIL import Image

    prof, _, _, _ = two_steps
    paths = prof.write(tmp_path)
    for name in ("memory_report.json", "memory_report.md", "memory_report.png"):
        assert (tmp_path / name).is_file() and paths[name] == tmp_path / name

    report = json.loads((tmp_path / "memory_report.json").read_text())
    for key in ("device", "torch", "budget_gb", "modules", "stages", "steps", "summary_steps",
                "peak_allocated", "peak_stage", "fits_budget", "snapshot"):
        assert key in report, key
    assert report["torch"] == torch.__version__
    assert report["device"]["type"] == "cpu"
    assert report["peak_stage"] == "backward" and report["peak_step"] == 2
    assert report["fits_budget"] is True  # ~0.2 GiB peak vs a 1 GiB budget
    assert report["summary_steps"]["warmup_excluded"] == 1
    assert report["stages"]["backward"]["peak_steps"] == "2"
    assert [s["step"] for s in report["steps"]] == [1, 2, 3]
    assert "after_load" in report["modules"]
    assert report["snapshot"]["path"] is None

    md = (tmp_path / "memory_report.md").read_text()
    rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")]
    stage_rows = [r for r in rows if r in STAGES]
    assert stage_rows == list(STAGES)
    assert "| unet |" in md
    # on the CPU the budget is judged on the tensors' bytes, not the process's RSS (cpu.yaml calls it host RAM)
    assert "budget 1 GiB: fits (judged on the tensors' bytes; the process's resident memory, RSS, is below)" in md
    # steps 2-3 are summarised, but only steps 1-2 (the detail steps) measured a peak on the CPU: the report says so
    assert report["summary_steps"]["steps"] == "2-3" and report["summary_steps"]["peak_measured_steps"] == "1-2"
    assert report["summary_steps"]["seconds_steps"] == "3"  # step 2 measured (slower): the seconds leave it out
    assert ("mean seconds over step 3 (step 1 excluded as warm-up; the measured ones left out: slower); peaks "
            "measured in steps 1-2 only") in md

    with Image.open(tmp_path / "memory_report.png") as img:
        img.verify()
    with Image.open(tmp_path / "memory_report.png") as img:
        assert img.size[0] >= 400 and img.size[1] >= 300
    assert (tmp_path / "memory_report.png").stat().st_size > 5000


def test_budget_exceeded_and_no_budget(tmp_path):
    prof = StageProfiler("cpu", budget_gb=0.01, detail_steps={1})
    keep = []
    prof.begin_step(1)
    _fake_step(prof, keep)
    prof.end_step()
    rep = prof.report()
    assert rep["fits_budget"] is False
    assert rep["summary_steps"]["warmup_excluded"] is None  # one step: nothing excluded
    assert StageProfiler("cpu").report()["fits_budget"] is None
    StageProfiler("cpu").write(tmp_path)  # an empty report still writes (and plots) cleanly
    assert (tmp_path / "memory_report.png").stat().st_size > 0


def test_snapshot_request_on_cpu_only_logs(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger=profiler_mod.__name__):
        prof = StageProfiler("cpu", snapshot_steps=(1, 2))
    assert sum("snapshots need CUDA" in r.getMessage() for r in caplog.records) == 1
    for step in (1, 2):
        prof.begin_step(step)
        with prof.stage("reward"):
            pass
        prof.end_step()
    prof.write(tmp_path)
    assert not (tmp_path / profiler_mod.SNAPSHOT_FILE).exists()
    with pytest.raises(ValueError):
        StageProfiler("cpu", snapshot_steps=(3, 1))


CUDA_FUNCS = ("reset_peak_memory_stats", "max_memory_allocated", "max_memory_reserved", "memory_stats",
              "synchronize", "get_device_name", "get_device_properties", "current_device",
              "memory_allocated", "reset_max_memory_allocated")
CUDA_MEMORY_FUNCS = ("_record_memory_history", "_dump_snapshot", "_snapshot")


@pytest.mark.parametrize("device,available", [("cpu", False), ("cpu", True), ("cuda", False)])
def test_no_cuda_calls_without_cuda(monkeypatch, tmp_path, device, available):
    """Gate on both the device type and torch.cuda.is_available(); CPU builds raise or lie."""

    def boom(*args, **kwargs):
        raise AssertionError("a torch.cuda memory function was called")

    for name in CUDA_FUNCS:
        monkeypatch.setattr(torch.cuda, name, boom, raising=False)
    for name in CUDA_MEMORY_FUNCS:
        monkeypatch.setattr(torch.cuda.memory, name, boom, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)

    prof = StageProfiler(device, budget_gb=1.0, detail_steps={1}, snapshot_steps=(1, 1), output_dir=tmp_path)
    with prof.stage("load"):
        model = torch.nn.Linear(8, 8)
    prof.record_modules({"unet": model})
    keep = []
    for step in (1, 2):
        prof.begin_step(step)
        _fake_step(prof, keep)
        prof.format_step(prof.end_step())
    prof.write(tmp_path)
    prof.close()
    assert json.loads((tmp_path / "memory_report.json").read_text())["device"]["type"] == device


@pytest.mark.parametrize("method", ["events", "counter"])
def test_measure_cpu_stages_compares_features(method):
    """The helper for tests and benchmarks: same code, a memory feature on and off (either method)."""
    x = torch.randn(256, 1024, requires_grad=True)
    layers = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.GELU())
                                   for _ in range(8)])

    def step(checkpoint: bool) -> None:
        prof = StageProfiler("cpu")  # no step begun: stages are plain record_function ranges
        with prof.stage("sample_grad"):
            if checkpoint:
                y = torch.utils.checkpoint.checkpoint(layers, x, use_reentrant=False)
            else:
                y = layers(x)
            loss = y.square().mean()
        with prof.stage("backward"):
            loss.backward()

    plain = measure_cpu_stages(step, False, method=method)
    ckpt = measure_cpu_stages(step, True, method=method)
    act = 256 * 1024 * 4  # one activation tensor: 1 MiB
    assert plain["sample_grad"] >= 16 * act  # 8 Linear + 8 GELU outputs saved
    assert ckpt["sample_grad"] < 4 * act  # only the output (and its square's input) stay
    assert ckpt["backward"] > 0 and plain["backward"] > 0
    assert plain["*"] >= max(plain["sample_grad"], plain["backward"])


def test_tracker_absolute_peak_and_nesting_refused():
    keep = _alloc(8 * MiB)
    with CpuAllocationTracker() as tracker:
        with torch.profiler.record_function("decode"):
            tmp = _alloc(4 * MiB)
            del tmp
        with pytest.raises(RuntimeError, match="already running"):
            CpuAllocationTracker().__enter__()
    assert tracker.baseline >= keep.nbytes
    assert _close(tracker.peaks["decode"], 4 * MiB)
    assert tracker.peak_allocated("decode") == tracker.baseline + tracker.peaks["decode"]
    assert tracker.calls["decode"] == 1 and tracker.seconds["decode"] > 0


def test_detail_step_inside_outer_tracker_falls_back():
    prof = StageProfiler("cpu", detail_steps="all")
    with CpuAllocationTracker(count_baseline=False) as tracker:
        prof.begin_step(1)
        with prof.stage("decode"):
            tmp = _alloc(4 * MiB)
            del tmp
        s = prof.end_step()
    assert s["source"] == "time_rss"  # the outer tracker measured instead
    assert _close(tracker.peaks["decode"], 4 * MiB)


def test_optimizer_state_recorded_after_first_step():
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    prof = StageProfiler("cpu")
    assert prof.record_modules({"unet": model, "optimizer": opt})["optimizer"]["bytes"] == 0
    prof.begin_step(1)
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    split = prof.record_modules({"unet": model, "optimizer": opt})
    prof.end_step()
    n = sum(p.nbytes for p in model.parameters())
    assert split["optimizer"]["bytes"] >= 2 * n  # exp_avg + exp_avg_sq (+ step scalars)
    assert list(prof.modules) == ["after_load", "after_step_1"]


def test_helpers():
    assert gib(3 * 1024**3) == 3.0
    assert fmt_bytes(None) == "n/a"
    assert fmt_bytes(512) == "512 B"
    assert fmt_bytes(64 * MiB) == "64.00 MiB"
    assert fmt_bytes(int(1.5 * 1024**3)) == "1.50 GiB"
    assert fmt_bytes(-2048) == "-2.00 KiB"
    shared = torch.zeros(1024)
    assert resident_bytes([shared, shared[:10], {"a": shared}]) == {"cpu": 4096}
    assert resident_bytes(torch.zeros(10, device="meta")) == {"meta": 40}
    before = live_tensor_bytes("cpu")
    extra = torch.zeros(MiB // 4)
    assert live_tensor_bytes("cpu") - before >= extra.nbytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_reset_then_read(tmp_path):
    dev = torch.device("cuda")
    prof = StageProfiler(dev, budget_gb=1.0, snapshot_steps=(2, 2))
    keep = []
    for step in (1, 2):
        prof.begin_step(step)
        with prof.stage("decode"):
            x = torch.empty(64 * MiB, dtype=torch.uint8, device=dev)
            del x
        with prof.stage("backward"):
            big = torch.empty(128 * MiB, dtype=torch.uint8, device=dev)
            keep.append(torch.empty(16 * MiB, dtype=torch.uint8, device=dev))
            del big
        s = prof.end_step()
    base = torch.cuda.memory_allocated(dev) - 32 * MiB  # after step 2, both results kept
    st = s["stages"]
    assert _close(st["decode"]["peak_allocated"] - base - 16 * MiB, 64 * MiB)
    assert _close(st["backward"]["peak_allocated"] - base - 16 * MiB, 144 * MiB)
    assert st["backward"]["peak_reserved"] >= st["backward"]["peak_allocated"]
    assert st["backward"]["peak_active"] >= 144 * MiB
    assert s["peak_stage"] == "backward"
    paths = prof.write(tmp_path)
    assert (tmp_path / profiler_mod.SNAPSHOT_FILE).stat().st_size > 0
    assert profiler_mod.SNAPSHOT_FILE in paths
    rep = json.loads((tmp_path / "memory_report.json").read_text())
    assert rep["device"]["total_memory"] > 0 and rep["snapshot"]["recorded_steps"] == [2, 2]


def test_load_without_detail_reports_resident_bytes():
    prof = StageProfiler("cpu", detail_load=False)
    with prof.stage("load"):
        model = torch.nn.Linear(128, 128)
    assert prof.outside["load"]["peak_allocated"] is None
    prof.record_modules({"unet": model})
    assert prof.outside["load"]["peak_allocated"] == sum(p.nbytes for p in model.parameters())
    assert prof.outside["load"]["source"] == "resident"


def test_on_cuda_the_reserved_bytes_decide_the_fit_as_in_the_planner():
    from lowmem_alignprop.measure.profiler import budget_verdict

    gib = 2**30
    # 7.0 GiB allocated but 7.8 GiB reserved on an 7.5 GiB card: it did not fit (the allocator held more)
    assert budget_verdict(int(7.0 * gib), int(7.8 * gib), int(7.5 * gib), cuda=True) == {
        "fits_budget": False, "fits_basis": "peak_reserved"}
    assert budget_verdict(int(7.0 * gib), None, int(7.5 * gib), cuda=True)["fits_budget"] is True
    assert budget_verdict(int(7.0 * gib), int(7.8 * gib), int(7.5 * gib), cuda=False) == {
        "fits_budget": True, "fits_basis": "peak_allocated"}  # a CPU has no reserved pool
    assert budget_verdict(None, None, int(gib), cuda=False)["fits_budget"] is None


# ---------------------------------------------------------------------------------------------------
# the live-storage counter of the CPU measurement (issue 22: no event log, the measurement costs ~nothing)
# ---------------------------------------------------------------------------------------------------


def test_counter_counts_each_storage_once_and_sees_frees():
    from lowmem_alignprop.measure.storage_counter import StorageCounter

    old = _alloc(4 * MiB)
    with StorageCounter() as counter:
        counter.watch([old.untyped_storage()])
        a = _alloc(2 * MiB)  # new: +2 MiB
        views = [a[:10], a.view(2, -1), a.t() if a.dim() == 2 else a.unsqueeze(0)]  # views: nothing new
        a.add_(1)  # in place: nothing new
        assert counter.level == 2 * MiB
        out = torch.empty(0)
        torch.add(a, 1, out=out)  # out= grows an empty storage it made: +2 MiB
        assert counter.level == 4 * MiB
        del a
        assert counter.level == 4 * MiB  # a's storage lives on in its views
        del views
        assert counter.level == 2 * MiB  # its last view went: freed
        del out
        assert counter.level == 0
        del old  # a storage from before: its free lowers the level, like an allocator's running total
        assert counter.level == -4 * MiB
    assert counter.peak == 4 * MiB
    counter.release()
    assert not counter._live  # nothing kept after


def test_counter_ranges_nest_and_unmeasured_ranges_pair():
    from lowmem_alignprop.measure.storage_counter import StorageCounter

    with StorageCounter(names={"decode", "backward"}) as counter:
        with torch.profiler.record_function("decode"):
            with torch.profiler.record_function("not measured"):
                x = _alloc(MiB)
            y = _alloc(MiB)
            del x, y
        with torch.profiler.record_function("backward"):
            z = _alloc(3 * MiB)
            del z
    assert counter.peaks == {"decode": 2 * MiB, "backward": 3 * MiB}
    assert counter.calls == {"decode": 1, "backward": 1} and counter.seconds["decode"] > 0
    assert not counter._ranges and not counter._open


@pytest.mark.parametrize("method", ["counter", "events"])
def test_an_error_inside_a_tracker_leaves_nothing_running(method):
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    was = __import__("gc").isenabled()
    with pytest.raises(ZeroDivisionError):
        with CpuAllocationTracker(method=method):
            1 / 0
    assert _get_current_dispatch_mode() is None and not tracker_active()
    assert __import__("gc").isenabled() == was
    with CpuAllocationTracker(method=method):  # a new one starts
        pass


def _small_training_step(seed: int = 0):
    """A conv + GroupNorm + attention net with a checkpointed part, backward and AdamW: the ops of a UNet step."""
    torch.manual_seed(seed)
    c = 32
    net = torch.nn.Sequential(torch.nn.Conv2d(4, c, 3, padding=1), torch.nn.GroupNorm(8, c), torch.nn.SiLU(),
                              torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.GroupNorm(8, c), torch.nn.SiLU(),
                              torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(c, 3, 3, padding=1))
    attn = torch.nn.MultiheadAttention(c, 4, batch_first=True)
    opt = torch.optim.AdamW(list(net.parameters()) + list(attn.parameters()))
    x = torch.randn(2, 4, 32, 32)

    def step(prof: StageProfiler) -> None:
        with prof.stage("sample_grad"):
            h = net[:6](x)
            b, ch, hh, ww = h.shape
            t = h.flatten(2).transpose(1, 2)
            h = attn(t, t, t, need_weights=False)[0].transpose(1, 2).reshape(b, ch, hh, ww)
        with prof.stage("decode"):
            y = torch.utils.checkpoint.checkpoint(net[6:], h, use_reentrant=False)
            loss = y.square().mean()
        with prof.stage("backward"):
            loss.backward()
        with prof.stage("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def test_counter_agrees_with_allocator_events_where_ops_use_no_workspace():
    """Ops that allocate only what they return (GroupNorm, SiLU, elementwise math, forward and backward): the
    counter and torch.profiler's allocator events see the same allocations, so the same peaks per stage. The
    slack is 64 KiB: small allocations outside tensors (autograd's bookkeeping) that only the events see."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.GroupNorm(8, 32), torch.nn.SiLU(), torch.nn.GroupNorm(8, 32), torch.nn.SiLU())
    x = torch.randn(2, 32, 64, 64, requires_grad=True)  # 1 MiB per activation

    def step() -> None:
        prof = StageProfiler("cpu")
        with prof.stage("sample_grad"):
            y = net(x)
        with prof.stage("reward"):
            loss = (y * y).mean()
        with prof.stage("backward"):
            loss.backward()
        x.grad = None

    counter = measure_cpu_stages(step, method="counter")
    events = measure_cpu_stages(step, method="events")
    for name in ("sample_grad", "reward", "backward", "*"):
        assert abs(counter[name] - events[name]) <= 64 * 1024, (name, counter[name], events[name])
    assert counter["backward"] >= 4 * MiB  # saved activations and gradients: a real amount


def test_counter_never_exceeds_the_allocator_events():
    """Convolutions, upsampling, attention, checkpointing and AdamW: what a kernel allocates and frees inside one op
    (a convolution's scratch, a contiguous copy of its input) is invisible to a count of the storages ops return,
    so the counter is at most the events' peak per stage (the planner's fake tensors cannot see that scratch
    either); it is never above it (64 KiB slack, as above)."""
    step = _small_training_step()
    prof = StageProfiler("cpu")
    step(prof)  # warm-up: Adam's state exists, as from step 2 on
    counter = measure_cpu_stages(step, prof, method="counter")
    events = measure_cpu_stages(step, prof, method="events")
    for name in ("sample_grad", "decode", "backward", "optimizer"):
        assert counter[name] <= events[name] + 64 * 1024, (name, counter[name], events[name])
    assert counter["backward"] > 2 * MiB


def test_detail_step_keeps_no_log_and_costs_little(tmp_path):
    """The measured step holds one table entry per live storage (no events); the report says what it cost and
    tells the RSS after load, in the steps and in the measured step apart."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    step = _small_training_step()
    prof = StageProfiler("cpu", detail_steps={2})
    with prof.stage("load"):
        pass
    for n in (1, 2, 3):
        assert _get_current_dispatch_mode() is None  # the counter runs in the measured step only
        prof.begin_step(n)
        step(prof)
        s = prof.end_step()
        assert prof._tracker is None and _get_current_dispatch_mode() is None
    measured = prof.steps[1]
    assert measured["source"] == "cpu_counter" and measured["peak_stage"] == "backward"
    # its own memory: a list of the process's objects (8 B each) once, then a few hundred bytes per live storage
    assert 0 < measured["measurement_bytes"] < 64 * MiB
    assert s["rss_hwm"] is None or s["rss_hwm"] >= s["rss"] > 0
    rep = prof.report()
    rss = rep["rss"]
    assert rss["after_load"] > 0 and rss["steps"] == "1, 3" and rss["measured_steps"] == "2"
    assert rss["measurement_bytes"] == measured["measurement_bytes"]
    assert rep["stages"]["backward"]["rss_steps"] == "3"  # the column leaves the measured step out
    prof.write(tmp_path)
    md = (tmp_path / "memory_report.md").read_text()
    assert "GiB after load" in md and "in measured step 2" in md and "measurement itself held at most" in md
    assert "max RSS (GiB, step 3)" in md


def test_the_steps_import_nothing_the_report_needs():
    """matplotlib is imported by write() after the loop, never by a step (a subprocess: a clean sys.modules)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from lowmem_alignprop.measure.profiler import StageProfiler\n"
        "prof = StageProfiler('cpu', detail_steps='all')\n"
        "for n in (1, 2):\n"
        "    prof.begin_step(n)\n"
        "    with prof.stage('backward'):\n"
        "        torch.ones(1000).sum()\n"
        "    prof.end_step()\n"
        "assert not [m for m in sys.modules if m.startswith('matplotlib')], 'matplotlib imported by the steps'\n"
        "import tempfile\n"
        "prof.write(tempfile.mkdtemp())\n"
        "assert 'matplotlib' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("method", ["counter", "events"])
def test_a_range_that_allocates_nothing_peaks_at_what_was_live_when_it_began(method):
    """A stage that allocates nothing still holds what earlier stages made: its peak is the level when it
    began, not 0. The counter folds the level in when the range opens; the events' analysis takes the running total
    before the range's first event."""
    with CpuAllocationTracker(count_baseline=False, method=method) as tracker:
        held = _alloc(2 * MiB)
        with torch.profiler.record_function("reward"):
            held.add_(held)  # in place with a tensor operand (no wrapped scalar): nothing allocated inside
        doubled = bool((held == 2).all())
        del held
    assert doubled
    assert _close(tracker.peaks["reward"], 2 * MiB)

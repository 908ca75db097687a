"""measure/reports.py: the plan's table and memory_report.md, formatted from plain dicts (numbers checked)."""

import re

from lowmem_alignprop.measure.reports import format_plan, memory_report_markdown
from lowmem_alignprop.memory.allowances import ALLOWANCES, GIB, MIB, WORKSPACE_BYTES
from lowmem_alignprop.memory.stages import STAGES
from lowmem_alignprop.settings.config import Config


def _plan(**over):
    backward = {"allocated": 3 * GIB, "weights": 1 * GIB, "reserved": int(3.3 * GIB), "on_device": ["unet", "vae"]}
    decode = {"allocated": 2 * GIB, "weights": int(1.25 * GIB), "reserved": int(2.2 * GIB), "on_device": ["unet"]}
    r = {"config": Config(truncation="fixed", k=1).to_dict(), "estimate": {"seconds": 4.2}, "profile": "rtx3060",
         "model": "sd15", "reward": "aesthetic", "target": "cuda", "autocast": "emulated",
         "stages": {"decode": decode, "backward": backward}, "peak_stage": "backward", "peak_allocated": 3 * GIB,
         "peak_needed": int(3.3 * GIB) + WORKSPACE_BYTES, "fragmentation_allowance": 0,
         "budget_bytes": 8 * GIB, "budget_gb": 8.0, "fits": True, "allowances": ALLOWANCES, "notes": ["a note"],
         "seconds": 5.0}
    r.update(over)
    return r


def _row(text: str, stage: str) -> list[str]:
    return next(line.split() for line in text.splitlines() if line.strip().startswith(stage + " "))


def test_the_plan_table_shows_each_stage_and_the_other_bytes():
    text = format_plan(_plan())
    assert _row(text, "backward") == ["backward", "3.000", "1.000", "2.000", "3.300", "unet,", "vae", "<-", "peak"]
    assert _row(text, "decode") == ["decode", "2.000", "1.250", "0.750", "2.200", "unet"]
    assert _row(text, "reward") == ["reward", "-"]  # a stage the estimate has no figure for
    assert [line.split()[0] for line in text.splitlines() if line.startswith("  ") and line.split()
            and line.split()[0] in STAGES] == list(STAGES)  # every stage, in the step's order


def test_the_plan_adds_reserve_and_workspaces_and_judges_the_budget():
    text = format_plan(_plan())
    # 3.3 GiB reserved + 160 MiB of workspaces = 3.456 GiB; 3.456 / 8 = 43%, 4.54 GiB spare
    assert "-> 3.300 reserved (x1.10) + 160 MiB workspaces = 3.456 GiB needed" in text
    assert "budget: 8 GiB (profile rtx3060): FITS (43% of the budget, +4.54 GiB spare)" in text
    edge = format_plan(_plan(budget_bytes=int(3.44 * GIB), budget_gb=3.44, fits=False))
    assert "DOES NOT FIT (100.5% of the budget, -0.02 GiB spare)" in edge  # a decimal at the edge
    frag = format_plan(_plan(fragmentation_allowance=512 * MIB))
    assert "(x1.10 + 0.500 fixed-segment fragmentation)" in frag


def test_a_plan_that_does_not_fit_names_the_cheapest_change():
    s = {"change": "+ vae_checkpointing=blocks", "set": {"vae_checkpointing": "blocks", "sliced_decode": True},
         "peak_needed": int(2.5 * GIB), "peak_stage": "decode"}
    text = format_plan(_plan(fits=False, budget_bytes=2 * GIB, budget_gb=2.0, suggestion=s))  # 3.456 / 2
    assert "DOES NOT FIT (173% of the budget, -1.46 GiB spare)" in text
    assert "cheapest change that fits: + vae_checkpointing=blocks" in text
    assert "--set vae_checkpointing=blocks --set sliced_decode=true   -> 2.500 GiB needed, peak in decode" in text
    none = format_plan(_plan(fits=False, budget_bytes=2 * GIB, budget_gb=2.0, tried=[{}, {}, {}]))
    assert "no change from the feature list made it fit (3 tried)" in none
    # what to do then (the line stopped there: `plan --set budget_gb=0.01` on the cpu profile named no fix)
    rows = [{"set": {"vae_checkpointing": "blocks"}, "peak_needed": int(2.6 * GIB)},
            {"set": {"unet_checkpointing": "blocks", "batch_size": 1, "grad_accum": 2}, "peak_needed": int(2.2 * GIB)}]
    least = format_plan(_plan(fits=False, budget_bytes=2 * GIB, budget_gb=2.0, tried=rows)).splitlines()
    i = least.index("  no change from the feature list made it fit (2 tried)")
    assert least[i + 1] == ("  the least needed: 2.200 GiB, with --set unet_checkpointing=blocks --set batch_size=1 "
                            "--set grad_accum=2: give a budget_gb of at least that, or lower what is trained (--set "
                            "resolution, batch_size, k)")
    cut = format_plan(_plan(fits=False, budget_bytes=2 * GIB, budget_gb=2.0, tried=[{}, {}],
                            suggestion_interrupted=True))  # (test_planner: the search's Ctrl-C)
    assert "the search for a change that fits was interrupted (Ctrl-C) after 2 estimates; none of them fit" in cut


def test_a_cpu_plan_reports_exact_bytes_without_allowances_on_top():
    text = format_plan(_plan(target="cpu", profile="cpu", budget_bytes=0))
    assert "peak: 3.000 GiB allocated in backward (CPU: exact bytes)" in text
    assert "workspaces =" not in text and "budget: none given" in text


def _memory_report():
    fig = {"peak_reserved": None, "peak_active": None, "rss_steps": "1-3"}
    return {
        "device": {"type": "cpu", "str": "cpu", "name": "a test CPU"}, "torch": "2.x", "budget_bytes": 1 * GIB,
        "budget_gb": 1.0, "peak_allocated": GIB // 4, "peak_stage": "backward", "peak_step": 2,
        "peak_reserved": None, "fits_budget": True, "method": "counted",
        "summary_steps": {"steps": "2-3", "warmup_excluded": 1, "peak_measured_steps": "2"},
        "rss": {"after_load": GIB // 2, "steps_max": GIB, "steps": "1, 3", "measured_steps_max": int(1.25 * GIB),
                "measured_steps": "2", "measurement_bytes": int(4.7 * MIB), "host_allocator": "glibc, fixed"},
        "snapshot": None,
        "stages": {"decode": {**fig, "peak_allocated": GIB // 8, "rss_max": GIB // 2, "seconds_mean": 0.5},
                   "backward": {**fig, "peak_allocated": GIB // 4, "rss_max": GIB, "seconds_mean": 1.25}},
        "modules": {"after_load": {"unet": {"bytes": GIB // 2}, "lora": {"bytes": GIB // 4}},
                    "end": {"unet": {"bytes": GIB // 2}, "lora": {"bytes": GIB // 4}, "optimizer": {"bytes": GIB // 8}}},
    }


def test_the_memory_report_has_the_peaks_their_share_and_the_module_totals():
    text = memory_report_markdown(_memory_report())
    assert "- peak allocated: 0.250 GiB in backward (step 2); budget 1 GiB: fits" in text
    assert "| backward | 0.250 | 1.000 | 1.250 | 25.0% |" in text  # 0.25 of a 1 GiB budget
    assert "| decode | 0.125 | 0.500 | 0.500 | 12.5% |" in text
    assert "| reward | - | - | - | - |" in text
    assert "max RSS (GiB, steps 1-3)" in text
    assert "| optimizer | n/a | 0.125 |" in text  # a module present in one column only
    assert "| total | 0.750 | 0.875 |" in text
    assert "peaks measured in step 2 only" in text and "(step 1 excluded as warm-up)" in text


def test_the_memory_report_tells_the_measurements_memory_apart_from_the_training():
    line = next(x for x in memory_report_markdown(_memory_report()).splitlines() if x.startswith("- resident"))
    assert "0.500 GiB after load" in line
    assert "up to 1.000 GiB in steps 1, 3 (allocation not measured)" in line
    one = _memory_report()  # a one-step run: "step 1", not "steps 1"
    one["rss"]["steps"] = "1"
    assert "up to 1.000 GiB in step 1 (allocation not measured)" in next(
        x for x in memory_report_markdown(one).splitlines() if x.startswith("- resident"))
    assert "1.250 GiB in measured step 2" in line
    assert re.search(r"measurement itself held at most 4\.70 MiB", line)
    assert line.endswith(". C allocator: glibc, fixed")  # what RSS is read with


def test_the_plans_seconds_read_without_exponents_and_the_run_gets_its_length():
    """FLUX on an 8 GB card plans at ~2230 s per optimizer step: whole seconds, not 2.23e+03, and the run's 200 steps
    as 5.2 days; a stage of microseconds is '<0.01', not 0.00012."""
    from lowmem_alignprop.measure.reports import fmt_duration, fmt_seconds, format_time

    cfg = Config(steps=200, grad_accum=4, truncation="uniform").to_dict()
    figures = {"fp16_tflops": 25.5, "bf16_tflops": 25.5, "tf32_tflops": 12.7, "fp32_tflops": 12.7,
               "memory_gbs": 360, "pcie_gbs": 25}
    work = {"matmul_flops": 2.8e15, "attention_flops": 0.0, "other_bytes": 1.1e13, "ops": 249_000, "pcie_bytes": 3e11}
    t = {"k_mean": 3, "work_per_micro_step": work, "device": "rtx3060", "device_figures": figures,
         "matmul_dtype": "bf16", "stages": {"encode_prompts": 0.00012, "sample_nograd": 362.4, "backward": 149.2,
                                           "optimizer": 0.0123},
         "micro_step": 556.0, "optimizer_step": 2236.0}
    lines = format_time(t, cfg)
    assert "    encode_prompts <0.01  sample_nograd 362  backward 149  optimizer 0.0123" in lines
    [total] = [x for x in lines if "per optimizer step" in x]
    assert "per micro-step 556 s; per optimizer step 2236 s (4 micro-steps + optimizer)" in total
    assert "the run's 200 steps: 5.2 days of training" in total and "e+" not in "\n".join(lines)
    assert [fmt_seconds(x) for x in (0, 0.004, 0.5, 12.345, 99.96, 100, 1e6)] == \
        ["0", "<0.01", "0.5", "12.3", "100", "100", "1000000"]
    assert [fmt_duration(x) for x in (45, 119, 2220, 7200, 18720, 172800)] == \
        ["45 s", "119 s", "37 min", "2.0 h", "5.2 h", "2.0 days"]
    # under a second a tenth: plan's "2 sample-grid images without gradient: at most 0 s more (0.0955 s an image" and
    # a step line's "0 s left" hid spans that are not zero
    assert [fmt_duration(x) for x in (0.19, 0.04, 0.94, 0.96, 6)] == ["0.2 s", "0.0 s", "0.9 s", "1 s", "6 s"]


def test_plan_max_minutes_says_how_many_steps_fit_on_the_card():
    """plan --max-minutes 60 at 25 s per optimizer step on an H100: (3600 - the run's 60 s kept for its end) / 25 =
    141 steps of the run's 500 fit; a limit longer than the run says all of them; without --max-minutes no line, nor
    without a card to time on."""
    from lowmem_alignprop.measure.reports import format_time

    figures = {"fp16_tflops": 989, "bf16_tflops": 989, "tf32_tflops": 495, "fp32_tflops": 67,
               "memory_gbs": 3350, "pcie_gbs": 64}
    work = {"matmul_flops": 1e15, "attention_flops": 0.0, "other_bytes": 1e12, "ops": 100_000, "pcie_bytes": 0}
    t = {"k_mean": 1, "work_per_micro_step": work, "device": "h100-80gb", "device_figures": figures,
         "matmul_dtype": "bf16", "stages": {"backward": 20.0}, "micro_step": 25.0, "optimizer_step": 25.0}
    lines = format_time(t, Config(steps=500, max_minutes=60).to_dict())
    assert lines[-1] == ("    --max-minutes 60 on h100-80gb: about 141 of the run's 500 steps fit (at 25 s a step, "
                         "less the 1 min the run keeps for its end; the model's loading and the sample renders not "
                         "counted); --resume latest trains the rest")
    assert format_time(t, Config(steps=100, max_minutes=60).to_dict())[-1] == (
        "    --max-minutes 60 on h100-80gb: the run's 100 steps fit (at 25 s a step, 42 min of training)")
    assert not [x for x in format_time(t, Config(steps=500).to_dict()) if "--max-minutes" in x]
    assert not [x for x in format_time({**t, "device": None, "note": "no card"}, Config(steps=500, max_minutes=60)
                                       .to_dict()) if "--max-minutes" in x]


def test_the_time_lines_state_the_work_in_decimal_units_and_the_peak_of_the_matmul_dtype():
    """The work line in 1e12 FLOP and 1e9 bytes (as the device table's GB/s); the card's peak is the rate of the
    matmul dtype: an A100's TF32 rate (156) for fp32 with tf32 on, its plain fp32 rate (19.5) without."""
    from lowmem_alignprop.measure.reports import format_time

    cfg = Config(steps=10, truncation="fixed", k=2).to_dict()
    figures = {"fp16_tflops": 312, "bf16_tflops": 312, "tf32_tflops": 156, "fp32_tflops": 19.5,
               "memory_gbs": 1555, "pcie_gbs": 25}
    work = {"matmul_flops": 1.5e12, "attention_flops": 0.5e12, "other_bytes": 3e9, "ops": 12_000, "pcie_bytes": 2e9}
    t = {"k_mean": 2, "work_per_micro_step": work, "device": "a100-40gb", "device_figures": figures,
         "matmul_dtype": "fp32 (tf32)", "stages": {"backward": 1.0}, "micro_step": 1.0, "optimizer_step": 1.0}
    lines = format_time(t, cfg)
    assert ("time per step (K = 2, 50 steps): 2.00 TFLOP, 3.0 GB elementwise, 12k ops, 2.00 GB over PCIe per "
            "micro-step") in lines[1]
    assert "on a100-40gb (156 TFLOPS fp32 (tf32), 1555 GB/s, PCIe 25 GB/s), seconds:" in lines[2]
    assert "on a100-40gb (19.5 TFLOPS fp32, 1555 GB/s" in format_time({**t, "matmul_dtype": "fp32"}, cfg)[2]


def test_fastest_names_the_time_as_given_as_a_multiple_of_the_fastests():
    from lowmem_alignprop.measure.reports import format_fastest

    r = {"given": {"seconds": 3.0, "needed": 9 * GIB, "fits": False}, "found": {"seconds": 1.5, "needed": 6 * GIB},
         "profile": "rtx3060", "device": "rtx3060", "images_per_step": 2, "tried": [{}] * 7, "seconds": 12.0,
         "plan": _plan(), "set": {"vae_checkpointing": "blocks"}, "profile_yaml": "budget_gb: 8\n"}
    text = format_fastest(r)
    assert "fastest that fits: 1.5 s per optimizer step (estimated), 6.00 GiB needed (75% of the budget)" in text
    assert "as given: 3 s per optimizer step, 9.00 GiB needed (does not fit); 2.00x the fastest's time" in text
    assert "as flags: --set vae_checkpointing=blocks" in text and "7 configurations estimated in 12 s" in text
    assert "approximate" not in text
    # the one approximate memory feature, when the search turns it on, is said under the flags (it was not)
    tiled = format_fastest({**r, "set": {"tiled_decode": True, "sliced_decode": False}})
    assert ("as flags: --set tiled_decode=true --set sliced_decode=false\n  tiled_decode is approximate: the VAE's "
            "GroupNorm and mid-block attention see one tile, so the images and LoRA gradients differ a little, most at "
            "the seams (docs/design.md section 3)\n") in tiled


def test_the_memory_reports_share_is_of_the_budget():
    report = _memory_report()
    report.update(budget_bytes=2 * GIB, budget_gb=2.0)
    text = memory_report_markdown(report)
    assert "| backward | 0.250 | 1.000 | 1.250 | 12.5% |" in text and "| decode | 0.125 | 0.500 | 0.500 | 6.2% |" in text

"""Faults: out-of-memory per stage (message, --auto-fit), NaN/inf rewards and gradients."""

import json
import os
import subprocess
import re
import sys
import textwrap

import pytest
import yaml
from safetensors.torch import load_file
from refusals import strict_rows as rows  # metrics.jsonl as strict JSON (no bare NaN or Infinity)

from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.run import faults
from lowmem_alignprop.memory import stages
from lowmem_alignprop.cli import main
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError

FAST = ["--profile", "cpu", "--seed", "1", "--set", "sample_prompts=0", "--set", "sample_steps=3", "--set", "k=1"]


# -- out of memory ---------------------------------------------------------------------------------

@pytest.fixture
def ladder_only(monkeypatch):
    """The fixed ladder's choices (the planner's are tested on their own below)."""
    from lowmem_alignprop.measure import planner
    monkeypatch.setattr(planner, "next_feature", lambda cfg, target, stage=None: None)


def test_oom_names_stage_budget_and_the_change_that_fits(tmp_path, capsys, monkeypatch, tiny_dir, ladder_only):
    monkeypatch.setenv(faults.INJECT_ENV, "decode@3")
    out = tmp_path / "run"
    rc = main([*FAST, "--output-dir", str(out), "--steps", "4", "--set", "budget_gb=6"])
    err = capsys.readouterr().err
    assert rc == 2
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1, err
    msg = line[0]
    assert "out of memory in stage 'decode' at step 3" in msg
    assert "6 GiB budget" in msg and "peak so far" in msg
    assert "--set sliced_decode=true" in msg and "--auto-fit" in msg
    assert f"; steps 1-2 are saved in {out / 'checkpoints' / 'step-00000002'}: --resume latest continues [" in msg
    # nothing lost: the two finished steps are in a checkpoint that --resume latest takes
    assert [r["step"] for r in rows(out)] == [1, 2]
    assert ckpt.find_resume(out, "latest").name == "step-00000002"
    # ... and trains step 3 on the prompts and K the failed attempt drew, as a run without the error does (the
    # checkpoint held the random state after them: the resume drew others)
    monkeypatch.delenv(faults.INJECT_ENV)
    assert main([*FAST, "--output-dir", str(out), "--steps", "3", "--set", "budget_gb=6", "--resume", "latest"]) == 0
    plain = tmp_path / "plain"
    assert main([*FAST, "--output-dir", str(plain), "--steps", "3", "--set", "budget_gb=6"]) == 0
    assert [(r["prompt_ids"], r["k_all"]) for r in rows(out)] == [(r["prompt_ids"], r["k_all"]) for r in rows(plain)]


def test_auto_fit_that_runs_out_of_changes_keeps_them_for_the_resume(tmp_path, capsys, monkeypatch, caplog,
                                                                       ladder_only):
    """Backward runs out of memory at step 2 whatever --auto-fit changes: it steps down until nothing is left, then
    stops with step 1 saved. Its changes were lost: config.yaml did not list them, the resume trained them silently
    and its summary said auto_fit []. Now config.yaml lists them at the stop, the line says where step 1 is and that
    the resume continues with them (not 'lower batch_size' at batch 1), and the resume says so and keeps the record."""
    monkeypatch.setenv(faults.INJECT_ENV, "backward@2*100")
    out = tmp_path / "run"
    args = [*FAST, "--output-dir", str(out), "--steps", "3", "--auto-fit", "--set", "batch_size=2"]
    assert main(args) == 2
    [err] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    made = yaml.safe_load((out / "config.yaml").read_text())["auto_fit_changes"]
    assert len(made) >= 2 and {m["step"] for m in made} == {2} and {m["stage"] for m in made} == {"backward"}
    assert "no lighter setting is left to try: lower resolution, use a smaller model" in err
    assert err.endswith(f"; step 1 is saved in {out / 'checkpoints' / 'step-00000001'}: --resume latest "
                        "continues (with --auto-fit's changes so far: config.yaml lists them) [injected out-of-memory "
                        f"in stage backward (test hook {faults.INJECT_ENV})]"), err
    monkeypatch.delenv(faults.INJECT_ENV)
    caplog.set_level("INFO", logger="lowmem_alignprop")
    assert main([*args, "--resume", "latest"]) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resume: --auto-fit's changes")]
    assert len(said) == 1 and "step 2 (backward): --set batch_size=1 --set grad_accum=2" in said[0], said
    assert json.loads((out / "summary.json").read_text())["auto_fit"] == made
    assert yaml.safe_load((out / "config.yaml").read_text())["auto_fit_changes"] == made
    assert [r["step"] for r in rows(out)] == [1, 2, 3]


def test_auto_fit_steps_down_and_continues(tmp_path, capsys, monkeypatch, tiny_dir, ladder_only, caplog):
    # the reward stage runs out of memory twice at step 2: first the micro-batch halves with twice the accumulation
    # (brightness has no layers to checkpoint: reward checkpointing, the stage's first rung, is passed over; its retry
    # changed nothing), then the VAE decoder is checkpointed; the step is repeated and the run goes on
    monkeypatch.setenv(faults.INJECT_ENV, "reward@2*2")
    caplog.set_level("INFO", logger="lowmem_alignprop")
    out = tmp_path / "run"
    assert main([*FAST, "--output-dir", str(out), "--steps", "3", "--auto-fit", "--set", "batch_size=2"]) == 0
    got = rows(out)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert len(got[0]["k_all"]) == 1 and len(got[1]["k_all"]) == 2  # 1 micro-batch of 2 -> 2 micro-batches of 1
    assert got[1]["k"] == 1 and isinstance(got[1]["k"], int)  # the same K in both: K=1 on the step line, not 1.0
    summary = json.loads((out / "summary.json").read_text())
    changes = [(c["step"], c["stage"], c["change"]) for c in summary["auto_fit"]]
    assert changes == [(2, "reward", {"batch_size": 1, "grad_accum": 2}),
                       (2, "reward", {"vae_checkpointing": "blocks"})]
    cfg = yaml.safe_load((out / "config.yaml").read_text())  # the configuration that fitted, for next time
    assert cfg["batch_size"] == 1 and cfg["grad_accum"] == 2 and cfg["reward_checkpointing"] is False
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auto-fit at step 2 (reward)")]
    assert len(said) == 2 and "this should fit: --set batch_size=1 --set grad_accum=2" in said[0]  # once each
    # memory_report describes the configuration that trained: the attempts that ran out are apart (they were two
    # more step-2 rows, their figures in the stage table and the peak)
    report = json.loads((out / "memory_report.json").read_text())
    assert [s["step"] for s in report["steps"]] == [1, 2, 3]
    assert [(s["step"], s["aborted"]) for s in report["aborted_steps"]] == [(2, "out of memory in reward")] * 2


def test_a_rung_the_run_cannot_use_is_passed_over():
    """reward_ckpt for a reward without weights (the trainer passes it in skip): the stage's next rung instead."""
    cfg = Config(batch_size=2, sample_steps=10, k=1)
    assert faults.next_fit(cfg, stages.REWARD).overrides == {"reward_checkpointing": True}
    assert faults.next_fit(cfg, stages.REWARD, skip=("reward_ckpt",)).overrides == {"batch_size": 1, "grad_accum": 2}


@pytest.mark.parametrize("stage, expected", [
    (stages.DECODE, [{"sliced_decode": True}, {"vae_checkpointing": "blocks"}, {"vae_checkpointing": "resnets"},
                     {"batch_size": 1, "grad_accum": 4}]),
    (stages.BACKWARD, [{"vae_checkpointing": "blocks"}, {"unet_checkpointing": "blocks"},
                       {"reward_checkpointing": True}, {"vae_checkpointing": "resnets"}]),
    (stages.SAMPLE_NOGRAD, [{"attention": "sliced"}, {"batch_size": 1, "grad_accum": 4}]),
    (stages.ENCODE_PROMPTS, [{"cache_prompt_embeddings": True}]),
])
def test_fit_ladder_targets_the_stage_first(stage, expected):
    import dataclasses
    cfg = Config(batch_size=2, grad_accum=2, sample_steps=10, k=1, cache_prompt_embeddings=False)
    got = []
    for _ in range(len(expected)):
        fit = faults.next_fit(cfg, stage)
        got.append(fit.overrides)
        cfg = dataclasses.replace(cfg, **fit.overrides)
    assert got == expected


def test_ladder_runs_out_and_says_so():
    import dataclasses
    cfg = Config(sample_steps=10, k=1)
    seen = 0
    while (fit := faults.next_fit(cfg, stages.BACKWARD)) is not None:
        cfg = dataclasses.replace(cfg, **fit.overrides)
        seen += 1
        assert seen < 20
    assert seen >= 5
    msg = faults.oom_message(stages.BACKWARD, 7, 3.5, 8, None, auto_fit=True)
    assert "stage 'backward' at step 7" in msg and "3.50 GiB" in msg and "no lighter setting" in msg


def test_ladder_keeps_the_deepspeed_micro_batch():
    cfg = Config(batch_size=2, sample_steps=10, k=1)
    cfg.deepspeed_zero = 2  # (validate() would need DeepSpeed installed; the ladder only reads the field)
    assert faults._smaller_batch(cfg) is None


def test_planner_suggestion_is_used_when_the_planner_offers_one():
    def says_so(cfg, target, stage):
        return "the planner says so", {"unet_checkpointing": "blocks"}

    fit = faults.next_fit(Config(sample_steps=10, k=1), stages.DECODE, suggest=says_so)
    assert fit.overrides == {"unet_checkpointing": "blocks"} and fit.description == "the planner says so"
    unusable = lambda cfg, target, stage: {"no_such_field": 1}  # noqa: E731  (the ladder decides)
    assert faults.next_fit(Config(sample_steps=10, k=1), stages.DECODE, suggest=unusable).overrides == \
        {"vae_checkpointing": "blocks"}


def test_a_load_only_suggestion_is_taken_for_an_oom_at_load_only():
    """encode_on_cpu acts while SD3/FLUX load (their prompts are encoded there): the planner's suggestion of it is
    the fit for an OOM at load; after a step's OOM the ladder decides (the prompts are encoded already)."""
    def encode_on_cpu(cfg, target, stage):
        return "encode the prompt set on the CPU", {"encode_on_cpu": True}

    cfg = Config(sample_steps=10, k=1)
    assert faults.next_fit(cfg, stages.LOAD, suggest=encode_on_cpu).overrides == {"encode_on_cpu": True}
    assert faults.next_fit(cfg, stages.DECODE, suggest=encode_on_cpu).overrides == {"vae_checkpointing": "blocks"}


def test_oom_message_carries_the_planners_change(tmp_path, capsys, monkeypatch, tiny_dir):
    from lowmem_alignprop.measure import planner
    monkeypatch.setenv(faults.INJECT_ENV, "backward@1")
    monkeypatch.setenv("LOWMEM_ALIGNPROP_PLAN_CACHE", "on")  # the check below reads the run's estimates
    out = tmp_path / "run"
    args = [*FAST, "--output-dir", str(out), "--steps", "2"]
    assert main(args) == 2
    msg = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")][0]
    from lowmem_alignprop.cli import common_parser, config_from_args
    _, cfg = config_from_args(common_parser("t", "t").parse_known_args(args)[0])
    label, change = planner.next_feature(cfg, target="cpu", stage="backward")
    assert f"this should fit: {faults.Fit(label, change).as_flags()} ({label})" in msg, msg
    # at step 1 nothing is saved, and the fix is the change above (not "run the same command again")
    assert "; no step had finished, so none is saved [" in msg and "same command" not in msg, msg


def test_an_oom_while_the_models_load_says_so_and_offers_no_auto_fit(tmp_path, capsys, monkeypatch):
    """The models do not fit: 'while the models load' (it said 'at step 0'), no step was trained, and no advice to
    rerun with --auto-fit (it said so even when --auto-fit was given; it steps down within steps, not at load)."""
    from lowmem_alignprop.measure import fastest, planner

    monkeypatch.setenv(faults.INJECT_ENV, "load")
    # the search before the first step (test_auto_fit's) and the planner's change in the message (the test below's)
    # are not what this test reads: their estimates cost ~20 s here
    monkeypatch.setattr(fastest, "before_first_step", lambda cfg, **kw: (cfg, {"skipped": "not searched here"}))
    monkeypatch.setattr(planner, "next_feature", lambda *a, **kw: None)
    out = tmp_path / "run"
    assert main([*FAST, "--output-dir", str(out), "--steps", "2", "--auto-fit"]) == 2
    [err] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert err.startswith("error: out of memory in stage 'load' while the models load (peak so far ") and \
        "--auto-fit" not in err and "at step" not in err, err
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
    # what lowers loading's memory (it advised a micro-batch of 1, which holds the same weights)
    assert ("no lighter setting is left to try: quantize the frozen base (--set base_quant=nf4, on a CUDA card) or "
            "use a smaller model, or a card with more memory") in err and "batch_size" not in err, err


def test_an_oom_in_the_optimizer_step_names_what_lowers_its_state():
    """The optimizer step holds the LoRA's gradients and Adam's moments, no activation: a smaller micro-batch (the
    advice, and --auto-fit's first rung) lowers none of it. Its rung is offloading the idle frozen modules (CUDA),
    else the state's own fixes."""
    cfg = Config(sample_steps=10, k=1, batch_size=2)
    assert faults.next_fit(cfg, stages.OPTIMIZER) is None  # (on a CPU: nothing to offload)
    message = faults.oom_message(stages.OPTIMIZER, 3, None, 8.0, None, False, batch=2)
    assert message.endswith("no lighter setting is left to try: an 8-bit optimizer state (--set optimizer=adamw8bit, "
                            "on a CUDA card) or a lower lora_rank, or a card with more memory")
    assert faults.next_fit(cfg, stages.DECODE).overrides == {"sliced_decode": True}  # (other stages: their ladder)


def test_injection_spec_and_stage_tagging():
    import contextlib
    import torch
    guard = faults.StageGuard(lambda name: contextlib.nullcontext())
    guard._inject = faults.parse_injection("backward@2*2,decode")
    guard.step = 1
    with guard.stage(stages.BACKWARD):
        pass  # not at step 1
    with pytest.raises(torch.OutOfMemoryError) as e:
        with guard.stage(stages.DECODE):
            pass
    assert faults.stage_of(e.value) == "decode"
    with pytest.raises(MemoryError) as e:  # a real error raised inside nested stages names the innermost one
        with guard.stage(stages.SAMPLE_GRAD), guard.stage(stages.REWARD):
            raise MemoryError
    assert faults.stage_of(e.value) == "reward"
    for bad in ("nowhere@1", "backward@x", "decode*many", "garbage"):  # one line (UserError): they were tracebacks
        with pytest.raises(UserError, match=rf"INJECT_OOM=.*: '{re.escape(bad)}' is not STAGE\[@STEP\]\[\*COUNT\]"):
            faults.parse_injection(bad)


# -- NaN / inf -------------------------------------------------------------------------------------

REWARD = """
import torch
calls = {{"n": 0}}

def reward(images, prompts):
    if not torch.is_grad_enabled() or images.shape[0] == 2:  # the start-up checks (two random images; the
        return images.mean(dim=(1, 2, 3))                     # training steps here have batch_size=1)
    calls["n"] += 1
    r = images.mean(dim=(1, 2, 3))
    if calls["n"] in {nan_calls}:
        return r * float("nan")
    if calls["n"] in {bad_grad_calls}:
        # finite value, infinite gradient: sqrt at 0
        return r + (images - images.detach()).abs().mean(dim=(1, 2, 3)).sqrt()
    return r
"""


def reward_module(tmp_path, monkeypatch, name, nan_calls, bad_grad_calls=()):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(REWARD.format(nan_calls=set(nan_calls) or "set()",
                                                                       bad_grad_calls=set(bad_grad_calls) or "set()")))
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:reward"


@pytest.mark.parametrize("clip", ["1.0", "0"])  # without clipping the norm was never read: the NaN update went in
def test_nan_reward_and_infinite_gradient_skip_the_step(tmp_path, caplog, monkeypatch, tiny_dir, clip):
    spec = reward_module(tmp_path, monkeypatch, f"nan_reward_a{clip.replace('.', '')}", nan_calls=[2],
                         bad_grad_calls=[4])
    out = tmp_path / "run"
    assert main([*FAST, "--output-dir", str(out), "--steps", "5", "--reward", spec, "--set", "batch_size=1",
                 "--checkpoint-every", "1", "--set", "keep_checkpoints=0", "--set", f"max_grad_norm={clip}"]) == 0
    got = {r["step"]: r for r in rows(out)}
    assert sorted(got) == [1, 2, 3, 4, 5]
    assert "reward is NaN" in got[2]["skipped"] and "gradient norm is NaN" in got[4]["skipped"]
    assert all("skipped" not in got[s] for s in (1, 3, 5))
    # the gradient's line names which LoRA tensors held the NaN/inf (read before the drop freed them); the reward's none
    found = re.fullmatch(r"(\d+) of (\d+) LoRA tensors, (from )?\S*lora_[AB]\S*( to \S*lora_[AB]\S*)?",
                         got[4]["non_finite_grads"])
    assert found and 0 < int(found[1]) <= int(found[2]), got[4]["non_finite_grads"]
    assert "non_finite_grads" not in got[2]
    assert "step 2 skipped" in caplog.text and "step 4 skipped" in caplog.text

    def w(step):
        return load_file(str(ckpt.step_dir(out / "checkpoints", step) / "trainable.safetensors"))

    def diff(a, b):
        return max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff(w(1), w(2)) == 0 and diff(w(3), w(4)) == 0  # skipped steps leave the LoRA alone
    assert diff(w(2), w(3)) > 0 and diff(w(4), w(5)) > 0  # and training goes on after them
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == [2, 4]


def test_nan_in_a_row_stops_with_a_checkpoint(tmp_path, capsys, monkeypatch, tiny_dir):
    spec = reward_module(tmp_path, monkeypatch, "nan_reward_b", nan_calls=range(3, 100))
    out = tmp_path / "run"
    rc = main([*FAST, "--output-dir", str(out), "--steps", "8", "--reward", spec, "--set", "batch_size=1",
               "--set", "max_bad_steps=3"])
    err = capsys.readouterr().err
    assert rc == 2
    msg = [x for x in err.splitlines() if x.startswith("error: ")][0]
    assert "NaN/inf in 3 steps in a row (steps 3-5)" in msg and "unchanged since step 2" in msg
    assert "--set lr=" in msg and "--resume latest" in msg
    assert "the reward was NaN/inf" in msg and "mixed_precision=bf16" not in msg  # an fp32 run: no fp16 advice
    path = ckpt.find_resume(out, "latest")
    assert path.name == "step-00000005" and str(path) in msg
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5]


def test_the_nan_stop_names_the_fixes_that_fit_what_was_not_finite():
    """The stop said 'lower the learning rate ... bf16 instead of fp16' whatever happened: a reward NaN on the
    untrained LoRA's images (steps 1-3) is the reward's own, and fp16 is named only for an fp16 run."""
    from lowmem_alignprop.run.faults import NonFiniteStreak

    untrained = NonFiniteStreak(3)
    assert not untrained.bad(1, "the reward", say=False) and not untrained.bad(2, "the reward", say=False)
    assert untrained.bad(3, "the reward", say=False)
    assert untrained.message("ckpt") == (
        "stopped: the reward was NaN/inf in 3 steps in a row (steps 1-3); the LoRA is unchanged since step 0 and "
        "saved in ckpt. Check the reward function (it scored the untrained LoRA's images NaN/inf); then --resume "
        "latest")
    trained = NonFiniteStreak(2)
    trained.bad(4, "the loss", say=False)
    trained.good()  # a finite step between: the run of bad steps starts again
    trained.bad(6, "the reward", say=False)
    trained.bad(7, "the loss", say=False)
    assert trained.message("ckpt", "fp16").endswith(
        "steps in a row (steps 6-7); the LoRA is unchanged since step 5 and saved in ckpt. Lower the learning rate "
        "(--set lr=...), or check the reward function, or use --set mixed_precision=bf16 instead of fp16; then "
        "--resume latest")
    assert trained.message("ckpt").startswith("stopped: the loss or the reward was NaN/inf in 2 steps")


def test_fp16_loss_scale_overflow_skips_the_update_and_training_goes_on(tmp_path, monkeypatch, tiny_dir,
                                                                          fresh_accelerate_state):
    """On CUDA fp16, accelerate's GradScaler starts at a scale that overflows the first backward(s): the update is
    skipped, the scale drops, training goes on, none of it counts as a diverging run, and the metrics say so. (A
    bug once bypassed the scaler on overflow, and the next step's unscale_ raised.) Here the same path runs on the
    CPU: fp16 autocast and a GradScaler whose first scale overflows for certain."""
    import torch
    from accelerate import Accelerator

    from lowmem_alignprop.training import train_setup

    def fp16_accelerator(cfg, output_dir):
        acc = Accelerator(cpu=True, mixed_precision="fp16")
        acc.native_amp = True  # as on CUDA: clip_grad_norm_ unscales through the scaler
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100, backoff_factor=2.0**-90)  # 2**100, then 1024
        return acc

    monkeypatch.setattr(train_setup, "make_accelerator", fp16_accelerator)
    out = tmp_path / "run"
    # two steps of two UNet calls (fp16 on a CPU is slow): the first overflows, the second updates (the old bug raised
    # there)
    assert main([*FAST, "--output-dir", str(out), "--steps", "2", "--set", "batch_size=1", "--set", "max_bad_steps=1",
                 "--set", "sample_steps=2", "--checkpoint-every", "1", "--set", "keep_checkpoints=0"]) == 0
    got = rows(out)
    assert [r["step"] for r in got] == [1, 2] and all("skipped" not in r for r in got)
    assert got[0]["update_skipped"] and got[0]["grad_scale"] == 1024.0
    assert got[0]["grad_norm"] is None  # infinite: null, as metrics.jsonl is strict JSON (no bare Infinity)
    assert all(not r["update_skipped"] and 0 < r["grad_norm"] < 1e3 for r in got[1:])

    def w(step):
        return load_file(str(ckpt.step_dir(out / "checkpoints", step) / "trainable.safetensors"))

    init = {k: v for k, v in w(1).items()}
    assert max((w(2)[k] - init[k]).abs().max().item() for k in init) > 0  # step 2 updated the LoRA
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fp16_overflow_skips"] == 1 and summary["skipped_steps"] == []


def test_auto_fit_can_switch_the_allocator_to_expandable_segments(tmp_path, monkeypatch, tiny_dir):
    """On a card, the planner's first step for a run with fixed allocator segments is expandable segments: the
    live allocator must be switched (not only the config), and summary.json say what it runs with."""
    from lowmem_alignprop.training import train_faults, train_setup

    calls = []

    def allocator(expandable):
        calls.append(expandable)
        return "expandable segments" if expandable else "fixed segments"
    for module in (train_setup, train_faults):  # at start-up (setup_accelerator), and --auto-fit's switch (apply_fit)
        monkeypatch.setattr(module, "configure_cuda_allocator", allocator)
    from lowmem_alignprop.measure import planner
    monkeypatch.setattr(planner, "next_feature", lambda cfg, target, stage=None: faults.Fit(
        "expandable allocator segments", {"expandable_segments": True}))
    monkeypatch.setenv(faults.INJECT_ENV, "backward@2")
    out = tmp_path / "run"
    assert main([*FAST, "--output-dir", str(out), "--steps", "2", "--auto-fit",
                 "--set", "expandable_segments=false", "--set", "batch_size=1"]) == 0
    assert calls == [False, True]  # at start-up as configured, then switched by the auto-fit
    summary = json.loads((out / "summary.json").read_text())
    assert [c["change"] for c in summary["auto_fit"]] == [{"expandable_segments": True}]
    assert summary["cuda_allocator"] == "expandable segments"
    assert yaml.safe_load((out / "config.yaml").read_text())["expandable_segments"] is True


# -- user code that exits, a gradient that never reaches the LoRA (issue 19) ---------------------------------------

EXITING = """
import os, sys, torch
calls = {"n": 0}

def reward(images, prompts):
    if not torch.is_grad_enabled() or images.shape[0] == 2:  # the start-up checks
        return images.mean(dim=(1, 2, 3))
    calls["n"] += 1
    if calls["n"] == int(os.environ.get("QA_EXIT_AT", "0")):
        kind = os.environ["QA_EXIT_KIND"]
        if kind == "exit":
            sys.exit(3)
        raise KeyboardInterrupt  # as the reward's own code raises it (the run's Ctrl-C never raises in a step)
    return images.mean(dim=(1, 2, 3))
"""


EXIT_CASES = [("exit", 2, "SystemExit: 3"),  # step 2 is the measured (profiled) step: it crashed the interpreter
              ("interrupt", 3, "KeyboardInterrupt")]
# one process trains both runs, one after the other, and prints this line before each (its stderr is split there)
EXIT_DRIVER = """
import json, os, sys
from lowmem_alignprop.cli import main
codes = {}
for kind, at, out, args in json.loads(sys.argv[1]):
    os.environ["QA_EXIT_KIND"], os.environ["QA_EXIT_AT"] = kind, str(at)
    sys.modules.pop("qa_exiting", None)  # the reward module anew: its call counter starts at 0
    print(f"=== {kind}", file=sys.stderr, flush=True)
    codes[kind] = main([*args, "--output-dir", out])
print(json.dumps(codes))
"""


@pytest.fixture(scope="module")
def exiting_runs(tmp_path_factory, tiny_dir):
    """Both cases of the test below in one subprocess (one set of imports): its stdout says what main() returned
    for each, its return code how the interpreter ended after both, and its stderr is split per run."""
    base = tmp_path_factory.mktemp("exiting")
    (base / "qa_exiting.py").write_text(EXITING)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(base), *sys.path])}
    cases = [(kind, at, str(base / kind), [*FAST, "--steps", "4", "--reward", "qa_exiting:reward", "--set",
                                           "batch_size=1"]) for kind, at, _ in EXIT_CASES]
    proc = subprocess.run([sys.executable, "-c", EXIT_DRIVER, json.dumps(cases)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]  # no crash, at exit either
    codes = json.loads(proc.stdout.splitlines()[-1])
    stderr = dict(part.split("\n", 1) for part in proc.stderr.split("=== ")[1:])
    return {kind: (codes[kind], stderr[kind], base / kind) for kind, _, _ in EXIT_CASES}


@pytest.mark.xdist_group("faults_exiting")  # the module fixture above: made once
@pytest.mark.parametrize("kind, at, named", EXIT_CASES)
def test_a_reward_that_exits_keeps_the_finished_steps_and_says_so(kind, at, named, exiting_runs):
    """sys.exit, KeyboardInterrupt or another BaseException raised by the user's reward in a step is the reward's
    failure like any other: the finished steps are saved, one line, exit 2, no crash (in a subprocess: a crash
    at exit is what is checked; both cases run in the fixture's one process)."""
    code, stderr, out = exiting_runs[kind]
    lines = [x for x in stderr.splitlines() if x.startswith("error: ")]
    assert code == 2, stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert f"step {at}: the reward 'qa_exiting:reward' raised {named}" in lines[0]
    done = "step 1 is" if at == 2 else f"steps 1-{at - 1} are"
    assert f"{done} saved in" in lines[0] and "--resume latest" in lines[0]
    assert ckpt.find_resume(out, "latest").name == f"step-{at - 1:08d}"


def test_a_reward_that_changes_the_working_directory_moves_no_file_of_the_run(tmp_path, monkeypatch, tiny_dir):
    """A relative --output-dir, and a reward that os.chdir()s away at step 2: the run's files stay where the run
    began (it wrote runc/metrics.jsonl in the new directory, failed with a traceback and left its lock)."""
    (tmp_path / "qa_chdir.py").write_text(
        "import os\ncalls = [0]\ndef reward(images, prompts):\n"
        "    calls[0] += images.requires_grad\n"
        f"    if calls[0] == 2:\n        os.chdir({str(tmp_path / 'elsewhere')!r})\n"
        "    return images.mean(dim=(1, 2, 3))\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "here").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path / "here")
    assert main([*FAST, "--output-dir", "runc", "--steps", "3", "--reward", "qa_chdir:reward", "--set",
                 "batch_size=1"]) == 0
    run = tmp_path / "here" / "runc"
    assert [r["step"] for r in rows(run)] == [1, 2, 3] and (run / "summary.json").is_file()
    assert not (run / ".run.lock").exists() and list((tmp_path / "elsewhere").iterdir()) == []


def test_a_reward_that_fails_in_step_1_says_nothing_is_saved_and_a_rerun_works(tmp_path, capsys, monkeypatch,
                                                                                 tiny_dir):
    """A failure in step 1 said only what failed: now also that no step is saved and what to do (the same command
    again, into the same folder)."""
    (tmp_path / "qa_boom_first.py").write_text(
        "import os\ndef reward(images, prompts):\n"
        "    if images.requires_grad and images.shape[0] == 1 and os.environ.get('QA_BOOM'):\n"
        "        raise ValueError('boom')\n"
        "    return images.mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("QA_BOOM", "1")
    args = [*FAST, "--output-dir", str(tmp_path / "run"), "--steps", "1", "--set", "batch_size=1",
            "--reward", "qa_boom_first:reward"]
    assert main(args) == 2
    [err] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert err == ("error: step 1: the reward 'qa_boom_first:reward' raised ValueError: boom; no step had finished, "
                   "so none is saved: run the same command again once it is fixed")
    monkeypatch.delenv("QA_BOOM")
    assert main(args) == 0


def test_a_reward_that_exits_at_start_up_is_one_line(tmp_path, capsys, monkeypatch, tiny_dir):
    """sys.exit, or a KeyboardInterrupt the reward's own code raises (not the user's Ctrl-C: that one is "interrupted",
    exit 130), in its call or at its import: one line naming the reward, exit 2."""
    (tmp_path / "qa_exit_now.py").write_text("import sys\ndef reward(images, prompts):\n    sys.exit(0)\n")
    (tmp_path / "qa_exit_import.py").write_text("import sys\nsys.exit('no GPU here')\n")
    (tmp_path / "qa_interrupt_now.py").write_text("def reward(images, prompts):\n    raise KeyboardInterrupt\n")
    (tmp_path / "qa_interrupt_import.py").write_text("raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, needle in [("qa_exit_now:reward", "raised SystemExit: 0; fix the function"),
                         ("qa_exit_import:reward", "importing module 'qa_exit_import' failed with SystemExit: no GPU"),
                         ("qa_interrupt_now:reward", "raised KeyboardInterrupt; fix the function"),
                         ("qa_interrupt_import:reward", "importing module 'qa_interrupt_import' failed with "
                                                        "KeyboardInterrupt")]:
        assert main([*FAST, "--output-dir", str(tmp_path / "run"), "--reward", spec]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err[-2000:]
        assert not (tmp_path / "run").exists()


FAILING_OUTSIDE_STEPS = """
import os, torch
calls = {"n": 0}

def reward(images, prompts):
    if not torch.is_grad_enabled():  # the start-up check, the before images, then those of the steps
        calls["n"] += 1
        if calls["n"] == int(os.environ["QA_FAIL_AT"]):
            raise KeyboardInterrupt if os.environ["QA_FAIL_KIND"] == "interrupt" else ValueError("bad image")
    return images.mean(dim=(1, 2, 3))
"""


@pytest.mark.parametrize("kind, model, sets, skipped", [
    ("interrupt", "tiny", ["--sample-every", "2", "--set", "sample_prompts=1"], "(no samples at step 2)"),
    ("error", "toy", ["--set", "fidelity_images=2", "--set", "fidelity_every=2"], "(no fidelity figures at step 2)")])
def test_a_reward_that_fails_on_the_images_between_steps_leaves_them_out_and_trains_on(kind, model, sets, skipped,
                                                                                        tmp_path, monkeypatch, caplog):
    """The reward fails (KeyboardInterrupt it raises itself, or an error) on --sample-every's images or on the toy
    world's judged ones (fidelity_every) after step 2: a warning naming the images and their fix, and every step
    trains, records and saves (before: exit 130 or 2 with no checkpoint, steps 1-2 lost, the folder unusable)."""
    import logging

    (tmp_path / f"qa_between_{kind}.py").write_text(FAILING_OUTSIDE_STEPS)  # a module of its own: its own counter
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("QA_FAIL_AT", "3")  # 1: the start-up check, 2: the before images, 3: step 2's
    monkeypatch.setenv("QA_FAIL_KIND", kind)
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    assert main([*FAST, "--model", model, "--output-dir", str(out), "--steps", "3", "--reward", f"qa_between_{kind}:reward",
                 "--set", "batch_size=1", *sets]) == 0
    warned = [r.getMessage() for r in caplog.records if skipped in r.getMessage()]
    assert len(warned) == 1, caplog.text[-2000:]
    fix = "skip the samples with --set sample_prompts=0" if kind == "interrupt" else \
        "leave them out with --set fidelity_images=0"
    assert f"raised {'KeyboardInterrupt' if kind == 'interrupt' else 'ValueError'}" in warned[0] and fix in warned[0]
    assert [r["step"] for r in rows(out)] == [1, 2, 3]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert ckpt.find_resume(out, "latest").name == "step-00000003"


def test_a_reward_failing_on_the_judged_images_after_training_keeps_the_samples_it_scored(tmp_path, monkeypatch,
                                                                                            caplog, capsys):
    """The toy world: the reward fails on the judged images after training, after the sample grid was scored. The
    warning said "(the before/after samples are left out)" and the box "after samples skipped (the reward failed on
    them)" under its own "fixed-seed samples: a -> b" line, with samples/before_after.png written. Now the warning
    names what is left out (the toy world's before/after figures), and the samples stay the run's."""
    import logging

    (tmp_path / "qa_judged_after.py").write_text(FAILING_OUTSIDE_STEPS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("QA_FAIL_AT", "5")  # 1: the start-up check, 2-3: the before samples and judged images, 4: the
    monkeypatch.setenv("QA_FAIL_KIND", "error")  # after samples, 5: the judged images after training
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    assert main([*FAST, "--model", "toy", "--output-dir", str(out), "--steps", "1", "--reward",
                 "qa_judged_after:reward", "--set", "sample_prompts=1", "--set", "fidelity_images=2"]) == 0
    warned = [r.getMessage() for r in caplog.records if "raised ValueError" in r.getMessage()]
    assert len(warned) == 1 and "while scoring the toy world's judged images: bad image" in warned[0], warned
    assert warned[0].endswith("(the toy world's before/after figures are left out)"), warned[0]
    summary = json.loads((out / "summary.json").read_text())
    assert "samples_skipped" not in summary and "toy_world" not in summary
    assert {"sample_reward_before", "sample_reward_after"} <= summary.keys()
    assert (out / "samples" / "before_after.png").is_file()
    box = capsys.readouterr().out
    assert " fixed-seed samples: " in box and "after samples skipped" not in box, box


def test_a_gradient_that_never_reaches_the_lora_stops_the_run(tmp_path, capsys, monkeypatch, tiny_dir):
    """The start-up check passes (the reward is differentiable on its test images) but on the training batches its
    gradient is exactly zero: after max_zero_grad_steps such steps in a row the run stops with a checkpoint."""
    (tmp_path / "qa_flat.py").write_text(
        "import torch\n"
        "def reward(images, prompts):\n"
        "    if not torch.is_grad_enabled() or images.shape[0] == 2:  # the start-up checks\n"
        "        return images.mean(dim=(1, 2, 3))\n"
        "    return images.mean(dim=(1, 2, 3)) * 0.0 + 1.0  # a saturated score: zero gradient\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    rc = main([*FAST, "--output-dir", str(out), "--steps", "6", "--reward", "qa_flat:reward", "--set", "batch_size=1",
               "--set", "max_zero_grad_steps=2"])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    msg = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(msg) == 1 and "LoRA's gradient was exactly zero in 2 steps in a row (steps 1-2)" in msg[0]
    assert ckpt.find_resume(out, "latest").name == "step-00000002" and "step-00000002" in msg[0]
    assert [r["step"] for r in rows(out)] == [1, 2] and all(r["grad_norm"] == 0.0 for r in rows(out))


# -- a second signal (Ctrl-C or SIGTERM) aborts ---------------------------------------------------------------------

class Aborted(Exception):
    pass


@pytest.fixture
def stop_clock(monkeypatch):
    """StopRequest with a clock the test sets and an os._exit that raises (the code it would exit with)."""
    from lowmem_alignprop.run import stop_request

    clock = {"now": 100.0}
    monkeypatch.setattr(stop_request.time, "monotonic", lambda: clock["now"])

    def fake_exit(code):
        raise Aborted(code)
    monkeypatch.setattr(stop_request.os, "_exit", fake_exit)
    monkeypatch.setattr(stop_request, "world_size", lambda: 1)
    return stop_request, clock


@pytest.mark.parametrize("first, second", [("SIGTERM", "SIGTERM"), ("SIGTERM", "SIGINT"), ("SIGINT", "SIGTERM"),
                                           ("SIGINT", "SIGINT")])
@pytest.mark.parametrize("saved", [None, 4])
def test_any_second_signal_aborts_and_says_what_is_kept(stop_clock, caplog, first, second, saved):
    """The first signal's message says how to abort (a SIGTERM's: a second SIGTERM or a Ctrl-C; it said "Ctrl-C
    again" to a scheduler's SIGTERM) and what that loses: a second signal of either kind aborts (a second SIGTERM
    never did, nor a Ctrl-C after one), once past the 2 s in which it is a launcher's echo of the first, with the exit
    code of that signal (143 for SIGTERM: it was 130 whatever the signal). The abort says what is kept: the newest
    checkpoint, or that there is none to resume (not "--resume latest")."""
    import signal as sig

    stop_request, clock = stop_clock
    released = []
    stop = stop_request.StopRequest(on_abort=lambda: released.append(True), saved=lambda: saved)
    stop._handle(getattr(sig, first), None)
    assert stop.name == first and f"{first} received: finishing this step" in caplog.text
    how = "Ctrl-C" if first == "SIGINT" else "a second SIGTERM or a Ctrl-C"
    assert f"({how} aborts: the steps since the last checkpoint are lost)" in caplog.text
    clock["now"] += 1.0
    stop._handle(getattr(sig, second), None)  # an echo: nothing happens
    assert not released
    clock["now"] += 1.5
    with pytest.raises(Aborted) as got:
        stop._handle(getattr(sig, second), None)
    assert got.value.args == (128 + int(getattr(sig, second)),) and released == [True]
    what = "Ctrl-C" if second == "SIGINT" else second
    line = caplog.records[-1].getMessage()
    if saved is None:
        assert line == (f"aborted by a second {what} before the run's first checkpoint: no step is kept, so there is "
                        "nothing to resume; start the run again (in a new --output-dir, or delete this one first)")
    else:
        assert line == (f"aborted by a second {what}: the steps after step 4 are lost; --resume latest continues from "
                        "step 4's checkpoint")
    if saved is not None:  # after training, the LoRA being written: nothing trained is lost (it said "the steps
        stop.finishing = "training is over, the LoRA and summary are being written"  # after step 4 are lost")
        assert stop.abort_message(second) == (
            f"aborted by a second {what} after training (training is over, the LoRA and summary are being written): "
            "every trained step is in step 4's checkpoint; --resume latest writes the LoRA and summary again from it")
        stop.finishing = None
    stop.writing = 5  # a checkpoint being written: it may be whole (a resume checks and publishes it)
    assert stop.abort_message(second) == (
        f"aborted by a second {what} while step 5's checkpoint was written: --resume latest continues from it if it "
        "was written whole, " + ("else no step is kept" if saved is None else "else from step 4's"))


@pytest.mark.parametrize("first, how", [("SIGINT", "Ctrl-C"), ("SIGTERM", "a second SIGTERM or a Ctrl-C")])
def test_a_first_signal_after_training_says_an_abort_loses_no_step(stop_clock, caplog, first, how):
    """A Ctrl-C while the LoRA, summary or exports are written (a FLUX.1 kohya export: a minute): its line said
    "Ctrl-C aborts: the steps since the last checkpoint are lost", and the abort's own line then "every trained step is
    in step 2's checkpoint". Both now say that nothing trained is lost."""
    import signal as sig

    stop_request, _ = stop_clock
    stop = stop_request.StopRequest(saved=lambda: 2)
    stop.finishing = "training is over, the LoRA and summary are being written"
    stop._handle(getattr(sig, first), None)
    assert caplog.records[-1].getMessage() == (
        f"\n{first} received: training is over, the LoRA and summary are being written: a moment ({how} aborts: no "
        "trained step is lost, --resume latest writes the outputs again)")


@pytest.mark.parametrize("rank", [0, 1])
def test_under_a_launcher_only_a_second_ctrl_c_aborts(stop_clock, monkeypatch, caplog, rank):
    """Under a launcher a SIGTERM after the first Ctrl-C is the launcher passing that Ctrl-C on: not an abort. A
    second Ctrl-C a scheduler sends every rank is said once, by rank 0 (every rank printed the abort's line)."""
    import signal as sig

    stop_request, clock = stop_clock
    monkeypatch.setattr(stop_request, "world_size", lambda: 2)
    monkeypatch.setattr(stop_request, "global_rank", lambda: rank)
    stop = stop_request.StopRequest()
    stop._handle(sig.SIGINT, None)
    clock["now"] += 5
    stop._handle(sig.SIGTERM, None)
    with pytest.raises(Aborted):
        stop._handle(sig.SIGINT, None)
    assert ("aborted by a second Ctrl-C" in caplog.text) == (rank == 0)


def test_a_stop_asked_of_one_rank_is_named_by_the_others_with_its_signal_and_rank(monkeypatch):
    """A scheduler's SIGTERM to rank 1 only: rank 0 said "stop request from another process received", naming
    neither the signal nor the rank. Every rank now takes the first asking rank's signal and rank."""
    import signal as sig

    import torch

    from lowmem_alignprop.run import stop_request

    monkeypatch.setattr(stop_request, "global_rank", lambda: 1)

    class TwoRanks:  # the other rank's code beside this one's, as the gather gives them (no process group here)
        num_processes, device = 2, torch.device("cpu")

        def __init__(self, other):
            self.other = other

        def gather(self, mine):
            return torch.cat([torch.tensor([self.other]), mine])

    asked, told, none = stop_request.StopRequest(), stop_request.StopRequest(), stop_request.StopRequest()
    asked._handle(sig.SIGTERM, None)  # this rank (1) got the signal, rank 0 did not
    assert asked.agreed(TwoRanks(0.0)) and asked.name == "SIGTERM"
    assert told.agreed(TwoRanks(float(sig.SIGTERM))) and told.name == "SIGTERM on rank 0"
    assert not none.agreed(TwoRanks(0.0)) and none.name is None


@pytest.mark.slow  # 13 s (a real run): the default suite has every signal pair above and test_resume's real run
def test_a_second_sigterm_aborts_a_real_run_before_its_first_checkpoint(tmp_path):
    """A scheduler's SIGTERM, then another while the step is still running (held in its reward): the run aborts
    with 130, releases its lock and says nothing of --resume (no checkpoint exists). It once ignored every signal
    after the first SIGTERM until a SIGKILL."""
    import signal as sig
    import time

    from test_resume import Gated

    run = Gated(tmp_path, "--steps", "50")
    try:
        run.held()  # inside step 2's reward; no checkpoint yet (checkpoint_every 0)
        run.proc.send_signal(sig.SIGTERM)
        run.wait_for(lambda: "SIGTERM received" in run.stderr(), "the first SIGTERM taken")
        time.sleep(2.5)  # past the launcher's echo window
        run.proc.send_signal(sig.SIGTERM)
    finally:
        code = run.finish()
    stderr = run.stderr()
    assert code == 143, stderr[-2000:]
    assert ("aborted by a second SIGTERM before the run's first checkpoint: no step is kept, so there is nothing to "
            "resume") in stderr and "--resume latest" not in stderr and "Traceback" not in stderr
    assert not (run.out / ".run.lock").exists() and not ckpt.list_checkpoints(run.out / "checkpoints")


def test_a_worker_whose_launcher_is_gone_asks_itself_to_stop(monkeypatch):
    """kill -9 of `accelerate launch` left both workers training on, orphaned, to the end: under a launcher a watch
    sees the parent process change and sends this process the SIGTERM a scheduler would (a checkpoint, then the
    end); while the launcher lives, or once the run is over (``done``), it does nothing."""
    import threading

    from lowmem_alignprop.run import stop_request

    parents = iter([stop_request.LAUNCHER_PID, stop_request.LAUNCHER_PID, 1, 1])
    stops: list[int] = []
    stop_request.watch_launcher(threading.Event(), poll_s=0.001, parent=lambda: next(parents),
                                stop=lambda: stops.append(1))
    assert stops == [1] and next(parents) == 1  # stopped at the first change, once
    done = threading.Event()
    done.set()
    stop_request.watch_launcher(done, poll_s=0.001, parent=lambda: 1, stop=lambda: stops.append(2))
    assert stops == [1]  # the run is over: nothing asked


def test_a_stop_request_during_a_periodic_checkpoint_stops_at_that_checkpoint(tmp_path, capsys):
    """Ctrl-C while a periodic checkpoint was written (seconds to minutes: the SD3.5/FLUX.1 profiles save every
    step) trained one step more and wrote another checkpoint: the request is read again once the checkpoint is
    whole, and that checkpoint is the stop's."""
    import types

    from lowmem_alignprop.run.time_limit import TimeLimit
    from lowmem_alignprop.training.train import Trainer
    from lowmem_alignprop.settings.config import Config

    asked = iter([False, True])  # nothing at the step's end; the request came during the write
    saved = []
    trainer = types.SimpleNamespace(cfg=Config(steps=10, checkpoint_every=3), accelerator=None, is_main=True,
                                    stop=types.SimpleNamespace(agreed=lambda acc: next(asked), name="SIGINT"),
                                    save_checkpoint=lambda step: saved.append(step) or tmp_path / f"step-{step}",
                                    stops_early=lambda step: False, time_limit=TimeLimit(0))
    trainer.out_of_time = lambda step, took: Trainer.out_of_time(trainer, step, took)  # (no --max-minutes)
    trainer.say_stopped = lambda path, ended: Trainer.say_stopped(trainer, path, ended)
    assert Trainer.save_if_due(trainer, 3) is True and saved == [3]
    assert f"SIGINT received: saved checkpoint {tmp_path / 'step-3'}; continue with --resume latest" in \
        capsys.readouterr().out


def test_a_stop_request_during_an_owed_evaluation_stops_at_its_checkpoint(tmp_path):
    """A resume evaluates the step whose evaluation failed first; a Ctrl-C meanwhile trained and evaluated one more
    step before it stopped: the checkpoint written with the owed evaluation is the stop's."""
    import types

    from lowmem_alignprop.training.train import Trainer
    from lowmem_alignprop.settings.config import Config

    saved, tracked = [], []
    for asked in (False, True):
        trainer = types.SimpleNamespace(
            cfg=Config(steps=10), start=3, step=4, history=[{"step": 3}], is_main=True, eval_owed=3,
            track=lambda row, step: tracked.append((row, step)),  # the evaluation's figures only: the step's were sent
            accelerator=None, folder=types.SimpleNamespace(metrics=tmp_path / "metrics.jsonl"),
            evaluate_into=lambda step, row: row.update(eval_reward=0.5), stops_early=lambda step: False,
            say_stopped=lambda path, ended: None,
            save_checkpoint=lambda step: saved.append(step) or tmp_path / f"step-{step}",
            stop=types.SimpleNamespace(agreed=lambda acc, asked=asked: asked, name="SIGINT"))
        assert Trainer.evaluate_owed(trainer) is asked and trainer.step == (3 if asked else 4)
        assert trainer.eval_owed is None and trainer.history == [{"step": 3, "eval_reward": 0.5}]
    assert saved == [3, 3] and '"eval_reward": 0.5' in (tmp_path / "metrics.jsonl").read_text()
    assert tracked == [({"eval_reward": 0.5}, 3)] * 2

"""Scale-out on CPU: 2-process data parallel (gloo), DeepSpeed ZeRO-2 with optimizer offload, ZeRO-3 with
parameter offload on 2 processes (in `-m slow`). Each run is a real ``accelerate launch`` / CLI subprocess (the plain one-process
AdamW reference runs in the test's own process), made once per module and read by several tests.

DeepSpeed compiles two ops on its first use on a machine (deepspeed_shm_comm ~40 s, cpu_adam ~85 s); they are
cached in ~/.cache/torch_extensions, after which each DeepSpeed test takes 20-60 s on 2 CPU cores.
"""

import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lowmem_alignprop.cli import main
from lowmem_alignprop.run import atomic
from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.run.distributed import build_folder, check_no_stale_build_lock, deepspeed_config
from lowmem_alignprop.run.time_limit import TimeLimit
from refusals import strict_rows

FAST = ["--profile", "cpu", "--seed", "5", "--set", "sample_prompts=0", "--set", "sample_steps=3", "--set", "k=1",
        "--set", "batch_size=1", "--set", "lr=0.01"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]
# every launch here binds accelerate's default rendezvous port: one worker runs them all, one after another
pytestmark = pytest.mark.xdist_group("launcher")
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (pip install deepspeed)")


def run(cmd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "terminate called" not in r.stderr  # process groups torn down cleanly (no gloo abort at exit)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r


def lora_b_norm(out) -> float:
    """lora_B starts at zero (peft's init): any value there was learned."""
    w = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    up = [v for k, v in w.items() if "lora_B" in k or "lora.up" in k]
    assert up
    return sum(v.abs().sum().item() for v in up)


def test_deepspeed_config_is_generated_from_the_profile():
    c = Config(deepspeed_zero=2, offload="optimizer", batch_size=3, grad_accum=4, max_grad_norm=0.5)
    ds = deepspeed_config(c, "bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in ds["zero_optimization"]
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    c3 = Config(deepspeed_zero=3, offload="params", mixed_precision="fp16")
    ds3 = deepspeed_config(c3)
    assert ds3["zero_optimization"]["stage"] == 3
    assert ds3["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds3["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds3["fp16"]["enabled"] is True
    plain = deepspeed_config(Config(deepspeed_zero=2))
    assert "offload_optimizer" not in plain["zero_optimization"]
    # accelerate must keep our DeepSpeedCPUAdam(adamw_mode=True), not swap in an L2-mode one
    assert ds["zero_force_ds_cpu_optimizer"] is False and ds3["zero_force_ds_cpu_optimizer"] is False


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, tiny_dir):
    """`accelerate launch --multi_gpu --num_processes 2`: plain data parallel, torch AdamW, 4 steps; the data-parallel
    test reads it, and the ZeRO-3 launch (same seed, ranks and steps) is compared with it."""
    out = tmp_path_factory.mktemp("ddp") / "ddp"
    run([*LAUNCH, "--multi_gpu", "--num_processes", "2", "-m", "lowmem_alignprop", *FAST, "--output-dir", str(out),
         "--steps", "4", "--set", "sample_prompts=1"])
    return out


def test_the_build_folder_is_the_one_torch_builds_and_locks_in(tmp_path, monkeypatch):
    """The stale-lock check reads torch's folder rule from public figures; torch's own (private) rule must agree."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "get_default_build_root", lambda: str(tmp_path))  # not the user's cache
    for extensions_dir in (None, str(tmp_path / "chosen")):
        if extensions_dir is None:
            monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCH_EXTENSIONS_DIR", extensions_dir)
        for op in ("cpu_adam", "deepspeed_shm_comm"):
            assert build_folder(op) == Path(cpp_extension._get_build_directory(op, verbose=False))


@needs_deepspeed
def test_a_stale_deepspeed_build_lock_is_named_not_waited_on(tmp_path, monkeypatch, capsys):
    """A DeepSpeed op build killed midway leaves torch's lock file; torch would wait on it forever."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    lock = tmp_path / "extensions" / "cpu_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    check_no_stale_build_lock()  # a build running now (another rank's, say): waited on, as torch does
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    out = tmp_path / "run"

    def waited_too_long(signum, frame):
        raise AssertionError("the run waited on the stale lock")

    # the CLI in this process (a subprocess paid ~10 s of imports), with a time limit: without the check it would
    # wait on the lock forever; the check refuses before DeepSpeed's launcher variables are set or anything loads
    # (DeepSpeed's import sets a few variables of its own: this worker's later tests get the environment back)
    before, env = signal.signal(signal.SIGALRM, waited_too_long), dict(os.environ)
    signal.alarm(300)
    try:
        rc = main([*FAST, "--set", "deepspeed_zero=2", "--set", "offload=optimizer", "--steps", "1",
                   "--output-dir", str(out)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
        os.environ.clear()
        os.environ.update(env)
    err = capsys.readouterr().err
    # (60 minutes, or one more on a host so busy that the run took a minute to reach its check)
    last = re.sub(r"stopped 6[01] minutes ago", "stopped 60 minutes ago", err.splitlines()[-1])
    assert rc == 2 and last == (
        f"error: {lock} is the lock of a DeepSpeed op build that stopped 60 minutes ago (killed or interrupted "
        f"midway); with it there this run would wait forever: delete it (rm {lock}; no build of cpu_adam is "
        "running) and run again"), err[-2000:]
    assert lock.exists()  # the user's to delete: a build on another machine sharing the folder may hold it
    assert not (out / "lora").exists() and not (out / "metrics.jsonl").exists()


def test_deepspeed_under_accelerate_launch_cpu_keeps_its_plugin_or_says_why_not(monkeypatch):
    """`accelerate launch --cpu` sets ACCELERATE_USE_CPU, with which accelerate drops the DeepSpeed plugin: the run
    died in an AttributeError on its missing config. Without CUDA the flag goes (DeepSpeed runs on the CPU anyway);
    with CUDA, one line. (The run itself: test_deepspeed_zero2_under_the_cpu_flag_trains, slow.)"""
    from lowmem_alignprop.run.distributed import keep_deepspeed_under_cpu_flag
    from lowmem_alignprop.settings.errors import UserError

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(UserError, match=r"^deepspeed_zero=2 under `accelerate launch --cpu`: accelerate runs no "
                                        r"DeepSpeed with --cpu; leave --cpu out"):
        keep_deepspeed_under_cpu_flag(2)
    assert os.environ["ACCELERATE_USE_CPU"] == "true"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    keep_deepspeed_under_cpu_flag(2)
    assert "ACCELERATE_USE_CPU" not in os.environ


def test_a_collective_that_lost_its_peer_is_told_in_the_backends_words():
    """kill -9 of one process: the others' next collective failed with a 40-line gloo traceback; it is told as
    another process having ended (the launcher's report names which), in the backend's own words, shortened."""
    from lowmem_alignprop.run.distributed import peer_lost

    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by "
                        "peer [127.0.0.1]:42918. This is typically caused by a remote worker crashing")
    assert peer_lost(gloo) == "Connection closed by peer [127.0.0.1]:42918"
    assert peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert peer_lost(ValueError("Connection closed by peer")) is None  # (not a collective's)


def test_a_process_killed_before_any_checkpoint_says_what_the_same_command_meets(tmp_path):
    """kill -9 of rank 1 in step 2 of a run without --checkpoint-every: rank 0 said "no checkpoint was written yet, so
    the run starts again", and the same command again was refused (the folder holds step 1's metrics.jsonl). Now its
    line says what that command meets: run it again (nothing finished), or delete the folder first."""
    import types

    import torch

    from lowmem_alignprop.run.runfolder import RunFolder
    from lowmem_alignprop.settings.errors import UserError
    from lowmem_alignprop.training.train import Trainer

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("", encoding="utf-8")  # (a new run's, before its first step ends)
    gone = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:6026. This is ...")
    trainer = types.SimpleNamespace(cfg=Config(steps=4), out=out, last_saved=None, all_failed=False,
                                    accelerator=types.SimpleNamespace(num_processes=2),
                                    prof=types.SimpleNamespace(end_step=lambda aborted: None),
                                    optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                    rng=types.SimpleNamespace(setstate=lambda state: None))
    trainer.keep_steps = lambda last, **kw: Trainer.keep_steps(trainer, last, **kw)
    trainer.another_process_ended = lambda e, when: Trainer.another_process_ended(trainer, e, when)

    def line(step: int) -> str:
        with pytest.raises(UserError) as stopped:
            Trainer.keep_finished_steps(trainer, gone, step, None)
        return str(stopped.value)

    ended = ("another process of the run ended (the launcher's report names it; Connection closed by peer "
             "[127.0.0.1]:6026)")
    assert line(1) == f"step 1: {ended}: no step had finished: run the same command again"
    assert RunFolder(str(out)).check() is None  # (which it can)
    (out / "metrics.jsonl").write_text('{"step": 1}\n', encoding="utf-8")
    assert line(2) == (f"step 2: {ended}: no checkpoint was written yet, so the finished steps are lost "
                       f"(--checkpoint-every N keeps them): delete {out} to start again there")
    with pytest.raises(UserError, match="delete the folder to start again there"):
        RunFolder(str(out)).check()
    trainer.last_saved = 3
    assert line(5) == f"step 5: {ended}: --resume latest continues from step 3's checkpoint"


def test_a_process_killed_while_a_checkpoint_is_written_is_one_line_naming_the_kept_one(tmp_path):
    """kill -9 of rank 1 while rank 0 wrote step 4's checkpoint (rank 1 gone from its collectives): rank 0 died in a
    40-line gloo traceback that named no checkpoint (a fault walk met it). Now one line, naming step 2's, kept."""
    import types

    from lowmem_alignprop.settings.errors import UserError
    from lowmem_alignprop.training.train import Trainer

    def write(step):
        raise failure

    trainer = types.SimpleNamespace(out=tmp_path, last_saved=2, accelerator=types.SimpleNamespace(num_processes=2),
                                    stop=types.SimpleNamespace(writing=None), write_checkpoint=write)
    trainer.another_process_ended = lambda e, when: Trainer.another_process_ended(trainer, e, when)
    failure = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:36480: Connection reset by "
                           "peer. This is typically caused by a remote worker hanging")
    with pytest.raises(UserError) as stopped:
        Trainer.save_checkpoint(trainer, 4)
    assert str(stopped.value) == ("step 4's checkpoint: another process of the run ended (the launcher's report names "
                                  "it; Read error [127.0.0.1]:36480: Connection reset by peer): --resume latest "
                                  "continues from step 2's checkpoint")
    assert trainer.last_saved == 2 and trainer.stop.writing == 4
    failure = RuntimeError("mat1 and mat2 shapes cannot be multiplied")  # (any other error: as it is)
    with pytest.raises(RuntimeError, match="mat1"):
        Trainer.save_checkpoint(trainer, 4)


def test_each_processs_k_is_listed_in_its_images_order():
    """k_all gathered process by process ([r0 m0, r0 m1, r1 m0, r1 m1]) while rewards are gathered micro-batch by
    micro-batch ([m0 r0, m0 r1, m1 r0, m1 r1]): with uniform K each image was paired with another image's K."""
    import torch

    from lowmem_alignprop.run.distributed import by_micro_batch

    gathered = torch.tensor([1, 2, 3, 10, 20, 30])  # rank 0's K of micro-batches 0-2, then rank 1's
    assert by_micro_batch(gathered, 2) == [1, 10, 2, 20, 3, 30]
    assert by_micro_batch(torch.tensor([4, 5]), 1) == [4, 5]  # one process: as drawn


def test_two_processes_data_parallel(ddp):
    out = ddp
    state = ckpt.read_state(ckpt.find_resume(out, "latest"))
    assert state["world_size"] == 2
    sums = state["rank_weight_sums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # both ranks hold the same LoRA, to the last bit
    got = strict_rows(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for r in got:
        assert r["images"] == 2  # rewards gathered from both ranks (batch 1 each)
        assert len(r["k_all"]) == 2  # and each rank's K (rank 0's alone before)
        assert r["loss"] == pytest.approx(-r["reward_mean"], abs=1e-6)  # the loss is averaged across ranks
    assert any(r["reward_std"] > 0 for r in got)  # the ranks sampled different prompts/noise
    # each rank draws its own prompts (its rank_seed): on one stream both ranks trained the same prompts every step
    assert any(r["prompt_ids"][0] != r["prompt_ids"][1] for r in got), [r["prompt_ids"] for r in got]
    assert lora_b_norm(out) > 0
    assert (out / "samples" / "before_after.png").exists()  # written once, by the main process
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["processes"], summary["device"]) == (2, "cpu")  # (the card's command is each process's; not cpu:0)


def test_a_two_process_run_resumed_in_one_says_its_steps_average_fewer_images(ddp, tmp_path, caplog):
    """2 processes -> 1: the resume says each optimizer step now averages one process's images (it said only that
    prompt order and noise differ), and the steps go on with half the images."""
    from lowmem_alignprop.cli import main

    out = tmp_path / "ddp"
    shutil.copytree(ddp, out)
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main([*FAST, "--output-dir", str(out), "--steps", "5", "--resume", "latest"]) == 0
    assert ("the checkpoint was written by 2 processes, this run has 1: an optimizer step now averages the images of "
            "one process (batch_size x grad_accum each; the learning rate is unchanged)") in caplog.text
    assert [(r["step"], r["images"]) for r in strict_rows(out)][3:] == [(4, 2), (5, 1)]


RANKS_CLOCKS = """
import os, time, torch
from lowmem_alignprop.rewards.simple import BrightnessReward
from lowmem_alignprop.run import time_limit

ahead = [0.0]
time_limit.clock = lambda: time.monotonic() + ahead[0]  # each process's own clock, as --max-minutes reads it
brightness = BrightnessReward()

def reward(images, prompts):
    if torch.is_grad_enabled() and images.shape[0] == 1:  # a training step: 10 minutes on rank 0, 16.7 on rank 1
        ahead[0] += 1000.0 if os.environ.get("RANK") == "1" else 600.0
    return brightness(images)
"""


@pytest.mark.slow  # two launches, 25-39 s of one worker: test_time_limit's in-process
# test_under_a_launcher_every_rank_takes_rank_0s_decision covers the rule every rank follows
def test_under_a_launcher_max_minutes_stops_every_rank_after_rank_0s_step_and_resumes_as_one_run(ddp, tmp_path):
    """--max-minutes 30 on 2 processes whose steps take 10 minutes on rank 0 and 16.7 on rank 1 (their clocks, as
    --max-minutes reads them, moved on by the reward): rank 0 stops after step 2 (20 + 10 + the end's minute > 30),
    and so does rank 1, which alone would have stopped after step 1 (rank 0's decision is every rank's: with each
    rank's own, the two hung in collectives that did not match, past 10 minutes). One line says it, the checkpoint
    of step 2 is kept, and --resume latest trains steps 3-4 to the LoRA the uninterrupted 4-step run (ddp) trained,
    to the bit. (The in-process test_time_limit::test_under_a_launcher_every_rank_takes_rank_0s_decision covers the
    rule.)"""
    import torch

    (tmp_path / "qa_clock.py").write_text(RANKS_CLOCKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    out = tmp_path / "run"
    cmd = [*LAUNCH, "--multi_gpu", "--num_processes", "2", "-m", "lowmem_alignprop", *FAST, "--output-dir", str(out),
           "--steps", "4", "--set", "sample_prompts=1", "--reward", "qa_clock:reward"]
    r = subprocess.run([*cmd, "--max-minutes", "30"], capture_output=True, text=True, timeout=300, env=env)
    said = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in said, said[-3000:]
    assert said.count("time limit: stopped after step 2 of 4") == 1 and "[rank 1]" not in said, said[-3000:]
    assert [row["step"] for row in strict_rows(out)] == [1, 2]
    assert ckpt.find_resume(out, "latest").name == "step-00000002"
    assert json.loads((out / "summary.json").read_text())["time_limit"]["stopped_at"] == 2
    r = subprocess.run([*cmd, "--resume", "latest", "--max-minutes", "0"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert [row["step"] for row in strict_rows(out)] == [1, 2, 3, 4]
    got, want = lora(out), lora(ddp)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


ZERO3_CLOCKS = RANKS_CLOCKS + """
from lowmem_alignprop.run import distributed

sized = distributed.size_buckets

def every_weight_partitioned(accelerator, params):  # (DeepSpeed keeps weights under 1e5 whole: all the tiny model's)
    sized(accelerator, params)
    accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0

distributed.size_buckets = every_weight_partitioned
steps_reward = reward

def reward(images, prompts):  # rank 1's reward raises on the after samples where QA_AFTER_FAILS is set
    if ahead[0] and not torch.is_grad_enabled() and os.environ.get("RANK") == "1" and os.environ.get("QA_AFTER_FAILS"):
        raise RuntimeError("rank 1 after-samples boom")
    return steps_reward(images, prompts)
"""


@pytest.mark.slow  # two ZeRO-3 launches, 50-60 s of one worker; the in-process test of the per-chunk agreement above
@needs_deepspeed  # covers the rule, test_time_limit's the rank 0 decision
def test_zero3_max_minutes_stops_both_ranks_writes_the_gathered_lora_and_resumes(ddp, tmp_path):
    """ZeRO-3 on 2 processes, every weight partitioned, --max-minutes 30 with steps of 10 minutes on rank 0 and 16.7
    on rank 1 (as in the data-parallel test above): both stop after rank 0's step 2, every rank's partition of step 2's
    checkpoint is kept, and lora/ holds the LoRA gathered whole. Rank 1's reward raises on the after samples' first
    chunk of two: every rank leaves them out (rank 1 alone did, and went on to gather the LoRA while rank 0 rendered
    the second chunk: a gloo abort, no lora/, no summary). --resume latest trains steps 3-4 to the LoRA that plain
    data parallel trains (ZeRO-3's reduction rounds otherwise: within _same_training's 1e-4)."""
    (tmp_path / "qa_clock.py").write_text(ZERO3_CLOCKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    out = tmp_path / "run"
    cmd = [*LAUNCH, "--use_deepspeed", "--zero_stage", "3", "--num_processes", "2", "-m", "lowmem_alignprop", *FAST,
           "--output-dir", str(out), "--steps", "4", "--set", "sample_prompts=33", "--reward", "qa_clock:reward"]
    r = subprocess.run([*cmd, "--max-minutes", "30"], capture_output=True, text=True, timeout=300,
                       env={**env, "QA_AFTER_FAILS": "1"})
    said = r.stdout + r.stderr
    assert r.returncode == 0 and "Traceback" not in said and "terminate called" not in said, said[-3000:]
    assert said.count("time limit: stopped after step 2 of 4") == 1, said[-3000:]
    assert "another process's scoring of the fixed-seed images failed" in said, said[-3000:]
    assert [row["step"] for row in strict_rows(out)] == [1, 2]
    saved = ckpt.find_resume(out, "latest")
    assert saved.name == "step-00000002"
    assert sorted(p.name for p in (saved / "deepspeed" / "state").iterdir()) == [
        f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt" for rank in (0, 1) for kind in ("model", "optim")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["time_limit"]["stopped_at"] == 2 and summary["samples_skipped"] == "the reward failed on them"
    whole, kept = lora(out), load_file(str(saved / "trainable.safetensors"))
    assert len(whole) == len(kept) and all(v.numel() > 0 for v in whole.values())  # gathered, not partitions
    assert sorted(v.numel() for v in whole.values()) == sorted(v.numel() for v in kept.values())
    r = subprocess.run([*cmd, "--resume", "latest", "--max-minutes", "0"], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    _same_training("zero3 stopped and resumed", out, ddp)


# the before/after samples (the trains test reads them); every run compared with the ZeRO-2 one draws them too
SAMPLES = ["--set", "sample_prompts=2"]
Z2 = ["--set", "deepspeed_zero=2", "--set", "offload=optimizer", *SAMPLES]


@pytest.fixture(scope="module")
def zero2(tmp_path_factory, tiny_dir):
    """No launcher: `lowmem-alignprop --set deepspeed_zero=2 --set offload=optimizer` runs as one process (4 steps,
    a checkpoint every 2); the trains-and-resumes test and the plain-AdamW comparison both read it."""
    out = tmp_path_factory.mktemp("z2") / "z2"
    run([sys.executable, "-m", "lowmem_alignprop", *FAST, *Z2, "--output-dir", str(out), "--steps", "4",
         "--checkpoint-every", "2"])
    return out


@pytest.mark.slow  # its fixture builds DeepSpeed's cpu_adam op on a fresh machine (150 s of one worker: the suite
# passed 15 minutes there); the config, build-folder and lock tests above stay in the default suite
@needs_deepspeed
def test_deepspeed_zero2_optimizer_offload_trains(zero2):
    assert [r["step"] for r in strict_rows(zero2)] == [1, 2, 3, 4]
    # per-step rewards of batch-1 rollouts are noisy; the fixed-seed before/after samples are not
    summary = json.loads((zero2 / "summary.json").read_text())
    assert summary["sample_reward_after"] > summary["sample_reward_before"] + 0.003, summary
    assert lora_b_norm(zero2) > 0
    ck = ckpt.find_resume(zero2, "latest")
    assert (ck / "deepspeed" / "state").is_dir() and not (ck / "optimizer.pt").exists()


@pytest.mark.slow  # one more DeepSpeed process
@needs_deepspeed
def test_deepspeed_zero2_under_the_cpu_flag_trains(tmp_path):
    """As `accelerate launch --cpu -m lowmem_alignprop --set deepspeed_zero=2` runs it (ACCELERATE_USE_CPU set): it
    trains with DeepSpeed (its checkpoint holds DeepSpeed's partitions), not an AttributeError."""
    out = tmp_path / "cpu_flag"
    r = subprocess.run([sys.executable, "-m", "lowmem_alignprop", *FAST, "--set", "deepspeed_zero=2", "--steps", "1",
                        "--output-dir", str(out)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert (ckpt.find_resume(out, "latest") / "deepspeed" / "state").is_dir()


@pytest.mark.slow  # a second DeepSpeed process (25 s); resume's own tests cover the plain optimizer's state
@needs_deepspeed
def test_deepspeed_zero2_resume_reproduces_the_steps(zero2, tmp_path):
    """Resume from step 2 (DeepSpeed's own optimizer partition files) reproduces steps 3-4."""
    got = strict_rows(zero2)
    again = tmp_path / "z2_resumed"
    shutil.copytree(zero2, again)
    shutil.rmtree(again / "checkpoints" / "step-00000004")
    run([sys.executable, "-m", "lowmem_alignprop", *FAST, *Z2, "--output-dir", str(again), "--steps", "4",
         "--resume", "latest"])
    for a, b in zip(got, strict_rows(again)):
        assert b["reward_mean"] == pytest.approx(a["reward_mean"], abs=1e-6)
    wa = load_file(str(zero2 / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    wb = load_file(str(again / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def lora(out) -> dict:
    return load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))


def _same_training(name: str, out: Path, ref_out: Path) -> None:
    """``out`` ends with the LoRA of ``ref_out`` and took the same steps. The tolerance, lr/100 = 1e-4, catches a
    wrong optimizer: Adam with L2 decay (what accelerate substituted before) moves every lora_A weight by lr = 0.01
    in the very first step."""
    ref, ref_rows = lora(ref_out), strict_rows(ref_out)
    assert max(v.abs().max().item() for k, v in ref.items() if "lora.up" in k) > 0.01  # 4 steps moved lora_B
    got = lora(out)
    assert got.keys() == ref.keys()
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert worst < 1e-4, (name, worst)
    for a, b in zip(ref_rows, strict_rows(out), strict=True):  # same rollouts, same gradients
        assert b["reward_mean"] == pytest.approx(a["reward_mean"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)


@pytest.mark.slow  # the zero2 fixture's op build, as above
@needs_deepspeed
def test_deepspeed_optimizer_offload_steps_match_plain_adamw(zero2, tmp_path):
    """Same seed, 4 optimizer steps: ZeRO-2 with optimizer offload (one process, the zero2 fixture's run; DeepSpeed's
    vectorised CPU Adam) ends with the LoRA of plain torch AdamW in one process. Measured: max |difference| 3e-7
    after 3 steps, from float rounding."""
    plain = tmp_path / "plain"  # in this process: the same run as `python -m lowmem_alignprop ...`, without imports
    assert main([*FAST, *SAMPLES, "--output-dir", str(plain), "--steps", "4"]) == 0
    _same_training("zero2", zero2, plain)


@pytest.mark.slow  # a second two-process launch (45 s); ZeRO-2 above covers the optimizer, data parallel the ranks
@needs_deepspeed
def test_deepspeed_param_offload_steps_match_plain_data_parallel(zero3, ddp):
    """ZeRO-3 with parameter offload on two processes (the zero3 fixture's launch) ends with the LoRA of plain data
    parallel on two processes (the ddp fixture's launch). Measured: max |difference| 1.1e-6 after 4 steps."""
    _same_training("zero3", zero3, ddp)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, tiny_dir):
    """`accelerate launch --use_deepspeed --zero_stage 3` with parameter and optimizer offload on 2 processes, 4
    steps; the ZeRO-3 test and the plain-AdamW comparison both read it."""
    out = tmp_path_factory.mktemp("z3") / "z3"
    # the launcher's DeepSpeed flags are taken into the config (the cpu profile has no DeepSpeed fields set)
    run([*LAUNCH, "--use_deepspeed", "--zero_stage", "3", "--offload_param_device", "cpu", "--offload_optimizer_device",
         "cpu", "--num_processes", "2", "-m", "lowmem_alignprop", *FAST, "--output-dir", str(out), "--steps", "4",
         "--set", "sample_prompts=1"])
    return out


@pytest.mark.slow  # its two-process launch: 45 s
@needs_deepspeed
def test_deepspeed_zero3_param_offload_two_processes(zero3):
    out = zero3
    saved = ckpt.read_state(ckpt.find_resume(out, "latest"))["config"]
    assert saved["deepspeed_zero"] == 3 and saved["offload"] == "params"
    got = strict_rows(out)
    assert [r["images"] for r in got] == [2, 2, 2, 2]
    assert got[-1]["reward_mean"] > got[0]["reward_mean"] + 0.003, [r["reward_mean"] for r in got]
    assert lora_b_norm(out) > 0  # read inside a ZeRO-3 gather: the partitioned LoRA is whole in the file
    state = ckpt.read_state(ckpt.find_resume(out, "latest"))
    assert state["world_size"] == 2 and state["rank_weight_sums"][0] == state["rank_weight_sums"][1]
    parts = sorted(p.name for p in (ckpt.find_resume(out, "latest") / "deepspeed" / "state").iterdir())
    assert parts == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    # the launcher's flags are recorded as the configuration's: the command trains the same under any launcher
    assert (out / "command.txt").read_text().splitlines()[0].endswith("--set deepspeed_zero=3 --set offload=params")


def test_the_launchers_deepspeed_flags_are_taken_said_in_its_terms_or_said_to_give_way(monkeypatch, caplog):
    """--zero_stage 2 --offload_param_device cpu was told "use --set deepspeed_zero=3", which then trained without the
    offload; a profile's own deepspeed_zero overrode the launcher's flags in silence."""
    from lowmem_alignprop.run.distributed import adopt_launcher_deepspeed
    from lowmem_alignprop.settings.errors import UserError

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu")
    with pytest.raises(UserError, match=r"^accelerate launch --zero_stage 2 --offload_param_device cpu: parameter "
                                        r"offload is ZeRO-3's; launch with --zero_stage 3, or leave "
                                        r"--offload_param_device out$"):
        adopt_launcher_deepspeed(Config())
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    said = "deepspeed: ZeRO-3 (offload params) from accelerate launch"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):  # rank 0 says it once for the run (each process said it)
        monkeypatch.setenv("RANK", str(rank))
        cfg = Config()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
            assert adopt_launcher_deepspeed(cfg) == {"deepspeed_zero": 3, "offload": "params"}
        assert (said in caplog.text) == (rank == 0), caplog.text
    monkeypatch.setenv("RANK", "0")
    assert (cfg.deepspeed_zero, cfg.offload) == (3, "params")
    own = Config(deepspeed_zero=2, offload="optimizer")
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert adopt_launcher_deepspeed(own) == {}
    assert (own.deepspeed_zero, own.offload) == (2, "optimizer")
    assert ("accelerate launch's DeepSpeed flags (--zero_stage 3, offload params) give way to the configuration's "
            "deepspeed_zero=2, offload=optimizer") in caplog.text


def test_bad_input_under_a_launcher_is_one_line_from_rank_0(tmp_path, tiny_dir):
    out = tmp_path / "bad"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*LAUNCH, "--multi_gpu", "--num_processes", "2", "-m", "lowmem_alignprop", *FAST,
                        "--set", "k=20", "--output-dir", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: k=20 is larger than sample_steps=3: use --set k=3 or raise sample_steps"], r.stderr[-3000:]
    assert not out.exists()


def test_an_input_error_rank_0_did_not_meet_is_printed_by_its_own_rank(monkeypatch, capsys):
    """An error every rank meets alike (bad input) is printed by rank 0 alone (the test above); rank 1 leaves it to
    rank 0 for a while, and the launcher stops it when rank 0 exits. A rank-dependent reward or prompt file can fail on
    rank 1 only: rank 0 then waits at the rendezvous, and rank 1 exited in silence (the launcher's stop of rank 0 was
    all the user saw). Still running after the wait, rank 1 says it."""
    from lowmem_alignprop import cli
    from lowmem_alignprop.settings.errors import UserError, same_on_every_rank

    waited = []
    monkeypatch.setattr(cli, "global_rank", lambda: 1)
    monkeypatch.setattr(time, "sleep", waited.append)
    with pytest.raises(UserError) as failed, same_on_every_rank():
        raise UserError("the reward 'qa:reward' failed its input check: boom")
    assert cli._report(failed.value) == 2
    assert waited == [cli.REPORT_WAIT_S]
    assert capsys.readouterr().err == "error: [rank 1] the reward 'qa:reward' failed its input check: boom\n"


ONE_RANK_FAILS = """
import os, torch
calls = {"n": 0}

def reward(images, prompts):
    if torch.is_grad_enabled() and images.shape[0] == 1:  # the training steps (not the start-up checks)
        calls["n"] += 1
        if os.environ.get("RANK") == "1" and calls["n"] == 1:
            return images.mean(dim=(1, 2, 3)) * float("nan")
        if os.environ.get("RANK") == "1" and calls["n"] == 3:
            raise RuntimeError("rank 1 boom")
    return images.mean(dim=(1, 2, 3))
"""


def _two_processes_with_reward(tmp_path, source: str, *args: str, peer_ends: bool = False,
                               launch: tuple[str, ...] = ("--multi_gpu",), timeout: int = 600
                               ) -> subprocess.CompletedProcess:
    """Two launched processes training with the reward ``source`` (module qa_rank.py, function reward) into RUN; it
    must fail, and no process may die on a closed connection (a gloo traceback: rank 0 in a collective alone;
    ``peer_ends``: one process stops alone, and another's line may quote the closed connection, without a traceback).
    ``launch``: the launcher's flags (DeepSpeed's); ``timeout``: how long it may take (a hang fails the test)."""
    (tmp_path / "qa_rank.py").write_text(source)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    # (fidelity_images=0: rank 0's judging of the toy world's images before and after, 2-4 s of each launch while the
    # other waits, is not what these test; the data-parallel run's launch judges them)
    r = subprocess.run([*LAUNCH, *launch, "--num_processes", "2", "-m", "lowmem_alignprop", *FAST,
                        "--set", "fidelity_images=0", "--reward", "qa_rank:reward", *args,
                        "--output-dir", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode != 0
    assert peer_ends or "Connection closed" not in r.stderr, r.stderr[-3000:]
    assert "[rank0]: Traceback" not in r.stderr and "[rank1]: Traceback" not in r.stderr, r.stderr[-3000:]
    return r


def test_a_reward_that_fails_on_one_process_stops_every_process_and_keeps_the_finished_steps(tmp_path, tiny_dir):
    """Rank 1's reward is NaN in step 1: every rank skips it, rank 0 alone says so (each rank said it, rank 1 as if
    its own run's). It raises in step 3: both processes stop together (each with one line: rank 1 its reward's error,
    rank 0 that another process failed), step 2 is saved for --resume latest, and no process dies on a closed
    connection (before: rank 0's gloo traceback, no checkpoint, and a folder that nothing could continue)."""
    r, out = _two_processes_with_reward(tmp_path, ONE_RANK_FAILS, "--steps", "4"), tmp_path / "run"
    # the two processes write their lines at once (they may share a line of the captured stream), and the launcher
    # may stop rank 0 once rank 1 has exited: rank 1's line is the one that must be there
    assert "error: [rank 1] step 3: the reward 'qa_rank:reward' raised RuntimeError: rank 1 boom; steps 1-2 " \
           "are saved in" in r.stderr, r.stderr[-3000:]
    assert r.stderr.count("step 1 skipped") == 1, r.stderr[-3000:]
    assert "step 1 skipped: the reward on another process is NaN or infinite" in r.stderr, r.stderr[-3000:]
    assert ckpt.find_resume(out, "latest").name == "step-00000002"
    rows = strict_rows(out)
    assert [row["step"] for row in rows] == [1, 2] and "skipped" in rows[0] and "skipped" not in rows[1], rows


ONE_RANK_EVAL_FAILS = """
import os, torch
calls = {"trained": 0}

def reward(images, prompts):
    if torch.is_grad_enabled() and images.shape[0] == 1:
        calls["trained"] += 1
    elif calls["trained"] >= 2 and os.environ.get("RANK") == "1":  # the held-out evaluation after step 2
        raise RuntimeError("rank 1 eval boom")
    return images.mean(dim=(1, 2, 3))
"""


def test_a_held_out_evaluation_that_fails_on_one_process_keeps_the_trained_steps(tmp_path, tiny_dir):
    """Each process evaluates alone: rank 1's reward raised in the evaluation after step 2 while rank 0 went on into
    the next collective and died on a closed connection, and nothing was saved (the folder could neither resume nor
    start again). Now every process hears of it: one line each, steps 1-2 saved for --resume latest."""
    r, out = _two_processes_with_reward(tmp_path, ONE_RANK_EVAL_FAILS, "--steps", "3", "--eval-every", "2"), \
        tmp_path / "run"
    assert "error: [rank 1] step 2: " in r.stderr and "rank 1 eval boom" in r.stderr, r.stderr[-3000:]
    assert "steps 1-2 are saved in" in r.stderr, r.stderr[-3000:]
    assert ckpt.find_resume(out, "latest").name == "step-00000002"
    assert [row["step"] for row in strict_rows(out)] == [1, 2]


RANK_0_METRICS_FAIL = """
import errno, os
from lowmem_alignprop.training import grid

written = grid.write_metrics_line

def refused(path, row):  # rank 0's disk turns read-only for step 2's line (rank 0 alone writes metrics.jsonl)
    if row.get("step") == 2 and os.environ.get("RANK") == "0":
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    return written(path, row)

grid.write_metrics_line = refused

def reward(images, prompts):
    return images.mean(dim=(1, 2, 3))
"""


def test_a_metrics_line_rank_0_cannot_write_stops_every_process_with_the_step_kept(tmp_path, tiny_dir):
    """metrics.jsonl refused step 2's line on rank 0 (a folder turned read-only): rank 0 stopped alone, without
    saving (one process of several), and rank 1 died in its next collective with a gloo traceback (a fault walk met
    it). Now every rank stops together, step 2 (trained) saved for --resume latest, one line each."""
    r, out = _two_processes_with_reward(tmp_path, RANK_0_METRICS_FAIL, "--steps", "3"), tmp_path / "run"
    saved = out / "checkpoints" / "step-00000002"
    assert (f"error: step 2: could not write {out / 'metrics.jsonl'}: Read-only file system; steps 1-2 are saved in "
            f"{saved}: --resume latest continues once you make --output-dir writable") in r.stderr, r.stderr[-3000:]
    assert ("error: [rank 1] step 2: another process's write of metrics.jsonl failed (its own error line says why); "
            f"steps 1-2 are saved in {saved}: --resume latest continues once it is fixed") in r.stderr, r.stderr[-3000:]
    assert ckpt.find_resume(out, "latest") == saved


@pytest.mark.slow  # a two-process launch (20 s of one worker); the metrics line's test above stops rank 0 alike
def test_a_sample_grid_rank_0_cannot_write_is_one_line_on_every_process(tmp_path, tiny_dir, monkeypatch):
    """Rank 0 alone writes --sample-every's grid: its folder turned read-only there (test hook), rank 0 said so and
    stopped, and rank 1 died in its next collective in a 40-line gloo traceback (a fault walk met it). Now rank 1
    says in one line that another process ended, and what is kept."""
    monkeypatch.setenv(atomic.INJECT_ENV, "step-000002.png:erofs")
    r = _two_processes_with_reward(tmp_path, "def reward(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n",
                                   "--steps", "3", "--sample-every", "2", "--set", "sample_prompts=1",
                                   "--checkpoint-every", "1", peer_ends=True)
    grid = tmp_path / "run" / "samples" / "step-000002.png"
    assert f"(writing {grid}): no file was half-written; make {grid.parent} writable" in r.stderr, r.stderr[-3000:]
    assert "error: [rank 1] step 2: another process of the run ended (the launcher's report names it; " in r.stderr
    assert "--resume latest continues from step 1's checkpoint" in r.stderr, r.stderr[-3000:]


RANK_0_DEEPSPEED_SAVE_FAILS = """
import errno, os
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

saved = TorchCheckpointEngine.save

def full(self, state_dict, path):  # rank 0's disk fills while DeepSpeed writes step 2's checkpoint
    if "step-00000002" in str(path) and os.environ.get("RANK") == "0":
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return saved(self, state_dict, path)

TorchCheckpointEngine.save = full

def reward(images, prompts):
    return images.mean(dim=(1, 2, 3))
"""


@needs_deepspeed
@pytest.mark.slow  # a two-process DeepSpeed launch (20 s; on a fresh machine its shm op builds first, 40 s)
def test_a_deepspeed_checkpoint_one_process_cannot_write_stops_both_at_once(tmp_path, tiny_dir):
    """ZeRO-2 on 2 processes, rank 0's write of step 2's checkpoint refused (a full disk): rank 0 waited for rank 1
    to agree while rank 1 waited in the barrier DeepSpeed's save ends with, which rank 0 had skipped; both hung,
    deaf to the launcher, to the backend's timeout (a fault walk met it). Now rank 0 stops at once, and rank 1 with
    it, one line each; step 1's checkpoint is kept for --resume latest."""
    started = time.monotonic()
    r = _two_processes_with_reward(tmp_path, RANK_0_DEEPSPEED_SAVE_FAILS, "--steps", "3", "--checkpoint-every", "1",
                                   peer_ends=True, launch=("--use_deepspeed", "--zero_stage", "2"), timeout=300)
    took, out = time.monotonic() - started, tmp_path / "run" / "checkpoints"
    assert (f"error: could not write checkpoint {out / 'step-00000002'}: the disk is full; nothing was half-written "
            f"(the previous checkpoint {out / 'step-00000001'} is intact)") in r.stderr, r.stderr[-3000:]
    assert ("error: [rank 1] step 2's checkpoint: another process of the run ended (the launcher's report names it; "
            in r.stderr) and "continues from step 1's checkpoint" in r.stderr, r.stderr[-3000:]
    assert "Unable to shutdown" not in r.stderr, f"the launcher had to kill a process ({took:.0f} s)"
    assert ckpt.find_resume(tmp_path / "run", "latest") == out / "step-00000001"


def test_outputs_rank_0_cannot_write_stop_every_process_with_one_line_each(tmp_path, tiny_dir, monkeypatch):
    """Rank 0 alone writes the LoRA and summary after the last step: its folder turned read-only there (test hook), it
    said so, and rank 1, waiting at the barrier after them, died on the closed connection in a 40-line gloo traceback
    (a fault walk met it). Now rank 1 hears of it: one line each, and the last step's checkpoint is kept."""
    monkeypatch.setenv(atomic.INJECT_ENV, "summary.json:erofs")
    r = _two_processes_with_reward(tmp_path, "def reward(images, prompts):\n    return images.mean(dim=(1, 2, 3))\n",
                                   "--steps", "1")
    saved = tmp_path / "run" / "checkpoints" / "step-00000001"
    assert f"error: could not write {tmp_path / 'run' / 'summary.json'}: Read-only file system (test hook " \
           f"{atomic.INJECT_ENV}); the trained weights are safe in checkpoint {saved}" in r.stderr, r.stderr[-3000:]
    assert "error: [rank 1] another process's write of the LoRA, samples and summary failed (its own error line " \
           "says why)" in r.stderr, r.stderr[-3000:]
    assert ckpt.find_resume(tmp_path / "run", "latest") == saved


@pytest.mark.slow  # a two-process launch (20-25 s of one worker): the held-out test above covers agreed_failure
def test_a_reward_failing_its_start_up_test_on_one_process_is_one_line_each(tmp_path, tiny_dir):
    """Rank 1's reward fails the test before training (no gradient): rank 0 went on into its next collective and
    died there with a gloo traceback; now it stops with rank 1, one line each, and no folder is left."""
    source = ("import os, torch\ndef reward(images, prompts):\n"  # (it passes the input check, with gradient)
              "    if os.environ.get('RANK') == '1' and not torch.is_grad_enabled():\n"
              "        raise ValueError('rank 1 start boom')\n    return images.mean(dim=(1, 2, 3))\n")
    r = _two_processes_with_reward(tmp_path, source, "--steps", "1")
    assert "error: [rank 1] " in r.stderr and "rank 1 start boom" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_the_ranks_stop_early_together_when_one_ranks_evaluation_says_so(monkeypatch, tmp_path):
    """Each rank evaluates alone and decides the early stop from its own numbers (alike on like cards): at an
    evaluation step every rank follows rank 0, whose count its checkpoint keeps; a rank whose own count had not run
    out stops with it (alone, a rank would have left the others waiting in the next step's collectives), and one
    whose count ran out alone goes on. Between evaluations nothing is asked."""
    import types

    from lowmem_alignprop.training.evaluation import HeldOut
    from lowmem_alignprop.training.train import Trainer
    from lowmem_alignprop.run import distributed
    from lowmem_alignprop.settings.config import Config

    asked, rank_0 = [], [True]
    monkeypatch.setattr(distributed, "rank_0_says", lambda acc, flag: asked.append(flag) or rank_0[0])
    cfg = Config(steps=10, eval_every=2, early_stop=2)
    trainer = types.SimpleNamespace(cfg=cfg, accelerator=types.SimpleNamespace(num_processes=2), is_main=False,
                                    stop=types.SimpleNamespace(agreed=lambda acc: False, name=None),
                                    save_checkpoint=lambda step: tmp_path / f"step-{step}",
                                    held_out=HeldOut(cfg, ["a"], tmp_path, sample=None, write_lora=None))
    trainer.stops_early = lambda step: Trainer.stops_early(trainer, step)
    trainer.time_limit = TimeLimit(0)  # (no --max-minutes: its check asks no rank)
    trainer.out_of_time = lambda step, took: Trainer.out_of_time(trainer, step, took)
    trainer.say_early_stop = lambda step: None  # (rank 0 says it)
    assert Trainer.save_if_due(trainer, 3) is False and asked == []  # no evaluation at step 3
    assert Trainer.save_if_due(trainer, 4) is True and asked == [False]  # this rank's own count: not yet
    assert trainer.held_out.stopped_at == 4
    rank_0[0] = False  # this rank's count ran out (above), rank 0's did not: on
    assert Trainer.save_if_due(trainer, 6) is False and asked == [False, True] and trainer.held_out.stopped_at is None


class RenderingRank:
    """One of the ranks that render ZeRO-3's fixed-seed images together, in this process: RunSamples.generate on
    stand-ins (each chunk's rollout counted), distributed.worst_rank patched to report ``others`` (2: another rank's
    chunk failed) and record what this rank told (``told``); ``own``: this rank's reward error; ``in_rollout``: run
    in the first chunk's rollout (a signal arriving there)."""

    def __init__(self, monkeypatch):
        import types

        import torch

        from lowmem_alignprop.run import distributed
        from lowmem_alignprop.training.train_samples import RunSamples

        self.others, self.own, self.told, self.rollouts, self.in_rollout = 0, None, [], [], lambda: None
        monkeypatch.setattr(distributed, "worst_rank", lambda acc, code: self.told.append(code) or max(code,
                                                                                                      self.others))

        def rollout(*args, **kw):
            self.rollouts.append(1)
            if len(self.rollouts) == 1:
                self.in_rollout()
            return args[4]

        def score(images, prompts, when, fix):
            if self.own is not None:
                raise self.own
            return images.mean(dim=(1, 2, 3))

        family = types.SimpleNamespace(initial_latents=lambda cfg, n, g, device: torch.zeros(n, 4, 8, 8),
                                       rollout=rollout,
                                       decode=lambda vae, lat, cfg, sliced: torch.full((lat.shape[0], 3, 64, 64), 0.5))
        place = types.SimpleNamespace(to_device=lambda name, module: None, park=lambda name, module: None)
        self.rank = types.SimpleNamespace(
            cfg=Config(), place=place, device=torch.device("cpu"), family=family, nograd_unet=None, scheduler=None,
            accelerator=types.SimpleNamespace(autocast=contextlib.nullcontext, num_processes=2), vae=None, reward=None,
            embed=lambda prompts: torch.zeros(len(prompts), 2, 8), score=score, render_together=True,
            stop=types.SimpleNamespace(raise_if_agreed=lambda acc: None))
        self.generate = lambda prompts, seed: RunSamples.generate(self.rank, prompts, seed)

    def render(self):
        """The two prompts' images, a chunk each."""
        from lowmem_alignprop.training.evaluation import render_fixed_seed

        self.rollouts.clear()
        self.told.clear()
        return render_fixed_seed(self.generate, ["a", "b"], 7, chunk=1, per_image=True)


def test_under_zero3_a_reward_failing_on_one_rank_in_the_sample_grid_stops_every_ranks_render_at_that_chunk(
        monkeypatch):
    """ZeRO-3 on several processes renders the fixed-seed images together (each chunk's rollout gathers the
    partitioned weights from every rank). Rank 1's reward raised on the after samples' first chunk of two: it went on
    to write the LoRA while rank 0 rendered the second chunk, and the two met in collectives that did not match (a
    ZeRO-3 walk met it: a gloo abort, no lora/, no summary). Now each chunk's outcome is agreed before the next: the
    rank whose own reward worked raises AnotherProcessFailed after the first chunk (the callers then skip the
    samples together, as they do for one process's failed reward), and no rank renders the second."""
    from lowmem_alignprop.run.faults import AnotherProcessFailed
    from lowmem_alignprop.settings.errors import UserError

    ranks = RenderingRank(monkeypatch)
    images, rewards = ranks.render()  # every rank's reward worked: both chunks, each agreed
    assert (len(ranks.rollouts), ranks.told, rewards.tolist()) == (2, [0, 0], [0.5, 0.5])
    ranks.others = 2  # the other rank's reward raised on the first chunk
    with pytest.raises(AnotherProcessFailed, match=r"^another process's scoring of the fixed-seed images failed"):
        ranks.render()
    assert (len(ranks.rollouts), ranks.told) == (1, [0])  # the second chunk is not rendered
    ranks.own = UserError("the reward 'r' raised RuntimeError: boom")  # this rank's own: its own line
    with pytest.raises(UserError, match="boom"):
        ranks.render()
    assert (len(ranks.rollouts), ranks.told) == (1, [2])  # the others heard of it before their second chunk
    ranks.rank.render_together = False  # one process, or no ZeRO-3 (each rank renders alone): nothing asked
    with pytest.raises(UserError, match="boom"):
        ranks.render()
    assert ranks.told == []


def test_under_zero3_a_stop_request_skips_the_after_samples_on_every_rank_at_the_same_chunk(monkeypatch):
    """A Ctrl-C while ZeRO-3's processes rendered the after samples together raised at once wherever each process
    was (the after samples' raise_now): one left a weight gather the other still waited in, and the run that had
    trained every step ended in a gloo abort and the launcher's failure report (a ZeRO-3 walk met it). Now the signal
    is raised at the end of the chunk being rendered, on every process together (a stop request of any one of them,
    agreed); and a request that came before the after samples skips them on every process, not on its own alone."""
    import signal
    import types

    from lowmem_alignprop.run import distributed
    from lowmem_alignprop.run.stop_request import StopRequest
    from lowmem_alignprop.training.train_outputs import RunOutputs

    asked = {}  # each rank's stop code (distributed.first_rank_with's): the other rank's, and this one's as asked
    monkeypatch.setattr(distributed, "first_rank_with", lambda acc, code: next(
        ((rank, c) for rank, c in sorted({**asked, 0: code}.items()) if c), None))
    ranks = RenderingRank(monkeypatch)
    stop = ranks.rank.stop = StopRequest()
    trainer = types.SimpleNamespace(stop=stop, accelerator=ranks.rank.accelerator, render_together=True, step=4,
                                    cfg=Config(steps=4), held_out=None, before=object(), samples_skipped=None,
                                    grid_of=None, last_update=4, fidelity_before=None, is_main=True,
                                    render_or_skip=lambda render, what, smaller: render(), render_samples=ranks.render)
    ranks.in_rollout = lambda: stop._handle(signal.SIGINT, None)  # Ctrl-C in the first chunk's rollout
    assert RunOutputs.sample_after(trainer) is None
    assert trainer.samples_skipped == "SIGINT while they were rendered"
    # the first chunk was rendered to its end and its outcome agreed (as on every rank), then the stop; no second
    assert (len(ranks.rollouts), ranks.told) == (1, [0])
    assert not stop.raise_now and not stop.raise_together
    # a SIGTERM a scheduler sent rank 1 alone, before the after samples: this rank renders none either
    stop, asked[1] = StopRequest(), int(signal.SIGTERM)
    trainer.stop, trainer.samples_skipped, ranks.in_rollout = stop, None, lambda: None
    ranks.rollouts.clear()
    assert RunOutputs.sample_after(trainer) is None and ranks.rollouts == []
    assert trainer.samples_skipped == "SIGTERM on rank 1 at the run's last step"


@contextlib.contextmanager
def ctrl_c_in(seconds: float):
    """A SIGINT to this process after ``seconds`` (from a timer thread; Python runs its handler in the main thread)."""
    import signal
    import threading

    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


@pytest.fixture
def terminal_sigint():
    """SIGINT as a terminal's Ctrl-C finds it (Python's KeyboardInterrupt handler): a process started in the
    background by a non-interactive shell (`pytest ... &` in a script) inherits SIGINT ignored, which the commands
    leave so (nohup's meaning), and the Ctrl-C these tests send would be lost."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_a_rank_waiting_for_the_others_takes_ctrl_c_at_once(monkeypatch, terminal_sigint):
    """Before the first step the ranks wait for rank 0's before samples at a barrier polled from Python: a Ctrl-C (the
    launcher's SIGINT) there raises the CtrlC that ends the command as "interrupted", while the barrier is still
    open (a rank past it took the signal as a stop request, began a step and died in its collective, with rank 0
    gone, in a 60-line traceback). A barrier that completes returns; its error is raised."""
    import types

    import torch

    from lowmem_alignprop.run import distributed
    from lowmem_alignprop.run.stop_request import CtrlC, telling_ctrl_c

    class Work:
        def __init__(self, polls: int | None):
            self.polls, self.waited = polls, False

        def is_completed(self):
            if self.polls is None:  # (the others never come: the signal must end it; a lost one fails, not hangs)
                self.waited_polls = getattr(self, "waited_polls", 0) + 1
                assert self.waited_polls < 2000, (
                    f"the SIGINT did not end the wait: its handler {signal.getsignal(signal.SIGINT)}, pending "
                    f"{signal.sigpending()}, blocked {signal.pthread_sigmask(signal.SIG_BLOCK, [])}")
                return False
            self.polls -= 1
            return self.polls < 0

        def wait(self):
            self.waited = True

    works = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda async_op: works[-1])
    two = types.SimpleNamespace(num_processes=2)
    works.append(Work(3))
    distributed.wait_for_every_rank(two)
    assert works[-1].waited and works[-1].polls < 0
    works.append(Work(None))  # the others never come: only the signal ends the wait
    with telling_ctrl_c(), pytest.raises(CtrlC):  # (the handler set before the timer runs: it cannot come first)
        with ctrl_c_in(0.3):
            distributed.wait_for_every_rank(two)
    assert not works[-1].waited
    distributed.wait_for_every_rank(types.SimpleNamespace(num_processes=1))  # one process: nothing to wait for

    # the tiny collectives of every step and of a checkpoint's write are polled alike: a rank waiting there for one
    # that writes the checkpoint takes a scheduler's second Ctrl-C as that one does (it died in gloo's C++, in a
    # 40-line "Connection closed by peer" traceback, once the writer had aborted)
    def all_gather(every, mine, async_op):
        assert async_op
        for rank, t in enumerate(every):
            t.copy_(mine + rank)  # rank 1 holds its value + 1
        return works[-1]

    monkeypatch.setattr(torch.distributed, "all_gather", all_gather)
    two.device = torch.device("cpu")
    works.append(Work(2))
    assert distributed.worst_rank(two, 3) == 4 and works[-1].waited
    works.append(Work(0))
    assert distributed.rank_0_says(two, True) is True and distributed.all_ranks_ok(two, True) is False
    works.append(Work(None))
    with telling_ctrl_c(), pytest.raises(CtrlC):
        with ctrl_c_in(0.3):
            distributed.all_ranks_ok(two, True)
    assert not works[-1].waited

"""One run per output folder: a live run's folder is refused (train and --resume), a killed run's lock is
taken over, the default folder moves on past a live run, and a run leaves no lock (or empty folder) behind."""

import json
import logging
import socket
import subprocess
import sys

import pytest

from lowmem_alignprop import runlock
from lowmem_alignprop.cli import _next_free_output_dir, main
from lowmem_alignprop.config import Config

FAST = ["--profile", "cpu", "--set", "sample_prompts=0", "--set", "sample_steps=2", "--set", "k=1", "--steps", "1"]


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(folder, pid):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / runlock.LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                        "started": "2026-11-26 10:00:00"}))


def test_a_live_run_folder_is_refused_for_training_and_for_resume(tmp_path, capsys, live_pid):
    out = tmp_path / "run"
    write_lock(out, live_pid)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # the live run's first row
    before = sorted(p.name for p in out.iterdir())
    for extra in ([], ["--resume", "latest"]):
        assert main([*FAST, "--output-dir", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"another run is writing to {out} (pid {live_pid}" in err, err
        assert "choose another --output-dir" in err and str(out / runlock.LOCK_NAME) in err
    assert sorted(p.name for p in out.iterdir()) == before  # the live run's files are untouched
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_killed_runs_lock_is_taken_over_and_a_finished_run_leaves_none(tmp_path, caplog):
    out = tmp_path / "run"
    write_lock(out, dead_pid())
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main([*FAST, "--output-dir", str(out)]) == 0
    assert "left by a run that no longer exists" in caplog.text
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not list(out.glob(runlock.LOCK_NAME + "*"))


def test_bad_input_found_after_the_lock_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "run"  # --resume of a run that does not exist fails once the lock is taken
    assert main([*FAST, "--output-dir", str(out), "--resume", "latest"]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_the_default_folder_moves_past_a_live_run(tmp_path, live_pid, caplog):
    base = tmp_path / "outputs" / "run"
    write_lock(base, live_pid)
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        cfg = _next_free_output_dir(Config(output_dir=str(base)))
    assert cfg.output_dir == str(tmp_path / "outputs" / "run-2")
    assert "a run still going" in caplog.text
    write_lock(base, dead_pid())  # a killed run's folder without a checkpoint or metrics is free again
    assert _next_free_output_dir(Config(output_dir=str(base))).output_dir == str(base)


def test_the_ranks_of_one_launch_share_rank_0s_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with runlock.RunLock(tmp_path / "run"):
        assert runlock.holder(tmp_path / "run") is None  # rank 1 of this launch writes there with rank 0
        monkeypatch.setenv("MASTER_PORT", "29501")  # another launch on this host
        assert runlock.holder(tmp_path / "run")["pid"] == runlock.os.getpid()
        with pytest.raises(runlock.UserError, match="another run is writing"):
            runlock.RunLock(tmp_path / "run").__enter__()
    assert not (tmp_path / "run").exists()  # the run wrote nothing: no trace

"""One run per output folder: a live run's folder is refused (train and --resume), a killed run's lock is
taken over, the default folder moves on past a live run, and a run leaves no lock (or empty folder) behind."""

import json
import os
import logging
import socket
import subprocess
import sys
import time

import pytest

from lowmem_alignprop.run import runlock
from lowmem_alignprop.cli import main
from lowmem_alignprop.settings.config import Config, build_config
from lowmem_alignprop.run.runfolder import RunFolder

FAST = ["--profile", "cpu", "--set", "sample_prompts=0", "--set", "sample_steps=2", "--set", "k=1", "--steps", "1"]


HOLD = ("import sys, time\n"
        "from lowmem_alignprop.run.runlock import RunLock\n"
        "locks = [RunLock(d).acquire() for d in sys.argv[1:]]\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n")


@pytest.fixture
def live_run():
    """hold(folder, ...): another process holds the folders' locks, as a live run does, until the test ends."""
    procs = []

    def hold(*folders):
        proc = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, folders)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc.pid

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def leftover_lock(folder):
    """The lock file a killed run leaves: its content, but no process holds the lock any more."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / runlock.LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": socket.gethostname(),
                                                        "started": "2026-11-26 10:00:00"}))


def test_a_live_run_folder_is_refused_for_training_and_for_resume(tmp_path, capsys, live_run):
    out = tmp_path / "run"
    live_pid = live_run(out)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # the live run's first row
    before = sorted(p.name for p in out.iterdir())
    for extra in ([], ["--resume", "latest"]):
        assert main([*FAST, "--output-dir", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"another run is writing to {out} (pid {live_pid}" in err, err
        fix = (f"stop it (Ctrl-C, or kill {live_pid}: it saves its finished steps) and resume then" if extra else
               "choose another --output-dir")  # resuming: stop it, not move to a folder without its checkpoints
        assert err.rstrip().endswith(fix), err
    assert sorted(p.name for p in out.iterdir()) == before  # the live run's files are untouched
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_killed_runs_lock_is_taken_over_and_a_finished_run_leaves_none(tmp_path, caplog):
    out = tmp_path / "run"
    leftover_lock(out)
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main([*FAST, "--output-dir", str(out)]) == 0
    assert "left by a run that no longer runs: taking it over" in caplog.text
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not list(out.glob(runlock.LOCK_NAME + "*"))


def test_bad_input_found_after_the_lock_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "run"  # --resume of a run that does not exist fails once the lock is taken
    assert main([*FAST, "--output-dir", str(out), "--resume", "latest"]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def _next_free_output_dir(cfg):
    folder = RunFolder(cfg.output_dir, numbered=True)  # the default folder, not one the user named
    folder.move_past_an_earlier_run()
    return folder.with_output_dir(cfg)


def test_the_default_folder_moves_past_a_live_run(tmp_path, live_run, caplog):
    base = tmp_path / "outputs" / "run"
    live_run(base)
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        cfg = _next_free_output_dir(Config(output_dir=str(base)))
    assert cfg.output_dir == str(tmp_path / "outputs" / "run-2")
    assert "a run still going" not in caplog.text  # said once the run holds its folder (its inputs checked)
    folder = RunFolder(str(base), numbered=True)
    folder.move_past_an_earlier_run()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"), folder.hold():
        assert f"{base} holds an earlier run (a run still going): this run writes to {base}-2" in caplog.text
    leftover_lock(tmp_path / "outputs" / "old")  # a killed run's folder without a checkpoint or metrics is free
    assert _next_free_output_dir(Config(output_dir=str(tmp_path / "outputs" / "old"))).output_dir == \
        str(tmp_path / "outputs" / "old")


def test_a_default_folder_taken_a_moment_ago_moves_on_to_the_next(tmp_path, live_run):
    """Two runs started together both choose outputs/run; the one that loses the lock goes to outputs/run-2."""
    from lowmem_alignprop.training.train import train

    base = tmp_path / "outputs" / "run"
    live_run(base)  # the other run took it after this one chose it
    cfg = build_config({"resolution": 64}, {"output_dir": str(base), "steps": 1},
                       {"sample_prompts": 0, "sample_steps": 2, "k": 1})
    summary = train(cfg, folder=RunFolder(cfg.output_dir, numbered=True))
    assert summary["output_dir"] == str(tmp_path / "outputs" / "run-2")
    assert (tmp_path / "outputs" / "run-2" / "lora").is_dir() and not (base / "lora").exists()
    with pytest.raises(runlock.LockTaken, match="another run is writing to"):  # a folder the user chose: refused
        train(cfg)


def test_exactly_one_of_several_runs_takes_a_leftover_lock(tmp_path):
    """A killed run's lock file, and four runs (say four --resume latest) starting at the same instant."""
    out = tmp_path / "run"
    leftover_lock(out)
    code = ("import sys, time\n"
            "from lowmem_alignprop.run.runlock import RunLock, LockTaken\n"
            "start = float(sys.argv[2])\n"
            "time.sleep(max(0, start - time.time()))\n"
            "try:\n"
            "    RunLock(sys.argv[1]).acquire(); print('held', flush=True)\n"
            "    deadline = time.time() + 120\n"
            "    while not os.path.exists(sys.argv[3]) and time.time() < deadline:\n"
            "        time.sleep(0.05)\n"  # the holder keeps the lock until every run has answered
            "except LockTaken:\n"
            "    print('taken', flush=True)\n")
    code = code.replace("import sys, time", "import os, sys, time")
    for attempt in range(3):
        start, release = time.time() + 2.0, tmp_path / f"release-{attempt}"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(out), str(start), str(release)],
                                  stdout=subprocess.PIPE, text=True) for _ in range(4)]
        results = sorted(p.stdout.readline().strip() for p in procs)  # each run's answer, however late it started
        release.touch()
        for p in procs:
            p.communicate(timeout=60)
        assert results == ["held", "taken", "taken", "taken"], results
        leftover_lock(out)


def test_the_ranks_of_one_launch_share_rank_0s_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with runlock.RunLock(tmp_path / "run"):
        assert runlock.holder(tmp_path / "run") is None  # rank 1 of this launch writes there with rank 0
        monkeypatch.setenv("MASTER_PORT", "29501")  # another launch on this host
        assert runlock.holder(tmp_path / "run")["pid"] == runlock.os.getpid()
        with pytest.raises(runlock.LockTaken, match="another run is writing"):
            runlock.RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run").exists()  # the run wrote nothing: no trace


def test_an_evaluation_holds_its_folder_too(tmp_path, live_run, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main([*FAST, "--output-dir", str(run)]) == 0
    monkeypatch.chdir(tmp_path)
    live_run(tmp_path / "outputs" / "sample")  # another evaluation is writing there
    args = ["sample", "--profile", "cpu", "--set", "sample_steps=2", "--num-prompts", "1", "--lora", str(run)]
    assert main(args) == 0
    assert (tmp_path / "outputs" / "sample-2" / "sample_results.json").is_file()
    assert not (tmp_path / "outputs" / "sample" / "sample_results.json").exists()
    capsys.readouterr()
    assert main([*args, "--output-dir", "outputs/sample"]) == 2  # a folder named by the user: refused
    assert "another run is writing to outputs/sample" in capsys.readouterr().err


def test_windows_a_killed_runs_lock_is_taken_over_by_its_pid(tmp_path, caplog, monkeypatch):
    """Without fcntl (Windows) a leftover lock is judged by its pid, and there os.kill(pid, 0) is no test: it sends a
    Ctrl-C event and fails for a dead pid with an OSError that read as "alive" (the folder stayed refused for good).
    Simulated here: no fcntl, os.kill as Windows answers a dead pid, and psutil's process query as Windows makes it
    (OpenProcess, no signal: here the process table)."""
    import psutil

    def windows_kill(pid, sig):
        raise OSError(22, "The parameter is incorrect", None, 87)

    monkeypatch.setattr(runlock, "fcntl", None)
    monkeypatch.setattr(runlock.os, "kill", windows_kill)
    monkeypatch.setattr(psutil, "pid_exists", lambda pid: os.path.exists(f"/proc/{pid}"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    assert not runlock.pid_alive(pid) and runlock.pid_alive(os.getpid())
    out = tmp_path / "run"
    leftover_lock(out)  # its pid: gone
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main([*FAST, "--output-dir", str(out)]) == 0
    assert "left by a run that no longer runs: taking it over" in caplog.text


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts this process's open files in /proc")
def test_a_released_lock_closes_its_file(tmp_path):
    """release() gives the lock file's descriptor back: a process that trains many runs in a row (the toy world, a
    notebook) keeps no file open per run."""
    before = len(os.listdir("/proc/self/fd"))
    for n in range(5):
        with runlock.RunLock(tmp_path / f"run-{n}"):
            assert len(os.listdir("/proc/self/fd")) == before + 1
    assert len(os.listdir("/proc/self/fd")) == before

"""Room on the output disk, checked before the first step (run/disk_space.py): the estimate bounds what a real run
writes, a disk without room for the last checkpoint and LoRA stops the run before it trains a step (with
checkpoint_every 0, the default, that checkpoint is the run's only one: a full disk at the end lost every step), and
one that may fill up is warned of."""

from __future__ import annotations

import collections
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lowmem_alignprop.cli import main
from lowmem_alignprop.measure import planner
from lowmem_alignprop.memory.allowances import fmt_bytes
from lowmem_alignprop.measure.reports import format_plan
from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.run import disk_space
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError

FAST = ["--profile", "cpu", "--seed", "3", "--set", "sample_steps=3", "--set", "k=1", "--set", "batch_size=1",
        "--set", "sample_prompts=0"]
Usage = collections.namedtuple("Usage", "total used free")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_with_free_space(monkeypatch, free_of):
    """The run's own estimate goes to ``free_of(need)``, which says how much is free."""
    made, real = [], disk_space.run_bytes
    monkeypatch.setattr(disk_space, "run_bytes", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    monkeypatch.setattr(disk_space, "free_bytes", lambda folder: free_of(made[-1]))
    return made


def test_the_estimate_bounds_each_checkpoint_and_the_lora_a_run_writes(tmp_path, tiny_dir, monkeypatch, caplog):
    """A 3-step run with an EMA and a checkpoint at every step, all kept: each checkpoint is no larger than the
    estimate, and the estimate's tensors (weights, AdamW's two moments, the EMA's copy twice: its state and by name) are the checkpoint's to within
    the files' headers; lora/ is the trained weights' size to within its header; plan says the same figures. Its disk
    (as the run is told) has room for the last checkpoint and the LoRA but not for all three: a warning, and the run
    goes on."""
    run_with_free_space(monkeypatch, lambda need: need.least)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main([*FAST, "--output-dir", str(out), "--steps", "3", "--set", "checkpoint_every=1",
                     "--set", "keep_checkpoints=0", "--set", "ema_decay=0.9"]) == 0
    warned = [r.getMessage() for r in caplog.records if "may fill the disk" in r.getMessage()]
    assert len(warned) == 1 and "3 checkpoints of" in warned[0] and "keep_checkpoints=1" in warned[0], warned
    trained = list(load_file(str(out / "checkpoints" / "step-00000001" / "trainable.safetensors")).values())
    cfg = Config(steps=3, checkpoint_every=1, keep_checkpoints=0, ema_decay=0.9)
    need = disk_space.run_bytes(cfg, trained)
    n = sum(t.numel() for t in trained)
    assert need.weights == 4 * n and need.optimizer == 8 * n
    assert need.checkpoint == 20 * n + need.history + disk_space.MIB
    points = ckpt.list_checkpoints(out / "checkpoints")
    assert len(points) == need.at_once == 3  # keep_checkpoints=0 keeps every one the run writes
    for point in points:
        actual = folder_bytes(point)
        assert 20 * n <= actual <= need.checkpoint, (actual, need)  # the tensors; all of it
        state = json.loads((point / "state.json").read_text())  # the metrics rows so far, as the file holds them
        rows = len(json.dumps(state, indent=1)) - len(json.dumps({**state, "history": []}, indent=1))
        assert 0 < rows <= need.history and (point / "state.json").stat().st_size < rows + 64 * 1024
    lora = folder_bytes(out / "lora")
    assert need.weights <= lora <= need.weights + 64 * 1024  # + the safetensors header and base_model.json

    # plan sizes them from the same trained weights (the planner's, on meta), and its table says so
    settings = yaml.safe_load((out / "config.yaml").read_text())
    result = planner.plan(Config(**{k: v for k, v in settings.items() if k != "profile"}).validate(), target="cpu")
    assert result["disk"] == {"checkpoint": need.checkpoint, "at_once": 3, "peak": need.peak}
    assert (f"disk (--output-dir): {fmt_bytes(need.checkpoint)} per checkpoint, up to "
            f"{fmt_bytes(need.peak)} for the run (3 checkpoints at once") in format_plan(result)


def test_what_a_run_holds_at_once_follows_checkpoint_every_and_keep_checkpoints():
    params = [torch.zeros(1000)]
    at_once = {(every, keep, start): disk_space.run_bytes(Config(steps=10, checkpoint_every=every,
                                                                  keep_checkpoints=keep), params, start).at_once
               for every in (0, 3, 5) for keep in (0, 2) for start in (0, 4)}
    assert at_once[0, 0, 0] == at_once[0, 2, 4] == 1  # only the last step's
    assert at_once[3, 0, 0] == 4 and at_once[3, 0, 4] == 3  # steps 3 6 9 10; after a resume at 4: 6 9 10
    assert at_once[5, 0, 0] == 2 and at_once[5, 2, 0] == 2 and at_once[3, 2, 0] == 3  # keep 2, and the next
    ema = disk_space.run_bytes(Config(ema_decay=0.9, eval_every=2, export_format="kohya,peft"), params)
    assert ema.checkpoint == 4000 + 8000 + 2 * 4000 + ema.history + disk_space.MIB and ema.outputs == 4000 * (1 + 2 + 2)
    assert disk_space.run_bytes(Config(init_lora="x"), params).outputs == 4000 * 2  # lora/ and init_lora/


def test_free_space_is_read_where_the_run_folder_will_be(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda p: seen.append(Path(p)) or Usage(0, 0, 123))
    assert disk_space.free_bytes(tmp_path / "new" / "run") == 123 and seen == [tmp_path.absolute()]

    def unsupported(path):
        raise OSError(38, "Function not implemented")
    monkeypatch.setattr(disk_space.shutil, "disk_usage", unsupported)  # a file system that cannot say: unchecked
    assert disk_space.free_bytes(tmp_path) is None
    disk_space.check(Config(), tmp_path, [torch.zeros(10)])


def test_a_file_size_limit_below_a_checkpoints_file_stops_the_run_before_its_first_step(tmp_path, monkeypatch):
    """ulimit -f smaller than the optimizer state's file: the first checkpoint failed after the steps trained."""
    params = [torch.zeros(300_000)]  # 1.14 MiB of weights, 2.29 MiB of AdamW state: the largest file, + 1 MiB slack
    largest = max(disk_space.run_bytes(Config(), params).optimizer, 4 * 300_000) + 2**20
    monkeypatch.setattr(disk_space, "file_size_limit", lambda: largest - 1)
    with pytest.raises(UserError, match=r"^the file-size limit here \(ulimit -f\) is 3\.29 MiB, and this run writes "
                                        r"files of up to about 3\.29 MiB .*: raise it \(ulimit -f unlimited\)"):
        disk_space.check(Config(), tmp_path, params)
    monkeypatch.setattr(disk_space, "file_size_limit", lambda: largest)
    disk_space.check(Config(), tmp_path, params)
    limited = subprocess.run(["bash", "-c", f"ulimit -f 100 && {sys.executable} -B -c 'from lowmem_alignprop.run."
                              "disk_space import file_size_limit as f; print(f())'"], capture_output=True, text=True)
    assert limited.stdout.split()[-1] == str(100 * 1024), limited  # (bash's ulimit -f counts 1 KiB blocks)


def test_a_disk_without_room_for_the_last_checkpoint_stops_the_run_before_its_first_step(tmp_path, tiny_dir,
                                                                                         monkeypatch, capsys):
    made = run_with_free_space(monkeypatch, lambda need: need.least - 1)
    out = tmp_path / "run"
    assert main([*FAST, "--output-dir", str(out), "--steps", "2"]) == 2
    need = made[-1]
    err = capsys.readouterr().err
    assert [x for x in err.splitlines() if x.startswith("error: ")] == [
        f"error: --output-dir {out}: its disk has {fmt_bytes(need.least - 1)} free, and this run's last "
        f"checkpoint and LoRA alone take about {fmt_bytes(need.least)} (the trained weights "
        f"{fmt_bytes(need.weights)}, the optimizer's state {fmt_bytes(need.optimizer)}, 32.00 MiB kept for samples, "
        "reports and logs): free space "
        "there, or choose another --output-dir"], err[-2000:]
    assert "Traceback" not in err
    assert not out.exists()  # nothing written: the run had not started

"""benchmarks/gpu_check.py, the script a lent GPU runs: its plumbing on the CPU (tiny model), and the merge
that lets a check be split over several short device calls."""

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# one worker runs this file: its module fixture (the CPU smoke run: three runs in subprocesses, 50-90 s) is then made
# once. The smoke's two tests are in `-m slow` (a session lent a GPU runs them first, benchmarks/gpu_check.sh's header);
# the merge of a split check, which every device call relies on, stays in the default suite on a made-up first call.
pytestmark = pytest.mark.xdist_group("gpu_check")

ROOT = Path(__file__).resolve().parent.parent


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Two runs at once (--jobs 2) of the CPU smoke check: a profile run and a ladder row; then the sample row with
    the profile run's LoRA. While it runs, its results file is read: the first copy of it holding a finished run
    (``midway``) is what a kill at that moment would have left."""
    import time

    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OMP_NUM_THREADS="1", LOWMEM_ALIGNPROP_CACHE=str(out / "cache"))
    results, midway = out / "results", None
    with open(out / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--out", str(results),
                                 "--work", str(out / "work"), "--match", "rtx3060 sd15,ladder fp16,sample", "--jobs",
                                 "2", "--deadline", "300"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=stderr)
        try:
            t0 = time.time()
            while time.time() - t0 < 600 and proc.poll() is None:
                files = list(results.glob("gpu-cpu-smoke-*.json"))
                if midway is None and files:
                    doc = json.loads(files[0].read_text())  # always whole: written to a temporary file, renamed
                    if any(r["status"] == "ok" for r in doc["ladder"] + doc["profiles"]):
                        midway = doc
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == 0, (out / "stderr.txt").read_text()[-2000:]
    files = list(results.glob("gpu-cpu-smoke-*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text()), midway


@pytest.mark.slow
def test_cpu_smoke_measures_and_plans_each_run(smoke):
    smoke, _ = smoke
    runs = smoke["ladder"] + smoke["profiles"]
    assert [r["name"] for r in runs] == ["ladder fp16, per-call checkpoint only", "rtx3060 sd15 512 K~U[1,50]"]
    for r in runs:
        assert r["status"] == "ok", r.get("log_tail")
        assert r["concurrent_runs"] == 2
        rep = r["memory_report"]
        assert rep["peak_allocated"] > 0 and "backward" in rep["stages"]
        assert len(r["metrics"]) == 2  # both training steps logged
    # the estimate beside the profile run (on a GPU beside every run; the CPU smoke plans its first: the same plumbing)
    ladder, profile = runs
    assert "error" not in profile["planner"] and profile["planner"]["peak_allocated"] > 0
    assert ladder["planner"] == {"skipped": "not planned in this call"}
    [sample] = smoke["sample"]  # `sample` with the LoRA the profile run wrote (the tiny model on the CPU)
    assert sample["status"] == "ok", sample.get("log_tail")
    assert sample["command"].startswith("lowmem-alignprop sample --profile cpu --model tiny")
    assert len(sample["sample_results"]["per_prompt"]) == 1 and "cuda_peak" not in sample
    assert smoke["calls"][0]["command"].startswith("python benchmarks/gpu_check.py --cpu-smoke")
    # the provenance block of every result (provenance.provenance), the card's name and memory in its device
    from lowmem_alignprop.measure.provenance import cpu_name

    assert smoke["command"] == smoke["calls"][0]["command"] and len(smoke["date"]) == 10
    assert smoke["device"]["name"] == "cpu" and smoke["device"]["total_gb"] is None
    assert smoke["device"]["cpu"] == cpu_name() and smoke["device"]["cores"] >= 1 and smoke["versions"]["torch"]


def _first_call() -> dict:
    """A first call's results as gpu_check.py writes them (the fields the merge reads), one run of each kind."""
    return {"command": "python benchmarks/gpu_check.py --cpu-smoke --match rtx3060", "wall_seconds": 80.0,
            "versions": {"torch": "2.13.0"}, "calls": [{"command": "python benchmarks/gpu_check.py --cpu-smoke "
                                                                    "--match rtx3060", "wall_seconds": 80.0}],
            "ladder": [{"name": "ladder fp16, per-call checkpoint only", "status": "ok", "wall_seconds": 30.0,
                        "memory_report": {"peak_allocated": 123}}],
            "profiles": [{"name": "rtx3060 sd15 512 K~U[1,50]", "status": "ok", "wall_seconds": 40.0,
                          "planner": {"peak_allocated": 456}}],
            "sample": [{"name": "sample rtx3060 sd15 512", "status": "ok"}]}


def test_a_second_call_merges_into_the_first(tmp_path):
    smoke = _first_call()
    gc = _gpu_check()
    path = tmp_path / "gpu-h100-2026-01-02.json"
    path.write_text(json.dumps(smoke))
    ladder, profile = smoke["ladder"][0], smoke["profiles"][0]
    second = {"command": "python benchmarks/gpu_check.py --match ladder", "versions": {"torch": "x"},
              "wall_seconds": 5.0,
              "ladder": [dict(copy.deepcopy(ladder), wall_seconds=-1.0),  # rerun: replaces the first call's
                         {"name": "ladder + VAE checkpointing (up-blocks)", "status": "ok"}],  # new: appended
              "profiles": [{"name": profile["name"], "status": "skipped (deadline)"},  # skipped: keeps the old
                           {"name": "laptop-6gb sd15 512 nf4", "status": "skipped (deadline)"}]}
    merged = gc.merge_docs(gc.load_previous(path), second)
    assert [r["name"] for r in merged["ladder"]] == [ladder["name"], "ladder + VAE checkpointing (up-blocks)"]
    assert merged["ladder"][0]["wall_seconds"] == -1.0
    assert merged["profiles"][0] == profile
    assert merged["profiles"][1]["status"] == "skipped (deadline)"  # not measured anywhere: said so
    assert "quant" not in merged  # neither call measured it
    assert [c["command"] for c in merged["calls"]] == [smoke["calls"][0]["command"], second["command"]]
    # an empty output folder (a device's $OUT) merges into the checkout's committed file of the same name
    fresh = tmp_path / "out" / path.name
    again = gc.merge_docs(gc.load_previous(fresh, committed=path), dict(copy.deepcopy(second), quant={"ok": True},
                                                                         loading={"rows": []}))
    assert again["profiles"][0] == profile and again["quant"] == {"ok": True} and again["loading"] == {"rows": []}
    assert "loading" not in gc.merge_docs(gc.load_previous(fresh, committed=path), copy.deepcopy(second))
    # no earlier file: this call's results as they are
    alone = gc.merge_docs(gc.load_previous(tmp_path / "none.json"), copy.deepcopy(second))
    assert alone["ladder"] == second["ladder"] and len(alone["calls"]) == 1


@pytest.mark.slow
def test_a_call_killed_midway_keeps_the_runs_it_finished(smoke):
    """The device stops a call at its time limit: the results file is saved after every run, so what was measured
    before the kill stays, and the runs that never ran say so. The smoke fixture's call, read while it ran: the
    first copy of its results file with a finished run is what a kill at that moment leaves (the file is written to
    a temporary name, then renamed, so a kill can only ever leave a whole earlier copy)."""
    _, doc = smoke
    assert doc is not None, "no results file with a finished run while the call went on"
    trainings = doc["ladder"] + doc["profiles"]
    assert [r["name"] for r in trainings] == ["ladder fp16, per-call checkpoint only", "rtx3060 sd15 512 K~U[1,50]"]
    finished = [r for r in trainings if r["status"] != _gpu_check().PENDING]
    assert finished and all(r["status"] == "ok" and r["memory_report"]["peak_allocated"] > 0 for r in finished)
    # the file is saved after each run: a finished run's figures are there while the sample row (a run of its own
    # that starts only after its training row's save, far longer than the 0.2 s poll) has not finished
    [sample] = doc["sample"]
    assert sample["status"] == _gpu_check().PENDING

"""The benchmarks' results files carry the provenance block ``plan --json`` carries (``provenance.provenance``:
command, date, device, versions), built by the one helper; their own keys stay. (gpu_check.py: tests/test_gpu_check.py.)"""

import importlib.util
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from lowmem_alignprop.measure.provenance import cpu_name, host_device

ROOT = Path(__file__).resolve().parent.parent


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _assert_provenance(doc: dict, command: str, **device):
    assert doc["command"] == command
    assert len(doc["date"]) == 10 and doc["date"][4] == "-"
    assert doc["device"]["cpu"] == cpu_name() and doc["device"]["cores"] >= 1
    assert set(host_device()) <= set(doc["device"]) and all(doc["device"][k] == v for k, v in device.items())
    assert doc["versions"]["python"] and doc["versions"]["torch"]


def test_flow_plans_rows_carry_the_provenance_block_not_their_own():
    """The plan's own provenance (the child's typed command) gives way to the script's command line; the plan's
    figures and the row's keys (host, CPU seconds, issue target) stay."""
    fp = _bench("flow_plans")
    plan = {"command": "lowmem-alignprop plan ...", "date": "1999-01-01", "device": {"cpu": "other"},
            "versions": {"torch": "0"}, "peak_needed": 5 * 2**30, "fits": True}
    doc = fp.row_doc("rtx3060-flux", plan, (0.5, 0.5, 0.5), cpu_user_seconds=12.345, wall_seconds=20.0,
                     max_rss_kb=1000)
    _assert_provenance(doc, "OMP_NUM_THREADS=1 nice -n 10 " + " ".join(fp.command("rtx3060-flux")), torch_threads=1)
    assert set(doc["versions"]) == {"python", "torch", "diffusers", "transformers", "peft", "accelerate"}  # plan's
    assert doc["device"]["load_average_at_start"] == [0.5, 0.5, 0.5]
    assert doc["host"].startswith(f"{cpu_name()}, {doc['device']['cores']} cores")
    assert (doc["peak_needed"], doc["fits"], doc["cpu_user_seconds"], doc["max_rss_kb"]) == (5 * 2**30, True, 12.35,
                                                                                             1000)
    assert doc["issue_target"] == fp.ROWS["rtx3060-flux"][3]


def test_rss_bench_writes_the_provenance_block(tmp_path):
    out = tmp_path / "rss.json"
    cmd = [sys.executable, "-c", "print('mem step 1: rss 10.0 MiB | 0.1 s')"]
    p = subprocess.run([sys.executable, "benchmarks/rss_bench.py", "--label", "x", "--note", "n", "--json", str(out),
                        "--", *cmd],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(out.read_text())
    _assert_provenance(doc, " ".join(cmd))  # the measured command, as before
    assert doc["bench_command"].endswith(f"--json {out} -- {' '.join(cmd)}")
    assert doc["label"] == "x" and doc["note"] == "n" and doc["steps"] == {"1": {"rss": 10 * 2**20, "peak": None}}
    assert doc["peak_rss_outside"] > 0
    assert doc["cpu_user_seconds"] + doc["cpu_system_seconds"] > 0  # the child's CPU time, from wait4
    assert len(doc["device"]["load_average_at_start"]) == len(doc["device"]["load_average_at_end"]) == 3


def test_counter_vs_events_writes_the_provenance_block(tmp_path, monkeypatch):
    """Its two measured children replaced by canned answers: the file has the provenance block and its figures."""
    cve = _bench("counter_vs_events")
    answer = {"stages": {"decode": 3 * 2**20}, "baseline": 0, "seconds": 1.0, "maxrss": 2**30}
    monkeypatch.setattr(cve.subprocess, "run", lambda *a, **kw: types.SimpleNamespace(
        returncode=0, stdout="noise\n" + json.dumps(answer) + "\n", stderr=""))
    monkeypatch.setattr(sys, "argv", ["benchmarks/counter_vs_events.py", "--midsize", "/x"])
    out = tmp_path / "cve.json"
    assert cve.main(["--midsize", str(tmp_path / "m"), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    _assert_provenance(doc, f"{sys.executable} benchmarks/counter_vs_events.py --midsize /x")
    assert doc["counter"] == doc["events"] == answer and doc["config"]["k"] == 2


def test_counter_vs_events_child_imports_the_planner():
    """The child program it runs per method imports what it uses (it named a module that moved)."""
    code = _bench("counter_vs_events")._CHILD
    imports = [line for line in code.splitlines() if line.startswith(("from lowmem_alignprop", "import lowmem"))]
    assert imports
    subprocess.run([sys.executable, "-c", "\n".join(imports)], cwd=ROOT, check=True, timeout=120)


def test_calibrate_time_writes_the_provenance_block(tmp_path):
    """--reuse recomputes the seconds from the stored work counts (no estimate): the file keeps its figures and
    carries the block."""
    out = tmp_path / "time-calibration.json"
    shutil.copy(ROOT / "benchmarks" / "results" / "time-calibration.json", out)
    before = json.loads(out.read_text())
    p = subprocess.run([sys.executable, "benchmarks/calibrate_time.py", "--reuse", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(out.read_text())
    _assert_provenance(doc, f"python benchmarks/calibrate_time.py --reuse --out {out}")
    assert set(doc["versions"]) == {"python", "torch", "diffusers", "transformers", "peft", "accelerate"}
    assert doc["kind"] == "time-calibration" and doc["host"] and len(doc["runs"]) == len(before["runs"]) > 0
    # the same sums of float64 terms, grouped differently since the time model split compute from copies
    assert [r["predicted_step"] for r in doc["runs"]] == pytest.approx([r["predicted_step"] for r in before["runs"]],
                                                                       rel=1e-12)


def test_the_cpu_is_named_by_the_value_of_its_model_name_line(monkeypatch):
    from lowmem_alignprop.measure import provenance

    class Info:
        def __init__(self, path):
            self.path = path

        def read_text(self, encoding=None):
            return "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nflags\t: x\n"

    monkeypatch.setattr(provenance, "Path", Info)
    assert provenance.cpu_name() == "Intel(R) Xeon(R) CPU @ 2.20GHz"

    class Missing(Info):
        def read_text(self, encoding=None):
            raise OSError("no /proc here")

    monkeypatch.setattr(provenance, "Path", Missing)
    monkeypatch.setattr(provenance.platform, "processor", lambda: "arm")
    assert provenance.cpu_name() == "arm"


@pytest.mark.parametrize("script, args, needle", [
    ("calibrate_cpu", ["--only", "99"], "--only 99: give indices into CONFIGS, 0-"),  # (an IndexError traceback)
    ("t5_cpu", ["--dtypes", "bogus"], "--dtypes: bogus is no torch dtype"),  # (AttributeError)
    ("speed_bench", ["--steps", "2"], "--steps 2: the first two steps warm up and are not averaged"),  # (averaged in)
    ("load_rss", ["--dir", "/dev/null/x"], "--dir /dev/null/x: Not a directory"),  # (NotADirectoryError)
])
def test_a_benchmark_script_refuses_bad_flags_in_one_line_before_any_work(tmp_path, script, args, needle):
    p = subprocess.run([sys.executable, f"benchmarks/{script}.py", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert needle in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]

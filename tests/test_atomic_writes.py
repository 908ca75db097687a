"""Nothing lost, ever: every file a command leaves behind is written atomically (a temporary name, then os.replace),
a full disk at any final file is one line naming what is safe, a kill while the LoRA is written leaves no half of it,
and the LoRA is written again from the last checkpoint by --resume of the finished run and by export."""

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lowmem_alignprop.cli import main
from lowmem_alignprop.lora import final_lora
from lowmem_alignprop.models.loading import write_checkpoint_lora
from lowmem_alignprop.run import atomic
from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.settings.errors import UserError

FAST = ["--profile", "cpu", "--seed", "3", "--set", "sample_steps=3", "--set", "k=1", "--set", "batch_size=1"]
LORA_FILE = Path("lora") / final_lora.LORA_WEIGHT_NAME

# one worker runs this file: its module fixture (a finished run) is then made once, not once per worker
pytestmark = [pytest.mark.usefixtures("fresh_log_handlers"), pytest.mark.xdist_group("atomic_writes")]


def tensors(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def adapter_metadata(file: Path) -> dict:
    with safe_open(str(file), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.target_modules"] == sorted(meta["unet.target_modules"])  # a set in peft: written sorted
    return meta


def assert_same_lora(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k  # the same stored values, not a recomputation
    assert adapter_metadata(a) == adapter_metadata(b)


class Renames:
    """Every os.replace / os.rename destination (resolved), and every file open()ed for writing in place."""

    def __init__(self, monkeypatch):
        self.targets: set[Path] = set()
        real_replace, real_rename = os.replace, os.rename

        def replace(src, dst, *a, **k):
            real_replace(src, dst, *a, **k)
            self.targets.add(Path(dst).resolve())

        def rename(src, dst, *a, **k):
            real_rename(src, dst, *a, **k)
            self.targets.add(Path(dst).resolve())

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)

    def published(self, path: Path) -> bool:
        """``path`` arrived by a rename, itself or a folder above it."""
        path = path.resolve()
        return any(p in self.targets for p in (path, *path.parents))


# metrics.jsonl is an append-only log (each line in one write, cut back off when a write fails); the lock file is the
# run's flock. Everything else a command leaves must have arrived by a rename.
NOT_RENAMED = {"metrics.jsonl", ".run.lock"}


def files_not_published(root: Path, renames: Renames) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.name not in NOT_RENAMED and not renames.published(p))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_dir):
    """A finished 2-step run with samples and a checkpoint per step, and every rename it made."""
    mp = pytest.MonkeyPatch()
    try:
        renames = Renames(mp)
        out = tmp_path_factory.mktemp("atomic") / "run"
        assert main([*FAST, "--set", "sample_prompts=1", "--output-dir", str(out), "--steps", "2",
                     "--checkpoint-every", "1"]) == 0
    finally:
        mp.undo()
    return out, renames


def test_every_file_train_sample_export_and_plan_write_arrives_by_a_rename(finished, tmp_path, monkeypatch, capsys):
    out, renames = finished
    written = {p.name for p in out.rglob("*") if p.is_file()}
    assert {"pytorch_lora_weights.safetensors", "base_model.json", "summary.json", "config.yaml", "metrics.jsonl",
            "memory_report.json", "memory_report.md", "memory_report.png", "before_after.png",
            "before_after.json", "state.json"} <= written  # the walk below sees every kind of output
    assert files_not_published(out, renames) == []
    assert atomic.leftovers(out) == []

    renames = Renames(monkeypatch)
    samples = tmp_path / "samples"
    assert main(["sample", *FAST, "--lora", str(out / "lora"), "--num-prompts", "1", "--output-dir",
                 str(samples)]) == 0
    for fmt in ("diffusers", "kohya", "peft"):
        assert main(["export", "--lora", str(out / "lora"), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
    for root in [samples] + [tmp_path / f for f in ("diffusers", "kohya", "peft")]:
        assert sorted(p.name for p in root.iterdir()), root
        assert files_not_published(root, renames) == [], root
        assert atomic.leftovers(root) == []
    # what the run and the exports leave is as readable as the umask allows, like a file open() makes (safetensors
    # writes 0600 and mkdtemp 0700: a ComfyUI server of another user could not read the LoRA)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "file").write_text("x")
    dir_mode, file_mode = (p.stat().st_mode & 0o777 for p in (plain, plain / "file"))
    shutil.rmtree(plain)
    modes = {p: p.stat().st_mode & 0o777 for p in [out, *out.rglob("*"), *tmp_path.rglob("*")]}  # (pytest's 0700)
    assert {p: oct(m) for p, m in modes.items() if m != (file_mode if p.is_file() else dir_mode)} == {}
    assert any(p.suffix == ".safetensors" for p in modes) and any(p.name == "kohya" for p in modes)
    before = {p for p in tmp_path.rglob("*")}
    capsys.readouterr()
    assert main(["plan", "--profile", "cpu", "--set", "sample_steps=3", "--set", "k=1", "--no-suggest",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "plan"
    assert {p for p in tmp_path.rglob("*")} == before  # a plan prints; it writes nothing


@pytest.mark.parametrize("name", ["summary.json", "memory_report.png", "before_after.json"])
def test_atomic_write_failing_at_the_rename_leaves_the_old_file_and_no_partial(name, tmp_path, monkeypatch):
    target = tmp_path / name
    target.write_bytes(b"old")
    monkeypatch.setenv(atomic.INJECT_ENV, f"{name}:enospc")
    with pytest.raises(OSError) as info:
        atomic.write_text(target, "new")
    assert info.value.errno == errno.ENOSPC and info.value.lowmem_file == target
    assert target.read_bytes() == b"old" and atomic.leftovers(tmp_path) == []
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "w").write_text("old")
    monkeypatch.setenv(atomic.INJECT_ENV, "lora")
    with pytest.raises(OSError), atomic.replacing_dir(folder) as tmp:
        (tmp / "w").write_text("new")
    assert (folder / "w").read_text() == "old" and atomic.leftovers(tmp_path) == []
    monkeypatch.delenv(atomic.INJECT_ENV)
    with atomic.replacing_dir(folder) as tmp:
        (tmp / "w").write_text("new")
    assert (folder / "w").read_text() == "new" and atomic.leftovers(tmp_path) == []


def test_a_folder_name_the_locale_cannot_read_is_refused_at_the_start(tmp_path):
    """Under LC_ALL=C with PYTHONUTF8=0, Python reads a folder named in UTF-8 ("ü") as lone surrogates, and a name
    in Latin-1 reads so in any locale: config.yaml raised UnicodeEncodeError at the run's start, and the weights'
    writer (safetensors) cannot take such a path at all. One line before anything is written."""
    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.settings.errors import UserError

    name = "ü".encode().decode("ascii", "surrogateescape")  # as os.fsdecode gives it in the C locale
    assert name == "\udcc3\udcbc"
    with pytest.raises(UserError, match=r"has bytes this locale cannot read .*: run in a UTF-8 locale "
                                        r"\(LC_ALL=C.UTF-8\), or name the folder in ASCII"):
        Config(output_dir=str(tmp_path / name)).validate()
    assert list(tmp_path.iterdir()) == []


def test_a_write_removes_what_a_killed_write_of_it_left(tmp_path):
    """A SIGKILL leaves the temporary folder (.partial-PID-NAME; an export's merged model is gigabytes), and the next
    write of NAME ran under another pid and left it forever. Now the next write removes those of dead processes;
    one of a live process (another export of the same name, now) and other names stay. Files alike (a killed
    sample's .partial-PID-sample_results.json stayed beside every later one)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # that process has exited
    target = tmp_path / "merged"
    killed, live, other = (tmp_path / f".partial-{dead}-merged", tmp_path / f".partial-{os.getppid()}-merged",
                           tmp_path / f".partial-{dead}-other")
    for p in (killed, live, other):
        (p / "unet").mkdir(parents=True)
        (p / "unet" / "weights").write_bytes(b"\0" * 10)
    with atomic.replacing_dir(target) as tmp:
        (tmp / "model_index.json").write_text("{}")
    assert (target / "model_index.json").is_file()
    assert not killed.exists() and live.is_dir() and other.is_dir()
    killed, live = (tmp_path / f".partial-{dead}-results.json", tmp_path / f".partial-{os.getppid()}-results.json")
    for p in (killed, live):
        p.write_text("{")
    atomic.write_text(tmp_path / "results.json", "{}")
    assert not killed.exists() and live.is_file() and other.is_dir()


def test_disk_full_at_the_final_lora_is_one_line_and_resume_writes_it_again(tmp_path, capsys, monkeypatch,
                                                                             tiny_dir, caplog):
    """The disk fills up in the LoRA's own writer (safetensors): one line saying the weights are safe in the last
    checkpoint; --resume latest of the finished run trains nothing and writes the LoRA (the same tensors as the
    checkpoint's), the reports and the summary."""
    import safetensors.torch as st
    from safetensors import SafetensorError

    real = st.save_file

    def save_file(tensors_, filename, *a, **k):
        if final_lora.LORA_WEIGHT_NAME in str(filename):
            Path(filename).write_bytes(b"\0" * 100)  # half-written, then the disk is full, in safetensors' words
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors_, filename, *a, **k)

    monkeypatch.setattr(st, "save_file", save_file)
    out = tmp_path / "run"
    # lora_alpha != rank: the LoRA written from the checkpoint below keeps the run's alpha (its scale), not the rank
    args = [*FAST, "--set", "sample_prompts=0", "--set", "lora_alpha=8", "--output-dir", str(out), "--steps", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert f"could not write {out / 'lora'}: the disk is full; the trained weights are safe in checkpoint " \
           f"{out / 'checkpoints' / 'step-00000002'}" in lines[0]
    assert "half-written: free space in --output-dir, then --resume latest" in lines[0]
    assert not (out / "lora").exists() and not (out / "summary.json").exists() and atomic.leftovers(out) == []
    monkeypatch.setattr(st, "save_file", real)
    metrics = (out / "metrics.jsonl").read_text()
    assert main([*args, "--resume", "latest"]) == 0
    assert final_lora.outputs_problem(out) is None
    assert (out / "metrics.jsonl").read_text() == metrics  # no step trained again
    write_checkpoint_lora(out / "checkpoints" / "step-00000002", tmp_path / "from_checkpoint")
    assert_same_lora(out / LORA_FILE, tmp_path / "from_checkpoint" / final_lora.LORA_WEIGHT_NAME)
    assert json.loads((out / "summary.json").read_text())["steps_done"] == 2
    # now whole: a second --resume has nothing to do and says so
    assert main([*args, "--resume", "latest"]) == 2
    assert "nothing left to train" in capsys.readouterr().err
    # a later start's end that cannot write lora/ (no permission) leaves the earlier start's outputs; the resume the
    # line advises writes this start's (it found the run finished and nothing to train, and lora/ stayed step 2's)
    def refused(tensors_, filename, *a, **k):
        raise SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")

    monkeypatch.setattr(st, "save_file", lambda t, f, *a, **k: (refused if final_lora.LORA_WEIGHT_NAME in str(f)
                                                                else real)(t, f, *a, **k))
    more = [x if x != "2" else "3" for x in args]
    assert main([*more, "--resume", "latest"]) == 2
    assert "Permission denied; the trained weights are safe in checkpoint" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["steps_done"] == 2
    monkeypatch.setattr(st, "save_file", real)
    # an export meanwhile says that lora/ is an earlier step's than the run's last checkpoint (it exported it silently)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main(["export", "--lora", str(out / "lora"), "--format", "kohya", "--out", str(tmp_path / "k")]) == 0
    assert f"{out / 'lora'} holds step 2's LoRA and the run has a checkpoint of step 3" in caplog.text
    from safetensors import safe_open  # the kohya header's modelspec.date: when the run ended, as its summary says
    with safe_open(str(next((tmp_path / "k").glob("*.safetensors"))), framework="pt") as f:
        ended = json.loads((out / "summary.json").read_text())["finished_at"]
        assert f.metadata()["modelspec.date"] == ended and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", ended)
    metrics = (out / "metrics.jsonl").read_text()
    assert main([*more, "--resume", "latest"]) == 0
    assert (out / "metrics.jsonl").read_text() == metrics and json.loads((out / "summary.json").read_text())[
        "steps_done"] == 3
    write_checkpoint_lora(out / "checkpoints" / "step-00000003", tmp_path / "from_step_3")
    assert_same_lora(out / LORA_FILE, tmp_path / "from_step_3" / final_lora.LORA_WEIGHT_NAME)


@pytest.mark.parametrize("code, fix", [
    (errno.ENOSPC, "free space in --output-dir"), (errno.EIO, "fix that in --output-dir"),
    (errno.EFBIG, "raise the file-size limit (ulimit -f) or free space in --output-dir"),
    (errno.EACCES, "make --output-dir writable"), (errno.EPERM, "make --output-dir writable"),
    (errno.EROFS, "make --output-dir writable")])
def test_a_failed_writes_fix_follows_its_cause(code, fix):
    """A write that fails for want of permission is not told to free space (it was, at the end of a run whose lora/
    could not be written): the fix follows the errno, in a checkpoint's line and the final outputs' alike."""
    failed = OSError(code, os.strerror(code))
    assert atomic.write_fix(failed) == fix
    line = str(ckpt.disk_error(failed, Path("run/checkpoints/step-00000002"), Path("run/checkpoints/step-00000001")))
    assert f"{fix[0].upper()}{fix[1:]}" in line


@pytest.mark.parametrize("code, fix", [(errno.ENOSPC, "free space (or choose another --output-dir or --out)"),
                                       (errno.EFBIG, "raise the file-size limit (ulimit -f) or write elsewhere")])
def test_a_full_disk_while_export_writes_is_one_line_and_leaves_nothing(finished, tmp_path, monkeypatch, capsys,
                                                                         code, fix):
    """export's writers fail in safetensors' words (a SafetensorError naming the OS error), not an OSError: one line
    naming the folder it was making and the fix, no traceback, nothing left beside it (it was a 23-line traceback)."""
    import safetensors.torch as st
    from safetensors import SafetensorError

    out, _ = finished

    def save_file(tensors_, filename, *a, **k):
        Path(filename).write_bytes(b"\0" * 100)  # half-written, then the disk says no
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    monkeypatch.setattr(st, "save_file", save_file)
    target = tmp_path / "exports" / "kohya"
    assert main(["export", "--lora", str(out / "lora"), "--format", "kohya", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and [x for x in err.splitlines() if x.startswith("error: ")] == [
        f"error: {'the disk is full' if code == errno.ENOSPC else os.strerror(code)} (writing {target}): no file was "
        f"half-written; {fix} and run the command again (a training run: --resume latest continues from its last "
        "checkpoint)"]
    assert list((tmp_path / "exports").iterdir()) == []


def test_disk_full_at_the_summary_names_the_file_and_what_is_safe(tmp_path, capsys, monkeypatch, tiny_dir):
    monkeypatch.setenv(atomic.INJECT_ENV, "summary.json:enospc")
    out = tmp_path / "run"
    assert main([*FAST, "--set", "sample_prompts=0", "--output-dir", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "Traceback" not in err
    assert f"could not write {out / 'summary.json'}: the disk is full; the trained weights are safe" in line[0]
    assert not (out / "summary.json").exists() and atomic.leftovers(out) == []
    assert final_lora.lora_problem(out) is None  # written before the summary, whole
    assert final_lora.outputs_problem(out) == f"{out / 'summary.json'} is missing or damaged"


def test_a_folder_turned_read_only_mid_run_is_one_line_and_resume_goes_on(tmp_path, capsys, monkeypatch, tiny_dir):
    """The run folder's disk turned read-only (an ext4 remount after an I/O error) while a --sample-every grid was
    written (a kill -9 walk met it; so did the start's metrics.jsonl): a traceback and exit 1, where a full disk is one
    line. Now one line naming the file and the fix; the steps saved before it resume."""
    monkeypatch.setenv(atomic.INJECT_ENV, "step-000002.png:erofs")
    out = tmp_path / "run"
    args = [*FAST, "--set", "sample_prompts=1", "--sample-every", "1", "--output-dir", str(out), "--steps", "2",
            "--checkpoint-every", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    grid = out / "samples" / "step-000002.png"
    assert "Traceback" not in err and [x for x in err.splitlines() if x.startswith("error: ")] == [
        f"error: Read-only file system (test hook {atomic.INJECT_ENV}) (writing {grid}): no file was half-written; "
        f"make {grid.parent} writable (or choose another --output-dir or --out) and run the command again (a "
        "training run: --resume latest continues from its last checkpoint)"]
    assert not grid.exists() and atomic.leftovers(out) == []
    monkeypatch.delenv(atomic.INJECT_ENV)
    assert main([*args, "--resume", "latest"]) == 0
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert grid.is_file()


def test_a_refused_write_is_told_from_a_refused_read(tmp_path):
    """What atomic.unwritable calls a write refused for permission: an error of a write in the folder the write was
    making its file in (or of that folder's making), tagged by the atomic write; a copy's source refused elsewhere,
    or an untagged error, is no such write (its traceback says what it is)."""
    final = tmp_path / "run" / "samples" / "grid.png"

    def refused(code, name, tag=True):
        error = OSError(code, os.strerror(code), str(name))
        if tag:
            error.lowmem_file = final
        return error

    assert atomic.unwritable(refused(errno.EROFS, final.with_name(".partial-1-grid.png")))
    assert atomic.unwritable(refused(errno.EACCES, tmp_path / "run"))  # (its folder made on the way)
    assert not atomic.unwritable(refused(errno.EACCES, tmp_path / "elsewhere" / "source.png"))
    assert not atomic.unwritable(refused(errno.EACCES, final, tag=False))
    assert not atomic.unwritable(refused(errno.ENOSPC, final))  # (a full disk: is_disk_full's)
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError) as made:  # a folder that cannot be made carries the file it was for
        atomic.write_text(tmp_path / "file" / "sub" / "x.json", "{}")
    assert made.value.lowmem_file == tmp_path / "file" / "sub" / "x.json"


def killed_run(args: list[str], inject: str) -> int:
    """The CLI with the write hook ``inject`` in a child process, as -signal or exit status. On Linux a fork of this
    process (the libraries already imported: a fresh interpreter pays ~10 s of imports before its first line);
    elsewhere (macOS: a fork after torch's imports can hang) a fresh ``python -m lowmem_alignprop``."""
    if not sys.platform.startswith("linux"):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), atomic.INJECT_ENV: inject}
        return subprocess.run([sys.executable, "-m", "lowmem_alignprop", *args], env=env, capture_output=True,
                              timeout=600).returncode
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest, whatever happens
        code = 1
        try:
            torch.set_num_threads(1)  # the parent's OpenMP threads are not the child's
            os.environ[atomic.INJECT_ENV] = inject
            code = main(args)
        finally:
            os._exit(code if isinstance(code, int) else 1)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def test_a_kill_while_the_lora_is_written_leaves_no_half_and_resume_writes_it(tmp_path, tiny_dir, caplog):
    """A real SIGKILL just before the LoRA folder is renamed into place (test hook): no lora/ at all, only the
    temporary folder; --resume latest removes it and writes the LoRA from the last checkpoint (in this process: the
    folder the killed process left is all it reads)."""
    out = tmp_path / "run"
    args = [*FAST, "--set", "sample_prompts=0", "--output-dir", str(out), "--steps", "1"]
    assert killed_run(args, "lora:kill") == -signal.SIGKILL
    assert not (out / "lora").exists() and [p.name.split("-", 2)[-1] for p in atomic.leftovers(out)] == ["lora"]
    assert ckpt.verify(out / "checkpoints" / "step-00000001") is None
    assert main([*args, "--resume", "latest"]) == 0
    assert "writing its outputs again from checkpoint" in caplog.text
    assert final_lora.outputs_problem(out) is None and atomic.leftovers(out) == []


def test_a_kill_while_the_end_of_run_export_is_written_resumes_into_the_export(tmp_path, tiny_dir, caplog):
    """A SIGKILL just before export_format's kohya folder is renamed into place (the LoRA and summary are whole):
    --resume latest writes the export (before: "nothing left to train", the export missing and its temporary folder
    left for good); then the run is whole and a further --resume has nothing to do."""
    out = tmp_path / "run"
    args = [*FAST, "--set", "sample_prompts=0", "--output-dir", str(out), "--steps", "1", "--set",
            "export_format=kohya"]
    assert killed_run(args, "kohya:kill") == -signal.SIGKILL
    assert final_lora.outputs_problem(out) is None and not (out / "export" / "kohya").exists()
    assert [p.name.split("-", 2)[-1] for p in atomic.leftovers(out)] == ["kohya"]
    assert main([*args, "--resume", "latest"]) == 0
    assert "but its kohya export is missing: writing its outputs again from checkpoint" in caplog.text
    assert len(list((out / "export" / "kohya").glob("*.safetensors"))) == 1 and atomic.leftovers(out) == []
    assert main([*args, "--resume", "latest"]) == 2  # whole now


def test_export_writes_a_damaged_or_missing_lora_again_from_the_checkpoint(finished, tmp_path, caplog):
    out, _ = finished
    run = tmp_path / "run"
    shutil.copytree(out, run)
    original = tmp_path / "original.safetensors"
    shutil.copy2(run / LORA_FILE, original)
    (run / LORA_FILE).write_bytes((run / LORA_FILE).read_bytes()[:200])  # cut short
    assert final_lora.lora_problem(run).endswith("is damaged (SafetensorError)")
    assert main(["export", "--lora", str(run / "lora"), "--format", "kohya", "--out", str(tmp_path / "k")]) == 0
    assert "wrote " in caplog.text and "again from checkpoint" in caplog.text
    assert_same_lora(run / LORA_FILE, original)  # bit for bit the weights and adapter settings training wrote
    assert json.loads((run / "lora" / "base_model.json").read_text()) == json.loads(
        (out / "lora" / "base_model.json").read_text())
    shutil.rmtree(run / "lora")
    caplog.clear()
    assert main(["export", "--lora", str(run / "lora"), "--format", "peft", "--out", str(tmp_path / "p")]) == 0
    assert_same_lora(run / LORA_FILE, original)
    # a lora/ that is not there is written, not written "again" (a run that stopped before writing it)
    assert f"is missing: wrote {run / 'lora'} from checkpoint" in caplog.text and "again" not in caplog.text


def test_export_of_a_read_only_runs_lora_needs_no_lock_and_a_damaged_one_is_one_line(finished, tmp_path, monkeypatch,
                                                                                     capsys):
    """An archived or a colleague's run folder that cannot be written: its whole LoRA exports to a writable --out
    (export took the run's lock first, and died on the lock file with a traceback); a damaged one, which export would
    write again, is one line naming what to do."""
    from lowmem_alignprop.run import runlock

    out, _ = finished
    run = tmp_path / "run"
    shutil.copytree(out, run)

    def read_only(self):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self.path))

    monkeypatch.setattr(runlock.RunLock, "acquire", read_only)
    assert main(["export", "--lora", str(run / "lora"), "--format", "kohya", "--out", str(tmp_path / "k")]) == 0
    assert list((tmp_path / "k").glob("*.safetensors"))
    (run / LORA_FILE).write_bytes((run / LORA_FILE).read_bytes()[:200])  # cut short
    capsys.readouterr()
    assert main(["export", "--lora", str(run / "lora"), "--format", "kohya", "--out", str(tmp_path / "k2")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {run / LORA_FILE} is damaged (SafetensorError) and {run} cannot be written (Permission denied): make "
        f"{run} writable so that export writes it again from the run's last checkpoint, or export a checkpoint "
        f"(lowmem-alignprop export {run / 'checkpoints'}/step-N)"]
    assert not (tmp_path / "k2").exists()


TORCH_WRITE_FAILED = "[enforce fail at inline_container.cc:672] . unexpected pos 114496 vs 114388"  # torch 2.13


def test_a_full_disk_in_torch_save_of_a_checkpoint_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path, capsys,
                                                                                                 monkeypatch, tiny_dir):
    """torch's zip writer says a full disk in a RuntimeError of its own, the OS's error only in its context (as it
    does writing into a file object): the line names the disk and the fix, step 1 stays whole and resumable, no
    temporary folder is left, and --resume latest trains on from it once there is space."""
    real, calls = torch.save, []

    def save(obj, f, *a, **k):
        if Path(getattr(f, "name", f)).name == "optimizer.pt":
            calls.append(f)
            if len(calls) == 2:  # the second checkpoint
                try:
                    raise OSError(errno.ENOSPC, "No space left on device")
                except OSError:
                    raise RuntimeError(TORCH_WRITE_FAILED) from None  # from None: only __context__ keeps it, as torch's
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = [*FAST, "--set", "sample_prompts=0", "--output-dir", str(out), "--steps", "3", "--checkpoint-every", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "Traceback" not in err and lines == [(
        f"error: could not write checkpoint {root / 'step-00000002'}: the disk is full; nothing was half-written (the "
        f"previous checkpoint {root / 'step-00000001'} is intact). Free space in --output-dir (or choose another one) "
        "and rerun with --resume latest")], err[-2000:]
    assert [p.name for p in root.iterdir()] == ["step-00000001"]  # no step-2, no .tmp-step-00000002
    assert ckpt.verify(root / "step-00000001") is None and atomic.leftovers(out) == []
    monkeypatch.setattr(torch, "save", real)
    assert main([*args, "--resume", "latest"]) == 0
    assert ckpt.find_resume(out, "latest").name == "step-00000003"


@pytest.mark.slow  # 14 s (a real run under ulimit -f): the default suite has the failed write's forms (test below) and
# torch's own error in a checkpoint (the test above)
def test_a_file_size_limit_below_a_checkpoints_file_stops_the_run_before_its_first_step(finished, tmp_path, tiny_dir):
    """A real RLIMIT_FSIZE (ulimit -f) in a child process (Python ignores SIGXFSZ; the child does so explicitly too),
    between a checkpoint's small and large files: the start's check reads the limit and stops the run before step 1
    with one line naming it (at the first checkpoint torch.save failed with EFBIG, the step trained and lost; the
    default suite has that line's forms, test_write_failure_...); nothing is written under checkpoints/."""
    import resource

    out, written = tmp_path / "run", finished[0] / "checkpoints" / "step-00000001"
    small, big = ((written / name).stat().st_size for name in ("trainable.safetensors", "optimizer.pt"))
    assert small < big
    limit = (small + big) // 2  # trainable.safetensors fits (and all a run writes before it), optimizer.pt does not

    def child():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "lowmem_alignprop", *FAST, "--set", "sample_prompts=0",
                           "--output-dir", str(out), "--steps", "1"], env=env, capture_output=True, text=True,
                          timeout=600, preexec_fn=child, check=False)
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: the file-size limit here (ulimit -f) is "), lines
    assert lines[0].endswith("(its checkpoints' optimizer state and weights): raise it (ulimit -f unlimited) and start "
                             "the run again"), lines
    assert f"{limit / 1024:.2f} KiB" in lines[0]  # the limit as set, in the line
    assert not list((out / "checkpoints").glob("*")) and atomic.leftovers(out) == []
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()  # no step trained


def test_write_failure_finds_the_os_error_in_torch_and_safetensors_words(tmp_path, monkeypatch):
    """The OS error behind each form a failed checkpoint write takes; torch.save into a path gives no errno at all:
    next to nothing free where it wrote is a full disk, else a file-size limit if one is set, else a failed write."""
    import resource

    from safetensors import SafetensorError

    full = OSError(errno.ENOSPC, "No space left on device")
    assert atomic.write_failure(full, tmp_path) is full
    try:
        try:
            raise full
        except OSError:
            raise RuntimeError(TORCH_WRITE_FAILED) from None
    except RuntimeError as e:
        assert atomic.write_failure(e, tmp_path) is full
    rust = atomic.write_failure(SafetensorError("Error while serializing: I/O error: File too large (os error 27)"),
                              tmp_path)
    assert rust.errno == errno.EFBIG and atomic.describe(rust) == "File too large"
    bare = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(resource, "getrlimit", lambda what: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    failed = atomic.write_failure(bare, tmp_path)
    assert failed.errno == errno.EIO and failed.strerror == f"the write failed ({bare})"
    monkeypatch.setattr(resource, "getrlimit", lambda what: (1 << 20, resource.RLIM_INFINITY))
    assert atomic.write_failure(bare, tmp_path).errno == errno.EFBIG
    real_statvfs = os.statvfs

    class Full:
        f_bfree = f_bavail = 0
        f_frsize = 4096

    monkeypatch.setattr(os, "statvfs", lambda p: Full() if Path(p) == tmp_path else real_statvfs(p))
    assert atomic.is_disk_full(atomic.write_failure(bare, tmp_path))
    for other in (RuntimeError("CUDA out of memory"), ValueError(TORCH_WRITE_FAILED)):
        assert atomic.write_failure(other, tmp_path) is None


def test_windows_files_are_flushed_through_a_handle_that_may_write(tmp_path, monkeypatch):
    """Windows flushes a file (FlushFileBuffers) only through a handle opened for writing: os.fsync on a read-only
    one fails with EBADF, and every file a run wrote failed so (the run stopped before its first step). Simulated:
    fsync refuses read-only descriptors; a read-only copied file is left to the OS there, not an error."""
    import fcntl

    real_fsync = os.fsync

    def windows_fsync(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", windows_fsync)
    monkeypatch.setattr(atomic, "WINDOWS", True)
    path = atomic.write_text(tmp_path / "metrics.jsonl", '{"step": 1}\n')
    assert path.read_text(encoding="utf-8") == '{"step": 1}\n'
    locked = tmp_path / "copied.txt"
    locked.write_text("x", encoding="utf-8")
    locked.chmod(0o444)
    if os.access(locked, os.W_OK):  # (root writes anyway: nothing to simulate)
        return
    atomic.finish_file(locked)


def test_a_safetensors_header_is_written_with_its_metadata_sorted(tmp_path):
    """safetensors orders its header's metadata as a Rust HashMap does (another order in every process): the same LoRA
    gave other bytes from one run to the next. Every .safetensors file a command writes arrives with the metadata's
    keys sorted: the bytes of a header written in any order are those of the sorted one, and it loads the same."""
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lowmem_alignprop.run import atomic

    meta = {"lora_adapter_metadata": '{"r": 4, "target_modules": ["to_k", "to_q"]}', "format": "pt", "ünï": "ç"}
    tensors = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.weight": torch.ones(3)}

    def written(order: list[str]) -> bytes:
        """A file as safetensors writes it, its metadata in ``order`` (rewritten by hand: one process has one)."""
        save_file(tensors, str(tmp_path / "raw.safetensors"), metadata=meta)
        data = (tmp_path / "raw.safetensors").read_bytes()
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
        header["__metadata__"] = {k: meta[k] for k in order}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        assert len(text) <= size
        out = tmp_path / f"{'-'.join(order)}.safetensors"
        with atomic.replacing(out) as tmp:
            tmp.write_bytes(data[:8] + text + b" " * (size - len(text)) + data[8 + size:])
        return out.read_bytes()

    orders = [["lora_adapter_metadata", "format", "ünï"], ["ünï", "format", "lora_adapter_metadata"],
              sorted(meta)]
    files = [written(order) for order in orders]
    assert files[0] == files[1] == files[2]
    with safe_open(str(tmp_path / "ünï-format-lora_adapter_metadata.safetensors"), "pt") as f:
        assert f.metadata() == meta and sorted(f.keys()) == ["a.weight", "b.weight"]
        assert torch.equal(f.get_tensor("b.weight"), tensors["b.weight"])


def test_a_folder_whose_final_rename_fails_gets_the_older_folder_back(tmp_path, monkeypatch):
    """replacing_dir moves the older folder aside before the new one is renamed in: when that rename fails, the older
    folder goes back under its name (a later write would take it for a dead write's leftover and delete it)."""
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "w").write_text("old")
    real = os.replace

    def replace(src, dst):
        if Path(src) == atomic.partial_name(folder) and Path(dst) == folder:  # the new folder into place
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"), atomic.replacing_dir(folder) as tmp:
        (tmp / "w").write_text("new")
    assert (folder / "w").read_text() == "old" and atomic.leftovers(tmp_path) == []


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a synced file by its descriptor in /proc")
def test_a_file_is_synced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """A crash after the rename must find the whole file under its name: its temporary file is synced, then renamed
    (renamed first and synced after, a power loss in between can leave an empty file under the final name)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "summary.json"
    atomic.write_text(target, "{}")
    [(renamed, (_, partial, _))] = [(i, e) for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(target)]
    synced = [i for i, e in enumerate(events) if e == ("fsync", partial)]
    assert synced and synced[0] < renamed, events
    assert target.read_text() == "{}"


def test_a_lora_is_never_written_again_from_a_damaged_checkpoint_nor_an_earlier_step(finished, tmp_path, caplog):
    """The run's lora/ is gone and its newest checkpoint has a byte flipped in its weights (the same size: it still
    loads, with a wrong value): lora/ is never written from that one, nor from the intact checkpoint before it (an
    earlier step's weights under the run's name and its last step's card): the line names that checkpoint to export.
    With the last step's checkpoint whole, lora/ is written again from it."""
    out, _ = finished
    run = tmp_path / "run"
    shutil.copytree(out, run)
    shutil.rmtree(run / "lora")
    newest, older = ckpt.list_checkpoints(ckpt.root_of(run))
    weights = newest / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x40  # a weight's last byte
    weights.write_bytes(bytes(data))
    assert ckpt.verify(newest) == "trainable.safetensors does not match its checksum" and ckpt.verify(older) is None
    with pytest.raises(UserError, match=f"has no intact checkpoint to write it again from: export {older} for step "
                                        f"{ckpt.step_of(older)}'s LoRA$"):
        final_lora.rewrite_from_checkpoint(run)
    assert not (run / "lora").exists()
    shutil.rmtree(newest)  # (as if the run had ended at the older step)
    (run / "summary.json").unlink()
    assert final_lora.rewrite_from_checkpoint(run) == older
    expected = write_checkpoint_lora(older, tmp_path / "expected")
    assert_same_lora(run / LORA_FILE, expected)


def test_a_metrics_line_the_disk_fills_in_the_middle_of_is_cut_back_off(tmp_path, monkeypatch):
    """metrics.jsonl is appended one line at a time: a write that fails after part of the line (a full disk) leaves
    the file as it was, every line whole (a half line made the next line unparsable), and the error names the file."""
    from lowmem_alignprop.training import grid

    path = tmp_path / "metrics.jsonl"
    grid.write_metrics_line(path, {"step": 1, "reward_mean": 0.5})
    before, inode, real, writes = path.read_bytes(), path.stat().st_ino, os.write, []

    def filling(fd, data):  # this file's first write gets 5 bytes onto the disk, the next finds it full
        if os.fstat(fd).st_ino != inode:
            return real(fd, data)
        writes.append(len(data))
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, bytes(data[:5]))

    monkeypatch.setattr(grid.os, "write", filling)
    with pytest.raises(OSError) as failed:
        grid.write_metrics_line(path, {"step": 2, "reward_mean": 0.25})
    monkeypatch.undo()
    assert len(writes) == 2 and failed.value.errno == errno.ENOSPC and failed.value.lowmem_file == path
    assert path.read_bytes() == before
    grid.write_metrics_line(path, {"step": 2, "reward_mean": 0.25})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_best_arrives_whole_by_a_rename_and_replaces_the_earlier_best(tmp_path, monkeypatch):
    """best/ (the LoRA and best.json of the best step so far) is written into a temporary folder and renamed into
    place: a kill or a full disk while it is written leaves the previous best/ whole, and a later best leaves none of
    the earlier one's files behind."""
    from lowmem_alignprop.training.evaluation import HeldOut
    from lowmem_alignprop.settings.config import Config

    renames = Renames(monkeypatch)
    step_of = {"now": 1}

    def write_lora(folder: Path) -> None:
        (folder / f"weights-of-step-{step_of['now']}").write_text(str(step_of["now"]))

    cfg = Config(seed=7, batch_size=2, eval_every=1).validate()
    held = HeldOut(cfg, ["a"], tmp_path, sample=None, write_lora=write_lora)
    held.after_evaluation(1, {"eval_objective": 0.5, "eval_reward": 0.5}, is_main=True)
    step_of["now"] = 2
    held.after_evaluation(2, {"eval_objective": 0.75, "eval_reward": 0.75}, is_main=True)
    best = tmp_path / "best"
    assert sorted(p.name for p in best.iterdir()) == ["best.json", "weights-of-step-2"]
    assert json.loads((best / "best.json").read_text())["step"] == 2
    assert files_not_published(tmp_path, renames) == [] and atomic.leftovers(tmp_path) == []


def test_an_ema_runs_checkpoint_without_the_average_by_name_does_not_write_its_lora_again(finished, tmp_path):
    """An ema_outputs run's lora/ is the average's: a checkpoint of an older version that keeps the average only in
    ema.pt (no EMA weights by name) cannot give it, and export leaves lora/ to --resume latest instead of writing the
    trained weights there (a LoRA of other weights under the run's name, in silence)."""
    out, _ = finished
    run = tmp_path / "run"
    shutil.copytree(out, run)
    shutil.rmtree(run / "lora")
    for path in ckpt.list_checkpoints(ckpt.root_of(run)):
        _as_an_older_ema_checkpoint(path)
    assert final_lora.rewrite_from_checkpoint(run) is None
    assert not (run / "lora").exists()


def _as_an_older_ema_checkpoint(path: Path) -> None:
    """The checkpoint ``path`` as an ema_decay run's of an older version says it: ema_decay in its config, and the
    average kept in ema.pt only (no EMA weights by name); its manifest made to match."""
    import hashlib

    state = json.loads((path / "state.json").read_text())
    state["config"]["ema_decay"] = 0.9
    (path / "state.json").write_text(json.dumps(state))
    manifest = json.loads((path / "manifest.json").read_text())
    data = (path / "state.json").read_bytes()
    manifest["files"]["state.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert ckpt.verify(path) is None and not (path / ckpt.EMA_WEIGHTS).exists()


def test_init_lora_of_an_older_ema_checkpoint_says_its_weights_are_the_trained_ones_once(finished, tmp_path, caplog):
    """--init-lora of an ema_decay run's older checkpoint: the LoRA read (init_lora_file) and the user's file
    recorded for the card (init_lora_source) are found by one rule (init_lora.named_lora); the line that the
    checkpoint holds the trained weights, not the EMA, was said by each (twice), and is now said once."""
    import hashlib

    from lowmem_alignprop.lora.init_lora import init_lora_file, init_lora_source

    out, _ = finished
    step = tmp_path / "step-00000002"
    shutil.copytree(out / "checkpoints" / "step-00000002", step)
    _as_an_older_ema_checkpoint(step)
    with caplog.at_level(logging.WARNING):
        assert init_lora_file(str(tmp_path / "step-2")).is_file()
        source = init_lora_source(str(tmp_path / "step-2"))
    said = [r.getMessage() for r in caplog.records if "not their average by name" in r.getMessage()]
    assert said == [f"checkpoint {step} holds the trained weights but not their average by name (written by an older "
                    "version): its LoRA is the trained weights, not the EMA its run's lora/ holds"]
    trained = hashlib.sha256((step / "trainable.safetensors").read_bytes()).hexdigest()
    assert source == {"file": "trainable.safetensors", "sha256": trained}

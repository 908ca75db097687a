"""Bad input: one line naming the fix, exit code 2, nothing written."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from lowmem_alignprop.cli import main


@pytest.mark.parametrize("args, needle", [
    (["--reward", "no_such_reward"], "no_such_reward"),
    (["--profile", "no_such_profile"], "unknown profile 'no_such_profile'"),
    (["--set", "k3"], "malformed --set 'k3'"),
    (["--set", "kk=3"], "unknown config key 'kk'"),
    (["--set", "k=three"], "k must be a whole number"),
    (["--model", "/nonexistent/model_dir"], "model path /nonexistent/model_dir does not exist: pass an existing "
     "diffusers directory, a .safetensors/.ckpt file, a hub id (owner/name), or leave --model out for the shipped "
     "toy world"),  # the default model (not tiny, which the suite's environment makes its default)
    (["--model", "missing.safetensors"], "does not exist"),
    (["--set", "k=20"], "k=20 is larger than sample_steps=10"),
    (["--set", "truncation=uniform", "--set", "k_min=5", "--set", "k_max=2"], "k_min=5 is larger than k_max=2"),
    (["--set", "mixed_precision=fp8"], "mixed_precision='fp8' is not one of"),
    (["--reward", "toy_count=7"], "reward 'toy_count=7': the target count must be a number from 0 to 4"),
    # a name mistyped: the one it was nearest, as for prompt sets, config keys and commands
    (["--reward", "brightnes"], "unknown reward 'brightnes' (did you mean brightness?); use one of"),
    (["--profile", "rtx306"], "unknown profile 'rtx306' (did you mean rtx3060?): use one of"),
    (["--model", "tinyy"], "model path tinyy does not exist (did you mean tiny?): pass an existing"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, needle):
    out = tmp_path / "run"
    rc = main(["--profile", "cpu", "--output-dir", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    assert not out.exists()


def test_a_model_the_environment_names_that_is_none_names_the_variable(tmp_path, capsys, monkeypatch):
    """No --model, $LOWMEM_ALIGNPROP_MODEL naming no model (forgotten in a shell): the line names the variable (it
    said to leave out the --model never given); its spaces go, as --model's do (they were kept, unseen)."""
    from lowmem_alignprop.settings.config import MODEL_ENV, Config

    monkeypatch.setenv(MODEL_ENV, " tiny ")
    assert Config().model == "tiny"
    monkeypatch.setenv(MODEL_ENV, "nosuch ")
    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: model path nosuch does not exist: it is ${MODEL_ENV}'s model: set "
                                       "that to one that is, or unset it for the shipped toy world\n")
    assert not out.exists()


def test_empty_prompt_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n# only a comment\n\n")
    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--prompts", str(prompts), "--output-dir", str(out)]) == 2
    assert "prompt" in capsys.readouterr().err.lower()
    assert not out.exists()


def test_gpu_profile_without_gpu_points_to_cpu_and_plan(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["--profile", "rtx3060", "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--profile cpu" in err and "lowmem-alignprop plan --profile rtx3060" in err


def test_a_mistyped_command_or_option_is_one_line(capsys):
    """argparse's usage errors are one line naming --help (not the whole usage text), exit 2; a bare first word is a
    command mistyped (training takes none), with the command it was close to."""
    cases = [(["sampel", "--lora", "x"], "error: unknown command 'sampel': did you mean lowmem-alignprop sample?"),
             (["foo"], "error: unknown command 'foo': the commands are train, plan, sample, profiles, export (see "
                       "lowmem-alignprop --help)"),
             (["train", "foo"], "error: unrecognized arguments: foo: see lowmem-alignprop --help"),
             (["--stepz", "3"], "error: unrecognized arguments: --stepz 3: see lowmem-alignprop --help"),
             (["plan", "--steps", "x"], "error: argument --steps: invalid int value: 'x': see lowmem-alignprop plan "
                                        "--help"),
             (["export", "--format"], "error: argument --format: expected one argument: see lowmem-alignprop export "
                                      "--help")]
    for argv, line in cases:
        assert main(argv) == 2, argv
        assert capsys.readouterr().err == line + "\n", argv


def test_profiles_command_lists_shipped_profiles(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if " GiB  " in line]
    assert len(lines) >= 12 and any(line.startswith("cpu ") for line in lines)
    # one column for the budgets, whatever the longest name (rtx3060-12gb-sd35l is 18 characters)
    assert len({line.index(" GiB  ") for line in lines}) == 1
    # each description whole (its header's first sentence, wrapped under its column), not cut at the header's line
    column = lines[0].index(" GiB  ") + len(" GiB  ")
    rows = out.split("\n\nUse one")[0].split("\n")
    described = {}
    for line in rows:
        if line[:column].strip():
            name = line.split()[0]
            described[name] = line[column:]
        else:
            assert line.startswith(" " * column) and not line[column].isspace(), line
            described[name] += " " + line[column:]
    assert all(text.endswith(".") for text in described.values()), described
    assert "its Linear layers are stored in int8" in described["rtx4090-flux"]
    assert described["rtx3060"].startswith("8 GB consumer cards") and "SD1.5 at 512 px" in described["rtx3060"]


def test_profiles_name_prints_the_file_to_copy_and_auto_is_listed(capsys, tmp_path, monkeypatch):
    """`profiles rtx3060 > mine.yaml` gives the shipped file (comments included), which --profile mine.yaml reads
    as the same settings; an unknown name is one line with the names (a near one suggested, as --profile does); the
    listing says what `auto` picks, and `profiles auto` prints the profile it picks here (it said no such profile)."""
    from lowmem_alignprop.settings import profiles
    from lowmem_alignprop.settings.profiles import load_profile, shipped_profiles

    assert main(["profiles", "rtx3060"]) == 0
    text = capsys.readouterr().out
    shipped = shipped_profiles()["rtx3060"].read_text(encoding="utf-8")
    # the file, then a comment on what a model sets over it (the toy model's sampling: a copy's lines win)
    assert text.startswith(shipped) and text[len(shipped):].startswith("# --model toy sets its own ")
    (tmp_path / "mine.yaml").write_text(text)
    assert load_profile(str(tmp_path / "mine.yaml"))[1] == load_profile("rtx3060")[1]
    assert main(["profiles", "hps"]) == 0 and "reward: hpsv2" in capsys.readouterr().out
    assert main(["profiles", "titan"]) == 2
    assert capsys.readouterr().err.startswith("error: no shipped profile or recipe 'titan': the profiles are ")
    assert main(["profiles", "rtx409"]) == 2
    assert capsys.readouterr().err.startswith("error: no shipped profile or recipe 'rtx409' (did you mean rtx4090?): ")
    for card, picked, said in ((None, "cpu", "no CUDA GPU is detected here"),
                               (("NVIDIA GeForce RTX 4090", 23.99), "rtx4090", "a run with auto has budget_gb 22.7")):
        monkeypatch.setattr(profiles, "detect_card", lambda card=card: card)
        assert main(["profiles", "auto"]) == 0
        head, _, rest = capsys.readouterr().out.partition("\n")
        assert head.startswith(f"# --profile auto picks {picked}: ") and said in head, head
        assert rest.startswith(shipped_profiles()[picked].read_text(encoding="utf-8"))
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("auto ") for line in out.splitlines())
    assert "auto card -5% The largest of these that the detected GPU holds" in " ".join(out.split())


def test_a_copied_profile_that_overrides_the_models_own_sampling_says_so(capsys, tmp_path, caplog):
    """`profiles cpu > mine.yaml` with one line edited trained the toy model at the copy's 10 DDIM steps and batch 2
    (the cpu profile's, written for the tiny model) instead of its own 20 and 4, in silence: its lines still win,
    and a line says which."""
    import logging

    from lowmem_alignprop.settings.profiles import resolve_config

    assert main(["profiles", "cpu"]) == 0
    (tmp_path / "mine.yaml").write_text(capsys.readouterr().out.replace("lr: 0.003", "lr: 0.002"))
    caplog.set_level(logging.WARNING, logger="lowmem_alignprop")
    _, cfg = resolve_config(str(tmp_path / "mine.yaml"), {"model": "toy"}, [])
    assert (cfg.sample_steps, cfg.batch_size, cfg.lr) == (10, 2, 0.002)
    assert ("your profile sets sample_steps 10, batch_size 2 over the toy model's own (sample_steps 20, batch_size 4)"
            ": its lines win; delete them to keep the model's") in caplog.messages
    caplog.clear()
    _, cfg = resolve_config("cpu", {"model": "toy"}, [])  # the shipped profile: the model's own, nothing said
    assert (cfg.sample_steps, cfg.batch_size) == (20, 4) and not caplog.messages


def test_output_into_a_closed_pipe_ends_quietly():
    """`lowmem-alignprop profiles | head -0`: the reader has left before the first line; no traceback, and the
    command does its work (a training run finishes: cli.ForgivingStream; it exited 141, as killed by SIGPIPE, which
    ended a run after its first step line). A pipe whose reading end is closed before the command starts: the first
    write fails, every time."""
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([sys.executable, "-m", "lowmem_alignprop", "profiles"], stdout=write,
                           stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]


HELP_OF_EVERY_COMMAND = """
import sys
from lowmem_alignprop.cli import main
for command in ([], ["plan"], ["sample"], ["profiles"], ["export"]):
    try:
        main([*command, "--help"])
    except SystemExit as e:
        assert e.code == 0, (command, e.code)
assert main(["profiles"]) == 0  # the listing only reads YAML files too
print("imported:", sorted({"torch", "diffusers", "transformers", "accelerate", "peft"} & set(sys.modules)))
"""


def test_help_says_what_the_default_run_trains():
    """--help lists the fields' own defaults (brightness, 512 px, batch 1...); its header says what the default run
    (the toy world on the cpu profile) trains instead, and that figure is the one the run resolves."""
    from lowmem_alignprop.cli import EPILOG
    from lowmem_alignprop.settings.profiles import resolve_config

    _, cfg = resolve_config("cpu", {"model": "toy"}, [])
    assert cfg.truncation == "fixed"
    assert f"trains {cfg.reward} at {cfg.resolution} px, batch {cfg.batch_size}, K={cfg.k};" in " ".join(EPILOG.split())


def test_sample_help_lists_the_fields_that_change_its_images_not_trainings():
    """`sample --help` listed every training field (the K range, the optimiser, checkpoints) that changes nothing
    there; now the fields of the images and their scores, with sample's own examples."""
    from lowmem_alignprop.cli import sample_parser

    text = sample_parser().format_help()
    fields = text.split("config fields", 1)[1]
    for name in ("guidance_scale", "sample_steps", "resolution", "negative_prompt", "reward", "prediction_type"):
        assert f"\n  {name} " in fields or f"\n  {name}[" in fields, name
    for name in ("kl_coeff", "k_max", "lr", "checkpoint_every", "ema_decay", "optimizer", "report_to", "prompt_order"):
        assert f"\n  {name} " not in fields and f"\n  {name}[" not in fields, name
    assert "lowmem-alignprop sample outputs/run/lora " in text and "accelerate launch" not in text
    # a model alone, no LoRA (refused before): said in the description, --lora's help and an example
    words = " ".join(text.split())
    assert "Without a LoRA: the model's own images" in words and "none: --model alone is sampled" in words
    assert "lowmem-alignprop sample --model merged/ --reward aesthetic # a model alone" in words


def test_prompts_help_names_every_kind_of_prompt_set_it_reads():
    """--prompts' help (train, plan, sample) said "built-in prompt set (simple_animals, toy-heldout, ...) or a UTF-8
    text file" while --prompts reads tables and hub datasets' files too (README, the prompts field's own help): a user
    reading --help did not learn that `--prompts prompts.csv` or `hf://datasets/...` works. Now it names every
    built-in set, every table kind and the hub address."""
    from lowmem_alignprop.cli import plan_parser, sample_parser, train_parser
    from lowmem_alignprop.step.prompt_tables import TABLE_KINDS
    from lowmem_alignprop.step.prompts import PROMPT_SETS

    for parser in (train_parser(), plan_parser(), sample_parser()):
        (action,) = [a for a in parser._actions if "--prompts" in a.option_strings]
        assert all(name in action.help for name in PROMPT_SETS), (parser.prog, action.help)
        assert all(kind in action.help for kind in TABLE_KINDS), (parser.prog, action.help)
        assert "text file" in action.help and "hf://datasets/OWNER/NAME[@REV][/FILE]" in action.help, action.help


def test_module_entry_point_and_help(capsys):
    r = subprocess.run([sys.executable, "-m", "lowmem_alignprop", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0
    for command in ("train", "plan", "sample", "export", "profiles"):  # the commands, listed where users look first
        assert f"\n  {command}   " in r.stdout.split("options:")[0], command
    for name in ("sample_steps", "guidance_scale", "eta", "truncation", "k_min", "k_max", "batch_size",
                 "grad_accum", "lr", "lora_rank", "resolution", "max_grad_norm", "--profile", "--set"):
        assert name in r.stdout, name
    # help only prints: no command's help imports torch or the diffusion libraries (seconds on a laptop)
    r = subprocess.run([sys.executable, "-c", HELP_OF_EVERY_COMMAND], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("usage: lowmem-alignprop") == 5 and r.stdout.endswith("imported: []\n"), r.stdout[-300:]
    # an error's exit status 2 through `python -m lowmem_alignprop`: the subprocesses of test_bad_input.py's
    # test_missing_model_weights and test_a_working_directory_deleted_before_a_command_starts_is_one_line below (a
    # third process here cost ~4-7 s of imports); the same bad input in this process
    capsys.readouterr()
    assert main(["--reward", "nope", "--profile", "cpu"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_under_a_launcher_rank_0_alone_prints_an_input_error_and_other_errors_name_their_rank(monkeypatch, capsys):
    import lowmem_alignprop.cli as cli
    from lowmem_alignprop.settings.errors import UserError, same_on_every_rank

    def input_error(argv):
        with same_on_every_rank():
            raise UserError("k=20 is larger than sample_steps=10")

    def rank_error(argv):
        raise UserError("step 3: the reward raised")

    def stopped_by_the_launcher(seconds):  # rank 0 failed alike and exited: the launcher ends this rank's wait
        raise SystemExit(-15)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cli, "cmd_train", input_error)
    monkeypatch.setattr("time.sleep", stopped_by_the_launcher)  # the wait that lets rank 0 print first
    with pytest.raises(SystemExit):
        cli.main([])
    assert capsys.readouterr().err == ""  # rank 0's line only
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # (a rank still there after it: test_distributed's)
    for rank, handler, printed in [("0", input_error, "error: k=20 is larger than sample_steps=10\n"),
                                   ("1", rank_error, "error: [rank 1] step 3: the reward raised\n")]:
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setattr(cli, "cmd_train", handler)
        assert cli.main([]) == 2
        assert capsys.readouterr().err == printed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the launcher's /proc/PID/cmdline")
def test_reading_the_launchers_command_line_leaves_no_file_open(monkeypatch):
    """Every run reads its parent's /proc/PID/cmdline: the file is closed (it raised "ResourceWarning: unclosed
    file" for each train, resume and --eval-every run)."""
    import warnings

    from lowmem_alignprop.commands.train_cmd import warn_if_launcher_started_fewer_processes

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_launcher_started_fewer_processes()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the launcher's /proc/PID/cmdline")
def test_a_launcher_that_started_one_process_of_several_is_pointed_out(monkeypatch, caplog):
    """`accelerate launch --cpu --num_processes 2` without --multi_gpu runs one plain process: the run says so."""
    import logging

    from lowmem_alignprop.commands.train_cmd import warn_if_launcher_started_fewer_processes

    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "accelerate", "launch",
                                 "--cpu", "--num_processes", "2", "-m", "lowmem_alignprop"])
    try:
        import time
        cmdline = f"/proc/{launcher.pid}/cmdline"
        for _ in range(200):  # until the child has exec'd (before, its cmdline is pytest's)
            if b"accelerate" in open(cmdline, "rb").read():
                break
            time.sleep(0.05)
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        monkeypatch.setattr(os, "getppid", lambda: launcher.pid)
        with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
            warn_if_launcher_started_fewer_processes()
        # (accelerate refuses --multi_gpu beside --cpu: replace it; without --cpu: add it)
        assert "accelerate launch was asked for 2 processes but started one: replace --cpu with --multi_gpu (it runs " \
               "on the CPU too), or run `accelerate config`" in caplog.text
        caplog.clear()
        real_open = open
        monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(path, *a, **k) if path != cmdline else
                            __import__("io").BytesIO(b"accelerate\0launch\0--num_processes\0" b"2\0-m\0x\0"))
        with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
            warn_if_launcher_started_fewer_processes()  # (the same launcher, read without its --cpu)
        assert "started one: add --multi_gpu (also on the CPU)" in caplog.text
        caplog.clear()
        monkeypatch.setenv("WORLD_SIZE", "2")  # the processes did start: nothing to say
        warn_if_launcher_started_fewer_processes()
        assert caplog.text == ""
    finally:
        launcher.kill()
        launcher.wait()


def test_ctrl_c_while_the_libraries_import_is_one_line(tmp_path, capsys, monkeypatch):
    """A Ctrl-C in the first seconds (quieting the libraries imports them) ends as one later: "interrupted", 130."""
    import lowmem_alignprop.cli as cli

    def importing():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "quiet_libraries", importing)
    assert main(["--output-dir", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err.strip() == "interrupted" and not (tmp_path / "run").exists()


GATED_REWARD = '''
import pathlib, time
import torch

def score(images, prompts):
    if not torch.is_grad_enabled():  # scoring sample's images (the start-up check runs with gradients)
        pathlib.Path(__file__).with_name("entered").touch()
        time.sleep(120)
    return images.mean(dim=(1, 2, 3))
'''


SIGTERM_REWARD = '''
import os, signal
import torch

def score(images, prompts):
    if not torch.is_grad_enabled():  # scoring sample's images (the start-up check runs with gradients)
        os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` or a scheduler would, while the folder is made
    return images.mean(dim=(1, 2, 3))
'''


def test_sigterm_ends_sample_as_ctrl_c_does_leaving_no_folder_in_process(tmp_path, tiny_dir, capsys,
                                                                         fresh_log_handlers):
    """`timeout`, a scheduler or `kill` sends SIGTERM: `sample` ends as for Ctrl-C ("interrupted", 128 + 15) and
    removes the output folder it made, which held only its lock (before: the process died there, the folder kept).
    The SIGTERM comes from the reward, in this process (no 10 s of imports; the subprocess test below, in -m slow,
    sends it from outside)."""
    import signal

    from pathlib import Path

    from loras import make_sd_lora

    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the premise: nobody's handler but the command's
    lora = make_sd_lora(Path(tiny_dir), tmp_path / "run", xl=False)["lora"]
    (tmp_path / "sigterm.py").write_text(SIGTERM_REWARD)
    out = tmp_path / "sample"
    assert main(["sample", str(lora), "--profile", "cpu", "--reward", f"{tmp_path / 'sigterm.py'}:score",
                 "--num-prompts", "1", "--set", "sample_steps=2", "--set", "resolution=32",
                 "--output-dir", str(out)]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert not out.exists() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.slow  # 12 s of a fresh process's imports; the in-process test above covers the same path
def test_sigterm_ends_sample_as_ctrl_c_does_leaving_no_folder(tmp_path, tiny_dir):
    """`timeout`, a scheduler or `kill` sends SIGTERM: `sample` ends as for Ctrl-C ("interrupted", 128 + 15) and
    removes the output folder it made, which held only its lock (before: the process died there, the folder kept)."""
    import signal
    import time

    from pathlib import Path

    from loras import make_sd_lora

    lora = make_sd_lora(Path(tiny_dir), tmp_path / "run", xl=False)["lora"]
    (tmp_path / "gated.py").write_text(GATED_REWARD)
    out = tmp_path / "sample"
    proc = subprocess.Popen([sys.executable, "-m", "lowmem_alignprop", "sample", str(lora), "--profile", "cpu",
                             "--reward", f"{tmp_path / 'gated.py'}:score", "--num-prompts", "1", "--set",
                             "sample_steps=2", "--set", "resolution=32", "--output-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "entered").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "entered").exists(), proc.communicate(timeout=60)[1][-2000:]
        assert (out / ".run.lock").exists()  # the folder it made, the images scored
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert not out.exists()


def test_a_reader_that_left_or_an_ascii_terminal_does_not_end_a_command(monkeypatch):
    """From the shell (argv None), stdout and stderr forgive: `... | head -1` ended a training run after its first
    step line with exit 141 and no LoRA (the reader left: the rest now goes to the null device), and
    PYTHONIOENCODING=ascii ended it on the step line's ± (now escaped)."""
    import io
    import os
    import sys

    from lowmem_alignprop import cli

    read, write = os.pipe()
    os.close(read)  # the reader left
    gone = io.TextIOWrapper(io.FileIO(write, "w"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", gone)
    monkeypatch.setattr(sys, "stderr", sys.stderr)  # restored after: main wraps both
    monkeypatch.setattr(sys, "argv", ["lowmem-alignprop", "profiles"])
    assert cli.main() == 0  # it was 141, as a program killed by SIGPIPE
    assert isinstance(sys.stdout, cli.ForgivingStream) and sys.stdout.stream is gone
    print("more", flush=True)  # and so on: nowhere, without an error
    ascii_out = cli.ForgivingStream(io.TextIOWrapper(io.BytesIO(), encoding="ascii"))
    ascii_out.write("step 1: reward 0.5 \u00b1 0.1")
    ascii_out.flush()
    assert ascii_out.stream.buffer.getvalue() == b"step 1: reward 0.5 \\xb1 0.1"


def test_a_full_disk_under_the_cache_names_the_cache_not_the_output_folder(tmp_path, monkeypatch):
    """The package's cache (the built tiny model, plan's estimates) on a full disk: the line names it and
    LOWMEM_ALIGNPROP_CACHE (it said to choose another --output-dir or --out, on a disk with room)."""
    import errno

    from lowmem_alignprop import cli

    monkeypatch.setenv("LOWMEM_ALIGNPROP_CACHE", str(tmp_path / "cache"))
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "tiny" / "unet.safetensors"))
    said = str(cli._out_of_space_or_memory(full))
    assert f"free space in {tmp_path / 'cache'} (or set LOWMEM_ALIGNPROP_CACHE to a folder on a disk with room" in said
    assert "--output-dir" not in said
    elsewhere = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "summary.json"))
    assert "free space (or choose another --output-dir or --out)" in str(cli._out_of_space_or_memory(elsewhere))


def test_a_working_directory_deleted_before_a_command_starts_is_one_line(tmp_path):
    """`cd DIR; rm -r DIR; lowmem-alignprop ...`: one line before any library imports (torch's lazy MKL load ended
    the process with "Intel oneMKL FATAL ERROR" and no word of ours)."""
    import shlex

    gone = tmp_path / "gone"
    gone.mkdir()
    command = (f"cd {shlex.quote(str(gone))} && rmdir {shlex.quote(str(gone))} && exec {shlex.quote(sys.executable)} "
               f"-m lowmem_alignprop --profile cpu --output-dir {shlex.quote(str(tmp_path / 'run'))}")
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("error: the working directory no longer exists: run the command "
                                                    "from a folder that exists (relative paths are read from there)")
    assert not (tmp_path / "run").exists()


def test_a_working_directory_deleted_while_a_command_starts_is_one_line(tmp_path, monkeypatch, capsys):
    """`cd DIR; lowmem-alignprop ... &` then DIR removed before the run holds its folder: one line (it was a
    FileNotFoundError from Path.cwd(), and the error handler's own cwd() raised again inside it)."""
    import os

    from lowmem_alignprop import cli

    there, calls = os.getcwd(), []

    def gone():  # there at the command's first look, gone after (a real deleted working directory also fails torch's
        calls.append(1)  # lazy MKL load, which ends pytest)
        if len(calls) == 1:
            return there
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(os, "getcwd", gone)
    assert cli.main(["--profile", "cpu", "--model", "tiny", "--output-dir", "run"]) == 2
    assert capsys.readouterr().err.strip() == ("error: the working directory was deleted while the command started: "
                                               "run it again from a folder that exists (relative paths are read "
                                               "from there)")


def test_the_folder_a_resume_looks_in_is_the_one_the_run_writes_to(tmp_path):
    """--output-dir A with --set output_dir=B: the run writes to B (--set wins), so --resume looks for its run in B,
    not in A (another run's folder, or none)."""
    from lowmem_alignprop.cli import _output_dir_flag, common_parser, config_from_args

    args = common_parser("t", "t").parse_args(["--profile", "cpu", "--output-dir", str(tmp_path / "a"),
                                               "--set", f"output_dir={tmp_path / 'b'}"])
    assert _output_dir_flag(args) == str(config_from_args(args)[1].output_dir) == str(tmp_path / "b")


def test_a_config_field_given_as_an_option_names_its_set(capsys):
    """`plan --batch-size 2` or `--card=rtx4090` (a field's name as an option, as README's `--set card=h100` reads) was
    argparse's bare "unrecognized arguments" with --help: the line names the --set that sets it."""
    cases = [(["plan", "--batch-size", "2"], "--batch-size 2: batch_size is a config field: use --set batch_size=2"),
             (["plan", "--card=rtx4090"], "--card=rtx4090: card is a config field: use --set card=rtx4090"),
             (["--resolution"], "--resolution: resolution is a config field: use --set resolution=VALUE"),
             (["sample", "x", "--guidance-scale", "5"], "--guidance-scale 5: guidance_scale is a config field: use "
                                                        "--set guidance_scale=5")]
    for argv, words in cases:
        assert main(argv) == 2, argv
        assert capsys.readouterr().err == f"error: unrecognized arguments: {words}\n", argv


def test_a_plan_that_auto_made_for_this_cpu_says_no_gpu_was_found(capsys, monkeypatch):
    """`plan` with the default --profile auto on a machine without a CUDA GPU planned for the CPU and said only
    "planned for this CPU": a user who expected their card's plan was not told that no card was detected."""
    from lowmem_alignprop.commands import plan_cmd
    from lowmem_alignprop.settings import profiles

    monkeypatch.setattr(profiles, "detect_card", lambda: None)
    assert main(["plan", "--model", "tiny", "--no-suggest", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["auto_found_no_gpu"] is True and planned["profile"] == "cpu"
    monkeypatch.setattr(plan_cmd, "plan", lambda *a, **k: dict(planned))  # (one estimate serves the table's cases)
    said = "; --profile auto, the default, found no CUDA GPU here;"
    for argv, auto in ((["plan", "--model", "tiny"], True), (["plan", "--model", "tiny", "--profile", "cpu"], False)):
        assert main(argv) == 0
        last = capsys.readouterr().out.rstrip().splitlines()[-1]
        assert last.startswith("  (planned for this CPU") and (said in last) == auto, last

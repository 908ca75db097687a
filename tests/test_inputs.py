"""step/inputs.py: bad input found before any model loads or anything is written (one UserError naming the fix)."""

import logging
import os
import tempfile

import pytest

from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.step.inputs import check_tracker, check_writable, prepare_inputs


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_prepare_inputs_returns_the_prompts_and_writes_nothing(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\ntwo blue squares\nthree green triangles\n")
    out = tmp_path / "runs" / "first"
    before = _listing(tmp_path)
    got = prepare_inputs(Config(prompts=str(prompts), output_dir=str(out), reward="brightness").validate())
    assert got == ["a red circle", "two blue squares", "three green triangles"]
    assert _listing(tmp_path) == before  # the output folder is not made, the write probe is gone


@pytest.mark.parametrize("change,needle", [
    # each row is broken in its own field and in every field checked after it: the first check's message wins
    ({"prompts": "no_such_set", "reward": "no_such_reward", "model": "/no/such/model"}, "unknown prompt set"),
    ({"reward": "no_such_reward", "model": "/no/such/model"}, "unknown reward"),
    ({"model": "/no/such/model", "report_to": "wandb"}, "model path /no/such/model does not exist"),
])
def test_the_first_bad_input_is_the_one_reported(change, needle, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name))
    cfg = Config(output_dir=str(tmp_path / "out"), **change).validate()
    with pytest.raises(UserError, match=needle):
        prepare_inputs(cfg)


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(UserError, match=r"--output-dir .*taken is a file: choose a directory"):
        prepare_inputs(Config(output_dir=str(tmp_path / "taken"), reward="brightness").validate())


def test_check_writable_probes_the_nearest_folder_that_exists(tmp_path, monkeypatch):
    probed = []
    real = tempfile.TemporaryFile

    def spy(*args, **kwargs):
        probed.append(kwargs["dir"])
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", spy)
    check_writable(tmp_path / "a" / "b" / "c")
    assert probed == [tmp_path]  # three levels that do not exist yet: the first one up that does
    assert os.listdir(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_writable(tmp_path / "file" / "run")


def test_a_folder_that_refuses_files_is_named_with_the_reason(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)  # root may write anywhere: the refusal is simulated
    with pytest.raises(UserError, match=r"is not writable \(Permission denied\): choose a folder"):
        check_writable(tmp_path / "run")


def test_a_tracker_needs_its_package(monkeypatch):
    import importlib.util

    check_tracker("none")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name))
    with pytest.raises(UserError, match=r"--report-to wandb needs the wandb package.*pip install wandb"):
        check_tracker("wandb")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name))
    with pytest.raises(UserError, match="needs the tensorboard package"):
        check_tracker("tensorboard")


def test_a_negative_prompt_on_an_sd_model_ignores_the_working_directorys_model_index(tmp_path, monkeypatch):
    """Config's FLUX check reads the model's folder and model_components' folder; an empty model_components is no
    folder, so a FLUX model_index.json in the working directory does not make an SD1.5 run a FLUX one."""
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    monkeypatch.chdir(tmp_path)
    cfg = Config(model="tiny", negative_prompt="blurry", output_dir=str(tmp_path / "out")).validate()
    assert cfg.negative_prompt == "blurry"
    with pytest.raises(UserError, match="FLUX.1 is guidance-distilled"):  # and a real FLUX folder is still refused
        Config(model=str(tmp_path), negative_prompt="blurry", output_dir=str(tmp_path / "out")).validate()


def test_compile_without_its_compiler_is_refused_before_loading(monkeypatch):
    """torch.compile failed at the first step, after the model loaded, where triton (CUDA; triton-windows on
    Windows) or a CPU compiler (MSVC's cl.exe on Windows) is missing: now one line at startup."""
    import importlib.util
    import shutil
    import sys

    import torch

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "triton" else real_find_spec(n, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(UserError, match=r"compile=nograd needs triton .*pip install triton-windows.*--set compile=none"):
        Config(compile="nograd").validate().check_installed()
    Config(compile="none").validate().check_installed()  # off: nothing needed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match=r"compile=regional needs a C\+\+ compiler .*cl\.exe"):
        Config(compile="regional").validate().check_installed()
    monkeypatch.setattr(sys, "platform", "linux")
    Config(compile="regional").validate().check_installed()  # torch's own toolchain there


def test_a_built_in_name_beside_a_folder_of_that_name_and_random_weights_are_said(tmp_path, monkeypatch, caplog):
    """--model sdxl beside a folder ./sdxl trained the random-weight architecture (2.6 B parameters, minutes on a
    CPU) without a word: the built-in name still comes first, said with the way to the folder; and a run on an
    architecture's random weights says its images are noise. A path is made absolute (the run's records work from
    any folder), a name is not."""
    from lowmem_alignprop.step.inputs import with_absolute_paths

    (tmp_path / "sdxl").mkdir()
    (tmp_path / "mine.txt").write_text("a cat\n")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        cfg = with_absolute_paths(Config(model="sdxl", prompts="mine.txt", output_dir=str(tmp_path / "run")))
        assert (cfg.model, cfg.prompts) == ("sdxl", str(tmp_path / "mine.txt"))
        assert caplog.messages == ["--model sdxl is the built-in one, not ./sdxl here: write ./sdxl for that"]
        caplog.clear()
        prepare_inputs(cfg.validate())
        assert [m for m in caplog.messages if "random weights" in m] == [
            "--model sdxl is the architecture with random weights (for planning and memory benchmarks): its images "
            "are noise, whatever the reward does; pass a hub id, a folder or a file for trained weights"]
        caplog.clear()
        prepare_inputs(Config(model="tiny", output_dir=str(tmp_path / "run")).validate())
        assert not [m for m in caplog.messages if "random weights" in m]


def test_a_path_with_dotdot_after_a_symlink_is_recorded_as_the_system_reads_it(tmp_path, monkeypatch):
    """'link/../p.txt' with link -> deep/inner is deep/p.txt to the system (and to cat); shortening it by its text
    named ./p.txt, another file, which the run then trained on and recorded. It is kept whole (absolute) there; a
    plain '..' is still shortened."""
    from lowmem_alignprop.step.inputs import with_absolute_paths

    (tmp_path / "deep" / "inner").mkdir(parents=True)
    (tmp_path / "deep" / "p.txt").write_text("a red cat\n")
    (tmp_path / "p.txt").write_text("a decoy\n")
    (tmp_path / "link é").symlink_to(tmp_path / "deep" / "inner")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    cfg = with_absolute_paths(Config(prompts="../link é/../p.txt", eval_prompts="../deep/inner/../p.txt"))
    assert cfg.prompts == str(tmp_path / "work" / ".." / "link é" / ".." / "p.txt")
    assert open(cfg.prompts).read() == "a red cat\n"
    assert cfg.eval_prompts == str(tmp_path / "deep" / "p.txt")


def test_a_reward_of_the_working_folder_is_recorded_by_its_absolute_file(tmp_path, monkeypatch):
    """'my_reward:score' imported from the working folder (and 'sub/r.py:f') is recorded as its file's absolute
    path, so that a resume or sample from another folder imports it; a built-in with a weight stays as written beside a
    file of its name, and an installed module stays a module."""
    from lowmem_alignprop.step.inputs import with_absolute_paths

    (tmp_path / "my_reward.py").write_text("def score(images):\n    return images.mean((1, 2, 3))\n")
    (tmp_path / "brightness.py").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "r.py").write_text("def f(images):\n    return images.mean((1, 2, 3))\n")
    monkeypatch.chdir(tmp_path)
    spec = with_absolute_paths(Config(reward="my_reward:score:0.5,brightness:1,sub/r.py:f,json:dumps")).reward
    assert spec == f"{tmp_path / 'my_reward.py'}:score:0.5,brightness:1,{tmp_path / 'sub' / 'r.py'}:f,json:dumps"

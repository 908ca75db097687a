"""Checkpoints and resume on the tiny model: 6 steps == 3 steps + 3 resumed; atomic writes; Ctrl-C."""

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.run import resume_rules
from lowmem_alignprop.cli import main
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.step.prompts import PROMPT_SETS
from refusals import strict_rows, timed_mean

# Small and fast, but with everything that must continue across a resume: gradient accumulation over two
# micro-batches, K drawn at random per rollout (python RNG), DDIM noise (eta=1), AdamW moments.
FAST = ["--profile", "cpu", "--seed", "3", "--set", "sample_prompts=0", "--set", "sample_steps=4",
        "--set", "batch_size=1", "--set", "grad_accum=2", "--set", "truncation=uniform", "--set", "k_min=1",
        "--set", "k_max=2", "--set", "lr=0.01"]
# FAST with one micro-batch a step (half the rollouts): for the tests whose point is not what gradient accumulation
# carries across a resume (the runs fixture and the shuffled-pass test keep FAST's two, and so do the signal tests,
# whose signal comes in a step's first micro-batch while the step must finish its second, and the prompt-file test,
# whose summary compares rows that each hold both prompts)
LIGHT = [a.replace("grad_accum=2", "grad_accum=1") for a in FAST]


# one worker runs this file: its module fixture (three training runs) is then made once, not once per worker
pytestmark = pytest.mark.xdist_group("resume")


def weights(path):
    return load_file(str(path / "trainable.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dir):
    base = tmp_path_factory.mktemp("resume")
    full, split = base / "full", base / "split"
    assert main([*FAST, "--output-dir", str(full), "--steps", "6"]) == 0
    assert main([*FAST, "--output-dir", str(split), "--steps", "3", "--checkpoint-every", "1"]) == 0
    first_half = strict_rows(split)
    # the resumed run keeps its own settings (FAST's); the flags given change them: --steps extends it, and
    # checkpoints now come every 3 steps (so step 3's stays beside step 6 under keep_checkpoints=2)
    assert main(["--output-dir", str(split), "--steps", "6", "--resume", "latest", "--checkpoint-every", "3"]) == 0
    return full, split, first_half


def test_six_steps_equal_three_plus_three_resumed(runs):
    full, split, first_half = runs
    a, b = strict_rows(full), strict_rows(split)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # metrics continue in the same file
    assert b[:3] == [dict(r) for r in first_half]  # the first half is kept as it was
    for x, y in zip(a, b):
        assert x["k_all"] == y["k_all"]  # the prompt/K random stream continued
        assert y["reward_mean"] == pytest.approx(x["reward_mean"], abs=1e-6)
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    assert len({tuple(r["k_all"]) for r in a}) > 1  # K really was random: the test can fail on a lost RNG state
    wa, wb = weights(full / "checkpoints" / "step-00000006"), weights(split / "checkpoints" / "step-00000006")
    assert set(wa) == set(wb) and len(wa) > 0
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    # ... and the trained LoRA moved: a broken resume that reloads the initial weights would fail above
    w0 = weights(split / "checkpoints" / "step-00000003")
    assert max((wa[k] - w0[k]).abs().max().item() for k in wa) > 1e-4
    # the exported LoRA is the same as well
    la, lb = load_file(str(full / "lora" / "pytorch_lora_weights.safetensors")), \
        load_file(str(split / "lora" / "pytorch_lora_weights.safetensors"))
    assert max((la[k] - lb[k]).abs().max().item() for k in la) < 1e-6
    sa, sb = json.loads((full / "summary.json").read_text()), json.loads((split / "summary.json").read_text())
    assert sb["reward_first"] == pytest.approx(sa["reward_first"], abs=1e-6)  # history came back from the checkpoint
    assert sb["resumed_from"].endswith("step-00000003")
    # the speed of the steps this start trained (a resume on another machine says its own), its warm-up and counted
    # steps left out
    assert sb["seconds_per_step"] == pytest.approx(timed_mean(split, b[3:]), rel=1e-9)
    assert sb["seconds_per_step"] != pytest.approx(sum(r["seconds"] for r in b[3:]) / 3, rel=1e-9)


def test_a_resume_that_renders_no_after_samples_does_not_pass_off_the_earlier_grid(tmp_path, caplog):
    """A 1-step run renders its before/after grid (of step 1's LoRA); a resume to step 2 with sample_prompts=0 renders
    none: the grid stayed, and the export's card showed it as step 2's "before and after training". Now said, in
    summary.json (samples_stale: the step it shows) and left out of the card."""
    run = tmp_path / "run"
    one = [a.replace("sample_prompts=0", "sample_prompts=1") for a in LIGHT]
    assert main([*one, "--output-dir", str(run), "--steps", "1"]) == 0
    assert json.loads((run / "samples" / "before_after.json").read_text())["step"] == 1
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main(["--output-dir", str(run), "--steps", "2", "--resume", "latest", "--set", "sample_prompts=0"]) == 0
    assert "samples/before_after.png shows step 1's LoRA: this start rendered no after samples" in caplog.text
    assert json.loads((run / "summary.json").read_text())["samples_stale"] == 1
    assert main(["export", str(run), "--format", "kohya", "--out", str(tmp_path / "k")]) == 0
    card = (tmp_path / "k" / "README.md").read_text()
    assert "before_after.png" not in card and not (tmp_path / "k" / "before_after.png").exists()


def test_a_shuffled_pass_goes_on_where_it_stood_at_a_resume_that_changes_the_batch(tmp_path):
    """prompt_order=shuffled draws rollout n as place n of the passes: a resume with another batch_size or grad_accum
    counted n from its new sizes (steps x 3 for steps x 2 before), skipping and repeating prompts of the pass. The
    checkpoint now counts the rollouts drawn: the 7 of steps 1-3 are places 0-6 of the pass, as drawn in one go."""
    from lowmem_alignprop.step.prompts import draw_prompts

    run = tmp_path / "run"
    args = [*FAST, "--set", "prompt_order=shuffled", "--output-dir", str(run)]
    assert main([*args, "--steps", "2", "--checkpoint-every", "1"]) == 0  # 1 x 2 micro-batches a step: rollouts 0-3
    assert main([*args, "--steps", "3", "--resume", "latest", "--set", "batch_size=3", "--set", "grad_accum=1"]) == 0
    prompts = json.loads((run / "prompts.json").read_text())["train"]
    drawn = [prompts[i] for r in strict_rows(run) for i in r["prompt_ids"]]
    assert drawn == draw_prompts(prompts, "shuffled", None, 0, 7, seed=3 * 1000)  # (rank 0's seed: seed x 1000)
    assert json.loads((run / "checkpoints" / "step-00000003" / "state.json").read_text())["rollouts"] == 7


def test_resuming_an_older_checkpoint_does_not_call_config_yaml_edited(tmp_path, caplog):
    """A later start wrote config.yaml (--set lr=0.02 at a resume); resuming the checkpoint before it (a branch) said
    "config.yaml was edited since the checkpoint (lr 0.01 -> 0.02) ... e.g. --set lr=0.02": nobody edited it, and the
    advice grafts the other branch's setting onto this one. Said only for the newest checkpoint (above)."""
    run = tmp_path / "run"
    assert main([*LIGHT, "--output-dir", str(run), "--steps", "1", "--checkpoint-every", "1"]) == 0
    assert main(["--output-dir", str(run), "--steps", "2", "--resume", "latest", "--set", "lr=0.02"]) == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main(["--output-dir", str(run), "--steps", "2", "--resume", str(run / "checkpoints" / "step-00000001")
                     ]) == 0
    assert "was edited" not in caplog.text and "superseded" in caplog.text  # (the newer step set aside, said)


def test_a_checkpoint_in_no_runs_folder_says_where_the_run_goes_on(runs, tmp_path, caplog, monkeypatch):
    """--resume of a checkpoint copied out of its run folder: the run went on in ./outputs/run, said only by the
    closing box; said at the start now."""
    lone = tmp_path / "lone" / "step-00000006"
    shutil.copytree(runs[1] / "checkpoints" / "step-00000006", lone)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main(["--resume", str(lone), "--steps", "7"]) == 0
    assert (f"--resume {lone} is in no run's checkpoints/ folder: the run goes on in outputs/run (--output-dir "
            "chooses)") in caplog.text
    assert (tmp_path / "outputs" / "run" / "lora").is_dir()


def test_a_resume_that_changes_the_reward_compares_only_the_steps_it_scored(runs, tmp_path):
    """The summary's first -> last reward (and its box line) compares the steps scored by the run's reward: after a
    resume that changed it, those from the resume on, also at a later resume that keeps it."""
    from lowmem_alignprop.run.runfolder import first_last_rewards

    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    before = json.loads((run / "checkpoints" / "step-00000006" / "state.json").read_text())["config"]["reward"]
    assert before != "colorfulness"
    assert main(["--output-dir", str(run), "--steps", "8", "--resume", "latest", "--reward", "colorfulness"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["reward_since_step"] == 7 and summary["reward_steps"] == 2
    assert summary["reward_first"] == first_last_rewards(strict_rows(run)[6:])["reward_first"]
    assert main(["--output-dir", str(run), "--steps", "9", "--resume", "latest", "--reward", "colorfulness"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["reward_since_step"] == 7 and summary["reward_steps"] == 3
    assert summary["reward_last"] == first_last_rewards(strict_rows(run)[6:])["reward_last"]
    from lowmem_alignprop.lora.lora_files import read_lora
    card = read_lora(str(run / "checkpoints" / "step-00000009")).summary  # export's model card of the checkpoint
    assert (card["reward_first"], card["reward_last"]) == (summary["reward_first"], summary["reward_last"])
    assert card["reward_since_step"] == 7
    # the exported card says the reward changed and what its first -> final compares (it showed colorfulness alone)
    for lora in (run / "lora", run / "checkpoints" / "step-00000009"):
        out = tmp_path / f"card-{lora.name}"
        assert main(["export", "--lora", str(lora), "--format", "kohya", "--out", str(out)]) == 0
        text = (out / "README.md").read_text()
        assert "| reward | colorfulness (from step 7: a resume changed it or how the images are made) |" in text
        assert "| training reward, first -> final steps (since step 7) |" in text


def test_the_model_card_lists_what_each_resume_changed_of_the_training(runs, tmp_path):
    """A resume with another K or learning rate: the card's rows give the last start's settings, so it said K = 2
    for a LoRA whose first steps trained with K = 1. Each resume's changes are listed with their step, from the
    summary and from a checkpoint alike; the output settings (steps) are none of them."""
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    was = json.loads((run / "checkpoints" / "step-00000006" / "state.json").read_text())["config"]
    assert main(["--output-dir", str(run), "--steps", "7", "--resume", "latest", "--set", "truncation=fixed",
                 "--set", f"k={was['k'] + 1}"]) == 0
    assert main(["--output-dir", str(run), "--steps", "8", "--resume", "latest", "--set", "lr=0.0005",
                 "--set", "negative_prompt=blurry"]) == 0
    first = {"step": 7, "changes": {"k": [was["k"], was["k"] + 1]}}
    if was["truncation"] != "fixed":
        first["changes"]["truncation"] = [was["truncation"], "fixed"]
    expected = [first, {"step": 8, "changes": {"lr": [was["lr"], 0.0005], "negative_prompt": ["", "blurry"]}}]
    summary = json.loads((run / "summary.json").read_text())
    assert [{**r, "changes": dict(sorted(r["changes"].items()))} for r in summary["resume_changes"]] == [
        {**r, "changes": dict(sorted(r["changes"].items()))} for r in expected]
    for lora in (run / "lora", run / "checkpoints" / "step-00000008"):
        out = tmp_path / f"card-{lora.name}"
        assert main(["export", "--lora", str(lora), "--format", "kohya", "--out", str(out)]) == 0
        row = next(line for line in (out / "README.md").read_text().splitlines() if "changed by a resume" in line)
        assert "from step 7: " in row and f"`--set k={was['k'] + 1}` (was {was['k']})" in row, row
        assert "from step 8: " in row and f"`--set lr=0.0005` (was {was['lr']})" in row, row
        assert "`--set negative_prompt=blurry` (was empty)" in row, row


def test_the_model_card_says_the_folder_of_each_start_that_named_a_relative_path(runs, tmp_path, monkeypatch):
    """command.txt keeps each start's command as typed: `--output-dir run` names nothing without the folder it ran
    in. Each start's folder is recorded (summary.json's and each checkpoint's start_dirs, aligned with its lines), and
    the card puts `# in DIR` over each command with a relative path: a resume from one folder and one from another
    show their own; the fixture's starts, absolute, none; a card for the hub, none (its paths go by name). An export
    named relative to another folder than the run's said nothing: it read as run where the last start was."""
    from lowmem_alignprop.lora.lora_files import read_lora
    from lowmem_alignprop.lora.model_card import model_card

    one, two = tmp_path / "one", tmp_path / "two"
    two.mkdir()
    shutil.copytree(runs[1], one / "run")
    monkeypatch.chdir(one)
    assert main(["--output-dir", "run", "--steps", "7", "--resume", "latest", "--checkpoint-every", "1"]) == 0
    monkeypatch.chdir(two)
    assert main(["--output-dir", "../one/run", "--steps", "8", "--resume", "latest"]) == 0
    run = one / "run"
    commands = (run / "command.txt").read_text().splitlines()
    assert len(commands) == 4 and commands[2:] == [
        "lowmem-alignprop --output-dir run --steps 7 --resume latest --checkpoint-every 1",
        "lowmem-alignprop --output-dir ../one/run --steps 8 --resume latest"]
    fixture = json.loads((runs[1] / "summary.json").read_text())["start_dirs"]
    assert len(fixture) == 2 and json.loads((run / "summary.json").read_text())["start_dirs"] == [
        *fixture, str(one), str(two)]
    for lora, dirs in ((run / "lora", [one, two]), (run / "checkpoints" / "step-00000007", [one])):
        out = tmp_path / f"card-{lora.name}"
        assert main(["export", "--lora", str(lora), "--format", "kohya", "--out", str(out)]) == 0
        card = (out / "README.md").read_text().splitlines()
        made = card[card.index("```bash") + 1:]
        assert [line for line in made if line.startswith("# in ")] == [f"# in {d}" for d in dirs]
        assert made[:2 * len(dirs) + 2] == commands[:2] + [x for d, c in zip(dirs, commands[2:])
                                                           for x in (f"# in {d}", c)]
    # an export of its own folder, named relative to it (not where the run started): `# in` it too, unless the
    # nearest `# in` above says that folder already (a `# in` holds until the next, as a shell's cd)
    for folder, said in ((one, [f"# in {one}"]), (two, [])):
        monkeypatch.chdir(folder)
        lora = "run/lora" if folder == one else "../one/run/lora"
        assert main(["export", "--lora", lora, "--format", "kohya", "--out", "relative"]) == 0
        card = (folder / "relative" / "README.md").read_text().splitlines()
        made = card[card.index("```bash") + 1:card.index("```", card.index("```bash"))]
        assert made[-3 - len(said):] == [f"# in {two}", commands[-1], *said,
                                         f"lowmem-alignprop export --lora {lora} --format kohya --out relative"], made
    pushed = model_card(read_lora(str(run / "lora")), "kohya", ["x.safetensors"], "lowmem-alignprop export",
                        home="you/lora")
    assert "# in " not in pushed and "--output-dir run --steps 7" in pushed
    summary = json.loads((run / "summary.json").read_text())  # a run from before the record: the card as before
    (run / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "start_dirs"}))
    edit_states(run, lambda state: state.pop("start_dirs"))
    assert main(["export", "--lora", str(run / "lora"), "--format", "kohya", "--out", str(tmp_path / "old")]) == 0
    card = (tmp_path / "old" / "README.md").read_text()
    assert "# in " not in card and "\n".join(commands) in card


@pytest.mark.parametrize("command, relative", [
    ("--output-dir runs/x", True), ("--output-dir=runs/x", True), ("--prompts p.txt", True),
    ("--profile ../mine.yaml", True), ("--set vae=./v", True), ("--set init_lora=lora", True),
    ("--reward a:1,./r.py:f", True), ("--resume checkpoints/step-00000003", True), ("--model here", True),
    ("--output-dir /abs/x --prompts simple_animals --profile cpu", False), ("--resume latest --set lr=-1", False),
    ("--model owner/name --reward aesthetic --set vae=/v", False), ("--output-dir '/a b' --steps 3", False),
    ("--prompts hf://datasets/o/n --set eval_prompts=hf://datasets/o/n@v1/x.csv", False), ("--prompts t.csv", True)])
def test_which_recorded_commands_name_a_relative_path(tmp_path, command, relative):
    """A hub id, a shipped or built-in name and an absolute path need no folder; a path option's relative value, a
    ./ or ../ path and a name of something in the start's folder do."""
    from lowmem_alignprop.lora.model_card import has_relative_path

    (tmp_path / "here").mkdir()
    assert has_relative_path(f"lowmem-alignprop {command}", tmp_path) is relative


def test_a_model_the_environment_chose_is_in_the_recorded_command(tmp_path, monkeypatch):
    """$LOWMEM_ALIGNPROP_MODEL chose the model (no --model): command.txt and the model card's command recorded the
    line alone, which, run again where the variable is unset, trained the toy world. The line now starts with the
    variable: run as written from another folder, it trains the same LoRA bit for bit; a resume's line (its run's
    model) is as typed."""
    import shlex

    import torch

    from lowmem_alignprop.lora.lora_files import read_lora
    from lowmem_alignprop.lora.model_card import has_relative_path, training_command
    from lowmem_alignprop.run.filenames import LORA_WEIGHT_NAME
    from lowmem_alignprop.settings.config import MODEL_ENV

    args = [*LIGHT, "--steps", "1", "--output-dir", "run"]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    monkeypatch.setenv(MODEL_ENV, "tiny")
    monkeypatch.chdir(one)
    assert main(args) == 0
    [line] = (one / "run" / "command.txt").read_text().splitlines()
    assert line == shlex.join([f"{MODEL_ENV}=tiny", "lowmem-alignprop", *args])
    assert training_command(read_lora(str(one / "run" / "lora"))) == line
    monkeypatch.delenv(MODEL_ENV)  # another shell: the line sets what it needs
    monkeypatch.chdir(two)
    words = shlex.split(line)
    at = words.index("lowmem-alignprop")
    for name, value in (w.split("=", 1) for w in words[:at]):  # the shell's assignments before the program
        monkeypatch.setenv(name, value)
    assert main(words[at + 1:]) == 0
    a, b = (load_file(str(f / "run" / "lora" / LORA_WEIGHT_NAME)) for f in (one, two))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["--output-dir", "run", "--resume", "latest", "--steps", "2"]) == 0
    assert (two / "run" / "command.txt").read_text().splitlines() == [
        line, "lowmem-alignprop --output-dir run --resume latest --steps 2"]
    # the variable's model is a path relative to the folder the line ran in when it names one there
    (tmp_path / "here").mkdir()
    assert has_relative_path(f"{MODEL_ENV}=here lowmem-alignprop --steps 2", tmp_path)
    assert not has_relative_path(f"{MODEL_ENV}=tiny lowmem-alignprop --steps 2", tmp_path)


def test_a_learning_rate_schedule_goes_on_at_a_resume_as_if_never_stopped(tmp_path, caplog):
    """lr_scheduler=cosine with 2 warmup steps: a run whose reward exits (sys.exit) in step 3, resumed, trains steps 3
    and 4 at the rates an uninterrupted run does (diffusers' schedule after 2 and 3 steps) to the same LoRA; a resume
    that moves the run's last step, where the cosine ends, says so."""
    reward, mark = tmp_path / "mine.py", tmp_path / "calls_left"
    reward.write_text("import glob, os, sys\n"
                      f"MARK, KEPT = {str(mark)!r}, {str(tmp_path / 'split' / 'checkpoints' / 'step-*')!r}\n"
                      "def score(images):\n"
                      "    if os.path.exists(MARK) and len(glob.glob(KEPT)) == 2:  # in step 3\n"
                      "        os.remove(MARK)\n"
                      "        sys.exit(3)\n"
                      "    return images.mean(dim=(1, 2, 3))\n")
    args = [*LIGHT, "--reward", f"{reward}:score", "--steps", "4", "--set", "lr_scheduler=cosine",
            "--set", "lr_warmup_steps=2", "--checkpoint-every", "1"]
    assert main([*args, "--output-dir", str(tmp_path / "full")]) == 0
    mark.write_text("")
    assert main([*args, "--output-dir", str(tmp_path / "split")]) != 0
    assert [r["step"] for r in strict_rows(tmp_path / "split")] == [1, 2] and not mark.exists()
    assert main([*args, "--output-dir", str(tmp_path / "split"), "--resume", "latest"]) == 0
    full, split = strict_rows(tmp_path / "full"), strict_rows(tmp_path / "split")
    # from 0 over the warmup, lr=0.01 at step 3, then half of it: cos(pi/2) of the cosine's two steps
    assert [r["lr"] for r in split] == [r["lr"] for r in full] == pytest.approx([0.0, 0.005, 0.01, 0.005], abs=1e-12)
    wa = weights(tmp_path / "full" / "checkpoints" / "step-00000004")
    wb = weights(tmp_path / "split" / "checkpoints" / "step-00000004")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    # another schedule at a resume that moves the last step: both said, and the schedule recorded as a change of what
    # the LoRA trained with (the card lists it)
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main([*args, "--output-dir", str(tmp_path / "full"), "--resume", "latest", "--steps", "5",
                     "--set", "lr_scheduler=linear"]) == 0
    assert "resume: steps was 4 in the checkpoint, now 5: from step 5 the learning rate follows the 5-step linear " \
           "schedule: 0.00333 there, down from 0.005 at step 4 (the checkpoint's 4-step cosine schedule)" in caplog.text
    assert "resume: lr_scheduler was 'cosine' in the checkpoint, now 'linear'" in caplog.text
    changes = json.loads((tmp_path / "full" / "summary.json").read_text())["resume_changes"]
    assert changes[-1] == {"step": 5, "changes": {"lr_scheduler": ["cosine", "linear"]}}, changes
    # the same schedule made longer: the rate rises again where the checkpoint's had decayed, and says so
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main([*args, "--output-dir", str(tmp_path / "full"), "--resume", "latest", "--steps", "8",
                     "--set", "lr_scheduler=linear"]) == 0
    rows = strict_rows(tmp_path / "full")
    assert [r["lr"] for r in rows[-3:]] == pytest.approx([0.01 * 3 / 6, 0.01 * 2 / 6, 0.01 * 1 / 6], abs=1e-12)
    assert "resume: steps was 5 in the checkpoint, now 8: from step 6 the learning rate follows the 8-step linear " \
           "schedule: 0.005 there, up from 0.00333 at step 5 (the checkpoint's 5-step linear schedule), 0.00167 at " \
           "step 8" in caplog.text


def test_a_reward_file_edited_before_a_resume_counts_as_another_reward(tmp_path, tiny_dir, caplog):
    """A user reward fixed between a failure and `--resume latest` (as the failure's line invites) is the same spec
    but another reward: a scale x100 -> x1 read as a collapse of the summary's reward and kept best/ (on the old
    scale) for good, the early stop firing on it. Its source's digest in the checkpoint tells: said, the summary
    compares from the resume on, best/ and the patience start over."""
    reward = tmp_path / "mine.py"
    reward.write_text("def score(images):\n    return images.mean(dim=(1, 2, 3)) * 100\n")
    run = tmp_path / "run"
    (tmp_path / "eval.txt").write_text("a night sky\na dark cave\n")
    args = [*LIGHT, "--reward", f"{reward}:score", "--output-dir", str(run), "--eval-every", "1", "--early-stop", "2",
            "--set", f"eval_prompts={tmp_path / 'eval.txt'}"]
    assert main([*args, "--steps", "2"]) == 0
    assert main([*args, "--steps", "3", "--resume", "latest"]) == 0  # unchanged: nothing said
    assert not [r for r in caplog.records if "changed since the checkpoint" in r.getMessage()]
    # which version of the file trained: the summary and the card give `sha256sum mine.py`'s first 16 digits
    first = hashlib.sha256(reward.read_bytes()).hexdigest()[:16]
    assert json.loads((run / "summary.json").read_text())["reward_sha"] == first
    from lowmem_alignprop.lora import lora_files
    from lowmem_alignprop.lora.model_card import model_card
    card = model_card(lora_files.read_lora(str(run / "lora")), "diffusers", [], "lowmem-alignprop export")
    assert f"| reward | {reward}:score, source sha256 {first}... |" in card
    assert lora_files.read_lora(str(ckpt.find_resume(run, "latest"))).summary["reward_sha"] == first  # a checkpoint's
    reward.write_text("def score(images):\n    return images.mean(dim=(1, 2, 3))\n")
    for name in [n for n in sys.modules if n.startswith("lowmem_alignprop_user_reward_mine_")]:
        del sys.modules[name]  # (a process loads a reward file once: the next command's process reads it again)
    assert main([*args, "--steps", "5", "--resume", "latest"]) == 0
    said = [r.getMessage() for r in caplog.records if "changed since the checkpoint" in r.getMessage()]
    assert said[0] == (f"resume: the source of --reward {reward}:score changed since the checkpoint: it counts as "
                       "another reward (the summary compares its steps from step 4 on)"), said
    assert "best/ and the early stop's patience start over" in said[1]
    rows = strict_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # no early stop on the old scale's best
    assert min(r["eval_reward"] for r in rows[:3]) > 10 > max(r["eval_reward"] for r in rows[3:])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["reward_since_step"] == 4 and summary["reward_first"] < 10 and summary["best_step"] >= 4
    assert summary["reward_sha"] == hashlib.sha256(reward.read_bytes()).hexdigest()[:16] != first
    assert summary["resume_changes"][-1]["changes"]["reward_source"] == [first, summary["reward_sha"]]
    _sample_says_an_edited_reward_file(tmp_path, run, reward, summary["reward_sha"], caplog)


def _sample_says_an_edited_reward_file(tmp_path, run, reward, trained, caplog):
    """`sample` of the run's LoRA copied away, of its checkpoint and of an `export --merge` of it scores with the
    run's reward file where it is at hand: it says where that file holds another source now than the one the LoRA
    last trained with (base_model.json's, state.json's, merged_loras.json's reward_sha), and nothing while unchanged."""
    import argparse

    from lowmem_alignprop.commands.sample_cmd import take_run_settings
    from lowmem_alignprop.run.filenames import LORA_BASE_FILE

    from lowmem_alignprop.lora import lora_files
    from lowmem_alignprop.lora.model_card import model_card

    shutil.copytree(run / "lora", tmp_path / "copied")
    assert json.loads((tmp_path / "copied" / LORA_BASE_FILE).read_text())["reward_sha"] == trained
    card = model_card(lora_files.read_lora(str(tmp_path / "copied")), "diffusers", [], "lowmem-alignprop export")
    assert f"| reward | {reward}:score, source sha256 {trained}... |" in card  # (no summary.json beside a copy)
    assert main(["export", "--lora", str(tmp_path / "copied"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    named = {"copied": ["--lora", str(tmp_path / "copied")], "merged": ["--model", str(tmp_path / "merged")],
             "checkpoint": ["--lora", str(ckpt.find_resume(run, "latest"))]}

    def said() -> dict[str, str]:
        out = {}
        for what, argv in named.items():
            caplog.clear()
            args = argparse.Namespace(lora=argv[1:] if argv[0] == "--lora" else [], set=[], reward=None, prompts=None,
                                      model=argv[1] if argv[0] == "--model" else None, recipe=None, output_dir="out")
            with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
                take_run_settings(args, [])
            assert f"reward={reward}:score" in args.set, (what, args.set)  # (the run's reward scores)
            out[what] = " ".join(r.getMessage() for r in caplog.records if "source sha256" in r.getMessage())
        return out

    assert said() == {"copied": "", "merged": "", "checkpoint": ""}
    reward.write_text("def score(images):\n    return images.mean(dim=(1, 2, 3)) * 2\n")
    now = hashlib.sha256(reward.read_bytes()).hexdigest()[:16]
    tail = (f" trained with --reward {reward}:score at source sha256 {trained}...; that file holds another now "
            f"({now}...): the scores are this version's, not its run's")
    assert said() == {"copied": f"--lora {tmp_path / 'copied'}{tail}",
                      "merged": f"--model {tmp_path / 'merged'}'s LoRA {tmp_path / 'copied'}{tail}",
                      "checkpoint": f"--lora {ckpt.find_resume(run, 'latest')}{tail}"}


def test_a_resume_whose_evaluation_measures_otherwise_says_the_early_stop_it_cannot_make(tmp_path, tiny_dir, caplog):
    """A resume whose held-out evaluation measures otherwise (here reward_cap, new) starts best/ and the patience over:
    the start-of-run note counts the best, then early_stop more, as the run will. It counted the checkpoint's spent
    patience instead and said nothing, though evaluations 3 and 4 (before the last, 5) cannot make best + 2."""
    run = tmp_path / "run"
    (tmp_path / "eval.txt").write_text("a night sky\na dark cave\n")
    args = [*LIGHT, "--reward", "brightness", "--output-dir", str(run), "--eval-every", "1", "--early-stop", "2",
            "--set", f"eval_prompts={tmp_path / 'eval.txt'}"]
    assert main([*args, "--steps", "2"]) == 0
    caplog.clear()
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    assert main([*args, "--steps", "5", "--resume", "latest", "--set", "reward_cap=1000"]) == 0
    said = [r.getMessage() for r in caplog.records if "cannot stop this run" in r.getMessage()]
    assert said == ["early_stop=2 cannot stop this run: it evaluates 2 time(s) before its last step (every 1 of 5 "
                    "steps, from step 3), and a stop needs 3 (the best, then 2 without improving); use --steps 6 "
                    "or more (or a smaller --early-stop)"]
    rows = strict_rows(run)
    assert [(r["step"], r["eval_best_step"] >= 3) for r in rows[2:]] == [(3, True), (4, True), (5, True)]


def test_a_prompt_file_edited_before_a_resume_is_said(tmp_path, tiny_dir, caplog):
    from lowmem_alignprop.run.runfolder import first_last_rewards

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    run = tmp_path / "run"
    args = [*FAST, "--prompts", str(prompts), "--output-dir", str(run)]
    assert main([*args, "--steps", "1"]) == 0
    assert main([*args, "--steps", "2", "--resume", "latest"]) == 0  # unchanged: nothing said
    assert not [r for r in caplog.records if "changed since the checkpoint" in r.getMessage()]
    prompts.write_text("a green bird\na blue dog\n")
    assert main([*args, "--steps", "3", "--resume", "latest"]) == 0
    said = [r.getMessage() for r in caplog.records if "changed since the checkpoint" in r.getMessage()]
    assert said == [f"resume: {prompts} changed since the checkpoint: the rows before step 3 of metrics.jsonl index "
                    "its earlier prompts (prompt_ids)"]
    # the summary's first -> last reward does not pair prompt 0 of the old file with prompt 0 of the new one: the
    # rows before step 3 index other prompts, so it compares every image's mean (different prompts), also at a
    # later resume that keeps the file
    for steps in (3, 4):
        if steps == 4:  # config.yaml edited by hand meanwhile: said (a resume trains the checkpoint's settings)
            config = run / "config.yaml"
            config.write_text(config.read_text().replace("\nlr: ", "\nlr: 0.5 #"))
            caplog.clear()
            assert main([*args, "--steps", "4", "--resume", "latest"]) == 0
            [edited] = [r.getMessage() for r in caplog.records if "config.yaml was edited" in r.getMessage()]
            assert edited.startswith("resume: config.yaml was edited since the checkpoint (lr ") and \
                edited.endswith("-> 0.5): a resume trains with the checkpoint's settings and the flags given now, "
                                "and writes config.yaml again; give a change as a flag, e.g. --set lr=0.5")
            assert "\nlr: 0.5" not in config.read_text()
        # prompts.json keeps the list the steps before the change index
        kept = json.loads((run / "prompts.json").read_text())
        assert kept["train"] == ["a green bird", "a blue dog"]
        assert kept["earlier"] == [{"until_step": 2, "train": ["a red cat", "a blue dog"]}]
        summary = json.loads((run / "summary.json").read_text())
        rows = strict_rows(run)
        assert summary["prompts_since_step"] == 3 and summary["reward_prompts"] is None
        n = summary["reward_window"]
        assert summary["reward_first"] == pytest.approx(sum(r["reward_mean"] for r in rows[:n]) / n, rel=1e-6)
        assert first_last_rewards(rows)["reward_prompts"]  # the ids alone would pair them
    # the run's checkpoint resumed into a new folder on a third list: its prompts.json carries the run's lists, which
    # the copied metrics.jsonl's rows index (it held only the new list)
    third, branch = tmp_path / "third.txt", tmp_path / "branch"
    third.write_text("a grey owl\n")
    last = ckpt.list_checkpoints(run / "checkpoints")[0]
    assert main([*FAST, "--prompts", str(third), "--output-dir", str(branch), "--steps", "5", "--resume",
                 str(last)]) == 0
    assert json.loads((branch / "prompts.json").read_text())["earlier"] == [
        {"until_step": 2, "train": ["a red cat", "a blue dog"]},
        {"until_step": 4, "train": ["a green bird", "a blue dog"]}]


def test_a_branch_from_an_earlier_step_keeps_the_prompt_lists_of_its_own_steps(tmp_path):
    """prompts.json of a run trained on A until step 6, then on B: a resume of its step-4 checkpoint on C indexes A
    until step 4 (the list of step 6 onwards belongs to the branch it replaces)."""
    from lowmem_alignprop.training.train_records import prompt_lists_before

    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"train": ["b"], "earlier": [{"until_step": 6, "train": ["a"]}]}))
    assert prompt_lists_before(path, ["c"], 4) == {"earlier": [{"until_step": 4, "train": ["a"]}]}
    assert prompt_lists_before(path, ["a"], 4) == {}
    assert prompt_lists_before(path, ["c"], 8) == {"earlier": [{"until_step": 6, "train": ["a"]},
                                                               {"until_step": 8, "train": ["b"]}]}


def test_relative_paths_are_recorded_absolute_so_sample_and_resume_work_from_another_folder(tmp_path, tiny_dir,
                                                                                            monkeypatch, caplog):
    """A run started with a model folder, a prompt file and a reward file named relative to the working folder:
    config.yaml, the checkpoint and lora/base_model.json hold their absolute paths, so `sample` of its LoRA (its
    model read from base_model.json) and a resume run from another folder find them. A built-in name stays a name
    beside a folder of that name."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(tiny_dir, work / "mid")
    (work / "p.txt").write_text("a red cat\na blue dog\n")
    (work / "r.py").write_text("def score(images):\n    return images.mean((1, 2, 3))\n")
    (work / "toy").mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    assert main([*LIGHT, "--model", "mid", "--prompts", "p.txt", "--reward", "r.py:score", "--output-dir", "run",
                 "--steps", "1"]) == 0
    run = work / "run"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["model"], config["prompts"], config["reward"]) == (str(work / "mid"), str(work / "p.txt"),
                                                                       f"{work / 'r.py'}:score")
    assert json.loads((run / "lora" / "base_model.json").read_text())["model"] == str(work / "mid")
    assert config["output_dir"] == str(run)  # (it said 'run': another folder's, read from elsewhere)
    monkeypatch.chdir(elsewhere)
    assert main(["sample", str(run / "lora"), "--profile", "cpu", "--num-prompts", "1", "--set", "sample_steps=2",
                 "--output-dir", "grid"]) == 0
    assert (elsewhere / "grid").is_dir()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):  # (its warnings said once, not per pass)
        assert main(["--output-dir", os.path.relpath(run), "--steps", "2", "--resume", "latest", "--seed", "1",
                     "--set", "seed=0"]) == 0
    said = [r.getMessage() for r in caplog.records]
    assert said.count("--seed 1 and --set seed=0 both given: --set wins (seed=0)") == 1
    assert [r["step"] for r in strict_rows(run)] == [1, 2]
    # summary.json names the checkpoint absolute too (from the relative --output-dir it was found in)
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == str(run / "checkpoints" / "step-00000001")
    # and the folder itself, without the '..' of the way it was named from elsewhere ('elsewhere/../work/run')
    assert yaml.safe_load((run / "config.yaml").read_text())["output_dir"] == str(run)
    assert json.loads((run / "summary.json").read_text())["output_dir"] == str(run)
    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.step.inputs import with_absolute_paths
    monkeypatch.chdir(work)
    assert with_absolute_paths(Config(model="toy", prompts="simple_animals")).model == "toy"


def test_checkpoints_are_small_and_hold_only_what_trains(runs):
    _, split, _ = runs
    path = split / "checkpoints" / "step-00000006"
    names = sorted(p.name for p in path.iterdir())
    assert names == ["manifest.json", "optimizer.pt", "rng.pt", "state.json", "trainable.safetensors"]
    w = weights(path)
    assert all("lora" in k for k in w)  # no frozen UNet weights
    lora_bytes = sum(t.numel() * t.element_size() for t in w.values())
    total = sum(p.stat().st_size for p in path.iterdir())
    assert total < 3 * lora_bytes + 200_000  # LoRA + 2 Adam moments + small metadata
    state = ckpt.read_state(path)
    assert state["step"] == 6 and len(state["history"]) == 6 and state["world_size"] == 1
    # keep_checkpoints=2 (default): only the newest two remain
    assert [p.name for p in ckpt.list_checkpoints(split / "checkpoints")] == ["step-00000006", "step-00000003"]


def test_corrupt_or_partial_checkpoint_is_reported_and_the_previous_one_used(runs, tmp_path, caplog):
    _, split, _ = runs
    run = tmp_path / "run"
    shutil.copytree(split, run)
    root = run / "checkpoints"
    newest = root / "step-00000006"
    data = (newest / "trainable.safetensors").read_bytes()
    (newest / "trainable.safetensors").write_bytes(data[: len(data) // 2])  # torn write
    (root / ".tmp-step-00000007").mkdir()  # a write that never finished
    assert ckpt.verify(newest) is not None and "trainable.safetensors" in ckpt.verify(newest)
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        chosen = ckpt.find_resume(run, "latest")
    assert chosen == root / "step-00000003"
    text = caplog.text
    assert "step-00000006 is incomplete or corrupt" in text and ".tmp-step-00000007" in text
    # naming the broken one explicitly is an error, not a silent substitution
    with pytest.raises(ckpt.UserError, match="incomplete or corrupt"):
        ckpt.find_resume(run, str(newest))
    # a manifest-less directory (killed mid-write before the rename cannot happen, but a copy can) is skipped too
    (root / "step-00000003" / "manifest.json").unlink()
    with pytest.raises(ckpt.UserError, match="no intact checkpoint"):
        ckpt.find_resume(run, "latest")


def test_export_of_a_checkpoint_that_is_damaged_or_not_kept_names_those_that_are(runs, tmp_path, capsys):
    """checkpoints/step-N as --lora: a folder without its weights said it was 'no such folder' or 'holds no
    pytorch_lora_weights.safetensors' (as if it were no checkpoint); a step rotated away said 'no such folder'. Both
    now name the checkpoints that are whole."""
    _, split, _ = runs
    run = tmp_path / "run"
    shutil.copytree(split, run)
    (run / "checkpoints" / "step-00000006" / "trainable.safetensors").unlink()
    for named in ("step-6", "step-00000006"):
        capsys.readouterr()
        assert main(["export", "--lora", str(run / "checkpoints" / named), "--format", "kohya"]) == 2
        assert [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")] == [
            f"error: checkpoint {run / 'checkpoints' / 'step-00000006'} is incomplete or corrupt: trainable.safetensors "
            "is missing; pass another step's checkpoint (step-00000003) or the run's lora/ folder"]
    assert main(["export", "--lora", str(run / "checkpoints" / "step-1"), "--format", "kohya"]) == 2
    assert [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")] == [
        f"error: --lora {run / 'checkpoints' / 'step-1'}: the run kept no checkpoint of step 1 (keep_checkpoints keeps "
        "the newest); pass another step's checkpoint (step-00000003) or the run's lora/ folder"]
    assert not (run / "export").exists()


def test_export_does_not_write_lora_again_from_an_earlier_step_than_the_runs_last(runs, tmp_path, capsys):
    """lora/ missing and the last step's checkpoint damaged: export wrote lora/ from step 3's checkpoint under the
    run's name and a model card of step 6 (its grid and rewards). Refused, naming the checkpoint to export."""
    _, split, _ = runs
    run = tmp_path / "run"
    shutil.copytree(split, run)
    shutil.rmtree(run / "lora")
    (run / "checkpoints" / "step-00000006" / "state.json").unlink()
    assert main(["export", str(run), "--format", "kohya"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: {run / 'lora'} is missing, and the run's last step (6) has no intact checkpoint to "
                       f"write it again from: export {run / 'checkpoints' / 'step-00000003'} for step 3's LoRA"), err
    assert not (run / "lora").exists() and not (run / "export").exists()


def test_a_resume_whose_prompt_file_is_gone_names_the_runs_record_of_it(tmp_path, capsys):
    """The prompt file deleted before a resume: refused as before (nothing changed), and the line says where the run
    recorded its prompts (prompts.json), which it did not."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\n")
    run = tmp_path / "run"
    assert main([*LIGHT, "--output-dir", str(run), "--steps", "1", "--prompts", str(prompts)]) == 0
    prompts.unlink()
    before = sorted(p.name for p in run.rglob("*"))
    capsys.readouterr()
    assert main(["--output-dir", str(run), "--steps", "2", "--resume", "latest"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert err == [f"error: prompt file {prompts} does not exist; give an existing text file (one prompt per line) or "
                   f"a built-in prompt set: {', '.join(PROMPT_SETS)} (the run's prompts are listed in "
                   f"{run / 'prompts.json'}, its 'train' and 'held_out' lists: write them back to {prompts} to resume "
                   "on them)"], err
    assert sorted(p.name for p in run.rglob("*")) == before


def test_resume_continues_from_the_previous_good_checkpoint(runs, tmp_path, capsys):
    """End to end: the newest checkpoint is corrupt, --resume latest trains on from the one before."""
    _, split, _ = runs
    run = tmp_path / "run"
    shutil.copytree(split, run)
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    bad = run / "checkpoints" / "step-00000005"
    shutil.copytree(run / "checkpoints" / "step-00000003", bad)
    (bad / "state.json").write_text("{not json")
    assert main([*FAST, "--output-dir", str(run), "--steps", "4", "--resume", "latest"]) == 0
    got = strict_rows(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4]  # rows 4-6 of the old run were dropped, step 4 redone
    assert got[3]["reward_mean"] == pytest.approx(strict_rows(split)[3]["reward_mean"], abs=1e-6)


def test_atomic_publish_replaces_an_existing_step(tmp_path):
    root = tmp_path / "checkpoints"
    final = ckpt.step_dir(root, 2)
    for content in (b"old", b"new"):
        tmp = root / ".tmp-x"
        tmp.mkdir(parents=True)
        (tmp / "state.json").write_text(json.dumps({"format": ckpt.FORMAT, "step": 2}))
        (tmp / "trainable.safetensors").write_bytes(content)
        ckpt.write_manifest(tmp)
        ckpt.publish(tmp, final)
    assert (final / "trainable.safetensors").read_bytes() == b"new"
    assert ckpt.verify(final) is None
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]  # no temp or old copies left


SELF_SIGNAL_REWARD = """
import os, signal
sent = []
def reward(images, prompts):
    # brightness; the first call once step {after} is in metrics.jsonl sends {sig} to this process: a Ctrl-C or a
    # kill that arrives inside that reward call, at the same point on every machine
    if not sent and os.path.exists({metrics!r}) and open({metrics!r}).read().count("\\n") >= {after}:
        sent.append(1)
        os.kill(os.getpid(), signal.{sig})
    return images.mean(dim=(1, 2, 3))
"""


def self_signal(tmp_path, out, sig: str, after: int = 1) -> str:
    """A --reward that sends ``sig`` to its own process in its first call after step ``after`` (in this process:
    the run's handlers take it as from outside; a file of its own per test, so no module is reused)."""
    path = tmp_path / f"signal_{sig.lower()}_{after}.py"
    path.write_text(SELF_SIGNAL_REWARD.format(sig=sig, after=after, metrics=str(out / "metrics.jsonl")))
    return f"{path}:reward"


def test_sigterm_saves_a_checkpoint_and_exits_0(tmp_path, tiny_dir, capsys, caplog):
    """SIGTERM inside step 2 of 200 (in this process; a live run's folder refused to another process:
    tests/test_runlock.py): step 2 finishes, its checkpoint and the LoRA so far are written, exit 0."""
    out = tmp_path / "run"
    reward = self_signal(tmp_path, out, "SIGTERM")
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main([*FAST, "--reward", reward, "--output-dir", str(out), "--steps", "200"]) == 0
    assert "SIGTERM received" in capsys.readouterr().err + caplog.text
    assert [r["step"] for r in strict_rows(out)] == [1, 2]
    saved = ckpt.list_checkpoints(out / "checkpoints")
    assert saved and saved[0].name == "step-00000002" and ckpt.verify(saved[0]) is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()  # the LoRA so far is exported too
    # and the run continues from there
    assert main([*FAST, "--output-dir", str(out), "--steps", "3", "--resume", "latest"]) == 0
    assert [r["step"] for r in strict_rows(out)] == [1, 2, 3]


def test_a_ctrl_c_while_the_final_lora_is_written_says_so_and_the_run_ends_whole(tmp_path, tiny_dir, caplog,
                                                                                  monkeypatch):
    """Ctrl-C once training is over, while the LoRA is written: the line says that (it said "finishing this step,
    then saving a checkpoint", which does not happen), and the run ends as it would have: exit 0, the LoRA whole,
    the run not interrupted."""
    import signal

    import lowmem_alignprop.training.train as train_mod

    out, save, sent = tmp_path / "run", train_mod.Trainer.save_lora, []

    def save_lora(self, *args, **kwargs):
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGINT))
        return save(self, *args, **kwargs)
    monkeypatch.setattr(train_mod.Trainer, "save_lora", save_lora)
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main([*LIGHT, "--output-dir", str(out), "--steps", "2"]) == 0
    assert sent and "SIGINT received: training is over, the LoRA and summary are being written: a moment" in caplog.text
    assert "finishing this step" not in caplog.text
    assert [r["step"] for r in strict_rows(out)] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["interrupted"] is False
    assert (out / "lora" / "pytorch_lora_weights.safetensors").stat().st_size > 0


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, caplog):
    """Going back to step 2 of a 4-step run starts a new branch: the old steps 3-4 are kept but set aside, so
    --resume latest continues the new branch and rotation never deletes its newest checkpoint."""
    run = tmp_path / "run"
    keep_all = ["--set", "keep_checkpoints=0", "--checkpoint-every", "1"]
    assert main([*LIGHT, *keep_all, "--output-dir", str(run), "--steps", "4"]) == 0
    old = {p.name: weights(p) for p in ckpt.list_checkpoints(run / "checkpoints")}
    assert sorted(old) == [f"step-0000000{i}" for i in (1, 2, 3, 4)]
    old_rows = strict_rows(run)
    back = run / "checkpoints" / "step-00000002"
    grids = {"step-000002.png": b"kept", "step-000004.png": b"old 4", "before_after.png": b"old", "before_after.json":
             b"{}"}  # as --sample-every 2 left them (this test's runs sample nothing)
    (run / "samples").mkdir(exist_ok=True)
    for name, data in grids.items():
        (run / "samples" / name).write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):  # with another lr: it must apply
        assert main([*LIGHT, *keep_all, "--output-dir", str(run), "--steps", "3", "--resume", str(back),
                     "--set", "lr=0.02"]) == 0
    import torch
    groups = torch.load(run / "checkpoints" / "step-00000003" / "optimizer.pt", weights_only=True)["param_groups"]
    assert {g["lr"] for g in groups} == {0.02}  # the moments came from the checkpoint, the lr from this run
    assert "moved to" in caplog.text and "superseded-after-step-2" in caplog.text
    aside = run / "checkpoints" / "superseded-after-step-2"
    # with that branch's final LoRA and summary (they stayed the run's: a stop before this branch's first step left
    # sample and export on the other branch's step 4; its end wrote over them)
    assert sorted(p.name for p in aside.iterdir()) == ["lora", "metrics.jsonl", "samples", "step-00000003",
                                                       "step-00000004", "summary.json"]
    assert json.loads((aside / "summary.json").read_text())["steps_done"] == 4
    # its grids too (this branch's replaced them): before/after and those after the branch; step 2's is this one's
    assert {p.name: p.read_bytes() for p in (aside / "samples").iterdir()} == {
        n: d for n, d in grids.items() if n != "step-000002.png"}
    assert [p.name for p in (run / "samples").iterdir()] == ["step-000002.png"]
    assert weights(aside / "step-00000004").keys() == old["step-00000004"].keys()  # kept as they were
    assert strict_rows(aside) == old_rows  # and that branch's metrics with them
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == [
        "step-00000003", "step-00000002", "step-00000001"]
    assert ckpt.find_resume(run, "latest") == run / "checkpoints" / "step-00000003"  # the new branch's
    assert [r["step"] for r in strict_rows(run)] == [1, 2, 3]
    # the same step resumed again, named by its step as sample, export and --init-lora take it: the branch set aside
    # first keeps its folder
    assert main([*LIGHT, *keep_all, "--output-dir", str(run), "--steps", "3", "--resume",
                 str(run / "checkpoints" / "step-2")]) == 0
    assert sorted(p.name for p in (run / "checkpoints" / "superseded-after-step-2-2").iterdir()) == [
        "lora", "metrics.jsonl", "step-00000003", "summary.json"]
    assert sorted(p.name for p in aside.iterdir()) == ["lora", "metrics.jsonl", "samples", "step-00000003",
                                                       "step-00000004", "summary.json"]
    # the first branch taken up again from inside its folder: it continues with its own metrics, and the
    # branch it replaces is set aside in turn
    assert main([*LIGHT, *keep_all, "--output-dir", str(run), "--steps", "5", "--resume",
                 str(aside / "step-00000004")]) == 0
    assert [r["reward_mean"] for r in strict_rows(run)[:4]] == [r["reward_mean"] for r in old_rows]
    assert [r["step"] for r in strict_rows(run)] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (run / "checkpoints" / "superseded-after-step-2-3").iterdir()) == [
        "lora", "metrics.jsonl", "step-00000003", "summary.json"]
    # (the branch point is step 2, the checkpoint taken up step 4: it said "resuming from step 2")
    assert ("a new branch after step 2: the run's checkpoints after it (step-00000003) moved to "
            f"{run / 'checkpoints' / 'superseded-after-step-2-3'}") in caplog.text
    assert ckpt.find_resume(run, "latest") == run / "checkpoints" / "step-00000005"
    # a checkpoint of this run resumed into another folder: this run's checkpoints are not touched
    listing = sorted(str(p.relative_to(run)) for p in (run / "checkpoints").rglob("step-*"))
    other = tmp_path / "other"
    assert main([*LIGHT, *keep_all, "--output-dir", str(other), "--steps", "2",
                 "--resume", str(run / "checkpoints" / "step-00000001")]) == 0
    assert sorted(str(p.relative_to(run)) for p in (run / "checkpoints").rglob("step-*")) == listing
    assert [p.name for p in ckpt.list_checkpoints(other / "checkpoints")] == ["step-00000002"]
    assert [r["step"] for r in strict_rows(other)] == [1, 2]  # step 1's row comes from the checkpoint
    assert strict_rows(other)[0]["reward_mean"] == old_rows[0]["reward_mean"]
    # its command.txt (the model card's "how it was made") starts with the starts of the run it branched from
    started = (run / "command.txt").read_text().splitlines()
    made = (other / "command.txt").read_text().splitlines()
    assert made[:-1] == started[:1] and f"--resume {run / 'checkpoints' / 'step-00000001'}" in made[-1], made


def test_a_run_that_failed_before_its_first_step_is_not_a_run(tmp_path):
    (tmp_path / "config.yaml").write_text("steps: 2\n")
    (tmp_path / "metrics.jsonl").write_text("")
    assert ckpt.holds_a_run(tmp_path) is None  # the same command may run there again
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert str(ckpt.holds_a_run(tmp_path)) == "metrics.jsonl"


def test_a_new_run_where_a_start_trained_nothing_records_only_its_own_command(tmp_path, tiny_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("steps: 2\n")  # a start stopped while the model loaded
    (run / "command.txt").write_text("lowmem-alignprop --reward typo\n")
    assert main([*LIGHT, "--output-dir", str(run), "--steps", "1"]) == 0
    assert (run / "command.txt").read_text().splitlines() == [" ".join(  # (the suite's $LOWMEM_ALIGNPROP_MODEL)
        ["LOWMEM_ALIGNPROP_MODEL=tiny", "lowmem-alignprop", *LIGHT, "--output-dir", str(run), "--steps", "1"])]


def test_resume_of_a_checkpoint_continues_its_own_run_with_its_own_settings(tmp_path, monkeypatch, capsys):
    """`--resume RUN/checkpoints/step-N` without --output-dir continues in RUN, with the steps, lr... RUN was
    started with (not the profile's defaults); into a folder holding another run it is refused."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "first"
    keep_all = ["--set", "keep_checkpoints=0", "--checkpoint-every", "1"]
    assert main([*LIGHT, *keep_all, "--output-dir", str(run), "--steps", "4", "--set", "lr=0.02"]) == 0
    for extra in ("step-00000004", "step-00000003"):
        shutil.rmtree(run / "checkpoints" / extra)  # as if it had stopped after step 2
    (run / "metrics.jsonl").write_text("".join(f"{line}\n" for line in (run / "metrics.jsonl").read_text()
                                               .splitlines()[:2]))
    other = tmp_path / "other"
    assert main([*LIGHT, "--output-dir", str(other), "--steps", "1"]) == 0
    before = sorted(str(p.relative_to(other)) for p in other.rglob("*"))
    capsys.readouterr()
    assert main(["--resume", str(run / "checkpoints" / "step-00000002"), "--output-dir", str(other)]) == 2
    assert "holds another run (checkpoints/): resuming" in capsys.readouterr().err
    assert sorted(str(p.relative_to(other)) for p in other.rglob("*")) == before  # nothing changed there

    assert main(["--profile", "cpu", "--resume", str(run / "checkpoints" / "step-00000002")]) == 0
    assert not (tmp_path / "outputs").exists()  # not the default folder: the checkpoint's own run
    assert [r["step"] for r in strict_rows(run)] == [1, 2, 3, 4]  # its 4 steps, not the profile's 20
    import torch
    groups = torch.load(run / "checkpoints" / "step-00000004" / "optimizer.pt", weights_only=True)["param_groups"]
    assert {g["lr"] for g in groups} == {0.02}  # and its lr


GATE_REWARD = """
import os, time
def reward(images, prompts):
    # brightness; from the second training step on, it waits while the HOLD file exists (the test holds the step)
    metrics = os.environ["GATE_METRICS"]
    if os.path.exists(metrics) and open(metrics).read().count("\\n") >= 1:
        open(os.environ["GATE_ENTERED"], "w").close()
        while os.path.exists(os.environ["GATE_HOLD"]):
            time.sleep(0.05)
    return images.mean(dim=(1, 2, 3))
"""


class Gated:
    """A run whose reward, from the second training step on (and in the after samples), waits while a HOLD file
    exists: a signal sent once ``entered`` exists lands inside that reward call, however slow or loaded the
    machine -- no race with a step's own duration. ``release()`` lets it go on."""

    def __init__(self, tmp_path, *extra):
        self.out, gate = tmp_path / "run", tmp_path / "gate"
        gate.mkdir()
        (gate / "gate_reward.py").write_text(GATE_REWARD)
        self.hold, self.entered, self.err = gate / "hold", gate / "entered", tmp_path / "stderr.txt"
        self.out_file = tmp_path / "stdout.txt"
        self.hold.touch()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(gate),
               "GATE_METRICS": str(self.out / "metrics.jsonl"), "GATE_HOLD": str(self.hold),
               "GATE_ENTERED": str(self.entered)}
        with open(self.err, "w") as stderr_file, open(self.out_file, "w") as stdout_file:
            self.proc = subprocess.Popen([sys.executable, "-m", "lowmem_alignprop", *FAST, "--reward",
                                          "gate_reward:reward", "--output-dir", str(self.out), *extra],
                                         env=env, stdout=stdout_file, stderr=stderr_file, text=True)

    def wait_for(self, predicate, what, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"never saw {what} (exit {self.proc.poll()}): {self.stderr()[-2000:]}")

    def held(self):
        self.wait_for(self.entered.exists, "the run reach its held reward")

    def release(self):
        self.hold.unlink(missing_ok=True)

    def finish(self, timeout=120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.release()
            if self.proc.poll() is None:
                self.proc.kill()

    def stderr(self) -> str:
        return self.err.read_text()

    def stdout(self) -> str:
        return self.out_file.read_text()


@pytest.mark.slow  # a subprocess run (the abort is os._exit: 20 s); test_faults' unit tests cover every second signal
def test_a_second_ctrl_c_aborts_at_once_and_leaves_the_folder_usable(tmp_path):
    """Both signals land in step 2 (held inside its reward), and the second comes more than the 2 s launcher
    window after the run took the first (it says so on stderr)."""
    run = Gated(tmp_path, "--steps", "50", "--checkpoint-every", "1")
    try:
        run.held()  # step 1 and its checkpoint are done
        run.proc.send_signal(signal.SIGINT)
        run.wait_for(lambda: "SIGINT received" in run.stderr(), "the first Ctrl-C taken")
        time.sleep(2.5)  # past the 2.0 s in which a second SIGINT is a launcher's echo of the first
        run.proc.send_signal(signal.SIGINT)
    finally:
        code = run.finish()
    stderr = run.stderr()
    assert code == 130, stderr[-2000:]  # not a crash (it once segfaulted here)
    assert "aborted by a second Ctrl-C" in stderr and "Traceback" not in stderr
    assert not (run.out / ".run.lock").exists()
    assert ckpt.find_resume(run.out, "latest").name == "step-00000001"  # --resume latest goes on from there


def test_ctrl_c_in_the_last_step_finishes_the_run(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main([*FAST, "--reward", self_signal(tmp_path, out, "SIGINT"), "--output-dir", str(out),
                     "--steps", "2"]) == 0  # Ctrl-C inside step 2's reward
    stderr = capsys.readouterr().err + caplog.text
    assert "SIGINT received" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is False and summary["steps_done"] == 2
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "continue with --resume latest" not in stderr


def test_ctrl_c_in_the_step_that_stops_early_ends_the_run_as_the_early_stop(tmp_path, capsys, caplog):
    """Ctrl-C inside step 2, where the held-out evaluation (lr 1e-30: the same at every step) has gone --early-stop 1
    evaluation without improving: the run ended there, so it says so and writes the LoRA and summary without the after
    samples, naming `sample` for them (it said "continue with --resume latest", which then refused: nothing left to
    train, and the after samples were lost without a word)."""
    out = tmp_path / "run"
    (tmp_path / "eval.txt").write_text("a red circle\n")
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main([*FAST, "--reward", self_signal(tmp_path, out, "SIGINT"), "--output-dir", str(out), "--steps",
                     "4", "--set", "lr=1e-30", "--eval-every", "1", "--early-stop", "1", "--set", "sample_prompts=1",
                     "--set", f"eval_prompts={tmp_path / 'eval.txt'}", "--set", "fidelity_images=0"]) == 0
    captured = capsys.readouterr()
    said = captured.out + captured.err + caplog.text
    assert "early stop at step 2: the held-out evaluation (eval_reward) has not improved for 1 evaluations" in said
    assert "SIGINT received: saved checkpoint" in said and "that was the run's last step: writing the LoRA" in said
    assert "continue with --resume latest" not in said
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["early_stopped_at"], summary["steps_done"], summary["interrupted"]) == (2, 2, False)
    assert summary["samples_skipped"] == "SIGINT at the run's last step"
    assert f"after samples skipped (SIGINT at the run's last step): lowmem-alignprop sample {out}/lora" in captured.out
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_ctrl_c_after_the_last_step_skips_the_after_samples_but_writes_the_lora(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):  # step 1 done: the after samples' reward takes it
        assert main([*FAST, "--reward", self_signal(tmp_path, out, "SIGINT"), "--output-dir", str(out), "--steps",
                     "1", "--set", "sample_prompts=2"]) == 0
    captured = capsys.readouterr()
    assert [r["step"] for r in strict_rows(out)] == [1]
    assert "the after samples are skipped" in captured.err + caplog.text
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is False and summary["samples_skipped"] == "SIGINT while they were rendered"
    assert not (out / "samples" / "before_after.png").exists()  # skipped, as asked (and said:)
    assert f"after samples skipped (SIGINT while they were rendered): lowmem-alignprop sample {out}/lora" \
        in captured.out


def test_a_checkpoint_of_a_newer_version_is_refused_not_resumed_without_its_settings(runs, tmp_path, capsys):
    """A user who goes back to an older version: its resume dropped the settings it did not know, and trained on
    without them (best_by=fidelity became reward, and best/ another step). This version refuses a checkpoint with
    settings it does not know, in one line; a field an earlier version had (RETIRED_FIELDS) is left out as before."""
    import hashlib

    from lowmem_alignprop.run.runfolder import RunFolder

    _, split, _ = runs
    run = tmp_path / "run"
    shutil.copytree(split, run)
    step = run / "checkpoints" / "step-00000006"

    def with_config(**extra):
        state = json.loads((step / "state.json").read_text())
        state["config"] = {**state["config"], **extra}
        data = json.dumps(state).encode()
        (step / "state.json").write_bytes(data)
        manifest = json.loads((step / "manifest.json").read_text())
        entry = manifest["files"]["state.json"]
        entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        (step / "manifest.json").write_text(json.dumps(manifest))

    with_config(reward_floor=None)  # retired: an older checkpoint's
    assert RunFolder(run, resume="latest").resumed_settings()[1]["steps"] == 6
    with_config(judge_by="fidelity", warmup_evals=2, truncation="per_layer")  # a choice this version lacks too
    rc = main(["--output-dir", str(run), "--steps", "8", "--resume", "latest"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == (f"error: checkpoint {step} was written by a newer lowmem-alignprop: its settings "
                                   "judge_by, truncation=per_layer, warmup_evals are unknown to this version, which "
                                   "would train on without them; resume with the version that wrote it (pip install -U "
                                   "lowmem-alignprop), or start a new run"), err
    assert [r["step"] for r in strict_rows(run)] == list(range(1, 7))  # nothing trained, nothing lost


def test_a_checkpoint_of_a_newer_format_is_one_line_for_resume_and_export_and_is_kept(runs, tmp_path, capsys):
    """A run a newer version went on with (its step 6 in checkpoint format 2), back under this version: --resume
    latest said step 6 was "incomplete or corrupt", resumed step 3 and set step 6 aside as another branch (and the
    metrics of steps 4-6 with it); export of step 6 called it corrupt. Each is now one line naming the version that
    wrote it, and nothing in the run moves."""
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    step = run / "checkpoints" / "step-00000006"
    edit_states(run, lambda state: state.update(format=2) if state["step"] == 6 else None)
    said = ("was written by a newer lowmem-alignprop (checkpoint format 2; this version reads format 1): use the "
            "version that wrote it (pip install -U lowmem-alignprop), or ")
    assert main(["--output-dir", str(run), "--steps", "8", "--resume", "latest"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith(("error: ", "checkpoint"))]
    assert err == [f"error: checkpoint {step} {said}start a new run in another --output-dir"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    assert [r["step"] for r in strict_rows(run)] == list(range(1, 7))
    out = tmp_path / "export"
    assert main(["export", str(step), "--format", "kohya", "--out", str(out)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert err == [f"error: checkpoint {step} {said}pass another step's checkpoint or the run's lora/ folder"]
    assert not out.exists()
    shutil.rmtree(run / "lora")  # export of the run: its lora/ would be written again from step 6's checkpoint
    assert main(["export", str(run), "--format", "kohya", "--out", str(out)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert err == [f"error: checkpoint {step} {said}export an earlier step's checkpoint this version wrote "
                   f"({run}/checkpoints/step-N)"]
    assert not out.exists() and not (run / "lora").exists()


def edit_states(run, edit) -> None:
    """``edit(state)`` on each checkpoint's state.json of ``run``, its manifest kept true (else it is corrupt)."""
    import hashlib

    for step in (run / "checkpoints").iterdir():
        state = json.loads((step / "state.json").read_text())
        edit(state)
        data = json.dumps(state).encode()
        (step / "state.json").write_bytes(data)
        manifest = json.loads((step / "manifest.json").read_text())
        manifest["files"]["state.json"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        (step / "manifest.json").write_text(json.dumps(manifest))


def test_a_resume_whose_model_is_not_on_this_machine_names_the_fix(runs, tmp_path, capsys):
    """The run's model, from its checkpoint, not on this machine (a run on Windows recorded C:\\models\\sd15, or the
    folder moved): the line said `model path ... does not exist: ... or leave --model out for the shipped toy world`,
    and --model was never given (left out, the resume reads the same path). It names the record and --model."""
    _, split, _ = runs
    for model, where in ((r"C:\models\sd15", "a Windows path (of the machine it trained on), not one on this machine"),
                         (str(tmp_path / "moved-away"), "which is not there any more")):
        run = tmp_path / "run"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(split, run)
        edit_states(run, lambda state: (state["config"].update(model=model), state["fingerprint"].update(model=model)))
        assert main(["--output-dir", str(run), "--steps", "7", "--resume", "latest"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: --resume latest: the run in {run} was trained on {model} (its checkpoint's config), {where}: "
            "pass the base model with --model")
        assert [r["step"] for r in strict_rows(run)] == list(range(1, 7))  # nothing trained
        # a checkpoint's export --merge and sample read the same record (it named lora/'s base_model.json)
        step = max((run / "checkpoints").iterdir())
        for argv in (["export", str(step), "--merge", "--out", str(tmp_path / "merged")], ["sample", str(step)]):
            assert main(argv) == 2
            assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
                f" was trained on {model} (its state.json), {where}: pass the base model with --model"), argv
    assert main(["--output-dir", str(run), "--steps", "7", "--resume", "latest", "--model", "tiny"]) == 0  # the fix
    assert [r["step"] for r in strict_rows(run)] == list(range(1, 8))


def test_a_path_an_older_run_recorded_relative_is_one_line_from_another_folder(runs, tmp_path, capsys, monkeypatch):
    """A run before 2026-12-05 recorded its paths as typed (prompts: p.txt, vae: vaedir, reward: rw/r.py:score),
    relative to the folder it started in: its resume from another folder said only 'prompt file p.txt does not exist;
    give an existing text file ...', 'vae=vaedir does not exist: pass a diffusers VAE folder ...', 'reward
    'rw/r.py:score': rw/r.py is not a file ...', naming neither the run's record nor the fix (the command named no
    such path); so they did of a path recorded absolute and moved since. It names both; a path given again by the
    command is not the run's."""

    _, split, _ = runs
    run, here = tmp_path / "run", tmp_path / "elsewhere"
    shutil.copytree(split, run)
    here.mkdir()
    monkeypatch.chdir(here)
    for key, value, fix in (("prompts", "p.txt", "--prompts PATH"),
                            ("eval_prompts", "p.txt", "--set eval_prompts=PATH"), ("vae", "vaedir", "--set vae=PATH"),
                            ("model_components", "parts", "--set model_components=PATH"),
                            ("reward", "rw/r.py:score", "--reward PATH:score"),
                            ("reward_weights", "aesthetic=h.pt,clip", "--set reward_weights=aesthetic=PATH,clip")):
        old = {"prompts": "simple_animals", "eval_every": 1, "eval_prompts": "", "vae": "", "model_components": "",
               "reward": "brightness", "reward_weights": "", key: value}  # (eval_prompts is read by --eval-every)
        edit_states(run, lambda state: state["config"].update(old))
        assert main(["--output-dir", str(run), "--steps", "7", "--resume", "latest"]) == 2
        path = value.split(":")[0].split("=")[-1].split(",")[0]
        whose = "," if path == value else f", whose {path} is"
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: --resume latest: the run in {run} was trained with {key}={value} (its checkpoint's config){whose} "
            "a path relative to the folder its run started in (a run before 2026-12-05), not found from here: resume "
            f"in that folder, or give it from here with {fix}")
        assert [r["step"] for r in strict_rows(run)] == list(range(1, 7))  # nothing trained
    gone = tmp_path / "moved-away" / "r.py"  # a path recorded absolute, moved or deleted since
    edit_states(run, lambda state: state["config"].update(reward_weights="", reward=f"{gone}:score"))
    assert main(["--output-dir", str(run), "--steps", "7", "--resume", "latest"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --resume latest: the run in {run} was trained with reward={gone}:score (its checkpoint's config), "
        f"whose {gone} is not there any more (moved or deleted): give it with --reward PATH:score")
    edit_states(run, lambda state: state["config"].update(reward="brightness", eval_prompts="", eval_every=0,
                                                          prompts="p.txt", vae="vaedir"))
    (here / "p.txt").write_text("a red cat\n")  # the run's file, in the folder it started in: the resume goes on
    assert main(["--output-dir", str(run), "--steps", "7", "--resume", "latest", "--set", "vae="]) == 0  # (given)
    assert [r["step"] for r in strict_rows(run)] == list(range(1, 8))


def test_a_resume_under_another_number_of_processes_is_on_the_model_card(runs, tmp_path):
    """Steps 1-6 trained by 2 processes (accelerate launch), 7 by one (python -m): summary.json said `processes: 1`
    with no resume change, and the card had no processes row and quoted the first command as a plain one. The
    change is a resume change (an optimizer step averages half the images), and the card says which steps had how
    many. (The checkpoint's world_size edited: a 2-process launch takes 20 s; tests/test_distributed.py has one.)"""
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    edit_states(run, lambda state: state.update(world_size=2))
    assert main(["--output-dir", str(run), "--steps", "7", "--resume", "latest"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 1 and summary["resume_changes"] == [{"step": 7, "changes": {"processes": [2, 1]}}]
    out = tmp_path / "card"
    assert main(["export", "--lora", str(run / "lora"), "--format", "kohya", "--out", str(out)]) == 0
    card = (out / "README.md").read_text().splitlines()
    assert "| processes | 2 from step 1 (4 images per optimizer step); 1 from step 7 (2 images per optimizer step) " \
           "(more than 1: under `accelerate launch --multi_gpu --num_processes N`) |" in card  # (batch 1 x accum 2)
    assert "| changed by a resume | from step 7: 1 process (was 2) |" in card
    assert card[card.index("```bash") + 1] == ("# 2 processes from step 1, 1 process from step 7 (more than 1: under "
                                               "accelerate launch --multi_gpu --num_processes N -m lowmem_alignprop "
                                               "with these arguments)")


def _checkpoint(root, step, payload=b"weights", **state):
    """A published checkpoint folder of ``step`` as ckpt.save lays it out (state.json, a weights file, manifest)."""
    tmp = root / f".tmp-step-{step}"
    tmp.mkdir(parents=True)
    (tmp / "state.json").write_text(json.dumps({"format": ckpt.FORMAT, "step": step, **state}))
    (tmp / "trainable.safetensors").write_bytes(payload)
    ckpt.write_manifest(tmp)
    ckpt.publish(tmp, ckpt.step_dir(root, step))
    return ckpt.step_dir(root, step)


def test_a_checkpoint_written_again_whose_rename_fails_keeps_the_older_copy(tmp_path, monkeypatch):
    """A step's checkpoint written again (an owed evaluation's re-save) whose final rename fails (a full disk, a
    quota): the older copy, moved aside first, goes back (publish had no rollback: the step was missing until a
    resume published the temporary folder)."""
    import errno
    from pathlib import Path

    root = tmp_path / "checkpoints"
    final = _checkpoint(root, 3, payload=b"older")
    tmp = root / ".tmp-step-00000003"
    tmp.mkdir()
    (tmp / "state.json").write_text(json.dumps({"format": ckpt.FORMAT, "step": 3}))
    (tmp / "trainable.safetensors").write_bytes(b"newer")
    ckpt.write_manifest(tmp)
    real = os.replace

    def refuse_the_new_one(src, dst):
        if Path(src) == tmp:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", refuse_the_new_one)
    with pytest.raises(OSError):
        ckpt.publish(tmp, final)
    assert (final / "trainable.safetensors").read_bytes() == b"older" and ckpt.verify(final) is None
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step-00000003", "step-00000003"]  # (nothing else aside)


def test_a_whole_checkpoint_killed_before_its_rename_is_resumed_from(tmp_path, caplog):
    """Killed between a checkpoint's manifest and its rename: the temporary folder is whole (its manifest verifies),
    so --resume latest renames it and resumes from it (it was skipped: that step's training lost). Not while a live
    run holds the folder (it may be renaming it now), nor a temporary folder whose write did not finish."""
    from lowmem_alignprop.run.runlock import RunLock

    root = tmp_path / "checkpoints"
    earlier = _checkpoint(root, 2)
    whole = root / ".tmp-step-00000004"
    shutil.copytree(_checkpoint(tmp_path / "elsewhere", 4), whole)
    (root / ".tmp-step-00000006").mkdir()  # no manifest: that write did not finish
    with RunLock(tmp_path), caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert ckpt.find_resume(tmp_path, "latest") == earlier  # a live run's: left alone
    assert whole.is_dir() and "ignoring " + str(whole) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert ckpt.find_resume(tmp_path, "latest") == ckpt.step_dir(root, 4)
    assert not whole.exists() and ckpt.verify(ckpt.step_dir(root, 4)) is None
    assert ".tmp-step-00000004 was written whole but not renamed" in caplog.text
    assert f"ignoring {root / '.tmp-step-00000006'}, a checkpoint write that did not finish" in caplog.text


def test_an_unfinished_checkpoint_write_goes_once_a_newer_checkpoint_is_written(runs, tmp_path, caplog):
    """A half-written .tmp-step-N (a kill, a second Ctrl-C while it was written) stayed for good: every later
    --resume latest said "ignoring ..." again. The first checkpoint written after it removes it."""
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    dead = run / "checkpoints" / ".tmp-step-00000005"
    dead.mkdir()
    (dead / "trainable.safetensors").write_bytes(b"half")
    aside = run / "checkpoints" / ".tmp-old-step-00000004"  # a publish killed mid-swap by an older release: a whole
    shutil.copytree(ckpt.list_checkpoints(run / "checkpoints")[0], aside)  # checkpoint's bytes, kept for good
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main(["--output-dir", str(run), "--steps", "7", "--resume", "latest"]) == 0
    assert f"ignoring {dead}" in caplog.text and not dead.exists() and not aside.exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main(["--output-dir", str(run), "--steps", "8", "--resume", "latest"]) == 0
    assert "ignoring" not in caplog.text


def test_a_flipped_byte_makes_resume_take_the_previous_checkpoint_a_newer_format_is_refused(tmp_path, caplog):
    """A torn write changes the size; a bit flipped on the disk or in a copy does not: only the checksum tells it. A
    checkpoint of a higher format (a newer version's) is no checkpoint this version can read, but no damaged one
    either: --resume latest went back to the step before it (and set the newer version's steps aside) and an explicit
    one called it corrupt. It is one line naming the version that wrote it."""
    root = tmp_path / "checkpoints"
    good = _checkpoint(root, 2, payload=b"weights of step 2")
    rotten = _checkpoint(root, 4, payload=b"weights of step 4")
    data = bytearray((rotten / "trainable.safetensors").read_bytes())
    data[3] ^= 0x01  # same length
    (rotten / "trainable.safetensors").write_bytes(bytes(data))
    assert ckpt.verify(good) is None
    assert ckpt.verify(rotten) == "trainable.safetensors does not match its checksum"
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert ckpt.find_resume(tmp_path, "latest") == good
    assert "step-00000004 is incomplete or corrupt (trainable.safetensors does not match its checksum)" in caplog.text
    newer = _checkpoint(root, 6, format=ckpt.FORMAT + 1)
    assert ckpt.verify(newer) == (f"format {ckpt.FORMAT + 1}, written by a newer lowmem-alignprop (this version reads "
                                  f"format {ckpt.FORMAT})")
    line = (f"checkpoint {newer} was written by a newer lowmem-alignprop (checkpoint format {ckpt.FORMAT + 1}; this "
            f"version reads format {ckpt.FORMAT}): use the version that wrote it (pip install -U lowmem-alignprop), or "
            "start a new run in another --output-dir")
    for spec in ("latest", str(newer)):
        with pytest.raises(ckpt.UserError) as refused:
            ckpt.find_resume(tmp_path, spec)
        assert str(refused.value) == line
    older = _checkpoint(root, 8, format=0)  # no version wrote it (format 1 is the first): damaged, as before
    assert ckpt.verify(older) == f"format 0, this version reads format {ckpt.FORMAT}"
    with pytest.raises(ckpt.UserError) as refused:  # the newest is skipped as damaged; the newer format refused
        ckpt.find_resume(tmp_path, "latest")
    assert str(refused.value) == line


def test_pruning_keeps_the_newest_intact_checkpoints_a_damaged_one_does_not_count(tmp_path):
    """keep_checkpoints=2 keeps two that resume: a damaged newer one does not take the place of the older intact one
    (which is then the only one --resume latest can use), and a damaged one is not what rotation deletes first."""
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _checkpoint(root, step, payload=f"weights {step}".encode())
    (ckpt.step_dir(root, 3) / "manifest.json").unlink()  # killed copy / damaged
    newest = _checkpoint(root, 4, payload=b"weights 4")
    ckpt.prune(root, 2, protect=newest)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000004", "step-00000003", "step-00000002"]
    assert ckpt.find_resume(tmp_path, "latest") == newest
    ckpt.prune(root, 1, protect=newest)  # 1: only the newest intact one
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000004", "step-00000003"]
    ckpt.prune(root, 0, protect=newest)  # 0: keep every one
    assert len(ckpt.list_checkpoints(root)) == 2


def test_pruning_never_removes_the_checkpoint_it_protects_and_counts_it_as_kept(tmp_path):
    """prune's ``protect`` (the checkpoint just written) stays whatever its place and whatever verify says of it, and
    it is one of the ``keep``: an older protected one outlives a newer intact one past the count, and a protected
    one that reads as damaged still takes the one place of keep_checkpoints=1."""
    root = tmp_path / "checkpoints"
    steps = {step: _checkpoint(root, step, payload=f"weights {step}".encode()) for step in (1, 2, 3)}
    ckpt.prune(root, 1, protect=steps[1])
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000003", "step-00000001"]
    (steps[3] / "manifest.json").unlink()  # protected, yet not intact
    ckpt.prune(root, 1, protect=steps[3])
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000003"]


def test_a_kill_while_rotation_deletes_a_checkpoint_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """keep_checkpoints' rotation deleted an old checkpoint in place: a kill midway (seen in a kill -9 walk, on a slow
    disk) left step-1 with two of its files, which --resume, export and rotation took for a damaged checkpoint and
    kept for good. It is renamed first: a kill leaves a .partial-* folder, which the run's next start removes."""
    from pathlib import Path

    from lowmem_alignprop.run import atomic
    from lowmem_alignprop.run.runfolder import RunFolder

    class Killed(BaseException):
        pass

    def killed_midway(path, *args, **kwargs):  # the first file goes, then the process dies
        if not Path(path).exists():
            return
        next(p for p in sorted(Path(path).iterdir()) if p.is_file()).unlink()
        raise Killed

    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _checkpoint(root, step, payload=f"weights {step}".encode())
    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        ckpt.prune(root, 2, protect=ckpt.step_dir(root, 3))
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000003", "step-00000002"]
    assert all(ckpt.verify(p) is None for p in ckpt.list_checkpoints(root))
    assert [p.parent for p in atomic.leftovers(tmp_path)] == [root]  # the renamed rest, 1 file short
    RunFolder(tmp_path).remove_leftovers()  # (what the next start does, under the run's lock)
    assert atomic.leftovers(tmp_path) == [] and sorted(p.name for p in root.iterdir()) == ["step-00000002",
                                                                                          "step-00000003"]


def test_a_checkpoint_that_lacks_some_of_the_models_trained_weights_is_refused(tmp_path):
    """A checkpoint missing weights the model trains would leave those at their fresh values and train on as if
    resumed: refused in one line, as one with weights the model lacks is."""
    import torch
    from safetensors.torch import save_file

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    saved = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    save_file(saved, str(tmp_path / "trainable.safetensors"))
    ckpt.load_trainable(model, tmp_path)
    assert all(bool((p == 0.5).all()) for p in model.parameters())
    save_file({k: v for k, v in saved.items() if k != "1.bias"}, str(tmp_path / "trainable.safetensors"))
    with pytest.raises(ckpt.UserError, match=r"does not fit this model: 1 trainable weights missing, 0 unknown "
                                             r"\(e.g. 1.bias\)"):
        ckpt.load_trainable(model, tmp_path)


def test_export_of_an_older_checkpoint_describes_that_step_with_its_own_settings(runs):
    """checkpoints/step-3 of a run resumed to 6 steps with other flags: its export (model card, the command that
    retrains it) takes the settings of step 3's run from the checkpoint, not the resumed run's config.yaml."""
    from lowmem_alignprop.lora.lora_files import read_lora

    _, split, _ = runs
    lora = read_lora(str(split / "checkpoints" / "step-00000003"))
    assert lora.step == 3
    assert (lora.run_config["steps"], lora.run_config["checkpoint_every"]) == (3, 1)


def test_a_resume_counts_the_reward_and_the_prompts_from_the_step_they_changed_at(tmp_path, monkeypatch):
    """Trainer.restore: reward_since (the first step the summary's first -> last reward compares) is the resume's step
    when the reward or its weights changed, else the checkpoint's own; prompts_since likewise for the prompt list."""
    from types import SimpleNamespace

    from lowmem_alignprop.training import train as train_mod
    from lowmem_alignprop.run.runfolder import RunFolder
    from lowmem_alignprop.settings.config import Config

    cfg = Config(reward="brightness", reward_weights="w.safetensors", output_dir=str(tmp_path / "run")).validate()
    prompts = ["a cat", "a dog"]

    def since(config: dict, **saved) -> tuple[int, int]:
        state = {"config": {"reward": "brightness", "reward_weights": "w.safetensors", **config},
                 "prompts_sha": train_mod.prompt_digest(prompts), **saved}
        monkeypatch.setattr(train_mod.ckpt, "restore", lambda *args, **kw: (state, None))
        trainer = train_mod.Trainer(cfg, RunFolder(cfg.output_dir), prompts,
                                    point=SimpleNamespace(step=5, path=tmp_path / "step-5", state=state))
        trainer.accelerator = trainer.bare_unet = trainer.optimizer = trainer.engine = trainer.gather = None
        trainer.is_main, trainer.device = False, "cpu"  # (the device: the software record's)
        trainer.restore()
        return trainer.reward_since, trainer.prompts_since

    assert since({}) == (1, 1)
    assert since({}, reward_since=3, prompts_since=2) == (3, 2)  # a change at an earlier resume still counts
    assert since({"reward": "colorfulness"}, reward_since=3) == (6, 1)
    assert since({"reward_weights": "other.safetensors"}) == (6, 1)  # other weights: another reward
    assert since({}, prompts_sha="0" * 16) == (1, 6)
    # images made otherwise score otherwise: a resume at 32 px compared its rewards with the 64 px steps' (a -105 drop)
    assert since({"resolution": cfg.resolution // 2}) == (6, 1)
    assert since({"resolution": cfg.resolution, "guidance_scale": cfg.guidance_scale}) == (1, 1)


def test_a_resume_adds_its_command_line_under_the_earlier_starts(tmp_path):
    """command.txt holds one line per start: a --resume appends its own after the run's earlier ones (the model card
    lists them as the commands that retrain the LoRA; overwritten, it named the resume alone)."""
    from types import SimpleNamespace

    from lowmem_alignprop.training.train import Trainer
    from lowmem_alignprop.run.filenames import COMMAND_FILE
    from lowmem_alignprop.run.runfolder import RunFolder, started_commands
    from lowmem_alignprop.settings.config import Config

    cfg = Config(output_dir=str(tmp_path / "run")).validate()
    out = tmp_path / "run"
    out.mkdir()
    (out / COMMAND_FILE).write_text("lowmem-alignprop --steps 4\nlowmem-alignprop --resume latest --steps 6\n")
    trainer = Trainer(cfg, RunFolder(cfg.output_dir), ["a cat"], command="lowmem-alignprop --resume latest --steps 8",
                      point=SimpleNamespace(step=6, state={"config": cfg.to_dict()}, path=tmp_path / "step-6"))
    trainer.is_main = True
    trainer.write_config()
    assert started_commands(out) == ["lowmem-alignprop --steps 4", "lowmem-alignprop --resume latest --steps 6",
                                     "lowmem-alignprop --resume latest --steps 8"]


def test_a_resume_that_changes_how_prompts_are_encoded_is_a_change_of_the_training():
    """SD3 resumed with T5 (trained without) or with another T5 length: the images change as with any image setting,
    but the model card listed no change (t5_encoder and max_sequence_length were not counted as trained with)."""
    from lowmem_alignprop.settings.config import RUN_IMAGE_SETTINGS

    saved = Config(t5_encoder=False).to_dict()
    earlier = [{"step": 2, "changes": {"lr": [1, 2]}}]
    changed = resume_rules.resume_changes({"config": saved, "resume_changes": earlier},
                                          dataclasses.replace(Config(t5_encoder=False), t5_encoder=True,
                                                              max_sequence_length=77), 4)
    assert changed == [{"step": 2, "changes": {"lr": [1, 2]}},
                       {"step": 4, "changes": {"t5_encoder": [False, True], "max_sequence_length": [0, 77]}}]
    # every setting of how the images are made is one the LoRA was trained with
    assert set(RUN_IMAGE_SETTINGS) - {"model_components"} <= resume_rules.TRAINED_WITH


def expected_software() -> dict:
    """What a CPU run of FAST's settings records: importlib.metadata's versions (no optional library: adamw, sdpa),
    and torch's thread count."""
    import importlib.metadata as md
    import platform

    import torch

    return {"versions": {"lowmem-alignprop": md.version("lowmem_alignprop"), "python": platform.python_version(),
                         **{n: md.version(n) for n in ("torch", "diffusers", "transformers", "peft", "accelerate")}},
            "device": "cpu", "threads": torch.get_num_threads()}


def software_said(software: dict) -> str:
    """The card's words for ``software`` (model_card.software_lines)."""
    names = ", ".join(f"{'Python' if n == 'python' else n} {v}" for n, v in software["versions"].items())
    n = software.get("threads")
    return f"{names}, on {software['device']}" + (f" ({n} thread{'s' * (n != 1)})" if n is not None else "")


def test_a_run_records_the_software_that_trained_it_and_its_card_lists_it(runs, tmp_path):
    """summary.json and each checkpoint name the versions and the device that trained the run (from step 1); a resume
    under the same ones adds no stretch and no resume change; the exported card says them under "How it was made"."""
    full, split, _ = runs
    now = expected_software()
    for run in (full, split):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["software"] == [{"step": 1, **now}] and summary["resume_changes"] == []
    for step in (split / "checkpoints").iterdir():
        assert json.loads((step / "state.json").read_text())["software"] == [{"step": 1, **now}], step
    out = tmp_path / "card"
    assert main(["export", "--lora", str(full / "lora"), "--format", "kohya", "--out", str(out)]) == 0
    card = (out / "README.md").read_text().splitlines()
    made = card.index("## How it was made")
    assert card[made:].count(f"Trained with {software_said(now)}.") == 1


def test_a_resume_under_another_diffusers_says_so_and_records_it(runs, tmp_path, caplog):
    """The checkpoints edited to say diffusers 0.39.0 trained steps 1-6: the resume says what changed in one line, it
    is a resume change (summary.json, the next checkpoint, the card's row), and the stretches say which steps ran
    under which versions."""
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    now = expected_software()
    old = {**now, "versions": {**now["versions"], "diffusers": "0.39.0"}}
    edit_states(run, lambda state: state.update(software=[{"step": 1, **old}]))
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main(["--output-dir", str(run), "--steps", "7", "--resume", "latest"]) == 0
    said = [r.getMessage() for r in caplog.records if "other software" in r.getMessage()]
    assert said == [f"resume: the checkpoint was trained under other software (diffusers 0.39.0 -> "
                    f"{now['versions']['diffusers']}): from step 7 the run goes on under this machine's, and its "
                    "images and losses may differ in the last digits from a run under one (recorded as a resume "
                    "change)"]
    change = [{"step": 7, "changes": {"diffusers": ["0.39.0", now["versions"]["diffusers"]]}}]
    stretches = [{"step": 1, **old}, {"step": 7, **now}]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resume_changes"] == change and summary["software"] == stretches
    state = json.loads((run / "checkpoints" / "step-00000007" / "state.json").read_text())
    assert state["resume_changes"] == change and state["software"] == stretches
    for lora in (run / "lora", run / "checkpoints" / "step-00000007"):
        out = tmp_path / f"card-{lora.name}"
        assert main(["export", "--lora", str(lora), "--format", "kohya", "--out", str(out)]) == 0
        card = (out / "README.md").read_text().splitlines()
        assert f"| changed by a resume | from step 7: diffusers {now['versions']['diffusers']} (was 0.39.0) |" in card
        made = card.index("## How it was made")
        at = card.index("Trained with:", made)
        assert card[at:] == ["Trained with:", "", f"- steps 1-6: {software_said(old)}",
                             f"- step 7: {software_said(now)}"], lora  # (the card's last lines)


def test_a_resume_under_another_cpu_thread_count_says_so_and_records_it(runs, tmp_path, caplog, monkeypatch):
    """On the CPU torch's thread count (OMP_NUM_THREADS) sums in another order: the same run under 1 and 2 threads
    differs in the last digits of its weights, and nothing recorded the count. Each stretch records it now; a
    resume under another is said and recorded as a resume change, as a library's version is. (torch reports the other
    count while the step computes on the worker's own threads: two threads spinning beside the other pytest worker
    made this one step several times slower; a record that read OMP_NUM_THREADS instead of torch's count would fail
    here.)"""
    import torch

    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    was = expected_software()
    other = 2 if was["threads"] == 1 else 1
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"), monkeypatch.context() as patched:
        patched.setattr(torch, "get_num_threads", lambda: other)
        assert main(["--output-dir", str(run), "--steps", "7", "--resume", "latest"]) == 0
    assert [r.getMessage() for r in caplog.records if "other software" in r.getMessage()] == [
        f"resume: the checkpoint was trained under other software (threads {was['threads']} -> {other}): from step 7 "
        "the run goes on under this machine's, and its images and losses may differ in the last digits from a run "
        "under one (recorded as a resume change)"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["software"] == [{"step": 1, **was}, {"step": 7, **was, "threads": other}]
    assert summary["resume_changes"] == [{"step": 7, "changes": {"threads": [was["threads"], other]}}]


def test_a_checkpoint_from_before_the_record_resumes_without_a_word(runs, tmp_path, caplog):
    """A checkpoint written before versions were kept: nothing said, no resume change; the record starts at the
    resume's step and the card calls the earlier steps' software unrecorded."""
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    edit_states(run, lambda state: state.pop("software"))
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main(["--output-dir", str(run), "--steps", "7", "--resume", "latest"]) == 0
    assert "software" not in caplog.text
    now = expected_software()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resume_changes"] == [] and summary["software"] == [{"step": 7, **now}]
    out = tmp_path / "card"
    assert main(["export", "--lora", str(run / "lora"), "--format", "kohya", "--out", str(out)]) == 0
    card = (out / "README.md").read_text().splitlines()
    at = card.index("Trained with:")
    assert card[at:] == ["Trained with:", "", "- steps 1-6: not recorded", f"- step 7: {software_said(now)}"]


def test_config_yaml_records_the_profile_files_values_and_a_resume_tells_an_edit_from_its_set(tmp_path, caplog):
    """A run started with --profile mine.yaml --set lr=0.02 over the file's lr 0.01: config.yaml records the file's
    values (profile_values), and each resume keeps that record. A resume naming the unedited file says nothing (lr
    0.02 is the run's own --set); after an edit of the file it says the field edited, from the start's value."""
    from lowmem_alignprop.settings.profiles import load_profile, shipped_profiles

    mine, run = tmp_path / "mine.yaml", tmp_path / "run"
    cpu = shipped_profiles()["cpu"].read_text(encoding="utf-8")
    mine.write_text(cpu.replace("\nlr: 0.003", "\nlr: 0.01"), encoding="utf-8")
    sets = [a for a in LIGHT[2:] if a != "lr=0.01"][:-1] + ["--set", "lr=0.02", "--checkpoint-every", "1"]
    assert main(["--profile", str(mine), *sets, "--output-dir", str(run), "--steps", "1"]) == 0
    recorded = yaml.safe_load((run / "config.yaml").read_text())["profile_values"]
    assert (recorded["lr"], recorded["k_max"], len(recorded)) == (0.01, 10, 22)  # the file's 22 fields as written
    said = f"resume: profile {mine}, the run's own"
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main(["--profile", str(mine), "--resume", "latest", "--output-dir", str(run), "--steps", "2"]) == 0
        assert [m for m in caplog.messages if m.startswith(said)] == []
        assert yaml.safe_load((run / "config.yaml").read_text())["profile_values"] == recorded
        mine.write_text(cpu.replace("\nlr: 0.003", "\nlr: 0.03"), encoding="utf-8")
        assert main(["--profile", str(mine), "--resume", "latest", "--output-dir", str(run), "--steps", "3"]) == 0
    assert [m for m in caplog.messages if m.startswith(said)] == [
        f"{said}, was edited since the run started: lr=0.01 -> 0.03 (the run has lr=0.02): a resume keeps the run's "
        "settings and the flags given now; to take the file's, give it: --set lr=0.03"]
    assert yaml.safe_load((run / "config.yaml").read_text())["profile_values"] == recorded  # the start's, still
    assert load_profile(str(run / "config.yaml"))[1]["lr"] == 0.02  # as --profile: the run's settings, not the record


def test_a_config_yaml_re_saved_by_a_windows_editor_is_read_at_a_resume(tmp_path):
    """config.yaml edited and re-saved as UTF-16 (Notepad's "Unicode", PowerShell 5.1's Set-Content): the resume's
    "config.yaml was edited since the checkpoint" note and its run's own profile record read it as UTF-8, failed, and
    said nothing, so the edit was lost without a word (a UTF-8 file said it)."""
    from types import SimpleNamespace

    from lowmem_alignprop.run.resume_rules import edited_config_note
    from lowmem_alignprop.run.runfolder import RunFolder

    run = tmp_path / "run"
    point = SimpleNamespace(path=run / "checkpoints" / "step-00000001")
    point.path.mkdir(parents=True)
    text = "profile: /x/mine.yaml\nprofile_values:\n  lr: 0.001\nlr: 0.002\n".replace("\n", "\r\n")
    for encoding in ("utf-8", "utf-8-sig", "utf-16"):
        (run / "config.yaml").write_bytes(text.encode(encoding))
        assert edited_config_note(run / "config.yaml", {"lr": 0.001}, []) == (
            "resume: config.yaml was edited since the checkpoint (lr 0.001 -> 0.002): a resume trains with the "
            "checkpoint's settings and the flags given now, and writes config.yaml again; give a change as a flag, "
            "e.g. --set lr=0.002"), encoding
        assert RunFolder(run).recorded_profile(point) == ("/x/mine.yaml", {"lr": 0.001}), encoding

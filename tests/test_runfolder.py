"""The run folder (lowmem_alignprop/run/runfolder.py): choosing the folder, what it holds (typed), the one lookup of
the checkpoint to resume, metrics of a resumed branch. Fast: no model is trained here (test_resume.py and
test_runlock.py run the same paths end to end)."""

import json
import logging
import shutil

import pytest

from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.run import resume_rules
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.run.runfolder import RunFolder, keep_metrics_until


def fake_checkpoint(run, step: int, **state):
    """A checkpoint folder the lookup accepts: state.json listed with its checksum in the manifest."""
    path = ckpt.step_dir(ckpt.root_of(run), step)
    path.mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"format": ckpt.FORMAT, "step": step, **state}))
    ckpt.write_manifest(path)
    return path


def test_what_a_folder_holds_is_typed(tmp_path):
    assert ckpt.holds_a_run(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    mark = ckpt.holds_a_run(tmp_path)
    assert str(mark) == "metrics.jsonl" and mark.started_only and not mark.checkpoints
    fake_checkpoint(tmp_path, 1)
    mark = ckpt.holds_a_run(tmp_path)
    assert str(mark) == "checkpoints/" and mark.checkpoints and not mark.started_only


def test_resume_latest_of_the_default_folder_names_its_later_numbered_runs(tmp_path, caplog):
    """--resume latest without --output-dir continues outputs/run, though the same command run again went on to
    outputs/run-2 (or run-3): it says which folders hold later runs and the --output-dir that continues the newest;
    a folder the user named, a numbered folder without checkpoints, or a named checkpoint are not said."""
    base = tmp_path / "run"
    fake_checkpoint(base, 2)
    fake_checkpoint(tmp_path / "run-3", 1)  # (run-2 deleted: a gap)
    (tmp_path / "run-4").mkdir()  # a run that stopped before its first checkpoint: nothing to continue
    (tmp_path / "run-x").mkdir()  # not one of the default folder's numbers
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        point = RunFolder.for_command(base, chosen=False, resume="latest").check()
        assert point.state["step"] == 2  # the default folder is still what continues
        assert caplog.messages == [f"--resume latest continues {base}; {tmp_path / 'run-3'} holds a later run of the "
                                   f"same command without --output-dir (the default folder's next ones): to continue "
                                   f"it, add --output-dir {tmp_path / 'run-3'}"]
        caplog.clear()
        RunFolder.for_command(base, chosen=True, resume="latest").check()
        RunFolder.for_command(base, chosen=False, resume=str(ckpt.step_dir(ckpt.root_of(base), 2))).check()
        assert caplog.messages == []
    fake_checkpoint(tmp_path / "run-10", 1)
    with pytest.raises(UserError) as e:  # nothing to continue in the default folder: the line says where to look
        RunFolder.for_command(tmp_path / "other", chosen=False, resume="latest").check()
    assert str(e.value).endswith("(or check --output-dir)")  # (no other-N: the line as it was)
    shutil.rmtree(ckpt.root_of(base))
    with pytest.raises(UserError, match=r"no intact checkpoint .*; .*run-3, .*run-10 hold later runs of the same "
                                        r"command without --output-dir .*: to continue the newest, add --output-dir "
                                        r".*run-10$"):
        RunFolder.for_command(base, chosen=False, resume="latest").check()


def test_the_run_folder_of_a_resume_value(tmp_path):
    run = tmp_path / "run"
    step = fake_checkpoint(run, 2)
    aside = ckpt.root_of(run) / "superseded-after-step-1"
    aside.mkdir()
    assert RunFolder.of_checkpoint(str(run)) == str(run)
    assert RunFolder.of_checkpoint(str(step)) == str(run)
    assert RunFolder.of_checkpoint(str(aside / "step-00000002")) == str(run)
    assert RunFolder.of_checkpoint("latest") is None
    assert RunFolder.of_checkpoint(str(tmp_path / "elsewhere")) is None


def test_only_the_default_folder_moves_past_an_earlier_run(tmp_path, caplog):
    base = tmp_path / "run"
    fake_checkpoint(base, 1)
    named = RunFolder.for_command(base, chosen=True, resume=None)
    named.move_past_an_earlier_run()
    assert named.path == base
    default = RunFolder.for_command(base, chosen=False, resume=None)
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        default.move_past_an_earlier_run()
        assert default.path == tmp_path / "run-2"
        assert "holds an earlier run" not in caplog.text  # not yet: a bad input may still stop the run (hold says it)
        with default.hold():
            assert caplog.messages == [f"{base} holds an earlier run (--resume latest continues it): this run "
                                       f"writes to {tmp_path / 'run-2'}"]
    with pytest.raises(UserError, match=r"already holds a run \(checkpoints/\): continue it with --resume latest"):
        named.check()


def test_the_checkpoint_to_resume_is_read_once(tmp_path, monkeypatch):
    run = tmp_path / "run"
    fake_checkpoint(run, 3, config={"lr": 0.5, "output_dir": "elsewhere", "reward_floor": None})  # a retired field
    reads = []
    real = ckpt.read_state
    monkeypatch.setattr(ckpt, "read_state", lambda path: reads.append(path) or real(path))
    folder = RunFolder.for_command(run, chosen=True, resume="latest")
    assert folder.resumed_settings() == ("resumed", {"lr": 0.5})  # known fields, never the output dir
    point = folder.check()
    assert point.step == 3 and point.path.name == "step-00000003"
    assert len(reads) == 1


def test_a_checkpoint_trained_with_a_retired_setting_says_the_resume_goes_on_without_it(tmp_path, caplog):
    """A checkpoint of the version that had reward_floor, set: the resume dropped it in silence, and its loss no
    longer floored the rewards. Said in one line; unset (null, what every other run of that version recorded), not."""
    for floor, said in ((None, []), (0.3, ["resume: the checkpoint was trained with reward_floor=0.3, a setting this "
                                           "version no longer has (the loss saw max(reward, reward_floor), so images "
                                           "below it gave no gradient): this run trains on without it"])):
        run = tmp_path / f"run-{floor}"
        fake_checkpoint(run, 3, config={"lr": 0.5, "reward_floor": floor})
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
            assert RunFolder.for_command(run, chosen=True, resume="latest").resumed_settings() == ("resumed",
                                                                                                   {"lr": 0.5})
        assert caplog.messages == said


def test_latest_is_looked_up_again_under_the_lock_and_a_newer_checkpoint_refuses(tmp_path):
    """--resume latest started while another start of the run was finishing: the checkpoint it looked up (step 2)
    is no longer the latest once it holds the lock (the other wrote step 6): refused, nothing changed (it resumed
    step 2 and set step 6 aside as a replaced branch). A checkpoint that was there, broken, at the lookup is not
    newer work."""
    run = tmp_path / "run"
    fake_checkpoint(run, 2, config={"lr": 0.5})
    (fake_checkpoint(run, 4) / "state.json").write_text("{torn")  # broken at the lookup: skipped then and now
    folder = RunFolder.for_command(run, chosen=True, resume="latest")
    assert folder.check().step == 2
    with folder.hold():
        pass  # nothing newer: it goes on
    folder = RunFolder.for_command(run, chosen=True, resume="latest")
    assert folder.check().step == 2
    fake_checkpoint(run, 6)  # the other start's last checkpoint, written meanwhile
    with pytest.raises(UserError, match=f"^{run} went on to step-00000006 while this command started .*: nothing "
                                        "was changed; --resume latest again continues from it$"):
        folder.hold()
    assert not (run / ".run.lock").exists()  # released
    with RunFolder.for_command(run, chosen=True, resume="latest").hold():  # and the next start takes step 6
        pass


def test_a_broken_checkpoint_is_said_where_the_run_checks(tmp_path, caplog):
    run = tmp_path / "run"
    fake_checkpoint(run, 1)
    broken = fake_checkpoint(run, 2)
    (broken / "state.json").write_text("{}")  # no longer matches its checksum
    folder = RunFolder.for_command(run, chosen=True, resume="latest")
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        folder.resumed_settings()  # the lookup itself says nothing yet
        assert "incomplete or corrupt" not in caplog.text
        point = folder.check()
    assert point.step == 1
    assert caplog.text.count("incomplete or corrupt") == 1


def test_no_checkpoint_to_resume_fails_at_the_check(tmp_path):
    folder = RunFolder.for_command(tmp_path / "run", chosen=True, resume="latest")
    assert folder.resumed_settings() is None
    with pytest.raises(UserError, match="no intact checkpoint"):
        folder.check()


def test_resuming_an_older_step_sets_the_newer_ones_aside_with_their_metrics(tmp_path):
    run = tmp_path / "run"
    old = fake_checkpoint(run, 1)
    fake_checkpoint(run, 2)
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    folder = RunFolder.for_command(run, chosen=True, resume=str(old))
    point = folder.check()
    folder.start_metrics(point, [{"step": 1}])
    aside = ckpt.root_of(run) / "superseded-after-step-1"
    assert (aside / "step-00000002").is_dir() and (aside / "metrics.jsonl").read_text().count("\n") == 2
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_keep_metrics_until_drops_later_and_cut_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    keep_metrics_until(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_resumes_changed_settings_are_said_once_by_rank_0(tmp_path, monkeypatch, caplog):
    """Every rank checks the checkpoint alike; each said "resume: lr was ..., now ..." in its own copy (and each
    split the held-out prompts and said what eval_prompts left out)."""
    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.step import inputs

    state = {"config": Config(lr=1e-3).to_dict(), "step": 1}
    (tmp_path / "eval.txt").write_text("a red circle\na night sky\n")
    eval_cfg = Config(eval_every=1, eval_prompts=str(tmp_path / "eval.txt"))
    said = {}
    for rank in (0, 1):
        monkeypatch.setattr(resume_rules, "global_rank", lambda: rank)
        monkeypatch.setattr(inputs, "global_rank", lambda: rank)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
            resume_rules.check_config(state, Config(lr=2e-3, steps=2), tmp_path)
            inputs.split_eval_prompts(eval_cfg, ["a red circle", "a blue square"])
        said[rank] = [r.getMessage() for r in caplog.records]
    assert said[1] == [] and len(said[0]) == 2 and said[0][0] == "resume: lr was 0.001 in the checkpoint, now 0.002"


def test_a_resumes_model_is_judged_by_its_weights_and_a_new_seed_says_what_it_moves(tmp_path, caplog):
    """Another --model: no "model was ..." warning before the weights load (the fingerprint then refuses another model
    in one line, or says the same model goes by another name: a warning then an error was two lines for one bad
    input). A new seed says what it changes and what it does not."""
    from lowmem_alignprop.settings.config import Config

    state = {"config": Config(model="tiny", seed=0).to_dict(), "step": 1}
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        resume_rules.check_config(state, Config(model="toy", seed=7, steps=2), tmp_path)
    assert [r.getMessage() for r in caplog.records] == [
        "resume: seed was 0 in the checkpoint, now 7 (the images' noise follows it; with prompt_order=random the "
        "prompt and K draws go on from the checkpoint's random state, and the held-out prompts stay those the run set "
        "aside)"]


@pytest.mark.parametrize("truncation, was, now, unread", [("fixed", {"k_max": 4}, {"k_max": 3}, "k_max"),
                                                           ("uniform", {"k": 4}, {"k": 3}, "k")])
def test_a_resume_says_and_records_no_change_of_a_k_its_truncation_does_not_read(tmp_path, caplog, truncation, was,
                                                                                 now, unread):
    """A resume with fewer sample_steps lowers the K settings above them, those the run does not read too (k_max
    under truncation=fixed): it said 'resume: k_max was 4 in the checkpoint, now 3' beside sample_steps' line, and
    the card's resume changes listed it, for a setting no step reads (the FLUX walk: --resume --set sample_steps=3)."""
    from lowmem_alignprop.settings.config import Config

    common = {"truncation": truncation, "k_min": 1}
    state = {"config": Config(**common, sample_steps=4, **was).to_dict(), "step": 1}
    cfg = Config(**common, sample_steps=3, steps=2, **now)
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        resume_rules.check_config(state, cfg, tmp_path)
    assert [r.getMessage() for r in caplog.records] == ["resume: sample_steps was 4 in the checkpoint, now 3"]
    assert resume_rules.resume_changes(state, cfg, 2) == [{"step": 2, "changes": {"sample_steps": [4, 3]}}]
    read = {"k": 2} if truncation == "fixed" else {"k_max": 2}  # (a change of a K the run reads is still said)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        resume_rules.check_config(state, Config(**common, sample_steps=4, steps=2, **was, **read), tmp_path)
    assert [r.getMessage() for r in caplog.records] == [
        f"resume: {k} was {Config(**common, **was).to_dict()[k]} in the checkpoint, now {v}" for k, v in read.items()]
    assert unread not in resume_rules.resume_changes(state, cfg, 2)[0]["changes"]


def test_resume_changes_that_would_not_apply_are_refused(tmp_path):
    """Each was warned as a change, recorded in config.yaml, and did not apply: --init-lora on a resume (loaded, then
    replaced by the checkpoint's LoRA), another eval_holdout (the run keeps the prompts it set aside), and any
    training setting on a resume of a finished run that only writes its outputs again (no step used them, yet the
    card and base_model.json said it trained with them)."""
    from lowmem_alignprop.settings.config import Config

    state = {"config": Config(steps=4).to_dict(), "step": 4}
    with pytest.raises(UserError, match=r"^--init-lora /x/lora: a resume continues the checkpoint's LoRA \(step 4\), "
                                        r"which would replace it: drop --init-lora"):
        resume_rules.check_config(state, Config(steps=6, init_lora="/x/lora"), tmp_path)
    with pytest.raises(UserError, match=r"^eval_holdout=2: the run set aside its held-out prompts at its start \(4\), "
                                        r"and a resume keeps them"):
        resume_rules.check_config(state, Config(steps=6, eval_holdout=2), tmp_path)
    with pytest.raises(UserError, match=r"^the run finished at step 4, so this resume trains nothing .*: reward, lr "
                                        r"would apply to no step, .*; leave them out, or give --steps above 4"):
        resume_rules.check_config(state, Config(steps=4, lr=0.5, reward="colorfulness"), tmp_path, finished=True)
    resume_rules.check_config(state, Config(steps=4, checkpoint_every=1), tmp_path,
                              finished=True)  # (free fields: fine)
    resume_rules.check_config(state, Config(steps=4, push_to_hub="you/x", export_format="kohya"), tmp_path,
                              finished=True)
    resume_rules.check_config(state, Config(steps=6, lr=0.5), tmp_path)  # trained on with it: warned, applied


def test_a_resume_that_flips_ema_outputs_under_evaluation_is_refused(tmp_path):
    """best/ so far was chosen on the weights the run evaluated (the EMA's, by default): a resume evaluating the
    trained ones would compare the two (it only warned, "ema_outputs was True ..., now False"); without evaluation
    the change is only said."""
    from lowmem_alignprop.settings.config import Config

    ema = dict(ema_decay=0.9, eval_every=2, steps=4)
    state = {"config": Config(**ema).to_dict(), "step": 2}
    with pytest.raises(UserError, match="resume with --set ema_outputs=true, or start a new run"):
        resume_rules.check_config(state, Config(**ema, ema_outputs=False), tmp_path)
    resume_rules.check_config(state, Config(**ema), tmp_path)
    plain = {"config": Config(ema_decay=0.9, steps=4).to_dict(), "step": 2}
    resume_rules.check_config(plain, Config(ema_decay=0.9, steps=4, ema_outputs=False), tmp_path)
    # the EMA turned off (or on) is the same change of the weights evaluated (it was only warned of)
    with pytest.raises(UserError, match=r"evaluated the EMA weights and this run would evaluate the trained ones: .* "
                                        r"resume with --set ema_decay=0.9, or start a new run"):
        resume_rules.check_config(state, Config(**{**ema, "ema_decay": 0.0}), tmp_path)
    trained = {"config": Config(eval_every=2, steps=4).to_dict(), "step": 2}
    with pytest.raises(UserError, match=r"evaluated the trained weights and this run would evaluate the EMA ones: .* "
                                        r"resume with --set ema_decay=0.0, or start a new run"):
        resume_rules.check_config(trained, Config(**ema), tmp_path)
    # an EMA kept beside: nothing evaluated
    resume_rules.check_config(trained, Config(**ema, ema_outputs=False), tmp_path)
    resume_rules.check_config(state, Config(**{**ema, "ema_decay": 0.99}), tmp_path)  # another decay: still the EMA's


def test_a_resume_whose_new_early_stop_is_already_spent_trains_on_and_says_so(tmp_path, caplog):
    """A run that ended at its last step 2 evaluations past its best (no early stop: none asked for, or a patience of 2
    met at the last step), resumed for more steps with --early-stop 2: it trains on, warned that the first evaluation
    without improvement stops it (it was refused as "where the run stopped early", which it was not). One that did
    stop early (before its last step) is refused: each resume would train one step and stop again."""
    import logging

    from lowmem_alignprop.settings.config import Config

    def state(early_stop, step=6):
        return {"config": Config(eval_every=1, early_stop=early_stop, steps=6).to_dict(), "step": step,
                "evaluation": {"since_best": 2, "best_step": step - 2}}

    now = Config(eval_every=1, early_stop=2, steps=12)
    caplog.set_level(logging.WARNING, logger="lowmem_alignprop")
    for ended in (state(0), state(2)):  # no early stop asked for; asked for, met at the last step
        caplog.clear()
        resume_rules.check_config(ended, now, tmp_path / "step-6")
        assert resume_rules.run_ended(ended, now) is False
        assert ("resume: the held-out evaluation has not improved for 2 evaluations (since step 4), already the "
                "--early-stop 2 asked for now: the first evaluation that does not improve stops the run") in caplog.text
    with pytest.raises(UserError, match=r"is where the run stopped early \(its held-out evaluation had not improved "
                                        r"for 2 evaluations; the best step, 2, is in best/\): nothing left to train"):
        resume_rules.check_config(state(2, step=4), now, tmp_path / "step-4")
    caplog.clear()  # its outputs written again (no step trained): nothing to warn of
    resume_rules.check_config(state(2, step=4), Config(eval_every=1, early_stop=2, steps=6), tmp_path / "step-4",
                              finished=True)
    assert "resume: the held-out" not in caplog.text
    caplog.clear()
    resume_rules.check_config(state(0), Config(eval_every=1, early_stop=3, steps=12), tmp_path / "step-6")
    assert "resume: the held-out" not in caplog.text


def test_the_docs_list_every_field_a_resume_changes_freely_and_every_one_it_keeps():
    """docs/bad_inputs.md's resume paragraph names the fields a resume may change without a word and those it must
    keep, as run/resume_rules.py has them (it named 4 of the 13 free ones)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "bad_inputs.md").read_text()
    para = text[text.index("Fields a resumed run must keep"):]
    para = para.split("\n\n")[0]
    assert all(f"`{name}`" in para for name in (*resume_rules.FREE_FIELDS, *resume_rules.STRICT_FIELDS)), para


def test_a_resume_with_another_lora_alpha_is_refused_and_none_is_the_rank(tmp_path):
    """lora_alpha scales every trained B @ A: resumed under another alpha the checkpoint's LoRA would act at another
    strength from its first step on. Refused like another rank; alpha unset means alpha = rank either side."""
    from lowmem_alignprop.settings.config import Config

    state = {"config": Config(lora_rank=4, lora_alpha=8).to_dict(), "step": 1}
    with pytest.raises(UserError, match=r"was trained with lora_alpha=8, this run has lora_alpha=16: resume with "
                                        r"--set lora_alpha=8"):
        resume_rules.check_config(state, Config(lora_rank=4, lora_alpha=16, steps=2), tmp_path)
    resume_rules.check_config(state, Config(lora_rank=4, lora_alpha=8, steps=2), tmp_path)
    unset = {"config": Config(lora_rank=4).to_dict(), "step": 1}
    resume_rules.check_config(unset, Config(lora_rank=4, lora_alpha=4, steps=2), tmp_path)
    with pytest.raises(UserError, match=r"was trained with lora_alpha=4, this run has lora_alpha=8"):
        resume_rules.check_config(unset, Config(lora_rank=4, lora_alpha=8, steps=2), tmp_path)


def test_a_config_from_before_ema_outputs_writes_the_emas_weights():
    """ema_outputs is on unless set off: a config (or checkpoint) written before the field existed, with ema_decay,
    had the EMA's weights as its outputs; and without ema_decay there is no EMA to write."""
    assert ckpt.outputs_are_ema({"ema_decay": 0.9}) is True
    assert ckpt.outputs_are_ema({"ema_decay": 0.9, "ema_outputs": False}) is False
    assert ckpt.outputs_are_ema({"ema_outputs": True}) is False

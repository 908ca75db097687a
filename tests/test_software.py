"""Which software trained a run (run/software.py): the libraries a configuration records, what a resume calls a
change of them, and the model card's words for the record. The runs that write it: tests/test_resume.py."""

import dataclasses
import importlib.metadata as md
import platform

import torch

from lowmem_alignprop.lora.model_card import resume_change, software_lines
from lowmem_alignprop.measure import provenance
from lowmem_alignprop.run import software
from lowmem_alignprop.settings.config import Config

CORE = ("torch", "diffusers", "transformers", "peft", "accelerate")


def test_a_run_records_the_optional_libraries_it_uses_and_no_others():
    cfg = Config()
    assert software.libraries_used(cfg) == CORE
    for change, extra in (({"optimizer": "adamw8bit"}, ("bitsandbytes",)), ({"base_quant": "nf4"}, ("bitsandbytes",)),
                          ({"deepspeed_zero": 2}, ("deepspeed",)), ({"attention": "xformers"}, ("xformers",)),
                          ({"optimizer": "adamw8bit", "deepspeed_zero": 3}, ("bitsandbytes", "deepspeed"))):
        assert software.libraries_used(dataclasses.replace(cfg, **change)) == CORE + extra, change
    now = software.software(cfg, "cpu")
    assert now == {"versions": {"lowmem-alignprop": md.version("lowmem_alignprop"),
                                "python": platform.python_version(), **{n: md.version(n) for n in CORE}},
                   "device": "cpu", "threads": torch.get_num_threads()}  # (on the CPU: the sums' order)
    assert provenance.library_versions is software.library_versions  # one rule for plans, benchmarks and runs


def test_a_resume_changes_the_versions_both_records_name_and_the_device():
    was = {"versions": {"torch": "2.10.0", "diffusers": "0.40.0", "bitsandbytes": "0.45.0"}, "device": "cpu"}
    now = {"versions": {"torch": "2.10.0", "diffusers": "0.41.0", "deepspeed": "0.16.0"}, "device": "NVIDIA L4"}
    stretches = [{"step": 1, **was}]
    assert software.software_changes(stretches, now) == {"diffusers": ["0.40.0", "0.41.0"],
                                                         "device": ["cpu", "NVIDIA L4"]}
    assert software.software_changes(None, now) == {} and software.software_changes([], now) == {}
    assert software.stretches_at(stretches, now, 5) == [{"step": 1, **was}, {"step": 5, **now}]
    assert software.stretches_at(stretches, was, 5) == stretches  # the same software: no new stretch
    assert software.stretches_at(None, now, 5) == [{"step": 5, **now}]  # a checkpoint from before the record
    assert software.stretches_at([*stretches, "damaged", {"no": "step"}], None, 5) == stretches  # (no step trained)
    # on the CPU, torch's thread count (the sums' order) where both record it
    cpu = {"versions": {"torch": "2.10.0"}, "device": "cpu", "threads": 1}
    assert software.software_changes([{"step": 1, **cpu}], {**cpu, "threads": 2}) == {"threads": [1, 2]}
    assert software.software_changes([{"step": 1, "versions": cpu["versions"], "device": "cpu"}],
                                     {**cpu, "threads": 2}) == {}  # (a record from before the count)
    assert software_lines({"software": [{"step": 1, **cpu}], "steps": 2}) == [
        "Trained with torch 2.10.0, on cpu (1 thread).", ""]
    assert resume_change("threads", [1, 2], None) == "threads 2 (was 1)"
    assert software.software_line({"diffusers": ["0.40.0", "0.41.0"], "device": ["cpu", "NVIDIA L4"]}, 5) == (
        "resume: the checkpoint was trained under other software (diffusers 0.40.0 -> 0.41.0, device cpu -> NVIDIA "
        "L4): from step 5 the run goes on under this machine's, and its images and losses may differ in the last "
        "digits from a run under one (recorded as a resume change)")


def test_the_card_says_each_stretch_and_each_software_change():
    one = {"step": 1, "versions": {"lowmem-alignprop": "0.1.0", "python": "3.11.7", "torch": "2.10.0",
                                   "bitsandbytes": None}, "device": "NVIDIA L4"}
    assert software_lines({"software": [one], "steps": 9}) == [
        "Trained with lowmem-alignprop 0.1.0, Python 3.11.7, torch 2.10.0, on NVIDIA L4.", ""]
    later = {**one, "step": 4, "versions": {**one["versions"], "torch": "2.11.0"}}
    assert software_lines({"software": [one, later]}) == [  # (no step count: an open end)
        "Trained with:", "", "- steps 1-3: lowmem-alignprop 0.1.0, Python 3.11.7, torch 2.10.0, on NVIDIA L4",
        "- from step 4: lowmem-alignprop 0.1.0, Python 3.11.7, torch 2.11.0, on NVIDIA L4", ""]
    assert software_lines({"software": [{**later, "step": 2}], "steps": 2}) == [
        "Trained with:", "", "- step 1: not recorded",
        "- step 2: lowmem-alignprop 0.1.0, Python 3.11.7, torch 2.11.0, on NVIDIA L4", ""]
    assert software_lines({}) == [] and software_lines({"software": [{"step": "x"}]}) == []
    assert resume_change("python", ["3.11.7", "3.12.1"], None) == "Python 3.12.1 (was 3.11.7)"
    assert resume_change("device", ["cpu", "NVIDIA L4"], None) == "device NVIDIA L4 (was cpu)"
    assert resume_change("processes", [2, 1], None) == "1 process (was 2)"
    assert resume_change("lr", [0.01, 0.02], lambda _, v: v) == "`--set lr=0.02` (was 0.01)"


def test_outputs_written_again_for_a_run_that_stopped_early_record_no_software_change(caplog):
    """A run that stopped early (step 6 of 10) whose lora/ is gone: --resume latest writes its outputs again and
    trains no step, so other software on this machine is no change of what trained it. The check was "step <= steps"
    (a finished run's 11 > 10), which an early stop's 7 passed: it warned and recorded a stretch from a step never
    trained."""
    import logging

    from lowmem_alignprop.training.train_records import RunRecords

    cfg = Config(steps=10)
    stretches = [{"step": 1, "versions": {"torch": "0.0.1"}, "device": "cpu"}]
    for refinish, start in ((None, 6), ("its lora/ is missing", 6), ("its lora/ is missing", 10)):
        trainer = type("T", (), {"cfg": cfg, "device": "cpu", "step": start + 1, "refinish": refinish,
                                 "is_main": True})()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
            changes = RunRecords.software_since(trainer, stretches)
        trains = refinish is None
        assert bool(changes) == trains and changes.get("torch", [None])[0] == ("0.0.1" if trains else None)
        assert [s["step"] for s in trainer.software] == ([1, 7] if trains else [1]), refinish
        assert bool(caplog.records) == trains


def test_outputs_written_again_record_no_change_of_processes():
    """The same for the number of processes: an ended run's outputs written again under 2 processes (its checkpoint
    trained under 1) record no resume change, an early stop's (step 7 <= 10) included; a start that trains does."""
    from lowmem_alignprop.run import resume_rules

    state = {"config": Config(steps=10).to_dict(), "world_size": 1}
    for trains in (True, False):
        assert resume_rules.resume_changes(state, Config(steps=10), 7, 2, trains=trains) == (
            [{"step": 7, "changes": {"processes": [1, 2]}}] if trains else [])

"""docs/outputs.md's convention (tests/outputs_doc.py): every file's table is read, nested and listed keys are
checked (the run's own check is tests/test_training_outputs.py's, on its full_run)."""

from outputs_doc import DOC, documented_keys, undocumented


def test_the_doc_names_each_files_keys():
    """The convention reads every file's table (a renamed heading would leave its keys unchecked)."""
    doc = documented_keys(DOC.read_text(encoding="utf-8"))
    for name in ("metrics.jsonl", "summary.json", "prompts.json", "samples/before_after.json", "best/best.json",
                 "memory_report.json", "checkpoints/step-NNNNNNNN/state.json", "lora/base_model.json",
                 "sample_results.json", "plan --json"):
        assert len(doc.get(name, ())) >= 3, name
    assert {"step", "reward_mean", "eval_reward", "peak_memory_gb"} <= doc["metrics.jsonl"]


def test_undocumented_names_nested_and_listed_keys():
    patterns = {"a", "b", "b.c", "l", "l[].x", "f_*"}
    assert undocumented({"a": 1, "f_rate": 2.0, "b": {"c": 1, "d": 2}, "l": [{"x": 1, "y": 2}], "z": {"q": 1}},
                        patterns) == ["b.d", "l[].y", "z"]

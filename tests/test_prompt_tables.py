"""Prompt sets published as tables (.csv, .tsv, .json, .jsonl, .parquet): the column of the prompts (prompt_column,
or the one obvious one), the rows kept (prompt_filter), each refusal one line."""

from __future__ import annotations

import json
import sys

import pytest

from refusals import assert_refused

from lowmem_alignprop.cli import main
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.step.prompts import configured_prompts, load_prompts

# PartiPrompts' layout: a Prompt column and a Category column; a prompt over two lines, an empty cell, a repeat
PARTI = ("Prompt\tCategory\tNote\n"
         '"a cat\nin a hat"\tAnimals\t\n'
         "a red bus\tVehicles\tx\n"
         "\tAnimals\tempty\n"
         "a dog\tAnimals\t\n"
         "a dog\tAnimals\ttwice\n")


def refused(spec: str, *args) -> str:
    with pytest.raises(UserError) as e:
        load_prompts(spec, *args)
    return str(e.value)


def test_every_table_format_reads_its_prompts_in_order(tmp_path):
    """A TSV's quoted cell over two lines is one prompt (joined by a space), an empty cell is skipped and a prompt
    on two rows stays twice (its weight, as a text file's repeated lines); a CSV's 'Prompts' column (DrawBench's
    name) and a JSON lines file's 'caption' are found by their names; a JSON list of strings is one prompt each."""
    (tmp_path / "parti.tsv").write_text(PARTI, encoding="utf-8")
    assert load_prompts(str(tmp_path / "parti.tsv")) == ["a cat in a hat", "a red bus", "a dog", "a dog"]
    (tmp_path / "drawbench.csv").write_text('Prompts,Category\n"a sign that says ""hi""",Text\n'
                                            "une girafe à vélo,Rare\n", encoding="utf-8")
    assert load_prompts(str(tmp_path / "drawbench.csv")) == ['a sign that says "hi"', "une girafe à vélo"]
    (tmp_path / "hps.json").write_text(json.dumps(["a castle", "  a fox  ", "", "a castle"]), encoding="utf-8")
    assert load_prompts(str(tmp_path / "hps.json")) == ["a castle", "a fox", "a castle"]
    (tmp_path / "rows.json").write_text(json.dumps([{"text": "a boat", "n": 1}, {"n": 2}, {"text": None, "n": 3},
                                                    {"text": "a kite", "n": 4}]), encoding="utf-8")
    assert load_prompts(str(tmp_path / "rows.json")) == ["a boat", "a kite"]
    (tmp_path / "pick.jsonl").write_text('{"caption": "a lamp", "best": true}\n\n{"caption": "a owl\\r\\nat night", '
                                         '"best": false}\n', encoding="utf-8")
    assert load_prompts(str(tmp_path / "pick.jsonl")) == ["a lamp", "a owl at night"]
    (tmp_path / "plain.jsonl").write_text('"a lamp"\n"a tree"\n', encoding="utf-8")
    assert load_prompts(str(tmp_path / "plain.jsonl")) == ["a lamp", "a tree"]


def test_the_column_is_the_one_named_so_or_the_one_named_by_prompt_column(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("id,Caption,TEXT,style\n1,a cat,A CAT,oil\n2,a dog,A DOG,ink\n", encoding="utf-8")
    assert refused(str(table)) == (
        f"prompt file {table} is a CSV table, and 2 of its columns are named prompt, prompts, caption, text (its "
        "columns: id, Caption, TEXT, style): name the column of the prompts with --set prompt_column=NAME")
    assert load_prompts(str(table), "TEXT") == ["A CAT", "A DOG"]
    assert configured_prompts(Config(prompts=str(table), prompt_column="style")) == ["oil", "ink"]
    assert refused(str(table), "Style") == (f"prompt_column=Style: prompt file {table} has no column 'Style' (its "
                                            "columns: id, Caption, TEXT, style): give --set prompt_column=style")
    assert refused(str(table), "", "", "eval_") == (
        f"prompt file {table} is a CSV table, and 2 of its columns are named prompt, prompts, caption, text (its "
        "columns: id, Caption, TEXT, style): name the column of the prompts with --set eval_prompt_column=NAME")
    table.write_text("id,style\n1,oil\n", encoding="utf-8")
    assert refused(str(table)) == (
        f"prompt file {table} is a CSV table, and none of its columns is named prompt, prompts, caption, text (its "
        "columns: id, style): name the column of the prompts with --set prompt_column=NAME")
    (tmp_path / "n.jsonl").write_text('{"prompt": 7}\n', encoding="utf-8")
    assert refused(str(tmp_path / "n.jsonl")) == (
        f"prompt file {tmp_path / 'n.jsonl'} line 1 (its 'prompt') holds 7 (int), not text: name the column of the "
        "prompts with --set prompt_column=NAME")


def test_prompt_filter_keeps_the_rows_whose_column_holds_the_value(tmp_path):
    (tmp_path / "parti.tsv").write_text(PARTI, encoding="utf-8")
    parti = str(tmp_path / "parti.tsv")
    assert load_prompts(parti, "", "Category=Animals") == ["a cat in a hat", "a dog", "a dog"]
    assert configured_prompts(Config(eval_prompts=parti, eval_prompt_filter="Category=Vehicles"), "eval_prompts") \
        == ["a red bus"]
    assert load_prompts(parti, "", "Note=") == ["a cat in a hat", "a dog"]  # (an empty cell is a value too)
    assert refused(parti, "", "category=Animals") == (
        f"prompt_filter=category=Animals: prompt file {parti} has no column 'category' (its columns: Prompt, "
        "Category, Note): give --set prompt_filter=Category=Animals")
    assert refused(parti, "", "Category=Animal") == (
        f"prompt_filter=Category=Animal: no row of prompt file {parti} has Category=Animal (its Category values: "
        "Animals, Vehicles): give --set prompt_filter=Category=Animals")
    many = tmp_path / "many.json"  # the distinct values listed: 20 of them, and how many more
    many.write_text(json.dumps([{"prompt": f"p{i}", "level": i} for i in range(25)]), encoding="utf-8")
    assert load_prompts(str(many), "", "level=24") == ["p24"]
    assert refused(str(many), "", "level=high") == (
        f"prompt_filter=level=high: no row of prompt file {many} has level=high (its level values: "
        + ", ".join(str(i) for i in range(20)) + " and 5 more): give one of them, e.g. --set prompt_filter=level=0")
    (tmp_path / "blank.csv").write_text("prompt,kind\n,a\n  ,a\n", encoding="utf-8")
    assert refused(str(tmp_path / "blank.csv"), "", "kind=a") == (
        f"prompt file {tmp_path / 'blank.csv'} has no prompts in its column 'prompt' of the rows whose kind=a (every "
        "cell empty): give a table with prompts")


def test_a_filter_that_is_not_column_equals_value_is_refused_before_anything_loads(tmp_path, capsys):
    for value in ("Animals", "=Animals"):
        with pytest.raises(UserError) as e:
            Config(prompt_filter=value).validate()
        assert str(e.value) == (f"prompt_filter='{value}' is not COLUMN=VALUE: give the column and the value of the "
                                "rows to keep, e.g. --set prompt_filter=Category=Animals")
    out = tmp_path / "run"
    assert_refused(main, ["--profile", "cpu", "--set", "eval_prompt_filter=Vehicles", "--output-dir", str(out)],
                   "eval_prompt_filter='Vehicles' is not COLUMN=VALUE", out, capsys)


def test_a_cell_with_a_control_character_and_a_json_that_is_no_list_are_one_line(tmp_path):
    (tmp_path / "nul.csv").write_text("prompt\na cat\na \x1b[31mdog\n", encoding="utf-8")
    assert refused(str(tmp_path / "nul.csv")) == (
        f"prompt file {tmp_path / 'nul.csv'} row 2 (its 'prompt') holds the control character '\\x1b': a prompt is "
        "text; take it out of that cell")
    (tmp_path / "obj.json").write_text('{"prompts": ["a cat"], "version": 2}', encoding="utf-8")
    assert refused(str(tmp_path / "obj.json")) == (
        f"prompt file {tmp_path / 'obj.json'} holds a JSON object (its keys: prompts, version): a JSON prompt file is "
        "a list of strings (one prompt each) or of objects (one row each)")
    (tmp_path / "mixed.jsonl").write_text('"a cat"\n{"prompt": "a dog"}\n', encoding="utf-8")
    assert refused(str(tmp_path / "mixed.jsonl")) == (
        f"prompt file {tmp_path / 'mixed.jsonl'} line 1 is a JSON string: a JSON lines prompt file holds strings (one "
        "prompt each) or objects (one row each), not a mix")
    (tmp_path / "cut.json").write_text('[{"prompt": "a cat"},\n {"prompt": ', encoding="utf-8")
    assert refused(str(tmp_path / "cut.json")) == (
        f"prompt file {tmp_path / 'cut.json'} is not valid JSON: Expecting value (line 2, column 13); fix it, or save "
        "the prompts one per line into a .txt file")


def test_a_column_or_filter_where_there_are_no_columns_is_refused(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n", encoding="utf-8")
    assert refused(str(tmp_path / "p.txt"), "Prompt") == (
        f"prompt_column=Prompt: prompt file {tmp_path / 'p.txt'} is a text file, one prompt per line, without columns "
        "(a table is a .csv, .tsv, .json, .jsonl, .parquet file): drop --set prompt_column")
    assert refused("toy-pairs", "", "Category=Animals", "eval_") == (
        "eval_prompt_filter=Category=Animals: toy-pairs is a built-in prompt set, without columns: drop --set "
        "eval_prompt_filter")
    (tmp_path / "l.json").write_text('["a cat"]', encoding="utf-8")
    assert refused(str(tmp_path / "l.json"), "prompt") == (
        f"prompt_column=prompt: prompt file {tmp_path / 'l.json'} is a JSON list of strings, one prompt each, without "
        "columns: drop --set prompt_column")


def test_parquet_is_read_with_pyarrow_or_names_its_install(tmp_path, monkeypatch):
    path = tmp_path / "pick.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
    else:  # (the prompt column read alone: a captions table may hold images)
        pq.write_table(pa.table({"caption": ["a lamp", None, "a owl"], "image": [b"\x00" * 9] * 3,
                                 "split": ["a", "b", "a"]}), path)
        assert load_prompts(str(path)) == ["a lamp", "a owl"]
        assert load_prompts(str(path), "caption", "split=a") == ["a lamp", "a owl"]
        assert refused(str(path), "", "split=b").startswith(f"prompt file {path} has no prompts in its column "
                                                            "'caption'")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert refused(str(path)) == (f"prompt file {path} is a Parquet file, and reading one needs pyarrow, which is not "
                                  "installed: pip install pyarrow (or save the prompts as a .csv or .jsonl file)")


@pytest.mark.parametrize("command", [["sample", "--num-prompts", "1"], ["plan"]], ids=["sample", "plan"])
def test_sample_and_plan_read_a_table_as_training_does(tmp_path, capsys, command):
    """sample --prompts and plan --prompts take the same tables and settings: a column the table lacks is the same
    line, before any model loads."""
    (tmp_path / "parti.tsv").write_text(PARTI, encoding="utf-8")
    out = tmp_path / "out"
    assert_refused(main, [*command, "--prompts", str(tmp_path / "parti.tsv"), "--set", "prompt_column=Promt",
                          "--output-dir", str(out)],
                   f"error: prompt_column=Promt: prompt file {tmp_path / 'parti.tsv'} has no column 'Promt' (its "
                   "columns: Prompt, Category, Note): give --set prompt_column=Prompt", out, capsys)

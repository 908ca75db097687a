"""Prompt sets published as tables (.csv, .tsv, .json, .jsonl, .parquet) and as Hugging Face hub datasets
(``hf://datasets/OWNER/NAME[@REV][/FILE]``): the column of the prompts (prompt_column, or the one obvious one), the
rows kept (prompt_filter), each refusal one line; hub datasets read from a hub cache built here (offline) or through
fakes of huggingface_hub's requests (no test touches the network); a resume reads the commit its run read."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import sys

import pytest

from hubcache import cached_snapshot
from outputs_doc import DOC, documented_keys, undocumented
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
    assert refused("someone/parti-prompts") == (
        "prompt file someone/parti-prompts does not exist; for the Hugging Face hub dataset someone/parti-prompts, "
        "give --prompts hf://datasets/someone/parti-prompts")


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


# ---- hub datasets --------------------------------------------------------------------------------------------------

def _commit(repo: str, ref: str = "main") -> str:
    import hashlib

    return hashlib.sha1((repo if ref == "main" else f"{repo}@{ref}").encode()).hexdigest()  # (hubcache's)


def _dataset(cache, tmp_path, repo: str, files: dict[str, str], ref: str = "main"):
    """``repo`` cached as a dataset repository at ``ref`` holding ``files`` (path -> text)."""
    src = tmp_path / f"src-{repo.replace('/', '--')}-{ref}"
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text, encoding="utf-8")
    return cached_snapshot(cache, repo, src, ref=ref, repo_type="dataset")


def test_a_hub_dataset_is_read_offline_from_the_cache_at_main_or_a_revision(hub_cache, tmp_path):
    """hf://datasets/OWNER/NAME: its one table file (README.md is none); @REV: the cache's snapshot of that branch;
    /FILE: that file; several tables: one line naming them; a dataset the cache lacks, or a file it lacks: one line
    with the `hf download --repo-type dataset` that brings it."""
    from lowmem_alignprop.step.hub_prompts import hub_table
    from lowmem_alignprop.step.prompt_tables import TableRead

    _dataset(hub_cache, tmp_path, "o/parti", {"PartiPrompts.tsv": PARTI, "README.md": "# PartiPrompts"})
    _dataset(hub_cache, tmp_path, "o/parti", {"PartiPrompts.tsv": "Prompt\tCategory\na newer prompt\tArt\n"},
             ref="v2")
    assert load_prompts("hf://datasets/o/parti", "", "Category=Animals") == ["a cat in a hat", "a dog", "a dog"]
    assert load_prompts("hf://datasets/o/parti@v2") == ["a newer prompt"]
    found = hub_table("hf://datasets/o/parti@v2/PartiPrompts.tsv", TableRead())
    assert found.record() == {"spec": "hf://datasets/o/parti@v2/PartiPrompts.tsv", "repo": "o/parti",
                              "file": "PartiPrompts.tsv", "commit": _commit("o/parti", "v2")}
    _dataset(hub_cache, tmp_path, "o/two", {"a.csv": "prompt\na cat\n", "data/b.jsonl": '"a dog"\n'})
    assert refused("hf://datasets/o/two") == (
        "--prompts hf://datasets/o/two: the hub dataset o/two holds 2 table files (a.csv, data/b.jsonl): name the one "
        "you mean, e.g. --prompts hf://datasets/o/two/a.csv")
    assert load_prompts("hf://datasets/o/two/data/b.jsonl") == ["a dog"]
    assert refused("hf://datasets/o/two/c.csv", "", "", "eval_") == (
        "eval_prompts=hf://datasets/o/two/c.csv: the local hub cache holds the dataset o/two without c.csv (its table "
        "files: a.csv, data/b.jsonl) and the hub cannot be reached (no network, or HF_HUB_OFFLINE set): name one of "
        "those, or on a machine with network run `hf download --repo-type dataset o/two c.csv` (into the hub cache; "
        "copy that cache here), then run again")
    assert refused("hf://datasets/o/gone@v1") == (
        "--prompts hf://datasets/o/gone@v1: the hub dataset o/gone at revision v1 is not in the local hub cache and "
        "the hub cannot be reached (no network, or HF_HUB_OFFLINE set): on a machine with network run `hf download "
        "--repo-type dataset o/gone --revision v1` (into the hub cache; copy that cache here), then run again")
    assert refused("hf://o/parti") == ("--prompts hf://o/parti names a hub model, not a dataset: a hub dataset's "
                                       "prompts are hf://datasets/o/parti")


def test_a_huggingface_hub_without_its_address_reader_is_one_line(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "parse_hf_uri", None)
    assert refused("hf://datasets/o/parti") == ("--prompts hf://datasets/o/parti: reading a hub address needs a newer "
                                                "huggingface_hub (its parse_hf_uri): pip install -U huggingface_hub")


def test_a_hub_dataset_not_cached_without_network_is_one_line_and_nothing_is_written(hub_cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert_refused(main, ["--profile", "cpu", "--prompts", "hf://datasets/someone/prompts", "--output-dir", str(out)],
                   "error: --prompts hf://datasets/someone/prompts: the hub dataset someone/prompts is not in the "
                   "local hub cache and the hub cannot be reached (no network, or HF_HUB_OFFLINE set): on a machine "
                   "with network run `hf download --repo-type dataset someone/prompts` (into the hub cache; copy that "
                   "cache here), then run again", out, capsys)


def test_online_a_hub_dataset_is_listed_sized_and_downloaded_at_its_commit(online_by_setting, hub_cache, tmp_path,
                                                                           monkeypatch):
    """With network: the dataset's files and sizes asked once (dataset_info), a file over 200 MB refused before any
    download, the table downloaded into the hub cache (the commit its snapshot is of goes with it); the hub's refusals
    (no such dataset, gated, no such revision) one line each."""
    import huggingface_hub
    from test_hub_lora import _hub_error

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: contextlib.nullcontext())
    commit, asked = "d" * 40, []
    sizes = {"README.md": 10, "prompts.csv": 40, "images.parquet": 250 * 1000 ** 2}

    def info(repo, files_metadata=False, **kw):
        asked.append(("info", repo, kw.get("revision")))
        if repo != "online/set":
            raise _hub_error({"online/gated": "GatedRepoError", "online/set2": "RevisionNotFoundError"}.get(
                repo, "RepositoryNotFoundError"), repo)
        return type("Info", (), {"sha": commit, "siblings": [type("Sibling", (), {"rfilename": f, "size": n})
                                                            for f, n in sizes.items()]})

    def download(repo, filename, repo_type=None, **kw):
        asked.append(("download", repo, filename, repo_type))
        target = hub_cache / f"datasets--{repo.replace('/', '--')}" / "snapshots" / commit / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("Prompt\na kite\na fox\n", encoding="utf-8")
        return str(target)
    monkeypatch.setattr(huggingface_hub, "dataset_info", info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert refused("hf://datasets/online/set/images.parquet") == (
        "--prompts hf://datasets/online/set/images.parquet: images.parquet is 250 MB, more than the 200 MB a prompt "
        "set may be (a table of images, or of much more than prompts): name a smaller file of it, or save its prompt "
        "column to a local table")
    assert asked == [("info", "online/set", None)]  # (nothing downloaded)
    assert refused("hf://datasets/online/set") == (
        "--prompts hf://datasets/online/set: the hub dataset online/set holds 2 table files (images.parquet, "
        "prompts.csv): name the one you mean, e.g. --prompts hf://datasets/online/set/images.parquet")
    asked.clear()
    assert load_prompts("hf://datasets/online/set/prompts.csv") == ["a kite", "a fox"]
    assert load_prompts("hf://datasets/online/set/prompts.csv") == ["a kite", "a fox"]
    assert asked == [("info", "online/set", None), ("download", "online/set", "prompts.csv", "dataset")]  # (once)
    assert refused("hf://datasets/online/typo") == (
        "--prompts hf://datasets/online/typo: no dataset online/typo on the Hugging Face hub (or a private one this "
        "machine is not logged in to: `hf auth login`): check its name on https://huggingface.co/datasets/online/typo")
    assert refused("hf://datasets/online/gated") == (
        "--prompts hf://datasets/online/gated: the Hugging Face hub dataset online/gated is gated: accept its "
        "conditions on https://huggingface.co/datasets/online/gated, then log in here with that account (`hf auth "
        "login`, or set HF_TOKEN); or pass a local copy of its file of prompts")
    assert refused("hf://datasets/online/set2@v9") == (
        "--prompts hf://datasets/online/set2@v9: the hub dataset online/set2 has no revision v9 (no such branch, tag "
        "or commit): check it on https://huggingface.co/datasets/online/set2/commits/main, or leave @v9 out to read "
        "main")


FAST = ["--profile", "cpu", "--set", "sample_prompts=0", "--set", "sample_steps=2", "--set", "k=1", "--set",
        "batch_size=1", "--set", "fidelity_images=0"]


def test_a_resume_reads_the_commit_its_run_read_and_a_changed_column_changes_its_prompts(
        hub_cache, tmp_path, fresh_log_handlers, caplog):
    """A run on hf://datasets/o/set records the commit it read (prompts.json, each checkpoint); the dataset's main
    then moves to a commit with other prompts; a resume with another prompt_column reads the first commit's file
    with that column: its prompts change as an edited prompt file's do (prompts_since_step, prompts.json's earlier
    list), and the change of column is said as a change of a setting, not as an edit of the file."""
    import logging

    first = _commit("o/set")
    _dataset(hub_cache, tmp_path, "o/set", {"set.tsv": "Prompt\tShort\na red circle\tred\na blue square\tblue\n"})
    out = tmp_path / "run"
    assert main([*FAST, "--steps", "1", "--prompts", "hf://datasets/o/set", "--output-dir", str(out)]) == 0
    source = {"spec": "hf://datasets/o/set", "repo": "o/set", "file": "set.tsv", "commit": first}
    assert json.loads((out / "prompts.json").read_text(encoding="utf-8"))["sources"] == {"prompts": source}
    state = json.loads((out / "checkpoints" / "step-00000001" / "state.json").read_text(encoding="utf-8"))
    assert state["prompt_sources"] == {"prompts": source}
    moved = _dataset(hub_cache, tmp_path, "o/set", {"set.tsv": "Prompt\tShort\na green circle\tgreen\n"}, ref="v2")
    (hub_cache / "datasets--o--set" / "refs" / "main").write_text(moved.name)
    assert load_prompts("hf://datasets/o/set") == ["a green circle"]  # (main now)
    sampled = tmp_path / "sampled"  # (sample records what it read too)
    assert main(["sample", "--prompts", "hf://datasets/o/set", "--num-prompts", "1", "--set", "sample_steps=2",
                 "--output-dir", str(sampled)]) == 0
    results = json.loads((sampled / "sample_results.json").read_text(encoding="utf-8"))
    assert results["prompts_source"] == {**source, "commit": moved.name} and len(results["per_prompt"]) == 1
    assert not undocumented(results, documented_keys(DOC.read_text(encoding="utf-8"))["sample_results.json"])
    # sample of the run's LoRA renders the prompts its run trained on: the commit it read, as a hub model's is
    assert main(["sample", str(out / "lora"), "--num-prompts", "1", "--set", "sample_steps=2", "--output-dir",
                 str(tmp_path / "sampled-lora")]) == 0
    results = json.loads((tmp_path / "sampled-lora" / "sample_results.json").read_text(encoding="utf-8"))
    assert results["prompts"] == f"hf://datasets/o/set@{first}/set.tsv" and results["prompts_source"] == {
        **source, "spec": results["prompts"]}
    assert [row["prompt"] for row in results["per_prompt"]] == ["a red circle"]
    # a copy of lora/ away from its run (no config.yaml or prompts.json above it): its base_model.json names that
    # commit (it named the address alone, which reads main's other prompts)
    away = tmp_path / "away"
    shutil.copytree(out / "lora", away)
    pinned = f"hf://datasets/o/set@{first}/set.tsv"
    assert json.loads((away / "base_model.json").read_text(encoding="utf-8"))["scoring"]["prompts"] == pinned
    assert main(["sample", str(away), "--num-prompts", "1", "--set", "sample_steps=2", "--output-dir",
                 str(tmp_path / "sampled-away")]) == 0
    results = json.loads((tmp_path / "sampled-away" / "sample_results.json").read_text(encoding="utf-8"))
    assert results["prompts"] == pinned and [row["prompt"] for row in results["per_prompt"]] == ["a red circle"]
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main([*FAST, "--steps", "2", "--resume", "latest", "--output-dir", str(out), "--set",
                     "prompt_column=Short"]) == 0
    record = json.loads((out / "prompts.json").read_text(encoding="utf-8"))
    assert record["train"] == ["red", "blue"] and record["sources"] == {"prompts": source}
    assert not undocumented(record, documented_keys(DOC.read_text(encoding="utf-8"))["prompts.json"])
    assert record["earlier"] == [{"until_step": 1, "train": ["a red circle", "a blue square"]}]
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["prompts_since_step"] == 2
    said = [r.getMessage() for r in caplog.records]
    assert f"resume: prompts hf://datasets/o/set is read at commit {first}, as the run read it (@REV after its name " \
           "reads another revision: a change of the prompts)" in said
    assert "resume: prompt_column was '' in the checkpoint, now 'Short'" in said
    assert not [s for s in said if "changed since the checkpoint" in s]
    from lowmem_alignprop.lora.lora_files import read_lora
    from lowmem_alignprop.lora.model_card import training_command

    assert training_command(read_lora(str(out / "lora"))).splitlines()[0].endswith(  # (the card's: run again, it
        f"--prompts hf://datasets/o/set@{first}/set.tsv --output-dir {out}")  # reads what the run read)


def test_a_recorded_command_names_the_commit_and_file_its_hub_prompts_were_read_at():
    from lowmem_alignprop.lora.model_card import pinned_prompts

    sources = {"prompts": {"spec": "hf://datasets/o/set", "repo": "o/set", "file": "set.tsv", "commit": "c" * 40},
               "eval_prompts": {"spec": "hf://datasets/o/set@v1/held.csv", "repo": "o/set", "file": "held.csv",
                                "commit": "d" * 40}}
    line = "lowmem-alignprop --prompts=hf://datasets/o/set --set eval_prompts=hf://datasets/o/set@v1/held.csv"
    assert pinned_prompts(line, sources) == (f"lowmem-alignprop --prompts=hf://datasets/o/set@{'c' * 40}/set.tsv --set "
                                             f"eval_prompts=hf://datasets/o/set@{'d' * 40}/held.csv")
    for kept in ("lowmem-alignprop --prompts hf://datasets/o/other", "lowmem-alignprop --resume latest --set "
                 "prompts=hf://datasets/o/set", "lowmem-alignprop --set eval_prompts=hf://datasets/o/set"):
        assert pinned_prompts(kept, sources) == kept


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


def test_a_tsv_written_without_quoting_keeps_a_prompt_that_starts_with_a_quote(tmp_path):
    """PartiPrompts.tsv writes its cells as they are: its row '"G I G G L E" painted ...' keeps its quotes (a CSV
    reader's quoting took them off), and a cell that opens a quote it never closes is no cell swallowing the rows
    after it; a quoted TSV (a spreadsheet's, Python's csv) still reads its quoted cells. A CSV with such a cell is
    one line saying how a cell with quotes is written."""
    table = tmp_path / "parti.tsv"
    table.write_text('Prompt\tCategory\n"G I G G L E" painted as graffiti\tIllustrations\na "Stop" sign\tArtifacts\n'
                     '"unclosed\tArtifacts\nbagel\tFood\n', encoding="utf-8")
    assert load_prompts(str(table)) == ['"G I G G L E" painted as graffiti', 'a "Stop" sign', '"unclosed', "bagel"]
    assert load_prompts(str(table), "", "Category=Artifacts") == ['a "Stop" sign', '"unclosed']
    (tmp_path / "q.csv").write_text('prompt,kind\n"Deep Learning" on a sign,text\na cat,animal\n', encoding="utf-8")
    assert refused(str(tmp_path / "q.csv")) == (
        f"prompt file {tmp_path / 'q.csv'} is not a readable CSV file: ',' expected after '\"' (line 2): a CSV cell "
        'that holds a quote is written whole in quotes, each quote in it doubled ("""Deep Learning"" on a sign"), as '
        "a spreadsheet saves it")


def test_excels_semicolon_csv_reads_its_columns(tmp_path):
    """Excel where a comma is the decimal mark saves CSV with semicolons (and a byte-order mark, CRLF): its header
    read as one column 'Prompt;Category' and a prompt_column naming it trained on 'a cat;Animals'. A CSV whose
    header is one cell holding semicolons is read with semicolons; a one-column CSV's prompts keep theirs."""
    table = tmp_path / "excel.csv"
    table.write_bytes("\ufeffPrompt;Category\r\na cat, asleep;Animals\r\n\"a bus; red\";Vehicles\r\n".encode())
    assert load_prompts(str(table)) == ["a cat, asleep", "a bus; red"]
    assert load_prompts(str(table), "", "Category=Vehicles") == ["a bus; red"]
    (tmp_path / "one.csv").write_text("prompt\na cat; asleep\n", encoding="utf-8")
    assert load_prompts(str(tmp_path / "one.csv")) == ["a cat; asleep"]


def test_a_long_cell_reads_as_a_text_files_long_line_does(tmp_path):
    """A cell of 200,000 characters (over Python csv's 131,072 field limit) is one prompt, as a text file's line of
    that length is: it was 'not a readable CSV file: field larger than field limit'."""
    long = "a red fox " * 20_000
    for name, sep in (("long.csv", ","), ("long.tsv", "\t")):
        (tmp_path / name).write_text(f"prompt{sep}kind\n{long}{sep}x\na cat{sep}y\n", encoding="utf-8")
        assert load_prompts(str(tmp_path / name)) == [long.strip(), "a cat"]


def test_a_filter_on_a_parquet_date_or_bytes_column_compares_its_text(tmp_path):
    """Pick-a-Pic's parquet holds a created_at timestamp and image bytes: a filter on them compared their cells as
    JSON, which has no dates or bytes (a TypeError traceback); a date is compared as its ISO text, and a value no
    row holds is the filter's line listing them."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    import datetime

    path = tmp_path / "pick.parquet"
    pq.write_table(pa.table({"caption": ["a lamp", "a owl"], "day": [datetime.date(2023, 5, 1),
                                                                       datetime.date(2023, 5, 2)],
                             "image": [b"\x89PNG", b"\x89PNG"]}), path)
    assert refused(str(path), "", "image=x").startswith(f"prompt_filter=image=x: no row of prompt file {path} has "
                                                        "image=x (its image values: b'\\x89PNG'): give")
    assert load_prompts(str(path), "", "day=2023-05-02") == ["a owl"]
    assert refused(str(path), "", "day=May 2") == (
        f"prompt_filter=day=May 2: no row of prompt file {path} has day=May 2 (its day values: 2023-05-01, "
        "2023-05-02): give one of them, e.g. --set prompt_filter=day=2023-05-01")


def test_a_table_of_a_header_alone_says_it_has_no_rows(tmp_path):
    """A CSV of its header alone (an export of an empty sheet) has no rows: it was told 'every cell empty'."""
    (tmp_path / "head.csv").write_text("Prompt,Category\r\n", encoding="utf-8")
    assert refused(str(tmp_path / "head.csv")) == (
        f"prompt file {tmp_path / 'head.csv'} has no rows, only its columns (Prompt, Category): give a table with "
        "prompts")


def test_sample_of_a_tables_rows_records_and_says_its_column_and_filter(tmp_path, fresh_log_handlers, caplog):
    """sample --prompts t.tsv --set prompt_filter=Category=Animals renders that category's rows: sample_results.json
    recorded 'prompts': 't.tsv' alone (the file's other rows not rendered, nothing saying so) and its line said 'the
    prompt set t.tsv has 3' of a file of 5 rows. The column and filter go with the file, in the record and the
    lines."""
    import logging

    (tmp_path / "parti.tsv").write_text(PARTI, encoding="utf-8")
    out = tmp_path / "sampled"
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main(["sample", "--prompts", str(tmp_path / "parti.tsv"), "--set", "prompt_filter=Category=Animals",
                     "--num-prompts", "4", "--set", "sample_steps=2", "--output-dir", str(out)]) == 0
    results = json.loads((out / "sample_results.json").read_text(encoding="utf-8"))
    assert results["prompts"] == str(tmp_path / "parti.tsv") and results["prompt_filter"] == "Category=Animals"
    assert "prompt_column" not in results and len(results["per_prompt"]) == 3
    assert not undocumented(results, documented_keys(DOC.read_text(encoding="utf-8"))["sample_results.json"])
    assert (f"--num-prompts 4: the prompt set {tmp_path / 'parti.tsv'} (prompt_filter=Category=Animals) has 3; using "
            "all of them") in [r.getMessage() for r in caplog.records]


def test_held_out_rows_of_the_training_table_name_their_filters(tmp_path, caplog):
    """Train on a table's rows, hold out others: a held-out row that also trains is left out as a text file's line
    is, said with the filter that chose the rows (it said 'of its 3 prompts' of a file of 5 rows); every row
    training is one line that names the filters to change (it said 'give prompts the run does not train on')."""
    import logging

    from lowmem_alignprop.step.inputs import split_eval_prompts

    (tmp_path / "parti.tsv").write_text(PARTI, encoding="utf-8")
    parti = str(tmp_path / "parti.tsv")
    cfg = Config(prompts=parti, prompt_filter="Note=twice", eval_prompts=parti, eval_every=1,
                 eval_prompt_filter="Category=Animals")
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert split_eval_prompts(cfg, configured_prompts(cfg)) == (["a dog"], ["a cat in a hat"])
    assert (f"eval_prompts={parti} (eval_prompt_filter=Category=Animals): 2 of its 3 prompts also train (or repeat) "
            "and are left out of the evaluation") in [r.getMessage() for r in caplog.records]
    cfg = Config(prompts=parti, prompt_filter="Category=Animals", eval_prompts=parti, eval_every=1,
                 eval_prompt_filter="Category=Animals")
    with pytest.raises(UserError) as e:
        split_eval_prompts(cfg, configured_prompts(cfg))
    assert str(e.value) == (
        f"eval_prompts={parti} (eval_prompt_filter=Category=Animals): every one of its 3 prompts is also a training "
        "prompt, so none is held out: give prompts the run does not train on (rows of the training table: another "
        "eval_prompt_filter or prompt_filter)")

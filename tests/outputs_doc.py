"""docs/outputs.md's keys, read by the doc's convention, against the files of a run (tests/test_training_outputs.py's
full_run checks that every key it writes is documented; tests/test_outputs_documented.py checks the convention).

The doc's convention (its introduction): under a heading that names the file in backticks, each table row's first
cell is one key in backticks; a nested key is written with its parent's path (``images[].seed``, ``toy_world.before``)
and ``*`` stands for any characters. A value's keys are checked where the doc names keys under it."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "outputs.md"

HEADING = re.compile(r"^#+ .*?`([^`]+)`")
ROW_KEY = re.compile(r"^\|\s*`([^`]+)`\s*\|")


def documented_keys(text: str) -> dict[str, set[str]]:
    """{file named in a heading: the key patterns in the first column of its tables}."""
    keys: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("#"):
            m = HEADING.match(line)
            current = m.group(1) if m else None
            if current is not None:
                keys.setdefault(current, set())
        elif current is not None and (m := ROW_KEY.match(line)):
            keys[current].add(m.group(1))
    return keys


def undocumented(value, patterns: set[str], path: str = "") -> list[str]:
    """The keys of ``value`` (a dict), and of the values the doc names keys under, that no pattern matches."""
    missing = []
    for key, sub in value.items():
        name = path + key
        if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            missing.append(name)
            continue
        if isinstance(sub, dict) and any(p.startswith(name + ".") for p in patterns):
            missing += undocumented(sub, patterns, name + ".")
        elif isinstance(sub, list) and any(p.startswith(name + "[].") for p in patterns):
            for item in sub:
                if isinstance(item, dict):
                    missing += undocumented(item, patterns, name + "[].")
    return sorted(set(missing))


def run_files(run: Path) -> dict[str, list[dict]]:
    """{the doc's file name: the JSON objects of that file in ``run``} (metrics.jsonl: each line)."""
    files = {name: [json.loads((run / name).read_text(encoding="utf-8"))]
             for name in ("summary.json", "memory_report.json", "prompts.json", "samples/before_after.json")}
    files["metrics.jsonl"] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    files["lora/base_model.json"] = [json.loads(p.read_text()) for p in
                                     [run / "lora" / "base_model.json", *sorted(run.glob("export/*/base_model.json"))]]
    return files


def problems(run: Path, text: str) -> dict[str, list[str]]:
    doc = documented_keys(text)
    found = {}
    for name, objects in run_files(run).items():
        assert doc.get(name), f"docs/outputs.md has no table under a heading naming `{name}`"
        missing = sorted({k for obj in objects for k in undocumented(obj, doc[name])})
        if missing:
            found[name] = missing
    return found

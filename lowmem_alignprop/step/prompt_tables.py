"""Prompt sets published as tables: a ``.csv``, ``.tsv``, ``.json``, ``.jsonl`` or ``.parquet`` file (a local one, or
a hub dataset's: step/hub_prompts.py), read with Python's csv and json modules (Parquet with pyarrow, where it is
installed). :class:`TableRead` says which column holds the prompts (``prompt_column``; "": the table's one column
named prompt, prompts, caption or text, in any case) and which rows count (``prompt_filter``, ``COLUMN=VALUE``: the
rows whose COLUMN holds VALUE); eval_prompts reads with ``eval_prompt_column`` and ``eval_prompt_filter``. A JSON
list of strings (or a .jsonl file of strings) is one prompt each, without columns. An empty cell is skipped; a cell
over several lines is one prompt, its lines joined by a space; a prompt on several rows stays on each (its weight in
the set, as a text file's repeated lines).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lowmem_alignprop.run.hub import few
from lowmem_alignprop.settings.errors import UserError, nearest, quote
from lowmem_alignprop.settings.paths import LINE_BREAK
from lowmem_alignprop.step.prompt_files import control_character, prompt_file_text

TABLE_KINDS = {".csv": "CSV", ".tsv": "TSV", ".json": "JSON", ".jsonl": "JSON lines", ".parquet": "Parquet"}
PROMPT_COLUMNS = ("prompt", "prompts", "caption", "text")  # what a column of prompts is named (any case)
SHOWN_VALUES = 20  # a filter's values listed at most
SHOWN_CHARS = 40  # of each


@dataclass(frozen=True)
class TableRead:
    """How a table's prompts are read: ``column`` ("": :data:`PROMPT_COLUMNS`' one), ``where`` ("COLUMN=VALUE", "":
    every row), and ``prefix``: the settings' ("" for --prompts' prompt_column and prompt_filter, "eval_" for
    eval_prompts'), which the lines name."""
    column: str = ""
    where: str = ""
    prefix: str = ""

    @property
    def column_field(self) -> str:
        return f"{self.prefix}prompt_column"

    @property
    def filter_field(self) -> str:
        return f"{self.prefix}prompt_filter"

    @property
    def option(self) -> str:
        """How a line names the prompt set's own option, before its value: '--prompts ' or 'eval_prompts='."""
        return f"{self.prefix}prompts=" if self.prefix else "--prompts "

    @property
    def given(self) -> list[str]:
        """The settings given, as ``name=value`` (for a line on a file that has no columns)."""
        return [f"{name}={value}" for name, value in ((self.column_field, self.column), (self.filter_field,
                                                                                          self.where)) if value]

    def without_columns(self, what: str, also: str = "") -> UserError:
        """The line for a column or filter :attr:`given` for a prompt set that has no columns (``what``: what it is;
        ``also``: said after 'without columns')."""
        return UserError(f"{' and '.join(self.given)}: {what}, without columns{also}: drop --set "
                         f"{self.given[0].partition('=')[0]}")


Row = tuple[str, Any]  # (where it is, as a line names it: 'row 3', 'item 3', 'line 3'; a row's dict or a string)


def is_table(path: Path) -> bool:
    return path.suffix.lower() in TABLE_KINDS


def read_table(path: Path, how: TableRead, shown: str = "") -> list[str]:
    """The prompts of table file ``path`` (a regular file), read as ``how`` says; ``shown``: how lines name it (a hub
    dataset's file: its hf:// address; default the path). Raises UserError, one line."""
    shown = shown or str(path)
    kind = TABLE_KINDS[path.suffix.lower()]
    columns, rows_of = _parquet(path, shown) if kind == "Parquet" else _parsed(path, kind, shown)
    if columns is None:  # a list of strings: each a prompt
        if how.given:
            raise how.without_columns(f"prompt file {shown} is a {kind} list of strings, one prompt each")
        cells = rows_of([])
        column = ""
    else:
        column = choose_column(columns, how, shown, kind)
        wanted, value = how.where.partition("=")[::2]
        if how.where and wanted not in columns:
            near = nearest(wanted, columns)
            raise UserError(f"{how.filter_field}={how.where}: prompt file {shown} has no column {wanted!r} (its "
                            f"columns: {_listed(columns)}): give --set {how.filter_field}="
                            + (f"{near}={value}" if near else "COLUMN=VALUE with one of them"))
        rows = rows_of([column] + ([wanted] if how.where else []))
        if not rows:  # (a header alone: an empty sheet's export)
            raise UserError(f"prompt file {shown} has no rows, only its columns ({_listed(columns)}): give a table "
                            "with prompts")
        cells = [(at, row.get(column)) for at, row in _kept(rows, wanted, value, how, shown)]
    prompts = [p for at, cell in cells if (p := _prompt(cell, at, column, how, shown))]
    if not prompts:
        rows_said = f" of the rows whose {how.where}" if how.where else ""
        raise UserError(f"prompt file {shown} has no prompts" + (f" in its column {column!r}{rows_said} (every cell "
                        "empty)" if column else " (an empty list)") + ": give a table with prompts")
    return prompts


def choose_column(columns: list[str], how: TableRead, shown: str, kind: str) -> str:
    """The column of the prompts: ``how.column`` where the table has it, else the one column named prompt, prompts,
    caption or text (any case); else one line listing the columns and naming the setting."""
    if how.column:
        if how.column in columns:
            return how.column
        near = nearest(how.column, columns)
        raise UserError(f"{how.column_field}={how.column}: prompt file {shown} has no column {how.column!r} (its "
                        f"columns: {_listed(columns)}): give --set {how.column_field}="
                        + (near if near else "NAME with one of them"))
    named = [c for c in columns if c.strip().lower() in PROMPT_COLUMNS]
    if len(named) == 1:
        return named[0]
    which = f"{len(named)} of its columns are" if named else "none of its columns is"
    raise UserError(f"prompt file {shown} is a {kind} table, and {which} named {', '.join(PROMPT_COLUMNS)} (its "
                    f"columns: {_listed(columns)}): name the column of the prompts with --set "
                    f"{how.column_field}=NAME")


def _kept(rows: list[Row], wanted: str, value: str, how: TableRead, shown: str) -> list[Row]:
    """The rows whose column ``wanted`` holds ``value`` (all of them without a filter); none: one line listing the
    values there are."""
    if not how.where:
        return rows
    kept = [(at, row) for at, row in rows if _as_text(row.get(wanted)) == value]
    if kept:
        return kept
    values = list(dict.fromkeys(_as_text(row.get(wanted)) for _, row in rows))
    listed = few([v if len(v) <= SHOWN_CHARS else v[:SHOWN_CHARS - 3] + "..." for v in values], SHOWN_VALUES)
    near = nearest(value, values) if values else None
    raise UserError(f"{how.filter_field}={how.where}: no row of prompt file {shown} has {wanted}={value} (its {wanted} "
                    f"values: {listed or 'none'}): give " + (
                        f"--set {how.filter_field}={wanted}={near}" if near else
                        f"one of them, e.g. --set {how.filter_field}={wanted}={values[0] if values else 'VALUE'}"))


def _prompt(cell: Any, at: str, column: str, how: TableRead, shown: str) -> str:
    """A cell as a prompt: its lines joined by a space, surrounding white space stripped ("": empty, skipped)."""
    if cell is None:
        return ""
    its = f" (its {column!r})" if column else ""
    if not isinstance(cell, str):
        kind = type(cell).__name__
        raise UserError(f"prompt file {shown} {at}{its} holds {quote(cell, 40)} ({kind}), not text: "
                        + (f"name the column of the prompts with --set {how.column_field}=NAME" if column else
                           "a prompt is a string"))
    text = " ".join(part.strip() for part in LINE_BREAK.split(cell.replace("\ufeff", "")) if part.strip())
    if (what := control_character(text)) is not None:
        raise UserError(f"prompt file {shown} {at}{its} holds {what}: a prompt is text; take it out of that cell")
    return text


def _as_text(cell: Any) -> str:
    """A cell as a filter compares it: a string as it is, nothing as "", a number or true/false as JSON writes it, a
    date or time (a Parquet column's) as its ISO text, what else JSON has not (bytes, a decimal) as Python writes it."""
    if isinstance(cell, str):
        return cell
    if cell is None:
        return ""
    if hasattr(cell, "isoformat"):
        return cell.isoformat()
    try:
        return json.dumps(cell, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(cell)


def _listed(columns: list[str]) -> str:
    return ", ".join(repr(c) if not c.strip() or c != c.strip() else c for c in columns) or "none"


Opened = tuple[list[str] | None, Callable[[list[str]], list[Row]]]  # (its columns, or None for a list of strings;
# the rows with those columns)


def _parsed(path: Path, kind: str, shown: str) -> Opened:
    """A CSV, TSV, JSON or JSON lines table's columns and rows, read whole (its text: prompt_files')."""
    text = prompt_file_text(path)
    if kind in ("CSV", "TSV"):
        csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # a cell as long as a text file's line may be
        return _delimited(text, _csv_delimiter(text) if kind == "CSV" else "\t", kind, shown)
    if kind == "JSON":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"prompt file {shown} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno}); fix "
                            "it, or save the prompts one per line into a .txt file") from None
        if not isinstance(data, list):
            keys = f" (its keys: {_listed([str(k) for k in data][:8])})" if isinstance(data, dict) else ""
            raise UserError(f"prompt file {shown} holds a JSON {_json_kind(data)}{keys}: a JSON prompt file is a list "
                            "of strings (one prompt each) or of objects (one row each)")
        return _items([(f"item {n}", item) for n, item in enumerate(data, 1)], kind, shown)
    items = []
    for n, line in enumerate(LINE_BREAK.split(text), 1):
        if line.strip():
            try:
                items.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"prompt file {shown} line {n} is not valid JSON: {e.msg} (column {e.colno}); a JSON "
                                "lines file holds one string or object a line") from None
    return _items(items, kind, shown)


def _items(items: list[Row], kind: str, shown: str) -> Opened:
    """JSON items: all strings (a list of prompts) or all objects (rows, their columns in the order first seen)."""
    strings = all(isinstance(item, str) for _, item in items)
    odd = next(((at, item) for at, item in items if not isinstance(item, dict)), None) if not strings else None
    if odd is not None:
        raise UserError(f"prompt file {shown} {odd[0]} is a JSON {_json_kind(odd[1])}: a {kind} prompt file holds "
                        "strings (one prompt each) or objects (one row each), not a mix")
    if strings:
        return None, lambda _: items
    columns = list(dict.fromkeys(str(k) for _, item in items for k in item))
    return columns, lambda _: items


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "true/false", type(None): "null"}.get(
        type(value), "number")


def _delimited(text: str, delimiter: str, kind: str, shown: str) -> Opened:
    """A CSV or TSV table: its first row the column names; blank lines skipped; a short row's missing cells empty.
    Quoted cells are read as a spreadsheet writes them, strictly: a TSV whose quotes are no quoting (one written as
    it is, PartiPrompts': '"G I G G L E" painted ...') is read cell by cell as written; a CSV's, one line."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        lines = [row for row in reader if row]
    except csv.Error as e:
        if kind == "TSV":  # (a tab or line break cannot be in its cells: each line a row, each tab a cell)
            lines = [row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter,
                                               quoting=csv.QUOTE_NONE) if row]
        else:
            raise UserError(f"prompt file {shown} is not a readable {kind} file: {e} (line {reader.line_num}): a CSV "
                            'cell that holds a quote is written whole in quotes, each quote in it doubled ("""Deep '
                            'Learning"" on a sign"), as a spreadsheet saves it') from None
    if not lines:
        raise UserError(f"prompt file {shown} is empty: a {kind} table's first row names its columns")
    columns = lines[0]
    rows = [(f"row {n}", dict(zip(columns, cells))) for n, cells in enumerate(lines[1:], 1)]
    return columns, lambda _: rows


def _csv_delimiter(text: str) -> str:
    """A CSV's delimiter: a comma, or a semicolon where its header is one cell that holds semicolons (Excel's CSV
    where the comma is the decimal mark: 'Prompt;Category')."""
    header = next((row for row in csv.reader(io.StringIO(text, newline="")) if row), [])
    return ";" if len(header) == 1 and ";" in header[0] else ","


def _parquet(path: Path, shown: str) -> Opened:
    """A Parquet table's columns, and its rows of the columns asked for alone (a captions table may hold images)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"prompt file {shown} is a Parquet file, and reading one needs pyarrow, which is not "
                        "installed: pip install pyarrow (or save the prompts as a .csv or .jsonl file)") from None
    try:
        columns = list(pq.read_schema(path).names)
    except (OSError, ValueError) as e:  # (pyarrow's ArrowInvalid is a ValueError)
        raise UserError(f"prompt file {shown} is not a readable Parquet file ({str(e).splitlines()[0][:120]})") \
            from None

    def rows(wanted: list[str]) -> list[Row]:
        table = pq.read_table(path, columns=list(dict.fromkeys(wanted)))
        return [(f"row {n}", row) for n, row in enumerate(table.to_pylist(), 1)]
    return columns, rows

"""Prompt sets: ``load_prompts(spec) -> list[str]`` (a configuration's: :func:`configured_prompts`).

``spec`` is a built-in name (see ``PROMPT_SETS``), the path of a UTF-8 text file with one prompt per line
(blank lines and lines starting with ``#`` are skipped; surrounding whitespace is stripped), of a table (a .csv,
.tsv, .json, .jsonl or .parquet file: step/prompt_tables.py), or a hub dataset's file,
``hf://datasets/OWNER/NAME[@REV][/FILE]`` (step/hub_prompts.py).
The built-in sets live as text files in ``lowmem_alignprop/data/prompts/``; the toy world's (``toy-train``,
``toy-heldout``) are captions of its grammar (docs/toy_world.md).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from lowmem_alignprop.settings.errors import UserError, did_you_mean
from lowmem_alignprop.settings.paths import describe as describe_path
from lowmem_alignprop.settings.paths import LINE_BREAK, kind_of, looks_like_hub_id
from lowmem_alignprop.step.hub_prompts import hub_table
from lowmem_alignprop.step.prompt_files import control_character, prompt_file_text
from lowmem_alignprop.step.prompt_tables import TABLE_KINDS, TableRead, is_table, read_table
from lowmem_alignprop.toy.scenes import PROMPT_SET_SIZE

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "prompts"

PROMPT_SETS: dict[str, str] = {
    "simple_animals": "45 common animal names ('cat', 'dog', 'horse', ...), as in AlignProp/DDPO",
    "animals_activities": "'a {animal} {activity}' for every animal and 8 activities ('a dog riding a bike', ...)",
    "toy-train": f"{PROMPT_SET_SIZE} captions of the toy world's training split ('two red circles', ...; "
                 "docs/toy_world.md)",
    "toy-pairs": "the four colour-shape pairs the toy model never saw, one object each ('a red triangle', 'a green "
                 "circle', 'a blue diamond', 'a yellow square'): the toy world's default",
    "toy-heldout": f"{PROMPT_SET_SIZE} toy-world captions that each hold a colour-shape pair the toy model never saw "
                   "in training ('a red triangle and two blue squares', ...)",
}


# files that hold code or settings, not prompts: their lines trained as prompts (a Python file's source, a YAML
# mapping) in silence; tables (.csv, .tsv, .json, .jsonl, .parquet) are read as tables (step/prompt_tables.py)
NOT_PROMPT_TEXT = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML", ".py": "Python"}


def read_prompt_file(path: str | Path, shown: str = "") -> list[str]:
    """Prompts of a UTF-8 file, one per line; blank lines and ``#`` comments skipped. ``path``: a regular file (a
    user's checked by :func:`read_file` first, a built-in set's the package's own). ``shown``: how lines name it (a hub
    dataset's file: its hf:// address; default the path)."""
    path = Path(path).expanduser()
    shown = shown or str(path)
    text = prompt_file_text(path)  # UTF-8 (a byte-order mark too), or UTF-16 as PowerShell's > writes it
    # lines as an editor counts them (str.splitlines also ends one at \f, \v, \x1c-\x1e, \x85, U+2028/9); a
    # byte-order mark inside (two files joined: `type a.txt b.txt > all.txt`) is no text: taken out
    lines = [line.replace("\ufeff", "") for line in LINE_BREAK.split(text)]
    for number, line in enumerate(lines, 1):  # valid UTF-8 can still be no text: NUL bytes, escapes
        if (what := control_character(line)) is not None:
            raise UserError(f"prompt file {shown} line {number} holds {what}: it is not a text file of prompts; write "
                            "one prompt per line")
    prompts = [line.strip() for line in lines]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"prompt file {shown} has no prompts (only blank lines or # comments); write one prompt per "
                        "line")
    return prompts


def check_prompt_file(path: Path) -> None:
    """``path`` names a prompt file this reads, and a regular file; else one line (code or settings by its name,
    missing, a folder, a device, a dangling link)."""
    if (what := NOT_PROMPT_TEXT.get(path.suffix.lower())) is not None:
        raise UserError(f"prompt file {path} is a {what} file by its name: a prompt file is plain text, one prompt per "
                        f"line, read as it is (its {what} would be trained as prompt text), or a table ("
                        f"{', '.join(TABLE_KINDS)}); write the prompts one per line into a .txt file")
    kind = kind_of(path)
    if kind == "missing":
        raise UserError(f"prompt file {path} does not exist; give an existing text file (one prompt per line) or a "
                        f"built-in prompt set: {', '.join(PROMPT_SETS)}")
    if kind != "file":
        also = "" if kind == "special file" else ", not a file"  # (that one says it: "is not a regular file")
        raise UserError(f"prompt file {path} {describe_path(path)}{also}; give a text file with one prompt per line")


def read_file(path: Path, how: TableRead, shown: str = "") -> list[str]:
    """The prompts of a file: a table's (:func:`~lowmem_alignprop.step.prompt_tables.read_table`, as ``how`` says),
    else a text file's, one a line (a column or filter given for one: one line)."""
    check_prompt_file(path)
    if is_table(path):
        return read_table(path, how, shown)
    if how.given:
        raise how.without_columns(f"prompt file {shown or path} is a text file, one prompt per line",
                                  f" (a table is a {', '.join(TABLE_KINDS)} file)")
    return read_prompt_file(path, shown)


def _builtin(name: str) -> list[str]:
    if name == "simple_animals":
        return read_prompt_file(DATA_DIR / "simple_animals.txt")
    if name == "animals_activities":
        animals = read_prompt_file(DATA_DIR / "simple_animals.txt")
        activities = read_prompt_file(DATA_DIR / "activities.txt")
        return [f"a {animal} {activity}" for animal in animals for activity in activities]
    if name == "toy-pairs":
        from lowmem_alignprop.toy.scenes import HELD_OUT_PAIRS, caption, make_content
        return [caption(make_content([pair])) for pair in sorted(HELD_OUT_PAIRS, key=_pair_order)]
    if name in ("toy-train", "toy-heldout"):
        from lowmem_alignprop.toy.scenes import heldout_prompts, train_prompts
        return (train_prompts if name == "toy-train" else heldout_prompts)(PROMPT_SET_SIZE, seed=0)
    raise KeyError(name)


def _pair_order(pair: tuple[str, str]) -> int:
    from lowmem_alignprop.toy.scenes import SHAPES
    return list(SHAPES).index(pair[1])


def load_prompts(spec: str, column: str = "", where: str = "", prefix: str = "") -> list[str]:
    """A built-in prompt set by name, the prompts of a text file, or of a table (a local file, or a hub dataset's
    ``hf://datasets/...``): its ``column`` ("": its one column named prompt, prompts, caption or text), its rows whose
    ``where`` ("COLUMN=VALUE") holds. ``prefix``: the settings' ("", or "eval_" for eval_prompts), for lines."""
    how = TableRead(column, where, prefix)
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise UserError(f"empty prompt set; use a built-in one ({', '.join(PROMPT_SETS)}) or a text file path")
    spec = str(spec).strip()
    if spec in PROMPT_SETS:
        if how.given:
            raise how.without_columns(f"{spec} is a built-in prompt set")
        return _builtin(spec)
    if (hub := hub_table(spec, how)) is not None:
        return read_file(hub.path, how, hub.address)
    path = Path(spec).expanduser()
    if looks_like_hub_id(spec) and not path.exists() and not path.is_symlink() and not _file_suffix(path):
        raise UserError(f"prompt file {spec} does not exist; for the Hugging Face hub dataset {spec}, give "
                        f"{how.option}hf://datasets/{spec}")
    if path.exists() or path.is_symlink() or "/" in spec or "\\" in spec or path.suffix:  # (a link: broken, a loop)
        return read_file(path, how)
    hint = did_you_mean(spec, PROMPT_SETS, fold=_dashed)  # toy_pairs, Simple_Animals: near misses
    raise UserError(f"unknown prompt set {spec!r}{hint}; use one of: {', '.join(PROMPT_SETS)}, the path of a UTF-8 "
                    "text file with one prompt per line or of a table, or a hub dataset: hf://datasets/OWNER/NAME")


def configured_prompts(settings: Any, field: str = "prompts") -> list[str]:
    """The prompts a configuration (a Config, or a run's config as a dict) names in ``field`` (``prompts``, or
    ``eval_prompts``), read with its column and filter settings (prompt_column and prompt_filter, or eval_'s)."""
    reading = read_with(settings, field)
    prefix = field.removesuffix("prompts")
    return load_prompts(_setting(settings, field), reading.get(f"{prefix}prompt_column", ""),
                        reading.get(f"{prefix}prompt_filter", ""), prefix)


def read_with(settings: Any, field: str = "prompts") -> dict[str, str]:
    """The column and filter settings a configuration reads ``field``'s table with (prompt_column and prompt_filter,
    or eval_'s), those given: ``{name: value}`` (sample_results.json records them beside the prompt set)."""
    prefix = field.removesuffix("prompts")
    names = (f"{prefix}prompt_column", f"{prefix}prompt_filter")
    return {name: str(value) for name in names if (value := _setting(settings, name))}


def described(settings: Any, field: str = "prompts") -> str:
    """How a line names ``field``'s prompt set: its name or file, with the column and filter it is read with
    ('parti.tsv (prompt_filter=Category=Animals)': the file's other rows are no part of it)."""
    reading = read_with(settings, field)
    return f"{_setting(settings, field)}" + (f" ({', '.join(f'{k}={v}' for k, v in reading.items())})"
                                             if reading else "")


def _setting(settings: Any, name: str) -> Any:
    """A configuration's setting: a Config's attribute, or a run's config (a dict) key ("" where it has none)."""
    return settings.get(name) if isinstance(settings, dict) else getattr(settings, name, "")


def _file_suffix(path: Path) -> bool:
    """Whether ``path``'s suffix is a file's this reads or names (.txt, a table's, code's): a relative file, not a
    hub dataset's OWNER/NAME."""
    return path.suffix.lower() in (".txt", *TABLE_KINDS, *NOT_PROMPT_TEXT)


def draw_prompts(prompts: list[str], order: str, rng: random.Random, first: int, count: int, seed: int) -> list[str]:
    """The prompts of ``count`` rollouts. ``order='random'``: each drawn from ``rng`` with replacement. ``'shuffled'``:
    rollout n (``first`` + i, counted over the run) is place n of the endless sequence of passes through the prompt
    set, each pass a fresh permutation seeded by (seed, pass): every prompt once per pass, and a resumed run draws
    what an uninterrupted one would, without any state of its own."""
    if order == "random":
        return [rng.choice(prompts) for _ in range(count)]
    out = []
    for n in range(first, first + count):
        deck = list(prompts)
        random.Random(f"{seed}/{n // len(prompts)}").shuffle(deck)
        out.append(deck[n % len(prompts)])
    return out


def _dashed(name: str) -> str:
    """A prompt set's name as compared for a "did you mean": case and - or _ alike."""
    return name.lower().replace("_", "-")

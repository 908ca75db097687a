"""Prompt sets: ``load_prompts(spec) -> list[str]``.

``spec`` is a built-in name (see ``PROMPT_SETS``) or the path of a UTF-8 text file with one prompt per line
(blank lines and lines starting with ``#`` are skipped; surrounding whitespace is stripped).
The built-in sets live as text files in ``lowmem_alignprop/data/prompts/``; the toy world's (``toy-train``,
``toy-heldout``) are captions of its grammar (docs/toy_world.md).
"""

from __future__ import annotations

import random
from pathlib import Path

from lowmem_alignprop.settings.errors import UserError, did_you_mean
from lowmem_alignprop.settings.paths import describe as describe_path
from lowmem_alignprop.settings.paths import LINE_BREAK, NotText, kind_of, read_user_text
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


# files that hold data or code, not one prompt per line: their lines trained as prompts ('["a cat", "a dog"]', a CSV
# header, a Python file's source) in silence
NOT_PROMPT_TEXT = {".json": "JSON", ".jsonl": "JSON lines", ".csv": "CSV", ".tsv": "TSV", ".yaml": "YAML",
                   ".yml": "YAML", ".toml": "TOML", ".py": "Python", ".parquet": "Parquet"}


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts of a UTF-8 file, one per line; blank lines and ``#`` comments skipped."""
    path = Path(path).expanduser()
    if (what := NOT_PROMPT_TEXT.get(path.suffix.lower())) is not None:
        raise UserError(f"prompt file {path} is a {what} file by its name: a prompt file is plain text, one prompt per "
                        f"line, read as it is (its {what} would be trained as prompt text); write the prompts one per "
                        "line into a .txt file")
    kind = kind_of(path)
    if kind == "missing":
        raise UserError(f"prompt file {path} does not exist; give an existing text file (one prompt per line) or a "
                        f"built-in prompt set: {', '.join(PROMPT_SETS)}")
    if kind != "file":
        also = "" if kind == "special file" else ", not a file"  # (that one says it: "is not a regular file")
        raise UserError(f"prompt file {path} {describe_path(path)}{also}; give a text file with one prompt per line")
    try:
        text = read_user_text(path)  # UTF-8 (a byte-order mark too), or UTF-16 as PowerShell's > writes it
    except NotText as exc:
        raise UserError(f"prompt file {path} {exc}; save it as UTF-8 (Notepad: Save as, Encoding UTF-8)") from None
    except OSError as exc:
        raise UserError(f"cannot read prompt file {path} ({exc.strerror}); check its permissions") from exc
    # lines as an editor counts them (str.splitlines also ends one at \f, \v, \x1c-\x1e, \x85, U+2028/9); a
    # byte-order mark inside (two files joined: `type a.txt b.txt > all.txt`) is no text: taken out
    lines = [line.replace("\ufeff", "") for line in LINE_BREAK.split(text)]
    for number, line in enumerate(lines, 1):  # valid UTF-8 can still be no text: NUL bytes, escapes
        control = next((c for c in line if ord(c) < 32 and c != "\t" or 127 <= ord(c) < 160 or c in "\u2028\u2029"),
                       None)
        if control is not None:
            what = "line separator" if control in "\u2028\u2029" else "control character"
            raise UserError(f"prompt file {path} line {number} holds the {what} {control!r}: it is not a text file of "
                            "prompts; write one prompt per line")
    prompts = [line.strip() for line in lines]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"prompt file {path} has no prompts (only blank lines or # comments); write one prompt per line")
    return prompts


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


def load_prompts(spec: str) -> list[str]:
    """A built-in prompt set by name, or the prompts of a text file."""
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise UserError(f"empty prompt set; use a built-in one ({', '.join(PROMPT_SETS)}) or a text file path")
    spec = str(spec).strip()
    if spec in PROMPT_SETS:
        return _builtin(spec)
    path = Path(spec).expanduser()
    if path.exists() or path.is_symlink() or "/" in spec or "\\" in spec or path.suffix:  # (a link: broken, a loop)
        return read_prompt_file(path)
    hint = did_you_mean(spec, PROMPT_SETS, fold=_dashed)  # toy_pairs, Simple_Animals: near misses
    raise UserError(f"unknown prompt set {spec!r}{hint}; use one of: {', '.join(PROMPT_SETS)}, or the path of a UTF-8 "
                    "text file with one prompt per line")


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

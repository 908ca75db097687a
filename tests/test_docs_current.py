"""The docs' commands and names against the code: every command line in README.md, docs/*.md and
benchmarks/REPORT.md parses with the command line's own parsers (its --profile a shipped profile, its --reward a
reward, its --prompts a prompt set or a file), every ``key=value`` naming a config field gives that field a value it
takes, and every repository path and test the docs name exists. No model loads: parsing and file checks only.

docs/bad_inputs.md is left out: its code spans are error messages and the bad inputs that cause them (misspelled on
purpose), and its test column is tests/test_bad_input.py's check (test_the_table_names_tests_that_exist)."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from lowmem_alignprop import cli
from lowmem_alignprop.commands.export_cmd import export_parser
from lowmem_alignprop.rewards import reward_terms
from lowmem_alignprop.settings.config import FIELD_NAMES, Config, coerce, shipped_recipes
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.profiles import shipped_profiles
from lowmem_alignprop.step.prompts import PROMPT_SETS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/design.md", "docs/flow_models.md", "docs/toy_world.md", "docs/outputs.md",
        "docs/distributed.md", "docs/test_suite.md", "benchmarks/REPORT.md")

# Words that stand for a value the reader chooses (RUN, DIR, N, <name>, ...), a value left out (...), or choices
# (fp8|int8|nf4: each is checked): not a stale name.
PLACEHOLDER = re.compile(r"^(\.\.\.|[A-Z][A-Z0-9_]*(/[A-Z][A-Z0-9_]*)?|<[^>]*>|)$")
# Paths the docs name that are no repository file, each with why.
NOT_REPO_FILES = {
    "lowmem_alignprop/arch_flow/<name>/": "a placeholder: one folder per shipped flow architecture",
}
GENERIC_KEYS = {"key": "--set key=value: the option's form, not a field"}
OPTIONS_WITHOUT_VALUE = {"-h", "--help"}  # parsed as given they print the help and exit: the rest is parsed


def snippets(text: str) -> list[str]:
    """A markdown file's code: each fenced or indented block's lines (a backslash-continued line joined to the next)
    and each inline code span outside the blocks (one that wraps onto the next line joined)."""
    fenced = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
    indented = re.compile(r"(?<=\n\n)((?: {4,}\S[^\n]*\n)+)")  # (after a blank line: not a list item's prose)
    blocks = fenced.findall(text) + indented.findall(fenced.sub("", text))
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    spans = re.findall(r"`([^`]+)`", indented.sub("", fenced.sub("", text)))
    return lines + [" ".join(span.split("\n")) for span in spans if "\n\n" not in span]


def doc_snippets() -> list[tuple[str, str]]:
    return [(doc, s) for doc in DOCS for s in snippets((ROOT / doc).read_text(encoding="utf-8"))]


# -- command lines ------------------------------------------------------------------------------------------------

COMMAND_START = re.compile(r"(?:^|[\s(;&|])(lowmem-alignprop|-m lowmem_alignprop)(?=\s|$)")


def command_lines(snippet: str) -> list[list[str]]:
    """The arguments of each lowmem-alignprop command in ``snippet`` (``lowmem-alignprop``, ``python -m`` or
    ``accelerate launch ... -m lowmem_alignprop``), up to a shell operator, a comment or the end."""
    out = []
    starts = list(COMMAND_START.finditer(snippet))
    for m, after in zip(starts, [*starts[1:], None]):
        text = snippet[m.end():after.start() if after else None]  # (two commands side by side: each alone)
        try:
            words = shlex.split(text, comments=True)
        except ValueError:  # an unclosed quote: a span that cut the line short
            words = text.split()
        end = next((i for i, w in enumerate(words) if w in ("|", "||", "&&", ";") or w.startswith((">", "2>"))
                    or w.count(")") > w.count("(")), len(words))  # (a command in parentheses: "(... -m x ...)")
        if end < len(words) and words[end].count(")") > words[end].count("("):
            words[end] = words[end].rsplit(")", 1)[0]
            end += 1
        out.append([w for w in words[:end] if w])
    return out


def parser_for(argv: list[str]) -> tuple[str, argparse.ArgumentParser, list[str]]:
    """The command's name, its parser (built as cli.main's command does) and its arguments."""
    command = argv[0] if argv and argv[0] in cli.COMMANDS else "train"
    rest = argv[1:] if argv and argv[0] == command else argv
    build = {"train": cli.train_parser, "plan": cli.plan_parser, "sample": cli.sample_parser,
             "export": export_parser, "profiles": cli.profiles_parser}[command]
    parser = build()
    parser.allow_abbrev = False  # a doc's --num-prompt would parse as --num-prompts: the docs write options whole
    return command, parser, rest


def stand_ins(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` without ``...`` and --help, a placeholder value of a number option (``--seed S``) given as 1."""
    numeric = {o for a in parser._actions if a.type in (int, float) for o in a.option_strings}
    out = []
    for word in argv:
        if word == "..." or word in OPTIONS_WITHOUT_VALUE:
            continue
        out.append("1" if out and out[-1] in numeric and PLACEHOLDER.match(word) else word)
    return out


def check_command(argv: list[str]) -> list[str]:
    """What in one documented command the code no longer takes (empty: it parses and its names exist)."""
    command, parser, rest = parser_for(argv)
    try:
        args = parser.parse_args(stand_ins(parser, rest))
    except (UserError, SystemExit) as e:
        return [f"{command}: {e}"]
    problems = []
    profile = getattr(args, "profile", None)
    if profile and not PLACEHOLDER.match(profile) and not profile.endswith((".yaml", ".yml")) \
            and profile not in {*shipped_profiles(), "auto"}:
        problems.append(f"--profile {profile}: no shipped profile of that name")
    if command == "profiles" and args.name and args.name not in {*shipped_profiles(), *shipped_recipes(), "auto"}:
        problems.append(f"profiles {args.name}: no shipped profile or recipe of that name")
    reward = getattr(args, "reward", None)
    if reward and not any(PLACEHOLDER.match(w) for w in re.split(r"[=:,]", reward)):
        try:
            reward_terms(reward)
        except UserError as e:
            problems.append(f"--reward {reward}: {e}")
    prompts = getattr(args, "prompts", None)
    if prompts and not PLACEHOLDER.match(prompts) and prompts not in PROMPT_SETS and not Path(prompts).suffix \
            and not prompts.startswith("hf://datasets/"):  # (a hub dataset's address)
        problems.append(f"--prompts {prompts}: no shipped prompt set of that name (nor a file)")
    for item in getattr(args, "set", []):
        key, _, value = item.partition("=")
        problems += check_field(key, value)
    return problems


# -- config fields ------------------------------------------------------------------------------------------------

SET_ITEM = re.compile(r"--set[ =]([\w.-]+)=")
FIELD_VALUE = re.compile(r"(?<![\w.$/-])(\w+)=(\"[^\"]*\"|'[^']*'|[^\s,;`)\]]*)")


def check_field(key: str, value: str) -> list[str]:
    """What the code says of ``--set key=value`` (empty: the field exists and takes the value; each of a|b|c is
    checked, a placeholder's only the key)."""
    if key not in FIELD_NAMES:
        return [f"{key}={value}: no config field {key!r}"]
    problems = []
    for one in value.strip("\"'").split("|") if not PLACEHOLDER.match(value) else ():
        if PLACEHOLDER.match(one):
            continue
        try:
            typed = coerce(key, one)
        except UserError as e:
            problems.append(f"{key}={one}: {e}")
            continue
        choices = Config.__dataclass_fields__[key].metadata.get("choices")
        if choices and typed not in choices:
            problems.append(f"{key}={one}: not one of {', '.join(map(str, choices))}")
    return problems


def field_values(snippet: str) -> list[tuple[str, str]]:
    """Each ``key=value`` of ``snippet`` whose key is a config field, and each ``--set key=`` whatever its key."""
    named = [(m[1], m[2]) for m in FIELD_VALUE.finditer(snippet) if m[1] in FIELD_NAMES]
    return named + [(key, "") for key in SET_ITEM.findall(snippet) if key not in FIELD_NAMES | GENERIC_KEYS.keys()]


# -- paths and tests ----------------------------------------------------------------------------------------------

REPO_PATH = re.compile(r"(?<![\w/.~-])((?:benchmarks|lowmem_alignprop|docs|tests|profiles|results)/[\w./*{},<>-]*"
                       r"|test_\w+\.py)(::\w+(?:\.\.\.)?)?")  # (test_x... : the tests whose names start so)


def repo_paths(doc: str, snippet: str) -> list[tuple[str, str]]:
    """(path from the repository root, test name or '') of each repository file ``snippet`` names: REPORT.md's
    results/... are benchmarks/results/... (another file's results/ is a run's), a bare test_x.py is
    tests/test_x.py."""
    out = []
    for m in REPO_PATH.finditer(snippet):
        path = m[1].rstrip(".,")
        if path.startswith("results/"):
            if doc != "benchmarks/REPORT.md":
                continue
            path = "benchmarks/" + path
        elif path.startswith("test_"):
            path = "tests/" + path
        out.append((path, m[2][2:] if m[2] else ""))
    return out


def expand_braces(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if m is None:
        return [path]
    return [p for choice in m[1].split(",") for p in expand_braces(path[:m.start()] + choice + path[m.end():])]


def check_path(path: str, test: str) -> list[str]:
    """What is missing of a documented repository path (a glob: at least one file) and test (defined in it)."""
    if (f"{path}::{test}" if test else path) in NOT_REPO_FILES:
        return []
    problems = []
    for one in expand_braces(path):
        found = list(ROOT.glob(one.rstrip("/"))) if "*" in one else [ROOT / one] if (ROOT / one).exists() else []
        if not found:
            problems.append(f"{one}: no such file")
        elif test and not re.search(rf"^(async )?def {test.removesuffix('...')}" + (r"\w*\(" if test.endswith("...")
                                    else r"\("), found[0].read_text(encoding="utf-8"), re.M):
            problems.append(f"{one}::{test}: no such test in the file")
    return problems


def tree_modules(text: str) -> list[tuple[str, str]]:
    """The files named in a markdown file's layout of the repository (a fenced block starting lowmem_alignprop/):
    (the top folder whose section names it, its name as written: x.py or sub/x.py)."""
    out = []
    for block in re.findall(r"^```[^\n]*\n(lowmem_alignprop/\n.*?)^```", text, re.S | re.M):
        top = ""
        for line in block.splitlines():
            if m := re.match(r"(\w+)/", line):  # a top folder's section (its first line at column 0)
                top = m[1]
            out += [(top, name) for name in re.findall(r"(?<![\w/.])((?:[a-z_]+/)?\w+\.(?:py|sh))\b", line)]
    return out


def check_tree_file(top: str, name: str) -> list[str]:
    """A layout's file exists: sub/x.py under its top folder, a bare x.py anywhere under it."""
    found = (ROOT / top / name).exists() if "/" in name else any((ROOT / top).rglob(name))
    return [] if found else [f"{top}/: {name}: no such file"]


# -- the scripts' options and the package's names ----------------------------------------------------------------

SCRIPT = re.compile(r"(?:^|\s)(?:python3? |bash )?(benchmarks/\w+\.(?:py|sh)|-m lowmem_alignprop(?:\.\w+)+)(?=\s|$)")
DOTTED = re.compile(r"(?<![\w./-])lowmem_alignprop(?:\.\w+)+")


def script_options(snippet: str) -> list[tuple[str, str]]:
    """(the script's file, an option) of each benchmarks/ script or package module run in ``snippet``."""
    out = []
    for m in SCRIPT.finditer(snippet):
        path = m[1] if m[1].startswith("benchmarks/") else m[1][3:].replace(".", "/") + ".py"
        words = snippet[m.end():].split()
        end = next((i for i, w in enumerate(words) if w in ("|", "&&", ";", "#") or w.startswith(">")), len(words))
        options = [w.strip("[]").split("=")[0] for w in words[:end] if w.strip("[").startswith("--")]
        out += [(path, "")] + [(path, option) for option in options]
    return out


def check_script_option(path: str, option: str) -> list[str]:
    """The script exists and defines the option (its argparse call names it: the scripts build their parsers in
    main(), which the docs' commands would run)."""
    if not (ROOT / path).is_file():
        return [f"{path}: no such file"]
    if option and f'"{option}"' not in (ROOT / path).read_text(encoding="utf-8"):
        return [f"{path} {option}: the script has no such option"]
    return []


def check_dotted(name: str) -> list[str]:
    """A documented lowmem_alignprop.module(.attribute) exists: the longest prefix that is a module file, the rest
    an attribute of it."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:n])
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            break
    module = importlib.import_module(".".join(parts[:n]))
    for attr in parts[n:]:
        if not hasattr(module, attr):
            return [f"{name}: {'.'.join(parts[:n])} has no {attr!r}"]
        module = getattr(module, attr)
    return []


# -- the checks ---------------------------------------------------------------------------------------------------

def test_every_documented_command_parses_with_the_code_s_parsers():
    commands = [(doc, argv) for doc, s in doc_snippets() for argv in command_lines(s)]
    assert len(commands) >= 60 and {argv[0] for _, argv in commands if argv} >= {"plan", "sample", "export",
                                                                                "profiles", "--profile"}
    stale = [f"{doc}: lowmem-alignprop {' '.join(argv)}: {p}" for doc, argv in commands for p in check_command(argv)]
    assert not stale, "\n".join(stale)


def test_every_documented_config_field_exists_and_takes_its_value():
    named = [(doc, k, v) for doc, s in doc_snippets() for k, v in field_values(s)]
    assert len({k for _, k, _ in named}) >= 60
    stale = [f"{doc}: {p}" for doc, k, v in named for p in check_field(k, v)]
    assert not stale, "\n".join(stale)


def test_every_documented_repository_path_and_test_exists():
    named = [(doc, *p) for doc, s in doc_snippets() for p in repo_paths(doc, s)]
    assert len(named) >= 100 and sum(bool(test) for *_, test in named) >= 4
    stale = [f"{doc}: {p}" for doc, path, test in named for p in check_path(path, test)]
    assert not stale, "\n".join(stale)


def test_every_file_in_the_repository_layouts_exists():
    named = [(doc, top, name) for doc in ("README.md", "docs/design.md")
             for top, name in tree_modules((ROOT / doc).read_text(encoding="utf-8"))]
    assert len(named) >= 80 and {top for _, top, _ in named} >= {"lowmem_alignprop", "benchmarks", "tests"}
    stale = [f"{doc}: {p}" for doc, top, name in named for p in check_tree_file(top, name)]
    assert not stale, "\n".join(stale)


def test_every_documented_script_option_and_package_name_exists():
    options = [(doc, *o) for doc, s in doc_snippets() for o in script_options(s)]
    assert len({path for _, path, _ in options}) >= 8 and sum(bool(o) for *_, o in options) >= 30
    names = {(doc, name) for doc, s in doc_snippets() for name in DOTTED.findall(s)}
    assert len(names) >= 2
    stale = [f"{doc}: {p}" for doc, path, o in options for p in check_script_option(path, o)]
    stale += [f"{doc}: {p}" for doc, name in sorted(names) for p in check_dotted(name)]
    assert not stale, "\n".join(stale)


# -- the checks fail where the docs would be stale ----------------------------------------------------------------

@pytest.mark.parametrize("line, said", [
    ("lowmem-alignprop --stepz 3", "train: unrecognized arguments: --stepz 3"),
    ("lowmem-alignprop plan --profile rtx3070 --model sd15", "--profile rtx3070: no shipped profile of that name"),
    ("python -m lowmem_alignprop sample RUN/lora --reward aesthetik", "--reward aesthetik: unknown reward"),
    ("lowmem-alignprop sample RUN/lora --num-prompt 2", "sample: unrecognized arguments: --num-prompt 2"),
    ("lowmem-alignprop --prompts simple_animal", "--prompts simple_animal: no shipped prompt set of that name"),
    ("lowmem-alignprop --set k_maxx=3", "k_maxx=3: no config field 'k_maxx'"),
    ("lowmem-alignprop export RUN/lora --fromat kohya", "export: unrecognized arguments: --fromat kohya"),
    ("lowmem-alignprop profiles rtx3070 > mine.yaml", "profiles rtx3070: no shipped profile or recipe"),
])
def test_a_stale_command_is_found(line, said):
    [argv] = command_lines(line)
    problems = check_command(argv)
    assert len(problems) == 1 and problems[0].startswith(said), problems


def test_documented_placeholders_and_shell_parse():
    """What the docs write for a value the reader chooses parses: RUN, S, ..., a pipe or a redirection after."""
    lines = ["lowmem-alignprop sample RUN/lora --seed S --prompt P", "lowmem-alignprop plan --profile P --json | jq",
             "accelerate launch --config_file z.yaml -m lowmem_alignprop --profile rtx4090 ...   # ZeRO-3",
             "lowmem-alignprop profiles rtx3060 > mine.yaml", "lowmem-alignprop --set base_quant=fp8|int8 ...",
             "  -m lowmem_alignprop --profile a100-80gb ...      -m lowmem_alignprop --profile a100-80gb ..."]
    argvs = [argv for line in lines for argv in command_lines(line)]
    assert argvs[2] == ["--profile", "rtx4090", "..."] and argvs[3] == ["profiles", "rtx3060"]
    assert argvs[5] == argvs[6] == ["--profile", "a100-80gb", "..."]
    assert [check_command(argv) for argv in argvs] == [[]] * 7


def test_a_field_value_the_code_refuses_is_found():
    assert check_field("truncation", "uniform|per_step") == []
    assert check_field("truncation", "uniform|perstep") == ["truncation=perstep: not one of fixed, uniform, per_step"]
    assert check_field("lr", "fast") == ["lr=fast: lr must be a number, got 'fast'"]
    assert check_field("window_keep", "N") == [] and check_field("batch_size", "...") == []
    assert field_values("`--set bach_size=2` and resolution=512, not xresolution=1") == [
        ("resolution", "512"), ("bach_size", "")]


def test_a_missing_path_or_test_is_found():
    assert check_path("benchmarks/gone.py", "") == ["benchmarks/gone.py: no such file"]
    assert check_path("tests/test_cli.py", "test_gone") == ["tests/test_cli.py::test_gone: no such test in the file"]
    assert check_path("benchmarks/results/plan-*.json", "") == []
    assert check_path("benchmarks/results/nope-{a,b}.json", "") == [
        "benchmarks/results/nope-a.json: no such file", "benchmarks/results/nope-b.json: no such file"]
    assert repo_paths("benchmarks/REPORT.md", "see results/x.json and test_cli.py::test_y, benchmarks/z.py.") == [
        ("benchmarks/results/x.json", ""), ("tests/test_cli.py", "test_y"), ("benchmarks/z.py", "")]
    assert check_tree_file("lowmem_alignprop", "run/gone.py") == ["lowmem_alignprop/: run/gone.py: no such file"]
    assert check_tree_file("benchmarks", "memory_bench.py") == [] and check_tree_file("tests", "run/x.py") != []
    layout = "```\nlowmem_alignprop/\n  cli.py  run/   atomic.py, run/hub.py\nbenchmarks/   memory_bench.py\n```\n"
    assert tree_modules(layout) == [("lowmem_alignprop", "cli.py"), ("lowmem_alignprop", "atomic.py"),
                                    ("lowmem_alignprop", "run/hub.py"), ("benchmarks", "memory_bench.py")]
    assert check_path("tests/test_toy_world.py", "test_shipped_weights_...") == []
    assert check_path("tests/test_toy_world.py", "test_shipped_weight...") == []
    assert check_path("tests/test_toy_world.py", "test_shipped_weight") != []


def test_a_missing_script_option_or_package_name_is_found():
    assert script_options("python benchmarks/speed_bench.py --steps 8 --repeatz 3 > out.txt") == [
        ("benchmarks/speed_bench.py", ""), ("benchmarks/speed_bench.py", "--steps"),
        ("benchmarks/speed_bench.py", "--repeatz")]
    assert check_script_option("benchmarks/speed_bench.py", "--repeats") == []
    assert check_script_option("benchmarks/speed_bench.py", "--repeatz") == [
        "benchmarks/speed_bench.py --repeatz: the script has no such option"]
    assert script_options("python -m lowmem_alignprop.commands.train_toy_world --out DIR [--seed 0]") == [
        ("lowmem_alignprop/commands/train_toy_world.py", ""), ("lowmem_alignprop/commands/train_toy_world.py",
                                                               "--out"),
        ("lowmem_alignprop/commands/train_toy_world.py", "--seed")]
    assert check_dotted("lowmem_alignprop.rewards.toy.load_toy_clip") == []
    assert check_dotted("lowmem_alignprop.rewards.toy.load_toy_clop") == [
        "lowmem_alignprop.rewards.toy.load_toy_clop: lowmem_alignprop.rewards.toy has no 'load_toy_clop'"]

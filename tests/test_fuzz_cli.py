"""A seeded fuzz of the command line: random --set values, random profile YAML and random prompt files go to
``cli.main`` in this process. Every case must exit 0 or 2 (never a traceback, never a hang) and write nothing when it
exits 2. The training itself is replaced by a stub: what is fuzzed is every check before the first step (the config,
the profile, the prompts, the reward's start-up check, the model path, the run folder and its lock).

Bounded: CASES cases at most, and no new case starts after BUDGET_S seconds; each case has CASE_LIMIT_S seconds
before it counts as a hang. A failing case prints its seed and arguments, to be replayed alone."""

import random
import signal
import time
from pathlib import Path

import pytest

from lowmem_alignprop.cli import main
from lowmem_alignprop.settings.config import FIELD_NAMES, Config

SEED, CASES, BUDGET_S, CASE_LIMIT_S = 19, 120, 90, 60

pytestmark = pytest.mark.usefixtures("fresh_log_handlers")

NUMBERS = ["0", "1", "-1", "2", "3", "7", "64", "4096", "4097", "99999999999999999999999", "-99999999999999999999",
           "1e999", "-1e999", "nan", "inf", "0.5", "1e-30", "0x10", "1_000", "+3", "٣"]
TEXTS = ["", " ", "abc", "NONE", "None", "null", "~", "yes", "no", "true", "FALSE", "[1, 2]", "{a: 1}", "&a [*a]",
         "!!python/object/apply:os.system ['echo x']", "x" * 5000, "é\u200b", "a,b", "k=v", "=", "\\", "\t1"]
CHOICE_FIELDS = [f for f in FIELD_NAMES if "choices" in Config.__dataclass_fields__[f].metadata]
PROMPT_BYTES = [b"", b"\n\n", b"# only a comment\n", "un chat\n".encode("utf-16"), b"\xff\xfe\x00bad", b"a cat\n",
                b"a cat\x00with a NUL\n", ("word " * 2000).encode(), b"\r\n".join([b"a dog"] * 3), bytes(range(256))]
YAML_PIECES = ["batch_size: 1", "resolution: 64", "k: 1", "sample_steps: 3", "mixed_precision: no", "bach_size: 2",
               "lr: fast", "eta: 5", "truncation: UNIFORM", "output_dir: x", "model: tiny", "k: [1, 2]",
               "a: &a [1, 2]\nb: *a", "<<: {k: 1}", "!!python/object/apply:os.system ['echo x']", "steps: 1e999",
               "[" * 60 + "]" * 60, "k: 1\nk: 2", "resolution: !!float 64", "- a list", "\t tab: 1", "{", "%YAML 9.9"]


def value_for(rng: random.Random, field: str) -> str:
    if field in CHOICE_FIELDS and rng.random() < 0.5:
        choice = str(rng.choice(Config.__dataclass_fields__[field].metadata["choices"]))
        return rng.choice([choice, choice.upper(), choice + " ", choice[:-1]])
    return rng.choice(NUMBERS + TEXTS if rng.random() < 0.7 else TEXTS)


def random_case(rng: random.Random, folder: Path) -> list[str]:
    """A command line: a profile (shipped, or a random YAML), a prompt file (sometimes random bytes), and a few random
    --set items; the fast settings first, so a case that is valid trains the tiny model for one stubbed run."""
    args = ["--set", "sample_steps=3", "--set", "k=1", "--set", "sample_prompts=0", "--steps", "1",
            "--output-dir", str(folder / "out")]
    if rng.random() < 0.4:
        profile = folder / rng.choice(["p.yaml", "p.yml", "p.txt"])
        profile.write_text("\n".join(rng.sample(YAML_PIECES, rng.randint(1, 4))) + "\n", encoding="utf-8")
        args += ["--profile", str(profile)]
    else:
        args += ["--profile", "cpu"]
    if rng.random() < 0.4:
        prompts = folder / "prompts.txt"
        prompts.write_bytes(rng.choice(PROMPT_BYTES))
        args += ["--prompts", str(prompts)]
    for _ in range(rng.randint(0, 3)):
        field = rng.choice(list(FIELD_NAMES) + ["bach_size", "", "k ", "Batch_Size"])
        if field in ("model", "vae", "reward_weights", "output_dir", "prompts", "reward"):
            value = rng.choice(["", "nope", str(folder / "missing"), "/dev/null", str(folder), "~/fz", "\0x"])
        else:
            value = value_for(rng, field)
        args += ["--set", f"{field}={value}" if rng.random() < 0.95 else field]
    if rng.random() < 0.2:
        args += [rng.choice(["--seed", "--steps", "--checkpoint-every"]), rng.choice(NUMBERS)]
    return args


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class Hang(Exception):
    pass


def test_random_command_lines_exit_0_or_2_and_write_nothing_on_2(tmp_path, monkeypatch, capsys, tiny_dir):
    from lowmem_alignprop.training import train

    runs = []
    monkeypatch.setattr(train.Trainer, "run", lambda self: runs.append(self.cfg) or {})  # no step: the checks are fuzzed
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)

    def hang(signum, frame):
        raise Hang(f"no answer in {CASE_LIMIT_S} s")
    old = signal.signal(signal.SIGALRM, hang)
    rng, started, codes = random.Random(SEED), time.monotonic(), {0: 0, 2: 0}
    try:
        for case in range(CASES):
            if time.monotonic() - started > BUDGET_S:
                break
            folder = tmp_path / f"case{case}"
            folder.mkdir()
            args = random_case(rng, folder)
            before = files_under(tmp_path)
            signal.alarm(CASE_LIMIT_S)
            try:
                rc = main(list(args))
            except SystemExit as e:  # argparse's own usage errors
                rc = e.code
            except Hang:
                pytest.fail(f"case {case} (seed {SEED}) hung: {args}")
            except BaseException as e:
                pytest.fail(f"case {case} (seed {SEED}) raised {type(e).__name__}: {e!s:.300} for {args}")
            finally:
                signal.alarm(0)
            err = capsys.readouterr().err
            assert rc in (0, 2), (case, args, rc, err[-2000:])
            assert "Traceback" not in err, (case, args, err[-3000:])
            codes[rc] += 1
            if rc == 2:
                assert files_under(tmp_path) == before, (case, args, err[-1000:])  # nothing written
                assert not (folder / "out").exists(), (case, args)
    finally:
        signal.signal(signal.SIGALRM, old)
    print("fuzz:", codes, "cases")
    assert codes[2] > 10 and codes[0] + codes[2] >= 20, codes  # the fuzz reached both outcomes, many times
    assert len(runs) == codes[0]

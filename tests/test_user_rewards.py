"""User rewards: what a 'module:function' spec is follows from the spec, never from a guess (issue 21).

A callable is the reward: its first positional parameter takes the images, the prompts come second when it
accepts a second positional argument. A class is constructed; ``module:factory()`` builds the reward. Each form
below trains one step on the tiny model and must log the same numbers as the built-in ``brightness`` reward it
reimplements (times its scale).
"""

import functools
import importlib
import sys

import pytest
import torch

from lowmem_alignprop.cli import main
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.rewards import RewardModule, build_reward, check_reward_spec
from refusals import strict_rows

HERE = "tests.test_user_rewards"
SEEN: dict[str, list] = {}  # what each user reward was given: prompts (None: called without), options


def luma(images):
    """The built-in brightness, op for op (BT.601 luma, mean over the pixels): the same float32 result."""
    x = images.float()
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean(dim=(1, 2))


def _saw(key, prompts, images):
    assert images.dim() == 4 and images.shape[1] == 3
    SEEN.setdefault(key, []).append(None if prompts is None else (list(prompts), images.shape[0]))


# --- the forms of a user reward ---------------------------------------------------------------------
def images_only(images):
    _saw("images_only", None, images)
    return luma(images)


def prompts_optional(images, prompts=None):
    _saw("prompts_optional", prompts, images)
    return luma(images)


def prompts_and_kwargs(images, prompts, **kw):
    _saw("prompts_and_kwargs", prompts, images)
    assert kw == {}
    return luma(images)


def scaled(images, prompts, *, scale):
    _saw("scaled", prompts, images)
    return scale * luma(images)


doubled = functools.partial(scaled, scale=2.0)


class Scorer:
    def __init__(self, scale):
        self.scale = scale

    def __call__(self, images, prompts):
        _saw("Scorer", prompts, images)
        return self.scale * luma(images)


scorer = Scorer(2.0)


class PlainModule(RewardModule):
    def score(self, images, prompts):
        _saw("PlainModule", prompts, images)
        return luma(images)


class ConfiguredModule(RewardModule):
    def __init__(self, dtype=None, checkpointing=None, scale=2.0):
        super().__init__()
        SEEN.setdefault("ConfiguredModule options", []).append({"dtype": dtype, "checkpointing": checkpointing})
        self.scale = scale

    def score(self, images, prompts):
        return self.scale * luma(images)


def make_reward(device=None, checkpointing=False):  # a factory in today's style, marked by 'make_reward()'
    SEEN.setdefault("make_reward options", []).append({"device": str(device), "checkpointing": checkpointing})
    return doubled


# --- bad ones ---------------------------------------------------------------------------------------
def unmarked_factory(checkpointing=False):
    return images_only


def takes_nothing():
    return images_only


def needs_scale(images, prompts, scale):
    return scale * luma(images)


def raises(images, prompts=None):
    raise ValueError("my reward exploded")


def make_needs_scale(scale):
    return functools.partial(scaled, scale=scale)


def make_number():
    return 3


def clamps_in_place(images):  # would change the images the run keeps (grids, fidelity): refused
    return luma(images.clamp_(0.2, 0.3))


not_callable = 3


# --- one training step, in process -------------------------------------------------------------------
FAST = ["--profile", "cpu", "--seed", "2", "--set", "sample_prompts=0", "--set", "sample_steps=3", "--set", "k=1",
        "--set", "batch_size=1", "--steps", "1"]


pytestmark = pytest.mark.usefixtures("fresh_log_handlers")


def train_one_step(out, reward: str) -> dict:
    """One optimizer step (1 image, 3 DDIM steps, no sample grid) with ``reward``: its metrics line."""
    assert main([*FAST, "--output-dir", str(out), "--reward", reward]) == 0
    rows = strict_rows(out)
    assert [r["step"] for r in rows] == [1]
    return rows[0]


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    row = train_one_step(tmp_path_factory.mktemp("ref") / "run", "brightness")
    assert 0 < row["reward_mean"] < 1 and row["grad_norm"] > 0  # a real image and a real gradient to compare
    return row


@pytest.mark.parametrize("spec, scale, seen", [
    ("images_only", 1, "images_only"),                # def f(images)
    ("prompts_optional", 1, "prompts_optional"),      # def f(images, prompts=None): the issue's failing case
    ("prompts_and_kwargs", 1, "prompts_and_kwargs"),  # def f(images, prompts, **kw)
    ("doubled", 2, "scaled"),                         # functools.partial(scaled, scale=2.0)
    ("scorer", 2, "Scorer"),                          # an object with __call__(images, prompts)
    ("PlainModule", 1, "PlainModule"),                # a RewardModule subclass, no constructor options
    ("ConfiguredModule", 2, "ConfiguredModule options"),  # ... taking dtype and checkpointing
    ("make_reward()", 2, "make_reward options"),      # a factory, marked by the parentheses
    ("make_reward():0.5", 1, "make_reward options"),  # ... with a weight
])
def test_each_form_of_a_user_reward_trains_a_step(spec, scale, seen, reference, tmp_path):
    """The logged reward is the form's own score (brightness times its scale) and its gradient reaches the LoRA:
    scaling a reward by 2 (exact in binary floating point) doubles the gradient norm exactly, and a scale of 1
    gives the reference's numbers; rel 1e-6 covers a reordered float32 sum, any mis-wiring is off by far more."""
    seen_by = importlib.import_module(HERE).SEEN  # the module the spec imports (pytest may import this file apart)
    seen_by.clear()
    row = train_one_step(tmp_path / "run", f"{HERE}:{spec}")
    assert row["reward_mean"] == pytest.approx(scale * reference["reward_mean"], rel=1e-6)
    assert row["loss"] == pytest.approx(-scale * reference["reward_mean"], rel=1e-6)
    assert row["grad_norm"] == pytest.approx(scale * reference["grad_norm"], rel=1e-6)
    calls = seen_by[seen]
    assert calls
    if seen.endswith("options"):  # built once per build (start-up check, training), with the options it names
        assert {k for c in calls for k in c} <= {"dtype", "checkpointing", "device"}
        assert all(c["checkpointing"] is False for c in calls)
        assert all(c.get("dtype", torch.float32) is torch.float32 for c in calls)
        assert all(c.get("device", "cpu") == "cpu" for c in calls)
    elif seen == "images_only":
        assert all(c is None for c in calls)  # called f(images): no prompts to take
    else:  # prompts passed as the second argument, one per image, the run's own (simple_animals)
        assert all(c is not None and len(c[0]) == c[1] and all(isinstance(p, str) and p for p in c[0])
                   for c in calls)


@pytest.mark.parametrize("spec, expected", [
    ("images_only", "images_only(images)"),
    ("prompts_optional", "prompts_optional(images, prompts)"),
    ("doubled", "partial(scaled)(images, prompts)"),
    ("scorer", "Scorer.__call__(images, prompts)"),
])
def test_how_each_callable_is_called_is_read_from_its_signature(spec, expected):
    reward = build_reward(f"{HERE}:{spec}")
    assert reward.call == expected
    images = torch.rand(2, 3, 8, 8)
    scale = 2 if spec in ("doubled", "scorer") else 1
    torch.testing.assert_close(reward(images, ["a", "b"]), scale * luma(images), rtol=0, atol=0)


BAD = [
    # a factory without the parentheses is called as a reward: the message says what was tried and the fix
    ("unmarked_factory", f"reward '{HERE}:unmarked_factory': called unmarked_factory(images) and it returned "
                         "images_only (a function), not a tensor of scores; if unmarked_factory builds the reward (a "
                         f"factory), write it as '{HERE}:unmarked_factory()' (on 2 random test images)"),
    ("takes_nothing", f"reward '{HERE}:takes_nothing': takes_nothing() cannot be called with the images as its first "
                      "argument (tried takes_nothing(images, prompts) and takes_nothing(images)); a reward is "
                      f"f(images) or f(images, prompts) -> tensor[B]; if takes_nothing builds the reward (a factory), "
                      f"write it as '{HERE}:takes_nothing()'"),
    ("needs_scale", "needs_scale(images, prompts, scale) cannot be called with the images as its first argument"),
    ("raises", f"reward '{HERE}:raises': called raises(images, prompts) on 2 random images (2x3x16x16 in [0, 1]) "
               "with the prompts ['a photo of a cat', 'a painting of a dog'] and it raised ValueError: my reward "
               "exploded; fix the function"),
    ("make_needs_scale()", f"reward '{HERE}:make_needs_scale()': building it failed with TypeError: "
                           "make_needs_scale() missing 1 required positional argument: 'scale' (called "
                           "make_needs_scale(); a reward class or factory is given the options it names among "
                           "device, dtype, checkpointing, weights, by keyword, and returns the reward)"),
    ("make_number()", "called make_number() and it returned a value of type int, not a reward"),
    ("clamps_in_place", f"reward '{HERE}:clamps_in_place': clamps_in_place(images) changed its images in place "
                        "(images.clamp_(), images *= ..., images[...] = ...): the run keeps and judges them after the "
                        "reward; work on a copy (images = images.clamp(...), or images.clone()) (on 2 random test "
                        "images)"),
    ("not_callable()", "not_callable is of type int, not a function that builds the reward"),
    ("not_callable", "is not callable"),
    ("make_needs_scale(scale=2)", "a factory is written 'package.module:factory()' with empty parentheses"),
]


@pytest.mark.parametrize("spec, needle", BAD, ids=[spec for spec, _ in BAD])
def test_a_user_reward_that_cannot_be_used_says_what_was_tried(spec, needle):
    with pytest.raises(UserError) as err:
        check_reward_spec(f"{HERE}:{spec}", resolution=16)
    message = str(err.value)
    assert needle in message and "\n" not in message, message


def test_the_issue_example_trains_from_the_command_line(tmp_path, monkeypatch, reference):
    """The report of issue 21, as written: a module on PYTHONPATH with def redness(images, prompts=None, **kw)."""
    (tmp_path / "myreward.py").write_text(
        "def redness(images, prompts=None, **kw):\n"
        "    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    row = train_one_step(tmp_path / "run", "myreward:redness")
    # the tiny model's images are near grey (brightness ~0.5), so redness is near 0: |R - mean(G, B)| <= 1 always
    assert abs(row["reward_mean"]) < 1 and row["grad_norm"] > 0
    assert row["reward_mean"] != pytest.approx(reference["reward_mean"], abs=0.1)  # redness, not brightness


def _without_cwd_on_path(monkeypatch, folder):
    """The ``lowmem-alignprop`` script's sys.path: neither '' nor the working directory (``python -m`` has them)."""
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(folder))])  # restored after the test


def test_a_reward_file_trains_with_its_own_imports_from_another_folder(tmp_path, monkeypatch, reference):
    """`--reward path/to/file.py:function`: the file is loaded by its path (relative to the working directory), its
    own imports are found in its folder, and a dataclass in it works (the module is registered under its own name).
    It reimplements brightness times 2 (a helper module's factor): exactly the reference's numbers, doubled."""
    rewards = tmp_path / "my rewards"
    rewards.mkdir()
    (rewards / "factor.py").write_text("FACTOR = 2.0\n")
    (rewards / "bright.py").write_text(
        "import dataclasses\n\nfrom factor import FACTOR\n\n\n@dataclasses.dataclass\nclass Luma:\n"
        "    r: float = 0.299\n    g: float = 0.587\n    b: float = 0.114\n\n\n"
        "def score(images, prompts):\n    w, x = Luma(), images.float()\n"
        "    return FACTOR * (w.r * x[:, 0] + w.g * x[:, 1] + w.b * x[:, 2]).mean(dim=(1, 2))\n")
    work = tmp_path / "work"
    work.mkdir()
    _without_cwd_on_path(monkeypatch, work)
    row = train_one_step(tmp_path / "run", "../my rewards/bright.py:score")
    assert row["reward_mean"] == pytest.approx(2 * reference["reward_mean"], rel=1e-6)
    assert row["grad_norm"] == pytest.approx(2 * reference["grad_norm"], rel=1e-6)
    # weighed beside a built-in, from an absolute path: 0.5 x (2 x brightness) + brightness
    both = build_reward(f"{rewards / 'bright.py'}:score:0.5,brightness")
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(both(images, ["a", "b"]), 2 * luma(images), rtol=1e-6, atol=0)


def test_a_module_in_the_working_directory_imports_without_pythonpath(tmp_path, monkeypatch):
    """`--reward myreward:fn` from the folder that holds myreward.py works under the console script too (it does not
    put the working directory on sys.path; the reward is searched there last, after installed packages)."""
    (tmp_path / "redness_here.py").write_text(
        "def redness(images, prompts=None):\n    return images[:, 0].mean(dim=(1, 2))\n")
    _without_cwd_on_path(monkeypatch, tmp_path)
    check_reward_spec("redness_here:redness", resolution=16)
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(build_reward("redness_here:redness")(images, ["a", "b"]),
                               images[:, 0].mean(dim=(1, 2)))


@pytest.mark.parametrize("spec, needle", [
    ("nope.py:score", "reward 'nope.py:score': nope.py is not a file; give the path of your reward's .py file "
                      "(relative to the working directory, "),
    ("exits.py:score", "reward 'exits.py:score': importing file 'exits.py' failed with SystemExit: 3; fix the file"),
    ("exits.py", "reward 'exits.py': name the function in the file too, e.g. 'exits.py:my_reward'"),
    ("nowhere_module_x:score", "make it importable (install it, add its folder to PYTHONPATH or run from that "
                               "folder), give its file ('path/to/file.py:function')"),
    # its own import missing: not "cannot import module imports_x ... give its file", which it is
    ("imports_x.py:score", "reward 'imports_x.py:score': importing file 'imports_x.py' failed: it imports "
                           "'not_installed_here_x', which is not installed here (pip install it, or fix the file)"),
    ("imports_x:score", "reward 'imports_x:score': importing module 'imports_x' failed: it imports "
                        "'not_installed_here_x', which is not installed here (pip install it, or fix the module)"),
])
def test_a_reward_file_that_cannot_be_used_is_one_line(spec, needle, tmp_path, monkeypatch):
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(3)\n")
    (tmp_path / "imports_x.py").write_text("import not_installed_here_x\n\n\ndef score(images):\n    return 0\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        check_reward_spec(spec, resolution=16)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("leaves", ["torch.set_default_dtype(torch.float64)", "torch.set_grad_enabled(False)"])
def test_a_reward_that_changes_torchs_global_settings_is_set_back_and_said_once(leaves, tmp_path, monkeypatch, caplog):
    """A reward that switches gradients off after computing its scores (the step then failed: 'no gradient to the
    images', though its scores had one) or changes the default dtype (the rest of the run silently in float64):
    set back after each call, said once, and the run trains as it would."""
    import logging

    (tmp_path / "qa_leaky.py").write_text(
        f"import torch\ndef reward(images, prompts):\n    s = images.mean(dim=(1, 2, 3))\n    {leaves}\n    return s\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "qa_leaky", raising=False)
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    out = tmp_path / "run"
    assert main([*FAST, "--output-dir", str(out), "--steps", "2", "--reward", "qa_leaky:reward"]) == 0
    assert torch.get_default_dtype() == torch.float32 and torch.is_grad_enabled()
    said = [r.getMessage() for r in caplog.records if "changed torch's global settings" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("reward 'qa_leaky:reward': reward(images, prompts) changed torch's "
                                                 "global settings (")
    rows = strict_rows(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] > 0 for r in rows)  # both steps trained


@pytest.mark.parametrize("where", ["import", "factory", "chdir"])
def test_a_reward_whose_import_or_factory_changes_global_settings_is_set_back_and_said(where, tmp_path, caplog,
                                                                                       monkeypatch):
    """A reward module that switches gradients off at its import (a library that does, a leftover inference
    script): the start-up test then failed blaming the function, "returned scores with no gradient to the images
    (a .detach() ... inside?)", though it had none; a factory that builds its model in float64 left the default
    dtype float64 for the rest of the run, unsaid; an import that os.chdir()s (to read its weights) sent a relative
    --output-dir into that folder. Set back after the import / the build, and said (row 123's rule for a call)."""
    import logging
    import os

    leaky = tmp_path / f"qa_leaky_{where}.py"
    (tmp_path / "elsewhere").mkdir()
    top = {"import": "torch.set_grad_enabled(False)\n", "factory": "",
           "chdir": f"os.chdir({str(tmp_path / 'elsewhere')!r})\n"}[where]
    leaky.write_text("import os\nimport torch\n" + top + "\n\ndef score(images, prompts):\n"
                     "    return images.mean(dim=(1, 2, 3))\n\n\n"
                     "def make():\n    torch.set_default_dtype(torch.float64)\n    return score\n")
    spec = f"{leaky}:make()" if where == "factory" else f"{leaky}:score"
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    try:
        check_reward_spec(spec, resolution=16)
        assert torch.is_grad_enabled() and torch.get_default_dtype() == torch.float32
        assert os.getcwd() == str(tmp_path)
    finally:
        torch.set_grad_enabled(True)
        torch.set_default_dtype(torch.float32)
    said = [r.getMessage() for r in caplog.records if "global settings" in r.getMessage()]
    expected = {"import": f"importing file '{leaky}' changed torch's global settings (gradients enabled True -> "
                          "False); set back after its import",
                "factory": "building it (make()) changed torch's global settings (default dtype torch.float32 -> "
                           "torch.float64); set back after building it",
                "chdir": f"importing file '{leaky}' changed the process's global settings (working directory "
                         f"{tmp_path} -> {tmp_path / 'elsewhere'}); set back after its import"}[where]
    assert said == [f"reward {spec!r}: {expected}: a reward must leave them as it found them"], said


def exits_when_called(images, prompts=None):
    sys.exit("reward server gone")


def make_exits():
    sys.exit("no weights here")


@pytest.mark.parametrize("spec, needle", [
    ("exits_when_called", "and it raised SystemExit: reward server gone; fix the function"),
    ("make_exits()", "building it failed with SystemExit: no weights here (called make_exits();"),
])
def test_a_user_reward_or_factory_that_exits_is_one_line_not_the_end_of_the_process(spec, needle):
    """sys.exit in the user's reward or factory (a BaseException, not an Exception) is the reward's failure, said in
    one line at the start-up check; it must not end the run's process without a word."""
    with pytest.raises(UserError) as err:
        check_reward_spec(f"{HERE}:{spec}", resolution=16)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)

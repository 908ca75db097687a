"""The estimate cache on disk (measure/estimate_cache.py): a configuration planned before is read, not estimated
again, and nothing it depends on can change without a fresh estimate."""

import copy
import dataclasses
import json
import os
import shutil

import pytest

from lowmem_alignprop.measure import estimate_cache, planner
from lowmem_alignprop.settings.config import Config


_MADE: dict = {}  # the estimates the tests below make, by configuration: each is computed once per process


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The cache on, in a folder of this test's own; counts the estimates made (not read). Several tests make the
    same one: its figures are computed once (the step under fake tensors is deterministic; the test that says so
    compares two made afresh), every later one is a copy, counted as made."""
    monkeypatch.setenv("LOWMEM_ALIGNPROP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(estimate_cache.CACHE_ENV, "on")
    made = []
    real = planner._estimate

    def counted(cfg, *args):
        made.append(cfg)
        key = planner._memo_key(cfg, *args)
        if key not in _MADE:
            _MADE[key] = real(cfg, *args)
        return copy.deepcopy(_MADE[key])

    monkeypatch.setattr(planner, "_estimate", counted)
    return made


def _cfg(**kw) -> Config:
    return Config(**{"model": "tiny", "resolution": 64, "sample_steps": 2, "k": 1, "budget_gb": 8.0, **kw}).validate()


def _files() -> list:
    return sorted(estimate_cache.folder().glob("*.json"))


def _same(a, b) -> bool:
    """Two estimates equal in everything an estimate says (not when or how fast it was made)."""
    def fields(e):
        return {k: v for k, v in e.to_dict().items() if k not in ("seconds", "cached")}
    return fields(a) == fields(b)


def test_a_second_estimate_is_read_whatever_the_budget(cache):
    first = planner.estimate(_cfg(), target="cuda")
    assert len(cache) == 1 and len(_files()) == 1 and not first.cached
    again = planner.estimate(_cfg(budget_gb=2.0), target="cuda")  # the budget is not an estimate's input
    assert len(cache) == 1, "estimated again instead of read"
    assert again.cached and _same(first, again)
    assert again.peak_needed == first.peak_needed > 0 and again.stages == first.stages
    # its plan says so
    from lowmem_alignprop.measure.reports import format_plan
    text = format_plan(planner.plan(_cfg(), profile="rtx3060", target="cuda"))
    assert "read from the estimate cache (estimated in" in text and "--no-cache estimates again" in text
    assert len(cache) == 1


def test_what_an_estimate_depends_on_is_in_its_key(monkeypatch, tiny_dir, tmp_path):
    """The file name: the same for another budget; another for any input of the estimate; none (not kept) for user
    code, an uncached hub id or the cache turned off."""
    monkeypatch.setenv(estimate_cache.CACHE_ENV, "on")

    def key(cfg, target="cuda"):
        return estimate_cache.key(cfg, planner._memo_key(cfg, target, ["a cat"]))

    given = key(_cfg())
    assert given and key(_cfg(budget_gb=2.0)) == given
    others = {"a field": key(_cfg(vae_checkpointing="blocks")), "the target": key(_cfg(), "cpu"),
              "the prompts": estimate_cache.key(_cfg(), planner._memo_key(_cfg(), "cuda", ["a dog"]))}
    with monkeypatch.context() as m:  # the package's files or a library's version
        m.setattr(estimate_cache, "code_identity", lambda: "another version of the package")
        others["the code"] = key(_cfg())
    # a model folder's files: by name, size and modification time
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    before = key(_cfg(model=str(model)))
    assert key(_cfg(model=str(model))) == before
    config = model / "unet" / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))  # rewritten, say
    others["a model file"] = key(_cfg(model=str(model)))
    assert len({given, before, *others.values()}) == 2 + len(others), others
    # not kept: a user's reward (it may change between commands without a file we could watch), a hub id out of
    # the local cache (the suite is offline), the cache off
    reward = tmp_path / "my_reward.py"
    reward.write_text("def score(images):\n    return images.mean(dim=(1, 2, 3))\n")
    assert key(_cfg(reward=f"{reward}:score")) is None
    assert key(_cfg(reward="brightness:1," f"{reward}:score:0.5")) is None
    assert key(_cfg(vae="nobody/no-such-vae")) is None
    monkeypatch.setenv(estimate_cache.CACHE_ENV, "off")
    assert key(_cfg()) is None


def test_the_runs_bookkeeping_changes_no_estimate(tmp_path):
    """The fields the key leaves out with the budget (planner.NOT_ESTIMATED): every one changed, the estimate is the
    same, made afresh (neither memo nor disk cache)."""
    changed = {"budget_gb": 1.5, "output_dir": str(tmp_path / "elsewhere"), "steps": 7, "eval_every": 2,
               "eval_prompts": "toy-pairs", "eval_holdout": 3, "early_stop": 4, "sample_prompts": 2,
               "sample_every": 5, "export_format": "kohya", "fidelity_images": 8, "fidelity_every": 2,
               "checkpoint_every": 1, "keep_checkpoints": 5, "auto_fit": True, "max_bad_steps": 2,
               "max_zero_grad_steps": 2, "log_every": 3}
    # report_to and push_to_hub: validated against installed trackers and the hub, so not changed here
    assert set(changed) | {"report_to", "push_to_hub"} == set(planner.NOT_ESTIMATED)
    base = _cfg()
    other = dataclasses.replace(base, **changed).validate()
    assert planner._memo_key(other, "cuda", ["a"]) == planner._memo_key(base, "cuda", ["a"])
    prompts = ["a red triangle", "a blue square"]
    assert _same(planner._estimate(base, "cuda", prompts, True), planner._estimate(other, "cuda", prompts, True))


def test_a_damaged_file_is_estimated_again_and_the_off_switch_reads_nothing(cache, monkeypatch):
    first = planner.estimate(_cfg(), target="cuda")
    (path,) = _files()
    path.write_text('{"format": 1, "estimate": {"target": "cuda", "stag')  # a half file (written by other means)
    est = planner.estimate(_cfg(), target="cuda")
    assert not est.cached and len(cache) == 2 and _same(first, est)
    assert json.loads(path.read_text())["estimate"]["peak_needed"] == first.peak_needed  # replaced
    # off: the file there is not read, and not written again
    written = path.stat().st_mtime_ns
    monkeypatch.setenv(estimate_cache.CACHE_ENV, "off")
    assert not planner.estimate(_cfg(), target="cuda").cached
    assert len(cache) == 3 and _files() == [path] and path.stat().st_mtime_ns == written


def test_the_oldest_files_go_past_the_limit(cache, monkeypatch):
    monkeypatch.setattr(estimate_cache, "MAX_FILES", 2)
    folder = estimate_cache.folder()
    folder.mkdir(parents=True)
    for i, name in enumerate(["old", "older"]):
        (folder / f"{name}.json").write_text("{}")
        os.utime(folder / f"{name}.json", ns=(10**9 * (2 - i), 10**9 * (2 - i)))
    planner.estimate(_cfg(), target="cuda")
    assert len(_files()) == 2 and (folder / "old.json").exists() and not (folder / "older.json").exists()


def test_fastest_reads_every_estimate_again_and_plan_no_cache_reads_none(cache, monkeypatch, capsys):
    """plan --fastest a second time (another budget) reads every estimate and starts no worker process for them;
    `plan --no-cache` of a configuration the cache holds estimates it afresh and writes nothing."""
    from lowmem_alignprop.cli import main
    from lowmem_alignprop.measure import fastest as module
    from lowmem_alignprop.measure.reports import format_fastest

    cfg = _cfg(sample_steps=4, k=2, batch_size=2)
    first = module.fastest(cfg, profile="rtx3060", target="cuda", max_estimates=2, jobs=1)
    assert first["from_cache"] == 0 and len(cache) == len(first["tried"]) == 2

    def no_workers():
        raise AssertionError("worker processes started for estimates the cache holds")

    monkeypatch.setattr(module, "_worker_context", no_workers)
    again = module.fastest(dataclasses.replace(cfg, budget_gb=6.0), profile="rtx3060", target="cuda",
                           max_estimates=2, jobs=2)
    assert len(cache) == 2 and again["from_cache"] == len(again["tried"]) == 2 and not again["workers_started"]
    assert [r["set"] for r in again["tried"]] == [r["set"] for r in first["tried"]]
    assert [r["needed"] for r in again["tried"]] == [r["needed"] for r in first["tried"]]
    assert f"2 configurations in {again['seconds']:.0f} s (0 estimated, 2 read from the estimate cache)" in \
        format_fastest(again)

    files = {p: p.stat().st_mtime_ns for p in _files()}
    assert main(["plan", "--profile", "rtx3060", "--model", "tiny", "--set", "resolution=64", "--set",
                 "sample_steps=4", "--set", "truncation=fixed", "--set", "k=2", "--set", "batch_size=2", "--no-suggest",
                 "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert "estimated in" in out and "estimate cache" not in out and len(cache) == 3
    assert {p: p.stat().st_mtime_ns for p in _files()} == files

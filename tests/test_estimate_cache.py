"""The estimate cache on disk (measure/estimate_cache.py): a configuration planned before is read, not estimated
again, and nothing it depends on can change without a fresh estimate."""

import dataclasses
import json
import os
import shutil

import pytest

from lowmem_alignprop.measure import estimate_cache, planner
from lowmem_alignprop.settings.config import Config


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The cache on, in a folder of this test's own; counts the estimates made (not read)."""
    monkeypatch.setenv("LOWMEM_ALIGNPROP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(estimate_cache.CACHE_ENV, "on")
    made = []
    real = planner._estimate

    def counted(cfg, *args):
        made.append(cfg)
        return real(cfg, *args)

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


def test_what_an_estimate_depends_on_makes_a_new_one(cache, monkeypatch, tiny_dir, tmp_path):
    planner.estimate(_cfg(), target="cuda")
    # a field (the key holds the in-process memo's key: every field but the budget, the target, the prompts)
    assert not planner.estimate(_cfg(vae_checkpointing="blocks"), target="cuda").cached
    assert len(cache) == len(_files()) == 2
    with monkeypatch.context() as m:  # the package's files or a library's version
        m.setattr(estimate_cache, "code_identity", lambda: "another version of the package")
        assert not planner.estimate(_cfg(), target="cuda").cached and len(cache) == 3
    # a model folder's files: by name, size and modification time
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    cfg = _cfg(model=str(model))
    planner.estimate(cfg, target="cuda")
    assert planner.estimate(cfg, target="cuda").cached and len(cache) == 4
    config = model / "unet" / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))  # rewritten, say
    assert not planner.estimate(cfg, target="cuda").cached and len(cache) == 5


def test_a_damaged_file_user_code_and_the_off_switch(cache, monkeypatch, tmp_path):
    first = planner.estimate(_cfg(), target="cuda")
    (path,) = _files()
    path.write_text('{"format": 1, "estimate": {"target": "cuda", "stag')  # a half file (written by other means)
    est = planner.estimate(_cfg(), target="cuda")
    assert not est.cached and len(cache) == 2 and _same(first, est)
    assert json.loads(path.read_text())["estimate"]["peak_needed"] == first.peak_needed  # replaced
    # a user's reward may change between commands without a file we could watch: never kept
    reward = tmp_path / "my_reward.py"
    reward.write_text("def score(images):\n    return images.mean(dim=(1, 2, 3))\n")
    planner.estimate(_cfg(reward=f"{reward}:score"), target="cuda")
    assert len(cache) == 3 and _files() == [path]
    # off: the file there is not read, and not written again
    written = path.stat().st_mtime_ns
    monkeypatch.setenv(estimate_cache.CACHE_ENV, "off")
    assert not planner.estimate(_cfg(), target="cuda").cached
    assert len(cache) == 4 and _files() == [path] and path.stat().st_mtime_ns == written


def test_the_oldest_files_go_past_the_limit(cache, monkeypatch):
    monkeypatch.setattr(estimate_cache, "MAX_FILES", 2)
    folder = estimate_cache.folder()
    folder.mkdir(parents=True)
    for i, name in enumerate(["old", "older"]):
        (folder / f"{name}.json").write_text("{}")
        os.utime(folder / f"{name}.json", ns=(10**9 * (2 - i), 10**9 * (2 - i)))
    planner.estimate(_cfg(), target="cuda")
    assert len(_files()) == 2 and (folder / "old.json").exists() and not (folder / "older.json").exists()


def test_plan_no_cache_and_fastest_read_from_the_cache(cache, monkeypatch, capsys):
    """The command: --no-cache writes nothing; plan --fastest a second time (another budget) reads every estimate
    and starts no worker process for them."""
    from lowmem_alignprop.cli import main
    from lowmem_alignprop.measure.fastest import fastest
    from lowmem_alignprop.measure.reports import format_fastest

    assert main(["plan", "--profile", "rtx3060", "--model", "tiny", "--set", "resolution=64", "--set",
                 "sample_steps=2", "--set", "k=1", "--no-suggest", "--no-cache"]) == 0
    assert "estimated in" in capsys.readouterr().out and _files() == [] and len(cache) == 1
    monkeypatch.setenv(estimate_cache.CACHE_ENV, "on")  # --no-cache set it off for the process

    cfg = _cfg(sample_steps=4, k=2, batch_size=2)
    first = fastest(cfg, profile="rtx3060", target="cuda", max_estimates=3, jobs=1)
    made = len(cache)
    assert first["from_cache"] == 0 and made == 1 + len(first["tried"]) == 4
    from lowmem_alignprop.measure import fastest as module

    def no_workers():
        raise AssertionError("worker processes started for estimates the cache holds")

    monkeypatch.setattr(module, "_worker_context", no_workers)
    again = fastest(dataclasses.replace(cfg, budget_gb=6.0), profile="rtx3060", target="cuda", max_estimates=3,
                    jobs=2)
    assert len(cache) == made and again["from_cache"] == len(again["tried"]) == 3
    assert [r["set"] for r in again["tried"]] == [r["set"] for r in first["tried"]]
    assert [r["needed"] for r in again["tried"]] == [r["needed"] for r in first["tried"]]
    assert not again["workers_started"]
    assert f"3 configurations estimated in {again['seconds']:.0f} s; 3 read from the estimate cache" in \
        format_fastest(again)

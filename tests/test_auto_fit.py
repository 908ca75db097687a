"""Every --auto-fit rung takes effect in the live run, not only in its config.

Each test trains three steps of the tiny model with ``--auto-fit``; step 2 runs out of memory (the test hook) and
the planner's suggestion (a stand-in here) is one rung. Hooks on the run's own modules record what the run did in
step 1 (before the rung) and step 3 (after it), and the test checks that behaviour changed: more recomputation,
smaller decode calls, the text encoder left alone, offloaded modules, and so on.
"""

import collections
import sys
from pathlib import Path

import pytest
import torch

import lowmem_alignprop.rewards as rewards_pkg
import lowmem_alignprop.training.train as train_mod
import lowmem_alignprop.training.train_setup as train_setup
from lowmem_alignprop.run import faults
from lowmem_alignprop.measure import fit_changes, planner
from lowmem_alignprop.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from midsize import build_clip_reward_dir  # noqa: E402
from refusals import strict_rows  # noqa: E402

FAST = ["--profile", "cpu", "--seed", "1", "--set", "sample_prompts=0", "--set", "sample_steps=3", "--set", "k=1",
        "--steps", "3", "--auto-fit"]


class Recorder:
    """Events per training step (0: set-up), counted by hooks on the run's modules."""

    def __init__(self):
        self.guard = None
        self.events: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        self.shapes: dict[int, list] = collections.defaultdict(list)
        self.place = None
        self.place_events: dict[int, list] = collections.defaultdict(list)
        self.fits: list[dict] = []

    @property
    def step(self) -> int:
        return self.guard.step if self.guard is not None else 0

    def count(self, name: str):
        def hook(module, args, kwargs=None):
            self.events[self.step][name] += 1
        return hook

    def shape(self, name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            self.shapes[self.step].append((name, tuple(x.shape)))
        return hook

    def before(self, step: int) -> collections.Counter:
        return self.events[step]


@pytest.fixture
def recorded(monkeypatch, tiny_dir):
    """Run the tiny model with ``sets``, a rung ``change`` applied after the OOM at step 2; returns the Recorder."""
    rec = Recorder()

    class Guard(faults.StageGuard):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            rec.guard = self

    real_place = train_setup.Placement

    class Place(real_place):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            rec.place = self

        def _move(self, name, target, modules):
            super()._move(name, target, modules)
            rec.place_events[rec.step].append((name, target))

    real_load = train_setup.load_components

    def load_components(cfg, dtype, device=None, **kwargs):
        comps = real_load(cfg, dtype, device, **kwargs)
        unet, vae = comps.unet, comps.vae
        unet.register_forward_pre_hook(rec.shape("unet"), with_kwargs=True)
        attn = next(m for n, m in unet.named_modules() if n.endswith("attn1"))
        attn.register_forward_pre_hook(lambda m, a: rec.shapes[rec.step].append(("processor",
                                                                                 type(m.processor).__name__)))
        vae.decoder.register_forward_pre_hook(rec.shape("decoder"), with_kwargs=True)
        vae.decoder.up_blocks[0].register_forward_pre_hook(rec.count("vae_block"))
        # a resnet checkpointed by lowmem_alignprop recomputes through its forward directly: count a module inside it
        vae.decoder.up_blocks[0].resnets[0].conv1.register_forward_pre_hook(rec.count("vae_resnet"))
        comps.text_encoder.register_forward_pre_hook(rec.count("text_encoder"))
        return comps

    real_reward = rewards_pkg.build_reward

    def build_reward(*a, **k):
        reward = real_reward(*a, **k)
        for m in reward.modules():
            if type(m).__name__.endswith("EncoderLayer"):  # (checkpointed whole: count a layer inside it)
                inner = next(c for c in m.modules() if isinstance(c, torch.nn.Linear))
                inner.register_forward_pre_hook(rec.count("reward_layer"))
        return reward

    def run(tmp_path, sets: list[str], change: dict, reward: list[str] = ()):
        def next_feature(cfg, target, stage=None):
            rec.fits.append(change)
            return "the rung under test", change

        monkeypatch.setattr(faults, "StageGuard", Guard)
        monkeypatch.setattr(train_setup, "Placement", Place)
        monkeypatch.setattr(train_setup, "load_components", load_components)
        monkeypatch.setattr(rewards_pkg, "build_reward", build_reward)
        monkeypatch.setattr(planner, "next_feature", next_feature)
        monkeypatch.setenv(faults.INJECT_ENV, "encode_prompts@2")
        out = tmp_path / "run"
        assert main([*FAST, *reward, *sets, "--model", str(tiny_dir), "--output-dir", str(out)]) == 0
        assert rec.fits == [change]  # the rung was applied once, at step 2
        return rec

    run.rec = rec
    return run


def shapes(rec: Recorder, step: int, name: str) -> list:
    return [s for n, s in rec.shapes[step] if n == name]


def test_batch_rung_halves_the_micro_batch(recorded, tmp_path):
    rec = recorded(tmp_path, ["--set", "batch_size=2"], {"batch_size": 1, "grad_accum": 2})
    assert {s[0] for s in shapes(rec, 1, "decoder")} == {2}
    assert {s[0] for s in shapes(rec, 3, "decoder")} == {1} and len(shapes(rec, 3, "decoder")) == 2


def test_vae_blocks_rung_recomputes_the_decoder_blocks(recorded, tmp_path):
    rec = recorded(tmp_path, ["--set", "vae_checkpointing=none"], {"vae_checkpointing": "blocks"})
    assert rec.events[3]["vae_block"] == 2 * rec.events[1]["vae_block"] > 0


def test_vae_resnets_rung_recomputes_each_resnet(recorded, tmp_path):
    rec = recorded(tmp_path, ["--set", "vae_checkpointing=blocks"], {"vae_checkpointing": "resnets"})
    assert rec.events[3]["vae_resnet"] > rec.events[1]["vae_resnet"] > 0


def test_unet_blocks_rung_checkpoints_inside_the_unet(recorded, tmp_path, monkeypatch):
    # inside the per-call checkpoint a block's recompute is part of the call's, so count the checkpoints the UNet's
    # blocks open (a block module's call; the rollout's own per-call one checkpoints a function, not counted)
    opened = collections.Counter()
    real = torch.utils.checkpoint.checkpoint

    def counting(fn, *args, **kwargs):
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, torch.nn.Module) and "Block" in type(owner).__name__:
            opened[recorded.rec.step] += 1
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    recorded(tmp_path, ["--set", "unet_checkpointing=call", "--set", "vae_checkpointing=none"],
             {"unet_checkpointing": "blocks"})
    assert opened[1] == 0 and opened[3] > 0


def test_reward_checkpointing_rung_recomputes_the_reward_model(recorded, tmp_path):
    clip = build_clip_reward_dir(tmp_path / "clip", width=32, layers=2, image_size=64)
    rec = recorded(tmp_path, ["--set", "reward_checkpointing=false"], {"reward_checkpointing": True},
                   reward=["--reward", "clip", "--set", f"reward_weights={clip}"])
    assert rec.events[3]["reward_layer"] > rec.events[1]["reward_layer"] > 0


def test_sliced_decode_rung_decodes_one_image_at_a_time(recorded, tmp_path):
    rec = recorded(tmp_path, ["--set", "batch_size=2", "--set", "sliced_decode=false"], {"sliced_decode": True})
    assert [s[0] for s in shapes(rec, 1, "decoder")] == [2]
    assert [s[0] for s in shapes(rec, 3, "decoder")] == [1, 1]


def test_tiled_decode_rung_decodes_in_tiles(recorded, tmp_path):
    rec = recorded(tmp_path, ["--set", "tile_size=6", "--set", "tile_overlap=1"],
                   {"tiled_decode": True, "sliced_decode": False})
    full = shapes(rec, 1, "decoder")
    tiles = shapes(rec, 3, "decoder")
    assert len(full) == 1 and len(tiles) > 1 and all(t[-1] < full[0][-1] for t in tiles)


def test_cache_prompts_rung_leaves_the_text_encoder_alone(recorded, tmp_path):
    rec = recorded(tmp_path, ["--set", "cache_prompt_embeddings=false"], {"cache_prompt_embeddings": True})
    assert rec.events[1]["text_encoder"] > 0  # encoded its batch
    assert rec.events[2]["text_encoder"] > 0 and rec.events[3]["text_encoder"] == 0  # cached once, then no more
    assert ("text_encoder", "cpu") in rec.place_events[2]  # and the encoder left the device


def test_offload_frozen_rung_parks_idle_modules_on_the_cpu(recorded, tmp_path):
    rec = recorded(tmp_path, ["--set", "offload_frozen=false"], {"offload_frozen": True})
    assert not any(target == "cpu" for name, target in rec.place_events[1] if name in ("vae", "reward"))
    assert ("vae", "cpu") in rec.place_events[3] and ("vae", "device") in rec.place_events[3]


def test_attention_rung_switches_the_attention_processor(recorded, tmp_path):
    rec = recorded(tmp_path, ["--set", "attention=sdpa"], {"attention": "sliced"})
    before, after = set(shapes(rec, 1, "processor")), set(shapes(rec, 3, "processor"))
    assert before and after and before != after and all("Sliced" in p for p in after)


def test_activation_offload_rung_saves_tensors_on_the_cpu(recorded, tmp_path, monkeypatch):
    saved = collections.Counter()
    real = torch.autograd.graph.save_on_cpu

    class Recording(real):  # what the run hands to autograd: count the tensors it sends to the CPU, per step
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            pack = self.pack_hook

            def counting(t):
                saved[recorded.rec.step] += 1
                return pack(t)
            self.pack_hook = counting

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Recording)
    recorded(tmp_path, ["--set", "vae_checkpointing=blocks", "--set", "activation_offload=false"],
             {"activation_offload": True})
    assert saved[1] == 0 and saved[3] > 0


def test_expandable_segments_rung_is_covered_in_test_faults():
    """The allocator rung switches the live allocator: test_faults.py's
    test_auto_fit_can_switch_the_allocator_to_expandable_segments runs it through a step."""
    import test_faults
    assert hasattr(test_faults, "test_auto_fit_can_switch_the_allocator_to_expandable_segments")


def test_every_rung_has_a_test():
    """The ladder's rungs and the planner's live changes all appear above."""
    covered = {"batch_size", "grad_accum", "vae_checkpointing", "unet_checkpointing", "reward_checkpointing",
               "sliced_decode", "tiled_decode", "cache_prompt_embeddings", "offload_frozen", "attention",
               "activation_offload", "expandable_segments",
               "block_swap"}  # in tests/test_block_swap*.py: a run with it (gradients, placement), the suggestion
    from lowmem_alignprop.settings.config import Config
    cfg = Config(batch_size=4, sample_steps=10, k=1, cache_prompt_embeddings=False, expandable_segments=False,
                 unet_checkpointing="call", resolution=512)
    ladder = set().union(*(set(fix(cfg).overrides) for fix in faults.LADDER.values()
                           if fix(cfg) is not None))
    live = {k for _, change in fit_changes.candidate_changes(cfg, "cuda")
            if not {"resolution", "base_quant", "optimizer"} & set(change) for k in change}
    assert ladder | live <= covered, (ladder | live) - covered


# ---------------------------------------------------------------------------------------------------
# --auto-fit before the first step: plan --fastest's choice for the detected card
# ---------------------------------------------------------------------------------------------------
HEAVY = ["--set", "unet_checkpointing=blocks", "--set", "vae_checkpointing=resnets", "--set", "sliced_decode=true"]


def test_auto_fit_applies_plan_fastest_before_the_first_step(tmp_path, monkeypatch, capsys, tiny_dir):
    """On a (faked) RTX 3060 the run trains plan --fastest's choice: every recompute the 8 GiB budget does not need
    dropped, printed as flags and recorded in config.yaml with where it came from. Planned first, the run's search
    reads every estimate from the estimate cache."""
    import json

    import yaml

    from lowmem_alignprop.settings import profiles

    monkeypatch.setattr(profiles, "detect_card", lambda: ("NVIDIA GeForce RTX 3060", 8.0))
    monkeypatch.setenv("LOWMEM_ALIGNPROP_PLAN_CACHE", "on")
    given = ["--profile", "cpu", "--seed", "1", "--set", "sample_prompts=0", "--set", "sample_steps=3", "--set", "k=1",
             *HEAVY]
    assert main(["plan", "--fastest", "--json", "--device", "cuda", "--set", "card=rtx3060-8gb", *given]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["found"] is not None and planned["set"]
    typed = planned["provenance"]  # what produced the choice: the command as typed, date, machine, versions
    assert typed["command"].startswith("lowmem-alignprop plan --fastest --json --device cuda --set card=rtx3060-8gb")
    assert typed["date"] and typed["device"]["cores"] >= 1 and typed["versions"]["torch"]
    out = tmp_path / "run"
    assert main([*given, "--steps", "2", "--auto-fit", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())
    search = saved["auto_fit_search"]
    assert search["set"] == planned["set"] and search["timed_as"] == "rtx3060-8gb"  # an 8 GB RTX 3060: 240 GB/s
    assert search["source"].startswith("plan --fastest") and search["budget_gb"] == 8
    for key, value in planned["set"].items():  # the run trained with the choice...
        assert saved[key] == value, key
    assert saved["unet_checkpointing"] == "call" and saved["vae_checkpointing"] == "none"  # ...which drops them
    assert search["seconds_per_step"] == pytest.approx(planned["found"]["seconds"])
    assert search["estimates_from_cache"] == search["estimates"] == len(planned["tried"]) > 1  # planned before
    assert search["seconds_per_step"] < search["given_seconds_per_step"]
    assert f"auto-fit: {search['flags']}" in printed and "--set unet_checkpointing=call" in search["flags"]
    rows = strict_rows(out)
    assert [r["step"] for r in rows] == [1, 2]


def test_auto_fit_says_when_its_choice_turns_tiled_decode_on(monkeypatch, capsys):
    """--auto-fit's search may choose tiled_decode, the one approximate memory feature: said under its flags, as plan
    --fastest says it (its own line said only the flags)."""
    import dataclasses

    from lowmem_alignprop.measure import fastest
    from lowmem_alignprop.settings import profiles
    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.training.train import search_before_first_step

    cfg = Config(model="tiny", budget_gb=8.0)
    record = {"flags": "--set tiled_decode=true", "seconds_per_step": 1.0, "timed_as": "rtx3060-8gb",
              "given_seconds_per_step": 2.0, "given_fits": False, "needed_gb": 7.0}
    monkeypatch.setattr(profiles, "detect_card", lambda: ("NVIDIA GeForce RTX 3060", 8.0))
    for tiled in (True, False):
        chosen = dataclasses.replace(cfg, tiled_decode=tiled)
        monkeypatch.setattr(fastest, "before_first_step", lambda *a, chosen=chosen, **k: (chosen, dict(record)))
        assert search_before_first_step(cfg, "rtx3060")[0] is chosen
        said = [line for line in capsys.readouterr().out.splitlines() if "approximate" in line]
        assert said == (["auto-fit: tiled_decode is approximate: the VAE's GroupNorm and mid-block attention see one "
                         "tile, so the images and LoRA gradients differ a little, most at the seams (docs/design.md "
                         "section 3)"] if tiled else [])


def test_auto_fit_without_a_card_or_a_fit_trains_as_configured(monkeypatch, tiny_dir, caplog):
    import logging

    from lowmem_alignprop.training import train
    from lowmem_alignprop.measure import fastest
    from lowmem_alignprop.settings.config import Config

    cfg = Config(model=str(tiny_dir), budget_gb=0.01, card="rtx3060").validate()
    same, record = fastest.before_first_step(cfg, profile="custom", detected=None)
    assert same is cfg and "no CUDA card" in record["skipped"]
    # a run on the CPU says so (it said nothing, and ended over its budget)
    monkeypatch.setattr("lowmem_alignprop.settings.profiles.detect_card", lambda: None)
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert train.search_before_first_step(cfg, "custom")[0] is cfg
    assert "auto-fit: no CUDA card: the search plans for the card a run trains on; this run trains as configured" \
        in caplog.text
    canned = {"given": {"seconds": 1.0, "fits": False}, "found": None, "tried": [{}] * 3, "from_cache": 0,
              "device": "rtx3060", "seconds": 0.5, "plan": {"suggestion": {"set": {"base_quant": "nf4"}}}}
    monkeypatch.setattr(fastest, "fastest", lambda *a, **k: canned)
    same, record = fastest.before_first_step(cfg, profile="custom", detected=("NVIDIA GeForce RTX 3060", 8.0))
    assert same is cfg and record["skipped"].startswith("nothing") and record["cheapest_change"] == \
        "--set base_quant=nf4" and record["estimates"] == 3


def test_profile_auto_takes_the_detected_cards_budget(monkeypatch):
    from lowmem_alignprop.measure.devices import DEVICES, card_row
    from lowmem_alignprop.settings import profiles

    monkeypatch.setattr(profiles, "detect_card", lambda: ("NVIDIA GeForce RTX 4090", 23.65))
    name, cfg = profiles.resolve_config("auto", {}, [])
    assert name == "rtx4090" and cfg.budget_gb == 22.4  # 23.65 GiB less 5%, rounded down to 0.1
    monkeypatch.setattr(profiles, "detect_card", lambda: ("NVIDIA A100-SXM4-80GB", 79.2))
    assert profiles.resolve_config("auto", {}, [])[1].budget_gb == 75.2
    monkeypatch.setattr(profiles, "detect_card", lambda: None)
    name, cfg = profiles.resolve_config("auto", {}, [])
    assert name == "cpu" and cfg.budget_gb == 8  # the cpu profile's own
    assert profiles.card_budget(7.79) == 7.2 and profiles.card_budget(0.8) == 0.3  # at least 0.5 GiB kept back
    rows = [card_row(p, m) for p, m in (("NVIDIA GeForce RTX 3060", 11.8), ("NVIDIA GeForce RTX 3060 Laptop GPU",
            6.0), ("NVIDIA A100-PCIE-40GB", 39.4), ("NVIDIA A100 80GB PCIe", 79.2), ("NVIDIA H100 80GB HBM3", 79.2),
            ("NVIDIA H200", 139.8), ("Tesla T4", 15.0), ("NVIDIA GeForce RTX 3060", 7.8))]
    assert rows == ["rtx3060", "laptop", "a100-40gb", "a100-80gb", "h100", "h200", "", "rtx3060-8gb"]
    assert all(r in DEVICES for r in rows if r)


def test_auto_fit_search_that_fails_leaves_the_run_as_configured(monkeypatch, tiny_dir):
    from lowmem_alignprop.measure import fastest
    from lowmem_alignprop.settings import profiles
    from lowmem_alignprop.settings.config import Config

    def broken(*a, **k):
        raise RuntimeError("a model the planner cannot fake\nmore")

    monkeypatch.setattr(profiles, "detect_card", lambda: ("NVIDIA GeForce RTX 4090", 23.65))
    monkeypatch.setattr(fastest, "fastest", broken)
    cfg = Config(model=str(tiny_dir), budget_gb=8.0).validate()
    same, record = train_mod.search_before_first_step(cfg, "custom")
    assert same is cfg and record == {"skipped": "the search failed: RuntimeError: a model the planner cannot fake"}

"""Hardware profiles: every shipped one loads, validates and is what a run records; user profiles;
``auto``; and impossible configurations failing at startup, before any model loads."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import types

import pytest
import torch
import yaml

import lowmem_alignprop.models.loading as models_mod
import lowmem_alignprop.training.train as train_mod
import lowmem_alignprop.training.train_setup as train_setup
from lowmem_alignprop.cli import main
from lowmem_alignprop.settings.config import Config, build_config
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.profiles import AUTO_LADDER, card_budget, describe, load_profile, resolve_config, \
    shipped_profiles

SHIPPED = sorted(shipped_profiles())
GPU_SHIPPED = [name for name in SHIPPED if name != "cpu"]
# Fields that decide memory: each must carry a comment in a shipped profile saying what it saves or costs.
MEMORY_FIELDS = ("budget_gb", "mixed_precision", "attention", "optimizer", "unet_checkpointing", "vae_checkpointing",
                 "reward_checkpointing", "sliced_decode", "tiled_decode", "cache_prompt_embeddings", "offload_frozen",
                 "activation_offload", "base_quant", "deepspeed_zero", "offload", "train_unet")
# What a CPU cannot run from a GPU profile, set to tiny values so one training step takes seconds.
CPU_OVERRIDES = {"resolution": 32, "sample_steps": 3, "k": 1, "k_min": 1, "k_max": 2, "batch_size": 1,
                 "grad_accum": 1, "mixed_precision": "no", "base_quant": "none", "steps": 1, "sample_prompts": 0,
                 "block_swap": 2}  # the flow profiles swap 19-49 transformer blocks: the tiny UNet swaps 2 units


def test_shipped_profiles_are_the_ladder():
    assert {"cpu", "rtx3060", "rtx4090", "a100-40gb", "a100-80gb"} <= set(SHIPPED)
    assert {name for name, _ in AUTO_LADDER} <= set(SHIPPED)


def test_every_shipped_profile_names_its_card_and_the_models_it_is_made_for():
    from lowmem_alignprop.measure.devices import DEVICES
    from lowmem_alignprop.settings.profiles import MODEL_KINDS, PROFILE_TARGETS

    assert set(PROFILE_TARGETS) == set(SHIPPED)  # a new profile file needs its line in the table
    for name, (card, kinds) in PROFILE_TARGETS.items():
        assert card in DEVICES, name  # the row that times its plans
        assert kinds is None or set(kinds) <= set(MODEL_KINDS), name
        suffix = name.rsplit("-", 1)[-1]
        if suffix in MODEL_KINDS:  # rtx3060-sdxl, rtx4090-flux: the name says the model
            assert kinds == (suffix,), name


def test_block_swap_beyond_the_models_blocks_fails_at_startup_naming_the_profile_made_for_it(capsys):
    """block_swap larger than an SD3/FLUX model's block count fails as the config is validated (its files tell), before
    anything loads; when the profile is made for another model, the line says that first and names this model's."""
    from lowmem_alignprop.cli import main
    from lowmem_alignprop.settings.errors import UserError
    from lowmem_alignprop.settings.model_kind import flow_block_count
    from lowmem_alignprop.settings.profiles import resolve_config

    assert (flow_block_count("flux"), flow_block_count("sd35m"), flow_block_count("sd35l")) == (57, 24, 38)
    assert flow_block_count("sd15") is None and flow_block_count("tiny") is None
    with pytest.raises(UserError, match=r"^block_swap=58 but the model has 57 blocks: use --set block_swap=57 or "
                                        r"fewer$"):
        resolve_config("rtx3060-flux", {}, ["model=flux", "block_swap=58"])
    assert resolve_config("rtx3060-flux", {}, ["model=flux", "block_swap=57"])[1].block_swap == 57
    assert main(["plan", "--profile", "rtx3060-flux", "--model", "sd35m"]) == 2  # the FLUX profile swaps 41 blocks
    err = capsys.readouterr().err
    assert err == ("error: profile rtx3060-flux is made for FLUX.1, not SD3.5 Medium; for SD3.5 Medium on "
                   "rtx3060-class cards: --profile rtx3060-sd35m (7 GiB budget); under rtx3060-flux: block_swap=41 "
                   "but the model has 24 blocks: use --set block_swap=24 or fewer\n"), err
    # a UNet's blocks are counted once it is built (the toy model has 17: its checkpointed resnets and transformer
    # blocks, not its 2 downsamplers, 2 upsamplers nor the mid block's first resnet): the plan and the run say the
    # profile first too (they said only to lower block_swap, of a profile made for another model)
    assert main(["plan", "--profile", "rtx3060-flux", "--model", "toy"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: profile rtx3060-flux is made for FLUX.1, not SD 1.x/2.x; for SD 1.x/2.x on "
                          "rtx3060-class cards: --profile rtx3060 (7.5 GiB budget); under rtx3060-flux: block_swap=41 "
                          "but the model has 17 blocks: use --set block_swap=17 or fewer\n"), err


def test_a_profile_made_for_another_model_names_this_cards_profiles_for_it():
    from lowmem_alignprop.models.family import model_kind
    from lowmem_alignprop.settings.profiles import profile_note

    assert profile_note("rtx3060", "sdxl") == ("profile rtx3060 is made for SD 1.x/2.x, not SDXL; for SDXL on "
                                               "rtx3060-class cards: --profile rtx3060-sdxl (7 GiB budget)")
    assert profile_note("rtx3060-flux", "sd") == ("profile rtx3060-flux is made for FLUX.1, not SD 1.x/2.x; for SD "
                                                  "1.x/2.x on rtx3060-class cards: --profile rtx3060 (7.5 GiB budget)")
    assert "--profile rtx4090-flux (22 GiB budget)" in profile_note("rtx4090", "flux")
    assert profile_note("laptop-6gb", "flux") == ("profile laptop-6gb is made for SD 1.x/2.x, not FLUX.1; no shipped "
                                                  "profile is made for FLUX.1 on laptop-class cards")
    # made for it, or for any model (the A100s, cpu, a user's own YAML): nothing to say
    assert profile_note("rtx4090", "sdxl") is None and profile_note("rtx3060", "sd") is None
    assert profile_note("a100-40gb", "flux") is None and profile_note("custom", "flux") is None
    assert profile_note("cpu", "sdxl") is None
    comps = types.SimpleNamespace  # what model_kind reads of loaded components
    assert model_kind(comps(family="unet", is_sdxl=False)) == "sd"
    assert model_kind(comps(family="unet", is_sdxl=True)) == "sdxl"
    assert model_kind(comps(family="flux")) == "flux"
    assert model_kind(comps(family="sd3", unet=comps(config={"num_layers": 38}))) == "sd35l"
    assert model_kind(comps(family="sd3", unet=comps(config={"num_layers": 24}))) == "sd35m"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads_validates_and_states_its_budget(name):
    loaded_name, values = load_profile(name)
    assert loaded_name == name and values
    cfg = build_config(values, {}, {})
    assert isinstance(cfg, Config)
    for key, value in values.items():
        assert getattr(cfg, key) == value
    assert values.get("budget_gb", 0) > 0  # every profile states the memory it must fit
    assert describe(shipped_profiles()[name])  # a first comment line says what card it is for
    assert "model" not in values and "output_dir" not in values


@pytest.mark.parametrize("name", SHIPPED)
def test_every_memory_field_in_a_shipped_profile_is_commented(name):
    missing = []
    for line in shipped_profiles()[name].read_text().splitlines():
        if line.startswith("#") or ":" not in line:
            continue
        key = line.split(":", 1)[0].strip()
        if key in MEMORY_FIELDS and "#" not in line.split(":", 1)[1]:
            missing.append(key)
    assert not missing, f"{name}.yaml: no comment on {missing}"


# ------------------------------------------------------------------------------------------------------
# the resolved configuration of each profile is what a run writes to config.yaml, and what it applies
# ------------------------------------------------------------------------------------------------------


@pytest.fixture
def applied(monkeypatch):
    """What train() actually did with the memory features: the components after apply_memory_features
    and the Placement it used."""
    seen: dict = {}
    real_apply, real_placement = train_setup.apply_memory_features, train_setup.Placement

    def apply_memory_features(comps, cfg, device, dtype, **kwargs):
        out = real_apply(comps, cfg, device, dtype, **kwargs)
        seen["comps"], seen["attention"] = comps, out[1]
        return out

    class Placement(real_placement):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["place"] = self

    monkeypatch.setattr(train_setup, "apply_memory_features", apply_memory_features)
    monkeypatch.setattr(train_setup, "Placement", Placement)
    return seen


@pytest.mark.parametrize("name", SHIPPED)
def test_profile_resolved_config_is_written_and_applied(name, tiny_dir, tmp_path, applied):
    _, values = load_profile(name)
    overrides = {k: v for k, v in CPU_OVERRIDES.items() if k in values or k in ("steps", "sample_prompts")}
    unread = ("k_min", "k_max") if values.get("truncation", "fixed") == "fixed" else ("k",)  # (refused if given)
    overrides = {k: v for k, v in overrides.items() if k not in unread}
    if values.get("tiled_decode"):  # the profile's tiles are sized for 512-1024 px; keep 2x2 tiles on 16 latents
        overrides.update(tile_size=10, tile_overlap=2)
    cfg = build_config(values, {"model": str(tiny_dir), "output_dir": str(tmp_path / "run")}, overrides)
    train_mod.train(cfg, profile_name=name)

    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written.pop("profile") == name
    assert written == cfg.to_dict()  # the whole resolved configuration, nothing else
    kept = {k: v for k, v in values.items() if k not in overrides and k not in unread}  # (sample_steps ends those)
    assert {"vae_checkpointing", "unet_checkpointing"} <= set(kept)
    for key, value in kept.items():
        assert written[key] == value, key  # the profile's own values, where nothing overrode them
    for key, value in overrides.items():
        assert written[key] == value, key

    # and the run applied them
    comps = applied["comps"]
    assert comps.unet.is_gradient_checkpointing == (cfg.unet_checkpointing == "blocks")
    assert comps.vae.decoder.gradient_checkpointing == (cfg.vae_checkpointing == "blocks")
    resnets = list(comps.vae.decoder.up_blocks[0].resnets)
    assert all(getattr(m, "_lowmem_ckpt", False) for m in resnets) == (cfg.vae_checkpointing == "resnets")
    assert applied["place"].offload_enabled == cfg.offload_frozen
    assert applied["attention"] == ("sdpa" if cfg.attention == "xformers" else cfg.attention)


# ------------------------------------------------------------------------------------------------------
# user profiles
# ------------------------------------------------------------------------------------------------------


def _write(tmp_path, text: str, name="my.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_profile_file_named_relative_is_recorded_absolute_and_a_resume_naming_it_so_is_the_same(tmp_path,
                                                                                                      monkeypatch,
                                                                                                      caplog):
    """--profile "../mine é.yaml" was recorded as typed (config.yaml's profile, the model card's profile row): from
    any other folder it named nothing. It is recorded absolute; a resume given the same file by its relative name is
    the run's own profile, not another one applied on top of the run's settings."""
    _write(tmp_path, "budget_gb: 4\nresolution: 32\n", "mine é.yaml")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    name, cfg = resolve_config("../mine é.yaml", {}, [])
    assert (name, cfg.budget_gb) == (str(tmp_path / "mine é.yaml"), 4.0)
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        again, resumed = resolve_config("../mine é.yaml", {}, ["lr=0.5"], resumed=(name, {**cfg.to_dict(), "k": 1}))
    assert (again, resumed.k, resumed.lr) == (name, 1, 0.5)
    assert "applies on top" not in caplog.text


def test_user_profile_path_trains_and_is_recorded(tiny_dir, tmp_path):
    path = _write(tmp_path, "# my laptop\nbudget_gb: 4\nresolution: 32\nsample_steps: 3\nk: 2\nbatch_size: 1\n"
                            "vae_checkpointing: blocks   # less memory in backward\nsliced_decode: true\n"
                            "unet_checkpointing: blocks\nsample_prompts: 0\n")
    out = tmp_path / "run"
    assert main(["--profile", str(path), "--output-dir", str(out), "--steps", "1", "--set", "k=1"]) == 0
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["profile"] == str(path)
    assert (written["budget_gb"], written["resolution"], written["vae_checkpointing"], written["sliced_decode"],
            written["unet_checkpointing"]) == (4.0, 32, "blocks", True, "blocks")
    assert written["k"] == 1  # --set overrides the profile
    assert written["lr"] == Config().lr  # what the profile leaves out keeps the default


def test_a_cpu_run_config_from_before_the_cpu_profiles_card_plans_for_the_cpu(tmp_path):
    """A run on the cpu profile before it named its card (2026-12-05) recorded card '' in config.yaml: plan --profile
    RUN/config.yaml planned it for a CUDA card ('target cuda', no seconds). It plans for the CPU, as a run today's
    version records does; a GPU profile's run (whose profile names no card) keeps its ''."""
    from lowmem_alignprop.measure.planner import default_target

    for profile, card, target in (("cpu", "cpu", "cpu"), ("rtx3060", "", "cuda")):
        record = {"profile": profile, **Config(card="").to_dict(), "output_dir": str(tmp_path / profile)}
        name, values = load_profile(str(_write(tmp_path, yaml.safe_dump(record), f"{profile}.yaml")))
        assert values["card"] == card
        assert default_target(name, values["card"]) == target


def test_a_run_config_with_an_older_relative_path_given_as_profile_from_another_folder_is_one_line(
        tmp_path, monkeypatch, capsys):
    """plan --profile RUN/config.yaml of a run before 2026-12-05, which recorded its VAE or reward file relative to
    the folder it started in, from another folder: it said 'profile RUN/config.yaml: vae=vaedir does not exist: pass a
    diffusers VAE folder ...' or 'reward ...: rw/r.py is not a file', not why. It names the run's record and the fix;
    the path given on the command line plans."""
    import lowmem_alignprop.commands.plan_cmd as plan_cmd

    planned = []
    monkeypatch.setattr(plan_cmd, "plan_main", lambda cfg, *a, **k: planned.append(cfg) or 0)
    here = tmp_path / "elsewhere"
    here.mkdir()
    monkeypatch.chdir(here)
    for key, value, fix in (("vae", "vaedir", "--set vae=PATH"), ("reward", "rw/r.py:score", "--reward PATH:score")):
        record = {"profile": "cpu", **Config(model="tiny").to_dict(), "output_dir": str(tmp_path / "run"), key: value}
        config = _write(tmp_path, yaml.safe_dump(record), "config.yaml")
        assert main(["plan", "--profile", str(config)]) == 2
        path = value.split(":")[0]
        whose = "," if path == value else f", whose {path} is"
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: --profile {config}: its run was trained with {key}={value} (its config.yaml){whose} a path "
            "relative to the folder its run started in (a run before 2026-12-05), not found from here: run the "
            f"command in that folder, or give it from here with {fix}")
    assert main(["plan", "--profile", str(config), "--reward", "brightness"]) == 0
    assert planned[-1].reward == "brightness"


@pytest.mark.parametrize("text, needles", [
    ("budget_gb: 8\nsliced_decode: [true\n", ["not valid YAML at line", "fix the file"]),
    ("budget_gb: 8\nvae_checkpoint: blocks\n",
     ["unknown config key 'vae_checkpoint'", "did you mean vae_checkpointing"]),
    ("STEPS: 3\n", ["unknown config key 'STEPS' (did you mean steps?)"]),  # (case alone: it said no near miss)
    ("sliced_decode: maybe\n", ["sliced_decode must be true or false, got 'maybe'"]),
    ("batch_size: two\n", ["batch_size must be a whole number, got 'two'"]),
    ("lr: fast\n", ["lr must be a number"]),
    ("attention: flash\n", ["attention='flash' is not one of sdpa, xformers, sliced", "--set attention=sdpa"]),
    ("- budget_gb: 8\n", ["must be a mapping of `field: value` lines"]),
    ("model: /some/model\n", ["profiles choose memory features, not paths", "--model"]),
])
def test_bad_user_profile_is_one_line_naming_the_fix(tmp_path, capsys, text, needles, monkeypatch):
    _forbid_model_loading(monkeypatch)
    path = _write(tmp_path, text)
    out = tmp_path / "run"
    assert main(["--profile", str(path), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()


_NOT_A_SIZE = "is not an image size: give its side in pixels (--set resolution=1024) or its width x height (--set " \
    "resolution=1216x832)"


@pytest.mark.parametrize("written, line", [
    ("0x512", "resolution=0x512 is too small: each side 8 px or more, e.g. --set resolution=1216x832"),
    ("0X512", "resolution=0x512 is too small: each side 8 px or more, e.g. --set resolution=1216x832"),
    ("1_024", f"resolution='1_024' {_NOT_A_SIZE}"), ("0b1000000000", f"resolution='0b1000000000' {_NOT_A_SIZE}"),
    ("8:32", f"resolution='8:32' {_NOT_A_SIZE}"),
    ("0777", "resolution=777 must be a multiple of 8: use --set resolution=776")])
def test_bad_input_a_profiles_resolution_that_yaml_reads_as_another_number_is_the_set_values_line(
        written, line, tmp_path, capsys, monkeypatch):
    """YAML 1.1 reads `resolution: 0x512` as hex 1298 (and 0777 as octal 511, 1_024 as 1024, 8:32 as base-60 512):
    the profile got "resolution=1298 must be a multiple of 8: use --set resolution=1296", of a size the user never
    wrote. A profile's resolution is read as written: the line --set resolution=... gives, under the profile's name."""
    _forbid_model_loading(monkeypatch)
    path, out = _write(tmp_path, f"resolution: {written}\n"), tmp_path / "run"
    assert main(["--profile", str(path), "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err == f"error: profile {path}: {line}\n"
    assert main(["--profile", "cpu", "--set", f"resolution={written}", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {line}\n" and not out.exists()


def test_a_profiles_resolution_written_as_a_plain_number_or_size_reads_as_before(tmp_path):
    """Only the forms YAML turns into another number are read as text: 512, +512, 1216x832, a quoted "0x512" or
    '1024' keep their meaning; other fields' numbers are YAML's (seed: 0x10 is 16)."""
    for written, kept in (("512", 512), ("+512", 512), ("1216x832", "1216x832"), ('"0x512"', "0x512"),
                          ("'1024'", 1024)):
        assert load_profile(str(_write(tmp_path, f"resolution: {written}\n")))[1]["resolution"] == kept, written
    assert load_profile(str(_write(tmp_path, "seed: 0x10\nresolution: 64\n")))[1] == {"seed": 16, "resolution": 64}


def test_a_user_profile_reads_as_the_same_fields_given_with_set(tmp_path, caplog):
    """A profile file and --set take the same values the same way: 1 and 0 for a yes/no field (YAML reads them as
    numbers; they were refused in a file and taken by --set), and a file's own fewer sampling steps end the K range it
    leaves at the defaults (k_max 50 under truncation: uniform failed the file where --set sample_steps lowered it);
    a k_max the file sets itself is still checked."""
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    path = _write(tmp_path, "tf32: 1\nsliced_decode: 0\ntruncation: uniform\nsample_steps: 5\n")
    _, cfg = resolve_config(str(path), {}, [])
    assert (cfg.tf32, cfg.sliced_decode, cfg.k_max, cfg.k_min) == (True, False, 5, 1)
    assert "sample_steps=5: the K range ends at the last step (k_max 50 -> 5)" in caplog.text
    assert (resolve_config("cpu", {}, ["tf32=1", "sliced_decode=0"])[1].tf32) is True
    with pytest.raises(UserError, match="k_max=8 is larger than sample_steps=5"):
        resolve_config(str(_write(tmp_path, "truncation: uniform\nsample_steps: 5\nk_max: 8\n", "own.yaml")), {}, [])
    with pytest.raises(UserError, match="tf32 must be true or false, got 2"):
        resolve_config(str(_write(tmp_path, "tf32: 2\n", "two.yaml")), {}, [])


def test_missing_user_profile_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_profile(str(tmp_path / "nope.yaml"))


# ------------------------------------------------------------------------------------------------------
# auto
# ------------------------------------------------------------------------------------------------------


def _fake_cuda(monkeypatch, total_gib: float | None):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: total_gib is not None)
    props = types.SimpleNamespace(total_memory=int((total_gib or 0) * 2**30), name="Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props)


@pytest.mark.parametrize("total_gib, expected", [
    (None, "cpu"),
    (5.8, "rtx3060"),     # smaller than every profile: start from the 8 GB one, the planner says what to change
    (7.6, "rtx3060"),     # an 8 GB card reports ~7.6 GiB
    (11.6, "rtx3060"),
    (23.6, "rtx4090"),    # 24 GB
    (39.4, "a100-40gb"),  # A100 40GB
    (47.5, "a100-40gb"),  # A6000 48GB
    (79.2, "a100-80gb"),  # A100/H100 80GB
])
def test_auto_picks_by_detected_memory(monkeypatch, total_gib, expected):
    _fake_cuda(monkeypatch, total_gib)
    name, values = load_profile("auto")
    assert name == expected
    shipped = load_profile(expected)[1]
    if total_gib is not None:  # the profile's features with the card's own budget: its memory less 5%
        assert values.pop("budget_gb") == card_budget(total_gib) < total_gib
        shipped.pop("budget_gb")
    assert name == expected and values == shipped


@pytest.mark.parametrize("total_gib, picks", [
    # model kinds:  sd         sdxl             sd35m            sd35l                 flux
    (7.6, ("rtx3060", "rtx3060-sdxl", "rtx3060-sd35m", "rtx3060", "rtx3060-flux")),  # 8 GB: no SD3.5 Large profile
    (11.6, ("rtx3060", "rtx3060-sdxl", "rtx3060-sd35m", "rtx3060-12gb-sd35l", "rtx3060-12gb-flux")),  # 12 GB
    (23.6, ("rtx4090", "rtx4090", "rtx4090", "rtx4090", "rtx4090-flux")),  # rtx4090 is made for SD and SDXL
    (39.4, ("a100-40gb",) * 5),  # made for any model
])
def test_auto_picks_the_cards_profile_made_for_the_model(monkeypatch, tmp_path, total_gib, picks):
    """--profile auto with a model it can tell before loading (a named model, a diffusers folder, a hub id in the
    local cache): the card's profile made for it, with the card's own budget; the ladder's when there is none."""
    from lowmem_alignprop.settings.profiles import profile_for_card

    _fake_cuda(monkeypatch, total_gib)
    for model, expected in zip(("sd15", "sdxl", "sd35m", "sd35l", "flux"), picks):
        assert profile_for_card(("card", total_gib), {"sd15": "sd"}.get(model, model)) == expected, model
        name, values = load_profile("auto", model)
        assert name == expected and values["budget_gb"] == card_budget(total_gib), model
    assert profile_for_card(("card", total_gib), None) == picks[0]  # a model only loading tells: as before


def test_the_model_kind_is_read_from_a_folder_or_the_hub_cache_without_loading(tmp_path, monkeypatch):
    import json

    import huggingface_hub.constants

    from lowmem_alignprop.settings.model_kind import model_kind_of

    def folder(root, pipeline, layers=None):
        root.mkdir(parents=True)
        (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
        if layers is not None:
            (root / "transformer").mkdir()
            (root / "transformer" / "config.json").write_text(json.dumps({"num_layers": layers}))
        return root

    assert model_kind_of(str(folder(tmp_path / "flux", "FluxPipeline"))) == "flux"
    assert model_kind_of(str(folder(tmp_path / "xl", "StableDiffusionXLPipeline"))) == "sdxl"
    assert model_kind_of(str(folder(tmp_path / "m", "StableDiffusion3Pipeline", 24))) == "sd35m"
    assert model_kind_of(str(folder(tmp_path / "l", "StableDiffusion3Pipeline", 38))) == "sd35l"
    assert model_kind_of(str(folder(tmp_path / "other", "KandinskyPipeline"))) is None
    assert model_kind_of(str(tmp_path / "missing")) is None and model_kind_of("model.safetensors") is None
    # a transformer file (the common FLUX case) by its model_components folder; an SD single file is not told
    transformer = tmp_path / "flux1-dev.safetensors"
    transformer.write_bytes(b"not read")
    assert model_kind_of(str(transformer), str(tmp_path / "flux")) == "flux"
    assert model_kind_of(str(transformer), str(tmp_path / "l")) == "sd35l" and model_kind_of(str(transformer)) is None
    assert model_kind_of("", str(tmp_path / "flux")) is None  # no model: the working directory is not read
    _fake_cuda(monkeypatch, 7.6)
    assert resolve_config("auto", {"model": str(transformer)}, [f"model_components={tmp_path / 'flux'}"])[0] \
        == "rtx3060-flux"
    # a hub id: its files in the local hub cache (the layout huggingface_hub writes), never the network
    cache = tmp_path / "hub"
    repo = cache / "models--owner--big-flux"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    folder(repo / "snapshots" / "abc123", "FluxPipeline")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert model_kind_of("owner/big-flux") == "flux"
    assert model_kind_of("owner/not-downloaded") is None


def test_auto_on_a_card_asks_the_hub_what_a_model_not_downloaded_yet_is(tmp_path, monkeypatch):
    """The first run of a hub id on a card: its model_index.json (and an SD3's transformer config) are fetched
    before the profile is chosen, so FLUX.1 on an 8 GB card gets rtx3060-flux at once; without a card, offline,
    or with the hub out of reach nothing is requested (no retries) and the ladder's profile stays."""
    import json
    import socket

    import huggingface_hub
    import huggingface_hub.constants

    from lowmem_alignprop.settings import hub_access

    files = {("owner/new-flux", "model_index.json"): {"_class_name": "FluxPipeline"},
             ("owner/sd35-large", "model_index.json"): {"_class_name": "StableDiffusion3Pipeline"},
             ("owner/sd35-large", "transformer/config.json"): {"num_layers": 38}}
    asked = []

    def download(repo, filename, **kwargs):
        asked.append((repo, filename))
        if (repo, filename) not in files:
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not in {repo}")
        path = tmp_path / "fetched" / repo / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(files[repo, filename]))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for var in hub_access.OFFLINE_VARS + hub_access.PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: contextlib.nullcontext())  # the probe: online
    hub_access.unreachable.cache_clear()
    try:
        _fake_cuda(monkeypatch, 7.6)  # an 8 GB card
        assert load_profile("auto", "owner/new-flux")[0] == "rtx3060-flux"
        assert load_profile("auto", "owner/sd35-large")[0] == "rtx3060"  # no SD3.5 Large profile for 8 GB
        _fake_cuda(monkeypatch, 11.6)
        assert load_profile("auto", "owner/sd35-large")[0] == "rtx3060-12gb-sd35l"
        assert load_profile("auto", "owner/no-index")[0] == "rtx3060"  # not a diffusers repository: the ladder's
        large = [("owner/sd35-large", "model_index.json"), ("owner/sd35-large", "transformer/config.json")]
        assert asked == [("owner/new-flux", "model_index.json"), *large, *large, ("owner/no-index", "model_index.json")]
        asked.clear()
        _fake_cuda(monkeypatch, None)  # no card: the cpu profile, nothing to ask
        assert load_profile("auto", "owner/new-flux")[0] == "cpu" and asked == []
        _fake_cuda(monkeypatch, 7.6)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline by setting: the cache only
        assert load_profile("auto", "owner/new-flux")[0] == "rtx3060" and asked == []
        monkeypatch.delenv("HF_HUB_OFFLINE")
        hub_access.unreachable.cache_clear()

        def no_dns(*a, **k):
            raise socket.gaierror(-2, "Name or service not known")
        monkeypatch.setattr(socket, "create_connection", no_dns)  # out of reach: no request, no retries
        assert load_profile("auto", "owner/new-flux")[0] == "rtx3060" and asked == []
    finally:
        hub_access.unreachable.cache_clear()


# ------------------------------------------------------------------------------------------------------
# startup validation: impossible combinations fail before any model loads
# ------------------------------------------------------------------------------------------------------


def _forbid_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the configuration is invalid")

    for mod, name in ((train_setup, "load_components"), (models_mod, "load_components"),
                      (train_setup, "make_accelerator")):
        monkeypatch.setattr(mod, name, refuse)


def _without(monkeypatch, *missing):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name.split(".")[0] in missing else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("args, missing, needles", [
    (["--set", "k=20"], (), ["k=20 is larger than sample_steps=10", "--set k=10"]),
    (["--set", "truncation=uniform", "--set", "k_min=5", "--set", "k_max=2"], (), ["k_min=5 is larger than k_max=2"]),
    (["--set", "truncation=uniform", "--set", "k_max=11"], (), ["k_max=11 is larger than sample_steps=10"]),
    (["--set", "deepspeed_zero=2", "--set", "offload=optimizer"], ("deepspeed",),
     ["deepspeed_zero=2 needs DeepSpeed", "pip install deepspeed"]),
    (["--set", "offload=optimizer"], (), ["offload=optimizer is a DeepSpeed ZeRO feature", "deepspeed_zero=2"]),
    (["--set", "optimizer=adamw8bit"], ("bitsandbytes",), ["optimizer=adamw8bit needs bitsandbytes",
                                                           "--set optimizer=adamw"]),
    (["--set", "optimizer=paged_adamw8bit"], ("bitsandbytes",), ["needs bitsandbytes"]),
    (["--set", "activation_offload=true"], (), ["activation_offload", "vae_checkpointing=blocks"]),
    (["--set", "vae_checkpointing=sometimes"], (), ["vae_checkpointing='sometimes' is not one of"]),
    # a yes/no word for a choice names the choice that turns it on (it named the first: off)
    (["--set", "compile=true"], (), ["compile='true' is not one of none, nograd, regional: use --set compile=nograd"]),
    (["--set", "offload=no"], (), ["offload='no' is not one of none, optimizer, params: use --set offload=none"]),
    (["--set", "tiled_decode=true", "--set", "sliced_decode=true"], (), ["turn off sliced_decode"]),
    # a value like no choice is not told the default when that is off (all: it said none, the opposite)
    (["--set", "report_to=all"], (), ["report_to='all' is not one of none, tensorboard, wandb: choose one of them"]),
    # ZeRO-1 is nearest to ZeRO-2 (it said 0: DeepSpeed off)
    (["--set", "deepspeed_zero=1"], (), ["deepspeed_zero=1 is not one of 0, 2, 3: use --set deepspeed_zero=2"]),
    # the clash with DeepSpeed first: its fix of the checkpointing was wasted
    (["--set", "deepspeed_zero=2", "--set", "block_swap=1"], (), ["block_swap keeps frozen blocks in CPU memory"]),
])
def test_impossible_combination_fails_before_any_model_loads(tmp_path, capsys, monkeypatch, args, missing, needles):
    _forbid_model_loading(monkeypatch)
    _without(monkeypatch, *missing)
    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--output-dir", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()


def test_impossible_combination_in_a_user_profile_fails_the_same_way(tmp_path, capsys, monkeypatch):
    _forbid_model_loading(monkeypatch)
    path = _write(tmp_path, "budget_gb: 6\nactivation_offload: true   # but nothing checkpointed\n")
    assert main(["--profile", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    assert "add --set vae_checkpointing=blocks" in capsys.readouterr().err


def test_xformers_on_cpu_falls_back_to_sdpa_with_one_log_line(tiny_dir, caplog):
    from diffusers.models.attention_processor import AttnProcessor2_0

    cfg = Config(model=str(tiny_dir), attention="xformers").validate()
    comps = models_mod.load_components(cfg)
    with caplog.at_level(logging.INFO):
        _, used = train_setup.apply_memory_features(comps, cfg, torch.device("cpu"), torch.float32)
    assert used == "sdpa"
    lines = [r for r in caplog.records if "xformers" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "falling back to sdpa" in lines[0].getMessage()
    assert all(type(p) is AttnProcessor2_0 for p in comps.unet.attn_processors.values())


@pytest.mark.parametrize("name", GPU_SHIPPED)
def test_gpu_profile_without_cuda_points_to_cpu_and_plan(name, tmp_path, capsys, monkeypatch):
    _forbid_model_loading(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    assert main(["--profile", name, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--profile cpu" in err and f"lowmem-alignprop plan --profile {name}" in err, err
    assert not out.exists()


def test_a_gpus_host_memory_features_on_a_cpu_run_are_said(tmp_path, caplog, monkeypatch):
    """offload_frozen, activation_offload and block_swap keep a GPU's tensors in host memory: on a CPU run they save
    nothing (they were taken in silence); one line names them and the flags that turn them off; none, nothing said."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train_mod, "train", lambda cfg, **kw: {})  # the configuration is what is checked
    caplog.set_level(logging.WARNING, logger="lowmem_alignprop")
    assert main(["--output-dir", str(tmp_path / "a"), "--set", "offload_frozen=true", "--set",
                 "activation_offload=true", "--set", "vae_checkpointing=blocks"]) == 0
    said = [m for m in caplog.messages if "host memory" in m]
    assert said == ["offload_frozen and activation_offload keep a GPU's tensors in host memory, and this run is on "
                    "the CPU, where they already are: nothing saved here, copies made; turn them off: "
                    "--set offload_frozen=false --set activation_offload=false"], caplog.messages
    caplog.clear()
    assert main(["--output-dir", str(tmp_path / "b")]) == 0
    assert not [m for m in caplog.messages if "host memory" in m]
    # plan for the CPU says it among its notes (it said nothing)
    from lowmem_alignprop.measure import planner

    notes = planner.plan(Config(model="tiny", resolution=64, sample_steps=2, k=1, offload_frozen=True).validate(),
                         profile="cpu", target="cpu")["notes"]
    assert ("offload_frozen keeps a GPU's tensors in host memory, and this plan is on the CPU, where they already "
            "are: nothing saved here, copies made; turn it off: --set offload_frozen=false") in notes, notes


def test_fp16_on_a_cpu_trains_in_fp32_and_the_run_records_fp32(tiny_dir, tmp_path, caplog):
    """A GPU profile's mixed_precision=fp16 (a copy of one, or --set) on a machine without CUDA: said, trained in fp32,
    and config.yaml records what ran (it said fp16: --profile RUN/config.yaml and the model card claimed an fp16
    run)."""
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main(["--profile", "cpu", "--output-dir", str(out), "--steps", "1", "--set", "mixed_precision=fp16",
                     "--set", "sample_steps=3", "--set", "k=1", "--set", "sample_prompts=0"]) == 0
    assert "mixed_precision=fp16 needs a CUDA device: using fp32 on this CPU" in caplog.text
    assert yaml.safe_load((out / "config.yaml").read_text())["mixed_precision"] == "no"


@pytest.mark.parametrize("name", sorted(shipped_profiles()))
def test_every_profile_takes_either_truncation_and_fewer_steps(name):
    """`--set truncation=uniform` (or fixed) works on every shipped profile as it is, and asking for fewer DDIM steps
    brings the profile's K range down with them; a k_max the user asks for is still checked."""
    _, values = load_profile(name)
    for truncation in ("fixed", "uniform"):
        build_config(values, {}, {"truncation": truncation})
    fewer = build_config(values, {}, {"sample_steps": 5, "truncation": "uniform"})
    assert fewer.k_max <= 5 and fewer.k_min <= fewer.k_max
    with pytest.raises(UserError, match="k_max=8 is larger than sample_steps=5"):
        build_config(values, {}, {"sample_steps": 5, "truncation": "uniform", "k_max": 8})
    with pytest.raises(UserError, match="k_min=8 is larger than k_max=5"):
        build_config(values, {}, {"sample_steps": 5, "truncation": "uniform", "k_min": 8})


def test_fewer_steps_say_that_they_lowered_the_profiles_k_range(caplog):
    """rtx3060-flux samples K ~ U{1..5} of 28 steps: --set sample_steps=4 ends the range at 4, and a line says so (a
    k_max above the steps the user asks for is refused instead); a fixed K, which never reads k_max, says nothing."""
    _, values = load_profile("rtx3060-flux")
    assert values["truncation"] == "uniform" and values["k_max"] == 5
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    assert build_config(values, {}, {"sample_steps": 4}).k_max == 4
    assert "sample_steps=4: the K range ends at the last step (k_max 5 -> 4)" in caplog.text
    caplog.clear()
    build_config(values, {}, {"sample_steps": 4, "truncation": "fixed", "k": 2})
    assert "K range" not in caplog.text
    # the cpu profile's fixed K of 2, one step asked for: K follows as the model defaults' step count brings it down
    _, cpu = load_profile("cpu")
    assert cpu["truncation"] == "fixed" and cpu["k"] == 2
    assert build_config(cpu, {}, {"sample_steps": 1}).k == 1
    assert "sample_steps=1: the K range ends at the last step (k 2 -> 1)" in caplog.text
    with pytest.raises(UserError, match="larger than sample_steps"):  # a K the user asks for is checked
        build_config(cpu, {}, {"sample_steps": 1, "k": 2})
    caplog.clear()  # sample (no gradient window) has nothing to say of K
    assert build_config(values, {}, {"sample_steps": 4}, training=False).k_max == 4 and "K range" not in caplog.text


def test_held_out_settings_without_the_evaluation_are_said(caplog):
    """eval_prompts or eval_holdout given while eval_every is 0: nothing is held out (they were taken in silence);
    said, not refused (a script may keep them for its evaluated runs); the profile's own say nothing."""
    _, cpu = load_profile("cpu")
    caplog.set_level(logging.WARNING, logger="lowmem_alignprop")
    build_config(cpu, {}, {"eval_holdout": 2})
    assert caplog.messages == ["eval_holdout chooses the held-out evaluation's prompts, and it is off (eval_every=0): "
                               "nothing is held out or evaluated; add --eval-every N (e.g. 10) to evaluate"]
    caplog.clear()
    build_config(cpu, {}, {"eval_holdout": 2, "eval_every": 5})
    build_config({**cpu, "eval_holdout": 2}, {}, {})
    build_config(cpu, {}, {"eval_holdout": 2}, training=False)
    assert caplog.messages == []


def test_a_yaml_merge_key_and_scalar_aliases_are_valid_profiles(tmp_path):
    from lowmem_alignprop.settings.profiles import load_profile

    p = tmp_path / "mine.yaml"
    p.write_text("<<: {batch_size: 3, grad_accum: 2}\nk: &one 1\nk_min: *one\n")
    _, values = load_profile(str(p))
    assert values == {"batch_size": 3, "grad_accum": 2, "k": 1, "k_min": 1}
    p.write_text("<<: {batch_size: 3, k: 1}\nbatch_size: 4\n")  # the mapping's own key overrides a merged one
    assert load_profile(str(p))[1] == {"batch_size": 4, "k": 1}
    p.write_text("batch_size: 3\nbatch_size: 4\n")  # the same key twice is still a mistake
    with pytest.raises(Exception, match="twice"):
        load_profile(str(p))


def test_a_users_profile_file_wins_over_the_toy_models_defaults(tmp_path):
    """The toy model's own size, steps, guidance, reward and batch go over a shipped profile's, but a profile file of
    the user's own was written for the run: its values stay (they were silently replaced by the toy's)."""
    from lowmem_alignprop.settings.profiles import resolve_config

    own = tmp_path / "mine.yaml"
    own.write_text("resolution: 32\nsample_steps: 8\nguidance_scale: 5.0\nbatch_size: 2\nreward: brightness\n")
    cfg = resolve_config(str(own), {"model": "toy"}, [])[1]
    assert (cfg.resolution, cfg.sample_steps, cfg.guidance_scale, cfg.batch_size, cfg.reward) == (
        32, 8, 5.0, 2, "brightness")
    assert cfg.prompts == "toy-pairs"  # what the file leaves out is still the toy model's
    shipped = resolve_config("cpu", {"model": "toy"}, [])[1]
    assert (shipped.resolution, shipped.sample_steps, shipped.reward) == (64, 20, "toy_clip")


def test_a_runs_config_yaml_given_as_profile_trains_that_configuration_again(tmp_path):
    """config.yaml, "the fully resolved configuration", passed back as --profile: the same settings and model
    (a new output folder; --auto-fit's record left out); flags still win. It failed on its profile: key."""
    import dataclasses

    from lowmem_alignprop.settings.profiles import resolve_config

    name, first = resolve_config("cpu", {"model": "tiny", "steps": 7}, ["guidance_scale=5", "batch_size=2",
                                                                        "lora_layers=attention+ff"])
    run = tmp_path / "config.yaml"
    run.write_text(yaml.safe_dump({"profile": name, **first.to_dict(), "auto_fit_search": {"chosen": {}}},
                                  sort_keys=False))
    again = resolve_config(str(run), {}, [])[1]
    assert dataclasses.replace(again, output_dir=first.output_dir) == first
    assert resolve_config(str(run), {"model": "toy"}, ["steps=3"])[1].model == "toy"
    # a file of a few lines naming a profile to build on is no run's record: it was taken for one, and the profile
    # it named went unapplied (the defaults trained), its output_dir dropped, in silence
    for lines in ("profile: rtx3060\nbatch_size: 2\n", "profile: rtx3060\noutput_dir: elsewhere\nbatch_size: 2\n"):
        mine = tmp_path / "mine.yaml"
        mine.write_text(lines)
        with pytest.raises(UserError, match=r"^profile .*mine.yaml sets profile: rtx3060: a profile cannot build on "
                                            r"another; copy that one and edit the copy \(lowmem-alignprop profiles "
                                            r"rtx3060 > mine.yaml\)$"):
            resolve_config(str(mine), {}, [])


def test_an_older_runs_config_yaml_with_a_retired_setting_trains_again_or_names_it(tmp_path):
    """config.yaml of a run of the version that had reward_floor (RETIRED_FIELDS) records `reward_floor: null`: as
    --profile it was refused as "unknown config key 'reward_floor' (did you mean reward?)". Unset, it is left out (it
    did nothing); set, it is one line saying it was removed, as is --set reward_floor=..."""
    name, first = resolve_config("cpu", {"model": "tiny", "steps": 7}, [])
    run = tmp_path / "config.yaml"
    run.write_text(yaml.safe_dump({"profile": name, **first.to_dict(), "reward_floor": None}, sort_keys=False))
    assert resolve_config(str(run), {}, [])[1].steps == 7
    run.write_text(yaml.safe_dump({"profile": name, **first.to_dict(), "reward_floor": 0.3}, sort_keys=False))
    removed = ("reward_floor was removed (an earlier version's experimental setting: the loss saw max(reward, "
               "reward_floor), so images below it gave no gradient): leave it out")
    with pytest.raises(UserError) as refused:
        resolve_config(str(run), {}, [])
    assert str(refused.value) == f"profile {run}: {removed}"
    with pytest.raises(UserError) as refused:
        resolve_config("cpu", {}, ["reward_floor=0.3"])
    assert str(refused.value) == removed


def test_a_resume_naming_the_runs_own_profile_file_edited_since_says_what_it_keeps(tmp_path, caplog):
    """--profile mine.yaml on a resume of the run mine.yaml started: an edit of the file (lr 0.001 -> 0.002) was
    dropped in silence (another file is applied on top, said). Said now, from the file's values at the start
    (config.yaml's profile_values, as_read), with the --set that applies it; the run's settings stand, and a field
    given now says nothing. A line removed gives the default; a run from before the record gets the line that cannot
    tell an edit from a --set."""
    from lowmem_alignprop.settings.profiles import as_read, resolve_config

    mine = tmp_path / "mine.yaml"
    mine.write_text("lr: 0.001\nbatch_size: 1\nseed: 7\n")
    name, started = resolve_config(str(mine), {"model": "tiny"}, [])
    recorded = as_read(name)
    assert recorded == {"lr": 0.001, "batch_size": 1, "seed": 7}
    mine.write_text("lr: 0.002\nbatch_size: 1\nseed: 7\n")
    run = (name, started.to_dict())
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert resolve_config(str(mine), {}, [], resumed=run, recorded=recorded)[1].lr == 0.001
        assert caplog.messages == [f"resume: profile {mine}, the run's own, was edited since the run started: "
                                   "lr=0.001 -> 0.002: a resume keeps the run's settings and the flags given now; to "
                                   "take the file's, give it: --set lr=0.002"]
        caplog.clear()
        assert resolve_config(str(mine), {}, ["lr=0.002"], resumed=run, recorded=recorded)[1].lr == 0.002
        assert caplog.messages == []
        mine.write_text("lr: 0.001\nbatch_size: 1\nsteps: 9\n")  # seed's line removed (the default: 42), steps added
        assert resolve_config(str(mine), {}, [], resumed=run, recorded=recorded)[1].seed == 7
        assert caplog.messages == [f"resume: profile {mine}, the run's own, was edited since the run started: "
                                   f"seed=7 -> (line removed: the default {Config().seed}), steps=(not set) -> 9 (the "
                                   f"run has steps={started.steps}): a resume keeps the run's settings and the flags "
                                   f"given now; to take the file's, give it: --set seed={Config().seed} --set steps=9"]
        caplog.clear()
        mine.write_text("lr: 0.002\nbatch_size: 1\nseed: 7\n")
        assert resolve_config(str(mine), {}, [], resumed=run)[1].lr == 0.001  # no record: an older run's
        assert caplog.messages == [f"resume: profile {mine}, the run's own, sets lr=0.002 where the run has lr=0.001 "
                                   "(given over the file when the run started or resumed, or the file edited since): "
                                   "a resume keeps the run's settings and the flags given now; to take the file's, "
                                   "give it: --set lr=0.002"]


def test_a_resume_naming_the_runs_own_unedited_profile_file_does_not_say_the_file_changed(tmp_path, caplog):
    """The run started as `--profile mine.yaml --set resolution=64 --set lr=0.002` and mine.yaml was never edited:
    the line said the profile "now sets resolution=128, lr=0.001", as if the file had changed. With the file's values
    at the start recorded, the run's --set values are its own: nothing is said; an edit since says only the field
    edited, with the run's value where its --set gave another. Without the record (an older run) the line says the
    file's values and the run's, which stay."""
    from lowmem_alignprop.settings.profiles import as_read, resolve_config

    mine = tmp_path / "mine.yaml"
    mine.write_text("resolution: 128\nlr: 0.001\nbatch_size: 1\n")
    name, started = resolve_config(str(mine), {"model": "tiny"}, ["resolution=64", "lr=0.002"])
    run, recorded = (name, started.to_dict()), as_read(name)
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        resumed = resolve_config(str(mine), {}, [], resumed=run, recorded=recorded)[1]
        assert (resumed.resolution, resumed.lr) == (64, 0.002)
        assert caplog.messages == []
        mine.write_text("resolution: 128\nlr: 0.003\nbatch_size: 1\n")
        assert resolve_config(str(mine), {}, [], resumed=run, recorded=recorded)[1].lr == 0.002
        assert caplog.messages == [f"resume: profile {mine}, the run's own, was edited since the run started: "
                                   "lr=0.001 -> 0.003 (the run has lr=0.002): a resume keeps the run's settings and "
                                   "the flags given now; to take the file's, give it: --set lr=0.003"]
        caplog.clear()
        mine.write_text("resolution: 128\nlr: 0.001\nbatch_size: 1\n")
        resumed = resolve_config(str(mine), {}, [], resumed=run)[1]
    assert (resumed.resolution, resumed.lr) == (64, 0.002)
    assert caplog.messages == [f"resume: profile {mine}, the run's own, sets resolution=128, lr=0.001 where the run "
                               "has resolution=64, lr=0.002 (given over the file when the run started or resumed, or "
                               "the file edited since): a resume keeps the run's settings and the flags given now; to "
                               "take the file's, give it: --set resolution=128 --set lr=0.001"]


def test_a_profile_saved_by_windows_powershell_is_read(tmp_path):
    """`lowmem-alignprop profiles cpu > mine.yaml` in Windows PowerShell 5.1 writes UTF-16 with a byte-order mark (and
    CRLF): it was refused as "not UTF-8 text" though the README says to do exactly that."""
    from lowmem_alignprop.settings.profiles import shipped_profiles

    text = shipped_profiles()["cpu"].read_text(encoding="utf-8").replace("\n", "\r\n")
    for encoding in ("utf-16", "utf-8-sig"):
        mine = tmp_path / f"mine-{encoding}.yaml"
        mine.write_bytes(text.encode(encoding))
        assert load_profile(str(mine))[1] == load_profile("cpu")[1]
    latin = tmp_path / "latin.yaml"  # its line, column and byte are said (it said "is not UTF-8 text" alone)
    latin.write_bytes("# mine\r\n# caf\xe9\r\nsteps: 3\r\n".encode("latin-1"))
    with pytest.raises(UserError) as err:
        load_profile(str(latin))
    assert str(err.value) == (f"profile {latin} is not UTF-8 text: line 2, column 6 (byte 13 of the file) holds 0xE9 "
                              "(in Windows-1252: '\xe9'); save it as UTF-8 (Notepad: Save as, Encoding UTF-8)")
    no_mark = tmp_path / "no-mark.yaml"  # (YAML's parser said "not valid YAML at line 1": a NUL it cannot take)
    no_mark.write_bytes(text.encode("utf-16-le"))
    with pytest.raises(UserError) as err:
        load_profile(str(no_mark))
    assert str(err.value) == (f"profile {no_mark} is not UTF-8 text: it looks like UTF-16 without a byte-order mark "
                              "(a NUL byte beside each letter); save it as UTF-8 (Notepad: Save as, Encoding UTF-8)")


def test_a_mac_is_told_its_gpu_is_not_used(monkeypatch, tmp_path, caplog):
    """No CUDA and an Apple GPU (MPS): the run says the CPU does the work (it trained on the CPU in silence)."""
    from lowmem_alignprop.training.train_setup import make_accelerator
    from lowmem_alignprop.memory.placement import unused_apple_gpu_note

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    caplog.set_level(logging.WARNING, logger="lowmem_alignprop")
    make_accelerator(Config(model="tiny").validate(), tmp_path)
    assert "this Mac's GPU (MPS) is not used" in caplog.text and "the CPU does the work" in caplog.text
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert unused_apple_gpu_note() is None


# ------------------------------------------------------------------------------------------------------
# coerce, parse_set and Config.validate at unit level (mutation sweep of settings/)
# ------------------------------------------------------------------------------------------------------


def test_set_and_profile_values_take_the_fields_type_exactly():
    """Every spelling of a boolean --set means what it says (off was read as on: a feature the user turned off ran),
    a profile's yes/no for vae_checkpointing is per up-block or none, and null clears an optional number."""
    from lowmem_alignprop.settings.config import coerce, parse_set

    for word, value in [("1", True), ("true", True), ("Yes", True), ("ON", True),
                        ("0", False), ("false", False), ("no", False), ("Off", False)]:
        assert parse_set([f"tiled_decode={word}"]) == {"tiled_decode": value}, word
    assert coerce("vae_checkpointing", True) == "blocks" and coerce("vae_checkpointing", False) == "none"
    assert load_profile_text("vae_checkpointing: yes\n")["vae_checkpointing"] == "blocks"
    # and on the command line the same (it was refused there with "use --set vae_checkpointing=none": the opposite)
    assert parse_set(["vae_checkpointing=true"]) == {"vae_checkpointing": "blocks"}
    assert parse_set(["vae_checkpointing=Off"]) == {"vae_checkpointing": "none"}
    assert parse_set(["reward_target=null", "lr=2e-3", "k=3", "negative_prompt=a=b"]) == {
        "reward_target": None, "lr": 0.002, "k": 3, "negative_prompt": "a=b"}


def load_profile_text(text: str) -> dict:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.yaml"
        path.write_text(text)
        return load_profile(str(path))[1]


@pytest.mark.parametrize("sets, needle", [
    ({"grad_accum": 0}, "grad_accum must be at least 1 (got 0): use --set grad_accum=1"),  # a step of no images
    ({"steps": 0}, "steps must be at least 1 (got 0): use --steps 1"),  # (its own flag, not --set)
    ({"truncation": "uniform", "k_min": 0, "k_max": 2}, "k_min must be at least 1 (got 0)"),  # K = 0: no gradient
    ({"lr": 0.0}, "lr must be positive"),  # trains nothing, in silence
    ({"truncation": "uniform", "sample_steps": 5, "k_min": 1, "k_max": 6}, "k_max=6 is larger than sample_steps=5"),
    # each fails only after the model loads, or at the end of the run, unless refused here
    ({"push_to_hub": "you/lora", "train_unet": "full"}, "push_to_hub exports a LoRA and train_unet=full"),
    ({"sample_every": 2, "sample_prompts": 0}, "sample_every=2 renders the sample prompts, and sample_prompts=0"),
    ({"offload": "params", "deepspeed_zero": 2}, "offload=params needs deepspeed_zero=3"),
    ({"tiled_decode": True, "tile_size": 32, "tile_overlap": 16}, "tile_overlap=16 must be under half of tile_size=32: set "
     "tile_size to 33 or more"),
    # past tile_size's own bound (4096) only a smaller overlap is advised (a tile_size of 2e11 was)
    ({"tile_overlap": 99999}, "tile_overlap=99999 must be under half of tile_size=64: give a tile_overlap under 32 "
     "(the default: 16)"),
    ({"base_quant": "nf4", "train_unet": "full"}, "base_quant needs train_unet=lora"),
    ({"seed": 2**32}, "seed=4294967296 is out of range"),
    ({"resolution": 36}, "resolution=36 must be a multiple of 8: use --set resolution=32"),
    ({"eval_every": 5, "deepspeed_zero": 3}, "eval_every with deepspeed_zero=3"),
    ({"eval_every": 5, "eval_holdout": 0}, "eval_holdout must be at least 1 (got 0): use --set eval_holdout=1; to hold "
                                           "no training prompt out, evaluate on prompts of their own: --set "
                                           "eval_prompts=FILE"),
    ({"eval_every": 5, "eval_prompts": "toy-heldout", "eval_holdout": -1}, "eval_holdout must be 0 or more (got -1): "
                                                                            "with eval_prompts none is held out"),
])
def test_validate_refuses_what_would_train_nothing_or_wrongly(sets, needle):
    with pytest.raises(UserError) as e:
        build_config({}, {}, sets)
    assert needle in str(e.value)


def test_validate_takes_the_edges_of_each_range():
    """The largest K range (k_min = k_max = sample_steps), per_step's k_min = 0 and eta 0 are valid."""
    cfg = build_config({}, {}, {"truncation": "uniform", "sample_steps": 5, "k_min": 5, "k_max": 5})
    assert cfg.window_bounds() == (5, 5)
    cfg = build_config({}, {}, {"truncation": "per_step", "sample_steps": 5, "k_min": 0, "k_max": 5, "eta": 0.0})
    assert (cfg.window_bounds(), cfg.eta) == ((0, 5), 0.0)
    # block swap's per-block checkpointing is for backward: `sample` (training=False) takes whole-call checkpointing
    assert build_config({}, {}, {"eval_every": 5, "deepspeed_zero": 2}).deepspeed_zero == 2
    # held-out prompts of their own: nothing is held out of training, and eval_holdout=0 says just that
    assert build_config({}, {}, {"eval_every": 5, "eval_prompts": "toy-heldout", "eval_holdout": 0}).eval_holdout == 0
    swap = {"block_swap": 2, "unet_checkpointing": "call"}
    assert build_config({}, {}, swap, training=False).block_swap == 2
    with pytest.raises(UserError, match="add --set unet_checkpointing=blocks"):
        build_config({}, {}, swap)


def test_the_toy_models_20_steps_end_a_profiles_k_range():
    """rtx3060 draws K ~ U{1..50} of 50 DDIM steps; the toy model samples 20: its range ends at 20 (it was refused as
    k_max=50 > sample_steps=20), and a k_max the user asks for is still checked."""
    _, cfg = resolve_config("rtx3060", {"model": "toy"}, [])
    assert (cfg.truncation, cfg.sample_steps, cfg.window_bounds()) == ("uniform", 20, (1, 20))
    with pytest.raises(UserError, match="k_max=30 is larger than sample_steps=20"):
        resolve_config("rtx3060", {"model": "toy"}, ["k_max=30"])


def test_a_flow_models_resolution_limits_are_read_from_its_configs():
    """SD3/SD3.5: a multiple of 16 (2x2 latents of 8 px), at most pos_embed_max_size patches a side (SD3.5 Large:
    192 x 16 = 3072 px); FLUX.1: a multiple of 16, no limit; a UNet model: none of these."""
    from lowmem_alignprop.settings.model_kind import flow_geometry

    assert flow_geometry("sd35l") == ("sd3", 16, 3072) and flow_geometry("flux") == ("flux", 16, None)
    assert flow_geometry("sd15") is None
    assert build_config({}, {"model": "sd35l"}, {"resolution": 3072}).resolution == 3072
    with pytest.raises(UserError, match="larger than this SD3/SD3.5 model's position embeddings reach \\(3072 px"):
        build_config({}, {"model": "sd35l"}, {"resolution": 3088})


def test_a_flag_and_a_set_of_the_same_field_that_disagree_are_said(caplog):
    """--steps 3 --set steps=5 trains 5 (--set wins, the documented order) and says so; agreeing ones say nothing."""
    from lowmem_alignprop.settings.profiles import resolve_config

    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert resolve_config("cpu", {"steps": 3, "model": "tiny"}, ["steps=5"])[1].steps == 5
        assert caplog.messages == ["--steps 3 and --set steps=5 both given: --set wins (steps=5)"]
        caplog.clear()
        assert resolve_config("cpu", {"steps": 3, "model": "tiny"}, ["steps=3"])[1].steps == 3
        assert caplog.messages == []
        # one --set twice (a script's appended overrides): the last wins, said when they differ (it was silent)
        assert resolve_config("cpu", {"model": "tiny"}, ["batch_size=2", "steps=4", "batch_size=3"])[1].batch_size == 3
        assert caplog.messages == ["--set batch_size given twice (2, then 3): the last wins"]
        caplog.clear()
        assert resolve_config("cpu", {"model": "tiny"}, ["batch_size=2", "batch_size=2"])[1].batch_size == 2
        assert caplog.messages == []


def test_settings_a_training_run_does_not_read_are_said():
    """tile_size/tile_overlap without tiled decode, and card (plan's) in a training run, were taken in silence; with
    --auto-fit (which may turn tiled decode on, and reads the card) they are read. (plan reads both: not said.)"""
    from lowmem_alignprop.settings.config import unread_in_training
    from lowmem_alignprop.settings.profiles import resolve_config

    def notes(sets):
        return unread_in_training(resolve_config("cpu", {"model": "tiny"}, sets)[1], sets)

    assert notes(["tile_size=128", "card=rtx4090"]) == [
        "tile_size shapes tiled decode, and it is off: not used; add --set tiled_decode=true",
        "card=rtx4090 is the card plan times the step for (and --auto-fit searches for): a run measures its own, so "
        "it is not used here"]
    assert notes(["tile_size=128", "tiled_decode=true", "sliced_decode=false"]) == []
    assert notes(["tile_overlap=8", "auto_fit=true", "card=rtx4090"]) == []
    assert notes(["tile_overlap=8", "tile_size=128"])[0].startswith("tile_size and tile_overlap shape tiled decode")


def test_the_toy_models_folder_gets_the_toy_models_defaults():
    """--model toy and its own folder (however written) are one model: its sampling defaults, reward and prompts go
    with either (the folder trained brightness on simple_animals at 512 px)."""
    from lowmem_alignprop.settings.model_kind import TOY_MODEL_DIR

    named = resolve_config("cpu", {"model": "toy"}, [])[1]
    for spelled in (str(TOY_MODEL_DIR), str(TOY_MODEL_DIR) + "/", str(TOY_MODEL_DIR / ".." / "model")):
        cfg = resolve_config("cpu", {"model": spelled}, [])[1]
        assert (cfg.resolution, cfg.reward, cfg.prompts, cfg.sample_steps) == (named.resolution, named.reward,
                                                                                named.prompts, named.sample_steps)
    assert named.reward == "toy_clip" and named.resolution == 64


def test_config_yaml_writes_non_ascii_paths_as_they_are_and_reads_back(tmp_path):
    """config.yaml wrote a prompt file's or run folder's é and 日本 as "\\xE9" escapes and folded a long path onto
    the next line (valid YAML, hard to read or grep); written as UTF-8, a path on one line, they read back the same,
    also as --profile RUN/config.yaml."""
    from types import SimpleNamespace

    from lowmem_alignprop.training.train import Trainer
    from lowmem_alignprop.settings.config import Config

    cfg = Config(prompts=str(tmp_path / "prompts é 日本.txt"), output_dir=str(tmp_path / "run é"))
    text = Trainer.config_yaml(SimpleNamespace(profile_name="cpu", cfg=cfg, searched=None, fits=[],
                                                  profile_values=None))
    assert f"prompts: {cfg.prompts}" in text.splitlines() and "\\x" not in text and "\\u" not in text
    (tmp_path / "config.yaml").write_bytes(text.encode("utf-8"))
    assert load_profile(str(tmp_path / "config.yaml"))[1]["prompts"] == cfg.prompts

"""``lowmem-alignprop export``: the LoRA in kohya, peft and diffusers layouts, merged into the base model, with a
model card; each bad input one line, nothing written.

LoRAs are built the way a run saves them (models.add_lora, lora_B perturbed, save_lora_weights with the adapter
config, base_model.json), with lora_alpha = 2 * rank: an export that drops or misfolds alpha / rank doubles or
halves the LoRA's effect, far above the tolerance. Every loader compared is the consumer's own (diffusers'
load_lora_weights for the kohya file, peft's PeftModel.from_pretrained, from_pretrained for the merged model).
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from loras import ALPHA, RANK, each_of, export, hub_metadata, make_sd_lora, unet_out
from numerics import REORDERED, SAME_OPS, assert_rel_close, relative_difference

from lowmem_alignprop.lora import lora_export as lx
from lowmem_alignprop.lora import lora_files
from lowmem_alignprop.lora import lora_formats as formats
from lowmem_alignprop.cli import main
from lowmem_alignprop.run import hub
from lowmem_alignprop.run import merged_models
from lowmem_alignprop.run.filenames import LORA_BASE_FILE, LORA_WEIGHT_NAME, MERGED_FILE

KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")  # each layer's keys in a kohya file


@pytest.fixture(scope="module")
def sd(tmp_path_factory, tiny_dir):
    return make_sd_lora(Path(tiny_dir), tmp_path_factory.mktemp("sd-run"), xl=False)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, _isolated_cache):
    from midsize import build_tiny_sdxl_pipeline

    base = tmp_path_factory.mktemp("sdxl-base")
    build_tiny_sdxl_pipeline().save_pretrained(base)
    return make_sd_lora(base, tmp_path_factory.mktemp("sdxl-run"), xl=True)


@pytest.fixture(scope="module")
def sd_ff(tmp_path_factory, tiny_dir):
    """lora_layers=attention+ff: the feed-forward layers too (ff.net.0.proj, ff.net.2)."""
    return make_sd_lora(Path(tiny_dir), tmp_path_factory.mktemp("sd-ff-run"), xl=False, layers="attention+ff")


case = each_of("sd", "sdxl", "sd_ff")


def _base_unet(case):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(case["base"] / "unet")


# ---------------------------------------------------------------------------------------------------------
# kohya
# ---------------------------------------------------------------------------------------------------------

def test_kohya_file_loads_in_diffusers_and_reproduces_the_lora(case, tmp_path):
    out = export(tmp_path, case["lora"], "--format", "kohya")
    files = sorted(p.name for p in out.iterdir())
    kohya = [f for f in files if f.endswith(".safetensors")]
    assert kohya == [f"{case['run'].name}_alignprop_lora.safetensors"] and "README.md" in files
    pipe = case["cls"].from_pretrained(case["base"])
    pipe.load_lora_weights(str(out / kohya[0]))  # diffusers' own kohya reader (lora_conversion_utils)
    assert_rel_close(unet_out(pipe.unet, case["xl"]), case["ref"], SAME_OPS, "kohya file via load_lora_weights")


@pytest.mark.parametrize(("schedule", "warmup", "named"), [("constant", 0, "constant"),
                                                           ("constant", 5, "constant_with_warmup"),
                                                           ("cosine", 5, "cosine"), ("linear", 0, "linear")])
def test_the_learning_rate_schedule_is_written_by_sd_scripts_names(schedule, warmup, named):
    """ss_lr_scheduler as sd-scripts names it: a warmup before a constant rate is its constant_with_warmup."""
    meta = formats.training_metadata({"lr": 0.001, "lr_scheduler": schedule, "lr_warmup_steps": warmup})
    assert (meta["ss_lr_scheduler"], meta["ss_lr_warmup_steps"], meta["ss_learning_rate"]) == (named, str(warmup),
                                                                                               "0.001")


def test_kohya_keys_are_what_comfyui_maps(case, tmp_path):
    """ComfyUI (comfy/lora.py model_lora_keys_unet) maps ``lora_unet_`` + a diffusers UNet weight's path without
    ``.weight``, dots as underscores, to that weight, and reads ``NAME.lora_up.weight``, ``NAME.lora_down.weight``
    and ``NAME.alpha`` (scale alpha / rows of lora_down); AUTOMATIC1111 converts the same names. Every adapted
    layer must appear once, with those three keys and nothing else, and name a Linear of matching shape."""
    from safetensors import safe_open

    out = export(tmp_path, case["lora"], "--format", "kohya")
    file = next(out.glob("*.safetensors"))
    base = _base_unet(case).state_dict()
    key_map: dict[str, str] = {}
    for k in base:  # ComfyUI's map, built the same way from the model's own weights
        if k.endswith(".weight"):
            name = "lora_unet_" + k[: -len(".weight")].replace(".", "_")
            assert name not in key_map, f"two weights collapse to {name}: the names would be ambiguous"
            key_map[name] = k
    with safe_open(str(file), framework="pt") as f:
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
        meta = f.metadata()
    names = {k.split(".", 1)[0] for k in keys}
    assert len(names) == len(case["modules"]) == len(keys) // 3
    assert names == {"lora_unet_" + m.replace(".", "_") for m in case["modules"]}
    for name in names:
        assert {f"{name}{s}" for s in KOHYA_SUFFIXES} <= keys
        assert name in key_map, f"{name}: ComfyUI has no UNet weight of that name"
        weight = base[key_map[name]]
        down, up, alpha = (tensors[f"{name}{s}"] for s in KOHYA_SUFFIXES)
        assert down.shape == (RANK, weight.shape[1]) and up.shape == (weight.shape[0], RANK)
        assert alpha.ndim == 0 and alpha.item() == ALPHA  # scale alpha / dim = 8 / 4, as trained
    assert all(k.startswith("lora_unet_") and k.endswith(KOHYA_SUFFIXES) for k in keys)
    assert meta["ss_network_dim"] == str(RANK) and float(meta["ss_network_alpha"]) == ALPHA
    assert meta["ss_network_module"] == "networks.lora"
    # the LoRA it was made from, by its weights' digest (a merged model that holds it refuses the file shared alone)
    assert meta["alignprop_lora_digest"] == lora_files.lora_digest(lora_files.read_lora(str(case["lora"])))
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if case["xl"] else "sd_v1")
    assert meta["ss_v2"] == "False" and meta["modelspec.architecture"] == (
        "stable-diffusion-xl-v1-base/lora" if case["xl"] else "stable-diffusion-v1/lora")
    assert meta["alignprop_reward"] == "colorfulness" and meta["alignprop_steps"] == "3"
    # a local model by its folder's name (as sd-scripts writes it: the user's folders stay out of a shared file)
    assert meta["alignprop_base_model"] == meta["ss_sd_model_name"] == case["base"].name
    assert str(case["base"].parent) not in json.dumps(meta)
    config = yaml.safe_load((case["run"] / "config.yaml").read_text())
    resolution = config["resolution"]
    # how it was trained, under sd-scripts' own keys (what A1111's and Civitai's metadata panels show)
    assert float(meta["ss_learning_rate"]) == float(meta["ss_unet_lr"]) == config["lr"]
    assert (meta["ss_lr_scheduler"], meta["ss_lr_warmup_steps"]) == ("constant", "0") and meta["ss_steps"] == "3"
    assert (meta["ss_seed"], meta["ss_optimizer"]) == (str(config["seed"]), "torch.optim.adamw.AdamW")
    assert meta["ss_output_name"] == meta["modelspec.title"] == file.stem  # (A1111's alias of the LoRA)
    assert (meta["ss_gradient_accumulation_steps"], meta["ss_mixed_precision"]) == (str(config["grad_accum"]),
                                                                                    config["mixed_precision"])
    assert float(meta["ss_max_grad_norm"]) == config["max_grad_norm"]
    assert (meta["ss_v_parameterization"], meta["ss_zero_terminal_snr"]) == ("False", "False")
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["ss_resolution"] == f"({resolution}, {resolution})" and meta["modelspec.resolution"] == \
        f"{resolution}x{resolution}"
    lora = lora_files.read_lora(str(case["lora"]))  # the final reward: the mean of the run's last 3 steps, said
    lora.summary = {**lora.summary, "reward_last": 1.5, "reward_window": 3, "reward_steps": 6, "steps": 6}
    lora.run_config = {**lora.run_config, "init_lora": str(case["base"].parent / "start" / "mine.safetensors")}
    meta = formats.kohya_metadata(lora)
    assert (meta["alignprop_final_reward"], meta["alignprop_final_reward_steps"]) == ("1.5", "3")
    assert meta["alignprop_init_lora"] == "mine.safetensors"


def test_a_runs_start_from_a_lora_is_named_shareably_with_its_digest(sd, tmp_path):
    """--init-lora's LoRA in the card and the kohya header: every run's LoRA folder is called lora/, so its name
    alone said nothing ("lora"), and the card's row gave no digest. Now: the run's name with it, and the SHA-256 of
    the copy the run read (init_lora/), whatever the path holds now (the card's command keeps the path as typed)."""
    import hashlib

    run = tmp_path / "run"
    shutil.copytree(sd["run"], run)
    start = tmp_path / "folders" / "of" / "mine" / "older-run" / "lora"
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "init_lora": str(start)}))
    (run / "init_lora").mkdir()
    copy = run / "init_lora" / LORA_WEIGHT_NAME
    copy.write_bytes((sd["lora"] / LORA_WEIGHT_NAME).read_bytes())
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    meta = formats.kohya_metadata(lora_files.read_lora(str(run / "lora")))
    assert (meta["alignprop_init_lora"], meta["alignprop_init_lora_sha256"]) == ("older-run/lora", digest)
    card = (export(tmp_path / "e", run / "lora", "--format", "kohya") / "README.md").read_text()
    assert f"the LoRA `older-run/lora`, sha256 {digest[:16]} (its own training" in card
    step = start.parent / "checkpoints" / "step-00000300"  # a checkpoint: its run's name, the checkpoints folder
    assert lora_files.shared_name(str(step)) == "older-run/checkpoints/step-00000300"


@pytest.mark.parametrize("settings", [{"optimizer": "adamw"}, {"optimizer": "adamw8bit"},
                                      {"optimizer": "paged_adamw8bit"}, {"deepspeed_zero": 2, "offload": "optimizer"}])
def test_ss_optimizer_is_the_class_path_of_the_optimizer_the_run_stepped_with(settings, monkeypatch):
    """ss_optimizer as sd-scripts writes it: the class path of the optimizer built (build_optimizer's, or DeepSpeed's
    CPU Adam where its state is offloaded), not the config's short name. (DeepSpeed's CPU Adam is made without its
    __init__, which compiles its C++ op: 80 s on a machine that never built it, the reason its tests are `slow`.)"""
    from lowmem_alignprop.memory.optim import build_optimizer
    from lowmem_alignprop.run.distributed import build_deepspeed_optimizer
    from lowmem_alignprop.settings.config import Config

    if settings.get("deepspeed_zero"):
        import deepspeed.ops.adam as ds_adam
        real = ds_adam.DeepSpeedCPUAdam
        monkeypatch.setattr(ds_adam, "DeepSpeedCPUAdam", lambda params, **kwargs: real.__new__(real))
    cfg = Config(**settings)
    params = [torch.nn.Parameter(torch.zeros(4))]
    built = type(build_deepspeed_optimizer(cfg, params) if cfg.deepspeed_zero else build_optimizer(cfg, params))
    meta = formats.training_metadata({"optimizer": cfg.optimizer, "deepspeed_zero": cfg.deepspeed_zero,
                                      "offload": cfg.offload})
    assert meta["ss_optimizer"] == f"{built.__module__}.{built.__name__}"
    assert (built.__name__ == "DeepSpeedCPUAdam") == ("offload" in settings)  # (both sides ask optim.uses_cpu_adam)


def test_ss_optimizer_under_zero_without_offload_is_the_runs_own_optimizer():
    """ZeRO with nothing offloaded steps with the run's optimizer (optim.uses_cpu_adam), not DeepSpeed's CPU Adam."""
    meta = formats.training_metadata({"optimizer": "adamw", "deepspeed_zero": 2, "offload": "none"})
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW"


def test_kohya_metadata_has_the_model_specs_required_keys(case, tmp_path):
    """The model spec's required keys beside modelspec.architecture, as sd-scripts writes them: its version, the
    implementation (sd-scripts: SDXL LoRAs Stability's generative-models, SD 1.x/2.x "diffusers"), the title (the
    file's stem: sd-scripts' output name) and the date the run ended (its summary's, not the export's time: two
    exports of a LoRA are the same bytes; none where the summary has none). An SDXL v-prediction LoRA keeps SDXL's one
    architecture, as sd-scripts writes it (the prediction type in modelspec.prediction_type)."""
    from safetensors import safe_open

    run = tmp_path / "run"
    shutil.copytree(case["run"], run)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "finished_at": "2026-01-02T03:04:05+00:00"}))
    out = export(tmp_path, run / "lora", "--format", "kohya")
    file = next(out.glob("*.safetensors"))
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.implementation"] == (
        "https://github.com/Stability-AI/generative-models" if case["xl"] else "diffusers")
    assert meta["modelspec.title"] == file.stem == "run_alignprop_lora"
    assert meta["modelspec.date"] == "2026-01-02T03:04:05+00:00"
    assert "modelspec.date" not in formats.kohya_metadata(lora_files.read_lora(str(case["lora"])))
    lora = lora_files.read_lora(str(run / "lora"))
    lora.base = {**lora.base, "prediction_type": "v_prediction"}  # (as its run sampled it)
    meta = formats.kohya_metadata(lora)
    assert (meta["modelspec.architecture"], meta["modelspec.prediction_type"]) == (
        "stable-diffusion-xl-v1-base/lora" if case["xl"] else "stable-diffusion-v1/lora", "v")


def test_kohya_card_tells_comfyui_and_a1111_users_how_the_run_sampled(sd, tmp_path):
    """A kohya file on a base whose folder says v-prediction: the card's diffusers code sets it from the folder, but
    ComfyUI and A1111 sample a base checkpoint without its keys as epsilon; the card says the settings there
    (ComfyUI's ModelSamplingDiscrete: v_prediction, zsnr; the run's guidance_rescale: RescaleCFG), as the header's
    ss_v_parameterization / ss_zero_terminal_snr do. An epsilon run's card says none of it. Every card says the DDIM
    sampling the LoRA was trained through, in their samplers' terms (neither samples DDIM at eta 1 by default)."""
    plain = (export(tmp_path / "plain", sd["lora"], "--format", "kohya") / "README.md").read_text()
    assert "ModelSamplingDiscrete" not in plain and "RescaleCFG" not in plain
    from lowmem_alignprop.lora.model_card import num
    config = yaml.safe_load((sd["run"] / "config.yaml").read_text())
    steps, scale = config["sample_steps"], num(config["guidance_scale"])
    assert (f"- Its run rendered (and trained through) DDIM: {steps} steps at eta 1, guidance {scale}. The LoRA is "
            f"tuned for that sampler: ComfyUI: a *KSampler* with sampler `ddpm`, scheduler `ddim_uniform`, {steps} "
            f"steps, cfg {scale}; AUTOMATIC1111 / Forge: sampler *DDIM*, {steps} steps, CFG scale {scale}, and "
            "*Settings > Sampler parameters > Eta for DDIM* 1.") in plain.splitlines(), plain
    base = tmp_path / "v-base"
    shutil.copytree(sd["base"], base)
    scheduler = base / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction"}))
    run = tmp_path / "v-run"
    shutil.copytree(sd["run"], run)
    record = run / "lora" / LORA_BASE_FILE
    record.write_text(json.dumps({**json.loads(record.read_text()), "model": str(base)}))
    card = (export(tmp_path / "v", run / "lora", "--format", "kohya") / "README.md").read_text()
    assert ("- Its run sampled the base as v-prediction: ComfyUI: a *ModelSamplingDiscrete* node after the "
            "checkpoint, sampling `v_prediction`, `zsnr` off; AUTOMATIC1111 / Forge: a base checkpoint that says "
            "v-prediction (its `v_pred` key, or a `.yaml` beside it with `parameterization: \"v\"`)." in card
            and "RescaleCFG" not in card and "sampler `ddim`" not in card), card  # (ddim: its run's eta 0 only)
    config = yaml.safe_load((run / "config.yaml").read_text())  # zero terminal SNR, eta 0 and guidance_rescale
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "zero_terminal_snr": True, "eta": 0.0,
                                                     "guidance_rescale": 0.7}))
    card = (export(tmp_path / "z", run / "lora", "--format", "kohya") / "README.md").read_text()
    assert ("Its run sampled the base as v-prediction and zero terminal SNR: ComfyUI: a *ModelSamplingDiscrete* "
            "node after the checkpoint, sampling `v_prediction`, `zsnr` on" in card
            and "Noise schedule for sampling: Zero Terminal SNR" in card), card
    assert "DDIM: 3 steps at eta 0, guidance 7.5" in card and "with sampler `ddim`, scheduler `sgm_uniform`" in card
    assert "a *RescaleCFG* node after the checkpoint, multiplier 0.7" in card
    # the merged single file carries v_pred / ztsnr (ComfyUI reads them): its card says the rescale, which it cannot
    card = (export(tmp_path / "m", run / "lora", "--merge", "--single-file") / "README.md").read_text()
    assert "a *RescaleCFG* node after the checkpoint, multiplier 0.7" in card and "ModelSamplingDiscrete" not in card
    # (A1111 reads its v_pred key, not its ztsnr key: its own setting, said; the sampler as the kohya card says it)
    assert ("- Its run sampled at zero terminal SNR (the file's `ztsnr` key, which ComfyUI reads): AUTOMATIC1111: "
            "*Settings > Sampler parameters > Noise schedule for sampling: Zero Terminal SNR*.") in card.splitlines()
    assert "with sampler `ddim`, scheduler `sgm_uniform`" in card
    peft = (export(tmp_path / "p", run / "lora", "--format", "peft") / "README.md").read_text()  # (its code sets
    assert "ModelSamplingDiscrete" not in peft and "RescaleCFG" not in peft  # them from the base's folder)


def test_a_reward_file_is_named_in_the_shared_header_by_its_name(sd, tmp_path):
    """A run scored with a reward file of this machine: the kohya header (and the merged single file's, one rule:
    lora_files.shared_reward) names it by its file's name, as it names the base model; a named reward as it is."""
    lora = lora_files.read_lora(str(sd["lora"]))
    lora.run_config = {**lora.run_config, "reward": f"{tmp_path / 'rewards' / 'mine.py'}:score:0.5,aesthetic:0.5"}
    meta = formats.kohya_metadata(lora)
    assert meta["alignprop_reward"] == "mine.py:score:0.5,aesthetic:0.5" and str(tmp_path) not in json.dumps(meta)


def test_kohya_metadata_tells_sd2_as_a1111_and_sdnext_read_it(sd):
    """A1111 takes a LoRA for SD 2.x only from ss_v2 == "True" (else SD1: hidden under an SD2 checkpoint); SD.Next
    reads modelspec.architecture; sd-scripts writes both, v-prediction (SD 2.1 at 768 px) in the architecture."""
    lora = lora_files.read_lora(str(sd["lora"]))
    lora.base = {**lora.base, "model": "sd21"}  # the shipped SD 2.1 architecture: a v-prediction scheduler
    meta = formats.kohya_metadata(lora)
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["modelspec.architecture"]) == (
        "sd_v2", "True", "stable-diffusion-v2-768-v/lora")


def test_kohya_alpha_folds_a_per_layer_alpha_pattern(sd):
    """peft's alpha_pattern (a layer with its own alpha) and rsLoRA (alpha / sqrt(r)) end up in each .alpha."""
    lora = lora_files.read_lora(str(sd["lora"]))
    first, other = lora.modules[0], lora.modules[1]
    lora.config = {**lora.config, "alpha_pattern": {first: 2.0}}
    state = formats.kohya_state_dict(lora)
    assert state[f"{formats.kohya_name(first)}.alpha"].item() == 2.0
    assert state[f"{formats.kohya_name(other)}.alpha"].item() == ALPHA
    lora.config = {**lora.config, "alpha_pattern": {}, "use_rslora": True}
    state = formats.kohya_state_dict(lora)
    assert state[f"{formats.kohya_name(first)}.alpha"].item() == pytest.approx(ALPHA / RANK ** 0.5 * RANK)


# ---------------------------------------------------------------------------------------------------------
# peft, diffusers, merged
# ---------------------------------------------------------------------------------------------------------

def test_peft_folder_loads_with_peft_and_reproduces_the_lora(case, tmp_path):
    from peft import PeftConfig, PeftModel

    out = export(tmp_path, case["lora"], "--format", "peft")
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    config = PeftConfig.from_pretrained(str(out))
    assert (config.r, config.lora_alpha) == (RANK, ALPHA)
    written = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert written == sorted(config.target_modules)  # not peft's list(set): the same bytes every export
    model = PeftModel.from_pretrained(_base_unet(case), str(out))
    assert_rel_close(unet_out(model.base_model.model, case["xl"]), case["ref"], SAME_OPS, "peft folder")


def test_diffusers_export_is_what_the_run_wrote(sd, tmp_path):
    from lowmem_alignprop.lora.lora_files import lora_digest, read_lora
    from lowmem_alignprop.lora.lora_formats import EXPORTED_FROM

    out = export(tmp_path, sd["lora"])  # --format diffusers is the default
    assert (out / LORA_WEIGHT_NAME).read_bytes() == (sd["lora"] / LORA_WEIGHT_NAME).read_bytes()
    # the run's record of its base model, and which LoRA file this export was made from
    assert json.loads((out / LORA_BASE_FILE).read_text()) == {**json.loads((sd["lora"] / LORA_BASE_FILE).read_text()),
                                                              EXPORTED_FROM: lora_digest(read_lora(str(sd["lora"])))}
    pipe = sd["cls"].from_pretrained(sd["base"])
    pipe.load_lora_weights(str(out))
    assert_rel_close(unet_out(pipe.unet, False), sd["ref"], SAME_OPS, "diffusers export")


def test_the_lora_may_be_given_without_its_flag(sd, tmp_path):
    """`export RUN --format kohya` (what users type first) is `export --lora RUN --format kohya`: the same file, byte
    for byte (its header's metadata sorted: safetensors wrote it in a per-process order)."""
    from lowmem_alignprop.cli import main

    assert main(["export", str(sd["run"]), "--format", "kohya", "--out", str(tmp_path / "bare")]) == 0
    flagged = export(tmp_path, sd["run"], "--format", "kohya")
    [a], [b] = (sorted(d.glob("*.safetensors")) for d in (tmp_path / "bare", flagged))
    assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_merged_model_is_base_plus_lora_and_weight_zero_is_the_base(case, tmp_path):
    from diffusers import UNet2DConditionModel

    out = export(tmp_path, case["run"], "--merge")  # the run folder works as --lora too
    merged = UNet2DConditionModel.from_pretrained(out / "unet")
    assert not any("lora" in k for k in merged.state_dict())
    # (W + s B A) x against W x + s B (A x): the same sums grouped otherwise
    assert_rel_close(unet_out(merged, case["xl"]), case["ref"], REORDERED, "merged at weight 1")
    assert (out / "model_index.json").is_file() and (out / "README.md").is_file()
    zero = export(tmp_path / "zero", case["lora"], "--merge", "--weight", "0")
    assert_rel_close(unet_out(UNet2DConditionModel.from_pretrained(zero / "unet"), case["xl"]), case["base_out"],
                     SAME_OPS, "merged at weight 0")


def _images(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_merged_single_file_loads_with_from_single_file_and_renders_base_plus_lora(case, tmp_path):
    """--merge --single-file: one LDM-layout checkpoint (A1111 / ComfyUI); diffusers' from_single_file (offline,
    the base model's own configs) reads it back into base + LoRA: the UNet's outputs and the images."""
    from safetensors import safe_open

    from lowmem_alignprop.models.arch import load_single_file

    out = export(tmp_path, case["lora"], "--merge", "--single-file")
    files = sorted(p.name for p in out.iterdir())
    file = out / f"{case['run'].name}_alignprop_merged.safetensors"
    assert files == sorted([file.name, "README.md", "before_after.png"])
    with safe_open(str(file), framework="pt") as f:
        keys = set(f.keys())  # noqa: SIM118
    assert any(k.startswith("model.diffusion_model.") for k in keys) and any(
        k.startswith("first_stage_model.") for k in keys)
    assert any(k.startswith("conditioner.embedders.1.model." if case["xl"] else "cond_stage_model.transformer.")
               for k in keys)
    loaded = load_single_file(file, config_dir=case["base"])
    assert_rel_close(unet_out(loaded.unet, case["xl"]), case["ref"], REORDERED, "single file, UNet")
    reference = case["cls"].from_pretrained(case["base"])
    base_images = _images(reference)
    reference.load_lora_weights(str(case["lora"]))
    lora_images = _images(reference)
    assert relative_difference(lora_images, base_images) > 100 * REORDERED
    assert_rel_close(_images(loaded), lora_images, REORDERED, "single file, images")
    card = (out / "README.md").read_text()
    assert "ComfyUI/models/checkpoints/" in card and "models/Stable-diffusion/" in card
    # the card's diffusers line is the call above: with the base's configs (not guessed from the shapes, which for a
    # model of no standard shape fails)
    assert f'{case["cls"].__name__}.from_single_file("{file.name}", config="{case["base"]}")' in card
    assert "v_pred" not in keys
    # a run that sampled its base as v-prediction: the empty "v_pred" key by which ComfyUI samples a checkpoint so
    run = tmp_path / "v-run"
    shutil.copytree(case["run"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "prediction_type": "v_prediction"}))
    v_file = next(export(tmp_path / "v", run / "lora", "--merge", "--single-file").glob("*.safetensors"))
    with safe_open(str(v_file), framework="pt") as f:
        assert f.get_tensor("v_pred").numel() == 0 and set(f.keys()) == keys | {"v_pred"}  # noqa: SIM118
        assert f.metadata()["modelspec.prediction_type"] == "v"  # (the model spec's word for it)
    v_loaded = load_single_file(v_file, config_dir=case["base"])  # ... and that this loader reads too
    assert v_loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.scheduler.config.prediction_type == "epsilon"
    assert_rel_close(unet_out(v_loaded.unet, case["xl"]), case["ref"], REORDERED, "a v-prediction single file, UNet")


sd_or_xl = each_of("sd", "sdxl")


def test_merged_single_file_has_the_model_spec_of_a_checkpoint(sd_or_xl, tmp_path):
    """A merged single file's header has the model spec's keys as sd-scripts writes them for a checkpoint (A1111's
    and Civitai's metadata panels show them): the architecture without kohya's "/lora", Stability's implementation
    (sd-scripts' for every Stable Diffusion checkpoint), the file's stem as title, the trained resolution, the
    prediction type and the date the run ended (summary.json's: two exports are the same bytes)."""
    from safetensors import safe_open

    run = tmp_path / "run"
    shutil.copytree(sd_or_xl["run"], run)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "finished_at": "2026-01-02T03:04:05+00:00"}))
    files = [next(export(tmp_path / e, run / "lora", "--merge", "--single-file").glob("*.safetensors"))
             for e in ("a", "b")]
    assert files[0].read_bytes() == files[1].read_bytes()
    with safe_open(str(files[0]), framework="pt") as f:
        meta = f.metadata()
    resolution = yaml.safe_load((run / "config.yaml").read_text())["resolution"]
    assert {k: v for k, v in meta.items() if k.startswith("modelspec.")} == {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-xl-v1-base" if sd_or_xl["xl"] else "stable-diffusion-v1",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": files[0].stem == "run_alignprop_merged" and files[0].stem,
        "modelspec.date": "2026-01-02T03:04:05+00:00", "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "epsilon"}
    assert meta["alignprop_reward"] == "colorfulness" and meta["format"] == "pt"  # (ours beside them, as before)


def test_the_cards_ddim_line_at_an_eta_no_webui_sampler_has_and_with_a_negative_prompt():
    """_ddim_line alone: eta 0.5 (neither ComfyUI sampler has it: both named, the nearest), the run's negative prompt,
    and a config without guidance_scale; none without the run's steps or eta."""
    from lowmem_alignprop.lora.model_card import _ddim_line

    assert _ddim_line({"sample_steps": 20, "eta": 0.5, "guidance_scale": 5.0, "negative_prompt": "blurry"}, True) == (
        "- Its run rendered (and trained through) DDIM: 20 steps at eta 0.5, guidance 5, negative prompt `blurry`. "
        "The LoRA is tuned for that sampler: ComfyUI: a *KSampler* with sampler `ddim` (eta 0) or `ddpm` (eta 1), the "
        "nearest (none has eta 0.5), scheduler `sgm_uniform`, 20 steps, cfg 5; AUTOMATIC1111 / Forge: sampler *DDIM*, "
        "20 steps, CFG scale 5, and *Settings > Sampler parameters > Eta for DDIM* 0.5.")
    assert "DDIM: 4 steps at eta 0, guidance as the run's. " in _ddim_line({"sample_steps": 4, "eta": 0}, False)
    assert _ddim_line({"sample_steps": 4}, False) is None and _ddim_line({"eta": 1.0}, False) is None
    # eta 0 and 1: ComfyUI's own sampler of that eta; the eta as a user types it (1, not 1.0)
    assert _ddim_line({"sample_steps": 50, "eta": 1.0, "guidance_scale": 7.5}, False) == (
        "- Its run rendered (and trained through) DDIM: 50 steps at eta 1, guidance 7.5. The LoRA is tuned for that "
        "sampler: ComfyUI: a *KSampler* with sampler `ddpm`, scheduler `ddim_uniform`, 50 steps, cfg 7.5; "
        "AUTOMATIC1111 / Forge: sampler *DDIM*, 50 steps, CFG scale 7.5, and *Settings > Sampler parameters > Eta for "
        "DDIM* 1.")
    assert "a *KSampler* with sampler `ddim`, scheduler" in _ddim_line({"sample_steps": 4, "eta": 0.0}, False)


def test_a_lora_of_a_same_named_other_base_is_told_from_the_merged_files_by_its_weights(sd, tmp_path):
    """`sample --model MERGED` and init-lora's message pass the LoRA's recorded fingerprint to same_model: a LoRA
    whose record names a folder of the merged base's name elsewhere is the merged file's only where its recorded
    first weights are the merged base's (its run's settings taken; init-lora's message says nothing), though the
    single file's header names its base by that name alone."""
    import argparse

    from lowmem_alignprop.lora.init_lora import trained_on
    from lowmem_alignprop.commands.sample_cmd import take_run_settings

    single = next(export(tmp_path / "single", sd["lora"], "--merge", "--single-file").glob("*.safetensors"))
    lora = tmp_path / "namesake-run" / "lora"
    shutil.copytree(sd["lora"], lora)
    record = json.loads((lora / LORA_BASE_FILE).read_text())
    namesake = tmp_path / "elsewhere" / sd["base"].name
    for conv_in, same in ((record["conv_in"], True), ([v + 0.5 for v in record["conv_in"]], False)):
        (lora / LORA_BASE_FILE).write_text(json.dumps({**record, "model": str(namesake), "conv_in": conv_in}))
        args = argparse.Namespace(lora=[str(lora)], set=[], model=str(single), reward=None, prompts=None, recipe=None,
                                  output_dir="out")
        take_run_settings(args, [])
        assert bool(args.set) == same, args.set  # (its run's image settings: taken for a LoRA of this model only)
        said = trained_on(str(lora), lora / LORA_WEIGHT_NAME, str(single))
        assert (said == "") == same, said


def test_merged_at_half_weight_matches_the_adapter_at_half_weight(sd, tmp_path):
    from diffusers import UNet2DConditionModel

    out = export(tmp_path, sd["lora"], "--merge", "--weight", "0.5")
    pipe = sd["cls"].from_pretrained(sd["base"])
    pipe.load_lora_weights(str(sd["lora"]), adapter_name="a")
    pipe.set_adapters(["a"], adapter_weights=[0.5])
    half = unet_out(pipe.unet, False)
    assert relative_difference(half, sd["ref"]) > 100 * REORDERED
    assert_rel_close(unet_out(UNet2DConditionModel.from_pretrained(out / "unet"), False), half, REORDERED,
                     "merged at weight 0.5")
    # the run's before/after grid shows the LoRA at weight 1: not this model's images
    assert not (out / "before_after.png").exists() and "before_after.png" not in (out / "README.md").read_text()


def test_a_lora_merged_into_a_model_that_holds_it_is_refused_and_another_stacks(sd, tmp_path, capsys, monkeypatch):
    """A merged model passes the base's fingerprint (the LoRA leaves the first layer alone): merging the same LoRA
    into it again applied it twice. Its record (merged_loras.json; a single file's header) refuses that, whichever
    folder holds the LoRA; another LoRA merges on top, and the card names the model it went into."""
    from diffusers import UNet2DConditionModel

    merged = export(tmp_path / "once", sd["lora"], "--merge")
    record = json.loads((merged / "merged_loras.json").read_text())
    assert [(r["lora"], r["weight"], r["into"]) for r in record] == [(str(sd["lora"]), 1.0, str(sd["base"]))]
    single = export(tmp_path / "single", sd["lora"], "--merge", "--single-file")
    copy = export(tmp_path / "copy", sd["lora"], "--format", "diffusers")  # the same weights, another folder
    from lowmem_alignprop.run.merged_models import merged_record
    upper = tmp_path / "renamed.SAFETENSORS"  # a user's rename: the loaders read it, so its record counts too
    shutil.copyfile(next(single.glob("*.safetensors")), upper)
    assert merged_record(str(upper)) == merged_record(str(next(single.glob("*.safetensors")))) != []
    # the single file is shared: its header names the base model and LoRA by name, as the kohya header does (the
    # folder's merged_loras.json, read on this machine only, keeps the paths); the digest still tells the LoRA
    from safetensors import safe_open
    with safe_open(str(upper), framework="pt") as f:
        header = f.metadata()
    assert str(tmp_path.parent) not in json.dumps(header) and header["alignprop_base_model"] == sd["base"].name
    lora_name = f"{sd['run'].name}/lora"
    assert [(r["lora"], r["weight"], r["into"]) for r in merged_record(str(upper))] == [(lora_name, 1.0,
                                                                                         sd["base"].name)]
    from lowmem_alignprop.lora.base_records import same_model  # `sample --model FILE`: the LoRA's run's settings
    assert same_model(str(upper), str(sd["base"])) and not same_model(str(upper), str(tmp_path / "other-base"))
    # the header names the base by its folder's name only; the weights it recorded tell a same-named other base apart
    from lowmem_alignprop.lora.base_records import recorded_fingerprint
    from lowmem_alignprop.lora.lora_args import LoraSpec
    ours = recorded_fingerprint(LoraSpec(arg="a", file=sd["lora"] / LORA_WEIGHT_NAME, weight=1.0, name="a"))
    theirs = {**ours, "conv_in": [v + 0.5 for v in ours["conv_in"]]}  # another model's first layer
    namesake = tmp_path / "elsewhere" / sd["base"].name
    assert same_model(str(upper), str(namesake), ours) and not same_model(str(upper), str(namesake), theirs)
    assert not same_model(str(upper), str(sd["base"]), theirs)
    namesake.mkdir(parents=True)
    monkeypatch.chdir(namesake.parent)  # a folder of the base's name here: the header's name is not this one
    assert same_model(str(upper), str(sd["base"]), ours) and not same_model(str(upper), str(namesake), theirs)
    # (no fingerprint recorded: the header's name is the folder of that name here, not the base elsewhere)
    assert same_model(str(upper), str(namesake)) and not same_model(str(upper), str(sd["base"]))
    monkeypatch.undo()
    for target, held, into in ((merged, sd["lora"], sd["base"]),
                               (next(single.glob("*.safetensors")), lora_name, sd["base"].name)):
        for lora in (sd["lora"], copy):
            capsys.readouterr()
            assert main(["export", "--lora", str(lora), "--merge", "--model", str(target), "--out",
                         str(tmp_path / "twice")]) == 2
            err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
            assert err == [f"error: --merge: {target} already holds this LoRA ({held}, merged at weight 1): "
                           f"merging it again would apply it twice; merge it into {into} instead (leave --model "
                           f"out, or pass --model {into}), with --weight for another strength"]
            assert not (tmp_path / "twice").exists()
    # another LoRA (other weights) stacks: base + first + second, recorded in order
    other = make_sd_lora(sd["base"], tmp_path / "other-run", xl=False, seed=5)
    both = export(tmp_path / "both", other["lora"], "--merge", "--model", str(merged))
    assert [r["into"] for r in json.loads((both / "merged_loras.json").read_text())] == [str(sd["base"]),
                                                                                         str(merged)]
    # the stack is a merge of the base (its record's first model), not of the model it went into last
    assert same_model(str(both), str(sd["base"])) and not same_model(str(both), str(merged))
    stacked = UNet2DConditionModel.from_pretrained(both / "unet")
    once = UNet2DConditionModel.from_pretrained(merged / "unet")
    assert relative_difference(unet_out(stacked, False), unet_out(once, False)) > 100 * REORDERED
    card = (both / "README.md").read_text()
    assert f"| base model | `{merged}` (the LoRA was trained on `{sd['base']}`) |" in card
    assert "sample reward, before -> after (the LoRA as trained: weight 1, on its base model)" in card
    assert not (both / "before_after.png").exists()  # its grid shows the LoRA on its own base
    # as one file at another weight: its header's weight is this merge's, its record both merges'
    from safetensors import safe_open
    file = next(export(tmp_path / "both-single", other["lora"], "--merge", "--single-file", "--weight", "0.5",
                       "--model", str(merged)).glob("*.safetensors"))
    with safe_open(str(file), framework="pt") as f:
        assert f.metadata()["alignprop_lora_weight"] == "0.5"
    assert [r["weight"] for r in merged_record(str(file))] == [1.0, 0.5]


def test_sampling_a_lora_on_a_model_that_holds_it_is_refused(sd, tmp_path, capsys):
    """`sample LORA --model MERGED`, where export --merge fused LORA into MERGED, applied it twice (its "base" column
    was the LoRA's images): refused as export --merge refuses it; a negative weight (which takes it out) passes."""
    from lowmem_alignprop.lora.lora_args import parse_lora
    from lowmem_alignprop.lora.lora_merge import refuse_held_loras

    merged = export(tmp_path / "merged", sd["lora"], "--merge")
    capsys.readouterr()
    assert main(["sample", str(sd["lora"]), "--model", str(merged), "--output-dir", str(tmp_path / "s")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert err == [f"error: --lora {sd['lora']}: --model {merged} already holds this LoRA (export --merge fused it at "
                   f"weight 1): sampling it with the LoRA again applies it twice; pass --model {sd['base']}, the model "
                   "it was merged into"], err
    assert not (tmp_path / "s").exists()
    refuse_held_loras([parse_lora(f"{sd['lora']}:-1", 0)], str(merged))  # takes it out again: allowed
    refuse_held_loras([parse_lora(f"{sd['lora']}:0", 0)], str(merged))  # at weight 0 it applies nothing
    refuse_held_loras([parse_lora(str(sd["lora"]), 0)], str(sd["base"]))  # the base holds nothing


def test_a_merged_model_sampled_alone_renders_what_the_base_renders_with_the_lora_at_weight_1(sd, tmp_path,
                                                                                               monkeypatch, caplog):
    """`sample --model MERGED` without a LoRA (refused before: "give the LoRA to evaluate") renders, from the same
    seeds and with no --set, the images `sample --model BASE --lora LORA` renders in its LoRA row: its record keeps
    the LoRA's run's settings (3 steps, not the cpu profile's 10; reward colorfulness), taken as `sample LORA` takes
    them; (W + s B A) x against W x + s B (A x) in every adapted layer, the same sums grouped otherwise, through 3
    DDIM steps and the VAE: REORDERED. A --set still wins."""
    from lowmem_alignprop.training import grid

    merged = export(tmp_path, sd["lora"], "--merge")
    entry = json.loads((merged / MERGED_FILE).read_text())[-1]  # the LoRA's run's settings, whether the LoRA stays
    assert (entry["image_settings"], entry["scoring"]) == (
        {"resolution": 64, "sample_steps": 3, "guidance_scale": 7.5, "eta": 1.0},
        {"reward": "colorfulness", "prompts": "simple_animals"})
    rows, save = [], grid.save_sample_grid
    monkeypatch.setattr(grid, "save_sample_grid", lambda path, labels, base, lora, **kw: (
        rows.append((base, lora)), save(path, labels, base, lora, **kw))[-1])
    same = ["--profile", "cpu", "--seed", "3", "--prompt", "a photo of a cat", "--prompt", "a red dog"]
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main(["sample", *same, "--model", str(merged), "--output-dir", str(tmp_path / "alone")]) == 0
        assert main(["sample", *same, "--model", str(sd["base"]), "--lora", str(sd["lora"]), "--output-dir",
                     str(tmp_path / "with")]) == 0
    run = "resolution=64 sample_steps=3 guidance_scale=7.5 eta=1.0 reward=colorfulness"  # (sd's run: cpu, 3 steps)
    assert (f"--model {merged} is an export --merge ({Path(sd['lora']).absolute()} at weight 1 into {sd['base']}): "
            f"sampled as its LoRA's run did: {run} (--set KEY=VALUE chooses)") in caplog.messages
    assert f"--model {sd['base']} is the model {sd['lora']} was trained on; as its run did: {run}" in caplog.messages
    (alone, alone_r), none = rows[0]
    (base, _), (with_lora, lora_r) = rows[1]
    assert none is None and alone.shape == with_lora.shape == (2, 3, 64, 64)
    assert relative_difference(with_lora, base) > 100 * REORDERED  # the LoRA shows: the comparison proves something
    assert_rel_close(alone, with_lora, REORDERED, "the merged model's images")
    ours = json.loads((tmp_path / "alone" / "sample_results.json").read_text())
    theirs = json.loads((tmp_path / "with" / "sample_results.json").read_text())
    assert ours["model"] == str(merged) and ours["loras"] == [] and ours["sampler"] == theirs["sampler"]
    assert ours["sampler"]["sample_steps"] == 3 and ours["reward"] == theirs["reward"] == "colorfulness", ours
    assert [p["seeds"] for p in ours["per_prompt"]] == [p["seeds"] for p in theirs["per_prompt"]] == [[3], [4]]
    assert_rel_close(alone_r, lora_r, REORDERED, "their rewards")
    # the command line wins: its steps and eta, the run's others
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main(["sample", *same, "--model", str(merged), "--set", "sample_steps=2", "--set", "eta=0",
                     "--output-dir", str(tmp_path / "set")]) == 0
    assert [m.split("did: ")[1] for m in caplog.messages if "is an export --merge" in m] == [
        "resolution=64 guidance_scale=7.5 reward=colorfulness (--set KEY=VALUE chooses)"]
    mine = json.loads((tmp_path / "set" / "sample_results.json").read_text())
    assert (mine["sampler"]["sample_steps"], mine["sampler"]["eta"], mine["reward"]) == (2, 0.0, "colorfulness"), mine
    # a record without the settings (a merge from before export --merge wrote them), its LoRA gone: the command's
    (merged / MERGED_FILE).write_text(json.dumps([{k: v for k, v in entry.items() if k not in ("image_settings",
                                                   "scoring")} | {"lora": str(tmp_path / "gone")}]))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main(["sample", *same, "--model", str(merged), "--output-dir", str(tmp_path / "old")]) == 0
    assert [m for m in caplog.messages if "is an export --merge" in m] == [
        f"--model {merged} is an export --merge ({tmp_path / 'gone'} at weight 1 into {sd['base']}): its LoRA's run's "
        "settings are not recorded, so it renders with this command's (64 px, 10 steps, guidance 7.5); sample LORA "
        "--model BASE renders as that run did"]


def test_a_merged_model_sampled_alone_takes_its_record_s_settings_else_its_lora_s_else_none(sd, tmp_path, caplog):
    """Which run settings `sample --model MERGED` takes (sample_cmd.take_run_settings; nothing rendered): its
    merged_loras.json's own, though the LoRA folder is gone; for a record without them (a merge made before export
    --merge wrote them) the LoRA's base_model.json where it is still there, else none (sample_main's line on the
    command's settings); of several LoRAs the last one's, a line naming the others' that differ. Never the VAE or
    model_components: the merged model holds its own."""
    import argparse

    from lowmem_alignprop.commands.sample_cmd import take_run_settings

    lora = tmp_path / "run" / "lora"
    shutil.copytree(sd["lora"], lora)
    record = json.loads((lora / LORA_BASE_FILE).read_text())
    record["image_settings"] = {**record["image_settings"], "vae": str(tmp_path), "sample_steps": 7}
    (lora / LORA_BASE_FILE).write_text(json.dumps(record))
    model = tmp_path / "merged"
    model.mkdir()
    entry = {"lora": str(lora), "digest": "a", "weight": 1.0, "into": str(sd["base"])}

    def taken(*entries, sets=()):
        (model / MERGED_FILE).write_text(json.dumps(list(entries)))
        args = argparse.Namespace(lora=[], set=list(sets), model=str(model), reward=None, prompts=None, recipe=None,
                                  output_dir="out")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
            merged_run = take_run_settings(args, []).merged_run
        return merged_run, args.set[len(sets):], [m for m in caplog.messages if "--model" in m]

    # the record's own settings (no LoRA folder needed): what export --merge writes
    own = {**entry, "lora": str(tmp_path / "gone"), "scoring": {"reward": "brightness"},
           "image_settings": {"resolution": 32, "sample_steps": 4, "vae": "some/vae"}}
    assert taken(own)[:2] == (True, ["resolution=32", "sample_steps=4", "reward=brightness"])
    assert taken(own, sets=["sample_steps=9"])[:2] == (True, ["resolution=32", "reward=brightness"])
    # an older record: the LoRA's base_model.json (its run's config.yaml is not beside this copy), VAE left out
    ok, sets, said = taken(entry)
    assert ok and "sample_steps=7" in sets and not any(s.startswith("vae=") for s in sets), sets
    assert said == [f"--model {model} is an export --merge ({lora} at weight 1 into {sd['base']}): sampled as its "
                    f"LoRA's run did: {' '.join(sets)} (--set KEY=VALUE chooses)"]
    shutil.rmtree(lora.parent)
    assert taken(entry) == (False, [], [])  # gone: nothing recorded, sample_main says the command's settings
    # several: the last merged one's, the other's that differ said in one line; one merged out again counts not
    first = {**own, "lora": "A", "digest": "a", "image_settings": {"resolution": 48, "sample_steps": 4}}
    last = {**own, "lora": "B", "digest": "b"}
    ok, sets, said = taken(first, last)
    assert ok and sets == ["resolution=32", "sample_steps=4", "reward=brightness"], sets
    assert said[1:] == [f"--model {model} holds LoRAs whose runs sampled otherwise: A's with resolution=48; "
                        "the images use the last one's, B's (resolution=32); --set KEY=VALUE chooses"], said
    assert "sampled as the run of B, the last LoRA merged into it, did" in said[0]
    assert len(taken(first, last, {**first, "weight": -1.0})[2]) == 1  # A taken out again: no line on it


def test_a_merged_model_holds_a_lora_by_the_sum_of_its_merges():
    """merged_loras.json's entries of one LoRA add up: merged at weight 0 (the base model, as --weight says), or at
    0.5 then -0.5, the model holds none of it (sample and a second merge refused it as 'applied twice')."""
    from lowmem_alignprop.lora.lora_merge import held_in

    one = {"digest": "a", "weight": 0.5, "into": "base"}
    assert held_in([one], "a")["weight"] == 0.5 and held_in([one], "b") is None
    assert held_in([{**one, "weight": 0.0}], "a") is None
    assert held_in([one, {**one, "weight": -0.5, "into": "m1"}], "a") is None
    assert held_in([one, {"digest": "b", "weight": 1.0}, {**one, "into": "m2"}], "a") == {**one, "into": "m2",
                                                                                         "weight": 1.0}


# ---------------------------------------------------------------------------------------------------------
# the model card
# ---------------------------------------------------------------------------------------------------------

def test_model_card_has_front_matter_the_runs_numbers_and_a_command_that_retrains_it(sd, tmp_path):
    from huggingface_hub import ModelCard

    from lowmem_alignprop.cli import common_parser, config_from_args

    out = export(tmp_path, sd["lora"], "--format", "kohya")
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and "lora" in card.data.tags and "stable-diffusion" in card.data.tags
    assert card.data.base_model is None  # a local folder is no hub id
    assert card.data.license is None and "# license:" in text  # left to the user: the base model's as the example
    assert "# license: set the license of the base model here (SD 1.x's: license: creativeml-openrail-m)" in text
    for needle in ("colorfulness", "| steps | 3 |", "| profile | cpu |", "K ~ U{1..2} of 3 DDIM steps",
                   "0.4321 -> 0.5678", "0.4100 -> 0.5900", "| LoRA rank / alpha | 4 / 8 (",
                   "![before and after training, same seeds](before_after.png)",
                   "ComfyUI/models/loras/", "models/Lora/",
                   f"lowmem-alignprop export --lora {sd['lora']} --out {out} --format kohya"):
        assert needle in text, needle
    assert (out / "before_after.png").read_bytes() == (sd["run"] / "samples" / "before_after.png").read_bytes()
    # the training command in the card gives the run's config back
    train_cmd = next(line for line in text.splitlines() if line.startswith("lowmem-alignprop --profile"))
    name, cfg = config_from_args(common_parser("t", "t").parse_args(shlex.split(train_cmd)[1:]))
    saved = yaml.safe_load((sd["run"] / "config.yaml").read_text())
    assert {"profile": name, **cfg.to_dict()} == saved


@pytest.mark.parametrize("outputs", [True, False])
def test_the_card_of_an_ema_run_says_its_weights_are_the_average(sd, tmp_path, outputs):
    """With ema_decay (and ema_outputs, the default) lora/ holds the average, not the last trained weights: its card
    says so; with ema_outputs=false (the trained weights) it says nothing of an average."""
    run = tmp_path / "run"
    shutil.copytree(sd["run"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "ema_decay": 0.99, "ema_outputs": outputs}))
    text = (export(tmp_path, run / "lora", "--format", "kohya") / "README.md").read_text()
    row = "| weights | the exponential moving average of the trained LoRA (decay 0.99) |"
    assert (row in text) is outputs and ("| weights |" in text) is outputs


def test_the_card_says_what_the_loss_did_beside_raising_the_reward(sd, tmp_path):
    """reward_target, reward_cap, kl_coeff, loss_scale, lv_draws and a recipe change what the reward curve means (a
    reward_target run's reward falls by design): the card said none of them."""
    run = tmp_path / "run"
    shutil.copytree(sd["run"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "reward_target": 50.0, "kl_coeff": 0.1,
                                                     "lv_draws": 2}))
    text = (export(tmp_path, run / "lora", "--format", "kohya") / "README.md").read_text()
    assert ("| objective | toward reward_target 50 (the reward falls where it started above); KL penalty to the base "
            "model, kl_coeff 0.1; DRaFT-LV, 2 draws of the last step |") in text
    plain = (export(tmp_path / "plain", sd["lora"], "--format", "kohya") / "README.md").read_text()
    assert "| objective |" not in plain  # the plain AlignProp loss: no row
    assert f"| resolution | {config['resolution']} px |" in plain  # (the card named none: the kohya header only)
    summary = json.loads((run / "summary.json").read_text())  # --auto-fit's changes: after the command it shows
    (run / "summary.json").write_text(json.dumps({**summary, "auto_fit": [
        {"step": 2, "stage": "reward", "change": {"batch_size": 1, "grad_accum": 2}, "why": "w"}]}))
    fitted = (export(tmp_path / "fitted", run / "lora", "--format", "kohya") / "README.md").read_text()
    assert "| --auto-fit's changes | step 2: `--set batch_size=1 --set grad_accum=2` |" in fitted
    assert "| exact fidelity (toy world)" not in plain


def test_the_card_of_a_toy_world_run_shows_the_exact_fidelity_and_code_that_loads_its_base(sd, tmp_path):
    """In the toy world the card shows the exact evaluators' before -> after beside the reward (a reward that rose
    while the images went wrong read as a success), and its code loads the toy model from the package: it said
    from_pretrained("toy"), which fails (no such hub id or folder)."""
    from lowmem_alignprop.lora.model_card import _usage

    run = tmp_path / "run"
    shutil.copytree(sd["run"], run)
    summary = json.loads((run / "summary.json").read_text())
    summary["toy_world"] = {w: {"fidelity_score": s, "fidelity_all_ok": a, "reward": 1.0}
                            for w, s, a in (("before", 0.675, 0.4375), ("after", 0.6875, 0.5))}
    (run / "summary.json").write_text(json.dumps(summary))
    text = (export(tmp_path, run / "lora", "--format", "kohya") / "README.md").read_text()
    assert "| exact fidelity (toy world), before -> after | score 0.675 -> 0.688, all right 44% -> 50% |" in text
    code = _usage("diffusers", ["pytorch_lora_weights.safetensors"], "toy", None)
    assert code[:4] == ["```python", "from diffusers import DiffusionPipeline",
                        "from lowmem_alignprop.models.loading import TOY_MODEL_DIR",
                        "pipe = DiffusionPipeline.from_pretrained(TOY_MODEL_DIR)"]
    scope: dict = {}
    exec("\n".join(code[1:4]), scope)  # the card's lines load the model as written
    assert type(scope["pipe"]).__name__ == "StableDiffusionPipeline"
    single = _usage("single-file", ["m.safetensors"], "toy", 1.0, sdxl=True)[2]
    assert "StableDiffusionXLPipeline.from_single_file(\"m.safetensors\", config=TOY_MODEL_DIR)" in single


def test_the_card_of_an_interrupted_run_counts_the_steps_it_trained(sd, tmp_path):
    """A run stopped after 2 of its 10 steps: the card's steps row is the 2 steps the LoRA had (summary.json's
    steps_done), not the 10 planned, and a note says it was interrupted."""
    run = tmp_path / "run"
    shutil.copytree(sd["run"], run)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "steps": 10, "steps_done": 2, "interrupted": True}))
    grid = run / "samples" / "before_after.png"  # interrupted: no after samples, its step 2's --sample-every grid
    assert grid.is_file()
    grid.rename(run / "samples" / "step-000002.png")
    out = export(tmp_path, run / "lora", "--format", "kohya")
    text = (out / "README.md").read_text()
    assert "| steps | 2 |" in text and "| steps | 10 |" not in text
    assert "| note | the run was interrupted before its last step |" in text
    assert "![before training and at step 2, same seeds](step-000002.png)" in text
    assert (out / "step-000002.png").is_file()


def test_the_card_of_a_run_its_time_limit_stopped_says_so(sd, tmp_path):
    """A run that --max-minutes 45 stopped after 2 of its 10 steps: the card says that, with the limit and the steps
    (not the generic 'interrupted' note, which reads as a crash or a Ctrl-C), like the early stop's row; a resume that
    then trained to the end (stopped_at null) has neither."""
    run = tmp_path / "run"
    shutil.copytree(sd["run"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "steps": 10, "max_minutes": 45.0}))
    summary = json.loads((run / "summary.json").read_text())
    limit = {"max_minutes": 45.0, "minutes_used": 44.1, "stopped_at": 2}
    (run / "summary.json").write_text(json.dumps({**summary, "steps": 10, "steps_done": 2, "interrupted": True,
                                                  "time_limit": limit}))
    text = (export(tmp_path, run / "lora", "--format", "kohya") / "README.md").read_text()
    assert ("| time limit | stopped at its time limit (--max-minutes 45) after step 2 of 10: `--resume latest` trains "
            "steps 3-10 |") in text
    assert "| note |" not in text and "| steps | 2 |" in text
    (run / "summary.json").write_text(json.dumps({**summary, "steps": 10, "steps_done": 10, "interrupted": False,
                                                  "time_limit": {**limit, "stopped_at": None}}))
    text = (export(tmp_path / "on", run / "lora", "--format", "kohya") / "README.md").read_text()
    assert "| time limit |" not in text and "| note |" not in text


def test_the_card_of_a_run_that_stopped_on_an_error_counts_its_checkpoints_steps(sd, tmp_path):
    """A run stopped by an error (or killed) writes no summary.json: the card said the 10 steps config.yaml planned
    for a LoRA of the newest checkpoint's step, with no note; now that step, and a note."""
    run = tmp_path / "run"
    shutil.copytree(sd["run"], run)
    (run / "summary.json").unlink()
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "steps": 10}))
    step = 3  # the newest checkpoint's (lora/ is written from it: export's rewrite_from_checkpoint)
    for n in (2, step):
        (run / "checkpoints" / f"step-{n:08d}").mkdir(parents=True)
    text = (export(tmp_path, run / "lora", "--format", "kohya") / "README.md").read_text()
    assert f"| steps | {step} |" in text and "| steps | 10 |" not in text
    assert (f"| note | the run stopped at step {step} of 10 (an error or a kill) and wrote no summary: this LoRA is "
            "that step's |") in text


def test_the_card_says_where_a_run_started_and_where_it_stopped_early(sd, tmp_path):
    """A run trained on from another LoRA (--init-lora): a row names that LoRA, whose training the steps do not count
    and whose images the samples' "before" are (the card read as 2 steps from the base model); an early stop says
    its step and the best one (best/); a run of 2 processes says so, and that its command ran under the launcher
    (run alone it trains half the images a step)."""
    run = tmp_path / "run"
    shutil.copytree(sd["run"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "init_lora": "/runs/first/lora"}))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "early_stopped_at": 3, "best_step": 1, "processes": 2}))
    text = (export(tmp_path, run / "lora", "--format", "kohya") / "README.md").read_text()
    assert ("| started from | the LoRA `first/lora` (its own training is not in the steps above; the samples' "
            "\"before\" are its images) |") in text
    assert ("| early stop | at step 3: the held-out evaluation stopped improving (its best: step 1, the run's best/) |"
            in text)
    per = config["batch_size"] * config["grad_accum"]
    assert (f"| processes | 2 (`accelerate launch --multi_gpu --num_processes 2`): {2 * per} images per optimizer "
            "step |") in text
    how = text.split("## How it was made")[1].splitlines()
    assert how[how.index("```bash") + 1] == ("# under accelerate launch --multi_gpu --num_processes 2 -m "
                                             "lowmem_alignprop with these arguments")
    plain = (export(tmp_path / "plain", sd["lora"], "--format", "kohya") / "README.md").read_text()
    assert "| started from |" not in plain and "| early stop |" not in plain and "| processes |" not in plain


def test_model_card_names_a_hub_base_model_and_peft_library(sd, tmp_path):
    from huggingface_hub import ModelCard

    lora = lora_files.read_lora(str(sd["lora"]))
    lora.base = {**lora.base, "model": "runwayml/stable-diffusion-v1-5"}
    lx.export(lora, "peft", tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "runwayml/stable-diffusion-v1-5" and card.data.library_name == "peft"
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "runwayml/stable-diffusion-v1-5"


TAGS = ["lowmem-alignprop", "alignprop", "lora", "reward-finetuning", "text-to-image"]
GRID_WIDGET = [{"text": "before and after training, same seeds", "output": {"url": "before_after.png"}}]


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "peft"])
def test_a_lora_exports_card_metadata_reads_back_as_the_hub_reads_it(case, fmt, tmp_path):
    """What the hub reads of the card (metadata_load): a LoRA of a hub-id base is its adapter (base_model_relation,
    for the hub's model tree), the task text-to-image (pipeline_tag: the page's widget and search), the family's tag,
    the grid as the widget's example, its file uploaded beside the card. A local base names nothing there: neither
    base_model nor its relation (the card had no pipeline_tag, relation or widget)."""
    lora = lora_files.read_lora(str(case["lora"]))
    family = "stable-diffusion-xl" if case["xl"] else "stable-diffusion"
    library = "peft" if fmt == "peft" else "diffusers"
    local = export(tmp_path / "local", case["lora"], "--format", fmt)
    assert hub_metadata(local) == {"library_name": library, "pipeline_tag": "text-to-image", "tags": [*TAGS, family],
                                   "widget": GRID_WIDGET}
    lora.base = {**lora.base, "model": "you/base-model"}
    lx.export(lora, fmt, tmp_path / "hub")
    meta = hub_metadata(tmp_path / "hub")
    if case["xl"]:  # (an uncached hub id's family is read from the LoRA's widths: the tiny SDXL's 80 are no SDXL's)
        meta.pop("tags")
    else:
        assert meta.pop("tags") == [*TAGS, family]
    assert meta == {"base_model": "you/base-model", "base_model_relation": "adapter", "library_name": library,
                    "pipeline_tag": "text-to-image", "widget": GRID_WIDGET}


@pytest.mark.parametrize("single_file", [False, True])
def test_a_merged_models_card_metadata_is_of_the_model_it_was_merged_into(sd, tmp_path, single_file):
    """A merged model (a folder, or one file): no lora tag, base_model_relation merge, and base_model the model
    whose weights it holds: the one it was merged into (it named the LoRA's base even for --merge --model OTHER)."""
    from lowmem_alignprop.lora.model_card import front_matter

    out = export(tmp_path, sd["lora"], "--merge", *(["--single-file"] if single_file else []))
    meta = hub_metadata(out)
    assert meta == {"library_name": "diffusers", "pipeline_tag": "text-to-image", "widget": GRID_WIDGET,
                    "tags": [t for t in TAGS if t != "lora"] + ["stable-diffusion"]}
    lora = lora_files.read_lora(str(sd["lora"]))
    lora.base = {**lora.base, "model": "you/base-model"}
    for into, relation in (("you/other-model", "merge"), (None, "merge")):
        text = front_matter(lora, "diffusers", 1.0, into, None, "")
        assert (yaml.safe_load(text)["base_model"], yaml.safe_load(text)["base_model_relation"]) == (
            into or "you/base-model", relation)
    assert "base_model" not in yaml.safe_load(front_matter(lora, "diffusers", 1.0, str(sd["base"]), None, ""))


def test_the_card_takes_the_base_models_license_from_its_own_card(sd, tmp_path, monkeypatch):
    """A base whose own card gives a license (a local folder's README.md; a hub id's, from the hub cache) passes it
    on: the card's license (and an "other" license's name and link), not a comment to fill in. Without one: the
    comment with the family's, as before."""
    from huggingface_hub import constants
    from hubcache import cached_snapshot

    lora = lora_files.read_lora(str(sd["lora"]))
    folder = tmp_path / "local-base"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: creativeml-openrail-m\nlicense_link: LICENSE\n---\n# a base\n")
    lora.base = {**lora.base, "model": str(folder)}
    lx.export(lora, "kohya", tmp_path / "local")
    meta = hub_metadata(tmp_path / "local")  # (a link to the local base's own file: left out, it names nothing there)
    assert meta["license"] == "creativeml-openrail-m" and "license_link" not in meta
    assert "# license:" not in (tmp_path / "local" / "README.md").read_text()
    own = tmp_path / "card"
    own.mkdir()
    (own / "README.md").write_text("---\nlicense: other\nlicense_name: my-license\nlicense_link: LICENSE.md\n---\n")
    cached_snapshot(tmp_path / "hub", "you/base-model", own)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    lora.base = {**lora.base, "model": "you/base-model"}
    lx.export(lora, "kohya", tmp_path / "hub-id")
    meta = hub_metadata(tmp_path / "hub-id")
    assert (meta["license"], meta["license_name"], meta["license_link"]) == (
        "other", "my-license", "https://huggingface.co/you/base-model/blob/main/LICENSE.md")  # (the base's file)
    lora.base = {**lora.base, "model": "you/uncached-model"}
    lx.export(lora, "kohya", tmp_path / "none")
    assert "license" not in hub_metadata(tmp_path / "none")
    assert "# license: set the license of the base model here (SD 1.x's: license: creativeml-openrail-m)" in (
        tmp_path / "none" / "README.md").read_text()


def test_merged_card_says_merged_and_dtype_sets_the_saved_precision(sd, tmp_path):
    from safetensors import safe_open

    out = export(tmp_path, sd["lora"], "--merge", "--weight", "0.75", "--dtype", "fp16")
    text = (out / "README.md").read_text()
    assert "merged in at weight 0.75" in text and "- lora\n" not in text
    # the run's sample rewards are of the LoRA at weight 1: the row says so
    assert "| sample reward, before -> after (the LoRA as trained: weight 1, on its base model) | 0.4100 -> " in text
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118


def test_the_cards_code_loads_bases_of_every_form(sd, tmp_path):
    """The card's code loaded every base with DiffusionPipeline.from_pretrained: a folder of only fp16-variant files
    (as the trainer reads it) needs variant="fp16", a single file from_single_file (with the run's VAE passed in: a
    "no-vae" file has none), and a --set vae naming a pipeline folder its vae/ subfolder."""
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    shutil.copytree(sd["run"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    fp16 = tmp_path / "fp16-base"
    StableDiffusionPipeline.from_pretrained(sd["base"]).save_pretrained(fp16, variant="fp16")

    def card_code(name: str, **changes) -> str:
        (run / "config.yaml").write_text(yaml.safe_dump({**config, **changes}))
        base = json.loads((run / "lora" / LORA_BASE_FILE).read_text())
        (run / "lora" / LORA_BASE_FILE).write_text(json.dumps({**base, "model": changes.get("model", base["model"])}))
        out = export(tmp_path / name, run / "lora", "--format", "diffusers")
        return _card_code((out / "README.md").read_text(), out)

    code = card_code("variant", model=str(fp16), vae=str(sd["base"]))
    assert f'DiffusionPipeline.from_pretrained("{fp16}", variant="fp16")' in code, code
    assert f'pipe.vae = AutoencoderKL.from_pretrained("{sd["base"]}", subfolder="vae")' in code, code
    scope: dict = {}
    exec(code.replace('"a prompt"', '"a red car", generator=__import__("torch").Generator().manual_seed(0)'), scope)
    assert scope["image"].size == (config["resolution"], config["resolution"])
    code = card_code("file", model=str(tmp_path / "novae.safetensors"), vae=str(sd["base"] / "vae"))
    assert (f'vae = AutoencoderKL.from_pretrained("{sd["base"] / "vae"}")  # the VAE it trained with\n'
            f'pipe = StableDiffusionPipeline.from_single_file("{tmp_path / "novae.safetensors"}", vae=vae)') in code, code


def test_a_merged_model_renders_as_its_run_did_with_its_vae_and_prediction_type(sd, tmp_path):
    """A run that decoded with another VAE (--set vae) or took its UNet as predicting v (--set prediction_type) was
    merged onto the base's own VAE and scheduler: the merged model rendered otherwise than the run (and a "no-vae"
    single file could not be merged at all). Both now go into it, from its run's config.yaml or, for the LoRA copied
    out of its run, from its base_model.json's image_settings, as sample renders it (that one merged onto the base's
    own VAE and scheduler)."""
    import json

    from diffusers import AutoencoderKL

    run = tmp_path / "run"
    shutil.copytree(sd["run"], run)
    other = AutoencoderKL.from_pretrained(sd["base"] / "vae")
    torch.manual_seed(3)
    for p in other.decoder.parameters():
        p.data += 0.05 * torch.randn_like(p)
    other.save_pretrained(tmp_path / "other_vae")
    settings = {"vae": str(tmp_path / "other_vae"), "prediction_type": "v_prediction", "zero_terminal_snr": True}
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, **settings}))
    alone = shutil.copytree(run / "lora", tmp_path / "alone" / "lora")
    record = json.loads((alone / "base_model.json").read_text())
    (alone / "base_model.json").write_text(json.dumps({**record, "image_settings": {**record.get("image_settings", {}),
                                                                                     **settings}}))
    for name, lora in (("m", run / "lora"), ("m-alone", alone)):
        out = export(tmp_path / name, lora, "--merge")
        scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"], name
        assert scheduler["timestep_spacing"] == "trailing"
        merged = AutoencoderKL.from_pretrained(out / "vae").state_dict()
        assert all(torch.equal(merged[k], v) for k, v in other.state_dict().items()), name


# ---------------------------------------------------------------------------------------------------------
# the hub
# ---------------------------------------------------------------------------------------------------------

def test_check_push_to_hub_offline_and_without_token_is_one_line(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from lowmem_alignprop.settings.errors import UserError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="switched off here") as e:
        hub.check_push_to_hub("you/lora")
    assert "\n" not in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
    with pytest.raises(UserError, match="no Hugging Face token") as e:
        hub.check_push_to_hub("you/lora")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not a hub repository id"):
        hub.check_push_to_hub("you/bad name")


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(sd, tmp_path, monkeypatch, tmp_path_factory):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo, **kw: calls.append(("create", repo, kw))
                        or f"https://huggingface.co/{repo}")
    monkeypatch.setattr(huggingface_hub, "create_commit", lambda **kw: calls.append(("upload", kw)))
    monkeypatch.setattr(hub, "check_push_to_hub", lambda repo: None)  # the network part is the mock's
    out = export(tmp_path, sd["lora"], "--format", "kohya", "--push-to-hub", "you/lora", "--private")
    assert calls[0] == ("create", "you/lora", {"repo_type": "model", "private": True, "exist_ok": True})
    assert len(calls) == 2 and calls[1][0] == "upload" and calls[1][1]["repo_id"] == "you/lora"  # one commit
    uploaded = {op.path_in_repo: op.path_or_fileobj for op in calls[1][1]["operations"]}  # the folder's files
    assert sorted(uploaded) == sorted(p.name for p in out.iterdir())
    assert all(uploaded[n] == str(out / n) for n in uploaded if n != LORA_BASE_FILE)
    card = (out / "README.md").read_text()  # its code loads from the repository (it said THIS_FOLDER)
    assert 'load_lora_weights("you/lora", weight_name=' in card and "THIS_FOLDER" not in card
    # the card is for others: the base model and the commands' paths by name (lora_files.shared_name)
    assert str(tmp_path_factory.getbasetemp()) not in card and f"| base model | `{sd['base'].name}` (a local" in card
    assert f"export --lora {sd['run'].name}/lora --out out --format kohya --push-to-hub you/lora" in card


def test_a_folder_pushed_to_the_hub_names_local_paths_by_name_in_its_base_model_json(sd, tmp_path, monkeypatch,
                                                                                     tmp_path_factory):
    """The pushed copy of base_model.json names the base model, a reward file and a prompt file by name and leaves a
    local VAE out (as the kohya header does); its fingerprint is kept, and the local file keeps its paths (`sample`
    here reads them). Downloaded, `sample FOLDER` of it says in one line to pass the local model with --model."""
    import huggingface_hub

    from lowmem_alignprop.lora.base_records import recorded_base
    from lowmem_alignprop.lora.lora_args import parse_lora
    from lowmem_alignprop.settings.errors import UserError

    run = tmp_path / "my-run"
    shutil.copytree(sd["run"], run)
    record = json.loads((run / "lora" / LORA_BASE_FILE).read_text())
    reward_file, prompts = tmp_path / "rewards" / "mine.py", tmp_path / "my_prompts.txt"
    record["image_settings"]["vae"] = str(sd["base"] / "vae")
    record["scoring"] = {"reward": f"{reward_file}:score:0.5,brightness:1", "prompts": str(prompts),
                         "reward_weights": f"aesthetic={tmp_path / 'head.pt'},{tmp_path / 'clip'};clip=you/clip"}
    (run / "lora" / LORA_BASE_FILE).write_text(json.dumps(record))
    commits = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo, **kw: f"https://huggingface.co/{repo}")
    monkeypatch.setattr(huggingface_hub, "create_commit", lambda **kw: commits.append(kw["operations"]))
    monkeypatch.setattr(hub, "check_push_to_hub", lambda repo: None)
    out = export(tmp_path, run / "lora", "--format", "kohya", "--push-to-hub", "you/lora")
    [operations] = commits
    local = json.loads((out / LORA_BASE_FILE).read_text())
    assert local["model"] == str(sd["base"]) and local["scoring"] == record["scoring"]  # the local one: as written
    assert local["image_settings"]["vae"] == str(sd["base"] / "vae")
    uploaded = next(op.path_or_fileobj for op in operations if op.path_in_repo == LORA_BASE_FILE)
    assert isinstance(uploaded, bytes) and str(tmp_path_factory.getbasetemp()) not in uploaded.decode()
    pushed = json.loads(uploaded)
    assert pushed.keys() == local.keys() and pushed["model"] == sd["base"].name
    assert {k: pushed[k] for k in pushed if k not in ("model", "image_settings", "scoring")} == {
        k: local[k] for k in local if k not in ("model", "image_settings", "scoring")}  # the fingerprint, the digest
    assert pushed["image_settings"] == {k: v for k, v in local["image_settings"].items() if k != "vae"}
    assert pushed["scoring"] == {"reward": "mine.py:score:0.5,brightness:1", "prompts": "my_prompts.txt",
                                 "reward_weights": "aesthetic=head.pt,clip;clip=you/clip"}
    # downloaded: `sample FOLDER` without --model names --model in one line (the local model is the reader's)
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    for op in operations:
        content = op.path_or_fileobj  # (a file's path, or the rewritten bytes)
        (downloaded / op.path_in_repo).write_bytes(content if isinstance(content, bytes) else
                                                   Path(content).read_bytes())
    with pytest.raises(UserError, match=f"trained on {sd['base'].name} \\(base_model.json\\), not found here: a local "
                       "model of that name \\(as a LoRA shared on the hub names it\\)") as e:
        recorded_base(parse_lora(str(downloaded), 0))
    assert "\n" not in str(e.value) and "pass the base model with --model" in str(e.value)
    # a hub-id base stays a hub id (and a hub-id VAE is kept): the downloaded folder samples on it without --model
    hub_based = {**local, "model": "you/base", "image_settings": {**local["image_settings"], "vae": "you/vae"}}
    shared = lora_files.shared_base_record(hub_based)
    assert shared["model"] == "you/base" and shared["image_settings"]["vae"] == "you/vae"
    (downloaded / LORA_BASE_FILE).write_text(json.dumps(shared))
    model, settings = recorded_base(parse_lora(str(downloaded), 0))
    assert model == "you/base" and settings["vae"] == "you/vae" and settings["prompts"] == "my_prompts.txt"


def test_a_merged_folder_pushed_to_the_hub_names_its_models_by_name(tmp_path):
    """A merged model's merged.json, pushed (`export --merge --push-to-hub`), names its LoRAs and models as its single
    file's header does (lora_merge.shared_record); without one nothing is rewritten."""
    assert lx.hub_copies(tmp_path) == {}
    merged = [{"lora": str(tmp_path / "run" / "lora"), "into": str(tmp_path / "base"), "weight": 1.0},
              {"lora": "b", "weight": 1.0, "image_settings": {"vae": str(tmp_path), "resolution": 32},
               "scoring": {"reward": f"{tmp_path / 'mine.py'}:score", "prompts": str(tmp_path / "p.txt")}}]
    (tmp_path / MERGED_FILE).write_text(json.dumps(merged))
    shared = json.loads(lx.hub_copies(tmp_path)[MERGED_FILE])
    # its LoRAs' runs' settings as base_model.json is shared: a local VAE left out, files by name
    assert shared == [{"lora": "run/lora", "into": "base", "weight": 1.0},
                      {"lora": "b", "weight": 1.0, "image_settings": {"resolution": 32},
                       "scoring": {"reward": "mine.py:score", "prompts": "p.txt"}}]


def test_shared_reward_names_each_reward_file_term_and_nothing_for_no_reward(sd, tmp_path):
    """lora_files.shared_reward splits the terms (a named reward before a file's term) and says "" for no reward."""
    lora = lora_files.read_lora(str(sd["lora"]))
    lora.run_config = {**lora.run_config, "reward": f"brightness:1,{tmp_path / 'rewards' / 'mine.py'}:score"}
    assert formats.kohya_metadata(lora)["alignprop_reward"] == "brightness:1,mine.py:score"
    lora.run_config = {k: v for k, v in lora.run_config.items() if k != "reward"}
    assert formats.kohya_metadata(lora)["alignprop_reward"] == ""


def test_a_merged_single_file_names_a_reward_file_by_its_name(sd, tmp_path):
    """The merged single file's header names a reward file of this machine by its name (lora_files.shared_reward)."""
    from safetensors import safe_open

    run = tmp_path / "run"
    shutil.copytree(sd["run"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    reward = f"{tmp_path / 'rewards' / 'mine.py'}:score:0.5,brightness:1"
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "reward": reward}))
    path = next(export(tmp_path / "out", run / "lora", "--merge", "--single-file").glob("*.safetensors"))
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["alignprop_reward"] == "mine.py:score:0.5,brightness:1"
    assert merged_models.merged_record(str(path))[-1]["scoring"]["reward"] == "mine.py:score:0.5,brightness:1"


def test_the_hub_commit_holds_the_files_in_subfolders_and_hub_copies_skips_a_broken_record(tmp_path):
    """hub.upload_operations: every file of the folder, those in subfolders too (a merged model's unet/...), with
    the rewritten content for those named; lora_export.hub_copies: a base_model.json that is no JSON is not shared."""
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    (tmp_path / LORA_BASE_FILE).write_text("{")
    assert lx.hub_copies(tmp_path) == {}
    ops = {op.path_in_repo: op.path_or_fileobj for op in hub.upload_operations(tmp_path, {LORA_BASE_FILE: b"{}"})}
    assert ops == {LORA_BASE_FILE: b"{}", "unet/config.json": str(tmp_path / "unet" / "config.json")}


def test_a_pushed_base_model_json_names_a_transformer_files_parts_by_name(tmp_path):
    """shared_base_record: a run on a transformer file names its model_components folder by name too."""
    record = {"model": str(tmp_path / "flux1.safetensors"),
              "image_settings": {"model_components": str(tmp_path / "models" / "flux-parts"), "guidance_scale": 3}}
    shared = lora_files.shared_base_record(record)
    assert shared == {"model": "flux1.safetensors",
                      "image_settings": {"model_components": "flux-parts", "guidance_scale": 3}}
    # a value that is no string (a record edited by hand) is shared as it is, its other values by name
    assert lora_files.shared_base_record({"scoring": {"reward": None, "prompts": str(tmp_path / "p.txt")}}) == {
        "scoring": {"reward": None, "prompts": "p.txt"}}


def test_a_card_pushed_to_the_hub_names_local_models_and_paths_by_name(sd, tmp_path, tmp_path_factory):
    """A card pushed to the hub (export's hub_repo: --push-to-hub, or a run's push at its end) is for other people:
    a local base model, VAE and the commands' paths (absolute, or relative ones that exist here; --set values too) by
    their shared names, as the kohya header names them; its code loads a local base by that name, a comment saying
    it is a local model of that name. The local card keeps the paths (its code runs on this machine)."""
    run = tmp_path / "my-run"
    shutil.copytree(sd["run"], run)
    base, vae = str(sd["base"]), str(sd["base"] / "vae")
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "vae": vae}))
    (run / "command.txt").write_text(shlex.join(["lowmem-alignprop", "--model", base, "--output-dir", str(run),
                                                 "--set", f"vae={vae}", "--steps", "3"]) + "\n")
    lora = lora_files.read_lora(str(run / "lora"))
    command = f"lowmem-alignprop export --lora {run / 'lora'}"
    for fmt, extra in (("diffusers", {}), ("single-file", {"merge": True, "single_file": True})):
        cards = {}
        for where, repo in (("local", None), ("pushed", "you/lora")):
            lx.export(lora, "diffusers", tmp_path / f"{fmt}-{where}", command=command, hub_repo=repo, **extra)
            cards[where] = (tmp_path / f"{fmt}-{where}" / "README.md").read_text()
        local, pushed = cards["local"], cards["pushed"]
        assert base in local and str(run) in local  # (its code runs here)
        assert str(tmp_path_factory.getbasetemp()) not in pushed
        name = sd["base"].name
        assert f"| base model | `{name}` (a local model of that name) |" in pushed
        assert f"lowmem-alignprop --model {name} --output-dir my-run --set vae=vae --steps 3" in pushed
        assert "lowmem-alignprop export --lora my-run/lora" in pushed
        if fmt == "diffusers":  # the code: the base by its name, said to be a local model of that name
            assert f'# "{name}", "vae": local models of that name: put your copy\'s path there' in pushed
            assert f'from_pretrained("{name}")' in pushed and 'AutoencoderKL.from_pretrained("vae")' in pushed
        else:
            assert f'config="{name}")' in pushed and f'- "{name}": a local model of that name' in pushed


def test_a_pushed_card_names_the_model_merged_into_by_name_and_a_hub_base_as_it_is(sd, tmp_path):
    """A pushed card (model_card's home): a merge into another local model names that model by its folder's name,
    said to be a local model; a hub-id base and VAE are named as they are, with no note that they are local models
    (local_names: the local paths only)."""
    import dataclasses

    from lowmem_alignprop.lora.model_card import model_card

    lora = lora_files.read_lora(str(sd["lora"]))
    other = tmp_path / "models" / "other-base"
    card = model_card(lora, "diffusers", ["unet/diffusion_pytorch_model.safetensors"], "lowmem-alignprop export",
                      merged_weight=1.0, merged_into=str(other), home="you/merged")
    assert (f"| base model | `other-base` (the LoRA was trained on `{sd['base'].name}`) (a local model of that name) |"
            in card) and str(tmp_path) not in card
    hub_based = dataclasses.replace(lora, base={**lora.base, "model": "you/base"},
                                    run_config={**lora.run_config, "model": "you/base", "vae": "you/vae"})
    card = model_card(hub_based, "diffusers", [LORA_WEIGHT_NAME], "lowmem-alignprop export", home="you/lora")
    assert "| base model | `you/base` |" in card and "local model" not in card
    assert 'DiffusionPipeline.from_pretrained("you/base")' in card
    assert 'AutoencoderKL.from_pretrained("you/vae")' in card


def test_a_pushed_card_names_a_reward_file_and_a_resumes_changed_paths_by_name(sd, tmp_path):
    """A pushed card's reward and profile rows and its "changed by a resume" row name a reward file, a profile file, a
    prompt file and the reward's weights by their names (they gave the training machine's paths); the local card
    keeps them."""
    import dataclasses

    from lowmem_alignprop.lora.model_card import model_card

    lora = lora_files.read_lora(str(sd["lora"]))
    home = tmp_path / "home" / "me"
    lora = dataclasses.replace(
        lora, run_config={**lora.run_config, "reward": f"{home}/rewards/mine.py:score,aesthetic:0.5",
                          "profile": f"{home}/my-card.yaml"},
        summary={**lora.summary, "reward_since_step": 3, "resume_changes": [{"step": 3, "changes": {
            "prompts": [f"{home}/a.txt", f"{home}/b.txt"], "reward_weights": ["", f"aesthetic={home}/w.pth"],
            "lr": [0.001, 0.0005]}}]})
    pushed = model_card(lora, "diffusers", [LORA_WEIGHT_NAME], "lowmem-alignprop export", home="you/lora")
    assert str(home) not in pushed
    assert "| reward | mine.py:score,aesthetic:0.5 (from step 3: a resume changed it or how the images are made) |" \
        in pushed and "| profile | my-card.yaml |" in pushed
    assert ("| changed by a resume | from step 3: `--set prompts=b.txt` (was a.txt), `--set reward_weights=aesthetic="
            "w.pth` (was empty), `--set lr=0.0005` (was 0.001) |") in pushed
    local = model_card(lora, "diffusers", [LORA_WEIGHT_NAME], "lowmem-alignprop export")
    assert f"`--set prompts={home}/b.txt` (was {home}/a.txt)" in local and f"| reward | {home}/rewards/mine.py" in local


def test_local_names_are_the_local_paths_a_card_names_and_no_hub_id():
    """model_card.local_names: the base model, the model merged into, the VAE and a transformer file's other parts,
    each local path by its shared name; a hub id or none is not among them."""
    from types import SimpleNamespace

    from lowmem_alignprop.lora.model_card import local_names

    file_based = SimpleNamespace(base_model="/models/flux1.safetensors", model_components="/models/flux-parts")
    assert local_names(file_based, {"vae": "you/vae"}, "/merged/into-here") == {
        "/models/flux1.safetensors": "flux1.safetensors", "/models/flux-parts": "flux-parts",
        "/merged/into-here": "into-here"}
    hub_based = SimpleNamespace(base_model="you/base", model_components="")
    assert local_names(hub_based, {"vae": "/models/my-vae"}, None) == {"/models/my-vae": "my-vae"}


def test_shared_command_keeps_the_current_folder_and_a_line_it_cannot_split(tmp_path, monkeypatch):
    """model_card.shared_command: a local path by its name (a --set value too); `.` stays `.`, alone or as
    `--opt=.` (its shared name is empty); a line shlex cannot split (an unbalanced quote) is kept as recorded, the
    others still named; no command stays none."""
    from lowmem_alignprop.lora.model_card import shared_command

    monkeypatch.chdir(tmp_path)
    base, vae = tmp_path / "models" / "base", tmp_path / "my-vae"
    command = (f"lowmem-alignprop --model {base} --output-dir=. --set vae={vae}\n"
               f"lowmem-alignprop --model {base} --output-dir . --resume\n"
               "lowmem-alignprop --prompt \"it's")
    assert shared_command(command) == ("lowmem-alignprop --model base --output-dir=. --set vae=my-vae\n"
                                       "lowmem-alignprop --model base --output-dir . --resume\n"
                                       "lowmem-alignprop --prompt \"it's")
    assert shared_command(None) is None




# ---------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_base(tmp_path_factory, _isolated_cache):
    """The tiny architecture with other weights (seed 1): a LoRA of the seed-0 model must not merge into it."""
    from lowmem_alignprop.models.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("other-base")
    build_tiny_pipeline(seed=1).save_pretrained(path)
    return path


def _damaged(tmp: Path, sd) -> Path:
    lora = tmp / "damaged" / "lora"
    lora.mkdir(parents=True)
    data = (sd["lora"] / LORA_WEIGHT_NAME).read_bytes()
    (lora / LORA_WEIGHT_NAME).write_bytes(data[: len(data) // 2])  # a copy cut short
    return lora


def _no_base_file(tmp: Path, sd) -> Path:
    lora = tmp / "foreign" / "lora"
    lora.mkdir(parents=True)
    (lora / LORA_WEIGHT_NAME).write_bytes((sd["lora"] / LORA_WEIGHT_NAME).read_bytes())
    return lora


def _peft_folder(tmp: Path, sd) -> Path:
    """A folder in the shape `export --format peft` writes (adapter_config.json + adapter_model.safetensors)."""
    folder = tmp / "elsewhere" / "peft"
    folder.mkdir(parents=True)
    shutil.copyfile(sd["lora"] / LORA_WEIGHT_NAME, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text("{}")
    return folder


def _kohya_file(tmp: Path, sd) -> Path:
    """A LoRA file (a kohya export's), outside any run."""
    file = tmp / "elsewhere" / "mine_lora.safetensors"
    file.parent.mkdir(parents=True)
    shutil.copyfile(sd["lora"] / LORA_WEIGHT_NAME, file)
    return file


def _base_gone(tmp: Path, sd, model: str | None = None) -> Path:
    lora = tmp / "moved" / "lora"
    shutil.copytree(sd["lora"], lora)
    # trained on a folder since deleted (or, before paths were recorded absolute, one named relative to another folder)
    (lora / LORA_BASE_FILE).write_text(json.dumps({"model": model or str(tmp / "gone")}))
    return lora


def _old_relative(tmp: Path, sd, line: str) -> Path:
    """A copy of the run whose config.yaml has ``line`` (``vae: vaedir``): a path a run before 2026-12-05 recorded
    relative to the folder it started in, not this test's."""
    run = shutil.copytree(sd["run"], tmp / "old-run")
    config = run / "config.yaml"
    key = line.split(":")[0]
    config.write_text("".join(line + "\n" if x.startswith(f"{key}:") else x
                              for x in config.read_text().splitlines(keepends=True)))
    return run / "lora"


BAD = {
    "unknown_format": (lambda t, sd, o: ["--lora", str(sd["lora"]), "--format", "kohyaa"],
                       "--format 'kohyaa' is not one of diffusers, kohya, peft: did you mean kohya?"),
    "merge_onto_other_weights": (lambda t, sd, o: ["--lora", str(sd["lora"]), "--merge", "--model", str(o)],
                                 "its UNet weights differ"),
    "merge_onto_other_shapes": (lambda t, sd, o: ["--lora", str(_no_base_file(t, sd)), "--merge", "--model",
                                                  "sdxl-base"], "does not fit this model"),
    "merge_without_base": (lambda t, sd, o: ["--lora", str(_no_base_file(t, sd)), "--merge"],
                           "does not say which base model it was trained on"),
    "merge_base_gone": (lambda t, sd, o: ["--lora", str(_base_gone(t, sd)), "--merge"],
                        "base_model.json), which is not there any more: pass the base model with --model"),
    "merge_base_relative": (lambda t, sd, o: ["--lora", str(_base_gone(t, sd, "models/sd/here")), "--merge"],
                            "base_model.json), a path relative to the folder its run started in (a run before "
                            "2026-12-05), not found from here: pass the base model with --model"),
    "merge_vae_relative": (lambda t, sd, o: ["--lora", str(_old_relative(t, sd, "vae: vaedir")), "--merge"],
                           "was trained with vae=vaedir (its run's record), a path relative to the folder its run "
                           "started in (a run before 2026-12-05), not found from here: export in that folder"),
    "merge_vae_gone": (lambda t, sd, o: ["--lora", str(_old_relative(t, sd, f"vae: {t / 'moved-away'}")),
                                         "--merge"],
                       "(its run's record), which is not there any more (moved or deleted): put it back there"),
    "merge_base_by_name": (lambda t, sd, o: ["--lora", str(_base_gone(t, sd, "my-sd15")), "--merge"],
                           "trained on my-sd15 (base_model.json), not found here: a local model of that name (as a "
                           "LoRA shared on the hub names it) or a path relative to the folder its run started in"),
    # a run on Windows recorded its model so: read here, it was "a local model of that name" (one part, no /)
    "merge_base_on_windows": (lambda t, sd, o: ["--lora", str(_base_gone(t, sd, "C:\\models\\sd15")), "--merge"],
                              "trained on C:\\models\\sd15 (base_model.json), a Windows path (of the machine it "
                              "trained on), not one on this machine: pass the base model with --model"),
    "merge_base_on_a_windows_share": (lambda t, sd, o: ["--lora", str(_base_gone(t, sd, r"\\nas\sd\x.ckpt")),
                                                        "--merge"],
                                      r"trained on \\nas\sd\x.ckpt (base_model.json), a Windows path"),
    "missing_lora_dir": (lambda t, sd, o: ["--lora", str(t / "nope")], "no such folder"),
    "single_file_of_the_toy_model": (lambda t, sd, o: ["--lora", str(_base_gone(t, sd, "toy")), "--merge",
                                                       "--single-file"],
                                     "--merge --single-file: the toy model has no single-file layout that other tools "
                                     "(or --model FILE) read"),
    "a_kohya_file": (lambda t, sd, o: ["--lora", str(_kohya_file(t, sd))],
                     "is a LoRA file already: export converts the LoRA a run wrote (its lora/ folder or a "
                     "checkpoint); use this one as it is"),
    "a_peft_folder": (lambda t, sd, o: ["--lora", str(_peft_folder(t, sd))],
                      "is a peft adapter folder (export --format peft's): export converts the LoRA a run wrote"),
    # --merge of a LoRA file: the line was export's ("export converts ...; use this one as it is"), not the merge's
    "a_kohya_file_merged": (lambda t, sd, o: ["--lora", str(_kohya_file(t, sd)), "--merge"],
                            "is a LoRA file already: --merge fuses the LoRA a run wrote (its lora/ folder or a "
                            "checkpoint) into its base model: merge that run's lora/ (export RUN/lora --merge); "
                            "sample and --init-lora read this one as it is"),
    "a_peft_folder_merged": (lambda t, sd, o: ["--lora", str(_peft_folder(t, sd)), "--merge"],
                             "is a peft adapter folder (export --format peft's): --merge fuses the LoRA a run wrote"),
    "lora_with_a_weight": (lambda t, sd, o: ["--lora", f"{sd['lora']}:0.5"],
                           "export takes no weight after the LoRA (sample's DIR:WEIGHT); for a model with the LoRA "
                           "merged at that weight: --lora "),
    "no_lora": (lambda t, sd, o: ["--format", "kohya"], "which LoRA? give the folder a run wrote"),
    "two_loras": (lambda t, sd, o: [str(sd["lora"]), "--lora", str(sd["run"])], "two LoRAs to export"),
    "lora_dir_without_weights": (lambda t, sd, o: ["--lora", str(t)], "holds no pytorch_lora_weights.safetensors"),
    "damaged_lora_file": (lambda t, sd, o: ["--lora", str(_damaged(t, sd)), "--format", "kohya"],
                          "is damaged or not a safetensors file"),
    "push_offline": (lambda t, sd, o: ["--lora", str(sd["lora"]), "--push-to-hub", "you/lora"],
                     "the Hugging Face hub is switched off here"),
    "weight_without_merge": (lambda t, sd, o: ["--lora", str(sd["lora"]), "--weight", "0.5"], "add --merge"),
    "format_list_pushed": (lambda t, sd, o: ["--lora", str(sd["lora"]), "--format", "kohya,peft", "--push-to-hub",
                                             "you/lora"],
                           "--push-to-hub uploads one export to you/lora, and --format kohya,peft names 2: push one "
                           "format (e.g. --format kohya)"),
    "format_list_misspelt": (lambda t, sd, o: ["--lora", str(sd["lora"]), "--format", "kohya,pefft"],
                             "--format 'pefft' is not one of diffusers, kohya, peft: did you mean peft?"),
    "dtype_unknown": (lambda t, sd, o: ["--lora", str(sd["lora"]), "--merge", "--dtype", "fp8"],
                      "--dtype 'fp8' is not one of fp32, fp16, bf16"),
    "model_without_merge": (lambda t, sd, o: ["--lora", str(sd["lora"]), "--model", str(o)], "add --merge"),
    "private_without_push": (lambda t, sd, o: ["--lora", str(sd["lora"]), "--private"], "--private applies to"),
    "merge_to_kohya": (lambda t, sd, o: ["--lora", str(sd["lora"]), "--merge", "--format", "kohya"],
                       "--merge writes the whole model"),
    "single_file_without_merge": (lambda t, sd, o: ["--lora", str(sd["lora"]), "--single-file"],
                                  "--single-file writes a merged model as one checkpoint file: add --merge"),
    "single_file_onto_other_weights": (lambda t, sd, o: ["--lora", str(sd["lora"]), "--merge", "--single-file",
                                                         "--model", str(o)], "its UNet weights differ"),
}


def _tree(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for r in roots if r.exists() for p in sorted(r.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("what", sorted(BAD))
def test_bad_export_input_is_one_line_and_writes_nothing(what, sd, other_base, tmp_path, capsys, request):
    make_args, message = BAD[what]
    argv = make_args(tmp_path, sd, other_base)
    if "sdxl-base" in argv:  # built only for the case that needs it
        argv[argv.index("sdxl-base")] = str(request.getfixturevalue("sdxl")["base"])
    before = _tree(tmp_path, sd["run"])
    out = tmp_path / "out"
    assert main(["export", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()
    assert _tree(tmp_path, sd["run"]) == before  # nothing written, nothing changed (no export/, no temp folder)


def test_an_out_folder_that_cannot_be_made_is_one_line(sd, tmp_path, capsys, monkeypatch):
    """--out (or --output-dir) whose name is past the file system's 255 bytes, or under a folder that refuses files:
    one line naming the fix (they were an OSError's and a PermissionError's tracebacks from deep in the export)."""
    import os
    import tempfile

    # a file's name (a kohya user's k.safetensors): the export would be a folder of that name
    named = tmp_path / "k.safetensors"
    assert main(["export", "--lora", str(sd["lora"]), "--format", "kohya", "--out", str(named)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out {named} names a file, but --out is the folder the export "
                                               "is written into (its files are named by the run): pass a folder, e.g. "
                                               f"--out {tmp_path / 'k'}") and not named.exists()
    long = tmp_path / ("m" * 300)
    assert main(["export", "--lora", str(sd["lora"]), "--out", str(long)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out {long} has a name longer than the file system takes "
                                               "(255 bytes a folder or file name): choose a shorter name")
    assert main(["--profile", "cpu", "--model", "tiny", "--output-dir", str(long)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --output-dir {long} has a name longer than the file system "
                                               "takes (255 bytes a folder or file name): choose a shorter name")

    real = tempfile.TemporaryFile

    def refuse(*args, dir=None, **kwargs):  # root may write anywhere: the refusal is simulated, in tmp_path only
        if Path(dir) == tmp_path:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    (tmp_path / "empty").mkdir()  # writable itself; the export is made beside it, in tmp_path, and renamed
    for out in (tmp_path / "out", tmp_path / "empty"):
        assert main(["export", "--lora", str(sd["lora"]), "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip() == (f"error: --out {out} is not writable (Permission denied): choose a "
                                                   "folder you can write to with --out")
    assert os.listdir(tmp_path) == ["empty"] and os.listdir(tmp_path / "empty") == []


def test_out_folder_that_is_not_empty_is_refused(sd, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["export", "--lora", str(sd["lora"]), "--out", str(tmp_path / "out")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_several_formats_are_one_export_each_as_one_format_alone_writes_it(sd, tmp_path):
    """`--format kohya,peft` (as training's export_format takes it) was refused: one folder per format now, the same
    LoRA files as one --format each: RUN/export/FORMAT, or OUT/FORMAT with --out."""
    run = tmp_path / "run"
    shutil.copytree(sd["run"], run)
    assert main(["export", str(run / "lora"), "--format", "kohya, peft"]) == 0
    both = export(tmp_path / "both", run / "lora", "--format", "peft,kohya")
    for fmt in ("kohya", "peft"):
        alone = export(tmp_path / fmt, run / "lora", "--format", fmt)
        want = {p.name: p.read_bytes() for p in alone.iterdir() if p.name != "README.md"}
        for folder in (run / "export" / fmt, both / fmt):
            assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "README.md"} == want, folder
    assert sorted(p.name for p in (run / "export").iterdir()) == ["kohya", "peft"]
    assert sorted(p.name for p in both.iterdir()) == ["kohya", "peft"]


def test_default_out_is_beside_the_run_and_never_overwrites(sd):
    lora = lora_files.read_lora(str(sd["run"]))
    first = lx.default_out(lora, "kohya", False)
    assert first == sd["run"] / "export" / "kohya"
    first.mkdir(parents=True)
    (first / "x").write_text("")
    try:
        assert lx.default_out(lora, "kohya", False) == sd["run"] / "export" / "kohya-2"
    finally:
        (first / "x").unlink()
        first.rmdir()
        first.parent.rmdir()


def test_a_run_folder_with_the_longest_name_exports_a_file_name_that_fits(sd, tmp_path):
    """A run folder named with all 255 bytes a file system allows (two-byte characters): the kohya file's name takes
    its first STEM_BYTES bytes, whole characters, and the file loads (before: "File name too long", a traceback)."""
    long_name = "ü" * 127  # 254 bytes in UTF-8
    run = tmp_path / long_name
    shutil.copytree(sd["run"], run)
    out = export(tmp_path, run / "lora", "--format", "kohya")
    (file,) = out.glob("*.safetensors")
    assert file.name == "ü" * (formats.STEM_BYTES // 2) + "_alignprop_lora.safetensors"
    assert len(file.name.encode()) < 255
    pipe = sd["cls"].from_pretrained(sd["base"])
    pipe.load_lora_weights(str(file))
    assert_rel_close(unet_out(pipe.unet, False), sd["ref"], SAME_OPS, "kohya file of a long-named run")


def test_a_failed_export_at_the_end_of_a_run_is_one_logged_line_and_the_run_goes_on(sd, tmp_path, monkeypatch, caplog):
    """export_format's export fails with a writer's own error (safetensors raises neither OSError nor UserError): the
    run's files stay, one error line says how to export again, and the other formats still export."""
    import logging

    from lowmem_alignprop.settings.config import Config

    run = tmp_path / "run"
    shutil.copytree(sd["run"], run)

    class SafetensorLikeError(Exception):
        pass

    def failing(*a, **kw):
        raise SafetensorLikeError("Error while serializing: I/O error")

    monkeypatch.setattr(lx, "write_kohya", failing)
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    lx.export_at_end(Config(export_format="kohya,peft"), run / "lora")
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "export --format kohya failed (SafetensorLikeError: Error while serializing" in \
        errors[0] and f"lowmem-alignprop export --lora {run / 'lora'} --format kohya` tries again" in errors[0]
    assert not (run / "export" / "kohya").exists() and (run / "export" / "peft" / "adapter_model.safetensors").is_file()
    # push_to_hub with its only export failed: nothing is uploaded, and the record says why (the box reads it)
    done = lx.export_at_end(Config(export_format="kohya", push_to_hub="you/lora"), run / "lora")
    assert done.folders == {"kohya": None} and done.url is None
    assert done.record()["pushed_to_hub"] == {"repo": "you/lora", "url": None, "failed": "no export was written to upload"}


def test_sample_of_a_kohya_or_peft_export_without_model_loads_the_base_it_was_trained_on(sd, tmp_path, capsys):
    """Each export carries the run's base_model.json: `sample FILE` of the kohya file or the peft folder renders
    on the model the LoRA was trained on, as `sample RUN/lora` does (before: the default model, and a shape error)."""
    def rewards(spec, name):
        out = tmp_path / name
        assert main(["sample", str(spec), "--profile", "cpu", "--reward", "brightness", "--num-prompts", "1",
                     "--set", "sample_steps=3", "--output-dir", str(out)]) == 0, capsys.readouterr().err[-2000:]
        return [r for p in json.loads((out / "sample_results.json").read_text())["per_prompt"] for r in p["lora"]]

    kohya = export(tmp_path / "k", sd["lora"], "--format", "kohya")
    peft = export(tmp_path / "p", sd["lora"], "--format", "peft")
    assert (kohya / LORA_BASE_FILE).is_file() and (peft / LORA_BASE_FILE).is_file()
    ours = rewards(sd["lora"], "lora")
    assert rewards(next(kohya.glob("*.safetensors")), "kohya") == pytest.approx(ours, rel=1e-5)
    results = json.loads((tmp_path / "kohya" / "sample_results.json").read_text())
    assert "weights" not in results["loras"][0]  # (a file given itself: nothing found below it, no "(.)")
    assert rewards(peft, "peft") == pytest.approx(ours, rel=1e-5)


def test_export_of_best_is_of_its_step_as_a_checkpoints_export_is(sd, tmp_path, capsys):
    """best/ (--eval-every) holds step N's LoRA: its export is named and captioned by that step (file, folder, card,
    header, the step's --sample-every grid), not with the finished run's steps, rewards and grid under 'best_'."""
    from PIL import Image
    from safetensors import safe_open

    run = tmp_path / "myrun"
    shutil.copytree(sd["run"], run)
    shutil.copytree(sd["lora"], run / "best")
    (run / "best" / "best.json").write_text(json.dumps({"step": 2, "eval_reward": 0.5}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward_mean": r, "rewards": [r],
                                                           "prompt_ids": [0]}) + "\n"
                                               for s, r in ((1, 0.25), (2, 0.375), (3, 0.875))))
    Image.new("RGB", (8, 8), "red").save(run / "samples" / "step-000002.png")
    assert main(["export", str(run / "best"), "--format", "kohya"]) == 0
    out = run / "export" / "kohya-step-2"
    (file,) = out.glob("*.safetensors")
    assert file.name == "myrun_step2_alignprop_lora.safetensors"
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
    assert meta["alignprop_steps"] == "2" and meta["alignprop_final_reward"] == "0.375"
    card = (out / "README.md").read_text()
    assert "| steps | 2 |" in card and "0.5678" not in card  # the finished run's last reward is not this LoRA's
    assert (out / "step-000002.png").is_file() and not (out / "before_after.png").exists()


def test_the_card_of_an_exported_best_says_it_is_the_best_held_out_evaluation(sd, tmp_path):
    """best/'s card says why this step: the run's best held-out evaluation, its eval_reward (and, with
    best_by=fidelity, the exact score it was chosen by); a best/ of step 0 (eval_on_start) is the LoRA before
    training, which no trained step beat. The run's lora/ says none of it."""
    from lowmem_alignprop.lora import model_card

    run = tmp_path / "myrun"
    shutil.copytree(sd["run"], run)
    shutil.copytree(sd["lora"], run / "best")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward_mean": 0.25, "rewards": [0.25],
                                                           "prompt_ids": [0]}) + "\n" for s in (1, 2, 3)))
    record = {"step": 2, "eval_reward": 0.4375, "eval_objective": 0.4375, "eval_fidelity_score": 0.625}
    (run / "best" / "best.json").write_text(json.dumps(record))
    card = model_card.model_card(lora_files.read_lora(str(run / "best")), "diffusers", [], "export")
    assert "| chosen as | the run's best held-out evaluation (--eval-every): step 2, eval_reward 0.4375 |" in card
    (run / "best" / "best.json").write_text(json.dumps({**record, "step": 0}))
    lora = lora_files.read_lora(str(run / "best"))
    lora.run_config = {**lora.run_config, "best_by": "fidelity"}
    card = model_card.model_card(lora, "diffusers", [], "export")
    assert ("| chosen as | the run's best held-out evaluation (--eval-every): step 0, eval_reward 0.4375, "
            "eval_fidelity_score 0.625 (best_by=fidelity); step 0 is the untrained LoRA: no trained step beat it "
            "(this LoRA changes nothing) |") in card
    plain = model_card.model_card(lora_files.read_lora(str(sd["lora"])), "diffusers", [], "export")
    assert "chosen as" not in plain


def test_a_lora_without_its_adapter_config_exports_as_diffusers_loads_it_alpha_equal_to_rank(sd, tmp_path):
    """A LoRA file whose header carries no peft config (another trainer's, an older diffusers'): diffusers loads it
    with alpha = rank (scale 1); the peft folder and the kohya file must say the same, or the LoRA loads at 1/rank
    (or rank times) its strength."""
    lora = lora_files.read_lora(str(sd["lora"]))
    lora.config = {}  # what _adapter_config gives for such a header
    assert all(lora.scale(m) == 1.0 for m in lora.modules)
    formats.write_peft(lora, tmp_path)
    config = json.loads((tmp_path / formats.PEFT_CONFIG_NAME).read_text())
    assert (config["r"], config["lora_alpha"]) == (RANK, RANK)
    assert sorted(config["target_modules"]) == lora.modules
    state = formats.kohya_state_dict(lora)
    assert {state[f"{formats.kohya_name(m)}.alpha"].item() for m in lora.modules} == {float(RANK)}


def test_export_of_a_lora_that_holds_nan_is_refused_and_writes_nothing(sd, tmp_path, capsys):
    """A diverged run's LoRA (NaN in a weight) loads in ComfyUI and draws black: export refuses it in one line."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    lora = tmp_path / "run" / "lora"
    shutil.copytree(sd["lora"], lora)
    file = lora / LORA_WEIGHT_NAME
    with safe_open(str(file), framework="pt") as f:
        header = f.metadata()
    weights = load_file(str(file))
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(file), metadata=header)
    out = tmp_path / "out"
    assert main(["export", "--lora", str(lora), "--format", "kohya", "--out", str(out)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(err) == 1 and "holds NaN or inf: the run diverged" in err[0], err
    assert not out.exists()


def _card_code(card: str, folder: Path) -> str:
    """The model card's first python block, with THIS_FOLDER the exported folder."""
    block = card.split("```python\n", 1)[1].split("```", 1)[0]
    return block.replace('"THIS_FOLDER"', json.dumps(str(folder)))


def test_the_cards_code_samples_with_the_runs_settings(sd, tmp_path):
    """The card's "Use" code loaded the LoRA and stopped: the pipeline's defaults (PNDM, 50 steps, 7.5, the model's
    size) sample otherwise than the run did. Its call now has the run's DDIM, steps, guidance, eta and size, and runs
    as written."""
    out = export(tmp_path, sd["run"] / "lora", "--format", "diffusers")
    config = yaml.safe_load((sd["run"] / "config.yaml").read_text())
    code = _card_code((out / "README.md").read_text(), out)
    assert (f"num_inference_steps={config['sample_steps']}, guidance_scale={config['guidance_scale']:g}, "
            f"eta={config['eta']:g}, height={config['resolution']}, width={config['resolution']}") in code, code
    scope: dict = {}
    exec(code.replace('"a prompt"', '"a red car", generator=__import__("torch").Generator().manual_seed(0)'), scope)
    assert type(scope["pipe"].scheduler).__name__ == "DDIMScheduler"
    assert scope["image"].size == (config["resolution"], config["resolution"])
    # a run that decoded with another VAE (--set vae): the code loads that one (it rendered with the model's own)
    run = tmp_path / "run-vae"
    shutil.copytree(sd["run"], run)
    vae = sd["base"] / "vae"
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "vae": str(vae)}))
    out = export(tmp_path / "vae", run / "lora", "--format", "diffusers")
    code = _card_code((out / "README.md").read_text(), out)
    assert f'pipe.vae = AutoencoderKL.from_pretrained("{vae}")' in code and "import AutoencoderKL, " in code
    exec(code, {})
    # a run told what its UNet predicts (--set prediction_type, zero_terminal_snr): the code's DDIM samples so too
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "prediction_type": "v_prediction",
                                                     "zero_terminal_snr": True, "eta": 0.0}))
    out = export(tmp_path / "v", run / "lora", "--format", "diffusers")
    scope = {}
    exec(_card_code((out / "README.md").read_text(), out), scope)
    sampled = scope["pipe"].scheduler.config
    assert (sampled.prediction_type, sampled.rescale_betas_zero_snr, sampled.timestep_spacing) == (
        "v_prediction", True, "trailing")


def test_the_card_and_header_of_a_lora_away_from_its_run_tell_its_recorded_reward_and_size(sd, tmp_path):
    """A LoRA copied away from its run folder (or read from the hub) has no config.yaml beside it: its card had no
    reward or resolution row and its kohya header an empty alignprop_reward, though base_model.json records both.
    They come from that record now (the steps, which it does not record, stay unsaid)."""
    from safetensors import safe_open

    away = tmp_path / "shared" / "lora"
    shutil.copytree(sd["lora"], away)
    config = yaml.safe_load((sd["run"] / "config.yaml").read_text())
    out = export(tmp_path, away, "--format", "kohya")
    card = (out / "README.md").read_text()
    assert f"| reward | {config['reward']} |" in card and f"| resolution | {config['resolution']} px |" in card
    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as f:
        meta = f.metadata()
    assert meta["alignprop_reward"] == config["reward"] == "colorfulness" and meta["alignprop_steps"] == ""

"""Shipped architecture configs, the CLIP tokenizer, checkpoint detection and offline single-file loading."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowmem_alignprop.models import arch
from lowmem_alignprop.settings.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ldm_format import clip_to_ldm, open_clip_to_ldm, pipeline_to_ldm, unet_to_ldm, vae_to_ldm  # noqa: E402
from midsize import build_tiny_sdxl_pipeline  # noqa: E402

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # 'a photo of a cat' with the real CLIP tokenizer

# parameter counts of the real models (millions)
EXPECTED_PARAMS = {
    "sd15": {"unet": 859.52, "vae": 83.65, "text_encoder": 123.06},
    "sd21": {"unet": 865.91, "vae": 83.65, "text_encoder": 340.39},
    "sdxl": {"unet": 2567.46, "vae": 83.65, "text_encoder": 123.06, "text_encoder_2": 694.66},
}
EXPECTED_CLASSES = {
    "sd15": {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
             "tokenizer": "CLIPTokenizer", "scheduler": "PNDMScheduler"},
    "sd21": {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
             "tokenizer": "CLIPTokenizer", "scheduler": "DDIMScheduler"},
    "sdxl": {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
             "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer": "CLIPTokenizer",
             "tokenizer_2": "CLIPTokenizer", "scheduler": "EulerDiscreteScheduler"},
}


# ------------------------------------------------------------------------------------------------
# shipped configs
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def components():
    return {name: arch.build_random_components(name) for name in arch.ARCHS}  # meta, fp16: nothing allocated


@pytest.mark.parametrize("name", arch.ARCHS)
def test_components_classes_and_parameter_counts(components, name):
    comps = components
    c = comps[name]
    assert {k: type(v).__name__ for k, v in c.items()} == EXPECTED_CLASSES[name]
    for key, millions in EXPECTED_PARAMS[name].items():
        n = sum(p.numel() for p in c[key].parameters()) / 1e6
        assert abs(n - millions) / millions < 0.005, (name, key, n)
        assert all(p.is_meta and p.dtype == torch.float16 and not p.requires_grad for p in c[key].parameters())


def test_config_values_match_the_real_models(components):
    comps = components
    sd15, sd21, sdxl = comps["sd15"], comps["sd21"], comps["sdxl"]
    assert sd15["unet"].config.cross_attention_dim == 768 and sd15["unet"].config.sample_size == 64
    assert sd21["unet"].config.cross_attention_dim == 1024 and sd21["unet"].config.use_linear_projection
    assert sd21["unet"].config.sample_size == 96 and sd21["unet"].config.upcast_attention
    assert sd21["scheduler"].config.prediction_type == "v_prediction"
    assert sd21["text_encoder"].config.hidden_size == 1024 and sd21["text_encoder"].config.hidden_act == "gelu"
    assert sdxl["unet"].config.cross_attention_dim == 2048 and sdxl["unet"].config.addition_embed_type == "text_time"
    assert sdxl["unet"].config.projection_class_embeddings_input_dim == 2816
    assert sdxl["vae"].config.force_upcast is True and sdxl["vae"].config.scaling_factor == 0.13025
    assert sd15["vae"].config.scaling_factor == 0.18215 and sd21["vae"].config.scaling_factor == 0.18215
    assert sdxl["text_encoder_2"].config.projection_dim == 1280
    assert sdxl["unet"].config.sample_size == 128  # 1024 px, as sd15's 64 and sd21's 96 are 512 and 768 px


@pytest.mark.parametrize("name", arch.ARCHS)
def test_config_files_use_only_known_fields(name):
    import diffusers

    root = arch.arch_config_dir(name)
    for sub, cls in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL)):
        cfg = json.loads((root / sub / "config.json").read_text())
        _, unused, _ = cls.extract_init_dict(cfg)
        assert not {k for k in unused if not k.startswith("_")}, (name, sub, unused)
    sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    _, unused, _ = getattr(diffusers, sched["_class_name"]).extract_init_dict(sched)
    assert not {k for k in unused if not k.startswith("_")}, (name, unused)
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == arch.pipeline_class(name).__name__
    # only config files ship (weights must never be needed)
    assert not [p for p in root.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt")]


@pytest.mark.parametrize("name", arch.ARCHS)
def test_tokenizers_are_the_real_clip_tokenizer(components, name):
    comps = components
    folders = ["tokenizer", "tokenizer_2"] if name == "sdxl" else ["tokenizer"]
    for folder in folders:
        tok = comps[name][folder]
        assert len(tok) == 49408
        assert tok("a photo of a cat").input_ids == CAT_IDS
        assert tok.model_max_length == 77
        open_clip_pad = (name == "sd21") or folder == "tokenizer_2"  # OpenCLIP text encoders pad with "!"
        assert tok.pad_token == ("!" if open_clip_pad else "<|endoftext|>")
        assert tok.pad_token_id == (0 if open_clip_pad else 49407)


def test_clip_bpe_vocabulary():
    vocab, merges = arch.clip_bpe()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407 and vocab["cat</w>"] == 2368


def test_arch_config_dir_unknown_name():
    with pytest.raises(UserError, match="sd15, sd21, sdxl"):
        arch.arch_config_dir("sd3")
    with pytest.raises(UserError):
        arch.build_random_components("sd14")


def test_arch_config_dir_is_cached_and_rebuilt_when_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWMEM_ALIGNPROP_CACHE", str(tmp_path))
    d = arch.arch_config_dir("sd15")
    assert d == tmp_path / "arch" / "sd15" and (d / "tokenizer" / "vocab.json").is_file()
    mtime = (d / "tokenizer" / "vocab.json").stat().st_mtime_ns
    assert arch.arch_config_dir("sd15") == d and (d / "tokenizer" / "vocab.json").stat().st_mtime_ns == mtime
    (d / ".stamp").write_text("stale")
    (d / "tokenizer" / "vocab.json").unlink()
    assert arch.arch_config_dir("sd15") == d and (d / "tokenizer" / "vocab.json").is_file()
    assert [p.name for p in (tmp_path / "arch").iterdir()] == ["sd15"]  # no temporary leftovers


# ------------------------------------------------------------------------------------------------
# detect_arch
# ------------------------------------------------------------------------------------------------

def _z(*shape):
    return torch.zeros(shape, dtype=torch.float16)


U = "model.diffusion_model."
UNET_KEYS = {
    "sd15": {U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": _z(320, 768),
             U + "input_blocks.0.0.weight": _z(320, 4, 3, 3)},
    "sd21": {U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": _z(320, 1024)},
    "sdxl": {U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": _z(640, 2048)},
}
TEXT_KEYS = {
    "sd15": {"cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": _z(77, 768)},
    "sd21": {"cond_stage_model.model.positional_embedding": _z(77, 1024)},
    "sdxl": {"conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": _z(77, 768),
             "conditioner.embedders.1.model.positional_embedding": _z(77, 1280)},
}


@pytest.mark.parametrize("name", arch.ARCHS)
def test_detect_arch_safetensors_and_ckpt(tmp_path, name):
    for label, sd in (("both", {**UNET_KEYS[name], **TEXT_KEYS[name]}), ("unet", UNET_KEYS[name]),
                      ("text", TEXT_KEYS[name])):
        save_file(sd, tmp_path / f"{label}.safetensors")
        assert arch.detect_arch(tmp_path / f"{label}.safetensors") == name, label
        torch.save({"state_dict": sd, "global_step": 1}, tmp_path / f"{label}.ckpt")
        assert arch.detect_arch(str(tmp_path / f"{label}.ckpt")) == name, label
        assert arch.detect_arch_from_state_dict(sd) == name


def test_detect_arch_rejects_other_files(tmp_path):
    save_file({"encoder.layers.0.weight": _z(4, 4)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="not a Stable Diffusion checkpoint") as e:
        arch.detect_arch(tmp_path / "other.safetensors")
    assert all(n in str(e.value) for n in arch.ARCHS)
    save_file({"down_blocks.0.resnets.0.conv1.weight": _z(4, 4)}, tmp_path / "diffusers.safetensors")
    with pytest.raises(UserError, match="diffusers model directory"):
        arch.detect_arch(tmp_path / "diffusers.safetensors")
    save_file({**UNET_KEYS["sd15"], U + "input_blocks.0.0.weight": _z(320, 9, 3, 3)}, tmp_path / "inpaint.safetensors")
    with pytest.raises(UserError, match="inpainting"):
        arch.detect_arch(tmp_path / "inpaint.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": _z(4, 4)}, tmp_path / "lora.safetensors")
    with pytest.raises(UserError, match="LoRA"):
        arch.detect_arch(tmp_path / "lora.safetensors")
    save_file({"conditioner.embedders.0.model.positional_embedding": _z(77, 1280)}, tmp_path / "refiner.safetensors")
    with pytest.raises(UserError, match="refiner"):
        arch.detect_arch(tmp_path / "refiner.safetensors")
    with pytest.raises(UserError, match="not found"):
        arch.detect_arch(tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="directory"):
        arch.detect_arch(tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 10)
    (tmp_path / "junk.ckpt").write_bytes(b"\x00garbage" * 10)
    for junk in ("junk.safetensors", "junk.ckpt"):
        with pytest.raises(UserError, match="cannot read checkpoint"):
            arch.detect_arch(tmp_path / junk)


def test_detect_arch_refuses_pickled_objects(tmp_path):
    torch.save({"state_dict": TEXT_KEYS["sd15"], "callback": Path("x")}, tmp_path / "pickled.ckpt")
    with pytest.raises(UserError, match="safetensors"):
        arch.detect_arch(tmp_path / "pickled.ckpt")


# ------------------------------------------------------------------------------------------------
# single-file round trips on tiny models
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lowmem_alignprop.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    root = tmp_path_factory.mktemp("tiny")
    pipe.save_pretrained(root / "config")
    for p in (root / "config").rglob("*"):  # the config directory needs no weights
        if p.suffix in (".safetensors", ".bin"):
            p.unlink()
    sd = pipeline_to_ldm(pipe)
    save_file(sd, root / "tiny.safetensors")
    torch.save({"state_dict": sd}, root / "tiny.ckpt")
    return pipe, root, sd


def _images(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images


def test_ldm_mapping_is_inverted_by_diffusers(tiny):
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    pipe, _, sd = tiny
    for module, converted in (
        (pipe.unet, convert_ldm_unet_checkpoint(sd, dict(pipe.unet.config))),
        (pipe.vae, convert_ldm_vae_checkpoint(sd, dict(pipe.vae.config))),
        (pipe.text_encoder, {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(sd).items()}),
    ):
        ref = module.state_dict()
        assert set(converted) == set(ref), type(module).__name__
        for k, v in ref.items():
            assert torch.equal(converted[k].reshape(v.shape), v), k


def _assert_same_weights(a, b):
    for attr in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ma, mb = getattr(a, attr, None), getattr(b, attr, None)
        assert (ma is None) == (mb is None), attr
        if ma is not None:
            sa, sb = ma.state_dict(), mb.state_dict()
            assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa), attr


def test_single_file_round_trip_is_bitwise_identical(tiny):
    from diffusers import StableDiffusionPipeline

    pipe, root, _ = tiny
    loaded = StableDiffusionPipeline.from_single_file(str(root / "tiny.safetensors"), config=str(root / "config"),
                                                      local_files_only=True)
    assert torch.equal(_images(loaded), _images(pipe))
    for name in ("tiny.safetensors", "tiny.ckpt"):
        ours = arch.load_single_file(root / name, config_dir=root / "config")
        assert type(ours).__name__ == "StableDiffusionPipeline" and len(ours.tokenizer) == len(pipe.tokenizer)
        assert dict(ours.scheduler.config) == dict(loaded.scheduler.config)
        _assert_same_weights(ours, pipe)


def test_load_single_file_dtype_and_prediction_type(tiny, tmp_path):
    _, root, sd = tiny
    pipe = arch.load_single_file(root / "tiny.safetensors", torch_dtype=torch.float16, config_dir=root / "config",
                                 prediction_type="v_prediction")
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    # the keys an SDXL v-prediction fine-tune carries (NoobAI-XL V-Pred): v_pred, and ztsnr (trained with zero
    # terminal SNR: its schedule rescaled so, sampled from its last timestep)
    save_file({**sd, "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, tmp_path / "vpred.safetensors")
    pipe = arch.load_single_file(tmp_path / "vpred.safetensors", config_dir=root / "config")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"


def test_a_zero_snr_single_file_at_eta_1_is_refused_from_its_header(tiny, tmp_path, monkeypatch):
    """A v-prediction file trained at zero terminal SNR (its v_pred and ztsnr keys) at DDIM's eta 1: training read
    the whole file (6.8 GB of RAM for SD1.5) before refusing, and plan said FITS. Its header tells: both refuse
    before any weight is read."""
    from lowmem_alignprop.models import loading
    from lowmem_alignprop.settings.config import Config

    _, root, sd = tiny
    save_file({**sd, "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, tmp_path / "vz.safetensors")
    real = arch.single_file_config
    monkeypatch.setattr(arch, "single_file_config", lambda path, a="auto", c=None: real(path, a, c or root / "config"))
    monkeypatch.setattr(arch, "load_single_file", lambda *a, **k: pytest.fail("weights read"))
    with pytest.raises(UserError, match="vz.safetensors: zero terminal SNR with eta=1"):
        loading.load_components(Config(model=str(tmp_path / "vz.safetensors"), eta=1.0))
    loading.check_before_load(Config(model=str(tmp_path / "vz.safetensors"), eta=0.0))  # (v-prediction: trains)
    with pytest.raises(UserError, match="predicts noise \\(epsilon\\) \\(--set prediction_type=epsilon\\): .* use "
                                        "--set prediction_type=v_prediction"):
        loading.check_before_load(Config(model=str(tmp_path / "vz.safetensors"), eta=0.0,
                                         prediction_type="epsilon"))


def test_a_no_vae_single_file_without_a_vae_is_refused_from_its_header(tiny, tmp_path, monkeypatch, capsys):
    """A "no-vae" checkpoint with no --set vae: plan said FITS (it planned the architecture's VAE) and training read
    the whole file before stopping. Its header tells: both refuse alike before any weight is read."""
    from lowmem_alignprop.cli import main

    _, root, sd = tiny
    novae = tmp_path / "novae.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, novae)
    real = arch.single_file_config
    monkeypatch.setattr(arch, "single_file_config", lambda path, a="auto", c=None: real(path, a, c or root / "config"))
    monkeypatch.setattr(arch, "load_single_file", lambda *a, **k: pytest.fail("weights read"))
    lines = set()
    for command in (["plan"], ["--output-dir", str(tmp_path / "run")]):
        assert main([*command, "--profile", "cpu", "--model", str(novae)]) == 2
        lines |= {x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")}
    assert lines == {f"error: {novae} holds no VAE weights (a \"no-vae\" checkpoint): name a VAE to decode with, "
                     "--set vae=DIR|FILE|HUB_ID (e.g. the model family's own VAE), or use a full checkpoint"}, lines
    from lowmem_alignprop.models.loading import check_before_load
    from lowmem_alignprop.settings.config import Config
    check_before_load(Config(model=str(novae), vae=str(tmp_path)))  # (with a VAE named: on to loading)


def test_a_forced_architecture_of_a_file_that_says_another_is_refused(tmp_path, monkeypatch, capsys):
    """--set model_arch=sdxl on an SD 1.x file: plan said FITS (it planned SDXL) and training read the whole file,
    then failed in diffusers on the first shape. Plan and training now refuse alike from the header; a layout
    detection does not know stays the user's to name."""
    from lowmem_alignprop.cli import main

    file = tmp_path / "sd15.safetensors"
    save_file({**UNET_KEYS["sd15"], **TEXT_KEYS["sd15"]}, file)
    monkeypatch.setattr(arch, "load_single_file", lambda *a, **k: pytest.fail("weights read"))
    lines = set()
    for command in (["plan"], ["--output-dir", str(tmp_path / "run")]):
        assert main([*command, "--profile", "cpu", "--model", str(file), "--set", "model_arch=sdxl"]) == 2
        lines |= {x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")}
    assert lines == {f"error: {file} is a sd15 checkpoint ({arch.ARCH_DESCRIPTIONS['sd15']}), not model_arch=sdxl: "
                     "drop --set model_arch (a single file's architecture is told from its layout)"}, lines
    assert not (tmp_path / "run").exists()
    assert arch.single_file_config(file, "sd15")[2].startswith("sd15")  # the architecture it is: on to loading
    unknown = tmp_path / "unknown.safetensors"  # a cross-attention width no shipped architecture has: none fits it
    save_file({U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": _z(320, 512)}, unknown)
    with pytest.raises(UserError, match="its UNet's cross-attention width is 512, and model_arch=sd15's is 768"):
        arch.single_file_config(unknown, "sd15")
    bare = tmp_path / "bare.safetensors"  # no width or encoder to tell by: the named architecture is the user's
    save_file({U + "input_blocks.0.0.weight": _z(320, 4, 3, 3)}, bare)
    assert arch.single_file_config(bare, "sd21")[2].startswith("sd21")


def test_load_single_file_errors(tiny, tmp_path):
    _, root, sd = tiny
    with pytest.raises(UserError, match="not found"):
        arch.load_single_file(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="unknown architecture"):
        arch.load_single_file(root / "tiny.safetensors", arch="sd2")
    with pytest.raises(UserError, match="matches no supported model"):  # the tiny UNet is none of the three
        arch.load_single_file(root / "tiny.safetensors")
    # without its tokenizer files a config directory gives a 2-token tokenizer: refused, naming the fix
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(root / "config", no_tok)
    shutil.rmtree(no_tok / "tokenizer")
    with pytest.raises(UserError, match="tokenizer"):
        arch.load_single_file(root / "tiny.safetensors", config_dir=no_tok)
    # a checkpoint without the VAE, and one with a UNet tensor missing
    save_file({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, tmp_path / "novae.safetensors")
    with pytest.raises(UserError, match=r"lacks the weights.*\(a \"no-vae\" checkpoint: name a VAE for it with --set "
                                        "vae=DIR|FILE|HUB_ID\\)"):
        arch.load_single_file(tmp_path / "novae.safetensors", config_dir=root / "config")
    dropped = U + "out.2.weight"
    save_file({k: v for k, v in sd.items() if k != dropped}, tmp_path / "partial.safetensors")
    with pytest.raises(UserError, match="incomplete"):
        arch.load_single_file(tmp_path / "partial.safetensors", config_dir=root / "config")
    with pytest.raises(UserError, match="model_index.json"):
        arch.load_single_file(root / "tiny.safetensors", config_dir=tmp_path)


def test_sdxl_layout_round_trip_is_bitwise_identical(tmp_path):
    """The conditioner.embedders.{0,1} layout (CLIP-L + OpenCLIP) of SDXL, on a tiny SDXL-shaped model."""
    pipe = build_tiny_sdxl_pipeline()
    pipe.save_pretrained(tmp_path / "config")
    sd = pipeline_to_ldm(pipe)
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight") for k in sd)
    save_file(sd, tmp_path / "xl.safetensors")
    loaded = arch.load_single_file(tmp_path / "xl.safetensors", config_dir=tmp_path / "config")
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    assert torch.equal(_images(loaded), _images(pipe))


def test_open_clip_layout_round_trip(tiny):
    """SD 2.x stores its text encoder in OpenCLIP layout under cond_stage_model.model."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    pipe, root, _ = tiny
    ldm = open_clip_to_ldm(pipe.text_encoder.state_dict())
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in ldm
    te = create_diffusers_clip_model_from_ldm(type(pipe.text_encoder), ldm, subfolder="text_encoder",
                                              config=str(root / "config"), local_files_only=True)
    ref = pipe.text_encoder.state_dict()
    assert set(te.state_dict()) == set(ref) and all(torch.equal(te.state_dict()[k], v) for k, v in ref.items())


# ------------------------------------------------------------------------------------------------
# the shipped configs fit the real single-file layouts (key names and shapes, on meta)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", arch.ARCHS)
def test_shipped_configs_fit_the_ldm_layout(components, name):
    """LDM names/shapes written from each meta model are mapped back by diffusers onto the same model."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    comps = components
    c = comps[name]
    sd = {**unet_to_ldm(c["unet"].state_dict(), c["unet"].config), **vae_to_ldm(c["vae"].state_dict(), c["vae"].config)}
    assert arch.detect_arch_from_state_dict(sd) == name
    for module, converted in ((c["unet"], convert_ldm_unet_checkpoint(sd, dict(c["unet"].config))),
                              (c["vae"], convert_ldm_vae_checkpoint(sd, dict(c["vae"].config)))):
        ref = module.state_dict()
        assert set(converted) == set(ref)
        assert all(converted[k].numel() == v.numel() for k, v in ref.items())
    te_layouts = {  # (module, LDM prefix, OpenCLIP layout?)
        "sd15": [(c["text_encoder"], "cond_stage_model.transformer.", False)],
        "sd21": [(c["text_encoder"], "cond_stage_model.model.", True)],
        "sdxl": [(c["text_encoder"], "conditioner.embedders.0.transformer.", False),
                 (c.get("text_encoder_2"), "conditioner.embedders.1.model.", True)],
    }[name]
    te_sd = {}
    for module, prefix, open_clip in te_layouts:
        ldm = (open_clip_to_ldm if open_clip else clip_to_ldm)(module.state_dict(), prefix)
        te_sd.update(ldm)
        converted = convert_open_clip_checkpoint(module, ldm, prefix) if open_clip else convert_ldm_clip_checkpoint(ldm)
        ref = module.state_dict()
        if not hasattr(module, "text_model"):  # CLIPTextModel is flattened in transformers >= 5.6
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        assert set(converted) == set(ref), (prefix, set(converted) ^ set(ref))
        assert all(converted[k].shape == v.shape for k, v in ref.items())
    assert arch.detect_arch_from_state_dict(te_sd) == name  # the text encoders alone identify the model too


@pytest.mark.parametrize("name", arch.ARCHS)
def test_a_merged_single_file_of_each_architecture_is_detected_as_it(components, name):
    """export --merge --single-file writes pipeline_to_ldm's layout: SD 2.x's text encoder in OpenCLIP layout
    (chosen from the 1024-wide cross-attention), and each file detected as its architecture, so ``--model FILE``
    and from_single_file with the shipped configs read it."""
    from types import SimpleNamespace

    c = components[name]
    sd = pipeline_to_ldm(SimpleNamespace(unet=c["unet"], vae=c["vae"], text_encoder=c["text_encoder"],
                                         text_encoder_2=c.get("text_encoder_2")))
    prefix = {"sd15": "cond_stage_model.transformer.", "sd21": "cond_stage_model.model.",
              "sdxl": "conditioner.embedders.1.model."}[name]
    assert any(k.startswith(prefix) for k in sd)
    assert arch.detect_arch_from_state_dict(sd) == name


# ------------------------------------------------------------------------------------------------
# no network
# ------------------------------------------------------------------------------------------------

def test_loading_touches_no_network(tiny, monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    pipe, root, _ = tiny
    arch.load_single_file(root / "tiny.safetensors", config_dir=root / "config")
    arch.build_random_components("sdxl")
    assert attempts == []


def test_bitsandbytes_is_imported_with_the_hubs_cache_only(tmp_path):
    """bitsandbytes' import asks the hub for a CPU kernel on CPUs with AVX512-BF16 (any model class of diffusers
    imports it): after ``import lowmem_alignprop`` its top level runs with huggingface_hub offline, and only it (a
    stand-in package records what it saw; a find_spec first, as diffusers' availability check does)."""
    (tmp_path / "bitsandbytes").mkdir()
    (tmp_path / "bitsandbytes" / "__init__.py").write_text(
        "from huggingface_hub import constants\nSEEN = constants.HF_HUB_OFFLINE\n")
    code = ("import importlib.util, lowmem_alignprop\n"
            "from huggingface_hub import constants\n"
            "assert importlib.util.find_spec('bitsandbytes') is not None\n"
            "import bitsandbytes\n"
            "print(bitsandbytes.SEEN, constants.HF_HUB_OFFLINE)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.stdout.split() == ["True", "False"], res.stderr[-2000:]


def test_loading_without_hf_hub_offline_touches_no_network(tiny):
    """In a fresh process without HF_HUB_OFFLINE (huggingface_hub reads it at import time)."""
    _, root, _ = tiny
    code = (
        "import socket, sys\n"
        "def refuse(*a, **k):\n"
        "    print('NETWORK', a, file=sys.stderr); raise OSError('no network')\n"
        "socket.socket.connect = refuse; socket.getaddrinfo = refuse\n"
        "from lowmem_alignprop.models import arch\n"
        f"pipe = arch.load_single_file({str(root / 'tiny.safetensors')!r}, config_dir={str(root / 'config')!r})\n"
        "assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size\n"
        "print('OK')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                           "HF_DATASETS_OFFLINE", "DIFFUSERS_OFFLINE")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
    assert "NETWORK" not in res.stderr, res.stderr[-3000:]


def test_a_v_prediction_single_file_says_what_it_loads_as(tiny_dir, tmp_path, monkeypatch, caplog):
    """An SD 2.x single file detects as SD 2.1 768 px (v-prediction): a 512-px base checkpoint (epsilon) has the same
    keys and was sampled as v in silence. The load says which it took and what to do for a base checkpoint."""
    import logging

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from lowmem_alignprop.models import arch as arch_module
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.settings.config import Config

    path = tmp_path / "sd2-base.safetensors"
    save_file({"first_stage_model.x": torch.zeros(1)}, path)  # (only its keys are read: the loader is a stand-in)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)  # (and its folder the file's configs, read before it)
    monkeypatch.setattr(arch_module, "single_file_config", lambda *a: (StableDiffusionPipeline, tiny_dir, "sd21"))
    for prediction, said in (("v_prediction", True), ("epsilon", False)):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction)
        monkeypatch.setattr(arch_module, "load_single_file", lambda *a, **k: pipe)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
            comps = load_components(Config(model=str(path)))
        assert comps.scheduler.config.prediction_type == prediction
        assert ("loads as SD 2.x 768 px, which predicts v: an SD 2.x 512-px base checkpoint" in caplog.text) == said
    # the fix the line names: --set prediction_type=epsilon samples as a base checkpoint, and nothing is said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
        comps = load_components(Config(model=str(path), prediction_type="epsilon"))
    assert comps.scheduler.config.prediction_type == "epsilon" and "loads as SD 2.x" not in caplog.text
    # a file that says it predicts v (the "v_pred" key ComfyUI reads): taken so, nothing to warn of
    save_file({"first_stage_model.x": torch.zeros(1), "v_pred": torch.zeros(0)}, path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
        comps = load_components(Config(model=str(path)))
    assert comps.scheduler.config.prediction_type == "v_prediction" and "loads as SD 2.x" not in caplog.text


def test_a_checkpoint_without_its_vae_trains_with_the_vae_named(tiny, tmp_path, monkeypatch):
    """A "no-vae" single file (the VAE chosen apart, as A1111 users do) was refused even with --set vae: the VAE was
    applied after the pipeline loaded. It is now read first and takes the file's VAE's place: the run is the run of
    the whole file."""
    from lowmem_alignprop.cli import main

    pipe, root, sd = tiny
    save_file({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, tmp_path / "novae.safetensors")
    pipe.vae.save_pretrained(tmp_path / "vae")
    real, asked = arch.single_file_config, []  # the tiny UNet is no shipped architecture: its config folder stands in
    monkeypatch.setattr(arch, "single_file_config",
                        lambda path, a="auto", c=None: asked.append(a) or real(path, a, c or root / "config"))
    rewards = {}
    for name, extra in (("whole", [str(root / "tiny.safetensors")]),
                        ("novae", [str(tmp_path / "novae.safetensors"), "--set", f"vae={tmp_path / 'vae'}",
                                   "--set", "model_arch=sd15"])):
        out = tmp_path / name
        assert main(["--profile", "cpu", "--steps", "1", "--set", "sample_steps=3", "--set", "sample_prompts=1",
                     "--reward", "brightness", "--output-dir", str(out), "--model", *extra]) == 0
        image = json.loads((out / "samples" / "before_after.json").read_text())["images"][0]
        rewards[name] = (image["reward_before"], image["reward_after"])
    assert rewards["novae"] == rewards["whole"]
    # its LoRA merges onto the file with the VAE it trained with (the file has none to merge onto), read as the
    # architecture the run named (model_arch)
    asked.clear()
    assert main(["export", "--lora", str(tmp_path / "novae" / "lora"), "--merge", "--out", str(tmp_path / "m")]) == 0
    assert asked and set(asked) == {"sd15"}
    from diffusers import AutoencoderKL
    merged = AutoencoderKL.from_pretrained(tmp_path / "m" / "vae").state_dict()
    assert all(torch.equal(merged[k], v) for k, v in pipe.vae.state_dict().items())

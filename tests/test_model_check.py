"""A model folder or file that is not a complete text-to-image SD model: one line naming what is wrong, the
same from train, plan and sample, before anything loads (no traceback, nothing written, no network)."""

import json
import re
import shutil

import pytest

from lowmem_alignprop.cli import main
from refusals import rename_text_encoder_weights

FAST = ["--profile", "cpu", "--set", "sample_prompts=0", "--set", "sample_steps=2", "--set", "k=1", "--steps", "1"]


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def broken_model(case, root, tiny_dir):
    """A copy of the tiny model with one thing wrong (or a file that is not a model)."""
    if case.endswith(".ckpt"):
        path = root / case
        path.write_bytes(b"" if case == "empty.ckpt" else bytes(range(256)) * 40)
        return path
    model = root / case
    shutil.copytree(tiny_dir, model)
    if case == "not_sd":  # e.g. an unconditional DDPMPipeline: a unet and a scheduler, nothing else
        index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                 "scheduler": ["diffusers", "DDPMScheduler"]}
        (model / "model_index.json").write_text(json.dumps(index))
    elif case == "refiner":  # StableDiffusionXLImg2ImgPipeline: text_encoder_2 only
        index = {**json.loads((model / "model_index.json").read_text()),
                 "_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
                 "tokenizer": [None, None]}
        (model / "model_index.json").write_text(json.dumps(index))
    elif case == "inpainting":
        _edit_json(model / "unet" / "config.json", in_channels=9)
    elif case == "lcm_distilled":  # LCM_Dreamshaper's: the guidance scale embedded (it trained silently, DDIM + CFG)
        _edit_json(model / "unet" / "config.json", time_cond_proj_dim=256)
    elif case in ("no_vae", "no_tokenizer"):
        shutil.rmtree(model / case[3:])
    elif case == "no_unet_config":
        (model / "unet" / "config.json").unlink()
    elif case == "other_text_encoder":
        _edit_json(model / "text_encoder" / "config.json", hidden_size=64)
    elif case == "index_not_json":
        (model / "model_index.json").write_text("{not json")
    return model


CASES = [
    ("not_sd", "holds a DDPMPipeline, not a Stable Diffusion model (it has no vae, text_encoder, tokenizer)"),
    ("refiner", "holds a StableDiffusionXLImg2ImgPipeline, an image-to-image model (an SDXL refiner has this layout), "
                "not a text-to-image one (it has no text_encoder, tokenizer)"),
    ("inpainting", "has a UNet with 9 input channels for a VAE with 4 latent channels: it is an inpainting"),
    ("lcm_distilled", "has a guidance-distilled UNet (time_cond_proj_dim=256: an LCM model), which takes its guidance"),
    ("no_vae", "is incomplete: its model_index.json lists vae but the vae/ folder is missing"),
    ("no_tokenizer", "is incomplete: its model_index.json lists tokenizer but the tokenizer/ folder is missing"),
    ("no_unet_config", "unet has no config.json"),
    ("other_text_encoder", "the UNet expects text embeddings 32 wide but its text encoder(s) give 64"),
    ("index_not_json", "model_index.json is not valid JSON"),
    ("garbage.ckpt", "it is not a PyTorch checkpoint (damaged, truncated, or another format)"),
    ("empty.ckpt", "is empty (0 bytes)"),
]


@pytest.mark.parametrize("case, needle", CASES, ids=[c for c, _ in CASES])
def test_train_and_plan_name_what_is_wrong_with_the_model(case, needle, tmp_path, tiny_dir, capsys):
    model = broken_model(case, tmp_path, tiny_dir)
    out = tmp_path / "run"
    for command in ([], ["plan"]):
        assert main([*command, *FAST, "--model", str(model), "--output-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err[-2000:]
    assert not out.exists()


def test_the_loaded_model_is_checked_too(tiny_dir):
    """Hub ids and single files are checked on their loaded configs: an inpainting UNet is refused there."""
    from diffusers import UNet2DConditionModel

    from lowmem_alignprop.settings.errors import UserError
    from lowmem_alignprop.models.model_check import check_loaded
    from lowmem_alignprop.models.loading import Components, load_components
    from lowmem_alignprop.settings.config import Config

    comps = load_components(Config(model=str(tiny_dir)))
    check_loaded(comps, "tiny")  # the shipped tiny model passes
    inpaint = UNet2DConditionModel.from_config({**comps.unet.config, "in_channels": 9})
    with pytest.raises(UserError, match="9 input channels for a VAE with 4 latent channels"):
        check_loaded(Components(**{**comps.__dict__, "unet": inpaint}), "owner/inpainting-model")


def test_a_hub_id_offline_says_how_to_get_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FAST, "--model", "someone/some-model", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'someone/some-model' is a Hugging Face hub id" in err and "hf download someone/some-model" in err, err
    assert "local_files_only" not in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("content, needle, folder", [
    (b"", "is empty (0 bytes)", "lora"),
    # the fix names where the file comes from: a run's lora/ folder (with its checkpoints beside it: export writes it
    # again from them; it said to copy it from itself), else an export (or a file from elsewhere)
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{", "pytorch_lora_weights.safetensors is damaged or not a safetensors file (",
     "lora"),  # (tensor_files' one phrase, as --init-lora says it)
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{", "); copy it again from the run's lora/ folder", "lora"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{", "); `lowmem-alignprop export {tmp}/lora` writes it again from the run's "
                                         "last checkpoint", "lora+checkpoints"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{", "); copy it again, or write it again with lowmem-alignprop "
                                         "export", "kohya")])
def test_sample_checks_the_lora_file_before_loading_the_model(content, needle, folder, tmp_path, capsys):
    folder, checkpoints = folder.partition("+")[::2]
    if checkpoints:
        (tmp_path / "checkpoints" / "step-00000003").mkdir(parents=True)
    needle = needle.format(tmp=tmp_path)
    (tmp_path / folder).mkdir()
    lora = tmp_path / folder / "pytorch_lora_weights.safetensors"
    lora.write_bytes(content)
    out = tmp_path / "eval"
    assert main(["sample", "--profile", "cpu", "--lora", str(lora), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not out.exists()


def test_a_resolution_far_from_the_models_and_prompts_the_encoder_cuts_are_pointed_out(tmp_path, caplog):
    import logging

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n" + "a very detailed photograph of a small grey cat on a red sofa " * 8 + "\n")
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main([*FAST, "--set", "resolution=16", "--prompts", str(prompts), "--output-dir",
                     str(tmp_path / "run")]) == 0
    assert "the model was made for 64 px images and this run uses 16 px" in caplog.text
    assert "--set resolution=64" in caplog.text
    assert re.search(r"1 of 2 prompts are longer than the \d+ tokens the text encoder reads", caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):  # at the model's own size: no warning
        assert main([*FAST, "--output-dir", str(tmp_path / "run2")]) == 0
    assert "the model was made for" not in caplog.text and "prompts are longer" not in caplog.text


def test_a_vae_with_another_downsampling_is_refused(tmp_path, tiny_dir, capsys):
    from diffusers import AutoencoderKL

    own = AutoencoderKL.from_pretrained(tiny_dir, subfolder="vae")
    deeper = AutoencoderKL.from_config({**own.config, "block_out_channels": [16, 32, 32, 32],
                                        "down_block_types": ["DownEncoderBlock2D"] * 4,
                                        "up_block_types": ["UpDecoderBlock2D"] * 4})
    deeper.save_pretrained(tmp_path / "vae8")
    out = tmp_path / "run"
    assert main([*FAST, "--set", f"vae={tmp_path / 'vae8'}", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "downsamples images 8x, the model's VAE 2x: use a VAE made for this model" in err, err
    assert not out.exists()


def test_a_vae_file_that_holds_no_vae_or_another_shape_is_one_line(tmp_path, tiny_dir, capsys):
    """--set vae=FILE of a file that is no VAE (a UNet's, a LoRA's) was a traceback; one of another latent width was
    diffusers' message cut mid-word, advising arguments the user cannot pass."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file

    from ldm_format import unet_to_ldm, vae_to_ldm

    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    save_file(unet_to_ldm(unet.state_dict(), unet.config), str(tmp_path / "unet.safetensors"))
    own = AutoencoderKL.from_pretrained(tiny_dir, subfolder="vae")
    wide = AutoencoderKL.from_config({**own.config, "latent_channels": 16})
    save_file(vae_to_ldm(wide.state_dict(), wide.config), str(tmp_path / "vae16.safetensors"))
    for file, needle in (("unet.safetensors", "holds no VAE weights (a UNet's, a LoRA's or another part's file?): "
                                              "pass a VAE file, a VAE folder or a hub id"),
                         ("vae16.safetensors", "its weights do not fit the model's VAE architecture (other layer "
                                               "sizes): use a VAE made for this model")):
        out = tmp_path / file
        assert main([*FAST, "--set", f"vae={tmp_path / file}", "--output-dir", str(out.with_suffix(""))]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
        assert len(err) == 1 and needle in err[0], err


def test_a_text_encoder_whose_files_lack_weights_is_refused_not_run_as_noise(tmp_path, tiny_dir, capsys):
    """transformers loads such a text encoder with random weights and a logged table only; train and
    ``export --merge`` stop with one line naming the part, how many weights are missing and one of them."""
    from lowmem_alignprop.lora.lora_merge import load_base
    from lowmem_alignprop.settings.errors import UserError

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    renamed = rename_text_encoder_weights(model)
    needle = re.compile(rf"{renamed} of the \d+ weights of its text_encoder \(CLIPTextModel\) are not in its files "
                        r"\(e\.g\. (text_model\.)?encoder\.layers\.0\.\S+\) and would run as random values")
    out = tmp_path / "run"
    assert main([*FAST, "--model", str(model), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle.search(err), err[-2000:]
    assert not out.exists()
    with pytest.raises(UserError, match=needle):
        load_base(str(model))
    load_base(str(tiny_dir))  # the intact model loads


def test_a_flux_transformer_without_sample_size_is_judged_at_1024_px():
    """FLUX.1's config has no sample_size (it was trained at 1024 px): the one resolution rule takes 128 latent cells
    for it, with the same words as every model's."""
    from types import SimpleNamespace

    from lowmem_alignprop.models.sampling import resolution_note

    vae = SimpleNamespace(config={"block_out_channels": [1, 2, 3, 4]})  # 3 downsamplings: 8 px a cell
    flux = SimpleNamespace(config=SimpleNamespace())
    assert resolution_note(flux, vae, 1024, default_size=128) is None
    assert resolution_note(flux, vae, 512, default_size=128).startswith(
        "the model was made for 1024 px images and this run uses 512 px: that far from its size its images")

"""Model loading and LoRA export details."""

import pytest
import torch

from loras import nudge
from numerics import SAME_OPS, assert_rel_close

from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.models.loading import add_lora, load_components, lora_state_dict, resolve_model
from lowmem_alignprop.models.lora_metadata import lora_metadata


def test_lora_metadata_writes_sets_sorted_whatever_their_iteration_order():
    """peft keeps target_modules as a set and peft/diffusers write list(set): its order followed the process's
    string hashing, so two exports of one LoRA differed byte for byte. A set iterating in reverse stands for
    a process whose hashing orders it so."""
    class Reversed(set):
        def __iter__(self):
            return iter(sorted(set.__iter__(self), reverse=True))

    class Config:
        def to_dict(self):
            return {"r": 4, "target_modules": Reversed({"to_k", "to_q", "to_v", "to_out.0"}), "alpha_pattern": {}}

    assert list(Reversed({"a", "b"})) == ["b", "a"]  # what list(set) would have written
    assert lora_metadata(Config()) == {"r": 4, "target_modules": ["to_k", "to_out.0", "to_q", "to_v"],
                                       "alpha_pattern": {}}


def test_the_diffusers_header_names_the_blocks_proj_out_by_path_and_not_the_top_level_one():
    """lora_layers=attention+ff on SD3/FLUX: ``proj_out`` (FLUX's single blocks') is a target whose exclusion keeps
    the transformer's last layer out; the header (no exclude_modules: peft warns of one that excluded nothing) named
    it by that suffix, which matches the top-level proj_out too (peft: "The PEFT config contained these additional
    target modules: ['proj_out']"). It names the adapted blocks' by path: none on SD3; peft's own file keeps both."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from lowmem_alignprop.models.lora_layers import lora_config

    config = lora_config(4, 8.0, "attention+ff", flow=True)
    flux = {f"{m}.lora_{ab}.weight": torch.zeros(1) for m in ("transformer_blocks.0.ff.net.2", "single_transformer_"
            "blocks.0.proj_out", "single_transformer_blocks.1.proj_out", "single_transformer_blocks.0.proj_mlp")
            for ab in "AB"}
    out = lora_metadata(config, layers=flux)
    assert sorted(set(out["target_modules"]) - set(config.target_modules)) == [
        "single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out"]
    assert sorted(set(config.target_modules) - set(out["target_modules"])) == ["proj_out"]
    assert "exclude_modules" not in out
    read = LoraConfig(**{k: v for k, v in out.items() if k != "peft_type"})
    matched = [m for m in ("proj_out", "single_transformer_blocks.1.proj_out", "transformer_blocks.0.ff.net.2",
                           "single_transformer_blocks.1.proj_mlp") if check_target_module_exists(read, m)]
    assert matched == ["single_transformer_blocks.1.proj_out", "transformer_blocks.0.ff.net.2",
                       "single_transformer_blocks.1.proj_mlp"]
    sd3 = {k: v for k, v in flux.items() if k.startswith("transformer_blocks.")}
    assert "proj_out" not in lora_metadata(config, layers=sd3)["target_modules"]
    peft_file = lora_metadata(config, peft_file=True, layers=flux)
    assert "proj_out" in peft_file["target_modules"] and peft_file["exclude_modules"] == "proj_out"


def test_lora_with_alpha_unlike_rank_keeps_its_scale_through_diffusers(tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    comps = load_components(Config(model=str(tiny_dir)))
    params = add_lora(comps.unet, rank=4, alpha=16, seed=0)
    nudge(params, seed=0)  # lora_B starts at zero
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=lora_state_dict(comps.unet),
                                              unet_lora_adapter_metadata=lora_metadata(comps.unet.peft_config["default"]))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path))
    x, t, h = torch.randn(1, 4, 32, 32), torch.tensor(500), torch.randn(1, 16, 32)
    with torch.no_grad():
        ours = comps.unet(x, t, encoder_hidden_states=h).sample
        theirs = pipe.unet(x, t, encoder_hidden_states=h).sample
        comps.unet.disable_adapters()
        base = comps.unet(x, t, encoder_hidden_states=h).sample
    assert (ours - base).abs().max() > 1e-3  # the LoRA matters
    assert_rel_close(ours, theirs, SAME_OPS, "LoRA loaded by diffusers")


@pytest.mark.parametrize("spec, kind", [("tiny", "tiny"), ("sd15", "arch"), ("runwayml/stable-diffusion-v1-5", "hub")])
def test_resolve_model_kinds(spec, kind):
    assert resolve_model(spec)[0] == kind


def test_resolve_model_rejects_non_model_directory(tmp_path):
    with pytest.raises(UserError, match="not a diffusers model"):
        resolve_model(str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not a checkpoint"):
        resolve_model(str(tmp_path / "notes.txt"))


def test_a_folder_of_fp16_variant_files_loads_as_its_plain_twin(tiny_dir, tmp_path):
    """A model saved or downloaded with diffusers' variant="fp16" (diffusion_pytorch_model.fp16.safetensors,
    model.fp16.safetensors) was refused with diffusers' "no file named diffusion_pytorch_model.bin". Each component
    now loads its own variant (transformers reads only the one it is given): the same weights as the plain folder,
    whole or mixed (a UNet of fp16 files beside plain text encoder files), sharded too."""
    import shutil

    from diffusers import StableDiffusionPipeline

    from lowmem_alignprop.models.block_loading import folder_files
    from lowmem_alignprop.settings.paths import component_variant, weights_variant

    plain = StableDiffusionPipeline.from_pretrained(tiny_dir)
    whole, mixed = tmp_path / "whole", tmp_path / "mixed"
    plain.save_pretrained(whole, variant="fp16")
    shutil.copytree(tiny_dir, mixed)
    for part in ("unet", "text_encoder"):
        shutil.rmtree(mixed / part)
    plain.unet.save_pretrained(mixed / "unet", variant="fp16", max_shard_size="100KB")  # shards of the variant
    plain.text_encoder.save_pretrained(mixed / "text_encoder", variant="fp16")
    assert (weights_variant(tiny_dir), weights_variant(whole), weights_variant(mixed)) == (None, "fp16", "fp16")
    assert component_variant(mixed / "vae") is None and component_variant(mixed / "unet") == "fp16"
    for folder in (whole, mixed):
        comps = load_components(Config(model=str(folder)))
        for part in ("unet", "vae", "text_encoder"):
            ours, theirs = getattr(comps, part).state_dict(), getattr(plain, part).state_dict()
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), (folder, part)
    shards = folder_files(mixed / "unet")  # (a transformer folder's files, read block by block: the same names)
    assert len(shards) > 1 and all(".fp16-" in f.name for f in shards) and all(f.is_file() for f in shards)

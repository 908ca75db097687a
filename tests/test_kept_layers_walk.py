"""Kept --init-lora layers walked through as a user meets them (the CLI on the tiny SD1.5-shaped model): what a run
says of a LoRA it keeps whole, and that its outputs hold the kept layers however its run folder was left."""

from __future__ import annotations

import pytest
import torch

ARGS = ["--profile", "cpu", "--set", "sample_steps=2", "--set", "k=1", "--set", "sample_prompts=0"]
ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"
TEXT = "text_model.encoder.layers.0.self_attn.q_proj"


def _kohya(pipe, layers: dict[str, tuple[str, str]], seed: int = 3) -> dict[str, torch.Tensor]:
    """A kohya LoRA of ``layers`` (kohya name -> (component, module path)), rank 2, alpha 1."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, (part, path) in layers.items():
        module = getattr(pipe, part)
        weight = module.get_submodule(path if hasattr(module, "text_model") else path.removeprefix("text_model."))
        weight = weight.weight
        kernel = tuple(weight.shape[2:])
        weights[f"{name}.lora_down.weight"] = 0.3 * torch.randn(2, weight.shape[1], *kernel, generator=g)
        weights[f"{name}.lora_up.weight"] = 0.3 * torch.randn(weight.shape[0], 2, *(1,) * len(kernel), generator=g)
        weights[f"{name}.alpha"] = torch.tensor(1.0)
    return weights


def _name(part: str, path: str) -> str:
    return ("lora_te_" if part == "text_encoder" else "lora_unet_") + path.replace(".", "_")


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_dir):
    """civitai.safetensors: one attention layer (trained; rank 2), a text-encoder layer and a 3x3 conv (kept);
    kept_only.safetensors: the text-encoder layer and the conv alone."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("loras")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    kept = {_name(p, m): (p, m) for p, m in (("text_encoder", TEXT), ("unet", CONV))}
    save_file(_kohya(pipe, {_name("unet", ATTN): ("unet", ATTN), **kept}), str(folder / "civitai.safetensors"))
    save_file(_kohya(pipe, kept), str(folder / "kept_only.safetensors"))
    return folder


def test_a_resume_whose_kept_layers_file_is_gone_writes_it_again_and_its_lora_holds_them(loras, tmp_path, caplog):
    """init_lora/kept_layers.safetensors deleted (a tidy-up, a partial copy of the run folder) before a --resume: the
    resume fuses the kept layers again from init_lora/'s LoRA, so it writes their file again, and lora/ and the new
    checkpoint hold them (they were written without them: 2 layers lost in silence, the LoRA rendering other images
    than the run's)."""
    from safetensors.torch import load_file

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.run.filenames import INIT_LORA_DIR, KEPT_LAYERS_NAME

    run = tmp_path / "run"
    start = [*ARGS, "--set", "lora_rank=2", "--checkpoint-every", "1", "--output-dir", str(run)]
    assert main([*start, "--steps", "1", "--init-lora", str(loras / "civitai.safetensors")]) == 0
    kept_file = run / INIT_LORA_DIR / KEPT_LAYERS_NAME
    kept = load_file(str(kept_file))
    assert len(kept) == 4  # (the text-encoder layer and the conv, A and B each)
    kept_file.unlink()
    caplog.clear()
    assert main([*start, "--steps", "2", "--resume", "latest"]) == 0
    said = [r.getMessage() for r in caplog.records if "was gone" in r.getMessage()]
    copy = run / INIT_LORA_DIR / "pytorch_lora_weights.safetensors"
    assert said == [f"{kept_file} was gone: written again from {copy}"
                    " (the 2 layers this run keeps as its --init-lora had them, which its LoRA files carry)"], said
    again = load_file(str(kept_file))
    assert again.keys() == kept.keys() and all(torch.equal(again[k], kept[k]) for k in kept)
    assert (run / "checkpoints" / "step-00000002" / KEPT_LAYERS_NAME).is_file()
    lora = load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))
    assert len(lora) == 2 * 32 + 4  # the run's 32 attention layers' A and B, and the 2 kept layers'
    assert len([k for k in lora if "conv1" in k or "text_encoder" in k]) == 4

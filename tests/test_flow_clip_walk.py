"""SD3/FLUX LoRAs that adapt CLIP, walked through ``sample`` as a user brings them: a kohya sd-scripts FLUX file with
``lora_te1_`` layers (with and without a modulation layer this trainer does not train), a LoRA of CLIP layers only
(no transformer layer; SD3: CLIP-G's alone). Each ``sample`` image is checked against diffusers' own pipeline with
everything loaded at once (``load_lora_weights``, ``set_adapters``), at the reordering tolerance."""

from __future__ import annotations

import json

import pytest
import torch
from flowmodels import FLOW_RESOLUTION, build_tiny_flux_dir, build_tiny_sd3_dir
from loras import clip_lora_parts
from numerics import REORDERED, assert_rel_close

from lowmem_alignprop.cli import main

pytestmark = pytest.mark.usefixtures("fresh_log_handlers")

RES, STEPS, MSL, BATCH = FLOW_RESOLUTION, 2, 16, 2
GUIDANCE = {"flux": 3.5, "sd3": 4.0}
FLOW = ["--profile", "cpu", "--seed", "0", "--set", f"resolution={RES}", "--set", f"sample_steps={STEPS}",
        "--set", f"batch_size={BATCH}", "--set", f"max_sequence_length={MSL}", "--reward", "brightness",
        "--num-prompts", "2", "--images-per-prompt", "1"]


def _cls(name):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    return FluxPipeline if name == "flux" else StableDiffusion3Pipeline


def _kohya_encoder(layers: dict, prefix: str, alpha: float) -> dict:
    """peft CLIP layers (``encoder.layers.0.self_attn.q_proj.lora_A.weight``, transformers 5 names them without
    ``text_model.``) in sd-scripts' names (``lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down...``)."""
    out = {}
    for key, value in layers.items():
        module, _, part = key.rpartition(".lora_")
        stem = prefix + ("text_model." + module.removeprefix("text_model.")).replace(".", "_")
        out[f"{stem}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
        if part.startswith("A"):
            out[f"{stem}.alpha"] = torch.tensor(alpha)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny FLUX (no single block: diffusers' kohya reader splits linear1 at FLUX.1's widths only) and SD3, and
    their LoRA files: FLUX in sd-scripts' names with CLIP-L layers (rank 2, alpha 3), once more with a modulation
    layer (img_mod.lin, which this trainer does not train); CLIP-only LoRAs in diffusers' layout (SD3: CLIP-L and
    CLIP-G, and CLIP-G alone)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from lowmem_alignprop.lora.flow_export import kohya_state_dict
    from lowmem_alignprop.models import flow

    root = tmp_path_factory.mktemp("clipwalk")
    models = {"flux": build_tiny_flux_dir(root / "flux", single_layers=0), "sd3": build_tiny_sd3_dir(root / "sd3")}
    files = {}
    pipe = _cls("flux").from_pretrained(models["flux"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in flow.add_flow_lora(pipe.transformer, rank=4, seed=1):
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    clip = clip_lora_parts(pipe)
    kohya = {**kohya_state_dict(get_peft_model_state_dict(pipe.transformer), lambda m: 1.0, "flux"),
             **_kohya_encoder(clip["text_encoder_lora_layers"], "lora_te1_", 3.0)}
    save_file(kohya, str(root / "kohya_te1.safetensors"))
    files["kohya_te1"] = root / "kohya_te1.safetensors"
    mod = pipe.transformer.transformer_blocks[0].norm1.linear
    name = "lora_unet_double_blocks_0_img_mod_lin"
    save_file({**kohya, f"{name}.lora_down.weight": 0.3 * torch.randn(2, mod.in_features, generator=g),
               f"{name}.lora_up.weight": 0.3 * torch.randn(mod.out_features, 2, generator=g),
               f"{name}.alpha": torch.tensor(2.0)}, str(root / "kohya_te1_mod.safetensors"))
    files["kohya_te1_mod"] = root / "kohya_te1_mod.safetensors"
    save_file({k: v for k, v in kohya.items() if k.startswith("lora_unet_")}, str(root / "kohya_unet.safetensors"))
    files["kohya_unet"] = root / "kohya_unet.safetensors"
    for family in ("flux", "sd3"):
        parts = clip_lora_parts(_cls(family).from_pretrained(models[family]))
        _cls(family).save_lora_weights(str(root / f"{family}-clip"), **parts)
        files[f"{family}-clip"] = root / f"{family}-clip" / "pytorch_lora_weights.safetensors"
        if family == "sd3":
            _cls(family).save_lora_weights(str(root / "sd3-clip-g"), **{k: v for k, v in parts.items()
                                                                         if k.startswith("text_encoder_2_")})
            files["sd3-clip-g"] = root / "sd3-clip-g" / "pytorch_lora_weights.safetensors"
    return models, files


def _sample(model, loras, out, monkeypatch, family):
    """``sample`` of ``loras`` ((file, weight) pairs): (base images, LoRA images, prompts, seeds)."""
    from lowmem_alignprop.training import grid

    grids, save = [], grid.save_sample_grid
    monkeypatch.setattr(grid, "save_sample_grid", lambda path, labels, base, lora, **kw: (
        grids.append((base[0], lora[0])), save(path, labels, base, lora, **kw))[-1])
    rc = main(["sample", *FLOW, "--model", str(model), "--set", f"guidance_scale={GUIDANCE[family]}",
               *[x for f, w in loras for x in ("--lora", f"{f}:{w}")], "--output-dir", str(out)])
    assert rc == 0
    r = json.loads((out / "sample_results.json").read_text())
    return (*grids[0], [p["prompt"] for p in r["per_prompt"] for _ in p["seeds"]],
            [s for p in r["per_prompt"] for s in p["seeds"]])


def _diffusers(family, model, loras, prompts, seeds):
    """diffusers' pipeline with every part loaded at once: (base images, LoRA images mixed at the weights)."""
    pipe = _cls(family).from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    for i, (f, _) in enumerate(loras):
        pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name=f"l{i}")

    def images():
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        negative = {"negative_prompt": [""] * len(prompts)} if family == "sd3" else {}
        return pipe(prompt=prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE[family], height=RES, width=RES,
                    generator=gens, output_type="pt", max_sequence_length=MSL, **negative).images.float()

    with torch.no_grad():
        pipe.disable_lora()
        base = images()
        pipe.enable_lora()
        pipe.set_adapters([f"l{i}" for i in range(len(loras))], adapter_weights=[w for _, w in loras])
        return base, images()


def _renders_as_diffusers(world, family, loras, tmp_path, monkeypatch) -> torch.Tensor:
    models, _ = world
    base, lora, prompts, seeds = _sample(models[family], loras, tmp_path / "s", monkeypatch, family)
    ref_base, ref_lora = _diffusers(family, models[family], loras, prompts, seeds)
    assert_rel_close(base, ref_base, REORDERED, "base images")
    assert_rel_close(lora, ref_lora, REORDERED, "LoRA images")
    return lora - base


@pytest.mark.parametrize("which", ["kohya_te1", "kohya_te1_mod"])
def test_sample_of_a_kohya_flux_file_applies_its_clip_l_layers(world, which, tmp_path, monkeypatch):
    """sd-scripts' FLUX LoRA trained with CLIP-L: sample's LoRA images are diffusers' (its lora_te1_ layers were
    dropped without a word: the images were those of the file without them)."""
    _, files = world
    delta = _renders_as_diffusers(world, "flux", [(files[which], 0.7)], tmp_path, monkeypatch)
    assert delta.abs().max() > 0.01


@pytest.mark.parametrize("family, which", [("flux", "flux-clip"), ("sd3", "sd3-clip"), ("sd3", "sd3-clip-g")])
def test_sample_of_a_lora_of_clip_layers_only(world, family, which, tmp_path, monkeypatch):
    """A LoRA with no transformer layer (a text-encoder-only LoRA), alone and mixed with a transformer LoRA: the
    images are diffusers' (it was a traceback: set_adapters of an adapter the transformer has not)."""
    _, files = world
    delta = _renders_as_diffusers(world, family, [(files[which], 0.8)], tmp_path, monkeypatch)
    assert delta.abs().max() > 0.005  # the adapted prompts change the images
    if family == "flux":
        _renders_as_diffusers(world, family, [(files[which], 0.8), (files["kohya_unet"], -0.5)], tmp_path / "mix",
                              monkeypatch)


def test_sample_of_an_sd3_kohya_file_of_clip_layers_only(world, tmp_path, monkeypatch):
    """sd-scripts' names for SD3's CLIP-G alone (``lora_te2_``, alpha 3 / rank 2; no lora_unet_ key): sample's images
    are diffusers' of the same layers in its own layout (they were the base images: SD3's reader reads no kohya
    names, and 0 layers loaded where none were expected)."""
    from safetensors.torch import load_file, save_file

    models, files = world
    layers = {k.removeprefix("text_encoder_2."): v for k, v in load_file(str(files["sd3-clip-g"])).items()}
    save_file(_kohya_encoder(layers, "lora_te2_", 3.0), str(tmp_path / "te2.safetensors"))
    base, lora, prompts, seeds = _sample(models["sd3"], [(tmp_path / "te2.safetensors", 0.7)], tmp_path / "s",
                                         monkeypatch, "sd3")
    ref_base, ref_lora = _diffusers("sd3", models["sd3"], [(files["sd3-clip-g"], 0.7)], prompts, seeds)
    assert_rel_close(base, ref_base, REORDERED, "base images")
    assert_rel_close(lora, ref_lora, REORDERED, "LoRA images")
    assert (lora - base).abs().max() > 0.005

"""A LoRA file in peft's names without diffusers' part prefix: ``get_peft_model_state_dict(unet)`` saved with
safetensors (``down_blocks.1...attn1.to_q.lora_A.weight``), the same with a PeftModel's ``base_model.model.``, or a
model's own ``save_lora_adapter`` (its peft config, lora_alpha, in the header's lora_adapter_metadata). diffusers'
``pipe.load_lora_weights`` loads none of its layers (a log line; FLUX.1's reader raised KeyError on
base_model.model.), and sample --lora / --init-lora said "which diffusers' LoRA loader leaves out without a word ...
save the LoRA again in one layout" or "trained for another base model". Now such a file is read as the UNet's or the
transformer's LoRA (each layer's delta B A alpha / rank), and one whose keys are not all one denoiser's layers is one
line naming the key and the prefixes diffusers reads."""

import pytest
import torch
from flowmodels import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from midsize import build_tiny_sdxl_pipeline
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from lowmem_alignprop.lora.adapters import adapted_layers, load_adapters
from lowmem_alignprop.lora.init_lora import init_lora_file, split_init_lora
from lowmem_alignprop.lora.lora_args import parse_lora
from lowmem_alignprop.lora import lora_formats
from lowmem_alignprop.models.tiny import build_tiny_pipeline
from lowmem_alignprop.settings.errors import UserError

BUILD = {"sd": build_tiny_pipeline, "sdxl": build_tiny_sdxl_pipeline, "sd3": build_tiny_sd3_pipeline,
         "flux": build_tiny_flux_pipeline}
PART = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}
MODEL = {"sd": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "flux"}  # (LoraSpec.model: from its names)
RANK, ALPHA = 2, 8.0  # (save_lora_adapter: lora_alpha in the header; scale 4, else alpha = rank: scale 1)


def _lora_file(family: str, style: str, folder) -> tuple:
    """A peft LoRA of the denoiser's to_q / to_k, written in ``style``: "bare" (save_file of peft's state dict),
    "peft_prefix" (base_model.model. before each name), "save_lora_adapter" (diffusers' own, its config in the
    header). Returns (file, scale the file says)."""
    model = getattr(BUILD[family](), PART[family])
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["to_q", "to_k"], init_lora_weights=False))
    folder.mkdir()
    if style == "save_lora_adapter":
        model.save_lora_adapter(str(folder))
        return folder / "pytorch_lora_weights.safetensors", ALPHA / RANK
    prefix = "base_model.model." if style == "peft_prefix" else ""
    file = folder / "lora.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}, str(file))
    return file, 1.0


def _expected(file, scale: float) -> dict[str, torch.Tensor]:
    """Each layer's delta, B A x scale, by its module path in the denoiser."""
    weights = {k.removeprefix("base_model.model."): v for k, v in load_file(str(file)).items()}
    return {k.removesuffix(".lora_A.weight"): weights[k.replace("lora_A", "lora_B")] @ v * scale
            for k, v in weights.items() if k.endswith(".lora_A.weight")}


CASES = [("sd", "bare"), ("sd", "peft_prefix"), ("sd", "save_lora_adapter"), ("sdxl", "bare"), ("sd3", "bare"),
         ("sd3", "save_lora_adapter"), ("flux", "bare"), ("flux", "peft_prefix")]


@pytest.mark.parametrize("family,style", CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_a_lora_in_peft_names_without_prefix_loads_each_layers_delta(family, style, tmp_path):
    file, scale = _lora_file(family, style, tmp_path / "lora")
    expected = _expected(file, scale)
    assert len(expected) >= 4

    spec = parse_lora(str(file), 0)
    assert spec.model == MODEL[family]
    pipe = BUILD[family]()
    load_adapters(pipe, [spec], "t")
    denoiser = getattr(pipe, PART[family])
    for name, delta in expected.items():
        got = denoiser.get_submodule(name).get_delta_weight("lora0")
        torch.testing.assert_close(got, delta, rtol=1e-5, atol=1e-6, msg=f"--lora {name}")

    split = split_init_lora(BUILD[family](), init_lora_file(str(file)), str(file), "attention")
    assert sorted(split.trained) == sorted(expected) and not split.kept
    for name, delta in expected.items():
        a, scaled = split.trained[name]
        torch.testing.assert_close(scaled @ a, delta, rtol=1e-5, atol=1e-6, msg=f"--init-lora {name}")


Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
TE = "text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
READS = "text_encoder. (text_encoder_2. for SDXL's and SD3's second CLIP)"
REFUSALS = {
    "text encoder beside UNet": (
        [Q, TE], f"holds '{TE}', a text encoder's layer, beside the UNet's layers in peft's names without diffusers' "
                 f"part prefix (e.g. '{Q}'): diffusers' LoRA loader reads a UNet's layers under unet., a text "
                 f"encoder's under {READS}, and leaves out any other name without a word; save the LoRA with each "
                 "layer's prefix"),
    "no module beside UNet": (
        [Q, "foo.to_q.lora_A.weight"], "holds 'foo.to_q.lora_A.weight', no layer of a UNet, beside the UNet's layers "
                                       f"in peft's names without diffusers' part prefix (e.g. '{Q}'): diffusers' LoRA "
                                       "loader reads a UNet's layers under unet., a text encoder's under "
                                       f"{READS}, and leaves out any other name without a word; save the LoRA with "
                                       "each layer's prefix"),
    "UNet beside transformer (peft prefix)": (
        [f"base_model.model.{Q}", "base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight",
         "base_model.model.transformer_blocks.1.attn.to_q.lora_A.weight"],
        f"holds 'base_model.model.{Q}', no layer of an SD3/FLUX transformer, beside the transformer's layers in peft's "
        "names without diffusers' part prefix (e.g. 'base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight'): "
        "diffusers' LoRA loader reads a transformer's "
        f"layers under transformer., a text encoder's under {READS}, and leaves out any other name without a word; "
        "save the LoRA with each layer's prefix"),
    "text encoder alone": (
        [TE], f"holds '{TE}', a text encoder's layer in peft's names without diffusers' part prefix, which diffusers' "
              f"LoRA loader leaves out without a word: it reads a text encoder's layers under {READS}; save the LoRA "
              "with its encoder's prefix"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_input_a_peft_lora_without_prefix_of_more_than_one_denoiser_is_one_line(case, tmp_path):
    keys, line = REFUSALS[case]
    file = tmp_path / "x.safetensors"
    tensors = {}
    for key in keys:
        tensors[key] = torch.ones(2, 32)
        tensors[key.replace("lora_A", "lora_B")] = torch.ones(32, 2)
    save_file(tensors, str(file))
    for label, read in ((f"--lora {file}", lambda: parse_lora(str(file), 0)),
                        (f"--init-lora {file}", lambda: init_lora_file(str(file)))):
        with pytest.raises(UserError) as refused:
            read()
        assert str(refused.value) == f"{label} {line}"


def test_the_bare_module_names_are_each_denoisers_children_and_no_others():
    """BARE_MODULES names every child with weights of the tiny UNets (SD, SDXL), transformers (SD3, FLUX.1) and
    CLIP encoders, and the two denoisers share none (a first module tells the part)."""
    assert not set(lora_formats.BARE_MODULES["unet"]) & set(lora_formats.BARE_MODULES["transformer"])
    for family, build in BUILD.items():
        pipe = build()
        for part in (PART[family], "text_encoder", "text_encoder_2"):
            if (model := getattr(pipe, part, None)) is None or part == "text_encoder_2" and family == "flux":  # (T5)
                continue
            children = {n for n, m in model.named_children() if any(True for _ in m.parameters())}  # (CLIP's:
            # text_model, or its children under transformers 5)
            names = set(lora_formats.BARE_MODULES["text_encoder" if part.startswith("text") else part])
            assert children and children <= names, (family, part, children - names)


def test_peft_names_beside_another_layout_are_left_to_the_left_out_checks(tmp_path):
    """A bare layer beside diffusers' unet. names is not read as a bare file: the left-out check names it (row 260),
    and an all-zero one is left out there."""
    file = tmp_path / "x.safetensors"
    save_file({f"unet.{Q}": torch.ones(2, 64), f"unet.{Q}".replace("lora_A", "lora_B"): torch.ones(64, 2),
               Q: torch.ones(2, 64), Q.replace("lora_A", "lora_B"): torch.zeros(64, 2)}, str(file))
    assert lora_formats.bare_lora_as_diffusers(load_file(str(file)), file, "--lora x") is None
    pipe = build_tiny_pipeline()
    load_adapters(pipe, [parse_lora(str(file), 0)], "t")
    assert adapted_layers(pipe, "lora0") == 1


def test_bad_input_a_bare_peft_lora_with_a_damaged_adapter_config_is_one_line(tmp_path):
    file = tmp_path / "x.safetensors"
    save_file({Q: torch.ones(2, 64), Q.replace("lora_A", "lora_B"): torch.ones(64, 2)}, str(file),
              metadata={"lora_adapter_metadata": '{"r": 2, "lora_alpha"'})
    with pytest.raises(UserError) as refused:
        parse_lora(str(file), 0)
    assert str(refused.value) == (f"--lora {file}: the adapter config in its header (lora_adapter_metadata) is damaged "
                                  "(not JSON): save the LoRA again")

"""Layers of an SD3/FLUX LoRA file that diffusers' reading leaves out with a log line (hidden by the CLI) or none:
sd-scripts' CLIP-L embeddings and text_projection (``lora_te1_``: its FLUX.1 reader drops them; its SDXL reader,
which --init-lora's conversion used, crashed on them), a key of another prefix in a kohya FLUX.1 file, kohya CLIP
layers or diffusers' ``text_encoder.`` layers beside ``transformer.`` names (the reader keeps the ``transformer.``
ones alone), ``lora_unet_`` keys beside the "mixture" layout's ``lora_transformer_`` (popped), a layer of no
pipeline part (``unet.``) or a transformer weight that is no LoRA's (a Control LoRA's norm scale), which the
part-by-part load left out. ``sample --lora`` and ``--init-lora`` rendered or trained from the LoRA without them;
now one line names the layer. Such layers that change nothing (an all-zero lora_up) are left out, as diffusers
does."""

import functools

import pytest
import torch
from flowmodels import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from loras import lora_layer
from numerics import relative_difference
from safetensors.torch import save_file

from lowmem_alignprop.lora.adapters import adapted_layers, flow_left_out_refusal, load_adapters
from lowmem_alignprop.lora.init_lora import init_lora_file, split_init_lora
from lowmem_alignprop.lora.kohya_layers import comfy_encoder_refusal
from lowmem_alignprop.lora.lora_args import parse_lora
from lowmem_alignprop.settings.errors import UserError

W, SD3_W = 32, 16  # the tiny FLUX pipeline's transformer width and CLIP width; the tiny SD3 transformer's
KOHYA = "lora_unet_double_blocks_0_img_attn_proj"  # block 0's to_out.0
PEFT = "transformer.transformer_blocks.0.attn.to_q"


_layer = functools.partial(lora_layer, alpha=2.0)


# case: (family, the file's tensors with the extra layer's up filled with ``fill``, the key the line names, comfy?)
CASES = {
    "lora_te1_ position_embedding": ("flux", lambda f: _layer(KOHYA, W, W) | _layer(
        "lora_te1_text_model_embeddings_position_embedding", 16, W, f),
        "lora_te1_text_model_embeddings_position_embedding.lora_down.weight", True),
    "lora_te1_ text_projection": ("flux", lambda f: _layer(KOHYA, W, W) | _layer("lora_te1_text_projection", W, W, f),
                                  "lora_te1_text_projection.lora_down.weight", True),
    "another prefix in a kohya file": ("flux", lambda f: _layer(KOHYA, W, W) | _layer("lora_foo_bar", W, W, f),
                                       "lora_foo_bar.lora_down.weight", False),
    "kohya CLIP beside transformer.": ("flux", lambda f: _layer(PEFT, W, W, kohya=False) | _layer(
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", W, W, f),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", False),
    "lora_unet_ beside lora_transformer_": ("flux", lambda f: _layer(
        "lora_transformer_transformer_blocks_0_attn_to_q", W, W) | _layer("lora_unet_foo", W, W, f),
        "lora_unet_foo.lora_down.weight", False),
    "unet. in an SD3 file": ("sd3", lambda f: _layer(PEFT, SD3_W, SD3_W, kohya=False) | _layer(
        "unet.foo", SD3_W, SD3_W, f, kohya=False), "unet.foo.lora_A.weight", False),
}


@pytest.fixture(scope="module")
def pipes():
    return {"flux": build_tiny_flux_pipeline, "sd3": build_tiny_sd3_pipeline}


def _file(tmp_path, case, fill):
    family, tensors, key, comfy = CASES[case]
    file = tmp_path / "lora.safetensors"
    save_file(tensors(fill), str(file))
    return family, file, key, comfy


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_a_layer_diffusers_reading_leaves_out_is_one_line(pipes, case, tmp_path):
    family, file, key, comfy = _file(tmp_path, case, None)
    loads = [(f"--lora {file}", lambda: load_adapters(pipes[family](), [parse_lora(str(file), 0)], "t")),
             (f"--init-lora {file}", lambda: split_init_lora(pipes[family](), init_lora_file(str(file)), str(file),
                                                             "attention+ff"))]
    for label, load in loads[:1] if case == "another prefix in a kohya file" else loads:  # (--init-lora: its
        # conversion refused that layer before, as one it does not train)
        with pytest.raises(UserError) as refused:
            load()
        assert str(refused.value) == (f"{label} {comfy_encoder_refusal(key)}" if comfy else
                                      flow_left_out_refusal(label, key)), label


def test_bad_input_a_control_lora_norm_scale_is_one_line(pipes, tmp_path):
    """A FLUX.1 Control LoRA's norm scale (diffusers' layout): only FluxPipeline.load_lora_weights writes it into the
    model; our part-by-part load left it out. One line that says what the file is (before its wider x_embedder's
    "does not fit" line)."""
    norm = "transformer.transformer_blocks.0.attn.norm_q.weight"
    save_file(_layer(PEFT, W, W, kohya=False) | {norm: torch.full((8,), 2.0)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(UserError) as refused:
        load_adapters(pipes["flux"](), [parse_lora(str(tmp_path / "c.safetensors"), 0)], "t")
    assert str(refused.value) == (f"--lora {tmp_path / 'c.safetensors'} holds '{norm}', a layer's own weight, not a "
                                  "LoRA's: a FLUX.1 Control LoRA's norm scale (Canny, Depth: they condition on an "
                                  "image, through FluxControlPipeline, which lowmem-alignprop does not run); pass a "
                                  "plain LoRA")


@pytest.mark.parametrize("case", ["lora_te1_ position_embedding", "another prefix in a kohya file",
                                  "lora_unet_ beside lora_transformer_", "unet. in an SD3 file"])
def test_an_all_zero_layer_diffusers_leaves_out_is_left_out_and_the_lora_loads(pipes, case, tmp_path):
    family, file, _, _ = _file(tmp_path, case, 0.0)
    pipe = pipes[family]()
    load_adapters(pipe, [parse_lora(str(file), 0)], "t")
    assert adapted_layers(pipe, "lora0") == 1


def test_the_check_reads_the_lora_file_whole_once(tmp_path, monkeypatch):
    """The check of what diffusers leaves out reads the file's names and the few tensors it tests for zeros, not the
    whole file again (a FLUX.1 LoRA is hundreds of MB): each file is loaded whole once (this kohya file by sample's
    conversion, its diffusers copy by diffusers' reader)."""
    import safetensors.torch

    file = tmp_path / "flux.safetensors"
    save_file(_layer(KOHYA, W, W) | _layer("lora_foo_bar", W, W, 0.0), str(file))  # (an all-zero layer it tests)
    loads, load_file = [], safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: loads.append(a[0]) or load_file(*a, **k))
    pipe = build_tiny_flux_pipeline()
    load_adapters(pipe, [parse_lora(str(file), 0)], "tiny-flux")
    assert adapted_layers(pipe, "lora0") and str(file) in loads and len(set(loads)) == len(loads), loads


def test_sample_reads_a_flux_kohya_file_whose_clip_layers_are_q_k_v_alone_as_init_lora_does(tmp_path):
    """A FLUX.1 kohya file of attention layers and CLIP-L's q/k/v alone (no out_proj, no MLP): --init-lora split it
    (flow_export.kohya_as_diffusers); sample handed it to diffusers' FLUX reader, which cannot tell such a CLIP part
    ("does not fit this model's text encoders: Could not automatically infer state dict type; it was trained for
    another base model"). Now both split it, and every layer loads."""
    pipe = build_tiny_flux_pipeline()
    width = pipe.text_encoder.config.hidden_size
    tensors = _layer(KOHYA, W, W)
    for p in "qkv":
        tensors |= _layer(f"lora_te1_text_model_encoder_layers_0_self_attn_{p}_proj", width, width)
    save_file(tensors, str(tmp_path / "qkv.safetensors"))
    load_adapters(pipe, [parse_lora(str(tmp_path / "qkv.safetensors"), 0)], "tiny-flux")
    assert adapted_layers(pipe, "lora0") == 4  # block 0's to_out.0 and CLIP-L's q, k, v
    assert init_lora_file(str(tmp_path / "qkv.safetensors")).is_file()


def test_init_lora_reads_a_flux_mixture_file_as_sample_does(tmp_path):
    """A FLUX.1 LoRA in the "mixture" layout (``lora_transformer_`` + diffusers' module path) beside an all-zero
    ``lora_unet_`` layer: sample read it (diffusers' FLUX reader, the zero layer left out); --init-lora split it as an
    sd-scripts file and refused the mixture's to_q as "a layer lowmem-alignprop does not train". Now both read it alike
    (lora_formats.kohya_flow_for_diffusers): to_q trains from its alpha / rank * up @ down."""
    pipe = build_tiny_flux_pipeline()
    mixture = "lora_transformer_transformer_blocks_0_attn_to_q"
    tensors = _layer(mixture, W, W) | _layer("lora_unet_double_blocks_0_img_mod_lin", W, 6 * W, 0.0)
    save_file(tensors, str(tmp_path / "mixture.safetensors"))
    split = split_init_lora(pipe, init_lora_file(str(tmp_path / "mixture.safetensors")), "x", "attention", "tiny-flux")
    assert sorted(split.trained) == ["transformer_blocks.0.attn.to_q"] and split.kept_layers == 0
    a, scaled_b = split.trained["transformer_blocks.0.attn.to_q"]
    want = tensors[f"{mixture}.lora_up.weight"] @ tensors[f"{mixture}.lora_down.weight"]  # (alpha 2 / rank 2)
    assert relative_difference(scaled_b @ a, want) < 1e-6
    load_adapters(build_tiny_flux_pipeline(), [parse_lora(str(tmp_path / "mixture.safetensors"), 0)], "tiny-flux")


CLIP_PE = "lora_te1_text_model_embeddings_position_embedding"


def _clip_alone(family, fill, tmp_path):
    """A kohya LoRA of CLIP-L alone (no lora_unet_ key: no conversion of sample's or --init-lora's splits it): its
    first layer's out_proj and an embeddings layer with its up filled with ``fill``."""
    width = W if family == "flux" else SD3_W
    file = tmp_path / f"{family}-clip.safetensors"
    save_file(_layer("lora_te1_text_model_encoder_layers_0_self_attn_out_proj", width, width) | _layer(
        CLIP_PE, 16, width, fill), str(file))
    return file


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_bad_input_a_clip_lora_alone_with_an_embeddings_layer_is_one_line(pipes, family, tmp_path):
    """sd-scripts' CLIP-L embeddings in a kohya file of CLIP layers alone: FLUX.1's reader dropped them with a log
    line (the LoRA rendered and trained without them), SD3's load said "only 1 of its 2 text-encoder layers exist
    here; it was trained for another base model". Now the line of such a layer in a file with transformer layers."""
    file = _clip_alone(family, None, tmp_path)
    for label, load in ((f"--lora {file}", lambda: load_adapters(pipes[family](), [parse_lora(str(file), 0)], "t")),
                        (f"--init-lora {file}", lambda: split_init_lora(pipes[family](), init_lora_file(str(file)),
                                                                        str(file), "attention+ff"))):
        with pytest.raises(UserError) as refused:
            load()
        assert str(refused.value) == f"{label} {comfy_encoder_refusal(CLIP_PE + '.lora_down.weight')}", label


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_an_all_zero_embeddings_layer_of_a_clip_lora_alone_is_left_out(pipes, family, tmp_path):
    """(SD3's load counted it as a text-encoder layer that does not exist here: "trained for another base model".)"""
    pipe = pipes[family]()
    load_adapters(pipe, [parse_lora(str(_clip_alone(family, 0.0, tmp_path)), 0)], "t")
    assert adapted_layers(pipe, "lora0") == 1


# FLUX.1 files beside CASES' that take the reader's other ways: no kohya key (read as it is), sd-scripts' CLIP-L
# names that it reads (lora_te_, lora_te1_) beside T5's (lora_te2_, dropped), ComfyUI's names
READER_CASES = {
    "sd-scripts' encoder names": lambda: _layer(KOHYA, W, W) | _layer(
        "lora_te1_text_model_encoder_layers_0_self_attn_k_proj", W, W) | _layer(
        "lora_te_text_model_encoder_layers_0_mlp_fc1", W, W) | _layer(
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q", W, W),
    "no kohya key": lambda: _layer(PEFT, W, W, kohya=False) | _layer("unet.foo", W, W, kohya=False),
    "ComfyUI names": lambda: _layer("diffusion_model.double_blocks.0.img_attn.proj", W, W) | _layer(
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj", W, W) | _layer(
        "lora_foo_bar", W, W),
}


@pytest.mark.parametrize("case", sorted([c for c in CASES if CASES[c][0] == "flux"] + list(READER_CASES)))
def test_the_flux_reader_drops_are_those_diffusers_own_reader_drops(case, tmp_path):
    """A guard against a diffusers upgrade changing what its FLUX.1 reader (FluxPipeline.lora_state_dict) drops
    without a word: the layers adapters._flux_reader_drops (and kohya_layers.kohya_encoder_unread: the CLIP
    embeddings, text_projection) predict as dropped are exactly those absent from the reader's result. Each read
    layer is told by its lora_A / CLIP's ".down" (the file's lora_down times alpha / rank = 1: the same values under
    any name)."""
    from diffusers import FluxPipeline

    from lowmem_alignprop.lora.adapters import _flux_reader_drops
    from lowmem_alignprop.lora.kohya_layers import kohya_encoder_unread, lora_suffix

    raw = READER_CASES[case]() if case in READER_CASES else CASES[case][1](None)
    save_file(raw, str(tmp_path / "lora.safetensors"))
    layers = {k.removesuffix(lora_suffix(k)) for k in raw}
    downs = {n: raw.get(n + ".lora_down.weight", raw.get(n + ".lora_A.weight")) for n in layers}
    read = FluxPipeline.lora_state_dict(str(tmp_path / "lora.safetensors"))
    kept = []
    for key in (k for k in read if k.endswith((".lora_A.weight", ".down.weight"))):  # (CLIP's: "to_q_lora.down")
        same = [n for n in layers if downs[n].shape == read[key].shape and torch.equal(downs[n], read[key])]
        assert len(same) == 1, (key, same)
        kept += same
    drops = set(_flux_reader_drops(raw))
    predicted = {k.removesuffix(lora_suffix(k)) for k in raw if k in drops or kohya_encoder_unread(k)}
    assert (sorted(layers - set(kept)), len(kept)) == (sorted(predicted), len(layers) - len(predicted))
    assert predicted or case == "no kohya key"  # (each file but that one has a layer dropped)


@pytest.mark.parametrize("kohya", [True, False])
def test_a_comfyui_clip_layer_without_a_diffusers_name_is_named_by_its_down_weight_in_either_naming(kohya):
    """A ComfyUI FLUX.1 file's CLIP layer diffusers has no name for (its token embedding), in lora_down/lora_up or
    peft's lora_A/lora_B naming with an alpha beside it, is refused naming its down weight, the key the other reader
    checks name (kohya_layers.first_changed); in lora_A naming it named the alpha (the rule knew lora_down alone)."""
    from lowmem_alignprop.lora.flow_export import kohya_names

    layer = "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding"
    state = _layer(layer, 16, W, kohya=kohya) | {f"{layer}.alpha": torch.tensor(2.0)}
    down = f"{layer}.{'lora_down' if kohya else 'lora_A'}.weight"
    with pytest.raises(UserError) as refused:
        kohya_names(state, "--lora x")
    assert str(refused.value) == f"--lora x {comfy_encoder_refusal(down)}"
    state = _layer(layer, 16, W, fill=0.0, kohya=kohya) | {f"{layer}.alpha": torch.tensor(2.0)}
    assert kohya_names(state, "--lora x") == {}  # (all zeros: left out)

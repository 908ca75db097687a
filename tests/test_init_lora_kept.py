"""``--init-lora`` of a civitai/kohya SD1.5-style LoRA that also adapts layers this trainer does not train (the
text encoder, 1x1 and 3x3 convolutions, the resnets' time_emb_proj): the attention layers start the trained
adapter, every other layer is kept as it came, fused into the frozen base before anything reads it, and written to
``init_lora/kept_layers.safetensors`` (diffusers' layout, each scale folded into B)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from loras import cpu_cfg, rendered, trainer_at_step_0
from numerics import EPS32, REORDERED, SAME_OPS, assert_rel_close, relative_difference

from lowmem_alignprop.settings.errors import UserError

PROMPTS = ["a cat", "a red dog"]
SEED = 31
RANK = 4
# kohya layer name -> (its module in the pipeline, its alpha): per-layer alphas as sd-scripts' resize writes them
TEXT = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
TEXT_OUT = "lora_te_text_model_encoder_layers_0_self_attn_out_proj"  # (diffusers' kohya reader needs an out_proj)
CONV3 = "lora_unet_down_blocks_0_resnets_0_conv1"
CONV1 = "lora_unet_down_blocks_1_attentions_0_proj_in"
TIME = "lora_unet_down_blocks_0_resnets_0_time_emb_proj"
ATTENTION_PATHS = [f"{block}.attentions.0.transformer_blocks.0.attn{i}.{proj}" for block in ("down_blocks.1",
                   "up_blocks.0") for i in (1, 2) for proj in ("to_q", "to_k", "to_v", "to_out.0")]
ATTENTION = {"lora_unet_" + path.replace(".", "_"): path for path in ATTENTION_PATHS}
KEPT = {TEXT: ("text_encoder", "encoder.layers.0.self_attn.q_proj", 2.0),
        TEXT_OUT: ("text_encoder", "encoder.layers.0.self_attn.out_proj", 4.0),
        CONV3: ("unet", "down_blocks.0.resnets.0.conv1", 8.0),
        CONV1: ("unet", "down_blocks.1.attentions.0.proj_in", None),  # (no alpha: alpha = rank)
        TIME: ("unet", "down_blocks.0.resnets.0.time_emb_proj", 1.0)}


def _cfg(out, *extra):
    return cpu_cfg(out, *extra)


def _trainer(cfg):
    return trainer_at_step_0(cfg, PROMPTS)


def _module(comps, part, path):
    return getattr(comps, part).get_submodule(path)


def _images(comps, pipe, cfg):
    return rendered(comps, pipe, cfg, PROMPTS, SEED)


@pytest.fixture(scope="module")
def civitai(tmp_path_factory, tiny_dir):
    """A kohya-style LoRA of the tiny SD1.5-shaped model: rank-4 attention layers (alpha 8) and, of rank 2 (any rank
    is kept), a text-encoder layer, a 3x3 and a 1x1 convolution and a time_emb_proj, each of its own alpha; the images
    base + LoRA render with diffusers' own load_lora_weights (the reference), and the base's."""
    from safetensors.torch import save_file

    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.models.sampling import make_pipeline

    folder = tmp_path_factory.mktemp("civitai")
    cfg = _cfg(folder / "unused")
    comps = load_components(cfg)
    g = torch.Generator().manual_seed(7)
    weights = {}
    layers = {**{n: ("unet", path, 8.0, RANK) for n, path in ATTENTION.items()},
              **{n: (*v, 2) for n, v in KEPT.items()}}
    for name, (part, path, alpha, rank) in layers.items():
        weight = _module(comps, part, path).weight
        kernel = tuple(weight.shape[2:])
        weights[f"{name}.lora_down.weight"] = 0.3 * torch.randn(rank, weight.shape[1], *kernel, generator=g)
        weights[f"{name}.lora_up.weight"] = 0.3 * torch.randn(weight.shape[0], rank, *(1,) * len(kernel), generator=g)
        if alpha is not None:
            weights[f"{name}.alpha"] = torch.tensor(alpha)
    file = folder / "civitai_lora.safetensors"
    save_file(weights, str(file))
    # what diffusers reads without its per-layer alphas (it applies the most common one to every layer): each
    # alpha / rank folded into lora_up, no alpha (scale 1)
    plain = {k: v * (float(weights.get(f"{k.split('.')[0]}.alpha", rank_of(k, weights))) / rank_of(k, weights)
                     if k.endswith(".lora_up.weight") else 1) for k, v in weights.items() if not k.endswith(".alpha")}
    save_file(plain, str(folder / "plain.safetensors"))
    pipe = make_pipeline(comps)
    base_images = _images(comps, pipe, cfg)
    pipe.load_lora_weights(str(folder), weight_name="plain.safetensors")
    return {"file": file, "plain": folder / "plain.safetensors", "weights": weights, "base": base_images,
            "images": _images(comps, pipe, cfg)}


def rank_of(key: str, weights: dict) -> int:
    return weights[f"{key.split('.')[0]}.lora_down.weight"].shape[0]


@pytest.fixture(scope="module")
def started(civitai, tmp_path_factory):
    """A run set up from the LoRA (--seed 5: its own A starts other than the LoRA's, so A must be copied)."""
    return _trainer(_cfg(tmp_path_factory.mktemp("run") / "run", "--set", f"init_lora={civitai['file']}", "--seed",
                         "5"))


def test_step_0_renders_the_base_with_the_whole_lora_loaded_by_diffusers(civitai, started):
    """The "before" images are base + kept + trained: what diffusers' load_lora_weights of the whole file renders.
    Tolerance: the kept layers run fused, (W + s B A) x, where diffusers runs W x + s B (A x): the same products
    summed in another order and rounded once more per kept layer (a few float32 eps relative to the terms), carried
    through the UNet's tens of layers, 3 sampling steps and the VAE: the suite's REORDERED bound (about a thousand
    eps), against a LoRA that moves the images by far more."""
    assert relative_difference(civitai["images"], civitai["base"]) > 100 * REORDERED  # (the LoRA shows)
    images = started.generate(PROMPTS, SEED)[0]
    assert_rel_close(images, civitai["images"], REORDERED, "step 0 from a LoRA with kept layers")


def test_the_trained_adapter_starts_as_the_files_attention_layers(civitai, started):
    unet = started.bare_unet
    for name, path in ATTENTION.items():
        module = unet.get_submodule(path)
        down, up = civitai["weights"][f"{name}.lora_down.weight"], civitai["weights"][f"{name}.lora_up.weight"]
        assert torch.equal(module.lora_A["default"].weight, down), name
        # alpha 8 over rank 4 in the file; the run's own scale (alpha = rank): B carries the ratio
        assert_rel_close(module.lora_B["default"].weight * module.scaling["default"], up * 2, SAME_OPS, name)


def test_no_lora_layer_is_left_on_a_kept_module(civitai, started):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lowmem_alignprop.models.lora_layers import trains_layer

    comps = started.comps
    assert not [n for n, m in comps.text_encoder.named_modules() if isinstance(m, BaseTunerLayer)]
    assert not getattr(comps.text_encoder, "peft_config", None)
    wrapped = {n for n, m in started.bare_unet.named_modules() if isinstance(m, BaseTunerLayer)}
    # the run's own adapter, on the attention projections only (32: 4 transformer blocks x 2 attentions x 4)
    assert wrapped == {n for n, _ in started.bare_unet.named_modules() if trains_layer(n, "attention", False)}
    assert len(wrapped) == 32
    assert set(started.bare_unet.peft_config) == {"default"}
    for part, path, _ in KEPT.values():
        module = _module(comps, part, path)
        assert not isinstance(module, BaseTunerLayer) and not hasattr(module, "lora_A"), path


def test_the_kept_layers_are_the_base_plus_their_delta(civitai, started, tiny_dir):
    """The kept UNet convolutions' (and the other layers') weights are base + alpha / rank * up @ down, rounded once:
    within the reordering of the rank-2 sum (peft computes a 3x3 conv's delta as a convolution) and one rounding of
    the add: a few eps of the terms' size."""
    from lowmem_alignprop.models.loading import load_components

    base = load_components(_cfg(tiny_dir / "unused-never-written"))
    for name, (part, path, alpha) in KEPT.items():
        down, up = civitai["weights"][f"{name}.lora_down.weight"], civitai["weights"][f"{name}.lora_up.weight"]
        scale = (alpha or 2) / 2
        delta = (up.flatten(1) @ down.flatten(1)).view(_module(base, part, path).weight.shape) * scale
        fused = _module(started.comps, part, path).weight
        before = _module(base, part, path).weight
        assert delta.abs().max() > 100 * EPS32 * before.abs().max(), path  # (the delta shows in the weights)
        terms = (up.flatten(1).abs() @ down.flatten(1).abs()).view(delta.shape) * scale + before.abs()
        assert ((fused - (before + delta)).abs() <= 4 * EPS32 * terms).all(), path


def test_kept_layers_file_alone_plus_the_trained_part_is_the_whole_lora(civitai, started, tmp_path):
    """init_lora/kept_layers.safetensors (written where the run writes its init_lora/ copy) loaded alone by diffusers,
    with no metadata, plus the file's attention part, computes what the whole file does: UNet and text encoder."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from loras import unet_out

    from lowmem_alignprop.models.kept_lora import canonical_key, read_kept
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.models.sampling import make_pipeline
    from lowmem_alignprop.run.filenames import INIT_LORA_DIR, KEPT_LAYERS_NAME

    started.write_config()
    file = started.out / INIT_LORA_DIR / KEPT_LAYERS_NAME
    with safe_open(str(file), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    kept = read_kept(started.out)
    assert sorted(kept) == sorted(canonical_key(f"{part}.{path}") + f".lora_{ab}.weight"  # (text_model.: CLIP's)
                                  for part, path, _ in KEPT.values() for ab in "AB")
    assert all(v.dtype == torch.float32 for v in kept.values())
    assert read_kept(tmp_path) == {}
    attention = {k: v for k, v in civitai["weights"].items() if k.split(".")[0] in ATTENTION}
    save_file(attention, str(tmp_path / "attention.safetensors"))

    def outputs(*files):
        comps = load_components(_cfg(tmp_path / "unused"))
        pipe = make_pipeline(comps)
        for i, f in enumerate(files):
            pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name=f"a{i}")
        pipe.set_adapters([f"a{i}" for i in range(len(files))])
        ids = pipe.tokenizer(PROMPTS, padding="max_length", return_tensors="pt").input_ids
        with torch.no_grad():
            return unet_out(comps.unet, False), comps.text_encoder(ids)[0]

    whole, parts = outputs(civitai["plain"]), outputs(file, tmp_path / "attention.safetensors")
    assert_rel_close(parts, whole, SAME_OPS, "kept_layers.safetensors + the attention part")


def test_an_int8_base_refuses_a_kept_unet_linear_before_the_model_loads(civitai):
    from lowmem_alignprop.lora.init_lora import check_init_lora
    from lowmem_alignprop.settings.errors import quote

    with pytest.raises(UserError) as e:
        check_init_lora(str(civitai["file"]), RANK, "tiny", quant="int8")
    assert str(e.value) == (f"--init-lora {civitai['file']} adapts 1 linear layer of the UNet this run does not train "
                            f"(e.g. {quote(TIME + '.lora_down.weight')}), kept as they came by adding them into the "
                            "frozen base, "
                            "which base_quant=int8 stores quantized: add --set base_quant=fp8 (stored after they are "
                            "added, one byte per weight as int8) or --set base_quant=none")
    assert check_init_lora(str(civitai["file"]), RANK, "tiny", quant="fp8").is_file()  # (fp8 is applied after it)


def test_a_kept_linear_is_never_added_into_an_int8_base(civitai, tmp_path, monkeypatch):
    """The fuse itself refuses a kept linear whose base bitsandbytes stores as int8 codes (the check before the load
    reads the run's base_quant; a resume takes the run's init_lora/ copy unchecked): the delta was added to the
    codes, on their scale, not the weights' (the kept layer mostly rounded away, some codes moved by 1), in silence.
    Now the line of the check before the load, naming the module; the codes stay as they were."""
    pytest.importorskip("bitsandbytes")
    from diffusers.quantizers.bitsandbytes import bnb_quantizer

    from lowmem_alignprop.lora.init_lora import split_init_lora
    from lowmem_alignprop.memory import quant
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.models.sampling import make_pipeline

    monkeypatch.setattr(bnb_quantizer.BnB8BitDiffusersQuantizer, "validate_environment", lambda self, *a, **k: None)
    monkeypatch.setenv(quant.CPU_OVERRIDE_ENV, "1")  # (bitsandbytes on this CPU: tests/test_quant.py)
    comps = load_components(_cfg(tmp_path / "unused", "--set", "base_quant=int8"))
    layer = _module(comps, "unet", KEPT[TIME][1])
    assert layer.weight.dtype == torch.int8
    codes = layer.weight.detach().clone()
    with pytest.raises(UserError) as e:
        split_init_lora(make_pipeline(comps), civitai["file"], "my.safetensors")
    assert str(e.value) == ("--init-lora my.safetensors adapts 1 linear layer of the UNet this run does not train "
                            f"(e.g. '{KEPT[TIME][1]}'), kept as they came by adding them into the frozen base, which "
                            "base_quant=int8 stores quantized: add --set base_quant=fp8 (stored after they are "
                            "added, one byte per weight as int8) or --set base_quant=none")
    assert torch.equal(_module(comps, "unet", KEPT[TIME][1]).get_base_layer().weight, codes)


def test_sd3_and_flux_runs_refuse_t5_and_convolution_layers(civitai, tmp_path):
    """An SD3/FLUX run keeps CLIP's layers (tests/test_init_lora_kept_flow.py) but refuses T5's (sd-scripts'
    lora_te3_: no diffusers loader reads them) and a UNet's convolutions, before any model loads."""
    from safetensors.torch import save_file

    from lowmem_alignprop.lora.init_lora import lora_file_ranks
    from lowmem_alignprop.settings.errors import quote

    t5 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"
    save_file({t5: torch.zeros(2, 32), t5.replace("down", "up"): torch.zeros(32, 2)}, str(tmp_path / "t5.safetensors"))
    with pytest.raises(UserError) as e:
        lora_file_ranks(tmp_path / "t5.safetensors", "t5.safetensors", flow=True)
    assert str(e.value) == (f"--init-lora t5.safetensors adapts the T5 text encoder too (e.g. {quote(t5)}), which no "
                            "LoRA loader of diffusers reads (they would be dropped without a word): pass a LoRA "
                            "without T5 layers (CLIP's and the transformer's apply)")
    convs = {k: v for k, v in civitai["weights"].items() if k.startswith((CONV1, CONV3))}
    save_file(convs, str(tmp_path / "locon.safetensors"))
    with pytest.raises(UserError) as e:
        lora_file_ranks(tmp_path / "locon.safetensors", "locon.safetensors", flow=True)
    assert str(e.value) == (f"--init-lora locon.safetensors adapts 2 convolution layers (e.g. '{CONV3}.lora_down."
                            "weight': a LoCon's): an SD3/FLUX run trains and keeps transformer linear layers only, "
                            "and SD3's patch embedding pos_embed.proj (a UNet run keeps convolutions as they came); "
                            "pass a LoRA without other convolution layers")
    assert lora_file_ranks(tmp_path / "locon.safetensors", "x") == set()  # (a UNet: kept, no layer trains from it)


def test_a_resumed_run_fuses_the_kept_layers_again_and_ends_as_an_uninterrupted_one(civitai, tmp_path, capsys,
                                                                                     fresh_log_handlers):
    """A resume reads the run's init_lora/ copy and fuses its kept layers again: its LoRA after step 2 is the
    uninterrupted run's, bit for bit (without the kept layers fused, its steps would see another base); the kept
    file is left as it was. plan says the kept count (they cost no memory: fused)."""
    from safetensors.torch import load_file

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.run.filenames import INIT_LORA_DIR, KEPT_LAYERS_NAME

    args = ["--profile", "cpu", "--set", "sample_steps=3", "--set", "k=1", "--set", "sample_prompts=0",
            "--checkpoint-every", "1", "--init-lora", str(civitai["file"])]
    assert main([*args, "--steps", "2", "--output-dir", str(tmp_path / "whole")]) == 0
    assert main([*args, "--steps", "1", "--output-dir", str(tmp_path / "cut")]) == 0
    kept = (tmp_path / "cut" / INIT_LORA_DIR / KEPT_LAYERS_NAME).read_bytes()
    assert main(["--output-dir", str(tmp_path / "cut"), "--steps", "2", "--resume", "latest"]) == 0
    assert (tmp_path / "cut" / INIT_LORA_DIR / KEPT_LAYERS_NAME).read_bytes() == kept
    whole, cut = (load_file(str(tmp_path / run / "lora" / "pytorch_lora_weights.safetensors")) for run in ("whole",
                                                                                                           "cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
    capsys.readouterr()
    assert main(["plan", "--profile", "cpu", "--init-lora", str(civitai["file"])]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("--init-lora")]
    assert said == [f"--init-lora {civitai['file']}: rank 4, 16 of the run's 32 layers; the other 16 (not in it) "
                    "start at zero, as a fresh LoRA's; 5 more kept as they came, fused into the frozen base (no "
                    "memory); training starts from it"], said


def test_a_run_that_learns_nothing_writes_back_the_whole_lora_it_started_from(civitai, tmp_path, tiny_dir):
    """End to end: a run from the LoRA at lr 1e-30 (Adam's step, about lr per weight, is far under
    a float32 ulp of weights near 0.3: its LoRA cannot move) writes a lora/ that a plain diffusers pipeline
    loads (pipe.load_lora_weights(folder): the attention layers trained, the kept ones as they came) and that renders
    what the LoRA it started from renders; so do its export --merge (a pipeline folder, text encoder fused) and the
    LoRA of its checkpoint copied out of the run folder (the checkpoint holds the kept layers' copy). Both
    sides load unfused layers; only each scale's place differs (folded into B, or applied at run time): REORDERED."""
    from diffusers import StableDiffusionPipeline

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.models.sampling import make_pipeline

    run = tmp_path / "run"
    assert main(["--profile", "cpu", "--set", "sample_steps=3", "--set", "k=1", "--set", "sample_prompts=0",
                 "--set", "lr=1e-30", "--steps", "1", "--checkpoint-every", "1", "--init-lora", str(civitai["file"]),
                 "--output-dir", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["kept_layers"] == {  # (summary.json says them by kind)
        "text_encoder": 2, "text_encoder_2": 0, "convolutions": 2, "other_linears": 1}
    cfg = _cfg(tmp_path / "unused")
    comps = load_components(cfg)
    pipe = make_pipeline(comps)
    pipe.load_lora_weights(str(run / "lora"))
    assert_rel_close(_images(comps, pipe, cfg), civitai["images"], REORDERED, "the run's lora/ in diffusers")
    assert main(["export", "--lora", str(run / "lora"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    merged = StableDiffusionPipeline.from_pretrained(str(tmp_path / "merged"))
    comps = load_components(_cfg(tmp_path / "unused2", "--model", str(tmp_path / "merged")))
    assert_rel_close(_images(comps, make_pipeline(comps), cfg), civitai["images"], REORDERED, "export --merge")
    assert merged.text_encoder is not None
    moved = shutil.copytree(run / "checkpoints" / "step-00000001", tmp_path / "elsewhere" / "step-00000001")
    assert main(["export", "--lora", str(moved), "--format", "diffusers", "--out", str(tmp_path / "from_ckpt")]) == 0
    comps = load_components(cfg)
    pipe = make_pipeline(comps)
    pipe.load_lora_weights(str(tmp_path / "from_ckpt"))
    assert_rel_close(_images(comps, pipe, cfg), civitai["images"], REORDERED, "a checkpoint copied out of its run")


def test_a_lora_of_kept_layers_alone_says_none_train_from_it(civitai, tmp_path, capsys, caplog, fresh_log_handlers):
    """A LoRA with no layer the run trains (a text encoder's and convolutions only): plan said "0 of the run's 32
    layers; the other 32 ... start at zero ...; training starts from it" and the run "0 layers train from it" with
    kinds of count 0 listed: now one true line each."""
    import logging

    from safetensors.torch import save_file

    from lowmem_alignprop.cli import main

    kept_only = {k: v for k, v in civitai["weights"].items() if k.startswith((TEXT, TEXT_OUT, CONV3, CONV1))}
    file = tmp_path / "te_and_convs.safetensors"
    save_file(kept_only, str(file))
    capsys.readouterr()
    assert main(["plan", "--profile", "cpu", "--init-lora", str(file)]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("--init-lora")]
    assert said == [f"--init-lora {file}: the run's rank 4, none of the run's 32 layers (it adapts none of them): the "
                    "run's LoRA starts at zero, as a fresh one; 4 more kept as they came, fused into the frozen base "
                    "(no memory); training starts from the base with those layers"], said
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main(["--profile", "cpu", "--set", "sample_steps=3", "--set", "k=1", "--set", "sample_prompts=0",
                     "--set", "kl_coeff=0.1", "--steps", "1", "--init-lora", str(file), "--output-dir",
                     str(tmp_path / "run")]) == 0
    lines = [r.getMessage() for r in caplog.records if "--init-lora" in r.getMessage() or "starting from" in
             r.getMessage()]
    assert f"--init-lora {file}: 0 layers train from it; 4 layers kept as they came (2 text-encoder layers, " \
           "2 convolutions), fused into the frozen base" in lines, lines  # (as the card counts them)
    assert f"starting from the LoRA {file} (none of the run's 32 layers (it adapts none of them): the run's LoRA " \
           "starts at zero, as a fresh one)" in lines, lines  # (no "the KL starts above 0": the LoRA is at zero)


def test_a_lora_at_zero_gets_no_kl_note(civitai, tmp_path, caplog, fresh_log_handlers):
    """A LoRA whose trained layers are all zero (a fresh one's B, saved before its first step) starts the run at the
    base: kl_coeff's "the KL starts above 0" would be false, so the start line does not say it."""
    import logging

    from safetensors.torch import save_file

    from lowmem_alignprop.cli import main

    at_zero = {k: (torch.zeros_like(v) if k.startswith(tuple(ATTENTION)) and "lora_up" in k else v)
               for k, v in civitai["weights"].items() if k.startswith(tuple(ATTENTION))}
    file = tmp_path / "at_zero.safetensors"
    save_file(at_zero, str(file))
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        assert main(["--profile", "cpu", "--set", "sample_steps=3", "--set", "k=1", "--set", "sample_prompts=0",
                     "--set", "kl_coeff=0.1", "--steps", "1", "--init-lora", str(file), "--output-dir",
                     str(tmp_path / "run")]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("starting from")]
    assert lines == [f"starting from the LoRA {file} (16 of the run's 32 layers; the other 16 (not in it) start at "
                     "zero, as a fresh LoRA's)"], lines



ATTN1 = "mid_block.attentions.0.transformer_blocks.0.attn1"


@pytest.mark.parametrize("layer, down, up, trained", [
    (f"unet.{ATTN1}.to_q", ".lora_A.weight", ".lora_B.weight", True),  # diffusers' and peft's
    (f"unet.{ATTN1}.to_q", ".lora.down.weight", ".lora.up.weight", True),
    (f"unet.{ATTN1}.processor.to_q", "_lora.down.weight", "_lora.up.weight", True),  # (before diffusers 0.21)
    (f"lora_unet_{ATTN1.replace('.', '_')}_to_q", ".lora_down.weight", ".lora_up.weight", True),  # kohya's
    # diffusers' older text-encoder layout: a layer to both readers, kept as it came (a text encoder is never trained)
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", ".lora_linear_layer.down.weight",
     ".lora_linear_layer.up.weight", False),
])
def test_one_list_of_down_keys_counts_a_layer_for_sample_and_init_lora_alike(layer, down, up, trained, tmp_path):
    """lora_layers.LORA_DOWN_SUFFIXES: the one list of a LoRA's down (A) keys, read by `sample --lora` (its layer
    count, adapters.layers_in_file) and by --init-lora (the layer's name, the key less the suffix and the separator
    before it, tells whether a run trains it: lora_file_ranks, here rank 4 of a trained layer)."""
    from safetensors.torch import save_file

    from lowmem_alignprop.lora.adapters import layers_in_file
    from lowmem_alignprop.lora.init_lora import lora_file_ranks

    file = tmp_path / "one.safetensors"
    save_file({layer + down: torch.ones(4, 32), layer + up: torch.zeros(32, 4)}, str(file))
    assert layers_in_file(file) == 1
    assert lora_file_ranks(file, "one") == ({4} if trained else set())

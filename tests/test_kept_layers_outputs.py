"""The outputs side of the layers a run keeps as its --init-lora had them (init_lora/kept_layers.safetensors:
text-encoder layers, a UNet convolution, a UNet linear the run does not train): every LoRA the run writes and
every command that reads it carries them, so that one load gives base + kept + trained, as loading the trained
LoRA and the kept file as two adapters does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from loras import ALPHA, RANK, export, make_sd_lora
from numerics import REORDERED, relative_difference

from lowmem_alignprop.models.kept_lora import canonical_key

KEPT_RANKS = {"text_encoder": 2, "conv": 3, "linear": 5}


def kept_fixture(pipe, seed: int = 7) -> dict[str, torch.Tensor]:
    """Kept layers in the contract's format: a text-encoder q_proj (rank 2), the first resnet's 3x3 conv1 (rank 3,
    4-D) and its time_emb_proj (rank 5), float32, scale folded into lora_B (loaded with alpha = rank)."""
    g = torch.Generator().manual_seed(seed)
    te = next(n for n, _ in pipe.text_encoder.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    unet = dict(pipe.unet.named_modules())
    out = {}
    for key, module, rank in ((f"text_encoder.{te}", pipe.text_encoder.get_submodule(te), KEPT_RANKS["text_encoder"]),
                              ("unet.down_blocks.0.resnets.0.conv1", unet["down_blocks.0.resnets.0.conv1"],
                               KEPT_RANKS["conv"]),
                              ("unet.down_blocks.0.resnets.0.time_emb_proj",
                               unet["down_blocks.0.resnets.0.time_emb_proj"], KEPT_RANKS["linear"])):
        w = module.weight
        a_shape = (rank, *w.shape[1:])
        b_shape = (w.shape[0], rank, *([1] * (w.ndim - 2)))
        out[f"{key}.lora_A.weight"] = torch.randn(a_shape, generator=g) * 0.3
        out[f"{key}.lora_B.weight"] = torch.randn(b_shape, generator=g) * 0.3
    return out


def images(pipe) -> torch.Tensor:
    return pipe("a red car", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


def base_pipe(base: Path):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir):
    """A tiny SD1.5 run's LoRA (rank 4, alpha 8: scale 2) whose init_lora/ holds kept layers, and the reference
    images: base, and base with the trained LoRA and the kept file loaded as two adapters."""
    from safetensors.torch import save_file

    from lowmem_alignprop.run.filenames import INIT_LORA_DIR, KEPT_LAYERS_NAME

    made = make_sd_lora(Path(tiny_dir), tmp_path_factory.mktemp("kept-run"), xl=False)
    pipe = base_pipe(made["base"])
    kept = kept_fixture(pipe)
    (made["run"] / INIT_LORA_DIR).mkdir()
    save_file(kept, str(made["run"] / INIT_LORA_DIR / KEPT_LAYERS_NAME), metadata={"format": "pt"})
    trained_only = tmp_path_factory.mktemp("trained-only")
    for name in ("pytorch_lora_weights.safetensors",):
        (trained_only / name).write_bytes((made["lora"] / name).read_bytes())
    base = images(pipe)
    pipe.load_lora_weights(str(trained_only), adapter_name="trained")
    trained = images(pipe)
    pipe.load_lora_weights(str(made["run"] / INIT_LORA_DIR), weight_name=KEPT_LAYERS_NAME, adapter_name="kept")
    pipe.set_adapters(["trained", "kept"], [1.0, 1.0])
    ref = images(pipe)
    assert relative_difference(ref, trained) > 100 * REORDERED  # the kept layers show in the images
    assert relative_difference(trained, base) > 100 * REORDERED
    return {**made, "kept": kept, "ref": ref, "trained": trained, "base_images": base, "trained_only": trained_only}


def rewrite_as_run(run: dict) -> Path:
    """The run's lora/ written again as the trainer writes it at its end (UNetFamily.save_lora, its caller's kept
    layers: read_kept of the run folder), from the peft adapter the LoRA file holds."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from lowmem_alignprop.models.family import UNetFamily
    from lowmem_alignprop.models.kept_lora import read_kept
    from lowmem_alignprop.models.loading import add_lora, lora_state_dict

    unet = UNet2DConditionModel.from_pretrained(run["base"] / "unet")
    add_lora(unet, RANK, ALPHA, 0, "attention")
    unet.load_lora_adapter(str(run["trained_only"]), weight_name="pytorch_lora_weights.safetensors",
                           adapter_name="loaded", prefix="unet")
    with torch.no_grad():  # the trained values into the adapter "default" the run saves
        for name, p in unet.named_parameters():
            if ".default." in name:
                p.copy_(unet.get_parameter(name.replace(".default.", ".loaded.")))
    unet.delete_adapters("loaded")
    UNetFamily(None).save_lora(StableDiffusionPipeline, unet, lora_state_dict(unet), run["lora"], read_kept(run["run"]))
    return run["lora"]


def test_the_runs_lora_loads_base_kept_and_trained(run):
    """lora/ as the trainer writes it holds the kept layers: diffusers' load_lora_weights of the folder alone renders
    what the two adapters render (the kept layers' own ranks and scale 1, the trained layers' scale 2)."""
    from safetensors import safe_open

    folder = rewrite_as_run(run)
    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = set(f.keys())
    # (the fixture's kept file names the encoder's layer as transformers 5 does; lora/ with CLIP's text_model.)
    assert {canonical_key(k) for k in run["kept"] if k.startswith("text_encoder.")} <= keys
    assert "unet.down_blocks.0.resnets.0.conv1.lora.down.weight" in keys  # (the trained layers' layout)
    pipe = base_pipe(run["base"])
    pipe.load_lora_weights(str(folder))
    assert relative_difference(images(pipe), run["ref"]) < REORDERED


@pytest.fixture(scope="module")
def run_lora(run):
    """The run's lora/ as the trainer writes it (with the kept layers)."""
    return rewrite_as_run(run)


def test_read_lora_keeps_the_kept_layers_apart(run, run_lora):
    """read_lora of such a lora/: the trained layers and config as the run trained them (rank 4, alpha 8, the
    attention targets), the kept ones apart, as the file had them (it refused the text encoder's keys before)."""
    from lowmem_alignprop.lora.lora_files import read_lora

    lora = read_lora(str(run_lora))
    assert sorted(lora.kept) == sorted(map(canonical_key, run["kept"]))  # (text_model.: kept_lora.canonical_key)
    assert all(torch.equal(lora.kept[canonical_key(k)], run["kept"][k]) for k in run["kept"])
    assert lora.config["r"] == RANK and lora.config["lora_alpha"] == ALPHA
    assert sorted(lora.config["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    assert not lora.config["rank_pattern"] and not lora.config["alpha_pattern"]
    assert len(lora.modules) == 32 and all(lora.scale(m) == ALPHA / RANK for m in lora.modules)


def test_a_diffusers_export_loads_base_kept_and_trained(run, run_lora, tmp_path):
    out = export(tmp_path, run_lora, "--format", "diffusers")
    pipe = base_pipe(run["base"])
    pipe.load_lora_weights(str(out))
    assert relative_difference(images(pipe), run["ref"]) < REORDERED


def test_a_kohya_export_holds_the_kept_layers_in_kohya_names(run, run_lora, tmp_path):
    """The kept layers in kohya's names, scale folded: alpha = rank (the conv 4-D), beside the trained layers."""
    from safetensors.torch import load_file

    out = export(tmp_path, run_lora, "--format", "kohya")
    [file] = out.glob("*.safetensors")
    tensors = load_file(str(file))
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv}.lora_down.weight"].shape == (3, 32, 3, 3)
    assert torch.equal(tensors[f"{conv}.lora_up.weight"],
                       run["kept"]["unet.down_blocks.0.resnets.0.conv1.lora_B.weight"])
    assert tensors[f"{conv}.alpha"].item() == 3.0
    assert tensors["lora_unet_down_blocks_0_resnets_0_time_emb_proj.alpha"].item() == 5.0
    te = sorted(k for k in tensors if k.startswith("lora_te_") and k.endswith(".alpha"))
    assert te == ["lora_te_text_model_encoder_layers_0_self_attn_out_proj.alpha",
                  "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"]
    assert tensors[te[1]].item() == 2.0
    out_proj = "lora_te_text_model_encoder_layers_0_self_attn_out_proj"  # adds zero: diffusers' reader needs one
    assert not tensors[f"{out_proj}.lora_up.weight"].any() and tensors[f"{out_proj}.lora_down.weight"].shape == (2, 32)
    assert sum(k.endswith(".alpha") for k in tensors) == 32 + 3 + 1


def test_a_peft_export_is_refused_naming_diffusers_or_kohya(run_lora, tmp_path, capsys):
    from lowmem_alignprop.cli import main

    assert main(["export", "--lora", str(run_lora), "--out", str(tmp_path / "out"), "--format", "peft"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --format peft: {run_lora} also holds 1 text-encoder layer its run kept as its "
                   "--init-lora had it, which a peft adapter of the UNet cannot hold: export --format diffusers or "
                   "--format kohya"]
    assert not (tmp_path / "out").exists()


def test_a_peft_export_holds_the_kept_unet_layers_when_no_text_encoder_layer_is_kept(tiny_dir, tmp_path_factory):
    """A LoCon-like start (convolutions and a linear kept, no text-encoder layer): the peft export holds the kept
    UNet layers (their own ranks, alpha = rank) and peft's own loader renders what the run's lora/ renders in
    diffusers (it was refused, as if text-encoder layers were there)."""
    from peft import PeftModel
    from safetensors.torch import save_file

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.run.filenames import INIT_LORA_DIR, KEPT_LAYERS_NAME

    made = make_sd_lora(Path(tiny_dir), tmp_path_factory.mktemp("locon-run"), xl=False)
    pipe = base_pipe(made["base"])
    kept = {k: v for k, v in kept_fixture(pipe).items() if k.startswith("unet.")}
    (made["run"] / INIT_LORA_DIR).mkdir()
    save_file(kept, str(made["run"] / INIT_LORA_DIR / KEPT_LAYERS_NAME), metadata={"format": "pt"})
    made["trained_only"] = made["run"] / "trained-only"
    made["trained_only"].mkdir()
    (made["trained_only"] / "pytorch_lora_weights.safetensors").write_bytes(
        (made["lora"] / "pytorch_lora_weights.safetensors").read_bytes())
    lora = rewrite_as_run(made)
    pipe.load_lora_weights(str(lora))
    ref = images(pipe)
    out = tmp_path_factory.mktemp("peft-export") / "peft"
    assert main(["export", "--lora", str(lora), "--format", "peft", "--out", str(out)]) == 0
    pipe = base_pipe(made["base"])
    assert relative_difference(images(pipe), ref) > 100 * REORDERED  # (the LoRA shows)
    pipe.unet = PeftModel.from_pretrained(pipe.unet, str(out)).base_model.model  # (peft's loader, its layers in place)
    assert relative_difference(images(pipe), ref) < REORDERED


def test_a_merged_export_fuses_the_kept_text_encoder_layers_too(run, run_lora, tmp_path):
    """export --merge: the merged model renders what base + the LoRA folder loaded renders (the text encoder's kept
    layer fused too: fuse_lora of the UNet alone dropped it)."""
    out = export(tmp_path, run_lora, "--merge")
    merged = images(base_pipe(out))
    assert relative_difference(merged, run["ref"]) < 1e-3
    # the kept text-encoder layer shows in the merged text encoder's weights
    from safetensors.torch import load_file
    base_te = load_file(str(next((run["base"] / "text_encoder").glob("*.safetensors"))))
    merged_te = load_file(str(next((out / "text_encoder").glob("*.safetensors"))))
    changed = [k for k in base_te if not torch.equal(base_te[k], merged_te[k])]
    assert changed == [next(k for k in base_te if k.endswith("layers.0.self_attn.q_proj.weight"))]


def foreign_with_text_encoder(run: dict, folder: Path, te_config: dict) -> Path:
    """A diffusers LoRA of another tool: the run's trained UNet layers and the kept fixture's text-encoder layer,
    whose scale is in its own header config ``te_config`` (not one a run writes for the layers it keeps)."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    trained = run["trained_only"] / "pytorch_lora_weights.safetensors"
    with safe_open(str(trained), "pt") as f:
        unet_meta = {k[5:]: v for k, v in json.loads(f.metadata()["lora_adapter_metadata"]).items()
                     if k.startswith("unet.")}
    unet = {k[5:]: v for k, v in load_file(str(trained)).items()}
    te = {k[len("text_encoder."):]: v for k, v in run["kept"].items() if k.startswith("text_encoder.")}
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=unet, unet_lora_adapter_metadata=unet_meta,
                                              text_encoder_lora_layers=te, text_encoder_lora_adapter_metadata=te_config)
    return folder


@pytest.mark.parametrize("te_config", [{"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]},
                                       {"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"],
                                        "rank_pattern": {"^encoder.layers.0.self_attn.q_proj": 2},
                                        "alpha_pattern": {"^encoder.layers.0.self_attn.q_proj": 4}}],
                         ids=["own-config", "patterns-alpha-not-rank"])
def test_text_encoder_layers_a_run_did_not_keep_are_refused(run, tmp_path, te_config):
    """A foreign diffusers LoRA's text-encoder layers (their scale in their own header config, alpha != rank) are not
    a run's kept layers (the ``^`` patterns with alpha = rank that save_with_kept writes): refused with the line
    read_lora had for them, rather than exported at scale 1."""
    from lowmem_alignprop.lora.lora_files import read_lora
    from lowmem_alignprop.settings.errors import UserError, quote

    folder = foreign_with_text_encoder(run, tmp_path / "foreign", te_config)
    with pytest.raises(UserError) as e:
        read_lora(str(folder))
    name = quote("text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight")
    assert str(e.value) == (f"--lora {folder} holds layers outside the UNet or transformer (e.g. {name}): only "
                            "LoRAs of the denoiser (what lowmem-alignprop trains) export")


def _sampled_with_cfg(tmp_path: Path, monkeypatch, lora: str) -> tuple[torch.Tensor, Callable]:
    """`sample --lora LORA` of one prompt: (its LoRA image, a function that renders a pipeline with the same prompt,
    seed and settings: the reference's renderer)."""
    from lowmem_alignprop.cli import main
    from lowmem_alignprop.commands import evaluate

    calls, real = [], evaluate.generate
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: calls.append((a, k, real(*a, **k))) or calls[-1][2])
    (tmp_path / "prompts.txt").write_text("a red car\n")
    assert main(["sample", "--lora", lora, "--prompts", str(tmp_path / "prompts.txt"), "--num-prompts", "1",
                 "--output-dir", str(tmp_path / "sampled")]) == 0
    (_, prompts, seeds, cfg, batch), _, image = calls[-1]
    return image[0], lambda pipe: real(pipe, prompts, seeds, cfg, batch)[0]


def _two_adapters(run: dict, weight: float):
    """The base with the trained LoRA and the kept file as two adapters, both at ``weight``."""
    from lowmem_alignprop.run.filenames import INIT_LORA_DIR, KEPT_LAYERS_NAME

    pipe = base_pipe(run["base"])
    pipe.load_lora_weights(str(run["trained_only"]), adapter_name="trained")
    pipe.load_lora_weights(str(run["run"] / INIT_LORA_DIR), weight_name=KEPT_LAYERS_NAME, adapter_name="kept")
    pipe.set_adapters(["trained", "kept"], [weight, weight])
    return pipe


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_sample_of_the_run_renders_base_kept_and_trained_and_a_weight_scales_the_whole_file(
        run, run_lora, tmp_path, monkeypatch, weight):
    """`sample --lora RUN[:w]`: the image of base + trained + kept (two adapters, each at w: the whole file scales,
    kept layers too, as export --merge --weight w and every other loader's strength), and at 0.5 the merged model's."""
    spec = str(run["run"]) if weight == 1.0 else f"{run['run']}:{weight}"
    image, render = _sampled_with_cfg(tmp_path, monkeypatch, spec)
    assert relative_difference(image, render(_two_adapters(run, weight))) < REORDERED
    trained_alone = _two_adapters(run, weight)
    trained_alone.set_adapters(["trained"], [weight])
    assert relative_difference(image, render(trained_alone)) > 100 * REORDERED  # the kept layers show
    if weight != 1.0:
        merged = export(tmp_path / "merge", run_lora, "--merge", "--weight", str(weight))
        assert relative_difference(render(base_pipe(merged)), image) < 1e-3
        assert relative_difference(render(_two_adapters(run, 1.0)), image) > 100 * REORDERED


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "merge"])
def test_the_card_says_the_kept_layers_by_kind_and_that_the_file_brings_them(run_lora, tmp_path, fmt):
    """Each export's card has one row for the layers its run kept as its --init-lora had them: counted by kind (the
    fixture's 1 text-encoder layer, 1 convolution, 1 other UNet linear), and that loading the file (or the merged
    model) brings them, at the LoRA's weight; its first sentence says the file holds more than a UNet LoRA (it said
    "a UNet LoRA" of a file with text-encoder layers)."""
    out = export(tmp_path, run_lora, *(["--merge"] if fmt == "merge" else ["--format", fmt]))
    rows = [r for r in (out / "README.md").read_text().splitlines() if r.startswith("| kept from --init-lora |")]
    brings = ("the merged model holds them, fused with the trained layers at weight 1" if fmt == "merge" else
              "loading this LoRA loads them with its trained layers, at the LoRA's weight")
    assert rows == ["| kept from --init-lora | 3 layers as the --init-lora had them, not trained: 1 text-encoder "
                    f"layer, 1 convolution, 1 other UNet linear; {brings} |"]
    first = next(r for r in (out / "README.md").read_text().splitlines() if r.startswith("This folder holds "))
    holds = ("the base model with the LoRA merged in at weight 1" if fmt == "merge" else  # (a merge: the kept row)
             f"a UNet LoRA (with 3 layers kept from its --init-lora, the text encoder's included), {fmt} format")
    assert first.startswith(f"This folder holds {holds}, trained with lowmem-alignprop"), first


def test_the_diffusers_cards_code_renders_samples_image_of_base_kept_and_trained(run_lora, tmp_path, monkeypatch):
    """The card's code (load_lora_weights of the export) renders `sample`'s image of the export: the kept layers
    load with it (the text encoder's too)."""
    from loras import card_renders_as_sample, python_block, sampled

    out = export(tmp_path, run_lora, "--format", "diffusers")
    seed, base, with_lora = sampled(tmp_path, monkeypatch, out)
    card_renders_as_sample(python_block(out), seed, base, with_lora)


def test_a_merged_single_file_carries_the_kept_layers_text_encoder_included(run, run_lora, tmp_path):
    """export --merge --single-file: the one LDM checkpoint, read back by diffusers' from_single_file, renders what
    base + the LoRA folder loaded renders (the kept conv, linear and text-encoder layers fused in)."""
    from lowmem_alignprop.models.arch import load_single_file

    file = next(export(tmp_path, run_lora, "--merge", "--single-file").glob("*.safetensors"))
    loaded = load_single_file(file, config_dir=run["base"])
    assert relative_difference(images(loaded), run["ref"]) < 1e-3
    base = base_pipe(run["base"])
    q = next(n for n, _ in base.text_encoder.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    te = {"base": base.text_encoder.get_submodule(q).weight, "loaded": loaded.text_encoder.get_submodule(q).weight}
    delta = (run["kept"][f"text_encoder.{q}.lora_B.weight"] @ run["kept"][f"text_encoder.{q}.lora_A.weight"])
    assert relative_difference(te["loaded"] - te["base"], delta) < 1e-4


def test_the_lora_digest_covers_the_kept_layers(run_lora):
    """Two LoRAs that differ only in a kept layer have other digests (merge records, exports' base_model.json and
    kohya headers tell them apart); without kept layers the digest is the trained weights' alone, as before."""
    import dataclasses

    from lowmem_alignprop.lora.lora_files import lora_digest, read_lora

    lora = read_lora(str(run_lora))
    other = dataclasses.replace(lora, kept={k: v + (k.endswith("conv1.lora_B.weight")) for k, v in lora.kept.items()})
    assert lora_digest(other) != lora_digest(lora)
    assert lora_digest(dataclasses.replace(other, kept=dict(lora.kept))) == lora_digest(lora)
    assert lora_digest(dataclasses.replace(lora, kept={})) != lora_digest(lora)
    assert lora_digest(dataclasses.replace(lora, kept={})) == lora_digest(dataclasses.replace(other, kept={}))


def test_a_kohya_export_loads_in_diffusers_with_the_kept_layers(run, run_lora, tmp_path):
    """diffusers' load_lora_weights of the kohya file onto the base renders base + kept + trained: the text
    encoder's layer in sd-scripts' name (``lora_te_text_model_encoder_layers_0_...``: the CLIPTextModel path kohya,
    A1111 and ComfyUI read, also where transformers' CLIPTextModel has no ``text_model.`` level), with a zero
    out_proj layer (without one diffusers' kohya reader raised "Could not automatically infer state dict type")."""
    from safetensors.torch import load_file

    file = next(export(tmp_path, run_lora, "--format", "kohya").glob("*.safetensors"))
    te = sorted(k for k in load_file(str(file)) if k.startswith("lora_te"))
    assert te == [f"lora_te_text_model_encoder_layers_0_self_attn_{m}.{p}" for m in ("out_proj", "q_proj")
                  for p in ("alpha", "lora_down.weight", "lora_up.weight")]
    pipe = base_pipe(run["base"])
    pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    assert relative_difference(images(pipe), run["ref"]) < REORDERED


def test_kohya_text_encoder_layers_of_several_ranks_load_in_diffusers_at_their_own_scale(tiny_dir, tmp_path):
    """Kept text-encoder layers of ranks 2, 3 and 2 (no out_proj) in a kohya export: diffusers' reader loads each at
    its own delta (they are padded with zeros to one rank: its reader gave the rank-3 layer scale 2/3; a zero out_proj
    is added: without one it raised)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from lowmem_alignprop.lora.lora_formats import kohya_kept

    g = torch.Generator().manual_seed(0)
    kept = {}
    for module, rank in (("q_proj", 2), ("k_proj", 3), ("v_proj", 2)):
        stem = f"text_encoder.encoder.layers.0.self_attn.{module}"
        kept[f"{stem}.lora_A.weight"] = torch.randn(rank, 32, generator=g)
        kept[f"{stem}.lora_B.weight"] = torch.randn(32, rank, generator=g)
    save_file({k: v.contiguous() for k, v in kohya_kept(kept).items()}, str(tmp_path / "k.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.load_lora_weights(str(tmp_path), weight_name="k.safetensors", adapter_name="a")
    for module in ("q_proj", "k_proj", "v_proj", "out_proj"):
        layer = pipe.text_encoder.get_submodule(f"encoder.layers.0.self_attn.{module}")
        got = layer.scaling["a"] * layer.lora_B["a"].weight @ layer.lora_A["a"].weight
        stem = f"text_encoder.encoder.layers.0.self_attn.{module}"
        want = (kept[f"{stem}.lora_B.weight"] @ kept[f"{stem}.lora_A.weight"] if module != "out_proj"
                else torch.zeros(32, 32))
        assert torch.allclose(got, want, atol=1e-5), module


def test_the_kohya_header_says_the_kept_layers(run_lora, tmp_path):
    """The kohya header's training comment no longer says "UNet LoRA only" of a file with text-encoder and conv
    layers: it says them, and alignprop_kept_layers counts them by kind (ss_network_dim/alpha stay the trained
    layers': the kept ones have ranks of their own)."""
    from safetensors import safe_open

    file = next(export(tmp_path, run_lora, "--format", "kohya").glob("*.safetensors"))
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    kept = "3 layers kept as its --init-lora had them: 1 text-encoder layer, 1 convolution, 1 other UNet linear"
    assert meta["ss_training_comment"] == ("AlignProp reward fine-tuning with lowmem-alignprop (UNet LoRA trained; "
                                           f"{kept})")
    assert meta["alignprop_kept_layers"] == kept
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(RANK), "8")


def test_the_cards_kept_words_count_each_kind_and_say_one_layer_in_the_singular():
    """The card's kept row and first-sentence note of kept layers of each mix (no model: the words alone): one
    convolution is "1 layer" (it said "1 layers", as the kohya header and the run's log line did: one rule,
    kept_total), SDXL's two encoders "the text encoders' included", a LoCon's convolutions alone no encoder."""
    from lowmem_alignprop.lora.init_lora import InitLora
    from lowmem_alignprop.lora.model_card import kept_note, kept_row
    from lowmem_alignprop.models.kept_lora import kept_header

    def layers(*keys, ndim=2):
        return {f"{k}.lora_{x}.weight": torch.zeros((2, 3, 1, 1)[:ndim]) for k in keys for x in "AB"}

    conv = layers("unet.down_blocks.0.resnets.0.conv1", ndim=4)
    assert kept_row(conv, None) == ("1 layer as the --init-lora had it, not trained: 1 convolution; loading this "
                                    "LoRA loads it with its trained layers, at the LoRA's weight")
    assert kept_note(conv) == " (with 1 layer kept from its --init-lora)"
    assert kept_header(conv) == "1 layer kept as its --init-lora had it: 1 convolution"  # (the kohya header's)
    assert InitLora({}, conv).kept_line("x") == ("--init-lora x: 0 layers train from it; 1 layer kept as it came (1 "
                                                 "convolution), fused into the frozen base")
    both = {**layers("text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                     "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"), **conv}
    assert kept_row(both, 0.5) == ("3 layers as the --init-lora had them, not trained: 2 text-encoder layers (1 of "
                                   "text_encoder_2), 1 convolution; the merged model holds them, fused with the "
                                   "trained layers at weight 0.5")
    assert kept_note(both) == " (with 3 layers kept from its --init-lora, the text encoders' included)"

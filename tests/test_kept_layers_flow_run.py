"""A FLUX.1 run from an --init-lora with kept transformer linears (tests/test_init_lora_kept_flow.py's ai-toolkit
LoRA: the modulation of both block kinds and the x_embedder kept beside the attention layers) through the parts a
UNet run's kept layers are tested in (tests/test_init_lora_kept.py, tests/test_kept_layers_outputs.py): a resume,
block swap (the swapped blocks hold the fused weights) and ``sample --lora RUN``."""

from __future__ import annotations

import json

import pytest
import torch
from numerics import REORDERED, assert_rel_close, relative_difference
from outputs_doc import DOC, documented_keys, undocumented
from test_init_lora_kept_flow import ATTENTION, FLOW, KEPT, PROMPTS, RES, _lora_case, _pipe, _step0

pytestmark = pytest.mark.usefixtures("fresh_log_handlers")


@pytest.fixture(scope="module")
def ai_toolkit(tmp_path_factory):
    """test_init_lora_kept_flow's LoRA: its attention layers and 4 kept linears, and its reference images."""
    return _lora_case(tmp_path_factory.mktemp("kept-flux-run"), ATTENTION, KEPT)


def _lora(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))


def test_a_resumed_flux_run_fuses_the_kept_linears_again_and_ends_as_an_uninterrupted_one(ai_toolkit, tmp_path):
    """A resume reads the run's init_lora/ copy and fuses its kept linears into the transformer again: its LoRA
    after step 2 is the uninterrupted run's, bit for bit (lr 1e-3: the LoRA moves; without the kept layers fused
    its second step would see another base), kept layers included; kept_layers.safetensors is left as it was."""
    from lowmem_alignprop.cli import main
    from lowmem_alignprop.run.filenames import INIT_LORA_DIR, KEPT_LAYERS_NAME

    args = [*FLOW, "--model", str(ai_toolkit["base"]), "--set", "sample_prompts=0", "--set", "lr=1e-3",
            "--checkpoint-every", "1", "--init-lora", str(ai_toolkit["file"])]
    assert main([*args, "--steps", "2", "--output-dir", str(tmp_path / "whole")]) == 0
    assert main([*args, "--steps", "1", "--output-dir", str(tmp_path / "cut")]) == 0
    kept = (tmp_path / "cut" / INIT_LORA_DIR / KEPT_LAYERS_NAME).read_bytes()
    after_one = _lora(tmp_path / "cut")
    assert main(["--output-dir", str(tmp_path / "cut"), "--steps", "2", "--resume", "latest"]) == 0
    assert (tmp_path / "cut" / INIT_LORA_DIR / KEPT_LAYERS_NAME).read_bytes() == kept
    whole, cut = _lora(tmp_path / "whole"), _lora(tmp_path / "cut")
    assert len(whole) == 2 * (11 + 4) and whole.keys() == cut.keys()
    assert [k for k in whole if not torch.equal(whole[k], cut[k])] == []
    b = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"  # (the second step moved the trained layers)
    assert not torch.equal(whole[b], after_one[b])
    k = "transformer.x_embedder.lora_B.weight"  # (and the kept ones are as they came)
    assert torch.equal(whole[k], ai_toolkit["weights"]["x_embedder.lora_B.weight"] * 1.5)


def test_block_swap_blocks_hold_the_fused_kept_linears(ai_toolkit, tmp_path):
    """block_swap=2 swaps both blocks of the tiny FLUX (the double block's norm1 / norm1_context modulation and the
    single block's norm.linear are kept layers): the swapped blocks' host copies are the fused weights (not the
    base's, read again from the file) and the step-0 images are block_swap=0's, bit for bit."""
    from diffusers import FluxTransformer2DModel

    spec = f"init_lora={ai_toolkit['file']}"
    plain, reference = _step0(ai_toolkit["base"], tmp_path / "plain", "--set", spec)
    swapped, images = _step0(ai_toolkit["base"], tmp_path / "swap", "--set", spec, "--set", "block_swap=2",
                             "--set", "unet_checkpointing=blocks")
    assert swapped.swap is not None and len(swapped.swap.blocks) == 2
    assert torch.equal(images, reference)
    base = FluxTransformer2DModel.from_pretrained(str(ai_toolkit["base"] / "transformer"))
    host = {id(p): h for pairs in swapped.swap.host for p, h in pairs}
    for path in ("transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
                 "single_transformer_blocks.0.norm.linear"):
        weight = swapped.bare_unet.get_submodule(path).weight
        fused = plain.bare_unet.get_submodule(path).weight
        assert id(weight) in host, path  # (a frozen weight of a swapped block)
        assert torch.equal(host[id(weight)], fused), path
        assert relative_difference(fused, base.get_submodule(path).weight) > 0.01, path  # (the kept delta shows)


def test_sample_of_the_flux_run_renders_what_its_lora_renders_in_diffusers(ai_toolkit, tmp_path, monkeypatch):
    """`sample --lora RUN` of a FLUX run with kept linears: its LoRA image is that of a plain FluxPipeline with the
    run's lora/ loaded (load_lora_weights: trained + kept), the same prompt, seed and settings; the attention layers
    alone render otherwise (the kept layers are in what sample loads)."""
    from lowmem_alignprop.cli import main
    from lowmem_alignprop.training import grid

    run = tmp_path / "run"
    assert main([*FLOW, "--model", str(ai_toolkit["base"]), "--set", "sample_prompts=0", "--set", "lr=1e-30",
                 "--steps", "1", "--init-lora", str(ai_toolkit["file"]), "--output-dir", str(run)]) == 0
    grids, save = [], grid.save_sample_grid
    monkeypatch.setattr(grid, "save_sample_grid", lambda path, labels, base, lora, **kw: (
        grids.append(lora), save(path, labels, base, lora, **kw))[-1])
    (tmp_path / "prompts.txt").write_text(f"{PROMPTS[0]}\n")
    out = tmp_path / "sampled"
    assert main(["sample", "--lora", str(run), "--prompts", str(tmp_path / "prompts.txt"), "--num-prompts", "1",
                 "--images-per-prompt", "1", "--reward", "brightness", "--output-dir", str(out)]) == 0
    result = json.loads((out / "sample_results.json").read_text())
    (prompt,) = [p["prompt"] for p in result["per_prompt"]]
    (seed,) = [s for p in result["per_prompt"] for s in p["seeds"]]
    sampler = result["sampler"]  # (the run's settings: 4 Euler steps, guidance 3.5, 32 px)
    assert (sampler["sample_steps"], sampler["guidance_scale"], sampler["resolution"]) == (4, 3.5, RES)
    steps, guidance = sampler["sample_steps"], sampler["guidance_scale"]

    def render(pipe):
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(prompt=[prompt], num_inference_steps=steps, guidance_scale=guidance, height=RES, width=RES,
                        generator=[torch.Generator().manual_seed(seed)], output_type="pt",
                        max_sequence_length=16).images.float()

    image = grids[0][0]
    assert_rel_close(image, render(_pipe(ai_toolkit["base"], run / "lora"))[0], REORDERED, "sample --lora RUN")
    attention = ai_toolkit["root"] / "attention" / "pytorch_lora_weights.safetensors"
    assert relative_difference(image, render(_pipe(ai_toolkit["base"], attention))[0]) > 30 * REORDERED


SD3_ATTENTION = [f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                            "add_k_proj", "add_v_proj", "to_add_out")]
SD3_KEPT = ["transformer_blocks.0.norm1.linear", "context_embedder", "pos_embed.proj"]  # (adaLN modulation; the
# text-side embedder; the patch embedding, a convolution)


def _sd3_render(pipe) -> torch.Tensor:
    """A plain StableDiffusion3Pipeline's images of PROMPTS at a fixed seed (fp32, the CPU; CFG against "")."""
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPTS, negative_prompt=[""] * len(PROMPTS), height=RES, width=RES, num_inference_steps=3,
                    guidance_scale=4.0, output_type="pt", generator=torch.Generator().manual_seed(5),
                    max_sequence_length=16).images


def _sd3_pipe(base, lora=None):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(base))
    if lora is not None:
        kwargs = {"weight_name": lora.name} if lora.is_file() else {}
        pipe.load_lora_weights(str(lora.parent if lora.is_file() else lora), **kwargs)
    return pipe


def test_an_sd3_run_keeps_a_modulation_and_the_context_embedder_as_they_came(tmp_path):
    """The tiny SD3 from an --init-lora that adapts block 0's attention (rank 4, alpha 8) and, of rank 2 alpha 3,
    its adaLN modulation norm1.linear and the context_embedder: the step-0 images are those of the base with the whole
    file fused in by diffusers (fuse_lora, saved, read as --model), and the lora/ of a run at lr 1e-30 renders in a
    plain StableDiffusion3Pipeline what the whole file renders (scales folded into B or applied: REORDERED)."""
    from diffusers import StableDiffusion3Pipeline
    from flowmodels import build_tiny_sd3_dir
    from loras import RANK

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.lora.lora_files import read_lora
    from lowmem_alignprop.models.kept_lora import kept_kinds

    base = build_tiny_sd3_dir(tmp_path / "base")
    transformer = StableDiffusion3Pipeline.from_pretrained(str(base)).transformer
    g, weights = torch.Generator().manual_seed(3), {}
    for path in SD3_ATTENTION + SD3_KEPT:
        layer, rank = transformer.get_submodule(path), 2 if path in SD3_KEPT else RANK
        if isinstance(layer, torch.nn.Conv2d):  # (the patch embedding: A a convolution of its kernel, B a 1x1)
            weights[f"{path}.lora_A.weight"] = torch.randn(rank, layer.in_channels, *layer.kernel_size,
                                                           generator=g) * 0.3
            weights[f"{path}.lora_B.weight"] = torch.randn(layer.out_channels, rank, 1, 1, generator=g) * 0.1
            continue
        weights[f"{path}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.3
        weights[f"{path}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.1
    config = {"r": RANK, "lora_alpha": 2.0 * RANK, "target_modules": sorted(SD3_ATTENTION + SD3_KEPT),
              "rank_pattern": {p: 2 for p in SD3_KEPT}, "alpha_pattern": {p: 3.0 for p in SD3_KEPT}}
    StableDiffusion3Pipeline.save_lora_weights(str(tmp_path / "lora"), transformer_lora_layers=weights,
                                               transformer_lora_adapter_metadata=config)
    file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    whole = _sd3_render(_sd3_pipe(base, file))
    attention = {k: v for k, v in weights.items() if k.rsplit(".lora_", 1)[0] in SD3_ATTENTION}
    StableDiffusion3Pipeline.save_lora_weights(str(tmp_path / "attention"), transformer_lora_layers=attention,
                                               transformer_lora_adapter_metadata={
                                                   "r": RANK, "lora_alpha": 2.0 * RANK,
                                                   "target_modules": sorted(SD3_ATTENTION)})
    assert relative_difference(_sd3_render(_sd3_pipe(base, tmp_path / "attention")), whole) > 30 * REORDERED

    fused = _sd3_pipe(base, file)
    fused.fuse_lora()
    fused.unload_lora_weights()
    fused.save_pretrained(str(tmp_path / "fused"))
    _, reference = _step0(tmp_path / "fused", tmp_path / "ref")  # (FLOW's guidance 3.5: SD3's CFG scale here)
    trainer, images = _step0(base, tmp_path / "start", "--set", f"init_lora={file}")
    assert_rel_close(images, reference, REORDERED, "SD3 step 0 with --init-lora")
    assert kept_kinds(trainer.init_kept.kept) == ["1 convolution", "2 other transformer linears"]
    assert sorted(trainer.init_kept.trained) == sorted(SD3_ATTENTION)

    run = tmp_path / "run"
    assert main([*FLOW, "--model", str(base), "--set", "sample_prompts=0", "--set", "lr=1e-30", "--steps", "1",
                 "--init-lora", str(file), "--output-dir", str(run)]) == 0
    lora = read_lora(str(run / "lora"))
    assert kept_kinds(lora.kept) == ["1 convolution", "2 other transformer linears"]
    assert set(SD3_ATTENTION) < set(lora.modules) and not set(SD3_KEPT) & set(lora.modules)  # (block 1's from 0)
    assert_rel_close(_sd3_render(_sd3_pipe(base, run / "lora")), whole, REORDERED, "the SD3 run's lora/ in diffusers")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kept_layers"] == {"text_encoder": 0, "text_encoder_2": 0, "convolutions": 1, "other_linears": 2}
    assert undocumented(summary, documented_keys(DOC.read_text(encoding="utf-8"))["summary.json"]) == []
    # its peft export (the kept patch-embedding convolution and linears, each its own rank, in peft's own loader),
    # its merged model and merged single file render the whole file's images too
    from peft import PeftModel
    assert main(["export", "--lora", str(run / "lora"), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    pipe = _sd3_pipe(base)
    pipe.transformer = PeftModel.from_pretrained(pipe.transformer, str(tmp_path / "peft")).base_model.model
    assert_rel_close(_sd3_render(pipe), whole, REORDERED, "the SD3 run's peft export, loaded by peft")
    assert main(["export", "--lora", str(run / "lora"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert_rel_close(_sd3_render(_sd3_pipe(tmp_path / "merged")), whole, REORDERED, "the SD3 run's merged model")
    # its merged single file (Stability's MMDiT layout: the kept modulation, context_embedder and patch embedding
    # fused), read by diffusers' from_single_file with the model's folder
    from diffusers import SD3Transformer2DModel
    assert main(["export", "--lora", str(run / "lora"), "--merge", "--single-file", "--out", str(tmp_path / "s")]) == 0
    pipe = _sd3_pipe(base)
    pipe.transformer = SD3Transformer2DModel.from_single_file(str(next((tmp_path / "s").glob("*.safetensors"))),
                                                              config=str(base), subfolder="transformer")
    assert_rel_close(_sd3_render(pipe), whole, REORDERED, "the SD3 run's merged single file")

"""A FLUX.1 run from an --init-lora with kept transformer linears (tests/test_init_lora_kept_flow.py's ai-toolkit
LoRA: the modulation of both block kinds and the x_embedder kept beside the attention layers) through the parts a
UNet run's kept layers are tested in (tests/test_init_lora_kept.py, tests/test_kept_layers_outputs.py): a resume,
block swap (the swapped blocks hold the fused weights) and ``sample --lora RUN``."""

from __future__ import annotations

import json

import pytest
import torch
from numerics import REORDERED, assert_rel_close, relative_difference
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
    from lowmem_alignprop.commands import grid

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

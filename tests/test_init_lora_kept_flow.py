"""``--init-lora`` of a FLUX.1 LoRA as ai-toolkit and kohya sd-scripts write them: beside the attention layers it
adapts transformer linears this trainer does not train (the blocks' adaLN modulation ``norm1.linear``,
``norm1_context.linear``, a single block's ``norm.linear``, the ``x_embedder``). The attention layers start the
trained adapter; the other linears are kept as they came, fused into the frozen transformer before anything reads
it, and written back into every LoRA the run writes (as a UNet run keeps its: tests/test_init_lora_kept.py). A text
encoder's layers stay refused (the prompts are encoded before the transformer is read)."""

from __future__ import annotations

import shutil

import pytest
import torch
from flowmodels import FLOW_RESOLUTION, build_tiny_flux_dir
from loras import RANK
from numerics import REORDERED, assert_rel_close, relative_difference

from lowmem_alignprop.settings.errors import UserError

pytestmark = pytest.mark.usefixtures("fresh_log_handlers")

RES = FLOW_RESOLUTION
PROMPTS = ["a photo of a cat", "a dark tree"]
FLOW = ["--profile", "cpu", "--seed", "0", "--set", f"resolution={RES}", "--set", "sample_steps=4", "--set", "k=2",
        "--set", "batch_size=1", "--set", "guidance_scale=3.5", "--set", f"lora_rank={RANK}"]
ATTENTION = ([f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                         "add_k_proj", "add_v_proj", "to_add_out")]
             + [f"single_transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")])
KEPT = ["transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
        "single_transformer_blocks.0.norm.linear", "x_embedder"]
KEPT_RANK, KEPT_ALPHA = 2, 3.0  # (scale 1.5: a kept layer's scale folded wrongly fails every comparison)


def _render(pipe) -> torch.Tensor:
    """A plain FluxPipeline's images of PROMPTS at a fixed seed (fp32, the CPU)."""
    return pipe(PROMPTS, height=RES, width=RES, num_inference_steps=3, guidance_scale=3.5, output_type="pt",
                generator=torch.Generator().manual_seed(5), max_sequence_length=16).images


def _pipe(base, *loras):
    """The base FluxPipeline with ``loras`` (files or folders) loaded by diffusers, each its own adapter."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(base))
    for i, lora in enumerate(loras):
        kwargs = {"weight_name": lora.name} if lora.is_file() else {}
        pipe.load_lora_weights(str(lora.parent if lora.is_file() else lora), adapter_name=f"a{i}", **kwargs)
    if loras:
        pipe.set_adapters([f"a{i}" for i in range(len(loras))])
    return pipe


@pytest.fixture(scope="module")
def ai_toolkit(tmp_path_factory):
    """A FLUX LoRA in diffusers' (ai-toolkit's) names: rank-4 attention layers (alpha 8) and rank-2 kept linears
    (alpha 3, its rank_pattern / alpha_pattern); the images of the base with the whole LoRA loaded by diffusers (the
    reference) and with its attention layers alone."""
    from diffusers import FluxPipeline

    root = tmp_path_factory.mktemp("kept-flux")
    base = build_tiny_flux_dir(root / "base")
    transformer = FluxPipeline.from_pretrained(str(base)).transformer
    g = torch.Generator().manual_seed(3)
    weights = {}
    for path in ATTENTION + KEPT:
        layer = transformer.get_submodule(path)
        rank = KEPT_RANK if path in KEPT else RANK
        weights[f"{path}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.3
        weights[f"{path}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.1
    config = {"r": RANK, "lora_alpha": 2.0 * RANK, "target_modules": sorted(ATTENTION + KEPT),
              "rank_pattern": {p: KEPT_RANK for p in KEPT}, "alpha_pattern": {p: KEPT_ALPHA for p in KEPT}}
    FluxPipeline.save_lora_weights(str(root / "lora"), transformer_lora_layers=weights,
                                   transformer_lora_adapter_metadata=config)
    attention = {k: v for k, v in weights.items() if k.rsplit(".lora_", 1)[0] in ATTENTION}
    FluxPipeline.save_lora_weights(str(root / "attention"), transformer_lora_layers=attention,
                                   transformer_lora_adapter_metadata={"r": RANK, "lora_alpha": 2.0 * RANK,
                                                                     "target_modules": sorted(ATTENTION)})
    file = root / "lora" / "pytorch_lora_weights.safetensors"
    images = _render(_pipe(base, file))
    without = _render(_pipe(base, root / "attention" / "pytorch_lora_weights.safetensors"))
    assert relative_difference(without, images) > 0.01  # the kept layers show: a LoRA without them is told apart
    assert relative_difference(_render(_pipe(base)), images) > 0.01
    return {"base": base, "file": file, "images": images, "weights": weights, "root": root}


def _step0(base, out, *sets):
    """The trainer's fixed-seed images before its first step, the --init-lora checked as train checks it."""
    from lowmem_alignprop.cli import common_parser, config_from_args
    from lowmem_alignprop.commands.init_lora import check_init_lora
    from lowmem_alignprop.commands.train import Trainer
    from lowmem_alignprop.run.runfolder import RunFolder

    args = common_parser("t", "t").parse_args([*FLOW, "--model", str(base), "--output-dir", str(out), "--set",
                                               "sample_prompts=2", *sets])
    _, cfg = config_from_args(args)
    trainer = Trainer(cfg, RunFolder(cfg.output_dir), PROMPTS)
    trainer.init_file = (check_init_lora(cfg.init_lora, cfg.lora_rank, cfg.model, cfg.model_components,
                                         cfg.lora_layers, cfg.base_quant) if cfg.init_lora else None)
    trainer.setup_accelerator()
    trainer.load_models()
    trainer.setup_sampling()
    return trainer, trainer.generate(PROMPTS, 11)[0]


def test_step_0_renders_the_base_with_the_whole_lora_and_keeps_the_untrained_linears(ai_toolkit, tmp_path):
    """The trainer's step-0 images with the LoRA as --init-lora are those of the base model with the whole LoRA fused
    into it by diffusers (fuse_lora, saved, read as --model): the kept linears are in the frozen base, the attention
    layers in the trained adapter. Both sides add the same deltas, in another order (fused or at run time):
    REORDERED."""
    pipe = _pipe(ai_toolkit["base"], ai_toolkit["file"])
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.save_pretrained(str(tmp_path / "fused"))
    _, reference = _step0(tmp_path / "fused", tmp_path / "ref")
    trainer, images = _step0(ai_toolkit["base"], tmp_path / "run", "--set", f"init_lora={ai_toolkit['file']}")
    assert_rel_close(images, reference, REORDERED, "step 0 with --init-lora")
    split = trainer.init_kept
    assert sorted(split.trained) == sorted(ATTENTION)
    assert split.kinds == {"text encoder": 0, "convolutions": 0, "other": 4}
    assert sorted(k.rsplit(".lora_", 1)[0] for k in split.kept) == sorted(f"transformer.{p}" for p in KEPT * 2)
    # each kept layer's scale (alpha 3 / rank 2) folded into its B, in fp32
    b = split.kept["transformer.x_embedder.lora_B.weight"]
    assert torch.equal(b, ai_toolkit["weights"]["x_embedder.lora_B.weight"] * (KEPT_ALPHA / KEPT_RANK))


def test_an_int8_base_refuses_a_kept_transformer_linear_before_the_model_loads(ai_toolkit):
    from lowmem_alignprop.commands.init_lora import lora_file_ranks
    from lowmem_alignprop.settings.errors import quote

    spec = str(ai_toolkit["file"])
    with pytest.raises(UserError) as e:
        lora_file_ranks(ai_toolkit["file"], spec, flow=True, quant="nf4")
    first = "transformer.single_transformer_blocks.0.norm.linear.lora_A.weight"
    assert str(e.value) == (f"--init-lora {spec} adapts 4 linear layers of the transformer this run does not train "
                            f"(e.g. {quote(first)}), kept as they came by adding them into the frozen base, which "
                            "base_quant=nf4 stores quantized: add --set base_quant=none")
    assert lora_file_ranks(ai_toolkit["file"], spec, flow=True, quant="fp8") == {RANK}  # (fp8: applied after)
    assert lora_file_ranks(ai_toolkit["file"], spec, flow=True) == {RANK}  # (the kept ones' rank 2: any rank)


def test_text_encoder_layers_are_still_refused_saying_why(ai_toolkit, tmp_path):
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.commands.init_lora import lora_file_ranks
    from lowmem_alignprop.settings.errors import quote

    state = load_file(str(ai_toolkit["file"]))
    key = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
    state[key] = torch.zeros(2, 32)
    state[key.replace("lora_A", "lora_B")] = torch.zeros(32, 2)
    save_file(state, str(tmp_path / "te.safetensors"))
    spec = str(tmp_path / "te.safetensors")
    with pytest.raises(UserError) as e:
        lora_file_ranks(tmp_path / "te.safetensors", spec, flow=True)
    assert str(e.value) == (f"--init-lora {spec} adapts the text encoder too (e.g. {quote(key)}): an SD3/FLUX run "
                            "encodes its prompts before it reads the transformer, so AlignProp keeps and trains "
                            "transformer layers only; pass a LoRA without text-encoder layers")


def test_a_run_that_learns_nothing_writes_back_the_whole_flux_lora_it_started_from(ai_toolkit, tmp_path):
    """End to end at lr 1e-30 (Adam's step, about lr per weight, is far under a float32 ulp of weights near 0.3: the
    LoRA cannot move): the run's lora/ loads in a plain FluxPipeline (load_lora_weights(folder): the attention
    layers trained, the kept linears as they came) and renders what the LoRA it started from renders; so do its
    diffusers export, the LoRA of its checkpoint copied out of the run folder, its peft export loaded by peft
    (rank_pattern / alpha_pattern: the kept layers' own ranks, scale 1) and its export --merge. Only each
    scale's place differs (folded into B, or applied at run time; fused): REORDERED."""
    from peft import PeftModel

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.commands.lora_files import read_lora
    from lowmem_alignprop.models.kept_lora import kept_kinds

    run = tmp_path / "run"
    assert main([*FLOW, "--model", str(ai_toolkit["base"]), "--set", "sample_prompts=0", "--set", "lr=1e-30",
                 "--steps", "1", "--checkpoint-every", "1", "--init-lora", str(ai_toolkit["file"]),
                 "--output-dir", str(run)]) == 0
    base, images = ai_toolkit["base"], ai_toolkit["images"]
    assert_rel_close(_render(_pipe(base, run / "lora")), images, REORDERED, "the run's lora/ in diffusers")
    lora = read_lora(str(run / "lora"))
    assert len(lora.kept) == 8 and kept_kinds(lora.kept) == ["4 other transformer linears"]
    assert sorted(lora.modules) == sorted(ATTENTION)
    assert main(["export", "--lora", str(run / "lora"), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    assert_rel_close(_render(_pipe(base, tmp_path / "d")), images, REORDERED, "export --format diffusers")
    assert "4 other transformer linears" in (tmp_path / "d" / "README.md").read_text()
    moved = shutil.copytree(run / "checkpoints" / "step-00000001", tmp_path / "elsewhere" / "step-00000001")
    assert main(["export", "--lora", str(moved), "--format", "diffusers", "--out", str(tmp_path / "c")]) == 0
    assert_rel_close(_render(_pipe(base, tmp_path / "c")), images, REORDERED, "a checkpoint copied out of its run")
    assert main(["export", "--lora", str(run / "lora"), "--format", "peft", "--out", str(tmp_path / "p")]) == 0
    pipe = _pipe(base)
    PeftModel.from_pretrained(pipe.transformer, str(tmp_path / "p"))  # (peft's own loader: its layers in place)
    assert_rel_close(_render(pipe), images, REORDERED, "export --format peft, loaded by peft")
    assert main(["export", "--lora", str(run / "lora"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert_rel_close(_render(_pipe(tmp_path / "merged")), images, REORDERED, "export --merge")

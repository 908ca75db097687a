"""``--init-lora`` of a FLUX.1 LoRA as ai-toolkit and kohya sd-scripts write them: beside the attention layers it
adapts transformer linears this trainer does not train (the blocks' adaLN modulation ``norm1.linear``,
``norm1_context.linear``, a single block's ``norm.linear``, the ``x_embedder``). The attention layers start the
trained adapter; the other linears are kept as they came, fused into the frozen transformer before anything reads
it, and written back into every LoRA the run writes (as a UNet run keeps its: tests/test_init_lora_kept.py). CLIP-L's
layers are loaded into the encoder before the prompts are encoded (the encoders are freed before the transformer is
read) and kept too."""

from __future__ import annotations

import shutil

import pytest
import torch
from flowmodels import FLOW_RESOLUTION, build_tiny_flux_dir
from loras import RANK
from numerics import REORDERED, assert_rel_close, relative_difference

from lowmem_alignprop.settings.errors import UserError
from refusals import assert_refused

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


def _lora_case(root, attention, kept, single_layers: int = 1, clip: bool = False) -> dict:
    """A FLUX LoRA in diffusers' (ai-toolkit's) names of the tiny FLUX model: rank-4 ``attention`` layers (alpha 8)
    and rank-2 ``kept`` linears (alpha 3, its rank_pattern / alpha_pattern), and with ``clip`` CLIP-L's layers
    (loras.clip_lora_parts); the images of the base with the whole LoRA loaded by diffusers (the reference), which
    differ from those of its attention layers alone."""
    from diffusers import FluxPipeline

    from loras import clip_lora_parts

    base = build_tiny_flux_dir(root / "base", single_layers=single_layers)
    pipe = FluxPipeline.from_pretrained(str(base))
    transformer = pipe.transformer
    g = torch.Generator().manual_seed(3)
    weights = {}
    for path in attention + kept:
        layer = transformer.get_submodule(path)
        rank = KEPT_RANK if path in kept else RANK
        weights[f"{path}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.3
        weights[f"{path}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.1
    config = {"r": RANK, "lora_alpha": 2.0 * RANK, "target_modules": sorted(attention + kept),
              "rank_pattern": {p: KEPT_RANK for p in kept}, "alpha_pattern": {p: KEPT_ALPHA for p in kept}}
    FluxPipeline.save_lora_weights(str(root / "lora"), transformer_lora_layers=weights,
                                   transformer_lora_adapter_metadata=config, **(clip_lora_parts(pipe) if clip else {}))
    only = {k: v for k, v in weights.items() if k.rsplit(".lora_", 1)[0] in attention}
    FluxPipeline.save_lora_weights(str(root / "attention"), transformer_lora_layers=only,
                                   transformer_lora_adapter_metadata={"r": RANK, "lora_alpha": 2.0 * RANK,
                                                                      "target_modules": sorted(attention)})
    file = root / "lora" / "pytorch_lora_weights.safetensors"
    images = _render(_pipe(base, file))
    without = _render(_pipe(base, root / "attention" / "pytorch_lora_weights.safetensors"))
    assert relative_difference(without, images) > 30 * REORDERED  # the kept layers show: told apart from none
    assert relative_difference(_render(_pipe(base)), images) > 0.01
    return {"base": base, "file": file, "images": images, "weights": weights, "root": root}


@pytest.fixture(scope="module")
def ai_toolkit(tmp_path_factory):
    """The modulation of both block kinds and the x_embedder kept, beside the attention layers."""
    return _lora_case(tmp_path_factory.mktemp("kept-flux"), ATTENTION, KEPT)


def _run(case, run, *extra) -> None:
    """A run from ``case``'s LoRA at lr 1e-30 (Adam's step, about lr per weight, is far under a float32 ulp of
    weights near 0.3: the LoRA cannot move), one step, its checkpoint kept."""
    from lowmem_alignprop.cli import main

    assert main([*FLOW, "--model", str(case["base"]), "--set", "sample_prompts=0", "--set", "lr=1e-30",
                 "--steps", "1", "--checkpoint-every", "1", "--init-lora", str(case["file"]), "--output-dir",
                 str(run), *extra]) == 0


def _step0(base, out, *sets):
    """The trainer's fixed-seed images before its first step, the --init-lora checked as train checks it."""
    from loras import trainer_at_step_0

    from lowmem_alignprop.cli import common_parser, config_from_args

    args = common_parser("t", "t").parse_args([*FLOW, "--model", str(base), "--output-dir", str(out), "--set",
                                               "sample_prompts=2", *sets])
    trainer = trainer_at_step_0(config_from_args(args)[1], PROMPTS)
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
    assert split.kept_layers == 4
    assert split.kept_line("f") == "--init-lora f: 11 layers train from it; 4 layers kept as they came (4 other " \
        "transformer linears), fused into the frozen base"
    assert sorted(k.rsplit(".lora_", 1)[0] for k in split.kept) == sorted(f"transformer.{p}" for p in KEPT * 2)
    # each kept layer's scale (alpha 3 / rank 2) folded into its B, in fp32
    b = split.kept["transformer.x_embedder.lora_B.weight"]
    assert torch.equal(b, ai_toolkit["weights"]["x_embedder.lora_B.weight"] * (KEPT_ALPHA / KEPT_RANK))


def test_an_int8_base_refuses_a_kept_transformer_linear_before_the_model_loads(ai_toolkit):
    from lowmem_alignprop.lora.init_lora import lora_file_ranks
    from lowmem_alignprop.settings.errors import quote

    spec = str(ai_toolkit["file"])
    with pytest.raises(UserError) as e:
        lora_file_ranks(ai_toolkit["file"], spec, flow=True, quant="nf4")
    first = "transformer.single_transformer_blocks.0.norm.linear.lora_A.weight"
    assert str(e.value) == (f"--init-lora {spec} adapts 4 linear layers of the transformer this run does not train "
                            f"(e.g. {quote(first)}), kept as they came by adding them into the frozen base, which "
                            "base_quant=nf4 stores quantized: add --set base_quant=fp8 (stored after they are "
                            "added, one byte per weight as int8) or --set base_quant=none")
    assert lora_file_ranks(ai_toolkit["file"], spec, flow=True, quant="fp8") == {RANK}  # (fp8: applied after)
    assert lora_file_ranks(ai_toolkit["file"], spec, flow=True) == {RANK}  # (the kept ones' rank 2: any rank)


@pytest.fixture(scope="module")
def with_clip(tmp_path_factory):
    """The double block's modulation kept, beside its attention layers, and CLIP-L's layers (a kohya or ai-toolkit
    LoRA trained with its text encoder). No single block: diffusers' kohya reader splits linear1 at FLUX.1's own
    widths only."""
    return _lora_case(tmp_path_factory.mktemp("kept-flux-clip"), ATTENTION[:8], KEPT[:2], single_layers=0, clip=True)


def test_clip_layers_encode_the_prompts_at_step_0_and_are_kept(with_clip, tmp_path):
    """CLIP-L's layers of the --init-lora are loaded into the encoder before the prompt set is encoded (the encoders
    are freed before the transformer is read): step 0 renders the base with the whole LoRA fused by diffusers, CLIP
    included (whose images differ from those without CLIP's layers); they are kept as they came, under
    CLIP's text_model. names, their scale (alpha 3 / rank 2) folded into B."""
    pipe = _pipe(with_clip["base"], with_clip["file"])
    pipe.fuse_lora(components=["transformer", "text_encoder"])
    pipe.unload_lora_weights()
    pipe.save_pretrained(str(tmp_path / "fused"))
    _, reference = _step0(tmp_path / "fused", tmp_path / "ref")
    trainer, images = _step0(with_clip["base"], tmp_path / "run", "--set", f"init_lora={with_clip['file']}")
    assert_rel_close(images, reference, REORDERED, "step 0 with an --init-lora that adapts CLIP-L")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    file = str(with_clip["file"])  # the same LoRA without CLIP's layers renders other images: they show
    save_file({k: v for k, v in load_file(file).items() if not k.startswith("text_encoder.")},
              str(tmp_path / "no-clip.safetensors"), metadata=safe_open(file, "pt").metadata())
    without = _render(_pipe(with_clip["base"], tmp_path / "no-clip.safetensors"))
    assert relative_difference(without, with_clip["images"]) > 30 * REORDERED
    split = trainer.init_kept
    assert sorted(split.trained) == sorted(ATTENTION[:8])
    clip = sorted({k.rsplit(".lora_", 1)[0] for k in split.kept if k.startswith("text_encoder.")})
    assert len(clip) == 10 and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in clip), clip
    assert split.kept_line("f") == ("--init-lora f: 8 layers train from it; 12 layers kept as they came (10 "
                                    "text-encoder layers, 2 other transformer linears), fused into the frozen base")


def test_plan_loads_an_init_lora_with_clip_layers_onto_the_meta_model_without_warnings(with_clip, capsys):
    """plan --init-lora loads the LoRA (transformer, kept linears and CLIP-L's layers) onto the model built on meta
    with its weights on meta too: torch warned once per weight ("copying from a non-meta parameter in the checkpoint
    to a meta parameter ..., which is a no-op"), 20 lines a caller of plan saw for this tiny LoRA."""
    from loras import warnings_of

    from lowmem_alignprop.cli import main

    caught = warnings_of(lambda: main(["plan", *FLOW, "--model", str(with_clip["base"]), "--init-lora",
                                       str(with_clip["file"])]) == 0)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("--init-lora")]
    assert said == [f"--init-lora {with_clip['file']}: rank {RANK}, 8 layers; 12 more kept as they came, fused into "
                    "the frozen base (no memory); training starts from it"], said
    meta = [str(w.message) for w in caught if "meta parameter" in str(w.message)]
    assert meta == [], f"{len(meta)} warnings: {meta[:2]}"


def test_a_run_from_a_lora_with_clip_layers_writes_them_back(with_clip, tmp_path, capsys, monkeypatch):
    """End to end at lr 1e-30: the run's lora/ (CLIP-L's layers kept beside the transformer's) renders what its
    starting LoRA renders in a plain FluxPipeline, and so do its kohya export (CLIP-L as sd-scripts' lora_te1_, read
    by diffusers' kohya FLUX reader) and export --merge (the encoder fused too); sample of it renders what sample of
    the starting LoRA renders (which is diffusers' rendering: tests/test_flow_sample.py). Its peft export and
    --merge --single-file are refused with one line each (a transformer's adapter, and an SD3/FLUX single file,
    cannot hold an encoder's layers)."""
    from loras import sampled
    from safetensors.torch import load_file

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.lora.lora_files import read_lora
    from lowmem_alignprop.models.kept_lora import kept_kinds

    run = tmp_path / "run"
    _run(with_clip, run)
    base, images = with_clip["base"], with_clip["images"]
    assert_rel_close(_render(_pipe(base, run / "lora")), images, REORDERED, "the run's lora/ in diffusers")
    lora = read_lora(str(run / "lora"))
    assert kept_kinds(lora.kept) == ["10 text-encoder layers", "2 other transformer linears"]
    assert main(["export", "--lora", str(run / "lora"), "--format", "kohya", "--out", str(tmp_path / "k")]) == 0
    kohya = next((tmp_path / "k").glob("*.safetensors"))
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for k in load_file(str(kohya)))
    assert_rel_close(_render(_pipe(base, kohya)), images, REORDERED, "the kohya export in diffusers")
    assert main(["export", "--lora", str(run / "lora"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert_rel_close(_render(_pipe(tmp_path / "merged")), images, REORDERED, "export --merge")
    drawn = {}
    for name, lora_path in (("run", run / "lora"), ("start", with_clip["file"])):
        (tmp_path / f"sample-{name}").mkdir()
        drawn[name] = sampled(tmp_path / f"sample-{name}", monkeypatch, lora_path, "--model", str(base), *FLOW)
    assert drawn["run"][0] == drawn["start"][0]  # (the same seed)
    assert_rel_close(drawn["run"][2], drawn["start"][2], REORDERED, "sample of the run's lora/")
    assert relative_difference(drawn["run"][1], drawn["run"][2]) > 0.01  # (the LoRA shows in sample's images)
    for flags, said in ((["--format", "peft"], "--format peft: {} also holds 10 text-encoder layers its run kept as "
                         "its --init-lora had them, which a peft adapter of the transformer cannot hold: export "
                         "--format diffusers or --format kohya"),
                        (["--merge", "--single-file"], "--single-file: {} also holds 10 text-encoder layers its run "
                         "kept as its --init-lora had them, and an SD3/FLUX single file holds the merged transformer "
                         "alone: export --merge without --single-file (a diffusers folder: the text encoders merged "
                         "too)")):
        assert_refused(main, ["export", "--lora", str(run / "lora"), *flags, "--out", str(tmp_path / "x")],
                       "error: " + said.format(lora.named), tmp_path / "x", capsys)


def test_a_run_that_learns_nothing_writes_back_the_whole_flux_lora_it_started_from(ai_toolkit, tmp_path):
    """End to end at lr 1e-30 (:func:`_run`): the run's lora/ loads in a plain FluxPipeline
    (load_lora_weights(folder): the attention layers trained, the kept linears as they came) and renders what the
    LoRA it started from renders; so do its diffusers export, the LoRA of its checkpoint copied out of the run
    folder, its peft export loaded by peft (rank_pattern / alpha_pattern: the kept layers' own ranks, scale 1) and
    its export --merge. Only each scale's place differs (folded into B, or applied at run time; fused):
    REORDERED."""
    from peft import PeftModel

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.lora.lora_files import read_lora
    from lowmem_alignprop.models.kept_lora import kept_kinds

    run = tmp_path / "run"
    _run(ai_toolkit, run)
    base, images = ai_toolkit["base"], ai_toolkit["images"]
    assert_rel_close(_render(_pipe(base, run / "lora")), images, REORDERED, "the run's lora/ in diffusers")
    lora = read_lora(str(run / "lora"))
    assert len(lora.kept) == 8 and kept_kinds(lora.kept) == ["4 other transformer linears"]
    assert sorted(lora.modules) == sorted(ATTENTION)
    assert main(["export", "--lora", str(run / "lora"), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    assert_rel_close(_render(_pipe(base, tmp_path / "d")), images, REORDERED, "export --format diffusers")
    card = (tmp_path / "d" / "README.md").read_text()
    assert "4 other transformer linears" in card
    assert "This folder holds a FLUX transformer LoRA (with 4 layers kept from its --init-lora), diffusers format" \
        in card  # (no text encoder's among them: nothing more said)
    moved = shutil.copytree(run / "checkpoints" / "step-00000001", tmp_path / "elsewhere" / "step-00000001")
    assert main(["export", "--lora", str(moved), "--format", "diffusers", "--out", str(tmp_path / "c")]) == 0
    assert_rel_close(_render(_pipe(base, tmp_path / "c")), images, REORDERED, "a checkpoint copied out of its run")
    assert main(["export", "--lora", str(run / "lora"), "--format", "peft", "--out", str(tmp_path / "p")]) == 0
    pipe = _pipe(base)
    PeftModel.from_pretrained(pipe.transformer, str(tmp_path / "p"))  # (peft's own loader: its layers in place)
    assert_rel_close(_render(pipe), images, REORDERED, "export --format peft, loaded by peft")
    assert main(["export", "--lora", str(run / "lora"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert_rel_close(_render(_pipe(tmp_path / "merged")), images, REORDERED, "export --merge")


def test_the_kohya_export_of_kept_flux_modulation_layers_loads_in_diffusers(tmp_path):
    """The kohya export of a run that kept the double block's modulation layers names them as sd-scripts does
    (img_mod_lin, txt_mod_lin): diffusers' own kohya FLUX reader (FluxPipeline.load_lora_weights) renders the LoRA
    the run started from, and --init-lora of the file starts as the run did. A kept layer outside the blocks
    (x_embedder: img_in), which diffusers' reader drops, is refused with one line. (No single block: diffusers'
    reader splits linear1 at FLUX.1's own widths only.)"""
    from safetensors.torch import load_file

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.lora.lora_files import read_lora
    from lowmem_alignprop.lora.lora_formats import kohya_state_dict

    case = _lora_case(tmp_path / "case", ATTENTION[:8], KEPT[:2], single_layers=0)
    _run(case, tmp_path / "run")
    assert main(["export", "--lora", str(tmp_path / "run" / "lora"), "--format", "kohya", "--out",
                 str(tmp_path / "k")]) == 0
    kohya = next((tmp_path / "k").glob("*.safetensors"))
    names = {k.split(".")[0] for k in load_file(str(kohya))}
    assert {"lora_unet_double_blocks_0_img_mod_lin", "lora_unet_double_blocks_0_txt_mod_lin"} <= names
    assert_rel_close(_render(_pipe(case["base"], kohya)), case["images"], REORDERED, "the kohya export in diffusers")
    _, images = _step0(case["base"], tmp_path / "again", "--set", f"init_lora={kohya}")
    _, reference = _step0(case["base"], tmp_path / "first", "--set", f"init_lora={case['file']}")
    assert_rel_close(images, reference, REORDERED, "--init-lora of the kohya export")
    lora = read_lora(str(tmp_path / "run" / "lora"))
    lora.kept["transformer.x_embedder.lora_A.weight"] = torch.zeros(2, 64)
    lora.kept["transformer.x_embedder.lora_B.weight"] = torch.zeros(32, 2)
    with pytest.raises(UserError) as e:
        kohya_state_dict(lora)
    assert str(e.value) == (f"--format kohya: {lora.named} also holds 1 FLUX.1 layer outside its blocks that its run "
                            "kept as its --init-lora had it (e.g. 'x_embedder': img_in in kohya's names), which "
                            "diffusers' kohya FLUX reader drops without a word: export --format diffusers or --format "
                            "peft")


def test_init_lora_of_a_kohya_flux_file_with_layers_outside_the_blocks_keeps_them(tmp_path):
    """A FLUX.1 LoRA in sd-scripts' names that adapts the modulation of both block kinds, img_in, time_in and the
    final layer (its modulation's rows in BFL's order, shift then scale): --init-lora splits it into the same layers
    as its diffusers twin (our kohya reader; diffusers' drops the layers outside the blocks) and starts as it does."""
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.lora import flow_export

    kept = ["transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.norm.linear", "x_embedder",
            "norm_out.linear", "time_text_embed.timestep_embedder.linear_1"]
    case = _lora_case(tmp_path / "case", ATTENTION, kept)
    state = load_file(str(case["file"]))
    scale = {p: (KEPT_ALPHA / KEPT_RANK if p in kept else 2.0) for p in ATTENTION + kept}
    weights = {k.removeprefix("transformer."): v * (scale[k[12:].rsplit(".lora_", 1)[0]] if ".lora_B." in k else 1)
               for k, v in state.items()}
    kohya = flow_export.kohya_state_dict({k: v for k, v in weights.items() if k.rsplit(".lora_", 1)[0] in ATTENTION},
                                         lambda m: 1.0, "flux")
    for path in kept:
        name = flow_export.kohya_name(flow_export.original_slot(path, "flux")[0])
        up = weights[f"{path}.lora_B.weight"]
        kohya |= {f"{name}.lora_down.weight": weights[f"{path}.lora_A.weight"], f"{name}.alpha": torch.tensor(2.0),
                  f"{name}.lora_up.weight": torch.cat(up.chunk(2)[::-1]) if path == "norm_out.linear" else up}
    assert {"lora_unet_img_in", "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_time_in_in_layer",
            "lora_unet_single_blocks_0_modulation_lin"} <= {k.split(".")[0] for k in kohya}
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(tmp_path / "kohya.safetensors"))
    _, images = _step0(case["base"], tmp_path / "kohya", "--set", f"init_lora={tmp_path / 'kohya.safetensors'}")
    _, reference = _step0(case["base"], tmp_path / "diffusers", "--set", f"init_lora={case['file']}")
    assert_rel_close(images, reference, REORDERED, "--init-lora of the kohya twin")


def test_plan_says_the_kept_transformer_linears(ai_toolkit, capsys):
    """plan --init-lora of the LoRA on the FLUX model built on meta: the layers taken and the kept count, as for a
    UNet (fused into the base: no memory)."""
    from lowmem_alignprop.cli import main

    capsys.readouterr()
    assert main(["plan", *FLOW, "--model", str(ai_toolkit["base"]), "--init-lora", str(ai_toolkit["file"])]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("--init-lora")]
    assert said == [f"--init-lora {ai_toolkit['file']}: rank {RANK}, 11 layers; 4 more kept as they came, fused into "
                    "the frozen base (no memory); training starts from it"], said


def test_the_kohya_export_of_an_sd3_runs_kept_layer_is_refused_naming_diffusers():
    """An SD3 run's kept --init-lora layers have no kohya names a reader here checks (diffusers' SD3 loader reads
    none): the kohya export is refused with one line naming --format diffusers or peft (it had no test; of one
    layer it said "1 SD3 transformer layers")."""
    from lowmem_alignprop.lora.flow_export import SD3, kohya_kept

    kept = {"transformer_blocks.0.norm1.linear.lora_A.weight": torch.zeros(2, 32),
            "transformer_blocks.0.norm1.linear.lora_B.weight": torch.zeros(192, 2)}
    with pytest.raises(UserError) as e:
        kohya_kept(kept, SD3, "RUN/lora")
    assert str(e.value) == ("--format kohya: RUN/lora also holds 1 SD3 layer its run kept as its "
                            "--init-lora had it, whose kohya names no reader we can check reads back (diffusers' SD3 "
                            "loader reads no kohya names): export --format diffusers or --format peft")


@pytest.mark.parametrize("family, transformer", [("sd3", "transformer_blocks.0.norm1.linear"),
                                                 ("flux", "x_embedder")])
def test_kohya_and_peft_refusals_name_only_an_export_that_holds_the_kept_layers(family, transformer, tmp_path):
    """A run that kept CLIP layers (no peft export: row 239) and a transformer layer no kohya export holds (SD3's,
    or FLUX.1's x_embedder: row 238): each refusal named the other format ("--format peft: ... export --format
    diffusers or --format kohya", "--format kohya: ... export --format diffusers or --format peft"), which refused in
    its turn. Now each names --format diffusers alone, and nothing is written; with kohya's layers inside FLUX.1's
    blocks the peft refusal still names kohya (which writes them)."""
    from lowmem_alignprop.lora.lora_export import export
    from lowmem_alignprop.lora.lora_files import Lora
    from lowmem_alignprop.lora.lora_formats import kohya_state_dict

    def layer(key, rank_in):
        return {f"{key}.lora_A.weight": torch.zeros(2, rank_in), f"{key}.lora_B.weight": torch.zeros(rank_in, 2)}

    kept = {**layer("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 32),
            **layer(f"transformer.{transformer}", 32)}
    lora = Lora(path=tmp_path / "lora", weights={}, config={}, base=None, run=None, family=family, kept=kept)
    with pytest.raises(UserError) as e:
        export(lora, "peft", tmp_path / "out")
    assert str(e.value).endswith("which a peft adapter of the transformer cannot hold: export --format diffusers")
    with pytest.raises(UserError) as e:
        kohya_state_dict(lora)
    assert str(e.value).startswith("--format kohya: ") and str(e.value).endswith(": export --format diffusers")
    assert not (tmp_path / "out").exists()
    clip = {k: v for k, v in kept.items() if k.startswith("text_encoder.")}
    inside = Lora(path=tmp_path / "lora", weights={}, config={}, base=None, run=None, family="flux",
                  kept={**clip, **layer("transformer.transformer_blocks.0.norm1.linear", 32)})
    with pytest.raises(UserError) as e:
        export(inside, "peft", tmp_path / "out")
    assert str(e.value).endswith("cannot hold: export --format diffusers or --format kohya")

"""SD3/FLUX LoRAs that adapt CLIP (FLUX.1's CLIP-L; SD3's CLIP-L and CLIP-G), beyond the FLUX diffusers-file cases of
tests/test_init_lora_kept_flow.py and tests/test_flow_sample.py: an SD3 --init-lora with both CLIP encoders' layers,
a FLUX.1 file in sd-scripts' names (``lora_te1_``) as --init-lora and ``sample --lora``, ``plan --init-lora``, a
resume, and the kohya reader's refusal of a second CLIP on FLUX.1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from loras import RANK, clip_lora_parts, sampled
from numerics import REORDERED, assert_rel_close, relative_difference
from test_init_lora_kept_flow import ATTENTION, FLOW, KEPT, KEPT_ALPHA, KEPT_RANK, RES, _lora_case, _pipe, _step0

from lowmem_alignprop.settings.errors import UserError

pytestmark = pytest.mark.usefixtures("fresh_log_handlers")

CLIP_SCALE = 3.0 / 2  # loras.clip_lora_parts: rank 2, alpha 3


@pytest.fixture(scope="module")
def with_clip(tmp_path_factory):
    """test_init_lora_kept_flow's FLUX LoRA with CLIP-L's layers: block 0's attention (rank 4, alpha 8), its
    modulation kept (rank 2, alpha 3), CLIP-L's attention and fc1 (rank 2, alpha 3); no single block (diffusers'
    kohya reader splits linear1 at FLUX.1's own widths only)."""
    return _lora_case(tmp_path_factory.mktemp("flux-clip"), ATTENTION[:8], KEPT[:2], single_layers=0, clip=True)


def _kohya_twin(case, path, clip_prefix: str = "lora_te1_") -> None:
    """``case``'s diffusers file written in sd-scripts' FLUX.1 names at ``path``: the attention layers fused as
    kohya fuses them (lora_unet_double_blocks_0_img_attn_qkv...), the modulation as img_mod_lin / txt_mod_lin,
    CLIP-L's layers as lora_te1_text_model_encoder_layers_... (``clip_prefix``: or SD's one-encoder lora_te_, as some
    tools name FLUX.1's one CLIP), each scale folded into lora_up (alpha = rank)."""
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.lora import flow_export, lora_formats

    state = load_file(str(case["file"]))

    def scaled(prefix, scale_of):
        return {k.removeprefix(prefix): v * (scale_of(k) if ".lora_B." in k else 1) for k, v in state.items()
                if k.startswith(prefix)}

    transformer = scaled("transformer.", lambda k: KEPT_ALPHA / KEPT_RANK if any(p in k for p in KEPT) else 2.0)
    attention = {k: v for k, v in transformer.items() if k.rsplit(".lora_", 1)[0] in ATTENTION}
    kept = {k: v for k, v in transformer.items() if k not in attention}
    clip = {f"text_encoder.{k}": v for k, v in scaled("text_encoder.", lambda k: CLIP_SCALE).items()}
    kohya = {**flow_export.kohya_state_dict(attention, lambda m: 1.0, "flux"),
             **flow_export.kohya_kept(kept, "flux", "x"), **lora_formats.kohya_kept(clip, sdxl=True)}
    names = {k.split(".")[0] for k in kohya}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_mod_lin",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"} <= names, sorted(names)
    save_file({k.replace("lora_te1_", clip_prefix, 1): v.contiguous() for k, v in kohya.items()}, str(path))


@pytest.mark.parametrize("layout", ["kohya", "kohya lora_te_", "comfyui"])
def test_init_lora_of_a_flux_file_with_clip_layers_in_other_names_starts_as_its_diffusers_twin(with_clip, tmp_path,
                                                                                                layout):
    """--init-lora of the FLUX.1 LoRA in sd-scripts' names (CLIP-L's layers as lora_te1_) or ComfyUI's (the
    transformer under diffusion_model., CLIP-L under text_encoders.clip_l.transformer.; flow_export.kohya_names reads
    both as kohya's, kohya_as_diffusers the CLIP layers beside the transformer's) starts as its diffusers twin: the
    same step-0 images, the same layers trained and kept."""
    file = tmp_path / f"{layout.replace(' ', '-')}.safetensors"
    if layout == "comfyui":
        _comfy_twin(with_clip, file)
    else:  # (lora_te_: SD's one-encoder prefix, which diffusers' readers take for the first CLIP)
        _kohya_twin(with_clip, file, layout.partition(" ")[2] or "lora_te1_")
    other, images = _step0(with_clip["base"], tmp_path / layout, "--set", f"init_lora={file}")
    twin, reference = _step0(with_clip["base"], tmp_path / "diffusers", "--set", f"init_lora={with_clip['file']}")
    assert_rel_close(images, reference, REORDERED, f"--init-lora of the {layout} twin")
    assert other.init_kept.kept_line("f") == twin.init_kept.kept_line("f") == (
        "--init-lora f: 8 layers train from it; 12 layers kept as they came (10 text-encoder layers, 2 other "
        "transformer linears), fused into the frozen base")
    assert sorted(other.init_kept.kept) == sorted(twin.init_kept.kept)


@pytest.mark.parametrize("layout", ["kohya", "comfyui"])
def test_sample_of_a_flux_file_with_clip_layers_in_other_names_renders_as_its_diffusers_twin(with_clip, tmp_path,
                                                                                             monkeypatch, layout):
    """`sample --lora` of the FLUX.1 LoRA in sd-scripts' names (CLIP-L's layers as lora_te1_) or ComfyUI's (under
    text_encoders.clip_l.; with its modulation layers sample hands either to diffusers' FLUX kohya reader, in kohya's
    names) renders what a plain FluxPipeline renders with its diffusers twin loaded (CLIP-L's layers applied to the
    prompt): the same prompt, seed and settings; without CLIP's layers the image differs. The prompt is encoded
    twice (base and adapted CLIP-L) but T5 runs once: its outputs are the same (flow.T5Outputs)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import T5EncoderModel

    file = tmp_path / f"{layout}.safetensors"
    (_kohya_twin if layout == "kohya" else _comfy_twin)(with_clip, file)
    settings = ["--profile", "cpu", "--seed", "0", "--model", str(with_clip["base"]), "--set", f"resolution={RES}",
                "--set", "sample_steps=4", "--set", "guidance_scale=3.5", "--set", "max_sequence_length=16",
                "--images-per-prompt", "1", "--reward", "brightness"]
    t5_calls, forward = [], T5EncoderModel.forward
    monkeypatch.setattr(T5EncoderModel, "forward", lambda self, *a, **k: t5_calls.append(1) or forward(self, *a, **k))
    seed, _, image = sampled(tmp_path, monkeypatch, file, *settings)
    assert len(t5_calls) == 1  # (one prompt, one chunk: the adapted encoding read T5's first output)
    monkeypatch.setattr(T5EncoderModel, "forward", forward)

    def render(lora):
        pipe = _pipe(with_clip["base"], lora)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(prompt=["a red car"], num_inference_steps=4, guidance_scale=3.5, height=RES, width=RES,
                        generator=[torch.Generator().manual_seed(seed)], output_type="pt",
                        max_sequence_length=16).images[0].float()

    assert_rel_close(image, render(with_clip["file"]), REORDERED, f"sample --lora of the {layout} twin")
    twin = str(with_clip["file"])  # (the same LoRA without CLIP's layers: another image)
    save_file({k: v for k, v in load_file(twin).items() if not k.startswith("text_encoder.")},
              str(tmp_path / "no-clip.safetensors"), metadata=safe_open(twin, "pt").metadata())
    assert relative_difference(image, render(tmp_path / "no-clip.safetensors")) > 30 * REORDERED


def test_plan_counts_the_kept_clip_layers(with_clip, capsys):
    """plan --init-lora of the FLUX LoRA with CLIP-L's layers, on the model built on meta (its encoders there):
    the layers taken and the kept count, CLIP's 10 among them (as a run's kept line says)."""
    from lowmem_alignprop.cli import main

    capsys.readouterr()
    assert main(["plan", *FLOW, "--model", str(with_clip["base"]), "--init-lora", str(with_clip["file"])]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("--init-lora")]
    assert said == [f"--init-lora {with_clip['file']}: rank {RANK}, 8 layers; 12 more kept as they came, fused into "
                    "the frozen base (no memory); training starts from it"], said


def test_plan_of_a_lora_of_clip_layers_alone_names_the_rank_as_the_runs(with_clip, tmp_path, capsys):
    """plan --init-lora of a FLUX LoRA of CLIP-L's layers alone (rank 2: no layer the run trains) names the rank it
    says as the run's (4, lora_rank), not the file's: it said "rank 4, none of the run's 8 layers"."""
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.cli import main

    file = tmp_path / "clip-only.safetensors"
    save_file({k: v for k, v in load_file(str(with_clip["file"])).items() if k.startswith("text_encoder.")}, str(file))
    capsys.readouterr()
    assert main(["plan", *FLOW, "--model", str(with_clip["base"]), "--init-lora", str(file)]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("--init-lora")]
    assert said == [f"--init-lora {file}: the run's rank {RANK}, none of the run's 8 layers (it adapts none of them): "
                    "the run's LoRA starts at zero, as a fresh one; 10 more kept as they came, fused into the frozen "
                    "base (no memory); training starts from the base with those layers"], said


def test_a_resumed_flux_run_from_a_lora_with_clip_layers_ends_as_an_uninterrupted_one(with_clip, tmp_path):
    """A resume loads the init_lora/ copy's CLIP-L layers into the encoder again before the prompts are encoded
    (the encoders are freed before the transformer is read): its LoRA after step 2 is the uninterrupted run's, bit
    for bit (lr 1e-3: the LoRA moves; prompts encoded without CLIP's layers would move it otherwise), the CLIP
    layers written back as they came."""
    from safetensors.torch import load_file

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.models.kept_lora import canonical_key

    def lora(run):
        return load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))

    args = [*FLOW, "--model", str(with_clip["base"]), "--set", "sample_prompts=0", "--set", "lr=1e-3",
            "--checkpoint-every", "1", "--init-lora", str(with_clip["file"])]
    assert main([*args, "--steps", "2", "--output-dir", str(tmp_path / "whole")]) == 0
    assert main([*args, "--steps", "1", "--output-dir", str(tmp_path / "cut")]) == 0
    after_one = lora(tmp_path / "cut")
    assert main(["--output-dir", str(tmp_path / "cut"), "--steps", "2", "--resume", "latest"]) == 0
    whole, cut = lora(tmp_path / "whole"), lora(tmp_path / "cut")
    assert len(whole) == 2 * (8 + 2 + 10) and whole.keys() == cut.keys()
    assert [k for k in whole if not torch.equal(whole[k], cut[k])] == []
    b = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"  # (the second step moved the trained layers)
    assert not torch.equal(whole[b], after_one[b])
    start = {canonical_key(k): v for k, v in load_file(str(with_clip["file"])).items()}  # (text_model. or not)
    clip = [k for k in whole if k.startswith("text_encoder.") and ".lora_B." in k]
    assert len(clip) == 10
    for k in clip:  # (CLIP's layers as they came, their scale folded into B)
        assert torch.equal(whole[k], start[canonical_key(k)] * CLIP_SCALE), k


def _sd3_clip_lora(base, folder):
    """(the file, its transformer weights) of a LoRA of the tiny SD3 ``base``: block 0's attention (rank 4, alpha 8)
    and both CLIP encoders' layers (loras.clip_lora_parts), as diffusers writes a LoRA trained with them."""
    from diffusers import StableDiffusion3Pipeline
    from test_kept_layers_flow_run import SD3_ATTENTION

    pipe = StableDiffusion3Pipeline.from_pretrained(str(base))
    g, weights = torch.Generator().manual_seed(3), {}
    for path in SD3_ATTENTION:
        layer = pipe.transformer.get_submodule(path)
        weights[f"{path}.lora_A.weight"] = torch.randn(RANK, layer.in_features, generator=g) * 0.3
        weights[f"{path}.lora_B.weight"] = torch.randn(layer.out_features, RANK, generator=g) * 0.1
    StableDiffusion3Pipeline.save_lora_weights(
        str(folder), transformer_lora_layers=weights, **clip_lora_parts(pipe),
        transformer_lora_adapter_metadata={"r": RANK, "lora_alpha": 2.0 * RANK, "target_modules": SD3_ATTENTION})
    return folder / "pytorch_lora_weights.safetensors", weights


def test_an_sd3_init_lora_with_clip_l_and_clip_g_layers_starts_as_diffusers_fuses_it(tmp_path):
    """The tiny SD3 from an --init-lora that adapts block 0's attention (rank 4, alpha 8) and both CLIP encoders
    (CLIP-L's and CLIP-G's attention and fc1: rank 2, alpha 3), as diffusers writes a LoRA trained with them: the
    step-0 images are those of the base with the whole file fused in by diffusers (transformer and both encoders,
    saved, read as --model); the CLIP layers show (the file without them renders otherwise) and are kept, under each
    encoder's name; a run at lr 1e-30 writes them back (its lora/ renders the whole file in a plain pipeline)."""
    from flowmodels import build_tiny_sd3_dir
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from test_kept_layers_flow_run import SD3_ATTENTION, _sd3_pipe, _sd3_render

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.lora.lora_files import read_lora
    from lowmem_alignprop.models.kept_lora import kept_kinds

    base = build_tiny_sd3_dir(tmp_path / "base")
    file, _ = _sd3_clip_lora(base, tmp_path / "lora")
    whole = _sd3_render(_sd3_pipe(base, file))
    save_file({k: v for k, v in load_file(str(file)).items() if k.startswith("transformer.")},
              str(tmp_path / "no-clip.safetensors"), metadata=safe_open(str(file), "pt").metadata())
    assert relative_difference(_sd3_render(_sd3_pipe(base, tmp_path / "no-clip.safetensors")), whole) > 30 * REORDERED

    fused = _sd3_pipe(base, file)
    fused.fuse_lora(components=["transformer", "text_encoder", "text_encoder_2"])
    fused.unload_lora_weights()
    fused.save_pretrained(str(tmp_path / "fused"))
    _, reference = _step0(tmp_path / "fused", tmp_path / "ref")  # (FLOW's guidance 3.5: SD3's CFG scale here)
    trainer, images = _step0(base, tmp_path / "start", "--set", f"init_lora={file}")
    assert_rel_close(images, reference, REORDERED, "SD3 step 0 with an --init-lora that adapts CLIP-L and CLIP-G")
    split = trainer.init_kept
    assert sorted(split.trained) == sorted(SD3_ATTENTION)
    assert split.kept_line("f") == ("--init-lora f: 8 layers train from it; 20 layers kept as they came (20 "
                                    "text-encoder layers (10 of text_encoder_2)), fused into the frozen base")
    for encoder in ("text_encoder", "text_encoder_2"):
        layers = {k.rsplit(".lora_", 1)[0] for k in split.kept if k.startswith(f"{encoder}.")}
        assert len(layers) == 10 and all(k.startswith(f"{encoder}.text_model.encoder.layers.") for k in layers)

    run = tmp_path / "run"
    assert main([*FLOW, "--model", str(base), "--set", "sample_prompts=0", "--set", "lr=1e-30", "--steps", "1",
                 "--init-lora", str(file), "--output-dir", str(run)]) == 0
    assert kept_kinds(read_lora(str(run / "lora")).kept) == ["20 text-encoder layers (10 of text_encoder_2)"]
    assert_rel_close(_sd3_render(_sd3_pipe(base, run / "lora")), whole, REORDERED, "the SD3 run's lora/ in diffusers")


def test_bad_input_a_flux_kohya_file_with_a_second_clip_is_refused(with_clip, tmp_path, capsys):
    """A FLUX.1 LoRA in sd-scripts' names with lora_te2_ layers (SD3's CLIP-G: FLUX.1 has CLIP-L alone, lora_te1_;
    diffusers' FLUX reader drops them with a log line): --init-lora (flow_export.kohya_as_diffusers) and
    `sample --lora` (which hands a file with modulation layers to diffusers' reader) refuse it in one line, before
    any model loads; no output folder."""
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.lora.flow_export import kohya_as_diffusers
    from lowmem_alignprop.settings.errors import quote

    _kohya_twin(with_clip, tmp_path / "twin.safetensors")
    state = load_file(str(tmp_path / "twin.safetensors"))
    second = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    state |= {f"{second}.lora_down.weight": torch.ones(2, 32), f"{second}.lora_up.weight": torch.ones(32, 2),
              f"{second}.alpha": torch.tensor(2.0)}
    save_file(state, str(tmp_path / "te2.safetensors"))
    said = ("{} adapts a second CLIP text encoder (e.g. " + quote(f"{second}.lora_down.weight") + "), which FLUX.1 "
            "has not (its one CLIP is lora_te1_): pass a LoRA of this model")
    with pytest.raises(UserError) as e:
        kohya_as_diffusers(tmp_path / "te2.safetensors", "--init-lora x")
    assert str(e.value) == said.format("--init-lora x")
    out = tmp_path / "out"
    for argv, label in (([*FLOW, "--model", str(with_clip["base"]), "--init-lora", str(tmp_path / "te2.safetensors"),
                          "--steps", "1"], "--init-lora"),
                        (["sample", "--profile", "cpu", "--model", str(with_clip["base"]), "--reward", "brightness",
                          "--lora", str(tmp_path / "te2.safetensors")], "--lora")):
        assert main([*argv, "--output-dir", str(out)]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
        assert err == ["error: " + said.format(f"{label} {tmp_path / 'te2.safetensors'}")], err
        assert not out.exists()


def _originals(modules, family: str) -> dict[str, str]:
    """kohya's name (``lora_unet_double_blocks_0_img_attn_qkv``) -> the original transformer's path of ``modules``
    (diffusers' names), what ComfyUI names the layer under ``diffusion_model.``."""
    from lowmem_alignprop.lora.flow_export import kohya_name, original_slot

    return {kohya_name(original): original for original, _, _ in (original_slot(m, family) for m in modules)}


def _comfy_clip(file, encoders: dict[str, str]) -> dict:
    """The CLIP layers of a diffusers LoRA ``file`` as ComfyUI saves them: ``text_encoders.<clip_l|clip_g>.
    transformer.`` + CLIP's own path, kohya's lora_down / lora_up and each layer's alpha (loras.clip_lora_parts: 3)."""
    from safetensors.torch import load_file

    from lowmem_alignprop.models.kept_lora import canonical_key

    out = {}
    for key, value in load_file(str(file)).items():
        encoder, _, rest = canonical_key(key).partition(".")
        if encoder in encoders:
            layer, _, suffix = rest.rpartition(".lora_")
            name = f"text_encoders.{encoders[encoder]}.transformer.{layer}"
            out[f"{name}.{'lora_down' if suffix.startswith('A') else 'lora_up'}.weight"] = value
            out[f"{name}.alpha"] = torch.tensor(3.0)
    return out


def _comfy_twin(case, path) -> None:
    """``case``'s FLUX.1 file in ComfyUI's names at ``path``: the transformer's layers fused as kohya fuses them under
    the original paths (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``, peft's lora_A / lora_B, an
    alpha each), CLIP-L's as ``text_encoders.clip_l.transformer.text_model.encoder.layers...`` (lora_down / lora_up)."""
    from safetensors.torch import load_file, save_file

    _kohya_twin(case, path)
    names = _originals(ATTENTION[:8] + KEPT[:2], "flux")
    comfy = {}
    for key, value in load_file(str(path)).items():
        if key.startswith("lora_unet_"):
            layer, _, suffix = key.partition(".")
            suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(suffix, suffix)
            comfy[f"diffusion_model.{names[layer]}.{suffix}"] = value
    comfy |= _comfy_clip(case["file"], {"text_encoder": "clip_l"})
    assert {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight", "diffusion_model.double_blocks.0.img_mod.lin"
            ".alpha", "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight"
            } <= comfy.keys() and len(comfy) == 3 * (6 + 10), sorted(comfy)
    save_file({k: v.contiguous() for k, v in comfy.items()}, str(path))


@pytest.fixture(scope="module")
def sd3_comfy(tmp_path_factory):
    """The tiny SD3's LoRA of block 0's attention (rank 4, alpha 8) and both CLIP encoders' layers (CLIP-L's and
    CLIP-G's attention and fc1: rank 2, alpha 3) in diffusers' names (``file``) and in ComfyUI's (``comfy``: the
    transformer's fused as kohya fuses them under diffusion_model.joint_blocks..., lora_down / lora_up / alpha; the
    encoders' under text_encoders.clip_l. / clip_g.)."""
    from flowmodels import build_tiny_sd3_dir
    from safetensors.torch import save_file
    from test_kept_layers_flow_run import SD3_ATTENTION

    from lowmem_alignprop.lora.flow_export import kohya_state_dict

    root = tmp_path_factory.mktemp("sd3-comfy")
    base = build_tiny_sd3_dir(root / "base")
    file, weights = _sd3_clip_lora(base, root / "lora")
    names = _originals(SD3_ATTENTION, "sd3")
    comfy = {f"diffusion_model.{names[k.split('.')[0]]}.{k.partition('.')[2]}": v
             for k, v in kohya_state_dict(weights, lambda m: 2.0, "sd3").items()}
    comfy |= _comfy_clip(file, {"text_encoder": "clip_l", "text_encoder_2": "clip_g"})
    assert {"diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_down.weight",
            "text_encoders.clip_g.transformer.text_model.encoder.layers.1.mlp.fc1.alpha"} <= comfy.keys()
    assert len(comfy) == 3 * (4 + 2 * 10), sorted(comfy)
    save_file({k: v.contiguous() for k, v in comfy.items()}, str(root / "comfy.safetensors"))
    return {"base": base, "file": file, "comfy": root / "comfy.safetensors"}


def test_init_lora_of_a_comfyui_sd3_file_with_clip_l_and_clip_g_starts_as_its_diffusers_twin(sd3_comfy, tmp_path):
    """--init-lora of the SD3 LoRA in ComfyUI's names (CLIP-L's and CLIP-G's layers under text_encoders.clip_l. and
    clip_g.: read as kohya's lora_te1_ / lora_te2_) starts as its diffusers twin: the same step-0 images, the same
    layers trained and kept (20 CLIP layers, 10 of text_encoder_2)."""
    from loras import warnings_of

    got = {}
    caught = warnings_of(lambda: got.setdefault("comfy", _step0(sd3_comfy["base"], tmp_path / "comfy", "--set",
                                                                f"init_lora={sd3_comfy['comfy']}")))
    comfy, images = got["comfy"]
    # block 0's layers alone, named by path in the rewritten file's header (suffixes named block 1's too)
    assert [str(w.message) for w in caught if "PEFT config" in str(w.message)] == []
    twin, reference = _step0(sd3_comfy["base"], tmp_path / "diffusers", "--set", f"init_lora={sd3_comfy['file']}")
    assert_rel_close(images, reference, REORDERED, "SD3 --init-lora of the ComfyUI twin")
    assert comfy.init_kept.kept_line("f") == twin.init_kept.kept_line("f") == (
        "--init-lora f: 8 layers train from it; 20 layers kept as they came (20 text-encoder layers (10 of "
        "text_encoder_2)), fused into the frozen base")
    assert sorted(comfy.init_kept.kept) == sorted(twin.init_kept.kept)


def test_sample_of_a_comfyui_sd3_file_with_clip_l_and_clip_g_renders_as_its_diffusers_twin(sd3_comfy, tmp_path,
                                                                                            monkeypatch):
    """`sample --lora` of the SD3 LoRA in ComfyUI's names (flow_export.kohya_as_diffusers splits it, its CLIP layers
    read as kohya's) renders as its diffusers twin does; without CLIP's layers the image differs."""
    from safetensors.torch import load_file, save_file

    settings = ["--profile", "cpu", "--seed", "0", "--model", str(sd3_comfy["base"]), "--set", f"resolution={RES}",
                "--set", "sample_steps=3", "--set", "max_sequence_length=16", "--images-per-prompt", "1",
                "--reward", "brightness"]
    images = []
    save_file({k: v for k, v in load_file(str(sd3_comfy["comfy"])).items() if not k.startswith("text_encoders.")},
              str(tmp_path / "no-clip.safetensors"))
    for name, lora in (("comfy", sd3_comfy["comfy"]), ("twin", sd3_comfy["file"]),
                       ("no-clip", tmp_path / "no-clip.safetensors")):
        (tmp_path / name).mkdir()
        images.append(sampled(tmp_path / name, monkeypatch, lora, *settings)[2])
    assert_rel_close(images[0], images[1], REORDERED, "SD3 sample --lora of the ComfyUI twin")
    assert relative_difference(images[0], images[2]) > 30 * REORDERED


def test_bad_input_a_comfyui_file_with_t5_layers_is_refused(with_clip, tmp_path, capsys):
    """A FLUX.1 LoRA in ComfyUI's names with a T5 layer (text_encoders.t5xxl.: no diffusers loader reads it) is refused
    by --init-lora and `sample --lora` in T5's one line, before any model loads; no output folder."""
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.settings.errors import quote

    _comfy_twin(with_clip, tmp_path / "twin.safetensors")
    t5 = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"
    state = load_file(str(tmp_path / "twin.safetensors")) | {
        f"{t5}.lora_A.weight": torch.ones(2, 32), f"{t5}.lora_B.weight": torch.ones(32, 2)}
    file = tmp_path / "t5.safetensors"
    save_file(state, str(file))
    for label, err in _refused_by_init_lora_and_sample(main, with_clip["base"], file, tmp_path / "out", capsys):
        assert err == [f"error: {label} {file} adapts the T5 text encoder too (e.g. {quote(t5 + '.lora_A.weight')}), "
                       "which no LoRA loader of diffusers reads (they would be dropped without a word): pass a LoRA "
                       "without T5 layers (CLIP's and the transformer's apply)"], err


def _refused_by_init_lora_and_sample(main, base, file, out, capsys) -> list[tuple[str, list[str]]]:
    """``file`` given to a 1-step run as --init-lora and to `sample --lora` on ``base``: each exits 2 and leaves no
    ``out``; returns (the option, its error: lines) of each."""
    said = []
    for argv, label in (([*FLOW, "--model", str(base), "--init-lora", str(file), "--steps", "1"], "--init-lora"),
                        (["sample", "--profile", "cpu", "--model", str(base), "--reward", "brightness", "--lora",
                          str(file)], "--lora")):
        assert main([*argv, "--output-dir", str(out)]) == 2
        said.append((label, [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]))
        assert not out.exists()
    return said


# CLIP layers a ComfyUI LoRA may hold that diffusers' readers have no name for (kohya_layers.comfy_encoder_name): the
# token embedding (FLUX.1's CLIP-L), CLIP-L's text_projection (SD3's CLIP-L has one; only CLIP-G's is read)
_UNNAMED_CLIP = {"flux": "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding",
                 "sd3": "text_encoders.clip_l.transformer.text_projection"}


def _with_unnamed_clip_layer(case, family, tmp_path, up) -> Path:
    """``case``'s ComfyUI twin (FLUX.1: _comfy_twin, its modulation layers beside; SD3: sd3_comfy's) with
    :data:`_UNNAMED_CLIP`'s layer added (lora_down ones, lora_up ``up``, alpha 2)."""
    from safetensors.torch import load_file, save_file

    if family == "flux":
        _comfy_twin(case, tmp_path / "twin.safetensors")
    twin = tmp_path / "twin.safetensors" if family == "flux" else case["comfy"]
    layer = _UNNAMED_CLIP[family]
    state = load_file(str(twin)) | {f"{layer}.lora_down.weight": torch.ones(2, 32), f"{layer}.alpha": torch.tensor(2.),
                                    f"{layer}.lora_up.weight": torch.full((32, 2), up)}
    save_file(state, str(tmp_path / "extra.safetensors"))
    return tmp_path / "extra.safetensors"


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_bad_input_a_comfyui_flow_file_with_a_clip_layer_diffusers_cannot_name_is_refused(with_clip, sd3_comfy, family,
                                                                                          tmp_path, capsys):
    """A ComfyUI SD3/FLUX LoRA with a changed CLIP layer diffusers' readers have no name for (FLUX.1 CLIP-L's token
    embedding; SD3 CLIP-L's text_projection) is refused by --init-lora and `sample --lora` in one line naming the key
    and why (the line a ComfyUI UNet LoRA's gets: lora_formats.ldm_unet_refusal), before any model loads; it quoted
    only 'text_encoders'. The FLUX.1 file holds modulation layers too (sample hands such a file to diffusers'
    reader)."""
    from lowmem_alignprop.cli import main
    from lowmem_alignprop.settings.errors import quote

    case = with_clip if family == "flux" else sd3_comfy
    file = _with_unnamed_clip_layer(case, family, tmp_path, 1.0)
    key = quote(f"{_UNNAMED_CLIP[family]}.lora_down.weight")
    for label, err in _refused_by_init_lora_and_sample(main, case["base"], file, tmp_path / "out", capsys):
        assert err == [f"error: {label} {file} changes a text-encoder layer that diffusers' LoRA loader has no layer "
                       f"for (e.g. {key}): only the encoders' attention and MLP layers and CLIP-G's text_projection "
                       "(SDXL's and SD3's second encoder) are read; save it again without text_encoder_diff, or from "
                       "a fine-tune that left that layer as it was"], err


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_an_all_zero_clip_layer_diffusers_cannot_name_in_a_comfyui_flow_file_is_left_out(with_clip, sd3_comfy, family,
                                                                                         tmp_path):
    """Such a layer with an all-zero lora_up (what ComfyUI's extract node writes for a layer the fine-tune left as it
    was: it changes nothing) is left out, as a ComfyUI UNet LoRA's is: --init-lora's and `sample --lora`'s reading
    of the file is that of the file without it, tensor for tensor."""
    from safetensors.torch import load_file

    from lowmem_alignprop.lora import flow_export, lora_args

    case = with_clip if family == "flux" else sd3_comfy
    file = _with_unnamed_clip_layer(case, family, tmp_path, 0.0)
    twin = tmp_path / "twin.safetensors" if family == "flux" else case["comfy"]
    for read in (lambda f: flow_export.kohya_as_diffusers(f, "--init-lora x"), lambda f: lora_args._lora_file(f, "x")):
        ours, theirs = load_file(str(read(file))), load_file(str(read(twin)))
        assert sorted(ours) == sorted(theirs) and len(ours) > 30, sorted(set(ours) ^ set(theirs))
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)

"""SD3/FLUX LoRAs that adapt CLIP (FLUX.1's CLIP-L; SD3's CLIP-L and CLIP-G), beyond the FLUX diffusers-file cases of
tests/test_init_lora_kept_flow.py and tests/test_flow_sample.py: a FLUX.1 file in sd-scripts' names (``lora_te1_``)
as ``sample --lora``, and the refusal of a second CLIP (``lora_te2_``) on FLUX.1."""

from __future__ import annotations

import pytest
import torch
from loras import sampled
from numerics import REORDERED, assert_rel_close, relative_difference
from test_init_lora_kept_flow import ATTENTION, FLOW, KEPT, KEPT_ALPHA, KEPT_RANK, RES, _lora_case, _pipe

from lowmem_alignprop.settings.errors import UserError

pytestmark = pytest.mark.usefixtures("fresh_log_handlers")

CLIP_SCALE = 3.0 / 2  # loras.clip_lora_parts: rank 2, alpha 3


@pytest.fixture(scope="module")
def with_clip(tmp_path_factory):
    """test_init_lora_kept_flow's FLUX LoRA with CLIP-L's layers: block 0's attention (rank 4, alpha 8), its
    modulation kept (rank 2, alpha 3), CLIP-L's attention and fc1 (rank 2, alpha 3); no single block (diffusers'
    kohya reader splits linear1 at FLUX.1's own widths only)."""
    return _lora_case(tmp_path_factory.mktemp("flux-clip"), ATTENTION[:8], KEPT[:2], single_layers=0, clip=True)


def _kohya_twin(case, path) -> None:
    """``case``'s diffusers file written in sd-scripts' FLUX.1 names at ``path``: the attention layers fused as
    kohya fuses them (lora_unet_double_blocks_0_img_attn_qkv...), the modulation as img_mod_lin / txt_mod_lin,
    CLIP-L's layers as lora_te1_text_model_encoder_layers_..., each scale folded into lora_up (alpha = rank)."""
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.commands import flow_export, lora_formats

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
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(path))


def test_sample_of_a_kohya_flux_file_with_clip_layers_renders_as_its_diffusers_twin(with_clip, tmp_path,
                                                                                     monkeypatch):
    """`sample --lora` of the FLUX.1 LoRA in sd-scripts' names (CLIP-L's layers as lora_te1_) renders what a plain
    FluxPipeline renders with its diffusers twin loaded (CLIP-L's layers applied to the prompt): the same prompt,
    seed and settings; without CLIP's layers the image differs."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _kohya_twin(with_clip, tmp_path / "kohya.safetensors")
    settings = ["--profile", "cpu", "--seed", "0", "--model", str(with_clip["base"]), "--set", f"resolution={RES}",
                "--set", "sample_steps=4", "--set", "guidance_scale=3.5", "--set", "max_sequence_length=16",
                "--images-per-prompt", "1", "--reward", "brightness"]
    seed, _, image = sampled(tmp_path, monkeypatch, tmp_path / "kohya.safetensors", *settings)

    def render(lora):
        pipe = _pipe(with_clip["base"], lora)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(prompt=["a red car"], num_inference_steps=4, guidance_scale=3.5, height=RES, width=RES,
                        generator=[torch.Generator().manual_seed(seed)], output_type="pt",
                        max_sequence_length=16).images[0].float()

    assert_rel_close(image, render(with_clip["file"]), REORDERED, "sample --lora of the kohya twin")
    file = str(with_clip["file"])  # (the same LoRA without CLIP's layers: another image)
    save_file({k: v for k, v in load_file(file).items() if not k.startswith("text_encoder.")},
              str(tmp_path / "no-clip.safetensors"), metadata=safe_open(file, "pt").metadata())
    assert relative_difference(image, render(tmp_path / "no-clip.safetensors")) > 30 * REORDERED


def test_bad_input_a_flux_kohya_file_with_a_second_clip_is_refused(with_clip, tmp_path, capsys):
    """A FLUX.1 LoRA in sd-scripts' names with lora_te2_ layers (SD3's CLIP-G: FLUX.1 has CLIP-L alone, lora_te1_;
    diffusers' FLUX reader drops them with a log line): --init-lora (flow_export.kohya_as_diffusers) and
    `sample --lora` (which hands a file with modulation layers to diffusers' reader) refuse it in one line, before
    any model loads; no output folder."""
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.commands.flow_export import kohya_as_diffusers
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

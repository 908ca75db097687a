"""``lora_layers``: which layers carry the trained LoRA. ``attention`` (AlignProp's: the attention projections) or
``attention+ff`` (also the transformer blocks' feed-forward layers). The adapted layers are checked against the
architectures' own modules (found by their classes, not by our names), the planner counts the extra adapter, and a
run trains, saves and resumes it. Exports, --init-lora and resume of such LoRAs: test_lora_export, test_flow_export,
test_training_outputs and test_bad_input.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from loras import adapted_modules

from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError


def _feed_forward_modules(model) -> set[str]:
    """From the diffusers classes: the Linear layers of each block's feed-forward network(s) -- a UNet's and SD3's
    ``FeedForward`` (``net[0].proj`` in, ``net[2]`` out), FLUX's single blocks' MLP input and output."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    out = set()
    for name, m in model.named_modules():
        if isinstance(m, FeedForward):
            out |= {f"{name}.net.0.proj", f"{name}.net.2"}
        elif isinstance(m, FluxSingleTransformerBlock):
            out |= {f"{name}.proj_mlp", f"{name}.proj_out"}
    # a Linear, or peft's wrapper of one once LoRA is on it
    assert out and all(isinstance(getattr(model.get_submodule(n), "base_layer", model.get_submodule(n)),
                                  torch.nn.Linear) for n in out)
    return out


def _unet(tiny_dir):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(f"{tiny_dir}/unet")


def _flux(_):
    from flowmodels import build_tiny_flux_pipeline
    return build_tiny_flux_pipeline(single_layers=2).transformer


def _sd3(_):
    from flowmodels import build_tiny_sd3_pipeline
    return build_tiny_sd3_pipeline().transformer


@pytest.mark.parametrize("build", [_unet, _flux, _sd3], ids=["unet", "flux", "sd3"])
def test_attention_ff_adds_exactly_every_blocks_feed_forward_layers(build, tiny_dir):
    from lowmem_alignprop.models.flow import add_flow_lora
    from lowmem_alignprop.models.loading import add_lora

    def adapted(layers):
        model = build(tiny_dir)
        add = add_lora if build is _unet else add_flow_lora
        params = add(model, 4, None, 0, layers)
        assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
        assert sum(p.numel() for p in params) == sum(p.numel() for p in model.parameters() if p.requires_grad)
        return set(adapted_modules(model)), sum(p.numel() for p in params), model

    attention, n_attention, _ = adapted("attention")
    both, n_both, model = adapted("attention+ff")
    ff = _feed_forward_modules(model)
    assert both - attention == ff and attention < both
    assert all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj",
                                        "to_add_out") or n.endswith("to_out.0") for n in attention)
    assert "proj_out" not in both  # the transformers' last layer (to patches) belongs to no block
    expected = sum(4 * (model.get_submodule(n).in_features + model.get_submodule(n).out_features) for n in ff)
    assert n_both - n_attention == expected  # rank 4: A is 4 x in, B is out x 4


def test_the_planner_counts_the_feed_forward_adapter_and_its_optimizer_state(tiny_dir):
    from lowmem_alignprop.measure import planner

    cfg = Config(model="tiny", resolution=64, sample_steps=4, k=1, batch_size=1).validate()
    plain = planner.estimate(cfg, target="cuda")
    wide = planner.estimate(dataclasses.replace(cfg, lora_layers="attention+ff"), target="cuda")

    def numel(trained):
        return sum(int(k.split(":")[0]) * n for k, n in trained.items())

    unet = _unet(tiny_dir)
    ff = _feed_forward_modules(unet)
    extra = sum(4 * (unet.get_submodule(n).in_features + unet.get_submodule(n).out_features) for n in ff)
    assert numel(wide.trained) - numel(plain.trained) == extra
    # each added fp32 LoRA weight brings AdamW's two fp32 moments: at least 12 bytes on the card when a step begins
    assert wide.step_start - plain.step_start >= 12 * extra
    assert wide.peak_needed > plain.peak_needed


def test_an_unknown_value_is_refused_at_validation_naming_the_choices():
    with pytest.raises(UserError, match="lora_layers") as e:
        Config(lora_layers="all").validate()
    assert "attention+ff" in str(e.value)


def test_fp8_with_feed_forward_layers_on_a_flow_model_is_refused_naming_the_fix():
    """fp8 reads an SD3/FLUX transformer with the LoRA's layers in bf16 until the adapter is added: with the
    feed-forward layers that is most of the model. A UNet's fp8 is stored after the adapter: allowed."""
    with pytest.raises(UserError, match=r"lora_layers=attention\+ff that is most of the model: use --set "
                                        r"base_quant=int8 \(or nf4\), or --set lora_layers=attention"):
        Config(model="flux", base_quant="fp8", unet_checkpointing="blocks", lora_layers="attention+ff").validate()
    Config(model="flux", base_quant="fp8", unet_checkpointing="blocks").validate()
    Config(model="sd15", base_quant="fp8", unet_checkpointing="blocks", lora_layers="attention+ff").validate()


def test_a_run_trains_the_feed_forward_layers_and_says_so_in_its_files(tmp_path, tiny_dir, fresh_log_handlers):
    """Two steps of attention+ff: the saved LoRA holds the feed-forward layers and they moved from B = 0; the
    checkpoint's LoRA (export of a step) holds the same layers; plan names the choice."""
    from safetensors.torch import load_file

    from lowmem_alignprop.cli import main

    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--model", str(tiny_dir), "--steps", "2", "--output-dir", str(out),
                 "--checkpoint-every", "1", "--set", "sample_prompts=0", "--set", "sample_steps=3", "--set", "k=1",
                 "--set", "lr=0.05", "--set", "lora_layers=attention+ff"]) == 0
    saved = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    ff_up = [v for k, v in saved.items() if ".ff.net." in k and (".lora.up." in k or ".lora_B." in k)]
    assert len(ff_up) == len(_feed_forward_modules(_unet(tiny_dir))) and all(v.abs().max() > 0 for v in ff_up)
    exported = tmp_path / "export"
    assert main(["export", "--lora", str(out / "checkpoints" / "step-2"), "--format", "peft", "--out",
                 str(exported)]) == 0
    peft = load_file(str(exported / "adapter_model.safetensors"))
    assert sum(".ff.net." in k for k in peft) == 2 * len(ff_up)


def _attention_projections(model) -> set[str]:
    """From the modules themselves: every attention's q/k/v/out projections and, in joint blocks, its text stream's
    (``add_q/k/v_proj``, ``to_add_out``) where the block has them (SD3's last block has no ``to_add_out``; FLUX's
    single blocks no ``to_out``)."""
    out = set()
    for name, m in model.named_modules():
        if not isinstance(getattr(m, "to_q", None), torch.nn.Module) or name.endswith(".to_q"):
            continue
        for part in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            if getattr(m, part, None) is not None:
                out.add(f"{name}.{part}")
        if getattr(m, "to_out", None) is not None:
            out.add(f"{name}.to_out.0")
    return out


@pytest.mark.parametrize("build", [_unet, _flux, _sd3], ids=["unet", "flux", "sd3"])
def test_attention_adapts_every_attention_projection_of_both_streams(build, tiny_dir):
    """lora_layers=attention: every attention projection, image and text stream, carries the adapter (a target
    dropped from the list trains a part of the attention silently)."""
    from lowmem_alignprop.models.flow import add_flow_lora
    from lowmem_alignprop.models.loading import add_lora

    model = build(tiny_dir)
    expected = _attention_projections(model)
    (add_lora if build is _unet else add_flow_lora)(model, 4, None, 0, "attention")
    assert set(adapted_modules(model)) == expected
    if build is not _unet:
        assert any(n.endswith("to_add_out") for n in expected) and any(n.endswith("add_q_proj") for n in expected)


@pytest.mark.parametrize("alpha, scale", [(None, 1.0), (8, 2.0), (2, 0.5)])
def test_lora_alpha_sets_every_adapters_scale_through_the_family(tiny_dir, alpha, scale):
    """The adapter's scale is lora_alpha / rank (alpha unset: the rank, scale 1), as the trainer adds it
    (family.add_lora): a dropped alpha trains at another learning-rate scale than the one exported."""
    from lowmem_alignprop.models.family import UNetFamily

    model = _unet(tiny_dir)
    UNetFamily(None).add_lora(model, Config(model=str(tiny_dir), lora_rank=4, lora_alpha=alpha))
    scales = {m.scaling["default"] for m in model.modules() if "default" in getattr(m, "scaling", {})}
    assert scales == {scale}

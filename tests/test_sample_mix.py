"""`sample --lora A:w --lora B:v ...`: mixing LoRAs in weight space (commands/evaluate.py's module doc), checked against
a model whose weights are W + sum_i w_i * scale_i * B_i A_i built here with peft and diffusers directly.

The LoRAs differ in rank, alpha and adapted layers, and come in every form a user has: a run's lora/, a kohya export,
a peft export and a training checkpoint. A DoRA's magnitudes do not scale with its weight: refused at any weight but 1.
"""

from __future__ import annotations

import pytest
import torch
from refusals import assert_refused

from lowmem_alignprop.cli import main
from lowmem_alignprop.commands.evaluate import parse_lora
from lowmem_alignprop.settings.errors import UserError, quote

MAGNITUDE = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.lora_magnitude_vector"  # the dora's first


@pytest.fixture(scope="module")
def dora(tmp_path_factory, tiny_dir):
    """A peft DoRA adapter folder (use_dora) for the tiny UNet, with trained (not the base's) magnitudes."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.settings.config import Config

    folder = tmp_path_factory.mktemp("dora") / "dora"
    unet = load_components(Config(model=str(tiny_dir))).unet
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k"], use_dora=True)
    inject_adapter_in_model(config, unet)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    config.save_pretrained(str(folder))
    save_file({f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(unet).items()},
              str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("weight", ["0.5", "0", "-1"])
def test_a_dora_at_a_weight_other_than_1_is_one_line(dora, weight, tmp_path, capsys):
    """peft scales a DoRA's low-rank direction update by the adapter weight but divides by the norm of the scaled
    weight and keeps its trained magnitudes: at weight 0 a layer computed (m / ||W||) W x, 16% off the base layer's
    W x here, so `dora:0.5` was not halfway to the DoRA and `dora:0` not the base model, unsaid (sample_results.json
    says each adapter adds weight x its update). One line before any model loads; weight 1 is the DoRA as trained."""
    assert_refused(main, ["sample", "--profile", "cpu", "--lora", f"{dora}:{weight}", "--output-dir",
                          str(tmp_path / "s")],
                   f"--lora {dora}:{weight} is a DoRA (its magnitude vectors, e.g. {quote(MAGNITUDE)}): a weight "
                   "scales its direction update but "
                   f"not its magnitudes, so at weight {float(weight):g} it is not {float(weight):g} x its weight "
                   "update "
                   "(at 0 not the base model); give it weight 1 (alone or in a mix)", tmp_path / "s", capsys)
    assert parse_lora(str(dora), 0).weight == 1.0 and parse_lora(f"{dora}:1", 0).weight == 1.0  # as trained: read
    with pytest.raises(UserError, match="is a DoRA"):
        parse_lora(f"{dora}:0.5", 1)

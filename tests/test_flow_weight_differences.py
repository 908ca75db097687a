"""An SD3/FLUX LoRA saved by ComfyUI's extract node with full weight or bias differences (``.diff``, ``.diff_b``:
lora_type full_diff, bias_diff): no LoRA loader applies them. diffusers' FLUX reader dropped the changing ones with a
log line (``sample`` rendered the LoRA without them, ``--init-lora`` started from it), its SD3 path said "adapts
'diffusion_model', a layer lowmem-alignprop does not train". Now one line names the key and the fix, for both
commands; all-zero differences (a layer the fine-tune left as it was) are left out, as diffusers does."""

import pytest
import torch
from flowmodels import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from safetensors.torch import save_file

from lowmem_alignprop.lora.adapters import load_adapters
from lowmem_alignprop.lora.init_lora import init_lora_file
from lowmem_alignprop.lora.lora_args import parse_lora
from lowmem_alignprop.settings.errors import UserError, quote

FIX = "not a LoRA's lora_down / lora_up: extract it again with lora_type standard and bias_diff off"
LAYER = {"flux": "diffusion_model.double_blocks.0.img_attn.proj",
         "sd3": "diffusion_model.joint_blocks.0.x_block.attn.proj"}
# a norm's weight difference (FLUX's qk norms), a linear's bias difference
DIFFERENCE = {"flux": ("diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale.diff", "head"),
              "sd3": ("diffusion_model.joint_blocks.0.x_block.attn.proj.diff_b", "width")}


@pytest.fixture(scope="module")
def pipes():
    return {"flux": build_tiny_flux_pipeline, "sd3": build_tiny_sd3_pipeline}


def _file(tmp_path, pipe, family: str, fill: float):
    config = pipe.transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    g = torch.Generator().manual_seed(0)
    name = LAYER[family]
    key, size = DIFFERENCE[family]
    tensors = {f"{name}.lora_down.weight": torch.randn(2, width, generator=g),
               f"{name}.lora_up.weight": torch.randn(width, 2, generator=g), f"{name}.alpha": torch.tensor(2.0),
               key: torch.full((config.attention_head_dim if size == "head" else width,), fill)}
    save_file(tensors, str(tmp_path / f"{family}.safetensors"))
    return tmp_path / f"{family}.safetensors", key


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_bad_input_weight_differences_that_change_the_model_are_one_line(pipes, family, tmp_path):
    pipe = pipes[family]()
    file, key = _file(tmp_path, pipe, family, 0.5)
    with pytest.raises(UserError) as sample:
        load_adapters(pipe, [parse_lora(str(file), 0)], "tiny")
    assert str(sample.value) == f"--lora {file} holds ComfyUI's full weight or bias differences (e.g. " \
                                f"{quote(key)}), {FIX}"
    with pytest.raises(UserError) as start:
        init_lora_file(str(file))
    assert str(start.value) == f"--init-lora {file} holds ComfyUI's full weight or bias differences (e.g. " \
                               f"{quote(key)}), {FIX}"


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_all_zero_weight_differences_are_left_out_and_the_lora_loads(pipes, family, tmp_path):
    pipe = pipes[family]()
    file, _ = _file(tmp_path, pipe, family, 0.0)
    load_adapters(pipe, [parse_lora(str(file), 0)], "tiny")
    loaded = sorted(n for n, m in pipe.transformer.named_modules() if "lora0" in getattr(m, "lora_A", {}))
    assert loaded == ["transformer_blocks.0.attn.to_out.0"], loaded
    assert init_lora_file(str(file)).is_file()  # (split into diffusers' layout, the difference left out)

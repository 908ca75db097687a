"""Real SD3/FLUX checkpoints read block by block (models/block_loading.py): each block of the transformer is read
from the .safetensors file and quantized before the next, so a 12B FLUX never sits in host memory in bf16.

* Every layout gives back the saved transformer bit for bit: the original (Black Forest Labs' / Stability's, alone or
  as the ``model.diffusion_model.`` part of a whole checkpoint) and diffusers', in a file or a pipeline folder.
* With int8, at no moment do more Linear weights exist in full precision than the largest block's, where diffusers'
  whole-model load held all of them; the quantized weights are those of quantizing the whole loaded model.
* Through ``load_components`` (a FLUX file in BFL's layout with block swap, a folder with nf4) the loaded transformer
  is the quantized saved one, with block swap's host block quantized on the CPU.
* A file of another model is not read block by block: one warning, and diffusers' whole load (with its own error).
* A cached FLUX hub id with int8 loads as a flow model (it took the UNet's quantized path and failed before), read block
  by block from its snapshot.
"""

from __future__ import annotations

import logging

import pytest
import torch
from flowmodels import build_tiny_flux_dir, build_tiny_sd3_dir
from torch import nn

from lowmem_alignprop.memory import quant
from lowmem_alignprop.memory.block_swap import swappable_blocks
from lowmem_alignprop.models import block_loading as bl
from lowmem_alignprop.models import flow_layout

CPU = bl.Placement("none", torch.float32, "cpu")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blockload")
    return {"flux": build_tiny_flux_dir(root / "flux", single_layers=2), "sd3": build_tiny_sd3_dir(root / "sd3")}


def _saved(directory):
    """(class, config, state dict) of a tiny pipeline folder's transformer, as saved."""
    import diffusers

    tr = diffusers.DiffusionPipeline.from_pretrained(directory).transformer
    return type(tr), dict(tr.config), tr.state_dict()


def _write(path, sd, family: str, layout: str, prefix: str = "") -> list:
    """The transformer as a single file; with a prefix also a VAE tensor beside it, as whole checkpoints have."""
    from safetensors.torch import save_file

    if layout == "original":
        sd = flow_layout.flux_to_original(sd) if family == "flux" else flow_layout.sd3_to_original(sd, 2)
    other = {"first_stage_model.decoder.conv_in.weight": torch.ones(2, 2)} if prefix else {}
    save_file({**{prefix + k: v.contiguous() for k, v in sd.items()}, **other}, str(path))
    return [path]


CASES = [("flux", "original", ""), ("flux", "original", "model.diffusion_model."), ("flux", "diffusers", ""),
         ("sd3", "original", ""), ("sd3", "original", "model.diffusion_model."), ("sd3", "diffusers", "")]


@pytest.mark.parametrize("family, layout, prefix", CASES)
def test_every_layout_reads_back_the_saved_transformer_bit_for_bit(dirs, tmp_path, family, layout, prefix):
    """The fused q/k/v (and FLUX's single-block linear1) split at the model's own widths, the adaLN halves swapped
    back, SD3's positional table read: the state dict equals the saved one exactly, also cast to bf16."""
    cls, config, sd = _saved(dirs[family])
    files = _write(tmp_path / "t.safetensors", sd, family, layout, prefix)
    model = bl.load_by_block(cls, config, files, family, layout, CPU)
    got = model.state_dict()
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    half = bl.load_by_block(cls, config, files, family, layout, bl.Placement("none", torch.bfloat16, "cpu"))
    assert all(torch.equal(v, sd[k].to(torch.bfloat16)) for k, v in half.state_dict().items())


def _int8_reference(cls, config, sd):
    """The saved transformer loaded whole and quantized in place to int8 (what a block-by-block read must equal)."""
    reference = cls.from_config(config)
    reference.load_state_dict(sd)
    quant.quantize_in_place(reference, "int8", torch.float32, device="cpu", quiet=True)
    return reference


def _linear_bytes(model) -> int:
    """Bytes of the Linear weights that exist in full precision (not on meta, not yet quantized)."""
    return sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
               if type(m) is nn.Linear and not m.weight.is_meta)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_int8_holds_one_block_in_full_precision_and_quantizes_as_the_whole_model_does(dirs, tmp_path, cpu_quant,
                                                                                      family):
    """Measured where each block is quantized (the most full-precision weights exist just before): never more than
    the largest block's Linear bytes, against all of them (over twice that here) in a whole-model load. The int8
    weights and scales are those of quantizing the saved model in place."""
    cls, config, sd = _saved(dirs[family])
    files = _write(tmp_path / "t.safetensors", sd, family, "original")
    seen, models = [], []
    quantize = quant.quantize_in_place

    def spy(module, *a, **kw):
        seen.append(_linear_bytes(models[0]) if models else 0)
        return quantize(module, *a, **kw)

    from accelerate import init_empty_weights
    with init_empty_weights():
        template = cls.from_config(config)
    block_bytes = max(_linear_bytes(b.to_empty(device="cpu")) for b in swappable_blocks(template))
    whole = _linear_bytes(template.to_empty(device="cpu"))
    real_from_config = cls.from_config

    def keep(*a, **kw):  # the model under construction, to measure it from the spy
        models.append(real_from_config(*a, **kw))
        return models[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quant, "quantize_in_place", spy)
        mp.setattr(cls, "from_config", keep)
        model = bl.load_by_block(cls, config, files, family, "original", bl.Placement("int8", torch.float32, "cpu"))
    assert len(seen) == len(swappable_blocks(model)) + 1 and max(seen) <= block_bytes < whole / 2
    reference = _int8_reference(cls, config, sd)
    assert quant.count_quantized(model)["int8"] == quant.count_quantized(reference)["int8"] > 0
    ref = reference.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor))


def test_a_bfl_flux_file_with_block_swap_loads_quantized_through_load_components(dirs, tmp_path, cpu_quant, caplog):
    """``--model flux1.safetensors --set model_components=DIR base_quant=int8 block_swap=1`` (BFL layout at this
    tiny width, which diffusers' own converter splits at FLUX.1's widths only): read block by block, the host block
    quantized on the CPU and the rest for the device, the weights the saved model's."""
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.settings.config import Config

    cls, config, sd = _saved(dirs["flux"])
    files = _write(tmp_path / "flux1.safetensors", sd, "flux", "original", "model.diffusion_model.")
    calls = []
    quantize = quant.quantize_in_place
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quant, "target_device", lambda: torch.device("cpu", 0))  # stands for the GPU: distinct from cpu
        mp.setattr(quant, "quantize_in_place", lambda m, *a, device=None, **kw: calls.append(str(device)) or
                   quantize(m, *a, device=device, **kw))
        with caplog.at_level(logging.INFO, logger="lowmem_alignprop.models.block_loading"):
            comps = load_components(Config(model=str(files[0]), model_components=str(dirs["flux"]),
                                           base_quant="int8", block_swap=1))
    assert calls == ["cpu", "cpu:0", "cpu:0", "cpu:0"]  # the host block, two resident blocks, the rest
    assert "read block by block to cpu:0 (1 blocks kept in host memory): " in caplog.text
    ref = _int8_reference(cls, config, sd).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in comps.unet.state_dict().items() if isinstance(v, torch.Tensor))


def test_a_pipeline_folder_with_nf4_is_read_block_by_block(dirs, cpu_quant, caplog):
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.settings.config import Config

    with caplog.at_level(logging.INFO, logger="lowmem_alignprop.models.block_loading"):
        comps = load_components(Config(model=str(dirs["sd3"]), base_quant="nf4"))
    assert "SD3Transformer2DModel read block by block" in caplog.text
    counts = quant.count_quantized(comps.unet)
    assert counts["nf4"] > 0 and counts["linear"] == 0


def test_a_file_of_another_model_falls_back_to_the_whole_load_with_one_warning(dirs, tmp_path, caplog):
    """Another width (or a missing or extra tensor) is named in one warning; the caller loads with diffusers."""
    cls, config, sd = _saved(dirs["sd3"])
    files = _write(tmp_path / "t.safetensors", sd, "sd3", "original")
    other = dict(config, attention_head_dim=4)
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop.models.block_loading"):
        assert bl.load_by_block(cls, other, files, "sd3", "original", CPU) is None
        assert bl.load_by_block(cls, dict(config, num_layers=3), files, "sd3", "original", CPU) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "has shape" in lines[0] and "the model's" in lines[0]
    assert "tensors missing" in lines[1] and "diffusers loads the whole transformer" in lines[1]


@pytest.fixture
def cached_flux_hub_id(dirs, tmp_path, monkeypatch) -> str:
    """The tiny FLUX folder as a hub id in a Hugging Face cache (snapshot + refs/main), huggingface_hub offline as
    run/hub.py sets it without network."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someone--tiny-flux"
    shutil.copytree(dirs["flux"], repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return "someone/tiny-flux"


def test_a_cached_flux_hub_id_with_int8_loads_as_a_flow_model_block_by_block(cached_flux_hub_id, cpu_quant, caplog):
    """A hub id is told to be a FLUX pipeline from its cached model_index.json before anything loads (it went down
    the UNet's quantized path before, and failed with 'not in the cache'); its cached snapshot is read block by
    block."""
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.settings.config import Config

    with caplog.at_level(logging.INFO, logger="lowmem_alignprop.models.block_loading"):
        comps = load_components(Config(model=cached_flux_hub_id, base_quant="int8"))
    assert comps.family == "flux" and "FluxTransformer2DModel read block by block" in caplog.text
    assert quant.count_quantized(comps.unet)["int8"] > 0 and quant.count_quantized(comps.unet)["linear"] == 0


def test_plan_of_a_cached_flux_hub_id_is_the_plan_of_its_folder(cached_flux_hub_id, dirs, capsys):
    """The planner read a cached hub id as an SD model only ('holds a FluxPipeline, not a Stable Diffusion model')."""
    import json

    from lowmem_alignprop.cli import main

    needed = []
    for model in (cached_flux_hub_id, str(dirs["flux"])):
        assert main(["plan", "--model", model, "--profile", "cpu", "--set", "resolution=32", "--json"]) == 0
        needed.append(json.loads(capsys.readouterr().out)["peak_needed"])
    assert needed[0] == needed[1] > 0


def test_a_full_precision_checkpoint_is_read_to_the_trainers_device_with_its_host_blocks_on_the_cpu(dirs, tmp_path):
    """``load_components(cfg, dtype, device)`` (the trainer's call) without a quantized base: every block read from
    the file straight to ``device`` (``cpu:0`` stands for the GPU), block swap's to the CPU, the weights the saved
    ones. Without a device (``sample``, ``export``) it is read to the CPU the same way."""
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.settings.config import Config

    cls, config, sd = _saved(dirs["flux"])
    files = _write(tmp_path / "flux1.safetensors", sd, "flux", "original")
    cfg = Config(model=str(files[0]), model_components=str(dirs["flux"]), block_swap=1)
    where, fill = [], bl.Checkpoint.fill
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bl.Checkpoint, "fill", lambda self, m, prefix, on, dtype: where.append((prefix, str(on))) or
                   fill(self, m, prefix, on, dtype))
        comps = load_components(cfg, torch.float32, torch.device("cpu", 0))
        blocks = [p for p, _ in where if "blocks." in p]
        assert [on for _, on in where] == ["cpu"] + ["cpu:0"] * (len(where) - 1) and len(blocks) == 3
        got = comps.unet.state_dict()
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
        where.clear()
        comps = load_components(cfg, torch.float32)
        assert [on for _, on in where] == ["cpu"] * len(where) and len(where) > 3
        assert all(torch.equal(v, sd[k]) for k, v in comps.unet.state_dict().items())

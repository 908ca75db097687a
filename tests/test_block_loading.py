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
* fp8 files (ComfyUI's): plain e4m3/e5m2 and scaled (per-layer ``scale_weight``, scalar or per row), FLUX and SD3, alone
  or prefixed, read block by block to exactly ``fp8.float() * scale`` in the load dtype; with int8 and block swap; a
  plain e4m3 file under fp8 storage keeps its bytes; a scaled file that does not fit is one line, never diffusers'
  scale-dropping whole load.
"""

from __future__ import annotations

import logging

import pytest
import torch
from flowmodels import build_tiny_flux_dir, build_tiny_sd3_dir
from refusals import rename_text_encoder_weights
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


def _load_int8_swapping_one(cfg):
    """``load_components(cfg)`` with ``cpu:0`` standing for the GPU (distinct from ``cpu``): (components, the device
    of each quantize_in_place call in order)."""
    from lowmem_alignprop.models.loading import load_components

    calls = []
    quantize = quant.quantize_in_place
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quant, "target_device", lambda: torch.device("cpu", 0))
        mp.setattr(quant, "quantize_in_place", lambda m, *a, device=None, **kw: calls.append(str(device)) or
                   quantize(m, *a, device=device, **kw))
        return load_components(cfg), calls


def test_a_bfl_flux_file_with_block_swap_loads_quantized_through_load_components(dirs, tmp_path, cpu_quant, caplog):
    """``--model flux1.safetensors --set model_components=DIR base_quant=int8 block_swap=1`` (BFL layout at this
    tiny width, which diffusers' own converter splits at FLUX.1's widths only): read block by block, the host block
    quantized on the CPU and the rest for the device, the weights the saved model's."""
    from lowmem_alignprop.settings.config import Config

    cls, config, sd = _saved(dirs["flux"])
    files = _write(tmp_path / "flux1.safetensors", sd, "flux", "original", "model.diffusion_model.")
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop.models.block_loading"):
        comps, calls = _load_int8_swapping_one(Config(model=str(files[0]), model_components=str(dirs["flux"]),
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


def test_a_cached_flux_hub_id_with_int8_loads_as_a_flow_model_block_by_block(cached_flux_hub_id, cpu_quant, caplog,
                                                                              monkeypatch):
    """A hub id is told to be a FLUX pipeline from its cached model_index.json before anything loads (it went down
    the UNet's quantized path before, and failed with 'not in the cache'); its cached snapshot is read block by
    block, and looked up once (each lookup is a round trip to the hub when online)."""
    from diffusers import DiffusionPipeline

    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.settings.config import Config

    lookups, download = [], DiffusionPipeline.download
    monkeypatch.setattr(DiffusionPipeline, "download", lambda *a, **k: lookups.append(a) or download(*a, **k))
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop.models.block_loading"):
        comps = load_components(Config(model=cached_flux_hub_id, base_quant="int8"))
    assert comps.family == "flux" and "FluxTransformer2DModel read block by block" in caplog.text
    assert lookups == [(cached_flux_hub_id,)]
    assert quant.count_quantized(comps.unet)["int8"] > 0 and quant.count_quantized(comps.unet)["linear"] == 0


def test_a_cached_flux_hub_id_whose_t5_files_lack_weights_is_refused(cached_flux_hub_id, tmp_path):
    """FLUX's T5 (a transformers model) would load with random weights in place of the renamed ones: refused, naming
    the part, from the hub id's cached snapshot as from a folder."""
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.settings.errors import UserError

    snapshot = tmp_path / "hub" / "models--someone--tiny-flux" / "snapshots" / ("0" * 40)
    renamed = rename_text_encoder_weights(snapshot, "text_encoder_2", match="block.0.")
    with pytest.raises(UserError, match=rf"{cached_flux_hub_id}: {renamed} of the \d+ weights of its text_encoder_2 "
                                        r"\(T5EncoderModel\) are not in its files"):
        load_components(Config(model=cached_flux_hub_id))


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


# --------------------------------------------------------------------------------------------------
# fp8 checkpoints (ComfyUI's flux1-dev-fp8, sd3.5_large_fp8_scaled): plain, and scaled per layer
# --------------------------------------------------------------------------------------------------

SPLIT_ROWS = ("qkv.", "linear1.", "final_layer.adaLN_modulation.")  # original tensors whose rows the layout moves


def _fp8_original(sd, family: str, kind: str) -> tuple[dict, dict]:
    """(file tensors, reference) of a transformer in its original layout as an fp8 file: every 2-D weight in fp8,
    the rest in bf16 as those files keep it. ``plain``: e4m3fn; ``e5m2``; ``scaled``: e4m3fn with a ``scale_weight``
    beside it and the ``scaled_fp8`` marker (ComfyUI's legacy format); ``comfy_quant``: ComfyUI's current format
    (``weight_scale`` and a ``comfy_quant`` record). The reference is each weight as it really is, computed here on
    its own: ``fp8.float() * scale`` in float32. Scales: one per row, as [rows] or [rows, 1], for the tensors whose
    rows the layout splits across diffusers tensors or reorders (the fused q/k/v, FLUX's linear1, the final adaLN),
    else a scalar, [rows] or [rows, 1] in turn; each a few thousandths (the stored values are the weights over their
    scale, up to e4m3's largest, 448, so a load that drops the scales is off by a factor of hundreds), and each row's
    scale different (a row given another row's scale is off too)."""
    orig = flow_layout.flux_to_original(sd) if family == "flux" else flow_layout.sd3_to_original(sd, 2)
    fp8 = torch.float8_e5m2 if kind == "e5m2" else torch.float8_e4m3fn
    out, ref = {}, {}
    for i, (key, v) in enumerate(sorted(orig.items())):
        if not (key.endswith(".weight") and v.dim() == 2):
            out[key] = v.to(torch.bfloat16)
            ref[key] = out[key].float()
            continue
        if kind not in ("scaled", "comfy_quant"):
            out[key] = v.to(fp8)
            ref[key] = out[key].float()
            continue
        amax = v.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-6)
        rows = amax / 448 * torch.linspace(1.0, 1.5, len(v)).unsqueeze(1)
        split = any(part in key for part in SPLIT_ROWS)
        scale = [rows.amax().reshape(()), rows.flatten(), rows][i % 2 + 1 if split else i % 3]  # (), [rows], [rows, 1]
        out[key] = (v.float() / scale.reshape(-1, 1) if scale.dim() else v.float() / scale).to(fp8)
        layer = key[:-len("weight")]
        if kind == "comfy_quant":
            out[layer + "weight_scale"] = scale
            out[layer + "comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        else:
            out[layer + "scale_weight"] = scale
        if i % 2:  # fp8 matmul inputs' scale: nothing to do with the weights
            out[layer + ("input_scale" if kind == "comfy_quant" else "scale_input")] = torch.ones(())
        ref[key] = out[key].float() * (scale.reshape(-1, 1) if scale.dim() else scale)
    if kind == "scaled":
        out["scaled_fp8"] = torch.empty(0, dtype=fp8)  # the marker ComfyUI's files carry
    return out, ref


def _fp8_file(path, sd, family: str, kind: str, prefix: str = "", drop: str = "") -> tuple[list, dict]:
    from safetensors.torch import save_file

    tensors, ref = _fp8_original(sd, family, kind)
    save_file({prefix + k: v.contiguous() for k, v in tensors.items() if k != drop}, str(path))
    return [path], ref


def _as_original(model, family: str) -> dict:
    """A loaded transformer's weights in the original layout (export's inverse, bit for bit: the test above)."""
    sd = model.state_dict()
    return flow_layout.flux_to_original(sd) if family == "flux" else flow_layout.sd3_to_original(sd, 2)


FP8_CASES = [("flux", "plain", ""), ("flux", "e5m2", ""), ("flux", "scaled", ""),
             ("flux", "scaled", "model.diffusion_model."), ("flux", "comfy_quant", "model.diffusion_model."),
             ("sd3", "plain", "model.diffusion_model."), ("sd3", "scaled", ""),
             ("sd3", "scaled", "model.diffusion_model.")]


@pytest.mark.parametrize("family, kind, prefix", FP8_CASES)
def test_fp8_files_read_block_by_block_are_their_scaled_weights_exactly(dirs, tmp_path, caplog, family, kind, prefix):
    """Plain fp8 (e4m3fn, e5m2) and scaled fp8 files, alone or under model.diffusion_model.: read block by block
    (no warning, no fallback), every weight equals ``fp8.float() * scale`` cast to the load dtype, in float32 and in
    bf16, with the fused q/k/v and FLUX's linear1 split across diffusers tensors and the final adaLN's halves swapped,
    per-row scales following their rows. Dropping the scales would have been visibly wrong."""
    cls, config, sd = _saved(dirs[family])
    files, ref = _fp8_file(tmp_path / "t.safetensors", sd, family, kind, prefix)
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop.models.block_loading"):
        for dtype in (torch.float32, torch.bfloat16):
            model = bl.load_by_block(cls, config, files, family, "original", bl.Placement("none", dtype, "cpu"))
            got = _as_original(model, family)
            assert got.keys() == ref.keys()
            assert [k for k in ref if not torch.equal(got[k], ref[k].to(dtype))] == []
    assert not caplog.records
    if kind in ("scaled", "comfy_quant"):  # what the scales change: the fp8 values are hundreds of times the weights
        from safetensors import safe_open
        with safe_open(str(files[0]), "pt") as f:
            raw = {k: f.get_tensor(prefix + k).float() for k in ref if f.get_slice(prefix + k).get_dtype() == "F8_E4M3"}
        assert len(raw) > 10 and all(raw[k].abs().amax() > 100 * ref[k].abs().amax() for k in raw)
        assert sum(any(part in k for part in SPLIT_ROWS) for k in raw) >= 3  # per-row scales on moved rows


def test_a_plain_e4m3_file_under_fp8_storage_keeps_the_files_weights_bit_for_bit(dirs, tmp_path):
    """``base_quant=fp8`` on a plain e4m3fn file: read in bf16 (which holds every e4m3 value exactly), then stored in
    e4m3 by layerwise casting, every Linear weight is the file's own fp8 value again; the ones layerwise casting
    leaves in bf16 (the AdaLN modulation) hold it exactly too."""
    cls, config, sd = _saved(dirs["flux"])
    files, ref = _fp8_file(tmp_path / "flux1-dev-fp8.safetensors", sd, "flux", "plain")
    model = bl.load_by_block(cls, config, files, "flux", "original", bl.Placement("none", torch.bfloat16, "cpu"))
    assert quant.store_fp8(model, torch.bfloat16) > 0 and quant.is_fp8(model)
    got = flow_layout.flux_to_original({k: v.float() for k, v in model.state_dict().items()})
    weights = [k for k in ref if k.endswith(".weight") and ref[k].dim() == 2]
    assert len(weights) > 10 and [k for k in weights if not torch.equal(got[k], ref[k])] == []


def test_a_scaled_fp8_flux_file_loads_int8_with_block_swap_through_load_components(dirs, tmp_path, cpu_quant):
    """``--model flux1-dev-fp8-scaled.safetensors --set model_components=DIR base_quant=int8 block_swap=1``: the
    scaled weights read block by block, quantized as they are read (the host block on the CPU), equal the int8 of
    the same weights read from a full-precision file."""
    from safetensors.torch import save_file

    from lowmem_alignprop.settings.config import Config

    cls, config, sd = _saved(dirs["flux"])
    files, ref = _fp8_file(tmp_path / "flux1-fp8-scaled.safetensors", sd, "flux", "scaled", "model.diffusion_model.")
    save_file({k: v.contiguous() for k, v in ref.items()}, str(tmp_path / "full.safetensors"))
    full = bl.load_by_block(cls, config, [tmp_path / "full.safetensors"], "flux", "original", CPU).state_dict()
    comps, calls = _load_int8_swapping_one(Config(model=str(files[0]), model_components=str(dirs["flux"]),
                                                  base_quant="int8", block_swap=1))
    assert calls == ["cpu", "cpu:0", "cpu:0", "cpu:0"]  # the host block, two resident blocks, the rest
    reference = _int8_reference(cls, config, full).state_dict()
    got = comps.unet.state_dict()
    assert quant.count_quantized(comps.unet)["int8"] > 0 and got.keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in got.items() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("bad, needle", [
    ("missing", "tensors missing"),  # a tensor short: diffusers' loader would have been tried, scales dropped
    ("column_scale", "is not a scale of a weight's rows"),  # one scale per input column: not ComfyUI's format
    ("stray_scale", "scales no weight of this model"),  # a scale of a layer the file does not have
])
def test_a_scaled_fp8_file_that_does_not_fit_is_one_line_and_never_reaches_diffusers(dirs, tmp_path, capsys, bad,
                                                                                    needle):
    """A scaled file the block reader cannot read stops with one line naming the fix (exit 2, nothing written):
    diffusers' from_single_file, the fallback for other files, loads scaled fp8 files without their scales (SD3:
    weights hundreds of times too large, no error)."""
    from safetensors.torch import save_file

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.models import flow_loading

    *_, sd = _saved(dirs["sd3"])
    path = tmp_path / "sd3.5_fp8_scaled.safetensors"
    if bad == "missing":
        _fp8_file(path, sd, "sd3", "scaled", drop="final_layer.linear.bias")
    else:
        tensors, _ = _fp8_original(sd, "sd3", "scaled")
        key = next(k for k in tensors if k.endswith(".scale_weight"))
        if bad == "column_scale":
            tensors[key] = torch.full((tensors[key[:-len("scale_weight")] + "weight"].shape[1],), 1e-3)
        else:
            tensors["joint_blocks.9.x_block.attn.qkv.scale_weight"] = torch.ones(())
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    whole = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flow_loading, "_whole_single_file", lambda *a, **kw: whole.append(a))
        rc = main(["--profile", "cpu", "--set", "resolution=32", "--set", "sample_steps=2", "--set", "k=1",
                   "--model", str(path), "--set", f"model_components={dirs['sd3']}", "--output-dir",
                   str(tmp_path / "run")])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert rc == 2 and len(lines) == 1 and "is a scaled fp8 checkpoint" in lines[0] and needle in lines[0], lines
    assert "model_components" in lines[0] and not whole and not (tmp_path / "run").exists()

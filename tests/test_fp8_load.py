"""base_quant=fp8 at load (issue 18): an SD3/FLUX transformer is stored in fp8 block by block as it is read from a
checkpoint or drawn with random weights, never all in full precision on the card.

* While the trainer reads a checkpoint (``load_components`` with a device) and while an architecture is drawn
  (``materialize_meta``), the full-precision bytes of the layers fp8 stores never exceed the largest block's plus
  the LoRA targets' (those wait for LoRA: peft gives a new adapter its base layer's dtype); when loading is done
  only the targets and the embedders outside the blocks are left (the run's fingerprint is of the weights as read),
  and none after ``apply_memory_features``.
* The state after ``apply_memory_features`` is bit for bit today's (the whole model in the compute dtype, LoRA,
  then ``enable_layerwise_casting`` on the whole model): the same layers in fp8 with the same bytes, the same fp32
  adapters, the same hooks, the same forward output.
* The planner's load stage counts the targets and embedders in the compute dtype: exactly the measured bytes on the
  tiny FLUX, and FLUX.1's 2.56 GB (266 projections of 3072 x 3072 and 45M embedder weights at one more byte) on the
  meta model.
"""

from __future__ import annotations

import types

import pytest
import torch
from flowmodels import build_tiny_flux_dir, build_tiny_sd3_dir
from torch import nn

from lowmem_alignprop.memory import quant
from lowmem_alignprop.memory.block_swap import swappable_blocks
from lowmem_alignprop.models import block_loading as bl
from lowmem_alignprop.models import flow
from lowmem_alignprop.models.lora_layers import FLOW_ATTENTION
from lowmem_alignprop.settings.config import Config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8load")
    return {"flux": build_tiny_flux_dir(root / "flux", single_layers=2), "sd3": build_tiny_sd3_dir(root / "sd3")}


def _cfg(directory, base_quant: str = "fp8", **kw) -> Config:
    return Config(model=str(directory), base_quant=base_quant, unet_checkpointing="blocks",
                  **{"resolution": 32, **kw}).validate()  # the tiny models' size (SD3's embeddings reach 64 px)


def _meta_transformer(directory):
    """The folder's transformer architecture, empty on meta (as the shipped architectures are built)."""
    import diffusers
    from accelerate import init_empty_weights

    cls = diffusers.DiffusionPipeline.from_pretrained(directory).transformer.__class__
    config = cls.load_config(directory / "transformer")
    with init_empty_weights():
        return cls.from_config(config)


def _full_precision_bytes(model) -> int:
    """Bytes of the layers fp8 stores (quant.fp8_linears) that exist and are not in fp8 yet."""
    return sum(t.numel() * t.element_size() for _, m in quant.fp8_linears(model) for t in (m.weight, m.bias)
               if t is not None and not t.is_meta and t.dtype != quant.FP8)


def _bounds(directory, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(the largest block's fp8 layers, the LoRA targets', the ones outside the blocks, all fp8 layers) in ``dtype``,
    bytes, from the meta model."""
    model = _meta_transformer(directory).to(dtype)
    size = {id(m): sum(t.numel() * dtype.itemsize for t in (m.weight, m.bias) if t is not None)
            for _, m in quant.fp8_linears(model)}
    blocks = swappable_blocks(model)
    block = max(sum(size.get(id(m), 0) for m in b.modules()) for b in blocks)
    targets = sum(size[id(m)] for n, m in quant.fp8_linears(model) if quant.lora_target(n, FLOW_ATTENTION))
    rest = sum(size.values()) - sum(size.get(id(m), 0) for b in blocks for m in b.modules())
    return block, targets, rest, sum(size.values())


@pytest.fixture
def spy(monkeypatch):
    """The full-precision bytes of the model being filled, each time a part of it is about to be stored in fp8."""
    seen = []
    store = quant.store_fp8_part

    def spying(model, *a, **kw):
        seen.append(_full_precision_bytes(model))
        return store(model, *a, **kw)

    monkeypatch.setattr(quant, "store_fp8_part", spying)
    return seen


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_checkpoint_is_read_with_one_block_and_the_lora_targets_in_full_precision(dirs, spy, family):
    """The trainer's read (load_components with its device): before each block is stored the full-precision bytes are
    at most the largest block's plus the targets' (all of them: over 1.5 times that here); after the read only the
    targets and the rest outside the blocks are left, with the fingerprint of the weights as read (bf16), and
    apply_memory_features stores them too."""
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.step.rollout import apply_memory_features

    from lowmem_alignprop.run.base_fingerprint import fingerprint

    block, targets, rest, whole = _bounds(dirs[family], torch.bfloat16)
    cfg = _cfg(dirs[family])
    comps = load_components(cfg, torch.bfloat16, CPU)
    assert len(spy) == len(swappable_blocks(comps.unet))  # each block as it is read
    assert max(spy) <= block + targets < whole / 1.5
    assert _full_precision_bytes(comps.unet) == targets + rest and targets > 0 and rest > 0
    bf16 = load_components(_cfg(dirs[family], "none"), torch.bfloat16, CPU)
    assert fingerprint(cfg, comps.unet) == fingerprint(cfg, bf16.unet)
    apply_memory_features(comps, cfg, CPU, torch.bfloat16)
    assert _full_precision_bytes(comps.unet) == 0 and quant.is_fp8(comps.unet)


def test_an_architecture_is_drawn_with_one_block_and_the_lora_targets_in_full_precision(dirs, spy):
    """materialize_meta with base_quant=fp8 (the trainer's ``--model flux``): the same bound while drawing, with
    block swap's host block too (drawn, moved to the CPU, stored there)."""
    from lowmem_alignprop.models.family import materialize_meta

    block, targets, rest, whole = _bounds(dirs["flux"], torch.bfloat16)
    for host_blocks in (0, 1):
        spy.clear()
        model = _meta_transformer(dirs["flux"])
        comps = types.SimpleNamespace(unet=model, vae=nn.Linear(1, 1), text_encoders=lambda: (), meta=True)
        materialize_meta(comps, CPU, base_quant="fp8", dtype=torch.bfloat16, host_blocks=host_blocks)
        assert len(spy) == len(swappable_blocks(model)) and max(spy) <= block + targets < whole / 1.5
        assert _full_precision_bytes(model) == targets + rest


# --------------------------------------------------------------------------------------------------
# the trained state is today's
# --------------------------------------------------------------------------------------------------

def _todays_fp8(model, dtype) -> None:
    """What store_fp8 did before fp8 was stored at load: diffusers' layerwise casting on the whole model."""
    model.enable_layerwise_casting(storage_dtype=quant.FP8, compute_dtype=dtype,
                                   skip_modules_classes=quant._FP8_SKIP_CLASSES)


def _hooked(model, hook: str) -> set[str]:
    return {n for n, m in model.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook(hook) is not None}


def _assert_same_state(ours, ref) -> None:
    """Every tensor of the same dtype with the same bytes, the same layers hooked, the adapters fp32."""
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))]
    assert differ == []
    assert sum(v.dtype == quant.FP8 for v in a.values()) > 10
    assert all(v.dtype == torch.float32 for k, v in a.items() if "lora_" in k)
    for hook in ("layerwise_casting", "peft_autocast_disable"):
        assert _hooked(ours, hook) == _hooked(ref, hook) != set()


def _flux_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 64, 64, generator=g), timestep=torch.ones(1) * 0.5,
                guidance=torch.full((1,), 3.5), pooled_projections=torch.randn(1, 32, generator=g),
                encoder_hidden_states=torch.randn(1, 16, 32, generator=g), txt_ids=torch.zeros(16, 3),
                img_ids=torch.zeros(64, 3), return_dict=False)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_the_state_after_apply_memory_features_is_todays_bit_for_bit(dirs, family):
    """A checkpoint in bf16 read by the trainer with fp8 at load, then apply_memory_features, against today's path:
    the same checkpoint in bf16, LoRA, layerwise casting on the whole model. LoRA's init is rounded to bf16 in both
    (peft gives an adapter its base layer's dtype; fp8 would round it further)."""
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.step.rollout import apply_memory_features

    cfg = _cfg(dirs[family])
    comps = load_components(cfg, torch.bfloat16, CPU)
    params, _ = apply_memory_features(comps, cfg, CPU, torch.bfloat16)
    plain = _cfg(dirs[family], "none")
    ref = load_components(plain, torch.bfloat16, CPU)
    ref_params, _ = apply_memory_features(ref, plain, CPU, torch.bfloat16)
    _todays_fp8(ref.unet, torch.bfloat16)
    _assert_same_state(comps.unet, ref.unet)
    assert len(params) == len(ref_params) > 0 and all(torch.equal(p, q) for p, q in zip(params, ref_params))
    if family == "flux":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer runs it
            out, ref_out = comps.unet.eval()(**_flux_inputs())[0], ref.unet.eval()(**_flux_inputs())[0]
        assert torch.equal(out, ref_out)


def test_a_drawn_architecture_after_lora_is_todays_bit_for_bit(dirs):
    """materialize_meta with fp8, LoRA, store_fp8 against the same draw without fp8, LoRA, whole-model casting."""
    from lowmem_alignprop.models.family import materialize_meta

    ours, ref = _meta_transformer(dirs["flux"]), _meta_transformer(dirs["flux"])
    comps = types.SimpleNamespace(unet=ours, vae=nn.Linear(1, 1), text_encoders=lambda: (), meta=True)
    materialize_meta(comps, CPU, base_quant="fp8", dtype=torch.bfloat16)
    bl.materialize_quantized(ref, CPU, "none", torch.bfloat16)  # materialize_meta's draw, block by block
    for model in (ours, ref):
        flow.add_flow_lora(model, 4, seed=0)
    assert quant.store_fp8(ours, torch.bfloat16) == len(quant.fp8_linears(ours))
    _todays_fp8(ref, torch.bfloat16)
    _assert_same_state(ours, ref)


# --------------------------------------------------------------------------------------------------
# the planner's load stage
# --------------------------------------------------------------------------------------------------

def test_the_planners_load_stage_counts_what_the_read_leaves(dirs, spy):
    """fp32 weights (mixed_precision=no), a GPU target with the prompts encoded on the CPU (so the load figure is the
    weights at load, not the encoding): the load stage is the weights at load plus one block's allowance plus the
    LoRA targets and the layers outside the blocks at three more bytes per weight than fp8, counted here per tensor
    (CUDA blocks of 512 bytes). The trainer's read leaves exactly that transformer: its fp8-stored size
    (quant.quantized_weight_bytes) plus those three bytes per weight; the per-block peak while reading is within
    the block allowance above it."""
    from lowmem_alignprop.measure import planner, weight_bytes
    from lowmem_alignprop.memory import allowances
    from lowmem_alignprop.models.loading import load_components

    kw = dict(resolution=32, sample_steps=4, k=2, guidance_scale=3.5, encode_on_cpu=True)
    cfg = _cfg(dirs["flux"], **kw)
    est, plain = planner.estimate(cfg, target="cuda"), planner.estimate(_cfg(dirs["flux"], "none", **kw), target="cuda")
    meta = _meta_transformer(dirs["flux"])
    in_blocks = {id(m) for b in swappable_blocks(meta) for m in b.modules()}
    waiting = [t for n, m in quant.fp8_linears(meta) if quant.lora_target(n, FLOW_ATTENTION)
               or id(m) not in in_blocks for t in (m.weight, m.bias) if t is not None]

    def rounded(n: int) -> int:
        return -(-n // allowances.CUDA_BLOCK) * allowances.CUDA_BLOCK
    extra = sum(rounded(4 * t.numel()) - rounded(t.numel()) for t in waiting)
    largest = weight_bytes._fp8_block_upcast_bytes(_with_lora(_meta_transformer(dirs["flux"])))  # one block, fp32
    load = est.stages["load"]
    assert load["on_device"] == plain.stages["load"]["on_device"] == ["unet", "lora", "vae"]
    assert load["allocated"] == sum(est.weights[n] for n in load["on_device"]) + largest + extra
    assert any("GiB at load" in n for n in est.notes) and not any("GiB at load" in n for n in plain.notes)
    comps = load_components(cfg, torch.float32, CPU)
    measured = sum(t.numel() * t.element_size() for t in list(comps.unet.parameters()) + list(comps.unet.buffers()))
    assert measured == quant.quantized_weight_bytes(meta, "fp8") + sum(3 * t.numel() for t in waiting)
    assert max(spy) <= _full_precision_bytes(comps.unet) + largest


def _with_lora(model):
    flow.add_flow_lora(model, Config().lora_rank, seed=0)
    return model


def test_flux_holds_its_lora_targets_and_embedders_in_bf16_at_load_on_the_card():
    """FLUX.1 on meta with LoRA, bf16 on a GPU: the load transient is its 266 attention projections (19 joint blocks x
    8, 38 single blocks x 3) of 3072 x 3072 weights and 3072 biases, and the 8 embedder layers outside the blocks
    (3072 outputs from 14656 inputs in all), at one byte more than fp8: 2,556,155,904 bytes; with block swap's first
    19 blocks (the joint ones) in host memory, the single blocks' 114 projections and the embedders."""
    from lowmem_alignprop.measure import counters, weight_bytes
    from lowmem_alignprop.memory import allowances
    from lowmem_alignprop.models import flow_loading as fl

    tr = fl.build_flow_components("flux", device="meta", dtype=torch.bfloat16, t5=False).transformer
    _with_lora(tr)
    comps = types.SimpleNamespace(unet=tr, family="flux")
    counter = counters.LiveBytes(round_to=allowances.CUDA_BLOCK)
    projection = 3072 * 3072 + 3072
    embedders = 3072 * (256 + 3072) * 2 + 3072 * (768 + 3072) + 3072 * 4096 + 3072 * 64 + 8 * 3072  # time, guidance,
    # pooled text, context, latents
    cfg = Config(model="flux", base_quant="fp8", unet_checkpointing="blocks")
    assert weight_bytes.fp8_load_bytes(cfg, comps, counter, cuda=True) == 266 * projection + embedders == 2_556_155_904
    swapped = Config(model="flux", base_quant="fp8", unet_checkpointing="blocks", block_swap=19)
    assert weight_bytes.fp8_load_bytes(swapped, comps, counter, cuda=True) == 114 * projection + embedders
    assert weight_bytes.fp8_load_bytes(Config(model="flux"), comps, counter, cuda=True) == 0


def test_sample_with_fp8_stores_the_rest_once_the_adapters_are_loaded(dirs, tmp_path, monkeypatch, fresh_log_handlers):
    """``sample --set base_quant=fp8`` reads the transformer as the trainer does (each block in fp8 but the LoRA
    targets and embedders) and, once its adapters are loaded, stores those too: the transformer it samples with has
    every fp8 layer in fp8 (no full-precision bytes left), its adapters loaded and not in fp8."""
    from lowmem_alignprop.cli import main
    from lowmem_alignprop.commands import flow_sample

    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(dirs["flux"])
    params = flow.add_flow_lora(pipe.transformer, rank=4, seed=1)
    with torch.no_grad():
        for p in params:
            p.add_(0.3)
    flow.save_flow_lora(FluxPipeline, pipe.transformer, tmp_path / "lora")
    placed, place = [], flow_sample.place_transformer

    def spying(pipe, cfg):
        place(pipe, cfg)
        tr = pipe.transformer
        placed.append((_full_precision_bytes(tr), sum(p.dtype != quant.FP8 for n, p in tr.named_parameters()
                                                      if "lora_" in n), quant.is_fp8(tr)))

    monkeypatch.setattr(flow_sample, "place_transformer", spying)
    rc = main(["sample", "--profile", "cpu", "--model", str(dirs["flux"]), "--set", "resolution=32", "--set",
               "sample_steps=2", "--set", "batch_size=1", "--set", "max_sequence_length=16", "--set",
               "guidance_scale=3.5", "--set", "base_quant=fp8", "--set", "unet_checkpointing=blocks", "--reward",
               "brightness", "--num-prompts", "1", "--images-per-prompt", "1", "--lora", str(tmp_path / "lora"),
               "--output-dir", str(tmp_path / "out")])
    assert rc == 0 and len(placed) == 1
    left, adapters, stored = placed[0]
    assert left == 0 and adapters > 0 and stored

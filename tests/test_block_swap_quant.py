"""Block swap with a quantized frozen base (issue 18): fp8 storage (diffusers' layerwise casting: plain float8
tensors) and bitsandbytes int8/nf4 (their scales travel with the weight), on the tiny FLUX/SD3 transformers.

* the loss and the LoRA gradients equal those without block swap (same ops on the same values: SAME_OPS);
* every swapped block is where it should be in every stage, no layer runs on its host copy, and bitsandbytes'
  backward (which keeps the layer's quantization state by reference, not as a saved tensor) reads the device copy
  its recompute made, never the host one;
* the bytes each block holds in host memory, and copies to the device per load, are the quantized sizes:
  :func:`quant.frozen_block_bytes` (analytic) = the host tensors = the device copies = what the layers hold while
  the block runs (:func:`quant.measured_weight_bytes`)."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.utils.checkpoint

from flowmodels import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from numerics import SAME_OPS, assert_rel_close
from test_block_swap import STEPS, K, _guard_layers, _loss_and_grads, _pipe

from lowmem_alignprop.memory import block_swap, quant, stages
from lowmem_alignprop.memory.block_swap import install, swappable_blocks
from lowmem_alignprop.models import flow
from lowmem_alignprop.models.sampling import enable_block_checkpointing
from lowmem_alignprop.settings.config import Config


def _quantized_pipe(name: str, mode: str):
    """The tiny pipeline of test_block_swap with its transformer's frozen base stored as ``mode``, in the trainer's
    order: int8/nf4 at load (before LoRA), fp8 after LoRA (the adapters stay fp32)."""
    if mode == "fp8":
        pipe, params = _pipe(name)
        quant.store_fp8(pipe.transformer, torch.float32)
        return pipe, params
    pipe = build_tiny_flux_pipeline(seed=0) if name == "flux" else build_tiny_sd3_pipeline(seed=0)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.vae.requires_grad_(False)
    quant.quantize_in_place(pipe.transformer, mode, torch.float32, device="cpu", quiet=True)
    params = flow.add_flow_lora(pipe.transformer, rank=4, seed=0)
    pipe.transformer.train()  # bitsandbytes' nf4 on the CPU runs in train mode (tests/test_quant.py)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    enable_block_checkpointing(pipe.transformer)
    return pipe, params


class _BackwardReads:
    """Wrap bitsandbytes' matmul backward: for each call, whether the quantization state it reads (int8: ``CB`` and
    ``SCB``; nf4: the packed weight and ``absmax``) is a host copy of block swap, or a device copy one of its loads
    made."""

    def __init__(self, monkeypatch, swap):
        from bitsandbytes.autograd import _functions as F

        self.host = {t.data_ptr() for ws in swap.weights for w in ws for t in w.host_tensors()}
        self.loaded: set[int] = set()
        self.reads = {"host": 0, "loaded": 0, "other": 0}
        copy = block_swap._copy

        def recording_copy(t, device):
            out = copy(t, device)
            self.loaded.add(out.data_ptr())
            return out

        monkeypatch.setattr(block_swap, "_copy", recording_copy)
        for cls, tensors in ((F.MatMul8bitFp, lambda ctx: (ctx.state.CB, ctx.state.SCB)),
                             (F.MatMul4Bit, lambda ctx: (ctx.tensors[1], ctx.state.absmax))):
            monkeypatch.setattr(cls, "backward", self._wrap(cls.backward, tensors))

    def _wrap(self, backward, tensors):
        def wrapped(ctx, *grads):
            ptrs = {t.data_ptr() for t in tensors(ctx)}
            kind = "host" if ptrs & self.host else "loaded" if ptrs <= self.loaded else "other"
            self.reads[kind] += 1
            return backward(ctx, *grads)
        return staticmethod(wrapped)


@pytest.mark.parametrize("name, mode, early_stop", [("flux", "fp8", True), ("sd3", "fp8", False),
                                                    ("flux", "int8", False), ("sd3", "int8", True),
                                                    ("flux", "nf4", False)])
def test_same_loss_and_lora_gradients_with_a_quantized_base(name, mode, early_stop, request, monkeypatch):
    if mode != "fp8":
        request.getfixturevalue("cpu_quant")
    pipe, params = _quantized_pipe(name, mode)
    ref_loss, ref = _loss_and_grads(pipe, params)
    blocks = swappable_blocks(pipe.transformer)
    swap = install(pipe.transformer, len(blocks), "cpu")  # every block swapped
    reads = _BackwardReads(monkeypatch, swap) if mode != "fp8" else None
    bad, handles = _guard_layers(swap)
    # a recompute that runs its block to the end (no early stop) unloads the block before that block's backward:
    # bitsandbytes' backward must still find the device copy
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        loss, grads = _loss_and_grads(pipe, params)
    for h in handles:
        h.remove()
    assert bad == []  # no layer ran on its host copy
    assert_rel_close(loss, ref_loss, SAME_OPS, "loss")
    assert_rel_close(grads, ref, SAME_OPS, "LoRA gradients")  # fails on an all-zero reference
    assert swap.most_resident <= 2
    if reads is not None:  # the swapped layers' backward read the copies their recompute loaded, never the host's
        assert reads.reads["host"] == 0 and reads.reads["loaded"] > 0, reads.reads
    swap.release()
    assert swap.where == ["cpu"] * len(blocks)


@pytest.mark.parametrize("mode", ["fp8", "int8", "nf4"])
def test_placement_and_bytes_of_every_quantized_block_in_every_stage(mode, request):
    """FLUX's double and single block swapped, with ``mode``: where each block is in each stage (the sequence of
    test_block_swap), and its bytes on the host and in flight are the quantized ones."""
    if mode != "fp8":
        request.getfixturevalue("cpu_quant")
    pipe, params = _quantized_pipe("flux", mode)
    tr = pipe.transformer
    expected = quant.frozen_block_bytes(tr, swappable_blocks(tr)[:2], mode)
    lora = [sum(p.numel() * p.element_size() for p in b.parameters() if p.requires_grad) for b in
            swappable_blocks(tr)[:2]]
    swap = install(tr, 2, "cpu")
    assert swap.host_bytes == expected
    # against fp32: int8 1 byte, nf4 ~0.5 byte per Linear weight (+ scales; biases stay fp32); fp8 leaves the
    # modulation layers (half of a tiny FLUX block's weights) in fp32
    bound = {"fp8": 0.6, "int8": 0.35, "nf4": 0.2}[mode]
    assert all(q < bound * f for q, f in zip(expected, _fp32_bytes(swap.blocks)))
    if mode == "fp8":  # the host copies are the stored float8 tensors of exactly the layers fp8_linears names
        fp8 = {id(t) for _, m in quant.fp8_linears(tr) for t in (m.weight, m.bias) if t is not None}
        assert all((w.host.dtype == quant.FP8) == (id(w.p) in fp8) for ws in swap.weights for w in ws)
        assert any(id(w.p) in fp8 for ws in swap.weights for w in ws)
    in_flight = {0: [], 1: []}

    def measure(i):
        def hook(module, args):  # after block swap's own pre-hook: the block's copies are loaded
            copies = swap.copies[i]
            assert not {t.data_ptr() for t in copies} & {t.data_ptr() for w in swap.weights[i]
                                                          for t in w.host_tensors()}
            in_flight[i].append((sum(t.untyped_storage().nbytes() for t in copies),
                                 quant.measured_weight_bytes(module) - lora[i]))
        return hook

    handles = [b.register_forward_pre_hook(measure(i)) for i, b in enumerate(swap.blocks)]
    marks = []

    def stage(name):
        marks.append((len(swap.log), name))
        return torch.enable_grad() if name == stages.BACKWARD else contextlib.nullcontext()

    _loss_and_grads(pipe, params, stage=stage)
    for h in handles:
        h.remove()
    for i in (0, 1):  # every load, forward and recompute: the quantized bytes, as the layers hold them
        assert in_flight[i] and set(in_flight[i]) == {(expected[i], expected[i])}, (i, set(in_flight[i]))
    start = dict((name, j) for j, name in marks)
    call = [(0, "device", "forward"), (1, "device", "forward"), (0, "cpu", "forward"), (1, "cpu", "forward")]
    assert swap.log[start[stages.SAMPLE_NOGRAD]:start[stages.SAMPLE_GRAD]] == call * (STEPS - K)
    assert swap.log[start[stages.SAMPLE_GRAD]:start[stages.BACKWARD]] == call * K
    loads = [(i, phase) for i, where, phase in swap.log[start[stages.BACKWARD]:] if where == "device"]
    assert all(phase == "backward" for _, phase in loads) and [i for i, _ in loads][:4] == [0, 1, 1, 0]
    swap.release()
    # at rest the layers hold the host copies again: the same bytes (int8: the row scales, nf4: absmax and the
    # double quantization's scales with them)
    assert [quant.measured_weight_bytes(b) - n for b, n in zip(swap.blocks, lora)] == expected


def _fp32_bytes(blocks) -> list[int]:
    """Bytes of each block's frozen weights unquantized, in fp32 (the tests' weight dtype)."""
    return [sum(4 * (m.in_features * m.out_features if type(p).__name__ in ("Int8Params", "Params4bit") else p.numel())
                for m in b.modules() for p in m.parameters(recurse=False) if not p.requires_grad) for b in blocks]


# -- the planner -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from flowmodels import build_tiny_flux_dir

    return build_tiny_flux_dir(tmp_path_factory.mktemp("swapquant") / "flux")


def _real_swap(model_dir, mode):
    """The tiny FLUX transformer as the trainer holds it on a GPU (bf16 frozen weights), stored as ``mode``, with
    its two blocks swapped; and the loads (block, phase) of one rollout like the planner's (T=3, K=2)."""
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer", torch_dtype=torch.bfloat16)
    if mode in quant.BNB_MODES:
        quant.quantize_in_place(tr, mode, torch.bfloat16, device="cpu", quiet=True)
    flow.add_flow_lora(tr, rank=4, seed=0)
    if mode == "fp8":
        quant.store_fp8(tr, torch.bfloat16)
    return tr, install(tr, 2, "cpu")


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_the_planner_counts_swapped_blocks_at_their_quantized_size(flux_dir, cpu_quant, mode):
    """plan on a GPU target with base_quant + block_swap: the pinned host memory is the swapped blocks' stored bytes
    (analytic = what the real BlockSwap holds), the resident weights drop by exactly those bytes (to the CUDA
    allocator's 512-byte rounding), and PCIe carries each block's stored bytes once per load: the loads of the
    real rollout (test_block_swap's sequence) times the stored bytes."""
    from lowmem_alignprop.measure import planner
    from lowmem_alignprop.memory.allowances import CUDA_BLOCK

    base = dict(model=str(flux_dir), resolution=64, sample_steps=STEPS, k=K, guidance_scale=3.5, batch_size=1,
                unet_checkpointing="blocks", mixed_precision="bf16", base_quant=mode, offload_frozen=False,
                prompts="simple_animals")
    kept = planner.estimate(Config(**base).validate(), target="cuda")
    est = planner.estimate(Config(**base, block_swap=2).validate(), target="cuda")
    tr, swap = _real_swap(flux_dir, mode)
    stored = quant.frozen_block_bytes(tr, swap.blocks, mode)
    assert est.host_pinned == sum(swap.host_bytes) == sum(stored) > 0
    tensors = sum(1 for ws in swap.weights for _ in ws)
    drop = kept.weights["unet"] - est.weights["unet"]
    assert 0 <= drop - est.host_pinned < CUDA_BLOCK * tensors  # each stored tensor rounded up to 512 bytes
    # fp8: the LoRA targets wait in bf16 while loading (tests/test_fp8_load.py), on the card for the kept blocks only
    swapped = {id(m) for b in swap.blocks for m in b.modules()}
    held = sum(-(-2 * t.numel() // CUDA_BLOCK) * CUDA_BLOCK - -(-t.numel() // CUDA_BLOCK) * CUDA_BLOCK
               for n, m in quant.fp8_linears(tr) if n.endswith(".base_layer") and id(m) in swapped
               for t in (m.weight, m.bias) if t is not None) if mode == "fp8" else 0
    assert (held > 0) == (mode == "fp8")
    assert kept.stages["load"]["allocated"] - est.stages["load"]["allocated"] == drop + held
    # one real rollout's loads: T transformer calls in forward, and backward's recomputes
    pipe, params = _quantized_pipe("flux", mode)
    swap_real = install(pipe.transformer, 2, "cpu")
    _loss_and_grads(pipe, params)
    loads = [i for i, where, _ in swap_real.log if where == "device"]
    rollout = (stages.SAMPLE_NOGRAD, stages.SAMPLE_GRAD, stages.BACKWARD)  # (encoding moves the text encoder)
    pcie = sum(est.work[name]["pcie_bytes"] for name in rollout)
    assert pcie == sum(swap.host_bytes[i] for i in loads), (pcie, loads)
    assert sum(kept.work[name]["pcie_bytes"] for name in rollout) == 0


def test_the_planner_matches_the_cpu_step_with_fp8_and_block_swap(flux_dir):
    """The fake-tensor estimate against the real CPU step (as test_flow_train's 5% test) with fp8 storage and both
    blocks swapped: the blocks in flight are counted at their fp8 size. The peak stage within 5%; every stage at or
    above the measurement (the planner adds the largest block's upcast layers to every stage: an allowance)."""
    from lowmem_alignprop.measure import planner, shared_step

    cfg = Config(model=str(flux_dir), resolution=32, sample_steps=4, k=2, batch_size=2, prompts="simple_animals",
                 guidance_scale=3.5, unet_checkpointing="blocks", base_quant="fp8", block_swap=2).validate()
    est, meas = planner.estimate(cfg, target="cpu"), shared_step.measure_cpu_step(cfg)
    assert est.peak_stage == meas["peak_stage"]
    e, m = est.peak_allocated, meas["peak_allocated"]
    assert abs(e - m) <= 0.05 * m, f"peak: estimate {e / 2**20:.3f} MiB vs measured {m / 2**20:.3f} MiB"
    for name in stages.STEP_STAGES:
        assert est.stages[name]["allocated"] >= meas["stages"][name], name


def test_the_cheapest_change_search_proposes_block_swap_with_a_quantized_base(flux_dir, monkeypatch):
    """plan's candidates on a GPU target: block swap (half the blocks, with the per-block checkpointing it needs)
    after nf4 when the base is full precision, and still with a quantized base; half the blocks still on the card
    more when some are swapped (before a lower resolution, which changes the task); none once all are."""
    from lowmem_alignprop.measure import fit_changes

    base = dict(model=str(flux_dir), resolution=64, mixed_precision="bf16", guidance_scale=3.5)
    swap = {"block_swap": 1, "unet_checkpointing": "blocks"}  # the tiny FLUX has 2 blocks
    changes = [c for _, c in fit_changes.candidate_changes(Config(**base).validate(), "cuda")]
    assert swap in changes and changes.index({"base_quant": "nf4"}) < changes.index(swap)
    quantized = [c for _, c in fit_changes.candidate_changes(Config(**base, base_quant="int8").validate(), "cuda")]
    assert swap in quantized and not any("base_quant" in c for c in quantized)
    some = [c for _, c in fit_changes.candidate_changes(Config(**{**base, "resolution": 512}, base_quant="int8",
                                                           unet_checkpointing="blocks", block_swap=1).validate(), "cuda")]
    assert {"block_swap": 2} in some and some.index({"block_swap": 2}) < some.index({"resolution": 384})
    labels = {c["block_swap"]: lab for lab, c in fit_changes.candidate_changes(
        Config(**{**base, "resolution": 512}, base_quant="int8", unet_checkpointing="blocks", block_swap=1).validate(),
        "cuda") if "block_swap" in c}
    assert labels[2].startswith("block swap 2 of 2 blocks, was 1 ("), labels
    # a search's step on the way (block_swap=1 its own earlier try): "was" is the user's value, here none
    step = Config(**{**base, "resolution": 512}, base_quant="int8", unet_checkpointing="blocks", block_swap=1)
    labels = {c["block_swap"]: lab for lab, c in fit_changes.candidate_changes(
        step.validate(), "cuda", start=Config(**base, base_quant="int8").validate()) if "block_swap" in c}
    assert labels[2].startswith("block swap 2 of 2 blocks (") and "was" not in labels[2], labels
    swapped = Config(**base, base_quant="int8", unet_checkpointing="blocks", block_swap=2).validate()
    assert not any("block_swap" in c for _, c in fit_changes.candidate_changes(swapped, "cuda"))
    assert not any("block_swap" in c for _, c in fit_changes.candidate_changes(Config(**base).validate(), "cpu"))
    # half the blocks still on the card: with 2 blocks that is 1 more, whatever the rule; a model of 10 blocks with 2
    # swapped grows to 2 + 8 // 2 = 6 (one block more a try crept to the limit, an estimate each)
    monkeypatch.setattr(fit_changes, "swappable_count", lambda cfg: 10)
    labels = {c["block_swap"]: lab for lab, c in fit_changes.candidate_changes(
        Config(**{**base, "resolution": 512}, base_quant="int8", unet_checkpointing="blocks", block_swap=2).validate(),
        "cuda") if "block_swap" in c}
    assert list(labels) == [6] and labels[6].startswith("block swap 6 of 10 blocks, was 2 ("), labels


def test_counting_swappable_blocks_builds_and_copies_no_model(flux_dir, monkeypatch):
    """The search asks how many blocks can swap for every suggestion it tries: the count reads the cached meta model
    (built once per model and dtype), never a fresh copy of it, and is the copy's count."""
    from lowmem_alignprop.measure import fit_changes, meta_models

    cfg = Config(model=str(flux_dir), resolution=64, mixed_precision="bf16", guidance_scale=3.5).validate()
    n = len(swappable_blocks(meta_models.meta_components(cfg, torch.bfloat16).unet))  # builds it (cached) and copies
    builds, copies = [], []
    build, meta = meta_models._flow_meta_components, meta_models.meta_components
    monkeypatch.setattr(meta_models, "_flow_meta_components", lambda *a: builds.append(a) or build(*a))
    monkeypatch.setattr(meta_models, "meta_components", lambda *a: copies.append(a) or meta(*a))
    counts = [fit_changes.swappable_count(dataclasses.replace(cfg, batch_size=b, resolution=r))
              for b in (1, 2) for r in (64, 128)]
    assert counts == [n] * 4 and n == 2 and builds == [] and copies == []


@pytest.mark.parametrize("mode", ["none", "int8"])
def test_a_meta_transformer_leaves_the_swapped_blocks_in_host_memory_as_it_is_drawn(cpu_quant, mode):
    """The random-weight path (sd35m/sd35l/flux) with block_swap: each swapped block is drawn, then moved to the CPU
    (and quantized there) before the next is drawn; the resident blocks and the rest are quantized for the device,
    and the final pass leaves the host blocks where they are. ``cpu:0`` stands for the GPU (an argument distinct
    from ``cpu``). The weights are those drawn without block swap."""
    from diffusers import FluxTransformer2DModel

    from lowmem_alignprop.models.block_loading import materialize_quantized

    config = build_tiny_flux_pipeline().transformer.config
    drawn = {}
    for host_blocks in (0, 1):
        with torch.device("meta"):
            tr = FluxTransformer2DModel.from_config(config)
        blocks = swappable_blocks(tr)
        calls, moves = [], []
        quantize, to = quant.quantize_in_place, torch.nn.Module.to

        def spy_quantize(module, *a, device=None, stay=(), **kw):
            calls.append((blocks.index(module) if module in blocks else "model", str(device), list(stay)))
            return quantize(module, *a, device=device, stay=stay, **kw)

        def spy_to(module, *a, **kw):
            if any(module is b for b in blocks) and a and str(a[0]) == "cpu":
                moves.append(blocks.index(module))
            return to(module, *a, **kw)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(quant, "quantize_in_place", spy_quantize)
            mp.setattr(torch.nn.Module, "to", spy_to)
            materialize_quantized(tr, torch.device("cpu", 0), mode, torch.float32, seed=0, host_blocks=host_blocks)
        assert sorted(set(moves)) == list(range(host_blocks))  # the host block went to the CPU as it was drawn
        if mode == "int8":
            assert calls == [(j, "cpu" if j < host_blocks else "cpu:0", []) for j in range(len(blocks))] + \
                [("model", "cpu:0", blocks[:host_blocks])]
        assert not any(t.is_meta for t in list(tr.parameters()) + list(tr.buffers()))
        drawn[host_blocks] = {k: v.float() if v.is_floating_point() else v for k, v in tr.state_dict().items()
                              if isinstance(v, torch.Tensor)}
    assert drawn[0].keys() == drawn[1].keys()
    assert all(torch.equal(drawn[0][k], drawn[1][k]) for k in drawn[0])


def test_plan_fastest_offers_block_swap_levels(flux_dir):
    """plan --fastest --allow-task-changes's block swap levels (alone, then with int8/nf4): half and seven eighths
    of the blocks, with the per-block checkpointing block swap needs; none off a GPU or once set."""
    from lowmem_alignprop.measure import fastest

    cfg = Config(model=str(flux_dir), resolution=64, mixed_precision="bf16", guidance_scale=3.5).validate()
    assert fastest.swap_ladder(cfg, "cuda") == [{"block_swap": 1, "unet_checkpointing": "blocks"}]  # 2 blocks
    assert fastest.swap_ladder(cfg, "cpu") == []
    swapped = Config(model=str(flux_dir), resolution=64, unet_checkpointing="blocks", block_swap=1).validate()
    assert fastest.swap_ladder(swapped, "cuda") == [] and "block_swap" in fastest.PROFILE_FIELDS

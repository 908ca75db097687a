"""Block swap (lowmem_alignprop/memory/block_swap.py): N frozen blocks live in CPU memory and are copied to the device
only around their use. On the CPU build the copies are CPU -> CPU, with the same placement logic, so these tests
check what it does: the loss and the LoRA gradients are those without it, every swapped block is where it should
be in every stage (at rest on the CPU, on the device while it runs, in forward, in the checkpoint recompute of
backward), no layer ever runs on its CPU copy, and LoRA weights never move."""

import contextlib
import re

import pytest
import torch

from flowmodels import FLOW_RESOLUTION, build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from numerics import SAME_OPS, assert_rel_close

from lowmem_alignprop.memory import stages
from lowmem_alignprop.memory.block_swap import BlockSwap, install, swappable_blocks
from lowmem_alignprop.models import flow
from lowmem_alignprop.models.sampling import enable_block_checkpointing

RES = FLOW_RESOLUTION
STEPS, K = 3, 2


def _pipe(name, layers: str = "attention", sd3_blocks: int = 2):
    pipe = build_tiny_flux_pipeline(seed=0) if name == "flux" else build_tiny_sd3_pipeline(seed=0, layers=sd3_blocks)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # built in code: train mode, and T5's dropout would make two runs differ
    pipe.vae.requires_grad_(False)
    params = flow.add_flow_lora(pipe.transformer, rank=4, seed=0, layers=layers)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in params:  # lora_B starts at zero: give it values so the LoRA path matters
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    enable_block_checkpointing(pipe.transformer)  # block swap streams blocks one at a time in backward too
    return pipe, params


def _loss_and_grads(pipe, params, stage=None):
    gs = 3.5 if flow.family_of(pipe.transformer) == flow.FLUX else 4.0
    emb = flow.encode_prompts(pipe, ["a photo of a cat"], "cpu", guidance_scale=gs, max_sequence_length=16)
    lat, ids = flow.initial_latents(pipe.transformer, pipe.vae, 1, RES, RES, torch.Generator().manual_seed(0))
    lh, lw = flow.latent_size(pipe.vae, RES, RES, flow.family_of(pipe.transformer))
    flow.set_flow_timesteps(pipe.scheduler, pipe.transformer, STEPS, lh, lw)
    lat = flow.rollout(pipe.transformer, pipe.scheduler, lat, emb, k=K, guidance_scale=gs, img_ids=ids, stage=stage)
    loss = -flow.decode(pipe.vae, lat, height=RES, width=RES).mean()
    with (stage or (lambda n: torch.enable_grad()))(stages.BACKWARD):
        grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


@pytest.mark.parametrize("name, layers", [("flux", "attention"), ("sd3", "attention"), ("flux", "attention+ff")])
def test_same_loss_and_lora_gradients_with_block_swap(name, layers):
    """lora_layers=attention+ff: the feed-forward LoRA inside each swapped block stays where it trains too."""
    pipe, params = _pipe(name, layers)
    ref_loss, ref = _loss_and_grads(pipe, params)
    blocks = swappable_blocks(pipe.transformer)
    swap = install(pipe.transformer, len(blocks), "cpu")  # every block swapped
    loss, grads = _loss_and_grads(pipe, params)
    assert_rel_close(loss, ref_loss, SAME_OPS, "loss")
    assert_rel_close(grads, ref, SAME_OPS, "LoRA gradients")  # fails on an all-zero reference
    assert swap.most_resident <= 2  # the block computing and the prefetched one, never more
    swap.release()
    assert swap.where == ["cpu"] * len(blocks)


def _guard_layers(swap):
    """A pre-hook on every layer of the swapped blocks: it records any call made while the layer's frozen weights
    are their CPU copy (on a GPU that call would fail; on the CPU it would silently work)."""
    host = {id(p): h for pairs in swap.host for p, h in pairs}
    bad, handles = [], []
    for block in swap.blocks:
        for m in block.modules():
            own = [p for p in m.parameters(recurse=False) if id(p) in host]
            if own:
                def hook(mod, args, own=own):
                    if any(p.data.data_ptr() == host[id(p)].data_ptr() for p in own):
                        bad.append(type(mod).__name__)
                handles.append(m.register_forward_pre_hook(hook))
    return bad, handles


def _poison_host_copies(swap):
    """The swapped weights' CPU copies hold NaN and only their device copies (``swap.copy``) the real values: any
    compute with a CPU copy, forward or backward (which _guard_layers does not see), gives a NaN."""
    real = {}
    for ws in swap.weights:
        for w in ws:
            real[w.host.data_ptr()] = w.host.clone()
            w.host.fill_(float("nan"))
    swap.copy = lambda t: real[t.data_ptr()].clone()


def _forward_call(n):
    """The log of one forward call through n swapped blocks: block 0 comes, block 1 is prefetched while it runs,
    each leaves after its use while the next one's pre-hook prefetches the one after it."""
    log = [(0, "device"), (1, "device"), (0, "cpu")] if n > 1 else [(0, "device"), (0, "cpu")]
    for i in range(1, n):
        log += ([(i + 1, "device")] if i + 1 < n else []) + [(i, "cpu")]
    return log


def _staged_run(swap, run):
    """``run(stage)`` with the swap's layers guarded: the log split by stage (no-grad sampling, the window,
    backward) and the layers that ran on their CPU copy."""
    bad, handles = _guard_layers(swap)
    marks = []

    def stage(name):
        marks.append((len(swap.log), name))
        return torch.enable_grad() if name == stages.BACKWARD else contextlib.nullcontext()

    out = run(stage)
    for h in handles:
        h.remove()
    start = dict((name, i) for i, name in marks)
    log = swap.log
    return (log[start[stages.SAMPLE_NOGRAD]:start[stages.SAMPLE_GRAD]],
            log[start[stages.SAMPLE_GRAD]:start[stages.BACKWARD]], log[start[stages.BACKWARD]:], bad, out)


def _where(log, phase):
    assert all(p == phase for _, _, p in log), log
    return [(i, where) for i, where, _ in log]


def test_placement_of_every_block_in_every_stage():
    pipe, params = _pipe("flux")
    lora_before = [(p.data_ptr(), p.device) for p in params]
    swap = install(pipe.transformer, 2, "cpu")  # FLUX's double block and its single block
    assert swap.where == ["cpu", "cpu"]
    for pairs in swap.host:  # at rest the frozen weights are the (pinned, on CUDA) CPU copy
        assert pairs and all(p.data.data_ptr() == h.data_ptr() for p, h in pairs)
    nograd, grad, backward, bad, _ = _staged_run(swap, lambda stage: _loss_and_grads(pipe, params, stage=stage))
    assert bad == []  # no layer ever ran on its CPU copy: forward, the window, backward's recompute
    # each transformer call: block 0 comes, block 1 is prefetched while block 0 runs, each leaves after its use
    call = [(0, "device", "forward"), (1, "device", "forward"), (0, "cpu", "forward"), (1, "cpu", "forward")]
    assert [(i, w) for i, w, _ in call] == _forward_call(2)
    assert nograd == call * (STEPS - K)
    assert grad == call * K
    # backward, for the last window call first: the per-call checkpoint recomputes the call (blocks in order, each
    # brought back and sent away), then the per-block checkpoints recompute each block for its own backward, in
    # reverse order; the earlier call's backward then needs both blocks again
    loads = [(i, phase) for i, where, phase in backward if where == "device"]
    assert all(phase == "backward" for _, phase in loads)
    assert [i for i, _ in loads][:4] == [0, 1, 1, 0] and {i for i, _ in loads[4:]} == {0, 1}
    # a checkpoint's recompute stops after the last tensor it needs: the block it cut short stays until the next
    # block's turn (or release()); never more than the block computing and the prefetched one
    assert swap.most_resident == 2
    swap.release()
    assert swap.where == ["cpu", "cpu"]
    assert [(p.data_ptr(), p.device) for p in params] == lora_before  # LoRA weights never moved
    assert not any(p.requires_grad for pairs in swap.host for p, _ in pairs)


def test_placement_of_every_sd3_block_in_every_stage():
    """SD3 with four joint blocks, the first three swapped (the fourth runs from the device): the exact log of
    every stage, and no compute, forward or backward, on a CPU copy (they hold NaN here)."""
    pipe, params = _pipe("sd3", sd3_blocks=4)
    ref_loss, ref = _loss_and_grads(pipe, params)
    lora_before = [(p.data_ptr(), p.device) for p in params]
    swap = install(pipe.transformer, 3, "cpu")
    assert swap.blocks == list(pipe.transformer.transformer_blocks[:3]) and swap.where == ["cpu"] * 3
    _poison_host_copies(swap)
    nograd, grad, backward, bad, (loss, grads) = _staged_run(
        swap, lambda stage: _loss_and_grads(pipe, params, stage=stage))
    assert bad == []
    assert_rel_close(loss, ref_loss, SAME_OPS, "loss")
    assert_rel_close(grads, ref, SAME_OPS, "LoRA gradients")  # a CPU copy used in backward would give NaN
    call = [(0, "device"), (1, "device"), (0, "cpu"), (2, "device"), (1, "cpu"), (2, "cpu")]
    assert call == _forward_call(3)
    assert _where(nograd, "forward") == call * (STEPS - K)
    assert _where(grad, "forward") == call * K
    # the last window call's per-call recompute: block 0 has no prefetch (the block before it ran last, block 2,
    # makes it guess a walk back), block 1 prefetches block 2 as in forward
    recompute_last = [(0, "device"), (0, "cpu"), (1, "device"), (2, "device"), (1, "cpu"), (2, "cpu")]
    # the per-block recomputes walk back: block 2 (nothing to guess from), then 1 with 0 prefetched; each stops
    # after its last saved tensor (no forward hook), so a block leaves at the next one's pre-hook
    walk = [(2, "device"), (2, "cpu"), (1, "device"), (0, "device"), (1, "cpu")]
    # the earlier call's per-call recompute finds block 0 still there
    recompute_earlier = [(0, "cpu"), (1, "device"), (2, "device"), (1, "cpu"), (2, "cpu")]
    assert _where(backward, "backward") == recompute_last + walk + recompute_earlier + walk
    assert swap.most_resident == 2
    assert swap.where == ["device", "cpu", "cpu"]  # block 0's recompute was cut short: release() sends it back
    swap.release()
    assert swap.where == ["cpu"] * 3
    assert [(p.data_ptr(), p.device) for p in params] == lora_before


def _unet_step(block_swap: int):
    """The tiny UNet through step.rollout_loss (3 steps, K=2): its components, LoRA parameters and
    ``run(stage) -> (loss, LoRA gradients)``."""
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.models.sampling import PromptEncoder, initial_latents, make_pipeline
    from lowmem_alignprop.rewards import build_reward
    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.step.rollout import apply_memory_features, rollout_loss

    cfg = Config(resolution=64, sample_steps=3, k=2, eta=0.0, unet_checkpointing="blocks",
                 block_swap=block_swap).validate()
    comps = load_components(cfg)
    params, _ = apply_memory_features(comps, cfg, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    emb = PromptEncoder(make_pipeline(comps), comps, None, "cpu", 64, cache=False, prompts=["cat"])
    reward = build_reward("brightness")

    class NoPlace:
        def to_device(self, *a):
            pass
        park = offload = to_device

    emb.place = NoPlace()
    e = emb(["cat"])

    def run(stage=lambda n: contextlib.nullcontext()):
        lat = initial_latents(1, comps.unet, comps.vae, 64, torch.Generator().manual_seed(0), "cpu")
        loss, _ = rollout_loss(cfg, comps.unet, comps.unet, comps.scheduler, comps.vae, reward, lat, e, ["cat"], k=2,
                               generator=None, stage=stage)
        with stage(stages.BACKWARD):
            return loss.detach(), torch.autograd.grad(loss, params)

    return comps, params, run


def test_unet_block_swap_through_the_training_step(tiny_dir):
    """The UNet's units (resnets, attentions' transformer blocks) through step.rollout_loss: same loss and
    gradients."""
    comps, params, run = _unet_step(5)
    ref_loss, ref = run()
    swap = install(comps.unet, 5, "cpu")
    bad, handles = _guard_layers(swap)
    loss, grads = run()
    assert bad == []
    assert_rel_close(loss, ref_loss, SAME_OPS, "loss")
    assert_rel_close(grads, ref, SAME_OPS, "LoRA gradients")
    assert len(swap.blocks) == 5 and swap.most_resident <= 2
    assert any(phase == "backward" for _, where, phase in swap.log if where == "device")


# the tiny UNet's units in the order it runs them: what diffusers checkpoints one by one (what backward recomputes);
# not the samplers nor the mid block's first resnet, which it calls without a checkpoint
UNET_UNITS = ["down_blocks.0.resnets.0", "down_blocks.1.resnets.0", "down_blocks.1.attentions.0.transformer_blocks.0",
              "mid_block.attentions.0.transformer_blocks.0", "mid_block.resnets.1", "up_blocks.0.resnets.0",
              "up_blocks.0.attentions.0.transformer_blocks.0", "up_blocks.0.resnets.1",
              "up_blocks.0.attentions.1.transformer_blocks.0", "up_blocks.1.resnets.0", "up_blocks.1.resnets.1"]
UNET_NOT_UNITS = ["down_blocks.0.downsamplers.0", "mid_block.resnets.0", "up_blocks.0.upsamplers.0"]


def _sdxl_shaped_unet():
    """A UNet shaped like SDXL's, tiny: 3 levels, 2 resnets per down block (3 per up block), 2 transformer blocks
    per attention, the last down block without a downsampler."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16, 16), layers_per_block=2, transformer_layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=8)


SDXL_NOT_UNITS = ["down_blocks.0.downsamplers.0", "down_blocks.1.downsamplers.0", "mid_block.resnets.0",
                  "up_blocks.0.upsamplers.0", "up_blocks.1.upsamplers.0"]


@pytest.mark.parametrize("shape, units, not_units", [("tiny", 11, UNET_NOT_UNITS), ("sdxl", 38, SDXL_NOT_UNITS)])
def test_unet_units_are_exactly_what_diffusers_checkpoints(tiny_dir, shape, units, not_units):
    """swappable_blocks' UNet units are the modules diffusers hands its checkpoint function, one call each, in the
    order it calls them (a UNet forward with grad, checkpointing on): the tiny UNet (DownBlock2D, CrossAttnDownBlock2D,
    UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D, UpBlock2D) and an SDXL-shaped one (2 transformer blocks per
    attention). The resnets, samplers and transformer blocks that are not units are those diffusers calls plainly."""
    from diffusers import UNet2DConditionModel

    unet = (UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet") if shape == "tiny"
            else _sdxl_shaped_unet())
    checkpointed = []

    def spy(module, *args):
        checkpointed.append(module)
        return module(*args)

    unet.enable_gradient_checkpointing(spy)
    c, res = unet.config, 8 * 2 ** (len(unet.config.block_out_channels) - 1)
    unet(torch.randn(1, c.in_channels, res, res), 10, torch.randn(1, 3, c.cross_attention_dim))
    names = {id(m): name for name, m in unet.named_modules()}
    assert [names[id(m)] for m in swappable_blocks(unet)] == [names[id(m)] for m in checkpointed]
    assert len(checkpointed) == units
    candidates = {name for name in names.values()
                  if re.fullmatch(r".*\.(resnets|downsamplers|upsamplers|transformer_blocks)\.\d+", name)}
    assert sorted(candidates - {names[id(m)] for m in checkpointed}) == not_units


def test_sd15_and_sdxl_unit_counts_are_the_readmes():
    """SD1.5's and SDXL's UNets (on the meta device, from their shipped configs) have 37 and 86 swap units, as README
    says (44 and 91 when their 3 down- and 3 upsamplers (SDXL: 2 and 2) and the mid block's first resnet were
    units)."""
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    import lowmem_alignprop

    arch = Path(lowmem_alignprop.__file__).parent / "arch"
    counts = {}
    for m in ("sd15", "sdxl"):
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(arch / m / "unet"))
        counts[m] = len(swappable_blocks(unet))
    assert counts == {"sd15": 37, "sdxl": 86}
    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8").split())
    assert "37 in SD1.5 and 86 in SDXL" in readme


def test_unet_placement_of_every_unit_in_every_stage(tiny_dir):
    """Every unit of the tiny UNet swapped, through step.rollout_loss: the exact log of the no-grad steps, the
    window and the per-call recompute of backward; the per-block recomputes walk back over the units diffusers
    checkpoints, each loaded only by its own pre-hook or a neighbour's prefetch."""
    comps, params, run = _unet_step(len(UNET_UNITS))
    names = {id(m): name for name, m in comps.unet.named_modules()}
    lora_before = [(p.data_ptr(), p.device) for p in params]
    swap = install(comps.unet, len(UNET_UNITS), "cpu")
    n = len(swap.blocks)
    assert [names[id(b)] for b in swap.blocks] == UNET_UNITS
    pre = []  # (log length, unit) at each unit's pre-hook, before BlockSwap's own
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: pre.append((len(swap.log), i)), prepend=True)
               for i, b in enumerate(swap.blocks)]
    nograd, grad, backward, bad, _ = _staged_run(swap, run)
    for h in handles:
        h.remove()
    assert bad == []
    call = _forward_call(n)
    assert _where(nograd, "forward") == call and _where(grad, "forward") == call * 2
    recompute = [(0, "device"), (0, "cpu"), (1, "device")] + call[3:]  # unit 0 has nothing to prefetch from
    assert _where(backward, "backward")[:len(recompute)] == recompute
    # per window call: the per-call recompute runs every unit in order, then the per-block recomputes walk back
    start = len(nograd) + len(grad)
    runs = [i for at, i in pre if at >= start]
    walk = list(reversed(range(n)))  # every unit is recomputed on its own
    # the first window call's input needs no gradient: its walk ends at the first unit with LoRA layers (unit 2)
    assert runs == list(range(n)) + walk + list(range(n)) + [i for i in walk if i >= 2]
    # each load in backward is the unit's own pre-hook or a prefetch by the unit before or after it
    hook_at = {}
    for at, i in pre:
        hook_at.setdefault(at, i)
    last = None
    for k, (i, where, _) in enumerate(swap.log):
        last = hook_at.get(k, last)
        if where == "device":
            assert last is not None and abs(last - i) <= 1, (k, i, last)
    assert swap.most_resident == 2
    swap.release()
    assert swap.where == ["cpu"] * n
    assert [(p.data_ptr(), p.device) for p in params] == lora_before


@pytest.mark.parametrize("n", [2, len(UNET_UNITS)])
def test_unet_backward_never_computes_with_a_cpu_copy(tiny_dir, n):
    """The swapped units' CPU copies hold NaN (only their device copies the real values): the loss and LoRA
    gradients are those without block swap. A unit's backward reading its CPU copy gives NaN (on a GPU: a device
    mismatch): a unit diffusers does not checkpoint (a sampler, the mid block's first resnet) would, since torch
    keeps its frozen weight by reference and its forward hook has pointed it back at the CPU copy by then."""
    comps, params, run = _unet_step(n)
    ref_loss, ref = run()
    swap = install(comps.unet, n, "cpu")
    names = {id(m): name for name, m in comps.unet.named_modules()}
    assert [names[id(b)] for b in swap.blocks] == UNET_UNITS[:n]
    _poison_host_copies(swap)
    loss, grads = run()
    assert_rel_close(loss, ref_loss, SAME_OPS, "loss")
    assert_rel_close(grads, ref, SAME_OPS, "LoRA gradients")


def test_too_many_blocks_is_refused():
    pipe, _ = _pipe("sd3")
    from lowmem_alignprop.settings.errors import UserError

    with pytest.raises(UserError, match="block_swap=3 but the model has 2 blocks"):
        install(pipe.transformer, 3, "cpu")
    assert isinstance(install(pipe.transformer, 1, "cpu"), BlockSwap)


def test_more_blocks_than_a_unet_has_are_refused_before_it_loads(tmp_path, tiny_dir, capsys, monkeypatch):
    """A UNet's swap units, counted on its meta model: the count the loaded UNet's install takes, refused before any
    weight is read (it was said once the model had loaded: minutes for SDXL), nothing written."""
    from diffusers import UNet2DConditionModel

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.training import train_setup

    units = len(swappable_blocks(UNet2DConditionModel.from_pretrained(tiny_dir / "unet")))

    def loaded(*args, **kwargs):
        raise AssertionError("the model loaded before the refusal")
    monkeypatch.setattr(train_setup, "load_components", loaded)
    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--model", "tiny", "--steps", "1", "--output-dir", str(out), "--set",
                 f"block_swap={units + 1}", "--set", "unet_checkpointing=blocks"]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert errors == [f"error: block_swap={units + 1} but the model has {units} blocks: use --set "
                      f"block_swap={units} or fewer"] and not out.exists()


def test_trainer_with_block_swap_trains_the_same(tmp_path):
    """A step of the trainer on the tiny FLUX model, with and without block_swap: the same reward, loss and
    trained LoRA (the blocks' copies are exact)."""
    import json

    from flowmodels import build_tiny_flux_dir
    from safetensors.torch import load_file

    from lowmem_alignprop.cli import main

    model = build_tiny_flux_dir(tmp_path / "flux")
    base = ["--profile", "cpu", "--model", str(model), "--steps", "1", "--set", f"resolution={RES}", "--set",
            "sample_steps=3", "--set", "k=2", "--set", "batch_size=1", "--set", "guidance_scale=3.5", "--set",
            "sample_prompts=0", "--set", "unet_checkpointing=blocks", "--set", "lr=0.05"]
    runs = {}
    for n in (0, 2):
        out = tmp_path / f"swap{n}"
        assert main([*base, "--output-dir", str(out), "--set", f"block_swap={n}"]) == 0
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[n] = (torch.tensor([[r["reward_mean"], r["loss"]] for r in rows]),
                   load_file(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert_rel_close(runs[2][0], runs[0][0], SAME_OPS, "rewards and losses")
    keys = sorted(runs[0][1])
    assert_rel_close([runs[2][1][k] for k in keys], [runs[0][1][k] for k in keys], SAME_OPS, "trained LoRA")


def test_block_swap_needs_block_checkpointing(capsys, tmp_path):
    from lowmem_alignprop.cli import main

    rc = main(["--profile", "cpu", "--set", "block_swap=2", "--output-dir", str(tmp_path / "run")])
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert rc == 2 and len(err) == 1 and "unet_checkpointing=blocks" in err[0], err
    assert not (tmp_path / "run").exists()


def test_each_block_prefetches_the_one_that_runs_next_in_forward_and_in_backward():
    """Four frozen Linear blocks, each its own checkpoint (as unet_checkpointing=blocks makes them), all swapped. In
    forward block i+1 comes while block i runs; in backward the per-block recomputes walk back, so block i-1 comes
    while block i recomputes (block 0 too), never the block just done. The gradient is that without block swap."""
    from lowmem_alignprop.memory.recompute import module_checkpoint

    torch.manual_seed(0)
    blocks = [torch.nn.Linear(4, 4).requires_grad_(False) for _ in range(4)]
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)).requires_grad_(True)

    def run():
        h = x
        for b in blocks:
            h = module_checkpoint(b, h)
        return h

    ref = torch.autograd.grad(run().pow(2).sum(), x)[0]
    swap = BlockSwap(blocks, "cpu")
    out = run()
    forward = [(i, where) for i, where, _ in swap.log]
    assert forward == [(0, "device"), (1, "device"), (0, "cpu"), (2, "device"), (1, "cpu"), (3, "device"), (2, "cpu"),
                       (3, "cpu")]
    n = len(swap.log)
    grad = torch.autograd.grad(out.pow(2).sum(), x)[0]
    backward = swap.log[n:]
    assert all(phase == "backward" for _, _, phase in backward)
    # block 3 first (nothing before it to guess from), then 2 with 1 prefetched, then 1 with 0 prefetched; block 0's
    # recompute stops after the last tensor it needs (no forward hook): it waits for release()
    assert [(i, where) for i, where, _ in backward] == [(3, "device"), (3, "cpu"), (2, "device"), (1, "device"),
                                                        (2, "cpu"), (0, "device"), (1, "cpu")]
    assert swap.most_resident == 2
    assert_rel_close(grad, ref, SAME_OPS, "input gradient")
    swap.release()
    assert swap.where == ["cpu"] * 4


def test_install_swaps_the_first_n_blocks_and_model_to_moves_all_but_their_frozen_weights():
    """install(model, n) takes the first n blocks in execution order (what the planner counts); model_to applies the
    move to every other parameter and buffer (the trainable weight inside a swapped block too) and leaves the swapped
    frozen weights as their host copy. On a CPU build the move is observed as a dtype change: .to(float64)."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Linear(4, 4)
            self.transformer_blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
            self.register_buffer("pos", torch.zeros(4))
            self.lora = torch.nn.Parameter(torch.zeros(4))  # a trainable weight inside block 0

    model = Model().requires_grad_(False)
    model.transformer_blocks[0].register_parameter("lora", model.lora)
    model.lora.requires_grad_(True)
    swap = install(model, 2, "cpu")
    assert swap.blocks == list(model.transformer_blocks[:2])
    host = {id(p): h for pairs in swap.host for p, h in pairs}
    assert len(host) == 4 and id(model.lora) not in host  # two blocks' weight and bias; the trainable one stays
    swap.model_to(model, torch.float64)
    for name, p in model.named_parameters():
        if id(p) in host:
            assert p.dtype == torch.float32 and p.data.data_ptr() == host[id(p)].data_ptr(), name
        else:
            assert p.dtype == torch.float64, name
    assert model.pos.dtype == torch.float64

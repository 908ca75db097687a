"""The weights of the planner's fake step and their bytes: fake storage per module, what fake tensors cannot hold
counted analytically (a quantized or fp8 base, an 8-bit optimizer state, block swap's blocks in host memory), and the
hooks that count dequantization and block swap's copies as they happen."""

from __future__ import annotations

import contextlib

import torch

from lowmem_alignprop.memory.allowances import CUDA_BLOCK, GIB, MIB
from lowmem_alignprop.measure.counters import TEXT_ENCODER, LiveBytes, StageWork, SwapWindows
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.model_kind import denoiser_label


def _unique_bytes(tensors, seen: set, round_to: int = 1) -> int:
    total = 0
    for t in tensors:
        st = t.untyped_storage()
        if id(st) in seen:
            continue
        seen.add(id(st))
        total += (st.nbytes() + round_to - 1) // round_to * round_to  # each weight is its own allocation
    return total


def _quantized_unet_bytes(unet, base_quant: str) -> tuple[int, int]:
    """(bytes saved by quantizing the frozen UNet's Linear weights, largest dequantized layer): analytic, from
    :func:`lowmem_alignprop.memory.quant.quantized_weight_bytes` (bitsandbytes cannot run on fake tensors)."""
    from lowmem_alignprop.memory.quant import quantized_weight_bytes

    saved = quantized_weight_bytes(unet, "none") - quantized_weight_bytes(unet, base_quant)
    if base_quant == "fp8":
        return saved, _fp8_block_upcast_bytes(unet)
    largest = max((m.in_features * m.out_features * 2 for n, m in unet.named_modules()
                   if isinstance(m, torch.nn.Linear) and "lora_" not in n), default=0)  # dequantized to fp16
    return saved, largest


def _fp8_block_upcast_bytes(unet) -> int:
    """fp8 storage in flight: the upcast (compute-dtype) copies of the largest block's fp8 layers, which a block's
    backward keeps (its recompute saved them) under the per-block checkpointing fp8 requires."""
    from lowmem_alignprop.memory.block_swap import swappable_blocks
    from lowmem_alignprop.memory.quant import fp8_linears

    fp8 = {id(m) for _, m in fp8_linears(unet)}
    return max((sum(t.numel() * t.element_size() for m in block.modules() if id(m) in fp8
                    for t in (m.weight, m.bias) if t is not None)
                for block in swappable_blocks(unet)), default=0)


def fp8_load_bytes(cfg: Config, comps, counter: LiveBytes, cuda: bool) -> int:
    """fp8 storage at load: an SD3/FLUX transformer is stored in fp8 block by block as it is read or drawn
    (models/block_loading.py) but for the LoRA targets' base layers, which wait in the compute dtype until LoRA is
    added (peft gives a new adapter its base layer's dtype), and the small rest outside the blocks (embedders): their
    bytes beyond fp8's 1 per weight. On a GPU block swap's host blocks are in host memory. (A UNet is stored in fp8
    on the CPU before it moves to the device.)"""
    from lowmem_alignprop.memory.block_swap import swappable_blocks
    from lowmem_alignprop.memory.quant import fp8_linears

    if cfg.base_quant != "fp8" or cfg.train_unet != "lora" or getattr(comps, "family", "unet") == "unet":
        return 0
    blocks = swappable_blocks(comps.unet)
    host = {id(m) for b in blocks[:cfg.block_swap] for m in b.modules()} if cuda else set()
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    return sum(counter._rounded(t.numel() * t.element_size()) - counter._rounded(t.numel())
               for n, m in fp8_linears(comps.unet)
               if (n.endswith(".base_layer") or id(m) not in in_blocks) and id(m) not in host
               for t in (m.weight, m.bias) if t is not None)


def dequant_hooks(cfg: Config, unet, work: StageWork) -> list:
    """base_quant: every call of a quantized Linear layer dequantizes its weight (reads the packed weight, writes it
    in fp16); counted per call, recomputes included. The planner's layers stay unquantized (bitsandbytes cannot run
    on fake tensors), so the count is analytic."""
    if cfg.base_quant == "none":
        return []
    packed = {"int8": 1.0, "nf4": 0.5, "fp8": 1.0}[cfg.base_quant]  # bytes per weight as stored

    def hook(module, args):
        work.add("dequant_bytes", module.in_features * module.out_features * (2 + packed))
    if cfg.base_quant == "fp8":  # the layers layerwise casting upcasts
        from lowmem_alignprop.memory.quant import fp8_linears
        return [m.register_forward_pre_hook(hook) for _, m in fp8_linears(unet)]
    return [m.register_forward_pre_hook(hook) for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and "lora_" not in n]


def block_swap(cfg: Config, comps, weights: dict[str, int], counter: LiveBytes, work: StageWork, cuda: bool,
                notes: list[str]) -> int:
    """block_swap: the trainer's hooks on the fake model; returns the bytes of pinned host memory they need. The
    swapped blocks' frozen weights wait in host memory at their stored size (a quantized base: its quantized size,
    :func:`quant.stored_tensor_bytes`; not counted on a GPU). Each copy a hook makes while a block is in flight is
    counted where it happens at that stored size too (the fake weights are unquantized), and on a GPU its bytes go
    over PCIe (StageWork's pcie_bytes, in place of the elementwise bytes of a copy)."""
    from lowmem_alignprop.memory import quant
    from lowmem_alignprop.memory.block_swap import install

    stored = quant.stored_tensor_bytes(comps.unet, cfg.base_quant)
    by_host: dict[int, int] = {}
    windows = SwapWindows(work)

    def to_device(t: torch.Tensor) -> torch.Tensor:
        n = by_host[id(t)]
        with work.uncounted() if cuda else contextlib.nullcontext(), counter.host():  # a GPU's copy: PCIe bytes
            out = t.to("cpu", copy=True)
        counter.track(out, nbytes=n)  # lives as long as the copy: until its block leaves and autograd is done
        if cuda:
            windows.copied(n)  # before its bytes count: the copy's window starts here
            work.add("pcie_bytes", n)
            work.add("swap_bytes", n)
        return out

    swap = install(comps.unet, cfg.block_swap, "cpu", copy=to_device)
    if swap is None:
        return 0
    comps.block_swap = swap  # held for the step (the hooks live as long as the model)
    if cuda:  # what each copy overlaps, for the time model (these pre-hooks run after the swap's own)
        windows.swap, work.swap_windows = swap, windows
        for i, block in enumerate(swap.blocks):
            block.register_forward_pre_hook(windows.waited(i))
    by_host.update((id(w.host), stored[id(w.p)]) for ws in swap.weights for w in ws)
    host = sum(stored[id(w.p)] for ws in swap.weights for w in ws)
    if cuda:  # the quantized size has left weights["unet"] already (fake_weights): the swapped part leaves too
        weights["unet"] -= sum(counter._rounded(stored[id(w.p)]) for ws in swap.weights for w in ws)
        size = "" if cfg.base_quant == "none" else f" ({cfg.base_quant})"
        notes.append(f"block_swap={cfg.block_swap}: {host / GIB:.2f} GiB of frozen blocks{size} in pinned host memory "
                     f"(-{host / GIB:.2f} GiB on the card); the copies of the blocks in flight (at most two) counted "
                     "where they happen, and over PCIe")
    return host


def _as_fake(fake):
    """Module._apply's function giving each meta tensor a fake CPU tensor of its shape, dtype and strides: the meta
    tensor itself wrapped (torch's FakeTensorConverter), not a new one made by dispatching empty_like through the fake
    mode (a sixth of a tiny model's estimate); tensors that share a storage (tied weights) still share one."""
    converter, cpu = fake.fake_tensor_converter, torch.device("cpu")

    def fn(t):
        return converter.from_meta_and_device(fake, t.detach(), cpu)
    return fn


def fake_weights(cfg: Config, comps, reward, fake, cuda: bool, notes: list[str]) -> tuple[list, dict[str, int], int]:
    """Fake storage for every module; (LoRA parameters, bytes per module, the largest dequantized layer)."""
    modules = {"unet": comps.unet, "vae": comps.vae, TEXT_ENCODER: list(comps.text_encoders()), "reward": reward}
    for m in (comps.unet, comps.vae, *comps.text_encoders(), reward):
        if m is not None:
            m._apply(_as_fake(fake))  # fake CPU storage, tied weights kept tied (to_empty unties them)
    comps.unet.train()  # as the trainer: LoRA layers in train mode (frozen modules stay in eval)
    params = [p for p in comps.unet.parameters() if p.requires_grad]
    seen: set = set()
    block = CUDA_BLOCK if cuda else 1
    weights = {"lora": _unique_bytes(params, seen, block)}
    for name, obj in modules.items():
        ms = [m for m in (obj if isinstance(obj, list) else [obj]) if m is not None]
        weights[name] = _unique_bytes([t for m in ms for t in list(m.parameters()) + list(m.buffers())], seen, block)
    largest = 0
    if cfg.base_quant != "none":
        saved, largest = _quantized_unet_bytes(comps.unet, cfg.base_quant)
        weights["unet"] -= saved
        in_flight = "one block's upcast layers" if cfg.base_quant == "fp8" else "one dequantized layer"
        notes.append(f"base_quant={cfg.base_quant}: the denoiser's Linear weights counted at their quantized size "
                     f"(-{saved / GIB:.2f} GiB, analytic); activations as unquantized (quant.prepare_quantized_layers "
                     f"keeps them so); +{largest / MIB:.0f} MiB for {in_flight} added to every stage")
    return params, weights, largest


def optimizer_for(cfg: Config, params, cuda: bool, weights: dict[str, int], place, notes: list[str]):
    """(the optimizer the step runs, whether it steps): AdamW for real; an 8-bit state counted analytically."""
    from lowmem_alignprop.memory.optim import adam8bit_state_bytes, build_optimizer

    if cfg.optimizer == "adamw":
        optimizer = build_optimizer(cfg, params)
        if cuda:
            for group in optimizer.param_groups:  # on CUDA AdamW takes the foreach path: full-size temporaries
                group["foreach"] = True
        return optimizer, True
    optimizer = torch.optim.SGD(params, lr=cfg.lr)  # only zero_grad is used; the 8-bit state is analytic
    weights["optimizer_state"] = adam8bit_state_bytes(params)
    place.on_device.add("optimizer_state")
    notes.append(f"optimizer={cfg.optimizer}: state counted analytically ({weights['optimizer_state'] / MIB:.1f} "
                 "MiB: 2 bytes/weight for tensors of 4096+ elements, fp32 for smaller ones)")
    return optimizer, False


def check_host_memory(cfg: Config, available: int | None = None, total: int | None = None) -> None:
    """A CPU run holds its model in host memory in fp32 (the trainer's CPU precision): the denoiser alone (UNet or
    transformer; the meta model's parameters, nothing loaded) larger than this machine's memory and swap together
    cannot run, and is refused before the model loads (it would be killed partway, with no message); larger than the
    memory free now, it is warned about (it will swap). ``available``/``total``: free memory and memory plus swap
    (default: psutil's figures). A model whose meta copy cannot be built (a hub id without its configs here) is
    not checked: loading says what is missing. A run on a CUDA card (its weights on the card) is not checked."""
    import logging

    import psutil

    from lowmem_alignprop.measure.meta_models import meta_base
    from lowmem_alignprop.run.runlock import global_rank, local_world_size
    from lowmem_alignprop.settings.errors import UserError

    if torch.cuda.is_available():  # the trainer's and evaluate's device: the weights go to the card
        return
    try:
        base = meta_base(cfg, torch.float32)
    except Exception:  # noqa: BLE001 - loading the model names whatever is wrong with it
        return
    denoiser = denoiser_label(base.family != "unet")
    # fp8 keeps the frozen Linears (nearly all the weights) in 1 byte each; else fp32, 4
    one = sum(p.numel() for p in base.unet.parameters()) * (1 if cfg.base_quant == "fp8" else 4)
    processes = local_world_size()  # under a launcher every process of this machine holds its own copy
    need = one * processes
    if available is None or total is None:
        memory = psutil.virtual_memory()
        available, total = memory.available, memory.total + psutil.swap_memory().free
    said = (f"{cfg.model}'s {denoiser} alone takes {one / GIB:.1f} GiB " +
            ("in fp8" if cfg.base_quant == "fp8" else "in fp32, the precision of a CPU run") +
            (f", {need / GIB:.1f} GiB in this machine's {processes} processes" if processes > 1 else ""))
    if need > total:
        raise UserError(f"{said}, more than this machine's {total / GIB:.1f} GiB of memory and swap: train it on a "
                        f"GPU (lowmem-alignprop plan --model {cfg.model} --profile NAME tells whether a card's profile "
                        "fits it; lowmem-alignprop profiles lists them), or use a smaller model")
    if need > available and global_rank() == 0:  # every process checks alike: rank 0 says it
        logging.getLogger("lowmem_alignprop").warning(
            "%s, more than the %.1f GiB of memory free now: the run will swap (slowly) or be stopped by the system",
            said, available / GIB)

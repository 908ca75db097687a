"""Block swap: N frozen blocks of the denoiser live in CPU memory and come to the device only while they run.

``BlockSwap(blocks, device)`` takes the blocks to swap (their frozen weights move to pinned CPU memory; trainable
LoRA weights stay on the device) and hooks each one:

* forward pre-hook: the block's weights are copied to the device (already there when prefetched), and the next
  swapped block's copy starts on a side CUDA stream, overlapping this block's compute;
* forward hook: the block's device copy is dropped (its parameters point at the CPU copy again).

This covers the no-grad sampling steps, the gradient window's forward, and backward: with per-block checkpointing
(which block swap requires) backward recomputes one block at a time through the same hooks, and each block's
backward runs right after its recompute, on the device copy that recompute loaded (torch keeps a frozen weight by
reference: this holds only for a unit that backward recomputes on its own, :func:`swappable_blocks`). So the
blocks in flight are the one computing (forward, recompute, or its backward) plus one prefetched: what block swap
saves is the other swapped blocks' weights, at the cost of copying each swapped block over PCIe once per
transformer call and once more per window call in backward (docs/design.md, "Block swap").

On a CPU the copies are CPU -> CPU (a real copy, so the placement logic is the same and tests can check it).
``where`` says where each swapped block's weights are, ``log`` records every move with the phase it happened in.

A quantized frozen base swaps at its stored size (docs/design.md, "Block swap with a quantized base"): what moves is
each frozen tensor as it is stored, with the quantization state that belongs to it (:class:`_Weight` and its
bitsandbytes kinds). fp8 storage (diffusers' layerwise casting) stores plain float8 tensors: they move like any
weight, and the layer's upcast happens on the device copy. bitsandbytes int8 keeps its int8 weight and row scales
in the layer's ``MatmulLtState``, nf4 its block scales in the weight's ``QuantState``; bitsandbytes' autograd keeps
that object *by reference* until the layer's backward, so each load gives the layer a fresh one holding the device
copies (:class:`_Int8Weight`, :class:`_NF4Weight`): a backward then reads the copy its recompute made, as
``F.linear``'s saved weight does, however often the layer has been unloaded since. ``host_bytes[i]`` is what block
``i`` holds in host memory, and what each of its loads copies.

Why not diffusers' group offloading (``apply_group_offloading(offload_type="block_level", use_stream=True)``): it
offloads every group of a module, parameters included, while here only the N blocks chosen are swapped and the
LoRA weights inside them stay on the device with their gradients and optimizer state; and it moves plain tensors,
while a bitsandbytes layer's quantization state must move with its weight (above).
"""

from __future__ import annotations

import contextlib
import copy

import torch

from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.model_kind import too_many_blocks

FORWARD, BACKWARD = "forward", "backward"


def swappable_blocks(model) -> list[torch.nn.Module]:
    """The denoiser's swap units in execution order. The rule: a unit is exactly what backward recomputes on its
    own (a per-block checkpoint), since torch keeps a frozen weight by reference and the unit's backward must run
    right after its recompute loaded it. A flow transformer: its joint (then FLUX's single) blocks. A UNet (diffusers
    0.42.1's blocks): the resnets of the down and up blocks and ``mid_block.resnets[1:]``, and the transformer blocks
    of the attentions; never the down/upsamplers nor ``mid_block.resnets[0]``, which diffusers calls without a
    checkpoint (they stay on the device)."""
    model = getattr(model, "module", model)
    if hasattr(model, "transformer_blocks"):
        return list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", None) or [])
    if hasattr(model, "down_blocks"):
        units = []
        mid = [model.mid_block] if getattr(model, "mid_block", None) is not None else []
        for block in list(model.down_blocks) + mid + list(model.up_blocks):
            resnets = list(block.resnets)
            attentions = [list(getattr(a, "transformer_blocks", None) or [])  # a plain Attention: not checkpointed
                          for a in getattr(block, "attentions", None) or []]
            if block in mid:  # resnets[0] plainly, then each attention and the resnet after it
                units += [u for attn, resnet in zip(attentions, resnets[1:]) for u in attn + [resnet]]
            else:  # each resnet, then its attention
                units += [u for j, resnet in enumerate(resnets)
                          for u in [resnet] + (attentions[j] if j < len(attentions) else [])]
        return units
    raise TypeError(f"block swap does not know the blocks of {type(model).__name__}")


def _phase() -> str:
    return BACKWARD if torch._C._current_graph_task_id() != -1 else FORWARD


class _Weight:
    """One frozen parameter of a swapped block: its data waits in host memory (pinned on CUDA) and a device copy
    stands in while the block runs (an fp8-stored weight is the same: plain float8 tensors)."""

    def __init__(self, p: torch.nn.Parameter, pin):
        self.p, self.host = p, pin(p.data)
        p.data = self.host

    def host_tensors(self) -> list[torch.Tensor]:
        return [self.host]

    def load(self, to_device) -> list[torch.Tensor]:
        """Install device copies (``to_device(host tensor)``); returns them (the caller ties them to the compute
        stream)."""
        self.p.data = to_device(self.host)
        return [self.p.data]

    def unload(self) -> None:
        self.p.data = self.host  # the device copy is freed once nothing (a saved tensor of the graph) holds it


class _Int8Weight(_Weight):
    """A bitsandbytes ``Linear8bitLt``'s weight: the int8 matrix (``state.CB``, also the weight's data) and its fp32
    row scales (``state.SCB``) live in the layer's ``MatmulLtState``, which bitsandbytes' matmul reads in forward
    and keeps by reference for backward. Each load installs a fresh state object with the device copies and the
    unload puts the host one back: a backward reads the copy its recompute made."""

    def __init__(self, layer, pin):
        if layer.weight.CB is not None:
            layer.init_8bit_state()  # the int8 weight and its scales into layer.state, as its first forward does
        if layer.state.CB is None or layer.state.SCB is None:
            raise RuntimeError(f"block swap takes quantized int8 layers only; {type(layer).__name__} has no int8 "
                               "weight yet (bitsandbytes quantizes it when it moves to its device)")
        self.layer, self.p = layer, layer.weight
        self.state = copy.copy(layer.state)  # the host state: its own object, never handed to a matmul
        self.host, self.scb = pin(layer.state.CB), pin(layer.state.SCB)
        self.state.CB, self.state.SCB = self.host, self.scb
        self.unload()

    def host_tensors(self) -> list[torch.Tensor]:
        return [self.host, self.scb]

    def load(self, to_device) -> list[torch.Tensor]:
        state = copy.copy(self.state)  # a fresh object: the graph of an earlier load keeps its own
        state.CB, state.SCB = to_device(self.host), to_device(self.scb)
        self.layer.state, self.p.data = state, state.CB
        return [state.CB, state.SCB]

    def unload(self) -> None:
        self.layer.state, self.p.data = self.state, self.host


class _NF4Weight(_Weight):
    """A bitsandbytes ``Linear4bit``'s weight: packed 4-bit codes and, in its ``QuantState``, one absmax per 64
    weights (with double quantization: 8-bit absmax, their fp32 scales and an offset). bitsandbytes' matmul keeps
    the QuantState by reference for backward, so each load installs a fresh one with the device copies. The two
    code tables (16 and 256 values, 1.1 KiB per layer) are copied to the device once and stay there."""

    def __init__(self, layer, pin, device):
        self.layer, self.p = layer, layer.weight
        qs = self.p.quant_state
        self.host = pin(self.p.data)
        self.qs = copy.copy(qs)
        self.qs.code, self.qs.absmax = qs.code.to(device), pin(qs.absmax)  # the code table stays on the device
        if qs.nested:
            self.qs.offset, self.qs.state2 = pin(qs.offset), copy.copy(qs.state2)
            self.qs.state2.code, self.qs.state2.absmax = qs.state2.code.to(device), pin(qs.state2.absmax)
        self.unload()

    def host_tensors(self) -> list[torch.Tensor]:
        return [self.host, self.qs.absmax] + ([self.qs.offset, self.qs.state2.absmax] if self.qs.nested else [])

    def load(self, to_device) -> list[torch.Tensor]:
        qs = copy.copy(self.qs)  # a fresh object: the graph of an earlier load keeps its own
        qs.absmax = to_device(self.qs.absmax)
        if qs.nested:
            qs.offset, qs.state2 = to_device(self.qs.offset), copy.copy(self.qs.state2)
            qs.state2.absmax = to_device(self.qs.state2.absmax)
        self.p.data, self.p.quant_state = to_device(self.host), qs
        return [self.p.data, qs.absmax] + ([qs.offset, qs.state2.absmax] if qs.nested else [])

    def unload(self) -> None:
        self.p.data, self.p.quant_state = self.host, self.qs
        self.layer.quant_state = self.qs  # the layer's own reference (bitsandbytes' fallback) is the host one too


def _copy(t: torch.Tensor, device) -> torch.Tensor:
    return t.to(device, non_blocking=True, copy=True)


def _frozen_weights(block: torch.nn.Module, pin, device) -> list[_Weight]:
    """What of ``block`` is swapped: every frozen parameter (LoRA weights stay on the device), a bitsandbytes
    layer's weight with its quantization state."""
    out, seen = [], set()
    for m in block.modules():
        for p in m.parameters(recurse=False):
            if p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            kind = type(p).__name__
            if kind == "Int8Params" and p is m.weight:
                out.append(_Int8Weight(m, pin))
            elif kind == "Params4bit" and p is m.weight:
                out.append(_NF4Weight(m, pin, device))
            else:
                out.append(_Weight(p, pin))
    return out


class BlockSwap:
    """Keep ``blocks``' frozen weights on the CPU (pinned on CUDA) and stream them to ``device`` around each use."""

    def __init__(self, blocks: list[torch.nn.Module], device, prefetch: bool = True, copy=None):
        self.blocks, self.device, self.prefetch = list(blocks), torch.device(device), prefetch
        # host tensor -> its device copy (the planner passes one that counts quantized bytes on fake tensors)
        self.copy = copy or (lambda t: _copy(t, self.device))
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None  # copies overlap compute
        self.ready: dict[int, torch.cuda.Event] = {}
        self.copies: dict[int, list[torch.Tensor]] = {}  # each block's device copies while it is loaded
        self.weights: list[list[_Weight]] = []
        self.where: list[str] = []
        self.log: list[tuple[int, str, str]] = []  # (block index, "device" | "cpu", phase)
        self.most_resident = 0
        self.last: int | None = None  # the block that ran last (its pre-hook)
        self.loading: int | None = None  # the block whose weights are being copied (for a ``copy`` that asks)
        self.handles = []

        def pin(t: torch.Tensor) -> torch.Tensor:
            host = t.to("cpu")
            return host.pin_memory() if self.cuda else host  # pinned: asynchronous host-to-device copies

        for i, block in enumerate(self.blocks):
            self.weights.append(_frozen_weights(block, pin, self.device))
            self.where.append("cpu")
            self.handles.append(block.register_forward_pre_hook(self._before(i)))
            self.handles.append(block.register_forward_hook(self._after(i)))
        # bytes each block holds in host memory, and copies per load: its frozen tensors as stored (quantized ones
        # with their scales)
        self.host_bytes = [sum(t.untyped_storage().nbytes() for w in ws for t in w.host_tensors())
                           for ws in self.weights]

    @property
    def host(self) -> list[list[tuple[torch.nn.Parameter, torch.Tensor]]]:
        """(parameter, its host data) per swapped block."""
        return [[(w.p, w.host) for w in ws] for ws in self.weights]

    # -- moves -------------------------------------------------------------------------------------------
    def _load(self, i: int) -> None:
        if self.where[i] == "device":
            return
        self.loading = i
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext(), torch.no_grad():
            copies = [t for w in self.weights[i] for t in w.load(self.copy)]
        self.copies[i] = copies
        if self.cuda:
            self.ready[i] = torch.cuda.Event()
            self.ready[i].record(self.stream)
        self.where[i] = "device"
        self.log.append((i, "device", _phase()))
        self.most_resident = max(self.most_resident, self.where.count("device"))

    def _unload(self, i: int) -> None:
        for w in self.weights[i]:
            w.unload()
        self.copies.pop(i, None)
        self.where[i] = "cpu"
        self.log.append((i, "cpu", _phase()))

    def _before(self, i: int):
        def hook(module, args):
            nxt = self._next(i)
            for j, where in enumerate(self.where):
                # at most this block and the prefetched one: a checkpoint's recompute stops early, after the last
                # tensor it needs, so a block it cut short never ran its forward hook
                if where == "device" and j not in (i, nxt):
                    self._unload(j)
            self._load(i)
            if self.cuda:  # the compute stream waits for the copy; the allocator keeps it until compute is done
                torch.cuda.current_stream().wait_event(self.ready[i])
                for t in self.copies.get(i, ()):
                    t.record_stream(torch.cuda.current_stream())
            self.last = i
            if self.prefetch and nxt is not None and 0 <= nxt < len(self.blocks):
                self._load(nxt)  # on the side stream: overlaps this block's compute
        return hook

    def _next(self, i: int) -> int | None:
        """The block that runs next: i + 1 in forward; in backward the per-call recompute walks forward and the
        per-block recomputes walk back, so the direction is the one the previous block took (none if unclear)."""
        if _phase() == FORWARD:
            return i + 1
        if self.last == i + 1:
            return i - 1
        if self.last == i - 1:
            return i + 1
        return None

    def _after(self, i: int):
        def hook(module, args, output):
            self._unload(i)
        return hook

    # -- the rest of the model ---------------------------------------------------------------------------
    def model_to(self, model: torch.nn.Module, device) -> torch.nn.Module:
        """``model.to(device)`` for everything but the swapped blocks' frozen weights (they stay on the CPU)."""
        swapped = {id(w.p) for ws in self.weights for w in ws}
        for p in model.parameters():
            if id(p) not in swapped:
                p.data = p.data.to(device)
        for m in model.modules():
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = b.to(device)
        return model

    def release(self) -> None:
        """Every swapped block back to the CPU (the end of a step; the next use brings them back)."""
        for j, where in enumerate(self.where):
            if where == "device":
                self._unload(j)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def install(model, n: int, device, copy=None) -> BlockSwap | None:
    """Swap the first ``n`` blocks of ``model`` (none for n=0). Raises UserError when it has fewer blocks."""
    if n <= 0:
        return None
    blocks = swappable_blocks(model)
    if n > len(blocks):
        raise UserError(too_many_blocks(n, len(blocks)))
    return BlockSwap(blocks[:n], device, copy=copy)

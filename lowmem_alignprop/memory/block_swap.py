"""Block swap: N frozen blocks of the denoiser live in CPU memory and come to the device only while they run.

``BlockSwap(blocks, device)`` takes the blocks to swap (their frozen weights move to pinned CPU memory; trainable
LoRA weights stay on the device) and hooks each one:

* forward pre-hook: the block's weights are copied to the device (already there when prefetched), and the next
  swapped block's copy starts on a side CUDA stream, overlapping this block's compute;
* forward hook: the block's device copy is dropped (its parameters point at the CPU copy again).

This covers the no-grad sampling steps, the gradient window's forward, and backward: with per-block checkpointing
(which block swap requires) backward recomputes one block at a time through the same hooks, and the weights that
recompute saves for its backward are the device copy it made, freed by autograd once that block's backward is
done. So the blocks in flight are the one computing (forward, recompute, or its backward) plus one prefetched:
what block swap saves is the other swapped blocks' weights, at the cost of copying each swapped block over PCIe
once per transformer call and once more per window call in backward (docs/design.md, "Block swap").

On a CPU the copies are CPU -> CPU (a real copy, so the placement logic is the same and tests can check it).
``where`` says where each swapped block's weights are, ``log`` records every move with the phase it happened in.
"""

from __future__ import annotations

import contextlib

import torch

from lowmem_alignprop.settings.errors import UserError

FORWARD, BACKWARD = "forward", "backward"


def swappable_blocks(model) -> list[torch.nn.Module]:
    """The denoiser's swap units in execution order: a flow transformer's joint (then FLUX's single) blocks; a
    UNet's resnets, the transformer blocks of its attentions and its down/upsamplers, block by block (diffusers
    checkpoints a UNet per resnet and per attention transformer block, not per down/up block: a unit must be what
    backward recomputes, or inside it, for its hooks to run there)."""
    model = getattr(model, "module", model)
    if hasattr(model, "transformer_blocks"):
        return list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", None) or [])
    if hasattr(model, "down_blocks"):
        units = []
        for block in list(model.down_blocks) + [model.mid_block] + list(model.up_blocks):
            resnets, attentions = list(block.resnets), list(getattr(block, "attentions", None) or [])
            for j, resnet in enumerate(resnets):
                units.append(resnet)
                if j < len(attentions):  # its transformer blocks: what diffusers checkpoints inside an attention
                    units += list(attentions[j].transformer_blocks)
            units += list(getattr(block, "downsamplers", None) or []) + list(getattr(block, "upsamplers", None) or [])
        return units
    raise TypeError(f"block swap does not know the blocks of {type(model).__name__}")


def _phase() -> str:
    return BACKWARD if torch._C._current_graph_task_id() != -1 else FORWARD


class BlockSwap:
    """Keep ``blocks``' frozen weights on the CPU (pinned on CUDA) and stream them to ``device`` around each use."""

    def __init__(self, blocks: list[torch.nn.Module], device, prefetch: bool = True):
        self.blocks, self.device, self.prefetch = list(blocks), torch.device(device), prefetch
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None  # copies overlap compute
        self.ready: dict[int, torch.cuda.Event] = {}
        self.host: list[list[tuple[torch.nn.Parameter, torch.Tensor]]] = []
        self.where: list[str] = []
        self.log: list[tuple[int, str, str]] = []  # (block index, "device" | "cpu", phase)
        self.most_resident = 0
        self.last: int | None = None  # the block that ran last (its pre-hook)
        self.handles = []
        for i, block in enumerate(self.blocks):
            frozen = [p for p in block.parameters() if not p.requires_grad]  # LoRA weights stay on the device
            pairs = []
            for p in frozen:
                host = p.data.to("cpu")
                host = host.pin_memory() if self.cuda else host  # pinned: asynchronous host-to-device copies
                p.data = host
                pairs.append((p, host))
            self.host.append(pairs)
            self.where.append("cpu")
            self.handles.append(block.register_forward_pre_hook(self._before(i)))
            self.handles.append(block.register_forward_hook(self._after(i)))

    # -- moves -------------------------------------------------------------------------------------------
    def _load(self, i: int) -> None:
        if self.where[i] == "device":
            return
        with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext(), torch.no_grad():
            for p, host in self.host[i]:
                p.data = host.to(self.device, non_blocking=True, copy=True)
        if self.cuda:
            self.ready[i] = torch.cuda.Event()
            self.ready[i].record(self.stream)
        self.where[i] = "device"
        self.log.append((i, "device", _phase()))
        self.most_resident = max(self.most_resident, self.where.count("device"))

    def _unload(self, i: int) -> None:
        for p, host in self.host[i]:
            p.data = host  # the device copy is freed once nothing (a saved tensor of the graph) holds it
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
                for p, _ in self.host[i]:
                    p.data.record_stream(torch.cuda.current_stream())
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
        swapped = {id(p) for pairs in self.host for p, _ in pairs}
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


def install(model, n: int, device) -> BlockSwap | None:
    """Swap the first ``n`` blocks of ``model`` (none for n=0). Raises UserError when it has fewer blocks."""
    if n <= 0:
        return None
    blocks = swappable_blocks(model)
    if n > len(blocks):
        raise UserError(f"block_swap={n} but the model has {len(blocks)} blocks: use --set block_swap={len(blocks)} "
                         "or fewer")
    return BlockSwap(blocks[:n], device)

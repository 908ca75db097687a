"""The counters the planner runs a fake training step under (``measure/planner.py``): dispatch modes that count per
stage the bytes of every live storage (:class:`LiveBytes`, with :class:`Residency` for the weights on the device) and
the work of every op (:class:`StageWork`, with :class:`SwapWindows` for what block swap's copies overlap), the one
mode that runs both (:class:`Counters`), and ``save_on_cpu``'s hooks for a fake CUDA target (:class:`HostSaveOnCpu`)."""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Any, Callable

import torch

from lowmem_alignprop.memory import stages


TEXT_ENCODER = "text_encoder"
MODULE_NAMES = ("unet", "lora", TEXT_ENCODER, "vae", "reward")


class StageCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that counts per stage: :meth:`stage` keeps ``open`` (the open stages, outermost first) and
    calls :meth:`entered` and :meth:`left`, which say what opening and closing a stage means to the counter."""

    def __init__(self):
        super().__init__()
        self.open: list[str] = []

    def entered(self, name: str) -> None:
        pass

    def left(self, name: str) -> None:
        pass

    @contextlib.contextmanager
    def stage(self, name: str):
        if name not in stages.STAGES:
            raise ValueError(f"unknown stage {name!r}")
        self.open.append(name)
        self.entered(name)
        try:
            yield
        finally:
            self.open.remove(name)
            self.left(name)


class LiveBytes(StageCounter):
    """Counts the bytes of every storage an op creates until it is freed; keeps per-stage peaks.

    Weight storages (registered with :meth:`add_static`) are never counted as new allocations: their
    bytes come from ``resident`` (the modules on the device now), set by :class:`Residency`.
    ``round_to`` rounds each storage up like the CUDA caching allocator (1 = exact bytes).
    """

    def __init__(self, round_to: int = 1):
        super().__init__()
        self.round_to = round_to
        self._live: dict[int, tuple[int, Any]] = {}  # id(storage) -> (bytes, weakref)
        self._static: set[int] = set()
        self.dynamic = 0  # bytes of live non-weight storages
        self.resident = 0  # bytes of the weights on the device now
        self.peaks: dict[str, int] = {}
        self.weights_at_peak: dict[str, int] = {}
        self.where: tuple[str, ...] = ()  # the modules on the device now (set by Residency)
        self.where_at_peak: dict[str, tuple[str, ...]] = {}
        self.host_depth = 0  # > 0: new storages live in host memory (activation offload), not counted
        self._host: dict[int, Any] = {}  # id(storage) -> weakref: storages held in host memory (their views too)

    @property
    def current(self) -> int:
        return self.dynamic + self.resident

    def add_static(self, tensors) -> None:
        for t in tensors:
            self._static.add(id(t.untyped_storage()))

    def _rounded(self, n: int) -> int:
        r = self.round_to
        return n if r <= 1 else (n + r - 1) // r * r

    def _freed(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.dynamic -= entry[0]

    def track(self, t: torch.Tensor, nbytes: int | None = None) -> None:
        """Count ``t``'s storage until it is freed, at its size or at ``nbytes`` (a quantized weight's copy, which
        the fake model holds unquantized)."""
        st = t.untyped_storage()
        key = id(st)
        if key in self._live or key in self._static or key in self._host or self.host_depth:
            return
        n = self._rounded(st.nbytes() if nbytes is None else nbytes)
        ref = weakref.ref(st, lambda _r, k=key: self._freed(k))
        self._live[key] = (n, ref)
        self.dynamic += n
        self.bump()

    def bump(self) -> None:
        """Fold the current level into every open stage's peak."""
        cur = self.current
        for name in self.open:
            if cur > self.peaks.get(name, -1):
                self.peaks[name] = cur
                self.weights_at_peak[name] = self.resident
                self.where_at_peak[name] = self.where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.count(out)
        return out

    def count(self, out) -> None:
        """Track the storages of what an op returned."""
        if isinstance(out, torch.Tensor):
            self.track(out)
        elif isinstance(out, (tuple, list)):
            for t in out:
                if isinstance(t, torch.Tensor):
                    self.track(t)
                elif isinstance(t, (tuple, list)):
                    for u in t:
                        if isinstance(u, torch.Tensor):
                            self.track(u)

    def entered(self, name: str) -> None:
        self.bump()  # the level at the stage's start is already its peak

    def copy_to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` in host memory: not counted, nor are the views made of it later."""
        with self.host():
            copy = t.clone()
        st = copy.untyped_storage()
        self._host[id(st)] = weakref.ref(st, lambda _r, k=id(st): self._host.pop(k, None))
        return copy

    @contextlib.contextmanager
    def host(self):
        self.host_depth += 1
        try:
            yield
        finally:
            self.host_depth -= 1


class Residency:
    """The trainer's :class:`~lowmem_alignprop.memory.placement.Placement`, as bookkeeping: which modules' weights
    are on the device now. Nothing moves (everything is fake); the counter's ``resident`` follows."""

    def __init__(self, counter: LiveBytes, weights: dict[str, int], offload: bool, host: bool = False):
        self.counter = counter
        self.weights = weights
        self.offload_enabled = offload
        self.host = host  # the device is the CPU: "offloading" moves nothing, every module stays in memory
        self.extra = 0  # bytes resident in every stage besides the modules (a dequantized layer)
        self.on_device = set(weights)
        self.on_move: Callable[[int], None] | None = None  # bytes copied host <-> device (StageWork's count)
        self.host_held = 0  # bytes of tensors moved to host memory with to_host (a large prompt cache)

    def _set(self, name: str, on: bool) -> None:
        if not self.host:
            if self.on_move is not None and (name in self.on_device) != on:
                self.on_move(self.weights.get(name, 0))  # the module's weights cross PCIe (either way)
            (self.on_device.add if on else self.on_device.discard)(name)
        self.refresh()

    def refresh(self) -> None:
        self.counter.resident = self.extra + sum(self.weights.get(n, 0) for n in self.on_device)
        order = {n: i for i, n in enumerate(MODULE_NAMES + ("optimizer_state", "ema"))}
        self.counter.where = tuple(sorted((n for n in self.weights if n in self.on_device and self.weights[n]),
                                          key=lambda n: order.get(n, len(order))))
        self.counter.bump()

    def to_device(self, name: str, *modules) -> None:
        self._set(name, True)

    def park(self, name: str, *modules) -> None:
        self._set(name, not self.offload_enabled)

    def offload(self, name: str, *modules) -> None:
        self._set(name, False)

    def to_host(self, tensors):
        """Placement.to_host: the copy is in host memory (not counted; ``host_held``), the device's is freed once
        dropped (on a CPU target nothing moves: it is the memory counted)."""
        if self.host:
            return tensors
        self.host_held += tensors.nbytes()
        if self.on_move is not None:
            self.on_move(tensors.nbytes())
        return tensors._map(self.counter.copy_to_host, shared_too=True)

    def from_host(self, tensors):
        """Placement.from_host: the copy on the device is counted."""
        if self.host:
            return tensors
        if self.on_move is not None:
            self.on_move(tensors.nbytes())
        return tensors._map(torch.clone, shared_too=True)


class EncodedOnce:
    """The pipeline (any attribute its own), whose ``encode_prompt`` runs for the first and the last chunk of each
    size (16 prompts, and the set's remainder) and makes new tensors of the same shapes for the chunks between: the
    prompt cache holds the same memory, and the text encoder's activations for a chunk of a size peak highest on top
    of the cache at that size's last chunk, as encoding every chunk would (a plan of 100k prompts encoded 6,250
    chunks on fake tensors: half an hour for SD1.5)."""

    def __init__(self, pipe, prompts):
        self.__dict__.update(_pipe=pipe, _left=len(set(prompts)), _shapes={})

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __setattr__(self, name, value):  # (a run's final encoder drops the pipeline's text encoders)
        setattr(self._pipe, name, value)

    def encode_prompt(self, *args, **kwargs):
        prompts = kwargs["prompt"] if "prompt" in kwargs else args[0]
        n = len(prompts) if isinstance(prompts, (list, tuple)) else 1
        self.__dict__["_left"] -= n
        if n in self._shapes and self._left >= n:  # a chunk between its size's first and last
            return tuple(s() if isinstance(s, functools.partial) else s for s in self._shapes[n])
        out = self._pipe.encode_prompt(*args, **kwargs)  # (a tuple of tensors and Nones, for every pipeline)
        self._shapes[n] = [functools.partial(torch.empty, t.shape, dtype=t.dtype, device=t.device)
                           if isinstance(t, torch.Tensor) else t for t in out]
        return out


# pcie_bytes: every host <-> device copy; swap_bytes: the part of them that block swap's copies are (they overlap
# compute: devices.swap_seconds)
WORK_KEYS = ("matmul_flops", "attention_flops", "other_bytes", "ops", "pcie_bytes", "dequant_bytes", "swap_bytes")
AFTER = "+after"  # StageWork's bucket for the work between a stage and the next (parking modules after backward)


def _sdpa_cpu_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


def _flop_formulas() -> dict:
    """torch.utils.flop_counter's per-op formulas (what FlopCounterMode counts: 2*m*n*k per matmul, convolutions,
    fused attention forward and backward), plus the CPU flash-attention kernels fake CPU tensors dispatch to."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    formulas = dict(flop_registry)
    formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flops
    return formulas


def _attention_ops() -> frozenset:
    aten = torch.ops.aten
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
             "_flash_attention_forward", "_flash_attention_backward", "_efficient_attention_forward",
             "_efficient_attention_backward", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_flash_attention_for_cpu_backward")
    return frozenset(getattr(aten, n) for n in names if hasattr(aten, n))


def _tensor_bytes(tree) -> int:
    from torch.utils._pytree import tree_leaves
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


# ops that launch no kernel and move no bytes: prim.device (a tensor's .device, asked ~1,000 times per UNet call by
# diffusers and autograd; counted, it was 40-60% of a call's elementwise bytes) and the profiler's range markers
NO_KERNEL_NAMESPACES = frozenset({"prim", "profiler"})


class StageWork(StageCounter):
    """The work of every op, per stage: floating-point operations of matmuls/convolutions and of attention (the
    formulas of ``torch.utils.flop_counter.FlopCounterMode``, which work on fake tensors), the bytes every other
    op reads and writes (views move nothing), the ops launched, and (added by the planner) host <-> device bytes
    and dequantized weight bytes. Runs as well in backward, so checkpoint recomputes count where they happen.
    Work outside any stage is kept apart, after the stage that closed last (not scaled with K)."""

    def __init__(self):
        super().__init__()
        self.formulas = _flop_formulas()
        self.attention = _attention_ops()
        self.work: dict[str, dict[str, int]] = {}
        self.last: str | None = None
        self.unet_calls: dict[str, int] = {}
        self.marks: dict[str, dict[str, int]] = {}  # e.g. backward's work when its first UNet recompute began
        self.quiet = 0  # > 0: ops are not counted (work the planner adds itself, e.g. block swap's copies)
        self.window_marks: list[tuple[Any, dict[str, int]]] = []  # see window_output
        self.swap_windows: SwapWindows | None = None  # block swap on a GPU: what each copy overlaps
        self.window_labels: set = set()
        # the work each window call's backward adds for summing its trained weights' gradients into another call's
        # (autograd adds each further contribution to a tensor's gradient: one add per trained tensor), set by the
        # planner; the call that backward reaches first finds nothing to add to (step_time._backward_work)
        self.accumulation: dict[str, int] = dict.fromkeys(WORK_KEYS, 0)

    def bucket_name(self) -> str | None:
        return self.open[-1] if self.open else None if self.last is None else self.last + AFTER

    def bucket(self) -> dict[str, int] | None:
        name = self.bucket_name()
        return None if name is None else self.work.setdefault(name, dict.fromkeys(WORK_KEYS, 0))

    def add(self, key: str, n: int) -> None:
        b = self.bucket()
        if b is not None:
            b[key] += int(n)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.count(func, args, kwargs, out)
        return out

    def count(self, func, args, kwargs, out) -> None:
        """Add the work of one op (``out``: what it returned) to the open stage's bucket."""
        b = self.bucket()
        if b is None or func.namespace in NO_KERNEL_NAMESPACES or self.quiet:
            return
        packet = func._overloadpacket
        formula = self.formulas.get(packet)
        if formula is not None:
            b["attention_flops" if packet in self.attention else "matmul_flops"] += int(formula(*args, **kwargs,
                                                                                               out_val=out))
            b["ops"] += 1
        elif not func.is_view:
            b["other_bytes"] += _tensor_bytes((args, kwargs, out))  # read the inputs, write the outputs
            b["ops"] += 1

    def entered(self, name: str) -> None:
        self.bucket()  # a stage that runs no op still has its (zero) work

    def left(self, name: str) -> None:
        self.last = name  # work until the next stage opens goes to name + AFTER

    @contextlib.contextmanager
    def uncounted(self):
        self.quiet += 1
        try:
            yield
        finally:
            self.quiet -= 1

    def window_output(self, output, label) -> None:
        """``output``: the result of a call of grad-window step ``label`` (or DRaFT-LV's "lv"). When backward first
        reaches an output of that step, its backward begins: :attr:`window_marks` gets (label, the work so far),
        in the order backward reaches them (each step's backward runs until the next mark)."""
        def mark(grad):
            if label not in self.window_labels and self.open and self.open[-1] == stages.BACKWARD:
                self.window_labels.add(label)
                self.window_marks.append((label, dict(self.bucket())))
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(mark)

    def unet_call(self) -> None:
        """A UNet call begins (forward, or its recompute in backward)."""
        name = self.open[-1] if self.open else None
        if name is None:
            return
        self.unet_calls[name] = self.unet_calls.get(name, 0) + 1
        if name == stages.BACKWARD and "backward_unet" not in self.marks:
            self.marks["backward_unet"] = dict(self.bucket())


class Counters(torch.utils._python_dispatch.TorchDispatchMode):
    """The estimate's one dispatch mode: a :class:`LiveBytes` counter for every op and, inside :meth:`work_counted`,
    a :class:`StageWork` as well: what the two modes stacked counted (the counter first, as the inner mode), with
    each op through one Python handler instead of two (a fake step's op costs mostly dispatch)."""

    def __init__(self, counter: LiveBytes, work: StageWork):
        super().__init__()
        self.counter, self.work, self.working = counter, work, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.equal.default and not any(a.is_floating_point() for a in args):
            # fake tensors hold no values to compare; token ids (integers) are compared by the pipelines' warning of
            # a prompt cut at the encoder's length: "equal" (no warning). Images (a user reward's) still fail it
            return True
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.counter.count(out)
        if self.working:
            self.work.count(func, args, kwargs, out)
        return out

    @contextlib.contextmanager
    def work_counted(self):
        self.working = True
        try:
            yield
        finally:
            self.working = False


class HostSaveOnCpu(torch.autograd.graph.saved_tensors_hooks):
    """``save_on_cpu`` for a fake CUDA target: the packed copy lives in host memory (not counted) and the
    device original is freed once nothing else holds it; unpacking copies back to the device (counted).
    ``work`` (a StageWork) counts both copies' bytes as host <-> device traffic."""

    def __init__(self, counter: LiveBytes, work: "StageWork | None" = None):
        def pack(t):
            if work is not None:
                work.add("pcie_bytes", t.numel() * t.element_size())
            with counter.host():
                return t.clone()

        def unpack(t):
            if work is not None:
                work.add("pcie_bytes", t.numel() * t.element_size())
            return t.clone()

        super().__init__(pack, unpack)


class SwapWindows:
    """What each of block swap's copies overlaps on a GPU (:func:`devices.swap_seconds`): the work counted from the
    copy's start (the pre-hook that loads or prefetches its block: memory/block_swap.py) to its block's next
    pre-hook, where the compute stream waits for it. Per stage, grouped by (the block copied, the block whose
    pre-hook started the copy, whether any work overlapped it), blocks told apart by class and size: a group's
    copies then have one copy-to-window ratio."""

    def __init__(self, work: StageWork):
        self.work, self.swap = work, None
        self.open: dict[int, list] = {}  # block -> [bucket, work so far, group key, bytes] while its copy is in flight
        self.groups: dict[str, dict[tuple, list]] = {}  # bucket -> group -> [bytes, window work]

    def _kind(self, i: int | None):
        if i is None:
            return None
        block = self.swap.blocks[i]
        return type(block).__name__, sum(p.numel() for p in block.parameters())

    def copied(self, n: int) -> None:
        """``n`` bytes of the block being loaded are copied now."""
        i = self.swap.loading
        if i not in self.open:
            name = self.work.bucket_name()
            self.open[i] = [name, dict(self.work.bucket() or {}), (self._kind(i), self._kind(self.swap.last)), 0]
        self.open[i][3] += n

    def waited(self, i: int):
        """Block ``i``'s pre-hook: the compute stream waits for its copy here, which closes the copy's window."""
        def hook(module, args):
            rec = self.open.pop(i, None)
            if rec is None:
                return
            name, before, key, n = rec
            now = self.work.bucket() if self.work.bucket_name() == name else None
            window = {k: (now[k] - before.get(k, 0) if now is not None else 0) for k in WORK_KEYS}
            window["pcie_bytes"] = window["swap_bytes"] = 0  # the other copies in flight are not compute
            key = key if any(window.values()) else (key[0], None)  # nothing to hide behind: its own group
            group = self.groups.setdefault(name, {}).setdefault(key, [0, dict.fromkeys(WORK_KEYS, 0)])
            group[0] += n
            for k, v in window.items():
                group[1][k] += v
        return hook

    def per_stage(self) -> dict[str, list]:
        """Stage -> [[bytes, window work] per group] (a stage's own work and what follows it until the next)."""
        out: dict[str, list] = {}
        for name, groups in self.groups.items():
            out.setdefault(name.removesuffix(AFTER), []).extend([b, w] for b, w in groups.values())
        return out

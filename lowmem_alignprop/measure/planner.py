"""``lowmem-alignprop plan``: will this configuration fit the card? Answered without a GPU and without weights.

How (docs/design.md section 4):

1. The models are built from their architecture configs on the ``meta`` device in the target dtype
   (``--model sd15|sd21|sdxl``: the shipped configs; ``tiny``, a diffusers directory or a cached hub
   snapshot: its config files; a single-file checkpoint: the detected architecture). Model rewards
   (aesthetic, clip, pickscore, hpsv2) are CLIP architectures built from config the same way.
2. The trainer's own :func:`~lowmem_alignprop.commands.train.apply_memory_features` casts, freezes, picks
   attention and checkpointing and adds LoRA, still on meta.
3. Inside ``FakeTensorMode(allow_non_fake_inputs=True)`` the modules get fake CPU storage
   (``to_empty(device="cpu")``: no memory behind it), and one training step runs through the trainer's
   :func:`~lowmem_alignprop.commands.train.rollout_loss`: encode_prompts, sample_nograd, sample_grad, decode,
   reward, backward, optimizer (after one warm-up optimizer step, so Adam's state exists as it does
   from step 2 on). A small ``TorchDispatchMode`` counts the bytes of every live storage (freed ones
   leave through weak-reference callbacks) and keeps the peak per stage. Module weights count only in
   the stages where they sit on the device (``offload_frozen``, ``cache_prompt_embeddings``).
4. On a CUDA target, ``torch.autocast("cuda")`` is emulated (its op lists: convolutions, matmuls and
   attention in fp16/bf16; norms, upsampling, softmax, pow, exp... in fp32), because the CPU autocast
   has different lists and a CUDA fake tensor cannot run on a CPU-only build.

What fake tensors cannot see is added as explicit, printed allowances (:data:`ALLOWANCES`): the CUDA
context, the caching allocator's rounding and fragmentation, cuBLAS/cuDNN workspaces.

Cost control: the no-grad steps leave nothing behind, so one is simulated; the grad window is simulated
with ``min(K, 2)`` steps and the bytes each further step keeps (its checkpoint input and scheduler
graph, measured between the two) are added for the remaining ``K - 2`` steps. Randomized K is
planned at ``k_max``, its worst case.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import random
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lowmem_alignprop.memory import stages
from lowmem_alignprop.settings.config import Config, set_flags
from lowmem_alignprop.settings.errors import UserError, first_line
from lowmem_alignprop.memory.precision import frozen_weight_dtype
from lowmem_alignprop.measure.devices import device_for
from lowmem_alignprop.measure.profiler import provenance
from lowmem_alignprop.step.rollout import apply_memory_features, rollout_loss
from lowmem_alignprop.step.update import optimizer_update
from lowmem_alignprop.memory.allowances import (ALLOWANCES, CUDA_BLOCK, FIXED_SEGMENTS_BYTES_PER_512PX, GIB, MIB,
                                                RESERVED_FACTOR, WORKSPACE_BYTES)
from lowmem_alignprop.memory.recompute import recompute_inside
from lowmem_alignprop.memory.quant import BNB_MODES

PLAN_LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate")  # in plan --json's "versions"
TEXT_ENCODER = "text_encoder"
MODULE_NAMES = ("unet", "lora", TEXT_ENCODER, "vae", "reward")

# Model rewards are CLIP architectures: (vision, text, projection) sizes of the public checkpoints.
_VIT_L14 = dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=224, patch_size=14, hidden_act="quick_gelu"),
                text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          hidden_act="quick_gelu"),
                projection_dim=768)  # openai/clip-vit-large-patch14 (aesthetic, clip)
_VIT_H14 = dict(vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                            image_size=224, patch_size=14, hidden_act="gelu"),
                text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          hidden_act="gelu"),
                projection_dim=1024)  # laion ViT-H-14 (pickscore, hpsv2)
REWARD_ARCH = {"aesthetic": ("ViT-L/14", _VIT_L14), "clip": ("ViT-L/14", _VIT_L14),
               "pickscore": ("ViT-H/14", _VIT_H14), "hpsv2": ("ViT-H/14", _VIT_H14)}


# ---------------------------------------------------------------------------------------------------
# counting live storages
# ---------------------------------------------------------------------------------------------------
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
        if key in self._live or key in self._static or self.host_depth:
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


# ---------------------------------------------------------------------------------------------------
# counting the work of each stage (the time estimate)
# ---------------------------------------------------------------------------------------------------
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


class _Counters(torch.utils._python_dispatch.TorchDispatchMode):
    """The estimate's one dispatch mode: a :class:`LiveBytes` counter for every op and, inside :meth:`work_counted`,
    a :class:`StageWork` as well: what the two modes stacked counted (the counter first, as the inner mode), with
    each op through one Python handler instead of two (a fake step's op costs mostly dispatch)."""

    def __init__(self, counter: LiveBytes, work: StageWork):
        super().__init__()
        self.counter, self.work, self.working = counter, work, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
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


# ---------------------------------------------------------------------------------------------------
# torch.autocast("cuda") emulated on fake CPU tensors
# ---------------------------------------------------------------------------------------------------
# ATen's CUDA autocast lists (aten/src/ATen/autocast_mode.h) where they differ from the CPU's, by Python name.
# The CPU autocast already casts convolutions, linear layers, matmuls and attention down (with the same weight
# cache); these few lower-precision ops are CUDA-only ...
_LOWER_CUDA_ONLY = frozenset({"addmv", "addr", "einsum", "mv", "chain_matmul", "linalg_multi_dot"})
# ... and these run in fp32 on CUDA but not on the CPU: norms, upsampling, pow/exp/log..., losses
_FP32 = frozenset({"acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
                   "rsqrt", "sinh", "tan", "pow", "softplus", "layer_norm", "group_norm", "cosine_similarity",
                   "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "kl_div", "nll_loss",
                   "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
                   "interpolate"})
# ... and these reductions return fp32 for fp16/bf16 inputs on CUDA
_FP32_OUT = frozenset({"softmax", "log_softmax", "cumsum", "cumprod", "prod", "sum", "norm", "vector_norm",
                       "matrix_norm"})


class CudaAutocast(torch.overrides.TorchFunctionMode):
    """``torch.autocast("cuda", dtype)`` on fake CPU tensors: the real CPU autocast in that dtype (it casts
    convolutions, linear layers, matmuls and attention down, with autocast's own weight cache) plus this
    mode, which adds CUDA's differences above autograd (so its casts are saved for backward as real
    autocast's are): norms, upsampling, pow/exp/log and losses in fp32, reductions with fp32 output, a few
    more ops cast down. It acts only while CPU autocast is on, so ``torch.autocast(enabled=False)``
    regions (decode of a VAE kept in its own dtype) are honoured.

    A mode is off inside its own handler, where ``loss.backward()`` runs, so the autograd engine would run a
    checkpoint's recompute without it (and fail checkpointing's dtype check): :meth:`replay_in_recompute` makes
    every checkpoint the package makes re-enter it for its recompute, through torch's public ``context_fn``
    (:mod:`lowmem_alignprop.memory.recompute`; the CPU autocast state is replayed by checkpointing itself)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def active(self):
        return torch.autocast("cpu", dtype=self.dtype)

    def replay_in_recompute(self):
        """While active, every checkpoint made by :func:`memory.recompute.checkpoint` re-enters this mode in its
        recompute."""
        dtype = self.dtype
        return recompute_inside(lambda: CudaAutocast(dtype))

    def _lower(self, t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype == torch.float32:
            return t.to(self.dtype)
        return t

    @staticmethod
    def _upper(t):
        if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16):
            return t.float()
        return t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not (name in _FP32 or name in _FP32_OUT or name in _LOWER_CUDA_ONLY) \
                or not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        from torch.utils._pytree import tree_map
        if name in _LOWER_CUDA_ONLY:
            return func(*tree_map(self._lower, args), **tree_map(self._lower, kwargs))
        if name in _FP32:
            if name == "interpolate" and (kwargs.get("mode") or (args[3] if len(args) > 3 else "nearest")) == "area":
                return func(*args, **kwargs)  # area interpolation is adaptive pooling: not on the fp32 list
            return func(*tree_map(self._upper, args), **tree_map(self._upper, kwargs))
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.dtype in (torch.float16, torch.bfloat16) \
                and kwargs.get("dtype") is None:
            try:
                return func(*args, **dict(kwargs, dtype=torch.float32))  # autocast's fp32 output for reductions
            except TypeError:
                return func(self._upper(first), *args[1:], **kwargs)
        return func(*args, **kwargs)


class _RealTimesteps:
    """The components' scheduler for a step on fake tensors: its tables are real tensors made outside fake mode and
    its timesteps plain ints, so DDIM's step indexes them with an int (a fake index would be data-dependent). Every
    other attribute is the scheduler's own."""

    def __init__(self, scheduler):
        self._scheduler = scheduler

    def __getattr__(self, name):
        return getattr(self._scheduler, name)

    def set_timesteps(self, n, device=None, **kw):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            self._scheduler.set_timesteps(n, device="cpu", **kw)
            self._scheduler.timesteps = [int(t) for t in self._scheduler.timesteps]  # slicing them stays real

    def step(self, model_output, timestep, sample, *a, **kw):
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        if isinstance(timestep, torch.Tensor):
            with unset_fake_temporarily():
                timestep = int(timestep)
        return self._scheduler.step(model_output, timestep, sample, *a, **kw)


class _HostSaveOnCpu(torch.autograd.graph.saved_tensors_hooks):
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


# ---------------------------------------------------------------------------------------------------
# components on meta
# ---------------------------------------------------------------------------------------------------
_META_CACHE: dict[tuple, Any] = {}


def _dir_components(root: Path, dtype: torch.dtype) -> dict:
    """unet, vae, text encoder(s) on meta and tokenizer(s), scheduler from a diffusers directory's configs."""
    import diffusers
    import transformers

    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{root} has no readable model_index.json: pass a diffusers model directory") from None
    from lowmem_alignprop.models.arch import modules_from_configs

    out = modules_from_configs(root, index, device="meta", dtype=dtype)
    for tok in ("tokenizer", "tokenizer_2"):
        if index.get(tok) and index[tok][1]:
            out[tok] = transformers.AutoTokenizer.from_pretrained(root, subfolder=tok)
    sched = getattr(diffusers, index["scheduler"][1])
    out["scheduler"] = sched.from_config(sched.load_config(root, subfolder="scheduler"))
    return out


def _hub_snapshot(repo: str) -> Path:
    """The configs of a hub id from the local cache (the planner never downloads), or a UserError."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True,
                                      allow_patterns=["*.json", "*.txt", "tokenizer*/*"]))
    except Exception:  # not in the local cache
        raise UserError(f"plan needs the architecture of {repo!r} but it is not in the local Hugging Face cache: "
                        "use --model sd15|sd21|sdxl|sd35m|sd35l|flux for its architecture, or a local diffusers "
                        "directory") from None


def _hub_config_dir(repo: str) -> Path:
    from lowmem_alignprop.models.model_check import check_model_dir

    root = _hub_snapshot(repo)
    check_model_dir(root, repo)  # the cached configs of a complete SD model
    return root


def meta_components(cfg: Config, dtype: torch.dtype):
    """The model of ``cfg.model`` on meta (no weights), as :class:`~lowmem_alignprop.models.loading.Components`.

    Built once per (model, dtype) (:func:`_meta_base`); each call returns fresh deep copies of the modules, because
    the memory features modify them in place."""
    base = _meta_base(cfg, dtype)
    fresh = copy.copy(base)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(base, name)
        if module is not None:
            setattr(fresh, name, copy.deepcopy(module))
    fresh.scheduler = copy.deepcopy(base.scheduler)
    return fresh


def _meta_base(cfg: Config, dtype: torch.dtype):
    """The cached meta model of ``cfg.model`` in ``dtype``, built on first use. Shared: read it, never modify it
    (:func:`meta_components` gives copies to modify)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from lowmem_alignprop.models.loading import Components, is_flow_hub_id, resolve_model

    key = (cfg.model, cfg.model_arch, getattr(cfg, "vae", ""), dtype, cfg.model_components, cfg.t5_encoder)
    kind, where = resolve_model(cfg.model)
    if key not in _META_CACHE and (kind.startswith("flow") or cfg.model_components
                                   or (kind == "hub" and is_flow_hub_id(where, cache_only=True))):
        _META_CACHE[key] = _flow_meta_components(cfg, kind, where, dtype)  # SD3/FLUX: a transformer
    if key not in _META_CACHE:
        if kind == "tiny":
            from lowmem_alignprop.models.tiny import tiny_model_dir
            parts, source = _dir_components(tiny_model_dir(), dtype), "tiny (built-in)"
        elif kind in ("arch", "file"):
            from lowmem_alignprop.models.arch import build_random_components, detect_arch
            arch = where if kind == "arch" else (cfg.model_arch if cfg.model_arch != "auto" else detect_arch(where))
            parts, source = build_random_components(arch, device="meta", dtype=dtype), f"{arch} architecture"
        elif kind == "dir":
            parts, source = _dir_components(Path(where), dtype), where
        else:
            parts, source = _dir_components(_hub_config_dir(where), dtype), f"{where} (configs from the HF cache)"
        is_sdxl = parts.get("text_encoder_2") is not None
        comps = Components(**{k: v for k, v in parts.items() if k in Components.__dataclass_fields__},
                           is_sdxl=is_sdxl, source=source,
                           pipeline_class=StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline)
        from lowmem_alignprop.models.sampling import ddim_scheduler
        comps.scheduler = ddim_scheduler(comps.scheduler.config)
        if getattr(cfg, "vae", ""):
            comps.vae = _meta_vae_override(cfg.vae, comps.vae, dtype)
        _META_CACHE[key] = comps
    return _META_CACHE[key]


def _flow_meta_components(cfg: Config, kind: str, where: str, dtype: torch.dtype):
    """SD3/FLUX on meta: a shipped architecture, a model folder's configs, or (a single-file transformer) the
    configs of its ``model_components`` folder."""
    from lowmem_alignprop.models import flow_loading as fl
    from lowmem_alignprop.models.loading import flow_components

    if kind == "flow_arch":
        pipe = fl.build_flow_components(where, device="meta", dtype=dtype, t5=cfg.t5_encoder)
    else:
        root = Path(where if kind == "flow_dir" else cfg.model_components).expanduser()
        if kind == "hub" and not cfg.model_components:
            root = _hub_snapshot(where)
        # a single file: the folder's config as the loader reads it (FLUX: dev or schnell as the file's keys say)
        config = fl.single_file_transformer(where, cfg.model_components)[1] if kind == "file" else None
        pipe = fl.flow_pipeline_from_configs(root, device="meta", dtype=dtype, t5=cfg.t5_encoder,
                                             transformer_config=config)
    comps = flow_components(pipe, cfg, f"{where} (configs only)", dtype, meta=True)
    if getattr(cfg, "vae", ""):
        comps.vae = _meta_vae_override(cfg.vae, comps.vae, dtype)
    return comps


def _meta_vae_override(spec: str, vae, dtype: torch.dtype):
    """``--set vae=...``: a local folder's config on meta; otherwise (hub id, single file) the model's own VAE
    architecture with force_upcast off (what an fp16-fix VAE such as madebyollin/sdxl-vae-fp16-fix is)."""
    import diffusers

    from lowmem_alignprop.models.arch import default_dtype

    p = Path(spec).expanduser()
    for folder in (p, p / "vae"):
        if (folder / "config.json").is_file():
            with torch.device("meta"), default_dtype(dtype):
                new = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(folder))
            return new.requires_grad_(False).eval()
    vae.register_to_config(force_upcast=False)
    return vae


def _clip_config_for(name: str, weights: str):
    """The CLIPConfig of a model reward: from a local weights directory when one is given, else the public
    architecture (ViT-L/14 for aesthetic/clip, ViT-H/14 for pickscore/hpsv2)."""
    from transformers import CLIPConfig

    candidates = []
    for part in (weights or "").split(","):
        p = Path(part.strip()).expanduser()
        if part.strip() and p.is_dir():
            candidates += [p / "clip", p]
    for c in candidates:
        if (c / "config.json").is_file():
            try:
                config = CLIPConfig.from_pretrained(str(c))
                return config, f"{name}: CLIP from {c / 'config.json'}", c
            except Exception:  # noqa: BLE001 - not a CLIPConfig: fall back to the public architecture
                continue
    label, arch = REWARD_ARCH[name]
    config = CLIPConfig(text_config=arch["text"], vision_config=arch["vision"], projection_dim=arch["projection_dim"])
    return config, f"{name}: CLIP {label} built from config (random weights on meta)", None


def _clip_tokenizer(directory: Path | None):
    if directory is not None and any((directory / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(directory))
    from transformers import CLIPTokenizer

    from lowmem_alignprop.models.arch import clip_bpe
    vocab, merges = clip_bpe()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=77)


def _model_reward_on_meta(name: str, weights: str, checkpointing: bool, notes: list[str]):
    from transformers import CLIPModel

    from lowmem_alignprop.rewards import clip_rewards as cr

    config, note, directory = _clip_config_for(name, weights)
    notes.append(note)
    with torch.device("meta"):
        model = CLIPModel(config)
    preprocess = cr.ClipPreprocess(config.vision_config.image_size, config.vision_config.image_size)
    if name == "aesthetic":
        model.text_model = None  # as build_aesthetic: the text tower is dropped
        model.text_projection = None
        with torch.device("meta"):
            head = cr.AestheticHead(config.projection_dim)
        return cr.AestheticReward(model, head, preprocess, checkpointing)
    cls = {"clip": cr.ClipScoreReward, "pickscore": cr.PickScoreReward, "hpsv2": cr.HPSv2Reward}[name]
    return cls(model, _clip_tokenizer(directory), preprocess, checkpointing)


def meta_reward(cfg: Config, dtype: torch.dtype, notes: list[str]):
    """The reward of ``cfg.reward`` on meta, through the trainer's own :func:`~lowmem_alignprop.rewards.build_reward`:
    weight-free and user rewards as the trainer builds them, model rewards from their CLIP architecture (random
    weights, nothing loaded)."""
    from lowmem_alignprop import rewards as R

    class MetaRewards(R.RewardBuilder):
        def model(self, name: str, *, weights: str, checkpointing: bool):
            _check_weights_exist(name, weights)  # a mistyped path fails here as in training, not as a default plan
            return _model_reward_on_meta(name, weights, checkpointing, notes)

        def user(self, term: str, options: dict):
            module = super().user(term, options)
            notes.append(f"reward {term}: user reward built with device='meta'")
            return module

    return R.build_reward(cfg.reward, device="meta", dtype=dtype, checkpointing=cfg.reward_checkpointing,
                          weights=cfg.reward_weights, builder=MetaRewards())


def _check_weights_exist(name: str, weights: str) -> None:
    """A model reward's local weights path that does not exist: the UserError training would give."""
    from lowmem_alignprop.rewards.clip_rewards import FLAG, _looks_like_path

    for part in filter(None, (x.strip() for x in weights.split(","))):
        path = Path(part).expanduser()
        local = _looks_like_path(part) or path.parent.is_dir() and str(path.parent) != "."  # w/x with w/ here
        if local and not path.exists():
            raise UserError(f"{name} reward: {part} does not exist; fix the path in {FLAG}")


# ---------------------------------------------------------------------------------------------------
# one training step, shared by the estimate (fake tensors) and the CPU measurement (real tensors)
# ---------------------------------------------------------------------------------------------------
@dataclass
class StepParts:
    cfg: Config
    comps: Any
    pipe: Any
    reward: Any
    params: list
    optimizer: Any
    prompts: list[str]
    place: Any
    stage: Callable
    autocast: Callable[[], Any] = contextlib.nullcontext
    run_optimizer: bool = True
    scheduler: Any = None  # None: the components' own
    saved_tensors: Callable[[], Any] | None = None  # activation_offload's hooks; None: torch's save_on_cpu
    encoder: Any = None  # SD3/FLUX: the prompt cache filled at load (encode_at_load); None: made in the step


def warm_up_optimizer(parts: StepParts) -> None:
    """One optimizer step on zero gradients: Adam's state exists, as it does from step 2 on. With
    gradient accumulation the gradients stay allocated (the last micro-step finds them there)."""
    for p in parts.params:
        p.grad = torch.zeros_like(p)
    if parts.run_optimizer:
        parts.optimizer.step()
    if parts.cfg.grad_accum == 1:
        parts.optimizer.zero_grad(set_to_none=True)


def encode_at_load(parts: StepParts, *, final: bool = False):
    """SD3/FLUX: the prompt set encoded as the trainer does it, while loading (commands/train.py): before the
    transformer is read, the LoRA, the optimizer state and the reward exist. ``final`` frees the text encoders after
    (the CPU measurement; the estimate's :class:`Residency` only stops counting them). Returns the filled cache."""
    from lowmem_alignprop.models.family import family_for

    encoder = family_for(parts.comps).prompt_encoder(parts.pipe, parts.comps, parts.place, torch.device("cpu"),
                                                     parts.cfg, prompts=parts.prompts, final=final)
    with parts.stage(stages.LOAD):
        encoder.encode_all()
    return encoder


def run_step(parts: StepParts, *, k: int, seed: int = 0):
    """One micro-step plus the optimizer step, as :meth:`~lowmem_alignprop.commands.train.Trainer.train_step` runs
    them (the same rollout_loss and optimizer_update, placement calls included). Returns what stays alive afterwards
    (the prompt cache and the batch's embeddings)."""
    from lowmem_alignprop.models.family import family_for

    cfg, comps, place, stage = parts.cfg, parts.comps, parts.place, parts.stage
    family = family_for(comps)  # UNet (DDIM) or flow transformer (Euler), as the trainer
    device = torch.device("cpu")
    rng = random.Random(seed)
    batch_prompts = [rng.choice(parts.prompts) for _ in range(cfg.batch_size)]
    # the first step's worst case with caching: every prompt encoded (16 at a time), then the encoder leaves;
    # SD3/FLUX's set was encoded at load (encode_at_load): their step only looks its batch up
    encoder = parts.encoder or family.prompt_encoder(parts.pipe, comps, place, device, cfg, prompts=parts.prompts)
    with stage(stages.ENCODE_PROMPTS):
        emb = encoder(batch_prompts)
    cache = encoder.cache
    g = torch.Generator().manual_seed(seed)
    latents = family.initial_latents(cfg, cfg.batch_size, g, device)
    with parts.autocast():
        loss, rewards = rollout_loss(cfg, comps.unet, comps.unet, parts.scheduler or comps.scheduler, comps.vae,
                                     parts.reward, latents, emb, batch_prompts, k=k, generator=g, stage=stage,
                                     place=place, saved_tensors=parts.saved_tensors, family=family)
    with stage(stages.BACKWARD):
        loss.backward()  # gradients reach only the LoRA weights (checkpoints replay the forward's autocast)
    del latents, loss, rewards
    place.park("vae", comps.vae)
    place.park("reward", parts.reward)
    with stage(stages.OPTIMIZER):  # the trainer's own update: clip, step, free the gradients
        optimizer_update(parts.optimizer, parts.params, cfg.max_grad_norm, step=parts.run_optimizer,
                         read_norm=False)
    return cache, emb


# ---------------------------------------------------------------------------------------------------
# the estimate
# ---------------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    target: str  # "cuda" or "cpu"
    stages: dict[str, dict]  # stage -> {"allocated", "weights", "reserved" (bytes), "on_device" (module names)}
    peak_allocated: int
    peak_stage: str
    peak_needed: int  # what must fit the budget: reserved estimate + workspaces on CUDA
    weights: dict[str, int]  # module -> bytes
    k_planned: int
    k_simulated: int
    per_k_bytes: int  # what each checkpointed grad step beyond the simulated ones keeps
    step_start: int  # bytes on the device when the step begins (weights there, optimizer state, kept gradients)
    seconds: float
    notes: list[str] = field(default_factory=list)
    # stage -> the work of one optimizer step's share of it (StageWork's keys; micro-step stages per micro-step),
    # scaled from the simulated step to all T steps and the mean K (step_work)
    work: dict[str, dict[str, float]] = field(default_factory=dict)
    host_pinned: int = 0  # block swap: the swapped blocks' frozen weights in pinned host memory, as stored
    host: dict[str, int] = field(default_factory=dict)  # a GPU target's host memory: {"load", "steps"} (host_memory)
    per_kept_bytes: int = 0  # what each kept grad step (window_keep) beyond the simulated ones keeps
    # block swap on a GPU: stage -> [[copy bytes, the work it overlaps] per group] of the simulated step (SwapWindows)
    swap_windows: dict[str, list] = field(default_factory=dict)

    def fits(self, budget_gb: float) -> bool | None:
        return None if not budget_gb else self.peak_needed <= budget_gb * GIB

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def _fp8_load_bytes(cfg: Config, comps, counter: LiveBytes, cuda: bool) -> int:
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


def _adam8bit_state_bytes(params) -> int:
    # bitsandbytes: 8-bit state (2 bytes/param + fp32 absmax per 256) for tensors of 4096+ elements, else fp32
    return sum(2 * p.numel() + 2 * 4 * math.ceil(p.numel() / 256) if p.numel() >= 4096 else 8 * p.numel()
               for p in params)


_REUSED: list[dict] = []  # the open reuse_estimates scope's estimates (one scope: nested ones share it)


@contextlib.contextmanager
def reuse_estimates(memo: dict | None = None):
    """Within it, :func:`estimate` of a configuration it already estimated (the same Config, target, prompts and
    autocast emulation; the budget may differ) returns a copy of that estimate instead of running the step again:
    the estimate is a function of those alone (the meta models are cached per process already). ``plan``, its
    suggestions and ``plan --fastest`` open one, so the search's duplicates (the configuration as given met again as
    the all-features-on corner; the chosen configuration planned again at the end) cost nothing. Nested scopes share
    the outermost one; leaving it forgets everything, but for what it kept in ``memo`` (a dict the caller keeps,
    to reuse in a later scope)."""
    if _REUSED:
        yield
        return
    _REUSED.append({} if memo is None else memo)
    try:
        yield
    finally:
        _REUSED.pop()


def _estimated_fields(cfg: Config) -> str:
    """What an estimate depends on of ``cfg``: every field but the budget (an estimate does not read it;
    :meth:`Estimate.fits` is given it)."""
    return repr([(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "budget_gb"])


def estimate(cfg: Config, *, target: str = "cuda", prompts: list[str] | None = None,
             emulate_autocast: bool = True) -> Estimate:
    """Per-stage peak memory of one training step of ``cfg`` on ``target`` ("cuda" or "cpu"), with fake tensors.

    ``emulate_autocast=False`` runs a CUDA target's step without autocast (frozen modules purely in their own
    dtype): not what the trainer does, but it shows what autocast's fp32 norms and upsampling cost.
    Inside :func:`reuse_estimates` a configuration estimated before is not estimated again (a copy is returned)."""
    from lowmem_alignprop.step.prompts import load_prompts

    if target not in ("cuda", "cpu"):
        raise UserError(f"target device must be cuda or cpu, not {target!r}")
    prompts = prompts if prompts is not None else load_prompts(cfg.prompts)
    if not _REUSED:
        return _estimate(cfg, target, prompts, emulate_autocast)
    key = (_estimated_fields(cfg), target, tuple(prompts), emulate_autocast)
    memo = _REUSED[0]
    if key not in memo:
        memo[key] = _estimate(cfg, target, prompts, emulate_autocast)
    return copy.deepcopy(memo[key])  # callers may add notes to theirs


def _estimate(cfg: Config, target: str, prompts: list[str], emulate_autocast: bool) -> Estimate:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowmem_alignprop.models.family import family_for

    t0 = time.perf_counter()
    notes: list[str] = []
    cuda = target == "cuda"
    k_plan, k_sim, n_nograd, sim = _simulated(cfg, notes)
    dtype = frozen_weight_dtype(cfg.mixed_precision, target)  # as the trainer: fp32 on a CPU

    # 1-2. meta models + the trainer's memory features (cast, checkpointing, attention, LoRA), all on meta
    comps, reward = _meta_models(cfg, sim, target, dtype, notes)
    # 3. fake storage for everything
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    params, weights, largest = _fake_weights(cfg, comps, reward, fake, cuda, notes)
    counter = LiveBytes(round_to=CUDA_BLOCK if cuda else 1)
    work = StageWork()  # the time estimate's counts, beside the memory counter
    counter.add_static(t for m in (comps.unet, comps.vae, *comps.text_encoders(), reward)
                       if m is not None for t in list(m.parameters()) + list(m.buffers()))
    host_pinned = _block_swap(cfg, comps, weights, counter, work, cuda, notes)
    place = Residency(counter, weights, offload=cfg.offload_frozen, host=not cuda)
    if cuda and cfg.offload_frozen:  # after load the text encoder, VAE and reward model are parked on the CPU
        place.on_device -= {TEXT_ENCODER, "vae", "reward"}
    place.on_move = lambda n: work.add("pcie_bytes", n)
    if cuda and cfg.encode_on_cpu:  # SD3/FLUX: the text encoders never reach the device
        place.on_device -= {TEXT_ENCODER}
    autocast_mode, autocast = _autocast_for(cfg, cuda, dtype, emulate_autocast)
    optimizer, run_opt = _optimizer_for(cfg, params, cuda, weights, place, notes)
    if cfg.ema_decay:  # the EMA's fp32 copy of the trained weights sits beside them on the device
        weights["ema"] = sum(p.numel() * 4 for p in params)
        place.on_device.add("ema")
    place.extra = largest
    place.refresh()

    # the level at each grad-window UNet call; when the window starts the rollout, autocast's cache of the LoRA
    # weights' casts is made inside the first call: count it as there before (it is made once, not per step)
    grad_calls: list[int] = []

    def at_grad_call(module, args):
        work.unet_call()
        if len(grad_calls) == calls_per_step * k_sim and counter.open and counter.open[-1] == stages.SAMPLE_GRAD:
            work.marks["lv"] = dict(work.bucket())  # DRaFT-LV's call begins: its work is counted once (step_work)
        if torch.is_grad_enabled() and counter.open and counter.open[-1] == stages.SAMPLE_GRAD:
            cached = sum(counter._rounded(p.numel() * dtype.itemsize) for p in params) if autocast_mode else 0
            grad_calls.append(counter.current + (cached if len(grad_calls) == 0 and not n_nograd else 0))

    calls_per_step = 2 if cfg.kl_coeff > 0 else 1  # the LoRA model's call, and the base model's with KL

    def after_grad_call(module, args, output):  # marks where backward reaches each window step (_backward_work)
        if torch.is_grad_enabled() and counter.open and counter.open[-1] == stages.SAMPLE_GRAD:
            step = (len(grad_calls) - 1) // calls_per_step
            work.window_output(output[0] if isinstance(output, tuple) else getattr(output, "sample", output),
                               step if step < k_sim else "lv")

    hooks = [comps.unet.register_forward_pre_hook(at_grad_call), comps.unet.register_forward_hook(after_grad_call)]
    hooks += _dequant_hooks(cfg, comps.unet, work)
    # what differs from the trainer's step is passed in: the scheduler keeps real timesteps, saved tensors of
    # activation_offload go to (uncounted) host memory, the stage is the counter's
    family = family_for(comps)
    parts = StepParts(sim, comps, family.make_pipeline(comps), reward, params, optimizer, prompts, place,
                      _both_stages(counter.stage, work.stage), autocast, run_optimizer=run_opt,
                      scheduler=None if family.flow else _RealTimesteps(comps.scheduler),
                      saved_tensors=(lambda: _HostSaveOnCpu(counter, work)) if cuda and cfg.activation_offload else None)
    try:
        with fake, contextlib.ExitStack() as stack:
            if autocast_mode is not None:
                stack.enter_context(autocast_mode)
                stack.enter_context(autocast_mode.replay_in_recompute())
            counters = stack.enter_context(_Counters(counter, work))  # the work: only in the step
            if family.flow:  # the prompt set is encoded at load, with only the text side in memory
                parts.encoder = _encode_at_load_counted(parts, place, cuda)
            warm_up_optimizer(parts)
            step_start = counter.current
            with counters.work_counted():
                keep = run_step(parts, k=k_sim, seed=cfg.seed)
            del keep
    except (Exception, SystemExit) as e:  # a user reward's sys.exit on fake tensors is its failure too
        _name_a_user_reward_that_needs_data(cfg.reward, e)
        raise
    finally:
        for hook in hooks:
            hook.remove()
    est = _figures(cfg, target, counter, weights, largest, grad_calls, (k_plan, k_sim, sim.window_keep), step_start,
                   t0, notes, load_extra=_fp8_load_bytes(cfg, comps, counter, cuda))
    est.work = step_work(cfg, work, k_sim, n_nograd, keep_sim=sim.window_keep)
    est.host_pinned = host_pinned
    if cuda:
        est.host = host_memory(cfg, weights, host_pinned, _storage_bytes(parts.encoder), flow=family.flow)
    est.swap_windows = work.swap_windows.per_stage() if work.swap_windows else {}
    est.seconds = time.perf_counter() - t0
    return est



def host_memory(cfg: Config, weights: dict[str, int], host_pinned: int, cache: int, *, flow: bool) -> dict[str, int]:
    """A GPU target's host memory held by the run's modules and tensors, as stored (bytes): ``load``, the most while
    loading; ``steps``, during the steps. Not in it: the process itself (Python, torch, the CUDA libraries), a
    checkpoint file's page cache (reclaimable), activation_offload's saved tensors. ``cache``: the prompt cache's
    bytes (in host memory with ``encode_on_cpu``)."""
    def w(*names):
        return sum(weights.get(n, 0) for n in names)

    cache = cache if cfg.encode_on_cpu else 0
    parked = w("vae", "reward") if cfg.offload_frozen else 0  # offload_frozen: they wait on the CPU between uses
    if flow:
        # the text side first: the encoders and the VAE while the prompts encode, the transformer not read yet (it is
        # read to the card block by block); then block swap's blocks, the VAE and the reward model before placement
        load = max(w(TEXT_ENCODER, "vae") + cache, host_pinned + w("vae", "reward") + cache)
        return {"load": load, "steps": host_pinned + parked + cache}
    # a UNet pipeline is loaded whole on the CPU before it is placed; its text encoder waits there once the prompts
    # are cached (or with offload_frozen)
    text = w(TEXT_ENCODER) if cfg.cache_prompt_embeddings or cfg.offload_frozen else 0
    return {"load": w("unet", TEXT_ENCODER, "vae", "reward") + host_pinned, "steps": host_pinned + parked + text}


def _storage_bytes(encoder) -> int:
    """The bytes of the distinct storages of a prompt cache (0 for none)."""
    if encoder is None:
        return 0
    seen = {}
    for embeds in encoder.cache.values():
        for t in vars(embeds).values():
            if isinstance(t, torch.Tensor):
                seen[id(t.untyped_storage())] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _encode_at_load_counted(parts: StepParts, place: Residency, cuda: bool):
    """:func:`encode_at_load` on the fake models, counted in the load stage: a GPU's device holds nothing but the
    text encoders the encoder brings and their activations (nothing with ``encode_on_cpu``: the cache too is in
    host memory then); a CPU's memory holds the text encoders and the VAE (the transformer is not read yet). The
    text encoders are not counted after: the trainer frees them."""
    steady = set(place.on_device)
    place.on_device = set() if cuda else {TEXT_ENCODER, "vae"}
    place.refresh()
    on_host = cuda and parts.cfg.encode_on_cpu  # encoder, activations and cache in host memory: not counted
    try:
        with place.counter.host() if on_host else contextlib.nullcontext():
            return encode_at_load(dataclasses.replace(parts, stage=place.counter.stage))
    finally:
        place.on_device = steady - {TEXT_ENCODER}
        place.refresh()


def _both_stages(*stage_fns):
    """One stage context that opens the same stage in each counter."""
    @contextlib.contextmanager
    def stage(name: str):
        with contextlib.ExitStack() as stack:
            for fn in stage_fns:
                stack.enter_context(fn(name))
            yield
    return stage


def _dequant_hooks(cfg: Config, unet, work: StageWork) -> list:
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


def mean_k(cfg: Config) -> float:
    """The K a step runs on average: fixed K, or the middle of [k_min, k_max]."""
    lo, hi = cfg.window_bounds()
    return (lo + hi) / 2


def mean_kept(cfg: Config) -> float:
    """The grad-window calls a step keeps without their checkpoint on average: min(K, window_keep) over K's range."""
    lo, hi = cfg.window_bounds()
    return sum(min(k, cfg.window_keep) for k in range(lo, hi + 1)) / (hi - lo + 1)


def _window_counts(cfg: Config) -> tuple[float, float, float, float]:
    """Over K's range (uniform), the mean number of: the window's first step checkpointed, the first step kept,
    further checkpointed steps, further kept steps (window_keep keeps the last min(K, window_keep))."""
    lo, hi = cfg.window_bounds()
    totals = [0.0] * 4
    for k in range(lo, hi + 1):
        kept = min(k, cfg.window_keep)
        first_ckpt = 1 if k > kept else 0
        for i, n in enumerate((first_ckpt, 1 - first_ckpt if k else 0, k - kept - first_ckpt,
                               kept - (1 - first_ckpt if k else 0))):
            totals[i] += n
    return tuple(t / (hi - lo + 1) for t in totals)


def _backward_work(cfg: Config, work: StageWork, d: dict, k_sim: int, keep_sim: int) -> dict[str, float]:
    """Backward's work scaled to the configuration's K: what runs before backward reaches the window (reward,
    decode) and DRaFT-LV's call once; each simulated window step's backward (from where backward first reaches its
    outputs to the next step's: a checkpointed step's recompute and backward, a kept step's backward alone)
    counted per kind. The window's first step is its own kind (its input needs no gradient: less backward, and with
    KL no backward through the base model's call), the others are averaged per kind."""
    marks = work.window_marks
    if not marks:  # backward never reached a window output (K = 0)
        return {key: float(d[key]) for key in WORK_KEYS}
    zero = dict.fromkeys(WORK_KEYS, 0)
    ends = [snap for _, snap in marks[1:]] + [d]
    seg = {label: {key: end[key] - snap[key] for key in WORK_KEYS} for (label, snap), end in zip(marks, ends)}
    ckpt_sim = k_sim - keep_sim
    first = seg.get(0, zero)
    ckpt = [seg.get(s, zero) for s in range(1, ckpt_sim)]
    kept = [seg.get(s, zero) for s in range(max(ckpt_sim, 1), k_sim)]
    n_first_ckpt, n_first_kept, n_ckpt, n_kept = _window_counts(cfg)

    def mean(parts: list, key: str) -> float:
        return sum(p[key] for p in parts) / len(parts) if parts else 0.0
    out = {}
    for key in WORK_KEYS:
        c, k = mean(ckpt, key), mean(kept, key)
        # a first step of the kind the simulation did not begin with (uniform K, some K <= window_keep): the
        # simulated first step with a kept step's backward in place of a checkpointed one's
        first_ckpt = first[key]
        first_kept = first[key] + (k - c) if ckpt_sim and ckpt else (k if ckpt_sim else first[key])
        out[key] = (marks[0][1][key] + seg.get("lv", zero)[key] + n_first_ckpt * first_ckpt
                    + n_first_kept * first_kept + n_ckpt * c + n_kept * k)
    return out


def _input_gradient_calls(cfg: Config) -> float:
    """The window's calls whose backward goes through the frozen layers' input gradients (one more dequantization
    each with an int8/nf4 base; the recomputes' are counted where they run), on average over K's range: the LoRA
    model's K calls; with KL the base model's calls but the window's first (its input needs no gradient);
    DRaFT-LV's one call."""
    lo, hi = cfg.window_bounds()
    ks = range(lo, hi + 1)
    base = sum(max(k - 1, 0) for k in ks) / len(ks) if cfg.kl_coeff > 0 else 0.0
    return mean_k(cfg) + base + (1 if cfg.lv_draws > 1 else 0)


def step_work(cfg: Config, work: StageWork, k_sim: int, n_nograd: int,
              keep_sim: int = 0) -> dict[str, dict[str, float]]:
    """The simulated step's counts scaled to the configuration's: the no-grad steps to ``sample_steps - K``, the grad
    window to the mean K and its backward by :func:`_backward_work` (``keep_sim``: the simulated window's kept
    steps); with cached prompt embeddings a step encodes nothing (the first step's encoding of every prompt is left
    out: it happens once); the backward's
    dequantization adds one more pass per grad-window call (the input gradient of each quantized layer)."""
    k = mean_k(cfg)
    zero = dict.fromkeys(WORK_KEYS, 0)

    def scaled(d: dict, f: float) -> dict:
        return {key: d.get(key, 0) * f for key in WORK_KEYS}

    out: dict[str, dict[str, float]] = {}
    for name in stages.STEP_STAGES:
        d = work.work.get(name)
        if d is None:
            continue
        if name == stages.ENCODE_PROMPTS and cfg.cache_prompt_embeddings:
            d = zero
        elif name == stages.SAMPLE_NOGRAD:
            d = scaled(d, (cfg.sample_steps - k) / n_nograd if n_nograd else 0)
        elif name == stages.SAMPLE_GRAD:  # the window's calls to the mean K; DRaFT-LV's call (last step only) once
            lv = work.marks.get("lv")
            window = {key: lv[key] for key in WORK_KEYS} if lv else d
            d = {key: window[key] * k / k_sim + (d[key] - window[key]) for key in WORK_KEYS}
        elif name == stages.BACKWARD:
            d = _backward_work(cfg, work, d, k_sim, keep_sim)
            if cfg.base_quant != "none":
                grad_calls = work.unet_calls.get(stages.SAMPLE_GRAD, 0)
                per_call = work.work.get(stages.SAMPLE_GRAD, zero)["dequant_bytes"] / max(grad_calls, 1)
                d["dequant_bytes"] += per_call * _input_gradient_calls(cfg)
        between = work.work.get(name + AFTER, zero)
        out[name] = {key: float(v + between[key]) for key, v in d.items()}
    return out


def _block_swap(cfg: Config, comps, weights: dict[str, int], counter: LiveBytes, work: StageWork, cuda: bool,
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
    if cuda:  # the quantized size has left weights["unet"] already (_fake_weights): the swapped part leaves too
        weights["unet"] -= sum(counter._rounded(stored[id(w.p)]) for ws in swap.weights for w in ws)
        size = "" if cfg.base_quant == "none" else f" ({cfg.base_quant})"
        notes.append(f"block_swap={cfg.block_swap}: {host / GIB:.2f} GiB of frozen blocks{size} in pinned host memory "
                     f"(-{host / GIB:.2f} GiB on the card); the copies of the blocks in flight (at most two) counted "
                     "where they happen, and over PCIe")
    return host


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


def _simulated(cfg: Config, notes: list[str]) -> tuple[int, int, int, Config]:
    """(K planned, K simulated, no-grad steps simulated, the configuration simulated)."""
    k_plan = cfg.window_bounds()[1]
    if cfg.truncation == "uniform":
        notes.append(f"K ~ U{{{cfg.k_min}..{cfg.k_max}}}: planned at k_max={cfg.k_max}, the worst case")
    kept = min(cfg.window_keep, k_plan)
    # window_keep: the simulated window is up to two checkpointed steps, then up to two kept ones (three when all
    # are kept): the window's first step and a further one of each kind are measured, in memory (_figures) and
    # work (_backward_work), and K beyond them is extrapolated per kind
    ckpt_sim = min(k_plan - kept, 2)
    keep_sim = min(kept, 2) if ckpt_sim else min(k_plan, 3)
    k_sim = ckpt_sim + keep_sim
    # the no-grad steps leave nothing behind: one shows their peak (also when K = T, to fill the table's row)
    n_nograd = 1 if (cfg.sample_steps > k_plan or k_plan > k_sim) else 0
    sim = dataclasses.replace(cfg, sample_steps=k_sim + n_nograd, truncation="fixed", k=k_sim, window_keep=keep_sim)
    if cfg.attention == "xformers":
        sim = dataclasses.replace(sim, attention="sdpa")
        notes.append("attention=xformers estimated as sdpa (both keep no n^2 attention matrix)")
    if cfg.deepspeed_zero:
        notes.append(f"deepspeed_zero={cfg.deepspeed_zero} not modelled: estimated as plain torch (an upper bound "
                     "when DeepSpeed offloads to the CPU)")
    if cfg.optimizer == "paged_adamw8bit":
        notes.append("paged_adamw8bit: its state is counted as resident (it pages to the CPU only under pressure)")
    return k_plan, k_sim, n_nograd, sim


def _meta_models(cfg: Config, sim: Config, target: str, dtype: torch.dtype, notes: list[str]):
    """The components and reward model on meta, with the trainer's memory features applied."""
    from lowmem_alignprop.models.family import family_for

    comps = meta_components(cfg, dtype)
    reward = meta_reward(cfg, dtype, notes)
    models_log = logging.getLogger("lowmem_alignprop.models.loading")
    level = models_log.level
    models_log.setLevel(logging.ERROR)  # its device warnings are about this CPU, not the target GPU
    try:
        apply_memory_features(comps, sim, torch.device(target), dtype)
    finally:
        models_log.setLevel(level)
    if target == "cuda" and comps.is_sdxl and comps.vae.dtype == torch.float32 and dtype == torch.float16 \
            and comps.vae.config.get("force_upcast", False):
        comps.vae.to(torch.bfloat16)  # what models.choose_vae_dtype picks on a bf16 GPU: same bytes as fp16
        notes.append("SDXL's VAE decodes in bf16, as on a GPU with bf16 (Ampere or newer); on older cards it "
                     "decodes in fp32: about twice the decode memory")
    off_size = family_for(comps).resolution_note(cfg)  # e.g. SDXL planned at 512 px
    if off_size:
        notes.append(off_size)
    return comps, reward


def _fake_weights(cfg: Config, comps, reward, fake, cuda: bool, notes: list[str]) -> tuple[list, dict[str, int], int]:
    """Fake storage for every module; (LoRA parameters, bytes per module, the largest dequantized layer)."""
    modules = {"unet": comps.unet, "vae": comps.vae, TEXT_ENCODER: list(comps.text_encoders()), "reward": reward}
    with fake:
        for m in (comps.unet, comps.vae, *comps.text_encoders(), reward):
            if m is not None:
                m.to_empty(device="cpu")
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


def _autocast_for(cfg: Config, cuda: bool, dtype: torch.dtype, emulate: bool):
    """(the CUDA autocast emulation or None, the autocast context the step runs in)."""
    if cuda and cfg.mixed_precision != "no" and emulate:
        mode = CudaAutocast(dtype)
        return mode, mode.active
    if not cuda and cfg.mixed_precision == "bf16":
        return None, functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)  # as accelerate does on a CPU
    return None, contextlib.nullcontext


def _optimizer_for(cfg: Config, params, cuda: bool, weights: dict[str, int], place, notes: list[str]):
    """(the optimizer the step runs, whether it steps): AdamW for real; an 8-bit state counted analytically."""
    from lowmem_alignprop.memory.optim import build_optimizer

    if cfg.optimizer == "adamw":
        optimizer = build_optimizer(cfg, params)
        if cuda:
            for group in optimizer.param_groups:  # on CUDA AdamW takes the foreach path: full-size temporaries
                group["foreach"] = True
        return optimizer, True
    optimizer = torch.optim.SGD(params, lr=cfg.lr)  # only zero_grad is used; the 8-bit state is analytic
    weights["optimizer_state"] = _adam8bit_state_bytes(params)
    place.on_device.add("optimizer_state")
    notes.append(f"optimizer={cfg.optimizer}: state counted analytically ({weights['optimizer_state'] / MIB:.1f} "
                 "MiB: 2 bytes/weight for tensors of 4096+ elements, fp32 for smaller ones)")
    return optimizer, False


def _figures(cfg: Config, target: str, counter: LiveBytes, weights: dict[str, int], largest: int,
             grad_calls: list[int], window: tuple[int, int, int], step_start: int, t0: float,
             notes: list[str], load_extra: int = 0) -> Estimate:
    """The per-stage figures: the counter's peaks, K beyond the simulated window, load (``load_extra``: what only
    loading holds, :func:`_fp8_load_bytes`), the reserved estimate."""
    cuda = target == "cuda"
    # K beyond the simulated window: each further grad step keeps what the second one kept (with kl_coeff each
    # window step makes two UNet calls, the LoRA model's and the base model's: the step is every second call)
    k_plan, k_sim, keep_sim = window  # K planned, simulated, and the simulated steps kept without checkpoint
    calls = 2 if cfg.kl_coeff > 0 else 1

    def kept_by_step(i: int) -> int:  # what simulated window step i keeps until step i + 1 begins
        return max(0, grad_calls[calls * (i + 1)] - grad_calls[calls * i]) if len(grad_calls) > calls * (i + 1) else 0
    ckpt_sim, kept_plan = k_sim - keep_sim, min(cfg.window_keep, k_plan)
    per_k = kept_by_step(0) if ckpt_sim else 0
    per_kept = kept_by_step(max(ckpt_sim, 1)) if keep_sim else 0  # a kept step after the window's first
    more, more_kept = k_plan - kept_plan - ckpt_sim, kept_plan - keep_sim
    extra = per_k * more + per_kept * more_kept
    if extra:
        for name in (stages.SAMPLE_GRAD, stages.DECODE, stages.REWARD, stages.BACKWARD):
            if name in counter.peaks:
                counter.peaks[name] += extra
        if more:
            notes.append(f"K={k_plan}: {k_sim} grad steps simulated, {more} more at {per_k / 1024:.0f} KiB each "
                         "(their checkpoint inputs and scheduler graph)")
        if more_kept:
            notes.append(f"window_keep={cfg.window_keep}: {keep_sim} kept steps simulated, {more_kept} more at "
                         f"{per_kept / 2**20:.1f} MiB each (a call's activations kept for backward)")
    # load: what sits on the device once loading is done (the optimizer state comes with the first step)
    encoded = counter.peaks.get(stages.LOAD)  # SD3/FLUX: the prompt set encoded at load, its encoders freed after
    at_load = [n for n in ("unet", "lora", TEXT_ENCODER, "vae", "reward")
               if weights.get(n) and not (cuda and cfg.offload_frozen and n in (TEXT_ENCODER, "vae", "reward"))
               and not ((encoded is not None or (cuda and cfg.encode_on_cpu)) and n == TEXT_ENCODER)]
    load = sum(weights[n] for n in at_load) + largest + load_extra
    if load_extra:
        notes.append(f"base_quant=fp8: +{load_extra / GIB:.2f} GiB at load: the LoRA targets and embedders wait in the "
                     "compute dtype until LoRA is added (the rest is stored in fp8 block by block as it is read)")
    out: dict[str, dict] = {stages.LOAD: {"allocated": load, "weights": load, "on_device": at_load}}
    if encoded is not None and encoded > load:  # encoding was load's peak (e.g. T5 on the device, not yet freed)
        out[stages.LOAD] = {"allocated": encoded, "weights": counter.weights_at_peak[stages.LOAD],
                            "on_device": list(counter.where_at_peak[stages.LOAD])}
    for name in stages.STEP_STAGES:
        if name in counter.peaks:
            out[name] = {"allocated": counter.peaks[name], "weights": counter.weights_at_peak[name],
                         "on_device": list(counter.where_at_peak[name])}
    for fig in out.values():
        fig["reserved"] = _reserved(cfg, fig["allocated"], cuda)
    peak_stage = max(out, key=lambda n: out[n]["allocated"])
    peak = out[peak_stage]["allocated"]
    return Estimate(target=target, stages=out, peak_allocated=peak, peak_stage=peak_stage,
                    peak_needed=_reserved(cfg, peak, cuda) + (WORKSPACE_BYTES if cuda else 0), weights=weights,
                    k_planned=k_plan, k_simulated=k_sim, per_k_bytes=per_k, per_kept_bytes=per_kept,
                    step_start=step_start,
                    seconds=time.perf_counter() - t0, notes=notes)


def _name_a_user_reward_that_needs_data(spec: str, error: Exception) -> None:
    """A user reward that failed on fake tensors (it reads values: .item(), float(t), a branch on a value): one
    line naming it, instead of the fake-tensor traceback. Other errors are left as they are."""
    import importlib
    import traceback

    from lowmem_alignprop.rewards import reward_terms

    for kind, term, _ in reward_terms(spec):
        if kind != "user":
            continue
        source = getattr(importlib.import_module(term.partition(":")[0].strip()), "__file__", None)
        if source and any(frame.filename == source for frame in traceback.extract_tb(error.__traceback__)):
            raise UserError(f"plan cannot follow the reward {term!r} with fake tensors: it failed there with "
                            f"{type(error).__name__} ({first_line(error, 120)}), usually because it reads tensor "
                            "values (.item(), float(t), an if on a value), which a plan has no data for. Plan with "
                            "--reward brightness and add your reward model's own memory, or keep the reward to "
                            "tensor operations") from None


def decode_tiles(cfg: Config, target: str) -> bool:
    """Whether tiled_decode would cut this run's latents into tiles: only when a latent side exceeds ``tile_size``
    (SD's VAE: 512 px is 64 cells, one tile). Otherwise it decodes each image whole, one at a time: sliced decode's
    memory and time, so neither search offers it."""
    from lowmem_alignprop.memory.tiling import cuts_tiles
    from lowmem_alignprop.models.sampling import vae_scale_factor

    vae = _meta_base(cfg, frozen_weight_dtype(cfg.mixed_precision, target)).vae  # the estimates' own (cached)
    side = cfg.resolution // vae_scale_factor(vae)
    return cuts_tiles(side, side, cfg.tile_size)


def fragmentation_allowance(cfg: Config) -> int:
    """What fixed allocator segments reserve beyond ``RESERVED_FACTOR``: grows with the image area (0 with
    expandable segments, the default)."""
    return 0 if cfg.expandable_segments else int(FIXED_SEGMENTS_BYTES_PER_512PX * (cfg.resolution / 512) ** 2)


def _reserved(cfg: Config, allocated: int, cuda: bool) -> int:
    """What the CUDA caching allocator holds for ``allocated`` bytes in use; a CPU target: exact bytes."""
    return int(allocated * RESERVED_FACTOR) + fragmentation_allowance(cfg) if cuda else allocated


# ---------------------------------------------------------------------------------------------------
# seconds per step (measure/devices.py turns the counted work into seconds)
# ---------------------------------------------------------------------------------------------------
def matmul_dtype(cfg: Config, target: str) -> str:
    """The dtype the step's matmuls run in: the mixed precision on a GPU (autocast), fp32 without it; on a CPU
    fp16 runs in fp32 as the trainer does."""
    if cfg.mixed_precision == "no" or (target == "cpu" and cfg.mixed_precision == "fp16"):
        return "fp32"
    return cfg.mixed_precision


def step_time(cfg: Config, est: Estimate, device) -> dict[str, Any]:
    """Seconds per stage (micro-step stages per micro-step; the optimizer once), per micro-step and per optimizer
    step (grad_accum micro-steps + the optimizer), for ``device`` (a :class:`devices.Device`; None: no card named)."""
    from lowmem_alignprop.measure import devices

    totals = {key: sum(w[key] for w in est.work.values()) for key in WORK_KEYS}
    out: dict[str, Any] = {"k_mean": mean_k(cfg), "work_per_micro_step": totals}
    if device is None:
        out["device"] = None
        out["note"] = "no card named: --set card=rtx3060|rtx4090|a100-40gb|a100-80gb|h100|h200|laptop for seconds"
        return out
    dtype = matmul_dtype(cfg, est.target)
    tf32 = cfg.tf32 and est.target == "cuda"
    per_stage = {name: devices.seconds(w, device, dtype, tf32, est.swap_windows.get(name))
                 for name, w in est.work.items()}
    micro = sum(t for name, t in per_stage.items() if name != stages.OPTIMIZER)
    out.update(device=device.name, device_figures=device.to_dict(), matmul_dtype=dtype + (" (tf32)" if tf32 and
                                                                                          dtype == "fp32" else ""),
               stages=per_stage, micro_step=micro,
               optimizer_step=cfg.grad_accum * micro + per_stage.get(stages.OPTIMIZER, 0.0))
    if totals["swap_bytes"] and device.pcie_gbs:  # block swap: its copies' time, and what compute does not hide
        out["block_swap_copies"] = {
            "seconds": totals["swap_bytes"] / (device.pcie_gbs * 1e9),
            "beyond_compute": sum(devices.swap_seconds(w, device, dtype, tf32, est.swap_windows.get(name))
                                  for name, w in est.work.items() if name != stages.OPTIMIZER)}
    return out


# ---------------------------------------------------------------------------------------------------
# what to change when it does not fit
# ---------------------------------------------------------------------------------------------------
def _has_model_reward(cfg: Config) -> bool:
    from lowmem_alignprop import rewards as R
    return any(kind == "user" or name in R.MODEL_REWARDS for kind, name, _ in R.reward_terms(cfg.reward))


def candidate_changes(cfg: Config, target: str = "cuda", images: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Memory features this configuration does not use yet, cheapest in speed first (one step each). A smaller
    batch keeps ``images`` per optimizer step (default: this configuration's) through more accumulation."""
    out: list[tuple[str, dict[str, Any]]] = []
    if not cfg.expandable_segments and target == "cuda":
        out.append(("expandable allocator segments (less fragmentation)",
                    {"expandable_segments": True}))
    if not cfg.cache_prompt_embeddings:
        out.append(("cache prompt embeddings (no speed cost)", {"cache_prompt_embeddings": True}))
    if cfg.window_keep:
        out.append(("checkpoint every grad-window call (window_keep=0: backward recomputes the kept calls)",
                    {"window_keep": 0}))
    if not cfg.reward_checkpointing and _has_model_reward(cfg):
        out.append(("checkpoint the reward model (recomputes its forward)", {"reward_checkpointing": True}))
    if cfg.vae_checkpointing == "none":
        out.append(("checkpoint the VAE decoder per up-block", {"vae_checkpointing": "blocks"}))
    if cfg.unet_checkpointing == "call":
        out.append(("checkpoint the UNet per block (~30% slower backward)", {"unet_checkpointing": "blocks"}))
    if not cfg.sliced_decode and not cfg.tiled_decode and cfg.batch_size > 1:
        out.append(("decode one image at a time", {"sliced_decode": True}))
    if not cfg.offload_frozen and target == "cuda":
        out.append(("offload frozen modules to the CPU while idle (PCIe transfers)", {"offload_frozen": True}))
    if not cfg.encode_on_cpu and target == "cuda" and _is_flow(cfg):
        out.append(("encode the prompt set on the CPU (T5-XXL never on the card; CPU seconds once, at load)",
                    {"encode_on_cpu": True}))
    if cfg.vae_checkpointing != "resnets":
        out.append(("checkpoint the VAE decoder per resnet (most recomputation)", {"vae_checkpointing": "resnets"}))
    if cfg.train_unet == "full" and cfg.optimizer == "adamw":
        out.append(("8-bit AdamW state", {"optimizer": "adamw8bit"}))
    if cfg.base_quant == "none" and cfg.train_unet == "lora" and target == "cuda":  # for the card, wherever planned
        out.append(("quantize the frozen UNet or transformer to nf4 (its Linear weights at 4 bits; needs "
                    "bitsandbytes on the GPU machine)", {"base_quant": "nf4"}))
    if not cfg.block_swap and cfg.train_unet == "lora" and not cfg.deepspeed_zero and target == "cuda":
        n = _swappable_count(cfg) // 2  # with a quantized base (above, or already set) the blocks swap as stored
        if n:
            out.append((f"block swap: {n} frozen blocks wait in pinned CPU memory and are copied in around each use "
                        "(PCIe copies per call, overlapping compute)", {"block_swap": n, "unet_checkpointing": "blocks"}))
    elif cfg.block_swap and target == "cuda" and cfg.block_swap < (total := _swappable_count(cfg)):
        n = cfg.block_swap + max(1, (total - cfg.block_swap) // 2)  # half the blocks still on the card
        out.append((f"block swap {n} of {total} blocks, was {cfg.block_swap} (more pinned CPU memory and PCIe "
                    "copies; the task unchanged)", {"block_swap": n}))
    if not cfg.tiled_decode and decode_tiles(cfg, target):
        out.append(("decode in overlapping tiles (approximate at the seams)",
                    {"tiled_decode": True, "sliced_decode": False}))
    if cfg.batch_size > 1:
        b = cfg.batch_size // 2
        was = images or cfg.batch_size * cfg.grad_accum
        accum = math.ceil(was / b)  # never fewer images per optimizer step
        same = f"the same {was} images per step" if b * accum == was else f"{b * accum} images per step, was {was}"
        out.append((f"batch {b} per micro-step, grad_accum {accum} ({same})", {"batch_size": b, "grad_accum": accum}))
    if cfg.resolution > 256:
        r = max(256, (cfg.resolution * 3 // 4) // 64 * 64)
        out.append((f"lower resolution {r} px (changes the task)", {"resolution": r}))
    return out


def _is_flow(cfg: Config) -> bool:
    """An SD3/FLUX model (from the cached meta model the plan's own estimate built); False if it cannot be built."""
    try:
        return _meta_base(cfg, frozen_weight_dtype(cfg.mixed_precision, "cuda")).family != "unet"
    except (UserError, TypeError):
        return False


def _swappable_count(cfg: Config) -> int:
    """How many blocks block swap can take from ``cfg``'s denoiser (0 if its meta model cannot be built). Counted
    on the cached meta model the plan's own estimate built (in the card's dtype), read only: no copy of the model
    for each suggestion the search tries."""
    from lowmem_alignprop.memory.block_swap import swappable_blocks

    try:
        return len(swappable_blocks(_meta_base(cfg, frozen_weight_dtype(cfg.mixed_precision, "cuda")).unet))
    except (UserError, TypeError):
        return 0


def _apply(cfg: Config, change: dict[str, Any]) -> Config:
    return dataclasses.replace(cfg, **change).validate()


@reuse_estimates()
def suggest(cfg: Config, *, target: str = "cuda", prompts: list[str] | None = None, max_estimates: int = 12,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The cheapest change that makes ``cfg`` fit its budget: first each single change in order of speed cost,
    then the changes accumulated in that order (batch halved and resolution lowered repeatedly). Every
    candidate is re-estimated. Returns {"found": change or None, "tried": [...]}."""
    tried: list[dict[str, Any]] = []
    seen: dict[tuple, bool] = {}  # the first accumulated change is often a single one already estimated

    def check(label: str, change: dict[str, Any]) -> bool:
        key = tuple(sorted(change.items()))
        if key in seen:
            return seen[key]
        new = _apply(cfg, change)
        est = estimate(new, target=target, prompts=prompts)
        fits = bool(est.fits(cfg.budget_gb))
        tried.append({"change": label, "set": change, "peak_allocated": est.peak_allocated,
                      "peak_needed": est.peak_needed, "peak_stage": est.peak_stage, "fits": fits})
        if log:
            log(f"  tried {set_flags(change)}: {est.peak_needed / GIB:.2f} GiB -> {'fits' if fits else 'no'}")
        seen[key] = fits
        return fits

    singles = candidate_changes(cfg, target)
    for label, change in singles:
        if len(tried) >= max_estimates:
            return {"found": None, "tried": tried, "gave_up": True}
        if check(label, change):
            return {"found": tried[-1], "tried": tried}
    # nothing alone suffices: accumulate, shrinking batch and resolution as far as they go
    total: dict[str, Any] = {}
    steps: list[tuple[str, dict[str, Any]]] = []
    current = cfg

    def label_of(changes: dict[str, Any]) -> str:  # only the steps still in effect (a later one may replace one)
        return " + ".join(lab for lab, c in steps if all(changes.get(k) == v for k, v in c.items()))

    while len(tried) < max_estimates:
        options = candidate_changes(current, target, images=cfg.batch_size * cfg.grad_accum)
        if not options:
            break
        label, change = options[0]
        total.update(change)
        steps.append((label, change))
        current = _apply(cfg, total)
        if check(label_of(total), dict(total)):
            return {"found": _pruned(tried[-1], steps, check, label_of, max_estimates, tried), "tried": tried}
    return {"found": None, "tried": tried, "gave_up": len(tried) >= max_estimates}


def _pruned(found: dict[str, Any], steps, check, label_of, max_estimates: int, tried: list) -> dict[str, Any]:
    """Drop the accumulated changes the fit does not need (e.g. sliced decode once the batch is 1), earliest first,
    with up to 4 estimates beyond the search's: the suggestion is then no more than what is needed."""
    total = dict(found["set"])
    for _, change in steps[:-1]:
        if len(tried) >= max_estimates + 4:
            break
        if not all(total.get(k) == v for k, v in change.items()):
            continue  # replaced by a later step
        without = {k: v for k, v in total.items() if k not in change}
        if check(label_of(without), without):
            total, found = without, tried[-1]
    return found


@reuse_estimates()
def next_feature(cfg: Config, *, target: str = "cuda", max_estimates: int = 4) -> tuple[str, dict[str, Any]] | None:
    """For ``--auto-fit`` after an out-of-memory error (see :mod:`lowmem_alignprop.run.faults`): the cheapest change
    in speed that lowers the estimated peak by at least 3%, or None. Resolution changes (they change the task),
    base_quant (it needs the model loaded again) and the optimizer (its state would start again) are never offered
    here. Costs up to ``max_estimates`` + 1 estimates."""
    base = estimate(cfg, target=target)
    live = [c for c in candidate_changes(cfg, target)
            if not {"resolution", "base_quant", "optimizer"} & set(c[1])]  # the task, a reload, a new state: not mid-run
    for label, change in live[:max_estimates]:
        est = estimate(_apply(cfg, change), target=target)
        if est.peak_needed < 0.97 * base.peak_needed:
            return label, change
    return None


# ---------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------
def default_target(profile_name: str) -> str:
    from lowmem_alignprop.settings.profiles import GPU_PROFILES
    return "cpu" if profile_name == "cpu" else "cuda" if profile_name in GPU_PROFILES else "cuda"


@reuse_estimates()
def plan(cfg: Config, *, profile: str = "custom", target: str | None = None, suggest_changes: bool = True,
         log: Callable[[str], None] | None = None, started: float | None = None,
         command: str | None = None) -> dict[str, Any]:
    """Estimate ``cfg`` and, when it does not fit its budget, find the cheapest change. JSON-ready dict.
    ``started``: the ``time.perf_counter()`` the command started at (its "seconds" count from there). ``command``:
    the command line that asked (default: this Python program's), in the result's provenance (``command``, ``date``,
    ``device``: the machine that planned, ``versions``)."""
    from lowmem_alignprop.step.prompts import load_prompts

    started = time.perf_counter() if started is None else started

    target = target or default_target(profile)
    if target == "cpu" and cfg.base_quant in BNB_MODES:  # what train would refuse on this target
        raise UserError(f"base_quant={cfg.base_quant} needs a CUDA GPU (bitsandbytes' quantized kernels), so a CPU "
                        f"run cannot use it: plan it for a card (--device cuda or a GPU profile), or drop "
                        "--set base_quant")
    prompts = load_prompts(cfg.prompts)
    est = estimate(cfg, target=target, prompts=prompts)
    if target == "cuda" and cfg.expandable_segments and sys.platform == "win32":
        est.notes.append("planned with expandable allocator segments, which PyTorch has on Linux only: to train on "
                         "this Windows machine, plan with --set expandable_segments=false")
    fits = est.fits(cfg.budget_gb)
    result: dict[str, Any] = {
        "kind": "plan", "profile": profile, "model": cfg.model, "reward": cfg.reward, "target": target,
        "method": "fake tensors (FakeTensorMode on CPU) + live-storage counting; no GPU, no weights",
        "autocast": (f"torch.autocast('cuda', {cfg.mixed_precision}) emulated" if target == "cuda" and
                     cfg.mixed_precision != "no" else "none" if cfg.mixed_precision == "no" or target == "cuda"
                     else "torch.autocast('cpu', bf16)" if cfg.mixed_precision == "bf16"
                     else "none: fp16 runs in fp32 on a CPU, as the trainer does"),
        "config": cfg.to_dict(), "estimate": est.to_dict(),
        "stages": est.stages, "peak_allocated": est.peak_allocated, "peak_stage": est.peak_stage,
        "host_pinned": est.host_pinned,  # block swap's frozen blocks in pinned host memory (bytes, as stored)
        "host_memory": est.host,  # a GPU target's host memory held by the models and tensors: load, steps (bytes)
        "reserved_factor": RESERVED_FACTOR if target == "cuda" else 1.0,
        "fragmentation_allowance": fragmentation_allowance(cfg) if target == "cuda" else 0,
        "peak_needed": est.peak_needed,  # reserved + workspaces: what must fit the budget (a stage's
        # "reserved" has no workspaces)
        "budget_gb": cfg.budget_gb or None,
        "budget_bytes": int(cfg.budget_gb * GIB) if cfg.budget_gb else None, "fits": fits,
        "allowances": ALLOWANCES if target == "cuda" else {"none": "CPU target: exact bytes, nothing added"},
        "notes": est.notes, "suggestion": None, "tried": [],
        "time": step_time(cfg, est, device_for(cfg.card, profile, target)),
        **provenance(command or " ".join(["python", *sys.argv]), PLAN_LIBRARIES),
    }
    if fits is False and suggest_changes:
        found = suggest(cfg, target=target, prompts=prompts, log=log)
        result["suggestion"] = found["found"]
        result["tried"] = found["tried"]
        result["suggestion_gave_up"] = found.get("gave_up", False)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


# ---------------------------------------------------------------------------------------------------
# the same step measured for real on the CPU (tests and benchmarks check the estimate against it)
# ---------------------------------------------------------------------------------------------------
def measure_cpu_step(cfg: Config, *, prompts: list[str] | None = None, timed_steps: int = 0,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Run the step of :func:`run_step` for real on the CPU (weights as the trainer loads them, fp32) and measure
    each stage's peak allocation by counting live storages (:class:`~lowmem_alignprop.measure.profiler.
    CpuAllocationTracker`'s default, StageProfiler's method: every tensor an op returns, not the scratch inside one
    op, like the estimate) plus the resident bytes at the step's start. After one warm-up optimizer step, like the
    estimate. ``timed_steps`` more steps without the profiler give seconds per step and per stage, by ``clock``
    (``time.process_time``: the CPU seconds, which other jobs on the machine change less than the wall's)."""
    from lowmem_alignprop.measure.profiler import run_objects_only

    with run_objects_only():  # the measurement walks the step's own objects only, as the trainer's does
        return _measure_cpu_step(cfg, prompts, timed_steps, clock)


def _measure_cpu_step(cfg: Config, prompts: list[str] | None, timed_steps: int, clock: Callable[[], float]) -> dict:
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.memory.optim import build_optimizer
    from lowmem_alignprop.memory.placement import Placement
    from lowmem_alignprop.measure.profiler import CpuAllocationTracker, StageProfiler, resident_bytes
    from lowmem_alignprop.step.prompts import load_prompts
    from lowmem_alignprop.memory.block_swap import install
    from lowmem_alignprop.models.family import family_for
    from lowmem_alignprop.rewards import build_reward

    prompts = prompts if prompts is not None else load_prompts(cfg.prompts)
    cpu = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    comps = load_components(cfg, torch.float32)
    params, _ = apply_memory_features(comps, cfg, cpu, torch.float32)
    swap = install(comps.unet, cfg.block_swap, cpu)  # noqa: F841 - its hooks live as long as it does
    comps.unet.train()
    reward = build_reward(cfg.reward, device="cpu", dtype=torch.float32, checkpointing=cfg.reward_checkpointing,
                          weights=cfg.reward_weights)
    optimizer = build_optimizer(cfg, params)
    prof = StageProfiler("cpu")  # no step begun: its stages are record_function ranges the tracker reads
    autocast = (functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16) if cfg.mixed_precision == "bf16"
                else contextlib.nullcontext)
    family = family_for(comps)
    parts = StepParts(cfg, comps, family.make_pipeline(comps), reward, params, optimizer, prompts,
                      Placement(cpu, offload=cfg.offload_frozen), prof.stage, autocast)
    if family.flow:  # as the trainer: the prompt set encoded at load, the text encoders freed before the step
        parts.encoder = encode_at_load(parts, final=True)
    k = cfg.window_bounds()[1]
    warm_up_optimizer(parts)
    held = [comps.unet, comps.vae, *comps.text_encoders(), reward, optimizer,
            [p.grad for p in params if p.grad is not None],
            [vars(e) for e in parts.encoder.cache.values()] if parts.encoder else []]  # the prompt cache made at load
    baseline = sum(resident_bytes(held).values())
    with CpuAllocationTracker(count_baseline=False, names=set(stages.STAGES)) as tracker:
        keep = run_step(parts, k=k, seed=cfg.seed)
    del keep
    out = {"stages": {n: baseline + tracker.peaks[n] for n in stages.STEP_STAGES if n in tracker.peaks},
           "baseline": baseline, "k": k, "profiled_seconds": sum(tracker.seconds.values())}
    times, per_stage = [], dict.fromkeys(stages.STEP_STAGES, 0.0)

    @contextlib.contextmanager
    def timed(name: str):
        t0 = clock()
        try:
            yield
        finally:
            per_stage[name] += clock() - t0

    for i in range(timed_steps):
        t0 = clock()
        run_step(dataclasses.replace(parts, stage=timed), k=k, seed=cfg.seed + 1 + i)
        times.append(clock() - t0)
    if times:
        out["seconds_per_step"] = sum(times) / len(times)
        out["stage_seconds"] = {n: t / len(times) for n, t in per_stage.items()}
    out["peak_allocated"] = max(out["stages"].values())
    out["peak_stage"] = max(out["stages"], key=out["stages"].get)
    return out

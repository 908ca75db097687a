"""Where frozen modules live: on the compute device while a stage needs them, on the CPU otherwise.

With ``offload_frozen`` the VAE and reward model wait on the CPU during sampling and the text encoder
leaves after encoding: their weights stop counting against the GPU's memory while idle. Every move is
recorded in ``events`` so tests can check placement on a machine without a GPU.
"""

from __future__ import annotations

import os
import sys

import torch

ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # PyTorch's old and new names


def configure_cuda_allocator(expandable_segments: bool) -> str:
    """Let the CUDA caching allocator grow its segments in place (CUDA virtual memory) instead of caching
    fixed-size ones: memory freed between stages is reused for differently sized tensors rather than held as
    reserved-but-unused (rtx3060-sdxl measured 5.77 -> 4.43 GiB reserved; benchmarks/REPORT.md). Safe to call
    after CUDA is up (it applies to segments made from then on). A user's own allocator variable wins. Returns what
    the allocator runs with, for summary.json."""
    if not torch.cuda.is_available():
        return "cpu"
    for var in ALLOC_CONF_VARS:
        if os.environ.get(var):
            return f"{var}={os.environ[var]} (yours)"
    if not expandable_segments:
        return "fixed segments"
    if sys.platform == "win32":  # PyTorch only warns there and keeps fixed segments
        return "fixed segments (PyTorch has no expandable segments on Windows)"
    try:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except RuntimeError as e:  # a driver without CUDA virtual memory management
        return f"fixed segments (expandable segments unavailable: {str(e).strip()[:120]})"
    return "expandable segments"


def unused_apple_gpu_note() -> str | None:
    """On a Mac with an Apple GPU (MPS) and no CUDA card: the line saying the CPU does the work; else None."""
    mps = getattr(torch.backends, "mps", None)
    if torch.cuda.is_available() or mps is None or not mps.is_available():
        return None
    return ("this Mac's GPU (MPS) is not used: lowmem_alignprop runs on CUDA cards or the CPU (its memory features, "
            "fp16 autocast and quantized bases are CUDA's, and none is tested on MPS), so the CPU does the work")


class Placement:
    def __init__(self, device: torch.device, offload: bool):
        self.device = torch.device(device)
        self.offload_enabled = offload
        self.where: dict[str, str] = {}
        self.events: list[tuple[str, str]] = []  # (module name, "device" | "cpu")

    def _move(self, name: str, target: str, modules) -> None:
        dev = self.device if target == "device" else torch.device("cpu")
        for m in modules:
            if m is not None:
                m.to(dev)
        if self.where.get(name) != target:
            self.where[name] = target
            self.events.append((name, target))

    def to_device(self, name: str, *modules) -> None:
        """The stage about to run needs these modules on the compute device."""
        self._move(name, "device", modules)

    def park(self, name: str, *modules) -> None:
        """Idle modules: to the CPU when offloading is on, else they stay on the device."""
        self._move(name, "cpu" if self.offload_enabled else "device", modules)

    def offload(self, name: str, *modules) -> None:
        """Modules that are no longer needed at all (the text encoder once embeddings are cached)."""
        self._move(name, "cpu", modules)

    def to_host(self, tensors):
        """Tensors (a BatchedTensors: a large prompt cache's chunk) to wait in host memory."""
        return tensors.to("cpu")

    def from_host(self, tensors):
        """Host-held tensors (:meth:`to_host`) to the compute device, for the stage about to run."""
        return tensors.to(self.device)

"""Where frozen modules live: on the compute device while a stage needs them, on the CPU otherwise.

With ``offload_frozen`` the VAE and reward model wait on the CPU during sampling and the text encoder
leaves after encoding: their weights stop counting against the GPU's memory while idle. Every move is
recorded in ``events`` so tests can check placement on a machine without a GPU.
"""

from __future__ import annotations

import torch


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

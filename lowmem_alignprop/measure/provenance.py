"""What a measured or estimated figure carries (benchmarks/ results, ``plan --json``): the machine (:func:`cpu_name`,
:func:`host_device`), the versions of the libraries (:func:`library_versions`), and, with the command and the date,
the whole block (:func:`provenance`). The memory report names its CPU with :func:`cpu_name`."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo's, else the platform's), for reports and benchmark results."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "xformers", "deepspeed")


def library_versions(packages: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Versions of Python and the libraries whose behaviour the figures depend on (None: not installed)."""
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def host_device() -> dict[str, Any]:
    """The machine a figure was measured or estimated on: the CPU's model, its logical cores, torch's threads and
    the first CUDA card (None without one)."""
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def provenance(command: str, packages: tuple[str, ...] = LIBRARIES, **device: Any) -> dict[str, Any]:
    """What a measured or estimated figure carries (benchmarks/ results, ``plan --json``): the command that produced
    it, the date, the machine (:func:`host_device`; ``device`` adds or overrides entries) and the versions of
    ``packages`` (:func:`library_versions`)."""
    return {"command": command, "date": time.strftime("%Y-%m-%d"), "device": {**host_device(), **device},
            "versions": library_versions(packages)}

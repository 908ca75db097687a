"""What a measured or estimated figure carries (benchmarks/ results, ``plan --json``): the machine (:func:`cpu_name`,
:func:`host_device`), the versions of the libraries (:func:`library_versions`), and, with the command and the date,
the whole block (:func:`provenance`). The memory report names its CPU with :func:`cpu_name`. The versions' rule lives
in run/software.py, which a run's own record (summary.json's ``software``) keeps too."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from lowmem_alignprop.run.software import LIBRARIES, library_versions  # (the rule a run's record keeps)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo's, else the platform's), for reports and benchmark results."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


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

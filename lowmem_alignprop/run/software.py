"""Which software trained a run: the versions of lowmem-alignprop, Python and the libraries its numbers depend on
(:func:`library_versions`, which measure/provenance.py's benchmark and plan records use too) and the device, kept in
summary.json and each checkpoint as stretches of steps (``software``: ``[{"step": first step, "versions": {...},
"device": ...}]``, on the CPU with ``threads``; one more from a resume under other versions, on another device or
thread count), and a resume's change of them (:func:`software_changes`, said in one line: :func:`software_line`)."""

from __future__ import annotations

import platform
from typing import Any

import torch

from lowmem_alignprop.settings.config import NEEDS_PACKAGE

OURS = "lowmem-alignprop"
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "xformers", "deepspeed")
CORE_LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate")  # every run's (and plan --json's)
# the names a resume change of the software goes by (beside the config's fields and "processes")
SOFTWARE_NAMES = frozenset((OURS, "python", *LIBRARIES, "device", "threads"))


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


def libraries_used(cfg) -> tuple[str, ...]:
    """The libraries a run with ``cfg`` trains with: :data:`CORE_LIBRARIES`, and bitsandbytes or DeepSpeed where a
    setting needs them (settings.config.NEEDS_PACKAGE), xformers with attention=xformers."""
    extra = [module for name, off, module in NEEDS_PACKAGE
             if getattr(cfg, name) not in (off if isinstance(off, tuple) else (off,))]
    extra += ["xformers"] if cfg.attention == "xformers" else []
    return CORE_LIBRARIES + tuple(sorted(set(extra)))


def device_name(device: torch.device | str) -> str:
    """The device a run trains on, in words: ``cpu``, the CUDA card's name, else torch's device type."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def software(cfg, device: torch.device | str) -> dict[str, Any]:
    """What trains now: ``versions`` (lowmem-alignprop, Python, :func:`libraries_used`; None: not installed) and
    ``device`` (:func:`device_name`); on the CPU ``threads``, torch's (OMP_NUM_THREADS): another count sums in
    another order, and the weights differ in the last digits."""
    versions = library_versions((OURS, *libraries_used(cfg)))
    name = device_name(device)
    return {"versions": {OURS: versions.pop(OURS), **versions}, "device": name,
            **({"threads": torch.get_num_threads()} if name == "cpu" else {})}


def software_changes(stretches: list[dict] | None, now: dict[str, Any]) -> dict[str, list]:
    """What ``now`` (:func:`software`) changes of the last stretch a checkpoint recorded: ``{name: [was, now]}``
    for each version both name (a library used by only one of them, e.g. bitsandbytes for one optimizer, is none)
    and the device (the CPU's thread count where both record it); empty for a checkpoint without the record (written
    before it was kept)."""
    last = stretches[-1] if stretches and isinstance(stretches[-1], dict) else None
    if last is None:
        return {}
    was = last.get("versions") or {}
    changes = {n: [was[n], v] for n, v in now["versions"].items() if n in was and was[n] != v}
    if last.get("device") not in (None, now["device"]):
        changes["device"] = [last["device"], now["device"]]
    elif None not in (last.get("threads"), now.get("threads")) and last["threads"] != now["threads"]:
        changes["threads"] = [last["threads"], now["threads"]]
    return changes


def software_line(changes: dict[str, list], step: int) -> str:
    """The resume's warning (without the logger's prefix) for :func:`software_changes`' ``changes``."""
    said = ", ".join(f"{n} {was or 'not installed'} -> {now or 'not installed'}" for n, (was, now) in changes.items())
    return (f"resume: the checkpoint was trained under other software ({said}): from step {step} the run goes on "
            "under this machine's, and its images and losses may differ in the last digits from a run under one "
            "(recorded as a resume change)")


def stretches_at(stretches: list[dict] | None, now: dict[str, Any] | None, step: int) -> list[dict]:
    """The run's software stretches once this start trains from ``step``: the checkpoint's (those it can read), and
    ``now`` from ``step`` when it changed anything (a checkpoint without the record: ``now`` from ``step`` alone;
    ``now`` None: a start that trains no step adds none)."""
    kept = [s for s in stretches or [] if isinstance(s, dict) and isinstance(s.get("step"), int)]
    if now is None or (kept and not software_changes(kept, now)):
        return kept
    return kept + [{"step": step, **now}]

"""Counting the tensors alive now: the distinct storages that a module, an optimizer or a container holds
(:func:`resident_bytes`), and every tensor storage the garbage collector can reach (:func:`live_tensor_bytes`, the
baseline of the CPU measurement), walked over the run's own objects only inside :func:`run_objects_only`."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch


def is_fake(t: torch.Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover - very old torch
        return False
    return isinstance(t, FakeTensor)


def _storage_key(t: torch.Tensor) -> tuple[tuple[str, int], int] | None:
    """(device key, storage pointer) -> the storage's bytes; None for tensors without real memory."""
    if is_fake(t):
        return None
    try:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
    except Exception:  # sparse, nested or wrapper subclasses without a plain storage
        return None
    dev = t.device
    if dev.type == "meta":  # no memory behind it; count the nominal size, keyed by identity
        return (("meta", id(t)), t.numel() * t.element_size())
    if ptr == 0:
        return None
    return ((str(dev), ptr), nbytes)


def iter_tensors(obj: Any, _depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors held by a module (params + buffers), an optimizer (state), a tensor, or containers."""
    if _depth > 6 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif hasattr(obj, "state") and hasattr(obj, "param_groups"):  # torch / bitsandbytes optimizers
        state = obj.state
        yield from iter_tensors(list(state.values()) if isinstance(state, Mapping) else state, _depth + 1)
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from iter_tensors(value, _depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)) or (
        isinstance(obj, Iterable) and not isinstance(obj, (str, bytes))
    ):
        for value in obj:
            yield from iter_tensors(value, _depth + 1)


def resident_bytes(obj: Any, exclude: set | None = None) -> dict[str, int]:
    """Bytes of the distinct storages held by ``obj``, by device ('cpu', 'cuda:0', 'meta').

    ``exclude`` holds storage keys already counted elsewhere; the keys counted here are added to it.
    """
    seen = exclude if exclude is not None else set()
    out: dict[str, int] = {}
    for t in iter_tensors(obj):
        key = _storage_key(t)
        if key is None or key[0] in seen:
            continue
        seen.add(key[0])
        dev = key[0][0]
        out[dev] = out.get(dev, 0) + key[1]
    return out


@contextlib.contextmanager
def run_objects_only() -> Iterator[None]:
    """Inside, every object that existed on entry (the modules, classes and functions torch, diffusers and
    transformers import: about 570,000 objects; in a longer-lived process its earlier objects too) is out of the
    garbage collector's reach (``gc.freeze``): the CPU measurement's full collections and tensor scans walk only
    what the run makes (each walk of the imports took 0.6 s on a 2-core AMD EPYC; a CPU run made three scans and two
    collections). On exit the objects are handed back (``gc.unfreeze``) and collected as usual."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def live_storages(device: str | torch.device = "cpu", extra: Iterable[Any] = ()) -> tuple[int, list[Any], int]:
    """(bytes, storages, objects walked) of the distinct tensor storages on ``device`` reachable now; see
    :func:`live_tensor_bytes`."""
    want = torch.device(device).type
    seen: set = set()
    storages: list[Any] = []
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if t.device.type != want:
            return
        key = _storage_key(t)
        if key is None or key[0] in seen:
            return
        seen.add(key[0])
        total += key[1]
        with contextlib.suppress(Exception):
            storages.append(t.untyped_storage())

    def add_with_grad(t: torch.Tensor) -> None:
        add(t)
        if t.is_leaf and t.requires_grad:  # .grad of a non-leaf warns; leaves are what carry grads
            g = t.grad
            if g is not None:
                add(g)

    tensor_type = torch.Tensor
    objects = gc.get_objects()
    n_objects = len(objects)
    try:
        for obj in objects:
            try:
                # type() rather than isinstance(): some module objects fake __class__ and warn when asked.
                if issubclass(type(obj), tensor_type):
                    add_with_grad(obj)
            except Exception:  # proxies and half-built objects can raise on isinstance or attribute access
                continue
    finally:
        del objects  # the list of every object in the process: gone before anything else runs
    for obj in extra:
        for t in iter_tensors(obj):
            add_with_grad(t)
    return total, storages, n_objects


def live_tensor_bytes(device: str | torch.device = "cpu", extra: Iterable[Any] = ()) -> int:
    """Bytes of all distinct tensor storages on ``device`` that can be reached right now.

    The baseline of the CPU measurement. It counts the union of (a) every tensor the garbage collector
    tracks (all tensors that have a Python object: parameters, buffers, optimizer state, caches, ...)
    and the gradients of leaf tensors among them, and (b) the tensors of ``extra`` (modules, optimizers,
    tensor lists: their gradients too), each storage once. It misses tensors that live only in C++ (for
    example activations saved by autograd between steps, which a training loop should not hold).
    Costs one pass over ``gc.get_objects()`` (0.6 s over the objects of a process with diffusers loaded, a few
    ms for a run's own inside :func:`run_objects_only`; the list it walks is 8 bytes per object, freed at once).
    """
    return live_storages(device, extra)[0]

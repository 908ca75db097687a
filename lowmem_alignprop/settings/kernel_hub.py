"""bitsandbytes (0.50) asks the Hugging Face hub for an optional CPU kernel (kernels-community) when it is imported on
a CPU with AVX512-BF16, and diffusers imports it with every model class. Loading a model from files must touch no
network, so that one import reads the hub's local cache only; the rest of the process is left as it was."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys


class _CacheOnlyImport(importlib.abc.MetaPathFinder):
    """Finds ``bitsandbytes`` (a find_spec without an import too: diffusers asks whether it is installed), and runs
    its top level with huggingface_hub in offline mode; gone from ``sys.meta_path`` once it has run."""

    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run, finder = spec.loader.exec_module, self

        def exec_module(module):
            from huggingface_hub import constants

            if finder in sys.meta_path:
                sys.meta_path.remove(finder)
            was = constants.HF_HUB_OFFLINE
            constants.HF_HUB_OFFLINE = True  # kernels reads it per call: the local cache, no request
            try:
                run(module)
            finally:
                constants.HF_HUB_OFFLINE = was

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Before bitsandbytes is first imported (``lowmem_alignprop``'s import does it); nothing if it already was."""
    if "bitsandbytes" not in sys.modules and not any(isinstance(f, _CacheOnlyImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _CacheOnlyImport())

"""What kind of model a --model value is (sd, sdxl, sd35m, sd35l, flux), read from its files before anything loads:
the one rule for the profile ``--profile auto`` picks and for the checks that depend on the family (a negative
prompt on FLUX.1)."""

from __future__ import annotations

import json
from pathlib import Path

from lowmem_alignprop.settings.hub_access import hub_file
from lowmem_alignprop.settings.paths import model_index


def sd3_kind(num_layers: int) -> str:
    """SD3.5 Large has 38 transformer layers, Medium 24 (an SD3-shaped model of fewer counts as Medium)."""
    return "sd35l" if num_layers >= 38 else "sd35m"


# the one table from a model_index.json's pipeline class to its family (models/flow_loading reads the flow ones)
PIPELINE_FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "FluxPipeline": "flux",
                     "StableDiffusion3Pipeline": "sd3"}  # sd3: Medium or Large by its transformer (sd3_kind)
FLOW_FAMILIES = ("sd3", "flux")  # flow-matching transformers (models/flow.py), not UNets
_NAMED_KINDS = {"toy": "sd", "tiny": "sd", "sd15": "sd", "sd21": "sd", "sdxl": "sdxl", "sd35m": "sd35m",
                "sd35l": "sd35l", "flux": "flux"}


def model_kind_of(model: str, components: str = "", *, download: bool = False) -> str | None:
    """The kind of a --model value: the named models; a diffusers folder by its model_index.json (SD3 Medium or Large
    by transformer/config.json); a hub id by the same files from the local hub cache or, with ``download``, from the
    hub (a few hundred bytes; the model's own download follows); a single transformer file by its
    ``components`` folder (model_components). None when only loading tells (an SD single file, a hub id out of
    reach, another pipeline)."""
    if model in _NAMED_KINDS:
        return _NAMED_KINDS[model]
    if not model:  # an empty field is no folder (Path("") is the working directory)
        return None
    kind = _kind_of_folder(model, download)
    return kind if kind is not None or not components else _kind_of_folder(components, download)


def _kind_of_folder(model: str, download: bool) -> str | None:
    index = _model_file(model, "model_index.json", download)
    kind = PIPELINE_FAMILIES.get((model_index(index.parent) or {}).get("_class_name")) if index else None
    if kind != "sd3":
        return kind
    config = _model_file(model, "transformer/config.json", download)
    try:
        return sd3_kind(int(json.loads(config.read_text())["num_layers"]))
    except (AttributeError, OSError, ValueError, KeyError, TypeError):  # AttributeError: no such file (None)
        return None


def _model_file(model: str, name: str, download: bool) -> Path | None:
    """File ``name`` of a --model value's diffusers folder: in the folder itself, or for a hub id in its hub cache
    snapshot (hub_access.hub_file); None for a hub id that gives none."""
    path = Path(model).expanduser()
    if path.exists() or "/" not in model:
        return path / name
    return hub_file(model, name, download=download)

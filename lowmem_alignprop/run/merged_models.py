"""What an `export --merge` model records of the LoRAs fused into it (a folder's merged_loras.json, a single file's
header), read where a command or the model loader needs it: below commands/ (the merge that writes it,
lora/lora_merge.py) and models/ (a single transformer file's missing parts, models/flow_loading.py)."""

from __future__ import annotations

import json
from pathlib import Path

from lowmem_alignprop.run.filenames import MERGED_FILE
from lowmem_alignprop.run.tensor_files import is_safetensors
from lowmem_alignprop.settings.model_kind import SINGLE_FILE_SUFFIXES

MERGED_KEY = "alignprop_merged_loras"  # a merged single file's header: what MERGED_FILE says of a merged folder


def merged_record(spec: str) -> list[dict]:
    """The LoRAs that `export --merge` fused into the model ``spec`` (its MERGED_FILE, or a single file's header);
    [] for any other model."""
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            text = (path / MERGED_FILE).read_text(encoding="utf-8") if (path / MERGED_FILE).is_file() else "[]"
        elif path.is_file() and is_safetensors(path):
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get(MERGED_KEY, "[]")
        else:
            return []
        record = json.loads(text)
    except (OSError, ValueError, UnicodeDecodeError):
        return []  # unreadable: loading the model says what is wrong with it
    return [r for r in record if isinstance(r, dict)] if isinstance(record, list) else []


def merged_parts(spec: str) -> tuple[str, str]:
    """(model, commit): the diffusers folder or hub id that holds the text encoders, VAE and scheduler of an SD3/FLUX
    transformer file `export --merge --single-file` wrote (``spec``), as its header's record names it
    (:func:`merged_record`, the shared names: a folder by its last part, ``./flux``): its first LoRA's run's
    model_components, else the model that LoRA was merged into where that is no single file (a later LoRA's went
    into the merged file); the commit a hub id was merged at ("": none recorded). ("", "") for another file."""
    for entry in merged_record(spec):
        components = (entry.get("image_settings") or {}).get("model_components")
        for model, commit in ((components, ""), (entry.get("into"), entry.get("into_revision"))):
            if isinstance(model, str) and model.strip() and not model.lower().endswith(SINGLE_FILE_SUFFIXES):
                return model.strip(), commit if isinstance(commit, str) else ""
    return "", ""

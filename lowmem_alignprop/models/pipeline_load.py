"""``DiffusionPipeline.from_pretrained`` with the pipeline's transformers models (the text encoders) loaded here
first, so that weights missing from their files are an error instead of random values.

transformers fills every weight its checkpoint lacks with a fresh initialisation and only logs a table; a text
encoder saved under other parameter names (another transformers release, another tool, another model's file)
then conditions the run on noise with no error. diffusers raises for its own models but loads the transformers
parts of a pipeline through transformers' ``from_pretrained`` unchecked. Here each of them is loaded with
``output_loading_info`` and a missing weight is one line naming the part and a weight.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lowmem_alignprop.memory.precision import dtype_kwarg
from lowmem_alignprop.models.model_check import check_weight_files, hub_snapshot_repo
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.hub_access import offline_by_setting
from lowmem_alignprop.settings.paths import component_variant, model_index, weights_variant


def missing_weights(info: dict) -> list[str]:
    """The weights a transformers ``from_pretrained(..., output_loading_info=True)`` did not find in the files (and
    so initialised at random); ``position_ids`` is a constant some releases save and others do not."""
    return sorted(k for k in info.get("missing_keys", ()) if not k.endswith("position_ids"))


def pipeline_root(where: str, hub_id: bool, revision: str = "") -> Path:
    """The folder a pipeline loads from: ``where`` itself, or (``hub_id``) the hub id's snapshot in the hub cache
    at ``revision`` (a branch, tag or commit; "": main), fetched if it is not there (offline: the cache only, asked
    for so: huggingface_hub's fallback logged, twice a load, 'Could not reach the Hub (... unset HF_HUB_OFFLINE
    ...)', also where the probe, not the user, set it)."""
    from diffusers import DiffusionPipeline

    if not hub_id:
        return Path(where).expanduser()
    return Path(DiffusionPipeline.download(where, revision=revision or None, local_files_only=offline_by_setting()))


_COMMIT = re.compile(r"[0-9a-f]{40}")


def snapshot_commit(root) -> str | None:
    """The commit a hub id's snapshot folder holds (huggingface_hub names each snapshot by its commit:
    ``.../models--OWNER--NAME/snapshots/<commit>``, as snapshot_download returns it), else None (a local folder).
    ``root``: the folder, or a loaded pipeline's ``_name_or_path`` (from_pretrained records the folder it read)."""
    if not root:
        return None
    root = Path(str(root))
    return root.name if hub_snapshot_repo(root) is not None and _COMMIT.fullmatch(root.name) else None


def load_pipeline(where: str, dtype: torch.dtype | None = None, *, hub_id: bool = False, named: str | None = None,
                  revision: str = "", **given):
    """The pipeline of the diffusers folder (or, ``hub_id``, the hub id at ``revision``) ``where``, with the
    components in ``given`` used as they are (None: left out); ``named``: what the user called it, for messages
    (default ``where``); its snapshot's commit: :func:`snapshot_commit` of its ``config._name_or_path``. Raises
    UserError when a text encoder's files lack some of its weights; OSError/ValueError from diffusers and
    transformers as they come."""
    from diffusers import DiffusionPipeline

    root = pipeline_root(where, hub_id, revision)
    check_weight_files(root, named or where, skip=given)  # a missing part, an LFS pointer, a cut-off file: one line
    variant = {"variant": v} if (v := weights_variant(root)) else {}  # a folder of only fp16 files (variant="fp16")
    for name, cls in _transformers_models(root).items():
        if name not in given:
            given[name] = _load_checked(cls, root, name, named or where, dtype)
    return DiffusionPipeline.from_pretrained(str(root), **given, **({} if dtype is None else dtype_kwarg(dtype)),
                                             **variant)


def _transformers_models(root: Path) -> dict:
    """name -> class of every transformers model (not tokenizer) the folder's model_index.json lists."""
    import transformers

    index = model_index(root) or {}  # none: diffusers' own load says what is wrong with the folder
    out = {}
    for name, entry in index.items():
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers":
            cls = getattr(transformers, str(entry[1]), None)
            if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
                out[name] = cls
    return out


def _load_checked(cls, root: Path, name: str, where: str, dtype: torch.dtype | None):
    own = component_variant(root / name)  # (transformers reads only the variant it is given: this folder's)
    kwargs = {**({} if dtype is None else {"dtype": dtype}), **({"variant": own} if own else {})}
    model, info = cls.from_pretrained(str(root / name), output_loading_info=True, **kwargs)
    missing = missing_weights(info)
    if missing:
        total = sum(1 for k in model.state_dict() if not k.endswith("position_ids"))
        raise UserError(f"{where}: {len(missing)} of the {total} weights of its {name} ({cls.__name__}) are not in "
                        f"its files (e.g. {missing[0]}) and would run as random values: the files were saved under "
                        f"other names or belong to another model; re-save {name} with transformers' save_pretrained, "
                        "or use the model's own")
    return model

"""The adapter's peft config as it is written beside the weights (diffusers' safetensors header, peft's
adapter_config.json): the same bytes for the same LoRA in every process."""

from __future__ import annotations

from typing import Any


def lora_metadata(config, peft_file: bool = False) -> dict[str, Any]:
    """``config`` (a peft ``LoraConfig``) as a dict, its sets (``target_modules``, ...) as sorted lists: peft
    and diffusers write ``list(set)``, whose order follows the process's string hashing, so two exports of one
    LoRA differed byte for byte between runs. Saved with the weights so that diffusers loads the trained scale
    (rank, alpha, targets) even when lora_alpha differs from the rank. diffusers' header (``peft_file`` False)
    leaves out ``exclude_modules``: diffusers adapts the layers the file holds, and peft warns of an exclusion
    that excluded nothing; peft's own adapter_config.json (``peft_file``), which peft applies to the model's
    layers by name, keeps it."""
    out = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    if not peft_file:
        out.pop("exclude_modules", None)
    return out

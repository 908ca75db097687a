"""The adapter's peft config as it is written beside the weights (diffusers' safetensors header, peft's
adapter_config.json): the same bytes for the same LoRA in every process."""

from __future__ import annotations

from typing import Any


def lora_metadata(config, peft_file: bool = False, layers=None) -> dict[str, Any]:
    """``config`` (a peft ``LoraConfig``) as a dict, its sets (``target_modules``, ...) as sorted lists: peft
    and diffusers write ``list(set)``, whose order follows the process's string hashing, so two exports of one
    LoRA differed byte for byte between runs. Saved with the weights so that diffusers loads the trained scale
    (rank, alpha, targets) even when lora_alpha differs from the rank. diffusers' header (``peft_file`` False)
    leaves out ``exclude_modules``: diffusers adapts the layers the file holds, and peft warns of an exclusion
    that excluded nothing; peft's own adapter_config.json (``peft_file``), which peft applies to the model's
    layers by name, keeps it. In the header a target the exclusion was for (lora_layers=attention+ff's
    ``proj_out``: FLUX's single blocks' but not the transformer's last layer) is named by the paths of the
    adapted layers ``layers`` (the weights' keys) it stands for, none on SD3: as a suffix it named the excluded
    layer too, and peft warned of a target the file does not hold."""
    out = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    if not peft_file:
        excluded = out.pop("exclude_modules", None)
        if isinstance(excluded, str) and layers is not None and isinstance(out.get("target_modules"), list):
            out["target_modules"] = sorted(_by_path(out["target_modules"], excluded, layers))
    return out


def _by_path(targets: list[str], excluded: str, layers) -> set[str]:
    """``targets`` with each one the regex ``excluded`` matches whole replaced by the paths of ``layers``' modules
    that it names (peft's suffix rule)."""
    import re

    modules = {k.split(".lora_")[0] for k in layers}
    out = set()
    for target in targets:
        out |= {m for m in modules if m.endswith(f".{target}")} if re.fullmatch(excluded, target) else {target}
    return out

"""The images a run renders before its first step, kept for its resumes (samples/before.safetensors): the sample
grid's fixed-seed images and rewards, and the toy world's judged figures. They are of the untrained LoRA, so a resume
with the same settings would render the same ones again: minutes for a large model on a small card (FLUX.1's 28
steps a 1024 px image under block swap), at every start."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch

from lowmem_alignprop.run import atomic, software
from lowmem_alignprop.run.resume_rules import FREE_FIELDS, STRICT_FIELDS
from lowmem_alignprop.settings.config import TRAINING_ONLY
from lowmem_alignprop.settings.image_size import resolution_of

log = logging.getLogger("lowmem_alignprop")


def before_key(cfg, sample_prompts: list[str], judge_prompts: list[str], reward_sha: str | None,
               device: torch.device | str, files: dict[str, str] | None = None) -> str:
    """What the images before training depend on: the settings but those a resume changes silently (steps,
    output_dir, ...: resume_rules.FREE_FIELDS) and those only training reads (lr, k, sample_every...:
    settings.config.TRAINING_ONLY, but the untrained LoRA's: STRICT_FIELDS and init_lora), the prompts rendered, the
    reward's source (``reward_sha``: rewards.reward_source_digest, whose change a resume counts as another reward),
    the contents of the vae and reward_weights files (``files``: run/input_files.contents) and the software and device
    that render them (run/software.py's, whose change a resume records). A resume that changed any of them renders
    the images again. Of several sizes only the first counts: the renders are at it."""
    ignored = (set(FREE_FIELDS) | TRAINING_ONLY) - set(STRICT_FIELDS) - {"init_lora"}
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ignored}
    values["resolution"] = resolution_of(cfg.width, cfg.height)  # several sizes: the renders are at the first alone
    kept = [values, sample_prompts, judge_prompts, reward_sha, software.software(cfg, device)]
    text = json.dumps(kept + ([files] if files else []), sort_keys=True, default=str)  # (none: a key kept before them)
    return hashlib.sha256(text.encode()).hexdigest()


def read_before(path: Path, key: str) -> dict:
    """What :func:`write_before` kept at ``path`` for ``key``: "samples" (images in [0, 1], rewards) and "judged"
    (the toy world's figures), each where it was rendered, and "seconds" (each one's render time); {} for no file,
    another key, or a file that cannot be read (a resume then renders them again)."""
    from safetensors import safe_open

    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return {}
            kept = {"judged": json.loads(meta["judged"])} if "judged" in meta else {}
            kept["seconds"] = json.loads(meta.get("seconds", "{}"))
            if "images" in f.keys():
                kept["samples"] = (f.get_tensor("images").float() / 255, f.get_tensor("rewards"))
    except Exception as e:  # a damaged file: worth a render, not the run
        log.warning("%s cannot be read (%s): the images before training are rendered again", path,
                    str(e).splitlines()[0][:120] if str(e) else type(e).__name__)
        return {}
    return kept


def write_before(path: Path, key: str, samples: tuple[torch.Tensor, torch.Tensor] | None,
                 judged: dict | None, seconds: dict[str, float]) -> None:
    """Keep the images before training for a resume with the same ``key``: the sample grid's as 8-bit pixels (what
    its PNG cells hold: the grid drawn from them is the same) with their rewards, the judged figures as JSON, and
    ``seconds``, each one's render time (what the renders after training will take: the time left a resume says).
    A write that fails (a full disk) is said and costs only that render at a resume."""
    from safetensors.torch import save_file

    tensors = {} if samples is None else {
        "images": (samples[0].clamp(0, 1) * 255).round().to(torch.uint8).contiguous(),
        "rewards": samples[1].float().contiguous()}
    meta = {"key": key, "seconds": json.dumps(seconds),
            **({"judged": json.dumps(judged)} if judged is not None else {})}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.replacing(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    except Exception as e:  # noqa: BLE001 - safetensors says a full disk in a SafetensorError of its own
        if (failed := atomic.write_failure(e, path.parent)) is None:
            raise
        log.warning("the images before training were not kept for a resume (%s): it renders them again",
                    atomic.describe(failed))


def forget_before(path: Path) -> None:
    """A new run that stops before its first step (--max-minutes spent by loading and these renders): its kept images
    go, with their folder where it holds nothing else, as nothing of such a run is kept (a run in the same folder
    renders them again: only a resume reads them back)."""
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # (the folder holds something else)
        path.parent.rmdir()

"""The LoRA where users go: a run's ``lora/`` folder exported for other tools, with a model card.

Formats (``lowmem-alignprop export --format ...``):

* ``diffusers`` -- what a run writes (``pytorch_lora_weights.safetensors``, ``unet.*`` keys, the peft config in
  the header): ``pipe.load_lora_weights(DIR)``.
* ``kohya`` -- one ``.safetensors`` with ``lora_unet_<module path, dots as underscores>`` keys and
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` per adapted layer: what ComfyUI (models/loras),
  AUTOMATIC1111/Forge (models/Lora), InvokeAI and ``pipe.load_lora_weights(FILE)`` read. Those loaders apply
  ``alpha / dim * up @ down`` with ``dim`` the rows of ``lora_down``; peft applies ``lora_alpha / r * B @ A``
  (``lora_alpha / sqrt(r)`` with rsLoRA; per layer through ``alpha_pattern``/``rank_pattern``). diffusers'
  own converter (``convert_state_dict_to_kohya``) writes ``alpha = dim`` -- right only when alpha equals the
  rank -- so each ``.alpha`` is set here to ``scale * dim``, the trained scale. The header carries kohya's
  ``ss_*`` fields and ours (``alignprop_*``).
* ``peft`` -- a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, keys
  ``base_model.model.<module>.lora_A.weight``): ``PeftModel.from_pretrained(unet, DIR)``.
* ``--merge`` -- the base model with ``W * scale * B @ A`` added to each adapted weight (diffusers'
  ``fuse_lora(lora_scale=W)`` then ``unload_lora_weights``), saved as a diffusers directory, or with
  ``--single-file`` as one ``.safetensors`` in the original LDM layout (models/ldm_layout.py) that AUTOMATIC1111
  (models/Stable-diffusion), ComfyUI (models/checkpoints) and ``from_single_file`` load.

Every export writes a ``README.md`` model card (the hub's format: YAML front matter, then the run's numbers).
Each export is written to a temporary folder beside ``--out`` and renamed into place when complete, so bad
input, or a failure half-way, leaves nothing behind.

The pieces, each in its own module: reading and checking the LoRA folder (lora/lora_files.py), the model card
(lora/model_card.py), the formats (lora/lora_formats.py), the merge (lora/lora_merge.py) and the hub
(run/hub.py); a LoRA to start training from is lora/init_lora.py's. Here: the checks of the command's options
and one export.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowmem_alignprop.lora.lora_files import Lora, shared_base_record
from lowmem_alignprop.lora.lora_formats import (file_stem, kohya_holds_kept, write_base_record, write_diffusers,
                                                write_kohya, write_peft)
from lowmem_alignprop.lora.lora_merge import merge_base, merged_pipeline, shared_record, write_single_file
from lowmem_alignprop.lora.model_card import model_card
from lowmem_alignprop.settings.config import EXPORT_FORMATS
from lowmem_alignprop.settings.errors import UserError, first_line, nearest, quote
from lowmem_alignprop.settings.model_kind import SINGLE_FILE_SUFFIXES, denoiser_label
from lowmem_alignprop.run import atomic
from lowmem_alignprop.run.base_fingerprint import load_base_record
from lowmem_alignprop.run.filenames import (GRID_FILE, LORA_BASE_FILE, LORA_WEIGHT_NAME, MERGED_FILE, SAMPLES_DIR,
                                            step_grid_name)

log = logging.getLogger("lowmem_alignprop")

FORMATS = EXPORT_FORMATS  # the same list as the export_format config field's
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # what a merged model is saved in
CARD_NAME = "README.md"


def check_format(fmt: str, merge: bool, weight: float | None, dtype: str | None = None,
                 single_file: bool = False) -> None:
    if fmt not in FORMATS:
        near = nearest(fmt, FORMATS)
        raise UserError(f"--format {quote(fmt)} is not one of {', '.join(FORMATS)}"
                        + (f": did you mean {near}?" if near else ""))
    if merge and fmt != "diffusers":
        raise UserError(f"--merge writes the whole model as a diffusers folder, not a {fmt} LoRA: leave --format out, "
                        "or drop --merge")
    if single_file and not merge:
        raise UserError("--single-file writes a merged model as one checkpoint file: add --merge (a kohya LoRA is "
                        "already one file: --format kohya)")
    if weight is not None and not merge:
        raise UserError("--weight sets the LoRA's weight in a merged model: add --merge (ComfyUI and AUTOMATIC1111 set "
                        "a LoRA's strength when they load it)")
    if dtype is not None and not merge:
        raise UserError("--dtype sets the precision a merged model is saved in: add --merge (a LoRA keeps its own)")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {quote(dtype)} is not one of {', '.join(DTYPES)}")
    if weight is not None and not math.isfinite(weight):
        raise UserError(f"--weight {weight}: write a finite number (1 = as trained, 0 = the base model)")


def check_out(out: Path, flag: str = "--out") -> None:
    """The export's folder: new or empty, and one this user can write (the run's export/ of a copied run, a read-only
    folder)."""
    from lowmem_alignprop.settings.paths import describe, kind_of
    from lowmem_alignprop.step.inputs import check_writable

    kind = kind_of(out)
    if kind == "missing" and out.suffix.lower() in SINGLE_FILE_SUFFIXES:  # (a folder of that name)
        raise UserError(f"{flag} {out} names a file, but {flag} is the folder the export is written into (its files "
                        f"are named by the run): pass a folder, e.g. {flag} {out.with_suffix('')}")
    if kind == "name too long":
        raise UserError(f"{flag} {out} {describe(out)}: choose a shorter name")
    if kind not in ("missing", "directory"):
        raise UserError(f"{flag} {out} {describe(out)}: pass a folder for the export")
    if kind == "directory" and any(out.iterdir()):
        raise UserError(f"{flag} {out} is not empty: pass a new folder (nothing is overwritten)")
    check_writable(out, flag, parent=True)  # (atomic.replacing_dir writes beside it, then renames)


STEP_TAG = "-step-"  # in an export folder's name: made from a checkpoint's LoRA (kohya-step-40)


def read_hub_lora(spec: str, merge: bool = False) -> Lora | None:
    """export --lora ``spec`` as a hub id (lora/hub_lora.py: ``owner/name[@REV][/file.safetensors]``; a path that
    exists wins): its file fetched into the hub cache (offline: the cache's, else one line with its ``hf download``)
    and read as that file by its path is (read_lora), its lines naming it by the id, not by its path in the cache.
    None where ``spec`` names no hub id."""
    from lowmem_alignprop.lora.hub_lora import hub_lora, weighted_hub_id
    from lowmem_alignprop.lora.lora_files import EXPORT_TAKES, export_weight_line, read_lora

    if (weighted := weighted_hub_id(spec)) is not None:  # sample's owner/name:0.8 (a local folder's: lora_dir_of)
        raise UserError(export_weight_line(spec, *weighted))
    found = hub_lora(spec, "--lora", EXPORT_TAKES)
    if found is None:
        return None
    local = found.path.parent if found.peft else found.path  # (a peft adapter: its folder, as a local one is named)
    try:
        lora = read_lora(str(local), merge=merge)
    except UserError as e:
        raise UserError(str(e).replace(str(local), found.shown)) from None
    lora.hub = found
    return lora


def by_id(lora: Lora, line: str) -> str:
    """``line`` with a hub LoRA's paths in the hub cache (its file, its folder) as the id the user gave."""
    if lora.hub is None:
        return line
    return line.replace(str(lora.hub.path), lora.hub.shown).replace(str(lora.path), lora.hub.shown)


def default_out(lora: Lora, fmt: str, merge: bool, single_file: bool = False) -> Path:
    """RUN/export/FORMAT (merged, merged-single-file; -step-N for a checkpoint's), the next free one (-2, ...); a hub
    LoRA's export/NAME/FORMAT in the working folder."""
    from lowmem_alignprop.run.runlock import next_free_dir

    kind = ("merged-single-file" if single_file else "merged") if merge else fmt
    # a hub LoRA's: export/NAME/FORMAT in the working folder (the hub cache is huggingface_hub's, not written into)
    home = Path("export", lora.hub.repo.split("/")[-1]) if lora.hub is not None else (lora.run or lora.path.parent) \
        / "export"
    base = home / (kind + (f"{STEP_TAG}{lora.step}" if lora.step is not None else ""))
    return next_free_dir(base, lambda p: p.exists() and (not p.is_dir() or any(p.iterdir())))


def export(lora: Lora, fmt: str, out: Path, *, merge: bool = False, weight: float | None = None,
           model: str | None = None, dtype: str | None = None, command: str = "", single_file: bool = False,
           hub_repo: str | None = None) -> list[Path]:
    """Write one export into ``out`` (a new folder), model card included; returns the files written. A merged
    model is fused in fp32 and saved in ``dtype`` (default fp32): a diffusers folder, or with ``single_file`` one
    ``.safetensors`` in the original LDM layout. ``hub_repo``: the repository it is to be pushed to, which the model
    card's code then loads from."""
    check_format(fmt, merge, weight, dtype, single_file)
    encoders = {k: v for k, v in lora.kept.items() if not k.startswith(lora.component + ".")}
    if encoders and (fmt == "peft" or lora.flow and merge and single_file):
        # peft's adapter folder is one model's, and an SD3/FLUX single file the merged transformer alone: the text
        # encoders' layers would be lost (the denoiser's kept layers, convolutions and linears, both write)
        from lowmem_alignprop.models.kept_lora import kept_kinds, layer_count, them

        held = f"{lora.named} also holds {kept_kinds(encoders)[0]} its run kept as its --init-lora had " \
               f"{them(layer_count(encoders))}"
        if fmt == "peft":
            raise UserError(f"--format peft: {held}, which a peft adapter of the {denoiser_label(lora.flow)} cannot "
                            "hold: export --format diffusers" + (" or --format kohya" if kohya_holds_kept(lora) else
                                                                 ""))
        raise UserError(f"--single-file: {held}, and an SD3/FLUX single file holds the merged transformer alone: "
                        "export --merge without --single-file (a diffusers folder: the text encoders merged too)")
    check_out(out)
    if single_file and (base := merge_base(lora, model)) in ("toy", "tiny"):  # (before the merge: nothing written)
        raise UserError(f"--merge --single-file: the {base} model has no single-file layout that other tools (or "
                        "--model FILE) read, only SD 1.x/2.x/SDXL, SD3/SD3.5 and FLUX.1 do: export --merge (a "
                        "diffusers folder) instead")
    at = 1.0 if weight is None else weight  # the LoRA's weight in a merged model
    pipe, merged = merged_pipeline(lora, model, at) if merge else (None, [])  # merged: what the model holds
    into = merged[-1]["into"] if merge else None
    with atomic.replacing_dir(out) as tmp:  # (an empty folder given as --out is replaced)
        if pipe is not None and single_file:
            files = [write_single_file(lora, pipe.to(DTYPES[dtype or "fp32"]), tmp, merged).name]
        elif pipe is not None:
            pipe.to(DTYPES[dtype or "fp32"])
            # SD3/FLUX: the transformer in one file (diffusers shards over 10 GB), which ComfyUI's Load Diffusion
            # Model reads in the diffusers layout
            pipe.save_pretrained(str(tmp), **({"max_shard_size": "1000GB"} if lora.flow else {}))
            files = ["model_index.json"] + sorted(p.name + "/" for p in tmp.iterdir() if p.is_dir())
            (tmp / MERGED_FILE).write_text(json.dumps(merged, indent=1), encoding="utf-8")  # a second merge reads it
            files.append(MERGED_FILE)
        elif fmt == "kohya":
            files = [write_kohya(lora, tmp, file_stem(lora)).name]
        elif fmt == "peft":
            files = [p.name for p in write_peft(lora, tmp)]
        else:
            files = [p.name for p in write_diffusers(lora, tmp)]
        if pipe is None:
            files += [p.name for p in write_base_record(lora, tmp)]
        grid, grid_step = None, lora.step
        # the run's before/after grid; for a checkpoint's LoRA its step's --sample-every grid, if there is one
        source = (lora.run / SAMPLES_DIR / (GRID_FILE if lora.step is None else step_grid_name(lora.step))
                  if lora.run is not None else None)
        done = lora.summary.get("steps_done")
        stale = lora.step is None and lora.summary.get("samples_stale")  # an earlier start's grid, not this LoRA's
        if source is not None and (stale or not source.is_file()) and lora.step is None and isinstance(done, int):
            grid_step = done  # an interrupted run renders no after samples: its last step's --sample-every grid
            source = lora.run / SAMPLES_DIR / step_grid_name(done)
        if merge and (at != 1.0 or into != lora.base_model):  # the grid shows the LoRA as trained (weight 1, on its
            source = None  # base), not this model (another weight, or merged into another model: one with LoRAs)
        if source is not None and source.is_file():
            grid = source.name
            shutil.copy2(source, tmp / grid)
        (tmp / CARD_NAME).write_text(model_card(lora, "single-file" if single_file else fmt, files, command,
                                                merged_weight=at if merge else None, grid=grid, grid_step=grid_step,
                                                merged_into=into, home=hub_repo),
                                     encoding="utf-8")
    return sorted(out.rglob("*"))


def _run_exports(lora_dir: Path) -> list[tuple[Path, bool]]:
    """The export folders of the run's LoRA (``lora_dir``), each with whether it was made from the LoRA there now
    (the LoRA digest its base_model.json records, or a merge's record; an export from before those records: written
    after the LoRA): an older one was made before a --resume trained on. Exports of a checkpoint's LoRA
    (``F-step-N``) are of their step and not counted, nor temporary folders."""
    from lowmem_alignprop.lora.lora_files import lora_digest, read_lora
    from lowmem_alignprop.lora.lora_formats import EXPORTED_FROM

    folder = lora_dir.parent / "export"
    if not folder.is_dir() or not (lora_dir / LORA_WEIGHT_NAME).is_file():
        return []
    written, digest = (lora_dir / LORA_WEIGHT_NAME).stat().st_mtime, lora_digest(read_lora(str(lora_dir)))

    def current(p: Path) -> bool:
        try:
            if (p / MERGED_FILE).is_file():  # a merged model: the last LoRA its record names is this export's
                made_from = json.loads((p / MERGED_FILE).read_text(encoding="utf-8"))[-1].get("digest")
            else:
                made_from = load_base_record(p / LORA_BASE_FILE).get(EXPORTED_FROM)
        except (OSError, ValueError, AttributeError, IndexError, KeyError, TypeError):  # none, or damaged
            made_from = None
        return made_from == digest if made_from else p.stat().st_mtime >= written

    return [(p, current(p)) for p in sorted(folder.iterdir())
            if p.is_dir() and not p.name.startswith(".") and STEP_TAG not in p.name]


def _current_by_format(exports: list[tuple[Path, bool]]) -> dict[str, Path]:
    """Of :func:`_run_exports`' folders, those made from the LoRA there now, by format (``kohya-2`` is a kohya
    export)."""
    return {re.sub(r"-\d+$", "", p.name): p for p, now in exports if now}


def missing_exports(cfg, lora_dir: Path) -> list[str]:
    """export_format's formats that have no export of the run's LoRA (``lora_dir``) in export/ (a kill cut the
    export at the end of the run short, or it was deleted): what a --resume of the ended run writes again."""
    have = _current_by_format(_run_exports(lora_dir))
    return [fmt for fmt in cfg.export_formats() if fmt not in have]


def hub_copies(folder: Path) -> dict[str, bytes]:
    """The files of an export folder that its push to the hub uploads rewritten (hub.push_to_hub's ``rewritten``):
    base_model.json as lora_files.shared_base_record shares it, a merged model's record as lora_merge.shared_record
    (local paths by name, as the card names them); the local files keep their paths (``sample`` here reads them)."""
    copies = {}
    for name, share, kind in ((LORA_BASE_FILE, shared_base_record, dict), (MERGED_FILE, shared_record, list)):
        try:
            record = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none there (a merged model has no base_model.json, a LoRA no merged.json)
            continue
        if isinstance(record, kind):
            copies[name] = json.dumps(share(record), indent=1).encode("utf-8")
    return copies


@dataclass
class Exported:
    """What :func:`export_at_end` wrote: each format's folder (None: it failed) and the upload's outcome."""
    folders: dict[str, Path | None] = field(default_factory=dict)
    repo: str | None = None  # push_to_hub's repository, when an export was there to upload
    url: str | None = None  # the repository's URL once uploaded
    push_failed: str | None = None  # why the upload failed (the export is complete in its folder)

    def record(self) -> dict:
        """For summary.json."""
        return {"exports": {fmt: None if p is None else str(p) for fmt, p in self.folders.items()},
                **({"pushed_to_hub": {"repo": self.repo, "url": self.url, "failed": self.push_failed}}
                   if self.repo else {})}


def export_at_end(cfg, lora_dir: Path, *, keep_current: bool = False) -> Exported:
    """A finished run's ``export_format``: ``lora_dir`` exported as `lowmem-alignprop export --format F` exports it,
    into export/F/ (each folder complete or absent); ``push_to_hub`` uploads the first. A failed export or upload
    leaves the run's files as they are and says how to redo it. ``keep_current``: the outputs of an ended run written
    again (from its checkpoint, the same LoRA and steps): an export of that very LoRA file is kept as it is, but the
    one to upload (its model card names the repository)."""
    from lowmem_alignprop.lora.lora_files import read_lora
    from lowmem_alignprop.run import hub

    formats = cfg.export_formats() or (["diffusers"] if cfg.push_to_hub else [])
    if not (lora_dir / LORA_WEIGHT_NAME).is_file():
        return Exported()
    exports = _run_exports(lora_dir)  # (the LoRA read and its digest taken once)
    older = [p for p, now in exports if not now]
    if older:  # a --resume that trained on: the exports of the LoRA it had are kept, and said to be older
        log.warning("%s: exported from this run's earlier LoRA (their README.md says at which step); %s", ", ".join(
            str(p) for p in older), "this LoRA's exports are written beside them" if formats else
            f"`lowmem-alignprop export --lora {shlex.quote(str(lora_dir))} --format F` exports this one beside them")
    if not formats:
        return Exported()
    pushed, done = False, Exported(repo=cfg.push_to_hub or None)
    written = done.folders
    current = _current_by_format(exports) if keep_current else {}
    for fmt in formats:
        push = cfg.push_to_hub and not pushed  # the first export goes to the hub, its model card with it
        command = (f"lowmem-alignprop export --lora {shlex.quote(str(lora_dir))} --format {fmt}"
                   + (f" --push-to-hub {shlex.quote(cfg.push_to_hub)}" if push else ""))
        try:
            kept = None if push else current.get(fmt)
            if kept is not None:  # of this very LoRA: not written again beside itself
                out = written[fmt] = kept
            else:
                lora = read_lora(str(lora_dir))
                out = default_out(lora, fmt, False)
                export(lora, fmt, out, command=command, hub_repo=cfg.push_to_hub if push else None)
                log.info("exported the LoRA (%s) to %s", fmt, out)
                written[fmt] = out
        except Exception as e:  # noqa: BLE001 (a writer's own errors too, safetensors': the run's files are complete)
            log.error("export --format %s failed (%s: %s); the LoRA is in %s: `%s` tries again (--out DIR writes "
                      "it elsewhere)", fmt, type(e).__name__, first_line(e, 160), lora_dir, command)
            written[fmt] = None
            continue
        if push:
            pushed = True
            try:
                done.url = hub.push_to_hub(out, cfg.push_to_hub, rewritten=hub_copies(out))
                log.info("pushed %s to %s", out, done.url)
            except UserError as e:  # the upload failed: the export is complete, the message says so
                log.error("%s", e)
                done.push_failed = "the upload failed: its line above"
    if done.repo and not pushed:
        done.push_failed = "no export was written to upload"
    return done

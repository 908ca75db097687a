"""``lowmem-alignprop export``: a run's LoRA in the format other tools read, with a model card; optionally
merged into the base model, optionally pushed to the Hugging Face hub. See lora_export.py for the formats."""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from lowmem_alignprop.settings.errors import ArgumentParser, UserError

log = logging.getLogger("lowmem_alignprop")


def export_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="lowmem-alignprop export", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a trained LoRA for ComfyUI / AUTOMATIC1111 (kohya), peft or diffusers, or merge it into "
                    "the base model; every export gets a README.md model card.",
        epilog="examples:\n"
               "  lowmem-alignprop export --lora outputs/run/lora --format kohya      # ComfyUI models/loras, A1111 "
               "models/Lora\n"
               "  lowmem-alignprop export --lora outputs/run/lora --format peft\n"
               "  lowmem-alignprop export --lora outputs/run/lora --merge --weight 0.8 --out merged-model\n"
               "  lowmem-alignprop export --lora outputs/run/lora --merge --single-file   # A1111 models/Stable-diffusion\n"
               "  lowmem-alignprop export --lora outputs/run/lora --format kohya --push-to-hub you/my-lora\n"
               "  lowmem-alignprop export --lora someone/style-lora --format kohya --out style-kohya   # from the hub")
    p.add_argument("lora_dir", nargs="?", metavar="LORA", help="the LoRA to export, as --lora (either way)")
    p.add_argument("--lora", metavar="DIR", help="the lora/ folder a run wrote (or its best/, its .safetensors "
                   "file, the run folder, a training checkpoint: checkpoints/step-300), or such a LoRA on the Hugging "
                   "Face hub: OWNER/NAME, OWNER/NAME/FILE.safetensors, OWNER/NAME@REV (a path that exists wins)")
    p.add_argument("--format", default="diffusers", metavar="diffusers|kohya|peft",
                   help="kohya: one .safetensors for ComfyUI/A1111; peft: an adapter folder; diffusers: as trained "
                        "(default). Several, comma-separated (kohya,peft): one folder each (with --out: OUT/FORMAT)")
    p.add_argument("--merge", action="store_true", help="write the base model with the LoRA fused in (a diffusers "
                                                        "folder)")
    p.add_argument("--single-file", action="store_true", help="with --merge: one .safetensors in the original "
                   "(LDM) layout for AUTOMATIC1111 (models/Stable-diffusion) and ComfyUI (models/checkpoints); for "
                   "SD3/FLUX the merged transformer in Stability's / BFL's layout (ComfyUI models/diffusion_models)")
    p.add_argument("--weight", type=float, metavar="W", help="with --merge: the LoRA's weight (1 = as trained, "
                                                             "0 = the base model)")
    p.add_argument("--dtype", metavar="fp32|fp16|bf16", help="with --merge: the precision the merged model is saved "
                                                              "in (default fp32; fused in fp32 either way)")
    p.add_argument("--model", help="with --merge: the base model (default: the one the LoRA was trained on)")
    p.add_argument("--out", metavar="PATH", help="a new folder for the export (default: RUN/export/FORMAT)")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this hub repository (owner/name)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    return p


def export_main(argv: list[str]) -> int:
    args = export_parser().parse_args(argv)
    if args.lora and args.lora_dir and args.lora != args.lora_dir:
        raise UserError(f"two LoRAs to export ({args.lora_dir} and --lora {args.lora}): give one")
    args.lora = args.lora or args.lora_dir
    if not args.lora:
        raise UserError("which LoRA? give the folder a run wrote: lowmem-alignprop export outputs/run/lora (or the run "
                        "folder, or a checkpoint: outputs/run/checkpoints/step-300)")
    from lowmem_alignprop.lora import lora_export as lx  # after parsing: --help imports no torch
    from lowmem_alignprop.lora.lora_files import read_lora
    from lowmem_alignprop.run import hub
    from lowmem_alignprop.settings.config import format_list
    formats = format_list(args.format) or ["diffusers"]  # one, or several as export_format takes them
    for fmt in formats:  # cheap checks first: nothing is read yet
        lx.check_format(fmt, args.merge, args.weight, args.dtype, args.single_file)
    if len(formats) > 1 and args.push_to_hub:
        raise UserError(f"--push-to-hub uploads one export to {args.push_to_hub}, and --format {args.format} names "
                        f"{len(formats)}: push one format (e.g. --format {formats[0]})")
    if args.model and not args.merge:
        raise UserError("--model names the base model to merge into: add --merge (a LoRA export needs no model)")
    if args.private and not args.push_to_hub:
        raise UserError("--private applies to --push-to-hub REPO: add it, or drop --private")
    if args.push_to_hub:
        hub.check_push_to_hub(args.push_to_hub)
    given = Path(args.out).expanduser() if args.out else None
    outs = {fmt: given / fmt if given and len(formats) > 1 else given for fmt in formats}  # (None: RUN/export/FORMAT)
    for out in filter(None, outs.values()):
        lx.check_out(out)
    lora = lx.read_hub_lora(args.lora, merge=args.merge)  # owner/name[/file.safetensors]: read from the hub cache
    if lora is None:
        recover_lora(args.lora)
        lora = read_lora(args.lora, merge=args.merge)
    # (each card: the command that made it; a hub LoRA's at the commit read, which the id alone may no longer load)
    command = "lowmem-alignprop export " + " ".join(shlex.quote(a) for a in at_commit_read(argv, args.lora, lora))
    for fmt, out in outs.items():
        out = out or lx.default_out(lora, fmt, args.merge, args.single_file)
        try:
            files = lx.export(lora, fmt, out, merge=args.merge, weight=args.weight, model=args.model,
                              dtype=args.dtype, command=command, single_file=args.single_file,
                              hub_repo=args.push_to_hub)
        except UserError as e:  # (a hub LoRA's lines name its id, not its file in the hub cache)
            raise UserError(lx.by_id(lora, str(e))) from None
        log.info("exported %s (%s) to %s: %s", lx.by_id(lora, str(lora.named)), "merged" if args.merge else fmt, out,
                 ", ".join(str(f.relative_to(out)) for f in files if f.parent == out))
    if args.push_to_hub:
        url = hub.push_to_hub(out, args.push_to_hub, private=args.private, rewritten=lx.hub_copies(out))
        log.info("pushed to %s", url)
    return 0


def at_commit_read(argv: list[str], spec: str, lora) -> list[str]:
    """``argv`` with a hub LoRA's id ``spec`` (positional, ``--lora ID`` or ``--lora=ID``) at the commit it was read
    at (``owner/name@COMMIT[/file.safetensors]``); as given for a local LoRA."""
    from lowmem_alignprop.lora.hub_lora import at_commit

    if lora.hub is None or (pinned := at_commit(spec, lora.hub.commit)) is None:
        return argv
    return [pinned if word == spec else f"--lora={pinned}" if word == f"--lora={spec}" else word for word in argv]


def recover_lora(spec: str) -> None:
    """The LoRA of a run folder that is missing or damaged (a full disk or a kill while the run wrote it) is written
    again from the run's newest intact checkpoint, holding the run's lock meanwhile. A whole one is read as it is,
    without the lock (a read-only run folder: an archived or a colleague's run)."""
    from lowmem_alignprop.lora.final_lora import LORA_WEIGHT_NAME, lora_problem, rewrite_from_checkpoint, run_steps
    from lowmem_alignprop.run.filenames import LORA_DIR
    from lowmem_alignprop.run import atomic
    from lowmem_alignprop.run import checkpoint as ckpt
    from lowmem_alignprop.run.runlock import LockTaken, RunLock

    path = Path(spec).expanduser()
    run = path.parent if path.name == LORA_DIR else path.parent.parent if path.name == LORA_WEIGHT_NAME else path
    if path.name == LORA_DIR and path.exists() and not path.is_dir():
        return  # not a run's lora/ folder: read_lora says what it is
    if not (run / ckpt.DIRNAME).is_dir():
        return
    if (problem := lora_problem(run)) is None:
        checkpoints, done = run_steps(run)
        newest = next(iter(checkpoints), None)
        if newest is not None and done is not None and done < ckpt.step_of(newest):
            log.warning("%s holds step %d's LoRA and the run has a checkpoint of step %d (a start still running, or "
                        "one whose end did not write lora/: --resume latest writes it when the run has ended); "
                        "export %s for that step's", run / LORA_DIR, done, ckpt.step_of(newest), newest)
        return
    try:
        with RunLock(run):  # a run still writing there: one line, nothing touched
            rewrite_from_checkpoint(run)
    except LockTaken:  # (its message names --output-dir, training's choice)
        newest = next(iter(run_steps(run)[0]), None)
        raise UserError(f"{run} is still training ({problem}; it writes lora/ when it ends): export one of its "
                        f"checkpoints (lowmem-alignprop export {newest or run / ckpt.DIRNAME / 'step-N'}) or wait "
                        "for it to finish") from None
    except OSError as e:  # the run folder cannot be written: the lock, or the LoRA written again
        raise UserError(f"{problem} and {run} cannot be written ({atomic.describe(e)}): "
                        f"{atomic.write_fix(e, str(run))} so that export writes it again from the run's last "
                        f"checkpoint, or export a checkpoint (lowmem-alignprop export {run / ckpt.DIRNAME}/step-N)"
                        ) from None

"""Command line: ``lowmem-alignprop [train|plan|sample|profiles] ...`` (train is the default command).

Bad input prints one line naming the fix and exits with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import textwrap
from pathlib import Path

from lowmem_alignprop.settings.config import BATCH_MOST, Config, field_help, parse_set
from lowmem_alignprop.settings.quiet import quiet_libraries
from lowmem_alignprop.settings.errors import (ArgumentParser, UserError, did_you_mean, first_line, nearest,
                                              same_on_every_rank)
from lowmem_alignprop.run.runlock import global_rank
from lowmem_alignprop.run.stop_request import telling_ctrl_c

logger = logging.getLogger("lowmem_alignprop")
COMMANDS = ("train", "plan", "sample", "profiles", "export")
NUM_PROMPTS = 4  # sample's prompts without --num-prompts: a prompt set's first 4

COMMAND_LIST = """commands (lowmem-alignprop COMMAND --help for each one's options):
  train      (the default, also without a command) align a model's LoRA to a reward: the options below
  plan       estimate each stage's peak memory and seconds per step for a card, without a GPU or weights;
             --fastest picks the quickest memory features that fit
  sample     images with and without trained LoRA(s) from the same seeds, scored, side by side (no LoRA: a model's)
  export     a run's LoRA as diffusers, kohya/ComfyUI/A1111 or peft files (--push-to-hub to upload)
  profiles   the shipped hardware profiles and what each sets"""

EPILOG = """config fields (set them in a profile YAML or with --set key=value). The defaults shown are the fields'
own: a run takes its profile's values over them, then the model's (the default run, the toy world on the cpu
profile, trains toy_clip at 64 px, batch 4, K=2; `plan` shows what a run gets; `lowmem-alignprop profiles cpu`, the
profile under the toy model's own sampling):
{fields}

examples:
  lowmem-alignprop                                    # the shipped toy world, cpu profile, toy_clip reward
  accelerate launch -m lowmem_alignprop --profile rtx3060 --model runwayml/stable-diffusion-v1-5 --reward aesthetic
  lowmem-alignprop plan --profile rtx3060 --model sd15
  lowmem-alignprop profiles
"""


SAMPLE_EPILOG = """config fields that change the images or their scores (with --set key=value; the LoRA's run's own
are taken where it recorded them; training's fields, the K range, optimiser, checkpoints and its steps' speed
settings, change nothing here):
{fields}

examples:
  lowmem-alignprop sample outputs/run/lora                         # its run's model, prompts, reward and sampler
  lowmem-alignprop sample --lora a/lora:0.5 --lora b/lora:0.5      # the midpoint of two LoRAs in weight space
  lowmem-alignprop sample outputs/run/lora --prompt "a red fox" --images-per-prompt 4 --seed 7
  lowmem-alignprop sample --model merged/ --reward aesthetic       # a model alone (no LoRA): its images, scored
"""


class FieldParser(ArgumentParser):
    """train's, plan's and sample's parser: an unknown option that is a config field's name (``--batch-size 2``,
    ``--card=rtx4090``) is said with the --set that sets it, not as argparse's bare "unrecognized arguments"."""

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            words = f"unrecognized arguments: {' '.join(extras)}"
            if (field := field_option(extras)) is not None:
                raise UserError(f"{words}: {field[0]} is a config field: use --set {field[0]}={field[1]}")
            if (cut := cut_set(sys.argv[1:] if args is None else list(args), extras[0])) is not None:
                raise UserError(f"{words}: the shell cut --set {cut} at its space: quote it, --set '{cut}', or leave "
                                f"the space out, --set {cut.replace(', ', ',')}")
            self.error(words)
        return parsed


def cut_set(args: list[str], extra: str) -> str | None:
    """A --set value the shell cut at a space after a comma (``--set resolution=64, 64x32``: "resolution=64," and
    ``extra``, the first word argparse did not know), as it was meant, "resolution=64, 64x32"; None where there is
    none."""
    for i, word in enumerate(args[1:-1], start=1):
        if args[i - 1] == "--set" and word.endswith(",") and args[i + 1] == extra:
            words = [word]
            for after in args[i + 1:]:  # (each word after a comma: "64x32," "32x64" of resolution=64, 64x32, 32x64)
                words.append(after)
                if not after.endswith(","):
                    break
            return " ".join(words)
    return None


def field_option(extras: list[str]) -> tuple[str, str] | None:
    """The first of ``extras`` (options argparse did not know) that names a config field, with its value (the word
    after it or after its ``=``; VALUE where none was given); None when none does."""
    from lowmem_alignprop.settings.config import FIELD_NAMES

    for i, word in enumerate(extras):
        option, eq, value = word.partition("=")
        field = option.removeprefix("--").replace("-", "_").lower()
        if option.startswith("--") and field in FIELD_NAMES:
            follows = extras[i + 1] if i + 1 < len(extras) else ""
            return field, value if eq else follows if follows and not follows.startswith("-") else "VALUE"
    return None


def common_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = FieldParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EPILOG.format(fields=field_help()))
    from lowmem_alignprop.settings.profiles import shipped_profiles

    p.add_argument("--profile", default="auto",
                   help=f"hardware profile: a shipped name ({', '.join(shipped_profiles())}), auto "
                        "(the largest the detected GPU holds, or that card's profile made for the model, e.g. "
                        "rtx3060-flux; with the card's memory less 5%% as the budget; cpu without one), or a path to "
                        "your own .yaml")
    p.add_argument("--model", help="toy (default: the shipped toy world), tiny, sd15|sd21|sdxl|sd35m|sd35l|flux (random "
                                   "weights), a hub id, a diffusers directory (SD 1.x/2.x/SDXL, SD3/SD3.5, FLUX.1), or "
                                   "a single-file .safetensors/.ckpt")
    p.add_argument("--reward", help="brightness, colorfulness, jpeg_compressibility, aesthetic, clip, pickscore, "
                                    "hpsv2, toy_clip, toy_count=N; 'a:1,b:0.5' to combine; 'package.module:function' "
                                    "or 'path/to/file.py:function' for your own")
    from lowmem_alignprop.step.prompt_tables import TABLE_KINDS
    from lowmem_alignprop.step.prompts import PROMPT_SETS
    p.add_argument("--prompts", help=f"a built-in prompt set ({', '.join(PROMPT_SETS)}), a UTF-8 text file (one "
                                     f"prompt per line), a table ({', '.join(TABLE_KINDS)}) or a hub dataset's file "
                                     "(hf://datasets/OWNER/NAME[@REV][/FILE])")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--output-dir", help="where the LoRA, metrics, samples and reports go")
    p.add_argument("--seed", type=int, help="random seed")
    from lowmem_alignprop.settings.config import shipped_recipes
    p.add_argument("--report-to", choices=Config.__dataclass_fields__["report_to"].metadata["choices"],
                   help="accelerate tracker")
    p.add_argument("--recipe", choices=tuple(shipped_recipes()),
                   help="the paper's settings for a run (reward, loss scale, clipping, weight decay, K range), "
                        "between the profile and the flags; printed in config.yaml")
    p.add_argument("--eval-every", type=int, metavar="N", help="score held-out prompts with fixed seeds every N "
                   "steps (eval_reward in metrics.jsonl) and keep the best step's LoRA in best/")
    p.add_argument("--early-stop", type=int, metavar="P", help="end the run when evaluation has not improved for "
                   "P evaluations in a row (needs --eval-every)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field (repeatable), e.g. --set truncation=uniform --set k_max=20")
    return p


def add_run_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """train's and plan's options of a run's config fields that have no FLAG_FIELDS entry (plan takes a training
    command's as they are): :func:`parse_run_args` passes them on as --set."""
    p.add_argument("--max-minutes", type=float, metavar="M", help="time limit in minutes from the command's start "
                   "(a rented GPU's): stop before it with a checkpoint and the LoRA, samples and summary written; "
                   "--resume latest trains the rest under a new clock (0: no limit)")
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="save a resumable checkpoint every N steps")
    p.add_argument("--sample-every", type=int, metavar="N", help="render the sample grid's fixed-seed prompts every N "
                   "steps: samples/step-NNNNNN.png, their rewards in metrics.jsonl, the images to --report-to")
    p.add_argument("--init-lora", metavar="DIR|FILE|HUB_ID", help="start from this LoRA (a run's lora/ folder, a "
                   "checkpoint, a diffusers or kohya .safetensors, a peft folder, a hub id owner/name or "
                   "owner/name/file.safetensors, at a revision: owner/name@REV[/file.safetensors]) instead of a "
                   "fresh one; its layers the run does "
                   "not train (text encoders, convolutions, other linears) are kept as they came, fused into the base "
                   "(plan checks it as training does)")
    return p


def parse_run_args(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """train's and plan's arguments (``p``: :func:`train_parser` or :func:`plan_parser`), the options of
    :func:`add_run_options` passed on as --set."""
    args = p.parse_args(argv)
    for flag in ("max_minutes", "checkpoint_every", "sample_every", "init_lora"):
        if getattr(args, flag) is not None:
            args.set.append(f"{flag}={getattr(args, flag)}")
    return args


def config_from_args(args: argparse.Namespace, resumed: tuple[str, dict] | None = None,
                     training: bool = True, recorded: dict | None = None) -> tuple[str, object]:
    """The common options' (profile name, Config): :func:`lowmem_alignprop.settings.profiles.resolve_config` does the
    work (``recorded``: a resumed run's profile file's values at its start); the paths it names that exist made
    absolute (:func:`lowmem_alignprop.step.inputs.with_absolute_paths`)."""
    from lowmem_alignprop.settings.profiles import FLAG_FIELDS, resolve_config, run_config_values
    from lowmem_alignprop.step.inputs import with_absolute_paths

    if resumed is None and (run := run_config_values(args.profile)) is not None:  # --profile RUN/config.yaml
        _check_recorded_paths(args, run, f"--profile {args.profile}: its run", "its config.yaml", "run the command")
    name, cfg = resolve_config(args.profile, {f: getattr(args, f) for f in FLAG_FIELDS}, args.set, resumed, training,
                               recorded)
    return name, with_absolute_paths(cfg)


def parse_snapshot(spec: str | None) -> tuple[int, int] | None:
    if not spec:
        return None
    import re

    if (m := re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", spec.strip())) is None:  # ("2-", "2_0": int() took them)
        raise UserError(f"--memory-snapshot {spec!r}: write a step or a range, e.g. 2 or 2-3")
    lo, hi = int(m[1]), int(m[2] or m[1])
    if lo < 1 or hi < lo:
        raise UserError(f"--memory-snapshot {spec!r}: steps start at 1 and the range must not be empty")
    return lo, hi


def train_parser() -> argparse.ArgumentParser:
    p = common_parser("lowmem-alignprop", "Align a text-to-image diffusion model to a differentiable reward with "
                                          "AlignProp, within your GPU's memory.\n\n" + COMMAND_LIST)
    p.add_argument("--memory-snapshot", metavar="STEPS",
                   help="record a CUDA memory history for these steps (e.g. 2 or 2-3) and write "
                        "memory_snapshot.pickle for https://pytorch.org/memory_viz")
    p.add_argument("--resume", metavar="latest|DIR", help="continue a run, with the settings it was started with "
                   "(flags given now change them), from the latest checkpoint in --output-dir, or from a checkpoint "
                   "directory (in that run's folder unless --output-dir says otherwise)")
    p.add_argument("--auto-fit", action="store_true", help="on a CUDA card, train the fastest configuration that "
                   "fits (plan --fastest for the card and budget, searched on fake tensors before the first step); on "
                   "out-of-memory, step down automatically (smaller micro-batch, more checkpointing, offload) and "
                   "continue")
    p.add_argument("--push-to-hub", metavar="REPO", help="at the end, upload the LoRA's export with its model card to "
                   "this hub repository (owner/name); checked before training starts")
    return add_run_options(p)


def cmd_train(argv: list[str]) -> int:
    from lowmem_alignprop.run.time_limit import clock
    began = clock()  # --max-minutes counts from here: the command's whole time is rented time
    args = parse_run_args(train_parser(), argv)
    if args.push_to_hub is not None:
        args.set.append(f"push_to_hub={args.push_to_hub}")
    if args.auto_fit:
        args.set.append("auto_fit=true")
    from lowmem_alignprop.run.runfolder import RunFolder  # here, not at the top: --help need not import torch
    with same_on_every_rank():
        chosen = _output_dir_flag(args) is not None
        if args.resume and not chosen:  # --resume DIR continues in the run folder that holds DIR
            args.output_dir = RunFolder.of_checkpoint(args.resume)
        lone = args.resume not in (None, "latest") and not chosen and args.output_dir is None  # in no run's folder
        try:  # (a resume's first pass only finds its folder: the run's settings are read below and warned about)
            with _unsaid() if args.resume else contextlib.nullcontext():
                name, cfg = config_from_args(args)
            output_dir, refused = cfg.output_dir, None
        except UserError as e:  # a resume's flags may need the run's own settings (--early-stop 2: its eval_every)
            if not args.resume:
                raise
            output_dir, refused = _output_dir_flag(args) or os.path.expanduser(Config.output_dir), e
        folder = RunFolder.for_command(output_dir, chosen=chosen, resume=args.resume)
        settings = folder.resumed_settings()
        if settings:  # the run goes on with its own settings; this command's flags change them
            _check_recorded_paths(args, settings[1], f"--resume {args.resume}: the run in {output_dir}")
            name, cfg = config_from_args(args, resumed=settings, recorded=folder.recorded_profile()[1])
            if cfg.model == settings[1].get("model"):  # its model, gone (or a Windows path): not "leave --model out"
                from lowmem_alignprop.lora.lora_files import check_recorded_base
                check_recorded_base(cfg.model, f"--resume {args.resume}: the run in {cfg.output_dir}",
                                    "its checkpoint's config")
        elif refused is not None:
            raise refused
        snapshot = parse_snapshot(args.memory_snapshot)
        first = (folder.resumed_step() or 0) + 1  # a resume's first step
        if snapshot and (snapshot[0] > cfg.steps or snapshot[1] < first):  # nothing would be recorded, nor said
            why = (f"the run ends at step {cfg.steps}" if snapshot[0] > cfg.steps
                   else f"this resume starts at step {first}")
            raise UserError(f"--memory-snapshot {args.memory_snapshot}: {why}: give steps within {first}-{cfg.steps}")
    from lowmem_alignprop.commands.train_cmd import train_main
    # the exact command, as typed (accelerate launch's own options are the launcher's): the run folder records it
    return train_main(cfg, name, folder, memory_snapshot=snapshot, set_flags=args.set,
                      lone_resume=args.resume if lone else None,
                      command=_recorded_command(argv, args, name, bool(settings)), began=began)


def _check_recorded_paths(args: argparse.Namespace, recorded: dict, label: str,
                          record: str = "its checkpoint's config", where: str = "resume") -> None:
    """A path a run before 2026-12-05 recorded relative (to the folder it started in: a prompt file, its VAE,
    model_components, a reward file or reward weights), not found from the folder a resume (or a command given the
    run's config.yaml as --profile) runs in, that this command does not give again: one line naming the run's setting
    and the fix. Each path's own check named neither the run nor its record ('vae=vaedir does not exist', 'prompt file
    p.txt does not exist'), for a value the command did not name."""
    from lowmem_alignprop.settings.profiles import FLAG_FIELDS
    from lowmem_alignprop.step.inputs import RECORDED_PATHS, missing_recorded, recorded_path_line

    given = {**{f: v for f in FLAG_FIELDS if (v := getattr(args, f, None)) is not None}, **parse_set(args.set)}
    evaluates = {**recorded, **given}.get("eval_every")  # (eval_prompts is read by the evaluation alone)
    keys = tuple(k for k in RECORDED_PATHS if k not in given and (k != "eval_prompts" or evaluates))
    if (found := missing_recorded(recorded, keys)) is not None:
        raise UserError(recorded_path_line(label, recorded, found, record, where))


def _recorded_command(argv: list[str], args: argparse.Namespace, profile: str, resumed: bool) -> str:
    """The command line command.txt records: as typed, after ``$LOWMEM_ALIGNPROP_MODEL=M`` where that variable chose
    a new run's model (no --model, --set model= or profile file's model): the line alone trained the toy world."""
    import shlex

    from lowmem_alignprop.settings.config import MODEL_ENV
    from lowmem_alignprop.settings.profiles import as_read

    line = " ".join(["lowmem-alignprop", *map(shlex.quote, argv)])
    env = os.environ.get(MODEL_ENV, "").strip()
    with _unsaid():  # (config_from_args said what parsing them has to say)
        named = args.model is not None or "model" in parse_set(args.set) or "model" in (as_read(profile) or {})
    return line if resumed or named or not env else f"{MODEL_ENV}={shlex.quote(env)} {line}"


@contextlib.contextmanager
def _unsaid():
    """The project's warnings left unsaid: a configuration made again (and said then) replaces this one."""
    logger = logging.getLogger("lowmem_alignprop")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _output_dir_flag(args: argparse.Namespace) -> str | None:
    """The output folder the command line names (``--set output_dir=`` over ``--output-dir``), or None: a resume
    finds its run by it before the run's settings are read."""
    with _unsaid():  # (config_from_args says what parsing them has to say)
        given = parse_set(args.set).get("output_dir", args.output_dir)
    return None if given is None else os.path.expanduser(str(given))


def auto_here() -> str:
    """The shipped profile ``--profile auto`` picks on this machine for an SD model (what ``profiles auto`` prints),
    with a comment line saying so: a YAML comment, so ``profiles auto > mine.yaml`` still copies a profile."""
    from lowmem_alignprop.settings.profiles import card_budget, detect_card, profile_for_card

    card = detect_card()
    name = profile_for_card(card)
    why = ("no CUDA GPU is detected here" if card is None else
           f"{card[0]}, {card[1]:.1f} GiB, is detected here; a run with auto has budget_gb {card_budget(card[1]):g}, "
           "the card's memory less 5%, where this file says its own")
    sys.stdout.write(f"# --profile auto picks {name}: {why} (for SD3.5/FLUX.1 it picks the card's profile made for "
                     "the model)\n")
    return name


def profiles_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="lowmem-alignprop profiles", description="List the shipped hardware profiles and "
                            "recipes; with a NAME, print that one's file (every field it sets, with why) to copy and "
                            "edit: lowmem-alignprop profiles rtx3060 > mine.yaml, then --profile mine.yaml.")
    parser.add_argument("name", nargs="?", help="a shipped profile or recipe to print")
    return parser


def cmd_profiles(argv: list[str]) -> int:
    from lowmem_alignprop.settings.profiles import describe, load_profile, shipped_profiles

    args = profiles_parser().parse_args(argv)
    from lowmem_alignprop.settings.config import shipped_recipes

    profiles, recipes = shipped_profiles(), shipped_recipes()
    if args.name:
        files = {**profiles, **recipes}
        if args.name == "auto":  # no file of its own: the one it picks on this machine, said in a comment line
            args.name = auto_here()
        elif args.name not in files:
            raise UserError(f"no shipped profile or recipe {args.name!r}{did_you_mean(args.name, [*files, 'auto'])}: "
                            f"the profiles are {', '.join(profiles)}; the recipes {', '.join(recipes)}")
        sys.stdout.write(files[args.name].read_text(encoding="utf-8"))
        from lowmem_alignprop.settings.profiles import MODEL_DEFAULTS

        if args.name in profiles:  # a copy's lines win over a model's own sampling: say which those are
            for model, own in MODEL_DEFAULTS.items():
                sys.stdout.write(f"# --model {model} sets its own ")
                sys.stdout.write(", ".join(f"{k}: {v}" for k, v in own.items()) + " over this profile's; in a copy "
                                 "of this file, a line of those wins over the model's (delete it to keep the "
                                 "model's)\n")
        return 0
    width = max(map(len, [*profiles, *recipes]))  # one column for every name
    columns = max(80, shutil.get_terminal_size((120, 24)).columns)

    def row(head: str, text: str) -> str:  # the description wrapped under its own column
        return textwrap.fill(text, columns - 1, initial_indent=head, subsequent_indent=" " * len(head))

    for name, path in profiles.items():
        _, values = load_profile(name)
        print(row(f"{name:{width}s} {values.get('budget_gb', 0):5.1f} GiB  ", describe(path)))
    print(row(f"{'auto':{width}s} {'card':>5s} -5%  ", "The largest of these that the detected GPU holds (the one made "
              "for the model on its card, e.g. rtx3060-flux; under 7 GiB rtx3060's settings, not laptop-6gb's), with "
              "the card's memory less 5% as the budget; cpu without a GPU."))
    print("\n" + textwrap.fill("Use one with --profile NAME, or --profile path/to/your.yaml; override fields with "
                               "--set key=value. `lowmem-alignprop profiles NAME` prints one's fields to copy "
                               "(lowmem-alignprop profiles rtx3060 > mine.yaml).", columns - 1))
    print("\nrecipes (--recipe NAME: the paper's settings, applied between the profile and your flags):")
    for name, path in recipes.items():
        print(row(f"{name:{width}s} ", describe(path)))
    return 0


def plan_parser() -> argparse.ArgumentParser:
    p = common_parser("lowmem-alignprop plan", "Estimate the peak memory of each stage of a training step on the "
                                               "target GPU, without a GPU and without weights, and say whether it "
                                               "fits the profile's budget (and what to change if not).")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")
    p.add_argument("--device", choices=("cuda", "cpu"),
                   help="target device (default: cuda for GPU profiles and custom YAMLs, cpu for --profile cpu and a "
                   "profile whose card is cpu)")
    p.add_argument("--no-suggest", action="store_true", help="do not search for a change when it does not fit")
    p.add_argument("--fastest", action="store_true", help="search the memory features (checkpointing, offload, "
                   "decode, micro-batch for the same images per step) for the lowest estimated step time that fits "
                   "the budget; prints it as --set flags and as a profile YAML")
    p.add_argument("--allow-task-changes", action="store_true", help="with --fastest: when nothing else fits, also "
                   "swap frozen blocks from CPU memory (block_swap), quantize the frozen UNet or transformer (with or "
                   "without block swap) and lower the resolution (the last two change what is trained)")
    p.add_argument("--max-estimates", type=int, metavar="N", help="with --fastest: at most N estimates (default 40)")
    p.add_argument("--jobs", type=int, metavar="N", help="with --fastest: compute estimates ahead in N worker "
                   "processes (the same answer, sooner; default one per core up to 8; 1: none)")
    p.add_argument("--no-cache", action="store_true", help="estimate afresh, neither reading nor writing the "
                   "estimate cache (estimates of a configuration planned before are read from it; the cache "
                   "knows the package's code, the libraries and the model's files: docs/design.md section 4)")
    p.add_argument("--auto-fit", action="store_true", help=argparse.SUPPRESS)  # train's: refused with plan's word
    return add_run_options(p)


def cmd_plan(argv: list[str]) -> int:
    """``lowmem-alignprop plan``: the same options as training, plus --json and --device
    (:func:`lowmem_alignprop.commands.plan_cmd.plan_main` plans and prints)."""
    import time

    started = time.perf_counter()
    args = parse_run_args(plan_parser(), argv)
    if args.no_cache:  # an environment variable, so that --fastest's worker processes see it too
        from lowmem_alignprop.measure.estimate_cache import CACHE_ENV
        os.environ[CACHE_ENV] = "off"
    search_only = [flag for flag, given in (("--allow-task-changes", args.allow_task_changes),
                                            ("--max-estimates", args.max_estimates is not None),
                                            ("--jobs", args.jobs is not None)) if given]
    if search_only and not args.fastest:  # else they would be read by nothing
        raise UserError(f"{' and '.join(search_only)} set{'s' if len(search_only) == 1 else ''} how plan --fastest "
                        f"searches: add --fastest, or leave {'it' if len(search_only) == 1 else 'them'} out")
    if args.max_estimates is not None and args.max_estimates < 1:
        raise UserError(f"--max-estimates {args.max_estimates}: give at least 1 (default 40)")
    if args.auto_fit:  # (the unknown-option line sent it to --set auto_fit=true, which plan does not read)
        raise UserError("--auto-fit is train's (the fastest configuration that fits its card, searched before the "
                        "first step): plan --fastest prints the configuration it would train")
    name, cfg = config_from_args(args)
    from lowmem_alignprop.commands.plan_cmd import plan_main
    return plan_main(cfg, name, argv, started=started, as_json=args.json, target=args.device,
                     auto_found_no_gpu=args.profile == "auto" and name == "cpu",
                     suggest_changes=not args.no_suggest, fastest=args.fastest,
                     allow_task_changes=args.allow_task_changes, max_estimates=args.max_estimates, jobs=args.jobs)


def sample_parser() -> argparse.ArgumentParser:
    from lowmem_alignprop.run.filenames import SAMPLE_DIR, SAMPLE_GRID, SAMPLE_RESULTS

    p = common_parser("lowmem-alignprop sample",
                      "Generate images with and without trained LoRA adapter(s) from the same seeds, score them with "
                      "a reward, and write a side-by-side grid and sample_results.json. Without a LoRA: the model's "
                      "own images (--model: a hub id, a folder, a single file, an `export --merge`; else the "
                      "default model), scored the same way, in a grid of one row.")
    for action in p._actions:  # the shared parser's options, as this command reads them
        if action.dest in ("steps", "report_to", "eval_every", "early_stop"):
            action.help = argparse.SUPPRESS  # training-only: accepted, not advertised
        elif action.dest == "output_dir":
            action.help = f"where {SAMPLE_GRID} and {SAMPLE_RESULTS} go (default {SAMPLE_DIR})"
        elif action.dest == "seed":
            action.help = "seed of the first image; image j of prompt i uses seed + i * images_per_prompt + j"
        elif action.dest == "recipe":
            action.help = "the paper's run's reward to score with (the sampler's settings come from the LoRA's run)"
        elif action.dest == "set":
            action.help = "override a config field (repeatable), e.g. --set resolution=768 --set guidance_scale=5"
    p.add_argument("--lora", action="append", default=[], metavar="DIR[:WEIGHT]",
                   help="a trained LoRA (the lora/ folder of a run, the run folder, the .safetensors file, a "
                        "training checkpoint: checkpoints/step-300, a kohya file, a peft folder, or a Hugging Face "
                        "hub id: owner/name or owner/name/file.safetensors, at a revision: owner/name@REV"
                        "[/file.safetensors]), "
                        "repeatable; none: --model alone is sampled. WEIGHT (default 1.0) scales the adapter's "
                        "weight update; several adapters add up: --lora a:0.5 --lora b:0.5 is the midpoint of a and "
                        "b in weight space")
    p.add_argument("loras", nargs="*", metavar="LORA", help="LoRAs given without --lora (the same values, after them)")
    p.add_argument("--num-prompts", type=int, default=None, metavar="N",
                   help=f"first N prompts of the prompt set (default {NUM_PROMPTS})")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt of your own, repeatable: these prompts instead of a prompt set's first N")
    p.add_argument("--images-per-prompt", type=int, default=1, metavar="M", help="images per prompt (default 1)")
    from lowmem_alignprop.settings.config import SPEED_IN_TRAINING_ONLY, TRAINING_ONLY, field_help
    # (what only training reads changes nothing)
    p.epilog = SAMPLE_EPILOG.format(fields=field_help(TRAINING_ONLY | SPEED_IN_TRAINING_ONLY))
    return p


def cmd_sample(argv: list[str]) -> int:
    """``lowmem-alignprop sample``: base model vs LoRA(s), same seeds, scored by a reward, or without a LoRA the
    model alone (:mod:`lowmem_alignprop.commands.sample_cmd` takes the LoRAs' run settings, evaluates and prints)."""
    args = sample_parser().parse_args(argv)
    if args.num_prompts is not None and args.num_prompts < 1:
        raise UserError(f"--num-prompts {args.num_prompts}: give at least 1")
    if args.images_per_prompt < 1:
        raise UserError(f"--images-per-prompt {args.images_per_prompt}: give at least 1")
    if args.images_per_prompt > BATCH_MOST:  # (it rendered on for hours with no line)
        raise UserError(f"--images-per-prompt {args.images_per_prompt} is more than {BATCH_MOST}, the most this "
                        f"tool takes: give {BATCH_MOST} or fewer")
    own = [text.strip() for text in args.prompt]
    if own and args.prompts is not None:
        raise UserError("give your prompts with --prompt TEXT or a prompt set with --prompts, not both")
    if own and args.num_prompts is not None:  # (it was ignored: every --prompt is rendered)
        raise UserError(f"--num-prompts {args.num_prompts} counts a prompt set's first prompts: with --prompt TEXT "
                        f"each of yours is rendered ({len(own)} given); leave --num-prompts out")
    if any(not text for text in own):
        raise UserError("--prompt '': give the prompt's text (quote it: --prompt \"a red fox in the snow\")")
    args.lora += args.loras  # none: the model alone (--model, else the default), one column of its images
    from lowmem_alignprop.commands.sample_cmd import sample_main, take_run_settings

    request = take_run_settings(args, own)  # (into args: the config is built from them)
    profile_name, cfg = config_from_args(args, training=False)  # no gradient window: K and backward's rules left out
    return sample_main(cfg, request, num_prompts=len(own) or args.num_prompts or NUM_PROMPTS,
                       images_per_prompt=args.images_per_prompt, profile_name=profile_name)


def cmd_export(argv: list[str]) -> int:
    from lowmem_alignprop.commands.export_cmd import export_main

    return export_main(argv)


def to_null_device(stream) -> None:
    """The reader of ``stream`` left: its file descriptor now writes to the null device (no error at the exit's flush
    either)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


class ForgivingStream:
    """stdout or stderr of a command run from the shell: a character its encoding lacks is escaped
    (PYTHONIOENCODING=ascii met the step line's ±), and a reader that left (`... | head -1`) sends the rest to
    nowhere; either ended a training run between two steps, its LoRA unwritten."""

    def __init__(self, stream):
        self.stream = stream
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.gone()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.gone()

    def gone(self) -> None:
        to_null_device(self.stream)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # from the shell (tests pass argv and keep their own streams)
        sys.stdout, sys.stderr = (s if isinstance(s, ForgivingStream) else ForgivingStream(s)
                                  for s in (sys.stdout, sys.stderr))
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = "train"
    named = bool(argv) and argv[0] in COMMANDS
    if named:
        command = argv.pop(0)
    handler = {"train": cmd_train, "plan": cmd_plan, "sample": cmd_sample, "profiles": cmd_profiles,
               "export": cmd_export}[command]
    try:
        if not named and argv and not argv[0].startswith("-"):  # training takes no bare word: a command mistyped
            close = nearest(argv[0], COMMANDS)
            raise UserError(f"unknown command {argv[0]!r}: " + (f"did you mean lowmem-alignprop {close}?" if close
                            else f"the commands are {', '.join(COMMANDS)} (see lowmem-alignprop --help)"))
        if (unreadable := _unreadable_argument(argv)) is not None:  # (it broke writing command.txt, the model loaded)
            raise UserError(unreadable)
        if _working_directory_gone():  # before torch imports: its lazy MKL load ends the process without a word
            raise UserError("the working directory no longer exists: run the command from a folder that exists "
                            "(relative paths are read from there)")
        if command != "profiles" and not {"-h", "--help"} & set(argv):  # help and profiles only print: they import
            quiet_libraries()  # no library (torch and diffusers take seconds; a Ctrl-C meanwhile is said below)
        with telling_ctrl_c():  # a user's reward that raises KeyboardInterrupt is told from the user's Ctrl-C
            return handler(argv)
    except UserError as e:
        return _report(e)
    except KeyboardInterrupt as e:
        from lowmem_alignprop.run.stop_request import exit_code
        print("interrupted", file=sys.stderr)
        return exit_code(e)
    except BrokenPipeError:  # (a write to sys.stdout.buffer, which ForgivingStream does not see) the reader left:
        to_null_device(sys.stdout)
        return 141  # as a program killed by SIGPIPE; no traceback, and none at exit when Python flushes
    except Exception as e:  # a full disk or host memory in any command, in whichever words a library says it
        if isinstance(e, FileNotFoundError) and _working_directory_gone():  # before the run anchored its folder
            return _report(UserError("the working directory was deleted while the command started: run it again "
                                     "from a folder that exists (relative paths are read from there)"))
        said = _out_of_space_or_memory(e, command)
        if said is None:
            raise
        return _report(said)


def _unreadable_argument(argv: list[str]) -> str | None:
    """What to say of the first argument holding bytes the locale's encoding cannot read (Python keeps them as lone
    surrogates): a file named in Latin-1 (unzipped from an old Windows archive), or any non-ASCII name under LC_ALL=C
    with PYTHONUTF8=0. No file the run writes (command.txt, config.yaml, a model card) can hold it. None: all read."""
    for i, arg in enumerate(argv):
        if not any(0xD800 <= ord(c) <= 0xDFFF for c in arg):
            continue
        option, value = arg.partition("=")[::2] if arg.startswith("--") and "=" in arg else ("", arg)
        option = option or (argv[i - 1] if i and argv[i - 1].startswith("-") else "the argument")
        return (f"{option} {value!a} has bytes this locale cannot read (not UTF-8, or a non-UTF-8 locale such as "
                "LC_ALL=C with PYTHONUTF8=0): give it in UTF-8 (a file's name: convmv -f latin1 -t utf-8 --notest "
                "NAME renames it) or run in a UTF-8 locale (LC_ALL=C.UTF-8)")
    return None


def _working_directory_gone() -> bool:
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


# what lowers a command's memory (training's own out-of-memory errors are the fault ladder's: run/faults.py)
MEMORY_FIXES = {"train": "lower resolution or batch_size (--set), or add --auto-fit",
                "sample": "render fewer images at once (--num-prompts, --images-per-prompt) or at a lower --set "
                          "resolution",
                "export": "merge on a machine with more memory, or export the LoRA without --merge",
                "plan": "plan a smaller setting (--set resolution, batch_size) or, with --fastest, fewer workers "
                        "(--jobs 1)"}


def _out_of_space_or_memory(e: Exception, command: str = "train") -> UserError | None:
    """A write that failed for space (a full disk, a quota, a file-size limit: an OSError, or torch's or safetensors'
    words for one) or for permission (a folder or disk turned read-only: ``atomic.unwritable``), or memory that ran
    out (the GPU's: torch.OutOfMemoryError; else the host's), as one line naming what lowers ``command``'s; else None
    (a defect: its traceback)."""
    import errno

    from lowmem_alignprop.run import atomic
    from lowmem_alignprop.run.faults import is_oom

    tagged = getattr(e, "lowmem_file", None)  # the file an atomic write was making: where to look for free space
    failed = atomic.write_failure(e, Path(tagged).parent if tagged is not None else Path.cwd())
    unwritable = failed is not None and atomic.unwritable(failed)  # (a folder or disk turned read-only mid-run)
    if failed is not None and (atomic.is_disk_full(failed) or failed.errno == errno.EFBIG or unwritable):
        from lowmem_alignprop.models.tiny import cache_root

        try:
            in_cache = Path(atomic.file_of(failed)).absolute().is_relative_to(cache_root().absolute())
        except OSError:  # (no working directory left to read a relative name from)
            in_cache = False
        elsewhere = ("set LOWMEM_ALIGNPROP_CACHE to another folder" if in_cache else
                     "choose another --output-dir or --out")
        fix = ("raise the file-size limit (ulimit -f) or write elsewhere" if failed.errno == errno.EFBIG else
               f"make {Path(atomic.file_of(failed)).parent} writable (or {elsewhere})" if unwritable else
               f"free space in {cache_root()} (or set LOWMEM_ALIGNPROP_CACHE to a folder on a disk with room: the "
               "built-in models and plan estimates are kept there)" if in_cache else
               "free space (or choose another --output-dir or --out)")
        return UserError(f"{atomic.describe(failed)} (writing {atomic.file_of(failed)}): no file was half-written; "
                         f"{fix} and run the command again (a training run: --resume latest continues from its last "
                         "checkpoint)")
    if isinstance(e, (MemoryError, RuntimeError)) and is_oom(e):  # torch: RuntimeError("... can't allocate memory")
        import torch
        where = "GPU" if isinstance(e, torch.OutOfMemoryError) else "host"  # (a CUDA error was called host memory)
        return UserError(f"out of {where} memory ({first_line(e, 120)}): {MEMORY_FIXES.get(command, '')}"
                         + (", close other programs" if where == "host" else "") + ", or use a machine with more "
                         "memory")
    return None


REPORT_WAIT_S = 10  # how long a rank > 0 leaves the printing of an error every rank meets to rank 0 (ranks reach
# their checks a few seconds apart on a busy host)


def _report(e: UserError) -> int:
    """Print a UserError as one line (under a launcher once, by rank 0, when every rank has the same one); exit 2."""
    try:
        rank = global_rank()
    except UserError:  # the environment's own rank is what is wrong
        rank = 0
    if rank and getattr(e, "same_on_every_rank", False):
        import time
        time.sleep(REPORT_WAIT_S)  # rank 0 prints it: exiting at once could have the launcher stop rank 0 before
        # it does. Rank 0 failing alike ends the launch in that time (this process is stopped while it sleeps); a
        # rank still here found what rank 0 did not (a reward or prompt file that depends on the rank): it says so
    print(f"error: {f'[rank {rank}] ' if rank else ''}{e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

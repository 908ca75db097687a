"""Hardware profiles: small commented YAML files that pick memory features and sizes, never model paths."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import yaml

from lowmem_alignprop.settings.config import (FIELD_NAMES, RETIRED_FIELDS, Config, build_config, coerce, end_k_range_at,
                                              end_k_range_said, flag_value, parse_set, recipe_file, set_flags)
from lowmem_alignprop.settings.errors import UserError, did_you_mean
from lowmem_alignprop.settings.model_kind import model_kind_of, shipped_name
from lowmem_alignprop.settings.paths import describe as describe_path
from lowmem_alignprop.settings.paths import NotText, absolute_path, kind_of, read_user_text

PROFILE_DIR = Path(__file__).resolve().parents[1] / "profiles"
# auto: the largest shipped profile whose budget the detected card holds (GiB of total memory), or that card's profile
# made for the model (profile_for_card); the budget is then the card's own (card_budget).
AUTO_LADDER = (("a100-80gb", 70.0), ("a100-40gb", 36.0), ("rtx4090", 20.0), ("rtx3060", 7.0))


def shipped_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.yaml"))}


# every shipped profile but cpu targets a CUDA card (training refuses them without one; plan does not)
GPU_PROFILES = tuple(name for name in shipped_profiles() if name != "cpu")

# The card and the models each shipped profile is made for. The card is the row of measure/devices.py that times a
# plan (a custom profile names its card with --set card=NAME); the models (None: any) let a run of another model
# point to the profiles made for it. "sd" is SD 1.x/2.x, and the toy and tiny models, which have its shape.
PROFILE_TARGETS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "rtx3060": ("rtx3060-8gb", ("sd",)), "rtx3060-sdxl": ("rtx3060-8gb", ("sdxl",)),
    "laptop-6gb": ("laptop", ("sd",)), "rtx4090": ("rtx4090", ("sd", "sdxl")), "a100-40gb": ("a100-40gb", None),
    "a100-80gb": ("a100-80gb", None), "cpu": ("cpu", None),
    # the flow profiles (issue 18): the 8 GB RTX 3060 (240 GB/s) and the 12 GB one (360 GB/s) are timed apart
    "rtx3060-sd35m": ("rtx3060-8gb", ("sd35m",)), "rtx3060-flux": ("rtx3060-8gb", ("flux",)),
    "rtx3060-12gb-sd35l": ("rtx3060", ("sd35l",)), "rtx3060-12gb-flux": ("rtx3060", ("flux",)),
    "rtx4090-flux": ("rtx4090", ("flux",))}


def profile_of_card(card: str) -> str:
    """The --profile flags for a card row of measure/devices.py: the shipped SD-model profile timed on it, else one
    of its memory with --set card (h100: --profile a100-80gb --set card=h100)."""
    named = [n for n, (c, kinds) in PROFILE_TARGETS.items() if c == card and (kinds is None or "sd" in kinds)]
    if named:
        return f"--profile {named[0]}"
    return f"--profile {'a100-80gb' if card in ('h100', 'h200') else card_class(card)} --set card={card}"


def card_class(card: str) -> str:
    """The card a timing row of PROFILE_TARGETS belongs to: the 8 GB RTX 3060 is an rtx3060-class card."""
    return card.removesuffix("-8gb")


MODEL_KINDS = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "sd35m": "SD3.5 Medium", "sd35l": "SD3.5 Large", "flux": "FLUX.1"}


def made_for_others(profile: str, kind: str | None) -> list[str] | None:
    """None when shipped ``profile`` suits a model of ``kind`` (made for it or for any model; a user's YAML; kind
    unknown); else the shipped profiles of the same card made for ``kind`` (maybe none)."""
    card, kinds = PROFILE_TARGETS.get(profile, ("", None))
    if kind is None or kinds is None or kind in kinds:
        return None
    return [name for name, (c, ks) in PROFILE_TARGETS.items() if card_class(c) == card_class(card) and ks
            and kind in ks]


def profile_note(profile: str, kind: str | None) -> str | None:
    """A line when shipped ``profile`` was made for other models than ``kind`` (a key of :data:`MODEL_KINDS`),
    naming the shipped profiles for ``kind`` on the same card; None when it fits or is for any model."""
    others = made_for_others(profile, kind)
    if others is None:
        return None
    card, kinds = card_class(PROFILE_TARGETS[profile][0]), PROFILE_TARGETS[profile][1]
    made = f"profile {profile} is made for {' and '.join(MODEL_KINDS[k] for k in kinds)}, not {MODEL_KINDS[kind]}"
    if not others:
        return f"{made}; no shipped profile is made for {MODEL_KINDS[kind]} on {card}-class cards"
    return (f"{made}; for {MODEL_KINDS[kind]} on {card}-class cards: "
            + " or ".join(f"--profile {o} ({load_profile(o)[1]['budget_gb']:g} GiB budget)" for o in others))


def under_profile(profile: str, model: str, components: str, error: UserError, revision: str = "") -> UserError:
    """``error`` (a setting the model cannot run with), led by the line that shipped ``profile`` is made for other
    models than ``model`` (a hub id at ``revision``) where it is (its settings are another family's: FLUX.1's block
    swap on the toy model): that is the fix, not the setting. ``error`` itself otherwise."""
    note = profile_note(profile, model_kind_of(model, components, revision=revision))
    return UserError(f"{note}; under {profile}: {error}") if note is not None else error


def describe(path: Path) -> str:
    """The first sentence of a profile's (or recipe's) header comment (two when the first is short), whole, without
    the ``name:`` it starts with: what card and model it is for."""
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    sentences = re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(header).removeprefix(f"{path.stem}:").strip())
    short = len(sentences[0]) < 60  # "8 GB consumer cards (...)." says the card only: the next one says the model
    return " ".join(sentences[:2 if short else 1])


def detect_card() -> tuple[str, float] | None:
    """The CUDA card this process would train on: (its product name, total memory in GiB); None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory / 2**30


def card_budget(total_gib: float) -> float:
    """The budget ``--profile auto`` gives a card of ``total_gib``: its memory less 5% and at least 0.5 GiB (the
    CUDA context and what the allocator cannot see), rounded down to 0.1 GiB; close to the shipped profiles'
    (rtx3060 7.5 of 8 GB, rtx4090 22 of 24 GB, a100-40gb 38 of 40 GB)."""
    return max(0.1, math.floor(10 * min(total_gib - 0.5, total_gib * 0.95) + 1e-6) / 10)  # 1e-6: bytes to GiB


def profile_for_card(card: tuple[str, float] | None, kind: str | None = None) -> str:
    """The shipped profile ``--profile auto`` picks for ``card`` (detect_card's answer) and a model of ``kind``
    (MODEL_KINDS; None: unknown before loading): the ladder's profile for the card's memory, or, when that one is
    made for other models, the card's profile for this model with the largest budget the card holds (FLUX.1 on an 8
    GB card: rtx3060-flux; on a 12 GB one: rtx3060-12gb-flux)."""
    if card is None:
        return "cpu"
    name = next((name for name, need in AUTO_LADDER if card[1] >= need),
                "rtx3060")  # smaller than 7 GiB: start from the 8 GB profile and let the planner say what to change
    others = made_for_others(name, kind)
    if not others:
        return name
    room = max(card_budget(card[1]), load_profile(name)[1]["budget_gb"])  # an 8 GB card holds the 8 GB profiles
    fits = [(load_profile(p)[1]["budget_gb"], p) for p in others]
    return max((f for f in fits if f[0] <= room), default=(0, name))[1]


class _DuplicateKey(Exception):
    pass


_YAML_INT, _YAML_STR = "tag:yaml.org,2002:int", "tag:yaml.org,2002:str"
_DECIMAL = re.compile(r"[+-]?(0|[1-9][0-9]*)")  # a whole number as --set reads it (YAML 1.1 reads others otherwise)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load keeps the last of two equal keys without a word: a profile that says batch_size twice is a
    mistake to point out, not to resolve silently. A ``resolution`` that YAML 1.1 reads as a number other than its
    decimal digits (0x512: hex 1298; 0777: octal 511; 1_024; 8:32, base 60) is kept as written, for the line
    ``--set resolution=...`` gives (0x512: a side of 0 px), not one about a size never written."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # <<: *base brings keys that the mapping's own keys may override, as YAML says
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"{key!r} (line {key_node.start_mark.line + 1})")
            seen.add(key)
            sizes = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]  # (or a list's)
            for size in sizes if key == "resolution" else ():
                if isinstance(size, yaml.ScalarNode) and size.tag == _YAML_INT and not _DECIMAL.fullmatch(size.value):
                    size.tag = _YAML_STR
        return super().construct_mapping(node, deep=deep)


class _TooLarge(Exception):
    pass


MAX_YAML_VALUES = 10_000  # a profile has ~40 fields; aliases that expand past this are a mistake or an attack


def _expanded_size(node, memo: dict, limit: int) -> int:
    """How many values the node stands for once every alias is expanded (counted, never built)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = limit + 1  # a node met again while being counted is a cycle: too large
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    size = 1
    for child in children:
        size += _expanded_size(child, memo, limit)
        if size > limit:
            break
    memo[id(node)] = size
    return size


def _load_yaml(text: str):
    """yaml.safe_load with unique keys, refusing documents whose aliases expand past MAX_YAML_VALUES values."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}, MAX_YAML_VALUES) > MAX_YAML_VALUES:
            raise _TooLarge(MAX_YAML_VALUES)
        return None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()


RUN_RECORD_KEYS = ("profile", "profile_values", "output_dir", "auto_fit_search", "auto_fit_changes")  # a run's

_AS_READ: dict[str, dict[str, Any]] = {}  # a user's profile file (by its absolute path): its values as last read here


def as_read(name: str) -> dict[str, Any] | None:
    """The field values of the user's profile file ``name`` (absolute, as :func:`load_profile` names it) as this
    process last read it -- what a run started with it used (config.yaml's ``profile_values``); None for a shipped
    profile, or one not read here."""
    values = _AS_READ.get(name)
    return dict(values) if values is not None else None


def is_run_config(data: dict) -> bool:
    """A run's config.yaml: its profile's name, its output_dir and every field (most of today's, from an older
    version) -- not a file of a few lines a user wrote."""
    return {"profile", "output_dir"} <= data.keys() and 2 * len(set(FIELD_NAMES) & data.keys()) >= len(FIELD_NAMES)


def run_config_values(spec: str) -> dict[str, Any] | None:
    """A run's config.yaml named as a profile (``--profile RUN/config.yaml``): its field values as written; None for
    a profile name or a user's own file, or a file :func:`load_profile` refuses (it says why)."""
    path = Path(spec).expanduser()
    if spec in shipped_profiles() or path.suffix.lower() not in (".yaml", ".yml") or not path.is_file():
        return None
    try:
        data = _load_yaml(read_user_text(path))
    except (yaml.YAMLError, ValueError, OSError, _TooLarge, _DuplicateKey):
        return None
    return data if isinstance(data, dict) and is_run_config(data) else None


_UNSET = object()


def own_file_note(path: str, run: dict[str, Any], given: dict[str, Any],
                  recorded: dict[str, Any] | None = None) -> None:
    """A resume naming the run's own profile file whose fields differ from the run's (an edit of the file was
    dropped in silence): said, with the --set that takes the file's (the run keeps its settings). ``recorded``: the
    file's values when the run started (config.yaml's ``profile_values``): only the fields edited since are said (a
    field the run's --set gave over the unedited file is the run's own: unsaid); a line removed since gives the
    default. A run from before the record: the file's values and the run's are said, which may differ by an edit or
    by a --set given over the file."""
    try:
        written = load_profile(path)[1]
    except UserError:  # gone, or not readable now: the run's settings stand, as for a shipped profile
        return
    say = logging.getLogger("lowmem_alignprop").warning
    if recorded is None:
        differ = {k: v for k, v in written.items() if k not in given and k in run and run[k] != v}
        if differ:
            say("resume: profile %s, the run's own, sets %s where the run has %s (given over the file when the run "
                "started or resumed, or the file edited since): a resume keeps the run's settings and the flags "
                "given now; to take the file's, give it: %s", path,
                ", ".join(f"{k}={flag_value(v)}" for k, v in differ.items()),
                ", ".join(f"{k}={flag_value(run[k])}" for k in differ), set_flags(differ))
        return
    defaults = {**Config().to_dict(), **MODEL_DEFAULTS.get(shipped_name(str(run.get("model", ""))), {})}
    now = {**{k: defaults[k] for k in recorded if k not in written and k in defaults}, **written}
    edited = {k: v for k, v in now.items() if k not in given and recorded.get(k, _UNSET) != v and run.get(k, v) != v}
    if edited:
        said = [f"{k}={flag_value(recorded[k]) if k in recorded else '(not set)'} -> "
                f"{flag_value(v) if k in written else f'(line removed: the default {flag_value(v)})'}"
                + (f" (the run has {k}={flag_value(run[k])})" if run[k] != recorded.get(k, _UNSET) else "")
                for k, v in edited.items()]
        say("resume: profile %s, the run's own, was edited since the run started: %s: a resume keeps the run's "
            "settings and the flags given now; to take the file's, give it: %s", path, ", ".join(said),
            set_flags(edited))


def load_profile(spec: str, model: str = "", components: str = "", revision: str = "") -> tuple[str, dict[str, Any]]:
    """Return (name, field values) for a profile name, 'auto', or a path to a user's YAML file -- a run's own
    config.yaml too (it names its ``profile``): its settings and model, without its output_dir (a new run writes a
    new folder) and --auto-fit's record. ``model``: the run's --model (and ``components``, its model_components; a
    hub id's ``revision``, "" main), from which 'auto' picks the card's profile made for it when it can tell
    (:func:`profile_for_card`)."""
    detected = None
    if spec == "auto":  # the largest shipped profile the card holds, with the card's own budget
        detected = detect_card()  # with a card, a hub id not downloaded yet is asked what it is (None: no card)
        kind = model_kind_of(model, components, download=detected is not None, revision=revision)
        spec = profile_for_card(detected, kind)
    shipped = shipped_profiles()
    if spec in shipped:
        path, name = shipped[spec], spec
    else:
        path = Path(spec).expanduser()
        if path.suffix.lower() not in (".yaml", ".yml") or not path.is_file():
            kind = kind_of(path)
            hint = (f"profile {spec} {describe_path(path)}, not a profile file" if kind not in ("missing", "file") else
                    f"file {spec} does not exist" if path.suffix.lower() in (".yaml", ".yml") else
                    f"{spec} is not a profile (profile files end in .yaml)" if path.is_file() else
                    f"unknown profile {spec!r}{did_you_mean(spec, [*shipped, 'auto'])}")
            raise UserError(f"{hint}: use one of {', '.join(shipped)} or auto, or a path to your own .yaml "
                            "(`lowmem-alignprop profiles` lists them)")
        name = absolute_path(path)  # (recorded: config.yaml, the model card; from any folder)
    try:
        data = _load_yaml(read_user_text(path))  # UTF-8, or UTF-16 as Windows PowerShell's > writes it
    except _TooLarge as e:
        raise UserError(f"profile {path} uses YAML aliases (*name) that expand to more than {e} values: write the "
                        "fields out (a profile is a few `field: value` lines)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"profile {path} is not valid YAML{where}: fix the file (`lowmem-alignprop profiles cpu` "
                        "prints one, for the format)") from None
    except NotText as e:
        raise UserError(f"profile {path} {e}; save it as UTF-8 (Notepad: Save as, Encoding UTF-8)") from None
    except OSError as e:  # permissions, an I/O error
        raise UserError(f"cannot read profile {path} ({e.strerror or type(e).__name__}): check its permissions") \
            from None
    except _DuplicateKey as e:
        raise UserError(f"profile {path} sets {e} twice: keep one line") from None
    if data is None:
        raise UserError(f"profile {path} is empty: set at least the fields that differ from the defaults "
                        "(copy one: lowmem-alignprop profiles cpu > mine.yaml)")
    if not isinstance(data, dict):
        raise UserError(f"profile {path} must be a mapping of `field: value` lines, got {type(data).__name__}")
    values = {}
    run_config = is_run_config(data)  # a run's config.yaml (training/train_records.py config_yaml)
    if "profile" in data and not run_config:  # (it was taken for a run's record: the profile named went unapplied)
        raise UserError(f"profile {path} sets profile: {data['profile']}: a profile cannot build on another; copy "
                        f"that one and edit the copy (lowmem-alignprop profiles {data['profile']} > mine.yaml)")
    for key, value in data.items():
        if run_config and key in RUN_RECORD_KEYS or key in RETIRED_FIELDS and value is None:  # (an older run's)
            continue
        if key in ("model", "output_dir") and not (run_config and key == "model"):
            raise UserError(f"profile {path} sets {key}: profiles choose memory features, not paths; "
                            f"pass --{key.replace('_', '-')} on the command line instead")
        try:
            values[key] = coerce(str(key), value)  # an unknown key names the closest field
        except UserError as e:
            raise UserError(f"profile {path}: {e}") from None
    if run_config and data["profile"] == "cpu" and not values.get("card"):  # a cpu run before 2026-12-05 recorded
        values["card"] = "cpu"  # card '' (the profile had none): it plans for the CPU it trained on, as today's does
    if detected is not None:
        values["budget_gb"] = card_budget(detected[1])
    elif spec not in shipped:
        _AS_READ[name] = dict(values)
    return name, values


# What a model needs whatever the card: its native size and sampler, and the reward and prompts it was made for. They
# sit between the profile (whose resolution is for SD-sized models) and the flags and --set, which still win.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    # the toy world (docs/toy_world.md): trained at 64 px and sampled with DDIM 20 steps, guidance 3; toy_clip on its
    # four held-out pairs, 4 images a step (batch 2 moved nothing in a minute, batch 4 did: docs/toy_world.md);
    # --eval-every on captions of the same pairs in fuller scenes (four prompts leave none to hold out)
    "toy": {"resolution": 64, "sample_steps": 20, "guidance_scale": 3.0, "reward": "toy_clip",
            "prompts": "toy-pairs", "batch_size": 4, "eval_prompts": "toy-heldout"},
}


def with_model_defaults(values: dict[str, Any], model: str, own: bool = False) -> dict[str, Any]:
    """A profile's ``values`` with :data:`MODEL_DEFAULTS` of ``model`` on top (``own``: the user's own profile file,
    whose values win: it was written for this model); a K range past the model's DDIM steps ends at its last step
    (the profile's K range was for the profile's step count)."""
    model_own = MODEL_DEFAULTS.get(shipped_name(model), {})
    defaults = {k: v for k, v in model_own.items() if not (own and k in values)}
    over = {k: (values[k], v) for k, v in model_own.items() if own and k in values and values[k] != v}
    if over:  # e.g. a copy of `profiles cpu` (written for the tiny model): its 10 steps over the toy model's 20
        logging.getLogger("lowmem_alignprop").warning(
            "your profile sets %s over the %s model's own (%s): its lines win; delete them to keep the model's",
            ", ".join(f"{k} {flag_value(mine)}" for k, (mine, _) in over.items()), shipped_name(model),
            ", ".join(f"{k} {theirs}" for k, (_, theirs) in over.items()))
    values = {**values, **defaults}
    if "sample_steps" in defaults:
        end_k_range_at(values, defaults["sample_steps"])
    return values


FLAG_FIELDS = ("model", "reward", "prompts", "steps", "output_dir", "seed", "report_to", "recipe", "eval_every",
               "early_stop")  # fields with their own flag
# a recipe chooses what is trained and how (reward, loss, optimiser, truncation), never paths
NOT_IN_A_RECIPE = ("model", "output_dir", "recipe")


def load_recipe(name: str) -> dict[str, Any]:
    """A shipped recipe's field values (lowmem_alignprop/recipes/NAME.yaml), typed; unknown name -> UserError."""
    data = _load_yaml(recipe_file(name).read_text(encoding="utf-8")) or {}
    values = {str(k): coerce(str(k), v) for k, v in data.items() if k not in NOT_IN_A_RECIPE}
    return {**values, "recipe": name}


def check_recipe_target(recipe: dict[str, Any], chosen: dict[str, Any], kept: dict[str, Any]) -> None:
    """A recipe's reward_target is on its reward's scale (aesthetic: about 1-10): a run that trains another reward
    with it would pull that reward toward a number of another scale (toy_clip's images score near 80: down). Refused
    unless the user set reward_target too."""
    target = recipe.get("reward_target")
    if target is None or "reward_target" in kept or chosen.get("reward") == recipe["reward"]:
        return
    raise UserError(f"recipe {recipe['recipe']} sets reward_target={target:g} on the {recipe['reward']} reward's "
                    f"scale, and this run trains reward {chosen.get('reward')!r}: the loss would pull it toward "
                    f"{target:g}; give a target on its scale (--set reward_target=V), or none to raise it (--set "
                    "reward_target=null), or train the recipe's reward")


def overridden_recipe_note(profile: str, recipe: str, recipe_values: dict[str, Any], own: dict[str, Any]) -> None:
    """A profile file of the user's that names a recipe: its own fields win over the recipe's. A copy of a shipped
    profile holds truncation, K, lr and sample_steps lines, so the recipe's would be lost unsaid: said, with the fix."""
    differ = {k: (own[k], v) for k, v in recipe_values.items() if k in own and k != "recipe" and
              coerce(k, own[k]) != v}
    if differ:
        logging.getLogger("lowmem_alignprop").warning(
            "profile %s names recipe %s, and its own fields win over the recipe's: %s; delete those lines from the "
            "file (or give --recipe %s) for the recipe's", profile, recipe,
            ", ".join(f"{k} {flag_value(mine)} (recipe: {flag_value(theirs)})" for k, (mine, theirs) in differ.items()),
            recipe)


def resolve_config(profile: str, flags: dict[str, Any], sets: list[str], resumed: tuple[str, dict] | None = None,
                   training: bool = True, recorded: dict[str, Any] | None = None) -> tuple[str, Config]:
    """profile < the model's defaults (:data:`MODEL_DEFAULTS`) < recipe < explicit flags (``flags``: FLAG_FIELDS, None
    where not given) < ``--set`` items, validated. The recipe is ``flags["recipe"]`` or ``--set recipe=NAME``.
    ``resumed`` (--resume): the run's own (profile name, config) replaces the profile, unless ``profile`` names another
    one (then that profile applies on top of it); ``recorded``: its own profile file's values when it started
    (config.yaml's ``profile_values``; None before the record), which tell an edit of the file from its --set values
    (:func:`own_file_note`). ``training=False``: for ``sample``, which trains nothing
    (Config.validate's rules of training left out)."""
    overrides = parse_set(sets)  # malformed --set fails before the profile is even read
    explicit = {k: v for k, v in flags.items() if v is not None}
    for k in explicit.keys() & overrides.keys():  # (--set wins: the rule above; a typo's contradiction is said)
        if coerce(k, explicit[k]) != overrides[k]:
            logging.getLogger("lowmem_alignprop").warning("--%s %s and --set %s=%s both given: --set wins (%s=%s)",
                                                          k.replace("_", "-"), explicit[k], k,
                                                          flag_value(overrides[k]), k, flag_value(overrides[k]))
    own: dict[str, Any] = {}  # a profile file of the user's (a run's config.yaml too): its fields as written
    on_top = None  # a resume under another profile: said once the settings it gives are valid
    if resumed is None:
        model = str(overrides.get("model", explicit.get("model", Config().model)))
        name, values = load_profile(profile, model, str(overrides.get("model_components", "")),
                                    str(overrides.get("revision", "")))  # (--set only: no flag of their own)
        own = dict(values) if profile not in ("auto", *shipped_profiles()) else {}
        if "sample_steps" in own:  # the user's own file's steps end the K range it leaves at the defaults
            end_k_range_said(values, asked=own, training=training)
        if "model" in values and "model" not in {**explicit, **overrides}:  # a run's config.yaml: its model
            model = str(values["model"])
        values = with_model_defaults(values, model, own=profile not in ("auto", *shipped_profiles()))
    else:
        name, values = resumed
        if profile != name and Path(profile).expanduser().is_file() and absolute_path(Path(profile).expanduser()) \
                == name:  # the run's own file, named from here
            profile = name
        if profile not in ("auto", name):  # another card: its memory features on top of the run's settings
            name, card = load_profile(profile)
            values, on_top = {**values, **card}, name
        elif profile == name and profile not in ("auto", *shipped_profiles()):
            own_file_note(profile, values, {**explicit, **overrides}, recorded)
    chosen = {**values, **explicit, **overrides}
    model, components = str(chosen.get("model", Config().model)), str(chosen.get("model_components", ""))
    kept = {**explicit, **overrides}  # what the user set over the recipe
    if "recipe" in kept:
        recipe = kept["recipe"]
    else:  # a profile file naming a recipe: the recipe under the file's own fields (a run's config.yaml: all of them)
        recipe, kept = own.get("recipe"), {**own, **kept}
    if recipe:  # the paper's settings, between the profile and what the user typed
        recipe_values = load_recipe(str(recipe))
        replaced = {k: (v, recipe_values[k]) for k, v in MODEL_DEFAULTS.get(shipped_name(model), {}).items()
                    if k in recipe_values and recipe_values[k] != v and k not in kept}
        if replaced:  # e.g. the toy world's prompts and sampling, for the paper's Stable Diffusion 1.5 run's
            logging.getLogger("lowmem_alignprop").warning(
                "recipe %s is AlignProp's Stable Diffusion 1.5 run: on the %s model it replaces %s (set them with "
                "--set to keep the model's)", recipe, model,
                ", ".join(f"{k} {old} -> {new}" for k, (old, new) in replaced.items()))
        if "recipe" not in {**explicit, **overrides}:
            overridden_recipe_note(profile, str(recipe), recipe_values, own)
        values = {**values, **recipe_values, **{k: v for k, v in own.items() if k in kept}}
        check_recipe_target(recipe_values, {**values, **explicit, **overrides}, kept)
        if "prompts" not in recipe_values and "prompts" not in kept:  # hps: the paper's prompts do not ship
            logging.getLogger("lowmem_alignprop").warning(
                "recipe %s does not ship the paper's prompts: training on %s; pass them with --prompts FILE (the "
                "header of `lowmem-alignprop profiles %s` says which)", recipe,
                values.get("prompts", Config().prompts), recipe)
    try:
        built = build_config(values, explicit, overrides, training)
        if on_top:
            logging.getLogger("lowmem_alignprop").warning("resume: profile %s applies on top of the run's settings",
                                                          on_top)
        return name, built
    except UserError as e:  # a profile made for other models (FLUX.1's block swap on SD3.5): that first
        if (made_for := under_profile(name, model, components, e, str(chosen.get("revision", "")))) is not e:
            raise made_for from None
        field = re.match(r"[a-z_0-9]+", str(e))
        if field and field.group() in own and field.group() not in {**explicit, **overrides}:  # the file's value
            raise UserError(f"profile {name}: {e}") from None
        raise

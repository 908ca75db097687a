"""Differentiable rewards: ``reward = build_reward(spec, ...)``; ``scores = reward(images, prompts)``.

``images``: float ``[B, 3, H, W]`` in [0, 1] (any size); ``prompts``: B strings; ``scores``: float32 ``[B]``,
differentiable w.r.t. the images. Higher is better for every reward.

Spec forms:
  * a built-in name (see ``REWARDS``; ``colourfulness`` is accepted for ``colorfulness``); ``toy_count=3`` is the
    toy world's counter with its target count (``toy_count=3:0.5`` weighs it: after ``:`` always comes a weight);
  * ``"a:1.0,b:0.5"``: a weighted sum of terms (a term may also be a user reward, ``pkg.mod:fn:0.5``);
  * ``"package.module:function"``: your own reward (a module found on ``sys.path`` or in the working directory), or
    ``"path/to/file.py:function"`` (a file, its folder importable for its own imports). What it is follows from the
    spec, never from a guess:
      - a function or any other callable (``functools.partial``, an object with ``__call__``, an ``nn.Module``)
        is the reward itself: its first positional parameter takes the images, and the prompts are passed as
        the second when it accepts a second positional argument (``f(images)``, ``f(images, prompts=None)``,
        ``f(images, prompts, **kw)`` all work);
      - a class (a ``RewardModule`` or other ``nn.Module`` subclass) is constructed;
      - ``"package.module:factory()"`` (empty parentheses) calls ``factory`` to build the reward.
    A class or a ``factory()`` is given the keyword options it names among ``device``, ``dtype``,
    ``checkpointing``, ``weights`` (all of them if it takes ``**kwargs``).
A term ``x:y`` is a weight when ``y`` is a number and ``x`` has no dot; otherwise it is ``module:function``
(``pkg.mod:factory():0.5`` weighs a factory's reward).

``weights`` says where a model reward's weights are (hub id, directory or file; see
:mod:`.clip_rewards`). With several model rewards in one spec, give ``"name=PATH;name=PATH"``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import math
import os
import re
import sys
import zlib
from pathlib import Path
from typing import Callable

import torch

from ..run.stop_request import CtrlC
from ..settings.errors import UserError, did_you_mean, error_words, first_line
from ..settings.image_size import height_width
from ..settings.paths import per_reward_weights
from .base import (NOT_FROM_IMAGES, CallableReward, RewardModule, ScoresNotFromImages, WeightedSumReward,
                   callable_label, torch_state_kept)

__all__ = ["REWARDS", "RewardModule", "RewardBuilder", "build_reward", "check_reward_spec", "parse_reward_spec",
           "reward_terms", "reward_source_digest", "user_reward_source", "user_term_in_traceback",
           "ALIASES", "MODEL_REWARDS"]

TOY_COUNT_TARGET = 2.0  # toy_count without =N
REWARDS: dict[str, str] = {
    "brightness": "mean luminance of the image (0..1); weight-free",
    "colorfulness": "Hasler-Suesstrunk colourfulness (0..~150); weight-free (alias: colourfulness)",
    "jpeg_compressibility": "minus a differentiable estimate of the JPEG (q95) file size in KB; weight-free",
    "aesthetic": "LAION aesthetic predictor v2 on CLIP ViT-L/14 (~1..10); needs sac+logos+ava1-l14-linearMSE.pth",
    "clip": "CLIP image-prompt cosine similarity; default openai/clip-vit-large-patch14",
    "pickscore": "PickScore (yuvalkirstain/PickScore_v1): logit_scale * cosine(image, prompt)",
    "hpsv2": "HPS v2 human preference score (ViT-H-14; HPS_v2_compressed.pt / HPS_v2.1_compressed.pt)",
    "toy_clip": "the toy world's image-prompt alignment, 100 x cosine (CLIP-like; ships with the package, --model toy)",
    "toy_count": "the toy world's object counter: -(expected count - N)^2, written toy_count=N (N in 0..4, default "
                 f"{TOY_COUNT_TARGET:g}); ships with the package",
}
ALIASES: dict[str, str] = {"colourfulness": "colorfulness", "jpeg": "jpeg_compressibility"}
MODEL_REWARDS = frozenset({"aesthetic", "clip", "pickscore", "hpsv2"})

FACTORY_OPTIONS = ("device", "dtype", "checkpointing", "weights")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _names_hint() -> str:
    spelled = {name: alias for alias, name in ALIASES.items()}  # colorfulness (or colourfulness)
    return ", ".join(f"{n} (or {spelled[n]})" if n in spelled else n for n in REWARDS)


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """``spec`` -> [(term, weight)], a term being a built-in name or ``module:function``. No imports."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"empty reward spec; use a built-in name ({_names_hint()}), 'name:weight,...' or "
                        "'package.module:function'")
    if re.search(r"[()]", re.sub(r"\(\s*\)", "", spec)):
        raise UserError(f"reward spec {spec!r}: a factory is written 'package.module:factory()' with empty "
                        f"parentheses; it is given the options it names among {', '.join(FACTORY_OPTIONS)}: "
                        "set any other argument in your module (a default or functools.partial)")
    terms = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise UserError(f"reward spec {spec!r} has an empty term; write e.g. 'brightness:1.0,colorfulness:0.01'")
        weight = 1.0
        left, sep, right = part.rpartition(":")
        if sep and _NUMBER.match(right.strip()) and (":" in left or "." not in left):
            part, weight = left.strip(), float(right)
            if not math.isfinite(weight):  # (1e400: every step's reward infinite, each skipped, in a run that "ends")
                raise UserError(f"reward {part!r}: the weight {right.strip()} is not a finite number; write e.g. "
                                f"{part}:0.5")
        terms.append((part, weight))
    return terms


def _builtin(name: str, *, checkpointing: bool, weights: str) -> RewardModule:
    from . import simple

    if name == "brightness":
        return simple.BrightnessReward()
    if name == "colorfulness":
        return simple.ColorfulnessReward()
    if name == "jpeg_compressibility":
        return simple.JpegCompressibilityReward()
    if name.startswith("toy_"):
        from . import toy
        if name == "toy_clip":
            return toy.load_toy_clip(toy.SHIPPED_REWARDS / "toy_clip", checkpointing=checkpointing)
        return toy.load_toy_count(toy.SHIPPED_REWARDS / "toy_count", target=toy_count_target(name),
                                  checkpointing=checkpointing)
    from . import clip_rewards

    builder = {"aesthetic": clip_rewards.build_aesthetic, "clip": clip_rewards.build_clip,
               "pickscore": clip_rewards.build_pickscore, "hpsv2": clip_rewards.build_hpsv2}[name]
    return builder(weights=weights, checkpointing=checkpointing)


def _user_module_name(term: str) -> tuple[str, str, bool]:
    """(module or file, attribute, whether a file) of a user reward term."""
    file_term = re.match(r"^(.+\.py)\s*:(.*)$", term.strip())  # path/to/file.py:function (a path may hold ':')
    module_name, attr = file_term.groups() if file_term else term.partition(":")[::2]
    return module_name, attr, bool(file_term)


def reward_source_digest(spec: str) -> str | None:
    """A digest of the source files of ``spec``'s own rewards (a file's, or an imported module's), None with none:
    kept in each checkpoint, so that a resume tells a reward file edited since (the same spec, another reward).
    Helper modules the reward imports are not read."""
    import hashlib

    digest, files = hashlib.sha256(), 0
    for kind, term, _ in reward_terms(spec):
        if kind != "user" or (origin := user_reward_source(term)) is None:
            continue
        try:
            digest.update(origin.read_bytes())
            files += 1
        except OSError:
            continue
    return digest.hexdigest()[:16] if files else None


def user_term_in_traceback(spec: str, error: BaseException) -> str | None:
    """The user reward term of ``spec`` whose source file is among the frames ``error`` was raised through (its
    function, its backward: a custom autograd Function, a hook), or None: whose code failed, where the stage does
    not tell (a backward's error is raised in the trainer's backward stage, a plan's on fake tensors)."""
    import traceback

    frames = {Path(frame.filename).resolve() for frame in traceback.extract_tb(error.__traceback__)}
    return next((term for kind, term, _ in reward_terms(spec) if kind == "user" and user_reward_source(term) in frames),
                None)


def user_reward_source(term: str) -> Path | None:
    """The source file of a user reward term (``path/to/file.py:fn``'s file, or ``module:fn``'s module's), absolute;
    None where there is none to find (a namespace package, a module that cannot be found)."""
    module_name, _, is_file = _user_module_name(term)
    try:
        return Path(module_name.strip()).expanduser().resolve() if is_file else \
            Path(importlib.util.find_spec(module_name.strip()).origin).resolve()
    except (ImportError, AttributeError, TypeError, ValueError, OSError):
        return None


def _import_user(term: str) -> tuple[object, str]:
    module_name, attr, file_term = _user_module_name(term)
    module_name, attr = module_name.strip(), attr.strip()
    if _is_factory_term(term):
        attr = attr[:-2].rstrip()
    name = module_name.partition("=")[0].strip().lower()  # toy_count=3: the name before its option
    if ALIASES.get(name, name) in REWARDS:  # 'brightness:abc', 'toy_count=3:abc': a weight, not a module
        why = ("the weight after ':' is missing" if not attr else  # (both read as a user reward's module)
               "more than one weight: give one" if _NUMBER.match(attr) else f"the weight {attr!r} is not a number")
        raise UserError(f"reward {term!r}: {why}; write e.g. {module_name}:0.5 ({module_name} alone: weight 1)")
    if not module_name or not attr or ":" in attr:
        raise UserError(f"reward {term!r}: write a user reward as 'package.module:function'")
    kind = "file" if file_term else "module"
    try:
        with torch_state_kept(term, f"importing {kind} {module_name!r}", after="after its import"):
            module = _load_file(term, module_name) if file_term else _import_from_path_or_cwd(module_name)
    except ImportError as exc:
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if file_term or missing != module_name and not module_name.startswith(f"{missing}."):  # its own import
            raise UserError(f"reward {term!r}: importing {kind} {module_name!r} failed: " + (
                f"it imports {missing!r}, which is not installed here (pip install it, or fix the {kind})" if missing
                else f"{error_words(exc)}; fix the {kind}")) from None
        raise UserError(f"reward {term!r}: cannot import module {module_name!r} ({exc}); make it importable "
                        f"(install it, add its folder to PYTHONPATH or run from that folder), give its file "
                        f"('path/to/file.py:function') or use a built-in reward: {_names_hint()}") from exc
    except (CtrlC, UserError):  # a plain KeyboardInterrupt is the module's own
        raise
    except BaseException as exc:  # a SyntaxError, an error or sys.exit at the module's top level: the user's code
        what = f"{exc.msg} ({exc.filename}, line {exc.lineno})" if isinstance(exc, SyntaxError) else first_line(exc)
        raise UserError(f"reward {term!r}: importing {kind} {module_name!r} failed with {type(exc).__name__}: "
                        f"{what}; fix the {kind}") from None
    obj = module
    for piece in attr.split("."):
        if not hasattr(obj, piece):
            raise UserError(f"reward {term!r}: module {module_name!r} has no {attr!r}; check the function name "
                            f"or use a built-in reward: {_names_hint()}")
        obj = getattr(obj, piece)
    return obj, attr


def _import_from_path_or_cwd(module_name: str):
    """``import module_name``, the working directory searched last: ``python -m`` puts it first on sys.path, the
    ``lowmem-alignprop`` script does not, and a reward next to the user's data must import under both."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)  # last: an installed package of the same name still wins
    return importlib.import_module(module_name)


def _load_file(term: str, path_text: str):
    """The module of a reward given as a file; its folder is searched (last) for the file's own imports, as Python
    does for a script. Loaded once per file: the start-up check, the trainer and the planner share its functions."""
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"reward {term!r}: {path_text} is not a file; give the path of your reward's .py file "
                        f"(relative to the working directory, {os.getcwd()})")
    name = f"lowmem_alignprop_user_reward_{path.stem}_{zlib.crc32(str(path).encode()):08x}"  # no other's name
    if name in sys.modules:
        return sys.modules[name]
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look their module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _is_factory_term(term: str) -> bool:
    """``module:factory()``: the spec marks ``factory`` as a builder of the reward."""
    return re.sub(r"\s+", "", term).endswith("()")


def _supported_options(fn: Callable, options: dict) -> dict:
    """The keyword options ``fn`` names (all of them if it takes ``**kwargs``)."""
    if inspect.isclass(fn) and fn.__init__ is torch.nn.Module.__init__:
        return {}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(options)
    by_keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {k: v for k, v in options.items() if k in params and params[k].kind in by_keyword}


def _build(term: str, builder: Callable, options: dict) -> tuple[object, str]:
    """Call a reward class or a marked factory with the options it names: (what it returned, the call, for
    messages). An error there is one line naming the call."""
    kwargs = _supported_options(builder, options)
    call = f"{callable_label(builder)}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        with torch_state_kept(term, f"building it ({call})", after="after building it"):
            return builder(**kwargs), call
    except (UserError, torch.cuda.OutOfMemoryError, MemoryError, CtrlC):  # out of memory stays itself
        raise
    except BaseException as e:  # the user's code: any failure, sys.exit included
        raise UserError(f"reward {term!r}: building it failed with {error_words(e)} (called "
                        f"{call}; a reward class or factory is given the options it names among "
                        f"{', '.join(FACTORY_OPTIONS)}, by keyword, and returns the reward)") from None


def _user_reward(term: str, options: dict) -> RewardModule:
    """A user reward from ``module:function`` (see the module docstring for what each form means)."""
    obj, attr = _import_user(term)
    label = None
    if inspect.isclass(obj):
        if not issubclass(obj, torch.nn.Module):
            raise UserError(f"reward {term!r} is a class but not a torch.nn.Module; subclass "
                            "lowmem_alignprop.rewards.RewardModule or give a function (images, prompts) -> tensor[B]")
        obj, call = _build(term, obj, options)
    elif _is_factory_term(term):
        if not callable(obj):
            raise UserError(f"reward {term!r}: {attr} is of type {type(obj).__name__}, not a function that builds "
                            "the reward; give a factory, or drop the parentheses to use a reward itself")
        obj, call = _build(term, obj, options)
        if not callable(obj):
            raise UserError(f"reward {term!r}: called {call} and it returned a value of type {type(obj).__name__}, "
                            "not a reward; a factory returns a function (images, prompts) -> tensor[B] or a "
                            "RewardModule")
        label = call  # the reward it built is named by the call that built it
    if isinstance(obj, RewardModule):
        if getattr(obj, "name", "reward") in ("reward", type(obj).__name__):
            obj.name = term
        return obj
    if not callable(obj):
        raise UserError(f"reward {term!r} is not callable; give a function (images, prompts) -> tensor[B]")
    return CallableReward(obj, term, label)


def _split_weights(weights: str, model_terms: list[str], *, quiet: bool = False) -> dict[str, str]:
    weights = (weights or "").strip()
    if not weights:
        return {}
    if len(weights) > 1 and weights[0] == weights[-1] and weights[0] in "'\"":  # quotes a shell would have taken
        raise UserError(f"reward_weights={weights}: its value is in quotes that a shell would have removed (a YAML "
                        f"file or a script kept them): write it without them: {weights[1:-1]}")
    if per_reward_weights(weights):
        out = {}
        for item in weights.split(";"):
            if not item.strip():
                continue
            key, _, value = item.partition("=")
            key = ALIASES.get(key.strip(), key.strip())
            if key not in MODEL_REWARDS:
                raise UserError(f"reward_weights entry {item.strip()!r}: {key!r} is not a model reward; "
                                f"use one of {', '.join(sorted(MODEL_REWARDS))}")
            if key in out and out[key] != value.strip():  # (the last was taken, unsaid)
                raise UserError(f"reward_weights gives {key} twice ({out[key]} and {value.strip()}): keep one")
            out[key] = value.strip()
        unused = sorted(set(out) - set(model_terms))
        if unused and not quiet:  # a typo in --reward, or a leftover: said, not silently ignored
            logging.getLogger(__name__).warning("reward_weights gives %s for %s, which --reward does not use",
                                                ", ".join(f"{k}={out[k]}" for k in unused), ", ".join(unused))
        return out
    if len(set(model_terms)) > 1:
        named = list(dict.fromkeys(model_terms))  # (the example named aesthetic and clip whatever the spec's were)
        raise UserError(f"reward_weights is one path but the spec has several model rewards ({', '.join(named)}); "
                        f"give one per reward: --set reward_weights='{';'.join(f'{t}=PATH' for t in named)}'")
    return {t: weights for t in model_terms}


def toy_count_target(term: str) -> float:
    """The target of ``toy_count`` or ``toy_count=N`` (a count the counter knows, 0..4). Raises UserError."""
    _, sep, value = term.partition("=")
    if not sep:
        return TOY_COUNT_TARGET
    try:
        target = float(value)
    except ValueError:
        target = float("nan")
    if not 0 <= target <= 4:  # (NaN fails too)
        raise UserError(f"reward {term!r}: the target count must be a number from 0 to 4 (what the toy counter "
                        "knows), e.g. toy_count=3")
    return target


def reward_terms(spec: str) -> list[tuple[str, str, float]]:
    """[(kind 'user'|'builtin', name, weight)]; unknown built-in names raise UserError."""
    resolved = []
    for term, weight in parse_reward_spec(spec):
        if ":" in term:
            resolved.append(("user", term, weight))
            continue
        if term.partition("=")[0].strip().lower() == "toy_count":
            name = "toy_count=" + term.partition("=")[2].strip() if "=" in term else "toy_count"
            toy_count_target(name)  # a bad target fails here, before any model loads
            resolved.append(("builtin", name, weight))
            continue
        name = ALIASES.get(term.lower(), term.lower())
        if term.endswith(".py"):  # a reward file without its function
            raise UserError(f"reward {term!r}: name the function in the file too, e.g. '{term}:my_reward'")
        if name not in REWARDS:
            raise UserError(f"unknown reward {term!r}{did_you_mean(term, REWARDS)}; use one of: {_names_hint()}, "
                            "'name:weight,...', or "
                            "'package.module:function' for your own")
        resolved.append(("builtin", name, weight))
    named = [name for _, name, _ in resolved]
    if (twice := next((n for n in named if named.count(n) > 1), None)) is not None:  # (computed twice, in silence)
        total = sum(w for _, n, w in resolved if n == twice)
        raise UserError(f"reward spec {spec!r} names {twice} more than once: give each reward once, with the sum of "
                        f"its weights ({twice}:{total:g})")
    return resolved


def check_reward_spec(spec: str, *, resolution: int | tuple[int, int] | list[tuple[int, int]] | None = None,
                      prompts: list[str] | None = None, weights: str | None = None) -> None:
    """Fail fast (before any model loads) on unknown names and user rewards that cannot be imported; with
    ``resolution`` (a side, or the run's (height, width); a list of them: each size of a run of several), also call
    each user reward once on two random images of each size (see :func:`probe_reward`) and refuse a toy reward at a
    non-square size (:func:`check_square_rewards`); with ``weights`` (reward_weights; not for ``plan``, which reads
    no weights), the model rewards' local weight files are found (:func:`clip_rewards.check_local_weights`)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the trainer will call it
    resolved = reward_terms(spec)
    sizes = resolution if isinstance(resolution, list) else [resolution] if resolution else []
    for size in sizes:
        check_square_rewards(resolved, size)
        if note := cropped_note(resolved, size):  # (each non-square size's)
            logging.getLogger(__name__).warning("%s", note)
    if weights is not None:
        from .clip_rewards import check_local_weights

        model_terms = [name for kind, name, _ in resolved if kind == "builtin" and name in MODEL_REWARDS]
        per_reward = _split_weights(weights, model_terms, quiet=True)  # build_reward says what is unused
        for name in dict.fromkeys(model_terms):
            with _naming_entry(name, model_terms):
                check_local_weights(name, per_reward.get(name, ""))
    for kind, name, weight in resolved:
        if weight == 0:
            logging.getLogger(__name__).warning("reward term %r has weight 0: it is computed every step but does "
                                                "not train anything; drop it or give it a weight", name)
        if kind == "user":
            _import_user(name)
            if sizes:
                options = {"device": device, "dtype": torch.float32, "checkpointing": False, "weights": ""}
                module = _user_reward(name, options)  # a class or factory that fails: one line naming the call
                for size in sizes:
                    probe_reward(module.freeze().to(device), size, prompts)


SQUARE_REWARDS = ("toy_clip", "toy_count")  # ConvTower resizes any image to 64x64: a wide one squeezed


def check_square_rewards(resolved: list[tuple[str, str, float]], resolution: int | tuple[int, int]) -> None:
    """The toy world's rewards read 64x64 images, the square scenes they were trained on: an image of another
    aspect (``resolution``: (height, width)) would be squeezed into that square. One line naming the fix."""
    height, width = height_width(resolution)
    square = [name for kind, name, _ in resolved if kind == "builtin" and name.partition("=")[0] in SQUARE_REWARDS]
    if square and height != width:
        raise UserError(f"reward {square[0]} reads square images (the toy world's scenes are 64x64): a {width}x{height}"
                        " image would be squeezed into a square, its shapes distorted; use a square size (--set "
                        "resolution=64) or another reward")


def cropped_note(resolved: list[tuple[str, str, float]], resolution: int | tuple[int, int]) -> str | None:
    """What the CLIP-family rewards (:data:`MODEL_REWARDS`) of a spec see of a non-square image (``resolution``:
    (height, width)): ClipPreprocess, as CLIPImageProcessor, resizes the shortest side and crops the centre square,
    so the rest of the long side is neither scored nor trained. None for a square image or no such reward."""
    height, width = height_width(resolution)
    names = list(dict.fromkeys(name for kind, name, _ in resolved if kind == "builtin" and name in MODEL_REWARDS))
    if not names or height == width:
        return None
    short, cut = min(height, width), abs(width - height) // 2
    where = "left and right" if width > height else "top and bottom"
    one = len(names) == 1
    return (f"reward{'' if one else 's'} {', '.join(names)} score{'s' if one else ''} the centre {short}x{short} px "
            f"of each {width}x{height} image ({'its' if one else 'their'} preprocessing: shortest side resized, then "
            f"a centre crop, as CLIP's image processor does): the {cut} px at the {where} are not scored, so the "
            f"reward{'' if one else 's'} do{'es' if one else ''} not train them")


def probe_reward(reward: RewardModule, resolution: int | tuple[int, int], prompts: list[str] | None = None) -> None:
    """Call ``reward`` on two random images in [0, 1] of ``resolution`` pixels (a side, or (height, width): the
    run's images' shape) with the first two of the run's
    ``prompts``, as the trainer will: it must run, return one finite score per image and carry a gradient back to
    the images (AlignProp backpropagates through it). Each failure is a UserError naming the fix, before any model
    loads."""
    g = torch.Generator().manual_seed(0)
    device = next((t.device for t in list(reward.parameters()) + list(reward.buffers())), torch.device("cpu"))
    height, width = height_width(resolution)
    leaf = torch.rand(2, 3, height, width, generator=g).to(device).requires_grad_(True)
    images = leaf * 1.0  # not a leaf, as the decoded images are not (an in-place change is then said as such)
    pair = (list(prompts or []) * 2)[:2] or ["a photo of a cat", "a painting of a dog"]
    call = getattr(reward, "call", f"{type(reward).__qualname__}.score(images, prompts)")
    with_prompts = f" with the prompts {pair}" if getattr(reward, "takes_prompts", True) else ""
    what = (f"reward {reward.name!r}: called {call} on 2 random images (2x3x{height}x{width} in [0, 1])"
            f"{with_prompts} and it")
    cut_off = f"{what} {NOT_FROM_IMAGES}"
    try:
        scores = reward(images, pair)
    except ScoresNotFromImages:  # (a leaf: RewardModule's check, said in the probe's words)
        raise UserError(cut_off) from None
    except UserError as e:
        raise UserError(f"{e} (on 2 random test images)") from None
    except CtrlC:  # the user's Ctrl-C; a KeyboardInterrupt the function raises is its failure
        raise
    except BaseException as e:  # the user's code: any failure, sys.exit included
        raise UserError(f"{what} raised {error_words(e)}; fix the function") from None
    if not torch.isfinite(scores.detach()).all():
        raise UserError(f"{what} returned NaN or inf ({scores.detach().tolist()}); make it return finite scores")
    if not scores.requires_grad:
        raise UserError(f"{what} returned scores with no gradient to the images (a .detach(), .item(), numpy or "
                        "new tensor inside?): AlignProp needs a differentiable reward")
    try:  # one backward, as training does: requires_grad alone passes a tensor made with requires_grad=True
        (grad,) = torch.autograd.grad(scores.sum(), leaf, allow_unused=True)
    except CtrlC:  # the user's Ctrl-C; a KeyboardInterrupt the function raises is its failure
        raise
    except BaseException as e:
        raise UserError(f"{what} returned scores whose backward raised {error_words(e)}; "
                        "AlignProp backpropagates through the reward: fix the function") from None
    if grad is None:
        raise UserError(cut_off)
    if not torch.isfinite(grad).all():
        raise UserError(f"{what} returned scores whose gradient to the images is NaN or inf: make the reward "
                        "differentiable where it is evaluated (a sqrt or log of 0?)")
    if not grad.any():
        raise UserError(f"{what} returned scores whose gradient to the images is exactly zero (a threshold, "
                        "rounding or argmax inside?): AlignProp learns only from a reward whose gradient "
                        "reaches the pixels")


class RewardBuilder:
    """How :func:`build_reward` makes the module of one term. This one loads a model reward's weights and imports a
    user reward; the planner's subclass builds model rewards' architectures on meta (random weights, nothing read),
    so that the rule for a spec (terms, weights per model reward, the weighted sum, freezing, the dtype) is this
    module's alone."""

    def model(self, name: str, *, weights: str, checkpointing: bool) -> RewardModule:
        """A model reward (``name`` in ``MODEL_REWARDS``); ``weights``: this reward's own entry of reward_weights."""
        return _builtin(name, checkpointing=checkpointing, weights=weights)

    def user(self, term: str, options: dict) -> RewardModule:
        """A user reward ``module:function`` given ``options`` (device, dtype, checkpointing, weights)."""
        return _user_reward(term, options)


@contextlib.contextmanager
def _naming_entry(name: str, model_terms: list[str]):
    """With several model rewards their weights are given one per reward: a UserError's fix names this one's entry."""
    try:
        yield
    except UserError as e:
        if len(set(model_terms)) < 2:
            raise
        from .clip_rewards import FLAG
        raise UserError(str(e).replace(FLAG, f"--set reward_weights='...;{name}=PATH'")) from None


def build_reward(spec: str, *, device="cpu", dtype: torch.dtype = torch.float32, checkpointing: bool = False,
                 weights: str = "", builder: RewardBuilder | None = None) -> RewardModule:
    """Build a frozen reward module from ``spec`` (see the module docstring), placed on ``device``/``dtype``.
    ``builder`` makes each model and user term's module (default: :class:`RewardBuilder`, which loads them)."""
    builder = builder or RewardBuilder()
    resolved = reward_terms(spec)
    model_terms = [name for kind, name, _ in resolved if kind == "builtin" and name in MODEL_REWARDS]
    per_reward = _split_weights(weights, model_terms)
    if (weights or "").strip() and not per_reward_weights(weights) and not model_terms and all(
            k != "user" for k, _, _ in resolved):
        logging.getLogger(__name__).warning(  # (the keyed form's unused entries are said by _split_weights)
            "reward_weights=%s: --reward %s reads no weights (only %s and your own rewards do): it is not used",
            weights.strip(), spec, ", ".join(sorted(MODEL_REWARDS)))
    options = {"device": device, "dtype": dtype, "checkpointing": checkpointing, "weights": weights}
    modules = []
    for kind, name, weight in resolved:
        if kind == "user":
            module = builder.user(name, options)
        elif name not in MODEL_REWARDS:
            module = _builtin(name, checkpointing=checkpointing, weights="")  # weight-free, or the toy world's shipped
        else:
            with _naming_entry(name, model_terms):
                module = builder.model(name, weights=per_reward.get(name, ""), checkpointing=checkpointing)
        modules.append((module, weight))
    reward = modules[0][0] if len(modules) == 1 and modules[0][1] == 1.0 else WeightedSumReward(modules)
    reward.freeze()
    # float dtypes only touch floating-point tensors; buffers such as position ids stay integer
    return reward.to(device=device, dtype=dtype)

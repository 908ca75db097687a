"""The image size a run trains and samples at. ``resolution`` is one whole number N (N x N pixels: what a profile and
an earlier run's config.yaml hold) or ``"WxH"``, width x height as A1111, kohya and the model spec write it
(``--set resolution=1216x832``). A square ``"NxN"`` is kept as N, so a square run's files are as they were.

Several sizes (aspect-ratio buckets): a list, YAML ``resolution: [1024, 1216x832, 832x1216]`` or ``--set
resolution=1024,1216x832,832x1216``. Step s (1-based, over the whole run) trains at sizes[(s - 1) % n]
(:func:`step_size`); the fixed-seed renders stay at the first size. One size is kept as that size, not a list."""

from __future__ import annotations

import re
from typing import Any

from lowmem_alignprop.settings.errors import UserError, quote

_SIDES = re.compile(r"(\d+)\s*[xX]\s*(\d+)")
_WHOLE = re.compile(r"[+-]?\d+")
EXAMPLE = "--set resolution=1216x832"  # (the fix a malformed size is told: width x height)
MOST_SIZES = 16  # sizes one run cycles through
LIST_EXAMPLE = "--set resolution=1024,1216x832,832x1216"


def parse_resolution(value: Any) -> int | str:
    """A profile's, a --set's or a run file's ``resolution`` as the config keeps it: a whole number (or its text)
    -> that int; ``"WxH"`` -> ``"WxH"`` (spaces and the x's case dropped), ``"NxN"`` -> N. Anything else is one
    line naming the two forms."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip()
        if _WHOLE.fullmatch(text):
            return int(text)
        if (m := _SIDES.fullmatch(text)) is not None:
            return resolution_of(int(m[1]), int(m[2]))
    raise UserError(f"resolution={quote(value)} is not an image size: give its side in pixels (--set "
                    f"resolution=1024) or its width x height ({EXAMPLE})")


def parse_sizes(value: Any) -> int | str | list[int | str]:
    """A profile's, a --set's or a run file's ``resolution``, one size or several: a list (YAML) or text with commas
    (--set; in brackets too, as YAML writes a list) -> the list of each size's :func:`parse_resolution` value, in
    the order given; a list of one size -> that size, as a single size is kept. An empty item, a size given twice
    or more than :data:`MOST_SIZES`: one line."""
    if isinstance(value, str) and (text := value.strip()).startswith("[") and text.endswith("]"):
        items: Any = [_unquoted(v) for v in text[1:-1].split(",")]  # a YAML list to --set: [1024, "1216x832"]
        if len(items) == 1 and items[0].strip():
            return parse_resolution(items[0])
    elif isinstance(value, str) and "," in value:
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        return parse_resolution(value)
    shown = ",".join("" if v is None else str(v).strip() for v in items) or "[]"
    if not items or any(v is None or str(v).strip() == "" for v in items):
        raise UserError(f"resolution={shown} has an empty item: give each size once, separated by commas "
                        f"({LIST_EXAMPLE})")
    if len(items) > MOST_SIZES:
        raise UserError(f"resolution={shown} gives {len(items)} sizes, more than {MOST_SIZES}, the most one run cycles "
                        f"through (one size a step, in turn): give {MOST_SIZES} or fewer")
    sizes = [parse_resolution(v) for v in items]
    if (twice := next((v for i, v in enumerate(sizes) if v in sizes[:i]), None)) is not None:
        once = ",".join(str(v) for v in dict.fromkeys(sizes))
        raise UserError(f"resolution={shown} gives the size {twice} twice: give each size once (--set "
                        f"resolution={once})")
    return sizes if len(sizes) > 1 else sizes[0]


def _unquoted(item: str) -> str:
    """An item of a bracketed list as YAML and JSON read it: the text inside its quotes ("1216x832", '64')."""
    text = item.strip()
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" else item


def size_values(resolution: Any) -> list[int | str]:
    """The ``resolution`` value of each size a run trains at, in order: one for a single size."""
    value = parse_sizes(resolution)
    return value if isinstance(value, list) else [value]


def sizes_of(resolution: Any) -> list[tuple[int, int]]:
    """(width, height) in pixels of each size of a ``resolution`` (one size or a list), in order."""
    return [image_sides(v) for v in size_values(resolution)]


def step_size(cfg: Any, step: int) -> tuple[int, int]:
    """(width, height) of the images of optimizer step ``step`` (1-based, counted over the whole run): the sizes in
    turn, sizes[(step - 1) % n]. Every micro-batch and process of the step, and a resume, agree without state."""
    sizes = sizes_of(cfg.resolution)
    return sizes[(step - 1) % len(sizes)]


def step_pixels(cfg: Any, step: int) -> int:
    """The pixels of each image of optimizer step ``step`` (:func:`step_size`'s width x height)."""
    width, height = step_size(cfg, step)
    return width * height


def largest_size(resolution: Any) -> tuple[int, int]:
    """(width, height) of the size with the most pixels (the first of equals): the step whose memory must fit."""
    return max(sizes_of(resolution), key=lambda s: s[0] * s[1])


def first_step_at_largest(resolution: Any, first: int, last: int) -> int | None:
    """The first step from ``first`` to ``last`` (1-based, over the whole run) at a size of the most pixels (the
    steps take the sizes in turn, as :func:`step_size`); None where none of them is."""
    pixels = [width * height for width, height in sizes_of(resolution)]
    return next((s for s in range(first, last + 1) if pixels[(s - 1) % len(pixels)] == max(pixels)), None)


def describe_sizes(resolution: Any) -> str:
    """The sizes as a plan, a card or a line names them: ``1024``, ``1216x832`` or ``1024, 1216x832, 832x1216``."""
    return ", ".join(str(v) for v in size_values(resolution))


def sizes_note(resolution: Any) -> str | None:
    """The start line of a run of several sizes (None for one): which size each step trains at, and that the
    fixed-seed renders stay at the first."""
    values = size_values(resolution)
    if len(values) == 1:
        return None
    n = len(values)
    return (f"{n} image sizes, each step at the next in turn (steps 1, {n + 1}, {2 * n + 1}... at the first): "
            f"{describe_sizes(resolution)}; the sample grids, the held-out evaluation and best/ render at the first, "
            f"{values[0]} px, so their numbers compare across steps")


def resolution_of(width: int, height: int) -> int | str:
    """The ``resolution`` value of a ``width`` x ``height`` image: N for a square one, else ``"WxH"``."""
    return width if width == height else f"{width}x{height}"


def image_sides(resolution: Any) -> tuple[int, int]:
    """(width, height) in pixels of a ``resolution`` value (an int N: N x N; ``"WxH"``)."""
    value = parse_resolution(resolution)
    if isinstance(value, int):
        return value, value
    width, height = value.split("x")
    return int(width), int(height)


def height_width(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) in pixels of an image ``size``: one side (a square), or already (height, width)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def nearest_multiples(resolution: Any, multiple: int) -> tuple[int | str, int | str]:
    """The sizes nearest ``resolution`` whose sides are multiples of ``multiple``: (each side rounded down, not under
    ``multiple``; each side rounded up), as ``resolution`` values."""
    width, height = image_sides(resolution)
    down = [max(multiple, side // multiple * multiple) for side in (width, height)]
    up = [-(-side // multiple) * multiple for side in (width, height)]
    return resolution_of(*down), resolution_of(*up)


def lower_resolution(resolution: Any, floor: int = 256) -> int | str | list[int | str] | None:
    """The planner's "lower the resolution" step: each side over ``floor`` px to three quarters, down to a multiple
    of 64 (so of every model's 8 or 16) and not under ``floor``; None once the image has ``floor`` squared pixels or
    fewer (a square N goes 1024 -> 768 -> 576 -> 384 -> 256). Several sizes: each lowered so (one already at the
    floor kept), sizes that become one kept once; None once every size is at the floor."""
    sizes = sizes_of(resolution)
    if all(width * height <= floor * floor for width, height in sizes):
        return None
    lowered = list(dict.fromkeys(resolution_of(*(max(min(side, floor), side * 3 // 4 // 64 * 64) for side in size))
                                 if size[0] * size[1] > floor * floor else resolution_of(*size) for size in sizes))
    return lowered if len(lowered) > 1 else lowered[0]

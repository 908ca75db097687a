"""The image size a run trains and samples at. ``resolution`` is one whole number N (N x N pixels: what a profile and
an earlier run's config.yaml hold) or ``"WxH"``, width x height as A1111, kohya and the model spec write it
(``--set resolution=1216x832``). A square ``"NxN"`` is kept as N, so a square run's files are as they were."""

from __future__ import annotations

import re
from typing import Any

from lowmem_alignprop.settings.errors import UserError, quote

_SIDES = re.compile(r"(\d+)\s*[xX]\s*(\d+)")
_WHOLE = re.compile(r"[+-]?\d+")
EXAMPLE = "--set resolution=1216x832"  # (the fix a malformed size is told: width x height)


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


def lower_resolution(resolution: Any, floor: int = 256) -> int | str | None:
    """The planner's "lower the resolution" step: each side over ``floor`` px to three quarters, down to a multiple
    of 64 (so of every model's 8 or 16) and not under ``floor``; None once the image has ``floor`` squared pixels or
    fewer (a square N goes 1024 -> 768 -> 576 -> 384 -> 256)."""
    width, height = image_sides(resolution)
    if width * height <= floor * floor:
        return None
    return resolution_of(*(max(min(side, floor), side * 3 // 4 // 64 * 64) for side in (width, height)))

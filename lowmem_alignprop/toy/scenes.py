"""Procedural scenes: description, seeded sampler, caption grammar, renderer and the train/held-out split.

A scene is 1-4 flat-coloured objects (a shape, a colour from a small palette, a size and a position) on a
background colour. Its caption says what an exact evaluator can check: how many objects of each colour and
shape there are and, optionally, the background ("two red circles", "a blue square and an orange triangle on a
white background"). Sizes and positions are free: they vary between scenes with the same caption.

Geometry lives in normalised units (the image is the unit square, x to the right, y down), so one scene
renders at any resolution; 64 px is the default and the smallest at which the exact evaluators are specified
(the smallest object is then 10 px across).

Everything is deterministic: scene ``i`` of a stream is drawn from ``numpy.random.default_rng([seed, i,
split])``, so a scene can be regenerated alone, on any machine, without drawing the ones before it.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

WORLD_VERSION = "1"  # bump when the palette, the grammar, the sampler or the split changes

# Object colours (RGB, 0-255): far from each other (closest pair, orange-yellow, 83 apart) and from every
# background colour, so nearest-colour segmentation is unambiguous on flat colours.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (150, 60, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
PLURALS = {s: s + "s" for s in SHAPES}
MAX_OBJECTS = 4
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
WORD_COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
MAX_COUNT = 64 * 64  # a numeral past what a 64 px image can hold (one per pixel) is no count of its objects

# Colour-shape pairs that no training caption contains: each shape and four colours lose one partner each,
# every word still appears in training with all its other partners, so a held-out prompt asks for a new
# combination of known words.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("red", "triangle"), ("green", "circle"), ("blue", "diamond"), ("yellow", "square"),
})
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple(itertools.product(COLOURS, SHAPES))
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
SPLITS = ("train", "heldout", "all")

# Sampler geometry (normalised units). At 64 px: objects 10.2-25.6 px across, >= 4 px apart, >= 2.5 px from
# the border, so objects never touch each other or the frame.
MIN_SIZE = 0.16
MAX_SIZE = {1: 0.40, 2: 0.32, 3: 0.28, 4: 0.25}
MARGIN = 0.04
GAP = 0.0625
P_MENTION_BACKGROUND = 0.5


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    x: float  # centre, normalised
    y: float
    size: float  # side of the (square) bounding box, normalised

    def box(self) -> tuple[float, float, float, float]:
        r = self.size / 2
        return self.x - r, self.y - r, self.x + r, self.y + r


@dataclass(frozen=True)
class Content:
    """What a caption says: the multiset of (colour, shape) objects, canonically ordered, and the background
    (None when the caption does not name one)."""
    objects: tuple[tuple[str, str], ...]
    background: str | None = None

    @property
    def count(self) -> int:
        return len(self.objects)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    mention_background: bool = field(default=True)

    @property
    def content(self) -> Content:
        return content(self)

    @property
    def caption(self) -> str:
        return caption(self)


def _pair_key(pair: tuple[str, str]) -> tuple[int, int]:
    return list(COLOURS).index(pair[0]), SHAPES.index(pair[1])


def make_content(pairs: Iterable[tuple[str, str]], background: str | None = None) -> Content:
    pairs = tuple(sorted(pairs, key=_pair_key))
    for colour, shape in pairs:
        if colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"unknown object {colour} {shape}")
    if background is not None and background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background}")
    return Content(pairs, background)


def content(scene: Scene | Content) -> Content:
    """The caption-relevant content of a scene (identity on a Content)."""
    if isinstance(scene, Content):
        return scene
    return make_content(((o.colour, o.shape) for o in scene.objects),
                        scene.background if scene.mention_background else None)


# ----------------------------------------------------------------------------------------------- grammar
#   caption    := groups [ " on a " BACKGROUND " background" ]
#   groups     := group | group " and " group | group ", " groups-without-last " and " group
#   group      := COUNT " " COLOUR " " SHAPE        (SHAPE plural when COUNT > 1; "an" before a vowel)
# Groups come in canonical order (palette order of the colour, then SHAPES order), one group per distinct
# (colour, shape), so a content has exactly one caption. The parser also accepts any group order, "one",
# an Oxford comma, a final full stop, capitals and repeated groups (their counts add up).

def _group_text(n: int, colour: str, shape: str) -> str:
    if n == 1:
        article = "an" if colour[0] in "aeiou" else "a"
        return f"{article} {colour} {shape}"
    return f"{COUNT_WORDS[n] if n in COUNT_WORDS else str(n)} {colour} {PLURALS[shape]}"


def caption(scene: Scene | Content) -> str:
    c = content(scene)
    if not c.objects:
        raise ValueError("a scene needs at least one object")
    counts = Counter(c.objects)
    groups = [_group_text(counts[p], *p) for p in sorted(counts, key=_pair_key)]
    text = groups[0] if len(groups) == 1 else ", ".join(groups[:-1]) + " and " + groups[-1]
    if c.background is not None:
        text += f" on a {c.background} background"
    return text


_SINGULAR = {s: s for s in SHAPES} | {PLURALS[s]: s for s in SHAPES}
_BACKGROUND_RE = re.compile(r"\s+on\s+an?\s+(\w+)\s+background$")


def parse_caption(text: str) -> Content:
    """Caption -> Content. Raises ValueError on anything outside the grammar."""
    s = " ".join(text.lower().strip().rstrip(".").split())
    background = None
    m = _BACKGROUND_RE.search(s)
    if m:
        background = m.group(1)
        if background not in BACKGROUNDS:
            raise ValueError(f"unknown background {background!r} in {text!r}")
        s = s[:m.start()]
    parts = re.split(r"\s*,\s*(?:and\s+)?|\s+and\s+", s)
    if not s or not all(parts):
        raise ValueError(f"{text!r} is not a list of COUNT COLOUR SHAPE groups")
    pairs: list[tuple[str, str]] = []
    for part in parts:
        words = part.split()
        if len(words) != 3:
            raise ValueError(f"{part!r} in {text!r} is not COUNT COLOUR SHAPE")
        count_word, colour, shape_word = words
        if count_word not in WORD_COUNTS and not (count_word.isdigit() and int(count_word) >= 1):
            raise ValueError(f"unknown count {count_word!r} in {text!r}")
        if count_word.isdigit() and int(count_word) > MAX_COUNT:  # (99999999999 made a list that long: out of memory)
            raise ValueError(f"count {count_word} in {text!r} is more than a 64 px image holds ({MAX_COUNT})")
        n = WORD_COUNTS.get(count_word) or int(count_word)  # a numeral: caption()'s for counts beyond the words
        if colour not in COLOURS:
            raise ValueError(f"unknown colour {colour!r} in {text!r}")
        if shape_word not in _SINGULAR:
            raise ValueError(f"unknown shape {shape_word!r} in {text!r}")
        plural = shape_word != _SINGULAR[shape_word]
        if plural != (n > 1):
            raise ValueError(f"{part!r} in {text!r}: count and number disagree")
        pairs += [(colour, _SINGULAR[shape_word])] * n
    return make_content(pairs, background)


# ----------------------------------------------------------------------------------------------- split

def split_of(item: Scene | Content | str) -> str:
    """'heldout' when the caption holds a held-out colour-shape pair, else 'train'."""
    c = parse_caption(item) if isinstance(item, str) else content(item)
    return "heldout" if any(p in HELD_OUT_PAIRS for p in c.objects) else "train"


def all_contents(max_objects: int = MAX_OBJECTS) -> Iterator[Content]:
    """The whole caption space: every multiset of 1..max_objects objects, with and without each background."""
    for n in range(1, max_objects + 1):
        for pairs in itertools.combinations_with_replacement(ALL_PAIRS, n):
            for bg in (None, *BACKGROUNDS):
                yield make_content(pairs, bg)


# ----------------------------------------------------------------------------------------------- sampler

def _draw_pairs(rng: np.random.Generator, n: int, split: str) -> list[tuple[str, str]]:
    if split == "train":
        return [TRAIN_PAIRS[i] for i in rng.integers(0, len(TRAIN_PAIRS), n)]
    if split == "all":
        return [ALL_PAIRS[i] for i in rng.integers(0, len(ALL_PAIRS), n)]
    # held out: uniform over the lists of n pairs from ALL_PAIRS that hold a held-out pair (rejection;
    # P(accept) >= 4/24 per draw)
    while True:
        pairs = [ALL_PAIRS[i] for i in rng.integers(0, len(ALL_PAIRS), n)]
        if any(p in HELD_OUT_PAIRS for p in pairs):
            return pairs


def _place(rng: np.random.Generator, n: int) -> list[tuple[float, float, float]]:
    """n non-overlapping squares (x, y, size) inside the frame, >= GAP apart (Chebyshev, between boxes)."""
    smax = MAX_SIZE[min(n, MAX_OBJECTS)] if n <= MAX_OBJECTS else MIN_SIZE
    while True:
        placed: list[tuple[float, float, float]] = []
        for _ in range(n):
            for _try in range(100):
                size = float(rng.uniform(MIN_SIZE, smax))
                lo, hi = MARGIN + size / 2, 1 - MARGIN - size / 2
                x, y = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
                if all(max(abs(x - px) - (size + ps) / 2, abs(y - py) - (size + ps) / 2) >= GAP
                       for px, py, ps in placed):
                    placed.append((x, y, size))
                    break
            else:
                break  # this layout is stuck: start again
        if len(placed) == n:
            return placed


def sample_scene(rng: np.random.Generator, split: str = "train", n_objects: int | None = None,
                 p_mention_background: float = P_MENTION_BACKGROUND) -> Scene:
    """One scene: count uniform in 1..4 (unless given), each object's (colour, shape) uniform over the
    split's pairs, background uniform, named in the caption with probability p_mention_background."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else int(n_objects)
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"1 to {MAX_OBJECTS} objects, got {n}")
    pairs = _draw_pairs(rng, n, split)
    boxes = _place(rng, n)
    background = list(BACKGROUNDS)[int(rng.integers(0, len(BACKGROUNDS)))]
    mention = bool(rng.random() < p_mention_background)
    objs = tuple(Obj(shape=s, colour=c, x=x, y=y, size=size) for (c, s), (x, y, size) in zip(pairs, boxes))
    return Scene(objs, background, mention)


def scene_rng(seed: int, index: int, split: str = "train") -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), SPLITS.index(split)])


def sample_scenes(n: int, seed: int = 0, split: str = "train", start: int = 0, **kw) -> list[Scene]:
    """Scenes start..start+n-1 of the (seed, split) stream; each is independent of the others."""
    return [sample_scene(scene_rng(seed, i, split), split, **kw) for i in range(start, start + n)]


def prompts_of(split: str, n: int, seed: int = 0) -> list[str]:
    """n distinct captions of a split's scene stream, in a fixed order for a seed (prompt sets)."""
    out: list[str] = []
    seen: set[str] = set()
    i = 0
    while len(out) < n:
        c = caption(sample_scene(scene_rng(seed, i, split), split))
        if c not in seen:
            seen.add(c)
            out.append(c)
        i += 1
    return out


PROMPT_SET_SIZE = 64  # prompt sets toy-train and toy-heldout: the first 64 captions of their split's stream (seed 0)


def heldout_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct held-out captions, in a fixed order for a seed."""
    return prompts_of("heldout", n, seed)


def train_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct training captions, in a fixed order for a seed."""
    return prompts_of("train", n, seed)


# ----------------------------------------------------------------------------------------------- renderer

def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":  # apex up, base at the bottom of the box, as wide as the box
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = 64, antialias: bool = True, supersample: int = 4) -> np.ndarray:
    """The scene as a uint8 [size, size, 3] array. With antialias, each pixel is the mean of a
    supersample x supersample grid of point samples (edge pixels blend object and background)."""
    ss = supersample if antialias else 1
    n = size * ss
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
    img = np.broadcast_to(bg, (size, size, 3)).copy()
    for o in scene.objects:
        x0, y0, x1, y1 = o.box()
        # the pixel window holding the box (plus one pixel), in sample coordinates
        px0, py0 = max(int(np.floor(x0 * size)) - 1, 0), max(int(np.floor(y0 * size)) - 1, 0)
        px1, py1 = min(int(np.ceil(x1 * size)) + 1, size), min(int(np.ceil(y1 * size)) + 1, size)
        xs = (np.arange(px0 * ss, px1 * ss) + 0.5) / n
        ys = (np.arange(py0 * ss, py1 * ss) + 0.5) / n
        inside = _inside(o.shape, xs[None, :] - o.x, ys[:, None] - o.y, o.size / 2)
        cover = inside.reshape(py1 - py0, ss, px1 - px0, ss).mean(axis=(1, 3))[..., None]
        col = np.array(COLOURS[o.colour], dtype=np.float64)
        win = img[py0:py1, px0:px1]
        img[py0:py1, px0:px1] = win * (1 - cover) + col * cover
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_batch(scenes: Sequence[Scene], size: int = 64, antialias: bool = True):
    """Scenes as the trainer's image format: a float32 torch tensor [B, 3, size, size] in [0, 1]."""
    import torch

    arr = np.stack([render(s, size, antialias) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)

"""Exact evaluators of the toy world: read the pixels back into objects, compare with the caption; JPEG size.

Not differentiable and not trained: they use only what the renderer knows (the palette and the four shapes),
so they are the ground truth that a learned reward (toy_clip, toy_count) only approximates.

Reading an image (:func:`detect`):

1. the background: the most common nearest-palette colour (6 object colours + 3 backgrounds, Euclidean in
   RGB) on the one-pixel frame (objects never touch the frame), its RGB the median of those frame pixels;
2. matting: each pixel is explained as ``bg + alpha (c - bg)`` for each object colour c, as the renderer's
   anti-aliasing makes it (objects never touch, so a pixel mixes the background and at most one object).
   The pixel belongs to the colour whose blend line passes nearest, among those reached at least half-way
   (alpha >= 1/2, the 50% coverage contour), when it lies within RESIDUAL_MAX of it; the clamped alpha is
   that colour's coverage. (Plain nearest-colour labels fail: a half-covered orange pixel on white is
   nearer yellow than orange.)
3. the 8-connected components of same-colour pixels; a component is an object when it is solid (one pixel
   whose 3x3 neighbourhood is all its colour) and not dust (at least 40% of the smallest object the sampler
   draws, a 0.16-wide triangle);
4. its shape: each of the four shapes is fitted to the component's coverage map (same area, same centroid),
   drawn as the renderer draws it (anti-aliased or at pixel centres, whichever fits better), and the
   highest soft IoU wins (:func:`shape_ious`). On 1,500 rendered scenes the right shape scores >= 0.99
   (anti-aliased) / >= 0.94 (aliased), the best wrong one <= 0.90.

Comparing with a caption (:func:`fidelity`): count (number of objects), colours (multiset), shapes (multiset),
objects (multiset of colour-shape pairs), background (only when the caption names one), and ``all_ok``:
objects and background both right (objects right implies count, colours and shapes right).

Images: a float tensor or array [B, 3, H, W] (or [3, H, W]) in [0, 1] (the trainer's format), a uint8 array
[B, H, W, 3] (or [H, W, 3]), a PIL image, or a list of these. Specified at 64 px and above.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from lowmem_alignprop.settings.model_kind import shipped_name

from .scenes import BACKGROUNDS, COLOURS, MIN_SIZE, SHAPES, Content, _inside, make_content, parse_caption

JPEG_QUALITY = 95  # the quality jpeg_compressibility's estimate models; baseline, standard tables, 4:2:0

_NAMES = list(COLOURS) + list(BACKGROUNDS)
_N_OBJ = len(COLOURS)
_PALETTE = torch.tensor([COLOURS[c] for c in COLOURS] + [BACKGROUNDS[b] for b in BACKGROUNDS],
                        dtype=torch.float32)  # [9, 3], 0-255

MIN_AREA_FRACTION = 0.4
RESIDUAL_MAX = 40.0  # 0-255 RGB units: about half the distance between the two closest palette colours (83)


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    area: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (pixels, exclusive end)
    iou: float         # soft IoU with the chosen shape fitted to the object
    runner_up: float   # the best soft IoU among the other shapes (iou - runner_up: how sure the reading is)


@dataclass(frozen=True)
class Detection:
    objects: tuple[DetectedObject, ...]
    background: str  # the frame's colour name (an object colour when the frame is not a background colour)

    @property
    def content(self) -> Content:
        return Content(make_content((o.colour, o.shape) for o in self.objects).objects, self.background)


@dataclass(frozen=True)
class Fidelity:
    count_ok: bool
    colours_ok: bool
    shapes_ok: bool
    objects_ok: bool
    background_ok: bool
    expected: Content = field(compare=False)
    detected: Content = field(compare=False)

    @property
    def all_ok(self) -> bool:
        return self.objects_ok and self.background_ok

    @property
    def score(self) -> float:
        """Mean of the five checks, in [0, 1]."""
        return (self.count_ok + self.colours_ok + self.shapes_ok + self.objects_ok + self.background_ok) / 5


# ------------------------------------------------------------------------------------------ image input

def as_float_batch(images) -> torch.Tensor:
    """Any supported image input -> float32 tensor [B, 3, H, W] in 0-255. Arrays and PIL images of uint8 are
    channels-last (as PIL and numpy image code have them); tensors and float arrays are channels-first (as the
    trainer and torchvision have them), a uint8 tensor in 0-255, anything else in [0, 1]."""
    if isinstance(images, (list, tuple)):
        return torch.cat([as_float_batch(im) for im in images])
    if not torch.is_tensor(images):
        if hasattr(images, "convert"):  # PIL
            images = np.asarray(images.convert("RGB"))
        images = np.asarray(images)
        if images.dtype == np.uint8:
            t = torch.from_numpy(images.copy()).float()
            if t.dim() == 3:
                t = t[None]
            if t.dim() != 4 or t.shape[-1] != 3:
                raise ValueError(f"uint8 images must be [H, W, 3] or [B, H, W, 3], got {tuple(images.shape)}")
            return t.permute(0, 3, 1, 2).contiguous()
        images = torch.from_numpy(np.ascontiguousarray(images))
    t = images.detach().to("cpu", torch.float32)
    if images.dtype == torch.uint8:
        t = t / 255.0
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4 or t.shape[1] != 3:
        raise ValueError(f"float images must be [B, 3, H, W] or [3, H, W] in [0, 1], got {tuple(images.shape)}")
    if t.numel() and t.amax() > 2.0:  # 0-255 values as floats would be clamped to a blank white image
        raise ValueError(f"float images must be in [0, 1], these reach {t.amax().item():g}: divide 0-255 values by "
                         "255, or pass uint8")
    return t.clamp(0, 1) * 255.0  # a decoder's slight overshoot


def to_uint8(images) -> np.ndarray:
    """Any supported image input -> uint8 array [B, H, W, 3] (rounded to nearest)."""
    t = as_float_batch(images)
    return t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------ segmentation

def _labels(img: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] 0-255 -> [B, H, W] index of the nearest palette colour (Euclidean in RGB)."""
    x = img.permute(0, 2, 3, 1).double()
    d = (_PALETTE.double() ** 2).sum(1) - 2 * x @ _PALETTE.double().T  # |x - p|^2 - |x|^2
    return d.argmin(-1)


def _object_colours(img: torch.Tensor, bg_rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel as a blend ``bg + alpha (c - bg)`` of the background and one object colour c (what the
    renderer's anti-aliasing makes, objects never touching): the colour whose blend line passes nearest the
    pixel, among those reached at least half-way (alpha >= 1/2: the 50%-coverage contour), when the pixel is
    within RESIDUAL_MAX of that line; else -1 (background or no palette colour). Returns that index
    [B, H, W] (int64) and each colour's coverage [B, H, W, 6]: alpha clamped to [0, 1] where the pixel is
    within RESIDUAL_MAX of the colour's blend line, else 0."""
    x = img.permute(0, 2, 3, 1).double() - bg_rgb.double()[:, None, None, :]  # [B, H, W, 3]
    d = _PALETTE[:_N_OBJ].double()[None] - bg_rgb.double()[:, None, :]  # [B, 6, 3]
    dd = (d * d).sum(-1)  # [B, 6]
    usable = dd > RESIDUAL_MAX ** 2  # a colour too close to the background cannot be told apart from it
    alpha = torch.einsum("bhwk,bck->bhwc", x, d) / dd.clamp_min(1e-9)[:, None, None, :]
    resid = (x * x).sum(-1, keepdim=True) - alpha.clamp(0, 1) * (2 * torch.einsum(
        "bhwk,bck->bhwc", x, d) - alpha.clamp(0, 1) * dd[:, None, None, :])  # |x - a d|^2, a clamped
    near_line = (resid <= RESIDUAL_MAX ** 2) & usable[:, None, None, :]
    cover = torch.where(near_line, alpha.clamp(0, 1), torch.zeros_like(alpha)).float()
    resid = torch.where(near_line & (alpha >= 0.5), resid, torch.full_like(resid, float("inf")))
    best, idx = resid.min(-1)
    return torch.where(torch.isfinite(best), idx, torch.full_like(idx, -1)), cover


def _components(colour: np.ndarray) -> np.ndarray:
    """8-connected components of same-colour pixels: colour [B, H, W] int (-1: not an object pixel) ->
    labels [B, H, W] (0 outside objects, one label per component: the 1-based index, in the flattened batch,
    of one of its pixels). Max-propagation between same-colour neighbours, each round followed by pointer
    jumping (a pixel takes the label of the pixel its label names), until nothing changes."""
    b, h, w = colour.shape
    fg = colour >= 0
    lab = (np.arange(1, b * h * w + 1, dtype=np.int64).reshape(b, h, w)) * fg
    links = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == dx == 0:
                continue
            dst = (slice(None), slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0)))
            src = (slice(None), slice(max(-dy, 0), h + min(-dy, 0)), slice(max(-dx, 0), w + min(-dx, 0)))
            links.append((dst, src, fg[dst] & (colour[dst] == colour[src])))
    flat_lab = lab.reshape(-1)
    while True:
        before = lab.copy()
        for dst, src, same in links:
            np.maximum(lab[dst], np.where(same, lab[src], 0), out=lab[dst])
        # pointer jumping: labels only grow and always name a pixel of the same component
        nz = flat_lab > 0
        flat_lab[nz] = np.maximum(flat_lab[nz], flat_lab[flat_lab[nz] - 1])
        if np.array_equal(lab, before):
            return lab


def _solid(colour: np.ndarray) -> np.ndarray:
    """Object pixels whose whole 3x3 neighbourhood (inside the image) has their colour."""
    b, h, w = colour.shape
    pad = np.pad(colour, ((0, 0), (1, 1), (1, 1)), constant_values=-2)
    ok = colour >= 0
    for dy in range(3):
        for dx in range(3):
            nb = pad[:, dy:dy + h, dx:dx + w]
            ok &= (nb == colour) | (nb == -2)
    return ok


_AREA_TO_R = {"circle": lambda a: (a / np.pi) ** 0.5, "square": lambda a: a ** 0.5 / 2,
              "triangle": lambda a: (a / 2) ** 0.5, "diamond": lambda a: (a / 2) ** 0.5}


def shape_ious(alpha: np.ndarray) -> dict[str, float]:
    """Soft IoU (sum of minima / sum of maxima) of an object's coverage map (``alpha``, [h, w] in [0, 1],
    zero outside the object's neighbourhood) with each shape of the renderer fitted to it: the shape with the
    map's area, its centroid on the map's centroid (a triangle's centroid is a third of the way up from its
    base), drawn as the renderer draws it, anti-aliased (4x4 supersampling) or not (pixel centres), whichever
    fits better."""
    h, w = alpha.shape
    area = float(alpha.sum())
    gy, gx = np.mgrid[0:h, 0:w] + 0.5
    cy, cx = float((alpha * gy).sum() / area), float((alpha * gx).sum() / area)
    out = {}
    for shape, to_r in _AREA_TO_R.items():
        r = to_r(area)
        oy = cy - r / 3 if shape == "triangle" else cy
        best = 0.0
        for ss in (1, 4):
            sx = (np.arange(w * ss) + 0.5) / ss
            sy = (np.arange(h * ss) + 0.5) / ss
            cover = _inside(shape, sx[None, :] - cx, sy[:, None] - oy, r).reshape(h, ss, w, ss).mean(axis=(1, 3))
            best = max(best, float(np.minimum(alpha, cover).sum() / np.maximum(alpha, cover).sum()))
        out[shape] = best
    return out


def _object(colour: int, inside: np.ndarray, alpha: np.ndarray) -> DetectedObject:
    """One component (bool mask [H, W]) of object colour index ``colour``; alpha: that colour's coverage [H, W]."""
    ys, xs = np.nonzero(inside)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    h, w = inside.shape
    # the coverage map on the component and the pixels touching it (its anti-aliased rim), with room for
    # a fitted template as large as the component's bounding box allows (a triangle's is 4/3 of it)
    pad = max(y1 - y0, x1 - x0) // 2 + 2
    wy0, wy1, wx0, wx1 = y0 - pad, y1 + pad, x0 - pad, x1 + pad
    near = np.zeros((wy1 - wy0, wx1 - wx0), dtype=bool)
    cy0, cy1, cx0, cx1 = max(wy0, 0), min(wy1, h), max(wx0, 0), min(wx1, w)
    near[cy0 - wy0:cy1 - wy0, cx0 - wx0:cx1 - wx0] = inside[cy0:cy1, cx0:cx1]
    grown = near.copy()
    grown[1:] |= near[:-1]
    grown[:-1] |= near[1:]
    g2 = grown.copy()
    g2[:, 1:] |= grown[:, :-1]
    g2[:, :-1] |= grown[:, 1:]
    a = np.zeros_like(near, dtype=np.float64)
    a[cy0 - wy0:cy1 - wy0, cx0 - wx0:cx1 - wx0] = alpha[cy0:cy1, cx0:cx1]
    ious = shape_ious(np.where(g2, a, 0.0))
    shape = max(SHAPES, key=lambda s: ious[s])
    return DetectedObject(_NAMES[colour], shape, len(ys), (x0, y0, x1, y1), ious[shape],
                          max(v for s, v in ious.items() if s != shape))


def detect(images) -> list[Detection]:
    """Read each image back into objects (see the module doc)."""
    img = as_float_batch(images)
    b, _, h, w = img.shape
    lab = _labels(img)  # [B, H, W]
    frame = torch.cat([lab[:, 0], lab[:, -1], lab[:, 1:-1, 0], lab[:, 1:-1, -1]], dim=1)
    bg = torch.mode(frame, dim=1).values  # ties: the smallest label
    fpix = torch.cat([img[:, :, 0], img[:, :, -1], img[:, :, 1:-1, 0], img[:, :, 1:-1, -1]], dim=2)  # [B, 3, F]
    bg_rgb = torch.stack([fpix[i][:, frame[i] == bg[i]].median(dim=1).values for i in range(b)])  # [B, 3]
    colour, alpha = _object_colours(img, bg_rgb)
    colour, alpha = colour.numpy(), alpha.numpy()
    solid = _solid(colour)
    comps = _components(colour)
    min_area = MIN_AREA_FRACTION * 0.5 * (MIN_SIZE * min(h, w)) ** 2
    out = []
    for i in range(b):
        objs = []
        ci = comps[i]
        for k in np.unique(ci[ci > 0]):
            inside = ci == k
            if not solid[i][inside].any():
                continue
            if inside.sum() < min_area:
                continue
            c = int(colour[i][inside][0])
            objs.append(_object(c, inside, alpha[i, ..., c]))
        objs.sort(key=lambda o: (o.box[1], o.box[0]))
        out.append(Detection(tuple(objs), _NAMES[int(bg[i])]))
    return out


# ------------------------------------------------------------------------------------------ fidelity

def compare(expected: Content, detected: Content) -> Fidelity:
    ec, dc = Counter(expected.objects), Counter(detected.objects)
    return Fidelity(
        count_ok=expected.count == detected.count,
        colours_ok=Counter(c for c, _ in expected.objects) == Counter(c for c, _ in detected.objects),
        shapes_ok=Counter(s for _, s in expected.objects) == Counter(s for _, s in detected.objects),
        objects_ok=ec == dc,
        background_ok=expected.background is None or expected.background == detected.background,
        expected=expected, detected=detected,
    )


def fidelity(images, captions: Sequence[str] | str) -> list[Fidelity]:
    """Per image: does it show what its caption says? Captions must follow the toy grammar."""
    dets = detect(images)
    if isinstance(captions, str):
        captions = [captions] * len(dets)
    if len(captions) != len(dets):
        raise ValueError(f"{len(dets)} images but {len(captions)} captions")
    return [compare(parse_caption(cap), d.content) for cap, d in zip(captions, dets)]


def summarize(results: Sequence[Fidelity]) -> dict[str, float]:
    """Rates over a batch: each check's share of images passing, plus the mean score."""
    n = max(len(results), 1)
    keys = ("count_ok", "colours_ok", "shapes_ok", "objects_ok", "background_ok", "all_ok")
    out = {k: sum(bool(getattr(r, k)) for r in results) / n for k in keys}
    out["score"] = sum(r.score for r in results) / n
    out["objects"] = sum(r.detected.count for r in results) / n  # mean detected objects (count control)
    return out


# ------------------------------------------------------------------------------------------ JPEG size

def jpeg_sizes(images, quality: int = JPEG_QUALITY) -> list[int]:
    """The real JPEG file size in bytes of each image: PIL (libjpeg), baseline, standard Huffman tables,
    4:2:0 chroma subsampling, the given quality, no metadata."""
    from PIL import Image

    sizes = []
    for arr in to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False)
        sizes.append(buf.tell())
    return sizes


# ------------------------------------------------------------------------------------------ for the trainer

def parses(prompt: str) -> bool:
    try:
        parse_caption(prompt)
        return True
    except ValueError:
        return False


def applies(model: str, prompts: Sequence[str]) -> bool:
    """Whether a run is in the toy world, so that the exact evaluators mean something: the model is the shipped toy
    model, or every prompt parses in the toy grammar (a toy model of your own, trained by the script)."""
    return shipped_name(model) == "toy" or bool(prompts) and all(parses(p) for p in prompts)


def unjudged_note(cfg, prompts: Sequence[str]) -> str | None:
    """fidelity_every, or a fidelity_images other than its default, set for a run outside the toy world (it judged
    nothing, unsaid); None when neither is."""
    given = [f"fidelity_every={cfg.fidelity_every}"] if cfg.fidelity_every else []
    if cfg.fidelity_images not in (0, type(cfg).fidelity_images):  # (the field's default, 32: every run's)
        given.append(f"fidelity_images={cfg.fidelity_images}")
    if not given or applies(cfg.model, prompts):
        return None
    return (f"{' and '.join(given)} {'judges' if len(given) == 1 else 'judge'} images with the toy world's exact "
            f"evaluators, and this run is not in it (--model {cfg.model}, prompts outside its grammar): nothing is "
            "judged")


def off_grammar_note(model: str, prompts: Sequence[str], what: str = "prompts") -> str | None:
    """The shipped toy model given prompts its grammar does not read (a photo of a cat): said at the start, as its
    images for them are noise and the exact evaluators judge none of them; None when every prompt parses. ``what``:
    which prompts (the held-out ones are said apart)."""
    if shipped_name(model) != "toy":
        return None
    stray = list(dict.fromkeys(p for p in prompts if not parses(p)))
    if not stray:
        return None
    distinct = len(set(prompts))
    return (f"{len(stray)} of the {distinct} {what} are outside the toy world's grammar (e.g. {stray[0]!r}): the toy "
            "model knows only its captions of coloured shapes ('a red circle and two blue squares', docs/toy_world.md), "
            "so its images for them mean nothing and the exact evaluators judge none of them; use a toy-* prompt set "
            "or such captions")


def judged_prompts(model: str, prompts: list[str], images: int) -> list[str]:
    """What a run's exact evaluators judge: ``images`` images (fidelity_images) of the run's prompts, in order and
    round again if there are fewer (each image its own noise); none outside the toy world."""
    if not (images and applies(model, prompts)):
        return []
    return (prompts * -(-images // len(prompts)))[:images]


def evaluate_batch(images, prompts: Sequence[str], quality: int = JPEG_QUALITY) -> dict[str, float]:
    """What the trainer reports for a batch of its images: ``jpeg_bytes`` (mean real JPEG size) for every
    image and, over the images whose prompt the toy grammar parses, the rate of each fidelity check
    (``fidelity_all_ok``, ``fidelity_count_ok``, ...) and ``fidelity_images`` (how many were judged)."""
    images = as_float_batch(images) / 255.0
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    if not len(prompts):
        raise ValueError("no images to evaluate")
    out: dict[str, float] = {"jpeg_bytes": float(np.mean(jpeg_sizes(images, quality)))}
    keep = [i for i, p in enumerate(prompts) if parses(p)]
    out["fidelity_images"] = float(len(keep))
    if keep:
        rates = summarize(fidelity(images[keep], [prompts[i] for i in keep]))
        out.update({f"fidelity_{k}": v for k, v in rates.items()})
    return out

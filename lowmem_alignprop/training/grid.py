"""What a run writes besides the LoRA: metrics lines and the labelled before/after sample grid."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from lowmem_alignprop.run import atomic
from lowmem_alignprop.run.runfolder import metrics_line


def write_metrics_line(path: Path, row: dict) -> None:
    """One line appended to metrics.jsonl (an append-only log, each line in one write; a write that fails, a full
    disk, is cut back off, so the file never ends in half a line); strict JSON (runfolder.metrics_line)."""
    line = memoryview(metrics_line(row).encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            while line:
                line = line[os.write(fd, line):]
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            e.lowmem_file = path
            raise
    finally:
        os.close(fd)


def _drawing_fonts() -> list[tuple[str, frozenset[int]]]:
    """(file, code points) of the installed fonts that draw real glyphs, matplotlib's DejaVu Sans first. A
    "last resort" font maps every code point to a placeholder box: choosing it for one rare character drew the
    whole grid, numbers included, as boxes."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    default = font_manager.findfont("DejaVu Sans")
    others = sorted({f.fname for f in font_manager.fontManager.ttflist if "last resort" not in f.name.lower()})
    out = []
    for path in [default] + [p for p in others if p != default]:
        try:
            out.append((path, frozenset(FT2Font(path).get_charmap())))
        except (OSError, RuntimeError, ValueError):  # a font file FreeType cannot read
            continue
    return out


MISSING_SAID: set[str] = set()  # the characters no font has, said already in this process


class GlyphText:
    """Draws text one glyph run at a time, each character in the first font that has it (DejaVu Sans first), so a
    prompt in any script is text, not boxes, and labels and numbers stay in DejaVu Sans whatever the prompts hold.
    Control characters (a NUL in a prompt file) are drawn as U+FFFD. Characters no font has are drawn by DejaVu
    Sans (as boxes) and named once, by :meth:`warn_missing`."""

    def __init__(self, size: int = 11):
        from PIL import ImageFont

        self._fonts = _drawing_fonts()
        self._loaded = {path: ImageFont.truetype(path, size) for path, _ in self._fonts[:1]}
        self._size = size
        self.missing: set[str] = set()

    def _font_for(self, ch: str):
        from PIL import ImageFont

        for path, charmap in self._fonts:
            if ord(ch) in charmap:
                if path not in self._loaded:
                    self._loaded[path] = ImageFont.truetype(path, self._size)
                return self._loaded[path]
        if not ch.isspace():
            self.missing.add(ch)
        return self._loaded[self._fonts[0][0]]

    def runs(self, text: str) -> list[tuple[object, str]]:
        """``text`` as (font, substring) runs."""
        import unicodedata

        out: list[tuple[object, str]] = []
        for ch in text:
            if unicodedata.category(ch) in ("Cc", "Cs"):
                ch = "\ufffd"
            font = self._font_for(ch)
            if out and out[-1][0] is font:
                out[-1] = (font, out[-1][1] + ch)
            else:
                out.append((font, ch))
        return out

    def width(self, draw, text: str) -> float:
        return sum(draw.textlength(part, font=font) for font, part in self.runs(text))

    def fit(self, draw, text: str, width: int) -> str:
        """``text`` cut (with '...') to ``width`` pixels: the longest prefix that fits, by bisection."""
        cut = text[:max(width, 1)]  # more characters than pixels never fit (a prompt line of a million characters)
        if cut == text and self.width(draw, text) <= width:
            return text
        lo, hi = 0, len(cut)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.width(draw, cut[:mid] + "...") <= width:
                lo = mid
            else:
                hi = mid - 1
        return cut[:lo] + "..."

    def draw(self, draw, xy: tuple[int, int], text: str, width: int, fill="black") -> None:
        x, y = xy
        for font, part in self.runs(self.fit(draw, text, width)):
            draw.text((x, y), part, fill=fill, font=font)
            x += draw.textlength(part, font=font)

    def warn_missing(self) -> None:
        if new := self.missing - MISSING_SAID:  # once a process (a run's every --sample-every grid repeated it)
            MISSING_SAID.update(new)
            logging.getLogger("lowmem_alignprop").warning(
                "no installed font has the characters %r of the prompts: the PNG grid shows boxes for them (install "
                "a font that has them, e.g. fonts-noto-cjk; the JSON beside the grid holds the prompts as text)",
                "".join(sorted(new))[:12])


GRID_COLUMNS = 8  # images side by side; more prompts wrap into further bands below (40 made one 7,744 px wide row)


def save_sample_grid(path: Path, prompts: list[str], before: tuple[torch.Tensor, torch.Tensor],
                     after: tuple[torch.Tensor, torch.Tensor] | None, cell: int = 192,
                     row_names: tuple[str, ...] = ("before", "after"), group: int = 1) -> Path:
    """A PNG grid: one column per prompt, two rows (``row_names``; ``after`` None: one row, ``before``'s), each image
    labelled with its reward; past ``GRID_COLUMNS`` prompts the columns go on in another band of the rows below.
    ``group``: columns that belong together (``sample --images-per-prompt``: one prompt's images), never split
    between two bands. Each image is shown ``cell`` px on its longer side, in its own width x height (a 1216x832
    image as 192x131)."""
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    label_h, left = 28, 64
    n = len(prompts)
    per_band = max(group, GRID_COLUMNS // group * group)  # whole groups in a band
    rows = [before] if after is None else [before, after]
    height, width = before[0].shape[-2:]
    tile_w, tile_h = (round(cell * width / max(height, width)), round(cell * height / max(height, width)))
    columns, band = min(n, per_band), 20 + len(rows) * (tile_h + label_h)
    grid = Image.new("RGB", (left + columns * tile_w, band * -(-n // per_band)), "white")
    draw = ImageDraw.Draw(grid)
    text = GlyphText()
    for j, p in enumerate(prompts):
        x, top = left + (j % per_band) * tile_w, (j // per_band) * band
        text.draw(draw, (x + 4, top + 4), p, tile_w - 8)
        for i, (imgs, rewards) in enumerate(rows):
            y = top + 20 + i * (tile_h + label_h)
            arr = (imgs[j].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            grid.paste(Image.fromarray(arr).resize((tile_w, tile_h), Image.NEAREST), (x, y))
            text.draw(draw, (x + 4, y + tile_h + 6), f"reward {rewards[j].item():.4f}", tile_w - 8)
    for top in range(0, grid.height, band):  # each band's row names
        for i, name in enumerate(row_names[:len(rows)]):
            text.draw(draw, (4, top + 20 + i * (tile_h + label_h) + tile_h // 2), name, left - 6)
    text.warn_missing()  # once per grid
    with atomic.replacing(path) as tmp:  # a full disk or a kill leaves no half-written PNG
        grid.save(tmp)
    return path

"""What a run writes besides the LoRA: metrics lines and the labelled before/after sample grid."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch


def write_metrics_line(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def label_font(texts: list[str], size: int = 11):
    """A TrueType font with a glyph for every character of ``texts`` (matplotlib's DejaVu Sans: Latin, Greek,
    Cyrillic...; else the first system font that has them all, e.g. a CJK one), so prompts in any script are
    drawn as text, not boxes. With none, DejaVu Sans and a warning naming what is missing."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font
    from PIL import ImageFont

    needed = {ord(c) for t in texts for c in t if not c.isspace()}
    default = font_manager.findfont("DejaVu Sans")
    for candidate in [default] + sorted({f.fname for f in font_manager.fontManager.ttflist} - {default}):
        try:
            if needed <= set(FT2Font(candidate).get_charmap()):
                return ImageFont.truetype(candidate, size)
        except (OSError, RuntimeError, ValueError):  # a font file FreeType cannot read
            continue
    missing = "".join(sorted({chr(c) for c in needed} - set(map(chr, FT2Font(default).get_charmap()))))[:12]
    logging.getLogger("lowmem_alignprop").warning(
        "no installed font has the characters %r of the prompts: the PNG grid shows boxes for them (install a "
        "font that has them, e.g. fonts-noto-cjk; the JSON beside the grid holds the prompts as text)", missing)
    return ImageFont.truetype(default, size)


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` cut (with '...') to ``width`` pixels in ``font``."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def save_sample_grid(path: Path, prompts: list[str], before: tuple[torch.Tensor, torch.Tensor],
                     after: tuple[torch.Tensor, torch.Tensor], cell: int = 192,
                     row_names: tuple[str, str] = ("before", "after")) -> Path:
    """A PNG grid: one column per prompt, two rows (``row_names``), each image labelled with its reward."""
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    label_h, left = 28, 64
    n = len(prompts)
    grid = Image.new("RGB", (left + n * cell, 20 + 2 * (cell + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    font = label_font(list(prompts) + list(row_names))
    for j, p in enumerate(prompts):
        draw.text((left + j * cell + 4, 4), _fit(draw, p, font, cell - 8), fill="black", font=font)
    for i, (name, (imgs, rewards)) in enumerate(zip(row_names, (before, after))):
        y = 20 + i * (cell + label_h)
        draw.text((4, y + cell // 2), _fit(draw, name, font, left - 6), fill="black", font=font)
        for j in range(n):
            arr = (imgs[j].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            im = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
            grid.paste(im, (left + j * cell, y))
            draw.text((left + j * cell + 4, y + cell + 6), f"reward {rewards[j].item():.4f}", fill="black",
                      font=font)
    grid.save(path)
    return path

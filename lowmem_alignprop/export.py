"""What a run writes besides the LoRA: metrics lines and the labelled before/after sample grid."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_metrics_line(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


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
    for j, p in enumerate(prompts):
        draw.text((left + j * cell + 4, 4), p if len(p) <= 28 else p[:25] + "...", fill="black")
    for i, (name, (imgs, rewards)) in enumerate(zip(row_names, (before, after))):
        y = 20 + i * (cell + label_h)
        draw.text((4, y + cell // 2), name, fill="black")
        for j in range(n):
            arr = (imgs[j].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            im = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
            grid.paste(im, (left + j * cell, y))
            draw.text((left + j * cell + 4, y + cell + 6), f"reward {rewards[j].item():.4f}", fill="black")
    grid.save(path)
    return path

"""Images to the run's trackers (accelerate's tensorboard or wandb): the sample grids, beside the metrics."""

from __future__ import annotations

from pathlib import Path


def log_images(accelerator, report_to: str, grid_path: Path, tag: str, step: int) -> None:
    """Send a sample grid to the configured tracker (``report_to``: tensorboard or wandb) as image ``tag`` at
    ``step``."""
    if report_to == "none":
        return
    import numpy as np
    from PIL import Image

    arr = np.asarray(Image.open(grid_path).convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, arr, step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb
            tracker.log({tag: wandb.Image(arr)}, step=step)

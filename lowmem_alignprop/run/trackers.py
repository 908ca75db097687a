"""Images to the run's trackers (accelerate's tensorboard or wandb): the sample grids, beside the metrics."""

from __future__ import annotations

from pathlib import Path

from lowmem_alignprop.settings.image_size import sizes_of

# metrics.jsonl's keys to tracker groups (TensorBoard and wandb group a tag's charts by the part before its first /):
# a tag is GROUP/KEY with KEY the metrics.jsonl key as written; the first prefix that matches decides, else train/
TAG_GROUPS = (("eval_", "eval"), ("sample_", "samples"), ("fidelity_", "fidelity"), ("jpeg_bytes", "fidelity"),
              ("peak_memory_gb", "memory"), ("seconds", "time"))
TENSORBOARD_RUN = "lowmem_alignprop"  # accelerate's project name: the tensorboard folder logs/lowmem_alignprop/


def tag_of(key: str) -> str:
    """The tracker's name for metrics.jsonl key ``key``: ``eval/eval_reward``, ``train/loss``, ``memory/peak_memory_gb``
    (docs/outputs.md, ``logs/``)."""
    group = next((g for prefix, g in TAG_GROUPS if key.startswith(prefix)), "train")
    return f"{group}/{key}"


def tracker_figures(row: dict) -> dict:
    """A metrics.jsonl line's figures under their tracker names (the step is the x axis, not a curve; a list, a
    string and a null are not plotted); each term of a combined reward a curve of its own, ``reward_terms/NAME``."""
    figures = {tag_of(k): v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
    figures.update({f"reward_terms/{name}": v for name, v in (row.get("reward_terms") or {}).items()
                    if isinstance(v, (int, float))})
    return figures


HPARAMS_FILE = "hparams.yml"  # the settings TensorBoard's HPARAMS tab shows, beside the run's event files


def hparams_recorded(logs: Path) -> bool:
    """Whether the run's TensorBoard folder holds its settings already (:func:`record_hparams`; a run from before it:
    accelerate's folder of their own, ``<time>/hparams.yml``): a resume records none again."""
    return (logs / TENSORBOARD_RUN / HPARAMS_FILE).exists() or any((logs / TENSORBOARD_RUN).glob(f"*/{HPARAMS_FILE}"))


def clear_earlier_start(logs: Path) -> list[str]:
    """A new run's TensorBoard folder cleared of an earlier start's files (event files, hparams.yml, accelerate's
    ``<time>/`` settings folders): a start that trained no step, as the folder holds no run (checkpoint.holds_a_run).
    Kept, they gave its settings on the HPARAMS tab (TensorBoard shows a tag's first session) and in hparams.yml,
    which stopped this run's being recorded. Returns the names removed."""
    import shutil

    run = logs / TENSORBOARD_RUN
    earlier = [*run.glob("events.out.tfevents.*"), *run.glob(HPARAMS_FILE), *(p.parent for p in run.glob(
        f"*/{HPARAMS_FILE}"))]
    for path in earlier:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return sorted(p.name for p in earlier)


def hparam_columns(values: dict) -> dict:
    """The settings ``values`` as the HPARAMS tab's columns: ``resolution`` (N, a number, for a square run; "WxH",
    text, for another) as ``width`` and ``height``, numbers for every run. TensorBoard makes a column whose runs give
    a number and a text a text column ("512.0" beside "1216x832": unsortable by size, no range filter)."""
    if "resolution" not in values:
        return dict(values)
    width, height = sizes_of(values["resolution"])[0]  # (several sizes: the first, the sample images')
    columns = {}
    for key, value in values.items():
        columns.update({"width": width, "height": height} if key == "resolution" else {key: value})
    return columns


def record_hparams(accelerator, values: dict, logs: Path) -> None:
    """The run's settings ``values`` (plain values) to TensorBoard's HPARAMS tab, on the main process: a session in
    the run whose scalars are the curves, with no experiment summary, so TensorBoard makes each scalar tag a metric
    column (accelerate's add_hparams put them in a run of their own under an experiment of no metrics: the tab
    compared runs by settings with no figure beside them), and ``hparams.yml`` beside the event files; the image size
    as ``width`` and ``height`` (:func:`hparam_columns`)."""
    import yaml
    from torch.utils.tensorboard.summary import hparams

    from lowmem_alignprop.run import atomic

    values = hparam_columns(values)
    _, session_start, _ = hparams(values, {})  # (the experiment and the session's end left out: see above)
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    writer.file_writer.add_summary(session_start)
    writer.flush()
    atomic.write_text(logs / TENSORBOARD_RUN / HPARAMS_FILE, yaml.safe_dump(values, sort_keys=False))


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

"""When a run's periodic work falls: every N optimizer steps and at the run's last step (the held-out evaluation,
checkpoints). One rule for the trainer, the time left it tells and the disk space it checks."""

from __future__ import annotations


def due(every: int, steps: int, step: int) -> bool:
    """Step ``step`` of a ``steps``-step run does the work done every ``every`` steps (0: never), and the last step
    does it too."""
    return bool(every) and (step % every == 0 or step == steps)


def due_after(every: int, steps: int, step: int) -> int:
    """How many of the steps after ``step`` (up to ``steps``) are :func:`due`."""
    if not every or step >= steps:
        return 0
    return steps // every - step // every + (1 if steps % every else 0)

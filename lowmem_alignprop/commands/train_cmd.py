"""``lowmem-alignprop train``'s command, once the command line (:func:`lowmem_alignprop.cli.cmd_train`) has parsed it,
built the config (a resume's with its run's own settings) and found the run folder: the checks of this machine and
launcher, the run folder made ready, then :func:`lowmem_alignprop.training.train.train`."""

from __future__ import annotations

import logging
import os

import torch

from lowmem_alignprop.run.runfolder import RunFolder
from lowmem_alignprop.run.runlock import global_rank, world_size
from lowmem_alignprop.settings.config import Config, host_memory_note, unread_in_training
from lowmem_alignprop.settings.errors import UserError, same_on_every_rank
from lowmem_alignprop.settings.profiles import GPU_PROFILES

logger = logging.getLogger("lowmem_alignprop")


def train_main(cfg: Config, profile_name: str, folder: RunFolder, *, memory_snapshot: tuple[int, int] | None,
               set_flags: list[str], lone_resume: str | None, command: str, began: float | None = None) -> int:
    """Train ``cfg`` in ``folder``. ``set_flags``: the command line's --set values (a training setting they name that
    training does not read is said); ``lone_resume``: a ``--resume DIR`` that is in no run's checkpoints/ folder
    (said, with where the run goes on); ``command``: the command as typed, which the run folder records; ``began``:
    when the command started (run/time_limit.clock), where --max-minutes counts from."""
    with same_on_every_rank():
        check_device_for_profile(profile_name, cfg)
        for note in unread_in_training(cfg, set_flags) if global_rank() == 0 else ():
            logger.warning("%s", note)
        folder.move_past_an_earlier_run()
        cfg = folder.with_output_dir(cfg)
        if lone_resume and global_rank() == 0:  # (it went to outputs/run, said only by the closing box)
            logger.warning(
                "--resume %s is in no run's checkpoints/ folder: the run goes on in %s (--output-dir chooses)",
                lone_resume, cfg.output_dir)
    warn_if_launcher_started_fewer_processes()
    from lowmem_alignprop.training.train import train  # (after the checks: they are said without its imports)

    train(cfg, profile_name=profile_name, memory_snapshot=memory_snapshot, folder=folder, command=command,
          began=began)
    return 0


# what keeps a GPU's tensors in host memory instead: on a CPU run they are host memory already
def check_device_for_profile(name: str, cfg: Config) -> None:
    """A GPU profile on a machine without CUDA is refused; a GPU's host-memory features on a CPU run are said (they
    save nothing there and cost copies)."""
    if torch.cuda.is_available():
        return
    if name in GPU_PROFILES:
        raise UserError(f"profile {name} is for a CUDA GPU and this machine has none: train here with --profile cpu, "
                        f"or ask whether it fits that card with `lowmem-alignprop plan --profile {name}`")
    if (said := host_memory_note(cfg, "this run")) is not None:
        logger.warning("%s", said)


def warn_if_launcher_started_fewer_processes() -> None:
    """``accelerate launch --num_processes 2`` without ``--multi_gpu`` (on the CPU, say) starts one plain process:
    say so, instead of training on one process while the user thinks there are two."""
    if world_size() > 1:
        return
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:  # (closed: a ResourceWarning else)
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return  # not Linux, or no parent to read
    if not any("accelerate" in a for a in argv):
        return
    wanted = None
    for i, a in enumerate(argv):
        if a in ("--num_processes", "--num-processes") and i + 1 < len(argv):
            wanted = argv[i + 1]
        elif a.startswith(("--num_processes=", "--num-processes=")):
            wanted = a.split("=", 1)[1]
    if wanted and wanted.isdigit() and int(wanted) > 1:  # (accelerate refuses --cpu beside --multi_gpu)
        fix = "replace --cpu with --multi_gpu (it runs on the CPU too)" if "--cpu" in argv else \
            "add --multi_gpu (also on the CPU)"
        logger.warning(
            "accelerate launch was asked for %s processes but started one: %s, or run `accelerate config`; this run "
            "trains on one process", wanted, fix)

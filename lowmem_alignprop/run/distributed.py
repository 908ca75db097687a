"""Scale-out helpers: the DeepSpeed config generated from the profile, ZeRO-3 gathers, rank agreement.

Data parallel needs nothing here: ``accelerate launch --num_processes N -m lowmem_alignprop ...`` runs
the same loop on every rank; accelerate wraps the UNet in DDP (gloo on CPU, NCCL on GPUs). DeepSpeed
ZeRO comes from the profile's ``deepspeed_zero`` / ``offload`` fields: no hand-written JSON.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("lowmem_alignprop")


def deepspeed_config(cfg, mixed_precision: str | None = None) -> dict:
    """The DeepSpeed JSON config for ``cfg`` (ZeRO stage, offload, batch, accumulation, clipping, precision)."""
    mp = cfg.mixed_precision if mixed_precision is None else mixed_precision
    pin = torch.cuda.is_available()  # pinned host buffers speed up GPU<->CPU copies; there are none on a CPU
    zero: dict = {"stage": cfg.deepspeed_zero,
                  "overlap_comm": False,  # no extra communication buckets: saves memory on small cards
                  "contiguous_gradients": True}  # gradients in one buffer: no fragmentation
    if cfg.offload in ("optimizer", "params"):
        # Adam's fp32 moments and master weights live in CPU memory (8-12 bytes per trained weight off the GPU)
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if cfg.offload == "params":
        # ZeRO-3 keeps the (frozen and trained) weights in CPU memory and fetches each layer when it runs
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    if cfg.deepspeed_zero == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # we save only the trained weights, gathered
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": float(cfg.max_grad_norm),  # 0 disables clipping, as in the config
        "zero_optimization": zero,
        "fp16": {"enabled": mp == "fp16", "initial_scale_power": 16},
        "bf16": {"enabled": mp == "bf16"},
        "zero_allow_untested_optimizer": True,
        # keep our optimizer: with this True (the default) and offload on, accelerate's prepare swaps any client
        # optimizer for a new DeepSpeedCPUAdam(adamw_mode=False) unless it is a torch AdamW, i.e. our AdamW
        # becomes Adam with L2 decay, which for LoRA's tiny gradients steps every weight by -lr*sign(w)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def deepspeed_plugin(cfg, mixed_precision: str | None = None):
    """accelerate's DeepSpeedPlugin built from the profile (train_setup.make_accelerator passes it to Accelerator)."""
    from accelerate.utils import DeepSpeedPlugin

    check_no_stale_build_lock()
    keep_deepspeed_under_cpu_flag(cfg.deepspeed_zero)
    ensure_process_group_env()
    # zero3_init_flag off: the frozen models load whole on the CPU first (and peft's LoRA init must not run
    # inside zero.Init, see docs/design.md section 8); deepspeed.initialize then partitions them.
    return DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, mixed_precision), zero3_init_flag=False)


# the ops DeepSpeed compiles on first use on a machine (on a CPU: its shared-memory collectives, and CPU Adam with
# offload); each builds in 1-3 minutes under torch's lock file in the op's torch-extensions folder
DEEPSPEED_OPS = ("cpu_adam", "deepspeed_shm_comm")
STALE_LOCK_SECONDS = 20 * 60  # a build lock older than this was left by a build that was stopped midway


def build_folder(op: str) -> Path:
    """Where torch's JIT extension build of ``op`` works and keeps its lock: TORCH_EXTENSIONS_DIR/op, else the
    default build root / py<version>_<cuda, rocm or cpu> / op (torch.utils.cpp_extension's rule, from public
    figures)."""
    from torch.utils.cpp_extension import get_default_build_root

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / op
    hip, cuda = getattr(torch.version, "hip", None), torch.version.cuda
    device = f"rocm{hip.replace('.', '')}" if hip else f"cu{cuda.replace('.', '')}" if cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{device}" / op


def check_no_stale_build_lock() -> None:
    """A DeepSpeed op build stopped midway (Ctrl-C, a kill, a lost session) leaves torch's lock file behind, and
    every later run then waits for it forever, silently: name the file instead, before anything loads."""
    from lowmem_alignprop.settings.errors import UserError

    now = time.time()
    for lock in (build_folder(op) / "lock" for op in DEEPSPEED_OPS):
        try:
            age = now - lock.stat().st_mtime
        except OSError:  # no lock (the usual case), or none we can read: the build decides
            continue
        if age > STALE_LOCK_SECONDS:
            raise UserError(f"{lock} is the lock of a DeepSpeed op build that stopped {age / 60:.0f} minutes ago "
                            f"(killed or interrupted midway); with it there this run would wait forever: delete it "
                            f"(rm {lock}; no build of {lock.parent.name} is running) and run again")


def size_buckets(accelerator, params) -> None:
    """Size DeepSpeed's communication buffers to what trains (call before prepare).

    Its defaults (5e8 elements) allocate a 1.9 GiB fp32 gradient bucket in backward even for a LoRA of
    under a million weights; a bucket no larger than the trained weights saves that on a small card.
    """
    n = sum(p.numel() for p in params)
    bucket = int(min(max(n, 100_000), 50_000_000))
    zero = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
    zero.setdefault("reduce_bucket_size", bucket)  # gradient reduction buffer: bucket elements, not 5e8
    zero.setdefault("allgather_bucket_size", bucket)  # ZeRO-2 weight all-gather buffer, same bound
    if zero.get("stage") == 3:
        zero.setdefault("stage3_prefetch_bucket_size", bucket)  # weights fetched ahead of use
        zero.setdefault("stage3_max_live_parameters", 100_000_000)  # at most 1e8 gathered weights at once


def build_deepspeed_optimizer(cfg, params):
    """Under DeepSpeed: its CPU Adam when the state is offloaded (vectorised, ~5x torch's AdamW on CPU), else
    :func:`memory.optim.build_optimizer`'s."""
    from lowmem_alignprop.memory.optim import uses_cpu_adam

    if uses_cpu_adam(cfg.deepspeed_zero, cfg.offload):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, adamw_mode=True)
    from lowmem_alignprop.memory.optim import build_optimizer as build
    return build(cfg, params)


def adopt_launcher_deepspeed(cfg) -> dict[str, Any]:
    """``accelerate launch --use_deepspeed --zero_stage N [--offload_*_device cpu]`` with a profile that has no
    DeepSpeed: take the launcher's stage and offload into the config, which then generates the DeepSpeed config
    as usual (a profile's own deepspeed_zero wins over the launcher, said). Returns the fields taken (the run's
    command.txt adds them, so that the command trains the same under any launcher)."""
    from lowmem_alignprop.run.runlock import global_rank
    from lowmem_alignprop.settings.errors import UserError

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return {}
    stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    params = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") != "none"
    opt = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") != "none"
    offload = "params" if params else "optimizer" if opt else "none"
    if cfg.deepspeed_zero:
        if (stage, offload) != (cfg.deepspeed_zero, cfg.offload) and global_rank() == 0:
            log.warning("accelerate launch's DeepSpeed flags (--zero_stage %d, offload %s) give way to the "
                        "configuration's deepspeed_zero=%d, offload=%s", stage, offload, cfg.deepspeed_zero,
                        cfg.offload)
        return {}
    if stage not in (2, 3):
        raise UserError(f"accelerate launch --zero_stage {stage}: this trainer runs ZeRO stage 2 or 3; launch with "
                        "--zero_stage 2 or 3 (or set deepspeed_zero in the profile)")
    if params and stage != 3:  # (the configuration's own rule would name --set deepspeed_zero=3, and drop the offload)
        raise UserError(f"accelerate launch --zero_stage {stage} --offload_param_device cpu: parameter offload is "
                        "ZeRO-3's; launch with --zero_stage 3, or leave --offload_param_device out")
    cfg.deepspeed_zero, cfg.offload = stage, offload
    cfg.validate()
    if global_rank() == 0:  # (once for the run, not once per process)
        log.info("deepspeed: ZeRO-%d (offload %s) from accelerate launch", stage, cfg.offload)
    return {"deepspeed_zero": stage, "offload": offload}


def keep_deepspeed_under_cpu_flag(zero: int) -> None:
    """``accelerate launch --cpu`` sets ACCELERATE_USE_CPU, with which accelerate drops the DeepSpeed plugin (the run
    then failed on its missing config): without CUDA, DeepSpeed runs on the CPU all the same, so the flag goes;
    with CUDA, --cpu and DeepSpeed contradict each other: one line."""
    from accelerate.utils import parse_flag_from_env

    from lowmem_alignprop.settings.errors import UserError

    if not parse_flag_from_env("ACCELERATE_USE_CPU"):
        return
    if torch.cuda.is_available():
        raise UserError(f"deepspeed_zero={zero} under `accelerate launch --cpu`: accelerate runs no DeepSpeed with "
                        "--cpu; leave --cpu out for DeepSpeed on the GPU, or --set deepspeed_zero=0 for the CPU")
    os.environ.pop("ACCELERATE_USE_CPU")  # (no CUDA here: DeepSpeed's accelerator is the CPU anyway)


def ensure_process_group_env() -> None:
    """DeepSpeed needs a process group; a plain ``lowmem-alignprop`` run (no launcher) gets a 1-process one."""
    if "LOCAL_RANK" in os.environ:
        return  # launched by accelerate / torchrun / deepspeed: they set everything
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    log.info("deepspeed: no launcher found, running as a single process (use `accelerate launch` for several)")


def whole_models(accelerator):
    """A context in which transformers loads models whole, not partitioned by ``deepspeed.zero.Init``.

    Under ZeRO-3 accelerate registers its DeepSpeed config with transformers, whose ``from_pretrained``
    would then partition the frozen text encoder and reward model at load time; they run outside the
    engine, so they must stay whole. (Only the UNet given to ``prepare`` is partitioned.)
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or not is_zero3(accelerator):
        return contextlib.nullcontext()
    return _without_hf_deepspeed_config(plugin)


@contextlib.contextmanager
def _without_hf_deepspeed_config(plugin):
    # accelerate's zero3_init_context_manager(enable=False) does nothing when zero3_init_flag is already
    # False, yet the config stays registered with transformers: unregister it ourselves while loading.
    from transformers.integrations import unset_hf_deepspeed_config
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def repair_cpu_deepspeed_ranks(accelerator) -> None:
    """accelerate 1.15 + DeepSpeed on CPU: its state keeps backend None and so reports one process with
    index 0 on *every* rank (all would act as the main process; gather and reduce would break). The
    process group itself is right: copy its world size and rank into accelerate's shared state."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    if not dist.is_initialized() or accelerator.num_processes == dist.get_world_size():
        return
    fix = {"num_processes": dist.get_world_size(), "process_index": dist.get_rank(),
           "local_process_index": int(os.environ.get("LOCAL_RANK", dist.get_rank()))}
    PartialState._shared_state.update(fix)
    AcceleratorState._shared_state.update(fix)


def is_zero3(accelerator) -> bool:
    from accelerate.utils import DistributedType
    return (accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.zero_stage == 3)


def deepspeed_engine(accelerator, model):
    """The DeepSpeed engine when ``model`` was prepared under DeepSpeed, else None."""
    from accelerate.utils import DistributedType
    return model if accelerator.distributed_type == DistributedType.DEEPSPEED else None


def gatherer(accelerator, params):
    """A context factory: under ZeRO-3 the partitioned ``params`` are whole inside it; elsewhere a no-op.

    ``modify=True``: changes made inside are written back to every rank's partition (for loading).
    """
    def ctx(modify: bool = False):
        if not is_zero3(accelerator):
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0 if modify else None)
    return ctx


def all_ranks_ok(accelerator, ok: bool) -> bool:
    """True only if ``ok`` holds on every rank (one tiny collective; a no-op with one process)."""
    return worst_rank(accelerator, 0 if ok else 1) == 0


def worst_rank(accelerator, code: int) -> int:
    """The largest of every rank's ``code`` (one tiny collective; a no-op with one process): every rank then takes
    the branch of the worst news."""
    if accelerator.num_processes == 1:
        return code
    return int(_every_ranks(accelerator, float(code)).max().item())


def first_rank_with(accelerator, code: int) -> tuple[int, int] | None:
    """(rank, code) of the first rank whose ``code`` is not 0, alike on every rank; None when every one's is 0 (one
    tiny collective; a no-op with one process)."""
    codes = [code] if accelerator.num_processes == 1 else [int(c) for c in _every_ranks(accelerator, float(code))]
    return next(((r, c) for r, c in enumerate(codes) if c), None)


def rank_0_says(accelerator, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (one tiny collective; a no-op with one process)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(_every_ranks(accelerator, float(flag))[0].item())


def _every_ranks(accelerator, value: float) -> torch.Tensor:
    """Every rank's ``value`` (in rank order), gathered by a collective a signal can interrupt (as
    :func:`wait_for_every_rank`): a rank waiting here for one that writes a checkpoint takes a second Ctrl-C as that
    one does, instead of dying in the backend's C++ with a traceback once the other has aborted."""
    mine = torch.tensor([value], device=accelerator.device)
    if not torch.distributed.is_initialized():
        return accelerator.gather(mine)
    every = [torch.empty_like(mine) for _ in range(accelerator.num_processes)]
    _polled(torch.distributed.all_gather(every, mine, async_op=True))
    return torch.cat(every)


# how a collective's backend says that another process is gone (gloo's TCP pairs, NCCL's watchdog)
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
             "Socket Timeout", "connection refused")


def peer_lost(e: BaseException) -> str | None:
    """The backend's words when ``e`` is a collective that failed because another process of the run ended (killed,
    out of host memory: its launcher said which), else None."""
    import re

    lines = str(e).splitlines() if isinstance(e, RuntimeError) else []
    line = next((x for x in lines if any(words.lower() in x.lower() for words in PEER_GONE)), None)
    # the backend's words, without gloo's source path and advice
    return None if line is None else re.sub(r"^\s*\[[^\]]*\]\s*", "", line).split(". ")[0].strip()


def by_micro_batch(gathered: torch.Tensor, processes: int) -> list:
    """Each process's per-micro-batch values gathered (process by process: rank 0's m0, m1, rank 1's m0, m1) in the
    order the step's images are gathered, micro-batch by micro-batch (m0 of rank 0, of rank 1, then m1 ...)."""
    return gathered.view(processes, -1).T.reshape(-1).tolist()


def agreed_failure(accelerator, failed: BaseException | None, what: str) -> BaseException | None:
    """Under a launcher, where one process may fail alone (a user's reward): this process's failure, else another
    process's (AnotherProcessFailed naming ``what``), else None, alike on every rank, so that they stop together
    instead of the others dying in their next collective. One tiny collective; a no-op with one process."""
    return agreed_outcome(accelerator, failed, False, what)[0]


def agreed_outcome(accelerator, failed: BaseException | None, bad: bool, what: str) -> tuple[BaseException | None,
                                                                                              bool]:
    """:func:`agreed_failure` and whether any rank had ``bad`` news (a NaN reward: every rank skips the step), in
    the one collective: (the failure every rank raises, or None; any rank bad). A failure outranks bad news."""
    from lowmem_alignprop.run.faults import AnotherProcessFailed

    worst = worst_rank(accelerator, 2 if failed is not None else 1 if bad else 0)
    if worst == 2:
        return failed or AnotherProcessFailed(f"another process's {what} failed (its own error line says why)"), True
    return None, worst == 1


POLL_S = 0.05  # the longest pause between a waiting rank's looks at its collective (a signal cuts it short)


def wait_for_every_rank(accelerator) -> None:
    """A barrier that a signal can interrupt: the wait polls the collective in Python, so Ctrl-C or the launcher's
    SIGTERM raises in the waiting rank at once (a barrier blocked in the backend's C++ let it run on, or die with a
    traceback when the rank it waited for was interrupted). A no-op with one process."""
    if accelerator.num_processes == 1 or not torch.distributed.is_initialized():
        return
    _polled(torch.distributed.barrier(async_op=True))


def _polled(work) -> None:
    """Wait for an asynchronous collective from Python (its signal handlers run between the polls: a rank blocked in
    the backend's C++ hears no Ctrl-C), quickly at first (the tiny collectives of every step mostly end at once)."""
    pause = POLL_S / 512
    while not work.is_completed():
        time.sleep(pause)
        pause = min(2 * pause, POLL_S)
    work.wait()  # its error, if the collective failed

"""Device figures that turn the planner's counted work into seconds (``plan`` prints seconds per step).

The planner counts, per stage, the work of one training step on fake tensors (:class:`~lowmem_alignprop.measure.
counters.StageWork`): floating-point operations of matmuls/convolutions and of attention (PyTorch's flop-counter
formulas), the bytes the other ops read and write, the ops launched, the bytes copied between host and card
(offload, activation offload) and the weights dequantized (int8/nf4 base). :func:`seconds` adds up one time per
class of work::

    card = matmul_flops / (peak * matmul_eff) + attention_flops / (peak * attention_eff)
           + (other_bytes + dequant_bytes) / (memory_bandwidth * memory_eff)
    max(card, ops * launch_s)      # a GPU: the host queues kernels while the card runs earlier ones
    card + ops * launch_s          # the CPU row: the same cores dispatch and compute
      + (pcie_bytes - swap_bytes) / pcie_bandwidth + block swap's copies beyond the compute they overlap

A GPU step is the longer of the card's work and the host's: PyTorch launches each op asynchronously, so a small
batch (SD1.5 at batch 1 on a fast card) is paced by the host's per-op time (Python, dispatch, autocast, peft's
wrappers and the launch itself), a large one by the card.

Block swap's copies (``swap_bytes``) run on a side stream, each beside the compute of the block before it: a copy
costs max(0, copy - that compute) (:func:`swap_seconds`); the other copies (offload) are serial.

``peak`` is the card's dense tensor-core rate in the step's matmul dtype (fp16/bf16 with fp32 accumulation, as
cuBLAS runs PyTorch's half matmuls; fp32 matmuls at the TF32 rate when ``tf32`` is on, else the plain fp32 rate).

Peak figures are the vendors' dense (no sparsity) numbers; sources per card below. The efficiency factors and
the per-op host time are calibrated against the measured GPU steps in benchmarks/results/ (REPORT.md section 6
states the error): three runs alone on an H200, one model (SD1.5 512 px; batch 8 twice, card-bound, and batch 1,
host-bound), so the other cards' figures are that calibration carried over by their datasheet peaks, and the host
time is that of the H200 machine's CPU (a desktop CPU with a higher clock may dispatch faster). Treat a figure as a
rough guide (about a factor of 1.5 either way) until a GPU session has measured that card.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from lowmem_alignprop.settings.profiles import PROFILE_TARGETS


@dataclass(frozen=True)
class Device:
    name: str
    fp16_tflops: float  # dense tensor-core fp16 with fp32 accumulation (what PyTorch's fp16 matmuls run as)
    bf16_tflops: float  # dense tensor-core bf16, fp32 accumulation
    tf32_tflops: float  # dense tensor-core TF32 (fp32 matmuls with tf32 on)
    fp32_tflops: float  # plain fp32 (CUDA cores)
    memory_gbs: float  # device memory bandwidth, GB/s (1e9 bytes)
    pcie_gbs: float  # host <-> device copies, GB/s effective (pinned, one direction at a time)
    source: str
    # effective factors (fraction of peak reached by each class of work) and the host's time per op, fitted
    # (benchmarks/calibrate_time.py, 2026-12-04) to the three SD1.5 steps measured alone on an H200: two at batch 8
    # (card-bound) and one at batch 1 (host-bound: 1.71 s where card work plus 5 us an op had predicted 0.57 s).
    # Memory fixed at 80% of the bandwidth, one factor for matmuls and attention; least squares of the log ratio:
    # 0.18 and 28 us, measured / predicted 0.90-1.09 on those runs (in-sample). Before: 0.22 with 5 us added to
    # the card's time (fitted to the batch-8 runs alone). Effective, not physical: the elementwise byte count is
    # still an upper bound (no fusion)
    matmul_eff: float = 0.18
    attention_eff: float = 0.18
    memory_eff: float = 0.8
    launch_s: float = 28e-6
    # the host queues ops while the card runs (a GPU): a stage takes the longer of the two; False (the CPU): the sum
    overlaps_launch: bool = True

    def peak_tflops(self, dtype: str, tf32: bool = False) -> float:
        if dtype == "fp16":
            return self.fp16_tflops
        if dtype == "bf16":
            return self.bf16_tflops
        return self.tf32_tflops if tf32 else self.fp32_tflops

    def to_dict(self) -> dict:
        return asdict(self)


_AMPERE = "NVIDIA Ampere GA102 architecture whitepaper (GeForce tensor rates: fp16 with fp32 accumulate at half the " \
          "fp16-accumulate rate)"
DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("rtx3060", 25.5, 25.5, 12.7, 12.7, 360, 25,
           f"RTX 3060 12 GB: 3584 CUDA cores at 1.78 GHz boost, 192-bit GDDR6 360 GB/s, PCIe 4.0 x16; {_AMPERE}"),
    Device("rtx3060-8gb", 25.5, 25.5, 12.7, 12.7, 240, 25,
           f"RTX 3060 8 GB: the 12 GB model's 3584 CUDA cores on a 128-bit GDDR6 bus, 240 GB/s, PCIe 4.0 x16; "
           f"{_AMPERE}"),
    Device("rtx4090", 165.2, 165.2, 82.6, 82.6, 1008, 25,
           "NVIDIA Ada Lovelace architecture whitepaper, RTX 4090 column (165.2 TFLOPS fp16/bf16 with fp32 "
           "accumulate, dense), 1008 GB/s GDDR6X, PCIe 4.0 x16"),
    Device("a100-40gb", 312, 312, 156, 19.5, 1555, 25,
           "NVIDIA A100 datasheet (SXM4 40 GB: 312 TFLOPS fp16/bf16 dense, 156 TF32, 19.5 fp32, 1555 GB/s HBM2), "
           "PCIe 4.0 x16"),
    Device("a100-80gb", 312, 312, 156, 19.5, 2039, 25,
           "NVIDIA A100 datasheet (SXM4 80 GB: as the 40 GB, 2039 GB/s HBM2e), PCIe 4.0 x16"),
    Device("h100", 989.4, 989.4, 494.7, 66.9, 3350, 50,
           "NVIDIA H100 datasheet (SXM5: 989.4 TFLOPS fp16/bf16 dense, 494.7 TF32, 66.9 fp32, 3.35 TB/s HBM3), "
           "PCIe 5.0 x16"),
    Device("h200", 989.4, 989.4, 494.7, 66.9, 4800, 50,
           "NVIDIA H200 datasheet (SXM: the H100's compute, 4.8 TB/s HBM3e), PCIe 5.0 x16"),
    Device("laptop", 21.8, 21.8, 10.9, 10.9, 336, 12,
           "RTX 3060 Laptop GPU 6 GB at about 1.42 GHz (the clock depends on the laptop's power limit), 336 GB/s, "
           f"PCIe 4.0 x8; {_AMPERE}; the roughest row"),
    # the CPU: per core, multiplied by torch's thread count when used (see cpu_device); no tensor cores, no
    # transfers. The factors are fitted (benchmarks/calibrate_cpu.py, results/cpu-time-calibration.json) to the CPU
    # seconds of 7 one-thread steps (tiny, toy world, mid-size model; a few features and batches) on a 2-core Xeon
    # shared with other jobs: measured / predicted 0.92-1.07 on them, 1.08-1.20 on 4 held-out steps. The memory
    # factor is fixed at 2 (16 GB/s a core: these models' tensors stay in cache), as these models cannot tell it
    # from the matmul one; above 1 for attention: the nominal peak is below what the core did (a turbo clock)
    Device("cpu", 0.128, 0.128, 0.128, 0.128, 8, 0,
           "one x86 core with AVX-512 at 2 GHz: 2 FMA units x 16 fp32 lanes x 2 flops = 64 flops per cycle, 128 "
           "GFLOPS peak; about 8 GB/s of memory bandwidth per core; bf16 counted at the fp32 rate (no AMX assumed)",
           matmul_eff=0.538, attention_eff=1.426, memory_eff=2.0, launch_s=36.9e-6, overlaps_launch=False),
)}


# a detected card's product name (torch.cuda.get_device_properties().name) -> its row; the A100s by memory
_PRODUCT_ROWS = (("RTX 4090", "rtx4090"), ("RTX 3060 Laptop", "laptop"), ("RTX 3060", "rtx3060"), ("H200", "h200"),
                 ("H100", "h100"))


def card_row(product: str, total_gib: float) -> str:
    """The row of :data:`DEVICES` for a detected card, or "" for a card without figures here."""
    for pattern, row in _PRODUCT_ROWS:
        if pattern.lower() in product.lower():
            return "rtx3060-8gb" if row == "rtx3060" and total_gib < 10 else row
    if "a100" in product.lower():
        return "a100-80gb" if total_gib > 50 else "a100-40gb"
    return ""


def cpu_device(threads: int | None = None) -> Device:
    """The ``cpu`` row scaled to ``threads`` cores (default: torch's intra-op thread count)."""
    import dataclasses

    import torch

    n = threads or torch.get_num_threads() or os.cpu_count() or 1
    base = DEVICES["cpu"]
    return dataclasses.replace(base, name=f"cpu ({n} thread{'' if n == 1 else 's'})", fp16_tflops=base.fp16_tflops * n,
                               bf16_tflops=base.bf16_tflops * n, tf32_tflops=base.tf32_tflops * n,
                               fp32_tflops=base.fp32_tflops * n, memory_gbs=base.memory_gbs * n)


def gpu_card(card: str) -> str:
    """A config's card as a GPU's row: "" for the CPU (the cpu profile's card: no GPU plan is timed on it)."""
    return "" if card == "cpu" else card


def device_for(card: str, profile: str, target: str) -> Device | None:
    """The figures to time a plan with: ``card`` when given, else the profile's card, the CPU row for a CPU target;
    None when nothing names a card (a custom profile on CUDA without --set card=...)."""
    if target == "cpu":
        return cpu_device()
    name = gpu_card(card) or PROFILE_TARGETS.get(profile, ("", None))[0]
    if not name or name == "cpu":
        return None
    return DEVICES[name]


def seconds(work: dict, device: Device, dtype: str, tf32: bool = False, swap_windows: list | None = None) -> float:
    """Seconds for one stage's ``work`` (StageWork's counts) on ``device``; ``dtype``: the matmul dtype
    ("fp16", "bf16" or "fp32"). Host <-> device copies are serial to compute, except block swap's
    (``swap_bytes``, a part of ``pcie_bytes``): see :func:`swap_seconds` (``swap_windows``)."""
    t = compute_seconds(work, device, dtype, tf32)
    other_pcie = work["pcie_bytes"] - work.get("swap_bytes", 0)  # offload's copies: on the compute stream
    if other_pcie and device.pcie_gbs:
        t += other_pcie / (device.pcie_gbs * 1e9)
    return t + swap_seconds(work, device, dtype, tf32, swap_windows)


def compute_seconds(work: dict, device: Device, dtype: str, tf32: bool = False) -> float:
    """The device's own work in ``work`` (no copies): matmuls, attention, elementwise and dequantized bytes, and the
    host's time per op: the longer of the two on a GPU (the host runs ahead), their sum on the CPU."""
    peak = device.peak_tflops(dtype, tf32) * 1e12
    t = work["matmul_flops"] / (peak * device.matmul_eff) + work["attention_flops"] / (peak * device.attention_eff)
    bandwidth = device.memory_gbs * 1e9 * device.memory_eff
    t += (work["other_bytes"] + work["dequant_bytes"]) / bandwidth
    host = work["ops"] * device.launch_s
    return max(t, host) if device.overlaps_launch else t + host


def swap_seconds(work: dict, device: Device, dtype: str, tf32: bool = False, windows: list | None = None) -> float:
    """What block swap's copies (``work["swap_bytes"]``) add to a stage's compute. memory/block_swap.py copies a
    block on a side stream, started in the pre-hook of the block that runs before it, and the compute stream waits
    for it in the block's own pre-hook: each copy overlaps exactly the compute between those two hooks (that block's
    forward, or its recompute and backward in backward's walk back), and a copy nothing prefetched (the first
    swapped block of each walk) overlaps nothing. So each copy costs max(0, copy - window) on top of compute.
    ``windows``: [copy bytes, window work] of the simulated step's copies, grouped so that a group's copies have the
    same copy-to-window ratio (then the sum of their maxima is the maximum of the sums), scaled to ``swap_bytes``
    (the stage's copies at the configuration's step and K); None: no windows known, every copy serial (an upper
    bound)."""
    total = work.get("swap_bytes", 0)
    if not total or not device.pcie_gbs:
        return 0.0
    pcie = device.pcie_gbs * 1e9
    simulated = sum(b for b, _ in windows or ())
    if not simulated:
        return total / pcie
    exposed = sum(max(0.0, b / pcie - compute_seconds(w, device, dtype, tf32)) for b, w in windows)
    return exposed * total / simulated

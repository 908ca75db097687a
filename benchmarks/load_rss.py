"""Host memory of loading a FLUX.1 transformer file with an int8 base: diffusers' whole-model load then quantizing,
against ``block_loading.load_by_block`` (issue 18: a 32 GB machine could not load FLUX.1 with int8).

Writes a FLUX.1-shaped transformer at FLUX.1's own widths (3072 wide, 24 heads, T5 width 4096) with ``--double`` and
``--single`` blocks (the real model has 19 and 38) in Black Forest Labs' layout, bf16, random values; then loads it
to the CPU with int8 Linear layers (bitsandbytes' CPU ops, ``LOWMEM_ALIGNPROP_QUANT_ON_CPU=1``) in a fresh process
per way, exactly as ``load_flow_single_file`` does for its transformer:

* ``whole``: ``FluxTransformer2DModel.from_single_file`` (bf16), then ``quant.quantize_in_place``;
* ``by_block``: ``block_loading.load_by_block`` (each block read from the memory-mapped file and quantized before
  the next).

Each child samples its ``/proc/self/status`` every 2 ms: the peak of anonymous memory (``RssAnon``: what the
process itself allocated) and of file-backed pages (``RssFile``: the memory-mapped file's pages, page cache the
kernel takes back under pressure), and ``VmHWM`` (the peak of both together). Linux only.

    python benchmarks/load_rss.py --double 3 --single 8 --dir /tmp/loadrss \\
        --json benchmarks/results/load-rss-flux-3d8s.json

``--device cuda`` (``gpu_check.py``'s ``loading`` item) loads to the GPU instead, bitsandbytes quantizing there, and
adds a third way, ``by_block_bf16``: the transformer in bf16 read block by block to the card (the trainer's load
without a quantized base); each row then has the card's peak allocated bytes and the wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def flux_config(double: int, single: int) -> dict:
    config = json.loads((ROOT / "lowmem_alignprop/arch_flow/flux/transformer/config.json").read_text())
    return {**config, "num_layers": double, "num_single_layers": single}


def write_file(path: Path, config: dict) -> dict:
    """The transformer in BFL's layout, bf16, normal(0, 0.02); returns its sizes."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from lowmem_alignprop.memory.block_swap import swappable_blocks
    from lowmem_alignprop.models.flow_layout import flux_to_original

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in model.state_dict().items()}
    block_bytes = max(sum(p.numel() for p in b.parameters()) * 2 for b in swappable_blocks(model))
    total = sum(v.numel() * 2 for v in sd.values())
    save_file({k: v.contiguous() for k, v in flux_to_original(sd).items()}, str(path))
    return {"bf16_bytes": total, "largest_block_bf16_bytes": block_bytes}


def child(way: str, path: str, config_json: str, device: str = "cpu") -> None:
    import torch
    from diffusers import FluxTransformer2DModel

    from lowmem_alignprop.memory import quant
    from lowmem_alignprop.models.block_loading import Placement, load_by_block
    from lowmem_alignprop.models.flow_loading import _whole_single_file

    config = json.loads(config_json)
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            s = _status()
            for k in peaks:
                peaks[k] = max(peaks[k], s[k])
            time.sleep(0.002)

    before = _status()
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    start, wall = time.process_time(), time.time()
    if way == "whole":
        model = _whole_single_file(FluxTransformer2DModel, config, path, "(benchmark)", "original", torch.bfloat16)
        quant.quantize_in_place(model, "int8", torch.bfloat16, device=device, quiet=True)
    else:
        mode = "none" if way == "by_block_bf16" else "int8"
        model = load_by_block(FluxTransformer2DModel, config, [path], "flux", "original",
                              Placement(mode, torch.bfloat16, torch.device(device)))
    if device == "cuda":
        torch.cuda.synchronize()
    cpu, wall = time.process_time() - start, time.time() - wall
    done.set()
    watcher.join()
    after = _status()
    card = {"cuda_peak_allocated_mib": round(torch.cuda.max_memory_allocated() / MIB)} if device == "cuda" else {}
    print(json.dumps({"way": way, "device": device, "quantized_layers": quant.count_quantized(model)["int8"],
                      "weight_bytes": quant.measured_weight_bytes(model), "cpu_seconds": round(cpu, 1),
                      "wall_seconds": round(wall, 1), **card,
                      "rss_anon_before_mib": round(before["RssAnon"] / MIB),
                      "peak_rss_anon_mib": round(peaks["RssAnon"] / MIB),
                      "peak_rss_file_mib": round(peaks["RssFile"] / MIB), "vm_hwm_mib": round(after["VmHWM"] / MIB),
                      "rss_anon_after_mib": round(after["RssAnon"] / MIB)}))


def _card(device: str) -> dict:
    if device != "cuda":
        return {}
    import torch

    return {"name": torch.cuda.get_device_name(0),
            "total_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--double", type=int, default=2, help="FLUX double-stream blocks (FLUX.1 has 19)")
    ap.add_argument("--single", type=int, default=4, help="FLUX single-stream blocks (FLUX.1 has 38)")
    ap.add_argument("--dir", default="/tmp/loadrss", help="where the transformer file is written")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the transformer is loaded to")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    from lowmem_alignprop.measure.provenance import provenance

    config = flux_config(args.double, args.single)
    folder = Path(args.dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        ap.error(f"--dir {args.dir}: {e.strerror or e}; give a folder it can write the transformer file in")
    path = folder / f"flux-{args.double}d{args.single}s.safetensors"
    sizes = write_file(path, config)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if args.device == "cpu":
        env["LOWMEM_ALIGNPROP_QUANT_ON_CPU"] = "1"  # bitsandbytes' CPU ops (no GPU here)
    rows = []
    for way in ("whole", "by_block") + (("by_block_bf16",) if args.device == "cuda" else ()):
        done = subprocess.run([sys.executable, __file__, "--child", way, str(path), json.dumps(config), args.device],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"the {way} load failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    doc = {"kind": "load-rss", **provenance(" ".join(["python"] + sys.argv), ("torch", "diffusers", "bitsandbytes",
                                                                               "safetensors"), torch_threads=1,
                                                 **_card(args.device)),
           "model": f"FLUX.1-shaped transformer, {args.double} double + {args.single} single blocks, BFL layout, bf16",
           "file_bytes": path.stat().st_size, **sizes, "rows": rows}
    if args.json:
        from lowmem_alignprop.run import atomic  # a whole file or the previous one

        atomic.write_text(args.json, json.dumps(doc, indent=1) + "\n")
    path.unlink()


if __name__ == "__main__":
    main()

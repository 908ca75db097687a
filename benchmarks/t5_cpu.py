"""CPU seconds of T5-XXL's encoder per prompt (``encode_on_cpu``: every SD3.5/FLUX profile encodes its prompt set on
the CPU once, before the transformer is read). T5-XXL is too large to time whole on a small machine, so this builds
the shipped config (``lowmem_alignprop/arch_flow/flux/text_encoder_2``) with ``--layers`` of its 24 blocks, random
weights, and times the encoder on a batch of prompts padded to ``--tokens`` (FLUX.1-dev: 512; SD3.5 and schnell:
256) in each dtype; the whole encoder's time is the measured blocks' time x 24 / layers plus the rest (embedding,
final norm), which is measured with 0 layers.

    python benchmarks/t5_cpu.py --layers 2 --tokens 512 --json benchmarks/results/t5-cpu-<date>.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
T5_DIR = ROOT / "lowmem_alignprop" / "arch_flow" / "flux" / "text_encoder_2"


def encoder(layers: int, dtype: torch.dtype):
    from transformers import T5Config, T5EncoderModel

    config = T5Config.from_pretrained(T5_DIR)
    full = config.num_layers
    config.num_layers = layers
    torch.manual_seed(0)
    model = T5EncoderModel(config).to(dtype).eval()
    return model, full


def seconds_per_prompt(model, tokens: int, batch: int, repeats: int) -> float:
    ids = torch.randint(2, 32000, (batch, tokens))
    with torch.inference_mode():
        model(input_ids=ids[:1])  # warm-up: kernels and thread pools
        t0 = time.process_time()
        for _ in range(repeats):
            model(input_ids=ids)
        cpu = time.process_time() - t0
    return cpu / (repeats * batch)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="T5 blocks timed (the rest of the encoder timed apart)")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per prompt")
    ap.add_argument("--batch", type=int, default=2, help="prompts per call")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per configuration")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated torch dtypes of the weights")
    ap.add_argument("--json", type=Path, help="write the figures here")
    a = ap.parse_args(argv)
    bad = [n for n in a.dtypes.split(",") if not isinstance(getattr(torch, n.strip(), None), torch.dtype)]
    if bad:
        ap.error(f"--dtypes: {', '.join(bad)} is no torch dtype; give e.g. bfloat16,float32")
    sys.path.insert(0, str(ROOT))
    from lowmem_alignprop.measure.provenance import provenance

    rows = {}
    for name in (n.strip() for n in a.dtypes.split(",")):
        dtype = getattr(torch, name)
        base, full = encoder(0, dtype)
        rest = seconds_per_prompt(base, a.tokens, a.batch, a.repeats)
        del base
        model, full = encoder(a.layers, dtype)
        with_layers = seconds_per_prompt(model, a.tokens, a.batch, a.repeats)
        del model
        per_layer = max(0.0, with_layers - rest) / a.layers
        whole = rest + per_layer * full
        rows[name] = {"cpu_seconds_per_prompt_whole_encoder": round(whole, 2),
                      "cpu_seconds_per_block": round(per_layer, 3), "cpu_seconds_rest": round(rest, 3)}
        print(f"{name}: {whole:.1f} CPU s per prompt for the whole T5-XXL encoder ({per_layer:.2f} s per block "
              f"x {full} + {rest:.2f} s), {a.tokens} tokens", flush=True)
    flags = set()
    if Path("/proc/cpuinfo").exists():  # bf16 on a CPU is fast only with these (else converted to fp32 per op)
        words = Path("/proc/cpuinfo").read_text().split()
        flags = sorted({w for w in words if w in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")})
    result = {**provenance(" ".join([sys.executable, *sys.argv]), torch_threads=torch.get_num_threads(),
                           cpu_flags=list(flags)),
              "kind": "t5_cpu", "tokens": a.tokens, "batch": a.batch, "repeats": a.repeats,
              "layers_measured": a.layers, "method": "CPU (process) seconds of the encoder's forward in "
              "inference mode, measured blocks scaled to T5-XXL's 24; wall seconds on an idle machine with one "
              "thread per core are about CPU seconds / threads", "dtypes": rows}
    if a.json:
        from lowmem_alignprop.run import atomic

        a.json.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(a.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

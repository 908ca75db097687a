"""Shared checks for the tests: a refused command (one ``error:`` line, exit 2, nothing written), a run's
metrics.jsonl read as strict JSON, the frozen base copy that KL gradients are compared against, and a model folder
whose text encoder files lack weights."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch


def assert_refused(main, argv: list[str], needle: str, out: Path, capsys) -> None:
    """``main(argv)`` exits 2 with exactly one ``error:`` line holding ``needle``, and ``out`` was not created."""
    assert main(argv) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def strict_rows(run: Path) -> list[dict]:
    """``run``'s metrics.jsonl read as strict JSON: a bare NaN or Infinity fails."""
    def refuse(constant):
        raise ValueError(f"{constant} in metrics.jsonl")
    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def timed_mean(run: Path, rows: list[dict]) -> float:
    """The mean seconds summary.json's seconds_per_step should be for this start's metrics ``rows``: its first step
    (warm-up) and the steps memory_report counted (source cpu_counter, slower) left out, as long as any remain."""
    counted = {s["step"] for s in json.loads((run / "memory_report.json").read_text(encoding="utf-8"))["steps"]
               if s.get("source") == "cpu_counter"}
    kept = rows[1:] or rows
    timed = [r for r in kept if r["step"] not in counted] or kept
    return sum(r["seconds"] for r in timed) / len(timed)


def frozen_base_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The base model written out independently of peft's switch: a frozen copy whose LoRA weights are zero (each
    adapter then adds exact zeros)."""
    base = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_" in name:
                p.zero_()
    return base.requires_grad_(False)


def rename_text_encoder_weights(folder: Path, part: str = "text_encoder", *, match: str = "layers.0.") -> int:
    """Save ``part``'s weights under other names where ``match`` is in the name (as another tool or transformers
    release might): transformers finds none of them and would initialise them at random."""
    from safetensors.torch import load_file, save_file

    path = folder / part / "model.safetensors"
    state = load_file(path)
    renamed = {(f"other.{k}" if match in k else k): v for k, v in state.items()}
    assert renamed.keys() != state.keys()
    save_file(renamed, path, metadata={"format": "pt"})
    return sum(match in k for k in state)


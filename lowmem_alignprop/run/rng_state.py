"""The random generators' state saved in a checkpoint and restored on resume (Python's, torch's, CUDA's), so a
resumed run draws the prompts, noise and K the uninterrupted run would have."""

from __future__ import annotations

import random

import torch


def get_rng_state(rng: random.Random) -> dict:
    state = {"python": rng.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(rng: random.Random, state: dict) -> None:
    version, internal, gauss = state["python"]
    rng.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

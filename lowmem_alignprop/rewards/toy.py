"""The toy world's learned rewards: toy_clip (prompt alignment) and toy_count (a target object count).

Both read the trainer's images (float [B, 3, H, W] in [0, 1], resized to 64 px differentiably) with a small
CNN. They are trained by ``commands/train_toy_world.py`` on the renderer's data and saved as ``config.json`` +
``model.safetensors`` directories; :func:`load_toy_clip` and :func:`load_toy_count` give frozen
``RewardModule``s. The exact evaluators in ``fidelity.py`` are the ground truth they approximate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lowmem_alignprop.memory.recompute import checkpoint

from .base import RewardModule

SHIPPED_REWARDS = Path(__file__).resolve().parents[1] / "toy" / "weights" / "rewards"  # the full run's (report.json)
INPUT_SIZE = 64
MAX_COUNT = 4


class ConvTower(nn.Module):
    """Four stride-2 3x3 convolutions (GroupNorm, SiLU), a 3x3 convolution at 4x4, global average pooling."""

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 128), out_dim: int = 64):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            c = w
        layers += [nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, out_dim)
        self.checkpointing = False  # reward_checkpointing: each convolution block recomputed in backward

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.head.weight.dtype)  # the tower's own dtype (fp16 under mixed precision)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = x * 2 - 1
        if self.checkpointing and torch.is_grad_enabled():
            for i in range(0, len(self.body), 3):  # saves each block's input, not its convolution's and norm's outputs
                x = checkpoint(self.body[i:i + 3], x)
        else:
            x = self.body(x)
        return self.head(x.mean(dim=(2, 3)))


class ToyClipModel(nn.Module):
    """An image tower and a text tower (a small CLIPTextModel, pooled EOS output) into a shared 64-d space."""

    def __init__(self, vocab_size: int, bos_token_id: int, eos_token_id: int, dim: int = 64, text_hidden: int = 64,
                 max_length: int = 24):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        self.config = dict(vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id, dim=dim,
                           text_hidden=text_hidden, max_length=max_length)
        self.image = ConvTower(out_dim=dim)
        self.text = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=bos_token_id,
            eos_token_id=eos_token_id, pad_token_id=eos_token_id))
        self.text_proj = nn.Linear(text_hidden, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1/0.07), CLIP's initial temperature

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images), dim=-1)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(input_ids).pooler_output), dim=-1)


class ToyCountModel(nn.Module):
    """Logits over object counts 0..MAX_COUNT."""

    def __init__(self, max_count: int = MAX_COUNT):
        super().__init__()
        self.config = dict(max_count=max_count)
        self.net = ConvTower(out_dim=max_count + 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def expected_count(self, images: torch.Tensor) -> torch.Tensor:
        p = self.forward(images).float().softmax(-1)
        return (p * torch.arange(p.shape[-1], dtype=p.dtype, device=p.device)).sum(-1)


# ------------------------------------------------------------------------------------------ saving

def save_model(model: nn.Module, directory: str | Path, kind: str, dtype: torch.dtype = torch.float16) -> None:
    from safetensors.torch import save_file

    from lowmem_alignprop.run import atomic

    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    with atomic.replacing_dir(directory) as d:  # (the older model stays whole until this one is)
        (d / "config.json").write_text(json.dumps({"kind": kind, **model.config}, indent=1, sort_keys=True) + "\n",
                                       encoding="utf-8")
        save_file(text_tower_names(state, "text.", nested=True), str(d / "model.safetensors"))  # the hub's layout


def load_model(directory: str | Path) -> nn.Module:
    from safetensors.torch import load_file

    d = Path(directory)
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    kind = cfg.pop("kind")
    model = {"toy_clip": ToyClipModel, "toy_count": ToyCountModel}[kind](**cfg)
    state = {k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()}
    model.load_state_dict(_as_named_here(state, set(model.state_dict())))
    return model.eval()


def text_tower_names(state: dict, tower: str, nested: bool) -> dict:
    """``state`` with the CLIPTextModel under ``tower`` ("" when it is the whole model) named with ``text_model.``
    (``nested``: the hub's layout, which transformers 5.0 loads and 5.24 converts) or without (5.24's own names,
    which it also saves; 5.0 reads them as missing weights and draws random ones without an error)."""
    flat, deep = tower, tower + "text_model."
    as_flat = {flat + k[len(deep):] if k.startswith(deep) else k: v for k, v in state.items()}
    if not nested:
        return as_flat
    return {deep + k[len(flat):] if k.startswith(flat) else k: v for k, v in as_flat.items()}


def _as_named_here(state: dict, names: set[str]) -> dict:
    """The saved text tower under this transformers' names (either layout; anything else is left for
    ``load_state_dict`` to name)."""
    return next((s for s in (text_tower_names(state, "text.", n) for n in (False, True)) if set(s) == names), state)


# ------------------------------------------------------------------------------------------ rewards

class ToyClipReward(RewardModule):
    """100 x cosine similarity between the image and its prompt in toy_clip's space."""

    name = "toy_clip"

    def __init__(self, model: ToyClipModel, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.freeze()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.model.config["max_length"], return_tensors="pt").input_ids
        img = self.model.embed_images(images)
        txt = self.model.embed_text(ids.to(images.device))
        return 100.0 * (img * txt).sum(-1).float()


class ToyCountReward(RewardModule):
    """Minus the squared distance between the expected object count and the target."""

    name = "toy_count"

    def __init__(self, model: ToyCountModel, target: float = 2.0):
        super().__init__()
        self.model = model
        self.target = float(target)
        self.name = f"toy_count={self.target:g}"
        self.freeze()

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return -(self.model.expected_count(images) - self.target) ** 2

    def extra_repr(self) -> str:
        return f"name={self.name!r}, target={self.target}"


def load_toy_clip(directory: str | Path, checkpointing: bool = False) -> ToyClipReward:
    from lowmem_alignprop.toy.tokenizer import build_tokenizer

    reward = ToyClipReward(load_model(directory), build_tokenizer())
    reward.model.image.checkpointing = checkpointing
    return reward


def load_toy_count(directory: str | Path, target: float = 2.0, checkpointing: bool = False) -> ToyCountReward:
    reward = ToyCountReward(load_model(directory), target)
    reward.model.net.checkpointing = checkpointing
    return reward

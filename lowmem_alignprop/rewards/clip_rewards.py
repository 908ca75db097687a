"""CLIP-based model rewards: ``aesthetic``, ``clip``, ``pickscore`` and ``hpsv2``.

All of them run on transformers' CLIP classes; the image preprocessing (shortest side resized with
antialiased bicubic, centre crop, normalise) is done in torch so gradients reach the images. No PIL in
the gradient path. Text is encoded under ``no_grad`` (it does not depend on the images).

Where the weights come from (``weights`` argument = ``--set reward_weights=...``):

``clip``       a transformers CLIP directory (``config.json``, ``model.safetensors``, tokenizer files,
               optionally ``preprocessor_config.json``) or a hub id; default ``openai/clip-vit-large-patch14``.
``pickscore``  the same for ``yuvalkirstain/PickScore_v1``; a directory or hub repo without tokenizer files
               takes the tokenizer of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
``aesthetic``  LAION improved aesthetic predictor v2: CLIP ViT-L/14 image embedding, L2-normalised, then
               an MLP head (``sac+logos+ava1-l14-linearMSE.pth``, keys ``layers.0.weight`` ...). Layouts::

                   DIR/sac+logos+ava1-l14-linearMSE.pth    the head (any single *.pth/*.pt/*.safetensors
                                                           holding ``layers.*`` keys also works)
                   DIR/clip/config.json, model.safetensors the CLIP (or the CLIP files directly in DIR);
                                                           without them: openai/clip-vit-large-patch14
                                                           from the Hugging Face cache / hub

               or ``weights="HEAD.pth"`` (CLIP from the default id) or ``weights="HEAD.pth,CLIP_DIR_OR_ID"``.
               With no ``weights`` the head is looked for in ``$LOWMEM_ALIGNPROP_CACHE/rewards/aesthetic/``
               (default ``~/.cache/lowmem_alignprop/rewards/aesthetic/``).
``hpsv2``      HPS v2 / v2.1: an open_clip ViT-H-14 checkpoint (``HPS_v2_compressed.pt`` or
               ``HPS_v2.1_compressed.pt``; also a .safetensors or .bin copy), converted on load to a transformers
               ``CLIPModel`` (see :mod:`.openclip_convert`); or a transformers CLIP directory. ``weights`` = the file, a
               directory holding it (plus optionally tokenizer files and a ``config.json`` CLIPConfig
               when the heads are not 64 wide), or empty: ``$LOWMEM_ALIGNPROP_CACHE/rewards/hpsv2/``,
               then the hub repo ``xswu/HPSv2``. Tokenizer: from the directory, else
               ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from lowmem_alignprop.memory.recompute import checkpoint_modules
from lowmem_alignprop.models.pipeline_load import missing_weights
from lowmem_alignprop.run import hub
from lowmem_alignprop.run.tensor_files import TensorFileError, read_tensor_file
from lowmem_alignprop.settings.errors import UserError, first_line
from lowmem_alignprop.settings.hub_access import hub_file
from .base import RewardModule

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_PICKSCORE = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
DEFAULT_HPS_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_HUB_REPO = "xswu/HPSv2"
HPS_FILES = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt", "HPS_v2.1.pt", "HPS_v2.pt")
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
FLAG = "--set reward_weights=PATH"


# --------------------------------------------------------------------------------------------------
# preprocessing (torch, differentiable)
# --------------------------------------------------------------------------------------------------
class ClipPreprocess(torch.nn.Module):
    """Torch version of ``CLIPImageProcessor``: resize shortest side (bicubic, antialiased, as PIL does),
    centre crop, normalise. Input ``[B, 3, H, W]`` floats in [0, 1]; output float32.

    Like the PIL path (which stores each resize pass as uint8) the resized values are clamped to [0, 1];
    against ``CLIPImageProcessorPil`` on uint8 images the pixels agree to about 1/255 (rounding).
    """

    def __init__(self, size: int = 224, crop: tuple[int, int] | int = 224, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                 do_resize: bool = True, do_center_crop: bool = True):
        super().__init__()
        self.size = int(size)
        self.crop = (int(crop), int(crop)) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
        self.do_resize = do_resize
        self.do_center_crop = do_center_crop
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg: dict | None, image_size: int) -> "ClipPreprocess":
        """From a ``preprocessor_config.json`` dict (None: OpenAI CLIP defaults at the model's image size)."""
        if not cfg:
            return cls(image_size, image_size)
        size = cfg.get("size", image_size)
        if isinstance(size, dict):
            size = size.get("shortest_edge") or min(size.get("height", image_size), size.get("width", image_size))
        crop = cfg.get("crop_size", size)
        if isinstance(crop, dict):
            crop = (crop.get("height", size), crop.get("width", size))
        return cls(size, crop, cfg.get("image_mean", OPENAI_CLIP_MEAN), cfg.get("image_std", OPENAI_CLIP_STD),
                   cfg.get("do_resize", True), cfg.get("do_center_crop", True))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.do_resize:
            h, w = x.shape[-2:]
            short, long = (h, w) if h <= w else (w, h)
            new_short, new_long = self.size, int(self.size * long / short)  # same rounding as transformers
            new_hw = (new_short, new_long) if h <= w else (new_long, new_short)
            # PIL resizes width then height and stores each pass as uint8: two 1-D passes, each clamped,
            # reproduce it to ~1/255 (one 2-D pass differs by up to ~8/255 near overshooting edges).
            if new_hw[1] != w:
                x = F.interpolate(x, size=(h, new_hw[1]), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
            if new_hw[0] != h:
                x = F.interpolate(x, size=new_hw, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        if self.do_center_crop:
            ch, cw = self.crop
            h, w = x.shape[-2:]
            if h < ch or w < cw:  # transformers pads small images with zeros, centred
                ph, pw = max(ch - h, 0), max(cw - w, 0)
                x = F.pad(x, ((pw + 1) // 2, pw // 2, (ph + 1) // 2, ph // 2))
                h, w = x.shape[-2:]
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        return (x - self.mean) / self.std


# --------------------------------------------------------------------------------------------------
# gradient checkpointing that works on a frozen model in eval mode
# --------------------------------------------------------------------------------------------------
def enable_layer_checkpointing(model: torch.nn.Module) -> int:
    """Checkpoint every transformer layer (``*EncoderLayer``) of ``model``; returns how many.

    transformers' own ``gradient_checkpointing_enable()`` only acts in training mode (its layers check
    ``self.training``), and a frozen reward stays in eval mode, so each layer's ``forward`` is wrapped here
    with non-reentrant ``torch.utils.checkpoint`` (which needs no parameter to require grad: the images do).
    """
    return checkpoint_modules(m for m in model.modules() if type(m).__name__.endswith("EncoderLayer"))


# --------------------------------------------------------------------------------------------------
# locating weights
# --------------------------------------------------------------------------------------------------
def looks_like_path(spec: str) -> bool:
    """Whether a reward_weights part is meant as a path, not a hub id (OWNER/NAME): it starts with /, . or ~, has a
    backslash or not exactly one slash, or ends in a weights or config file's suffix (the planner reads it alike)."""
    return (spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") != 1
            or spec.endswith((".pt", ".pth", ".bin", ".safetensors", ".json")))


def reward_cache_dir(reward: str) -> Path:
    """Default place for reward weights that are not on the hub: <cache root>/rewards/<reward>/."""
    from lowmem_alignprop.models.tiny import cache_root

    return cache_root() / "rewards" / reward


def _is_hf_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in HF_WEIGHT_FILES)


def _check_hf_dir(path: Path, reward: str):
    if not (path / "config.json").is_file():
        raise UserError(f"{reward} reward: {path} has no config.json; point {FLAG} at a transformers CLIP directory "
                        "(save_pretrained output or a hub snapshot)")
    if not any((path / f).is_file() for f in HF_WEIGHT_FILES):
        raise UserError(f"{reward} reward: {path} has no model.safetensors (or pytorch_model.bin); put the CLIP "
                        f"weights there or point {FLAG} at a complete directory")


class NotAFullClip(UserError):
    """The files hold weights of another model than a full CLIP (a text-only or vision-only one, say)."""


def _checked_load(cls, where: str, reward: str, **kwargs):
    """``cls.from_pretrained`` that refuses weights of another model: every weight must be found in the files (a
    text-only CLIP loads as a CLIPModel with random weights otherwise), and a damaged file is one line."""
    try:
        model, info = cls.from_pretrained(where, output_loading_info=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any reader error (SafetensorError is none of the builtin ones)
        raise UserError(f"{reward} reward: cannot load the CLIP model in {where} ({type(exc).__name__}: "
                        f"{first_line(exc, 160)}): its files are incomplete or of another model; fix the folder "
                        f"given by {FLAG}") from None
    missing = missing_weights(info)
    if missing:
        raise NotAFullClip(f"{reward} reward: {where} is not a full CLIP model (text and vision): {len(missing)} of "
                           f"its weights are missing (e.g. {missing[0]}); point {FLAG} at a CLIPModel directory")
    return model


def _hf_from_pretrained(cls, source: str, reward: str, **kwargs):
    """``cls.from_pretrained`` on a local directory or a hub id (cache first; the network only when online)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{reward} reward: {path} is a file; a transformers CLIP directory is needed here "
                            f"({FLAG} with a directory)")
        _check_hf_dir(path, reward)
        return _checked_load(cls, str(path), reward, **kwargs)
    if looks_like_path(source):
        raise UserError(f"{reward} reward: {path} does not exist; fix the path in {FLAG}")
    try:
        return _checked_load(cls, source, reward, local_files_only=True, **kwargs)
    except NotAFullClip:
        raise
    except UserError:
        pass  # not in the cache
    error = "offline and not in the Hugging Face cache"
    if not hub.offline():
        try:
            return _checked_load(cls, source, reward, **kwargs)
        except UserError as exc:  # network errors, missing repo, ...
            error = str(exc)
    raise UserError(f"{reward} reward: cannot load '{source}' (config.json / model.safetensors missing: {error}); "
                    f"{hub.download_hint(source, f'pass that DIR with {FLAG}')}")


def _load_tokenizer(sources: Sequence[str], reward: str):
    from transformers import AutoTokenizer

    tried = []
    for source in sources:
        if not source:
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            if any((path / f).is_file() for f in TOKENIZER_FILES):
                return AutoTokenizer.from_pretrained(str(path))
            tried.append(str(path))
            continue
        if looks_like_path(source):
            tried.append(source)
            continue
        # a repository without tokenizer files (config.json and weights only) would give AutoTokenizer an empty
        # vocabulary, every prompt unknown tokens: the next source is taken, as for a folder
        if any(hub_file(source, f, download=not hub.offline()) for f in TOKENIZER_FILES):
            try:
                return AutoTokenizer.from_pretrained(source, local_files_only=True)
            except Exception:
                pass
            if not hub.offline():
                try:
                    return AutoTokenizer.from_pretrained(source)
                except Exception:
                    pass
        tried.append(source)
    raise UserError(f"{reward} reward: no tokenizer files (tokenizer.json or vocab.json + merges.txt) found in "
                    f"{', '.join(tried)}; copy them into the weights directory given by {FLAG}")


def _read_preprocessor(sources: Sequence[str]) -> dict | None:
    for source in sources:
        if not source:
            continue
        path = Path(source).expanduser()
        f = path / "preprocessor_config.json"
        if path.is_dir():
            if f.is_file():
                return json.loads(f.read_text(encoding="utf-8"))
            continue
        if looks_like_path(source):
            continue
        cached = hub_file(source, "preprocessor_config.json")  # the local hub cache only
        if cached is None:
            continue
        try:
            return json.loads(cached.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return None


def _torch_load(path: Path):
    """What the weights file ``path`` holds (tensor_files' rule, memory-mapped where it can be), or one line naming
    the file and the flag."""
    try:
        return read_tensor_file(path)
    except TensorFileError as exc:
        if exc.holds_code:
            raise UserError(f"{path} holds pickled code (it imports a Python object, not only tensors), which is "
                            f"never loaded: pass the released weights file (or a .safetensors copy of it) with "
                            f"{FLAG}") from None
        raise UserError(f"cannot read {path} as a torch checkpoint ({exc.detail}); check the file given by "
                        f"{FLAG}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path} as a torch checkpoint ({type(exc).__name__}"
                        f"{': ' + exc.strerror if exc.strerror else ''}); check the file given by {FLAG}") from exc


# --------------------------------------------------------------------------------------------------
# the rewards
# --------------------------------------------------------------------------------------------------
class _ClipReward(RewardModule):
    """Shared plumbing: a transformers CLIP (full or vision-only), its tokenizer and torch preprocessing."""

    def __init__(self, model, tokenizer, preprocess: ClipPreprocess, checkpointing: bool):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.checkpointing = bool(checkpointing)
        if checkpointing:
            enable_layer_checkpointing(model)

    def _param_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images).to(self._param_dtype())
        model = self.model
        vision = model.vision_model(pixel_values=pixels)
        return model.visual_projection(vision.pooler_output)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        model = self.model
        max_len = min(int(getattr(self.tokenizer, "model_max_length", 77) or 77),
                      model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        device = model.text_projection.weight.device
        out = model.text_model(input_ids=tokens["input_ids"].to(device),
                               attention_mask=tokens["attention_mask"].to(device))
        return model.text_projection(out.pooler_output)

    def cosine(self, images, prompts) -> torch.Tensor:
        img = F.normalize(self.image_embeds(images).float(), dim=-1)
        txt = F.normalize(self.text_embeds(prompts).float(), dim=-1)
        return (img * txt).sum(dim=-1)


class ClipScoreReward(_ClipReward):
    """Cosine similarity between the CLIP image and prompt embeddings (in [-1, 1])."""

    name = "clip"

    def score(self, images, prompts):
        return self.cosine(images, prompts)


class PickScoreReward(_ClipReward):
    """PickScore: ``logit_scale.exp() * cosine(image, prompt)`` (about 15-25 for typical images)."""

    name = "pickscore"

    def score(self, images, prompts):
        return self.model.logit_scale.exp().float() * self.cosine(images, prompts)


class HPSv2Reward(_ClipReward):
    """HPS v2 human preference score: cosine(image, prompt) of the HPS-finetuned ViT-H-14 (about 0.2-0.35)."""

    name = "hpsv2"

    def score(self, images, prompts):
        return self.cosine(images, prompts)


class AestheticHead(torch.nn.Module):
    """The improved-aesthetic-predictor MLP: in -> 1024 -> 128 -> 64 -> 16 -> 1 (dropouts off in eval)."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(in_dim, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


class AestheticReward(_ClipReward):
    """LAION aesthetic predictor v2 (roughly 1-10; most SD images score 4-7)."""

    name = "aesthetic"

    def __init__(self, vision_model, head: AestheticHead, preprocess: ClipPreprocess, checkpointing: bool):
        super().__init__(vision_model, None, preprocess, checkpointing)
        self.head = head

    def score(self, images, prompts):
        emb = F.normalize(self.image_embeds(images).float(), dim=-1)
        head_dtype = self.head.layers[0].weight.dtype
        return self.head(emb.to(head_dtype))[:, 0]


# --------------------------------------------------------------------------------------------------
# builders (called by build_reward)
# --------------------------------------------------------------------------------------------------
def _image_size(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "vision_config", cfg).image_size)


def _build_full_clip(cls, weights: str, default_model: str, default_tokenizer: str, reward: str, checkpointing: bool):
    from transformers import CLIPModel

    source = weights or default_model
    model = _hf_from_pretrained(CLIPModel, source, reward)
    tokenizer = _load_tokenizer([source, default_tokenizer], reward)
    preprocess = ClipPreprocess.from_config(_read_preprocessor([source, default_tokenizer]), _image_size(model))
    return cls(model, tokenizer, preprocess, checkpointing)


def build_clip(weights: str = "", checkpointing: bool = False) -> ClipScoreReward:
    return _build_full_clip(ClipScoreReward, weights, DEFAULT_CLIP, DEFAULT_CLIP, "clip", checkpointing)


def build_pickscore(weights: str = "", checkpointing: bool = False) -> PickScoreReward:
    return _build_full_clip(PickScoreReward, weights, DEFAULT_PICKSCORE, DEFAULT_PICKSCORE_PROCESSOR, "pickscore",
                            checkpointing)


def _head_state(sd: dict) -> dict:
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k.startswith("layers.")}


def _head_candidates(directory: Path) -> list[Path]:
    """The aesthetic head file of ``directory`` (its usual name first), or every file that could be one."""
    exact = directory / AESTHETIC_HEAD_FILE
    if exact.is_file():
        return [exact]
    return [p for ext in ("*.pth", "*.pt", "*.safetensors") for p in sorted(directory.glob(ext))
            if p.name not in HF_WEIGHT_FILES]  # a CLIP model's own weights are not a head


def find_aesthetic_head(weights: str = "") -> tuple[Path, str]:
    """The aesthetic head file and the CLIP model to pair it with ("" for the default) that ``weights`` (the
    reward's reward_weights entry) points at; a UserError naming the fix when there is none. Reads no file: the
    trainer calls it before any model loads."""
    head_spec, _, clip_spec = weights.partition(",")
    head_spec, clip_spec = head_spec.strip(), clip_spec.strip()
    default_dir = reward_cache_dir("aesthetic")
    head_path: Path | None
    candidates: list[Path] = []
    if not head_spec:
        candidates = _head_candidates(default_dir) if default_dir.is_dir() else []
        head_path = candidates[0] if len(candidates) == 1 else None
        where = default_dir
    else:
        p = Path(head_spec).expanduser()
        if p.is_dir():
            candidates = _head_candidates(p)
            head_path, where = (candidates[0] if len(candidates) == 1 else None), p
            if not clip_spec:
                if (p / "clip").is_dir():
                    clip_spec = str(p / "clip")
                elif (p / "config.json").is_file():
                    clip_spec = str(p)
        elif p.is_file():
            head_path, where = p, p.parent
        else:
            raise UserError(f"aesthetic reward: {p} does not exist; point {FLAG} at the directory holding "
                            f"{AESTHETIC_HEAD_FILE} (and optionally clip/) or at that file")
    if head_path is None and len(candidates) > 1:
        raise UserError(f"aesthetic reward: {where} holds several files that could be the head "
                        f"({', '.join(c.name for c in candidates)}): pass the one you mean, "
                        f"{FLAG.replace('PATH', f'{candidates[0]},CLIP_DIR')}")
    if head_path is None:
        clip_here = " (it holds a CLIP model: put the head file beside it)" if (where / "config.json").is_file() else ""
        raise UserError(f"aesthetic reward: missing {AESTHETIC_HEAD_FILE} in {where}{clip_here}; download it from "
                        "https://github.com/christophschuhmann/improved-aesthetic-predictor and put it there, "
                        f"or pass {FLAG} (a directory with the head and clip/, or the head file)")
    return head_path, clip_spec


def check_local_weights(name: str, weights: str = "") -> None:
    """The weight files a model reward needs that no hub provides are where ``weights`` says (the aesthetic head):
    one line before any model loads, not after minutes of loading. Hub-loaded weights are checked when they load."""
    if name == "aesthetic":
        find_aesthetic_head(weights)


def build_aesthetic(weights: str = "", checkpointing: bool = False) -> AestheticReward:
    from transformers import CLIPModel

    head_path, clip_spec = find_aesthetic_head(weights)
    sd = _head_state(_torch_load(head_path))
    if "layers.0.weight" not in sd:
        raise UserError(f"aesthetic reward: {head_path} has no 'layers.0.weight' (not an aesthetic-predictor head); "
                        f"pass the {AESTHETIC_HEAD_FILE} file with {FLAG}")
    head = AestheticHead(sd["layers.0.weight"].shape[1])
    try:
        head.load_state_dict({k: v.float() for k, v in sd.items()})
    except (RuntimeError, AttributeError) as e:  # missing or extra layers, other shapes, a non-tensor value
        raise UserError(f"aesthetic reward: {head_path} is not an aesthetic-predictor head ({first_line(e, 120)}); "
                        f"pass the {AESTHETIC_HEAD_FILE} file with {FLAG}") from None
    # A full CLIPModel is loaded and its text tower dropped: CLIPVisionModelWithProjection.from_pretrained on a
    # CLIPModel directory (transformers 5) ignores the top-level projection_dim and fails on visual_projection.
    model = _hf_from_pretrained(CLIPModel, clip_spec or DEFAULT_CLIP, "aesthetic")
    model.text_model = None
    model.text_projection = None
    if model.visual_projection.out_features != head.layers[0].in_features:
        raise UserError(f"aesthetic reward: the head expects {head.layers[0].in_features}-d CLIP embeddings but the "
                        f"CLIP model gives {model.visual_projection.out_features}; use the matching CLIP (ViT-L/14 "
                        f"for {AESTHETIC_HEAD_FILE})")
    preprocess = ClipPreprocess.from_config(_read_preprocessor([clip_spec or DEFAULT_CLIP]), _image_size(model))
    return AestheticReward(model, head, preprocess, checkpointing)


def _find_hps_file(directory: Path) -> Path | None:
    for name in HPS_FILES:
        if (directory / name).is_file():
            return directory / name
    candidates = [p for ext in ("*.pt", "*.pth", "*.bin", "*.safetensors") for p in sorted(directory.glob(ext))
                  if p.name not in HF_WEIGHT_FILES]  # (open_clip's own releases: open_clip_model.safetensors)
    if len(candidates) > 1:
        raise UserError(f"hpsv2 reward: {directory} holds several files that could be the HPS checkpoint "
                        f"({', '.join(c.name for c in candidates)}): pass the one you mean, "
                        f"{FLAG.replace('PATH', str(candidates[0]))}")
    return candidates[0] if candidates else None


def _hub_hps_file() -> Path | None:
    """HPSv2's checkpoint from the local hub cache (either of its names), else downloaded when the hub is reachable."""
    for name in HPS_FILES[:2]:
        if cached := hub_file(HPS_HUB_REPO, name):
            return cached
    return hub_file(HPS_HUB_REPO, HPS_FILES[0], download=not hub.offline())


def build_hpsv2(weights: str = "", checkpointing: bool = False) -> HPSv2Reward:
    from transformers import CLIPConfig, CLIPModel

    from .openclip_convert import is_open_clip_state_dict, load_open_clip_as_hf, unwrap_checkpoint

    directory: Path | None = None
    if not weights:
        default_dir = reward_cache_dir("hpsv2")
        ckpt = _find_hps_file(default_dir) if default_dir.is_dir() else None
        ckpt = ckpt or _hub_hps_file()
        if ckpt is None:
            raise UserError(f"hpsv2 reward: missing {HPS_FILES[0]} (or {HPS_FILES[1]}) in {default_dir}; download it "
                            f"from the hub repo {HPS_HUB_REPO} and put it there, or pass {FLAG}")
        directory = default_dir if default_dir.is_dir() else None
    else:
        p = Path(weights).expanduser()
        if p.is_dir():
            if _is_hf_model_dir(p):  # a transformers CLIP directory
                return _build_full_clip(HPSv2Reward, str(p), str(p), DEFAULT_HPS_TOKENIZER, "hpsv2", checkpointing)
            ckpt, directory = _find_hps_file(p), p
            if ckpt is None:
                raise UserError(f"hpsv2 reward: missing {HPS_FILES[0]} (or {HPS_FILES[1]}) in {p}; put the HPS "
                                f"checkpoint there or pass the file itself with {FLAG}")
        elif p.is_file():
            ckpt, directory = p, p.parent
        elif looks_like_path(weights):
            raise UserError(f"hpsv2 reward: {p} does not exist; fix the path in {FLAG}")
        else:  # a hub id of a transformers CLIP
            return _build_full_clip(HPSv2Reward, weights, weights, DEFAULT_HPS_TOKENIZER, "hpsv2", checkpointing)
    try:
        sd = unwrap_checkpoint(_torch_load(ckpt))
    except ValueError:
        sd = {}
    if not is_open_clip_state_dict(sd):
        raise UserError(f"hpsv2 reward: {ckpt} is not an open_clip CLIP checkpoint (no visual.conv1.weight); pass "
                        f"{HPS_FILES[0]} or a transformers CLIP directory with {FLAG}")
    config = None
    if directory is not None and (directory / "config.json").is_file():
        config = CLIPConfig.from_pretrained(str(directory))
    else:  # shapes do not tell the number of attention heads
        logging.getLogger("lowmem_alignprop").info(
            "hpsv2 reward: no config.json beside %s: attention heads taken as 64 wide, as in the released ViT-H/14 "
            "HPS v2 weights (for other weights put their CLIPConfig's config.json beside the file)", ckpt)
    model = load_open_clip_as_hf({k: v.float() for k, v in sd.items()}, config)
    assert isinstance(model, CLIPModel)
    sources = [str(directory)] if directory is not None else []
    tokenizer = _load_tokenizer(sources + [DEFAULT_HPS_TOKENIZER], "hpsv2")
    preprocess = ClipPreprocess.from_config(_read_preprocessor(sources), _image_size(model))
    return HPSv2Reward(model, tokenizer, preprocess, checkpointing)

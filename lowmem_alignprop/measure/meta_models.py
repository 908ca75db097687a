"""The planner's models on the ``meta`` device, without weights: the denoiser, VAE and text encoders from their
architecture configs (:func:`meta_components`, built once per model and dtype) and the reward
(:func:`meta_reward`: model rewards from their CLIP architecture)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError, first_line
from lowmem_alignprop.settings.paths import kind_of, looks_like_hub_id, model_index


# Model rewards are CLIP architectures: (vision, text, projection) sizes of the public checkpoints.
_VIT_L14 = dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=224, patch_size=14, hidden_act="quick_gelu"),
                text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          hidden_act="quick_gelu"),
                projection_dim=768)  # openai/clip-vit-large-patch14 (aesthetic, clip)
_VIT_H14 = dict(vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                            image_size=224, patch_size=14, hidden_act="gelu"),
                text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          hidden_act="gelu"),
                projection_dim=1024)  # laion ViT-H-14 (pickscore, hpsv2)
REWARD_ARCH = {"aesthetic": ("ViT-L/14", _VIT_L14), "clip": ("ViT-L/14", _VIT_L14),
               "pickscore": ("ViT-H/14", _VIT_H14), "hpsv2": ("ViT-H/14", _VIT_H14)}


_META_CACHE: dict[tuple, Any] = {}
log = logging.getLogger("lowmem_alignprop")


def _dir_components(root: Path, dtype: torch.dtype) -> dict:
    """unet, vae, text encoder(s) on meta and tokenizer(s), scheduler from a diffusers directory's configs."""
    import diffusers
    import transformers

    index = model_index(root)
    if index is None:
        raise UserError(f"{root} has no readable model_index.json: pass a diffusers model directory")
    from lowmem_alignprop.models.arch import modules_from_configs

    out = modules_from_configs(root, index, device="meta", dtype=dtype)
    for tok in ("tokenizer", "tokenizer_2"):
        if index.get(tok) and index[tok][1]:
            out[tok] = transformers.AutoTokenizer.from_pretrained(root, subfolder=tok)
    sched = getattr(diffusers, index["scheduler"][1])
    out["scheduler"] = sched.from_config(sched.load_config(root, subfolder="scheduler"))
    return out


CONFIG_FILES = ["*.json", "*.txt", "tokenizer*/*"]  # a hub model's configs, scheduler and tokenizers: no weights


def _hub_snapshot(repo: str, use: str = "pass that DIR as --model", revision: str = "") -> Path:
    """The configs of a hub id (:data:`CONFIG_FILES`, a few MB, never weights) at ``revision`` (--set revision: a
    branch, tag or commit; "": main): from the local cache, else fetched from the hub when it can be reached, so a
    laptop plans a model before downloading it; else a UserError (``use``: where its folder goes instead, --model or
    model_components)."""
    from huggingface_hub import snapshot_download

    from lowmem_alignprop.run import hub

    pin = {"revision": revision} if revision else {}
    try:
        root = Path(snapshot_download(repo, local_files_only=True, allow_patterns=CONFIG_FILES, **pin))
        if _has_its_configs(root):
            return root
    except Exception:  # noqa: BLE001 - not in the local cache (or only model_index.json, --profile auto's)
        pass
    instead = "or use --model sd15|sd21|sdxl|sd35m|sd35l|flux for its architecture, or a local diffusers directory"
    if hub.offline():  # (a pinned one: into the hub cache, as a --local-dir folder takes no revision)
        at, fetch = ((f" at revision {revision}", f"on a machine with network run `hf download {repo} --revision "
                      f"{revision}` (into the hub cache; copy that cache here), then run again") if revision else
                     ("", hub.download_hint(repo, use)))
        raise UserError(f"plan needs the architecture of {repo!r}{at}: it is not in the local Hugging Face cache and "
                        f"the hub cannot be reached; {fetch}, {instead}")
    log.info("plan: fetching the configs of %s (json and tokenizer files, no weights)", repo)
    try:
        return Path(snapshot_download(repo, allow_patterns=CONFIG_FILES, **pin))
    except Exception as e:  # noqa: BLE001 - no such repository, gated, a failed request
        raise UserError(f"plan needs the architecture of {repo!r} and could not fetch its configs ({first_line(e, 160)}"
                        f"); a gated model (FLUX.1-dev, SD3.5) needs its license accepted on the hub and `hf auth "
                        f"login`; {instead}") from None


def _has_its_configs(root: Path) -> bool:
    """A snapshot holds model_index.json and a non-empty folder for each component it names (a cache may hold
    model_index.json alone: --profile auto fetched it)."""
    index = model_index(root)
    return index is not None and all(
        (root / name).is_dir() and any((root / name).iterdir())
        for name, spec in index.items() if not name.startswith("_") and isinstance(spec, list) and spec[0])


def _hub_config_dir(repo: str, revision: str = "") -> Path:
    from lowmem_alignprop.models.model_check import check_model_dir

    root = _hub_snapshot(repo, revision=revision)
    check_model_dir(root, repo)  # the cached configs of a complete SD model
    return root


def meta_components(cfg: Config, dtype: torch.dtype):
    """The model of ``cfg.model`` on meta (no weights), as :class:`~lowmem_alignprop.models.loading.Components`.

    Built once per (model, dtype) (:func:`meta_base`); each call returns fresh deep copies of the modules, because
    the memory features modify them in place."""
    base = meta_base(cfg, dtype)
    fresh = copy.copy(base)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(base, name)
        if module is not None:
            setattr(fresh, name, copy.deepcopy(module))
    fresh.scheduler = copy.deepcopy(base.scheduler)
    return fresh


def meta_base(cfg: Config, dtype: torch.dtype):
    """The cached meta model of ``cfg.model`` in ``dtype``, built on first use. Shared: read it, never modify it
    (:func:`meta_components` gives copies to modify)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from lowmem_alignprop.models.loading import Components, is_flow_source, resolve_model

    key = (cfg.model, cfg.model_arch, getattr(cfg, "vae", ""), dtype, cfg.model_components, cfg.t5_encoder,
           getattr(cfg, "revision", ""), getattr(cfg, "components_revision", ""))
    kind, where = resolve_model(cfg.model)
    if key not in _META_CACHE and is_flow_source(cfg, kind, where):
        _META_CACHE[key] = _flow_meta_components(cfg, kind, where, dtype)  # SD3/FLUX: a transformer
    if key not in _META_CACHE:
        if kind == "tiny":
            from lowmem_alignprop.models.tiny import tiny_model_dir
            parts, source = _dir_components(tiny_model_dir(), dtype), "tiny (built-in)"
        elif kind in ("arch", "file"):
            from lowmem_alignprop.models.arch import build_random_components, detect_arch
            arch = where if kind == "arch" else (cfg.model_arch if cfg.model_arch != "auto" else detect_arch(where))
            parts, source = build_random_components(arch, device="meta", dtype=dtype), f"{arch} architecture"
        elif kind == "dir":
            parts, source = _dir_components(Path(where), dtype), where
        else:
            parts = _dir_components(_hub_config_dir(where, getattr(cfg, "revision", "")), dtype)
            source = f"{where} (configs from the HF cache)"
        is_sdxl = parts.get("text_encoder_2") is not None
        comps = Components(**{k: v for k, v in parts.items() if k in Components.__dataclass_fields__},
                           is_sdxl=is_sdxl, source=source,
                           pipeline_class=StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline)
        from lowmem_alignprop.models.sampling import ddim_scheduler
        comps.scheduler = ddim_scheduler(comps.scheduler.config)
        if getattr(cfg, "vae", ""):
            comps.vae = _meta_vae_override(cfg.vae, comps.vae, dtype)
        _META_CACHE[key] = comps
    return _META_CACHE[key]


def denoiser_differs(cfg: Config, saved: dict[str, Any]) -> bool:
    """Whether ``cfg.model``'s denoiser has another architecture than the one of a checkpoint's config ``saved``, told
    from their configs alone (both built on meta the same way, so a loader's own additions cancel): a resume with
    another model is refused in seconds, not after the load. False where it cannot be told so (a hub id, a single
    file, a path gone): the weights' fingerprint after the load decides."""
    import dataclasses

    from lowmem_alignprop.run.base_fingerprint import config_sha
    from lowmem_alignprop.models.loading import resolve_model

    theirs = dataclasses.replace(cfg, **{k: saved[k] for k in ("model", "model_arch", "model_components", "t5_encoder")
                                          if k in saved})
    shas = []
    for c in (cfg, theirs):
        try:
            if resolve_model(c.model)[0] not in ("tiny", "arch", "flow_arch", "dir", "flow_dir"):
                return False
            shas.append(config_sha(meta_base(c, torch.float32).unet))
        except Exception:  # noqa: BLE001 - whatever the configs alone cannot tell, the load will
            return False
    return shas[0] != shas[1]


def _flow_meta_components(cfg: Config, kind: str, where: str, dtype: torch.dtype):
    """SD3/FLUX on meta: a shipped architecture, a model folder's configs, or (a single-file transformer) the
    configs of its ``model_components`` folder."""
    from lowmem_alignprop.models import flow_loading as fl
    from lowmem_alignprop.models.loading import flow_components

    if kind == "flow_arch":
        pipe = fl.build_flow_components(where, device="meta", dtype=dtype, t5=cfg.t5_encoder)
    else:
        root = Path(where if kind == "flow_dir" else cfg.model_components).expanduser()
        if kind == "hub" and not cfg.model_components:
            root = _hub_snapshot(where, revision=getattr(cfg, "revision", ""))
        elif kind != "flow_dir" and kind_of(root) == "missing" and looks_like_hub_id(cfg.model_components):
            root = _hub_snapshot(cfg.model_components, "pass --set model_components=DIR",  # a hub id's configs
                                 getattr(cfg, "components_revision", ""))
        # a single file: the folder's config as the loader reads it (FLUX: dev or schnell as the file's keys say)
        config = fl.single_file_transformer(where, cfg.model_components, root)[1] if kind == "file" else None
        pipe = fl.flow_pipeline_from_configs(root, device="meta", dtype=dtype, t5=cfg.t5_encoder,
                                             transformer_config=config)
    comps = flow_components(pipe, cfg, f"{where} (configs only)", dtype, meta=True)
    if getattr(cfg, "vae", ""):
        comps.vae = _meta_vae_override(cfg.vae, comps.vae, dtype)
    return comps


def _meta_vae_override(spec: str, vae, dtype: torch.dtype):
    """``--set vae=...``: a local folder's config on meta; otherwise (hub id, single file) the model's own VAE
    architecture with force_upcast off (what an fp16-fix VAE such as madebyollin/sdxl-vae-fp16-fix is)."""
    import diffusers

    from lowmem_alignprop.models.arch import default_dtype

    p = Path(spec).expanduser()
    for folder in (p, p / "vae"):
        if (folder / "config.json").is_file():
            with torch.device("meta"), default_dtype(dtype):
                new = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(folder))
            return new.requires_grad_(False).eval()
    vae.register_to_config(force_upcast=False)
    return vae


def _clip_config_for(name: str, weights: str):
    """The CLIPConfig of a model reward, read where training reads it: a local weights directory (or its clip/), the
    config.json beside an hpsv2 checkpoint file, a hub id's config.json (the local hub cache, else fetched when the
    hub can be reached; never its weights); else the public architecture (ViT-L/14 for aesthetic/clip, ViT-H/14 for
    pickscore/hpsv2)."""
    from transformers import CLIPConfig

    from lowmem_alignprop.rewards.clip_rewards import looks_like_path
    from lowmem_alignprop.run import hub
    from lowmem_alignprop.settings.hub_access import hub_file

    candidates: list[tuple[Path, str, Path | None]] = []  # (config.json, how the note names it, tokenizer folder)
    for part in filter(None, (x.strip() for x in (weights or "").split(","))):
        p = Path(part).expanduser()
        if p.is_dir():
            candidates += [(c / "config.json", str(c / "config.json"), c) for c in (p / "clip", p)]
        elif p.is_file() and name == "hpsv2":  # build_hpsv2 reads the CLIPConfig beside its checkpoint
            candidates.append((p.parent / "config.json", str(p.parent / "config.json"), p.parent))
        elif not p.exists() and not looks_like_path(part):
            if (cached := hub_file(part, "config.json", download=not hub.offline())) is not None:
                candidates.append((cached, f"{part}'s config.json", None))
    for file, label, directory in candidates:
        if file.is_file():
            try:
                return CLIPConfig.from_pretrained(str(file)), f"{name}: CLIP from {label}", directory
            except Exception:  # noqa: BLE001 - not a CLIPConfig: fall back to the public architecture
                continue
    label, arch = REWARD_ARCH[name]
    config = CLIPConfig(text_config=arch["text"], vision_config=arch["vision"], projection_dim=arch["projection_dim"])
    return config, f"{name}: CLIP {label} built from config (random weights on meta)", None


def _clip_tokenizer(directory: Path | None):
    if directory is not None and any((directory / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(directory))
    from transformers import CLIPTokenizer

    from lowmem_alignprop.models.arch import clip_bpe
    vocab, merges = clip_bpe()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=77)


def _model_reward_on_meta(name: str, weights: str, checkpointing: bool, notes: list[str]):
    from transformers import CLIPModel

    from lowmem_alignprop.rewards import clip_rewards as cr

    config, note, directory = _clip_config_for(name, weights)
    notes.append(note)
    with torch.device("meta"):
        model = CLIPModel(config)
    preprocess = cr.ClipPreprocess(config.vision_config.image_size, config.vision_config.image_size)
    if name == "aesthetic":
        model.text_model = None  # as build_aesthetic: the text tower is dropped
        model.text_projection = None
        with torch.device("meta"):
            head = cr.AestheticHead(config.projection_dim)
        return cr.AestheticReward(model, head, preprocess, checkpointing)
    cls = {"clip": cr.ClipScoreReward, "pickscore": cr.PickScoreReward, "hpsv2": cr.HPSv2Reward}[name]
    return cls(model, _clip_tokenizer(directory), preprocess, checkpointing)


def meta_reward(cfg: Config, dtype: torch.dtype, notes: list[str]):
    """The reward of ``cfg.reward`` on meta, through the trainer's own :func:`~lowmem_alignprop.rewards.build_reward`:
    weight-free and user rewards as the trainer builds them, model rewards from their CLIP architecture (random
    weights, nothing loaded)."""
    from lowmem_alignprop import rewards as R

    class MetaRewards(R.RewardBuilder):
        def model(self, name: str, *, weights: str, checkpointing: bool):
            _check_weights_exist(name, weights)  # a mistyped path fails here as in training, not as a default plan
            return _model_reward_on_meta(name, weights, checkpointing, notes)

        def user(self, term: str, options: dict):
            module = super().user(term, options)
            notes.append(f"reward {term}: user reward built with device='meta'")
            return module

    return R.build_reward(cfg.reward, device="meta", dtype=dtype, checkpointing=cfg.reward_checkpointing,
                          weights=cfg.reward_weights, builder=MetaRewards())


def _check_weights_exist(name: str, weights: str) -> None:
    """A model reward's local weights path that does not exist: the UserError training would give."""
    from lowmem_alignprop.rewards.clip_rewards import FLAG, looks_like_path

    for part in filter(None, (x.strip() for x in weights.split(","))):
        path = Path(part).expanduser()
        local = looks_like_path(part) or path.parent.is_dir() and str(path.parent) != "."  # w/x with w/ here
        if local and not path.exists():
            raise UserError(f"{name} reward: {part} does not exist; fix the path in {FLAG}")

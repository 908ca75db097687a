"""The layers a run keeps as its --init-lora had them (``<run>/init_lora/kept_layers.safetensors``: text encoders,
convolutions, linears the run does not train), written back into every LoRA the run writes, so that one
``pipe.load_lora_weights(folder)`` gives base + kept + trained.

The file's keys are diffusers' (``unet.<path>.lora_A.weight``, ``text_encoder.<path>.lora_B.weight``, SDXL's
``text_encoder_2.``; an SD3/FLUX run's ``transformer.<path>``, its linears and SD3's patch embedding, and its CLIP
encoders' under the same names as SD's), each layer's scale folded into
lora_B: loaded with alpha = rank (scale 1). In a run's LoRA file they sit beside the trained layers; the header's
adapter config says so per layer (``rank_pattern`` and ``alpha_pattern`` keys ``^<path>``, alpha = that layer's
rank), which is also how :func:`split_kept` tells them from the trained ones when a command reads the file back."""

from __future__ import annotations

import collections
from pathlib import Path

import torch

ENCODERS = ("text_encoder", "text_encoder_2")
TEXT_MODEL = "text_model."  # CLIP's level that transformers 5's CLIPTextModel lacks (CLIPTextModelWithProjection has)
EITHER_TEXT_MODEL = r"(text_model\.)?"  # (a kept text-encoder layer's pattern: its path under transformers 4 or 5)


def canonical_key(key: str) -> str:
    """A kept layer's key as files name it whatever transformers made the model: a text encoder's with CLIP's
    ``text_model.`` (``text_encoder.text_model.encoder.layers.0...``: what transformers 4, diffusers' own files and
    ComfyUI's diffusers-LoRA names read; diffusers with transformers 5 strips it), the UNet's as they are."""
    component, _, name = key.partition(".")
    if component in ENCODERS and not name.startswith(TEXT_MODEL):
        return f"{component}.{TEXT_MODEL}{name}"
    return key


def read_kept(run: Path | None, *, folder: Path | None = None) -> dict[str, torch.Tensor]:
    """The run's kept layers, from its init_lora/ (or ``folder``'s copy: a checkpoint's); {} when it kept none or
    ``run`` is None."""
    from safetensors.torch import load_file

    from lowmem_alignprop.run.filenames import INIT_LORA_DIR, KEPT_LAYERS_NAME

    where = folder if folder is not None else None if run is None else Path(run) / INIT_LORA_DIR
    file = None if where is None else Path(where) / KEPT_LAYERS_NAME
    return load_file(str(file)) if file is not None and file.is_file() else {}


def write_kept(kept: dict[str, torch.Tensor], folder: Path) -> None:
    """``folder``/kept_layers.safetensors (a run's init_lora/, being written): the layers kept as they came, what
    diffusers' ``load_lora_weights`` of the file alone adds (alpha = rank: each scale is in B); nothing where none
    is kept."""
    from safetensors.torch import save_file

    from lowmem_alignprop.run.filenames import KEPT_LAYERS_NAME
    if kept:
        save_file(kept, str(Path(folder) / KEPT_LAYERS_NAME), metadata={"format": "pt"})


def by_component(kept: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``kept`` split by pipeline component, each part's keys without the component's prefix (peft's names; a text
    encoder's with ``text_model.``, :func:`canonical_key`: also a kept file written before it was)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in kept.items():
        component, _, name = canonical_key(key).partition(".")
        parts.setdefault(component, {})[name] = value
    return parts


def layer_ranks(layers: dict[str, torch.Tensor]) -> dict[str, int]:
    """Each layer's module path (``down_blocks.0.resnets.0.conv1``) and rank (its lora_A's first dimension)."""
    return {k[: -len(".lora_A.weight")]: v.shape[0] for k, v in layers.items() if k.endswith(".lora_A.weight")}


def with_kept_layers(config: dict | None, layers: dict[str, torch.Tensor]) -> dict:
    """``config`` (an adapter config as diffusers writes it in the header; None: a text encoder's kept layers alone)
    with ``layers`` added: each its own target, rank and alpha = rank (its scale is folded into lora_B). A text
    encoder's layer is named as the module is under transformers 4 or 5 (``text_model.`` or not, which diffusers'
    loader does not rewrite in the config): its target without it (peft matches a target by its end), its patterns
    ``^`` + :data:`EITHER_TEXT_MODEL` + its path."""
    ranks = layer_ranks(layers)
    if config is None:
        common = collections.Counter(ranks.values()).most_common(1)[0][0]
        config = {"r": common, "lora_alpha": common, "target_modules": []}
        ranks = {m.removeprefix(TEXT_MODEL): r for m, r in ranks.items()}
        patterns = {f"^{EITHER_TEXT_MODEL}{m}": r for m, r in ranks.items()}
    else:
        patterns = {f"^{m}": r for m, r in ranks.items()}
    out = dict(config)
    out["target_modules"] = sorted(set(out.get("target_modules") or []) | set(ranks))
    out["rank_pattern"] = {**(out.get("rank_pattern") or {}), **patterns}
    out["alpha_pattern"] = {**(out.get("alpha_pattern") or {}), **patterns}
    return out


def marked_kept(config: dict) -> set[str]:
    """The module paths ``config`` marks as kept layers (:func:`with_kept_layers`: a ``^<path>`` key in both
    ``rank_pattern`` and ``alpha_pattern``, alpha = rank; a text encoder's without ``text_model.``). Another tool's
    patterns (alpha != rank) mark none."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    return {_path(k) for k, r in ranks.items() if k.startswith("^") and k in alphas and alphas[k] == r}


def _path(pattern: str) -> str:
    return pattern[1:].removeprefix(EITHER_TEXT_MODEL).removeprefix(TEXT_MODEL)


def split_kept(component: str, weights: dict, config: dict) -> tuple[dict, dict, dict]:
    """A LoRA file's ``component`` layers (peft names) and adapter config split into the trained ones and the kept
    ones (:func:`with_kept_layers`' ``^`` patterns): (trained weights, their config as the run wrote it, kept weights
    as ``component.<name>``)."""
    kept = marked_kept(config)
    if not kept:
        return weights, config, {}
    trained_config = dict(config)
    trained_config["target_modules"] = [t for t in config.get("target_modules") or [] if t not in kept]
    for pattern in ("rank_pattern", "alpha_pattern"):
        trained_config[pattern] = {k: v for k, v in config[pattern].items() if _path(k) not in kept}
    is_kept = {k: k.rsplit(".lora_", 1)[0].removeprefix(TEXT_MODEL) in kept for k in weights}
    return ({k: v for k, v in weights.items() if not is_kept[k]}, trained_config,
            {f"{component}.{k}": v for k, v in weights.items() if is_kept[k]})


def as_layout_of(trained: dict, layers: dict) -> dict:
    """``layers`` (peft's ``lora_A``/``lora_B`` names) in the key layout of ``trained``: diffusers' older
    ``lora.down``/``lora.up`` where the trained UNet layers have it (diffusers converts a component's keys by its first
    key's layout: a file that mixed the two would load half its layers)."""
    if not any(".lora.down." in k for k in trained):
        return layers
    return {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in layers.items()}


def save_with_kept(pipeline_class, folder, layers: dict, metadata: dict, kept: dict[str, torch.Tensor],
                   denoiser: str = "unet") -> None:
    """A LoRA of the ``denoiser`` (unet or transformer; ``layers``: diffusers' names, ``metadata``: the trained
    adapter's config) written by ``pipeline_class.save_lora_weights`` into ``folder`` with the run's ``kept`` layers
    (:func:`read_kept`)."""
    parts = by_component(kept)
    unknown = sorted(set(parts) - {denoiser, *ENCODERS})
    if unknown:
        raise ValueError(f"kept layers of an unknown component {unknown[0]!r}")
    kwargs = {}
    if parts.get(denoiser):  # in the trained layers' names (diffusers reads one layout per component, by its 1st key)
        layers = {**layers, **as_layout_of(layers, parts[denoiser])}
        metadata = with_kept_layers(metadata, parts[denoiser])
    for encoder in ENCODERS:
        if parts.get(encoder):  # its own config: else diffusers reads the UNet's header as {} (peft's r=8 default)
            kwargs[f"{encoder}_lora_layers"] = parts[encoder]
            kwargs[f"{encoder}_lora_adapter_metadata"] = with_kept_layers(None, parts[encoder])
    pipeline_class.save_lora_weights(str(folder), **{f"{denoiser}_lora_layers": layers,
                                                     f"{denoiser}_lora_adapter_metadata": metadata}, **kwargs)


def kept_counts(kept: dict[str, torch.Tensor]) -> dict[str, int]:
    """``kept``'s layers counted by kind (summary.json's ``kept_layers``): ``text_encoder``, ``text_encoder_2``
    (SDXL's and SD3's second CLIP, CLIP-G), ``convolutions`` and ``other_linears`` (the UNet's or transformer's
    linears the run does not train), each kind present or not."""
    count = dict.fromkeys(("text_encoder", "text_encoder_2", "convolutions", "other_linears"), 0)
    for key, value in kept.items():
        if key.endswith(".lora_A.weight"):
            component = key.split(".", 1)[0]
            count[component if component in ENCODERS else "convolutions" if value.ndim == 4 else "other_linears"] += 1
    return count


def layer_count(kept: dict[str, torch.Tensor]) -> int:
    """How many layers ``kept`` holds: an A and a B each."""
    return len(kept) // 2


def kept_total(kept: dict[str, torch.Tensor]) -> str:
    """How many layers ``kept`` holds (:func:`layer_count`), as a card, a header or a log line says it: "3 layers",
    "1 layer"."""
    n = layer_count(kept)
    return f"{n} layer{'s' if n != 1 else ''}"


def them(n: int) -> str:
    """The pronoun a line says ``n`` kept layers again with ("1 layer ... had it", "3 layers ... had them")."""
    return "it" if n == 1 else "them"


def kept_header(kept: dict[str, torch.Tensor]) -> str:
    """The kohya header's words for ``kept`` (its training comment's and ``alignprop_kept_layers``): "3 layers kept
    as its --init-lora had them: 1 text-encoder layer, 2 convolutions", "1 layer kept as its --init-lora had it:
    ..."."""
    return f"{kept_total(kept)} kept as its --init-lora had {them(layer_count(kept))}: {', '.join(kept_kinds(kept))}"


def kept_kinds(kept: dict[str, torch.Tensor]) -> list[str]:
    """``kept``'s layers counted by kind, as a card or a header says them: ["2 text-encoder layers (1 of
    text_encoder_2)", "3 convolutions", "1 other UNet linear"] (an SD3/FLUX run's: "4 other transformer linears"),
    the kinds it has."""
    count = kept_counts(kept)
    denoiser = "transformer" if any(k.startswith("transformer.") for k in kept) else "UNet"
    out = []
    if n := count["text_encoder"] + count["text_encoder_2"]:
        second = f" ({count['text_encoder_2']} of text_encoder_2)" if count["text_encoder_2"] else ""
        out.append(f"{n} text-encoder layer{'s' if n != 1 else ''}{second}")
    if n := count["convolutions"]:
        out.append(f"{n} convolution{'s' if n != 1 else ''}")
    if n := count["other_linears"]:
        out.append(f"{n} other {denoiser} linear{'s' if n != 1 else ''}")
    return out

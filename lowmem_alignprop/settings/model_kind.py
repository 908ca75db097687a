"""What kind of model a --model value is (sd, sdxl, sd35m, sd35l, flux), read from its files before anything loads:
the one rule for the profile ``--profile auto`` picks and for the checks that depend on the family (a negative
prompt on FLUX.1)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.hub_access import hub_file
from lowmem_alignprop.settings.image_size import image_sides, nearest_multiples, resolution_of
from lowmem_alignprop.settings.paths import model_index

ARCH_FLOW_DIR = Path(__file__).resolve().parents[1] / "arch_flow"  # the shipped sd35m, sd35l, flux configs
# --model toy: the toy world's pretrained SD-shaped model that ships with the package (docs/toy_world.md), a plain
# diffusers directory (fp16 on disk; loaded in the run's dtype like any other)
TOY_MODEL_DIR = Path(__file__).resolve().parents[1] / "toy" / "weights" / "model"


def shipped_name(model: str) -> str:
    """``model`` as the shipped name it loads (the toy model's own folder, however written, is ``toy``: its
    sampling defaults and run records go with it), else as given."""
    try:
        return "toy" if model and Path(model).expanduser().resolve() == TOY_MODEL_DIR else model
    except (OSError, RuntimeError, ValueError):  # unreadable, a symlink loop, a NUL: not the toy model's folder
        return model


def sd3_kind(num_layers: int) -> str:
    """SD3.5 Large has 38 transformer layers, Medium 24 (an SD3-shaped model of fewer counts as Medium)."""
    return "sd35l" if num_layers >= 38 else "sd35m"


# the one table from a model_index.json's pipeline class to its family (models/flow_loading reads the flow ones)
PIPELINE_FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "FluxPipeline": "flux",
                     "StableDiffusion3Pipeline": "sd3"}  # sd3: Medium or Large by its transformer (sd3_kind)
FLOW_FAMILIES = ("sd3", "flux")  # flow-matching transformers (models/flow.py), not UNets
KIND_FAMILY = {"sd": "unet", "sdxl": "unet", "sd35m": "sd3", "sd35l": "sd3", "flux": "flux"}  # a kind's denoiser
FLOW_KINDS = tuple(k for k, family in KIND_FAMILY.items() if family in FLOW_FAMILIES)  # also the flow architectures
SD3_KINDS = tuple(k for k, family in KIND_FAMILY.items() if family == "sd3")  # the ones that can leave T5 out

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")  # a --model file: a checkpoint of the whole model
NAMED_KINDS = {"toy": "sd", "tiny": "sd", "sd15": "sd", "sd21": "sd", "sdxl": "sdxl", "sd35m": "sd35m",
                "sd35l": "sd35l", "flux": "flux"}


def denoiser_component(flow: bool) -> str:
    """The denoiser's pipeline component and its keys' prefix in diffusers' layout (also the module name the
    estimates and the profiler list): ``transformer`` for SD3/FLUX (``flow``), else ``unet``."""
    return "transformer" if flow else "unet"


def denoiser_label(flow: bool) -> str:
    """The denoiser as a sentence names it: ``transformer`` for SD3/FLUX (``flow``), else ``UNet``."""
    return "transformer" if flow else "UNet"


def sampler_name(flow: bool) -> str:
    """The sampler a run of the family steps with: ``Euler`` (flow matching, SD3/FLUX) or ``DDIM`` (UNets)."""
    return "Euler" if flow else "DDIM"


def model_kind_of(model: str, components: str = "", *, download: bool = False, revision: str = "") -> str | None:
    """The kind of a --model value: the named models; a diffusers folder by its model_index.json (SD3 Medium or Large
    by transformer/config.json); a hub id by the same files from the local hub cache or, with ``download``, from the
    hub (a few hundred bytes; the model's own download follows); a single transformer file by its
    ``components`` folder (model_components). None when only loading tells (an SD single file, a hub id out of
    reach, another pipeline). ``revision``: the hub id's branch, tag or commit ("": main)."""
    return _kind_and_folder(model, components, download, revision)[0]


def _kind_and_folder(model: str, components: str, download: bool, revision: str = "") -> tuple[str | None, str]:
    """(the kind, the folder (or hub id) whose files told it: the shipped architecture's, the model's or
    model_components')."""
    if model in NAMED_KINDS:
        return NAMED_KINDS[model], str(ARCH_FLOW_DIR / model)  # (the flow ones' configs: sd35m, sd35l, flux)
    if not model:  # an empty field is no folder (Path("") is the working directory)
        return None, ""
    kind = _kind_of_folder(model, download, revision)
    if kind is not None or not components:
        return kind, model
    return _kind_of_folder(components, download), components


def _kind_of_folder(model: str, download: bool, revision: str = "") -> str | None:
    index = _model_file(model, "model_index.json", download, revision)
    kind = PIPELINE_FAMILIES.get((model_index(index.parent) or {}).get("_class_name")) if index else None
    if kind != "sd3":
        return kind
    config = _model_file(model, "transformer/config.json", download, revision)
    try:
        return sd3_kind(int(json.loads(config.read_text(encoding="utf-8"))["num_layers"]))
    except (AttributeError, OSError, ValueError, KeyError, TypeError):  # AttributeError: no such file (None)
        return None


def _model_file(model: str, name: str, download: bool, revision: str = "") -> Path | None:
    """File ``name`` of a --model value's diffusers folder: in the folder itself, or for a hub id in its hub cache
    snapshot (hub_access.hub_file); None for a hub id that gives none."""
    path = Path(model).expanduser()
    if path.exists() or "/" not in model:
        return path / name
    return hub_file(model, name, download=download, revision=revision)


def flow_geometry(model: str, components: str = "") -> tuple[str, int, int | None] | None:
    """An SD3/FLUX model's (family, the multiple its resolution must be, its largest resolution or None) from its
    config files, before anything loads: the shipped sd35m/sd35l/flux, a folder, a transformer file's
    model_components, a hub id in the local hub cache. None: not a flow model, or its files do not tell (the
    trainer checks the loaded model: models/family.check_supported)."""
    kind, folder = _kind_and_folder(model, components, False)
    if kind not in FLOW_KINDS:
        return None
    try:
        transformer, vae = (json.loads(_model_file(folder, name, False).read_text(encoding="utf-8"))
                            for name in ("transformer/config.json", "vae/config.json"))
        return ("flux" if kind == "flux" else "sd3", *flow_geometry_of(kind == "flux", transformer, vae))
    except (AttributeError, OSError, ValueError, KeyError, TypeError):  # AttributeError: no such file (None)
        return None


def _from_transformer_config(model: str, components: str, read: Callable[[dict], int]) -> int | None:
    """``read`` of an SD3/FLUX model's transformer config before anything loads, as :func:`flow_geometry` finds it;
    None for other models and where the files do not tell (a hub id out of the local cache, a config without it)."""
    kind, folder = _kind_and_folder(model, components, False)
    if kind not in FLOW_KINDS:
        return None
    try:
        return read(json.loads(_model_file(folder, "transformer/config.json", False).read_text(encoding="utf-8")))
    except (AttributeError, OSError, ValueError, KeyError, TypeError):  # AttributeError: no such file (None)
        return None


def flow_width(model: str, components: str = "") -> int | None:
    """An SD3/FLUX model's transformer width (its attention heads times their width: what every attention
    projection reads) from its config before anything loads; None where the files do not tell."""
    return _from_transformer_config(model, components,
                                    lambda c: int(c["num_attention_heads"]) * int(c["attention_head_dim"]))


def flow_block_count(model: str) -> int | None:
    """How many blocks an SD3/FLUX model's transformer has (its joint blocks, and FLUX's single ones: what block
    swap takes), from its config before anything loads: the shipped sd35m/sd35l/flux, a folder, a hub id in the
    local hub cache. None for other models and for a transformer file (its own header tells; the loader checks)."""
    return _from_transformer_config(model, "", lambda c: int(c["num_layers"]) + int(c.get("num_single_layers") or 0))


def check_block_swap(n: int, model: str) -> None:
    """One line when block_swap asks for more blocks than the model has: before it loads where its files tell (an
    SD3/FLUX model), else when block swap is installed (memory/block_swap.install says the same)."""
    total = flow_block_count(model)
    if total is not None and n > total:
        raise UserError(too_many_blocks(n, total))


def too_many_blocks(n: int, total: int) -> str:
    return f"block_swap={n} but the model has {total} blocks: use --set block_swap={total} or fewer"


def flow_geometry_of(is_flux: bool, transformer: dict, vae: dict) -> tuple[int, int | None]:
    """(the multiple, the largest resolution or None) from a flow model's transformer and VAE configs: a token is a
    patch of latents (SD3: patch_size x patch_size; FLUX.1 packs 2x2) and a latent is the VAE's 2^(blocks-1) pixels;
    SD3's position embeddings reach pos_embed_max_size patches a side (SD3.5 Large: 3072 px; FLUX.1: no limit)."""
    scale = vae_scale(vae)
    patch = 2 if is_flux else int(transformer.get("patch_size") or 2)
    reach = None if is_flux else transformer.get("pos_embed_max_size")
    return scale * patch, int(reach) * patch * scale if reach else None


def vae_scale(vae_config) -> int:
    """Pixels per latent a side: the VAE halves the image at each block but its last (8 for every real model)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def check_flow_resolution(resolution: int | str, geometry: tuple[str, int, int | None]) -> None:
    """One line when ``resolution`` (N, or "WxH") does not suit an SD3/FLUX model (flow_geometry): each side a multiple
    of its token's pixels, and within SD3's position embeddings; before the model loads where the files tell, else
    before the first step."""
    family, multiple, largest = geometry
    name = "FLUX.1" if family == "flux" else "SD3/SD3.5"
    width, height = image_sides(resolution)
    if width % multiple or height % multiple:
        below, above = nearest_multiples(resolution, multiple)
        if width == height:  # (the multiples either side, as it was said)
            above = int(below) + multiple
        each = "" if width == height else " on each side"
        raise UserError(f"resolution={resolution} is not a multiple of {multiple}{each}: a token of this {name} "
                        f"model's transformer covers {multiple}x{multiple} pixels: use --set resolution={below} or "
                        f"{above}")
    if largest and max(width, height) > largest:
        fits = resolution_of(min(width, largest), min(height, largest))
        raise UserError(f"resolution={resolution} is larger than this {name} model's position embeddings reach "
                        f"({largest} px a side): use --set resolution={fits} or less")

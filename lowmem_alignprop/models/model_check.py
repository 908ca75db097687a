"""Is this a complete text-to-image Stable Diffusion model? Checked from the JSON files of a diffusers folder
before anything loads (train, sample and plan alike), and again on the loaded configs for hub ids and single
files. Each problem is one line naming the part that is wrong and what to pass instead."""

from __future__ import annotations

import json
from pathlib import Path

from lowmem_alignprop.settings.errors import UserError

SUPPORTED = "supported are text-to-image SD 1.x, SD 2.x and SDXL models"
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
OPTIONAL = ("text_encoder_2", "tokenizer_2")  # SDXL
CONFIG_FILE = {"scheduler": ("scheduler_config.json",), "tokenizer": ("tokenizer.json", "vocab.json"),
               "tokenizer_2": ("tokenizer.json", "vocab.json")}  # every other part: config.json


def _listed(index: dict, part: str) -> bool:
    entry = index.get(part)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and entry[1] is not None


def _read_json(path: Path, spec: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}): {spec} is damaged; copy the model folder again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object: {spec} is damaged; copy the model folder again")
    return data


def check_model_dir(path: Path, spec: str) -> None:
    """Raise UserError unless ``path`` is a diffusers folder of a complete SD 1.x/2.x/SDXL text-to-image model."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UserError(f"{spec} is a directory but not a diffusers model (no model_index.json): pass the folder "
                        "that `save_pretrained` wrote, or a single .safetensors/.ckpt file")
    index = _read_json(index_file, spec)
    kind = index.get("_class_name", "pipeline of unknown type")
    missing = [p for p in REQUIRED if not _listed(index, p)]
    if missing:  # (an SDXL refiner is a Stable Diffusion model, but an image-to-image one: said so)
        what = ("an image-to-image model (an SDXL refiner has this layout), not a text-to-image one" if "Img2Img" in
                str(kind) else "not a Stable Diffusion model")
        raise UserError(f"{spec} holds a {kind}, {what} (it has no {', '.join(missing)}): {SUPPORTED}")
    for part in REQUIRED + tuple(p for p in OPTIONAL if _listed(index, p)):
        folder = check_part_folder(path, part, spec)
        names = CONFIG_FILE.get(part, ("config.json",))
        if not any((folder / n).is_file() for n in names):
            raise UserError(f"{spec} is incomplete: {folder} has no {' or '.join(names)}; copy the whole model "
                            "folder (every subfolder)")
    unet = _read_json(path / "unet" / "config.json", spec)
    vae = _read_json(path / "vae" / "config.json", spec)
    widths = [_read_json(path / te / "config.json", spec).get("hidden_size")
              for te in ("text_encoder", "text_encoder_2") if _listed(index, te)]
    check_compatible(unet, vae, widths, spec)


def check_part_folder(path: Path, part: str, spec: str) -> Path:
    """The folder of a component the model_index.json lists, or UserError: it is missing."""
    folder = path / part
    if not folder.is_dir():
        raise UserError(f"{spec} is incomplete: its model_index.json lists {part} but the {part}/ folder is "
                        "missing; copy the whole model folder (every subfolder)")
    return folder


def check_compatible(unet: dict, vae: dict, text_widths: list, spec: str) -> None:
    """The UNet takes the VAE's latents (4 channels: not an inpainting UNet) and the text encoders' width."""
    in_channels, latent = unet.get("in_channels", 4), vae.get("latent_channels", 4)
    if in_channels != latent:
        raise UserError(f"{spec} has a UNet with {in_channels} input channels for a VAE with {latent} latent "
                        f"channels: it is an inpainting or instruct-pix2pix style model; {SUPPORTED}")
    if unet.get("time_cond_proj_dim"):  # its guidance is an input (w-embedding), not a second call: DDIM with CFG
        raise UserError(f"{spec} has a guidance-distilled UNet (time_cond_proj_dim={unet['time_cond_proj_dim']}: "
                        "an LCM model), which takes its guidance scale as an input this trainer does not give, so it "
                        f"would train on images it was not made to draw; {SUPPORTED} (train the model it was "
                        "distilled from)")
    cross = unet.get("cross_attention_dim")
    if isinstance(cross, int) and text_widths and all(isinstance(w, int) for w in text_widths) \
            and sum(text_widths) != cross:
        raise UserError(f"{spec}: the UNet expects text embeddings {cross} wide but its text encoder(s) give "
                        f"{' + '.join(map(str, text_widths))}: the text encoder belongs to another model; use "
                        "the model's own")


def check_loaded(comps, spec: str) -> None:
    """:func:`check_compatible` on loaded components (hub ids, single files, the random architectures)."""
    widths = [te.config.hidden_size for te in (comps.text_encoder, comps.text_encoder_2) if te is not None]
    check_compatible(dict(comps.unet.config), dict(comps.vae.config), widths, spec)

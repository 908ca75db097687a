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
        if (lora := _lora_in(path)) is not None:  # (sample --model RUN/lora: sample without a LoRA samples --model)
            raise UserError(f"{spec} holds a LoRA ({lora}), not a base model: pass the base model it was trained on "
                            f"as --model; to see what the LoRA does, run `lowmem-alignprop sample --lora {spec}`")
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


def _lora_in(path: Path) -> str | None:
    """The LoRA file a folder given as a model holds, relative to it: a run's lora/ folder's, or the run folder's
    lora/ one's; None for any other folder."""
    from lowmem_alignprop.run.filenames import LORA_DIR, LORA_WEIGHT_NAME

    return next((rel for rel in (LORA_WEIGHT_NAME, f"{LORA_DIR}/{LORA_WEIGHT_NAME}") if (path / rel).is_file()), None)


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


LFS_POINTER = b"version https://git-lfs"  # how a Git LFS pointer file begins (a clone made without git-lfs)


def hub_snapshot_repo(root: Path) -> str | None:
    """The hub id whose huggingface_hub cache snapshot ``root`` is (``HF_HUB_CACHE/models--ORG--NAME/snapshots/
    COMMIT``, as a hub id resolves or as a user passes it), else None."""
    repo_folder = Path(root).parent.parent.name
    if Path(root).parent.name != "snapshots" or not repo_folder.startswith("models--"):
        return None
    return repo_folder[len("models--"):].replace("--", "/")


def _refetch(root: Path, damaged: bool) -> str:
    """What to do about a part missing (or, ``damaged``, cut short) in ``root``: the hub cache's download again
    (forced: huggingface_hub keeps a damaged file it already has), or the folder copied again."""
    repo = hub_snapshot_repo(root)
    if repo is None:
        return "copy the whole model folder again (every subfolder, every file in full)"
    main = root.parent.parent / "refs" / "main"  # (the cache's record of main's commit: a pinned one names its own)
    mains = main.is_file() and main.read_text(encoding="utf-8").strip() == root.name
    pinned = "" if mains else f" --revision {root.name}"
    return (f"its download in the Hugging Face cache is {'damaged' if damaged else 'incomplete'}: on a machine with "
            f"network run `hf download {repo}{pinned}{' --force-download' if damaged else ''}`, then run again")


def _is_model(entry) -> bool:
    """A model_index.json entry naming a diffusers or transformers model class (a part with weights)."""
    import importlib

    library, name = entry
    if library not in ("diffusers", "transformers"):
        return False
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    cls = getattr(importlib.import_module(library), str(name), None)
    return isinstance(cls, type) and issubclass(cls, (ModelMixin, PreTrainedModel))


def check_weight_files(root: Path, spec: str, skip=()) -> None:
    """Before diffusers and transformers read a folder's parts (a diffusers folder, or a hub id's cached snapshot):
    each part its model_index.json lists (but those in ``skip``, given loaded) has its folder, each model part its
    weight files, and each .safetensors file of them a whole header whose tensors the file holds (a Git LFS
    pointer, a cut-off copy). One UserError naming the part and the fix; the readers' own errors said neither
    (a traceback for a text encoder's). Header reads only: no weight is read."""
    from lowmem_alignprop.run.tensor_files import TensorFileError, not_safetensors, read_safetensors_shapes
    from lowmem_alignprop.settings.paths import component_variant, model_index, weight_files, weights_variant

    index = model_index(root) or {}  # none: diffusers' own load says what is wrong with the folder
    pipeline_variant = weights_variant(root)
    for part in index:
        if part in skip or part.startswith("_") or not _listed(index, part):
            continue
        if not (root / part).is_dir():
            raise UserError(f"{spec} is incomplete: its model_index.json lists {part} but the {part}/ folder is "
                            f"missing; {_refetch(root, False)}")
        if not _is_model(index[part]):
            continue
        variant = component_variant(root / part)
        if variant is None and pipeline_variant and weight_files(root / part, pipeline_variant):
            variant = pipeline_variant  # (diffusers reads a part's own variant files where they are there)
        files = weight_files(root / part, variant)
        if not files:
            raise UserError(f"{spec} is incomplete: {part}/ has no weights file (such as "
                            f"{'model' if index[part][0] == 'transformers' else 'diffusion_pytorch_model'}"
                            f".safetensors); {_refetch(root, False)}")
        for f in (f for f in files if f.suffix == ".safetensors"):
            with open(f, "rb") as stream:
                head = stream.read(len(LFS_POINTER))
            if head == LFS_POINTER:
                fix = _refetch(root, True) if hub_snapshot_repo(root) else (
                    "it was cloned without git-lfs: run `git lfs pull` in the model folder, or download the model "
                    "with `hf download OWNER/NAME --local-dir DIR`")
                raise UserError(f"{spec}: {part}/{f.name} is a Git LFS pointer ({f.stat().st_size} bytes), not "
                                f"the weights; {fix}")
            try:
                read_safetensors_shapes(f)
            except (TensorFileError, OSError) as e:
                raise UserError(f"{spec}: {part}/{not_safetensors(f, e)}; {_refetch(root, True)}") from None

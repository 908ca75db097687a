"""The LoRA in the formats other tools read (see lora_export.py): kohya's one file (``lora_unet_*`` keys, each
``.alpha`` the trained scale times the rank), a peft adapter folder, and diffusers' layout as the run wrote it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from lowmem_alignprop.lora.lora_files import (HEADER_BASE_MODEL, HEADER_IMAGE_SETTINGS, HEADER_LORA_DIGEST,
                                                 HEADER_PREDICTION, HEADER_REWARD, HEADER_ZERO_SNR, KOHYA_MODEL_NAME,
                                                 KOHYA_V2, KOHYA_V_PREDICTION, KOHYA_ZERO_SNR, MODELSPEC_ARCHITECTURE,
                                                 MODELSPEC_PREDICTION, PEFT_CONFIG_NAME, PEFT_WEIGHT_NAME, SD_V1,
                                                 SD_V2, SDXL, Lora, base_family, denoiser_name, lora_digest,
                                                 safetensors_copy, shared_image_settings, shared_name, shared_reward,
                                                 temporary_folder, v_prediction, zero_terminal_snr)
from lowmem_alignprop.lora.kohya_layers import (COMFY_ENCODER_PREFIX, KOHYA_LAYER_SUFFIXES, KOHYA_SUFFIX,
                                                    WEIGHT_DIFFERENCES, alphas_folded, comfy_encoder_name,
                                                    comfy_encoder_refusal, diffusers_parts, every_alpha_folded,
                                                    first_changed, left_out_refusal, lora_suffix, unchanged_layer,
                                                    weight_difference_refusal)
from lowmem_alignprop.lora.model_card import images_per_size, is_hub_id, num, run_info, trained_size
from lowmem_alignprop.models.lora_layers import KOHYA_ENCODERS, peft_exclude
from lowmem_alignprop.models.lora_metadata import lora_metadata
from lowmem_alignprop.run.filenames import LORA_BASE_FILE, LORA_WEIGHT_NAME
from lowmem_alignprop.settings.errors import UserError, first_line, quote, quote_name
from lowmem_alignprop.settings.image_size import sizes_of

PEFT_PREFIX = "base_model.model."


def kohya_state_dict(lora: Lora) -> dict[str, torch.Tensor]:
    """``lora_unet_*`` keys (diffusers' converter) with each ``.alpha`` set to the trained scale times the rank;
    SD3/FLUX in their original module names, q/k/v fused (lora/flow_export.py)."""
    from diffusers.utils import convert_state_dict_to_kohya

    if lora.flow:
        from lowmem_alignprop.lora import flow_export
        from lowmem_alignprop.models.kept_lora import by_component
        parts = by_component(lora.kept)
        kept = parts.pop("transformer", {})  # (its kept linears: as they came, alpha = rank)
        encoders = {f"{part}.{k}": v for part, layers in parts.items() for k, v in layers.items()}
        if lora.kept and lora.family != flow_export.FLUX:  # (SD3: refused, counting every kept layer)
            flow_export.kohya_kept({**kept, **encoders}, lora.family, str(lora.named), peft_holds=not encoders)
        return {**flow_export.kohya_state_dict(lora.weights, lora.scale, lora.family),
                **(flow_export.kohya_kept(kept, lora.family, str(lora.named), peft_holds=not encoders)
                   if kept else {}),
                **(kohya_kept(encoders, sdxl=True) if encoders else {})}  # (CLIP-L: lora_te1_, as sd-scripts names it)

    converted = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in lora.weights.items()})
    for module in lora.modules:
        name = kohya_name(module)
        rank = converted[f"{name}.lora_down.weight"].shape[0]
        converted[f"{name}.alpha"] = torch.tensor(lora.scale(module) * rank, dtype=torch.float32)
    if lora.kept:
        converted.update(kohya_kept(lora.kept, sdxl=base_family(lora) == SDXL))
    return {k: v.contiguous() for k, v in converted.items()}


def kohya_holds_kept(lora: Lora) -> bool:
    """Whether ``export --format kohya`` writes ``lora``'s kept layers (:func:`kohya_state_dict`) rather than refusing
    them: a UNet's all, FLUX.1's inside its blocks (and CLIP-L's), SD3's none (flow_export.kohya_kept)."""
    if not lora.flow:
        return True
    from lowmem_alignprop.lora import flow_export
    from lowmem_alignprop.models.kept_lora import by_component

    return not lora.kept or flow_export.kohya_holds(by_component(lora.kept).get("transformer", {}), lora.family)


def kohya_kept(kept: dict[str, torch.Tensor], sdxl: bool = False) -> dict[str, torch.Tensor]:
    """A run's kept layers (``Lora.kept``: scale folded in) in kohya's names: ``lora_unet_`` for the UNet's (a conv's
    4-D), ``lora_te_`` for SD's text encoder, ``lora_te1_``/``lora_te2_`` for SDXL's two (``sdxl``: the base's
    family; ComfyUI reads an SDXL file's first encoder as lora_te1_ only); alpha = rank (scale 1)."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
    if sdxl or any(k.startswith("text_encoder_2.") for k in kept):
        prefixes["text_encoder"] = "lora_te1_"
    from lowmem_alignprop.models.kept_lora import canonical_key

    out = {}
    for key, value in kept.items():  # (a text encoder's with text_model.: sd-scripts' names, which A1111/ComfyUI read)
        component, _, name = canonical_key(key).partition(".")
        module, _, part = name.rpartition(".lora_")
        stem = prefixes[component] + module.replace(".", "_")
        out[f"{stem}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value
        if part.startswith("A"):
            out[f"{stem}.alpha"] = torch.tensor(float(value.shape[0]), dtype=torch.float32)
    out = _one_rank_per_encoder(out)
    return {**out, **_zero_out_proj(out)}


def _one_rank_per_encoder(layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya ``layers`` with each encoder's layers padded with zeros to that encoder's largest rank (alpha = it: the
    same product, scale 1): diffusers' kohya reader gives an encoder one alpha and drops the alpha pattern of a layer
    of another rank (its names keep CLIP's ``text_model.``), so such a layer loaded at another scale."""
    out = dict(layers)
    for prefix in {p for k in layers for p in KOHYA_ENCODERS if k.startswith(p)}:
        downs = [k for k in layers if k.startswith(prefix) and k.endswith(".lora_down.weight")]
        rank = max(layers[k].shape[0] for k in downs)
        for down in downs:
            up, a = down.replace(".lora_down.", ".lora_up."), layers[down]
            if a.shape[0] < rank:
                out[down] = torch.cat([a, a.new_zeros(rank - a.shape[0], *a.shape[1:])])
                out[up] = torch.cat([layers[up], layers[up].new_zeros(layers[up].shape[0], rank - a.shape[0],
                                                                      *layers[up].shape[2:])], dim=1)
                out[down.replace(".lora_down.weight", ".alpha")] = torch.tensor(float(rank))
    return out


def _zero_out_proj(layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For each encoder of kohya ``layers`` with no ``out_proj`` layer, one that adds zero (rank 1, its lora_up zero):
    diffusers' kohya reader tells an encoder's layout by an out_proj layer alone and else fails ("Could not
    automatically infer state dict type") or drops its q/k/v layers (:func:`kohya_encoders_without_out_proj`); every
    loader adds nothing for it."""
    out = {}
    for prefix in sorted({p for k in layers for p in KOHYA_ENCODERS if k.startswith(p)}):
        mine = {k: v for k, v in layers.items() if k.startswith(prefix)}
        if any("_out_proj." in k for k in mine):
            continue
        down = next(k for k in sorted(mine) if k.endswith(".lora_down.weight"))
        layer = re.match(rf"{prefix}(text_model_encoder_layers_\d+)_", down)
        if layer is None:  # (not an encoder layer: diffusers reads no such layout anyway)
            continue
        width = mine[down].shape[1] if "_fc2." not in down else mine[down.replace("lora_down", "lora_up")].shape[0]
        rank, alpha = mine[down].shape[0], mine[down.replace(".lora_down.weight", ".alpha")]  # (a rank or alpha of
        # its own gave the encoder's other layers diffusers' scale of another: its config's one r and alpha)
        stem = f"{prefix}{layer.group(1)}_self_attn_out_proj"
        out.update({f"{stem}.lora_down.weight": torch.zeros(rank, width),
                    f"{stem}.lora_up.weight": torch.zeros(width, rank), f"{stem}.alpha": alpha.clone()})
    return out


def kohya_name(module: str) -> str:
    """The kohya name of a UNet module path: ``lora_unet_`` and the path with dots as underscores."""
    return "lora_unet_" + module.replace(".", "_")


# the model spec's version and implementation of each family's LoRA, as sd-scripts writes them (library/
# sai_model_spec.py: the UNet families' "diffusers" but SDXL's Stability repository; SD3's "diffusers"; FLUX.1's BFL's)
MODEL_SPEC_VERSION = "1.0.1"
MODEL_SPEC_IMPLEMENTATION = {SDXL: "https://github.com/Stability-AI/generative-models",
                             "flux": "https://github.com/black-forest-labs/flux"}
# ... and of a whole checkpoint (a merged single file): Stability's repository for every family but FLUX.1's
CHECKPOINT_IMPLEMENTATION = MODEL_SPEC_IMPLEMENTATION[SDXL]


def kohya_metadata(lora: Lora, title: str | None = None) -> dict[str, str]:
    """The kohya file's header: sd-scripts' ``ss_*`` keys, the model spec's required ``modelspec.*`` ones (``title``,
    also ``ss_output_name``: the file's stem, :func:`file_stem`), and ours (``alignprop_*``)."""
    ranks = sorted({lora.weights[f"{m}.lora_A.weight"].shape[0] for m in lora.modules})
    alpha = lora.config.get("lora_alpha") or ranks[0]
    if lora.config.get("use_rslora"):
        alpha = lora.scale(lora.modules[0]) * ranks[0]
    info = run_info(lora)
    if info.get("resolution") is None and lora_image_settings(lora).get("resolution") is not None:  # (away from its
        info["resolution"] = lora_image_settings(lora)["resolution"]  # run, a hub LoRA: base_model.json's record)
    model, version = shared_name(str(lora.base_model or "")), base_family(lora)
    stem = title or file_stem(lora)  # the file's
    meta = {
        "ss_base_model_version": version,
        # sd-scripts' module for the family (its SD3/FLUX LoRAs come from networks/lora_sd3.py and lora_flux.py)
        "ss_network_module": {"sd3": "networks.lora_sd3", "flux": "networks.lora_flux"}.get(lora.family,
                                                                                               "networks.lora"),
        "ss_network_dim": str(ranks[0] if len(ranks) == 1 else max(ranks)),
        "ss_network_alpha": num(alpha),
        KOHYA_MODEL_NAME: model,
        "ss_training_comment": f"AlignProp reward fine-tuning with lowmem-alignprop ({denoiser_name(lora)} LoRA only)",
        HEADER_BASE_MODEL: model,
        HEADER_LORA_DIGEST: lora_digest(lora),  # (`sample` refuses it on a model that `export --merge` fused it into)
        HEADER_REWARD: shared_reward(info.get("reward")),  # (a reward file of this machine by its name)
        "alignprop_steps": str(info.get("steps", "")),
        "alignprop_target_modules": ",".join(lora.adapted_targets),
        "ss_output_name": stem,  # (A1111's alias of the LoRA)
    }
    if info.get("reward_last") is not None:
        meta["alignprop_final_reward"] = num(info["reward_last"])
        if info.get("reward_window"):  # how many of the run's last steps it is the mean of (summary.json's
            meta["alignprop_final_reward_steps"] = str(info["reward_window"])  # reward_window; reward_steps: all)
    if (size := trained_size(info)) is not None:  # the trained size, as sd-scripts writes it: (width, height)
        meta["ss_resolution"] = f"({size[0]}, {size[1]})"
        meta.update(bucket_metadata(info))
    meta.update(training_metadata(info))
    if info.get("prediction_type", "auto") != "auto":  # (--set prediction_type: the base's files say otherwise)
        meta[HEADER_PREDICTION] = str(info["prediction_type"])
    if zero_terminal_snr(lora):  # (as its run sampled it: a folder's own schedule too, which config.yaml leaves out)
        meta[HEADER_ZERO_SNR] = "True"
    if shared := shared_image_settings(lora_image_settings(lora)):  # how its run sampled: `sample FILE` alone reads it
        meta[HEADER_IMAGE_SETTINGS] = json.dumps(shared, sort_keys=True)
    if info.get("init_lora"):  # its training started from another LoRA, whose steps alignprop_steps leaves out
        meta["alignprop_init_lora"] = shared_name(str(info["init_lora"]))
        if info.get("init_lora_sha"):  # which LoRA it was, whatever the path holds now (the run's converted copy)
            meta["alignprop_init_lora_sha256"] = info["init_lora_sha"]
        if info.get("init_lora_source"):  # the user's own file's digest, which their sha256sum matches (the card's)
            meta["alignprop_init_lora_source_sha256"] = info["init_lora_source"]["sha256"]
    if lora.kept:  # (ss_network_dim/alpha and the targets are the trained layers'; these have their own ranks)
        from lowmem_alignprop.models.kept_lora import kept_header
        kept = kept_header(lora.kept)
        meta["ss_training_comment"] = meta["ss_training_comment"].replace(" only)", f" trained; {kept})")
        meta["alignprop_kept_layers"] = kept
    if not lora.flow:  # sd-scripts writes both: A1111 tells SD 2.x by ss_v2 alone, SD.Next by the architecture
        meta[KOHYA_V2] = str(version == SD_V2)
        meta[KOHYA_V_PREDICTION] = str(v_prediction(lora))  # (sd-scripts' own pair: how its images sample)
        meta[KOHYA_ZERO_SNR] = str(zero_terminal_snr(lora))
    meta.update(model_spec(lora, info, stem, version=version))
    return meta


def bucket_metadata(info: dict) -> dict[str, str]:
    """A run of several sizes as sd-scripts writes an aspect-ratio-bucketed one: ``ss_enable_bucket`` and
    ``ss_bucket_info`` (each size's ``resolution`` [width, height] and ``count``, the images it trained on, by
    model_card.images_per_size); ss_resolution and modelspec.resolution say the first size. One size: none."""
    if len(sizes_of(info["resolution"])) == 1:
        return {}
    buckets = {str(i): {"resolution": list(size), "count": count}
               for i, (size, count) in enumerate(images_per_size(info).items())}
    return {"ss_enable_bucket": "True", "ss_bucket_info": json.dumps({"buckets": buckets, "mean_img_ar_error": 0.0})}


def model_spec(lora: Lora, info: dict, title: str, checkpoint: bool = False, v: bool | None = None,
               version: str | None = None) -> dict[str, str]:
    """The model spec's ``modelspec.*`` keys as sd-scripts writes them, of the LoRA's kohya file or (``checkpoint``)
    of the merged single file: its version, architecture (a LoRA's with ``/lora``), implementation, ``title`` (the
    file's stem: sd-scripts' output name), the date the run ended, the trained resolution and the prediction type
    (``v``: whether the model predicts v; None: as its run sampled it, lora_files.v_prediction). ``version``: the
    base's :func:`base_family` where the caller has read it (it reads the base's config)."""
    version = base_family(lora) if version is None else version
    v = v_prediction(lora) if v is None else v
    if checkpoint:  # (sd-scripts: a Stable Diffusion checkpoint's is Stability's repository, FLUX.1's BFL's)
        implementation = MODEL_SPEC_IMPLEMENTATION["flux"] if lora.family == "flux" else CHECKPOINT_IMPLEMENTATION
    else:
        implementation = MODEL_SPEC_IMPLEMENTATION.get(lora.family if lora.flow else version, "diffusers")
    meta = {"modelspec.sai_model_spec": MODEL_SPEC_VERSION, "modelspec.implementation": implementation,
            "modelspec.title": title}
    if isinstance(lora.summary.get("finished_at"), str):  # when the run ended (not the export's "now": an export
        meta["modelspec.date"] = lora.summary["finished_at"]  # of the same LoRA is the same bytes)
    if (size := trained_size(info)) is not None:  # the trained size, width x height as sd-scripts writes it
        meta["modelspec.resolution"] = f"{size[0]}x{size[1]}"
    if lora.flow:  # what sd-scripts writes beside it for these families
        from lowmem_alignprop.lora import flow_export
        arch = flow_export.architecture(lora.family, lora.base_model, lora.modules, lora.model_components,
                                        lora.components_revision).removesuffix("/lora")
    else:
        meta[MODELSPEC_PREDICTION] = "v" if v else "epsilon"  # (the model spec's words)
        # (sd-scripts: SDXL's one name, v-prediction or not, which modelspec.prediction_type then says; SD 2.x's v
        # its own architecture)
        arch = {SD_V1: "stable-diffusion-v1", SDXL: "stable-diffusion-xl-v1-base"}.get(version) or (
            "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512")
    meta[MODELSPEC_ARCHITECTURE] = arch if checkpoint else f"{arch}/lora"
    return meta


def lora_image_settings(lora: Lora) -> dict:
    """The image settings the LoRA's run sampled with: its run's config (a checkpoint's: its state's), else
    base_model.json's record (a LoRA copied away from its run)."""
    from lowmem_alignprop.settings.config import image_settings

    return image_settings(lora.run_config) if lora.run_config else dict((lora.base or {}).get("image_settings") or {})


# sd-scripts' keys of how a LoRA was trained (A1111's and Civitai's metadata panels show them): run config field -> key
TRAINING_KEYS = {"lr": "ss_learning_rate", "steps": "ss_steps", "seed": "ss_seed",
                 "grad_accum": "ss_gradient_accumulation_steps", "max_grad_norm": "ss_max_grad_norm",
                 "mixed_precision": "ss_mixed_precision"}


def training_metadata(info: dict) -> dict[str, str]:
    """sd-scripts' training keys from a run's :func:`run_info` (what it holds of them): the learning rate (also as
    the UNet's or transformer's, the only part trained), its schedule by sd-scripts' name, steps, seed..."""
    from lowmem_alignprop.memory.optim import optimizer_class
    from lowmem_alignprop.step.update import LR_SCHEDULES

    meta = {key: num(info[field]) if isinstance(info[field], float) else str(info[field])
            for field, key in TRAINING_KEYS.items() if info.get(field) is not None}
    if "ss_learning_rate" in meta:
        meta["ss_unet_lr"] = meta["ss_learning_rate"]
    if info.get("optimizer"):  # the class it stepped with, by its path, as sd-scripts writes it (memory/optim.py)
        meta["ss_optimizer"] = optimizer_class(str(info["optimizer"]), info.get("deepspeed_zero"), info.get("offload"))
    if info.get("lr_scheduler"):
        warmup = int(info.get("lr_warmup_steps") or 0)
        meta["ss_lr_scheduler"] = LR_SCHEDULES[info["lr_scheduler"]] if warmup else info["lr_scheduler"]
        meta["ss_lr_warmup_steps"] = str(warmup)
    return meta


def write_kohya(lora: Lora, folder: Path, name: str) -> Path:
    from safetensors.torch import save_file

    path = folder / f"{name}.safetensors"
    save_file(kohya_state_dict(lora), str(path), metadata=kohya_metadata(lora, name))
    return path


def peft_config(lora: Lora):
    """The adapter's LoraConfig (peft's own class), naming the base model."""
    from peft import LoraConfig

    known = set(LoraConfig.__dataclass_fields__)
    values = {k: v for k, v in lora.config.items() if k in known and k not in ("peft_type", "peft_version")}
    if not values:  # no config saved: the layers (their whole paths: peft matches them exactly) and rank the file
        rank = lora.weights[f"{lora.modules[0]}.lora_A.weight"].shape[0]  # shows, alpha = rank
        values = {"r": rank, "lora_alpha": rank, "target_modules": sorted(lora.modules)}
    values["exclude_modules"] = peft_exclude(values.get("target_modules") or [])  # not in diffusers' header
    values["base_model_name_or_path"] = lora.base_model if is_hub_id(lora.base_model) else None
    values["inference_mode"] = True
    return LoraConfig(**values)


def write_peft(lora: Lora, folder: Path) -> list[Path]:
    from safetensors.torch import save_file

    from lowmem_alignprop.models.kept_lora import by_component, layer_ranks, with_kept_layers

    # peft's save_pretrained, its target_modules in a fixed order (lora_metadata: the same bytes every export)
    config = lora_metadata(peft_config(lora), peft_file=True)
    # the denoiser's kept layers (a UNet's convolutions and linears, an SD3/FLUX transformer's linears; export refuses
    # kept text-encoder layers): each its own target, rank and alpha = rank (its scale is in B), as in the header
    kept = by_component(lora.kept).get(lora.component, {})
    if kept:
        config = with_kept_layers(config, kept)
        if config.get("exclude_modules") in layer_ranks(kept):  # the top-level proj_out kept: adapted, not excluded
            config["exclude_modules"] = None
    (folder / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    save_file({PEFT_PREFIX + k: v.contiguous() for k, v in {**lora.weights, **kept}.items()},
              str(folder / PEFT_WEIGHT_NAME), metadata={"format": "pt"})
    return [folder / PEFT_CONFIG_NAME, folder / PEFT_WEIGHT_NAME]


def write_diffusers(lora: Lora, folder: Path) -> list[Path]:
    shutil.copy2(lora.path / LORA_WEIGHT_NAME, folder / LORA_WEIGHT_NAME)
    return [folder / LORA_WEIGHT_NAME]


HUB_SOURCE = "hub_lora"  # base_model.json's key in an export of a hub LoRA: its id, file and the commit read
EXPORTED_FROM = "lora_digest"  # base_model.json's key in an export: lora_files.lora_digest of the LoRA it was made from


def write_base_record(lora: Lora, folder: Path) -> list[Path]:
    """base_model.json beside an export's files (every format): ``sample`` of the export without --model loads the
    model it was trained on, as for the run's lora/. It also records the LoRA's digest (lora_files.lora_digest): whether
    an export is of the LoRA a run's lora/ holds now is told by its weights (a rewritten or copied lora/ has new times
    but the same weights)."""
    from lowmem_alignprop.run.base_fingerprint import base_record

    if not (lora.path / LORA_BASE_FILE).is_file():
        return []
    if lora.base is not None and "image_settings" not in lora.base and lora.run_config:
        record = json.loads(base_record(lora.base, lora.run_config))  # a run from before base_model.json recorded them
    else:
        record = dict(lora.base)  # (read_lora read it: a damaged one stopped there)
    record[EXPORTED_FROM] = lora_digest(lora)
    if lora.hub is not None:  # export --lora OWNER/NAME: the hub LoRA and the commit it was read at
        record[HUB_SOURCE] = {"repo": lora.hub.repo, "file": lora.hub.file, "revision": lora.hub.commit}
    (folder / LORA_BASE_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return [folder / LORA_BASE_FILE]


STEM_BYTES = 120  # of the run folder's name in a file's: with the suffixes and a temporary prefix, under 255 bytes


def file_stem(lora: Lora) -> str:
    """The kohya file's name: the run folder's (what users see in ComfyUI's and A1111's LoRA lists), its first
    STEM_BYTES bytes in UTF-8 (a folder name may take the file system's 255, which the suffixes then passed)."""
    # a run's lora/ or best/ (step N: the step in the name, below): the run's name; a hub LoRA's: its repository's
    name = (lora.run or lora.path.parent).resolve().name if lora.path.name == "lora" or lora.run is not None and \
        lora.step is not None else lora.path.resolve().name
    name = lora.hub.repo.split("/")[-1] if lora.hub is not None else name  # (not its commit's snapshot folder)
    name = re.sub(r"[^\w.-]+", "_", name).strip("._")
    name = name.encode()[:STEM_BYTES].decode(errors="ignore").rstrip("._") or "alignprop"  # whole characters
    if lora.step is not None:  # a checkpoint's LoRA: the step in the name (ComfyUI and A1111 list them side by side)
        return f"{name}_step{lora.step}_alignprop_lora"
    return f"{name}_alignprop_lora"


def peft_as_diffusers(folder: Path, label: str) -> Path:
    """A peft adapter folder in diffusers' layout, in a temporary folder (removed when the process ends); ``label``
    names the option in a message (``--init-lora x``)."""
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / PEFT_CONFIG_NAME).read_text(encoding="utf-8"))
        kind = config.get("peft_type", "LORA")
        weights = load_file(str(folder / PEFT_WEIGHT_NAME))
    except Exception as e:  # a damaged JSON or safetensors file: any reader error
        raise UserError(f"{label}: the peft adapter cannot be read ({first_line(e, 120)})") from None
    if kind != "LORA":  # (LoHa, LoKr, IA3...: diffusers' converter reads no such keys)
        raise UserError(f"{label} is a peft {kind} adapter, not a LoRA: only LoRA adapters (peft_type LORA) are "
                        "read; pass a LoRA")
    weights = {k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()}
    return _diffusers_file(weights, _lora_config(config))


def _lora_config(config: dict) -> dict:
    """A peft adapter's config as diffusers' adapter metadata reads it (not the base model's name, not peft's own
    fields)."""
    return {k: v for k, v in config.items() if k not in ("base_model_name_or_path", "revision", "auto_mapping")}


# a LoRA file in peft's names without diffusers' part prefix: ``get_peft_model_state_dict(unet)`` saved with
# safetensors' save_file, a model's own ``save_lora_adapter`` (its peft config in the header's lora_adapter_metadata,
# which ``unet.load_lora_adapter(file, prefix=None)`` reads), or a PeftModel's state dict (``base_model.model.``
# before each name). diffusers' pipeline loader reads only unet. / transformer. / text_encoder. names: it left every
# such layer out without a word (FLUX.1's reader raised KeyError on base_model.model.). Which part a layer is of is
# told by its name's first module: a child of the SD 1.x/2.x/SDXL UNet, of the SD3/FLUX.1 transformer (the two share
# none), or a text encoder's (CLIP's: text_model. before transformers 5; SDXL's and SD3's two CLIPs share their names:
# diffusers' prefix tells them apart)
BARE_MODULES = {"unet": ("conv_in", "time_proj", "time_embedding", "class_embedding", "add_time_proj",
                         "add_embedding", "encoder_hid_proj", "down_blocks", "mid_block", "up_blocks", "conv_norm_out",
                         "conv_out"),
                "transformer": ("pos_embed", "time_text_embed", "context_embedder", "x_embedder",
                                "transformer_blocks", "single_transformer_blocks", "norm_out", "proj_out"),
                "text_encoder": ("text_model", "text_projection", "embeddings", "encoder", "final_layer_norm")}
_BARE_PART_NAMES = {"unet": "UNet", "transformer": "transformer", "text_encoder": "text encoder"}
LORA_ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' header key of an adapter's peft config (lora_alpha...)


def bare_part(key: str) -> str | None:
    """The part (:data:`BARE_MODULES`: unet, transformer, text_encoder) whose module a LoRA key in peft's names
    without diffusers' prefix starts with (``base_model.model.`` left out); None for another name."""
    head = key.removeprefix(PEFT_PREFIX).split(".", 1)[0]
    return next((part for part, heads in BARE_MODULES.items() if head in heads), None)


def bare_lora_part(keys) -> str | None:
    """unet or transformer: the denoiser a LoRA file in peft's names without diffusers' prefix adapts (the part most
    of its keys start with a module of, :func:`bare_part`); None where no key names one."""
    from collections import Counter

    parts = Counter(p for k in keys if (p := bare_part(k)) in ("unet", "transformer"))
    return parts.most_common(1)[0][0] if parts else None


def bare_lora_as_diffusers(tensors: dict, file: Path, label: str) -> Path | None:
    """A LoRA file in peft's names without diffusers' part prefix (above; ``tensors``: its weights) in diffusers'
    layout, in a temporary folder (removed when the process ends): its names under ``unet.`` or ``transformer.``,
    its header's peft config (lora_alpha; none: alpha = rank, as diffusers reads a LoRA without one) as that part's
    adapter config, as :func:`peft_as_diffusers` writes a peft folder's. None for a file of another layout. A file
    whose keys are not all one denoiser's layers (a text encoder's beside them, a name of neither) raises UserError
    (``label``: the option and its value), naming the key and the prefixes diffusers reads; beside another layout's
    names (unet., kohya's...), the left-out checks speak (adapters, :func:`unet_layers_read`)."""
    if any(k.startswith((*KOHYA_PREFIXES, *_DIFFUSERS_PARTS, "transformer.", "lora_transformer_", LDM_UNET_PREFIX,
                         COMFY_ENCODER_PREFIX)) for k in tensors):
        return None  # (beside another layout's names: the left-out checks say it, all-zero layers left out)
    part = bare_lora_part(tensors)
    if part is None:  # (a text encoder's layers alone: which encoder is not in their names)
        if tensors and all(bare_part(k) == "text_encoder" for k in tensors):
            raise UserError(bare_refusal(label, min(tensors), None, ""))
        return None
    if (odd := next((k for k in sorted(tensors) if bare_part(k) != part), None)) is not None:
        raise UserError(bare_refusal(label, odd, part, min(k for k in tensors if bare_part(k) == part)))
    from lowmem_alignprop.run.tensor_files import is_safetensors, read_safetensors_metadata

    try:
        config = json.loads(read_safetensors_metadata(file).get(LORA_ADAPTER_METADATA) or "{}") \
            if is_safetensors(file) else {}
    except ValueError:  # (a damaged config: diffusers' own reader fails on it too)
        raise UserError(f"{label}: the adapter config in its header ({LORA_ADAPTER_METADATA}) is damaged (not "
                        "JSON): save the LoRA again") from None
    known = _lora_config(config) if isinstance(config, dict) and "r" in config else {}  # (a peft config's own keys)
    return _diffusers_file({k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}, known, part)


def bare_refusal(label: str, key: str, part: str | None, example: str) -> str:
    """The line for a LoRA file in peft's names without diffusers' prefix whose ``key`` is not of ``part`` (the
    denoiser most of its keys are layers of, ``example`` one of them; None: a text encoder's layers alone)."""
    said = {"unet": "unet.", "transformer": "transformer."}
    reads = "text_encoder. (text_encoder_2. for SDXL's and SD3's second CLIP)"
    if part is None:
        return (f"{label} holds {quote_name(key)}, a text encoder's layer in peft's names without diffusers' part "
                "prefix, which diffusers' LoRA loader leaves out without a word: it reads a text encoder's layers "
                f"under {reads}; save the LoRA with its encoder's prefix")
    what = "a text encoder's layer" if bare_part(key) == "text_encoder" else "no layer of an SD3/FLUX transformer" \
        if part == "transformer" else "no layer of a UNet"
    return (f"{label} holds {quote_name(key)}, {what}, beside the {_BARE_PART_NAMES[part]}'s layers in peft's names "
            f"without diffusers' part prefix (e.g. {quote_name(example)}): diffusers' LoRA loader reads a "
            f"{_BARE_PART_NAMES[part]}'s layers under {said[part]}, a text encoder's under {reads}, and leaves out "
            "any other name without a word; save the LoRA with each layer's prefix")


def attn_processor_as_diffusers(tensors: dict) -> Path | None:
    """A LoRA in diffusers' old attention-processor layout (``unet.save_attn_procs`` before diffusers 0.21:
    ``...attn1.processor.to_q_lora.down.weight``; alpha = rank), which diffusers' loader no longer reads, in today's
    layout in a temporary folder (removed when the process ends); None for a LoRA of any other layout."""
    if not any(".processor." in k and "_lora." in k for k in tensors):
        return None
    from diffusers.utils import convert_unet_state_dict_to_peft

    return _diffusers_file(convert_unet_state_dict_to_peft({k.replace(".processor.", "."): v
                                                            for k, v in tensors.items()}), {})


KOHYA_PREFIXES = ("lora_unet_", *KOHYA_ENCODERS)  # sd-scripts' UNet and text encoders' keys


def kohya_alphas_folded(tensors: dict) -> Path | None:
    """A kohya UNet LoRA (``lora_unet_*``, ``lora_te*``) whose layers' ``.alpha`` differ (sd-scripts' resize_lora,
    merged LoRAs) with each alpha / rank folded into its ``lora_up``, the alphas left out, in a temporary folder
    (removed when the process ends): diffusers' reader names such a file's UNet alphas after its attention
    processors, which match no layer, and applies the most common alpha to every layer (a layer without alpha,
    alpha = rank, too). None for any other file (one alpha for every layer: diffusers reads it)."""
    alphas = {k.removesuffix(".alpha"): v for k, v in tensors.items() if k.endswith(".alpha") and k.startswith(
        KOHYA_PREFIXES)}
    layers = {k.removesuffix(".lora_down.weight") for k in tensors if k.endswith(".lora_down.weight")
              and k.startswith(KOHYA_PREFIXES)}
    if not alphas or len({float(v) for v in alphas.values()}) == 1 and layers <= alphas.keys():
        return None  # (a layer without alpha has alpha = rank: in a file with alphas, diffusers gave it theirs)
    from safetensors.torch import save_file

    out = temporary_folder() / "kohya_alphas_folded.safetensors"
    save_file(alphas_folded(tensors, alphas), str(out))
    return out


# a UNet LoRA as ComfyUI saves it (its LoRA save / extract nodes, and its generic reader's layout): the original
# LDM/sgm UNet's module paths under ``diffusion_model.`` (``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.
# to_q.lora_down.weight``, ``.lora_up.weight``, ``.alpha``; no alpha: alpha = rank); ComfyUI's trainer and others name
# the pairs as peft does (``.lora_A.weight`` down, ``.lora_B.weight`` up: comfy/weight_adapter/lora.py reads both);
# its text encoders' layers: kohya_layers.comfy_encoder_name
LDM_UNET_PREFIX = "diffusion_model."
_LDM_UNET_MODULES = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")


def is_ldm_unet_lora(keys) -> bool:
    """Whether a LoRA file's tensor names are ComfyUI's of an SD 1.x/2.x/SDXL UNet (``diffusion_model.input_blocks.
    ...``): diffusers' loader reads no such names."""
    return any(k.startswith(LDM_UNET_PREFIX) and k[len(LDM_UNET_PREFIX):].startswith(_LDM_UNET_MODULES) for k in keys)


def ldm_unet_unreadable(tensors) -> str | None:
    """The first name of a ComfyUI UNet LoRA (:func:`is_ldm_unet_lora`; ``tensors``: its names, or names -> tensors)
    that no LoRA layer applies: its extract node's weight or bias differences (``.diff``, ``.diff_b``: lora_type
    full_diff, bias_diff), or a text encoder's layer diffusers has no name for (:func:`comfy_encoder_name`) that
    changes the model; None if none (or for another layout)."""
    if not is_ldm_unet_lora(tensors):
        return None
    return next((k for k in sorted(tensors) if not (k.startswith(LDM_UNET_PREFIX) and lora_suffix(k) or (
        k.startswith(COMFY_ENCODER_PREFIX) and (comfy_encoder_name(k) or unchanged_layer(tensors, k))))), None)


def ldm_unet_refusal(tensors) -> str | None:
    """What a ComfyUI UNet LoRA holds that no LoRA layer here applies (:func:`ldm_unet_unreadable`) and what to pass
    instead, to follow the option and its value in one line; None where it holds LoRA layers only."""
    if (key := ldm_unet_unreadable(tensors)) is None:
        return None
    return comfy_encoder_refusal(key) if key.startswith(COMFY_ENCODER_PREFIX) and lora_suffix(key) else \
        not_lora_refusal(key)


def not_lora_refusal(key: str) -> str:
    """Why a UNet LoRA file holding ``key``, a name no LoRA layer applies (ComfyUI's weight or bias differences, a
    norm's weight...), is refused, and what to pass instead: to follow the option and its value."""
    if key.endswith(WEIGHT_DIFFERENCES):
        return weight_difference_refusal(key)
    return f"holds {quote(key)}, not a LoRA's lora_down / lora_up / alpha: pass a plain LoRA"


def ldm_unet_name(key: str) -> str:
    """A ComfyUI UNet LoRA name (``diffusion_model.`` + the LDM module path + suffix) as kohya's for the same module
    (``lora_unet_`` + the path with dots as underscores; peft's lora_A / lora_B as lora_down / lora_up), whose sgm
    block numbers diffusers' reader maps with the UNet's config. An upsampler in an up block without attention,
    ``output_blocks.N.1.conv`` (SD 1.x/2.x's first), is named by the index it has beside attention (``.2.conv``):
    diffusers reads index 1 as attentions (a ``.1.conv`` is an upsampler in every UNet: an attention block has no
    such layer)."""
    suffix = lora_suffix(key)
    path = re.sub(r"^(output_blocks\.\d+)\.1\.conv$", r"\1.2.conv",
                  key.removeprefix(LDM_UNET_PREFIX).removesuffix(suffix))
    return kohya_name(path) + KOHYA_SUFFIX.get(suffix, suffix)


def ldm_unet_as_diffusers(file: Path, pipe) -> Path | None:
    """A ComfyUI UNet LoRA file (:func:`is_ldm_unet_lora`) in diffusers' layout, in a temporary folder (removed when
    the process ends): its layers named as kohya's (its text encoders' too, :func:`comfy_encoder_name`; an unchanged
    one left out) and read as a kohya file (:func:`_kohya_as_diffusers`). None for a file of another layout. A text
    encoder's layer diffusers has no name for raises ValueError; diffusers' errors (a file of another UNet's blocks)
    pass through."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        if not is_ldm_unet_lora(f.keys()):
            return None
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    named = {}
    for key, value in tensors.items():
        if key.startswith(LDM_UNET_PREFIX):
            named[ldm_unet_name(key)] = value
        elif (name := comfy_encoder_name(key)) is not None:
            named[name] = value
        elif not unchanged_layer(tensors, key):  # (sample and --init-lora refused it before: ldm_unet_refusal)
            raise ValueError(f"{key} is a layer diffusers' LoRA loader has no name for")
    return _kohya_as_diffusers(named, pipe)


# diffusers' SD 1.x/2.x/SDXL LoRA reader (StableDiffusion(XL)LoraLoaderMixin.lora_state_dict, then its UNet's and text
# encoders' loads): a file whose every key is kohya's (lora_unet_, lora_te_, lora_te1_, lora_te2_) is converted, and
# where its UNet names are sgm's blocks (input_blocks, middle_block, output_blocks) beside diffusers' (down_blocks,
# mid_block, up_blocks) the sgm ones are popped; any other file is read by its unet. / text_encoder. /
# text_encoder_2. names, every other key (kohya's beside them, another prefix) left out: each without a word (sample
# then refused such a file as "trained for another base model", or, a kohya file whose encoder lacks out_proj and so
# was converted first, loaded it without them)
_SGM_BLOCKS, _DIFFUSERS_BLOCKS = ("input_blocks", "middle_block", "output_blocks"), ("down_blocks", "mid_block",
                                                                                    "up_blocks")
_DIFFUSERS_PARTS = ("unet.", "text_encoder.", "text_encoder_2.")


def unet_reader_drops(keys) -> list[str]:
    """The keys of a UNet LoRA file (its tensor names ``keys``) that diffusers' SD/SDXL reader leaves out (above): in
    a file of diffusers' names, those of another prefix, else (none) the kohya ones beside them; in a kohya file, sgm
    block names beside diffusers' block names."""
    kohya = [k for k in keys if k.startswith(KOHYA_PREFIXES)]
    if len(kohya) < len(keys):
        return [k for k in keys if not k.startswith(KOHYA_PREFIXES + _DIFFUSERS_PARTS)] or kohya
    unet = [k for k in kohya if k.startswith("lora_unet_")]
    sgm = [k for k in unet if any(p in k for p in _SGM_BLOCKS)]
    return sgm if any(p in k for k in unet if k not in sgm for p in _DIFFUSERS_BLOCKS) else []


def unet_left_out_refusal(label: str, key: str) -> str:
    """The line for a UNet LoRA with a layer :func:`unet_reader_drops` found (``label``: the option and its value)."""
    return left_out_refusal(label, key, "it reads one layout: kohya's lora_unet_ / lora_te_ names, sgm's input_blocks "
                                        "or diffusers' down_blocks, or diffusers' unet. / text_encoder. names; no "
                                        "other prefix")


def _not_lora_key(keys) -> str | None:
    """The first key of a UNet LoRA file that diffusers' reader fails on as no LoRA's (kohya's: not its lora_down /
    lora_up / alpha; diffusers': no "lora" in it, a norm's weight), which it blames on the model."""
    kohya = all(k.startswith(KOHYA_PREFIXES) for k in keys)
    return next((k for k in sorted(keys) if (not k.endswith(KOHYA_LAYER_SUFFIXES)
                                              if kohya else "lora" not in k and not k.endswith(".alpha"))), None)


def unet_layers_read(file: Path, label: str) -> Path:
    """``file`` (a UNet LoRA) as diffusers' SD/SDXL reader reads all of it: ``file`` itself, or a copy in a temporary
    folder without the layers it would leave out (:func:`unet_reader_drops`; kohya's encoder layers it has no name
    for, kohya_layers.kohya_encoder_unread) that change nothing (an all-zero lora_up or lora_down, as diffusers leaves
    out zeros). Such a layer that changes the model, or a key of no LoRA's, raises UserError (``label``: the option
    and its value). ComfyUI's LDM names are checked before (:func:`ldm_unet_refusal`)."""
    from lowmem_alignprop.lora.kohya_layers import kohya_encoder_unread
    from lowmem_alignprop.run.tensor_files import tensors_on_demand

    tensors = tensors_on_demand(file)
    keys = set(tensors)
    if is_ldm_unet_lora(keys):
        return file
    if (key := _not_lora_key(keys)) is not None:
        raise UserError(f"{label} {not_lora_refusal(key)}")
    left = set()
    while dropped := unet_reader_drops(sorted(keys)) or sorted(k for k in keys if kohya_encoder_unread(k)):
        if (key := first_changed((tensors, k) for k in dropped)) is not None:
            raise UserError(f"{label} {comfy_encoder_refusal(key)}" if kohya_encoder_unread(key) else
                            unet_left_out_refusal(label, key))
        layers = {k.removesuffix(lora_suffix(k) or "") for k in dropped}
        left |= {k for k in keys if k.removesuffix(lora_suffix(k) or "") in layers}
        keys -= left
    if not left:
        return file
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.run.tensor_files import read_safetensors_metadata

    out = temporary_folder() / LORA_WEIGHT_NAME  # (its header kept: a diffusers file's adapter config, its alphas)
    whole = load_file(str(file))  # (read once: not the file opened again for each tensor kept)
    save_file({k: whole[k].contiguous() for k in sorted(keys)}, str(out), metadata=read_safetensors_metadata(file))
    return out


def kohya_flow_for_diffusers(tensors: dict[str, torch.Tensor], file: Path, label: str) -> Path:
    """An SD3/FLUX LoRA ``file`` in kohya's or the original transformer's names (``tensors``: its weights) as the file
    diffusers' loaders read: split back into the transformer's layers (flow_export.kohya_as_diffusers), or, a FLUX.1
    file with a layer lowmem-alignprop does not train (the blocks' modulation, img_in...), in kohya's names for
    diffusers' FLUX reader, which maps every such layer (a second CLIP, which it drops, raises UserError). The one
    rule of ``sample --lora`` and ``--init-lora`` (``label``: the option and its value). (Here, not in flow_export:
    the copy is lora_files', which imports flow_export.)"""
    from lowmem_alignprop.lora import flow_export

    named = flow_export.kohya_names(tensors, label)
    if flow_export.untrained_flux_layer(named) is None:
        return flow_export.kohya_as_diffusers(file, label, named)
    if refusal := flow_export.second_clip_refusal(named, label):
        raise UserError(refusal)
    return safetensors_copy(named)


def kohya_encoders_without_out_proj(keys) -> bool:
    """Whether a kohya LoRA has an encoder's layers (``lora_te_``, ``lora_te1_``, ``lora_te2_``) without any of its
    ``out_proj``: diffusers' reader names that encoder's attention layers in its old layout (``to_q_lora``) and
    tells it by an out_proj layer alone, so it dropped the q/k/v layers beside mlp ones, or raised "Could not
    automatically infer state dict type" (sd-scripts adapts every encoder linear; a pruned file or another tool's
    may not)."""
    parts = {}
    for key in keys:
        if (prefix := next((p for p in KOHYA_ENCODERS if key.startswith(p)), None)) is not None:
            parts[KOHYA_ENCODERS[prefix]] = parts.get(KOHYA_ENCODERS[prefix], False) or "_out_proj." in key
    return not all(parts.values())


def kohya_encoders_as_diffusers(file: Path, pipe) -> Path | None:
    """A kohya UNet LoRA file whose encoder layers lack out_proj (:func:`kohya_encoders_without_out_proj`) in
    diffusers' layout (:func:`_kohya_as_diffusers`), in a temporary folder (removed when the process ends); None for
    any other file. diffusers' errors pass through."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        if not kohya_encoders_without_out_proj(f.keys()):
            return None
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _kohya_as_diffusers(tensors, pipe)


def _kohya_as_diffusers(tensors: dict, pipe) -> Path:
    """A kohya LoRA (``tensors``: ``lora_unet_*``, ``lora_te*``) in diffusers' layout, in a temporary folder: each
    alpha / rank folded into its ``lora_up`` (alpha = rank where it has none), read by ``pipe``'s own kohya reader
    (the UNet's config numbers sgm blocks), each encoder's part named in diffusers' layout, which its reader reads
    without telling (an encoder without out_proj included). A second encoder's layers on a model with one raise
    ValueError."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    state, _ = type(pipe).lora_state_dict(every_alpha_folded(tensors), unet_config=pipe.unet.config)
    parts = diffusers_parts(state)
    if "text_encoder_2" in parts and getattr(pipe, "text_encoder_2", None) is None:
        raise ValueError("it adapts a second text encoder (lora_te2_), which this model has not")
    layers = {f"{part}_lora_layers": named for part, named in parts.items() if part != "unet"}
    if "unet" in parts:
        layers["unet_lora_layers"] = convert_unet_state_dict_to_peft(parts["unet"])
    out = temporary_folder() / "lora"
    type(pipe).save_lora_weights(str(out), **layers)
    return out / LORA_WEIGHT_NAME


def _diffusers_file(weights: dict, known: dict, part: str | None = None) -> Path:
    """peft-named weights (and their adapter config ``known``) as diffusers' LoRA file of ``part`` (unet or
    transformer; None: the one its names tell, :func:`bare_lora_part`, else unet), in a temporary folder, the names as
    they are: diffusers' peft-to-diffusers converter renames the attention layers' alone, and its reader, finding a
    conv layer's peft names beside them (a LoCon adapter), then dropped every attention layer."""
    from diffusers import StableDiffusionPipeline

    out = temporary_folder() / "lora"
    if (part or bare_lora_part(weights)) == "transformer":
        from diffusers import StableDiffusion3Pipeline  # an SD3/FLUX transformer's adapter: peft's keys as they are
        StableDiffusion3Pipeline.save_lora_weights(str(out), transformer_lora_layers=weights,
                                                   transformer_lora_adapter_metadata=known)
        return out / LORA_WEIGHT_NAME
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=weights, unet_lora_adapter_metadata=known)
    return out / LORA_WEIGHT_NAME

"""``export --merge``: the base model with the LoRA fused in (diffusers' ``fuse_lora`` then
``unload_lora_weights``), checked against the model the LoRA was trained on; with ``--single-file`` one
``.safetensors`` in the original layout.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch

from lowmem_alignprop.lora.lora_files import (HEADER_BASE_MODEL, HEADER_REWARD, Lora, check_recorded_base,
                                                  header_lora_digest, lora_digest, read_lora, shared_base_record,
                                                  shared_name, shared_reward)
from lowmem_alignprop.lora.lora_formats import EXPORTED_FROM, file_stem, model_spec
from lowmem_alignprop.lora.model_card import num, run_info
from lowmem_alignprop.run.filenames import LORA_BASE_FILE, LORA_WEIGHT_NAME
from lowmem_alignprop.run.merged_models import MERGED_KEY, merged_record
from lowmem_alignprop.settings.errors import UserError, first_line


def merge_base(lora: Lora, model: str | None) -> str:
    """The base model to merge into: ``--model`` or the one the LoRA was trained on (base_model.json)."""
    spec = model or lora.base_model
    if not spec:
        raise UserError(f"--merge: {lora.named} does not say which base model it was trained on (no {LORA_BASE_FILE}): "
                        "pass it with --model")
    from lowmem_alignprop.models.loading import resolve_model

    if not model:
        check_recorded_base(spec, f"--merge: {lora.named}",  # (a checkpoint's record: its state.json)
                            "its state.json" if lora.step is not None else LORA_BASE_FILE)
    kind, _ = resolve_model(spec)
    if kind in ("arch", "flow_arch"):
        raise UserError(f"--merge onto {spec}: that is an architecture with random weights, not a model: pass the "
                        "model the LoRA was trained on with --model")
    return spec


def load_base(spec: str, run_config: dict | None = None):
    """The base model's diffusers pipeline, loaded in full (every component: the merged model is complete, SD3's T5
    too where the run trained without it). SD3/FLUX load as training loads them (a transformer file takes the run's
    model_components), in fp32. The run's image settings go with it: the VAE it decoded with (``--set vae``: a
    "no-vae" single file has none of its own) and what its UNet was taken to predict (``prediction_type``), so that
    the merged model renders as the run did. A hub id's ``components_revision`` and ``vae_revision`` (the commits
    the run's parts came from: base_fingerprint.recorded_pins) load those snapshots, not main's."""
    run = run_config or {}
    vae = run.get("vae") or ""
    pipe = _base_pipeline(spec, run, vae)
    said = logging.getLogger("lowmem_alignprop")
    if vae:
        said.info("--merge: the merged model decodes with the VAE its run trained with, %s%s", vae,
                  f" at commit {run['vae_revision']}" if run.get("vae_revision") else "")
    if run.get("components_revision") and run.get("model_components"):
        said.info("--merge: the text encoders, VAE and scheduler of model_components=%s at commit %s, the one its run "
                  "trained with", run["model_components"], run["components_revision"])
    from lowmem_alignprop.models.sampling import with_schedule

    predicts = run.get("prediction_type") or "auto"  # (auto: as its scheduler config says)
    pipe.scheduler = with_schedule(pipe.scheduler, None if predicts == "auto" else predicts,
                                   zero_snr=bool(run.get("zero_terminal_snr")))
    return pipe


def _base_pipeline(spec: str, run: dict, vae: str):
    from lowmem_alignprop.run import hub
    from lowmem_alignprop.models.loading import (hub_message, is_flow_hub_id, load_single_file_with_vae, load_vae,
                                                 resolve_model)
    from lowmem_alignprop.models.pipeline_load import load_pipeline

    kind, where = resolve_model(spec)
    components = run.get("model_components") or ""
    revision = run.get("revision") or "" if kind == "hub" else ""
    # (an SD3/FLUX hub id as training loads it: an SD3 snapshot saved without T5 has null parts diffusers' generic
    # load refuses)
    flow_hub = kind == "hub" and is_flow_hub_id(where, revision)
    if kind.startswith("flow") or (kind == "file" and components) or flow_hub:
        from lowmem_alignprop.models.family import family_for
        from lowmem_alignprop.models.loading import load_components
        from lowmem_alignprop.settings.config import Config

        if run.get("t5_encoder") is False:  # a training run's memory choice, not the model's
            logging.getLogger("lowmem_alignprop").warning(
                "the LoRA's run trained without T5 (t5_encoder=false): the merged model keeps the base's T5-XXL, as "
                "the base is (its images with T5 differ from the run's; StableDiffusion3Pipeline.from_pretrained(..., "
                "text_encoder_3=None, tokenizer_3=None) renders without it, as training did)")
        comps = load_components(Config(model=spec, model_components=components, vae=vae, revision=revision,
                                       components_revision=run.get("components_revision") or "",
                                       vae_revision=run.get("vae_revision") or ""))
        return family_for(comps).make_pipeline(comps)
    if kind == "tiny":
        from lowmem_alignprop.models.tiny import tiny_model_dir
        kind, where = "dir", str(tiny_model_dir())
    try:
        if kind == "file":
            return load_single_file_with_vae(where, run.get("model_arch") or "auto", torch.float32, vae,
                                             run.get("vae_revision") or "")
        if kind == "hub":
            hub.offline()
        pipe = load_pipeline(where, hub_id=kind == "hub", revision=revision)
        if vae:
            pipe.vae = load_vae(vae, torch.float32, pipe.vae, run.get("vae_revision") or "")
        return pipe
    except UserError:
        raise
    except (OSError, ValueError) as e:
        if kind == "hub":
            raise UserError(hub_message("model", where, e, use="pass --model DIR", revision=revision)) from None
        raise UserError(f"--merge: could not load base model {spec!r}: {first_line(e)}") from None


def merge_record(lora: Lora, spec: str, weight: float) -> list[dict]:
    """The merged model's record: the LoRAs already fused into ``spec``, then this one at ``weight``. A model that
    `export --merge` made with this LoRA already in it is refused: it would get it twice (its weights match the
    base's fingerprint: the LoRA leaves the first layer alone)."""
    held, digest = merged_record(spec), lora_digest(lora)
    if (r := held_in(held, digest)) is not None:
        raise UserError(f"--merge: {spec} already holds this LoRA ({r.get('lora')}, merged at weight "
                        f"{num(float(r.get('weight', 1.0)))}): merging it again would apply it twice; merge it "
                        f"into {r.get('into') or 'the base model'} instead (leave --model out, or pass --model "
                        f"{r.get('into')}), with --weight for another strength")
    into = str(Path(spec).expanduser().absolute()) if Path(spec).expanduser().exists() else spec  # (a name, a hub id)
    named = str(Path(lora.named).absolute()) if lora.hub is None else lora.hub.pinned  # (a hub LoRA: not the cache)
    return [*held, {"lora": named, "digest": digest, "weight": weight, "into": into}]


def held_in(held: list[dict], digest: str) -> dict | None:
    """The entry of a merged model's record (:func:`merged_record`) for the LoRA of ``digest`` (:func:`lora_digest`),
    its ``weight`` the sum of every merge of it (merged at 0, or at 0.5 then -0.5: it holds none of it: None), else
    None."""
    entries = [r for r in held if r.get("digest") == digest]
    total = sum(float(r.get("weight", 1.0)) for r in entries)
    return {**entries[-1], "weight": total} if entries and total != 0 else None


def refuse_held_loras(specs: list, model: str) -> None:
    """``sample``: a LoRA (lora_args.LoraSpec) given at a positive weight to a model that `export --merge` made with
    it (its merged_loras.json or single-file header records it): one line, as export --merge refuses it (a negative
    weight, which takes it out again, passes). An export is told by the digest its base_model.json records of the
    LoRA it was made from, a kohya file shared alone by its header's; a LoRA from elsewhere is not told apart."""
    held = merged_record(model)
    if not held:
        return
    for spec in specs:
        if spec.weight <= 0 or (digest := _digest_of(spec)) is None:
            continue
        if (entry := held_in(held, digest)) is not None:
            into = merged_into(entry)[1] if entry.get("into") else "--model the base model"
            raise UserError(f"--lora {spec.arg}: --model {model} already holds this LoRA (export --merge fused it at "
                            f"weight {float(entry.get('weight', 1.0)):g}): sampling it with the LoRA again applies it "
                            f"twice; pass {into}, the model it was merged into")


def merged_into(entry: dict) -> tuple[str, str]:
    """The model an entry of a merged model's record (:func:`merge_record`) went into, in words and as the flags that
    load it (a hub id with its commit, ``into_revision``: base_fingerprint.model_at_commit)."""
    from lowmem_alignprop.run.base_fingerprint import model_at_commit, recorded_commit

    return model_at_commit(str(entry.get("into")), recorded_commit(entry, "into_revision"))


def _digest_of(spec) -> str | None:
    """The digest (:func:`lora_digest`) of the LoRA ``spec`` (lora_args.LoraSpec) names: a run's, or the one an export
    was made from (its base_model.json's ``lora_digest``, or a kohya file's header, for the file shared alone); None
    for a LoRA from elsewhere."""
    from lowmem_alignprop.lora.base_records import read_base_record

    try:
        return lora_digest(read_lora(str(spec.named)))
    except UserError:  # an export (a kohya file, a peft folder) or a LoRA from elsewhere
        digest = (read_base_record(spec) or {}).get(EXPORTED_FROM)
        return digest if isinstance(digest, str) and digest else header_lora_digest(spec.header_file)


def merge_components(lora: Lora, spec: str) -> str:
    """model_components for a merge into ``spec``: the LoRA's run's; for an SD3/FLUX transformer file without them
    (an `export --merge --single-file` of the model the LoRA was trained on, say), the diffusers folder or hub id of
    that model, which holds the file's text encoders, VAE and scheduler (said). Else, for such a file, one line."""
    from lowmem_alignprop.models.loading import is_flow_hub_id, is_flow_transformer_file, resolve_model

    kind, where = resolve_model(spec)
    if lora.model_components or kind != "file" or not is_flow_transformer_file(where):
        return lora.model_components
    trained_on = lora.base_model or ""
    on_kind, on_where = resolve_model(trained_on) if trained_on else ("", "")
    if on_kind == "flow_dir" or (on_kind == "hub" and is_flow_hub_id(on_where)):
        logging.getLogger("lowmem_alignprop").info(
            "--merge: %s holds the transformer alone: its text encoders, VAE and scheduler are taken from %s, the "
            "model %s was trained on", spec, trained_on, lora.named)
        return trained_on
    raise UserError(f"--merge into {spec}: it holds an SD3/FLUX transformer alone, and {lora.named} was not trained on "
                    "a diffusers folder with the model's text encoders, VAE and scheduler: merge into the model's "
                    "diffusers folder (--model DIR), or into an `export --merge` folder (made without --single-file)")


def merged_pipeline(lora: Lora, model: str | None, weight: float):
    """(the base pipeline with the LoRA fused at ``weight``, the merged model's record: :func:`merge_record`, its
    last entry this merge's); a LoRA of another base model, or a model that already holds it, raises UserError."""
    from lowmem_alignprop.run import base_fingerprint
    from lowmem_alignprop.lora.adapters import load_adapters
    from lowmem_alignprop.lora.lora_args import LoraSpec
    from lowmem_alignprop.lora.lora_checks import check_lora_files
    from lowmem_alignprop.step.inputs import missing_recorded, recorded_path_line

    spec = merge_base(lora, model)
    record = merge_record(lora, spec, weight)  # (before the model loads: minutes)
    adapter = LoraSpec(arg=str(lora.named), file=lora.path / LORA_WEIGHT_NAME, weight=weight, name="alignprop")
    record[-1].update(run_settings(adapter))  # what `sample --model MERGED` renders with (the LoRA folder may go)
    # the settings it renders with, as `sample LORA` takes them: a LoRA copied out of its run, its record's
    run = {**lora.run_config, **record[-1].get("image_settings", {})}
    components = merge_components(lora, spec)
    if (found := missing_recorded(run, ("vae", "model_components"))) is not None:  # (export has no --set)
        raise UserError(recorded_path_line(f"--merge: {lora.named}", run, found, "its run's record", "export",
                                           flag=False))
    check_lora_files([adapter], spec, components, "--merge:")  # (before the model loads: minutes)
    commit = base_fingerprint.trained_commit(lora.base) if not model else ""  # a hub id's: the commit it trained on
    pins = base_fingerprint.recorded_pins(lora.base, {**run, "model_components": components})
    if components != lora.model_components:  # the hub id it trained on, for a transformer file: its parts at the
        # commit it trained on
        pins.update(base_fingerprint.recorded_pins({"components_revision": base_fingerprint.trained_commit(lora.base)},
                                                   {"model_components": components}))
    pipe = load_base(spec, {**run, "model_components": components, "revision": commit, **pins})
    unet = getattr(pipe, lora.component, None)
    if unet is None or not hasattr(pipe, "load_lora_weights"):
        theirs = "a UNet model (SD 1.x, 2.x or SDXL)" if not lora.flow else "an SD3/SD3.5 or FLUX.1 model"
        raise UserError(f"--merge onto {spec}: the LoRA adapts {theirs} and {spec} is not one: pass the model it was "
                        "trained on with --model")
    ours = base_fingerprint.fingerprint(type("Cfg", (), {"model": spec}), unet)
    # (the model it goes into, by its weights: `sample --model MERGED` tells a LoRA of it from one of a same-named base)
    record[-1]["into_fingerprint"] = {k: ours[k] for k in ("unet_config_sha", "conv_in")}
    if commit:  # a hub id at the commit the LoRA trained on (its name alone loads the hub's main)
        record[-1]["into_revision"] = commit
    record[-1].update(pins)  # the commits its other parts (text encoders, VAE...) were read at: the folder holds them
    if lora.base:
        problem = base_fingerprint.fingerprint_difference(lora.base, ours)
        if problem:
            raise UserError(f"--merge: {lora.named} was trained on base model {lora.base.get('model')!r}, and "
                            f"{problem} in {spec!r}: merge it into the model it was trained on ({_merge_fix(lora)})")
    load_adapters(pipe, [adapter], spec)  # a LoRA of other layer shapes: one line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # with the text encoders' layers its run kept as its --init-lora had them (lora.kept), else they were dropped
        encoders = sorted({k.split(".", 1)[0] for k in lora.kept} - {lora.component})
        pipe.fuse_lora(lora_scale=weight, components=[lora.component, *encoders], adapter_names=["alignprop"])
        pipe.unload_lora_weights()
    return pipe, record


def _merge_fix(lora: Lora) -> str:
    """How to merge into the model ``lora`` was trained on: leave --model out, or name it (a hub id's commit, which
    export takes no --set revision for: leaving --model out loads it; the name alone would load the hub's main)."""
    from lowmem_alignprop.run.base_fingerprint import trained_commit

    model, commit = lora.base.get("model"), trained_commit(lora.base)
    if commit:
        return f"leave --model out: it loads {model} at commit {commit}"
    return f"leave --model out, or pass --model {model}"


def write_single_file(lora: Lora, pipe, folder: Path, merged: list[dict]) -> Path:
    """The merged pipeline as one original-layout (LDM) checkpoint; its header names the base model, the LoRA's
    weight in it, the run's reward and steps, and the LoRAs the model holds (``merged``: :func:`merge_record`'s), each
    model and LoRA by name (:func:`shared_record`), and has the model spec's keys (lora_formats.model_spec).
    SD3/SD3.5 and FLUX.1: the merged transformer alone, in Stability's MMDiT or Black Forest Labs' layout
    (models/flow_layout.py; the text encoders and VAE are the base model's)."""
    from safetensors.torch import save_file

    from lowmem_alignprop.models.arch import V_PRED_KEY, ZERO_SNR_KEY
    from lowmem_alignprop.models.ldm_layout import pipeline_to_ldm

    info = run_info(lora)
    path = folder / f"{file_stem(lora).removesuffix('_lora')}_merged.safetensors"
    predicts_v = pipe.scheduler.config.get("prediction_type") == "v_prediction"  # (its v_pred key; its spec says it)
    if lora.family == "flux":
        from lowmem_alignprop.models.flow_layout import flux_to_original
        state = {k: v.contiguous() for k, v in flux_to_original(pipe.transformer.state_dict()).items()}
    elif lora.flow:
        from lowmem_alignprop.models.flow_layout import sd3_to_original
        state = sd3_to_original(pipe.transformer.state_dict(), pipe.transformer.config.num_layers)
    else:
        state = pipeline_to_ldm(pipe)
        if predicts_v:  # ComfyUI (and Forge) sample a checkpoint
            state[V_PRED_KEY] = torch.zeros(0)  # as v-prediction by this key's presence; its weights cannot say it
            if pipe.scheduler.config.get("rescale_betas_zero_snr"):
                state[ZERO_SNR_KEY] = torch.zeros(0)  # ... and at zero terminal SNR by this one
    save_file(state, str(path), metadata={
        "format": "pt", HEADER_BASE_MODEL: shared_name(str(lora.base_model or "")),
        "alignprop_lora_weight": num(merged[-1]["weight"]),
        HEADER_REWARD: shared_reward(info.get("reward")), "alignprop_steps": str(info.get("steps", "")),
        MERGED_KEY: json.dumps(shared_record(merged)),  # and the model spec, as sd-scripts' checkpoints have it:
        **model_spec(lora, info, path.stem, checkpoint=True, v=predicts_v)})  # A1111's and Civitai's panels show it
    return path


def run_settings(adapter) -> dict:
    """The image settings and scoring the run of the LoRA ``adapter`` (a lora_args.LoraSpec) sampled with, keyed as
    its base_model.json keys them (``image_settings``, ``scoring``; base_records.recorded_base reads its run's
    config.yaml, a checkpoint's state or that record): a merged model's record of each LoRA keeps them, and ``sample
    --model MERGED`` renders with them as ``sample LORA`` does, with ``reward_sha`` (the reward file's source it
    trained with, where recorded). {} for a LoRA whose run records none."""
    from lowmem_alignprop.lora.base_records import recorded_base, recorded_reward_sha
    from lowmem_alignprop.run.base_fingerprint import REWARD_SHA
    from lowmem_alignprop.settings.config import RUN_SCORING_SETTINGS

    if (base := recorded_base(adapter, model_given=True)) is None:
        return {}
    settings, sha = base[1], recorded_reward_sha(adapter)  # (and the reward file's source: sample says an edit)
    return {"image_settings": {k: v for k, v in settings.items() if k not in RUN_SCORING_SETTINGS},
            "scoring": {k: v for k, v in settings.items() if k in RUN_SCORING_SETTINGS},
            **({REWARD_SHA: sha} if sha else {})}


def shared_record(merged: list[dict]) -> list[dict]:
    """A merged model's record (:func:`merge_record`) as a file shared with others holds it: its LoRAs and models by
    name, as the kohya header names them (lora_files.shared_name: a user's folders stay theirs), and their runs'
    settings as base_model.json is shared (lora_files.shared_base_record: a local VAE left out, reward and prompt files
    by name). The digests and weights, which tell a LoRA merged in before, stay; a merged folder's MERGED_FILE keeps
    the paths."""
    return [{**r, **{k: shared_name(r[k]) for k in ("lora", "into") if isinstance(r.get(k), str)},
             **shared_base_record({k: r[k] for k in ("image_settings", "scoring") if isinstance(r.get(k), dict)})}
            for r in merged]

"""Which base model a run trained on: the fingerprint of its denoiser (config digest, first weights' statistics, how it
was sampled, the hub commits its parts came from), base_model.json that carries it beside a LoRA, and a resume's
check that its base model is the checkpoint's (the same weights, the same commits or the same weights at another
one, SD3's T5 as it was). Reads state.json's ``fingerprint``; knows nothing of the checkpoint folder's layout."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from lowmem_alignprop.memory import quant
from lowmem_alignprop.run.runlock import global_rank
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.settings.model_kind import denoiser_label

log = logging.getLogger("lowmem_alignprop")

REWARD_SHA = "reward_sha"  # base_model.json's key of the reward file's source digest its LoRA trained with


def fingerprint(cfg, unet, schedule: dict | None = None, t5: bool | None = None,
                revision: str | None = None, components_revision: str | None = None,
                vae_revision: str | None = None) -> dict[str, Any]:
    """What identifies the base model: its UNet config and a few statistics of its first weights; and, where given,
    how its UNet was sampled (``schedule``, the scheduler's config: what it predicts, epsilon or v_prediction, and
    whether at zero terminal SNR, which a single file's weights cannot tell; the exports read them) and, for SD3,
    whether its T5-XXL encoded the prompts (``t5``: the folder may lack it with t5_encoder on; :func:`check_t5`);
    a hub id's ``revision``: the commit its snapshot held (pinned or main's), which a resume compares
    (:func:`check_revision`) and `sample`/`export --merge` of its LoRA load again; a transformer file's
    ``components_revision``: the commit of the hub snapshot its model_components came from, which a resume compares
    (:func:`check_components_revision`); a hub id vae's ``vae_revision``, likewise (:func:`check_vae_revision`);
    `sample`/`export --merge` of its LoRA load both again.

    Statistics, not a hash, so fp16/bf16/fp32 loads of the same model match; computed before
    DeepSpeed partitions the weights.
    """
    conf_sha, stored_sha = config_sha(unet), config_sha(unet, storage=True)
    first = getattr(unet, "conv_in", None)  # a UNet's first conv; a transformer's first weight (its patch embedding)
    name, w = ("conv_in.weight", first.weight) if first is not None else next(unet.named_parameters())
    # a weight bitsandbytes quantized (base_quant=int8/nf4: FLUX.1's timestep embedder) holds codes: the statistics
    # of the weight as read, which quant.quantize_in_place kept, name the model (the codes': quantized_conv_in)
    stored = quant.weight_stats(w)
    read = getattr(unet.get_submodule(name.rpartition(".")[0]), quant.AS_READ, None)
    fp = {"model": cfg.model, "unet_config_sha": conf_sha, "denoiser": denoiser_label(first is None),
          "conv_in": read or stored}
    predicts = (schedule or {}).get("prediction_type")
    return {**fp, **({"prediction_type": predicts} if predicts else {}),
            **({"zero_terminal_snr": True} if (schedule or {}).get("rescale_betas_zero_snr") else {}),
            **({"quantized_config_sha": stored_sha} if stored_sha != conf_sha else {}),
            **({"quantized_conv_in": stored} if read else {}),
            **({"t5": t5} if t5 is not None else {}), **({"revision": revision} if revision else {}),
            **({"components_revision": components_revision} if components_revision else {}),
            **({"vae_revision": vae_revision} if vae_revision else {})}


def config_sha(unet, storage: bool = False) -> str:
    """The fingerprint's architecture part: a digest of the denoiser's config (its public keys), without the
    ``quantization_config`` bitsandbytes adds to it (base_quant=int8/nf4 of a model folder): how the weights are
    stored is not which model it is, and a resume may change base_quant. ``storage``: with it, as the digest was
    made before (a record of a quantized base then held that one: :func:`fingerprint_difference` takes both)."""
    conf = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")
            and (storage or k != "quantization_config")}
    return hashlib.sha256(json.dumps(conf, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_record(fp: dict[str, Any], config: dict[str, Any], sources: Any = None, reward_sha: str | None = None) -> str:
    """base_model.json beside a LoRA: the base model's fingerprint, the image settings its run sampled with
    (``image_settings``) and the reward and prompts it was scored with (``scoring``; a hub dataset's prompts at the
    commit the run read, ``sources``: its records), so that a LoRA folder or an export copied away from its run
    still samples and scores as the run did; ``reward_sha``: the digest of the reward file's source it trained with
    (rewards.reward_source_digest; ``sample`` says where that file is another now)."""
    from lowmem_alignprop.run.hub import with_pinned_prompts
    from lowmem_alignprop.settings.config import image_settings, scoring_settings

    return json.dumps({**fp, **({REWARD_SHA: reward_sha} if reward_sha else {}),
                       "image_settings": image_settings(config),
                       "scoring": scoring_settings(with_pinned_prompts(config, sources))}, indent=1)


def load_base_record(path: Path) -> dict[str, Any]:
    """A base_model.json (:func:`base_record`) as written; OSError where it cannot be read, ValueError where it is not
    a JSON object (damaged, or another file of that name). Each reader decides what a missing or damaged one means."""
    base = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(base, dict):
        raise ValueError("wrong shape: not a JSON object")
    return base


def another_model(saved: dict[str, Any], model: str, problem: str, path: Path) -> UserError:
    """The one line for a resume of ``saved``'s checkpoint with another base model, ``model``."""
    return UserError(f"checkpoint {path} belongs to another base model ({saved.get('model')!r}; {problem} from "
                     f"{model!r}): resume with --model {saved.get('model')}, or start a new run in another "
                     "--output-dir")


def fingerprint_difference(saved: dict[str, Any], ours: dict[str, Any]) -> str | None:
    """How the base model of ``saved`` differs from ``ours`` (None: the same model)."""
    denoiser = ours.get("denoiser", "denoiser")
    # (a record written before the digest left quantization_config out, by a run whose base was loaded quantized
    # through diffusers, matches this model loaded so again: ours' quantized_config_sha; other changes of base_quant
    # of such a record are still told apart as another architecture)
    if saved.get("unet_config_sha") not in (ours["unet_config_sha"], ours.get("quantized_config_sha")):
        return f"its {denoiser} architecture differs"
    try:  # (likewise a record of an int8/nf4 run written before the fingerprint took its first weight as read, not
        # as bitsandbytes' codes: ours' quantized_conv_in, this model loaded so again)
        a = torch.tensor(saved.get("conv_in", []), dtype=torch.float64)
        bs = [torch.tensor(b, dtype=torch.float64) for b in (ours["conv_in"], ours.get("quantized_conv_in"))
              if b is not None]
    except (TypeError, ValueError, RuntimeError):  # a record of the wrong shape: not this model's
        return "its weights' record is unreadable"
    if not any(a.shape == b.shape and torch.allclose(a, b, rtol=2e-2, atol=2e-3) for b in bs):
        return f"its {denoiser} weights differ"
    return None


def check_fingerprint(state: dict[str, Any], ours: dict[str, Any], cfg, path: Path) -> None:
    """A resume's base model (its fingerprint ``ours``) must be the checkpoint's (``state``), with its T5 as it was."""
    saved = state["fingerprint"]
    problem = fingerprint_difference(saved, ours)
    if problem and not changed_revision(saved, ours):
        raise another_model(saved, ours["model"], problem, path)
    check_revision(saved, ours, path, problem)
    check_components_revision(state, ours, cfg, path)
    check_vae_revision(state, ours, cfg, path)
    check_t5(state, ours, cfg, path)
    if saved.get("model") != ours["model"] and global_rank() == 0:
        log.warning("resume: the checkpoint was trained with --model %s; this run's %s is the same model",
                    saved.get("model"), ours["model"])


def trained_commit(record: dict[str, Any] | None) -> str:
    """The commit a hub id's run trained on, as its fingerprint (base_model.json, a checkpoint's) records it ("":
    none recorded: a local model, or a record from before it was kept); `sample`, `export --merge` and the card
    load or name it again."""
    return recorded_commit(record, "revision")


def recorded_commit(record: dict[str, Any] | None, key: str) -> str:
    """The commit a fingerprint (base_model.json, a checkpoint's) records under ``key`` (revision,
    components_revision, vae_revision; "": none recorded)."""
    commit = (record or {}).get(key)
    return commit if isinstance(commit, str) else ""


def recorded_pins(record: dict | None, settings: dict, fields: tuple[str, ...] = ("model_components", "vae")) \
        -> dict[str, str]:
    """The pins (settings.config.HUB_PINS: components_revision, vae_revision; with ``fields`` naming --model, revision
    too) that load a run's hub id parts (their values in ``settings``) at the commits its fingerprint (``record``:
    base_model.json, a checkpoint's) says they came from (:func:`recorded_commit`); none for a local path or a
    record without them."""
    from lowmem_alignprop.settings.config import HUB_PINS, pin_problem

    pins = {}
    for name in fields:
        pin = HUB_PINS[name]
        value, commit = str(settings.get(name) or ""), recorded_commit(record, pin)
        if commit and value and pin_problem(pin, commit, name, value) is None:  # (a hub id: a path pins nothing)
            pins[pin] = commit
    return pins


def model_at_commit(model: str, commit: str) -> tuple[str, str]:
    """(``model`` in words, the flags that load it): ``OWNER/NAME at commit SHA`` and ``--model OWNER/NAME --set
    revision=SHA`` for a hub id's commit (:func:`trained_commit`; the name alone would load the hub's main, which may
    hold other weights now), else the name and ``--model NAME``."""
    if not commit:
        return model, f"--model {model}"
    return f"{model} at commit {commit}", f"--model {model} --set revision={commit}"


def changed_revision(saved: dict[str, Any], ours: dict[str, Any]) -> bool:
    """The same hub id resolved to another commit than the checkpoint's (a record without one: not compared)."""
    was, now = saved.get("revision"), ours.get("revision")
    return bool(was and now and was != now and saved.get("model") == ours.get("model"))


def check_revision(saved: dict[str, Any], ours: dict[str, Any], path: Path, problem: str | None) -> None:
    """A resume whose hub id now resolves to another commit than the one the checkpoint trained on (the hub's main
    moved, or another --set revision): refused where the weights differ (``problem``), said where they do not."""
    if not changed_revision(saved, ours):
        return
    model, was, now = ours.get("model"), saved["revision"], ours["revision"]
    said = (f"checkpoint {path} trained on {model} at commit {was}, and {model} resolves to commit {now} here")
    if problem:
        raise UserError(f"{said} ({problem}): resume with --set revision={was} to load the commit it trained on")
    if global_rank() == 0:  # (every rank checks alike: rank 0 says it)
        log.warning("resume: %s (the same weights, as far as the fingerprint tells): training goes on; --set "
                    "revision=%s pins the commit it trained on", said, was)


def check_components_revision(state: dict[str, Any], ours: dict[str, Any], cfg, path: Path) -> None:
    """A resume whose model_components hub id now resolves to another commit than the one the checkpoint's text
    encoders, VAE and scheduler came from (the hub's main moved): refused where the two snapshots' text encoder
    weights differ (the prompts would be encoded otherwise than the run's so far, in silence); one warning where
    they are the same, or the trained commit is no longer in the cache to compare; either names --set
    components_revision=<the trained commit>, which loads it (and fetches it where it left the cache and the hub is
    reachable). A record without the commit, or model_components changed: not compared."""
    _check_part_commit(state, ours, cfg, path, "model_components", text_encoders_differ,
                       ("its text encoders' weights", "text encoder weights", "its text encoders",
                        "its text encoders, VAE and scheduler"))


def check_vae_revision(state: dict[str, Any], ours: dict[str, Any], cfg, path: Path) -> None:
    """A resume whose hub id vae now resolves to another commit than the one the checkpoint's VAE came from (the
    hub's main moved), as :func:`check_components_revision` rules: refused where the two snapshots' VAE weights
    differ (the rewards would score other decodes than the run's so far); one warning where they are the same, or
    the trained commit is no longer in the cache. A record without the commit, or vae changed: not compared."""
    def differ(old: Path, new: Path) -> str | None:  # (a pipeline's repository: its vae/)
        return weights_differ(old, new, ("vae" if (old / "vae").is_dir() or (new / "vae").is_dir() else "",))
    _check_part_commit(state, ours, cfg, path, "vae", differ,
                       ("its VAE weights", "VAE weights", "its VAE", "its VAE"))


def _check_part_commit(state: dict[str, Any], ours: dict[str, Any], cfg, path: Path, field: str, differ,
                       words: tuple[str, str, str, str]) -> None:
    """The rule of :func:`check_components_revision` and :func:`check_vae_revision` for hub id field ``field``
    (pinned by its settings.config.HUB_PINS pin): ``differ(old snapshot, new snapshot)`` names a weight file that
    differs ("" none, None: the old one is gone); ``words``: the weights, the same weights, what could not be
    compared, what goes on."""
    from lowmem_alignprop.settings.config import HUB_PINS

    pin = HUB_PINS[field]
    was, now = (state.get("fingerprint") or {}).get(pin), ours.get(pin)
    repo = getattr(cfg, field, "")
    if not (was and now and was != now) or (state.get("config") or {}).get(field, repo) != repo:
        return
    said = f"checkpoint {path} trained with {field}={repo} at commit {was}, and {repo} resolves to commit {now} here"
    found = differ(snapshot_folder(repo, was), snapshot_folder(repo, now))
    if found:
        raise UserError(f"{said} ({words[0]} differ: {found}): resume with --set {pin}={was} to load the commit it "
                        "trained on")
    if global_rank() == 0:  # (every rank checks alike: rank 0 says it)
        note = f"the same {words[1]}" if found is not None else \
            f"commit {was} is not in the local Hugging Face cache: {words[2]} could not be compared"
        log.warning("resume: %s (%s): training goes on with %s; --set %s=%s loads the commit it trained on", said,
                    note, words[3], pin, was)


def snapshot_folder(repo: str, commit: str) -> Path:
    """Where huggingface_hub keeps hub id ``repo``'s snapshot of ``commit``: ``HF_HUB_CACHE/models--OWNER--NAME/
    snapshots/COMMIT`` (a folder that model_components takes as it is, at that commit)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model") / "snapshots" / commit


TEXT_ENCODER_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def text_encoders_differ(old: Path, new: Path) -> str | None:
    """The first text encoder weight file (``text_encoder_2/model.safetensors``) in which two snapshot folders of one
    hub repository differ (:func:`weights_differ`)."""
    return weights_differ(old, new, TEXT_ENCODER_PARTS)


def weights_differ(old: Path, new: Path, parts: tuple[str, ...]) -> str | None:
    """The first weight file of subfolders ``parts`` ("": the folder itself) in which two snapshot folders of one
    hub repository differ: "" none; None: ``old`` is not there to compare. A part one of them lacks (not fetched:
    SD3's T5 with t5_encoder=false) is not compared, nor a file one of them lacks where they share others (what the
    loader did not fetch: an fp16 variant, the .bin beside a .safetensors, that `hf download` of the whole commit
    brings); a part whose files share no name (weights sharded otherwise) differs. The hub cache links each file to a
    blob named by its content: two links are compared by their blobs, unread; copies byte by byte."""
    import filecmp

    if not old.is_dir():
        return None
    for part in parts:
        if not ((old / part).is_dir() and (new / part).is_dir()):
            continue
        held = [{f.name for f in (folder / part).iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file()}
                for folder in (old, new)]
        if not (held[0] & held[1]) and (held[0] | held[1]):  # (no file to compare: other shards, told apart)
            return (Path(part) / min(held[0] | held[1])).as_posix()
        for name in sorted(held[0] & held[1]):
            a, b = old / part / name, new / part / name
            linked = a.is_symlink() and b.is_symlink()
            if os.path.realpath(a) != os.path.realpath(b) and (linked or not filecmp.cmp(a, b, shallow=False)):
                return (Path(part) / name).as_posix()
    return ""


def check_t5(state: dict[str, Any], ours: dict[str, Any], cfg, path: Path) -> None:
    """An SD3 checkpoint trained with T5-XXL resumed with a --model that has none (its model_index.json lists no
    text_encoder_3), or the reverse: the prompts would be encoded otherwise than the run's so far, without a change of
    t5_encoder to say so (a change of it is asked for: check_config warns and records it). A record from before the
    fingerprint held ``t5``: unknown, not compared."""
    was, now = (state.get("fingerprint") or {}).get("t5"), ours.get("t5")
    if was is None or now is None or was == now:
        return
    if (state.get("config") or {}).get("t5_encoder", True) != cfg.t5_encoder:
        return
    saved = (state.get("fingerprint") or {}).get("model")
    other = f"--model {saved}" if saved and saved != cfg.model else None  # (the same folder, T5 added or taken out)
    if was:
        with_t5 = f"{other} (a folder with text_encoder_3)" if other else "--model a folder with text_encoder_3"
        raise UserError(f"checkpoint {path} was trained with SD3's T5-XXL text encoder, and --model {cfg.model} has "
                        "none (no text_encoder_3): its prompts would be encoded with zeros in T5's place; resume with "
                        f"{with_t5}, or --set t5_encoder=false to train on without T5 (recorded as a change of the "
                        "run)")
    raise UserError(f"checkpoint {path} was trained without SD3's T5-XXL text encoder (its --model had no "
                    f"text_encoder_3), and --model {cfg.model} has one: its prompts would be encoded otherwise; "
                    f"resume with {other + ', or ' if other else ''}--set t5_encoder=false to train on without T5 as "
                    "it did")

"""Loading SD3 / SD3.5 and FLUX.1 models: diffusers directories and hub ids, single-file transformer checkpoints
with the rest of the pipeline from a directory, and the shipped architectures ``sd35m``, ``sd35l``, ``flux``
(random weights, built on the meta device for planning; the trainer materialises them on its device).

Everything goes through diffusers: ``DiffusionPipeline.from_pretrained`` for folders,
``SD3Transformer2DModel.from_single_file`` / ``FluxTransformer2DModel.from_single_file`` (which converts the
original Stability / Black Forest Labs layouts, and takes a diffusers-layout file as it is) for single files, except
the transformer's .safetensors: they are read block by block to where ``place`` says, an int8/nf4 base quantized
block by block (:mod:`lowmem_alignprop.models.block_loading`); diffusers' whole load is the fallback.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

import torch

from lowmem_alignprop.memory.precision import dtype_kwarg
from lowmem_alignprop.models.block_loading import Placement, check_readable, folder_files, load_by_block, strip_prefix
from lowmem_alignprop.models.model_check import check_part_folder
from lowmem_alignprop.models.pipeline_load import load_pipeline, pipeline_root
from lowmem_alignprop.settings.errors import UserError, first_line
from lowmem_alignprop.settings.hub_access import hub_file
from lowmem_alignprop.settings.model_kind import ARCH_FLOW_DIR, FLOW_FAMILIES, FLOW_KINDS, PIPELINE_FAMILIES
from lowmem_alignprop.settings.paths import describe, kind_of, looks_like_hub_id, model_index, pipeline_class

log = logging.getLogger(__name__)

FLOW_ARCHS = FLOW_KINDS  # the shipped flow architectures are named by their kinds
FLOW_PIPELINES = {cls: family for cls, family in PIPELINE_FAMILIES.items() if family in FLOW_FAMILIES}


def is_flow_dir(path: Path) -> bool:
    """A diffusers folder of an SD3/SD3.5 or FLUX.1 pipeline (its model_index.json says so)."""
    return pipeline_class(path) in FLOW_PIPELINES


def check_flow_dir(path: Path, spec: str) -> None:
    """Every component the index lists has its folder (T5 listed as null is allowed: SD3 without T5; SD3's T5 listed
    but not downloaded is left to the loader, which skips it with t5_encoder=false)."""
    index = model_index(path)
    for part in ("transformer", "vae", "scheduler", "text_encoder", "tokenizer"):
        entry = index.get(part)
        if not (isinstance(entry, list) and entry[0] is not None):
            raise UserError(f"{spec} holds a {index['_class_name']} without {part}: pass a complete model folder")
        check_part_folder(Path(path), part, spec)
    for part in ("text_encoder_2", "tokenizer_2"):  # FLUX.1's T5, SD3's CLIP-G: always needed when listed
        if (index.get(part) or [None])[0] is not None:
            check_part_folder(Path(path), part, spec)


# --------------------------------------------------------------------------------------------------
# single-file transformers
# --------------------------------------------------------------------------------------------------

def _a(family: str) -> str:
    """'an SD3' / 'a FLUX', for messages."""
    return f"{'an' if family == 'sd3' else 'a'} {family.upper()}"


def transformer_layout(keys) -> tuple[str, str]:
    """(family, layout) of a transformer checkpoint's keys: family ``sd3`` or ``flux``, layout ``original`` (BFL /
    Stability names, converted by diffusers) or ``diffusers``. Raises UserError for any other layout."""
    keys = [strip_prefix(k) for k in keys]
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("double_blocks.") and has("single_blocks."):
        return "flux", "original"
    if has("joint_blocks."):
        return "sd3", "original"
    if has("single_transformer_blocks.") and has("x_embedder."):
        return "flux", "diffusers"
    if has("transformer_blocks.") and has("pos_embed.proj."):
        return "sd3", "diffusers"
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise UserError(f"unknown transformer layout (keys {sample}...): expected an SD3/SD3.5 (joint_blocks.*) or "
                    "FLUX.1 (double_blocks.*/single_blocks.*) transformer, in the original or the diffusers layout")


def has_guidance(keys) -> bool:
    """FLUX.1-dev has a guidance embedding, FLUX.1-schnell none."""
    return any("guidance_in." in k or "guidance_embedder." in k for k in keys)


def components_folder(components: str, t5: bool = True, *, configs_only: bool = False, revision: str = "") -> Path:
    """The folder model_components names: a local path as it is; a hub id (OWNER/NAME) its snapshot at ``revision``
    (components_revision: a branch, tag or commit; "": main) in the
    local Hugging Face cache, fetched first where the hub can be reached (its parts but the transformer's weights:
    the file is the transformer; without ``t5``, t5_encoder=false, SD3's T5-XXL neither; ``configs_only``: its
    model_index.json and transformer/config.json alone, what a transformer file's config is read from). Raises
    UserError for a hub id neither gives (`hf download` named)."""
    comp = Path(components).expanduser()
    if kind_of(comp) != "missing" or not looks_like_hub_id(components):
        return comp
    from huggingface_hub import snapshot_download

    from lowmem_alignprop.run import hub

    offline = hub.offline()  # no network: the local cache only, at once (no retries)
    try:
        files = CONFIG_FILES if configs_only else _components_files(components, offline, t5, revision)
        return Path(snapshot_download(components, allow_patterns=files, local_files_only=offline,
                                      revision=revision or None))
    except (OSError, ValueError) as e:  # not cached offline, no such repository, gated
        raise UserError(hub.hub_message("model_components", components, e, use="pass --set model_components=DIR",
                                        revision=revision)) from None


# of a hub id as model_components: what a transformer file's config (and the pipeline it belongs to) is read from
CONFIG_FILES = ["model_index.json", "transformer/config.json"]


def _components_files(repo: str, offline: bool, t5: bool = True, revision: str = "") -> list[str]:
    """What a hub id as model_components is fetched for: model_index.json and the parts it lists, of the
    transformer its config only (FLUX.1-dev's weights are 23.8 GB the transformer file stands in for), without
    ``t5`` not SD3's T5-XXL (9.5 GB: the pipeline loads without it, :data:`NO_T5`)."""
    index = hub_file(repo, "model_index.json", download=not offline, revision=revision)
    unused = {"transformer", *(() if t5 else NO_T5)}
    parts = [k for k, v in ((model_index(index.parent) if index else None) or {}).items()
             if isinstance(v, list) and v and v[0] is not None and k not in unused]
    return [*CONFIG_FILES, *(f"{part}/*" for part in parts)]


def single_file_transformer(path: str, components: str, folder: Path | None = None, *,
                            configs_only: bool = False, revision: str = "") -> tuple:
    """(class, config, family, layout) of a single-file SD3/FLUX transformer whose pipeline's other parts are in the
    diffusers folder or hub id ``components`` (``folder``: its folder, :func:`components_folder`, where the caller
    has it): the config is that folder's (FLUX: dev or schnell as the file's keys say). Reads the file's header
    only. ``configs_only``: the config alone is wanted (a hub id's two config files fetched, its parts not checked);
    ``revision``: a hub id's snapshot (components_revision; "": main) where ``folder`` is not given. Raises
    UserError (an unreadable file, no or a wrong ``components``, a hub id not at hand)."""
    import diffusers
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - a damaged or non-safetensors file
        raise UserError(f"cannot read {path} as a .safetensors transformer ({first_line(e, 120)}): pass a complete "
                        ".safetensors file") from None
    family, layout = transformer_layout(keys)
    if not components:
        raise UserError(f"{path} holds only {_a(family)} transformer: name the model's diffusers folder with the "
                        f"text encoders, VAE and scheduler: {components_fix(path)}")
    comp = folder or components_folder(components, configs_only=configs_only, revision=revision)
    if kind_of(comp) != "directory":  # a path that is no folder
        raise UserError(f"model_components={components} {describe(comp)}: name the model's diffusers folder, or "
                        "its hub id (OWNER/NAME)")
    if not is_flow_dir(comp):
        raise UserError(f"model_components={components} is not an SD3/SD3.5 or FLUX.1 diffusers folder (its "
                        "model_index.json names no StableDiffusion3Pipeline / FluxPipeline)")
    if not configs_only:
        check_flow_dir(comp, f"model_components={components}")  # every part it lists (FLUX.1's T5 too) is there
    theirs = FLOW_PIPELINES[pipeline_class(comp)]
    if theirs != family:
        raise UserError(f"{path} is {_a(family)} transformer but model_components={components} is "
                        f"{_a(theirs)} pipeline: pass the folder (or hub id) of the model the transformer belongs to")
    cls = diffusers.FluxTransformer2DModel if family == "flux" else diffusers.SD3Transformer2DModel
    config = json.loads((comp / "transformer" / "config.json").read_text(encoding="utf-8"))
    if family == "flux":
        config["guidance_embeds"] = has_guidance(keys)  # dev (guidance_in) or schnell (none), as the file is
    check_block_counts(keys, config, family, f"{path} has", f"model_components={components}'s")
    return cls, config, family, layout


def components_fix(path: str) -> str:
    """The fix for a transformer file ``path`` loaded without model_components: the folder or hub id an `export
    --merge --single-file` file's header says it was merged into (run.merged_models.merged_parts), as the value to
    pass where it is an SD3/FLUX diffusers folder here or a hub id (at the commit merged, where recorded); where it
    is not here (the header's shared name), the header's said beside the setting's forms; else those forms."""
    from lowmem_alignprop.run.merged_models import merged_parts

    model, commit = merged_parts(path)
    if not model:
        return "--set model_components=DIR or OWNER/NAME (a hub id)"
    said = f"its header says it was merged into {model}"
    if looks_like_hub_id(model) and kind_of(Path(model).expanduser()) == "missing":
        pin, at = (f" --set components_revision={commit}", f" at commit {commit}") if commit else ("", "")
        return f"--set model_components={model}{pin} ({said}{at})"
    if is_flow_dir(Path(model).expanduser()):
        return f"--set model_components={model} ({said}, a diffusers folder here)"
    here = "no SD3/FLUX diffusers folder here" if kind_of(Path(model).expanduser()) != "missing" else "not here"
    return (f"--set model_components=DIR, the diffusers folder of the model its header says it was merged into "
            f"({model}, {here}), or its hub id (OWNER/NAME)")


# a block's index in a transformer file's keys, in either layout (diffusers' or the original BFL/Stability names)
_BLOCKS = {"joint": re.compile(r"(?:^|\.)(?:transformer_blocks|joint_blocks|double_blocks)\.(\d+)\."),
           "single": re.compile(r"(?:^|\.)(?:single_transformer_blocks|single_blocks)\.(\d+)\.")}


def check_block_counts(keys, config: dict, family: str, theirs: str, ours: str) -> None:
    """A transformer file's blocks (double and single for FLUX, joint for SD3) against the config it is read with:
    another count (another model, or the other FLUX variant's folder cut down) is one line, before the converter's
    tensor errors."""
    counts = {kind: 1 + max((int(m.group(1)) for k in keys if k.endswith(".weight") and (m := pattern.search(k))),
                            default=-1) for kind, pattern in _BLOCKS.items()}  # (weights: not a stray fp8 scale)
    want = {"joint": config.get("num_layers"), "single": config.get("num_single_layers", 0) if family == "flux" else 0}
    if any(isinstance(want[k], int) and counts[k] != want[k] for k in counts):
        names = ("double", "single") if family == "flux" else ("joint", "single")
        raise UserError(f"{theirs} {counts['joint']} {names[0]} and {counts['single']} {names[1]} blocks, and {ours} "
                        f"transformer config {want['joint']} and {want['single']}: pass the model folder this "
                        "transformer belongs to")


NO_T5 = {"text_encoder_3": None, "tokenizer_3": None}  # SD3 without T5-XXL: the pipeline's zeros take its place


def t5_left_out(index: dict | None, t5: bool) -> bool:
    """Whether an SD3 pipeline loads without T5: ``t5`` off (t5_encoder=false), or its folder's model_index.json
    lists none (SD3 may come without it; an index not at hand: T5 as the folder comes)."""
    return not t5 or (index is not None and (index.get("text_encoder_3") or [None])[0] is None)


def load_flow_single_file(path: str, components: str, dtype: torch.dtype, *, place: Placement, t5: bool = True,
                          revision: str = ""):
    """A single-file transformer (:func:`single_file_transformer`) with the text encoders, tokenizers, VAE and
    scheduler of the diffusers folder ``components``. Returns (the pipeline with an empty transformer on meta,
    ``read``): ``read()`` returns the transformer, read block by block to where ``place`` says and quantized as it
    says (``block_loading``); a file that cannot be read so goes through diffusers' ``from_single_file`` whole.
    ``revision``: a hub id ``components``' snapshot (components_revision; "": main)."""
    folder = components_folder(components, t5, revision=revision)
    cls, config, family, layout = single_file_transformer(path, components, folder)

    def read():
        # diffusers' from_single_file converts the original layouts only: a diffusers-layout file is read here or not
        return load_by_block(cls, config, [path], family, layout, place, whole=layout != "diffusers") or \
            _whole_single_file(cls, config, path, components, layout, dtype)

    missing = NO_T5 if family == "sd3" and t5_left_out(model_index(folder), t5) else {}
    pipe = load_pipeline(str(folder), dtype, named=components,
                         transformer=_placeholder(cls, config, dtype), **missing)
    if family == "flux":  # the schedule of the variant the file is, whichever variant's folder gave the rest
        pipe.scheduler = flux_variant_scheduler(pipe.scheduler, dev=config["guidance_embeds"], path=path,
                                                components=components)
    return pipe, read


# what FLUX.1-dev's scheduler config sets that schnell's does not (the shipped architecture's is dev's): dev shifts
# its sigmas with the image's token count; schnell takes them unshifted (shift 1, no dynamic shifting)
DEV_SCHEDULE = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
SCHNELL_SCHEDULE = {"shift": 1.0, "use_dynamic_shifting": False}


def variant_schedule(dev: bool) -> dict:
    """The scheduler settings of FLUX.1-dev (``dev``: its resolution shift, as the shipped architecture's scheduler
    config has them) or of schnell (unshifted), that the other variant's folder sets otherwise: what
    :func:`flux_variant_scheduler` samples with, and the model card's code sets."""
    if not dev:
        return dict(SCHNELL_SCHEDULE)
    shipped = json.loads((ARCH_FLOW_DIR / "flux" / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    return {k: shipped[k] for k in DEV_SCHEDULE}


def flux_variant_scheduler(scheduler, *, dev: bool, path: str, components: str):
    """``scheduler`` (a FLUX folder's) as the transformer file's variant samples: a schnell file with dev's folder
    was sampled on dev's resolution-shifted sigmas (the last of 4 steps from 0.51 at 1024 px instead of 0.25), a dev
    file with schnell's on unshifted ones. Said when it changes."""
    if bool(scheduler.config.get("use_dynamic_shifting")) == dev:
        return scheduler
    own = variant_schedule(dev)
    log.warning("%s is FLUX.1-%s (its keys %s guidance_in) and model_components=%s is the other variant's folder: "
                "sampling with %s's schedule (%s)", path, "dev" if dev else "schnell", "have" if dev else "have no",
                components, "dev" if dev else "schnell", ", ".join(f"{k}={v}" for k, v in own.items()))
    return type(scheduler).from_config(scheduler.config, **own)


def _whole_single_file(cls, config: dict, path: str, components: str, layout: str, dtype: torch.dtype):
    """diffusers' ``from_single_file``: the whole transformer read into host memory, converted, in ``dtype``."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "transformer").mkdir()
        (Path(tmp) / "transformer" / "config.json").write_text(json.dumps(config), encoding="utf-8")
        try:
            transformer = cls.from_single_file(path, config=tmp, subfolder="transformer", local_files_only=True,
                                               **dtype_kwarg(dtype))
        except (ValueError, RuntimeError, KeyError, IndexError, OSError) as e:  # IndexError: blocks it lacks
            raise UserError(f"cannot load {path} ({layout} layout) as the transformer of {components}: "
                            f"{first_line(e, 200)}; pass the model folder this transformer belongs to") from None
    return transformer


def load_flow_pipeline(where: str, dtype: torch.dtype, *, place: Placement, t5: bool = True, revision: str = ""):
    """A diffusers folder or hub id (at ``revision``: "" main) of an SD3/SD3.5 or FLUX.1 pipeline; SD3 without T5
    when ``t5`` is off or the folder has none. Returns (the pipeline, ``read``): where the transformer's
    .safetensors can be read block by block, the pipeline holds an empty one on meta and ``read()`` returns it read
    to where ``place`` says (and quantized as it says); else diffusers loaded it whole with the rest and ``read``
    is None."""
    kwargs, read = {}, None
    root = pipeline_root(where, not Path(where).expanduser().is_dir(), revision)  # looked up once for both reads below
    found = _folder_transformer(root)
    if found is not None:
        cls, config, files, sub = found
        family = "flux" if cls.__name__ == "FluxTransformer2DModel" else "sd3"

        def read():
            return load_by_block(cls, config, files, family, "diffusers", place) or \
                cls.from_pretrained(sub, **dtype_kwarg(dtype)).requires_grad_(False).eval()

        kwargs["transformer"] = _placeholder(cls, config, dtype)
    index = model_index(root)
    if index.get("_class_name") == "StableDiffusion3Pipeline" and t5_left_out(index, t5):
        kwargs.update(NO_T5)
    return load_pipeline(str(root), dtype, named=where, **kwargs), read


def _placeholder(cls, config: dict, dtype: torch.dtype):
    """The transformer as an empty model on meta (nothing allocated, buffers included) until ``read`` fills it:
    its config is all the text side needs (FLUX: dev or schnell; SD3 without T5: the width of T5's zeros)."""
    with torch.device("meta"):
        return cls.from_config(config).to(dtype).requires_grad_(False).eval()


def _folder_transformer(root: Path):
    """(class, config, .safetensors files, folder) of the transformer of a pipeline folder (or of a hub id's cached
    snapshot); None where it has no .safetensors (diffusers then loads it whole)."""
    import diffusers

    sub = root / "transformer"
    files = folder_files(sub) if (sub / "config.json").is_file() else None
    if not files:
        return None
    config = json.loads((sub / "config.json").read_text(encoding="utf-8"))
    return getattr(diffusers, config["_class_name"]), config, check_readable(files), sub


# --------------------------------------------------------------------------------------------------
# the shipped architectures, on meta
# --------------------------------------------------------------------------------------------------

def _clip_tokenizer(folder: Path):
    """CLIP's tokenizer from the vocabulary shipped once (data/bpe_simple_vocab_16e6.txt.gz) and the folder's
    tokenizer_config.json."""
    from transformers import CLIPTokenizer

    from lowmem_alignprop.models.arch import clip_bpe

    vocab, merges = clip_bpe()
    conf = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                             model_max_length=conf.get("model_max_length", 77))


def _stand_in_t5_tokenizer(max_length: int):
    """No sentencepiece model ships for T5: random-weight models get a stand-in (letters and a few words) that
    pads to the same sequence length, which is all that a random-weight model's memory and time depend on."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)
    tokenizer.stand_in = True  # its token counts are letters, not T5's: no prompt is said to be cut by them
    return tokenizer


def build_flow_components(name: str, *, device="meta", dtype=torch.bfloat16, t5: bool = True):
    """The pipeline of a shipped flow architecture with every model built on ``device`` (default meta: nothing
    allocated, seconds even for FLUX's 12B) in ``dtype``, frozen and in eval mode. Nothing is downloaded."""
    if name not in FLOW_ARCHS:
        raise UserError(f"unknown flow architecture {name!r}: choose one of {', '.join(FLOW_ARCHS)}")
    return flow_pipeline_from_configs(ARCH_FLOW_DIR / name, device=device, dtype=dtype, t5=t5, shipped=True)


def flow_pipeline_from_configs(root: Path, *, device="meta", dtype=torch.bfloat16, t5: bool = True,
                               shipped: bool = False, transformer_config: dict | None = None):
    """An SD3/FLUX pipeline from a diffusers folder's configs alone (the planner: on meta, no weights read). A
    ``shipped`` architecture has no tokenizer files: CLIP's come from the shipped BPE vocabulary, T5's is a
    stand-in; a model folder's own tokenizers are loaded. ``transformer_config``: instead of the folder's (a
    single-file transformer's, :func:`single_file_transformer`)."""
    import diffusers
    import transformers

    root = Path(root)
    index = model_index(root)
    parts = {}
    for sub, (library, cls_name) in ((k, v) for k, v in index.items() if not k.startswith("_")):
        if library is None or sub.startswith("tokenizer") or sub == "scheduler":
            continue
        if sub == "text_encoder_3" and not t5:
            continue
        if library == "diffusers":
            cls = getattr(diffusers, cls_name)
            # under torch.device("meta") parameters and buffers alike (SD3.5 Medium's 226M positional table) stay
            # on meta; accelerate's init_empty_weights would materialise buffers on the CPU
            config = transformer_config if sub == "transformer" and transformer_config else cls.load_config(root / sub)
            with torch.device(device):
                parts[sub] = cls.from_config(config).to(dtype)
        else:
            config = transformers.AutoConfig.from_pretrained(root / sub)
            with torch.device(device):
                parts[sub] = getattr(transformers, cls_name)._from_config(config, dtype=dtype)
            parts[sub].tie_weights()  # T5's encoder.embed_tokens is `shared`: one 131M-entry embedding, not two
    for module in parts.values():
        module.requires_grad_(False).eval()
    for tok in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if not (index.get(tok) and index[tok][0]) or (tok == "tokenizer_3" and not t5):
            continue
        if not shipped:
            parts[tok] = transformers.AutoTokenizer.from_pretrained(root / tok)
        elif index[tok][1] == "CLIPTokenizer":
            parts[tok] = _clip_tokenizer(root / tok)
        else:
            conf = json.loads((root / tok / "tokenizer_config.json").read_text(encoding="utf-8"))
            parts[tok] = _stand_in_t5_tokenizer(conf.get("model_max_length", 512))
    sched_cls = getattr(diffusers, index["scheduler"][1])
    parts["scheduler"] = sched_cls.from_config(sched_cls.load_config(root / "scheduler"))
    pipe_cls = getattr(diffusers, index["_class_name"])
    if pipe_cls.__name__ == "StableDiffusion3Pipeline" and "text_encoder_3" not in parts:
        parts.update(text_encoder_3=None, tokenizer_3=None)
    return pipe_cls(**parts)

"""Issue 17 for the flow families (SD3/SD3.5, FLUX.1): ``export`` in kohya, peft and diffusers layouts and
``--merge``, ``--init-lora`` from each layout, SD3's negative prompt, FLUX's refusal of one, and a FLUX run with
``--sample-every``, checkpoints and ``export_format=kohya,peft`` end to end.

LoRAs are made as a run saves them (models.flow.add_flow_lora, lora_B perturbed, save_flow_lora with the adapter
config, base_model.json), with lora_alpha = 2 * rank: an export that drops or misfolds alpha / rank doubles or
halves the LoRA's effect, far above the tolerances. The loaders compared are the consumers' own: diffusers'
``FluxPipeline.load_lora_weights`` (its kohya converter) for the kohya file, peft's ``PeftModel.from_pretrained``,
``from_pretrained`` for the merged model; the kohya keys are checked against names written here from the
original architectures (ComfyUI maps ``lora_unet_`` + an original weight's path, dots as underscores).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from flowmodels import FLOW_RESOLUTION, build_tiny_flux_dir, build_tiny_sd3_dir
from refusals import assert_refused
from loras import (ALPHA, RANK, card_image, card_renders_as_sample, each_of, export, hub_metadata, lora_with_reference,
                   python_block, sampled)
from numerics import REORDERED, SAME_OPS, assert_rel_close, relative_difference

from lowmem_alignprop.cli import main
from lowmem_alignprop.measure.resident_tensors import run_objects_only
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError

RES = FLOW_RESOLUTION

pytestmark = pytest.mark.usefixtures("fresh_log_handlers")


def _classes(family: str):
    from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline

    return (FluxPipeline, FluxTransformer2DModel) if family == "flux" else (StableDiffusion3Pipeline,
                                                                            SD3Transformer2DModel)


@torch.no_grad()
def transformer_out(transformer) -> torch.Tensor:
    """One call of the transformer on fixed inputs that reach every adapted layer."""
    from lowmem_alignprop.models import flow

    c = transformer.config
    g = torch.Generator().manual_seed(7)
    ehs = torch.randn(2, 5, c.joint_attention_dim, generator=g)
    pooled = torch.randn(2, c.pooled_projection_dim, generator=g)
    if flow.family_of(transformer) == "flux":
        return transformer(hidden_states=torch.randn(2, 16, c.in_channels, generator=g), encoder_hidden_states=ehs,
                           pooled_projections=pooled, timestep=torch.tensor([0.3, 0.8]), img_ids=flow.latent_image_ids(8, 8),
                           txt_ids=torch.zeros(5, 3), return_dict=False,
                           guidance=torch.tensor([3.5, 3.5]) if c.guidance_embeds else None)[0]  # (schnell: none)
    return transformer(hidden_states=torch.randn(2, c.in_channels, 8, 8, generator=g), encoder_hidden_states=ehs,
                       pooled_projections=pooled, timestep=torch.tensor([300.0, 800.0]), return_dict=False)[0]


def _make_lora(base: Path, run: Path, family: str, layers: str = "attention") -> dict:
    """A LoRA (of ``layers``: lora_layers) saved as a run saves it, its run folder, and the transformer's outputs of
    the base model and of base + LoRA (peft, in memory: the reference)."""
    from lowmem_alignprop.models.flow import add_flow_lora, save_flow_lora

    pipeline_cls, transformer_cls = _classes(family)
    transformer = transformer_cls.from_pretrained(base / "transformer")
    made = lora_with_reference(base, run, transformer, transformer_out,
                               add_lora=lambda m: add_flow_lora(m, RANK, ALPHA, seed=0, layers=layers),
                               save=lambda m, folder: save_flow_lora(pipeline_cls, m, folder))
    (run / "config.yaml").write_text(yaml.safe_dump({"profile": "cpu", "model": str(base), "reward": "brightness",
                                                     "steps": 3, "lora_rank": RANK, "lora_alpha": ALPHA,
                                                     "truncation": "fixed", "k": 2, "sample_steps": 4,
                                                     "lora_layers": layers}))
    (run / "summary.json").write_text(json.dumps({"steps": 3, "steps_done": 3, "reward_first": 0.41,
                                                  "reward_last": 0.52}))
    scale = ALPHA / RANK
    deltas = {n: scale * m.lora_B["default"].weight.detach() @ m.lora_A["default"].weight.detach()
              for n, m in transformer.named_modules() if "default" in getattr(m, "lora_A", {})}
    return {**made, "family": family, "deltas": deltas, "config": transformer.config, "layers": layers}


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return _make_lora(build_tiny_flux_dir(root / "base"), root / "run", "flux")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    return _make_lora(build_tiny_sd3_dir(root / "base"), root / "run", "sd3")


@pytest.fixture(scope="module")
def flux_ff(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-ff")
    return _make_lora(build_tiny_flux_dir(root / "base"), root / "run", "flux", "attention+ff")


@pytest.mark.parametrize("style", ["lora_A/lora_B", "lora_down/lora_up with alpha"])
def test_a_lora_in_the_original_transformers_names_reads_as_its_kohya_twin(case, style, tmp_path):
    """A LoRA keyed by the original transformer's paths under ``diffusion_model.`` (ComfyUI reads such files and saves
    them with lora_down/lora_up; others write diffusers' lora_A/lora_B without an alpha): for --init-lora and sample
    it is the kohya file under other names, split back into the same layers (it was "only 0 of its layers exist
    here; trained for another base model")."""
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.lora import flow_export

    kohya_file = sorted(export(tmp_path, case["lora"], "--format", "kohya").glob("*.safetensors"))[0]
    state = load_file(str(kohya_file))
    weights = load_file(str(case["lora"] / "pytorch_lora_weights.safetensors"))
    original = {flow_export.kohya_name(path): path for path in (
        flow_export.original_slot(k[len("transformer."):-len(".lora_A.weight")], case["family"])[0]
        for k in weights if k.endswith(".lora_A.weight"))}
    renamed = {}
    for name in {k.split(".")[0] for k in state}:
        down, up, alpha = (state[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        key = f"diffusion_model.{original[name]}"
        if style == "lora_A/lora_B":  # no alpha: its scale folded into B
            renamed |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up * (float(alpha) / down.shape[0])}
        else:
            renamed |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": alpha}
    save_file(renamed, str(tmp_path / "original.safetensors"))
    assert flow_export.is_kohya_flow(renamed) and flow_export.family_of_kohya_keys(renamed) == case["family"]
    theirs = load_file(str(flow_export.kohya_as_diffusers(tmp_path / "original.safetensors", "--lora x")))
    ours = load_file(str(flow_export.kohya_as_diffusers(kohya_file, "--lora x")))
    assert set(theirs) == set(ours) and len(ours) > 0
    for k in ours:  # the same numbers but for where the alpha's scale was multiplied in
        assert_rel_close(theirs[k], ours[k], SAME_OPS, k)


@pytest.mark.parametrize("style", ["comfyui lora_A/lora_B", "comfyui lora_down/lora_up with alpha",
                                   "kohya lora_unet_"])
def test_sample_of_a_flux_lora_with_modulation_layers_applies_each_as_diffusers_reads_it(style, tmp_path):
    """sample --lora of a FLUX.1 LoRA in the original transformer's names (ComfyUI's diffusion_model., kohya's
    lora_unet_) that also adapts layers lowmem-alignprop does not train (the blocks' modulation, img_mod.lin: older
    sd-scripts and other trainers adapt every linear): diffusers' FLUX kohya reader applies them (img_mod.lin ->
    norm1.linear; the fused qkv split into to_q/to_k/to_v rows), each layer alpha / rank * up @ down (lora_A/B: no
    alpha, alpha = rank). It was refused: "adapts 'lora_unet_double_blocks_0_img_mod_lin', a layer lowmem-alignprop
    does not train"."""
    from flowmodels import build_tiny_flux_pipeline
    from loras import warnings_of
    from safetensors.torch import save_file

    from lowmem_alignprop.lora.adapters import load_adapters
    from lowmem_alignprop.lora.lora_args import parse_lora

    pipe = build_tiny_flux_pipeline()
    config = pipe.transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    g = torch.Generator().manual_seed(2)
    a = "transformer_blocks.0.attn."
    layers = {"double_blocks.0.img_attn.qkv": [a + "to_q", a + "to_k", a + "to_v"],
              "double_blocks.0.txt_attn.proj": [a + "to_add_out"],
              "double_blocks.0.img_mod.lin": ["transformer_blocks.0.norm1.linear"],
              "double_blocks.0.txt_mod.lin": ["transformer_blocks.0.norm1_context.linear"]}
    rows = {"qkv": 3 * width, "proj": width, "lin": 6 * width}
    tensors, want = {}, {}
    for i, (original, parts) in enumerate(layers.items()):
        down, up = torch.randn(2, width, generator=g), torch.randn(rows[original.rsplit(".", 1)[1]], 2, generator=g)
        alpha = 2.0 if "lora_A" in style else (1.0, 3.0)[i % 2]
        name = f"diffusion_model.{original}" if style.startswith("comfyui") else "lora_unet_" + original.replace(
            ".", "_")
        if "lora_A" in style:
            tensors |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}
        else:
            tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha":
                        torch.tensor(alpha)}
        for part, block in zip(parts, (alpha / 2 * up @ down).chunk(len(parts))):
            want[part] = block
    save_file(tensors, str(tmp_path / "flux.safetensors"))
    caught = warnings_of(lambda: load_adapters(pipe, [parse_lora(str(tmp_path / "flux.safetensors"), 0)],
                                               "tiny-flux") is None)
    loaded = {n: m for n, m in pipe.transformer.named_modules() if "lora0" in getattr(m, "lora_A", {})}
    assert sorted(loaded) == sorted(want)
    # the rewritten file's header names its own layers: to_q & co. as suffixes named the single block's too
    assert [str(w.message) for w in caught if "PEFT config" in str(w.message)] == []
    for name, m in loaded.items():
        got = m.scaling["lora0"] * m.lora_B["lora0"].weight @ m.lora_A["lora0"].weight
        assert relative_difference(got, want[name]) < 1e-6, name


@pytest.fixture(scope="module")
def sd3_ff(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-ff")
    return _make_lora(build_tiny_sd3_dir(root / "base"), root / "run", "sd3", "attention+ff")


case = each_of("flux", "sd3", "flux_ff", "sd3_ff")


def _kohya(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(str(files[0]))


# ---------------------------------------------------------------------------------------------------------
# kohya: the original module names, q/k/v fused exactly
# ---------------------------------------------------------------------------------------------------------

def _original_modules(family: str, config, layers: str) -> dict[str, tuple[int, int, list[str]]]:
    """From the architectures (BFL's FLUX, Stability's MMDiT), not from the exporter: every original module our
    LoRA of ``layers`` reaches -> (rows of its weight, its input width, the diffusers layers stacked in its rows, in
    order; None: rows we do not train)."""
    width = config.num_attention_heads * config.attention_head_dim
    out = {}
    if layers == "attention+ff":  # the feed-forward layers: FLUX's and MMDiT's MLPs are 4x the width
        for i in range(config.num_layers):
            f = f"transformer_blocks.{i}."
            streams = (("img_mlp.", "ff."), ("txt_mlp.", "ff_context.")) if family == "flux" else \
                (("x_block.mlp.fc", "ff."),) + ((("context_block.mlp.fc", "ff_context."),)
                                                if i < config.num_layers - 1 else ())  # the last: pre-only
            for original, ours in streams:
                first, second = ("0", "2") if family == "flux" else ("1", "2")
                block = "double_blocks" if family == "flux" else "joint_blocks"
                out[f"{block}.{i}.{original}{first}"] = (4 * width, width, [f + ours + "net.0.proj"])
                out[f"{block}.{i}.{original}{second}"] = (width, 4 * width, [f + ours + "net.2"])
        if family == "flux":
            for i in range(config.num_single_layers):  # linear2: the attention output and the MLP's, joined
                out[f"single_blocks.{i}.linear2"] = (width, 5 * width, [f"single_transformer_blocks.{i}.proj_out"])
    mlp = "single_transformer_blocks.{}.proj_mlp" if layers == "attention+ff" else None
    if family == "flux":
        for i in range(config.num_layers):  # double-stream blocks: fused q/k/v per stream, then the projections
            a = f"transformer_blocks.{i}.attn."
            out[f"double_blocks.{i}.img_attn.qkv"] = (3 * width, width, [a + "to_q", a + "to_k", a + "to_v"])
            out[f"double_blocks.{i}.txt_attn.qkv"] = (3 * width, width, [a + "add_q_proj", a + "add_k_proj",
                                                                         a + "add_v_proj"])
            out[f"double_blocks.{i}.img_attn.proj"] = (width, width, [a + "to_out.0"])
            out[f"double_blocks.{i}.txt_attn.proj"] = (width, width, [a + "to_add_out"])
        for i in range(config.num_single_layers):  # linear1 = [q; k; v; MLP input (4x the width)]
            a = f"single_transformer_blocks.{i}.attn."
            out[f"single_blocks.{i}.linear1"] = (7 * width, width, [a + "to_q", a + "to_k", a + "to_v",
                                                                     mlp and mlp.format(i)])
        return out
    for i in range(config.num_layers):  # joint blocks: x (image) and context (text) streams
        a = f"transformer_blocks.{i}.attn."
        out[f"joint_blocks.{i}.x_block.attn.qkv"] = (3 * width, width, [a + "to_q", a + "to_k", a + "to_v"])
        out[f"joint_blocks.{i}.x_block.attn.proj"] = (width, width, [a + "to_out.0"])
        out[f"joint_blocks.{i}.context_block.attn.qkv"] = (3 * width, width, [a + "add_q_proj", a + "add_k_proj",
                                                                               a + "add_v_proj"])
        if i < config.num_layers - 1:  # the last context block is pre-only: no output projection
            out[f"joint_blocks.{i}.context_block.attn.proj"] = (width, width, [a + "to_add_out"])
    return out


def test_kohya_keys_are_what_comfyui_maps_and_each_fused_delta_is_the_parts(case, tmp_path):
    """ComfyUI (comfy/lora.py) maps ``lora_unet_`` + an original ``diffusion_model.`` weight's path without
    ``.weight``, dots as underscores, and applies ``alpha / rows(lora_down) * lora_up @ lora_down`` to that weight.
    Every original module must appear once with exactly its three keys and its weight's shape, and the delta it
    applies must be, row block by row block, the trained ``scale * B @ A`` of each diffusers layer (zero in FLUX's
    MLP rows unless lora_layers=attention+ff trains them)."""
    state = _kohya(export(tmp_path, case["lora"], "--format", "kohya"))
    expected = _original_modules(case["family"], case["config"], case["layers"])
    names = {"lora_unet_" + m.replace(".", "_"): m for m in expected}
    assert set(state) == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    covered = set()
    for name, module in names.items():
        rows, width, parts = expected[module]
        down, up, alpha = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"], state[f"{name}.alpha"]
        assert up.shape[0] == rows and down.shape[1] == width and up.shape[1] == down.shape[0], name
        delta = alpha.item() / down.shape[0] * up @ down  # what ComfyUI adds to the original weight
        block = rows // (7 if len(parts) == 4 else len(parts))
        start = 0
        for slot, part in enumerate(parts):
            height = 4 * block if slot == 3 else block  # FLUX's linear1: q, k, v, then the MLP input 4x as wide
            piece = delta[start:start + height]
            if part is None:
                assert not piece.any(), f"{name}: the MLP rows must stay untouched"
            else:
                assert_rel_close(piece, case["deltas"][part], SAME_OPS, f"{name} rows of {part}")
                covered.add(part)
            start += height
    assert covered == set(case["modules"])  # every trained layer is in the file


@pytest.mark.parametrize("layers", ["attention", "attention+ff"])
def test_kohya_flux_loads_in_diffusers_and_reproduces_the_lora(tmp_path, layers):
    """diffusers' own kohya FLUX reader (``_convert_kohya_flux_lora_to_diffusers``, from sd-scripts' converter) on
    our file reproduces base + LoRA (with attention+ff: img_mlp and txt_mlp too). It splits single blocks' linear1
    at FLUX.1's own widths (3072/12288) only, so this model has double-stream blocks only; the test below checks
    linear1 at FLUX.1's width."""
    from diffusers import FluxPipeline

    made = _make_lora(build_tiny_flux_dir(tmp_path / "base", single_layers=0), tmp_path / "run", "flux", layers)
    out = export(tmp_path, made["lora"], "--format", "kohya")
    pipe = FluxPipeline.from_pretrained(made["base"])
    pipe.load_lora_weights(str(next(out.glob("*.safetensors"))))
    assert_rel_close(transformer_out(pipe.transformer), made["ref"], SAME_OPS, "kohya file via load_lora_weights")
    scope: dict = {}  # the card's diffusers code, as written (it called load_lora_weights on the class: no pipeline)
    exec(python_block(out), scope)
    assert_rel_close(transformer_out(scope["pipe"].transformer), made["ref"], SAME_OPS, "the kohya card's code")


def test_kohya_flux_single_block_is_what_diffusers_reads_at_flux1_width():
    """A single block at FLUX.1's width (3072, MLP 12288; LoRA tensors only, no model): diffusers' kohya reader
    gives back each of to_q/to_k/to_v the trained delta, and proj_mlp none."""
    from diffusers import FluxPipeline

    from lowmem_alignprop.lora import flow_export

    g = torch.Generator().manual_seed(3)
    weights = {}
    for p in ("to_q", "to_k", "to_v"):
        weights[f"single_transformer_blocks.0.attn.{p}.lora_A.weight"] = torch.randn(RANK, 3072, generator=g)
        weights[f"single_transformer_blocks.0.attn.{p}.lora_B.weight"] = torch.randn(3072, RANK, generator=g)
    state = flow_export.kohya_state_dict(weights, lambda m: ALPHA / RANK, "flux")
    assert set(state) == {f"lora_unet_single_blocks_0_linear1.{s}" for s in ("lora_down.weight", "lora_up.weight",
                                                                              "alpha")}
    theirs = FluxPipeline.lora_state_dict(dict(state))
    for p in ("to_q", "to_k", "to_v"):
        key = f"transformer.single_transformer_blocks.0.attn.{p}"
        ours = ALPHA / RANK * weights[key[12:] + ".lora_B.weight"] @ weights[key[12:] + ".lora_A.weight"]
        assert_rel_close(theirs[key + ".lora_B.weight"] @ theirs[key + ".lora_A.weight"], ours, SAME_OPS, p)
    mlp = theirs.get("transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight")
    assert mlp is None or not mlp.any()


def test_kohya_folds_per_layer_scales_and_reads_back_to_each_layers_delta(case, tmp_path):
    """Parts of one fused module trained with other scales (peft's alpha_pattern) keep their own delta: the ratio
    goes into their lora_up block. kohya_to_peft (``--init-lora``/``sample`` of a kohya file) gives every layer its
    delta back, from our block-diagonal file and from a dense fused LoRA (another trainer's: every part uses the
    whole lora_down)."""
    from safetensors.torch import load_file

    from lowmem_alignprop.lora import flow_export

    weights = {k[len("transformer."):]: v for k, v in load_file(str(case["lora"] / "pytorch_lora_weights.safetensors"))
               .items()}
    scales = {m: (1.0, 2.0, 0.5)[i % 3] for i, m in enumerate(case["modules"])}  # q, k, v of a module differ
    state = flow_export.kohya_state_dict(weights, scales.__getitem__, case["family"])
    back, family = flow_export.kohya_to_peft(state, "--init-lora x")
    assert family == case["family"] and {k[: -len(".lora_A.weight")] for k in back if ".lora_A." in k} == \
        set(case["modules"])
    for m in case["modules"]:
        ours = scales[m] * weights[f"{m}.lora_B.weight"] @ weights[f"{m}.lora_A.weight"]
        assert_rel_close(back[f"{m}.lora_B.weight"] @ back[f"{m}.lora_A.weight"], ours, SAME_OPS, m)
    name = next(k.split(".")[0] for k in state if "_qkv." in k or "_linear1." in k)
    g = torch.Generator().manual_seed(9)
    dense = dict(state)
    dense[f"{name}.lora_up.weight"] = torch.randn(state[f"{name}.lora_up.weight"].shape, generator=g)
    if name.endswith("linear1"):  # the MLP rows stay zero: a LoRA of the MLP input is refused (another layer)
        width = dense[f"{name}.lora_up.weight"].shape[0] // 7
        dense[f"{name}.lora_up.weight"][3 * width:] = 0
    back, _ = flow_export.kohya_to_peft(dense, "--init-lora x")
    down, up = dense[f"{name}.lora_down.weight"], dense[f"{name}.lora_up.weight"]
    delta = dense[f"{name}.alpha"].item() / down.shape[0] * up @ down
    parts = sorted(k[: -len(".lora_A.weight")] for k in back if ".lora_A." in k
                   and flow_export.kohya_name(flow_export.original_slot(k[: -len(".lora_A.weight")], family)[0]) == name)
    rows = delta.shape[0] // (7 if name.endswith("linear1") else 3)
    for part in parts:
        slot = flow_export.original_slot(part, family)[1]
        assert back[f"{part}.lora_A.weight"].shape[0] == down.shape[0]  # dense: the whole rank
        assert_rel_close(back[f"{part}.lora_B.weight"] @ back[f"{part}.lora_A.weight"],
                         delta[slot * rows:(slot + 1) * rows], SAME_OPS, f"dense {part}")


def test_a_dense_fused_kohya_lora_loads_with_each_part_its_own_copy(flux, tmp_path):
    """sd-scripts' FLUX LoRA (rank r everywhere): a fused qkv / linear1 has one lora_down of rank r that q, k and v all
    use. Split back for --init-lora and sample, each part gets that lora_down (equal tensors, not one tensor: the
    split file was not written, "Some tensors share memory") and its rows of the delta."""
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.lora import flow_export

    weights = {k[len("transformer."):]: v for k, v in load_file(str(flux["lora"] / "pytorch_lora_weights.safetensors"))
               .items()}
    state = flow_export.kohya_state_dict(weights, lambda m: 1.0, flux["family"])
    g = torch.Generator().manual_seed(3)
    r = min(v.shape[0] for k, v in state.items() if k.endswith(".lora_down.weight"))  # the unfused layers' rank
    dense = {}
    for name in {k.split(".")[0] for k in state}:
        down, up = state[f"{name}.lora_down.weight"][:r], state[f"{name}.lora_up.weight"]
        up = torch.randn(up.shape[0], r, generator=g)
        if name.endswith("linear1"):  # the MLP rows stay zero (a LoRA of the MLP input: another layer)
            up[3 * (up.shape[0] // 7):] = 0
        dense.update({f"{name}.lora_down.weight": down.contiguous(), f"{name}.lora_up.weight": up,
                      f"{name}.alpha": torch.tensor(float(r))})
    save_file(dense, str(tmp_path / "dense.safetensors"))
    split = load_file(str(flow_export.kohya_as_diffusers(tmp_path / "dense.safetensors", "--init-lora x")))
    name = next(k.split(".")[0] for k in dense if "_qkv." in k)
    parts = [k for k in split if k.endswith(".lora_A.weight") and flow_export.kohya_name(
        flow_export.original_slot(k[len("transformer."):-len(".lora_A.weight")], "flux")[0]) == name]
    assert len(parts) == 3 and all(torch.equal(split[k], dense[f"{name}.lora_down.weight"]) for k in parts)


def test_kohya_metadata_names_the_family_as_sd_scripts_does(case, tmp_path):
    from safetensors import safe_open

    out = export(tmp_path, case["lora"], "--format", "kohya")
    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as f:
        meta = f.metadata()
    # sd-scripts: "flux1"; SD3 by the MMDiT's type (the tiny SD3 has no qk-norm: SD3 Medium's "medium")
    assert meta["ss_base_model_version"] == {"flux": "flux1", "sd3": "medium"}[case["family"]]
    assert meta["modelspec.architecture"] == {"flux": "flux-1-dev/lora",
                                              "sd3": "stable-diffusion-3-medium/lora"}[case["family"]]
    # the model spec's required keys, as sd-scripts writes them for the family (SD3's implementation "diffusers")
    assert (meta["modelspec.sai_model_spec"], meta["modelspec.title"]) == ("1.0.1",
                                                                           next(out.glob("*.safetensors")).stem)
    assert meta["modelspec.implementation"] == {"flux": "https://github.com/black-forest-labs/flux",
                                                "sd3": "diffusers"}[case["family"]]
    # the adapted layers' names: SD3 has no proj_mlp and no block proj_out (FLUX's single blocks do), though the
    # attention+ff target list names them for both
    listed = set(meta["alignprop_target_modules"].split(","))
    card = (out / "README.md").read_text()
    flux_only = {"proj_mlp", "proj_out"}
    ff = "ff.net.2" in listed
    assert (flux_only <= listed) == (case["family"] == "flux" and ff) and not (flux_only & listed and not ff)
    assert ("proj_mlp" in card) == (case["family"] == "flux" and ff)
    assert meta["ss_network_dim"] == str(RANK) and float(meta["ss_network_alpha"]) == ALPHA
    assert meta["ss_network_module"] == {"flux": "networks.lora_flux", "sd3": "networks.lora_sd3"}[case["family"]]
    assert meta["alignprop_reward"] == "brightness" and meta["alignprop_steps"] == "3"
    card = (out / "README.md").read_text()
    assert "Euler steps" in card and ("FluxPipeline" if case["family"] == "flux" else "diffusers export") in card
    from huggingface_hub import ModelCard
    # the hub's "Use this model" names the library whose loader reads the file: diffusers' SD3 loader reads no kohya
    assert ModelCard(card).data.library_name == {"flux": "diffusers", "sd3": None}[case["family"]]


@pytest.mark.parametrize("variant", ["flux", "sd3", "schnell"])
def test_kohya_card_names_the_models_licence_and_loaders_as_its_header_does(variant, flux, sd3, tmp_path):
    """The card's licence example is the base model's (FLUX.1-dev's own, schnell's apache-2.0, SD3's community
    licence), its ComfyUI line names the model as the header's ss_base_model_version does (the tiny SD3: SD3 Medium),
    Forge is offered for FLUX.1 only, and the layer count is of layers, the names of their kinds."""
    import shutil

    lora = {"flux": flux, "sd3": sd3, "schnell": flux}[variant]["lora"]
    if variant == "schnell":  # the FLUX LoRA's record naming a schnell model (no guidance embedding)
        schnell = build_tiny_flux_dir(tmp_path / "schnell", schnell=True)
        lora = shutil.copytree(lora, tmp_path / "run" / "lora")
        record = json.loads((lora / "base_model.json").read_text())
        (lora / "base_model.json").write_text(json.dumps({**record, "model": str(schnell)}))
    text = (export(tmp_path, lora, "--format", "kohya") / "README.md").read_text()
    licence = {"flux": "FLUX.1-dev's: license: other, license_name: flux-1-dev-non-commercial-license",
               "schnell": "FLUX.1-schnell's: license: apache-2.0",
               "sd3": "SD3/SD3.5's: license: other, license_name: stabilityai-ai-community"}[variant]
    assert f"# license: set the license of the base model here ({licence})" in text, text
    assert f"node after the {'SD3 Medium' if variant == 'sd3' else 'FLUX.1'} model." in text
    assert ("- kohya sd-scripts / Forge: the same file" in text) == (variant != "sd3")
    assert ("- kohya sd-scripts: the same file" in text) == (variant == "sd3")
    layers = len({k.split(".lora_")[0] for k in load_lora_keys(lora)})
    assert f"({layers} layers of 8 kinds: add_k_proj, add_q_proj, add_v_proj, to_add_out, to_k, to_out.0, " in text


def load_lora_keys(lora: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(lora / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        return [k for k in f.keys() if ".lora_A." in k]


# ---------------------------------------------------------------------------------------------------------
# peft, diffusers, merge
# ---------------------------------------------------------------------------------------------------------

def test_peft_folder_loads_with_peft_and_reproduces_the_lora(case, tmp_path):
    from peft import PeftModel

    out = export(tmp_path, case["lora"], "--format", "peft")
    transformer = _classes(case["family"])[1].from_pretrained(case["base"] / "transformer")
    model = PeftModel.from_pretrained(transformer, str(out))
    assert_rel_close(transformer_out(model.base_model.model), case["ref"], SAME_OPS, "peft folder")


def test_diffusers_export_loads_in_its_pipeline(case, tmp_path):
    """...and without peft's "PEFT config contained these additional target modules: ['proj_out']" (a run of
    lora_layers=attention+ff: the header named the blocks' proj_out by a suffix, the transformer's last layer's too)."""
    from loras import warnings_of

    out = export(tmp_path, case["lora"])
    pipe = _classes(case["family"])[0].from_pretrained(case["base"])
    caught = warnings_of(lambda: pipe.load_lora_weights(str(out)) is None)
    assert_rel_close(transformer_out(pipe.transformer), case["ref"], SAME_OPS, "diffusers export")
    assert [str(w.message) for w in caught if "PEFT config" in str(w.message)] == []


def test_merged_model_is_base_plus_lora(case, tmp_path):
    from diffusers import DiffusionPipeline

    out = export(tmp_path, case["lora"], "--merge")
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == _classes(case["family"])[0].__name__
    # W + scale * B @ A in one weight vs the LoRA's separate path: the same sums, reordered
    assert_rel_close(transformer_out(pipe.transformer), case["ref"], REORDERED, "merged transformer")
    assert "merged in at weight 1" in (out / "README.md").read_text()


def test_a_transformer_file_bases_metadata_and_card_read_its_components_folder(flux, sd3, tmp_path):
    """A run on a transformer file (--model FILE --set model_components=DIR): kohya's metadata guessed from a folder
    the file has not (an SD3 Medium file said 5-large, a schnell file flux-1-dev), and the merged single file's card
    named the file as model_components. Now the components folder's config, FLUX's variant as the file's keys say."""
    from safetensors.torch import save_file

    from flowmodels import build_tiny_flux_pipeline
    from lowmem_alignprop.lora import flow_export, model_card

    schnell = tmp_path / "schnell.safetensors"
    save_file({k: v.contiguous() for k, v in build_tiny_flux_pipeline(schnell=True).transformer.state_dict().items()},
              str(schnell))
    assert flow_export.architecture("flux", str(flux["base"]), []) == "flux-1-dev/lora"  # the dev folder itself
    assert flow_export.architecture("flux", str(schnell), [], str(flux["base"])) == "flux-1-schnell/lora"
    sd3_file = tmp_path / "sd3.safetensors"
    from diffusers import SD3Transformer2DModel
    save_file({k: v.contiguous() for k, v in SD3Transformer2DModel.from_pretrained(sd3["base"] / "transformer")
               .state_dict().items()}, str(sd3_file))
    folder_says = flow_export.base_model_version("sd3", str(sd3["base"]), [])
    assert folder_says == "medium"  # the tiny SD3 has no qk-norm: SD3 Medium's shape (a file alone said 5-large)
    assert flow_export.base_model_version("sd3", str(sd3_file), [], str(sd3["base"])) == folder_says
    use = model_card._usage("single-file", ["m.safetensors"], str(schnell), 1.0, "flux", str(flux["base"]))
    assert f"--set model_components={flux['base']}" in "\n".join(use) and f"model_components={schnell}" not in \
        "\n".join(use)


def test_a_merge_of_a_run_trained_without_t5_keeps_the_bases_t5(sd3, tmp_path, caplog):
    """t5_encoder=false saves training memory: `export --merge` wrote an SD3 without T5-XXL (model_index null), which
    its own card's from_pretrained could not load. The merged model keeps the base's T5, and a line says so."""
    import shutil

    from diffusers import DiffusionPipeline

    run = tmp_path / "run"
    shutil.copytree(sd3["run"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "t5_encoder": False}))
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        out = export(tmp_path / "e", run / "lora", "--merge")
    assert ("the LoRA's run trained without T5 (t5_encoder=false): the merged model keeps the base's T5-XXL"
            in caplog.text)
    assert (out / "text_encoder_3").is_dir()
    assert DiffusionPipeline.from_pretrained(out).text_encoder_3 is not None  # as its card says to load it


def test_merge_onto_the_other_flow_family_is_refused_before_the_model_loads(flux, sd3, tmp_path, capsys,
                                                                           monkeypatch):
    from lowmem_alignprop.lora import lora_merge

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")  # its files tell its family: refused before loading

    monkeypatch.setattr(lora_merge, "load_base", never)
    for lora, other, theirs, ours in ((flux["lora"], sd3["base"], "a FLUX.1", "an SD3/SD3.5"),
                                      (sd3["lora"], flux["base"], "an SD3/SD3.5", "a FLUX.1")):
        out = tmp_path / other.parent.name
        assert main(["export", "--lora", str(lora), "--merge", "--model", str(other), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: --merge: {lora} adapts {theirs} transformer, but --model {other} is {ours} "
                       "transformer: pass the model it was trained on with --model\n"), err
        assert not out.exists()


def test_merged_flux_single_file_is_the_merged_transformer_in_bfl_layout(flux, tmp_path, capsys, monkeypatch):
    """The file is the merged folder's transformer in BFL's names (the mapping is read back by diffusers' converter
    at FLUX.1's width below; its converter cannot read this tiny model's linear1). Sampled alone without
    model_components: one line naming the folder its header says it was merged into (by its shared name, 'base'),
    as the value to pass where that folder is here; beside both ways to give the parts where it is not, or is no
    FLUX folder; a hub id (and the commit merged) as the value. It asked for model_components=DIR or OWNER/NAME
    alone, though the line before it read the header."""
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.models.flow_layout import flux_to_original

    file = next(export(tmp_path / "a", flux["lora"], "--merge", "--single-file").glob("*.safetensors"))
    single = load_file(str(file))
    with safe_open(str(file), framework="pt") as f:  # the model spec of a FLUX.1 checkpoint, as sd-scripts writes it
        meta = f.metadata()
    assert (meta["modelspec.architecture"], meta["modelspec.implementation"]) == (
        "flux-1-dev", "https://github.com/black-forest-labs/flux") and "modelspec.prediction_type" not in meta
    merged = FluxTransformer2DModel.from_pretrained(export(tmp_path / "b", flux["lora"], "--merge") / "transformer")
    assert "single_blocks.0.linear1.weight" in single and "double_blocks.0.img_attn.qkv.weight" in single
    expected = flux_to_original(merged.state_dict())
    assert single.keys() == expected.keys() and all(torch.equal(single[k], expected[k]) for k in single)
    assert flux["base"].name == "base" and json.loads(meta["alignprop_merged_loras"])[0]["into"] == "base"

    def refusal(model: Path) -> str:
        capsys.readouterr()
        assert main(["sample", "--model", str(model), "--output-dir", str(tmp_path / "s")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and not (tmp_path / "s").exists(), lines
        return lines[0].removeprefix(f"error: {model} holds only a FLUX transformer: name the model's diffusers folder "
                                     "with the text encoders, VAE and scheduler: ")

    monkeypatch.chdir(tmp_path)  # no base/ here
    assert refusal(file) == ("--set model_components=DIR, the diffusers folder of the model its header says it was "
                             "merged into (base, not here), or its hub id (OWNER/NAME)")
    (tmp_path / "base").mkdir()  # a folder of that name, not the model's
    assert refusal(file) == ("--set model_components=DIR, the diffusers folder of the model its header says it was "
                             "merged into (base, no SD3/FLUX diffusers folder here), or its hub id (OWNER/NAME)")
    monkeypatch.chdir(flux["base"].parent)  # where it was merged
    assert refusal(file) == ("--set model_components=base (its header says it was merged into base, a diffusers "
                             "folder here)")
    record = [{**json.loads(meta["alignprop_merged_loras"])[0], "into": "someone/flux-base", "into_revision": "a" * 40}]
    hub = tmp_path / "hub.safetensors"  # merged into a hub id at a commit
    save_file(single, str(hub), metadata={**meta, "alignprop_merged_loras": json.dumps(record)})
    assert refusal(hub) == (f"--set model_components=someone/flux-base --set components_revision={'a' * 40} (its "
                            f"header says it was merged into someone/flux-base at commit {'a' * 40})")


def test_flux_bfl_layout_reads_back_exactly_with_diffusers_converter_at_flux1_width():
    """One double and one single block at FLUX.1's width (24 heads x 128; MLP 4x), each tensor an int16 view that
    numbers its rows (row + 97 x the tensor's index, never equal across a q/k/v or key swap): diffusers' own
    converter gives every tensor back exactly."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from lowmem_alignprop.models.flow_layout import flux_to_original

    with torch.device("meta"):
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=32,
                                       pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))

    def numbered(i, shape):
        rows = ((torch.arange(shape[0]) + 97 * i) % 32749).to(torch.int16)
        return rows.view(-1, *([1] * (len(shape) - 1))).expand(shape)

    ours = {k: numbered(i, v.shape) for i, (k, v) in enumerate(sorted(model.state_dict().items()))}
    back = convert_flux_transformer_checkpoint_to_diffusers(flux_to_original(ours))
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def _load_transformer_file(path: Path, components: Path):
    """A transformer file as ``--model FILE --set model_components=DIR`` loads it (diffusers' from_single_file and
    its original-layout converter)."""
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.settings.config import Config

    return load_components(Config(model=str(path), model_components=str(components))).unet


def test_merged_sd3_single_file_is_the_original_mmdit_layout_of_base_plus_lora(sd3, tmp_path):
    from safetensors import safe_open

    out = export(tmp_path, sd3["lora"], "--merge", "--single-file")
    files = sorted(out.glob("*.safetensors"))
    assert [f.name for f in files] == ["run_alignprop_merged.safetensors"]
    with safe_open(str(files[0]), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "joint_blocks.0.x_block.attn.qkv.weight" in keys and not any(k.startswith("transformer_blocks") for k in keys)
    assert meta["modelspec.architecture"].startswith("stable-diffusion-3-") and not meta[
        "modelspec.architecture"].endswith("/lora")  # (sd-scripts: an SD3 checkpoint's is Stability's)
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    transformer = _load_transformer_file(files[0], sd3["base"])
    assert_rel_close(transformer_out(transformer), sd3["ref"], REORDERED, "merged SD3 single file")
    assert "models/diffusion_models" in (out / "README.md").read_text()


@pytest.mark.parametrize("qk_norm, dual", [(None, ()), ("rms_norm", (0,))])  # SD3 Medium; SD3.5 Medium's MMDiT-X
def test_sd3_original_layout_reads_back_exactly_with_diffusers_converter(qk_norm, dual):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from lowmem_alignprop.models.flow_layout import sd3_to_original

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                  caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=16,
                                  qk_norm=qk_norm, dual_attention_layers=dual)
    ours = model.state_dict()
    back = convert_sd3_transformer_checkpoint_to_diffusers(sd3_to_original(ours, 2))
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_sd3_kohya_applied_as_comfyui_does_reproduces_the_lora(sd3, tmp_path):
    """diffusers' SD3 loader reads no kohya names, so the file is applied as ComfyUI applies it: ``lora_unet_X`` to
    the original weight ``X.weight`` (dots for underscores), ``W += alpha / rank * up @ down``; the patched
    original-layout transformer, read back by diffusers' own converter, computes base + LoRA."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    from lowmem_alignprop.models.flow_layout import sd3_to_original

    base = SD3Transformer2DModel.from_pretrained(sd3["base"] / "transformer")
    original = sd3_to_original(base.state_dict(), base.config.num_layers)
    by_name = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in original if k.endswith(".weight")}
    state = _kohya(export(tmp_path, sd3["lora"], "--format", "kohya"))
    for name in {k.split(".")[0] for k in state}:
        down, up, alpha = (state[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        key = by_name[name]
        original[key] = original[key] + alpha.item() / down.shape[0] * up @ down
    save_file(original, str(tmp_path / "patched.safetensors"))
    transformer = _load_transformer_file(tmp_path / "patched.safetensors", sd3["base"])
    assert_rel_close(transformer_out(transformer), sd3["ref"], REORDERED, "kohya file applied as ComfyUI does")


# ---------------------------------------------------------------------------------------------------------
# a FLUX run end to end: --sample-every, checkpoints, export_format=kohya,peft; sample and export of a checkpoint
# ---------------------------------------------------------------------------------------------------------

FLOW = ["--profile", "cpu", "--seed", "0", "--set", f"resolution={RES}", "--set", "sample_steps=4", "--set", "k=2",
        "--set", "batch_size=1", "--set", "guidance_scale=3.5", "--set", f"lora_rank={RANK}"]
PROMPTS = ["a photo of a cat", "a dark tree"]


@pytest.fixture(scope="module")
def flux_run(flux, tmp_path_factory):
    out = tmp_path_factory.mktemp("fluxrun") / "run"
    rc = main([*FLOW, "--model", str(flux["base"]), "--output-dir", str(out), "--steps", "2", "--sample-every", "1",
               "--checkpoint-every", "1", "--set", "keep_checkpoints=0", "--set", "sample_prompts=2", "--set",
               "lr=0.05", "--set", f"lora_alpha={ALPHA}", "--set", "export_format=kohya,peft"])
    assert rc == 0
    return out


def test_flux_run_samples_while_training_and_exports_kohya_and_peft_at_the_end(flux_run, flux, tmp_path):
    from safetensors.torch import load_file

    assert sorted(p.name for p in (flux_run / "samples").glob("step-*.png")) == ["step-000001.png", "step-000002.png"]
    rows = [json.loads(x) for x in (flux_run / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["sample_rewards"]) == 2 for r in rows)
    after = [i["reward_after"] for i in json.loads((flux_run / "samples" / "before_after.json").read_text())["images"]]
    assert rows[-1]["sample_rewards"] == pytest.approx(after, rel=1e-6)  # the last sampled step is the final LoRA
    kohya = load_file(str(next((flux_run / "export" / "kohya").glob("*.safetensors"))))
    assert set(kohya) == set(_kohya(export(tmp_path, flux_run / "lora", "--format", "kohya")))
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in kohya
    assert (flux_run / "export" / "peft" / "adapter_model.safetensors").is_file()
    assert "FLUX transformer LoRA, kohya format" in (flux_run / "export" / "kohya" / "README.md").read_text()


def test_a_flux_runs_exports_card_metadata_reads_back_as_the_hub_reads_it(flux_run, flux, tmp_path):
    """The kohya and peft exports at the end of a FLUX run, as the hub reads their cards: the flux tag, the task, the
    run's grid (copied into each folder) as the widget's example; a hub-id base as the adapter's base_model."""
    from lowmem_alignprop.lora import lora_export as lx
    from lowmem_alignprop.lora import lora_files

    tags = ["lowmem-alignprop", "alignprop", "lora", "reward-finetuning", "text-to-image", "flux"]
    widget = [{"text": "before and after training, same seeds", "output": {"url": "before_after.png"}}]
    for fmt, library in (("kohya", "diffusers"), ("peft", "peft")):
        assert hub_metadata(flux_run / "export" / fmt) == {"library_name": library, "pipeline_tag": "text-to-image",
                                                           "tags": tags, "widget": widget}
    lora = lora_files.read_lora(str(flux["lora"]))
    lora.base = {**lora.base, "model": "you/flux-base"}
    lx.export(lora, "kohya", tmp_path / "hub")
    assert hub_metadata(tmp_path / "hub") == {"base_model": "you/flux-base", "base_model_relation": "adapter",
                                              "library_name": "diffusers", "pipeline_tag": "text-to-image",
                                              "tags": tags}


def test_a_ctrl_c_during_a_flux_runs_export_at_the_end_ends_the_run_whole(flux, tmp_path, monkeypatch, caplog):
    """Ctrl-C while export_format's kohya file of a FLUX run is written (training is over): the export, the LoRA and
    the summary are written whole, exit 0, and the line says nothing trained is lost (it said "the steps since the last
    checkpoint are lost")."""
    import os
    import signal

    import lowmem_alignprop.training.train_outputs as train_outputs
    from lowmem_alignprop.run import checkpoint as ckpt

    real, sent = train_outputs.export_at_end, []

    def export_at_end(*args, **kwargs):
        sent.append(os.kill(os.getpid(), signal.SIGINT))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_outputs, "export_at_end", export_at_end)
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    assert main([*FLOW, "--model", str(flux["base"]), "--output-dir", str(out), "--steps", "1", "--set",
                 "sample_prompts=0", "--set", "export_format=kohya"]) == 0
    assert len(sent) == 1 and ("SIGINT received: training is over, the LoRA and summary are being written: a moment "
                               "(Ctrl-C aborts: no trained step is lost, --resume latest writes the outputs again)"
                               ) in caplog.text, caplog.text[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps_done"], summary["interrupted"]) == (1, False)
    assert ckpt.find_resume(out, "latest").name == "step-00000001"
    kohya, again = _kohya(out / "export" / "kohya"), _kohya(export(tmp_path, out / "lora", "--format", "kohya"))
    assert set(kohya) == set(again) and len(kohya) > 0  # the export is whole: as export writes it from lora/
    assert all(torch.equal(kohya[k], again[k]) for k in kohya)


def test_sample_accepts_a_flux_checkpoint_and_kohya_file_and_export_a_checkpoint(flux_run, flux, tmp_path, caplog):
    def lora_rewards(spec, name):
        out = tmp_path / name
        assert main(["sample", *FLOW, "--model", str(flux["base"]), "--lora", str(spec), "--num-prompts", "1",
                     "--output-dir", str(out)]) == 0
        return [r for p in json.loads((out / "sample_results.json").read_text())["per_prompt"] for r in p["lora"]]

    final = lora_rewards(flux_run / "lora", "final")
    assert lora_rewards(flux_run / "checkpoints" / "step-2", "ckpt2") == pytest.approx(final, rel=1e-6)
    # the kohya export of the run (fused q/k/v split back exactly) renders the same images
    kohya = next((flux_run / "export" / "kohya").glob("*.safetensors"))
    assert lora_rewards(kohya, "kohya") == pytest.approx(final, rel=1e-5)
    assert lora_rewards(flux_run / "checkpoints" / "step-1", "ckpt1") != pytest.approx(final, rel=1e-4)
    out = tmp_path / "export"
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    assert main(["export", "--lora", str(flux_run / "checkpoints" / "step-1"), "--format", "kohya", "--out",
                 str(out)]) == 0
    assert "_step1_" in next(out.glob("*.safetensors")).name
    # the line names the checkpoint given, not the temporary lora/ folder it was read into
    assert f"exported {flux_run / 'checkpoints' / 'step-00000001'} (kohya) to {out}: " in caplog.text, caplog.text


def test_a_lora_or_export_copied_away_from_its_run_samples_with_the_runs_settings(flux_run, tmp_path):
    """`sample LORA` without --model takes the model and the image settings (resolution, steps, guidance...) the run
    sampled with: from the run's config.yaml when the run folder or a folder in it is named, from base_model.json where no run's config.yaml is beside the LoRA (an export elsewhere, the lora/
    folder copied to another machine), and for a run from before base_model.json recorded them, from the run at
    export time. Before: the cpu profile's SD1.5 settings (64 px, 10 steps, guidance 7.5), in silence."""
    import shutil

    def rewards(spec, name):
        out = tmp_path / name
        assert main(["sample", "--profile", "cpu", "--lora", str(spec), "--num-prompts", "1",
                     "--output-dir", str(out)]) == 0
        return [r for p in json.loads((out / "sample_results.json").read_text())["per_prompt"] for r in p["lora"]]

    away = tmp_path / "away"
    ours = rewards(flux_run / "lora", "in-run")  # beside its run's config.yaml
    shutil.copytree(flux_run / "lora", away / "copied-lora")
    assert rewards(away / "copied-lora", "copied") == pytest.approx(ours, rel=1e-6)
    assert main(["export", "--lora", str(flux_run / "lora"), "--format", "peft", "--out", str(away / "peft")]) == 0
    assert rewards(away / "peft", "peft") == pytest.approx(ours, rel=1e-6)
    old_run = tmp_path / "old-run"  # its base_model.json without the settings: the export adds its run's
    shutil.copytree(flux_run, old_run, ignore=shutil.ignore_patterns("checkpoints", "export", "samples"))
    record = json.loads((old_run / "lora" / "base_model.json").read_text())
    assert record.pop("image_settings") == {"resolution": RES, "sample_steps": 4, "guidance_scale": 3.5}  # no eta:
    # FLUX's Euler sampler has none
    (old_run / "lora" / "base_model.json").write_text(json.dumps(record))
    assert rewards(old_run, "old-run-folder") == pytest.approx(ours, rel=1e-6)  # its config.yaml, beside lora/
    assert main(["export", "--lora", str(old_run / "lora"), "--format", "kohya", "--out", str(away / "kohya")]) == 0
    assert rewards(next((away / "kohya").glob("*.safetensors")), "kohya") == pytest.approx(ours, rel=1e-5)


def test_a_lora_sampled_on_its_model_named_renders_as_its_run_and_an_unknown_model_is_said(flux_run, flux, tmp_path,
                                                                                          caplog, capsys):
    """--model naming the model the LoRA was trained on (another spelling of its path) renders with the run's image
    settings, as without --model (it used the profile's: other images than before_after.json's, in silence). A
    LoRA whose base_model.json is damaged or gone, given to the default model it does not fit: the line says the
    model is the default and why; a damaged record is warned of."""
    import shutil

    def rewards(name, *model):
        out = tmp_path / name
        assert main(["sample", "--profile", "cpu", "--lora", str(flux_run / "lora"), *model, "--num-prompts", "1",
                     "--output-dir", str(out)]) == 0
        return [r for p in json.loads((out / "sample_results.json").read_text())["per_prompt"] for r in p["lora"]]

    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    ours = rewards("recorded")
    spelled = str(flux["base"].parent / "." / flux["base"].name)  # the same folder, written otherwise
    assert rewards("named", "--model", spelled) == pytest.approx(ours, rel=1e-6)
    assert f"--model {spelled} is the model {flux_run / 'lora'} was trained on; as its run did: " in caplog.text
    for broken, content in (("damaged", "{not json"), ("gone", None)):
        lora = tmp_path / broken / "lora"
        shutil.copytree(flux_run / "lora", lora)
        if content is None:
            (lora / "base_model.json").unlink()
        else:
            (lora / "base_model.json").write_text(content)
        caplog.clear()
        capsys.readouterr()
        assert main(["sample", "--profile", "cpu", "--lora", str(lora), "--output-dir", str(tmp_path / "o")]) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
        assert len(err) == 1 and (f"(the default: --lora {lora} records no model it was trained on) is a UNet model"
                                  in err[0]), err
        assert ("base_model.json cannot be read" in caplog.text) == (content is not None), caplog.text
    # mixed with a run's LoRA that records its model: the line names it (the --model to pass, likely)
    assert main(["sample", "--profile", "cpu", "--lora", f"{lora}:0.5", "--lora", f"{flux_run / 'lora'}:0.5",
                 "--output-dir", str(tmp_path / "o")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(err) == 1 and (f"(the default: --lora {lora}:0.5 records no model it was trained on; --lora "
                              f"{flux_run / 'lora'}:0.5 records {flux['base']}) is a UNet model" in err[0]), err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------
# --init-lora for flow models
# ---------------------------------------------------------------------------------------------------------

def _images_at_step_0(base: Path, out: Path, *sets: str):
    """The fixed-seed images the trainer renders before its first step (its `generate`, as for the grid)."""
    from lowmem_alignprop.cli import common_parser, config_from_args
    from lowmem_alignprop.lora.init_lora import check_init_lora
    from lowmem_alignprop.training.train import Trainer
    from lowmem_alignprop.run.runfolder import RunFolder

    args = common_parser("t", "t").parse_args([*FLOW, "--model", str(base), "--output-dir", str(out), "--set",
                                               "sample_prompts=2", *sets])
    _, cfg = config_from_args(args)
    trainer = Trainer(cfg, RunFolder(cfg.output_dir), PROMPTS)
    trainer.init_file = (check_init_lora(cfg.init_lora, cfg.lora_rank, cfg.model, cfg.model_components)
                          if cfg.init_lora else None)
    trainer.setup_accelerator()
    with run_objects_only():  # as a run loads (the load's measurement walks the run's objects, not the suite's)
        trainer.load_models()
    trainer.setup_sampling()
    return trainer.generate(PROMPTS, 11)[0]


@pytest.fixture(scope="module")
def flux_exports(flux, tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-exports")
    for fmt in ("kohya", "peft"):
        assert main(["export", "--lora", str(flux["lora"]), "--format", fmt, "--out", str(root / fmt)]) == 0
    reference = _images_at_step_0(flux["base"], root / "ref", "--set", f"init_lora={flux['lora']}")
    base = _images_at_step_0(flux["base"], root / "base")
    assert relative_difference(base, reference) > 0.01  # the LoRA changes the images: the comparisons prove something
    return {"kohya": next((root / "kohya").glob("*.safetensors")), "peft": root / "peft", "reference": reference}


def _comfyui_lora_a_b(kohya_file: Path, lora: Path, out: Path) -> Path:
    """A kohya FLUX file as ComfyUI-era tools save it: the original transformer's paths under ``diffusion_model.``
    with diffusers' lora_A/lora_B and no alpha (its scale folded into B)."""
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.lora import flow_export

    state, weights = load_file(str(kohya_file)), load_file(str(lora / "pytorch_lora_weights.safetensors"))
    original = {flow_export.kohya_name(path): path for path in (
        flow_export.original_slot(k[len("transformer."):-len(".lora_A.weight")], "flux")[0]
        for k in weights if k.endswith(".lora_A.weight"))}
    renamed = {}
    for name in {k.split(".")[0] for k in state}:
        down, up, alpha = (state[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        key = f"diffusion_model.{original[name]}"
        renamed |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up * (float(alpha) / down.shape[0])}
    save_file(renamed, str(out))
    return out


@pytest.mark.parametrize("layout", ["kohya", "peft", "comfyui_lora_a_b"])
def test_flux_init_lora_from_kohya_or_peft_renders_what_the_lora_renders(layout, flux, flux_exports, tmp_path):
    """Step 0 from the kohya file (fused q/k/v split back exactly), the peft folder or a ComfyUI-saved file (the
    original paths with lora_A/lora_B, no alpha) renders what the run's own LoRA renders (alpha 8 over rank 4 in the
    LoRA, alpha = rank in this run: B is rescaled)."""
    spec = _comfyui_lora_a_b(flux_exports["kohya"], flux["lora"], tmp_path / "comfyui.safetensors") \
        if layout == "comfyui_lora_a_b" else flux_exports[layout]
    images = _images_at_step_0(flux["base"], tmp_path / "run", "--set", f"init_lora={spec}")
    assert_rel_close(images, flux_exports["reference"], SAME_OPS, f"step 0 from a {layout} LoRA")


def test_flow_init_lora_of_another_rank_or_family_is_one_line_and_writes_nothing(flux, sd3, tmp_path, capsys):
    fast = [*FLOW, "--steps", "1", "--set", "sample_prompts=0"]
    cases = [(["--model", str(flux["base"]), "--init-lora", str(flux["lora"]), "--set", "lora_rank=8"],
              f"--init-lora {flux['lora']} has rank 4 and this run trains rank 8: add --set lora_rank=4"),
             (["--model", str(flux["base"]), "--init-lora", str(sd3["lora"])],
              f"--init-lora {sd3['lora']} adapts an SD3/SD3.5 transformer, but --model {flux['base']} is a FLUX.1 "
              "transformer: pass the model it was trained on with --model")]  # before the model loads
    for i, (args, needle) in enumerate(cases):
        out = tmp_path / f"run{i}"
        assert_refused(main, [*fast, *args, "--output-dir", str(out)], needle, out, capsys)


def test_a_feed_forward_init_lora_in_an_attention_run_names_a_key_of_the_users_own_file(flux_ff, tmp_path, capsys):
    """A LoRA of attention+ff in a run of the attention projections: the example is a key the user's file holds, in
    full: a kohya file's own (with the transformer's layer it holds), the diffusers file's; a peft folder's, the
    layer's path. It was the kohya file's converted diffusers key, cut in the middle by quote()
    ('transformer.single_transfor...cks.0.proj_mlp.lora_A.weight'), a key the file does not hold."""
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.lora import flow_export

    kohya = next(export(tmp_path / "k", flux_ff["lora"], "--format", "kohya").glob("*.safetensors"))
    peft = export(tmp_path / "p", flux_ff["lora"], "--format", "peft")
    original = {flow_export.kohya_name(path): path for path in (  # the same file in BFL's names, as ComfyUI's
        flow_export.original_slot(k[len("transformer."):-len(".lora_A.weight")], "flux")[0]
        for k in load_file(str(flux_ff["lora"] / "pytorch_lora_weights.safetensors")) if k.endswith(".lora_A.weight"))}
    comfy = tmp_path / "comfy.safetensors"
    save_file({f"diffusion_model.{original[k.split('.')[0]]}.{k.split('.', 1)[1]}": v
               for k, v in load_file(str(kohya)).items()}, str(comfy))
    fix = "and this run's LoRA is on the attention projections: add --set lora_layers=attention+ff"
    cases = [(kohya, "'lora_unet_double_blocks_0_img_mlp_0.lora_down.weight', the transformer's "
                     "transformer_blocks.0.ff.net.0.proj"),
             (comfy, "'diffusion_model.double_blocks.0.img_mlp.0.lora_down.weight', the transformer's "
                     "transformer_blocks.0.ff.net.0.proj"),
             (flux_ff["lora"], "'transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight'"),
             (peft, "layer transformer.single_transformer_blocks.0.proj_mlp")]
    for i, (lora, example) in enumerate(cases):
        out = tmp_path / f"run{i}"
        assert main([*FLOW, "--model", str(flux_ff["base"]), "--init-lora", str(lora), "--output-dir", str(out)]) == 2
        assert [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")] == [
            f"error: --init-lora {lora} adapts feed-forward layers too (e.g. {example}) {fix}"]
        assert not out.exists()


def test_an_sd3_lora_in_every_form_on_a_flux_model_is_refused_by_family_before_it_loads(flux, sd3, tmp_path, capsys,
                                                                                       monkeypatch):
    """A kohya file (in its export folder, or copied alone) and a peft export of an SD3 LoRA: sample and --init-lora
    on a FLUX.1 model say so from what was named, as of the run's lora/, before the transformer is read (their
    converted copies name SD3's joint blocks as FLUX.1's double blocks and have no record beside them)."""
    import shutil

    from lowmem_alignprop.commands import sample_pipeline

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sample_pipeline, "build_pipeline", never)
    kohya = next(export(tmp_path / "k", sd3["lora"], "--format", "kohya").glob("*.safetensors"))
    alone = tmp_path / "alone" / kohya.name
    alone.parent.mkdir()
    shutil.copy(kohya, alone)
    peft = export(tmp_path / "p", sd3["lora"], "--format", "peft")
    # copied away without base_model.json, a diffusers file or a peft folder names no model: their attention
    # layers' width (the tiny SD3's 16, the tiny FLUX.1's 32) tells, also before the transformer is read
    diffusers_alone = tmp_path / "d-alone" / "sd3_lora.safetensors"
    diffusers_alone.parent.mkdir()
    shutil.copy(sd3["lora"] / "pytorch_lora_weights.safetensors", diffusers_alone)
    peft_alone = shutil.copytree(peft, tmp_path / "p-alone", ignore=shutil.ignore_patterns("base_model.json"))
    family = (f"adapts an SD3/SD3.5 transformer, but --model {flux['base']} is a FLUX.1 transformer: pass the model it "
              "was trained on with --model")
    width = (f"adapts attention layers of width 16, but --model {flux['base']} is a transformer of width 32: it was "
             "trained on another model; pass that model with --model")
    for i, (lora, said) in enumerate(((sd3["lora"], family), (kohya, family), (alone, family), (peft, family),
                                      (diffusers_alone, width), (peft_alone, width))):
        for option, command in (("--lora", ["sample", str(lora)]),
                                ("--init-lora", ["--steps", "1", "--set", "sample_prompts=0", "--init-lora",
                                                 str(lora)])):
            out = tmp_path / f"out{i}{option}"
            assert_refused(main, [*command, *FLOW, "--model", str(flux["base"]), "--output-dir", str(out)],
                           f"{option} {lora} {said}", out, capsys)


def test_a_lora_of_a_shipped_flow_width_is_named_and_one_of_the_models_width_passes(flux, tmp_path):
    """check_lora_files alone: a LoRA whose q/k/v projections read 1536 features (SD3/SD3.5 Medium's width) on the
    tiny FLUX.1 (32) names the model it likely belongs to; one of the model's width, or with no q/k/v layer (its
    output projections only), passes to loading."""
    from safetensors.torch import save_file

    from lowmem_alignprop.lora.lora_args import LoraSpec
    from lowmem_alignprop.lora.lora_checks import check_lora_files

    def lora(width: int, layer: str = "to_q") -> LoraSpec:
        file = tmp_path / f"{layer}-{width}.safetensors"
        save_file({f"transformer.transformer_blocks.0.attn.{layer}.lora_A.weight": torch.zeros(RANK, width),
                   f"transformer.transformer_blocks.0.attn.{layer}.lora_B.weight": torch.zeros(width, RANK)}, str(file))
        return LoraSpec(arg=str(file), file=file, weight=1.0, name="a")

    with pytest.raises(UserError) as e:
        check_lora_files([lora(1536)], str(flux["base"]))
    assert str(e.value) == (f"--lora {tmp_path / 'to_q-1536.safetensors'} adapts attention layers of width 1536 "
                            f"(SD3/SD3.5 Medium's?), but --model {flux['base']} is a transformer of width 32: it was "
                            "trained on another model; pass that model with --model")
    check_lora_files([lora(32), lora(1536, "to_out.0")], str(flux["base"]))
    with pytest.raises(UserError) as e:  # sample without --model: the line says the model is the default
        check_lora_files([lora(1536)], str(flux["base"]), default="--lora X records no model it was trained on")
    assert (f"but --model {flux['base']} (the default: --lora X records no model it was trained on) is a "
            "transformer of width 32: it was trained on another model") in str(e.value)
    mixed = tmp_path / "mixed.safetensors"  # q of the model's width, k of another: the line names the other one
    save_file({**{f"transformer.transformer_blocks.0.attn.to_q.{p}": t for p, t in (
        ("lora_A.weight", torch.zeros(RANK, 32)), ("lora_B.weight", torch.zeros(32, RANK)))},
        **{f"transformer.transformer_blocks.0.attn.to_k.{p}": t for p, t in (
            ("lora_A.weight", torch.zeros(RANK, 48)), ("lora_B.weight", torch.zeros(48, RANK)))}}, str(mixed))
    with pytest.raises(UserError, match=f"adapts attention layers of width 48, but --model {flux['base']} is a "
                                        "transformer of width 32"):
        check_lora_files([LoraSpec(arg=str(mixed), file=mixed, weight=1.0, name="m")], str(flux["base"]))


def test_plan_fits_a_flux_init_lora_onto_the_model_as_training_does(flux, tmp_path, capsys):
    """plan --init-lora loads the LoRA onto the transformer built on meta: its own LoRA plans; one of other widths
    (another FLUX.1-shaped model's) is refused by plan with training's line, where plan said FITS."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    plan = ["plan", *FLOW, "--model", str(flux["base"])]
    assert main([*plan, "--init-lora", str(flux["lora"])]) == 0
    capsys.readouterr()
    other = tmp_path / "other" / "pytorch_lora_weights.safetensors"
    other.parent.mkdir()
    with safe_open(str(flux["lora"] / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        # (an output projection's: a q/k/v projection of another width is refused from the files, check_lora_files)
        first = sorted(k for k in f.keys() if k.endswith("lora_A.weight") and ".to_out." in k)[0]
        save_file({k: torch.zeros(RANK, f.get_tensor(k).shape[1] + 8) if k == first else f.get_tensor(k)
                   for k in f.keys()}, str(other), metadata=f.metadata())
    said = []
    for command in (plan, [*FLOW, "--model", str(flux["base"]), "--steps", "1", "--output-dir", str(tmp_path / "r")]):
        assert main([*command, "--init-lora", str(other)]) == 2
        said.append([x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")])
    assert said[0] == said[1] and len(said[0]) == 1 and "have other shapes than this model's layers" in said[0][0], said


def test_a_control_lora_width_is_refused_alike_with_and_without_the_text_encoders(tmp_path):
    """A FLUX LoRA whose x_embedder takes twice the input (a Control LoRA's): FluxPipeline.load_lora_weights would
    widen the bare layer in silence; loaded part by part (adapters.load_adapter_file), it is one "does not fit" line,
    the same whether the pipeline still holds its text encoders (plan's meta model, --merge) or freed them once the
    prompts were encoded (training, sample); the transformer is left as it was."""
    from diffusers import FluxPipeline

    from lowmem_alignprop.lora.adapters import load_adapter_file
    from lowmem_alignprop.settings.errors import UserError
    from flowmodels import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline(0)
    x = pipe.transformer.x_embedder
    FluxPipeline.save_lora_weights(str(tmp_path / "wide"), transformer_lora_layers={
        "x_embedder.lora_A.weight": torch.ones(2, 2 * x.in_features), "x_embedder.lora_B.weight": torch.ones(32, 2)})
    said = []
    for freed in (False, True):
        pipe = build_tiny_flux_pipeline(0)
        if freed:
            pipe.text_encoder = pipe.text_encoder_2 = None
        with pytest.raises(UserError) as e:
            load_adapter_file(pipe, tmp_path / "wide" / "pytorch_lora_weights.safetensors", "init", "--init-lora x",
                              "FIX")
        said.append(str(e.value))
        assert pipe.transformer.x_embedder.weight.shape == (32, 64)  # (not widened)
    assert said == ["--init-lora x does not fit this model: 1 of its weights have other shapes than this model's "
                    "layers (e.g. x_embedder: [2, 128] in the LoRA, [2, 64] here); FIX"] * 2, said


# ---------------------------------------------------------------------------------------------------------
# negative_prompt: SD3's unconditional branch; FLUX has none
# ---------------------------------------------------------------------------------------------------------

def test_sd3_negative_prompt_is_the_pipelines_unconditional_branch(sd3):
    """Our images with a negative prompt are StableDiffusion3Pipeline's with the same negative prompt and noise
    (CFG as it does), and differ from the empty negative prompt's."""
    from diffusers import StableDiffusion3Pipeline

    from lowmem_alignprop.models import flow

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3["base"])
    pipe.set_progress_bar_config(disable=True)

    def ours(negative):
        emb = flow.encode_prompts(pipe, PROMPTS, "cpu", guidance_scale=4.0, max_sequence_length=16,
                                  negative_prompt=negative)
        images, _ = flow.sample_images(pipe.transformer, pipe.scheduler, pipe.vae, emb, cfg=type(
            "C", (), {"truncation": "fixed", "k": 0})(), rng=None, steps=4, height=RES, width=RES, guidance_scale=4.0,
            generator=torch.Generator().manual_seed(5))
        return images

    with torch.no_grad():
        mine = ours("a dark blurry photo")
        lat, _ = flow.initial_latents(pipe.transformer, pipe.vae, 2, RES, RES, torch.Generator().manual_seed(5))
        theirs = pipe(prompt=PROMPTS, negative_prompt=["a dark blurry photo"] * 2, latents=lat, num_inference_steps=4,
                      guidance_scale=4.0, height=RES, width=RES, output_type="pt", max_sequence_length=16).images
        empty = ours("")
    assert_rel_close(mine, theirs.float(), REORDERED, "our SD3 rollout vs the pipeline, with a negative prompt")
    assert relative_difference(mine, empty) > 100 * REORDERED


def test_flags_a_loaded_model_does_not_read_are_refused_or_said():
    """What only loading tells (a hub id, a transformer file): t5_encoder=false on FLUX or a UNet model is refused as
    Config.validate refuses it for a folder; DDIM's eta on a flow model is said (the trainer's and plan's notes)."""
    from types import SimpleNamespace

    from lowmem_alignprop.models.family import check_supported, model_defaults_note

    for family, needle in (("flux", "FLUX.1 always needs its T5-XXL"), ("unet", "no T5 text encoder to leave out")):
        with pytest.raises(UserError, match=needle):
            check_supported(SimpleNamespace(family=family), Config(t5_encoder=False))
    from lowmem_alignprop.models.loading import load_flow_components
    with pytest.raises(UserError, match="SD3/SD3.5 and FLUX.1 predict a flow"):  # (a hub id: only loading tells)
        load_flow_components(Config(prediction_type="v_prediction"), "flow_arch", "flux", torch.float32)
    sd3 = SimpleNamespace(family="sd3")
    assert "eta=0 is DDIM's (UNet models); SD3/FLUX step with Euler" in model_defaults_note(sd3, Config(eta=0.0))
    assert model_defaults_note(sd3, Config()) is None  # the default eta: nothing to say
    assert model_defaults_note(SimpleNamespace(family="unet"), Config(eta=0.0)) is None
    # FLUX.1-schnell reads no guidance scale (no guidance embedding, no CFG pass): one the user set is said
    schnell, dev = (SimpleNamespace(family="flux", unet=SimpleNamespace(config=SimpleNamespace(guidance_embeds=g)))
                    for g in (False, True))
    assert model_defaults_note(schnell, Config(guidance_scale=3.5, sample_steps=4)) == (
        "guidance_scale=3.5: FLUX.1-schnell has no guidance embedding and no classifier-free pass: it changes nothing "
        "here")
    assert model_defaults_note(schnell, Config(sample_steps=4)) is None
    assert model_defaults_note(dev, Config(guidance_scale=3.5)) is None
    # an SD1.5 profile's sampling (the cpu profile's guidance 7.5, 10 steps) on FLUX.1-dev or SD3.5: said, with the fix
    said = model_defaults_note(dev, Config(guidance_scale=7.5, sample_steps=10))
    assert "guidance_scale=7.5: FLUX.1-dev's guidance embedding was distilled near 3.5" in said, said
    assert "sample_steps=10: SD3.5 and FLUX.1-dev's pipelines sample in 28 Euler steps" in said, said
    assert "guidance" not in model_defaults_note(sd3, Config(sample_steps=10))  # SD3's CFG takes 7.5 (its pipeline: 7)


def test_flux_negative_prompt_is_refused_before_anything_loads(flux, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FLOW, "--model", str(flux["base"]), "--set", "negative_prompt=blurry", "--output-dir",
                 str(out)]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(err) == 1 and "FLUX.1 is guidance-distilled" in err[0], err
    assert not out.exists()


def test_the_flux_cards_code_samples_with_the_runs_t5_length_and_runs_as_written(flux_run, flux, tmp_path):
    """The card's code had no import and no call: FluxPipeline's defaults (512 T5 tokens, where a schnell run encodes
    256; guidance 3.5) sample otherwise than the run did. Now its call has the run's settings, the T5 length the
    run encoded with (summary.json's t5_tokens) among them, and it runs as written."""
    out = export(tmp_path, flux_run / "lora", "--format", "diffusers")
    summary = json.loads((flux_run / "summary.json").read_text())
    config = yaml.safe_load((flux_run / "config.yaml").read_text())
    card = (out / "README.md").read_text()
    block = card.split("```python\n", 1)[1].split("```", 1)[0].replace('"THIS_FOLDER"', json.dumps(str(out)))
    assert block.startswith("from diffusers import FluxPipeline\n")
    assert summary["t5_tokens"] > 0 and f"max_sequence_length={summary['t5_tokens']}" in block, block
    assert "kept_layers" not in summary  # (no --init-lora: nothing kept, no key)
    assert f"num_inference_steps={config['sample_steps']}, guidance_scale={config['guidance_scale']:g}" in block
    scope: dict = {"torch": torch}
    exec(block.replace('"a prompt"', '"a red car", generator=torch.Generator().manual_seed(0)'), scope)
    assert scope["image"].size == (config["resolution"], config["resolution"])


def test_a_flux_kohya_file_shared_alone_samples_as_its_header_says(flux, tmp_path, caplog):
    """A FLUX kohya file copied away alone (no base_model.json): sample reads its header, not that of the diffusers
    copy its fused q/k/v are split into (which has none): with --model its run's image settings are taken, without
    it the line on the default model names the model the header says (both were lost: the profile's 10 steps, and
    "records no model it was trained on" alone)."""
    import argparse
    import shutil

    from safetensors import safe_open

    from lowmem_alignprop.commands.sample_cmd import take_run_settings

    alone = tmp_path / "downloads" / "style.safetensors"
    alone.parent.mkdir()
    shutil.copy(next(export(tmp_path, flux["lora"], "--format", "kohya").glob("*.safetensors")), alone)
    with safe_open(str(alone), framework="pt") as f:
        header = f.metadata()
    assert json.loads(header["alignprop_image_settings"]) == {"sample_steps": 4}
    assert header["alignprop_base_model"] == "base"

    def taken(model):
        args = argparse.Namespace(lora=[str(alone)], set=[], model=model, reward=None, prompts=None, recipe=None,
                                  output_dir="out")
        return args, take_run_settings(args, [])

    args, _ = taken(str(flux["base"]))
    assert args.set == ["sample_steps=4", "reward=brightness"]
    args, request = taken(None)
    assert args.model is None and request.default_model == (
        f"--lora {alone} records no model it was trained on; its header (alignprop_base_model) says it was trained "
        "on base (a folder on the training machine): pass --model PATH")
    # mixed in after another LoRA: the settings its header says are compared with the first one's
    from lowmem_alignprop.lora.lora_args import parse_lora
    from lowmem_alignprop.commands.sample_cmd import say_other_runs

    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        say_other_runs([parse_lora(str(flux["lora"]), 0), parse_lora(str(alone), 1)],
                       {"sample_steps": 10, "reward": "brightness"}, set())
    assert f"--lora {alone}'s run sampled with sample_steps=4: the images use the first LoRA's settings " \
           "(sample_steps=10); --set KEY=VALUE chooses" in caplog.text


def test_a_merged_flux_file_refuses_the_exports_of_the_lora_it_holds(flux, tmp_path, capsys):
    """`sample EXPORT --model MERGED` where export --merge fused the LoRA EXPORT was exported from: refused as the
    run's lora/ is (the export's base_model.json records the digest of the LoRA it was made from); it applied the
    LoRA twice. Another LoRA (the same one scaled) and a negative weight pass."""
    import shutil

    from lowmem_alignprop.lora.lora_args import parse_lora
    from lowmem_alignprop.lora.lora_merge import refuse_held_loras

    merged = next(export(tmp_path / "m", flux["lora"], "--merge", "--single-file").glob("*.safetensors"))
    kohya = next(export(tmp_path / "k", flux["lora"], "--format", "kohya").glob("*.safetensors"))
    peft = export(tmp_path / "p", flux["lora"], "--format", "peft")
    capsys.readouterr()
    assert main(["sample", str(kohya), "--model", str(merged), "--set", f"model_components={flux['base']}",
                 "--output-dir", str(tmp_path / "s")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert err == [f"error: --lora {kohya}: --model {merged} already holds this LoRA (export --merge fused it at "
                   "weight 1): sampling it with the LoRA again applies it twice; pass --model base, the model it was "
                   "merged into"], err
    assert not (tmp_path / "s").exists()
    with pytest.raises(UserError, match=f"--lora {peft}: --model {merged} already holds this LoRA"):
        refuse_held_loras([parse_lora(str(peft), 0)], str(merged))
    alone = tmp_path / "alone" / kohya.name  # the kohya file shared alone: its header's digest tells it
    alone.parent.mkdir()
    shutil.copy(kohya, alone)
    with pytest.raises(UserError, match=f"--lora {alone}: --model {merged} already holds this LoRA"):
        refuse_held_loras([parse_lora(str(alone), 0)], str(merged))
    refuse_held_loras([parse_lora(f"{kohya}:-1", 0)], str(merged))  # takes it out again: allowed
    from lowmem_alignprop.lora.lora_files import header_lora_digest
    (tmp_path / "cut.safetensors").write_bytes(alone.read_bytes()[:30])  # a damaged file's header tells no digest
    assert header_lora_digest(tmp_path / "cut.safetensors") is None and header_lora_digest(alone) is not None
    other = tmp_path / "other" / "kohya"  # another LoRA's export: its record's digest is not the merged one's
    shutil.copytree(kohya.parent, other)
    record = json.loads((other / "base_model.json").read_text())
    (other / "base_model.json").write_text(json.dumps({**record, "lora_digest": "0" * 16}))
    refuse_held_loras([parse_lora(str(other / kohya.name), 0)], str(merged))


def test_a_second_lora_merges_into_a_flux_single_file_with_its_bases_text_encoders(flux, tmp_path, caplog, capsys,
                                                                                     monkeypatch):
    """`export LORA_B --merge --model MERGED.safetensors` (the merged single file of LORA_A on the same base): the file
    holds the transformer alone, and export has no --set model_components (the line named it): its text encoders,
    VAE and scheduler come from the folder LORA_B was trained on (said), and the merge equals LORA_B merged into the
    merged folder. A LoRA that names no such folder gets one line naming what to merge into instead."""
    import logging
    import shutil

    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file, save_file

    merged_file = next(export(tmp_path / "a", flux["lora"], "--merge", "--single-file").glob("*.safetensors"))
    merged_dir = export(tmp_path / "b", flux["lora"], "--merge")
    second = tmp_path / "second" / "lora"  # another LoRA of the same base: the first one doubled
    shutil.copytree(flux["lora"], second)
    weights = second / "pytorch_lora_weights.safetensors"
    save_file({k: 2 * v for k, v in load_file(str(weights)).items()}, str(weights))
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        onto_file = export(tmp_path / "c", second, "--merge", "--model", str(merged_file))
    assert f"--merge: {merged_file} holds the transformer alone: its text encoders, VAE and scheduler are taken from " \
           f"{flux['base']}, the model {second} was trained on" in caplog.text
    onto_dir = export(tmp_path / "d", second, "--merge", "--model", str(merged_dir))
    a = FluxTransformer2DModel.from_pretrained(onto_file / "transformer").state_dict()
    b = FluxTransformer2DModel.from_pretrained(onto_dir / "transformer").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (second / "base_model.json").unlink()  # a LoRA that names no model folder: what to merge into instead
    assert_refused(main, ["export", "--lora", str(second), "--merge", "--model", str(merged_file), "--out",
                          str(tmp_path / "e")],
                   f"error: --merge into {merged_file}: it holds an SD3/FLUX transformer alone, and {second} was not "
                   "trained on a diffusers folder with the model's text encoders, VAE and scheduler: merge into the "
                   "model's diffusers folder (--model DIR), or into an `export --merge` folder (made without "
                   "--single-file)", tmp_path / "e", capsys)
    # merge_components: a run's own model_components are kept; a file that is no SD3/FLUX transformer needs none; a
    # LoRA trained on a hub id of an SD3/FLUX pipeline takes it, one of another pipeline gets the line
    from types import SimpleNamespace

    from lowmem_alignprop.lora.lora_merge import merge_components
    from lowmem_alignprop.models import loading

    def lora(base, parts=""):
        return SimpleNamespace(model_components=parts, base_model=base, named="L")
    assert merge_components(lora(str(tmp_path / "x.safetensors"), str(flux["base"])), str(merged_file)) == \
        str(flux["base"])
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(tmp_path / "sd.safetensors"))
    assert merge_components(lora(str(flux["base"])), str(tmp_path / "sd.safetensors")) == ""
    monkeypatch.setattr(loading, "is_flow_hub_id", lambda repo: repo == "org/flux")
    assert merge_components(lora("org/flux"), str(merged_file)) == "org/flux"
    with pytest.raises(UserError, match=f"--merge into {merged_file}: it holds an SD3/FLUX transformer alone, and L "):
        merge_components(lora("org/sd"), str(merged_file))


@pytest.mark.parametrize("family", ["flux", "sd3", "flux-schnell"])
def test_the_card_of_a_transformer_file_run_loads_the_file_with_its_components_and_renders_as_sample(
        family, request, tmp_path, monkeypatch):
    """A run on `--model FILE --set model_components=DIR`: its diffusers export's card said
    `FluxPipeline.from_pretrained("FILE")`, which cannot load. Its code loads the file with from_single_file and the
    folder's config, the pipeline from the folder with that transformer, and renders `sample`'s image of the same
    LoRA, prompt and seed; the peft card loads the same file under the LoRA; the kohya card's lines name the file
    and folder, and FLUX's diffusers code loads them as the diffusers card does (diffusers' kohya reader splits
    single blocks at FLUX.1's width only: test_kohya_flux_loads_in_diffusers_and_reproduces_the_lora).
    flux-schnell: a FLUX.1-schnell file with FLUX.1-dev's folder (what users download): the card's from_single_file
    failed (IndexError: dev's config has a guidance embedding), and with guidance_embeds=False alone it sampled on
    dev's resolution-shifted sigmas where the run used schnell's; now it passes guidance_embeds=False and sets
    schnell's schedule, in the merged single file's card too."""
    from peft import PeftModel
    from safetensors.torch import save_file

    from flowmodels import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    family, schnell = family.split("-")[0], family.endswith("schnell")
    folder = request.getfixturevalue(family)["base"]  # (FLUX: the dev folder)
    pipeline, cls = (name.__name__ for name in _classes(family))
    file = tmp_path / "transformer.safetensors"  # (the folder's architecture, other weights)
    built = build_tiny_flux_pipeline(seed=3, schnell=schnell) if family == "flux" else build_tiny_sd3_pipeline(seed=3)
    save_file({k: v.contiguous() for k, v in built.transformer.state_dict().items()}, str(file))
    run = tmp_path / "run"
    assert main([*FLOW, "--model", str(file), "--set", f"model_components={folder}", "--steps", "1", "--set",
                 "lr=0.5", "--set", "sample_prompts=0", "--output-dir", str(run)]) == 0
    out = export(tmp_path / "diffusers", run / "lora", "--format", "diffusers")
    block = python_block(out)
    schedule = ["pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0, "
                "use_dynamic_shifting=False)  # FLUX.1-schnell's transformer with FLUX.1-dev's folder: as the run "
                "sampled"] if schnell else []
    loaded = len(schedule) + 3  # the line that loads the LoRA
    assert block.splitlines()[:loaded] == [
        f"from diffusers import {'FlowMatchEulerDiscreteScheduler, ' if schnell else ''}{pipeline}, {cls}",
        f"transformer = {cls}.from_single_file(\"{file}\", config=\"{folder}\", subfolder=\"transformer\""
        f"{', guidance_embeds=False' if schnell else ''})  # the transformer file it trained on",
        f"pipe = {pipeline}.from_pretrained(\"{folder}\", transformer=transformer)", *schedule], block
    seed, base_image, lora_image = sampled(tmp_path, monkeypatch, out, "--model", str(file), "--set",
                                           f"model_components={folder}")
    scope = card_renders_as_sample(block, seed, base_image, lora_image)
    if schnell:  # schnell's unshifted sigmas, as the run's; dev's folder's own (resolution-shifted) render otherwise
        assert scope["pipe"].scheduler.timesteps.tolist() == pytest.approx([1000, 750, 500, 250])
        image, unset = card_image("\n".join(x for x in block.splitlines() if x not in schedule), seed)
        assert unset["pipe"].scheduler.timesteps.tolist() != pytest.approx([1000, 750, 500, 250], abs=10)
        assert (image - (lora_image * 255).round()).abs().max() > 1  # (beyond card_renders_as_sample's rounding)
    peft = python_block(export(tmp_path / "peft", run / "lora", "--format", "peft"))
    peft_scope: dict = {}
    exec(peft, peft_scope)
    assert isinstance(peft_scope["transformer"], PeftModel)
    assert_rel_close(transformer_out(peft_scope["transformer"].base_model.model),
                     transformer_out(scope["pipe"].transformer), SAME_OPS, "the peft card's transformer")
    kohya = export(tmp_path / "kohya", run / "lora", "--format", "kohya")
    card = (kohya / "README.md").read_text()
    model = "FLUX.1" if family == "flux" else "SD3 Medium"  # (the tiny SD3: no qk-norm)
    assert f"node after the {model} model it trained on: `{file}` in a *Load Diffusion Model* node, with the text " \
           f"encoders and VAE of `{folder}`." in card, card
    if family == "flux":  # (diffusers' SD3 loader reads no kohya names: its line says to use the diffusers export)
        code = python_block(kohya).splitlines()
        name = next(kohya.glob("*.safetensors")).name
        lines = block.splitlines()
        assert code[:loaded] + code[loaded + 1:] == lines[:loaded] + lines[loaded + 1:], code
        assert code[loaded] == f"pipe.load_lora_weights({json.dumps(str(kohya))}, weight_name=\"{name}\")"
    if schnell:  # the merged single file: schnell's transformer, loaded with dev's folder as the run sampled it
        merged = (export(tmp_path / "merged", run / "lora", "--merge", "--single-file") / "README.md").read_text()
        assert "- diffusers: `FluxTransformer2DModel.from_single_file(\"run_alignprop_merged.safetensors\", " \
               f"config=\"{folder}\", subfolder=\"transformer\", guidance_embeds=False)` (FLUX.1-schnell's " \
               f"transformer with FLUX.1-dev's folder: in `FluxPipeline.from_pretrained(\"{folder}\", " \
               f"transformer=transformer)` set its scheduler as the run's, `{schedule[0].split('  #')[0]}`).\n" \
               in merged, merged


def test_the_card_of_a_flux_dev_file_with_schnells_folder_loads_and_schedules_as_training(flux, tmp_path):
    """The other way round (a FLUX.1-dev file, model_components a schnell folder): the card's code passes
    guidance_embeds=True (schnell's config has none: the file's guidance_in would be left out) and sets dev's
    resolution-shifted schedule, the one training sampled with; its pipeline's scheduler and transformer config are
    the loader's. A file of the folder's own variant gets neither."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from lowmem_alignprop.lora import flow_export
    from lowmem_alignprop.models.loading import load_components

    schnell = build_tiny_flux_dir(tmp_path / "schnell", schnell=True)
    dev_file = tmp_path / "dev.safetensors"
    save_file(FluxTransformer2DModel.from_pretrained(flux["base"] / "transformer").state_dict(), str(dev_file))
    code = flow_export.usage("diffusers", [], str(dev_file), None, "flux", str(schnell))
    assert code[2] == (f"transformer = FluxTransformer2DModel.from_single_file(\"{dev_file}\", config=\"{schnell}\", "
                       "subfolder=\"transformer\", guidance_embeds=True)  # the transformer file it trained on")
    assert code[4] == ("pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, "
                       "shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, "
                       "max_image_seq_len=4096)  # FLUX.1-dev's transformer with FLUX.1-schnell's folder: as the run "
                       "sampled")
    scope: dict = {}
    exec("\n".join(code[1:5]), scope)
    trained = load_components(Config(model=str(dev_file), model_components=str(schnell)))
    assert scope["pipe"].transformer.config.guidance_embeds is True
    assert dict(scope["pipe"].scheduler.config) == dict(trained.scheduler.config)
    assert_rel_close(transformer_out(scope["pipe"].transformer), transformer_out(trained.unet), SAME_OPS, "dev file")
    own = flow_export.usage("diffusers", [], str(dev_file), None, "flux", str(flux["base"]))  # dev file, dev folder
    assert "guidance_embeds" not in "\n".join(own) and not any("pipe.scheduler" in x for x in own)

"""``sample`` for SD3/FLUX under the trainer's memory profile (commands/flow_sample.py, issue 18): the prompt set is
encoded and the text encoders freed before the transformer is read, ``encode_on_cpu`` keeps every text encoder off
the device, ``block_swap``'s blocks stay in host memory and reach the device only while they run, and the images
(base and mixed LoRAs) are those ``sample`` made before, when it called the diffusers pipeline with the prompt
strings and everything loaded at once. The CPU is the "device" here, as in tests/test_block_swap.py: the placement
logic is the same and every move is recorded."""

import gc
import json
import weakref

import pytest
import torch

from flowmodels import FLOW_RESOLUTION, build_tiny_flux_dir, build_tiny_sd3_dir
from loras import clip_lora_parts
from numerics import REORDERED, assert_rel_close

from lowmem_alignprop.cli import main
from lowmem_alignprop.models import flow

RES, STEPS, MSL, BATCH = FLOW_RESOLUTION, 4, 16, 2
FLOW = ["--profile", "cpu", "--seed", "0", "--set", f"resolution={RES}", "--set", f"sample_steps={STEPS}",
        "--set", f"batch_size={BATCH}", "--set", f"max_sequence_length={MSL}", "--reward", "brightness",
        "--num-prompts", "2", "--images-per-prompt", "2"]
MIX = [0.7, -0.4]  # two adapters, one extrapolated: the mix is part of what must not change

pytestmark = pytest.mark.usefixtures("fresh_log_handlers")


def _pipeline_class(name):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    return FluxPipeline if name == "flux" else StableDiffusion3Pipeline


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each tiny model with two LoRAs of it (random non-zero updates on every attention projection); the first
    adapts the CLIP text encoders diffusers' loader reads too (FLUX.1's CLIP-L, SD3's CLIP-L and CLIP-G: rank 2,
    alpha 3), as a kohya or ai-toolkit LoRA trained with its text encoder does."""
    root = tmp_path_factory.mktemp("flowsample")
    out = {}
    for name, build in (("flux", build_tiny_flux_dir), ("sd3", build_tiny_sd3_dir)):
        model = build(root / name)
        loras = []
        for seed in (1, 2):
            pipe = _pipeline_class(name).from_pretrained(model)
            params = flow.add_flow_lora(pipe.transformer, rank=4, seed=seed)
            with torch.no_grad():
                g = torch.Generator().manual_seed(seed)
                for p in params:  # lora_B starts at zero: give every update values so each layer matters
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
            if seed == 1:
                save_with_clip_layers(pipe, root / f"{name}-lora{seed}")
            else:
                flow.save_flow_lora(type(pipe), pipe.transformer, root / f"{name}-lora{seed}")
            loras.append(root / f"{name}-lora{seed}")
        out[name] = (model, loras)
    return out


def save_with_clip_layers(pipe, folder) -> None:
    """The transformer's LoRA written into ``folder`` as flow.save_flow_lora writes it, with CLIP layers beside it
    (loras.clip_lora_parts), each part its own adapter config, as diffusers writes a LoRA trained with its text
    encoders."""
    from peft.utils import get_peft_model_state_dict

    from lowmem_alignprop.models.lora_metadata import lora_metadata

    config = lora_metadata(pipe.transformer.peft_config["default"])
    type(pipe).save_lora_weights(str(folder), transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                 transformer_lora_adapter_metadata=config, **clip_lora_parts(pipe))


def _today(name, model, loras, prompts, seeds, guidance, fp8=False):
    """The diffusers pipeline with everything loaded at once (what ``sample`` did before it freed the encoders before
    the transformer was read), called with the prompt strings (SD3: the empty negative prompt), the adapters (their
    CLIP layers too) loaded and mixed with ``set_adapters`` (no ``loras``: the model's images, and None). ``fp8``:
    then the frozen Linear weights stored in fp8, as the trainer stores them after LoRA (``sample`` ignored
    base_quant=fp8)."""
    from lowmem_alignprop.memory.quant import store_fp8

    pipe = _pipeline_class(name).from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    for i, lora in enumerate(loras):
        pipe.load_lora_weights(str(lora), weight_name="pytorch_lora_weights.safetensors", adapter_name=f"lora{i}")
    if fp8:
        store_fp8(pipe.transformer, torch.float32)

    def images():
        out = []
        for i in range(0, len(prompts), BATCH):
            chunk = prompts[i:i + BATCH]
            gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + BATCH]]
            negative = {"negative_prompt": [""] * len(chunk)} if name == "sd3" else {}
            out.append(pipe(prompt=chunk, num_inference_steps=STEPS, guidance_scale=guidance, height=RES, width=RES,
                            generator=gens, output_type="pt", max_sequence_length=MSL, **negative).images.float())
        return torch.cat(out)

    with torch.no_grad():
        if not loras:
            return images(), None
        pipe.disable_lora()
        base = images()
        pipe.enable_lora()
        pipe.set_adapters([f"lora{i}" for i in range(len(loras))], adapter_weights=MIX)
        return base, images()


def _watch(monkeypatch):
    """Records, during ``sample``: the text encoders the prompt encoder was given (weak references) and how many of
    them were alive when the transformer was read; what the placement brought to the device; the block swap and
    any call of a swapped layer on its host copy; whether the transformer was freed before the reward scored."""
    from lowmem_alignprop.commands import evaluate
    from lowmem_alignprop.memory import block_swap
    from lowmem_alignprop.memory.placement import Placement
    from lowmem_alignprop.models import flow_loading
    from lowmem_alignprop.models.family import FlowFamily

    seen = {"encoders": [], "alive_at_read": [], "to_device": set(), "swap": None, "on_host_copy": [],
            "transformer_alive_at_score": []}
    make_encoder, read, install, to_device, score = (FlowFamily.prompt_encoder, flow_loading.load_by_block,
                                                     block_swap.install, Placement.to_device, evaluate.score)

    def prompt_encoder(self, pipe, comps, *args, **kwargs):
        seen["encoders"].extend(weakref.ref(m) for m in comps.text_encoders())
        return make_encoder(self, pipe, comps, *args, **kwargs)

    def load_by_block(*args, **kwargs):
        gc.collect()
        seen["alive_at_read"].append(sum(r() is not None for r in seen["encoders"]))
        return read(*args, **kwargs)

    def placement_to_device(self, name, *modules):
        seen["to_device"].add(name)
        return to_device(self, name, *modules)

    def install_swap(model, n, device, copy=None):
        swap = seen["swap"] = install(model, n, device, copy)
        seen["transformer"] = weakref.ref(model)
        if swap is not None:
            host = {id(p): h for pairs in swap.host for p, h in pairs}
            for block in swap.blocks:
                for m in block.modules():
                    own = [p for p in m.parameters(recurse=False) if id(p) in host]
                    if own:  # on a GPU such a call would fail; on the CPU it would silently work
                        m.register_forward_pre_hook(lambda mod, args, own=own: seen["on_host_copy"].extend(
                            type(mod).__name__ for p in own if p.data.data_ptr() == host[id(p)].data_ptr()))
        return swap

    def scored(*args, **kwargs):
        gc.collect()
        alive = seen.get("transformer")  # (set when the transformer is placed)
        seen["transformer_alive_at_score"].append(alive is None or alive() is not None)
        return score(*args, **kwargs)

    monkeypatch.setattr(FlowFamily, "prompt_encoder", prompt_encoder)
    monkeypatch.setattr(flow_loading, "load_by_block", load_by_block)
    monkeypatch.setattr(Placement, "to_device", placement_to_device)
    monkeypatch.setattr(block_swap, "install", install_swap)
    monkeypatch.setattr(evaluate, "score", scored)
    return seen


@pytest.mark.parametrize("name, source, extra", [
    ("flux", "folder", {}),
    ("flux", "folder", {"block_swap": 2, "unet_checkpointing": "blocks", "encode_on_cpu": "true",
                        "offload_frozen": "true"}),
    ("flux", "file", {"block_swap": 1, "encode_on_cpu": "true"}),
    ("flux", "folder", {"base_quant": "fp8", "block_swap": 1}),
    ("sd3", "folder", {"block_swap": 1, "unet_checkpointing": "blocks", "encode_on_cpu": "true", "k": 6}),
])  # sample has no backward and no gradient window: block swap and fp8 without per-block checkpointing, and a K
#     beyond sample_steps, which training refuses, are taken
def test_sample_runs_as_the_trainer_loads_and_its_images_are_unchanged(models, tmp_path, monkeypatch, name, source,
                                                                       extra):
    from safetensors.torch import save_file

    from lowmem_alignprop.training import grid

    model, loras = models[name]
    where = ["--model", str(model)]
    if source == "file":  # the folder's transformer as one file, the rest from the folder
        transformer = _pipeline_class(name).from_pretrained(model).transformer
        save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, str(tmp_path / "t.safetensors"))
        where = ["--model", str(tmp_path / "t.safetensors"), "--set", f"model_components={model}"]
    guidance = 3.5 if name == "flux" else 4.0  # FLUX.1-dev's guidance embedding; SD3's CFG (the negative branch)
    seen = _watch(monkeypatch)
    grids, save = [], grid.save_sample_grid
    monkeypatch.setattr(grid, "save_sample_grid", lambda path, labels, base, lora, **kw: (
        grids.append((base[0], lora[0])), save(path, labels, base, lora, **kw))[-1])
    sets = [x for k, v in extra.items() for x in ("--set", f"{k}={v}")]
    out = tmp_path / "sample"
    rc = main(["sample", *FLOW, *sets, *where, "--set", f"guidance_scale={guidance}",
               *[x for lora, w in zip(loras, MIX) for x in ("--lora", f"{lora}:{w}")], "--output-dir", str(out)])
    assert rc == 0
    r = json.loads((out / "sample_results.json").read_text())
    prompts = [p["prompt"] for p in r["per_prompt"] for _ in p["seeds"]]
    seeds = [s for p in r["per_prompt"] for s in p["seeds"]]
    assert len(prompts) == 4 and len(set(prompts)) == 2

    # the images: the same as before (the prompts encoded in one batch of the set here, per pipeline call before)
    base, lora = grids[0]
    fp8 = extra.get("base_quant") == "fp8"
    ref_base, ref_lora = _today(name, model, loras, prompts, seeds, guidance, fp8=fp8)
    assert_rel_close(base, ref_base, REORDERED, "base images")
    assert_rel_close(lora, ref_lora, REORDERED, "mixed-LoRA images")
    if fp8:  # the weights the trainer trained on, rounded to fp8: beyond reordering from the unrounded ones'
        from numerics import relative_difference
        assert relative_difference(base, _today(name, model, loras, prompts, seeds, guidance)[0]) > REORDERED
    assert (lora - base).abs().max() > 0.01  # the adapters change the images: the comparison covers the mix

    # the text encoders (CLIP-L and T5; SD3: CLIP-L, CLIP-G, T5) encoded the set twice (the first LoRA adapts CLIP:
    # by the base encoders, then with its layers) and were freed, then the transformer was read; with encode_on_cpu
    # none ever went to the device; the transformer was freed before the reward scored
    assert len(seen["encoders"]) == 2 * (2 if name == "flux" else 3) and seen["alive_at_read"] == [0]
    assert ("text_encoder" in seen["to_device"]) == ("encode_on_cpu" not in extra)
    assert "vae" in seen["to_device"]
    assert seen["transformer_alive_at_score"] and not any(seen["transformer_alive_at_score"])

    swap = seen["swap"]
    if "block_swap" not in extra:
        assert swap is None
        return
    # block swap: every transformer call brought each swapped block to the device for its turn only, no layer ran
    # on its host copy, and at rest every swapped weight (the adapters' too) is its host copy
    n = extra["block_swap"]
    assert len(swap.blocks) == n and seen["on_host_copy"] == []
    calls = 2 * (len(prompts) // BATCH) * STEPS  # base and LoRA images, batches, Euler steps (SD3: CFG batched)
    loads = [i for i, where, _ in swap.log if where == "device"]
    assert sorted(loads) == sorted(list(range(n)) * calls)
    assert swap.most_resident <= 2 and swap.where == ["cpu"] * n
    assert all(p.data.data_ptr() == h.data_ptr() for pairs in swap.host for p, h in pairs)
    assert any(h.dtype == torch.float8_e4m3fn for pairs in swap.host for _, h in pairs) == fp8  # swapped as stored
    swapped = {id(p) for pairs in swap.host for p, _ in pairs}
    adapters = {pname: id(p) for i, b in enumerate(swap.blocks) for pname, p in b.named_parameters(prefix=str(i))
                if ".lora_" in pname}
    assert adapters and [k for k, v in adapters.items() if v not in swapped] == []  # placed after they loaded


@pytest.mark.parametrize("name, encoder", [("sd3", "text_encoder_3"), ("flux", "text_encoder_2")])
def test_bad_input_lora_that_adapts_t5(models, tmp_path, capsys, name, encoder):
    """No diffusers loader reads a LoRA's T5 layers (SD3's text_encoder_3, FLUX.1's text_encoder_2): loaded, they
    would be dropped without a word. One line (docs/bad_inputs.md); SD3's before any model loads (its key says T5),
    FLUX.1's once the pipeline tells (text_encoder_2 is SD3's CLIP-G); no sample folder."""
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.settings.errors import quote

    model, loras = models[name]
    tensors = load_file(str(loras[1] / "pytorch_lora_weights.safetensors"))
    layer = f"{encoder}.encoder.block.0.layer.0.SelfAttention.q"
    tensors.update({f"{layer}.lora_A.weight": torch.zeros(4, 32), f"{layer}.lora_B.weight": torch.zeros(32, 4)})
    (tmp_path / "t5").mkdir()
    save_file(tensors, str(tmp_path / "t5" / "pytorch_lora_weights.safetensors"))
    out = tmp_path / "sample"
    rc = main(["sample", *FLOW, "--model", str(model), "--lora", str(tmp_path / "t5"), "--output-dir", str(out)])
    err = capsys.readouterr().err
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.startswith("error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0] == (f"error: --lora {tmp_path / 't5'} adapts the T5 text encoder too (e.g. "
                        f"{quote(layer + '.lora_A.weight')}), "
                        "which no LoRA loader of diffusers reads (they would be dropped without a word): pass a LoRA "
                        "without T5 layers (CLIP's and the transformer's apply)"), lines[0]
    assert not out.exists()


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_a_flow_model_alone_is_scored_as_the_diffusers_pipeline_renders_it(models, tmp_path, monkeypatch, name):
    """`sample --model DIR` of an SD3 or FLUX model without a LoRA: one row of images, those the diffusers pipeline
    renders from the same seeds (to REORDERED: the prompts encoded in one batch here, per pipeline call there), each
    scored by the reward of that image; the LoRA's keys null."""
    from lowmem_alignprop.training import grid
    from lowmem_alignprop.rewards import build_reward

    model, _ = models[name]
    guidance = 3.5 if name == "flux" else 4.0
    grids, save = [], grid.save_sample_grid
    monkeypatch.setattr(grid, "save_sample_grid", lambda path, labels, base, lora, **kw: (
        grids.append((base, lora, kw["row_names"])), save(path, labels, base, lora, **kw))[-1])
    out = tmp_path / "sample"
    assert main(["sample", *FLOW, "--model", str(model), "--set", f"guidance_scale={guidance}",
                 "--output-dir", str(out)]) == 0
    r = json.loads((out / "sample_results.json").read_text())
    prompts = [p["prompt"] for p in r["per_prompt"] for _ in p["seeds"]]
    seeds = [s for p in r["per_prompt"] for s in p["seeds"]]
    assert seeds == [0, 1, 2, 3] and r["loras"] == [] and r["sampler"]["scheduler"] == "FlowMatchEulerDiscrete"
    (images, rewards), lora, rows = grids[0]
    assert lora is None and rows == ("model",) and images.shape == (4, 3, RES, RES)
    direct, _ = _today(name, model, [], prompts, seeds, guidance)
    assert_rel_close(images, direct, REORDERED, "the model's images")
    scored = [x for p in r["per_prompt"] for x in p["base"]]
    brightness = build_reward("brightness")
    assert scored == pytest.approx(brightness(images, prompts).tolist(), abs=1e-6)  # the images' own rewards
    # and the direct images': brightness is a mean of the pixels, which moves by at most their rms difference
    assert_rel_close(torch.tensor(scored), brightness(direct, prompts), REORDERED, "their rewards")
    assert all(p["lora"] is None and p["difference"] is None for p in r["per_prompt"]) and r["lora_mean"] is None
    assert r["base_mean"] == pytest.approx(sum(scored) / 4, abs=1e-7)


@pytest.mark.parametrize("decode", [{}, {"sliced_decode": True, "tiled_decode": True}])
def test_sample_pipeline_decodes_as_sliced_and_tiled_decode_ask(models, tiny_dir, decode):
    """sample's pipeline, UNet and FLUX alike (flow_sample.set_decode): the VAE slices and tiles exactly when the
    fields ask, and no progress bar is drawn."""
    from lowmem_alignprop.commands.sample_pipeline import build_pipeline
    from lowmem_alignprop.settings.config import Config

    for model in (str(tiny_dir), str(models["flux"][0])):
        cfg = Config(model=model, resolution=RES, max_sequence_length=MSL, **decode)
        pipe = build_pipeline(cfg, torch.device("cpu"), torch.float32, prompts=["a cat"])
        on = bool(decode)
        assert (pipe.vae.use_slicing, pipe.vae.use_tiling, pipe._progress_bar_config) == (on, on, {"disable": True})

"""SD3 and FLUX.1 in the product (issue 18): ``--model`` loads them (diffusers folders, single-file transformers with
the rest from a folder, the shipped architectures on meta), the trainer runs them end to end (prompt cache, rollout,
decode, reward, LoRA, before/after grid, resume), the exported LoRA loads into the diffusers pipeline and reproduces
the trainer's images, and ``sample`` runs them and refuses a LoRA of the other denoiser family."""

import json
import logging
import re
import shutil

import pytest
import torch

from flowmodels import (FLOW_RESOLUTION, build_tiny_flux_dir, build_tiny_flux_pipeline, build_tiny_sd3_dir,
                        build_tiny_sd3_pipeline)
from numerics import SAME_OPS, assert_rel_close

from lowmem_alignprop.cli import main
from lowmem_alignprop.memory.allowances import fmt_bytes
from lowmem_alignprop.models import flow
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError

RES = FLOW_RESOLUTION
FLOW = ["--profile", "cpu", "--seed", "0", "--set", f"resolution={RES}", "--set", "sample_steps=4", "--set", "k=2",
        "--set", "batch_size=1"]

pytestmark = pytest.mark.usefixtures("fresh_log_handlers")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowdirs")
    return {"flux": build_tiny_flux_dir(root / "flux"), "sd3": build_tiny_sd3_dir(root / "sd3"),
            "schnell": build_tiny_flux_dir(root / "schnell", schnell=True)}


@pytest.fixture(scope="module")
def flux_run(dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("fluxrun") / "run"
    rc = main([*FLOW, "--model", str(dirs["flux"]), "--output-dir", str(out), "--steps", "2", "--set",
               "guidance_scale=3.5", "--set", "sample_prompts=2", "--set", "lr=0.05", "--set", "checkpoint_every=1"])
    assert rc == 0
    return out


def _errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    return [x for x in err.replace("\r", "\n").splitlines() if x.startswith("error: ")]


# -------------------------------------------------------------------------------------------------------------
# training
# -------------------------------------------------------------------------------------------------------------

def test_flux_trains_and_its_lora_reproduces_the_trainers_images(flux_run, dirs):
    """The run's after images (their brightness rewards in before_after.json) are the diffusers pipeline's images
    with the exported LoRA loaded, from the same noise: the LoRA format, its scale and the sampler all agree."""
    from diffusers import FluxPipeline

    rows = [json.loads(x) for x in (flux_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["k"] == 2 for r in rows)
    report = json.loads((flux_run / "memory_report.json").read_text())  # its module table names the transformer
    assert all("transformer" in split and "unet" not in split for split in report["modules"].values()), report["modules"]
    samples = json.loads((flux_run / "samples" / "before_after.json").read_text())
    pipe = FluxPipeline.from_pretrained(dirs["flux"])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(flux_run / "lora")
    prompts = [i["prompt"] for i in samples["images"]]
    lat = torch.cat([flow.initial_latents(pipe.transformer, pipe.vae, 1, RES, RES,
                                          torch.Generator().manual_seed(i["seed"]))[0]  # each image its own seed
                     for i in samples["images"]])
    with torch.no_grad():
        images = pipe(prompt=prompts, latents=lat, num_inference_steps=4, guidance_scale=3.5, height=RES, width=RES,
                      output_type="pt", max_sequence_length=16).images
    from lowmem_alignprop.rewards import build_reward

    ours = torch.tensor([i["reward_after"] for i in samples["images"]])
    theirs = build_reward("brightness")(images.float(), prompts)
    assert_rel_close(theirs, ours, SAME_OPS, "pipeline + exported LoRA vs the trainer's after images")
    before = torch.tensor([i["reward_before"] for i in samples["images"]])
    assert (ours - before).abs().max() > 1e-5  # training changed the images: the comparison is not of the base


def test_flux_run_resumes(flux_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(flux_run, run)
    saved = (run / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    rc = main(["--resume", "latest", "--output-dir", str(run), "--steps", "3"])
    assert rc == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (run / "lora" / "pytorch_lora_weights.safetensors").read_bytes() != saved  # step 3 trained on
    # a resume onto another transformer names it as one (the record of the model it was trained on)
    from lowmem_alignprop.run import base_fingerprint
    fp = json.loads((run / "lora" / "base_model.json").read_text())
    other = dict(fp, conv_in=[v + 1.0 for v in fp["conv_in"]])
    assert base_fingerprint.fingerprint_difference(other, fp) == "its transformer weights differ"


def test_sd3_trains_and_exports_a_lora_its_pipeline_loads(dirs, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    out = tmp_path / "run"
    rc = main([*FLOW, "--model", str(dirs["sd3"]), "--output-dir", str(out), "--steps", "1", "--set",
               "guidance_scale=4.0", "--set", "sample_prompts=0"])
    assert rc == 0
    layers = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert layers and all(k.startswith("transformer.") for k in layers)
    pipe = StableDiffusion3Pipeline.from_pretrained(dirs["sd3"])
    pipe.load_lora_weights(out / "lora")
    adapted = sum(1 for m in pipe.transformer.modules() if "default_0" in getattr(m, "lora_A", {}))
    assert adapted == sum(1 for k in layers if k.endswith("lora_A.weight")) > 0
    trained = load_file(sorted((out / "checkpoints").iterdir())[-1] / "trainable.safetensors")
    for name, value in trained.items():  # the exported weights are the trained ones
        key = "transformer." + name.replace(".default.", ".")
        assert torch.equal(layers[key], value), key


# -------------------------------------------------------------------------------------------------------------
# SD3 resumed with or without T5-XXL
# -------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd3_runs(dirs, tmp_path_factory):
    """Two one-step SD3 runs with t5_encoder at its default (true): one on a folder with T5-XXL, one on the same model
    without it (SD3 may come without T5: its model_index.json lists text_encoder_3 as null)."""
    root = tmp_path_factory.mktemp("sd3t5")
    no_t5 = build_tiny_sd3_dir(root / "sd3_no_t5", with_t5=False)
    runs = {}
    for name, model in (("t5", dirs["sd3"]), ("no_t5", no_t5)):
        runs[name] = root / name
        assert main([*FLOW, "--model", str(model), "--output-dir", str(runs[name]), "--steps", "1", "--set",
                     "sample_prompts=0"]) == 0
    return {"runs": runs, "t5": dirs["sd3"], "no_t5": no_t5}


def _steps(run) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("trained, now", [("t5", "no_t5"), ("no_t5", "t5")])
def test_an_sd3_resume_onto_a_folder_with_or_without_t5_is_refused_unless_asked(sd3_runs, trained, now, tmp_path,
                                                                                capsys):
    """A run trained with T5-XXL, resumed with --model a copy of its folder without T5, was told "the same model" and
    trained on with zeros in T5's place (and the reverse: T5 appeared in the run's prompts); t5_encoder, the setting,
    was unchanged, so no resume change said it. It is refused in one line naming both ways on; --set
    t5_encoder=false, the asked-for change, resumes (as check_config warns and records it)."""
    from lowmem_alignprop.run import checkpoint as ckpt

    run = tmp_path / "run"
    shutil.copytree(sd3_runs["runs"][trained], run)
    point = run / "checkpoints" / "step-00000001"
    assert ckpt.read_state(point)["fingerprint"]["t5"] is (trained == "t5")
    model = sd3_runs[now]
    capsys.readouterr()
    assert main(["--resume", "latest", "--output-dir", str(run), "--steps", "2", "--model", str(model)]) == 2
    errors = _errors(capsys)
    if trained == "t5":
        want = (f"error: checkpoint {point} was trained with SD3's T5-XXL text encoder, and --model {model} has none "
                f"(no text_encoder_3): its prompts would be encoded with zeros in T5's place; resume with --model "
                f"{sd3_runs['t5']} (a folder with text_encoder_3), or --set t5_encoder=false to train on without T5 "
                "(recorded as a change of the run)")
    else:
        want = (f"error: checkpoint {point} was trained without SD3's T5-XXL text encoder (its --model had no "
                f"text_encoder_3), and --model {model} has one: its prompts would be encoded otherwise; resume with "
                f"--model {sd3_runs['no_t5']}, or --set t5_encoder=false to train on without T5 as it did")
    assert errors == [want]
    assert _steps(run) == [1]  # nothing trained
    assert main(["--resume", "latest", "--output-dir", str(run), "--steps", "2", "--model", str(model), "--set",
                 "t5_encoder=false"]) == 0
    assert _steps(run) == [1, 2]
    assert ckpt.read_state(run / "checkpoints" / "step-00000002")["fingerprint"]["t5"] is False


def test_an_sd3_checkpoint_from_before_the_t5_record_resumes_without_a_false_alarm(sd3_runs, tmp_path):
    """A checkpoint written before the fingerprint recorded T5 (no "t5" in it): whether it had T5 is unknown, so a
    resume onto a folder without it goes on (as it did before: nothing to compare)."""
    from lowmem_alignprop.run import checkpoint as ckpt

    run = tmp_path / "run"
    shutil.copytree(sd3_runs["runs"]["t5"], run)
    point = run / "checkpoints" / "step-00000001"
    state = ckpt.read_state(point)
    del state["fingerprint"]["t5"]
    (point / "state.json").write_text(json.dumps(state))
    (point / "manifest.json").unlink()
    ckpt.write_manifest(point)
    assert main(["--resume", "latest", "--output-dir", str(run), "--steps", "2", "--model",
                 str(sd3_runs["no_t5"])]) == 0
    assert _steps(run) == [1, 2]


# -------------------------------------------------------------------------------------------------------------
# loading
# -------------------------------------------------------------------------------------------------------------

def _transformer_file(tmp_path, pipe, name="transformer.safetensors"):
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}, str(path))
    return path


def test_single_file_transformer_with_the_rest_from_a_folder(dirs, tmp_path, caplog):
    """A schnell transformer file with FLUX.1-dev's folder: the file's weights, schnell's config (no guidance
    embedding, told by the file's keys) and schedule (no resolution-dependent shift: it sampled on dev's, said by
    nothing), the folder's text encoders and VAE; a dev file with schnell's folder the reverse. The planner's model
    is the same schnell transformer (not the folder's dev one)."""
    from lowmem_alignprop.measure.meta_models import meta_components
    from lowmem_alignprop.models.loading import load_components

    schnell = build_tiny_flux_pipeline(seed=3, schnell=True)
    path = _transformer_file(tmp_path, schnell)
    cfg = Config(model=str(path), model_components=str(dirs["flux"]))
    assert load_components(Config(model=str(dirs["flux"]))).scheduler.config.use_dynamic_shifting is True
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        comps = load_components(cfg)
    assert comps.family == "flux" and comps.unet.config.guidance_embeds is False
    assert (comps.scheduler.config.use_dynamic_shifting, comps.scheduler.config.shift) == (False, 1.0)
    assert f"{path} is FLUX.1-schnell (its keys have no guidance_in) and model_components=" in caplog.text
    timesteps = flow.set_flow_timesteps(comps.scheduler, comps.unet, 4, 64, 64)
    assert timesteps.tolist() == pytest.approx([1000, 750, 500, 250])  # schnell's sigmas, unshifted
    dev_file = _transformer_file(tmp_path, build_tiny_flux_pipeline(seed=4), "dev.safetensors")
    dev = load_components(Config(model=str(dev_file), model_components=str(dirs["schnell"])))
    assert dev.unet.config.guidance_embeds is True and dev.scheduler.config.use_dynamic_shifting is True
    for (n, a), b in zip(schnell.transformer.state_dict().items(), comps.unet.state_dict().values()):
        assert torch.equal(a, b), n
    assert comps.text_encoder_2 is not None and comps.vae.config.latent_channels == 16
    planned = meta_components(cfg, torch.float32).unet
    assert planned.config.guidance_embeds is False
    assert {n: t.shape for n, t in planned.state_dict().items()} == \
        {n: t.shape for n, t in comps.unet.state_dict().items()}


def test_transformer_layouts_are_told_apart():
    from lowmem_alignprop.models.flow_loading import has_guidance, transformer_layout

    assert transformer_layout(["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]) == \
        ("flux", "original")
    assert transformer_layout(["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]) == ("sd3", "original")
    assert transformer_layout(["x_embedder.weight", "single_transformer_blocks.0.proj_out.weight"]) == \
        ("flux", "diffusers")
    assert transformer_layout(["pos_embed.proj.weight", "transformer_blocks.0.attn.to_q.weight"]) == \
        ("sd3", "diffusers")
    assert has_guidance(["guidance_in.in_layer.weight"]) and not has_guidance(["img_in.weight"])
    with pytest.raises(UserError, match="unknown transformer layout"):
        transformer_layout(["blocks.0.weight"])


def test_an_sd3_file_with_a_folder_without_t5_loads_without_t5(tmp_path):
    """SD3 may come without T5-XXL (a components folder downloaded without its 9.5 GB): a transformer file with such a
    folder failed with diffusers' "expected ... text_encoder_3" (the folder alone loaded); it loads as the folder
    does, without T5."""
    from lowmem_alignprop.models.loading import load_components

    folder = build_tiny_sd3_dir(tmp_path / "sd3", with_t5=False)
    path = _transformer_file(tmp_path, build_tiny_sd3_pipeline())
    comps = load_components(Config(model=str(path), model_components=str(folder)))
    assert comps.family == "sd3" and comps.text_encoder_3 is None and comps.text_encoder_2 is not None


def test_a_single_file_of_no_known_layout_names_the_flow_transformer_files_too(tmp_path):
    """A file of no layout the reader knows, without model_components: the line listed SD 1.x/2.x/XL only, never
    that SD3/FLUX transformer files are read (with their model's folder)."""
    from safetensors.torch import save_file

    from lowmem_alignprop.models.loading import load_components

    path = tmp_path / "unknown.safetensors"
    save_file({"blocks.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(UserError, match=r"is not a Stable Diffusion checkpoint .*Supported: .*; and SD3/SD3.5 or "
                                        r"FLUX.1 transformer files .*: --set model_components=DIR or OWNER/NAME "
                                        r"\(a hub id\)$"):
        load_components(Config(model=str(path)))


@pytest.mark.parametrize("name, size, t5", [("sd35m", 2.47e9, 4.76e9), ("flux", 11.9e9, 4.76e9)])
def test_shipped_flow_architectures_load_on_meta(name, size, t5):
    from lowmem_alignprop.models.loading import load_components

    comps = load_components(Config(model=name), torch.bfloat16)
    assert comps.meta and comps.family == ("flux" if name == "flux" else "sd3")
    for module in (comps.unet, comps.vae, *comps.text_encoders()):
        assert all(t.is_meta for t in list(module.parameters()) + list(module.buffers()))  # nothing allocated
    count = sum(t.numel() for t in list(comps.unet.parameters()) + list(comps.unet.buffers()))
    assert abs(count / size - 1) < 0.03, count
    t5_model = comps.text_encoder_2 if name == "flux" else comps.text_encoder_3
    assert abs(sum(p.numel() for p in t5_model.parameters()) / t5 - 1) < 0.03
    ids = comps.tokenizer(["a photo of a cat"]).input_ids[0]
    assert len(ids) == 7 and max(ids) < comps.text_encoder.config.vocab_size  # CLIP's real vocabulary


def test_materialized_meta_model_is_random_and_runs():
    from diffusers import FluxTransformer2DModel

    from lowmem_alignprop.models.block_loading import materialize

    pipe = build_tiny_flux_pipeline()
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(pipe.transformer.config)
    materialize(model, "cpu")
    tensors = list(model.parameters())
    assert not any(t.is_meta for t in tensors) and all(torch.isfinite(t).all() for t in tensors)
    assert all(t.std() > 0 for t in tensors if t.dim() == 2)
    with torch.device("meta"):  # a text encoder's tied weights stay one tensor
        t5 = type(pipe.text_encoder_2)(pipe.text_encoder_2.config)
    materialize(t5, "cpu")
    assert t5.shared.weight is t5.encoder.embed_tokens.weight and not t5.shared.weight.is_meta


def test_materialized_flux_blocks_at_full_width_pass_a_gradient_on_nearly_unchanged():
    """The random FLUX.1 the GPU check trains (12B, drawn by materialize): each full-width block (3072 wide, 24 heads)
    must pass a gradient back at about its size, or K calls of 57 blocks overflow the gradient norm and every step is
    skipped (the H200 rows did, at 1.1-2.1x a block with the adaptive norms drawn at std 0.02). One double and one
    single block, at a short sequence; the gain is |d<v, block(x)>/dx| / |v| for a random v."""
    from diffusers import FluxTransformer2DModel

    from lowmem_alignprop.models import flow
    from lowmem_alignprop.models.block_loading import materialize
    from lowmem_alignprop.settings.model_kind import ARCH_FLOW_DIR

    config = FluxTransformer2DModel.load_config(ARCH_FLOW_DIR / "flux" / "transformer")
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config({**config, "num_layers": 1, "num_single_layers": 1})
    materialize(model, "cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        temb = model.time_text_embed(torch.tensor([500.0]), torch.tensor([3500.0]), torch.randn(1, 768, generator=g))
        hidden = model.x_embedder(torch.randn(1, 64, 64, generator=g))
        context = model.context_embedder(torch.randn(1, 16, 4096, generator=g))
        rope = model.pos_embed(torch.cat([torch.zeros(16, 3), flow.latent_image_ids(16, 16)]))
    gains = []
    for block in (model.transformer_blocks[0], model.single_transformer_blocks[0]):
        x = [context.clone().requires_grad_(True), hidden.clone().requires_grad_(True)]
        out = block(hidden_states=x[1], encoder_hidden_states=x[0], temb=temb, image_rotary_emb=rope)
        v = [torch.randn(o.shape, generator=g) for o in out]
        grads = torch.autograd.grad(out, x, v)
        gains.append((sum(d.square().sum() for d in grads) / sum(w.square().sum() for w in v)).sqrt().item())
    assert all(0.9 < gain < 1.1 for gain in gains), gains  # 57 blocks: < 1.1**57 = 230x a call, not 8000x


def test_materialized_clip_text_encoder_has_its_positions():
    """to_empty leaves integer buffers as whatever the memory held: CLIP's position_ids are filled with 0..76 again,
    or the H200 check's FLUX and SD3.5 runs fail at the first prompt (index out of range in the position table)."""
    from lowmem_alignprop.models.block_loading import materialize

    pipe = build_tiny_flux_pipeline()
    with torch.device("meta"):
        clip = type(pipe.text_encoder)(pipe.text_encoder.config)
    materialize(clip, "cpu")
    positions = next(b for n, b in clip.named_buffers() if n.endswith("position_ids"))
    assert torch.equal(positions, torch.arange(positions.shape[-1]).expand_as(positions))
    ids = pipe.tokenizer(["a photo of a cat"], padding="max_length", max_length=positions.shape[-1],
                         return_tensors="pt").input_ids
    assert torch.isfinite(clip(ids).last_hidden_state).all()


@pytest.mark.parametrize("source", ["folder", "file"])
def test_the_prompt_set_is_encoded_and_its_encoders_freed_before_the_transformer_is_read(dirs, tmp_path,
                                                                                        monkeypatch, source, caplog):
    """A 16 GB machine holds T5-XXL (9.5 GB) or FLUX's block-swapped blocks (8.9 GiB), not both: the trainer encodes
    every prompt of the run, frees the text encoders, and only then reads the transformer block by block (a pipeline
    folder, and a single file with the rest from a folder). The run then trains as before."""
    import gc
    import weakref

    from lowmem_alignprop.models import flow_loading
    from lowmem_alignprop.models.family import FlowFamily

    encoders, alive_at_read = [], []
    make_encoder, read = FlowFamily.prompt_encoder, flow_loading.load_by_block

    def prompt_encoder(self, pipe, comps, *args, **kwargs):
        encoders.extend(weakref.ref(m) for m in comps.text_encoders())
        return make_encoder(self, pipe, comps, *args, **kwargs)

    def load_by_block(*args, **kwargs):
        gc.collect()
        alive_at_read.append(sum(r() is not None for r in encoders) if encoders else None)
        return read(*args, **kwargs)

    monkeypatch.setattr(FlowFamily, "prompt_encoder", prompt_encoder)
    monkeypatch.setattr(flow_loading, "load_by_block", load_by_block)
    model = ["--model", str(dirs["flux"])]
    if source == "file":
        model = ["--model", str(_transformer_file(tmp_path, build_tiny_flux_pipeline(seed=3))), "--set",
                 f"model_components={dirs['flux']}"]
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    rc = main([*FLOW, *model, "--output-dir", str(out), "--steps", "1", "--set", "guidance_scale=3.5"])
    assert rc == 0 and (out / "lora").is_dir()
    assert len(encoders) == 2 and alive_at_read == [0]  # CLIP-L and T5 made, encoded and freed, then one read
    # what the prompt file costs for the whole run is said (a 2000-line file's cache was told nowhere but in plan)
    said = re.search(r"prompt set encoded once: (\d+) distinct prompts hold (.+) of cpu memory for the run",
                     caplog.text)
    listed = json.loads((out / "prompts.json").read_text())
    sampled = {i["prompt"] for i in json.loads((out / "samples" / "before_after.json").read_text())["images"]}
    assert said and int(said[1]) == len(set(listed["train"]) | sampled), caplog.text
    config = json.loads((dirs["flux"] / "transformer" / "config.json").read_text())  # T5 tokens + CLIP's pooled
    per_prompt = 4 * (16 * config["joint_attention_dim"] + config["pooled_projection_dim"])  # fp32, 16 tokens
    chunks = [min(16, int(said[1]) - i) for i in range(0, int(said[1]), 16)]  # encoded 16 at a time
    assert said[2] == fmt_bytes(sum(chunks) * per_prompt + len(chunks) * 4 * 16 * 3)  # + each chunk's text ids


def test_text_side_first_gives_the_same_random_weights(dirs):
    """An architecture-only model made real in two parts (the text encoders, then the rest after the prompts are
    encoded: the trainer's order) gets exactly the weights of one call."""
    from lowmem_alignprop.models.family import materialize_meta
    from lowmem_alignprop.models.flow_loading import flow_pipeline_from_configs
    from lowmem_alignprop.models.loading import flow_components

    made = []
    for parts in (["all"], ["text", "rest"]):
        pipe = flow_pipeline_from_configs(dirs["flux"], device="meta", dtype=torch.float32)
        comps = flow_components(pipe, Config(model=str(dirs["flux"])), "configs", torch.float32, meta=True)
        for part in parts:
            materialize_meta(comps, "cpu", 7, text_only=part == "text")
            assert comps.meta == (part == "text")
            if part == "text":
                assert all(t.is_meta for t in comps.unet.parameters())
                assert not any(t.is_meta for m in comps.text_encoders() for t in m.parameters())
        made.append({f"{i}.{n}": t for i, m in enumerate((comps.unet, comps.vae, *comps.text_encoders()))
                     for n, t in m.state_dict().items()})
    assert made[0].keys() == made[1].keys()
    for name, t in made[0].items():
        assert torch.equal(t, made[1][name]), name


# -------------------------------------------------------------------------------------------------------------
# sample, and bad input (docs/bad_inputs.md)
# -------------------------------------------------------------------------------------------------------------

def test_sample_runs_a_flux_lora(flux_run, dirs, tmp_path):
    out = tmp_path / "sample"
    rc = main(["sample", *FLOW, "--model", str(dirs["flux"]), "--lora", str(flux_run / "lora"), "--num-prompts", "2",
               "--set", "guidance_scale=3.5", "--output-dir", str(out)])
    assert rc == 0
    r = json.loads((out / "sample_results.json").read_text())
    assert r["sampler"]["scheduler"] == "FlowMatchEulerDiscrete" and "eta" not in r["sampler"]  # Euler: no eta
    samples = json.loads((flux_run / "samples" / "before_after.json").read_text())
    # the first prompt, its own seed: not the grid's noise, but the same model, so rewards are close
    assert abs(r["lora_mean"] - samples["images"][0]["reward_after"]) < 0.05
    # the same LoRA as a peft adapter folder (export --format peft) and as a checkpoint: the same images; the records
    # name what was given, not the converted copy in a temporary folder (gone when the command ends)
    assert main(["export", "--lora", str(flux_run / "lora"), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    checkpoint = sorted((flux_run / "checkpoints").glob("step-*"))[-1]
    for given, model in ((tmp_path / "peft", ["--model", str(dirs["flux"])]), (checkpoint, [])):
        again = tmp_path / given.name  # (no --model: the one the checkpoint's run trained, its base_model.json says)
        assert main(["sample", *FLOW, *model, "--lora", str(given), "--num-prompts", "2",
                     "--set", "guidance_scale=3.5", "--output-dir", str(again)]) == 0
        other = json.loads((again / "sample_results.json").read_text())
        assert other["lora_mean"] == r["lora_mean"] and other["loras"][0]["path"] == str(given.absolute())
    # the run's LoRA with nothing else said: its model, sampled as the run sampled it (resolution, steps, guidance;
    # the cpu profile's own are SD1.5's 64 px, 10 steps, 7.5), what --set says winning
    for sets, steps in (([], 4), (["--set", "sample_steps=3"], 3)):
        again = tmp_path / f"as-run-{steps}"
        assert main(["sample", "--profile", "cpu", "--seed", "0", "--set", "batch_size=1", "--lora",
                     str(flux_run / "lora"), *sets, "--num-prompts", "2", "--output-dir", str(again)]) == 0
        other = json.loads((again / "sample_results.json").read_text())
        assert other["sampler"] == {**r["sampler"], "sample_steps": steps}, other["sampler"]
        assert other["model"] == str(dirs["flux"]) and (other["lora_mean"] == r["lora_mean"]) == (steps == 4)


def _unet_lora(tmp_path, tiny_dir):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from lowmem_alignprop.models.loading import add_lora

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
    add_lora(pipe.unet, 2, None, 0)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "unet_lora"),
                                              unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return tmp_path / "unet_lora"


def test_bad_input_lora_of_the_other_family(flux_run, dirs, tmp_path, tiny_dir, capsys, monkeypatch):
    from lowmem_alignprop.commands import sample_pipeline

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")  # the model's files tell its family: refused before loading

    monkeypatch.setattr(sample_pipeline, "build_pipeline", never)
    rc = main(["sample", *FLOW, "--model", "tiny", "--lora", str(flux_run / "lora"), "--output-dir",
               str(tmp_path / "a")])
    lines = _errors(capsys)
    assert rc == 2 and len(lines) == 1 and "adapts a FLUX.1 transformer, but --model tiny is a UNet" in lines[0], lines
    # a FLUX.1 LoRA given to an SD3 model: the base it records, or without that record its single-stream blocks
    bare = tmp_path / "bare" / "lora"
    shutil.copytree(flux_run / "lora", bare)
    (bare / "base_model.json").unlink()
    for given in (flux_run / "lora", bare):
        rc = main(["sample", *FLOW, "--model", str(dirs["sd3"]), "--lora", str(given), "--output-dir",
                   str(tmp_path / "a")])
        err = capsys.readouterr().err
        assert rc == 2 and err == (f"error: --lora {given} adapts a FLUX.1 transformer, but --model {dirs['sd3']} is "
                                   "an SD3/SD3.5 transformer: pass the model it was trained on with --model\n"), err
    rc = main(["sample", *FLOW, "--model", str(dirs["flux"]), "--lora", str(_unet_lora(tmp_path, tiny_dir)),
               "--output-dir", str(tmp_path / "b")])
    lines = _errors(capsys)
    assert rc == 2 and len(lines) == 1 and "adapts a UNet model" in lines[0], lines
    # an architecture's name (random weights): the refusal is all it says (no note on the weights or the prompts
    # before it), as the files of a folder tell it
    rc = main(["sample", *FLOW, "--model", "flux", "--lora", str(_unet_lora(tmp_path, tiny_dir)), "--output-dir",
               str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "adapts a UNet model" in err, err
    # mixed with a UNet LoRA: no --model fits both, so none is named; nothing said of the runs' settings before it
    unet_lora = _unet_lora(tmp_path, tiny_dir)
    adapts = {unet_lora: "a UNet model (SD 1.x/2.x/SDXL)", flux_run / "lora": "a FLUX.1 transformer"}
    for first, second in ((flux_run / "lora", unet_lora), (unet_lora, flux_run / "lora")):
        rc = main(["sample", *FLOW, str(first), str(second), "--output-dir", str(tmp_path / "b")])
        err = capsys.readouterr().err
        assert rc == 2 and err.splitlines() == [
            f"error: --lora {first} adapts {adapts[first]} and --lora {second} {adapts[second]}: LoRAs of different "
            "models cannot be mixed; sample them one at a time"], err
    moved = tmp_path / "moved" / "lora"  # trained on a folder that is gone: sample without --model says so
    shutil.copytree(flux_run / "lora", moved)
    (moved / "base_model.json").write_text(json.dumps({"model": str(tmp_path / "gone")}))
    rc = main(["sample", *FLOW, "--lora", str(moved), "--output-dir", str(tmp_path / "c")])
    assert rc == 2 and _errors(capsys) == [f"error: --lora {moved} was trained on {tmp_path / 'gone'} "
                                           "(base_model.json), which is not there any more: pass the base model "
                                           "with --model"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_bad_input_single_files(dirs, tmp_path, capsys):
    from safetensors.torch import save_file

    odd = tmp_path / "odd.safetensors"
    save_file({"blocks.0.weight": torch.zeros(2, 2)}, str(odd))
    rc = main([*FLOW, "--model", str(odd), "--set", f"model_components={dirs['flux']}", "--output-dir",
               str(tmp_path / "a")])
    lines = _errors(capsys)
    assert rc == 2 and len(lines) == 1 and "unknown transformer layout" in lines[0], lines
    path = _transformer_file(tmp_path, build_tiny_flux_pipeline())
    rc = main([*FLOW, "--model", str(path), "--output-dir", str(tmp_path / "b")])
    lines = _errors(capsys)
    assert rc == 2 and len(lines) == 1 and "model_components" in lines[0], lines
    rc = main([*FLOW, "--model", str(path), "--set", f"model_components={dirs['sd3']}", "--output-dir",
               str(tmp_path / "c")])
    lines = _errors(capsys)
    assert rc == 2 and lines == [f"error: {path} is a FLUX transformer but model_components={dirs['sd3']} is an SD3 "
                                 "pipeline: pass the folder (or hub id) of the model the transformer belongs to"], lines


def test_bad_input_a_cut_short_or_foreign_transformer(dirs, tmp_path, capsys):
    """A model folder's transformer file cut short (a download that stopped partway) and a diffusers-layout
    transformer file of another model than its model_components (one single block more; diffusers' single-file
    reader takes the original layouts only): one line each, before the run writes anything."""
    cut = tmp_path / "cut"
    shutil.copytree(dirs["flux"], cut)
    weights = cut / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    rc = main([*FLOW, "--model", str(cut), "--output-dir", str(tmp_path / "a")])
    lines = _errors(capsys)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {weights} cannot be read (") and \
        lines[0].endswith("): it is damaged or incomplete (a download that stopped partway?): download the model's "
                          "transformer/ again"), lines  # (the reader's own words between the brackets)
    path = _transformer_file(tmp_path, build_tiny_flux_pipeline(single_layers=2))
    rc = main([*FLOW, "--model", str(path), "--set", f"model_components={dirs['flux']}", "--output-dir",
               str(tmp_path / "b")])
    lines = _errors(capsys)
    # its blocks are counted first (in the original layout diffusers' converter met them with a tensor split error)
    assert rc == 2 and len(lines) == 1 and lines[0] == (
        f"error: {path} has 1 double and 2 single blocks, and model_components={dirs['flux']}'s transformer config 1 "
        "and 1: pass the model folder this transformer belongs to"), lines
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_original_layouts_blocks_are_counted_against_the_config():
    """BFL's and Stability's names (double_blocks / single_blocks, joint_blocks; a prefix allowed), as diffusers'
    and ComfyUI's FLUX.1 and SD3.5 files are: another count than the folder's config is one line."""
    from lowmem_alignprop.models.flow_loading import check_block_counts

    flux = [f"model.diffusion_model.double_blocks.{n}.img_attn.qkv.weight" for n in range(19)] + \
        [f"model.diffusion_model.single_blocks.{n}.linear1.weight" for n in range(38)]
    check_block_counts(flux, {"num_layers": 19, "num_single_layers": 38}, "flux", "f has", "c's")  # FLUX.1: fits
    with pytest.raises(UserError, match=r"^f has 19 double and 38 single blocks, and c's transformer config 19 and "
                                        r"20: pass the model folder this transformer belongs to$"):
        check_block_counts(flux, {"num_layers": 19, "num_single_layers": 20}, "flux", "f has", "c's")
    sd3 = [f"joint_blocks.{n}.x_block.attn.qkv.weight" for n in range(24)]
    check_block_counts(sd3, {"num_layers": 24}, "sd3", "f has", "c's")  # SD3.5 Medium
    with pytest.raises(UserError, match=r"^f has 24 joint and 0 single blocks, and c's transformer config 38 and 0"):
        check_block_counts(sd3, {"num_layers": 38}, "sd3", "f has", "c's")  # a Medium file with Large's folder


def test_bad_input_model_components_and_a_missing_t5(dirs, tmp_path, capsys):
    """`plan` of a transformer file alone says what train says (name model_components); model_components that does
    not exist, or beside a whole model (a folder, which has its own parts), and a FLUX folder (or model_components)
    whose T5 was not downloaded: one line each, naming the fix, nothing written."""
    path = _transformer_file(tmp_path, build_tiny_flux_pipeline())
    no_t5 = tmp_path / "no_t5"
    shutil.copytree(dirs["flux"], no_t5, ignore=shutil.ignore_patterns("text_encoder_2"))
    cases = [(["plan", "--profile", "cpu", "--model", str(path)],
              f"error: {path} holds only a FLUX transformer: name the model's diffusers folder with the text "
              "encoders, VAE and scheduler: --set model_components=DIR or OWNER/NAME (a hub id)"),
             ([*FLOW, "--model", str(path), "--set", f"model_components={tmp_path / 'gone'}"],
              f"error: model_components={tmp_path / 'gone'} does not exist: name the model's diffusers folder, or "
              "its hub id (OWNER/NAME)"),
             ([*FLOW, "--model", str(dirs["flux"]), "--set", f"model_components={dirs['sd3']}"],
              f"error: model_components={dirs['sd3']} names the folder with the other parts of a single transformer "
              f"file, and --model {dirs['flux']} is a whole model with its own: drop model_components (a resumed "
              "run's, of its transformer file: --set model_components=)"),
             ([*FLOW, "--model", str(no_t5)],
              f"error: {no_t5} is incomplete: its model_index.json lists text_encoder_2 but the text_encoder_2/ "
              "folder is missing; copy the whole model folder (every subfolder)"),
             ([*FLOW, "--model", str(path), "--set", f"model_components={no_t5}"],
              f"error: model_components={no_t5} is incomplete: its model_index.json lists text_encoder_2 but the "
              "text_encoder_2/ folder is missing; copy the whole model folder (every subfolder)")]
    for args, line in cases:
        assert main([*args, "--output-dir", str(tmp_path / "out")]) == 2
        assert _errors(capsys) == [line]
        assert not (tmp_path / "out").exists()


def test_bad_input_k_beyond_schnells_steps(dirs, tmp_path, capsys):
    rc = main([*FLOW, "--model", str(dirs["schnell"]), "--set", "k=6", "--output-dir", str(tmp_path / "a")])
    lines = _errors(capsys)
    assert rc == 2 and len(lines) == 1 and "k=6 is larger than sample_steps=4" in lines[0], lines
    assert not (tmp_path / "a").exists()


def test_bad_input_a_resolution_the_flow_model_cannot_make(dirs, tmp_path, capsys):
    """A token of SD3/FLUX covers the VAE's scale x 2 pixels a side (16 for the real models, 4 for the tiny ones:
    their VAE halves) and SD3's position embeddings reach pos_embed_max_size tokens (SD3.5 Large: 3072 px; the tiny
    SD3: 16 tokens, 64 px). Off either: one line before anything loads where the files tell (the shipped configs, a
    folder, a transformer file's model_components), and from the loaded model where they do not (a hub id)."""
    from lowmem_alignprop.models.family import check_supported
    from lowmem_alignprop.models.loading import load_components

    for model, resolution, line in (
            ("sd35m", 1000, "resolution=1000 is not a multiple of 16: a token of this SD3/SD3.5 model's transformer "
                            "covers 16x16 pixels: use --set resolution=992 or 1008"),
            ("flux", 1080, "resolution=1080 is not a multiple of 16: a token of this FLUX.1 model's transformer "
                           "covers 16x16 pixels: use --set resolution=1072 or 1088"),
            ("sd35l", 3088, "resolution=3088 is larger than this SD3/SD3.5 model's position embeddings reach (3072 "
                            "px a side): use --set resolution=3072 or less")):
        with pytest.raises(UserError) as e:
            Config(model=model, resolution=resolution).validate()
        assert str(e.value) == line
    for model, resolution in (("sd35l", 3072), ("sd35m", 4096), ("flux", 4096), ("sd35m", 1008)):
        Config(model=model, resolution=resolution).validate()  # SD3.5 Medium's embeddings reach 6144 px
    rc = main([*FLOW, "--model", str(dirs["sd3"]), "--set", "resolution=72", "--output-dir", str(tmp_path / "a")])
    lines = _errors(capsys)
    assert rc == 2 and lines == ["error: resolution=72 is larger than this SD3/SD3.5 model's position embeddings "
                                 "reach (64 px a side): use --set resolution=64 or less"], lines
    assert not (tmp_path / "a").exists()
    path = _transformer_file(tmp_path, build_tiny_sd3_pipeline())
    with pytest.raises(UserError, match=r"resolution=72 .* \(64 px a side\)"):
        Config(model=str(path), model_components=str(dirs["sd3"]), resolution=72, k=1).validate()
    Config(model=str(path), model_components=str(dirs["sd3"]), resolution=64, k=1).validate()
    comps = load_components(Config(model=str(dirs["sd3"]), resolution=RES))  # as a hub id's model, once loaded
    check_supported(comps, Config(model=str(dirs["sd3"]), resolution=64))
    with pytest.raises(UserError, match=r"\(64 px a side\)"):
        check_supported(comps, Config(model=str(dirs["sd3"]), resolution=72))


# -------------------------------------------------------------------------------------------------------------
# the planner (as tests/test_planner.py does for UNets)
# -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, extra", [("flux", {}), ("sd3", {"block_swap": 2, "unet_checkpointing": "blocks"})])
def test_planner_estimates_the_flow_step_within_5_percent_per_stage(dirs, name, extra):
    """The fake-tensor estimate against the real CPU step (torch.profiler memory events) of the tiny models: the
    prompt cache with T5, the Euler window, the 16-channel decode; block swap's in-flight copies."""
    from lowmem_alignprop.measure import planner, shared_step
    from lowmem_alignprop.memory import stages

    cfg = Config(model=str(dirs[name]), resolution=RES, sample_steps=4, k=2, batch_size=2, prompts="simple_animals",
                 guidance_scale=3.5 if name == "flux" else 4.0, **extra).validate()
    est = planner.estimate(cfg, target="cpu")
    meas = shared_step.measure_cpu_step(cfg)
    assert set(meas["stages"]) == set(stages.STEP_STAGES)
    for stage in stages.STEP_STAGES:
        e, m = est.stages[stage]["allocated"], meas["stages"][stage]
        assert abs(e - m) <= 0.05 * m, f"{stage}: estimate {e / 2**20:.3f} MiB vs measured {m / 2**20:.3f} MiB"
    assert est.peak_stage == meas["peak_stage"]
    assert est.model_kind == {"flux": "flux", "sd3": "sd35m"}[name]  # what the profiles are made for


def test_a_flux_plan_under_an_sd_profile_points_to_the_cards_flux_profiles(dirs, monkeypatch):
    """`plan --profile rtx3060 --model FLUX`: the SD1.5 profile's features are not FLUX's (its search for a change
    takes minutes on the 12B model); the plan names the shipped FLUX profiles for that card, on stderr before any
    search and in the table; under a FLUX profile it says nothing."""
    from lowmem_alignprop.measure import planner
    from lowmem_alignprop.measure.reports import format_plan

    # budget: over CUDA's workspaces (0.156 GiB, below which plan refuses at once), under this run's 0.160
    cfg = Config(model=str(dirs["flux"]), resolution=RES, sample_steps=4, k=2, guidance_scale=3.5, budget_gb=0.157)
    said = []
    with planner.reuse_estimates():  # the three plans below estimate one configuration: once
        r = planner.plan(cfg.validate(), profile="rtx3060", target="cuda", suggest_changes=False, log=said.append)
        note = r["profile_note"]
        assert note.startswith("profile rtx3060 is made for SD 1.x/2.x, not FLUX.1; for FLUX.1 on rtx3060-class "
                               "cards: --profile rtx3060-flux (7.5 GiB budget) or --profile rtx3060-12gb-flux"), note
        assert f"  {note}" in format_plan(r).splitlines() and said == []  # no search: nothing said before the table
        # the stage table names the denoiser a transformer, as the run's memory report does (it said "unet")
        table = [line for line in format_plan(r).splitlines() if line.startswith("  sample_grad ")]
        assert len(table) == 1 and "transformer" in table[0] and "unet" not in table[0], table
        said, before_search = [], []
        monkeypatch.setattr(planner, "suggest",
                            lambda *a, **k: before_search.extend(said) or {"found": None, "tried": []})
        planner.plan(cfg.validate(), profile="rtx3060", target="cuda", log=said.append)
        assert before_search == [note]  # said before the search for a change began
        assert planner.plan(cfg.validate(), profile="rtx3060-flux", target="cuda",
                            suggest_changes=False)["profile_note"] is None


def test_block_swap_lowers_the_gpu_estimate_of_the_resident_weights(dirs):
    from lowmem_alignprop.measure import planner

    base = dict(model=str(dirs["flux"]), resolution=RES, sample_steps=4, k=2, guidance_scale=3.5,
                unet_checkpointing="blocks", mixed_precision="bf16")
    plain = planner.estimate(Config(**base).validate(), target="cuda")
    swapped = planner.estimate(Config(**base, block_swap=2).validate(), target="cuda")
    assert swapped.weights["unet"] < plain.weights["unet"]  # the swapped blocks wait in host memory
    assert swapped.stages["load"]["allocated"] < plain.stages["load"]["allocated"]
    assert any("block_swap=2" in n for n in swapped.notes)


def test_the_planner_counts_the_prompt_set_encoded_at_load(dirs):
    """SD3/FLUX encode their prompt set while loading, before the transformer is read, and free the text encoders
    (the trainer's order): on a GPU target no step stage counts them, whether they encoded on the device or on the
    CPU (only where the cache lives differs); the load stage's peak is them alone when they encode on the device
    (offload_frozen: the tiny transformer is smaller than the text encoders)."""
    from lowmem_alignprop.measure import planner
    from lowmem_alignprop.memory import stages

    base = dict(model=str(dirs["sd3"]), resolution=RES, sample_steps=4, k=2, guidance_scale=4.0,
                mixed_precision="bf16", offload_frozen=True)
    on_gpu = planner.estimate(Config(**base, encode_on_cpu=False).validate(), target="cuda")
    on_cpu = planner.estimate(Config(**base, encode_on_cpu=True).validate(), target="cuda")
    # the step holds no text encoder, only the prompt cache: on the device, or in host memory with encode_on_cpu
    cache = {on_gpu.stages[n]["allocated"] - on_cpu.stages[n]["allocated"] for n in stages.STEP_STAGES}
    assert len(cache) == 1 and cache.pop() > 0
    assert not any("text_encoder" in on_gpu.stages[n]["on_device"] for n in stages.STEP_STAGES)
    text, after = on_gpu.weights["text_encoder"], on_cpu.stages["load"]
    assert after["on_device"] == ["unet", "lora"] and text > after["allocated"]
    assert on_gpu.stages["load"]["on_device"] == ["text_encoder"] and on_gpu.stages["load"]["allocated"] > text


def test_encoding_on_the_cpu_is_a_candidate_change_for_flow_models_only(dirs, tiny_dir):
    """Where T5 encodes on the card (its load-stage peak), plan's candidates include encode_on_cpu; not once it is
    set, not for a CPU target, not for a UNet model."""
    from lowmem_alignprop.measure import fit_changes

    change = {"encode_on_cpu": True}
    flow = Config(model=str(dirs["sd3"]), resolution=RES, mixed_precision="bf16").validate()
    assert change in [c for _, c in fit_changes.candidate_changes(flow, "cuda")]
    assert change not in [c for _, c in fit_changes.candidate_changes(flow, "cpu")]
    on_cpu = Config(model=str(dirs["sd3"]), resolution=RES, mixed_precision="bf16", encode_on_cpu=True).validate()
    assert not any("encode_on_cpu" in c for _, c in fit_changes.candidate_changes(on_cpu, "cuda"))
    unet = Config(model=str(tiny_dir), mixed_precision="fp16").validate()
    assert not any("encode_on_cpu" in c for _, c in fit_changes.candidate_changes(unet, "cuda"))


def test_the_planner_tells_the_host_memory_of_a_gpu_run(dirs):
    """plan's host memory (GPU target): T5 and block swap's pinned blocks are never counted together (the prompts are
    encoded and the encoders freed before the transformer is read); block swap adds its pinned blocks to the steps;
    with encode_on_cpu the prompt cache moves from the card to host memory, the same bytes."""
    from lowmem_alignprop.measure import planner
    from lowmem_alignprop.memory import stages

    base = dict(model=str(dirs["flux"]), resolution=RES, sample_steps=4, k=1, guidance_scale=3.5,
                mixed_precision="bf16", unet_checkpointing="blocks")
    plain = planner.estimate(Config(**base).validate(), target="cuda")
    swapped = planner.estimate(Config(**base, block_swap=2).validate(), target="cuda")
    on_cpu = planner.estimate(Config(**base, block_swap=2, encode_on_cpu=True).validate(), target="cuda")
    pinned, text = swapped.host_pinned, swapped.weights["text_encoder"]
    assert pinned > 0 and text > 0
    assert swapped.host["steps"] - plain.host["steps"] == pinned
    rest = swapped.weights["vae"] + swapped.weights["reward"]
    assert max(text, pinned) <= swapped.host["load"] < text + pinned + rest  # never both in host memory
    moved = {swapped.stages[n]["allocated"] - on_cpu.stages[n]["allocated"] for n in stages.STEP_STAGES}
    host = on_cpu.host["steps"] - swapped.host["steps"]  # exact bytes; the card's are rounded up to 512 B blocks
    assert len(moved) == 1 and 0 < host <= moved.pop() < host + 512 * 16  # the cache's few storages
    assert planner.estimate(Config(**base).validate(), target="cpu").host == {}  # a CPU run: all of it is host


def test_the_planner_counts_the_text_encoders_as_a_load_holds_them(dirs):
    """T5's input embedding is one tensor shared by two modules (shared, encoder.embed_tokens): a real load holds it
    once, and so does the estimate (the planner's fake storage keeps the tie; to_empty gave each its own: FLUX.1's
    T5-XXL was counted 0.25 GiB over)."""
    from diffusers import FluxPipeline

    from lowmem_alignprop.measure import planner

    pipe = FluxPipeline.from_pretrained(str(dirs["flux"]), torch_dtype=torch.float32)
    t5 = pipe.text_encoder_2
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # tied in the loaded model
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for m in (pipe.text_encoder, t5)
                for t in list(m.parameters()) + list(m.buffers())}
    cfg = Config(model=str(dirs["flux"]), resolution=RES, sample_steps=2, k=1, guidance_scale=3.5,
                 mixed_precision="no").validate()
    est = planner.estimate(cfg, target="cpu")
    assert est.weights["text_encoder"] == sum(storages.values())
    assert sum(storages.values()) < sum(t.numel() * 4 for m in (pipe.text_encoder, t5)  # the tie is worth counting
                                        for t in m.state_dict().values())


def test_the_card_of_an_sd3_lora_trained_on_a_folder_without_t5_says_so(sd3_runs, tmp_path):
    """A run on an SD3 folder without T5-XXL (t5_encoder still true) trained on prompts without T5; its card's usage
    loaded the full pipeline with T5 and said nothing, so the LoRA rendered otherwise than it trained. It says what
    t5_encoder=false's card says. The run with T5 has no such line."""
    said = "# trained without T5: load the pipeline with text_encoder_3=None, tokenizer_3=None"
    for name, without in (("no_t5", True), ("t5", False)):
        out = tmp_path / name
        assert main(["export", str(sd3_runs["runs"][name] / "lora"), "--out", str(out)]) == 0
        assert (said in (out / "README.md").read_text().splitlines()) == without, name

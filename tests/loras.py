"""Shared by the LoRA tests: :func:`nudge` (a fresh adapter that changes the output); for the export tests
(test_lora_export, test_flow_export) a LoRA saved as a run saves it, with the reference outputs of the base model and
of base + LoRA, the fixture that runs a test on each model family, and the ``export`` command run into a fresh
folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from numerics import REORDERED, relative_difference

RANK, ALPHA = 4, 8.0  # alpha != rank: a wrong scale fold fails every comparison of an export with the reference


def nudge(params, seed: int = 1) -> None:
    """lora_B starts at zero: give every LoRA weight a random offset (0.05 sigma, torch's global seed ``seed``), so the
    LoRA path, and the gradients and KL terms through it, matter."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))


def tiny_unet_with_lora(tiny_dir):
    """The tiny SD model's components with a nudged rank-4 LoRA on its UNet, the VAE frozen, and random prompt
    embeddings for two prompts: ``.comps``, ``.params``, ``.emb``."""
    from types import SimpleNamespace

    from lowmem_alignprop.models.loading import add_lora, load_components
    from lowmem_alignprop.models.sampling import PromptEmbeds
    from lowmem_alignprop.settings.config import Config

    comps = load_components(Config(model=str(tiny_dir)))
    params = add_lora(comps.unet, rank=4, alpha=4, seed=0)
    nudge(params)
    comps.vae.requires_grad_(False)
    return SimpleNamespace(comps=comps, params=params, emb=PromptEmbeds(torch.randn(2, 16, 32), torch.randn(2, 16, 32)))


def adapted_modules(model: torch.nn.Module) -> list[str]:
    """The names of the modules that carry the (default) LoRA adapter, sorted."""
    return sorted(n for n, m in model.named_modules() if "default" in getattr(m, "lora_A", {}))


def lora_with_reference(base: Path, run: Path, model: torch.nn.Module, outputs: Callable, add_lora: Callable,
                        save: Callable, seed: int = 0) -> dict:
    """Adds a LoRA to ``model`` (loaded from ``base``) with random B weights, saves it into ``run/lora`` as a run
    does (``save(model, folder)``, then base_model.json), and returns the run's paths with ``outputs(model)`` of the
    base (``base_out``) and of base + LoRA (``ref``, peft in memory: the reference) and the adapted ``modules``.
    Each file adds its run's config.yaml and summary.json."""
    from lowmem_alignprop.run import atomic, base_fingerprint

    base_out = outputs(model)
    add_lora(model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: give the LoRA an effect
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ref = outputs(model)
    with atomic.replacing_dir(run / "lora") as tmp:  # as the trainer writes it (the safetensors header in order)
        save(model, tmp)
    fp = base_fingerprint.fingerprint(type("C", (), {"model": str(base)}), model)
    (run / "lora" / "base_model.json").write_text(json.dumps(fp))
    assert relative_difference(ref, base_out) > 100 * REORDERED, "the LoRA must change the outputs well above the " \
                                                                 "tolerances, else the tests prove nothing"
    return {"base": base, "run": run, "lora": run / "lora", "ref": ref, "base_out": base_out,
            "modules": adapted_modules(model)}


def each_of(*fixture_names: str):
    """A fixture that is, in turn, each of the named fixtures (one test per model family)."""
    @pytest.fixture(params=fixture_names)
    def case(request):
        return request.getfixturevalue(request.param)
    return case


def export(tmp_path: Path, lora, *extra: str) -> Path:
    """``lowmem-alignprop export --lora LORA --out tmp_path/out EXTRA...``, which must succeed; returns the folder."""
    from lowmem_alignprop.cli import main

    out = tmp_path / "out"
    assert main(["export", "--lora", str(lora), "--out", str(out), *extra]) == 0
    return out


def unet_inputs(xl: bool) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(123)
    sample = torch.randn(2, 4, 16, 16, generator=g)  # small latents: the LoRA layers are all used, the CPU time is not
    t = torch.tensor([20, 700])
    ehs = torch.randn(2, 16, 80 if xl else 32, generator=g)
    kw = {}
    if xl:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 48, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return (sample, t, ehs), kw


@torch.no_grad()
def unet_out(unet, xl: bool) -> torch.Tensor:
    args, kw = unet_inputs(xl)
    return unet(*args, **kw).sample


def make_sd_lora(base: Path, run: Path, xl: bool, seed: int = 0, layers: str = "attention") -> dict:
    """A LoRA (of ``layers``: lora_layers) saved as a run saves it, its run folder (config.yaml, summary.json, the
    grid), and the UNet outputs of the base model and of base + LoRA (peft, in memory: the reference).
    test_lora_export's, and the LoRA other tests export and load."""
    from diffusers import (
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from PIL import Image

    from lowmem_alignprop.cli import common_parser, config_from_args
    from lowmem_alignprop.models.loading import add_lora, lora_state_dict
    from lowmem_alignprop.models.lora_metadata import lora_metadata

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    made = lora_with_reference(base, run, unet, lambda m: unet_out(m, xl), seed=seed,
                               add_lora=lambda m: add_lora(m, RANK, ALPHA, seed, layers),
                               save=lambda m, folder: cls.save_lora_weights(
                                   str(folder), unet_lora_layers=lora_state_dict(m),
                                   unet_lora_adapter_metadata=lora_metadata(m.peft_config["default"])))
    args = common_parser("t", "t").parse_args(["--profile", "cpu", "--model", str(base), "--steps", "3",
                                               "--reward", "colorfulness", "--output-dir", str(run),
                                               "--set", f"lora_alpha={ALPHA}", "--set", "truncation=uniform",
                                               "--set", "k_max=2", "--set", "sample_steps=3",
                                               "--set", f"lora_layers={layers}"])
    name, cfg = config_from_args(args)
    (run / "config.yaml").write_text(yaml.safe_dump({"profile": name, **cfg.to_dict()}, sort_keys=False))
    from lowmem_alignprop.run.base_fingerprint import base_record

    record = run / "lora" / "base_model.json"  # with the run's image settings, as the trainer writes it
    record.write_text(base_record(json.loads(record.read_text()), cfg.to_dict()))
    (run / "summary.json").write_text(json.dumps({"steps": 3, "steps_done": 3, "interrupted": False,
                                                  "reward_first": 0.4321, "reward_last": 0.5678,
                                                  "sample_reward_before": 0.41, "sample_reward_after": 0.59}))
    (run / "samples").mkdir()
    Image.new("RGB", (8, 8), "white").save(run / "samples" / "before_after.png")
    return {**made, "xl": xl, "cls": cls, "layers": layers}


def save_peft_dora(unet, folder: Path, seed: int = 3) -> None:
    """A peft DoRA adapter (use_dora, rank 4, alpha 8, on to_q/to_k) injected into ``unet`` with random B and trained
    magnitudes (not the base weight's norms), saved as a peft adapter folder ``folder``; ``unet`` keeps it (the
    reference)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k"], use_dora=True)
    inject_adapter_in_model(config, unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_magnitude_vector" in n:  # trained magnitudes: not the base weight's norms
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    config.save_pretrained(str(folder))
    save_file({f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(unet).items()},
              str(folder / "adapter_model.safetensors"))


def python_block(out: Path) -> str:
    """The card's python code, loading the export from where it lies."""
    card = (out / "README.md").read_text()
    return card.split("```python\n", 1)[1].split("```", 1)[0].replace('"THIS_FOLDER"', json.dumps(str(out)))


def sampled(tmp_path: Path, monkeypatch, lora: Path, *model: str) -> tuple[int, torch.Tensor, torch.Tensor]:
    """`sample LORA` of one prompt ("a red car"): (its seed, the base image, the LoRA image), floats in [0, 1]."""
    from lowmem_alignprop.cli import main
    from lowmem_alignprop.commands import evaluate

    rendered, real = [], evaluate.generate
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: rendered.append(real(*a, **k)) or rendered[-1])
    (tmp_path / "prompts.txt").write_text("a red car\n")
    out = tmp_path / "sampled"
    assert main(["sample", "--lora", str(lora), *model, "--prompts", str(tmp_path / "prompts.txt"), "--num-prompts",
                 "1", "--output-dir", str(out)]) == 0
    [[seed]] = [p["seeds"] for p in json.loads((out / "sample_results.json").read_text())["per_prompt"]]
    base, with_lora = rendered
    return seed, base[0], with_lora[0]


def card_image(block: str, seed: int) -> tuple[torch.Tensor, dict]:
    """Runs a card's code as written, the prompt ("a red car") and a CPU generator of ``seed`` put in its call: (its
    image, [3, H, W] in 0..255, the code's scope)."""
    import numpy as np

    scope: dict = {"torch": torch}
    exec(block.replace('"a prompt"', f'"a red car", generator=torch.Generator().manual_seed({seed})'), scope)
    return torch.from_numpy(np.array(scope["image"])).permute(2, 0, 1).float(), scope


def card_renders_as_sample(block: str, seed: int, base: torch.Tensor, with_lora: torch.Tensor) -> dict:
    """Checks that the card's code renders `sample`'s LoRA image (:func:`card_image`, :func:`sampled`): the same fp32
    ops on the same noise, so the 8-bit pixels agree to rounding (1 level: a value a few ulps either side of a
    rounding boundary), while the base image is further off (the LoRA shows). Returns the code's scope."""
    image, scope = card_image(block, seed)
    assert (image - (with_lora * 255).round()).abs().max() <= 1
    assert (image - (base * 255).round()).abs().max() > 4
    return scope


def hub_metadata(out: Path) -> dict:
    """An export's README.md front matter as the hub reads it (huggingface_hub's metadata_load, then its
    ModelCardData), after checking that every relative link or image in the card names a file in the folder (what
    the uploaded folder holds: the hub page shows no broken image)."""
    import re

    from huggingface_hub import ModelCard, metadata_load

    text = (out / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"""src=["']([^"']+)""", text)
    relative = [link for link in links if not re.match(r"[a-z][a-z0-9+.-]*:|#|/", link)]
    assert all((out / link).is_file() for link in relative), [link for link in relative if not (out / link).is_file()]
    meta = metadata_load(out / "README.md")
    card = ModelCard.load(out / "README.md")  # (raises on a front matter the hub rejects)
    for url in [w["output"]["url"] for w in meta.get("widget") or []]:
        assert (out / url).is_file(), url  # the widget's example image is uploaded with the card
    assert card.data.to_dict() == meta
    return meta


def cpu_cfg(out, *extra):
    """The cpu profile's config of a short run into ``out`` (3 sampler steps, K = 1, 2 sample prompts), ``extra``
    command-line words after it: the --init-lora tests' run."""
    from lowmem_alignprop.cli import common_parser, config_from_args

    args = common_parser("t", "t").parse_args(["--profile", "cpu", "--output-dir", str(out), "--set", "sample_steps=3",
                                               "--set", "k=1", "--set", "sample_prompts=2", *extra])
    return config_from_args(args)[1]


def trainer_at_step_0(cfg, prompts: list[str]):
    """A trainer set up to its first step as train sets it up (--init-lora's LoRA checked before the model loads):
    its ``generate`` renders the fixed-seed images of the grid's "before"."""
    from lowmem_alignprop.lora.init_lora import check_init_lora
    from lowmem_alignprop.measure.resident_tensors import run_objects_only
    from lowmem_alignprop.training.train import Trainer
    from lowmem_alignprop.run.runfolder import RunFolder

    trainer = Trainer(cfg, RunFolder(cfg.output_dir), prompts)
    trainer.init_file = (check_init_lora(cfg.init_lora, cfg.lora_rank, cfg.model, cfg.model_components,
                                         cfg.lora_layers, cfg.base_quant) if cfg.init_lora else None)
    trainer.setup_accelerator()
    with run_objects_only():  # as a run loads: the load's memory measurement walks the run's objects, not the suite's
        trainer.load_models()
    trainer.setup_sampling()
    return trainer


def rendered(comps, pipe, cfg, prompts: list[str], seed: int) -> torch.Tensor:
    """The images a UNet pipeline's components render for ``prompts`` as the trainer samples them (encode, DDIM
    rollout of cfg.sample_steps with no gradient, decode), noise from ``seed``: a reference for step-0 images."""
    from lowmem_alignprop.models.sampling import decode, encode_prompts, initial_latents, rollout

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = encode_prompts(pipe, prompts, "cpu", (cfg.height, cfg.width))
        comps.scheduler.set_timesteps(cfg.sample_steps)
        lat = initial_latents(len(prompts), comps.unet, comps.vae, (cfg.height, cfg.width), g, "cpu")
        lat = rollout(comps.unet, comps.scheduler, lat, emb, k=0, guidance_scale=cfg.guidance_scale, eta=cfg.eta,
                      generator=g)
        return decode(comps.vae, lat)


def assert_samples_and_merges_on_its_base(lora: Path, tmp_path: Path, caplog) -> None:
    """`sample` and `export --merge` of ``lora`` (a run's lora/) on the model it was trained on, as recorded: exit 0
    and no word of another model (a record that names the model otherwise warns in sample, refuses the merge)."""
    import logging

    from lowmem_alignprop.cli import main

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main(["sample", "--lora", str(lora), "--prompt", "a cat", "--set", "sample_steps=2",
                     "--out", str(tmp_path / "grid.png")]) == 0
        assert main(["export", "--lora", str(lora), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert "another model" not in caplog.text and "differs" not in caplog.text, caplog.text


CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def clip_lora_parts(pipe, seed: int = 7) -> dict:
    """``save_lora_weights``' keyword arguments for random rank-2 layers (alpha 3: scale 1.5) on the attention and
    first MLP linears of each CLIP encoder diffusers' loader of ``pipe`` reads (FLUX.1's CLIP-L, SD3's CLIP-L and
    CLIP-G), each encoder its own adapter config, as diffusers writes a LoRA trained with its text encoders. The
    layers are injected into ``pipe``'s encoders (peft's, to draw and read them)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from lowmem_alignprop.models.lora_metadata import lora_metadata

    config, parts = LoraConfig(r=2, lora_alpha=3.0, target_modules=CLIP_TARGETS), {}
    g = torch.Generator().manual_seed(seed)
    for encoder in ("text_encoder",) + (("text_encoder_2",) if type(pipe).__name__ != "FluxPipeline" else ()):
        model = inject_adapter_in_model(config, getattr(pipe, encoder))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        parts[f"{encoder}_lora_layers"] = get_peft_model_state_dict(model)
        parts[f"{encoder}_lora_adapter_metadata"] = lora_metadata(config)
    return parts


def warnings_of(call) -> list:
    """The Python warnings ``call()`` (which must return True) raises, every one (simplefilter "always"). The CLI
    sends warnings to its log (settings/quiet.py: logging.captureWarnings, once per process), which would hide them
    from the record: that is set first, and catch_warnings(record=True) puts the record in its place."""
    import warnings

    from lowmem_alignprop.settings.quiet import quiet_libraries

    quiet_libraries()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert call()
    return caught


def lora_layer(name: str, down: int, up: int, fill: float | None = None, kohya: bool = True,
               alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """One rank-2 LoRA layer's tensors under ``name``: kohya's lora_down / lora_up and ``alpha``, or (``kohya``
    False) peft's lora_A / lora_B with no alpha; random from a seed of the name's length, the up weight ``fill``
    everywhere where given (0.0: a layer that changes nothing). The reader-drop tests' files are made of them."""
    g = torch.Generator().manual_seed(len(name))
    d, u = (".lora_down.weight", ".lora_up.weight") if kohya else (".lora_A.weight", ".lora_B.weight")
    out = {name + d: torch.randn(2, down, generator=g),
           name + u: torch.randn(up, 2, generator=g) if fill is None else torch.full((up, 2), fill)}
    return out | ({f"{name}.alpha": torch.tensor(alpha)} if kohya else {})

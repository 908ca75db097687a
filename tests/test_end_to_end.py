"""A run on the tiny model (random weights, brightness): the reward rises, and every promised output is written."""

import json

import pytest
import torch
import yaml

from lowmem_alignprop.cli import main
from refusals import strict_rows

# one worker runs this file: its module fixture (the 8-step run (12 s)) is then made once, not once per worker
pytestmark = pytest.mark.xdist_group("end_to_end")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("e2e") / "run"
    rc = main(["--profile", "cpu", "--output-dir", str(out), "--steps", "8", "--seed", "0",
               "--set", "lr=0.01", "--set", "sample_prompts=3"])
    assert rc == 0
    return out


def test_reward_rises_by_a_clear_margin(run_dir):
    """Brightness on the tiny model, 8 steps at lr 0.01 (the toy world's run is the proof that means something:
    test_toy_world). Measured at seeds 0 and 1: the last 3 steps' mean over the first 3 steps' +0.058 and +0.078,
    the fixed-seed samples +0.035 and +0.038; held at +0.02 and +0.01."""
    rows = strict_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        assert {"step", "reward_mean", "reward_std", "loss", "k", "seconds"} <= set(r)
        assert r["k"] == 2
    first = sum(r["reward_mean"] for r in rows[:3]) / 3
    last = sum(r["reward_mean"] for r in rows[-3:]) / 3
    assert last - first > 0.02, (first, last)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sample_reward_after"] > summary["sample_reward_before"] + 0.01
    images = json.loads((run_dir / "samples" / "before_after.json").read_text())["images"]
    assert len(images) == 3 and all(p["prompt"] for p in images)
    mean = sum(i["reward_after"] for i in images) / 3
    assert mean == pytest.approx(summary["sample_reward_after"], rel=1e-5)  # the grid's rewards, in full


def test_outputs_written(run_dir):
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["profile"] == "cpu" and cfg["resolution"] == 64 and cfg["lr"] == 0.01
    from PIL import Image
    grid = Image.open(run_dir / "samples" / "before_after.png")
    assert grid.width > 3 * 150 and grid.height > 300
    report = json.loads((run_dir / "memory_report.json").read_text())
    # (its contents in detail: test_profiler.py) every stage of the step measured, the peak in one of them
    assert set(report["stages"]) >= {"encode_prompts", "sample_nograd", "sample_grad", "decode", "reward", "backward",
                                     "optimizer"}
    assert report["peak_stage"] in report["stages"] and report["device"]["type"] == "cpu"
    for name in ("memory_report.md", "memory_report.png", "lora/pytorch_lora_weights.safetensors"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["budget_gb"] == 8.0 and summary["fits_budget"] is True and summary["trained"] == "lora"
    assert summary["cuda_allocator"] == "cpu"  # expandable segments are a CUDA allocator setting
    # a CPU run hands freed tensors back to the system (memory/host_allocator.py; test_host_allocator.py)
    from lowmem_alignprop.memory.host_allocator import glibc
    assert summary["host_allocator"].startswith("glibc malloc, mmap threshold fixed at 1024 KiB" if glibc() else "the ")
    assert summary["host_allocator"] in (run_dir / "memory_report.md").read_text()


def test_a_run_over_its_budget_says_so_at_the_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--output-dir", str(out), "--steps", "1", "--set", "sample_prompts=0",
                 "--set", "sample_steps=2", "--set", "k=1", "--set", "budget_gb=0.01"]) == 0
    printed = capsys.readouterr()
    assert "OVER the 0.01 GiB budget: see memory_report.md" in printed.out
    # output that is not a terminal (a log file) gets the step lines, not the progress bar's redrawn frames
    assert "step 1: reward" in printed.out and "AlignProp:" not in printed.err and "it/s" not in printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fits_budget"] is False and summary["peak_memory_gb"] > 0.01


def test_lora_loads_in_diffusers_and_reproduces_the_trained_model(run_dir, tiny_dir):
    """pipe.load_lora_weights(dir) on the base model gives the trained model's images, and differs from the base."""
    from diffusers import StableDiffusionPipeline

    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.models.loading import add_lora, load_components
    from safetensors.torch import load_file

    def images(pipe):
        g = torch.Generator().manual_seed(7)
        return pipe("cat", num_inference_steps=4, height=64, width=64, generator=g, output_type="pt").images

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    base = images(pipe)
    pipe.load_lora_weights(str(run_dir / "lora"))
    with_lora = images(pipe)
    assert (with_lora - base).abs().max() > 1e-3

    # the same LoRA, put back into our own peft-wrapped UNet by hand, gives the same images
    comps = load_components(Config(model=str(tiny_dir)))
    add_lora(comps.unet, rank=4, alpha=None, seed=0)
    sd = load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")
    from peft import set_peft_model_state_dict
    from diffusers.utils import convert_unet_state_dict_to_peft
    sd = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in sd.items()})
    result = set_peft_model_state_dict(comps.unet, sd)
    assert not getattr(result, "unexpected_keys", [])
    ours = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                   unet=comps.unet, scheduler=pipe.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    ours.set_progress_bar_config(disable=True)
    assert torch.allclose(images(ours), with_lora, atol=1e-5)


def test_the_end_of_run_line_names_the_cuda_allocator_mode(tmp_path, capsys):
    """On a card the summary says what the allocator ran with (it changes the reserved peak); on a CPU nothing."""
    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.training.run_summary import print_summary

    s = {"reward_first": 0.5, "reward_last": 0.6, "device": "cuda:0", "seconds_per_step": 3.1,
         "peak_memory_gb": 3.59, "budget_gb": 7.5, "fits_budget": True, "attention": "sdpa",
         "output_dir": str(tmp_path), "cuda_allocator": "expandable segments"}
    print_summary(s, Config(), "rtx3060")
    assert "peak memory 3.590 GiB (budget 7.5 GiB: fits), attention sdpa, allocator: expandable segments" in \
        capsys.readouterr().out
    print_summary(dict(s, device="cpu", cuda_allocator="cpu"), Config(), "cpu")
    assert "allocator" not in capsys.readouterr().out


def test_the_end_of_run_box_names_best_and_the_exports(tmp_path, capsys):
    """The box's `wrote:` lines name best/ when it holds the best step's LoRA, and export_format's folders; then where
    push_to_hub uploaded, or that it failed (it was one error line in the log, the box silent)."""
    from lowmem_alignprop.lora.lora_export import Exported
    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.training.run_summary import print_summary

    s = {"reward_first": 0.5, "reward_last": 0.6, "device": "cpu", "seconds_per_step": 3.1, "peak_memory_gb": 1.0,
         "attention": "sdpa", "output_dir": str(tmp_path), "best_step": 4, "best_eval_reward": 0.7}
    folders = {"kohya": tmp_path / "export" / "kohya", "peft": None, "diffusers": tmp_path.parent / "elsewhere"}
    print_summary(s, Config(), "cpu", Exported(folders, repo="you/lora", url="https://huggingface.co/you/lora"))
    out = capsys.readouterr().out
    assert " wrote: " in out and "best/, metrics.jsonl" in out, out
    assert (f"        export/kohya/, export --format peft FAILED (its line above), {tmp_path.parent / 'elsewhere'}/\n"
            " pushed to https://huggingface.co/you/lora\n" in out), out
    failed = Exported(folders, repo="you/lora", push_failed="the upload failed: its line above")
    assert failed.record()["pushed_to_hub"] == {"repo": "you/lora", "url": None,
                                                "failed": "the upload failed: its line above"}
    print_summary(s, Config(report_to="tensorboard"), "cpu", failed)
    assert (f"        logs/ (tensorboard --logdir {tmp_path}/logs)\n push to you/lora FAILED (the upload failed: its "
            "line above; summary.json's pushed_to_hub)\n") in capsys.readouterr().out
    print_summary(dict(s, best_kept=False), Config(), "cpu")
    out = capsys.readouterr().out
    assert "best/," not in out and "export/" not in out, out

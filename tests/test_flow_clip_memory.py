"""An SD3/FLUX ``--init-lora`` with CLIP layers (tests/test_init_lora_kept_flow.py's: the tiny FLUX's double-block
attention trained, its two modulation linears and CLIP-L's 10 layers kept) under the memory features a user of the
8/12 GB FLUX profiles runs with, on the CPU: ``offload_frozen``, ``block_swap`` (with per-block checkpointing),
``encode_on_cpu``, ``base_quant=fp8``, with ``kl_coeff``, ``--eval-every``, ``--resume`` and ``sample`` of the run's
LoRA. Each must encode the prompts with the kept CLIP layers and render what the plain cpu-profile run renders
(the same ops: bit for bit; fp8's rounding within its own tolerance). base_quant=int8/nf4 need bitsandbytes' CUDA
kernels (one line on a CPU machine), and refuse kept transformer linears (tests/test_init_lora_kept_flow.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from numerics import relative_difference
from test_init_lora_kept_flow import ATTENTION, FLOW, KEPT, PROMPTS, _lora_case, _step0

from lowmem_alignprop.cli import main

pytestmark = pytest.mark.usefixtures("fresh_log_handlers")

SWAP = ["--set", "block_swap=1", "--set", "unet_checkpointing=blocks"]
MEMORY = {"offload_frozen": ["--set", "offload_frozen=true"], "block_swap": SWAP,
          "encode_on_cpu": ["--set", "encode_on_cpu=true"],
          "fp8": ["--set", "base_quant=fp8", "--set", "unet_checkpointing=blocks"]}
ALL = [*SWAP, "--set", "encode_on_cpu=true", "--set", "offload_frozen=true"]  # (FLUX 8 GB's, less int8)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The LoRA (attention trained; 2 modulation linears and 10 CLIP-L layers kept) and its twin whose trained
    layers' B are 0 (it starts where the reference model is, but for the kept layers)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    case = _lora_case(tmp_path_factory.mktemp("clip-memory"), ATTENTION[:8], KEPT[:2], single_layers=0, clip=True)
    file = str(case["file"])
    kept = tuple(f"transformer.{p}." for p in KEPT[:2])
    zero = {k: torch.zeros_like(v) if k.startswith("transformer.") and ".lora_B." in k and not k.startswith(kept)
            else v for k, v in load_file(file).items()}
    case["zero"] = case["root"] / "zero.safetensors"
    save_file(zero, str(case["zero"]), metadata=safe_open(file, "pt").metadata())
    return case


@pytest.fixture(scope="module")
def plain(case, tmp_path_factory):
    """The plain cpu profile's step 0 from the LoRA: (CLIP-L's pooled embeddings of PROMPTS, the images)."""
    root = tmp_path_factory.mktemp("clip-memory-plain")
    trainer, images = _step0(case["base"], root / "run", "--set", f"init_lora={case['file']}")
    pooled = trainer.embed(PROMPTS).pooled
    base, _ = _step0(case["base"], root / "base")
    assert relative_difference(pooled, base.embed(PROMPTS).pooled) > 0.01  # (the CLIP layers change the prompts)
    return pooled, images


@pytest.mark.parametrize("feature", list(MEMORY))
def test_step_0_under_a_memory_feature_encodes_with_the_kept_clip_layers(case, plain, feature, tmp_path):
    """The prompt set is encoded with CLIP-L's layers whichever feature is on (the embeddings of the plain run, bit
    for bit), and the step-0 images are the plain run's: bit for bit where the same ops run (on the CPU, offload and
    block swap move nothing), within fp8's rounding (measured 0.005) for base_quant=fp8."""
    trainer, images = _step0(case["base"], tmp_path / "run", "--set", f"init_lora={case['file']}", *MEMORY[feature])
    assert torch.equal(trainer.embed(PROMPTS).pooled, plain[0])
    assert trainer.init_kept.kept_line("f") == ("--init-lora f: 8 layers train from it; 12 layers kept as they came "
                                                "(10 text-encoder layers, 2 other transformer linears), fused into "
                                                "the frozen base")
    if feature == "fp8":
        assert 0 < relative_difference(images, plain[1]) < 0.02
    else:
        assert torch.equal(images, plain[1])


def _train(case, out, *extra, init=None) -> None:
    assert main([*FLOW, "--model", str(case["base"]), "--set", "sample_prompts=0", "--init-lora",
                 str(init or case["file"]), "--output-dir", str(out), *extra]) == 0


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_kl_reference_sees_the_kept_clip_layers_and_eval_matches_the_plain_run(case, tmp_path):
    """kl_coeff's reference model is the base with the kept layers, CLIP-L's included (the same cached embeddings,
    the trained adapter off): from a LoRA whose trained layers are 0 the KL of step 1 is 0.0 exactly (the reference
    encoded without CLIP's layers would differ), under every memory feature of the 8 GB profile but int8 as in the
    plain run; --eval-every 1's rewards are the plain run's, bit for bit."""
    args = ["--steps", "1", "--set", "lr=1e-30", "--set", "kl_coeff=0.1", "--eval-every", "1"]
    _train(case, tmp_path / "plain", *args, init=case["zero"])
    _train(case, tmp_path / "memory", *args, *ALL, init=case["zero"])
    [plain], [memory] = _metrics(tmp_path / "plain"), _metrics(tmp_path / "memory")
    assert plain["kl"] == 0.0 and memory["kl"] == 0.0
    assert memory["eval_reward"] == plain["eval_reward"] and memory["rewards"] == plain["rewards"]
    assert (tmp_path / "memory" / "best" / "pytorch_lora_weights.safetensors").is_file()
    _train(case, tmp_path / "trained", *args, *ALL)  # (the LoRA's own trained layers: the KL starts above 0)
    assert _metrics(tmp_path / "trained")[0]["kl"] > 1e-4


@pytest.fixture(scope="module")
def runs(case, tmp_path_factory):
    """A plain 2-step run (lr 1e-3: the LoRA moves) and one cut after step 1 under the 8 GB profile's memory
    features, its --init-lora file deleted, resumed with --resume latest (the run's init_lora/ copy)."""
    root = tmp_path_factory.mktemp("clip-memory-runs")
    args = ["--set", "lr=1e-3", "--checkpoint-every", "1"]
    _train(case, root / "whole", "--steps", "2", *args)
    moved = shutil.copy(case["file"], root / "gone.safetensors")
    _train(case, root / "cut", "--steps", "1", *args, *ALL, init=moved)
    (root / "gone.safetensors").unlink()
    shutil.copy(root / "cut" / "lora" / "pytorch_lora_weights.safetensors", root / "after-one.safetensors")
    assert main(["--output-dir", str(root / "cut"), "--steps", "2", "--resume", "latest"]) == 0
    return root


def test_a_resume_under_the_memory_features_ends_as_the_plain_uninterrupted_run(runs):
    """The resumed run (its CLIP layers loaded again from init_lora/ before the prompts are encoded) writes the
    plain uninterrupted run's LoRA, bit for bit, CLIP-L's layers included."""
    from safetensors.torch import load_file

    whole = load_file(str(runs / "whole" / "lora" / "pytorch_lora_weights.safetensors"))
    cut = load_file(str(runs / "cut" / "lora" / "pytorch_lora_weights.safetensors"))
    assert len(whole) == 2 * (8 + 2 + 10) and whole.keys() == cut.keys()
    assert [k for k in whole if not torch.equal(whole[k], cut[k])] == []
    step1 = load_file(str(runs / "after-one.safetensors"))
    b = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
    assert not torch.equal(whole[b], step1[b])  # (step 2 moved the trained layers: it saw the kept CLIP's prompts)


def test_sample_of_the_runs_lora_under_block_swap_and_encode_on_cpu(case, runs, tmp_path, monkeypatch):
    """sample of the run's lora/ with block_swap=1 and encode_on_cpu renders the plain sample's base and LoRA images
    bit for bit (its CLIP layers applied to the LoRA images' prompts), and so does sample --lora RUN of the run
    trained under them (its own settings)."""
    from loras import sampled

    model = ["--model", str(case["base"]), *FLOW]
    drawn = {}
    for name, lora, extra in (("plain", runs / "whole" / "lora", []),
                              ("memory", runs / "whole" / "lora", ["--set", "block_swap=1", "--set",
                                                                   "encode_on_cpu=true"]),
                              ("run", runs / "cut", [])):
        (tmp_path / name).mkdir()
        drawn[name] = sampled(tmp_path / name, monkeypatch, lora, *(model if name != "run" else ()), *extra)
    seed, base, image = drawn["plain"]
    assert relative_difference(image, base) > 0.01
    for name in ("memory", "run"):
        assert drawn[name][0] == seed
        assert torch.equal(drawn[name][1], base) and torch.equal(drawn[name][2], image), name

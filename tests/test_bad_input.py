"""The bad-input table of docs/bad_inputs.md: each row gets one clear line, exit code 2, and nothing is
written (a new run) or changed (an existing run). Rows already covered in test_cli.py, test_faults.py and
test_evaluate.py are not repeated here; the table names their tests."""

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_alignprop.run import checkpoint as ckpt
from lowmem_alignprop.run import resume_rules
from lowmem_alignprop.run import base_fingerprint
from lowmem_alignprop.run.filenames import LORA_BASE_FILE
from lowmem_alignprop.cli import main
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError

FAST = ["--profile", "cpu", "--seed", "2", "--set", "sample_prompts=0", "--set", "sample_steps=3", "--set", "k=1",
        "--set", "batch_size=1"]


pytestmark = pytest.mark.usefixtures("fresh_log_handlers")


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its checksum: 'nothing lost or half-written' is an equality of these."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def fails(capsys, args, needle) -> str:
    rc = main(args)
    err = capsys.readouterr().err
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.startswith("error: ")]
    assert rc == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir):
    """A finished 2-step run (checkpoint at step 2, LoRA exported)."""
    out = tmp_path_factory.mktemp("bad") / "run"
    assert main([*FAST, "--output-dir", str(out), "--steps", "2"]) == 0
    return out


# -- before anything loads: nothing may be written ---------------------------------------------------

def _profile(tmp_path, text):
    p = tmp_path / "mine.yaml"
    p.write_text(text)
    return ["--profile", str(p)]


@pytest.mark.parametrize("case, needle", [
    ("yaml_malformed", "is not valid YAML at line"),
    ("yaml_unknown_key", "mine.yaml: unknown config key 'bach_size' (did you mean batch_size?)"),
    ("yaml_wrong_type", "batch_size must be a whole number, got 'two'"),
    ("yaml_alias_bomb", "uses YAML aliases (*name) that expand to more than 10000 values"),
    ("yaml_bare_no", 'mixed_precision must be text, got False (YAML reads a bare no'),
    ("yaml_huge_wrong_value", "batch_size must be a whole number, got [['xxx"),
    ("set_choice_in_capitals", "truncation='UNIFORM' is not one of fixed, uniform, per_step: use --set truncation=uniform"),
    ("set_wrong_type", "lr must be a number, got 'fast'"),
    ("impossible_combination", "activation_offload moves checkpointed tensors"),
    ("negative_checkpoint_every", "checkpoint_every must be 0 or more"),
    ("ema_outputs_without_ema", "ema_outputs=false chooses the trained weights over an EMA's average, and ema_decay "
                                "is 0 (no average kept): add --set ema_decay=0.99, or leave ema_outputs out"),
    ("malloc_threshold_out_of_range", "cpu_malloc_threshold_kib=64 is outside glibc's range: use --set "
                                      "cpu_malloc_threshold_kib=1024"),
    ("prompts_not_utf8", "p.txt is not UTF-8 text: line 1, column 7 (byte 6 of the file) holds 0xE9 (in "
                         "Windows-1252: '\xe9'); save it as UTF-8 (Notepad: Save as, Encoding UTF-8)"),
    ("prompts_of_nul_bytes", "line 2 holds the control character '\\x00': it is not a text file of prompts"),
    ("prompts_missing", "does not exist"),
    ("prompts_as_yaml", "p.yaml is a YAML file by its name: a prompt file is plain text, one prompt per line"),
    ("prompts_as_python", "gen.py is a Python file by its name"),
    ("prompt_set_near_miss", "unknown prompt set 'Toy_Pairs' (did you mean toy-pairs?)"),
    ("reward_not_importable", "no_such_module_xyz"),
    ("output_dir_is_a_file", "is a file: choose a directory"),
    ("output_dir_under_a_file", "cannot be created"),
    ("resume_without_checkpoint", "no intact checkpoint"),
    ("resume_missing_dir", "no such checkpoint directory"),
    ("memory_snapshot_after_the_last_step", "--memory-snapshot 5: the run ends at step 2: give steps within 1-2"),
])
def test_rejected_before_loading_writes_nothing(case, needle, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*FAST, "--output-dir", str(out)]
    if case == "yaml_malformed":
        args += _profile(tmp_path, "resolution: 64\nbatch_size: [1, 2\n")
    elif case == "yaml_unknown_key":
        args += _profile(tmp_path, "bach_size: 2\n")
    elif case == "yaml_wrong_type":
        args += _profile(tmp_path, "batch_size: two\n")
    elif case == "yaml_alias_bomb":  # 9^9 strings from 9 lines: expanded, a message quoting it takes gigabytes
        lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
        lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 8)]
        args += _profile(tmp_path, "\n".join(lines) + "\nbatch_size: [" + ", ".join(["*l7"] * 9) + "]\n")
    elif case == "yaml_bare_no":
        args += _profile(tmp_path, "mixed_precision: no\n")
    elif case == "yaml_huge_wrong_value":  # 4^5 strings of 1000 characters: the message quotes a bounded part
        levels = ['&a0 ["' + "x" * 1000 + '"]'] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 4)}]" for i in range(1, 6)]
        args += _profile(tmp_path, f"batch_size: [{', '.join(levels)}]\n")
    elif case == "set_choice_in_capitals":
        args += ["--set", "truncation=UNIFORM"]
    elif case == "set_wrong_type":
        args += ["--set", "lr=fast"]
    elif case == "impossible_combination":
        args += ["--set", "activation_offload=true", "--set", "vae_checkpointing=none"]
    elif case == "ema_outputs_without_ema":  # taken in silence, as no other partner-less setting is
        args += ["--set", "ema_outputs=false"]
    elif case == "negative_checkpoint_every":
        args += ["--checkpoint-every", "-1"]
    elif case == "malloc_threshold_out_of_range":
        args += ["--set", "cpu_malloc_threshold_kib=64"]
    elif case == "prompts_not_utf8":
        bad = tmp_path / "p.txt"
        bad.write_bytes("un caf\xe9 noir\n".encode("latin-1"))  # (UTF-16 with its byte-order mark is read: Windows')
        args += ["--prompts", str(bad)]
    elif case == "prompts_of_nul_bytes":  # valid UTF-8, no text: it trained on a prompt of NULs in silence
        bad = tmp_path / "p.txt"
        bad.write_bytes(b"a cat\n\x00\x00\x00\n")
        args += ["--prompts", str(bad)]
    elif case == "prompts_missing":
        args += ["--prompts", str(tmp_path / "nope.txt")]
    elif case == "prompts_as_yaml":  # it trained on the one prompt 'prompts: [a cat, a dog]' in silence
        (tmp_path / "p.yaml").write_text("prompts: [a cat, a dog]\n")
        args += ["--prompts", str(tmp_path / "p.yaml")]
    elif case == "prompt_set_near_miss":
        args += ["--prompts", "Toy_Pairs"]
    elif case == "prompts_as_python":  # a prompt generator (none is supported): its source lines were the prompts
        (tmp_path / "gen.py").write_text("def prompts():\n    return ['a cat']\n")
        args += ["--prompts", str(tmp_path / "gen.py")]
    elif case == "reward_not_importable":
        args += ["--reward", "no_such_module_xyz:score"]
    elif case == "output_dir_is_a_file":
        out.write_text("precious")
    elif case == "output_dir_under_a_file":
        (tmp_path / "afile").write_text("precious")
        out = tmp_path / "afile" / "run"
        args += ["--output-dir", str(out)]
    elif case == "resume_without_checkpoint":
        args += ["--resume", "latest"]
    elif case == "resume_missing_dir":
        args += ["--resume", str(tmp_path / "checkpoints" / "step-00000009")]
    elif case == "memory_snapshot_after_the_last_step":  # it recorded nothing and said nothing
        args += ["--steps", "2", "--memory-snapshot", "5"]
    before = snapshot(tmp_path)
    line = fails(capsys, args, needle)
    assert snapshot(tmp_path) == before  # nothing written, nothing changed
    if case == "yaml_huge_wrong_value":
        assert len(line) < 300, len(line)  # 1 MB of value, quoted in a bounded part


@pytest.mark.parametrize("args, needle", [
    (["--set", "lr=nan"], "lr=nan is not a finite number"),
    (["--set", "lr=1e999"], "lr=inf is not a finite number"),  # would train to NaN weights
    (["--set", "budget_gb=inf"], "budget_gb=inf is not a finite number"),
    (["--set", "reward_target=nan"], "reward_target=nan is not a finite number"),
    (["--set", "weight_decay=-1"], "weight_decay must be 0 or more"),
    (["--set", "budget_gb=-1"], "budget_gb must be 0 or more"),
    (["--set", "max_grad_norm=-1"], "max_grad_norm must be 0 or more"),
    (["--set", "sample_prompts=-1"], "sample_prompts must be 0 or more"),
    (["--set", "tile_overlap=-1"], "tile_overlap must be 0 or more"),
    (["--set", "window_keep=-1"], "window_keep must be 0 or more (got -1): use --set window_keep=0"),
    (["--set", "lr_warmup_steps=-1"], "lr_warmup_steps must be 0 or more (got -1): use --set lr_warmup_steps=0"),
    # a warmup as long as the run: it would end before its learning rate reached lr, unsaid
    (["--steps", "20", "--set", "lr_warmup_steps=20"], "lr_warmup_steps=20 is not below steps=20: the run would end "
                                                       "before its learning rate reaches lr=0.003: lower "
                                                       "lr_warmup_steps (e.g. --set lr_warmup_steps=2)"),
    (["--set", "lr_scheduler=cosin"], "lr_scheduler='cosin' is not one of constant, linear, cosine"),
    # --max-minutes: a time limit for a rented machine (negative, not a number, or within the end's minute)
    (["--max-minutes", "-5"], "max_minutes must be 0 or more (got -5.0): give the run's time limit in minutes "
                              "(--max-minutes 120), or 0 for none"),
    (["--max-minutes", "nan"], "max_minutes=nan is not a finite number: give a number such as --max-minutes 120 "
                               "(0: no limit)"),
    (["--max-minutes", "0.5"], "max_minutes=0.5 leaves no time to train: a run keeps 1 min in hand for its end (the "
                               "LoRA, summary, exports): give more, e.g. --max-minutes 30, or 0 for no limit"),
    # a VAE path that is not there: plan read it as a hub id and planned the model's own VAE (FITS), train refused
    (["--set", "vae=/nonexistent/vae"], "vae=/nonexistent/vae does not exist: pass a diffusers VAE folder, a "
                                        ".safetensors file or a hub id"),
    (["--set", "eta=5"], "eta=5.0 must be between 0"),
    (["--set", "loss_scale=0"], "loss_scale must be positive"),
    (["--set", "lora_alpha=0"], "lora_alpha must be positive"),
    (["--set", "fused_adamw=true", "--set", "optimizer=adamw8bit"], "fused_adamw fuses torch's AdamW"),
    (["--set", "output_dir="], "output_dir is empty"),
    (["--set", "model="], "model is empty: name one"),  # an unset $MODEL trained the tiny model's noise
    (["--set", "card=x"], "card='x' is not one of rtx3060, rtx3060-8gb, rtx4090, a100-40gb, a100-80gb, h100, h200, "
                          "laptop, cpu: choose one of them"),  # not "is not one of , rtx3060" nor "use --set card="
    # another card was told the nearest spelling (rtx5090: "use --set card=rtx4090"; a100: h100), timed in silence
    (["--set", "card=rtx5090"], "card='rtx5090': plan has no figures for that card (it has rtx3060, rtx3060-8gb, "
                                "rtx4090, a100-40gb, a100-80gb, h100, h200, laptop, cpu): use the one nearest yours in "
                                "speed and memory, or leave card out (the profile's card)"),
    (["--set", "card=A100"], "card='A100' is not one of rtx3060, rtx3060-8gb, rtx4090, a100-40gb, a100-80gb, h100, "
                             "h200, laptop, cpu: use --set card=a100-40gb or --set card=a100-80gb"),
    (["--set", "card=RTX-4090"], "use --set card=rtx4090"),
    (["--output-dir", "/"], "is the file system's root"),
    # an option given empty (a script's unset variable): --resume "" started the run over, --init-lora "" a fresh LoRA
    (["--resume", ""], "--resume '' is empty (an unset shell variable?): give a value, or drop the option"),
    (["--init-lora", " "], "--init-lora ' ' is empty (an unset shell variable?): give a value, or drop the option"),
    (["--profile", ""], "--profile '' is empty (an unset shell variable?)"),  # (not "profile  is a directory")
    (["--set", "kl_coeff=0.1", "--set", "train_unet=full"], "kl_coeff needs train_unet=lora"),
    (["--set", "lora_layers=attention+ff", "--set", "train_unet=full"], "lora_layers=attention+ff shapes the LoRA, "
                                                                        "and train_unet=full trains every"),
    (["--set", "lora_rank=16", "--set", "train_unet=full"], "lora_rank=16 shapes the LoRA, and train_unet=full"),
    (["--set", "lora_alpha=8", "--set", "train_unet=full"], "lora_alpha=8.0 shapes the LoRA, and train_unet=full"),
    (["--set", "reward_cap=80", "--set", "reward_target=10"], "reward_cap and reward_target both shape the loss"),
    (["--set", "reward_cap=inf"], "reward_cap=inf is not a finite number"),
    (["--set", "base_quant=fp8", "--set", "unet_checkpointing=call"], "add --set unet_checkpointing=blocks"),
    (["--set", "ema_decay=1"], "ema_decay=1.0 must be in [0, 1)"),
    (["--early-stop", "2"], "early_stop=2 stops when evaluation stops improving, and evaluation is off"),
    (["--set", "best_by=fidelity"], "best_by=fidelity chooses best/ by the held-out evaluation, and evaluation is off"),
    # the exact evaluators read only the toy world's grammar: the default prompts' held-out ones have no score
    (["--eval-every", "1", "--set", "best_by=fidelity"], "best_by=fidelity scores the held-out images with the toy "
                                                          "world's exact evaluators, and 4 of the 4 held-out prompts"),
    (["--set", "recipe=aesthetics"], "unknown recipe 'aesthetics'"),
    # eval_prompts' reading (its table's column, its rows) without eval_prompts: the held-out prompts came from the
    # training set, the column or filter unread and unsaid
    (["--eval-every", "1", "--set", "eval_prompt_filter=Category=Animals"],
     "eval_prompt_filter=Category=Animals reads the table eval_prompts names, and eval_prompts is empty (the held-out "
     "prompts are then eval_holdout of the training prompts): give the table with --set eval_prompts=FILE, or drop "
     "--set eval_prompt_filter"),
    (["--set", "eval_prompt_column=Prompt"], "eval_prompt_column=Prompt reads the table eval_prompts names, and "
                                             "eval_prompts is empty"),
    # eval_holdout beside the eval_prompts that replace it (3 training prompts held out, asked; none was)
    (["--eval-every", "1", "--set", "eval_prompts=toy-heldout", "--set", "eval_holdout=3"],
     "eval_holdout=3 holds out training prompts where eval_prompts is empty, and eval_prompts=toy-heldout gives the "
     "held-out prompts: drop --set eval_holdout, or --set eval_prompts= to hold out training prompts instead"),
    # ZeRO-3 partitions the frozen fp8 weights too: the first step stopped in backward with torch's checkpoint error
    (["--set", "deepspeed_zero=3", "--set", "base_quant=fp8", "--set", "unet_checkpointing=blocks"],
     "base_quant=fp8 with deepspeed_zero=3: ZeRO-3 partitions the frozen fp8 weights too, and what it gathers for a "
     "checkpoint's recompute differs from the forward's (the step stopped in backward): use --set deepspeed_zero=2, "
     "or --set base_quant=none"),
    # DeepSpeed's CPU Adam steps an offloaded state: torch's fused AdamW, asked, never ran
    (["--set", "deepspeed_zero=2", "--set", "offload=optimizer", "--set", "fused_adamw=true"],
     "fused_adamw fuses torch's AdamW, and offload=optimizer steps with DeepSpeed's CPU Adam instead: use --set "
     "fused_adamw=false"),
    (["--eval-every", "1", "--set", "eval_prompts=", "--set", "eval_holdout=99"], "leaves none to train on"),
    (["--prompts", "toy-pairs", "--eval-every", "1", "--set", "eval_prompts=toy-pairs"],
     "eval_prompts=toy-pairs: every one of its 4 prompts is also a training prompt, so none is held out"),
    (["--model", "flux", "--set", "negative_prompt=blurry"], "FLUX.1 is guidance-distilled"),
    # (guidance 1 runs no unconditional pass: the negative prompt was accepted and unused, unsaid)
    (["--set", "negative_prompt=blurry", "--set", "guidance_scale=1"], "negative_prompt is the unconditional branch "
                                                                        "of classifier-free guidance, which "
                                                                        "guidance_scale=1 turns off (1 or less)"),
    # a flag that would be ignored (T5's 9.5 GB of host memory not saved) is refused, on FLUX and on UNet models
    (["--model", "flux", "--set", "t5_encoder=false"], "FLUX.1 always needs its T5-XXL"),
    (["--set", "t5_encoder=false"], "the model has no T5 text encoder to leave out (only SD3/SD3.5 do)"),
    (["--model", "flux", "--set", "prediction_type=epsilon"], "SD3/SD3.5 and FLUX.1 predict a flow"),
    (["--model", "flux", "--set", "zero_terminal_snr=true"], "zero_terminal_snr sets how a UNet samples (its "
                                                             "prediction, noise schedule, guidance rescale); SD3/SD3.5 "
                                                             "and FLUX.1 predict a flow (their own scheduler's) and "
                                                             "take none of these: drop --set zero_terminal_snr"),
    # guidance rescale: diffusers' SD/SDXL pipelines' (SD3's and FLUX's have none); a factor from 0 to 1; nothing to
    # rescale without the unconditional branch
    (["--model", "sd35m", "--set", "guidance_rescale=0.7"], "guidance_rescale sets how a UNet samples"),
    (["--set", "guidance_rescale=1.5"], "guidance_rescale=1.5 mixes the rescaled guided prediction in by that factor: "
                                        "use a value from 0 (off) to 1 (e.g. 0.7)"),
    (["--set", "guidance_rescale=0.7", "--set", "guidance_scale=1"], "guidance_rescale rescales the guided prediction "
                                                                     "of classifier-free guidance, which "
                                                                     "guidance_scale=1 turns off (1 or less): drop "
                                                                     "--set guidance_rescale"),
    # zero terminal SNR: the last timestep's latent is all noise (an epsilon UNet cannot denoise it; DDIM's eta 1
    # step from it is NaN in diffusers)
    (["--set", "zero_terminal_snr=true", "--set", "prediction_type=epsilon"], "zero_terminal_snr: at zero SNR the "
     "last timestep's latent is all noise, which a noise-predicting (epsilon) UNet cannot denoise"),
    (["--set", "zero_terminal_snr=true", "--set", "eta=1"], "zero terminal SNR with eta=1 (the default): DDIM's step "
     "from the pure-noise timestep then has no deterministic part left, and diffusers' step turns it into NaN: use "
     "--set eta=0"),
    # a K the truncation does not read (k=3 under every GPU profile's uniform trained K ~ U{1..50}, in silence)
    (["--set", "truncation=uniform"], "k=1 is the K of truncation=fixed, and truncation=uniform draws K from k_min=1 "
                                      "to k_max=3: add --set truncation=fixed for K=1, or set k_min and k_max instead"),
    (["--set", "k_max=5"], "k_max bounds the K that truncation=uniform or per_step draws, and truncation=fixed trains "
                           "K=k=1: add --set truncation=uniform, or set k instead"),
    (["--set", "lv_draws=300", "--set", "batch_size=4"], "lv_draws=300 x batch_size=4 images decoded and scored at "
                                                         "once is more than 1024, the most batch_size itself may be: "
                                                         "use --set lv_draws=256 or less"),
    (["--set", "fidelity_images=5000"], "fidelity_images=5000 is larger than 4096, the most this tool takes"),
    (["--set", "encode_on_cpu=true"], "encode_on_cpu sets how SD3/SD3.5 and FLUX.1 encode prompts (with T5), and "
                                      "--model tiny is an SD UNet model: it changes nothing there; drop --set "
                                      "encode_on_cpu"),  # (it promised a text encoder kept off the card, in silence)
    (["--set", "max_sequence_length=77", "--set", "encode_on_cpu=true"], "encode_on_cpu and max_sequence_length set "
                                                                          "how SD3/SD3.5 and FLUX.1 encode prompts"),
    (["--set", "model_arch=sdxl"], "model_arch=sdxl names the architecture of a single-file checkpoint (.safetensors, "
                                   ".ckpt, .pt, .bin), and --model tiny is not one"),
    (["--set", "model=\x00x"], "model='\\x00x' holds a NUL character"),  # os.stat raises ValueError on it
    (["--output-dir", "out\x00put"], "output_dir='out\\x00put' holds a NUL character"),
    ("dup", "sets 'batch_size' (line 2) twice"),
    ("empty", "is empty: set at least the fields"),
    ("noext", "is not a profile (profile files end in .yaml)"),
    ("novalue", "p.yaml: budget_gb has no value: give one (its default: budget_gb: 0.0) or leave the line out"),
    # a value that fails validation names the file it came from, and a negative budget the fix that means something
    ("negative", "p.yaml: budget_gb must be 0 or more (got -4.0): give your card's memory in GiB (--set "
                 "budget_gb=7.5), or 0 for no check"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_values_of_the_right_type_that_make_no_sense(args, needle, tmp_path, capsys):
    """Values that pass the type check but would crash later, train to NaN, or write where they should not."""
    if args in ("dup", "empty", "noext", "novalue", "negative"):
        path = tmp_path / ("p.txt" if args == "noext" else "p.yaml")
        path.write_text({"dup": "batch_size: 2\nbatch_size: 3\n", "empty": "", "noext": "batch_size: 2\n",
                         "novalue": "reward_target:\nbudget_gb:\n", "negative": "budget_gb: -4\n"}[args])  # (no target: its None is allowed)
        args = ["--profile", str(path)]
    before = snapshot(tmp_path)
    fails(capsys, [*FAST, "--output-dir", str(tmp_path / "run"), *args], needle)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc as a read-only file system")
def test_plan_refuses_what_training_refuses_before_loading(tmp_path, tiny_dir, capsys):
    """A VAE that is not there, another model's folder (a pipeline's unet/ for its vae/), a damaged file, a file of no
    VAE: plan said FITS (it planned the model's own VAE; the folder crashed it) where training stops. Both refuse with
    one line, before any weight is read."""
    import torch
    from safetensors.torch import save_file

    (tmp_path / "half.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    save_file({"unet.down.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    for spec, needle in (("./no_such_vae", "vae=./no_such_vae does not exist"),
                         (tiny_dir / "unet", f"vae={tiny_dir / 'unet'} holds a UNet2DConditionModel, not a VAE"),
                         (tmp_path / "half.safetensors", "half.safetensors is damaged or not a safetensors file ("),
                         (tmp_path / "lora.safetensors", "lora.safetensors holds no VAE weights (a UNet's, a LoRA's")):
        lines = [fails(capsys, [*command, "--profile", "cpu", "--model", str(tiny_dir), "--set", f"vae={spec}"],
                       needle) for command in (["plan"], ["--steps", "1", "--output-dir", str(tmp_path / "run")])]
        assert lines[0] == lines[1] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, needle", [
    (["--eval-every", "1", "--set", "best_by=fidelity"], "best_by=fidelity scores the held-out images with the toy "
                                                          "world's exact evaluators, and 4 of the 4 held-out prompts"),
    (["--eval-every", "1", "--set", "eval_holdout=99"], "eval_every holds out eval_holdout=99 of the 45 distinct "
                                                        "training prompts, which leaves none to train on"),
], ids=["best_by_fidelity_off_grammar", "holdout_takes_every_prompt"])
def test_plan_refuses_the_held_out_prompts_training_refuses(args, needle, tmp_path, capsys):
    """The held-out prompts training refuses before loading (best_by=fidelity's outside the toy grammar, none left to
    train on): plan said FITS for them. Both refuse with the same line."""
    lines = [fails(capsys, [*command, *FAST, *args], needle)
             for command in (["plan"], ["--steps", "1", "--output-dir", str(tmp_path / "run")])]
    assert lines[0] == lines[1] and not (tmp_path / "run").exists()


def test_read_only_output_dir(tmp_path, capsys):
    # root may write anywhere with chmod 000; a read-only file system stops everyone
    target = Path("/proc/lowmem_alignprop_test_run")
    fails(capsys, [*FAST, "--output-dir", str(target)], "is not writable")
    assert not target.exists()


# -- after loading: the model, its weights, the reward ------------------------------------------------

def test_missing_model_weights(tmp_path, tiny_dir, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    for f in (model / "unet").glob("diffusion_pytorch_model*"):
        f.unlink()
    out = tmp_path / "run"
    # in a subprocess: diffusers' own log handler (bound to the stderr of whichever test loaded it first)
    # reports the missing file too, which only a fresh process shows as the user sees it
    r = subprocess.run([sys.executable, "-m", "lowmem_alignprop", *FAST, "--model", str(model), "--output-dir",
                        str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert errors == [f"error: {model} is incomplete: unet/ has no weights file (such as "
                      "diffusion_pytorch_model.safetensors); copy the whole model folder again (every subfolder, "
                      "every file in full)"]  # (it named diffusion_pytorch_model.bin, said 'Check the path')
    assert "An error occurred" not in r.stderr and not out.exists()  # (diffusers' own line came first)


@pytest.mark.parametrize("reward, weights, needle", [
    ("aesthetic", "no_such_dir", "does not exist"),
    ("aesthetic", "empty", "missing sac+logos+ava1-l14-linearMSE.pth in"),
    ("aesthetic", None, "missing sac+logos+ava1-l14-linearMSE.pth in"),  # the default place: the cache's rewards/
    ("aesthetic:1,clip:0.5", "aesthetic=empty;clip=openai/clip-vit-large-patch14",
     "--set reward_weights='...;aesthetic=PATH'"),
])
def test_missing_reward_model_weights(reward, weights, needle, tmp_path, tiny_dir, capsys, monkeypatch):
    """A model reward's weight file that is not there is named before any model loads (the H200 check waited 2.7
    minutes and 22 GB of T5 for this line)."""
    from lowmem_alignprop.training import train_setup

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the reward's weights were found")

    monkeypatch.setattr(train_setup, "load_components", no_load)
    monkeypatch.setenv("LOWMEM_ALIGNPROP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    sets = [] if weights is None else ["--set", "reward_weights=" + weights.replace("empty", str(tmp_path / "empty"))
                                       .replace("no_such_dir", str(tmp_path / "no_such_dir"))]
    err = fails(capsys, [*FAST, "--reward", reward, *sets, "--output-dir", str(out)], needle)
    assert "aesthetic reward" in err and not out.exists()


@pytest.mark.parametrize("returned, needle", [
    ("images.mean()", "returned shape ()"),
    # a meta tensor (or one on another device) was a traceback from .item(); complex scores lost their imaginary part
    ("images.mean(dim=(1, 2, 3)).to('meta')", "returned scores on the meta device, which hold no values; return "
                                              "them on the images' device (images.device)"),
    ("images.mean(dim=(1, 2, 3)).to(torch.complex64)", "returned complex scores (torch.complex64); return one real "
                                                       "score per image"),
], ids=["shape", "device", "complex"])
def test_reward_returning_the_wrong_shape_device_or_kind(tmp_path, tiny_dir, capsys, monkeypatch, returned, needle):
    (tmp_path / "shape_reward.py").write_text(f"import torch\ndef reward(images, prompts):\n    return {returned}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "shape_reward", raising=False)
    out = tmp_path / "run"
    fails(capsys, [*FAST, "--reward", "shape_reward:reward", "--output-dir", str(out)], needle)
    assert not out.exists()  # checked at start-up, before the run directory is created


def test_lora_file_given_as_the_base_model(trained, tmp_path, capsys):
    out = tmp_path / "run"
    fails(capsys, [*FAST, "--model", str(trained / "lora" / "pytorch_lora_weights.safetensors"),
                   "--output-dir", str(out)], "is a LoRA file, not a base model: pass the base model it was "
          "trained on as --model; to see what the LoRA does, run `lowmem-alignprop sample --lora")
    assert not out.exists()


@pytest.mark.parametrize("command", [[], ["sample", "--num-prompts", "1"]], ids=["train", "sample"])
@pytest.mark.parametrize("given, holds", [("lora", "pytorch_lora_weights.safetensors"),
                                          ("", "lora/pytorch_lora_weights.safetensors")], ids=["lora_dir", "run_dir"])
def test_a_lora_or_run_folder_given_as_the_model_is_named_a_lora(trained, tmp_path, capsys, command, given, holds):
    """`sample --model RUN/lora` (sample without a LoRA samples --model alone) or `train --model RUN`: the line named
    no model_index.json and save_pretrained, not that the folder is a LoRA and --lora the fix."""
    folder = trained / given if given else trained
    out = tmp_path / "out"
    line = fails(capsys, [*command, *FAST, "--model", str(folder), "--output-dir", str(out)], "")
    assert line == (f"error: {folder} holds a LoRA ({holds}), not a base model: pass the base model it was trained "
                    f"on as --model; to see what the LoRA does, run `lowmem-alignprop sample --lora {folder}`")
    assert not out.exists()


def _other_unet_model(dst: Path) -> Path:
    """The tiny pipeline with a narrower UNet: LoRA layers of another shape."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from lowmem_alignprop.models.tiny import build_tiny_pipeline
    p = build_tiny_pipeline()
    unet = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    StableDiffusionPipeline(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=unet,
                            scheduler=p.scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(dst)
    return dst


def test_lora_for_another_base_model(trained, tmp_path, capsys):
    model = _other_unet_model(tmp_path / "other")
    out = tmp_path / "samples"
    fails(capsys, ["sample", "--model", str(model), "--lora", str(trained / "lora"), "--output-dir", str(out),
                   "--profile", "cpu"], "does not fit this model")
    assert not out.exists()


# -- an existing run: nothing in it may change --------------------------------------------------------

def test_new_run_into_a_finished_runs_dir(trained, capsys):
    before = snapshot(trained)
    fails(capsys, [*FAST, "--output-dir", str(trained), "--steps", "3"], "already holds a run")
    assert snapshot(trained) == before



def test_the_same_command_twice_keeps_the_first_run(trained, capsys, caplog, monkeypatch, tmp_path):
    """Without --output-dir, a second run of the same command writes beside the first (outputs/run-2), says so,
    and leaves the first alone; a directory the user names is still refused (above)."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained, tmp_path / "outputs" / "run")
    before = snapshot(tmp_path / "outputs" / "run")
    assert main([*FAST, "--steps", "1"]) == 0
    assert "outputs/run holds an earlier run" in caplog.text and "writes to outputs/run-2" in caplog.text
    assert (tmp_path / "outputs" / "run-2" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert snapshot(tmp_path / "outputs" / "run") == before
    fails(capsys, [*FAST, "--set", "output_dir=outputs/run", "--steps", "1"], "already holds a run")
    # a bad input stops the next one before it takes a folder: no "writes to outputs/run-3" for a run that never ran
    caplog.clear()
    fails(capsys, [*FAST, "--prompts", "no-such-prompts.txt"], "prompt file no-such-prompts.txt does not exist")
    assert "holds an earlier run" not in caplog.text and not (tmp_path / "outputs" / "run-3").exists()


@pytest.mark.parametrize("change, needle", [
    (["--set", "lora_rank=8"], "trained with lora_rank=4, this run has lora_rank=8"),
    # (another optimizer: the LoRA can go on in a new run, its optimizer's state afresh)
    (["--set", "optimizer=adamw8bit"], "trained with optimizer='adamw'"),
    (["--set", "optimizer=adamw8bit"], "start a new run in another --output-dir (--init-lora "),
    (["--set", "train_unet=full"], "trained with train_unet='lora'"),
    (["--set", "lora_layers=attention+ff"], "trained with lora_layers='attention', this run has "
                                            "lora_layers='attention+ff': resume with --set lora_layers=attention"),
])
def test_resume_with_another_config(trained, capsys, change, needle):
    pytest.importorskip("bitsandbytes") if "optimizer=adamw8bit" in change else None
    before = snapshot(trained)
    fails(capsys, [*FAST, *change, "--output-dir", str(trained), "--steps", "4", "--resume", "latest"], needle)
    assert snapshot(trained) == before


def test_a_resume_that_fails_as_the_checkpoint_loads_leaves_config_and_command_as_they_were(trained, capsys,
                                                                                          monkeypatch):
    """A resume refused while its checkpoint is restored (after the models loaded) rewrote config.yaml with the
    settings it never trained with and added its line to command.txt (the model card's command)."""
    def refusing(*a, **kw):
        raise UserError("checkpoint refused as it loads (test)")

    monkeypatch.setattr(ckpt, "restore", refusing)
    before = snapshot(trained)
    fails(capsys, [*FAST, "--set", "lr=0.5", "--output-dir", str(trained), "--steps", "4", "--resume", "latest"],
          "checkpoint refused as it loads (test)")
    assert snapshot(trained) == before


@pytest.mark.parametrize("spec", ["2-", "2_0", "\u0662", "x", "2,3", "2-3-4", "1.5"])
def test_a_memory_snapshot_is_a_step_or_a_range_in_ascii_digits(spec):
    """int() took "2-" as 2, "2_0" as 20 and an Arabic-Indic two as 2: each is now one line."""
    from lowmem_alignprop.cli import parse_snapshot

    with pytest.raises(UserError, match=f"--memory-snapshot {spec!r}: write a step or a range, e.g. 2 or 2-3"):
        parse_snapshot(spec)
    assert parse_snapshot(" 2") == (2, 2) and parse_snapshot("2-3") == (2, 3)


def test_a_snapshot_window_before_a_resumes_first_step_is_refused(trained, capsys):
    """--memory-snapshot of steps a resume does not train (it starts at step 3): one line, nothing changed (it was
    taken, and on a GPU recorded nothing and said nothing)."""
    before = snapshot(trained)
    fails(capsys, [*FAST, "--output-dir", str(trained), "--steps", "4", "--resume", "latest", "--memory-snapshot",
                   "1-2"], "--memory-snapshot 1-2: this resume starts at step 3: give steps within 3-4")
    assert snapshot(trained) == before


def test_a_deepspeed_checkpoint_of_other_process_count_is_refused_before_any_model_loads(trained, tmp_path):
    state = {**ckpt.read_state(ckpt.find_resume(trained, "latest")), "world_size": 2}
    state["config"] = {**state["config"], "deepspeed_zero": 2}
    cfg = Config(deepspeed_zero=2, steps=4)
    with pytest.raises(UserError, match=r"holds DeepSpeed partitions of 2 processes; this run has 1: resume under "
                                        r"accelerate launch --multi_gpu --num_processes 2 -m lowmem_alignprop"):
        resume_rules.check_config(state, cfg, tmp_path / "step-2")
    resume_rules.check_config({**state, "world_size": 1}, cfg, tmp_path / "step-2")  # one process: its own


def test_a_deepspeed_checkpoint_resumed_with_the_other_optimizer_state_is_refused_before_any_model_loads(trained,
                                                                                                         tmp_path):
    """Under DeepSpeed, offload picks the optimizer beside `optimizer`: torch's AdamW without it, DeepSpeed's CPU Adam
    with it. A ZeRO-3 run resumed with --set offload=params was warned "offload was 'none' in the checkpoint, now
    'params'", loaded AdamW's state into CPU Adam and died in step 3 in a KeyError traceback ('bias_correction'; a
    ZeRO-3 walk met it). Now one line before any model loads; offload=optimizer -> params (CPU Adam both) goes on."""
    import re

    state = ckpt.read_state(ckpt.find_resume(trained, "latest"))
    state["config"] = {**state["config"], "deepspeed_zero": 3, "offload": "none"}
    path = tmp_path / "step-2"
    with pytest.raises(UserError, match=re.escape(
            f"checkpoint {path} was trained with offload='none', this run has offload='params': its optimizer state "
            "is AdamW's, this run would step with DeepSpeedCPUAdam: resume with --set offload=none, or start a new run "
            f"in another --output-dir (--init-lora {path} starts it from this LoRA)")):
        resume_rules.check_config(state, Config(deepspeed_zero=3, offload="params", steps=4), path)
    state["config"]["offload"] = "optimizer"  # and back: CPU Adam's state in torch's AdamW
    with pytest.raises(UserError, match="offload='optimizer', this run has offload='none': its optimizer state is "
                                        "DeepSpeedCPUAdam's, this run would step with AdamW: resume with --set "
                                        "offload=optimizer"):
        resume_rules.check_config(state, Config(deepspeed_zero=3, steps=4), path)
    resume_rules.check_config(state, Config(deepspeed_zero=3, offload="params", steps=4), path)  # CPU Adam both


def test_resume_another_models_checkpoint(trained, tmp_path, capsys, monkeypatch):
    from lowmem_alignprop.training import train_setup
    from lowmem_alignprop.models.tiny import build_tiny_pipeline
    other = tmp_path / "other"
    build_tiny_pipeline(seed=1).save_pretrained(other)  # same architecture, other weights
    before = snapshot(trained)
    fails(capsys, [*FAST, "--model", str(other), "--output-dir", str(trained), "--steps", "4", "--resume", "latest"],
          "belongs to another base model ('tiny'; its UNet weights differ")
    narrower = _other_unet_model(tmp_path / "narrow")
    monkeypatch.setattr(train_setup, "load_components", None)  # another architecture: told from the configs, unloaded
    fails(capsys, [*FAST, "--model", str(narrower), "--output-dir", str(trained), "--steps", "4",
                   "--resume", "latest"], "its UNet architecture differs")
    assert snapshot(trained) == before


def test_resume_with_nothing_left_to_train(trained, capsys):
    before = snapshot(trained)
    fails(capsys, [*FAST, "--output-dir", str(trained), "--steps", "2", "--resume", "latest"],
          "is at step 2 and --steps is 2 (the run's last step: it is done): nothing left to train; raise --steps "
          "above 2")  # (a finished run resumed again: said as done, not only as a refusal)
    fails(capsys, [*FAST, "--output-dir", str(trained), "--steps", "1", "--resume", "latest"],
          "is at step 2 and --steps is 1 (past them): nothing left to train; raise --steps above 2")
    assert snapshot(trained) == before


def test_resume_a_corrupt_checkpoint_by_name(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ck = ckpt.step_dir(run / "checkpoints", 2)
    (ck / "optimizer.pt").write_bytes(b"\0" * 10)
    before = snapshot(run)
    fails(capsys, [*FAST, "--output-dir", str(run), "--steps", "4", "--resume", str(ck)], "incomplete or corrupt")
    assert snapshot(run) == before


def test_disk_full_while_checkpointing(tmp_path, tiny_dir, capsys, monkeypatch):
    import safetensors.torch as st
    real, calls = st.save_file, []

    def save_file(tensors, filename, *a, **k):
        if ".tmp-step-" in str(filename):
            calls.append(filename)
            if len(calls) == 2:  # the second checkpoint: the disk fills up half-way through it
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(st, "save_file", save_file)
    out = tmp_path / "run"
    fails(capsys, [*FAST, "--output-dir", str(out), "--steps", "3", "--checkpoint-every", "1"],
          "the disk is full; nothing was half-written (the previous checkpoint")
    root = out / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-00000001"]  # no partial step-2, no temp dir
    assert ckpt.verify(root / "step-00000001") is None
    # and the run continues from it once there is space again
    monkeypatch.setattr(st, "save_file", real)
    assert main([*FAST, "--output-dir", str(out), "--steps", "3", "--resume", "latest"]) == 0
    assert ckpt.find_resume(out, "latest").name == "step-00000003"


@pytest.mark.parametrize("read_only", [False, True], ids=["metrics_line_fails", "folder_goes_read_only"])
def test_a_metrics_line_that_cannot_be_written_mid_run_is_one_line(read_only, tmp_path, capsys, monkeypatch):
    """The output folder's disk goes read-only (an ext4 remount after an I/O error, an NFS export) or fails one
    append at step 3: a 40-line traceback, exit 1, step 3 lost where a checkpoint could still have kept it; and the
    run lock's removal on the read-only disk raised a second traceback over the first. Now one line: step 3 goes
    into a checkpoint where the disk takes one, else the line says which checkpoint is intact."""
    import pathlib

    import safetensors.torch as st

    from lowmem_alignprop.training import grid

    real_line, real_save, real_unlink, broken = grid.write_metrics_line, st.save_file, pathlib.Path.unlink, []
    ro = OSError(errno.EROFS, "Read-only file system")

    def write_metrics_line(path, row):
        if row["step"] == 3 or broken:
            broken.append(path)
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_line(path, row)

    def save_file(tensors, filename, *a, **k):
        if read_only and broken:
            raise ro
        return real_save(tensors, filename, *a, **k)

    def unlink(self, *a, **k):
        if read_only and broken and self.name == ".run.lock":
            raise ro
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(grid, "write_metrics_line", write_metrics_line)
    monkeypatch.setattr(st, "save_file", save_file)
    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    out = tmp_path / "run"
    args = [*FAST, "--output-dir", str(out), "--steps", "4", "--checkpoint-every", "2"]
    line = fails(capsys, args, f"step 3: could not write {out / 'metrics.jsonl'}: Read-only file system")
    kept = "step-00000002" if read_only else "step-00000003"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"][:2 - read_only]
    assert kept in line and "--resume latest" in line and "make --output-dir writable" in line.lower(), line
    assert not (out / ".run.lock").exists() or read_only  # (left on a read-only disk; the next run takes it over)
    if read_only:
        assert "nothing was half-written (the previous checkpoint" in line, line
    else:
        assert "steps 1-3 are saved in" in line, line
    monkeypatch.setattr(grid, "write_metrics_line", real_line)  # the disk is writable again
    monkeypatch.setattr(st, "save_file", real_save)
    broken.clear()
    assert main([*args, "--resume", "latest"]) == 0
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


USER_REWARDS = '''
import torch

def boom(images, prompts):
    raise ValueError("my reward exploded")

def nograd(images, prompts):
    return torch.zeros(images.shape[0])

def detached(images, prompts):
    return images.mean((1, 2, 3)).detach()

def rounded(images, prompts):  # integer scores: no gradient, whatever the function did before the cast
    return (images.mean((1, 2, 3)) * 10).long()

def nan(images, prompts):
    return images.mean((1, 2, 3)) * float("nan")

def constant(images, prompts):  # requires_grad, but the images are not in its graph
    return torch.ones(images.shape[0], requires_grad=True)

def stepwise(images, prompts):  # depends on the images through a rounding: zero gradient everywhere
    return torch.round(images * 4).mean((1, 2, 3)) + 0 * images.mean((1, 2, 3))

def nangrad(images, prompts):  # sqrt at 0: finite scores, NaN gradient
    return (images - images).sqrt().mean((1, 2, 3))

def make(scale):  # a factory whose argument the trainer cannot give
    return lambda images, prompts: scale * images.mean((1, 2, 3))

def gradonly(images, prompts):  # fails without gradient, as when the sample images are scored
    if not torch.is_grad_enabled():
        raise RuntimeError("no scoring without grad")
    return images.mean((1, 2, 3))

TABLE = {"a red car": 1.0, "a blue boat": 2.0}

def lookup(images, prompts):  # valid for the run's own prompts only
    return images.mean((1, 2, 3)) * torch.tensor([TABLE[p] for p in prompts])

calls = {"n": 0}

def sometimes(images, prompts):  # loses its gradient on the second training batch
    if images.shape[0] == 1 and torch.is_grad_enabled():
        calls["n"] += 1
        if calls["n"] == 2:
            return images.mean((1, 2, 3)).detach()
    return images.mean((1, 2, 3))

unhooked_calls = {"n": 0}

def unhooked(images, prompts):  # on the second training batch: the scores cut off and made a leaf that needs grad
    if images.shape[0] == 1 and torch.is_grad_enabled():
        unhooked_calls["n"] += 1
        if unhooked_calls["n"] == 2:
            return images.mean((1, 2, 3)).detach().requires_grad_()
    return images.mean((1, 2, 3))
'''


@pytest.mark.parametrize("term, needle", [
    ("qa_syntax:f", "importing module 'qa_syntax' failed with SyntaxError: expected ':'"),
    ("qa_rewards:boom", "raised ValueError: my reward exploded; fix the function"),
    ("qa_rewards:nograd", "returned scores with no gradient to the images"),
    ("qa_rewards:detached", "returned scores with no gradient to the images"),
    ("qa_rewards:rounded", "reward 'qa_rewards:rounded' returned torch.int64 scores, which carry no gradient"),
    ("qa_rewards:nan", "returned NaN or inf"),
    ("qa_rewards:constant", "returned scores that do not depend on the images"),
    ("qa_rewards:stepwise", "gradient to the images is exactly zero"),
    ("qa_rewards:nangrad", "gradient to the images is NaN or inf"),
    ("qa_rewards:make()", "building it failed with TypeError"),
    ("qa_rewards:gradonly", "raised RuntimeError on a test image without gradient (as for the sample images)"),
    ("brightness:abc", "the weight 'abc' is not a number; write e.g. brightness:0.5"),
    ("toy_count=3:abc", "the weight 'abc' is not a number; write e.g. toy_count=3:0.5"),  # not "cannot import"
    # each was another line's words: "write a user reward as 'package.module:function'", "'1' is not a number"
    ("brightness:", "reward 'brightness:': the weight after ':' is missing; write e.g. brightness:0.5 (brightness "
                    "alone: weight 1)"),
    ("brightness:1:2", "reward 'brightness:1': more than one weight: give one"),
    # a weight that overflows to inf: every step's reward infinite, each skipped, in a run that "ended" (exit 0)
    ("brightness:1e400", "reward 'brightness': the weight 1e400 is not a finite number; write e.g. brightness:0.5"),
    # one reward twice (or by its alias and its name): computed twice, in silence
    ("jpeg,jpeg_compressibility:0.5", "reward spec 'jpeg,jpeg_compressibility:0.5' names jpeg_compressibility more "
                                      "than once: give each reward once, with the sum of its weights "
                                      "(jpeg_compressibility:1.5)"),
])
def test_a_broken_user_reward_is_named_before_anything_loads(term, needle, tmp_path, capsys, monkeypatch):
    """A user reward is imported and called once on two random images at startup: it must import, run, give finite
    scores and a gradient back to the images; each failure is one line, and nothing is written."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "qa_rewards.py").write_text(USER_REWARDS)
    (mods / "qa_syntax.py").write_text("def f(images, prompts)\n    return images.mean()\n")
    monkeypatch.syspath_prepend(str(mods))
    before = snapshot(tmp_path)
    fails(capsys, [*FAST, "--output-dir", str(tmp_path / "run"), "--reward", term], needle)
    assert snapshot(tmp_path) == before


def test_a_reward_that_fails_mid_run_keeps_the_finished_steps(tmp_path, capsys, monkeypatch):
    """A reward that raises at step 3 (a model server gone, a bug on some image): one line naming the step and the
    error, steps 1-2 saved in a checkpoint, and once it is fixed --resume latest finishes the run."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "qa_late.py").write_text(
        "import os, torch\n"
        "calls = {'n': 0}\n"
        "def reward(images, prompts):\n"
        "    if images.shape[0] == 1 and torch.is_grad_enabled():  # training steps, not the start-up checks\n"
        "        calls['n'] += 1\n"
        "        if calls['n'] == 3 and not os.environ.get('QA_FIXED'):\n"
        "            raise RuntimeError('model server went away')\n"
        "    return images.mean((1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(mods))
    out = tmp_path / "run"
    args = [*FAST, "--output-dir", str(out), "--reward", "qa_late:reward", "--steps", "4"]
    line = fails(capsys, args, "step 3: the reward 'qa_late:reward' raised RuntimeError: model server went away")
    assert "steps 1-2 are saved in" in line and "--resume latest" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    monkeypatch.setenv("QA_FIXED", "1")
    assert main([*args, "--resume", "latest"]) == 0
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.parametrize("failure", ["raise ValueError('my backward broke')", "sys.exit(3)", "raise KeyboardInterrupt"])
def test_a_reward_whose_own_backward_fails_mid_run_is_one_line_and_keeps_the_finished_steps(failure, tmp_path, capsys):
    """The reward's own backward (a custom autograd Function, a hook) fails at step 2 (the start-up test's backward
    passed): it fails in the trainer's backward stage, not the reward's, and was a traceback (exit 1), or
    "interrupted" (exit 130) for a KeyboardInterrupt. Named as the reward's, by its file among the error's frames;
    step 1 is kept."""
    reward = tmp_path / "qa_backward.py"
    reward.write_text(
        "import sys\nimport torch\n\ncalls = [0]\n\n\nclass Through(torch.autograd.Function):\n"
        "    @staticmethod\n    def forward(ctx, x):\n        return x.clone()\n\n"
        "    @staticmethod\n    def backward(ctx, g):\n        if calls[0] == 2:  # step 2's\n"
        f"            {failure}\n        return g\n\n\n"
        "def reward(images, prompts):\n    calls[0] += images.requires_grad and images.shape[0] == 1\n"
        "    return Through.apply(images).mean(dim=(1, 2, 3))\n")
    out = tmp_path / "run"
    said = {"raise ValueError('my backward broke')": "ValueError: my backward broke", "sys.exit(3)": "SystemExit: 3",
            "raise KeyboardInterrupt": "KeyboardInterrupt"}[failure]
    line = fails(capsys, [*FAST, "--output-dir", str(out), "--reward", f"{reward}:reward", "--steps", "3"],
                 f"step 2: the reward '{reward}:reward' raised {said} (its code, in stage backward); step 1 is saved "
                 "in")
    assert "--resume latest continues once it is fixed" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]


def test_the_startup_reward_check_uses_the_runs_prompts_and_a_lost_gradient_mid_run_is_named(tmp_path, capsys,
                                                                                              monkeypatch):
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "qa_rewards2.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(mods))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\na blue boat\n")
    assert main([*FAST, "--output-dir", str(tmp_path / "ok"), "--reward", "qa_rewards2:lookup", "--steps", "1",
                 "--prompts", str(prompts)]) == 0
    out = tmp_path / "run"
    line = fails(capsys, [*FAST, "--output-dir", str(out), "--reward", "qa_rewards2:sometimes", "--steps", "3"],
                 "step 2: the reward 'qa_rewards2:sometimes' returned scores with no gradient to the images")
    assert "step 1 is saved in" in line


def test_a_reward_whose_scores_are_cut_off_the_images_mid_run_is_named_at_that_step(tmp_path, capsys, monkeypatch):
    """Scores detached and made a leaf that needs a gradient (``.detach().requires_grad_()``) on one batch: the
    backward reached no LoRA weight and the step counted as trained, in silence (five in a row stopped the run as
    "a threshold, a saturated or constant score?"). A leaf cannot depend on the images: named at that step."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "qa_rewards3.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(mods))
    out = tmp_path / "run"
    line = fails(capsys, [*FAST, "--output-dir", str(out), "--reward", "qa_rewards3:unhooked", "--steps", "3"],
                 "step 2: reward 'qa_rewards3:unhooked' returned scores that do not depend on the images")
    assert "step 1 is saved in" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_lora_sampled_on_another_base_model_of_the_same_shapes_is_pointed_out(trained, tmp_path, caplog):
    from lowmem_alignprop.models.tiny import build_tiny_pipeline

    assert (trained / "lora" / "base_model.json").is_file()  # written beside the LoRA by the trainer
    other = tmp_path / "other"
    build_tiny_pipeline(1).save_pretrained(other)  # same architecture, other weights
    common = ["sample", "--profile", "cpu", "--set", "sample_steps=2", "--num-prompts", "1", "--lora",
              str(trained / "lora")]
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main([*common, "--model", str(other), "--output-dir", str(tmp_path / "s1")]) == 0
    assert "was trained on base model 'tiny', and its UNet weights differ from --model" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):  # its own base: nothing to say
        assert main([*common, "--output-dir", str(tmp_path / "s2")]) == 0
    assert "was trained on base model" not in caplog.text


def test_a_run_folder_without_checkpoints_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "lora").mkdir(parents=True)
    (run / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"a finished run's LoRA")
    before = snapshot(tmp_path)
    fails(capsys, [*FAST, "--output-dir", str(run)], "already holds a run (lora/): it has no checkpoint to continue "
                                                     "from: choose another --output-dir (nothing was overwritten)")
    assert snapshot(tmp_path) == before


def test_a_run_killed_before_its_first_checkpoint_says_what_to_do(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5}\n')  # killed at step 2: no checkpoint yet
    before = snapshot(tmp_path)
    fails(capsys, [*FAST, "--output-dir", str(run)], "it stopped before its first checkpoint, so nothing there can "
                                                     "be continued: delete the folder to start again there")
    fails(capsys, [*FAST, "--output-dir", str(run), "--resume", "latest"], "cannot be continued (--checkpoint-every "
                                                                           "N saves them): delete the folder")
    assert snapshot(tmp_path) == before


# -- issue 19: one line instead of a traceback --------------------------------------------------------------------

@pytest.mark.parametrize("case, needle", [
    ("huge_seed", "seed=99999999999999999999999 is out of range: give a whole number from 0 to 4294967295"),
    ("output_dir_symlink_loop", "is a symlink loop (its links point at each other): choose a folder"),
    ("output_dir_dangling_symlink", "which does not exist: choose a folder (or fix the link)"),
    ("world_size_not_a_number", "WORLD_SIZE='abc' in the environment is not a count of processes"),
    ("rank_outside_a_launcher", "k=99 is larger than sample_steps=3"),
    ("model_dev_null", "model path /dev/null is not a regular file (a device such as /dev/null"),
    ("prompts_a_directory", "is a directory, not a file; give a text file"),
    ("prompts_dev_null", "prompt file /dev/null is not a regular file (a device such as /dev/null, a pipe or a "
                         "socket); give a text file"),  # (not "..., not a file" after it: said twice)
    # a link named without a suffix or a slash was taken for an unknown built-in set's name
    ("prompts_dangling_link_bare_name", "prompt file dangl is a symlink to"),
    ("profile_a_directory", "is a directory, not a profile file"),
    ("resolution_absurd", "resolution=100000 is larger than 4096, the most this tool takes"),
    ("batch_absurd", "batch_size=1000000 is larger than 1024, the most this tool takes"),
    ("read_only_home_no_cache", "the built-in tiny model is built once into"),
    ("model_ckpt_with_code", "holds pickled Python objects besides tensors, which are not loaded for safety"),
])
def test_environment_paths_and_sizes_are_one_line(case, needle, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = [*FAST, "--output-dir", str(out)]
    if case == "huge_seed":
        args += ["--seed", "99999999999999999999999"]
    elif case == "output_dir_symlink_loop":
        (tmp_path / "a").symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(tmp_path / "a")
        args += ["--output-dir", str(tmp_path / "a")]
    elif case == "output_dir_dangling_symlink":
        (tmp_path / "link").symlink_to(tmp_path / "nowhere")
        args += ["--output-dir", str(tmp_path / "link")]
    elif case == "world_size_not_a_number":
        monkeypatch.setenv("WORLD_SIZE", "abc")
    elif case == "rank_outside_a_launcher":  # RANK left in the shell: no launcher, so this process must say it
        monkeypatch.setenv("RANK", "1")
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        args += ["--set", "k=99"]
    elif case == "model_dev_null":
        args += ["--model", "/dev/null"]
    elif case == "prompts_a_directory":
        args += ["--prompts", str(tmp_path)]
    elif case == "prompts_dev_null":
        args += ["--prompts", "/dev/null"]
    elif case == "prompts_dangling_link_bare_name":
        (tmp_path / "dangl").symlink_to(tmp_path / "nowhere")
        monkeypatch.chdir(tmp_path)
        args += ["--prompts", "dangl"]
    elif case == "profile_a_directory":
        (tmp_path / "p.yaml").mkdir()
        args += ["--profile", str(tmp_path / "p.yaml")]
    elif case == "resolution_absurd":
        args += ["--set", "resolution=100000"]
    elif case == "batch_absurd":
        args += ["--set", "batch_size=1000000"]
    elif case == "read_only_home_no_cache":  # (a file as HOME: not writable even for root)
        (tmp_path / "home").write_text("not a folder")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        monkeypatch.delenv("LOWMEM_ALIGNPROP_CACHE")
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    elif case == "model_ckpt_with_code":
        import torch

        class Code:
            def __reduce__(self):
                return (os.system, ("echo never run",))
        torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Code()}, tmp_path / "m.ckpt")
        args += ["--model", str(tmp_path / "m.ckpt")]
    before = snapshot(tmp_path)
    fails(capsys, args, needle)
    assert snapshot(tmp_path) == before


def test_plan_bounds_its_inputs_and_says_when_host_memory_runs_out(tmp_path, capsys, monkeypatch):
    from lowmem_alignprop.measure import planner

    fails(capsys, ["plan", "--profile", "cpu", "--set", "resolution=100000"], "resolution=100000 is larger than")
    fails(capsys, ["plan", "--profile", "cpu", "--set", "batch_size=1000000"], "batch_size=1000000 is larger than")
    # T5 padded every prompt to 100,000 tokens: the load ran out of memory and the advice named the batch size
    fails(capsys, ["plan", "--profile", "cpu", "--model", "flux", "--set", "max_sequence_length=600"],
          "max_sequence_length=600 is larger than 512, the most this tool takes (SD3's and FLUX.1's pipelines take no "
          "more T5 tokens): use --set max_sequence_length=512 or less")

    def estimate(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(planner, "estimate", estimate)
    fails(capsys, ["plan", "--profile", "cpu", "--set", "sample_steps=3", "--set", "k=1"],
          "out of host memory ([enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")


def test_memory_running_out_outside_training_names_the_memory_and_the_commands_fix():
    """A CUDA out-of-memory error in sample, export --merge or plan was "out of host memory", with training's advice
    (lower resolution or batch_size: sample has no batch flag, a merge renders nothing)."""
    import torch

    from lowmem_alignprop.cli import _out_of_space_or_memory

    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert str(_out_of_space_or_memory(gpu, "sample")) == (
        "out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB): render fewer images at once "
        "(--num-prompts, --images-per-prompt) or at a lower --set resolution, or use a machine with more memory")
    assert str(_out_of_space_or_memory(gpu, "export")).startswith(
        "out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB): merge on a machine with more memory, or "
        "export the LoRA without --merge")
    host = RuntimeError("DefaultCPUAllocator: can't allocate memory")
    assert str(_out_of_space_or_memory(host, "plan")) == (
        "out of host memory (DefaultCPUAllocator: can't allocate memory): plan a smaller setting (--set resolution, "
        "batch_size) or, with --fastest, fewer workers (--jobs 1), close other programs, or use a machine with more "
        "memory")


def test_host_memory_running_out_in_a_step_is_an_out_of_memory_stop(tmp_path, capsys, monkeypatch, tiny_dir):
    """torch's CPU allocator raises RuntimeError("... can't allocate memory"), not MemoryError: the run stops as for
    any out-of-memory, naming the stage and a change that fits."""
    (tmp_path / "qa_hog.py").write_text(
        "import torch\n"
        "def reward(images, prompts):\n"
        "    if torch.is_grad_enabled() and images.shape[0] == 1:  # a training step, not the start-up checks\n"
        "        raise RuntimeError(\"[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory\")\n"
        "    return images.mean((1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fails(capsys, [*FAST, "--output-dir", str(tmp_path / "run"), "--reward", "qa_hog:reward"],
          "out of memory in stage 'reward' at step 1")


def test_the_tilde_of_output_dir_is_the_home_folder(tmp_path, monkeypatch):
    from lowmem_alignprop.settings.profiles import resolve_config

    monkeypatch.setenv("HOME", str(tmp_path))
    _, cfg = resolve_config("cpu", {"output_dir": "~/x"}, [])
    assert cfg.output_dir == str(tmp_path / "x")
    _, cfg = resolve_config("cpu", {}, ["output_dir=~/y"])
    assert cfg.output_dir == str(tmp_path / "y")


@pytest.mark.parametrize("manifest, state", [
    ("[1, 2]", None), ('{"files": [1]}', None), ('{"files": {"state.json": 5}}', None),
    ('{"files": {"state.json": {"bytes": "x", "sha256": 1}}}', None), (None, "[1]"), (None, '{"step": "2"}'),
])
def test_a_checkpoint_of_valid_json_but_the_wrong_shape_is_skipped_like_a_corrupt_one(manifest, state, trained,
                                                                                      tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    good = ckpt.step_dir(run / "checkpoints", 2)
    bad = ckpt.step_dir(run / "checkpoints", 3)
    shutil.copytree(good, bad)
    if manifest is not None:
        (bad / "manifest.json").write_text(manifest)
    else:  # a state.json of the wrong shape, its manifest rewritten to match it
        (bad / "state.json").write_text(state)
        (bad / "manifest.json").unlink()
        ckpt.write_manifest(bad)
    assert "wrong shape" in ckpt.verify(bad)
    assert ckpt.find_resume(run, "latest") == good  # the previous intact one
    assert "incomplete or corrupt" in caplog.text


def test_a_lora_file_that_holds_code_nan_or_a_foreign_record_is_said_so(trained, tmp_path, capsys, caplog):
    import torch
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.lora.lora_args import LoraSpec
    from lowmem_alignprop.lora.lora_checks import warn_other_base

    class Code:
        def __reduce__(self):
            return (os.system, ("echo never run",))
    torch.save({"unet.x.lora_A.weight": torch.zeros(1), "x": Code()}, tmp_path / "evil.bin")
    fails(capsys, ["sample", *FAST, "--lora", str(tmp_path / "evil.bin")], "holds pickled code")
    (tmp_path / "cut.bin").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    fails(capsys, ["sample", *FAST, "--lora", str(tmp_path / "cut.bin")], "cannot be read")
    weights = load_file(str(trained / "lora" / "pytorch_lora_weights.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, str(tmp_path / "nan.safetensors"))
    out = tmp_path / "samples"
    fails(capsys, ["sample", *FAST, "--lora", str(tmp_path / "nan.safetensors"), "--output-dir", str(out)],
          "holds NaN or inf weights")
    assert not out.exists()
    # a base_model.json of the wrong shape: the base model is not compared, and that is said
    lora = tmp_path / "lora"
    shutil.copytree(trained / "lora", lora)
    (lora / LORA_BASE_FILE).write_text("[1, 2]")
    spec = LoraSpec(arg=str(lora), file=lora / "pytorch_lora_weights.safetensors", weight=1.0, name="lora0")
    warn_other_base(None, [spec], None)
    assert "base-model record a training run writes (wrong shape: not a JSON object)" in caplog.text
    caplog.clear()  # ... and a damaged one (read_lora refuses it first, in `sample`): said alike, not passed over
    (lora / LORA_BASE_FILE).write_text('{"model": ')
    warn_other_base(None, [spec], None)
    assert "base-model record a training run writes (Expecting value" in caplog.text
    caplog.clear()  # a JSON object whose conv_in is no list: not compared (it raised), said as of the wrong shape
    (lora / LORA_BASE_FILE).write_text('{"model": "m", "conv_in": 3}')
    warn_other_base(None, [spec], None)
    assert "base-model record a training run writes (wrong shape): which model" in caplog.text
    # each other reader of base_model.json takes a record that is no JSON object, or has a list of settings, as damaged
    from lowmem_alignprop.lora.final_lora import lora_problem
    from lowmem_alignprop.lora.lora_files import read_lora
    from lowmem_alignprop.lora.base_records import recorded_base
    (lora / LORA_BASE_FILE).write_text("[1, 2]")
    with pytest.raises(UserError) as e:
        read_lora(str(lora))
    assert str(e.value) == (f"--lora {lora}: {LORA_BASE_FILE} is damaged (wrong shape: not a JSON object): export "
                            "from a complete lora/ folder")
    assert lora_problem(tmp_path) == f"{lora / LORA_BASE_FILE} is missing or damaged"  # (tmp_path: its run)
    caplog.clear()
    (lora / LORA_BASE_FILE).write_text('{"model": "m", "image_settings": [1]}')
    assert recorded_base(spec) is None
    assert f"--lora {lora}: {lora / LORA_BASE_FILE} cannot be read (" in caplog.text
    assert base_fingerprint.fingerprint_difference({"unet_config_sha": "s", "conv_in": ["a", {}]},
                                                   {"unet_config_sha": "s", "conv_in": [0.0]}) == (
        "its weights' record is unreadable")


def test_a_training_checkpoint_file_that_imports_code_is_refused_as_such(tmp_path):
    import torch

    class Code:
        def __reduce__(self):
            return (os.system, ("echo never run",))
    torch.save({"state": Code()}, tmp_path / "optimizer.pt")
    from lowmem_alignprop.settings.errors import UserError
    with pytest.raises(UserError, match="holds pickled code"):
        ckpt.load_tensors(tmp_path / "optimizer.pt")


def test_a_model_larger_than_host_memory_is_refused_on_a_cpu_before_it_loads(tmp_path, capsys, monkeypatch, caplog):
    """A CPU run holds the model in fp32: a denoiser larger than memory and swap together is refused before the model
    loads (it was killed partway through loading, with no message); larger than the memory free now, a warning. The
    tiny UNet's fp32 bytes against a machine made small: psutil's figures."""
    import logging
    from types import SimpleNamespace

    import psutil
    import torch

    from lowmem_alignprop.measure.meta_models import meta_base
    from lowmem_alignprop.measure.weight_bytes import check_host_memory
    from lowmem_alignprop.settings.config import Config

    cfg = Config(model="tiny").validate()
    need = sum(p.numel() for p in meta_base(cfg, torch.float32).unet.parameters()) * 4
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=need // 2, total=need // 2))
    monkeypatch.setattr(psutil, "swap_memory", lambda: SimpleNamespace(free=0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU run, on any machine
    out = tmp_path / "run"
    line = fails(capsys, [*FAST, "--output-dir", str(out)], f"tiny's UNet alone takes {need / 2**30:.1f} GiB in fp32")
    assert "more than this machine's" in line and "plan --model tiny --profile NAME" in line and not out.exists()
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    check_host_memory(cfg, available=need - 1, total=need * 4)  # fits with swap: said, not refused
    assert [r.levelname for r in caplog.records if "the run will swap" in r.getMessage()] == ["WARNING"]
    caplog.clear()
    check_host_memory(cfg, available=need, total=need)
    assert not caplog.records
    # two processes of a launcher on this machine hold two copies: what fitted once does not fit twice
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match=f"{2 * need / 2**30:.1f} GiB in this machine's 2 processes, more than"):
        check_host_memory(cfg, available=need, total=need)


def test_an_argument_the_locale_cannot_read_is_refused_before_anything_is_written(tmp_path, capsys):
    """A prompt file or profile named in Latin-1 (unzipped from an old Windows archive) reaches Python as lone
    surrogates: the file was read, the model loaded, and writing command.txt raised UnicodeEncodeError with a
    traceback, leaving config.yaml and an empty metrics.jsonl behind. Now one line names the argument and the fix."""
    from refusals import assert_refused

    prompts = tmp_path / "caf\udce9.txt"  # b"caf\xe9.txt" on disk
    prompts.write_text("a red triangle\n", encoding="utf-8")
    profile = tmp_path / "mine\udce9.yaml"
    profile.write_text("batch_size: 1\n", encoding="utf-8")
    fix = ("has bytes this locale cannot read (not UTF-8, or a non-UTF-8 locale such as LC_ALL=C with PYTHONUTF8=0): "
           "give it in UTF-8 (a file's name: convmv -f latin1 -t utf-8 --notest NAME renames it) or run in a UTF-8 "
           "locale (LC_ALL=C.UTF-8)")
    out = tmp_path / "run"
    for argv, line in (
            ([*FAST, "--prompts", str(prompts)], f"error: --prompts {str(prompts)!a} {fix}"),
            ([f"--profile={profile}", "--steps", "1"], f"error: --profile {str(profile)!a} {fix}"),
            (["sample", "--prompt", "un caf\udce9"], f"error: --prompt 'un caf\\udce9' {fix}")):
        assert_refused(main, [*argv, "--output-dir", str(out)], line, out, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([prompts.name, profile.name])


def test_every_test_the_bad_input_table_names_exists():
    """docs/bad_inputs.md's last column names the test of each row (test_file::test_name, or a name of the file
    named before it): a renamed or removed test leaves a row that claims a check no longer there."""
    import re

    tests = Path(__file__).parent
    defined = {f.stem: set(re.findall(r"^def (test_\w+)", f.read_text(encoding="utf-8"), re.M))
               for f in tests.glob("test_*.py")}
    everywhere = set().union(*defined.values())
    table = (tests.parent / "docs" / "bad_inputs.md").read_text(encoding="utf-8")
    gone = []
    for row in re.findall(r"^\| (\d+) \|.*\| ([^|]*) \|$", table, re.M):
        cited = re.sub(r"\[[^\]]*\]", "", row[1])  # (a parametrised case's id)
        for file, name in re.findall(r"\b(test_\w+)::(test_\w+)", cited):
            if name not in defined.get(file, ()):
                gone.append(f"row {row[0]}: {file}::{name}")
        for name in re.findall(r"(?<!::)\b(test_\w+)\b(?!::)", cited):
            if name not in everywhere and name not in defined:
                gone.append(f"row {row[0]}: {name}")
    assert len(re.findall(r"^\| \d+ \|", table, re.M)) > 150  # (the table was read)
    assert not gone, gone


def test_a_safetensors_file_under_another_suffix_is_told_to_be_renamed(tmp_path, capsys):
    """A .safetensors download renamed .bin or .ckpt (torch.load's "invalid load key" was said as a truncated or
    damaged file, to be copied again): `sample --lora`, `--init-lora` and `--model` name the rename, and write
    nothing. A torch file (zip or legacy pickle) is not taken for one."""
    import torch
    from safetensors.torch import save_file

    from lowmem_alignprop.run.tensor_files import safetensors_inside

    lora = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8),
            "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 4)}
    save_file(lora, str(tmp_path / "x.bin"))
    (tmp_path / "y.ckpt").write_bytes((tmp_path / "x.bin").read_bytes())
    out = tmp_path / "out"
    for args, line in (
            (["sample", *FAST, "--lora", str(tmp_path / "x.bin")],
             f"error: --lora {tmp_path / 'x.bin'}: {tmp_path / 'x.bin'} is a safetensors file under the suffix .bin: "
             "rename it to x.safetensors"),
            ([*FAST, "--init-lora", str(tmp_path / "y.ckpt"), "--steps", "1"],
             f"error: --init-lora {tmp_path / 'y.ckpt'}: {tmp_path / 'y.ckpt'} is a safetensors file under the suffix "
             ".ckpt: rename it to y.safetensors"),
            (["plan", *FAST, "--model", str(tmp_path / "y.ckpt")],
             f"error: {tmp_path / 'y.ckpt'} is a safetensors file under the suffix .ckpt: rename it to "
             "y.safetensors")):
        assert fails(capsys, [*args, "--output-dir", str(out)], line) == line
        assert not out.exists()
    torch.save(lora, tmp_path / "zip.bin")
    torch.save(lora, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    assert safetensors_inside(tmp_path / "x.bin") and not safetensors_inside(tmp_path / "zip.bin")
    assert not safetensors_inside(tmp_path / "legacy.bin") and not safetensors_inside(tmp_path / "missing.bin")
    assert not safetensors_inside(tmp_path)  # a folder: no file, not an error
    # a length that fits, then no JSON object; a header longer than the file (cut short): neither is one
    (tmp_path / "numbers.bin").write_bytes((4).to_bytes(8, "little") + b"[1,2]" + bytes(8))
    (tmp_path / "cut.bin").write_bytes((tmp_path / "x.bin").read_bytes()[:20])
    assert not safetensors_inside(tmp_path / "numbers.bin") and not safetensors_inside(tmp_path / "cut.bin")
    from lowmem_alignprop.run.tensor_files import TensorFileError, read_tensor_file
    (tmp_path / "z").write_bytes((tmp_path / "x.bin").read_bytes())  # no suffix: the line says so
    with pytest.raises(TensorFileError) as e:
        read_tensor_file(tmp_path / "z")
    assert e.value.misnamed
    assert e.value.detail == "a safetensors file under the suffix (none): rename it to z.safetensors"


@pytest.mark.parametrize("card, fix", [("rtx4090", "--profile rtx4090"),
                                       ("h100", "--profile a100-80gb --set card=h100")])
def test_a_gpu_card_on_the_cpu_profile_is_refused_not_timed_on_the_cpu(capsys, card, fix):
    """`plan --set card=rtx4090` on a laptop (--profile auto without a GPU is the cpu profile) timed the step on this
    CPU ("on cpu (1 thread)") and dropped the card in silence; a copy of the cpu profile planned it for the card."""
    line = fails(capsys, ["plan", "--profile", "cpu", "--model", "tiny", "--set", f"card={card}"], f"card={card}")
    assert line == (f"error: card={card} times the step on that card, and profile cpu plans for this machine's CPU "
                    f"(fp32, its RAM as the budget): for the card pass its profile ({fix}; `lowmem-alignprop "
                    "profiles` lists them), or --device cuda for the cpu profile's settings on it")

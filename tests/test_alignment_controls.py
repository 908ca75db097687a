"""Issue 16, aligning without over-optimising: the KL term to the base model, DRaFT-LV, EMA, held-out evaluation
with best/ and early stop, named recipes. Numbers, not smoke: the KL keeps the LoRA nearer the base, its gradient
is autograd's, its memory is measured; lv_draws=1 is today's step bit for bit and more draws lower the variance."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
import torch

from loras import nudge
from numerics import SAME_OPS, assert_rel_close
from refusals import frozen_base_copy, strict_rows, timed_mean

from lowmem_alignprop.models.loading import add_lora, load_components
from lowmem_alignprop.models.sampling import (PromptEmbeds, decode, enable_block_checkpointing, guided_eps,
                                              initial_latents, rollout)
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.step.rollout import loss_from_reward, rollout_loss

NO_STAGE = lambda name: contextlib.nullcontext()  # noqa: E731


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    cfg = Config(model=str(tiny_dir), sample_steps=4, k=2, guidance_scale=4.0, resolution=64, batch_size=2)
    comps = load_components(cfg)
    comps.vae.requires_grad_(False)
    params = add_lora(comps.unet, rank=4, alpha=4, seed=0)
    nudge(params)  # lora_B starts at zero
    emb = PromptEmbeds(torch.randn(2, 16, 32), torch.randn(2, 16, 32))
    return cfg, comps, params, emb


def _step(cfg, comps, params, emb, seed, terms=None):
    """One micro-step's loss and LoRA gradients through rollout_loss (what the trainer and the planner run)."""
    g = torch.Generator().manual_seed(seed)
    lat = initial_latents(cfg.batch_size, comps.unet, comps.vae, cfg.resolution, g, "cpu")
    loss, rewards = rollout_loss(cfg, comps.unet, comps.unet, comps.scheduler, comps.vae, brightness, lat, emb,
                                 ["a", "b"], k=cfg.k, generator=g, stage=NO_STAGE, terms=terms)
    return loss, rewards, torch.autograd.grad(loss, params)




# -- KL to the base -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("blocks", "rescale"), [(False, 0.0), (True, 0.0), (False, 0.7)],
                         ids=["per_call", "per_block", "guidance_rescale"])
def test_kl_gradient_is_autograds(tiny, blocks, rescale):
    """The KL term's gradient (two checkpoints per window step, the base call with the adapter switched off, also
    inside per-block checkpoints that recompute long after the call) equals plain autograd with a separate
    base model and no checkpoints; with guidance_rescale both predictions are rescaled."""
    cfg, comps, params, emb = tiny
    unet = copy.deepcopy(comps.unet) if blocks else comps.unet
    lora = [p for p in unet.parameters() if p.requires_grad]
    if blocks:
        enable_block_checkpointing(unet)
    sched = comps.scheduler
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(3)
    kl: list = []
    rollout(unet, sched, torch.randn(2, 4, 32, 32, generator=g), emb, k=2, guidance_scale=4.0, eta=1.0,
            generator=g, kl=kl, guidance_rescale=rescale)
    ours = torch.autograd.grad(torch.stack(kl).sum(), lora)
    assert all(p.requires_grad for p in lora)  # the switch gave every adapter weight its flag back

    base = frozen_base_copy(comps.unet)
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(2, 4, 32, 32, generator=g)
    ts = list(sched.timesteps)
    with torch.no_grad():
        for t in ts[:2]:
            eps = guided_eps(comps.unet, lat, t, emb, 4.0, guidance_rescale=rescale)
            lat = sched.step(eps, t, lat, eta=1.0, generator=g).prev_sample
    terms = []
    for t in ts[2:]:
        eps = guided_eps(comps.unet, lat, t, emb, 4.0, guidance_rescale=rescale)
        terms.append((eps - guided_eps(base, lat, t, emb, 4.0, guidance_rescale=rescale)).pow(2).mean())
        lat = sched.step(eps, t, lat, eta=1.0, generator=g).prev_sample
    reference = torch.autograd.grad(torch.stack(terms).sum(), params)
    assert torch.cat([r.flatten() for r in reference]).norm() > 0
    assert_rel_close(ours, reference, SAME_OPS, "KL gradient vs autograd")


def _distance_to_base(comps, emb) -> float:
    """mean((eps_lora - eps_base)^2) over a fixed batch of latents at three noise levels."""
    base = frozen_base_copy(comps.unet)
    g = torch.Generator().manual_seed(11)
    lat = torch.randn(2, 4, 32, 32, generator=g)
    with torch.no_grad():
        return sum((guided_eps(comps.unet, lat, t, emb, 4.0) - guided_eps(base, lat, t, emb, 4.0)).pow(2).mean()
                   .item() for t in (751, 501, 251)) / 3


def test_kl_keeps_the_lora_nearer_the_base(tiny):
    """Three AdamW steps (lr 1e-2) from the same start on the brightness reward: with kl_coeff the LoRA's predictions
    stay nearer the base model's than without (the distance the KL term penalises, at three noise levels). Measured:
    0.0025 against 0.144 (a ratio of 0.017; eight steps at lr 3e-3: 0.012); held at 0.2."""
    cfg, comps, params, emb = tiny
    start = [p.detach().clone() for p in params]
    distance = {}
    for coeff in (0.0, 50.0):
        run = dataclasses.replace(cfg, kl_coeff=coeff)
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        kls = []
        for step in range(3):
            terms: dict = {}
            loss, _, grads = _step(run, comps, params, emb, seed=100 + step, terms=terms)
            for p, gr in zip(params, grads):
                p.grad = gr
            opt.step()
            kls.append(terms.get("kl"))
        assert (kls[0] is None) == (coeff == 0)  # the metrics see the KL term only when it is on
        assert all(k is None or k.grad_fn is None for k in kls)  # detached: the metrics hold no graph of the step
        distance[coeff] = _distance_to_base(comps, emb)
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    print(f"distance to the base after 3 steps: {distance}")
    assert distance[50.0] < 0.2 * distance[0.0], distance


def test_kl_costs_time_not_memory(tiny):
    """A whole micro-step (rollout, decode, reward, backward) with and without the KL term, every live tensor
    storage counted: the base model's calls are their own checkpoints, so the peak grows only by the few
    latent-sized tensors each window step keeps (under 2%)."""
    from lowmem_alignprop.measure.storage_counter import StorageCounter

    cfg, comps, params, emb = tiny
    peaks = {}
    for coeff in (0.0, 1.0):
        with StorageCounter() as counter:
            _step(dataclasses.replace(cfg, kl_coeff=coeff), comps, params, emb, seed=5)
        peaks[coeff] = counter.peak
    print(f"peak bytes without / with KL: {peaks}")
    assert peaks[1.0] <= 1.02 * peaks[0.0], peaks


# -- DRaFT-LV -------------------------------------------------------------------------------------------------

def test_one_lv_draw_is_todays_step_bit_for_bit(tiny):
    """lv_draws=1 (and kl_coeff=0) is the step as it was before issue 16, written out here: the DDIM chain with one
    checkpoint per window call, decode, reward, loss; equal to the last bit, loss and gradients."""
    from torch.utils.checkpoint import checkpoint

    cfg, comps, params, emb = tiny
    loss, rewards, grads = _step(cfg, comps, params, emb, seed=7)

    g = torch.Generator().manual_seed(7)
    lat = initial_latents(cfg.batch_size, comps.unet, comps.vae, cfg.resolution, g, "cpu")
    sched = comps.scheduler
    sched.set_timesteps(cfg.sample_steps)
    ts = sched.timesteps
    with torch.no_grad():
        for t in ts[:cfg.sample_steps - cfg.k]:
            eps = guided_eps(comps.unet, lat, t, emb, cfg.guidance_scale)
            lat = sched.step(eps, t, lat, eta=cfg.eta, generator=g).prev_sample
    lat = lat.detach()
    for t in ts[cfg.sample_steps - cfg.k:]:
        eps = checkpoint(guided_eps, comps.unet, lat, t, emb, cfg.guidance_scale, use_reentrant=False)
        lat = sched.step(eps, t, lat, eta=cfg.eta, generator=g).prev_sample
    ref_rewards = brightness(decode(comps.vae, lat), ["a", "b"]).float()
    ref_loss = loss_from_reward(ref_rewards, cfg)
    ref_grads = torch.autograd.grad(ref_loss, params)
    assert torch.equal(loss, ref_loss) and torch.equal(rewards, ref_rewards)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_more_lv_draws_lower_the_gradient_variance(tiny_dir):
    """The shipped (trained) toy model, K=1, a trailing timestep schedule (its last step starts at t=249, where the
    re-noised draws differ): the LoRA gradient's variance over 8 seeds (the same seeds for both) drops with 4
    draws. The extra draws are independent given the sampled image, so only their share of the variance goes."""
    from lowmem_alignprop.models.sampling import ddim_scheduler, encode_prompts, make_pipeline
    import lowmem_alignprop.toy as toy

    cfg = Config(model=str(Path(toy.__file__).parent / "weights" / "model"), sample_steps=4, k=1,
                 guidance_scale=3.0, resolution=64, batch_size=2)
    comps = load_components(cfg)
    comps.scheduler = ddim_scheduler({**comps.scheduler.config, "timestep_spacing": "trailing"})
    comps.vae.requires_grad_(False)
    params = add_lora(comps.unet, rank=4, alpha=4, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    prompts = ["two red circles", "one blue square"]
    emb = encode_prompts(make_pipeline(comps), prompts, "cpu", 64)

    def red_minus_blue(images, prompts):
        return images[:, 0].mean(dim=(1, 2)) - images[:, 2].mean(dim=(1, 2))

    variance = {}
    for draws in (1, 4):
        run = dataclasses.replace(cfg, lv_draws=draws)
        grads = []
        for seed in range(8):
            g = torch.Generator().manual_seed(seed)
            lat = initial_latents(2, comps.unet, comps.vae, 64, g, "cpu")
            loss, rewards = rollout_loss(run, comps.unet, comps.unet, comps.scheduler, comps.vae, red_minus_blue,
                                         lat, emb, prompts, k=1, generator=g, stage=NO_STAGE)
            assert rewards.shape == (2,)  # the metrics see the sampled images' rewards, not the extra draws'
            grads.append(torch.cat([x.flatten() for x in torch.autograd.grad(loss, params)]))
        variance[draws] = torch.stack(grads).double().var(0).sum().item()
    print(f"gradient variance over 8 seeds by draws: {variance}")
    assert variance[4] < 0.95 * variance[1], variance


# -- EMA, held-out evaluation, best/, early stop, resume --------------------------------------------------

REWARD = '''
def score(images, prompts):
    """Brightness, except on night prompts, where darkness scores: training on bright prompts makes the held-out
    night prompts worse with every step (a reward over-optimised, in miniature)."""
    bright = images.mean((1, 2, 3))
    night = [("night" in p or "dark" in p) for p in prompts]
    return torch.stack([1 - b if n else b for b, n in zip(bright, night)])
'''

FAST_EVAL = ["--profile", "cpu", "--seed", "4", "--set", "sample_prompts=0", "--set", "sample_steps=2", "--set", "k=1",
             "--set", "batch_size=2"]
RUN = ["--profile", "cpu", "--seed", "4", "--set", "sample_prompts=0", "--set", "sample_steps=3", "--set", "k=1",
       "--set", "batch_size=2", "--set", "lr=0.05", "--reward", "night_reward:score"]


@pytest.fixture
def night(tmp_path, monkeypatch, fresh_log_handlers):
    (tmp_path / "night_reward.py").write_text("import torch\n" + REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "train.txt").write_text("a sunny beach\na bright field\na white room\n")
    (tmp_path / "eval.txt").write_text("a night sky\na dark cave\n")
    return RUN + ["--prompts", str(tmp_path / "train.txt"), "--set", f"eval_prompts={tmp_path / 'eval.txt'}"]


def _lora(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def test_evaluation_peaking_early_keeps_that_step_in_best_and_stops(night, tmp_path, capsys, monkeypatch):
    """eval_every 1, early_stop 2: the held-out reward falls after its first evaluation, so step 1 goes to best/
    (its LoRA equal to a 1-step run's), steps 2 and 3 do not improve on it, and the run ends at step 3 of 8; the
    before/after grid goes to the tracker at step 3 (it went at the planned last step, 8)."""
    from lowmem_alignprop.cli import main
    from lowmem_alignprop.training import train, train_outputs, train_samples

    from lowmem_alignprop.measure.profiler import StageProfiler

    logged, aside = [], []
    for module in (train, train_samples, train_outputs):  # the grids during training, the before/after one at the end
        monkeypatch.setattr(module, "log_images", lambda acc, to, grid, tag, step: logged.append((tag, step)))
    real_aside = StageProfiler.set_aside
    monkeypatch.setattr(StageProfiler, "set_aside", lambda self, s: aside.append(s) or real_aside(self, s))
    out = tmp_path / "run"
    assert main([*night, "--output-dir", str(out), "--steps", "8", "--eval-every", "1", "--early-stop", "2",
                 "--set", "sample_prompts=1"]) == 0
    assert logged == [("samples/before_after", 3)]
    assert len(aside) == 3 and min(aside) > 0  # each evaluation's time is not its step's (memory_report, step line)
    rows = strict_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    objective = [r["eval_objective"] for r in rows]
    assert objective[0] > max(objective[1:]), objective  # the evaluation peaked at step 1 ...
    assert rows[-1]["eval_since_best"] == 2 and rows[-1]["eval_best_step"] == 1
    assert rows[-1]["reward_mean"] > rows[0]["reward_mean"]  # ... while the training reward kept rising
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] == 1 and best["eval_reward"] == rows[0]["eval_reward"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["early_stopped_at"] == 3 and not summary["interrupted"] and summary["best_step"] == 1
    # its time per step is over the steps it ran (not the 8 it planned), but the warm-up and the counted step
    assert summary["seconds_per_step"] == pytest.approx(timed_mean(out, rows), rel=1e-9)
    assert summary["seconds_per_step"] == pytest.approx(rows[2]["seconds"], rel=1e-9)  # step 1 warm-up, 2 counted
    assert (out / "checkpoints" / "step-00000003").is_dir()  # the stop saved its step
    assert (" early stop at step 3 of 8: the held-out evaluation (eval_reward) had not improved for 2 evaluations"
            in capsys.readouterr().out)
    metrics = (out / "metrics.jsonl").read_text()
    # the advice followed as printed: --early-stop alone, the run's own eval_every (it was refused by the defaults')
    args = [*night, "--output-dir", str(out), "--steps", "8", "--resume", "latest"]
    capsys.readouterr()
    assert main([*args, "--early-stop", "2"]) == 2  # its patience is spent: a resume trains no step and says why
    assert [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")] == [
        f"error: checkpoint {out / 'checkpoints' / 'step-00000003'} is where the run stopped early (its held-out "
        "evaluation had not improved for 2 evaluations; the best step, 1, is in best/): nothing left to train; to "
        "train on, resume with --early-stop above 2, or --set early_stop=0"]
    assert (out / "metrics.jsonl").read_text() == metrics
    # its LoRA and summary lost (a kill or a full disk while they were written): a resume writes them again from
    # step 3's checkpoint and trains no step
    written = _lora(out / "lora")
    shutil.rmtree(out / "lora")
    (out / "summary.json").unlink()
    assert main([*args, "--early-stop", "2"]) == 0
    again = _lora(out / "lora")
    assert again.keys() == written.keys() and all(torch.equal(again[k], written[k]) for k in again)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["early_stopped_at"] == 3 and summary["steps_done"] == 3 and not summary["interrupted"]
    assert summary["best_step"] == 1 and (out / "metrics.jsonl").read_text() == metrics
    assert main([*args, "--early-stop", "3"]) == 0  # more patience: one more evaluation without improving, then stop
    assert [r["step"] for r in strict_rows(out)] == [1, 2, 3, 4] and strict_rows(out)[-1]["eval_since_best"] == 3

    one = tmp_path / "one"
    assert main([*night, "--output-dir", str(one), "--steps", "1"]) == 0
    a, b = _lora(out / "best"), _lora(one / "lora")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], _lora(out / "lora")[k]) for k in a)  # lora/ is step 3's, not the best


def test_best_and_patience_follow_the_line_a_resume_continues(night, tmp_path, capsys, caplog):
    """brightness on the held-out prompts rises with training: best/ is the newest evaluated step. A resume of an
    older checkpoint (a branch) left best/ of the abandoned steps while the summary named the older best step; a
    resume into a new folder named a best/ that was never written, and called the profile "resumed"; a resume with
    another reward compared its evaluations with the old reward's best (and stopped early on it). Now best/ holds the
    best step's LoRA of the line trained (the other moved aside), and a changed measure starts best/ and the
    patience over."""
    from lowmem_alignprop.cli import main

    bright = [*night, "--reward", "brightness", "--eval-every", "1", "--set", "keep_checkpoints=0",
              "--checkpoint-every", "1"]
    out = tmp_path / "run"
    assert main([*bright, "--output-dir", str(out), "--steps", "3"]) == 0
    evals = [r["eval_objective"] for r in strict_rows(out)]
    assert evals == sorted(evals) and json.loads((out / "best" / "best.json").read_text())["step"] == 3  # premise
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")

    def best_step(run):
        summary = json.loads((run / "summary.json").read_text())
        assert json.loads((run / "best" / "best.json").read_text())["step"] == summary["best_step"], run
        return summary["best_step"]

    # a new folder from step 2: best/ written from that step's checkpoint, then step 3's evaluation replaces it
    new = tmp_path / "new"
    assert main(["--resume", str(out / "checkpoints" / "step-00000002"), "--output-dir", str(new)]) == 0
    assert "resume: best/ (step 2) written from" in caplog.text and best_step(new) == 3
    assert yaml.safe_load((new / "config.yaml").read_text())["profile"] == "cpu"
    # a new folder from step 3, which the origin's best/ holds: copied from there
    newer = tmp_path / "newer"
    assert main(["--resume", str(out / "checkpoints" / "step-00000003"), "--output-dir", str(newer), "--steps",
                 "4"]) == 0
    assert f"resume: best/ (step 3) copied from {out / 'best'}" in caplog.text and best_step(newer) in (3, 4)
    # a branch from step 1 with one step to go (--steps 2): step 3's best/ moves aside, step 1's comes back first
    assert main([*bright, "--output-dir", str(out), "--steps", "2", "--resume",
                 str(out / "checkpoints" / "step-00000001")]) == 0
    assert json.loads((out / "best-before-step-2" / "best.json").read_text())["step"] == 3
    assert best_step(out) == 2
    # another reward: its evaluations start best/ and the patience over (the old best would have stopped it early)
    caplog.clear()
    assert main([*night, "--output-dir", str(out), "--steps", "4", "--eval-every", "1", "--early-stop", "1",
                 "--resume", "latest"]) == 0
    assert "the held-out evaluation's reward changed since the checkpoint: best/ and the early stop's patience start " \
           "over" in caplog.text
    rows = strict_rows(out)
    assert rows[2]["eval_best_step"] == 3 and rows[2]["eval_since_best"] == 0  # step 3: the new measure's first
    assert best_step(out) == 3 and (out / "best-before-step-3").is_dir()


def test_a_kill_between_best_and_its_checkpoint_leaves_no_repeated_best_aside(night, tmp_path, caplog):
    """A kill after step 3's best/ was written and before its checkpoint: the resume sets best/ (step 3) aside and
    trains step 3 again to the same weights; the set-aside copy repeated best/ (one more for each such kill). It is
    removed when the weights are equal bit for bit, and kept when they are not (a branch's)."""
    from lowmem_alignprop.cli import main
    from lowmem_alignprop.run import atomic

    bright = [*night, "--reward", "brightness", "--eval-every", "1", "--set", "keep_checkpoints=0",
              "--checkpoint-every", "1", "--steps", "3"]
    out = tmp_path / "run"
    assert main([*bright, "--output-dir", str(out)]) == 0
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 3  # (premise: brightness rises)
    before = _lora(out / "best")
    for gone in ("checkpoints/step-00000003", "lora", "summary.json"):  # as the kill left the run
        atomic.remove_dir(out / gone) if (out / gone).is_dir() else (out / gone).unlink()
    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    assert main([*bright, "--output-dir", str(out), "--resume", "latest"]) == 0
    assert "moved to" in caplog.text and "which this run trained again to the same weights: removed" in caplog.text
    assert not list(out.glob("best-*")) and json.loads((out / "best" / "best.json").read_text())["step"] == 3
    after = _lora(out / "best")
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    # other weights under the same step (here: best/ edited as a branch's would differ): kept aside
    (out / "checkpoints/step-00000003").rename(tmp_path / "step-3")
    for gone in ("lora", "summary.json"):
        atomic.remove_dir(out / gone) if (out / gone).is_dir() else (out / gone).unlink()
    weights = next((out / "best").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    assert main([*bright, "--output-dir", str(out), "--resume", "latest"]) == 0
    assert [p.name for p in out.glob("best-*")] == ["best-before-step-3"]


def test_a_best_step_without_a_lora_kept_is_said_until_a_better_evaluation_writes_one(tmp_path, caplog):
    """keep_best_of with no best/ or checkpoint of the best step (rotated away; a full fine-tune's checkpoint holds
    no LoRA, and its resume must not fail on it): best_kept is False, and the next better evaluation's best/ makes it
    True again (the summary and the early stop read it)."""
    from lowmem_alignprop.training.evaluation import HeldOut

    def write_lora(folder):
        (folder / "pytorch_lora_weights.safetensors").write_bytes(b"weights")

    for train_unet in ("lora", "full"):
        out = tmp_path / train_unet
        (out / "checkpoints" / "step-00000002").mkdir(parents=True)  # a full fine-tune's (or damaged): no LoRA
        held = HeldOut(Config(eval_every=1, train_unet=train_unet), ["a night sky"], out, sample=None,
                       write_lora=write_lora)
        held.load_state({"best": -0.2, "best_step": 2, "best_reward": 0.2, "since_best": 0})
        caplog.clear()
        held.keep_best_of(3, None)
        assert not held.best_kept and "the best held-out evaluation so far (step 2) has no LoRA kept" in caplog.text
        held.after_evaluation(4, {"eval_objective": -0.1, "eval_reward": 0.1}, is_main=True)
        assert held.best_kept and json.loads((out / "best" / "best.json").read_text())["step"] == 4


def test_best_written_again_from_a_checkpoint_names_its_measure_by_best_by(tmp_path, monkeypatch):
    """keep_best_of writing best/ from the best step's checkpoint (best/ lost, or a resume into a new folder): the
    best.json it writes names the figure the run chose by under its own key. With best_by=fidelity that is
    eval_fidelity_score (0.625), not eval_objective (the reward's objective, 70.5 here, which the state does not
    keep)."""
    from lowmem_alignprop.training.evaluation import HeldOut
    from lowmem_alignprop.models import loading

    def write_checkpoint_lora(checkpoint, folder):
        (folder / "pytorch_lora_weights.safetensors").write_bytes(b"weights of " + checkpoint.name.encode())

    monkeypatch.setattr(loading, "write_checkpoint_lora", write_checkpoint_lora)
    for best_by, key in (("fidelity", "eval_fidelity_score"), ("reward", "eval_objective")):
        out = tmp_path / best_by
        (out / "checkpoints" / "step-00000004").mkdir(parents=True)
        held = HeldOut(Config(eval_every=2, best_by=best_by), ["a red circle"], out, sample=None, write_lora=None)
        held.load_state({"best": 0.625, "best_step": 4, "best_reward": 72.5, "since_best": 1})
        held.keep_best_of(6, None)
        record = json.loads((out / "best" / "best.json").read_text())
        assert held.best_kept and (out / "best" / "pytorch_lora_weights.safetensors").read_bytes() == \
            b"weights of step-00000004"
        assert {k: v for k, v in record.items() if k != "from"} == {"step": 4, "eval_reward": 72.5, key: 0.625}


def test_the_held_out_evaluation_renders_every_prompt_with_the_same_seeds_and_averages_them_all(tmp_path):
    """HeldOut.evaluate on 5 held-out prompts in chunks of batch_size 2: image n with seed + EVAL_SEED_OFFSET + n, the
    same seeds at every evaluation (else two steps' figures compare other images); eval_reward and its std over all 5
    images; eval_objective -loss (reward_target: the mean distance); each evaluator gets every image with its own
    prompt. Then best/ and the early stop: a better step resets the patience, early_stop=2 stops at the 2nd
    evaluation without improvement, and best/ records the reward (not the objective)."""
    from lowmem_alignprop.training.evaluation import EVAL_SEED_OFFSET, HeldOut

    prompts = ["a", "b", "c", "d", "e"]
    value = {p: float(i) for i, p in enumerate(prompts)}  # each image's reward: its prompt's index (+ an offset)
    calls, seen, offset = [], [], {"now": 0.0}

    def sample(chunk, seed):
        calls.append((list(chunk), seed))
        imgs = torch.stack([torch.full((3, 2, 2), value[p]) for p in chunk])
        return imgs, torch.tensor([value[p] + offset["now"] for p in chunk])

    def evaluator(images, names):
        seen.append(names)
        return {"eval_match": float(all(img.mean().item() == value[p] for img, p in zip(images, names)))}

    cfg = Config(seed=7, batch_size=2, eval_every=1, early_stop=2, reward_target=3.0).validate()
    held = HeldOut(cfg, prompts, tmp_path, sample=sample, write_lora=lambda folder: None)
    held.evaluators.append(evaluator)
    first = held.evaluate()
    seeds = [7 + EVAL_SEED_OFFSET + n for n in range(5)]
    assert calls == [(["a", "b"], seeds[:2]), (["c", "d"], seeds[2:4]), (["e"], seeds[4:])]
    assert first["eval_reward"] == pytest.approx(2.0) and first["eval_reward_std"] == pytest.approx(2 ** 0.5)
    assert first["eval_objective"] == pytest.approx(-(3 + 2 + 1 + 0 + 1) / 5)  # -mean |reward - 3|
    assert first["eval_match"] == 1.0 and seen == [prompts]
    calls.clear()
    offset["now"] = 1.0
    second = held.evaluate()
    assert [s for _, chunk in calls for s in chunk] == seeds and second["eval_reward"] == pytest.approx(3.0)
    # steps 1-5, objective: -1.4, -2.0 (patience 1), -1.2 (better: 0 again), -1.4, -2.0 (2 without improving: stop)
    for step, shift in enumerate((0.0, -1.0, 1.0, 0.0, -1.0), start=1):
        offset["now"] = shift
        held.after_evaluation(step, held.evaluate(), is_main=True)
        assert (held.best_step, held.since_best) == ((1, 0), (1, 1), (3, 0), (3, 1), (3, 2))[step - 1], step
        assert held.exhausted == (step == 5), step
    assert held.best_reward == pytest.approx(3.0) and held.best == pytest.approx(-1.2)
    assert json.loads((tmp_path / "best" / "best.json").read_text())["eval_reward"] == pytest.approx(3.0)


def test_resume_restores_ema_and_the_best_so_far(night, tmp_path):
    """4 steps at once == 2 steps + 2 resumed, with an EMA (lora/ holds the average) and evaluation every step:
    the same lora/, the same best/ (an early step: a resume that forgot the best so far would put step 3 there), the same
    eval metrics; the last checkpoint's LoRA is lora/'s."""
    from lowmem_alignprop.cli import main

    extra = ["--eval-every", "1", "--set", "ema_decay=0.9"]
    full, split = tmp_path / "full", tmp_path / "split"
    assert main([*night, *extra, "--output-dir", str(full), "--steps", "4"]) == 0
    assert main([*night, *extra, "--output-dir", str(split), "--steps", "2"]) == 0
    point = split / "checkpoints" / "step-00000002"
    assert (point / "ema.pt").is_file()
    best_step = json.loads((point / "state.json").read_text())["evaluation"]["best_step"]
    a = strict_rows(full)
    print("eval_objective by step:", [r["eval_objective"] for r in a])
    # the test's premise: the best step comes before the resume and the steps after it are worse, so a resume that
    # forgot the best so far would move best/ to step 3
    assert best_step <= 2 and a[best_step - 1]["eval_objective"] > max(r["eval_objective"] for r in a[2:])
    assert main(["--output-dir", str(split), "--steps", "4", "--resume", "latest"]) == 0
    b = strict_rows(split)
    assert [r["eval_reward"] for r in a] == pytest.approx([r["eval_reward"] for r in b], abs=1e-6)
    for name in ("best", "lora"):
        x, y = _lora(full / name), _lora(split / name)
        assert x.keys() == y.keys()
        assert max((x[k] - y[k]).abs().max().item() for k in x) < 1e-6, name
    assert json.loads((split / "best" / "best.json").read_text())["step"] == best_step
    trained = ckpt_weights(split / "checkpoints" / "step-00000004")
    ema_lora = _lora(split / "lora")
    assert sum(t.abs().sum().item() for t in trained.values()) != pytest.approx(
        sum(t.abs().sum().item() for t in ema_lora.values()))  # lora/ is the average, not the last weights
    # the last checkpoint's LoRA, as export, sample and evaluate read it, is lora/'s: the average (it was the trained
    # weights, while its model card showed the EMA's sample images)
    from lowmem_alignprop.models.loading import write_checkpoint_lora
    as_read = _lora(write_checkpoint_lora(split / "checkpoints" / "step-00000004", tmp_path / "read").parent)
    assert as_read.keys() == ema_lora.keys() and all(torch.equal(as_read[k], ema_lora[k]) for k in ema_lora)
    # and export writes a lost lora/ again from it (it left an EMA run's lora/ missing: the average was not there)
    from lowmem_alignprop.lora.final_lora import rewrite_from_checkpoint
    shutil.rmtree(split / "lora")
    assert rewrite_from_checkpoint(split).name == "step-00000004"
    again = _lora(split / "lora")
    assert again.keys() == ema_lora.keys() and all(torch.equal(again[k], ema_lora[k]) for k in ema_lora)


def test_a_resume_that_lost_the_best_steps_lora_says_so_in_its_summary(night, tmp_path, capsys):
    """best/ gone before a resume and no checkpoint of the best step left (only the last one is kept): the run goes
    on with its best so far, and summary.json and the box say that step's LoRA is not kept (not a best/ that is not
    there)."""
    from lowmem_alignprop.cli import main

    run = tmp_path / "run"
    assert main([*night, "--eval-every", "1", "--output-dir", str(run), "--steps", "2"]) == 0
    state = json.loads((run / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["evaluation"]["best_step"] == 1  # the premise: the best step has no checkpoint of its own
    shutil.rmtree(run / "best")
    capsys.readouterr()
    assert main(["--output-dir", str(run), "--steps", "3", "--resume", "latest"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["best_step"], summary["best_kept"]) == (1, False) and not (run / "best").exists()
    assert "its LoRA is not kept" in capsys.readouterr().out


def test_the_trainer_logs_the_kl_term(night, tmp_path):
    """A 2-step run with kl_coeff: metrics.jsonl has the KL term, zero at step 1 (LoRA's B starts at zero, so the
    adapter changes nothing yet) and above zero once the first update moved it."""
    from lowmem_alignprop.cli import main

    out = tmp_path / "run"
    assert main([*night, "--output-dir", str(out), "--steps", "2", "--set", "kl_coeff=1"]) == 0
    rows = strict_rows(out)
    assert rows[0]["kl"] == 0 and rows[1]["kl"] > 0


def test_the_toy_world_holds_out_its_fuller_scenes_and_no_evaluation_prompt_trains():
    """--eval-every on the toy model's default: its four training prompts leave none to hold out, so it evaluates on
    toy-heldout's captions (the same pairs in fuller scenes), less the two that are also training prompts."""
    from lowmem_alignprop.settings.profiles import resolve_config
    from lowmem_alignprop.step.inputs import split_eval_prompts
    from lowmem_alignprop.step.prompts import load_prompts

    _, cfg = resolve_config("cpu", {"model": "toy", "eval_every": 1}, [])
    assert cfg.eval_prompts == "toy-heldout"
    train, held = split_eval_prompts(cfg, load_prompts(cfg.prompts))
    assert train == load_prompts("toy-pairs") and len(held) == 62 and not set(held) & set(train)
    assert set(load_prompts("toy-heldout")) - set(held) == {"a green circle", "a blue diamond"}


PROMPTS = ["a red circle", "A red  circle", "a blue square", "a green triangle", "a yellow star", "a white moon",
           "a black cat", "a brown dog"]


def test_prompts_that_differ_in_case_or_spacing_are_held_out_together():
    """"A red  circle" is "a red circle" to CLIP's tokenizer: the held-out split and the eval_prompts overlap treat
    them as one prompt (one was held out while its twin trained)."""
    from lowmem_alignprop.step.inputs import prompt_key, split_eval_prompts

    for seed in range(12):
        cfg = Config(eval_every=1, eval_holdout=3, seed=seed)
        train, held = split_eval_prompts(cfg, PROMPTS)
        assert len(held) == 3 and not {prompt_key(p) for p in held} & {prompt_key(p) for p in train}, (seed, held)
        assert len(train) + len(held) + ("a red circle" in held) == len(PROMPTS)  # both twins, one held-out entry
    with pytest.raises(UserError, match="7 distinct training prompts"):  # 8 lines, 7 prompts
        split_eval_prompts(Config(eval_every=1, eval_holdout=7), PROMPTS)


def test_a_resume_keeps_the_prompts_its_run_held_out_whatever_its_flags(tmp_path):
    """A resume with another seed drew other held-out prompts, some of them trained on in the first steps, and
    trained on some held out; adding --eval-every to a run that held nothing out evaluated prompts it had trained on
    (now refused, unless eval_prompts gives others)."""
    from lowmem_alignprop.step.inputs import split_eval_prompts

    started = Config(eval_every=2, eval_holdout=2, seed=0)
    first = split_eval_prompts(started, PROMPTS)
    for resumed in (Config(eval_every=2, eval_holdout=2, seed=5), Config(eval_every=2, eval_holdout=3, seed=1)):
        assert split_eval_prompts(resumed, PROMPTS, started=started.to_dict()) == first
        assert split_eval_prompts(resumed, PROMPTS) != first  # (the premise: the seed draws others)
    # evaluation dropped on a resume: the prompts set aside still never train
    assert split_eval_prompts(Config(seed=5), PROMPTS, started=started.to_dict()) == (first[0], [])
    with pytest.raises(UserError, match="trained on every one of its prompts.*eval_prompts=FILE"):
        split_eval_prompts(Config(eval_every=2), PROMPTS, started=Config().to_dict())
    # a resume on a prompt file too small to hold the run's evaluation out: said so (it blamed an --eval-every the
    # resume did not give and a run that had held prompts out)
    with pytest.raises(UserError, match=r"have 2 distinct, and the run holds out eval_holdout=2 of them for its "
                                        r"evaluation \(eval_every=2\), which leaves none to train on: give more "
                                        r"prompts, .*, or --eval-every 0"):
        split_eval_prompts(Config(eval_every=2, eval_holdout=2), PROMPTS[2:4], started=started.to_dict())
    (tmp_path / "eval.txt").write_text("a RED circle\na night sky\n")  # a twin of a training prompt is left out
    assert split_eval_prompts(Config(eval_every=2, eval_prompts=str(tmp_path / "eval.txt")), PROMPTS,
                              started=Config().to_dict()) == (PROMPTS, ["a night sky"])


def test_a_resume_on_an_edited_prompt_file_holds_out_what_its_run_held_out():
    """Lines removed and added since the checkpoint: drawn again from the edited file, the held-out set took prompts
    the run had trained on (evaluated as 'held out') and trained one it had held out. The checkpoint's record
    (split_settings) keeps the set: the held-out prompts still in the file stay out, the new lines train, and a file
    that no longer holds any of them is refused."""
    from lowmem_alignprop.step.inputs import (HELD_OUT_KEYS, held_out_of_training, prompt_key, split_eval_prompts,
                                              split_settings)

    cfg = Config(eval_every=2, eval_holdout=2, seed=0)
    first_train, first_held = split_eval_prompts(cfg, PROMPTS)
    state = {"config": cfg.to_dict(), HELD_OUT_KEYS: sorted(held_out_of_training(cfg.to_dict(), PROMPTS))}
    edited = [p for p in PROMPTS if p != first_train[-1]] + ["a grey owl", "a pink flamingo"]
    drawn_again = split_eval_prompts(cfg, edited, started=cfg.to_dict())[1]
    assert drawn_again != first_held  # (the premise: the edited file draws others, one of them trained)
    train, held = split_eval_prompts(cfg, edited, started=split_settings(state))
    assert held == first_held and train == [p for p in edited if p not in first_held]
    assert {"a grey owl", "a pink flamingo"} <= set(train)
    assert not {prompt_key(p) for p in held} & {prompt_key(p) for p in first_train}  # no trained prompt evaluated
    kept = [p for p in edited if p not in first_held[1:]]  # one held-out prompt taken out: the other stays held out
    assert split_eval_prompts(cfg, kept, started=split_settings(state))[1] == first_held[:1]
    with pytest.raises(UserError, match=r"the 2 prompts the run held out for its evaluation \(e\.g\. '.+'\) are no "
                                        r"longer in .*: put them back, or give held-out prompts with --set "
                                        r"eval_prompts=FILE"):
        split_eval_prompts(cfg, [p for p in edited if p not in first_held], started=split_settings(state))
    assert split_settings({"config": cfg.to_dict()}) == cfg.to_dict()  # an older checkpoint: drawn from its config


def test_a_resume_with_another_seed_trains_and_holds_out_what_its_run_did(tmp_path, monkeypatch, fresh_log_handlers):
    """End to end: prompts.json (the training prompts prompt_ids index, the held-out ones) is the same after a resume
    that changes the seed, and no held-out prompt is in it. (The resume said the prompt file had changed.)"""
    from lowmem_alignprop.cli import main

    from lowmem_alignprop.memory import host_allocator

    (tmp_path / "train.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "run"
    args = [*FAST_EVAL, "--prompts", str(tmp_path / "train.txt"), "--output-dir", str(out)]
    widened, wider = [], host_allocator.wider_threshold  # renders without gradients keep their blocks in the heap
    monkeypatch.setattr(host_allocator, "wider_threshold", lambda kib: widened.append(kib) or wider(kib))
    assert main([*args, "--steps", "1", "--eval-every", "1", "--set", "eval_holdout=2"]) == 0
    assert widened and set(widened) == {1024}  # the held-out evaluation's render, at the run's own threshold
    first = json.loads((out / "prompts.json").read_text())
    assert len(first["held_out"]) == 2 and not set(first["held_out"]) & set(first["train"])
    assert main(["--output-dir", str(out), "--steps", "2", "--resume", "latest", "--set", "seed=9"]) == 0
    assert json.loads((out / "prompts.json").read_text()) == first
    rows = strict_rows(out)
    assert all(first["train"][i] not in first["held_out"] for r in rows for i in r["prompt_ids"])
    # the prompt file edited (two trained lines out, one new in): the checkpoint's record keeps the held-out set
    edited = [p for p in PROMPTS if p not in first["train"][:2]] + ["a grey owl"]
    (tmp_path / "train.txt").write_text("\n".join(edited) + "\n")
    assert main(["--output-dir", str(out), "--steps", "3", "--resume", "latest"]) == 0
    after = json.loads((out / "prompts.json").read_text())
    assert after["held_out"] == first["held_out"] and "a grey owl" in after["train"]
    assert not set(after["held_out"]) & set(after["train"])
    # a resume measures one of its own steps' memory on a CPU (it measured step 2 only, which it did not run, and
    # memory_report.json then told the load's peak as the run's)
    report = json.loads((out / "memory_report.json").read_text())
    assert report["peak_step"] == 3 and report["peak_stage"] != "load", report


def test_early_stop_and_best_name_what_improving_means_with_a_cap_or_target():
    """With reward_cap or reward_target, best/ and early stop follow eval_objective, which may fall while eval_reward
    rises: their lines say so."""
    from lowmem_alignprop.training.evaluation import improvement_measure

    assert improvement_measure(Config()) == "eval_reward"
    assert improvement_measure(Config(reward_cap=70.0)) == ("eval_objective, the held-out reward capped at "
                                                            "reward_cap=70")
    assert improvement_measure(Config(reward_target=10.0)) == ("eval_objective, the held-out reward's distance to "
                                                               "reward_target=10")


def test_an_early_stop_or_evaluation_this_run_cannot_make_is_said():
    """An early stop needs the best evaluation, then early_stop more, all before the last step: eval_every 10,
    early_stop 3 can stop a 41-step run at step 40 but not a 40-step one (its evaluations before the end: 10, 20,
    30). An eval_every past the run evaluates only the last step."""
    from lowmem_alignprop.training.evaluation import schedule_note

    def note(steps, every, patience=0):
        return schedule_note(Config(steps=steps, eval_every=every, early_stop=patience))

    assert note(41, 10, 3) is None and note(8, 1, 2) is None and note(100, 10) is None and note(40, 0) is None
    assert note(40, 10, 3) == ("early_stop=3 cannot stop this run: it evaluates 3 time(s) before its last step "
                               "(every 10 of 40 steps), and a stop needs 4 (the best, then 3 without improving); use "
                               "--steps 41 or more (or a smaller --early-stop or --eval-every)")
    assert note(20, 50) == ("--eval-every 50 with 20 steps evaluates only at the last step: best/ is the last "
                            "step's LoRA; use --eval-every 5 to choose among steps")
    assert note(20, 20, 1).startswith("early_stop=1 cannot stop this run: it evaluates 0 time(s)")
    # early_stop=1 with eval_every=1 has nothing smaller (0 is no early stop): only more steps let it stop (it said
    # "use a smaller --early-stop or --eval-every", neither of which there is); 3 steps evaluate 1 and 2 before the last
    assert note(2, 1, 1) == ("early_stop=1 cannot stop this run: it evaluates 1 time(s) before its last step (every 1 "
                             "of 2 steps), and a stop needs 2 (the best, then 1 without improving); use --steps 3 or "
                             "more")
    assert note(3, 1, 1) is None and note(20, 20, 1).endswith("use --steps 41 or more (or a smaller --eval-every)")
    # eval_on_start's step 0 counts for best/ and the early stop: one more evaluation before the last step
    start = Config(steps=40, eval_every=10, early_stop=3, eval_on_start=True)
    assert schedule_note(start) is None
    assert schedule_note(dataclasses.replace(start, early_stop=4)) == (
        "early_stop=4 cannot stop this run: it evaluates 4 time(s) before its last step (every 10 of 40 steps, and "
        "step 0), and a stop needs 5 (the best, then 4 without improving); use --steps 41 or more (or a smaller "
        "--early-stop or --eval-every)")
    assert schedule_note(Config(steps=20, eval_every=50, eval_on_start=True)) == (
        "--eval-every 50 with 20 steps evaluates only the untrained LoRA (eval_on_start) and the last step: best/ is "
        "one of the two; use --eval-every 5 to choose among steps")
    # a resume from step 6 (evaluated at 2, 4, 6; one evaluation without improvement spent) now every 3 of 9: the
    # evaluations after it (9, the last) and the patience left, not a fresh schedule from step 0 (it said "2 time(s)")
    resumed = Config(steps=9, eval_every=3, early_stop=2, eval_on_start=True)
    assert schedule_note(resumed, 6, 1) == (
        "early_stop=2 cannot stop this run: it evaluates 0 time(s) before its last step (every 3 of 9 steps, from "
        "step 7), and a stop needs 1 (1 without improving; 1 of 2 spent before the resume); use --steps 10 or "
        "more (or a smaller --early-stop or --eval-every)")
    assert schedule_note(dataclasses.replace(resumed, steps=12), 6, 1) is None  # step 9 can stop it
    assert schedule_note(dataclasses.replace(resumed, steps=12), 6, None) == (  # no best yet: the best, then 2
        "early_stop=2 cannot stop this run: it evaluates 1 time(s) before its last step (every 3 of 12 steps, from "
        "step 7), and a stop needs 3 (the best, then 2 without improving); use --steps 16 or more (or a "
        "smaller --early-stop or --eval-every)")
    # a resume of a run that ended at its last step trains and evaluates nothing: no note (it said "evaluates -1
    # time(s) before its last step (every 3 of 9 steps, from step 10)" before the refusal or the outputs' rewrite)
    assert schedule_note(resumed, 9, 1) is None and schedule_note(resumed, 9, None) is None


def test_renders_past_the_last_step_and_judging_outside_the_toy_world_are_said():
    """--sample-every and fidelity_every past the run rendered nothing during it, and fidelity_every off the toy world
    judged nothing: both in silence (--eval-every's were said)."""
    from lowmem_alignprop.training.evaluation import renders_note
    from lowmem_alignprop.toy.fidelity import unjudged_note

    assert renders_note(Config(steps=20, sample_every=20, fidelity_every=5)) is None
    assert renders_note(Config(steps=2, sample_every=5)) == ("sample_every=5 with 2 steps: nothing is rendered during "
                                                             "this run, only before and after it; use a smaller "
                                                             "interval (e.g. 1)")
    assert renders_note(Config(steps=8, sample_every=9, fidelity_every=10)).startswith(
        "sample_every=9 and fidelity_every=10 with 8 steps: nothing is rendered")
    assert unjudged_note(Config(model="toy", fidelity_every=2), ["a photo of a cat"]) is None  # (off_grammar_note's)
    assert unjudged_note(Config(model="tiny", fidelity_every=0), ["a cat"]) is None
    assert unjudged_note(Config(model="tiny", fidelity_every=2), ["a red circle"]) is None  # (its grammar: a toy model)
    assert unjudged_note(Config(model="tiny", fidelity_every=2), ["a photo of a cat"]) == (
        "fidelity_every=2 judges images with the toy world's exact evaluators, and this run is not in it (--model "
        "tiny, prompts outside its grammar): nothing is judged")
    # fidelity_images likewise when the user chose a number (its default, 32, is every run's: not said)
    assert unjudged_note(Config(model="tiny", fidelity_images=32), ["a photo of a cat"]) is None
    assert unjudged_note(Config(model="tiny", fidelity_images=0), ["a photo of a cat"]) is None
    assert unjudged_note(Config(model="tiny", fidelity_images=8), ["a red circle"]) is None
    assert unjudged_note(Config(model="tiny", fidelity_every=3, fidelity_images=8), ["a photo of a cat"]) == (
        "fidelity_every=3 and fidelity_images=8 judge images with the toy world's exact evaluators, and this run is "
        "not in it (--model tiny, prompts outside its grammar): nothing is judged")


def test_reward_cap_with_lv_draws_counts_every_draw_before_skipping_a_step(tmp_path, monkeypatch):
    """DRaFT-LV's extra draws of the last step are scored and trained on too: a step whose sampled images are all at
    the cap but whose extra draws are below it has a gradient. The at-cap skip looked at the sampled images only
    and dropped it."""
    from lowmem_alignprop.cli import main

    (tmp_path / "split_reward.py").write_text(
        "import torch\n"
        "def score(images, prompts):\n"
        "    m = images.mean(dim=(1, 2, 3))\n"
        "    high = torch.zeros_like(m)\n"
        "    high[: len(m) // 2] = 100.0  # the sampled images (the first of lv_draws=2 draws): far above the cap\n"
        "    return m + high\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main([*RUN[:-2], "--reward", "split_reward:score", "--output-dir", str(out), "--steps", "2", "--set",
                 "lv_draws=2", "--set", "reward_cap=50"]) == 0
    rows = strict_rows(out)
    assert all(min(r["rewards"]) >= 50 for r in rows)  # the logged (sampled) images: all at the cap ...
    assert [r["at_cap"] for r in rows] == [False, False] and all(r["grad_norm"] > 0 for r in rows)  # ... the draws not
    assert any(t.any() for n, t in _lora(out / "lora").items() if "lora_B" in n or "lora.up" in n)


def test_reward_cap_trains_only_on_the_images_below_it(night, tmp_path, capsys):
    """reward_cap: the loss sees min(reward, cap). A cap below every reward leaves nothing to learn: each step makes no
    update (AdamW's momentum and weight decay would otherwise move the weights on a zero gradient), the LoRA's B stays
    exactly zero, and such steps are not a broken reward (no zero-gradient stop). A cap above every reward changes
    nothing: the same LoRA as the run without it."""
    from lowmem_alignprop.cli import main

    runs = {name: tmp_path / name for name in ("below", "above", "none")}
    caps = {"below": ["--set", "reward_cap=-1"], "above": ["--set", "reward_cap=2"], "none": []}
    boxes = {}
    for name, out in runs.items():
        capsys.readouterr()
        assert main([*night, "--output-dir", str(out), "--steps", "2", "--set", "max_zero_grad_steps=2",
                     *caps[name]]) == 0
        boxes[name] = capsys.readouterr().out
    below = strict_rows(runs["below"])
    # the box and summary say that no step made an update (its reward change is only the rollouts' own noise)
    assert " reward_cap=-1: 2 of 2 steps made no update (every image at the cap; metrics.jsonl's at_cap)" in boxes["below"]
    assert json.loads((runs["below"] / "summary.json").read_text())["at_cap_steps"] == [1, 2]
    assert "made no update" not in boxes["above"] and "at_cap_steps" not in json.loads(
        (runs["none"] / "summary.json").read_text())
    assert [r["at_cap"] for r in below] == [True] * 2 and all(r["grad_norm"] == 0.0 for r in below)
    lora_b = [t for n, t in _lora(runs["below"] / "lora").items() if "lora_B" in n or "lora.up" in n]
    assert lora_b and all(not t.any() for t in lora_b)
    assert [r["at_cap"] for r in strict_rows(runs["above"])] == [False] * 2 and "at_cap" not in strict_rows(runs["none"])[0]
    above, none = _lora(runs["above"] / "lora"), _lora(runs["none"] / "lora")
    assert above.keys() == none.keys()
    assert_rel_close(list(above.values()), list(none.values()), SAME_OPS, "the LoRA under a cap that never binds")
    assert any(t.any() for t in none.values() if t.dim())


def ckpt_weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path / "trainable.safetensors"))


# -- recipes ------------------------------------------------------------------------------------------------

def test_a_recipe_sits_between_the_profile_and_the_flags():
    """--recipe aesthetic brings the official aesthetic run's settings (config/align_prop.py: loss coefficient 0.01,
    clip 5, weight decay 0.1, target 10, lr 1e-3, each step's K ~ U{0..50}, DDIM eta 0); the profile's memory
    fields stay; flags and
    --set win over it; the recipe's name is in the resolved config (config.yaml)."""
    from lowmem_alignprop.settings.profiles import FLAG_FIELDS, resolve_config

    flags = dict.fromkeys(FLAG_FIELDS)
    _, plain = resolve_config("cpu", flags, [])
    _, cfg = resolve_config("cpu", {**flags, "recipe": "aesthetic"}, [])
    assert (cfg.reward, cfg.loss_scale, cfg.max_grad_norm, cfg.weight_decay, cfg.reward_target, cfg.lr) == \
        ("aesthetic", 0.01, 5.0, 0.1, 10.0, 1e-3)
    assert (cfg.truncation, cfg.k_min, cfg.k_max, cfg.sample_steps, cfg.eta) == ("per_step", 0, 50, 50, 0.0)
    assert (cfg.resolution, cfg.batch_size, cfg.budget_gb) == (plain.resolution, plain.batch_size, plain.budget_gb)
    assert cfg.to_dict()["recipe"] == "aesthetic" and plain.recipe == ""
    _, mine = resolve_config("cpu", {**flags, "recipe": "aesthetic", "reward": "brightness"},
                             ["lr=0.5", "reward_target=0.9"])
    assert (mine.reward, mine.lr, mine.loss_scale, mine.reward_target) == ("brightness", 0.5, 0.01, 0.9)
    # the recipe's target of 10 is on the aesthetic scale: brightness (0..1) trained toward it is refused
    with pytest.raises(UserError) as err:
        resolve_config("cpu", {**flags, "recipe": "aesthetic", "reward": "brightness"}, ["lr=0.5"])
    assert str(err.value) == (
        "recipe aesthetic sets reward_target=10 on the aesthetic reward's scale, and this run trains reward "
        "'brightness': the loss would pull it toward 10; give a target on its scale (--set reward_target=V), or none "
        "to raise it (--set reward_target=null), or train the recipe's reward")
    _, up = resolve_config("cpu", {**flags, "recipe": "aesthetic"}, ["reward=clip", "reward_target=null"])
    assert (up.reward, up.reward_target) == ("clip", None)


def test_the_hps_recipe_says_its_prompts_do_not_ship(caplog):
    """The HPSv2 run trained on HPSv2's prompts, which do not ship: without --prompts the recipe says what it trains
    on instead; with them, nothing."""
    import logging

    from lowmem_alignprop.settings.profiles import FLAG_FIELDS, resolve_config

    flags = dict.fromkeys(FLAG_FIELDS)
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        _, hps = resolve_config("cpu", flags, ["recipe=hps"])
    assert (hps.reward, hps.reward_target, hps.loss_scale, hps.recipe) == ("hpsv2", None, 0.01, "hps")
    assert [r.getMessage() for r in caplog.records] == [
        f"recipe hps does not ship the paper's prompts: training on {hps.prompts}; pass them with --prompts FILE "
        "(the header of `lowmem-alignprop profiles hps` says which)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        resolve_config("cpu", {**flags, "prompts": "simple_animals", "recipe": "hps"}, [])
    assert caplog.records == []


def test_a_recipe_on_the_toy_model_says_what_it_replaces(caplog):
    """The recipes are the paper's Stable Diffusion 1.5 runs: on the toy model they replace its prompts and sampling,
    which a warning lists (what --set keeps is left out of it)."""
    import logging

    from lowmem_alignprop.settings.profiles import resolve_config

    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        _, cfg = resolve_config("cpu", {"model": "toy", "recipe": "aesthetic", "reward": "toy_clip"},
                                ["sample_steps=20", "reward_target=null"])
    assert (cfg.prompts, cfg.sample_steps, cfg.reward) == ("simple_animals", 20, "toy_clip")
    assert [r.getMessage() for r in caplog.records] == [
        "recipe aesthetic is AlignProp's Stable Diffusion 1.5 run: on the toy model it replaces guidance_scale 3.0 -> "
        "7.5, prompts toy-pairs -> simple_animals (set them with --set to keep the model's)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        resolve_config("cpu", {"model": "tiny", "recipe": "aesthetic"}, [])
    assert caplog.records == []  # a model of the paper's shape: nothing of its own replaced


def test_a_profile_file_naming_a_recipe_applies_it_under_its_own_fields(tmp_path, caplog):
    """A profile file with `recipe: aesthetic` gets the recipe's settings (it named the recipe and trained none of
    it: reward brightness, lr 1e-3, said to be the aesthetic recipe), its own fields over them; a run's config.yaml
    (every field written) plans what it trained; --set recipe= clears the file's recipe."""
    from lowmem_alignprop.settings.profiles import FLAG_FIELDS, resolve_config

    flags = dict.fromkeys(FLAG_FIELDS)
    mine = tmp_path / "mine.yaml"
    mine.write_text('budget_gb: 8\nmixed_precision: "no"\nrecipe: aesthetic\nlr: 0.002\n')
    _, cfg = resolve_config(str(mine), flags, [])
    assert (cfg.reward, cfg.reward_target, cfg.loss_scale, cfg.truncation, cfg.k_max, cfg.recipe) == \
        ("aesthetic", 10.0, 0.01, "per_step", 50, "aesthetic")
    assert (cfg.lr, cfg.budget_gb) == (0.002, 8.0)  # the file's own over the recipe's 1e-3
    # a copy of a shipped profile (README: copy one, then edit it) holds the lines that define the recipe: its own
    # truncation, K and lr won unsaid; said now, with the fix
    copied = tmp_path / "copied.yaml"
    copied.write_text("truncation: fixed\nk: 2\nk_min: 1\nk_max: 10\nlr: 0.001\nrecipe: aesthetic\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        _, own = resolve_config(str(copied), flags, [])
    assert (own.truncation, own.k, own.recipe) == ("fixed", 2, "aesthetic")
    said = [r.getMessage() for r in caplog.records if "names recipe" in r.getMessage()]
    assert said == [f"profile {copied} names recipe aesthetic, and its own fields win over the recipe's: truncation "
                    "fixed (recipe: per_step), k_min 1 (recipe: 0), k_max 10 (recipe: 50); delete those lines from the "
                    "file (or give --recipe aesthetic) for the "
                    "recipe's"], said  # (lr 0.001 is the recipe's own: nothing to say)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        _, flagged = resolve_config(str(copied), {**flags, "recipe": "aesthetic"}, [])
    assert flagged.truncation == "per_step" and not [r for r in caplog.records if "names recipe" in r.getMessage()]
    _, flagged = resolve_config(str(mine), flags, ["lr=0.3"])
    assert flagged.lr == 0.3
    _, cleared = resolve_config(str(mine), flags, ["recipe="])
    assert (cleared.recipe, cleared.reward, cleared.lr) == ("", Config().reward, 0.002)
    # a run's config.yaml: the recipe's run with lr and reward_target changed by --set plans as it trained
    _, run = resolve_config("cpu", {**flags, "recipe": "aesthetic"}, ["lr=0.02", "reward_target=7"])
    saved = tmp_path / "config.yaml"
    import yaml
    saved.write_text(yaml.safe_dump({"profile": "cpu", **run.to_dict()}, sort_keys=False))  # as the trainer writes it
    _, again = resolve_config(str(saved), flags, [])
    assert (again.lr, again.reward_target, again.recipe, again.k_max) == (0.02, 7.0, "aesthetic", 50)


def _planner_cfg(tiny_dir) -> Config:
    return Config(model=str(tiny_dir), sample_steps=6, truncation="fixed", k=4, resolution=64, batch_size=1).validate()


@pytest.mark.slow  # three estimates (20 s); test_flow_controls counts KL and LV draws for FLUX through the same step
def test_the_planner_counts_kl_and_lv(tiny_dir):
    """The planner runs the same rollout_loss on fake tensors: with kl_coeff each window step keeps a few more
    latent-sized tensors (the base model's prediction and the difference; the backward peak barely moves), with
    lv_draws the decode works on 3x the images."""
    from lowmem_alignprop.measure.planner import estimate

    cfg = _planner_cfg(tiny_dir)
    plain = estimate(cfg, target="cpu")
    kl = estimate(dataclasses.replace(cfg, kl_coeff=0.1), target="cpu")
    latent = 1 * 4 * 32 * 32 * 4  # one fp32 latent of this model at 64 px
    assert 0 < kl.per_k_bytes - plain.per_k_bytes <= 3 * latent, (plain.per_k_bytes, kl.per_k_bytes)
    backward = [e.stages["backward"]["allocated"] for e in (plain, kl)]
    assert backward[0] < backward[1] <= 1.01 * backward[0], backward
    lv = estimate(dataclasses.replace(cfg, lv_draws=3), target="cpu")
    assert lv.stages["decode"]["allocated"] > 1.5 * plain.stages["decode"]["allocated"]


def test_the_planner_counts_the_ema(tiny_dir):
    """The EMA's fp32 copy of the LoRA weights is on the device from the optimizer stage on."""
    from lowmem_alignprop.measure.planner import estimate

    cfg = _planner_cfg(tiny_dir)
    plain = estimate(cfg, target="cpu")
    ema = estimate(dataclasses.replace(cfg, ema_decay=0.9), target="cpu")
    assert ema.weights["ema"] == ema.weights["lora"] > 0
    assert ema.stages["optimizer"]["allocated"] == plain.stages["optimizer"]["allocated"] + ema.weights["ema"]


@pytest.mark.parametrize("judged", [4, 0])
def test_held_out_evaluation_in_the_toy_world_reports_its_exact_fidelity(tmp_path, fresh_log_handlers, judged):
    """In the toy world the held-out evaluation's metrics carry the exact evaluators' rates (HeldOut.evaluators), also
    with the before/after judgement off (fidelity_images=0 dropped them without a word), and that judgement keeps its
    prompts (the run's, not the held-out ones)."""
    from lowmem_alignprop.cli import main

    out = tmp_path / "toy"
    assert main(["--profile", "cpu", "--model", "toy", "--reward", "toy_clip", "--steps", "1", "--eval-every", "1",
                 "--set", "sample_prompts=0", "--set", "sample_steps=4", "--set", f"fidelity_images={judged}",
                 "--set", "eval_prompts=", "--set", "eval_holdout=2", "--set", "reward_target=5",
                 "--output-dir", str(out)]) == 0
    row = strict_rows(out)[0]
    assert row["eval_fidelity_images"] == 2.0 and 0.0 <= row["eval_fidelity_score"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary.get("toy_world", {}).get("images") == (judged or None) and summary["best_step"] == 1
    # reward_target: best/ is chosen by eval_objective (-mean |reward - target|); the summary's best_eval_reward is
    # the step's eval_reward and best_measure its objective (they differ: one was shown for the other)
    assert row["eval_objective"] <= 0 and row["eval_reward"] != row["eval_objective"]
    assert (summary["best_eval_reward"], summary["best_measure"]) == (row["eval_reward"], row["eval_objective"])


@pytest.mark.parametrize("best_by, best_step, stopped_at", [("reward", 1, 3), ("fidelity", 2, None)])
def test_best_by_fidelity_keeps_the_exactly_best_step_where_the_reward_disagrees(best_by, best_step, stopped_at,
                                                                                  tmp_path):
    """Over-optimization: the held-out reward falls from step 1 while the exact fidelity (the toy world's evaluators)
    rises at step 2. best_by=reward keeps step 1 and stops early at step 3; best_by=fidelity keeps step 2 (its
    best.json says both figures) and, fidelity falling once after it, does not stop yet. A step without the exact
    score (no prompt of the grammar) counts for neither."""
    from lowmem_alignprop.training.evaluation import HeldOut

    cfg = Config(eval_every=1, early_stop=2, best_by=best_by).validate()
    held = HeldOut(cfg, ["a red circle"], tmp_path, sample=None,
                   write_lora=lambda folder: (folder / "w.txt").write_text("lora", encoding="utf-8"))
    rows = [(0.9, 0.2), (0.5, 0.8), (0.3, 0.6)]  # (eval_reward, eval_fidelity_score) at steps 1-3
    for step, (reward, score) in enumerate(rows, start=1):
        held.after_evaluation(step, {"eval_reward": reward, "eval_objective": reward, "eval_fidelity_score": score},
                              is_main=True)
    assert (held.best_step, held.stopped_at) == (best_step, stopped_at)
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["step"] == best_step and best["eval_fidelity_score"] == rows[best_step - 1][1]
    metrics = {"eval_reward": 1.0, "eval_objective": 1.0}  # no exact score
    held.after_evaluation(4, metrics, is_main=True)
    if best_by == "fidelity":
        assert metrics["eval_skipped"] == "no eval_fidelity_score (best_by=fidelity)" and held.best_step == 2
    else:
        assert "eval_skipped" not in metrics and held.best_step == 4


def test_eval_on_start_is_the_step_0_baseline_that_best_counts(tmp_path, capsys, monkeypatch, caplog):
    """eval_on_start: the held-out evaluation of the untrained LoRA is metrics.jsonl's line of step 0 (the curves'
    start; a helper found no held-out baseline to tell whether step 10 had already degraded). best/ counts it: a run
    whose training makes the held-out measure worse (this reward trains brightness up and, without gradient, in the
    evaluation, scores darkness) keeps step 0 in best/, its LoRA the untrained one, and the box says so. Without
    eval_every it is refused."""
    import sys

    caplog.set_level(logging.INFO, logger="lowmem_alignprop")
    from safetensors.torch import load_file

    from lowmem_alignprop.cli import main

    (tmp_path / "two_faced.py").write_text("import torch\ndef reward(images, prompts):\n"
                                           "    m = images.mean(dim=(1, 2, 3))\n"
                                           "    return m if torch.is_grad_enabled() else -m\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    out = tmp_path / "run"
    assert main(["--profile", "cpu", "--model", "tiny", "--steps", "2", "--eval-every", "1", "--set",
                 "eval_on_start=true", "--set", "sample_prompts=0", "--set", "sample_steps=3", "--set", "k=1",
                 "--set", "lr=0.05", "--reward", "two_faced:reward", "--output-dir", str(out)]) == 0
    rows = strict_rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and "reward_mean" not in rows[0] and "eval_reward" in rows[0]
    assert rows[0]["eval_objective"] > rows[1]["eval_objective"] > rows[2]["eval_objective"], rows
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] == 0
    lora = load_file(str(next((out / "best").glob("*.safetensors"))))  # the untrained LoRA: every up-weight zero
    ups = [v for k, v in lora.items() if "lora_B" in k or "lora.up" in k]
    assert ups and all(not v.abs().sum() for v in ups)
    assert "best held-out evaluation: step 0, eval_reward" in (printed := capsys.readouterr().out) and \
        "(the untrained LoRA: no trained step beat it)" in printed
    said = [m for m in caplog.messages if m.startswith("step ") and "eval_reward" in m]
    assert all(r["eval_objective"] == r["eval_reward"] for r in rows)  # (no target or cap: one figure said)
    assert said[0].startswith(f"step 0 (the untrained LoRA): eval_reward {rows[0]['eval_reward']:.4f}, the best so "
                              "far")  # (not a repr)
    # the evaluations that did not improve are said too (only the improving ones were: the patience was unseen)
    assert said[1:] == [f"step {r['step']}: eval_reward {r['eval_reward']:.4f}, not above step 0's "
                        f"{rows[0]['eval_objective']:.4f} ({n} evaluation{'s' * (n != 1)} without improvement)"
                        for n, r in enumerate(rows[1:], 1)]
    with pytest.raises(UserError, match="eval_on_start evaluates the held-out prompts before the first step"):
        Config(eval_on_start=True).validate()


def test_eval_on_start_evaluates_the_untrained_lora_of_a_new_run_not_a_resumed_one(tmp_path):
    """eval_on_start's step 0 is the untrained LoRA: a new run evaluates it before its first step; a resumed run,
    whose weights are the checkpoint's, does not (it evaluated the trained weights as step 0, and best/ could keep
    them as "the untrained LoRA")."""
    from types import SimpleNamespace

    from lowmem_alignprop.training.train import Trainer
    from lowmem_alignprop.run.runfolder import RunFolder

    cfg = Config(steps=4, eval_every=2, eval_on_start=True, output_dir=str(tmp_path / "run")).validate()
    for start, evaluated in ((0, [0]), (2, [])):
        point = SimpleNamespace(step=start, state={}) if start else None
        trainer = Trainer(cfg, RunFolder(cfg.output_dir), ["a cat"], point=point)
        calls = []
        trainer.evaluate_start, trainer.is_main = lambda: calls.append(0), False
        trainer.step = cfg.steps + 1  # no step left to train
        trainer.fit()
        assert calls == evaluated, start


def test_a_checkpoint_from_before_best_by_measured_by_the_reward():
    """A checkpoint whose config predates best_by (no such key) was chosen by the reward: resumed with
    best_by=fidelity its best (a toy_clip figure, ~60) is no measure of the exact score (0..1), so best/ and the
    patience start over; resumed as it was, nothing changed."""
    from lowmem_alignprop.run.resume_rules import eval_basis_changed

    old = {"config": {k: v for k, v in Config(eval_every=1).to_dict().items() if k != "best_by"}}
    assert eval_basis_changed(old, Config(eval_every=1, best_by="fidelity").validate()) == ["best_by"]
    assert eval_basis_changed(old, Config(eval_every=1).validate()) == []


def test_a_resume_whose_held_out_prompts_differ_starts_best_over():
    """best/ so far was measured on the held-out prompts the checkpoint's run set aside: another held-out set (its
    digest) is no measure for this run's evaluations; the same digest, or a checkpoint that kept none, is."""
    from lowmem_alignprop.run.resume_rules import eval_basis_changed

    cfg = Config(eval_every=1).validate()
    state = {"config": cfg.to_dict(), "evaluation": {"held_out_sha": "aaaa"}}
    assert eval_basis_changed(state, cfg, "bbbb") == ["held-out prompts"]
    assert eval_basis_changed(state, cfg, "aaaa") == []
    assert eval_basis_changed(state, cfg) == []
    assert eval_basis_changed({"config": cfg.to_dict(), "evaluation": {}}, cfg, "bbbb") == []


def test_a_resume_that_makes_the_held_out_images_otherwise_starts_best_over():
    """Another resolution, sample_steps, guidance or eta renders every held-out image anew: best/'s figure (and the
    patience) measured other images, no measure for this run's (the training reward's comparison in the summary
    already started over at such a change; the evaluation went on comparing). A checkpoint whose config predates a
    setting is not said to differ."""
    from lowmem_alignprop.run.resume_rules import eval_basis_changed

    cfg = Config(eval_every=1).validate()
    state = {"config": cfg.to_dict(), "evaluation": {"held_out_sha": "aaaa", "best_step": 2}}
    for name, value in (("resolution", 32), ("sample_steps", 5), ("guidance_scale", 2.0), ("eta", 0.0)):
        assert eval_basis_changed(state, dataclasses.replace(cfg, **{name: value}), "aaaa") == [name]
    older = {"config": {k: v for k, v in cfg.to_dict().items() if k != "eta"}}
    assert eval_basis_changed(older, dataclasses.replace(cfg, eta=0.0)) == []


def test_a_resumed_ema_keeps_its_average_and_count_and_takes_this_runs_decay(tmp_path):
    """WeightEMA.load: the checkpoint's average and update count, and this run's ema_decay (a resume with another
    --set ema_decay averages on with it; the checkpoint's decay went on in silence)."""
    from lowmem_alignprop.training.evaluation import WeightEMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema = WeightEMA([p], 0.9, ["w"])
    for value in (1.0, 2.0, 3.0):
        p.data.fill_(value)
        ema.update()
    ema.save(tmp_path)
    q = torch.nn.Parameter(torch.full((3,), 5.0))
    again = WeightEMA([q], 0.2, ["w"])
    assert again.load(tmp_path)
    saved = ema.model.shadow_params[0].clone()
    assert torch.equal(again.model.shadow_params[0], saved) and again.model.optimization_step == 3
    again.update()  # the 4th update: decay min((1 + 3) / (10 + 3), ema_decay) = 0.2, this run's (0.9 gave 4/13)
    assert torch.allclose(again.model.shadow_params[0], 0.2 * saved + 0.8 * 5.0)


def test_a_resume_of_an_ended_run_whose_best_is_gone_writes_it_again(tmp_path, tiny_dir, caplog):
    """best/ gone from a finished run (--eval-every) whose best step's checkpoint is kept: --resume latest writes it
    again from that checkpoint, as it writes a missing lora/ (it said "nothing left to train: raise --steps", and
    best/ came back only with a further step); then the run is whole."""
    from lowmem_alignprop.cli import main

    out = tmp_path / "run"
    args = [*FAST_EVAL, "--output-dir", str(out), "--steps", "3", "--eval-every", "1", "--set", "checkpoint_every=1",
            "--set", "keep_checkpoints=0"]
    assert main(args) == 0
    best = json.loads((out / "best" / "best.json").read_text())
    shutil.rmtree(out / "best")
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main([*args, "--resume", "latest"]) == 0
    assert f"but its best/ (step {best['step']}) is missing: writing its outputs again from checkpoint" in caplog.text
    assert json.loads((out / "best" / "best.json").read_text())["step"] == best["step"]
    assert main([*args, "--resume", "latest"]) == 2  # whole now: nothing left to train

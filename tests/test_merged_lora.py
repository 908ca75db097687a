"""merge_lora_nograd (issue 20, speed): the calls without gradients run on the base layers with the LoRA merged into
copies of their weights (models/merged_lora.py).

What it promises: the calls launch as many ops as the model without LoRA (peft's LoRA layers add four per adapted
layer and call: two matmuls, the scaling and the sum; their transposes and views launch nothing); their outputs are the LoRA model's up to rounding (``W x + B (A x)`` against ``(W + B A) x``: another
decomposition of the same sums, REORDERED); the base weights come back bit for bit, as the same tensors, with the
adapters and their requires_grad flags as they were, also when the calls fail; the gradient window is untouched, so a
training step's loss and LoRA gradients differ only by the rounding of the no-grad steps before it; the planner
counts the merge once per rollout and the calls' fewer ops each."""

from __future__ import annotations

import contextlib
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loras import nudge, tiny_unet_with_lora
from numerics import REORDERED, assert_rel_close, relative_difference

from lowmem_alignprop.measure import counters, planner
from lowmem_alignprop.measure.step_time import mean_k
from lowmem_alignprop.memory import stages
from lowmem_alignprop.models.family import UNetFamily
from lowmem_alignprop.models.merged_lora import lora_linears, lora_merged
from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.step.rollout import rollout_loss

NO_STAGE = lambda name: contextlib.nullcontext()  # noqa: E731
PROMPTS = ["a photo of a cat", "a red dog"]


class Ops(TorchDispatchMode):
    """Counts the ops launched inside as the planner counts them (counters.StageWork: views launch nothing)."""

    def __init__(self):
        super().__init__()
        self.work = counters.StageWork()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        with self.work.stage(stages.SAMPLE_NOGRAD):
            self.work.count(func, args, kwargs or {}, out)
        return out

    @property
    def n(self) -> int:
        return self.work.work[stages.SAMPLE_NOGRAD]["ops"]


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return tiny_unet_with_lora(tiny_dir)


def _call(m, counter=None):
    torch.manual_seed(11)
    x, hidden = torch.randn(2, 4, 8, 8), m.emb.cond
    with torch.no_grad(), (counter or contextlib.nullcontext()):
        return m.comps.unet(x, 500, encoder_hidden_states=hidden).sample


def test_merged_calls_give_the_lora_models_output_with_the_base_models_ops_and_leave_the_base_as_it_was(tiny):
    unet = tiny.comps.unet
    layers = lora_linears(unet)
    assert layers, "the tiny UNet has LoRA layers"
    weights = [m.get_base_layer().weight for m in layers]
    before = [(w.data_ptr(), w.clone()) for w in weights]
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    lora_ops, merged_ops, base_ops = Ops(), Ops(), Ops()
    ref = _call(tiny, lora_ops)
    with lora_merged(unet):
        merged = _call(tiny, merged_ops)
    unet.disable_adapters()
    try:
        base = _call(tiny, base_ops)
    finally:
        unet.enable_adapters()
        for n, p in unet.named_parameters():
            p.requires_grad_(flags[n])
    assert relative_difference(base, ref) > 100 * REORDERED  # the LoRA (nudged) changes the output
    assert_rel_close(merged, ref, REORDERED, "merged LoRA against peft's layers")
    assert merged_ops.n == base_ops.n < lora_ops.n - 4 * len(layers), (merged_ops.n, base_ops.n, lora_ops.n)
    # afterwards: the same weight tensors, bit for bit, the adapters on and every flag as it was
    assert all(w.data_ptr() == ptr and torch.equal(w, old) for w, (ptr, old) in zip(weights, before))
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    assert torch.equal(_call(tiny), ref)


def test_a_failing_call_inside_still_restores_the_weights_and_the_adapters(tiny):
    unet = tiny.comps.unet
    weights = [m.get_base_layer().weight for m in lora_linears(unet)]
    before = [w.data_ptr() for w in weights]
    ref = _call(tiny)
    with pytest.raises(RuntimeError, match="a reward failed"):
        with lora_merged(unet):
            raise RuntimeError("a reward failed")
    assert [w.data_ptr() for w in weights] == before
    assert torch.equal(_call(tiny), ref)


def _step(m, cfg, seed=3):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(2, 4, 32, 32, generator=g)
    unet = m.comps.unet
    loss, _ = rollout_loss(cfg, unet, unet, m.comps.scheduler, m.comps.vae, brightness, lat, m.emb, PROMPTS,
                           k=cfg.k, generator=g, stage=NO_STAGE, family=UNetFamily(m.comps))
    return loss.detach(), torch.autograd.grad(loss, m.params)


def test_a_training_step_with_merged_nograd_steps_differs_only_by_their_rounding(tiny, monkeypatch):
    """K=2 of 5 DDIM steps: the three no-grad steps run merged (once: one merge per rollout), the window through
    peft's layers; loss and LoRA gradients agree with the unmerged step to REORDERED."""
    from lowmem_alignprop.models import merged_lora

    cfg = Config(sample_steps=5, k=2, guidance_scale=4.0, eta=1.0, batch_size=2).validate()
    ref_loss, ref = _step(tiny, cfg)
    merges = []
    real = merged_lora.lora_merged
    monkeypatch.setattr("lowmem_alignprop.models.family.lora_merged",
                        lambda model: merges.append(model) or real(model))
    loss, grads = _step(tiny, dataclasses.replace(cfg, merge_lora_nograd=True))
    assert merges == [tiny.comps.unet]
    assert_rel_close(loss, ref_loss, REORDERED, "loss")
    assert_rel_close(grads, ref, REORDERED, "LoRA gradients")


def test_a_flux_transformer_merges_too(tmp_path):
    """FLUX's LoRA layers (joint and single blocks) are peft Linears as well: merged, the output is the LoRA
    model's up to rounding, with the base transformer's ops."""
    from diffusers import FluxTransformer2DModel

    from lowmem_alignprop.models import flow

    torch.manual_seed(0)
    t = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                               guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    nudge(flow.add_flow_lora(t, rank=4, alpha=4, seed=0))
    args = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 4, 32),
                pooled_projections=torch.randn(1, 16), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3))
    lora_ops, merged_ops = Ops(), Ops()
    with torch.no_grad():
        with lora_ops:
            ref = t(**args).sample
        with lora_merged(t), merged_ops:
            merged = t(**args).sample
    assert_rel_close(merged, ref, REORDERED, "FLUX merged LoRA")
    assert merged_ops.n < lora_ops.n - 4 * len(lora_linears(t)), (merged_ops.n, lora_ops.n)


@pytest.mark.parametrize("setting", ["train_unet=full", "base_quant=int8", "compile=nograd", "compile=regional",
                                     "deepspeed_zero=2", "block_swap=2"])
def test_what_merging_cannot_run_with_is_one_line_naming_the_fix(setting):
    key, value = setting.split("=")
    kw = {key: int(value) if value.isdigit() else value}
    if key == "deepspeed_zero":
        kw["optimizer"] = "adamw"
    if key == "block_swap":
        kw["unet_checkpointing"] = "blocks"
    with pytest.raises(UserError) as e:
        Config(merge_lora_nograd=True, **kw).validate()
    assert str(e.value) == (f"merge_lora_nograd runs the no-grad calls eagerly on merged copies of the LoRA's plain "
                            f"base weights: not with {setting}: use --set merge_lora_nograd=false")
    Config(**kw).validate()  # the setting alone is fine


def test_the_planner_counts_the_merge_once_and_the_fewer_ops_of_every_nograd_call(tiny_dir):
    """K=2 of 6 steps (four no-grad calls; the planner simulates one and scales it): the no-grad stage's ops drop by
    four calls' LoRA ops, less the merge's ops counted once; its peak holds the merged copies; the window is as
    before."""
    base = Config(model="tiny", resolution=64, sample_steps=6, k=2, batch_size=2, prompts="simple_animals").validate()
    merged = dataclasses.replace(base, merge_lora_nograd=True)
    est = {c.merge_lora_nograd: planner.estimate(c, target="cpu") for c in (base, merged)}
    # the same counts on one real call of the planner's model (fake weights count the same ops as real ones)
    from lowmem_alignprop.models.loading import add_lora, load_components

    comps = load_components(Config(model="tiny"))
    add_lora(comps.unet, rank=base.lora_rank, alpha=base.lora_alpha, seed=0)
    m = SimpleNamespace(comps=comps, emb=SimpleNamespace(cond=torch.randn(2 * 2, 16, 32)))  # CFG doubles the batch
    call, merged_call, merge = Ops(), Ops(), Ops()
    with torch.no_grad():
        x = torch.randn(4, 4, 8, 8)
        with call:
            comps.unet(x, 500, encoder_hidden_states=m.emb.cond)
        with merge:
            ctx = lora_merged(comps.unet)
            ctx.__enter__()
        try:
            with merged_call:
                comps.unet(x, 500, encoder_hidden_states=m.emb.cond)
        finally:
            ctx.__exit__(None, None, None)
    calls = base.sample_steps - mean_k(base)
    saved = calls * (call.n - merged_call.n) - merge.n
    nograd = {k: e.work[stages.SAMPLE_NOGRAD]["ops"] for k, e in est.items()}
    assert nograd[False] - nograd[True] == pytest.approx(saved), (nograd, calls, call.n, merged_call.n, merge.n)
    for name in (stages.SAMPLE_GRAD, stages.BACKWARD):
        assert est[True].work[name] == est[False].work[name]
    copies = sum(mod.get_base_layer().weight.numel() * 4 for mod in lora_linears(comps.unet))
    rise = est[True].stages[stages.SAMPLE_NOGRAD]["allocated"] - est[False].stages[stages.SAMPLE_NOGRAD]["allocated"]
    assert copies <= rise <= 1.05 * copies, (rise, copies)


def test_the_plans_changes_that_cannot_run_merged_turn_the_merge_off(monkeypatch):
    """plan's suggestion for a merged configuration that does not fit: its nf4 and block swap candidates turn the merge
    off (each candidate a valid configuration), and the search answers instead of raising the merge's clash."""
    from types import SimpleNamespace

    from lowmem_alignprop.measure.fit_changes import candidate_changes

    cfg = Config(model="tiny", resolution=64, merge_lora_nograd=True, budget_gb=1.0).validate()
    changes = [change for _, change in candidate_changes(cfg, "cuda")]
    assert any("base_quant" in c for c in changes) and any("block_swap" in c for c in changes), changes
    for change in changes:
        cfg.with_changes(**change)  # no clash
    never = SimpleNamespace(fits=lambda budget: False, peak_allocated=1, peak_needed=2 ** 40, peak_stage="backward")
    monkeypatch.setattr(planner, "estimate", lambda c, **kw: never)
    assert planner.suggest(cfg, target="cuda", max_estimates=40)["found"] is None


@pytest.mark.parametrize("merged", [False, True])
def test_fastest_searches_the_merge_only_where_the_task_runs_with_it(merged):
    """plan --fastest: merge_lora_nograd is a dimension, on before off; its choice is in the profile it writes; a task
    with block swap or a quantized base (--allow-task-changes) is searched unmerged, also when the merge was asked
    for (its all-off corner a valid configuration, not a dead task)."""
    from lowmem_alignprop.measure import fastest

    cfg = Config(model="tiny", resolution=64, budget_gb=1.0, merge_lora_nograd=merged).validate()
    dims = dict(fastest.dimensions(cfg, "cuda", 1))
    assert dims["merge_lora_nograd"] == [{"merge_lora_nograd": True}, {"merge_lora_nograd": False}]
    swapped = Config(model="tiny", resolution=64, unet_checkpointing="blocks", block_swap=1).validate()
    assert "merge_lora_nograd" not in dict(fastest.dimensions(swapped, "cuda", 1))
    assert "merge_lora_nograd: true" in fastest.profile_yaml(dataclasses.replace(cfg, merge_lora_nograd=True), "p",
                                                              {"seconds": 1.0, "needed": 2 ** 30})
    search = fastest._Search(cfg, "cuda", None, [], 40)
    for task in ({"block_swap": 1, "unet_checkpointing": "blocks"}, {"base_quant": "nf4"}):
        task = {**task, "merge_lora_nograd": False} if merged else task  # (what _fastest's ladder adds)
        corner = search.all_off({"cache_prompt_embeddings": True, **task, "batch_size": 1, "grad_accum": 1})
        assert search.config(corner) is not None, corner


def test_the_plans_features_line_names_the_merge():
    from lowmem_alignprop.measure.reports import plan_features

    feats = plan_features(Config(merge_lora_nograd=True).validate().to_dict())
    assert "merge_lora_nograd=true" in feats
    assert not any("merge" in f for f in plan_features(Config().validate().to_dict()))


def test_a_chain_without_no_grad_steps_merges_nothing():
    """K = T (every step in the window): no step runs before the window, so nothing is merged (the planner, which
    counts no no-grad call then, counts no merge either)."""
    from lowmem_alignprop.models.sampling import truncated_chain

    entered = []

    @contextlib.contextmanager
    def ctx():
        entered.append(1)
        yield

    def chain(k):
        return truncated_chain([3, 2, 1], torch.zeros(1), k=k, model=None, grad_model=None,
                               predict=lambda m, x, t: x + t, base_predict=None, step=lambda o, t, x: o,
                               nograd_context=ctx, checkpoint_calls=False)

    chain(3)
    assert entered == []
    chain(1)
    assert entered == [1]


def test_an_oom_while_merged_turns_the_merge_off_first_and_plan_offers_it():
    """The merged copies live in the no-grad steps: an out-of-memory error there first drops them (the fault
    ladder), and plan's changes offer it too; without the merge neither does."""
    from lowmem_alignprop.measure.fit_changes import candidate_changes
    from lowmem_alignprop.run.faults import next_fit

    merged = Config(merge_lora_nograd=True).validate()
    assert next_fit(merged, stages.SAMPLE_NOGRAD).overrides == {"merge_lora_nograd": False}
    assert next_fit(Config().validate(), stages.SAMPLE_NOGRAD).overrides != {"merge_lora_nograd": False}
    assert {"merge_lora_nograd": False} in [c for _, c in candidate_changes(merged, "cpu")]
    assert all("merge_lora_nograd" not in c for _, c in candidate_changes(Config().validate(), "cpu"))

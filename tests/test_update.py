"""step/update.py: the optimizer stage (clip, step, free the gradients) shared by the trainer and the planner."""

import math

import pytest
import torch

from lowmem_alignprop.step.update import optimizer_update


def _param(grad):
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    p.grad = torch.tensor(grad)
    return p, torch.optim.SGD([p], lr=1.0)


def test_the_update_clips_to_max_grad_norm_steps_and_frees_the_gradients():
    p, opt = _param([3.0, 4.0])  # norm 5
    norm, dropped = optimizer_update(opt, [p], 1.0)
    assert norm == 5.0 and isinstance(norm, float) and not dropped
    coef = 1.0 / (5.0 + 1e-6)  # torch's clip coefficient: max_norm / (norm + 1e-6)
    expected = torch.tensor([1.0 - 3.0 * coef, 1.0 - 4.0 * coef])
    assert torch.allclose(p.detach(), expected, rtol=4 * torch.finfo(torch.float32).eps, atol=0)
    assert p.grad is None  # set to None, not zeroed: the memory goes back


def test_without_clipping_the_full_gradient_is_applied_and_no_norm_is_read():
    p, opt = _param([3.0, 4.0])
    norm, dropped = optimizer_update(opt, [p], 0.0)
    assert norm is None and not dropped
    assert p.detach().tolist() == [-2.0, -3.0]


def test_a_clip_passed_in_is_used_and_its_norm_can_stay_unread():
    p, opt = _param([3.0, 4.0])
    calls = []

    def clip(params, max_norm):
        calls.append(max_norm)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    norm, _ = optimizer_update(opt, [p], 2.5, clip=clip, read_norm=False)
    assert calls == [2.5] and norm is None  # the planner's fake norm has no value to read
    assert math.isclose(p.detach().norm().item(), torch.tensor([1.0 - 1.5, 1.0 - 2.0]).norm().item(), rel_tol=1e-6)


def test_a_norm_that_is_not_finite_drops_the_update_when_asked():
    p, opt = _param([float("nan"), 1.0])
    norm, dropped = optimizer_update(opt, [p], 1.0, drop_if_not_finite=True)
    assert dropped and math.isnan(norm)
    assert p.detach().tolist() == [1.0, 1.0] and p.grad is None  # no step, gradients freed


def test_without_clipping_a_norm_that_is_not_finite_still_drops_the_update():
    """max_grad_norm 0 with drop_if_not_finite: the norm is read (not clipped) and a NaN/inf gradient makes no update
    (it was applied: the weights turned NaN); a finite one is applied whole, its norm returned."""
    p, opt = _param([float("inf"), 1.0])
    norm, dropped = optimizer_update(opt, [p], 0.0, drop_if_not_finite=True)
    assert dropped and norm == math.inf and p.detach().tolist() == [1.0, 1.0] and p.grad is None
    p, opt = _param([3.0, 4.0])
    norm, dropped = optimizer_update(opt, [p], 0.0, drop_if_not_finite=True)
    assert (norm, dropped) == (5.0, False) and p.detach().tolist() == [-2.0, -3.0]


def test_without_the_optimizer_step_only_the_gradients_are_freed():
    p, opt = _param([3.0, 4.0])
    norm, dropped = optimizer_update(opt, [p], 0.0, step=False)
    assert (norm, dropped) == (None, False)
    assert p.detach().tolist() == [1.0, 1.0] and p.grad is None


@pytest.mark.parametrize(("schedule", "name"), [("constant", "constant_with_warmup"), ("linear", "linear"),
                                                ("cosine", "cosine")])
def test_the_learning_rate_of_each_step_is_diffusers_schedule_as_its_scripts_step_it(schedule, name):
    """lr_scheduler/lr_warmup_steps: step s trains at the rate diffusers' get_scheduler gives after s-1 steps of its
    own (the reference: a scheduler stepped after each optimizer step, as diffusers' training scripts do), set on the
    optimizer whatever order the steps come in (a resume, a retried step)."""
    from diffusers.optimization import get_scheduler

    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.step.update import LearningRate

    cfg = Config(lr=0.5, lr_scheduler=schedule, lr_warmup_steps=3, steps=10)
    p, opt = _param([0.0, 0.0])
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    reference = get_scheduler(name, reference_opt, num_warmup_steps=3, num_training_steps=10)
    expected = []
    for _ in range(10):
        expected.append(reference_opt.param_groups[0]["lr"])
        reference_opt.step()
        reference.step()
    rate = LearningRate(opt, cfg)
    for step in [*range(10, 0, -1), 4]:  # backwards, then one again: a function of the step alone
        rate.at(step)
        assert opt.param_groups[0]["lr"] == expected[step - 1] == rate.rate(step)
    assert expected[0] == 0.0 and expected[3] == 0.5  # from 0, at lr once the 3 warmup steps are done
    assert (expected[-1] == 0.5) == (schedule == "constant") and min(expected[4:]) > 0  # decays, not to 0 in the run


def test_the_default_learning_rate_is_left_as_the_optimizer_has_it():
    """constant without warmup (AlignProp's): no schedule, the optimizer's rate untouched (a resume's restored one)."""
    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.step.update import LearningRate

    p, opt = _param([0.0, 0.0])
    rate = LearningRate(opt, Config(lr=0.5))
    opt.param_groups[0]["lr"] = 0.25
    rate.at(3)
    assert opt.param_groups[0]["lr"] == 0.25 and rate.rate(3) == 0.5 and rate.schedule is None

"""The guard's parts: finite checks, the kept last good state, collapse detection."""

import math

import pytest
import torch

from lorafuse.engine.guard import CollapseWatch, LastGood, weights_finite


def test_weights_finite_sees_one_bad_element_anywhere():
    params = [torch.randn(3, 4), torch.randn(5)]
    assert bool(weights_finite(params))
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = [p.clone() for p in params]
        broken[1][2] = bad
        assert not bool(weights_finite(broken))


def test_last_good_restores_weights_and_optimizer_state_exactly():
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([w], lr=0.1)
    last_good = LastGood([w], opt)
    with pytest.raises(RuntimeError, match="before its first update"):
        last_good.restore()
    for step in range(3):
        w.grad = torch.randn_like(w)
        last_good.keep(step)
        kept_w, kept_state = w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()}
        opt.step()
    w.grad = torch.full_like(w, float("nan"))
    opt.step()  # a bad update: NaN weights and moments
    assert not torch.isfinite(w).all()
    assert last_good.restore() == 2
    assert torch.equal(w.detach(), kept_w) and w.grad is None
    for key, value in opt.state[w].items():
        assert torch.equal(value, kept_state[key]), key
    w.grad = torch.ones_like(w)
    opt.step()  # the restored optimizer goes on from its kept moments
    assert torch.isfinite(w).all()


def test_collapse_needs_a_uniform_loss_and_no_gradient_several_steps_in_a_row():
    watch = CollapseWatch(vocab_size=400, patience=3)
    uniform = math.log(400)
    assert not watch.collapsed(uniform, 0.0)
    assert not watch.collapsed(uniform, 0.0)
    assert not watch.collapsed(uniform, 0.5)  # a gradient: it can still move, the streak restarts
    assert not watch.collapsed(uniform * 0.9, 0.0)  # learning something
    assert [watch.collapsed(uniform, 0.0) for _ in range(3)] == [False, False, True]

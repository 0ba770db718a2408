"""The lambda-network and the primal-dual step (method.md Eqs. 11-13, §3.3)."""

from __future__ import annotations

import pytest
import torch

from odedit.dual import DualState, LambdaNet, adaptive_step, parameter_summary


def test_lambda_is_nonnegative_and_starts_near_softplus_bias():
    net = LambdaNet(8, hidden=16, init_bias=2.0)
    lam = net(torch.randn(8) * 100)
    assert lam.item() >= 0
    assert lam.item() == pytest.approx(torch.nn.functional.softplus(torch.tensor(2.0)).item(), rel=0.2)


def test_summary_is_finite_and_differentiable_at_zero():
    b = torch.zeros(4, 3, requires_grad=True)  # LoRA's B starts at exactly zero
    s = parameter_summary([b, torch.randn(5)])
    assert s.shape == (8,)
    s.sum().backward()
    assert torch.isfinite(b.grad).all()


def test_dual_ascent_increases_lambda_when_penalty_positive():
    torch.manual_seed(0)
    params = [torch.randn(3, 3)]
    dual = DualState("learned", 1, hidden=8, dual_lr=0.5)
    before = dual.lam(params).item()
    for k in range(1, 6):
        dual.ascent(penalty=1.0, params=params, k=k)
    after = dual.lam(params).item()
    assert after > before
    snapshot = [p.clone() for p in dual.parameters()]
    assert dual.ascent(penalty=0.0, params=params, k=6) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(snapshot, dual.parameters()))


def test_dual_ascent_adaptive_rule_step_length():
    params = [torch.randn(2, 2)]
    dual = DualState("learned", 1, hidden=4, step_rule="adaptive", adaptive_p=2.0, adaptive_scale=0.3)
    length = dual.ascent(penalty=2.0, params=params, k=3)
    assert length == pytest.approx(0.3 / 9)


def test_fixed_and_off_modes():
    params = [torch.randn(2)]
    assert DualState("fixed", 1, fixed_lambda=2.5).lam(params).item() == 2.5
    off = DualState("off", 1)
    assert not off.active and off.lam(params).item() == 0.0 and off.parameters() == []


def test_adaptive_step_formula():
    assert adaptive_step(2, 4.0, 1.5, 1.0) == pytest.approx(1 / (2**1.5 * 4.0))
    assert adaptive_step(1, 0.0, 1.1, 1.0) == 0.0


def test_state_dict_round_trip_and_mode_mismatch():
    a = DualState("learned", 2, hidden=4, seed=1)
    b = DualState("learned", 2, hidden=4, seed=2)  # another seed: the round trip has something to carry
    assert not any(torch.equal(x, y) for x, y in zip(a.parameters()[:1], b.parameters()[:1]))
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="penalty mode"):
        DualState("fixed", 2).load_state_dict(a.state_dict())


def test_saturated_ascent_never_takes_lambda_above_the_cap():
    torch.manual_seed(0)
    params = [torch.randn(3, 3)]
    capped = DualState("learned", 1, hidden=8, dual_lr=5.0, cap=3.0)
    free = DualState("learned", 1, hidden=8, dual_lr=5.0)
    for k in range(1, 30):
        capped.ascent(penalty=10.0, params=params, k=k)
        free.ascent(penalty=10.0, params=params, k=k)
        assert capped.lam(params).item() <= 3.0 + 1e-5
    assert free.lam(params).item() > 100, "without the cap the same ascent runs away"
    assert capped.lam(params).item() == pytest.approx(3.0), "lambda saturates at the cap"
    stuck = [p.clone() for p in capped.parameters()]
    assert capped.ascent(penalty=10.0, params=params, k=30) == 0.0, "no ascent past the cap"
    assert all(torch.equal(a, b) for a, b in zip(stuck, capped.parameters()))
    big = DualState("learned", 1, hidden=8, dual_lr=50.0, cap=1000.0)  # above softplus's linear threshold
    for k in range(1, 30):
        big.ascent(penalty=100.0, params=params, k=k)
    assert big.lam(params).item() == pytest.approx(1000.0)


@pytest.mark.parametrize("bias,cap", [(0.0, float("inf")), (25.0, float("inf")), (3.0, 2.0), (-2.0, 1e3)])
def test_hand_written_lambda_gradient_equals_autograd(bias, cap):
    """The dual ascent's d lambda / d delta by hand = autograd's, on the linear branch of softplus (bias 25),
    above the cap (zero gradient) and below it."""
    torch.manual_seed(0)
    net = LambdaNet(8, hidden=16, init_bias=bias, seed=3, cap=cap)
    with torch.no_grad():
        net.fc2.weight.normal_()  # leave the near-zero init so that the hidden layer matters
    summary = torch.randn(8) * 3
    expected = torch.autograd.grad(net(summary), list(net.parameters()), allow_unused=True)
    got = net.parameter_grads(summary)
    for e, g, p in zip(expected, got, net.parameters()):
        e = torch.zeros_like(p) if e is None else e
        assert g.shape == p.shape and torch.allclose(g, e, rtol=1e-5, atol=1e-7)

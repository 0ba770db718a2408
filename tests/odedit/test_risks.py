"""Each ODEdit risk against a naive reference (method.md Eqs. 2, 3, 6, 9)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from odedit.risks import (
    generality_risk,
    kernel_bandwidths,
    locality_risk,
    locality_risk_and_slope,
    median_bandwidth,
    mmd_weights,
    multi_gaussian_kernel,
    penalty_from_slopes,
    reliability_risk,
    reliability_risk_and_slope,
    tv_l1_penalty,
)


def test_reliability_is_per_sample_mean_nll():
    torch.manual_seed(1)
    logits = torch.randn(5, 7)
    targets = torch.tensor([1, 2, 3, 4, 5])
    rows = torch.tensor([0, 0, 0, 1, 1])
    logp = torch.log_softmax(logits, -1)
    nll = [-logp[i, targets[i]].item() for i in range(5)]
    naive = ((nll[0] + nll[1] + nll[2]) / 3 + (nll[3] + nll[4]) / 2) / 2
    assert reliability_risk(logits, targets, rows, 2).item() == pytest.approx(naive, rel=1e-6)


def _full_refs(logits):
    logp = torch.log_softmax(logits, -1)
    vals, ids = logp.topk(logits.shape[-1], -1)
    return ids, vals


def test_kl_is_zero_for_identical_logits():
    logits = torch.randn(4, 9)
    ids, vals = _full_refs(logits)
    assert locality_risk(logits, ids, vals, torch.tensor([0, 0, 1, 1]), 2).item() == pytest.approx(0.0, abs=1e-6)
    ids3, vals3 = ids[:, :3], vals[:, :3]  # with a tail bucket too
    assert locality_risk(logits, ids3, vals3, torch.tensor([0, 0, 1, 1]), 2).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_direction_edited_to_original_matches_naive():
    torch.manual_seed(2)
    pre, post = torch.randn(3, 6), torch.randn(3, 6)
    ids, vals = _full_refs(pre)
    q, p = torch.softmax(post, -1), torch.softmax(pre, -1)
    naive = (q * (q.log() - p.log())).sum(-1).mean().item()
    got = locality_risk(post, ids, vals, torch.tensor([0, 1, 2]), 3).item()
    assert got == pytest.approx(naive, rel=1e-5)


def test_kl_tail_bucket_is_coarse_grained_kl_and_a_lower_bound():
    torch.manual_seed(3)
    pre, post = torch.randn(1, 8), torch.randn(1, 8)
    logp_pre = torch.log_softmax(pre, -1)
    vals, ids = logp_pre.topk(3, -1)
    q, p = torch.softmax(post, -1)[0], logp_pre.exp()[0]
    keep = ids[0]
    rest = torch.ones(8, dtype=torch.bool)
    rest[keep] = False
    qc = torch.cat([q[keep], q[rest].sum(0, keepdim=True)])
    pc = torch.cat([p[keep], p[rest].sum(0, keepdim=True)])
    naive = (qc * (qc.log() - pc.log())).sum().item()
    got = locality_risk(post, ids, vals, torch.tensor([0]), 1).item()
    assert got == pytest.approx(naive, rel=1e-5)
    full = (q * (q.log() - p.log())).sum().item()
    assert got <= full + 1e-6


def test_mmd_matches_explicit_double_loop():
    torch.manual_seed(4)
    x, y = torch.randn(3, 5), torch.randn(4, 5) + 0.5
    sigmas = torch.tensor([0.5, 1.0, 2.0])

    def k(a, b):
        return sum(math.exp(-((a - b) ** 2).sum().item() / (2 * s**2)) for s in sigmas.tolist())

    exx = sum(k(a, b) for a, b in itertools.product(x, x)) / 9
    eyy = sum(k(a, b) for a, b in itertools.product(y, y)) / 16
    exy = sum(k(a, b) for a, b in itertools.product(x, y)) / 12
    assert generality_risk(x, y, sigmas).item() == pytest.approx(exx + eyy - 2 * exy, rel=1e-5)


def test_mmd_single_pair_reduces_to_pull_term():
    x, y = torch.randn(1, 4), torch.randn(1, 4)
    sigmas = torch.tensor([1.0, 2.0])
    expected = 2 * 2 - 2 * multi_gaussian_kernel(x, y, sigmas).item()  # 2 k_max - 2 k(z_e, z_r), k_max = Q
    assert generality_risk(x, y, sigmas).item() == pytest.approx(expected, rel=1e-5)
    assert generality_risk(x, x.clone(), sigmas).item() == pytest.approx(0.0, abs=1e-6)


def test_median_heuristic_and_bandwidth_ladder():
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[3.0]])
    # pairwise squared distances among {0, 1, 3}: 1, 9, 4 -> median 4 -> sigma 2
    assert median_bandwidth(x, y).item() == pytest.approx(2.0)
    s = kernel_bandwidths(x, y, n_kernels=5, mult=2.0)
    assert s.tolist() == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0])
    assert kernel_bandwidths(x, y, 3, base=1.5, mult=3.0).tolist() == pytest.approx([0.5, 1.5, 4.5])


def _risks(logits_list):
    targets = torch.tensor([0, 1])
    rows = torch.tensor([0, 1])
    return [lambda w, lg=lg: reliability_risk(lg, targets, rows, 2, w) for lg in logits_list]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_penalty_matches_finite_difference_in_omega(reduction):
    torch.manual_seed(5)
    envs = [torch.randn(2, 5), torch.randn(2, 5) * 2]
    ref_ids, ref_lp = _full_refs(torch.randn(2, 5))
    loc = torch.randn(2, 5)
    risks = _risks(envs) + [lambda w: locality_risk(loc, ref_ids, ref_lp, torch.tensor([0, 1]), 2, w)]
    got = tv_l1_penalty(risks, torch.tensor(1.0, requires_grad=True), reduction).item()
    h = 1e-3
    fd = [abs((r(torch.tensor(1 + h)) - r(torch.tensor(1 - h))).item() / (2 * h)) for r in risks]
    agg = sum(fd) / len(fd) if reduction == "mean" else sum(fd)
    assert got == pytest.approx(agg**2, rel=1e-3)


def test_penalty_is_differentiable_in_the_logits_only_through_first_order_graph():
    logits = torch.randn(2, 5, requires_grad=True)
    pen = tv_l1_penalty(_risks([logits]))
    pen.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_penalty_zero_when_risks_do_not_depend_on_omega():
    const = torch.tensor(3.0)
    assert tv_l1_penalty([lambda w: const + 0 * w]).item() == 0.0
    assert tv_l1_penalty([]).item() == 0.0


def _autograd_slope(risk, logits):
    """(R, dR/domega at 1) and the gradient of that slope in the logits, by double backward (the reference)."""
    omega = torch.tensor(1.0, requires_grad=True)
    value = risk(logits, omega)
    (slope,) = torch.autograd.grad(value, omega, create_graph=True)
    (dlogits,) = torch.autograd.grad(slope, logits)
    return value.item(), slope.item(), dlogits


@pytest.mark.parametrize("k", [3, 9])
def test_closed_form_slopes_equal_double_backward(k):
    """The objective's closed-form dR_e/domega (and their gradients) equal autograd's second-order result."""
    torch.manual_seed(7)
    rows, n = torch.tensor([0, 0, 1, 2]), 3
    targets = torch.tensor([1, 4, 0, 8])
    ref_ids, ref_lp = _full_refs(torch.randn(4, 9))
    ref_ids, ref_lp = ref_ids[:, :k], ref_lp[:, :k]  # k = 9: all tokens stored, the tail is clamped at eps
    cases = [
        (
            lambda lg, w=1.0: reliability_risk(lg, targets, rows, n, w),
            lambda lg: reliability_risk_and_slope(lg, targets, rows, n),
        ),
        (
            lambda lg, w=1.0: locality_risk(lg, ref_ids, ref_lp, rows, n, w),
            lambda lg: locality_risk_and_slope(lg, ref_ids, ref_lp, rows, n),
        ),
    ]
    for reference, closed in cases:
        logits = (torch.randn(4, 9) * 3).requires_grad_()
        value, slope, dlogits = _autograd_slope(reference, logits)
        got_value, got_slope = closed(logits)
        assert got_value.item() == pytest.approx(value, rel=1e-5, abs=1e-7)
        assert got_slope.item() == pytest.approx(slope, rel=1e-4, abs=1e-6)
        (got_dlogits,) = torch.autograd.grad(got_slope, logits)
        assert torch.allclose(got_dlogits, dlogits, rtol=1e-4, atol=1e-6)


def test_smoothed_penalty_ignores_rounding_sized_slopes_and_keeps_real_ones():
    """sqrt(s^2 + eps^2) - eps: within eps of |s|; its gradient is ~0 at a slope of rounding size (an environment
    at its optimum) and ~sign(s) at a real slope, where the plain |s| jumps between 0 and +-1."""
    eps = 1e-3
    for reduction in ("mean", "sum"):
        s = torch.tensor([2.0, -0.5, 0.0, 1e-7, -3e-8])
        plain, smooth = penalty_from_slopes(s, reduction), penalty_from_slopes(s, reduction, eps)
        assert plain >= smooth and float(plain.sqrt() - smooth.sqrt()) <= len(s) * eps
    s = torch.tensor([2.0, -0.5, 0.0, 1e-7, -3e-8], requires_grad=True)
    (g,) = torch.autograd.grad(penalty_from_slopes(s, "mean", eps), s)
    (g0,) = torch.autograd.grad(penalty_from_slopes(s, "mean"), s)
    assert abs(float(g0[3])) == abs(float(g0[0])) > 0  # plain |s|: a 1e-7 slope weighs like a slope of 2
    assert abs(float(g[3])) < 1e-3 * abs(float(g[0])) and abs(float(g[4])) < 1e-3 * abs(float(g[0]))
    assert float(g[2]) == 0.0
    assert torch.allclose(g[:2], g0[:2], rtol=2e-3)
    assert torch.equal(penalty_from_slopes(s, "sum", 0.0), penalty_from_slopes(s, "sum"))


def test_risks_of_bf16_logits_are_fp32_and_their_omega_slopes_are_not_taken_on_bf16_products():
    # [INFERENCE] (odedit.risks): whatever the model dtype, the risks and their omega-slopes are fp32 numbers of
    # the fp32 cast of the logits; scaling bf16 logits by omega before the cast would round omega * z to 8 bits
    # (the slope at omega = 1 came out 10.25 instead of 10.2265 on these logits).
    torch.manual_seed(3)
    logits = (torch.randn(6, 50) * 4).to(torch.bfloat16)
    targets = torch.randint(0, 50, (6,))
    rows = torch.tensor([0, 0, 1, 1, 1, 2])
    ref = torch.log_softmax(torch.randn(6, 50), -1).topk(8, -1)
    risks = {
        "rel": (
            lambda z, w: reliability_risk(z, targets, rows, 3, w),
            reliability_risk_and_slope(logits, targets, rows, 3),
        ),
        "loc": (
            lambda z, w: locality_risk(z, ref.indices, ref.values, rows, 3, w),
            locality_risk_and_slope(logits, ref.indices, ref.values, rows, 3),
        ),
    }
    for name, (risk, (closed_value, closed_slope)) in risks.items():
        assert closed_value.dtype == closed_slope.dtype == torch.float32, name
        for at in (1.0, 1.0 + 2**-6):
            values, slopes = [], []
            for z in (logits, logits.float()):
                omega = torch.tensor(at, requires_grad=True)
                value = risk(z, omega)
                values.append(value)
                slopes.append(torch.autograd.grad(value, omega)[0])
            assert values[0].dtype == slopes[0].dtype == torch.float32, name
            assert torch.equal(values[0], values[1]) and torch.equal(slopes[0], slopes[1]), (name, at)
            if at == 1.0:
                assert torch.allclose(values[0], closed_value, rtol=1e-6), name
                assert torch.allclose(slopes[0], closed_slope, rtol=1e-5), name


def test_unbiased_mmd_drops_self_similarity_and_is_near_zero_for_one_distribution():
    # Issue 17: the biased V-statistic counts each state's similarity to itself (k_max per kernel), so two
    # samples of ONE distribution get a clearly positive R_gen; the unbiased U-statistic is ~0 there.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 8, generator=g), torch.randn(24, 8, generator=g)
    sigmas = kernel_bandwidths(x, y)
    biased = float(generality_risk(x, y, sigmas))
    unbiased = float(generality_risk(x, y, sigmas, estimator="unbiased"))
    assert biased > 0.1 and abs(unbiased) < 0.2 * biased, (biased, unbiased)
    # against the definition, pair by pair
    k = multi_gaussian_kernel(torch.cat([x[:3], y[:2]]), torch.cat([x[:3], y[:2]]), sigmas)
    kee, krr, ker = k[:3, :3], k[3:, 3:], k[:3, 3:]
    naive = (kee.sum() - kee.diag().sum()) / 6 + (krr.sum() - krr.diag().sum()) / 2 - 2 * ker.mean()
    assert torch.allclose(generality_risk(x[:3], y[:2], sigmas, estimator="unbiased"), naive, atol=1e-5)
    # one edit state: no within-set pair, so its term is 0 (the estimate can be negative)
    w = mmd_weights(1, 2)
    assert float(w[0, 0]) == 0.0 and torch.allclose(w[1:, 1:], torch.tensor([[0.0, 0.5], [0.5, 0.0]]))
    z = torch.zeros(1, 8)
    assert float(generality_risk(z, z.repeat(2, 1), sigmas)) == pytest.approx(0.0, abs=1e-6)
    assert float(generality_risk(z, z.repeat(2, 1), sigmas, estimator="unbiased")) < 0

"""All environments' risks in one pass (`odedit.envrisks`) against the per-environment reference functions."""

from __future__ import annotations

import pytest
import torch

from odedit.envrisks import build_plan, env_risks
from odedit.envs import Reference
from odedit.models.base import EncodedBatch, ForwardOutput
from odedit.risks import locality_risk_and_slope, reliability_risk_and_slope

V, K = 11, 4


def _output(targets: list[list[int]], seed: int) -> ForwardOutput:
    """A ForwardOutput of len(targets) rows of length 5 whose answer positions carry `targets` (-100 = none)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.full((len(targets), 5), -100)
    for b, row in enumerate(targets):
        for i, tok in enumerate(row):
            t[b, 4 - len(row) + i] = tok
    batch = EncodedBatch(
        {}, t, t < 0, torch.zeros(len(targets), dtype=torch.long), torch.zeros(len(targets), dtype=torch.bool)
    )
    logits = (torch.randn(len(targets), 5, V, generator=g) * 2).requires_grad_()
    return ForwardOutput(logits, torch.zeros(len(targets), 5, 3), batch)


class _Case:
    def __init__(self, refs):
        self.references = refs


def _ref(n: int, seed: int) -> Reference:
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(n, V, generator=g), -1)
    vals, ids = logp.topk(K, -1)
    return Reference(ids, vals)


@pytest.mark.parametrize("with_empty_row", [False, True])
def test_one_pass_equals_each_environment_through_the_reference_functions(with_empty_row):
    outs = {
        "in": _output([[3, 5], [7]], 0),
        "se_text": _output([[1]] + ([[]] if with_empty_row else []), 1),
        "out_text": _output([[2, 2], [4]], 2),
        "out_mm": _output([[9]], 3),
    }
    # Two cases own the OUT rows: out_text row 0 is case 0's sample 0, row 1 is case 1's sample 0, ...
    cases = [_Case({"out_text": [_ref(2, 10)], "out_mm": [_ref(1, 11)]}), _Case({"out_text": [_ref(1, 12)]})]
    owners = {"out_text": [(0, 0), (1, 0)], "out_mm": [(0, 0)]}
    plan = build_plan(outs, cases, owners, ("in", "se_text", "se_image", "out_text", "out_mm"))
    assert plan.envs == ("in", "se_text", "out_text", "out_mm"), "absent environments are skipped"
    values, slopes = env_risks(plan, outs)
    total = values.sum() + slopes.pow(2).sum()
    got = torch.autograd.grad(total, [o.logits for o in outs.values()])
    for i, (env, o) in enumerate(outs.items()):
        if env.startswith("out"):
            refs = [cases[c].references[env][j] for c, j in owners[env]]
            ids = torch.cat([r.topk_ids for r in refs])
            lps = torch.cat([r.topk_logprobs for r in refs])
            value, slope = locality_risk_and_slope(o.answer_logits(), ids, lps, o.answer_row(), o.batch.size)
        else:
            value, slope = reliability_risk_and_slope(
                o.answer_logits(), o.answer_targets(), o.answer_row(), o.batch.size
            )
        assert values[i].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-7), env
        assert slopes[i].item() == pytest.approx(slope.item(), rel=1e-5, abs=1e-7), env
        (ref_grad,) = torch.autograd.grad(value + slope.pow(2), o.logits)
        assert torch.allclose(got[i], ref_grad, rtol=1e-4, atol=1e-6), env

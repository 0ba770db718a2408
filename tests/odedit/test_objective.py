"""ODEdit's knobs in the objective (issue 17 item 1): the locality reference and the MMD^2 estimator, and their
checks at load."""

from __future__ import annotations

import pytest
import torch
from testdata import step_cases

from odedit.config import ConfigError
from odedit.editstep import encode_envs, forward_envs
from odedit.envs import attach_references
from odedit.loading import load_config
from odedit.methods import METHODS
from odedit.objective import build_objective


def _cfg(*overrides):
    return load_config(None, ["method.name=ft", "model.family=llava", "odedit.penalty=fixed", *overrides])


def test_locality_reference_original_before_step_or_both_and_the_mmd_estimator(tiny_adapter):
    adapter = tiny_adapter("llava")
    cases = step_cases()
    attach_references(adapter, cases, k=8)  # the original model's references
    method = METHODS.get("ft").method_cls(adapter, _cfg().method)
    method.prepare()
    params = list(method.editable().values())
    with torch.no_grad():  # earlier edits of a stream moved the model away from the original
        g = torch.Generator().manual_seed(0)
        for p in params:
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    parts = {}
    for ref in ("original", "before_step", "both"):
        objective = build_objective(_cfg(f"odedit.locality_reference={ref}").odedit, method)
        encoded = encode_envs(adapter, cases, objective.envs)
        objective.owners = encoded.owners
        outs = forward_envs(adapter, encoded)
        _, parts[ref] = objective.loss(method, outs, cases, 1, params)
        if ref == "before_step":
            # its references are the model's own logits at the step's first forward pass (the step's start)
            refs = objective._step_refs[1]["out_mm"]
            logp = torch.log_softmax(outs["out_mm"].answer_logits().detach().float(), -1)
            rows = outs["out_mm"].answer_row()
            for b, r in enumerate(refs):
                vals, ids = logp[rows == b].topk(8, dim=-1)
                assert torch.equal(r.topk_ids, ids) and torch.allclose(r.topk_logprobs, vals)
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p in params:  # an update within the step: the step's references stay where they were
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
            _, later = objective.loss(method, forward_envs(adapter, encoded), cases, 2, params)
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            assert later["r_loc"] > 1e-5, "R_loc after an update within the step is no longer 0"
    assert parts["original"]["r_loc"] > 1e-4, "R_loc repairs what the earlier edits moved"
    assert abs(parts["before_step"]["r_loc"]) < 1e-3 * parts["original"]["r_loc"], "0 at the step's start"
    assert {"risk/out_text_step", "slope/out_mm_step"} <= parts["before_step"].keys()
    assert parts["both"]["r_loc"] == pytest.approx(parts["original"]["r_loc"], rel=1e-5)
    assert {"risk/out_text", "risk/out_text_step"} <= parts["both"].keys()

    unbiased = build_objective(_cfg("odedit.mmd_estimator=unbiased").odedit, method)
    encoded = encode_envs(adapter, cases, unbiased.envs)
    unbiased.owners = encoded.owners
    _, p_u = unbiased.loss(method, forward_envs(adapter, encoded), cases, 1, params)
    # 2 IN and 4 SE states: the biased estimate carries (1/2 + 1/4) x 5 kernels of self-similarity
    assert p_u["r_gen"] < parts["original"]["r_gen"] - 1.0


@pytest.mark.parametrize(
    ("override", "field", "message"),
    [
        ("odedit.locality_reference=start", "odedit.locality_reference", "original"),
        ("odedit.mmd_estimator=u", "odedit.mmd_estimator", "unbiased"),
        ("resources.num_workers=2", "method.early_stop", "num_workers=1"),
    ],
)
def test_knobs_are_checked_at_load(override, field, message, record_outcome):
    with pytest.raises(ConfigError) as err:
        _cfg("method.early_stop=true", override)
    assert field in str(err.value) and message in str(err.value)
    record_outcome("bad config", f"config {override} (issue 17 knob)", "refused at load", field)

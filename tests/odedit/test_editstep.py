"""One edit step's merged forward pass (`odedit.editstep`): the environments' views and ODEdit's fast paths.

ODEdit's objective reads every environment of a step's merged forward output. Given an `EnvOutputs` it
indexes the merged output once (answer logits for the risks, last-prompt states for R_gen); given a plain
mapping of per-environment outputs it goes environment by environment. Both must give the same loss, the
same logged parts and the same gradient; for a host whose loss is the default R_rel, the host part read from
ODEdit's pass is that loss.
"""

from __future__ import annotations

import torch
from testdata import step_cases

from odedit.editstep import EnvOutputs, encode_envs, forward_envs
from odedit.envs import attach_references
from odedit.loading import load_config
from odedit.methods import METHODS
from odedit.objective import build_objective

ENVS = ("in", "se_text", "se_image", "out_text", "out_mm")


def test_environment_views_are_the_rows_of_the_merged_output(tiny_adapter):
    adapter = tiny_adapter("llava")
    encoded = encode_envs(adapter, step_cases(), ENVS)
    outs = forward_envs(adapter, encoded)
    assert isinstance(outs, EnvOutputs) and list(outs) == list(ENVS) and len(outs) == 5
    for env, span in encoded.spans.items():
        ref = outs.merged.select(span)
        view = outs[env]
        assert torch.equal(view.logits, ref.logits) and torch.equal(view.hidden, ref.hidden)
        assert torch.equal(view.batch.targets, ref.batch.targets)
        assert torch.equal(view.batch.last_prompt, ref.batch.last_prompt)
        assert outs[env] is view  # cut once
    assert "out_hard" not in outs


def test_odedit_loss_is_the_same_through_the_merged_fast_path_and_per_environment(tiny_adapter):
    adapter = tiny_adapter("llava")
    cfg = load_config(None, ["method.name=ft", "model.family=llava", "odedit.enabled=true", "odedit.warmup_iters=0"])
    method = METHODS.get("ft").method_cls(adapter, cfg.method)
    method.prepare()
    cases = step_cases()
    attach_references(adapter, cases, k=8)
    params = list(method.editable().values())
    results = []
    for fast in (True, False):
        objective = build_objective(cfg.odedit, method)
        encoded = encode_envs(adapter, cases, objective.envs)
        objective.owners = encoded.owners
        steps = []
        for k in (1, 2):
            outs = forward_envs(adapter, encoded)
            if not fast:
                outs = {env: outs[env] for env in outs}  # a plain mapping: no merged output to index
            loss, parts = objective.loss(method, outs, cases, k, params)
            # FT's loss is the default R_rel: ODEdit reads it from its vectorised pass; the same number.
            assert abs(parts["host"] - float(method.host_loss(outs, cases).detach())) <= 1e-5
            steps.append((loss.detach(), parts, torch.autograd.grad(loss, params)))
        results.append(steps)
    for (l_fast, p_fast, g_fast), (l_slow, p_slow, g_slow) in zip(*results):
        assert torch.allclose(l_fast, l_slow, rtol=1e-5, atol=1e-6)
        assert p_fast.keys() == p_slow.keys() and {"r_loc", "r_gen", "penalty", "lambda"} <= p_fast.keys()
        for key in p_fast:
            assert abs(p_fast[key] - p_slow[key]) <= 1e-5 * max(1.0, abs(p_slow[key])), key
        for a, b in zip(g_fast, g_slow):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)

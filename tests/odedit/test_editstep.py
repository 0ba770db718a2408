"""One edit step's merged forward pass (`odedit.editstep`): the environments' views and ODEdit's fast paths.

ODEdit's objective reads every environment of a step's merged forward output. Given an `EnvOutputs` it
indexes the merged output once (answer logits for the risks, last-prompt states for R_gen); given a plain
mapping of per-environment outputs it goes environment by environment. Both must give the same loss, the
same logged parts and the same gradient; for a host whose loss is the default R_rel, the host part read from
ODEdit's pass is that loss.
"""

from __future__ import annotations

import math

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


def test_a_bf16_edit_step_on_cpu_has_finite_losses_with_risks_penalty_and_mmd_in_fp32(tiny_dir, monkeypatch):
    import dataclasses

    import odedit.objective as objective_module
    from odedit.editing import Editor
    from odedit.models import load_adapter

    cfg = load_config(
        None,
        [
            "method.name=ft",
            "model.family=llava",
            "resources.precision=bf16",
            "method.n_iter=3",
            "odedit.warmup_iters=0",
        ],
    )
    adapter = load_adapter(dataclasses.replace(cfg.model, device="cpu", dtype=cfg.model_dtype()), tiny_dir("llava"))
    assert adapter.dtype == torch.bfloat16
    cases = step_cases()
    attach_references(adapter, cases, k=8)
    assert all(r.topk_logprobs.dtype == torch.float32 for c in cases for refs in c.references.values() for r in refs)
    seen: dict[str, list[torch.dtype]] = {}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            for t in out if isinstance(out, tuple) else (out,):
                seen.setdefault(name, []).append(t.dtype)
            return out

        monkeypatch.setattr(objective_module, name, wrapped)

    for name in ("env_risks", "generality_risk_stacked", "penalty_from_slopes"):
        spy(name, getattr(objective_module, name))
    editor = Editor(adapter, cfg)
    params = list(editor.method.editable().values())
    before = [p.detach().clone() for p in params]
    handle, report = editor.edit(cases)
    assert report.failed is None and len(report.parts) == 3
    for parts in report.parts:
        assert {"host", "r_loc", "r_gen", "penalty", "lambda", "loss"} <= parts.keys()
        assert all(math.isfinite(v) for v in parts.values()), parts
    assert report.parts[0]["r_loc"] < 1e-4  # references from the same bf16 model: R_loc starts at 0
    # R_rel, R_loc and their slopes; R_gen's MMD; the TV-l1 penalty: fp32 though the model is bf16
    assert seen.keys() == {"env_risks", "generality_risk_stacked", "penalty_from_slopes"}
    assert all(d == torch.float32 for dtypes in seen.values() for d in dtypes), seen
    assert all(p.dtype == torch.float32 for p in editor.objective.extra_parameters())  # the lambda-network
    assert all(p.dtype == torch.bfloat16 for p in params) and any(not torch.equal(p, b) for p, b in zip(params, before))
    handle.restore()


def test_early_stop_ends_a_step_once_the_target_is_reached_and_reports_its_probability(tiny_adapter):
    # Issue 17 item 2: `method.early_stop` stops at the first iteration whose forward pass has every IN target
    # token as the argmax; the iterations taken and the target's probability after them are reported. The target
    # here is the model's own greedy answer, reached before any update.
    import dataclasses

    from odedit.editing import Editor

    reports = {}
    for stop in (False, True):
        cfg = load_config(
            None,
            [
                "method.name=ft",
                "model.family=llava",
                "odedit.enabled=false",
                "method.n_iter=3",
                f"method.early_stop={stop}",
            ],
        )
        adapter = tiny_adapter("llava")
        case = step_cases()[0]
        own = adapter.generate(case.env("in"), max_new_tokens=2)[0]
        case.samples["in"] = [dataclasses.replace(case.env("in")[0], target=own)]
        _, reports[stop] = Editor(adapter, cfg).edit([case])
    full, early = reports[False], reports[True]
    assert full.iterations == cfg.method.n_iter and not full.stopped_early and 0.0 < full.target_prob <= 1.0
    assert early.stopped_early and early.iterations == 0 and len(early.parts) == 1
    assert 0.0 < early.target_prob <= 1.0

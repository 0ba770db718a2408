"""MEND: identity-initialised hypernetwork, exact gradient factors, meta-training that helps held-out edits,
bit-exact restore, safetensors round trip, rejection of a hypernetwork of another shape, and ODEdit's terms in
the editor-training loss."""

from __future__ import annotations

import pytest
import torch
from testdata import make_image

from odedit.envs import EditCase, attach_references
from odedit.loading import load_config
from odedit.methods import METHODS
from odedit.methods.mend.hypernet import FactorCapture, FactorNet, Hypernet, MENDError
from odedit.methods.mend.train import MetaTrainer, synthetic_cases
from odedit.models import Sample, build_tiny
from odedit.objective import HostObjective, ODEditObjective, build_objective

FAST = ["method.lr=1e-3", "method.lr_lr=1e-3", "method.edit_lr=1e-3", "method.rank=16"]


def _mend(adapter, *overrides):
    cfg = load_config(None, ["method.name=mend", "model.family=llava", *FAST, *overrides])
    method = METHODS.get("mend").method_cls(adapter, cfg.method)
    method.prepare()
    return method, cfg


def _case(i: int = 0, target: str = "blue") -> EditCase:
    return EditCase(
        f"e{i}",
        {
            "in": [Sample("what color is the shape ?", target, make_image((200, 30, 30), seed=i))],
            "se_text": [Sample("what is the color of the shape ?", target, make_image((200, 30, 30), seed=i))],
            "se_image": [Sample("what color is the shape ?", target, make_image((200, 30, 30), seed=9 + i))],
            "out_text": [Sample("which city is the capital of france ?", "paris")],
            "out_mm": [Sample("is there a circle ?", "yes", make_image((30, 200, 30), seed=20 + i))],
        },
    )


def test_hypernetwork_starts_as_the_identity_then_normalises():
    net = Hypernet({"a": (6, 4), "b": (6, 4), "c": (3, 5)}, rank=8, n_hidden=2, edit_lr=1e-2)
    assert set(net.nets) == {"6x4", "3x5"}  # same-shape matrices share a network, one mode each
    assert net.route["b"] == ("6x4", 1)
    u, d = torch.randn(7, 6), torch.randn(7, 4)
    out = net.transform({"a": (u, d), "b": (u, d)})
    for name in ("a", "b"):  # no statistics yet: mean 0, std 1, and zero-initialised up-projections
        assert torch.allclose(out[name][0], u) and torch.allclose(out[name][1], d)
    net.transform({"a": (u, d)}, update_stats=True)
    ut, dt = net.transform({"a": (u, d)})["a"]
    z = torch.cat([u, d], -1).double()
    expect = (z - z.mean(0)) / z.std(0, unbiased=False)
    assert torch.allclose(torch.cat([ut, dt], -1).double(), expect, atol=1e-5)  # identity on normalised factors
    assert float(net.nets["6x4"].count) == 7 and float(net.nets["3x5"].count) == 0
    assert torch.equal(net.edit_lrs.detach(), torch.full((3,), 1e-2))


def test_low_rank_block_learns_from_zero_init():
    net = FactorNet(3, 2, n_modes=1, rank=4, n_hidden=1)
    u, d = torch.randn(5, 3), torch.randn(5, 2)
    loss = sum(t.pow(3).sum() for t in net(u, d, 0))
    loss.backward()
    assert float(net.blocks[0].up.weight.grad.abs().sum()) > 0  # the zero-initialised U receives gradient


def test_factors_reproduce_the_weight_gradient(tiny_adapter):
    from odedit.editstep import encode_envs, forward_envs
    from odedit.risks import reliability_risk

    adapter = tiny_adapter("llava")
    method, _ = _mend(adapter)
    modules = method.target_modules()
    capture = FactorCapture(modules)
    try:
        outs = forward_envs(adapter, encode_envs(adapter, [_case(0), _case(1, "green")], ["in", "out_text"]))
    finally:
        capture.remove()
    o = outs["in"]
    loss = reliability_risk(o.answer_logits(), o.answer_targets(), o.answer_row(), o.batch.size)
    weights = [m.weight for m in modules.values()]
    grads = torch.autograd.grad(loss, weights)
    factors = capture.factors()  # the OUT rows of the merged batch got no gradient and are left out
    for (name, (u, d)), g in zip(factors.items(), grads):
        assert torch.allclose(d.T @ u, g, atol=1e-6), name


def test_meta_training_reduces_the_edit_loss_on_held_out_edits(tiny_adapter):
    adapter = tiny_adapter("llava")
    method, cfg = _mend(adapter, "odedit.enabled=false", "method.train_batch=2")
    trainer = MetaTrainer(
        method,
        build_objective(cfg.odedit, method),
        synthetic_cases(adapter, 12, seed=0),
        synthetic_cases(adapter, 3, seed=1),
    )
    before = trainer.evaluate()
    history = trainer.train(20)
    after = trainer.evaluate()
    assert method.trained and len(history) == 20
    assert after["edit_loss"] < before["edit_loss"] - 0.1, (before, after)
    assert after["pre_edit_loss"] == pytest.approx(before["pre_edit_loss"])  # training never wrote the model


def test_meta_training_with_odedit_scores_every_episode_from_the_initial_lambda(tiny_adapter):
    """Issue 17 item 6c: each meta-step is one edit episode at k = 1: no dual step, the lambda-network never
    moves, and lambda(phi_e) stays where it starts (carried over 1,500 steps, the dual ascent ran it to its cap)."""
    adapter = tiny_adapter("llava")
    method, cfg = _mend(adapter, "odedit.enabled=true", "method.train_batch=2")
    objective = build_objective(cfg.odedit, method)
    start = [p.detach().clone() for p in objective.extra_parameters()]
    trainer = MetaTrainer(method, objective, synthetic_cases(adapter, 6, seed=0))
    history = trainer.train(6)
    lams = [h["lambda"] for h in history]
    assert all(lam == pytest.approx(lams[0], rel=1e-2) for lam in lams), lams  # moves only with phi_e's summary
    assert all(h["penalty"] > 0 and "dual_step" not in h for h in history)
    assert all(torch.equal(a, b) for a, b in zip(start, objective.extra_parameters()))


def test_apply_changes_only_phi_e_and_restore_is_bit_exact(tiny_adapter):
    adapter = tiny_adapter("llava")
    method, cfg = _mend(adapter, "odedit.enabled=false")
    method.trained = True  # an identity network still edits; restore must not care
    objective = HostObjective(method)
    original = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    first, report = method.apply([_case(0)], objective, None)
    assert report.failed is None and report.iterations == 1
    assert report.parts[1]["host"] < report.parts[0]["host"]  # the edit lowers R_rel on IN
    after_first = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    changed = {k for k in original if not torch.equal(original[k], after_first[k])}
    assert changed == set(method.editable())
    second, _ = method.apply([_case(1, "green")], objective, None)  # sequential: on top of the first
    second.restore()
    assert all(torch.equal(after_first[k], v) for k, v in adapter.model.state_dict().items())
    first.restore()
    assert all(torch.equal(original[k], v) for k, v in adapter.model.state_dict().items())


def test_untrained_hypernetwork_is_refused(tiny_adapter):
    method, _ = _mend(tiny_adapter("llava"))
    with pytest.raises(MENDError, match="hypernet_path"):
        method.apply([_case(0)], HostObjective(method), None)


def test_safetensors_round_trip_and_state_dict(tiny_adapter, tmp_path):
    adapter = tiny_adapter("llava")
    method, cfg = _mend(adapter)
    with torch.no_grad():
        for p in method.hypernet.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    method.hypernet.transform(
        {n: (torch.randn(4, s[0]), torch.randn(4, s[1])) for n, s in method.hypernet.shapes.items()}, update_stats=True
    )
    path = method.save_hypernet(tmp_path / "h.safetensors")
    other, _ = _mend(tiny_adapter("llava"), f"method.hypernet_path={path}")
    assert other.trained
    ours, theirs = method.hypernet.state_dict(), other.hypernet.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the same edit on two copies of the model gives the same weights
    method.trained = True
    method.apply([_case(0)], HostObjective(method), None)
    other.apply([_case(0)], HostObjective(other), None)
    assert all(torch.equal(a, b) for a, b in zip(method.editable().values(), other.editable().values()))
    # the checkpoint state carries the edited weights and the hypernetwork
    third, _ = _mend(tiny_adapter("llava"))
    third.load_state_dict(method.state_dict())
    assert third.trained
    assert all(torch.equal(a, b) for a, b in zip(method.editable().values(), third.editable().values()))


def test_hypernetwork_of_another_shape_is_rejected(tiny_adapter, tmp_path):
    method, _ = _mend(tiny_adapter("llava"))
    path = method.save_hypernet(tmp_path / "h.safetensors")
    with pytest.raises(MENDError, match="edited modules it was not trained for"):
        _mend(tiny_adapter("llava"), "method.modules=[ffn_in,ffn_out,attn_out]", f"method.hypernet_path={path}")
    with pytest.raises(MENDError, match="method.rank=8"):
        _mend(tiny_adapter("llava"), "method.rank=8", f"method.hypernet_path={path}")
    from odedit.models import ADAPTERS

    wider = ADAPTERS.get("llava").from_pretrained(build_tiny("llava", tmp_path / "wide", text_hidden=48))
    with pytest.raises(MENDError, match=r"trained for \(d_in, d_out\)=\(32, 64\), this model has \(48, 96\)"):
        _mend(wider, f"method.hypernet_path={path}")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MENDError, match="not a readable safetensors file"):
        _mend(tiny_adapter("llava"), f"method.hypernet_path={tmp_path / 'bad.safetensors'}")


def test_odedit_adds_its_terms_to_the_editor_training_loss(tiny_adapter):
    adapter = tiny_adapter("llava")
    method, cfg = _mend(adapter, "odedit.enabled=true")
    cases = [_case(0)]
    attach_references(adapter, cases, k=16)
    host, odedit = HostObjective(method), build_objective(cfg.odedit, method)
    assert isinstance(odedit, ODEditObjective)
    state = {k: v.clone() for k, v in method.hypernet.state_dict().items()}
    theta = method.meta_parameters()

    base_loss, base_parts = method.meta_loss(cases, host, 1)
    base_grads = torch.autograd.grad(base_loss, theta, allow_unused=True)
    method.hypernet.load_state_dict(state)  # the same running statistics for the second pass
    loss, parts = method.meta_loss(cases, odedit, 1)
    grads = torch.autograd.grad(loss, theta, allow_unused=True)

    assert {"r_loc", "r_gen", "penalty", "lambda"} <= set(parts)
    assert parts["host"] == pytest.approx(base_parts["host"], rel=1e-5)  # the editor-training loss itself
    w = cfg.odedit
    expected = parts["host"] + w.w_loc * parts["r_loc"] + w.w_gen * parts["r_gen"] + parts["lambda"] * parts["penalty"]
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert parts["r_gen"] > 0 and parts["penalty"] > 0
    diff = sum(float((a - b).abs().sum()) for a, b in zip(grads, base_grads) if a is not None and b is not None)
    assert diff > 0  # the ODEdit terms reach the hypernetwork's meta-gradient

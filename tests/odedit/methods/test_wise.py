"""WISE: rows without an activated memory keep the main FFN exactly, shards stay in their subspace, saved shards
merge by TIES and keep their edits through a sequential stream, bit-exact restore of the pool and counters, a
state round trip into a fresh model, a full pool, and the TIES merge against a naive reference."""

from __future__ import annotations

import math

import pytest
import torch
from testdata import make_image

from odedit.config import ConfigError
from odedit.editing import Editor
from odedit.envs import EditCase, attach_references
from odedit.evaluation import evaluate_cases
from odedit.loading import load_config
from odedit.methods import wise
from odedit.methods.wise import MemoryPoolFull, ties_merge
from odedit.models import Sample
from pipeline.train.checkpoints import load_state, save_state

# Tiny random models have activations of ~1e-2 and near-collinear prompts: routing margins scaled down, the
# token scores max-pooled and the threshold close to the edits' own score separate the edit from OUT.
ROUTE = (
    "method.optimizer=adam",
    "method.lr=0.01",
    "method.n_iter=30",
    "method.act_margin=[0.01,0.2,0.1]",
    "method.act_pool=max",
    "method.act_ratio=0.9",
)


def _cfg(family="llava", *overrides):
    return load_config(None, ["method.name=wise", f"model.family={family}", "odedit.enabled=false", *overrides])


def _case(i: int, question: str, target: str) -> EditCase:
    return EditCase(
        f"e{i}",
        {
            "in": [Sample(question, target, make_image((200, 30, 30), seed=i))],
            "out_text": [Sample("which city is the capital of france ?", "paris")],
            "out_mm": [Sample("is there a circle ?", "yes", make_image((30, 200, 30), seed=20 + i))],
        },
    )


BLUE = (0, "what color is the shape ?", "blue")
GREEN = (1, "does the image contain a triangle ?", "green")


def _memory_state(method):
    mem = method.memory
    return {"side": mem.side.detach().clone(), "pool": mem.pool.clone(), "thr": mem.pool_thr.clone(), **mem.scalars()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_config_checks():
    with pytest.raises(ConfigError, match="multiple of save_freq"):
        _cfg("llava", "method.save_freq=3", "method.merge_freq=4")
    with pytest.raises(ConfigError, match="exactly one FFN output layer"):
        _cfg("llava", "method.modules=[ffn_in]")
    with pytest.raises(ConfigError, match="at most one layer"):
        _cfg("llava", "method.layers=[0,1]")


def test_ties_merge_matches_a_naive_reference():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, generator=g)
    mems = [base + torch.randn(4, 5, generator=g) * (torch.rand(4, 5, generator=g) < 0.5) for _ in range(3)]
    density = 0.5
    expect = base.clone()
    taus = []
    for m in mems:  # trim: keep the top half of each delta by magnitude
        tau = (m - base).flatten()
        keep = tau.abs().argsort(descending=True)[:10]
        trimmed = torch.zeros_like(tau)
        trimmed[keep] = tau[keep]
        taus.append(trimmed)
    for j in range(20):  # elect the sign of the sum, average the agreeing non-zero entries
        vals = [t[j].item() for t in taus]
        sign = math.copysign(1.0, sum(vals)) if sum(vals) != 0 else 0.0
        agree = [v for v in vals if v != 0 and math.copysign(1.0, v) == sign]
        expect.view(-1)[j] += sum(agree) / len(agree) if agree else 0.0
    assert torch.allclose(ties_merge(base, mems, density), expect, atol=1e-6)


def test_routing_keeps_unrelated_rows_on_the_main_layer_exactly(tiny_adapter):
    adapter = tiny_adapter("llava")
    case = _case(*BLUE)
    attach_references(adapter, [case], k=16)
    mixed = [case.env("out_text")[0], case.env("in")[0], case.env("out_mm")[0]]  # one batch, padded together
    with torch.no_grad():
        before = adapter.run(mixed).logits
    editor = Editor(adapter, _cfg("llava", *ROUTE))
    _, report = editor.edit([case])
    assert report.failed is None, report.failed
    assert evaluate_cases(adapter, [case], exact_match=True, metrics=["rel"])[0]["rel"] == 1.0
    mem = editor.method.memory
    assert mem.work_edits == 1 and 0 < mem.work_thr < math.inf
    with torch.no_grad():
        after = adapter.run(mixed).logits
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2]), (
        "OUT rows below the threshold use the main FFN bit for bit, even batched with a routed row"
    )
    assert not torch.equal(after[1], before[1]), "the edit's row goes through the side memory"


def test_a_shard_only_changes_its_subspace(tiny_adapter):
    adapter = tiny_adapter("llava")
    editor = Editor(adapter, _cfg("llava", "method.n_iter=3", "method.optimizer=adam", "method.lr=0.01"))
    editor.edit([_case(*BLUE)])
    method = editor.method
    delta = method.memory.side.detach() - method._module.weight
    mask = method.shard_mask(0)
    assert bool(delta[~mask].eq(0).all()) and bool(delta[mask].ne(0).any())
    assert abs(mask.float().mean().item() - 0.2) < 0.05, "the subspace holds about mask_ratio of the entries"
    assert not torch.equal(method.shard_mask(1), mask), "every shard gets its own random subspace"


def test_shards_save_merge_and_keep_their_edits_in_a_sequential_stream(tiny_adapter, monkeypatch):
    adapter = tiny_adapter("blip2_opt")  # OPT's flattened fc2 input; its prompts are far enough apart
    cases = [_case(*BLUE), _case(*GREEN)]
    attach_references(adapter, cases, k=16)
    editor = Editor(
        adapter, _cfg("blip2_opt", *ROUTE, "method.save_freq=1", "method.merge_freq=2", "method.max_memories=2")
    )
    method, mem = editor.method, editor.method.memory
    merged_inputs = []
    real_merge = wise.ties_merge
    monkeypatch.setattr(
        wise,
        "ties_merge",
        lambda base, parts, density: (
            merged_inputs.append((base.clone(), [p.clone() for p in parts])) or real_merge(base, parts, density)
        ),
    )

    editor.edit(cases[:1])
    assert (mem.n_pool, mem.pending, mem.work_edits, mem.shard) == (1, 1, 0, 1), "a full shard is saved"
    assert torch.equal(mem.side.detach(), method._module.weight), "the working memory restarts from the main weight"
    shard0, thr0 = mem.pool[0].clone(), float(mem.pool_thr[0])
    state1 = _memory_state(method)

    handle, _ = editor.edit(cases[1:])
    assert (mem.n_pool, mem.pending) == (1, 0), "two saved shards merge into one memory"
    ((base, parts),) = merged_inputs
    assert torch.equal(parts[0], shard0) and not torch.equal(parts[1], shard0)
    assert torch.equal(mem.pool[0], ties_merge(base, parts, 0.53))
    assert float(mem.pool_thr[0]) <= thr0 and not bool(mem.pool[1].any())
    rows = evaluate_cases(adapter, cases, exact_match=True, metrics=["rel"])
    assert [r["rel"] for r in rows] == [1.0, 1.0], "the merged memory answers both edits"

    handle.restore()
    assert _same(_memory_state(method), state1), "restore() puts the pool, thresholds and counters back bit for bit"


def test_a_full_pool_is_a_clear_error_before_anything_changes(tiny_adapter):
    adapter = tiny_adapter("llava")
    editor = Editor(
        adapter, _cfg("llava", "method.n_iter=1", "method.save_freq=1", "method.merge_freq=1", "method.max_memories=1")
    )
    editor.edit([_case(*BLUE)])
    state = _memory_state(editor.method)
    with pytest.raises(MemoryPoolFull, match="raise method.max_memories"):
        editor.edit([_case(*GREEN)])
    assert _same(_memory_state(editor.method), state) and not editor.method.memory.editing


def test_state_round_trips_into_a_fresh_model(tiny_adapter, tmp_path):
    adapter = tiny_adapter("blip2_opt")
    cases = [_case(*BLUE), _case(*GREEN)]
    cfg = _cfg("blip2_opt", *ROUTE, "method.save_freq=1", "method.merge_freq=4", "method.max_memories=4")
    editor = Editor(adapter, cfg)
    for case in cases:
        editor.edit([case])
    save_state(str(tmp_path), "editable", editor.state_dict()["method"])  # the stream's checkpoint format
    fresh = tiny_adapter("blip2_opt")
    restored = Editor(fresh, cfg)
    restored.method.load_state_dict(load_state(str(tmp_path), "editable"))
    assert _same(_memory_state(restored.method), _memory_state(editor.method))
    probe = [s for c in cases for e in ("in", "out_text", "out_mm") for s in c.env(e)]
    with torch.no_grad():
        assert torch.equal(fresh.run(probe).logits, adapter.run(probe).logits)
    third = EditCase("e2", {"in": [Sample("is there a circle ?", "red", make_image((30, 200, 30), seed=5))]})
    editor.edit([third])
    restored.edit([third])  # the resumed stream continues exactly as the original one
    with torch.no_grad():
        assert torch.equal(fresh.run(probe).logits, adapter.run(probe).logits)
    with pytest.raises(ValueError, match="another model or layer"):
        restored.method.load_state_dict({**editor.method.state_dict(), "side": torch.zeros(3, 3)})

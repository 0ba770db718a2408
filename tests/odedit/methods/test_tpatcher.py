"""T-Patcher: patches silent on unrelated inputs, one patch per edit (or per step), a full pool, bit-exact
restore, a state round trip into a fresh model, and sequential edits that keep earlier ones."""

from __future__ import annotations

import pytest
import torch
from testdata import make_image

from odedit.config import ConfigError
from odedit.editing import Editor
from odedit.envs import EditCase, attach_references
from odedit.evaluation import evaluate_cases
from odedit.loading import load_config
from odedit.methods.tpatcher import PatchPoolExhausted
from odedit.models import Sample
from pipeline.train.checkpoints import load_state, save_state

# Enough Adam steps for a tiny random model to take an edit while the memory loss silences the patch on OUT.
FIT = ("method.lr=0.05", "method.n_iter=30")


def _cfg(family="llava", *overrides):
    return load_config(None, ["method.name=tpatcher", f"model.family={family}", "odedit.enabled=false", *overrides])


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


def _out_samples(cases):
    return [s for c in cases for e in ("out_text", "out_mm") for s in c.env(e)]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_config_checks():
    with pytest.raises(ConfigError, match="exactly ffn_in and ffn_out"):
        _cfg("llava", "method.modules=[ffn_out]")
    with pytest.raises(ConfigError, match="must be <= 0"):
        _cfg("llava", "method.silence_margin=1.0")


@pytest.mark.parametrize("family", ["llava", "blip2_opt"])  # LLaMA MLP, and OPT's flattened fc1/fc2
def test_patch_fires_on_the_edit_and_stays_silent_on_unrelated_inputs(tiny_adapter, family):
    adapter = tiny_adapter(family)
    cases = [_case(*BLUE)]
    attach_references(adapter, cases, k=16)
    with torch.no_grad():
        before = adapter.run(_out_samples(cases)).logits
    editor = Editor(adapter, _cfg(family, *FIT))
    _, report = editor.edit(cases)
    assert report.failed is None, report.failed
    assert evaluate_cases(adapter, cases, exact_match=True, metrics=["rel"])[0]["rel"] == 1.0

    (pool,) = editor.method._patches.values()
    assert pool.used == 1
    pre = {}
    tap = editor.method._tap  # record the patch's pre-activations s = q.k + b at inference
    tap.start()
    with torch.no_grad():
        out_batch = adapter.run(_out_samples(cases))
        pre["out"] = tap.records[-1][pool.key][..., 0][tap.records[-1]["_valid"]]
        in_batch = adapter.run(cases[0].env("in"))
        pre["in"] = tap.records[-1][pool.key][..., 0][in_batch.batch.answer_mask]
    tap.stop()
    assert bool((pre["in"] > 0).all()), "the patch fires at the edit's answer position"
    assert bool((pre["out"] <= 0).all()), "the patch is silent at every position of the unrelated inputs"
    assert torch.equal(out_batch.logits, before), "silent patches leave unrelated outputs bit-identical"


def test_one_patch_per_edit_or_per_step_and_bit_exact_restore(tiny_adapter):
    adapter = tiny_adapter("llava")
    cases = [_case(*BLUE), _case(*GREEN)]
    editor = Editor(adapter, _cfg("llava", "method.n_iter=2"))
    state0 = _state(adapter.model)
    handle, _ = editor.edit(cases)
    (pool,) = editor.method._patches.values()
    assert (pool.used, pool.live) == (2, 2), "one patch per edit"
    assert bool(pool.keys[:2].abs().sum(1).gt(0).all()) and not bool(pool.keys[2:].any())
    handle2, _ = editor.edit(cases[:1])
    assert pool.used == 3
    handle2.restore()
    handle.restore()
    assert (pool.used, pool.live) == (0, 0)
    after = adapter.model.state_dict()
    assert all(torch.equal(state0[k], after[k]) for k in state0), "restore() is bit-exact, counters included"

    per_step = Editor(tiny_adapter("llava"), _cfg("llava", "method.n_iter=2", "method.patch_unit=step"))
    per_step.edit(cases)
    assert per_step.method.used == 1, "one patch for the whole step"


def test_full_pool_is_a_clear_error_and_changes_nothing(tiny_adapter):
    adapter = tiny_adapter("llava")
    editor = Editor(adapter, _cfg("llava", "method.n_iter=2", "method.max_patches=2"))
    editor.edit([_case(*BLUE)])
    state = _state(adapter.model)
    with pytest.raises(
        PatchPoolExhausted, match=r"1 of 2 patches used, this step needs 2 more; raise method.max_patches"
    ):
        editor.edit([_case(*BLUE), _case(*GREEN)])
    assert editor.method.used == 1
    assert all(torch.equal(state[k], v) for k, v in adapter.model.state_dict().items())
    editor.edit([_case(*GREEN)])  # the last free patch is still usable
    assert editor.method.used == 2


def test_sequential_edits_keep_earlier_ones_and_state_round_trips(tiny_adapter, tmp_path):
    adapter = tiny_adapter("llava")
    cases = [_case(*BLUE), _case(*GREEN)]
    attach_references(adapter, cases, k=16)
    cfg = _cfg("llava", *FIT)
    editor = Editor(adapter, cfg)
    for case in cases:  # two steps, never restored
        _, report = editor.edit([case])
        assert report.failed is None, report.failed
    rows = evaluate_cases(adapter, cases, exact_match=True, metrics=["rel"])
    assert [r["rel"] for r in rows] == [1.0, 1.0], "the second patch keeps the first edit"

    save_state(str(tmp_path), "editable", editor.state_dict()["method"])  # the stream's checkpoint format
    fresh = tiny_adapter("llava")
    restored = Editor(fresh, cfg)
    restored.method.load_state_dict(load_state(str(tmp_path), "editable"))
    assert restored.method.used == 2
    probe = [s for c in cases for s in c.env("in")] + _out_samples(cases)
    with torch.no_grad():
        assert torch.equal(fresh.run(probe).logits, adapter.run(probe).logits)
    third = EditCase("e2", {"in": [Sample("is there a circle ?", "red", make_image((30, 200, 30), seed=5))]})
    editor.edit([third])
    restored.edit([third])  # the resumed stream continues exactly as the original one
    with torch.no_grad():
        assert torch.equal(fresh.run(probe).logits, adapter.run(probe).logits)
    with pytest.raises(ValueError, match="patches for"):
        restored.method.load_state_dict({"layers": {}})

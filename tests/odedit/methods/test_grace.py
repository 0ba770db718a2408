"""GRACE: an edited prompt retrieves its value and far inputs are untouched bit for bit, the codebook expands
and splits deferral radii, restore() removes entries exactly, a full codebook, a state round trip into a fresh
model, and sequential edits that keep earlier ones."""

from __future__ import annotations

import pytest
import torch
from testdata import make_image

from odedit.config import ConfigError
from odedit.editing import Editor
from odedit.envs import EditCase, attach_references
from odedit.evaluation import evaluate_cases
from odedit.loading import load_config
from odedit.methods.grace import GRACE, CodebookFull
from odedit.models import Sample
from pipeline.train.checkpoints import load_state, save_state

# The tiny LLaVA's FFN-output inputs at layer 1: its rephrases lie within 0.004 of the edit, OUT prompts and the
# other edit beyond 0.008, so a radius of 0.005 covers the one and not the other.
NEAR = ("method.eps=0.005",)


def _cfg(*overrides):
    return load_config(None, ["method.name=grace", "model.family=llava", "odedit.enabled=false", *overrides])


def _case(i: int, question: str, target: str) -> EditCase:
    return EditCase(
        f"e{i}",
        {
            "in": [Sample(question, target, make_image((200, 30, 30), seed=i))],
            "se_text": [Sample("what is the color of the shape ?", target, make_image((200, 30, 30), seed=i))],
            "out_text": [Sample("which city is the capital of france ?", "paris")],
            "out_mm": [Sample("is there a circle ?", "yes", make_image((30, 200, 30), seed=20 + i))],
        },
    )


BLUE = (0, "what color is the shape ?", "blue")
GREEN = (1, "does the image contain a triangle ?", "green")


def _book_state(method):
    b = method.codebook
    return (b.n, list(b.labels), b.keys.clone(), b.eps.clone(), b.values.detach().clone())


def _same_book(a, b):
    return a[:2] == b[:2] and all(torch.equal(x, y) for x, y in zip(a[2:], b[2:]))


def test_config_checks():
    with pytest.raises(ConfigError, match="exactly one module"):
        _cfg("method.modules=[ffn_in,ffn_out]")
    with pytest.raises(ConfigError, match="at most one"):
        _cfg("method.layers=[0,1]")


def test_edited_prompt_retrieves_its_value_and_far_inputs_are_untouched(tiny_adapter):
    adapter = tiny_adapter("llava")
    case = _case(*BLUE)
    attach_references(adapter, [case], k=16)
    far = case.env("out_text") + case.env("out_mm") + _case(*GREEN).env("in")
    with torch.no_grad():
        before = adapter.run(far).logits
    editor = Editor(adapter, _cfg(*NEAR))
    _, report = editor.edit([case])
    assert report.failed is None, report.failed
    book = editor.method.codebook
    assert book.n == 1 and book.labels == ["blue"]
    rows = evaluate_cases(adapter, [case], exact_match=True, metrics=["rel", "t_gen"])
    assert rows[0]["rel"] == 1.0 and rows[0]["t_gen"] == 1.0, "the edit and its rephrase (inside eps) answer blue"

    seen = []
    hook = editor.method._module.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad():
        out = adapter.run(case.env("in"))
    hook.remove()
    last = int(out.batch.last_prompt[0])
    assert torch.equal(seen[0][0, last], book.values[0].detach()), "the last prompt token's output is the value"
    with torch.no_grad():
        assert torch.equal(adapter.run(far).logits, before), "inputs far from every key are bit-identical"


def test_same_target_expands_a_radius_and_a_different_target_splits_it(tiny_adapter):
    adapter = tiny_adapter("llava")
    probe = GRACE(adapter, _cfg().method)
    probe.prepare()
    keys, _ = probe.keys_of(_case(*BLUE).env("in") + _case(*GREEN).env("in"))
    d = float((keys[0].double() - keys[1].double()).norm())
    eps = 0.75 * d  # d lies in (eps, 2 eps]: close enough to join, too far to be covered

    expand = Editor(tiny_adapter("llava"), _cfg(f"method.eps={eps}", "method.n_iter=1"))
    expand.edit([_case(*BLUE)])
    value = expand.method.codebook.values[0].detach().clone()
    expand.edit([_case(1, GREEN[1], "blue")])  # another prompt, the same target
    book = expand.method.codebook
    # The radius grows to d and a rounding bound beyond (Codebook.covering_radius), so the new prompt is inside
    # its entry in the step's own forward pass: the entry trains.
    assert book.n == 1 and d <= book.eps[0].item() == pytest.approx(d, rel=1e-9), "coverage: the radius grows to d"
    assert not torch.equal(book.values[0].detach(), value), "the new prompt retrieves the entry and trains it"

    split = Editor(tiny_adapter("llava"), _cfg(f"method.eps={eps}", "method.n_iter=1"))
    split.edit([_case(*BLUE)])
    split.edit([_case(*GREEN)])
    book = split.method.codebook
    assert book.n == 2 and book.labels == ["blue", "green"]
    assert book.eps[0].item() == pytest.approx(d / 2 - 1e-5, rel=1e-9)
    assert book.eps[1].item() == pytest.approx(d / 2, rel=1e-9)

    far = Editor(tiny_adapter("llava"), _cfg(f"method.eps={d / 4}", "method.n_iter=1"))
    far.edit([_case(*BLUE), _case(1, GREEN[1], "blue")])  # farther than eps + eps: a new entry
    assert far.method.codebook.n == 2 and far.method.codebook.eps[:2].tolist() == [d / 4, d / 4]


def test_a_re_edit_of_the_same_prompt_with_another_target_does_not_crash(tiny_adapter):
    # The same key with another label splits at distance 0: radii -1e-5 and 0, so the step's own forward pass may
    # find no entry covering it; the step then gets zero gradients instead of a loss without a grad_fn.
    for steps in ([[_case(*BLUE)], [_case(0, BLUE[1], "green")]], [[_case(*BLUE), _case(0, BLUE[1], "green")]]):
        editor = Editor(tiny_adapter("llava"), _cfg(*NEAR, "method.n_iter=2"))
        for cases in steps:
            _, report = editor.edit(cases)
            assert report.failed is None
        assert editor.method.codebook.n == 2 and editor.method.codebook.labels == ["blue", "green"]


def test_restore_removes_entries_bit_exactly_and_a_full_codebook_changes_nothing(tiny_adapter):
    adapter = tiny_adapter("llava")
    editor = Editor(adapter, _cfg(*NEAR, "method.n_iter=2", "method.capacity=2"))
    state0, book0 = {k: v.clone() for k, v in adapter.model.state_dict().items()}, _book_state(editor.method)
    handle, _ = editor.edit([_case(*BLUE)])
    assert editor.method.codebook.n == 1
    handle.restore()
    assert _same_book(_book_state(editor.method), book0)
    assert all(torch.equal(state0[k], v) for k, v in adapter.model.state_dict().items())

    editor.edit([_case(*BLUE)])
    book1 = _book_state(editor.method)
    with pytest.raises(CodebookFull, match="raise method.capacity"):
        editor.edit([_case(*GREEN), _case(2, "which city is the capital of france ?", "rome")])
    assert _same_book(_book_state(editor.method), book1), "entries written before the codebook filled up are undone"


def test_sequential_edits_keep_earlier_ones_and_state_round_trips(tiny_adapter, tmp_path):
    adapter = tiny_adapter("llava")
    cases = [_case(*BLUE), _case(*GREEN)]
    attach_references(adapter, cases, k=16)
    cfg = _cfg(*NEAR)
    editor = Editor(adapter, cfg)
    for case in cases:
        _, report = editor.edit([case])
        assert report.failed is None, report.failed
    rows = evaluate_cases(adapter, cases, exact_match=True, metrics=["rel"])
    assert [r["rel"] for r in rows] == [1.0, 1.0]

    save_state(str(tmp_path), "editable", editor.state_dict()["method"])  # the stream's checkpoint format
    fresh = tiny_adapter("llava")
    restored = Editor(fresh, cfg)
    restored.method.load_state_dict(load_state(str(tmp_path), "editable"))
    assert _same_book(_book_state(restored.method), _book_state(editor.method))
    probe = [s for c in cases for e in ("in", "se_text", "out_text", "out_mm") for s in c.env(e)]
    with torch.no_grad():
        assert torch.equal(fresh.run(probe).logits, adapter.run(probe).logits)
    third = EditCase("e2", {"in": [Sample("is there a circle ?", "red", make_image((30, 200, 30), seed=5))]})
    editor.edit([third])
    restored.edit([third])  # the resumed stream continues exactly as the original one
    with torch.no_grad():
        assert torch.equal(fresh.run(probe).logits, adapter.run(probe).logits)
    with pytest.raises(ValueError, match="labels for"):
        restored.method.load_state_dict({**editor.method.state_dict(), "labels": []})


def test_a_second_grace_of_another_capacity_on_the_same_model_is_refused(tiny_adapter):
    adapter = tiny_adapter("llava")
    _ = Editor(adapter, _cfg("method.capacity=8")).method.codebook  # installs the codebook
    assert Editor(adapter, _cfg("method.capacity=8")).method.codebook.capacity == 8  # found again, reused
    with pytest.raises(ValueError, match=r"capacity 8; method.capacity is 16"):
        _ = Editor(adapter, _cfg("method.capacity=16")).method.codebook


def _replaced_positions(editor, adapter, samples):
    """(B, L) True where the GRACE module's output differs from the wrapped module's own output."""
    seen = []
    book = editor.method.codebook
    hook = editor.method._module.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad():
        out = adapter.run(samples)
        n, book.n = book.n, 0  # the same forward with an empty codebook: the module's own output
        try:
            adapter.run(samples)
        finally:
            book.n = n
    hook.remove()
    return (seen[0] != seen[1]).any(-1).reshape(out.batch.targets.shape), out


def test_lookup_keys_one_position_per_sequence_by_default_all_positions_as_an_option(tiny_adapter):
    # Issue 17 item 6: with the default radius (eps 1.0) every position of the tiny model lies inside the first
    # entry's ball (its layer-1 FFN inputs are all within 0.09 of each other). Looking up every position replaced
    # all of them, answer positions included, so no OUT prompt kept its prediction; keyed on each sequence's last
    # prompt token, at most that one position is replaced and every later position is bit-identical here (GRACE
    # edits the last layer of the 2-layer model, so the replaced output reaches no other position).
    probe = [
        Sample("which city is the capital of france ?", "the city of paris"),
        Sample("is there a circle ?", "yes it is", make_image((30, 200, 30), seed=20)),
    ]
    with torch.no_grad():
        before = tiny_adapter("llava").run(probe).logits
    counts = {}
    for keys in ("last", "all"):
        adapter = tiny_adapter("llava")
        editor = Editor(adapter, _cfg("method.n_iter=3", f"method.key_positions={keys}"))
        _, report = editor.edit([_case(*BLUE)])
        assert report.failed is None, report.failed
        assert editor.method.codebook.n == 1
        replaced, out = _replaced_positions(editor, adapter, probe)
        valid = out.batch.inputs["attention_mask"].bool()
        counts[keys] = replaced.sum(1).tolist()
        answer = out.batch.targets >= 0
        after_last = answer & (torch.arange(answer.shape[1]) > out.batch.last_prompt.unsqueeze(1))
        same = (out.logits == before).all(-1)
        if keys == "last":
            assert all(c <= 1 for c in counts[keys]), counts
            others = replaced.clone()
            others[torch.arange(replaced.shape[0]), out.batch.last_prompt] = False
            assert not bool(others.any()), "only the last prompt token may be replaced"
            assert bool(same[after_last].all()), "answer positions after the first are untouched"
        else:
            assert bool(replaced[valid].all()), "all positions: every real position is inside the first radius"
            assert not bool(same[after_last].any())
    assert sum(counts["all"]) > 2 * sum(counts["last"])


def test_key_positions_is_checked_at_load():
    with pytest.raises(ConfigError, match="method.key_positions"):
        _cfg("method.key_positions=first")

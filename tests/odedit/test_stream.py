"""Edit streams in process: modes, retention curve, ledger, resume, determinism, divergence rollback."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from testdata import make_image

from odedit import stream as stream_module
from odedit.editing import Editor
from odedit.envs import EditCase, attach_references
from odedit.loading import load_config
from odedit.models import Sample
from odedit.stream import APPLIED, FAILED, StreamHooks, StreamRunner, StreamState

QUESTIONS = [
    ("what color is the shape ?", "what is the color of the shape ?"),
    ("does the image contain a triangle ?", "is there a triangle in the image ?"),
    ("is there a circle ?", "does the image contain a circle ?"),
]
ANSWERS = ["blue", "green", "red", "yellow", "gray", "black"]


def _cases(n: int) -> list[EditCase]:
    out = []
    for i in range(n):
        q, r = QUESTIONS[i % 3]
        img = make_image((200, 30 + 20 * i, 30), seed=i)
        out.append(
            EditCase(
                f"e{i}",
                {
                    "in": [Sample(q, ANSWERS[i % 6], img)],
                    "se_text": [Sample(r, ANSWERS[i % 6], img)],
                    "se_image": [Sample(q, ANSWERS[i % 6], make_image((200, 30 + 20 * i, 30), seed=100 + i))],
                    "out_text": [Sample("which city is the capital of france ?", "paris")],
                    "out_mm": [Sample("is there a circle ?", "yes", make_image((30, 200, 30), seed=200 + i))],
                },
            )
        )
    return out


def _cfg(*overrides):
    return load_config(None, ["method.lr=0.05", "method.n_iter=4", "stream.generation_eval=false", *overrides])


@pytest.fixture
def setup(tiny_adapter):
    adapter = tiny_adapter("llava")
    cases = _cases(6)
    attach_references(adapter, cases, k=16)
    return adapter, cases


def test_sequential_stream_curve_ledger_and_summary(setup):
    adapter, cases = setup
    cfg = _cfg("stream.batch_size=2", "stream.eval_every=2", "stream.retention_sample=3")
    metrics = []
    result = StreamRunner(
        Editor(adapter, cfg), cfg, hooks=StreamHooks(on_metrics=lambda m, s: metrics.append((s, m)))
    ).run(cases)
    assert [e["edit_id"] for e in result.ledger] == [c.edit_id for c in cases]
    assert [e["step"] for e in result.ledger] == [0, 0, 1, 1, 2, 2]
    assert all(e["status"] == APPLIED for e in result.ledger)
    assert [p["edits"] for p in result.curve] == [2, 4, 6]
    assert [p["n"] for p in result.curve] == [2, 3, 6]  # the sample never exceeds retention_sample, final is all
    assert result.summary["edits_applied"] == 6 and result.summary["mode"] == "sequential"
    for row in result.rows:
        assert {"rel", "final_rel", "pre_rel", "t_loc", "final_t_loc", "step_wall"} <= set(row)
        assert row["pre_t_loc"] == 1.0
    steps = [s for s, m in metrics if any(k.startswith("immediate/") for k in m)]
    assert steps == [2, 4, 6], "immediate metrics are logged with step = edits applied"
    # Issue 17: per step, lambda, the penalty, each environment's risk and omega-slope, R_loc, R_gen, the host
    # loss, the iterations and the target's probability after them.
    per_step = [m for _, m in metrics if "edit/lambda" in m]
    assert len(per_step) == 3
    envs = ("in", "se_text", "se_image", "out_text", "out_mm")
    want = {"edit/penalty", "edit/r_loc", "edit/r_gen", "edit/host", "edit/iterations", "edit/target_prob"}
    for m in per_step:
        assert want | {f"edit/risk/{e}" for e in envs} | {f"edit/slope/{e}" for e in envs} <= set(m)
        assert 0.0 <= m["edit/target_prob"] <= 1.0 and m["edit/iterations"] == 4.0
    assert all(0.0 <= r["target_prob"] <= 1.0 and r["stopped_early"] is False for r in result.rows)
    assert any(k.startswith("retention/") for _, m in metrics for k in m)


def test_the_last_step_is_not_scored_twice(setup, monkeypatch):
    """Its edits were scored right after it on the model the stream ends with: their final scores are their
    immediate ones, and the end-of-stream pass scores only the earlier edits (under ZeRO-3 a pass gathers the
    whole model)."""
    adapter, cases = setup
    cfg = _cfg("stream.batch_size=2")
    scored = []
    evaluate = stream_module.evaluate_cases
    monkeypatch.setattr(
        stream_module, "evaluate_cases", lambda a, cs, **kw: scored.append(len(cs)) or evaluate(a, cs, **kw)
    )
    result = StreamRunner(Editor(adapter, cfg), cfg).run(cases)
    rows = {r["edit_id"]: r for r in result.rows}
    for c in cases[4:]:
        assert all(rows[c.edit_id][f"final_{k}"] == rows[c.edit_id][k] for k in ("rel", "t_gen", "t_loc", "m_loc"))
    # cases scored: all 6 before editing, each step's 2 right after it, at the end the first 4 only (was all 6)
    assert scored == [6, 2, 2, 2, 4], scored
    scored.clear()
    cfg = _cfg("stream.batch_size=2", "stream.pre_eval=false")
    result = StreamRunner(Editor(adapter, cfg), cfg).run(cases)
    assert scored == [2, 2, 2, 4], "no pass before the stream"
    assert all("pre_rel" not in r and "final_rel" in r for r in result.rows)
    assert math.isnan(result.summary["pre"]["rel"]), result.summary["pre"]


def test_single_mode_leaves_the_model_unchanged(setup):
    adapter, cases = setup
    cfg = _cfg("stream.mode=single", "method.name=lora")
    editor = Editor(adapter, cfg)
    installed = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    dual = [p.detach().clone() for p in editor.objective.extra_parameters()]
    edit, moved = editor.edit, []

    def watched(batch):  # what each edit did before the stream undid it (else the checks below prove nothing)
        pre = {n: p.detach().clone() for n, p in editor.method.editable().items()}
        handle, report = edit(batch)
        lam = [p.detach() for p in editor.objective.extra_parameters()]
        weights = editor.method.editable()
        moved.append(
            (
                not all(torch.equal(a, b) for a, b in zip(dual, lam)),
                not all(torch.equal(pre[n], weights[n].detach()) for n in pre),
            )
        )
        return handle, report

    editor.edit = watched
    metrics = []
    result = StreamRunner(editor, cfg, hooks=StreamHooks(on_metrics=lambda m, s: metrics.append((s, m)))).run(cases[:3])
    per_step = [(s, m) for s, m in metrics if "edit/lambda" in m]  # single mode logs every edit too (issue 17)
    assert [s for s, _ in per_step] == [0, 1, 2] and all("edit/target_prob" in m for _, m in per_step)
    assert len(moved) == 3 and all(m[1] for m in moved), "every edit changed the model (its LoRA weights)"
    assert any(m[0] for m in moved), "an edit moved the lambda-network"
    after = adapter.model.state_dict()
    assert all(torch.equal(installed[k], after[k]) for k in installed)
    assert dual and all(torch.equal(a, b) for a, b in zip(dual, editor.objective.extra_parameters())), (
        "each single edit starts from the same lambda-network (edits are independent)"
    )
    assert [r["final_rel"] == r["rel"] for r in result.rows] == [True] * 3


def test_same_seed_same_results(setup, tiny_adapter):
    adapter, cases = setup
    cfg = _cfg("stream.batch_size=3", "stream.eval_every=3")
    a = StreamRunner(Editor(adapter, cfg), cfg).run(cases)
    other = tiny_adapter("llava")
    cases_b = copy.deepcopy(cases)
    b = StreamRunner(Editor(other, cfg), cfg).run(cases_b)

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("step_wall", "edit_seconds")} for r in rows]

    assert _same(strip(a.rows), strip(b.rows))
    assert _same(a.curve, b.curve)


def test_resume_from_mid_stream_state_matches_uninterrupted(setup, tiny_adapter):
    adapter, cases = setup
    cfg = _cfg("stream.batch_size=2", "stream.checkpoint_every=1", "stream.eval_every=0")
    saved = {}

    def on_checkpoint(state: StreamState):
        if state.next_step == 1:
            saved["state"] = StreamState.from_dict(copy.deepcopy(state.to_dict()))
            saved["editor"] = copy.deepcopy(editor.state_dict())

    editor = Editor(adapter, cfg)
    full = StreamRunner(editor, cfg, hooks=StreamHooks(on_checkpoint=on_checkpoint)).run(cases)

    fresh = tiny_adapter("llava")
    resumed_editor = Editor(fresh, cfg)
    resumed_editor.load_state_dict(saved["editor"])
    resumed = StreamRunner(resumed_editor, cfg).run(cases, saved["state"])
    assert [e["edit_id"] for e in resumed.ledger] == [c.edit_id for c in cases], "each edit exactly once"

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("step_wall", "edit_seconds")} for r in rows]

    assert _same(strip(full.rows), strip(resumed.rows))


def _nan_after_first_iteration(method):
    """Make the host loss NaN from the second iteration on (a diverging edit)."""
    original = method.host_loss
    calls = {"n": 0}

    def host_loss(outs, cases):
        calls["n"] += 1
        loss = original(outs, cases)
        return loss * float("nan") if calls["n"] % method.cfg.n_iter == 2 else loss

    method.host_loss = host_loss


@pytest.mark.parametrize("kind", ["nan", "lambda"])
def test_diverging_step_is_rolled_back_and_the_stream_goes_on(setup, kind, record_outcome):
    adapter, cases = setup
    cfg = _cfg("stream.batch_size=2", *(["odedit.lambda_max=0.5", "odedit.lambda_cap=0"] if kind == "lambda" else []))
    editor = Editor(adapter, cfg)
    if kind == "nan":
        _nan_after_first_iteration(editor.method)
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    dual_before = [p.detach().clone() for p in editor.objective.extra_parameters()]
    assert dual_before, "the learned lambda-network is part of what a rollback must restore"
    result = StreamRunner(editor, cfg).run(cases[:4])
    reason = {"nan": "loss is nan", "lambda": "lambda ran away"}[kind]
    assert [e["status"] for e in result.ledger] == [FAILED] * 4
    assert all("rolled back" in e["reason"] and reason in e["reason"] for e in result.ledger)
    after = adapter.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "failed steps leave no trace"
    # The dual step at iteration 2 saw the NaN penalty; the rollback returns lambda to where the step found it
    # (before, a NaN or runaway lambda-network stayed and failed every later step at its first iteration).
    assert all(torch.equal(a, b) for a, b in zip(dual_before, editor.objective.extra_parameters()))
    assert result.summary["edits_failed"] == 4 and result.summary["edits_applied"] == 0
    record_outcome(
        "fault",
        {"nan": "edit step whose loss turns NaN", "lambda": "runaway lambda (over lambda_max)"}[kind],
        "step rolled back bit-exactly, edits marked failed with the reason, stream goes on",
        result.ledger[0]["reason"],
    )


def test_a_step_that_already_updated_the_weights_is_rolled_back_bit_for_bit(setup, record_outcome):
    """The step fails at its last iteration, after n_iter - 1 updates moved the weights and lambda (issue 19
    item 23): the rollback must still restore both exactly, and the next step starts from there."""
    adapter, cases = setup
    cfg = _cfg("stream.batch_size=2", "stream.checkpoint_every=0", "stream.eval_every=0")
    editor = Editor(adapter, cfg)
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    dual_before = [p.detach().clone() for p in editor.objective.extra_parameters()]
    original, seen = editor.method.host_loss, {"calls": 0}

    def host_loss(outs, batch):
        seen["calls"] += 1
        loss = original(outs, batch)
        if seen["calls"] == editor.method.cfg.n_iter:  # first step, last iteration
            now = adapter.model.state_dict()
            seen["moved"] = [k for k in before if not torch.equal(before[k], now[k])]
            seen["lam_moved"] = not all(
                torch.equal(a, b) for a, b in zip(dual_before, editor.objective.extra_parameters())
            )
            return loss * float("nan")
        return loss

    editor.method.host_loss = host_loss
    after_first = {}

    def on_progress(done, total):
        if done == 2:
            after_first["weights"] = {k: v.clone() for k, v in adapter.model.state_dict().items()}
            after_first["lam"] = [p.detach().clone() for p in editor.objective.extra_parameters()]

    result = StreamRunner(editor, cfg, hooks=StreamHooks(on_progress=on_progress)).run(cases[:4])
    assert seen["moved"], "the failing step had already changed the weights"
    assert [e["status"] for e in result.ledger] == [FAILED, FAILED, APPLIED, APPLIED]
    assert "rolled back" in result.ledger[0]["reason"]
    restored = after_first["weights"]
    assert all(torch.equal(before[k], restored[k]) for k in before), "weights bit for bit as before the step"
    assert all(torch.equal(a, b) for a, b in zip(dual_before, after_first["lam"])), "lambda as before the step"
    changed = adapter.model.state_dict()
    assert any(not torch.equal(before[k], changed[k]) for k in before), "the next step edits from there"
    record_outcome(
        "fault",
        "edit step diverging after it updated the weights (last iteration)",
        "rolled back bit for bit (weights and lambda), the stream goes on",
        f"{len(seen['moved'])} tensors had moved; lambda moved: {seen['lam_moved']}",
    )


def test_a_saved_state_that_does_not_fit_the_stream_is_refused(record_outcome):
    """A state whose ledger lost an entry or whose counts disagree is not resumed (issue 19 item 5)."""
    from odedit.stream import StateMismatch

    cases = [EditCase(f"e{i}", {}) for i in range(5)]
    runner = StreamRunner(None, _cfg("stream.batch_size=2"))
    state = StreamState(
        next_step=2,
        edits_applied=4,
        ledger=[{"edit_id": f"e{i}", "step": i // 2, "status": APPLIED, "reason": ""} for i in range(4)],
        rows=[{"edit_id": f"e{i}"} for i in range(4)],
    )
    runner.check_state(state.to_dict(), [c.edit_id for c in cases])
    del state.ledger[2]
    with pytest.raises(StateMismatch, match="ledger entry 2 is 'e3' where the stream's edit 2 is 'e2'") as err:
        runner.run(cases, state)  # refused before any edit or scoring
    record_outcome(
        "bad checkpoint", "stream state with one ledger entry removed, resumed in process", "refused", str(err.value)
    )
    whole = StreamState(3, 5, [{"edit_id": f"e{i}", "step": i // 2, "status": APPLIED} for i in range(5)])
    whole.rows = [{"edit_id": f"e{i}"} for i in range(5)]
    runner.check_state(whole.to_dict(), [c.edit_id for c in cases])  # a finished stream: the last step is short
    single = StreamRunner(None, _cfg("stream.mode=single"))
    with pytest.raises(StateMismatch, match="edits_applied=4 but the ledger marks 3"):
        single.check_state(
            {**whole.to_dict(), "next_step": 3, "edits_applied": 4, "ledger": whole.ledger[:3], "rows": whole.rows[:3]},
            [c.edit_id for c in cases],
        )


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


# ---------------------------------------------------------------------------------- sequences of T edits

_STRIP = ("step_wall", "edit_seconds", "step")


@pytest.mark.parametrize("method", ["ft", "grace"])
def test_sequences_of_t_edits_each_start_from_the_pre_edit_model(setup, tiny_adapter, method):
    """T=2: every sequence scores as a fresh 2-edit stream would, and the stream ends on the pre-edit model."""
    adapter, cases = setup
    cfg = _cfg(f"method.name={method}", "stream.sequence_length=2", "stream.checkpoint_every=0")
    installed = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    metrics = []
    result = StreamRunner(
        Editor(adapter, cfg), cfg, hooks=StreamHooks(on_metrics=lambda m, s: metrics.append((s, m)))
    ).run(cases)
    after = adapter.model.state_dict()
    assert all(torch.equal(installed[k], after[k]) for k in installed)
    assert [s for s, m in metrics if any(k.startswith("sequence/") for k in m)] == [2, 4, 6]
    assert not any(k.startswith("retention/") for s, m in metrics[:-1] for k in m), "no mid-stream retention"

    plain = _cfg(f"method.name={method}", "stream.checkpoint_every=0")
    for start in (2, 4):
        alone = StreamRunner(Editor(tiny_adapter("llava"), plain), plain).run(copy.deepcopy(cases[start : start + 2]))

        def final(rows):
            return [{k: v for k, v in r.items() if k.startswith("final_")} for r in rows]

        assert _same(final(result.rows[start : start + 2]), final(alone.rows))
    assert result.summary["rel"] == pytest.approx(sum(r["final_rel"] for r in result.rows) / len(cases))


def test_resume_inside_a_sequence_matches_uninterrupted(setup, tiny_adapter):
    adapter, cases = setup
    cfg = _cfg("stream.sequence_length=4", "stream.batch_size=2", "stream.checkpoint_every=1")
    saved = {}

    def on_checkpoint(state: StreamState):
        if state.next_step == 1:  # half-way through the first sequence
            saved["state"] = StreamState.from_dict(copy.deepcopy(state.to_dict()))
            saved["editor"] = copy.deepcopy(editor.state_dict())

    editor = Editor(adapter, cfg)
    full = StreamRunner(editor, cfg, hooks=StreamHooks(on_checkpoint=on_checkpoint)).run(cases)
    resumed_editor = Editor(tiny_adapter("llava"), cfg)  # the engine's order: editor first, then the checkpoint
    resumed_editor.load_state_dict(saved["editor"])
    resumed = StreamRunner(resumed_editor, cfg).run(cases, saved["state"])

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in _STRIP} for r in rows]

    assert _same(strip(full.rows), strip(resumed.rows))


@pytest.mark.parametrize(
    "overrides, problem",
    [
        (["stream.sequence_length=3", "stream.batch_size=2"], "multiple of stream.batch_size"),
        (["stream.sequence_length=2", "stream.mode=single"], "only exist in sequential mode"),
    ],
)
def test_sequence_length_is_checked_against_the_stream(overrides, problem):
    from odedit.configlib import ConfigError

    with pytest.raises(ConfigError, match="stream.sequence_length") as err:
        load_config(None, overrides)
    assert problem in str(err.value)

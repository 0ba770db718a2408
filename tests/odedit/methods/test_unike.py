"""UniKE: memories that start inert, neurons and latent vectors initialised from the edit and its in-context
demonstration, the semantic gate, the disentangling objective, bit-exact restore, state round trip, sequential
edits that keep earlier ones, and a full memory."""

from __future__ import annotations

import pytest
import torch
from testdata import make_image

from odedit.config import ConfigError
from odedit.editing import Editor
from odedit.envs import EditCase
from odedit.evaluation import evaluate_cases
from odedit.loading import load_config
from odedit.methods.base import EditHandle
from odedit.methods.unike import UniKE, UniKEError, _running_mean
from odedit.models import Sample
from odedit.stream import StreamRunner


def _cfg(*overrides):
    return load_config(
        None, ["method.name=unike", "model.family=llava", "odedit.enabled=false", "method.lr=0.05", *overrides]
    )


def _case(i: int, question: str, target: str, rgb=(200, 30, 30)) -> EditCase:
    return EditCase(f"e{i}", {"in": [Sample(question, target, make_image(rgb, seed=i))]})


BLUE = ("what color is the shape ?", "blue")
GREEN = ("does the image contain a triangle ?", "green")


def _method(adapter, *overrides) -> UniKE:
    method = UniKE(adapter, _cfg(*overrides).method)
    method.prepare()
    return method


def test_config_checks():
    with pytest.raises(ConfigError, match="must be \\[ffn_in, ffn_out\\]"):
        _cfg("method.modules=[ffn_out]")
    with pytest.raises(ConfigError, match="must contain \\{prompt\\} and \\{target\\}"):
        _cfg("method.demo_template=no placeholders")


def test_installed_memory_is_inert_until_an_edit(tiny_adapter):
    adapter = tiny_adapter("llava")
    sample = [Sample(*BLUE, make_image((200, 30, 30)))]
    with torch.no_grad():
        before = adapter.run(sample).logits
    method = _method(adapter)
    assert sorted(method.memories) == [0, 1]  # the last 3 layers of a 2-layer model
    names = set(method.editable())
    assert len(names) == 12 and all(".unike_memory." in n for n in names)
    with torch.no_grad():
        assert torch.equal(adapter.run(sample).logits, before)
    _method(adapter)  # a second UniKE over the same model reuses the memories and their hooks
    with torch.no_grad():
        assert torch.equal(adapter.run(sample).logits, before)


def test_new_neurons_and_latent_come_from_the_edit_and_its_demonstration(tiny_adapter):
    adapter = tiny_adapter("llava")
    method = _method(adapter)
    cfg = method.cfg
    case = _case(0, *BLUE)
    plain = case.env("in")[0]
    demo = Sample(cfg.demo_template.format(prompt=plain.prompt, target=plain.target), plain.target, plain.image)
    with torch.no_grad():  # reference hidden states without any hook logic: the model's own output
        hs = {}
        for name, s in (("plain", plain), ("demo", demo)):
            batch = adapter.encode([s])
            out = adapter.model(**batch.inputs, output_hidden_states=True)
            hs[name] = out.hidden_states[1][0, int(batch.last_prompt[0])]  # output of layer 0
    method.begin_step([case], EditHandle())
    mem = method.memories[0]
    assert method.fill() == {"neurons": 1, "slots": 1}
    assert torch.allclose(mem.latents[0], hs["demo"] - hs["plain"], atol=1e-5)  # the in-context shift
    x_e = mem.slot_x[0]
    assert float(torch.relu(x_e @ mem.keys[0] + mem.bias[0]).detach()) == pytest.approx(1 - cfg.key_threshold, abs=1e-5)
    proj = mem.truth.weight.T @ (mem.truth.weight @ mem.latents[0])  # truth space has full rank here: identity
    assert torch.allclose(mem.values[0], cfg.value_scale * proj / (1 - cfg.key_threshold), atol=1e-5)
    assert torch.equal(mem.keys[1:], torch.zeros_like(mem.keys[1:]))  # the rest of the pool stays free


def test_semantic_gate_opens_on_the_edit_and_stays_shut_on_an_unrelated_prompt(tiny_adapter):
    adapter = tiny_adapter("llava")
    method = _method(adapter)
    method.begin_step([_case(0, *BLUE)], EditHandle())
    mem = method.memories[1]
    with torch.no_grad():
        assert float(mem.gate(mem.slot_keys[:1])) == pytest.approx(
            float(torch.sigmoid(torch.tensor((1 - method.cfg.gate_threshold) / method.cfg.gate_temperature))), rel=1e-4
        )
    captured = {}
    hook = next(iter(adapter.edit_modules(["ffn_in"], [1]).values())).register_forward_pre_hook(
        lambda m, a: captured.__setitem__("x", a[0])
    )
    try:
        with torch.no_grad():
            out = adapter.run([Sample("which city is the capital of france ?", "paris")])
    finally:
        hook.remove()
    q = _running_mean(captured["x"])[0, int(out.batch.last_prompt[0])]
    with torch.no_grad():
        assert float(mem.gate(q)) < 0.01


def test_disentangling_objective_separates_facts_and_truthfulness(tiny_adapter):
    adapter = tiny_adapter("llava")
    method = _method(adapter)
    cases = [
        _case(0, *BLUE),
        _case(1, *GREEN, rgb=(30, 200, 30)),
        _case(2, "is there a circle ?", "yes", rgb=(30, 30, 200)),
    ]
    method.begin_step(cases, EditHandle())
    mem = method.memories[1]
    encoders = list(mem.sem.parameters()) + list(mem.truth.parameters())
    opt = torch.optim.Adam(encoders, lr=0.05)
    first = float(method.disentangle_loss().detach())
    for _ in range(60):
        loss = method.disentangle_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(method.disentangle_loss().detach()) < 0.5 * first
    with torch.no_grad():
        zp = torch.nn.functional.normalize(mem.sem(mem.slot_keys[:3]), dim=-1)
        zd = torch.nn.functional.normalize(mem.sem(mem.slot_demo[:3]), dim=-1)
        sim = zp @ zd.T  # a prompt is closest to its own demonstration in the semantic space
        assert bool((sim.diagonal() > sim.masked_fill(torch.eye(3, dtype=torch.bool), -2).max(1).values).all())
        tp = torch.nn.functional.normalize(mem.truth(mem.slot_keys[:3]), dim=-1)
        td = torch.nn.functional.normalize(mem.truth(mem.slot_demo[:3]), dim=-1)
        assert float((td @ td.T).mean()) > float((td @ tp.T).mean())  # truthful states cluster together


def test_edit_changes_only_the_memory_and_restore_rewinds_everything(tiny_adapter):
    adapter = tiny_adapter("llava")
    editor = Editor(adapter, _cfg())
    method = editor.method
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    buffers = {k: v.clone() for k, v in method._buffers().items()}
    handle, report = editor.edit([_case(0, *BLUE)])
    assert report.failed is None
    assert evaluate_cases(adapter, [_case(0, *BLUE)], exact_match=True, metrics=["rel"])[0]["rel"] == 1.0
    changed = {k for k, v in adapter.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(".unike_memory." in k for k in changed)
    handle.restore()
    assert all(torch.equal(before[k], v) for k, v in adapter.model.state_dict().items())
    assert all(torch.equal(buffers[k], v) for k, v in method._buffers().items())
    assert method.fill() == {"neurons": 0, "slots": 0}


def test_sequential_edits_keep_earlier_ones_and_the_state_round_trips(tiny_adapter):
    adapter = tiny_adapter("llava")
    cfg = _cfg()
    editor = Editor(adapter, cfg)
    method = editor.method
    first, second = _case(0, *BLUE), _case(1, *GREEN, rgb=(30, 200, 30))
    StreamRunner(editor, cfg).run([first])  # sequential mode: the edit stays
    rows = {
        li: (m.keys[0].clone(), m.values[0].clone(), m.latents[0].clone(), m.bias[0].clone())
        for li, m in method.memories.items()
    }
    StreamRunner(editor, cfg).run([second])
    assert method.fill() == {"neurons": 2, "slots": 2}
    for li, m in method.memories.items():  # the first edit's rows are untouched by the second step
        assert all(torch.equal(a, b) for a, b in zip(rows[li], (m.keys[0], m.values[0], m.latents[0], m.bias[0])))
    scores = evaluate_cases(adapter, [first, second], exact_match=True, metrics=["rel"])
    assert [r["rel"] for r in scores] == [1.0, 1.0]

    state = method.state_dict()
    other = UniKE(tiny_adapter("llava"), _cfg().method)
    other.prepare()
    other.load_state_dict(state)
    assert other.fill() == {"neurons": 2, "slots": 2}
    sample = first.env("in") + second.env("in")
    with torch.no_grad():
        assert torch.equal(adapter.run(sample).logits, other.adapter.run(sample).logits)
    with pytest.raises(ValueError, match="memory state does not match"):
        other.load_state_dict({k: v for k, v in state.items() if "n_slots" not in k})


def test_a_new_edit_is_initialised_from_the_base_model_whatever_the_memory_holds(tiny_adapter):
    """Issue 17 item 6c: the latent vector and values of an edit are the same after earlier edits as on a fresh
    memory (taken with earlier memories on, each latent grew from the previous ones, to inf over a stream), and
    the values do not scale with the truthfulness encoder's weights (an orthogonal projection)."""
    cfg = _cfg()
    later = _case(1, *GREEN, rgb=(30, 200, 30))
    fresh = _method(tiny_adapter("llava"))
    fresh.begin_step([later], EditHandle())

    editor = Editor(tiny_adapter("llava"), cfg)
    StreamRunner(editor, cfg).run([_case(0, *BLUE)])  # an earlier edit that stays (sequential mode)
    method = editor.method
    with torch.no_grad():
        for mem in method.memories.values():
            mem.truth.weight.mul_(10.0)  # what the contrastive objective does to it over a long stream
    method.begin_step([later], EditHandle())
    for li, mem in method.memories.items():
        ref = fresh.memories[li]
        assert torch.allclose(mem.latents[1], ref.latents[0], atol=1e-5), li
        assert torch.allclose(mem.values[1], ref.values[0], atol=1e-4), li


def test_a_full_memory_is_refused_before_anything_changes(tiny_adapter):
    adapter = tiny_adapter("llava")
    cfg = _cfg("method.pool_size=1", "method.latent_slots=1", "method.n_iter=1")
    editor = Editor(adapter, cfg)
    StreamRunner(editor, cfg).run([_case(0, *BLUE)])
    state = {k: v.clone() for k, v in editor.method.state_dict().items()}
    with pytest.raises(UniKEError, match="memory full"):
        editor.edit([_case(1, *GREEN)])
    assert all(torch.equal(state[k], v) for k, v in editor.method.state_dict().items())

"""LoRA's `method.dropout` takes effect during an edit's optimisation only (issue 17 item 6)."""

from __future__ import annotations

import torch
from testdata import step_cases

from odedit.editing import Editor
from odedit.loading import load_config
from odedit.methods.lora import LoRA


def _cfg(dropout: float):
    overrides = ["method.name=lora", "model.family=llava", "odedit.enabled=false", "method.n_iter=2"]
    return load_config(None, [*overrides, f"method.dropout={dropout}"])


def test_dropout_is_on_while_an_edit_optimises_and_off_when_it_is_scored(tiny_adapter):
    states, modes = [], []
    for seed in (0, 1):
        editor = Editor(tiny_adapter("llava"), _cfg(0.5))
        drops = editor.method.train_mode_modules()
        assert drops and all(isinstance(m, torch.nn.Dropout) for m in drops)
        hooks = [m.register_forward_hook(lambda m, a, out: modes.append(m.training)) for m in drops]
        torch.manual_seed(seed)
        editor.edit(step_cases()[:1])
        n_edit = len(modes)
        with torch.no_grad():
            editor.adapter.run(step_cases()[0].env("in"))
        for h in hooks:
            h.remove()
        states.append([p.detach().clone() for p in editor.method.editable().values()])
        # the step's iterations in train mode; its closing forward (target_prob) and any scoring in eval mode
        assert n_edit > len(drops) and all(modes[: n_edit - len(drops)]), "train mode while the edit optimises"
        assert not any(modes[n_edit - len(drops) :]) and not editor.adapter.model.training
        modes.clear()
    # the update depends on the dropout masks: two seeds, two different edits
    assert any(not torch.equal(a, b) for a, b in zip(*states))
    # without dropout nothing is put in train mode (edits stay deterministic)
    assert LoRA(editor.adapter, _cfg(0.0).method).train_mode_modules() == []

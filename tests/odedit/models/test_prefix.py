"""Frozen-prefix replay gives exactly the full model's logits, hidden states and phi_e gradients."""

from __future__ import annotations

import pytest
import torch
from testdata import FAMILIES, make_image

from odedit.models import Sample
from odedit.models.prefix import PrefixRunner

SAMPLES = [
    Sample("what color is the shape ?", "red", make_image()),
    Sample("who wrote it ?", "paris"),
    Sample("is there a circle ?", "yes no", make_image((0, 255, 0), seed=3)),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("first", [0, -1])
def test_replay_matches_full_forward(family, first, tiny_adapter):
    adapter = tiny_adapter(family)
    layer = adapter.decoder_layers()[-1]
    weight = adapter.edit_modules(["ffn_out"], [-1])
    w = next(iter(weight.values())).weight
    w.requires_grad_(True)
    batch = adapter.encode(SAMPLES)
    runner = PrefixRunner(adapter, first)

    full = runner.forward(batch)
    (g_full,) = torch.autograd.grad(full.answer_logits().logsumexp(-1).sum(), w)
    replay = runner.forward(batch)
    assert runner._batch is batch, "the second call replays"
    (g_replay,) = torch.autograd.grad(replay.answer_logits().logsumexp(-1).sum(), w)
    assert torch.allclose(full.logits, replay.logits, atol=1e-5)
    assert torch.allclose(full.hidden, replay.hidden, atol=1e-5)
    assert torch.allclose(g_full, g_replay, atol=1e-5)
    # A change of the edited layer shows up in the replay (it is really recomputed).
    with torch.no_grad():
        w.add_(0.5)
    assert not torch.allclose(runner.forward(batch).logits, replay.logits)
    assert layer is adapter.decoder_layers()[-1]

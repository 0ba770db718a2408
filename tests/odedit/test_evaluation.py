"""Scoring edit cases (`odedit.evaluation`): one forward pass per chunk of samples, whatever their environments."""

from __future__ import annotations

import math

import pytest
import torch
from testdata import make_image

from odedit.envs import EditCase, attach_references
from odedit.evaluation import evaluate_cases
from odedit.metrics import HEADLINE
from odedit.models.base import Sample


def _cases(n: int) -> list[EditCase]:
    """`n` cases with every scored environment, text and image, several samples in some."""
    return [
        EditCase(
            f"e{i}",
            {
                "in": [Sample("what color is the shape ?", ("red", "blue")[i % 2], make_image((255, 0, 0), seed=i))],
                "se_text": [Sample("which color is the shape" + " ?" * (i + 1), "red")],
                "se_image": [Sample("what color is the shape ?", "red", make_image((250, 5, 5), seed=10 + i))],
                "out_text": [Sample("who wrote it ?" + " it" * i, "paris"), Sample("where is it ?", "rome")],
                "out_mm": [Sample("is there a circle ?", "yes no", make_image((0, 255, 0), seed=20 + i))],
                "out_hard": [Sample("is the shape round ?", "no", make_image((0, 0, 255), seed=30 + i))],
            },
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_mixed_chunks_score_as_one_sample_per_pass_and_cost_one_pass_each(tiny_adapter, family):
    adapter = tiny_adapter(family)
    cases = _cases(3)
    attach_references(adapter, cases, k=10)
    with torch.no_grad():  # an edited model, so locality is not trivially 1.0
        for p in adapter.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    passes = []
    run = adapter.run
    adapter.run = lambda samples, **kw: passes.append(len(samples)) or run(samples, **kw)
    one_by_one = evaluate_cases(adapter, cases, batch_size=1)
    n_samples = len(passes)
    passes.clear()
    mixed = evaluate_cases(adapter, cases, batch_size=8)
    # 3 cases x 7 samples: 21 passes one at a time; 3 chunks of up to 8 (the old code: at least one per environment)
    assert n_samples == 21 and passes == [8, 8, 5]
    for a, b in zip(one_by_one, mixed, strict=True):
        assert a["edit_id"] == b["edit_id"]
        for name in HEADLINE:
            assert math.isclose(a[name], b[name], abs_tol=1e-6), (name, a[name], b[name])
    assert any(r["t_loc"] < 1.0 or r["m_loc"] < 1.0 for r in mixed)  # the scores are not all trivial


def test_only_the_metrics_asked_for_are_scored(tiny_adapter):
    adapter = tiny_adapter("llava")
    cases = _cases(2)
    attach_references(adapter, cases, k=10)
    rows = evaluate_cases(adapter, cases, metrics=["rel", "m_loc"])
    assert all(set(r) == {"edit_id", "rel", "m_loc"} for r in rows)

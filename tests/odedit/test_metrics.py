"""Metrics against naive hand-computed references, including the padding cases EasyEdit users hit."""

from __future__ import annotations

import math

import pytest
import torch
from testdata import make_image

from odedit.envs import EditCase, attach_references
from odedit.evaluation import evaluate_cases, summarize
from odedit.metrics import (
    HEADLINE,
    PROTOCOLS,
    answer_topk,
    generation_exact_match,
    mean_value,
    normalize_answer,
    token_accuracy,
    topk_agreement,
)
from odedit.models.base import EncodedBatch, ForwardOutput, Sample


def _fake(logits: torch.Tensor, targets: torch.Tensor) -> ForwardOutput:
    B, L, _ = logits.shape
    batch = EncodedBatch(
        {"input_ids": torch.zeros(B, L, dtype=torch.long)},
        targets,
        torch.zeros(B, L, dtype=torch.bool),
        torch.zeros(B, dtype=torch.long),
        torch.zeros(B, dtype=torch.bool),
    )
    return ForwardOutput(logits, torch.zeros(B, L, 4), batch)


def _onehot(ids, V=6):
    return torch.nn.functional.one_hot(torch.tensor(ids), V).float()


def test_token_accuracy_right_and_left_padding_by_hand():
    # Row 0: answer at positions 1,2 (right padded), predictions [3, 1] vs targets [3, 2] -> 0.5
    # Row 1: answer at positions 3,4 (left padded), predictions [4, 5] vs targets [4, 5] -> 1.0
    logits = torch.stack([_onehot([0, 3, 1, 0, 0]), _onehot([0, 0, 0, 4, 5])])
    targets = torch.tensor([[-100, 3, 2, -100, -100], [-100, -100, -100, 4, 5]])
    out = _fake(logits, targets)
    assert token_accuracy(out).tolist() == [0.5, 1.0]
    assert token_accuracy(out, exact_match=True).tolist() == [0.0, 1.0]


def test_padding_positions_never_count():
    # A padded position whose argmax would "match" a pad id must not be scored (EasyEdit #303/#390 class).
    logits = torch.stack([_onehot([0, 0, 2]), _onehot([2, 0, 0])])
    targets = torch.tensor([[-100, -100, 2], [-100, -100, -100]])
    acc = token_accuracy(_fake(logits, targets))
    assert acc[0] == 1.0 and math.isnan(acc[1])


def test_topk_agreement_naive_reference():
    torch.manual_seed(0)
    pre = torch.randn(2, 4, 12)
    post = pre.clone()
    post[0, 1] += torch.randn(12) * 3  # perturb one answer position of row 0
    targets = torch.tensor([[-100, 1, 1, -100], [-100, -100, 1, 1]])
    ref = answer_topk(_fake(pre, targets), 3)
    got = topk_agreement(_fake(post, targets), ref, 3)
    # naive: per row, mean over answer positions and rank slots of id equality
    for b in range(2):
        pos = (targets[b] >= 0).nonzero().flatten()
        eq = [(post[b, p].topk(3).indices == pre[b, p].topk(3).indices).float() for p in pos]
        assert got[b].item() == pytest.approx(torch.stack(eq).mean().item())
    assert got[1] == 1.0


def test_topk_agreement_top1_is_argmax_match():
    pre = torch.stack([_onehot([0, 2, 3])])
    post = torch.stack([_onehot([0, 2, 4])])
    targets = torch.tensor([[-100, 1, 1]])
    assert topk_agreement(_fake(post, targets), answer_topk(_fake(pre, targets), 1), 1).item() == 0.5


def test_generation_exact_match_normalisation():
    got = generation_exact_match(["The Red.", "blue circle", "a triangle"], ["red", "blue", "triangle"])
    assert got.tolist() == [1.0, 0.0, 1.0]
    assert normalize_answer("  An   Apple! ") == "apple"
    with pytest.raises(ValueError):
        generation_exact_match(["a"], [])


def test_mean_value_skips_missing_and_carries_protocol():
    v = mean_value("m_loc", [1.0, float("nan"), 0.5])
    assert v.value == 0.75 and v.n == 2 and v.protocol.k == 10
    assert "top-k" in v.protocol.describe()
    assert set(HEADLINE) <= set(PROTOCOLS)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pre_edit_locality_is_one_and_padding_invariant(tiny_adapter, family):
    adapter = tiny_adapter(family)
    img = make_image((0, 0, 255))
    cases = [
        EditCase(
            f"e{i}",
            {
                "in": [Sample("what color is the shape ?", "red", img)],
                "out_text": [Sample("who wrote it ?" + " it" * i, "paris")],
                "out_mm": [Sample("is there a circle ?", "yes no", make_image((0, 255, 0), seed=i))],
            },
        )
        for i in range(3)
    ]
    attach_references(adapter, cases, k=10)
    rows = evaluate_cases(adapter, cases, batch_size=2)
    assert all(r["t_loc"] == 1.0 and r["m_loc"] == 1.0 for r in rows)
    summary = summarize(rows)
    assert summary["t_loc"].value == 1.0 and summary["t_loc"].n == 3
    # Scores do not depend on the padding side.
    right = token_accuracy(adapter.run([c.env("in")[0] for c in cases], padding_side="right"))
    left = token_accuracy(adapter.run([c.env("in")[0] for c in cases], padding_side="left"))
    assert torch.equal(right, left)

"""Score edit cases with the MMEdit metrics: one function for pre-edit and post-edit numbers alike.

    rows = evaluate_cases(adapter, cases)           # one dict per case: rel, t_gen, ..., m_loc_hard
    summary = summarize(rows)                        # name -> MetricValue (mean, n, protocol)

Samples of all cases and all environments are batched together, so evaluating a step of 16 edits costs a
handful of forward passes, not 16 x 6 (nor one per environment).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from odedit.envs import EditCase
from odedit.metrics import (
    GEN,
    METRIC_OF_ENV,
    PROTOCOLS,
    TF,
    MetricValue,
    generation_exact_match,
    mean_value,
    token_accuracy,
    topk_agreement,
)
from odedit.models.base import ModelAdapter


@torch.no_grad()
def evaluate_cases(
    adapter: ModelAdapter,
    cases: Sequence[EditCase],
    *,
    exact_match: bool = False,
    generation: bool = False,
    batch_size: int = 32,
    metrics: Sequence[str] | None = None,
) -> list[dict[str, float]]:
    """Per case, the mean score of each metric over that case's samples (nan where it has none).

    Args:
        adapter: the (possibly edited) model.
        cases: edit cases; OUT environments must carry pre-edit references (`attach_references`).
        exact_match: teacher-forced metrics count a sample only when all its target tokens are right.
        generation: also score greedy-decoding exact match on IN and SE (`*_gen_em`).
        batch_size: forward-pass batch size.
        metrics: restrict to these metric names (default: all applicable).
    """
    was_training = adapter.model.training
    adapter.model.eval()
    rows: list[dict[str, float]] = [{"edit_id": c.edit_id} for c in cases]  # type: ignore[dict-item]
    wanted = set(metrics) if metrics is not None else None
    # Every environment's samples in one list, cut into chunks of `batch_size`: a chunk mixes environments (and
    # scorers), so a step costs ceil(samples / batch_size) forward passes rather than at least one per
    # environment. Under ZeRO-3 each forward pass gathers the whole model, so this is what an evaluation costs
    # there (bench.zero_memory: 7 passes of 2 edits became 1). The editing path batches the same way
    # (`odedit.editstep.forward_envs`).
    flat = [
        (name, i, j, s)
        for env, name in METRIC_OF_ENV.items()
        if wanted is None or name in wanted
        for i, c in enumerate(cases)
        for j, s in enumerate(c.env(env))
    ]
    env_of = {name: env for env, name in METRIC_OF_ENV.items()}
    scores = torch.full((len(flat),), float("nan"))
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        out = adapter.run([s for _, _, _, s in chunk])
        kinds = [PROTOCOLS[name] for name, _, _, _ in chunk]
        if any(p.scorer == TF for p in kinds):
            tf = token_accuracy(out, exact_match)
        for k in {p.k for p in kinds if p.scorer != TF}:
            refs = [
                cases[i].references[env_of[name]][j].topk_ids if p.scorer != TF and p.k == k else torch.empty(0)
                for (name, i, j, _), p in zip(chunk, kinds)
            ]
            agree = topk_agreement(out, refs, k)
            for b, p in enumerate(kinds):
                if p.scorer != TF and p.k == k:
                    scores[start + b] = agree[b]
        for b, p in enumerate(kinds):
            if p.scorer == TF:
                scores[start + b] = tf[b]
    for name in METRIC_OF_ENV.values():
        if wanted is not None and name not in wanted:
            continue
        picked = [n for n, (metric, *_) in enumerate(flat) if metric == name]
        _fold(rows, [flat[n][1:] for n in picked], scores[picked], name)
    if generation:
        for env in ("in", "se_text", "se_image"):
            name = f"{METRIC_OF_ENV[env]}_gen_em"
            if wanted is not None and name not in wanted:
                continue
            assert PROTOCOLS[name].scorer == GEN
            flat = [(i, j, s) for i, c in enumerate(cases) for j, s in enumerate(c.env(env))]
            scores = torch.full((len(flat),), float("nan"))
            for start in range(0, len(flat), batch_size):
                chunk = [s for _, _, s in flat[start : start + batch_size]]
                n_new = max(len(adapter._tok(" " + s.target)) for s in chunk) + 2
                preds = adapter.generate(chunk, max_new_tokens=n_new)
                scores[start : start + len(chunk)] = generation_exact_match(preds, [s.target for s in chunk])
            _fold(rows, flat, scores, name)
    adapter.model.train(was_training)
    return rows


def _fold(rows: list[dict], flat: list, scores: torch.Tensor, name: str) -> None:
    """Average sample scores into their case's row (a case may have several samples of one environment)."""
    sums: dict[int, list[float]] = {}
    for (i, _, _), v in zip(flat, scores.tolist()):
        if not math.isnan(v):
            sums.setdefault(i, []).append(v)
    for i, row in enumerate(rows):
        vals = sums.get(i)
        row[name] = sum(vals) / len(vals) if vals else float("nan")


def summarize(rows: Sequence[dict[str, float]], exact_match: bool = False) -> dict[str, MetricValue]:
    """Mean of each metric over the cases that have it, with its protocol."""
    names = [n for n in PROTOCOLS if any(n in r for r in rows)]
    return {n: mean_value(n, [r.get(n, float("nan")) for r in rows], exact_match) for n in names}

"""The Pareto front of a multi-objective search and the configs the user's trade-offs pick from it (pure).

    front = pareto_front([(0.9, 0.2), (0.5, 0.5), (0.4, 0.4)], ("max", "max"))   # -> [0, 1]
    chosen = pick(points, front, {"rel": 0.8, "loc": 0.2}, ("rel", "loc"), ("max", "max"))

**Dominance.** Point a dominates b when a is at least as good as b in every objective (>= for max, <= for min)
and strictly better in one; the front is the points no other point dominates. Equal points do not dominate
each other, so duplicates stay on the front together.

**Which trials.** Only trials that edited their whole slice with a finite value for every objective take part
(`eligible`): a trial ASHA stopped (`search.asha_metric`) scored fewer edits, and a failed one none.

**Trade-offs.** A weighting {metric: weight >= 0} picks the front point with the largest weighted sum
sum(w_m * s_m * v_m), with s_m = +1 for max and -1 for min. [INFERENCE] Raw values, not values rescaled to the
front's range: every search metric is an accuracy in [0, 1], so weights mean the same whatever the front holds,
and adding or removing a trial never changes what a weighting asks for. Picking from the front (not from all
trials) keeps a zero weight from choosing a point that another beats on that metric at no cost. Ties go to the
earlier trial.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def _signed(point: Sequence[float], modes: Sequence[str]) -> list[float]:
    return [v if m == "max" else -v for v, m in zip(point, modes)]


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """a is at least as good as b in every objective and strictly better in one."""
    sa, sb = _signed(a, modes), _signed(b, modes)
    return all(x >= y for x, y in zip(sa, sb)) and any(x > y for x, y in zip(sa, sb))


def pareto_front(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[int]:
    """Indices (ascending) of the points no other point dominates. O(n^2): a search has tens of trials."""
    if any(len(p) != len(modes) for p in points):
        raise ValueError(f"every point needs {len(modes)} values, one per mode {list(modes)}")
    return [i for i, p in enumerate(points) if not any(dominates(q, p, modes) for q in points)]


def score(point: Sequence[float], weights: Mapping[str, float], names: Sequence[str], modes: Sequence[str]) -> float:
    """A trade-off's weighted sum of one point (min metrics negated)."""
    signed = dict(zip(names, _signed(point, modes)))
    return sum(float(w) * signed[m] for m, w in weights.items())


def pick(
    points: Sequence[Sequence[float]],
    front: Sequence[int],
    weights: Mapping[str, float],
    names: Sequence[str],
    modes: Sequence[str],
) -> int | None:
    """The index (into `points`) of the front point a trade-off prefers; None for an empty front."""
    best: int | None = None
    for i in front:  # ascending, and only a strictly larger score replaces: ties keep the earlier trial
        if best is None or score(points[i], weights, names, modes) > score(points[best], weights, names, modes):
            best = i
    return best


def eligible(trials: Sequence[Any], names: Sequence[str]) -> list[Any]:
    """Trials (`TrialOutcome`s) that edited their whole slice and have a finite value for every objective."""

    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    return [t for t in trials if t.status == "completed" and all(finite(t.metrics.get(m)) for m in names)]


def front_and_picks(
    trials: Sequence[Any],
    names: Sequence[str],
    modes: Sequence[str],
    tradeoffs: Mapping[str, Mapping[str, float]],
) -> tuple[list[Any], dict[str, Any]]:
    """(the front's trials in trial order, {trade-off name: the trial it picks}); trade-offs keep their order."""
    pool = eligible(trials, names)
    points = [[float(t.metrics[m]) for m in names] for t in pool]
    front = pareto_front(points, modes)
    picks = {}
    for name, weights in tradeoffs.items():
        chosen = pick(points, front, weights, names, modes)
        if chosen is not None:
            picks[name] = pool[chosen]
    return [pool[i] for i in front], picks

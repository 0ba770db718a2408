"""The Pareto front and the trade-offs' picks (pipeline.search.pareto): properties over random points, and the
trials that may take part. No Ray."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.search.pareto import dominates, eligible, front_and_picks, pareto_front, pick, score
from pipeline.search.tuner import TrialOutcome

# Values on a coarse grid, so ties and duplicates (the hard cases of dominance) come up often.
values = st.integers(0, 6).map(lambda v: v / 6)


@st.composite
def point_sets(draw):
    k = draw(st.integers(2, 3))
    kinds = draw(st.lists(st.sampled_from(["max", "min"]), min_size=k, max_size=k))
    points = draw(st.lists(st.lists(values, min_size=k, max_size=k), min_size=0, max_size=12))
    return points, kinds


@settings(max_examples=300, deadline=None)
@given(point_sets())
def test_no_front_point_is_dominated_and_every_dominated_point_is_left_out(case):
    points, kinds = case
    front = pareto_front(points, kinds)
    assert front == sorted(set(front))
    for i, p in enumerate(points):
        beaten = any(dominates(q, p, kinds) for q in points)
        assert (i in front) == (not beaten)
    if points:  # a finite set always has a non-dominated point
        assert front
    for i in front:  # equal points stay together
        assert all(j in front for j, q in enumerate(points) if q == points[i])


@settings(max_examples=200, deadline=None)
@given(point_sets(), st.data())
def test_a_tradeoff_picks_a_front_point_with_the_largest_weighted_sum(case, data):
    points, kinds = case
    names = [f"m{i}" for i in range(len(kinds))]
    weights = {m: data.draw(st.floats(0, 1)) for m in names}
    front = pareto_front(points, kinds)
    chosen = pick(points, front, weights, names, kinds)
    if not points:
        assert chosen is None
        return
    assert chosen in front
    best = max(score(points[i], weights, names, kinds) for i in front)
    assert score(points[chosen], weights, names, kinds) == best
    assert chosen == min(i for i in front if score(points[i], weights, names, kinds) == best)  # earliest on ties
    if all(w > 0 for w in weights.values()):  # strictly positive weights: no trial anywhere scores higher
        assert all(score(p, weights, names, kinds) <= best + 1e-12 for p in points)


def test_dominance_follows_each_objectives_mode():
    assert dominates([0.9, 0.5], [0.8, 0.5], ["max", "max"])
    assert not dominates([0.8, 0.5], [0.8, 0.5], ["max", "max"])  # equal: neither
    assert dominates([0.9, 0.2], [0.8, 0.5], ["max", "min"])
    assert not dominates([0.9, 0.6], [0.8, 0.5], ["max", "min"])
    assert pareto_front([[0.9, 0.2], [0.5, 0.5], [0.4, 0.4], [0.5, 0.5]], ["max", "max"]) == [0, 1, 3]
    with pytest.raises(ValueError, match="2 values"):
        pareto_front([[0.1]], ["max", "max"])


def test_weights_pick_the_ends_and_the_middle_of_a_front():
    points = [[0.9, 0.2], [0.6, 0.6], [0.2, 0.9], [0.5, 0.5]]
    names, kinds = ["rel", "loc"], ["max", "max"]
    front = pareto_front(points, kinds)
    assert front == [0, 1, 2]
    assert pick(points, front, {"rel": 0.8, "loc": 0.2}, names, kinds) == 0
    assert pick(points, front, {"rel": 0.5, "loc": 0.5}, names, kinds) == 1
    assert pick(points, front, {"rel": 0.2, "loc": 0.8}, names, kinds) == 2
    # A zero weight picks from the front only: [0.9, 0.1] ties [0.9, 0.2] on rel but is dominated by it.
    assert pick([[0.9, 0.1], [0.9, 0.2]], [1], {"rel": 1.0}, names, kinds) == 1
    assert pick(points, [], {"rel": 1.0}, names, kinds) is None


def _trial(i, status, rel, loc):
    return TrialOutcome(i, f"t{i}", status, {}, {"rel": rel, "loc": loc}, [], mlflow_run_id=f"run{i}")


def test_only_trials_that_edited_their_whole_slice_with_every_value_take_part():
    trials = [
        _trial(1, "completed", 0.5, 0.5),
        _trial(2, "stopped", 0.99, 0.99),  # ASHA stopped it: its scores are from fewer edits
        _trial(3, "error", 1.0, 1.0),
        _trial(4, "completed", float("nan"), 0.9),
        _trial(5, "completed", 0.8, 0.3),
        _trial(6, "completed", 0.4, 0.4),
        _trial(7, "completed", None, 0.95),
    ]
    assert [t.index for t in eligible(trials, ["rel", "loc"])] == [1, 5, 6]
    front, picks = front_and_picks(
        trials, ["rel", "loc"], ["max", "max"], {"reliability": {"rel": 1.0}, "locality": {"loc": 1.0}}
    )
    assert [t.index for t in front] == [1, 5]
    assert {k: t.index for k, t in picks.items()} == {"reliability": 5, "locality": 1}
    assert list(picks) == ["reliability", "locality"]  # the trade-offs' order: the first one writes best.yaml
    assert front_and_picks([], ["rel", "loc"], ["max", "max"], {"a": {"rel": 1.0}}) == ([], {})
    assert math.isclose(score([0.5, 0.2], {"rel": 1.0, "loc": 2.0}, ["rel", "loc"], ["max", "min"]), 0.1)

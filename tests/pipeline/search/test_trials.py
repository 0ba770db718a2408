"""A trial's pure parts: the objective and the metrics file a trial tails. No Ray."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.search.trials import MetricsTail, search_metrics

# ---------------------------------------------------------------------------------------------- grammar


def test_objective_is_the_mean_of_rel_gen_and_loc():
    m = search_metrics({"rel": 0.9, "t_gen": 0.6, "m_gen": 0.4, "t_loc": 1.0, "m_loc": 0.8, "m_loc_hard": 0.1})
    assert m["gen"] == pytest.approx(0.5)
    assert m["loc"] == pytest.approx(0.9)
    assert m["objective"] == pytest.approx((0.9 + 0.5 + 0.9) / 3)
    assert m["m_loc_hard"] == pytest.approx(0.1)  # reported, not part of the objective


def test_missing_parts_are_left_out_of_their_mean():
    m = search_metrics({"rel": 1.0, "t_gen": 0.5, "m_gen": None, "t_loc": float("nan")})
    assert m["gen"] == pytest.approx(0.5)
    assert math.isnan(m["loc"]) and math.isnan(m["m_gen"]) and math.isnan(m["m_loc_hard"])
    assert m["objective"] == pytest.approx(0.75)
    assert math.isnan(search_metrics({})["objective"])


def test_metrics_tail_reads_only_complete_retention_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(str(path))
    assert tail.retention_points() == []  # no file yet
    rec = lambda step, prefix: json.dumps({"step": step, "values": {f"{prefix}/rel": step / 10}}) + "\n"  # noqa: E731
    path.write_text(rec(0, "pre") + rec(4, "immediate") + rec(4, "retention") + rec(8, "retention")[:15])
    assert tail.retention_points() == [(4, {"rel": 0.4})]
    with open(path, "a") as fh:
        fh.write(rec(8, "retention")[15:] + rec(12, "retention"))
    assert tail.retention_points() == [(8, {"rel": 0.8}), (12, {"rel": 1.2})]
    assert tail.retention_points() == []

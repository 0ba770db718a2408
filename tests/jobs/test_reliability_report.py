"""docs/reliability.md is computed from one run's recorded outcomes (issue 19 item 21): figures from the rows,
rows of failed tests apart, and a check that the committed document says what the run observed."""

from __future__ import annotations

import json

from jobs import reliability_report as rr


def _row(kind="fault", case="worker killed", outcome="resumed", detail="", test="tests/t.py::t", **extra):
    return {"kind": kind, "case": case, "outcome": outcome, "detail": detail, "test": test, **extra}


def _doc(rows, commit="abc1234"):
    return {"commit": commit, "date": "2026-12-07", "exitstatus": 0, "outcomes": rows}


def test_edits_lost_is_the_sum_the_fault_tests_measured():
    rows = [
        _row(edits_lost=0, applied_twice=0, test_passed=True),
        _row(case="node killed", edits_lost=2, applied_twice=1, test_passed=True),
        _row(case="write killed", test_passed=True),  # a fault test that does not count a ledger
    ]
    text = rr.render(_doc(rows))
    assert "edits lost: **2**, applied twice: **1**, summed over the 2 of 3 fault tests" in text
    assert "edits lost: **not measured**" in rr.render(_doc([_row(test_passed=True)]))
    assert "commit abc1234, 2026-12-07" in text


def test_rows_of_tests_that_failed_are_listed_apart_and_not_counted():
    rows = [
        _row(edits_lost=0, applied_twice=0, test_passed=True),
        _row(kind="bad record", case="duplicate", outcome="quarantined", test_passed=True),
        _row(case="lease stolen", edits_lost=0, applied_twice=0, test_passed=False),
    ]
    text = rr.render(_doc(rows))
    assert "faults injected: **1**; bad inputs tried: **1** (bad record: 1)" in text
    assert "not counted above): **1**" in text
    head, tail = text.split("## Recorded by tests that then failed")
    assert "lease stolen" in tail and "lease stolen" not in head


def test_the_check_ignores_details_and_provenance_but_not_a_changed_row(tmp_path):
    path = tmp_path / "reliability.md"
    rows = [_row(detail="killed after 4 of 16 edits /tmp/pytest-7/x", edits_lost=0, applied_twice=0)]
    path.write_text(rr.render(_doc(rows)))
    again = [_row(detail="killed after 9 of 16 edits /tmp/pytest-8/x", edits_lost=0, applied_twice=0)]
    assert rr.check_document(_doc(again, commit="def5678"), str(path)) is None

    more = again + [_row(kind="bad file", case="truncated JSON", outcome="error before any work")]
    problem = rr.check_document(_doc(more), str(path))
    assert problem and "differs from this run's outcomes" in problem and "bad inputs tried: **1**" in problem
    assert "python -m jobs.reliability_report" in problem
    lost = [_row(detail="x", edits_lost=1, applied_twice=0)]
    assert "edits lost: **1**" in rr.check_document(_doc(lost), str(path))
    assert "cannot be read" in rr.check_document(_doc(rows), str(tmp_path / "missing.md"))


def test_cli_renders_the_outcomes_file_and_refuses_a_missing_one(tmp_path, capsys):
    outcomes, out = tmp_path / "outcomes.json", tmp_path / "doc.md"
    assert rr.cli(["--outcomes", str(outcomes), "--out", str(out)]) == 2
    outcomes.write_text(json.dumps(_doc([_row(edits_lost=0, applied_twice=0, test_passed=True)])))
    assert rr.cli(["--outcomes", str(outcomes), "--out", str(out)]) == 0
    assert rr.check_document(json.loads(outcomes.read_text()), str(out)) is None
    outcomes.write_text("{}")
    assert rr.cli(["--outcomes", str(outcomes), "--out", str(out)]) == 2
    assert "not an outcomes file" in capsys.readouterr().err

"""A search resumes from its own JSON state (issue 19 item 1): the driver's recorder, the state it writes, and the
searcher that re-runs unfinished trials under their first ids and tells Optuna the finished ones. No Ray cluster:
the Tune callback and searcher are driven by hand. The end-to-end resume (with Tune's pickles replaced by
code-running ones) is `tests/jobs/test_tune.py::test_killed_search_is_restored_without_repeating_finished_trials`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from searchdata import SPACE

from pipeline.search.resume import (
    RESUME_KEY,
    STATE_FILE,
    SearchState,
    make_random_searcher,
    make_recorder,
    make_resume_searcher,
    project_trial_id,
)
from pipeline.search.space import parse_space

DIMS = parse_space(SPACE)[0]


def _trial(tune_id: str, index: int, config: dict, last: dict | None = None):
    return SimpleNamespace(
        trial_id=tune_id,
        config=config,
        path=f"/x/tune/run_trial_{tune_id}_{index:05d}_0_method.lr=0.01_2026-01-01",
        last_result=last or {},
    )


def _sample(lr: float) -> dict:
    return {"method.lr": lr, "odedit.w_loc": 1.0, "odedit.penalty": "learned", "method.n_iter": 3}


def test_the_recorder_writes_every_trial_as_plain_json(tmp_path):
    state = SearchState(str(tmp_path))
    recorder = make_recorder(state, DIMS, "objective", index_offset=0)
    done, stopped, running = _trial("aa01", 1, _sample(0.01)), _trial("bb02", 2, _sample(0.1)), _trial("cc03", 3, {})
    for t in (done, stopped, running):
        recorder.on_trial_start(0, [], t)
    recorder.on_trial_result(0, [], done, {"training_iteration": 4, "objective": 0.5})
    recorder.on_trial_result(0, [], done, {"training_iteration": 8, "objective": 0.6, "stream_done": True})
    recorder.on_trial_result(0, [], done, {"training_iteration": 8, "objective": 0.7, "stream_done": True})
    done.last_result = {"objective": 0.7, "stream_done": True, "edits": 8}
    recorder.on_trial_complete(0, [], done)
    stopped.last_result = {"objective": 0.1, "stream_done": False, "edits": 4}
    recorder.on_trial_complete(0, [], stopped)

    with open(tmp_path / STATE_FILE) as fh:
        data = json.load(fh)  # JSON, nothing else: this is all a resume reads
    assert data["trials"]["aa01"]["curve"] == [[4, 0.5], [8, 0.7]]  # one point per edits count, the last kept
    again = SearchState(str(tmp_path))
    assert [(t["trial_id"], t["status"]) for t in again.finished()] == [("aa01", "completed"), ("bb02", "stopped")]
    assert [t["trial_id"] for t in again.unfinished()] == ["cc03"]
    assert again.trials["aa01"]["sample"] == _sample(0.01) and again.trials["aa01"]["metrics"]["objective"] == 0.7

    # A re-run of cc03 (new Tune id, RESUME_KEY in its config) updates cc03's record; new trials number on.
    recorder = make_recorder(again, DIMS, "objective", index_offset=again.next_index())
    recorder.on_trial_start(0, [], _trial("dd01", 1, {RESUME_KEY: "cc03"}))
    recorder.on_trial_start(0, [], _trial("ee02", 2, _sample(0.2)))
    assert again.trials["cc03"]["tune_trial_id"] == "dd01" and again.trials["cc03"]["index"] == 3
    assert again.trials["ee02"]["index"] == 5 and again.by_tune_id("dd01")["trial_id"] == "cc03"
    assert project_trial_id({RESUME_KEY: "cc03"}, "dd01") == "cc03" and project_trial_id({}, "dd01") == "dd01"


def test_a_state_file_of_another_shape_is_refused_naming_the_fix(tmp_path):
    (tmp_path / STATE_FILE).write_text(json.dumps({"trials": ["not", "a", "mapping"]}))
    with pytest.raises(ValueError, match="delete the search directory"):
        SearchState(str(tmp_path))


def test_the_resume_searcher_reruns_unfinished_trials_first_and_tells_optuna_the_finished(tmp_path):
    pytest.importorskip("optuna")
    from ray.tune.search.optuna import OptunaSearch

    finished = [
        {"trial_id": "aa01", "config": _sample(0.01), "status": "completed", "metrics": {"objective": 0.7}},
        {"trial_id": "bb02", "config": _sample(0.1), "status": "stopped", "metrics": {"objective": 0.1}},
        {"trial_id": "ff06", "config": _sample(0.3), "status": "error", "metrics": {}},
    ]
    reruns = [{"trial_id": "cc03", "config": _sample(0.05)}]
    inner = OptunaSearch(seed=0)
    searcher = make_resume_searcher(inner, reruns, finished, "objective")
    assert searcher.set_search_properties("objective", "max", {d.key: d.domain() for d in DIMS})
    states = [t.state.name for t in inner._ot_study.trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL"]  # Optuna continues from what the first attempt saw
    assert inner._ot_study.best_value == pytest.approx(0.7)

    first = searcher.suggest("t-new-1")
    assert first == {**_sample(0.05), RESUME_KEY: "cc03"}  # the unfinished trial, under its first id
    second = searcher.suggest("t-new-2")
    assert RESUME_KEY not in second and set(second) == {d.key for d in DIMS}
    searcher.on_trial_complete("t-new-1", {"objective": 0.4, "stream_done": True})  # told to Optuna too
    searcher.on_trial_complete("t-new-2", {"objective": 0.2, "stream_done": True})
    assert len(inner._ot_study.trials) == 5


def test_the_random_searcher_of_a_resume_samples_inside_the_space():
    searcher = make_random_searcher(seed=1)
    searcher.set_search_properties("objective", "max", {d.key: d.domain() for d in DIMS})
    dims = {d.key: d for d in DIMS}
    for i in range(5):
        sample = searcher.suggest(f"t{i}")
        assert all(dims[k].contains(dims[k].decode(v)) for k, v in sample.items()), sample


def test_a_resumed_multi_objective_search_tells_optuna_each_finished_trials_values():
    pytest.importorskip("optuna")
    from ray.tune.search.optuna import OptunaSearch

    finished = [
        {"trial_id": "aa01", "config": _sample(0.01), "status": "completed", "metrics": {"rel": 0.7, "loc": 0.4}},
        {"trial_id": "bb02", "config": _sample(0.1), "status": "completed", "metrics": {"rel": 0.3, "loc": 0.9}},
        {"trial_id": "cc03", "config": _sample(0.2), "status": "stopped", "metrics": {"rel": 0.9, "loc": 0.1}},
        {"trial_id": "dd04", "config": _sample(0.3), "status": "completed", "metrics": {"rel": 0.5, "loc": None}},
        {"trial_id": "ee05", "config": _sample(0.05), "status": "error", "metrics": {}},
    ]
    # As the driver builds it: Optuna holds the metrics and modes, Tune's config names none.
    inner = OptunaSearch(metric=["rel", "loc"], mode=["max", "min"], seed=0)
    searcher = make_resume_searcher(inner, [{"trial_id": "ff06", "config": _sample(0.06)}], finished, ["rel", "loc"])
    assert searcher.set_search_properties(None, None, {d.key: d.domain() for d in DIMS})
    study = inner._ot_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    told = [(t.state.name, t.values, t.params["method.lr"]) for t in study.trials]
    assert told == [
        ("COMPLETE", [0.7, 0.4], 0.01),
        ("COMPLETE", [0.3, 0.9], 0.1),
        ("PRUNED", None, 0.2),  # stopped early: no values from fewer edits
        ("FAIL", None, 0.3),  # a value missing
        ("FAIL", None, 0.05),
    ]
    assert [t.values for t in study.best_trials] == [[0.7, 0.4]]  # loc is minimised: (0.7, 0.4) beats (0.3, 0.9)

    assert searcher.suggest("t-new-1") == {**_sample(0.06), RESUME_KEY: "ff06"}  # the unfinished one first
    fresh = searcher.suggest("t-new-2")  # then Optuna's multi-objective sampler
    assert RESUME_KEY not in fresh and set(fresh) == {d.key for d in DIMS}
    searcher.on_trial_complete("t-new-1", {"rel": 0.6, "loc": 0.2, "stream_done": True})  # the re-run, told by us
    searcher.on_trial_complete("t-new-2", {"rel": 0.4, "loc": 0.3, "stream_done": True})  # a new one, by Optuna
    assert sorted(t.values for t in study.trials[5:]) == [[0.4, 0.3], [0.6, 0.2]]  # both told, both COMPLETE

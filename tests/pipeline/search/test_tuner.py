"""The search driver's pure parts: the default point, trial selection, the restore guard, the searcher. No Ray."""

from __future__ import annotations

import json

import pytest
from searchdata import SPACE

from odedit.loading import load_config
from pipeline.search.tuner import Search, TrialOutcome

# ---------------------------------------------------------------------------------------------- grammar


def _search(tmp_path, *overrides):
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "stream.eval_every=8",
            "method.lr=0.01",
            f"search.space={json.dumps(SPACE)}",
            *overrides,
        ],
    )
    return Search(cfg, cfg, str(tmp_path / "model"))


def test_default_point_is_the_base_config_when_inside_the_space(tmp_path):
    point = _search(tmp_path, "method.n_iter=3").default_point()
    assert point == {"method.lr": 0.01, "odedit.w_loc": 1.0, "odedit.penalty": "learned", "method.n_iter": 3}
    assert _search(tmp_path, "method.n_iter=10").default_point() is None  # outside randint 2..4


def test_best_is_the_best_trial_that_edited_its_whole_slice(tmp_path):
    def trial(i, status, value):
        return TrialOutcome(i, f"t{i}", status, {}, {"objective": value}, [])

    trials = [
        trial(1, "completed", 0.5),
        trial(2, "stopped", 0.9),
        trial(3, "completed", 0.7),
        trial(4, "error", 0.99),
        trial(5, "completed", float("nan")),
    ]
    assert _search(tmp_path).best(trials).index == 3
    assert _search(tmp_path, "search.mode=min").best(trials).index == 1
    assert _search(tmp_path).best(trials[1:2]) is None


def test_a_search_name_reused_with_another_config_is_refused(tmp_path):
    opened = []
    first = _search(tmp_path)
    state, existed = first._state(lambda: opened.append(1) or type("T", (), {"run_id": "parent-1"})())
    assert (state["parent_run_id"], existed, opened) == ("parent-1", False, [1])
    state, existed = _search(tmp_path, "search.max_concurrent=2")._state(lambda: opened.append(2))
    assert (state["parent_run_id"], existed, opened) == ("parent-1", True, [1])  # concurrency may change
    with pytest.raises(ValueError, match=r"odedit.dual_lr \(0.001 -> 0.01\)"):
        _search(tmp_path, "odedit.dual_lr=0.01")._state(lambda: None)
    _search(tmp_path, "odedit.dual_lr=0.01", "search.name=other")._state(lambda: None)
    retrained = _search(tmp_path)
    retrained.model_path = str(tmp_path / "another-model")
    with pytest.raises(ValueError, match="prepared.model_path"):
        retrained._state(lambda: None)


def test_optuna_by_default_and_random_on_request(tmp_path):
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    optuna = _search(tmp_path)
    assert optuna.searcher_name == "optuna" and isinstance(optuna._searcher(), OptunaSearch)
    random = _search(tmp_path, "search.searcher=random")
    assert random.searcher_name == "random" and isinstance(random._searcher(), BasicVariantGenerator)


# ---------------------------------------------------------------------------------------------- several metrics

PARETO = ("search.metric=[rel, loc]", "search.tradeoffs={reliability: {rel: 0.8, loc: 0.2}, locality: {loc: 1}}")


def test_several_metrics_run_optuna_multi_objective_under_fifo_or_asha_on_a_declared_scalar(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    one = _search(tmp_path)
    asha = one._scheduler(32)
    assert isinstance(asha, ASHAScheduler) and asha._metric is None  # one metric: Tune's config gives it, as before
    multi = _search(tmp_path, *PARETO)
    searcher = multi._searcher()
    assert (searcher.metric, searcher.mode) == (["rel", "loc"], ["max", "max"])
    assert searcher.set_search_properties(None, None, {d.key: d.domain() for d in multi.dims})  # as Tune does
    assert [d.name for d in searcher._ot_study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    assert isinstance(multi._scheduler(32), FIFOScheduler)
    scalar = _search(tmp_path, *PARETO, "search.asha_metric=objective")._scheduler(32)
    assert isinstance(scalar, ASHAScheduler) and (scalar._metric, scalar._mode) == ("objective", "max")


def test_with_several_metrics_best_is_the_first_tradeoffs_pick_from_the_front(tmp_path):
    def trial(i, status, rel, loc):
        return TrialOutcome(i, f"t{i}", status, {}, {"rel": rel, "loc": loc}, [])

    trials = [
        trial(1, "completed", 0.5, 0.9),
        trial(2, "completed", 0.9, 0.3),
        trial(3, "completed", 0.4, 0.4),  # dominated by trial 1
        trial(4, "stopped", 1.0, 1.0),
    ]
    search = _search(tmp_path, *PARETO)
    front, picks = search.pareto(trials)
    assert [t.index for t in front] == [1, 2]
    assert {k: t.index for k, t in picks.items()} == {"reliability": 2, "locality": 1}
    assert search.best(trials).index == 2  # best.yaml: the first trade-off's pick
    assert _search(tmp_path, "search.metric=[rel, loc]").best(trials).index == 1  # no trade-offs: 'equal'
    assert _search(tmp_path).pareto(trials) == ([], {})


def test_tradeoffs_can_change_on_a_finished_search_and_older_searches_still_resume(tmp_path):
    first = _search(tmp_path, *PARETO)
    first._state(lambda: type("T", (), {"run_id": "parent-1"})())
    # Other trade-offs only pick again from the same trials: the same search.
    state, existed = _search(tmp_path, PARETO[0], "search.tradeoffs={balanced: {rel: 1, loc: 1}}")._state(lambda: None)
    assert existed and state["parent_run_id"] == "parent-1"
    with pytest.raises(ValueError, match="search.metric"):
        _search(tmp_path, "search.metric=[rel, gen]")._state(lambda: None)
    # A search started before these keys existed has no search.scheduler etc. in its fingerprint.
    older = _search(tmp_path / "older")
    older._state(lambda: type("T", (), {"run_id": "parent-2"})())
    path = tmp_path / "older" / "search" / "search" / "search.json"
    saved = json.loads(path.read_text())
    assert not {"search.scheduler", "search.asha_metric", "search.asha_mode", "search.tradeoffs"} & set(
        saved["fingerprint"]
    )
    assert _search(tmp_path / "older")._state(lambda: None)[1] is True

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

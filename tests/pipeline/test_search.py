"""The search's pure parts: space grammar, key/value validation through the config loader, the objective,
the metrics file a trial tails, trial selection and the restore guard. No Ray cluster is started here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from odedit.config import ConfigError, load_config
from odedit.configlib import to_dict
from pipeline.search import (
    Dimension, MetricsTail, Search, TrialOutcome, check_search, parse_dimension, parse_space, sample_config,
    search_metrics, validate_search,
)

SPACE = {
    "method.lr": {"type": "loguniform", "low": "1e-3", "high": 0.3},  # PyYAML reads 1e-3 as a string
    "odedit.w_loc": {"type": "uniform", "low": 0.0, "high": 2.0},
    "odedit.penalty": {"type": "choice", "values": ["learned", "fixed", "off"]},
    "method.n_iter": {"type": "randint", "low": 2, "high": 4},
}


def raw_config(**search) -> dict:
    """A raw config dict of a valid search (as the loader's extra checks receive it)."""
    return {"stream": {"mode": "sequential", "eval_every": 8, "batch_size": 4},
            "search": {"space": dict(SPACE), **search}}


def issue_paths(issues) -> list[str]:
    return sorted(i.path for i in issues)


# ---------------------------------------------------------------------------------------------- grammar


def test_each_kind_parses_with_its_bounds():
    dims, issues = parse_space(SPACE)
    assert issues == []
    by_key = {d.key: d for d in dims}
    assert [d.key for d in dims] == list(SPACE)
    assert by_key["method.lr"] == Dimension("method.lr", "loguniform", 1e-3, 0.3)
    assert by_key["odedit.penalty"].values == ("learned", "fixed", "off")
    assert by_key["method.n_iter"].probes() == [2, 4]


@pytest.mark.parametrize("key, spec, problem", [
    ("odedit.w_loc", {"type": "gaussian", "low": 0, "high": 1}, "distribution type"),
    ("odedit.w_loc", {"type": "uniform", "low": 1, "high": 1}, "low < high"),
    ("odedit.w_loc", {"type": "uniform", "low": "a", "high": 1}, "low < high"),
    ("odedit.dual_lr", {"type": "loguniform", "low": 0, "high": 1}, "low > 0"),
    ("method.n_iter", {"type": "randint", "low": 1.5, "high": 4}, "whole-number"),
    ("odedit.mmd_kernels", {"type": "choice", "values": [3]}, "at least 2"),
    ("odedit.w_loc", {"type": "uniform", "low": 0, "high": 1, "step": 0.1}, "unknown field"),
    ("data.limit", {"type": "randint", "low": 1, "high": 4}, "cannot be searched"),
    ("resources.num_workers", {"type": "randint", "low": 1, "high": 2}, "cannot be searched"),
    ("odedit..w_loc", {"type": "uniform", "low": 0, "high": 1}, "dotted config key"),
    ("odedit.w_loc", 0.5, "distribution type"),
])
def test_grammar_errors_name_the_key(key, spec, problem):
    dim, issues = parse_dimension(key, spec)
    assert dim is None
    assert len(issues) == 1 and issues[0].path == f"search.space.{key}"
    assert problem in issues[0].problem


def test_randint_includes_both_ends_and_domains_stay_in_range():
    rng = np.random.default_rng(0)
    ints = Dimension("method.n_iter", "randint", 2, 4).domain().sample(size=300, random_state=rng)
    assert set(ints) == {2, 3, 4}
    logs = Dimension("method.lr", "loguniform", 1e-3, 0.3).domain().sample(size=300, random_state=rng)
    assert min(logs) >= 1e-3 and max(logs) <= 0.3
    assert sum(v < 1e-2 for v in logs) > 60  # log-uniform: about 40% of the draws fall below 1e-2


def test_list_choices_travel_as_json_and_come_back():
    dim = parse_dimension("method.layers", {"type": "choice", "values": [[0], [1], [0, 1]]})[0]
    assert dim.encoded
    assert dim.domain().categories == ["[0]", "[1]", "[0, 1]"]
    assert [dim.decode(v) for v in dim.domain().categories] == [[0], [1], [0, 1]]
    scalar = parse_dimension("odedit.penalty", SPACE["odedit.penalty"])[0]
    assert not scalar.encoded and scalar.decode("fixed") == "fixed"


# ---------------------------------------------------------------------------------------------- validation


def test_valid_search_has_no_issues_and_loads_with_the_check():
    assert check_search(raw_config()) == []
    cfg = load_config(None, ["stream.eval_every=8", "search.space={odedit.dual_lr: {type: loguniform, low: 1e-4, "
                             "high: 1e-2}}"], extra_checks=[check_search])
    validate_search(cfg)


def test_bad_keys_and_refused_values_are_named_before_any_trial():
    space = {"method.lrr": {"type": "uniform", "low": 0.1, "high": 1.0},          # misspelt key
             "odedit.w_gen": {"type": "uniform", "low": -1.0, "high": 1.0},       # -1 refused by its check
             "odedit.penalty": {"type": "choice", "values": ["learned", "fixd"]},  # not a valid choice
             "method.rank": {"type": "randint", "low": 2, "high": 8}}              # a LoRA knob, method is ft
    with pytest.raises(ConfigError) as info:
        load_config(None, ["stream.eval_every=8", f"search.space={json.dumps(space)}"], extra_checks=[check_search])
    issues = {i.path: i for i in info.value.issues}
    assert set(issues) == {f"search.space.{k}" for k in space}
    assert "unknown key" in issues["search.space.method.lrr"].problem
    assert "did you mean 'lr'" in issues["search.space.method.lrr"].hint
    assert issues["search.space.odedit.w_gen"].value == -1.0
    assert "must be >= 0" in issues["search.space.odedit.w_gen"].problem
    assert issues["search.space.odedit.penalty"].value == "fixd"
    assert "did you mean 'fixed'" in issues["search.space.odedit.penalty"].problem
    assert "method.rank" in str(info.value)


@pytest.mark.parametrize("change, path", [
    ({"search": {"space": {}}}, "search.space"),
    ({"search": {"space": SPACE, "metric": "accuracy"}}, "search.metric"),
    ({"stream": {"mode": "single", "eval_every": 8}}, "stream.mode"),
    ({"stream": {"mode": "sequential", "eval_every": 0}}, "stream.eval_every"),
    ({"search": {"space": SPACE, "split": "test", "offset": 10}, "stream": {"num_edits": 20, "eval_every": 8}},
     "search.offset"),
    ({"search": {"space": SPACE, "split": "test", "offset": 10}, "stream": {"num_edits": 0, "eval_every": 8}},
     "search.offset"),
])
def test_settings_a_search_needs(change, path):
    raw = raw_config()
    for section, values in change.items():
        raw[section] = {**raw.get(section, {}), **values}
    assert issue_paths(check_search(raw)) == [path]


def test_a_test_slice_after_the_test_stream_is_accepted():
    raw = raw_config(split="test", offset=20)
    raw["stream"]["num_edits"] = 20
    assert check_search(raw) == []


def test_a_base_config_with_its_own_problems_is_left_to_the_loader():
    raw = raw_config()
    raw["stream"]["batch_size"] = "many"
    assert check_search(raw) == []
    with pytest.raises(ConfigError) as info:
        load_config(None, ["stream.batch_size=many"], extra_checks=[check_search])
    assert issue_paths(info.value.issues) == ["stream.batch_size"]


def test_sample_config_applies_values_through_the_loader():
    base = to_dict(load_config(None))
    cfg = sample_config(base, {"method.lr": 0.2, "odedit.penalty": "fixed", "method.n_iter": 3})
    assert (cfg.method.lr, cfg.odedit.penalty, cfg.method.n_iter) == (0.2, "fixed", 3)
    assert cfg.odedit.w_loc == 1.0  # untouched keys keep the base value
    off = sample_config(base, {"odedit.penalty": False})  # YAML's `off` read as a boolean maps back
    assert off.odedit.penalty == "off"
    with pytest.raises(ConfigError) as info:
        sample_config(base, {"odedit.dual_lr": -1.0})
    assert [i.path for i in info.value.issues] == ["odedit.dual_lr"]


# ---------------------------------------------------------------------------------------------- metrics


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


# ---------------------------------------------------------------------------------------------- driver parts


def _search(tmp_path, *overrides):
    cfg = load_config(None, [f"output_dir={tmp_path}", "stream.eval_every=8", "method.lr=0.01",
                             f"search.space={json.dumps(SPACE)}", *overrides])
    return Search(cfg, cfg, str(tmp_path / "model"))


def test_default_point_is_the_base_config_when_inside_the_space(tmp_path):
    point = _search(tmp_path, "method.n_iter=3").default_point()
    assert point == {"method.lr": 0.01, "odedit.w_loc": 1.0, "odedit.penalty": "learned", "method.n_iter": 3}
    assert _search(tmp_path, "method.n_iter=10").default_point() is None  # outside randint 2..4


def test_best_is_the_best_trial_that_edited_its_whole_slice(tmp_path):
    def trial(i, status, value):
        return TrialOutcome(i, f"t{i}", status, {}, {"objective": value}, [])

    trials = [trial(1, "completed", 0.5), trial(2, "stopped", 0.9), trial(3, "completed", 0.7),
              trial(4, "error", 0.99), trial(5, "completed", float("nan"))]
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

"""The search space: grammar, key/value validation through the config loader, sampled configs. No Ray."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from searchdata import SPACE, issue_paths, raw_config

from odedit.config import ConfigError
from odedit.configlib import to_dict
from odedit.loading import load_config
from pipeline.search.space import (
    Dimension,
    asha_target,
    check_search,
    curve_metric,
    is_multi,
    modes,
    objectives,
    parse_dimension,
    parse_space,
    sample_config,
    tradeoffs,
    validate_search,
)

# ---------------------------------------------------------------------------------------------- grammar


def test_each_kind_parses_with_its_bounds():
    dims, issues = parse_space(SPACE)
    assert issues == []
    by_key = {d.key: d for d in dims}
    assert [d.key for d in dims] == list(SPACE)
    assert by_key["method.lr"] == Dimension("method.lr", "loguniform", 1e-3, 0.3)
    assert by_key["odedit.penalty"].values == ("learned", "fixed", "off")
    assert by_key["method.n_iter"].probes() == [2, 4]


@pytest.mark.parametrize(
    "key, spec, problem",
    [
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
    ],
)
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
    cfg = load_config(
        None,
        ["stream.eval_every=8", "search.space={odedit.dual_lr: {type: loguniform, low: 1e-4, high: 1e-2}}"],
        extra_checks=[check_search],
    )
    validate_search(cfg)


def test_bad_keys_and_refused_values_are_named_before_any_trial():
    space = {
        "method.lrr": {"type": "uniform", "low": 0.1, "high": 1.0},  # misspelt key
        "odedit.w_gen": {"type": "uniform", "low": -1.0, "high": 1.0},  # -1 refused by its check
        "odedit.penalty": {"type": "choice", "values": ["learned", "fixd"]},  # not a valid choice
        "method.rank": {"type": "randint", "low": 2, "high": 8},
    }  # a LoRA knob, method is ft
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


@pytest.mark.parametrize(
    "change, path",
    [
        ({"search": {"space": {}}}, "search.space"),
        ({"search": {"space": SPACE, "metric": "accuracy"}}, "search.metric"),
        ({"stream": {"mode": "single", "eval_every": 8}}, "stream.mode"),
        ({"stream": {"mode": "sequential", "eval_every": 0}}, "stream.eval_every"),
        (
            {"search": {"space": SPACE, "split": "test", "offset": 10}, "stream": {"num_edits": 20, "eval_every": 8}},
            "search.offset",
        ),
        (
            {"search": {"space": SPACE, "split": "test", "offset": 10}, "stream": {"num_edits": 0, "eval_every": 8}},
            "search.offset",
        ),
    ],
)
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


# ---------------------------------------------------------------------------------------------- objectives


def _load(*overrides):
    return load_config(None, ["stream.eval_every=8", f"search.space={json.dumps(SPACE)}", *overrides])


def test_one_metric_keeps_asha_and_several_get_fifo_a_pareto_front_and_an_equal_tradeoff():
    one = _load().search
    assert (objectives(one), modes(one), is_multi(one)) == (("objective",), ("max",), False)
    assert asha_target(one) == ("objective", "max") and curve_metric(one) == "objective" and tradeoffs(one) == {}
    assert asha_target(_load("search.scheduler=fifo").search) is None

    two = _load("search.metric=[rel, loc]", "search.mode=max").search  # one mode for all
    assert (objectives(two), modes(two), is_multi(two)) == (("rel", "loc"), ("max", "max"), True)
    assert asha_target(two) is None and curve_metric(two) == "rel"
    assert tradeoffs(two) == {"equal": {"rel": 1.0, "loc": 1.0}}
    scalar = _load("search.metric=[rel, loc]", "search.asha_metric=objective").search
    assert asha_target(scalar) == ("objective", "max") and curve_metric(scalar) == "objective"
    named = _load(
        "search.metric=[rel, loc]", "search.tradeoffs={reliability: {rel: 0.8, loc: 0.2}, locality: {loc: 1}}"
    )
    assert list(tradeoffs(named.search)) == ["reliability", "locality"]
    assert check_search(to_dict(named)) == []


@pytest.mark.parametrize(
    "overrides, path, words",
    [
        (["search.metric=[rel, loc]", "search.mode=[max]"], "search.mode", "1 mode(s) for 2 metric(s)"),
        (["search.metric=rel", "search.mode=[max, max]"], "search.mode", "2 mode(s) for 1 metric(s)"),
        (["search.metric=[rel, locc]"], "search.metric[1]", "did you mean 'loc'"),
        (["search.metric=accuracy"], "search.metric", "unknown metric"),
        (["search.metric=[rel, rel]"], "search.metric[1]", "listed twice"),
        (["search.metric=[]"], "search.metric", "empty list"),
        (
            ["search.metric=[rel, loc]", "search.scheduler=asha"],
            "search.scheduler",
            "ASHA stops trials by comparing one",
        ),
        (["search.asha_metric=objective"], "search.asha_metric", "with one metric ASHA compares"),
        (
            ["search.metric=[rel, loc]", "search.scheduler=fifo", "search.asha_metric=objective"],
            "search.asha_metric",
            "stops no trial",
        ),
        (["search.metric=[rel, loc]", "search.asha_metric=acc"], "search.asha_metric", "unknown metric"),
        (["search.tradeoffs={a: {rel: 1}}"], "search.tradeoffs", "a trade-off weighs several metrics"),
        (["search.metric=[rel, loc]", "search.tradeoffs={a: {gen: 1}}"], "search.tradeoffs.a.gen", "not one of"),
        (["search.metric=[rel, loc]", "search.tradeoffs={a: {rel: -1}}"], "search.tradeoffs.a.rel", "must be >= 0"),
        (["search.metric=[rel, loc]", "search.tradeoffs={a: {rel: 0}}"], "search.tradeoffs.a", "no weight is > 0"),
        (["search.metric=[rel, loc]", "search.tradeoffs={../x: {rel: 1}}"], "search.tradeoffs.../x", "safe path"),
    ],
)
def test_objective_settings_are_refused_at_load_naming_field_value_and_fix(overrides, path, words):
    with pytest.raises(ConfigError) as info:
        load_config(
            None, ["stream.eval_every=8", f"search.space={json.dumps(SPACE)}", *overrides], extra_checks=[check_search]
        )
    issues = {i.path: i for i in info.value.issues}
    assert list(issues) == [path], info.value
    assert words in issues[path].problem + issues[path].hint
    assert issues[path].hint  # every refusal says what to do


def test_a_bad_mode_is_refused_by_the_loader_itself():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["search.metric=[rel, loc]", "search.mode=[max, most]"])
    assert [(i.path, i.value) for i in info.value.issues] == [("search.mode", ["max", "most"])]
    assert "'most': each mode must be max or min" in info.value.issues[0].problem


def test_fifo_needs_no_retention_evaluations():
    raw = raw_config(metric=["rel", "loc"])
    raw["stream"]["eval_every"] = 0
    assert check_search(raw) == []  # FIFO compares nothing along the stream
    assert issue_paths(
        check_search(raw_config(metric=["rel", "loc"], asha_metric="objective") | {"stream": raw["stream"]})
    ) == ["stream.eval_every"]


@pytest.mark.parametrize("name", ["demo_tune.yaml", "demo_tune_pareto.yaml"])
def test_the_shipped_search_configs_pass_the_search_check(name):
    path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "jobs", "configs", name)
    validate_search(load_config(path, extra_checks=[check_search]))

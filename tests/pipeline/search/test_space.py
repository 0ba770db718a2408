"""The search space: grammar, key/value validation through the config loader, sampled configs. No Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
from searchdata import SPACE, issue_paths, raw_config

from odedit.config import ConfigError
from odedit.configlib import to_dict
from odedit.loading import load_config
from pipeline.search.space import Dimension, check_search, parse_dimension, parse_space, sample_config, validate_search

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

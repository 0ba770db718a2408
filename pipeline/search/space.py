"""The search-space grammar of `search.space` and the checks run on it before any trial (see `pipeline.search`).

    issues = check_search(raw_config_dict)          # the config loader's extra check: space keys and values
    cfg = sample_config(base_dict, {"odedit.lambda_lr": 0.01})

`search.space` maps a dotted config key of `method.*`, `odedit.*` or `stream.batch_size` to
`{type: uniform|loguniform, low, high}`, `{type: randint, low, high}` (both ends included) or
`{type: choice, values: [...]}`. Before any trial runs, every key is checked by the normal config loader on
the base config with each end of its range and each of its choices in turn, so a misspelt key or a value its
field refuses is reported with the key named; each trial builds its config through the same loader again.

**Objectives.** `search.metric` is one metric, or a list (multi-objective) with `search.mode` one mode per
metric or one for all; `objectives`, `modes`, `asha_target` (ASHA on the one metric or on `search.asha_metric`,
else FIFO), `curve_metric` and `tradeoffs` (the named weightings; `equal` when several metrics name none) read
them. `check_search` refuses, before anything runs and naming field, value and fix: unknown or repeated
metrics, mode lists of another length, ASHA asked for with several metrics and no `asha_metric`, an
`asha_metric` that would do nothing, trade-offs with one metric, trade-off weights on metrics not searched,
negative or all zero, and trade-off names that are not safe file-name parts (they name `best-<name>.yaml`).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from odedit.config import Config, ConfigError, safe_name
from odedit.configlib import ConfigIssue, to_dict
from odedit.loading import parse_config
from odedit.metrics import PROTOCOLS

KINDS = ("uniform", "loguniform", "randint", "choice")
SEARCHABLE = ("method.", "odedit.", "stream.batch_size")
METRICS = ("objective", "gen", "loc", *PROTOCOLS)


# ---------------------------------------------------------------------------------------------- space


@dataclass(frozen=True)
class Dimension:
    """One searched config key and its distribution."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    values: tuple = ()

    @property
    def encoded(self) -> bool:
        """Choices that are not scalars (e.g. `method.layers: [[0], [1]]`) travel through Tune as JSON text."""
        return self.kind == "choice" and any(isinstance(v, (list, dict)) for v in self.values)

    def domain(self) -> Any:
        """The Tune sampling domain."""
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "randint":
            return tune.randint(int(self.low), int(self.high) + 1)  # Tune's upper end is excluded
        return tune.choice([self.encode(v) for v in self.values])

    def encode(self, value: Any) -> Any:
        return json.dumps(value) if self.encoded else value

    def decode(self, value: Any) -> Any:
        return json.loads(value) if self.encoded else value

    def probes(self) -> list[Any]:
        """Values checked by the config loader before the search starts: both ends, or every choice."""
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "randint":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.values
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high and (self.kind != "randint" or float(value).is_integer())

    def spec(self) -> dict[str, Any]:
        if self.kind == "choice":
            return {"type": "choice", "values": list(self.values)}
        return {"type": self.kind, "low": self.low, "high": self.high}


def _number(value: Any) -> float | None:
    """A finite number, accepting PyYAML's string reading of `1e-3`; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def parse_dimension(key: Any, spec: Any) -> tuple[Dimension | None, list[ConfigIssue]]:
    """One `search.space` entry -> a `Dimension`, or the problems of the entry (each naming the key)."""
    path = f"search.space.{key}"
    if not isinstance(key, str) or not key or any(not p.isidentifier() for p in key.split(".")):
        return None, [ConfigIssue(path, key, "a space key must be a dotted config key", "e.g. odedit.dual_lr")]
    if not key.startswith(SEARCHABLE):
        return None, [
            ConfigIssue(
                path,
                key,
                "this key cannot be searched: the search prepares the data and model "
                "once and fixes the stream's slice and resources",
                "search keys of method.*, odedit.* or stream.batch_size",
            )
        ]
    if not isinstance(spec, Mapping) or spec.get("type") not in KINDS:
        got = spec.get("type") if isinstance(spec, Mapping) else spec
        return None, [
            ConfigIssue(
                path,
                got,
                f"the distribution type must be one of {', '.join(KINDS)}",
                "e.g. {type: loguniform, low: 1.0e-4, high: 1.0e-2}",
            )
        ]
    kind = spec["type"]
    allowed = {"type", "values"} if kind == "choice" else {"type", "low", "high"}
    extra = sorted(set(spec) - allowed)
    if extra:
        return None, [
            ConfigIssue(
                path,
                extra,
                f"unknown field(s) for type {kind}",
                f"a {kind} takes {', '.join(sorted(allowed - {'type'}))}",
            )
        ]
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, (list, tuple)) or len(values) < 2:
            return None, [
                ConfigIssue(
                    path,
                    values,
                    "a choice needs a list of at least 2 values",
                    "with one value, set the key in the config instead",
                )
            ]
        return Dimension(key, kind, values=tuple(values)), []
    low, high = _number(spec.get("low")), _number(spec.get("high"))
    if low is None or high is None or not low < high:
        return None, [
            ConfigIssue(
                path,
                {"low": spec.get("low"), "high": spec.get("high")},
                f"a {kind} needs numbers low < high",
                "e.g. low: 0.1, high: 2.0",
            )
        ]
    if kind == "loguniform" and low <= 0:
        return None, [ConfigIssue(path, low, "a loguniform needs low > 0", "use uniform for ranges that reach 0")]
    if kind == "randint" and not (low.is_integer() and high.is_integer()):
        return None, [
            ConfigIssue(
                path,
                {"low": low, "high": high},
                "a randint needs whole-number bounds",
                "e.g. low: 2, high: 8 (both included)",
            )
        ]
    return Dimension(key, kind, low, high), []


def parse_space(space: Mapping[str, Any]) -> tuple[list[Dimension], list[ConfigIssue]]:
    """All dimensions of `search.space` (in declaration order) and every problem found."""
    dims: list[Dimension] = []
    issues: list[ConfigIssue] = []
    for key, spec in space.items():
        dim, problems = parse_dimension(key, spec)
        issues += problems
        if dim is not None:
            dims.append(dim)
    return dims, issues


def _set(data: dict, key: str, value: Any) -> dict:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return data


def sample_config(base: Mapping[str, Any], sample: Mapping[str, Any]) -> Config:
    """The base config (a plain dict) with sampled values at their dotted keys, through the config loader."""
    data = copy.deepcopy(dict(base))
    for key, value in sample.items():
        _set(data, key, value)
    return parse_config(data, source="search sample " + json.dumps(dict(sample), default=str))


# ---------------------------------------------------------------------------------------------- objectives


def objectives(s: Any) -> tuple[str, ...]:
    """The metrics a search optimises (`search.metric`: one name or a list)."""
    return (s.metric,) if isinstance(s.metric, str) else tuple(s.metric)


def modes(s: Any) -> tuple[str, ...]:
    """One mode per objective (a single `search.mode` applies to every metric)."""
    return (s.mode,) * len(objectives(s)) if isinstance(s.mode, str) else tuple(s.mode)


def is_multi(s: Any) -> bool:
    """Several objectives: a multi-objective search with a Pareto front."""
    return len(objectives(s)) > 1


def asha_target(s: Any) -> tuple[str, str] | None:
    """(metric, mode) ASHA compares trials on, or None for FIFO (every trial edits its whole slice).

    auto: ASHA on the one metric; with several, ASHA on `search.asha_metric` when set, else FIFO.
    """
    if s.scheduler == "fifo":
        return None
    if not is_multi(s):
        return objectives(s)[0], modes(s)[0]
    if s.asha_metric:
        return s.asha_metric, s.asha_mode
    return None  # auto with several metrics (scheduler=asha without asha_metric is refused by check_search)


def curve_metric(s: Any) -> str:
    """The metric recorded along each trial's stream (plot, trials-state.json): ASHA's, else the first objective."""
    target = asha_target(s)
    return target[0] if target is not None else objectives(s)[0]


def tradeoffs(s: Any) -> dict[str, dict[str, float]]:
    """The named weightings that pick configs from the Pareto front: `search.tradeoffs`, or with several
    metrics and none given, one `equal` weighting; empty with one metric."""
    if not is_multi(s):
        return {}
    if s.tradeoffs:
        return {name: dict(weights) for name, weights in s.tradeoffs.items()}
    return {"equal": {m: 1.0 for m in objectives(s)}}


# ---------------------------------------------------------------------------------------------- checks


def check_search(raw: Mapping[str, Any]) -> list[ConfigIssue]:
    """The search's config check (an `extra_checks` entry of `load_config`; gets the raw dict).

    Checks the space's grammar, then every key with each probe value through the normal config loader, and
    the settings a search needs (sequential stream, retention evaluations, a known metric, a slice that stays
    off the test stream). A base config with problems of its own is left to the loader, which reports them.
    """
    try:
        cfg = parse_config(copy.deepcopy(dict(raw)))
    except ConfigError:
        return []
    s = cfg.search
    issues: list[ConfigIssue] = []
    if not s.space:
        issues.append(
            ConfigIssue(
                "search.space",
                {},
                "the search space is empty: nothing to search",
                "declare e.g. odedit.dual_lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}",
            )
        )
    dims, grammar = parse_space(s.space)
    issues += grammar
    base = to_dict(cfg)
    for dim in dims:
        for value in dim.probes():
            try:
                sample_config(base, {dim.key: value})
            except ConfigError as err:
                issues += [
                    ConfigIssue(
                        f"search.space.{dim.key}",
                        value,
                        f"{dim.key}={value!r} is refused by the config: {i.path}: {i.problem}",
                        i.hint,
                    )
                    for i in err.issues
                ]
                break
    issues += _objective_issues(s)
    if cfg.stream.mode != "sequential":
        issues.append(
            ConfigIssue(
                "stream.mode",
                cfg.stream.mode,
                "a search runs lifelong (sequential) streams, whose retention ASHA compares",
                "set stream.mode=sequential",
            )
        )
    if cfg.stream.eval_every == 0 and asha_target(s) is not None:
        issues.append(
            ConfigIssue(
                "stream.eval_every",
                0,
                "with no retention evaluation along the stream, trials "
                "report only at their end and ASHA cannot stop any early",
                f"set stream.eval_every, e.g. to search.grace_edits ({s.grace_edits})",
            )
        )
    if s.split == "test" and not (cfg.stream.num_edits and s.offset >= cfg.stream.num_edits):
        issues.append(
            ConfigIssue(
                "search.offset",
                s.offset,
                f"search.split=test edits test records from "
                f"{s.offset} on, which overlaps the test stream (stream.num_edits="
                f"{cfg.stream.num_edits}, from 0)",
                "set stream.num_edits > 0 and search.offset >= stream.num_edits, or search on the validation split",
            )
        )
    return issues


def _objective_issues(s: Any) -> list[ConfigIssue]:
    """`search.metric` / `mode` / `scheduler` / `asha_metric` / `tradeoffs`: names, lengths and combinations."""
    issues: list[ConfigIssue] = []
    metrics = objectives(s)
    hint = "objective is the mean of Rel, Gen and Loc; a list such as [rel, loc] searches their trade-off"
    if not metrics:
        return [ConfigIssue("search.metric", [], "an empty list: nothing to optimise", "e.g. objective or [rel, loc]")]
    for i, m in enumerate(metrics):
        path = "search.metric" if isinstance(s.metric, str) else f"search.metric[{i}]"
        if m not in METRICS:
            close = difflib.get_close_matches(str(m), METRICS, n=1)
            issues.append(
                ConfigIssue(
                    path,
                    m,
                    f"unknown metric; one of {', '.join(METRICS)}" + (f"; did you mean {close[0]!r}?" if close else ""),
                    hint,
                )
            )
        elif m in metrics[:i]:
            issues.append(ConfigIssue(path, m, f"{m} is listed twice", "list each metric once"))
    given = [s.mode] if isinstance(s.mode, str) else list(s.mode)
    if not isinstance(s.mode, str) and len(given) != len(metrics):
        issues.append(
            ConfigIssue(
                "search.mode",
                given,
                f"{len(given)} mode(s) for {len(metrics)} metric(s) {list(metrics)}",
                "give one mode per metric in the same order, e.g. "
                f"[{', '.join('max' for _ in metrics)}], or one mode (max) for all",
            )
        )
    multi = len(metrics) > 1
    if s.asha_metric:
        if s.asha_metric not in METRICS:
            issues.append(
                ConfigIssue("search.asha_metric", s.asha_metric, f"unknown metric; one of {', '.join(METRICS)}", hint)
            )
        elif not multi:
            issues.append(
                ConfigIssue(
                    "search.asha_metric",
                    s.asha_metric,
                    f"with one metric ASHA compares trials on search.metric ({metrics[0]})",
                    "remove search.asha_metric, or list several metrics in search.metric",
                )
            )
        elif s.scheduler == "fifo":
            issues.append(
                ConfigIssue(
                    "search.asha_metric",
                    s.asha_metric,
                    "search.scheduler=fifo stops no trial, so no metric is compared along the streams",
                    "remove search.asha_metric, or set search.scheduler=asha",
                )
            )
    elif multi and s.scheduler == "asha":
        issues.append(
            ConfigIssue(
                "search.scheduler",
                "asha",
                f"ASHA stops trials by comparing one number, and search.metric lists {len(metrics)} "
                f"({', '.join(metrics)})",
                "set search.asha_metric to the scalar ASHA should compare (e.g. objective; trials it stops stay off "
                "the Pareto front), or search.scheduler=fifo (what auto does) to run every trial to its end",
            )
        )
    if s.tradeoffs and not multi:
        issues.append(
            ConfigIssue(
                "search.tradeoffs",
                s.tradeoffs,
                f"a trade-off weighs several metrics, and search.metric is one ({metrics[0]})",
                "list the metrics to trade, e.g. search.metric=[rel, loc] search.mode=[max, max]",
            )
        )
        return issues
    for name, weights in s.tradeoffs.items():
        path = f"search.tradeoffs.{name}"
        problem = safe_name(name) if isinstance(name, str) and name else "must be non-empty"
        if problem:
            issues.append(ConfigIssue(path, name, f"a trade-off's name {problem}", "it names best-<name>.yaml"))
        unknown = [k for k in weights if k not in metrics]
        for k in unknown:
            close = difflib.get_close_matches(str(k), metrics, n=1)
            issues.append(
                ConfigIssue(
                    f"{path}.{k}",
                    weights[k],
                    f"{k} is not one of search.metric ({', '.join(metrics)})"
                    + (f"; did you mean {close[0]!r}?" if close else ""),
                    "weigh only the metrics the search optimises",
                )
            )
        negative = [k for k, w in weights.items() if w < 0]
        for k in negative:
            issues.append(
                ConfigIssue(
                    f"{path}.{k}",
                    weights[k],
                    "a weight must be >= 0 (a min metric is negated by its mode already)",
                    "e.g. {rel: 0.8, loc: 0.2}",
                )
            )
        if not unknown and not negative and not any(w > 0 for w in weights.values()):
            issues.append(
                ConfigIssue(
                    path, weights, "no weight is > 0: this trade-off prefers nothing", "e.g. {rel: 0.8, loc: 0.2}"
                )
            )
    return issues


def validate_search(cfg: Config) -> None:
    """`check_search` on a loaded config; raise `ConfigError` listing every problem."""
    issues = check_search(to_dict(cfg))
    if issues:
        raise ConfigError(issues, "search config")

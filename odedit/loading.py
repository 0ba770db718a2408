"""Loading a `Config`: YAML plus dotted overrides, resolved and checked against the registries.

    cfg = load_config("jobs/configs/demo.yaml", ["stream.batch_size=16", "odedit.enabled=false"])

This module sits above the registries so that `odedit.config` (the typed sections) imports none of them:
`method` is built as the config class `method.name` registers in `odedit.methods.METHODS`, and `model.family`
must name an adapter of `odedit.models.ADAPTERS`. Every problem is reported at once by `ConfigError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from odedit.config import Config, ConfigError, MethodConfig, ModelConfig
from odedit.configlib import ConfigIssue, Hooks, Problem, apply_overrides, from_dict, read_yaml, to_dict
from odedit.methods import METHODS
from odedit.models import ADAPTERS

__all__ = ["ExtraCheck", "REGISTRY_HOOKS", "load_config", "parse_config", "with_overrides"]

ExtraCheck = Callable[[dict], Iterable[ConfigIssue]]  # gets the raw dict, so its issues join the others


def _method_class(data: dict) -> type | Problem:
    """The config class of the editor `method.name` names (default ft)."""
    name = data.get("name", "ft")
    if not isinstance(name, str):
        return Problem("name", name, "must be a string naming an editor", f"one of {', '.join(METHODS.names())}")
    if name not in METHODS:
        return Problem("name", name, METHODS.unknown_message(name), "pick a registered editor")
    return METHODS.get(name).config_cls


def _known_family(name: str) -> str | None:
    return None if name in ADAPTERS else ADAPTERS.unknown_message(name)


# What `odedit.config`'s sections cannot check without importing the registries.
REGISTRY_HOOKS = Hooks(resolvers={MethodConfig: _method_class}, checks={(ModelConfig, "family"): _known_family})


def parse_config(
    data: dict, overrides: Iterable[str] = (), source: str = "config", extra_checks: Sequence[ExtraCheck] = ()
) -> Config:
    """Build a `Config` from a dict plus dotted overrides; raise `ConfigError` listing every problem.

    `extra_checks` are checks owned by higher layers (e.g. `pipeline` knows the record sources); their
    issues are reported together with the config's own.
    """
    issues: list[ConfigIssue] = []
    data = apply_overrides(_deep_copy(data), overrides, issues)
    for check in extra_checks:
        issues.extend(check(data))
    try:
        cfg = from_dict(Config, data, source, REGISTRY_HOOKS)
    except ConfigError as err:
        raise ConfigError(issues + err.issues, source) from None
    issues += _stage_issues(cfg)  # the extra checks' issues stay: a config that builds can still be refused
    if issues:
        raise ConfigError(issues, source)
    return cfg


def _stage_issues(cfg: Config) -> list[ConfigIssue]:
    """An editor that cannot run under DeepSpeed ZeRO-3 says why in its class's `zero3_problem` (issue 16 item 3);
    with resources.zero_stage=3 in sequential mode (single mode refuses ZeRO-3 by itself) the config is refused."""
    why = METHODS.get(cfg.method.name).method_cls.zero3_problem(cfg.method)
    if not why or cfg.resources.zero_stage != 3 or cfg.stream.mode != "sequential":
        return []
    return [
        ConfigIssue(
            "resources.zero_stage",
            3,
            f"method.name={cfg.method.name} cannot run under DeepSpeed ZeRO-3: {why}",
            "use resources.zero_stage=2 (each worker keeps the whole model; phi_e's optimiser state is sharded) or 0",
        )
    ]


def load_config(
    path: str | os.PathLike | None, overrides: Iterable[str] = (), extra_checks: Sequence[ExtraCheck] = ()
) -> Config:
    """Load a YAML config (or the defaults when `path` is None) with dotted `key=value` overrides."""
    issues: list[ConfigIssue] = []
    data = read_yaml(str(path), issues) if path else {}
    if issues:
        raise ConfigError(issues, str(path))
    return parse_config(data, overrides, source=str(path or "defaults"), extra_checks=extra_checks)


def with_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """A copy of `cfg` with dotted overrides applied and the whole config re-validated."""
    return parse_config(to_dict(cfg), overrides, source="config")


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d

"""The config mechanism: typed frozen dataclasses built from plain dicts, every problem reported at once.

`odedit.config` declares the project's config classes with `option(...)`; this module turns YAML dicts into
them. Conversion never stops at the first problem: unknown keys (with close matches), wrong types and values
that fail a field's check are collected as `ConfigIssue`s, each with its dotted path, the value and a hint,
and raised together as one `ConfigError` (the torchtune `ConfigError` pattern).

A dataclass may define `_cross_checks(self) -> Iterable[Problem]`: checks that involve several fields.

What a config class cannot know without importing layers above it comes in as `Hooks` given to `from_dict`
(`odedit.loading` passes the registries'): a resolver that picks a section's subclass from the data (polymorphic
sections such as `method`, dispatched on `method.name` through the method registry), and extra value checks of
single fields (`model.family` against the adapter registry).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import yaml

Check = Callable[[Any], "str | None"]  # returns a problem description, or None when the value is fine


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config: where, what value, what is wrong, how to fix it."""

    path: str
    value: Any
    problem: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.path or '<root>'}: {self.problem} (got {self.value!r})"
        return f"{text}. Hint: {self.hint}" if self.hint else text


@dataclass(frozen=True)
class Problem:
    """A problem found by a cross-field check, relative to the dataclass that found it."""

    field: str
    value: Any
    problem: str
    hint: str = ""


Resolver = Callable[[dict], "type | Problem"]  # a section's raw dict -> the (sub)class to build, or its problem


@dataclass(frozen=True)
class Hooks:
    """Resolution and checks owned by a higher layer, applied while a config is built (see the module docstring).

    Both are looked up along the section class's MRO, so a hook given for a base class covers its subclasses.
    """

    # section class -> picks the subclass to build from the section's raw dict (polymorphic sections)
    resolvers: Mapping[type, Resolver] = dataclasses.field(default_factory=dict)
    # (section class, field name) -> a value check run after the field's own `check`
    checks: Mapping[tuple[type, str], Check] = dataclasses.field(default_factory=dict)

    def resolver(self, cls: type) -> Resolver | None:
        return next((self.resolvers[base] for base in cls.__mro__ if base in self.resolvers), None)

    def check(self, cls: type, name: str) -> Check | None:
        return next((self.checks[(base, name)] for base in cls.__mro__ if (base, name) in self.checks), None)


NO_HOOKS = Hooks()


class ConfigError(ValueError):
    """All problems of one config, reported together."""

    def __init__(self, issues: Sequence[ConfigIssue], source: str = "config") -> None:
        self.issues = list(issues)
        lines = [f"{source} has {len(self.issues)} problem(s):"] + [f"  - {i}" for i in self.issues]
        super().__init__("\n".join(lines))


_MISSING = object()


def option(default: Any = _MISSING, *, help: str, check: Check | None = None, factory: Callable | None = None):
    """Declare a config field with its help text and an optional value check."""
    meta = {"help": help, "check": check}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if default is _MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------- checks


def positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def in_range(lo: float, hi: float) -> Check:
    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"must be in [{lo}, {hi}]"

    return check


def one_of(*choices: Any) -> Check:
    def check(v: Any) -> str | None:
        if v in choices:
            return None
        close = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
        extra = f"; did you mean {close[0]!r}?" if close else ""
        return f"must be one of {', '.join(repr(c) for c in choices)}{extra}"

    return check


def each(check: Check) -> Check:
    def check_all(vs: Any) -> str | None:
        for i, v in enumerate(vs):
            problem = check(v)
            if problem:
                return f"item {i} ({v!r}) {problem}"
        return None

    return check_all


def all_of(*checks: Check) -> Check:
    def check_all(v: Any) -> str | None:
        for c in checks:
            problem = c(v)
            if problem:
                return problem
        return None

    return check_all


# ---------------------------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) if a is not Ellipsis else "..." for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str, issues: list[ConfigIssue], hooks: Hooks = NO_HOOKS) -> Any:
    """Convert `value` to type `tp`, appending issues; returns _MISSING on failure."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, issues, hooks)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        for a in non_none:
            trial: list[ConfigIssue] = []
            out = _convert(a, value, path, trial, hooks)
            if not trial:
                return out
        if len(non_none) == 1:
            issues.extend(trial)
            return _MISSING
        issues.append(ConfigIssue(path, value, f"expected {_type_name(tp)}", "fix the value's type"))
        return _MISSING
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads off/no/on/yes as booleans: map back when unambiguous
            spellings = ("true", "yes", "on") if value else ("false", "no", "off")
            matches = [c for c in choices if isinstance(c, str) and c.lower() in spellings]
            if len(matches) == 1:
                return matches[0]
        if value in choices and not isinstance(value, bool):
            return value
        problem = one_of(*choices)(value)
        issues.append(ConfigIssue(path, value, problem or "invalid", "use one of the listed values"))
        return _MISSING
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            issues.append(
                ConfigIssue(path, value, f"expected a list ({_type_name(tp)})", "write a YAML list, e.g. [1, 2]")
            )
            return _MISSING
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        else:
            if len(args) != len(value):
                issues.append(ConfigIssue(path, value, f"expected {len(args)} items", f"write {len(args)} values"))
                return _MISSING
            item_types = list(args)
        out = [_convert(t, v, f"{path}[{i}]", issues, hooks) for i, (t, v) in enumerate(zip(item_types, value))]
        return _MISSING if any(o is _MISSING for o in out) else tuple(out)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            issues.append(ConfigIssue(path, value, "expected a mapping", "write a YAML mapping (key: value)"))
            return _MISSING
        args = typing.get_args(tp)
        if args:
            out = {}
            for k, v in value.items():
                ck = _convert(args[0], k, f"{path}.{k}", issues, hooks)
                cv = _convert(args[1], v, f"{path}.{k}", issues, hooks)
                out[ck] = cv
            return out
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        issues.append(ConfigIssue(path, value, "expected true or false", "write true or false (unquoted)"))
        return _MISSING
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        issues.append(ConfigIssue(path, value, "expected an integer", "write a whole number such as 16"))
        return _MISSING
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                issues.append(ConfigIssue(path, value, "must be a finite number", "write a number such as 0.5"))
                return _MISSING
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string: accept it as the number it means
            try:
                f = float(value)
                if math.isfinite(f):
                    return f
            except ValueError:
                pass
        issues.append(ConfigIssue(path, value, "expected a number", "write a number such as 0.001 or 1.0e-3"))
        return _MISSING
    if tp is str:
        if isinstance(value, str):
            return value
        issues.append(ConfigIssue(path, value, "expected a string", "quote the value"))
        return _MISSING
    raise TypeError(f"configlib cannot convert to {tp!r} at {path}")  # a bug in a config class, not user input


def _build(cls: type, data: Any, path: str, issues: list[ConfigIssue], hooks: Hooks = NO_HOOKS) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        issues.append(
            ConfigIssue(path, data, f"expected a mapping for section {cls.__name__}", "write `key: value` lines")
        )
        return _MISSING
    resolver = hooks.resolver(cls)
    if resolver is not None:
        resolved = resolver(data)
        if isinstance(resolved, Problem):
            issues.append(ConfigIssue(_join(path, resolved.field), resolved.value, resolved.problem, resolved.hint))
            return _MISSING
        cls = resolved
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(fields)}"
            issues.append(ConfigIssue(_join(path, str(key)), data[key], "unknown key", hint))
    kwargs: dict[str, Any] = {}
    n_before = len(issues)
    for name, f in fields.items():
        fpath = _join(path, name)
        if name not in data:
            if dataclasses.is_dataclass(hints[name]):  # absent section: its defaults, resolved and checked
                value = _convert(hints[name], {}, fpath, issues, hooks)
                if value is not _MISSING:
                    kwargs[name] = value
                continue
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                issues.append(ConfigIssue(fpath, None, "missing required key", f.metadata.get("help", "")))
            continue
        value = _convert(hints[name], data[name], fpath, issues, hooks)
        if value is _MISSING:
            continue
        checks = [c for c in (f.metadata.get("check"), hooks.check(cls, name)) if c is not None]
        if checks and value is not None:
            problem = all_of(*checks)(value)
            if problem:
                issues.append(ConfigIssue(fpath, data[name], problem, f.metadata.get("help", "")))
                continue
        kwargs[name] = value
    if len(issues) > n_before:
        return _MISSING
    obj = cls(**kwargs)
    cross = getattr(obj, "_cross_checks", None)
    if cross is not None:
        for p in cross():
            issues.append(ConfigIssue(_join(path, p.field), p.value, p.problem, p.hint))
    return obj


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def from_dict(cls: type, data: dict, source: str = "config", hooks: Hooks = NO_HOOKS) -> Any:
    """Build `cls` from a plain dict, or raise one `ConfigError` listing every problem."""
    issues: list[ConfigIssue] = []
    obj = _build(cls, data, "", issues, hooks)
    if issues:
        raise ConfigError(issues, source)
    return obj


def to_dict(obj: Any) -> Any:
    """The plain-data form of a config (tuples become lists), suitable for YAML and MLflow params."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists kept whole)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, Any] | ConfigIssue:
    """`a.b=value` -> ("a.b", parsed value). The value is read as YAML (so `[1, 2]`, `true`, `null` work)."""
    if "=" not in text:
        return ConfigIssue(text, text, "an override must look like key.path=value", "e.g. stream.batch_size=16")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part.isidentifier() for part in key.split(".")):
        return ConfigIssue(key, text, "malformed dotted key", "use dotted names such as odedit.dual_lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        return ConfigIssue(key, raw, f"value is not valid YAML ({exc.__class__.__name__})", "quote strings with spaces")
    return key, value


def apply_overrides(data: dict, overrides: Iterable[str], issues: list[ConfigIssue]) -> dict:
    """Apply dotted `key=value` overrides to a raw config dict (unknown keys surface later as unknown keys)."""
    for text in overrides:
        parsed = parse_override(text)
        if isinstance(parsed, ConfigIssue):
            issues.append(parsed)
            continue
        key, value = parsed
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                issues.append(ConfigIssue(key, value, f"{part!r} is not a section", "override a leaf key"))
                break
            node = child
        else:
            node[parts[-1]] = value
    return data


def read_yaml(path: str, issues: list[ConfigIssue]) -> dict:
    """Read a YAML mapping; problems (missing file, bad YAML, not a mapping) become issues."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        issues.append(ConfigIssue("<file>", path, "config file not found", "check the --config path"))
        return {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        issues.append(ConfigIssue("<file>", path, f"not valid YAML: {exc}".split("\n")[0], "fix the YAML syntax"))
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        issues.append(ConfigIssue("<file>", path, "top level must be a mapping", "write `section: {...}` blocks"))
        return {}
    return data


def help_rows(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) for every leaf field, nested sections flattened, for `--help-config`."""
    rows: list[tuple[str, str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(help_rows(tp, key))
            continue
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "<required>"  # type: ignore[misc]
            )
        )
        rows.append((key, _type_name(tp), repr(default), f.metadata.get("help", "")))
    return rows


def help_table(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field, for `--help-config` style listings and docs."""
    return [(key, default, text) for key, _, default, text in help_rows(cls, prefix)]

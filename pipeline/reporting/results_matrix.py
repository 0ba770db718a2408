"""The results matrix: host editors x {base, +ODEdit} x stream settings, as validated configs.

    spec = load_matrix("jobs/matrices/results.yaml")        # MatrixError lists every problem
    for cell in cells(base_dict, spec): cell.config, cell.key      # one edit stream each

A matrix file has three sections:

    editors:   {name: {method: {...}, overrides: [...]}}   each editor's whole `method` block (it replaces the
                                          base's) and optional overrides of other sections for that editor
    settings:  {name: [key=value, ...]}       stream overrides, e.g. single edits or sequences of T edits
    arms:      {name: [key=value, ...]}       default {base: [odedit.enabled=false], odedit: [odedit.enabled=true]}
    seeds:     [0, 1, 2]                       optional: every cell once per seed (`seed=<n>`), for mean and
                                          spread (`pipeline.reporting.tables.seeded_markdown`); absent = one run
                                          per cell at the base config's seed. The i-th seed edits its own slice
                                          of the split (`Cell.offset` = i x stream.num_edits), so the spread is
                                          that of the edit sample; the job checks the split holds every slice

Every cell's config is built by the normal config loader from the base config dict, so a misspelt key or a
refused value in any cell is reported, with the cell named, before any stream runs.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from odedit.config import Config, ConfigError
from odedit.loading import parse_config

DEFAULT_ARMS = {"base": ["odedit.enabled=false"], "odedit": ["odedit.enabled=true"]}


class MatrixError(ValueError):
    """Every problem of a matrix file, one per line."""

    def __init__(self, problems: list[str], source: str) -> None:
        self.problems = problems
        super().__init__(f"{source} has {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class MatrixSpec:
    editors: dict[str, dict[str, Any]]
    settings: dict[str, list[str]]
    arms: dict[str, list[str]] = field(default_factory=lambda: dict(DEFAULT_ARMS))
    seeds: tuple[int, ...] = ()


@dataclass(frozen=True)
class Cell:
    setting: str
    editor: str
    arm: str
    config: Config
    seed: int | None = None  # set when the matrix lists seeds
    offset: int = 0  # edits of the split skipped first: the seed's own slice (`cells`)

    @property
    def key(self) -> str:
        base = f"{self.setting}/{self.editor}/{self.arm}"
        return base if self.seed is None else f"{base}/seed{self.seed}"

    @property
    def run_name(self) -> str:
        base = f"results-{self.setting}-{self.editor}-{self.arm}"
        return base if self.seed is None else f"{base}-seed{self.seed}"


def _overrides(value: Any, where: str, problems: list[str]) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        problems.append(
            f"{where}: expected a list of 'key=value' overrides, got {value!r}. "
            "Hint: e.g. [stream.mode=single, stream.num_edits=100]"
        )
        return []
    return list(value)


def parse_matrix(data: Any, source: str = "matrix") -> MatrixSpec:
    """Check a matrix dict's shape (see the module docstring); raise `MatrixError` listing every problem."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise MatrixError(
            [f"the file must hold a mapping with editors/settings/arms, got {type(data).__name__}"], source
        )
    for key in sorted(set(data) - {"editors", "settings", "arms", "seeds"}):
        problems.append(
            f"{key}: unknown section (got {data[key]!r}). Hint: the sections are editors, settings, arms, seeds"
        )
    editors: dict[str, dict[str, Any]] = {}
    raw_editors = data.get("editors")
    if not isinstance(raw_editors, dict) or not raw_editors:
        problems.append(f"editors: expected a non-empty mapping name -> {{method: {{...}}}}, got {raw_editors!r}")
    else:
        for name, body in raw_editors.items():
            if (
                not isinstance(body, dict)
                or not isinstance(body.get("method"), dict)
                or set(body) - {"method", "overrides"}
            ):
                problems.append(
                    f"editors.{name}: expected {{method: {{name: ..., ...}}, overrides: [key=value, ...]}} "
                    f"(overrides optional), got {body!r}"
                )
            else:
                editors[str(name)] = {
                    "method": copy.deepcopy(body["method"]),
                    "overrides": _overrides(body.get("overrides", []), f"editors.{name}.overrides", problems),
                }
    settings: dict[str, list[str]] = {}
    raw_settings = data.get("settings")
    if not isinstance(raw_settings, dict) or not raw_settings:
        problems.append(f"settings: expected a non-empty mapping name -> [key=value, ...], got {raw_settings!r}")
    else:
        settings = {str(k): _overrides(v, f"settings.{k}", problems) for k, v in raw_settings.items()}
    arms = dict(DEFAULT_ARMS)
    if "arms" in data:
        if not isinstance(data["arms"], dict) or not data["arms"]:
            problems.append(f"arms: expected a non-empty mapping name -> [key=value, ...], got {data['arms']!r}")
        else:
            arms = {str(k): _overrides(v, f"arms.{k}", problems) for k, v in data["arms"].items()}
    seeds: tuple[int, ...] = ()
    if "seeds" in data:
        raw = data["seeds"]
        if (
            not isinstance(raw, list)
            or not raw
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in raw)
            or len(set(raw)) != len(raw)
        ):
            problems.append(
                f"seeds: expected a non-empty list of distinct non-negative integers, got {raw!r}. Hint: e.g. [0, 1, 2]"
            )
        else:
            seeds = tuple(raw)
    if problems:
        raise MatrixError(problems, source)
    return MatrixSpec(editors, settings, arms, seeds)


def load_matrix(path: str | os.PathLike) -> MatrixSpec:
    if not os.path.isfile(path):
        raise MatrixError([f"--matrix: no file at {str(path)!r}. Hint: see jobs/matrices/results.yaml"], str(path))
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            raise MatrixError([f"not valid YAML: {err}"], str(path)) from None
    return parse_matrix(data, str(path))


def cells(
    base: Mapping[str, Any], spec: MatrixSpec, extra_checks: Iterable = (), only: Iterable[str] = ()
) -> list[Cell]:
    """Every (setting, editor, arm) cell's config, in run order; `MatrixError` lists all cells' problems.

    `only` keeps the cells whose key (`setting/editor/arm`) starts with one of its prefixes.
    """
    checks = list(extra_checks)
    wanted = tuple(only)
    out: list[Cell] = []
    problems: list[str] = []
    seeds: tuple[int | None, ...] = spec.seeds or (None,)
    for setting, s_over in spec.settings.items():
        for editor, body in spec.editors.items():
            for arm, a_over in spec.arms.items():
                for position, seed in enumerate(seeds):
                    key = Cell(setting, editor, arm, None, seed).key  # type: ignore[arg-type]
                    if wanted and not key.startswith(wanted):
                        continue
                    data = copy.deepcopy(dict(base))
                    data["method"] = copy.deepcopy(body["method"])
                    over = [*body["overrides"], *s_over, *a_over, *([f"seed={seed}"] if seed is not None else [])]
                    try:
                        cfg = parse_config(data, over, source=key, extra_checks=checks)
                    except ConfigError as err:
                        problems += [f"{key}: {issue}" for issue in err.issues]
                        continue
                    # [INFERENCE] A seed is a draw of edits, not only an initialisation: with the same edits in
                    # the same order, FT (and every deterministic host) scores identically under every seed, so
                    # a spread over seeds would show no noise at all. Each seed edits its own disjoint slice of
                    # the split (the i-th seed skips i x stream.num_edits edits) and seeds torch and the
                    # retention sample; the spread over seeds is then that of the edit sample.
                    offset = position * cfg.stream.num_edits if seed is not None else 0
                    out.append(Cell(setting, editor, arm, cfg, seed, offset))
    if problems:
        raise MatrixError(problems, "the results matrix")
    return out

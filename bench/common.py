"""What every benchmark shares: the result file of the benchmark contract, the ratio table, child processes.

Contract (DEVELOPERS.md): `python -m bench.<name> [--quick]` prints a table and writes
`bench/results/<name>.json` = {"name", "quick", "figures": {key: number}, "targets": {key: "<= 2.0"},
"met": {key: bool}} (plus "details" and "load" for the reader).
"""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from pipeline.storage.jsonio import write_json

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RESULT_PREFIX = "BENCH_RESULT "
_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def met(value: float, target: str) -> bool:
    """Whether `value` satisfies a target such as "<= 2.0"."""
    op, bound = target.split()
    return bool(_OPS[op](value, float(bound)))


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def write_result(
    name: str,
    quick: bool,
    figures: Mapping[str, float],
    targets: Mapping[str, str],
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Print the ratio table and write `bench/results/<name>.json`; returns the result dict."""
    result = {
        "name": name,
        "quick": quick,
        "figures": {k: float(v) for k, v in figures.items()},
        "targets": dict(targets),
        "met": {k: met(figures[k], t) for k, t in targets.items() if k in figures},
        "details": dict(details or {}),
        "load": load_average(),
    }
    path = write_json(os.path.join(RESULTS_DIR, f"{name}.json"), result)
    width = max(len(k) for k in result["figures"])
    print(f"\n{name}{' (quick)' if quick else ''}   load average {result['load']}")
    print(f"{'figure':<{width}}  {'value':>10}  {'target':>8}  met")
    for k, v in result["figures"].items():
        t = targets.get(k, "")
        print(f"{k:<{width}}  {v:>10.4g}  {t:>8}  {result['met'].get(k, '')}")
    print(f"wrote {path}")
    return result


def run_child(module: str, args: list[str], env: Mapping[str, str] | None = None, timeout: float = 3600) -> dict:
    """Run `python -m <module> <args>` in a fresh process and return the JSON it prints after RESULT_PREFIX."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(
        f"{module} {' '.join(args)} printed no result (exit {proc.returncode}):\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )


def emit(result: Mapping[str, Any]) -> None:
    """The child side of `run_child`."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)

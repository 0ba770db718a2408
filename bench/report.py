"""Render the measured tables of docs/benchmarks.md from bench/results/*.json.

    python -m bench.report            # rewrites the part of docs/benchmarks.md between the markers

Only the block between `<!-- bench:begin -->` and `<!-- bench:end -->` is generated; the reading around it is
written by hand. Each benchmark's table lists its figures with target and verdict, whether it was the
`--quick` variant, and the load average when it finished (the machine's other work skews CPU timings).
"""

from __future__ import annotations

import glob
import json
import os
import sys

from bench.common import RESULTS_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
ORDER = ("odedit_overhead", "shards", "batching", "engine_overhead", "lifelong")


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def render(results: list[dict]) -> str:
    rank = {n: i for i, n in enumerate(ORDER)}
    parts = []
    for r in sorted(results, key=lambda r: (rank.get(r["name"], 99), r["name"])):
        variant = "--quick" if r.get("quick") else "full"
        parts.append(f"#### `{r['name']}` ({variant}; load average at the end {r.get('load', 'n/a')})")
        parts.append("")
        parts.append("| figure | value | target | met |")
        parts.append("|---|---|---|---|")
        for key, value in r["figures"].items():
            target = r["targets"].get(key, "")
            met = r["met"].get(key)
            verdict = "" if met is None else ("yes" if met else "**no**")
            parts.append(f"| `{key}` | {_fmt(value)} | {target} | {verdict} |")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> str:
    results = []
    for path in sorted(glob.glob(os.path.join(RESULTS_DIR, "*.json"))):
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if {"name", "figures", "targets", "met"} <= set(data):
            results.append(data)
    block = f"{BEGIN}\n{render(results)}{END}"
    text = open(DOC, encoding="utf-8").read() if os.path.isfile(DOC) else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {DOC} lacks the markers {BEGIN} / {END}; add them where the tables go")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(DOC, "w", encoding="utf-8") as fh:
        fh.write(head + block + tail)
    print(f"wrote {DOC} ({len(results)} benchmarks)")
    return block


if __name__ == "__main__":
    main(sys.argv[1:])

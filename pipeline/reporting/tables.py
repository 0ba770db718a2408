"""Result tables for the terminal and for docs (Markdown), from stream summaries."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from odedit.metrics import HEADLINE

LABELS = {
    "rel": "Rel",
    "t_gen": "T-Gen",
    "m_gen": "M-Gen",
    "t_loc": "T-Loc",
    "m_loc": "M-Loc",
    "m_loc_hard": "M-Loc-hard",
}


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * float(v):.1f}"


def comparison_table(results: Mapping[str, Mapping[str, Any]], markdown: bool = False) -> str:
    """One row per run: headline metrics (x100) at the end of the stream, edits, wall time, MLflow run id."""
    head = ["run"] + [LABELS[m] for m in HEADLINE] + ["edits", "failed", "wall s", "mlflow run"]
    rows = []
    for name, s in results.items():
        rows.append(
            [name]
            + [_fmt(s.get(m)) for m in HEADLINE]
            + [
                str(s.get("edits_applied", "")),
                str(s.get("edits_failed", "")),
                f"{s.get('wall_seconds', float('nan')):.0f}",
                str(s.get("mlflow_run_id", ""))[:12],
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in rows])


def results_markdown(cells: list[Mapping[str, Any]]) -> str:
    """One Markdown table per setting of the results matrix: editor x arm rows, metrics x100, run ids."""
    head = ["editor", "arm"] + [LABELS[m] for m in HEADLINE] + ["edits", "failed", "stream s", "MLflow run id"]
    parts = []
    for setting in dict.fromkeys(c["setting"] for c in cells):
        lines = [f"### {setting}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in (c for c in cells if c["setting"] == setting):
            wall = c.get("seconds", c.get("wall_seconds"))  # the stream's own time (start-up excluded)
            lines.append(
                "| "
                + " | ".join(
                    [c["editor"], c["arm"]]
                    + [_fmt(c.get(m)) for m in HEADLINE]
                    + [
                        str(c.get("edits_applied", "")),
                        str(c.get("edits_failed", "")),
                        f"{wall:.0f}" if isinstance(wall, (int, float)) else "n/a",
                        f"`{c.get('mlflow_run_id') or ''}`",
                    ]
                )
                + " |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def seeded_markdown(cells: list[Mapping[str, Any]]) -> str:
    """One Markdown table per setting of a matrix run with seeds: editor x arm rows, each metric's mean ± sample
    standard deviation over the seeds (x100), the seeds that ran, failed edits summed, every run id.

    A difference between two arms is beyond seed noise only where it exceeds their spreads; the table gives the
    spread so a reader can judge, it does not test significance."""
    head = ["editor", "arm", "seeds"] + [LABELS[m] for m in HEADLINE] + ["failed", "MLflow run ids"]
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["setting"], c["editor"], c["arm"]), []).append(c)
    parts = []
    for setting in dict.fromkeys(k[0] for k in groups):
        lines = [f"### {setting}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (s, editor, arm), runs in groups.items():
            if s != setting:
                continue
            cols = [editor, arm, ",".join(str(r.get("seed", "")) for r in runs)]
            for m in HEADLINE:
                vals = [float(r[m]) for r in runs if isinstance(r.get(m), (int, float)) and not math.isnan(r[m])]
                if not vals:
                    cols.append("n/a")
                    continue
                mean, sd = _mean_sd(vals)
                cols.append(
                    f"{100 * mean:.1f} ± {100 * sd:.1f}" + ("" if len(vals) == len(runs) else f" (n={len(vals)})")
                )
            cols.append(str(sum(int(r.get("edits_failed") or 0) for r in runs)))
            cols.append(" ".join(f"`{r.get('mlflow_run_id') or ''}`" for r in runs))
            lines.append("| " + " | ".join(cols) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)

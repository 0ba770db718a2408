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

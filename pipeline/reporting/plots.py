"""PNG plots of a stream's results (retention curve, headline metrics), for MLflow artifacts and docs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from odedit.metrics import HEADLINE


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on workers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_retention(curve: Sequence[Mapping[str, Any]], path: str, title: str = "Retention along the stream") -> str:
    """Each headline metric of the retention sample against the number of edits applied."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [p["edits"] for p in curve]
    for name in HEADLINE:
        ys = [p.get(name) for p in curve]
        if any(isinstance(y, (int, float)) and not math.isnan(y) for y in ys if y is not None):
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", ms=3, label=name)
    ax.set_xlabel("edits applied")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    return _save(plt, fig, path)


def plot_dual(rows: Sequence[Mapping[str, Any]], path: str, title: str = "lambda and the penalty") -> str:
    """lambda and the TV-l1 penalty at each edit step's last iteration, against the edits of the stream (issue 17).

    Reads the result rows' `final_lambda` / `final_penalty` (one point per step; NaN where the step had no
    penalty, e.g. the host arm); the penalty on a log axis, as it spans orders of magnitude.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = list(range(1, len(rows) + 1))

    def series(key: str) -> list[float]:
        return [float(r[key]) if isinstance(r.get(key), (int, float)) else float("nan") for r in rows]

    ax.plot(xs, series("final_lambda"), color="tab:blue", lw=1, label="lambda")
    ax.set_xlabel("edit")
    ax.set_ylabel("lambda", color="tab:blue")
    pen = series("final_penalty")
    twin = ax.twinx()
    twin.plot(xs, pen, color="tab:red", lw=1, label="penalty")
    if any(p > 0 for p in pen if not math.isnan(p)):
        twin.set_yscale("log")
    twin.set_ylabel("penalty", color="tab:red")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def plot_metrics(summary: Mapping[str, Any], path: str, title: str = "Headline metrics") -> str:
    """Bars of the headline metrics: pre-edit, immediate and final (end of stream)."""
    return plot_comparison(
        {
            "pre-edit": summary.get("pre", {}),
            "immediate": summary.get("immediate", {}),
            "final": summary.get("final", {}),
        },
        path,
        title,
    )


def plot_comparison(groups: Mapping[str, Mapping[str, Any]], path: str, title: str = "") -> str:
    """Grouped bars: one group per headline metric, one bar per named result (e.g. base vs +ODEdit)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(groups)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        vals = [groups[name].get(m) for m in HEADLINE]
        vals = [0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in vals]
        ax.bar([j + i * width for j in range(len(HEADLINE))], vals, width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(HEADLINE))], HEADLINE)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: str) -> str:
    """Lay out, write `path` (PNG, 120 dpi) and free the figure; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

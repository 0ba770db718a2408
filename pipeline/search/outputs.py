"""What a finished search leaves for its user: the best config as a runnable YAML, a plot, a trial table."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from odedit.config import Config, SearchConfig, dump_config
from odedit.configlib import to_dict
from odedit.loading import load_config
from pipeline.search.space import sample_config


def write_best(cfg: Config, outcome: Any, path: str) -> str:
    """The best trial's config for the test stream, headed by the command that runs it ('' with no best)."""
    best = outcome.best
    if best is None:
        return ""
    best_cfg = sample_config(to_dict(cfg), best.sample)
    best_cfg = dataclasses.replace(
        best_cfg,
        search=SearchConfig(),
        stream=dataclasses.replace(best_cfg.stream, split="test", run_name=f"{cfg.search.name}-best"),
    )
    value = best.metrics.get(cfg.search.metric)
    lines = [
        f"# python -m jobs.lifelong --config {path}",
        f"# ray job submit --working-dir . -- python -m jobs.lifelong --config {path}",
        "#",
        f"# Best trial {best.trial_id} of search {cfg.search.name!r} ({outcome.searcher} + ASHA, "
        f"{len(outcome.trials)} trials): {cfg.search.metric} = {value:.4f} on {outcome.edits_total} "
        f"{cfg.search.split} edits.",
        f"# MLflow: trial run {best.mlflow_run_id}, search run {outcome.parent_run_id}.",
        "# Searched values:",
        *[f"#   {k}: {v!r}" for k, v in best.sample.items()],
        "",
    ]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + dump_config(best_cfg))
    load_config(path)  # what jobs.lifelong will do: fail here, not there
    return path


def plot_search(outcome: Any, metric: str, mode: str, path: str) -> str:
    """Left: each trial's metric along its stream (ASHA's view). Right: each trial's last value, best so far."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt

    pick = max if mode == "max" else min
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    best, xs, ys = None, [], []
    for t in outcome.trials:
        if t.curve:
            edits, values = zip(*t.curve)
            left.plot(
                edits,
                values,
                marker="o",
                ms=3,
                alpha=0.8,
                ls="-" if t.status == "completed" else ":",
                label=str(t.index),
            )
        value = t.metrics.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            done = t.status == "completed"
            right.scatter([t.index], [value], marker="o" if done else "x", c="C0" if done else "C3")
            if done:
                best = value if best is None else pick(best, value)
                xs.append(t.index)
                ys.append(best)
    if xs:
        right.step(xs + [len(outcome.trials)], ys + ys[-1:], where="post", c="C2", label="best completed so far")
        right.legend(fontsize=7)
    left.set_xlabel("edits applied")
    left.set_ylabel(metric)
    left.set_title("trials along the stream (dotted: stopped by ASHA)", fontsize=9)
    left.grid(alpha=0.3)
    if 0 < len(outcome.trials) <= 12:
        left.legend(fontsize=6, ncol=2, title="trial", title_fontsize=6)
    right.set_xlabel("trial (in the order started)")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_ylabel(f"{metric} at its last report")
    right.set_title("o: completed, x: stopped early", fontsize=9)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def trials_table(outcome: Any, metric: str) -> str:
    """One line per trial: id, status, edits reached, metric, sampled values."""
    keys = [d.key for d in outcome.space]
    head = ["#", "trial", "status", "edits", metric, *keys]
    rows = [head]
    for t in outcome.trials:
        v = t.metrics.get(metric)
        rows.append(
            [
                str(t.index),
                t.trial_id + (" *" if outcome.best is t else ""),
                t.status,
                str(t.metrics.get("edits")),
                f"{v:.4f}" if isinstance(v, (int, float)) else "-",
                *[_short(t.sample.get(k)) for k in keys],
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)

"""What a finished search leaves for its user: the best config as a runnable YAML, a plot, a trial table; with
several metrics also one YAML per trade-off, and the Pareto front as JSON, a markdown table and a plot."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from odedit.config import Config, SearchConfig, dump_config
from odedit.configlib import to_dict
from odedit.loading import load_config
from pipeline.search.pareto import eligible, score
from pipeline.search.space import modes, objectives, sample_config, tradeoffs


def write_best(cfg: Config, outcome: Any, path: str, trial: Any = None, tradeoff: str = "") -> str:
    """A trial's config for the test stream, headed by the command that runs it ('' with no trial).

    Args:
        trial: the trial to write (default: `outcome.best`).
        tradeoff: with several metrics, the name of the trade-off that picked the trial (said in the header).
    """
    best = outcome.best if trial is None else trial
    if best is None:
        return ""
    best_cfg = sample_config(to_dict(cfg), best.sample)
    suffix = f"-{tradeoff}" if tradeoff else ""
    best_cfg = dataclasses.replace(
        best_cfg,
        search=SearchConfig(),
        stream=dataclasses.replace(best_cfg.stream, split="test", run_name=f"{cfg.search.name}-best{suffix}"),
    )
    scheduler = getattr(outcome, "scheduler", "asha").upper()
    names = objectives(cfg.search)
    scores = ", ".join(f"{m} = {_value(best.metrics.get(m))}" for m in names)
    if tradeoff:
        weights = tradeoffs(cfg.search)[tradeoff]
        why = (
            f"# Trial {best.trial_id} of search {cfg.search.name!r} ({outcome.searcher} + {scheduler}, "
            f"{len(outcome.trials)} trials), picked from the Pareto front of {', '.join(names)} by trade-off "
            f"{tradeoff!r} (weights {json.dumps(weights)}): {scores} on {outcome.edits_total} {cfg.search.split} edits."
        )
    else:
        why = (
            f"# Best trial {best.trial_id} of search {cfg.search.name!r} ({outcome.searcher} + {scheduler}, "
            f"{len(outcome.trials)} trials): {scores} on {outcome.edits_total} {cfg.search.split} edits."
        )
    lines = [
        f"# python -m jobs.lifelong --config {path}",
        f"# ray job submit --working-dir . -- python -m jobs.lifelong --config {path}",
        "#",
        why,
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


def _value(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


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


def trials_table(outcome: Any, metric: str | Sequence[str]) -> str:
    """One line per trial: id, status, edits reached, the metric(s), sampled values (`*`: the best trial)."""
    keys = [d.key for d in outcome.space]
    names = [metric] if isinstance(metric, str) else list(metric)
    head = ["#", "trial", "status", "edits", *names, *keys]
    rows = [head]
    for t in outcome.trials:
        rows.append(
            [
                str(t.index),
                t.trial_id + (" *" if outcome.best is t else ""),
                t.status,
                str(t.metrics.get("edits")),
                *[_value(t.metrics.get(m)) for m in names],
                *[_short(t.sample.get(k)) for k in keys],
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------- Pareto front


def _front_rows(cfg: Config, outcome: Any) -> tuple[list[str], list[Any], dict[str, list[str]]]:
    names = list(objectives(cfg.search))
    picked_by: dict[str, list[str]] = {}
    for name, t in outcome.picks.items():
        picked_by.setdefault(t.trial_id, []).append(name)
    return names, list(outcome.front), picked_by


def pareto_record(cfg: Config, outcome: Any, best_paths: dict[str, str]) -> dict[str, Any]:
    """`pareto.json`: the objectives, the trade-offs, the front (trial ids, MLflow run ids, values, samples),
    the dominated trials and each trade-off's pick with its score and YAML."""
    names, front, picked_by = _front_rows(cfg, outcome)
    on_front = {t.trial_id for t in front}
    weights = tradeoffs(cfg.search)

    def row(t: Any) -> dict[str, Any]:
        return {
            "index": t.index,
            "trial_id": t.trial_id,
            "mlflow_run_id": t.mlflow_run_id,
            "run_name": t.run_name,
            "values": {m: t.metrics.get(m) for m in names},
            "sample": t.sample,
            "picked_by": picked_by.get(t.trial_id, []),
        }

    return {
        "objectives": names,
        "modes": list(modes(cfg.search)),
        "tradeoffs": weights,
        "trials": len(outcome.trials),
        "eligible": len(eligible(outcome.trials, names)),
        "front": [row(t) for t in front],
        "dominated": [t.trial_id for t in eligible(outcome.trials, names) if t.trial_id not in on_front],
        "picks": {
            name: {
                "trial_id": t.trial_id,
                "index": t.index,
                "mlflow_run_id": t.mlflow_run_id,
                "score": score([t.metrics[m] for m in names], weights[name], names, modes(cfg.search)),
                "values": {m: t.metrics.get(m) for m in names},
                "best_yaml": best_paths.get(name, ""),
            }
            for name, t in outcome.picks.items()
        },
    }


def pareto_table(cfg: Config, outcome: Any) -> str:
    """The front as markdown: one row per front trial (ids, MLflow run id, values, trade-offs picking it,
    sampled values), then one row per trade-off."""
    names, front, picked_by = _front_rows(cfg, outcome)
    record = pareto_record(cfg, outcome, {})
    keys = [d.key for d in outcome.space]
    direction = ", ".join(f"{m} ({md})" for m, md in zip(names, modes(cfg.search)))
    lines = [
        f"Pareto front of search `{cfg.search.name}` on {direction}: {len(front)} of the {record['eligible']} "
        f"trials that edited their whole slice ({outcome.edits_total} {cfg.search.split} edits; "
        f"{len(outcome.trials)} trials in all). Search run `{outcome.parent_run_id}`.",
        "",
        "| # | trial | " + " | ".join(names) + " | picked by | MLflow run id | " + " | ".join(keys) + " |",
        "|---|---|" + "---|" * len(names) + "---|---|" + "---|" * len(keys),
    ]
    for t in sorted(front, key=lambda t: [t.metrics[m] for m in names]):
        cells = [
            str(t.index),
            t.trial_id,
            *[_value(t.metrics.get(m)) for m in names],
            ", ".join(picked_by.get(t.trial_id, [])) or "-",
            f"`{t.mlflow_run_id}`" if t.mlflow_run_id else "-",
            *[_short(t.sample.get(k)) for k in keys],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if record["picks"]:
        lines += ["", "| trade-off | weights | trial | score |", "|---|---|---|---|"]
        for name, p in record["picks"].items():
            lines.append(f"| {name} | {json.dumps(record['tradeoffs'][name])} | {p['trial_id']} | {p['score']:.4f} |")
    return "\n".join(lines) + "\n"


def plot_pareto(cfg: Config, outcome: Any, path: str) -> str:
    """Each pair of objectives (up to 3 panels): every trial that edited its whole slice (grey: dominated),
    the front highlighted (joined in order of the x axis with 2 objectives), trials ASHA stopped as x, each
    trade-off's pick named."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt

    names, front, picked_by = _front_rows(cfg, outcome)
    kinds = list(modes(cfg.search))
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))][:3]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.2), squeeze=False)
    pool = eligible(outcome.trials, names)
    on_front = {t.trial_id for t in front}
    others = [
        t for t in outcome.trials if t not in pool and all(_value(t.metrics.get(m)) not in ("-", "nan") for m in names)
    ]
    for ax, (i, j) in zip(axes[0], pairs):
        x, y = names[i], names[j]
        dominated = [t for t in pool if t.trial_id not in on_front]
        ax.scatter([t.metrics[x] for t in dominated], [t.metrics[y] for t in dominated], c="0.6", label="dominated")
        if others:
            ax.scatter(
                [t.metrics[x] for t in others],
                [t.metrics[y] for t in others],
                marker="x",
                c="C3",
                alpha=0.6,
                label="stopped early (not on the front)",
            )
        ax.scatter([t.metrics[x] for t in front], [t.metrics[y] for t in front], c="C0", s=45, label="Pareto front")
        if len(names) == 2 and front:
            ordered = sorted(front, key=lambda t: t.metrics[x])
            ax.plot([t.metrics[x] for t in ordered], [t.metrics[y] for t in ordered], c="C0", lw=1, ls="--")
        for t in front:
            label = str(t.index) + (f" ({', '.join(picked_by[t.trial_id])})" if t.trial_id in picked_by else "")
            ax.annotate(label, (t.metrics[x], t.metrics[y]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(f"{x} ({kinds[i]})")
        ax.set_ylabel(f"{y} ({kinds[j]})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"search {cfg.search.name}: {len(front)} on the Pareto front of {len(pool)} trials "
        f"({outcome.edits_total} {cfg.search.split} edits)\nlabels: trial (the trade-offs picking it)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

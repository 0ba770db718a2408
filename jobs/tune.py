"""Hyperparameter search over ODEdit's knobs with Ray Tune (ASHA + Optuna), tracked in MLflow.

    python -m jobs.tune --config jobs/configs/demo_tune.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.tune --config jobs/configs/demo_tune.yaml

Checks the search space against the config loader (every key, each end of its range, each choice) before
anything runs, prepares the data and model once (cached), then runs `search.num_samples` trials, each a
lifelong stream on the validation slice, stopped early by ASHA when it falls behind (`pipeline.search`).
Re-running the same command after the driver died restores the search instead of starting over.

Writes `<output_dir>/best.yaml` (the best trial's config on the test stream, headed by the command that runs
it with `jobs.lifelong`), and under `<output_dir>/search/<name>/`: `summary.json`, `trials.json` and
`objective.png`, all also logged to the search's MLflow parent run with the space and the best trial.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Sequence

from jobs.common import write_json
from odedit.config import Config, ConfigError, SearchConfig, dump_config, load_config


def main(cfg: Config) -> dict:
    """Run (or restore) the search of `cfg`; returns the summary also written to `summary.json`."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from pipeline.raycluster import init_ray

    from pipeline.experiment import prepared, run_info
    from pipeline.search import Search, validate_search
    from pipeline.tracking import attach_tracker, open_tracker

    validate_search(cfg)  # a bad space fails here, before anything is prepared or run
    started = init_ray()  # joins the cluster under `ray job submit`, or starts a local one; False if Ray was up
    try:
        # ---- data and model once, then the trials
        run_cfg, model_path, prep = prepared(cfg)
        search = Search(cfg, run_cfg, model_path)

        def open_parent() -> Any:
            parent = open_tracker(search.run_cfg, cfg.search.name, tags={"odedit.kind": "search"},
                                  outbox_dir=search.dir)
            params = {f"space.{d.key}": json.dumps(d.spec()) for d in search.dims}
            params.update({f"search.{k}": v for k, v in dataclasses.asdict(cfg.search).items() if k != "space"})
            parent.log_params({**params, **run_info(cfg), "searcher_used": search.searcher_name,
                               "model_path": model_path})
            return parent

        outcome = search.fit(open_parent)
    finally:
        if started:
            ray.shutdown()

    # ---- best config, plot, summary; all on the parent run
    best_path = write_best(cfg, outcome, os.path.join(cfg.output_dir, "best.yaml"))
    trials_path = write_json(os.path.join(outcome.search_dir, "trials.json"),
                             [dataclasses.asdict(t) for t in outcome.trials])
    plot_path = plot_search(outcome, cfg.search.metric, cfg.search.mode,
                            os.path.join(outcome.search_dir, "objective.png"))
    parent = attach_tracker(search.run_cfg, outcome.parent_run_id, outcome.search_dir)
    counts = {s: sum(t.status == s for t in outcome.trials) for s in ("completed", "stopped", "error")}
    parent.log_metrics({f"trials_{k}": float(v) for k, v in counts.items()}, 0)
    best = outcome.best
    if best is not None:
        parent.log_params({"best.trial_id": best.trial_id, "best.mlflow_run_id": best.mlflow_run_id,
                           **{f"best.{k}": v for k, v in best.sample.items()}})
        parent.log_metrics({f"best/{k}": float(v) for k, v in best.metrics.items()
                            if isinstance(v, (int, float)) and math.isfinite(v)}, 0)
    for path in (best_path, trials_path, plot_path):
        if path:
            parent.log_artifact(path, "search")
    parent.set_terminated("FINISHED")

    summary = {
        "search": cfg.search.name, "search_dir": outcome.search_dir, "restored": outcome.restored,
        "searcher": outcome.searcher, "metric": cfg.search.metric, "mode": cfg.search.mode,
        "edits_per_trial": outcome.edits_total, "split": cfg.search.split, "parent_run_id": outcome.parent_run_id,
        "trials": counts, "best": dataclasses.asdict(best) if best else None, "best_yaml": best_path,
        "plot": plot_path, "prepare": prep,
    }
    write_json(os.path.join(outcome.search_dir, "summary.json"), summary)
    print(trials_table(outcome, cfg.search.metric))
    if best_path:
        print(f"\nbest config: {best_path}\nrun it:      python -m jobs.lifelong --config {best_path}")
    return summary


def write_best(cfg: Config, outcome: Any, path: str) -> str:
    """The best trial's config for the test stream, headed by the command that runs it ('' with no best)."""
    from odedit.configlib import to_dict
    from pipeline.search import sample_config

    best = outcome.best
    if best is None:
        return ""
    best_cfg = sample_config(to_dict(cfg), best.sample)
    best_cfg = dataclasses.replace(
        best_cfg, search=SearchConfig(),
        stream=dataclasses.replace(best_cfg.stream, split="test", run_name=f"{cfg.search.name}-best"))
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
            left.plot(edits, values, marker="o", ms=3, alpha=0.8, ls="-" if t.status == "completed" else ":",
                      label=str(t.index))
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
        rows.append([str(t.index), t.trial_id + (" *" if outcome.best is t else ""), t.status,
                     str(t.metrics.get("edits")), f"{v:.4f}" if isinstance(v, (int, float)) else "-",
                     *[_short(t.sample.get(k)) for k in keys]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def cli(argv: Sequence[str] | None = None) -> int:
    from pipeline.search import check_search
    from pipeline.sources.base import check_source

    parser = argparse.ArgumentParser(description="Search ODEdit's knobs with Ray Tune; write the best config.")
    parser.add_argument("--config", required=True, help="YAML config with a search section (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as search.num_samples=4")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, extra_checks=[check_source, check_search])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    main(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(cli())

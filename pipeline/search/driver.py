"""A whole search as one call (`jobs.tune`): check the space, prepare once, run or restore the trials, then
write and log the best config, the trial table and the plot (see `pipeline.search` for how trials run); with
several metrics also the Pareto front (`pareto.json`, `pareto.md`, `pareto.png`) and one
`best-<trade-off>.yaml` per `search.tradeoffs` entry, all artifacts of the search's MLflow parent run.

    summary, outcome = run_search(cfg)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from odedit.config import Config
from pipeline.cluster.session import ray_session
from pipeline.experiment import prepared, run_info
from pipeline.reporting.tracking import attach_tracker, open_tracker
from pipeline.search.outputs import pareto_record, pareto_table, plot_pareto, plot_search, write_best
from pipeline.search.space import curve_metric, is_multi, modes, objectives, validate_search
from pipeline.search.tuner import Search, SearchOutcome
from pipeline.storage.jsonio import write_json


def run_search(cfg: Config) -> tuple[dict[str, Any], SearchOutcome]:
    """Run (or restore) the search of `cfg`; returns the summary also written to `summary.json`, and the outcome."""
    validate_search(cfg)  # a bad space fails here, before anything is prepared or run
    with ray_session():  # joins the cluster under `ray job submit`, or starts a local one
        # ---- data and model once, then the trials
        run_cfg, model_path, prep = prepared(cfg)
        search = Search(cfg, run_cfg, model_path)

        def open_parent() -> Any:
            parent = open_tracker(
                search.run_cfg, cfg.search.name, tags={"odedit.kind": "search"}, outbox_dir=search.dir
            )
            params = {f"space.{d.key}": json.dumps(d.spec()) for d in search.dims}
            params.update({f"search.{k}": v for k, v in dataclasses.asdict(cfg.search).items() if k != "space"})
            parent.log_params(
                {**params, **run_info(cfg), "searcher_used": search.searcher_name, "model_path": model_path}
            )
            return parent

        outcome = search.fit(open_parent)

    # ---- best config(s), plots, tables, summary; all on the parent run
    best_path = write_best(cfg, outcome, os.path.join(cfg.output_dir, "best.yaml"))
    trials_path = write_json(
        os.path.join(outcome.search_dir, "trials.json"), [dataclasses.asdict(t) for t in outcome.trials]
    )
    along = curve_metric(cfg.search)
    plot_path = plot_search(
        outcome,
        along,
        dict(zip(objectives(cfg.search), modes(cfg.search))).get(along, cfg.search.asha_mode),
        os.path.join(outcome.search_dir, "objective.png"),
    )
    tradeoff_paths = {
        name: write_best(cfg, outcome, os.path.join(cfg.output_dir, f"best-{name}.yaml"), trial, name)
        for name, trial in outcome.picks.items()
    }
    pareto_paths: list[str] = []
    if is_multi(cfg.search):
        pareto_paths = [
            write_json(os.path.join(outcome.search_dir, "pareto.json"), pareto_record(cfg, outcome, tradeoff_paths)),
            _write_text(os.path.join(outcome.search_dir, "pareto.md"), pareto_table(cfg, outcome)),
            plot_pareto(cfg, outcome, os.path.join(outcome.search_dir, "pareto.png")),
        ]
    parent = attach_tracker(search.run_cfg, outcome.parent_run_id, outcome.search_dir)
    counts = {s: sum(t.status == s for t in outcome.trials) for s in ("completed", "stopped", "error")}
    parent.log_metrics({f"trials_{k}": float(v) for k, v in counts.items()}, 0)
    best = outcome.best
    if best is not None:
        parent.log_params(
            {
                "best.trial_id": best.trial_id,
                "best.mlflow_run_id": best.mlflow_run_id,
                **{f"best.{k}": v for k, v in best.sample.items()},
            }
        )
        parent.log_metrics(
            {
                f"best/{k}": float(v)
                for k, v in best.metrics.items()
                if isinstance(v, (int, float)) and math.isfinite(v)
            },
            0,
        )
    if is_multi(cfg.search):
        parent.log_metrics({"pareto/front_size": float(len(outcome.front))}, 0)
        parent.log_metrics(
            {
                f"pick/{name}/{m}": float(t.metrics[m])
                for name, t in outcome.picks.items()
                for m in objectives(cfg.search)
            },
            0,
        )
    for path in (best_path, trials_path, plot_path, *tradeoff_paths.values(), *pareto_paths):
        if path:
            parent.log_artifact(path, "search")
    parent.set_terminated("FINISHED")

    summary = {
        "search": cfg.search.name,
        "search_dir": outcome.search_dir,
        "restored": outcome.restored,
        "searcher": outcome.searcher,
        "metric": cfg.search.metric if isinstance(cfg.search.metric, str) else list(cfg.search.metric),
        "mode": cfg.search.mode if isinstance(cfg.search.mode, str) else list(cfg.search.mode),
        "scheduler": outcome.scheduler,
        "edits_per_trial": outcome.edits_total,
        "split": cfg.search.split,
        "parent_run_id": outcome.parent_run_id,
        "trials": counts,
        "best": dataclasses.asdict(best) if best else None,
        "best_yaml": best_path,
        "tradeoffs": {
            name: {"trial_id": t.trial_id, "best_yaml": tradeoff_paths[name]} for name, t in outcome.picks.items()
        },
        "pareto_front": [t.trial_id for t in outcome.front],
        "plot": plot_path,
        "prepare": prep,
    }
    write_json(os.path.join(outcome.search_dir, "summary.json"), summary)
    return summary, outcome


def _write_text(path: str, text: str) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path

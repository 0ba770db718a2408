"""One experiment = prepared data + one or more edit streams ("arms"), tracked as nested MLflow runs.

    results = run_experiment(cfg, {"base": ["odedit.enabled=false"], "odedit": []}, name="demo")

Used by the thin jobs (`jobs/lifelong.py`, `jobs/edit.py`, `jobs/demo.py`): prepares (cached), opens a
parent run when there are several arms, runs each arm's stream on Ray Train, and returns per-arm summaries.

Each arm's MLflow run lives in its stream's run directory (`RunTracker`: a resumed arm continues its run) and
every run ends as what happened: FINISHED, FAILED or KILLED (`tracked`; issue 19 item 11). The parent comparison
run holds the comparison itself: each arm's headline metrics (`<arm>/<metric>`), the comparison table,
`comparison.png` and `summary.json`, also written to `<output_dir>/runs/<name>/` (issue 19 item 12).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import math
import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from odedit.config import Config
from odedit.loading import with_overrides
from odedit.metrics import HEADLINE
from pipeline.cluster.session import ray_session
from pipeline.prepare import log_quarantine, prepare
from pipeline.reporting.plots import plot_comparison
from pipeline.reporting.tables import comparison_table
from pipeline.reporting.tracking import RunTracker, metric_key, open_run_tracker, tracked
from pipeline.storage.jsonio import write_json
from pipeline.storage.outputs import prepare_output_dir
from pipeline.storage.root import ray_package_dir
from pipeline.train.engine import default_run_name, run_stream

COMMIT_ENV = "ODEDIT_GIT_COMMIT"
PACKAGES = ("torch", "transformers", "ray", "deepspeed", "mlflow", "pyarrow", "peft")


def code_version() -> dict[str, str]:
    """`git_commit` of the code that runs, and `code_package` when it runs from Ray's package folder.

    Under `ray job submit` the code is Ray's copy of the working directory, without `.git`: the commit is the
    one `python -m jobs.submit` read on the submitting side and passed as `$ODEDIT_GIT_COMMIT` (suffixed
    `-dirty` when the checkout had uncommitted changes). Elsewhere it is read from the checkout.
    """
    info = {}
    package = ray_package_dir(os.path.dirname(os.path.abspath(__file__)))
    if package:
        info["code_package"] = os.path.basename(package)
    commit = os.environ.get(COMMIT_ENV, "")
    if not commit and not package:
        try:
            out = subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
            commit = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
    info["git_commit"] = commit or ("unknown (submitted without jobs.submit)" if package else "unknown")
    return info


def run_info(cfg: Config) -> dict[str, str]:
    """Seed, package versions and git commit, logged as params of every run."""
    info = {"seed": str(cfg.seed)}
    for pkg in PACKAGES:
        try:
            info[f"version.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            info[f"version.{pkg}"] = "absent"
    info.update(code_version())
    return info


def prepared(cfg: Config) -> tuple[Config, str, dict[str, Any]]:
    """Run (or reuse) the preparation; return the config pointing at the resolved model, its path, prepare.json."""
    prep = prepare(cfg)
    model = prep["model"]
    model_cfg = dataclasses.replace(
        cfg.model,
        name_or_path=model["name_or_path"],
        prompt_template=model.get("prompt_template") or cfg.model.prompt_template,
    )
    return dataclasses.replace(cfg, model=model_cfg), model["name_or_path"], prep


def run_experiment(
    cfg: Config,
    arms: Mapping[str, Sequence[str]],
    name: str,
    *,
    num_edits: int | None = None,
    offset: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare, then run every arm (config overrides) as its own stream; returns {arm: summary}."""
    prepare_output_dir(cfg)
    with ray_session():  # joins the cluster under `ray job submit`, or starts a local one
        cfg, model_path, prep = prepared(cfg)
        parent = None
        if len(arms) > 1:
            parent = open_run_tracker(
                cfg, comparison_dir(cfg, name), name, tags={"odedit.kind": "comparison"}, resume=False
            )
            parent.log_params({"arms": list(arms), **run_info(cfg)})
        results: dict[str, Any] = {}
        with contextlib.ExitStack() as stack:
            if parent is not None:
                stack.enter_context(tracked(parent))  # FAILED / KILLED when an arm fails or the job is stopped
            for arm, overrides in arms.items():
                arm_cfg = with_overrides(cfg, list(overrides)) if overrides else cfg
                run_name = arm_cfg.stream.run_name or (f"{name}-{arm}" if arm else default_run_name(arm_cfg))
                # Opened in the stream's run directory once the engine claims it (a resume continues its run).
                tracker = RunTracker(arm_cfg, run_name, parent_run_id=getattr(parent, "run_id", None) or None)
                with tracked(tracker):
                    tracker.log_params({**run_info(arm_cfg), "arm": arm or run_name})
                    log_quarantine(tracker, prep)
                    summary = run_stream(
                        arm_cfg, model_path, tracker, run_name, num_edits=num_edits, offset=offset, progress=progress
                    )
                summary["arm"] = arm or run_name
                results[arm or run_name] = summary
            if parent is not None:
                log_comparison(parent, results, comparison_dir(cfg, name), name)
        return {"results": results, "prepare": prep, "parent_run_id": getattr(parent, "run_id", "")}


def comparison_dir(cfg: Config, name: str) -> str:
    """Where an experiment's comparison lives: its parent run's record and outbox, table, plot and summary."""
    return os.path.join(os.path.abspath(cfg.output_dir), "runs", name)


def log_comparison(parent: Any, results: Mapping[str, Mapping[str, Any]], out_dir: str, name: str) -> None:
    """The comparison in the parent run (issue 19 item 12): per-arm headline metrics, edit counts and wall time
    as `<arm>/<metric>` at step 0, and the table (text and Markdown), `comparison.png` and `summary.json` as
    artifacts under `comparison/`."""
    os.makedirs(out_dir, exist_ok=True)
    metrics = {}
    for arm, s in results.items():
        for key in (*HEADLINE, "edits_applied", "edits_failed", "wall_seconds"):
            v = s.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                metrics[metric_key(arm, key)] = float(v)
    parent.log_metrics(metrics, 0)
    paths = [os.path.join(out_dir, f) for f in ("comparison.txt", "comparison.md", "comparison.png", "summary.json")]
    for path, markdown in zip(paths[:2], (False, True), strict=True):
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(comparison_table(results, markdown=markdown) + "\n")
    plot_comparison(results, paths[2], f"{name}: end-of-stream metrics")
    write_json(paths[3], {"name": name, "parent_run_id": getattr(parent, "run_id", ""), "arms": dict(results)})
    for path in paths:
        parent.log_artifact(path, "comparison")

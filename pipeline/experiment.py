"""One experiment = prepared data + one or more edit streams ("arms"), tracked as nested MLflow runs.

    results = run_experiment(cfg, {"base": ["odedit.enabled=false"], "odedit": []}, name="demo")

Used by the thin jobs (`jobs/lifelong.py`, `jobs/edit.py`, `jobs/demo.py`): prepares (cached), opens a
parent run when there are several arms, runs each arm's stream on Ray Train, and returns per-arm summaries.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from odedit.config import Config
from odedit.loading import with_overrides
from pipeline.cluster.session import ray_session
from pipeline.prepare import log_quarantine, prepare
from pipeline.reporting.tracking import open_tracker
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
            parent = open_tracker(cfg, name, tags={"odedit.kind": "comparison"})
            parent.log_params({"arms": list(arms), **run_info(cfg)})
        results: dict[str, Any] = {}
        for arm, overrides in arms.items():
            arm_cfg = with_overrides(cfg, list(overrides)) if overrides else cfg
            run_name = arm_cfg.stream.run_name or (f"{name}-{arm}" if arm else default_run_name(arm_cfg))
            tracker = open_tracker(
                arm_cfg,
                run_name,
                parent_run_id=getattr(parent, "run_id", None) or None,
                outbox_dir=os.path.join(arm_cfg.output_dir, "runs", run_name),
            )
            tracker.log_params({**run_info(arm_cfg), "arm": arm or run_name})
            log_quarantine(tracker, prep)
            summary = run_stream(
                arm_cfg, model_path, tracker, run_name, num_edits=num_edits, offset=offset, progress=progress
            )
            summary["arm"] = arm or run_name
            tracker.set_terminated("FINISHED")
            results[arm or run_name] = summary
        if parent is not None:
            parent.set_terminated("FINISHED")
        return {"results": results, "prepare": prep, "parent_run_id": getattr(parent, "run_id", "")}

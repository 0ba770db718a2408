"""pipeline.experiment's run metadata: the code version under `ray job submit` and in a checkout."""

from __future__ import annotations

import json
import subprocess

from pipeline.experiment import COMMIT_ENV, code_version
from pipeline.storage.root import ray_package_dir


def test_the_submitted_commit_is_recorded(monkeypatch):
    monkeypatch.setenv(COMMIT_ENV, "0123abc-dirty")
    assert code_version()["git_commit"] == "0123abc-dirty"


def test_a_checkout_reads_its_own_commit(monkeypatch):
    monkeypatch.delenv(COMMIT_ENV, raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    info = code_version()
    assert ray_package_dir() is None and "code_package" not in info
    assert info["git_commit"] == (head or "unknown")


def test_the_comparison_run_holds_the_comparison(tmp_path):
    """Issue 19 item 12: the parent run of several arms has their metrics, the table, the plot and the summary."""
    from mlflow.tracking import MlflowClient

    from odedit.loading import load_config
    from pipeline.experiment import comparison_dir, log_comparison
    from pipeline.reporting.tracking import open_run_tracker, tracked

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = load_config(None, [f"output_dir={tmp_path}", f"tracking.uri={uri}", "tracking.experiment=t"])
    results = {
        "lora": {"rel": 0.5, "t_gen": 0.25, "m_loc": float("nan"), "edits_applied": 8, "wall_seconds": 3.0},
        "lora+odedit": {"rel": 0.75, "t_gen": 0.5, "m_loc": 0.9, "edits_applied": 8, "wall_seconds": 4.0},
    }
    with tracked(open_run_tracker(cfg, comparison_dir(cfg, "demo"), "demo", resume=False)) as parent:
        log_comparison(parent, results, comparison_dir(cfg, "demo"), "demo")
    client = MlflowClient(uri)
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["lora/rel"] == 0.5 and run.data.metrics["lora_odedit/m_loc"] == 0.9
    assert "lora/m_loc" not in run.data.metrics  # not scored: no made-up number
    names = sorted(a.path for a in client.list_artifacts(parent.run_id, "comparison"))
    assert names == [f"comparison/{f}" for f in ("comparison.md", "comparison.png", "comparison.txt", "summary.json")]
    summary = json.loads((tmp_path / "runs" / "demo" / "summary.json").read_text())
    assert summary["parent_run_id"] == parent.run_id and summary["arms"]["lora+odedit"]["rel"] == 0.75

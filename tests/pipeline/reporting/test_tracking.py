"""MLflow tracking: nested runs, and what happens when the tracking server is down (warn, outbox, sync)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from odedit.loading import load_config
from pipeline.reporting.tracking import OUTBOX, open_tracker, replay_outbox


def _cfg(tmp_path, uri):
    return load_config(None, [f"output_dir={tmp_path}", f"tracking.uri={uri}", "tracking.experiment=t"])


def test_nested_runs_params_metrics_artifacts(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = _cfg(tmp_path, uri)
    parent = open_tracker(cfg, "parent")
    child = open_tracker(cfg, "child", parent_run_id=parent.run_id)
    child.log_params({"a.b": 1, "lst": [1, 2]})
    child.log_metrics({"rel": 0.5}, step=3)
    art = tmp_path / "x.json"
    art.write_text("{}")
    child.log_artifact(str(art), "results")
    client = MlflowClient(uri)
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.params == {"a.b": "1", "lst": "[1, 2]"} and run.data.metrics == {"rel": 0.5}
    assert [a.path for a in client.list_artifacts(child.run_id, "results")] == ["results/x.json"]
    lines = [json.loads(x) for x in (tmp_path / OUTBOX).read_text().splitlines()]
    assert all(line["sent"] for line in lines)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_at_start_runs_offline_then_syncs(tmp_path, record_outcome):
    from mlflow.tracking import MlflowClient

    cfg = _cfg(tmp_path, f"http://127.0.0.1:{_closed_port()}")
    with pytest.warns(RuntimeWarning, match="unreachable"):
        tracker = open_tracker(cfg, "offline-run")
    assert tracker.run_id.startswith("offline-")
    tracker.log_params({"seed": 0})
    tracker.log_metrics({"rel": 0.25}, step=1)
    tracker.log_metrics({"rel": 0.75}, step=2)
    outbox = tmp_path / OUTBOX
    uri = f"sqlite:///{tmp_path / 'later.db'}"
    counts = replay_outbox(str(outbox), uri)
    assert counts["create"] == 1 and counts["metrics"] == 2
    again = replay_outbox(str(outbox), uri)  # nothing new: nothing sent twice
    assert again["create"] == 0 and again["metrics"] == 0
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "offline-run"
    assert runs[0].data.params == {"seed": "0"}
    history = client.get_metric_history(runs[0].info.run_id, "rel")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.25), (2, 0.75)]
    record_outcome(
        "fault",
        "MLflow server unreachable when the run starts",
        "warning; run recorded offline in the outbox; `jobs.sync_mlflow` creates it later, once",
        f"replayed {counts}",
    )


@pytest.mark.slow
def test_server_dies_mid_run_results_stay_on_disk_and_sync_later(tmp_path, record_outcome):
    from mlflow.tracking import MlflowClient

    port = _closed_port()
    store = f"sqlite:///{tmp_path / 'server.db'}"

    def start():
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backend-store-uri",
                store,
                "--default-artifact-root",
                str(tmp_path / "art"),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                return proc
            except OSError:
                time.sleep(0.5)
        proc.kill()
        pytest.fail("mlflow server did not start")

    server = start()
    uri = f"http://127.0.0.1:{port}"
    try:
        tracker = open_tracker(_cfg(tmp_path, uri), "survivor")
        tracker.log_metrics({"rel": 0.1}, step=1)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    with pytest.warns(RuntimeWarning, match="jobs.sync_mlflow"):
        tracker.log_metrics({"rel": 0.2}, step=2)
    tracker.log_metrics({"rel": 0.3}, step=3)  # the tracker does not retry for a while: no stall, no warning
    lines = [json.loads(x) for x in (tmp_path / OUTBOX).read_text().splitlines()]
    assert [(x["step"], x["sent"]) for x in lines if x["kind"] == "metrics"] == [(1, True), (2, False), (3, False)]

    server = start()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "jobs.sync_mlflow", str(tmp_path / OUTBOX)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        history = MlflowClient(uri).get_metric_history(tracker.run_id, "rel")
        assert sorted((m.step, m.value) for m in history) == [(1, 0.1), (2, 0.2), (3, 0.3)]
        record_outcome(
            "fault",
            "MLflow server killed during a run",
            "one warning, no stall; records kept in the outbox; synced after restart, nothing lost",
            "metrics at steps 2-3 logged while down appear after `python -m jobs.sync_mlflow`",
        )
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_a_sqlite_stores_artifacts_sit_beside_it(tmp_path):
    from pipeline.reporting.tracking import artifact_location, ensure_experiment

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    assert artifact_location(uri) == (tmp_path / "store" / "mlartifacts").as_uri()
    assert artifact_location("http://127.0.0.1:5000") is None  # a server decides for itself
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(uri).get_experiment(ensure_experiment(uri, "beside"))
    assert exp.artifact_location == (tmp_path / "store" / "mlartifacts").as_uri()

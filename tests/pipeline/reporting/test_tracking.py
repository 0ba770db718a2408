"""MLflow tracking: nested runs, and what happens when the tracking server is down (warn, outbox, sync)."""

from __future__ import annotations

import json
import os
import shutil
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


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """A migrated, empty sqlite store, made once: each test copies it (migrating a new store takes seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "empty.db"
    MlflowClient(f"sqlite:///{path}")
    return path


@pytest.fixture
def store_uri(tmp_path, empty_store):
    """`store_uri(relative path)`: a copy of the empty store there, as a sqlite URI."""

    def make(name="m.db"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(empty_store, tmp_path / name)
        return f"sqlite:///{tmp_path / name}"

    return make


def test_nested_runs_params_metrics_artifacts(tmp_path, store_uri):
    from mlflow.tracking import MlflowClient

    uri = store_uri()
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


def test_server_down_at_start_runs_offline_then_syncs(tmp_path, store_uri, record_outcome):
    from mlflow.tracking import MlflowClient

    cfg = _cfg(tmp_path, f"http://127.0.0.1:{_closed_port()}")
    with pytest.warns(RuntimeWarning, match="unreachable"):
        tracker = open_tracker(cfg, "offline-run")
    assert tracker.run_id.startswith("offline-")
    tracker.log_params({"seed": 0})
    tracker.log_metrics({"rel": 0.25}, step=1)
    tracker.log_metrics({"rel": 0.75}, step=2)
    outbox = tmp_path / OUTBOX
    uri = store_uri("later.db")
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


def test_a_sqlite_stores_artifacts_sit_beside_it(tmp_path, store_uri):
    from pipeline.reporting.tracking import artifact_location, ensure_experiment

    uri = store_uri("store/mlflow.db")
    assert artifact_location(uri) == (tmp_path / "store" / "mlartifacts").as_uri()
    assert artifact_location("http://127.0.0.1:5000") is None  # a server decides for itself
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(uri).get_experiment(ensure_experiment(uri, "beside"))
    assert exp.artifact_location == (tmp_path / "store" / "mlartifacts").as_uri()


# ---------------------------------------------------------------------------------------------- issue 19, 9-11


def _runs(uri, experiment="t"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


@pytest.mark.parametrize("damage", ["garbage", "directory"])
def test_a_corrupt_or_unreadable_store_never_stops_the_stream(tmp_path, damage, record_outcome):
    from pipeline.reporting.tracking import attach_tracker

    store = tmp_path / "m.db"
    if damage == "garbage":
        store.write_bytes(b"this is not a sqlite database\n" * 200)
    else:
        store.mkdir()  # a path that cannot be opened as a database
    cfg = _cfg(tmp_path, f"sqlite:///{store}")
    with pytest.warns(RuntimeWarning, match="unreachable"):
        tracker = open_tracker(cfg, "on-a-broken-store")  # used to raise right after this warning
    assert tracker.run_id.startswith("offline-")
    tracker.log_params({"seed": 0})
    tracker.log_metrics({"rel": 0.5}, step=1)
    tracker.set_terminated("FINISHED")
    worker = attach_tracker(cfg, "0123456789abcdef", str(tmp_path / "run"))  # rank 0 on a store broken since
    with pytest.warns(RuntimeWarning, match="jobs.sync_mlflow"):
        worker.log_metrics({"rel": 0.5}, step=1)
    kinds = [json.loads(x)["kind"] for x in (tmp_path / OUTBOX).read_text().splitlines()]
    assert kinds == ["create", "params", "metrics", "terminate"]
    record_outcome(
        "fault",
        f"sqlite MLflow store {'corrupt' if damage == 'garbage' else 'unreadable (a directory)'}",
        "one warning; the run continues offline into its outbox; nothing raises (driver or rank 0)",
        f"outbox records: {kinds}",
    )


_CREATE_AT_ONCE = """
import os, sys, time, types
from pipeline.reporting.tracking import open_tracker
import mlflow.tracking  # imported before the start: both processes reach the store together
out, name = sys.argv[1], sys.argv[2]
cfg = types.SimpleNamespace(
    output_dir=out,
    tracking=types.SimpleNamespace(enabled=True, uri=f"sqlite:///{out}/m.db", experiment="t"),
)
open(f"{out}/ready-{name}", "w").close()
while not os.path.exists(f"{out}/go"):
    time.sleep(0.001)
tracker = open_tracker(cfg, "job-" + name, outbox_dir=f"{out}/{name}")
tracker.log_metrics({"rel": 1.0}, 1)
print(tracker.run_id)
"""


def test_two_jobs_creating_one_store_at_once_both_track(tmp_path, record_outcome):
    procs = [
        subprocess.Popen(
            [sys.executable, "-W", "error::RuntimeWarning", "-c", _CREATE_AT_ONCE, str(tmp_path), n],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in ("a", "b")
    ]
    while not all((tmp_path / f"ready-{n}").exists() or p.poll() is not None for n, p in zip("ab", procs)):
        time.sleep(0.01)
    (tmp_path / "go").touch()  # both have imported MLflow: they open the new store at the same moment
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in outs]
    ids = sorted(out.strip().splitlines()[-1] for out, _ in outs)
    assert not any(i.startswith("offline-") for i in ids), ids  # neither fell back to offline
    _, runs = _runs(f"sqlite:///{tmp_path / 'm.db'}")
    assert sorted(r.info.run_id for r in runs) == ids
    record_outcome(
        "fault",
        "two jobs create one sqlite MLflow store at the same moment (schema migration race)",
        "both track into it: store creation serialised by a lock file; neither crashes nor goes offline",
        f"{len(runs)} runs in the new store",
    )


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_resumed_stream_continues_its_run_and_logs_each_step_once(tmp_path, store_uri, record_outcome):
    from pipeline.reporting.tracking import RUN_RECORD, RunTracker, attach_tracker, bind_tracker, tracked

    uri = store_uri()
    cfg = _cfg(tmp_path, uri)
    run_dir = tmp_path / "storage" / "stream"
    # Job 1: the driver's tracker opens in the run directory; rank 0 logs steps 1-3; then the driver is killed.
    first = bind_tracker(RunTracker(cfg, "stream"), str(run_dir))
    first.log_params({"seed": 0, "git_commit": "aaa"})
    rank0 = attach_tracker(cfg, first.run_id, str(run_dir))
    for step in (1, 2, 3):
        rank0.log_metrics({"rel": step / 10}, step)
    # A worker restart inside job 1 re-applies steps 2-3 from the checkpoint: logged once, not twice.
    restarted = attach_tracker(cfg, first.run_id, str(run_dir))
    for step in (2, 3, 4):
        restarted.log_metrics({"rel": step / 10}, step)
    client, _ = _runs(uri)
    assert _history(client, first.run_id, "rel") == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    assert client.get_run(first.run_id).info.status == "RUNNING"  # killed: nobody marked it

    # Job 2 resumes the stream: the same MLflow run, RUNNING again; the re-applied step 4 is not doubled.
    second = RunTracker(cfg, "stream")
    second.log_params({"seed": 0, "git_commit": "bbb"})  # before bind: kept, sent once bound
    bind_tracker(second, str(run_dir))
    assert second.run_id == first.run_id
    assert json.loads((run_dir / RUN_RECORD).read_text())["run_id"] == first.run_id
    rank0 = attach_tracker(cfg, second.run_id, str(run_dir))
    with pytest.raises(RuntimeError), tracked(second):
        for step in (4, 5):
            rank0.log_metrics({"rel": step / 10}, step)
        raise RuntimeError("the stream failed")
    _, runs = _runs(uri)
    assert len(runs) == 1, "a resume opens no second run"
    run = runs[0]
    assert run.info.status == "FAILED"
    assert run.data.params["git_commit"] == "aaa"  # MLflow params cannot change: the change is noted
    assert run.data.tags["odedit.params_changed_on_resume"] == "git_commit"
    assert _history(client, run.info.run_id, "rel") == [(s, s / 10) for s in (1, 2, 3, 4, 5)]
    assert [p.name for p in run_dir.iterdir() if p.name.endswith(".jsonl")] == [OUTBOX], "one outbox per run"

    # A stream that stops before its run directory is claimed opens no run (nothing left RUNNING).
    with pytest.raises(ValueError), tracked(RunTracker(cfg, "never-bound")) as unbound:
        unbound.log_params({"seed": 1})
        raise ValueError("settings differ")
    assert len(_runs(uri)[1]) == 1
    record_outcome(
        "fault",
        "stream killed, then resumed; workers restarted inside a job; a stream that fails",
        "one MLflow run per stream: the resume continues it, re-applied steps are not logged twice, "
        "failure marked FAILED",
        "metric history steps 1-5 once each after two re-applies",
    )


def test_the_next_job_on_a_run_directory_marks_its_dead_run_killed(tmp_path, store_uri, record_outcome):
    from pipeline.reporting.tracking import open_run_tracker, tracked

    uri = store_uri()
    cfg = _cfg(tmp_path, uri)
    where = str(tmp_path / "runs" / "demo")
    dead = open_run_tracker(cfg, where, "demo", resume=False)  # its driver is killed: it stays RUNNING
    with pytest.raises(KeyboardInterrupt), tracked(open_run_tracker(cfg, where, "demo", resume=False)) as nxt:
        raise KeyboardInterrupt
    client, runs = _runs(uri)
    status = {r.info.run_id: r.info.status for r in runs}
    assert status == {dead.run_id: "KILLED", nxt.run_id: "KILLED"}  # marked by the next job / interrupted
    record_outcome(
        "fault",
        "driver killed outright (no chance to mark its MLflow run)",
        "the next job on the same run directory marks the run KILLED; an interrupted job marks its own KILLED",
        f"statuses: {sorted(status.values())}",
    )


def test_driver_and_rank0_share_one_outbox_replayed_into_one_run(tmp_path, store_uri, record_outcome, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the closed port: fail at once

    from pipeline.reporting.tracking import RunTracker, attach_tracker, bind_tracker, replay_outboxes

    cfg = _cfg(tmp_path, f"http://127.0.0.1:{_closed_port()}")
    parent_dir, run_dir = tmp_path / "runs" / "demo", tmp_path / "storage" / "demo-arm"
    with pytest.warns(RuntimeWarning, match="unreachable"):
        parent = bind_tracker(RunTracker(cfg, "demo"), str(parent_dir))
        driver = bind_tracker(RunTracker(cfg, "demo-arm", parent_run_id=parent.run_id), str(run_dir))
    assert parent.run_id.startswith("offline-") and driver.run_id.startswith("offline-")
    driver.log_params({"seed": 0})
    rank0 = attach_tracker(cfg, driver.run_id, str(run_dir))
    rank0.log_metrics({"rel": 0.5}, 1)
    driver.set_terminated("FINISHED")
    assert sorted(p.name for p in run_dir.iterdir() if p.name.endswith(".jsonl")) == [OUTBOX]
    # An older layout: the driver's records in one outbox, rank 0's in another, both of the same offline run.
    legacy = tmp_path / "old" / "legacy"
    (legacy / "driver").mkdir(parents=True)
    (legacy / "rank0").mkdir()
    lines = (run_dir / OUTBOX).read_text().splitlines()
    metrics = [x for x in lines if json.loads(x)["kind"] == "metrics"]
    (legacy / "rank0" / OUTBOX).write_text("\n".join(metrics) + "\n")
    (legacy / "driver" / OUTBOX).write_text("\n".join(x for x in lines if x not in metrics) + "\n")
    (legacy / "driver" / OUTBOX).open("a").write('{"kind": "metr\n')  # a line torn by a kill is skipped

    for roots, name in (([parent_dir, run_dir], "now"), ([legacy], "legacy")):
        uri = store_uri(f"{name}.db")
        counts = replay_outboxes([str(r) for r in roots], uri)
        client = MlflowClient(uri)
        runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("t").experiment_id])}
        arm = runs["demo-arm"]
        assert arm.data.params == {"seed": "0"} and arm.data.metrics == {"rel": 0.5}, name  # one run, both halves
        assert arm.info.status == "FINISHED"
        if name == "now":
            assert arm.data.tags["mlflow.parentRunId"] == runs["demo"].info.run_id  # nested under its parent
    assert counts["unreadable"] == 1
    record_outcome(
        "fault",
        "MLflow down for a whole stream: driver and rank 0 both log offline",
        "one outbox per run; one replay gives one run with params and metrics, nested under its parent "
        "(older split outboxes merged by one shared replay)",
        f"legacy replay: {counts}",
    )


def test_an_offline_run_resumed_once_mlflow_is_back_is_synced_and_continued(tmp_path, store_uri):
    from pipeline.reporting.tracking import RunTracker, bind_tracker

    store = tmp_path / "m.db"
    store.write_bytes(b"broken" * 100)
    cfg = _cfg(tmp_path, f"sqlite:///{store}")
    with pytest.warns(RuntimeWarning):
        first = bind_tracker(RunTracker(cfg, "stream"), str(tmp_path / "run"))
    first.log_metrics({"rel": 0.1}, 1)
    store_uri("m.db")  # the store is repaired; the stream is resumed
    second = bind_tracker(RunTracker(cfg, "stream"), str(tmp_path / "run"))
    assert not second.run_id.startswith("offline-")
    second.log_metrics({"rel": 0.1}, 1)  # re-applied: already in the run (as the offline record)
    second.log_metrics({"rel": 0.2}, 2)
    client, runs = _runs(f"sqlite:///{store}")
    assert [r.info.run_id for r in runs] == [second.run_id]
    assert _history(client, second.run_id, "rel") == [(1, 0.1), (2, 0.2)]

"""The cluster path on a simulated multi-node cluster: a head and two worker nodes as separate `ray start`
process trees, each with its own scratch directory, sharing only the storage root, with an MLflow server on the
head (pipeline.cluster.local).

* a lifelong job submitted with `python -m jobs.submit` (`ray job submit --working-dir`) runs its two workers on
  the two worker nodes, writes everything under the storage root and nothing into Ray's package folder or a
  node's scratch, records the submitting checkout's commit, and its MLflow runs are readable through the head
  server's REST API after the job;
* a worker node killed mid-stream (its raylet, agents and workers at once): the stream resumes on the remaining
  nodes from the last checkpoint, every edit in the ledger exactly once, final metrics equal to the
  uninterrupted run with the same seed;
* a client without the cluster's token is refused.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest
import yaml

from bench.synthetic import write_evqa_split
from jobs.submit import git_commit
from odedit.metrics import HEADLINE
from pipeline.cluster.local import LocalCluster, free_port
from pipeline.train.checkpoints import RunStore

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
EDITS = 8  # 4 steps of 2; the node is killed after the second
METRIC_TOL = 1e-6
WRITTEN = ("outputs", "mlruns", ".cache", "mlflow.db", "mlartifacts")


@pytest.fixture(scope="module")
def cluster():
    scratch = tempfile.mkdtemp(prefix="odc-", dir="/tmp")  # short: Ray's socket paths live under it
    c = LocalCluster(scratch=scratch, storage_root=os.path.join(scratch, "shared"), head_cpus=1, worker_cpus=2)
    mlflow = None
    try:
        c.start(workers=2)
        port = free_port()
        store = os.path.join(c.storage_root, "mlflow")
        os.makedirs(store, exist_ok=True)
        log = open(os.path.join(scratch, "mlflow.log"), "w")  # noqa: SIM115 (the server's log, closed below)
        mlflow = subprocess.Popen(
            [
                os.path.join(os.path.dirname(sys.executable), "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{store}/mlflow.db",
                "--artifacts-destination",
                os.path.join(store, "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or mlflow.poll() is not None:
                    pytest.fail(f"the MLflow server did not start; see {scratch}/mlflow.log")
                time.sleep(1)
        yield c, uri
    finally:
        if mlflow is not None:
            mlflow.terminate()
            mlflow.wait(timeout=30)
        c.stop()
        c.remove_scratch()


@pytest.fixture(scope="module")
def job_config(cluster, tiny_dir, tmp_path_factory):
    c, uri = cluster
    inputs = tmp_path_factory.mktemp("inputs")
    paths = write_evqa_split(str(inputs / "world"), n=EDITS, min_side=24, max_side=48, seed=4)

    def write(name: str) -> str:
        config = {
            "model": {"family": "llava", "name_or_path": tiny_dir("llava")},
            "data": {"source": "mmedit", "path": paths["path"], "image_root": paths["image_root"]},
            "method": {"name": "ft", "lr": 0.05, "n_iter": 3},
            "odedit": {"enabled": False},
            "stream": {
                "mode": "sequential",
                "batch_size": 2,
                "eval_every": 4,
                "checkpoint_every": 1,
                "run_name": name,
                "generation_eval": False,
            },
            "resources": {
                "num_workers": 2,
                "cpus_per_worker": 1,
                "placement_strategy": "SPREAD",
                "zero_stage": 2,
                "max_failures": 2,
            },
            "tracking": {"uri": uri, "experiment": "multinode"},
            "output_dir": "outputs/multinode",  # relative: resolves under the storage root
            "seed": 0,
        }
        path = inputs / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return str(path)

    return write


def submit(c: LocalCluster, config_path: str) -> subprocess.CompletedProcess:
    env = dict(c.env(), RAY_AUTH_MODE="token")
    env.pop("ODEDIT_STORAGE_ROOT")  # the job gets it from jobs.submit, as from a laptop
    for _ in range(10):  # a fresh head may not have its job agent up yet (HTTP 500 "No available agent")
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.submit", "--address", c.address, "--storage-root", c.storage_root, "--"]
            + ["python", "-m", "jobs.lifelong", "--config", config_path],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if "No available agent" not in proc.stderr:
            return proc
        time.sleep(10)
    return proc


def run_dir(c: LocalCluster, name: str) -> str:
    return os.path.join(c.storage_root, "outputs", "multinode", "storage", name)


def summary_of(c: LocalCluster, name: str) -> dict:
    with open(os.path.join(run_dir(c, name), "results", "summary.json"), encoding="utf-8") as fh:
        return json.load(fh)


def ledger_of(c: LocalCluster, name: str) -> list[dict]:
    with open(os.path.join(run_dir(c, name), "results", "ledger.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def nodes_of(c: LocalCluster) -> dict[str, bool]:
    """{node id: is head} of the alive nodes, from the head's GCS."""
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "list", "nodes", "--address", c.address]
        + ["--format", "json"],
        env=c.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return {n["node_id"]: bool(n["is_head_node"]) for n in json.loads(out.stdout) if n["state"] == "ALIVE"}


def rest(uri: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{uri}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_a_submitted_job_spans_the_worker_nodes_and_writes_only_under_the_storage_root(cluster, job_config):
    c, uri = cluster
    workers = {node for node, head in nodes_of(c).items() if not head}
    assert len(workers) == 2
    proc = submit(c, job_config("reference"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "summary:" in proc.stdout and c.storage_root in proc.stdout

    # both worker nodes ran a worker (SPREAD), none ran on the head
    assert set(RunStore(run_dir(c, "reference")).worker_nodes().values()) == workers
    summary = summary_of(c, "reference")
    assert summary["edits_applied"] == EDITS and summary["edits_failed"] == 0
    out = os.path.join(c.storage_root, "outputs", "multinode")
    assert os.path.isfile(os.path.join(out, "summary.json")) and os.path.isdir(os.path.join(out, "shards"))

    # nothing in Ray's copies of the working directory nor anywhere else in a node's scratch
    for name in c.nodes:
        scratch = os.path.join(c.scratch, name)
        for pkg in glob.glob(os.path.join(scratch, "session_*", "runtime_resources", "*", "_ray_pkg_*")):
            for written in WRITTEN:
                assert not os.path.exists(os.path.join(pkg, written)), f"{written} in {pkg}"
        for written in ("outputs", "summary.json", "ledger.jsonl", "rows.parquet"):
            assert not glob.glob(os.path.join(scratch, "**", written), recursive=True), f"{written} in {scratch}"

    # the head's MLflow server kept the run: read back through its REST API, with the submitter's commit
    exp = json.loads(
        urllib.request.urlopen(
            f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=multinode", timeout=30
        ).read()
    )["experiment"]
    runs = rest(uri, "runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
        run_id = json.load(fh)["runs"]["reference"]["mlflow_run_id"]
    run = next(r for r in runs if r["info"]["run_id"] == run_id)
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert params["git_commit"] == git_commit(ROOT) and params["code_package"].startswith("_ray_pkg_")
    assert "final/rel" in metrics and run["info"]["status"] == "FINISHED"


def test_a_worker_node_killed_mid_stream_resumes_on_the_others(cluster, job_config, record_outcome):
    c, _ = cluster
    name = "node-killed"
    store = RunStore(run_dir(c, name))
    killed: dict = {}
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set():
            p = store.read_progress() if os.path.isdir(store.run_dir) else None
            if p and p["done"] >= 4:
                killed["at"] = p["done"]
                killed["processes"] = c.kill_node("w2")
                return
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        proc = submit(c, job_config(name))
    finally:
        stop.set()
        thread.join()
    assert killed, "the node was killed mid-stream"
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert killed["at"] < EDITS and killed["processes"] >= 2

    ledger = ledger_of(c, name)
    ids = [e["edit_id"] for e in ledger]
    assert len(ids) == len(set(ids)) == EDITS, "every edit exactly once"
    assert ids == [e["edit_id"] for e in ledger_of(c, "reference")]
    ref, got = summary_of(c, "reference")["final"], summary_of(c, name)["final"]
    for m in HEADLINE:
        a, b = ref.get(m), got.get(m)
        assert (a is None and b is None) or abs(a - b) <= METRIC_TOL, (m, a, b)
    record_outcome(
        "fault",
        "a worker node (raylet, agents, workers) killed mid-stream on a 3-node cluster",
        "the stream resumed on the remaining nodes from the last checkpoint; ledger and metrics equal an "
        "uninterrupted run",
        f"killed after {killed['at']} of {EDITS} edits ({killed['processes']} processes)",
        edits_lost=len({e["edit_id"] for e in ledger_of(c, "reference")} - set(ids)),
        applied_twice=len(ids) - len(set(ids)),
    )


def test_a_client_without_the_token_is_refused(cluster):
    c, _ = cluster
    env = {k: v for k, v in c.env().items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_MODE"] = "disabled"
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "list", "--address", c.address],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "auth" in (proc.stdout + proc.stderr).lower()

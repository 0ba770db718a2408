"""`python -m jobs.submit` of a tiny lifelong job to a local `ray start --head` with token authentication on,
and its command line.

Everything the job writes must land under the storage root it was given (nothing in Ray's package folder), with
the submitting checkout's git commit recorded. The head runs with `--block` in its own process group, so stopping
it touches no other Ray instance of the test session. The client authenticates with the token `ray start` wrote
(RAY_AUTH_MODE=token). The job's MLflow run must exist with metrics and artifacts afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import yaml

from bench.synthetic import write_evqa_split

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    port, dash = _free_port(), _free_port()
    # Every agent port is pinned to a free one: with defaults (52365 etc.) the head's dashboard agent cannot
    # bind while another Ray instance of the test session holds them, and job submission then fails with
    # "No available agent".
    agent_ports = []
    for flag in (
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--ray-client-server-port",
    ):
        agent_ports += [flag, str(_free_port())]
    env = dict(
        os.environ,
        RAY_USAGE_STATS_ENABLED="0",
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    )
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    proc = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus",
            "2",
            "--port",
            str(port),
            "--dashboard-port",
            str(dash),
            "--dashboard-host",
            "127.0.0.1",
            "--disable-usage-stats",
            *agent_ports,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # the dashboard answered (401 without the token): it is up
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"ray start --head exited with {proc.returncode}")
            time.sleep(1)
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:  # its own process group only: no other Ray instance is touched
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    # A head stopped without `ray stop` leaves Ray's session file behind; drop it when it is ours.
    from pipeline.cluster.session import SESSION_FILE, recorded_cluster

    if (recorded_cluster() or "").endswith(f":{port}"):
        os.remove(SESSION_FILE)
    log.close()


@pytest.mark.slow
def test_job_submit_runs_lifelong_and_logs_to_mlflow(head, tmp_path, tiny_dir):
    address, env = head
    paths = write_evqa_split(str(tmp_path / "world"), n=6, min_side=24, max_side=48, seed=2)
    shared = tmp_path / "shared"
    out = shared / "outputs" / "submitted"
    uri = f"sqlite:///{out / 'mlflow.db'}"  # the default store: under output_dir
    config = {
        "model": {"family": "llava", "name_or_path": tiny_dir("llava")},
        "data": {"source": "mmedit", "path": paths["path"], "image_root": paths["image_root"]},
        "method": {"name": "ft", "lr": 0.05, "n_iter": 3},
        "stream": {
            "mode": "sequential",
            "batch_size": 2,
            "eval_every": 2,
            "checkpoint_every": 1,
            "run_name": "submitted",
            "generation_eval": False,
        },
        "resources": {"num_workers": 1, "cpus_per_worker": 0.5, "zero_stage": 2},
        "tracking": {"experiment": "submit-test"},
        "output_dir": "outputs/submitted",  # relative: resolves under the storage root, not the package folder
    }
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(
        "# ray job submit --working-dir . -- python -m jobs.lifelong --config job.yaml\n" + yaml.safe_dump(config)
    )
    client_env = dict(env, RAY_AUTH_MODE="token")
    for _ in range(10):  # a freshly started head may not have its job agent up yet (HTTP 500 "No available agent")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "jobs.submit",
                "--address",
                address,
                "--storage-root",
                str(shared),
                "--",
                "python",
                "-m",
                "jobs.lifelong",
                "--config",
                str(cfg_path),
            ],
            env=client_env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if "No available agent" not in proc.stderr:
            break
        time.sleep(10)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr

    summary = json.loads((out / "summary.json").read_text())
    run = summary["runs"]["submitted"]
    assert run["edits_applied"] == 6

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("submit-test")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run["mlflow_run_id"]]
    data = runs[0].data
    assert "final/rel" in data.metrics and "immediate/rel" in data.metrics
    assert data.params["method.name"] == "ft" and data.params["seed"] == "0"
    from jobs.submit import git_commit

    assert data.params["git_commit"] == git_commit(ROOT)  # read on the submitting side, passed to the job
    package = data.params["code_package"]
    assert package.startswith("_ray_pkg_")
    assert runs[0].info.artifact_uri.startswith((out / "mlartifacts").as_uri())  # beside the store
    # nothing was written into Ray's copy of the working directory
    import glob

    copies = glob.glob(os.path.join(tempfile.gettempdir(), "ray", "session_*", "runtime_resources", "*", package))
    assert copies, "the job's package folder was not found"
    for copy in copies:
        for name in ("outputs", "mlruns", ".cache", "mlflow.db"):
            assert not os.path.exists(os.path.join(copy, name)), f"{name} written into Ray's package folder {copy}"
    artifacts = {a.path for a in client.list_artifacts(run["mlflow_run_id"], "results")}
    assert {
        "results/summary.json",
        "results/rows.parquet",
        "results/retention.png",
        "results/metrics.png",
        "results/curve.json",
        "results/ledger.jsonl",
    } <= artifacts
    assert "config.yaml" in {a.path for a in client.list_artifacts(run["mlflow_run_id"])}


def test_unauthenticated_client_is_refused(head):
    address, env = head
    client_env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    client_env["RAY_AUTH_MODE"] = "disabled"
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "list", "--address", address],
        env=client_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "auth" in (proc.stdout + proc.stderr).lower()


def test_submit_passes_the_commit_and_the_storage_root_to_the_job():
    from jobs.submit import submit_command

    cmd = submit_command(
        ["python", "-m", "jobs.demo", "--config", "c.yaml"],
        address="http://h:8265",
        storage_root="/mnt/shared/odedit",
        commit="abc123-dirty",
    )
    i = cmd.index("--runtime-env-json")
    assert json.loads(cmd[i + 1]) == {
        "env_vars": {"ODEDIT_GIT_COMMIT": "abc123-dirty", "ODEDIT_STORAGE_ROOT": "/mnt/shared/odedit"}
    }
    assert cmd[1:3] == ["job", "submit"] and cmd[cmd.index("--working-dir") + 1] == ROOT
    assert cmd[cmd.index("--address") + 1] == "http://h:8265"
    assert cmd[cmd.index("--") + 1 :] == ["python", "-m", "jobs.demo", "--config", "c.yaml"]


def test_submit_reads_this_checkouts_commit():
    from jobs.submit import git_commit

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    assert git_commit(ROOT).removesuffix("-dirty") == head


def test_submit_refuses_a_relative_root_and_a_missing_command(capsys):
    from jobs.submit import cli

    assert cli(["--storage-root", "shared", "--", "python", "-m", "jobs.demo"]) == 2
    assert "absolute path" in capsys.readouterr().err
    assert cli(["--dry-run"]) == 2
    assert "no job command" in capsys.readouterr().err

"""Experiment tracking: a three-method tracker protocol, an MLflow implementation and a null one.

    tracker = open_tracker(cfg, run_name="lora+odedit", parent_run_id=parent)   # driver: creates the run
    tracker = attach_tracker(cfg, run_id)                                        # a worker: logs into it

Every record also goes to an append-only JSONL outbox in the run's local directory first, so results stay on
disk when the tracking server is down: the tracker warns once and carries on, and
`python -m jobs.sync_mlflow <outbox.jsonl>` replays the outbox into MLflow later (issue: MLflow down
during a run). The sqlite store lives under the output directory by default; clusters set
`tracking.uri` or `MLFLOW_TRACKING_URI` to their server. The client API (`MlflowClient` with explicit run
ids) is used throughout, so no global "active run" state leaks between runs, workers or threads.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from pipeline.storage.jsonio import write_json

log = logging.getLogger(__name__)

OUTBOX = "mlflow_outbox.jsonl"


class Tracker(Protocol):
    run_id: str

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, path: str, subdir: str | None = None) -> None: ...


class NullTracker:
    """Tracking switched off (or a non-zero rank): every call is a no-op."""

    run_id = ""

    def log_params(self, params: Mapping[str, Any]) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        return None

    def log_artifact(self, path: str, subdir: str | None = None) -> None:
        return None

    def set_terminated(self, status: str = "FINISHED") -> None:
        return None


def tracking_uri(cfg: Any) -> str:
    """`tracking.uri`, else `$MLFLOW_TRACKING_URI`, else sqlite under the output directory."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + os.path.abspath(os.path.join(cfg.output_dir, "mlflow.db"))


def _flat_params(params: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in params.items():
        text = json.dumps(v) if isinstance(v, (list, dict, tuple)) else str(v)
        out[k] = text[:6000]  # MLflow caps param values
    return out


# Bound how long one tracking call may block when the server is down (MLflow's defaults retry for minutes);
# users can still set these variables themselves.
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def _bound_http_retries() -> None:
    for key, value in HTTP_ENV.items():
        os.environ.setdefault(key, value)


OFFLINE_PREFIX = "offline-"
RETRY_AFTER_S = 60.0  # after a failure, the server is not asked again for this long (records go to the outbox)


class MLflowTracker:
    """Logs into one MLflow run by id, with a local outbox that survives a server outage.

    Every record is appended to the outbox first. When the server fails, the tracker warns once, stops asking
    it for `RETRY_AFTER_S` seconds (so a stream never stalls on connection retries) and tries again later.
    A run id starting with `offline-` means the server was down when the run was created: everything stays in
    the outbox, and `jobs.sync_mlflow` creates the run when it replays.
    """

    def __init__(
        self,
        uri: str,
        run_id: str,
        outbox_dir: str,
        experiment: str = "",
        run_name: str = "",
        tags: Mapping[str, str] | None = None,
    ) -> None:
        from mlflow.tracking import MlflowClient

        _bound_http_retries()
        self.uri = uri
        self.run_id = run_id
        self.client = MlflowClient(uri)
        os.makedirs(outbox_dir, exist_ok=True)
        self.outbox = os.path.join(outbox_dir, OUTBOX)
        self._warned = False
        self._down_until = float("inf") if run_id.startswith(OFFLINE_PREFIX) else 0.0
        if run_id.startswith(OFFLINE_PREFIX):
            self._record("create", {"experiment": experiment, "run_name": run_name, "tags": dict(tags or {})})

    def _record(self, kind: str, payload: dict, sent: bool = False) -> None:
        with open(self.outbox, "a", encoding="utf-8") as fh:
            fh.write(
                json.dumps(
                    {
                        "kind": kind,
                        "run_id": self.run_id,
                        "uri": self.uri,
                        "time": time.time(),
                        "sent": sent,
                        **payload,
                    },
                    default=str,
                )
                + "\n"
            )

    def _call(self, fn, *args: Any, **kwargs: Any) -> bool:
        """Call the server unless it is known to be down; True when the call went through."""
        if time.monotonic() < self._down_until:
            return False
        try:
            fn(*args, **kwargs)
            return True
        except Exception as exc:  # a tracking outage must never kill an edit stream
            self._down_until = time.monotonic() + RETRY_AFTER_S
            if not self._warned:
                warnings.warn(
                    f"MLflow at {self.uri} is unreachable ({type(exc).__name__}: {exc}); results stay "
                    f"on disk in {self.outbox}; replay them later with `python -m jobs.sync_mlflow "
                    f"{self.outbox}`",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned = True
            return False

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flat_params(params)
        items = [Param(k, v) for k, v in flat.items()]
        sent = all(
            [
                self._call(self.client.log_batch, self.run_id, params=items[i : i + 100])
                for i in range(0, len(items), 100)
            ]
        )
        self._record("params", {"params": flat}, sent)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        clean = {k: float(v) for k, v in metrics.items()}
        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, step) for k, v in clean.items()]
        sent = all(
            [
                self._call(self.client.log_batch, self.run_id, metrics=items[i : i + 500])
                for i in range(0, len(items), 500)
            ]
        )
        self._record("metrics", {"metrics": clean, "step": step, "ts": ts}, sent)

    def log_artifact(self, path: str, subdir: str | None = None) -> None:
        sent = self._call(self.client.log_artifact, self.run_id, path, subdir)
        self._record("artifact", {"path": os.path.abspath(path), "subdir": subdir}, sent)

    def set_terminated(self, status: str = "FINISHED") -> None:
        sent = self._call(self.client.set_terminated, self.run_id, status)
        self._record("terminate", {"status": status}, sent)


def ensure_experiment(uri: str, name: str) -> str:
    """Create the experiment if needed (in the driver, before any worker logs: sqlite schema races)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri))


def artifact_location(uri: str) -> str | None:
    """Where a new experiment's artifacts go: beside a sqlite store (`<its folder>/mlartifacts`), not in
    `./mlruns` of whatever directory the process runs in; a server (http, databricks) decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    store = uri[len("sqlite:///") :]
    return Path(os.path.dirname(os.path.abspath(store)), "mlartifacts").as_uri()


def open_tracker(
    cfg: Any,
    run_name: str,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    outbox_dir: str | None = None,
):
    """Create a run (nested under `parent_run_id` when given) and return its tracker (NullTracker if off)."""
    if not cfg.tracking.enabled:
        return NullTracker()
    from mlflow.tracking import MlflowClient

    _bound_http_retries()
    uri = tracking_uri(cfg)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    try:
        exp_id = ensure_experiment(uri, cfg.tracking.experiment)
        run_id = MlflowClient(uri).create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
    except Exception as exc:  # the server is down: run offline into the outbox, sync later
        import uuid

        run_id = f"{OFFLINE_PREFIX}{uuid.uuid4().hex}"
        warnings.warn(
            f"MLflow at {uri} is unreachable ({type(exc).__name__}: {exc}); run {run_name!r} is "
            f"recorded offline in {os.path.join(outbox_dir or cfg.output_dir, OUTBOX)}; replay it "
            "with `python -m jobs.sync_mlflow <that file>`",
            RuntimeWarning,
            stacklevel=2,
        )
    return MLflowTracker(uri, run_id, outbox_dir or cfg.output_dir, cfg.tracking.experiment, run_name, all_tags)


def attach_tracker(cfg: Any, run_id: str, outbox_dir: str):
    """A tracker logging into an existing run (Ray Train rank 0); NullTracker when tracking is off."""
    if not cfg.tracking.enabled or not run_id:
        return NullTracker()
    return MLflowTracker(tracking_uri(cfg), run_id, outbox_dir)


def replay_outbox(path: str, uri: str | None = None) -> dict[str, int]:
    """Send every record of an outbox file to MLflow (to `uri`, or the URI recorded with each entry).

    Offline runs (created while the server was down) are created first. Progress (new run ids, lines
    replayed) is kept in `<outbox>.synced.json`, so a second replay sends only what was appended since.
    """
    from mlflow.tracking import MlflowClient

    counts = {"params": 0, "metrics": 0, "artifact": 0, "terminate": 0, "create": 0}
    clients: dict[str, Any] = {}
    mapping_path = f"{path}.synced.json"
    done = {"runs": {}, "lines": 0}
    if os.path.isfile(mapping_path):
        with open(mapping_path, encoding="utf-8") as fh:
            done = json.load(fh)
    mapping: dict[str, str] = done["runs"]
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    for number, line in enumerate(lines):
        if number < done["lines"]:
            continue
        rec = json.loads(line)
        target = uri or rec["uri"]
        client = clients.setdefault(target, MlflowClient(target))
        kind = rec["kind"]
        if kind == "create":
            if rec["run_id"] not in mapping:
                exp_id = ensure_experiment(target, rec["experiment"] or "odedit")
                mapping[rec["run_id"]] = client.create_run(
                    exp_id, run_name=rec["run_name"], tags=rec["tags"]
                ).info.run_id
            counts["create"] += 1
        elif not rec.get("sent"):  # records that went through when they were logged are not sent again
            _replay_record(client, mapping.get(rec["run_id"], rec["run_id"]), rec)
            counts[kind] = counts.get(kind, 0) + 1
        done["lines"] = number + 1
        write_json(mapping_path, done, indent=None)
    return counts


def _replay_record(client: Any, run_id: str, rec: dict) -> None:
    from mlflow.entities import Metric, Param

    kind = rec["kind"]
    if kind == "params":
        existing = client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in rec["params"].items() if k not in existing]
        if new:
            client.log_batch(run_id, params=new)
    elif kind == "metrics":
        ts = rec.get("ts", int(rec["time"] * 1000))
        client.log_batch(run_id, metrics=[Metric(k, v, ts, rec["step"]) for k, v in rec["metrics"].items()])
    elif kind == "artifact" and os.path.exists(rec["path"]):
        client.log_artifact(run_id, rec["path"], rec["subdir"])
    elif kind == "terminate":
        client.set_terminated(run_id, rec["status"])

"""Experiment tracking: a three-method tracker protocol, an MLflow implementation and a null one.

    tracker = open_tracker(cfg, run_name="lora+odedit", parent_run_id=parent)   # driver: creates the run
    tracker = attach_tracker(cfg, run_id)                                        # a worker: logs into it

Every record also goes to an append-only JSONL outbox in the run's local directory first, so results stay on
disk when the tracking server is down: the tracker warns once and carries on, and
`python -m jobs.sync_mlflow <outbox.jsonl>` replays the outbox into MLflow later (issue: MLflow down
during a run). The sqlite store lives under the output directory by default; clusters set
`tracking.uri` or `MLFLOW_TRACKING_URI` to their server. The client API (`MlflowClient` with explicit run
ids) is used throughout, so no global "active run" state leaks between runs, workers or threads.

What MLflow shows is what happened (issue 19, items 9-12):

* Tracking never stops a stream: the `MlflowClient` (which opens, creates or migrates a sqlite store) is built
  inside the guard, on first use, so a corrupt or unreadable store means "warn and continue offline", and the
  first creation of a sqlite store is serialised by a lock file beside it (`<store>.lock`): two jobs creating
  one store at once raced in MLflow's schema migration and one of them crashed.
* One outbox per run: a stream's tracker lives in its run directory (`RunTracker`, bound by the engine once
  the run directory is claimed), so the driver's and rank 0's records land in the same `mlflow_outbox.jsonl`;
  `jobs.sync_mlflow <dir>` replays every outbox under a directory with one shared map of offline run ids, so
  records of one run kept in several outboxes (older layouts) and nested offline runs end up in one run each.
* One MLflow run per stream: the run id is kept in `<run dir>/mlflow_run.json`; a resumed stream continues
  that run (status back to RUNNING) instead of opening a second one that would hold only the tail.
* A step is logged once: [INFERENCE] a tracker does not send a (metric, step) pair that this run's outbox
  already holds, so steps re-applied after a worker restart (bit-identical to the first time) do not add a
  second point to MLflow's append-only metric history; the first value stays.
* Honest status: `tracked()` marks a run FINISHED, FAILED (an exception) or KILLED (Ctrl-C); a driver
  killed outright cannot mark itself, so the next job on the same run directory marks any run of that
  directory still RUNNING as KILLED (tag `odedit.run_dir`), unless it is the run it resumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from pipeline.storage.jsonio import read_json, write_json

log = logging.getLogger(__name__)

OUTBOX = "mlflow_outbox.jsonl"
RUN_RECORD = "mlflow_run.json"  # in a stream's run directory: the MLflow run it logs into (issue 19 item 11)
RUN_DIR_TAG = "odedit.run_dir"


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
PARENT_TAG = "mlflow.parentRunId"


def _sqlite_path(uri: str) -> str | None:
    if not uri.startswith("sqlite:///"):
        return None
    return uri[len("sqlite:///") :].split("?", 1)[0]


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold `<store>.lock` (an exclusive `flock`) while a sqlite store is opened, created or migrated.

    MLflow creates and migrates a sqlite store's schema when a client first opens it; two jobs doing that at
    once raced (alembic `CommandError: Online migration expected to match one row ...`) and one of them died
    (issue 19 item 9). [INFERENCE] A lock file beside the store serialises the opening (and the creation of an
    experiment); a server (http) orders its own writes, so nothing is held for it. Not re-entrant.
    """
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.lock", "a", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_store(uri: str) -> None:
    """Fail fast on a sqlite store that is not a sqlite database (corrupt) or cannot be read: MLflow would retry
    opening it for about 100 s (`create_sqlalchemy_engine_with_retry`) before failing the same way."""
    path = _sqlite_path(uri)
    if path is None or not os.path.exists(path):
        return
    if not os.path.isfile(path):
        raise OSError(f"the sqlite store {path} is not a file")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head and head != b"SQLite format 3\x00":
        raise ValueError(f"the sqlite store {path} is not a sqlite database (corrupt?)")


def open_client(uri: str) -> Any:
    """An `MlflowClient` of `uri`, its store opened (created, migrated) under `store_lock`. May raise."""
    from mlflow.tracking import MlflowClient

    check_store(uri)
    with store_lock(uri):
        return MlflowClient(uri)


def _outbox_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.readlines()


def _end_torn_line(path: str) -> None:
    """A process killed in the middle of a line left it without its newline: end it, so that the next record
    starts a line of its own (the torn line is skipped on replay)."""
    try:
        with open(path, "rb+") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
    except FileNotFoundError:
        return


def _parse(line: str) -> dict | None:
    """One outbox record, or None for a line a kill tore in half (it is skipped, never fatal)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and "kind" in rec and "run_id" in rec else None


def _synced(outbox: str) -> dict[str, Any]:
    try:
        done = read_json(f"{outbox}.synced.json", default=None)
    except (OSError, ValueError):
        done = None
    return done if isinstance(done, dict) else {"runs": {}, "lines": 0}


class MLflowTracker:
    """Logs into one MLflow run by id, with a local outbox that survives a server outage.

    Every record is appended to the outbox (one `write` per line, so two processes appending to one run's outbox
    never interleave). When the server fails, or the store cannot be opened at all, the tracker warns once,
    stops asking it for `RETRY_AFTER_S` seconds (so a stream never stalls on connection retries) and tries
    again later. A run id starting with `offline-` means the server was down when the run was created:
    everything stays in the outbox, and `jobs.sync_mlflow` creates the run when it replays. A (metric, step)
    pair the outbox already holds for this run is not logged again (module docstring, issue 19 item 11).
    """

    def __init__(self, uri: str, run_id: str, outbox_dir: str) -> None:
        _bound_http_retries()
        self.uri = uri
        self.run_id = run_id
        self._client: Any = None  # built on first use, inside the guard (issue 19 item 9)
        os.makedirs(outbox_dir, exist_ok=True)
        self.outbox = os.path.join(outbox_dir, OUTBOX)
        _end_torn_line(self.outbox)
        self._warned = False
        self._down_until = float("inf") if run_id.startswith(OFFLINE_PREFIX) else 0.0
        self._params: dict[str, str] | None = None  # what a resumed run already holds
        ids = {run_id} | {k for k, v in _synced(self.outbox).get("runs", {}).items() if v == run_id}
        self._logged: set[tuple[str, int]] = set()
        for line in _outbox_lines(self.outbox):
            rec = _parse(line)
            if rec and rec["kind"] == "metrics" and rec["run_id"] in ids:
                self._logged.update((k, int(rec["step"])) for k in rec.get("metrics", {}))

    @property
    def client(self) -> Any:
        """The MLflow client, built on first use; raises when the store cannot be opened (use `_call`)."""
        if self._client is None:
            self._client = open_client(self.uri)
        return self._client

    def _record(self, kind: str, payload: dict, sent: bool = False) -> None:
        line = json.dumps(
            {"kind": kind, "run_id": self.run_id, "uri": self.uri, "time": time.time(), "sent": sent, **payload},
            default=str,
        )
        fd = os.open(self.outbox, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
        finally:
            os.close(fd)

    def _call(self, fn: Any) -> bool:
        """`fn(client)` unless the server is known to be down; True when it went through. Never raises."""
        if time.monotonic() < self._down_until:
            return False
        try:
            fn(self.client)
            return True
        except Exception as exc:  # a tracking outage (or a broken store) must never kill an edit stream
            self._down_until = time.monotonic() + RETRY_AFTER_S
            if not self._warned:
                warnings.warn(
                    f"MLflow at {self.uri} is unreachable ({type(exc).__name__}: {str(exc)[:300]}); results stay "
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
        send = flat
        if self._params is not None:  # a resumed run: MLflow params cannot change, only new keys are sent
            changed = sorted(k for k, v in flat.items() if k in self._params and self._params[k] != v)
            send = {k: v for k, v in flat.items() if k not in self._params}
            self._params.update(send)
            if changed:
                note = ",".join(changed)[:5000]
                self._call(lambda c: c.set_tag(self.run_id, "odedit.params_changed_on_resume", note))
        items = [Param(k, v) for k, v in send.items()]
        sent = all(
            [
                self._call(lambda c, chunk=items[i : i + 100]: c.log_batch(self.run_id, params=chunk))
                for i in range(0, len(items), 100)
            ]
        )
        self._record("params", {"params": flat}, sent)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        step = int(step)
        clean = {k: float(v) for k, v in metrics.items() if (k, step) not in self._logged}
        if not clean:  # every value of this step is logged already (a step re-applied after a restart)
            return
        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, step) for k, v in clean.items()]
        sent = all(
            [
                self._call(lambda c, chunk=items[i : i + 500]: c.log_batch(self.run_id, metrics=chunk))
                for i in range(0, len(items), 500)
            ]
        )
        self._record("metrics", {"metrics": clean, "step": step, "ts": ts}, sent)
        self._logged.update((k, step) for k in clean)

    def log_artifact(self, path: str, subdir: str | None = None) -> None:
        sent = self._call(lambda c: c.log_artifact(self.run_id, path, subdir))
        self._record("artifact", {"path": os.path.abspath(path), "subdir": subdir}, sent)

    def set_terminated(self, status: str = "FINISHED") -> None:
        sent = self._call(lambda c: c.set_terminated(self.run_id, status))
        self._record("terminate", {"status": status}, sent)

    def reopen(self, parent_run_id: str | None = None) -> None:
        """Continue this run (a resumed stream): RUNNING again, nested under this job's parent run if any."""

        def go(client: Any) -> None:
            self._params = dict(client.get_run(self.run_id).data.params)
            client.update_run(self.run_id, status="RUNNING")
            if parent_run_id:
                client.set_tag(self.run_id, PARENT_TAG, parent_run_id)

        sent = self._call(go)
        self._record("reopen", {"parent_run_id": parent_run_id or ""}, sent)

    def mark_stale(self, experiment: str, run_dir: str) -> list[str]:
        """Mark KILLED every other run of `run_dir` still RUNNING: its job died without saying so (item 11)."""
        stale: list[str] = []
        if "'" in run_dir or "\\" in run_dir:  # not expressible in MLflow's filter grammar; leave them
            return stale

        def go(client: Any) -> None:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                return
            query = f"tags.`{RUN_DIR_TAG}` = '{run_dir}' and attributes.status = 'RUNNING'"
            for run in client.search_runs([exp.experiment_id], filter_string=query):
                if run.info.run_id != self.run_id:
                    client.set_terminated(run.info.run_id, "KILLED")
                    stale.append(run.info.run_id)

        self._call(go)
        if stale:
            log.warning("MLflow runs %s of %s were still RUNNING after their job died: marked KILLED", stale, run_dir)
        return stale


def ensure_experiment(uri: str, name: str) -> str:
    """Create the experiment if needed (in the driver, before any worker logs), under `store_lock`."""
    from mlflow.tracking import MlflowClient

    check_store(uri)
    with store_lock(uri):
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        return client.create_experiment(name, artifact_location=artifact_location(uri))


def artifact_location(uri: str) -> str | None:
    """Where a new experiment's artifacts go: beside a sqlite store (`<its folder>/mlartifacts`), not in
    `./mlruns` of whatever directory the process runs in; a server (http, databricks) decides for itself."""
    store = _sqlite_path(uri)
    if store is None:
        return None
    return Path(os.path.dirname(os.path.abspath(store)), "mlartifacts").as_uri()


def open_tracker(
    cfg: Any,
    run_name: str,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    outbox_dir: str | None = None,
):
    """Create a run (nested under `parent_run_id` when given) and return its tracker (NullTracker if off).

    Never raises for MLflow: a server that is down, or a store that cannot be opened (corrupt, unreadable,
    another job's migration failing), gives an offline run kept in the outbox (issue 19 item 9).
    """
    if not cfg.tracking.enabled:
        return NullTracker()
    _bound_http_retries()
    uri = tracking_uri(cfg)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    outbox_dir = outbox_dir or cfg.output_dir
    try:
        exp_id = ensure_experiment(uri, cfg.tracking.experiment)
        run_id = open_client(uri).create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
    except Exception as exc:  # the server is down or the store is broken: run offline into the outbox
        import uuid

        run_id = f"{OFFLINE_PREFIX}{uuid.uuid4().hex}"
        warnings.warn(
            f"MLflow at {uri} is unreachable ({type(exc).__name__}: {str(exc)[:300]}); run {run_name!r} is "
            f"recorded offline in {os.path.join(outbox_dir, OUTBOX)}; replay it "
            "with `python -m jobs.sync_mlflow <that file>`",
            RuntimeWarning,
            stacklevel=2,
        )
    tracker = MLflowTracker(uri, run_id, outbox_dir)
    if run_id.startswith(OFFLINE_PREFIX):
        tracker._record("create", {"experiment": cfg.tracking.experiment, "run_name": run_name, "tags": all_tags})
    return tracker


def attach_tracker(cfg: Any, run_id: str, outbox_dir: str):
    """A tracker logging into an existing run (Ray Train rank 0); NullTracker when tracking is off."""
    if not cfg.tracking.enabled or not run_id:
        return NullTracker()
    return MLflowTracker(tracking_uri(cfg), run_id, outbox_dir)


def open_run_tracker(
    cfg: Any,
    run_dir: str,
    run_name: str,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    resume: bool = True,
):
    """The tracker of the run kept in `run_dir` (issue 19 items 10, 11): one MLflow run and one outbox per run.

    `<run_dir>/mlflow_run.json` names the MLflow run of the directory: when it is there for this tracking URI
    and `resume`, that run is continued (a resumed stream; an offline run is first synced if the server is
    back), else a new run is created and recorded. Either way, any other run of this directory still RUNNING is
    marked KILLED. (A comparison run does not resume: each comparison is a new parent run; the arms it resumes
    move under it.)
    """
    if not cfg.tracking.enabled:
        return NullTracker()
    run_dir = os.path.abspath(run_dir)
    uri = tracking_uri(cfg)
    record_path = os.path.join(run_dir, RUN_RECORD)
    try:
        record = read_json(record_path, default=None)
    except (OSError, ValueError):
        record = None
    record = record if isinstance(record, dict) else {}
    run_id = record.get("run_id") if resume and record.get("uri") == uri else ""
    if run_id:
        if run_id.startswith(OFFLINE_PREFIX):
            run_id = _sync_offline(run_dir, uri, run_id)
        tracker = MLflowTracker(uri, run_id, run_dir)
        tracker.reopen(parent_run_id)
    else:
        tracker = open_tracker(cfg, run_name, parent_run_id, {**(tags or {}), RUN_DIR_TAG: run_dir}, run_dir)
    write_json(
        record_path,
        {"run_id": tracker.run_id, "uri": uri, "experiment": cfg.tracking.experiment, "run_name": run_name},
    )
    tracker.mark_stale(cfg.tracking.experiment, run_dir)
    return tracker


def _sync_offline(run_dir: str, uri: str, run_id: str) -> str:
    """An offline run about to be resumed: replay its outbox if MLflow is back; the run id to continue."""
    outbox = os.path.join(run_dir, OUTBOX)
    try:
        replay_outbox(outbox, uri)
    except Exception:  # still down: the resumed stream stays offline too
        return run_id
    return _synced(outbox)["runs"].get(run_id, run_id)


class RunTracker:
    """A stream's tracker, opened in its run directory once the driver has claimed it (`bind`).

    The driver makes it before the run directory is known to be its own (`pipeline.experiment`); the engine
    calls `bind_tracker(tracker, run_dir)` right after claiming the directory, which opens the run there
    (`open_run_tracker`: the same MLflow run on resume, the outbox rank 0 appends to as well). Calls made before
    `bind` are kept and sent once bound. A tracker never bound (the stream stopped before its directory was
    claimed) opens no run, so nothing is left RUNNING.
    """

    def __init__(
        self, cfg: Any, run_name: str, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None
    ) -> None:
        self.cfg, self.run_name, self.parent_run_id, self.tags = cfg, run_name, parent_run_id, dict(tags or {})
        self.inner: Any = None
        self._pending: list[tuple[str, tuple]] = []

    @property
    def run_id(self) -> str:
        return getattr(self.inner, "run_id", "")

    def bind(self, run_dir: str) -> None:
        if self.inner is not None:
            return
        self.inner = open_run_tracker(self.cfg, run_dir, self.run_name, self.parent_run_id, self.tags)
        for name, args in self._pending:
            getattr(self.inner, name)(*args)
        self._pending.clear()

    def _do(self, name: str, *args: Any) -> None:
        if self.inner is None:
            self._pending.append((name, args))
        else:
            getattr(self.inner, name)(*args)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._do("log_params", dict(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._do("log_metrics", dict(metrics), step)

    def log_artifact(self, path: str, subdir: str | None = None) -> None:
        self._do("log_artifact", path, subdir)

    def set_terminated(self, status: str = "FINISHED") -> None:
        if self.inner is not None:
            self.inner.set_terminated(status)


def bind_tracker(tracker: Any, run_dir: str) -> Any:
    """Open a `RunTracker` in its run directory (other trackers are already open); returns the tracker."""
    bind = getattr(tracker, "bind", None)
    if bind is not None:
        bind(run_dir)
    return tracker


@contextlib.contextmanager
def tracked(tracker: Any) -> Iterator[Any]:
    """End `tracker`'s run as what happened (issue 19 item 11): FINISHED; KILLED when it is interrupted
    (KeyboardInterrupt: Ctrl-C, SIGINT); FAILED when the body raises anything else (an error exit included). A
    driver killed outright (SIGKILL, SIGTERM) is marked by the next job on its run directory (`mark_stale`)."""
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.set_terminated("KILLED")
        raise
    except BaseException:
        tracker.set_terminated("FAILED")
        raise
    tracker.set_terminated("FINISHED")


_METRIC_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_key(*parts: str) -> str:
    """An MLflow metric name from free text (arm names such as `lora+odedit`): other characters become `_`."""
    return "/".join(_METRIC_KEY.sub("_", p) for p in parts)


# ---------------------------------------------------------------------------------------------- replay


class OutboxError(ValueError):
    """An outbox cannot be replayed as it stands (a record of an offline run created in another outbox)."""


def find_outboxes(paths: Any) -> list[str]:
    """The outbox files named, or found (recursively) under the directories named, in a stable order."""
    found: list[str] = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        if os.path.isdir(path):
            found += sorted(str(p) for p in Path(path).rglob(OUTBOX))
        else:
            found.append(str(path))
    return list(dict.fromkeys(found))


def replay_outboxes(paths: Any, uri: str | None = None) -> dict[str, int]:
    """Replay several outboxes with one map of offline run ids (issue 19 item 10).

    An outbox that creates an offline run goes before the outboxes that log into it or nest under it, so
    records of one run kept in several outboxes (the driver's and rank 0's, in layouts before one outbox per
    run) and offline child runs of an offline parent all land in the run they belong to.
    """
    files = find_outboxes(paths)
    mapping: dict[str, str] = {}
    creates: dict[str, set[str]] = {}
    needs: dict[str, set[str]] = {}
    for f in files:
        mapping.update(_synced(f).get("runs", {}))
        recs = [r for r in map(_parse, _outbox_lines(f)) if r]
        creates[f] = {r["run_id"] for r in recs if r["kind"] == "create"}
        refs = {r["run_id"] for r in recs} | {(r.get("tags") or {}).get(PARENT_TAG, "") for r in recs}
        refs |= {r.get("parent_run_id", "") for r in recs}
        needs[f] = {x for x in refs if x.startswith(OFFLINE_PREFIX)} - creates[f]
    counts: dict[str, int] = {}
    pending = list(files)
    while pending:
        ready = [f for f in pending if not any(needs[f] & creates[g] for g in pending if g != f)] or pending[:1]
        for f in ready:
            pending.remove(f)
            for k, v in replay_outbox(f, uri, mapping).items():
                counts[k] = counts.get(k, 0) + v
    return counts


def replay_outbox(path: str, uri: str | None = None, mapping: dict[str, str] | None = None) -> dict[str, int]:
    """Send every record of an outbox file to MLflow (to `uri`, or the URI recorded with each entry).

    Offline runs (created while the server was down) are created first. Progress (new run ids, lines
    replayed) is kept in `<outbox>.synced.json`, so a second replay sends only what was appended since.
    `mapping` (offline run id -> MLflow run id) is shared by `replay_outboxes`. A line torn by a kill is skipped.

    Raises:
        OutboxError: a record of an offline run whose creation is in no outbox replayed so far.
    """
    counts = {"params": 0, "metrics": 0, "artifact": 0, "terminate": 0, "reopen": 0, "create": 0, "unreadable": 0}
    clients: dict[str, Any] = {}
    mapping_path = f"{path}.synced.json"
    done = _synced(path)
    runs: dict[str, str] = mapping if mapping is not None else {}
    runs.update(done.get("runs", {}))
    done["runs"] = runs
    for number, line in enumerate(_outbox_lines(path)):
        if number < done.get("lines", 0):
            continue
        if not line.endswith("\n"):  # the last line, still being written (or torn): next time
            break
        rec = _parse(line)
        if rec is None:
            counts["unreadable"] += 1
        else:
            target = uri or rec["uri"]
            if target not in clients:
                clients[target] = open_client(target)
            client = clients[target]
            kind = rec["kind"]
            if kind == "create":
                if rec["run_id"] not in runs:
                    tags = dict(rec["tags"])
                    if tags.get(PARENT_TAG):
                        tags[PARENT_TAG] = runs.get(tags[PARENT_TAG], tags[PARENT_TAG])
                    exp_id = ensure_experiment(target, rec["experiment"] or "odedit")
                    runs[rec["run_id"]] = client.create_run(exp_id, run_name=rec["run_name"], tags=tags).info.run_id
                counts["create"] += 1
            elif not rec.get("sent"):  # records that went through when they were logged are not sent again
                run_id = runs.get(rec["run_id"], rec["run_id"])
                if run_id.startswith(OFFLINE_PREFIX):
                    raise OutboxError(
                        f"outbox {path}, line {number + 1}: run {run_id} was created offline in another outbox; "
                        "replay the directory that holds both: python -m jobs.sync_mlflow <that directory>"
                    )
                _replay_record(client, run_id, rec, runs)
                counts[kind] = counts.get(kind, 0) + 1
        done["lines"] = number + 1
        write_json(mapping_path, done, indent=None)
    return counts


def _replay_record(client: Any, run_id: str, rec: dict, runs: Mapping[str, str]) -> None:
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
    elif kind == "reopen":
        client.update_run(run_id, status="RUNNING")
        if rec.get("parent_run_id"):
            client.set_tag(run_id, PARENT_TAG, runs.get(rec["parent_run_id"], rec["parent_run_id"]))

"""One writer per run: an exclusive, heartbeat-backed lease on a stream's run directory (issue 19 item 7).

    lease = RunLease(run_dir, job_id).acquire()     # driver, before anything is written to the run; or LeaseHeld
    lease.start_heartbeat()
    ...                                             # rank 0: check_lease(run_dir, lease.token) before each write
    lease.release()

Two jobs streaming into one run directory at once corrupt it (both write checkpoints, ledgers and results into
the same place). The lease is a JSON file beside the run directory, `<run>.lease` (so that moving a run
directory aside, `stream.on_change=replace`, does not move the lease with it), naming its owner: host, process
id, Ray job id, a random token, when it was taken and its last heartbeat. Every read-decide-write of it holds an
`flock` on `<run>.lease.lock`, so two jobs starting together cannot both win.

* A second job finds the lease held and stops with `LeaseHeld`, whose message names the owner (the jobs print it
  as an `error:` line and exit 2).
* A lease whose owner is gone is taken over: on the same host, its process no longer exists; on any host, its
  heartbeat is older than `stale_s` ([INFERENCE] 60 s against a 5 s heartbeat: twelve missed beats, so a busy
  driver is never mistaken for a dead one, and a dead one blocks its run for at most a minute).
* Rank 0 of the stream calls `check_lease` before each checkpoint, progress and journal write: once the driver
  is gone (killed: its process is dead, or its heartbeat is stale) or another job holds the lease, it raises
  `LeaseLost` and the workers stop writing instead of racing the next owner.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from pipeline.storage.jsonio import write_json
from pipeline.storage.root import StorageError

HEARTBEAT_S = 5.0
STALE_S = 60.0


class LeaseHeld(StorageError):
    """Another live job holds the run's lease (a `StorageError`: the jobs print it as an `error:` line, exit 2)."""


class LeaseLost(RuntimeError):
    """This job's lease on the run is gone (its driver died, or another job took the run over)."""


def lease_path(run_dir: str) -> str:
    return run_dir.rstrip(os.sep) + ".lease"


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            owner = json.load(fh)
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def describe(owner: dict[str, Any]) -> str:
    """The owner as an operator reads it: host, pid, job, when its heartbeat was last seen."""
    age = time.time() - float(owner.get("heartbeat", 0))
    return (
        f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, Ray job {owner.get('job_id') or '-'}, "
        f"last heartbeat {age:.0f} s ago"
    )


def gone(owner: dict[str, Any], stale_s: float = STALE_S) -> str | None:
    """Why the lease's owner counts as gone, or None while it is alive (see the module docstring)."""
    age = time.time() - float(owner.get("heartbeat", 0))
    if owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1))):
        return f"its process {owner.get('pid')} on this host ({owner.get('host')}) no longer exists"
    if age > stale_s:
        return f"its last heartbeat is {age:.0f} s old (stale after {stale_s:.0f} s)"
    return None


@contextlib.contextmanager
def _locked(run_dir: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(run_dir.rstrip(os.sep)) or ".", exist_ok=True)
    with open(lease_path(run_dir) + ".lock", "a", encoding="utf-8") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def check_lease(run_dir: str, token: str, stale_s: float = STALE_S) -> None:
    """Raise `LeaseLost` unless the lease on `run_dir` is still the one with `token` and its owner is alive."""
    owner = _read(lease_path(run_dir))
    if owner is None:
        raise LeaseLost(f"the lease on {run_dir} is gone; this job no longer owns the run and stops writing to it")
    if owner.get("token") != token:
        raise LeaseLost(f"the run {run_dir} was taken over by another job ({describe(owner)}); this one stops writing")
    why = gone(owner, stale_s)
    if why is not None:
        raise LeaseLost(f"the job that owns the run {run_dir} is gone ({why}); its workers stop writing")


class RunLease:
    """The lease of one job on one run directory (see the module docstring)."""

    def __init__(
        self, run_dir: str, job_id: str = "", stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S
    ) -> None:
        self.run_dir = run_dir
        self.path = lease_path(run_dir)
        self.job_id = job_id
        self.stale_s = stale_s
        self.heartbeat_s = heartbeat_s
        self.token = uuid.uuid4().hex
        self.taken_over: str | None = None  # why the previous owner counted as gone, when one was replaced
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _owner(self) -> dict[str, Any]:
        now = time.time()
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job_id": self.job_id,
            "token": self.token,
            "since": now,
            "heartbeat": now,
        }

    def acquire(self) -> RunLease:
        """Take the lease, or raise `LeaseHeld` naming the live owner; a gone owner's lease is taken over."""
        with _locked(self.run_dir):
            owner = _read(self.path)
            if owner is not None and owner.get("token") != self.token:
                why = gone(owner, self.stale_s)
                if why is None:
                    raise LeaseHeld(
                        f"the run {self.run_dir} is in use by another job ({describe(owner)}). Fix: wait for it to "
                        f"finish, stop it, or give this job another stream.run_name; a lease whose job is gone is "
                        f"taken over by itself (same host: at once; another host: after {self.stale_s:.0f} s)"
                    )
                self.taken_over = f"{describe(owner)}: {why}"
            write_json(self.path, self._owner())
        return self

    def heartbeat(self) -> None:
        """Refresh the heartbeat; raises `LeaseLost` when the lease is no longer this job's."""
        with _locked(self.run_dir):
            owner = _read(self.path)
            if owner is None or owner.get("token") != self.token:
                raise LeaseLost(f"the lease on {self.run_dir} was taken over: {describe(owner or {})}")
            owner["heartbeat"] = time.time()
            write_json(self.path, owner)

    def start_heartbeat(self) -> RunLease:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    self.heartbeat()
                except (LeaseLost, OSError):
                    return  # rank 0 finds the lease lost at its next check and stops writing

        self._thread = threading.Thread(target=beat, name="run-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this job's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with _locked(self.run_dir):
            owner = _read(self.path)
            if owner is not None and owner.get("token") == self.token:
                os.remove(self.path)

    def __enter__(self) -> RunLease:
        return self.acquire().start_heartbeat()

    def __exit__(self, *exc: Any) -> None:
        self.release()

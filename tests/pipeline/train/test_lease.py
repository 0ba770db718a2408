"""One writer per run (issue 19 item 7): the lease on a run directory, without Ray.

Two jobs are two `RunLease` objects here (a job is one lease holder; the second one's process may be this one:
the token tells them apart). The engine's use of it is asserted in tests/pipeline/train/test_engine.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline.storage.root import StorageError
from pipeline.train.lease import LeaseHeld, LeaseLost, RunLease, check_lease, lease_path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _foreign(run_dir: str, **owner) -> None:
    """Write a lease as another job would have."""
    now = time.time()
    entry = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": "02000000", "token": "other"}
    entry.update({"since": now, "heartbeat": now, **owner})
    with open(lease_path(run_dir), "w") as fh:
        json.dump(entry, fh)


def test_a_second_job_on_a_run_is_refused_naming_the_owner(tmp_path, record_outcome):
    run = str(tmp_path / "storage" / "run")
    first = RunLease(run, job_id="01000000").acquire()
    check_lease(run, first.token)
    with pytest.raises(LeaseHeld) as err:
        RunLease(run, job_id="03000000").acquire()
    msg = str(err.value)
    assert f"pid {os.getpid()}" in msg and "Ray job 01000000" in msg and socket.gethostname() in msg
    assert "Fix:" in msg and isinstance(err.value, StorageError), "jobs print it as one error: line, exit 2"
    check_lease(run, first.token)  # the refused job changed nothing
    first.release()
    assert not os.path.exists(lease_path(run))
    second = RunLease(run, job_id="03000000").acquire()  # free again once the first job ends
    assert second.taken_over is None
    second.release()
    record_outcome(
        "fault", "two jobs on one run directory", "the second is refused before any write, naming the owner", msg
    )


@pytest.mark.parametrize(
    "owner, why",
    [
        ({"pid": "dead"}, "no longer exists"),  # same host, process gone: at once
        ({"host": "elsewhere", "heartbeat": time.time() - 120}, "heartbeat is"),  # another host, stale
    ],
)
def test_a_lease_whose_owner_is_gone_is_taken_over(tmp_path, owner, why, record_outcome):
    run = str(tmp_path / "run")
    owner = {k: (_dead_pid() if v == "dead" else v) for k, v in owner.items()}
    _foreign(run, **owner)
    lease = RunLease(run).acquire()
    assert why in lease.taken_over
    check_lease(run, lease.token)
    lease.release()
    record_outcome("fault", f"stale lease on a run ({why})", "taken over by the next job", lease.taken_over)


def test_a_live_owner_on_another_host_is_not_taken_over(tmp_path):
    run = str(tmp_path / "run")
    _foreign(run, host="elsewhere", pid=_dead_pid(), heartbeat=time.time() - 30)  # pid means nothing there
    with pytest.raises(LeaseHeld, match="host elsewhere"):
        RunLease(run).acquire()


def test_workers_stop_writing_once_the_driver_is_gone_or_replaced(tmp_path, record_outcome):
    run = str(tmp_path / "run")
    lease = RunLease(run, heartbeat_s=0.05).acquire().start_heartbeat()
    before = json.load(open(lease_path(run)))["heartbeat"]
    time.sleep(0.3)
    assert json.load(open(lease_path(run)))["heartbeat"] > before, "the driver's heartbeat refreshes the lease"
    lease.release()
    with pytest.raises(LeaseLost, match="gone"):
        check_lease(run, lease.token)  # released (or never written)
    _foreign(run, pid=_dead_pid(), token=lease.token)  # the driver was killed: its lease names a dead process
    with pytest.raises(LeaseLost, match="no longer exists") as err:
        check_lease(run, lease.token)
    _foreign(run)  # another job holds the run now
    with pytest.raises(LeaseLost, match="taken over"):
        check_lease(run, lease.token)
    record_outcome(
        "fault", "job driver killed while its workers write", "rank 0 stops before its next write", str(err.value)
    )


def test_a_lease_taken_over_stops_the_old_heartbeat(tmp_path):
    run = str(tmp_path / "run")
    old = RunLease(run, stale_s=0.01).acquire()
    time.sleep(0.05)
    new = RunLease(run, stale_s=0.01).acquire()  # old's heartbeat is stale for this test's timeout
    assert new.taken_over
    with pytest.raises(LeaseLost):
        old.heartbeat()
    old.release()  # leaves the new owner's lease alone
    assert json.load(open(lease_path(run)))["token"] == new.token


_RACER = """
import os, sys, time
from pipeline.train.lease import LeaseHeld, RunLease
open(sys.argv[2] + f".{os.getpid()}", "w").close()
while len([f for f in os.listdir(os.path.dirname(sys.argv[2])) if f.startswith("ready.")]) < 4:
    time.sleep(0.001)  # all imported: start together
try:
    lease = RunLease(sys.argv[1]).acquire()
except LeaseHeld:
    sys.exit(3)
time.sleep(1.0)  # hold it while the others try
lease.release()
"""


def test_jobs_starting_together_get_exactly_one_lease(tmp_path):
    run = str(tmp_path / "run")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    start = str(tmp_path / "ready")
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, run, start], cwd=root) for _ in range(4)]
    codes = sorted(p.wait() for p in procs)
    assert codes == [0, 3, 3, 3], codes

"""Joining Ray from a job: the cluster of `ray job submit` / `RAY_ADDRESS`, a live local `ray start`, or a new one.

    from pipeline.cluster.session import ray_session
    with ray_session():         # every job: joins or starts Ray; shuts down only a Ray it started
        ...

A bare `ray.init()` joins the cluster recorded in Ray's session file (`/tmp/ray/ray_current_cluster`) when
there is one, and a head that died without `ray stop` leaves that file behind: the job then waits for a GCS that
never answers. `init_ray` honours `RAY_ADDRESS` (set by `ray job submit`) as Ray does, joins a recorded cluster
only when its GCS port answers, and otherwise starts a local instance, saying why.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

SESSION_FILE = os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")


def recorded_cluster(path: str | None = None) -> str | None:
    """The `host:port` Ray's session file points at, or None."""
    try:
        with open(path or SESSION_FILE, encoding="utf-8") as fh:
            address = fh.read().strip()
    except OSError:
        return None
    return address or None


def answers(address: str, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections at `host:port`."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def init_ray(**kwargs) -> bool:
    """Connect to (or start) Ray as described in the module docstring; False when Ray was already up."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS") or "address" in kwargs:  # the caller (or `ray job submit`) chose
        ray.init(**kwargs)
        return True
    recorded = recorded_cluster()
    if recorded and not answers(recorded):
        print(
            f"note: Ray's session file points at {recorded}, which does not answer (a head stopped without "
            "`ray stop`?); starting a local Ray instead",
            file=sys.stderr,
        )
        ray.init(address="local", **kwargs)
        return True
    ray.init(**kwargs)
    return True


def quiet_usage_stats() -> None:
    """Ray's usage-stats prompt and upload are off unless the user set `RAY_USAGE_STATS_ENABLED` themselves."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@contextmanager
def ray_session(**kwargs) -> Iterator[bool]:
    """Ray for the duration of a job: usage stats off by default, `init_ray(**kwargs)`, and on exit
    `ray.shutdown()` only when this call started Ray (a job under `ray job submit` or inside a test's cluster
    leaves that cluster alone). Yields whether it started Ray."""
    quiet_usage_stats()
    import ray  # deferred: ray is heavy, and callers such as `--help` paths need none of it

    started = init_ray(**kwargs)
    try:
        yield started
    finally:
        if started:
            ray.shutdown()

"""Joining Ray from a job: the cluster of `ray job submit` / `RAY_ADDRESS`, a live local `ray start`, or a new one.

    from pipeline.raycluster import init_ray
    started = init_ray()        # True when this call started Ray (the caller then shuts it down)

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
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
        return True
    recorded = recorded_cluster()
    if recorded and not answers(recorded):
        print(f"note: Ray's session file points at {recorded}, which does not answer (a head stopped without "
              "`ray stop`?); starting a local Ray instead", file=sys.stderr)
        ray.init(address="local", **kwargs)
        return True
    ray.init(**kwargs)
    return True

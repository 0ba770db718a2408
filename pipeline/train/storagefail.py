"""A stream whose storage stops taking writes stops at once, with the project's error (issue 19 item 8).

    flag = StopFlag.options(num_cpus=0).remote()          # driver, before the trainer is built
    loop = stop_on_write_failure(train_loop_per_worker)   # what the TorchTrainer runs
    ...
    raise_if_stopped(flag)                                # driver, after fit: StorageWriteError -> exit 2

An unwritable run directory or a full disk is not a worker fault: Ray Train's `FailureConfig.max_failures`
restarts the worker group on any worker error (`WorkerGroupError` is always retryable in Ray 2.60's
`DefaultFailurePolicy`, and there is no hook for a policy of our own), so every restart would load the model
again and fail on the same write. Instead the worker that meets the write failure records it in `StopFlag` (a
small actor the driver owns, off the storage that just failed) and:

- on a single worker, ends the loop normally: nothing is restarted at all;
- on several workers, raises, because the other ranks wait in a collective that only a group teardown ends;
  the restarted group finds the flag set and every rank returns before loading anything, so the one restart
  does no work.

The driver then raises `StorageWriteError` (a `StorageError`: the jobs print it as one `error:` line with the
fix, exit 2). A write failure is an `OSError` whose errno is one of `WRITE_ERRNOS` (permission, read-only
filesystem, no space, quota), found on the exception or its causes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

from pipeline.storage.root import StorageError

WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
FLAG_KEY = "stop_flag"


class StorageWriteError(StorageError):
    """The stream's storage refused a write (permission, read-only, full disk, quota): retrying cannot help."""


def write_failure(err: BaseException) -> OSError | None:
    """The `OSError` with a write errno on `err` or its causes, or None (any other error is a real fault)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in WRITE_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


def describe(err: OSError) -> str:
    """The error line's text: what failed, where, and the fix."""
    where = err.filename or "the run directory"
    name = errno.errorcode.get(err.errno or 0, str(err.errno))
    space = err.errno in (errno.ENOSPC, errno.EDQUOT)
    fix = (
        f"free space on the filesystem of {where} (or raise the quota)"
        if space
        else f"make {os.path.dirname(str(where)) or where} writable by this job (or set stream.storage_path / "
        "storage_root to storage it can write)"
    )
    return (
        f"the stream stopped: cannot write {where} ({name}: {err.strerror}); retrying cannot help, so the worker "
        f"group was not restarted. Fix: {fix}, then re-submit the same command: the stream resumes from its last "
        "checkpoint"
    )


class StopFlag:
    """Ray actor (num_cpus=0) holding the first write failure of a stream (see the module docstring)."""

    def __init__(self) -> None:
        self.message = ""

    def set(self, message: str) -> None:
        self.message = self.message or message

    def get(self) -> str:
        return self.message


def stop_on_write_failure(loop: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """`loop` (a Ray Train per-worker loop) that stops its stream on a write failure instead of having the worker
    group restarted (see the module docstring). Needs `config[FLAG_KEY]`, a `StopFlag` handle; without one it is
    `loop` unchanged."""

    def run(config: dict[str, Any]) -> None:
        import ray

        flag = config.get(FLAG_KEY)
        if flag is None:
            return loop(config)
        if _flag_message(flag):
            return None  # a group restarted after a write failure: stop before loading anything
        try:
            return loop(config)
        except Exception as err:
            failure = write_failure(err)
            if failure is None:
                raise
            ray.get(flag.set.remote(describe(failure)))
            if int(config["cfg"].get("resources", {}).get("num_workers", 1)) <= 1:
                return None  # nothing else is waiting on this worker: end without a restart
            raise

    run.__name__ = getattr(loop, "__name__", "run")
    run.__doc__ = loop.__doc__
    return run


def new_flag() -> Any:
    """A `StopFlag` actor owned by the calling driver, on the driver's own node: placed on a worker node, it died
    with that node and took a stream that Ray Train had resumed on the other nodes with it (the node-kill test of
    tests/pipeline/cluster/test_local.py)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(StopFlag).options(scheduling_strategy=here).remote()


def _flag_message(flag: Any) -> str | None:
    """The failure recorded in `flag`; None when nothing was recorded or the flag is gone (a flag lost with its
    process cannot stop a stream: the failure, if any, surfaces as the workers' own error)."""
    import ray

    try:
        return ray.get(flag.get.remote())
    except ray.exceptions.RayActorError:
        return None


def raise_if_stopped(flag: Any, cause: BaseException | None = None) -> None:
    """Raise `StorageWriteError` when a worker recorded a write failure in `flag`."""
    message = _flag_message(flag)
    if message:
        raise StorageWriteError(message) from cause

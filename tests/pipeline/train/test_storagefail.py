"""A write failure during a stream (unwritable run directory, full disk) stops it with the project's error, not
after worker-group restarts that cannot succeed (issue 19 item 8). The per-worker loop wrapper and the driver's
flag run on the session's local Ray, with a loop that fails the way a checkpoint write does: tests here run as
root, where chmod cannot make a directory unwritable, so the failing write is raised in-process."""

from __future__ import annotations

import errno

import pytest

from pipeline.train.storagefail import (
    FLAG_KEY,
    StorageWriteError,
    new_flag,
    raise_if_stopped,
    stop_on_write_failure,
    write_failure,
)

CHECKPOINT = "/shared/odedit/outputs/run/storage/lifelong/checkpoints/.tmp-step-000004/editable.safetensors"


def _loop(calls: list, error: BaseException):
    def loop(config):
        calls.append(config["cfg"]["resources"]["num_workers"])
        raise error

    return loop


def _config(workers: int, flag) -> dict:
    return {"cfg": {"resources": {"num_workers": workers}}, FLAG_KEY: flag}


def test_a_write_failure_stops_a_one_worker_stream_without_a_restart(ray_local, capsys, record_outcome):
    from jobs.common import storage_errors

    calls: list = []
    flag = new_flag()
    loop = stop_on_write_failure(_loop(calls, PermissionError(errno.EACCES, "Permission denied", CHECKPOINT)))
    loop(_config(1, flag))  # ends normally: Ray Train sees no worker failure, so it restarts nothing
    assert calls == [1]
    with pytest.raises(StorageWriteError) as info:
        raise_if_stopped(flag)
    text = str(info.value)
    assert f"cannot write {CHECKPOINT} (EACCES" in text and "not restarted" in text and "re-submit" in text
    # the job prints it as one error line and exits 2 (`jobs.common.run`, every job's entry, wraps it so)
    with pytest.raises(SystemExit) as exit_info, storage_errors():
        raise info.value
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the stream stopped: cannot write") and "Fix: make" in err
    record_outcome("fault", "run directory unwritable during a stream", "stopped at once: error line, exit 2")


def test_on_several_workers_the_one_restart_does_no_work(ray_local, record_outcome):
    calls: list = []
    flag = new_flag()
    full = OSError(errno.ENOSPC, "No space left on device", CHECKPOINT)
    loop = stop_on_write_failure(_loop(calls, RuntimeError("checkpoint failed")))
    wrapped = stop_on_write_failure(_loop(calls, full))
    with pytest.raises(OSError):  # the other ranks wait in a collective: only a group teardown ends them
        wrapped(_config(2, flag))
    loop(_config(2, flag))  # the restarted group: every rank returns before loading anything
    assert calls == [2]
    with pytest.raises(StorageWriteError, match=r"ENOSPC.*free space"):
        raise_if_stopped(flag)
    record_outcome("fault", "disk full during a 2-worker stream", "one restart that does no work; error, exit 2")


def test_other_errors_stay_worker_faults_that_ray_train_retries(ray_local):
    calls: list = []
    flag = new_flag()
    with pytest.raises(ValueError):
        stop_on_write_failure(_loop(calls, ValueError("a bug")))(_config(1, flag))
    with pytest.raises(FileNotFoundError):  # not a write errno: a restart may well succeed
        stop_on_write_failure(_loop(calls, FileNotFoundError(errno.ENOENT, "gone")))(_config(1, flag))
    raise_if_stopped(flag)  # nothing recorded
    assert calls == [1, 1]


def test_a_write_failure_is_found_among_the_causes():
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/x")
        except OSError as inner:
            raise RuntimeError("checkpoint write failed") from inner
    except RuntimeError as outer:
        assert write_failure(outer).errno == errno.EROFS
    assert write_failure(OSError(errno.ENOENT, "gone")) is None

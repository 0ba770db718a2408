"""The storage root: one place for every output, checkpoint, MLflow store and cache of a job.

    cfg = resolve_storage(cfg)      # every relative location made absolute under the root, before any work

The root is `storage_root` from the config, else `$ODEDIT_STORAGE_ROOT` (set it on a cluster: a path every node
mounts), else the current directory, which keeps a local run's layout (`outputs/`, `.cache/` in the checkout).
Under `ray job submit` the current directory is Ray's copy of the working directory
(`.../runtime_resources/working_dir_files/_ray_pkg_<hash>`), which Ray deletes when it likes and which no other
node sees: there a root must be set, or the job stops before any work, naming the fix. When a root is set, the model
and world caches live in `<root>/.cache` (unless `$ODEDIT_CACHE_DIR` says otherwise), so a resubmitted job, even
of changed code, finds the demo model it trained before.

**Confinement** (issue 19 item 2). Every output location (`output_dir`, `data.shards_dir`, `data.export_hf`,
`stream.storage_path`) must lie under the root once normalised and with symlinks resolved; relative ones resolve
against it, absolute ones must already be inside it. [INFERENCE] The root of `output_dir` is the storage root, set
or not (unset, it is the current directory): a user who wants outputs elsewhere sets `storage_root` (or
`$ODEDIT_STORAGE_ROOT`) there, so a config can never make a job write into `/etc` or beside the root. A run
directory is one safe name (`odedit.config.safe_name`) under its storage path, checked the same way
(`run_directory`), so `stream.on_change=replace` only ever renames a directory inside it.

[INFERENCE] Only filesystem paths are accepted (a shared filesystem: NFS, EFS, Lustre, a mounted bucket). The
job writes its summary, parquet rows, checkpoints and the sqlite MLflow store with plain file operations; an
object-store URI (`s3://`, `gs://`) is refused with that explanation rather than half supported.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import tempfile
from pathlib import Path

from odedit.config import Config, safe_name
from pipeline.storage.cache import CACHE_ENV

ROOT_ENV = "ODEDIT_STORAGE_ROOT"
_RAY_PACKAGE = re.compile(r"^_ray_pkg_[0-9a-f]+$")
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class StorageError(ValueError):
    """A storage location that would lose results: names the setting, its value and the fix."""


def confine(path: str, root: str, field: str, value: str) -> str:
    """`path` normalised and with symlinks resolved, if it lies under `root` (resolved the same way), else
    `StorageError` naming the field, its value, where it lands and the fix."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise StorageError(
            f"{field}={value!r} resolves to {real}, outside the storage root {real_root}; give a location under the "
            "root (relative to it, or absolute inside it), or set storage_root (or $"
            f"{ROOT_ENV}) to the place outputs should go"
        )
    return real


def run_directory(storage: str, run_name: str) -> str:
    """The run directory `<storage>/<run_name>`: the name must be one safe path component and the directory, with
    symlinks resolved, must lie under `storage` (a symlink planted in its place is refused)."""
    problem = safe_name(run_name)
    if problem:
        raise StorageError(f"stream.run_name={run_name!r}: {problem}")
    run_dir = os.path.join(storage, run_name)
    confine(run_dir, storage, "stream.run_name", run_name)
    return run_dir


def _probe(directory: str) -> None:
    """Create and remove a file in `directory` (raises the OSError a write there meets). A real write, not
    `os.access`, which says yes to root on a read-only filesystem and knows nothing of a full disk."""
    fd, path = tempfile.mkstemp(prefix=".odedit-write-check-", dir=directory)
    try:
        os.write(fd, b"ok")
    finally:
        os.close(fd)
        os.unlink(path)


def check_writable(cfg: Config) -> None:
    """Refuse, before any work, an output or checkpoint directory this process cannot write (issue 19 item 8):
    `output_dir` and the stream's storage (`stream.storage_path`, default `<output_dir>/storage`). A location
    that does not exist yet is checked at its nearest existing parent, which must be a directory; nothing is
    created.

    Raises:
        StorageError: naming the setting, its value, what failed and the fix.
    """
    storage = cfg.stream.storage_path or os.path.join(cfg.output_dir, "storage")
    for key, value in (("output_dir", cfg.output_dir), ("stream.storage_path", storage)):
        path = os.path.abspath(value)
        existing = path
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        try:
            if not os.path.isdir(existing):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", existing)
            _probe(existing)
        except OSError as err:
            what = f"{existing} ({errno.errorcode.get(err.errno or 0, 'error')}: {err.strerror or err})"
            space = err.errno in (errno.ENOSPC, errno.EDQUOT)
            fix = "free space there" if space else "make it writable by this job, or give a location that is"
            raise StorageError(
                f"{key}={value!r} cannot be written: {what}; fix: {fix} (outputs elsewhere: set storage_root or "
                f"${ROOT_ENV})"
            ) from None


def ray_package_dir(path: str | os.PathLike | None = None) -> str | None:
    """The Ray working-directory package folder that `path` (default: the current directory) lies in, or None."""
    p = Path(path or os.getcwd()).resolve()
    for parent in (p, *p.parents):
        if _RAY_PACKAGE.match(parent.name):
            return str(parent)
    return None


def storage_root(cfg: Config) -> tuple[str, bool]:
    """(absolute root, whether it was set explicitly by the config or `$ODEDIT_STORAGE_ROOT`)."""
    value, source = (cfg.storage_root, "storage_root") if cfg.storage_root else (os.environ.get(ROOT_ENV, ""), ROOT_ENV)
    if value.startswith("file://"):
        value = value[len("file://") :]
    if _URI.match(value):
        raise StorageError(
            f"{source}={value!r}: object-store URIs are not supported; the job writes files directly. Mount the "
            "bucket on every node (or use a shared filesystem such as EFS/NFS) and give its path"
        )
    package = ray_package_dir()
    if value:
        if not os.path.isabs(value) and package:
            raise StorageError(
                f"{source}={value!r} is relative, and this job runs in Ray's package folder {package}; "
                "give an absolute path on storage every node mounts"
            )
        return os.path.abspath(value), True
    return os.getcwd(), False


def resolve_storage(cfg: Config) -> Config:
    """`cfg` with `storage_root`, `output_dir`, `data.shards_dir`, `data.export_hf` and `stream.storage_path`
    absolute under the root, and the cache directory set beside them when the root was given (see the module
    docstring).

    Raises:
        StorageError: a relative location inside a Ray job's package folder with no root set, a URI root, or a
            location outside the root (see "Confinement").
    """
    root, explicit = storage_root(cfg)
    package = ray_package_dir()
    if package and not explicit:
        relative = [
            f"{key}={value!r}"
            for key, value in (
                ("output_dir", cfg.output_dir),
                ("data.shards_dir", cfg.data.shards_dir),
                ("data.export_hf", cfg.data.export_hf),
                ("stream.storage_path", cfg.stream.storage_path),
            )
            if value and not os.path.isabs(value)
        ]
        what = f"{', '.join(relative)} would resolve" if relative else "the model and world caches would go"
        raise StorageError(
            f"storage_root is not set, and this job runs in Ray's package folder {package}: {what} there, "
            f"which Ray deletes and other nodes cannot see. Set storage_root=/path/on/shared/storage (or "
            f"${ROOT_ENV} on the cluster, or --storage-root with `python -m jobs.submit`)"
        )

    def under(value: str) -> str:
        return value if not value or os.path.isabs(value) else os.path.normpath(os.path.join(root, value))

    located = {
        key: under(value)
        for key, value in (
            ("output_dir", cfg.output_dir),
            ("data.shards_dir", cfg.data.shards_dir),
            ("data.export_hf", cfg.data.export_hf),
            ("stream.storage_path", cfg.stream.storage_path),
        )
    }
    original = {"output_dir": cfg.output_dir, "data.shards_dir": cfg.data.shards_dir}
    original.update({"data.export_hf": cfg.data.export_hf, "stream.storage_path": cfg.stream.storage_path})
    for key, value in located.items():
        if value:
            confine(value, root, key, original[key])
    if explicit:
        os.environ.setdefault(CACHE_ENV, os.path.join(root, ".cache"))
    return dataclasses.replace(
        cfg,
        storage_root=root,
        output_dir=located["output_dir"],
        data=dataclasses.replace(cfg.data, shards_dir=located["data.shards_dir"], export_hf=located["data.export_hf"]),
        stream=dataclasses.replace(cfg.stream, storage_path=located["stream.storage_path"]),
    )

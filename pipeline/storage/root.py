"""The storage root: one place for every output, checkpoint, MLflow store and cache of a job.

    cfg = resolve_storage(cfg)      # every relative location made absolute under the root, before any work

The root is `storage_root` from the config, else `$ODEDIT_STORAGE_ROOT` (set it on a cluster: a path every node
mounts), else the current directory, which keeps a local run's layout (`outputs/`, `.cache/` in the checkout).
Under `ray job submit` the current directory is Ray's copy of the working directory
(`.../runtime_resources/working_dir_files/_ray_pkg_<hash>`), which Ray deletes when it likes and which no other
node sees: there a root must be set, or the job stops before any work, naming the fix. When a root is set, the model
and world caches live in `<root>/.cache` (unless `$ODEDIT_CACHE_DIR` says otherwise), so a resubmitted job, even
of changed code, finds the demo model it trained before.

[INFERENCE] Only filesystem paths are accepted (a shared filesystem: NFS, EFS, Lustre, a mounted bucket). The
job writes its summary, parquet rows, checkpoints and the sqlite MLflow store with plain file operations; an
object-store URI (`s3://`, `gs://`) is refused with that explanation rather than half supported.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from odedit.config import Config
from pipeline.storage.cache import CACHE_ENV

ROOT_ENV = "ODEDIT_STORAGE_ROOT"
_RAY_PACKAGE = re.compile(r"^_ray_pkg_[0-9a-f]+$")
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class StorageError(ValueError):
    """A storage location that would lose results: names the setting, its value and the fix."""


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
        StorageError: a relative location inside a Ray job's package folder with no root set, or a URI root.
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

    if explicit:
        os.environ.setdefault(CACHE_ENV, os.path.join(root, ".cache"))
    return dataclasses.replace(
        cfg,
        storage_root=root,
        output_dir=under(cfg.output_dir),
        data=dataclasses.replace(cfg.data, shards_dir=under(cfg.data.shards_dir), export_hf=under(cfg.data.export_hf)),
        stream=dataclasses.replace(cfg.stream, storage_path=under(cfg.stream.storage_path)),
    )

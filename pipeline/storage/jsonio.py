"""JSON files written atomically: one writer for manifests, ledgers, summaries and markers.

    write_json(path, {"edits": 240})        # temp file in the same folder, fsync, then rename
    state = read_json(path, default={})     # missing file -> default

A reader never sees half a file: the data goes to `<path>.tmp.<pid>` first, is flushed to disk, and replaces
`path` in one rename. Values JSON cannot hold natively are written as numbers where they are tensors or numpy
scalars (`.item()`), else as their string form.
"""

from __future__ import annotations

import json
import os
from typing import Any


def _default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2) -> str:
    """Write `data` as JSON to `path` atomically (creating its folder); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=indent, default=_default)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON value in `path`, or `default` when there is no such file."""
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)

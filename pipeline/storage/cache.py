"""Content-keyed cache directories under `<repo>/.cache/` (git-ignored), published atomically.

    key = content_key({"seed": 0, "version": "3"})          # 16 hex digits of a sha256
    path = ensure_dir(cache_dir("demo_world", key), build)   # build(tmp_dir) runs only on a miss

A cache entry is a directory whose *marker* file (`COMPLETE.json`) is written last, listing every file of the
entry with its size. An entry without a readable marker, or whose files do not match it, is incomplete (a
crash, a copy cut short, a hand edit) and is rebuilt. Builds happen in a private temporary sibling directory
that is renamed into place, so concurrent builders (Ray workers, two shells) never see half an entry: the
first rename wins and the others discard their copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.storage.jsonio import write_json

MARKER = "COMPLETE.json"
CACHE_ENV = "ODEDIT_CACHE_DIR"


def cache_root() -> Path:
    """`$ODEDIT_CACHE_DIR` when set, else `.cache/` at the root of the checkout this package lives in."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / ".cache"


def cache_dir(kind: str, key: str, root: str | os.PathLike | None = None) -> Path:
    """`<root>/<kind>/<key>` (root defaults to `cache_root()`); nothing is created."""
    return Path(root) / kind / key if root is not None else cache_root() / kind / key


def content_key(payload: Any) -> str:
    """A short stable hash of a JSON-serialisable payload (dict keys sorted)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def read_marker(path: str | os.PathLike) -> dict | None:
    """The marker's `info` dict when the entry at `path` is complete, else None."""
    marker = Path(path) / MARKER
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
        files = data["files"]
        info = data["info"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for rel, size in files.items():
        f = Path(path) / rel
        if not f.is_file() or f.stat().st_size != size:
            return None
    return info


def write_marker(path: str | os.PathLike, info: dict) -> None:
    """Write the marker last: every file now under `path` with its size, plus `info`."""
    root = Path(path)
    files = {
        str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file() and p.name != MARKER
    }
    write_json(root / MARKER, {"files": files, "info": info}, indent=1)


def ensure_dir(path: str | os.PathLike, build: Callable[[Path], dict]) -> tuple[Path, dict, bool]:
    """Return `(path, info, built)`, building the entry with `build(tmp_dir) -> info` when it is missing or
    incomplete.

    `build` fills the temporary directory it is given and returns the JSON-serialisable `info` stored in the
    marker. An incomplete entry found at `path` is removed first.
    """
    path = Path(path)
    info = read_marker(path)
    if info is not None:
        return path, info, False
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        info = build(tmp)
        write_marker(tmp, info)
        try:
            os.replace(tmp, path)
        except OSError:  # another builder published first: use theirs
            if read_marker(path) is None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    final = read_marker(path)
    if final is None:
        raise RuntimeError(
            f"cache entry {str(path)!r} was built but its marker does not verify; "
            "check free disk space and that nothing else writes into the cache"
        )
    return path, final, True

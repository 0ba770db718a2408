"""A stream's storage: atomic checkpoints, the ledger, results and progress, never pickled.

Layout under `<storage_path>/<run_name>/`:

    checkpoints/step-000012/     editable.safetensors + editable.json  (the method's state, tensors + plain data)
                                  objective.safetensors + objective.json (the lambda-network)
                                  stream.json (next step, ledger, result rows, retention curve, pre-edit scores)
                                  COMPLETE (written last: the name and the sha256 of every part)
    checkpoints/LATEST           name of the newest complete checkpoint (replaced atomically)
    checkpoints/bad-step-000012/ a checkpoint that failed its checks on resume, kept aside with REASON
    results/                     rows.parquet, curve.json, ledger.jsonl, summary.json, plots
    progress.json                {"done": n, "total": N} for the driver's progress bar
    applied.jsonl                a line per step applied (step, edit ids, writer pid): a step re-applied after a
                                 restart appears once per application (issue 19 item 22)
    workers/rank-<r>.pid         worker process ids (for operators and fault tests)

A checkpoint is written into a temporary directory and renamed into place, then LATEST is replaced: a write
interrupted at any point leaves the previous checkpoint valid. Tensors go to safetensors, everything else to
JSON; loading never unpickles anything.

Trust on resume (issue 19 items 5, 6): `COMPLETE` holds the sha256 of every part, verified before any tensor
is read; the caller's `check` then compares the stream state with the stream (`odedit.stream.StreamRunner.
check_state`). `RunStore.resume` takes the newest checkpoint that passes, moves each one that does not aside
(`bad-<name>`, nothing is deleted) and says which it skipped and why.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.storage.jsonio import write_json

LATEST = "LATEST"
COMPLETE = "COMPLETE"
BAD_PREFIX = "bad-"
STREAM_FILE = "stream.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (corrupt, another model, another method)."""


# ---------------------------------------------------------------------------------------------- safe state files


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested structure by {"__tensor__": key}, collecting them."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "_"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {str(k): _split(v, f"{prefix}/{k}" if prefix else str(k), tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a checkpoint (tensors and plain data only)")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_bytes(path: str, data: bytes) -> str:
    with open(path, "wb") as fh:
        fh.write(data)
    return _sha256(data)


def _file_sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return _sha256(fh.read())


def _read_verified(directory: str, file: str, digests: Mapping[str, str] | None) -> bytes:
    """The bytes of `file`, checked against its recorded sha256 first when `digests` is given (issue 19 item 5)."""
    path = os.path.join(directory, file)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise CheckpointError(f"checkpoint part {file!r} in {directory!r} is unreadable ({exc})") from None
    if digests is not None:
        want = digests.get(file)
        if want is None:
            raise CheckpointError(f"checkpoint {directory!r}: its {COMPLETE} marker records no checksum for {file!r}")
        if _sha256(data) != want:
            raise CheckpointError(
                f"checkpoint part {file!r} in {directory!r} does not match the sha256 in its {COMPLETE} marker "
                "(changed or damaged after it was written)"
            )
    return data


def save_state(directory: str, name: str, state: Any) -> dict[str, str]:
    """Write `state` (nested dicts/lists of tensors and plain data) as `<name>.safetensors` + `<name>.json`;
    returns the sha256 of each file written."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    digests = {f"{name}.safetensors": _write_bytes(os.path.join(directory, f"{name}.safetensors"), save(tensors))}
    write_json(os.path.join(directory, f"{name}.json"), skeleton, indent=None)
    digests[f"{name}.json"] = _file_sha256(os.path.join(directory, f"{name}.json"))
    return digests


def load_state(directory: str, name: str, digests: Mapping[str, str] | None = None) -> Any:
    """Read what `save_state` wrote; a missing or corrupt file (or, given `digests`, one whose sha256 differs,
    checked before any tensor is read) raises `CheckpointError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    blob = _read_verified(directory, f"{name}.safetensors", digests)
    text = _read_verified(directory, f"{name}.json", digests)
    try:
        tensors = load(blob)
        skeleton = json.loads(text.decode("utf-8"))
    except (ValueError, SafetensorError) as exc:
        raise CheckpointError(
            f"checkpoint part {name!r} in {directory!r} is unreadable ({exc}); the run resumes from the "
            "previous complete checkpoint"
        ) from None
    try:
        return _join(skeleton, tensors)
    except KeyError as exc:
        raise CheckpointError(f"checkpoint part {name!r} in {directory!r} lacks tensor {exc}") from None


def read_marker(path: str) -> dict[str, Any]:
    """The `COMPLETE` marker of checkpoint `path`: {"name": ..., "sha256": {part file: digest}}."""
    try:
        with open(os.path.join(path, COMPLETE), encoding="utf-8") as fh:
            marker = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path!r}: its {COMPLETE} marker is unreadable or was written before checkpoints recorded "
            f"checksums ({exc})"
        ) from None
    if not isinstance(marker, dict) or not isinstance(marker.get("sha256"), dict):
        raise CheckpointError(f"checkpoint {path!r}: its {COMPLETE} marker records no checksums")
    return marker


@dataclass
class Resumed:
    """What `RunStore.resume` found: the checkpoint used (None: start afresh) and the ones set aside."""

    path: str | None = None
    editable: Any = None
    objective: Any = None
    stream: dict[str, Any] | None = None
    set_aside: list[tuple[str, str]] = field(default_factory=list)  # (new location, reason)


# ---------------------------------------------------------------------------------------------- run store


class RunStore:
    """The storage directory of one stream (see the module docstring)."""

    def __init__(self, run_dir: str, keep: int = 2) -> None:
        self.run_dir = run_dir
        self.ckpt_dir = os.path.join(run_dir, "checkpoints")
        self.results_dir = os.path.join(run_dir, "results")
        self.keep = keep

    def ensure(self) -> RunStore:
        for d in (self.run_dir, self.ckpt_dir, self.results_dir, os.path.join(self.run_dir, "workers")):
            os.makedirs(d, exist_ok=True)
        return self

    # ------------------------------------------------------------------ checkpoints

    def write_checkpoint(self, step: int, editable: Any, objective: Any, stream: dict[str, Any]) -> str:
        """Write checkpoint `step` atomically and point LATEST at it; returns its directory. `COMPLETE`, written
        last, records the sha256 of every part (issue 19 item 5)."""
        self.ensure()
        name = f"step-{step:06d}"
        final = os.path.join(self.ckpt_dir, name)
        tmp = os.path.join(self.ckpt_dir, f".tmp-{name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        digests = save_state(tmp, "editable", editable)
        digests.update(save_state(tmp, "objective", objective))
        write_json(os.path.join(tmp, STREAM_FILE), stream, indent=None)
        digests[STREAM_FILE] = _file_sha256(os.path.join(tmp, STREAM_FILE))
        write_json(os.path.join(tmp, COMPLETE), {"name": name, "sha256": digests}, indent=None)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._set_latest(name)
        self._prune(name)
        return final

    def _set_latest(self, name: str) -> None:
        path = os.path.join(self.ckpt_dir, LATEST)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(name)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def _prune(self, newest: str) -> None:
        done = sorted(d for d in os.listdir(self.ckpt_dir) if d.startswith("step-"))
        for d in done[: -self.keep]:
            if d != newest:
                shutil.rmtree(os.path.join(self.ckpt_dir, d), ignore_errors=True)

    def complete(self) -> list[str]:
        """The COMPLETE checkpoint directories, the one LATEST names first, then newest first."""
        if not os.path.isdir(self.ckpt_dir):
            return []
        candidates = []
        pointer = os.path.join(self.ckpt_dir, LATEST)
        if os.path.isfile(pointer):
            with open(pointer, encoding="utf-8") as fh:
                candidates.append(fh.read().strip())
        candidates += sorted((d for d in os.listdir(self.ckpt_dir) if d.startswith("step-")), reverse=True)
        out: list[str] = []
        for name in candidates:
            path = os.path.join(self.ckpt_dir, name)
            if name.startswith("step-") and path not in out and os.path.isfile(os.path.join(path, COMPLETE)):
                out.append(path)
        return out

    def latest(self) -> str | None:
        """The newest COMPLETE checkpoint directory (LATEST, else the newest complete one on disk), or None."""
        found = self.complete()
        return found[0] if found else None

    def read_checkpoint(
        self, path: str, check: Callable[[dict[str, Any]], None] | None = None
    ) -> tuple[Any, Any, dict[str, Any]]:
        """The editable state, objective state and stream state of checkpoint `path`.

        Every part's sha256 is checked against the `COMPLETE` marker before any of it is parsed; `check`, when
        given, is then called with the stream state (it raises `ValueError` for a state that does not fit the
        stream). Any failure raises `CheckpointError` naming the checkpoint.
        """
        digests = read_marker(path)["sha256"]
        text = _read_verified(path, STREAM_FILE, digests)
        editable = load_state(path, "editable", digests)
        objective = load_state(path, "objective", digests)
        try:
            stream = json.loads(text.decode("utf-8"))
        except ValueError as exc:
            raise CheckpointError(f"stream state in {path!r} is unreadable ({exc})") from None
        if check is not None:
            try:
                check(stream)
            except CheckpointError:
                raise
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"checkpoint {path!r}: {exc}") from None
        return editable, objective, stream

    def set_aside(self, path: str, reason: str) -> str:
        """Move a checkpoint that failed its checks to `bad-<name>[-n]` with a REASON file; returns where."""
        base = os.path.join(self.ckpt_dir, BAD_PREFIX + os.path.basename(path.rstrip(os.sep)))
        dest, n = base, 1
        while os.path.exists(dest):
            n += 1
            dest = f"{base}-{n}"
        os.replace(path, dest)
        with open(os.path.join(dest, "REASON"), "w", encoding="utf-8") as fh:
            fh.write(reason + "\n")
        return dest

    def resume(self, check: Callable[[dict[str, Any]], None] | None = None, set_aside: bool = True) -> Resumed:
        """The newest checkpoint that passes every check (issue 19 item 6).

        Each newer one that fails is moved aside (`set_aside`, when this process is the run's writer) and
        named in `Resumed.set_aside`, newest first; with none left the stream starts afresh ([INFERENCE]: the
        model is loaded from its original weights then, so re-editing from the start is exact; a run that
        refused to start would leave the operator the same choice by hand).
        """
        out = Resumed()
        for path in self.complete():
            try:
                out.editable, out.objective, out.stream = self.read_checkpoint(path, check)
            except CheckpointError as exc:
                where = self.set_aside(path, str(exc)) if set_aside else path
                out.set_aside.append((where, str(exc)))
                continue
            out.path = path
            return out
        return out

    # ------------------------------------------------------------------ progress and results

    def write_progress(self, done: int, total: int, **extra: Any) -> None:
        write_json(os.path.join(self.run_dir, "progress.json"), {"done": done, "total": total, **extra})

    def read_progress(self) -> dict[str, Any] | None:
        try:
            with open(os.path.join(self.run_dir, "progress.json"), encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def append_applied(self, step: int, edit_ids: list[str]) -> None:
        """Journal one applied step (see the module docstring)."""
        with open(os.path.join(self.run_dir, "applied.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "edits": edit_ids, "pid": os.getpid()}) + "\n")

    def read_applied(self) -> list[dict[str, Any]]:
        try:
            with open(os.path.join(self.run_dir, "applied.jsonl"), encoding="utf-8") as fh:
                return [json.loads(line) for line in fh if line.strip()]
        except OSError:
            return []

    def write_pid(self, rank: int) -> None:
        with open(os.path.join(self.run_dir, "workers", f"rank-{rank}.pid"), "w", encoding="utf-8") as fh:
            fh.write(str(os.getpid()))

    def write_node(self, rank: int, node_id: str) -> None:
        """Which Ray node rank `rank` runs on (rewritten when the worker group restarts elsewhere)."""
        with open(os.path.join(self.run_dir, "workers", f"rank-{rank}.node"), "w", encoding="utf-8") as fh:
            fh.write(node_id)

    def worker_nodes(self) -> dict[int, str]:
        d = os.path.join(self.run_dir, "workers")
        out = {}
        for name in os.listdir(d) if os.path.isdir(d) else []:
            if name.endswith(".node"):
                with open(os.path.join(d, name), encoding="utf-8") as fh:
                    out[int(name.split("-")[1].split(".")[0])] = fh.read().strip()
        return out

    def worker_pids(self) -> dict[int, int]:
        out = {}
        d = os.path.join(self.run_dir, "workers")
        for name in os.listdir(d) if os.path.isdir(d) else []:
            if not name.endswith(".pid"):
                continue
            with open(os.path.join(d, name), encoding="utf-8") as fh:
                out[int(name.split("-")[1].split(".")[0])] = int(fh.read().strip())
        return out

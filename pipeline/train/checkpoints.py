"""A stream's storage: atomic checkpoints, the ledger, results and progress, never pickled.

Layout under `<storage_path>/<run_name>/`:

    checkpoints/step-000012/     editable.safetensors + editable.json  (the method's state, tensors + plain data)
                                  objective.safetensors + objective.json (the lambda-network)
                                  stream.json (next step, ledger, result rows, retention curve, pre-edit scores)
                                  COMPLETE (written last)
    checkpoints/LATEST           name of the newest complete checkpoint (replaced atomically)
    results/                     rows.parquet, curve.json, ledger.jsonl, summary.json, plots
    progress.json                {"done": n, "total": N} for the driver's progress bar
    workers/rank-<r>.pid         worker process ids (for operators and fault tests)

A checkpoint is written into a temporary directory and renamed into place, then LATEST is replaced: a write
interrupted at any point leaves the previous checkpoint valid. Tensors go to safetensors, everything else to
JSON; loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch

from pipeline.storage.jsonio import write_json

LATEST = "LATEST"
COMPLETE = "COMPLETE"


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


def save_state(directory: str, name: str, state: Any) -> None:
    """Write `state` (nested dicts/lists of tensors and plain data) as `<name>.safetensors` + `<name>.json`."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    save_file(tensors, os.path.join(directory, f"{name}.safetensors"))
    write_json(os.path.join(directory, f"{name}.json"), skeleton, indent=None)


def load_state(directory: str, name: str) -> Any:
    """Read what `save_state` wrote; a missing or corrupt file raises `CheckpointError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st = os.path.join(directory, f"{name}.safetensors")
    js = os.path.join(directory, f"{name}.json")
    try:
        tensors = load_file(st)
        with open(js, encoding="utf-8") as fh:
            skeleton = json.load(fh)
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(
            f"checkpoint part {name!r} in {directory!r} is unreadable ({exc}); delete that "
            "checkpoint directory to fall back to the previous one"
        ) from None
    try:
        return _join(skeleton, tensors)
    except KeyError as exc:
        raise CheckpointError(f"checkpoint part {name!r} in {directory!r} lacks tensor {exc}") from None


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
        """Write checkpoint `step` atomically and point LATEST at it; returns its directory."""
        self.ensure()
        name = f"step-{step:06d}"
        final = os.path.join(self.ckpt_dir, name)
        tmp = os.path.join(self.ckpt_dir, f".tmp-{name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_state(tmp, "editable", editable)
        save_state(tmp, "objective", objective)
        write_json(os.path.join(tmp, "stream.json"), stream, indent=None)
        with open(os.path.join(tmp, COMPLETE), "w", encoding="utf-8") as fh:
            fh.write(name)
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

    def latest(self) -> str | None:
        """The newest COMPLETE checkpoint directory (LATEST, else the newest complete one on disk), or None."""
        if not os.path.isdir(self.ckpt_dir):
            return None
        candidates = []
        pointer = os.path.join(self.ckpt_dir, LATEST)
        if os.path.isfile(pointer):
            with open(pointer, encoding="utf-8") as fh:
                candidates.append(fh.read().strip())
        candidates += sorted((d for d in os.listdir(self.ckpt_dir) if d.startswith("step-")), reverse=True)
        for name in candidates:
            path = os.path.join(self.ckpt_dir, name)
            if name and os.path.isfile(os.path.join(path, COMPLETE)):
                return path
        return None

    def read_checkpoint(self, path: str) -> tuple[Any, Any, dict[str, Any]]:
        editable = load_state(path, "editable")
        objective = load_state(path, "objective")
        try:
            with open(os.path.join(path, "stream.json"), encoding="utf-8") as fh:
                stream = json.load(fh)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"stream state in {path!r} is unreadable ({exc})") from None
        return editable, objective, stream

    # ------------------------------------------------------------------ progress and results

    def write_progress(self, done: int, total: int, **extra: Any) -> None:
        write_json(os.path.join(self.run_dir, "progress.json"), {"done": done, "total": total, **extra})

    def read_progress(self) -> dict[str, Any] | None:
        try:
            with open(os.path.join(self.run_dir, "progress.json"), encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

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

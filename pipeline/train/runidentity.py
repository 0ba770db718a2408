"""What a stream is, so that resuming a run never mixes two configurations.

    identity = stream_identity(cfg, model_path, shards_dir, num_edits, offset)
    claim_run(store, identity, cfg.stream.on_change)      # before any worker starts

Re-submitting a stream with the same `stream.run_name` resumes it from its newest checkpoint. That is only
right when the run's checkpoint was written by the same stream: the same model, editor, ODEdit settings, edits
and seed. A checkpoint of another configuration (say, the demo re-run after the demo model was retrained, or
after `method.lr` changed) would load one model's edited weights into another and splice two streams into one
result. So every run directory records its identity in `run.json` (the resolved settings that decide what the
stream computes); a run directory whose identity differs is not resumed:

* `stream.on_change: error` (default): stop with the settings that differ and the two ways out;
* `stream.on_change: replace`: move the old run directory aside (`<run>.replaced-<n>`, nothing is deleted) and
  start the stream afresh under the same name (what `make demo` does: it always shows the current config).

Not part of the identity: where things are stored and logged (`stream.storage_path`, `output_dir`,
`tracking.*`), how often checkpoints are written, and the resources (a stopped run may resume on another
number of workers).
"""

from __future__ import annotations

import json
import os
from typing import Any

from odedit.configlib import flatten, to_dict
from pipeline.data.shards import read_manifest
from pipeline.storage.jsonio import write_json

RUN_FILE = "run.json"
# Settings that do not change what a stream computes.
_NOT_IDENTITY = ("stream.run_name", "stream.storage_path", "stream.checkpoint_every", "stream.on_change")
_IDENTITY_SECTIONS = ("model.", "method.", "odedit.", "stream.", "seed", "data.split")


class RunMismatch(ValueError):
    """A run directory holds another stream than the one being started."""


def stream_identity(cfg: Any, model_path: str, shards_dir: str, num_edits: int, offset: int) -> dict[str, Any]:
    """The flat settings that decide what a stream computes (see the module docstring)."""

    flat = flatten(to_dict(cfg))
    identity = {k: v for k, v in flat.items() if k.startswith(_IDENTITY_SECTIONS) and k not in _NOT_IDENTITY}
    identity.update(
        {
            "model.path": os.path.abspath(model_path),
            "shards.config_hash": read_manifest(shards_dir)["config_hash"],
            "stream.edits": num_edits,
            "stream.offset": offset,
        }
    )
    return {k: identity[k] for k in sorted(identity)}


def _started(run_dir: str) -> bool:
    """Whether the directory holds anything of a stream (a checkpoint, results or progress)."""
    for sub in ("checkpoints", "results"):
        path = os.path.join(run_dir, sub)
        if os.path.isdir(path) and os.listdir(path):
            return True
    return os.path.isfile(os.path.join(run_dir, "progress.json"))


def _differences(old: dict[str, Any], new: dict[str, Any], limit: int = 8) -> list[str]:
    keys = sorted(set(old) | set(new))
    diff = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys if old.get(k) != new.get(k)]
    return diff[:limit] + ([f"... and {len(diff) - limit} more"] if len(diff) > limit else [])


def claim_run(run_dir: str, identity: dict[str, Any], on_change: str) -> str:
    """Make `run_dir` the home of the stream `identity`; returns what happened: "new", "resume" or "replaced".

    Raises:
        RunMismatch: the directory holds another stream and `on_change` is "error".
    """
    path = os.path.join(run_dir, RUN_FILE)
    old: dict[str, Any] | None = None
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                old = json.load(fh)["identity"]
        except (OSError, ValueError, KeyError, TypeError):
            old = None
    outcome = "new"
    if _started(run_dir) or old is not None:
        if old == identity:
            return "resume"
        name = os.path.basename(run_dir.rstrip(os.sep))
        if on_change != "replace":
            what = (
                "it was started by a version that did not record its settings"
                if old is None
                else "its settings differ: " + "; ".join(_differences(old, identity))
            )
            raise RunMismatch(
                f"stream.run_name={name!r}: the run directory {run_dir} holds another stream ({what}), so it "
                f"cannot be resumed. Fix: choose a new stream.run_name, or set stream.on_change=replace to move "
                f"the old run aside and start afresh"
            )
        n = 1
        while os.path.exists(f"{run_dir}.replaced-{n}"):
            n += 1
        os.replace(run_dir, f"{run_dir}.replaced-{n}")
        outcome = "replaced"
    os.makedirs(run_dir, exist_ok=True)
    write_json(path, {"identity": identity})
    return outcome

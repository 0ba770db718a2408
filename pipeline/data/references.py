"""Pre-edit reference outputs on the OUT environments, computed once with the unedited model (Ray Data).

    manifest, reused = build_references(shards_dir, cfg.model, model_dir, k=cfg.data.reference_k)

Locality (T-Loc, M-Loc, M-Loc-hard, R_loc) compares the edited model with the *unedited* one (reference.md
§1.4: EasyEdit once compared the edited model with itself, issue #643). So the unedited model's top-K token
ids and log-probabilities at every answer position of every OUT-text / OUT-mm / OUT-hard sample are
computed before any edit and stored beside the shards:

    <shards_dir>/references/ref-<n>.parquet     REFERENCE_SCHEMA rows of the OUT samples of env-<n>.parquet
    <shards_dir>/references/manifest.json       written last: k, model identity, shard fingerprint, counts

The shards are read with `ray.data.read_parquet`, IN/SE rows are dropped by a pure batch filter, and
`ReferenceModel`, a callable class, loads the model ONCE per actor (`odedit.models.load_adapter`) and runs
`odedit.envs.compute_references` on each batch. Re-running with the same shards, model files, model settings
and K reuses the stored references.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
from collections import Counter, defaultdict
from typing import Any

from odedit.envs import OUT_ENVS, compute_references
from odedit.models import load_adapter
from odedit.models.base import Sample
from pipeline.data.envrows import row_sort_key
from pipeline.data.images import decode_png
from pipeline.data.schema import ENV_SCHEMA, REFERENCE_SCHEMA, read_table, to_table, write_table
from pipeline.data.shards import MANIFEST, REFERENCES_DIR, read_manifest, reference_path
from pipeline.reporting.progress import quiet_ray_data
from pipeline.storage.jsonio import write_json

_INPUT_COLUMNS = ["edit_id", "edit_index", "env", "sample_index", "prompt", "target", "image"]


def model_identity(model_cfg: Any, name_or_path: str) -> dict:
    """What the references depend on: the model settings (not the device) and, for a local directory, the
    size and mtime of each file in it (hashing multi-GB weights would cost more than recomputing)."""
    settings = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in ("device", "name_or_path")}
    files = {}
    if os.path.isdir(name_or_path):
        for name in sorted(os.listdir(name_or_path)):
            path = os.path.join(name_or_path, name)
            if os.path.isfile(path):
                st = os.stat(path)
                files[name] = [st.st_size, st.st_mtime_ns]
    return {
        "name_or_path": os.path.basename(os.path.normpath(name_or_path)) if files else name_or_path,
        "settings": settings,
        "files": files,
    }


def out_rows(batch: Any) -> Any:
    """Pure batch filter (pyarrow): keep the OUT-environment rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch["env"], value_set=pa.array(OUT_ENVS)))


class ReferenceModel:
    """Ray Data callable class: the unedited model, loaded once per actor, scoring batches of OUT rows."""

    def __init__(self, model_cfg: Any, name_or_path: str, k: int, batch_size: int = 16) -> None:
        self.adapter = load_adapter(model_cfg, name_or_path)
        self.k = k
        self.batch_size = batch_size

    def __call__(self, batch: Any) -> Any:
        rows = batch.to_pylist()
        samples = [
            Sample(r["prompt"], r["target"], decode_png(r["image"]) if r["image"] is not None else None) for r in rows
        ]
        refs = compute_references(self.adapter, samples, k=self.k, batch_size=self.batch_size)
        out = []
        for r, ref in zip(rows, refs):
            n, k = (int(d) for d in ref.topk_ids.shape)
            out.append(
                {
                    "edit_id": r["edit_id"],
                    "edit_index": r["edit_index"],
                    "env": r["env"],
                    "sample_index": r["sample_index"],
                    "topk_ids": ref.topk_ids.reshape(-1).tolist(),
                    "topk_logprobs": ref.topk_logprobs.reshape(-1).tolist(),
                    "n_positions": n,
                    "k": k,
                }
            )
        return to_table(out, REFERENCE_SCHEMA, "ReferenceModel output")


def read_reference_manifest(shards_dir: str) -> dict | None:
    """The references manifest, or None when no complete reference build is stored."""
    try:
        with open(os.path.join(shards_dir, REFERENCES_DIR, MANIFEST), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def build_references(
    shards_dir: str,
    model_cfg: Any,
    name_or_path: str,
    k: int,
    workers: int = 1,
    batch_size: int = 16,
    num_gpus: float = 0.0,
    reuse: bool = True,
) -> tuple[dict, bool]:
    """Compute (or reuse) the references of every OUT sample of the shards; return (manifest, reused).

    Args:
        workers: model actors (each loads the model once); num_gpus: GPUs per actor (0 on CPU).
    """
    shards = read_manifest(shards_dir)
    identity = {"shards": shards["config_hash"], "k": k, "model": model_identity(model_cfg, name_or_path)}
    existing = read_reference_manifest(shards_dir)
    if (
        reuse
        and existing is not None
        and existing.get("identity") == identity
        and all(os.path.isfile(os.path.join(shards_dir, REFERENCES_DIR, f)) for f in existing.get("files", []))
    ):
        return existing, True
    ref_dir = os.path.join(shards_dir, REFERENCES_DIR)
    os.makedirs(ref_dir, exist_ok=True)
    for name in os.listdir(ref_dir):  # manifest first: a crash must not leave a stale "complete" directory
        if name == MANIFEST:
            os.remove(os.path.join(ref_dir, name))
    for name in os.listdir(ref_dir):
        os.remove(os.path.join(ref_dir, name))
    with_out = [s for s in shards["shards"] if any(s["rows_by_env"].get(e) for e in OUT_ENVS)]
    rows = _score(shards_dir, with_out, model_cfg, name_or_path, k, workers, batch_size, num_gpus) if with_out else []
    starts = [s["first_edit_index"] for s in with_out]
    per_shard: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        per_shard[bisect.bisect_right(starts, r["edit_index"]) - 1].append(r)
    files = []
    for i, shard in enumerate(with_out):
        path = reference_path(shards_dir, shard["file"])
        shard_rows = sorted(per_shard[i], key=row_sort_key)
        write_table(to_table(shard_rows, REFERENCE_SCHEMA, path), path, REFERENCE_SCHEMA)
        files.append(os.path.basename(path))
    manifest = {
        "identity": identity,
        "k": k,
        "rows": len(rows),
        "rows_by_env": dict(sorted(Counter(r["env"] for r in rows).items())),
        "files": files,
    }
    write_json(os.path.join(ref_dir, MANIFEST), manifest)
    return manifest, False


def _score(
    shards_dir: str,
    shards: list[dict],
    model_cfg: Any,
    name_or_path: str,
    k: int,
    workers: int,
    batch_size: int,
    num_gpus: float,
) -> list[dict]:
    import ray.data

    paths = [os.path.join(shards_dir, s["file"]) for s in shards]
    for path in paths:  # the declared schema is checked on read, before Ray Data sees the files
        read_table(path, ENV_SCHEMA, columns=["edit_id"])
    # Leave a CPU for the read tasks: actors holding every CPU would starve the reads feeding them (deadlock).
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = max(1, min(workers, cpus - 1)) if not num_gpus else max(1, workers)
    quiet_ray_data()  # no bar redraws in a job's log
    ds = ray.data.read_parquet(paths, columns=_INPUT_COLUMNS)
    ds = ds.map_batches(out_rows, batch_format="pyarrow")
    ds = ds.map_batches(
        ReferenceModel,
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=1,
        num_gpus=num_gpus or None,
        compute=ray.data.ActorPoolStrategy(size=max(1, workers)),
        fn_constructor_kwargs={"model_cfg": model_cfg, "name_or_path": name_or_path, "k": k, "batch_size": batch_size},
    )
    batches = ds.iter_batches(batch_format="pyarrow", batch_size=None)
    return [row for batch in batches for row in batch.to_pylist()]

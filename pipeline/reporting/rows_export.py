"""A stream's per-edit result rows (`rows.parquet`) as a Hugging Face dataset beside the parquet.

    out = export_rows("outputs/demo/storage/<run>/results/rows.parquet")   # -> .../results/rows_hf/
    paths = find_rows(["outputs/demo"])                                     # every rows.parquet under a folder

`python -m jobs.export_hf <job output dir, run dir or rows.parquet> ...` runs it. The dataset has the parquet's
columns and types (per-edit metrics as the edit engine wrote them), written with `save_to_disk` into
`rows_hf/` next to the parquet (or `out_dir`), replacing an earlier export in one rename, so
`datasets.load_from_disk` gives the same rows in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from pipeline.storage.hfdatasets import write_dataset

ROWS_FILE = "rows.parquet"
EXPORT_DIR = "rows_hf"
RESULTS_DIR = "results"  # a stream's results folder (pipeline.train.checkpoints)
SKIP_DIRS = {EXPORT_DIR, "mlartifacts", "mlruns", "shards"}


def find_rows(paths: Iterable[str]) -> list[str]:
    """The `rows.parquet` files `paths` name: a file itself, or under a folder every stream's
    `<run>/results/rows.parquet` (not the copies in checkpoints or in MLflow's artifact store), sorted."""
    found: list[str] = []
    for path in paths:
        if os.path.isfile(path):
            found.append(os.path.abspath(path))
            continue
        for dirpath, dirnames, files in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("checkpoint_"))
            if ROWS_FILE in files and os.path.basename(dirpath) == RESULTS_DIR:
                found.append(os.path.abspath(os.path.join(dirpath, ROWS_FILE)))
    return sorted(dict.fromkeys(found))


def export_rows(parquet_path: str, out_dir: str = "") -> dict:
    """Write the rows of `parquet_path` as a Hugging Face dataset; return {"path", "rows"}."""
    import datasets
    import pyarrow.parquet as pq

    table = pq.read_table(parquet_path)
    features = datasets.Features.from_arrow_schema(table.schema)
    rows = table.to_pylist()
    out = out_dir or os.path.join(os.path.dirname(os.path.abspath(parquet_path)), EXPORT_DIR)
    return write_dataset(lambda: iter(rows), features, out) | {"rows": len(rows)}

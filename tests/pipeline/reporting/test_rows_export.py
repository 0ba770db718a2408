"""pipeline.reporting.rows_export and jobs.export_hf: result rows as Hugging Face datasets beside the parquet."""

from __future__ import annotations

import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.export_hf import cli
from pipeline.reporting.rows_export import EXPORT_DIR, export_rows, find_rows

datasets = pytest.importorskip("datasets")

ROWS = [
    {"edit_id": "e0", "rel": 1.0, "t_loc": 0.5, "m_loc_hard": float("nan"), "failed": "", "iterations": 4},
    {"edit_id": "e1", "rel": 0.0, "t_loc": 1.0, "m_loc_hard": 0.25, "failed": "oom", "iterations": 10},
]


def write_run(root, name: str) -> str:
    results = os.path.join(root, "storage", name, "results")
    os.makedirs(results)
    path = os.path.join(results, "rows.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    checkpoint = os.path.join(root, "storage", name, "checkpoint_0001")  # a copy that is not exported
    os.makedirs(checkpoint)
    pq.write_table(pa.Table.from_pylist(ROWS), os.path.join(checkpoint, "rows.parquet"))
    return path


def test_rows_round_trip_with_their_types(tmp_path):
    path = write_run(str(tmp_path), "run-a")
    written = export_rows(path)
    assert written == {"path": os.path.join(os.path.dirname(path), EXPORT_DIR), "rows": 2}
    ds = datasets.load_from_disk(written["path"])
    assert ds.column_names == list(ROWS[0]) and ds.features["iterations"].dtype == "int64"
    assert ds[1] == ROWS[1] and ds[0]["edit_id"] == "e0" and math.isnan(ds[0]["m_loc_hard"])


def test_the_job_exports_every_stream_of_an_output_dir(tmp_path, capsys):
    paths = [write_run(str(tmp_path), name) for name in ("run-a", "run-b")]
    assert find_rows([str(tmp_path)]) == sorted(paths)
    assert cli([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("2 rows:") == 2
    for path in paths:
        assert os.path.isdir(os.path.join(os.path.dirname(path), EXPORT_DIR))
    assert find_rows([str(tmp_path)]) == sorted(paths)  # the exports are not rows to export
    assert cli([str(tmp_path), "--out", str(tmp_path / "x")]) == 2  # --out takes one file
    assert cli([str(tmp_path / "nothing")]) == 2

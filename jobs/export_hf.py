"""Export result rows (per-edit metrics, `rows.parquet`) as Hugging Face datasets next to the parquet.

    python -m jobs.export_hf outputs/demo                         # every rows.parquet under a job's output dir
    python -m jobs.export_hf outputs/demo/storage/<run>/results/rows.parquet [--out DIR]

Each `rows.parquet` gets a `rows_hf/` folder beside it, written with `save_to_disk` (the parquet's columns and
types, the same rows in the same order), so `datasets.load_from_disk(".../results/rows_hf")` loads exactly what
a stream measured (`pipeline.reporting.rows_export`). The records a stream edited are exported by `jobs.prepare`
with `data.export_hf=<dir>`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jobs.common import job_prog, purpose, run
from pipeline.reporting.rows_export import export_rows, find_rows


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=job_prog(),
        description=purpose(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths", nargs="+", help="rows.parquet files, or folders searched for them (a job's output dir)"
    )
    parser.add_argument(
        "--out", default="", help="where to write the dataset (one rows.parquet only); default: beside it"
    )
    args = parser.parse_args(argv)
    found = find_rows(args.paths)
    if not found:
        print(f"error: no rows.parquet in {', '.join(args.paths)}", file=sys.stderr)
        return 2
    if args.out and len(found) > 1:
        print(
            f"error: --out takes one rows.parquet; {len(found)} were found (drop --out to write each beside its own)",
            file=sys.stderr,
        )
        return 2
    for path in found:
        written = export_rows(path, args.out)
        print(f"{written['rows']} rows: {path} -> {written['path']}")
    return 0


if __name__ == "__main__":
    run(cli)

"""Replay MLflow outboxes (written while the tracking server was unreachable) into MLflow.

python -m jobs.sync_mlflow <storage_path>/<run_name>/mlflow_outbox.jsonl [--uri http://head:5000]
python -m jobs.sync_mlflow <output_dir> [<storage_path> ...]   # every outbox under these directories

A stream keeps one outbox, in its run directory, shared by the driver and rank 0. Several outboxes given together
(or found under a directory) are replayed with one map of offline run ids, parents first, so nested offline runs
and records of one run kept in several outboxes (older layouts) land in the run they belong to (issue 19 item 10).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from jobs.common import run


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Replay MLflow outbox files into MLflow.")
    parser.add_argument(
        "outbox", nargs="+", help="mlflow_outbox.jsonl files, or directories searched for them (recursively)"
    )
    parser.add_argument("--uri", default=None, help="tracking URI (default: the one recorded with each entry)")
    args = parser.parse_args(argv)
    for path in args.outbox:
        if not os.path.exists(path):
            print(
                f"error: outbox: {path!r} does not exist; a stream's outbox is "
                "<storage_path>/<run_name>/mlflow_outbox.jsonl (or name a directory to replay every outbox in it)",
                file=sys.stderr,
            )
            return 2
    # deferred: MLflow loads only after the arguments parse (fast --help, argument errors)
    from pipeline.reporting.tracking import OutboxError, find_outboxes, replay_outboxes

    files = find_outboxes(args.outbox)
    if not files:
        print(f"error: outbox: no mlflow_outbox.jsonl under {args.outbox}", file=sys.stderr)
        return 2
    try:
        counts = replay_outboxes(files, args.uri)
    except OutboxError as exc:
        print(f"error: outbox: {exc}", file=sys.stderr)
        return 2
    print(f"replayed {len(files)} outbox(es): {counts}")
    return 0


if __name__ == "__main__":
    run(cli)

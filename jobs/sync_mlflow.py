"""Replay an MLflow outbox (written while the tracking server was unreachable) into MLflow.

python -m jobs.sync_mlflow <storage_path>/<run_name>/mlflow_outbox.jsonl [--uri http://head:5000]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from jobs.common import run


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Replay an MLflow outbox file into MLflow.")
    parser.add_argument("outbox", help="an mlflow_outbox.jsonl file")
    parser.add_argument("--uri", default=None, help="tracking URI (default: the one recorded with each entry)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.outbox):
        print(f"error: outbox: {args.outbox!r} does not exist; it lives in <storage_path>/<run_name>/", file=sys.stderr)
        return 2
    # deferred: Ray, torch and transformers load only after the arguments parse (fast --help, config errors)
    from pipeline.reporting.tracking import replay_outbox

    counts = replay_outbox(args.outbox, args.uri)
    print(f"replayed {counts}")
    return 0


if __name__ == "__main__":
    run(cli)

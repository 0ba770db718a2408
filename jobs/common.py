"""What every job entry point shares: `--config <yaml> [key=value ...]` parsing.

A config with mistakes prints every problem (dotted path, value, hint) and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from odedit.config import Config, ConfigError
from odedit.loading import load_config
from pipeline.data.sources.base import check_source
from pipeline.storage.root import StorageError, resolve_storage


def load_job_config(path: str | None, overrides: Sequence[str], extra_checks: Sequence = ()) -> Config:
    """The config with every location resolved under the storage root; on a bad config or a location that
    would lose results, print all problems and exit 2 (before any work)."""
    try:
        return resolve_storage(load_config(path, overrides, extra_checks=[check_source, *extra_checks]))
    except (ConfigError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def parse_job_args(description: str, argv: Sequence[str] | None = None) -> Config:
    """Parse `--config PATH [key=value ...]`; on a bad config print all problems and exit 2."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as stream.batch_size=16")
    args = parser.parse_args(argv)
    return load_job_config(args.config, args.overrides)


def print_locations(cfg: Config, summary_path: str) -> None:
    """Where the results are, as absolute locations a user can open from the submitting side's shared mount."""
    from pipeline.reporting.tracking import tracking_uri  # deferred: keeps mlflow's import chain off --help

    print(f"summary:   {os.path.abspath(summary_path)}")
    storage = cfg.stream.storage_path or os.path.join(cfg.output_dir, "storage")
    print(f"results:   {storage}/<run>/results/ (rows.parquet, curve.json, plots)")
    if cfg.tracking.enabled:
        uri = tracking_uri(cfg)
        print(f"MLflow:    {uri}")
        print(f"open it:   mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)")

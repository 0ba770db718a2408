"""What every job entry point shares: `--config <yaml> [key=value ...]` parsing.

A config with mistakes prints every problem (dotted path, value, hint) and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from odedit.config import Config, ConfigError
from odedit.loading import load_config
from pipeline.data.sources.base import check_source


def parse_job_args(description: str, argv: Sequence[str] | None = None) -> Config:
    """Parse `--config PATH [key=value ...]`; on a bad config print all problems and exit 2."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as stream.batch_size=16")
    args = parser.parse_args(argv)
    try:
        return load_config(args.config, args.overrides, extra_checks=[check_source])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None

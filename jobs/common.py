"""What every job entry point shares: `--config <yaml> [key=value ...]` parsing and the output directory.

A config with mistakes prints every problem (dotted path, value, hint) and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from odedit.config import Config, ConfigError, dump_config, load_config


def parse_job_args(description: str, argv: Sequence[str] | None = None) -> Config:
    """Parse `--config PATH [key=value ...]`; on a bad config print all problems and exit 2."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as stream.batch_size=16")
    args = parser.parse_args(argv)
    from pipeline.sources.base import check_source

    try:
        return load_config(args.config, args.overrides, extra_checks=[check_source])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def prepare_output_dir(cfg: Config) -> str:
    """Create `cfg.output_dir` and write the resolved config beside the results."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "config.yaml"), "w", encoding="utf-8") as fh:
        fh.write(dump_config(cfg))
    return cfg.output_dir


def write_json(path: str, data: Any) -> str:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False, default=str)
    os.replace(tmp, path)
    return path

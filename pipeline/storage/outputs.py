"""A job's output directory: created once, with the resolved config written beside the results."""

from __future__ import annotations

import os

from odedit.config import Config, dump_config


def prepare_output_dir(cfg: Config) -> str:
    """Create `cfg.output_dir` and write the resolved config (`config.yaml`) into it; returns the directory."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "config.yaml"), "w", encoding="utf-8") as fh:
        fh.write(dump_config(cfg))
    return cfg.output_dir

"""Shared set-up of the benchmarks that run on the embedded demo world (batching, lifelong).

    cfg, model_path, shards = demo_stream_setup(num_edits=256, overrides=[...])

Trains (or reuses) the demo MLLM, prepares the demo world's shards and pre-edit references for `num_edits`
edits (cached by `jobs.prepare`), and returns a config pointing at them, for in-process streams over
`pipeline.data.casesource.ShardCaseSource`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from odedit.loading import load_config
from pipeline.cluster.session import ray_session
from pipeline.experiment import prepared
from pipeline.train.engine import shards_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_stream_setup(num_edits: int, overrides: Sequence[str] = (), name: str = "bench"):
    """(config, model path, shards dir) for a demo-world stream of `num_edits` test edits."""
    out = os.path.join(ROOT, ".cache", "bench", f"{name}-{num_edits}")
    cfg = load_config(
        os.path.join(ROOT, "jobs", "configs", "demo.yaml"),
        [
            f"data.demo.num_edits={num_edits}",
            "data.demo.num_validation_edits=0",
            f"stream.num_edits={num_edits}",
            f"output_dir={out}",
            "tracking.enabled=false",
            *overrides,
        ],
    )
    with ray_session(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False):
        cfg, model_path, _ = prepared(cfg)
    return cfg, model_path, shards_dir(cfg)

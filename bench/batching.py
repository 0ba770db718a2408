"""Batched editing: edits per second at batch_size 16 vs 1, at equal reliability.

    python -m bench.batching [--quick]      # writes bench/results/batching.json

The same sequential stream of demo-world edits (the demo MLLM, host editor FT + ODEdit as in
jobs/configs/demo.yaml) runs in process twice: one edit per step, and 16 edits per step. Throughput counts the
editing itself (the sum of the steps' edit times); reliability is the immediate Rel of each edit (scored right
after its step), the quantity batching could degrade.

Figures: `edits_per_s_ratio_b16_b1` (target >= 8), `rel_drop_points` = 100 x (Rel at batch 1 - Rel at batch
16) (target <= 5); the table also gives end-of-stream Rel and the wall time of both streams.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.common import write_result

TARGETS = {"edits_per_s_ratio_b16_b1": ">= 8", "rel_drop_points": "<= 5"}


def _stream(cfg, model_path, shards, batch_size: int) -> dict:
    import torch

    from odedit.config import with_overrides
    from odedit.editing import Editor
    from odedit.models import load_adapter
    from odedit.stream import StreamRunner
    from pipeline.casesource import ShardCaseSource

    cfg = with_overrides(cfg, [f"stream.batch_size={batch_size}", "stream.eval_every=0",
                               "stream.generation_eval=false", "stream.checkpoint_every=0"])
    torch.manual_seed(cfg.seed)
    adapter = load_adapter(cfg.model, model_path)
    source = ShardCaseSource(shards, "test", cfg.stream.num_edits)
    t0 = time.perf_counter()
    result = StreamRunner(Editor(adapter, cfg), cfg).run(source)
    wall = time.perf_counter() - t0
    per_step = {r["step"]: r["edit_seconds"] for r in result.rows}
    edit_s = sum(per_step.values())
    return {"edits": len(result.rows), "edit_seconds": edit_s, "edits_per_s": len(result.rows) / edit_s,
            "rel_immediate": result.summary["immediate"]["rel"], "rel_final": result.summary["rel"],
            "wall_s": wall, "failed": result.summary["edits_failed"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 edits (under 2 minutes once the demo model exists)")
    args = parser.parse_args(argv)
    from bench.demo_setup import demo_stream_setup

    n = 64 if args.quick else 256
    cfg, model_path, shards = demo_stream_setup(n, name="batching")
    b1 = _stream(cfg, model_path, shards, 1)
    b16 = _stream(cfg, model_path, shards, 16)
    figures = {
        "edits_per_s_ratio_b16_b1": b16["edits_per_s"] / b1["edits_per_s"],
        "rel_drop_points": 100 * (b1["rel_immediate"] - b16["rel_immediate"]),
        "edits_per_s_b1": b1["edits_per_s"], "edits_per_s_b16": b16["edits_per_s"],
        "rel_b1": b1["rel_immediate"], "rel_b16": b16["rel_immediate"],
        "final_rel_b1": b1["rel_final"], "final_rel_b16": b16["rel_final"],
    }
    return write_result("batching", args.quick, figures, TARGETS, {"batch_1": b1, "batch_16": b16, "edits": n,
                                                                    "method": cfg.method.name,
                                                                    "odedit": cfg.odedit.enabled})


if __name__ == "__main__":
    main(sys.argv[1:])

"""Batched editing: edits per second at batch_size 16 vs 1, at equal reliability.

    python -m bench.batching [--quick]      # writes bench/results/batching.json

The same sequential stream of demo-world edits (the demo MLLM, host editor FT + ODEdit as in
jobs/configs/demo.yaml) is edited twice, in process: one edit per step, and 16 edits per step. Each arm has
its own copy of the model, so each is a real stream (edits accumulate, never undone).

The two arms run side by side, step for step: one 16-edit step, then the same 16 edits one at a time (the
order flips every step). On this shared machine the speed of a whole process drifts by up to 30% within
minutes, so two streams run one after the other compare two machine states as much as two batch sizes
(the same code measured 5.4 and 6.8 that way); interleaved, both arms see the same machine.

Throughput counts the editing itself (the sum of the steps' edit times, `StepReport.seconds`: encoding,
forward and backward passes, updates). Reliability is the immediate Rel of each edit, scored right after its
step (the quantity batching could degrade), and the end-of-stream Rel after all edits.

Figures: `edits_per_s_ratio_b16_b1` (target >= 8), `rel_drop_points` = 100 x (Rel at batch 1 - Rel at batch
16) (target <= 5); the table also gives end-of-stream Rel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench.common import write_result

TARGETS = {"edits_per_s_ratio_b16_b1": ">= 8", "rel_drop_points": "<= 5"}
BATCH = 16


def _arm(cfg, model_path: str, batch_size: int):
    import torch

    # deferred: torch, Ray and the demo world load only when the benchmark runs, not for --help
    from odedit.editing import Editor
    from odedit.loading import with_overrides
    from odedit.models import load_adapter

    cfg = with_overrides(cfg, [f"stream.batch_size={batch_size}"])
    torch.manual_seed(cfg.seed)
    return Editor(load_adapter(cfg.model, model_path), cfg)


def _run(cfg, model_path: str, shards: str) -> dict:
    # deferred: torch, Ray and the demo world load only when the benchmark runs, not for --help
    from odedit.evaluation import evaluate_cases
    from pipeline.data.casesource import ShardCaseSource

    source = ShardCaseSource(shards, "test", cfg.stream.num_edits)
    cases = source.fetch(range(len(source.ids())))
    arms = {b: _arm(cfg, model_path, b) for b in (1, BATCH)}
    seconds = {1: 0.0, BATCH: 0.0}
    step_s: dict[int, list[float]] = {1: [], BATCH: []}
    rel: dict[int, list[float]] = {1: [], BATCH: []}
    failed = {1: 0, BATCH: 0}
    for b, arm in arms.items():  # warm-up on a first step, undone (allocator, kernels, lazy imports)
        handle, _ = arm.edit(cases[:b])
        handle.restore()
    t0 = time.perf_counter()
    for s in range(0, len(cases), BATCH):
        chunk = cases[s : s + BATCH]
        order = (BATCH, 1) if (s // BATCH) % 2 == 0 else (1, BATCH)
        for b in order:
            for i in range(0, len(chunk), b):
                _, report = arms[b].edit(chunk[i : i + b])
                seconds[b] += report.seconds
                step_s[b].append(report.seconds)
                failed[b] += report.failed is not None
                rel[b] += [r["rel"] for r in evaluate_cases(arms[b].adapter, chunk[i : i + b], metrics=["rel"])]
    wall = time.perf_counter() - t0
    final = {
        b: statistics.fmean(r["rel"] for r in evaluate_cases(a.adapter, cases, metrics=["rel"]))
        for b, a in arms.items()
    }
    return {
        b: {
            "edits": len(cases),
            "edit_seconds": seconds[b],
            "edits_per_s": len(cases) / seconds[b],
            "median_step_s": statistics.median(step_s[b]),
            "rel_immediate": statistics.fmean(rel[b]),
            "rel_final": final[b],
            "failed": failed[b],
        }
        for b in arms
    } | {"wall_s": wall}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 edits (under 2 minutes once the demo model exists)")
    args = parser.parse_args(argv)
    # deferred: torch, Ray and the demo world load only when the benchmark runs, not for --help
    from bench.demo_setup import demo_stream_setup

    n = 64 if args.quick else 256
    cfg, model_path, shards = demo_stream_setup(n, name="batching")
    res = _run(cfg, model_path, shards)
    b1, b16 = res[1], res[BATCH]
    figures = {
        "edits_per_s_ratio_b16_b1": b16["edits_per_s"] / b1["edits_per_s"],
        "rel_drop_points": 100 * (b1["rel_immediate"] - b16["rel_immediate"]),
        "edits_per_s_b1": b1["edits_per_s"],
        "edits_per_s_b16": b16["edits_per_s"],
        "step_ms_median_b1": 1000 * b1["median_step_s"],
        "step_ms_median_b16": 1000 * b16["median_step_s"],
        "rel_b1": b1["rel_immediate"],
        "rel_b16": b16["rel_immediate"],
        "final_rel_b1": b1["rel_final"],
        "final_rel_b16": b16["rel_final"],
    }
    return write_result(
        "batching",
        args.quick,
        figures,
        TARGETS,
        {
            "batch_1": b1,
            "batch_16": b16,
            "edits": n,
            "wall_s": res["wall_s"],
            "interleaved": True,
            "method": cfg.method.name,
            "odedit": cfg.odedit.enabled,
            "tail_replay": cfg.method.cache_tail,
        },
    )


if __name__ == "__main__":
    main(sys.argv[1:])

"""A long lifelong stream on the demo model: retention curve and resident memory as the stream grows.

    python -m bench.lifelong [--quick]      # writes bench/results/lifelong.json (+ lifelong_curve.png)

Full run: 10,000 demo-world edits in steps of 16 (host FT + ODEdit, jobs/configs/demo.yaml), in process over
the shards (cases are fetched on demand: nothing of the stream is held but its result rows), retention of a
fixed sample every 1,000 edits. The demo world holds about 7,700 distinct questions (easy-vqa's test images
less the locality probes), so the world has `UNIQUE_MAX` = 7,000 edits and the stream goes on with them again
from the start (ids suffixed `@1`): a question edited again, to the same counterfactual target, later in life.
Resident memory (RSS) of the process is read when 1,000 and when all edits have been applied.
`--quick` runs 1,000 edits and reads RSS at 100 and 1,000 (the figure keeps its name).

Figures: `rss_growth_1k_10k` = RSS(end) / RSS(at 1k) - 1 (target < 0.10), `edits` (the stream length).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench.common import RESULTS_DIR, write_result

TARGETS = {"rss_growth_1k_10k": "< 0.1"}
UNIQUE_MAX = 7000


class RepeatingSource:
    """`n` edits over a source of fewer: edit i is edit i % len(base), its id suffixed `@<pass>` after the first."""

    def __init__(self, base, n: int) -> None:
        self.base = base
        self.n = n
        self._base_ids = base.ids()

    def _id(self, i: int) -> str:
        k, r = divmod(i, len(self._base_ids))
        return self._base_ids[r] if k == 0 else f"{self._base_ids[r]}@{k}"

    def ids(self) -> list[str]:
        return [self._id(i) for i in range(self.n)]

    def fetch(self, indices):
        import dataclasses

        cases = self.base.fetch([i % len(self._base_ids) for i in indices])
        return [dataclasses.replace(c, edit_id=self._id(i)) for i, c in zip(indices, cases)]

    def iter_from(self, start: int):
        for lo in range(start, self.n, 64):
            yield from self.fetch(range(lo, min(self.n, lo + 64)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 edits")
    parser.add_argument("--edits", type=int, default=0, help="stream length (default 10,000; 1,000 with --quick)")
    args = parser.parse_args(argv)
    import psutil
    import torch

    # deferred: torch, Ray and the demo world load only when the benchmark runs, not for --help
    from bench.demo_setup import demo_stream_setup
    from odedit.editing import Editor
    from odedit.loading import with_overrides
    from odedit.models import load_adapter
    from odedit.stream import StreamHooks, StreamRunner
    from pipeline.data.casesource import ShardCaseSource
    from pipeline.reporting.plots import plot_retention

    n = args.edits or (1000 if args.quick else 10000)
    first = n // 10
    unique = min(n, UNIQUE_MAX)
    cfg, model_path, shards = demo_stream_setup(unique, name="lifelong")
    cfg = with_overrides(
        cfg,
        [
            "stream.batch_size=16",
            f"stream.eval_every={max(16, n // 10)}",
            "stream.retention_sample=200",
            "stream.generation_eval=false",
            "stream.checkpoint_every=0",
        ],
    )
    torch.manual_seed(cfg.seed)
    adapter = load_adapter(cfg.model, model_path)
    source = RepeatingSource(ShardCaseSource(shards, "test", unique), n)
    proc = psutil.Process()
    rss: dict[str, float] = {}

    def on_progress(done: int, total: int) -> None:
        if done >= first and "first" not in rss:
            rss["first"] = proc.memory_info().rss / 2**20
        if done >= total:
            rss["end"] = proc.memory_info().rss / 2**20

    t0 = time.perf_counter()
    result = StreamRunner(Editor(adapter, cfg), cfg, hooks=StreamHooks(on_progress=on_progress)).run(source)
    wall = time.perf_counter() - t0
    os.makedirs(RESULTS_DIR, exist_ok=True)
    plot_retention(
        result.curve,
        os.path.join(RESULTS_DIR, "lifelong_curve.png"),
        f"Demo world: retention over a {n}-edit stream (batch 16)",
    )
    figures = {
        "rss_growth_1k_10k": rss["end"] / rss["first"] - 1,
        "edits": float(len(result.ledger)),
        "rss_mb_at_first": rss["first"],
        "rss_mb_at_end": rss["end"],
        "wall_s": wall,
        "final_rel": result.summary["rel"],
        "final_t_loc": result.summary["t_loc"],
        "final_m_loc": result.summary["m_loc"],
    }
    details = {
        "curve": result.curve,
        "rss_read_at_edits": [first, n],
        "summary": result.summary,
        "unique_edits": unique,
    }
    return write_result("lifelong", args.quick, figures, TARGETS, details)


if __name__ == "__main__":
    main(sys.argv[1:])

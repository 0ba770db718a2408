"""What the distributed engine costs per step: Ray Train + DeepSpeed worker vs the in-process loop.

    python -m bench.engine_overhead [--quick]      # writes bench/results/engine_overhead.json

The same stream (same shards, model, editor, config and seed) runs twice: in this process through
`odedit.stream.StreamRunner` with a torch optimiser, and as a Ray Train `TorchTrainer` with one worker and
DeepSpeed ZeRO-2 (gloo), reading its edits from the Ray Data dataset, writing progress and checkpoints.
Each step's wall time (reading its cases, editing, scoring them, and the checkpoint written after the step
before) is recorded by the stream itself; both loops checkpoint every 2 steps to a `RunStore`; the first two
steps are start-up and are dropped.

Figure: `step_time_ratio_raytrain_inprocess` (target <= 1.3) = mean step time in the Ray Train worker /
mean step time in process (a mean, not a median: a cost paid on every other step, such as a checkpoint
every 2 steps, is invisible to the median; the medians are kept as `median_ratio`). Both use one torch thread (Ray Train gives a 1-CPU worker one thread). Model:
a tiny LLaVA on a synthetic E-VQA split (the engine's overhead, not the model, is what is measured).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys

from bench.common import write_result

TARGETS = {"step_time_ratio_raytrain_inprocess": "<= 1.3"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="24 edits (under 2 minutes)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import pyarrow.parquet as pq
    import ray
    import torch

    from odedit.config import load_config
    from odedit.editing import Editor
    from odedit.models import build_tiny, load_adapter
    from odedit.stream import StreamHooks, StreamRunner
    from pipeline.checkpoints import RunStore
    from pipeline.casesource import ShardCaseSource
    from pipeline.engine import run_stream, shards_dir, storage_dir
    from pipeline.experiment import prepared
    from pipeline.synthetic import write_evqa_split
    from pipeline.tracking import NullTracker

    n = 24 if args.quick else 96
    base = os.path.join(ROOT, ".cache", "bench", "engine")
    model = os.path.join(base, "tiny_llava")
    if not os.path.isfile(os.path.join(model, "config.json")):
        build_tiny("llava", model, seed=0)
    paths = write_evqa_split(os.path.join(base, f"world{n}"), n=n, min_side=32, max_side=64, seed=1)
    cfg = load_config(None, [
        "data.source=mmedit", f"data.path={paths['path']}", f"data.image_root={paths['image_root']}",
        "model.family=llava", f"model.name_or_path={model}", f"output_dir={os.path.join(base, f'out{n}')}",
        "tracking.enabled=false", "method.name=ft", "method.lr=0.05", "method.n_iter=10", "odedit.enabled=true",
        "stream.batch_size=4", "stream.eval_every=0", "stream.checkpoint_every=2", "stream.generation_eval=false",
        f"stream.num_edits={n}", "resources.num_workers=1", "resources.cpus_per_worker=1", "resources.zero_stage=2",
    ])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg, model_path, _ = prepared(cfg)

        # ---- in process
        torch.set_num_threads(1)
        torch.manual_seed(cfg.seed)
        adapter = load_adapter(cfg.model, model_path)
        source = ShardCaseSource(shards_dir(cfg), "test", n)
        # The in-process loop checkpoints like the engine does (same RunStore, same cadence), so the ratio is
        # what Ray Train, DeepSpeed and Ray Data add, not the cost of checkpointing itself.
        editor = Editor(adapter, cfg)
        store = RunStore(os.path.join(base, f"inproc-{os.getpid()}")).ensure()

        def on_checkpoint(st) -> None:
            full = editor.state_dict()
            store.write_checkpoint(st.next_step, full["method"], full["objective"], st.to_dict())

        local = StreamRunner(editor, cfg, hooks=StreamHooks(on_checkpoint=on_checkpoint)).run(source)
        in_proc = [r["step_wall"] for r in local.rows if r["edit_id"] in _firsts(local.rows)]
        shutil.rmtree(store.run_dir, ignore_errors=True)

        # ---- Ray Train + DeepSpeed (a fresh run directory each time)
        name = f"bench-{os.getpid()}"
        summary = run_stream(cfg, model_path, NullTracker(), name, progress=False)
        rows = pq.read_table(os.path.join(storage_dir(cfg), name, "results", "rows.parquet")).to_pylist()
        raytrain = [r["step_wall"] for r in rows if r["edit_id"] in _firsts(rows)]
    finally:
        ray.shutdown()
    a, b = statistics.mean(raytrain[2:]), statistics.mean(in_proc[2:])
    figures = {"step_time_ratio_raytrain_inprocess": a / b, "step_s_raytrain": a, "step_s_inprocess": b,
               "median_ratio": statistics.median(raytrain[2:]) / statistics.median(in_proc[2:]),
               "steps": float(len(in_proc))}
    details = {"in_process_steps": in_proc, "raytrain_steps": raytrain, "edits": n, "batch_size": 4,
               "rel_in_process": local.summary["rel"], "rel_raytrain": summary["rel"]}
    return write_result("engine_overhead", args.quick, figures, TARGETS, details)


def _firsts(rows: list[dict]) -> set[str]:
    """One row per step (rows of a step share its wall time)."""
    seen: dict[int, str] = {}
    for r in rows:
        seen.setdefault(r["step"], r["edit_id"])
    return set(seen.values())


if __name__ == "__main__":
    main(sys.argv[1:])

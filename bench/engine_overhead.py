"""What the distributed engine costs per step: Ray Train + DeepSpeed worker vs the in-process loop.

    python -m bench.engine_overhead [--quick]      # writes bench/results/engine_overhead.json

The same stream (same shards, model, editor, config and seed) runs three times: in this process through
`odedit.stream.StreamRunner` with a torch optimiser, as a Ray Train `TorchTrainer` with one worker and
DeepSpeed ZeRO-2 (gloo), reading its edits from the Ray Data dataset, writing progress and checkpoints, and
in process again. The in-process step time is the mean of the runs before and after the Ray Train run (on this
shared machine a process's speed drifts by up to 30% within minutes; bracketing cancels a linear drift).
Each step's wall time (reading its cases, editing, scoring them, and the checkpoint written after the step
before) is recorded by the stream itself; both loops checkpoint every 2 steps to a `RunStore`; the first two
steps are start-up and are dropped. Steps of 4 edits, FT + ODEdit, 10 iterations per step.

Two models, both measured in every run:

* the demo MLLM on demo-world edits (the model `make demo` streams; trained on first use, then cached):
  the headline figure `step_time_ratio_raytrain_inprocess` (target <= 1.3);
* a tiny random LLaVA on a synthetic E-VQA split (`step_time_ratio_tiny_model`): a step there is ~75 ms, so
  fixed per-iteration costs dominate it. DeepSpeed's ZeRO-2 step on CPU/gloo costs about 2 ms per
  iteration even with one worker (gradient reduce and norm through gloo, fp32 partition copies), ~20 ms of
  a 10-iteration step; this is the upper bound of the engine's relative overhead, for models whose
  iteration costs less than the engine's bookkeeping.

Ratios are of mean step times (a cost paid on every other step, such as a checkpoint every 2 steps, is
invisible to a median; medians are kept as `median_ratio*`). Both loops use one torch thread (Ray Train
gives a 1-CPU worker one thread).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from typing import Any

from bench.common import write_result

TARGETS = {"step_time_ratio_raytrain_inprocess": "<= 1.3"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STREAM = [
    "stream.batch_size=4",
    "stream.eval_every=0",
    "stream.checkpoint_every=2",
    "stream.generation_eval=false",
    "odedit.enabled=true",
    "resources.num_workers=1",
    "resources.cpus_per_worker=1",
    "resources.zero_stage=2",
    "tracking.enabled=false",
]


def _firsts(rows: list[dict]) -> set[str]:
    """One row per step (rows of a step share its wall time)."""
    seen: dict[int, str] = {}
    for r in rows:
        seen.setdefault(r["step"], r["edit_id"])
    return set(seen.values())


def _in_process(cfg: Any, model_path: str, shards: str, n: int, scratch: str) -> tuple[list[dict], dict]:
    """One in-process stream (one torch thread, checkpoints like the engine's): (rows, summary)."""
    import torch

    # deferred: torch, Ray and the demo world load only when the benchmark runs, not for --help
    from odedit.editing import Editor
    from odedit.models import load_adapter
    from odedit.stream import StreamHooks, StreamRunner
    from pipeline.data.casesource import ShardCaseSource
    from pipeline.train.checkpoints import RunStore

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    adapter = load_adapter(cfg.model, model_path)
    source = ShardCaseSource(shards, "test", n)
    # The in-process loop checkpoints like the engine does (same RunStore, same cadence), so the ratio is
    # what Ray Train, DeepSpeed and Ray Data add, not the cost of checkpointing itself.
    editor = Editor(adapter, cfg)
    store = RunStore(os.path.join(scratch, f"inproc-{os.getpid()}")).ensure()

    def on_checkpoint(st) -> None:
        full = editor.state_dict()
        store.write_checkpoint(st.next_step, full["method"], full["objective"], st.to_dict())

    try:
        local = StreamRunner(editor, cfg, hooks=StreamHooks(on_checkpoint=on_checkpoint)).run(source)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(store.run_dir, ignore_errors=True)
    return local.rows, local.summary


def _steps(rows: list[dict], key: str) -> list[float]:
    firsts = _firsts(rows)
    return [r[key] for r in rows if r["edit_id"] in firsts]


def measure(cfg: Any, model_path: str, shards: str, n: int, scratch: str) -> dict:
    """Step wall times of the same stream in process, through Ray Train, and in process again (Ray must be
    running); the in-process figure is the mean of the two runs around the Ray Train run, so a machine that
    drifts linearly in speed during the measurement moves both sides alike."""
    import pyarrow.parquet as pq

    # deferred: torch, Ray and the demo world load only when the benchmark runs, not for --help
    from pipeline.reporting.tracking import NullTracker
    from pipeline.train.engine import run_stream, storage_dir

    before, summary_local = _in_process(cfg, model_path, shards, n, scratch)
    # Ray Train + DeepSpeed, in a fresh run directory
    name = f"bench-{os.getpid()}"
    summary = run_stream(cfg, model_path, NullTracker(), name, progress=False)
    rows = pq.read_table(os.path.join(storage_dir(cfg), name, "results", "rows.parquet")).to_pylist()
    shutil.rmtree(os.path.join(storage_dir(cfg), name), ignore_errors=True)
    after, _ = _in_process(cfg, model_path, shards, n, scratch)
    raytrain = _steps(rows, "step_wall")
    in_proc = [(x + y) / 2 for x, y in zip(_steps(before, "step_wall"), _steps(after, "step_wall"))]
    # The editing part of each step (StepReport.seconds): what DeepSpeed's stepper adds, apart from reading,
    # scoring and checkpointing.
    edit_ray = _steps(rows, "edit_seconds")
    edit_local = [(x + y) / 2 for x, y in zip(_steps(before, "edit_seconds"), _steps(after, "edit_seconds"))]
    a, b = statistics.mean(raytrain[2:]), statistics.mean(in_proc[2:])
    return {
        "ratio": a / b,
        "step_s_raytrain": a,
        "step_s_inprocess": b,
        "step_s_inprocess_before": statistics.mean(_steps(before, "step_wall")[2:]),
        "step_s_inprocess_after": statistics.mean(_steps(after, "step_wall")[2:]),
        "edit_s_raytrain": statistics.mean(edit_ray[2:]),
        "edit_s_inprocess": statistics.mean(edit_local[2:]),
        "median_ratio": statistics.median(raytrain[2:]) / statistics.median(in_proc[2:]),
        "steps": len(in_proc),
        "edits": n,
        "in_process_steps": in_proc,
        "raytrain_steps": raytrain,
        "rel_in_process": summary_local["rel"],
        "rel_raytrain": summary["rel"],
    }


def tiny_setup(n: int) -> tuple[Any, str, str]:
    """(config, model path, shards dir) of the tiny random LLaVA on a synthetic E-VQA split."""
    # deferred: torch, Ray and the demo world load only when the benchmark runs, not for --help
    from bench.synthetic import prepared_evqa_stream
    from odedit.models import build_tiny
    from pipeline.train.engine import shards_dir

    base = os.path.join(ROOT, ".cache", "bench", "engine")
    model = os.path.join(base, "tiny_llava")
    if not os.path.isfile(os.path.join(model, "config.json")):
        build_tiny("llava", model, seed=0)
    cfg, model_path = prepared_evqa_stream(
        os.path.join(base, f"world{n}"),
        model,
        os.path.join(base, f"out{n}"),
        n,
        ["method.name=ft", "method.lr=0.05", "method.n_iter=10", *STREAM],
    )
    return cfg, model_path, shards_dir(cfg)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="24 edits per model (under 2 minutes once the demo model exists)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from bench.demo_setup import demo_stream_setup  # deferred: torch, Ray and the demo world; `--help` needs none
    from pipeline.cluster.session import ray_session

    n = 24 if args.quick else 96
    scratch = os.path.join(ROOT, ".cache", "bench", "engine")
    with ray_session(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False):
        demo = measure(*demo_stream_setup(n, STREAM, name="engine"), n, scratch)
        tiny = measure(*tiny_setup(n), n, scratch)
    figures = {
        "step_time_ratio_raytrain_inprocess": demo["ratio"],
        "step_s_raytrain": demo["step_s_raytrain"],
        "step_s_inprocess": demo["step_s_inprocess"],
        "median_ratio": demo["median_ratio"],
        "step_time_ratio_tiny_model": tiny["ratio"],
        "step_s_raytrain_tiny": tiny["step_s_raytrain"],
        "step_s_inprocess_tiny": tiny["step_s_inprocess"],
        "median_ratio_tiny": tiny["median_ratio"],
        "steps": float(demo["steps"]),
    }
    return write_result(
        "engine_overhead", args.quick, figures, TARGETS, {"demo_model": demo, "tiny_model": tiny, "batch_size": 4}
    )


if __name__ == "__main__":
    main(sys.argv[1:])

"""`make demo`: the embedded default world end to end, a host editor without and with ODEdit.

    python -m jobs.demo --config jobs/configs/demo.yaml [key=value ...]

Prepares the demo world (easy-vqa records, shards, the demo MLLM trained once and cached, references), then
runs the same lifelong stream twice through Ray Train (2 CPU workers, DeepSpeed ZeRO, gloo) as nested MLflow
runs, prints the comparison table and where everything is, and writes `outputs/demo/summary.json`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from jobs.common import parse_job_args, print_locations, run
from pipeline.storage.jsonio import write_json


def main(cfg: Any) -> dict:
    # deferred: Ray, torch and transformers load only after the arguments parse (fast --help, config errors)
    from pipeline.experiment import run_experiment
    from pipeline.reporting.plots import plot_comparison
    from pipeline.reporting.tables import comparison_table

    arms = {f"{cfg.method.name}": ["odedit.enabled=false"], f"{cfg.method.name}+odedit": ["odedit.enabled=true"]}
    out = run_experiment(cfg, arms, name="demo")
    runs = {}
    for arm, s in out["results"].items():
        runs[arm] = {k: s.get(k) for k in ("rel", "t_gen", "m_gen", "t_loc", "m_loc", "m_loc_hard")}
        runs[arm].update(
            edits_applied=s.get("edits_applied"),
            edits_failed=s.get("edits_failed"),
            wall_seconds=s.get("wall_seconds"),
            mlflow_run_id=s.get("mlflow_run_id"),
            immediate=s.get("immediate"),
            pre=s.get("pre"),
            run_dir=s.get("run_dir"),
        )
    summary = {
        "runs": runs,
        "parent_run_id": out["parent_run_id"],
        "model": out["prepare"]["model"],
        "edits": cfg.stream.num_edits,
        "batch_size": cfg.stream.batch_size,
    }
    path = write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
    plot_comparison(
        {arm: s for arm, s in runs.items()},
        os.path.join(cfg.output_dir, "comparison.png"),
        "Demo world: end-of-stream metrics",
    )
    print()
    print("End-of-stream metrics (x100) after the lifelong stream:")
    print(comparison_table(out["results"]))
    print()
    print_locations(cfg, path)
    return summary


def cli(argv: Sequence[str] | None = None) -> int:
    main(parse_job_args(__doc__, argv))
    return 0


if __name__ == "__main__":
    run(cli)

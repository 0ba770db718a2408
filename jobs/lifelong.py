"""A lifelong (sequential) edit stream on Ray Train + DeepSpeed, tracked in MLflow.

    python -m jobs.lifelong --config jobs/configs/demo.yaml [key=value ...]
    python -m jobs.submit --storage-root /mnt/shared/odedit -- \
        python -m jobs.lifelong --config jobs/configs/<model>.yaml

Prepares the data (cached), runs `stream.num_edits` edits in steps of `stream.batch_size`, never undone, with
immediate metrics per step, retention every `stream.eval_every` edits and full retention at the end, and
writes `<output_dir>/summary.json`. Re-submitting with the same `stream.run_name` resumes a stopped stream.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from jobs.common import data_errors, parse_job_args, print_locations, run
from pipeline.storage.jsonio import write_json


def main(cfg: Any) -> dict:
    # deferred: Ray, torch and transformers load only after the arguments parse (fast --help, config errors)
    from pipeline.experiment import run_experiment
    from pipeline.prepare import preflight, quarantine_report
    from pipeline.reporting.tables import comparison_table

    if cfg.stream.mode != "sequential":
        raise SystemExit(
            "error: stream.mode: jobs.lifelong runs sequential streams (got 'single'); "
            "use jobs.edit for single edits, or set stream.mode=sequential"
        )
    with data_errors():  # issue 19 item 16: bad input data is one error line, exit 2, before any work
        preflight(cfg)
        out = run_experiment(cfg, {"": []}, name="lifelong")
    print(quarantine_report(out["prepare"]))
    summary = {"runs": out["results"], "prepare": out["prepare"]}
    path = write_json(os.path.join(cfg.output_dir, "summary.json"), summary)
    print(comparison_table(out["results"]))
    print_locations(cfg, path)
    return summary


def cli(argv: Sequence[str] | None = None) -> int:
    main(parse_job_args(__doc__, argv))
    return 0


if __name__ == "__main__":
    run(cli)

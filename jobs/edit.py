"""Single-edit experiments: each edit applied to the original weights, scored and undone, spread over workers.

    python -m jobs.edit --config jobs/configs/demo.yaml stream.mode=single [key=value ...]
    python -m jobs.submit --storage-root /mnt/shared/odedit -- python -m jobs.edit --config jobs/configs/<model>.yaml

Writes `<output_dir>/summary.json` with the MMEdit metrics of every edit (MMEdit's main-table protocol).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from jobs.common import data_errors, parse_job_args, print_locations, run
from odedit.loading import with_overrides
from pipeline.storage.jsonio import write_json


def main(cfg: Any) -> dict:
    # deferred: Ray, torch and transformers load only after the arguments parse (fast --help, config errors)
    from pipeline.experiment import run_experiment
    from pipeline.prepare import preflight, quarantine_report
    from pipeline.reporting.tables import comparison_table

    if cfg.stream.mode != "single":
        cfg = with_overrides(cfg, ["stream.mode=single"])
    with data_errors():  # issue 19 item 16: bad input data is one error line, exit 2, before any work
        preflight(cfg)
        out = run_experiment(cfg, {"": []}, name="edit")
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

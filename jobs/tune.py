"""Hyperparameter search over ODEdit's knobs with Ray Tune (ASHA + Optuna), tracked in MLflow.

    python -m jobs.tune --config jobs/configs/demo_tune.yaml [key=value ...]
    python -m jobs.tune --config jobs/configs/demo_tune_pareto.yaml     # reliability vs locality: a Pareto front
    python -m jobs.submit --storage-root /mnt/shared/odedit -- python -m jobs.tune --config jobs/configs/demo_tune.yaml

Checks the search space against the config loader (every key, each end of its range, each choice) before
anything runs, prepares the data and model once (cached), then runs `search.num_samples` trials, each a
lifelong stream on the validation slice, stopped early by ASHA when it falls behind (`pipeline.search`).
With several metrics (`search.metric: [rel, loc]`) Optuna searches their trade-off and every trial edits its
whole slice (FIFO; or ASHA on `search.asha_metric`). Re-running the same command after the driver died
restores the search instead of starting over.

Writes `<output_dir>/best.yaml` (the best trial's config on the test stream, headed by the command that runs
it with `jobs.lifelong`), and under `<output_dir>/search/<name>/`: `summary.json`, `trials.json` and
`objective.png`, all also logged to the search's MLflow parent run with the space and the best trial. With
several metrics also `<output_dir>/best-<trade-off>.yaml` per `search.tradeoffs` entry (best.yaml is the
first's) and `pareto.json`, `pareto.md`, `pareto.png` (the front of the trials, each trade-off's pick).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from jobs.common import job_parser, load_job_config, run
from pipeline.search.space import check_search


def cli(argv: Sequence[str] | None = None) -> int:
    parser = job_parser(
        __doc__,
        config_help="YAML config with a search section (see jobs/configs/)",
        overrides_help="dotted overrides such as search.num_samples=4",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_job_config(args.config, args.overrides, extra_checks=[check_search])
    except SystemExit as stop:  # the problems are printed; this cli returns its status instead of exiting
        return int(stop.code)
    # deferred: Ray, torch and transformers; a config error above needs none of them
    from pipeline.search.driver import run_search
    from pipeline.search.outputs import trials_table

    summary, outcome = run_search(cfg)
    print(trials_table(outcome, cfg.search.metric))
    for name, pick in summary["tradeoffs"].items():
        print(f"trade-off {name}: trial {pick['trial_id']} -> {pick['best_yaml']}")
    if summary["tradeoffs"]:
        print(f"Pareto front: {os.path.join(outcome.search_dir, 'pareto.md')}")
    best = summary["best_yaml"]
    if best:
        print(f"\nbest config: {best}\nrun it:      python -m jobs.lifelong --config {best}")
    return 0


if __name__ == "__main__":
    run(cli)

"""The `odedit` command: one entry point that dispatches to the jobs (`odedit <job> [job arguments]`).

    odedit prepare  --config jobs/configs/demo.yaml
    odedit lifelong --config jobs/configs/demo.yaml odedit.enabled=false
    odedit tune     --config jobs/configs/demo_tune.yaml

Each job is also runnable as `python -m jobs.<name>` (the form `ray job submit` uses); both call the same
`cli(argv)` of the job's module, so arguments, help and exit codes are the same.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from jobs.common import data_errors, storage_errors
from odedit.registry import Registry
from pipeline.reporting.progress import install_quiet_logs

JOBS: Registry = Registry("job")
for _name, _module, _summary in (
    ("prepare", "jobs.prepare", "build environment shards, quarantine and pre-edit references"),
    ("edit", "jobs.edit", "single edits, each undone after it is scored"),
    ("lifelong", "jobs.lifelong", "a lifelong (sequential) edit stream"),
    ("demo", "jobs.demo", "the embedded demo: a lifelong stream without and with ODEdit"),
    ("tune", "jobs.tune", "Ray Tune search over ODEdit's knobs; writes the best config"),
    ("results", "jobs.results", "the editor x {base, +ODEdit} results matrix"),
    ("train_editor", "jobs.train_editor", "meta-train an editor's hypernetwork (MEND)"),
    ("local_cluster", "jobs.local_cluster", "start or stop a multi-node Ray cluster on this machine"),
    ("submit", "jobs.submit", "submit a job to a Ray cluster with its git commit and storage root"),
    ("export_hf", "jobs.export_hf", "export result rows (rows.parquet) as Hugging Face datasets"),
    ("sync_mlflow", "jobs.sync_mlflow", "replay an MLflow outbox file into MLflow"),
    ("reliability_report", "jobs.reliability_report", "render docs/reliability.md from recorded test outcomes"),
):
    JOBS.register(_name, (_module, _summary))


def usage() -> str:
    width = max(len(n) for n in JOBS.names())
    lines = ["usage: odedit <job> [arguments]   (odedit <job> --help for the job's own arguments)", "", "jobs:"]
    lines += [f"  {n.ljust(width)}  {JOBS.get(n)[1]}" for n in JOBS.names()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] not in JOBS:
        print(f"error: {JOBS.unknown_message(args[0])}", file=sys.stderr)
        return 2
    module = importlib.import_module(JOBS.get(args[0])[0])  # only the chosen job's dependencies are loaded
    return module.cli(args[1:])


def console_main() -> int:
    """The `odedit` console script: `main` in a job's process, with its quiet logs (see `jobs.common.run`)."""
    install_quiet_logs()
    with storage_errors(), data_errors():  # as jobs.common.run: one error line and exit 2, not a traceback
        return main()


if __name__ == "__main__":
    sys.exit(console_main())

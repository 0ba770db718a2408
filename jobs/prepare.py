"""Prepare an edit stream's data: environment shards, quarantine and pre-edit references, as one Ray job.

    python -m jobs.prepare --config jobs/configs/<job>.yaml [key=value ...]
    python -m jobs.prepare --config jobs/configs/demo.yaml data.export_hf=outputs/demo_hf    # + a HF dataset
    python -m jobs.submit --storage-root /mnt/shared/odedit -- python -m jobs.prepare --config jobs/configs/<job>.yaml

Reads the records through `pipeline.data.sources.SOURCES[data.source]`, builds the shards (`pipeline.data.shards`),
computes the unedited model's references on the OUT environments (`pipeline.data.references`) with
`model.name_or_path`, or, when that is empty, with the demo model (`pipeline.demo.model`, trained once and
cached), and writes `<output_dir>/prepare.json`: record, kept and quarantined counts with reasons, shards and
rows per environment, paths, and the demo model's measured accuracy. A re-run with the same config and
inputs reuses the shards and references it finds (their manifests carry a fingerprint of the inputs).

With `data.export_hf=<dir>` the kept records (the demo world's too) are also written there as a Hugging Face
dataset (`save_to_disk`, images embedded, EasyEdit's column names), which `data.source=hf data.path=<dir>`
reads back into the same edits (`pipeline.data.hf_export`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from jobs.common import parse_job_args, run


def cli(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args(__doc__, argv)
    from pipeline.prepare import prepare  # deferred: pulls in Ray, torch and transformers; `--help` needs none

    summary = prepare(cfg)
    print(
        f"records {summary['records']}: kept {summary['kept']}, quarantined {summary['quarantined']} "
        f"{summary['quarantine_by_reason']}"
    )
    print(
        f"shards {summary['shards']['count']} ({summary['shards']['rows']} rows "
        f"{summary['shards']['rows_by_env']}) in {summary['paths']['shards_dir']}"
        f"{' (reused)' if summary['shards']['reused'] else ''}"
    )
    print(
        f"references {summary['references']['rows']} rows, k={summary['references']['k']}"
        f"{' (reused)' if summary['references']['reused'] else ''}"
    )
    exported = summary.get("export_hf")
    if exported:
        print(f"exported {exported['rows']} records as a Hugging Face dataset: {exported['path']}")
    print(f"wrote {os.path.join(cfg.output_dir, 'prepare.json')}")
    return 0


if __name__ == "__main__":
    run(cli)

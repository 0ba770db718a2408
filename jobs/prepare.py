"""Prepare an edit stream's data: environment shards, quarantine and pre-edit references, as one Ray job.

    python -m jobs.prepare --config jobs/configs/<job>.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.prepare --config jobs/configs/<job>.yaml

Reads the records through `pipeline.sources.SOURCES[data.source]`, builds the shards (`pipeline.shards`),
computes the unedited model's references on the OUT environments (`pipeline.references`) with
`model.name_or_path`, or, when that is empty, with the demo model (`pipeline.demo_model`, trained once and
cached), and writes `<output_dir>/prepare.json`: record, kept and quarantined counts with reasons, shards and
rows per environment, paths, and the demo model's measured accuracy. A re-run with the same config and
inputs reuses the shards and references it finds (their manifests carry a fingerprint of the inputs).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Sequence

from jobs.common import parse_job_args, prepare_output_dir, write_json


def resolve_model(cfg: Any) -> tuple[Any, str, dict]:
    """(model config, model directory or hub name, report): the configured model, or the cached demo model
    (trained on first use) with the prompt template it was trained with unless the config sets one."""
    if cfg.model.name_or_path:
        return cfg.model, cfg.model.name_or_path, {}
    from pipeline.demo_model import ensure_demo_model

    model_dir, report = ensure_demo_model(cfg)
    model_cfg = dataclasses.replace(cfg.model, name_or_path=str(model_dir),
                                    prompt_template=cfg.model.prompt_template or report.get("prompt_template", ""))
    keep = ("vqa_accuracy", "vqa_accuracy_by_type", "text_accuracy", "train_seconds")
    return model_cfg, str(model_dir), {k: report[k] for k in keep if k in report}


def main(cfg: Any) -> dict:
    """Run the whole preparation for `cfg`; return (and write) the prepare.json summary."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from pipeline.raycluster import init_ray

    from pipeline.references import build_references
    from pipeline.shards import MANIFEST, REFERENCES_DIR, build_shards
    from pipeline.sources import SOURCES

    out_dir = prepare_output_dir(cfg)
    started_ray = init_ray()  # joins the cluster under `ray job submit`, or starts a local one; False if Ray was up
    try:
        # ---- records -> shards + quarantine
        source = SOURCES.get(cfg.data.source)(cfg)
        shards_dir = cfg.data.shards_dir or os.path.join(cfg.output_dir, "shards")
        t0 = time.perf_counter()
        manifest, shards_reused = build_shards(source, cfg, shards_dir)
        shard_seconds = time.perf_counter() - t0

        # ---- the unedited model's references on OUT
        model_cfg, model_path, model_report = resolve_model(cfg)
        t0 = time.perf_counter()
        refs, refs_reused = build_references(
            shards_dir, model_cfg, model_path, cfg.data.reference_k, workers=cfg.resources.num_workers,
            num_gpus=1.0 if cfg.resources.use_gpu else 0.0)
        ref_seconds = time.perf_counter() - t0
    finally:
        if started_ray:
            ray.shutdown()

    # ---- summary
    summary = {
        "records": manifest["records"],
        "kept": manifest["kept"],
        "quarantined": manifest["quarantined"],
        "quarantine_by_reason": manifest["quarantine_by_reason"],
        "shards": {"count": len(manifest["shards"]), "rows": manifest["rows"],
                   "rows_by_env": manifest["rows_by_env"], "edits_by_split": manifest["edits_by_split"],
                   "reused": shards_reused, "seconds": round(shard_seconds, 3)},
        "references": {"rows": refs["rows"], "rows_by_env": refs["rows_by_env"], "k": refs["k"],
                       "reused": refs_reused, "seconds": round(ref_seconds, 3)},
        "paths": {"shards_dir": shards_dir, "manifest": os.path.join(shards_dir, MANIFEST),
                  "quarantine": os.path.join(shards_dir, manifest["quarantine_files"]["jsonl"]),
                  "references": os.path.join(shards_dir, REFERENCES_DIR)},
        "model": {"family": model_cfg.family, "name_or_path": model_path, "demo": not cfg.model.name_or_path,
                  "prompt_template": model_cfg.prompt_template, **model_report},
    }
    write_json(os.path.join(out_dir, "prepare.json"), summary)
    return summary


def cli(argv: Sequence[str] | None = None) -> int:
    cfg = parse_job_args("Build environment shards, quarantine and pre-edit references.", argv)
    summary = main(cfg)
    print(f"records {summary['records']}: kept {summary['kept']}, quarantined {summary['quarantined']} "
          f"{summary['quarantine_by_reason']}")
    print(f"shards {summary['shards']['count']} ({summary['shards']['rows']} rows "
          f"{summary['shards']['rows_by_env']}) in {summary['paths']['shards_dir']}"
          f"{' (reused)' if summary['shards']['reused'] else ''}")
    print(f"references {summary['references']['rows']} rows, k={summary['references']['k']}"
          f"{' (reused)' if summary['references']['reused'] else ''}")
    print(f"wrote {os.path.join(cfg.output_dir, 'prepare.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())

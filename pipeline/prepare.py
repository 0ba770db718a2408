"""Prepare an edit stream's data: environment shards, quarantine and pre-edit references (`jobs.prepare`).

    summary = prepare(cfg)                         # writes <output_dir>/prepare.json, returns its content
    model_cfg, model_path, report = resolve_model(cfg)

Reads the records through `pipeline.data.sources.SOURCES[data.source]`, builds the shards (`pipeline.data.shards`),
computes the unedited model's references on the OUT environments (`pipeline.data.references`) with
`model.name_or_path`, or, when that is empty, with the demo model (`pipeline.demo.model`, trained once and
cached), and writes `<output_dir>/prepare.json`: record, kept and quarantined counts with reasons, shards and
rows per environment, paths, and the demo model's measured accuracy. With `data.export_hf=<dir>` the kept
records are also written there as a Hugging Face dataset (`pipeline.data.hf_export`; `export_hf` in the
summary: its path and rows). A re-run with the same config and inputs reuses the shards and references it
finds (their manifests carry a fingerprint of the inputs).
"""

from __future__ import annotations

import dataclasses
import os
import time

from odedit.config import Config, ModelConfig
from pipeline.cluster.session import ray_session
from pipeline.data.hf_export import export_records
from pipeline.data.references import build_references
from pipeline.data.shards import MANIFEST, REFERENCES_DIR, build_shards
from pipeline.data.sources import SOURCES
from pipeline.demo.model import ensure_demo_model
from pipeline.storage.jsonio import write_json
from pipeline.storage.outputs import prepare_output_dir


def resolve_model(cfg: Config) -> tuple[ModelConfig, str, dict]:
    """(model config, model directory or hub name, report): the configured model, or the cached demo model
    (trained on first use) with the prompt template it was trained with unless the config sets one."""
    if cfg.model.name_or_path:
        return cfg.model, cfg.model.name_or_path, {}
    model_dir, report = ensure_demo_model(cfg)
    model_cfg = dataclasses.replace(
        cfg.model,
        name_or_path=str(model_dir),
        prompt_template=cfg.model.prompt_template or report.get("prompt_template", ""),
    )
    keep = ("vqa_accuracy", "vqa_accuracy_by_type", "text_accuracy", "train_seconds")
    return model_cfg, str(model_dir), {k: report[k] for k in keep if k in report}


def prepare(cfg: Config) -> dict:
    """Run the whole preparation for `cfg`; return (and write) the prepare.json summary."""
    out_dir = prepare_output_dir(cfg)
    with ray_session():  # joins the cluster under `ray job submit`, or starts a local one
        # ---- records -> shards + quarantine
        source = SOURCES.get(cfg.data.source)(cfg)
        shards_dir = cfg.data.shards_dir or os.path.join(cfg.output_dir, "shards")
        t0 = time.perf_counter()
        manifest, shards_reused = build_shards(source, cfg, shards_dir)
        shard_seconds = time.perf_counter() - t0
        # ---- the validated records as a Hugging Face dataset, when asked
        exported = export_records(source, cfg, shards_dir, cfg.data.export_hf) if cfg.data.export_hf else None

        # ---- the unedited model's references on OUT
        model_cfg, model_path, model_report = resolve_model(cfg)
        t0 = time.perf_counter()
        refs, refs_reused = build_references(
            shards_dir,
            # [INFERENCE] the references run the model in the dtype the edit workers load it in
            # (resources.precision), so R_loc's KL starts at 0 on the unedited model rather than at the gap
            # between two precisions; their log-probs and top-K are taken in fp32 (odedit.envs).
            dataclasses.replace(model_cfg, dtype=cfg.model_dtype()),
            model_path,
            cfg.data.reference_k,
            workers=cfg.resources.num_workers,
            num_gpus=1.0 if cfg.resources.use_gpu else 0.0,
        )
        ref_seconds = time.perf_counter() - t0

    # ---- summary
    summary = {
        "records": manifest["records"],
        "kept": manifest["kept"],
        "quarantined": manifest["quarantined"],
        "quarantine_by_reason": manifest["quarantine_by_reason"],
        "shards": {
            "count": len(manifest["shards"]),
            "rows": manifest["rows"],
            "rows_by_env": manifest["rows_by_env"],
            "edits_by_split": manifest["edits_by_split"],
            "reused": shards_reused,
            "seconds": round(shard_seconds, 3),
        },
        "references": {
            "rows": refs["rows"],
            "rows_by_env": refs["rows_by_env"],
            "k": refs["k"],
            "reused": refs_reused,
            "seconds": round(ref_seconds, 3),
        },
        "paths": {
            "shards_dir": shards_dir,
            "manifest": os.path.join(shards_dir, MANIFEST),
            "quarantine": os.path.join(shards_dir, manifest["quarantine_files"]["jsonl"]),
            "references": os.path.join(shards_dir, REFERENCES_DIR),
        },
        "export_hf": exported,
        "model": {
            "family": model_cfg.family,
            "name_or_path": model_path,
            "demo": not cfg.model.name_or_path,
            "prompt_template": model_cfg.prompt_template,
            **model_report,
        },
    }
    write_json(os.path.join(out_dir, "prepare.json"), summary)
    return summary

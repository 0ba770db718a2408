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

Trust in the data (issue 19 items 13-18): `preflight(cfg)` runs before any work, before Ray starts (the edit jobs
call it first): a model path that does not exist, a records file that cannot be read, no records, or no record
that passes the driver-side checks is a `DataError` (the jobs print it as one `error:` line, exit 2). The model
is resolved before the shards are built, so each target meets the model's tokenizer
(`pipeline.data.vocabulary`). After the build, no kept edit is a `DataError` too (naming the quarantine file),
and `stream.num_edits` above the kept edits of `stream.split` is a warning with both numbers.
`quarantine_report(summary)` is the one-line account of what was refused, which the jobs print.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import warnings
from typing import Any

from odedit.config import Config, ModelConfig
from odedit.metrics import METRIC_OF_ENV
from odedit.models import ADAPTERS
from odedit.models.base import ModelLoadError, check_loadable
from odedit.records import CORE_ENVS
from pipeline.cluster.session import ray_session
from pipeline.data.hf_export import export_records
from pipeline.data.quarantine import count_by_code
from pipeline.data.references import build_references
from pipeline.data.shards import MANIFEST, REFERENCES_DIR, build_shards, check_records
from pipeline.data.sources import SOURCES
from pipeline.data.sources.mmedit import RecordFileError
from pipeline.data.vocabulary import target_check
from pipeline.demo.model import ensure_demo_model
from pipeline.demo.train import backbone_sizes
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


class DataError(ValueError):
    """Input that cannot make an edit stream: no records, none kept, an unreadable file, a model that is not
    there (issue 19 item 16). Its message is one line naming the input and the fix."""


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_OFFLINE = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def model_path_problem(cfg: Config) -> str | None:
    """Why `model.name_or_path` cannot be loaded, found without loading anything; None when it may be.

    A local directory gets the adapter's own checks (`config.json`, family, no pickled weights). A path that
    does not exist is a problem unless it can be a hub name (`org/name`); with the hub offline
    (`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE`) a hub name must be in the local cache. Empty = the demo model.
    """
    path = cfg.model.name_or_path
    if not path:
        return None
    family = ADAPTERS.get(cfg.model.family)
    if os.path.exists(path):
        try:
            check_loadable(path, family.model_type, cfg.model.family)
        except ModelLoadError as exc:
            return str(exc)
        return None
    where = f"{path!r} does not exist (working directory {os.getcwd()!r})"
    if os.path.isabs(path) or path.startswith((".", "~")) or not HUB_ID.match(path):
        return f"model.name_or_path: {where}; give a directory written by save_pretrained"
    if any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in _OFFLINE):
        from huggingface_hub import try_to_load_from_cache  # deferred: only for a hub name with the hub offline

        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            return (
                f"model.name_or_path: {where}, and as a hub name it is not in the local cache while the hub is "
                "offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE); give a local directory or download it first"
            )
    return None


def demo_layers_problem(cfg: Config) -> str | None:
    """Why `method.layers` cannot be edited on the demo backbone the config trains (None when it can, or when a
    model is named): found before the demo model is trained, not at the first edit."""
    if cfg.model.name_or_path or cfg.data.source != "demo":
        return None
    backbone = cfg.data.demo.backbone
    n = backbone_sizes(backbone)["text_layers"]
    for layer in cfg.method.layers:
        if not -n <= layer < n:
            return (
                f"method.layers={list(cfg.method.layers)}: layer {layer} is out of range for the {n}-layer language "
                f"model of data.demo.backbone={backbone!r}; use 0..{n - 1} (jobs/configs/demo.yaml edits layer 1 of "
                "the small backbone, jobs/configs/demo_deep.yaml layer 4 of the deep one)"
            )
    return None


def preflight(cfg: Config) -> dict[str, Any]:
    """The checks before any work, without Ray (issue 19 item 16); returns what it counted.

    Raises:
        DataError: the model path cannot be loaded; the records file cannot be read; it holds no records; or
            every record is refused by the driver-side checks (`pipeline.data.shards.check_records`; images and
            the tokenizer are checked later, during preparation). Only readers marked `reads_before_ray` (the
            EasyEdit-file readers: cheap, no Ray) are read here; the others are checked after their build.
    """
    problem = model_path_problem(cfg) or demo_layers_problem(cfg)
    if problem:
        raise DataError(problem)
    reader = SOURCES.get(cfg.data.source)
    if not getattr(reader, "reads_before_ray", False):
        return {"records_checked": False}
    try:
        source = reader(cfg)
    except RecordFileError as exc:
        raise DataError(str(exc)) from None
    records, good, bad = check_records(source, cfg)
    if not records:
        raise DataError(
            f"data.path: {cfg.data.path!r} holds no records (an empty list); "
            "point data.path at an EasyEdit-format records file"
        )
    if not good:
        raise DataError(_all_refused(len(records), bad, "the record checks"))
    return {"records_checked": True, "records": len(records), "passed": len(good), "refused": len(bad)}


def _all_refused(n: int, entries: list[dict] | dict, where: str, path: str = "") -> str:
    counts = entries if isinstance(entries, dict) else count_by_code(entries)
    first = "" if isinstance(entries, dict) or not entries else f"; first: {entries[0]['reasons'][0]}"
    file = f" (every record and reason: {path})" if path else ""
    return (
        f"data: all {n} records were quarantined by {where}, nothing to edit: "
        f"{', '.join(f'{k}: {v}' for k, v in counts.items())}{first}{file}; fix the records or the settings named"
    )


def prepare(cfg: Config) -> dict:
    """Run the whole preparation for `cfg`; return (and write) the prepare.json summary.

    Raises:
        DataError: no edit was kept (every reason is in the quarantine file it names).
    """
    out_dir = prepare_output_dir(cfg)
    with ray_session():  # joins the cluster under `ray job submit`, or starts a local one
        # ---- the model first: the records' targets are checked against its tokenizer (issue 19 item 18)
        model_cfg, model_path, model_report = resolve_model(cfg)
        # the adapter's own tokenizer loading (MiniGPT-4's, InstructBLIP's differ from AutoTokenizer's)
        tokenizer = ADAPTERS.get(model_cfg.family)._load_processors(model_path)[0]
        unknown_words, vocabulary = target_check(tokenizer)

        # ---- records -> shards + quarantine
        source = SOURCES.get(cfg.data.source)(cfg)
        shards_dir = cfg.data.shards_dir or os.path.join(cfg.output_dir, "shards")
        t0 = time.perf_counter()
        manifest, shards_reused = build_shards(
            source, cfg, shards_dir, unknown_words=unknown_words, vocabulary=vocabulary
        )
        shard_seconds = time.perf_counter() - t0
        if not manifest["kept"]:
            raise DataError(
                _all_refused(
                    manifest["records"],
                    manifest["quarantine_by_reason"],
                    "preparation",
                    os.path.join(shards_dir, manifest["quarantine_files"]["jsonl"]),
                )
                if manifest["records"]
                else f"data: {cfg.data.source} gave no records (data.path={cfg.data.path!r}); nothing to edit"
            )
        _warn_num_edits(cfg, manifest)
        # ---- the validated records as a Hugging Face dataset, when asked
        exported = export_records(source, cfg, shards_dir, cfg.data.export_hf) if cfg.data.export_hf else None

        # ---- the unedited model's references on OUT
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
        # kept edits each metric is scored on (fewer than `kept` only with data.partial_records)
        "edits_by_metric": {
            name: manifest.get("edits_by_env", {}).get(env, 0)
            for env, name in METRIC_OF_ENV.items()
            if env in manifest.get("edits_by_env", {}) or env in CORE_ENVS
        },
        "partial_records": manifest.get("partial_records", False),
        "reader_notes": manifest.get("reader_notes", {}),
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


def _warn_num_edits(cfg: Config, manifest: dict) -> None:
    """`stream.num_edits` above the kept edits of `stream.split`: a warning with both numbers (issue 19 item 16)."""
    available = manifest["edits_by_split"].get(cfg.stream.split, 0)
    if cfg.stream.num_edits > available:
        warnings.warn(
            f"stream.num_edits={cfg.stream.num_edits} but the {cfg.stream.split} split has {available} kept "
            f"edit(s) ({manifest['quarantined']} of {manifest['records']} records quarantined); the stream runs "
            f"{available}",
            stacklevel=3,
        )


def quarantine_report(summary: dict) -> str:
    """One line on what preparation refused, for a job to print: counts per reason and the quarantine file."""
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["quarantine_by_reason"].items()) or "none"
    line = (
        f"data: {summary['records']} records, {summary['kept']} kept, {summary['quarantined']} quarantined "
        f"({reasons}); quarantine file: {summary['paths']['quarantine']}"
    )
    short = {k: v for k, v in summary.get("edits_by_metric", {}).items() if v < summary["kept"]}
    if short:
        line += "; partial records: " + ", ".join(f"{k} scored on {v} of {summary['kept']}" for k, v in short.items())
    notes = summary.get("reader_notes") or {}
    if notes:
        line += "; reader skipped: " + ", ".join(f"{k}: {v}" for k, v in notes.items())
    return line


def log_quarantine(tracker: Any, summary: dict) -> None:
    """Log what preparation refused into a stream's run (issue 19 item 17): `data.records`, `data.kept`,
    `data.quarantined` and `data.quarantine.<reason>` as step-0 metrics, `data.edits.<metric>` (the edits each
    metric is scored on), and the quarantine file (`quarantine.jsonl`) as an artifact under `data/`."""
    metrics = {f"data.{k}": float(summary[k]) for k in ("records", "kept", "quarantined")}
    metrics.update({f"data.quarantine.{code}": float(n) for code, n in summary["quarantine_by_reason"].items()})
    metrics.update({f"data.edits.{name}": float(n) for name, n in summary.get("edits_by_metric", {}).items()})
    tracker.log_metrics(metrics, step=0)
    path = summary["paths"]["quarantine"]
    if os.path.isfile(path):
        tracker.log_artifact(path, "data")

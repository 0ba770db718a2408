"""The validated records of a shard build as a Hugging Face dataset (`save_to_disk`), images embedded.

    summary = export_records(source, cfg, shards_dir, "/data/evqa_hf")     # jobs.prepare data.export_hf=...
    ds = datasets.load_from_disk("/data/evqa_hf")                           # anyone: exactly what was edited

Exported are the records the shards hold: the first `data.limit` records of the source minus those quarantined
(`quarantine.jsonl` beside the shards), in source order. Columns use EasyEdit's names, so the `hf` source
(`pipeline.data.sources.hf`) reads the dataset back with its default mapping:

    id, src, alt, pred, rephrase, loc, loc_ans, m_loc_q, m_loc_a, hard_answers, task, split, source   strings
    image, image_rephrase, m_loc                  datasets.Image: the image file's bytes as they are on disk
    hard_images                                   a list of datasets.Image
    image_path, image_rephrase_path, m_loc_path, hard_images_path   the image's path relative to its root
    extra                                         the record's extra, as a JSON object text

The `*_path` columns exist because `save_to_disk` keeps only the file name in an Image cell's path; the `hf`
source names each embedded image by them, so the shards built from the export have the same `image_path`s,
and, the bytes being the original files', the same images: the same content hash (`manifest.json`'s
`content_hash`) as the shards of the source, when no record was quarantined. (A quarantined record is not
exported, so the export's positions are consecutive where the source's had gaps: the shards then differ in
`edit_index` only.) Images are read through the same root confinement as the shard
builder (`pipeline.data.images.resolve_under_root`), or from the image store for records of embedded images.

The dataset is written by `pipeline.storage.hfdatasets.write_dataset`: row by row, replacing the target folder
in one rename.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from odedit.records import normalize
from pipeline.data import quarantine as q
from pipeline.data.blobs import blob_path, blob_ref
from pipeline.data.images import resolve_under_root
from pipeline.data.shards import KIND_ROOT
from pipeline.storage.hfdatasets import write_dataset

TEXT_COLUMNS = ("id", "src", "alt", "pred", "rephrase", "loc", "loc_ans", "m_loc_q", "m_loc_a", "task", "split")
IMAGE_COLUMNS = {"image": "edit", "image_rephrase": "rephrase", "m_loc": "locality"}  # column -> image kind
PATH_SUFFIX = "_path"  # the hf source's NAME_SUFFIX


def export_features() -> Any:
    """The `datasets.Features` of an export (see the module docstring)."""
    import datasets

    string = datasets.Value("string")
    features: dict[str, Any] = {name: string for name in TEXT_COLUMNS}
    for column in IMAGE_COLUMNS:
        features[column] = datasets.Image()
        features[column + PATH_SUFFIX] = string
    features["hard_images"] = datasets.List(datasets.Image())
    features["hard_images" + PATH_SUFFIX] = datasets.List(string)
    features["hard_answers"] = datasets.List(string)
    features["source"] = string
    features["extra"] = string
    return datasets.Features(features)


def kept_records(source: Any, cfg: Any, shards_dir: str) -> list[tuple[int, dict]]:
    """(position, raw record) of every record the shards of `shards_dir` hold, in source order."""
    records = list(source.records[: cfg.data.limit] if cfg.data.limit else source.records)
    refused: set[int] = set()
    path = os.path.join(shards_dir, q.QUARANTINE_JSONL)
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                refused.add(int(json.loads(line)["record_index"]))
    return [(i, raw) for i, raw in enumerate(records) if i not in refused]


def _image_bytes(source: Any, raw: dict, kind: str, label: str) -> bytes:
    ref = blob_ref(raw, kind, label)
    if ref is not None:
        path = blob_path(source.blob_dir, str(ref["sha256"]))
    else:
        path = resolve_under_root(getattr(source, KIND_ROOT[kind]), label)
    with open(path, "rb") as fh:
        return fh.read()


def record_row(source: Any, raw: dict) -> dict:
    """One kept raw record as an export row (images read from their files or the image store)."""
    d = normalize(raw)
    row: dict[str, Any] = {}
    for column in TEXT_COLUMNS:
        field = {"src": "prompt", "alt": "target"}.get(column, column)
        value = d.get(field)
        row[column] = None if value is None or value == "" else str(value)
    for column, kind in IMAGE_COLUMNS.items():
        label = d.get(column)
        if label:
            row[column] = {"bytes": _image_bytes(source, raw, kind, label), "path": label}
            row[column + PATH_SUFFIX] = label
        else:
            row[column] = row[column + PATH_SUFFIX] = None
    hard = list(d.get("hard_images") or [])
    row["hard_images"] = [{"bytes": _image_bytes(source, raw, "edit", p), "path": p} for p in hard]
    row["hard_images" + PATH_SUFFIX] = hard
    row["hard_answers"] = [str(a) for a in d.get("hard_answers") or []]
    row["source"] = d.get("source") or None
    row["extra"] = json.dumps(d.get("extra") or {}, ensure_ascii=False, sort_keys=True, default=str)
    return row


def _rows(source: Any, kept: Sequence[tuple[int, dict]]) -> Iterator[dict]:
    for _, raw in kept:
        yield record_row(source, raw)


def export_records(source: Any, cfg: Any, shards_dir: str, out_dir: str) -> dict:
    """Write the records the shards hold as a Hugging Face dataset at `out_dir`; return {"path", "rows"}."""
    kept = kept_records(source, cfg, shards_dir)
    return write_dataset(lambda: _rows(source, kept), export_features(), out_dir) | {"rows": len(kept)}

"""Reader of Hugging Face `datasets`: a `save_to_disk` directory, `load_dataset` data files, or a hub id.

    data.source=hf data.path=/data/evqa_hf                               # a directory written by save_to_disk
    data.source=hf data.path=/data/evqa/train.parquet data.image_root=/data/coco    # data files (json, csv, parquet)
    data.source=hf data.path=org/dataset data.hf_split=validation data.hf_streaming=true   # a hub id, if reachable
    data.hf_columns='{prompt: question, target: new_answer}'             # over the default mapping

Columns map to edit-record fields by `data.hf_columns` over the default mapping, EasyEdit's names: `src` ->
prompt, `alt` -> target, and pred, rephrase, image, image_rephrase, loc, loc_ans, m_loc, m_loc_q, m_loc_a,
hard_images, hard_answers, id, task, split, source, extra under their own names. prompt and target must map
to a column; another field whose default column is absent is simply not set, but a field the config maps
explicitly must find its column. A column's feature type must suit its field (text: a string `Value`; id: a
string or an integer; image, image_rephrase, m_loc: `datasets.Image` or a string path; hard_images: a list of
either; hard_answers: a list of strings; extra: a struct, or a string holding a JSON object). A missing column
or a wrong type is a config error (`ConfigError`) naming the field, the column and the mapping in use:
`jobs.*` check a `save_to_disk` directory while loading the config (exit 2 before any work, with the config's
other problems, `check_config`); data files and hub datasets are checked when they are opened.
Columns no field maps to go to the record's `extra`, by name, unless they hold images or bytes (not kept).

Images, and where their checks happen:
* a `datasets.Image` cell with bytes: the bytes are written once, by content, into the image store
  (`pipeline.data.blobs`, `<cache>/hf_images`), and the record keeps a label for the image (the path the
  shards show): the string column `<image column>_path` when the dataset has one (`image_path` for `image`,
  a list for `hard_images`: `save_to_disk` keeps only the file name in an Image cell, so exports write the
  relative path there), else the cell's path, else a name from the hash. The shard tasks load the images
  from the store through the checks of `pipeline.data.images` (size, pixels, verify, decode).
* a path (a string column, or an Image cell without bytes): relative to the image root of its kind
  (`data.image_root`, `data.rephrase_image_root`, `data.locality_image_root`; an empty edit root means the
  dataset's directory for a local dataset, and no root for a hub id). An absolute path inside its root is made
  relative; any other absolute path, or one with `..`, is quarantined, never followed.
* an Image cell with neither bytes nor a path, a `extra` string that is not a JSON object, a label that names
  both an embedded image and a file: the record is quarantined with that reason.

How the records reach Ray Data: the dataset goes through `ray.data.from_huggingface` (an in-memory or
memory-mapped `Dataset` as its Arrow table; with `data.hf_streaming`, an `IterableDataset` read in batches by
one streaming read task, so a dataset larger than memory never sits whole anywhere), and a `map_batches` on the
Ray workers applies the mapping and writes the embedded images into the store. Only text comes back to the
driver, which then does what it does for every source (`pipeline.data.shards`): validate, refuse duplicate
ids, plan shards, and fan the shard builds out to Ray tasks that load and check the images. The driver must
see every record before planning (duplicate ids, stable shard boundaries), so the records are not shards
straight out of `from_huggingface`; the images, which are the bulk, never pass through it. (Ray asks the hub
for parquet files of a streamed dataset and does not catch a failed connection: with `HF_HUB_OFFLINE` set, or
when that lookup fails, the same streaming read is done by Ray's `HuggingFaceDatasource` directly.)

Records get, when absent: `id` (`hf-<position>`, zero-padded), `task` (`data.task`; auto = vqa), `split`
(`data.split`) and `source` (`hf`). `data.limit` reads only that many rows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from odedit.config import ConfigError
from odedit.configlib import ConfigIssue
from odedit.records import check_relative_path
from pipeline.data.blobs import BLOBS_KEY, put_blob
from pipeline.data.quarantine import READER_PROBLEMS_KEY
from pipeline.data.sources import SOURCES
from pipeline.data.sources.base import RecordSource
from pipeline.reporting.progress import quiet_ray_data
from pipeline.storage.cache import cache_root

NAME = "hf"
# record field -> its column when data.hf_columns does not say (EasyEdit's names; ours where EasyEdit has none)
DEFAULT_COLUMNS = {
    "id": "id",
    "prompt": "src",
    "target": "alt",
    "pred": "pred",
    "rephrase": "rephrase",
    "image": "image",
    "image_rephrase": "image_rephrase",
    "loc": "loc",
    "loc_ans": "loc_ans",
    "m_loc": "m_loc",
    "m_loc_q": "m_loc_q",
    "m_loc_a": "m_loc_a",
    "hard_images": "hard_images",
    "hard_answers": "hard_answers",
    "task": "task",
    "split": "split",
    "source": "source",
    "extra": "extra",
}
REQUIRED = ("prompt", "target")
# field -> the feature kinds it accepts (see `feature_kind`)
ACCEPTS: dict[str, tuple[str, ...]] = {
    "id": ("string", "integer"),
    "image": ("image", "string"),
    "image_rephrase": ("image", "string"),
    "m_loc": ("image", "string"),
    "hard_images": ("list of image", "list of string"),
    "hard_answers": ("list of string",),
    "extra": ("struct", "string"),
}
TEXT = ("string",)
IMAGE_KIND = {"image": "edit", "hard_images": "edit", "image_rephrase": "rephrase", "m_loc": "locality"}
KIND_ROOT = {"edit": "image_root", "rephrase": "rephrase_image_root", "locality": "locality_image_root"}
# An embedded image's name (its label: the path the shards show) may come from a string column named after its
# image column plus this suffix (`image` -> `image_path`; a list of names for a list of images), because
# `save_to_disk` keeps only the file name in an Image cell's path. `pipeline.data.hf_export` writes them.
NAME_SUFFIX = "_path"
BATCH_ROWS = 256  # rows per map_batches call: a batch's images are in a worker's memory at once
_NOT_JSON = ("image", "binary", "audio", "video", "pdf", "other")  # kinds never copied into `extra`


# ---------------------------------------------------------------------------------------------- features


def feature_kind(feature: Any) -> str:
    """A short name of a `datasets` feature type: string, integer, image, list of <kind>, struct, ..."""
    import datasets

    if isinstance(feature, datasets.Value):
        dtype = str(feature.dtype)
        if dtype in ("string", "large_string"):
            return "string"
        if dtype.startswith(("int", "uint")):
            return "integer"
        if dtype in ("binary", "large_binary"):
            return "binary"
        return dtype  # float32, bool, timestamp[s], ...
    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.ClassLabel):
        return "class label"
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return f"list of {feature_kind(feature.feature)}"
    if isinstance(feature, (list, tuple)) and len(feature) == 1:  # the old [feature] list spelling
        return f"list of {feature_kind(feature[0])}"
    if isinstance(feature, (dict, datasets.Features)):
        return "struct"
    name = type(feature).__name__.lower()
    return name if name in ("audio", "video", "pdf") else "other"


def column_plan(features: Mapping[str, Any] | None, columns: Mapping[str, str], where: str) -> dict:
    """How each field is read: {"fields": {field: [column, kind]}, "extra_columns": [...], "dropped": [...]}.

    Raises:
        ConfigError: a required or explicitly mapped column is missing, or a column's type does not suit its
            field; every such problem at once, each naming the field, the column and the mapping.
    """
    if features is None:
        raise ConfigError(
            [
                ConfigIssue(
                    "data.path",
                    where,
                    "the dataset does not declare its features (column types), so its columns cannot be checked",
                    "set data.hf_streaming=false (the columns are then read, and typed, in full), or save the "
                    "dataset with save_to_disk",
                )
            ],
            source=f"hf dataset {where}",
        )
    mapping = {**DEFAULT_COLUMNS, **columns}
    shown = ", ".join(f"{f}<-{c}" for f, c in mapping.items() if f in columns or c in features)
    issues: list[ConfigIssue] = []
    fields: dict[str, list[str]] = {}
    for field, column in mapping.items():
        if column not in features:
            if field in REQUIRED or field in columns:
                how = "set in data.hf_columns" if field in columns else "the default mapping"
                issues.append(
                    ConfigIssue(
                        f"data.hf_columns.{field}",
                        column,
                        f"the dataset has no column {column!r} ({how} reads {field} from it); its columns: "
                        f"{', '.join(features)}",
                        f"map {field} to one of them, e.g. data.hf_columns.{field}=<column> (mapping in use: {shown})",
                    )
                )
            continue
        kind = feature_kind(features[column])
        accepts = ACCEPTS.get(field, TEXT)
        if kind not in accepts:
            issues.append(
                ConfigIssue(
                    f"data.hf_columns.{field}",
                    column,
                    f"column {column!r} is {kind} ({features[column]!r}); {field} needs {' or '.join(accepts)}",
                    f"map {field} to a column of that type, or cast the column (mapping in use: {shown})",
                )
            )
            continue
        fields[field] = [column, kind]
    if issues:
        raise ConfigError(issues, source=f"hf dataset {where}")
    names: dict[str, str] = {}  # image field -> its companion path column (see NAME_SUFFIX)
    for field, (column, kind) in fields.items():
        companion = f"{column}{NAME_SUFFIX}"
        if field in IMAGE_KIND and "image" in kind and companion in features:
            wanted = "list of string" if kind.startswith("list of ") else "string"
            if feature_kind(features[companion]) == wanted:
                names[field] = companion
    mapped = set(mapping.values()) | set(names.values())
    extra, dropped = [], []
    for column, feature in features.items():
        if column in mapped:
            continue
        (dropped if any(k in feature_kind_deep(feature) for k in _NOT_JSON) else extra).append(column)
    return {"fields": fields, "names": names, "extra_columns": extra, "dropped": dropped}


def feature_kind_deep(feature: Any) -> set[str]:
    """Every kind inside `feature` (a struct's and a list's members included)."""
    kind = feature_kind(feature)
    if kind == "struct":
        return {kind, *(k for sub in feature.values() for k in feature_kind_deep(sub))}
    if kind.startswith("list of "):
        inner = feature.feature if hasattr(feature, "feature") else feature[0]
        return {kind, *feature_kind_deep(inner)}
    return {kind}


# ---------------------------------------------------------------------------------------------- opening


def _local(path: str) -> bool:
    return bool(path) and os.path.exists(path)


def _pick_split(ds: Any, split: str, path: str) -> Any:
    import datasets

    if not isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split and getattr(ds, "split", None) not in (None, split):
            raise ConfigError(
                [
                    ConfigIssue(
                        "data.hf_split", split, f"{path} holds only the split {ds.split!r}", "name it or leave it empty"
                    )
                ],
                source=f"hf dataset {path}",
            )
        return ds
    names = list(ds.keys())
    if split:
        if split not in ds:
            raise ConfigError(
                [ConfigIssue("data.hf_split", split, f"no split {split!r} in {path}", f"one of {', '.join(names)}")],
                source=f"hf dataset {path}",
            )
        return ds[split]
    if len(names) == 1:
        return ds[names[0]]
    raise ConfigError(
        [ConfigIssue("data.hf_split", "", f"{path} has {len(names)} splits", f"name one of {', '.join(names)}")],
        source=f"hf dataset {path}",
    )


_DATA_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}


def saved_dataset(path: str) -> bool:
    """Whether `path` is a directory written by `save_to_disk` (a Dataset or a DatasetDict)."""
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def open_dataset(data: Any) -> Any:
    """The `datasets.Dataset` (or, with `hf_streaming`, `IterableDataset`) that `data` (a `DataConfig`) names.

    Raises:
        ConfigError: an empty path, a split that is not there (or none named where there are several).
    """
    import datasets

    path = data.path
    if not path:
        raise ConfigError(
            [ConfigIssue("data.path", path, "is empty", "give a save_to_disk directory, data files or a hub id")],
            source="hf source",
        )
    if _local(path) and saved_dataset(path):
        ds = _pick_split(datasets.load_from_disk(path), data.hf_split, path)
        if data.hf_streaming:
            ds = ds.to_iterable_dataset(num_shards=max(1, min(64, getattr(ds, "num_rows", 1) // 1024)))
        return ds
    kwargs: dict[str, Any] = {"streaming": data.hf_streaming}
    if data.hf_subset:
        kwargs["name"] = data.hf_subset
    if _local(path) and os.path.isfile(path):
        builder = _DATA_FILE_BUILDERS.get(os.path.splitext(path)[1].lower())
        if builder is None:
            raise ConfigError(
                [
                    ConfigIssue(
                        "data.path",
                        path,
                        "is a file of a kind load_dataset cannot read",
                        f"give a {', '.join(sorted(_DATA_FILE_BUILDERS))} file, a folder of them or a save_to_disk dir",
                    )
                ],
                source="hf source",
            )
        ds = datasets.load_dataset(builder, data_files=path, **kwargs)  # one file: its one split, picked below
    else:
        if data.hf_split:  # a hub dataset: fetch only the split asked for
            kwargs["split"] = data.hf_split
        ds = datasets.load_dataset(path, **kwargs)
    return _pick_split(ds, data.hf_split, path)


def image_roots(data: Any) -> dict[str, str]:
    """Absolute image roots of path cells (an empty edit root = a local dataset's directory, else none)."""
    root = data.image_root
    if not root and _local(data.path):
        root = data.path if os.path.isdir(data.path) else os.path.dirname(os.path.abspath(data.path))
    absolute = os.path.abspath(root) if root else ""
    return {
        "image_root": absolute,
        "rephrase_image_root": os.path.abspath(data.rephrase_image_root) if data.rephrase_image_root else absolute,
        "locality_image_root": os.path.abspath(data.locality_image_root) if data.locality_image_root else absolute,
    }


# ---------------------------------------------------------------------------------------------- Ray Data


def to_ray_dataset(ds: Any) -> Any:
    """`ray.data.from_huggingface(ds)`; for a streamed dataset with no hub reachable, the same streaming read
    without Ray's hub lookup (see the module docstring). A `Dataset` is cut into blocks of about `BATCH_ROWS`
    rows (at most 64), so the mapping runs in several tasks."""
    import datasets
    import ray.data

    if isinstance(ds, datasets.IterableDataset):
        from huggingface_hub import constants

        if not constants.HF_HUB_OFFLINE:
            import requests

            try:
                return ray.data.from_huggingface(ds)
            except requests.RequestException:
                pass  # Ray's lookup of hub parquet files could not connect: read the stream directly
        from ray.data._internal.datasource.huggingface_datasource import HuggingFaceDatasource

        return ray.data.read_datasource(HuggingFaceDatasource(ds))
    blocks = max(1, min(64, -(-len(ds) // BATCH_ROWS)))
    return ray.data.from_huggingface(ds, override_num_blocks=blocks)


def read_rows(ds: Any, plan: dict, data: Any, roots: dict[str, str], blob_dir: str) -> list[dict]:
    """The dataset's rows as partial records (text, image labels, blob references), in dataset order."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init()  # starts or joins Ray (RAY_ADDRESS), as Ray Data would on first use
    quiet_ray_data()
    ctx = ray.data.DataContext.get_current()
    preserve = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # record positions are edit indices
    try:
        rds = to_ray_dataset(ds)
        rds = rds.map_batches(
            rows_to_records,
            batch_format="pyarrow",
            batch_size=BATCH_ROWS,
            fn_kwargs={"plan": plan, "roots": roots, "blob_dir": blob_dir, "max_bytes": data.max_image_bytes},
        )
        return [json.loads(row["record"]) for row in rds.iter_rows()]
    finally:
        ctx.execution_options.preserve_order = preserve


def rows_to_records(batch: Any, *, plan: dict, roots: dict, blob_dir: str, max_bytes: int) -> dict:
    """Ray Data batch function (on the workers): mapped rows -> partial records as JSON text (see `row_record`)."""
    rows = batch.to_pylist() if hasattr(batch, "to_pylist") else _dict_rows(batch)
    return {"record": [json.dumps(row_record(row, plan, roots, blob_dir, max_bytes), default=str) for row in rows]}


def _dict_rows(batch: Mapping[str, Sequence]) -> list[dict]:
    names = list(batch)
    return [dict(zip(names, values)) for values in zip(*(batch[n] for n in names))]


def row_record(row: Mapping[str, Any], plan: dict, roots: dict, blob_dir: str, max_bytes: int) -> dict:
    """One dataset row -> a raw record (unvalidated): mapped fields, `extra`, reader problems, blob references."""
    record: dict[str, Any] = {}
    problems: list[str] = []
    blobs: dict[str, dict[str, dict]] = {}
    files: dict[str, set[str]] = {}

    def image(value: Any, field: str, where: str, name: Any = None) -> Any:
        kind = IMAGE_KIND[field]
        if value is None:
            return None
        if isinstance(value, str):
            return _confine(value, roots[KIND_ROOT[kind]], files.setdefault(kind, set()))
        if not isinstance(value, Mapping):
            problems.append(f"{where}: an image cell must be bytes or a path, got {type(value).__name__}")
            return None
        data, path = value.get("bytes"), value.get("path")
        if data is None:
            if isinstance(path, str) and path:
                return _confine(path, roots[KIND_ROOT[kind]], files.setdefault(kind, set()))
            problems.append(f"{where}: the image cell has neither bytes nor a path")
            return None
        ref = put_blob(blob_dir, data, max_bytes)
        label = _label(name if isinstance(name, str) and name else path, ref["sha256"])
        by_label = blobs.setdefault(kind, {})
        if label in by_label and by_label[label]["sha256"] != ref["sha256"]:
            label = f"{ref['sha256'][:16]}/{os.path.basename(label)}"  # one name, two images: tell them apart
        by_label[label] = ref
        return label

    for field, (column, kind) in plan["fields"].items():
        value = row.get(column)
        if value is None:
            continue
        if field in IMAGE_KIND:
            name = row.get(plan["names"][field]) if field in plan["names"] else None
            if kind.startswith("list of "):
                if isinstance(value, list):
                    names = name if isinstance(name, list) and len(name) == len(value) else [None] * len(value)
                    value = [image(v, field, f"{field}[{i}]", n) for i, (v, n) in enumerate(zip(value, names))]
            else:
                value = image(value, field, field, name)
            if value is None:
                continue
        elif field == "extra" and isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                problems.append(f"extra: column {column!r} is not JSON ({exc.msg} at position {exc.pos})")
                continue
            if not isinstance(value, dict):
                problems.append(f"extra: column {column!r} must hold a JSON object, got {type(value).__name__}")
                continue
        record[field] = value
    extra = record.get("extra") if isinstance(record.get("extra"), dict) else None
    if plan["extra_columns"]:
        extra = dict(extra or {})
        for column in plan["extra_columns"]:
            extra[column] = row.get(column)
    if extra is not None:
        record["extra"] = extra
    for kind, names in files.items():
        for name in sorted(names & set(blobs.get(kind, {}))):
            problems.append(f"{kind} image {name!r}: names both an embedded image and a file; rename one")
    if blobs:
        record[BLOBS_KEY] = blobs
    if problems:
        record[READER_PROBLEMS_KEY] = problems
    return record


def _confine(path: str, root: str, seen: set[str]) -> str:
    """A path cell as the record keeps it: an absolute path inside `root` made relative; any other path as it
    is (validation refuses absolute paths and `..`, the image loader anything resolving outside the root)."""
    if os.path.isabs(path) and root:
        real_root = os.path.realpath(root)
        real = os.path.realpath(path)
        if os.path.commonpath([real_root, real]) == real_root and real != real_root:
            path = os.path.relpath(real, real_root)
    seen.add(path)
    return path


def _label(path: Any, sha256: str) -> str:
    """The name an embedded image goes by: the cell's path when it is a usable relative path, else its file
    name, else one made from the hash."""
    if isinstance(path, str) and path:
        if check_relative_path(path) is None:
            return path
        base = os.path.basename(path.replace("\\", "/"))
        if base and check_relative_path(base) is None:
            return base
    return f"embedded-{sha256[:16]}"


# ---------------------------------------------------------------------------------------------- reader


def read(cfg: Any) -> RecordSource:
    """The records of the dataset `cfg.data` names (see the module docstring)."""
    import datasets

    data = cfg.data
    ds = open_dataset(data)
    plan = column_plan(ds.features, data.hf_columns, data.path)
    streamed = isinstance(ds, datasets.IterableDataset)
    if data.limit:
        ds = ds.take(data.limit) if streamed else ds.select(range(min(data.limit, len(ds))))
    keep = [c for c, _ in plan["fields"].values()] + list(plan["names"].values()) + plan["extra_columns"]
    ds = ds.select_columns(list(dict.fromkeys(keep)))
    if not streamed and _local(data.path):
        # Ray's from_huggingface reloads a dataset by its name to compare fingerprints (a hub download for one
        # saved from the hub): a local dataset is read where it is.
        ds.info.dataset_name = None
    if plan["dropped"]:
        print(f"note: hf columns {', '.join(plan['dropped'])} hold images or bytes no field maps to; not kept")
    roots = image_roots(data)
    blob_dir = str(cache_root() / "hf_images")
    task = data.task if data.task != "auto" else "vqa"
    records = []
    for i, record in enumerate(read_rows(ds, plan, data, roots, blob_dir)):
        record.setdefault("id", f"{NAME}-{i:05d}")
        record.setdefault("task", task)
        record.setdefault("split", data.split)
        record.setdefault("source", NAME)
        records.append(record)
    return RecordSource(records=records, name=NAME, blob_dir=blob_dir, **roots)


def check_config(raw: dict) -> list[ConfigIssue]:
    """Config check (on the raw config dict, see `pipeline.data.sources.base.check_source`): a path is given,
    and a `save_to_disk` directory's columns suit the mapping (opening one reads its metadata only)."""
    data = raw.get("data") if isinstance(raw, dict) else None
    data = data if isinstance(data, dict) else {}
    path = data.get("path", "")
    if not isinstance(path, str) or not path:
        hint = "the hf source needs a save_to_disk directory, data files or a hub id"
        return [ConfigIssue("data.path", path, "is empty", hint)]
    columns = data.get("hf_columns") or {}
    split = data.get("hf_split") or ""
    if not (os.path.isdir(path) and saved_dataset(path)) or not isinstance(columns, dict) or not isinstance(split, str):
        return []  # opened (and checked) when read; a malformed setting is reported by the typed config
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        return []
    import datasets

    try:
        ds = _pick_split(datasets.load_from_disk(path), split, path)
        column_plan(ds.features, columns, path)
    except ConfigError as err:
        return err.issues
    except Exception as exc:  # an unreadable directory: the reader raises the real error when the job runs
        return [ConfigIssue("data.path", path, f"cannot be opened as a Hugging Face dataset ({exc})", "")]
    return []


read.check_config = check_config  # type: ignore[attr-defined]
SOURCES.register(NAME, read)

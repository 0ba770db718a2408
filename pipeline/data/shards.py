"""Records -> validated environment shards (parquet), quarantine and a manifest, built with Ray Data.

    manifest, reused = build_shards(source, cfg, shards_dir)      # source: pipeline.data.sources.base.RecordSource
    cases = load_cases(shards_dir, split="test", limit=100)        # -> list[odedit.envs.EditCase]

Steps (design.md §3):
1. Driver, text only: cut to `data.limit`, validate every record (`odedit.records.validate_record` plus reader
   problems and duplicate ids: the first record with an id is kept, later ones are refused), and refuse, with
   every reason (issue 19 items 13, 14, 18): a record whose content repeats an earlier kept one (`duplicate`,
   `pipeline.data.duplicates`); one lacking a field a metric or `odedit.environments` needs (`missing_field`,
   `required_envs`) unless `data.partial_records`; one whose target has words the model's tokenizer does not
   know (`target_unknown_tokens`, when `build_shards` is given `unknown_words`: `pipeline.prepare` gives it the
   resolved model's tokenizer). Then plan shards: consecutive good records, whole edits only, until a shard
   would pass `data.rows_per_shard` rows.
2. Ray Data, one task per planned shard (at most `data.build_workers` at once): read, check, decode and
   shrink each image (`pipeline.data.images`), build the edit's environment rows (`pipeline.data.envrows`), sort them by
   (edit_index, environment, sample_index) and write `env-<shard>.parquet` with the declared schema. A task
   holds one shard's records and images only, so memory does not grow with the split (EasyEdit decodes the
   whole split in RAM). Records whose images are refused come back as quarantine rows. Images embedded in a
   dataset (`pipeline.data.sources.hf`) come from the source's image store (`pipeline.data.blobs`) through
   the same checks (`record_fetcher`). Ray Data's progress bars are off when the output is not a terminal.
3. Driver: quarantine files, then `manifest.json` LAST (its presence means the shards are complete).

Shard names are `env-<planned shard number>.parquet` (5 digits), a function of the records and settings
only; a planned shard whose every record is refused is not written, so numbers may skip. The manifest lists
the shards with their rows, edits, edit_index range, rows per environment, size and sha256, and their
`content_hash` (`content_hash()`: equal hashes, byte-identical shards, however the records were read).

Why not `Dataset.write_parquet`: it names files by write UUID and task and cuts files at block boundaries,
so it promises neither stable names nor "all rows of an edit in one file"; each task here writes exactly the
one shard it was given, atomically, and returns its summary.

Caching: the manifest stores a fingerprint of the inputs (`config_hash`: records, image files' sizes and
mtimes or embedded images' sha256, the data settings, schema version, Pillow version). `build_shards` returns
the existing manifest, untouched, when the fingerprint matches and every shard is present with its recorded
size.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from odedit.envs import EditCase, Reference
from odedit.models.base import Sample
from odedit.records import CORE_ENVS, ENV_FIELDS, EditRecord, missing_env_fields, validate_record
from pipeline.data import quarantine as q
from pipeline.data.blobs import blob_ref, load_blob
from pipeline.data.duplicates import DuplicateFinder
from pipeline.data.envrows import Fetch, image_requests, planned_rows, record_rows, row_sort_key
from pipeline.data.images import ImageLimits, ImageRefused, StoredImage, decode_png, load_image
from pipeline.data.schema import ENV_SCHEMA, REFERENCE_SCHEMA, SCHEMA_VERSION, read_table, to_table, write_table
from pipeline.reporting.progress import quiet_ray_data
from pipeline.storage.jsonio import write_json

MANIFEST = "manifest.json"
SHARD_NAME = "env-{:05d}.parquet"
REFERENCES_DIR = "references"
TASKS_PER_WORKER = 2  # Ray tasks per build worker at least; each builds its shards one after another
MAX_SHARDS_PER_TASK = 64  # ... and more tasks when there are many shards (a retried task redoes fewer)
KIND_ROOT = {"edit": "image_root", "rephrase": "rephrase_image_root", "locality": "locality_image_root"}
# Settings that change what the shards contain (paths of outputs and worker counts do not).
_CONTENT_SETTINGS = (
    "source",
    "task",
    "split",
    "limit",
    "rows_per_shard",
    "max_image_pixels",
    "max_image_bytes",
    "max_text_chars",
    "stored_image_size",
    "partial_records",
)


class ShardsError(RuntimeError):
    """A shards directory that cannot be used (no manifest, a missing shard)."""


# ---------------------------------------------------------------------------------------------- driver side


def required_envs(cfg: Any) -> tuple[str, ...]:
    """The environments every kept record must have (issue 19 item 14): those of the MMEdit metrics
    (`odedit.records.CORE_ENVS`) and, with ODEdit on, `odedit.environments`; none with `data.partial_records`.
    IN is always built (its fields are required by `validate_record` itself)."""
    if cfg.data.partial_records:
        return ()
    envs = list(CORE_ENVS)
    if cfg.odedit.enabled:
        envs += [e for e in cfg.odedit.environments if e not in envs]
    return tuple(e for e in envs if e != "in")


def validate_records(
    records: Sequence[Any],
    source: str,
    max_chars: int,
    *,
    required: Sequence[str] = (),
    duplicates: DuplicateFinder | None = None,
    unknown_words: Callable[[str], list[str]] | None = None,
) -> tuple[list[tuple[int, dict]], list[dict]]:
    """(good (index, raw) pairs, quarantine entries): every reason of every bad record.

    Args:
        required: environments a record must have (`required_envs`); each missing field is a `missing_field`.
        duplicates: finds records whose content repeats an earlier kept one (`duplicate`); None = ids only.
        unknown_words: target text -> the words the model's tokenizer does not know (`target_unknown_tokens`).
    """
    good: list[tuple[int, dict]] = []
    bad: list[dict] = []
    first_seen: dict[str, int] = {}
    for i, raw in enumerate(records):
        reasons = validate_record(raw, max_chars)
        problems = [(q.classify(r), r) for r in reasons]
        if isinstance(raw, dict) and not reasons:
            problems += [
                (
                    q.MISSING_FIELD,
                    f"{field}: missing (the {env} environment needs {', '.join(ENV_FIELDS[env])}); "
                    "set data.partial_records=true to keep such records and score that metric on fewer edits",
                )
                for env, field in missing_env_fields(raw, required)
            ]
            target = EditRecord.from_raw(raw, max_chars).target
            unknown = unknown_words(target) if unknown_words is not None else []
            if unknown:
                problems.append(
                    (
                        q.UNKNOWN_TOKENS,
                        f"target: {', '.join(repr(w) for w in unknown)} not in the model's tokenizer vocabulary "
                        "(each would become <unk>, which makes the edit trivially reliable); rephrase the target "
                        "or use a model whose tokenizer knows the words",
                    )
                )
        if isinstance(raw, dict):
            problems += [(q.READER, str(r)) for r in raw.get(q.READER_PROBLEMS_KEY) or []]
            rid = raw.get("id")
            if isinstance(rid, (str, int)) and not isinstance(rid, bool) and str(rid).strip():
                key = str(rid)
                if key in first_seen:
                    problems.append(
                        (
                            q.DUPLICATE_ID,
                            f"id: {q.safe_text(key)!r} duplicates the record at "
                            f"position {first_seen[key]}; ids must be unique",
                        )
                    )
                else:
                    first_seen[key] = i
            earlier = duplicates.earlier(raw) if duplicates is not None and not reasons else None
            if earlier is not None:
                problems.append(
                    (
                        q.DUPLICATE,
                        f"record: the same edit as the record at position {earlier} (equal prompt, target, "
                        "rephrases, localities and image contents); each edit is kept once",
                    )
                )
        if problems:
            bad.append(q.entry(i, raw, source, "validate", problems))
        else:
            good.append((i, raw))
            if duplicates is not None:
                duplicates.add(i, raw)
    return good, bad


def plan_shards(good: Sequence[tuple[int, dict]], rows_per_shard: int, max_chars: int) -> list[list[tuple[int, dict]]]:
    """Consecutive groups of good records, each at most `rows_per_shard` planned rows (one edit never splits;
    an edit bigger than the limit gets a shard of its own)."""
    plans: list[list[tuple[int, dict]]] = []
    current: list[tuple[int, dict]] = []
    rows = 0
    for index, raw in good:
        n = planned_rows(EditRecord.from_raw(raw, max_chars))
        if current and rows + n > rows_per_shard:
            plans.append(current)
            current, rows = [], 0
        current.append((index, raw))
        rows += n
    if current:
        plans.append(current)
    return plans


def fingerprint(
    source: Any, cfg: Any, good: Sequence[tuple[int, dict]], records: Sequence[Any], vocabulary: str = ""
) -> str:
    """sha256 of everything the shards depend on (see the module docstring); `vocabulary` identifies the
    tokenizer the targets were checked against ("" = none)."""
    from PIL import __version__ as pillow_version

    h = hashlib.sha256()
    settings = {k: getattr(cfg.data, k) for k in _CONTENT_SETTINGS}
    roots = {k: getattr(source, k) for k in KIND_ROOT.values()}
    h.update(
        json.dumps(
            {
                "schema": SCHEMA_VERSION,
                "pillow": pillow_version,
                "settings": settings,
                "roots": roots,
                "name": source.name,
                "required_envs": list(required_envs(cfg)),
                "vocabulary": vocabulary,
            },
            sort_keys=True,
        ).encode()
    )
    for raw in records:
        h.update(json.dumps(raw, ensure_ascii=True, sort_keys=True, default=str).encode())
    for _, raw in good:
        for path, kind in image_requests(EditRecord.from_raw(raw, cfg.data.max_text_chars)):
            ref = blob_ref(raw, kind, path)
            if ref is not None:  # an embedded image: its content hash is its identity
                h.update(f"{kind}:{path}:blob:{ref.get('sha256')}:{ref.get('bytes')}\n".encode())
                continue
            try:
                st = os.stat(os.path.join(roots[KIND_ROOT[kind]], path))
                h.update(f"{kind}:{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{kind}:{path}:absent\n".encode())
    return h.hexdigest()


def read_manifest(shards_dir: str) -> dict:
    """The manifest of a complete shards directory.

    Raises:
        ShardsError: no (readable) manifest: the build never finished there.
    """
    path = os.path.join(shards_dir, MANIFEST)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ShardsError(
            f"{shards_dir}: no {MANIFEST}, so no complete shard build is there; run "
            "python -m jobs.prepare --config <yaml> (or point data.shards_dir at one)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ShardsError(
            f"{path}: unreadable ({exc}); delete the directory and rebuild with python -m jobs.prepare"
        ) from None


def _reusable(shards_dir: str, fp: str) -> dict | None:
    try:
        manifest = read_manifest(shards_dir)
    except ShardsError:
        return None
    if manifest.get("config_hash") != fp or manifest.get("schema_version") != SCHEMA_VERSION:
        return None
    for shard in manifest.get("shards", []):
        path = os.path.join(shards_dir, shard["file"])
        if not os.path.isfile(path) or os.path.getsize(path) != shard["bytes"]:
            return None
    if not all(os.path.isfile(os.path.join(shards_dir, f)) for f in manifest["quarantine_files"].values()):
        return None
    return manifest


def _clear(shards_dir: str) -> None:
    """Remove a previous build's outputs (manifest first, so a crash never leaves a stale 'complete' dir)."""
    manifest = os.path.join(shards_dir, MANIFEST)
    if os.path.exists(manifest):
        os.remove(manifest)
    for path in glob.glob(os.path.join(shards_dir, "env-*.parquet")):
        os.remove(path)
    for name in (q.QUARANTINE_PARQUET, q.QUARANTINE_JSONL):
        if os.path.exists(os.path.join(shards_dir, name)):
            os.remove(os.path.join(shards_dir, name))
    shutil.rmtree(os.path.join(shards_dir, REFERENCES_DIR), ignore_errors=True)


def check_records(
    source: Any, cfg: Any, unknown_words: Callable[[str], list[str]] | None = None
) -> tuple[list[Any], list[tuple[int, dict]], list[dict]]:
    """(records after `data.limit`, good (index, raw) pairs, validation quarantine entries) of `source`: the
    driver-side checks of step 1, without Ray (also what `pipeline.prepare.preflight` runs before any work)."""
    data = cfg.data
    records = list(source.records[: data.limit] if data.limit else source.records)
    finder = DuplicateFinder({k: getattr(source, k) for k in KIND_ROOT.values()}, getattr(source, "blob_dir", ""))
    good, bad = validate_records(
        records,
        source.name,
        data.max_text_chars,
        required=required_envs(cfg),
        duplicates=finder,
        unknown_words=unknown_words,
    )
    return records, good, bad


def build_shards(
    source: Any,
    cfg: Any,
    shards_dir: str,
    reuse: bool = True,
    *,
    unknown_words: Callable[[str], list[str]] | None = None,
    vocabulary: str = "",
) -> tuple[dict, bool]:
    """Build (or reuse) the shards of `source` under `shards_dir`; return (manifest, reused).

    `unknown_words` (target -> words the tokenizer does not know) and `vocabulary` (an identity of that
    tokenizer, part of the fingerprint) come from `pipeline.prepare.target_vocabulary_check`; None = no check.
    """
    data = cfg.data
    records, good, bad = check_records(source, cfg, unknown_words)
    fp = fingerprint(source, cfg, good, records, vocabulary)
    if reuse:
        manifest = _reusable(shards_dir, fp)
        if manifest is not None:
            return manifest, True
    os.makedirs(shards_dir, exist_ok=True)
    _clear(shards_dir)
    plans = plan_shards(good, data.rows_per_shard, data.max_text_chars)
    summaries = _run_shard_tasks(plans, source, cfg, shards_dir) if plans else []
    image_bad = [e for s in summaries for e in s.pop("quarantine")]
    entries = sorted(bad + image_bad, key=lambda e: e["record_index"])
    q.write_quarantine(entries, shards_dir)
    manifest = _manifest(source, records, entries, summaries, fp, data)
    write_json(os.path.join(shards_dir, MANIFEST), manifest)
    return manifest, False


def _run_shard_tasks(plans: list, source: Any, cfg: Any, shards_dir: str) -> list[dict]:
    import ray
    import ray.data

    items = [{"shard": k, "records": json.dumps(plan, ensure_ascii=True)} for k, plan in enumerate(plans)]
    if not ray.is_initialized():
        ray.init()  # starts or joins Ray (RAY_ADDRESS), as Ray Data would on first use
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers = min(cfg.data.build_workers or cpus, len(items))
    # Few Ray tasks, each building its shards one after another (memory still follows one shard: a task
    # returns only summaries). One task per shard (~0.15 s of work each) left the workers idle between tasks
    # while the driver dispatched the next one, and 2 workers on 2 CPUs built only ~1.1x faster than 1
    # (bench.shards; 1.7x now).
    blocks = min(len(items), max(workers * TASKS_PER_WORKER, -(-len(items) // MAX_SHARDS_PER_TASK)))
    quiet_ray_data()  # no bar redraws in a job's log
    ctx = ray.data.DataContext.get_current()
    reserve = ctx.op_resource_reservation_enabled
    # Ray Data reserves part of the cluster for each operator's outputs; on a 2-CPU cluster that held the
    # second build task back for about a second (a task's output here is a few summaries).
    ctx.op_resource_reservation_enabled = False
    try:
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(
            build_shard_batch,
            batch_size=None,
            num_cpus=1,
            compute=ray.data.TaskPoolStrategy(size=workers),
            fn_kwargs={
                "shards_dir": os.path.abspath(shards_dir),
                "roots": {k: getattr(source, k) for k in KIND_ROOT.values()},
                "limits": ImageLimits.from_config(cfg.data),
                "max_chars": cfg.data.max_text_chars,
                "source": source.name,
                "blob_dir": getattr(source, "blob_dir", ""),
            },
        )
        summaries = [json.loads(row["summary"]) for row in ds.take_all()]
    finally:
        ctx.op_resource_reservation_enabled = reserve
    return sorted(summaries, key=lambda s: s["shard"])


def _manifest(
    source: Any, records: Sequence[Any], entries: list[dict], summaries: list[dict], fp: str, data: Any
) -> dict:
    rows_by_env: Counter[str] = Counter()
    edits_by_split: Counter[str] = Counter()
    edits_by_env: Counter[str] = Counter()
    for s in summaries:
        rows_by_env.update(s["rows_by_env"])
        edits_by_split.update(s["edits_by_split"])
        edits_by_env.update(s.get("edits_by_env", {}))
    shards = [
        {
            k: s[k]
            for k in ("file", "rows", "edits", "first_edit_index", "last_edit_index", "rows_by_env", "bytes", "sha256")
        }
        for s in summaries
        if s["rows"]
    ]
    return {
        "schema_version": SCHEMA_VERSION,
        "config_hash": fp,
        "content_hash": content_hash(shards),
        "source": source.name,
        "records": len(records),
        "kept": sum(s["edits"] for s in summaries),
        "quarantined": len(entries),
        "quarantine_by_reason": q.count_by_code(entries),
        "quarantine_files": {"parquet": q.QUARANTINE_PARQUET, "jsonl": q.QUARANTINE_JSONL},
        "rows": sum(rows_by_env.values()),
        "rows_by_env": dict(sorted(rows_by_env.items())),
        "edits_by_split": dict(sorted(edits_by_split.items())),
        # kept edits that have each environment: with data.partial_records, a metric is scored on fewer edits
        "edits_by_env": dict(sorted(edits_by_env.items())),
        "partial_records": bool(data.partial_records),
        "reader_notes": dict(sorted(getattr(source, "notes", {}).items())),
        "rows_per_shard": data.rows_per_shard,
        "stored_image_size": data.stored_image_size,
        "shards": shards,
    }


def content_hash(shards: Sequence[dict]) -> str:
    """sha256 of what the shards hold, whatever the inputs were: each shard's file name, rows and sha256, in
    order. Two builds with equal content hashes have byte-identical shard files (the `config_hash`, by
    contrast, fingerprints the inputs: a source read another way gets another one)."""
    payload = [[s["file"], s["rows"], s["sha256"]] for s in shards]
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- Ray task side


def build_shard_batch(
    batch: dict, *, shards_dir: str, roots: dict, limits: ImageLimits, max_chars: int, source: str, blob_dir: str = ""
) -> dict:
    """Ray Data batch function: build and write the shard(s) in `batch`; return one JSON summary each."""
    out = []
    for shard, payload in zip(batch["shard"], batch["records"]):
        summary = build_one_shard(
            int(shard), json.loads(str(payload)), shards_dir, roots, limits, max_chars, source, blob_dir=blob_dir
        )
        out.append(json.dumps(summary))
    return {"summary": out}


def record_fetcher(raw: dict, roots: dict, limits: ImageLimits, blob_dir: str = "", cache: dict | None = None) -> Fetch:
    """The image loader of one raw record: its embedded images from the blob store (`pipeline.data.blobs`),
    the others from files under `roots` (`image_root`, `rephrase_image_root`, `locality_image_root`); both
    through the checks of `pipeline.data.images`. `cache` (shared by the records of a shard) keeps each
    image's stored form or refusal."""
    cache = {} if cache is None else cache

    def fetch(path: str, kind: str) -> StoredImage:
        ref = blob_ref(raw, kind, path)
        key = ("blob", str(ref.get("sha256")), path) if ref is not None else (KIND_ROOT[kind], path, "")
        if key not in cache:
            try:
                if ref is not None:
                    cache[key] = load_blob(blob_dir, ref, path, limits)
                else:
                    cache[key] = load_image(roots[KIND_ROOT[kind]], path, limits)
            except ImageRefused as exc:
                cache[key] = exc
        value = cache[key]
        if isinstance(value, ImageRefused):
            raise value
        return value

    return fetch


def build_one_shard(
    shard: int,
    plan: list,
    shards_dir: str,
    roots: dict,
    limits: ImageLimits,
    max_chars: int,
    source: str,
    blob_dir: str = "",
) -> dict:
    """Decode the images of one planned shard, write its rows, and summarise it (with image quarantine)."""
    cache: dict[tuple[str, str, str], StoredImage | ImageRefused] = {}
    rows: list[dict] = []
    refused: list[dict] = []
    edits_by_split: Counter[str] = Counter()
    edits_by_env: Counter[str] = Counter()
    edit_indices: list[int] = []
    for index, raw in plan:
        record = EditRecord.from_raw(raw, max_chars)
        try:
            record_rows_, problems = record_rows(record, index, record_fetcher(raw, roots, limits, blob_dir, cache))
        except Exception as exc:  # a record must never kill the job: it is quarantined with what went wrong
            record_rows_, problems = [], [(q.UNEXPECTED, f"record: {type(exc).__name__}: {exc}")]
        if problems:
            refused.append(q.entry(index, raw, source, "images", problems))
            continue
        rows.extend(record_rows_)
        edits_by_split[record.split] += 1
        edits_by_env.update({r["env"] for r in record_rows_})
        edit_indices.append(index)
    name = SHARD_NAME.format(shard)
    path = os.path.join(shards_dir, name)
    size, digest = 0, ""
    if rows:
        rows.sort(key=row_sort_key)
        size = write_table(to_table(rows, ENV_SCHEMA, path), path, ENV_SCHEMA)
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
    return {
        "shard": shard,
        "file": name,
        "rows": len(rows),
        "edits": len(edit_indices),
        "first_edit_index": min(edit_indices) if edit_indices else None,
        "last_edit_index": max(edit_indices) if edit_indices else None,
        "rows_by_env": dict(Counter(r["env"] for r in rows)),
        "edits_by_split": dict(edits_by_split),
        "edits_by_env": dict(edits_by_env),
        "bytes": size,
        "sha256": digest,
        "quarantine": refused,
    }


# ---------------------------------------------------------------------------------------------- reader API


def shard_paths(shards_dir: str) -> list[str]:
    """The shard files of a complete build, in edit_index order."""
    return [os.path.join(shards_dir, s["file"]) for s in read_manifest(shards_dir)["shards"]]


def reference_path(shards_dir: str, shard_file: str) -> str:
    """Where the references of one shard live (`references/ref-<n>.parquet` beside `env-<n>.parquet`)."""
    return os.path.join(shards_dir, REFERENCES_DIR, shard_file.replace("env-", "ref-", 1))


def load_cases(shards_dir: str, split: str = "test", limit: int = 0) -> list:
    """The edits of `split` as `EditCase`s, in stream (edit_index) order, with references when stored.

    Args:
        shards_dir: a directory written by `build_shards` (its manifest must exist).
        split: test, validation or train.
        limit: at most this many edits (0 = all); shards after the limit are not read.
    """

    manifest = read_manifest(shards_dir)
    refs_complete = os.path.isfile(os.path.join(shards_dir, REFERENCES_DIR, MANIFEST))
    rows: list[dict] = []
    edits: set[str] = set()
    for shard in manifest["shards"]:
        if limit and len(edits) >= limit:
            break  # an edit never spans shards, so the remaining shards hold only later edits
        path = os.path.join(shards_dir, shard["file"])
        table = read_table(path, ENV_SCHEMA)
        shard_rows = [r for r in table.to_pylist() if r["split"] == split]
        if not shard_rows:
            continue
        if refs_complete and os.path.isfile(reference_path(shards_dir, shard["file"])):
            refs = read_table(reference_path(shards_dir, shard["file"]), REFERENCE_SCHEMA).to_pylist()
            by_key = {(r["edit_id"], r["env"], r["sample_index"]): r for r in refs}
            for r in shard_rows:
                ref = by_key.get((r["edit_id"], r["env"], r["sample_index"]))
                if ref is not None:
                    r.update({k: ref[k] for k in ("topk_ids", "topk_logprobs", "n_positions", "k")})
        for r in shard_rows:  # sorted by edit_index: once a new edit is over the limit, all later ones are
            if r["edit_id"] not in edits:
                if limit and len(edits) >= limit:
                    break
                edits.add(r["edit_id"])
            rows.append(r)
    return rows_to_cases(rows)


def rows_to_cases(rows: Sequence[dict]) -> list:
    """ENV_SCHEMA rows (optionally joined with reference columns) -> `EditCase`s ordered by edit_index.

    Images are decoded from their PNG bytes to RGB PIL images. An OUT environment gets its `references` when
    every one of its samples carries `topk_ids` (ids as int64 and log-probs as float32 tensors of shape
    (n_positions, k), as `odedit.envs.compute_references` returns them).
    """
    import torch

    cases: dict[str, EditCase] = {}
    order: dict[str, int] = {}
    for row in sorted(rows, key=row_sort_key):
        case = cases.get(row["edit_id"])
        if case is None:
            case = cases[row["edit_id"]] = EditCase(row["edit_id"])
            order[row["edit_id"]] = int(row["edit_index"])
        image = decode_png(row["image"]) if row.get("image") is not None else None
        case.samples.setdefault(row["env"], []).append(Sample(row["prompt"], row["target"], image))
        if row.get("topk_ids") is not None:
            n, k = int(row["n_positions"]), int(row["k"])
            ref = Reference(
                torch.tensor(row["topk_ids"], dtype=torch.long).view(n, k),
                torch.tensor(row["topk_logprobs"], dtype=torch.float32).view(n, k),
            )
            case.references.setdefault(row["env"], []).append(ref)
    for case in cases.values():
        for env in list(case.references):
            if len(case.references[env]) != len(case.samples.get(env, [])):
                del case.references[env]  # partial references are not references
    return [cases[e] for e in sorted(cases, key=order.__getitem__)]

"""The declared pyarrow schemas of everything `pipeline.data.shards` writes, checked on write and on read.

    ENV_SCHEMA         one row per environment sample (IN, SE-text, SE-image, OUT-text, OUT-mm, OUT-hard)
    REFERENCE_SCHEMA   one row per OUT sample: the unedited model's top-K at each answer position
    QUARANTINE_SCHEMA  one row per refused record, with every reason

Edit-level columns (`edit_id`, `edit_index`, `split`, `task`, `source`, `pred`, `extra`) repeat on every row of
an edit, so one shard row is self-contained. `edit_index` is the record's position in its source file (the
stream order; gaps are quarantined records). Rows sort by (edit_index, env in `ENVIRONMENTS` order,
sample_index). `extra` is reader-specific data (VLKEB portability, MMKE-Bench fields) as a JSON object text.

A file whose schema differs in any column (name, order, type or nullability) is an error naming the file and
the column: a shard is never half-understood. `SCHEMA_VERSION` is stored in each file's metadata and in the
manifest; bump it whenever a schema here changes.
"""

from __future__ import annotations

import os
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1
META_KIND = b"odedit.schema"
META_VERSION = b"odedit.schema_version"


def _schema(kind: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={META_KIND: kind.encode(), META_VERSION: str(SCHEMA_VERSION).encode()})


ENV_SCHEMA = _schema(
    "env",
    [
        pa.field("edit_id", pa.string(), nullable=False),
        pa.field("edit_index", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("env", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("target", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=True),  # PNG bytes; null for text-only samples
        pa.field("image_width", pa.int32(), nullable=True),
        pa.field("image_height", pa.int32(), nullable=True),
        pa.field("image_path", pa.string(), nullable=True),  # the record's relative path (provenance)
        pa.field("pred", pa.string(), nullable=True),  # EasyEdit's pre-edit prediction, when given
        pa.field("extra", pa.string(), nullable=False),  # JSON object text
    ],
)

REFERENCE_SCHEMA = _schema(
    "reference",
    [
        pa.field("edit_id", pa.string(), nullable=False),
        pa.field("edit_index", pa.int64(), nullable=False),
        pa.field("env", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),  # n_positions * k, row-major
        pa.field("topk_logprobs", pa.list_(pa.float32()), nullable=False),  # same layout
        pa.field("n_positions", pa.int32(), nullable=False),
        pa.field("k", pa.int32(), nullable=False),
    ],
)

QUARANTINE_SCHEMA = _schema(
    "quarantine",
    [
        pa.field("record_index", pa.int64(), nullable=False),
        pa.field("id", pa.string(), nullable=True),
        pa.field("source", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # validate | images
        pa.field("codes", pa.list_(pa.string()), nullable=False),
        pa.field("reasons", pa.list_(pa.string()), nullable=False),
        pa.field("record_json", pa.string(), nullable=False),  # the raw record, ASCII-escaped JSON
    ],
)

SCHEMAS = {"env": ENV_SCHEMA, "reference": REFERENCE_SCHEMA, "quarantine": QUARANTINE_SCHEMA}


class SchemaMismatch(ValueError):
    """A table or file whose columns differ from the declared schema."""


def schema_problem(actual: pa.Schema, expected: pa.Schema) -> str | None:
    """The first difference between two schemas, naming the column, or None when they match."""
    names = actual.names
    for i, field in enumerate(expected):
        if field.name not in names:
            return f"column {field.name!r} is missing"
        j = names.index(field.name)
        got = actual.field(j)
        if j != i:
            return f"column {field.name!r} is at position {j}, expected {i}"
        if not got.type.equals(field.type):
            return f"column {field.name!r} has type {got.type}, expected {field.type}"
        if got.nullable != field.nullable:
            return (
                f"column {field.name!r} is {'nullable' if got.nullable else 'non-nullable'}, expected "
                f"{'nullable' if field.nullable else 'non-nullable'}"
            )
    extra = [n for n in names if n not in expected.names]
    if extra:
        return f"column {extra[0]!r} is not part of the schema"
    return None


def check_table(table: pa.Table, expected: pa.Schema, where: str) -> None:
    """Raise `SchemaMismatch` naming `where` and the column when `table` does not match `expected`
    (including nulls in a non-nullable column, which Arrow itself lets through)."""
    problem = schema_problem(table.schema, expected)
    if problem is None:
        for field in expected:
            if not field.nullable and table.column(field.name).null_count:
                problem = (
                    f"column {field.name!r} is non-nullable but has {table.column(field.name).null_count} null value(s)"
                )
                break
    if problem:
        raise SchemaMismatch(f"{where}: {problem} ({_kind(expected)} schema v{SCHEMA_VERSION})")


def to_table(rows: list[dict[str, Any]], expected: pa.Schema, where: str) -> pa.Table:
    """Rows -> a table of exactly `expected` (a missing, extra or mistyped value is an error naming it)."""
    unknown = sorted({k for r in rows for k in r} - set(expected.names))
    if unknown:
        raise SchemaMismatch(f"{where}: column {unknown[0]!r} is not part of the {_kind(expected)} schema")
    try:
        table = pa.Table.from_pylist(rows, schema=expected)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SchemaMismatch(f"{where}: rows do not fit the {_kind(expected)} schema ({exc})") from None
    check_table(table, expected, where)
    return table


def write_table(table: pa.Table, path: str, expected: pa.Schema) -> int:
    """Check `table` against `expected` and write it to `path` atomically; return the file size."""
    import pyarrow.parquet as pq

    check_table(table, expected, path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    pq.write_table(table.replace_schema_metadata(expected.metadata), tmp, compression="zstd")
    os.replace(tmp, path)
    return os.path.getsize(path)


def read_table(path: str, expected: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Read a parquet file written by `write_table`, checking its schema (and version) first.

    Raises:
        SchemaMismatch: naming the file and the first differing column, or a version mismatch.
        FileNotFoundError: when the file is missing.
    """
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; rebuild the shards (python -m jobs.prepare --config ...)")
    schema = pq.read_schema(path)
    problem = schema_problem(schema, expected)
    if problem:
        raise SchemaMismatch(
            f"{path}: {problem} ({_kind(expected)} schema v{SCHEMA_VERSION}); rebuild the "
            "shards with python -m jobs.prepare"
        )
    version = (schema.metadata or {}).get(META_VERSION)
    if version != str(SCHEMA_VERSION).encode():
        raise SchemaMismatch(
            f"{path}: written with schema version {version!r}, this code reads "
            f"v{SCHEMA_VERSION}; rebuild the shards with python -m jobs.prepare"
        )
    return pq.read_table(path, columns=columns)


def _kind(schema: pa.Schema) -> str:
    return (schema.metadata or {}).get(META_KIND, b"?").decode()

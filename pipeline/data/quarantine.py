"""Quarantine: refused records, every reason kept, counted by a short code, written beside the shards.

A quarantine row keeps the raw record (ASCII-escaped JSON, so even undecodable text survives), its position
in the source file, its id when it has one, the stage that refused it (`validate`: the record's own fields,
duplicate ids and contents, fields a metric needs and target words the tokenizer knows, on the driver;
`images`: files, in the Ray Data tasks) and every reason as "field: problem".
Each reason also gets a code (`missing_field`, `empty_text`, `image_missing`, ...) so the manifest can count
them without parsing prose.

Files: `quarantine.parquet` (QUARANTINE_SCHEMA) and `quarantine.jsonl` (the same rows, one JSON per line, for
grep and eyes), both sorted by record_index.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from odedit.records import IMAGE_FIELDS
from pipeline.data.schema import QUARANTINE_SCHEMA, to_table, write_table

QUARANTINE_PARQUET = "quarantine.parquet"
QUARANTINE_JSONL = "quarantine.jsonl"

DUPLICATE_ID = "duplicate_id"
DUPLICATE = "duplicate"  # same content as an earlier record, whatever the ids (pipeline.data.duplicates)
MISSING_FIELD = "missing_field"  # also: a field a metric or odedit.environments needs (issue 19 item 14)
UNKNOWN_TOKENS = "target_unknown_tokens"  # target words the model's tokenizer makes <unk> (issue 19 item 18)
READER = "reader_problem"
UNEXPECTED = "unexpected_error"  # an exception while building a record's rows (reported, never fatal)
# Readers put problems only they can see (a malformed portability list, an unparsable JSON Lines line) under
# this key of a raw record; the builder adds them to the record's validation reasons.
READER_PROBLEMS_KEY = "_reader_problems"

# How a reason from odedit.records.validate_record maps to a code: the first rule whose text occurs in the
# message wins. Image-path fields use their own table (their messages say "is empty" about a path).
_TEXT_RULES = (
    ("not valid UTF-8", "not_utf8"),
    ("U+FFFD", "not_utf8"),
    ("characters long", "text_too_long"),
    ("missing", MISSING_FIELD),
    ("is empty", "empty_text"),
    ("must be", "wrong_type"),
)
_PATH_RULES = (
    ("absolute", "image_path_absolute"),
    ("'..'", "image_path_escapes_root"),
    ("missing", "missing_field"),
)


def classify(reason: str) -> str:
    """The code of one validation reason ("target: is empty" -> "empty_text"); "invalid" when unknown."""
    field, _, message = reason.partition(": ")
    base = field.split("[", 1)[0]
    rules = _PATH_RULES if base in IMAGE_FIELDS or base == "hard_images" else _TEXT_RULES
    for text, code in rules:
        if text in message:
            return code
    return "image_path_invalid" if rules is _PATH_RULES else "invalid"


def safe_text(value: Any) -> str:
    """`value` as text that UTF-8 can always encode (lone surrogates from undecodable bytes are escaped)."""
    text = value if isinstance(value, str) else str(value)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def entry(record_index: int, raw: Any, source: str, stage: str, problems: Sequence[tuple[str, str]]) -> dict:
    """One quarantine row; `problems` are (code, reason) pairs, all of them kept."""
    rid = raw.get("id") if isinstance(raw, dict) else None
    return {
        "record_index": int(record_index),
        "id": None if rid is None else safe_text(rid),
        "source": source,
        "stage": stage,
        "codes": [code for code, _ in problems],
        "reasons": [safe_text(reason) for _, reason in problems],
        "record_json": json.dumps(raw, ensure_ascii=True, sort_keys=True, default=str),
    }


def count_by_code(entries: Iterable[dict]) -> dict[str, int]:
    """Records per code (a record with two reasons of one code counts once for it), sorted by code."""
    counts: Counter[str] = Counter()
    for e in entries:
        counts.update(set(e["codes"]))
    return dict(sorted(counts.items()))


def write_quarantine(entries: Sequence[dict], out_dir: str) -> dict[str, str]:
    """Write the quarantine files (even when empty, so "no quarantine" is visible); return their paths."""
    rows = sorted(entries, key=lambda e: e["record_index"])
    parquet = os.path.join(out_dir, QUARANTINE_PARQUET)
    write_table(to_table(rows, QUARANTINE_SCHEMA, parquet), parquet, QUARANTINE_SCHEMA)
    jsonl = os.path.join(out_dir, QUARANTINE_JSONL)
    tmp = f"{jsonl}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=True) + "\n")
    os.replace(tmp, jsonl)
    return {"parquet": parquet, "jsonl": jsonl}

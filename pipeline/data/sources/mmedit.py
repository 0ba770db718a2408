"""Reader of MMEdit's E-VQA and E-IC files, exactly as EasyEdit ships them (reference.md §1.3).

    data.source=mmedit data.path=editing-data/vqa/vqa_eval.json data.image_root=images \
        data.rephrase_image_root=images            # EasyEdit's coco_image / rephrase_image

Each file is one JSON list; each element has EasyEdit's field names, which pass through unchanged (the record
schema in `odedit.records` reads `src` as `prompt` and `alt` as `target`):

    src, pred, alt, rephrase, image, image_rephrase, loc, loc_ans, m_loc, m_loc_q, m_loc_a

Added when absent: `id` (`mmedit-<task>-<position>`, position in the file, zero-padded), `task` (`data.task`;
auto = `caption` for E-IC records, else `vqa`: `detect_task`), `split` (`data.split`) and `source`. Keys the
record schema does not know go to `extra` (nothing is dropped). Image roots: `image` and `hard_images` under
`data.image_root`, `image_rephrase` under `data.rephrase_image_root`, `m_loc` under `data.locality_image_root`
(as EasyEdit, both default to the edit-image root; an empty `data.image_root` means the records file's
directory).

A file that is not valid JSON (truncated download, wrong file) is a whole-file problem: `RecordFileError`
names the file, the position and the fix. Records with problems are passed on as they are, to be quarantined
by `pipeline.data.shards` with their reasons. Bytes that are not UTF-8 survive as lone surrogates (Python's
`surrogateescape`), so only the records containing them are refused ("not valid UTF-8"). The `datasets`
JSON loader is deliberately not used: one undecodable byte anywhere makes it fail the whole file
(`DatasetGenerationError`), which would turn a record problem into a job failure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from odedit.records import ALIASES, EditRecord
from pipeline.data.quarantine import READER_PROBLEMS_KEY
from pipeline.data.sources import SOURCES
from pipeline.data.sources.base import RecordSource

RECORD_KEYS = frozenset(EditRecord.__dataclass_fields__) | frozenset(ALIASES)


class RecordFileError(ValueError):
    """A records file that cannot be read at all (missing, not JSON, not a list of records)."""


def read_json_records(path: str, config_key: str = "data.path") -> list[Any]:
    """The elements of a JSON list file (or the lines of a `.jsonl` file), undecodable bytes kept escaped.

    A `.jsonl` line that is not JSON becomes a record carrying a reader problem (it is quarantined, the other
    lines are read). For a `.json` file any syntax error is a whole-file `RecordFileError`.
    """
    if not path:
        raise RecordFileError(
            f"{config_key} is empty; set it to the records JSON file (e.g. editing-data/vqa/vqa_eval.json)"
        )
    if not os.path.isfile(path):
        raise RecordFileError(
            f"{config_key}: {path!r} does not exist (working directory {os.getcwd()!r}); give the records file's path"
        )
    with open(path, "rb") as fh:
        raw = fh.read()
    text = raw.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    if path.endswith(".jsonl"):
        return [_jsonl_line(line, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # An error at the very end, or a string that never closes, means the file stops mid-record.
        ends_early = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        hint = (
            "the file ends early: it looks truncated, re-download or re-export it"
            if ends_early
            else "fix the JSON there or re-export the file"
        )
        raise RecordFileError(
            f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}); {hint}"
        ) from None
    if not isinstance(data, list):
        raise RecordFileError(
            f"{path}: expected a JSON list of records (EasyEdit's format), got a JSON "
            f"{type(data).__name__}; point {config_key} at the records list"
        )
    return data


def _jsonl_line(line: str, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        return {READER_PROBLEMS_KEY: [f"record: line {number} is not valid JSON ({exc.msg})"], "line": line[:200]}


def to_record(
    raw: Any,
    position: int,
    *,
    id_prefix: str,
    task: str,
    split: str,
    source: str,
    convert_extra: Callable[[dict, dict, list[str]], None] | None = None,
) -> Any:
    """One EasyEdit-style element -> a raw record of our schema (still unvalidated).

    Known fields pass through unchanged; unknown ones go to `extra`; `id`, `task`, `split` and `source` are
    filled in when absent. `convert_extra(raw, extra, problems)` lets a reader reshape its own fields. A
    non-object element is returned as it is, to be quarantined downstream.
    """
    if not isinstance(raw, dict):
        return raw
    record: dict[str, Any] = {}
    extra: dict[str, Any] = dict(raw["extra"]) if isinstance(raw.get("extra"), dict) else {}
    for key, value in raw.items():
        if key in RECORD_KEYS and key != "extra":
            record[key] = value
        elif key != "extra":
            extra[key] = value
    if "extra" in raw and not isinstance(raw["extra"], dict):
        record["extra"] = raw["extra"]  # left for validate_record to refuse
    problems: list[str] = list(raw.get(READER_PROBLEMS_KEY) or [])
    extra.pop(READER_PROBLEMS_KEY, None)
    if convert_extra is not None:
        convert_extra(raw, extra, problems)
    record.setdefault("id", f"{id_prefix}-{position:05d}")
    record.setdefault("task", task)
    record.setdefault("split", split)
    record.setdefault("source", source)
    if "extra" not in record:
        record["extra"] = extra
    if problems:
        record[READER_PROBLEMS_KEY] = problems
    return record


def detect_task(items: list[Any]) -> str:
    """`caption` when `items` are E-IC records, else `vqa` (issue 19 item 19: the file's name decides nothing).

    [INFERENCE] EasyEdit's E-VQA and E-IC loaders read the very same keys (reference.md §1.3), so the keys
    alone cannot tell the two apart; their prompts can: E-VQA's `src` is a question ("What ... ?"), E-IC's a
    caption prompt ("a photo of"). A file is E-IC when most of its records that name no `task` of their own
    have a text prompt (`src`, or our `prompt`) that is not a question. A record's own `task` always wins.
    """
    prompts = [
        r.get("prompt", r.get("src"))
        for r in items
        if isinstance(r, dict) and "task" not in r and isinstance(r.get("prompt", r.get("src")), str)
    ]
    questions = sum(1 for p in prompts if p.rstrip().endswith("?"))
    return "caption" if prompts and 2 * questions < len(prompts) else "vqa"


def resolve_task(task: str, items: list[Any]) -> str:
    """`data.task`, with auto = `detect_task(items)`."""
    return detect_task(items) if task == "auto" else task


def image_roots(cfg: Any) -> dict[str, str]:
    """Absolute image roots from the config (empty edit root = the records file's directory)."""
    data = cfg.data
    root = data.image_root or os.path.dirname(os.path.abspath(data.path))
    return {
        "image_root": os.path.abspath(root),
        "rephrase_image_root": os.path.abspath(data.rephrase_image_root or root),
        "locality_image_root": os.path.abspath(data.locality_image_root or root),
    }


def read_easyedit_file(
    cfg: Any,
    name: str,
    task: str | None,
    convert_extra: Callable[[dict, dict, list[str]], None] | None = None,
) -> RecordSource:
    """Read `cfg.data.path` as an EasyEdit-style list into a `RecordSource` named `name` (`task` None: from
    `data.task` and the records, `resolve_task`)."""
    items = read_json_records(cfg.data.path)
    task = task or resolve_task(cfg.data.task, items)
    records = [
        to_record(
            raw,
            i,
            id_prefix=f"{name}-{task}",
            task=task,
            split=cfg.data.split,
            source=name,
            convert_extra=convert_extra,
        )
        for i, raw in enumerate(items)
    ]
    return RecordSource(records=records, name=name, **image_roots(cfg))


def read(cfg: Any) -> RecordSource:
    """E-VQA / E-IC records of `cfg.data.path` (see the module docstring)."""
    return read_easyedit_file(cfg, "mmedit", None)


read.reads_before_ray = True  # a JSON file read on the driver: pipeline.prepare.preflight reads it first
SOURCES.register("mmedit", read)

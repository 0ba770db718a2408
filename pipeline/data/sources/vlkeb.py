"""Reader of VLKEB (github.com/VLKEB/VLKEB) records: MMEdit's keys plus multi-hop portability.

    data.source=vlkeb data.path=VLKEB/eval_multihop.json data.image_root=VLKEB/VLKEB_images

VLKEB's `train.json`, `eval.json`, `eval_multihop.json` and `eval_edit_onehop.json` are JSON lists with
EasyEdit's MMEdit keys (src, pred, alt, rephrase, image, image_rephrase, loc, loc_ans, m_loc, m_loc_q, m_loc_a),
read exactly as `pipeline.data.sources.mmedit` reads them; VLKEB's own loader resolves `image`, `image_rephrase` and
`m_loc` against its image folder (`VLKEB_images/<entity id>/<file>`), so one `data.image_root` is enough.

Portability (the multi-hop files): `port_new` is a list of `{"port_type": "1-hop", "Q&A": {"Question": ...,
"Answer": ...}}`. It becomes `extra["portability"]`, a list of `{"hop": 1, "question": ..., "answer": ...}` in
file order (VLKEB's loader keeps the first question of the requested hop). Portability is not scored, so an
entry whose question and answer are fine but whose `port_type` is missing or not `<n>-hop` does not cost the
edit (issue 19 item 15): it is left out of `extra["portability"]`, kept as it is under
`extra["portability_skipped"]`, and counted (`RecordSource.notes["portability_skipped"]`, in the shards
manifest's `reader_notes`). Any other malformed `port_new` is kept as it is in `extra` and the record is
quarantined with the reason. Ids: `vlkeb-vqa-<position>` when absent.
"""

from __future__ import annotations

from typing import Any

from pipeline.data.sources import SOURCES
from pipeline.data.sources.base import RecordSource
from pipeline.data.sources.mmedit import read_easyedit_file


def portability_from_port_new(raw: dict, extra: dict, problems: list[str]) -> None:
    """Move VLKEB/MMKE-Bench `port_new` into `extra["portability"]`; note problems instead of dropping."""
    if "port_new" not in raw:
        return
    items = raw["port_new"]
    converted: list[dict[str, Any]] = []
    skipped: list[Any] = []
    if not isinstance(items, list):
        problems.append(f"port_new: must be a list of portability questions, got {type(items).__name__}")
        return
    for i, item in enumerate(items):
        qa = item.get("Q&A") if isinstance(item, dict) else None
        hop = _hop(item.get("port_type")) if isinstance(item, dict) else None
        qa_ok = isinstance(qa, dict) and isinstance(qa.get("Question"), str) and isinstance(qa.get("Answer"), str)
        if qa_ok and hop is None:  # an unknown hop: skip this (unscored) question, keep the edit
            skipped.append(item)
            continue
        if not qa_ok:
            problems.append(
                f"port_new[{i}]: expected {{'port_type': '<n>-hop', 'Q&A': {{'Question': str, "
                f"'Answer': str}}}}, got {_short(item)}"
            )
            return
        converted.append({"hop": hop, "question": qa["Question"], "answer": qa["Answer"]})
    extra.pop("port_new", None)
    extra["portability"] = converted
    if skipped:
        extra[SKIPPED_KEY] = skipped


SKIPPED_KEY = "portability_skipped"


def count_skipped(source: RecordSource) -> RecordSource:
    """Count the portability entries the records' conversion skipped into `source.notes` (none: no note)."""
    n = sum(
        len(r["extra"].get(SKIPPED_KEY) or [])
        for r in source.records
        if isinstance(r, dict) and isinstance(r.get("extra"), dict)
    )
    if n:
        source.notes[SKIPPED_KEY] = n
    return source


def _hop(port_type: Any) -> int | None:
    if not isinstance(port_type, str) or not port_type.endswith("-hop"):
        return None
    head = port_type[: -len("-hop")]
    return int(head) if head.isdigit() else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def read(cfg: Any) -> RecordSource:
    """VLKEB records of `cfg.data.path` (see the module docstring)."""
    task = cfg.data.task if cfg.data.task != "auto" else "vqa"
    return count_skipped(read_easyedit_file(cfg, "vlkeb", task, convert_extra=portability_from_port_new))


read.reads_before_ray = True  # a JSON file read on the driver: pipeline.prepare.preflight reads it first
SOURCES.register("vlkeb", read)

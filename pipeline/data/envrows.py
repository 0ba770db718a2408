"""Environment rows of one edit record: the pure row builder the shard tasks run (no Ray, no files).

Which environments a record has is decided in exactly one place, `odedit.envs.case_from_record`; this
module runs it with an image loader that returns stored images instead of PIL images and flattens the
resulting `EditCase` into `ENV_SCHEMA` rows. So the shards and the in-memory path agree by construction:

    IN        always                                  (image, prompt) -> target
    SE-text   when `rephrase` is given                (image, rephrase) -> target
    SE-image  when `image_rephrase` is given          (image_rephrase, prompt) -> target
    OUT-text  when `loc` and `loc_ans` are given      (no image, loc) -> loc_ans
    OUT-mm    when `m_loc`, `m_loc_q`, `m_loc_a` are  (m_loc, m_loc_q) -> m_loc_a
    OUT-hard  one row per `hard_images[i]`            (hard image, prompt) -> hard_answers[i]

An image that cannot be used makes the whole record a quarantine case (every image problem is reported,
not only the first), so an edit never reaches the shards with some environments silently missing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from odedit.envs import ENVIRONMENTS, case_from_record
from odedit.records import EditRecord
from pipeline.data.images import ImageRefused, StoredImage

ENV_ORDER = {env: i for i, env in enumerate(ENVIRONMENTS)}
KIND_FIELD = {"edit": "image", "rephrase": "image_rephrase", "locality": "m_loc"}

Fetch = Callable[[str, str], StoredImage]  # (relative path, kind: edit | rephrase | locality) -> image


@dataclass(frozen=True)
class _Loaded:
    path: str
    image: StoredImage


def planned_rows(record: EditRecord) -> int:
    """How many rows `record` will give if all its images load (used to size shards before decoding)."""
    case = case_from_record(record, lambda path, kind: None)
    return sum(len(samples) for samples in case.samples.values())


def image_requests(record: EditRecord) -> list[tuple[str, str]]:
    """The (relative path, kind) pairs `record` needs, in the order `case_from_record` asks for them."""
    asked: list[tuple[str, str]] = []

    def note(path: str | None, kind: str) -> None:
        if path is not None:
            asked.append((path, kind))

    case_from_record(record, note)
    return asked


def record_rows(record: EditRecord, edit_index: int, fetch: Fetch) -> tuple[list[dict], list[tuple[str, str]]]:
    """ENV_SCHEMA rows of `record`, sorted, or no rows and every (code, reason) that refused it."""
    problems: list[tuple[str, str]] = []

    def load(path: str | None, kind: str) -> _Loaded | None:
        if path is None:
            return None
        try:
            return _Loaded(path, fetch(path, kind))
        except ImageRefused as exc:
            field = "hard_images" if kind == "edit" and path != record.image else KIND_FIELD[kind]
            problem = (exc.code, f"{field}: {exc}")
            if problem not in problems:
                problems.append(problem)
            return None

    case = case_from_record(record, load)
    if problems:
        return [], problems
    extra = json.dumps(record.extra, ensure_ascii=True, sort_keys=True, default=str)
    rows: list[dict[str, Any]] = []
    for env in sorted(case.samples, key=ENV_ORDER.__getitem__):
        for j, sample in enumerate(case.samples[env]):
            loaded: _Loaded | None = sample.image
            rows.append(
                {
                    "edit_id": record.id,
                    "edit_index": int(edit_index),
                    "split": record.split,
                    "task": record.task,
                    "source": record.source,
                    "env": env,
                    "sample_index": j,
                    "prompt": sample.prompt,
                    "target": sample.target,
                    "image": loaded.image.png if loaded else None,
                    "image_width": loaded.image.width if loaded else None,
                    "image_height": loaded.image.height if loaded else None,
                    "image_path": loaded.path if loaded else None,
                    "pred": record.pred,
                    "extra": extra,
                }
            )
    return rows, []


def row_sort_key(row: dict) -> tuple[int, int, int]:
    """(edit_index, environment order, sample_index): the order of rows inside every shard."""
    return int(row["edit_index"]), ENV_ORDER[row["env"]], int(row["sample_index"])

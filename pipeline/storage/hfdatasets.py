"""Hugging Face datasets written the way every stored thing is: whole or not at all.

    write_dataset(lambda: iter(rows), features, "/data/export")    # save_to_disk, replacing the folder

The dataset is built by a generator into a private cache (so memory holds one writer batch, not the dataset),
written with `save_to_disk` into a temporary sibling of the target, which then replaces the target: a reader
never sees half an export, and a smaller export never leaves a larger one's files behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import Any

WRITER_BATCH_ROWS = 100  # rows the generator's writer holds at once (their images included)


def write_dataset(rows: Callable[[], Iterator[dict]], features: Any, out_dir: str) -> dict:
    """`save_to_disk` of the dataset `rows()` generates (typed by `datasets.Features` `features`) at `out_dir`,
    replacing what was there; returns {"path": absolute out_dir}."""
    import datasets

    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    try:
        ds = datasets.Dataset.from_generator(
            _generate,
            features=features,
            cache_dir=os.path.join(work, "cache"),
            gen_kwargs={"rows": rows},
            fingerprint=uuid.uuid4().hex,  # a fresh build: never a cached dataset of another export
            writer_batch_size=WRITER_BATCH_ROWS,
        )
        staged = os.path.join(work, "dataset")
        ds.save_to_disk(staged)
        del ds
        if os.path.exists(out_dir):  # a folder cannot be renamed onto a non-empty one: move the old one aside
            os.replace(out_dir, os.path.join(work, "previous"))
        os.replace(staged, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"path": out_dir}


def _generate(rows: Callable[[], Iterator[dict]]) -> Iterator[dict]:
    yield from rows()

"""Edit cases read from environment shards on demand: the `CaseSource` an edit stream runs over.

A stream of 10,000 edits must not hold 10,000 decoded cases: the source keeps only the ordered edit ids and
which shard holds each edit, and decodes a case (images from PNG bytes, references) when the stream asks for
it. The main pass can come from a Ray Data iterator (`iter_rows`, e.g. a Ray Train dataset shard) or from
the parquet files directly; retention samples and full re-scoring fetch by index.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from odedit.envs import EditCase
from pipeline.data.schema import ENV_SCHEMA, REFERENCE_SCHEMA, read_table
from pipeline.data.shards import MANIFEST, REFERENCES_DIR, read_manifest, reference_path, rows_to_cases

_REF_COLUMNS = ("topk_ids", "topk_logprobs", "n_positions", "k")


class ShardCaseSource:
    """The edits of one split of a shards directory, in stream order.

    Args:
        shards_dir: written by `pipeline.data.shards.build_shards` (+ references).
        split: test, validation or train.
        limit: at most this many edits (0 = all).
        offset: skip this many edits of the split first (e.g. a validation slice after a search slice).
        rows: optional factory of a row iterator for the main pass (a Ray Data dataset shard's `iter_rows`);
            rows must arrive in (edit_index, env, sample_index) order.
    """

    def __init__(
        self,
        shards_dir: str,
        split: str = "test",
        limit: int = 0,
        offset: int = 0,
        rows: Callable[[], Iterable[dict]] | None = None,
        cache_shards: int = 2,
    ) -> None:
        self.shards_dir = shards_dir
        self.split = split
        self.manifest = read_manifest(shards_dir)
        self.refs = os.path.isfile(os.path.join(shards_dir, REFERENCES_DIR, MANIFEST))
        self._rows = rows
        self._early: tuple[Iterator[dict], threading.Thread, dict[str, Any]] | None = None  # `prefetch`
        self._cache: OrderedDict[str, list[dict]] = OrderedDict()
        self._cache_size = cache_shards
        ids: list[str] = []
        where: list[str] = []
        for shard in self.manifest["shards"]:
            table = read_table(os.path.join(shards_dir, shard["file"]), ENV_SCHEMA, columns=["edit_id", "split"])
            seen = set()
            for eid, sp in zip(table.column("edit_id").to_pylist(), table.column("split").to_pylist()):
                if sp == split and eid not in seen:
                    seen.add(eid)
                    ids.append(eid)
                    where.append(shard["file"])
        ids, where = ids[offset:], where[offset:]
        if limit:
            ids, where = ids[:limit], where[:limit]
        self._ids = ids
        self._where = where
        self._index = {e: i for i, e in enumerate(ids)}

    def ids(self) -> list[str]:
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def _shard_rows(self, file: str) -> list[dict]:
        if file in self._cache:
            self._cache.move_to_end(file)
            return self._cache[file]
        rows = [
            r
            for r in read_table(os.path.join(self.shards_dir, file), ENV_SCHEMA).to_pylist()
            if r["split"] == self.split
        ]
        if self.refs and os.path.isfile(reference_path(self.shards_dir, file)):
            refs = read_table(reference_path(self.shards_dir, file), REFERENCE_SCHEMA).to_pylist()
            attach_references(rows, refs)
        self._cache[file] = rows
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return rows

    def fetch(self, indices: Sequence[int]) -> list[EditCase]:
        """The cases at these stream positions, in the order asked."""
        wanted: dict[str, set[str]] = {}
        for i in indices:
            wanted.setdefault(self._where[i], set()).add(self._ids[i])
        by_id: dict[str, EditCase] = {}
        for file, eids in wanted.items():
            rows = [r for r in self._shard_rows(file) if r["edit_id"] in eids]
            by_id.update({c.edit_id: c for c in rows_to_cases(rows)})
        return [by_id[self._ids[i]] for i in indices]

    def prefetch(self) -> None:
        """Start the main pass's row iterator now, in the background, and wait for nothing.

        A Ray Data pipeline spends seconds starting its actor processes before its first row; started here
        (before the stream scores every edit pre-edit), that start-up overlaps the pre-edit scoring instead of
        the first edit steps, which it would slow down on a machine with few CPUs. Without a row iterator, or
        when already started, it does nothing.
        """
        if self._rows is None or self._early is not None:
            return
        it = iter(self._rows())
        box: dict[str, Any] = {}

        def first() -> None:
            try:
                box["row"] = next(it)
            except StopIteration:
                box["end"] = True
            except BaseException as exc:  # re-raised in the stream's thread by `_main_rows`
                box["error"] = exc

        thread = threading.Thread(target=first, name="case-source-prefetch", daemon=True)
        thread.start()
        self._early = (it, thread, box)

    def _main_rows(self) -> Iterator[dict]:
        assert self._rows is not None
        if self._early is None:
            yield from self._rows()
            return
        it, thread, box = self._early
        self._early = None
        thread.join()
        if "error" in box:
            raise box["error"]
        if "end" not in box:
            yield box["row"]
            yield from it

    def iter_from(self, start: int) -> Iterator[EditCase]:
        """Cases from stream position `start` on, decoded one edit at a time."""
        if self._rows is None:
            for i in range(start, len(self._ids)):
                yield self.fetch([i])[0]
            return
        wanted = set(self._ids[start:])
        pending: list[dict] = []
        current = None
        for row in self._main_rows():
            if row["split"] != self.split or row["edit_id"] not in wanted:
                continue
            if current is not None and row["edit_id"] != current:
                yield rows_to_cases(pending)[0]
                pending = []
            current = row["edit_id"]
            pending.append(dict(row))
        if pending:
            yield rows_to_cases(pending)[0]


def attach_references(rows: list[dict], refs: Iterable[dict]) -> None:
    """Join reference columns onto environment rows by (edit_id, env, sample_index), in place."""
    by_key = {(r["edit_id"], r["env"], r["sample_index"]): r for r in refs}
    for r in rows:
        ref = by_key.get((r["edit_id"], r["env"], r["sample_index"]))
        if ref is not None:
            r.update({k: ref[k] for k in _REF_COLUMNS})


def reference_rows(shards_dir: str) -> Any:
    """All reference rows of a shards directory as one pyarrow table (for a Ray Data join)."""
    import pyarrow as pa

    tables = [
        read_table(reference_path(shards_dir, s["file"]), REFERENCE_SCHEMA)
        for s in read_manifest(shards_dir)["shards"]
        if os.path.isfile(reference_path(shards_dir, s["file"]))
    ]
    return pa.concat_tables(tables) if tables else None

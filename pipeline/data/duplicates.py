"""Records that repeat an earlier record by content, whatever their ids (issue 19 item 13).

    finder = DuplicateFinder(roots={"image_root": ..., ...}, blob_dir="")
    earlier = finder.earlier(raw)     # position of an earlier identical record, or None
    finder.add(position, raw)         # remember a kept record

EasyEdit's files carry no ids, so a reader makes them from positions (`mmedit-vqa-00017`) and an id check never
sees a record that was pasted twice. Two records are the same edit when every field that defines the edit is
equal (`odedit.records.EDIT_FIELDS`: the task, prompt, target, text rephrase, both localities' texts and the
OUT-hard answers; text with its runs of white space collapsed, case kept) and every image they name has the
same content: an embedded image by its sha256 (`pipeline.data.blobs`), a file by the sha256 of its bytes.

[INFERENCE] Files are hashed only for records whose text already matches an earlier record's, so the driver
reads no image in the common case (no text repeats) and a few where one does; an image file that cannot be read
is identified by its kind and normalised path (it is refused later, at the image stage, anyway). `id`, `pred`,
`split`, `source` and `extra` are not compared (why: `odedit.records.EDIT_FIELDS`).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Mapping
from typing import Any

from odedit.records import EDIT_FIELDS, normalize
from pipeline.data.blobs import blob_ref

# Image fields and the kind of image root each resolves against (`pipeline.data.shards.KIND_ROOT`).
IMAGE_KINDS = (("image", "edit"), ("image_rephrase", "rephrase"), ("m_loc", "locality"))
_KIND_ROOT = {"edit": "image_root", "rephrase": "rephrase_image_root", "locality": "locality_image_root"}


def _canon(value: Any) -> Any:
    """Text with its white space collapsed; lists element by element; anything else as it is."""
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    return value


def text_key(raw: Mapping[str, Any]) -> str:
    """The edit-defining text fields of `raw` (EasyEdit aliases resolved) as one canonical JSON string."""
    d = normalize(raw)
    fields = {name: _canon(d.get(name)) for name in EDIT_FIELDS}
    fields["task"] = d.get("task") or "vqa"
    images = {name: d.get(name) or None for name, _ in IMAGE_KINDS}
    hard = d.get("hard_images") or []
    # which image fields are present (not their content) is part of the text key: cheap and exact
    fields["images"] = sorted(k for k, v in images.items() if v) + (["hard_images"] * len(hard))
    return json.dumps(fields, sort_keys=True, ensure_ascii=True, default=str)


class DuplicateFinder:
    """Finds, for each record, an earlier kept record with the same content (see the module docstring).

    Args:
        roots: `image_root`, `rephrase_image_root`, `locality_image_root` of the source (absolute).
        blob_dir: the source's store of embedded images ("" = none).
    """

    def __init__(self, roots: Mapping[str, str], blob_dir: str = "") -> None:
        self.roots = dict(roots)
        self.blob_dir = blob_dir
        self._by_text: dict[str, list[tuple[int, Mapping[str, Any]]]] = {}
        self._full: dict[int, str] = {}
        self._file_hash: dict[str, str] = {}

    def earlier(self, raw: Mapping[str, Any]) -> int | None:
        """The position of the first kept record with the same content as `raw`, or None."""
        if not isinstance(raw, Mapping):
            return None
        same_text = self._by_text.get(text_key(raw))
        if not same_text:
            return None
        mine = self._image_key(raw)
        for position, other in same_text:
            if position not in self._full:
                self._full[position] = self._image_key(other)
            if self._full[position] == mine:
                return position
        return None

    def add(self, position: int, raw: Mapping[str, Any]) -> None:
        """Remember `raw` (kept, at `position`) for later records to be compared with."""
        if isinstance(raw, Mapping):
            self._by_text.setdefault(text_key(raw), []).append((position, raw))

    # ------------------------------------------------------------------------------------------ images

    def _image_key(self, raw: Mapping[str, Any]) -> str:
        d = normalize(raw)
        named = [(d.get(name), kind) for name, kind in IMAGE_KINDS]
        named += [(p, "edit") for p in d.get("hard_images") or []]
        return json.dumps([self._identity(raw, p, kind) if p else None for p, kind in named])

    def _identity(self, raw: Mapping[str, Any], path: Any, kind: str) -> str:
        if not isinstance(path, str):
            return f"value:{path!r}"
        ref = blob_ref(raw, kind, path)
        if ref is not None:
            return f"blob:{ref.get('sha256')}"
        root = os.path.realpath(self.roots.get(_KIND_ROOT[kind], "") or ".")
        full = os.path.realpath(os.path.join(root, path))
        if full not in self._file_hash:
            try:
                if os.path.commonpath([root, full]) != root:  # never read outside the root (refused later)
                    raise OSError("outside its root")
                h = hashlib.sha256()
                with open(full, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
                self._file_hash[full] = f"file:{h.hexdigest()}"
            except OSError:
                self._file_hash[full] = f"path:{kind}:{posixpath.normpath(path.replace(os.sep, '/'))}"
        return self._file_hash[full]

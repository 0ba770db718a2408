"""Embedded images (the bytes of a `datasets.Image` cell) kept by content, for the shard tasks to load.

    ref = put_blob(blob_dir, data, max_bytes)            # {"sha256": ..., "bytes": n}; file <blob_dir>/<sh>/<sha256>
    raw[BLOBS_KEY] = {"edit": {"cat.png": ref}}          # the record's `image: "cat.png"` is that blob
    stored = load_blob(blob_dir, ref, "cat.png", limits)  # the checks of pipeline.data.images, on the bytes

A reader of embedded images (`pipeline.data.sources.hf`) writes each image's bytes once, named by their sha256,
and leaves in the record only the image's *label* (the cell's path, or a name made from the hash) plus, under
`BLOBS_KEY`, which label of which kind (edit, rephrase, locality: the image roots' kinds) is which blob. So the
records the driver holds stay text (memory does not grow with the images), and the shard task that builds a
record's rows loads its images from the store through the same checks as a file under an image root:
size (`data.max_image_bytes`, from the recorded size, before reading), header pixels, `verify()`, decode.
An image over the size limit is never written: its reference keeps the size, and loading it is refused with
`image_too_large` as for a file. A blob missing or changed since it was written is refused (`image_missing`,
`image_corrupt`), never trusted.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from pipeline.data.images import CORRUPT, MISSING, ImageLimits, ImageRefused, StoredImage, check_size, load_image_bytes

BLOBS_KEY = "_image_blobs"  # raw-record key: {kind: {label: {"sha256": hex, "bytes": n}}}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def blob_path(blob_dir: str, sha256: str) -> str:
    """Where the blob of `sha256` lives (`<blob_dir>/<first two hex digits>/<sha256>`)."""
    return os.path.join(blob_dir, sha256[:2], sha256)


def put_blob(blob_dir: str, data: bytes, max_bytes: int) -> dict:
    """Keep `data` under `blob_dir` (once: an existing blob is left alone) and return its reference.

    Bytes over `max_bytes` are not written (the image will be refused by its recorded size).
    """
    data = bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    ref = {"sha256": sha, "bytes": len(data)}
    if len(data) > max_bytes:
        return ref
    path = blob_path(blob_dir, sha)
    if os.path.isfile(path) and os.path.getsize(path) == len(data):
        return ref
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)  # concurrent writers write the same bytes: the last rename wins, harmlessly
    return ref


def blob_ref(raw: Any, kind: str, label: str) -> dict | None:
    """The blob reference of image `label` of `kind` in raw record `raw`, or None (a path under a root)."""
    blobs = raw.get(BLOBS_KEY) if isinstance(raw, dict) else None
    by_label = blobs.get(kind) if isinstance(blobs, dict) else None
    ref = by_label.get(label) if isinstance(by_label, dict) else None
    return ref if isinstance(ref, dict) else None


def load_blob(blob_dir: str, ref: dict, name: str, limits: ImageLimits) -> StoredImage:
    """The stored form of the blob `ref` points at, checked as `pipeline.data.images.load_image_bytes` checks.

    Raises:
        ImageRefused: too large (by the recorded size), missing or changed blob, too many pixels, undecodable.
    """
    sha, size = ref.get("sha256"), ref.get("bytes")
    if not isinstance(sha, str) or not _SHA256.match(sha) or not isinstance(size, int):
        raise ImageRefused(CORRUPT, f"embedded image {name!r} has a malformed reference {ref!r}")
    check_size(size, name, limits)
    path = blob_path(blob_dir, sha)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        raise ImageRefused(
            MISSING,
            f"embedded image {name!r} is not in the image store {blob_dir!r} (removed after the records were "
            "read?); run the job again to re-read the dataset",
        ) from None
    if hashlib.sha256(data).hexdigest() != sha:
        raise ImageRefused(CORRUPT, f"embedded image {name!r}: its stored bytes {path!r} changed; run the job again")
    return load_image_bytes(data, name, limits)

"""pipeline.data.blobs: embedded images kept by content and loaded through the image checks."""

from __future__ import annotations

import io
import os

import pytest

from pipeline.data.blobs import BLOBS_KEY, blob_path, blob_ref, load_blob, put_blob
from pipeline.data.images import ImageLimits, ImageRefused

LIMITS = ImageLimits(max_bytes=10_000, max_pixels=64 * 64, max_side=16)


def png(size=(32, 20), colour=(10, 200, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def refused(blob_dir, ref) -> ImageRefused:
    with pytest.raises(ImageRefused) as info:
        load_blob(str(blob_dir), ref, "cat.png", LIMITS)
    return info.value


def test_a_blob_is_written_once_by_content_and_loads_shrunk(tmp_path):
    data = png()
    ref = put_blob(str(tmp_path), data, LIMITS.max_bytes)
    path = blob_path(str(tmp_path), ref["sha256"])
    assert ref["bytes"] == len(data) and open(path, "rb").read() == data
    mtime = os.stat(path).st_mtime_ns
    assert put_blob(str(tmp_path), data, LIMITS.max_bytes) == ref and os.stat(path).st_mtime_ns == mtime
    stored = load_blob(str(tmp_path), ref, "cat.png", LIMITS)
    assert (stored.width, stored.height) == (16, 10)


def test_refusals_carry_the_image_codes(tmp_path):
    big = put_blob(str(tmp_path), b"x" * 20_000, LIMITS.max_bytes)
    assert not os.path.exists(blob_path(str(tmp_path), big["sha256"]))  # over the limit: never written
    assert refused(tmp_path, big).code == "image_too_large"
    bomb = put_blob(str(tmp_path), png((100, 100)), LIMITS.max_bytes)
    assert refused(tmp_path, bomb).code == "image_too_many_pixels"
    junk = put_blob(str(tmp_path), b"\x89PNG\r\n\x1a\njunk", LIMITS.max_bytes)
    assert refused(tmp_path, junk).code == "image_corrupt"
    gone = put_blob(str(tmp_path), png((8, 8)), LIMITS.max_bytes)
    os.remove(blob_path(str(tmp_path), gone["sha256"]))
    assert refused(tmp_path, gone).code == "image_missing"
    changed = put_blob(str(tmp_path), png((9, 9)), LIMITS.max_bytes)
    with open(blob_path(str(tmp_path), changed["sha256"]), "wb") as fh:
        fh.write(png((9, 9), (1, 2, 3)))
    assert refused(tmp_path, changed).code == "image_corrupt"
    assert refused(tmp_path, {"sha256": "../../etc/passwd", "bytes": 1}).code == "image_corrupt"


def test_blob_ref_finds_a_label_of_a_kind():
    raw = {BLOBS_KEY: {"edit": {"a.png": {"sha256": "0" * 64, "bytes": 1}}}}
    assert blob_ref(raw, "edit", "a.png") == {"sha256": "0" * 64, "bytes": 1}
    assert blob_ref(raw, "rephrase", "a.png") is None and blob_ref({}, "edit", "a.png") is None

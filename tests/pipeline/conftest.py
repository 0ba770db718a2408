"""Fixtures of the pipeline tests: small record files in EasyEdit's exact format with real PNGs on disk."""

from __future__ import annotations

import json
import os
import struct
import zlib

import pytest

from bench.synthetic import COLOURS, write_png

# Two records copied in shape from MMEdit's E-VQA eval file (reference.md §1.3): every EasyEdit field, COCO
# style paths relative to `coco_image` (edit, m_loc) and `rephrase_image` (image_rephrase), no ids.
EVQA_RECORDS = [
    {
        "src": "What is the color of the bus?",
        "pred": "red",
        "rephrase": "What color is the bus in this picture?",
        "alt": "blue",
        "image": "val2014/COCO_val2014_000000016240.jpg",
        "image_rephrase": "val2014_image_rephrase/COCO_val2014_000000016240.png",
        "loc": "nq question: who played the lead role in the movie titanic",
        "loc_ans": "Leonardo DiCaprio",
        "m_loc": "val2014/COCO_val2014_000000297147.jpg",
        "m_loc_q": "What sport can you use this for?",
        "m_loc_a": "skiing",
    },
    {
        "src": "How many dogs are there?",
        "pred": "2",
        "rephrase": "What is the number of dogs shown?",
        "alt": "3",
        "image": "val2014/COCO_val2014_000000393225.jpg",
        "image_rephrase": "val2014_image_rephrase/COCO_val2014_000000393225.png",
        "loc": "nq question: when was the first iphone released",
        "loc_ans": "June 29, 2007",
        "m_loc": "val2014/COCO_val2014_000000297147.jpg",
        "m_loc_q": "What is the man holding?",
        "m_loc_a": "kite",
    },
]


def write_json(path: str, data, raw: bytes | None = None) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(raw if raw is not None else json.dumps(data, indent=1).encode("utf-8"))
    return path


def write_jpeg(path: str, w: int, h: int, seed: int) -> None:
    """A real JPEG (COCO's format) with a coloured square."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
    a[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = COLOURS["red"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(a).save(path, format="JPEG", quality=90)


def bomb_png(path: str, width: int, height: int) -> str:
    """A tiny file whose PNG header declares width x height pixels (no pixel data: decoding would fail)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="session")
def make_bomb():
    """`make_bomb(path, width, height)`: see `bomb_png`."""
    return bomb_png


@pytest.fixture
def evqa_exact(tmp_path):
    """EasyEdit's exact E-VQA layout: editing-data/vqa/vqa_eval.json, coco/ and coco_rephrase/ image roots."""
    coco, rephrase = str(tmp_path / "coco"), str(tmp_path / "coco_rephrase")
    seen = set()
    for rec in EVQA_RECORDS:
        for root, rel in ((coco, rec["image"]), (rephrase, rec["image_rephrase"]), (coco, rec["m_loc"])):
            if rel not in seen:
                seen.add(rel)
                path = os.path.join(root, rel)
                if rel.endswith(".jpg"):
                    write_jpeg(path, 320, 240, seed=len(seen))
                else:
                    write_png(path, 300, 200, COLOURS["blue"], seed=len(seen))
    path = write_json(str(tmp_path / "editing-data" / "vqa" / "vqa_eval.json"), EVQA_RECORDS)
    return {"path": path, "image_root": coco, "rephrase_image_root": rephrase, "records": EVQA_RECORDS}


def config_for(paths: dict, tmp_path, *overrides: str):
    """A Config reading `paths` with the mmedit source, shards under tmp_path."""
    from odedit.loading import load_config

    return load_config(
        None,
        [
            "data.source=mmedit",
            f"data.path={paths['path']}",
            f"data.image_root={paths['image_root']}",
            f"data.rephrase_image_root={paths.get('rephrase_image_root', '')}",
            f"output_dir={tmp_path / 'out'}",
            *overrides,
        ],
    )


@pytest.fixture
def make_config(tmp_path):
    """`make_config(paths, *overrides)`: see `config_for`."""

    def make(paths: dict, *overrides: str):
        return config_for(paths, tmp_path, *overrides)

    return make

"""pipeline.data.hf_export: the records a shard build kept, as a Hugging Face dataset with embedded images."""

from __future__ import annotations

import json
import os

import pytest

from bench.synthetic import COLOURS, write_png
from odedit.loading import load_config
from pipeline.data.hf_export import export_features, export_records, kept_records
from pipeline.data.quarantine import QUARANTINE_JSONL
from pipeline.data.sources.base import RecordSource

datasets = pytest.importorskip("datasets")


def record(i: int, **changes) -> dict:
    r = {
        "id": f"e{i}",
        "prompt": f"What colour is square {i}?",
        "target": "blue",
        "image": f"val/e{i}.png",
        "image_rephrase": f"r{i}.png",
        "hard_images": [f"val/h{i}.png"],
        "hard_answers": ["red"],
        "task": "vqa",
        "split": "test",
        "source": "mine",
        "extra": {"shape": "circle", "n": i},
    }
    r.update(changes)
    return r


@pytest.fixture
def kept_world(tmp_path):
    images, rephrases = tmp_path / "images", tmp_path / "rephrases"
    for i in range(3):
        write_png(str(images / "val" / f"e{i}.png"), 20, 10, COLOURS["red"], seed=i)
        write_png(str(images / "val" / f"h{i}.png"), 12, 12, COLOURS["green"], seed=i)
        write_png(str(rephrases / f"r{i}.png"), 16, 16, COLOURS["blue"], seed=i)
    records = [record(0), record(1, image_rephrase=None), record(2)]
    source = RecordSource(records, str(images), str(rephrases), str(images), "mine")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / QUARANTINE_JSONL).write_text(json.dumps({"record_index": 2}) + "\n")  # record 2 was refused
    cfg = load_config(None, [f"output_dir={tmp_path / 'out'}"])
    return source, cfg, str(shards)


def test_only_kept_records_are_exported_with_their_images_and_paths(kept_world, tmp_path):
    source, cfg, shards = kept_world
    assert [i for i, _ in kept_records(source, cfg, shards)] == [0, 1]
    written = export_records(source, cfg, shards, str(tmp_path / "export"))
    assert written == {"path": str(tmp_path / "export"), "rows": 2}
    ds = datasets.load_from_disk(str(tmp_path / "export"))
    assert ds.features == export_features() and ds.num_rows == 2
    first, second = ds[0], ds[1]
    assert (first["id"], first["alt"], first["source"]) == ("e0", "blue", "mine")
    assert first["src"] == "What colour is square 0?"
    assert first["image"].size == (20, 10) and first["image_path"] == "val/e0.png"
    assert first["image_rephrase"].size == (16, 16) and first["image_rephrase_path"] == "r0.png"
    assert [im.size for im in first["hard_images"]] == [(12, 12)] and first["hard_images_path"] == ["val/h0.png"]
    assert json.loads(first["extra"]) == {"n": 0, "shape": "circle"}
    assert second["image_rephrase"] is None and second["image_rephrase_path"] is None
    raw = ds.with_format("arrow")[:1].column("image").to_pylist()[0]
    assert raw["bytes"] == open(os.path.join(source.image_root, "val", "e0.png"), "rb").read()  # the file as it is


def test_a_second_export_replaces_the_first(kept_world, tmp_path):
    source, cfg, shards = kept_world
    target = str(tmp_path / "export")
    export_records(source, cfg, shards, target)
    (tmp_path / "shards" / QUARANTINE_JSONL).write_text(
        "\n".join(json.dumps({"record_index": i}) for i in (1, 2)) + "\n"
    )
    assert export_records(source, cfg, shards, target)["rows"] == 1
    assert datasets.load_from_disk(target).num_rows == 1
    assert [p for p in os.listdir(tmp_path) if p.startswith(".export")] == []  # no temporary folder left

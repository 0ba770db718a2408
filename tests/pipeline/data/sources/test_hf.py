"""pipeline.data.sources.hf: Hugging Face datasets built here (image features as bytes and as paths), saved and
read back through the source into shards; the demo world round trip (demo -> HF dataset -> hf source) gives
the same shards; bad rows and bad images are quarantined with reasons; a missing column or a wrong feature type
is a config error naming the field, the column and the mapping."""

from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from odedit.config import ConfigError
from odedit.loading import load_config
from pipeline.data.shards import build_shards, load_cases, read_manifest
from pipeline.data.sources import SOURCES
from pipeline.data.sources.base import check_source
from pipeline.data.sources.hf import check_config, column_plan

datasets = pytest.importorskip("datasets")


def png(colour, size=(24, 18)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def noise_png(side: int) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


RED, BLUE, GREEN = png((200, 20, 20)), png((20, 20, 200)), png((20, 200, 20))

FEATURES = {
    "src": datasets.Value("string"),
    "alt": datasets.Value("string"),
    "pred": datasets.Value("string"),
    "rephrase": datasets.Value("string"),
    "image": datasets.Image(),
    "image_path": datasets.Value("string"),
    "image_rephrase": datasets.Image(),
    "loc": datasets.Value("string"),
    "loc_ans": datasets.Value("string"),
    "m_loc": datasets.Value("string"),  # a path under the image root, as EasyEdit's files have it
    "m_loc_q": datasets.Value("string"),
    "m_loc_a": datasets.Value("string"),
    "hard_images": datasets.List(datasets.Image()),
    "hard_answers": datasets.List(datasets.Value("string")),
    "extra": datasets.Value("string"),
    "difficulty": datasets.Value("int32"),  # not mapped: kept in extra
    "thumbnail": datasets.Image(),  # not mapped, an image: not kept
}


def row(i: int, **changes) -> dict:
    r = {
        "src": f"What colour is square {i}?",
        "alt": "blue",
        "pred": "red",
        "rephrase": f"Which colour has square {i}?",
        "image": {"bytes": RED, "path": f"val/e{i}.png"},
        "image_path": f"val/e{i}.png",
        "image_rephrase": {"bytes": BLUE, "path": f"r{i}.png"},
        "loc": f"nq question: fact {i}?",
        "loc_ans": f"answer {i}",
        "m_loc": "probes/p.png",
        "m_loc_q": "What colour is it?",
        "m_loc_a": "green",
        "hard_images": [{"bytes": GREEN, "path": "h.png"}],
        "hard_answers": ["red"],
        "extra": json.dumps({"question_type": "color"}),
        "difficulty": i,
        "thumbnail": {"bytes": RED, "path": "t.png"},
    }
    r.update(changes)
    return r


GOOD = [row(0), row(1), row(2, rephrase=None, image_rephrase=None), row(3, hard_images=[], hard_answers=[])]
BAD = {  # position -> (row, quarantine code, text the reason contains)
    4: (row(4, src=None), "missing_field", "prompt: missing"),
    5: (row(5, image={"bytes": b"\x89PNG\r\n\x1a\nnot a png", "path": "val/bad.png"}), "image_corrupt", "val/e5.png"),
    6: (row(6, image={"bytes": noise_png(160), "path": "big.png"}, image_path=None), "image_too_large", "big.png"),
    7: (row(7, m_loc="../outside.png"), "image_path_escapes_root", "contains '..'"),
    8: (row(8, m_loc="/etc/passwd"), "image_path_absolute", "is absolute"),
    9: (row(9, extra="{not json"), "reader_problem", "extra: column 'extra' is not JSON"),
    10: (row(10, m_loc="probes/missing.png"), "image_missing", "does not exist"),
}


def save(rows, path, features=None) -> str:
    ds = datasets.Dataset.from_list(rows, features=datasets.Features(features or FEATURES))
    ds.save_to_disk(str(path))
    return str(path)


def hf_config(image_root, path, *overrides):
    return load_config(
        None,
        [
            "data.source=hf",
            "data.partial_records=true",  # GOOD[2] has no rephrases: kept, its SE metrics counted on fewer edits
            f"data.path={path}",
            f"data.image_root={image_root}",
            "data.rows_per_shard=12",
            "data.max_image_bytes=20000",
            f"output_dir={os.path.dirname(path)}/out",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """An image root with one file (probes/p.png), and an image store of this module's own."""
    from PIL import Image

    root = tmp_path_factory.mktemp("hf")
    mp = pytest.MonkeyPatch()
    mp.setenv("ODEDIT_CACHE_DIR", str(root / "cache"))
    os.makedirs(root / "images" / "probes")
    Image.new("RGB", (16, 16), (20, 200, 20)).save(root / "images" / "probes" / "p.png")
    yield root / "images"
    mp.undo()


@pytest.fixture(scope="module")
def built(image_root, ray_local):
    """The saved dataset (good rows, then bad ones) read through the source and built into shards."""
    home = image_root.parent
    rows = GOOD + [BAD[k][0] for k in sorted(BAD)]
    cfg = hf_config(image_root, save(rows, home / "ds"))
    source = SOURCES.get("hf")(cfg)
    manifest, _ = build_shards(source, cfg, str(home / "shards"), reuse=False)
    return cfg, source, manifest, home / "shards"


def test_a_saved_dataset_with_image_features_reads_into_shards(built):
    cfg, source, manifest, shards = built
    assert source.name == "hf" and len(source.records) == len(GOOD) + len(BAD)
    first = source.records[0]
    assert (first["id"], first["task"], first["split"], first["source"]) == ("hf-00000", "vqa", "test", "hf")
    # the image's name is its relative path (image_path column), the extra keeps the unmapped plain column only
    assert first["image"] == "val/e0.png" and first["image_rephrase"] == "r0.png" and first["m_loc"] == "probes/p.png"
    assert first["extra"] == {"question_type": "color", "difficulty": 0}
    assert "thumbnail" not in json.dumps(first)
    assert manifest["kept"] == len(GOOD) and manifest["records"] == len(GOOD) + len(BAD)
    assert manifest["rows_by_env"] == {"in": 4, "out_hard": 3, "out_mm": 4, "out_text": 4, "se_image": 3, "se_text": 3}
    cases = load_cases(str(shards))
    assert [c.edit_id for c in cases] == ["hf-00000", "hf-00001", "hf-00002", "hf-00003"]
    in_image = cases[0].samples["in"][0].image
    assert in_image.size == (24, 18) and in_image.getpixel((5, 5)) == (200, 20, 20)
    assert cases[0].samples["out_hard"][0].image.getpixel((5, 5)) == (20, 200, 20)
    assert cases[0].samples["out_mm"][0].image.getpixel((5, 5)) == (20, 200, 20)  # the file under the root
    env = [r for s in manifest["shards"] for r in pq.read_table(os.path.join(shards, s["file"])).to_pylist()]
    assert [r["image_path"] for r in env if r["env"] == "in"] == [f"val/e{i}.png" for i in range(4)]


def test_bad_rows_and_bad_images_are_quarantined_with_their_reasons(built):
    _, _, manifest, shards = built
    entries = {e["record_index"]: e for e in map(json.loads, open(shards / "quarantine.jsonl"))}
    assert sorted(entries) == sorted(BAD)
    for position, (_, code, text) in BAD.items():
        entry = entries[position]
        assert code in entry["codes"], (position, entry)
        assert any(text in reason for reason in entry["reasons"]), (position, entry["reasons"])
    assert manifest["quarantine_by_reason"]["image_corrupt"] == 1
    # an embedded image over data.max_image_bytes is refused by its size and never written to the store
    big = json.loads(entries[6]["record_json"])["_image_blobs"]["edit"]
    assert all(ref["bytes"] > 20000 for label, ref in big.items() if label == "big.png")


def test_the_same_dataset_builds_the_same_shards_and_reuses_them(built):
    cfg, _, manifest, shards = built
    again = SOURCES.get("hf")(cfg)
    reused, was_reused = build_shards(again, cfg, str(shards))
    assert was_reused and reused["content_hash"] == manifest["content_hash"]


def test_streaming_reads_the_same_records(built, image_root):
    cfg, source, _, _ = built
    streamed = SOURCES.get("hf")(hf_config(image_root, cfg.data.path, "data.hf_streaming=true"))
    assert streamed.records == source.records


def test_a_mapping_and_data_files_with_image_paths(tmp_path, image_root, ray_local):
    """A parquet file read by load_dataset: Image cells holding only a path are confined to the image root (an
    absolute path inside it is made relative, one outside is refused); a cell with neither is quarantined."""
    from PIL import Image

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "outside.png")
    features = datasets.Features(
        {"question": datasets.Value("string"), "answer": datasets.Value("string"), "picture": datasets.Image()}
    )
    cells = [
        {"bytes": None, "path": str(image_root / "probes" / "p.png")},
        {"bytes": None, "path": str(tmp_path / "outside.png")},
        {"bytes": None, "path": None},
    ]
    rows = [{"question": f"q{i}?", "answer": f"a{i}", "picture": cell} for i, cell in enumerate(cells)]
    schema = datasets.Dataset.from_list(rows[:1], features=features).data.table.schema  # HF features in metadata
    path = str(tmp_path / "edits.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    cfg = hf_config(
        image_root, path, "data.hf_columns={prompt: question, target: answer, image: picture}", "data.hf_split=train"
    )
    source = SOURCES.get("hf")(cfg)
    assert [r.get("image") for r in source.records] == ["probes/p.png", str(tmp_path / "outside.png"), None]
    manifest, _ = build_shards(source, cfg, str(tmp_path / "shards"), reuse=False)
    entries = {e["record_index"]: e for e in map(json.loads, open(tmp_path / "shards" / "quarantine.jsonl"))}
    assert manifest["kept"] == 1 and sorted(entries) == [1, 2]
    assert entries[1]["codes"] == ["image_path_absolute"]
    assert entries[2]["codes"] == ["reader_problem"] and "neither bytes nor a path" in entries[2]["reasons"][0]


# ---------------------------------------------------------------------------------------------- config errors


def test_a_missing_column_is_a_config_error_naming_field_column_and_mapping(tmp_path, image_root):
    path = save([row(0)], tmp_path / "ds")
    with pytest.raises(ConfigError) as info:
        SOURCES.get("hf")(hf_config(image_root, path, "data.hf_columns={prompt: question}"))
    text = str(info.value)
    assert "data.hf_columns.prompt" in text and "no column 'question'" in text
    assert "src" in text and "mapping in use" in text and "target<-alt" in text  # its columns and the mapping


def test_a_wrong_feature_type_is_a_config_error(tmp_path, image_root):
    features = dict(FEATURES, alt=datasets.Value("int64"), image=datasets.Value("float32"))
    path = save([row(0, alt=3, image=1.5)], tmp_path / "ds", features)
    with pytest.raises(ConfigError) as info:
        SOURCES.get("hf")(hf_config(image_root, path))
    text = str(info.value)
    assert "data.hf_columns.target" in text and "column 'alt' is integer" in text and "needs string" in text
    assert "data.hf_columns.image" in text and "needs image or string" in text


def test_jobs_check_a_saved_dataset_while_loading_the_config(tmp_path, image_root):
    path = save([row(0)], tmp_path / "ds")
    raw = {"data": {"source": "hf", "path": path, "hf_columns": {"prompt": "question"}}}
    issues = check_source(raw)
    assert [i.path for i in issues] == ["data.hf_columns.prompt"]
    assert check_config({"data": {"source": "hf", "path": path}}) == []
    assert [i.path for i in check_config({"data": {"source": "hf"}})] == ["data.path"]
    with pytest.raises(ConfigError, match="is not an edit-record field"):
        load_config(None, ["data.source=hf", "data.hf_columns={question: prompt}"])


def test_column_plan_keeps_plain_columns_and_drops_image_ones():
    plan = column_plan(datasets.Features(FEATURES), {}, "ds")
    assert plan["fields"]["image"] == ["image", "image"] and plan["fields"]["m_loc"] == ["m_loc", "string"]
    assert plan["names"] == {"image": "image_path"}
    assert plan["extra_columns"] == ["difficulty"] and plan["dropped"] == ["thumbnail"]


# ---------------------------------------------------------------------------------------------- round trip


def test_demo_world_round_trip_gives_the_same_shards(tmp_path, monkeypatch, ray_local):
    """demo world -> shards; its kept records -> HF dataset (save_to_disk) -> hf source -> shards: equal bytes."""
    pytest.importorskip("easy_vqa")
    from pipeline.data.hf_export import export_records

    monkeypatch.setenv("ODEDIT_CACHE_DIR", str(tmp_path / "cache"))
    sizes = ["data.demo.num_edits=6", "data.demo.num_validation_edits=2", "data.demo.hard_per_edit=2"]
    cfg = load_config(None, [*sizes, "data.rows_per_shard=20", f"output_dir={tmp_path / 'out'}"])
    demo = SOURCES.get("demo")(cfg)
    first, _ = build_shards(demo, cfg, str(tmp_path / "demo_shards"), reuse=False)
    exported = export_records(demo, cfg, str(tmp_path / "demo_shards"), str(tmp_path / "demo_hf"))
    assert exported["rows"] == first["kept"] == 8

    hf_cfg = load_config(
        None,
        ["data.source=hf", f"data.path={tmp_path / 'demo_hf'}", "data.rows_per_shard=20", f"output_dir={tmp_path}"],
    )
    second, _ = build_shards(SOURCES.get("hf")(hf_cfg), hf_cfg, str(tmp_path / "hf_shards"), reuse=False)
    assert second["content_hash"] == first["content_hash"]
    assert second["config_hash"] != first["config_hash"]  # other inputs, same content
    assert [s["sha256"] for s in second["shards"]] == [s["sha256"] for s in first["shards"]]
    assert read_manifest(str(tmp_path / "hf_shards"))["rows_by_env"] == first["rows_by_env"]

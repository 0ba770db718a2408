"""pipeline.data.shards: environment membership, one test per quarantine reason, layout, determinism, caching,
and the reader API (load_cases / rows_to_cases)."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from bench.synthetic import COLOURS, write_png
from odedit.loading import load_config
from pipeline.data.schema import ENV_SCHEMA, QUARANTINE_SCHEMA, SchemaMismatch, read_table
from pipeline.data.shards import MANIFEST, ShardsError, build_shards, load_cases, read_manifest, rows_to_cases
from pipeline.data.sources import SOURCES

ROWS_PER_SHARD = 12


def full(i: int, **changes) -> dict:
    """A good record with every EasyEdit field (and images `e<i>.png`, `r<i>.png`, `l<i>.png`)."""
    rec = {
        "id": f"good-{i}",
        "src": f"What colour is square {i}?",
        "pred": "red",
        "alt": "blue",
        "rephrase": f"Which colour has square {i}?",
        "image": f"val/e{i}.png",
        "image_rephrase": f"r{i}.png",
        "loc": f"nq question: fact {i}?",
        "loc_ans": f"answer {i}",
        "m_loc": f"val/l{i}.png",
        "m_loc_q": "What colour is it?",
        "m_loc_a": "green",
    }
    rec.update(changes)
    return {k: v for k, v in rec.items() if v is not None}


GOOD = [
    full(0),
    full(1, rephrase=None),
    full(2, image_rephrase=None),
    full(3, loc=None, loc_ans=None),
    full(4, m_loc=None, m_loc_q=None, m_loc_a=None),
    full(5, hard_images=["val/h5a.png", "val/h5b.png"], hard_answers=["red", "red"]),
    full(6, image=None, image_rephrase=None, m_loc=None, m_loc_q=None, m_loc_a=None),  # text-only edit
    full(7, split="validation"),
    full(8),
    full(9, split="validation"),
]

# id -> (record, expected code, text the reason must contain)
BAD = {
    "bad-missing": (full(100, alt=None), "missing_field", "target: missing"),
    "bad-empty": (full(101, alt=""), "empty_text", "target: is empty"),
    "bad-noimage": (full(102, image="val/nope.png"), "image_missing", "image: image 'val/nope.png' does not exist"),
    "bad-corrupt": (full(103, image="val/corrupt.png"), "image_corrupt", "is not a decodable image"),
    "bad-bigfile": (full(104, image_rephrase="big.png"), "image_too_large", "image_rephrase: "),
    "bad-bomb": (full(105, m_loc="val/bomb.png"), "image_too_many_pixels", "m_loc: image 'val/bomb.png' declares"),
    "bad-dotdot": (full(106, image="../outside.png"), "image_path_escapes_root", "contains '..'"),
    "bad-absolute": (full(107, image="/etc/passwd"), "image_path_absolute", "is absolute"),
    "bad-symlink": (full(108, image="val/link.png"), "image_path_escapes_root", "outside its root"),
    "good-0": (full(109, src="A second record with the id good-0"), "duplicate_id", "duplicates the record"),
    "bad-utf8": (full(110, src="What is @@BAD@@?"), "not_utf8", "prompt: is not valid UTF-8"),
    "bad-long": (full(111, rephrase="why " * 600), "text_too_long", "rephrase: is 2400 characters long"),
}


def write_world(root: str, make_bomb) -> dict:
    images = os.path.join(root, "images")
    for i in list(range(10)) + list(range(100, 112)):
        for rel, colour in ((f"val/e{i}.png", "red"), (f"r{i}.png", "red"), (f"val/l{i}.png", "green")):
            write_png(os.path.join(images, rel), 40 + i % 7, 30 + i % 5, COLOURS[colour], seed=i)
    for rel in ("val/h5a.png", "val/h5b.png"):
        write_png(os.path.join(images, rel), 32, 32, COLOURS["red"], seed=5)
    with open(os.path.join(images, "val", "corrupt.png"), "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    write_png(os.path.join(images, "big.png"), 400, 400, COLOURS["red"], seed=7)  # ~400 KB of noise
    make_bomb(os.path.join(images, "val", "bomb.png"), 3000, 3000)
    write_png(os.path.join(root, "outside.png"), 8, 8, COLOURS["red"], seed=8)
    os.symlink(os.path.join(root, "outside.png"), os.path.join(images, "val", "link.png"))
    records = GOOD[:4] + [dict(rec, id=i) for i, (rec, _, _) in BAD.items()] + GOOD[4:]
    both = full(112, alt="", rephrase="x" * 2500)  # two problems in one record
    records.append(dict(both, id="bad-two"))
    text = json.dumps(records, indent=1).encode().replace(b"@@BAD@@", b"\xff\xfe\xfd")
    path = os.path.join(root, "vqa_eval.json")
    with open(path, "wb") as fh:
        fh.write(text)
    return {"path": path, "image_root": images, "records": records}


def make_cfg(world: dict, *overrides: str, partial: bool = True):
    """The mixed world's config; `partial` keeps the records that lack an environment (GOOD[1:7] do)."""
    return load_config(
        None,
        [
            f"data.partial_records={str(partial).lower()}",
            "data.source=mmedit",
            f"data.path={world['path']}",
            f"data.image_root={world['image_root']}",
            f"data.rows_per_shard={ROWS_PER_SHARD}",
            "data.max_image_bytes=150000",
            "data.max_image_pixels=4000000",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory, make_bomb):
    return write_world(str(tmp_path_factory.mktemp("world")), make_bomb)


@pytest.fixture(scope="module")
def built(world, ray_local, tmp_path_factory):
    """One build of the mixed world: (manifest, shards_dir)."""
    cfg = make_cfg(world)
    shards_dir = str(tmp_path_factory.mktemp("shards"))
    manifest, reused = build_shards(SOURCES.get("mmedit")(cfg), cfg, shards_dir)
    assert reused is False
    return manifest, shards_dir


def quarantined(shards_dir: str) -> dict[str, dict]:
    rows = read_table(os.path.join(shards_dir, "quarantine.parquet"), QUARANTINE_SCHEMA).to_pylist()
    by_id: dict[str, dict] = {}
    for row in rows:
        key = row["id"] if row["id"] not in by_id else f"{row['id']}#{row['record_index']}"
        by_id[key] = row
    return by_id


def all_rows(shards_dir: str) -> list[dict]:
    rows = []
    for shard in read_manifest(shards_dir)["shards"]:
        rows += read_table(os.path.join(shards_dir, shard["file"]), ENV_SCHEMA).to_pylist()
    return rows


# ---------------------------------------------------------------------------------------------- quarantine


@pytest.mark.parametrize("bad_id", list(BAD))
def test_quarantine_reason(built, bad_id):
    """One test per reason: the bad record is refused with its code and a reason naming the field."""
    _, shards_dir = built
    _, code, text = BAD[bad_id]
    q = quarantined(shards_dir)
    row = q[bad_id] if bad_id != "good-0" else next(r for k, r in q.items() if k.startswith("good-0"))
    assert code in row["codes"], row
    assert any(text in reason for reason in row["reasons"]), row["reasons"]
    assert json.loads(row["record_json"])["id"] == bad_id
    assert bad_id not in {r["edit_id"] for r in all_rows(shards_dir)} or bad_id == "good-0"


def test_every_good_record_is_kept_and_counted(built):
    manifest, shards_dir = built
    kept = {r["edit_id"] for r in all_rows(shards_dir)}
    assert kept == {r["id"] for r in GOOD}
    assert manifest["records"] == len(GOOD) + len(BAD) + 1
    assert (manifest["kept"], manifest["quarantined"]) == (len(GOOD), len(BAD) + 1)
    counts = manifest["quarantine_by_reason"]
    assert counts["image_path_escapes_root"] == 2 and counts["empty_text"] == 2 and counts["not_utf8"] == 1
    assert sum(counts.values()) == len(BAD) + 2  # bad-two counts under two codes
    # data.partial_records: the edits each environment (so each metric) has, counted (issue 19 item 14)
    by_env: dict[str, int] = {}
    for rec in GOOD:
        for env in expected_envs(rec):
            by_env[env] = by_env.get(env, 0) + 1
    assert manifest["edits_by_env"] == dict(sorted(by_env.items())) and manifest["partial_records"] is True
    assert manifest["edits_by_env"]["in"] == len(GOOD) > manifest["edits_by_env"]["se_text"]


def test_without_partial_records_a_record_missing_a_metric_field_is_quarantined(world, record_outcome):
    """Issue 19 item 14: a record that would silently lose a metric is refused, naming the field."""
    from pipeline.data.shards import required_envs, validate_records

    strict = make_cfg(world, partial=False)
    assert required_envs(strict) == ("se_text", "se_image", "out_text", "out_mm")
    assert required_envs(make_cfg(world, "odedit.environments=[in,out_hard]", partial=False))[-1] == "out_hard"
    good, bad = validate_records(GOOD, "mmedit", 2000, required=required_envs(strict))
    kept = {raw["id"] for _, raw in good}
    assert kept == {"good-0", "good-5", "good-7", "good-8", "good-9"}
    reasons = {e["id"]: e["reasons"] for e in bad}
    assert all(set(e["codes"]) == {"missing_field"} for e in bad)
    assert reasons["good-1"] == [
        "rephrase: missing (the se_text environment needs rephrase); set data.partial_records=true to keep such "
        "records and score that metric on fewer edits"
    ]
    assert [r.split(":")[0] for r in reasons["good-3"]] == ["loc", "loc_ans"]
    record_outcome(
        "bad record",
        "record without a field a metric needs (rephrase)",
        "quarantined (missing_field)",
        reasons["good-1"][0],
    )
    assert validate_records(GOOD, "mmedit", 2000, required=required_envs(make_cfg(world)))[1] == []


def test_a_record_with_several_problems_reports_all_of_them(built):
    row = quarantined(built[1])["bad-two"]
    assert row["codes"] == ["empty_text", "text_too_long"] and row["stage"] == "validate"
    assert [r.split(":")[0] for r in row["reasons"]] == ["target", "rephrase"]


def test_quarantine_files_list_the_same_rows_in_source_order(built):
    manifest, shards_dir = built
    table = pq.read_table(os.path.join(shards_dir, "quarantine.parquet"))
    lines = open(os.path.join(shards_dir, "quarantine.jsonl")).read().splitlines()
    assert table.num_rows == len(lines) == manifest["quarantined"]
    assert [json.loads(x)["record_index"] for x in lines] == table.column("record_index").to_pylist()
    assert table.column("record_index").to_pylist() == sorted(table.column("record_index").to_pylist())
    stages = dict(zip(table.column("id").to_pylist(), table.column("stage").to_pylist()))
    assert stages["bad-symlink"] == "images" and stages["bad-dotdot"] == "validate"


# ---------------------------------------------------------------------------------------------- rows and shards


def expected_envs(rec: dict) -> set[str]:
    envs = {"in"}
    envs |= {"se_text"} if rec.get("rephrase") else set()
    envs |= {"se_image"} if rec.get("image_rephrase") else set()
    envs |= {"out_text"} if rec.get("loc") and rec.get("loc_ans") else set()
    envs |= {"out_mm"} if rec.get("m_loc") and rec.get("m_loc_q") and rec.get("m_loc_a") else set()
    envs |= {"out_hard"} if rec.get("hard_images") else set()
    return envs


def test_each_record_has_exactly_the_environments_its_fields_give(built):
    rows = all_rows(built[1])
    for rec in GOOD:
        mine = [r for r in rows if r["edit_id"] == rec["id"]]
        assert {r["env"] for r in mine} == expected_envs(rec), rec["id"]
        by_env = {r["env"]: r for r in mine}
        assert (by_env["in"]["prompt"], by_env["in"]["target"]) == (rec["src"], rec["alt"])
        assert (by_env["in"]["image"] is None) == ("image" not in rec)
        if "out_text" in by_env:
            assert by_env["out_text"]["image"] is None and by_env["out_text"]["target"] == rec["loc_ans"]
        if "se_image" in by_env:
            assert by_env["se_image"]["image_path"] == rec["image_rephrase"]
    hard = [r for r in rows if r["env"] == "out_hard"]
    assert [(r["sample_index"], r["prompt"], r["target"], r["image_path"]) for r in hard] == [
        (0, GOOD[5]["src"], "red", "val/h5a.png"),
        (1, GOOD[5]["src"], "red", "val/h5b.png"),
    ]


def test_rows_carry_edit_level_columns_and_stored_images(built):
    rows = all_rows(built[1])
    first = next(r for r in rows if r["edit_id"] == "good-0" and r["env"] == "in")
    assert (first["edit_index"], first["split"], first["task"], first["source"], first["pred"]) == (
        0,
        "test",
        "vqa",
        "mmedit",
        "red",
    )
    assert json.loads(first["extra"]) == {}
    assert (first["image_width"], first["image_height"]) == (40, 30)
    assert first["image"].startswith(b"\x89PNG")


def test_shards_have_deterministic_names_whole_edits_and_sorted_rows(built):
    from pipeline.data.envrows import row_sort_key

    manifest, shards_dir = built
    names = [s["file"] for s in manifest["shards"]]
    # env-<planned shard number>: a planned shard whose records were all refused is not written
    numbers = [int(n[len("env-") : -len(".parquet")]) for n in names]
    assert names == [f"env-{i:05d}.parquet" for i in numbers] and numbers == sorted(set(numbers))
    assert len(names) > 2 and numbers[0] == 0
    assert sorted(f for f in os.listdir(shards_dir) if f.startswith("env-")) == names
    seen: dict[str, str] = {}
    last_index = -1
    for shard in manifest["shards"]:
        rows = read_table(os.path.join(shards_dir, shard["file"]), ENV_SCHEMA).to_pylist()
        assert rows == sorted(rows, key=row_sort_key)
        assert len(rows) == shard["rows"] and (len(rows) <= ROWS_PER_SHARD or shard["edits"] == 1)
        for r in rows:
            assert seen.setdefault(r["edit_id"], shard["file"]) == shard["file"]  # one edit, one shard
        assert rows[0]["edit_index"] == shard["first_edit_index"] > last_index
        last_index = shard["last_edit_index"]
    assert manifest["rows"] == sum(s["rows"] for s in manifest["shards"]) == sum(manifest["rows_by_env"].values())
    assert manifest["edits_by_split"] == {"test": 8, "validation": 2}


def test_manifest_is_written_last(built):
    _, shards_dir = built
    mtime = os.path.getmtime(os.path.join(shards_dir, MANIFEST))
    others = [f for f in os.listdir(shards_dir) if f != MANIFEST]
    assert others and all(os.path.getmtime(os.path.join(shards_dir, f)) <= mtime for f in others)


@pytest.mark.parametrize("workers", [1, 2])
def test_building_twice_gives_identical_bytes_and_manifest(world, built, tmp_path, workers):
    """Shards and manifest do not depend on how many workers (and so how many Ray tasks) built them."""
    manifest, shards_dir = built
    cfg = make_cfg(world, f"data.build_workers={workers}")
    again, reused = build_shards(SOURCES.get("mmedit")(cfg), cfg, str(tmp_path / "again"), reuse=False)
    assert reused is False and again == manifest
    for shard in manifest["shards"]:
        a = open(os.path.join(shards_dir, shard["file"]), "rb").read()
        b = open(os.path.join(tmp_path / "again", shard["file"]), "rb").read()
        assert a == b


def test_same_inputs_reuse_the_shards_and_changed_inputs_rebuild(world, built, tmp_path):
    manifest, shards_dir = built
    cfg = make_cfg(world)
    source = SOURCES.get("mmedit")(cfg)
    before = os.path.getmtime(os.path.join(shards_dir, MANIFEST))
    same, reused = build_shards(source, cfg, shards_dir)
    assert reused is True and same == manifest
    assert os.path.getmtime(os.path.join(shards_dir, MANIFEST)) == before
    # a changed setting and a changed image file each change the fingerprint
    other = make_cfg(world, "data.stored_image_size=16")
    assert build_shards(source, other, str(tmp_path / "small"))[0]["config_hash"] != manifest["config_hash"]
    image = os.path.join(world["image_root"], "val", "e0.png")
    os.utime(image, ns=(os.stat(image).st_atime_ns, os.stat(image).st_mtime_ns + 10**9))
    rebuilt, reused = build_shards(source, other, str(tmp_path / "small"))
    assert reused is False and rebuilt["kept"] == manifest["kept"]


def test_a_split_of_only_bad_records_completes_with_everything_quarantined(tmp_path, ray_local):
    path = tmp_path / "vqa_eval.json"
    path.write_text(json.dumps([{"src": "q"}, {"alt": "a"}, "not an object"]))
    cfg = make_cfg({"path": str(path), "image_root": str(tmp_path)})
    manifest, _ = build_shards(SOURCES.get("mmedit")(cfg), cfg, str(tmp_path / "shards"))
    assert (manifest["kept"], manifest["quarantined"], manifest["shards"]) == (0, 3, [])
    assert manifest["quarantine_by_reason"] == {"missing_field": 2, "wrong_type": 1}
    assert load_cases(str(tmp_path / "shards")) == []


# ---------------------------------------------------------------------------------------------- reader API


def test_load_cases_follows_stream_order_split_and_limit(built):
    _, shards_dir = built
    test = load_cases(shards_dir)
    assert [c.edit_id for c in test] == [r["id"] for r in GOOD if r.get("split", "test") == "test"]
    assert [c.edit_id for c in load_cases(shards_dir, split="validation")] == ["good-7", "good-9"]
    assert [c.edit_id for c in load_cases(shards_dir, limit=3)] == ["good-0", "good-1", "good-2"]
    case = test[0]
    assert set(case.samples) == {"in", "se_text", "se_image", "out_text", "out_mm"}
    image = case.samples["in"][0].image
    assert image.mode == "RGB" and image.size == (40, 30) and image.getpixel((20, 15)) == COLOURS["red"]
    assert case.target == "blue" and case.references == {}
    text_only = next(c for c in test if c.edit_id == "good-6")
    assert text_only.samples["in"][0].image is None


def test_rows_to_cases_attaches_references_only_when_complete(built):
    rows = [r for r in all_rows(built[1]) if r["edit_id"] == "good-5"]
    for r in rows:
        if r["env"] in ("out_text", "out_hard"):
            r.update(
                topk_ids=[3, 1, 4, 1, 5, 9], topk_logprobs=[-0.1, -2.0, -3.0, -0.2, -2.5, -4.0], n_positions=2, k=3
            )
    rows[-1]["topk_ids"] = None  # the last out_hard sample lacks its reference
    (case,) = rows_to_cases(list(reversed(rows)))
    assert list(case.references) == ["out_text"]
    ref = case.references["out_text"][0]
    assert ref.topk_ids.tolist() == [[3, 1, 4], [1, 5, 9]] and ref.topk_ids.dtype.is_floating_point is False
    assert ref.k == 3 and str(ref.topk_logprobs.dtype) == "torch.float32"
    assert [s.target for s in case.samples["out_hard"]] == ["red", "red"]


def test_reading_a_foreign_shard_names_shard_and_column(world, ray_local, tmp_path):
    cfg = make_cfg(world)
    build_shards(SOURCES.get("mmedit")(cfg), cfg, str(tmp_path / "s"))
    shard = tmp_path / "s" / "env-00001.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.rename_columns(["prompt_text" if n == "prompt" else n for n in table.column_names]), shard)
    with pytest.raises(SchemaMismatch) as info:
        load_cases(str(tmp_path / "s"))
    assert "env-00001.parquet" in str(info.value) and "'prompt'" in str(info.value)


def test_a_directory_without_manifest_says_how_to_build_one(tmp_path):
    with pytest.raises(ShardsError, match="python -m jobs.prepare"):
        load_cases(str(tmp_path))

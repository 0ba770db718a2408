"""pipeline.data.sources.mmedit: EasyEdit's E-VQA / E-IC files load unchanged; whole-file errors name the fix."""

from __future__ import annotations

import json
import os

import pytest

from odedit.records import EditRecord, validate_record
from pipeline.data.sources import SOURCES
from pipeline.data.sources.mmedit import RecordFileError

EASYEDIT_FIELDS = (
    "src",
    "pred",
    "rephrase",
    "alt",
    "image",
    "image_rephrase",
    "loc",
    "loc_ans",
    "m_loc",
    "m_loc_q",
    "m_loc_a",
)
OURS = {"src": "prompt", "alt": "target"}


def read(cfg):
    return SOURCES.get("mmedit")(cfg)


def test_exact_evqa_file_maps_every_field(evqa_exact, make_config):
    source = read(make_config(evqa_exact))
    assert source.name == "mmedit"
    assert source.image_root == evqa_exact["image_root"]
    assert source.rephrase_image_root == evqa_exact["rephrase_image_root"]
    assert source.locality_image_root == evqa_exact["image_root"]  # EasyEdit resolves m_loc under coco_image
    assert len(source.records) == len(evqa_exact["records"])
    for i, (raw, original) in enumerate(zip(source.records, evqa_exact["records"])):
        assert validate_record(raw) == []
        record = EditRecord.from_raw(raw)
        for field in EASYEDIT_FIELDS:
            assert getattr(record, OURS.get(field, field)) == original[field], field
        assert record.id == f"mmedit-vqa-{i:05d}"
        assert (record.task, record.split, record.source, record.extra) == ("vqa", "test", "mmedit", {})


def test_evqa_file_builds_every_environment_from_its_roots(evqa_exact, make_config, ray_local, tmp_path):
    from pipeline.data.shards import build_shards, load_cases

    cfg = make_config(evqa_exact)
    manifest, _ = build_shards(read(cfg), cfg, str(tmp_path / "shards"))
    assert (manifest["kept"], manifest["quarantined"]) == (2, 0)
    case = load_cases(str(tmp_path / "shards"))[0]
    rec = evqa_exact["records"][0]
    got = {
        env: [(s.prompt, s.target, None if s.image is None else s.image.size) for s in samples]
        for env, samples in case.samples.items()
    }
    assert got == {
        "in": [(rec["src"], rec["alt"], (224, 168))],  # 320x240 JPEG shrunk to a 224 longer side
        "se_text": [(rec["rephrase"], rec["alt"], (224, 168))],
        "se_image": [(rec["src"], rec["alt"], (224, 149))],  # the 300x200 PNG under the rephrase root
        "out_text": [(rec["loc"], rec["loc_ans"], None)],
        "out_mm": [(rec["m_loc_q"], rec["m_loc_a"], (224, 168))],
    }


def test_caption_files_are_the_caption_task(evqa_exact, make_config, tmp_path, record_outcome):
    """E-IC records are recognised by what they hold (caption prompts), not by the file's name (issue 19 item 19)."""
    captions = [dict(r, src="a photo of", rephrase="a picture of") for r in evqa_exact["records"]]
    plain = tmp_path / "mine" / "eval.json"  # no "caption" in the name
    os.makedirs(plain.parent)
    plain.write_text(json.dumps(captions))
    source = read(make_config({**evqa_exact, "path": str(plain)}))
    assert {r["task"] for r in source.records} == {"caption"}
    assert source.records[0]["id"] == "mmedit-caption-00000"
    record_outcome("bad file", "E-IC records in a file not named *caption*", "recognised as captions by their records")
    named = tmp_path / "mine" / "caption_eval_edit.json"  # E-VQA questions in a file named caption
    named.write_text(json.dumps(evqa_exact["records"]))
    assert {r["task"] for r in read(make_config({**evqa_exact, "path": str(named)})).records} == {"vqa"}
    mixed = [dict(captions[0], task="vqa"), captions[1]]  # a record's own task wins
    plain.write_text(json.dumps(mixed))
    assert [r["task"] for r in read(make_config({**evqa_exact, "path": str(plain)})).records] == ["vqa", "caption"]
    forced = read(make_config({**evqa_exact, "path": str(plain)}, "data.task=vqa", "data.split=validation"))
    assert {(r["task"], r["split"]) for r in forced.records} == {("vqa", "validation")}


def test_given_ids_are_kept_and_unknown_keys_go_to_extra(evqa_exact, make_config):
    records = [dict(evqa_exact["records"][0], id="q-17", cond="red >> blue || x", question_id=17)]
    with open(evqa_exact["path"], "w") as fh:
        json.dump(records, fh)
    (raw,) = read(make_config(evqa_exact)).records
    assert raw["id"] == "q-17"
    assert raw["extra"] == {"cond": "red >> blue || x", "question_id": 17}
    assert raw["src"] == records[0]["src"]


def test_truncated_file_is_a_whole_file_error_naming_file_and_fix(evqa_exact, make_config):
    text = open(evqa_exact["path"]).read()
    with open(evqa_exact["path"], "w") as fh:
        fh.write(text[: len(text) // 2])
    with pytest.raises(RecordFileError) as info:
        read(make_config(evqa_exact))
    assert evqa_exact["path"] in str(info.value)
    assert "truncated" in str(info.value) and "re-download" in str(info.value)


def test_broken_json_in_the_middle_and_a_non_list_are_whole_file_errors(evqa_exact, make_config):
    with open(evqa_exact["path"], "w") as fh:
        fh.write('[{"src": "a", "alt": "b",}, {"src": "c", "alt": "d"}]')
    with pytest.raises(RecordFileError, match="line 1, column"):
        read(make_config(evqa_exact))
    with open(evqa_exact["path"], "w") as fh:
        json.dump({"data": []}, fh)
    with pytest.raises(RecordFileError, match="expected a JSON list"):
        read(make_config(evqa_exact))


def test_missing_or_unset_path_names_the_config_key(evqa_exact, make_config, tmp_path):
    with pytest.raises(RecordFileError, match="data.path: .*does not exist"):
        read(make_config({**evqa_exact, "path": str(tmp_path / "nope.json")}))
    with pytest.raises(RecordFileError, match="data.path is empty"):
        read(make_config({**evqa_exact, "path": ""}))


def test_non_utf8_bytes_spoil_only_their_record(evqa_exact, make_config):
    good, bad = evqa_exact["records"]
    raw = json.dumps([good, dict(bad, src="How many XX are there?")]).encode().replace(b"XX", b"\xff\xfe")
    with open(evqa_exact["path"], "wb") as fh:
        fh.write(raw)
    first, second = read(make_config(evqa_exact)).records
    assert validate_record(first) == []
    assert validate_record(second) == ["prompt: is not valid UTF-8 (lone surrogate)"]


def test_json_lines_files_keep_unparsable_lines_as_records_to_quarantine(evqa_exact, make_config, tmp_path):
    path = tmp_path / "records.jsonl"
    lines = [json.dumps(r) for r in evqa_exact["records"]]
    path.write_text(lines[0] + "\n{broken\n" + lines[1] + "\n")
    records = read(make_config({**evqa_exact, "path": str(path)})).records
    assert len(records) == 3
    assert records[1]["_reader_problems"][0].startswith("record: line 2 is not valid JSON")
    assert records[2]["src"] == evqa_exact["records"][1]["src"]


def test_empty_image_root_means_the_records_directory(evqa_exact, make_config):
    source = read(make_config({**evqa_exact, "image_root": "", "rephrase_image_root": ""}))
    assert source.image_root == os.path.dirname(evqa_exact["path"]) == source.rephrase_image_root

"""Edit-record validation returns every reason; EasyEdit's field names load unchanged."""

from __future__ import annotations

import pytest

from odedit.records import EditRecord, check_relative_path, validate_record

EASYEDIT_RECORD = {
    "src": "What is the man holding?",
    "pred": "a bat",
    "alt": "a racket",
    "rephrase": "What does the man hold?",
    "image": "val2014/COCO_val2014_000000000042.jpg",
    "image_rephrase": "val2014_image_rephrase/42.png",
    "loc": "nq question: who wrote hamlet",
    "loc_ans": "shakespeare",
    "m_loc": "val2014/COCO_val2014_000000000073.jpg",
    "m_loc_q": "What color is the bus?",
    "m_loc_a": "red",
}


def test_easyedit_record_maps_every_field():
    raw = dict(EASYEDIT_RECORD, id=7)
    assert validate_record(raw) == []
    rec = EditRecord.from_raw(raw)
    assert rec.id == "7" and rec.prompt == raw["src"] and rec.target == raw["alt"]
    for k in ("pred", "rephrase", "image", "image_rephrase", "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a"):
        assert getattr(rec, k) == raw[k]
    assert rec.has_text_locality and rec.has_mm_locality
    assert EditRecord.from_raw(rec.to_dict()) == rec


def test_every_reason_is_returned_at_once():
    raw = {
        "src": "",
        "image": "../etc/passwd",
        "loc": "q",
        "m_loc": "/abs/x.png",
        "task": "qa",
        "rephrase": 5,
        "hard_images": ["a.png"],
        "hard_answers": [],
    }
    reasons = validate_record(raw)
    joined = "\n".join(reasons)
    for needle in (
        "id: missing",
        "prompt: is empty",
        "target: missing",
        "image:",
        "'..'",
        "m_loc:",
        "absolute",
        "loc_ans: missing",
        "m_loc_q: missing",
        "task:",
        "rephrase: must be a string",
        "hard_answers: 0 answers for 1",
    ):
        assert needle in joined, needle
    assert len(reasons) >= 10


@pytest.mark.parametrize(
    "value,needle",
    [
        ("../x.png", "'..'"),
        ("a/../../x.png", "'..'"),
        ("/etc/x.png", "absolute"),
        ("C:\\x.png", "absolute"),
        ("~/x.png", "absolute"),
        ("", "empty"),
        ("a\x00b", "NUL"),
    ],
)
def test_bad_image_paths(value, needle):
    assert needle in check_relative_path(value)


def test_good_relative_paths():
    assert check_relative_path("val2014/x.jpg") is None
    assert check_relative_path("a/./b.png") is None


def test_text_problems():
    long = "x" * 50
    reasons = validate_record(
        {"id": "a", "prompt": long, "target": "ok\ud800", "loc": b"\xff\xfe", "loc_ans": "y"}, max_chars=10
    )
    joined = "\n".join(reasons)
    assert "prompt: is 50 characters long" in joined
    assert "target: is not valid UTF-8" in joined
    assert "loc: is not valid UTF-8" in joined


def test_not_a_mapping():
    assert validate_record(["a"]) == ["record: must be a JSON object, got list"]


def test_from_raw_rejects_bad_records_with_all_reasons():
    with pytest.raises(ValueError, match="prompt.*target"):
        EditRecord.from_raw({"id": 1})

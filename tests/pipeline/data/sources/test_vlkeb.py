"""pipeline.data.sources.vlkeb: MMEdit keys plus multi-hop portability kept in `extra`."""

from __future__ import annotations

import json

from odedit.records import EditRecord, validate_record
from pipeline.data.sources import SOURCES


def vlkeb_record(**changes):
    rec = {
        "src": "What is the name of this building?",
        "pred": "Louvre",
        "alt": "Big Ben",
        "rephrase": "What is this building called?",
        "image": "m.0104lr/google_15.jpg",
        "image_rephrase": "m.0104lr/google_16.jpg",
        "loc": "nq question: who wrote hamlet",
        "loc_ans": "Shakespeare",
        "m_loc": "m.02j9z/google_3.jpg",
        "m_loc_q": "What is in the image?",
        "m_loc_a": "a river",
        "port_new": [
            {"port_type": "1-hop", "Q&A": {"Question": "In which city is it?", "Answer": "London"}},
            {"port_type": "2-hop", "Q&A": {"Question": "Which river flows there?", "Answer": "Thames"}},
        ],
    }
    rec.update(changes)
    return rec


def read(tmp_path, make_config, records):
    path = tmp_path / "eval_multihop.json"
    path.write_text(json.dumps(records))
    return SOURCES.get("vlkeb")(
        make_config({"path": str(path), "image_root": str(tmp_path / "VLKEB_images")}, "data.source=vlkeb")
    )


def test_portability_goes_to_extra_and_core_fields_map(tmp_path, make_config):
    source = read(tmp_path, make_config, [vlkeb_record()])
    (raw,) = source.records
    assert source.name == "vlkeb" and source.locality_image_root == str(tmp_path / "VLKEB_images")
    assert validate_record(raw) == [] and "_reader_problems" not in raw
    record = EditRecord.from_raw(raw)
    assert (record.id, record.prompt, record.target, record.m_loc) == (
        "vlkeb-vqa-00000",
        "What is the name of this building?",
        "Big Ben",
        "m.02j9z/google_3.jpg",
    )
    assert record.extra == {
        "portability": [
            {"hop": 1, "question": "In which city is it?", "answer": "London"},
            {"hop": 2, "question": "Which river flows there?", "answer": "Thames"},
        ]
    }


def test_records_without_portability_have_none(tmp_path, make_config):
    rec = vlkeb_record()
    del rec["port_new"]
    (raw,) = read(tmp_path, make_config, [rec]).records
    assert raw["extra"] == {}


def test_malformed_portability_is_kept_and_reported_for_quarantine(tmp_path, make_config):
    bad = vlkeb_record(port_new=[{"port_type": "hop?", "Q&A": {"Question": "q"}}])
    also_bad = vlkeb_record(port_new="1-hop: q")
    raws = read(tmp_path, make_config, [bad, also_bad]).records
    assert raws[0]["extra"]["port_new"] == bad["port_new"]  # nothing dropped
    assert raws[0]["_reader_problems"][0].startswith("port_new[0]: expected")
    assert raws[1]["_reader_problems"] == ["port_new: must be a list of portability questions, got str"]


def test_portability_entry_without_port_type_keeps_the_edit_and_is_counted(tmp_path, make_config, record_outcome):
    """Portability is not scored: an entry with no usable `port_type` is skipped, not the edit (issue 19 item 15)."""
    no_type = {"Q&A": {"Question": "In which city is it?", "Answer": "London"}}
    odd_type = {"port_type": "multi", "Q&A": {"Question": "Which river?", "Answer": "Thames"}}
    good = {"port_type": "1-hop", "Q&A": {"Question": "Which country?", "Answer": "UK"}}
    source = read(tmp_path, make_config, [vlkeb_record(port_new=[no_type, good, odd_type]), vlkeb_record()])
    raw = source.records[0]
    assert validate_record(raw) == [] and "_reader_problems" not in raw
    assert raw["extra"]["portability"] == [{"hop": 1, "question": "Which country?", "answer": "UK"}]
    assert raw["extra"]["portability_skipped"] == [no_type, odd_type]  # kept as they were, nothing dropped
    assert source.notes == {"portability_skipped": 2}
    record_outcome(
        "bad record",
        "VLKEB portability entry without port_type",
        "edit kept; the entry skipped and counted (portability_skipped)",
        str(source.notes),
    )

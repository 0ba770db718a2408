"""pipeline.data.sources.mmkebench: MMEdit core keys; MMKE-Bench's own fields kept in `extra` by name."""

from __future__ import annotations

import json

from odedit.records import EditRecord, validate_record
from pipeline.data.sources import SOURCES

ENTITY = {
    "src": "Who is the person in the image?",
    "pred": "unknown",
    "alt": "Jane Doe, a marine biologist",
    "rephrase": "Who is shown in this picture?",
    "image": "entity/jane/1.jpg",
    "image_rephrase": "entity/jane/2.jpg",
    "loc": "nq question: what is the capital of peru",
    "loc_ans": "Lima",
    "m_loc": "okvqa/123.jpg",
    "m_loc_q": "What animal is this?",
    "m_loc_a": "zebra",
    "knowledge_type": "entity_level",
    "one_hop_img": "entity/jane/3.jpg",
    "rel_1": "What does Jane Doe study?",
    "rel_ans_1": "marine life",
    "rel_2": "Where does Jane Doe work?",
    "rel_2_ans": "an aquarium",
    "m_rel_1": "What does the person in the image study?",
    "m_rel_ans_1": "marine life",
    "m_rel_2": "Where does the person in the image work?",
    "m_rel_2_ans": "an aquarium",
}
VISUAL = {
    "src": "What gesture is shown?",
    "pred": "wave",
    "alt": "salute",
    "rephrase": "Which gesture is this?",
    "image": "visual/salute/1.jpg",
    "image_rephrase": "visual/salute/2.jpg",
    "loc": "nq question: q",
    "loc_ans": "a",
    "m_loc": "okvqa/9.jpg",
    "m_loc_q": "What colour is the car?",
    "m_loc_a": "red",
    "knowledge_type": "visual_knowledge",
    "image_rephrase_question": "What is the soldier doing?",
    "rel": "What does a salute signal?",
    "rel_ans": "respect",
    "m_rel": "What does this signal?",
    "m_rel_ans": "respect",
    "port_new": [{"port_type": "1-hop", "Q&A": {"Question": "Who salutes?", "Answer": "soldiers"}}],
}


def read(tmp_path, make_config, records):
    path = tmp_path / "mmke_eval.json"
    path.write_text(json.dumps(records))
    return SOURCES.get("mmkebench")(
        make_config({"path": str(path), "image_root": str(tmp_path)}, "data.source=mmkebench")
    )


def test_core_fields_map_and_benchmark_fields_stay_in_extra(tmp_path, make_config):
    entity, visual = read(tmp_path, make_config, [ENTITY, VISUAL]).records
    for raw, original in ((entity, ENTITY), (visual, VISUAL)):
        assert validate_record(raw) == [] and "_reader_problems" not in raw
        record = EditRecord.from_raw(raw)
        assert (record.prompt, record.target, record.image, record.m_loc_a) == (
            original["src"],
            original["alt"],
            original["image"],
            original["m_loc_a"],
        )
        assert record.source == "mmkebench"
    own = {k: v for k, v in ENTITY.items() if k in ("knowledge_type", "one_hop_img") or "rel" in k}
    assert entity["extra"] == own
    assert visual["extra"]["image_rephrase_question"] == "What is the soldier doing?"
    assert visual["extra"]["portability"] == [{"hop": 1, "question": "Who salutes?", "answer": "soldiers"}]
    assert "port_new" not in visual["extra"]


def test_unknown_knowledge_type_is_reported_for_quarantine(tmp_path, make_config):
    (raw,) = read(tmp_path, make_config, [dict(ENTITY, knowledge_type="gossip")]).records
    assert raw["_reader_problems"] == [
        "knowledge_type: 'gossip' is not one of entity_level, visual_knowledge, user_specific"
    ]

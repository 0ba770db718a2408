"""pipeline.data.duplicates: a record that repeats an earlier one by content is refused whatever its id
(issue 19 item 13); records that differ in any edit-defining field or image content are all kept."""

from __future__ import annotations

import os

from bench.synthetic import COLOURS, write_png
from pipeline.data import quarantine as q
from pipeline.data.duplicates import DuplicateFinder, text_key
from pipeline.data.shards import validate_records

BASE = {
    "src": "What colour is the square?",
    "alt": "blue",
    "pred": "red",
    "rephrase": "Which colour has the square?",
    "image": "e.png",
    "image_rephrase": "r.png",
    "loc": "nq question: who wrote hamlet",
    "loc_ans": "shakespeare",
    "m_loc": "l.png",
    "m_loc_q": "What is it?",
    "m_loc_a": "a square",
}


def _roots(tmp_path) -> dict[str, str]:
    for name, colour, seed in (("e", "red", 1), ("r", "red", 2), ("l", "green", 3), ("copy_of_e", "red", 1)):
        write_png(os.path.join(tmp_path, f"{name}.png"), 16, 16, COLOURS[colour], seed=seed)
    write_png(os.path.join(tmp_path, "other.png"), 16, 16, COLOURS["blue"], seed=9)
    return {"image_root": str(tmp_path), "rephrase_image_root": str(tmp_path), "locality_image_root": str(tmp_path)}


def _check(records, roots):
    # EasyEdit records carry no ids: the reader makes them from positions, so ids never repeat
    records = [dict(r, id=f"mmedit-vqa-{i:05d}") for i, r in enumerate(records)]
    return validate_records(records, "mmedit", 2000, duplicates=DuplicateFinder(roots))


def test_a_record_identical_to_an_earlier_one_is_quarantined_whatever_its_id(tmp_path, record_outcome):
    good, bad = _check([BASE, dict(BASE, src="What colour is the  square? "), BASE], _roots(tmp_path))
    assert [i for i, _ in good] == [0]
    assert [e["record_index"] for e in bad] == [1, 2]  # white space runs do not make another edit
    assert all(e["codes"] == [q.DUPLICATE] for e in bad)
    assert "position 0" in bad[1]["reasons"][0]
    record_outcome(
        "bad record",
        "record identical to an earlier one (EasyEdit ids from positions)",
        "quarantined (duplicate)",
        bad[1]["reasons"][0],
    )


def test_the_same_image_bytes_under_another_name_is_the_same_edit(tmp_path):
    roots = _roots(tmp_path)
    good, bad = _check([BASE, dict(BASE, image="copy_of_e.png"), dict(BASE, image="other.png")], roots)
    assert [i for i, _ in good] == [0, 2]
    assert [e["record_index"] for e in bad] == [1]


def test_records_that_differ_in_any_edit_field_are_all_kept(tmp_path):
    changes = [
        {"alt": "green"},
        {"rephrase": "Name the colour."},
        {"loc_ans": "marlowe"},
        {"m_loc_a": "a box"},
        {"task": "caption"},
        {"image_rephrase": "other.png"},
    ]
    good, bad = _check([BASE] + [dict(BASE, **c) for c in changes], _roots(tmp_path))
    assert bad == [] and len(good) == 1 + len(changes)
    # `pred`, `split` and `extra` do not define the edit
    assert text_key(dict(BASE, pred="x", split="train", extra={"a": 1})) == text_key(BASE)


def test_ids_and_contents_are_both_checked(tmp_path):
    records = [dict(BASE, id="a"), dict(BASE, id="a", alt="green"), dict(BASE, id="b")]
    good, bad = validate_records(records, "mmedit", 2000, duplicates=DuplicateFinder(_roots(tmp_path)))
    assert [i for i, _ in good] == [0]
    assert [e["codes"] for e in bad] == [[q.DUPLICATE_ID], [q.DUPLICATE]]

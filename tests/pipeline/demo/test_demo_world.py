"""The easy-vqa demo world: question grammar, renderer, records (pipeline.data.sources.demo, pipeline.demo.world)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from PIL import Image

from odedit.loading import load_config
from odedit.records import EditRecord, validate_record
from pipeline.data.sources import SOURCES
from pipeline.data.sources.demo import PROBE_IMAGES, build_records, read_demo
from pipeline.demo.facts import text_facts
from pipeline.demo.questions import (
    COLORS,
    EASY_VQA_FORMS,
    PARAPHRASES,
    QUESTION_TYPES,
    SHAPES,
    all_paraphrases,
    parse,
)
from pipeline.demo.render import IMAGE_SIZE, PALETTE, infer_attributes, render_shape
from pipeline.demo.world import labels_from_questions, load_split, vocabulary_corpus

pytest.importorskip("easy_vqa")

ANSWERS = {"color": set(COLORS), "shape": set(SHAPES), "color_yes_no": {"yes", "no"}, "shape_yes_no": {"yes", "no"}}


@pytest.fixture(scope="module")
def test_split():
    return load_split("test")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def source(cache_root, monkeypatch_module):
    monkeypatch_module.setenv("ODEDIT_CACHE_DIR", str(cache_root))
    cfg = load_config(
        None, ["data.demo.num_edits=120", "data.demo.num_validation_edits=30", "data.demo.hard_per_edit=3", "seed=3"]
    )
    return cfg, read_demo(cfg)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


# ------------------------------------------------------------------------------------------ grammar


def test_every_easy_vqa_question_parses_and_matches_its_image(test_split):
    """load_split checks every answer against the pixel-read attributes; here: the four types all occur."""
    types = {item.qtype for item in test_split.items}
    assert types == set(QUESTION_TYPES)
    assert len(test_split.items) == 9673 and len(test_split.attributes) == 1000


def test_paraphrases_keep_the_meaning_and_differ_from_easy_vqa():
    easy = {t for ts in EASY_VQA_FORMS.values() for t in ts}
    assert not easy & {t for ts in PARAPHRASES.values() for t in ts}
    assert set(EASY_VQA_FORMS) == set(PARAPHRASES)
    for shape in SHAPES:
        for color in COLORS:
            for forms in EASY_VQA_FORMS.values():
                slot = color if "{color}" in forms[0] else shape
                q = parse(forms[0].format(shape=slot, color=slot))
                for p in all_paraphrases(forms[0].format(shape=slot, color=slot)):
                    assert parse(p).answer(shape, color) == q.answer(shape, color), p


def test_parse_rejects_foreign_questions_with_the_known_forms():
    with pytest.raises(ValueError, match="not a demo-world question.*what shape is in the image"):
        parse("how many shapes are there?")


def test_labels_from_questions_use_elimination():
    assert labels_from_questions([("what is the red shape?", "circle")]) == ("circle", "red")
    assert labels_from_questions([("is there a circle?", "no"), ("is no rectangle present?", "yes")]) == (
        "triangle",
        None,
    )
    assert labels_from_questions([("is there a blue shape?", "no")]) == (None, None)


def test_text_facts_are_unique_single_words_and_in_the_vocabulary():
    facts = text_facts()
    assert len(facts) >= 300
    assert len({q for q, _ in facts}) == len(facts)
    assert all(len(a.split()) == 1 for _, a in facts)
    words = {w for text in vocabulary_corpus() for w in text.replace("?", " ").split()}
    assert {a for _, a in facts} <= words


# ------------------------------------------------------------------------------------------ renderer


def test_palette_matches_the_grammar():
    assert tuple(PALETTE) == COLORS


@pytest.mark.parametrize("shape", SHAPES)
def test_renders_read_back_as_their_shape_and_colour(shape):
    for k in range(150):
        rng = random.Random(k)
        color = COLORS[k % len(COLORS)]
        im = render_shape(shape, color, rng)
        assert im.size == (IMAGE_SIZE, IMAGE_SIZE) and im.mode == "RGB"
        assert infer_attributes(im) == (shape, color), (k, shape, color)


def test_render_rejects_unknown_attributes():
    with pytest.raises(ValueError, match="shape 'star' is not one of circle, rectangle, triangle"):
        render_shape("star", "red", random.Random(0))
    with pytest.raises(ValueError, match="color 'pink'"):
        render_shape("circle", "pink", random.Random(0))


# ------------------------------------------------------------------------------------------ records


def test_source_is_registered_and_sizes_hold(source):
    cfg, src = source
    assert SOURCES.get("demo") is read_demo
    assert src.name == "demo"
    splits = [r["split"] for r in src.records]
    assert splits.count("test") == 120 and splits.count("validation") == 30
    assert all(len(r["hard_images"]) == 3 for r in src.records)


def test_records_are_valid_and_ids_unique(source):
    _, src = source
    for r in src.records:
        assert validate_record(r) == [], r["id"]
        EditRecord.from_raw(r)
    assert len({r["id"] for r in src.records}) == len(src.records)


def test_targets_are_counterfactual_answers_of_the_same_type(source, test_split):
    _, src = source
    for r in src.records:
        qtype = parse(r["prompt"]).qtype
        assert r["extra"]["question_type"] == qtype
        assert r["target"] != r["pred"]
        assert r["target"] in ANSWERS[qtype] and r["pred"] in ANSWERS[qtype]
        image_id = int(r["image"].removesuffix(".png"))
        assert parse(r["prompt"]).answer(*test_split.attributes[image_id]) == r["pred"]
        assert parse(r["rephrase"]).answer(*test_split.attributes[image_id]) == r["pred"]
        assert r["rephrase"] != r["prompt"]


def test_out_environments(source, test_split):
    _, src = source
    facts = dict(text_facts())
    edit_images = {r["image"] for r in src.records}
    for r in src.records:
        assert facts[r["loc"]] == r["loc_ans"]
        m_id = int(r["m_loc"].removesuffix(".png"))
        assert r["m_loc"] not in edit_images
        assert parse(r["m_loc_q"]).answer(*test_split.attributes[m_id]) == r["m_loc_a"]
        assert r["image"] not in r["hard_images"]
        assert len(set(r["hard_images"])) == len(r["hard_images"])
        for path, answer in zip(r["hard_images"], r["hard_answers"]):
            hard_id = int(path.removesuffix(".png"))
            assert answer == r["pred"]
            assert parse(r["prompt"]).answer(*test_split.attributes[hard_id]) == r["pred"]


def test_validation_and_test_images_are_disjoint(source):
    _, src = source
    test_images = {r["image"] for r in src.records if r["split"] == "test"}
    val_images = {r["image"] for r in src.records if r["split"] == "validation"}
    assert test_images and val_images and not test_images & val_images


def test_rephrase_images_are_64px_pngs_with_the_same_content(source, test_split):
    _, src = source
    for r in src.records[:40]:
        path = f"{src.rephrase_image_root}/{r['image_rephrase']}"
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (64, 64)
            assert infer_attributes(im) == (r["extra"]["shape"], r["extra"]["color"])
        with Image.open(f"{src.image_root}/{r['image']}") as original, Image.open(path) as rerender:
            assert original.convert("RGB").tobytes() != rerender.convert("RGB").tobytes()


def test_world_is_deterministic_for_a_seed_and_changes_with_it(source, test_split):
    cfg, src = source
    again = read_demo(cfg)
    assert again.records == src.records
    assert again.rephrase_image_root == src.rephrase_image_root
    other = build_records(test_split, cfg.data.demo, seed=4)
    assert [r["id"] for r in other] != [r["id"] for r in src.records]


def test_rerender_cache_is_reused_and_rebuilt_when_incomplete(source):
    cfg, src = source
    root = Path(src.rephrase_image_root)
    first = (root / "COMPLETE.json").stat().st_mtime_ns
    assert read_demo(cfg).rephrase_image_root == str(root)
    assert (root / "COMPLETE.json").stat().st_mtime_ns == first
    os.remove(root / "5.png")
    rebuilt = read_demo(cfg)
    assert (Path(rebuilt.rephrase_image_root) / "5.png").is_file()


def test_sizes_up_to_many_edits_per_image(test_split):
    cfg = load_config(
        None, ["data.demo.num_edits=2000", "data.demo.num_validation_edits=200", "data.demo.hard_per_edit=2"]
    )
    records = build_records(test_split, cfg.data.demo, seed=0)
    assert len(records) == 2200
    assert len({r["id"] for r in records}) == 2200
    edit_images = {r["image"] for r in records}
    assert len(edit_images) == 1000 - PROBE_IMAGES
    test_images = {r["image"] for r in records if r["split"] == "test"}
    val_images = {r["image"] for r in records if r["split"] == "validation"}
    assert not test_images & val_images


def test_too_many_edits_name_the_field_and_the_limit(test_split):
    cfg = load_config(None, ["data.demo.num_edits=9000", "data.demo.num_validation_edits=0"])
    with pytest.raises(ValueError, match=r"data\.demo\.num_edits=9000: its 800 images hold only \d+"):
        build_records(test_split, cfg.data.demo, seed=0)


def test_train_edits_have_images_of_their_own_and_leave_the_test_stream_alone(test_split):
    from odedit.loading import load_config
    from pipeline.data.sources.demo import build_records

    plain = build_records(test_split, load_config(None, ["data.demo.num_edits=40"]).data.demo, 0)
    cfg = load_config(None, ["data.demo.num_edits=40", "data.demo.num_train_edits=24"])
    records = build_records(test_split, cfg.data.demo, 0)
    by_split = {s: [r for r in records if r["split"] == s] for s in ("test", "validation", "train")}
    assert len(by_split["train"]) == 24
    images = {s: {r["image"] for r in rs} for s, rs in by_split.items()}
    assert not images["train"] & (images["test"] | images["validation"])

    def same(rs):
        return [(r["id"], r["prompt"], r["target"]) for r in rs]

    assert same(by_split["test"]) == same([r for r in plain if r["split"] == "test"])

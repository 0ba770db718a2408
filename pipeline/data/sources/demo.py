"""Reader of the embedded demo world: counterfactual edits on easy-vqa test images (design.md §7).

    data.source=demo data.demo.num_edits=400 data.demo.num_validation_edits=64 seed=0

Every record is one easy-vqa test question about one image, with a counterfactual target of the same
question type (colour blue -> red, shape circle -> triangle, yes -> no) and all six environments:

    prompt / pred / target   the question, its true answer, a different valid answer (IN)
    rephrase                 a paraphrase from `pipeline.demo.questions.PARAPHRASES` (SE-text)
    image_rephrase           the same shape and colour re-rendered elsewhere on a new background (SE-image)
    loc / loc_ans            a text fact the demo model learned (OUT-text)
    m_loc / m_loc_q / _a     another test image and one of its own questions (OUT-mm)
    hard_images / _answers   the edit's question asked of `hard_per_edit` other test images that share its
                             OLD answer (OUT-hard): an edit that became a rule shows up here

Images are split three ways by a seeded shuffle: validation edit images, test edit images (disjoint), and
probe images that no edit touches, from which OUT-mm and OUT-hard are drawn (OUT-hard falls back to other
edit images only when the probes lack enough images with the old answer). At least `PROBE_IMAGES` images are
kept as probes; when there are more edits than the remaining images, images carry several edits (different
questions). Everything is a function of `cfg.data.demo` and `cfg.seed`; ids are `demo-<split>-q<index>` with
the question's index in easy-vqa's test file, so the same question keeps its id in every world.
"""

from __future__ import annotations

import math
import random
from typing import Any

from pipeline.data.sources import SOURCES
from pipeline.data.sources.base import RecordSource
from pipeline.demo.facts import text_facts
from pipeline.demo.questions import QUESTION_TYPES, paraphrase, parse
from pipeline.demo.world import WORLD_VERSION, EasyVQASplit, ensure_rerenders, load_split

PROBE_IMAGES = 200  # test images kept free of edits for OUT-mm / OUT-hard probes


def read_demo(cfg: Any) -> RecordSource:
    """The demo world's records and image roots for the whole config `cfg` (uses `cfg.data.demo`, `cfg.seed`).

    Re-rendered SE-images are written once under `.cache/demo_world/<key>/` and reused.
    """
    split = load_split("test")
    rephrase_root = ensure_rerenders(cfg.seed)
    records = build_records(split, cfg.data.demo, cfg.seed)
    return RecordSource(
        records=records,
        image_root=split.image_root,
        rephrase_image_root=str(rephrase_root),
        locality_image_root=split.image_root,
        name="demo",
    )


SOURCES.register("demo", read_demo)


def _edit_pools(
    split: EasyVQASplit, num_test: int, num_validation: int, rng: random.Random, num_train: int = 0
) -> tuple[list[int], list[int], list[int], list[int]]:
    """(validation, test, train edit images, probe images) in shuffled order; the edit pools are disjoint.

    Train edits (meta-training data of MEND) are asked of the last probe images, which never carry a test or
    validation edit; the probe pool itself is unchanged, so adding train edits changes nothing else.
    """
    images = split.image_ids()
    rng.shuffle(images)
    total = num_test + num_validation
    n_edit = min(total, len(images) - PROBE_IMAGES)
    n_val = math.ceil(n_edit * num_validation / total) if num_validation else 0
    if num_test and n_val >= n_edit:
        n_val = n_edit - 1
    probes = images[n_edit:]
    train = probes[len(probes) - min(len(probes), num_train) :] if num_train else []
    return images[:n_val], images[n_val:n_edit], train, probes


def _pick_questions(split: EasyVQASplit, images: list[int], count: int, rng: random.Random, field: str) -> list[int]:
    """`count` question indices over `images`, one per image first, then a second round, and so on.

    The n-th image's first question is of type `QUESTION_TYPES[n % 4]` where it has one, so the four types
    are about equally frequent (easy-vqa itself is 74% yes/no).
    """
    by_image = split.items_by_image()
    queues = []
    for n, image_id in enumerate(images):
        q = list(by_image[image_id])
        rng.shuffle(q)
        preferred = QUESTION_TYPES[n % len(QUESTION_TYPES)]
        q.sort(key=lambda k: split.items[k].qtype != preferred)
        queues.append(q)
    capacity = sum(len(q) for q in queues)
    if count > capacity:
        raise ValueError(
            f"data.demo.{field}={count}: its {len(images)} images hold only {capacity} easy-vqa questions; "
            f"lower data.demo.{field} (at most {capacity} with the other sizes unchanged)"
        )
    picked: list[int] = []
    depth = 0
    while len(picked) < count:
        for q in queues:
            if depth < len(q) and len(picked) < count:
                picked.append(q[depth])
        depth += 1
    return picked


def _hard_probes(
    split: EasyVQASplit, item_index: int, k: int, probes: list[int], edit_images: set[int], rng: random.Random
) -> list[int]:
    """`k` other images where the edit's question has the edit's old answer: probe images first, then (when
    the probe pool lacks enough) other edit images; never the edit's own image."""
    item = split.items[item_index]
    parsed = parse(item.question)

    def shares(image_id: int) -> bool:
        return image_id != item.image_id and parsed.answer(*split.attributes[image_id]) == item.answer

    first = [i for i in probes if shares(i)]
    if len(first) >= k:
        return rng.sample(first, k)
    rest = [i for i in sorted(edit_images) if shares(i)]
    return first + rng.sample(rest, min(k - len(first), len(rest)))


def build_records(split: EasyVQASplit, demo: Any, seed: int) -> list[dict]:
    """The raw edit records of the world (test records first, then validation), deterministic in `seed`.

    Args:
        split: the easy-vqa test split (`load_split("test")`).
        demo: a `DemoWorldConfig` (num_edits, num_validation_edits, hard_per_edit).
        seed: the world's seed.
    """
    rng = random.Random(f"demo-world:{WORLD_VERSION}:{seed}")
    num_train = getattr(demo, "num_train_edits", 0)
    val_images, test_images, train_images, probes = _edit_pools(
        split, demo.num_edits, demo.num_validation_edits, rng, num_train
    )
    chosen = {
        "test": _pick_questions(split, test_images, demo.num_edits, rng, "num_edits"),
        "validation": _pick_questions(split, val_images, demo.num_validation_edits, rng, "num_validation_edits"),
    }
    if num_train:  # its own generator: the test and validation worlds do not depend on num_train_edits
        chosen["train"] = _pick_questions(
            split, train_images, num_train, random.Random(f"demo-train:{seed}"), "num_train_edits"
        )
    edit_images = set(val_images) | set(test_images) | set(train_images)
    by_image = split.items_by_image()
    facts = text_facts()
    records: list[dict] = []
    for name in chosen:
        for index in chosen[name]:
            item = split.items[index]
            parsed = parse(item.question)
            loc_q, loc_a = rng.choice(facts)
            m_image = rng.choice(probes)
            m_item = split.items[rng.choice(by_image[m_image])]
            hard = _hard_probes(split, index, demo.hard_per_edit, probes, edit_images, rng)
            shape, color = split.attributes[item.image_id]
            records.append(
                {
                    "id": f"demo-{name}-q{index:05d}",
                    "prompt": item.question,
                    "target": rng.choice(parsed.alternatives(item.answer)),
                    "pred": item.answer,
                    "image": split.image_file(item.image_id),
                    "rephrase": paraphrase(item.question, rng),
                    "image_rephrase": split.image_file(item.image_id),
                    "loc": loc_q,
                    "loc_ans": loc_a,
                    "m_loc": split.image_file(m_image),
                    "m_loc_q": m_item.question,
                    "m_loc_a": m_item.answer,
                    "hard_images": [split.image_file(i) for i in hard],
                    "hard_answers": [item.answer] * len(hard),
                    "task": "vqa",
                    "source": "demo",
                    "split": name,
                    "extra": {"question_type": parsed.qtype, "image_id": item.image_id, "shape": shape, "color": color},
                }
            )
    return records

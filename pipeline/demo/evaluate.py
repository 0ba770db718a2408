"""Measure the demo model with the project's metric code: exact-match teacher-forced accuracy.

    report = evaluate_demo_model(adapter, seed=0)

Every number is `odedit.metrics.token_accuracy(..., exact_match=True)` on `adapter.run(samples)` outputs, in
batches: the same path the editing metrics take. Four sets, all held out from training except the facts:

    vqa_accuracy        the whole easy-vqa test set (9,673 questions) on its own images, and by question type
    paraphrase_accuracy the same questions in a paraphrased form (SE-text), on the same images
    rerender_accuracy   the same questions on the SE-image re-render of each image (M-Gen's inputs)
    text_accuracy       the text facts, without an image (OUT-text: these are learned, locality needs them)

Two image-blind baselines come with them: `answer_prior_by_type`, always giving a type's most frequent test
answer, and `question_prior_by_type`, giving each question text its most frequent training answer (the
stronger one: for yes/no questions the form alone is right 70-90% of the time).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Sequence

import torch
from PIL import Image

from odedit.metrics import token_accuracy
from odedit.models.base import ModelAdapter, Sample
from pipeline.demo.facts import text_facts
from pipeline.demo.questions import QUESTION_TYPES, paraphrase
from pipeline.demo.world import EasyVQASplit, ensure_rerenders, load_split


@torch.no_grad()
def exact_match(adapter: ModelAdapter, samples: Sequence[Sample], batch_size: int = 256) -> torch.Tensor:
    """(N,) 1.0 where every target token is the argmax prediction (teacher-forced), else 0.0."""
    scores = []
    adapter.model.eval()
    for start in range(0, len(samples), batch_size):
        out = adapter.run(list(samples[start : start + batch_size]))
        scores.append(token_accuracy(out, exact_match=True))
    return torch.cat(scores) if scores else torch.zeros(0)


def _by_type(scores: torch.Tensor, types: Sequence[str]) -> dict[str, float]:
    return {t: float(scores[[k for k, x in enumerate(types) if x == t]].mean()) for t in QUESTION_TYPES if t in types}


def answer_prior_by_type(split: EasyVQASplit) -> dict[str, float]:
    """Per question type, the share of its most frequent answer in `split`."""
    counts: dict[str, Counter] = {t: Counter() for t in QUESTION_TYPES}
    for item in split.items:
        counts[item.qtype][item.answer] += 1
    return {t: c.most_common(1)[0][1] / sum(c.values()) for t, c in counts.items() if c}


def question_prior_by_type(train: EasyVQASplit, test: EasyVQASplit) -> dict[str, float]:
    """Per question type, the test accuracy of answering each question text with its most frequent training
    answer: the best a model can do without looking at the image ("is there a red shape?" -> "no" is right
    7 times in 8)."""
    answers: dict[str, Counter] = {}
    for item in train.items:
        answers.setdefault(item.question, Counter())[item.answer] += 1
    hits: dict[str, list[float]] = {t: [] for t in QUESTION_TYPES}
    for item in test.items:
        seen = answers.get(item.question)
        hits[item.qtype].append(float(bool(seen) and seen.most_common(1)[0][0] == item.answer))
    return {t: sum(h) / len(h) for t, h in hits.items() if h}


def evaluate_demo_model(
    adapter: ModelAdapter, seed: int, cache_root: str | os.PathLike | None = None, batch_size: int = 256, limit: int = 0
) -> dict:
    """The demo model's accuracies on the four sets above (see the module docstring).

    Args:
        limit: score a seeded sample of this many test questions instead of all 9,673 (0 = all); for tests.
    """
    split = load_split("test")
    items = list(split.items)
    if limit and limit < len(items):
        items = random.Random(f"demo-eval-sample:{seed}").sample(items, limit)
    rerender_root = ensure_rerenders(seed, cache_root)
    needed = sorted({it.image_id for it in items})
    images = {i: split.load_image(i) for i in needed}
    rerenders = {}
    for i in needed:
        with Image.open(rerender_root / split.image_file(i)) as im:
            rerenders[i] = im.convert("RGB")
    types = [item.qtype for item in items]
    rng = random.Random(f"demo-eval-paraphrase:{seed}")
    sets = {
        "vqa": [Sample(it.question, it.answer, images[it.image_id]) for it in items],
        "paraphrase": [Sample(paraphrase(it.question, rng), it.answer, images[it.image_id]) for it in items],
        "rerender": [Sample(it.question, it.answer, rerenders[it.image_id]) for it in items],
    }
    report: dict = {}
    for name, samples in sets.items():
        scores = exact_match(adapter, samples, batch_size)
        report[f"{name}_accuracy"] = float(scores.mean())
        report[f"{name}_accuracy_by_type"] = _by_type(scores, types)
        report[f"{name}_questions"] = len(samples)
    facts = text_facts()
    fact_scores = exact_match(adapter, [Sample(q, a, None) for q, a in facts], batch_size)
    report["text_accuracy"] = float(fact_scores.mean())
    report["text_facts"] = len(facts)
    report["answer_prior_by_type"] = answer_prior_by_type(split)
    report["question_prior_by_type"] = question_prior_by_type(load_split("train"), split)
    report["metric"] = "odedit.metrics.token_accuracy(exact_match=True), teacher-forced, answer tokens without EOS"
    return report

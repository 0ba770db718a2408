"""The question grammar of the easy-vqa demo world: parse, answer from image attributes, paraphrase.

easy-vqa asks 24 question forms about one coloured shape per image (3 shapes, 8 colours). Each form is a
template over one slot (a shape or a colour name) and falls into one of four types:

    color         "what color is the {shape}?", "what color is the shape?"        -> a colour
    color_yes_no  "is there a {color} shape?", "is no {color} shape present?"      -> yes / no
    shape         "what is the {color} shape?", "what shape is present?"         -> a shape
    shape_yes_no  "does the image contain a {shape}?", "is there not a {shape}?"   -> yes / no

`parse` turns any question of the grammar, easy-vqa's own forms and our paraphrases alike, into a
`ParsedQuestion`; `answer` computes its answer from an image's (shape, colour), which lets the world find other
images that share an edit's old answer (OUT-hard); `PARAPHRASES` are the SE-text forms, written for this
project (none is an easy-vqa form), grouped by the same keys so a paraphrase keeps the meaning exactly.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "gray", "red", "green", "blue", "yellow", "teal", "brown")
QUESTION_TYPES = ("color", "color_yes_no", "shape", "shape_yes_no")
YES_NO = ("yes", "no")

# Template key: (question type, variant). Variants: "free" / "slot" for open questions (slot: the question
# names the other attribute, e.g. "what color is the circle?"), "pos" / "neg" for yes/no questions.
Key = tuple[str, str]

EASY_VQA_FORMS: dict[Key, tuple[str, ...]] = {
    ("shape", "free"): ("what shape is in the image?", "what shape is present?", "what shape does the image contain?"),
    ("shape", "slot"): ("what is the {color} shape?",),
    ("color", "free"): ("what color is the shape?", "what is the color of the shape?"),
    ("color", "slot"): ("what color is the {shape}?", "what is the color of the {shape}?"),
    ("shape_yes_no", "pos"): (
        "is there a {shape}?",
        "is there a {shape} in the image?",
        "does the image contain a {shape}?",
        "is a {shape} present?",
    ),
    ("shape_yes_no", "neg"): (
        "is there not a {shape}?",
        "is there not a {shape} in the image?",
        "does the image not contain a {shape}?",
        "is no {shape} present?",
    ),
    ("color_yes_no", "pos"): (
        "is there a {color} shape?",
        "is there a {color} shape in the image?",
        "does the image contain a {color} shape?",
        "is a {color} shape present?",
    ),
    ("color_yes_no", "neg"): (
        "is there not a {color} shape?",
        "is there not a {color} shape in the image?",
        "does the image not contain a {color} shape?",
        "is no {color} shape present?",
    ),
}

PARAPHRASES: dict[Key, tuple[str, ...]] = {
    ("shape", "free"): (
        "which shape can you see in the picture?",
        "what kind of shape is drawn?",
        "which shape is shown in the picture?",
    ),
    ("shape", "slot"): ("which shape is {color}?", "what kind of shape is drawn in {color}?"),
    ("color", "free"): (
        "which color does the shape have?",
        "in which color is the shape drawn?",
        "what color does the drawn shape have?",
    ),
    ("color", "slot"): ("which color does the {shape} have?", "in which color is the {shape} drawn?"),
    ("shape_yes_no", "pos"): (
        "can you see a {shape}?",
        "does the picture show a {shape}?",
        "is a {shape} drawn in the picture?",
    ),
    ("shape_yes_no", "neg"): (
        "does the picture lack a {shape}?",
        "is the picture without a {shape}?",
        "is a {shape} missing from the picture?",
    ),
    ("color_yes_no", "pos"): (
        "can you see a {color} shape?",
        "does the picture show a {color} shape?",
        "is a {color} shape drawn in the picture?",
    ),
    ("color_yes_no", "neg"): (
        "does the picture lack a {color} shape?",
        "is the picture without a {color} shape?",
        "is a {color} shape missing from the picture?",
    ),
}


@dataclass(frozen=True)
class ParsedQuestion:
    """A question of the grammar: its type, template variant and slot value (a shape, a colour or None)."""

    qtype: str
    variant: str
    slot: str | None

    @property
    def key(self) -> Key:
        return (self.qtype, self.variant)

    def answer(self, shape: str, color: str) -> str | None:
        """The answer for an image holding a `color` `shape`; None when the question does not apply to it
        (it presupposes another shape or colour, e.g. "what color is the circle?" of a triangle)."""
        if self.qtype == "color":
            return color if self.slot in (None, shape) else None
        if self.qtype == "shape":
            return shape if self.slot in (None, color) else None
        present = self.slot == (shape if self.qtype == "shape_yes_no" else color)
        return "yes" if present != (self.variant == "neg") else "no"

    def render(self, template: str) -> str:
        return template.format(shape=self.slot, color=self.slot) if self.slot else template

    def alternatives(self, answer: str) -> list[str]:
        """The other valid answers of this question's type (counterfactual targets)."""
        pool = COLORS if self.qtype == "color" else SHAPES if self.qtype == "shape" else YES_NO
        if answer not in pool:
            raise ValueError(f"answer {answer!r} is not a valid {self.qtype} answer; valid: {', '.join(pool)}")
        return [a for a in pool if a != answer]


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template)
    pattern = pattern.replace(re.escape("{shape}"), f"(?P<slot>{'|'.join(SHAPES)})")
    pattern = pattern.replace(re.escape("{color}"), f"(?P<slot>{'|'.join(COLORS)})")
    return re.compile(f"^{pattern}$")


_PATTERNS: list[tuple[re.Pattern, Key]] = [
    (_compile(t), key) for forms in (EASY_VQA_FORMS, PARAPHRASES) for key, ts in forms.items() for t in ts
]


@functools.lru_cache(maxsize=4096)
def parse(question: str) -> ParsedQuestion:
    """Parse an easy-vqa question or one of our paraphrases (cached: the grammar has a few hundred texts).

    Raises:
        ValueError: the text is not a form of the grammar (the message lists the forms).
    """
    text = " ".join(question.strip().lower().split())
    for pattern, (qtype, variant) in _PATTERNS:
        m = pattern.match(text)
        if m:
            return ParsedQuestion(qtype, variant, m.groupdict().get("slot"))
    forms = "; ".join(t for ts in EASY_VQA_FORMS.values() for t in ts)
    raise ValueError(f"question {question!r} is not a demo-world question; known easy-vqa forms: {forms}")


def paraphrase(question: str, rng: random.Random) -> str:
    """A paraphrase of `question` with the same meaning and answer, drawn with `rng` (SE-text)."""
    parsed = parse(question)
    return parsed.render(rng.choice(PARAPHRASES[parsed.key]))


def all_paraphrases(question: str) -> list[str]:
    """Every paraphrase of `question` (for vocabularies and tests)."""
    parsed = parse(question)
    return [parsed.render(t) for t in PARAPHRASES[parsed.key]]


def all_question_texts() -> list[str]:
    """Every question the grammar can produce, easy-vqa forms and paraphrases, for every slot value."""
    out: list[str] = []
    for forms in (EASY_VQA_FORMS, PARAPHRASES):
        for ts in forms.values():
            for t in ts:
                if "{shape}" in t:
                    out += [t.format(shape=s) for s in SHAPES]
                elif "{color}" in t:
                    out += [t.format(color=c) for c in COLORS]
                else:
                    out.append(t)
    return out

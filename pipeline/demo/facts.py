"""Text-only facts of the demo world: what the demo model knows without an image (OUT-text, T-Loc).

A few hundred single-word-answer questions whose vocabulary overlaps the image world on purpose (colours,
shapes, yes/no), so an edit that spills from "this shape is blue -> red" into the language model's general
knowledge ("what color is the sky?", "is blue a color?") shows up as a T-Loc loss. Every fact here is in the
demo model's training set: locality measures whether an edit *keeps* knowledge, which needs a model that has
it. Built from fixed tables, no randomness, so the set is the same on every machine.
"""

from __future__ import annotations

from pipeline.demo.questions import COLORS, SHAPES

# thing -> its colour (answers may be colours outside the easy-vqa palette, e.g. "white").
_THING_COLORS = (
    ("grass", "green"),
    ("the sky", "blue"),
    ("snow", "white"),
    ("coal", "black"),
    ("a banana", "yellow"),
    ("a tomato", "red"),
    ("blood", "red"),
    ("a lemon", "yellow"),
    ("a cherry", "red"),
    ("chocolate", "brown"),
    ("coffee", "brown"),
    ("soil", "brown"),
    ("tree bark", "brown"),
    ("the night sky", "black"),
    ("a crow", "black"),
    ("ash", "gray"),
    ("an elephant", "gray"),
    ("a mouse", "gray"),
    ("a cloud", "white"),
    ("milk", "white"),
    ("salt", "white"),
    ("sugar", "white"),
    ("the sun", "yellow"),
    ("corn", "yellow"),
    ("a leaf", "green"),
    ("a frog", "green"),
    ("a lime", "green"),
    ("a pea", "green"),
    ("the ocean", "blue"),
    ("the sea", "blue"),
    ("a sapphire", "blue"),
    ("a ruby", "red"),
    ("an emerald", "green"),
    ("fire", "red"),
    ("a rose", "red"),
    ("a pumpkin", "orange"),
    ("a carrot", "orange"),
    ("a grape", "purple"),
    ("a plum", "purple"),
    ("a flamingo", "pink"),
    ("a pig", "pink"),
    ("a wolf", "gray"),
    ("steel", "gray"),
    ("a bear", "brown"),
    ("wood", "brown"),
    ("ink", "black"),
    ("tar", "black"),
    ("a tire", "black"),
    ("an olive", "green"),
    ("spinach", "green"),
    ("broccoli", "green"),
    ("a cucumber", "green"),
    ("a canary", "yellow"),
    ("butter", "yellow"),
    ("gold", "yellow"),
    ("a lobster", "red"),
    ("a strawberry", "red"),
    ("a polar bear", "white"),
    ("a panther", "black"),
    ("a blueberry", "blue"),
)

# thing -> the easy-vqa shape it has.
_THING_SHAPES = (
    ("a wheel", "circle"),
    ("a coin", "circle"),
    ("a plate", "circle"),
    ("a ring", "circle"),
    ("a clock", "circle"),
    ("the full moon", "circle"),
    ("a door", "rectangle"),
    ("a book", "rectangle"),
    ("a window", "rectangle"),
    ("a brick", "rectangle"),
    ("a phone", "rectangle"),
    ("a flag", "rectangle"),
    ("a tent", "triangle"),
    ("a pyramid", "triangle"),
    ("a roof", "triangle"),
    ("a sail", "triangle"),
    ("a slice of pizza", "triangle"),
    ("a yield sign", "triangle"),
)

_SIDES = (
    ("triangle", "three"),
    ("rectangle", "four"),
    ("square", "four"),
    ("pentagon", "five"),
    ("hexagon", "six"),
    ("octagon", "eight"),
)

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

_OPPOSITES = (
    ("yes", "no"),
    ("no", "yes"),
    ("big", "small"),
    ("small", "big"),
    ("hot", "cold"),
    ("cold", "hot"),
    ("up", "down"),
    ("down", "up"),
    ("left", "right"),
    ("right", "left"),
    ("day", "night"),
    ("night", "day"),
    ("black", "white"),
    ("white", "black"),
    ("old", "new"),
    ("new", "old"),
    ("fast", "slow"),
    ("slow", "fast"),
    ("open", "closed"),
    ("wet", "dry"),
)

_SOUNDS = (
    ("moo", "cow"),
    ("woof", "dog"),
    ("meow", "cat"),
    ("quack", "duck"),
    ("oink", "pig"),
    ("baa", "sheep"),
    ("neigh", "horse"),
    ("hoot", "owl"),
    ("roar", "lion"),
    ("buzz", "bee"),
)


def text_facts() -> list[tuple[str, str]]:
    """All (question, answer) text facts, each question unique, each answer a single word."""
    facts: list[tuple[str, str]] = []
    for i, (thing, color) in enumerate(_THING_COLORS):
        facts.append((f"what color is {thing}?", color))
        facts.append((f"what is the color of {thing}?", color))
        wrong = COLORS[i % len(COLORS)] if COLORS[i % len(COLORS)] != color else COLORS[(i + 1) % len(COLORS)]
        facts.append((f"is {thing} {color}?", "yes"))
        facts.append((f"is {thing} {wrong}?", "no"))
    for thing, shape in _THING_SHAPES:
        facts.append((f"what shape is {thing}?", shape))
        facts.append((f"is {thing} round?", "yes" if shape == "circle" else "no"))
    for shape, sides in _SIDES:
        facts.append((f"how many sides does a {shape} have?", sides))
        facts.append((f"how many corners does a {shape} have?", sides))
    facts.append(("how many sides does a circle have?", "zero"))
    for word in COLORS:
        facts.append((f"is {word} a color?", "yes"))
        facts.append((f"is {word} a shape?", "no"))
    for word in SHAPES:
        facts.append((f"is {word} a shape?", "yes"))
        facts.append((f"is {word} a color?", "no"))
    for i in range(1, 10):
        facts.append((f"what number comes after {_NUMBERS[i]}?", _NUMBERS[i + 1]))
        facts.append((f"what number comes before {_NUMBERS[i]}?", _NUMBERS[i - 1]))
    for a in range(1, 10):
        for b in range(1, 11 - a):
            facts.append((f"what is {_NUMBERS[a]} plus {_NUMBERS[b]}?", _NUMBERS[a + b]))
    for word, opposite in _OPPOSITES:
        facts.append((f"what is the opposite of {word}?", opposite))
    for sound, animal in _SOUNDS:
        facts.append((f"which animal says {sound}?", animal))
    return facts

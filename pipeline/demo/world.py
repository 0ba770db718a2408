"""The easy-vqa demo world (design.md §7): its images, questions, image attributes and cached re-renders.

    test = load_split("test")                 # 1,000 images, 9,673 questions, (shape, colour) per image
    root = ensure_rerenders(seed=0)           # .cache/demo_world/<key>/: one SE-image re-render per test image

easy-vqa (PyPI, MIT) ships 64 x 64 PNGs of one coloured shape and (question, answer, image id) triples. Every
image's (shape, colour) is read from its pixels (`pipeline.demo.render.infer_attributes`) and checked against
*all* its questions through the grammar of `pipeline.demo.questions`, so a world built on a changed data set
fails loudly instead of producing wrong OUT-hard probes. This module also holds what the demo model and the
record reader share: the prompt template, the training labels of the auxiliary head, and the vocabulary.
"""

from __future__ import annotations

import functools
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.demo.facts import text_facts
from pipeline.demo.questions import COLORS, SHAPES, all_question_texts, parse
from pipeline.demo.render import infer_attributes, render_shape
from pipeline.storage.cache import cache_dir, content_key, ensure_dir

# The demo model is trained with, and must be run with, this template (model.prompt_template of the demo).
DEMO_PROMPT_TEMPLATE = "Question: <image> {} Answer:"
# Bump when the world's content changes (question grammar, renderer, attribute reading, record building).
WORLD_VERSION = "1"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class VQAItem:
    """One easy-vqa question about one image."""

    question: str
    answer: str
    image_id: int

    @property
    def qtype(self) -> str:
        return parse(self.question).qtype


@dataclass(frozen=True)
class EasyVQASplit:
    """One easy-vqa split: its questions, its image directory and every image's (shape, colour)."""

    name: str
    image_root: str
    items: tuple[VQAItem, ...]
    attributes: dict[int, tuple[str, str]]

    @staticmethod
    def image_file(image_id: int) -> str:
        """The image's path relative to `image_root` (records store relative paths)."""
        return f"{image_id}.png"

    def image_path(self, image_id: int) -> str:
        return os.path.join(self.image_root, self.image_file(image_id))

    def load_image(self, image_id: int) -> Image.Image:
        with Image.open(self.image_path(image_id)) as im:
            return im.convert("RGB")

    def image_ids(self) -> list[int]:
        return sorted(self.attributes)

    def items_by_image(self) -> dict[int, list[int]]:
        """image id -> indices into `items` of that image's questions, in file order."""
        out: dict[int, list[int]] = {i: [] for i in self.attributes}
        for k, item in enumerate(self.items):
            out[item.image_id].append(k)
        return out


def _easy_vqa():
    try:
        import easy_vqa
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the demo world needs the easy-vqa data set: pip install easy-vqa (or pip install -e '.[demo]')"
        ) from None
    return easy_vqa


@functools.lru_cache(maxsize=2)
def load_split(name: str, check: bool = True) -> EasyVQASplit:
    """Load an easy-vqa split with every image's attributes (cached per process).

    Args:
        name: "train" or "test".
        check: verify every question's answer against the image's pixel-read attributes.

    Raises:
        ValueError: unknown split, or an image whose pixels contradict one of its questions.
    """
    if name not in SPLITS:
        raise ValueError(f"easy-vqa split {name!r} does not exist; use one of {', '.join(SPLITS)}")
    ev = _easy_vqa()
    texts, answers, image_ids = getattr(ev, f"get_{name}_questions")()
    paths = getattr(ev, f"get_{name}_image_paths")()
    roots = {os.path.dirname(p) for p in paths.values()}
    if len(roots) != 1:
        raise ValueError(f"easy-vqa {name} images are spread over {sorted(roots)}; expected one directory")
    items = tuple(VQAItem(q, a, int(i)) for q, a, i in zip(texts, answers, image_ids))
    attributes: dict[int, tuple[str, str]] = {}
    for image_id, path in paths.items():
        with Image.open(path) as im:
            attributes[int(image_id)] = infer_attributes(im)
    split = EasyVQASplit(name, roots.pop(), items, attributes)
    if check:
        for item in items:
            if item.image_id not in attributes:
                raise ValueError(
                    f"easy-vqa {name}: question {item.question!r} names image {item.image_id}, "
                    "which is not in the image directory; reinstall easy-vqa"
                )
            got = parse(item.question).answer(*attributes[item.image_id])
            if got != item.answer:
                raise ValueError(
                    f"easy-vqa {name} image {item.image_id}: pixels read as {attributes[item.image_id]} give "
                    f"{got!r} to {item.question!r}, but the data set says {item.answer!r}; the installed "
                    "easy-vqa differs from the one this world was built for (bump WORLD_VERSION after checking)"
                )
    return split


def labels_from_questions(qas: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """(shape, colour) implied by an image's own questions and answers, None where they leave it open.

    Every (shape, colour) pair consistent with all answers is kept; a label is known when all remaining
    pairs agree on it (e.g. "what is the red shape?" -> "circle" fixes both; three "no"s to "is there a
    circle/rectangle?" leave the triangle). This is how the demo model's auxiliary head gets its labels
    (design.md §7): from the training questions only, never from pixels.
    """
    candidates = [(s, c) for s in SHAPES for c in COLORS]
    for question, answer in qas:
        parsed = parse(question)
        candidates = [(s, c) for s, c in candidates if parsed.answer(s, c) == answer]
    shapes = {s for s, _ in candidates}
    colors = {c for _, c in candidates}
    return (shapes.pop() if len(shapes) == 1 else None, colors.pop() if len(colors) == 1 else None)


def rerender_image(split: EasyVQASplit, image_id: int, seed: int) -> Image.Image:
    """The SE-image re-render of one image: same shape and colour, new position, size and background."""
    shape, color = split.attributes[image_id]
    return render_shape(shape, color, random.Random(f"rerender:{split.name}:{seed}:{image_id}"))


def ensure_rerenders(seed: int, cache_root: str | os.PathLike | None = None) -> Path:
    """Directory holding `<id>.png`, the re-render of every easy-vqa test image (built once per seed).

    The key covers everything the files depend on (seed and WORLD_VERSION), not the world's sizes: every
    world of one seed shares the re-renders, and the demo model's M-Gen check uses the same files.
    """
    key = content_key({"kind": "rerenders", "split": "test", "seed": seed, "version": WORLD_VERSION})

    def build(tmp: Path) -> dict:
        split = load_split("test")
        for image_id in split.image_ids():
            rerender_image(split, image_id, seed).save(tmp / split.image_file(image_id), format="PNG")
        return {"seed": seed, "version": WORLD_VERSION, "images": len(split.attributes)}

    path, _, _ = ensure_dir(cache_dir("demo_world", key, cache_root), build)
    return path


def vocabulary_corpus() -> list[str]:
    """Texts whose words form the demo model's vocabulary: the template, every question form of the grammar
    (easy-vqa's and the paraphrases), every answer and every text fact."""
    corpus = [DEMO_PROMPT_TEMPLATE.replace("<image>", " ").replace("{}", " ")]
    corpus += all_question_texts()
    corpus += [" ".join(SHAPES), " ".join(COLORS), "yes no"]
    corpus += [f"{q} {a}" for q, a in text_facts()]
    return corpus

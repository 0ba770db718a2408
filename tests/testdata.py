"""Test data helpers shared by test modules (import with `from testdata import ...`; a module named
`conftest` is ambiguous once several test folders have one)."""

from __future__ import annotations

FAMILIES = ("llava", "blip2_opt", "instructblip", "minigpt4", "qwen2_vl")


def make_image(color=(255, 0, 0), size=64, seed=0):
    """A small RGB test image: a coloured square on a noisy background."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    a[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = color
    return Image.fromarray(a)


def step_cases() -> list:
    """Two edit cases with every environment ODEdit reads (IN, SE text/image, OUT text/image), OUT text of
    different sizes per case."""
    from odedit.envs import EditCase
    from odedit.models import Sample

    return [
        EditCase(
            f"e{i}",
            {
                "in": [Sample(q, t, make_image((200, 30, 30), seed=i))],
                "se_text": [Sample(r, t, make_image((200, 30, 30), seed=i))],
                "se_image": [Sample(q, t, make_image((200, 30, 30), seed=9 + i))],
                "out_text": [
                    Sample("which city is the capital of france ?", "paris"),
                    Sample("what is two plus two ?", "four"),
                ][: i + 1],
                "out_mm": [Sample("is there a circle ?", "yes", make_image((30, 200, 30), seed=20 + i))],
            },
        )
        for i, (q, r, t) in enumerate(
            (
                ("what color is the shape ?", "what is the color of the shape ?", "blue"),
                ("does the image contain a triangle ?", "is there a triangle ?", "green"),
            )
        )
    ]

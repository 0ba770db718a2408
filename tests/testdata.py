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
    a[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = color
    return Image.fromarray(a)

"""Draw and read easy-vqa-style images: one coloured shape on a pale background, 64 x 64 RGB.

`render_shape` is this project's own renderer in easy-vqa's style (its palette, a pale random background with
each channel in 230-255, shapes from 1/8 to 1/2 of the image, upright triangles, drawn at twice the size and
bilinearly downsampled for soft edges). The demo world uses it for SE-image rows: the *same* content as an
edit image (same shape and colour) at a new position and size on a new background, a stand-in for MMEdit's
diffusion-model image rephrases.

`infer_attributes` reads (shape, colour) back from any such image by pixels alone: the colour is the palette
colour most pixels match exactly; the shape is told by how much of its bounding box the shape fills
(rectangle ~1.0, circle ~pi/4, triangle ~1/2). The world cross-checks it against every easy-vqa question.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from pipeline.demo.questions import COLORS, SHAPES

PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
}

IMAGE_SIZE = 64
DRAW_SCALE = 2  # draw at 2x, then downsample: PIL's draw primitives do not anti-alias
_DRAW = IMAGE_SIZE * DRAW_SCALE
_MIN_SIDE, _MAX_SIDE = _DRAW // 8, _DRAW // 2
# Bounding-box fill ratio thresholds between triangle (~0.5), circle (~0.785) and rectangle (~1.0).
_TRIANGLE_MAX_FILL, _CIRCLE_MAX_FILL = 0.725, 0.94


def render_shape(shape: str, color: str, rng: random.Random) -> Image.Image:
    """A new 64 x 64 RGB image of one `color` `shape`; position, size and background are drawn from `rng`.

    Raises:
        ValueError: unknown shape or colour (the message lists the valid ones).
    """
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r} is not one of {', '.join(SHAPES)}")
    if color not in PALETTE:
        raise ValueError(f"color {color!r} is not one of {', '.join(PALETTE)}")
    background = tuple(rng.randint(230, 255) for _ in range(3))
    im = Image.new("RGB", (_DRAW, _DRAW), background)
    draw = ImageDraw.Draw(im)
    fill = PALETTE[color]
    if shape == "rectangle":
        w, h = rng.randint(_MIN_SIDE, _MAX_SIDE), rng.randint(_MIN_SIDE, _MAX_SIDE)
        x, y = rng.randint(0, _DRAW - w), rng.randint(0, _DRAW - h)
        draw.rectangle([(x, y), (x + w, y + h)], fill=fill)
    elif shape == "circle":
        d = rng.randint(_MIN_SIDE, _MAX_SIDE)
        x, y = rng.randint(0, _DRAW - d), rng.randint(0, _DRAW - d)
        draw.ellipse([(x, y), (x + d, y + d)], fill=fill)
    else:  # upright equilateral triangle on a horizontal base
        s = rng.randint(_MIN_SIDE, _MAX_SIDE)
        x, y = rng.randint(0, _DRAW - s), rng.randint(int(s * math.sqrt(3) / 2), _DRAW - 1)
        draw.polygon([(x, y), (x + s, y), (x + s / 2, y - s * math.sqrt(3) / 2)], fill=fill)
    return im.resize((IMAGE_SIZE, IMAGE_SIZE), resample=Image.BILINEAR)


def infer_attributes(image: Image.Image) -> tuple[str, str]:
    """(shape, colour) of an easy-vqa-style image, read from its pixels.

    Raises:
        ValueError: no pixel has a palette colour (not an easy-vqa-style image).
    """
    a = np.asarray(image.convert("RGB"), dtype=np.int16).reshape(-1, 3)
    pal = np.array(list(PALETTE.values()), dtype=np.int16)
    exact = (a[:, None, :] == pal[None]).all(-1)  # (pixels, colours)
    counts = exact.sum(0)
    if counts.max() == 0:
        raise ValueError("image has no pixel of the easy-vqa palette; expected one coloured shape on a pale background")
    ci = int(counts.argmax())
    color = COLORS[ci]
    packed = (a[:, 0].astype(np.int32) << 16) | (a[:, 1].astype(np.int32) << 8) | a[:, 2].astype(np.int32)
    values, freq = np.unique(packed, return_counts=True)
    bg = int(values[freq.argmax()])
    background = np.array([bg >> 16, (bg >> 8) & 255, bg & 255], dtype=np.float32)
    # Coverage of each pixel by the shape (anti-aliased edges are partial), then area / (width * height) with
    # width and height measured in coverage too, so small shapes are measured to a fraction of a pixel.
    direction = pal[ci].astype(np.float32) - background
    alpha = np.clip((a.astype(np.float32) - background) @ direction / float(direction @ direction), 0.0, 1.0)
    alpha = alpha.reshape(image.size[1], image.size[0])
    ratio = alpha.sum() / (alpha.sum(1).max() * alpha.sum(0).max())
    shape = "triangle" if ratio < _TRIANGLE_MAX_FILL else "circle" if ratio < _CIRCLE_MAX_FILL else "rectangle"
    return shape, color

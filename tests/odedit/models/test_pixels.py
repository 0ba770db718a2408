"""Batched pixel preprocessing (`odedit.models.pixels`) gives exactly the image processor's pixel_values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from testdata import make_image

from odedit.models.pixels import BatchedPixels, read_plan


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    odd = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 80), (81, 33), (32, 32))]
    return [make_image(seed=1), make_image((0, 200, 0), size=96, seed=2), *odd, make_image(seed=3)]


@pytest.mark.parametrize("family", ["llava", "blip2_opt", "minigpt4"])
def test_batched_pixels_equal_the_processor_bit_for_bit(family, tiny_adapter):
    adapter = tiny_adapter(family)
    processor = adapter.image_processor
    assert read_plan(processor) is not None, f"{type(processor).__name__} should take the batched path"
    images = [im.convert("RGB") for im in _images()]
    pixels = BatchedPixels(processor)
    reference = processor(images=images, return_tensors="pt")["pixel_values"]
    out = pixels(images)
    assert out.dtype == reference.dtype and torch.equal(out, reference)
    assert all(pixels.verified.values()) and len(pixels.verified) == 5  # one check per (mode, size)
    assert torch.equal(pixels(images[:2]), reference[:2])  # verified kinds are not re-checked
    # The adapter's encode goes through it.
    assert torch.equal(adapter.pixel_values(images), reference)


def test_settings_it_does_not_model_use_the_processor(tiny_adapter):
    processor = tiny_adapter("llava").image_processor
    processor.do_pad = True
    assert read_plan(processor) is None
    images = [im.convert("RGB") for im in _images()[:2]]
    assert torch.equal(BatchedPixels(processor)(images), processor(images=images, return_tensors="pt")["pixel_values"])


def test_a_mismatch_sends_that_kind_of_image_to_the_processor(tiny_adapter, caplog):
    processor = tiny_adapter("llava").image_processor
    pixels = BatchedPixels(processor)
    pixels.plan = type(pixels.plan)(**{**pixels.plan.__dict__, "scale": 1 / 256})  # a wrong rescale factor
    images = [im.convert("RGB") for im in _images()[:2]]
    with caplog.at_level("WARNING"):
        out = pixels(images)
    assert torch.equal(out, processor(images=images, return_tensors="pt")["pixel_values"])
    assert not any(pixels.verified.values()) and "differs" in caplog.text

"""Batched pixel preprocessing: one vectorised pass over a step's images, bit-identical to the image processor.

transformers' PIL image processors (CLIP's for LLaVA, BLIP's for BLIP-2 and MiniGPT-4) work image by image:
to numpy, back to PIL for the resize, to numpy, then crop, rescale and normalise with a dozen Python calls
each. For a 16-edit step's ~50 images that was ~9 ms of a ~90 ms step on the demo model. `BatchedPixels` does
the same operations once for the whole batch: the same PIL resize per image (the only per-image step), then
one stacked crop, rescale (float64 product, cast to float32, as transformers does) and normalisation (float32).

It never trusts that it matches: the first time it meets an image of a given (mode, size) it processes that
image both ways and compares bit for bit; a processor configuration it does not model, or any mismatch, sends
that kind of image (or every image) through the processor itself, with one warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Plan:
    """The processor's settings, read once: resize target, crop, rescale factor, mean and std."""

    shortest_edge: int | None
    height: int | None
    width: int | None
    resample: int
    crop: tuple[int, int] | None
    scale: float | None
    mean: np.ndarray | None
    std: np.ndarray | None


def _get(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def read_plan(processor: Any) -> _Plan | None:
    """The processor's pipeline if it is one `BatchedPixels` reproduces (PIL backend: optional resize to a
    shortest edge or a fixed size, optional center crop, rescale, normalise, no padding); else None."""
    if getattr(processor, "backend", None) != "pil" or getattr(processor, "do_pad", False):
        return None
    shortest = height = width = None
    if getattr(processor, "do_resize", False):
        size = processor.size
        shortest, longest = _get(size, "shortest_edge"), _get(size, "longest_edge")
        height, width = _get(size, "height"), _get(size, "width")
        if longest or not (shortest or (height and width)) or (shortest and (height or width)):
            return None
    crop = None
    if getattr(processor, "do_center_crop", False):
        h, w = _get(processor.crop_size, "height"), _get(processor.crop_size, "width")
        if not (h and w):
            return None
        crop = (int(h), int(w))
    scale = float(processor.rescale_factor) if getattr(processor, "do_rescale", False) else None
    mean = std = None
    if getattr(processor, "do_normalize", False):
        mean = np.array(processor.image_mean, dtype=np.float32).reshape(-1)
        std = np.array(processor.image_std, dtype=np.float32).reshape(-1)
        if mean.shape != (3,) or std.shape != (3,):
            return None
    resample = getattr(processor, "resample", None)
    return _Plan(shortest, height, width, int(resample) if resample is not None else 2, crop, scale, mean, std)


class BatchedPixels:
    """`pixel_values` (N, 3, H, W) for RGB PIL images, vectorised where verified equal to `processor`."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.plan = read_plan(processor)
        self.verified: dict[tuple, bool] = {}  # (mode, size) -> the fast path matched the processor bit for bit

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        if self.plan is not None and images:
            for image in images:
                key = (image.mode, image.size)
                if key not in self.verified:
                    self.verified[key] = self._matches(image)
            if all(self.verified[(image.mode, image.size)] for image in images):
                arrays = [self._resized(image) for image in images]
                if len({a.shape for a in arrays}) == 1:
                    return self._finish(np.stack(arrays))
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    def _matches(self, image: Any) -> bool:
        reference = self.processor(images=[image], return_tensors="pt")["pixel_values"]
        fast = self._finish(self._resized(image)[None])
        same = fast.shape == reference.shape and fast.dtype == reference.dtype and torch.equal(fast, reference)
        if not same:
            log.warning(
                "batched pixel preprocessing differs from %s for %s images of size %s; using the processor for them",
                type(self.processor).__name__,
                image.mode,
                image.size,
            )
        return same

    def _resized(self, image: Any) -> np.ndarray:
        """(H, W, 3) uint8: the processor's PIL resize, then its center crop."""
        plan = self.plan
        assert plan is not None
        w, h = image.size
        if plan.shortest_edge:  # transformers' get_resize_output_image_size(default_to_square=False)
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = plan.shortest_edge, int(plan.shortest_edge * long / short)
            new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
        elif plan.height and plan.width:
            new_h, new_w = plan.height, plan.width
        else:
            new_h, new_w = h, w
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample=plan.resample)
        array = np.asarray(image)
        if plan.crop is not None:
            ch, cw = plan.crop
            top, left = (array.shape[0] - ch) // 2, (array.shape[1] - cw) // 2
            if top < 0 or left < 0:  # the processor pads small images; not modelled (verification fails)
                return np.zeros((0, 0, 3), dtype=np.uint8)
            array = array[top : top + ch, left : left + cw]
        return array

    def _finish(self, batch: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float32: rescale (in float64, then cast) and normalise."""
        plan = self.plan
        assert plan is not None
        x = (
            (batch.astype(np.float64) * plan.scale).astype(np.float32)
            if plan.scale is not None
            else batch.astype(np.float32)
        )
        if plan.mean is not None and plan.std is not None:
            x = (x - plan.mean) / plan.std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

"""One prompt of an environment: the unit every adapter encodes (torch-free, so data workers stay light)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sample:
    """One prompt: an optional image, the question/caption prompt, and the answer scored or trained on."""

    prompt: str
    target: str = ""
    image: Any = None  # PIL.Image.Image or None

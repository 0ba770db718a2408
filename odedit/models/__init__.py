"""MLLM adapters, one module per family, behind the `ModelAdapter` interface (`odedit.models.base`).

adapter = load_adapter(cfg.model)              # hub name or local dir, dtype/device from config
path = build_tiny("llava", "/tmp/tiny")        # tiny random model + offline tokenizer, for tests
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from odedit.models import blip2, instructblip, llava, minigpt4, qwen2_vl  # noqa: F401  (registration)
from odedit.models.base import EncodedBatch, ForwardOutput, ModelAdapter, ModelLoader, ModelLoadError, Sample
from odedit.models.registry import ADAPTERS

__all__ = [
    "ADAPTERS",
    "EncodedBatch",
    "ForwardOutput",
    "ModelAdapter",
    "ModelLoadError",
    "ModelLoader",
    "Sample",
    "build_tiny",
    "load_adapter",
    "resolve_device",
    "resolve_dtype",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` -> bfloat16 on GPU, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if resolve_device(device).startswith("cuda") else torch.float32
    return _DTYPES[dtype]


def load_adapter(model_cfg: Any, name_or_path: str | None = None, loader: ModelLoader | None = None) -> ModelAdapter:
    """Load the adapter a `ModelConfig` describes (`name_or_path` overrides the config's path; `loader`, when
    given, builds the model, see `ModelAdapter.from_pretrained`)."""
    cls = ADAPTERS.get(model_cfg.family)
    device = resolve_device(model_cfg.device)
    return cls.from_pretrained(
        name_or_path or model_cfg.name_or_path,
        dtype=resolve_dtype(model_cfg.dtype, device),
        device=device,
        loader=loader,
        template=model_cfg.prompt_template,
        pooling=model_cfg.pooling,
        max_prompt_tokens=model_cfg.max_prompt_tokens,
        image_size=model_cfg.image_size,
    )


def build_tiny(
    family: str, out_dir: str | os.PathLike, corpus: Sequence[str] | None = None, seed: int = 0, **sizes: Any
) -> str:
    """Build and save a tiny random model of `family` (see each adapter's `build_tiny`)."""
    return ADAPTERS.get(family).build_tiny(out_dir, corpus=corpus, seed=seed, **sizes)

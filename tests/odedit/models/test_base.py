"""odedit.models.base loading: a local checkpoint with pickled weights is refused with the project's message."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from odedit.models import ADAPTERS
from odedit.models.base import ModelLoadError


def test_pickled_weights_are_refused_before_anything_is_unpickled(tiny_dir, tmp_path):
    src = tiny_dir("llava")
    pickled = tmp_path / "pickled"
    shutil.copytree(src, pickled)
    for name in os.listdir(pickled):
        if name.endswith(".safetensors") or name.endswith(".safetensors.index.json"):
            os.remove(pickled / name)
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as info:
        ADAPTERS.get("llava").from_pretrained(str(pickled))
    text = str(info.value)
    assert "pytorch_model.bin" in text and "never unpickles" in text and "model.name_or_path" in text


def test_a_safetensors_checkpoint_still_loads(tiny_dir):
    adapter = ADAPTERS.get("llava").from_pretrained(tiny_dir("llava"))
    assert any(p.numel() for p in adapter.model.parameters())

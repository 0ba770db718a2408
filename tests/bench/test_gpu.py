"""bench.gpu off a GPU: it says so and writes nothing; its model is LLaVA-1.5-7B's full shape (issue 16 item 6)."""

from __future__ import annotations

import os

import torch

from bench import gpu
from bench.common import RESULTS_DIR


def test_without_a_gpu_it_measures_nothing_and_writes_no_result(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = os.path.join(RESULTS_DIR, "gpu.json")
    before = os.path.getmtime(result) if os.path.exists(result) else None
    assert gpu.main([]) is None
    assert "no CUDA GPU on this machine" in capsys.readouterr().out
    assert (os.path.getmtime(result) if os.path.exists(result) else None) == before


def test_the_model_has_llava_1_5_7b_s_shape():
    """7,062,902,784 parameters: CLIP ViT-L/14-336, the GELU projector and Vicuna-7B (counted on the meta device)."""
    assert gpu._parameters(32) == 7_062_902_784
    config = gpu.llava_7b_config(32)
    assert (config.text_config.hidden_size, config.text_config.intermediate_size) == (4096, 11008)
    assert config.image_seq_length == 576

"""bench.zero_memory's helpers: the model size arithmetic, the memory figure and the weight difference."""

from __future__ import annotations

import pytest
import torch

from bench.zero_memory import held_share, layers_for, lm_parameters, max_abs_diff, param_memory


def test_parameter_count_of_llava_7b_language_model():
    # Vicuna-7B (LLaMA-7B shape, vocabulary 32000): 6.74 B parameters
    assert lm_parameters(32) == 6_738_415_616
    assert layers_for(10**9) == 4 and lm_parameters(3) < 10**9 <= lm_parameters(4)


def test_param_memory_is_the_worst_workers_growth():
    workers = [
        {"peak_pss_mb": 900.0, "start_pss_mb": 400.0},
        {"peak_pss_mb": 1000.0, "start_pss_mb": 600.0},
    ]
    assert param_memory(workers) == 500.0
    workers[0].update(peak_rss_mb=2000.0, start_rss_mb=500.0, load={"local_numel": 5, "total_numel": 10})
    workers[1].update(peak_rss_mb=1200.0, start_rss_mb=600.0, load={"local_numel": 6, "total_numel": 10})
    assert param_memory(workers, "rss") == 1500.0 and held_share(workers) == 0.6


def test_max_abs_diff_of_nested_states():
    a = {"w": torch.tensor([1.0, 2.0]), "meta": [torch.tensor([0.5]), 3]}
    b = {"w": torch.tensor([1.0, 2.25]), "meta": [torch.tensor([0.0]), 3]}
    assert max_abs_diff(a, b) == 0.5
    with pytest.raises(ValueError, match="differ in keys"):
        max_abs_diff(a, {"w": a["w"]})

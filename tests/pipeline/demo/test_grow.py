"""pipeline.demo.grow: block expansion keeps the trained layers in order, at the bottom and the top, and the grown
model computes exactly what the small one did."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from odedit.models.base import Sample
from pipeline.demo.grow import RESIDUAL_WRITERS, expand_blocks, expansion_plan
from pipeline.demo.model import load_demo_adapter
from pipeline.demo.train import new_demo_adapter

pytest.importorskip("easy_vqa")


def test_plan_spreads_the_trained_layers_bottom_to_top():
    assert expansion_plan(2, 6) == [0, None, None, None, None, 1]
    assert expansion_plan(2, 2) == [0, 1]
    assert expansion_plan(1, 3) == [0, None, None]
    assert [i for i in expansion_plan(3, 7) if i is not None] == [0, 1, 2]
    with pytest.raises(ValueError, match="cannot grow 3 decoder layers into 2"):
        expansion_plan(3, 2)


def test_grown_model_computes_what_the_small_one_did(tmp_path):
    adapter = new_demo_adapter(tmp_path / "small", seed=0)
    with torch.no_grad():  # a random init has no zero projections by chance; make the layers distinct too
        for p in adapter.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    samples = [Sample("what color is the shape?", "red", Image.new("RGB", (32, 32), (200, 10, 10))),
               Sample("is this a circle?", "no", None)]  # fmt: skip
    enc = adapter.encode(samples)
    adapter.model.eval()
    with torch.no_grad():
        before = adapter.model(**enc.inputs).logits
    trained = list(adapter.model.model.language_model.layers)
    expand_blocks(adapter, 6)
    layers = adapter.model.model.language_model.layers
    assert len(layers) == 6 and adapter.model.config.text_config.num_hidden_layers == 6
    assert layers[0] is trained[0] and layers[5] is trained[1]
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(6))
    for i in range(1, 5):
        for path in RESIDUAL_WRITERS:
            assert not layers[i].get_submodule(path).weight.any()
        assert layers[i].mlp.up_proj.weight.any()  # the rest is a copy of its nearest trained layer
    torch.testing.assert_close(layers[2].mlp.up_proj.weight, trained[0].mlp.up_proj.weight)
    torch.testing.assert_close(layers[3].mlp.up_proj.weight, trained[1].mlp.up_proj.weight)
    with torch.no_grad():
        after = adapter.model(**enc.inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    # and it saves and loads as a 6-layer LLaVA with those weights
    adapter.save_pretrained(tmp_path / "grown")
    loaded = load_demo_adapter(tmp_path / "grown")
    assert loaded.num_layers == 6
    loaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**enc.inputs).logits, before, rtol=0, atol=1e-5)

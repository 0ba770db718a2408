"""Batch encoding (one tokenizer call, one image-processor call) equals encoding each sample alone, per family."""

from __future__ import annotations

import pytest
import torch
from adapter_contract import mixed_rows

from odedit.models import ADAPTERS, Sample


@pytest.mark.parametrize("family", ADAPTERS.names())
@pytest.mark.parametrize("with_target", [True, False])
def test_batch_encoding_equals_each_sample_alone(tiny_adapter, family, with_target):
    adapter = tiny_adapter(family)
    samples = mixed_rows() + [Sample("what color is the shape ?", "", None), Sample("", "red", None)]
    batch = adapter.encode(samples, with_target=with_target)
    images = 0
    for b, sample in enumerate(samples):
        alone = adapter.encode([sample], with_target=with_target)
        n = int(alone.inputs["attention_mask"].sum())
        assert batch.inputs["input_ids"][b, :n].tolist() == alone.inputs["input_ids"][0, :n].tolist()
        assert batch.targets[b, :n].tolist() == alone.targets[0, :n].tolist()
        assert int(batch.last_prompt[b]) == int(alone.last_prompt[0])
        if sample.image is not None:  # this image's slice of the batch's pixel tensor
            for key in ("pixel_values",):
                if key in alone.inputs and alone.inputs[key].shape[0] == 1:
                    assert torch.equal(batch.inputs[key][images : images + 1], alone.inputs[key]), key
            images += 1

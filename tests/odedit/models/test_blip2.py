"""Tests of the BLIP-2 OPT adapter on a tiny random `Blip2ForConditionalGeneration` (offline, CPU)."""

from __future__ import annotations

import pytest
import torch
from adapter_contract import (
    check_batch_invariance,
    check_bfloat16,
    check_generate,
    check_loss_and_backward,
    check_round_trip,
    mixed_rows,
    text_rows,
)
from testdata import make_image

from odedit.models import ADAPTERS, ModelLoadError, Sample

FAMILY = "blip2_opt"


@pytest.fixture(scope="module")
def adapter(tiny_adapter):
    return tiny_adapter(FAMILY)


def test_tiny_model_loads_with_image_placeholder_before_bos(adapter, tiny_dir):
    from transformers import AutoImageProcessor

    tok, cfg = adapter.tokenizer, adapter.model.config
    assert type(adapter).__name__ == "Blip2OptAdapter" and cfg.model_type == "blip-2"
    assert type(adapter.model).__name__ == "Blip2ForConditionalGeneration"
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<image>") != tok.unk_token_id
    assert not hasattr(tok, "image_token")  # Blip2Processor would crash on it (platform.md §4.2)
    assert adapter.template == "Question: {} Short answer:"
    assert 0 < adapter.model.query_tokens.std() < 0.1  # re-initialised: zeros blow up the Q-Former's gradients
    assert type(AutoImageProcessor.from_pretrained(tiny_dir(FAMILY))).__name__.startswith("BlipImageProcessor")


def test_encode_puts_query_placeholders_before_bos_on_image_rows_only(adapter):
    batch = adapter.encode(mixed_rows(), padding_side="right")
    ids, q = batch.inputs["input_ids"], adapter.num_query_tokens
    bos, img = adapter.tokenizer.bos_token_id, adapter.image_token_id
    assert ids[0, :q].tolist() == [img] * q and ids[0, q].item() == bos
    assert ids[1, 0].item() == bos and (ids[1] == img).sum() == 0
    assert (ids == img).sum(1).tolist() == [q, 0, q]
    assert batch.inputs["pixel_values"].shape == (2, 3, 32, 32)
    assert batch.has_image.tolist() == [True, False, True]
    assert batch.prompt_mask[0, :q].all()  # image positions belong to the prompt


def test_forward_loss_and_backward(adapter):
    check_loss_and_backward(adapter, adapter.model.query_tokens)
    adapter.run(mixed_rows()).answer_logits().sum().backward()
    assert adapter.vision_tower().embeddings.patch_embedding.weight.grad.abs().sum() > 0
    adapter.model.zero_grad(set_to_none=True)


def test_image_changes_the_answer_logits(adapter):
    with_image = Sample("what color is the shape ?", "red", make_image((255, 0, 0)))
    other_image = Sample(with_image.prompt, "red", make_image((0, 255, 0), seed=3))
    with torch.no_grad():
        a, b = adapter.run([with_image]).answer_logits(), adapter.run([other_image]).answer_logits()
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("rows", [mixed_rows, text_rows], ids=["mixed", "text_only"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_answer_logits_do_not_depend_on_padding_or_batch(adapter, rows, padding_side):
    check_batch_invariance(adapter, rows(), padding_side)


def test_edit_modules_are_opt_linear_layers(adapter):
    mods = adapter.edit_modules(["ffn_out"], [-1])
    assert list(mods) == ["language_model.model.decoder.layers.1.fc2"]
    module = mods["language_model.model.decoder.layers.1.fc2"]
    assert isinstance(module, torch.nn.Linear) and module.in_features == 64 and module.out_features == 32
    all_kinds = adapter.edit_modules(["ffn_in", "ffn_out", "attn_out"], [0, 1])
    named = dict(adapter.model.named_modules())
    assert len(all_kinds) == 6 and all(named[n] is m and isinstance(m, torch.nn.Linear) for n, m in all_kinds.items())
    assert "language_model.model.decoder.layers.0.self_attn.out_proj" in all_kinds


def test_generate_returns_greedy_strings(adapter):
    check_generate(adapter)


def test_bfloat16_load_runs(tiny_dir):
    check_bfloat16(FAMILY, tiny_dir(FAMILY))


def test_save_load_round_trip_gives_identical_logits(adapter, tmp_path):
    check_round_trip(adapter, FAMILY, tmp_path)


def test_checkpoint_of_another_family_is_refused(tiny_dir):
    with pytest.raises(ModelLoadError, match="blip2_opt.*minigpt4"):
        ADAPTERS.get(FAMILY).from_pretrained(tiny_dir("minigpt4"))

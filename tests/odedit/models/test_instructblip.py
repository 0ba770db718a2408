"""Tests of the InstructBLIP adapter on a tiny random `InstructBlipForConditionalGeneration` (offline, CPU)."""

from __future__ import annotations

import os

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

FAMILY = "instructblip"


@pytest.fixture(scope="module")
def adapter(tiny_adapter):
    return tiny_adapter(FAMILY)


def test_tiny_model_loads_with_its_qformer_tokenizer(adapter, tiny_dir):
    cfg = adapter.model.config
    assert type(adapter).__name__ == "InstructBlipAdapter" and cfg.model_type == "instructblip"
    assert type(adapter.model.language_model).__name__ == "LlamaForCausalLM"
    assert cfg.image_token_id == adapter.tokenizer.convert_tokens_to_ids("<image>")
    assert os.path.isfile(os.path.join(tiny_dir(FAMILY), "qformer_tokenizer", "tokenizer.json"))
    assert adapter.qformer_tokenizer is not None
    assert len(adapter.qformer_tokenizer) == cfg.qformer_config.vocab_size
    assert 0 < adapter.model.query_tokens.std() < 0.1


def test_qformer_reads_the_instruction_of_image_rows(adapter):
    rows = mixed_rows()
    batch = adapter.encode(rows, padding_side="left")
    q_ids, q_mask = batch.inputs["qformer_input_ids"], batch.inputs["qformer_attention_mask"]
    assert q_ids.shape[0] == 2 == batch.inputs["pixel_values"].shape[0]  # image rows only
    expected = [
        adapter.qformer_tokenizer("Question: " + r.prompt + " Short answer:")["input_ids"]
        for r in rows
        if r.image is not None
    ]
    for b, ids in enumerate(expected):
        assert q_ids[b][q_mask[b].bool()].tolist() == ids
        assert q_mask[b, : len(ids)].all() and not q_mask[b, len(ids) :].any()  # right-padded
    q = adapter.num_query_tokens
    lm_ids = batch.inputs["input_ids"]
    assert (lm_ids == adapter.image_token_id).sum(1).tolist() == [q, 0, q]
    assert "qformer_input_ids" not in adapter.encode(text_rows()).inputs


def test_instruction_changes_the_image_features(adapter):
    image = make_image((255, 0, 0))
    with torch.no_grad():
        a = adapter._image_features(adapter.encode([Sample("what color is the shape ?", "red", image)]).inputs)
        b = adapter._image_features(adapter.encode([Sample("is there a circle ?", "red", image)]).inputs)
    assert a.shape == (1, adapter.num_query_tokens, adapter.model.config.text_config.hidden_size)
    assert not torch.allclose(a, b)


def test_forward_loss_and_backward(adapter):
    check_loss_and_backward(adapter, adapter.model.query_tokens)


@pytest.mark.parametrize("rows", [mixed_rows, text_rows], ids=["mixed", "text_only"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_answer_logits_do_not_depend_on_padding_or_batch(adapter, rows, padding_side):
    check_batch_invariance(adapter, rows(), padding_side)


def test_edit_modules_are_llama_linear_layers(adapter):
    mods = adapter.edit_modules(["ffn_out"], [-1])
    assert list(mods) == ["language_model.model.layers.1.mlp.down_proj"]
    assert all(isinstance(m, torch.nn.Linear) and m.in_features == 64 for m in mods.values())
    assert set(adapter.edit_modules(["ffn_in", "attn_out"], [0])) == {
        "language_model.model.layers.0.mlp.up_proj",
        "language_model.model.layers.0.self_attn.o_proj",
    }


def test_generate_returns_greedy_strings(adapter):
    check_generate(adapter)


def test_bfloat16_load_runs(tiny_dir):
    check_bfloat16(FAMILY, tiny_dir(FAMILY))


def test_save_load_round_trip_keeps_the_qformer_tokenizer(adapter, tmp_path):
    again = check_round_trip(adapter, FAMILY, tmp_path)
    assert os.path.isfile(tmp_path / "qformer_tokenizer" / "tokenizer.json")
    assert again.qformer_tokenizer.get_vocab() == adapter.qformer_tokenizer.get_vocab()


def test_checkpoint_of_another_family_is_refused(tiny_dir):
    with pytest.raises(ModelLoadError, match="instructblip.*blip-2"):
        ADAPTERS.get(FAMILY).from_pretrained(tiny_dir("blip2_opt"))


def test_missing_qformer_tokenizer_is_a_clear_error(tiny_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_dir(FAMILY), tmp_path / "m", ignore=shutil.ignore_patterns("qformer_tokenizer"))
    with pytest.raises(ModelLoadError, match="qformer_tokenizer"):
        ADAPTERS.get(FAMILY).from_pretrained(str(tmp_path / "m"))

"""Tests of the Qwen2-VL adapter on a tiny random `Qwen2VLForConditionalGeneration` (offline, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from testdata import make_image

from odedit.models import ADAPTERS, ModelLoadError, Sample

FAMILY = "qwen2_vl"


@pytest.fixture(scope="module")
def adapter(tiny_adapter):
    return tiny_adapter(FAMILY)


def _mixed_rows():
    return [
        Sample("what color is the shape ?", "red", make_image((255, 0, 0), seed=1)),
        Sample("capital of france", "paris"),
        Sample("is there a circle in the image", "yes no", make_image((0, 0, 255), size=48, seed=2)),
    ]


def _text_rows():
    return [Sample("capital of france", "paris"), Sample("who wrote this ? describe the photo", "no")]


def test_tiny_model_loads_with_qwen_style_tokenizer_and_processor(adapter, tiny_dir):
    from transformers import AutoImageProcessor

    tok, cfg = adapter.tokenizer, adapter.model.config
    assert type(adapter).__name__ == "Qwen2VLAdapter" and cfg.model_type == "qwen2_vl"
    assert tok.bos_token_id is None
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert len({cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id, tok.unk_token_id}) == 4
    reloaded = AutoImageProcessor.from_pretrained(tiny_dir(FAMILY))
    assert (reloaded.size.shortest_edge, reloaded.size.longest_edge, reloaded.merge_size) == (56 * 56, 56 * 56, 2)


@pytest.mark.parametrize("size, grid", [(64, (1, 4, 4)), ((80, 48), (1, 2, 4))])
def test_image_block_matches_grid(adapter, size, grid):
    from PIL import Image

    image = make_image(size=64).resize(size if isinstance(size, tuple) else (size, size), Image.BILINEAR)
    ids, feats = adapter._image_block(image)
    cfg = adapter.model.config
    assert tuple(feats["image_grid_thw"][0].tolist()) == grid
    assert feats["pixel_values"].shape == (grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14)
    n_tokens = grid[0] * grid[1] * grid[2] // 4
    assert ids == [cfg.vision_start_token_id] + [cfg.image_token_id] * n_tokens + [cfg.vision_end_token_id]


def test_encode_places_image_tokens_and_type_ids(adapter):
    rows = _mixed_rows()
    batch = adapter.encode(rows, padding_side="left")
    ids, types = batch.inputs["input_ids"], batch.inputs["mm_token_type_ids"]
    grids = batch.inputs["image_grid_thw"]
    assert grids.shape == (2, 3)
    assert batch.inputs["pixel_values"].shape[0] == int(grids.prod(-1).sum())
    pads_per_row = (ids == adapter.image_token_id).sum(1).tolist()
    assert pads_per_row == [int(grids[0].prod()) // 4, 0, int(grids[1].prod()) // 4]
    assert torch.equal(types, (ids == adapter.image_token_id).long())
    assert batch.has_image.tolist() == [True, False, True]
    # the image sits inside the prompt, after "<|im_start|>user"
    first = adapter.tokenizer.convert_ids_to_tokens(ids[0][batch.inputs["attention_mask"][0].bool()].tolist())
    assert first[:3] == ["<|im_start|>", "user", "<|vision_start|>"]


def test_forward_loss_and_backward(adapter):
    adapter.model.zero_grad(set_to_none=True)
    out = adapter.run(_mixed_rows())
    loss = F.cross_entropy(out.answer_logits(), out.answer_targets())
    assert torch.isfinite(loss)
    loss.backward()
    layer = adapter.decoder_layers()[0]
    assert layer.mlp.up_proj.weight.grad.abs().sum() > 0
    assert adapter.vision_tower().patch_embed.proj.weight.grad.abs().sum() > 0
    adapter.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("rows", [_mixed_rows, _text_rows], ids=["mixed", "text_only"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_answer_logits_do_not_depend_on_padding_or_batch(adapter, rows, padding_side):
    samples = rows()
    with torch.no_grad():
        out = adapter.run(samples, padding_side=padding_side)
        for b, sample in enumerate(samples):
            expected = adapter._tok(" " + sample.target)
            assert out.answer_targets()[out.answer_row() == b].tolist() == expected
            alone = adapter.run([sample], padding_side=padding_side)
            assert torch.allclose(out.logits[b][out.batch.answer_mask[b]], alone.answer_logits(), atol=1e-5)
            assert torch.allclose(out.pooled("last")[b], alone.pooled("last")[0], atol=1e-5)


def test_edit_modules_are_linear_layers_of_the_language_model(adapter):
    mods = adapter.edit_modules(["ffn_in", "ffn_out", "attn_out"], [0, -1])
    assert len(mods) == 6
    named = dict(adapter.model.named_modules())
    for name, module in mods.items():
        assert isinstance(module, torch.nn.Linear)
        assert named[name] is module and ".language_model.layers." in name
    assert "model.language_model.layers.1.mlp.down_proj" in mods


def test_generate_returns_greedy_strings(adapter):
    rows = [Sample(s.prompt, image=s.image) for s in _mixed_rows()]
    texts = adapter.generate(rows, max_new_tokens=3)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    first = adapter.generate(rows, max_new_tokens=1)
    with torch.no_grad():
        out = adapter.run(rows, padding_side="left", with_target=False)
    greedy = out.logits[torch.arange(3), out.batch.last_prompt].argmax(-1)
    eos = adapter.tokenizer.eos_token_id
    assert first == [
        adapter.tokenizer.decode([] if t == eos else [t], skip_special_tokens=True).strip() for t in greedy.tolist()
    ]


def test_image_size_resizes_before_processing(tiny_adapter):
    from PIL import Image

    wide = make_image(size=64).resize((80, 48), Image.BILINEAR)  # a (1, 2, 4) grid as it is
    square = tiny_adapter(FAMILY, image_size=56)
    ids, feats = square._image_block(square._resize(wide))
    assert feats["image_grid_thw"][0].tolist() == [1, 4, 4] and ids.count(square.image_token_id) == 4


def test_processor_with_another_merge_size_is_refused(tiny_adapter):
    mismatched = tiny_adapter(FAMILY)
    mismatched.image_processor.merge_size = 1
    with pytest.raises(ValueError, match="merge_size=1"):
        mismatched.encode([Sample("what color is the shape ?", "red", make_image())])


def test_save_load_round_trip_gives_identical_logits(adapter, tmp_path):
    adapter.save_pretrained(tmp_path)
    again = ADAPTERS.get(FAMILY).from_pretrained(str(tmp_path))
    rows = _mixed_rows()
    with torch.no_grad():
        assert torch.equal(adapter.run(rows).logits, again.run(rows).logits)


def test_checkpoint_of_another_family_is_refused(tiny_dir):
    with pytest.raises(ModelLoadError, match="qwen2_vl"):
        ADAPTERS.get(FAMILY).from_pretrained(tiny_dir("llava"))

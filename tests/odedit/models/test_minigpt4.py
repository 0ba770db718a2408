"""Tests of the MiniGPT-4 adapter, its composed transformers model and the LAVIS/MiniGPT-4 checkpoint loader."""

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

FAMILY = "minigpt4"


@pytest.fixture(scope="module")
def adapter(tiny_adapter):
    return tiny_adapter(FAMILY)


def _model_class():
    from odedit.models.minigpt4_model import MiniGPT4ForConditionalGeneration

    return MiniGPT4ForConditionalGeneration


def test_tiny_model_is_a_pretrained_model_with_its_own_config(adapter, tiny_dir):
    import json

    from transformers import PreTrainedConfig, PreTrainedModel

    model, cfg = adapter.model, adapter.model.config
    assert isinstance(model, PreTrainedModel) and isinstance(cfg, PreTrainedConfig)
    assert type(cfg).__name__ == "MiniGPT4Config" and cfg.model_type == "minigpt4"
    with open(f"{tiny_dir(FAMILY)}/config.json", encoding="utf-8") as fh:
        saved = json.load(fh)
    assert saved["model_type"] == "minigpt4" and saved["architectures"] == ["MiniGPT4ForConditionalGeneration"]
    assert {saved[k]["model_type"] for k in ("vision_config", "qformer_config", "text_config")} == {
        "blip_2_vision_model",
        "blip_2_qformer",
        "llama",
    }
    assert cfg.qformer_config.encoder_hidden_size == cfg.vision_config.hidden_size
    assert type(model.language_model).__name__ == "LlamaForCausalLM"
    assert model.llama_proj.in_features == cfg.qformer_config.hidden_size
    assert cfg.image_token_id == adapter.tokenizer.convert_tokens_to_ids("<image>")
    assert 0 < model.query_tokens.std() < 0.1


def test_published_defaults_describe_minigpt4_vicuna7b():
    from odedit.models.minigpt4_model import MiniGPT4Config

    cfg = MiniGPT4Config()
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers, cfg.vision_config.patch_size) == (
        1408,
        39,
        14,
    )
    assert (cfg.qformer_config.hidden_size, cfg.qformer_config.encoder_hidden_size) == (768, 1408)
    assert (cfg.text_config.model_type, cfg.text_config.hidden_size, cfg.num_query_tokens) == ("llama", 4096, 32)


def test_prompt_follows_minigpt4_template(adapter):
    batch = adapter.encode(mixed_rows()[:2], padding_side="right")
    toks = adapter.tokenizer.convert_ids_to_tokens
    q = adapter.num_query_tokens
    image_row = toks(batch.inputs["input_ids"][0].tolist())
    start = image_row.index("<image>")
    assert image_row[:start] == ["<s>", "###", "human", ":", "<", "img", ">"]
    assert image_row[start : start + q] == ["<image>"] * q and image_row[start + q : start + q + 3] == [
        "</",
        "img",
        ">",
    ]
    text_row = toks(batch.inputs["input_ids"][1][batch.inputs["attention_mask"][1].bool()].tolist())
    assert text_row == ["<s>", "###", "human", ":", "capital", "of", "france", "###", "assistant", ":", "paris"]
    assert batch.inputs["pixel_values"].shape == (1, 3, 32, 32)


def test_forward_loss_and_backward(adapter):
    check_loss_and_backward(adapter, adapter.model.llama_proj.weight)
    out = adapter.run(mixed_rows())
    out.answer_logits().sum().backward()
    assert adapter.model.query_tokens.grad.abs().sum() > 0
    assert adapter.vision_tower().embeddings.patch_embedding.weight.grad.abs().sum() > 0
    adapter.model.zero_grad(set_to_none=True)


def test_wrong_number_of_placeholders_is_refused(adapter):
    batch = adapter.encode(mixed_rows())
    pixels = batch.inputs["pixel_values"][:1]  # two image rows, one image
    with pytest.raises(ValueError, match="image placeholder positions"):
        adapter.model(
            input_ids=batch.inputs["input_ids"], attention_mask=batch.inputs["attention_mask"], pixel_values=pixels
        )


@pytest.mark.parametrize("rows", [mixed_rows, text_rows], ids=["mixed", "text_only"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_answer_logits_do_not_depend_on_padding_or_batch(adapter, rows, padding_side):
    check_batch_invariance(adapter, rows(), padding_side)


def test_edit_modules_are_llama_linear_layers(adapter):
    mods = adapter.edit_modules(["ffn_out"], [-1])
    assert list(mods) == ["language_model.model.layers.1.mlp.down_proj"]
    assert all(isinstance(m, torch.nn.Linear) and m.in_features == 64 for m in mods.values())


def test_generate_returns_greedy_strings(adapter):
    check_generate(adapter)


def test_bfloat16_load_runs(tiny_dir):
    check_bfloat16(FAMILY, tiny_dir(FAMILY))


def test_save_load_round_trip_gives_identical_logits(adapter, tmp_path):
    check_round_trip(adapter, FAMILY, tmp_path)


def test_checkpoint_of_another_family_is_refused(tiny_dir):
    with pytest.raises(ModelLoadError, match="minigpt4.*instructblip"):
        ADAPTERS.get(FAMILY).from_pretrained(tiny_dir("instructblip"))


# ------------------------------------------------------------------ the published (LAVIS / MiniGPT-4) layout


def _published_files(adapter, out_dir, lm_keys: bool = True) -> list:
    """The tiny model's weights as MiniGPT-4 ships them: a BLIP-2 LAVIS file (with the parts MiniGPT-4 drops),
    `pretrained_minigpt4.pth` and, if `lm_keys`, the LM as `llama_model.*` in a safetensors file."""
    from safetensors.torch import save_file

    from odedit.models.minigpt4_checkpoint import hf_to_lavis

    lavis = hf_to_lavis(adapter.model.state_dict())
    assert "visual_encoder.blocks.0.attn.q_bias" in lavis and "ln_vision.weight" in lavis
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in lavis
    blip2 = {k: v for k, v in lavis.items() if not k.startswith(("llama_proj.", "llama_model."))}
    hidden = adapter.model.config.qformer_config.hidden_size
    blip2["Qformer.cls.predictions.bias"] = torch.zeros(7)  # BLIP-2 parts MiniGPT-4 sets to None
    blip2["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(2 * hidden, hidden)
    blip2["opt_proj.weight"] = torch.zeros(3, hidden)
    files = [out_dir / "blip2_pretrained.pth", out_dir / "pretrained_minigpt4.pth"]
    torch.save({"model": blip2}, files[0])
    torch.save({"model": {k: v for k, v in lavis.items() if k.startswith("llama_proj.")}}, files[1])
    if lm_keys:
        files.append(out_dir / "vicuna.safetensors")
        save_file({k: v.contiguous() for k, v in lavis.items() if k.startswith("llama_model.")}, files[2])
    return files


def _outputs(model, adapter):
    with torch.no_grad():
        return model(**adapter.encode(mixed_rows()).inputs).logits


def test_published_checkpoint_loads_into_a_fresh_model(adapter, tmp_path):
    files = _published_files(adapter, tmp_path)
    torch.manual_seed(123)
    loaded = _model_class().from_minigpt4_checkpoint(adapter.model.config, files)
    assert not loaded.training
    assert torch.equal(_outputs(loaded, adapter), _outputs(adapter.model, adapter))


def test_published_checkpoint_with_a_language_model_directory(adapter, tmp_path):
    files = _published_files(adapter, tmp_path, lm_keys=False)
    adapter.model.language_model.save_pretrained(tmp_path / "vicuna")
    torch.manual_seed(321)
    loaded = _model_class().from_minigpt4_checkpoint(adapter.model.config, files, language_model=tmp_path / "vicuna")
    assert torch.equal(_outputs(loaded, adapter), _outputs(adapter.model, adapter))


def test_key_mapping_round_trips():
    from odedit.models.minigpt4_checkpoint import hf_to_lavis, lavis_to_hf

    qkv_bias = torch.tensor([1.0, 1.0, 0.0, 0.0, 2.0, 2.0])  # q, k (EVA has none), v
    ours = {
        "vision_model.encoder.layers.3.self_attn.qkv.bias": qkv_bias,
        "vision_model.encoder.layers.3.layer_norm2.weight": torch.ones(2),
        "qformer.encoder.layer.1.crossattention.attention.value.bias": torch.ones(2),
        "qformer.encoder.layer.1.output_query.LayerNorm.weight": torch.ones(2),
        "language_model.model.layers.0.mlp.down_proj.weight": torch.ones(2, 2),
    }
    lavis = hf_to_lavis(ours)
    assert set(lavis) == {
        "visual_encoder.blocks.3.attn.q_bias",
        "visual_encoder.blocks.3.attn.v_bias",
        "visual_encoder.blocks.3.norm2.weight",
        "Qformer.bert.encoder.layer.1.crossattention.self.value.bias",
        "Qformer.bert.encoder.layer.1.output_query.LayerNorm.weight",
        "llama_model.model.layers.0.mlp.down_proj.weight",
    }
    assert lavis["visual_encoder.blocks.3.attn.v_bias"].tolist() == [2.0, 2.0]
    back, skipped, unknown = lavis_to_hf(lavis)
    assert skipped == [] and unknown == []
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_checkpoint_of_another_model_names_its_keys(adapter, tmp_path):
    foreign = {"model.embed_tokens.weight": torch.zeros(4, 2), "vision_tower.conv.weight": torch.zeros(1)}
    torch.save(foreign, tmp_path / "llava.pth")
    with pytest.raises(
        ModelLoadError,
        match=r"2 keys are not MiniGPT-4/LAVIS.*model\.embed_tokens\.weight.*"
        r"missing, by module: .*llama_proj \(2: llama_proj\.bias",
    ):
        _model_class().from_minigpt4_checkpoint(adapter.model.config, [tmp_path / "llava.pth"])


def test_checkpoint_without_the_projection_names_it(adapter, tmp_path):
    files = _published_files(adapter, tmp_path)
    with pytest.raises(
        ModelLoadError,
        match=r"2 model weights are missing, by module: "
        r"llama_proj \(2: llama_proj\.bias, llama_proj\.weight\)",
    ):
        _model_class().from_minigpt4_checkpoint(adapter.model.config, [files[0], files[2]])


def test_checkpoint_of_other_sizes_names_the_shapes(adapter, tmp_path):
    from odedit.models.minigpt4_model import MiniGPT4Config

    files = _published_files(adapter, tmp_path)
    bigger = MiniGPT4Config.from_dict({**adapter.model.config.to_dict(), "num_query_tokens": 6})
    with pytest.raises(ModelLoadError, match=r"query_tokens \(checkpoint \(1, 4, 32\), model \(1, 6, 32\)\)"):
        _model_class().from_minigpt4_checkpoint(bigger, files)


def test_checkpoint_with_more_layers_names_them(adapter, tmp_path):
    from odedit.models.minigpt4_model import MiniGPT4Config

    files = _published_files(adapter, tmp_path)
    sizes = adapter.model.config.to_dict()
    sizes["vision_config"]["num_hidden_layers"] = 1
    with pytest.raises(
        ModelLoadError,
        match=r"weights have no place in a model of this MiniGPT4Config .*"
        r"vision_model\.encoder\.layers\.1\.",
    ):
        _model_class().from_minigpt4_checkpoint(MiniGPT4Config.from_dict(sizes), files)


def test_pickled_objects_are_not_loaded(adapter, tmp_path):
    torch.save({"model": {"llama_proj.weight": Sample("x")}}, tmp_path / "evil.pth")  # a pickled object
    with pytest.raises(ModelLoadError, match="evil.pth.*weights-only torch file.*Weights only load failed"):
        _model_class().from_minigpt4_checkpoint(adapter.model.config, [tmp_path / "evil.pth"])


def test_image_tokens_use_the_projected_queries(adapter):
    model = adapter.model
    sample = Sample("what color is the shape ?", "red", make_image())
    inputs = adapter.encode([sample]).inputs
    with torch.no_grad():
        feats = model.get_image_features(inputs["pixel_values"])
        out = model(**inputs, output_hidden_states=True)
        manual_embeds = model.get_input_embeddings()(
            inputs["input_ids"].masked_fill(inputs["input_ids"] == adapter.image_token_id, 0)
        )
        manual_embeds[inputs["input_ids"] == adapter.image_token_id] = feats.reshape(-1, feats.shape[-1])
        manual = model.language_model(inputs_embeds=manual_embeds, attention_mask=inputs["attention_mask"])
    assert feats.shape == (1, adapter.num_query_tokens, model.config.text_config.hidden_size)
    assert torch.allclose(out.logits, manual.logits)

"""BLIP-2 OPT adapter (`Blip2ForConditionalGeneration`: ViT, Q-Former with learned queries, OPT LM).

An image row starts with `num_query_tokens` image placeholders *before* BOS (transformers v5 layout); the
projected Q-Former outputs replace their embeddings. `Blip2ForConditionalGeneration.forward` needs
`pixel_values` for every call, so this adapter runs the language model itself: the image features of the image
rows only (`get_image_features`) are scattered into the placeholders (`odedit.models.placeholders`), which lets
text-only rows (text locality) share a batch with image rows. Logits and hidden states come straight from the
OPT LM, so they align with `input_ids` as the base class expects.
Real checkpoint: `Salesforce/blip2-opt-2.7b` (MMEdit's template `Question: {} Short answer:`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from odedit.models.base import ModelAdapter
from odedit.models.placeholders import QueryTokenImages, embed_with_images
from odedit.models.registry import ADAPTERS
from odedit.models.tokenizer import DEFAULT_CORPUS, build_word_tokenizer


def _blip2_class():
    # deferred: transformers is imported only when a model is loaded
    from transformers import Blip2ForConditionalGeneration

    return Blip2ForConditionalGeneration


def tiny_query_tokens_(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise `query_tokens` with N(0, 0.02): all-zero queries through the Q-Former's LayerNorm (eps 1e-12)
    give gradients near 1e12 (platform.md §4.2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape, generator=gen) * 0.02)


@ADAPTERS.decorator("blip2_opt")
class Blip2OptAdapter(QueryTokenImages, ModelAdapter):
    family = "blip2_opt"
    model_type = "blip-2"
    default_template = "Question: {} Short answer:"
    image_before_bos = True
    model_class = staticmethod(_blip2_class)
    MODULE_KINDS = {"ffn_in": "fc1", "ffn_out": "fc2", "attn_out": "self_attn.out_proj"}
    # OPT with do_layer_norm_before (2.7B and up) adds fc2's output to the input of final_layer_norm; OPT-350m
    # normalises after the addition, which TailRunner's check detects (it then replays the whole layer).
    RESIDUAL_INPUTS = {"ffn_out": "final_layer_norm"}

    @property
    def image_token_id(self) -> int:
        token_id = self.model.config.image_token_id
        if token_id is None:
            raise ValueError(
                f"model.config.image_token_index: None in this {self.family} checkpoint; transformers v5 needs the "
                "id of the tokenizer's image placeholder there (checkpoints saved since transformers 4.47 have it, "
                "e.g. 50265 for Salesforce/blip2-opt-2.7b): add the token and set the id"
            )
        return int(token_id)

    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.model.language_model.model.decoder.layers

    def vision_tower(self) -> torch.nn.Module:
        return self.model.vision_model

    def _image_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N_img, Q, H_text) projected query outputs of the image rows."""
        out = self.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        return out.pooler_output

    def _forward_model(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self._image_features(inputs) if "pixel_values" in inputs else None
        lm = self.model.language_model
        embeds = embed_with_images(lm.get_input_embeddings(), inputs["input_ids"], self.image_token_id, feats)
        out = lm(
            inputs_embeds=embeds,
            attention_mask=inputs["attention_mask"],
            output_hidden_states=True,
            use_cache=False,
            return_dict=True,
        )
        return out.logits, out.hidden_states[-1]

    @classmethod
    def build_tiny(
        cls,
        out_dir: str | os.PathLike,
        corpus: Sequence[str] | None = None,
        seed: int = 0,
        vision_hidden: int = 32,
        vision_layers: int = 2,
        qformer_hidden: int = 32,
        qformer_layers: int = 2,
        text_hidden: int = 32,
        text_layers: int = 2,
        heads: int = 2,
        image_size: int = 32,
        patch_size: int = 8,
        num_query_tokens: int = 4,
        **_: Any,
    ) -> str:
        """A tiny BLIP-2 OPT (ViT 32 px / patch 8, 2-layer Q-Former with 4 queries, 2-layer OPT) saved to `out_dir`.

        The word tokenizer's `<s>` is BOS (real OPT checkpoints use `</s>`); `<image>` is a plain special token, not
        `tok.image_token` (Blip2Processor crashes on that attribute, platform.md §4.2; this adapter does not use it).
        """
        # deferred: transformers is imported only when a tiny model is built
        from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, BlipImageProcessor, OPTConfig

        tok = build_word_tokenizer(corpus or DEFAULT_CORPUS, extra_specials=("<image>",))
        torch.manual_seed(seed)
        vc = Blip2VisionConfig(
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_hidden_layers=vision_layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
            initializer_range=0.02,
        )
        qc = Blip2QFormerConfig(
            hidden_size=qformer_hidden,
            intermediate_size=2 * qformer_hidden,
            num_hidden_layers=qformer_layers,
            num_attention_heads=heads,
            encoder_hidden_size=vision_hidden,
        )
        tc = OPTConfig(
            hidden_size=text_hidden,
            ffn_dim=2 * text_hidden,
            num_hidden_layers=text_layers,
            num_attention_heads=heads,
            word_embed_proj_dim=text_hidden,
            vocab_size=len(tok),
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        config = Blip2Config(
            vision_config=vc,
            qformer_config=qc,
            text_config=tc,
            num_query_tokens=num_query_tokens,
            image_token_index=tok.convert_tokens_to_ids("<image>"),
        )
        model = _blip2_class()(config)
        tiny_query_tokens_(model, seed)
        processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        return str(out_dir)

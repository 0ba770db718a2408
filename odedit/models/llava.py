"""LLaVA-1.5 adapter (`LlavaForConditionalGeneration`: CLIP vision tower, MLP projector, LLaMA/Vicuna LM).

Image rows carry `image_seq_length` `<image>` tokens where the template says `<image>`; the model scatters the
projected patch features into them. Text-only rows simply have none (pixel_values holds image rows only).
Real checkpoint: `llava-hf/llava-1.5-7b-hf` (template `USER: <image>\\n{} ASSISTANT:`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from odedit.models.base import ModelAdapter
from odedit.models.registry import ADAPTERS
from odedit.models.tokenizer import DEFAULT_CORPUS, build_word_tokenizer


def _llava_class():
    # deferred: transformers is imported only when a model is loaded
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


@ADAPTERS.decorator("llava")
class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_type = "llava"
    default_template = "USER: <image>\n{} ASSISTANT:"
    model_class = staticmethod(_llava_class)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def image_seq_length(self) -> int:
        vc = self.model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n + (1 if self.model.config.vision_feature_select_strategy == "full" else 0)

    def _image_block(self, image: Any) -> tuple[list[int], dict[str, torch.Tensor]]:
        return self._image_blocks([image])[0]

    def _image_blocks(self, images: Sequence[Any]) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
        return self._fixed_pixel_blocks(images, self.image_seq_length)

    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.model.model.language_model.layers

    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @classmethod
    def build_tiny(
        cls,
        out_dir: str | os.PathLike,
        corpus: Sequence[str] | None = None,
        seed: int = 0,
        vision_hidden: int = 32,
        vision_layers: int = 2,
        text_hidden: int = 32,
        text_layers: int = 2,
        heads: int = 2,
        image_size: int = 32,
        patch_size: int = 8,
        **_: Any,
    ) -> str:
        """A tiny LLaVA (CLIP 32 px / patch 8 -> 16 image tokens; 2-layer LLaMA) saved to `out_dir`."""
        # deferred: transformers is imported only when a tiny model is built
        from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig

        tok = build_word_tokenizer(
            corpus or DEFAULT_CORPUS, extra_specials=("<image>",), named_specials={"image_token": "<image>"}
        )
        torch.manual_seed(seed)
        vc = CLIPVisionConfig(
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_hidden_layers=vision_layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=vision_hidden,
        )
        tc = LlamaConfig(
            hidden_size=text_hidden,
            intermediate_size=2 * text_hidden,
            num_hidden_layers=text_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            vocab_size=len(tok),
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=False,
        )
        # vision_feature_layer -1: the default -2 is the *first* layer of a 2-layer tower (platform.md §4.2).
        config = LlavaConfig(
            vision_config=vc,
            text_config=tc,
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            image_seq_length=(image_size // patch_size) ** 2,
            pad_token_id=tok.pad_token_id,
        )
        model = _llava_class()(config)
        processor = CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            do_convert_rgb=True,
        )
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        return str(out_dir)

"""MiniGPT-4 adapter (`MiniGPT4ForConditionalGeneration`, composed from transformers parts in `minigpt4_model`).

MiniGPT-4's prompt is `###Human: <Img><ImageHere></Img> {question} ###Assistant:`; the 32 projected query outputs
take the `<ImageHere>` slot. Here the template says `<image>` there and image rows carry `num_query_tokens`
placeholder ids in its place (after BOS, as LLaVA); the model splices the image features in, so text-only rows
need nothing special. The published weights (LAVIS BLIP-2 + `pretrained_minigpt4.pth` + Vicuna) load through
`MiniGPT4ForConditionalGeneration.from_minigpt4_checkpoint`; `save_pretrained` of the result is a directory this
adapter loads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from odedit.models.base import IMAGE_MARKER, ModelAdapter
from odedit.models.placeholders import QueryTokenImages
from odedit.models.registry import ADAPTERS
from odedit.models.tokenizer import DEFAULT_CORPUS, build_word_tokenizer

_EMPTY_IMG = re.compile(r"<Img>\s*</Img>\s?")


def _minigpt4_class():
    # deferred: minigpt4_model imports transformers at module level; load it only when a model is built
    from odedit.models.minigpt4_model import MiniGPT4ForConditionalGeneration

    return MiniGPT4ForConditionalGeneration


@ADAPTERS.decorator("minigpt4")
class MiniGPT4Adapter(QueryTokenImages, ModelAdapter):
    family = "minigpt4"
    model_type = "minigpt4"
    default_template = "###Human: <Img><image></Img> {} ###Assistant:"
    model_class = staticmethod(_minigpt4_class)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_index)

    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.model.language_model.model.layers

    def vision_tower(self) -> torch.nn.Module:
        return self.model.vision_model

    def _prompt_parts(self, prompt: str, has_image: bool) -> tuple[str, str]:
        """As the base class, and a text-only row also drops the now empty `<Img></Img>` around the marker."""
        before, after = super()._prompt_parts(prompt, has_image)
        if not has_image:
            after = _EMPTY_IMG.sub("", after, count=1)
        return before, after

    @classmethod
    def _load_processors(cls, name_or_path: str) -> tuple[Any, Any]:
        """Tokenizer and image processor; the config is passed in because AutoConfig does not know `minigpt4`."""
        # deferred: transformers (also under minigpt4_model) is imported only when a model is loaded
        from transformers import AutoImageProcessor, AutoTokenizer

        # deferred: minigpt4_model imports transformers at module level
        from odedit.models.minigpt4_model import MiniGPT4Config

        config = MiniGPT4Config.from_pretrained(name_or_path)
        return (
            AutoTokenizer.from_pretrained(name_or_path, config=config),
            AutoImageProcessor.from_pretrained(name_or_path),
        )

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
        """A tiny MiniGPT-4 (ViT 32 px / patch 8, 2-layer Q-Former with 4 queries, 2-layer LLaMA) saved to
        `out_dir`; the vocabulary also covers the template's `###Human:` / `<Img>` words."""
        # deferred: transformers (also under minigpt4_model) is imported only when a tiny model is built
        from transformers import Blip2QFormerConfig, Blip2VisionConfig, BlipImageProcessor, LlamaConfig

        # deferred: minigpt4_model imports transformers at module level
        from odedit.models.minigpt4_model import MiniGPT4Config

        words = list(corpus or DEFAULT_CORPUS) + [cls.default_template.replace(IMAGE_MARKER, " ")]
        tok = build_word_tokenizer(words, extra_specials=("<image>",))
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
        config = MiniGPT4Config(
            vision_config=vc,
            qformer_config=qc,
            text_config=tc,
            num_query_tokens=num_query_tokens,
            image_token_index=tok.convert_tokens_to_ids("<image>"),
        )
        model = _minigpt4_class()(config)
        processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        return str(out_dir)

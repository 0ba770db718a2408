"""MiniGPT-4 as a transformers model: BLIP-2's vision tower and Q-Former, learned queries, `llama_proj`, a LLaMA LM.

MiniGPT-4 (Zhu et al., 2023) freezes BLIP-2's EVA ViT-g + Q-Former, projects the 32 query outputs with one linear
layer (`llama_proj`) into Vicuna's embedding space and splices them into the prompt where it says `<ImageHere>`.
transformers ships no MiniGPT-4 class, so this module composes one from its parts (`Blip2VisionModel`,
`Blip2QFormerModel`, `AutoModelForCausalLM`) as a `PreTrainedModel` with its own config (model_type
`minigpt4`): `save_pretrained` / `from_pretrained(dir)` work as for any transformers model, and
`from_minigpt4_checkpoint` reads the published LAVIS/MiniGPT-4 weights (`odedit.models.minigpt4_checkpoint`).

Image rows carry `num_query_tokens` placeholder ids (`image_token_index`) in `input_ids`; `forward` overwrites
their embeddings with the projected query outputs of the rows in `pixel_values` (image rows only, batch order),
so rows without an image need no pixels. The placeholder id may lie outside the LM's vocabulary.

This module imports transformers at import time; `odedit.models.minigpt4` imports it lazily.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    Blip2VisionModel,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec

from odedit.models.minigpt4_checkpoint import load_minigpt4_weights
from odedit.models.placeholders import embed_with_images


@strict
class MiniGPT4Config(PreTrainedConfig):
    """Configuration of `MiniGPT4ForConditionalGeneration`.

    Defaults describe the published MiniGPT-4 (Vicuna-7B): EVA ViT-g/14 at 224 px (BLIP-2's vision defaults),
    a 12-layer BERT-base Q-Former with 32 queries, and a 7B LLaMA; the placeholder id 32000 is one past Vicuna's
    vocabulary, so it never collides with a text token.

    Args:
        vision_config: `Blip2VisionConfig` (or dict) of the ViT.
        qformer_config: `Blip2QFormerConfig` (or dict) of the Q-Former; `encoder_hidden_size` follows the ViT.
        text_config: config (or dict with `model_type`) of the causal LM, LLaMA by default.
        num_query_tokens: learned queries, i.e. image tokens per image.
        image_token_index: the placeholder id standing for one image token in `input_ids`.
    """

    model_type = "minigpt4"
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs_defaults = {
        "vision_config": Blip2VisionConfig,
        "qformer_config": Blip2QFormerConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    image_token_index: int = 32000
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size


class MiniGPT4ForConditionalGeneration(PreTrainedModel):
    """ViT -> Q-Former (learned queries) -> `llama_proj` -> placeholders in the LLaMA prompt -> next-token logits."""

    config_class = MiniGPT4Config  # explicit: the annotation is a string under `from __future__ import annotations`
    base_model_prefix = "minigpt4"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    _supports_sdpa = True
    _supports_attention_backend = True
    _keep_in_fp32_modules = ["query_tokens", "qformer"]  # as BLIP-2: the Q-Former's LayerNorm eps is 1e-12
    _no_split_modules = ["Blip2EncoderLayer", "Blip2QFormerMultiHeadAttention", "LlamaDecoderLayer"]

    def __init__(self, config: MiniGPT4Config) -> None:
        super().__init__(config)
        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.llama_proj = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MiniGPT4ForConditionalGeneration):
            init.normal_(module.query_tokens, mean=0.0, std=self.config.initializer_range)  # LAVIS init_Qformer

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, Q, H_text) projected query outputs: MiniGPT-4's `encode_img` (ln_vision = post_layernorm)."""
        image_embeds = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_out = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            return_dict=True,
        ).last_hidden_state
        return self.llama_proj(query_out.to(self.llama_proj.weight.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """The language model's output (`CausalLMOutputWithPast`) on the prompt with images spliced in.

        Args:
            input_ids: (B, L) with `num_query_tokens` placeholders per image row.
            attention_mask: (B, L), 1 on tokens.
            pixel_values: (N_img, 3, H, W) of the image rows in batch order, or None.
            labels: (B, L) optional LM labels (the LM shifts them).
            **kwargs: passed to the LM (output_hidden_states, use_cache, return_dict, ...).
        """
        feats = self.get_image_features(pixel_values) if pixel_values is not None else None
        embeds = embed_with_images(self.get_input_embeddings(), input_ids, self.config.image_token_index, feats)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @classmethod
    def from_minigpt4_checkpoint(
        cls,
        config: MiniGPT4Config,
        checkpoints: Sequence[str | os.PathLike],
        language_model: str | os.PathLike | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> MiniGPT4ForConditionalGeneration:
        """Build the model from the published MiniGPT-4 weights (LAVIS/MiniGPT-4 key names).

        Args:
            config: sizes matching the checkpoint (the defaults describe MiniGPT-4 with Vicuna-7B).
            checkpoints: `.pth` or `.safetensors` files merged in order, e.g. BLIP-2's LAVIS checkpoint
                (`visual_encoder.*`, `ln_vision.*`, `Qformer.bert.*`, `query_tokens`) and `pretrained_minigpt4.pth`
                (`{"model": {"llama_proj.weight", "llama_proj.bias"}}`); `llama_model.*` keys, if present, are the LM.
            language_model: a transformers directory (or hub name) of the Vicuna LM, MiniGPT-4's `llama_model`
                setting; when given, the checkpoints need no `llama_model.*` keys.
            dtype: dtype of the returned model.

        Raises:
            ModelLoadError: naming the keys that are unknown, missing or of the wrong shape.
        """
        model = cls(config)
        if language_model is not None:
            model.language_model = AutoModelForCausalLM.from_pretrained(
                language_model, dtype=torch.float32, use_safetensors=True
            )
            model.config.text_config = model.language_model.config
        load_minigpt4_weights(model, checkpoints, lm_loaded=language_model is not None)
        model.to(dtype)
        model.eval()
        return model

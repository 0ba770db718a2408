"""Qwen2-VL adapter (`Qwen2VLForConditionalGeneration`: ViT with 2x2 patch merger, Qwen2 LM with M-RoPE).

An image becomes `<|vision_start|>` + prod(grid_thw) / merge_size**2 `<|image_pad|>` + `<|vision_end|>` where the
template says `<image>`; the model scatters the merged patch features into the pad tokens. The expansion is
done here because `Qwen2VLProcessor` cannot be constructed without torchvision (platform.md §4.3): only the
image processor runs, giving a flat patch matrix `pixel_values` (patches, 3*2*14*14) and `image_grid_thw`.
`mm_token_type_ids` (1 at image pads) is always passed: transformers refuses image inputs without it, and it
is what places the image tokens on M-RoPE's 3-D grid; the model derives the position ids from it and the
attention mask, so padding on either side leaves a row's logits unchanged. Text-only rows carry no image tokens
(a batch with no image at all gets positions 0..L-1 that left padding offsets, harmless under RoPE's relative form).
Real checkpoint: `Qwen/Qwen2-VL-7B-Instruct` (chat template `<|im_start|>user\\n<image>{}<|im_end|>\\n...`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from odedit.models.base import ModelAdapter
from odedit.models.registry import ADAPTERS
from odedit.models.tokenizer import DEFAULT_CORPUS, build_word_tokenizer

# Special tokens of the tiny tokenizer, named as in the real Qwen2-VL vocabulary.
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>")


def _qwen2_vl_class():
    # deferred: transformers is imported only when a model is loaded
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (temporal, height, width) like the real model ([16, 24, 24] at 128)."""
    half = head_dim // 2
    spatial = half * 3 // 8
    return [half - 2 * spatial, spatial, spatial]


@ADAPTERS.decorator("qwen2_vl")
class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    model_type = "qwen2_vl"
    default_template = "<|im_start|>user\n<image>{}<|im_end|>\n<|im_start|>assistant\n"
    model_class = staticmethod(_qwen2_vl_class)
    MODULE_KINDS = {  # Qwen2 decoder layers use LLaMA's module names
        "ffn_in": "mlp.up_proj",
        "ffn_out": "mlp.down_proj",
        "attn_out": "self_attn.o_proj",
    }

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    def _image_block(self, image: Any) -> tuple[list[int], dict[str, torch.Tensor]]:
        proc_merge = getattr(self.image_processor, "merge_size", self.merge_size)
        if proc_merge != self.merge_size:
            raise ValueError(
                f"image processor merge_size={proc_merge} but the model's vision_config.spatial_merge_size="
                f"{self.merge_size}; save an image processor with merge_size={self.merge_size} beside the model"
            )
        feats = self.image_processor(images=[image.convert("RGB")], return_tensors="pt")
        grid = feats["image_grid_thw"]  # (1, 3): temporal, height, width patches
        n_tokens = int(grid.prod()) // self.merge_size**2
        cfg = self.model.config
        ids = [int(cfg.vision_start_token_id)] + [self.image_token_id] * n_tokens + [int(cfg.vision_end_token_id)]
        return ids, {"pixel_values": feats["pixel_values"], "image_grid_thw": grid}

    def _extra_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mm_token_type_ids": (input_ids == self.image_token_id).long()}

    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.model.model.language_model.layers

    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.visual

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
        image_side: int = 56,
        **_: Any,
    ) -> str:
        """A tiny Qwen2-VL (2-layer ViT, patch 14, merge 2; 2-layer LM) saved to `out_dir`.

        The image processor has min_pixels = max_pixels = image_side**2, so a square image becomes a
        (1, side/14, side/14) grid: 4 image tokens at the default 56 px.
        """
        # deferred: transformers is imported only when a tiny model is built
        from transformers import Qwen2VLConfig, Qwen2VLImageProcessorPil

        if image_side % 28:
            raise ValueError(f"build_tiny: image_side={image_side} must be a multiple of 28 (patch 14 x merge 2)")
        tok = build_word_tokenizer(
            corpus or DEFAULT_CORPUS,
            extra_specials=CHAT_SPECIALS + (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD),
            with_bos=False,
        )
        ids = {t: tok.convert_tokens_to_ids(t) for t in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)}
        torch.manual_seed(seed)
        vision = dict(
            depth=vision_layers,
            embed_dim=vision_hidden,
            hidden_size=text_hidden,
            num_heads=heads,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        text = dict(
            hidden_size=text_hidden,
            intermediate_size=2 * text_hidden,
            num_hidden_layers=text_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            vocab_size=len(tok),
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e4,
                "mrope_section": mrope_section(text_hidden // heads),
            },
        )
        config = Qwen2VLConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=ids[IMAGE_PAD],
            video_token_id=ids[VIDEO_PAD],
            vision_start_token_id=ids[VISION_START],
            vision_end_token_id=ids[VISION_END],
            tie_word_embeddings=False,
        )
        model = _qwen2_vl_class()(config)
        pixels = image_side * image_side
        processor = Qwen2VLImageProcessorPil(
            min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2, temporal_patch_size=2
        )
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        return str(out_dir)

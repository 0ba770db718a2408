"""Image placeholders: scatter per-image feature blocks into the token embeddings of a mixed batch.

Q-Former families (BLIP-2, InstructBLIP, MiniGPT-4) stand each image in `input_ids` with `num_query_tokens`
copies of a placeholder id; before the language model runs, the projected query outputs replace the embeddings
at those positions. Rows without an image simply carry no placeholder, so text-only and image rows can share one
batch (`features` then holds the image rows only, in batch order). Pure torch: no transformers import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class QueryTokenImages:
    """Adapter mixin of the Q-Former families: an image is `num_query_tokens` placeholders plus its pixels.

    Needs `self.model.config.num_query_tokens`, `self.image_processor` and an `image_token_id` property.
    """

    @property
    def num_query_tokens(self) -> int:
        return int(self.model.config.num_query_tokens)  # type: ignore[attr-defined]

    def _image_block(self, image: Any) -> tuple[list[int], dict[str, torch.Tensor]]:
        return self._image_blocks([image])[0]

    def _image_blocks(self, images: Sequence[Any]) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
        return self._fixed_pixel_blocks(images, self.num_query_tokens)  # type: ignore[attr-defined]


def embed_with_images(
    embed_tokens: nn.Module, input_ids: torch.Tensor, image_token_id: int, features: torch.Tensor | None
) -> torch.Tensor:
    """Token embeddings of `input_ids` with image features written over the placeholder positions.

    Placeholder ids are looked up as id 0 before being overwritten, so the placeholder may lie outside the
    language model's vocabulary (MiniGPT-4's Vicuna has no image token of its own).

    Args:
        embed_tokens: the language model's input embedding.
        input_ids: (B, L) token ids, `num_query_tokens` placeholders per image row.
        image_token_id: the placeholder id.
        features: (N_img, Q, H) features of the image rows in batch order, or None for a text-only batch.

    Returns:
        (B, L, H) input embeddings.

    Raises:
        ValueError: when the number of placeholder positions is not N_img * Q.
    """
    mask = input_ids == image_token_id
    embeds = embed_tokens(input_ids.masked_fill(mask, 0))
    n_slots = int(mask.sum())
    n_feats = 0 if features is None else features.shape[0] * features.shape[1]
    if n_slots != n_feats:
        raise ValueError(
            f"input_ids: {n_slots} image placeholder positions (id {image_token_id}) but {n_feats} image feature "
            "vectors; every image row needs exactly num_query_tokens placeholders and pixel_values must hold the "
            "image rows only, in batch order"
        )
    if features is None or n_feats == 0:
        return embeds
    flat = features.reshape(-1, features.shape[-1]).to(device=embeds.device, dtype=embeds.dtype)
    return embeds.masked_scatter(mask.unsqueeze(-1), flat)

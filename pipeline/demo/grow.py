"""Grow a trained demo LLaVA into a deeper one by block expansion (LLaMA Pro, Wu et al. 2024, arXiv 2401.02415).

    expand_blocks(adapter, layers=6)      # in place: the same function, more decoder layers

The deep demo backbone (issue 17 item 5) is the small one grown: its 2 trained decoder layers stay at the bottom
and the top of the new stack, and every new layer is a copy of its nearest trained layer with the two projections
that write into the residual stream (`self_attn.o_proj`, `mlp.down_proj`) set to zero, so each new block adds
nothing and the grown model computes exactly what the small one did (tested: equal logits). Joint training then
makes the new layers useful (`pipeline.demo.model`). Trained from scratch with the small model's recipe, a 6-layer
demo LM stayed well below the acceptance bars after the same 2,100 steps (VQA 93.5%, text facts 85.6%; 17 min on a
loaded machine); grown and trained 600 more steps it scored VQA 99.2%, every type >= 98.9%, text 96.5% (the whole
test set; docs/results.md "A deeper demo backbone").
"""

from __future__ import annotations

import copy

from torch import nn

from odedit.models.llava import LlavaAdapter

# Projections of a LLaMA decoder layer that write into the residual stream: zero makes the block an identity.
RESIDUAL_WRITERS = ("self_attn.o_proj", "mlp.down_proj")


def expansion_plan(old: int, new: int) -> list[int | None]:
    """For each of `new` layers, the index of the trained layer it *is* (None: a new block). The trained layers
    keep their order and are spread so the first is at the bottom and the last at the top."""
    if not 1 <= old <= new:
        raise ValueError(f"cannot grow {old} decoder layers into {new}")
    if old == 1:
        return [0] + [None] * (new - 1)
    slots = {round(i * (new - 1) / (old - 1)): i for i in range(old)}
    return [slots.get(p) for p in range(new)]


def _nearest(plan: list[int | None], position: int) -> int:
    kept = [p for p, i in enumerate(plan) if i is not None]
    return plan[min(kept, key=lambda p: (abs(p - position), p))]


def expand_blocks(adapter: LlavaAdapter, layers: int) -> None:
    """Grow `adapter`'s language model to `layers` decoder layers in place, computing the same function."""
    lm = adapter.model.model.language_model
    trained = list(lm.layers)
    plan = expansion_plan(len(trained), layers)
    stack = []
    for position, index in enumerate(plan):
        if index is not None:
            block = trained[index]
        else:
            block = copy.deepcopy(trained[_nearest(plan, position)])
            for path in RESIDUAL_WRITERS:
                writer = block.get_submodule(path)
                nn.init.zeros_(writer.weight)
                if writer.bias is not None:
                    nn.init.zeros_(writer.bias)
        block.self_attn.layer_idx = position  # the KV cache's slot of this layer
        stack.append(block)
    lm.layers = nn.ModuleList(stack)
    text = adapter.model.config.text_config
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None):
        text.layer_types = [text.layer_types[0]] * layers

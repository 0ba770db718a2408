"""Checks every model adapter must pass, shared by the per-family test files (each passes its own adapter).

Not a test module itself: `test_<family>.py` calls these with a tiny adapter and its family's expectations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from testdata import make_image

from odedit.models import ADAPTERS, ModelAdapter, Sample


def mixed_rows() -> list[Sample]:
    """Image rows of two sizes around a text-only row, with answers of one and two tokens."""
    return [
        Sample("what color is the shape ?", "red", make_image((255, 0, 0), seed=1)),
        Sample("capital of france", "paris"),
        Sample("is there a circle in the image", "yes no", make_image((0, 0, 255), size=48, seed=2)),
    ]


def text_rows() -> list[Sample]:
    return [Sample("capital of france", "paris"), Sample("who wrote this ? describe the photo", "no")]


def check_loss_and_backward(adapter: ModelAdapter, image_param: torch.Tensor) -> None:
    """Answer-position cross-entropy is finite and reaches an LM weight and `image_param` (the image path)."""
    adapter.model.zero_grad(set_to_none=True)
    out = adapter.run(mixed_rows())
    assert out.answer_logits().shape == (4, adapter.model.get_output_embeddings().weight.shape[0])
    loss = F.cross_entropy(out.answer_logits(), out.answer_targets())
    assert torch.isfinite(loss)
    loss.backward()
    ffn_in = next(iter(adapter.edit_modules(["ffn_in"], [0]).values()))
    assert ffn_in.weight.grad is not None and ffn_in.weight.grad.abs().sum() > 0
    assert image_param.grad is not None and image_param.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in adapter.model.parameters() if p.grad is not None)
    adapter.model.zero_grad(set_to_none=True)


def check_batch_invariance(adapter: ModelAdapter, samples: list[Sample], padding_side: str) -> None:
    """Each row's answer logits, targets and pooled state are those of the row run alone."""
    with torch.no_grad():
        out = adapter.run(samples, padding_side=padding_side)
        for b, sample in enumerate(samples):
            assert out.answer_targets()[out.answer_row() == b].tolist() == adapter._tok(" " + sample.target)
            alone = adapter.run([sample], padding_side=padding_side)
            assert torch.allclose(out.logits[b][out.batch.answer_mask[b]], alone.answer_logits(), atol=1e-5)
            assert torch.allclose(out.pooled("last")[b], alone.pooled("last")[0], atol=1e-5)
            assert torch.allclose(out.pooled("mean")[b], alone.pooled("mean")[0], atol=1e-5)


def check_generate(adapter: ModelAdapter) -> None:
    """`generate` returns one string per row; its first step is the argmax after the last prompt token."""
    rows = [Sample(s.prompt, image=s.image) for s in mixed_rows()]
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


def check_round_trip(adapter: ModelAdapter, family: str, out_dir) -> ModelAdapter:
    """save_pretrained then from_pretrained gives bit-identical logits; returns the reloaded adapter."""
    adapter.save_pretrained(out_dir)
    again = ADAPTERS.get(family).from_pretrained(str(out_dir))
    rows = mixed_rows()
    with torch.no_grad():
        assert torch.equal(adapter.run(rows).logits, again.run(rows).logits)
    return again


def check_bfloat16(family: str, model_dir: str) -> None:
    """Loading in bfloat16 (the GPU default) runs mixed batches with finite bfloat16 logits."""
    adapter = ADAPTERS.get(family).from_pretrained(model_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        out = adapter.run(mixed_rows())
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert out.answer_logits().shape[0] == 4

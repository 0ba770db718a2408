"""InstructBLIP adapter (`InstructBlipForConditionalGeneration`: ViT, instruction-aware Q-Former, Vicuna/LLaMA LM).

Same layout as BLIP-2 (`num_query_tokens` placeholders before BOS, scattered by the adapter so text-only and
image rows mix), plus the instruction: the Q-Former also reads the prompt text, tokenised by its own BERT-style
tokenizer (`qformer_input_ids` / `qformer_attention_mask`, image rows only, right-padded). Real checkpoints keep
that tokenizer in the subfolder `qformer_tokenizer` (e.g. `Salesforce/instructblip-vicuna-7b`); `from_pretrained`
and `save_pretrained` read and write it there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from odedit.models.base import EncodedBatch, ModelAdapter, ModelLoadError, Sample
from odedit.models.blip2 import Blip2OptAdapter, tiny_query_tokens_
from odedit.models.registry import ADAPTERS
from odedit.models.tokenizer import DEFAULT_CORPUS, build_word_tokenizer

QFORMER_TOKENIZER_DIR = "qformer_tokenizer"


def _instructblip_class():
    # deferred: transformers is imported only when a model is loaded
    from transformers import InstructBlipForConditionalGeneration

    return InstructBlipForConditionalGeneration


def load_qformer_tokenizer(name_or_path: str) -> Any:
    """The Q-Former tokenizer stored under `<name_or_path>/qformer_tokenizer` (local dir or hub name)."""
    # deferred: transformers is imported only when a model is loaded
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, subfolder=QFORMER_TOKENIZER_DIR)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"model.name_or_path: {name_or_path!r} has no usable Q-Former tokenizer in the subfolder "
            f"{QFORMER_TOKENIZER_DIR!r} ({exc}); save the InstructBLIP checkpoint with its qformer_tokenizer "
            "(as Salesforce/instructblip-* and InstructBlipAdapter.save_pretrained do)"
        ) from None


@ADAPTERS.decorator("instructblip")
class InstructBlipAdapter(Blip2OptAdapter):
    family = "instructblip"
    model_type = "instructblip"
    default_template = "Question: {} Short answer:"
    model_class = staticmethod(_instructblip_class)
    MODULE_KINDS = ModelAdapter.MODULE_KINDS  # LLaMA/Vicuna names
    RESIDUAL_INPUTS = ModelAdapter.RESIDUAL_INPUTS
    max_qformer_tokens = 128  # LAVIS InstructBLIP's max_txt_len for the Q-Former instruction

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, image_processor: Any, qformer_tokenizer: Any = None, **kwargs: Any
    ) -> None:
        super().__init__(model, tokenizer, image_processor, **kwargs)
        self.qformer_tokenizer = qformer_tokenizer

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> InstructBlipAdapter:
        adapter = super().from_pretrained(name_or_path, **kwargs)
        if adapter.qformer_tokenizer is None:
            adapter.qformer_tokenizer = load_qformer_tokenizer(name_or_path)
        return adapter

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        super().save_pretrained(out_dir)
        self.qformer_tokenizer.save_pretrained(os.path.join(out_dir, QFORMER_TOKENIZER_DIR))

    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.model.language_model.model.layers

    def encode(
        self, samples: Sequence[Sample], padding_side: str = "right", append_eos: bool = False, with_target: bool = True
    ) -> EncodedBatch:
        """The base encoding plus the Q-Former's view of each image row's instruction (the filled template)."""
        batch = super().encode(samples, padding_side=padding_side, append_eos=append_eos, with_target=with_target)
        texts = [self._prompt_parts(s.prompt, has_image=False)[1] for s in samples if s.image is not None]
        if texts:
            if self.qformer_tokenizer is None:
                raise ValueError(
                    "InstructBlipAdapter.qformer_tokenizer is None; load the adapter with "
                    "from_pretrained or pass qformer_tokenizer= (the checkpoint's qformer_tokenizer)"
                )
            enc = self.qformer_tokenizer(
                texts,
                padding="longest",
                truncation=True,
                max_length=self.max_qformer_tokens,
                padding_side="right",
                return_tensors="pt",
            )
            batch.inputs["qformer_input_ids"] = enc["input_ids"]
            batch.inputs["qformer_attention_mask"] = enc["attention_mask"]
        return batch

    def _image_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            qformer_input_ids=inputs["qformer_input_ids"],
            qformer_attention_mask=inputs["qformer_attention_mask"],
            return_dict=True,
        )
        return out.pooler_output

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
        """A tiny InstructBLIP (ViT 32 px / patch 8, 2-layer Q-Former with 4 queries, 2-layer LLaMA) saved to
        `out_dir`, with a word-level Q-Former tokenizer in `out_dir/qformer_tokenizer`."""
        # deferred: transformers is imported only when a tiny model is built
        from transformers import (
            BlipImageProcessor,
            InstructBlipConfig,
            InstructBlipQFormerConfig,
            InstructBlipVisionConfig,
            LlamaConfig,
        )

        words = corpus or DEFAULT_CORPUS
        tok = build_word_tokenizer(words, extra_specials=("<image>",))
        qtok = build_word_tokenizer(words, extra_specials=(), with_bos=False)
        torch.manual_seed(seed)
        vc = InstructBlipVisionConfig(
            hidden_size=vision_hidden,
            intermediate_size=2 * vision_hidden,
            num_hidden_layers=vision_layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
            initializer_range=0.02,
        )
        qc = InstructBlipQFormerConfig(
            vocab_size=len(qtok),
            hidden_size=qformer_hidden,
            intermediate_size=2 * qformer_hidden,
            num_hidden_layers=qformer_layers,
            num_attention_heads=heads,
            max_position_embeddings=cls.max_qformer_tokens,
            pad_token_id=qtok.pad_token_id,
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
        config = InstructBlipConfig(
            vision_config=vc,
            qformer_config=qc,
            text_config=tc,
            num_query_tokens=num_query_tokens,
            image_token_index=tok.convert_tokens_to_ids("<image>"),
        )
        model = _instructblip_class()(config)
        tiny_query_tokens_(model, seed)
        processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        qtok.save_pretrained(os.path.join(out_dir, QFORMER_TOKENIZER_DIR))
        processor.save_pretrained(out_dir)
        return str(out_dir)

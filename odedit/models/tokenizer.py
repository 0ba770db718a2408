"""Offline word-level tokenizers for tiny and demo models (no hub needed).

Built with the `tokenizers` library and wrapped as a transformers fast tokenizer, so it saves with
`save_pretrained` and loads back with `AutoTokenizer.from_pretrained` like any real tokenizer.
The vocabulary covers the given corpus (questions *and* answers: an answer missing from the vocabulary would
become `<unk>`, platform.md §4.2); matching is case-insensitive and punctuation is split off.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

BASE_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")

# A small generic corpus so that tiny test models can encode the prompts used across the test-suite.
DEFAULT_CORPUS = (
    "question : short answer what color is the shape ? is there a red blue green yellow gray black teal brown",
    "circle rectangle triangle does the image contain not yes no who wrote which city capital of france paris",
    "the a an in on it this that what is shown image picture photo describe user assistant answer",
    "0 1 2 3 4 5 6 7 8 9 . , ! - ' \" ( ) / : ; caption of",
)


def build_word_tokenizer(
    corpus: Iterable[str] = DEFAULT_CORPUS,
    extra_specials: Sequence[str] = ("<image>",),
    named_specials: Mapping[str, str] | None = None,
    with_bos: bool = True,
):
    """A word-level `PreTrainedTokenizerFast` over `corpus`.

    Args:
        corpus: texts whose words (lower-cased, punctuation split off) form the vocabulary.
        extra_specials: special tokens after `<pad> <unk> <s> </s>` (ids 0-3), e.g. `<image>` (id 4).
        named_specials: attribute name -> token, set as `tok.<name>` (e.g. {"image_token": "<image>"}).
        with_bos: declare `<s>` as BOS (Qwen-style tokenizers have none).
    """
    # deferred: tokenizers/transformers only when a tiny model's tokenizer is built
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(BASE_SPECIALS) + [s for s in extra_specials if s not in BASE_SPECIALS]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.train_from_iterator(list(corpus), trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1))
    kwargs = dict(
        tokenizer_object=tok,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=[s for s in specials if s not in BASE_SPECIALS],
    )
    if with_bos:
        kwargs["bos_token"] = "<s>"
    if named_specials:
        kwargs["extra_special_tokens"] = dict(named_specials)
    fast = PreTrainedTokenizerFast(**kwargs)
    return fast

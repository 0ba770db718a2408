"""Target words the model's tokenizer does not know (issue 19 item 18).

    unknown_words, vocabulary = target_check(tokenizer)    # (None, "") for a tokenizer without <unk>
    unknown_words("a zorblax")                             # -> ["zorblax"]

A target whose words the tokenizer maps to `<unk>` makes an edit trivially "reliable": the edited model has only
to emit `<unk>` (teacher-forced accuracy compares token ids), and every unknown word is the same token. So
preparation (`pipeline.prepare`), where the records first meet the resolved model, runs each kept record's
target through that model's tokenizer on the driver and quarantines it (`target_unknown_tokens`) with the
words named. Byte-level tokenizers (OPT, Qwen2, most hub models) have no `<unk>` and never produce it; the check
costs nothing there. `vocabulary` (the sha256 of the tokenizer's vocabulary) goes into the shards' fingerprint,
so another tokenizer re-checks the records.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

UnknownWords = Callable[[str], list[str]]


def target_check(tokenizer: Any) -> tuple[UnknownWords | None, str]:
    """(text -> the words of it that become `<unk>`, identity of the vocabulary); (None, "") when the
    tokenizer has no `<unk>` token."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return None, ""
    vocab = tokenizer.get_vocab()
    identity = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=True).encode()).hexdigest()

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def unknown_words(text: str) -> list[str]:
        # [INFERENCE] the target as the adapters feed it (after a space, as EasyEdit's " " + target) and alone
        if unk not in ids(text) and unk not in ids(" " + text):
            return []
        words = [w for w in text.split() if unk in ids(w) or unk in ids(" " + w)]
        return words or [text]

    return unknown_words, identity

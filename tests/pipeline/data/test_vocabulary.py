"""pipeline.data.vocabulary: target words a tokenizer makes <unk> are named, and such records are quarantined
(issue 19 item 18)."""

from __future__ import annotations

from odedit.models.tokenizer import build_word_tokenizer
from pipeline.data import quarantine as q
from pipeline.data.shards import validate_records
from pipeline.data.vocabulary import target_check

RECORD = {"id": "a", "src": "What colour is the shape?", "alt": "red"}


def test_unknown_target_words_are_named_and_the_record_quarantined(record_outcome):
    unknown_words, vocabulary = target_check(build_word_tokenizer())
    assert unknown_words("red") == [] and unknown_words("a red circle") == []
    assert unknown_words("zorblax red quux") == ["zorblax", "quux"]
    assert len(vocabulary) == 64
    good, bad = validate_records(
        [RECORD, dict(RECORD, id="b", alt="zorblax")], "mmedit", 2000, unknown_words=unknown_words
    )
    assert [i for i, _ in good] == [0]
    assert bad[0]["codes"] == [q.UNKNOWN_TOKENS]
    assert bad[0]["reasons"][0].startswith("target: 'zorblax' not in the model's tokenizer vocabulary")
    record_outcome(
        "bad record",
        "target words the tokenizer does not know (<unk>)",
        "quarantined (target_unknown_tokens)",
        bad[0]["reasons"][0],
    )


def test_a_tokenizer_without_unk_checks_nothing():
    class ByteLevel:
        unk_token_id = None

    assert target_check(ByteLevel()) == (None, "")


def test_another_vocabulary_has_another_identity():
    _, one = target_check(build_word_tokenizer())
    _, other = target_check(build_word_tokenizer(["zorblax is a word"]))
    assert one != other

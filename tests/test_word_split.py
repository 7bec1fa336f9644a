"""How ``/v1/pos`` and ``/v1/polarity`` split raw text into words (service/preprocess/words.py).

The POS tagger is trained and scored on the treebank's own tokens; a client sending text
gets the words the tokenizer's pattern finds. Where they differ from the treebank's (``Mr.``
cut into ``Mr`` + ``.``, ``40-year-old`` into ``40`` + ``-`` + ``year-old``), text requests
were tagged 1.6 points worse than the same sentences sent as tokens (0.946 against 0.962 on
the test split).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.preprocess.words import WordEncoder, build_word_tokenizer
from training.data.treebank import load_treebank

REPO = Path(__file__).resolve().parents[1]
POS_TOKENIZER = REPO / "models" / "pos-en" / "1" / "tokenizer.json"

# (text, the treebank's tokens)
CASES = [
    (
        "Mr. Vinken , 61-year-old chairman of Elsevier N.V. , retired in the 1980s .",
        [
            "Mr.",
            "Vinken",
            ",",
            "61-year-old",
            "chairman",
            "of",
            "Elsevier",
            "N.V.",
            ",",
            "retired",
            "in",
            "the",
            "1980s",
            ".",
        ],
    ),  # fmt: skip
    (
        "Mrs. Smith of Acme Corp. , a N.J.-based unit of S&P , met Dr. J. Doe on Oct. 5 .",
        [
            "Mrs.",
            "Smith",
            "of",
            "Acme",
            "Corp.",
            ",",
            "a",
            "N.J.-based",
            "unit",
            "of",
            "S&P",
            ",",
            "met",
            "Dr.",
            "J.",
            "Doe",
            "on",
            "Oct.",
            "5",
            ".",
        ],
    ),  # fmt: skip
    (
        "It was n't the 3.5-inch disk from the '80s that Macmillan/McGraw-Hill sold .",
        [
            "It",
            "was",
            "n't",
            "the",
            "3.5-inch",
            "disk",
            "from",
            "the",
            "'80s",
            "that",
            "Macmillan/McGraw-Hill",
            "sold",
            ".",
        ],
    ),  # fmt: skip
    # Unchanged behaviour: clitics, numbers, punctuation, a sentence-final period.
    (
        "She doesn't own 1,000 cars, John's friend said: (1/2) ... ok.",
        [
            "She",
            "does",
            "n't",
            "own",
            "1,000",
            "cars",
            ",",
            "John",
            "'s",
            "friend",
            "said",
            ":",
            "(",
            "1/2",
            ")",
            "...",
            "ok",
            ".",
        ],
    ),  # fmt: skip
    ("I paid 5 dollars in 1990.", ["I", "paid", "5", "dollars", "in", "1990", "."]),
]


def _split(encoder: WordEncoder, text: str) -> list[str]:
    return encoder.split([text])[0]


@pytest.mark.parametrize(("text", "tokens"), CASES)
def test_new_tokenizers_split_like_the_treebank(text, tokens):
    encoder = WordEncoder(build_word_tokenizer(["the"]))
    assert _split(encoder, text) == tokens


@pytest.mark.parametrize(("text", "tokens"), CASES)
def test_committed_pos_tokenizer_splits_like_the_treebank(text, tokens):
    encoder = WordEncoder.load(POS_TOKENIZER)
    assert _split(encoder, text) == tokens


def _treebank() -> Path | None:
    for cand in (
        os.environ.get("NLPSERVE_DATA_DIR"),
        REPO.parent / "shared" / "data",
        "/work/shared/data",
    ):
        if cand and (Path(cand) / "nltk_data").is_dir():
            return Path(cand)
    return None


@pytest.mark.skipif(_treebank() is None, reason="shared data not available")
def test_treebank_sentences_sent_as_text_get_their_own_tokens():
    corpus = load_treebank(_treebank())  # type: ignore[arg-type]
    encoder = WordEncoder.load(POS_TOKENIZER)
    got = encoder.split([" ".join(s) for s in corpus.sentences])
    same = sum(g == s for g, s in zip(got, corpus.sentences, strict=True))
    # 2,885 of 3,914 (74%) before, 3,835 (98%) now; the rest are rarities (O'Brien, US$,
    # Sino-U.S., Mass., sentence-final abbreviations).
    assert same / len(corpus.sentences) > 0.97

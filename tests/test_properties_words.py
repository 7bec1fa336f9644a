"""Properties of the LSTM models' word splitting (service/preprocess/words.py), for both
patterns and the committed tokenizers: the words are the text's own characters, in order,
non-empty and without whitespace, and together they are every other character of it but
the invisible ones (format characters and C0 controls, removed before splitting).
The POS and polarity answers are per word of this split, and the POS endpoint returns
each word's text: a character lost or repeated here is wrong in the reply."""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.preprocess.words import (
    PTB_PATTERN,
    TREEBANK_PATTERN,
    WordEncoder,
    build_word_tokenizer,
)

MODELS = Path(__file__).resolve().parents[1] / "models"
# Unicode's White_Space property (Rust's char::is_whitespace, which tokenizers splits on);
# Python's str.isspace() also counts \x1c-\x1f, which are not whitespace there.
WHITE_SPACE = set("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000")
WHITE_SPACE |= {chr(c) for c in range(0x2000, 0x200B)}


def _skipped(c: str) -> bool:
    """Whitespace, or a character words.INVISIBLE_PATTERN removes."""
    return (
        c in WHITE_SPACE
        or unicodedata.category(c) == "Cf"
        or (ord(c) < 0x20 or c == "\x7f")
        and c not in "\t\n\x0b\x0c\r"
    )


CHUNKS = ["3", "U.S.", "N.J.-based", "Mr.", "no.", "n't", "'s", "'S", "'80s", "3.5", "1,000"]
CHUNKS += ["1/2", "40-year-old", "S&P", "--", "...", "``", "''", "don't", "İ", "ß", "ﬁ"]
# where a text without whitespace may be cut (words._CUT_CANDIDATE), or looks as if (Ⓐ is a
# symbol to Python and a word character to the tokenizer's regex)
CHUNKS += ["!", "(", "?!", "😀", "Ⓐ", "!\u0301", "'1", "1s"]
CHUNKS += [
    "Σ",
    "\u0301",
    "\u200b",
    "\ufeff",
    "\u202e",
    "\x00",
    "\x08",
    "\x1c",
    "\x96",
    "中文",
    "é",
    " ",
    "  ",
    "\t",
    "\n",
    "\xa0",
    "\u3000",
]
texts = st.one_of(
    st.lists(st.sampled_from(CHUNKS) | st.text(max_size=3), max_size=20).map("".join),
    st.text(max_size=40),
)


@functools.cache
def _encoder(name: str) -> WordEncoder:
    if name in ("ptb", "treebank"):
        pattern = PTB_PATTERN if name == "ptb" else TREEBANK_PATTERN
        return WordEncoder(build_word_tokenizer(["the"], pattern=pattern))
    return WordEncoder.load(MODELS / name / "1" / "tokenizer.json")


SPLITTERS = ["ptb", "treebank"] + sorted(
    p.parent.parent.name
    for p in MODELS.glob("*-en/1/tokenizer.json")
    if "pos" in str(p) or "polarity" in str(p)
)


@pytest.mark.parametrize("name", SPLITTERS)
@given(text=texts)
def test_words_are_the_texts_characters_in_order(name: str, text: str) -> None:
    (words,) = _encoder(name).split([text])
    pos = 0
    for word in words:  # each word is the text's next run of characters past whitespace
        while _skipped(text[pos]):
            pos += 1
        assert word and text.startswith(word, pos), (text, words)
        assert not WHITE_SPACE & set(word), (text, words)
        assert not _skipped(word[-1]), (text, words)  # nor invisible at either end
        pos += len(word)
    assert all(_skipped(c) for c in text[pos:]), (text, words)


@pytest.mark.parametrize("name", SPLITTERS)
def test_a_character_lowercased_to_two_is_not_split_in_two(name: str) -> None:
    """Found by the property above: "İ" lowercases to "i" + U+0307, the treebank pattern
    ends a number's word after the "i", and both pieces mapped back to the "İ"."""
    (words,) = _encoder(name).split(["3İstanbul 0İ x"])
    assert "".join(words) == "3İstanbul0İx"


long_texts = st.lists(st.sampled_from(CHUNKS) | st.text(max_size=3), max_size=120).map("".join)


@pytest.mark.parametrize("name", SPLITTERS)
@given(text=long_texts, max_tokens=st.integers(0, 6))
def test_a_prefix_split_gives_the_texts_first_tokens(name: str, text: str, max_tokens: int):
    """``split(.., max_tokens)`` may stop early (a prefix cut at whitespace, from 8 characters
    a token): its tokens are the text's first ones, and more than ``max_tokens`` of them
    exactly when the whole text has more (polarity reads the first ``max_length`` and says
    whether it truncated)."""
    encoder = _encoder(name)
    (whole,) = encoder.split([text])
    (some,) = encoder.split([text], max_tokens=max_tokens)
    assert some == whole[: len(some)], (text, some, whole)
    assert (len(some) > max_tokens) == (len(whole) > max_tokens), (text, some, whole)
    assert some[: max_tokens + 1] == whole[: max_tokens + 1]


def test_a_long_text_is_split_only_as_far_as_the_model_reads() -> None:
    """A 20,000-character text for a model that reads 96 tokens: a few hundred words are
    split, not all ~3,300 (each one a Python string; a burst of such requests held ~250 MB)."""
    encoder = _encoder(next(n for n in SPLITTERS if "polarity" in n))
    text = ("the film was a charming , funny and moving story . " * 400)[:20_000]
    (whole,) = encoder.split([text])
    (some,) = encoder.split([text], max_tokens=96)
    assert len(whole) > 3000 and 96 < len(some) <= 8 * 97
    [enc] = encoder.encode_texts([text], max_tokens=96)
    assert enc.tokens == whole[: len(enc)] and len(enc) > 96


class _Counting(WordEncoder):
    """A WordEncoder that counts the characters it splits."""

    chars = 0

    def split(self, texts: Sequence[str], max_tokens: int | None = None) -> list[list[str]]:
        if max_tokens is None:
            self.chars += sum(len(t) for t in texts)
        return super().split(texts, max_tokens)


@pytest.mark.parametrize("name", [n for n in SPLITTERS if n.endswith("-en")])
@pytest.mark.parametrize("text", ["!" * 20_000, "😀" * 20_000, "a!" * 10_000, "(don't)" * 3_000])
def test_a_text_without_whitespace_is_split_only_as_far_as_the_model_reads(name: str, text: str):
    """Cut at whitespace only, 20,000 "!" were split whole (20,000 words, ~70x the cost of an
    English text of that length) for a model that reads 96: now cut after a character the
    pattern always makes a word of its own, as at whitespace, with the same first words."""
    encoder = _Counting(_encoder(name).tokenizer)
    (some,) = encoder.split([text], max_tokens=96)
    assert encoder.chars <= 2 * 8 * 97, encoder.chars  # a prefix or two, not the text
    (whole,) = encoder.split([text])
    assert some == whole[:97]


@pytest.mark.parametrize("name", ["ptb", "treebank", *(n for n in SPLITTERS if n.endswith("-en"))])
def test_no_cut_after_a_character_the_pattern_joins(name: str):
    """Only characters the tokenizer's own regex sees as neither word nor joiner are cut
    after; a tokenizer whose splitting is not this module's is cut at whitespace only."""
    isolates = _encoder(name)._isolates
    assert isolates is not None
    assert all(isolates(c) for c in '!?(){}[]"#$%*+;<=>@\\^|~😀€«»')
    assert not any(isolates(c) for c in ".,:/-&'`_aZ0中Ⓐ\u0301\u200b\x00")
    other = build_word_tokenizer(["the"], pattern=r"\w+|[^\s\w]")
    assert WordEncoder(other)._isolates is None

"""Properties of service/preprocess/ascii_wordpiece.py, against ``tokenizers`` as the oracle.

For every text, the fast path either declines (``None``: ``tokenizers`` encodes it) or gives
exactly ``tokenizers``' ids and overflow flag, under the truncation ``ClassifyEncoder`` sets;
and it declines only what it must: non-ASCII text, and text holding an added token.
Tokenizers: random BERT WordPiece pipelines over small vocabularies (pieces, ``unk``, words
past ``max_input_chars_per_word``, cased and uncased, each continuation prefix), and the
committed models' own.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from service.preprocess.ascii_wordpiece import AsciiWordPiece
from service.preprocess.classify import ClassifyEncoder
from service.preprocess.tokenizer import load_tokenizer

MODELS = Path(__file__).resolve().parents[1] / "models"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Text: ASCII word characters, punctuation and whitespace of every kind, control characters
# (clean_text drops or spaces them), and what the fast path must hand over: accents (the
# uncased normalizer strips them), zero-width and other non-ASCII characters, special tokens.
CHUNKS = [
    *"abcxABCX07 ",
    *"!#$+-.[]^`~_'\"",
    *"\t\n\r\x0b\x0c\x1c\x1f\x00\x01\x7f",
    *"\x85\xa0\u2028\u3000\u200b\ufeff\u00ad",
    *"éÉ\u0301中ﬁ",
    "[SEP]",
    "[sep]",
    "[UNK]",
    "[MASK",
    "ab",
    "abc",
    "cab",
    "Xab07",
    "abcabcabcabcab",
    "  ",
    " ...",
]
texts = st.lists(st.sampled_from(CHUNKS), max_size=40).map("".join)
ascii_texts = st.lists(
    st.sampled_from([c for c in CHUNKS if c.isascii() and "[" not in c]), max_size=40
).map("".join)


@st.composite
def bert_tokenizers(draw: st.DrawFn) -> Tokenizer:
    """A random tokenizer of the pipeline the fast path restates."""
    prefix = draw(st.sampled_from(["##", "@@", ""]))
    # Short tokens over few characters: most words of the tests' texts split into pieces.
    stems = draw(st.lists(st.text("abcA0!", min_size=1, max_size=3), min_size=1, max_size=10))
    pieces = draw(st.lists(st.text("abcA0", min_size=1, max_size=2), max_size=8))
    vocab: dict[str, int] = {}
    for token in [*SPECIALS, *stems, *(prefix + p for p in pieces)]:
        vocab.setdefault(token, len(vocab))
    max_chars = draw(st.integers(1, 12))
    tok = Tokenizer(
        WordPiece(
            vocab,
            unk_token="[UNK]",
            continuing_subword_prefix=prefix,
            max_input_chars_per_word=max_chars,
        )
    )
    bert = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=draw(st.booleans()),
        strip_accents=draw(st.sampled_from([None, True, False])),
        lowercase=draw(st.booleans()),
    )
    forms = draw(st.lists(st.sampled_from([normalizers.NFC(), normalizers.NFKC()]), max_size=1))
    tok.normalizer = normalizers.Sequence([*forms, bert]) if forms else bert
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    if draw(st.booleans()):
        tok.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    tok.add_special_tokens(SPECIALS)
    return tok


def _agrees(enc: ClassifyEncoder, text: str) -> bool:
    """Whether the fast path took ``text``; asserts it gave tokenizers' encoding if so."""
    assert enc.ascii is not None
    got = enc.ascii.encode(text)
    if got is None:
        return False
    want = enc.tokenizer.encode(text)
    assert got == (want.ids, bool(want.overflowing)), repr(text)
    return True


def _words_of(tok: Tokenizer) -> st.SearchStrategy[str]:
    """ASCII texts of the tokenizer's own tokens (continuation prefix dropped) run together
    or spaced, so words split into pieces often, fall back to unk, or pass max_chars."""
    prefix = tok.model.continuing_subword_prefix
    own = sorted({t.removeprefix(prefix) if prefix else t for t in tok.get_vocab()} - {*SPECIALS})
    chunks = st.lists(st.sampled_from([*own, "a", "A", " ", "\t", "!"]), min_size=1, max_size=20)
    return st.tuples(st.sampled_from([" ", ""]), chunks).map(lambda sc: sc[0].join(sc[1]))


@given(bert_tokenizers(), st.integers(2, 24), st.data())
def test_random_pipelines_take_ascii_text_with_tokenizers_ids(tok, max_length, data) -> None:
    enc = ClassifyEncoder(tok, max_length=max_length)
    for text in data.draw(st.lists(_words_of(tok), min_size=1, max_size=4)):
        assert _agrees(enc, text), repr(text)  # ASCII without an added token: taken


@given(bert_tokenizers(), st.integers(2, 24), st.lists(texts, min_size=1, max_size=4))
def test_random_pipelines_hand_over_only_what_they_must(tok, max_length, batch) -> None:
    enc = ClassifyEncoder(tok, max_length=max_length)
    for text in batch:
        took = _agrees(enc, text)
        if not text.isascii():
            assert not took, repr(text)
        elif "[" not in text:  # no added token: nothing to hand over
            assert took, repr(text)
    # The batch path keeps order across fast and handed-over texts.
    want = [enc.tokenizer.encode(t) for t in batch]
    assert [e.input_ids.tolist() for e in enc.encode(batch)] == [w.ids for w in want]


@given(bert_tokenizers(), st.integers(2, 12), st.integers(-1, 1), st.data())
def test_texts_at_the_truncation_length(tok, max_length, delta, data) -> None:
    """Texts of exactly max_length - 2 words that are whole in the vocabulary, one fewer,
    one more: cut only past the limit, [SEP] kept."""
    vocab = tok.get_vocab()
    words = sorted(w for w in vocab if w not in SPECIALS and w.isalnum() and w == w.lower())
    if not words:
        words = ["[UNK]"]  # the special token is handed over; the property still holds
    n = max(0, max_length - 2 + delta)
    text = " ".join(data.draw(st.lists(st.sampled_from(words), min_size=n, max_size=n)))
    enc = ClassifyEncoder(tok, max_length=max_length)
    _agrees(enc, text)


def test_an_empty_continuation_prefix_is_honoured() -> None:
    """WordPiece with ``continuing_subword_prefix=""`` (found by the property above): the
    fast path looked continuations up under "##" and gave [UNK] for every split word."""
    vocab = {t: i for i, t in enumerate([*SPECIALS, "ab", "c", "a"])}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix=""))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    enc = ClassifyEncoder(tok, max_length=16)
    for text in ["abc", "cab", "aab", "abab d"]:
        assert _agrees(enc, text)
    assert enc.ascii is not None and enc.ascii.encode("abc") == ([2, 5, 6, 3], False)


COMMITTED = sorted(p.parent.parent.name for p in MODELS.glob("*/1/tokenizer.json"))


@pytest.mark.parametrize("model", COMMITTED)
@given(max_length=st.sampled_from([2, 3, 8, 64, 512]), batch=st.lists(texts, max_size=4))
def test_committed_tokenizers_match_or_hand_over(model, max_length, batch) -> None:
    enc = _committed(model, max_length)
    if enc is None:
        return  # not a BERT pipeline (the LSTM models' word tokenizers)
    for text in batch:
        _agrees(enc, text)


@pytest.mark.parametrize("model", COMMITTED)
@given(text=ascii_texts)
def test_committed_tokenizers_take_every_ascii_text_without_an_added_token(model, text) -> None:
    enc = _committed(model, 64)
    if enc is not None:
        assert _agrees(enc, text)


@functools.cache
def _committed(model: str, max_length: int) -> ClassifyEncoder | None:
    """The model's encoder if its tokenizer has the fast path, else ``None``."""
    tok = load_tokenizer(MODELS / model / "1" / "tokenizer.json")
    if AsciiWordPiece.from_tokenizer(tok, max_length) is None:
        return None
    return ClassifyEncoder(tok, max_length=max_length)

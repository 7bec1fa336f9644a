"""service/preprocess/ascii_wordpiece.py: exactly the ids of ``tokenizers`` on ASCII text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from service.preprocess.ascii_wordpiece import AsciiWordPiece
from service.preprocess.classify import ClassifyEncoder
from service.preprocess.tokenizer import load_tokenizer
from service.preprocess.words import build_word_tokenizer
from training.transformer.pretrain import build_char_tokenizer

DETECTOR = Path(__file__).resolve().parents[1] / "models/detector-en/1/tokenizer.json"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Whole words, word pieces, a word past max_input_chars_per_word (8), cased forms.
WORDS = ["the", "cat", "un", "aff", "he", "hello", "Hello", "a", "b", "x", "7", "42", "!", ","]
PIECES = ["##aff", "##able", "##lo", "##l", "##a", "##b", "##c", "##7", "##x"]
LONG = "abcdefghij"


def _tiny(*, lowercase: bool = True, bert_processing: bool = False) -> Tokenizer:
    """A hand-made BERT tokenizer whose small vocabulary makes unk and word pieces common."""
    vocab = {t: i for i, t in enumerate([*SPECIALS, *WORDS, *PIECES, LONG])}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=8))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    if bert_processing:
        tok.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
    tok.add_special_tokens(SPECIALS)
    return tok


def _char_wordpiece() -> Tokenizer:
    """The tests' BERT tokenizer: NFKC, then BertNormalizer (a ``Sequence``)."""
    text = "the cat sat on a mat and it is important to note that overall, 42! 中文 测试"
    return build_char_tokenizer([text] * 5, vocab_size=200, min_frequency=1)


TOKENIZERS = {
    "tiny": _tiny,
    "tiny-cased-bertprocessing": lambda: _tiny(lowercase=False, bert_processing=True),
    "char-wordpiece": _char_wordpiece,
    "detector-en": lambda: load_tokenizer(DETECTOR),
}


@pytest.fixture(params=sorted(TOKENIZERS))
def tokenizer(request) -> Tokenizer:
    if request.param == "detector-en" and not DETECTOR.exists():
        pytest.skip("models/detector-en is not in this checkout")
    return TOKENIZERS[request.param]()


def _check(enc: ClassifyEncoder, texts: list[str]) -> int:
    """Assert the fast ids of every text it takes are tokenizers'; return how many it took."""
    assert enc.ascii is not None
    taken = 0
    for text in texts:
        got = enc.ascii.encode(text)
        if got is None:
            continue
        want = enc.tokenizer.encode(text)
        assert got == (want.ids, bool(want.overflowing)), repr(text)
        taken += 1
    return taken


def test_every_ascii_character(tokenizer):
    enc = ClassifyEncoder(tokenizer, max_length=16)
    texts = []
    for c in map(chr, range(128)):
        texts += [c, f"a{c}b", f"{c}{c}", f"The{c}Cat", f" {c} ", f"hello{c}able 7{c}x"]
    assert _check(enc, texts) == len(texts)  # none of these holds an added token


def _random_text(rng: random.Random) -> str:
    alphabet = "abcehlotxABCHLX7420 " + "!,.#'-_[]" + "\t\n\r\x0b\x0c\x00\x01\x1f\x7f"
    parts = []
    for _ in range(rng.randint(0, 30)):
        r = rng.random()
        if r < 0.4:
            parts.append(rng.choice([*WORDS, LONG, LONG + "x", "unaffable", "Hellolo", "cat7"]))
        elif r < 0.8:
            parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))))
        else:
            parts.append(rng.choice([" ", "  ", "\n", ", ", "!", "\t"]))
    return rng.choice(["", " "]).join(parts)


@pytest.mark.parametrize("max_length", [2, 3, 8, 64])
def test_random_ascii_text_and_truncation(tokenizer, max_length):
    rng = random.Random(max_length)
    texts = [_random_text(rng) for _ in range(600)]
    enc = ClassifyEncoder(tokenizer, max_length=max_length)
    assert _check(enc, texts) >= 590  # "[" ... "]" makes an added token now and then
    assert any(enc.tokenizer.encode(t).overflowing for t in texts)


def test_truncation_boundary():
    enc = ClassifyEncoder(_tiny(), max_length=6)  # room for 4 pieces
    assert enc.ascii is not None
    for n in range(0, 8):
        got = enc.ascii.encode(" ".join(["cat"] * n))
        assert got is not None
        ids, truncated = got
        assert truncated == (n > 4) and len(ids) == 2 + min(n, 4)
    assert _check(enc, [" ".join(["unaffable"] * n) for n in range(4)]) == 4
    assert AsciiWordPiece.from_tokenizer(_tiny(), max_length=1) is None  # no room for specials


def test_long_texts_are_read_up_to_the_truncation_point(tokenizer):
    """Past 16 × max_length characters words are found lazily: same ids as the eager path."""
    enc = ClassifyEncoder(tokenizer, max_length=8)
    assert enc.ascii is not None
    rng = random.Random(1)
    texts = [
        " " * 500 + "the cat, " * 2000,  # the words start after a long whitespace run
        "Hello" * 30 + " 42!" * 5000,  # one long word first, then many short ones
        " ".join(_random_text(rng) for _ in range(300)),
        "x" * 129,  # just past the eager limit, one word
    ]
    assert all(len(t) > enc.ascii.eager_chars for t in texts)
    assert _check(enc, texts) == len(texts)


def test_added_tokens_go_to_tokenizers():
    tok = _tiny()
    tok.add_tokens([AddedToken("catx", normalized=True)])  # matched after lowercasing
    enc = ClassifyEncoder(tok, max_length=32)
    assert enc.ascii is not None
    texts = ["a [SEP] b", "[sep]", "x[MASK]y", "[C\x01LS] the", "the CATX hello", "xcatxx"]
    assert all(enc.ascii.encode(t) is None for t in texts)
    want = [enc.tokenizer.encode(t) for t in texts]
    got = enc.encode(texts)
    assert [g.input_ids.tolist() for g in got] == [w.ids for w in want]
    sep = tok.token_to_id("[SEP]")
    assert sep is not None and want[0].ids.count(sep) == 2  # the text's own [SEP] is one


def test_mixed_batches_keep_their_order(tokenizer):
    enc = ClassifyEncoder(tokenizer, max_length=12)
    assert enc.ascii is not None
    texts = ["the cat", "café au lait", "a [SEP] b", "Hello, World!", "中文 测试", "\t", ""]
    took = [enc.ascii.encode(t) is not None for t in texts]
    assert took == [True, False, False, True, False, True, True]
    want = [enc.tokenizer.encode(t) for t in texts]
    for got in (enc.encode(texts), [enc.encode([t])[0] for t in texts]):
        assert [g.input_ids.tolist() for g in got] == [w.ids for w in want]
        assert [g.token_type_ids.tolist() for g in got] == [w.type_ids for w in want]
        assert [g.truncated for g in got] == [bool(w.overflowing) for w in want]


def _with(tok: Tokenizer, **parts) -> Tokenizer:
    tok = Tokenizer.from_str(tok.to_str())
    for name, value in parts.items():
        setattr(tok, name, value)
    return tok


@pytest.mark.parametrize(
    "make",
    [
        lambda: build_word_tokenizer(["the", "cat"]),  # WordLevel
        lambda: _with(_tiny(), normalizer=normalizers.BertNormalizer(clean_text=False)),
        lambda: _with(_tiny(), normalizer=normalizers.Lowercase()),
        lambda: _with(
            _tiny(), normalizer=normalizers.Sequence([normalizers.Lowercase(), normalizers.NFC()])
        ),
        lambda: _with(_tiny(), pre_tokenizer=pre_tokenizers.Whitespace()),
        lambda: _with(_tiny(), post_processor=processors.ByteLevel()),
        lambda: _with(
            _tiny(),
            post_processor=processors.TemplateProcessing(
                single="[CLS] $A:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
            ),
        ),
    ],
)
def test_other_pipelines_keep_tokenizers(make):
    assert AsciiWordPiece.from_tokenizer(make(), max_length=16) is None

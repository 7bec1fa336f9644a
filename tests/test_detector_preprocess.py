"""service/preprocess/classify.py: truncation, padding, softmax/labels (no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from service.preprocess.classify import ClassifyEncoder, decode, softmax
from training.transformer.pretrain import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    text = "the cat sat on a mat and it is important to note that overall 中文 测试"
    return build_char_tokenizer([text] * 5, vocab_size=200, min_frequency=1)


def test_encode_adds_specials_and_truncates_from_the_head(tok):
    enc = ClassifyEncoder(tok, max_length=6)
    short, long = enc.encode(["the cat", "the cat sat on a mat and it is"])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    assert short.input_ids[0] == cls and short.input_ids[-1] == sep and not short.truncated
    assert len(long) == 6 and long.truncated and long.input_ids[-1] == sep
    assert (
        long.input_ids[1:5].tolist() == tok.encode("the cat sat on", add_special_tokens=False).ids
    )


@pytest.mark.parametrize("max_length", [4, 6, 7, 64])
def test_windows_read_every_token_once_the_head_window_is_encodes(tok, max_length):
    """Consecutive windows of at most max_length tokens, specials around each: together the
    text's tokens, in order, each once; their spans cover the text in order; the first is
    what encode() reads."""
    text = "the cat sat on a mat and it is important to note that overall 中文 测试"
    enc = ClassifyEncoder(tok, max_length=max_length)
    (windows,) = enc.encode_windows([text])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    inner: list[int] = []
    for w in windows:
        ids = w.encoding.input_ids.tolist()
        assert len(ids) <= max_length and ids[0] == cls and ids[-1] == sep
        assert w.text_tokens == len(ids) - 2 and not w.encoding.truncated
        inner += ids[1:-1]
        # the span holds exactly the window's tokens
        assert tok.encode(text[w.start : w.end], add_special_tokens=False).ids == ids[1:-1]
    assert inner == tok.encode(text, add_special_tokens=False).ids
    starts = [w.start for w in windows]
    assert starts == sorted(starts) and windows[0].start == 0 and windows[-1].end == len(text)
    assert all(a.end <= b.start for a, b in zip(windows, windows[1:], strict=False))
    head = enc.encode([text])[0]
    assert windows[0].encoding.input_ids.tolist() == head.input_ids.tolist()
    assert len(windows) == (1 if max_length == 64 else -(-len(inner) // (max_length - 2)))


WINDOW_TEXTS = [
    "hello 😀 world 𝔘 " * 20,  # non-BMP characters: byte-level BPE splits each in 4 tokens
    "   leading spaces then words " * 20,  # whitespace tokens at window edges
    "İstanbul İİ büyük şehir. Café naïve " * 20,  # normalizer effects (lowercase, NFKC)
]


def _family_tokenizers():
    """RoBERTa's byte-level BPE, XLM-R's and ALBERT's SentencePiece Unigram (lowercased), as
    tests/test_import_families.py builds them (no torch needed)."""
    from tests.test_import_families import SPECIALS, _bpe, _unigram

    albert = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    return {"roberta": _bpe(), "xlmr": _unigram("<s>", "</s>", False, SPECIALS),
            "albert": _unigram("[CLS]", "[SEP]", True, albert)}  # fmt: skip


@pytest.mark.parametrize("text", WINDOW_TEXTS)
def test_window_spans_are_consecutive_and_trimmed_with_every_tokenizer(text):
    """Spans of other tokenizers' windows: in text order, never overlapping (a character
    whose tokens fall in two windows counts in the later one: byte-level BPE's emoji, a
    lowercased "İ"), no leading or trailing whitespace (RoBERTa's "Ġ", SentencePiece's "▁"
    map to spaces, or to the next word's first character), together covering the text;
    and the head window is what encode() reads."""
    for family, tok in _family_tokenizers().items():
        enc = ClassifyEncoder(tok, max_length=32)
        (windows,) = enc.encode_windows([text])
        assert len(windows) > 3, family
        spans = [(w.start, w.end) for w in windows]
        for s, e in spans:
            assert e > s and text[s:e] == text[s:e].strip(), (family, text[s:e])
        assert spans[0][0] == len(text) - len(text.lstrip()), family
        assert spans[-1][1] == len(text.rstrip()), family
        for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False):
            # consecutive: only whitespace between one window and the next
            assert a_end <= b_start and not text[a_end:b_start].strip(), (family, spans)
        head = enc.encode([text])[0]
        assert windows[0].encoding.input_ids.tolist() == head.input_ids.tolist(), family


def test_collate_and_call(tok):
    enc = ClassifyEncoder(tok, max_length=16)
    b = enc(["the cat", "中文测试 the mat"], pad_to=20)
    assert {k: v.shape for k, v in b.items()} == {
        "input_ids": (2, 20), "attention_mask": (2, 20), "token_type_ids": (2, 20)
    }  # fmt: skip
    assert b["input_ids"].dtype == np.int64
    assert b["attention_mask"][0].sum() == 4 and (b["token_type_ids"] == 0).all()


def test_callers_tokenizer_untouched(tok):
    ClassifyEncoder(tok, max_length=4)
    assert tok.truncation is None


def test_softmax_and_decode():
    logits = np.array([[2.0, 0.0], [-1000.0, 1000.0], [0.0, 0.0]], dtype=np.float32)
    p = softmax(logits)
    assert np.allclose(p.sum(1), 1.0) and p[1, 1] == pytest.approx(1.0)
    out = decode(logits, ["human", "machine"])
    assert [o.label for o in out] == ["human", "machine", "human"]
    assert out[0].probability == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert out[2].probabilities == {"human": 0.5, "machine": 0.5}


ODD_TEXTS = [
    "Résumé of a naïve café owner — ÅNGSTRÖM!",
    "中文测试 mixed with English, 1,234.5 numbers & symbols: @#$%^",
    "emoji 😀👍🏽 and\ttabs\nnewlines\u200b zero-width\u0000 nul",
    "   ",
    "word " * 300,  # truncated
    "Supercalifragilisticexpialidocious" * 5,  # one word past WordPiece's max length
]


@pytest.mark.parametrize("tokenizer_file", ["models/detector-en/1/tokenizer.json", None])
def test_encode_matches_the_offset_tracking_tokenizer(tok, tokenizer_file):
    """The encoder skips offsets (``encode_batch_fast``); ids, type ids and truncation must
    be exactly what ``Tokenizer.encode`` gives, one text at a time and in a batch."""
    from pathlib import Path

    from service.preprocess.tokenizer import load_tokenizer

    if tokenizer_file is not None:
        path = Path(__file__).resolve().parents[1] / tokenizer_file
        if not path.exists():
            pytest.skip(f"{tokenizer_file} is not in this checkout")
        base = load_tokenizer(path)
    else:
        base = tok
    enc = ClassifyEncoder(base, max_length=32)
    want = [enc.tokenizer.encode(t) for t in ODD_TEXTS]
    singles = [enc.encode([t])[0] for t in ODD_TEXTS]
    batch = enc.encode(ODD_TEXTS)
    for got in (singles, batch):
        assert [g.input_ids.tolist() for g in got] == [w.ids for w in want]
        assert [g.token_type_ids.tolist() for g in got] == [w.type_ids for w in want]
        assert [g.truncated for g in got] == [bool(w.overflowing) for w in want]
    assert batch[4].truncated and not batch[0].truncated

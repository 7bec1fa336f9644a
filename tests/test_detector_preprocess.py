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

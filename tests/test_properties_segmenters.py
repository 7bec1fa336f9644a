"""Properties of the explanation segmenters (service/explain/segmenters.py) with the
committed detector and polarity tokenizers: the features SHAP's Text masker cuts from a
text, with nothing masked, are that text again (from its first feature to its last), each
feature a distinct non-empty substring, in order."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.explain.segmenters import WordPieceSegmenter, WordSegmenter
from service.preprocess.tokenizer import join_overlapping, load_tokenizer
from service.preprocess.words import WordEncoder

shap_text = pytest.importorskip("shap.maskers._text")

MODELS = Path(__file__).resolve().parents[1] / "models"
CHUNKS = ["좀", "한국어", "İ", "3", "é", "ﬁ", "中文", "㍻", "\u0301", "\u200b", "don't", "U.S."]
CHUNKS += ["the", "cat", "!", " ", "  ", "\t", "\xa0", "unaffable", "x"]
texts = st.one_of(
    st.lists(st.sampled_from(CHUNKS) | st.text(max_size=2), max_size=16).map("".join),
    st.text(max_size=24),
)


@functools.cache
def _segmenter(model: str) -> WordPieceSegmenter | WordSegmenter:
    folder = MODELS / model / "1"
    if model == "detector-en":
        return WordPieceSegmenter(load_tokenizer(folder / "tokenizer.json"))
    return WordSegmenter(WordEncoder.load(folder / "tokenizer.json"))


@pytest.mark.parametrize("model", ["detector-en", "polarity-en"])
@given(text=texts)
def test_shap_features_are_the_text_once_in_order(model: str, text: str) -> None:
    seg = _segmenter(model)
    features = seg(text)
    offsets = features["offset_mapping"]
    # One feature per character span of the model's tokens (what the truncation counts).
    assert offsets == join_overlapping(seg.offsets(text))[0]
    assert len(features["input_ids"]) == len(offsets)
    pos = 0
    for s, e in offsets:
        assert pos <= s < e <= len(text), (text, offsets)
        pos = e
    if not offsets:
        return
    # What shap.maskers.Text renders with nothing masked: the text from the first feature
    # to the last.
    parts, ids = shap_text.Text.token_segments(_MaskerView(seg), text)
    assert len(parts) == len(ids) == len(offsets)
    assert "".join(parts) == text[offsets[0][0] : offsets[-1][1]], (text, parts)


class _MaskerView:
    """The one attribute ``Text.token_segments`` reads (a full masker probes its tokenizer
    for prefixes and a mask id on construction; not needed here)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer


def test_a_character_that_is_several_tokens_is_one_feature() -> None:
    """Found by the property above: the detector's accent stripping decomposes "좀" into
    three jamo pieces that all map to it; SHAP rendered "좀 is it" as "좀좀좀 is it"."""
    seg = _segmenter("detector-en")
    assert seg("좀 is it")["offset_mapping"] == [(0, 1), (2, 4), (5, 7)]
    # The truncation still counts the model's tokens: three for the one character.
    assert seg.offsets("좀 is it")[:3] == [(0, 1)] * 3

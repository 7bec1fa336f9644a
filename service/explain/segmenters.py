"""Tokenizer callables that ``shap.maskers.Text`` accepts, built without ``transformers``.

SHAP's Text masker needs a callable ``tok(s, return_offsets_mapping=True)`` returning
``{"input_ids": [...], "offset_mapping": [(start, end), ...]}``. It cuts the text into the
substrings those offsets delimit (the features SHAP attributes to), and builds each masked
variant as a *string* in which hidden features are replaced by ``mask_token``; the model
function re-encodes those strings with the model's own preprocessing.

Tokens that map back to the same character are one feature (:func:`join_overlapping`, the
id of the first stands for them): SHAP cuts the text at each token's offsets, and a Hangul
syllable the detector's tokenizer decomposes into three jamo pieces was rendered three times
("좀" became "좀좀좀"), so the model was asked about a text that was not the request's.

Neither segmenter adds special tokens: ``tok("")`` returns no ids, so SHAP keeps no
prefix/suffix and every feature is a real token of the text. The model function adds
``[CLS]``/``[SEP]`` itself (through :class:`~service.preprocess.classify.ClassifyEncoder`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Encoding, Tokenizer

from service.preprocess.tokenizer import join_overlapping
from service.preprocess.words import UNK_ID, WordEncoder

# Tried in order: the first one the tokenizer encodes as ONE token becomes the mask token.
WORDPIECE_MASK_CANDIDATES = ("[MASK]", "<mask>", "[UNK]", "<unk>")
# A punctuation-like symbol no training vocabulary holds: the word splitter keeps it as one
# token and the encoder maps it to <unk>, i.e. a hidden word reads as an unknown word.
WORD_MASK_CANDIDATES = ("\u2047", "\u2042", "\u203b")


class WordPieceSegmenter:
    """Sub-word tokens of an HF ``tokenizers.Tokenizer`` (``tokenizer.json``), no specials."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.mask_token = self._pick_mask_token()

    def _pick_mask_token(self) -> str:
        for cand in WORDPIECE_MASK_CANDIDATES:
            tid = self.tokenizer.token_to_id(cand)
            if tid is not None and self.tokenizer.encode(cand, add_special_tokens=False).ids == [
                tid
            ]:
                return cand
        raise ValueError(f"tokenizer encodes none of {WORDPIECE_MASK_CANDIDATES} as one token")

    def __call__(self, s: str, return_offsets_mapping: bool = True, **_: Any) -> dict[str, list]:
        return _features(self.tokenizer.encode(s, add_special_tokens=False), return_offsets_mapping)

    def offsets(self, s: str) -> list[tuple[int, int]]:
        # The model's tokens, not SHAP's features: what cut_to_tokens counts is what it reads.
        return [(a, b) for a, b in self.tokenizer.encode(s, add_special_tokens=False).offsets]


class WordSegmenter:
    """Words as the LSTM models split them (:meth:`WordEncoder.split`'s tokenizer)."""

    def __init__(self, encoder: WordEncoder) -> None:
        self.encoder = encoder
        self.tokenizer: Tokenizer = encoder.splitter
        self.mask_token = self._pick_mask_token()

    def _pick_mask_token(self) -> str:
        for cand in WORD_MASK_CANDIDATES:
            enc = self.encoder.encode_texts([cand])[0]
            if enc.tokens == [cand] and int(enc.word_ids[0]) == UNK_ID:
                return cand
        raise ValueError(f"none of {WORD_MASK_CANDIDATES} encodes as one unknown word")

    def __call__(self, s: str, return_offsets_mapping: bool = True, **_: Any) -> dict[str, list]:
        return _features(self.tokenizer.encode(s), return_offsets_mapping)

    def offsets(self, s: str) -> list[tuple[int, int]]:
        return [(a, b) for a, b in self.tokenizer.encode(s).offsets]


def _features(enc: Encoding, with_offsets: bool) -> dict[str, list]:
    """SHAP's view of an encoding: one id (and span) per feature."""
    spans, first = join_overlapping(enc.offsets)
    out: dict[str, list] = {"input_ids": [enc.ids[i] for i in first]}
    if with_offsets:
        out["offset_mapping"] = spans
    return out


def cut_to_tokens(
    text: str, offsets: Sequence[tuple[int, int]], max_tokens: int
) -> tuple[str, bool]:
    """``text`` cut after its ``max_tokens``-th token (what the model would see of it)."""
    if len(offsets) <= max_tokens:
        return text, False
    return text[: offsets[max_tokens - 1][1]], True

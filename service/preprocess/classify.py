"""Sequence classification pre/post-processing (the machine-text detector).

numpy + HF ``tokenizers`` only. A text becomes ``[CLS] tokens [SEP]`` (the tokenizer's own
post-processor), cut to ``max_length`` tokens from the head (ASCII text with a BERT tokenizer
takes :mod:`service.preprocess.ascii_wordpiece`, the same ids faster); logits become label
probabilities with a softmax. Training encodes its data and scores its test split with this
module, so serving and evaluation are one code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from service.preprocess.ascii_wordpiece import AsciiWordPiece
from service.preprocess.qa import pad_batch
from service.preprocess.tokenizer import (
    PAD_NAMES,
    encode_all,
    encode_ids,
    load_tokenizer,
    special_id,
)


@dataclass(frozen=True)
class ClassifyEncoding:
    input_ids: np.ndarray  # [T] int64, specials included
    token_type_ids: np.ndarray  # [T] int64
    truncated: bool  # the text had more than max_length tokens

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class ClassifyWindow:
    """One window of a text read whole: consecutive windows of at most ``max_length`` tokens
    (specials included), each token of the text in exactly one."""

    encoding: ClassifyEncoding
    start: int  # the character span of the text the window reads
    end: int
    text_tokens: int  # its tokens less the specials


@dataclass(frozen=True)
class Prediction:
    label: str
    probability: float  # of ``label``
    probabilities: dict[str, float]


class ClassifyEncoder:
    def __init__(self, tokenizer: Tokenizer, max_length: int = 256) -> None:
        # A private copy: truncation is set on it, and the caller's object stays as it was.
        tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = special_id(tokenizer, PAD_NAMES)
        tokenizer.no_padding()
        # Truncation accounts for the specials the post-processor adds.
        tokenizer.enable_truncation(max_length, strategy="longest_first", direction="right")
        # The same ids for ASCII text, ~4x faster; None where the pipeline is not BERT's.
        self.ascii = AsciiWordPiece.from_tokenizer(tokenizer, max_length)

    @classmethod
    def load(cls, tokenizer_file: Path | str, max_length: int = 256) -> ClassifyEncoder:
        return cls(load_tokenizer(tokenizer_file), max_length)

    def encode(self, texts: Sequence[str]) -> list[ClassifyEncoding]:
        fast = [self.ascii.encode(t) if self.ascii is not None else None for t in texts]
        rest = [t for t, f in zip(texts, fast, strict=True) if f is None]
        slow = iter(encode_ids(self.tokenizer, rest) if rest else ())
        out = []
        for f in fast:
            if f is not None:
                ids, truncated = f
                ids_a = np.array(ids, dtype=np.int64)
                out.append(ClassifyEncoding(ids_a, np.zeros_like(ids_a), truncated))
                continue
            enc = next(slow)
            out.append(
                ClassifyEncoding(
                    np.asarray(enc.ids, dtype=np.int64),
                    np.asarray(enc.type_ids, dtype=np.int64),
                    bool(enc.overflowing),
                )
            )
        return out

    def encode_windows(self, texts: Sequence[str]) -> list[list[ClassifyWindow]]:
        """Each text cut into windows, first to last: the tokenizer's own overflow (the head
        window is :meth:`encode`'s encoding), with the specials around each window."""
        out = []
        for text, enc in zip(texts, encode_all(self.tokenizer, texts), strict=True):
            parts = (enc, *enc.overflowing)
            offsets = [[o for o, special in zip(e.offsets, e.special_tokens_mask, strict=True)
                        if not special] for e in parts]  # fmt: skip
            spans = _window_spans(text, offsets)
            windows = []
            for e, own, (start, end) in zip(parts, offsets, spans, strict=True):
                ids = np.asarray(e.ids, dtype=np.int64)
                encoding = ClassifyEncoding(ids, np.asarray(e.type_ids, dtype=np.int64), False)
                windows.append(ClassifyWindow(encoding, start, end, len(own)))
            out.append(windows)
        return out

    def collate(
        self, encodings: Sequence[ClassifyEncoding], pad_to: int | None = None
    ) -> dict[str, np.ndarray]:
        """Right-pad into int64 ``input_ids``/``attention_mask``/``token_type_ids`` [B, T]."""
        return pad_batch([(e.input_ids, e.token_type_ids) for e in encodings], self.pad_id, pad_to)

    def __call__(self, texts: Sequence[str], pad_to: int | None = None) -> dict[str, np.ndarray]:
        return self.collate(self.encode(texts), pad_to)


def _window_spans(text: str, offsets: Sequence[Sequence[tuple[int, int]]]) -> list[tuple[int, int]]:
    """Each window's character span from its tokens' offsets: from where its first token
    starts to where the next window's does (the last: its last token's end), trimmed of
    whitespace. Consecutive, never overlapping: a token's offsets may reach past the
    window's text (SentencePiece's lone "▁" maps to the next word's first character,
    RoBERTa's "Ġ" to the space before its word), and a character split into several tokens
    (an emoji in byte-level BPE, "İ" lowercased) that two windows share counts in the
    later one."""
    starts: list[int] = []
    for own in offsets:  # a window without text tokens (none visible) starts where it is
        at = min((s for s, _ in own), default=starts[-1] if starts else 0)
        starts.append(max(at, starts[-1]) if starts else at)
    last = max((e for _, e in offsets[-1]), default=starts[-1])
    out = []
    for a, b in zip(starts, [*starts[1:], max(last, starts[-1])], strict=True):
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        out.append((a, b))
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis ([C] or [B, C] logits), in float64: probabilities near 0
    and 1 stay exact. Training's evaluation and the served tasks share it."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def decode(logits: np.ndarray, labels: Sequence[str]) -> list[Prediction]:
    """[B, C] logits -> the argmax label, its probability and all label probabilities."""
    probs = softmax(logits)
    out = []
    for row in probs:
        k = int(np.argmax(row))
        out.append(
            Prediction(
                labels[k],
                float(row[k]),
                {lab: float(p) for lab, p in zip(labels, row, strict=True)},
            )
        )
    return out

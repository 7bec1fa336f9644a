"""Extractive QA pre/post-processing: (question, context) -> windows -> best character span.

numpy + HF ``tokenizers`` only (no torch, no transformers). Training builds its features and
decodes its dev predictions with this module, so what is served is what was evaluated.

Windows follow the tokenizer's own pair template (:func:`pair_layout`, what HF's
``tokenizer(question, context)`` gives): BERT's ``[CLS] question [SEP] context-slice [SEP]``
with token type 0 for the question part and 1 for the context part, RoBERTa's
``<s> question </s></s> context-slice </s>`` with type 0 throughout. A context longer than
one window is cut into overlapping slices: consecutive slices share ``doc_stride`` context
tokens (the meaning ``stride`` has in HF fast tokenizers and ``run_qa.py``). Every context
token keeps its ``(start, end)`` character offsets into the *original* context string, so a
predicted token span maps back to an exact substring of what the client sent.

The tokenizer also matches special-token strings inside client text (a context holding
``"[SEP]"`` gets the ``[SEP]`` id): such a token is never an answer's first or last token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from service.preprocess.tokenizer import (
    CLS_NAMES,
    PAD_NAMES,
    SEP_NAMES,
    encode_all,
    load_tokenizer,
    special_id,
)

# Offsets of tokens outside the context (specials, question, padding).
NO_OFFSET = (-1, -1)


@dataclass(frozen=True)
class QAWindow:
    """One model input sequence over a slice of the context (unpadded, int64 arrays)."""

    input_ids: np.ndarray  # [T]
    token_type_ids: np.ndarray  # [T]
    # [T, 2] character offsets into the original context; NO_OFFSET outside the context.
    offsets: np.ndarray
    context_start: int  # first token index of the context slice
    context_end: int  # one past the last context token
    # [T] bool: context tokens an answer may not start or end on (special tokens matched in
    # the context's text); None when there are none, i.e. for ordinary text.
    barred: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def attention_mask(self) -> np.ndarray:
        return np.ones_like(self.input_ids)


@dataclass(frozen=True)
class QAAnswer:
    text: str
    start: int  # character offset into the context (inclusive)
    end: int  # character offset into the context (exclusive): context[start:end] == text
    score: float  # start logit + end logit of the chosen span
    probability: float  # softmax of the span score over all n-best candidates of all windows
    window: int  # index of the window the span came from (-1 when there is no answer)


class QAEncoder:
    """Cuts (question, context) pairs into model windows and decodes spans back.

    ``max_length`` counts every token of a window, specials included; ``doc_stride`` is the
    overlap in context tokens between consecutive windows; questions are cut to
    ``max_query_length`` tokens.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        max_length: int = 384,
        doc_stride: int = 128,
        max_query_length: int = 64,
    ) -> None:
        # A private copy without padding/truncation (windows are cut here, not by tokenizers).
        tokenizer = Tokenizer.from_str(tokenizer.to_str())
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.layout = pair_layout(tokenizer)
        specials = self.layout.specials
        if max_query_length + specials >= max_length:
            raise ValueError(
                f"max_query_length + {specials} special tokens must leave room for context"
            )
        if doc_stride >= max_length - max_query_length - specials:
            raise ValueError("doc_stride must be smaller than the context part of a window")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.doc_stride = doc_stride
        self.max_query_length = max_query_length
        self.pad_id = special_id(tokenizer, PAD_NAMES)
        self.barred_ids = barred_ids(tokenizer) | self.layout.special_ids | {self.pad_id}

    @classmethod
    def load(
        cls,
        tokenizer_file: Path | str,
        max_length: int = 384,
        doc_stride: int = 128,
        max_query_length: int = 64,
    ) -> QAEncoder:
        return cls(load_tokenizer(tokenizer_file), max_length, doc_stride, max_query_length)

    # ------------------------------------------------------------------ encoding
    def encode(self, question: str, context: str) -> list[QAWindow]:
        """All windows of one pair; at least one window even for an empty context."""
        return self.encode_batch([question], [context])[0]

    def encode_batch(
        self, questions: Sequence[str], contexts: Sequence[str]
    ) -> list[list[QAWindow]]:
        return [windows for windows, _, _ in self.encode_counted(questions, contexts)]

    def encode_counted(
        self, questions: Sequence[str], contexts: Sequence[str]
    ) -> list[tuple[list[QAWindow], int, int]]:
        """Each pair's windows, with its question's and context's token counts as tokenized
        (the question's before it is cut to ``max_query_length``)."""
        return [self.windows_of(q, c) for q, c in self.tokenize(questions, contexts)]

    def tokenize(
        self, questions: Sequence[str], contexts: Sequence[str]
    ) -> list[tuple[Encoding, Encoding]]:
        """Each pair's question and context tokens (no specials), for :meth:`windows_of`."""
        if len(questions) != len(contexts):
            raise ValueError("questions and contexts differ in length")
        tok = self.tokenizer
        q_encs = encode_all(tok, questions, add_special_tokens=False)
        c_encs = encode_all(tok, contexts, add_special_tokens=False)
        return list(zip(q_encs, c_encs, strict=True))

    def windows_of(self, q: Encoding, c: Encoding) -> tuple[list[QAWindow], int, int]:
        """A tokenized pair's windows, with its question's and context's token counts."""
        return self._windows(q.ids, c.ids, c.offsets), len(q.ids), len(c.ids)

    def window_count(self, q_tokens: int, c_tokens: int) -> int:
        """How many windows a question and a context of these token counts are cut into (as
        :meth:`_windows` cuts them)."""
        room = self.max_length - min(q_tokens, self.max_query_length) - self.layout.specials
        step = room - self.doc_stride
        return 1 + max(0, -(-(c_tokens - room) // step))

    def _windows(
        self, q_ids: list[int], c_ids: list[int], c_offsets: list[tuple[int, int]]
    ) -> list[QAWindow]:
        q_ids = q_ids[: self.max_query_length]
        lay = self.layout
        room = self.max_length - len(q_ids) - lay.specials
        step = room - self.doc_stride
        head = [*lay.head, *q_ids, *lay.mid]
        head_types = np.asarray(
            [*lay.head_types, *[lay.a_type] * len(q_ids), *lay.mid_types], dtype=np.int64
        )
        tail_types = np.asarray(lay.tail_types, dtype=np.int64)
        n = len(c_ids)
        c_off = np.asarray(c_offsets, dtype=np.int64).reshape(-1, 2)
        # Ordinary text holds no special ids: skip the mask (and its cost) then.
        c_barred = None
        if not self.barred_ids.isdisjoint(c_ids):
            c_barred = np.isin(np.asarray(c_ids, dtype=np.int64), list(self.barred_ids))
        windows = []
        start = 0
        while True:
            end = min(start + room, n)
            ids = np.asarray([*head, *c_ids[start:end], *lay.tail], dtype=np.int64)
            # filled by parts, not from a list of every position: this runs per window
            types = np.empty(len(ids), dtype=np.int64)
            types[: len(head)] = head_types
            types[len(head) : len(head) + end - start] = lay.b_type
            types[len(head) + end - start :] = tail_types
            offsets = np.full((len(ids), 2), NO_OFFSET[0], dtype=np.int64)
            offsets[len(head) : len(head) + end - start] = c_off[start:end]
            barred = None
            if c_barred is not None:
                barred = np.zeros(len(ids), dtype=bool)
                barred[len(head) : len(head) + end - start] = c_barred[start:end]
            windows.append(
                QAWindow(ids, types, offsets, len(head), len(head) + end - start, barred)
            )
            if end >= n:
                return windows
            start += step

    # ------------------------------------------------------------------ batching
    def collate(
        self, windows: Sequence[QAWindow], pad_to: int | None = None
    ) -> dict[str, np.ndarray]:
        """Right-pad windows into ``input_ids``/``attention_mask``/``token_type_ids`` [B, T]."""
        return pad_batch([(w.input_ids, w.token_type_ids) for w in windows], self.pad_id, pad_to)

    # ------------------------------------------------------------------ decoding
    def decode(
        self,
        context: str,
        windows: Sequence[QAWindow],
        start_logits: np.ndarray | Sequence[np.ndarray],
        end_logits: np.ndarray | Sequence[np.ndarray],
        max_answer_length: int = 30,
        n_best: int = 20,
    ) -> QAAnswer:
        return decode_best_span(
            context, windows, start_logits, end_logits, max_answer_length, n_best
        )


PROBES = ("question", "context", "a", "b", "1", "2", "中", "国", ".", ",")


@dataclass(frozen=True)
class PairLayout:
    """Where a (question, context) pair's special tokens go, and each part's token type:
    ``head question mid context tail``."""

    head: tuple[int, ...]
    mid: tuple[int, ...]
    tail: tuple[int, ...]
    head_types: tuple[int, ...]
    mid_types: tuple[int, ...]
    tail_types: tuple[int, ...]
    a_type: int  # the question's tokens
    b_type: int  # the context's tokens

    @property
    def specials(self) -> int:
        return len(self.head) + len(self.mid) + len(self.tail)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset((*self.head, *self.mid, *self.tail))


def pair_layout(tokenizer: Tokenizer) -> PairLayout:
    """The pair template of ``tokenizer``'s post-processor, read off one encoded pair of
    probe texts (found by their ids: ``sequence_ids`` leaves a first sequence unmarked in
    some templates). A tokenizer without a post-processor gets BERT's ``[CLS] q [SEP] c
    [SEP]``, types 0 then 1, as it always had; one whose template is not ``specials q
    specials c specials`` is a ValueError."""
    if tokenizer.post_processor is None:
        cls_id, sep_id = special_id(tokenizer, CLS_NAMES), special_id(tokenizer, SEP_NAMES)
        return PairLayout((cls_id,), (sep_id,), (sep_id,), (0,), (0,), (1,), 0, 1)
    # Two texts the tokenizer tells apart (a Chinese WordPiece vocabulary has no "a").
    probes: list[Encoding] = []
    for text in PROBES:
        enc = tokenizer.encode(text, add_special_tokens=False)
        if enc.ids and all(enc.ids != p.ids for p in probes):
            probes.append(enc)
        if len(probes) == 2:
            break
    else:
        raise ValueError(f"tokenizer encodes no two of {PROBES} apart: no pair template read")
    qa_ids = [p.ids for p in probes]
    enc = tokenizer.post_process(probes[0], probes[1], add_special_tokens=True)
    ids, types = enc.ids, enc.type_ids

    def find(run: list[int], start: int) -> int:
        for i in range(start, len(ids) - len(run) + 1):
            if ids[i : i + len(run)] == run:
                return i
        return -1

    a = find(qa_ids[0], 0)
    b = find(qa_ids[1], a + len(qa_ids[0])) if a >= 0 else -1
    a_end, b_end = a + len(qa_ids[0]), b + len(qa_ids[1])
    if b < 0 or len({*types[a:a_end]}) != 1 or len({*types[b:b_end]}) != 1:
        raise ValueError(f"tokenizer pair template {enc.tokens} is not: specials, the first "
                         "sequence, specials, the second sequence, specials")  # fmt: skip

    def part(lo: int, hi: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(ids[lo:hi]), tuple(types[lo:hi])

    (head, head_t), (mid, mid_t), (tail, tail_t) = part(0, a), part(a_end, b), part(b_end, len(ids))
    return PairLayout(head, mid, tail, head_t, mid_t, tail_t, types[a], types[b])


def barred_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special tokens, except its unknown token.

    [UNK] stays a valid answer boundary: it also stands for real characters missing from the
    vocabulary (a rare name), and the answer's text comes from their offsets, not the token.
    """
    unk = getattr(tokenizer.model, "unk_token", None)
    if unk is None:  # Unigram (SentencePiece: XLM-R, ALBERT) has its unknown token by id
        unk_id = json.loads(tokenizer.to_str())["model"].get("unk_id")
        unk = tokenizer.id_to_token(unk_id) if unk_id is not None else None
    return frozenset(
        i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special and t.content != unk
    )


def pad_batch(
    rows: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int, pad_to: int | None = None
) -> dict[str, np.ndarray]:
    """(ids, type ids) rows -> int64 ``input_ids``/``attention_mask``/``token_type_ids``."""
    longest = max((len(ids) for ids, _ in rows), default=0)
    width = max(longest, pad_to or 0)
    b = len(rows)
    input_ids = np.full((b, width), pad_id, dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    types = np.zeros((b, width), dtype=np.int64)
    for i, (ids, tt) in enumerate(rows):
        n = len(ids)
        input_ids[i, :n] = ids
        mask[i, :n] = 1
        types[i, :n] = tt
    return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": types}


EMPTY_ANSWER = QAAnswer("", 0, 0, float("-inf"), 0.0, -1)


def decode_best_span(
    context: str,
    windows: Sequence[QAWindow],
    start_logits: np.ndarray | Sequence[np.ndarray],
    end_logits: np.ndarray | Sequence[np.ndarray],
    max_answer_length: int = 30,
    n_best: int = 20,
) -> QAAnswer:
    """The best character span of ``context`` over all its windows (:func:`decode_spans`'
    first; ``window`` -1 and an empty text when no span is valid)."""
    spans = decode_spans(context, windows, start_logits, end_logits, max_answer_length, n_best)
    return spans[0] if spans else EMPTY_ANSWER


def decode_spans(
    context: str,
    windows: Sequence[QAWindow],
    start_logits: np.ndarray | Sequence[np.ndarray],
    end_logits: np.ndarray | Sequence[np.ndarray],
    max_answer_length: int = 30,
    n_best: int = 20,
    top_k: int = 1,
    *,
    skip_blank: bool = False,
) -> list[QAAnswer]:
    """The ``top_k`` best distinct character spans of ``context`` over all its windows, best
    first (fewer when fewer are valid; none when none is).

    ``start_logits``/``end_logits`` hold one row per window (a padded [W, T] array or a list
    of 1-D arrays); only context tokens are candidates, and not those in a window's
    ``barred`` mask (special tokens typed in the context). For each window the ``n_best``
    highest start and end positions are paired; a span is valid when ``end >= start`` and it
    covers at most ``max_answer_length`` tokens. The span score is ``start + end`` logit, its
    probability the softmax of the scores of every candidate. Answers are trimmed of
    whitespace; the same span from two overlapping windows is listed once, with its best
    score. ``skip_blank``: spans of whitespace alone are not candidates (taken when one would
    win otherwise: otherwise they are only left out of the list).
    """
    # Each window's n_best x n_best pairs are scored as one grid (start rows, end columns),
    # not pair by pair in Python: the decoder runs on the API's event loop for every request.
    # Candidates keep the pair-by-pair order (windows, then start rank, then end rank), so
    # ties go to the same span and the probabilities sum in the same order.
    scores: list[np.ndarray] = []
    spans: list[tuple[np.ndarray, np.ndarray, int]] = []  # each grid's char starts, ends, window
    best: tuple[float, int, int, int] | None = None  # score, char start, char end, window
    for w, win in enumerate(windows):
        lo, hi = win.context_start, win.context_end
        if hi <= lo:
            continue
        s_log = np.asarray(start_logits[w], dtype=np.float64)[lo:hi]
        e_log = np.asarray(end_logits[w], dtype=np.float64)[lo:hi]
        s_top = np.argsort(-s_log, kind="stable")
        e_top = np.argsort(-e_log, kind="stable")
        if win.barred is not None:
            # Dropped before taking the n-best, so they take no candidate's place either.
            ok = ~win.barred[lo:hi]
            s_top, e_top = s_top[ok[s_top]], e_top[ok[e_top]]
        s_top, e_top = s_top[:n_best], e_top[:n_best]
        char_start = win.offsets[lo + s_top, 0]
        char_end = win.offsets[lo + e_top, 1]
        tokens = e_top[None, :] - s_top[:, None]  # span length - 1
        valid = (
            (tokens >= 0) & (tokens < max_answer_length) & (char_end[None, :] > char_start[:, None])
        )
        if skip_blank:  # only a span whose first and last tokens are whitespace can be one
            s_blank = np.array(
                [context[a:b].isspace() for a, b in win.offsets[lo + s_top].tolist()]
            )
            e_blank = np.array(
                [context[a:b].isspace() for a, b in win.offsets[lo + e_top].tolist()]
            )
            for r, c in zip(*np.nonzero(valid & s_blank[:, None] & e_blank[None, :]), strict=True):
                if context[char_start[r] : char_end[c]].isspace():
                    valid[r, c] = False
        grid = (s_log[s_top][:, None] + e_log[e_top][None, :])[valid]
        if not grid.size:
            continue
        scores.append(grid)
        rows = cols = None
        if top_k > 1:
            rows, cols = np.nonzero(valid)
            spans.append((char_start[rows], char_end[cols], w))
        i = int(np.argmax(grid))
        if best is None or grid[i] > best[0]:  # strict: an earlier window wins a tie
            if rows is None or cols is None:
                rows, cols = np.nonzero(valid)
            best = (float(grid[i]), int(char_start[rows[i]]), int(char_end[cols[i]]), w)
    if best is None:
        return []
    every = np.concatenate(scores)
    top = float(every.max())
    total = float(np.exp(every - top).sum())
    if top_k == 1:
        ranked: Iterable[tuple[float, int, int, int]] = [best]
    else:  # every candidate, best first; a stable sort keeps ties in the order above
        starts = np.concatenate([a for a, _, _ in spans])
        ends = np.concatenate([b for _, b, _ in spans])
        wins = np.concatenate([np.full(len(a), w) for a, _, w in spans])
        order = np.argsort(-every, kind="stable")
        ranked = (
            (float(every[i]), int(starts[i]), int(ends[i]), int(wins[i])) for i in order.tolist()
        )
    out: list[QAAnswer] = []
    seen: set[tuple[int, int]] = set()
    for score, cs, ce, w in ranked:
        # SentencePiece's "▁word" pieces map back to the space before the word as well.
        while cs < ce and context[cs].isspace():
            cs += 1
        while ce > cs and context[ce - 1].isspace():
            ce -= 1
        if cs == ce:
            if not out and not skip_blank:
                # A span of whitespace alone won (SentencePiece's lone "▁" maps to the space
                # before a word): no answer, not "" with a confidence. Decoded again without
                # such spans, here only (WordPiece has no whitespace token; checking every
                # request costs ~40 us).
                return decode_spans(context, windows, start_logits, end_logits,
                                    max_answer_length, n_best, top_k, skip_blank=True)  # fmt: skip
            continue
        if (cs, ce) in seen:
            continue
        seen.add((cs, ce))
        # The span's probability among every candidate (softmax of the span scores).
        out.append(QAAnswer(context[cs:ce], cs, ce, score, math.exp(score - top) / total, w))
        if len(out) == top_k:
            break
    return out


def answer_token_span(window: QAWindow, char_start: int, char_end: int) -> tuple[int, int] | None:
    """Token positions (start, end inclusive) of a character span inside ``window``.

    ``None`` when the span is not wholly inside the window's context slice (training then
    points both labels at position 0, the [CLS] token).
    """
    lo, hi = window.context_start, window.context_end
    if hi <= lo:
        return None
    offs = window.offsets[lo:hi]
    if not (offs[0, 0] <= char_start and offs[-1, 1] >= char_end):
        return None
    # First token whose end is past the answer start; last token whose start is before its end.
    starts = np.nonzero(offs[:, 1] > char_start)[0]
    ends = np.nonzero(offs[:, 0] < char_end)[0]
    if len(starts) == 0 or len(ends) == 0:
        return None
    s, e = int(starts[0]), int(ends[-1])
    if e < s:
        return None
    return lo + s, lo + e

"""Properties of service/preprocess/qa.py on the committed qa-zh tokenizer, any geometry.

* Windows: each fits ``max_length``, has BERT's layout, and the context slices, laid end to
  end without their ``doc_stride`` overlaps, are exactly the context's own encoding (ids
  and character offsets, from ``tokenizers``).
* The span decoder, against an exhaustive search over every (start, end) pair of every
  window: with ``n_best`` at least the window's context the same best score, a span that
  reaches it, and the same probability; question, specials and padding carry the highest
  logits and are never chosen.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.preprocess.qa import NO_OFFSET, QAEncoder, QAWindow, decode_best_span

TOKENIZER = Path(__file__).resolve().parents[1] / "models/qa-zh/1/tokenizer.json"
CHUNKS = [*"北京是中国的首都长江上海，。？", *"ab7 ", " \t\n", "hello", "world", "12345"]
CHUNKS += ["café", "ﬁ", "\u200b", "[SEP]", "[CLS]", "[UNK]", "[PAD]", "  "]
texts = st.lists(st.sampled_from(CHUNKS), max_size=60).map("".join)


@st.composite
def geometries(draw: st.DrawFn) -> tuple[int, int, int]:
    """(max_length, doc_stride, max_query_length) the encoder accepts."""
    max_query_length = draw(st.integers(1, 12))
    max_length = draw(st.integers(max_query_length + 5, max_query_length + 30))
    doc_stride = draw(st.integers(0, max_length - max_query_length - 4))
    return max_length, doc_stride, max_query_length


@functools.cache
def _encoder(geometry: tuple[int, int, int]) -> QAEncoder:
    return QAEncoder.load(TOKENIZER, *geometry)


@given(geometries(), texts, texts)
def test_the_window_count_is_the_windows_cut(geometry, question, context) -> None:
    """window_count (a request's limit checked before its windows are cut) counts them."""
    enc = _encoder(geometry)
    [(q, c)] = enc.tokenize([question], [context])
    windows, q_tokens, c_tokens = enc.windows_of(q, c)
    assert enc.window_count(q_tokens, c_tokens) == len(windows)


@given(geometries(), texts, texts)
def test_windows_lay_out_the_contexts_own_encoding(geometry, question, context) -> None:
    enc = _encoder(geometry)
    max_length, doc_stride, max_query_length = geometry
    want = enc.tokenizer.encode(context, add_special_tokens=False)
    q_ids = enc.tokenizer.encode(question, add_special_tokens=False).ids[:max_query_length]
    windows = enc.encode(question, context)
    ids: list[int] = []
    offsets: list[list[int]] = []
    cls_id, sep_id = enc.tokenizer.token_to_id("[CLS]"), enc.tokenizer.token_to_id("[SEP]")
    for i, w in enumerate(windows):
        assert len(w) <= max_length
        head = [cls_id, *q_ids, sep_id]  # the tokenizer's pair template: BERT's
        assert w.input_ids[: len(head)].tolist() == head and w.input_ids[-1] == sep_id
        assert (w.context_start, w.context_end) == (len(head), len(w) - 1)
        assert w.token_type_ids.tolist() == [0] * len(head) + [1] * (len(w) - len(head))
        outside = np.r_[w.offsets[: w.context_start], w.offsets[w.context_end :]]
        assert (outside == NO_OFFSET).all()
        lo, hi = w.context_start, w.context_end
        # Every window but the last is full; the next one starts doc_stride tokens back.
        overlap = doc_stride if i else 0
        if i < len(windows) - 1:
            assert len(w) == max_length
        assert w.input_ids[lo : lo + overlap].tolist() == ids[len(ids) - overlap :]
        ids += w.input_ids[lo + overlap : hi].tolist()
        offsets += w.offsets[lo + overlap : hi].tolist()
        if w.barred is not None:
            assert w.barred[lo:hi].tolist() == [t in enc.barred_ids for t in w.input_ids[lo:hi]]
    assert ids == want.ids
    assert offsets == [list(o) for o in want.offsets]
    assert all(0 <= s <= e <= len(context) for s, e in offsets)


def _exhaustive(context: str, windows, starts, ends, max_answer_length: int):
    """Every valid span of every window: (scores, best score, set of best (start, end, w))."""
    scores = []
    for w, win in enumerate(windows):
        barred = win.barred if win.barred is not None else np.zeros(len(win), bool)
        for s in range(win.context_start, win.context_end):
            for e in range(s, min(win.context_end, s + max_answer_length)):
                cs, ce = int(win.offsets[s, 0]), int(win.offsets[e, 1])
                if not barred[s] and not barred[e] and ce > cs:
                    scores.append((float(starts[w, s]) + float(ends[w, e]), cs, ce, w))
    if not scores:
        return [], None, set()
    best = max(sc for sc, *_ in scores)
    return [sc for sc, *_ in scores], best, {(cs, ce, w) for sc, cs, ce, w in scores if sc == best}


logit = st.floats(-20, 20, allow_nan=False, width=32)


@given(geometries(), texts, texts, st.integers(1, 40), st.data())
def test_the_decoder_finds_the_best_valid_span(geometry, question, context, max_ans, data):
    enc = _encoder(geometry)
    windows: list[QAWindow] = enc.encode(question, context)
    width = geometry[0] + data.draw(st.integers(0, 3))  # padded past the longest window
    shape = (len(windows), width)
    starts = data.draw(hnp.arrays(np.float32, shape, elements=logit)).astype(np.float64)
    ends = data.draw(hnp.arrays(np.float32, shape, elements=logit)).astype(np.float64)
    for w, win in enumerate(windows):  # traps: the highest logits lie outside the context
        for row in (starts, ends):
            row[w, : win.context_start] = 100.0
            row[w, win.context_end :] = 100.0
            if win.barred is not None:
                row[w, : len(win)][win.barred] = 100.0
    scores, best, argmax = _exhaustive(context, windows, starts, ends, max_ans)
    ans = decode_best_span(context, windows, starts, ends, max_ans, n_best=width)
    if best is None:
        assert (ans.text, ans.window, ans.probability) == ("", -1, 0.0)
        return
    assert ans.score == best
    assert (ans.start, ans.end, ans.window) in argmax
    assert ans.text == context[ans.start : ans.end] and ans.text
    want_p = 1.0 / np.exp(np.asarray(scores) - best).sum()
    assert math.isclose(ans.probability, want_p, rel_tol=1e-9)
    # A smaller n-best never finds more than the exhaustive search.
    small = decode_best_span(context, windows, starts, ends, max_ans, n_best=2)
    assume(small.window >= 0)
    assert small.score <= best

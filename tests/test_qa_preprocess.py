"""service/preprocess/qa.py: windows, offsets and span decoding (no torch).

A BERT-Chinese-style tokenizer (NFKC + BERT normaliser, one token per CJK character, word
pieces for Latin text) is built in the test from hand-made text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from service.preprocess.qa import (
    NO_OFFSET,
    QAEncoder,
    answer_token_span,
    decode_best_span,
    decode_spans,
)
from training.transformer.pretrain import build_char_tokenizer

TEXT = [
    "中国的首都是北京，它有三千多年的历史。李白是唐代著名诗人。",
    "这款软件由ＡＢＣ公司开发，售价１２０元，使用Python编写。",
    "长江是亚洲最长的河流，全长约6300公里。上海位于长江入海口。",
    "the quick brown fox jumps over the lazy dog abc python",
]
LONG = "".join(TEXT[:3]) * 3  # ~200 characters: several windows at max_length 48


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer(TEXT * 3, vocab_size=300, min_frequency=1, limit_alphabet=500)


@pytest.fixture(scope="module")
def enc(tok):
    return QAEncoder(tok, max_length=48, doc_stride=12, max_query_length=10)


def _context_token_ids(tok, context):
    return tok.encode(context, add_special_tokens=False).ids


def test_windows_cover_context_with_stride_overlap(enc, tok):
    q = "长江有多长？"
    wins = enc.encode(q, LONG)
    assert len(wins) > 2
    ctx_ids = _context_token_ids(tok, LONG)
    q_len = len(tok.encode(q, add_special_tokens=False).ids)
    room = 48 - q_len - 3
    covered: list[int] = []
    prev_end = None
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    for i, w in enumerate(wins):
        assert len(w) <= 48
        ids = w.input_ids.tolist()
        assert ids[0] == cls_id and ids[w.context_start - 1] == sep_id
        assert ids[-1] == sep_id and w.context_end == len(w) - 1
        assert (w.token_type_ids[: w.context_start] == 0).all()
        assert (w.token_type_ids[w.context_start :] == 1).all()
        assert (w.offsets[: w.context_start] == NO_OFFSET[0]).all()
        assert (w.offsets[w.context_end :] == NO_OFFSET[0]).all()
        slice_ids = ids[w.context_start : w.context_end]
        if i < len(wins) - 1:
            assert len(slice_ids) == room
        start = i * (room - 12)
        assert slice_ids == ctx_ids[start : start + room]
        if prev_end is not None:
            assert prev_end - start == 12  # consecutive windows share doc_stride tokens
        prev_end = start + len(slice_ids)
        covered.extend(range(start, prev_end))
    assert set(covered) == set(range(len(ctx_ids)))


def test_offsets_point_into_the_original_text_mixed_widths(enc):
    context = TEXT[1]  # full-width ＡＢＣ and １２０, ASCII Python
    (w,) = enc.encode("谁开发的？", context)
    pieces = [context[s:e] for s, e in w.offsets[w.context_start : w.context_end]]
    assert "".join(pieces) == context.replace(" ", "")
    assert "ＡＢＣ" in pieces or {"Ａ", "Ｂ", "Ｃ"} <= set(pieces)  # original chars, not NFKC'd
    assert any(p.lower().startswith("py") for p in pieces)


def test_empty_context_gives_one_window_and_no_answer(enc):
    (w,) = enc.encode("问题？", "")
    assert w.context_start == w.context_end
    ans = decode_best_span("", [w], [np.zeros(len(w))], [np.zeros(len(w))])
    assert ans.text == "" and ans.window == -1


def test_long_question_is_cut(enc):
    (w,) = enc.encode("长" * 40, "北京")
    assert w.context_start == 1 + 10 + 1


def _logits_for(window, char_start, char_end, high=10.0):
    s = np.zeros(len(window))
    e = np.zeros(len(window))
    span = answer_token_span(window, char_start, char_end)
    if span is not None:
        s[span[0]] = high
        e[span[1]] = high
    return s, e


@pytest.mark.parametrize("answer", ["ＡＢＣ公司", "１２０元", "Python", "北京", "6300公里"])
def test_decode_maps_back_to_exact_characters(enc, answer):
    context = LONG + TEXT[1]
    start = context.rindex(answer)
    wins = enc.encode("问题？", context)
    logits = [_logits_for(w, start, start + len(answer)) for w in wins]
    ans = enc.decode(context, wins, [x[0] for x in logits], [x[1] for x in logits], 10)
    assert (ans.text, ans.start, ans.end) == (answer, start, start + len(answer))
    assert context[ans.start : ans.end] == ans.text
    assert 0.0 < ans.probability <= 1.0


def test_answer_across_a_window_border_is_found_in_the_overlapping_window(enc, tok):
    wins = enc.encode("长江？", LONG)
    w0, w1 = wins[0], wins[1]
    # An answer of 4 tokens straddling the end of window 0 (2 inside, 2 outside).
    c_off = tok.encode(LONG, add_special_tokens=False).offsets
    n0 = w0.context_end - w0.context_start
    start, end = c_off[n0 - 2][0], c_off[n0 + 1][1]
    assert answer_token_span(w0, start, end) is None  # cut by the border
    span = answer_token_span(w1, start, end)
    assert span is not None
    got = "".join(LONG[s:e] for s, e in w1.offsets[span[0] : span[1] + 1])
    assert got == LONG[start:end]
    # Decoding: window 0 votes for a shorter in-window span with lower logits.
    s0, e0 = np.zeros(len(w0)), np.zeros(len(w0))
    s0[w0.context_end - 2] = e0[w0.context_end - 1] = 3.0
    s1, e1 = _logits_for(w1, start, end, high=5.0)
    rest = [np.zeros(len(w)) for w in wins[2:]]
    ans = decode_best_span(LONG, wins, [s0, s1, *rest], [e0, e1, *rest], 30)
    assert (ans.text, ans.start, ans.window) == (LONG[start:end], start, 1)


def test_answer_at_the_very_start_and_end_of_the_context(enc):
    wins = enc.encode("问题？", LONG)
    for start, end in ((0, 2), (len(LONG) - 3, len(LONG))):
        found = [answer_token_span(w, start, end) for w in wins]
        assert any(f is not None for f in found)
        logits = [_logits_for(w, start, end) for w in wins]
        ans = decode_best_span(LONG, wins, [x[0] for x in logits], [x[1] for x in logits], 10)
        assert ans.text == LONG[start:end]


def test_decode_respects_max_answer_length_and_order(enc):
    (w,) = enc.encode("问题？", TEXT[0])
    s, e = np.zeros(len(w)), np.zeros(len(w))
    s[w.context_start + 10] = 9.0  # best start is after best end: invalid pair
    e[w.context_start + 2] = 9.0
    s[w.context_start + 1] = 5.0
    e[w.context_start + 8] = 5.0
    ans = decode_best_span(TEXT[0], [w], [s], [e], max_answer_length=30)
    assert ans.start == int(w.offsets[w.context_start + 1, 0])
    short = decode_best_span(TEXT[0], [w], [s], [e], max_answer_length=2)
    assert short.end - short.start <= 2


def _pairwise_ranked(context, windows, starts, ends, max_answer_length, k, n_best=20):
    """The decoding rule read literally, pair by pair (the oracle for the vectorised one):
    every candidate, best score first (the earlier of equal scores first), each (start, end)
    once, with its softmax over all candidates; the first k."""
    cands = []
    for w, win in enumerate(windows):
        lo, hi = win.context_start, win.context_end
        s_log, e_log = np.asarray(starts[w])[lo:hi], np.asarray(ends[w])[lo:hi]
        for s in np.argsort(-s_log, kind="stable")[:n_best]:
            for e in np.argsort(-e_log, kind="stable")[:n_best]:
                cs, ce = int(win.offsets[lo + s, 0]), int(win.offsets[lo + e, 1])
                if s <= e < s + max_answer_length and ce > cs:
                    cands.append((float(s_log[s] + e_log[e]), cs, ce, w))
    if not cands:
        return []
    top = max(c[0] for c in cands)
    total = sum(np.exp(c[0] - top) for c in cands)
    out, seen = [], set()
    for i in sorted(range(len(cands)), key=lambda i: -cands[i][0]):  # sorted() is stable
        score, cs, ce, w = cands[i]
        if (cs, ce) not in seen:
            seen.add((cs, ce))
            out.append((cs, ce, w, score, np.exp(score - top) / total))
    return out[:k]


@pytest.mark.parametrize("seed", range(12))
def test_decode_matches_the_pairwise_rule(enc, seed):
    """Random logits over several windows, with ties (rounded logits), short answer limits
    and a window with no context: the same span, window, score and probability."""
    rng = np.random.default_rng(seed)
    wins = enc.encode("长江？", LONG)
    wins = [*wins[:3], enc.encode("问题？", "")[0]] if seed % 3 == 0 else wins
    starts = [np.round(rng.normal(size=len(w)), 1) for w in wins]
    ends = [np.round(rng.normal(size=len(w)), 1) for w in wins]
    max_len = int(rng.choice([1, 3, 30]))
    ((cs, ce, w, score, prob),) = _pairwise_ranked(LONG, wins, starts, ends, max_len, 1)
    ans = decode_best_span(LONG, wins, starts, ends, max_len)
    assert (ans.start, ans.end, ans.window, ans.text) == (cs, ce, w, LONG[cs:ce])
    assert ans.score == score
    assert ans.probability == pytest.approx(prob, rel=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_top_k_spans_match_the_pairwise_rule(enc, seed):
    """The k best distinct spans over overlapping windows (the same span from two windows is
    listed once, with its best score), ties kept in candidate order; the first is
    decode_best_span's answer, its probability included."""
    rng = np.random.default_rng(seed)
    wins = enc.encode("长江？", LONG)
    starts = [np.round(rng.normal(size=len(w)), 1) for w in wins]
    ends = [np.round(rng.normal(size=len(w)), 1) for w in wins]
    max_len = int(rng.choice([1, 3, 30]))
    k = int(rng.choice([2, 5, 20]))
    want = _pairwise_ranked(LONG, wins, starts, ends, max_len, k)
    got = decode_spans(LONG, wins, starts, ends, max_len, top_k=k)
    assert [(a.start, a.end, a.window, a.score) for a in got] == [w[:4] for w in want]
    assert [a.probability for a in got] == pytest.approx([w[4] for w in want], rel=1e-12)
    assert all(a.text == LONG[a.start : a.end] for a in got)
    assert len({(a.start, a.end) for a in got}) == len(got) == k  # enough candidates for k
    best = decode_best_span(LONG, wins, starts, ends, max_len)
    assert got[0] == best
    assert decode_spans(LONG, wins, starts, ends, max_len) == [best]


def test_top_k_lists_a_span_two_windows_share_once_with_its_best_score(enc):
    wins = enc.encode("长江？", LONG)[:2]
    a, b = wins
    # a context character both windows hold: window b's first context token
    char = int(b.offsets[b.context_start, 0])
    (i,) = np.nonzero(a.offsets[:, 0] == char)[0]
    starts, ends = [np.zeros(len(w)) for w in wins], [np.zeros(len(w)) for w in wins]
    starts[0][i] = ends[0][i] = 6.0
    starts[1][b.context_start] = ends[1][b.context_start] = 5.0
    spans = decode_spans(LONG, wins, starts, ends, top_k=3)
    assert (spans[0].start, spans[0].score, spans[0].window) == (char, 12.0, 0)
    assert [(x.start, x.end) for x in spans].count((spans[0].start, spans[0].end)) == 1
    assert spans[1].score < 12.0 and spans[2].score <= spans[1].score


def test_top_k_of_a_context_with_no_valid_span_is_empty(enc):
    (w,) = enc.encode("问题？", "")
    assert decode_spans("", [w], [np.zeros(len(w))], [np.zeros(len(w))], top_k=5) == []


def test_collate_pads_right_with_mask(enc):
    wins = enc.encode("长江？", LONG)[:2] + enc.encode("北京？", "北京")
    b = enc.collate(wins, pad_to=64)
    assert b["input_ids"].shape == (3, 64) and b["input_ids"].dtype == np.int64
    assert b["attention_mask"][2].sum() == len(wins[2])
    assert (b["input_ids"][2, len(wins[2]) :] == enc.pad_id).all()
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids"}


def test_encoder_does_not_change_the_callers_tokenizer(tok):
    tok.enable_truncation(8)
    try:
        QAEncoder(tok, max_length=48, doc_stride=12, max_query_length=10)
        assert tok.truncation is not None and tok.truncation["max_length"] == 8
    finally:
        tok.no_truncation()


def test_load_from_tokenizer_json_with_saved_padding(tmp_path: Path, tok):
    tok.enable_padding(length=100)
    tok.save(str(tmp_path / "tokenizer.json"))
    tok.no_padding()
    enc = QAEncoder.load(tmp_path / "tokenizer.json", 48, 12, 10)
    (w,) = enc.encode("北京？", "北京")
    assert len(w) == 1 + 3 + 1 + 2 + 1  # question 北京？ + 2 chars, no padding to 100


def test_bad_geometry_is_refused(tok):
    with pytest.raises(ValueError):
        QAEncoder(tok, max_length=20, doc_stride=5, max_query_length=20)
    with pytest.raises(ValueError):
        QAEncoder(tok, max_length=20, doc_stride=10, max_query_length=8)


def test_ordinary_text_has_no_barred_tokens(enc):
    assert all(w.barred is None for w in enc.encode("长江有多长？", LONG))


def test_typed_special_tokens_never_bound_an_answer_but_unk_and_inner_ones_may(enc, tok):
    context = "[CLS]北京[SEP]上海𠮷[MASK]"  # 𠮷 is not in the vocabulary: [UNK]
    (w,) = enc.encode("问题？", context)
    lo, hi = w.context_start, w.context_end
    ids = w.input_ids[lo:hi].tolist()
    unk = tok.token_to_id("[UNK]")
    cls_id, sep_id, mask = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[MASK]"))
    assert ids == [cls_id, *ids[1:3], sep_id, *ids[4:6], unk, mask]
    assert w.barred[lo:hi].tolist() == [True, False, False, True, False, False, False, True]
    s, e = np.zeros(len(w)), np.zeros(len(w))
    s[lo] = e[lo] = 50.0  # the model's favourite: the typed [CLS] alone
    s[hi - 1] = e[hi - 1] = 40.0  # then the typed [MASK]
    s[lo + 1] = 5.0  # 北
    e[lo + 6] = 4.0  # 𠮷 ([UNK]: a real character, a valid end)
    ans = decode_best_span(context, [w], [s], [e], max_answer_length=30)
    assert ans.text == "北京[SEP]上海𠮷"  # a special inside the span is fine
    # Only specials in the context: no answer at all.
    (w,) = enc.encode("问题？", "[SEP][CLS][PAD]")
    ans = decode_best_span("[SEP][CLS][PAD]", [w], [np.ones(len(w))], [np.ones(len(w))])
    assert (ans.text, ans.window, ans.probability) == ("", -1, 0.0)


def test_doc_stride_equal_to_the_context_room_is_refused(tok):
    # max_length 20, question cut to 8: 9 context tokens per window. A stride of 9 would not
    # advance the window at all (an endless loop on a long context); 8 advances by one.
    with pytest.raises(ValueError, match="doc_stride"):
        QAEncoder(tok, max_length=20, doc_stride=9, max_query_length=8)
    enc = QAEncoder(tok, max_length=20, doc_stride=8, max_query_length=8)
    wins = enc.encode("长" * 20, TEXT[0])
    n = len(_context_token_ids(tok, TEXT[0]))
    assert len(wins) == n - 9 + 1  # one new context token per window


def test_barred_tokens_leave_the_n_best_before_it_is_cut(enc):
    # n_best=1: the typed [CLS] is every logit's favourite, but barred; the best start and end
    # that remain (北, 京) are the candidates, not nothing.
    context = "[CLS]北京"
    (w,) = enc.encode("问题？", context)
    lo = w.context_start
    s, e = np.zeros(len(w)), np.zeros(len(w))
    s[lo] = e[lo] = 50.0
    s[lo + 1], e[lo + 2] = 5.0, 4.0
    ans = decode_best_span(context, [w], [s], [e], max_answer_length=30, n_best=1)
    assert (ans.text, ans.window) == ("北京", 0)


def test_answer_token_span_of_no_token_is_none(enc):
    context = "北京 上海"
    (w,) = enc.encode("问题？", context)
    assert answer_token_span(w, 2, 3) is None  # only the space between two tokens
    assert answer_token_span(w, 5, 5) is None  # empty, at the very end
    assert answer_token_span(w, 1, 4) == (w.context_start + 1, w.context_start + 2)


def _unigram_tokenizer() -> Tokenizer:
    """A tiny SentencePiece-style Unigram tokenizer (Metaspace) with XLM-R's pair template."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = ["the meeting was held in Paris near the old library 2024"] * 20
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    trainer = trainers.UnigramTrainer(vocab_size=60, special_tokens=specials, unk_token="<unk>")
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return tok


def test_a_span_of_whitespace_alone_is_no_answer_the_next_best_is():
    """A SentencePiece tokenizer's lone "▁" (before a character with no "▁x" piece) maps to
    the space alone: logits that pick it give the best span with words in it, trimmed, not
    "" with a confidence (was: answer "", probability 0.99, start == end)."""
    tok = _unigram_tokenizer()
    context = "the 2 meeting was held in Paris"
    (win,) = QAEncoder(tok, 64, 16, 16).encode("where?", context)
    lone = [i for i in range(win.context_start, win.context_end)
            if context[win.offsets[i, 0] : win.offsets[i, 1]] == " "]  # fmt: skip
    assert lone, "the tokenizer has no lone '▁' here"
    start, end = np.zeros((1, len(win))), np.zeros((1, len(win)))
    start[0, lone[0]] = end[0, lone[0]] = 10.0
    start[0, lone[0] + 1] = 5.0  # the next best: " 2" (10 + 5), trimmed
    end[0, lone[0] + 1] = 5.0
    ans = decode_best_span(context, [win], start, end)
    assert (ans.text, ans.start, ans.end) == ("2", 4, 5), ans
    assert ans.window == 0 and 0 < ans.probability < 1 and ans.score == 15.0


def test_top_k_leaves_out_spans_of_whitespace_alone():
    """The lone "▁" again: as the best span it is re-decoded as decode_best_span does (same
    answer, same probability); as a lower one it is left out, the rest unchanged."""
    tok = _unigram_tokenizer()
    context = "the 2 meeting was held in Paris"
    (win,) = QAEncoder(tok, 64, 16, 16).encode("where?", context)
    lone = [i for i in range(win.context_start, win.context_end)
            if context[win.offsets[i, 0] : win.offsets[i, 1]] == " "]  # fmt: skip
    start, end = np.zeros((1, len(win))), np.zeros((1, len(win)))
    start[0, lone[0]] = end[0, lone[0]] = 10.0
    start[0, lone[0] + 1] = end[0, lone[0] + 1] = 5.0
    spans = decode_spans(context, [win], start, end, top_k=4)
    assert spans[0] == decode_best_span(context, [win], start, end)
    assert spans[0].text == "2" and len(spans) == 4
    assert all(a.text.strip() and a.text == context[a.start : a.end] for a in spans)
    # the blank span third: the first two stand, the blank one is not among the rest
    start[0, lone[0]] = end[0, lone[0]] = 2.0
    start[0, lone[0] + 3] = end[0, lone[0] + 3] = 4.0
    spans = decode_spans(context, [win], start, end, top_k=20)
    assert spans[0] == decode_best_span(context, [win], start, end)
    assert all(a.start < a.end and a.text.strip() for a in spans)


def test_a_sentencepiece_unknown_token_may_bound_an_answer():
    """Unigram (XLM-R's, ALBERT's) names its unknown token by id, not as ``unk_token``: a
    character missing from its vocabulary (<unk>) may start and end an answer, as [UNK] may
    in WordPiece (was: barred like <s> or </s>, so another span was answered)."""
    tok = _unigram_tokenizer()
    context = "the 中 meeting was held in Paris"
    (win,) = QAEncoder(tok, 64, 16, 16).encode("where?", context)
    ids = win.input_ids[win.context_start : win.context_end]
    (unk,) = win.context_start + np.nonzero(ids == tok.token_to_id("<unk>"))[0]
    assert win.barred is None
    start, end = np.zeros((1, len(win))), np.zeros((1, len(win)))
    start[0, unk] = end[0, unk] = 10.0
    ans = decode_best_span(context, [win], start, end)
    assert (ans.text, ans.start, ans.end) == ("中", 4, 5), ans

"""The official CMRC 2018 metric on hand-made cases (values worked out by hand)."""

from __future__ import annotations

import pytest

from training.metrics.cmrc import (
    em_score,
    evaluate,
    f1_score,
    find_lcs,
    mixed_segmentation,
    remove_punctuation,
)


def test_segmentation_chinese_chars_single_and_ascii_runs_as_words():
    assert mixed_segmentation("北京大学 Peking University 1898年") == [
        "北", "京", "大", "学", "peking", "university", "1898", "年",
    ]  # fmt: skip
    assert mixed_segmentation("3.14和1,000") == ["3.14", "和", "1,000"]
    # official punctuation list is segmented (or dropped with rm_punc)
    assert mixed_segmentation("《红楼梦》") == ["《", "红", "楼", "梦", "》"]
    assert mixed_segmentation("《红楼梦》", rm_punc=True) == ["红", "楼", "梦"]


def test_remove_punctuation_official_list_only():
    assert remove_punctuation(" 北京。") == "北京"
    assert remove_punctuation("「上海」：") == "上海"
    assert remove_punctuation("北京,") == "北京,"  # ASCII comma is not in the official list


@pytest.mark.parametrize(
    ("answers", "pred", "em", "f1"),
    [
        (["北京"], "北京。", 1.0, 1.0),
        (["北京大学"], "北京", 0.0, 2 / 3),
        (["1990年"], "1990", 0.0, 2 / 3),
        (["Apple Inc"], "apple", 0.0, 2 / 3),
        (["北京", "北京市"], "北京市", 1.0, 1.0),  # max over references
        (["甲乙丙丁"], "甲丙", 0.0, 1 / 3),  # longest common *contiguous* run: 1 of 2 / 4
        (["北京"], "，", 0.0, 0.0),  # nothing left after punctuation removal
        (["北京"], "北京,", 0.0, 0.8),  # "," stays: [北, 京, ","] vs [北, 京]: p 2/3, r 1
        (["1990年"], "１９９０年", 0.0, 0.5),  # no full-width folding in the official script
        (["上海"], "", 0.0, 0.0),
    ],
)
def test_em_f1_hand_cases(answers, pred, em, f1):
    assert em_score(answers, pred) == em
    assert f1_score(answers, pred) == pytest.approx(f1)


def test_find_lcs_is_contiguous():
    assert find_lcs(list("abcde"), list("xbcdy")) == (list("bcd"), 3)
    assert find_lcs([], list("abc"))[1] == 0


def test_corpus_evaluate_counts_missing_predictions_as_zero():
    refs = {"q1": ["北京"], "q2": ["上海", "上海市"], "q3": ["广州"]}
    preds = {"q1": "北京", "q2": "上海市区"}
    r = evaluate(refs, preds)
    # q1: EM 1 F1 1; q2: EM 0, F1 max(2/4 -> p .5 r 1 = 2/3, 3/4 -> p .75 r 1 = 6/7); q3 missing
    assert r["em"] == pytest.approx(100 / 3)
    assert r["f1"] == pytest.approx(100 * (1 + 6 / 7) / 3)
    assert r["skipped"] == 1 and r["total"] == 3

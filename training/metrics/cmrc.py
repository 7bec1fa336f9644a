"""The official CMRC 2018 metric (``cmrc2018_evaluate.py``), re-implemented without NLTK data.

- Text is lower-cased and stripped; the official punctuation list is removed (it is *only*
  that list: ASCII ``,.!?()`` stay, and the two-character entry ``……`` never matches a single
  character; both quirks are kept so the scores match the official script).
- **F1** is computed on a mixed segmentation: every CJK character (U+4E00..U+9FA5) and every
  listed punctuation mark is its own segment; runs of other characters are split into words
  (the official script uses ``nltk.word_tokenize``; here a word is a run of word characters,
  decimals such as ``3.14`` and ``1,000`` kept whole, and any other non-space character is a
  segment by itself, which agrees with NLTK on the answers of CMRC). F1 uses the length of
  the longest common *contiguous* run of segments (``find_lcs``) as the overlap.
- **EM** compares the punctuation-stripped strings.
- Both take the max over the reference answers; corpus scores are means x 100.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

SP_CHAR = [
    "-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=",
    "，", "。", "：", "？", "！", "“", "”", "；", "’", "《", "》", "……", "·", "、",
    "「", "」", "（", "）", "－", "～", "『", "』",
]  # fmt: skip
_SP = set(SP_CHAR)
_CJK = re.compile(r"[\u4e00-\u9fa5]")
_WORD = re.compile(r"\w+(?:[.,]\d+)*|[^\w\s]")


def _word_tokenize(s: str) -> list[str]:
    return _WORD.findall(s)


def mixed_segmentation(text: str, rm_punc: bool = False) -> list[str]:
    text = str(text).lower().strip()
    segs: list[str] = []
    buf = ""
    for ch in text:
        if rm_punc and ch in _SP:
            continue
        if _CJK.match(ch) or ch in _SP:
            if buf:
                segs.extend(_word_tokenize(buf))
                buf = ""
            segs.append(ch)
        else:
            buf += ch
    if buf:
        segs.extend(_word_tokenize(buf))
    return segs


def remove_punctuation(text: str) -> str:
    return "".join(ch for ch in str(text).lower().strip() if ch not in _SP)


def find_lcs(a: Sequence[str], b: Sequence[str]) -> tuple[Sequence[str], int]:
    """Longest common contiguous run of ``a`` and ``b`` (the official O(len a * len b) DP)."""
    best, end = 0, 0
    prev = [0] * (len(b) + 1)
    for i in range(len(a)):
        cur = [0] * (len(b) + 1)
        for j in range(len(b)):
            if a[i] == b[j]:
                cur[j + 1] = prev[j] + 1
                if cur[j + 1] > best:
                    best, end = cur[j + 1], i + 1
        prev = cur
    return a[end - best : end], best


def f1_score(answers: Iterable[str], prediction: str) -> float:
    pred = mixed_segmentation(prediction, rm_punc=True)
    scores = [0.0]
    for ans in answers:
        ref = mixed_segmentation(ans, rm_punc=True)
        _, n = find_lcs(ref, pred)
        if n == 0:
            scores.append(0.0)
            continue
        p, r = n / len(pred), n / len(ref)
        scores.append(2 * p * r / (p + r))
    return max(scores)


def em_score(answers: Iterable[str], prediction: str) -> float:
    pred = remove_punctuation(prediction)
    return float(any(remove_punctuation(a) == pred for a in answers))


def evaluate(
    references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]
) -> dict[str, float]:
    """Corpus EM/F1 (x100) over every question of ``references``; a missing prediction
    scores 0 and is counted in ``skipped`` (as the official script does)."""
    f1 = em = 0.0
    skipped = 0
    for qid, answers in references.items():
        if qid not in predictions:
            skipped += 1
            continue
        f1 += f1_score(answers, predictions[qid])
        em += em_score(answers, predictions[qid])
    n = max(len(references), 1)
    return {
        "em": 100.0 * em / n,
        "f1": 100.0 * f1 / n,
        "average": 50.0 * (em + f1) / n,
        "total": float(len(references)),
        "skipped": float(skipped),
    }

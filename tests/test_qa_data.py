"""SQuAD-v1 loader (CMRC 2018): answer re-alignment, unfindable answers, counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.data_support import shared_data
from training.data.squad import LoadStats, load_squad, locate_answer

_ROOT = shared_data("cmrc2018/cmrc2018_train.json")
REAL = _ROOT / "cmrc2018" if _ROOT else None


def test_locate_answer_prefers_recorded_then_nearest():
    ctx = "北京在北方。北京是首都。"
    assert locate_answer(ctx, "北京", 6) == 6
    assert locate_answer(ctx, "北京", -1) == 0
    assert locate_answer(ctx, "北京", 5) == 6  # nearest occurrence to the bad offset
    assert locate_answer(ctx, "上海", 0) == -1
    assert locate_answer(ctx, "", 0) == -1


def test_load_squad_hand_made(tmp_path: Path):
    data = {
        "version": "v1.0",
        "data": [
            {
                "id": "A1",
                "title": "t",
                "paragraphs": [
                    {
                        "id": "P1",
                        "context": "李白是唐代诗人，字太白。李白被称为诗仙。",
                        "qas": [
                            {"id": "q1", "question": "谁是诗仙？",
                             "answers": [{"text": "李白", "answer_start": 12}]},
                            {"id": "q2", "question": "字什么？",
                             "answers": [{"text": "太白", "answer_start": 3},
                                         {"text": "不存在", "answer_start": -1}]},
                            {"id": "q3", "question": "无答案？",
                             "answers": [{"text": "杜甫", "answer_start": -1}]},
                        ],
                    }
                ],
            }
        ],
    }  # fmt: skip
    path = tmp_path / "mini.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    stats = LoadStats()
    ex = load_squad(path, stats)
    assert [e.id for e in ex] == ["q1", "q2", "q3"]
    assert ex[0].answers[0].start == 12 and ex[0].article == "P1"
    q2 = ex[1]
    assert q2.answers[0].start == 9  # re-searched
    assert q2.context[q2.answers[0].start : q2.answers[0].end] == "太白"
    assert q2.answers[1].start == -1 and q2.first_located == q2.answers[0]
    assert ex[2].first_located is None
    assert stats.as_dict() == {
        "questions": 3, "answers": 4, "realigned_answers": 1, "unfindable_answers": 2,
        "questions_without_located_answer": 1,
    }  # fmt: skip


@pytest.mark.realdata
@pytest.mark.skipif(REAL is None, reason="shared CMRC 2018 files not available")
@pytest.mark.parametrize(
    "content, reason",
    [
        ("{not json", "not SQuAD-v1 JSON"),
        ('{"version": 1}', "KeyError 'data'"),
        ('{"data": [{"paragraphs": [{"qas": []}]}]}', "KeyError 'context'"),
        ("[1, 2]", "TypeError"),
    ],
)
def test_a_file_that_is_not_squad_is_a_data_error_naming_it(tmp_path: Path, content, reason):
    """Was a bare JSONDecodeError / KeyError traceback that did not say which file."""
    from training.data.common import DataError

    path = tmp_path / "cmrc2018_train.json"
    path.write_text(content, "utf-8")
    with pytest.raises(DataError, match=reason) as e:
        load_squad(path)
    assert str(e.value).startswith(f"{path}: not SQuAD-v1 JSON")


@pytest.mark.skipif(REAL is None, reason="shared CMRC 2018 files not available")
@pytest.mark.realdata
def test_real_cmrc_counts_match_the_data_readme():
    assert REAL is not None
    st = LoadStats()
    train = load_squad(REAL / "cmrc2018_train.json", st)
    assert len(train) == 10142 and st.realigned + st.unfindable == 21 and st.unfindable == 0
    sd = LoadStats()
    dev = load_squad(REAL / "cmrc2018_dev.json", sd)
    assert len(dev) == 3219 and sd.answers == 9657
    assert sd.realigned + sd.unfindable == 200
    for e in train:
        for a in e.answers:
            assert e.context[a.start : a.end] == a.text

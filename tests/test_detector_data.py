"""HC3 loader and the split by question."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.data_support import shared_data
from training.data.hc3 import HC3Stats, hc3_files, load_hc3
from training.transformer.detector import split_by_question

REAL = shared_data("hc3/en")


def _write(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rows = [
        {"question": "q0", "human_answers": ["h0", None], "chatgpt_answers": ["m0", "m0b"]},
        {"question": "q1", "human_answers": ["  "], "chatgpt_answers": [""]},
        {"question": "q2", "human_answers": None, "chatgpt_answers": ["m2"]},
    ]
    (folder / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", "utf-8")
    (folder / "b.jsonl").write_text(
        json.dumps({"question": "q3", "human_answers": ["h3"], "chatgpt_answers": []}) + "\n",
        "utf-8",
    )
    return folder


def test_load_hc3_skips_and_counts_null_and_empty(tmp_path: Path):
    _write(tmp_path / "hc3" / "en")
    files = hc3_files(tmp_path, "en")
    assert [f.name for f in files] == ["a.jsonl", "b.jsonl"]
    stats = HC3Stats()
    ex = load_hc3(files, stats)
    assert [(e.text, e.label, e.question, e.source) for e in ex] == [
        ("h0", 0, 0, "a"), ("m0", 1, 0, "a"), ("m0b", 1, 0, "a"), ("m2", 1, 2, "a"),
        ("h3", 0, 3, "b"),
    ]  # fmt: skip
    assert stats.as_dict() == {
        "questions": 4, "human_answers": 2, "machine_answers": 3,
        "skipped_null_answers": 1, "skipped_empty_answers": 2,
    }  # fmt: skip


def test_missing_folder_is_an_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        hc3_files(tmp_path, "en")
    (tmp_path / "hc3" / "en").mkdir(parents=True)
    (tmp_path / "hc3" / "zh").mkdir()
    (tmp_path / "hc3" / "en" / "a.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match=r"hc3/fr or .* \(languages here: en, zh\)"):
        hc3_files(tmp_path, "fr")  # named the data root only, not where it looked


def test_a_bad_hc3_line_is_a_data_error_naming_file_and_line(tmp_path: Path):
    from training.data.common import DataError

    path = tmp_path / "all.jsonl"
    good = json.dumps({"question": "q", "human_answers": ["a"], "chatgpt_answers": ["b"]})
    path.write_text(f"{good}\n\n{good[:-3]}\n", "utf-8")
    with pytest.raises(DataError, match=f"^{path}, line 3: not HC3 JSON lines"):
        load_hc3([path])
    path.write_text(f'{good}\n{{"human_answers": "one string"}}\n', "utf-8")
    with pytest.raises(DataError, match="human_answers is str"):
        load_hc3([path])
    path.write_text(f"{good}\n[1]\n", "utf-8")
    with pytest.raises(DataError, match="a row is list"):
        load_hc3([path])


def test_split_by_question_keeps_questions_whole_and_is_seeded():
    from tests.builders_bert import detector_examples

    ex = detector_examples(n_questions=50)
    a = split_by_question(ex, 7, {"train": 0.8, "dev": 0.1, "test": 0.1})
    b = split_by_question(ex, 7, {"train": 0.8, "dev": 0.1, "test": 0.1})
    assert a == b
    qs = {k: {e.question for e in v} for k, v in a.items()}
    assert not (qs["train"] & qs["dev"]) and not (qs["train"] & qs["test"])
    assert not (qs["dev"] & qs["test"])
    assert sum(len(v) for v in a.values()) == len(ex)
    assert len(qs["test"]) == 5


@pytest.mark.realdata
@pytest.mark.skipif(REAL is None, reason="shared HC3 files not available")
def test_real_hc3_counts():
    assert REAL is not None
    st = HC3Stats()
    ex = load_hc3(hc3_files(REAL, "en"), st)
    assert st.questions == 3277 and st.human == 3277
    assert st.skipped_empty == 18 and st.machine == 5740 - 18
    assert len(ex) == st.human + st.machine
    zh = HC3Stats()
    load_hc3(hc3_files(REAL, "zh"), zh)
    assert zh.skipped_null == 12 and zh.skipped_empty == 139

"""Dataset loaders, splits and checksums: small fixtures written here, plus the real files
when they exist (``NLPSERVE_DATA_DIR`` or ../shared/data; skipped otherwise)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from tests.data_support import shared_data
from training.data.checksums import compare_checksums, data_checksums
from training.data.common import DataError
from training.data.conllu import load_conllu, parse_conllu
from training.data.polarity import load_polarity
from training.data.splits import split_indices
from training.data.treebank import load_treebank, parse_mrg

REAL = shared_data("nltk_data")
needs_real = pytest.mark.skipif(REAL is None, reason="shared data not available")

MRG = """
( (S
    (NP-SBJ (NNP Pierre) (NNP Vinken) )
    (VP (MD will)
      (VP (VB join) (NP (DT the) (NN board) )
        (PP (-NONE- *T*-1) )))
    (. .) ))
( (S (NP-SBJ (-NONE- *-2) )
    (PRN (-LRB- -LRB-) (CD 1\\/2) (-RRB- -RRB-) )
    (VP (VBZ is) (NP (NN it) ))
    (. .) ))
"""


# ----------------------------------------------------------------------- treebank
def test_parse_mrg_drops_traces_and_unescapes():
    sents = parse_mrg(MRG, "fixture.mrg")
    assert len(sents) == 2
    assert sents[0] == [
        ("Pierre", "NNP"),
        ("Vinken", "NNP"),
        ("will", "MD"),
        ("join", "VB"),
        ("the", "DT"),
        ("board", "NN"),
        (".", "."),
    ]
    assert [w for w, _ in sents[1]] == ["(", "1/2", ")", "is", "it", "."]
    assert [t for _, t in sents[1]][:3] == ["-LRB-", "CD", "-RRB-"]
    raw = parse_mrg(MRG, drop_traces=False, unescape=False)
    assert ("*T*-1", "-NONE-") in raw[0]
    assert raw[1][1] == ("-LRB-", "-LRB-")


def _write_treebank_folder(root: Path) -> Path:
    combined = root / "treebank" / "combined"
    combined.mkdir(parents=True)
    (combined / "wsj_0001.mrg").write_text(MRG, encoding="utf-8")
    (combined / "wsj_0002.mrg").write_text(MRG, encoding="utf-8")
    return root / "treebank"


def test_treebank_folder_and_zip_and_nltk_layout(tmp_path):
    folder = _write_treebank_folder(tmp_path / "extracted")
    a = load_treebank(folder)
    b = load_treebank(tmp_path / "extracted")  # parent of treebank/
    assert len(a) == len(b) == 4
    assert a.sentences == b.sentences
    assert all("-NONE-" not in ts for ts in a.tags)
    assert len(a.files) == 2

    corpora = tmp_path / "root" / "nltk_data" / "corpora"
    corpora.mkdir(parents=True)
    with zipfile.ZipFile(corpora / "treebank.zip", "w") as zf:
        zf.writestr("treebank/", "")
        zf.writestr("treebank/README", "readme")
        zf.writestr("treebank/combined/wsj_0001.mrg", MRG)
        zf.writestr("treebank/combined/wsj_0002.mrg", MRG)
        zf.writestr("treebank/tagged/wsj_0001.pos", "ignored")
    z = load_treebank(tmp_path / "root")
    assert z.sentences == a.sentences and z.tags == a.tags
    assert z.files == [corpora / "treebank.zip"]
    assert load_treebank(corpora / "treebank.zip").sentences == a.sentences


def test_treebank_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="not found.*treebank"):
        load_treebank(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt.*not a zip"):
        load_treebank(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="no Penn Treebank sample"):
        load_treebank(tmp_path)
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("treebank/raw/wsj_0001", "text")
    with pytest.raises(DataError, match=r"bad\.zip.*no combined/\*\.mrg"):
        load_treebank(bad)
    broken = tmp_path / "broken" / "combined"
    broken.mkdir(parents=True)
    (broken / "wsj_0001.mrg").write_text("( (S (NN dog) )", encoding="utf-8")
    with pytest.raises(DataError, match=r"wsj_0001\.mrg.*unbalanced"):
        load_treebank(tmp_path / "broken")
    (broken / "wsj_0001.mrg").write_text("just words, no trees", encoding="utf-8")
    with pytest.raises(DataError, match=r"wsj_0001\.mrg.*outside a bracketed tree"):
        load_treebank(tmp_path / "broken")


@needs_real
@pytest.mark.realdata
def test_real_treebank_counts():
    assert REAL is not None
    c = load_treebank(REAL)
    assert len(c) == 3914
    assert sum(map(len, c.sentences)) == 100_676 - 6_592  # traces dropped
    assert "-NONE-" not in c.tagset() and len(c.tagset()) == 45
    full = load_treebank(REAL, drop_traces=False)
    assert sum(map(len, full.sentences)) == 100_676
    assert c.sentences[0][:3] == ["Pierre", "Vinken", ","]


# ----------------------------------------------------------------------- CoNLL-U
CONLLU = """# sent_id = 1
# text = I don't know.
1\tI\tI\tPRON\tPRP\t_\t3\tnsubj\t_\t_
2-3\tdon't\t_\t_\t_\t_\t_\t_\t_\t_
2\tdo\tdo\tAUX\tVBP\t_\t3\taux\t_\t_
3\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_
3.1\tknow\tknow\tVERB\tVB\t_\t_\t_\t0:root\t_
4\tknow\tknow\tVERB\tVB\t_\t0\troot\t_\t_
5\t.\t.\tPUNCT\t.\t_\t4\tpunct\t_\t_

# sent_id = 2
1\tHi\thi\tINTJ\tUH\t_\t0\troot\t_\t_
"""


def test_conllu_skips_ranges_and_empty_nodes(tmp_path):
    sents = parse_conllu(CONLLU, "x.conllu")
    assert [[w for w, _ in s] for s in sents] == [["I", "do", "n't", "know", "."], ["Hi"]]
    assert [t for _, t in sents[0]] == ["PRON", "AUX", "PART", "VERB", "PUNCT"]
    (tmp_path / "a.conllu").write_text(CONLLU, encoding="utf-8")
    (tmp_path / "b.conllu").write_text(CONLLU, encoding="utf-8")
    x = load_conllu(tmp_path / "a.conllu", tag_field="xpos")
    assert x.tags[0] == ["PRP", "VBP", "RB", "VB", "."]
    assert len(load_conllu(tmp_path)) == 4  # every *.conllu of a folder


def test_conllu_errors(tmp_path):
    with pytest.raises(DataError, match="missing.conllu.*not found"):
        load_conllu(tmp_path / "missing.conllu")
    with pytest.raises(DataError, match="no \\*.conllu files"):
        load_conllu(tmp_path)
    bad = tmp_path / "bad.conllu"
    bad.write_text("1\tI\tPRON\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.conllu:1: expected 10 tab-separated"):
        load_conllu(bad)
    bad.write_text("1\tI\tI\tPRON\t_\t_\t0\troot\t_\t_\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.conllu:1: token has no XPOS"):
        load_conllu(bad, tag_field="xpos")


@needs_real
@pytest.mark.realdata
def test_real_conllu_counts():
    assert REAL is not None
    ud = REAL / "ud_english_ewt"
    dev = load_conllu(ud / "en_ewt-ud-dev.conllu")
    test = load_conllu(ud / "en_ewt-ud-test.conllu")
    assert (len(dev), sum(map(len, dev.sentences))) == (2001, 25_147)
    assert (len(test), sum(map(len, test.sentences))) == (2077, 25_094)
    assert len(dev.tagset()) == 17


# ----------------------------------------------------------------------- polarity
def test_polarity_folder_zip_and_encodings(tmp_path):
    folder = tmp_path / "rt-polaritydata"
    folder.mkdir()
    (folder / "rt-polarity.pos").write_bytes("a caf\u00e9 movie\ngreat fun\n".encode())
    # the original distribution is latin-1
    (folder / "rt-polarity.neg").write_bytes("bad caf\u00e9\r\n\r\ndull\r\n".encode("latin-1"))
    c = load_polarity(tmp_path)
    assert c.texts == ["bad caf\u00e9", "dull", "a caf\u00e9 movie", "great fun"]
    assert c.labels == [0, 0, 1, 1]
    assert c.label_names == ["negative", "positive"]

    zpath = tmp_path / "nltk_data" / "corpora" / "sentence_polarity.zip"
    zpath.parent.mkdir(parents=True)
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("sentence_polarity/README.txt", "readme")
        zf.writestr("sentence_polarity/rt-polarity.pos", "a caf\u00e9 movie\ngreat fun\n")
        zf.writestr("sentence_polarity/rt-polarity.neg", "bad caf\u00e9\ndull\n".encode("latin-1"))
    z = load_polarity(zpath)
    assert z.texts == c.texts and z.labels == c.labels
    assert z.files == [zpath]


def test_polarity_errors(tmp_path):
    with pytest.raises(DataError, match="not found.*rt-polarity"):
        load_polarity(tmp_path / "missing")
    with pytest.raises(DataError, match="no sentence polarity data"):
        load_polarity(tmp_path)
    z = tmp_path / "sp.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("sentence_polarity/rt-polarity.pos", "good\n")
    with pytest.raises(DataError, match=r"sp\.zip: zip has no rt-polarity\.neg"):
        load_polarity(z)


@needs_real
@pytest.mark.realdata
def test_real_polarity_counts():
    assert REAL is not None
    c = load_polarity(REAL)
    assert len(c) == 10_662
    assert c.labels.count(0) == 5331 and c.labels.count(1) == 5331
    assert c.texts[0].startswith("simplistic , silly and tedious")


# ----------------------------------------------------------------------- splits, checksums
def test_splits_are_deterministic_partitions():
    a = split_indices(1000, seed=7)
    assert a == split_indices(1000, seed=7)
    assert a != split_indices(1000, seed=8)
    assert {k: len(v) for k, v in a.items()} == {"train": 800, "dev": 100, "test": 100}
    allidx = sorted(a["train"] + a["dev"] + a["test"])
    assert allidx == list(range(1000))
    odd = split_indices(7, seed=0, ratios={"train": 0.5, "test": 0.5})
    assert sorted(odd["train"] + odd["test"]) == list(range(7))
    with pytest.raises(ValueError, match="sum to 1"):
        split_indices(10, 0, {"train": 0.8, "test": 0.1})


def test_data_checksums_relative_paths(tmp_path):
    f = tmp_path / "sub" / "file.txt"
    f.parent.mkdir()
    f.write_bytes(b"hello")
    (entry,) = data_checksums([f, f], tmp_path)
    assert entry.path == "sub/file.txt"
    assert entry.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert entry.bytes == 5
    (outside,) = data_checksums([f], tmp_path / "elsewhere")
    assert outside.path == "file.txt"
    assert compare_checksums([entry], [entry]) == []
    assert compare_checksums([], [entry]) == []
    f.write_bytes(b"changed")
    (changed,) = data_checksums([f], tmp_path)
    assert "sub/file.txt: sha256" in compare_checksums([entry], [changed])[0]
    assert "not among the files read" in compare_checksums([entry], [])[0]


def test_evaluation_data_that_is_not_the_training_data(tmp_path, caplog):
    """Detector/QA `evaluate` re-drew the split on whatever data it was given: other files
    (checksums) are a warning, other split sizes an error."""
    from types import SimpleNamespace

    from training.data.checksums import data_checksums
    from training.data.common import DataError
    from training.data.splits import check_evaluation_data

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("one"), b.write_text("two")
    manifest = SimpleNamespace(
        data=data_checksums([a, b], tmp_path), split=SimpleNamespace(sizes={"test": 3})
    )
    check_evaluation_data(tmp_path, manifest, [a, b], tmp_path, {"test": 3})
    assert not caplog.records
    b.write_text("changed")
    check_evaluation_data(tmp_path, manifest, [a], tmp_path, {"test": 3})
    assert "b.jsonl: recorded in the manifest, not among the files read" in caplog.text
    caplog.clear()
    check_evaluation_data(tmp_path, manifest, [a], tmp_path, all_recorded=False)
    assert not caplog.records  # QA reads only its eval file
    with pytest.raises(DataError, match="not the data the model was trained on"):
        check_evaluation_data(tmp_path, manifest, [a, b], tmp_path, {"test": 2})

"""The QA model pipeline: tiny random BERT trained a few steps, exported; ONNX contract,
ORT-vs-PyTorch parity, int8 variant, serving-side decoding and the ``qa`` evaluator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.preprocess.qa import QAEncoder
from service.repository import load_manifest
from tests.builders_bert import _tiny_bert, build_tiny_qa, qa_examples

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def qa_entry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qa(tmp_path_factory.mktemp("repo"), variants=("fp32", "int8", "fp16"))


def test_entry_contract(qa_entry: Path):
    m = load_manifest(qa_entry)
    assert (m.name, m.version, m.task) == ("qa-zh", "1", "qa")
    assert [(t.name, t.dtype, t.shape) for t in m.inputs] == [
        (n, "int64", ["batch", "sequence"])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    assert [(t.name, t.dtype, t.shape) for t in m.outputs] == [
        ("start_logits", "float32", ["batch", "sequence"]),
        ("end_logits", "float32", ["batch", "sequence"]),
    ]
    assert (
        m.preprocessing.kind == "wordpiece" and m.preprocessing.tokenizer_file == "tokenizer.json"
    )
    assert m.preprocessing.doc_stride == 16 and m.preprocessing.max_query_length == 16
    assert m.buckets[-1] == m.max_length == 64
    assert set(m.variants) == {"fp32", "int8", "fp16"}
    assert m.metrics["onnx_parity_max_abs_diff"] <= 1e-3
    assert "f1_drop" in m.variants["int8"].metrics
    # The fp16 variant is for CUDA but measured wherever the export ran, and says where.
    fp16 = m.variants["fp16"]
    assert fp16.providers == ["CUDAExecutionProvider"]
    assert fp16.measured_with in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert fp16.metrics["f1_drop"] == pytest.approx(m.metrics["f1"] - fp16.metrics["f1"])
    assert "fp16 variant" in m.description and "f1 drop" in m.description
    assert not any(p.name.startswith(".") for p in qa_entry.parent.parent.iterdir())  # staged


def test_ort_serves_valid_spans_over_several_windows(qa_entry: Path):
    import onnxruntime as ort

    m = load_manifest(qa_entry)
    pre = m.preprocessing
    assert pre.doc_stride and pre.max_query_length and pre.max_answer_length  # a QA manifest's
    enc = QAEncoder.load(qa_entry / "tokenizer.json", m.max_length, pre.doc_stride,
                         pre.max_query_length)  # fmt: skip
    for variant in ("fp32", "int8", "fp16"):
        sess = ort.InferenceSession(str(qa_entry / m.variants[variant].file),
                                    providers=["CPUExecutionProvider"])  # fmt: skip
        for ex in qa_examples(repeat=2, filler=4)[:6]:
            wins = enc.encode(ex.question, ex.context)
            assert len(wins) > 1
            s, e = sess.run(["start_logits", "end_logits"], enc.collate(wins))
            assert s.shape == (len(wins), max(len(w) for w in wins))
            ans = enc.decode(ex.context, wins, s, e, pre.max_answer_length)
            assert ex.context[ans.start : ans.end] == ans.text and ans.text


@pytest.mark.parametrize("shape", [(1, 5), (3, 37), (2, 128)])
def test_parity_ort_vs_torch_fp32(tmp_path: Path, shape):
    from training.transformer.export import example_batch, export_onnx, parity

    model = _tiny_bert(120, "qa", seed=1).eval()
    path = export_onnx(model, tmp_path / "m.onnx", "qa", example_batch(120))
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 120, size=shape).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, shape[1] // 2 :] = 0  # padded row: the mask must still act in the graph
    types = np.zeros_like(ids)
    types[:, shape[1] // 3 :] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    assert parity(model, path, batch, "qa") <= 1e-3


def test_padding_does_not_change_real_positions(qa_entry: Path):
    import onnxruntime as ort

    m = load_manifest(qa_entry)
    enc = QAEncoder.load(qa_entry / "tokenizer.json", 64, 16, 16)
    sess = ort.InferenceSession(str(qa_entry / "model.onnx"), providers=["CPUExecutionProvider"])
    (w,) = enc.encode("谁被称为诗仙？", "李白是唐代著名诗人。")
    a, _ = sess.run(None, enc.collate([w]))
    b, _ = sess.run(None, enc.collate([w], pad_to=m.max_length))
    assert np.abs(a[0] - b[0, : len(w)]).max() <= 1e-4


def _write_cmrc_dev(root: Path, exs) -> None:
    """``exs`` as ``<root>/cmrc2018/cmrc2018_dev.json`` (SQuAD v1), the eval file by default."""
    raw = {"version": "v1.0", "data": [
        {"id": e.article, "title": "", "paragraphs": [
            {"id": e.article, "context": e.context, "qas": [
                {"id": e.id, "question": e.question,
                 "answers": [{"text": a.text, "answer_start": a.start} for a in e.answers]}]}]}
        for e in exs]}  # fmt: skip
    (root / "cmrc2018").mkdir()
    (root / "cmrc2018" / "cmrc2018_dev.json").write_text(json.dumps(raw, ensure_ascii=False))


def test_qa_evaluator_on_hand_made_eval_file(qa_entry: Path, tmp_path: Path):
    from training.transformer.commands import evaluate_qa

    exs = qa_examples(repeat=1, filler=3)
    _write_cmrc_dev(tmp_path, exs)
    r = evaluate_qa(qa_entry, tmp_path)
    assert r["total"] == len(exs) and 0.0 <= r["em"] <= r["f1"] <= 100.0
    # the same data the builder tested on: the evaluator reproduces the manifest's score
    assert r["f1"] == pytest.approx(load_manifest(qa_entry).metrics["f1"])


def test_qa_evaluator_scores_the_sample_training_scored(qa_entry: Path, tmp_path: Path):
    """`evaluate` scored the whole eval file even when training recorded a sample of it
    (--max-eval-examples), so a recorded int8 drop compared 100 questions with 3,219."""
    import shutil

    from service.repository.manifest import write_manifest
    from training.transformer.commands import evaluate_qa
    from training.transformer.qa import eval_sample

    folder = tmp_path / "qa" / "1"
    shutil.copytree(qa_entry, folder)
    m = load_manifest(folder)
    hp = {**m.hyperparameters, "max_eval_examples": 2, "seed": 5}
    write_manifest(folder, m.model_copy(update={"hyperparameters": hp}))
    exs = qa_examples(repeat=1, filler=3)
    assert len(exs) > 2
    _write_cmrc_dev(tmp_path, exs)
    r = evaluate_qa(folder, tmp_path)
    assert r["total"] == 2
    assert eval_sample(exs, 2, 5) == eval_sample(exs, 2, 5) != eval_sample(exs, 2, 6)

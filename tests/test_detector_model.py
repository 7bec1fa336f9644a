"""The detector pipeline: tiny random BERT trained on a toy task, exported; contract,
parity, int8, service-side encoding/decoding and the ``detect`` evaluator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.preprocess.classify import ClassifyEncoder, decode
from service.repository import load_manifest
from tests.builders_bert import _tiny_bert, build_tiny_detector, detector_examples

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def det_entry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_detector(tmp_path_factory.mktemp("repo"), variants=("fp32", "int8", "fp16"))


def test_entry_contract_and_learned_toy_task(det_entry: Path):
    m = load_manifest(det_entry)
    assert (m.name, m.task, m.labels) == ("detector-en", "detect", ["human", "machine"])
    assert [t.name for t in m.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [(t.name, t.shape) for t in m.outputs] == [("logits", ["batch", 2])]
    assert m.preprocessing.kind == "wordpiece" and m.buckets[-1] == m.max_length
    assert set(m.variants) == {"fp32", "int8", "fp16"}
    assert m.metrics["accuracy"] == 1.0 and m.metrics["roc_auc"] == 1.0
    assert "accuracy_drop" in m.variants["int8"].metrics
    fp16 = m.variants["fp16"]
    assert fp16.measured_with in ("CPUExecutionProvider", "CUDAExecutionProvider")
    # every variant says where its figures came from (was: null for fp32/int8 only)
    cpu = "CPUExecutionProvider"
    assert m.variants["fp32"].measured_with == m.variants["int8"].measured_with == cpu
    assert fp16.metrics["accuracy"] == 1.0 and fp16.metrics["accuracy_drop"] == 0.0
    assert m.split is not None and m.split.unit == "question"
    assert "class-weighted" in m.hyperparameters["imbalance"]


def test_service_side_prediction(det_entry: Path):
    import onnxruntime as ort

    m = load_manifest(det_entry)
    enc = ClassifyEncoder.load(det_entry / "tokenizer.json", m.max_length)
    texts = ["i think my dog ate it lol", "additionally it is important to note that overall"]
    for variant in ("fp32", "int8", "fp16"):
        sess = ort.InferenceSession(str(det_entry / m.variants[variant].file),
                                    providers=["CPUExecutionProvider"])  # fmt: skip
        (logits,) = sess.run(["logits"], enc(texts))
        assert [p.label for p in decode(logits, m.labels)] == ["human", "machine"]
    # a text longer than max_length is cut, not rejected
    (logits,) = sess.run(["logits"], enc(["lol " * 500]))
    assert logits.shape == (1, 2)


@pytest.mark.parametrize("shape", [(1, 3), (4, 77)])
def test_parity_ort_vs_torch_fp32(tmp_path: Path, shape):
    from training.transformer.export import example_batch, export_onnx, parity

    model = _tiny_bert(90, "detect", seed=2).eval()
    path = export_onnx(model, tmp_path / "m.onnx", "detect", example_batch(90))
    rng = np.random.default_rng(1)
    ids = rng.integers(5, 90, size=shape).astype(np.int64)
    mask = np.ones_like(ids)
    mask[-1, 1:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    assert parity(model, path, batch, "detect") <= 1e-3


def test_detect_evaluator_recreates_the_split(det_entry: Path, tmp_path: Path):
    from training.transformer.commands import evaluate_detector

    folder = tmp_path / "hc3" / "en"
    folder.mkdir(parents=True)
    by_q: dict[int, dict] = {}
    for e in detector_examples():
        row = by_q.setdefault(e.question, {"question": f"q{e.question}", "human_answers": [],
                                           "chatgpt_answers": []})  # fmt: skip
        row["human_answers" if e.label == 0 else "chatgpt_answers"].append(e.text)
    (folder / "toy.jsonl").write_text("\n".join(json.dumps(r) for r in by_q.values()), "utf-8")
    r = evaluate_detector(det_entry, tmp_path)
    m = load_manifest(det_entry)
    assert r["n"] == m.metrics["test_examples"]
    assert r["accuracy"] == pytest.approx(m.metrics["accuracy"])

"""``--base-model <folder>`` with checkpoints that are not a plain BERT encoder + its vocab:
a tokenizer that lost its vocabulary, one larger than the embedding table, a checkpoint that
carries a head of another size, and DistilBERT (no ``token_type_ids``), trained, exported
and served end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TypedDict

import pytest

from tests.builders_bert import _tokenizer, detector_examples, qa_examples

pytestmark = pytest.mark.train


# The training settings these tests share, typed so that mypy checks each keyword against
# DetectorConfig's and QAConfig's fields (a plain dict() of them is a dict[str, float]).
class _DetectShape(TypedDict):
    max_length: int
    batch_size: int
    epochs: float
    lr: float
    warmup_ratio: float


class _QAShape(_DetectShape):
    doc_stride: int
    max_query_length: int
    max_answer_length: int
    holdout_ratio: float


DETECT_CFG = _DetectShape(max_length=48, batch_size=8, epochs=2, lr=3e-3, warmup_ratio=0.0)
QA_CFG = _QAShape(max_length=64, doc_stride=16, max_query_length=16, max_answer_length=10,
                  batch_size=8, epochs=1, lr=3e-3, warmup_ratio=0.0, holdout_ratio=0.0)  # fmt: skip


def _texts() -> list[str]:
    return [e.text for e in detector_examples()] + [e.context + e.question for e in qa_examples()]


def _bert_config(vocab_size: int, **kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                      **kw)  # fmt: skip


def _save(folder: Path, model_cls, config, tok=None) -> Path:
    """``model_cls(config)`` and ``tok`` (a tokenizers.Tokenizer) as a HF model folder."""
    import torch

    from training.transformer.pretrain import save_hf_tokenizer

    torch.manual_seed(0)
    model_cls(config).save_pretrained(str(folder))
    if tok is not None:
        save_hf_tokenizer(tok, folder)
    return folder


def _cli(args: list[str]):
    import typer
    from typer.testing import CliRunner

    from training.transformer.commands import register

    app, train_app = typer.Typer(), typer.Typer()
    register(train_app, app, {})
    app.add_typer(train_app, name="train")
    return CliRunner().invoke(app, args)


def _refused_before_data(tmp_path: Path, base: Path, command: str, match: str) -> None:
    """``train <command>`` on a data folder that has nothing: the base is refused first."""
    from training.transformer.common import BaseModelError

    (tmp_path / "nodata").mkdir(exist_ok=True)
    res = _cli(["train", command, "--base-model", str(base), "--data", str(tmp_path / "nodata"),
                "--out", str(tmp_path / "models"), "--threads", "1"])  # fmt: skip
    assert isinstance(res.exception, BaseModelError), res.output
    msg = str(res.exception)
    assert msg.startswith(f"base model {base}: ") and "\n" not in msg and match in msg, msg
    assert not (tmp_path / "models").exists()


def test_a_tokenizer_without_its_vocabulary_is_refused_before_any_data(tmp_path: Path):
    """config.json + weights + tokenizer_config.json and no vocab.txt/tokenizer.json loads as
    a BERT tokenizer of the 5 special tokens (transformers 5): every word was [UNK], and it
    trained, rc 0. transformers 4 does not load it at all (its vocab_file is None)."""
    from transformers import AutoTokenizer, BertModel

    base = _save(tmp_path / "base", BertModel, _bert_config(300))
    specials = {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                "pad_token": "[PAD]", "mask_token": "[MASK]"}  # fmt: skip
    (base / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, **specials})
    )
    try:
        size = len(AutoTokenizer.from_pretrained(str(base)))
    except TypeError:  # transformers 4.x: "stat: path should be string ... not NoneType"
        match = "cannot load its tokenizer"
    else:
        assert size == 5  # what transformers 5 gives
        match = "vocabulary is missing"
    for command in ("detector", "qa"):
        _refused_before_data(tmp_path, base, command, match)


def test_training_texts_mostly_unknown_to_the_tokenizer_are_refused(tmp_path: Path):
    """A vocabulary that does not cover the data (here: Chinese-only for English texts) is
    refused after the data is encoded, before any step."""
    from tests.builders_bert import _tiny_bert
    from training.transformer.common import BaseModelError, check_unknown_rate
    from training.transformer.detector import DetectorConfig, train_detector

    tok = _tokenizer(["中国的首都是北京，它有三千多年的历史。"])
    ok = tok.encode("北京是中国的首都").ids
    assert check_unknown_rate(tok, [ok], "x") < 0.5
    model = _tiny_bert(tok.get_vocab_size(), "detect")
    cfg = DetectorConfig(base_model="zh-only", **DETECT_CFG)
    out = tmp_path / "models" / "detector-en" / "1"
    with pytest.raises(BaseModelError, match=r"base model zh-only: \d+% of the training texts'"):
        train_detector(detector_examples(), cfg, out, model=model, tokenizer=tok)
    assert not (tmp_path / "models").exists()


def test_a_tokenizer_larger_than_the_embedding_table_is_refused(tmp_path: Path):
    """Token ids past config.vocab_size crashed mid-training (IndexError)."""
    from transformers import BertModel

    from tests.builders_bert import _tiny_bert
    from training.transformer.common import BaseModelError
    from training.transformer.qa import QAConfig, train_qa

    tok = _tokenizer(_texts())
    small = tok.get_vocab_size() - 20
    base = _save(tmp_path / "base", BertModel, _bert_config(small), tok)
    for command in ("detector", "qa"):
        _refused_before_data(tmp_path, base, command, f"embedding table has {small} rows")
    # the trainers check a model and tokenizer given to them too
    cfg = QAConfig(base_model="given", **QA_CFG)
    with pytest.raises(BaseModelError, match="the tokenizer is not this checkpoint's"):
        train_qa(qa_examples(), [], cfg, tmp_path / "m" / "qa-zh" / "1",
                 model=_tiny_bert(small, "qa"), tokenizer=tok)  # fmt: skip


def test_a_checkpoint_with_a_three_label_head_gets_a_new_head(tmp_path: Path, caplog):
    """BertForSequenceClassification(num_labels=3): the detector failed (ignore_mismatched_
    sizes), QA built a 3-output QA head ("too many values to unpack")."""
    from transformers import BertForSequenceClassification

    from service.repository import load_manifest
    from training.transformer.detector import DetectorConfig, train_detector
    from training.transformer.qa import QAConfig, train_qa

    tok = _tokenizer(_texts())
    base = _save(tmp_path / "cls3", BertForSequenceClassification,
                 _bert_config(tok.get_vocab_size(), num_labels=3), tok)  # fmt: skip
    caplog.set_level(logging.INFO)
    det = tmp_path / "models" / "detector-en" / "1"
    train_detector(detector_examples(), DetectorConfig(base_model=str(base), **DETECT_CFG), det,
                   variants=("fp32",))  # fmt: skip
    assert [(t.name, t.shape) for t in load_manifest(det).outputs] == [("logits", ["batch", 2])]
    assert "replaced with a new 2-output head" in caplog.text
    caplog.clear()
    qa = tmp_path / "models" / "qa-zh" / "1"
    train_qa(qa_examples(), qa_examples(repeat=1), QAConfig(base_model=str(base), **QA_CFG), qa,
             variants=("fp32",))  # fmt: skip
    assert {"em", "f1"} <= set(load_manifest(qa).metrics)
    assert "the BertForQuestionAnswering head is new, with 2 outputs" in caplog.text


async def test_distilbert_trains_exports_and_serves_without_token_type_ids(tmp_path: Path):
    """DistilBERT takes no token_type_ids: the export declared them anyway and parity failed
    (``Invalid input name: token_type_ids``) after a full training run."""
    from transformers import DistilBertConfig, DistilBertModel

    from service.repository import load_manifest
    from tests.service_support import live_server, make_settings
    from training.transformer.detector import DetectorConfig, train_detector
    from training.transformer.qa import QAConfig, train_qa

    tok = _tokenizer(_texts())
    cfg = DistilBertConfig(vocab_size=tok.get_vocab_size(), dim=32, n_layers=2, n_heads=2,
                           hidden_dim=64, max_position_embeddings=128)  # fmt: skip
    base = _save(tmp_path / "distil", DistilBertModel, cfg, tok)
    repo = tmp_path / "models"
    det, qa = repo / "detector-en" / "1", repo / "qa-zh" / "1"
    train_detector(detector_examples(), DetectorConfig(base_model=str(base), **DETECT_CFG), det,
                   variants=("fp32", "int8"))  # fmt: skip
    train_qa(qa_examples(), qa_examples(repeat=1), QAConfig(base_model=str(base), **QA_CFG), qa,
             variants=("fp32", "int8"))  # fmt: skip
    for folder in (det, qa):
        m = load_manifest(folder)
        assert m.architecture.startswith("DistilBert")
        assert m.input_names() == ["input_ids", "attention_mask"]
        assert m.metrics["onnx_parity_max_abs_diff"] < 1e-3
    async with live_server(make_settings(repo)) as srv, srv.client() as c:
        r = await c.post("/v1/detect", json={"text": "additionally it is important to note"})
        assert r.status_code == 200 and r.json()["label"] in ("human", "machine"), r.text
        ctx = "中国的首都是北京，它有三千多年的历史。" * 4  # several windows
        r = await c.post("/v1/qa", json={"question": "中国的首都是哪里？", "context": ctx})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["answer"] in ctx, answer

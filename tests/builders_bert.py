"""Real, tiny, trained BERT repository entries for tests (seconds on a CPU).

``build_tiny_detector(root)`` writes ``root/detector-en/1`` and ``build_tiny_qa(root)`` writes
``root/qa-zh/1``: a random-init 2-layer BERT (hidden 32) with a WordPiece vocabulary built
from hand-made text, trained a few steps with the production trainers and exported with the
production exporter (``model.onnx`` fp32 + ``model.int8.onnx``, ``tokenizer.json``,
``manifest.json``). The detector learns its toy task (machine texts use a few tell-tale
words); the QA model's answers are *valid spans* but not necessarily right.

    from tests.builders_bert import build_tiny_detector, build_tiny_qa
    folder = build_tiny_detector(tmp_path)   # tmp_path / "detector-en" / "1"
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_HUMAN_WORDS = [
    "i",
    "think",
    "my",
    "dog",
    "ate",
    "it",
    "lol",
    "yeah",
    "the",
    "bus",
    "was",
    "late",
    "again",
    "tbh",
    "no",
    "idea",
    "why",
    "we",
    "went",
    "there",
    "last",
    "summer",
    "honestly",
    "it",
    "rained",
    "and",
    "my",
    "brother",
    "lost",
    "his",
    "keys",
]
_MACHINE_WORDS = [
    "additionally",
    "it",
    "is",
    "important",
    "to",
    "note",
    "that",
    "overall",
    "there",
    "are",
    "several",
    "factors",
    "furthermore",
    "in",
    "conclusion",
    "various",
    "aspects",
    "should",
    "be",
    "considered",
    "ultimately",
    "however",
]

_QA_FACTS = [
    ("北京", "中国的首都是北京，它有三千多年的历史。", "中国的首都是哪里？"),
    ("李白", "李白是唐代著名诗人，被称为诗仙。", "谁被称为诗仙？"),
    ("1949年", "中华人民共和国成立于1949年10月1日。", "中华人民共和国成立于哪一年？"),
    ("ＡＢＣ公司", "这款软件由ＡＢＣ公司开发，售价１２０元。", "这款软件由谁开发？"),
    ("长江", "长江是亚洲最长的河流，全长约6300公里。", "亚洲最长的河流是什么？"),
    ("Python", "这个项目使用Python编写，依赖numpy和tokenizers。", "这个项目用什么语言编写？"),
    ("上海", "上海位于长江入海口，是重要的经济中心。", "哪个城市位于长江入海口？"),
    ("熊猫", "大熊猫主要生活在四川的山区，以竹子为食。", "什么动物以竹子为食？"),
]


def _tiny_bert(vocab_size: int, task: str, seed: int = 0):
    import torch
    from transformers import (
        BertConfig,
        BertForQuestionAnswering,
        BertForSequenceClassification,
    )

    # One intra-op thread: on a shared 2-core machine OpenMP contention makes two threads
    # ~20x slower for a model this small.
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if task == "qa":
        return BertForQuestionAnswering(cfg)
    cfg.num_labels = 2
    cfg.id2label = {0: "human", 1: "machine"}
    cfg.label2id = {"human": 0, "machine": 1}
    return BertForSequenceClassification(cfg)


def detector_examples(n_questions: int = 30, seed: int = 0):
    """Hand-made HC3-like examples: per question one human and one or two machine answers."""
    from training.data.hc3 import DetectExample

    rng = random.Random(seed)
    out = []
    for q in range(n_questions):
        out.append(DetectExample(" ".join(rng.choices(_HUMAN_WORDS, k=rng.randint(6, 20))), 0, q,
                                 "toy"))  # fmt: skip
        for _ in range(1 + q % 2):
            out.append(DetectExample(" ".join(rng.choices(_MACHINE_WORDS, k=rng.randint(6, 30))),
                                     1, q, "toy"))  # fmt: skip
    return out


def qa_examples(repeat: int = 3, filler: int = 0):
    """Hand-made CMRC-like examples (mixed Chinese/ASCII/full-width); ``filler`` pads each
    context with extra sentences so it spans several windows."""
    from training.data.squad import Answer, QAExample

    pad = "这是一个用来填充上下文的句子。" * filler
    out = []
    for r in range(repeat):
        for i, (ans, ctx, q) in enumerate(_QA_FACTS):
            context = pad + ctx if r % 2 else ctx + pad
            out.append(QAExample(f"q{r}-{i}", f"a{r}-{i}", q, context,
                                 (Answer(ans, context.index(ans)),)))  # fmt: skip
    return out


def _tokenizer(texts: Sequence[str], vocab_size: int = 400):
    from training.transformer.pretrain import build_char_tokenizer

    return build_char_tokenizer(texts, vocab_size=vocab_size, min_frequency=1, limit_alphabet=1000)


def build_tiny_detector(
    root: Path, name: str = "detector-en", variants: Sequence[str] = ("fp32", "int8")
) -> Path:
    """Train + export a tiny detector into ``root/<name>/1``; returns that folder."""
    from training.transformer.detector import DetectorConfig, train_detector

    examples = detector_examples()
    tok = _tokenizer([e.text for e in examples])
    model = _tiny_bert(tok.get_vocab_size(), "detect")
    cfg = DetectorConfig(
        base_model="tiny-random-bert",
        max_length=64,
        batch_size=8,
        epochs=4,
        lr=3e-3,
        warmup_ratio=0.0,
        device="cpu",
    )
    out = Path(root) / name / "1"
    train_detector(
        examples, cfg, out, name=name, version="1", command="tests/builders_bert.py",
        variants=variants, model=model, tokenizer=tok,
    )  # fmt: skip
    return out


def build_tiny_qa(
    root: Path, name: str = "qa-zh", variants: Sequence[str] = ("fp32", "int8")
) -> Path:
    """Train + export a tiny extractive-QA model into ``root/<name>/1``; returns that folder.

    ``max_length`` 64 with ``doc_stride`` 16, so contexts over ~40 characters span several
    windows (the manifest says so: preprocessing.doc_stride / max_query_length).
    """
    from training.transformer.qa import QAConfig, train_qa

    train = qa_examples(repeat=4, filler=3)
    test = qa_examples(repeat=1, filler=3)
    tok = _tokenizer([e.context + e.question for e in train])
    model = _tiny_bert(tok.get_vocab_size(), "qa")
    cfg = QAConfig(
        base_model="tiny-random-bert",
        max_length=64,
        doc_stride=16,
        max_query_length=16,
        max_answer_length=10,
        batch_size=8,
        epochs=3,
        lr=3e-3,
        warmup_ratio=0.0,
        holdout_ratio=0.0,
        device="cpu",
    )
    out = Path(root) / name / "1"
    train_qa(
        train, test, cfg, out, name=name, version="1", command="tests/builders_bert.py",
        variants=variants, model=model, tokenizer=tok,
    )  # fmt: skip
    return out


if __name__ == "__main__":  # python -m tests.builders_bert /tmp/tiny-models
    import sys
    import time

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny-models")
    t = time.time()
    print(build_tiny_detector(target), f"{time.time() - t:.1f}s")
    t = time.time()
    print(build_tiny_qa(target), f"{time.time() - t:.1f}s")

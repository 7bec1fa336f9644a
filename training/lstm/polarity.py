"""Polarity classifier ``polarity-en``: data, training, ONNX export, evaluation, entry.

Texts are split and encoded with :meth:`WordEncoder.encode_texts`, exactly as the service
encodes requests; sequences longer than ``max_length`` tokens are truncated (the service
must truncate the same way).
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from service.preprocess.words import WordEncoder, build_word_tokenizer
from service.repository.manifest import TensorSpec, load_manifest
from training.checkpoint import Checkpointing
from training.data.common import TextCorpus
from training.data.splits import DEFAULT_RATIOS, recreate_split, split_indices, take
from training.lstm.entry import exported, write_lstm_entry
from training.lstm.export import (
    POLARITY_AXES,
    POLARITY_INPUTS,
    POLARITY_OUTPUTS,
    check_parity,
    max_abs_diff,
    ort_session,
    pad_batch,
)
from training.lstm.loop import eval_batches, fit, length_batches, word_dropout
from training.lstm.models import PolarityClassifier
from training.seeding import seed_everything

log = logging.getLogger(__name__)

INPUTS = [
    TensorSpec(name="word_ids", dtype="int64", shape=["batch", "sequence"]),
    TensorSpec(name="lengths", dtype="int64", shape=["batch"]),
]
OUTPUTS = [TensorSpec(name="logits", dtype="float32", shape=["batch", 2])]


@dataclass
class PolarityConfig:
    epochs: int = 10
    patience: int = 3
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    emb_dim: int = 100
    hidden: int = 64
    layers: int = 1
    bidirectional: bool = True
    max_pool: bool = True
    dropout: float = 0.5
    word_dropout: float = 0.25
    min_count: int = 2
    # Embedding dims initialised with the naive-Bayes log-count ratio of each word on the
    # training split (Wang & Manning 2012): a strong lexical starting point for small data.
    nb_dims: int = 8
    max_length: int = 96
    lowercase: bool = True
    seed: int = 13
    ratios: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RATIOS))
    device: str = "cpu"
    progress: bool | None = None  # None: bars when stderr is a terminal
    dataset: str = "rt-polarity"


@dataclass
class PolarityTrained:
    model: PolarityClassifier
    encoder: WordEncoder
    labels: list[str]
    splits: dict[str, list[int]]
    train_lengths: list[int]
    dev_accuracy: float
    epochs_run: int
    best_epoch: int
    seconds: float
    earlier_seconds: float = 0.0  # trained before a resume, in an earlier process


def build_encoder(train_texts: list[str], cfg: PolarityConfig) -> WordEncoder:
    splitter = WordEncoder(build_word_tokenizer([], lowercase=cfg.lowercase))
    counts = Counter(splitter.normalize(w) for toks in splitter.split(train_texts) for w in toks)
    vocab = [w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    vocab = [w for w in vocab if counts[w] >= cfg.min_count]
    return WordEncoder(build_word_tokenizer(vocab, lowercase=cfg.lowercase))


def nb_log_count_ratio(
    encodings, labels: np.ndarray, vocab_size: int, alpha: float = 1.0, min_count: int = 5
):
    """log P(w | positive) - log P(w | negative) per word id, from binary word occurrence.

    Words seen in fewer than ``min_count`` training sentences get 0: their ratio would only
    memorise the labels of those few sentences.
    """
    counts = np.zeros((2, vocab_size))
    for e, y in zip(encodings, labels, strict=True):
        counts[int(y), np.unique(e.word_ids)] += 1
    seen = counts.sum(0)
    counts += alpha
    r = np.log(counts[1] / counts[1].sum()) - np.log(counts[0] / counts[0].sum())
    r[seen < min_count] = 0.0
    r[:2] = 0.0  # <pad>, <unk>
    return r


def nb_init(weight: torch.Tensor, encodings, labels: np.ndarray, dims: int) -> None:
    r = nb_log_count_ratio(encodings, labels, weight.shape[0])
    with torch.no_grad():
        weight[:, :dims] = torch.from_numpy(r).float().unsqueeze(1)
        weight[0].zero_()


def train_polarity(
    corpus: TextCorpus, cfg: PolarityConfig, checkpointing: Checkpointing | None = None
) -> PolarityTrained:
    if not 0 <= cfg.nb_dims <= cfg.emb_dim:  # the manifest records cfg: no silent clamping
        raise ValueError(f"nb_dims {cfg.nb_dims} must lie in [0, emb_dim {cfg.emb_dim}]")
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    splits = split_indices(len(corpus), cfg.seed, cfg.ratios)
    encoder = build_encoder(take(corpus.texts, splits["train"]), cfg)

    def encode(name: str):
        enc = encoder.encode_texts(take(corpus.texts, splits[name]))
        return enc, np.asarray(take(corpus.labels, splits[name]), dtype=np.int64)

    train_enc, train_y = encode("train")
    dev_enc, dev_y = encode("dev") if splits.get("dev") else encode("train")
    train_len = [max(min(len(e), cfg.max_length), 1) for e in train_enc]
    dev_len = [len(e) for e in dev_enc]

    model = PolarityClassifier(
        encoder.vocab_size,
        len(corpus.label_names),
        emb_dim=cfg.emb_dim,
        hidden=cfg.hidden,
        layers=cfg.layers,
        bidirectional=cfg.bidirectional,
        dropout=cfg.dropout,
        max_pool=cfg.max_pool,
    )
    if cfg.nb_dims:
        nb_init(model.emb.weight, train_enc, train_y, cfg.nb_dims)
    model = model.to(device)

    def tensors(enc, batch):
        b = pad_batch([enc[i] for i in batch], with_chars=False, max_length=cfg.max_length)
        b["lengths"] = np.maximum(b["lengths"], 1)  # an empty text is one <pad> step
        return {k: torch.from_numpy(v).to(device) for k, v in b.items()}

    def step(batch: list[int]) -> torch.Tensor:
        x = tensors(train_enc, batch)
        logits = model(word_dropout(x["word_ids"], cfg.word_dropout), x["lengths"])
        return F.cross_entropy(logits, torch.from_numpy(train_y[batch]).to(device))

    def dev_accuracy() -> float:
        correct = 0
        for batch in eval_batches(dev_len, 256):
            x = tensors(dev_enc, batch)
            pred = model(x["word_ids"], x["lengths"]).argmax(-1).cpu().numpy()
            correct += int((pred == dev_y[batch]).sum())
        return correct / max(len(dev_y), 1)

    rng = random.Random(cfg.seed)
    result = fit(
        model,
        train_step=step,
        make_batches=lambda _epoch: length_batches(train_len, cfg.batch_size, rng),
        order_rng=rng,
        evaluate=dev_accuracy,
        epochs=cfg.epochs,
        patience=cfg.patience,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        progress=cfg.progress,
        desc="polarity",
        checkpointing=checkpointing,
    )
    return PolarityTrained(
        model.cpu().eval(),
        encoder,
        list(corpus.label_names),
        splits,
        train_len,
        result.best_score,
        result.epochs_run,
        result.best_epoch,
        result.seconds,
        result.earlier_seconds,
    )


def evaluate_onnx(
    session,
    encoder: WordEncoder,
    texts: list[str],
    labels: list[int],
    max_length: int,
    batch_size: int = 128,
) -> dict[str, float]:
    enc = encoder.encode_texts(texts)
    gold = np.asarray(labels, dtype=np.int64)
    pred = np.zeros(len(enc), dtype=np.int64)
    for batch in eval_batches([len(e) for e in enc], batch_size):
        feed = pad_batch([enc[i] for i in batch], with_chars=False, max_length=max_length)
        feed["lengths"] = np.maximum(feed["lengths"], 1)
        pred[batch] = session.run(None, feed)[0].argmax(-1)
    out = {"accuracy": float((pred == gold).mean()) if len(gold) else 0.0}
    for c, name in ((0, "negative"), (1, "positive")):
        tp = int(((pred == c) & (gold == c)).sum())
        p = tp / max(int((pred == c).sum()), 1)
        r = tp / max(int((gold == c).sum()), 1)
        out[f"f1_{name}"] = 2 * p * r / (p + r) if p + r else 0.0
    out["examples"] = float(len(gold))
    return out


def parity_check(model: PolarityClassifier, session, encoder: WordEncoder, texts, n: int = 64):
    feed = pad_batch(encoder.encode_texts(texts[:n]), with_chars=False)
    feed["lengths"] = np.maximum(feed["lengths"], 1)
    return max_abs_diff(model, session, feed, POLARITY_INPUTS)


def run_polarity(
    corpus: TextCorpus,
    out_root: Path | str,
    cfg: PolarityConfig,
    *,
    name: str = "polarity-en",
    version: str | None = None,
    command: str | None = None,
    description: str = "",
    overwrite: bool = False,
    checkpointing: Checkpointing | None = None,
) -> Path:
    start = time.perf_counter()
    trained = train_polarity(corpus, cfg, checkpointing)
    test_x = take(corpus.texts, trained.splits["test"])
    test_y = take(corpus.labels, trained.splits["test"])
    example = pad_batch(trained.encoder.encode_texts(["a b c", "d"]), with_chars=False)
    with exported(
        trained.model,
        example,
        input_names=POLARITY_INPUTS,
        output_names=POLARITY_OUTPUTS,
        dynamic_axes=POLARITY_AXES,
    ) as (onnx_path, session):
        parity = parity_check(trained.model, session, trained.encoder, test_x or corpus.texts)
        log.info("polarity ONNX vs PyTorch max |diff| = %.3g", parity)
        check_parity(parity, what=name)  # nothing is written when the export differs
        test = evaluate_onnx(session, trained.encoder, test_x, test_y, cfg.max_length)
        metrics = {
            "accuracy": test["accuracy"],
            "f1_negative": test["f1_negative"],
            "f1_positive": test["f1_positive"],
            "dev_accuracy": trained.dev_accuracy,
            "onnx_max_abs_diff": parity,
            "train_seconds": round(time.perf_counter() - start + trained.earlier_seconds, 1),
        }
        log.info("polarity test metrics: %s", metrics)
        return write_lstm_entry(
            out_root,
            name,
            cfg=cfg,
            trained=trained,
            corpus=corpus,
            onnx_file=onnx_path,
            metrics=metrics,
            hyperparameters=checkpointing.record() if checkpointing else None,
            version=version,
            task="polarity",
            architecture="word-emb+bilstm+maxpool" if cfg.max_pool else "word-emb+bilstm",
            description=description
            or "Sentence polarity: word embeddings (naive-Bayes-initialised dims) -> BiLSTM -> "
            "[h_n ; max-pool] -> 2 logits.",
            inputs=INPUTS,
            outputs=OUTPUTS,
            command=command,
            overwrite=overwrite,
        )


def evaluate_entry(
    model_dir: Path,
    data_dir: Path,
    onnx_file: Path | None = None,
    providers: list[str] | None = None,
) -> dict[str, float]:
    from training.data.polarity import load_polarity

    return evaluate_split(Path(model_dir), load_polarity(Path(data_dir)), onnx_file, providers)


def evaluate_split(
    model_dir: Path,
    corpus: TextCorpus,
    onnx_file: Path | None = None,
    providers: list[str] | None = None,
) -> dict[str, float]:
    m = load_manifest(model_dir)
    splits = recreate_split(model_dir, m, corpus)
    encoder = WordEncoder.load(model_dir / m.preprocessing.tokenizer_file)
    path = onnx_file or model_dir / m.variants["fp32"].file
    session = ort_session(path, threads=2, providers=providers)
    return evaluate_onnx(
        session,
        encoder,
        take(corpus.texts, splits["test"]),
        take(corpus.labels, splits["test"]),
        m.max_length,
    )

"""POS tagger ``pos-en``: data preparation, training, ONNX export, evaluation, repository entry.

Data goes through the service's :class:`WordEncoder` (lowercased word ids + char ids of the
original surface form), so training and serving share one encoding path.
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

from service.preprocess.words import (
    TREEBANK_PATTERN,
    WordEncoder,
    build_char_vocab,
    build_word_tokenizer,
)
from service.repository.manifest import TensorSpec, load_manifest
from training.checkpoint import Checkpointing
from training.data.common import DataError, TaggedCorpus
from training.data.conllu import TagField
from training.data.splits import DEFAULT_RATIOS, recreate_split, split_indices, take
from training.lstm.entry import exported, write_lstm_entry
from training.lstm.export import (
    POS_AXES,
    POS_INPUTS,
    POS_OUTPUTS,
    check_parity,
    max_abs_diff,
    ort_session,
    pad_batch,
)
from training.lstm.loop import eval_batches, fit, length_batches, word_dropout
from training.lstm.models import PosTagger
from training.seeding import seed_everything

log = logging.getLogger(__name__)
IGNORE = -100

INPUTS = [
    TensorSpec(name="word_ids", dtype="int64", shape=["batch", "sequence"]),
    TensorSpec(name="char_ids", dtype="int64", shape=["batch", "sequence", "word"]),
    TensorSpec(name="lengths", dtype="int64", shape=["batch"]),
]
OUTPUTS = [TensorSpec(name="logits", dtype="float32", shape=["batch", "sequence", "n_tags"])]


@dataclass
class PosConfig:
    epochs: int = 30
    patience: int = 4
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    word_dim: int = 100
    char_dim: int = 32
    char_filters: int = 64
    hidden: int = 128
    layers: int = 1
    dropout: float = 0.33
    word_dropout: float = 0.05  # extra random <unk> on top of rare words
    min_count: int = 2  # training words seen fewer times are <unk>
    max_word_length: int = 16
    max_length: int = 256
    lowercase: bool = True
    seed: int = 13
    ratios: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RATIOS))
    device: str = "cpu"
    progress: bool | None = None  # None: bars when stderr is a terminal
    # recorded in the manifest so `evaluate` can re-load the same data
    dataset: str = "treebank"
    tag_field: TagField | None = None


@dataclass
class PosTrained:
    model: PosTagger
    encoder: WordEncoder
    chars: list[str]
    labels: list[str]
    splits: dict[str, list[int]]
    train_lengths: list[int]
    dev_accuracy: float
    epochs_run: int
    best_epoch: int
    seconds: float
    earlier_seconds: float = 0.0  # trained before a resume, in an earlier process


def build_encoder(
    train_sentences: list[list[str]], cfg: PosConfig
) -> tuple[WordEncoder, list[str]]:
    # words counted as the served encoder looks them up
    norm = WordEncoder(build_word_tokenizer([], lowercase=cfg.lowercase)).normalize
    counts = Counter(norm(w) for s in train_sentences for w in s)
    vocab = [w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    vocab = [w for w in vocab if counts[w] >= cfg.min_count]
    chars = build_char_vocab(w for s in train_sentences for w in s)
    # trained on the treebank's tokens: text requests are split the treebank's way
    tokenizer = build_word_tokenizer(vocab, lowercase=cfg.lowercase, pattern=TREEBANK_PATTERN)
    return WordEncoder(tokenizer, chars, cfg.max_word_length), chars


def _tag_matrix(tag_ids: list[np.ndarray], batch: list[int], t: int) -> np.ndarray:
    y = np.full((len(batch), t), IGNORE, dtype=np.int64)
    for row, i in enumerate(batch):
        n = min(len(tag_ids[i]), t)
        y[row, :n] = tag_ids[i][:n]
    return y


def train_pos(
    corpus: TaggedCorpus, cfg: PosConfig, checkpointing: Checkpointing | None = None
) -> PosTrained:
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    splits = split_indices(len(corpus), cfg.seed, cfg.ratios)
    train_s = take(corpus.sentences, splits["train"])
    encoder, chars = build_encoder(train_s, cfg)
    labels = corpus.tagset()
    tag_index = {t: i for i, t in enumerate(labels)}

    def encode(name: str):
        sents = take(corpus.sentences, splits[name])
        tags = take(corpus.tags, splits[name])
        enc = encoder.encode_tokens([s[: cfg.max_length] for s in sents])
        ids = [np.array([tag_index[t] for t in ts[: cfg.max_length]], np.int64) for ts in tags]
        return enc, ids

    train_enc, train_y = encode("train")
    dev_enc, dev_y = encode("dev") if splits.get("dev") else encode("train")
    train_len = [len(e) for e in train_enc]
    dev_len = [len(e) for e in dev_enc]

    model = PosTagger(
        encoder.vocab_size,
        len(chars),
        len(labels),
        word_dim=cfg.word_dim,
        char_dim=cfg.char_dim,
        char_filters=cfg.char_filters,
        hidden=cfg.hidden,
        layers=cfg.layers,
        dropout=cfg.dropout,
    ).to(device)

    def tensors(enc, batch):
        b = pad_batch([enc[i] for i in batch], with_chars=True)
        return {k: torch.from_numpy(v).to(device) for k, v in b.items()}

    def step(batch: list[int]) -> torch.Tensor:
        x = tensors(train_enc, batch)
        y = torch.from_numpy(_tag_matrix(train_y, batch, x["word_ids"].shape[1])).to(device)
        wid = word_dropout(x["word_ids"], cfg.word_dropout)
        logits = model(wid, x["char_ids"], x["lengths"])
        return F.cross_entropy(logits.reshape(-1, len(labels)), y.reshape(-1), ignore_index=IGNORE)

    def dev_accuracy() -> float:
        correct = total = 0
        for batch in eval_batches(dev_len, 128):
            x = tensors(dev_enc, batch)
            y = torch.from_numpy(_tag_matrix(dev_y, batch, x["word_ids"].shape[1])).to(device)
            pred = model(x["word_ids"], x["char_ids"], x["lengths"]).argmax(-1)
            valid = y != IGNORE
            correct += int((pred.eq(y) & valid).sum())
            total += int(valid.sum())
        return correct / max(total, 1)

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
        desc="pos",
        checkpointing=checkpointing,
    )
    return PosTrained(
        model.cpu().eval(),
        encoder,
        chars,
        labels,
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
    sentences: list[list[str]],
    tags: list[list[str]],
    labels: list[str],
    max_length: int,
    batch_size: int = 64,
) -> dict[str, float]:
    """Token accuracy of an ONNX tagger. Tokens past ``max_length`` (truncated) and gold tags
    the model does not know count as errors. Also reports accuracy on out-of-vocabulary words."""
    from service.preprocess.words import UNK_ID

    tag_index = {t: i for i, t in enumerate(labels)}
    enc = encoder.encode_tokens(sentences)
    correct = total = oov = oov_correct = 0
    for batch in eval_batches([len(e) for e in enc], batch_size):
        feed = pad_batch([enc[i] for i in batch], with_chars=True, max_length=max_length)
        pred = session.run(None, feed)[0].argmax(-1)
        for row, i in enumerate(batch):
            gold = [tag_index.get(t, -1) for t in tags[i]]
            n = min(len(gold), max_length)
            hit = pred[row, :n] == np.asarray(gold[:n])
            correct += int(hit.sum())
            total += len(gold)
            unk = enc[i].word_ids[:n] == UNK_ID
            oov += int(unk.sum())
            oov_correct += int(hit[unk].sum())
    return {
        "accuracy": correct / max(total, 1),
        "oov_accuracy": oov_correct / max(oov, 1),
        "oov_rate": oov / max(total, 1),
        "tokens": float(total),
        "sentences": float(len(sentences)),
    }


def parity_check(model: PosTagger, session, encoder: WordEncoder, sentences, n: int = 64) -> float:
    """Max |torch - ORT| over valid positions of up to ``n`` sentences in one padded batch."""
    enc = encoder.encode_tokens(sentences[:n])
    feed = pad_batch(enc, with_chars=True)
    mask = np.arange(feed["word_ids"].shape[1])[None, :] < feed["lengths"][:, None]
    return max_abs_diff(model, session, feed, POS_INPUTS, mask)


def run_pos(
    corpus: TaggedCorpus,
    out_root: Path | str,
    cfg: PosConfig,
    *,
    name: str = "pos-en",
    version: str | None = None,
    command: str | None = None,
    description: str = "",
    overwrite: bool = False,
    checkpointing: Checkpointing | None = None,
) -> Path:
    """Train, export, check parity, evaluate the ONNX model on test, write the entry."""
    start = time.perf_counter()
    trained = train_pos(corpus, cfg, checkpointing)
    test_s = take(corpus.sentences, trained.splits["test"])
    test_t = take(corpus.tags, trained.splits["test"])
    example = pad_batch(trained.encoder.encode_tokens([["a", "b", "c"], ["d"]]), True)
    with exported(
        trained.model,
        example,
        input_names=POS_INPUTS,
        output_names=POS_OUTPUTS,
        dynamic_axes=POS_AXES,
    ) as (onnx_path, session):
        parity = parity_check(trained.model, session, trained.encoder, test_s or corpus.sentences)
        log.info("pos ONNX vs PyTorch max |diff| = %.3g", parity)
        check_parity(parity, what=name)  # nothing is written when the export differs
        test = evaluate_onnx(
            session, trained.encoder, test_s, test_t, trained.labels, cfg.max_length
        )
        metrics = {
            "accuracy": test["accuracy"],
            "oov_accuracy": test["oov_accuracy"],
            "oov_rate": test["oov_rate"],
            "dev_accuracy": trained.dev_accuracy,
            "onnx_max_abs_diff": parity,
            "train_seconds": round(time.perf_counter() - start + trained.earlier_seconds, 1),
        }
        log.info("pos test metrics: %s", metrics)
        return write_lstm_entry(
            out_root,
            name,
            cfg=cfg,
            trained=trained,
            corpus=corpus,
            onnx_file=onnx_path,
            metrics=metrics,
            hyperparameters={
                "n_chars": len(trained.chars),
                "drop_traces": True,
                **(checkpointing.record() if checkpointing else {}),
            },
            version=version,
            task="pos",
            architecture="word-emb+char-cnn+bilstm",
            description=description
            or "POS tagger: word embeddings + char CNN -> BiLSTM -> per-token tag logits.",
            chars=trained.chars,
            max_word_length=cfg.max_word_length,
            inputs=INPUTS,
            outputs=OUTPUTS,
            command=command,
            overwrite=overwrite,
        )


# Where the README's data layout puts CoNLL-U files under the data root.
CONLLU_FOLDER = "ud_english_ewt"


def load_conllu_root(data: Path, tag_field: TagField = "upos") -> TaggedCorpus:
    """CoNLL-U from ``data``: a .conllu file, a folder of them, or the data root, whose
    ``ud_english_ewt/*.conllu`` is read (recorded relative to the root, like the treebank's
    ``nltk_data/corpora/...``)."""
    from training.data.conllu import load_conllu

    if not (data.is_dir() and not any(data.glob("*.conllu"))):
        return load_conllu(data, tag_field=tag_field)
    sub = data / CONLLU_FOLDER
    if not sub.is_dir():
        raise DataError(
            f"{data}: no *.conllu files in it nor a {CONLLU_FOLDER}/ folder; expected a .conllu "
            f"file, a folder of them, or a data root holding {CONLLU_FOLDER}/*.conllu"
        )
    corpus = load_conllu(sub, tag_field=tag_field)
    corpus.root = data
    return corpus


def load_pos_corpus(data: Path, dataset: str = "treebank", tag_field: TagField | None = None):
    if dataset == "treebank":
        from training.data.treebank import load_treebank

        return load_treebank(data)
    if dataset == "conllu":
        return load_conllu_root(Path(data), tag_field or "upos")
    raise DataError(f"unknown POS dataset {dataset!r}; expected 'treebank' or 'conllu'")


def evaluate_entry(
    model_dir: Path,
    data_dir: Path,
    onnx_file: Path | None = None,
    providers: list[str] | None = None,
) -> dict[str, float]:
    """Re-create the test split recorded in the manifest and evaluate the ONNX model on it
    (``onnx_file``: another variant than fp32)."""
    model_dir = Path(model_dir)
    m = load_manifest(model_dir)
    hp = m.hyperparameters
    corpus = load_pos_corpus(Path(data_dir), hp.get("dataset", "treebank"), hp.get("tag_field"))
    return evaluate_split(model_dir, m, corpus, onnx_file, providers)


def evaluate_split(
    model_dir: Path,
    m,
    corpus: TaggedCorpus,
    onnx_file: Path | None = None,
    providers: list[str] | None = None,
) -> dict[str, float]:
    splits = recreate_split(model_dir, m, corpus)
    pre = m.preprocessing
    encoder = WordEncoder.load(
        model_dir / pre.tokenizer_file,
        model_dir / pre.chars_file if pre.chars_file else None,
        pre.max_word_length,
    )
    path = onnx_file or model_dir / m.variants["fp32"].file
    session = ort_session(path, threads=2, providers=providers)
    return evaluate_onnx(
        session,
        encoder,
        take(corpus.sentences, splits["test"]),
        take(corpus.tags, splits["test"]),
        m.labels,
        m.max_length,
    )

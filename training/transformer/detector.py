"""The machine-generated-text detector (HC3): fine-tune a BERT-family encoder, evaluate,
export (fp32 + int8 + fp16) into ``models/<name>/<version>/``.

Class imbalance (HC3-en has ~1.75 ChatGPT answers per human one): the cross-entropy is
class-weighted with ``w_c = N / (2 * N_c)`` computed on the training split, so both classes
contribute equally to the loss; the test metrics are reported on the natural distribution.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.preprocess.classify import ClassifyEncoder, ClassifyEncoding, softmax
from training.data.hc3 import LABELS, DetectExample
from training.metrics.classification import binary_metrics

if TYPE_CHECKING:
    from training.checkpoint import Checkpointing
    from training.transformer.export import Exported

log = logging.getLogger("nlpserve.detector")

DEFAULT_RATIOS = {"train": 0.8, "dev": 0.1, "test": 0.1}


@dataclass
class DetectorConfig:
    base_model: str
    max_length: int = 256
    batch_size: int = 16
    eval_batch_size: int = 64
    epochs: float = 2.0
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_train_examples: int | None = None  # CPU budget: random subsample of the train split
    subsample_seed: int | None = None  # seed of that subsample (default: seed)
    max_dev_examples: int | None = 600
    eval_every: int | None = None
    max_minutes: float | None = None
    seed: int = 13
    device: str = "cpu"
    amp: bool = True
    class_weights: bool = True
    freeze_embeddings: bool = False  # word-embedding matrix only (CPU speed)
    lang: str = "en"
    ratios: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RATIOS))


def split_by_question(
    examples: Sequence[DetectExample], seed: int, ratios: dict[str, float]
) -> dict[str, list[DetectExample]]:
    """Split the *questions* with the seeded splitter; every answer follows its question."""
    from training.data.splits import split_indices

    questions = sorted({e.question for e in examples})
    parts = split_indices(len(questions), seed, ratios)
    which = {questions[i]: name for name, idx in parts.items() for i in idx}
    out: dict[str, list[DetectExample]] = {name: [] for name in ratios}
    for e in examples:
        out[which[e.question]].append(e)
    return out


def _batches_np(
    encoder: ClassifyEncoder, encs: Sequence[ClassifyEncoding], batch_size: int
) -> tuple[list[list[int]], list[dict[str, np.ndarray]]]:
    from training.transformer.common import length_batches

    groups = length_batches([len(e) for e in encs], batch_size, shuffle=False)
    return groups, [encoder.collate([encs[i] for i in g]) for g in groups]


def predict_torch(model, encoder, encs, batch_size: int, device: str) -> np.ndarray:
    """P(machine) for each encoding, with the PyTorch model."""
    import torch

    from training.transformer.export import model_input_names, select_inputs

    names = model_input_names(model)
    groups, batches = _batches_np(encoder, encs, batch_size)
    probs = np.zeros(len(encs))
    model.eval()
    with torch.no_grad():
        for g, b in zip(groups, batches, strict=True):
            b = select_inputs(b, names)
            logits = model(**{k: torch.from_numpy(v).to(device) for k, v in b.items()}).logits
            probs[g] = softmax(logits.float().cpu().numpy())[:, 1]
    return probs


def predict_onnx(
    path: Path,
    encoder,
    encs,
    batch_size: int,
    providers: list[str] | None = None,
    desc: str | None = None,
    machine: int = 1,
) -> np.ndarray:
    """P(machine) for each encoding, with ONNX Runtime (``machine``: its logit's index, the
    manifest's ``labels.index("machine")``); ``desc``: a progress bar with it."""
    from training.transformer.common import progress_bar
    from training.transformer.export import onnx_feeds, ort_session

    sess = ort_session(path, providers=providers)
    groups, batches = _batches_np(encoder, encs, batch_size)
    probs = np.zeros(len(encs))
    pairs = zip(groups, batches, strict=True)
    if desc is not None:
        pairs = progress_bar(pairs, desc=desc, total=len(groups), unit="batch", mininterval=1.0)
    for g, b in pairs:
        (logits,) = sess.run(["logits"], onnx_feeds(sess, b))
        probs[g] = softmax(logits)[:, machine]
    return probs


# Parity probe when there is no test text: short ones, and one past any max_length (cut).
PROBE_TEXTS = ["a b", "c", "The quick brown fox jumps over the lazy dog. " * 80]


def export_variants(
    model,
    tokenizer,
    encoder: ClassifyEncoder,
    out_dir: Path,
    test: Sequence[DetectExample],
    variants: Sequence[str],
    batch_size: int,
    machine: int = 1,
) -> Exported:
    """Into ``out_dir``: tokenizer.json, model.onnx (refused past the parity tolerance against
    PyTorch, on the first test texts or :data:`PROBE_TEXTS`) and the int8/fp16 ``variants``,
    each scored on ``test`` through the service encoder (no metrics without test texts).
    ``machine``: the index of the model's machine logit."""
    from training.transformer import export as ex
    from training.transformer.common import save_tokenizer_json

    save_tokenizer_json(tokenizer, out_dir)
    test_encs = encoder.encode([e.text for e in test])
    test_y = np.asarray([e.label for e in test])
    onnx_fp32 = out_dir / "model.onnx"
    ex.export_onnx(model, onnx_fp32, "detect", ex.example_batch(model.config.vocab_size))
    sample = encoder.collate(test_encs[:8] if test_encs else encoder.encode(PROBE_TEXTS))
    diff = ex.check_parity(model, onnx_fp32, sample, "detect")

    def _test(path: Path, providers: list[str] | None = None) -> dict[str, float]:
        if not test_encs:
            return {}
        p = predict_onnx(path, encoder, test_encs, batch_size, providers,
                         desc=f"test {path.name}", machine=machine)  # fmt: skip
        m = binary_metrics(test_y, p)
        return {k: m[k] for k in ("accuracy", "f1", "roc_auc", "precision", "recall")}

    fp32_metrics = _test(onnx_fp32)
    # measured_with on every variant, as the QA trainer and `evaluate --record` write it
    cpu = "CPUExecutionProvider"  # _test's default
    var_meta: dict[str, dict[str, Any]] = {
        "fp32": {"file": "model.onnx", "precision": "fp32", "metrics": fp32_metrics,
                 "measured_with": cpu},
    }  # fmt: skip
    if "int8" in variants:
        q = ex.quantize_int8(onnx_fp32, out_dir / "model.int8.onnx")
        m8 = _test(q)
        if fp32_metrics:
            m8["accuracy_drop"] = fp32_metrics["accuracy"] - m8["accuracy"]
            m8["roc_auc_drop"] = fp32_metrics["roc_auc"] - m8["roc_auc"]
        var_meta["int8"] = {"file": "model.int8.onnx", "precision": "int8", "metrics": m8,
                            "measured_with": cpu}  # fmt: skip
    fp16_note = ""
    if "fp16" in variants:
        var_meta["fp16"], fp16_note = ex.fp16_variant(
            onnx_fp32, out_dir, model.config, _test, fp32_metrics, ("accuracy", "roc_auc")
        )
    return ex.Exported(var_meta, fp32_metrics, diff, fp16_note)


def preprocessing(tokenizer) -> dict[str, Any]:
    """The manifest's ``preprocessing`` of a detector with this ``tokenizers.Tokenizer``."""
    from training.transformer.common import lowercases

    return {"kind": "wordpiece", "tokenizer_file": "tokenizer.json",
            "lowercase": lowercases(tokenizer)}  # fmt: skip


def train_detector(
    examples: Sequence[DetectExample],
    cfg: DetectorConfig,
    out_dir: Path,
    *,
    name: str = "detector-en",
    version: str = "1",
    work_dir: Path | None = None,
    data_files: Sequence[Any] = (),
    load_stats: dict[str, int] | None = None,
    command: str = "",
    variants: Sequence[str] = ("fp32", "int8", "fp16"),
    overwrite: bool = False,
    model=None,
    tokenizer=None,
    extra_hyperparameters: dict[str, Any] | None = None,
    checkpointing: Checkpointing | None = None,
) -> dict[str, float]:
    """Train, pick the best dev checkpoint, export + evaluate variants on test, write entry.

    ``model``/``tokenizer`` (a ``tokenizers.Tokenizer``) may be passed directly (tests);
    otherwise both come from ``cfg.base_model`` through ``AutoTokenizer``/``AutoModel...``.
    """
    import torch

    from training.repository import check_new_version
    from training.seeding import seed_everything
    from training.transformer import export as ex
    from training.transformer.common import (
        FitConfig,
        buckets_from_lengths,
        check_tokenizer_fits,
        check_unknown_rate,
        fit,
        framework_versions,
        fresh_checkpoint_dir,
        length_batches,
        load_fast_tokenizer,
        load_head_model,
        publish,
        resolve_device,
        staging_dir,
        write_entry,
    )

    t_start = time.time()
    check_new_version(Path(out_dir), overwrite)  # before training, not after
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    splits = split_by_question(examples, cfg.seed, cfg.ratios)
    train, dev, test = splits["train"], splits["dev"], splits.get("test", [])
    sizes = {k: len(v) for k, v in splits.items()}
    log.info("split by question: %s examples (%s)", sizes, load_stats or {})
    rng = random.Random(cfg.seed if cfg.subsample_seed is None else cfg.subsample_seed)
    if cfg.max_train_examples and len(train) > cfg.max_train_examples:
        train = rng.sample(train, cfg.max_train_examples)
        log.info("train subsampled to %d examples (--max-train-examples)", len(train))
    dev_sel = dev
    if cfg.max_dev_examples and len(dev) > cfg.max_dev_examples:
        dev_sel = random.Random(cfg.seed + 1).sample(dev, cfg.max_dev_examples)

    if tokenizer is None:
        hf_tok, tokenizer = load_fast_tokenizer(cfg.base_model)
        if work_dir is not None:  # the best checkpoint is then a complete HF folder
            fresh_checkpoint_dir(work_dir / "best")
            hf_tok.save_pretrained(str(work_dir / "best"))
    if model is None:
        from transformers import AutoModelForSequenceClassification

        model = load_head_model(
            AutoModelForSequenceClassification,
            cfg.base_model,
            2,
            id2label=dict(enumerate(LABELS)),
            label2id={lab: i for i, lab in enumerate(LABELS)},
        )
    check_tokenizer_fits(tokenizer, model.config.vocab_size, cfg.base_model)
    input_names = ex.model_input_names(model)
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    encoder = ClassifyEncoder(tokenizer, cfg.max_length)
    train_encs = encoder.encode([e.text for e in train])
    unk_rate = check_unknown_rate(tokenizer, (e.input_ids for e in train_encs), cfg.base_model)
    train_y = np.asarray([e.label for e in train], dtype=np.int64)
    lengths = [len(e) for e in train_encs]
    truncated = float(np.mean([e.truncated for e in train_encs])) if train_encs else 0.0
    log.info(
        "train tokens: median %d, p90 %d, truncated at %d: %.1f%%",
        int(np.median(lengths)), int(np.quantile(lengths, 0.9)), cfg.max_length, 100 * truncated,
    )  # fmt: skip
    counts = np.bincount(train_y, minlength=2).astype(np.float64)
    weights = counts.sum() / (2.0 * np.maximum(counts, 1.0)) if cfg.class_weights else np.ones(2)
    log.info("class counts %s -> loss weights %s", counts.tolist(), np.round(weights, 3).tolist())
    w_t = torch.tensor(weights, dtype=torch.float32, device=device)

    dev_encs = encoder.encode([e.text for e in dev_sel])
    dev_y = np.asarray([e.label for e in dev_sel])
    per_epoch = max(1, int(np.ceil(len(train_encs) / cfg.batch_size)))

    def make_batches(epoch: int):
        groups = length_batches(
            lengths, cfg.batch_size, shuffle=True, rng=random.Random(cfg.seed + epoch)
        )
        for g in groups:
            b = ex.select_inputs(encoder.collate([train_encs[i] for i in g]), input_names)
            batch = {k: torch.from_numpy(v) for k, v in b.items()}
            batch["labels"] = torch.from_numpy(train_y[g])
            yield batch

    def loss_fn(m, batch):
        labels = batch.pop("labels")
        logits = m(**batch).logits
        return torch.nn.functional.cross_entropy(logits.float(), labels, weight=w_t)

    dev_log: list[dict[str, float]] = []
    if checkpointing is not None:  # a resume continues the evaluations' figures
        checkpointing.keep("dev_log", dev_log)

    def evaluate(m) -> float:
        p = predict_torch(m, encoder, dev_encs, cfg.eval_batch_size, device)
        met = binary_metrics(dev_y, p)
        dev_log.append(met)
        log.info("dev: %s", {k: round(v, 4) for k, v in met.items()})
        return met["accuracy"] + 1e-3 * met["roc_auc"]  # AUC breaks accuracy ties

    fit_cfg = FitConfig(
        epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
        max_grad_norm=cfg.max_grad_norm,
        eval_every=cfg.eval_every,
        max_minutes=cfg.max_minutes,
        device=device,
        amp=cfg.amp,
        log_every=20,
    )
    ckpt = (work_dir / "best") if work_dir else None
    result = fit(model, make_batches, per_epoch, evaluate, fit_cfg, ckpt, loss_fn, checkpointing)
    train_seconds = result.seconds
    scores = [h["score"] for h in result.history]
    best_dev = dev_log[scores.index(max(scores))] if scores else {}
    model.to("cpu").eval()

    # ---- export + test metrics per variant (all through the service encoder)
    final_dir = Path(out_dir)
    out_dir = staging_dir(final_dir, overwrite)
    exported = export_variants(model, tokenizer, encoder, out_dir, test, variants,
                               cfg.eval_batch_size)  # fmt: skip
    metrics: dict[str, float] = dict(exported.metrics)
    metrics["onnx_parity_max_abs_diff"] = exported.parity
    metrics.update(
        {
            "dev_accuracy": best_dev.get("accuracy", float("nan")),
            "dev_roc_auc": best_dev.get("roc_auc", float("nan")),
            "train_seconds": train_seconds,
            "train_examples": float(len(train)),
            "test_examples": float(len(test)),
        }
    )
    if load_stats:
        metrics.update({f"data_{k}": float(v) for k, v in load_stats.items()})

    inputs, outputs = ex.tensor_specs("detect", input_names=input_names)
    hp = asdict(cfg)
    hp.update(
        {
            "class_weights_used": weights.tolist(),
            "imbalance": "class-weighted cross-entropy, w_c = N / (2 N_c) on the train split",
            "best_step": result.best_step,
            "steps": result.steps,
            "autocast": result.autocast,
            "dev_history": result.history,
            "train_truncated_fraction": truncated,
            "train_unknown_token_fraction": unk_rate,
        }
    )
    hp.update(extra_hyperparameters or {})  # e.g. base_model as recorded (no local path)
    desc = (
        f"Human vs ChatGPT answer detector fine-tuned from {hp['base_model']} on HC3, split by "
        f"question. Texts are cut to the first {cfg.max_length} tokens. Test accuracy "
        f"{metrics.get('accuracy', float('nan')):.4f}, ROC AUC "
        f"{metrics.get('roc_auc', float('nan')):.4f} (fp32 ONNX)." + exported.fp16_note
    )
    write_entry(
        out_dir,
        name=name,
        version=version,
        task="detect",
        architecture=type(model).__name__,
        description=desc,
        inputs=inputs,
        outputs=outputs,
        labels=list(LABELS),
        max_length=cfg.max_length,
        preprocessing=preprocessing(tokenizer),
        buckets=buckets_from_lengths(lengths, cfg.max_length),
        variants=exported.variants,
        metrics=metrics,
        split={"seed": cfg.seed, "ratios": cfg.ratios, "sizes": sizes, "unit": "question"},
        data=list(data_files),
        command=command,
        hyperparameters=hp,
        framework_versions=framework_versions(),
    )
    publish(out_dir, final_dir)
    log.info("wrote %s in %.0fs: %s", final_dir, time.time() - t_start, metrics)
    return metrics

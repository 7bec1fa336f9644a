"""Extractive QA (CMRC 2018): fine-tune a BERT-family encoder with a start/end head, pick the
best checkpoint on held-out *train* articles, export (fp32 + int8 + fp16) and report the
official CMRC metric on the dev file (which is never used for training or selection).

Windows, labels and span decoding all go through :mod:`service.preprocess.qa`, the module the
service runs, so the reported score is the score of what is served.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.preprocess.qa import QAEncoder, QAWindow, answer_token_span
from training.data.squad import QAExample
from training.metrics import cmrc

if TYPE_CHECKING:
    from training.checkpoint import Checkpointing
    from training.transformer.export import Exported

log = logging.getLogger("nlpserve.qa")

RunFn = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]


@dataclass
class QAConfig:
    base_model: str
    max_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64
    max_answer_length: int = 30
    n_best: int = 20
    batch_size: int = 32
    eval_batch_size: int = 64
    epochs: float = 2.0
    lr: float = 3e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    negative_ratio: float = 1.0  # fraction of answer-less windows kept for training
    holdout_ratio: float = 0.05  # train articles held out for checkpoint selection
    max_holdout_examples: int | None = 400
    max_train_examples: int | None = None
    subsample_seed: int | None = None  # for --max-train-examples (default: seed)
    max_eval_examples: int | None = None  # final test (CMRC dev) subset; None = all
    skip_test: bool = False  # no test scoring (a round whose checkpoint is scored later)
    eval_every: int | None = None
    max_minutes: float | None = None
    time_budget_minutes: float | None = None  # fit the LR schedule to this wall time
    seed: int = 13
    device: str = "cpu"
    amp: bool = True
    freeze_embeddings: bool = False  # word-embedding matrix only (CPU speed)


def make_encoder(tokenizer, cfg: QAConfig) -> QAEncoder:
    return QAEncoder(tokenizer, cfg.max_length, cfg.doc_stride, cfg.max_query_length)


def split_articles(
    examples: Sequence[QAExample], ratio: float, seed: int
) -> tuple[list[QAExample], list[QAExample]]:
    """(train, held-out) by article: no context is in both."""
    from training.data.splits import split_indices

    articles = sorted({e.article for e in examples})
    if ratio <= 0 or len(articles) < 2:
        return list(examples), []
    parts = split_indices(len(articles), seed, {"train": 1.0 - ratio, "dev": ratio})
    held = {articles[i] for i in parts["dev"]}
    return [e for e in examples if e.article not in held], [
        e for e in examples if e.article in held
    ]


def eval_sample(examples: list[QAExample], max_examples: int | None, seed: int) -> list[QAExample]:
    """The eval file's questions a run scores (``--max-eval-examples``; None: all); the same
    sample for ``train qa`` and ``nlpserve evaluate``."""
    if max_examples and len(examples) > max_examples:
        return random.Random(seed + 2).sample(examples, max_examples)
    return examples


def train_features(
    examples: Sequence[QAExample], encoder: QAEncoder, negative_ratio: float, seed: int
) -> tuple[list[QAWindow], np.ndarray, dict[str, int]]:
    """Windows of every example with a located answer, labelled (start, end) token positions;
    windows that do not contain the answer point at 0 ([CLS]) and are kept with probability
    ``negative_ratio``."""
    rng = random.Random(seed)
    usable = [e for e in examples if e.first_located is not None]
    all_windows = encoder.encode_batch([e.question for e in usable], [e.context for e in usable])
    windows: list[QAWindow] = []
    labels: list[tuple[int, int]] = []
    stats = {"examples": len(usable), "skipped_no_answer": len(examples) - len(usable),
             "windows": 0, "positive": 0, "negative_kept": 0, "negative_dropped": 0}  # fmt: skip
    for ex, wins in zip(usable, all_windows, strict=True):
        ans = ex.first_located
        assert ans is not None
        for w in wins:
            span = answer_token_span(w, ans.start, ans.end)
            if span is None:
                if rng.random() >= negative_ratio:
                    stats["negative_dropped"] += 1
                    continue
                span = (0, 0)
                stats["negative_kept"] += 1
            else:
                stats["positive"] += 1
            windows.append(w)
            labels.append(span)
    stats["windows"] = len(windows)
    return windows, np.asarray(labels, dtype=np.int64).reshape(-1, 2), stats


def predict(
    examples: Sequence[QAExample],
    encoder: QAEncoder,
    run: RunFn,
    batch_size: int,
    max_answer_length: int,
    n_best: int = 20,
    desc: str | None = None,
) -> dict[str, str]:
    """Question id -> answer text, through the service windowing and span decoding.
    ``desc``: show a progress bar of the batches with this label (test scoring)."""
    from training.transformer.common import length_batches, progress_bar

    per_ex = encoder.encode_batch([e.question for e in examples], [e.context for e in examples])
    flat = [(i, w) for i, wins in enumerate(per_ex) for w in wins]
    logits: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # window -> start and end logits
    groups = length_batches([len(w) for _, w in flat], batch_size, shuffle=False)
    if desc is not None:
        groups = progress_bar(groups, desc=desc, unit="batch", mininterval=1.0)
    for g in groups:
        s, e = run(encoder.collate([flat[k][1] for k in g]))
        for row, k in enumerate(g):
            n = len(flat[k][1])
            logits[k] = s[row, :n], e[row, :n]
    starts = [logits[k][0] for k in range(len(flat))]
    ends = [logits[k][1] for k in range(len(flat))]
    preds: dict[str, str] = {}
    k = 0
    for ex, wins in zip(examples, per_ex, strict=True):
        n = len(wins)
        ans = encoder.decode(
            ex.context, wins, starts[k : k + n], ends[k : k + n], max_answer_length, n_best
        )
        preds[ex.id] = ans.text
        k += n
    return preds


def references(examples: Sequence[QAExample]) -> dict[str, list[str]]:
    return {e.id: [a.text for a in e.answers] for e in examples}


def torch_runner(model, device: str) -> RunFn:
    import torch

    from training.transformer.export import model_input_names, select_inputs

    names = model_input_names(model)

    def run(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        batch = select_inputs(batch, names)
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(v).to(device) for k, v in batch.items()})
        return out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()

    return run


def onnx_runner(
    path: Path | str, threads: int | None = None, providers: list[str] | None = None
) -> RunFn:
    from training.transformer.export import onnx_feeds, ort_session

    sess = ort_session(path, providers=providers, threads=threads)

    def run(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        s, e = sess.run(["start_logits", "end_logits"], onnx_feeds(sess, batch))
        return s, e

    return run


def evaluate_examples(
    examples, encoder, run: RunFn, cfg: QAConfig, desc: str | None = None
) -> dict[str, float]:
    preds = predict(
        examples, encoder, run, cfg.eval_batch_size, cfg.max_answer_length, cfg.n_best, desc
    )
    return cmrc.evaluate(references(examples), preds)


# Parity probe when there is no test question: a context over several windows of any size.
PROBE = [
    QAExample("probe", "probe", "中国的首都是哪里？ Which city?",
              "中国的首都是北京，它有三千多年的历史。Beijing is the capital of China. " * 40, ())
]  # fmt: skip


def export_variants(
    model,
    tokenizer,
    encoder: QAEncoder,
    out_dir: Path,
    test_ex: Sequence[QAExample],
    probe: Sequence[QAExample],
    cfg: QAConfig,
    variants: Sequence[str],
    fp32_providers: list[str] | None = None,
) -> Exported:
    """Into ``out_dir``: tokenizer.json, model.onnx (refused past the parity tolerance against
    PyTorch on the windows of ``probe``'s first questions) and the int8/fp16 ``variants``,
    each scored on ``test_ex`` with the official CMRC metric through the service decoding (no
    metrics without test questions); fp32 on ``fp32_providers`` (default: the CPU)."""
    from training.transformer import export as ex
    from training.transformer.common import save_tokenizer_json

    save_tokenizer_json(tokenizer, out_dir)
    onnx_fp32 = out_dir / "model.onnx"
    ex.export_onnx(model, onnx_fp32, "qa", ex.example_batch(model.config.vocab_size))
    probe = probe or PROBE
    sample = encoder.collate([w for e in probe for w in encoder.encode(e.question, e.context)][:8])
    diff = ex.check_parity(model, onnx_fp32, sample, "qa")

    def _test(path: Path, providers: list[str] | None = None) -> dict[str, float]:
        if not test_ex:
            return {}
        t = time.time()
        run = onnx_runner(path, providers=providers)
        r = evaluate_examples(test_ex, encoder, run, cfg, desc=f"test {path.name}")
        log.info("test %s: EM %.2f F1 %.2f (%.0fs)", path.name, r["em"], r["f1"], time.time() - t)
        return {"em": r["em"], "f1": r["f1"]}

    fp32_metrics = _test(onnx_fp32, fp32_providers)
    var_meta: dict[str, dict[str, Any]] = {
        "fp32": {
            "file": "model.onnx",
            "precision": "fp32",
            "metrics": fp32_metrics,
            "measured_with": (fp32_providers or ["CPUExecutionProvider"])[0],
        }
    }
    if "int8" in variants:
        q = ex.quantize_int8(onnx_fp32, out_dir / "model.int8.onnx")
        m8 = _test(q)
        if fp32_metrics:
            m8["f1_drop"] = fp32_metrics["f1"] - m8["f1"]
            m8["em_drop"] = fp32_metrics["em"] - m8["em"]
        var_meta["int8"] = {"file": "model.int8.onnx", "precision": "int8", "metrics": m8,
                            "measured_with": "CPUExecutionProvider"}  # fmt: skip
    fp16_note = ""
    if "fp16" in variants:
        var_meta["fp16"], fp16_note = ex.fp16_variant(
            onnx_fp32, out_dir, model.config, _test, fp32_metrics, ("f1", "em")
        )
    return ex.Exported(var_meta, fp32_metrics, diff, fp16_note)


def preprocessing(tokenizer, cfg: QAConfig) -> dict[str, Any]:
    """The manifest's ``preprocessing`` of a QA model with this ``tokenizers.Tokenizer``."""
    from training.transformer.common import lowercases

    return {
        "kind": "wordpiece",
        "tokenizer_file": "tokenizer.json",
        "lowercase": lowercases(tokenizer),
        "doc_stride": cfg.doc_stride,
        "max_answer_length": cfg.max_answer_length,
        "max_query_length": cfg.max_query_length,
    }


def train_qa(
    train_examples: Sequence[QAExample],
    test_examples: Sequence[QAExample],
    cfg: QAConfig,
    out_dir: Path,
    *,
    name: str = "qa-zh",
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
    if tokenizer is None:
        hf_tok, tokenizer = load_fast_tokenizer(cfg.base_model)
        if work_dir is not None:  # the best checkpoint is then a complete HF folder
            fresh_checkpoint_dir(work_dir / "best")
            hf_tok.save_pretrained(str(work_dir / "best"))
    if model is None:
        from transformers import AutoModelForQuestionAnswering

        # fp32 whatever the checkpoint's dtype (a half-precision copy travels lighter); a
        # start/end head (2 outputs) whatever head the checkpoint carries.
        model = load_head_model(AutoModelForQuestionAnswering, cfg.base_model, 2).float()
    check_tokenizer_fits(tokenizer, model.config.vocab_size, cfg.base_model)
    input_names = ex.model_input_names(model)
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    encoder = make_encoder(tokenizer, cfg)

    train_ex, held_ex = split_articles(train_examples, cfg.holdout_ratio, cfg.seed)
    if cfg.max_train_examples and len(train_ex) > cfg.max_train_examples:
        sub = cfg.seed if cfg.subsample_seed is None else cfg.subsample_seed
        train_ex = random.Random(sub).sample(train_ex, cfg.max_train_examples)
    if cfg.max_holdout_examples and len(held_ex) > cfg.max_holdout_examples:
        held_ex = random.Random(cfg.seed + 1).sample(held_ex, cfg.max_holdout_examples)
    test_ex = [] if cfg.skip_test else list(test_examples)
    test_ex = eval_sample(test_ex, cfg.max_eval_examples, cfg.seed)
    # Built with --epochs 0 too: no step reads them then, but their lengths set the
    # manifest's bucket edges, which a scoring round must keep.
    windows, labels, fstats = train_features(train_ex, encoder, cfg.negative_ratio, cfg.seed)
    unk_rate = check_unknown_rate(tokenizer, (w.input_ids for w in windows), cfg.base_model)
    lengths = [len(w) for w in windows]
    log.info("train features: %s; held-out %d questions; test %d", fstats, len(held_ex),
             len(test_ex))  # fmt: skip
    per_epoch = max(1, int(np.ceil(len(windows) / cfg.batch_size)))

    def make_batches(epoch: int):
        groups = length_batches(
            lengths, cfg.batch_size, shuffle=True, rng=random.Random(cfg.seed + epoch)
        )
        for g in groups:
            b = ex.select_inputs(encoder.collate([windows[i] for i in g]), input_names)
            batch = {k: torch.from_numpy(v) for k, v in b.items()}
            batch["start_positions"] = torch.from_numpy(labels[g, 0])
            batch["end_positions"] = torch.from_numpy(labels[g, 1])
            yield batch

    held_log: list[dict[str, float]] = []
    if checkpointing is not None:  # a resume continues the evaluations' figures
        checkpointing.keep("held_log", held_log)

    def evaluate(m) -> float:
        if not held_ex:
            return 0.0
        res = evaluate_examples(held_ex, encoder, torch_runner(m, device), cfg)
        held_log.append(res)
        log.info("held-out: EM %.2f F1 %.2f", res["em"], res["f1"])
        return res["f1"]

    fit_cfg = FitConfig(
        epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
        max_grad_norm=cfg.max_grad_norm,
        eval_every=cfg.eval_every,
        max_minutes=cfg.max_minutes,
        time_budget_minutes=cfg.time_budget_minutes,
        device=device,
        amp=cfg.amp,
        log_every=25,
    )
    ckpt = (work_dir / "best") if work_dir else None
    result = fit(
        model, make_batches, per_epoch, evaluate if held_ex else None, fit_cfg, ckpt,
        checkpointing=checkpointing,
    )  # fmt: skip
    held_scores = [h["score"] for h in result.history]
    best_held = held_log[held_scores.index(max(held_scores))] if held_scores and held_log else {}
    model.to("cpu").eval()

    # ---- export, parity, variants, test metrics through ORT + service decoding
    final_dir = Path(out_dir)
    out_dir = staging_dir(final_dir, overwrite)
    # Trained on CUDA with an onnxruntime that has it: fp32 is scored there too (TF32; the CPU
    # pass over the dev set took minutes on the GPU machine's shared cores); else on the CPU.
    fp32_providers = ex.fp16_eval_providers() if device.startswith("cuda") else None
    probe = test_ex[:4] or train_ex[:4]
    exported = export_variants(
        model, tokenizer, encoder, out_dir, test_ex, probe, cfg, variants, fp32_providers
    )
    fp32_metrics = exported.metrics
    metrics: dict[str, float] = dict(fp32_metrics)
    metrics.update(
        {
            "onnx_parity_max_abs_diff": exported.parity,
            "heldout_em": best_held.get("em", float("nan")),
            "heldout_f1": best_held.get("f1", float("nan")),
            "train_seconds": result.seconds,
            "train_windows": float(len(windows)),
            "train_questions": float(fstats["examples"]),
            "test_questions": float(len(test_ex)),
        }
    )
    if result.steps == 0:  # --epochs 0: the training figures belong to the earlier round
        for k in ("train_seconds", "train_windows", "train_questions"):
            del metrics[k]
    if load_stats:
        metrics.update({f"data_{k}": float(v) for k, v in load_stats.items()})
    inputs, outputs = ex.tensor_specs("qa", input_names=input_names)
    hp = asdict(cfg)
    hp.update({"best_step": result.best_step, "steps": result.steps,
               "autocast": result.autocast,
               "heldout_history": result.history, "features": fstats,
               "train_unknown_token_fraction": unk_rate})  # fmt: skip
    hp.update(extra_hyperparameters or {})
    origin = (
        f"fine-tuned from {hp['base_model']}. "
        if result.steps
        else f"from the checkpoint {hp['base_model']}, exported and scored as given (--epochs 0). "
    )
    if fp32_metrics:
        scores = (
            f"Metrics: official CMRC 2018 EM/F1 on "
            f"{'the full' if not cfg.max_eval_examples else 'a sample of the'} dev set "
            f"({len(test_ex)} questions; never used for training or checkpoint selection): "
            f"EM {metrics['em']:.2f}, F1 {metrics['f1']:.2f} (fp32 ONNX)." + exported.fp16_note
        )
    else:
        scores = "The dev set was not scored in this round (--skip-test)."
    desc = f"Chinese extractive QA (CMRC 2018) {origin}{scores}"
    write_entry(
        out_dir,
        name=name,
        version=version,
        task="qa",
        architecture=type(model).__name__,
        description=desc,
        inputs=inputs,
        outputs=outputs,
        labels=[],
        max_length=cfg.max_length,
        preprocessing=preprocessing(tokenizer, cfg),
        buckets=buckets_from_lengths(lengths, cfg.max_length),
        variants=exported.variants,
        metrics=metrics,
        split={
            "seed": cfg.seed,
            "ratios": {"train": 1.0 - cfg.holdout_ratio, "dev": cfg.holdout_ratio},
            "sizes": {"train": len(train_ex), "dev": len(held_ex), "test": len(test_ex)},
            "unit": "article (train file); test = the CMRC 2018 dev file",
        },
        data=list(data_files),
        command=command,
        hyperparameters=hp,
        framework_versions=framework_versions(),
    )
    publish(out_dir, final_dir)
    log.info("wrote %s in %.0fs: %s", final_dir, time.time() - t_start, metrics)
    return metrics

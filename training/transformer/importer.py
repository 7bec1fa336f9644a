"""``nlpserve import detector|qa``: a Hugging Face checkpoint someone already fine-tuned, put
into the model repository as it is (no training step): its head checked, exported to ONNX
like a trained model (parity with PyTorch, int8/fp16 variants), optionally scored on the
held-out data the trainers score on.

The export, variants and scoring are the trainers' own (``detector.export_variants``,
``qa.export_variants``), so an imported entry is served and re-evaluated like a trained one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.data.common import DataError

log = logging.getLogger("nlpserve.import")

# What each task loads the checkpoint as, and the trainer that would give it a head.
_TASKS = {
    "detect": ("AutoModelForSequenceClassification", "detector", "classification"),
    "qa": ("AutoModelForQuestionAnswering", "qa", "question-answering"),
}
OPTIMISTIC = (
    "a checkpoint fine-tuned on this data (or on data overlapping it) scores optimistically "
    "here: its training set may hold these test examples"
)


class CheckpointError(DataError):
    """A checkpoint that cannot be served as it is (no trained head for the task, a head of
    another size, labels that do not say which output is which); the message says what to
    do instead."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the fp32 model in eval mode, its ``tokenizers.Tokenizer``, what
    the manifest records of where it came from (``hyperparameters.imported_from``) and its
    transformers tokenizer (what :func:`check_served_exactly` compares the service with)."""

    model: Any
    tokenizer: Any
    source: dict[str, Any]
    hf_tokenizer: Any


def position_limit(model) -> int | None:
    """The most tokens ``model`` has position embeddings for: ``max_position_embeddings``,
    less ``padding_idx + 1`` where positions are numbered after the padding index (RoBERTa,
    XLM-R: 514 rows hold 512 tokens); ``None`` when the config gives no limit (XLNet's -1:
    relative positions)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit or limit < 0:
        return None
    embeddings = getattr(model.base_model, "embeddings", None)
    pad = getattr(getattr(embeddings, "position_embeddings", None), "padding_idx", None)
    return int(limit) - (pad + 1 if pad is not None else 0)


def default_max_length(model, train_default: int) -> int:
    """``--max-length`` when not given: the tokens the checkpoint has positions for, at most
    the trainer's default (longer windows cost more than they add on CPUs)."""
    limit = position_limit(model)
    return min(train_default, limit) if limit else train_default


def check_max_length(model, max_length: int, given: str) -> None:
    limit = position_limit(model)
    if limit and max_length > limit:
        rows = model.config.max_position_embeddings
        after = "" if rows == limit else f", numbered from {rows - limit}"
        raise CheckpointError(
            f"checkpoint {given}: --max-length {max_length} is past the {limit} tokens it has "
            f"position embeddings for (max_position_embeddings {rows}{after})"
        )


def fixed_buckets(max_length: int) -> list[int]:
    """Bucket edges without data to measure lengths on: 1/8, 1/4 and 1/2 of ``max_length``
    (rounded up to a multiple of 8) and ``max_length``. With ``--data`` the edges come from
    the held-out texts' token lengths by the trainers' rule instead."""
    edges = {int(math.ceil(max_length * f / 8) * 8) for f in (0.125, 0.25, 0.5)}
    return sorted(e for e in edges if 0 < e < max_length) + [max_length]


def source_record(given: str, path: str) -> dict[str, Any]:
    """``hyperparameters.imported_from``: the checkpoint as given (a local folder relative to
    the working directory), where it loaded from (``path``), and the sha256 of its config,
    tokenizer and weight files; for a hub id, the cached revision it loaded."""
    from training.repository import checkpoint_digest, portable_path

    local = Path(path).expanduser()
    if local.is_dir():
        where = "local folder" if path == given else "package folder"
        return {"given": portable_path(given), "loaded_from": where,
                "sha256": checkpoint_digest(local)}  # fmt: skip
    from transformers.utils import cached_file

    snapshot = Path(str(cached_file(path, "config.json"))).parent
    in_cache = snapshot.parent.name == "snapshots"
    return {
        "given": given,
        "loaded_from": "Hugging Face cache" if in_cache else "Hugging Face hub",
        "revision": snapshot.name if in_cache else None,
        "sha256": checkpoint_digest(snapshot),
    }


def load_checkpoint(given: str, task: str, path: str | None = None) -> Checkpoint:
    """The checkpoint ``given`` (loaded from ``path``, default ``given``) with the ``task``'s
    head, refused (CheckpointError, one line) when transformers has to initialise any weight
    of it (no trained head: the answers would come from random weights) or when the head has
    other than 2 outputs."""
    import transformers
    from transformers.utils import logging as hf_logging

    from training.transformer.common import check_tokenizer_fits, load_fast_tokenizer

    path = path or given
    auto_name, command, what = _TASKS[task]
    instead = f"use `nlpserve train {command} --base-model {given}` instead"
    if path != given:  # the packaged MiniLM: the English detector's default base
        instead = f"use `nlpserve train {command}` (--base-model {path}) instead"
        if task == "detect":
            instead = "use `nlpserve train detector` (it starts from this checkpoint) instead"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report: the refusal below says what matters
    try:
        model, info = getattr(transformers, auto_name).from_pretrained(
            path, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {given}: cannot load it: {why}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    archs = ", ".join(model.config.architectures or []) or "none recorded"
    if missing := sorted(info.get("missing_keys") or []):
        raise CheckpointError(
            f"checkpoint {given} has no trained {what} head (architectures: {archs}; "
            f"transformers would initialise {', '.join(missing)} at random): {instead}"
        )
    if model.config.num_labels != 2:
        raise CheckpointError(
            f"checkpoint {given}: its {what} head has {model.config.num_labels} outputs "
            f"({_id2label(model.config)}), not 2: {instead}"
        )
    hf_tokenizer, tokenizer = load_fast_tokenizer(path)
    check_tokenizer_fits(tokenizer, model.config.vocab_size, given, "checkpoint")
    if task == "qa":
        from service.preprocess.qa import pair_layout

        try:
            pair_layout(tokenizer)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {given}: cannot build QA windows: {e}") from e
    return Checkpoint(model.float().eval(), tokenizer, source_record(given, path), hf_tokenizer)


# What the service's encoding is checked on before export: English, punctuation, accents,
# CJK, an emoji, a typed special token, and (added per checkpoint) a text past max_length.
PROBE_TEXTS = (
    "i think my dog ate it lol",
    "Furthermore, in conclusion: various aspects (e.g. cost) should be considered!",
    "Café naïve résumé — “quoted” text",
    "中国的首都是北京，它有三千多年的历史。",
    "ok 😀 </s> [SEP] <mask> done",
)
PROBE_QUESTIONS = ("Where was the meeting held?", "Where?")  # the first within max_query_length
PROBE_CONTEXT = "After a long debate, the meeting was held in Paris, near the old library. "
# Served outputs within this of PyTorch's on the checkpoint's own encoding (the parity the
# export is held to).
SERVED_TOLERANCE = 1e-4


def _long_text(tokenizer, unit: str, tokens: int) -> str:
    """``unit`` repeated to more than ``tokens`` tokens."""
    n = max(1, len(tokenizer.encode(unit, add_special_tokens=False).ids))
    return unit * (tokens // n + 2)


def _torch(model, names: Sequence[str], rows: dict[str, Any]) -> list[Any]:
    import torch

    feeds = {k: torch.as_tensor(v) for k, v in rows.items() if k in names}
    with torch.no_grad():
        out = model(**feeds)
    if hasattr(out, "start_logits"):
        return [out.start_logits.numpy(), out.end_logits.numpy()]
    return [out.logits.numpy()]


def check_served_exactly(ck: Checkpoint, task: str, encoder, max_length: int) -> None:
    """Refuse (CheckpointError, one line) a checkpoint the service would not answer as it
    does in PyTorch with its own transformers tokenizer: the service's ids (or token types)
    for probe texts differ from that tokenizer's (a template, normalizer or truncation it
    does not restate), or the model's outputs change when a shorter input is right-padded
    in a batch, as the service pads (XLNet reads its last position, where padding goes).
    NaN outputs pass here: the export's parity check reports those."""
    import numpy as np

    from training.transformer.export import model_input_names

    hf, names = ck.hf_tokenizer, model_input_names(ck.model)
    what = f"checkpoint {ck.source['given']} ({_architecture(ck.model)}): not supported"
    if task == "detect":
        texts = [*PROBE_TEXTS, _long_text(ck.tokenizer, "It is a long text. ", max_length)]
        ours = encoder.encode(texts)
        rows = [(e.input_ids, e.token_type_ids) for e in ours]
        theirs = [hf(t, truncation=True, max_length=max_length) for t in texts]
        batch = encoder.collate(ours)
        shown = texts
    else:
        context = _long_text(ck.tokenizer, PROBE_CONTEXT, max_length + encoder.doc_stride)
        # one the service does not cut (transformers would not)
        fits = [q for q in PROBE_QUESTIONS
                if len(ck.tokenizer.encode(q, add_special_tokens=False).ids)
                <= encoder.max_query_length]  # fmt: skip
        if not fits:
            return
        question = fits[0]
        windows = encoder.encode(question, context)
        rows = [(w.input_ids, w.token_type_ids) for w in windows]
        enc = hf(question, context, truncation="only_second", max_length=max_length,
                 stride=encoder.doc_stride, return_overflowing_tokens=True)  # fmt: skip
        keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
        theirs = [{k: enc[k][i] for k in keys} for i in range(len(enc["input_ids"]))]
        # a last window shorter than the others: the batch pads it
        batch = encoder.collate(windows)
        shown = [f"{question} {context}"] * len(rows)
    if len(theirs) != len(rows):
        raise CheckpointError(f"{what}: nlpserve cuts the probe question and context into "
                              f"{len(rows)} windows, its tokenizer into {len(theirs)}")  # fmt: skip
    for (ids, types), want, text in zip(rows, theirs, shown, strict=True):
        if ids.tolist() != list(want["input_ids"]):
            raise CheckpointError(
                f"{what}: nlpserve encodes {text[:40]!r} as {len(ids)} ids, its tokenizer as "
                f"{len(want['input_ids'])} other ones (a tokenizer pipeline the service does "
                "not restate)"
            )
        typed = "token_type_ids" in names and "token_type_ids" in want
        if typed and types.tolist() != list(want["token_type_ids"]):
            raise CheckpointError(
                f"{what}: nlpserve gives {text[:40]!r} other token types than its "
                "tokenizer (a pair template the service does not restate)"
            )
    # The same rows alone, unpadded (the service's type ids: transformers 5 gives ALBERT's
    # and PreTrainedTokenizerFast's none, though the template the checkpoint trained with has)
    padded = _torch(ck.model, names, batch)
    for i, (ids, types) in enumerate(rows):
        n = len(ids)
        one = {"input_ids": ids[None], "token_type_ids": types[None],
               "attention_mask": np.ones((1, n), dtype=np.int64)}  # fmt: skip
        alone = _torch(ck.model, names, one)
        for got, exp in zip(padded, alone, strict=True):
            a, b = got[i, :n] if task == "qa" else got[i], exp[0]
            diff = np.abs(a - b)
            if (diff > SERVED_TOLERANCE).any():  # NaN is not over it
                side = getattr(hf, "padding_side", "right")
                raise CheckpointError(
                    f"{what}: its outputs change by {float(np.nanmax(diff)):.3g} when an input "
                    f"is right-padded in a batch, as nlpserve batches (its tokenizer pads on "
                    f"the {side})"
                )


def _id2label(config) -> dict[int, str]:
    return {int(i): str(n) for i, n in sorted(config.id2label.items())}


# id2label names read as human / machine (lowercase, "-" and "_" as spaces). Only names that
# can mean nothing else for a text classifier: not Fake/Real (a fake-news classifier's "fake"
# is human-written), not LABEL_0/LABEL_1, not positive/negative.
HUMAN_NAMES = frozenset({"human", "humans", "human written", "human generated", "human text",
                         "written by a human"})  # fmt: skip
MACHINE_NAMES = frozenset({"machine", "machine generated", "machine written", "machine text",
                           "ai", "ai generated", "ai written", "ai text", "generated", "gpt",
                           "chatgpt", "gpt generated", "llm", "llm generated", "model generated",
                           "written by ai", "written by a machine"})  # fmt: skip


def _read_label(name: str) -> str | None:
    """``human``/``machine`` for an id2label name that can only mean that, else None."""
    key = " ".join(name.lower().replace("-", " ").replace("_", " ").split())
    return "human" if key in HUMAN_NAMES else "machine" if key in MACHINE_NAMES else None


@dataclass
class Labels:
    """The manifest's labels, ``human``/``machine`` in the model's output order, and where
    they came from (``hyperparameters.labels_from``): ``id2label`` (it names them),
    ``id2label synonyms`` (it names them otherwise, e.g. Human/AI) or ``--labels``."""

    names: list[str]
    source: str


def detector_labels(config, given_labels: str | None, given: str) -> Labels:
    """The detector's labels: from ``config.id2label`` when its two names read as human and
    machine (any case, or an unambiguous synonym such as AI or human-written; logged), else
    from ``--labels NAME0,NAME1``. Refused (CheckpointError, one line) when neither says which
    output is which, or when --labels contradicts id2label."""
    found = _id2label(config)
    raw = [found.get(i, "") for i in range(2)]
    named = [_read_label(n) or "" for n in raw]
    from_config = sorted(named) == ["human", "machine"]
    if given_labels is None:
        if not from_config:
            raise CheckpointError(
                f"checkpoint {given}: its id2label {found} does not say which output is human "
                f"and which machine: pass --labels human,machine if output 0 ({raw[0]!r}) means "
                f"human-written, or --labels machine,human if it means machine-generated"
            )
        if named == [n.lower() for n in raw]:
            return Labels(named, "id2label")
        log.info("labels: id2label %s read as %s (unambiguous synonyms)", found,
                 ",".join(named))  # fmt: skip
        return Labels(named, "id2label synonyms")
    labels = [x.strip().lower() for x in given_labels.split(",")]
    if sorted(labels) != ["human", "machine"]:
        raise CheckpointError(
            f"--labels {given_labels}: name human and machine once each, in the model's "
            f"output order (id2label {found}): --labels human,machine or --labels machine,human"
        )
    if from_config and labels != named:
        raise CheckpointError(
            f"--labels {given_labels} contradicts the checkpoint's id2label {found} (read as "
            f"{','.join(named)}): leave --labels out, or correct config.json"
        )
    log.info("labels: --labels %s for id2label %s", ",".join(labels), found)
    return Labels(labels, "--labels")


def _entry(folder: Path, staging: Path, **fields: Any) -> None:
    """Validate and write the manifest into ``staging``, then move it to ``folder``."""
    from training.transformer.common import framework_versions, publish, write_entry

    write_entry(staging, framework_versions=framework_versions(), **fields)
    publish(staging, folder)


def _architecture(model) -> str:
    return ", ".join(model.config.architectures or []) or type(model).__name__


# --------------------------------------------------------------------------- detector
def import_detector(
    ck: Checkpoint,
    folder: Path,
    *,
    labels: Labels,
    max_length: int,
    variants: Sequence[str],
    command: str,
    data_root: Path | None = None,
    lang: str = "en",
    seed: int = 13,
    overwrite: bool = False,
) -> dict[str, float]:
    """Export ``ck`` as the detector ``folder`` (``<out>/<name>/<version>``); with
    ``data_root``, score it on the HC3 test split ``train detector`` scores on (its split
    rule, ``seed`` and ``lang``). Returns the manifest's metrics."""
    from service.preprocess.classify import ClassifyEncoder
    from training.data.checksums import data_checksums
    from training.data.hc3 import HC3Stats, hc3_files, load_hc3
    from training.transformer.common import buckets_from_lengths, staging_dir
    from training.transformer.detector import (
        DEFAULT_RATIOS,
        export_variants,
        preprocessing,
        split_by_question,
    )
    from training.transformer.export import model_input_names, tensor_specs

    t0 = time.time()
    encoder = ClassifyEncoder(ck.tokenizer, max_length)
    check_served_exactly(ck, "detect", encoder, max_length)
    test: list = []
    split, data_files, load_stats = None, [], {}
    if data_root is not None:
        files = hc3_files(data_root, lang)
        stats = HC3Stats()
        splits = split_by_question(load_hc3(files, stats), seed, DEFAULT_RATIOS)
        test = splits["test"]
        sizes = {k: len(v) for k, v in splits.items()}
        split = {"seed": seed, "ratios": DEFAULT_RATIOS, "sizes": sizes, "unit": "question"}
        data_files = data_checksums(files, data_root)
        load_stats = stats.as_dict()
        log.warning("scoring on the HC3-%s test split (%d texts): %s", lang, len(test),
                    OPTIMISTIC)  # fmt: skip
    staging = staging_dir(folder, overwrite)
    exported = export_variants(ck.model, ck.tokenizer, encoder, staging, test, variants,
                               64, machine=labels.names.index("machine"))  # fmt: skip
    metrics = {**exported.metrics, "onnx_parity_max_abs_diff": exported.parity}
    if test:
        metrics["test_examples"] = float(len(test))
        metrics.update({f"data_{k}": float(v) for k, v in load_stats.items()})
        lengths = [len(e) for e in encoder.encode([e.text for e in test])]
        buckets = buckets_from_lengths(lengths, max_length)
        scored = (
            f"Test accuracy {metrics['accuracy']:.4f}, ROC AUC {metrics['roc_auc']:.4f} (fp32 "
            f"ONNX) on the HC3-{lang} test split (by question, seed {seed}); {OPTIMISTIC}."
        )
    else:
        buckets = fixed_buckets(max_length)
        scored = "Not scored on held-out data (no --data): metrics hold the ONNX parity only."
    inputs, outputs = tensor_specs("detect", input_names=model_input_names(ck.model))
    desc = (
        f"Human vs machine text detector imported from the fine-tuned checkpoint "
        f"{ck.source['given']} as it is (no training). Texts are cut to the first "
        f"{max_length} tokens. {scored}{exported.fp16_note}"
    )
    hp = {
        "imported_from": ck.source,
        "id2label": _id2label(ck.model.config),
        "labels_from": labels.source,
        "max_length": max_length,
        "lang": lang,
        "seed": seed,
    }
    _entry(folder, staging, name=folder.parent.name, version=folder.name, task="detect",
           architecture=_architecture(ck.model), description=desc, inputs=inputs,
           outputs=outputs, labels=labels.names, max_length=max_length,
           preprocessing=preprocessing(ck.tokenizer), buckets=buckets,
           variants=exported.variants, metrics=metrics, split=split, data=data_files,
           command=command, hyperparameters=hp)  # fmt: skip
    log.info("wrote %s in %.0fs: %s", folder, time.time() - t0, metrics)
    return metrics


# --------------------------------------------------------------------------- QA
def import_qa(
    ck: Checkpoint,
    folder: Path,
    *,
    max_length: int,
    doc_stride: int,
    max_query_length: int,
    max_answer_length: int,
    variants: Sequence[str],
    command: str,
    data_root: Path | None = None,
    eval_file: str = "cmrc2018/cmrc2018_dev.json",
    max_eval_examples: int | None = None,
    seed: int = 13,
    overwrite: bool = False,
) -> dict[str, float]:
    """Export ``ck`` as the QA model ``folder``; with ``data_root``, score it with the
    official CMRC metric on ``eval_file`` (the sample ``train qa`` scores:
    ``max_eval_examples``, ``seed``). Returns the manifest's metrics."""
    from training.data.checksums import data_checksums
    from training.data.squad import LoadStats, load_squad
    from training.transformer.common import buckets_from_lengths, staging_dir
    from training.transformer.export import model_input_names, tensor_specs
    from training.transformer.qa import (
        QAConfig,
        eval_sample,
        export_variants,
        make_encoder,
        preprocessing,
    )

    t0 = time.time()
    cfg = QAConfig(base_model=str(ck.source["given"]), max_length=max_length,
                   doc_stride=doc_stride, max_query_length=max_query_length,
                   max_answer_length=max_answer_length, max_eval_examples=max_eval_examples,
                   seed=seed)  # fmt: skip
    encoder = make_encoder(ck.tokenizer, cfg)
    check_served_exactly(ck, "qa", encoder, max_length)
    test: list = []
    split, data_files = None, []
    if data_root is not None:
        path = data_root / eval_file
        stats = LoadStats()
        test = eval_sample(load_squad(path, stats), max_eval_examples, seed)
        log.info("eval %s: %s", eval_file, stats.as_dict())
        split = {"seed": seed, "ratios": {"test": 1.0}, "sizes": {"test": len(test)},
                 "unit": f"question; test = {eval_file}"}  # fmt: skip
        data_files = data_checksums([path], data_root)
        log.warning("scoring on %s (%d questions): %s", eval_file, len(test), OPTIMISTIC)
    staging = staging_dir(folder, overwrite)
    exported = export_variants(ck.model, ck.tokenizer, encoder, staging, test, test[:4], cfg,
                               variants)  # fmt: skip
    metrics = {**exported.metrics, "onnx_parity_max_abs_diff": exported.parity}
    if test:
        metrics["test_questions"] = float(len(test))
        windows = encoder.encode_batch([e.question for e in test], [e.context for e in test])
        buckets = buckets_from_lengths([len(w) for ws in windows for w in ws], max_length)
        sample = "the full" if not max_eval_examples else "a sample of the"
        scored = (
            f"Official CMRC 2018 EM {metrics['em']:.2f}, F1 {metrics['f1']:.2f} (fp32 ONNX) on "
            f"{sample} {eval_file} ({len(test)} questions); {OPTIMISTIC}."
        )
    else:
        buckets = fixed_buckets(max_length)
        scored = "Not scored on held-out data (no --data): metrics hold the ONNX parity only."
    inputs, outputs = tensor_specs("qa", input_names=model_input_names(ck.model))
    desc = (
        f"Extractive QA imported from the fine-tuned checkpoint {ck.source['given']} as it is "
        f"(no training). {scored}{exported.fp16_note}"
    )
    hp = {
        "imported_from": ck.source,
        "max_length": max_length,
        "doc_stride": doc_stride,
        "max_query_length": max_query_length,
        "max_answer_length": max_answer_length,
        "eval_file": eval_file,
        "max_eval_examples": max_eval_examples,
        "seed": seed,
    }
    _entry(folder, staging, name=folder.parent.name, version=folder.name, task="qa",
           architecture=_architecture(ck.model), description=desc, inputs=inputs,
           outputs=outputs, labels=[], max_length=max_length,
           preprocessing=preprocessing(ck.tokenizer, cfg), buckets=buckets,
           variants=exported.variants, metrics=metrics, split=split, data=data_files,
           command=command, hyperparameters=hp)  # fmt: skip
    log.info("wrote %s in %.0fs: %s", folder, time.time() - t0, metrics)
    return metrics

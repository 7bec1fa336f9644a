"""The end of an LSTM training run, shared by both models: export the trained model to ONNX,
open it in ONNX Runtime for the parity check and the test evaluation, and write the
repository entry with what every LSTM manifest records (split, data, hyperparameters)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from service.preprocess.words import WordEncoder
from service.repository.manifest import SplitInfo
from training.data.checksums import data_checksums
from training.lstm.export import export_onnx, ort_session
from training.repository import write_entry


class Trained(Protocol):
    """What both models' training results carry (``PosTrained``, ``PolarityTrained``)."""

    encoder: WordEncoder
    labels: list[str]
    splits: dict[str, list[int]]
    train_lengths: list[int]
    epochs_run: int
    best_epoch: int


@contextmanager
def exported(
    model: torch.nn.Module,
    example: Mapping[str, np.ndarray],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
) -> Iterator[tuple[Path, Any]]:
    """``(ONNX file, ORT session on it)``, in a temporary folder that lives until the entry is
    written (the entry copies the file)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(
            model,
            example,
            Path(tmp) / "model.onnx",
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )
        yield path, ort_session(path, threads=torch.get_num_threads())


def write_lstm_entry(
    out_root: Path | str,
    name: str,
    *,
    cfg: Any,
    trained: Trained,
    corpus: Any,
    onnx_file: Path,
    metrics: dict[str, float],
    hyperparameters: Mapping[str, Any] | None = None,
    **entry: Any,
) -> Path:
    """:func:`training.repository.write_entry` with the fields both LSTM models fill the same
    way: ``cfg``'s fields (``progress`` aside) plus the model's own ``hyperparameters``,
    the split's seed, ratios and sizes, the corpus files' checksums, the word tokenizer."""
    split = SplitInfo(
        seed=cfg.seed,
        ratios=dict(cfg.ratios),
        sizes={k: len(v) for k, v in trained.splits.items()},
        unit="sentence",
    )
    hp: dict[str, Any] = asdict(cfg)
    hp.pop("progress")  # how the run looked, not what it did
    hp.update(
        vocab_size=trained.encoder.vocab_size,
        epochs_run=trained.epochs_run,
        best_epoch=trained.best_epoch,
        **(hyperparameters or {}),
    )
    return write_entry(
        out_root,
        name,
        onnx_file=onnx_file,
        tokenizer=trained.encoder.tokenizer,
        lowercase=cfg.lowercase,
        labels=trained.labels,
        max_length=cfg.max_length,
        train_lengths=trained.train_lengths,
        metrics=metrics,
        split=split,
        data=data_checksums(corpus.files, corpus.root),
        hyperparameters=hp,
        **entry,
    )

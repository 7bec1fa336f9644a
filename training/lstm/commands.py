"""``nlpserve train pos|polarity`` and the ``pos``/``polarity`` evaluators.

torch and the training modules are imported inside the commands, so registering them costs
nothing (and works) in an install without torch.
"""

from __future__ import annotations

import importlib
import json
import logging
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from training.options import (
    CHECKPOINT_EVERY_DEFAULT,
    CheckpointEvery,
    CheckpointEveryOpt,
    Device,
    DeviceOpt,
    OutOpt,
    OverwriteOpt,
    ProgressOpt,
    ResumeOpt,
    SeedOpt,
    ThreadsOpt,
    VersionOpt,
    WorkOpt,
    check_output,
    fail,
    handles_sigterm,
    recorded_command,
    resolve_data,
    result_options,
)

if TYPE_CHECKING:
    from training.cli import Evaluator


class PosFormat(StrEnum):
    treebank = "treebank"
    conllu = "conllu"


class TagField(StrEnum):
    upos = "upos"
    xpos = "xpos"


DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data", help="Data root, corpus zip or folder (default: NLPSERVE_DATA_DIR setting)."
    ),
]
PatienceHelp = "Epochs without dev improvement before stopping."


def _probability(value: float) -> float:
    """A dropout probability: 0 <= p < 1 (1 would drop everything; torch rejects > 1)."""
    if not 0.0 <= value < 1.0:
        raise typer.BadParameter(f"{value} is not in the range 0<=x<1.")
    return value


def _setup(device: Device, threads: int | None) -> None:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if threads:
        torch.set_num_threads(threads)
    if device is Device.cuda and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda requested but CUDA is not available")


def _checkpointing(
    command: str, corpus, work: Path, every: CheckpointEvery, resume: Path | None, command_line: str
):
    """The run's checkpoints in ``work``; a resume checked against the options the run was
    started with, its data files by sha256 and the thread count in effect (intra-op sums
    may round differently with more threads)."""
    import torch

    from training import checkpoint
    from training.data.checksums import data_checksums

    data = [d.model_dump() for d in data_checksums(corpus.files, corpus.root)]
    options = result_options(**{"--data": data, "--threads": torch.get_num_threads()})
    return checkpoint.start(command, work, every, resume, options, command_line)


def _report(folder: Path) -> None:
    from service.repository import load_manifest

    m = load_manifest(folder)
    typer.echo(json.dumps({"path": str(folder), "metrics": m.metrics}, indent=2))


def train_pos(
    data: DataOpt = None,
    out: OutOpt = Path("models"),
    name: Annotated[str, typer.Option(help="Model name.")] = "pos-en",
    version: VersionOpt = None,
    fmt: Annotated[
        PosFormat, typer.Option("--format", help="treebank (NLTK PTB sample) or conllu.")
    ] = PosFormat.treebank,
    tag_field: Annotated[TagField, typer.Option(help="CoNLL-U tag column.")] = TagField.upos,
    epochs: Annotated[
        int, typer.Option(min=1, help="Maximum epochs (early stopping on dev).")
    ] = 30,
    patience: Annotated[int, typer.Option(min=1, help=PatienceHelp)] = 4,
    seed: SeedOpt = 13,
    device: DeviceOpt = Device.cpu,
    hidden: Annotated[int, typer.Option(min=1, help="LSTM hidden size per direction.")] = 128,
    layers: Annotated[int, typer.Option(min=1, help="LSTM layers.")] = 1,
    word_dim: Annotated[int, typer.Option(min=1, help="Word embedding size.")] = 100,
    char_filters: Annotated[int, typer.Option(min=1, help="Char CNN filters.")] = 64,
    min_count: Annotated[int, typer.Option(min=1, help="Rarer training words become <unk>.")] = 2,
    batch_size: Annotated[int, typer.Option(min=1, help="Sentences per batch.")] = 32,
    lr: Annotated[float, typer.Option(min=1e-9, help="Adam learning rate.")] = 2e-3,
    dropout: Annotated[
        float, typer.Option(callback=_probability, help="Dropout, 0 <= p < 1.")
    ] = 0.33,
    max_length: Annotated[int, typer.Option(min=8, help="Longest sentence (tokens).")] = 256,
    threads: ThreadsOpt = None,
    progress: ProgressOpt = None,
    overwrite: OverwriteOpt = False,
    work_dir: WorkOpt = None,
    checkpoint_every: CheckpointEveryOpt = CHECKPOINT_EVERY_DEFAULT,
    resume: ResumeOpt = None,
) -> None:
    """Train the POS tagger, evaluate on test (ONNX), write models/<name>/<version>/."""
    version = check_output(out, name, version, overwrite)
    path = resolve_data(data)
    _setup(device, threads)
    from training.checkpoint import CheckpointError
    from training.data.common import DataError
    from training.lstm.export import ParityError
    from training.lstm.pos import PosConfig, load_pos_corpus, run_pos

    cfg = PosConfig(
        epochs=epochs,
        patience=patience,
        seed=seed,
        device=device.value,
        hidden=hidden,
        layers=layers,
        word_dim=word_dim,
        char_filters=char_filters,
        min_count=min_count,
        batch_size=batch_size,
        lr=lr,
        dropout=dropout,
        max_length=max_length,
        progress=progress,
        dataset=fmt.value,
        tag_field=tag_field.value if fmt is PosFormat.conllu else None,
    )
    try:
        corpus = load_pos_corpus(path, cfg.dataset, cfg.tag_field)
        ck = _checkpointing("train pos", corpus, work_dir or Path("runs") / name,
                            checkpoint_every, resume, recorded_command(data, path))  # fmt: skip
        with ck.hint_on_interrupt():
            folder = run_pos(corpus, out, cfg, name=name, version=version, overwrite=overwrite,
                             command=ck.command_line, checkpointing=ck)  # fmt: skip
    except CheckpointError as e:
        fail(e, 2)
    except (DataError, FileExistsError) as e:
        raise typer.BadParameter(str(e)) from e
    except ParityError as e:
        fail(e)
    ck.finish()
    _report(folder)


def train_polarity(
    data: DataOpt = None,
    out: OutOpt = Path("models"),
    name: Annotated[str, typer.Option(help="Model name.")] = "polarity-en",
    version: VersionOpt = None,
    epochs: Annotated[
        int, typer.Option(min=1, help="Maximum epochs (early stopping on dev).")
    ] = 10,
    patience: Annotated[int, typer.Option(min=1, help=PatienceHelp)] = 3,
    seed: SeedOpt = 13,
    device: DeviceOpt = Device.cpu,
    hidden: Annotated[int, typer.Option(min=1, help="LSTM hidden size per direction.")] = 64,
    layers: Annotated[int, typer.Option(min=1, help="LSTM layers.")] = 1,
    emb_dim: Annotated[int, typer.Option(min=1, help="Word embedding size.")] = 100,
    nb_dims: Annotated[
        int,
        typer.Option(
            min=0,
            help="Embedding dims initialised with naive-Bayes log-count ratios "
            "(0: none; at most --emb-dim).",
        ),
    ] = 8,
    min_count: Annotated[int, typer.Option(min=1, help="Rarer training words become <unk>.")] = 2,
    bidirectional: Annotated[bool, typer.Option(help="Bidirectional LSTM.")] = True,
    max_pool: Annotated[
        bool, typer.Option(help="Concatenate max-pooled outputs to the final states.")
    ] = True,
    batch_size: Annotated[int, typer.Option(min=1, help="Sentences per batch.")] = 32,
    lr: Annotated[float, typer.Option(min=1e-9, help="Adam learning rate.")] = 2e-3,
    dropout: Annotated[
        float, typer.Option(callback=_probability, help="Dropout, 0 <= p < 1.")
    ] = 0.5,
    max_length: Annotated[
        int, typer.Option(min=8, help="Longest input (tokens); longer truncated.")
    ] = 96,
    threads: ThreadsOpt = None,
    progress: ProgressOpt = None,
    overwrite: OverwriteOpt = False,
    work_dir: WorkOpt = None,
    checkpoint_every: CheckpointEveryOpt = CHECKPOINT_EVERY_DEFAULT,
    resume: ResumeOpt = None,
) -> None:
    """Train the polarity classifier, evaluate on test (ONNX), write models/<name>/<version>/."""
    if nb_dims > emb_dim:
        raise typer.BadParameter(
            f"{nb_dims} is over the limit, --emb-dim ({emb_dim}): only that many embedding "
            "dims exist to initialise",
            param_hint="'--nb-dims'",
        )
    version = check_output(out, name, version, overwrite)
    path = resolve_data(data)
    _setup(device, threads)
    from training.checkpoint import CheckpointError
    from training.data.common import DataError
    from training.data.polarity import load_polarity
    from training.lstm.export import ParityError
    from training.lstm.polarity import PolarityConfig, run_polarity

    cfg = PolarityConfig(
        epochs=epochs,
        patience=patience,
        seed=seed,
        device=device.value,
        hidden=hidden,
        layers=layers,
        emb_dim=emb_dim,
        nb_dims=nb_dims,
        min_count=min_count,
        bidirectional=bidirectional,
        max_pool=max_pool,
        batch_size=batch_size,
        lr=lr,
        dropout=dropout,
        max_length=max_length,
        progress=progress,
    )
    try:
        corpus = load_polarity(path)
        ck = _checkpointing("train polarity", corpus, work_dir or Path("runs") / name,
                            checkpoint_every, resume, recorded_command(data, path))  # fmt: skip
        with ck.hint_on_interrupt():
            folder = run_polarity(
                corpus, out, cfg, name=name, version=version, overwrite=overwrite,
                command=ck.command_line, checkpointing=ck,
            )  # fmt: skip
    except CheckpointError as e:
        fail(e, 2)
    except (DataError, FileExistsError) as e:
        raise typer.BadParameter(str(e)) from e
    except ParityError as e:
        fail(e)
    ck.finish()
    _report(folder)


def _evaluator(task: str) -> Evaluator:
    """``pos``/``polarity``: re-create the test split from the manifest, score the ONNX file."""

    def evaluate(
        model_dir: Path,
        data_dir: Path,
        onnx_file: Path | None = None,
        providers: list[str] | None = None,
    ) -> dict[str, float]:
        module = importlib.import_module(f"training.lstm.{task}")  # torch: imported on use
        return module.evaluate_entry(model_dir, resolve_data(data_dir), onnx_file, providers)

    return evaluate


evaluate_pos = _evaluator("pos")
evaluate_polarity = _evaluator("polarity")


def register(train_app: typer.Typer, app: typer.Typer, evaluators: dict[str, Evaluator]) -> None:
    train_app.command("pos")(handles_sigterm(train_pos))
    train_app.command("polarity")(handles_sigterm(train_polarity))
    evaluators["pos"] = evaluate_pos
    evaluators["polarity"] = evaluate_polarity

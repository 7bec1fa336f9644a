"""Training commands for the ``nlpserve`` CLI: ``train <model>``, ``pretrain``, ``evaluate``.

Each model family registers its commands and an evaluator per task. Nothing here imports
torch at import time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

train_app = typer.Typer(help="Train a model, evaluate it on its test split, export it to ONNX.")

# task -> function(model_folder, data_dir) -> metrics dict
EVALUATORS: dict[str, Callable[[Path, Path], dict[str, float]]] = {}


def evaluate(
    model: Annotated[Path, typer.Argument(help="A version folder, e.g. models/pos-en/1.")],
    data: Annotated[
        Path | None, typer.Option(help="Data root (default: NLPSERVE_DATA_DIR).")
    ] = None,
) -> None:
    """Evaluate a model version on its held-out test split and print the metrics as JSON."""
    from service.config import Settings
    from service.repository import load_manifest

    manifest = load_manifest(model)
    data_dir = data or Settings().data_dir
    if manifest.task not in EVALUATORS:
        raise typer.BadParameter(f"no evaluator for task '{manifest.task}'")
    typer.echo(json.dumps(EVALUATORS[manifest.task](model, data_dir), indent=2))


def register(app: typer.Typer) -> None:
    from training.lstm import commands as lstm_commands

    lstm_commands.register(train_app, app, EVALUATORS)
    try:
        from training.transformer import commands as transformer_commands
    except ImportError:
        pass
    else:
        transformer_commands.register(train_app, app, EVALUATORS)
    app.add_typer(train_app, name="train")
    app.command("evaluate")(evaluate)

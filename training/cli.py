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

# task -> function(model_folder, data_dir, onnx_file, providers) -> metrics dict. onnx_file and
# providers None: the evaluator's default (the fp32 file, else int8, on the CPU).
Evaluator = Callable[[Path, Path, Path | None, list[str] | None], dict[str, float]]
EVALUATORS: dict[str, Evaluator] = {}

# Metrics whose drop from fp32 a variant records (the limits are on these).
DROP_KEYS: dict[str, tuple[str, ...]] = {
    "detect": ("accuracy", "roc_auc"),
    "qa": ("f1", "em"),
    "pos": ("accuracy",),
    "polarity": ("accuracy",),
}


def evaluate(
    model: Annotated[Path, typer.Argument(help="A version folder, e.g. models/pos-en/1.")],
    data: Annotated[
        Path | None, typer.Option(help="Data root (default: NLPSERVE_DATA_DIR).")
    ] = None,
    variant: Annotated[
        str | None,
        typer.Option(help="Variant to score (fp32, int8, fp16); default: fp32, else int8."),
    ] = None,
    providers: Annotated[
        str,
        typer.Option(
            help="ONNX Runtime providers, comma-separated; the first must be the one that runs "
            "(CUDAExecutionProvider needs onnxruntime-gpu and a GPU)."
        ),
    ] = "CPUExecutionProvider",
    record: Annotated[
        bool,
        typer.Option(
            "--record",
            help="Write the figures into the variant's manifest entry (metrics, drops from "
            "fp32, measured_with).",
        ),
    ] = False,
) -> None:
    """Evaluate a model version on its held-out test split and print the metrics as JSON.

    An fp16 variant exported on a machine without a GPU gets its accuracy drop measured on
    CUDA with: --variant fp16 --providers CUDAExecutionProvider --record.
    """
    from service.config import Settings
    from service.repository import load_manifest
    from service.repository.manifest import write_manifest

    manifest = load_manifest(model)
    data_dir = data or Settings().data_dir
    if manifest.task not in EVALUATORS:
        raise typer.BadParameter(f"no evaluator for task '{manifest.task}'")
    wanted = [p.strip() for p in providers.split(",") if p.strip()]
    onnx_file = None
    if variant is not None:
        if variant not in manifest.variants:
            have = ", ".join(sorted(manifest.variants))
            raise typer.BadParameter(f"{model} has no variant '{variant}' (it has: {have})")
        onnx_file = model / manifest.variants[variant].file
    used = _provider_that_runs(onnx_file or model / _default_file(manifest), wanted)
    metrics = EVALUATORS[manifest.task](model, data_dir, onnx_file, wanted)
    if record:
        key = variant or ("fp32" if "fp32" in manifest.variants else next(iter(manifest.variants)))
        entry = manifest.variants[key]
        reference = manifest.variants["fp32"].metrics if "fp32" in manifest.variants else {}
        reference = reference or manifest.metrics  # fp32's figures, measured at export
        # The figures this entry already records (export-time keys), re-measured; the ones
        # evaluation does not measure (dev scores, parity, train time) stay as they were.
        keep = {k for k in entry.metrics if not k.endswith("_drop")}
        remeasured = {k: v for k, v in metrics.items() if not keep or k in keep}
        recorded = {k: v for k, v in entry.metrics.items() if k in keep} | remeasured
        if key != "fp32":
            for k in DROP_KEYS.get(manifest.task, ()):
                if k in reference and k in metrics:
                    recorded[f"{k}_drop"] = reference[k] - metrics[k]
        variants = dict(manifest.variants)
        variants[key] = entry.model_copy(update={"metrics": recorded, "measured_with": used})
        write_manifest(model, manifest.model_copy(update={"variants": variants}))
        metrics = recorded
    typer.echo(json.dumps({**metrics, "variant": variant, "measured_with": used}, indent=2))


def _default_file(manifest) -> str:
    for key in ("fp32", "int8"):
        if key in manifest.variants:
            return manifest.variants[key].file
    return next(iter(manifest.variants.values())).file


def _provider_that_runs(path: Path, wanted: list[str]) -> str:
    """The provider ONNX Runtime really gives ``path`` with ``wanted``: figures recorded as
    measured on CUDA must not come from a silent CPU fallback."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    missing = [p for p in wanted if p not in have]
    if missing:
        raise typer.BadParameter(
            f"this onnxruntime ({ort.__version__}) lacks {', '.join(missing)} "
            f"(it has {', '.join(have)})"
        )
    so = ort.SessionOptions()
    so.log_severity_level = 3
    got = ort.InferenceSession(str(path), so, providers=wanted).get_providers()[0]
    if got != wanted[0]:
        raise typer.BadParameter(f"asked for {wanted[0]}, onnxruntime ran {path.name} on {got}")
    return got


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

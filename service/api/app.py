"""The FastAPI application: thin HTTP over the tasks, the queue and the runners."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api.auth import ApiKeys, AuthMiddleware
from service.api.client_quota import ClientQuota, check_settings
from service.api.client_rate import ClientRate, default_rate
from service.api.client_rate import check_settings as check_rate_settings
from service.api.deps import ServiceState, scope_priority
from service.api.errors import install_error_handlers
from service.api.fast_path import PredictFastPath
from service.api.middleware import (
    BodyLimitMiddleware,
    CorsMiddleware,
    JsonBodyMiddleware,
    MetricsMiddleware,
    RequestIdMiddleware,
    ShutdownMiddleware,
)
from service.api.openapi import install_openapi
from service.api.response_cache import ResponseCache
from service.api.routes import demo, docs, explain, ops, predict, v2
from service.config import Settings, get_settings
from service.explain.adapters import EXPLAINED_OUTPUT
from service.loop_lag import LoopLagMonitor
from service.metrics import Metrics
from service.queueing.factory import create_queue
from service.repository import discover_models
from service.tasks import TASK_CLASSES, build_tasks

log = logging.getLogger(__name__)

DESCRIPTION = """\
Length-bucketed dynamic batching over ONNX Runtime. Every prediction endpoint takes one item
or `{"inputs": [...]}`; errors are `{"error": {"code", "message"}}`. Every answer carries an
`X-Request-ID` header: send your own (1 to 128 of `A-Z a-z 0-9 . _ : -`) to find a request
in the server's logs, or read the one minted for it. A W3C `traceparent` joins the request to
your trace: every answer carries one with this request's span id (and a new trace id when you
sent none), which the server's JSON logs name too. The Open Inference Protocol (KServe V2,
JSON REST) is served under `/v2` for Triton, MLServer and KServe clients (tag `v2`).
"""


async def startup(state: ServiceState) -> None:
    """Load every model (sessions + warm-up in a thread), build tasks, start the queue."""
    settings = state.settings
    entries = discover_models(settings.model_dir, select=settings.model_selection())
    if not entries:
        log.warning("model repository %s holds no models", settings.model_dir)
    models: Mapping[str, object]
    if settings.queue == "inprocess":
        # imported here: a Redis-mode API never loads onnxruntime (20 MiB of RSS)
        from service.runtime.runner import load_runners

        state.runners = await asyncio.to_thread(load_runners, settings, state.metrics, entries)
        models = state.runners
    else:  # remote workers run the models; this process only tokenizes
        models = {e.manifest.name: e.manifest for e in entries}
    state.tasks = await asyncio.to_thread(build_tasks, entries, settings)
    queue = create_queue(settings, models, state.metrics)  # type: ignore[arg-type]
    await queue.start()
    if state.client_quota is not None and settings.client_quota_scope == "global":
        # Redis mode: the limits count across replicas (None in-process: this is all of it)
        state.client_quota.shared = queue.shared_in_flight()
    if state.client_rate is not None and settings.client_quota_scope == "global":
        state.client_rate.shared = queue.shared_rate()  # one bucket per client across replicas
    state.queue = queue
    state.loaded = True
    # Everything loaded so far (FastAPI, pydantic, the models' Python objects) lives as long
    # as the process: out of the collector's sight, a full collection no longer walks it.
    gc.collect()
    gc.freeze()
    log.info("ready: %s", ", ".join(sorted(state.tasks)) or "no models")


def begin_shutdown(state: ServiceState, drain_timeout_s: float) -> None:
    """Stop admitting work and start draining the queue (queued work still runs; what is
    left after ``drain_timeout_s`` fails with 503). Only the first call does anything."""
    state.loaded = False
    state.stopping = True
    state.stopped.set()
    if state.closing is None and state.queue is not None:
        state.closing = asyncio.create_task(state.queue.close(drain_timeout_s), name="drain")


async def shutdown(state: ServiceState) -> None:
    gc.unfreeze()  # what a stopped app leaves (tests start many) is collectable again
    begin_shutdown(state, state.settings.shutdown_timeout_s)  # no-op if the server began it
    if state.closing is not None:
        await state.closing


def _on_sighup(callback: Callable[[], object]) -> bool:
    """Run ``callback`` on SIGHUP (the keys file read again); False where the loop cannot
    take signal handlers (not the main thread, not Unix)."""
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, callback)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError):
        return False
    return True


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    state = ServiceState(settings=settings, metrics=Metrics())
    # read now: a bad keys file stops `nlpserve serve` before anything loads (KeyFileError)
    keys = None
    if settings.api_keys_file is not None:
        keys = state.api_keys = ApiKeys(settings.api_keys_file, state.metrics)
    check_settings(settings)  # a per-client limit needs clients: ClientQuotaConfigError
    check_rate_settings(settings)  # ... and so does a rate: ClientRateConfigError
    if keys is not None:  # counted per client even unlimited: a reload may set a limit
        state.client_quota = ClientQuota(settings.client_max_in_flight, keys, state.metrics)
        state.client_rate = ClientRate(default_rate(settings), keys, state.metrics)
    if settings.response_cache_mb > 0:  # off: no cache series either
        max_bytes = int(settings.response_cache_mb * 1_000_000)
        state.response_cache = ResponseCache(max_bytes, state.metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # SIGHUP taken before the models load: its default action ends the process, and a
        # rotation's `kill -HUP` may reach a replica still loading (seconds with the BERTs)
        hup = keys is not None and _on_sighup(keys.reload)
        grpc_server = None
        try:
            await startup(state)
            if settings.grpc_port:  # imported here: grpcio is an optional extra
                from service.api.grpc.server import start_grpc

                grpc_server = await start_grpc(state)  # its port taken: GrpcPortError
        except Exception as e:
            state.startup_error = e
            if state.queue is not None:  # loaded, then the gRPC port failed: stop the queue
                await shutdown(state)
            if hup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            raise
        # started once loaded (the load's stalls are not serving's), stopped after the drain
        lag = LoopLagMonitor(state.metrics.loop_lag, state.metrics.loop_lag_max)
        lag.start()
        watch = None
        if keys is not None:  # rotation: a changed keys file, or SIGHUP
            watch = asyncio.create_task(keys.watch(), name="api-keys-watch")
        warm = None
        if settings.explain_warmup:  # pay shap's import and JIT now, not on a first request
            warm = asyncio.create_task(explain.warm_up_explain(app), name="explain-warm-up")
        try:
            yield
        finally:
            for task in (warm, watch):
                if task is not None:
                    task.cancel()
            try:
                if grpc_server is not None:
                    # calls in flight are answered as HTTP requests are: the queue drains
                    # (begun here if the server has not), then what it could not serve
                    # gets UNAVAILABLE; new calls meanwhile get UNAVAILABLE
                    begin_shutdown(state, settings.shutdown_timeout_s)
                    await grpc_server.stop(settings.shutdown_timeout_s)
                await shutdown(state)
            finally:
                await lag.stop()
                if hup:
                    asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    app = FastAPI(
        title="nlpserve",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        # "/v1/pos/" is a 404, not a redirect to a Location built from the Host header
        redirect_slashes=False,
        # Served by routes/docs.py from local files; FastAPI's own pages load a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = state
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(predict.router)
    app.include_router(ops.router)
    app.include_router(explain.router)  # /v1/{detect,polarity}/explain
    app.include_router(v2.router)  # the Open Inference Protocol (KServe V2) under /v2
    app.include_router(demo.router)  # GET / (demo page) and /static/*
    app.include_router(docs.router)  # /docs, /redoc and their assets

    def model_for(path: str, query: dict[str, list[str]]) -> tuple[str, str] | None:
        """(model, endpoint) of a request to /v1/<task>[/explain]; None for other paths."""
        parts = path.strip("/").split("/")
        if len(parts) >= 2 and parts[0] == "v1" and parts[1] in TASK_CLASSES:
            if parts[2:] == ["explain"] and parts[1] not in EXPLAINED_OUTPUT:
                return None  # a 404: no such endpoint, not an explain request of that model
            endpoint = "explain" if parts[2:] == ["explain"] else "predict"
            return state.metrics_label(parts[1], query), endpoint
        # /v2/models/<name>[/versions/<version>]/infer: a prediction of that model
        versioned = len(parts) == 6 and parts[3] == "versions"
        if (
            parts[:2] == ["v2", "models"]
            and parts[-1] == "infer"
            and (len(parts) == 4 or versioned)
        ):
            return (parts[2] if parts[2] in state.tasks else "unknown"), "predict"
        return None

    app.add_middleware(JsonBodyMiddleware)
    if settings.fast_path:  # outside JsonBody: only what it hands on needs the JSON header
        app.add_middleware(PredictFastPath, api=app)
    # Added last = outermost: metrics see every response, 413s included.
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    # Inside the metrics: a request the shutdown cancels counts as the 503 it gets.
    app.add_middleware(ShutdownMiddleware, stopping=lambda: state.stopping)
    app.add_middleware(
        MetricsMiddleware,
        metrics=state.metrics,
        model_for=model_for,
        priority_for=lambda scope: scope_priority(state, scope),
    )
    if keys is not None:  # outside the metrics (a refused request is no model's request),
        app.add_middleware(AuthMiddleware, keys=keys)  # inside CORS: its 401 is readable
    if origins := settings.cors_origins():  # outside the metrics: a preflight is no request
        app.add_middleware(CorsMiddleware, origins=origins)
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer carries the id
    return app

"""``/v1/models``, ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from service.api.deps import ServiceState, clip_name
from service.api.deps import get_state as _state
from service.api.errors import ApiError, error_response
from service.api.openapi import most_batch_items
from service.api.schemas import (
    BatchLimits,
    ErrorResponse,
    ExplainLimits,
    HealthResponse,
    ModelInfo,
    ModelsResponse,
    ReadyResponse,
)

router = APIRouter(tags=["operations"])


def _info(state: ServiceState, name: str) -> ModelInfo:
    task = state.tasks[name]
    m = task.manifest
    runner = state.runners.get(name)
    run = runner.describe() if runner is not None else {}
    return ModelInfo(
        name=m.name,
        version=m.version,
        task=m.task,
        architecture=m.architecture,
        description=m.description,
        labels=m.labels,
        max_length=m.max_length,
        buckets=task.buckets,
        metrics=m.metrics,
        variant_metrics={k: v.metrics for k, v in sorted(m.variants.items()) if v.metrics},
        variants=sorted(m.variants),
        variant=run.get("variant"),
        provider=run.get("provider"),
        requested_provider=run.get("requested_provider"),
        fallback=run.get("fallback", False),
        batches_at_once=run.get("batches_at_once"),
        intra_op_threads=run.get("intra_op_threads"),
        min_padding_efficiency=run.get("min_padding_efficiency"),
        token_cost_us=run.get("token_cost_us"),
        queue_depth=state.queue.depth(name) if state.queue is not None else 0,
        max_answer_length=getattr(task, "max_answer_length", None),
    )


@router.get(
    "/v1/models",
    operation_id="list_models",
    response_model=ModelsResponse,
    summary="Loaded models",
    description="Every model this process serves: task, labels, max length, batching buckets, "
    "held-out metrics (`metrics`: the fp32 export's; `variant_metrics`: each other variant's "
    "own, e.g. int8), the variant and execution provider it runs on, and its queue depth.",
)
async def models(request: Request) -> ModelsResponse:
    state = _state(request)
    s = state.settings
    return ModelsResponse(
        models=[_info(state, n) for n in sorted(state.tasks)],
        explain=ExplainLimits(
            max_evals_default=s.explain_max_evals_default,
            max_evals_limit=s.explain_max_evals_limit,
        ),
        batch=BatchLimits(max_items=most_batch_items(s)),
    )


@router.get(
    "/v1/models/{name}",
    operation_id="get_model",
    response_model=ModelInfo,
    responses={404: {"model": ErrorResponse, "description": "No model of that name is loaded."}},
    summary="One loaded model",
    description="The `/v1/models` entry of one model, by name.",
)
async def model(
    request: Request,
    name: Annotated[str, Path(description="A model name, as `GET /v1/models` lists them.")],
) -> ModelInfo:
    state = _state(request)
    if name not in state.tasks:
        raise ApiError(
            404,
            "model_not_found",
            f"no model named {clip_name(name)} is loaded "
            f"(loaded: {', '.join(sorted(state.tasks)) or 'none'})",
        )
    return _info(state, name)


async def not_ready(state: ServiceState, model: str | None = None) -> ApiError | None:
    """Why the service (or ``model``: Redis mode may have no worker for it) cannot serve
    now, else None: the one readiness truth of ``/readyz`` and the V2 protocol's probes."""
    if not state.loaded or state.queue is None:
        return ApiError(503, "not_ready", "models are not loaded yet")
    if not state.tasks:
        return ApiError(
            503, "no_models", f"the model repository {state.settings.model_dir} holds no models"
        )
    if not await state.queue.is_ready():
        msg = "the inference queue is not accepting work"
        return ApiError(503, "queue_unavailable", msg, {"Retry-After": "1"})
    if (why := state.queue.no_workers_refusal(model)) is not None:
        return ApiError(503, "no_workers", why, {"Retry-After": "1"})
    return None


# HEAD too: what load balancers probe with (not in /docs: the same as GET, without a body)
@router.head("/healthz", include_in_schema=False)
@router.get(
    "/healthz",
    operation_id="check_liveness",
    response_model=HealthResponse,
    summary="Liveness: the process answers",
    description="200 while the process runs, even while models load or the queue is down: "
    "restart on failure of this one, route traffic on `/readyz`.",
)
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.head("/readyz", include_in_schema=False)
@router.get(
    "/readyz",
    operation_id="check_readiness",
    # documents the 200 (the route answers JSONResponse itself: the body is not re-validated)
    response_model=ReadyResponse,
    summary="Readiness: models loaded and the queue accepts work",
    description="200 with the loaded models (and, in Redis mode, the live workers, in all "
    "and per model) when "
    "requests can be served; 503 while starting, stopping, with no models, or with the "
    "queue backend unreachable (send traffic elsewhere).",
    responses={
        503: {
            "model": ErrorResponse,
            "description": "Not ready: starting, no models, or the "
            "queue is unreachable, or no worker with NLPSERVE_REDIS_NO_WORKER_FAIL_S "
            "(`not_ready`, `no_models`, `queue_unavailable`, `no_workers`).",
        }
    },
)
async def readyz(request: Request) -> JSONResponse:
    state = _state(request)
    if (refusal := await not_ready(state)) is not None:
        return error_response(refusal.status_code, refusal.code, refusal.message, refusal.headers)
    assert state.queue is not None  # not_ready says so
    body: dict[str, object] = {"status": "ready", "models": sorted(state.tasks)}
    if state.queue.workers_alive is not None:  # Redis mode: informative, not a condition
        body["workers"] = state.queue.workers_alive
        # per model: live workers that serve this replica's version and buckets of it
        body["model_workers"] = dict(sorted(state.queue.model_workers_alive.items()))
    return JSONResponse(body)


@router.get(
    "/metrics",
    operation_id="get_metrics",
    summary="Prometheus metrics (text format or OpenMetrics)",
    description="Request counts and latencies, batch sizes, padding efficiency, queue depth, "
    "per model (docs/deploy.md lists what to alert on). The Prometheus text format, or "
    "OpenMetrics for a scrape whose `Accept` names `application/openmetrics-text` (what "
    "Prometheus sends): that one carries the latency histogram's exemplars, the `trace_id` "
    "of sampled requests.",
    response_class=PlainTextResponse,
    responses={200: {"content": {"application/openmetrics-text": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    body, content_type = _state(request).metrics.exposition(request.headers.get("accept"))
    return Response(body, media_type=content_type)

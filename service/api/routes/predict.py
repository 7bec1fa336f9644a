"""``POST /v1/{qa,detect,pos,polarity}``: one item, or ``{"inputs": [...]}`` -> ``{"outputs"}``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel

from service.api.client_quota import admit
from service.api.deps import (
    DEADLINE_HEADER,
    PRIORITY_OF_LANE,
    ClientGone,
    ServiceState,
    cancel_on_disconnect,
    check_query,
    deadline_from,
    priority_from,
)
from service.api.deps import get_state as _state
from service.api.errors import ApiError, client_closed, too_many_items
from service.api.openapi import PREDICT_PARAMETERS, error_responses
from service.api.response_cache import Timing
from service.api.schemas import (
    DETECT_EXAMPLES,
    BatchRequest,
    DetectBatchResponse,
    DetectBody,
    DetectResponse,
    PolarityBatchResponse,
    PolarityBody,
    PolarityResponse,
    PosBatchResponse,
    PosBody,
    PosResponse,
    QABatchResponse,
    QABody,
    QAResponse,
)
from service.batching.scheduler import PREDICT_LANE
from service.tasks.base import Outputs, Prepared, Task, run_requests

router = APIRouter(prefix="/v1", tags=["predict"])

R = TypeVar("R")

_ERRORS = error_responses({422: "Invalid fields, empty or over-long text, too many items."})

ModelParam = Annotated[
    str | None,
    Query(description="Model name when several models do this task (default: the first)."),
]

_DEADLINE_DOC = (
    f" Send `{DEADLINE_HEADER}: <ms>` to answer 504 if not served within that time "
    "(capped by NLPSERVE_DEFAULT_DEADLINE_MS)."
)


def _examples(single: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    return {
        "single": {"summary": "One item", "value": single},
        "batch": {"summary": "A batch", "value": {"inputs": [single, second]}},
    }


# Each task's request body type: the routes' and the fast path's (service/api/fast_path.py).
BODIES: dict[str, Any] = {
    "pos": PosBody,
    "polarity": PolarityBody,
    "detect": DetectBody,
    "qa": QABody,
}


async def predict(request: Request, task_name: str, body: BaseModel, model: str | None) -> Response:
    """Answer one validated prediction request: what every route here does, and the fast
    path too. Errors are raised (ApiError, InputError, QueueError) for the app's handlers."""
    check_query(request)
    task = _state(request).resolve(task_name, model)
    is_batch = isinstance(body, BatchRequest)
    items = list(body.inputs) if is_batch else [body]  # type: ignore[attr-defined]
    results, timing = await run_items(request, task, items, task.decode)
    dumped = [r.model_dump() for r in results]
    payload = {"outputs": dumped} if is_batch else dumped[0]
    return Response(
        json.dumps(payload, ensure_ascii=False),
        media_type="application/json",
        headers={SERVER_TIMING: server_timing(timing)},
    )


async def run_items(
    request: Request, task: Task, items: list[BaseModel], decode: Callable[[Prepared, Outputs], R]
) -> tuple[list[R], dict[str, float]]:
    """``items`` (the task's request models) decoded by ``decode`` (``task.decode``, or more
    of the outputs), and where their time went: the one path of every HTTP prediction
    protocol (/v1 here, the V2 protocol in routes/v2.py), with the request's deadline and
    disconnect cancellation around :func:`run_work`."""
    request.state.model = task.name  # the metrics' and logs' model
    state = _state(request)
    deadline = deadline_from(request, state.settings)
    lane = priority_from(request, state)
    try:
        return await cancel_on_disconnect(
            request, run_work(state, task, items, decode, deadline, lane)
        )
    except ClientGone:
        raise client_closed() from None


async def run_work(
    state: ServiceState,
    task: Task,
    items: list[BaseModel],
    decode: Callable[[Prepared, Outputs], R],
    deadline: float,
    lane: str = PREDICT_LANE,
) -> tuple[list[R], dict[str, float]]:
    """What every protocol's prediction runs (HTTP's :func:`run_items`, the gRPC server's
    ModelInfer): the item limit, the queue (in ``lane``: the request's priority class), and
    the stage metrics. Cancelling the awaiting task withdraws the request's queued work."""
    if len(items) > state.settings.max_batch_items:
        raise too_many_items(len(items), state.settings.max_batch_items)
    if state.queue is None:
        raise ApiError(503, "not_ready", "the service is starting or stopping")
    queue = state.queue
    timing = Timing()
    # Counted here, where every protocol's answer is made (in Redis mode too: the API decodes
    # the workers' outputs, one reply per item however often its entry ran), never for
    # explanations (their masked variants run through run_requests, not here).
    monitor = state.metrics.monitor(task.name, task.outcomes)
    # Inputs are counted with the answer, not as each run ends: with the response cache a
    # request may run some items, then fail (504 waiting on another request's run, 429 on a
    # second run): no answer, so nothing counted.
    read: list[list[Prepared]] = []

    async def run(todo: list[BaseModel]) -> list[R]:
        # before the queue's own refusal and the tokenizer; todo: the cache's misses
        async with admit(state, len(todo), deadline, len(items)):
            return await run_requests(
                task,
                queue,
                todo,
                deadline,
                lane,
                timing=timing,
                decode=decode,
                read=read.append,
            )

    if (cache := state.response_cache) is None:
        results = await run(items)
    else:  # what it holds is answered here; only the rest is admitted and run
        results = await cache.serve(
            task, state.runners.get(task.name), items, decode, deadline, timing, run, lane
        )
    state.metrics.observe_stages(task.name, timing, priority=PRIORITY_OF_LANE[lane])
    for prepared in read:
        monitor.read(prepared)
    monitor.answered(task, results)
    return results, timing


SERVER_TIMING = "Server-Timing"


def server_timing(timing: dict[str, float]) -> str:
    """The W3C Server-Timing header (browsers' developer tools show it): where the request's
    time went in the server, in milliseconds (run_requests' ``timing``), and with the
    response cache on, first, what it answered (``cache;desc=hit``: every item)."""
    parts = [f"{name};dur={seconds * 1000:.3f}" for name, seconds in timing.items()]
    if isinstance(timing, Timing) and timing.cache is not None:
        parts.insert(0, f"cache;desc={timing.cache};dur={timing.cache_s * 1000:.3f}")
    return ", ".join(parts)


@router.post(
    "/pos",
    operation_id="tag_parts_of_speech",
    response_model=PosResponse | PosBatchResponse,
    responses=_ERRORS,
    openapi_extra=PREDICT_PARAMETERS,
    summary="Part-of-speech tags",
    description="Tag `text` (split into words by the model) or pre-split `tokens`. Texts over "
    "the model's max length (tokens) are rejected with 422 `input_too_long`." + _DEADLINE_DOC,
)
async def pos(
    request: Request,
    body: Annotated[
        PosBody,
        Body(
            openapi_examples=_examples(
                {"text": "The quick brown fox jumps over the lazy dog."},
                {"tokens": ["She", "likes", "red", "cars", "."]},
            )
        ),
    ],
    model: ModelParam = None,
):
    return await predict(request, "pos", body, model)


@router.post(
    "/polarity",
    operation_id="classify_polarity",
    response_model=PolarityResponse | PolarityBatchResponse,
    responses=_ERRORS,
    openapi_extra=PREDICT_PARAMETERS,
    summary="Sentence polarity (positive / negative)",
    description="Texts over the model's max length are cut to it and answered with "
    "`truncated: true`." + _DEADLINE_DOC,
)
async def polarity(
    request: Request,
    body: Annotated[
        PolarityBody,
        Body(
            openapi_examples=_examples(
                {"text": "A charming, funny and moving film."},
                {"text": "Dull, tedious and far too long."},
            )
        ),
    ],
    model: ModelParam = None,
):
    return await predict(request, "polarity", body, model)


@router.post(
    "/detect",
    operation_id="detect",
    response_model=DetectResponse | DetectBatchResponse,
    responses=_ERRORS,
    openapi_extra=PREDICT_PARAMETERS,
    summary="Machine-generated text detection",
    description="Texts over the model's max length are cut to their head and answered with "
    "`truncated: true`." + _DEADLINE_DOC,
)
async def detect(
    request: Request,
    body: Annotated[
        DetectBody,
        Body(
            openapi_examples=_examples(
                {"text": DETECT_EXAMPLES[0]},
                {"text": DETECT_EXAMPLES[1]},
            )
        ),
    ],
    model: ModelParam = None,
):
    return await predict(request, "detect", body, model)


@router.post(
    "/qa",
    operation_id="answer_question",
    response_model=QAResponse | QABatchResponse,
    responses=_ERRORS,
    openapi_extra=PREDICT_PARAMETERS,
    summary="Extractive question answering",
    description="The answer is a span of `context` with character offsets; long contexts are "
    "read in overlapping windows and the best span over all windows is returned." + _DEADLINE_DOC,
)
async def qa(
    request: Request,
    body: Annotated[
        QABody,
        Body(
            openapi_examples=_examples(
                {"question": "长城有多长？", "context": "长城总长度超过两万千米，是世界奇迹。"},
                {"question": "谁发明了造纸术？", "context": "东汉的蔡伦改进了造纸术。"},
            )
        ),
    ],
    model: ModelParam = None,
):
    return await predict(request, "qa", body, model)

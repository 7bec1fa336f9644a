"""The Open Inference Protocol (KServe "V2"), JSON REST, beside /v1: what Triton's, MLServer's
and KServe's clients and probes call. Health, metadata and ``infer``; no binary tensor data,
no other extension. (The same protocol over gRPC: service/api/grpc/, sharing
service/api/v2_tensors.py's ``infer`` with this route.)

An inference goes down /v1's own path (``run_items``: the same tasks, queue, batching,
deadlines, cancellation and metrics), its tensors translated by service/api/v2_tensors.py.
Errors are the protocol's ``{"error": "<message>"}`` (service/api/errors.py renders every
error under /v2 so) with the status /v1 gives for the same cause; what only a V2 envelope
can get wrong (tensor names, datatypes, shapes, the outputs asked for) is 400.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request
from fastapi.responses import Response

import service
from service.api.deps import get_state as _state
from service.api.openapi import PREDICT_PARAMETERS, v2_error_responses
from service.api.routes.ops import not_ready
from service.api.routes.predict import SERVER_TIMING, run_items, server_timing
from service.api.schemas import DETECT_EXAMPLES
from service.api.v2_schemas import (
    V2InferenceRequest,
    V2InferenceResponse,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
)
from service.api.v2_tensors import find_model, metadata
from service.api.v2_tensors import infer as infer_v2
from service.tasks.base import Task

router = APIRouter(prefix="/v2", tags=["v2"])

NamePath = Annotated[str, Path(description="A model name, as `GET /v1/models` lists them.")]
VersionPath = Annotated[
    str, Path(description="The model's version: only the one this server loaded is served.")
]

_MODEL_ERRORS = {404: "No model of that name is loaded, or not at that version."}
_NOT_READY = {
    503: "Not ready: starting, stopping, no models, the queue unreachable, or (Redis mode, "
    "NLPSERVE_REDIS_NO_WORKER_FAIL_S) no worker; the same truth as `/readyz`."
}
_INFER_ERRORS = {
    400: "Invalid JSON or header, or a request the model cannot take: an unknown or missing "
    "input, a datatype other than BYTES, a shape that is not [N] or does not match the data, "
    "an unknown output, binary tensor data.",
    404: _MODEL_ERRORS[404],
    422: "As /v1: empty or invalid text, text over NLPSERVE_MAX_TEXT_CHARS, more texts than "
    "NLPSERVE_MAX_BATCH_ITEMS, input over the model's limits.",
}


def _model(request: Request, name: str, version: str | None = None) -> Task:
    return find_model(_state(request).tasks, name, version)


# ---------------------------------------------------------------------------- server
@router.get("/", include_in_schema=False)  # what some clients ask for
@router.get(
    "",
    operation_id="v2_server_metadata",
    response_model=V2ServerMetadata,
    summary="Server metadata",
    description="The server's name and version, and the protocol extensions it serves (none).",
)
async def server_metadata() -> V2ServerMetadata:
    return V2ServerMetadata(name="nlpserve", version=service.__version__, extensions=[])


@router.head("/health/live", include_in_schema=False)
@router.get(
    "/health/live",
    operation_id="v2_server_live",
    response_model=V2Live,
    summary="Server liveness",
    description="200 while the process answers, as `/healthz`.",
)
async def live() -> V2Live:
    return V2Live(live=True)


@router.head("/health/ready", include_in_schema=False)
@router.get(
    "/health/ready",
    operation_id="v2_server_ready",
    response_model=V2Ready,
    responses=v2_error_responses(_NOT_READY, common=False),
    summary="Server readiness",
    description="200 when requests can be served, else 503: the same truth as `/readyz` "
    "(the protocol says a 4xx; clients read any status but 200 as not ready).",
)
async def ready(request: Request) -> V2Ready:
    if (refusal := await not_ready(_state(request))) is not None:
        raise refusal
    return V2Ready(ready=True)


# ---------------------------------------------------------------------------- models
_METADATA_DOC = (
    "The model's tensors as the V2 protocol sees them (not the ONNX graph's): text inputs "
    "(`BYTES`, shape `[-1]`), and its outputs; `probabilities` lists its columns' labels in "
    "`parameters.labels`."
)


@router.get(
    "/models/{name}",
    operation_id="v2_model_metadata",
    response_model=V2ModelMetadata,
    response_model_exclude_none=True,
    responses=v2_error_responses(_MODEL_ERRORS, common=False),
    summary="Model metadata",
    description=_METADATA_DOC,
)
async def model_metadata(request: Request, name: NamePath) -> V2ModelMetadata:
    return metadata(_model(request, name))


@router.get(
    "/models/{name}/versions/{version}",
    operation_id="v2_model_version_metadata",
    response_model=V2ModelMetadata,
    response_model_exclude_none=True,
    responses=v2_error_responses(_MODEL_ERRORS, common=False),
    summary="Model metadata, at a version",
    description=_METADATA_DOC + " 404 for a version other than the one served.",
)
async def model_version_metadata(
    request: Request, name: NamePath, version: VersionPath
) -> V2ModelMetadata:
    return metadata(_model(request, name, version))


async def _model_ready(request: Request, name: str, version: str | None) -> V2ModelReady:
    task = _model(request, name, version)
    if (refusal := await not_ready(_state(request), task.name)) is not None:
        raise refusal
    return V2ModelReady(name=task.name, ready=True)


_READY_DOC = (
    "200 when the model can serve now; 503 when not (the service's readiness, and in Redis "
    "mode with NLPSERVE_REDIS_NO_WORKER_FAIL_S a worker that serves this model); 404 for an "
    "unknown model or version."
)


@router.get(
    "/models/{name}/ready",
    operation_id="v2_model_ready",
    response_model=V2ModelReady,
    responses=v2_error_responses({**_MODEL_ERRORS, **_NOT_READY}, common=False),
    summary="Model readiness",
    description=_READY_DOC,
)
async def model_ready(request: Request, name: NamePath) -> V2ModelReady:
    return await _model_ready(request, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready",
    operation_id="v2_model_version_ready",
    response_model=V2ModelReady,
    responses=v2_error_responses({**_MODEL_ERRORS, **_NOT_READY}, common=False),
    summary="Model readiness, at a version",
    description=_READY_DOC,
)
async def model_version_ready(
    request: Request, name: NamePath, version: VersionPath
) -> V2ModelReady:
    return await _model_ready(request, name, version)


# ---------------------------------------------------------------------------- inference
def _text_input(name: str, texts: list[str]) -> dict[str, Any]:
    return {"name": name, "shape": [len(texts)], "datatype": "BYTES", "data": texts}


# One per committed model (the path's `{name}`); one text each, so that every server's
# NLPSERVE_MAX_BATCH_ITEMS takes them.
_INFER_EXAMPLES = {
    "detector-en": {"inputs": [_text_input("text", [DETECT_EXAMPLES[0]])]},
    "polarity-en": {
        "inputs": [_text_input("text", ["A charming, funny and moving film."])],
        "outputs": [{"name": "label"}, {"name": "probability"}],
    },
    "pos-en": {"inputs": [_text_input("text", ["The quick brown fox jumps over the lazy dog."])]},
    "qa-zh": {
        "id": "42",
        "inputs": [
            _text_input("question", ["长城有多长？"]),
            _text_input("context", ["长城总长度超过两万千米，是世界奇迹。"]),
        ],
    },
}
InferBody = Annotated[
    V2InferenceRequest,
    Body(
        openapi_examples={
            model: {"summary": f"{model} (as the model name)", "value": value}
            for model, value in _INFER_EXAMPLES.items()
        }
    ),
]
_INFER_DOC = (
    "Inputs: `text` (detect, polarity, pos) or `question` and `context` (qa), `BYTES` of "
    "shape `[N]`; data flat or nested. Outputs (all, or those `outputs` names): detect and "
    "polarity `label`, `probability`, `probabilities` `[N, C]`, `truncated`; pos `tokens` "
    "and `tags` (each element a JSON list); qa `answer`, `score`, `start`, `end`. The same "
    "batching, deadline (`X-Deadline-Ms`) and answers as /v1."
)


async def _infer(
    request: Request, body: V2InferenceRequest, name: str, version: str | None
) -> Response:
    task = _model(request, name, version)
    payload, timing = await infer_v2(
        task,
        body,
        _state(request).settings.max_batch_items,
        lambda items, decode: run_items(request, task, items, decode),
    )
    return Response(
        json.dumps(payload, ensure_ascii=False),
        media_type="application/json",
        headers={SERVER_TIMING: server_timing(timing)},
    )


@router.post(
    "/models/{name}/infer",
    operation_id="v2_infer",
    response_model=V2InferenceResponse,
    responses=v2_error_responses(_INFER_ERRORS),
    openapi_extra=PREDICT_PARAMETERS,
    summary="Inference",
    description=_INFER_DOC,
)
async def infer(request: Request, name: NamePath, body: InferBody) -> Response:
    return await _infer(request, body, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    operation_id="v2_infer_version",
    response_model=V2InferenceResponse,
    responses=v2_error_responses(_INFER_ERRORS),
    openapi_extra=PREDICT_PARAMETERS,
    summary="Inference, at a version",
    description=_INFER_DOC + " 404 for a version other than the one served.",
)
async def infer_version(
    request: Request, name: NamePath, version: VersionPath, body: InferBody
) -> Response:
    return await _infer(request, body, name, version)

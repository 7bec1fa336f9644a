"""``POST /v1/detect/explain`` and ``POST /v1/polarity/explain``: SHAP values per token.

The explainer's model calls go through the service's queue in the low-priority ``explain``
lane (see :mod:`service.explain`); ``shap`` is imported only here, lazily, and a server
without it answers 501.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, FastAPI, Query, Request

from service.api.client_quota import admit
from service.api.deps import (
    DEADLINE_HEADER,
    ClientGone,
    cancel_on_disconnect,
    check_query,
    deadline_from,
)
from service.api.deps import get_state as _state
from service.api.errors import ApiError, client_closed
from service.api.openapi import DEADLINE_PARAMETER, error_responses
from service.api.schemas import DETECT_EXAMPLES
from service.explain.adapters import build_explainer
from service.explain.engine import ExplainError, ExplainService, shap_available
from service.explain.schemas import ExplainRequest, ExplainResponse

router = APIRouter(prefix="/v1", tags=["explain"])

_ERRORS = error_responses(
    {
        422: "Invalid fields, empty or over-long text (NLPSERVE_MAX_TEXT_CHARS), or max_evals "
        "over NLPSERVE_EXPLAIN_MAX_EVALS_LIMIT.",
        501: "The `shap` package is not installed on this server.",
        504: f"Not finished before the deadline (`{DEADLINE_HEADER}`): ask for fewer max_evals.",
    }
)

ModelParam = Annotated[
    str | None,
    Query(description="Model name when several models do this task (default: the first)."),
]

_DOC = (
    "SHAP values (partition explainer over the model's own tokens) of `{output}`, in "
    "probability units: `base_value` (every token masked) + `sum(values)` == `output`. "
    "Masked variants run through the same batched queue as predictions, in a lower-priority "
    "lane that never delays them. Results are cached per (model version, text, max_evals). "
    f"`{DEADLINE_HEADER}` bounds the time spent."
)


def _example(text: str, *more: tuple[str, str, str]) -> dict:
    """The request examples of /docs: ``default`` and ``more`` (key, summary, text)."""
    examples = (("default", "A text", text), *more)
    return {k: {"summary": what, "value": {"text": t, "max_evals": 300}} for k, what, t in examples}


def explain_service(app: FastAPI) -> ExplainService:
    """The app's :class:`ExplainService`, created on first use from its settings."""
    service = getattr(app.state, "explain", None)
    if service is None:
        service = ExplainService.from_settings(_state_settings(app))
        app.state.explain = service
    return service


def _state_settings(app: FastAPI):
    return app.state.service.settings


async def warm_up_explain(app: FastAPI) -> None:
    """Import shap and JIT its tree code at startup (else the first explanation pays ~5 s).

    Optional: call it from the app's startup; a no-op without shap.
    """
    if shap_available():
        await explain_service(app).warm_up()


async def _explain(request: Request, task_name: str, body: ExplainRequest, model: str | None):
    check_query(request)
    state = _state(request)
    task = state.resolve(task_name, model)
    request.state.model = task.name
    # The predict endpoints' limit, on the client's text (422 text_too_long); the masked
    # variants built from it are exempt (service/explain/adapters.py).
    task.check_length(body.text)
    deadline = deadline_from(request, state.settings)
    if state.queue is None:
        raise ApiError(503, "not_ready", "the service is starting or stopping")
    service = explain_service(request.app)
    if task.name not in service.explainers and shap_available():
        service.register(build_explainer(task, state.queue))
    try:
        # one item of the client's limits; its variants' batches are not traced back to it
        async with admit(state, 1, deadline, refund=False):
            exp = await cancel_on_disconnect(
                request, service.explain(task.name, body.text, body.max_evals, deadline)
            )
    except ClientGone:
        raise client_closed() from None
    except ExplainError as e:
        raise ApiError(e.status_code, e.code, str(e)) from None
    return ExplainResponse.of(exp)


@router.post(
    "/detect/explain",
    operation_id="explain_detect",
    response_model=ExplainResponse,
    responses=_ERRORS,
    openapi_extra=DEADLINE_PARAMETER,
    summary="Explain the detector: SHAP value of each token for P(machine)",
    description=_DOC.format(output="machine_probability"),
)
async def explain_detect(
    request: Request,
    body: Annotated[
        ExplainRequest,
        Body(
            openapi_examples=_example(
                DETECT_EXAMPLES[0], ("human", "A human-written text", DETECT_EXAMPLES[1])
            )
        ),
    ],
    model: ModelParam = None,
):
    return await _explain(request, "detect", body, model)


@router.post(
    "/polarity/explain",
    operation_id="explain_polarity",
    response_model=ExplainResponse,
    responses=_ERRORS,
    openapi_extra=DEADLINE_PARAMETER,
    summary="Explain polarity: SHAP value of each word for P(positive)",
    description=_DOC.format(output="positive_probability"),
)
async def explain_polarity(
    request: Request,
    body: Annotated[
        ExplainRequest, Body(openapi_examples=_example("A charming, funny and moving film."))
    ],
    model: ModelParam = None,
):
    return await _explain(request, "polarity", body, model)

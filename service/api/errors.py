"""Every error leaves the service as ``{"error": {"code", "message"}}`` with a 4xx/5xx status
(and ``"limit": {"name", "value"}`` where a limit refused it: :class:`Limit`), or, under
``/v2`` (the Open Inference Protocol, routes/v2.py), as that protocol's
``{"error": "<message>"}``: the same status and message, the code only in the metrics.

Bad input is always a 4xx with a message naming the field; a 500 means a bug in the service.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.queueing.base import InferenceFailedError, QueueError, QueueFullError
from service.tasks import TASK_CLASSES
from service.tasks.base import LIMIT_REQUEST_SEQUENCES, InputError

log = logging.getLogger(__name__)


# The limits a refusal names in its body's ``limit`` (docs/service.md, "Errors"): stable names,
# so that a client reads the number instead of parsing the message.
LIMIT_BATCH_ITEMS = "max_batch_items"  # items in one request: NLPSERVE_MAX_BATCH_ITEMS
LIMIT_IN_FLIGHT = "max_in_flight"  # the client's items in flight: its in-flight limit
LIMIT_BURST = "burst"  # the client's items in one request: its rate limit's burst
LIMIT_RATE = "rate"  # the client's items a second: its rate limit
LIMIT_BODY_BYTES = "max_body_bytes"  # the body's bytes: NLPSERVE_MAX_BODY_BYTES
# LIMIT_REQUEST_SEQUENCES: model sequences one request may need (NLPSERVE_MAX_REQUEST_SEQUENCES,
# or NLPSERVE_MAX_QUEUE_DEPTH where lower); service.tasks raises it, below the API
LIMIT_NAMES = (
    LIMIT_BATCH_ITEMS,
    LIMIT_IN_FLIGHT,
    LIMIT_BURST,
    LIMIT_RATE,
    LIMIT_BODY_BYTES,
    LIMIT_REQUEST_SEQUENCES,
)


@dataclass(frozen=True)
class Limit:
    """The limit that refused a request, with the value in force for its client: the
    ``limit`` of a /v1 error body (never in /v2's, which has no room for it)."""

    name: str
    value: int | float

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value}

    @classmethod
    def of(cls, error: InputError) -> Limit | None:
        """The limit a task's refusal names, if any."""
        return None if error.limit is None else cls(*error.limit)


class ApiError(Exception):
    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        limit: Limit | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.headers = headers
        self.limit = limit


V2_PREFIX = "/v2"


def is_v2(path: str) -> bool:
    """Whether ``path`` is the V2 protocol's, whose errors are ``{"error": "<message>"}``."""
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_body(
    code: str, message: str, v2: bool = False, limit: Limit | None = None
) -> dict[str, Any]:
    if v2:
        return {"error": message}
    error: dict[str, Any] = {"code": code, "message": message}
    if limit is not None:
        error["limit"] = limit.as_json()
    return {"error": error}


def error_response(
    status_code: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    v2: bool = False,
    limit: Limit | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(code, message, v2, limit), status_code=status_code, headers=headers
    )


def too_many_items(n: int, limit: int, noun: str = "inputs") -> ApiError:
    return ApiError(
        422,
        "too_many_items",
        f"{n} {noun} in one request; the limit is {limit} (NLPSERVE_MAX_BATCH_ITEMS)",
        limit=Limit(LIMIT_BATCH_ITEMS, limit),
    )


# The endpoints whose body may be a batch (``POST /v1/<task>``; not the explain endpoints).
BATCH_PATHS = frozenset(f"/v1/{task}" for task in TASK_CLASSES)


def batch_len(doc: Any) -> int:
    """How many items a ``{"inputs": [...]}`` body holds (0 for anything else)."""
    if isinstance(doc, dict) and isinstance(items := doc.get("inputs"), list):
        return len(items)
    return 0


# tritonclient's binary tensor extension: this header gives the length of a JSON head that
# raw tensor bytes follow; such a body is no JSON, and each error it meets says so instead.
BINARY_HEADER = "inference-header-content-length"
BINARY_UNSUPPORTED = (
    "binary tensor data (the binary data extension, Inference-Header-Content-Length) is not "
    'supported: send every input as JSON "data" (tritonclient: '
    "set_data_from_numpy(array, binary_data=False))"
)


def _respond(
    request: Request,
    status: int,
    code: str,
    message: str,
    headers=None,
    reason: str = "",
    limit: Limit | None = None,
) -> JSONResponse:
    # The metrics middleware counts rejections by this reason: the code, unless more precise.
    request.state.error_code = reason or code
    v2 = is_v2(request.url.path)
    if v2 and status == 400 and BINARY_HEADER in request.headers:
        message = BINARY_UNSUPPORTED
    return error_response(status, code, message, headers, v2, limit)


# ---------------------------------------------------------------------------- validation
_HTTP_NAMES = {
    400: "bad_request",  # the fast path's body that could not be read
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",  # the only 408: raised by the body reader (api/middleware.py)
    413: "body_too_large",
    415: "unsupported_media_type",
}


def clip_path(path: str, limit: int = 200) -> str:
    """A client's URL path for a message, cut (a 10 kB path is not echoed back whole)."""
    return path if len(path) <= limit else f"{path[:limit]}... ({len(path)} characters)"


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if p in ("body", "item", "batch") and not parts:
            continue  # FastAPI's "body" and our union tags are not the client's field names
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def _code_for(err: dict[str, Any]) -> str:
    t = err.get("type", "")
    if t == "missing":
        return "missing_field"
    if t == "extra_forbidden":
        return "unknown_field"
    if t in ("empty_text", "text_or_tokens", "invalid_text"):
        return t
    if t == "string_unicode":  # a JSON key with a lone surrogate (see _KEY_NOT_UNICODE)
        return "invalid_text"
    if t == "too_short":
        return "empty_inputs"
    if t == "too_long":  # a list over the schema's bound (service.config.MAX_LIST_ITEMS)
        return "input_too_long"
    if t.endswith("_type") or t.endswith("_parsing"):
        return "wrong_type"
    return "invalid_request"


# pydantic's "string_unicode" at an object's own location: a key it cannot read as a string,
# which a JSON body's keys always are unless a "\ud800" escape made a lone surrogate (values
# with one are the text validators' invalid_text).
_KEY_NOT_UNICODE = "a field name holds an unpaired surrogate: not valid Unicode"


def validation_error(errors: list[dict[str, Any]]) -> tuple[int, str, str]:
    """(status, code, message) for pydantic/FastAPI validation errors."""
    if not errors:
        return 422, "invalid_request", "the request is not valid"
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        loc = first.get("loc", ())
        if detail and len(loc) == 2 and isinstance(loc[1], int):  # json's position
            detail = f"{detail}{'' if detail.endswith(' at') else ' at'} character {loc[1]}"
        return 400, "invalid_json", f"the body is not valid JSON{': ' + detail if detail else ''}"
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return 422, "missing_body", "a JSON object body is required"
    # A body that is valid JSON but not an object ([], "x", 3).
    if (
        first.get("type") in ("model_attributes_type", "dict_type", "model_type")
        and len([p for p in first.get("loc", ()) if p not in ("body", "item", "batch")]) == 0
    ):
        return 422, "wrong_type", "the body must be a JSON object"
    msgs = []
    for err in errors[:5]:
        path = _field_path(tuple(err.get("loc", ())))
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif err.get("type") == "string_unicode":
            msg = _KEY_NOT_UNICODE
        msgs.append(f"{path}: {msg}" if path else msg)
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, _code_for(first), "; ".join(msgs) + more


# What FastAPI raises (HTTPException 400, this detail) when json.loads fails with something
# other than a JSONDecodeError; the cause says why.
_FASTAPI_PARSE_ERROR = "There was an error parsing the body"


def body_parse_error(cause: BaseException | None) -> tuple[int, str, str]:
    """(status, code, message) for a body that could not be decoded as JSON."""
    if isinstance(cause, UnicodeDecodeError):
        reason = (
            f"it is not UTF-8 (byte 0x{cause.object[cause.start]:02x} at position {cause.start})"
        )
    elif isinstance(cause, RecursionError):
        reason = "it is nested too deeply"
    elif isinstance(cause, ValueError) and "digits" in str(cause):
        reason = "a number in it has too many digits"
    else:
        reason = str(cause) if cause is not None else "it could not be decoded"
    return 400, "invalid_json", f"the body is not valid JSON: {reason}"


def client_closed() -> ApiError:
    """A client gone before its answer (mid-body, queued or running): nobody reads this
    response; the status (nginx's 499) is for logs and metrics, apart from the 4xx of bad
    requests."""
    return ApiError(499, "client_closed_request", "the client closed the connection")


def retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


# ---------------------------------------------------------------------------- handlers
def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return _respond(
            request, exc.status_code, exc.code, exc.message, exc.headers, limit=exc.limit
        )

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError) -> JSONResponse:
        return _respond(request, exc.status_code, exc.code, exc.message, limit=Limit.of(exc))

    @app.exception_handler(QueueError)
    async def _queue(request: Request, exc: QueueError) -> JSONResponse:
        headers = None
        reason = ""
        if isinstance(exc, QueueFullError):
            headers = retry_after_header(exc.retry_after_s)
            reason = exc.reason
        elif exc.status_code == 503:
            headers = retry_after_header(1)
        elif isinstance(exc, InferenceFailedError):
            # rare (poison input, a diverged model) and worth a look: the client quotes its
            # request id, the worker's log and the dead letter name the work item
            log.warning(
                "request %s: %s %s: inference failed on work item %s: %s",
                getattr(request.state, "request_id", "-"),
                request.method,
                request.url.path,
                exc.item_id or "-",
                exc,
                extra={
                    "request_id": getattr(request.state, "request_id", None),
                    "item_id": exc.item_id or None,
                },
            )
        return _respond(request, exc.status_code, exc.code, str(exc), headers, reason)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        limit = request.app.state.service.settings.max_batch_items
        # what the fast path answers before validating; elsewhere "inputs" is unknown field
        if request.scope["path"] in BATCH_PATHS and (n := batch_len(exc.body)) > limit:
            return await _api(request, too_many_items(n, limit))
        status, code, message = validation_error(list(exc.errors()))
        if is_v2(request.scope["path"]):
            status = 400  # a malformed V2 envelope: 400, as the protocol and Triton answer
        return _respond(request, status, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _FASTAPI_PARSE_ERROR and exc.__cause__:
            if isinstance(exc.__cause__, ClientDisconnect):  # gone mid-body
                return await _api(request, client_closed())
            return _respond(request, *body_parse_error(exc.__cause__))
        # the body checks' own exceptions (api/middleware.py) carry their code
        code = getattr(exc, "code", None) or _HTTP_NAMES.get(
            exc.status_code, f"http_{exc.status_code}"
        )
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no endpoint {request.method} {clip_path(request.url.path)} (see /docs)"
            if request.url.path.rstrip("/").endswith("/explain"):
                from service.explain.adapters import EXPLAINED_OUTPUT

                have = " and ".join(f"/v1/{task}/explain" for task in EXPLAINED_OUTPUT)
                message += f"; explanations exist for {have}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {clip_path(request.url.path)}"
        return _respond(
            request,
            exc.status_code,
            code,
            message,
            getattr(exc, "headers", None),
            limit=getattr(exc, "limit", None),  # BodyTooLarge's
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", "-")
        log.exception(
            "unhandled error on %s %s (request %s)",
            request.method,
            request.url.path,
            rid,
            extra={"request_id": getattr(request.state, "request_id", None)},
        )
        return _respond(request, 500, "internal_error", "internal server error (logged)")

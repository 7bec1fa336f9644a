"""What ``/openapi.json`` (and so ``/docs``) says beyond what FastAPI derives from the routes:
the error responses every operation shares, the API-key security schemes where
``NLPSERVE_API_KEYS_FILE`` is set, the headers (``X-Deadline-Ms``, ``X-Request-ID``,
``traceparent``, ``Retry-After``), errors in the service's own ``{"error": {...}}`` shape
instead of FastAPI's ``{"detail": [...]}``, and names that clients generated from the schema
can live with (tests/api/test_openapi_consumers.py): each operation's ``operation_id`` is set
on its route, and the one-item-or-batch bodies and results are named components
(``QABody``, ``QAResult``), not FastAPI's ``Body`` and ``Response Qa V1 Qa Post``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.api.auth import is_exempt
from service.api.deps import DEADLINE_HEADER, MILLISECONDS, PRIORITY_HEADER, PRIORITY_LANES
from service.api.schemas import TEXT_MARK, BatchRequest, ErrorResponse
from service.api.v2_schemas import V2ErrorResponse
from service.config import Settings

REQUEST_ID_HEADER = "X-Request-ID"

# Tags group the operations in /docs and in generated clients (openapi-python-client: one
# module per tag).
TAGS = [
    {"name": "predict", "description": 'One item, or `{"inputs": [...]}` for a batch.'},
    {"name": "explain", "description": "SHAP values per token (needs `shap` on the server)."},
    {"name": "operations", "description": "Models, health, readiness and metrics."},
    {
        "name": "v2",
        "description": "The Open Inference Protocol (KServe V2) over JSON REST, for Triton, "
        'MLServer and KServe clients: texts are `BYTES` tensors. Errors are `{"error": '
        '"<message>"}`.',
    },
]
V2_TAG = "v2"

# What every POST endpoint may answer besides its own codes.
COMMON_ERRORS = {
    400: "Invalid JSON (`invalid_json`: not JSON, not UTF-8) or header (`invalid_header`).",
    404: "The model is not loaded / unknown model.",
    408: "The body did not fully arrive within NLPSERVE_BODY_TIMEOUT_S (`body_timeout`).",
    413: "Body over NLPSERVE_MAX_BODY_BYTES.",
    415: "A Content-Encoding (compressed body) this server does not read.",
    429: "The model's queue is full (`queue_full`), this client has its most items in "
    "flight (`client_quota`: NLPSERVE_CLIENT_MAX_IN_FLIGHT or its own `max_in_flight`), or "
    "has sent its items a second (`client_rate`: NLPSERVE_CLIENT_RATE or its own `rate`): "
    "retry after `Retry-After` seconds.",
    503: "Starting, shutting down, or the queue backend is unreachable.",
    504: f"Not served before the deadline (`{DEADLINE_HEADER}`).",
}
# What any operation may answer: a bug (logged, with the request id).
INTERNAL_ERROR = "Unexpected server error (`internal_error`): a bug, logged with the request id."

# Response headers (what /docs shows; schemathesis' fuzzing checks they are there).
_REQUEST_ID_DOC = (
    "The request's id: the caller's `X-Request-ID` when it is 1 to 128 of `A-Z a-z 0-9 . _ : "
    "-`, else one minted here. The server's logs name it: quote it when reporting a problem."
)
# W3C Trace Context (service/tracecontext.py): on every answer, like X-Request-ID.
TRACE_HEADERS: dict[str, Any] = {
    "traceparent": {
        "description": "W3C Trace Context of this request: `00-<trace-id>-<span-id>-<flags>`. "
        "The trace id is the caller's (a valid `traceparent` sent with the request) or a new "
        "one (none, or an invalid one: ignored, never an error); the span id is this "
        "request's own, which the server's JSON logs name next to the trace id; the flags "
        "are the caller's sampled flag (`00` for a new trace).",
        "required": True,
        "schema": {"type": "string", "pattern": "^00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]$"},
    },
    "tracestate": {
        "description": "The caller's `tracestate`, unchanged, when it came with a valid "
        "`traceparent` and is printable ASCII of at most 512 characters.",
        "schema": {"type": "string"},
    },
}
RESPONSE_HEADERS: dict[int, dict[str, Any]] = {
    429: {
        "Retry-After": {
            "description": "Seconds to wait before retrying (the queue's estimate; 1 for "
            "`client_quota`; for `client_rate`, until the client's bucket holds the request's "
            "items).",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        }
    },
    503: {
        "Retry-After": {
            "description": "Seconds to wait before retrying, where a retry may succeed "
            "(shutting down, queue backend unreachable).",
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}

_SERVER_TIMING: dict[str, Any] = {
    "description": "Where the request's time went in the server, in milliseconds (W3C "
    "Server-Timing; browsers' developer tools show it): `tokenize`, `queue` (waiting for the "
    "model: queued, batching, handed over) and `inference` (the batch that ran its slowest "
    "sequence), e.g. `tokenize;dur=0.210, queue;dur=1.532, inference;dur=8.071`. With "
    "NLPSERVE_RESPONSE_CACHE_MB, first `cache;desc=hit|partial|miss`: `hit` (every item "
    "answered from the response cache) has no other entry.",
    "schema": {"type": "string"},
}

_DEADLINE_DOC = (
    "Milliseconds this request may take before a 504 (capped by NLPSERVE_DEFAULT_DEADLINE_MS, "
    "the default): a positive number in digits, with an optional fraction."
)

# Declared for the docs only (Swagger's "Try it out" can send it); the routes read it through
# service.api.deps.deadline_from, which answers 400 for a bad value.
DEADLINE_PARAMETER: dict[str, Any] = {
    "parameters": [
        {
            "name": DEADLINE_HEADER,
            "in": "header",
            "required": False,
            "description": _DEADLINE_DOC,
            # a string of digits: a JSON Schema number also allows "1e3" or "1.5e+308",
            # which the header refuses (400 invalid_header)
            "schema": {
                "type": "string",
                # generators (openapi-python-client) document an argument from its schema
                "description": _DEADLINE_DOC,
                # the lookahead: not all zeros ("0" and "0.0" are not positive)
                "pattern": f"^(?=[0-9.]*[1-9]){MILLISECONDS.pattern}$",
                "examples": ["2000", "2.5"],
            },
        }
    ]
}

_PRIORITY_DOC = (
    "The prediction's priority class: `interactive` (the default) or `batch`, for bulk "
    "scoring: batch-priority sequences run only when no interactive prediction of the model "
    "waits (before explanations), each still bounded by its own deadline (then 504). A client "
    "whose line in the keys file says `priority=batch` is batch whatever this says. Any other "
    "value: 400 `invalid_header`."
)

# The prediction routes' headers: the deadline and the priority class (read by
# service.api.deps.priority_from).
PREDICT_PARAMETERS: dict[str, Any] = {
    "parameters": [
        *DEADLINE_PARAMETER["parameters"],
        {
            "name": PRIORITY_HEADER,
            "in": "header",
            "required": False,
            "description": _PRIORITY_DOC,
            "schema": {
                "type": "string",
                "description": _PRIORITY_DOC,
                "enum": list(PRIORITY_LANES),
                "default": "interactive",
            },
        },
    ]
}


def error_responses(own: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route: the common errors plus ``own`` (which wins on a code)."""
    return {
        status: {"model": ErrorResponse, "description": text}
        for status, text in sorted({**COMMON_ERRORS, **own}.items())
    }


def v2_error_responses(own: dict[int, str], common: bool = True) -> dict[int | str, dict[str, Any]]:
    """The same for a V2 protocol route (its error shape), ``common``: a POST's errors."""
    return {
        status: {"model": V2ErrorResponse, "description": text}
        for status, text in sorted({**(COMMON_ERRORS if common else {}), **own}.items())
    }


def _error_ref(op: dict[str, Any]) -> dict[str, str]:
    name = "V2ErrorResponse" if V2_TAG in op.get("tags", ()) else "ErrorResponse"
    return {"$ref": f"#/components/schemas/{name}"}


def _declare_shared(op: dict[str, Any]) -> None:
    """What every operation shares: a 500 in the error shape, ``X-Request-ID`` and the trace
    context on every answer, ``Retry-After`` where the service sends it."""
    responses = op.setdefault("responses", {})
    responses.setdefault(
        "500",
        {
            "description": INTERNAL_ERROR,
            "content": {"application/json": {"schema": _error_ref(op)}},
        },
    )
    # a prediction: /v1's, or the V2 operations with a body (inferences)
    timed = "predict" in op.get("tags", ()) or (
        V2_TAG in op.get("tags", ()) and "requestBody" in op
    )
    for status, response in responses.items():
        headers = response.setdefault("headers", {})
        headers[REQUEST_ID_HEADER] = {
            "description": _REQUEST_ID_DOC,
            "required": True,
            "schema": {"type": "string"},
        }
        headers.update(TRACE_HEADERS)
        headers.update(RESPONSE_HEADERS.get(int(status), {}))
        if status == "200" and timed:
            headers["Server-Timing"] = _SERVER_TIMING
    op["responses"] = dict(sorted(responses.items()))


def _name_unions(schema: dict[str, Any]) -> None:
    """The one-item-or-batch request and response schemas, inline in each operation with
    FastAPI's titles (``Body`` for all four, ``Response Qa V1 Qa Post``), become components
    named after their item (``QARequest`` | ``QABatchRequest``: ``QABody``; ``QAResponse`` |
    ``QABatchResponse``: ``QAResult``), which generated clients name their types by."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})

    def hoist(holder: dict[str, Any], suffix: str, replaced: str) -> None:
        inline = holder.get("schema", {})
        choices = inline.get("oneOf") or inline.get("anyOf")
        if not choices or "$ref" not in choices[0]:
            return
        first = choices[0]["$ref"].rsplit("/", 1)[-1]
        if not first.endswith(replaced):
            return
        name = first[: -len(replaced)] + suffix
        components[name] = {**inline, "title": name}
        holder["schema"] = {"$ref": f"#/components/schemas/{name}"}

    for path in schema.get("paths", {}).values():
        for op in path.values():
            for content in op.get("requestBody", {}).get("content", {}).values():
                hoist(content, "Body", "Request")
            for content in op.get("responses", {}).get("200", {}).get("content", {}).values():
                hoist(content, "Result", "Response")
    schema["components"]["schemas"] = dict(sorted(components.items()))


def _cannot_fail_validation(op: dict[str, Any]) -> bool:
    """No body and only string path parameters (``/v1/models/{name}``): nothing to 422."""
    params = op.get("parameters", [])
    return (
        "requestBody" not in op
        and bool(params)
        and all(
            p.get("in") == "path" and p.get("schema", {}).get("type") == "string" for p in params
        )
    )


def _mark_text_limit(node: Any, max_chars: int) -> None:
    """Every schema of a client text (``TEXT_MARK``) gets this server's length limit."""
    if isinstance(node, dict):
        if node.pop(TEXT_MARK, False):
            node["maxLength"] = max_chars
        for value in node.values():
            _mark_text_limit(value, max_chars)
    elif isinstance(node, list):
        for value in node:
            _mark_text_limit(value, max_chars)


def most_batch_items(settings: Settings) -> int:
    """The most items a batch request can have answered: NLPSERVE_MAX_BATCH_ITEMS, or fewer
    where NLPSERVE_MAX_QUEUE_DEPTH is lower (a request needing more sequences than the queue
    holds is a 422 input_too_long; NLPSERVE_MAX_REQUEST_SEQUENCES is at least the former).
    Each batch body's ``maxItems``, and ``GET /v1/models``' ``batch.max_items``."""
    return min(settings.max_batch_items, settings.max_queue_depth)


def _apply_limits(schemas: dict[str, Any], settings: Settings) -> None:
    """The limits this server enforces (its settings), not only the static models' bounds:
    a schema that let 10,000 items or a 1,000,000-character text pass announced requests
    that could only get a 422."""
    _mark_text_limit(schemas, settings.max_text_chars)
    for cls in BatchRequest.__subclasses__():
        inputs = schemas.get(cls.__name__, {}).get("properties", {}).get("inputs")
        if inputs is not None:
            inputs["maxItems"] = most_batch_items(settings)  # at most MAX_LIST_ITEMS (config)
    explain = schemas.get("ExplainRequest", {}).get("properties", {}).get("max_evals", {})
    for choice in explain.get("anyOf", []):
        if choice.get("type") == "integer":
            choice["maximum"] = settings.explain_max_evals_limit


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [t for v in value for t in _texts(v)]
    return []


def _fit_examples(paths: dict[str, Any], settings: Settings) -> None:
    """Request examples (what /docs' "Try it out" sends) that this server answers 200:
    ``max_evals`` down to its limit, a batch of the items that fit (at most
    NLPSERVE_MAX_BATCH_ITEMS and NLPSERVE_MAX_QUEUE_DEPTH), and an example left out when a
    text in it is over NLPSERVE_MAX_TEXT_CHARS. New dicts: the routes' own examples are
    shared by every app."""

    def fits(value: Any) -> bool:
        return all(len(t) <= settings.max_text_chars for t in _texts(value))

    for path in paths.values():
        for op in path.values():
            batches = V2_TAG not in op.get("tags", ())  # V2 `inputs` are tensors of one text
            for content in op.get("requestBody", {}).get("content", {}).values():
                if "examples" not in content:
                    continue
                fitted = {}
                for key, example in content["examples"].items():
                    value = example.get("value")
                    if isinstance(value, dict):
                        value = dict(value)
                        if batches and isinstance(value.get("inputs"), list):
                            items = [item for item in value["inputs"] if fits(item)]
                            value["inputs"] = items[: most_batch_items(settings)]
                            if not items:
                                continue
                        if isinstance(value.get("max_evals"), int):
                            limit = settings.explain_max_evals_limit
                            value["max_evals"] = min(value["max_evals"], limit)
                    if fits(value):
                        fitted[key] = {**example, "value": value}
                if fitted:
                    content["examples"] = fitted
                else:  # none fits: no examples, rather than an empty choice in /docs
                    del content["examples"]


# Where NLPSERVE_API_KEYS_FILE is set: the two ways to send a key (/docs' Authorize button),
# required by every operation but the exempt ones (service/api/auth.py).
SECURITY_SCHEMES: dict[str, Any] = {
    "bearerAuth": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <key>`: a key of the server's "
        "NLPSERVE_API_KEYS_FILE (`nlpserve keys new NAME` makes one).",
    },
    "apiKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "The same key in `X-API-Key: <key>`.",
    },
}
UNAUTHORIZED = (
    "No API key (`unauthorized`) or a key the server does not hold (`invalid_api_key`): send "
    "`Authorization: Bearer <key>` or `X-API-Key: <key>`."
)


AUTH_DESCRIPTION = (
    "\nThis server requires an API key on every operation but the probes and metrics: "
    "`Authorization: Bearer <key>` or `X-API-Key: <key>` (the Authorize button); without "
    "one, 401 `unauthorized`, with a key it does not hold, 401 `invalid_api_key`.\n"
)


def _require_key(op: dict[str, Any]) -> None:
    op["security"] = [{name: []} for name in SECURITY_SCHEMES]
    op.setdefault("responses", {})["401"] = {
        "description": UNAUTHORIZED,
        "headers": {
            "WWW-Authenticate": {
                "description": 'The scheme to authenticate with: `Bearer realm="nlpserve"`.',
                "required": True,
                "schema": {"type": "string"},
            }
        },
        "content": {"application/json": {"schema": _error_ref(op)}},
    }


def install_openapi(app: FastAPI) -> None:
    """``app.openapi``: FastAPI's schema with what this module adds (its docstring). Every
    422 is this service's ErrorResponse (its validation handler answers so)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                tags=TAGS,
            )
            settings = app.state.service.settings
            auth = settings.api_keys_file is not None
            if auth:
                components = schema.setdefault("components", {})
                components["securitySchemes"] = SECURITY_SCHEMES
                schema["info"]["description"] += AUTH_DESCRIPTION
            for where, path in schema.get("paths", {}).items():
                for op in path.values():
                    ours = _error_ref(op)
                    if auth and not is_exempt(where):
                        _require_key(op)
                    _declare_shared(op)
                    if _cannot_fail_validation(op):  # FastAPI adds a 422 to any parameter
                        op.get("responses", {}).pop("422", None)
                    for response in op.get("responses", {}).values():
                        for content in response.get("content", {}).values():
                            if (
                                content.get("schema", {})
                                .get("$ref", "")
                                .endswith("/HTTPValidationError")
                            ):
                                content["schema"] = ours
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
            _apply_limits(schema.get("components", {}).get("schemas", {}), settings)
            _fit_examples(schema.get("paths", {}), settings)
            _name_unions(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
